//! Fleet rollouts and scheduling against simulated fleets (`baton-agent
//! simulate`: the real MQTT link and the real engine step — reconcile,
//! supervisor, rollback guard — on a fake container runtime) and one real device: wave gating, the failure threshold and
//! automatic rollback, pause/resume/abort/undo, a controller restart in the
//! middle, replicas moved only after the grace period, device-level rollback
//! of real containers.

use std::time::Duration;

use baton_controller::rollout::State;
use baton_controller::view::{Event, RolloutView, WorkloadView};
use baton_tests::*;

fn rollout(server: &str, name: &str) -> RolloutView {
    let (ok, out, err) = baton_cli(server, &["rollout", "status", name, "-o", "json"]);
    assert!(ok, "{err}");
    serde_json::from_str(&out).expect("json")
}

fn web(image: &str) -> String {
    format!(
        "name: web\nimage: 127.0.0.1:9/web:{image}\nhealth_deadline: 3\nrollout: {{waves: [1, 10%, 50%], min_ready: 1}}\n"
    )
}

#[test]
fn waves_gate_on_health_and_a_failing_revision_rolls_the_fleet_back() {
    let world = World::new();
    let controller = Controller::start(&world, None, &[]);
    let server = controller.server_url();
    let n = 300;
    let _sim = start_simulator(&world, "sim", n, &controller.broker_url(), &["--unhealthy-image", "bad"]);
    wait_for("300 simulated devices", Duration::from_secs(60), || (controller.devices().len() == n).then_some(()));

    apply_yaml(&server, &world, "web.yaml", &web("1"));
    // A first revision has no rollout: `rollout status --watch` follows it onto the devices.
    let (ok, out, err) = baton_cli(&server, &["rollout", "status", "web", "--watch"]);
    assert!(
        ok && out.contains("no rollout yet") && out.contains("revision 1 · 300 of 300 devices running"),
        "{out}{err}"
    );
    wait_for("revision 1 everywhere", Duration::from_secs(60), || settled(&server, "web", 1, n));

    // Revision 2: watch every wave. A device is asked to run 2 only once its
    // wave is released, and a wave is released only when every device of the
    // waves before it proved the revision.
    let out = apply_yaml(&server, &world, "web.yaml", &web("2"));
    assert!(out.contains("workload/web updated (revision 2)"), "{out}");
    let mut waves_seen = Vec::new();
    let done = wait_for("rollout of revision 2", Duration::from_secs(90), || {
        let w = describe_workload(&server, "web")?;
        let r = w.rollout.clone()?;
        let asked: Vec<&str> =
            w.devices.iter().filter(|d| d.desired_revision == 2).map(|d| d.device.as_str()).collect();
        if r.state == State::Progressing {
            // Released devices are the first ones by id (all are online), exactly as many as released.
            let expected: Vec<String> = (0..r.counts.released).map(|i| format!("sim-{i:04}")).collect();
            assert_eq!(asked, expected, "devices outside the released waves were given revision 2");
            if waves_seen.last() != Some(&r.wave) {
                waves_seen.push(r.wave);
            }
        }
        (!r.state.active()).then_some(r)
    });
    assert_eq!(done.state, State::Succeeded, "{done:?}");
    assert_eq!(done.counts.ready, n);
    assert!(waves_seen.windows(2).all(|w| w[0] < w[1]), "waves out of order: {waves_seen:?}");
    assert!(waves_seen.len() >= 3, "saw too few waves to judge the gating: {waves_seen:?}");
    settled(&server, "web", 2, n).expect("revision 2 running everywhere");

    // Revision 3 never turns healthy: the first device rolls itself back
    // after its health deadline, which trips the threshold (10%), and the
    // controller sends every touched device back to revision 2.
    apply_yaml(&server, &world, "web.yaml", &web("bad3"));
    let r = wait_for("rollout of revision 3 to stop", Duration::from_secs(60), || {
        let r = rollout(&server, "web");
        (r.to == 3 && !r.state.active()).then_some(r)
    });
    assert_eq!(r.state, State::RolledBack, "{r:?}");
    assert_eq!(r.counts.released, 1, "the rollout went past the canary: {r:?}");
    assert!(r.failed.iter().any(|(_, why)| why.contains("rolled back to revision 2")), "{r:?}");
    let w = wait_for("revision 2 everywhere again", Duration::from_secs(30), || settled(&server, "web", 2, n));
    assert_eq!((w.revision, w.stable_revision), (3, 2));
    let (ok, out, _) = baton_cli(&server, &["get", "events", "-o", "json"]);
    let events: Vec<Event> = serde_json::from_str(&out).expect("events");
    assert!(ok && events.iter().any(|e| e.message.contains("rollout of revision 3 stopped")), "{events:?}");
    // `rollout status` exits non-zero for a rolled-back rollout, and says why.
    let (ok, out, _) = baton_cli(&server, &["rollout", "status", "web", "--watch"]);
    assert!(!ok && out.contains("rolled-back") && out.contains("threshold 10%"), "{out}");
}

#[test]
fn pause_resume_abort_undo_and_a_controller_restart_mid_rollout() {
    let world = World::new();
    let mut controller = Controller::start(&world, None, &[]);
    let server = controller.server_url();
    let n = 100;
    let _sim = start_simulator(&world, "fleet", n, &controller.broker_url(), &[]);
    wait_for("100 simulated devices", Duration::from_secs(60), || (controller.devices().len() == n).then_some(()));
    let spec =
        |tag: &str| format!("name: app\nimage: 127.0.0.1:9/app:{tag}\nrollout: {{waves: [1, 50%], min_ready: 1}}\n");
    apply_yaml(&server, &world, "app.yaml", &spec("1"));
    wait_for("revision 1", Duration::from_secs(60), || settled(&server, "app", 1, n));

    // Paused at the canary: it is judged, nothing more is released, and the
    // pause survives a controller restart.
    apply_yaml(&server, &world, "app.yaml", &spec("2"));
    let (ok, out, err) = baton_cli(&server, &["rollout", "pause", "app"]);
    assert!(ok && out.contains("paused"), "{out}{err}");
    wait_for("canary ready", Duration::from_secs(30), || (rollout(&server, "app").counts.ready == 1).then_some(()));
    controller.restart();
    let r = rollout(&server, "app");
    assert_eq!((r.state, r.counts.released), (State::Paused, 1), "{r:?}");
    // Held for a while (bounded observation of something that must not happen).
    for _ in 0..20 {
        assert_eq!(rollout(&server, "app").counts.released, 1, "a paused rollout released a wave");
        std::thread::sleep(Duration::from_millis(100));
    }
    let (ok, _, err) = baton_cli(&server, &["rollout", "resume", "app"]);
    assert!(ok, "{err}");
    // Restart again while it progresses: it carries on from the store.
    wait_for("wave 2", Duration::from_secs(30), || (rollout(&server, "app").wave >= 2).then_some(()));
    controller.restart();
    let r = wait_for("rollout of 2 done", Duration::from_secs(60), || {
        let r = rollout(&server, "app");
        (!r.state.active()).then_some(r)
    });
    assert_eq!(r.state, State::Succeeded, "{r:?}");
    settled(&server, "app", 2, n).expect("revision 2 everywhere");

    // Undo with no rollout running: a new revision with the previous spec.
    let (ok, out, err) = baton_cli(&server, &["rollout", "undo", "app"]);
    assert!(ok, "{out}{err}");
    wait_for("undo rolled out", Duration::from_secs(60), || {
        let r = rollout(&server, "app");
        (r.to == 3 && r.state == State::Succeeded).then_some(())
    });
    let w = settled(&server, "app", 3, n).expect("revision 3 everywhere");
    assert_eq!(w.image, "127.0.0.1:9/app:1", "undo did not restore revision 1's spec");

    // Abort in the middle: every device goes back to the stable revision.
    apply_yaml(&server, &world, "app.yaml", &spec("4"));
    wait_for("canary of 4", Duration::from_secs(30), || (rollout(&server, "app").counts.released >= 1).then_some(()));
    let (ok, out, err) = baton_cli(&server, &["rollout", "abort", "app"]);
    assert!(ok && out.contains("aborted"), "{out}{err}");
    assert_eq!(rollout(&server, "app").state, State::Aborted);
    let back = wait_until(Duration::from_secs(30), || settled(&server, "app", 3, n));
    assert!(back.is_some(), "not back on revision 3: {:#?}", describe_workload(&server, "app").map(|w| w.devices));
    let (ok, _, err) = baton_cli(&server, &["rollout", "resume", "app"]);
    assert!(!ok && err.contains("aborted"), "{err}");
}

#[test]
fn replicas_spread_move_only_after_the_grace_period_and_scale() {
    let world = World::new();
    let controller = Controller::start(&world, None, &["--reschedule-after", "4"]);
    let server = controller.server_url();
    let broker = controller.broker_url();
    let mut first = start_simulator(&world, "a", 3, &broker, &["--label", "pool=edge", "--label-cycle", "site=x,y,z"]);
    wait_for("group a", Duration::from_secs(30), || (controller.devices().len() == 3).then_some(()));
    apply_yaml(
        &server,
        &world,
        "api.yaml",
        "name: api\nimage: 127.0.0.1:9/api:1\nreplicas: 2\nplacement: {selector: {pool: edge}, spread_by: site}\n",
    );
    let placed = |w: &WorkloadView| -> Vec<String> { w.devices.iter().map(|d| d.device.clone()).collect() };
    let w = wait_for("2 replicas", Duration::from_secs(30), || settled(&server, "api", 1, 2));
    let on_a = placed(&w);
    assert!(on_a.iter().all(|d| d.starts_with("a-")), "{on_a:?}");

    let _second = start_simulator(&world, "b", 3, &broker, &["--label", "pool=edge", "--label-cycle", "site=x,y,z"]);
    wait_for("group b", Duration::from_secs(30), || (controller.devices().len() == 6).then_some(()));

    // A blip: group a drops (killed: the broker publishes its Last Will) and
    // comes back well within the grace period. Nothing moves.
    first.kill9();
    wait_for("group a offline", Duration::from_secs(30), || {
        controller
            .devices()
            .iter()
            .filter(|d| d.id.starts_with("a-"))
            .all(|d| d.status.as_str() == "offline")
            .then_some(())
    });
    first = start_simulator(&world, "a", 3, &broker, &["--label", "pool=edge", "--label-cycle", "site=x,y,z"]);
    let w = wait_for("replicas back on a", Duration::from_secs(30), || settled(&server, "api", 1, 2));
    assert_eq!(placed(&w), on_a, "a brief disconnect moved replicas");

    // Gone for longer than the grace period: the replicas move to group b,
    // one per site still.
    first.kill9();
    let w = wait_for("replicas moved to b", Duration::from_secs(30), || {
        let w = settled(&server, "api", 1, 2)?;
        placed(&w).iter().all(|d| d.starts_with("b-")).then_some(w)
    });
    let sites: std::collections::BTreeSet<String> =
        w.devices.iter().map(|d| controller.device(&d.device).expect("device").labels["site"].clone()).collect();
    assert_eq!(sites.len(), 2, "replicas share a site: {:?}", placed(&w));

    // Scale up past what is reachable: 3 placed, the rest reported unplaced.
    let (ok, out, err) = baton_cli(&server, &["scale", "api", "--replicas", "4"]);
    assert!(ok && out.contains("1 unplaced"), "{out}{err}");
    wait_for("3 replicas", Duration::from_secs(30), || settled(&server, "api", 1, 3));
    // Re-applying the file from before the scale sets its count again, and says so.
    let out = apply_yaml(
        &server,
        &world,
        "api.yaml",
        "name: api\nimage: 127.0.0.1:9/api:1\nreplicas: 2\nplacement: {selector: {pool: edge}, spread_by: site}\n",
    );
    assert!(out.contains("replicas 4 → 2 (the file's)"), "{out}");
}

#[test]
fn a_revision_that_never_turns_healthy_is_rolled_back_on_the_device() {
    let world = World::new();
    let controller = Controller::start(&world, None, &[]);
    let server = controller.server_url();
    let data = world.path().join("agent-pi-rb");
    give_busybox(&world, "pi-rb", "busybox:rb");
    let mut agent = start_agent(&world, "pi-rb", &controller.broker_url(), &[]);
    wait_for("device", Duration::from_secs(20), || (controller.devices().len() == 1).then_some(()));

    let manifest = |version: &str, readiness: &str| {
        format!(
            "name: rb\nimage: busybox:rb\ncommand: [/bin/sh, -c, 'cat /etc/rb.conf; while true; do sleep 0.2; done']\nfiles: [{{path: /etc/rb.conf, content: \"version {version}\\n\"}}]\nhealth_deadline: 4\nrollout: {{min_ready: 1}}\n{readiness}"
        )
    };
    apply_yaml(&server, &world, "rb.yaml", &manifest("v1", ""));
    wait_for("revision 1 running", Duration::from_secs(30), || settled(&server, "rb", 1, 1));
    // The device proves a revision after it ran healthy for a while, and keeps it on flash.
    let proven = baton_agent::engine::proven_path(&data);
    wait_for("revision 1 proven on the device", Duration::from_secs(30), || proven.exists().then_some(()));

    // Revision 2 changes the config file (a change like any other: a new
    // revision), and its readiness probe never passes.
    apply_yaml(
        &server,
        &world,
        "rb.yaml",
        &manifest("v2", "readiness: {exec: [/bin/sh, -c, 'exit 1'], interval: 1}\n"),
    );
    let r = wait_for("rollout of revision 2 to stop", Duration::from_secs(60), || {
        let r = rollout(&server, "rb");
        (r.to == 2 && !r.state.active()).then_some(r)
    });
    assert_eq!(r.state, State::RolledBack, "{r:?}");
    assert!(r.failed.iter().any(|(d, why)| d == "pi-rb" && why.contains("revision 2 not healthy within 4s")), "{r:?}");
    // Revision 1 runs again: a fresh container of it, healthy.
    let w = wait_for("revision 1 again", Duration::from_secs(30), || settled(&server, "rb", 1, 1));
    assert_eq!((w.revision, w.stable_revision), (2, 1));
    // Revision 2 was started next to revision 1 (no ports, devices or volumes),
    // so revision 1 never stopped: the rollback kept its container.
    let r = w.devices[0].reported.as_ref().expect("report");
    assert_eq!(r.restarts, 0, "revision 1's container was replaced: {r:?}");
    let mut last = String::new();
    let logged = wait_until(Duration::from_secs(10), || {
        let (ok, logs, err) = baton_cli(&server, &["logs", "rb", "--device", "pi-rb", "--tail", "1"]);
        last = format!("{logs}{err}");
        (ok && logs.contains("version v1")).then_some(())
    });
    let dirs: Vec<_> = std::fs::read_dir(data.join("containers"))
        .map(|d| d.flatten().map(|e| e.file_name()).collect())
        .unwrap_or_default();
    let agent_log = std::fs::read_to_string(world.path().join("agent-pi-rb.log")).unwrap_or_default();
    let tail: Vec<&str> = agent_log.lines().filter(|l| l.contains("supervisor") || l.contains("engine")).collect();
    assert!(logged.is_some(), "revision 1's log: {last} {dirs:?} {}", tail[tail.len().saturating_sub(15)..].join("\n"));
    assert!(agent.is_running(), "agent died");
}

#[test]
fn devices_away_during_a_rollout_neither_block_nor_fail_it_and_catch_up() {
    let world = World::new();
    let controller = Controller::start(&world, None, &[]);
    let server = controller.server_url();
    let n = 40;
    // The first 4 devices go away 8 s into the run, for 20 s.
    let knobs = ["--offline-devices", "4", "--offline-after", "8", "--offline-for", "20"];
    let _sim = start_simulator(&world, "flaky", n, &controller.broker_url(), &knobs);
    wait_for("40 devices", Duration::from_secs(30), || (controller.devices().len() == n).then_some(()));
    let spec =
        |tag: &str| format!("name: app\nimage: 127.0.0.1:9/app:{tag}\nrollout: {{waves: [2, 50%], min_ready: 1}}\n");
    apply_yaml(&server, &world, "app.yaml", &spec("1"));
    wait_for("revision 1", Duration::from_secs(30), || settled(&server, "app", 1, n));
    let offline = || controller.devices().iter().filter(|d| d.status.as_str() == "offline").count();
    wait_for("4 devices away", Duration::from_secs(30), || (offline() == 4).then_some(()));

    apply_yaml(&server, &world, "app.yaml", &spec("2"));
    let r = wait_for("rollout of 2 done", Duration::from_secs(30), || {
        let r = rollout(&server, "app");
        (!r.state.active()).then_some(r)
    });
    assert_eq!(r.state, State::Succeeded, "{r:?}");
    assert_eq!((r.counts.ready, r.counts.failed), (n - 4, 0), "{r:?}");
    assert!(offline() == 4, "the rollout outlasted the outage: the test proves nothing");
    // Back: they run what the fleet runs now.
    wait_for("everyone on revision 2", Duration::from_secs(60), || settled(&server, "app", 2, n));
}
