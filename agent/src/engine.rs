//! The workloads engine: one std thread that owns the supervisor. It takes
//! desired documents from the link, reconciles, ticks the supervisor, and
//! hands back a `Report` whenever observed state changes. A thread, not a
//! tokio task: runtime calls block (they launch shims and read files), and
//! keeping them off the runtime keeps the MQTT session responsive.

use std::collections::BTreeMap;
use std::path::PathBuf;
use std::sync::mpsc::{channel, RecvTimeoutError, Sender};
use std::time::Duration;

use baton_protocol::{Desired, Health, Phase, Report, WorkloadStatus};
use tracing::{info, warn};

use crate::image::ImageStore;
use crate::reconcile::{container_spec, plan, Action};
use crate::runtime::{now_ms, ContainerRuntime};
use crate::supervisor::Supervisor;

const TICK: Duration = Duration::from_millis(500);

pub enum Input {
    Desired(Desired),
    Restart(String),
}

/// The link's side of the engine.
pub struct EngineHandle {
    pub tx: Sender<Input>,
    pub reports: tokio::sync::watch::Receiver<Report>,
    /// For operators' `exec` (run off the engine thread, which must keep ticking).
    pub runtime: Option<std::sync::Arc<dyn ContainerRuntime + Send + Sync>>,
}

struct Engine<R: ContainerRuntime> {
    sup: Supervisor<R>,
    images: ImageStore,
    desired: Desired,
    /// Workloads that cannot start because their image is not available.
    image_errors: BTreeMap<String, String>,
}

/// Starts the engine with `initial` (the persisted document: offline first).
pub fn spawn<R: ContainerRuntime + Send + 'static>(
    sup: Supervisor<R>,
    images: ImageStore,
    initial: Desired,
) -> std::io::Result<EngineHandle> {
    let (tx, rx) = channel();
    let (report_tx, reports) =
        tokio::sync::watch::channel(Report { generation: initial.generation, ..Default::default() });
    let mut engine = Engine { sup, images, desired: initial, image_errors: BTreeMap::new() };
    std::thread::Builder::new().name("workloads".into()).spawn(move || {
        let mut last = None;
        loop {
            match rx.recv_timeout(TICK) {
                Ok(Input::Desired(d)) => {
                    info!(generation = d.generation, workloads = d.workloads.len(), "applying desired document");
                    engine.desired = d;
                }
                Ok(Input::Restart(name)) => {
                    engine.sup.restart_now(&name);
                }
                Err(RecvTimeoutError::Timeout) => {}
                // The agent is shutting down; the containers carry on without us.
                Err(RecvTimeoutError::Disconnected) => return,
            }
            let now = now_ms();
            engine.reconcile(now);
            engine.sup.tick(now);
            let report = engine.report();
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

impl<R: ContainerRuntime> Engine<R> {
    fn reconcile(&mut self, now: u64) {
        for action in plan(&self.desired.workloads, &self.sup.observed()) {
            match action {
                Action::Stop(name) => {
                    info!(workload = %name, "stopping");
                    self.sup.remove(&name);
                }
                Action::Start(name) => {
                    let Some(w) = self.desired.workloads.iter().find(|w| w.name == name) else { continue };
                    let digest = Some(w.image_digest.as_str()).filter(|d| !d.is_empty());
                    let resolved = self
                        .images
                        .resolve(&w.image, digest)
                        .and_then(|img| self.images.rootfs(&img).map(|r| (img, r)));
                    match resolved {
                        Ok((image, rootfs)) => {
                            self.image_errors.remove(&name);
                            self.sup.ensure(&name, w.revision, container_spec(w, &image.config), rootfs, now);
                        }
                        Err(e) => {
                            let msg = format!(
                                "{e} (registry pulls are not implemented yet: load it with `baton-agent image load`)"
                            );
                            if self.image_errors.insert(name.clone(), msg.clone()).as_ref() != Some(&msg) {
                                warn!(workload = %name, error = %msg, "cannot start");
                            }
                        }
                    }
                }
            }
        }
        self.image_errors.retain(|name, _| self.desired.workloads.iter().any(|w| &w.name == name));
    }

    fn report(&self) -> Report {
        let mut workloads = self.sup.status();
        for (name, error) in &self.image_errors {
            if workloads.iter().any(|w| &w.name == name) {
                continue;
            }
            let revision = self.desired.workloads.iter().find(|w| &w.name == name).map_or(0, |w| w.revision);
            workloads.push(WorkloadStatus {
                name: name.clone(),
                revision,
                phase: Phase::Pending,
                health: Health::Unknown,
                last_error: Some(error.clone()),
                ..Default::default()
            });
        }
        workloads.sort_by(|a, b| a.name.cmp(&b.name));
        Report { generation: self.desired.generation, workloads, refused: None }
    }
}

/// Where the last applied desired document is kept (flash, written only when it changes).
pub fn desired_path(data_dir: &std::path::Path) -> PathBuf {
    data_dir.join("state").join("desired.bin")
}

/// The persisted document, if there is a readable one.
pub fn load_desired(data_dir: &std::path::Path) -> Option<Desired> {
    let bytes = std::fs::read(desired_path(data_dir)).ok()?;
    match baton_protocol::decode(&bytes) {
        Ok((_, baton_protocol::Message::Desired(d))) => Some(d),
        Ok(_) | Err(_) => {
            warn!("persisted desired document is unreadable; starting with none");
            None
        }
    }
}
