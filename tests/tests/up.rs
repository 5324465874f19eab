//! `baton up`, README's one command: a controller and a local agent that
//! comes online, trusts the controller's key from the start, and stops with
//! it. Root (the agent's runtime; CI is root).

use std::time::Duration;

use baton_controller::fleet::Status;
use baton_controller::view::DeviceView;
use baton_tests::*;

fn up_args(world: &World, http: u16, mqtt: u16) -> Vec<String> {
    [
        "up",
        "--listen",
        &format!("127.0.0.1:{http}"),
        "--mqtt-listen",
        &format!("127.0.0.1:{mqtt}"),
        "--data-dir",
        world.path().join("controller").to_str().expect("utf-8"),
        "--device-id",
        "pi-up",
        "--resolve-digests",
        "false",
        "--heartbeat-interval",
        "1",
        "--run-dir",
        world.path().join("run-up").to_str().expect("utf-8"),
    ]
    .iter()
    .map(|s| s.to_string())
    .collect()
}

fn wait_online(http: u16) {
    wait_for("the local agent online", Duration::from_secs(30), || {
        let devices: Vec<DeviceView> = get_json(http, "/api/v1/devices").ok()?;
        devices.into_iter().find(|d| d.id == "pi-up" && d.status == Status::Online)
    });
}

#[test]
fn baton_up_runs_a_controller_and_a_local_agent_that_trusts_it_and_never_outlives_it() {
    let world = World::new();
    let (http, mqtt) = (free_port(), free_port());
    let mut up = Proc::spawn("baton-up", &bin("baton"), &up_args(&world, http, mqtt), world.path());
    let server = format!("http://127.0.0.1:{http}");
    wait_online(http);
    // The agent next to the controller's data dir, given the controller's key:
    // a signed command is carried out before any document arrived (it is
    // answered about the workload, not refused).
    let (ok, out, err) = baton_cli(&server, &["logs", "nothing-here", "--device", "pi-up"]);
    assert!(!ok && !err.contains("refused") && err.contains("nothing-here"), "{out}{err}");
    assert!(world.path().join("agent").is_dir(), "the agent's data dir is beside the controller's");
    assert!(!world.path().join("agent/state/controller.pub").exists(), "trusted on first use instead of configured");

    // One signal stops both; the agent says goodbye first.
    assert_eq!(up.terminate(), Some(0), "baton up did not exit cleanly");
    let log = std::fs::read_to_string(&up.log).unwrap_or_default();
    assert!(!log.contains("the local agent exited"), "the agent died before the controller: {log}");

    // Killed outright (no chance to stop its child), it still takes the agent with it.
    let mut up = Proc::spawn("baton-up-2", &bin("baton"), &up_args(&world, http, mqtt), world.path());
    wait_online(http);
    let log = std::fs::read_to_string(&up.log).expect("baton up's log");
    let pid: u32 = log
        .split("local agent pid ")
        .nth(1)
        .and_then(|rest| rest.split(|c: char| !c.is_ascii_digit()).next()?.parse().ok())
        .unwrap_or_else(|| panic!("no agent pid in: {log}"));
    assert!(std::path::Path::new(&format!("/proc/{pid}")).exists());
    up.kill9();
    wait_for("the orphaned agent gone", Duration::from_secs(10), || {
        let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).unwrap_or_default();
        // Gone, or a zombie waiting for init to reap it.
        (stat.is_empty() || stat.split(") ").nth(1).is_some_and(|s| s.starts_with('Z'))).then_some(())
    });
}
