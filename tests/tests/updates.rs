//! When updates may happen (`updates:` in manifests), on real containers:
//! an install window that opens a few seconds after the new revision
//! arrives — with the controller stopped before it opens, so the device
//! keeps it alone — and the application's update lock
//! (`/run/baton/update.lock`), released by the application, overridden
//! after its maximum, or waited on past it.

use std::time::{Duration, SystemTime, UNIX_EPOCH};

use baton_controller::rollout::State;
use baton_controller::view::RolloutView;
use baton_tests::*;

/// The revision recorded with container `id` on `device`, if it exists.
fn provenance_revision(world: &World, device: &str, id: &str) -> Option<u64> {
    let path = world.path().join(format!("agent-{device}/containers/{id}/provenance.json"));
    let v: serde_json::Value = serde_json::from_slice(&std::fs::read(path).ok()?).ok()?;
    v["revision"].as_u64()
}

/// The revision the device reports running healthy.
fn running_revision(server: &str, name: &str) -> Option<u64> {
    let w = describe_workload(server, name)?;
    let r = w.devices.first()?.reported.clone()?;
    (r.phase == baton_protocol::Phase::Running && r.health == baton_protocol::Health::Healthy).then_some(r.revision)
}

fn rollout(server: &str, name: &str) -> Option<RolloutView> {
    let (ok, out, _) = baton_cli(server, &["rollout", "status", name, "-o", "json"]);
    ok.then(|| serde_json::from_str(&out).expect("rollout: json"))
}

#[test]
fn a_new_revision_waits_for_its_install_window_even_with_the_controller_down() {
    let world = World::new();
    let mut controller = Controller::start(&world, None, &[]);
    let server = controller.server_url();
    give_busybox(&world, "pi-window", "busybox:window");
    let _agent = start_agent(&world, "pi-window", &controller.broker_url(), &[]);
    wait_for("the device", Duration::from_secs(20), || controller.device("pi-window"));

    // A window at the first whole minute at least 25 s from now, for 10 minutes (UTC).
    let now_s = SystemTime::now().duration_since(UNIX_EPOCH).expect("clock").as_secs();
    let opens = (now_s + 25).div_ceil(60) * 60;
    let (hour, minute) = (opens / 3600 % 24, opens / 60 % 60);
    let manifest = |version: u32| {
        format!(
            "name: web\nimage: busybox:window\ncommand: [/bin/sh, -c, 'while true; do sleep 1; done']\n\
             env: {{VERSION: \"{version}\"}}\nhealth_deadline: 600\n\
             updates: {{install: {{at: \"{minute} {hour} * * *\", for: 10m, time_zone: UTC}}}}\n"
        )
    };
    // A first start does not wait for a window.
    apply_yaml(&server, &world, "web.yaml", &manifest(1));
    wait_for("revision 1 running", Duration::from_secs(30), || (running_revision(&server, "web")? == 1).then_some(()));

    // Revision 2 arrives outside the window: the device holds it back and says so.
    apply_yaml(&server, &world, "web.yaml", &manifest(2));
    let waiting = wait_for("the device to hold revision 2", Duration::from_secs(20), || {
        describe_workload(&server, "web")?.devices.first()?.waiting.clone()
    });
    assert_eq!(waiting.revision, 2);
    assert!(waiting.reason.contains("outside its install window"), "{waiting:?}");
    assert_eq!(waiting.until_ms, opens * 1000, "{waiting:?}");
    let r = wait_for("the rollout to show it", Duration::from_secs(10), || {
        rollout(&server, "web").filter(|r| !r.held.is_empty())
    });
    assert_eq!(r.state, State::Progressing, "waiting is neither failing nor done: {r:?}");
    assert_eq!(r.counts.failed, 0);
    let (ok, out, _) = baton_cli(&server, &["describe", "workload", "web"]);
    assert!(ok && out.contains("pi-window holds revision 2 back: outside its install window"), "{out}");
    assert_eq!(running_revision(&server, "web"), Some(1), "revision 1 keeps running");

    // The controller goes away; the device keeps the window by itself.
    assert_eq!(controller.proc.terminate(), Some(0));
    let now_ms = SystemTime::now().duration_since(UNIX_EPOCH).expect("clock").as_millis() as u64;
    assert!(now_ms < opens * 1000, "the window opened before the controller stopped: make it later");
    assert!(provenance_revision(&world, "pi-window", "web-1").is_none(), "replaced before its window");
    wait_for("revision 2 running once the window opened", Duration::from_secs(90), || {
        (provenance_revision(&world, "pi-window", "web-1")? == 2).then_some(())
    });
    let switched = SystemTime::now().duration_since(UNIX_EPOCH).expect("clock").as_secs();
    assert!(switched >= opens, "switched at {switched}, before the window opened at {opens}");

    // Back, the controller sees the rollout through.
    controller.restart_after_stop();
    let r = wait_for("the rollout to end", Duration::from_secs(60), || {
        rollout(&server, "web").filter(|r| !r.state.active())
    });
    assert_eq!(r.state, State::Succeeded, "{r:?}");
    assert!(describe_workload(&server, "web").is_some_and(|w| w.devices[0].waiting.is_none()));
}

#[test]
fn an_update_lock_holds_a_revision_until_released_overridden_or_waited_on() {
    let world = World::new();
    let controller = Controller::start(&world, None, &[]);
    let server = controller.server_url();
    give_busybox(&world, "pi-lock", "busybox:lock");
    let _agent = start_agent(&world, "pi-lock", &controller.broker_url(), &[]);
    wait_for("the device", Duration::from_secs(20), || controller.device("pi-lock"));

    // Every revision takes the lock as it starts, as an app in a critical section would.
    let manifest = |version: u32, lock: &str| {
        format!(
            "name: kiosk\nimage: busybox:lock\n\
             command: [/bin/sh, -c, 'mkdir -p /run/baton; : > /run/baton/update.lock; while true; do sleep 1; done']\n\
             env: {{VERSION: \"{version}\"}}\nhealth_deadline: 600\nupdates: {{lock: {lock}}}\n"
        )
    };
    let held_for = |revision: u64| {
        let w = describe_workload(&server, "kiosk")?;
        w.devices.first()?.waiting.clone().filter(|h| h.revision == revision)
    };
    let runs = |revision: u64| (running_revision(&server, "kiosk")? == revision).then_some(());

    apply_yaml(&server, &world, "kiosk.yaml", &manifest(1, "{}"));
    wait_for("revision 1 running", Duration::from_secs(30), || runs(1));

    // Held for as long as the application holds the lock.
    apply_yaml(&server, &world, "kiosk.yaml", &manifest(2, "{}"));
    let h = wait_for("revision 2 held by the lock", Duration::from_secs(20), || held_for(2));
    assert!(h.reason.contains("holds its update lock"), "{h:?}");
    assert_eq!(h.until_ms, 0, "no maximum: the device cannot tell when");
    // The rollout takes it in at its next step.
    wait_for("the rollout to show the lock", Duration::from_secs(10), || {
        let r = rollout(&server, "kiosk")?;
        r.held.iter().any(|(d, why)| d == "pi-lock" && why.contains("update lock")).then_some(())
    });
    assert_eq!(running_revision(&server, "kiosk"), Some(1));
    // The application lets go.
    let (ok, _, err) = baton_cli(
        &server,
        &["exec", "--device", "pi-lock", "kiosk", "--", "/bin/sh", "-c", "rm /run/baton/update.lock"],
    );
    assert!(ok, "{err}");
    wait_for("revision 2 once released", Duration::from_secs(30), || runs(2));

    // A maximum with override: the lock (revision 2 took it) is honoured that long, then overridden.
    apply_yaml(&server, &world, "kiosk.yaml", &manifest(3, "{max: 4s, override: true}"));
    let h = wait_for("revision 3 held by the lock", Duration::from_secs(20), || held_for(3));
    assert!(h.reason.contains("honoured for up to 4 s"), "{h:?}");
    assert!(h.until_ms > 0, "{h:?}");
    wait_for("revision 3 once the lock is overridden", Duration::from_secs(30), || runs(3));

    // A maximum without override: past it, the device says it waits on, and does.
    apply_yaml(&server, &world, "kiosk.yaml", &manifest(4, "{max: 2s}"));
    let h = wait_for("revision 4 waiting on past the maximum", Duration::from_secs(30), || {
        held_for(4).filter(|h| h.reason.contains("past its maximum"))
    });
    assert!(h.reason.contains("still waiting (override is off)"), "{h:?}");
    assert_eq!(running_revision(&server, "kiosk"), Some(3));
    let (ok, _, err) = baton_cli(
        &server,
        &["exec", "--device", "pi-lock", "kiosk", "--", "/bin/sh", "-c", "rm /run/baton/update.lock"],
    );
    assert!(ok, "{err}");
    wait_for("revision 4 once released", Duration::from_secs(30), || runs(4));
    let r = wait_for("the rollout to end", Duration::from_secs(30), || {
        rollout(&server, "kiosk").filter(|r| r.to == 4 && !r.state.active())
    });
    assert_eq!(r.state, State::Succeeded, "{r:?}");
}

#[test]
fn bad_update_policies_are_refused_naming_the_field() {
    let world = World::new();
    let controller = Controller::start(&world, None, &[]);
    let server = controller.server_url();
    for (updates, field) in [
        ("{install: {at: '0 2 1 * *', for: 2h}}", "updates.install.at"),
        ("{install: {at: '0 2 * * *', for: 8d}}", "updates.install.for"),
        ("{install: {at: '0 2 * * *', for: 2h, time_zone: Mars/Olympus}}", "updates.install.time_zone"),
        (
            "{install: [{selector: {site: a}, at: '0 2 * * *', for: 2h}, {at: '0 25 * * *', for: 1h}]}",
            "updates.install[1].at",
        ),
        ("{max_delay: 3d}", "updates.max_delay"),
        ("{lock: {override: true}}", "updates.lock.override"),
        ("{install: {at: '* * * * *', for: 30s}}", "updates.install.at"),
        (
            "{install: [{at: '0 2 * * *', for: 2h}, {selector: {site: a}, at: '0 3 * * *', for: 1h}]}",
            "updates.install[1]",
        ),
        ("{install: {at: '0 2 * * *', fro: 2h}}", "updates.install.fro"),
    ] {
        let path = world.write("bad.yaml", &format!("name: bad\nimage: busybox:x\nupdates: {updates}\n"));
        let (ok, _, err) = baton_cli(&server, &["apply", "-f", path.to_str().expect("utf-8")]);
        assert!(!ok && err.contains(field), "{updates}: {err}");
    }
    let (ok, out, _) = baton_cli(&server, &["get", "workloads"]);
    assert!(ok && !out.contains("bad"), "a refused apply stored something: {out}");
}
