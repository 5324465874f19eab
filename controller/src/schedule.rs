//! Which devices run each workload. Pure: devices, workloads and the previous
//! assignment in; the new assignment out. Table-tested, benchmarked.
//!
//! - `every` workloads (no `replicas`) go to every device that matches the
//!   selector and architecture, whatever its state: a device that is away
//!   keeps its place and catches up when it returns (a DaemonSet).
//! - `replicas: N` workloads get N devices, one replica per device. A replica
//!   stays where it is while its device still matches and has not been gone
//!   past the grace period: brief disconnects never move work. New replicas go
//!   to reachable devices whose capacity (memory, CPU) still fits the request,
//!   spread across the values of a topology label when one is named, and
//!   otherwise to the least allocated device.

use std::cmp::Reverse;
use std::collections::{BTreeMap, BTreeSet, BinaryHeap};

use baton_protocol::spec::WorkloadSpec;

use crate::workload::Placement;

/// What placement looks at on a device.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct DeviceFacts {
    pub id: String,
    /// A workload goes only to devices of its own tenant.
    pub tenant: String,
    pub labels: BTreeMap<String, String>,
    /// Rust arch name from the inventory (`aarch64`, `arm`, `x86_64`); empty if unknown.
    pub arch: String,
    /// Memory and CPU the device offers (0 = unknown: requests are not checked).
    pub memory_bytes: u64,
    pub cpu_millis: u64,
    /// Online now: only reachable devices receive new replicas.
    pub reachable: bool,
    /// Offline for longer than the grace period: its replicas move elsewhere.
    pub gone: bool,
    /// Its agent runs no workloads (`--no-workloads`): nothing goes there.
    pub no_workloads: bool,
}

/// A stored workload: the spec (with its revision) and where it goes.
#[derive(Debug, Clone)]
pub struct Placed {
    pub tenant: String,
    pub spec: WorkloadSpec,
    pub placement: Placement,
    /// `None`: every matching device.
    pub replicas: Option<u32>,
}

/// Workload name → the devices it runs on.
pub type Assignment = BTreeMap<String, BTreeSet<String>>;

#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Schedule {
    pub assignment: Assignment,
    /// Workload → replicas that fit nowhere.
    pub unplaced: BTreeMap<String, u32>,
}

impl Schedule {
    /// Each device's workload names (devices without any are absent).
    pub fn by_device(&self) -> BTreeMap<&str, Vec<&str>> {
        let mut out: BTreeMap<&str, Vec<&str>> = BTreeMap::new();
        for (w, devices) in &self.assignment {
            for d in devices {
                out.entry(d.as_str()).or_default().push(w.as_str());
            }
        }
        out
    }
}

/// The OCI name of a Rust target arch, as manifests write it.
pub fn oci_arch(rust_arch: &str) -> &str {
    match rust_arch {
        "x86_64" => "amd64",
        "aarch64" => "arm64",
        other => other,
    }
}

/// Whether `w` may run on `d`: it runs workloads, same tenant, selector and
/// architecture match.
pub fn fits(w: &Placed, d: &DeviceFacts) -> bool {
    let p = &w.placement;
    let labels_ok = p.selector.iter().all(|(k, v)| d.labels.get(k) == Some(v));
    let arch_ok = p.arch.is_empty() || p.arch.iter().any(|a| a == oci_arch(&d.arch));
    !d.no_workloads && w.tenant == d.tenant && labels_ok && arch_ok
}

/// Requests of one replica: (memory bytes, CPU millis).
fn request(spec: &WorkloadSpec) -> (u64, u64) {
    let r = &spec.container.resources;
    (r.memory_bytes.unwrap_or(0), u64::from(r.cpu_millis.unwrap_or(0)))
}

/// What is already placed on a device.
#[derive(Debug, Clone, Copy, Default)]
struct Load {
    memory: u64,
    cpu: u64,
    instances: u32,
}

impl Load {
    fn add(&mut self, (memory, cpu): (u64, u64)) {
        self.memory += memory;
        self.cpu += cpu;
        self.instances += 1;
    }

    fn room_for(&self, d: &DeviceFacts, (memory, cpu): (u64, u64)) -> bool {
        (d.memory_bytes == 0 || self.memory + memory <= d.memory_bytes)
            && (d.cpu_millis == 0 || self.cpu + cpu <= d.cpu_millis)
    }

    /// Lower is emptier: the larger of the memory and CPU fractions allocated
    /// (in millionths), then the instance count.
    fn score(&self, d: &DeviceFacts) -> (u64, u32) {
        let frac = |used: u64, cap: u64| used.saturating_mul(1_000_000).checked_div(cap).unwrap_or(0);
        (frac(self.memory, d.memory_bytes).max(frac(self.cpu, d.cpu_millis)), self.instances)
    }
}

/// Places every workload. `every` workloads first (they claim capacity on
/// each device regardless), then `replicas` workloads in name order.
pub fn schedule(devices: &[DeviceFacts], workloads: &[Placed], previous: &Assignment) -> Schedule {
    let mut out = Schedule::default();
    let mut load: Vec<Load> = vec![Load::default(); devices.len()];
    let index: BTreeMap<&str, usize> = devices.iter().enumerate().map(|(i, d)| (d.id.as_str(), i)).collect();

    let (daemons, replicated): (Vec<&Placed>, Vec<&Placed>) = workloads.iter().partition(|w| w.replicas.is_none());
    for w in daemons {
        let req = request(&w.spec);
        let mut set = BTreeSet::new();
        for (i, d) in devices.iter().enumerate() {
            if fits(w, d) {
                load[i].add(req);
                set.insert(d.id.clone());
            }
        }
        out.assignment.insert(w.spec.name.clone(), set);
    }

    let mut replicated = replicated;
    replicated.sort_by(|a, b| a.spec.name.cmp(&b.spec.name));
    for w in replicated {
        let want = w.replicas.unwrap_or(0) as usize;
        let req = request(&w.spec);
        let domain = |d: &DeviceFacts| -> String {
            w.placement.spread_by.as_ref().and_then(|k| d.labels.get(k).cloned()).unwrap_or_default()
        };
        // Keep the replicas whose device still qualifies.
        let mut kept: Vec<usize> = previous
            .get(&w.spec.name)
            .into_iter()
            .flatten()
            .filter_map(|id| index.get(id.as_str()).copied())
            .filter(|&i| fits(w, &devices[i]) && !devices[i].gone && load[i].room_for(&devices[i], req))
            .collect();
        // Scaled down: drop replicas from the most crowded domain, then the most loaded device.
        while kept.len() > want {
            let mut per_domain: BTreeMap<String, usize> = BTreeMap::new();
            for &i in &kept {
                *per_domain.entry(domain(&devices[i])).or_default() += 1;
            }
            let worst = (0..kept.len())
                .max_by_key(|&k| {
                    let i = kept[k];
                    (per_domain[&domain(&devices[i])], load[i].score(&devices[i]), &devices[i].id)
                })
                .unwrap_or(0);
            kept.swap_remove(worst);
        }
        for &i in &kept {
            load[i].add(req);
        }
        let mut chosen: BTreeSet<usize> = kept.iter().copied().collect();
        let missing = want - chosen.len();
        if missing > 0 {
            let mut candidates: Vec<usize> = (0..devices.len())
                .filter(|&i| {
                    let d = &devices[i];
                    d.reachable && !chosen.contains(&i) && fits(w, d) && load[i].room_for(d, req)
                })
                .collect();
            let key = |i: usize| (load[i].score(&devices[i]), i);
            let picked = if w.placement.spread_by.is_none() {
                if candidates.len() > missing {
                    candidates.select_nth_unstable_by_key(missing, |&i| key(i));
                    candidates.truncate(missing);
                }
                candidates
            } else {
                candidates.sort_by_key(|&i| key(i));
                spread(&candidates, missing, |i| domain(&devices[i]), chosen.iter().map(|&i| domain(&devices[i])))
            };
            for i in picked {
                load[i].add(req);
                chosen.insert(i);
            }
        }
        if chosen.len() < want {
            out.unplaced.insert(w.spec.name.clone(), (want - chosen.len()) as u32);
        }
        out.assignment.insert(w.spec.name.clone(), chosen.into_iter().map(|i| devices[i].id.clone()).collect());
    }
    out
}

/// Picks `n` of `candidates` (best first), always from the domain holding the
/// fewest replicas so far; `existing` are the domains of replicas already placed.
fn spread(
    candidates: &[usize],
    n: usize,
    domain: impl Fn(usize) -> String,
    existing: impl Iterator<Item = String>,
) -> Vec<usize> {
    let mut counts: BTreeMap<String, usize> = BTreeMap::new();
    for d in existing {
        *counts.entry(d).or_default() += 1;
    }
    let mut queues: BTreeMap<String, std::collections::VecDeque<usize>> = BTreeMap::new();
    for &i in candidates {
        queues.entry(domain(i)).or_default().push_back(i);
    }
    // Min-heap of (replicas in the domain, best candidate's rank, domain).
    let rank: BTreeMap<usize, usize> = candidates.iter().enumerate().map(|(r, &i)| (i, r)).collect();
    let mut heap: BinaryHeap<Reverse<(usize, usize, String)>> = queues
        .iter()
        .filter_map(|(d, q)| q.front().map(|i| Reverse((counts.get(d).copied().unwrap_or(0), rank[i], d.clone()))))
        .collect();
    let mut out = Vec::with_capacity(n);
    while out.len() < n {
        let Some(Reverse((count, _, d))) = heap.pop() else { break };
        let q = queues.get_mut(&d).expect("queued domain");
        let Some(i) = q.pop_front() else { continue };
        out.push(i);
        if let Some(next) = q.front() {
            heap.push(Reverse((count + 1, rank[next], d)));
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use baton_protocol::spec::{ContainerSpec, Resources};

    fn dev(id: &str, arch: &str, labels: &[(&str, &str)]) -> DeviceFacts {
        DeviceFacts {
            id: id.into(),
            arch: arch.into(),
            labels: labels.iter().map(|(k, v)| (k.to_string(), v.to_string())).collect(),
            reachable: true,
            ..Default::default()
        }
    }

    fn sized(id: &str, memory_mib: u64, site: &str) -> DeviceFacts {
        DeviceFacts { memory_bytes: memory_mib << 20, cpu_millis: 4000, ..dev(id, "aarch64", &[("site", site)]) }
    }

    fn wl(name: &str, selector: &[(&str, &str)], arch: &[&str]) -> Placed {
        Placed {
            tenant: String::new(),
            spec: WorkloadSpec { name: name.into(), ..Default::default() },
            placement: Placement {
                selector: selector.iter().map(|(k, v)| (k.to_string(), v.to_string())).collect(),
                arch: arch.iter().map(|a| a.to_string()).collect(),
                spread_by: None,
            },
            replicas: None,
        }
    }

    fn replicated(name: &str, n: u32, memory_mib: u64) -> Placed {
        let mut w = wl(name, &[], &[]);
        w.replicas = Some(n);
        w.spec.container = ContainerSpec {
            resources: Resources { memory_bytes: Some(memory_mib << 20), ..Default::default() },
            ..Default::default()
        };
        w
    }

    fn names(s: &Schedule, w: &str) -> Vec<String> {
        s.assignment[w].iter().cloned().collect()
    }

    #[test]
    fn workloads_go_only_to_devices_of_their_tenant() {
        let of = |tenant: &str, d: DeviceFacts| DeviceFacts { tenant: tenant.into(), ..d };
        let devices = [
            of("acme", sized("a1", 1024, "lyon")),
            of("acme", sized("a2", 1024, "paris")),
            of("globex", sized("g1", 8192, "lyon")),
        ];
        let daemon = Placed { tenant: "acme".into(), ..wl("web", &[], &[]) };
        let spread = Placed { tenant: "globex".into(), ..replicated("db", 2, 64) };
        let s = schedule(&devices, &[daemon, spread], &Assignment::new());
        assert_eq!(names(&s, "web"), ["a1", "a2"]);
        // Two replicas wanted, one device in the tenant: the second fits nowhere
        // rather than on another tenant's device.
        assert_eq!(names(&s, "db"), ["g1"]);
        assert_eq!(s.unplaced.get("db"), Some(&1));
        // A replica placed earlier on a device now in another tenant moves.
        let previous = Assignment::from([("db".to_string(), BTreeSet::from(["a1".to_string()]))]);
        let spread = Placed { tenant: "globex".into(), ..replicated("db", 1, 64) };
        assert_eq!(names(&schedule(&devices, &[spread], &previous), "db"), ["g1"]);
    }

    #[test]
    fn every_placement_by_labels_and_architecture() {
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
        let s = schedule(&devices, &workloads, &Assignment::new());
        let by = s.by_device();
        assert_eq!(by["pi4"], vec!["everywhere", "lyon-only", "sensors-64"]);
        assert_eq!(by["pi2"], vec!["arm32", "everywhere", "lyon-only"]);
        assert_eq!(by["nuc"], vec!["everywhere"]);
    }

    #[test]
    fn a_device_whose_agent_runs_no_workloads_gets_none() {
        let watcher = DeviceFacts { no_workloads: true, ..dev("watcher", "aarch64", &[]) };
        let w = wl("app", &[], &[]);
        assert!(!fits(&w, &watcher));
        assert!(fits(&w, &dev("pi", "aarch64", &[])));
    }

    #[test]
    fn a_device_with_unknown_arch_gets_only_arch_free_workloads() {
        let s =
            schedule(&[dev("new", "", &[])], &[wl("any", &[], &[]), wl("pinned", &[], &["arm64"])], &Assignment::new());
        assert_eq!(s.by_device()["new"], vec!["any"]);
    }

    #[test]
    fn every_workloads_stay_on_devices_that_are_away() {
        let mut away = dev("away", "aarch64", &[]);
        away.reachable = false;
        away.gone = true;
        let s = schedule(&[away], &[wl("agent-side", &[], &[])], &Assignment::new());
        assert_eq!(names(&s, "agent-side"), vec!["away"]);
    }

    /// (devices, workloads, previous, expected assignment of "w", expected unplaced)
    #[test]
    fn replica_table() {
        struct Case {
            what: &'static str,
            devices: Vec<DeviceFacts>,
            workloads: Vec<Placed>,
            previous: Vec<&'static str>,
            expect: Vec<&'static str>,
            unplaced: u32,
        }
        let small = |id: &'static str| sized(id, 256, "a");
        let mut offline = small("b");
        offline.reachable = false;
        let mut gone = small("b");
        gone.reachable = false;
        gone.gone = true;
        let mut spread_w = replicated("w", 3, 10);
        spread_w.placement.spread_by = Some("site".into());
        let cases = vec![
            Case {
                what: "least allocated devices first",
                devices: vec![sized("a", 1024, "x"), sized("b", 1024, "x"), sized("c", 1024, "x")],
                workloads: vec![replicated("big", 1, 600), replicated("w", 2, 100)],
                previous: vec![],
                // "big" (placed first by name) takes a; w goes to the two emptier devices.
                expect: vec!["b", "c"],
                unplaced: 0,
            },
            Case {
                what: "capacity limits placement; the rest is reported unplaced",
                devices: vec![small("a"), small("b")],
                workloads: vec![replicated("w", 3, 200)],
                previous: vec![],
                expect: vec!["a", "b"],
                unplaced: 1,
            },
            Case {
                what: "a brief disconnect keeps the replica where it is",
                devices: vec![small("a"), offline.clone(), small("c")],
                workloads: vec![replicated("w", 1, 10)],
                previous: vec!["b"],
                expect: vec!["b"],
                unplaced: 0,
            },
            Case {
                what: "gone past the grace period: the replica moves",
                devices: vec![small("a"), gone, small("c")],
                workloads: vec![replicated("w", 1, 10)],
                previous: vec!["b"],
                expect: vec!["a"],
                unplaced: 0,
            },
            Case {
                what: "new replicas only go to reachable devices",
                devices: vec![offline, small("c")],
                workloads: vec![replicated("w", 2, 10)],
                previous: vec![],
                expect: vec!["c"],
                unplaced: 1,
            },
            Case {
                what: "scaling down keeps the rest in place",
                devices: vec![small("a"), small("b"), small("c")],
                workloads: vec![replicated("w", 1, 10)],
                previous: vec!["b", "c"],
                expect: vec!["b"],
                unplaced: 0,
            },
            Case {
                what: "spread over a topology label before filling a site",
                devices: vec![
                    sized("l1", 1024, "lyon"),
                    sized("l2", 1024, "lyon"),
                    sized("l3", 1024, "lyon"),
                    sized("p1", 2048, "paris"),
                    sized("r1", 4096, "rome"),
                ],
                workloads: vec![spread_w.clone()],
                previous: vec!["l1"],
                expect: vec!["l1", "p1", "r1"],
                unplaced: 0,
            },
            Case {
                what: "scaling down a spread workload drops from the crowded site",
                devices: vec![sized("l1", 1024, "lyon"), sized("l2", 1024, "lyon"), sized("p1", 1024, "paris")],
                workloads: vec![Placed { replicas: Some(2), ..spread_w }],
                previous: vec!["l1", "l2", "p1"],
                expect: vec!["l1", "p1"],
                unplaced: 0,
            },
            Case {
                what: "a replica leaves a device that no longer matches",
                devices: vec![small("a"), dev("b", "x86_64", &[])],
                workloads: vec![{
                    let mut w = replicated("w", 1, 10);
                    w.placement.arch = vec!["arm64".into()];
                    w
                }],
                previous: vec!["b"],
                expect: vec!["a"],
                unplaced: 0,
            },
        ];
        for c in cases {
            let previous = Assignment::from([("w".to_string(), c.previous.iter().map(|s| s.to_string()).collect())]);
            let s = schedule(&c.devices, &c.workloads, &previous);
            assert_eq!(names(&s, "w"), c.expect, "{}", c.what);
            assert_eq!(s.unplaced.get("w").copied().unwrap_or(0), c.unplaced, "{}", c.what);
        }
    }

    #[test]
    fn rescheduling_the_same_inputs_moves_nothing() {
        let devices: Vec<DeviceFacts> = (0..50).map(|i| sized(&format!("d{i:02}"), 512, ["x", "y"][i % 2])).collect();
        let workloads: Vec<Placed> = (0..20).map(|i| replicated(&format!("w{i:02}"), 7, 16)).collect();
        let first = schedule(&devices, &workloads, &Assignment::new());
        let second = schedule(&devices, &workloads, &first.assignment);
        assert_eq!(first, second);
        // Load is balanced: 140 replicas on 50 devices, no device above 3.
        let by = first.by_device();
        assert!(by.values().all(|w| w.len() <= 3), "{by:?}");
    }
}
