//! **Pure**: what each device is given. The workloads as the controller
//! holds them (revisions, stable revision, rollout), the placement, the
//! devices' facts and which instances serve → each device's workload specs
//! and service endpoints (`compose`), and whether that is a new document and
//! with which generation (`issue`). No store, no clock, no signing: the
//! controller's `publish` seals, signs, stores and sends what this decides.

use std::collections::{BTreeMap, BTreeSet};

use baton_protocol::spec::{NetworkMode, PortProtocol, WorkloadSpec};
use baton_protocol::{Desired, Endpoint, ServiceEndpoints, ServicePort};

use crate::fleet::{Device, Fleet, Liveness, Millis, Status};
use crate::rollout::Rollout;
use crate::schedule::{DeviceFacts, Schedule};
use crate::workload::Manifest;

/// One workload as the controller holds it.
#[derive(Debug, Clone)]
pub struct Entry {
    pub tenant: String,
    pub manifest: Manifest,
    pub revisions: BTreeMap<u64, WorkloadSpec>,
    pub latest: u64,
    pub stable: u64,
    pub rollout: Option<Rollout>,
}

impl Entry {
    pub fn active_rollout(&self) -> Option<&Rollout> {
        self.rollout.as_ref().filter(|r| r.state.active())
    }

    /// Revisions the history must keep.
    pub fn pinned(&self) -> Vec<u64> {
        let mut keep = vec![self.stable, self.latest];
        keep.extend(self.rollout.iter().flat_map(|r| [r.from, r.to]));
        keep
    }

    /// The spec of the newest revision.
    pub fn latest_spec(&self) -> &WorkloadSpec {
        // `latest` is always in `revisions`: the history never drops it (`pinned`).
        &self.revisions[&self.latest]
    }
}

/// What placement sees of a device.
pub fn facts_of(d: &Device, now: Millis, liveness: &Liveness, grace_ms: Millis) -> DeviceFacts {
    let status = d.status(now, liveness);
    let inv = d.inventory.as_ref();
    DeviceFacts {
        id: d.id.clone(),
        tenant: d.tenant.clone(),
        labels: d.labels(),
        arch: inv.map(|i| i.arch.clone()).unwrap_or_default(),
        memory_bytes: inv.map_or(0, |i| i.memory_bytes),
        cpu_millis: inv.map_or(0, |i| u64::from(i.cpus) * 1000),
        reachable: status == Status::Online,
        gone: is_gone(d, now, grace_ms),
        no_workloads: inv.is_some_and(|i| i.no_workloads),
    }
}

/// Offline for longer than the grace period (counted from going offline,
/// not from its last message): its replicas move elsewhere.
pub fn is_gone(d: &Device, now: Millis, grace_ms: Millis) -> bool {
    d.offline_for(now) > grace_ms
}

/// Healthy running instances of each workload: (device, address, revision).
pub type Serving = BTreeMap<String, Vec<(String, String, u64)>>;

/// Every healthy running instance the fleet reports, on devices not offline.
pub fn serving(fleet: &Fleet, now: Millis, liveness: &Liveness) -> Serving {
    let mut serving = Serving::new();
    for d in fleet.devices() {
        if d.status(now, liveness) == Status::Offline {
            continue;
        }
        let address = d.inventory.as_ref().and_then(|i| i.addresses.first().cloned()).unwrap_or_default();
        for w in d.report.iter().flat_map(|r| &r.workloads) {
            if w.phase == baton_protocol::Phase::Running && w.health == baton_protocol::Health::Healthy {
                serving.entry(w.name.clone()).or_default().push((d.id.clone(), address.clone(), w.revision));
            }
        }
    }
    serving
}

/// The instances of the services some workload uses (only those matter).
pub fn used_serving(workloads: &BTreeMap<String, Entry>, serving: &Serving) -> Serving {
    let used: BTreeSet<&String> = workloads.values().flat_map(|e| &e.manifest.uses).collect();
    serving.iter().filter(|(name, _)| used.contains(name)).map(|(k, v)| (k.clone(), v.clone())).collect()
}

/// Each used service's endpoints: its healthy instances on devices it is
/// placed on, one per named port of the revision they run.
pub fn endpoints(
    workloads: &BTreeMap<String, Entry>,
    schedule: &Schedule,
    serving: &Serving,
) -> BTreeMap<String, Vec<Endpoint>> {
    let mut out = BTreeMap::new();
    for (name, instances) in serving {
        let Some(e) = workloads.get(name) else { continue };
        let placed = schedule.assignment.get(name);
        let mut endpoints = Vec::new();
        for (device, address, revision) in instances {
            if !placed.is_some_and(|p| p.contains(device)) {
                continue;
            }
            let spec = e.revisions.get(revision).or_else(|| e.revisions.get(&e.latest));
            if let Some(s) = spec {
                for p in &s.container.ports {
                    // A bridged instance is reached at the device port
                    // published to it; a port it does not publish is
                    // reachable on its own device only (port 0: bridged
                    // consumers there reach it by the service's name).
                    let port = match s.container.network {
                        NetworkMode::Bridge => s
                            .container
                            .publish
                            .iter()
                            .find(|q| q.port == p.port && q.protocol == p.protocol)
                            .map_or(0, |q| q.host_port),
                        _ => p.port,
                    };
                    endpoints.push(Endpoint {
                        device: device.clone(),
                        address: address.clone(),
                        port_name: p.name.clone(),
                        port,
                    });
                }
            }
        }
        out.insert(name.clone(), endpoints);
    }
    out
}

/// Device ports a workload's newest revision holds: those it publishes
/// from the bridge, and (to meet those) a host-network one's declared ports.
fn device_ports(spec: &WorkloadSpec) -> Vec<(u16, PortProtocol, bool)> {
    let c = &spec.container;
    match c.network {
        NetworkMode::Bridge => c.publish.iter().map(|p| (p.host_port, p.protocol, true)).collect(),
        NetworkMode::Host => c.ports.iter().map(|p| (p.port, p.protocol, false)).collect(),
        NetworkMode::None => Vec::new(),
    }
}

/// A device port that two workloads placed on one device both want, one of
/// them in `names` (those just applied), at least one publishing it from
/// the bridge: said as the refusal of the apply.
pub fn port_clash(workloads: &BTreeMap<String, Entry>, schedule: &Schedule, names: &[String]) -> Option<String> {
    for (device, placed) in schedule.by_device() {
        let mut held: BTreeMap<(u16, PortProtocol), (&str, bool)> = BTreeMap::new();
        for w in placed {
            let Some(e) = workloads.get(w) else { continue };
            for (port, proto, published) in device_ports(e.latest_spec()) {
                match held.get(&(port, proto)) {
                    Some((other, other_published))
                        if (published || *other_published)
                            && (names.iter().any(|n| n == w) || names.iter().any(|n| n == other)) =>
                    {
                        let p = if proto == PortProtocol::Udp { "udp" } else { "tcp" };
                        return Some(format!(
                            "device port {port}/{p} is wanted by both {other} and {w}, which are placed together on {device}: publish another port, or place them apart"
                        ));
                    }
                    Some(_) => {}
                    None => {
                        held.insert((port, proto), (w, published));
                    }
                }
            }
        }
    }
    None
}

/// What one device is to run, before secrets are sealed to it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Composed {
    pub device: String,
    /// Sorted by name.
    pub workloads: Vec<WorkloadSpec>,
    /// The services its workloads use, with their endpoints (another
    /// tenant's workload of that name is no service of this one: no endpoints).
    pub services: Vec<ServiceEndpoints>,
    /// The ports those services declare (their newest revision's), for
    /// bridged consumers' service addresses.
    pub service_ports: Vec<ServicePort>,
    /// Its autoscaled workloads, whose load its heartbeats carry.
    pub load_reports: Vec<String>,
}

/// Every device's workloads and services under `schedule`: each workload at
/// its stable revision, or during a rollout the new one once the device's
/// wave is released (the latest if that one is gone from the history), each
/// used service with `endpoints`.
pub fn compose(
    workloads: &BTreeMap<String, Entry>,
    schedule: &Schedule,
    devices: &[DeviceFacts],
    endpoints: &BTreeMap<String, Vec<Endpoint>>,
) -> Vec<Composed> {
    let by_device = schedule.by_device();
    // Which devices each active rollout has released, computed once.
    let released: BTreeMap<&str, BTreeSet<&str>> =
        workloads.iter().filter_map(|(n, e)| e.active_rollout().map(|r| (n.as_str(), r.released_set()))).collect();
    let mut out = Vec::with_capacity(devices.len());
    for d in devices {
        let mut specs = Vec::new();
        for name in by_device.get(d.id.as_str()).into_iter().flatten() {
            let Some(e) = workloads.get(*name) else { continue };
            let revision = match e.active_rollout() {
                Some(r) => r.revision_for(released.get(name).is_some_and(|s| s.contains(d.id.as_str()))),
                None => e.stable,
            };
            if let Some(spec) = e.revisions.get(&revision).or_else(|| e.revisions.get(&e.latest)) {
                specs.push(spec.clone());
            }
        }
        specs.sort_by(|a, b| a.name.cmp(&b.name));
        let mut services: BTreeMap<&str, ServiceEndpoints> = BTreeMap::new();
        // Services of the consumer's own tenant (another tenant's name is no service).
        let mut owned: BTreeSet<&str> = BTreeSet::new();
        for spec in &specs {
            let Some(consumer) = workloads.get(&spec.name) else { continue };
            for service in &consumer.manifest.uses {
                let own = workloads.get(service).is_some_and(|e| e.tenant == consumer.tenant);
                if own {
                    owned.insert(service.as_str());
                }
                let entry = services.entry(service.as_str()).or_insert_with(|| ServiceEndpoints {
                    name: service.clone(),
                    consumers: Vec::new(),
                    endpoints: endpoints.get(service).filter(|_| own).cloned().unwrap_or_default(),
                });
                entry.consumers.push(spec.name.clone());
            }
        }
        // Every used service's ports, with instances answering or not: its
        // address on the device stays put while none does (connections to
        // it are refused then).
        let service_ports = services
            .values()
            .filter(|s| owned.contains(s.name.as_str()))
            .filter_map(|s| workloads.get(&s.name))
            .flat_map(|e| {
                let spec = e.latest_spec();
                spec.container.ports.iter().map(|p| ServicePort {
                    service: spec.name.clone(),
                    name: p.name.clone(),
                    port: p.port,
                    protocol: p.protocol,
                })
            })
            .collect();
        let load_reports = specs
            .iter()
            .filter(|s| workloads.get(&s.name).is_some_and(|e| e.manifest.autoscale.is_some()))
            .map(|s| s.name.clone())
            .collect();
        out.push(Composed {
            device: d.id.clone(),
            workloads: specs,
            services: services.into_values().collect(),
            service_ports,
            load_reports,
        });
    }
    out
}

/// Whether a device gets a new document, and numbered how.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Issue {
    /// What it has is what it gets (or it never had a document and gets no workloads).
    Unchanged,
    /// A new document with this generation. `ahead`: the device has a newer
    /// generation in force (`applied`) than the last this controller issued
    /// it (`stored`): the store was restored from a backup or rebuilt.
    New { generation: u64, ahead: Option<(u64, u64)> },
}

/// Decides `Issue` for one device from the document last issued to it, what
/// it is to get now, and the generation it says it has in force. A device
/// ahead of the controller gets its document again past its generation:
/// devices refuse anything numbered at or below what they have.
pub fn issue(last: Option<&Desired>, next: &Desired, applied: u64) -> Issue {
    let stored = last.map_or(0, |d| d.generation);
    let ahead = applied > stored;
    let unchanged = match last {
        // Everything but the generation and when it was issued (field by
        // field: no copy of the document on every publish).
        Some(d) => {
            let Desired {
                generation: _,
                workloads,
                services,
                issued_ms: _,
                agent,
                service_ports,
                load_reports,
                updates,
            } = next;
            d.workloads == *workloads
                && d.services == *services
                && d.agent == *agent
                && d.service_ports == *service_ports
                && d.load_reports == *load_reports
                && d.updates == *updates
                && !ahead
        }
        // A rebuilt store does not empty a device it knows nothing of.
        None => next.workloads.is_empty() && next.agent.is_none(),
    };
    if unchanged {
        return Issue::Unchanged;
    }
    Issue::New { generation: stored.max(applied).saturating_add(1), ahead: ahead.then_some((applied, stored)) }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::rollout::Rollout;
    use baton_protocol::release::AgentTarget;
    use baton_protocol::spec::{ContainerSpec, Port, PortProtocol};

    fn spec(name: &str, revision: u64, ports: &[(&str, u16)]) -> WorkloadSpec {
        let ports = ports.iter().map(|(n, p)| Port { name: n.to_string(), port: *p, protocol: PortProtocol::Tcp });
        WorkloadSpec {
            name: name.into(),
            revision,
            image: format!("{name}:{revision}"),
            container: ContainerSpec { ports: ports.collect(), ..Default::default() },
            ..Default::default()
        }
    }

    fn entry(tenant: &str, name: &str, revs: &[u64], stable: u64, uses: &[&str]) -> Entry {
        let manifest =
            Manifest { name: name.into(), uses: uses.iter().map(|s| s.to_string()).collect(), ..Manifest::default() };
        Entry {
            tenant: tenant.into(),
            manifest,
            revisions: revs.iter().map(|r| (*r, spec(name, *r, &[("http", 8000 + *r as u16)]))).collect(),
            latest: *revs.iter().max().unwrap_or(&1),
            stable,
            rollout: None,
        }
    }

    fn facts(id: &str) -> DeviceFacts {
        DeviceFacts { id: id.into(), reachable: true, ..Default::default() }
    }

    fn placed(pairs: &[(&str, &[&str])]) -> Schedule {
        let mut s = Schedule::default();
        for (w, devices) in pairs {
            s.assignment.insert(w.to_string(), devices.iter().map(|d| d.to_string()).collect());
        }
        s
    }

    fn revisions(c: &[Composed]) -> Vec<(String, Vec<(String, u64)>)> {
        c.iter()
            .map(|d| (d.device.clone(), d.workloads.iter().map(|w| (w.name.clone(), w.revision)).collect()))
            .collect()
    }

    #[test]
    fn each_device_gets_the_revision_its_wave_says() {
        let devices = [facts("a"), facts("b"), facts("c")];
        let schedule = placed(&[("web", &["a", "b", "c"]), ("db", &["b"])]);
        let mut rolling = entry("t", "web", &[1, 2], 1, &[]);
        // One device per wave: `a` (first by id, all reachable) is released.
        let strategy = crate::rollout::Strategy { waves: vec![crate::rollout::Wave::Devices(1)], ..Default::default() };
        rolling.rollout = Some(Rollout::new("web", 1, 2, vec!["a".into(), "b".into(), "c".into()], strategy, 0));
        let mut done = entry("t", "web", &[1, 2], 2, &[]);
        done.rollout = rolling.rollout.clone().map(|mut r| {
            let _ = r.abort(0);
            r
        });
        let gone_revision = Entry { stable: 7, ..entry("t", "db", &[3, 4], 7, &[]) };
        type Want = Vec<(&'static str, Vec<(&'static str, u64)>)>;
        let table: Vec<(&str, Vec<Entry>, Want)> = vec![
            (
                "no rollout: stable everywhere",
                vec![entry("t", "web", &[1, 2], 1, &[])],
                vec![("a", vec![("web", 1)]), ("b", vec![("web", 1)]), ("c", vec![("web", 1)])],
            ),
            (
                "rollout: only the released device has the new revision",
                vec![rolling],
                vec![("a", vec![("web", 2)]), ("b", vec![("web", 1)]), ("c", vec![("web", 1)])],
            ),
            (
                "an inactive rollout: the stable revision",
                vec![done],
                vec![("a", vec![("web", 2)]), ("b", vec![("web", 2)]), ("c", vec![("web", 2)])],
            ),
            (
                "a revision gone from the history: the latest, sorted by name",
                vec![entry("t", "web", &[1], 1, &[]), gone_revision],
                vec![("a", vec![("web", 1)]), ("b", vec![("db", 4), ("web", 1)]), ("c", vec![("web", 1)])],
            ),
        ];
        for (what, entries, want) in table {
            let workloads: BTreeMap<String, Entry> =
                entries.into_iter().map(|e| (e.manifest.name.clone(), e)).collect();
            let got = revisions(&compose(&workloads, &schedule, &devices, &BTreeMap::new()));
            let want: Vec<(String, Vec<(String, u64)>)> = want
                .into_iter()
                .map(|(d, ws)| (d.to_string(), ws.into_iter().map(|(w, r)| (w.to_string(), r)).collect()))
                .collect();
            assert_eq!(got, want, "{what}");
        }
    }

    #[test]
    fn unplaced_and_unknown_devices_get_nothing() {
        let workloads: BTreeMap<String, Entry> = [("web".to_string(), entry("t", "web", &[1], 1, &[]))].into();
        let schedule = placed(&[("web", &["a"]), ("ghost", &["b"])]);
        let got = compose(&workloads, &schedule, &[facts("a"), facts("b")], &BTreeMap::new());
        assert_eq!(revisions(&got), vec![("a".into(), vec![("web".into(), 1)]), ("b".into(), vec![])]);
    }

    #[test]
    fn endpoints_are_placed_healthy_instances_with_the_ports_of_their_revision() {
        let workloads: BTreeMap<String, Entry> = [
            ("api".to_string(), entry("t", "api", &[1, 2], 1, &[])),
            ("web".to_string(), entry("t", "web", &[1], 1, &["api"])),
        ]
        .into();
        let schedule = placed(&[("api", &["a", "b"]), ("web", &["c"])]);
        let serving: Serving = [
            (
                "api".to_string(),
                vec![
                    ("a".to_string(), "10.0.0.1".to_string(), 1),
                    ("b".to_string(), "10.0.0.2".to_string(), 2),
                    // Placed elsewhere now (moved away): not an endpoint.
                    ("z".to_string(), "10.0.0.9".to_string(), 1),
                ],
            ),
            ("unused".to_string(), vec![("a".to_string(), "10.0.0.1".to_string(), 1)]),
        ]
        .into();
        let used = used_serving(&workloads, &serving);
        assert_eq!(used.keys().collect::<Vec<_>>(), ["api"], "only services someone uses");
        let eps = endpoints(&workloads, &schedule, &used);
        let got: Vec<(&str, u16)> = eps["api"].iter().map(|e| (e.address.as_str(), e.port)).collect();
        assert_eq!(got, [("10.0.0.1", 8001), ("10.0.0.2", 8002)], "each instance with its own revision's port");
        let docs = compose(&workloads, &schedule, &[facts("a"), facts("c")], &eps);
        assert!(docs[0].services.is_empty(), "a device running no consumer gets no services");
        assert_eq!(docs[1].services.len(), 1);
        assert_eq!(docs[1].services[0].consumers, ["web"]);
        assert_eq!(docs[1].services[0].endpoints, eps["api"]);
    }

    #[test]
    fn another_tenants_workload_is_no_service() {
        let workloads: BTreeMap<String, Entry> = [
            ("api".to_string(), entry("other", "api", &[1], 1, &[])),
            ("web".to_string(), entry("t", "web", &[1], 1, &["api"])),
        ]
        .into();
        let schedule = placed(&[("api", &["a"]), ("web", &["c"])]);
        let serving: Serving = [("api".to_string(), vec![("a".to_string(), "10.0.0.1".to_string(), 1)])].into();
        let eps = endpoints(&workloads, &schedule, &serving);
        let docs = compose(&workloads, &schedule, &[facts("c")], &eps);
        assert_eq!(docs[0].services[0].name, "api");
        assert!(docs[0].services[0].endpoints.is_empty(), "the name resolves to nothing across tenants");
    }

    #[test]
    fn issue_table() {
        let web = vec![spec("web", 1, &[])];
        let doc =
            |generation: u64, workloads: Vec<WorkloadSpec>| Desired { generation, workloads, ..Default::default() };
        type Row = (&'static str, Option<Desired>, Vec<WorkloadSpec>, u64, Issue);
        let table: Vec<Row> = vec![
            ("never had one, nothing to run", None, vec![], 0, Issue::Unchanged),
            ("never had one, workloads", None, web.clone(), 0, Issue::New { generation: 1, ahead: None }),
            ("same workloads", Some(doc(4, web.clone())), web.clone(), 4, Issue::Unchanged),
            ("same workloads, device behind", Some(doc(4, web.clone())), web.clone(), 2, Issue::Unchanged),
            ("workloads changed", Some(doc(4, web.clone())), vec![], 4, Issue::New { generation: 5, ahead: None }),
            (
                "device ahead (restored store): past its generation",
                Some(doc(4, web.clone())),
                web.clone(),
                9,
                Issue::New { generation: 10, ahead: Some((9, 4)) },
            ),
            (
                "unknown to a rebuilt store, device has 3 in force",
                None,
                web.clone(),
                3,
                Issue::New { generation: 4, ahead: Some((3, 0)) },
            ),
        ];
        for (what, last, composed, applied, want) in table {
            let next = Desired { workloads: composed, ..Default::default() };
            assert_eq!(issue(last.as_ref(), &next, applied), want, "{what}");
        }
        let next = |d: Desired| Desired { workloads: web.clone(), ..d };
        let services = vec![ServiceEndpoints { name: "api".into(), ..Default::default() }];
        assert_eq!(
            issue(Some(&doc(4, web.clone())), &next(Desired { services, ..Default::default() }), 4),
            Issue::New { generation: 5, ahead: None },
            "a change of services alone is a new document"
        );
        let service_ports =
            vec![ServicePort { service: "api".into(), name: "http".into(), port: 80, ..Default::default() }];
        assert_eq!(
            issue(Some(&doc(4, web.clone())), &next(Desired { service_ports, ..Default::default() }), 4),
            Issue::New { generation: 5, ahead: None },
            "a change of service ports alone is a new document"
        );
        let agent = AgentTarget { version: "2.0.0".into(), digest: vec![1; 32], size: 9, rollout: 1, downgrade: false };
        assert_eq!(
            issue(Some(&doc(4, web.clone())), &next(Desired { agent: Some(agent.clone()), ..Default::default() }), 4),
            Issue::New { generation: 5, ahead: None },
            "an agent to run is a new document"
        );
        assert_eq!(
            issue(
                Some(&doc(4, web.clone())),
                &next(Desired { load_reports: vec!["web".into()], ..Default::default() }),
                4
            ),
            Issue::New { generation: 5, ahead: None },
            "a load to report is a new document"
        );
        assert_eq!(
            issue(Some(&doc(4, web.clone())), &next(Desired { issued_ms: 99, ..Default::default() }), 4),
            Issue::Unchanged,
            "the time alone is no change"
        );
        assert_eq!(
            issue(None, &Desired { agent: Some(agent), ..Default::default() }, 0),
            Issue::New { generation: 1, ahead: None },
            "a device without workloads still gets its agent"
        );
    }
}
