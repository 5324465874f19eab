//! The workloads engine. [`Engine::step`] is one turn of the loop: take the
//! inputs (a new desired document, operators' restarts), let the rollback
//! guard say what to run, plan against what the supervisor runs, carry the
//! plan out (a workload whose image is missing waits for it — `step` decides
//! what it reports), tick the supervisor, judge its statuses, and compose
//! the report, handed back when it changed. The engine is generic over the
//! container runtime and the image source: the device runs it on real
//! containers and its image store ([`spawn`]: one std thread, ticking every
//! 500 ms), the simulator on fakes (`simulate`), the same step either way.
//!
//! A thread, not a tokio task: runtime calls block (they launch shims and
//! read files), and keeping them off the runtime keeps the MQTT session
//! responsive. Image pulls run on their own thread (`image::puller`).

use std::collections::{BTreeMap, BTreeSet};
use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::mpsc::{channel, RecvTimeoutError, Sender};
use std::sync::Arc;
use std::thread::JoinHandle;
use std::time::Duration;

use baton_protocol::spec::{ContainerSpec, Mount, MountSource, WorkloadSpec};
use baton_protocol::{Desired, Report, ServiceEndpoints, WorkloadStatus};
use tracing::{info, warn};

use crate::image::source::ImageSource;
use crate::image::ImageError;
use crate::reconcile::{fingerprint, plan, replace_start_first, Action};
use crate::rollback::Guard;
use crate::runtime::rootfs::Rootfs;
use crate::runtime::{now_ms, ContainerRuntime};
use crate::step::Waits;
use crate::supervisor::{Supervisor, Version};

/// The version a workload spec's containers are created and reported as.
fn version_of(w: &WorkloadSpec) -> Version {
    Version { revision: w.revision, fingerprint: fingerprint(w) }
}

const TICK: Duration = Duration::from_millis(500);
/// How often the image store is checked against its budget.
const GC_EVERY_MS: u64 = 60_000;

pub enum Input {
    Desired(Desired),
    /// An operator's restart; answered with whether the workload runs here.
    Restart(String, tokio::sync::oneshot::Sender<bool>),
}

/// The link's side of the engine.
pub struct EngineHandle {
    pub tx: Sender<Input>,
    pub reports: tokio::sync::watch::Receiver<Report>,
    /// For operators' `exec` (run off the engine thread, which must keep ticking).
    pub runtime: Option<Arc<dyn ContainerRuntime + Send + Sync>>,
    /// The engine's newest load samples, for heartbeats.
    pub loads: crate::load::LoadBoard,
}

/// Owns the engine thread: [`EngineThread::shutdown`] (or a drop) stops it
/// after its current step and joins it — and with it the pull thread. The
/// containers carry on: stopping the agent never stops a container.
pub struct EngineThread {
    stop: Arc<AtomicBool>,
    thread: Option<JoinHandle<()>>,
}

impl EngineThread {
    pub fn shutdown(mut self) {
        self.stop_and_join();
    }

    fn stop_and_join(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
        if let Some(t) = self.thread.take() {
            if t.join().is_err() {
                warn!("the workloads thread panicked");
            }
        }
    }
}

impl Drop for EngineThread {
    fn drop(&mut self) {
        self.stop_and_join();
    }
}

/// How an engine keeps what it learns and what it shares with containers.
#[derive(Debug, Clone, Default)]
pub struct Options {
    /// Bytes the image store may hold before unused images are collected.
    pub image_budget: u64,
    /// Where the proven revisions are persisted (None: memory only, as the
    /// simulator keeps them).
    pub proven_path: Option<PathBuf>,
    /// `run_dir/services`: one directory per consuming workload, bind-mounted
    /// read-only at `/run/baton/services` (None: no service discovery).
    pub services_dir: Option<PathBuf>,
    /// Where the samples of workloads in `Desired::load_reports` go, for the
    /// link's heartbeats.
    pub loads: crate::load::LoadBoard,
}

pub struct Engine<R: ContainerRuntime, I: ImageSource> {
    sup: Supervisor<R>,
    images: I,
    desired: Desired,
    /// Device-level rollback; `effective` is what it says to run.
    guard: Guard,
    effective: Vec<WorkloadSpec>,
    /// Workloads waiting for their image (or a spec that builds), and the pulls.
    waits: Waits,
    options: Options,
    next_gc_ms: u64,
    /// Operators' restarts, carried out after the step's reconcile: right
    /// after a start, what the document names is supervised only from then on.
    restarts: Vec<(String, tokio::sync::oneshot::Sender<bool>)>,
    /// The last report handed back, without usage.
    last: Option<Report>,
    /// Whether the last step sampled loads (so the board is emptied once
    /// when the document stops asking).
    sampling: bool,
    /// Replacements held back by their update policy (windows, locks).
    holds: BTreeMap<String, Hold>,
    /// The controller's time, from the documents' signed `issued_ms`: what
    /// windows are judged by when this device's wall clock is behind it.
    clock: crate::clock::ControllerClock,
    /// The origin of the monotonic milliseconds `clock` is kept in.
    origin: std::time::Instant,
}

/// A replacement held back, since when, and why.
#[derive(Debug, Clone)]
struct Hold {
    revision: u64,
    since_mono: u64,
    /// Since when the running container holds its update lock.
    lock_since_mono: Option<u64>,
    verdict: crate::gate::Verdict,
    /// The new revision's image is on the device (its spec built once).
    image_here: bool,
}

/// Starts the engine thread with the desired document persisted in
/// `data_dir` (offline first: the device runs its last known state with no
/// network and no controller) and the revisions proven healthy here.
pub fn spawn<R, I>(
    sup: Supervisor<R>,
    images: I,
    data_dir: &std::path::Path,
    image_budget: u64,
    services_dir: Option<PathBuf>,
) -> std::io::Result<(EngineHandle, EngineThread)>
where
    R: ContainerRuntime + Send + 'static,
    I: ImageSource + Send + 'static,
{
    let initial = load_desired(data_dir).unwrap_or_default();
    if initial.generation > 0 {
        info!(generation = initial.generation, "starting the persisted desired state");
    }
    let proven_path = proven_path(data_dir);
    let proven = load_doc(&proven_path).map(|d| d.workloads).unwrap_or_default();
    let (tx, rx) = channel();
    let (report_tx, reports) =
        tokio::sync::watch::channel(Report { generation: initial.generation, ..Default::default() });
    let loads = crate::load::LoadBoard::default();
    let options = Options { image_budget, proven_path: Some(proven_path), services_dir, loads: loads.clone() };
    let mut engine = Engine::new(sup, images, initial, proven, options);
    let stop = Arc::new(AtomicBool::new(false));
    let stopped = stop.clone();
    let thread = std::thread::Builder::new().name("workloads".into()).spawn(move || {
        while !stopped.load(Ordering::Relaxed) {
            match rx.recv_timeout(TICK) {
                Ok(input) => engine.input(input),
                Err(RecvTimeoutError::Timeout) => {}
                // The link is gone; the containers carry on without us.
                Err(RecvTimeoutError::Disconnected) => return,
            }
            if let Some(report) = engine.step(now_ms()) {
                if report_tx.send(report).is_err() {
                    return;
                }
            }
        }
    })?;
    Ok((EngineHandle { tx, reports, runtime: None, loads }, EngineThread { stop, thread: Some(thread) }))
}

/// `BATON_SERVICE_<SERVICE>_<PORT>`: upper case, anything else than A-Z 0-9 → `_`.
fn service_env_name(service: &str, port: &str) -> String {
    format!("BATON_SERVICE_{service}_{port}")
        .chars()
        .map(|c| if c.is_ascii_alphanumeric() { c.to_ascii_uppercase() } else { '_' })
        .collect()
}

/// One line per endpoint: `ADDRESS:PORT PORT_NAME DEVICE`.
/// Port 0: an endpoint reachable on its own device only (a bridged
/// instance's unpublished port); routed by `net`, not listed.
fn service_file(s: &ServiceEndpoints) -> String {
    s.endpoints
        .iter()
        .filter(|e| e.port != 0)
        .map(|e| format!("{}:{} {} {}\n", e.address, e.port, e.port_name, e.device))
        .collect()
}

impl<R: ContainerRuntime, I: ImageSource> Engine<R, I> {
    /// An engine that starts from `initial` (the persisted document) and the
    /// specs `proven` healthy here before.
    pub fn new(sup: Supervisor<R>, images: I, initial: Desired, proven: Vec<WorkloadSpec>, options: Options) -> Self {
        let guard = Guard::with_proven(proven);
        let mut engine = Self {
            waits: Waits::new(images.can_pull()),
            sup,
            images,
            effective: guard.effective(&initial.workloads),
            desired: initial,
            guard,
            options,
            next_gc_ms: 0,
            restarts: Vec::new(),
            last: None,
            sampling: false,
            holds: BTreeMap::new(),
            clock: crate::clock::ControllerClock::default(),
            origin: std::time::Instant::now(),
        };
        let mono = engine.mono_ms();
        engine.clock.learn(engine.desired.issued_ms, mono);
        engine.write_services();
        engine
    }

    pub fn supervisor(&self) -> &Supervisor<R> {
        &self.sup
    }

    /// Takes one input; it acts at the next [`Engine::step`].
    pub fn input(&mut self, input: Input) {
        match input {
            Input::Desired(d) => {
                info!(generation = d.generation, workloads = d.workloads.len(), "applying desired document");
                let mono = self.mono_ms();
                self.clock.learn(d.issued_ms, mono);
                self.desired = d;
                self.waits.retry_pulls_now();
                self.write_services();
                self.refresh_consumers();
            }
            Input::Restart(name, done) => self.restarts.push((name, done)),
        }
    }

    /// One turn: reconcile, restarts, supervise, judge, report. Returns the
    /// report when it changed in more than usage since the last one returned.
    pub fn step(&mut self, now: u64) -> Option<Report> {
        self.take_pull_results(now);
        self.effective = self.guard.effective(&self.desired.workloads);
        // Every start this step calls for is made side by side at its end.
        self.sup.begin_batch();
        self.reconcile(now);
        for (name, done) in std::mem::take(&mut self.restarts) {
            self.refresh_spec(&name);
            let _ = done.send(self.sup.restart_now(&name));
        }
        self.sup.tick(now);
        self.sup.end_batch(now);
        // One status per step (it reads every container's cgroup usage).
        let status = self.sup.status();
        self.judge(&status, now);
        self.collect_images(now);
        let mut report =
            crate::step::report(self.desired.generation, status, &self.effective, &self.waits, &self.guard);
        report.addresses = self.sup.addresses();
        report.waiting = self.waiting();
        self.sample_loads(&report.workloads, now);
        crate::step::changed(&mut self.last, &report).then_some(report)
    }

    /// Leaves the load of each workload the document asks about (running
    /// ones) on the board: its usage from `status`, and what it says in
    /// `/run/baton/load`.
    fn sample_loads(&mut self, status: &[baton_protocol::WorkloadStatus], now: u64) {
        if self.desired.load_reports.is_empty() && !self.sampling {
            return;
        }
        self.sampling = !self.desired.load_reports.is_empty();
        let samples = self
            .desired
            .load_reports
            .iter()
            .filter_map(|name| {
                let st = status.iter().find(|s| &s.name == name && s.phase == baton_protocol::Phase::Running)?;
                let id = self.sup.current_container(name)?;
                let (_, instance) = crate::supervisor::parse_container_id(&id)?;
                let said = self.sup.runtime().signal(&id, crate::load::LOAD_FILE).map(|t| crate::load::parse_load(&t));
                Some(crate::load::LoadSample {
                    workload: name.clone(),
                    instance,
                    cpu_ns: st.cpu_usage_ns,
                    memory_bytes: st.memory_bytes,
                    load_milli: said.as_ref().and_then(|r| r.as_ref().ok().copied()),
                    load_error: said.and_then(Result::err),
                    at_ms: now,
                })
            })
            .collect();
        crate::load::publish(&self.options.loads, samples);
    }

    /// Brings `services_dir/<consumer>/<service>` in line with the desired
    /// document: changed files rewritten (atomically: a reader sees the old
    /// or the new list), stale ones removed. tmpfs, so no flash wear.
    fn write_services(&self) {
        self.sup.runtime().route_services(&self.desired.services, &self.desired.service_ports);
        let Some(dir) = &self.options.services_dir else { return };
        let mut want: BTreeMap<PathBuf, String> = BTreeMap::new();
        for s in &self.desired.services {
            for c in &s.consumers {
                want.insert(dir.join(c).join(&s.name), service_file(s));
            }
        }
        for consumer in std::fs::read_dir(dir).into_iter().flatten().flatten() {
            for file in std::fs::read_dir(consumer.path()).into_iter().flatten().flatten() {
                if !want.contains_key(&file.path()) {
                    let _ = std::fs::remove_file(file.path());
                }
            }
        }
        for (path, text) in want {
            if std::fs::read_to_string(&path).ok().as_deref() == Some(text.as_str()) {
                continue;
            }
            let written = path
                .parent()
                .map_or(Ok(()), std::fs::create_dir_all)
                .and_then(|()| crate::runtime::layout::write_atomic(&path, text.as_bytes()));
            if let Err(e) = written {
                warn!(path = %path.display(), error = %e, "cannot write service endpoints");
            }
        }
    }

    /// The service mount and environment of a consuming workload.
    fn add_services(&self, name: &str, spec: &mut ContainerSpec) {
        let Some(dir) = &self.options.services_dir else { return };
        let used: Vec<&ServiceEndpoints> =
            self.desired.services.iter().filter(|s| s.consumers.iter().any(|c| c == name)).collect();
        if used.is_empty() {
            return;
        }
        let mine = dir.join(name);
        if let Err(e) = std::fs::create_dir_all(&mine) {
            return warn!(workload = %name, error = %e, "cannot create the services directory");
        }
        spec.mounts.push(Mount {
            target: "/run/baton/services".into(),
            source: MountSource::Bind(mine.display().to_string()),
            read_only: true,
        });
        for s in used {
            let mut by_port: BTreeMap<&str, Vec<String>> = BTreeMap::new();
            for e in s.endpoints.iter().filter(|e| e.port != 0) {
                by_port.entry(&e.port_name).or_default().push(format!("{}:{}", e.address, e.port));
            }
            for (port, addrs) in by_port {
                spec.env.push((service_env_name(&s.name, port), addrs.join(",")));
            }
        }
    }

    /// Proves healthy revisions and rolls back those past their deadline;
    /// the proven set is written to flash only when it changes.
    fn judge(&mut self, status: &[WorkloadStatus], now: u64) {
        if !self.guard.observe(&self.desired.workloads, status, now) {
            return;
        }
        let Some(path) = &self.options.proven_path else { return };
        let doc = Desired { workloads: self.guard.proven(), ..Default::default() };
        let written = baton_protocol::encode(&baton_protocol::Message::Desired(doc))
            .map_err(|e| std::io::Error::other(e.to_string()))
            .and_then(|bytes| {
                path.parent().map_or(Ok(()), std::fs::create_dir_all)?;
                crate::runtime::layout::write_atomic(path, &bytes)
            });
        if let Err(e) = written {
            warn!(error = %e, "cannot persist the proven revisions");
        }
    }

    fn take_pull_results(&mut self, now: u64) {
        let mut full = false;
        for outcome in self.images.finished_pulls() {
            full |= outcome.no_space;
            if let Some(delay) = self.waits.pull_finished(&outcome, &self.effective, now) {
                let error = outcome.result.as_ref().err().map_or("", String::as_str);
                warn!(image = %outcome.image, %error, retry_in_s = delay.as_secs(), "pull failed");
            }
        }
        // The disk is full: images nothing here needs go now, not at the next
        // periodic collection; the pull is retried with its backoff.
        if full {
            info!("disk full for a pull: removing every image no workload needs");
            self.gc(0);
        }
    }

    /// Keeps the store under budget without touching what the desired document
    /// names or what a supervised container stands on.
    fn collect_images(&mut self, now: u64) {
        if now < self.next_gc_ms {
            return;
        }
        self.next_gc_ms = now + GC_EVERY_MS;
        self.gc(self.options.image_budget);
    }

    /// Removes unused images until the store is under `budget` bytes.
    fn gc(&mut self, budget: u64) {
        // The proven revisions' images too: a rollback must not need the network.
        let keep: BTreeSet<String> = self
            .effective
            .iter()
            .chain(self.desired.workloads.iter())
            .chain(self.guard.proven().iter())
            .flat_map(|w| [w.image.clone(), w.image_digest.clone()])
            .filter(|s| !s.is_empty())
            .collect();
        self.images.gc(&keep, &self.sup.rootfs_in_use(), budget);
    }

    fn reconcile(&mut self, now: u64) {
        let mut held = BTreeSet::new();
        for action in plan(&self.effective, &self.sup.observed()) {
            match action {
                Action::Stop(name) => {
                    info!(workload = %name, "stopping");
                    self.sup.remove(&name);
                }
                Action::Replace(name) => {
                    let Some(next) = self.effective.iter().find(|w| w.name == name).cloned() else { continue };
                    if let Some(fetch) = self.held(&next, now) {
                        // The running revision stays; its successor's image may come meanwhile.
                        if fetch {
                            let _ = self.prepare(&next, now, "cannot prepare a held replacement");
                        }
                        held.insert(name);
                        continue;
                    }
                    // A replacement waits for its image (and a spec that builds): the
                    // old revision keeps running meanwhile, and if it never comes.
                    let Some((spec, rootfs)) = self.prepare(&next, now, "cannot replace; the running revision stays")
                    else {
                        continue;
                    };
                    if self.sup.spec_of(&name).is_some_and(|old| replace_start_first(old, &spec)) {
                        self.sup.replace(&name, version_of(&next), spec, rootfs, now);
                    } else {
                        // Ports, devices or a volume held: stop first; the start follows once it is gone.
                        info!(workload = %name, "stopping for replacement");
                        self.sup.remove(&name);
                    }
                }
                Action::Start(name) => {
                    let Some(w) = self.effective.iter().find(|w| w.name == name).cloned() else { continue };
                    if let Some((spec, rootfs)) = self.prepare(&w, now, "cannot start") {
                        self.sup.ensure(&name, version_of(&w), spec, rootfs, now);
                    }
                }
                Action::Relabel(name) => {
                    if let Some(w) = self.effective.iter().find(|w| w.name == name) {
                        self.sup.relabel(&name, version_of(w));
                    }
                }
            }
        }
        self.waits.retain(&self.effective);
        self.holds.retain(|name, _| held.contains(name));
    }

    fn mono_ms(&self) -> u64 {
        self.origin.elapsed().as_millis() as u64
    }

    /// Whether the replacement of a running workload by `next` must wait
    /// (`Desired::updates`): Some(whether its image, not here yet, may be
    /// downloaded meanwhile). A device-level rollback (the guard runs an older
    /// revision than the document) is never held.
    fn held(&mut self, next: &WorkloadSpec, now: u64) -> Option<bool> {
        let policy = self.desired.updates.iter().find(|u| u.workload == next.name)?;
        let asked = self.desired.workloads.iter().find(|w| w.name == next.name)?;
        if asked.revision != next.revision {
            return None;
        }
        let mono = self.mono_ms();
        let lock_held = policy.lock.is_some()
            && self
                .sup
                .current_container(&next.name)
                .and_then(|id| self.sup.runtime().signal(&id, crate::gate::LOCK_FILE))
                .is_some();
        if self.holds.get(&next.name).is_none_or(|h| h.revision != next.revision) {
            let fresh = Hold {
                revision: next.revision,
                since_mono: mono,
                lock_since_mono: None,
                verdict: crate::gate::Verdict::Go,
                image_here: false,
            };
            self.holds.insert(next.name.clone(), fresh);
        }
        let hold = self.holds.get_mut(&next.name)?;
        hold.lock_since_mono = lock_held.then(|| hold.lock_since_mono.unwrap_or(mono));
        // Building the spec finds the image; once here it is not looked for again.
        if !hold.image_here {
            hold.image_here = self.images.build(next).is_ok();
        }
        // The best time this device knows: its own clock, unless the
        // controller's signed time says it is behind.
        let real_now = now.max(self.clock.now(mono).unwrap_or(0));
        let held = crate::gate::Held {
            waited_ms: mono - hold.since_mono,
            lock_ms: hold.lock_since_mono.map(|s| mono - s),
            image_here: hold.image_here,
        };
        let verdict = crate::gate::judge(policy, real_now, held);
        let fetch = match (&verdict, &hold.verdict) {
            (crate::gate::Verdict::Go, crate::gate::Verdict::Go) => return None,
            (crate::gate::Verdict::Go, crate::gate::Verdict::Hold { .. }) => {
                info!(workload = %next.name, revision = next.revision, "held replacement goes ahead");
                return None;
            }
            (crate::gate::Verdict::Hold { reason, until_ms, download }, old) => {
                let same = matches!(old, crate::gate::Verdict::Hold { reason: r, .. } if r == reason);
                if !same {
                    info!(workload = %next.name, revision = next.revision, %reason, "replacement held");
                }
                // The same reason keeps the time it first gave (reports do not churn).
                let until = match old {
                    crate::gate::Verdict::Hold { until_ms: u, .. } if same => *u,
                    _ => *until_ms,
                };
                hold.verdict =
                    crate::gate::Verdict::Hold { reason: reason.clone(), until_ms: until, download: *download };
                *download && !hold.image_here
            }
        };
        Some(fetch)
    }

    /// The replacements held back, for the report.
    fn waiting(&self) -> Vec<baton_protocol::Waiting> {
        self.holds
            .iter()
            .filter_map(|(name, h)| match &h.verdict {
                crate::gate::Verdict::Hold { reason, until_ms, .. } => Some(baton_protocol::Waiting {
                    workload: name.clone(),
                    revision: h.revision,
                    reason: reason.clone(),
                    until_ms: *until_ms,
                }),
                crate::gate::Verdict::Go => None,
            })
            .collect()
    }

    /// `w`'s spec and rootfs when its image is here and the spec builds.
    /// Otherwise `w` waits, and says why: its image is pulled (asked once,
    /// retried with backoff) or must be loaded; a spec that cannot be built
    /// reports the error (logged with `what` when it is new).
    fn prepare(&mut self, w: &WorkloadSpec, now: u64, what: &str) -> Option<(ContainerSpec, Rootfs)> {
        match self.spec_for(w) {
            Ok(built) => {
                self.waits.ready(&w.name);
                Some(built)
            }
            Err(ImageError::NotFound(_)) => {
                if let Some(request) = self.waits.image_missing(w, now) {
                    self.images.request_pull(request);
                }
                None
            }
            Err(e) => {
                let msg = e.to_string();
                if self.waits.cannot_build(&w.name, msg.clone()) {
                    warn!(workload = %w.name, error = %msg, "{what}");
                }
                None
            }
        }
    }

    /// The container spec of `w` on this device (image config, user, services) and its rootfs.
    fn spec_for(&self, w: &WorkloadSpec) -> Result<(ContainerSpec, Rootfs), ImageError> {
        let (mut spec, rootfs) = self.images.build(w)?;
        self.add_services(&w.name, &mut spec);
        Ok((spec, rootfs))
    }

    /// Gives a supervised workload's next instance a spec built from what is
    /// known now (the service environment moves; the revision does not).
    fn refresh_spec(&mut self, name: &str) {
        let Some(w) = self.effective.iter().find(|w| w.name == name).cloned() else { return };
        if let Ok((spec, _)) = self.spec_for(&w) {
            self.sup.set_next_spec(name, spec);
        }
    }

    fn refresh_consumers(&mut self) {
        let consumers: BTreeSet<String> = self
            .desired
            .services
            .iter()
            .flat_map(|s| s.consumers.iter().cloned())
            .filter(|n| self.sup.is_supervising(n))
            .collect();
        for name in &consumers {
            self.refresh_spec(name);
        }
    }
}

/// Where the last applied desired document is kept (flash, written only when it changes).
pub fn desired_path(data_dir: &std::path::Path) -> PathBuf {
    data_dir.join("state").join("desired.bin")
}

/// Where the specs proven healthy on this device are kept (for rollbacks).
pub fn proven_path(data_dir: &std::path::Path) -> PathBuf {
    data_dir.join("state").join("proven.bin")
}

/// The persisted document (secrets still sealed), if there is a readable one.
pub fn load_desired(data_dir: &std::path::Path) -> Option<Desired> {
    let path = desired_path(data_dir);
    let bytes = std::fs::read(&path).ok()?;
    crate::trust::read_persisted(&bytes)
        .map_err(|e| warn!(path = %path.display(), error = %e, "persisted document unusable; ignoring it"))
        .ok()
}

fn load_doc(path: &std::path::Path) -> Option<Desired> {
    let bytes = std::fs::read(path).ok()?;
    match baton_protocol::decode(&bytes) {
        Ok((_, baton_protocol::Message::Desired(d))) => Some(d),
        Ok(_) | Err(_) => {
            warn!(path = %path.display(), "persisted document is unreadable; ignoring it");
            None
        }
    }
}

#[cfg(test)]
mod tests;
