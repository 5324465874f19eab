//! A device without containers, in memory: [`FakeRuntime`] (a create
//! "runs" at once and has started `start_ms` later; `stop` is an exit),
//! [`FakeProber`] (answers every probe without I/O) and [`FakeImages`]
//! (every image is present; nothing to unpack). The supervisor's tests and
//! `baton-agent simulate` use them; the simulator drives hundreds in one
//! process, so nothing here spawns a thread, reads a clock or touches a file.
//!
//! Knobs: images whose reference contains `failing` fail to start, and
//! those containing `unhealthy` run but fail every probe — their image
//! declares a readiness check (as a Docker image's HEALTHCHECK would), so
//! the supervisor judges them unhealthy the way it judges real containers.
//!
//! Load: [`FakeRuntime::set_load`] gives each started container of a
//! workload a share of CPU (its counter grows by it as `set_now` moves the
//! time) and the same share, in CPUs, as what it says in `/run/baton/load`.

use std::collections::{BTreeMap, BTreeSet};
use std::path::PathBuf;
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::Duration;

use baton_protocol::spec::{ContainerSpec, Probe, ProbeCheck, WorkloadSpec};

use super::rootfs::Rootfs;
use super::{
    ContainerRuntime, ContainerState, CreateRequest, ExecOutput, ExitStatus, Provenance, Running, RuntimeError, Usage,
};
use crate::image::source::ImageSource;
use crate::image::ImageError;
use crate::probe::{Outcome, Prober};
use crate::step::{PullOutcome, PullRequest};

/// What makes a fake device misbehave; all off by default.
#[derive(Debug, Clone, Default)]
pub struct Knobs {
    /// Containers of images whose reference contains this fail to start.
    pub failing: Option<String>,
    /// Containers of images whose reference contains this fail every probe.
    pub unhealthy: Option<String>,
    /// How long after its create a container counts as started.
    pub start_ms: u64,
}

fn matches(pattern: &Option<String>, image: &str) -> bool {
    pattern.as_ref().is_some_and(|p| image.contains(p.as_str()))
}

#[derive(Debug)]
struct Container {
    state: ContainerState,
    provenance: Provenance,
    created_ms: u64,
    unhealthy: bool,
    /// CPU used so far (cgroup counter).
    cpu_ns: u64,
}

#[derive(Debug, Default)]
struct State {
    containers: BTreeMap<String, Container>,
    /// Refuses every create with this reason (a device not plugged in…).
    refuse: Option<String>,
    /// The time as the fake's owner last said (`set_now`).
    now_ms: u64,
    /// Thousandths of a CPU each started container of a workload uses.
    load: BTreeMap<String, u64>,
}

/// Containers as a map, shared by its clones (the supervisor's, the prober's, a test's).
#[derive(Debug, Clone, Default)]
pub struct FakeRuntime {
    knobs: Arc<Knobs>,
    state: Arc<Mutex<State>>,
}

/// The image a fake container runs: [`FakeImages`] names its one layer after it.
fn workload_of(id: &str) -> Option<&str> {
    crate::supervisor::parse_container_id(id).map(|(name, _)| name)
}

fn image_of(rootfs: &Rootfs) -> String {
    rootfs.layers.first().map(|l| l.display().to_string()).unwrap_or_default()
}

impl FakeRuntime {
    pub fn new(knobs: Knobs) -> Self {
        Self { knobs: Arc::new(knobs), state: Arc::default() }
    }

    fn lock(&self) -> MutexGuard<'_, State> {
        // A test that panicked while holding it poisoned it; the map is still whole.
        self.state.lock().unwrap_or_else(std::sync::PoisonError::into_inner)
    }

    /// The time containers' starts are judged by (the fake reads no clock);
    /// started containers with a load use CPU for the time that passed.
    pub fn set_now(&self, now_ms: u64) {
        let mut s = self.lock();
        let passed = now_ms.saturating_sub(s.now_ms);
        let start_ms = self.knobs.start_ms;
        let State { containers, load, .. } = &mut *s;
        for (id, c) in containers.iter_mut() {
            let Some(milli) = workload_of(id).and_then(|w| load.get(w)) else { continue };
            if matches!(c.state, ContainerState::Running(_)) && now_ms >= c.created_ms + start_ms {
                // A thousandth of a CPU for a millisecond is a microsecond.
                c.cpu_ns = c.cpu_ns.saturating_add(milli * passed * 1000);
            }
        }
        s.now_ms = now_ms;
    }

    /// Each started container of `workload` uses `milli` thousandths of a
    /// CPU from now on, and says so as its load.
    pub fn set_load(&self, workload: &str, milli: u64) {
        self.lock().load.insert(workload.into(), milli);
    }

    /// Running (started) containers per workload.
    pub fn started(&self) -> BTreeMap<String, usize> {
        let s = self.lock();
        let mut out = BTreeMap::new();
        for (id, c) in &s.containers {
            if matches!(c.state, ContainerState::Running(_)) && s.now_ms >= c.created_ms + self.knobs.start_ms {
                if let Some(w) = workload_of(id) {
                    *out.entry(w.to_string()).or_default() += 1;
                }
            }
        }
        out
    }

    /// Makes a container exit as if its process ended with `code` at `at_ms`.
    pub fn exit(&self, id: &str, code: i32, at_ms: u64) {
        let mut s = self.lock();
        let exited = ContainerState::Exited(ExitStatus {
            code,
            signal: None,
            oom_killed: false,
            started_at_ms: at_ms.saturating_sub(10),
            finished_at_ms: at_ms,
        });
        match s.containers.get_mut(id) {
            Some(c) => c.state = exited,
            None => {
                let provenance = Provenance::default();
                s.containers.insert(
                    id.into(),
                    Container { state: exited, provenance, created_ms: 0, unhealthy: false, cpu_ns: 0 },
                );
            }
        }
    }

    /// Every create fails with `reason` (None: creates work again).
    pub fn refuse(&self, reason: Option<String>) {
        self.lock().refuse = reason;
    }

    pub fn ids(&self) -> Vec<String> {
        self.lock().containers.keys().cloned().collect()
    }
}

impl ContainerRuntime for FakeRuntime {
    fn create(&self, req: &CreateRequest<'_>) -> Result<(), RuntimeError> {
        let mut s = self.lock();
        let image = image_of(&req.rootfs);
        if let Some(reason) = s.refuse.clone() {
            return Err(RuntimeError::Start { id: req.id.into(), reason });
        }
        if matches(&self.knobs.failing, &image) {
            return Err(RuntimeError::Start { id: req.id.into(), reason: "simulated start failure".into() });
        }
        let created_ms = s.now_ms;
        let running = Running { pid: 1, shim_pid: 2, started_at_ms: created_ms + self.knobs.start_ms };
        let c = Container {
            state: ContainerState::Running(running),
            provenance: req.provenance.clone(),
            created_ms,
            unhealthy: matches(&self.knobs.unhealthy, &image),
            cpu_ns: 0,
        };
        s.containers.insert(req.id.into(), c);
        Ok(())
    }

    fn state(&self, id: &str) -> Result<ContainerState, RuntimeError> {
        let s = self.lock();
        Ok(match s.containers.get(id) {
            None => ContainerState::Missing,
            Some(c) => match &c.state {
                ContainerState::Running(_) if s.now_ms < c.created_ms + self.knobs.start_ms => ContainerState::Created,
                other => other.clone(),
            },
        })
    }

    fn stop(&self, id: &str) -> Result<(), RuntimeError> {
        let now = self.lock().now_ms;
        if matches!(self.state(id)?, ContainerState::Running(_) | ContainerState::Created) {
            self.exit(id, 143, now.max(10));
        }
        Ok(())
    }

    fn kill(&self, id: &str) -> Result<(), RuntimeError> {
        self.stop(id)
    }

    fn remove(&self, id: &str) -> Result<(), RuntimeError> {
        self.lock().containers.remove(id);
        Ok(())
    }

    fn list(&self) -> Result<Vec<String>, RuntimeError> {
        Ok(self.ids())
    }

    fn provenance(&self, id: &str) -> Option<Provenance> {
        self.lock().containers.get(id).map(|c| c.provenance.clone())
    }

    fn usage(&self, id: &str) -> Option<Usage> {
        let s = self.lock();
        let c = s.containers.get(id)?;
        // A small service's memory, and the CPU its load made it use.
        Some(Usage { cpu_ns: c.cpu_ns, memory_bytes: 16 << 20 })
    }

    fn signal(&self, id: &str, file: &str) -> Option<String> {
        let s = self.lock();
        let c = s.containers.get(id)?;
        let milli = s.load.get(workload_of(id)?)?;
        let started = matches!(c.state, ContainerState::Running(_)) && s.now_ms >= c.created_ms + self.knobs.start_ms;
        (file == crate::load::LOAD_FILE && started).then(|| format!("{}.{:03}", milli / 1000, milli % 1000))
    }

    fn root_of(&self, _: &str) -> Option<std::path::PathBuf> {
        None // a simulated container has no files
    }

    fn on_host_network(&self, _: &str) -> Option<bool> {
        None // nor a network
    }

    fn exec(&self, id: &str, _: &[String], _: Duration) -> Result<ExecOutput, RuntimeError> {
        Err(RuntimeError::Start { id: id.into(), reason: "a simulated container runs no commands".into() })
    }
}

/// Answers probes from the fake's knobs, at once and on the caller's thread:
/// every probe of an `unhealthy` container fails, every other one passes.
pub struct FakeProber(pub FakeRuntime);

impl Prober for FakeProber {
    fn probe(&self, container: &str, _: &ProbeCheck, _: Duration) -> Outcome {
        match self.0.lock().containers.get(container) {
            Some(c) if c.unhealthy => Outcome::Failure("simulated failing probe".into()),
            _ => Outcome::Success,
        }
    }

    fn inline(&self) -> bool {
        true
    }
}

/// Every image is present and takes no disk: its rootfs is one "layer"
/// named after the reference (what [`FakeRuntime`] reads its knobs from).
#[derive(Debug, Clone, Default)]
pub struct FakeImages {
    /// Images whose reference contains this declare a readiness check.
    pub unhealthy: Option<String>,
}

impl ImageSource for FakeImages {
    fn build(&self, w: &WorkloadSpec) -> Result<(ContainerSpec, Rootfs), ImageError> {
        let mut spec = crate::reconcile::container_spec(w, &Default::default());
        if matches(&self.unhealthy, &w.image) && spec.readiness.is_none() {
            spec.readiness = Some(Probe {
                check: ProbeCheck::Exec(vec!["simulated-health-check".into()]),
                interval_s: 1,
                timeout_s: 1,
                failure_threshold: 1,
                initial_delay_s: 0,
            });
        }
        Ok((spec, Rootfs { layers: vec![PathBuf::from(&w.image)] }))
    }

    fn can_pull(&self) -> bool {
        false
    }

    fn request_pull(&mut self, _: PullRequest) {}

    fn finished_pulls(&mut self) -> Vec<PullOutcome> {
        Vec::new()
    }

    fn gc(&mut self, _: &BTreeSet<String>, _: &BTreeSet<PathBuf>, _: u64) {}
}
