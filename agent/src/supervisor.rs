//! Keeps each workload's container running under its restart policy.
//!
//! One workload = a series of container instances `<name>-<n>`: a restart
//! starts instance n+1 and keeps instance n (its log and exit record) until
//! n+2 starts. Driven by `tick(now)`; talks to containers only through
//! [`ContainerRuntime`], so its logic is tested with a fake runtime and its
//! real behaviour with real containers. After an agent restart, `ensure`
//! re-adopts what the shims kept: a running container is left alone — and
//! reported as what it runs (its recorded `Provenance`), so a container of
//! an older spec is replaced rather than relabelled as the new revision.

use std::collections::BTreeMap;
use std::path::PathBuf;
use std::sync::mpsc::{channel, Receiver, Sender};
use std::sync::Arc;
use std::time::Duration;

use baton_protocol::spec::ContainerSpec;
use baton_protocol::{Health, Phase, WorkloadStatus};
use tracing::{info, warn};

use crate::probe::{Prober, Tracker};
use crate::restart::{decide, Backoff, Decision};
use crate::runtime::rootfs::Rootfs;
use crate::runtime::{ContainerRuntime, ContainerState, CreateRequest, ExitStatus, Provenance, RuntimeError};
use probes::ProbeResult;

/// An error stays in the report until the instance has been healthy this long.
const ERROR_CLEARS_AFTER_MS: u64 = 10_000;

/// Which spec a workload's container runs: the revision number the
/// controller gave it and the spec's `reconcile::fingerprint` (empty:
/// unknown, only the number counts).
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct Version {
    pub revision: u64,
    pub fingerprint: String,
}

impl From<u64> for Version {
    fn from(revision: u64) -> Self {
        Self { revision, fingerprint: String::new() }
    }
}

impl Version {
    /// Whether a container of `other` runs this spec.
    fn same_spec(&self, other: &Version) -> bool {
        if self.fingerprint.is_empty() || other.fingerprint.is_empty() {
            self.revision == other.revision
        } else {
            self.fingerprint == other.fingerprint
        }
    }
}

pub fn container_id(name: &str, instance: u32) -> String {
    format!("{name}-{instance}")
}

/// The workload and instance number of a container id (`container_id`'s inverse).
pub fn parse_container_id(id: &str) -> Option<(&str, u32)> {
    let (name, instance) = id.rsplit_once('-')?;
    Some((name, instance.parse().ok()?))
}

/// The instance number of `id` if it belongs to workload `name`.
fn instance_of(name: &str, id: &str) -> Option<u32> {
    parse_container_id(id).filter(|(n, _)| *n == name).map(|(_, i)| i)
}

#[derive(Debug, Clone, PartialEq, Eq)]
enum UnitState {
    Running,
    /// Waiting to start the next instance at this time.
    BackingOff {
        until_ms: u64,
    },
    /// The policy is satisfied; nothing more to do.
    Done,
    /// Stopping for removal.
    Stopping,
}

#[derive(Debug)]
struct Unit {
    spec: ContainerSpec,
    rootfs: Rootfs,
    version: Version,
    /// Restarts of the current revision (policy, liveness, operator); a
    /// replacement by a new revision is not one.
    restarts: u32,
    /// When the current instance started (its probes' clock too).
    running_since_ms: u64,
    /// The newest instance created (meaningful once one was).
    instance: u32,
    /// The instance the next start creates; advances only when a create succeeds.
    next_instance: u32,
    failures: u32,
    /// An operator asked for a restart: the next exit restarts whatever the policy.
    restart_requested: bool,
    state: UnitState,
    last_exit: Option<ExitStatus>,
    /// The most recent error (a failed start, a failed liveness probe); kept
    /// after recovery so a report says why the last restart happened.
    last_error: Option<String>,
    /// The last start attempt failed (phase `Failed` while backing off).
    start_failed: bool,
    /// The current instance is created but its process has not started
    /// (`ContainerState::Created`): phase `Starting`, health unknown.
    starting: bool,
    /// Probes of the current instance; reset when a new instance starts.
    liveness: Option<Tracker>,
    readiness: Option<Tracker>,
    /// Start-first replacement: the previous revision's container, running
    /// until the current instance is healthy.
    retiring: Option<Retiring>,
    /// Instances to delete once they have stopped (a new revision dropped in a rollback).
    discard: Vec<u32>,
}

#[derive(Debug)]
struct Retiring {
    instance: u32,
    version: Version,
    restarts: u32,
    /// Kept from image GC while the container runs.
    rootfs: Rootfs,
}

impl Unit {
    fn arm_probes(&mut self, started_ms: u64) {
        self.running_since_ms = started_ms;
        self.liveness = self.spec.liveness.clone().map(|p| Tracker::new(p, started_ms));
        self.readiness = self.spec.readiness.clone().map(|p| Tracker::new(p, started_ms));
    }
}

/// One container start, worked out: what `make` hands the runtime.
struct Start {
    id: String,
    n: u32,
    /// The spec with its sealed files opened, or why it cannot start.
    spec: Result<ContainerSpec, String>,
    rootfs: Rootfs,
    provenance: Provenance,
}

impl Start {
    fn make(&self, rt: &impl ContainerRuntime) -> Result<(), RuntimeError> {
        let spec =
            self.spec.as_ref().map_err(|reason| RuntimeError::Start { id: self.id.clone(), reason: reason.clone() })?;
        rt.create(&CreateRequest {
            id: &self.id,
            spec,
            rootfs: self.rootfs.clone(),
            provenance: self.provenance.clone(),
        })
    }
}

pub struct Supervisor<R: ContainerRuntime> {
    rt: R,
    /// Open batch: the workloads whose start fell due (see `begin_batch`).
    batch: Option<Vec<String>>,
    units: BTreeMap<String, Unit>,
    /// Backoff base; the cap comes from each spec. Tests shorten it.
    pub backoff_base: Duration,
    prober: Option<Arc<dyn Prober>>,
    results_tx: Sender<ProbeResult>,
    results_rx: Receiver<ProbeResult>,
    /// The device id and key that open sealed files at container creation,
    /// or why this device cannot hold secrets.
    identity: Result<(String, Arc<baton_protocol::crypto::DeviceKey>), String>,
}

impl<R: ContainerRuntime> Supervisor<R> {
    pub fn new(rt: R) -> Self {
        let (results_tx, results_rx) = channel();
        Self {
            rt,
            batch: None,
            units: BTreeMap::new(),
            backoff_base: crate::restart::DEFAULT_BASE,
            prober: None,
            results_tx,
            results_rx,
            identity: Err("this agent has no device key".into()),
        }
    }

    /// Lets the supervisor open sealed (secret) files when it creates containers.
    pub fn with_identity(mut self, identity: Result<(String, Arc<baton_protocol::crypto::DeviceKey>), String>) -> Self {
        self.identity = identity;
        self
    }

    /// The spec to create a container from: sealed files opened, in memory only.
    fn opened(&self, name: &str, spec: &ContainerSpec) -> Result<Option<ContainerSpec>, String> {
        if !spec.files.iter().any(baton_protocol::spec::File::is_sealed) {
            return Ok(None);
        }
        let (device, key) = self.identity.as_ref().map_err(|why| format!("cannot hold secrets: {why}"))?;
        let files = crate::trust::open_files(Some(key), device, name, &spec.files).map_err(|e| e.to_string())?;
        Ok(Some(ContainerSpec { files, ..spec.clone() }))
    }

    /// Enables health probes; without a prober, probes in specs are not run.
    pub fn with_prober(mut self, prober: Arc<dyn Prober>) -> Self {
        self.prober = Some(prober);
        self
    }

    pub fn runtime(&self) -> &R {
        &self.rt
    }

    fn backoff(&self, spec: &ContainerSpec) -> Backoff {
        let b = Backoff::from_spec_cap(spec.backoff_cap_s);
        Backoff { base: self.backoff_base.min(b.cap), cap: b.cap }
    }

    /// Supervises `name`: adopts its newest container if one exists, else
    /// starts one. A running container is reported as the version it was
    /// created for; reconcile replaces it if that is not the one desired.
    pub fn ensure(
        &mut self,
        name: &str,
        version: impl Into<Version>,
        spec: ContainerSpec,
        rootfs: Rootfs,
        now_ms: u64,
    ) {
        let version = version.into();
        if self.units.contains_key(name) {
            return;
        }
        let mut instances: Vec<u32> =
            self.rt.list().unwrap_or_default().iter().filter_map(|id| instance_of(name, id)).collect();
        instances.sort_unstable();
        // Adopt the newest running instance (else the newest): one more still
        // running was being replaced when the previous agent stopped.
        let running: Vec<u32> = instances
            .iter()
            .copied()
            .filter(|n| matches!(self.rt.state(&container_id(name, *n)), Ok(ContainerState::Running(_))))
            .collect();
        let newest = running.last().or(instances.last()).copied();
        for other in running.iter().filter(|n| Some(**n) != newest) {
            let id = container_id(name, *other);
            info!(workload = name, container = %id, "stopping a replaced instance left running");
            let _ = self.rt.stop(&id);
        }
        let mut unit = Unit {
            spec,
            rootfs,
            version,
            restarts: 0,
            running_since_ms: now_ms,
            instance: newest.unwrap_or(0),
            next_instance: instances.last().map_or(0, |n| n + 1),
            failures: 0,
            restart_requested: false,
            state: UnitState::BackingOff { until_ms: now_ms },
            last_exit: None,
            last_error: None,
            start_failed: false,
            starting: false,
            liveness: None,
            readiness: None,
            retiring: None,
            discard: Vec::new(),
        };
        if let Some(n) = newest {
            let id = container_id(name, n);
            let recorded = self.rt.provenance(&id);
            // Containers from agents that kept no record: their instance number.
            unit.restarts = recorded.as_ref().map_or(n, |p| p.restarts);
            unit.failures = recorded.as_ref().map_or(0, |p| p.failures);
            match self.rt.state(&id) {
                Ok(ContainerState::Running(r)) => {
                    if let Some(p) = recorded.filter(|p| !p.fingerprint.is_empty()) {
                        let runs = Version { revision: p.revision, fingerprint: p.fingerprint };
                        if !runs.same_spec(&unit.version) {
                            warn!(workload = name, container = %id, runs = runs.revision, desired = unit.version.revision,
                                "re-adopted a container of another spec; it will be replaced");
                            unit.restarts = 0;
                        }
                        unit.version = runs;
                    }
                    info!(workload = name, container = %id, revision = unit.version.revision, "re-adopted running container");
                    unit.state = UnitState::Running;
                    unit.arm_probes(r.started_at_ms);
                }
                Ok(ContainerState::Exited(exit)) => {
                    info!(workload = name, container = %id, code = exit.code, "found exited container");
                    unit.state = self.after_exit(name, &mut unit, exit, now_ms);
                }
                // Lost (a reboot, or its shim died) or vanished: whatever of
                // it still runs is ended, and the next instance starts now.
                _ => {
                    let _ = self.rt.kill(&id);
                }
            }
        }
        self.units.insert(name.to_string(), unit);
        self.tick_unit(name, now_ms);
    }

    /// Stops and forgets a workload; its containers are removed once stopped.
    pub fn remove(&mut self, name: &str) {
        if let Some(unit) = self.units.get_mut(name) {
            let _ = self.rt.stop(&container_id(name, unit.instance));
            if let Some(r) = unit.retiring.take() {
                let _ = self.rt.stop(&container_id(name, r.instance));
            }
            unit.state = UnitState::Stopping;
        }
    }

    /// Start-first replacement: starts `revision` as the next instance now and
    /// stops the running one only once the new one is healthy. With nothing
    /// running, it simply becomes the spec of the next start. A replacement
    /// of a replacement stops the older retiring container first.
    pub fn replace(
        &mut self,
        name: &str,
        version: impl Into<Version>,
        spec: ContainerSpec,
        rootfs: Rootfs,
        now_ms: u64,
    ) {
        let version = version.into();
        let Some(unit) = self.units.get_mut(name) else {
            return self.ensure(name, version, spec, rootfs, now_ms);
        };
        if let Some(r) = unit.retiring.take() {
            let old_id = container_id(name, r.instance);
            if r.version.same_spec(&version) && matches!(self.rt.state(&old_id), Ok(ContainerState::Running(_))) {
                // Back to the revision still serving (a rollback): keep it, drop the new one.
                info!(workload = name, container = %old_id, "keeping the previous revision; stopping the new one");
                // Judged failed: no grace period, and gone at the next tick.
                let _ = self.rt.kill(&container_id(name, unit.instance));
                unit.discard.push(unit.instance);
                unit.instance = r.instance;
                unit.version = version;
                unit.restarts = r.restarts;
                unit.spec = spec;
                unit.rootfs = r.rootfs;
                unit.failures = 0;
                unit.state = UnitState::Running;
                unit.arm_probes(now_ms);
                return;
            }
            let _ = self.rt.stop(&old_id);
        }
        if unit.state == UnitState::Running {
            unit.retiring = Some(Retiring {
                instance: unit.instance,
                version: unit.version.clone(),
                restarts: unit.restarts,
                rootfs: unit.rootfs.clone(),
            });
        } else if unit.state == UnitState::Stopping {
            return;
        }
        info!(workload = name, from = unit.version.revision, to = version.revision, "replacing start-first");
        unit.spec = spec;
        unit.rootfs = rootfs;
        unit.version = version;
        unit.restarts = 0;
        unit.failures = 0;
        unit.last_error = None;
        unit.state = UnitState::BackingOff { until_ms: now_ms };
        self.tick_unit(name, now_ms);
    }

    /// The running spec is the one desired, under another revision number
    /// (a restored controller renumbered it): only the label changes.
    pub fn relabel(&mut self, name: &str, version: Version) {
        if let Some(unit) = self.units.get_mut(name) {
            info!(
                workload = name,
                from = unit.version.revision,
                to = version.revision,
                "same spec, new revision number"
            );
            unit.version = version;
        }
    }

    /// The spec a workload's containers run with now.
    pub fn spec_of(&self, name: &str) -> Option<&ContainerSpec> {
        self.units.get(name).map(|u| &u.spec)
    }

    /// Image layers under supervised containers (current instances, and
    /// those still stopping): image GC must not touch them.
    pub fn rootfs_in_use(&self) -> std::collections::BTreeSet<PathBuf> {
        self.units
            .values()
            .flat_map(|u| std::iter::once(&u.rootfs).chain(u.retiring.iter().map(|r| &r.rootfs)))
            .flat_map(|r| r.layers.iter().cloned())
            .collect()
    }

    /// What reconcile compares the desired document with.
    pub fn observed(&self) -> Vec<crate::reconcile::Observed> {
        self.units
            .iter()
            .map(|(name, u)| crate::reconcile::Observed {
                name: name.clone(),
                revision: u.version.revision,
                fingerprint: u.version.fingerprint.clone(),
                stopping: u.state == UnitState::Stopping,
            })
            .collect()
    }

    pub fn is_supervising(&self, name: &str) -> bool {
        self.units.contains_key(name)
    }

    /// The spec the workload's next instance starts with (same revision: a
    /// service endpoint list in its environment moved). Running containers
    /// are not touched.
    pub fn set_next_spec(&mut self, name: &str, spec: ContainerSpec) {
        if let Some(unit) = self.units.get_mut(name) {
            unit.spec = spec;
        }
    }

    /// Restarts a workload's container now (an operator's `baton restart`).
    pub fn restart_now(&mut self, name: &str) -> bool {
        let Some(unit) = self.units.get_mut(name) else { return false };
        unit.restart_requested = true;
        match unit.state {
            UnitState::Running => {
                let _ = self.rt.stop(&container_id(name, unit.instance));
            }
            UnitState::Stopping => return false,
            UnitState::BackingOff { .. } | UnitState::Done => unit.state = UnitState::BackingOff { until_ms: 0 },
        }
        true
    }

    /// Takes probe results, observes every container, starts whatever is due,
    /// and launches the probes that are due.
    pub fn tick(&mut self, now_ms: u64) {
        while let Ok(result) = self.results_rx.try_recv() {
            self.on_probe_result(result, now_ms);
        }
        let names: Vec<String> = self.units.keys().cloned().collect();
        for name in names {
            self.tick_unit(&name, now_ms);
        }
        self.launch_probes(now_ms);
    }

    fn tick_unit(&mut self, name: &str, now_ms: u64) {
        let Some(mut unit) = self.units.remove(name) else { return };
        // `baton logs` and `exec` go to the newest instance on disk: a dropped one must go.
        unit.discard.retain(|n| match self.rt.remove(&container_id(name, *n)) {
            Err(RuntimeError::StillRunning(_)) => true,
            Ok(()) | Err(RuntimeError::NotFound(_)) => false,
            Err(e) => {
                warn!(workload = name, error = %e, "cannot delete a dropped instance");
                false
            }
        });
        let id = container_id(name, unit.instance);
        let keep = match unit.state.clone() {
            UnitState::Running => {
                match self.rt.state(&id) {
                    Ok(ContainerState::Created) => unit.starting = true,
                    Ok(ContainerState::Running(_)) => {
                        unit.starting = false;
                        let healthy = health(&unit) == Health::Healthy;
                        // Healthy for a while: whatever went wrong before is history.
                        if healthy && now_ms.saturating_sub(unit.running_since_ms) >= ERROR_CLEARS_AFTER_MS {
                            unit.last_error = None;
                        }
                        // The new revision is healthy: the old one can go.
                        if unit.retiring.is_some() && healthy {
                            if let Some(r) = unit.retiring.take() {
                                let old = container_id(name, r.instance);
                                info!(workload = name, container = %old, "new revision healthy; stopping the previous one");
                                let _ = self.rt.stop(&old);
                            }
                        }
                    }
                    Ok(ContainerState::Exited(exit)) => unit.state = self.after_exit(name, &mut unit, exit, now_ms),
                    Ok(ContainerState::Lost | ContainerState::Missing) => {
                        warn!(workload = name, container = %id, "container lost; starting a new one");
                        // Its shim died: what it left running must not run beside the next one.
                        let _ = self.rt.kill(&id);
                        unit.last_error = Some("container lost (shim gone without an exit record)".into());
                        unit.restarts = unit.restarts.saturating_add(1);
                        unit.state = UnitState::BackingOff { until_ms: now_ms };
                    }
                    Err(e) => warn!(workload = name, error = %e, "cannot read container state"),
                }
                true
            }
            UnitState::BackingOff { until_ms } if now_ms >= until_ms => {
                match &mut self.batch {
                    Some(due) if !due.iter().any(|d| d == name) => due.push(name.to_string()),
                    Some(_) => {}
                    None => self.start_next(name, &mut unit, now_ms),
                }
                true
            }
            UnitState::BackingOff { .. } | UnitState::Done => true,
            UnitState::Stopping => match self.rt.state(&id) {
                Ok(ContainerState::Running(_)) => true,
                _ => {
                    for old in self.rt.list().unwrap_or_default().iter().filter(|c| instance_of(name, c).is_some()) {
                        let _ = self.rt.remove(old);
                    }
                    false
                }
            },
        };
        if keep {
            self.units.insert(name.to_string(), unit);
        }
    }

    fn after_exit(&self, name: &str, unit: &mut Unit, exit: ExitStatus, now_ms: u64) -> UnitState {
        if std::mem::take(&mut unit.restart_requested) {
            info!(workload = name, code = exit.code, "restarting on request");
            unit.last_exit = Some(exit);
            unit.failures = 0;
            unit.restarts = unit.restarts.saturating_add(1);
            return UnitState::BackingOff { until_ms: now_ms };
        }
        let decision = decide(unit.spec.restart, &exit, unit.failures, self.backoff(&unit.spec));
        info!(workload = name, code = exit.code, oom = exit.oom_killed, ?decision, "container exited");
        unit.last_exit = Some(exit);
        match decision {
            Decision::Restart { after, failures } => {
                unit.failures = failures;
                unit.restarts = unit.restarts.saturating_add(1);
                UnitState::BackingOff { until_ms: now_ms + after.as_millis() as u64 }
            }
            Decision::Done => UnitState::Done,
        }
    }

    fn start_next(&mut self, name: &str, unit: &mut Unit, now_ms: u64) {
        let start = self.prepare_start(name, unit);
        let created = start.make(&self.rt);
        self.finish_start(name, unit, start, created, now_ms);
    }

    /// What the next instance of `unit` is made from; the one before the
    /// previous instance goes (the previous one stays for its log).
    fn prepare_start(&self, name: &str, unit: &Unit) -> Start {
        let n = unit.next_instance;
        if n >= 2 {
            let _ = self.rt.remove(&container_id(name, n - 2));
        }
        let provenance = Provenance {
            revision: unit.version.revision,
            fingerprint: unit.version.fingerprint.clone(),
            restarts: unit.restarts,
            failures: unit.failures,
        };
        Start {
            id: container_id(name, n),
            n,
            spec: self.opened(name, &unit.spec).map(|opened| opened.unwrap_or_else(|| unit.spec.clone())),
            rootfs: unit.rootfs.clone(),
            provenance,
        }
    }

    /// From now on, starts that fall due wait for [`Self::end_batch`].
    pub fn begin_batch(&mut self) {
        self.batch.get_or_insert_with(Vec::new);
    }

    /// Makes the starts that fell due since [`Self::begin_batch`] side by
    /// side (as many at once as the runtime says it can take): a device booting with
    /// twenty workloads starts them in about the time of a few, not twenty
    /// one after another. Each start is a shim process doing mostly kernel
    /// work (mounts, cgroups, namespaces), so they overlap well even on two cores.
    pub fn end_batch(&mut self, now_ms: u64) {
        let Some(names) = self.batch.take() else { return };
        let mut due = Vec::new();
        for name in names {
            let Some(unit) = self.units.remove(&name) else { continue };
            if matches!(unit.state, UnitState::BackingOff { until_ms } if now_ms >= until_ms) {
                let start = self.prepare_start(&name, &unit);
                due.push((name, unit, start));
            } else {
                self.units.insert(name, unit);
            }
        }
        let mut made = Vec::with_capacity(due.len());
        let at_once = self.rt.starts_at_once().max(1);
        for group in due.chunks(at_once) {
            let rt = &self.rt;
            if let [(_, _, start)] = group {
                made.push(start.make(rt));
                continue;
            }
            std::thread::scope(|scope| {
                let running: Vec<_> = group.iter().map(|(_, _, start)| scope.spawn(move || start.make(rt))).collect();
                for (handle, (_, _, start)) in running.into_iter().zip(group) {
                    made.push(handle.join().unwrap_or_else(|_| {
                        Err(RuntimeError::Start { id: start.id.clone(), reason: "the start panicked".into() })
                    }));
                }
            });
        }
        for ((name, mut unit, start), created) in due.into_iter().zip(made) {
            self.finish_start(&name, &mut unit, start, created, now_ms);
            self.units.insert(name, unit);
        }
    }

    fn finish_start(
        &mut self,
        name: &str,
        unit: &mut Unit,
        start: Start,
        created: Result<(), RuntimeError>,
        now_ms: u64,
    ) {
        let (id, n) = (start.id, start.n);
        match created {
            Ok(()) => {
                info!(workload = name, container = %id, restarts = unit.restarts, "container started");
                unit.instance = n;
                unit.next_instance = n + 1;
                unit.start_failed = false;
                // Real containers run once created; a fake one may take a while.
                unit.starting = matches!(self.rt.state(&id), Ok(ContainerState::Created));
                unit.state = UnitState::Running;
                unit.arm_probes(now_ms);
            }
            Err(e) => {
                // A device may be plugged in later, a disk freed: retry with backoff, forever.
                let after = self.backoff(&unit.spec).delay(unit.failures);
                unit.failures = unit.failures.saturating_add(1);
                warn!(workload = name, error = %e, retry_in_ms = after.as_millis() as u64, "cannot start container");
                unit.last_error = Some(e.to_string());
                unit.start_failed = true;
                unit.state = UnitState::BackingOff { until_ms: now_ms + after.as_millis() as u64 };
            }
        }
    }

    /// What the device reports for each workload.
    pub fn status(&self) -> Vec<WorkloadStatus> {
        self.units
            .iter()
            .map(|(name, u)| {
                let usage = self.rt.usage(&container_id(name, u.instance)).unwrap_or_default();
                let phase = match (&u.state, &u.last_exit) {
                    (UnitState::Running, _) if u.starting => Phase::Starting,
                    (UnitState::Running, _) => Phase::Running,
                    (UnitState::BackingOff { .. }, _) if u.start_failed => Phase::Failed,
                    (UnitState::BackingOff { .. }, Some(_)) => Phase::BackingOff,
                    (UnitState::BackingOff { .. }, None) => Phase::Starting,
                    (UnitState::Done, Some(e)) if e.code != 0 => Phase::Failed,
                    (UnitState::Done, _) | (UnitState::Stopping, _) => Phase::Exited,
                };
                WorkloadStatus {
                    name: name.clone(),
                    revision: u.version.revision,
                    phase,
                    health: health(u),
                    restarts: u.restarts,
                    last_exit_code: u.last_exit.as_ref().map(|e| e.code),
                    last_error: u
                        .last_error
                        .clone()
                        .or_else(|| u.last_exit.as_ref().filter(|e| e.oom_killed).map(|_| "OOM-killed".to_string())),
                    cpu_usage_ns: usage.cpu_ns,
                    memory_bytes: usage.memory_bytes,
                }
            })
            .collect()
    }

    /// (workload, address) of each running container with an address of its own.
    pub fn addresses(&self) -> Vec<(String, String)> {
        self.units
            .iter()
            .filter(|(_, u)| u.state == UnitState::Running)
            .filter_map(|(name, u)| Some((name.clone(), self.rt.address(&container_id(name, u.instance))?.to_string())))
            .collect()
    }

    /// The container whose log `baton logs` shows: the current instance.
    pub fn current_container(&self, name: &str) -> Option<String> {
        self.units.get(name).map(|u| container_id(name, u.instance))
    }
}

/// Readiness decides when there is a readiness probe; else a failed liveness
/// probe; else a running container counts as healthy.
fn health(u: &Unit) -> Health {
    if u.state != UnitState::Running {
        return if matches!(u.state, UnitState::BackingOff { .. }) { Health::Unhealthy } else { Health::Unknown };
    }
    if u.starting {
        return Health::Unknown;
    }
    let verdict = match (&u.readiness, &u.liveness) {
        (Some(r), _) => r.healthy,
        (None, Some(l)) if l.healthy == Some(false) => Some(false),
        (None, _) => Some(true),
    };
    match verdict {
        Some(true) => Health::Healthy,
        Some(false) => Health::Unhealthy,
        None => Health::Unknown,
    }
}

mod probes;
#[cfg(test)]
mod tests;
