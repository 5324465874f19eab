//! `baton-agent simulate`: one process standing in for many devices. Each
//! simulated device runs the real MQTT link (presence, Last Will, inventory,
//! heartbeats, desired documents, reports, commands) and the real engine —
//! the same `Engine::step` as a device: rollback guard, reconcile planner,
//! supervisor with its restart policy, probes and start-first replacements,
//! report composition. Only what is under the supervisor is fake
//! (`runtime::fake`): containers in memory (a start takes `start_ms`),
//! every image present, probes answered without I/O, and knobs that make
//! some images unhealthy or fail to start. Proven revisions stay in memory.
//! Agent upgrades are downloaded over the link and verified as on a device;
//! only the switch is pretended (the new version is reported, the old one
//! kept to go back to — in memory, so a restarted simulator runs its own
//! version again).
//! One thread steps every device every 100 ms; no thread per device.
//! Tests and benchmarks drive fleets with it; operators can try a rollout
//! strategy on a few hundred fake devices before a real one.

use std::path::PathBuf;
use std::sync::mpsc::{channel, Receiver, TryRecvError};
use std::sync::Arc;
use std::time::Duration;

use baton_protocol::{DeviceId, Report};

use crate::config::AgentConfig;
use crate::engine::{Engine, EngineHandle, Input, Options};
use crate::link::Link;
use crate::runtime::fake::{FakeImages, FakeProber, FakeRuntime, Knobs};
use crate::supervisor::Supervisor;

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
    /// Demand on workloads, shared by their running instances across the
    /// simulated fleet (see [`LoadWave`]).
    pub load: Vec<LoadWave>,
}

/// A workload's total demand over the run, in thousandths of a CPU: from
/// `steps[i].0` seconds into the run on, `steps[i].1` (0 before the first).
/// Each started instance in the simulated fleet gets an equal share, as
/// CPU use and as the load it says it has (in CPUs) — what a load balancer
/// in front of them would make of it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LoadWave {
    pub workload: String,
    pub steps: Vec<(u64, u64)>,
}

impl LoadWave {
    /// `NAME=SECS:MILLI,SECS:MILLI…`, e.g. `web=0:500,60:4000,180:500`.
    pub fn parse(text: &str) -> Result<Self, String> {
        let (workload, steps) =
            text.split_once('=').ok_or_else(|| format!("{text:?}: expected NAME=SECS:MILLICPU,…"))?;
        let mut parsed = Vec::new();
        for step in steps.split(',') {
            let (at, milli) = step.split_once(':').ok_or_else(|| format!("{step:?}: expected SECS:MILLICPU"))?;
            let at: u64 = at.trim().parse().map_err(|_| format!("{at:?}: not a number of seconds"))?;
            let milli: u64 = milli.trim().parse().map_err(|_| format!("{milli:?}: not a number of millicpus"))?;
            parsed.push((at, milli));
        }
        if !parsed.windows(2).all(|w| w[0].0 < w[1].0) {
            return Err(format!("{text:?}: the times must increase"));
        }
        Ok(Self { workload: workload.trim().into(), steps: parsed })
    }

    /// The total demand `secs` into the run.
    pub fn at(&self, secs: u64) -> u64 {
        self.steps.iter().take_while(|(at, _)| *at <= secs).last().map_or(0, |(_, m)| *m)
    }
}

#[derive(Debug, Clone, Copy)]
pub struct Offline {
    pub devices: usize,
    pub after: Duration,
    pub duration: Option<Duration>,
}

/// One simulated device: the real engine on a fake runtime and fake images.
struct SimDevice {
    inputs: Receiver<Input>,
    reports: tokio::sync::watch::Sender<Report>,
    runtime: FakeRuntime,
    engine: Engine<FakeRuntime, FakeImages>,
    /// The engine's load samples, which the link reads.
    loads: crate::load::LoadBoard,
}

impl SimDevice {
    /// A device that starts, as a real one does, from the document persisted
    /// in its data dir; its proven revisions stay in memory. Returns the
    /// link's end of its reports too.
    fn new(
        cfg: &SimConfig,
        index: usize,
        config: &AgentConfig,
        inputs: Receiver<Input>,
    ) -> (Self, tokio::sync::watch::Receiver<Report>) {
        let knobs = cfg.knob_devices.is_none_or(|n| index < n);
        let pick = |pattern: &Option<String>| pattern.clone().filter(|_| knobs);
        let runtime = FakeRuntime::new(Knobs {
            failing: pick(&cfg.failing_image),
            unhealthy: pick(&cfg.unhealthy_image),
            start_ms: cfg.start_ms,
        });
        // Sealed files open in memory as on a device (the fake writes nothing).
        let identity = crate::trust::load_or_create_identity(&config.data_dir)
            .map(|key| (config.device_id.as_str().to_owned(), Arc::new(key)))
            .map_err(|e| format!("device key unusable: {e}"));
        let sup =
            Supervisor::new(runtime.clone()).with_prober(Arc::new(FakeProber(runtime.clone()))).with_identity(identity);
        let images = FakeImages { unhealthy: pick(&cfg.unhealthy_image) };
        let initial = crate::engine::load_desired(&config.data_dir).unwrap_or_default();
        let generation = initial.generation;
        let loads = crate::load::LoadBoard::default();
        let options = Options { image_budget: u64::MAX, proven_path: None, services_dir: None, loads: loads.clone() };
        let engine = Engine::new(sup, images, initial, Vec::new(), options);
        let (reports, rx) = tokio::sync::watch::channel(Report { generation, ..Default::default() });
        (Self { inputs, reports, runtime, engine, loads }, rx)
    }

    /// Takes the device's inputs and runs one engine step; false once its link is gone.
    fn step(&mut self, now: u64) -> bool {
        loop {
            match self.inputs.try_recv() {
                Ok(input) => self.engine.input(input),
                Err(TryRecvError::Empty) => break,
                Err(TryRecvError::Disconnected) => return false,
            }
        }
        self.runtime.set_now(now);
        match self.engine.step(now) {
            Some(report) => self.reports.send(report).is_ok(),
            None => true,
        }
    }
}

/// One device's MQTT session, with an outage when the knobs ask for one.
async fn device_link(
    config: AgentConfig,
    tx: std::sync::mpsc::Sender<Input>,
    reports: tokio::sync::watch::Receiver<Report>,
    loads: crate::load::LoadBoard,
    offline: Option<Offline>,
    mut stop: tokio::sync::watch::Receiver<bool>,
) {
    let handle = || EngineHandle { tx: tx.clone(), reports: reports.clone(), runtime: None, loads: loads.clone() };
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

/// Gives each started instance of a loaded workload its share of the
/// workload's demand now.
fn share_load(waves: &[LoadWave], secs: u64, devices: &[SimDevice]) {
    if waves.is_empty() {
        return;
    }
    let started: Vec<_> = devices.iter().map(|d| d.runtime.started()).collect();
    for w in waves {
        let instances: usize = started.iter().filter_map(|s| s.get(&w.workload)).sum();
        let share = w.at(secs) / instances.max(1) as u64;
        for d in devices {
            d.runtime.set_load(&w.workload, share);
        }
    }
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
        // A simulated device has no binary of its own to replace: it
        // downloads and checks a new agent for real, then pretends the switch.
        config.self_update = true;
        config.simulated_upgrades = true;
        if let Some((key, values)) = &cfg.label_cycle {
            config.labels.insert(key.clone(), values[index % values.len()].clone());
        }
        let (tx, inputs) = channel();
        let (device, reports) = SimDevice::new(&cfg, index, &config, inputs);
        let loads = device.loads.clone();
        devices.push(device);
        let offline = cfg.offline.filter(|o| index < o.devices);
        let stop = stop_rx.clone();
        links.spawn(device_link(config, tx, reports, loads, offline, stop));
        // Connect at a pace the broker takes without a thundering herd.
        if index % 50 == 49 {
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }
    tracing::info!(devices = cfg.devices, prefix = %cfg.prefix, "simulated fleet started");

    let waves = cfg.load.clone();
    let engine = std::thread::Builder::new().name("simulated-devices".into()).spawn(move || {
        let mut devices = devices;
        let began = std::time::Instant::now();
        loop {
            let now = crate::runtime::now_ms();
            share_load(&waves, began.elapsed().as_secs(), &devices);
            devices.retain_mut(|d| d.step(now));
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

#[cfg(test)]
mod tests {
    use super::LoadWave;

    #[test]
    fn load_waves_parse_and_step() {
        let w = LoadWave::parse("web=0:500,60:4000,180:500").unwrap();
        assert_eq!(w.workload, "web");
        assert_eq!([w.at(0), w.at(59), w.at(60), w.at(179), w.at(1000)], [500, 500, 4000, 4000, 500]);
        assert_eq!(LoadWave::parse("web=10:100").unwrap().at(5), 0);
        for bad in ["web", "web=10", "web=a:1", "web=1:x", "web=60:1,30:2"] {
            assert!(LoadWave::parse(bad).is_err(), "{bad}");
        }
    }
}
