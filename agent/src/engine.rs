//! The workloads engine: one std thread that owns the supervisor. It takes
//! desired documents from the link, reconciles, ticks the supervisor, and
//! hands back a `Report` whenever observed state changes. A thread, not a
//! tokio task: runtime calls block (they launch shims and read files), and
//! keeping them off the runtime keeps the MQTT session responsive. Image
//! pulls run on a second thread so a slow registry never stalls supervision.

use std::collections::{BTreeMap, BTreeSet};
use std::path::PathBuf;
use std::sync::mpsc::{channel, Receiver, RecvTimeoutError, Sender};
use std::sync::Arc;
use std::time::Duration;

use baton_protocol::spec::{ContainerSpec, Mount, MountSource, WorkloadSpec};
use baton_protocol::{Desired, Health, Phase, Report, ServiceEndpoints, WorkloadStatus};
use tracing::{info, warn};

use crate::image::registry::Registry;
use crate::image::{ImageError, ImageStore};
use crate::reconcile::{container_spec, fingerprint, plan, replace_start_first, Action};
use crate::rollback::Guard;
use crate::runtime::{now_ms, ContainerRuntime};
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
}

/// Pulls images (and unpacks them) on its own thread.
struct Puller {
    requests: Sender<(String, Option<String>)>,
    /// (image, outcome, whether it failed for want of disk space).
    results: Receiver<(String, Result<(), String>, bool)>,
    /// Image → (earliest retry time, failures so far) after a failed pull.
    backoff: BTreeMap<String, (u64, u32)>,
    in_flight: BTreeSet<String>,
}

impl Puller {
    fn spawn(store: Arc<ImageStore>, registry: Registry) -> std::io::Result<Self> {
        let (requests, rx) = channel::<(String, Option<String>)>();
        let (tx, results) = channel();
        std::thread::Builder::new().name("image-pull".into()).spawn(move || {
            let platform = crate::image::manifest::Platform::current();
            for (image, digest) in rx {
                // A resolved digest pins the bytes; the reference names where to get them.
                let reference = match &digest {
                    Some(d) => format!("{}@{d}", image.split('@').next().unwrap_or(&image)),
                    None => image.clone(),
                };
                let pulled = registry.pull(&store, &reference, &platform).and_then(|(record, stats)| {
                    info!(%image, blobs = stats.blobs_fetched, bytes = stats.bytes_downloaded, "pulled");
                    // Unpack it here, off the engine thread, then record it under the
                    // name workloads use: a recorded image is one that can run.
                    let record = crate::image::ImageRecord { reference: image.clone(), ..record };
                    match store.rootfs(&record) {
                        Ok(_) => store.record_image(&record),
                        Err(e) => {
                            if matches!(e, ImageError::NoSpace { .. }) {
                                let blobs: Vec<_> = record
                                    .layers
                                    .iter()
                                    .chain(&record.config_digest)
                                    .chain([&record.manifest])
                                    .cloned()
                                    .collect();
                                store.forget_unreferenced(&blobs);
                            }
                            Err(e)
                        }
                    }
                });
                let full = matches!(pulled, Err(ImageError::NoSpace { .. }));
                if tx.send((image, pulled.map_err(|e| e.to_string()), full)).is_err() {
                    return;
                }
            }
        })?;
        Ok(Self { requests, results, backoff: BTreeMap::new(), in_flight: BTreeSet::new() })
    }
}

struct Engine<R: ContainerRuntime> {
    sup: Supervisor<R>,
    images: Arc<ImageStore>,
    desired: Desired,
    /// Device-level rollback; `effective` is what it says to run.
    guard: Guard,
    effective: Vec<WorkloadSpec>,
    proven_path: PathBuf,
    /// `run_dir/services`: one directory per consuming workload, bind-mounted
    /// read-only at `/run/baton/services` (None: no service discovery).
    services_dir: Option<PathBuf>,
    /// Workloads waiting for their image: (phase to report, reason).
    waiting: BTreeMap<String, (Phase, String)>,
    puller: Option<Puller>,
    /// Bytes the image store may hold before unused images are collected.
    image_budget: u64,
    next_gc_ms: u64,
}

/// Starts the engine with the desired document persisted in `data_dir`
/// (offline first: the device runs its last known state with no network and
/// no controller) and the revisions proven healthy here. Without a registry,
/// images must be loaded locally.
pub fn spawn<R: ContainerRuntime + Send + 'static>(
    sup: Supervisor<R>,
    images: ImageStore,
    registry: Option<Registry>,
    image_budget: u64,
    data_dir: &std::path::Path,
    services_dir: Option<PathBuf>,
) -> std::io::Result<EngineHandle> {
    let initial = load_desired(data_dir).unwrap_or_default();
    if initial.generation > 0 {
        info!(generation = initial.generation, "starting the persisted desired state");
    }
    let proven_path = proven_path(data_dir);
    let guard = Guard::with_proven(load_doc(&proven_path).map(|d| d.workloads).unwrap_or_default());
    let (tx, rx) = channel();
    let (report_tx, reports) =
        tokio::sync::watch::channel(Report { generation: initial.generation, ..Default::default() });
    let images = Arc::new(images);
    let puller = registry.map(|r| Puller::spawn(images.clone(), r)).transpose()?;
    let mut engine = Engine {
        sup,
        images,
        effective: guard.effective(&initial.workloads),
        desired: initial,
        guard,
        proven_path,
        services_dir,
        waiting: BTreeMap::new(),
        puller,
        image_budget,
        next_gc_ms: 0,
    };
    engine.write_services();
    std::thread::Builder::new().name("workloads".into()).spawn(move || {
        let mut last = None;
        let mut restarts = Vec::new();
        loop {
            match rx.recv_timeout(TICK) {
                Ok(Input::Desired(d)) => {
                    info!(generation = d.generation, workloads = d.workloads.len(), "applying desired document");
                    engine.desired = d;
                    // A new document is the operator asking again: failed pulls retry now.
                    if let Some(p) = engine.puller.as_mut() {
                        p.backoff.clear();
                    }
                    engine.write_services();
                    engine.refresh_consumers();
                }
                // Done after this tick's reconcile: right after a start, what the
                // persisted document names is supervised only from then on.
                Ok(Input::Restart(name, done)) => restarts.push((name, done)),
                Err(RecvTimeoutError::Timeout) => {}
                // The agent is shutting down; the containers carry on without us.
                Err(RecvTimeoutError::Disconnected) => return,
            }
            let now = now_ms();
            engine.take_pull_results(now);
            engine.effective = engine.guard.effective(&engine.desired.workloads);
            engine.reconcile(now);
            for (name, done) in restarts.drain(..) {
                engine.refresh_spec(&name);
                let _ = done.send(engine.sup.restart_now(&name));
            }
            engine.sup.tick(now);
            // One status per tick (it reads every container's cgroup usage).
            let status = engine.sup.status();
            engine.judge(&status, now);
            engine.collect_images(now);
            let report = engine.report(status);
            if last.as_ref() != Some(&without_usage(&report)) {
                last = Some(without_usage(&report));
                if report_tx.send(report).is_err() {
                    return;
                }
            }
        }
    })?;
    Ok(EngineHandle { tx, reports, runtime: None })
}

/// Usage moves every tick; a report is sent when anything else changes.
fn without_usage(r: &Report) -> Report {
    let mut r = r.clone();
    for w in &mut r.workloads {
        w.cpu_usage_ns = 0;
        w.memory_bytes = 0;
    }
    r
}

/// `BATON_SERVICE_<SERVICE>_<PORT>`: upper case, anything else than A-Z 0-9 → `_`.
fn service_env_name(service: &str, port: &str) -> String {
    format!("BATON_SERVICE_{service}_{port}")
        .chars()
        .map(|c| if c.is_ascii_alphanumeric() { c.to_ascii_uppercase() } else { '_' })
        .collect()
}

/// One line per endpoint: `ADDRESS:PORT PORT_NAME DEVICE`.
fn service_file(s: &ServiceEndpoints) -> String {
    s.endpoints.iter().map(|e| format!("{}:{} {} {}\n", e.address, e.port, e.port_name, e.device)).collect()
}

impl<R: ContainerRuntime> Engine<R> {
    /// Brings `services_dir/<consumer>/<service>` in line with the desired
    /// document: changed files rewritten (atomically: a reader sees the old
    /// or the new list), stale ones removed. tmpfs, so no flash wear.
    fn write_services(&self) {
        let Some(dir) = &self.services_dir else { return };
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
        let Some(dir) = &self.services_dir else { return };
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
            for e in &s.endpoints {
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
        if self.guard.observe(&self.desired.workloads, status, now) {
            let doc = Desired { workloads: self.guard.proven(), ..Default::default() };
            let written = baton_protocol::encode(&baton_protocol::Message::Desired(doc))
                .map_err(|e| std::io::Error::other(e.to_string()))
                .and_then(|bytes| {
                    self.proven_path.parent().map_or(Ok(()), std::fs::create_dir_all)?;
                    crate::runtime::layout::write_atomic(&self.proven_path, &bytes)
                });
            if let Err(e) = written {
                warn!(error = %e, "cannot persist the proven revisions");
            }
        }
    }

    fn take_pull_results(&mut self, now: u64) {
        let Some(p) = self.puller.as_mut() else { return };
        let mut full = false;
        while let Ok((image, result, no_space)) = p.results.try_recv() {
            p.in_flight.remove(&image);
            full |= no_space;
            match result {
                Ok(()) => {
                    p.backoff.remove(&image);
                }
                Err(e) => {
                    let failures = p.backoff.get(&image).map_or(0, |(_, f)| *f) + 1;
                    let delay = crate::restart::Backoff::default().delay(failures - 1);
                    warn!(%image, error = %e, retry_in_s = delay.as_secs(), "pull failed");
                    p.backoff.insert(image.clone(), (now + delay.as_millis() as u64, failures));
                    for w in self.effective.iter().filter(|w| w.image == image) {
                        self.waiting.insert(w.name.clone(), (Phase::Failed, format!("pull {image}: {e}")));
                    }
                }
            }
        }
        // The disk is full: images nothing here needs go now, not at the next
        // periodic collection; the pull is retried with its backoff.
        if full {
            info!("disk full for a pull: removing every image no workload needs");
            self.gc(0);
        }
    }

    /// Asks for `image` unless it is being pulled or waiting to retry; true
    /// when a pull is (now) under way.
    fn request_pull(&mut self, image: &str, digest: Option<&str>, now: u64) -> bool {
        let Some(p) = self.puller.as_mut() else { return false };
        if p.in_flight.contains(image) {
            return true;
        }
        if p.backoff.get(image).is_some_and(|(until, _)| now < *until) {
            return false;
        }
        p.in_flight.insert(image.to_string());
        let _ = p.requests.send((image.to_string(), digest.map(str::to_string)));
        true
    }

    /// Keeps the store under budget without touching what the desired document
    /// names or what a supervised container stands on.
    fn collect_images(&mut self, now: u64) {
        if now < self.next_gc_ms {
            return;
        }
        self.next_gc_ms = now + GC_EVERY_MS;
        self.gc(self.image_budget);
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
        if let Err(e) = self.images.gc(&keep, &self.sup.rootfs_in_use(), budget) {
            warn!(error = %e, "image GC failed");
        }
    }

    fn reconcile(&mut self, now: u64) {
        for action in plan(&self.effective, &self.sup.observed()) {
            match action {
                Action::Stop(name) => {
                    info!(workload = %name, "stopping");
                    self.sup.remove(&name);
                }
                Action::Replace(name) => {
                    // A replacement waits for its image: the old revision keeps
                    // running while the new one downloads (and if it never does).
                    let Some(next) = self.effective.iter().find(|w| w.name == name).cloned() else { continue };
                    if !self.image_ready(&next, now) {
                        continue;
                    }
                    match self.spec_for(&next) {
                        Ok((spec, rootfs))
                            if self.sup.spec_of(&name).is_some_and(|old| replace_start_first(old, &spec)) =>
                        {
                            self.sup.replace(&name, version_of(&next), spec, rootfs, now);
                        }
                        // Ports, devices or a volume held: stop first; the start follows once it is gone.
                        Ok(_) => {
                            info!(workload = %name, "stopping for replacement");
                            self.sup.remove(&name);
                        }
                        // The new revision cannot be made (its image will not unpack):
                        // what runs keeps running, and the report says why.
                        Err(e) => {
                            let msg = e.to_string();
                            if self.waiting.insert(name.clone(), (Phase::Failed, msg.clone())).map(|(_, m)| m)
                                != Some(msg.clone())
                            {
                                warn!(workload = %name, error = %msg, "cannot replace; the running revision stays");
                            }
                        }
                    }
                }
                Action::Start(name) => self.start(name, now),
                Action::Relabel(name) => {
                    if let Some(w) = self.effective.iter().find(|w| w.name == name) {
                        self.sup.relabel(&name, version_of(w));
                    }
                }
            }
        }
        self.waiting.retain(|name, _| self.effective.iter().any(|w| &w.name == name));
    }

    /// Whether `w`'s image is in the store; if not, asks for it and records
    /// that the workload waits for it.
    fn image_ready(&mut self, w: &WorkloadSpec, now: u64) -> bool {
        let digest = Some(w.image_digest.as_str()).filter(|d| !d.is_empty());
        match self.images.resolve(&w.image, digest) {
            Ok(_) => true,
            Err(ImageError::NotFound(_)) => {
                if self.request_pull(&w.image, digest, now) {
                    self.waiting.insert(w.name.clone(), (Phase::Pulling, format!("pulling {}", w.image)));
                } else if self.puller.is_none() {
                    let why =
                        format!("image {} is not in the local store; load it with `baton-agent image load`", w.image);
                    self.waiting.insert(w.name.clone(), (Phase::Pending, why));
                }
                false
            }
            // Anything else (a broken record) is the start's to report.
            Err(_) => true,
        }
    }

    /// The container spec of `w` on this device (image config, services) and its rootfs.
    fn spec_for(&self, w: &WorkloadSpec) -> Result<(ContainerSpec, crate::runtime::rootfs::Rootfs), ImageError> {
        let digest = Some(w.image_digest.as_str()).filter(|d| !d.is_empty());
        let image = self.images.resolve(&w.image, digest)?;
        let rootfs = self.images.rootfs(&image)?;
        let mut spec = container_spec(w, &image.config);
        // Who it runs as: the manifest's user (a name is the image's), else the image's USER.
        let named = match (&spec.user_name, &spec.user) {
            (Some(name), _) => Some((name.clone(), "user")),
            (None, None) => image.config.config.user.clone().filter(|u| !u.is_empty()).map(|u| (u, "the image's USER")),
            (None, Some(_)) => None,
        };
        if let Some((user, whose)) = named {
            let read = |f: &str| rootfs.lookup(f).and_then(|p| std::fs::read_to_string(p).ok());
            let u = crate::image::user::resolve(&user, read("etc/passwd").as_deref(), read("etc/group").as_deref())
                .map_err(|e| ImageError::Invalid(format!("{whose} {user:?}: {e}")))?;
            spec.user = Some(baton_protocol::spec::User { uid: u.uid, gid: u.gid });
        }
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

    fn start(&mut self, name: String, now: u64) {
        let Some(w) = self.effective.iter().find(|w| w.name == name).cloned() else { return };
        let digest = Some(w.image_digest.as_str()).filter(|d| !d.is_empty());
        match self.spec_for(&w) {
            Ok((spec, rootfs)) => {
                self.waiting.remove(&name);
                self.sup.ensure(&name, version_of(&w), spec, rootfs, now);
            }
            Err(ImageError::NotFound(_)) => {
                if self.request_pull(&w.image, digest, now) {
                    self.waiting.insert(name, (Phase::Pulling, format!("pulling {}", w.image)));
                } else if self.puller.is_none() {
                    let why =
                        format!("image {} is not in the local store; load it with `baton-agent image load`", w.image);
                    self.waiting.insert(name, (Phase::Pending, why));
                }
                // Otherwise: waiting to retry a failed pull; its error stays reported.
            }
            Err(e) => {
                let msg = e.to_string();
                if self.waiting.insert(name.clone(), (Phase::Failed, msg.clone())).map(|(_, m)| m) != Some(msg.clone())
                {
                    warn!(workload = %name, error = %msg, "cannot start");
                }
            }
        }
    }

    fn report(&self, mut workloads: Vec<WorkloadStatus>) -> Report {
        // An old revision still running while the new one waits (for its image): say why.
        for st in &mut workloads {
            let next = self.effective.iter().find(|w| w.name == st.name).map(|w| w.revision);
            if let (Some(rev), Some((_, reason))) = (next, self.waiting.get(&st.name)) {
                if rev != st.revision {
                    st.last_error = Some(format!("revision {rev}: {reason}"));
                }
            }
        }
        for (name, (phase, reason)) in &self.waiting {
            if workloads.iter().any(|w| &w.name == name) {
                continue;
            }
            let revision = self.effective.iter().find(|w| &w.name == name).map_or(0, |w| w.revision);
            workloads.push(WorkloadStatus {
                name: name.clone(),
                revision,
                phase: *phase,
                health: Health::Unknown,
                last_error: Some(reason.clone()),
                ..Default::default()
            });
        }
        workloads.sort_by(|a, b| a.name.cmp(&b.name));
        self.guard.annotate(&mut workloads);
        Report { generation: self.desired.generation, workloads, refused: None }
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
