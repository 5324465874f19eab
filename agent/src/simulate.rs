//! `baton-agent simulate`: one process standing in for many devices. Each
//! simulated device runs the real MQTT link (presence, Last Will, inventory,
//! heartbeats, desired documents, reports, commands), the real reconcile
//! planner and the real device-level rollback guard; only containers are
//! fake: a start takes `start_ms`, and knobs make some images unhealthy or
//! fail to start. Tests and benchmarks drive fleets with it; operators can
//! try a rollout strategy on a few hundred fake devices before a real one.

use std::collections::BTreeMap;
use std::path::PathBuf;
use std::sync::mpsc::{channel, Receiver, TryRecvError};
use std::time::Duration;

use baton_protocol::{Desired, DeviceId, Health, Phase, Report, WorkloadStatus};

use crate::config::AgentConfig;
use crate::engine::{EngineHandle, Input};
use crate::link::Link;
use crate::reconcile::{plan, Action, Observed};
use crate::rollback::Guard;

#[derive(Debug, Clone)]
pub struct SimConfig {
    /// Settings every device shares (broker, intervals, labels).
    pub base: AgentConfig,
    pub devices: usize,
    /// Device ids are `{prefix}-{n:04}`.
    pub prefix: String,
    /// Each device's persisted state lives in `data_dir/{id}`.
    pub data_dir: PathBuf,
    /// `(key, values)`: device n gets `key = values[n % len]`.
    pub label_cycle: Option<(String, Vec<String>)>,
    /// Workloads whose image contains this run but never become healthy.
    pub unhealthy_image: Option<String>,
    /// Workloads whose image contains this fail to start.
    pub failing_image: Option<String>,
    /// Only devices whose index is below this apply the knobs above (all by default).
    pub knob_devices: Option<usize>,
    /// How long a simulated container takes to start.
    pub start_ms: u64,
    /// The first `devices` go offline (a clean goodbye) `after` into the run,
    /// for `duration` (None: until the end), then reconnect.
    pub offline: Option<Offline>,
}

#[derive(Debug, Clone, Copy)]
pub struct Offline {
    pub devices: usize,
    pub after: Duration,
    pub duration: Option<Duration>,
}

struct Unit {
    revision: u64,
    fingerprint: String,
    image: String,
    started_ms: u64,
    restarts: u32,
}

struct SimDevice {
    index: usize,
    inputs: Receiver<Input>,
    reports: tokio::sync::watch::Sender<Report>,
    desired: Desired,
    guard: Guard,
    units: BTreeMap<String, Unit>,
    last: Option<Report>,
}

impl SimDevice {
    fn tick(&mut self, cfg: &SimConfig, now: u64) -> bool {
        loop {
            match self.inputs.try_recv() {
                Ok(Input::Desired(d)) => self.desired = d,
                Ok(Input::Restart(name, done)) => {
                    let unit = self.units.get_mut(&name);
                    let found = unit.is_some();
                    if let Some(u) = unit {
                        u.started_ms = now;
                        u.restarts += 1;
                    }
                    let _ = done.send(found);
                }
                Err(TryRecvError::Empty) => break,
                Err(TryRecvError::Disconnected) => return false,
            }
        }
        let effective = self.guard.effective(&self.desired.workloads);
        let observed: Vec<Observed> = self
            .units
            .iter()
            .map(|(name, u)| Observed {
                name: name.clone(),
                revision: u.revision,
                fingerprint: u.fingerprint.clone(),
                stopping: false,
            })
            .collect();
        for action in plan(&effective, &observed) {
            match action {
                // Fake containers free nothing: a replacement is a stop then a start.
                Action::Stop(name) | Action::Replace(name) => {
                    self.units.remove(&name);
                }
                Action::Start(name) => {
                    if let Some(w) = effective.iter().find(|w| w.name == name) {
                        let unit = Unit {
                            revision: w.revision,
                            fingerprint: crate::reconcile::fingerprint(w),
                            image: w.image.clone(),
                            started_ms: now,
                            restarts: 0,
                        };
                        self.units.insert(name, unit);
                    }
                }
                Action::Relabel(name) => {
                    if let (Some(u), Some(w)) = (self.units.get_mut(&name), effective.iter().find(|w| w.name == name)) {
                        u.revision = w.revision;
                    }
                }
            }
        }
        let knobs = cfg.knob_devices.is_none_or(|n| self.index < n);
        let matches =
            |pattern: &Option<String>, image: &str| knobs && pattern.as_ref().is_some_and(|p| image.contains(p));
        let mut workloads: Vec<WorkloadStatus> = self
            .units
            .iter()
            .map(|(name, u)| {
                let started = now.saturating_sub(u.started_ms) >= cfg.start_ms;
                let (phase, health, error) = if matches(&cfg.failing_image, &u.image) {
                    (Phase::Failed, Health::Unhealthy, Some("simulated start failure".to_string()))
                } else if !started {
                    (Phase::Starting, Health::Unknown, None)
                } else if matches(&cfg.unhealthy_image, &u.image) {
                    (Phase::Running, Health::Unhealthy, Some("simulated failing probe".to_string()))
                } else {
                    (Phase::Running, Health::Healthy, None)
                };
                WorkloadStatus {
                    name: name.clone(),
                    revision: u.revision,
                    phase,
                    health,
                    restarts: u.restarts,
                    last_error: error,
                    ..Default::default()
                }
            })
            .collect();
        self.guard.observe(&self.desired.workloads, &workloads, now);
        self.guard.annotate(&mut workloads);
        let report = Report { generation: self.desired.generation, workloads, refused: None };
        if self.last.as_ref() != Some(&report) {
            self.last = Some(report.clone());
            if self.reports.send(report).is_err() {
                return false;
            }
        }
        true
    }
}

/// One device's MQTT session, with an outage when the knobs ask for one.
async fn device_link(
    config: AgentConfig,
    tx: std::sync::mpsc::Sender<Input>,
    reports: tokio::sync::watch::Receiver<Report>,
    offline: Option<Offline>,
    mut stop: tokio::sync::watch::Receiver<bool>,
) {
    let handle = || EngineHandle { tx: tx.clone(), reports: reports.clone(), runtime: None };
    let Some(o) = offline else {
        let mut s = stop.clone();
        return Link::run(config, Some(handle()), async move {
            let _ = s.changed().await;
        })
        .await;
    };
    let mut s = stop.clone();
    Link::run(config.clone(), Some(handle()), async move {
        tokio::select! {
            _ = s.changed() => {}
            () = tokio::time::sleep(o.after) => {}
        }
    })
    .await;
    if *stop.borrow() {
        return;
    }
    tracing::info!(device = %config.device_id, "simulated outage");
    match o.duration {
        Some(d) => tokio::select! {
            _ = stop.changed() => return,
            () = tokio::time::sleep(d) => {}
        },
        None => {
            let _ = stop.changed().await;
            return;
        }
    }
    Link::run(config, Some(handle()), async move {
        let _ = stop.changed().await;
    })
    .await;
}

/// Runs the simulated fleet until `shutdown` resolves.
pub async fn run(cfg: SimConfig, shutdown: impl std::future::Future<Output = ()>) -> std::io::Result<()> {
    let mut devices = Vec::with_capacity(cfg.devices);
    let mut links = tokio::task::JoinSet::new();
    let (stop_tx, stop_rx) = tokio::sync::watch::channel(false);
    for index in 0..cfg.devices {
        let id = format!("{}-{index:04}", cfg.prefix);
        let device_id =
            DeviceId::new(id.clone()).map_err(|e| std::io::Error::other(format!("device id {id:?}: {e}")))?;
        let mut config = cfg.base.clone();
        config.data_dir = cfg.data_dir.join(&id);
        config.device_id = device_id;
        if let Some((key, values)) = &cfg.label_cycle {
            config.labels.insert(key.clone(), values[index % values.len()].clone());
        }
        let initial = crate::engine::load_desired(&config.data_dir).unwrap_or_default();
        let (tx, inputs) = channel();
        let (reports_tx, reports) =
            tokio::sync::watch::channel(Report { generation: initial.generation, ..Default::default() });
        devices.push(SimDevice {
            index,
            inputs,
            reports: reports_tx,
            desired: initial,
            guard: Guard::default(),
            units: BTreeMap::new(),
            last: None,
        });
        let offline = cfg.offline.filter(|o| index < o.devices);
        let stop = stop_rx.clone();
        links.spawn(device_link(config, tx, reports, offline, stop));
        // Connect at a pace the broker takes without a thundering herd.
        if index % 50 == 49 {
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }
    tracing::info!(devices = cfg.devices, prefix = %cfg.prefix, "simulated fleet started");

    let sim_cfg = cfg.clone();
    let engine = std::thread::Builder::new().name("simulated-devices".into()).spawn(move || {
        let mut devices = devices;
        loop {
            let now = crate::runtime::now_ms();
            devices.retain_mut(|d| d.tick(&sim_cfg, now));
            if devices.is_empty() {
                return;
            }
            std::thread::sleep(Duration::from_millis(100));
        }
    })?;

    shutdown.await;
    let _ = stop_tx.send(true);
    while links.join_next().await.is_some() {}
    // The links are gone, and with them the input channels: the thread ends.
    let _ = engine.join();
    Ok(())
}
