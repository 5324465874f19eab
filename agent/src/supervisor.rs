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

use crate::probe::{Outcome, Prober, Tracker};
use crate::restart::{decide, Backoff, Decision};
use crate::runtime::rootfs::Rootfs;
use crate::runtime::{ContainerRuntime, ContainerState, CreateRequest, ExitStatus, Provenance, RuntimeError};

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

/// The instance number of `id` if it belongs to workload `name`.
fn instance_of(name: &str, id: &str) -> Option<u32> {
    id.strip_prefix(name)?.strip_prefix('-')?.parse().ok()
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

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum ProbeKind {
    Liveness,
    Readiness,
}

/// A finished probe run, sent back from its thread.
struct ProbeResult {
    name: String,
    instance: u32,
    kind: ProbeKind,
    outcome: Outcome,
}

pub struct Supervisor<R: ContainerRuntime> {
    rt: R,
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
                // Lost (e.g. after a reboot) or vanished: start the next instance now.
                _ => {}
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

    fn on_probe_result(&mut self, r: ProbeResult, now_ms: u64) {
        let Some(unit) = self.units.get_mut(&r.name) else { return };
        if unit.instance != r.instance || unit.state != UnitState::Running {
            return; // a result about an instance that is gone
        }
        let tracker = match r.kind {
            ProbeKind::Liveness => unit.liveness.as_mut(),
            ProbeKind::Readiness => unit.readiness.as_mut(),
        };
        let Some(tracker) = tracker else { return };
        let turned_unhealthy = tracker.record(r.outcome, now_ms);
        if turned_unhealthy && r.kind == ProbeKind::Liveness {
            let why = tracker.last_failure.clone().unwrap_or_default();
            warn!(workload = %r.name, reason = %why, "liveness probe failed; stopping the container");
            unit.last_error = Some(format!("liveness probe failed: {why}"));
            let _ = self.rt.stop(&container_id(&r.name, unit.instance));
        }
    }

    fn launch_probes(&mut self, now_ms: u64) {
        let Some(prober) = self.prober.clone() else { return };
        for (name, unit) in &mut self.units {
            if unit.state != UnitState::Running {
                continue;
            }
            for (kind, tracker) in
                [(ProbeKind::Liveness, unit.liveness.as_mut()), (ProbeKind::Readiness, unit.readiness.as_mut())]
            {
                let Some(tracker) = tracker else { continue };
                if !tracker.start_if_due(now_ms) {
                    continue;
                }
                let (prober, tx, check, timeout) =
                    (prober.clone(), self.results_tx.clone(), tracker.probe.check.clone(), tracker.timeout());
                let (name, instance) = (name.clone(), unit.instance);
                let spawned = std::thread::Builder::new().name("probe".into()).spawn(move || {
                    let outcome = prober.probe(&container_id(&name, instance), &check, timeout);
                    let _ = tx.send(ProbeResult { name, instance, kind, outcome });
                });
                if let Err(e) = spawned {
                    tracker.record(Outcome::Failure(format!("cannot start probe thread: {e}")), now_ms);
                }
            }
        }
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
                    Ok(ContainerState::Running(_)) => {
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
                        unit.last_error = Some("container lost (shim gone without an exit record)".into());
                        unit.restarts = unit.restarts.saturating_add(1);
                        unit.state = UnitState::BackingOff { until_ms: now_ms };
                    }
                    Err(e) => warn!(workload = name, error = %e, "cannot read container state"),
                }
                true
            }
            UnitState::BackingOff { until_ms } if now_ms >= until_ms => {
                self.start_next(name, &mut unit, now_ms);
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
        let n = unit.next_instance;
        let id = container_id(name, n);
        // Keep the previous instance for its log; drop the one before it.
        if n >= 2 {
            let _ = self.rt.remove(&container_id(name, n - 2));
        }
        let created = match self.opened(name, &unit.spec) {
            Ok(opened) => {
                let spec = opened.as_ref().unwrap_or(&unit.spec);
                let provenance = Provenance {
                    revision: unit.version.revision,
                    fingerprint: unit.version.fingerprint.clone(),
                    restarts: unit.restarts,
                };
                self.rt.create(&CreateRequest { id: &id, spec, rootfs: unit.rootfs.clone(), provenance })
            }
            Err(reason) => Err(RuntimeError::Start { id: id.clone(), reason }),
        };
        match created {
            Ok(()) => {
                info!(workload = name, container = %id, restarts = unit.restarts, "container started");
                unit.instance = n;
                unit.next_instance = n + 1;
                unit.start_failed = false;
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

#[cfg(test)]
mod tests {
    use std::cell::RefCell;

    use super::*;
    use crate::runtime::{Running, RuntimeError, Usage};
    use baton_protocol::spec::RestartPolicy;

    /// Containers as a map; `exit` makes one exit as if its process ended.
    #[derive(Default)]
    struct Fake {
        containers: RefCell<BTreeMap<String, ContainerState>>,
        provenance: RefCell<BTreeMap<String, Provenance>>,
        refuse: RefCell<Option<String>>,
    }

    impl Fake {
        fn exit(&self, id: &str, code: i32, at: u64) {
            self.containers.borrow_mut().insert(
                id.into(),
                ContainerState::Exited(ExitStatus {
                    code,
                    signal: None,
                    oom_killed: false,
                    started_at_ms: at - 10,
                    finished_at_ms: at,
                }),
            );
        }
        fn ids(&self) -> Vec<String> {
            self.containers.borrow().keys().cloned().collect()
        }
    }

    impl ContainerRuntime for &Fake {
        fn create(&self, req: &CreateRequest<'_>) -> Result<(), RuntimeError> {
            if let Some(reason) = self.refuse.borrow().clone() {
                return Err(RuntimeError::Start { id: req.id.into(), reason });
            }
            let running = ContainerState::Running(Running { pid: 1, shim_pid: 2, started_at_ms: 0 });
            self.containers.borrow_mut().insert(req.id.into(), running);
            self.provenance.borrow_mut().insert(req.id.into(), req.provenance.clone());
            Ok(())
        }
        fn state(&self, id: &str) -> Result<ContainerState, RuntimeError> {
            Ok(self.containers.borrow().get(id).cloned().unwrap_or(ContainerState::Missing))
        }
        fn stop(&self, id: &str) -> Result<(), RuntimeError> {
            self.exit(id, 143, 1_000_000);
            Ok(())
        }
        fn kill(&self, id: &str) -> Result<(), RuntimeError> {
            self.stop(id)
        }
        fn remove(&self, id: &str) -> Result<(), RuntimeError> {
            self.containers.borrow_mut().remove(id);
            Ok(())
        }
        fn list(&self) -> Result<Vec<String>, RuntimeError> {
            Ok(self.ids())
        }
        fn provenance(&self, id: &str) -> Option<Provenance> {
            self.provenance.borrow().get(id).cloned()
        }
        fn usage(&self, _: &str) -> Option<Usage> {
            None
        }
        fn exec(&self, _: &str, _: &[String], _: Duration) -> Result<crate::runtime::ExecOutput, RuntimeError> {
            Err(RuntimeError::InvalidSpec("fake".into()))
        }
    }

    fn spec(policy: RestartPolicy) -> ContainerSpec {
        ContainerSpec { command: vec!["x".into()], restart: policy, ..Default::default() }
    }

    #[test]
    fn restarts_with_backoff_keeping_one_previous_instance() {
        let fake = Fake::default();
        let mut sup = Supervisor::new(&fake);
        sup.ensure("web", 1, spec(RestartPolicy::Always), "/r".into(), 0);
        assert_eq!(fake.ids(), vec!["web-0"]);
        let mut now = 100;
        for (n, expected_delay) in [(0, 1000), (1, 2000), (2, 4000)] {
            fake.exit(&container_id("web", n), 1, now);
            sup.tick(now);
            assert_eq!(sup.status()[0].phase, Phase::BackingOff);
            sup.tick(now + expected_delay - 1);
            assert_eq!((&fake).state(&container_id("web", n + 1)).unwrap(), ContainerState::Missing, "started early");
            now += expected_delay;
            sup.tick(now);
            assert!(matches!((&fake).state(&container_id("web", n + 1)).unwrap(), ContainerState::Running(_)));
        }
        assert_eq!(fake.ids(), vec!["web-2", "web-3"]);
        let st = &sup.status()[0];
        assert_eq!((st.restarts, st.phase, st.last_exit_code), (3, Phase::Running, Some(1)));
    }

    #[test]
    fn on_failure_and_never_policies_stop_when_satisfied() {
        let fake = Fake::default();
        let mut sup = Supervisor::new(&fake);
        sup.ensure("job", 1, spec(RestartPolicy::OnFailure), "/r".into(), 0);
        fake.exit("job-0", 0, 50);
        sup.tick(50);
        sup.tick(1_000_000);
        assert_eq!(fake.ids(), vec!["job-0"]);
        assert_eq!(sup.status()[0].phase, Phase::Exited);

        sup.ensure("once", 1, spec(RestartPolicy::Never), "/r".into(), 0);
        fake.exit("once-0", 2, 50);
        sup.tick(1_000_000);
        let st = sup.status().into_iter().find(|s| s.name == "once").unwrap();
        assert_eq!((st.phase, st.restarts), (Phase::Failed, 0));
    }

    #[test]
    fn start_failures_are_retried_forever_with_backoff() {
        let fake = Fake::default();
        *fake.refuse.borrow_mut() = Some("devices[0]: /dev/ttyUSB0 does not exist".into());
        let mut sup = Supervisor::new(&fake);
        sup.ensure("serial", 1, spec(RestartPolicy::Always), "/r".into(), 0);
        let st = &sup.status()[0];
        assert_eq!(st.phase, Phase::Failed);
        assert!(st.last_error.as_deref().unwrap_or("").contains("ttyUSB0"));
        for t in [1_000, 3_000, 7_000, 1_000_000] {
            sup.tick(t);
        }
        assert!(fake.ids().is_empty());
        *fake.refuse.borrow_mut() = None; // the device was plugged in
        sup.tick(10_000_000);
        assert_eq!(sup.status()[0].phase, Phase::Running);
    }

    #[test]
    fn readopts_running_containers_and_resumes_exited_ones() {
        let fake = Fake::default();
        {
            let mut sup = Supervisor::new(&fake);
            sup.ensure("web", 1, spec(RestartPolicy::Always), "/r".into(), 0);
            fake.exit("web-0", 1, 10);
            sup.tick(10);
            sup.tick(2_000);
            sup.ensure("db", 1, spec(RestartPolicy::Always), "/r".into(), 0);
        } // the agent dies
        fake.exit("db-0", 3, 5_000);
        let before = fake.ids();
        let mut sup = Supervisor::new(&fake);
        sup.ensure("web", 1, spec(RestartPolicy::Always), "/r".into(), 6_000);
        assert_eq!(fake.ids(), before, "re-adoption touched a running container");
        let web = sup.status().into_iter().find(|s| s.name == "web").unwrap();
        assert_eq!((web.phase, web.restarts), (Phase::Running, 1));
        sup.ensure("db", 1, spec(RestartPolicy::Always), "/r".into(), 6_000);
        let db = sup.status().into_iter().find(|s| s.name == "db").unwrap();
        assert_eq!((db.phase, db.last_exit_code), (Phase::BackingOff, Some(3)));
        sup.tick(7_000);
        assert!(matches!((&fake).state("db-1").unwrap(), ContainerState::Running(_)));
    }

    #[test]
    fn operator_restart_overrides_the_policy_once() {
        let fake = Fake::default();
        let mut sup = Supervisor::new(&fake);
        sup.ensure("once", 1, spec(RestartPolicy::Never), "/r".into(), 0);
        assert!(sup.restart_now("once"));
        sup.tick(10);
        sup.tick(20);
        assert!(matches!((&fake).state("once-1").unwrap(), ContainerState::Running(_)));
        fake.exit("once-1", 0, 30);
        sup.tick(30);
        sup.tick(1_000_000);
        assert_eq!((&fake).state("once-2").unwrap(), ContainerState::Missing, "policy never: no second restart");
        assert!(sup.restart_now("once"));
        sup.tick(1_000_001);
        assert!(matches!((&fake).state("once-2").unwrap(), ContainerState::Running(_)));
    }

    /// Answers every probe with the outcome currently scripted.
    struct Scripted(std::sync::Mutex<Outcome>);

    impl Prober for Scripted {
        fn probe(&self, _: &str, _: &baton_protocol::spec::ProbeCheck, _: Duration) -> Outcome {
            self.0.lock().unwrap().clone()
        }
    }

    /// Ticks with simulated time moving `step_ms` per tick until `done`; returns the time reached.
    fn tick_until(
        sup: &mut Supervisor<&Fake>,
        mut now: u64,
        step_ms: u64,
        done: impl Fn(&Supervisor<&Fake>) -> bool,
    ) -> u64 {
        for _ in 0..2000 {
            sup.tick(now);
            if done(sup) {
                return now;
            }
            std::thread::sleep(Duration::from_millis(1)); // let probe threads answer
            now += step_ms;
        }
        panic!("condition not reached by simulated time {now}");
    }

    #[test]
    fn failing_liveness_restarts_and_readiness_sets_health() {
        use baton_protocol::spec::{Probe, ProbeCheck};
        let fake = Fake::default();
        let scripted = Arc::new(Scripted(std::sync::Mutex::new(Outcome::Success)));
        let mut sup = Supervisor::new(&fake).with_prober(scripted.clone());
        let probe = Probe {
            check: ProbeCheck::Tcp { port: 1 },
            interval_s: 1,
            timeout_s: 1,
            failure_threshold: 2,
            initial_delay_s: 0,
        };
        let mut s = spec(RestartPolicy::Always);
        s.liveness = Some(probe.clone());
        s.readiness = Some(probe);
        sup.ensure("web", 1, s, "/r".into(), 0);
        assert_eq!(sup.status()[0].health, Health::Unknown, "healthy before any readiness result");
        let now = tick_until(&mut sup, 0, 0, |s| s.status()[0].health == Health::Healthy);

        *scripted.0.lock().unwrap() = Outcome::Failure("connection refused".into());
        let now =
            tick_until(&mut sup, now, 100, |_| matches!((&fake).state("web-0").unwrap(), ContainerState::Exited(_)));
        let st = &sup.status()[0];
        assert!(st.last_error.as_deref().unwrap_or("").contains("liveness probe failed: connection refused"), "{st:?}");
        tick_until(&mut sup, now, 100, |_| matches!((&fake).state("web-1").unwrap(), ContainerState::Running(_)));
    }

    #[test]
    fn start_first_replacement_keeps_the_old_revision_until_the_new_one_is_ready() {
        use baton_protocol::spec::{Probe, ProbeCheck};
        let running = |fake: &Fake, id: &str| matches!((&fake).state(id).unwrap(), ContainerState::Running(_));
        let fake = Fake::default();
        let scripted = Arc::new(Scripted(std::sync::Mutex::new(Outcome::Failure("not yet".into()))));
        let mut sup = Supervisor::new(&fake).with_prober(scripted.clone());
        sup.ensure("web", 1, spec(RestartPolicy::Always), "/r1".into(), 0);
        let mut v2 = spec(RestartPolicy::Always);
        v2.readiness = Some(Probe {
            check: ProbeCheck::Tcp { port: 1 },
            interval_s: 1,
            timeout_s: 1,
            failure_threshold: 1,
            initial_delay_s: 0,
        });
        sup.replace("web", 2, v2, "/r2".into(), 10);
        // Both run; the old one's rootfs is still in use.
        assert!(running(&fake, "web-0") && running(&fake, "web-1"));
        assert_eq!(sup.observed()[0].revision, 2);
        assert!(sup.rootfs_in_use().contains(std::path::Path::new("/r1")));
        let now = tick_until(&mut sup, 10, 100, |s| s.status()[0].health == Health::Unhealthy);
        assert!(running(&fake, "web-0"), "the old revision stopped before the new one was ready");
        *scripted.0.lock().unwrap() = Outcome::Success;
        tick_until(&mut sup, now, 100, |_| !running(&fake, "web-0"));
        assert!(running(&fake, "web-1"));
        assert!(!sup.rootfs_in_use().contains(std::path::Path::new("/r1")));
    }

    #[test]
    fn rolling_back_during_a_replacement_keeps_the_old_container() {
        let fake = Fake::default();
        let mut sup = Supervisor::new(&fake);
        sup.ensure("web", 1, spec(RestartPolicy::Always), "/r1".into(), 0);
        let mut v2 = spec(RestartPolicy::Always);
        v2.command = vec!["v2".into()];
        sup.replace("web", 2, v2, "/r2".into(), 10);
        fake.exit("web-1", 1, 20); // the new revision crashes
        sup.tick(20);
        sup.replace("web", 1, spec(RestartPolicy::Always), "/r1".into(), 30);
        assert_eq!(sup.observed()[0].revision, 1);
        assert!(
            matches!((&fake).state("web-0").unwrap(), ContainerState::Running(_)),
            "the old container was restarted"
        );
        assert_eq!(sup.current_container("web").as_deref(), Some("web-0"));
        sup.tick(40);
        assert_eq!(fake.ids(), vec!["web-0"], "a third container was started, or the dropped one kept");
    }

    #[test]
    fn an_agent_restart_mid_replacement_stops_the_older_instance() {
        let fake = Fake::default();
        let mut sup = Supervisor::new(&fake);
        sup.ensure("web", 1, spec(RestartPolicy::Always), "/r1".into(), 0);
        sup.replace("web", 2, spec(RestartPolicy::Always), "/r2".into(), 10);
        drop(sup);
        // A new agent adopts the newest instance and stops the one it replaced.
        let mut sup = Supervisor::new(&fake);
        sup.ensure("web", 2, spec(RestartPolicy::Always), "/r2".into(), 20);
        assert!(matches!((&fake).state("web-1").unwrap(), ContainerState::Running(_)));
        assert!(matches!((&fake).state("web-0").unwrap(), ContainerState::Exited(_)));
    }

    fn version(revision: u64, fingerprint: &str) -> Version {
        Version { revision, fingerprint: fingerprint.into() }
    }

    #[test]
    fn a_readopted_container_of_another_spec_is_reported_as_what_it_runs() {
        let fake = Fake::default();
        let mut sup = Supervisor::new(&fake);
        sup.ensure("web", version(2, "spec-two"), spec(RestartPolicy::Always), "/r2".into(), 0);
        fake.exit("web-0", 1, 10);
        sup.tick(10);
        sup.tick(2_000);
        assert_eq!(sup.status()[0].restarts, 1);
        drop(sup); // the agent dies; revision 3 is applied meanwhile
        let mut sup = Supervisor::new(&fake);
        sup.ensure("web", version(3, "spec-three"), spec(RestartPolicy::Always), "/r3".into(), 5_000);
        assert!(matches!((&fake).state("web-1").unwrap(), ContainerState::Running(_)), "restarted on adoption");
        let observed = &sup.observed()[0];
        assert_eq!((observed.revision, observed.fingerprint.as_str()), (2, "spec-two"), "labelled as desired");
        assert_eq!(sup.status()[0].revision, 2);
        // What reconcile then asks for: the new spec replaces it, with its own restart count.
        sup.replace("web", version(3, "spec-three"), spec(RestartPolicy::Always), "/r3".into(), 6_000);
        assert_eq!((sup.status()[0].revision, sup.status()[0].restarts), (3, 0));
        assert_eq!(
            fake.provenance.borrow()["web-2"],
            Provenance { revision: 3, fingerprint: "spec-three".into(), restarts: 0 }
        );

        // The same spec adopted again keeps its restart count and is left alone.
        drop(sup);
        let mut sup = Supervisor::new(&fake);
        sup.ensure("web", version(3, "spec-three"), spec(RestartPolicy::Always), "/r3".into(), 7_000);
        assert_eq!(sup.current_container("web").as_deref(), Some("web-2"));
        assert_eq!((sup.observed()[0].revision, sup.status()[0].restarts), (3, 0));
    }

    #[test]
    fn replacements_are_not_restarts_and_old_errors_clear_once_healthy() {
        let fake = Fake::default();
        let mut sup = Supervisor::new(&fake);
        sup.ensure("web", 1, spec(RestartPolicy::Always), "/r1".into(), 0);
        fake.exit("web-0", 1, 10);
        sup.tick(10);
        sup.tick(2_000);
        let st = &sup.status()[0];
        assert_eq!((st.restarts, st.phase), (1, Phase::Running));
        sup.restart_now("web");
        sup.tick(2_100);
        sup.tick(2_200);
        assert_eq!(sup.status()[0].restarts, 2, "an operator restart is a restart");
        sup.replace("web", 2, spec(RestartPolicy::Always), "/r2".into(), 3_000);
        sup.tick(3_000);
        assert_eq!(sup.status()[0].restarts, 0, "a new revision is not a restart");
        // An error stays while it is recent, and goes once the container has been healthy a while.
        sup.units.get_mut("web").unwrap().last_error = Some("liveness probe failed".into());
        sup.tick(3_000 + ERROR_CLEARS_AFTER_MS - 1);
        assert!(sup.status()[0].last_error.is_some());
        sup.tick(3_000 + ERROR_CLEARS_AFTER_MS);
        assert_eq!(sup.status()[0].last_error, None);
    }

    #[test]
    fn remove_stops_then_deletes_every_instance() {
        let fake = Fake::default();
        let mut sup = Supervisor::new(&fake);
        sup.ensure("web", 1, spec(RestartPolicy::Always), "/r".into(), 0);
        sup.remove("web");
        sup.tick(1);
        assert!(fake.ids().is_empty());
        assert!(!sup.is_supervising("web"));
    }
}
