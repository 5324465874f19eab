//! A controller and three agents as separate processes: registration,
//! presence through crashes and restarts, with the embedded broker and with Mosquitto.

use std::collections::BTreeSet;
use std::time::Duration;

use baton_controller::fleet::Status;
use baton_tests::*;

const IDS: [&str; 3] = ["pi-a", "pi-b", "pi-c"];

fn statuses(c: &Controller) -> Vec<(String, Status)> {
    c.devices().into_iter().map(|d| (d.id, d.status)).collect()
}

fn all_online_with_inventory(c: &Controller) -> bool {
    let devices = c.devices();
    devices.len() == IDS.len()
        && devices.iter().all(|d| d.status == Status::Online && d.inventory.as_ref().is_some_and(|i| i.cpus > 0))
}

fn presence_scenario(broker: BrokerKind) {
    let world = World::new();
    let mosquitto = matches!(broker, BrokerKind::Mosquitto).then(|| Mosquitto::start(&world));
    let mut controller = Controller::start(&world, mosquitto.as_ref().map(|m| m.port), &[]);
    let url = controller.broker_url();
    let mut agents: Vec<Proc> = IDS.iter().map(|id| start_agent(&world, id, &url, &["--label", "site=lab"])).collect();

    wait_for("3 devices online with inventory", Duration::from_secs(20), || {
        all_online_with_inventory(&controller).then_some(())
    });
    let d = controller.device("pi-a").expect("pi-a");
    assert_eq!(d.labels.get("site").map(String::as_str), Some("lab"));
    assert_eq!(d.arch, std::env::consts::ARCH);
    wait_for("a heartbeat from pi-a", Duration::from_secs(10), || controller.device("pi-a")?.heartbeat);

    // A crash: no goodbye. The broker sees the socket close and publishes the Will.
    agents[1].kill9();
    wait_for("pi-b offline after kill -9", Duration::from_secs(10), || {
        (controller.device("pi-b")?.status == Status::Offline).then_some(())
    });
    assert_eq!(controller.device("pi-a").map(|d| d.status), Some(Status::Online));

    // Same id again: the same device comes back, no duplicate.
    let first_seen = controller.device("pi-b").expect("pi-b").first_seen_ms;
    agents[1] = start_agent(&world, "pi-b", &url, &[]);
    wait_for("pi-b online again", Duration::from_secs(20), || {
        (controller.device("pi-b")?.status == Status::Online).then_some(())
    });
    let ids: BTreeSet<String> = controller.devices().into_iter().map(|d| d.id).collect();
    assert_eq!(ids, IDS.iter().map(|s| s.to_string()).collect());
    assert_eq!(controller.device("pi-b").expect("pi-b").first_seen_ms, first_seen);

    // Controller restart: the fleet comes back from SQLite at once, and
    // presence recovers from the agents (embedded) or retained messages (Mosquitto).
    let before_restart = baton_controller::controller::now_ms();
    controller.restart();
    let listed: BTreeSet<String> = controller.devices().into_iter().map(|d| d.id).collect();
    assert_eq!(listed.len(), IDS.len(), "devices missing right after restart: {listed:?}");
    wait_for("every device heard from after the restart", Duration::from_secs(20), || {
        let devices = controller.devices();
        (devices.len() == IDS.len()
            && devices.iter().all(|d| d.status == Status::Online && d.last_seen_ms > before_restart))
        .then_some(())
    });
    for a in &mut agents {
        assert!(a.is_running(), "{} died", a.name);
    }

    // A clean agent stop marks the device offline on purpose.
    assert_eq!(agents[2].terminate(), Some(0));
    wait_for("pi-c offline after SIGTERM", Duration::from_secs(10), || {
        (controller.device("pi-c")?.status == Status::Offline).then_some(())
    });
    assert_eq!(controller.devices().len(), IDS.len(), "{:?}", statuses(&controller));
}

#[test]
fn three_agents_presence_crash_restart_with_embedded_broker() {
    presence_scenario(BrokerKind::Embedded);
}

#[test]
fn three_agents_presence_crash_restart_with_mosquitto() {
    presence_scenario(BrokerKind::Mosquitto);
}

/// `kill -SIG pid`.
fn signal(pid: u32, sig: &str) {
    let ok = std::process::Command::new("kill").args([sig, &pid.to_string()]).status().expect("kill").success();
    assert!(ok, "kill {sig} {pid}");
}

#[test]
fn silent_device_turns_stale_then_recovers() {
    let world = World::new();
    let controller = Controller::start(&world, None, &["--stale-after", "2"]);
    let mut agent = start_agent(&world, "quiet", &controller.broker_url(), &["--heartbeat-interval", "1"]);
    wait_for("quiet online", Duration::from_secs(20), || {
        (controller.device("quiet")?.status == Status::Online).then_some(())
    });
    // A wedged agent: its connection open (the broker's keepalive has 45 s
    // to run), nothing sent. Stale after two of its 1 s intervals.
    signal(agent.pid(), "-STOP");
    wait_for("quiet stale", Duration::from_secs(10), || {
        (controller.device("quiet")?.status == Status::Stale).then_some(())
    });
    signal(agent.pid(), "-CONT");
    wait_for("quiet online again", Duration::from_secs(10), || {
        (controller.device("quiet")?.status == Status::Online).then_some(())
    });
    agent.kill9();
    wait_for("quiet offline", Duration::from_secs(10), || {
        (controller.device("quiet")?.status == Status::Offline).then_some(())
    });
}

/// Issue 21 (idle traffic): an agent says how rarely it heartbeats (300 s
/// by default) and the controller does not take its quiet for silence; a
/// device that does go away is still caught by its keepalive, through the
/// broker's Last Will, as fast as before.
#[test]
fn a_device_that_heartbeats_rarely_stays_online_and_its_keepalive_still_catches_it() {
    let world = World::new();
    let controller = Controller::start(&world, None, &["--stale-after", "2", "--offline-after", "4"]);
    let agent = start_agent(
        &world,
        "rare",
        &controller.broker_url(),
        &["--heartbeat-interval", "300", "--keepalive", "2", "--no-workloads"],
    );
    let d = wait_for("rare online", Duration::from_secs(20), || {
        controller.device("rare").filter(|d| d.status == Status::Online && d.heartbeat.is_some())
    });
    assert_eq!(d.inventory.map(|i| i.heartbeat_interval_s), Some(300));
    // Three times the controller's floors pass without a word from it but
    // its keepalive: it stays online throughout.
    let quiet_until = std::time::Instant::now() + Duration::from_secs(12);
    while std::time::Instant::now() < quiet_until {
        let d = controller.device("rare").expect("rare");
        assert_eq!(d.status, Status::Online, "a quiet device taken for silent: {d:?}");
        assert_eq!(d.heartbeat.map(|h| h.seq), Some(1), "a heartbeat before its interval");
        std::thread::sleep(Duration::from_millis(250));
    }
    // Wedged: no keepalive either. The broker's Will says so (1.5 × 2 s).
    signal(agent.pid(), "-STOP");
    wait_for("rare offline through its Will", Duration::from_secs(15), || {
        (controller.device("rare")?.status == Status::Offline).then_some(())
    });
    signal(agent.pid(), "-CONT");
    wait_for("rare back", Duration::from_secs(30), || {
        (controller.device("rare")?.status == Status::Online).then_some(())
    });
}

/// Symptom: an agent started with `--no-workloads` (presence and
/// inventory only) was a target of every every-device workload; it never
/// ran one nor said so, and rollouts counted it as a device still to update.
#[test]
fn an_agent_that_runs_no_workloads_is_given_none() {
    let world = World::new();
    let controller = Controller::start(&world, None, &[]);
    let server = controller.server_url();
    let _watcher = start_agent(&world, "watcher", &controller.broker_url(), &["--no-workloads"]);
    let _sim = start_simulator(&world, "w", 1, &controller.broker_url(), &[]);
    wait_for("both devices", Duration::from_secs(30), || {
        let devices = controller.devices();
        (devices.len() == 2 && devices.iter().all(|d| d.inventory.is_some())).then_some(())
    });
    apply_yaml(
        &server,
        &world,
        "app.yaml",
        "name: app
image: 127.0.0.1:9/app:1
",
    );
    let w = wait_for("revision 1 on the device that runs workloads", Duration::from_secs(30), || {
        settled(&server, "app", 1, 1)
    });
    assert_eq!(w.devices.iter().map(|d| d.device.as_str()).collect::<Vec<_>>(), ["w-0000"], "{w:?}");
    let (ok, out, err) = baton_cli(&server, &["describe", "device", "watcher"]);
    assert!(ok && out.contains("this agent runs none (--no-workloads)"), "{out}{err}");
}

#[test]
fn cli_lists_describes_and_labels_devices() {
    let world = World::new();
    let controller = Controller::start(&world, None, &[]);
    let _agent = start_agent(&world, "cli-dev", &controller.broker_url(), &["--label", "role=sensor"]);
    wait_for("cli-dev online", Duration::from_secs(20), || {
        (controller.device("cli-dev")?.status == Status::Online).then_some(())
    });
    let server = controller.server_url();

    let (ok, out, err) = baton_cli(&server, &["get", "devices"]);
    assert!(ok, "{err}");
    let mut lines = out.lines();
    let header = lines.next().unwrap_or_default();
    for col in ["ID", "STATUS", "ARCH", "LABELS", "LAST SEEN", "AGENT"] {
        assert!(header.contains(col), "missing {col} in {header:?}");
    }
    let row = lines.next().unwrap_or_default();
    assert!(row.starts_with("cli-dev") && row.contains("online") && row.contains("role=sensor"), "{row:?}");

    let (ok, out, err) = baton_cli(&server, &["label", "device", "cli-dev", "tier=edge", "role-"]);
    assert!(ok, "{err}");
    assert!(out.contains("tier=edge"), "{out}");
    // Removing the operator label falls back to the agent's own.
    let d = controller.device("cli-dev").expect("cli-dev");
    assert_eq!(d.operator_labels.get("tier").map(String::as_str), Some("edge"));
    assert_eq!(d.labels.get("role").map(String::as_str), Some("sensor"));

    let (ok, out, _) = baton_cli(&server, &["get", "devices", "-o", "json"]);
    assert!(ok);
    let parsed: serde_json::Value = serde_json::from_str(&out).expect("json output");
    assert_eq!(parsed[0]["id"], "cli-dev");
    let (ok, out, _) = baton_cli(&server, &["describe", "device", "cli-dev", "-o", "yaml"]);
    assert!(ok && out.contains("id: cli-dev"), "{out}");
    let (ok, out, _) = baton_cli(&server, &["describe", "device", "cli-dev"]);
    assert!(ok && out.contains("Kernel:") && out.contains("tier (operator)=edge"), "{out}");

    let (ok, _, err) = baton_cli(&server, &["describe", "device", "nope"]);
    assert!(!ok && err.contains("device nope not found"), "{err}");
    let (ok, _, err) = baton_cli(&server, &["label", "device", "cli-dev", "bad key=x"]);
    assert!(!ok && err.contains("label key"), "{err}");
}

#[test]
fn cli_without_a_controller_says_how_to_point_at_one() {
    let port = free_port();
    let (ok, _, err) = baton_cli(&format!("http://127.0.0.1:{port}"), &["get", "devices"]);
    assert!(!ok);
    assert!(err.contains(&format!("cannot reach the Baton controller at http://127.0.0.1:{port}")), "{err}");
    assert!(err.contains("--server") && err.contains("BATON_SERVER"), "{err}");
}

/// Symptom: `baton get devices | head` panicked ("failed printing to stdout:
/// Broken pipe"). Every command's output now ends quietly, with success,
/// when its reader goes away.
#[test]
fn cli_output_ends_quietly_when_the_reader_goes_away() {
    use std::io::{BufRead, BufReader};
    let world = World::new();
    let controller = Controller::start(&world, None, &[]);
    // JSON of 100 devices is well over a pipe's 64 KiB buffer: the CLI is still writing when the reader goes.
    let _sim = start_simulator(&world, "p", 100, &controller.broker_url(), &[]);
    wait_for("100 devices", Duration::from_secs(60), || (controller.devices().len() == 100).then_some(()));
    let json = get_text(controller.http, "/api/v1/devices").expect("devices");
    assert!(json.len() > 80 << 10, "only {} bytes: the pipe would not fill", json.len());
    for args in [&["get", "devices", "-o", "json"][..], &["get", "devices", "-o", "yaml"]] {
        let mut child = std::process::Command::new(bin("baton"))
            .args(args)
            .env("BATON_SERVER", controller.server_url())
            .stdout(std::process::Stdio::piped())
            .stderr(std::process::Stdio::piped())
            .spawn()
            .expect("baton");
        let mut first = String::new();
        BufReader::new(child.stdout.take().expect("stdout")).read_line(&mut first).expect("a line");
        // The reader is gone (as `head` would be, after one line).
        let out = child.wait_with_output().expect("baton");
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert!(out.status.success() && stderr.is_empty(), "{args:?}: {:?} {stderr}", out.status);
    }
}

/// A workload for 3,000 devices at once (simulated, two processes): every
/// document goes out in the first push — none is refused for want of room
/// in the controller's MQTT queue and sent again a minute later — and the
/// controller says nothing of the kind in its log. About 40 s.
#[test]
fn a_workload_for_thousands_of_devices_reaches_each_in_the_first_push() {
    const EACH: usize = 1500;
    let world = World::new();
    let controller = Controller::start(&world, None, &["--max-devices", "4000"]);
    let url = controller.broker_url();
    let _sims: Vec<Proc> =
        ["a", "b"].iter().map(|p| start_simulator(&world, p, EACH, &url, &["--heartbeat-interval", "60"])).collect();
    wait_for("3,000 devices online", Duration::from_secs(120), || {
        let online = controller.devices().iter().filter(|d| d.status == Status::Online).count();
        (online == 2 * EACH).then_some(())
    });
    let server = controller.server_url();
    let applied = std::time::Instant::now();
    apply_yaml(&server, &world, "wide.yaml", "name: wide\nimage: busybox:wide\ncommand: [/bin/sleep, \"1000\"]\n");
    wait_for("the workload running on every device", Duration::from_secs(120), || {
        settled(&server, "wide", 1, 2 * EACH)
    });
    eprintln!("{} devices running the workload {:?} after the apply", 2 * EACH, applied.elapsed());
    let log = std::fs::read_to_string(world.path().join("controller.log")).expect("controller log");
    for refused in ["cannot queue", "sending it again"] {
        let n = log.lines().filter(|l| l.contains(refused)).count();
        assert_eq!(
            n, 0,
            "the controller logged \"{refused}\" {n} times: documents did not all go out in the first push"
        );
    }
}
