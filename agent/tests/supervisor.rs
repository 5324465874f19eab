//! The supervisor over real containers: crash loops restart with backoff and
//! never give up; logs of the previous instance survive; a new supervisor
//! (a restarted agent) re-adopts without restarting.

mod common;

use std::time::Duration;

use baton_agent::runtime::{now_ms, ContainerRuntime, ContainerState};
use baton_agent::supervisor::Supervisor;
use baton_protocol::spec::RestartPolicy;
use baton_protocol::Phase;
use common::*;

#[test]
fn crash_loop_restarts_with_backoff_and_keeps_the_previous_log() {
    let fx = Fixture::new();
    let mut sup = Supervisor::new(fx.runtime());
    sup.backoff_base = Duration::from_millis(20);
    let name = cid("crashy");
    let mut spec = sh("echo started; exit 4");
    spec.restart = RestartPolicy::Always;
    spec.backoff_cap_s = 1;
    sup.ensure(&name, 1, spec, fx.rootfs.clone().into(), now_ms());
    wait_until("4 restarts", Duration::from_secs(30), || {
        sup.tick(now_ms());
        sup.status()[0].restarts >= 4
    });
    let st = &sup.status()[0];
    assert_eq!(st.last_exit_code, Some(4));
    assert!(matches!(st.phase, Phase::Running | Phase::BackingOff), "{st:?}");
    let current = st.restarts;
    let containers = sup.runtime().list().unwrap();
    // Only the current and the previous instance are kept.
    assert!(containers.len() <= 2, "{containers:?}");
    let previous = format!("{name}-{}", current - 1);
    assert!(fx.log(&previous).contains("stdout started"), "previous instance's log is gone");
    sup.remove(&name);
    wait_until("removal", Duration::from_secs(20), || {
        sup.tick(now_ms());
        !sup.is_supervising(&name)
    });
    assert!(sup.runtime().list().unwrap().is_empty());
}

#[test]
fn restarted_agent_readopts_a_running_workload_without_restarting_it() {
    let fx = Fixture::new();
    let name = cid("steady");
    let spec = sh("while true; do sleep 0.1; done");
    let pid = {
        let mut sup = Supervisor::new(fx.runtime());
        sup.ensure(&name, 1, spec.clone(), fx.rootfs.clone().into(), now_ms());
        match sup.runtime().state(&format!("{name}-0")).unwrap() {
            ContainerState::Running(r) => r.pid,
            other => panic!("{other:?}"),
        }
    };
    let mut sup = Supervisor::new(fx.runtime());
    sup.ensure(&name, 1, spec, fx.rootfs.clone().into(), now_ms());
    sup.tick(now_ms());
    let st = &sup.status()[0];
    assert_eq!((st.phase, st.restarts), (Phase::Running, 0));
    match sup.runtime().state(&format!("{name}-0")).unwrap() {
        ContainerState::Running(r) => assert_eq!(r.pid, pid, "a different process: it was restarted"),
        other => panic!("{other:?}"),
    }
    assert!(st.memory_bytes > 0, "usage not reported: {st:?}");
    sup.remove(&name);
    wait_until("removal", Duration::from_secs(20), || {
        sup.tick(now_ms());
        !sup.is_supervising(&name)
    });
}

fn probe(check: baton_protocol::spec::ProbeCheck) -> baton_protocol::spec::Probe {
    baton_protocol::spec::Probe { check, interval_s: 1, timeout_s: 2, failure_threshold: 1, initial_delay_s: 0 }
}

#[test]
fn failing_exec_liveness_probe_restarts_the_container() {
    use baton_protocol::spec::ProbeCheck;
    let fx = Fixture::new();
    let rt = fx.runtime();
    let mut sup = Supervisor::new(rt.clone()).with_prober(std::sync::Arc::new(baton_agent::probe::RuntimeProber(rt)));
    let name = cid("liveness");
    // Alive for a moment, then the file the probe checks disappears.
    let mut spec = sh("touch /tmp/alive; sleep 1.5; rm /tmp/alive; while true; do sleep 0.1; done");
    spec.liveness = Some(probe(ProbeCheck::Exec(vec!["/bin/cat".into(), "/tmp/alive".into()])));
    sup.ensure(&name, 1, spec, fx.rootfs.clone().into(), now_ms());
    wait_until("a restart after the liveness probe failed", Duration::from_secs(30), || {
        sup.tick(now_ms());
        sup.status()[0].restarts >= 1
    });
    let st = &sup.status()[0];
    assert!(st.last_error.as_deref().unwrap_or("").contains("liveness probe failed"), "{st:?}");
    sup.remove(&name);
    wait_until("removal", Duration::from_secs(20), || {
        sup.tick(now_ms());
        !sup.is_supervising(&name)
    });
}

#[test]
fn http_readiness_probe_reports_healthy_once_the_server_answers() {
    use baton_protocol::spec::ProbeCheck;
    use baton_protocol::Health;
    let fx = Fixture::new();
    let rt = fx.runtime();
    let mut sup = Supervisor::new(rt.clone()).with_prober(std::sync::Arc::new(baton_agent::probe::RuntimeProber(rt)));
    let port = std::net::TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap().port();
    let name = cid("ready");
    let mut spec =
        sh(&format!("sleep 0.5; mkdir -p /tmp/www && echo ok > /tmp/www/index.html && exec httpd -f -p 127.0.0.1:{port} -h /tmp/www"));
    spec.readiness = Some(probe(ProbeCheck::Http { port, path: "/index.html".into() }));
    sup.ensure(&name, 1, spec, fx.rootfs.clone().into(), now_ms());
    wait_until("healthy", Duration::from_secs(30), || {
        sup.tick(now_ms());
        sup.status()[0].health == Health::Healthy
    });
    assert_eq!(sup.status()[0].restarts, 0, "readiness must never restart");
    sup.remove(&name);
    wait_until("removal", Duration::from_secs(20), || {
        sup.tick(now_ms());
        !sup.is_supervising(&name)
    });
}

/// The same on cgroup v2 with its controllers, as on Raspberry Pi OS:
/// restarts, re-adoption and probes (`common::vm`).
#[test]
fn in_a_cgroup_v2_vm_restarts_readoption_and_probes_work() {
    let Some(out) = vm::run_this_binary_in_a_cgroup_v2_vm(&["in_a_cgroup_v2_vm"]) else { return };
    assert!(out.contains("test result: ok. 4 passed"), "{out}");
}
