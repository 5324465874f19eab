//! Field faults, processes: agents and controllers killed at the worst
//! moments. Real processes and real containers (root; CI is root).
//! About 1 min.

use std::time::Duration;

use baton_tests::*;

const DEVICE: &str = "pi-p";

fn web(script: &str) -> String {
    format!("name: web\nimage: busybox:field\ncommand: [/bin/sh, -c, \"{script}\"]\nrollout: {{min_ready: 1}}\n")
}

/// Symptom: an agent killed, a new revision applied, the agent started again
/// re-adopted the still-running old container and labelled it with the new
/// revision (describe said 2, healthy; the container ran revision 1's command).
#[test]
fn an_agent_down_during_an_update_runs_the_new_revision_when_it_returns() {
    let world = World::new();
    let controller = Controller::start(&world, None, &[]);
    let server = controller.server_url();
    let data = world.path().join(format!("agent-{DEVICE}"));
    let run = world.path().join(format!("run-{DEVICE}"));
    give_busybox(&world, DEVICE, "busybox:field");
    let mut agent = start_agent(&world, DEVICE, &controller.broker_url(), &[]);

    apply_yaml(&server, &world, "web.yaml", &web("echo rev-one; while true; do sleep 0.2; done"));
    wait_for("revision 1 healthy", Duration::from_secs(30), || settled(&server, "web", 1, 1));
    let old = wait_for("revision 1's pid", Duration::from_secs(10), || running_pid(&run, "web-0"));

    agent.kill9();
    assert!(alive(old), "the container died with the agent");
    apply_yaml(&server, &world, "web.yaml", &web("echo rev-two; while true; do sleep 0.2; done"));
    wait_for("revision 2 asked of the device", Duration::from_secs(10), || {
        describe_workload(&server, "web")?.devices.iter().any(|d| d.desired_revision == 2).then_some(())
    });

    let _agent = start_agent(&world, DEVICE, &controller.broker_url(), &[]);
    let w = wait_for("revision 2 healthy", Duration::from_secs(40), || settled(&server, "web", 2, 1));
    wait_for("revision 1's container gone", Duration::from_secs(20), || (!alive(old)).then_some(()));
    wait_for("revision 2's command in the log", Duration::from_secs(10), || {
        container_logs(&data).contains("stdout rev-two").then_some(())
    });
    let reported = w.devices[0].reported.as_ref().expect("report");
    assert_eq!(reported.restarts, 0, "a replacement counted as a restart: {reported:?}");
    wait_for("the rollout to succeed", Duration::from_secs(20), || {
        let r = describe_workload(&server, "web")?.rollout?;
        (r.state == baton_controller::rollout::State::Succeeded && r.counts.ready == 1).then_some(())
    });
}
