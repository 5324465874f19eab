//! Which workloads each device runs. Pure: devices and workloads in,
//! per-device workload lists out. Today every placement is "every matching
//! device" (a DaemonSet): label selector and architecture.

use std::collections::BTreeMap;

use baton_protocol::spec::WorkloadSpec;

use crate::workload::Placement;

/// What placement looks at on a device.
#[derive(Debug, Clone)]
pub struct DeviceFacts {
    pub id: String,
    pub labels: BTreeMap<String, String>,
    /// Rust arch name from the inventory (`aarch64`, `arm`, `x86_64`); empty if unknown.
    pub arch: String,
}

/// A stored workload: the spec (with its revision) and where it goes.
#[derive(Debug, Clone)]
pub struct Placed {
    pub spec: WorkloadSpec,
    pub placement: Placement,
}

/// The OCI name of a Rust target arch, as manifests write it.
pub fn oci_arch(rust_arch: &str) -> &str {
    match rust_arch {
        "x86_64" => "amd64",
        "aarch64" => "arm64",
        other => other,
    }
}

pub fn fits(p: &Placement, d: &DeviceFacts) -> bool {
    let labels_ok = p.selector.iter().all(|(k, v)| d.labels.get(k) == Some(v));
    let arch_ok = p.arch.is_empty() || p.arch.iter().any(|a| a == oci_arch(&d.arch));
    labels_ok && arch_ok
}

/// Each device's workloads, sorted by name; devices with none get an empty list.
pub fn place(devices: &[DeviceFacts], workloads: &[Placed]) -> BTreeMap<String, Vec<WorkloadSpec>> {
    devices
        .iter()
        .map(|d| {
            let mut mine: Vec<WorkloadSpec> =
                workloads.iter().filter(|w| fits(&w.placement, d)).map(|w| w.spec.clone()).collect();
            mine.sort_by(|a, b| a.name.cmp(&b.name));
            (d.id.clone(), mine)
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn dev(id: &str, arch: &str, labels: &[(&str, &str)]) -> DeviceFacts {
        DeviceFacts {
            id: id.into(),
            arch: arch.into(),
            labels: labels.iter().map(|(k, v)| (k.to_string(), v.to_string())).collect(),
        }
    }

    fn wl(name: &str, selector: &[(&str, &str)], arch: &[&str]) -> Placed {
        Placed {
            spec: WorkloadSpec { name: name.into(), ..Default::default() },
            placement: Placement {
                selector: selector.iter().map(|(k, v)| (k.to_string(), v.to_string())).collect(),
                arch: arch.iter().map(|a| a.to_string()).collect(),
            },
        }
    }

    #[test]
    fn placement_by_labels_and_architecture() {
        let devices = [
            dev("pi4", "aarch64", &[("site", "lyon"), ("role", "sensor")]),
            dev("pi2", "arm", &[("site", "lyon")]),
            dev("nuc", "x86_64", &[("site", "paris")]),
        ];
        let workloads = [
            wl("everywhere", &[], &[]),
            wl("lyon-only", &[("site", "lyon")], &[]),
            wl("sensors-64", &[("role", "sensor")], &["arm64"]),
            wl("arm32", &[], &["arm"]),
        ];
        let placed = place(&devices, &workloads);
        let names = |id: &str| placed[id].iter().map(|w| w.name.as_str()).collect::<Vec<_>>();
        assert_eq!(names("pi4"), vec!["everywhere", "lyon-only", "sensors-64"]);
        assert_eq!(names("pi2"), vec!["arm32", "everywhere", "lyon-only"]);
        assert_eq!(names("nuc"), vec!["everywhere"]);
    }

    #[test]
    fn a_device_with_unknown_arch_gets_only_arch_free_workloads() {
        let placed = place(&[dev("new", "", &[])], &[wl("any", &[], &[]), wl("pinned", &[], &["arm64"])]);
        assert_eq!(placed["new"].len(), 1);
    }
}
