//! Field faults, networks: a device behind a veth pair in its own network
//! namespace (addresses only inside it), cut off with iptables, and run over
//! a bad link (30 % loss each way with iptables' `statistic` match, 200 ms
//! delay with the `netdelay` NFQUEUE helper: this kernel has no netem).
//! Real agent, real containers. About 3 min (the bad link runs 2 min).

use std::time::{Duration, Instant};

use baton_controller::fleet::Status;
use baton_tests::*;

const DEVICE: &str = "pi-n";

fn web(script: &str) -> String {
    format!("name: web\nimage: busybox:net\ncommand: [/bin/sh, -c, \"{script}\"]\nrollout: {{min_ready: 1}}\n")
}

fn status(controller: &Controller) -> Option<Status> {
    controller.device(DEVICE).map(|d| d.status)
}

/// A partition longer than the keepalive, healed; then another with a new
/// revision applied meanwhile.
#[test]
fn a_partition_takes_the_device_offline_touches_no_container_and_what_was_applied_meanwhile_lands_after() {
    let world = World::new();
    let ns = NetNs::new();
    let controller =
        Controller::start_for_namespaces(&world, &ns.host_ip, &["--stale-after", "3", "--offline-after", "10"]);
    let server = controller.server_url();
    give_busybox(&world, DEVICE, "busybox:net");
    let agent_args = ["--keepalive", "2"];
    let _agent = start_agent_in(&world, &ns, DEVICE, &controller.broker_url(), &agent_args);
    apply_yaml(&server, &world, "web.yaml", &web("echo one; while true; do sleep 0.2; done"));
    wait_for("revision 1", Duration::from_secs(40), || settled(&server, "web", 1, 1));
    let run = world.path().join(format!("run-{DEVICE}"));
    let pid = wait_for("its pid", Duration::from_secs(10), || running_pid(&run, "web-0"));

    // Cut off for longer than the keepalive (the broker gives up after 1.5 × 2 s).
    ns.partition();
    wait_for("offline", Duration::from_secs(30), || (status(&controller) == Some(Status::Offline)).then_some(()));
    assert!(alive(pid), "the container died in the partition");
    ns.heal();
    wait_for("online again", Duration::from_secs(40), || (status(&controller) == Some(Status::Online)).then_some(()));
    assert_eq!(running_pid(&run, "web-0"), Some(pid), "the container was replaced");
    let w = settled(&server, "web", 1, 1).expect("still revision 1, healthy");
    assert_eq!(w.devices[0].reported.as_ref().map(|r| r.restarts), Some(0), "restarted by a partition");
    assert_eq!(controller.devices().len(), 1, "registered twice");
    let (_, events, _) = baton_cli(&server, &["get", "events", "-o", "json"]);
    let events: Vec<baton_controller::view::Event> = serde_json::from_str(&events).expect("events");
    let registered = events.iter().filter(|e| e.message == "registered").count();
    assert_eq!(registered, 1, "{events:?}");

    // A new revision while the device is cut off lands once it is back.
    ns.partition();
    wait_for("offline again", Duration::from_secs(30), || (status(&controller) == Some(Status::Offline)).then_some(()));
    apply_yaml(&server, &world, "web.yaml", &web("echo two; while true; do sleep 0.2; done"));
    ns.heal();
    wait_for("revision 2 after the partition", Duration::from_secs(60), || settled(&server, "web", 2, 1));
    wait_for("revision 2's output", Duration::from_secs(10), || {
        container_logs(&world.path().join(format!("agent-{DEVICE}"))).contains("stdout two").then_some(())
    });
}

/// Resident memory of a process, KiB.
fn rss_kib(pid: u32) -> u64 {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap_or_default();
    status.lines().find_map(|l| l.strip_prefix("VmRSS:")?.trim().strip_suffix("kB")?.trim().parse().ok()).unwrap_or(0)
}

/// A bad link (30 % loss each way, 200 ms delay) for two minutes: the device
/// stays (mostly) online, its container runs on untouched, the agent's
/// memory stays flat.
#[test]
fn a_lossy_slow_link_for_minutes_keeps_the_device_mostly_online_and_its_container_untouched() {
    let world = World::new();
    let ns = NetNs::new();
    let controller = Controller::start_for_namespaces(&world, &ns.host_ip, &[]);
    let server = controller.server_url();
    give_busybox(&world, DEVICE, "busybox:net");
    let agent = start_agent_in(&world, &ns, DEVICE, &controller.broker_url(), &["--heartbeat-interval", "5"]);
    apply_yaml(&server, &world, "web.yaml", &web("while true; do sleep 1; done"));
    wait_for("revision 1", Duration::from_secs(40), || settled(&server, "web", 1, 1));
    let run = world.path().join(format!("run-{DEVICE}"));
    let pid = wait_for("its pid", Duration::from_secs(10), || running_pid(&run, "web-0"));

    for chain in ["INPUT", "OUTPUT"] {
        ns.run(&["iptables", "-I", chain, "-m", "statistic", "--mode", "random", "--probability", "0.3", "-j", "DROP"]);
    }
    ns.run(&["iptables", "-A", "OUTPUT", "-j", "NFQUEUE", "--queue-num", "7", "--queue-bypass"]);
    let mut delay = std::process::Command::new("nsenter")
        .args(ns.enter())
        .args([bin("netdelay").display().to_string(), "7".into(), "200".into()])
        .stdin(std::process::Stdio::piped())
        .stdout(std::process::Stdio::piped())
        .spawn()
        .expect("netdelay");
    let mut ready = String::new();
    std::io::BufRead::read_line(&mut std::io::BufReader::new(delay.stdout.take().expect("stdout")), &mut ready)
        .expect("netdelay ready");
    assert_eq!(ready.trim(), "ready");

    let rss_before = rss_kib(agent.pid());
    let (mut samples, mut offline) = (0, 0);
    let start = Instant::now();
    while start.elapsed() < Duration::from_secs(120) {
        samples += 1;
        if status(&controller) == Some(Status::Offline) {
            offline += 1;
        }
        std::thread::sleep(Duration::from_secs(1));
    }
    let rss_after = rss_kib(agent.pid());
    drop(delay.stdin.take());
    let _ = delay.wait();

    assert!(offline * 10 <= samples, "offline in {offline} of {samples} samples");
    assert!(alive(pid) && running_pid(&run, "web-0") == Some(pid), "the container was restarted");
    let w = describe_workload(&server, "web").expect("web");
    assert_eq!(w.devices[0].reported.as_ref().map(|r| r.restarts), Some(0));
    // The agent's memory did not grow with the backlog of a bad link.
    assert!(rss_after < rss_before + 2048, "agent RSS {rss_before} KiB → {rss_after} KiB");
}
