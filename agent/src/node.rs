//! What the device is and how it is doing: inventory and heartbeat samples,
//! read from /proc and /sys. Parsers are pure functions over file contents.

use std::path::Path;
use std::time::Instant;

use baton_protocol::{CgroupVersion, Heartbeat, Inventory};

use crate::config::AgentConfig;

/// Reads the inventory once per connect: it changes rarely.
pub fn inventory(config: &AgentConfig) -> Inventory {
    let disk_bytes = disk_usage(&config.data_dir).map_or(0, |(size, _)| size);
    let meminfo = read("/proc/meminfo");
    Inventory {
        agent_version: crate::version::version().into(),
        arch: std::env::consts::ARCH.into(),
        arch_variant: if std::env::consts::ARCH == "arm" { "v7".into() } else { String::new() },
        os: os_pretty_name(&read("/etc/os-release")).unwrap_or_else(|| "Linux".into()),
        kernel: read("/proc/sys/kernel/osrelease").trim().into(),
        hostname: read("/proc/sys/kernel/hostname").trim().into(),
        cpus: std::thread::available_parallelism().map_or(1, |n| n.get().min(u16::MAX as usize) as u16),
        memory_bytes: meminfo_kib(&meminfo, "MemTotal").unwrap_or(0) * 1024,
        disk_bytes,
        cgroup: cgroup_version(Path::new("/sys/fs/cgroup")),
        labels: config.labels.iter().map(|(k, v)| (k.clone(), v.clone())).collect(),
        // Not the bridge's (the gateway of its containers, service addresses).
        addresses: addresses(&config.network.bridge),
        // Filled in by the link, which holds the device key and the upgrader.
        sealing_key: Vec::new(),
        previous_agent_version: String::new(),
        upgrade: None,
        heartbeat_interval_s: config.heartbeat_interval.as_secs().min(u64::from(u32::MAX)) as u32,
        // Filled in by the link, which knows whether an engine runs.
        no_workloads: false,
    }
}

/// Samples the device for one heartbeat.
pub struct HeartbeatSampler {
    seq: u32,
    started: Instant,
}

impl Default for HeartbeatSampler {
    fn default() -> Self {
        Self { seq: 0, started: Instant::now() }
    }
}

impl HeartbeatSampler {
    pub fn sample(&mut self, data_dir: &Path, applied_generation: u64) -> Heartbeat {
        self.seq = self.seq.wrapping_add(1);
        let meminfo = read("/proc/meminfo");
        let total = meminfo_kib(&meminfo, "MemTotal").unwrap_or(0);
        let available = meminfo_kib(&meminfo, "MemAvailable").unwrap_or(total);
        let uptime = first_f64(&read("/proc/uptime")).map_or(self.started.elapsed().as_secs(), |s| s as u64);
        Heartbeat {
            seq: self.seq,
            uptime_s: uptime.min(u64::from(u32::MAX)) as u32,
            load1_centi: first_f64(&read("/proc/loadavg")).map_or(0, |l| (l * 100.0).round() as u32),
            mem_used_kib: total.saturating_sub(available),
            mem_total_kib: total,
            disk_free_mib: disk_usage(data_dir).map_or(0, |(_, free)| free >> 20),
            temp_milli_c: cpu_temperature(Path::new("/sys/class/thermal")),
            applied_generation,
            unix_ms: crate::runtime::now_ms(),
            loads: Vec::new(),
        }
    }
}

fn read(path: &str) -> String {
    std::fs::read_to_string(path).unwrap_or_default()
}

pub fn os_pretty_name(os_release: &str) -> Option<String> {
    os_release.lines().find_map(|l| {
        let v = l.strip_prefix("PRETTY_NAME=")?;
        Some(v.trim().trim_matches('"').to_string())
    })
}

pub fn meminfo_kib(meminfo: &str, key: &str) -> Option<u64> {
    meminfo.lines().find_map(|l| {
        let rest = l.strip_prefix(key)?.strip_prefix(':')?;
        rest.split_whitespace().next()?.parse().ok()
    })
}

fn first_f64(s: &str) -> Option<f64> {
    s.split_whitespace().next()?.parse().ok().filter(|v: &f64| v.is_finite() && *v >= 0.0)
}

pub fn cgroup_version(root: &Path) -> CgroupVersion {
    if root.join("cgroup.controllers").exists() {
        CgroupVersion::V2
    } else if root.join("unified").join("cgroup.controllers").exists() {
        CgroupVersion::Hybrid
    } else if root.join("memory").exists() {
        CgroupVersion::V1
    } else {
        CgroupVersion::Unknown
    }
}

/// The hottest "cpu"-ish thermal zone, else the first zone; `None` without any.
pub fn cpu_temperature(thermal: &Path) -> Option<i32> {
    let mut first = None;
    for entry in std::fs::read_dir(thermal).ok()?.flatten() {
        let zone = entry.path();
        let Some(t) = std::fs::read_to_string(zone.join("temp")).ok().and_then(|t| t.trim().parse::<i32>().ok()) else {
            continue;
        };
        let kind = std::fs::read_to_string(zone.join("type")).unwrap_or_default();
        if kind.contains("cpu") || kind.contains("soc") {
            return Some(t);
        }
        first.get_or_insert(t);
    }
    first
}

/// (size, free for unprivileged users) of the filesystem holding `path`, in bytes.
/// Walks up to the nearest existing ancestor, since the data dir may not exist yet.
pub fn disk_usage(path: &Path) -> Option<(u64, u64)> {
    let existing = path.ancestors().find(|p| p.exists())?;
    let c_path = std::ffi::CString::new(existing.as_os_str().as_encoded_bytes()).ok()?;
    let mut st = std::mem::MaybeUninit::<libc::statvfs>::zeroed();
    // SAFETY: c_path is a valid NUL-terminated string and st points to writable memory
    // of the right type; statvfs fully initialises it when it returns 0.
    let st = unsafe {
        if libc::statvfs(c_path.as_ptr(), st.as_mut_ptr()) != 0 {
            return None;
        }
        st.assume_init()
    };
    let frsize = st.f_frsize as u64;
    Some((st.f_blocks as u64 * frsize, st.f_bavail as u64 * frsize))
}

/// Non-loopback IPv4 and IPv6 addresses of the device's interfaces.
pub fn addresses(except_on: &str) -> Vec<String> {
    let mut out = Vec::new();
    let mut head: *mut libc::ifaddrs = std::ptr::null_mut();
    // SAFETY: getifaddrs writes a list we only read and then free with freeifaddrs;
    // each sockaddr is read according to its own sa_family.
    unsafe {
        if libc::getifaddrs(&mut head) != 0 {
            return out;
        }
        let mut cur = head;
        while !cur.is_null() {
            let addr = (*cur).ifa_addr;
            if !addr.is_null() {
                let ip: Option<std::net::IpAddr> = match i32::from((*addr).sa_family) {
                    libc::AF_INET => {
                        let sin = &*(addr as *const libc::sockaddr_in);
                        Some(std::net::Ipv4Addr::from(u32::from_be(sin.sin_addr.s_addr)).into())
                    }
                    libc::AF_INET6 => {
                        let sin6 = &*(addr as *const libc::sockaddr_in6);
                        Some(std::net::Ipv6Addr::from(sin6.sin6_addr.s6_addr).into())
                    }
                    _ => None,
                };
                let name = std::ffi::CStr::from_ptr((*cur).ifa_name).to_bytes();
                if name == except_on.as_bytes() {
                    cur = (*cur).ifa_next;
                    continue;
                }
                if let Some(ip) = ip.filter(|ip| !ip.is_loopback() && !is_link_local(ip)) {
                    out.push(ip.to_string());
                }
            }
            cur = (*cur).ifa_next;
        }
        libc::freeifaddrs(head);
    }
    out.sort();
    out.dedup();
    out
}

fn is_link_local(ip: &std::net::IpAddr) -> bool {
    match ip {
        std::net::IpAddr::V4(v4) => v4.is_link_local(),
        std::net::IpAddr::V6(v6) => (v6.segments()[0] & 0xffc0) == 0xfe80,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_proc_and_etc_files() {
        let meminfo = "MemTotal:        3900000 kB\nMemFree:  100 kB\nMemAvailable:    3000000 kB\n";
        assert_eq!(meminfo_kib(meminfo, "MemTotal"), Some(3_900_000));
        assert_eq!(meminfo_kib(meminfo, "MemAvailable"), Some(3_000_000));
        assert_eq!(meminfo_kib(meminfo, "Mem"), None);
        assert_eq!(
            os_pretty_name("ID=debian\nPRETTY_NAME=\"Debian GNU/Linux 12 (bookworm)\"\n").as_deref(),
            Some("Debian GNU/Linux 12 (bookworm)")
        );
        assert_eq!(first_f64("0.37 0.20 0.10 1/100 42"), Some(0.37));
        assert_eq!(first_f64("nan"), None);
        assert_eq!(first_f64(""), None);
    }

    #[test]
    fn thermal_zone_prefers_cpu() {
        let dir = tempfile::tempdir().unwrap();
        for (zone, kind, temp) in [("thermal_zone0", "acpitz", "30000"), ("thermal_zone1", "cpu-thermal", "51234")] {
            std::fs::create_dir(dir.path().join(zone)).unwrap();
            std::fs::write(dir.path().join(zone).join("type"), kind).unwrap();
            std::fs::write(dir.path().join(zone).join("temp"), temp).unwrap();
        }
        assert_eq!(cpu_temperature(dir.path()), Some(51234));
        assert_eq!(cpu_temperature(&dir.path().join("missing")), None);
    }

    #[test]
    fn disk_usage_walks_up_to_an_existing_dir() {
        let (size, free) = disk_usage(Path::new("/tmp/does/not/exist/yet")).unwrap();
        assert!(size > 0 && free <= size);
    }
}
