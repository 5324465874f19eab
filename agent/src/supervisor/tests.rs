//! The supervisor's tests, on the shared fake runtime (`runtime::fake`).

use super::*;
use crate::probe::Outcome;
use crate::runtime::fake::FakeRuntime;
use baton_protocol::spec::RestartPolicy;

fn spec(policy: RestartPolicy) -> ContainerSpec {
    ContainerSpec { command: vec!["x".into()], restart: policy, ..Default::default() }
}

#[test]
fn restarts_with_backoff_keeping_one_previous_instance() {
    let fake = FakeRuntime::default();
    let mut sup = Supervisor::new(fake.clone());
    sup.ensure("web", 1, spec(RestartPolicy::Always), "/r".into(), 0);
    assert_eq!(fake.ids(), vec!["web-0"]);
    let mut now = 100;
    for (n, expected_delay) in [(0, 1000), (1, 2000), (2, 4000)] {
        fake.exit(&container_id("web", n), 1, now);
        sup.tick(now);
        assert_eq!(sup.status()[0].phase, Phase::BackingOff);
        sup.tick(now + expected_delay - 1);
        assert_eq!(fake.state(&container_id("web", n + 1)).unwrap(), ContainerState::Missing, "started early");
        now += expected_delay;
        sup.tick(now);
        assert!(matches!(fake.state(&container_id("web", n + 1)).unwrap(), ContainerState::Running(_)));
    }
    assert_eq!(fake.ids(), vec!["web-2", "web-3"]);
    let st = &sup.status()[0];
    assert_eq!((st.restarts, st.phase, st.last_exit_code), (3, Phase::Running, Some(1)));
}

/// Symptom: a crash-looping container backed off 1, 2, 4… s, and every
/// agent restart (an upgrade, a power cut) started it over from 1 s.
#[test]
fn an_agent_restarted_under_a_crash_loop_keeps_backing_off_where_it_was() {
    let fake = FakeRuntime::default();
    let mut now = 100;
    {
        let mut sup = Supervisor::new(fake.clone());
        sup.ensure("web", 1, spec(RestartPolicy::Always), "/r".into(), 0);
        for (n, delay) in [(0, 1000), (1, 2000), (2, 4000)] {
            fake.exit(&container_id("web", n), 1, now);
            sup.tick(now);
            now += delay;
            sup.tick(now);
        }
        assert!(matches!(fake.state("web-3").unwrap(), ContainerState::Running(_)));
    } // the agent dies; web-3 exits too while it is away
    fake.exit("web-3", 1, now + 10);
    now += 20;
    let mut sup = Supervisor::new(fake.clone());
    sup.ensure("web", 1, spec(RestartPolicy::Always), "/r".into(), now);
    // The fourth failure in a row: 8 s, not the first step's 1 s.
    sup.tick(now + 7_999);
    assert_eq!(fake.state("web-4").unwrap(), ContainerState::Missing, "the back-off started over");
    sup.tick(now + 8_000);
    assert!(matches!(fake.state("web-4").unwrap(), ContainerState::Running(_)));
    assert_eq!(sup.status()[0].restarts, 4);
}

#[test]
fn on_failure_and_never_policies_stop_when_satisfied() {
    let fake = FakeRuntime::default();
    let mut sup = Supervisor::new(fake.clone());
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
    let fake = FakeRuntime::default();
    fake.refuse(Some("devices[0]: /dev/ttyUSB0 does not exist".into()));
    let mut sup = Supervisor::new(fake.clone());
    sup.ensure("serial", 1, spec(RestartPolicy::Always), "/r".into(), 0);
    let st = &sup.status()[0];
    assert_eq!(st.phase, Phase::Failed);
    assert!(st.last_error.as_deref().unwrap_or("").contains("ttyUSB0"));
    for t in [1_000, 3_000, 7_000, 1_000_000] {
        sup.tick(t);
    }
    assert!(fake.ids().is_empty());
    fake.refuse(None); // the device was plugged in
    sup.tick(10_000_000);
    assert_eq!(sup.status()[0].phase, Phase::Running);
}

#[test]
fn readopts_running_containers_and_resumes_exited_ones() {
    let fake = FakeRuntime::default();
    {
        let mut sup = Supervisor::new(fake.clone());
        sup.ensure("web", 1, spec(RestartPolicy::Always), "/r".into(), 0);
        fake.exit("web-0", 1, 10);
        sup.tick(10);
        sup.tick(2_000);
        sup.ensure("db", 1, spec(RestartPolicy::Always), "/r".into(), 0);
    } // the agent dies
    fake.exit("db-0", 3, 5_000);
    let before = fake.ids();
    let mut sup = Supervisor::new(fake.clone());
    sup.ensure("web", 1, spec(RestartPolicy::Always), "/r".into(), 6_000);
    assert_eq!(fake.ids(), before, "re-adoption touched a running container");
    let web = sup.status().into_iter().find(|s| s.name == "web").unwrap();
    assert_eq!((web.phase, web.restarts), (Phase::Running, 1));
    sup.ensure("db", 1, spec(RestartPolicy::Always), "/r".into(), 6_000);
    let db = sup.status().into_iter().find(|s| s.name == "db").unwrap();
    assert_eq!((db.phase, db.last_exit_code), (Phase::BackingOff, Some(3)));
    sup.tick(7_000);
    assert!(matches!(fake.state("db-1").unwrap(), ContainerState::Running(_)));
}

#[test]
fn operator_restart_overrides_the_policy_once() {
    let fake = FakeRuntime::default();
    let mut sup = Supervisor::new(fake.clone());
    sup.ensure("once", 1, spec(RestartPolicy::Never), "/r".into(), 0);
    assert!(sup.restart_now("once"));
    sup.tick(10);
    sup.tick(20);
    assert!(matches!(fake.state("once-1").unwrap(), ContainerState::Running(_)));
    fake.exit("once-1", 0, 30);
    sup.tick(30);
    sup.tick(1_000_000);
    assert_eq!(fake.state("once-2").unwrap(), ContainerState::Missing, "policy never: no second restart");
    assert!(sup.restart_now("once"));
    sup.tick(1_000_001);
    assert!(matches!(fake.state("once-2").unwrap(), ContainerState::Running(_)));
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
    sup: &mut Supervisor<FakeRuntime>,
    mut now: u64,
    step_ms: u64,
    done: impl Fn(&Supervisor<FakeRuntime>) -> bool,
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
    let fake = FakeRuntime::default();
    let scripted = Arc::new(Scripted(std::sync::Mutex::new(Outcome::Success)));
    let mut sup = Supervisor::new(fake.clone()).with_prober(scripted.clone());
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
    let now = tick_until(&mut sup, now, 100, |_| matches!(fake.state("web-0").unwrap(), ContainerState::Exited(_)));
    let st = &sup.status()[0];
    assert!(st.last_error.as_deref().unwrap_or("").contains("liveness probe failed: connection refused"), "{st:?}");
    tick_until(&mut sup, now, 100, |_| matches!(fake.state("web-1").unwrap(), ContainerState::Running(_)));
}

#[test]
fn a_failing_readiness_probe_says_why_and_restarts_nothing() {
    use baton_protocol::spec::{Probe, ProbeCheck};
    let fake = FakeRuntime::default();
    let scripted = Arc::new(Scripted(std::sync::Mutex::new(Outcome::Failure("exit status 1".into()))));
    let mut sup = Supervisor::new(fake.clone()).with_prober(scripted.clone());
    let mut s = spec(RestartPolicy::Always);
    s.readiness = Some(Probe {
        check: ProbeCheck::Exec(vec!["/bin/check".into()]),
        interval_s: 1,
        timeout_s: 1,
        failure_threshold: 2,
        initial_delay_s: 0,
    });
    sup.ensure("web", 1, s, "/r".into(), 0);
    tick_until(&mut sup, 0, 100, |s| s.status()[0].health == Health::Unhealthy);
    let st = &sup.status()[0];
    assert_eq!(st.last_error.as_deref(), Some("readiness probe failing: exit status 1"), "{st:?}");
    assert_eq!((st.restarts, st.phase), (0, Phase::Running), "readiness never restarts");
}

#[test]
fn start_first_replacement_keeps_the_old_revision_until_the_new_one_is_ready() {
    use baton_protocol::spec::{Probe, ProbeCheck};
    let running = |fake: &FakeRuntime, id: &str| matches!(fake.state(id).unwrap(), ContainerState::Running(_));
    let fake = FakeRuntime::default();
    let scripted = Arc::new(Scripted(std::sync::Mutex::new(Outcome::Failure("not yet".into()))));
    let mut sup = Supervisor::new(fake.clone()).with_prober(scripted.clone());
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
    let fake = FakeRuntime::default();
    let mut sup = Supervisor::new(fake.clone());
    sup.ensure("web", 1, spec(RestartPolicy::Always), "/r1".into(), 0);
    let mut v2 = spec(RestartPolicy::Always);
    v2.command = vec!["v2".into()];
    sup.replace("web", 2, v2, "/r2".into(), 10);
    fake.exit("web-1", 1, 20); // the new revision crashes
    sup.tick(20);
    sup.replace("web", 1, spec(RestartPolicy::Always), "/r1".into(), 30);
    assert_eq!(sup.observed()[0].revision, 1);
    assert!(matches!(fake.state("web-0").unwrap(), ContainerState::Running(_)), "the old container was restarted");
    assert_eq!(sup.current_container("web").as_deref(), Some("web-0"));
    sup.tick(40);
    assert_eq!(fake.ids(), vec!["web-0"], "a third container was started, or the dropped one kept");
}

#[test]
fn an_agent_restart_mid_replacement_stops_the_older_instance() {
    let fake = FakeRuntime::default();
    let mut sup = Supervisor::new(fake.clone());
    sup.ensure("web", 1, spec(RestartPolicy::Always), "/r1".into(), 0);
    sup.replace("web", 2, spec(RestartPolicy::Always), "/r2".into(), 10);
    drop(sup);
    // A new agent adopts the newest instance and stops the one it replaced.
    let mut sup = Supervisor::new(fake.clone());
    sup.ensure("web", 2, spec(RestartPolicy::Always), "/r2".into(), 20);
    assert!(matches!(fake.state("web-1").unwrap(), ContainerState::Running(_)));
    assert!(matches!(fake.state("web-0").unwrap(), ContainerState::Exited(_)));
}

fn version(revision: u64, fingerprint: &str) -> Version {
    Version { revision, fingerprint: fingerprint.into() }
}

#[test]
fn a_readopted_container_of_another_spec_is_reported_as_what_it_runs() {
    let fake = FakeRuntime::default();
    let mut sup = Supervisor::new(fake.clone());
    sup.ensure("web", version(2, "spec-two"), spec(RestartPolicy::Always), "/r2".into(), 0);
    fake.exit("web-0", 1, 10);
    sup.tick(10);
    sup.tick(2_000);
    assert_eq!(sup.status()[0].restarts, 1);
    drop(sup); // the agent dies; revision 3 is applied meanwhile
    let mut sup = Supervisor::new(fake.clone());
    sup.ensure("web", version(3, "spec-three"), spec(RestartPolicy::Always), "/r3".into(), 5_000);
    assert!(matches!(fake.state("web-1").unwrap(), ContainerState::Running(_)), "restarted on adoption");
    let observed = &sup.observed()[0];
    assert_eq!((observed.revision, observed.fingerprint.as_str()), (2, "spec-two"), "labelled as desired");
    assert_eq!(sup.status()[0].revision, 2);
    // What reconcile then asks for: the new spec replaces it, with its own restart count.
    sup.replace("web", version(3, "spec-three"), spec(RestartPolicy::Always), "/r3".into(), 6_000);
    assert_eq!((sup.status()[0].revision, sup.status()[0].restarts), (3, 0));
    assert_eq!(
        fake.provenance("web-2").unwrap(),
        Provenance { revision: 3, fingerprint: "spec-three".into(), restarts: 0, failures: 0 }
    );

    // The same spec adopted again keeps its restart count and is left alone.
    drop(sup);
    let mut sup = Supervisor::new(fake.clone());
    sup.ensure("web", version(3, "spec-three"), spec(RestartPolicy::Always), "/r3".into(), 7_000);
    assert_eq!(sup.current_container("web").as_deref(), Some("web-2"));
    assert_eq!((sup.observed()[0].revision, sup.status()[0].restarts), (3, 0));
}

#[test]
fn replacements_are_not_restarts_and_old_errors_clear_once_healthy() {
    let fake = FakeRuntime::default();
    let mut sup = Supervisor::new(fake.clone());
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
    let fake = FakeRuntime::default();
    let mut sup = Supervisor::new(fake.clone());
    sup.ensure("web", 1, spec(RestartPolicy::Always), "/r".into(), 0);
    sup.remove("web");
    sup.tick(1);
    assert!(fake.ids().is_empty());
    assert!(!sup.is_supervising("web"));
}

/// A runtime whose starts each wait (up to 3 s) for the rest of their
/// group of `gate` to arrive: made one after another, they would time out.
struct Gated {
    inner: FakeRuntime,
    gate: usize,
    arrived: std::sync::Mutex<usize>,
    moved: std::sync::Condvar,
}

impl ContainerRuntime for Gated {
    fn create(&self, req: &CreateRequest<'_>) -> Result<(), RuntimeError> {
        let mut arrived = self.arrived.lock().expect("lock");
        *arrived += 1;
        let group_full = (*arrived).div_ceil(self.gate) * self.gate;
        self.moved.notify_all();
        let (arrived, waited) = self
            .moved
            .wait_timeout_while(arrived, std::time::Duration::from_secs(3), |n| *n < group_full)
            .expect("lock");
        drop(arrived);
        if waited.timed_out() {
            return Err(RuntimeError::Start { id: req.id.into(), reason: "started alone".into() });
        }
        self.inner.create(req)
    }
    fn starts_at_once(&self) -> usize {
        self.gate
    }
    fn state(&self, id: &str) -> Result<ContainerState, RuntimeError> {
        self.inner.state(id)
    }
    fn stop(&self, id: &str) -> Result<(), RuntimeError> {
        self.inner.stop(id)
    }
    fn kill(&self, id: &str) -> Result<(), RuntimeError> {
        self.inner.kill(id)
    }
    fn remove(&self, id: &str) -> Result<(), RuntimeError> {
        self.inner.remove(id)
    }
    fn list(&self) -> Result<Vec<String>, RuntimeError> {
        self.inner.list()
    }
    fn provenance(&self, id: &str) -> Option<Provenance> {
        self.inner.provenance(id)
    }
    fn usage(&self, id: &str) -> Option<crate::runtime::Usage> {
        self.inner.usage(id)
    }
    fn exec(
        &self,
        id: &str,
        argv: &[String],
        timeout: std::time::Duration,
    ) -> Result<crate::runtime::ExecOutput, RuntimeError> {
        self.inner.exec(id, argv, timeout)
    }
}

#[test]
fn a_batch_starts_its_containers_side_by_side() {
    let fake = FakeRuntime::default();
    let gated = Gated { inner: fake.clone(), gate: 4, arrived: Default::default(), moved: Default::default() };
    let mut sup = Supervisor::new(gated);
    sup.begin_batch();
    for name in ["a", "b", "c", "d", "e", "f", "g", "h"] {
        sup.ensure(name, 1, spec(RestartPolicy::Always), "/r".into(), 0);
    }
    assert!(fake.ids().is_empty(), "nothing starts before the batch ends");
    sup.end_batch(0);
    // Two groups of four, each four at once: none started alone.
    let status = sup.status();
    assert!(status.iter().all(|w| w.last_error.is_none()), "{status:?}");
    assert_eq!(fake.ids().len(), 8, "{:?}", fake.ids());
    // The batch is closed: the next due start is made at once (and, alone, times out here).
    sup.ensure("late", 1, spec(RestartPolicy::Always), "/r".into(), 0);
    let late = sup.status().into_iter().find(|w| w.name == "late").expect("late");
    assert!(late.last_error.is_some_and(|e| e.contains("started alone")));
}
