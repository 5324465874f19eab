//! Field faults, broker nodes: a device, or the controller, given two
//! nodes of a broker cluster loses the node it is on to kill -9 and
//! carries on through the other. The cluster is two Debian Mosquitto
//! brokers, one bridging every topic both ways to the other (the simplest
//! cluster Mosquitto makes). Real agent, real container. ~15 s.

use std::time::Duration;

use baton_controller::fleet::Status;
use baton_tests::*;

const DEVICE: &str = "pi-nodes";

/// `proc`'s log says it connected through `url` (`what`: the agent's or
/// the controller's words for it).
fn connected_through(proc: &Proc, what: &str, url: &str) -> bool {
    let log = std::fs::read_to_string(&proc.log).unwrap_or_default();
    log.lines().any(|l| l.contains(what) && l.contains(&format!("broker={url}")))
}

/// Two Mosquitto: `b` bridges every topic both ways to `a`.
fn cluster(world: &World) -> (Mosquitto, Mosquitto) {
    let a = Mosquitto::start_as(world, "node-a", "allow_anonymous true\n");
    let b = Mosquitto::start_as(
        world,
        "node-b",
        &format!(
            "allow_anonymous true\nconnection to-node-a\naddress 127.0.0.1:{}\ntopic # both 1\nrestart_timeout 1\n",
            a.port
        ),
    );
    (a, b)
}

const STEADY: &str = "name: steady\nimage: busybox:nodes\ncommand: [/bin/sh, -c, \"while true; do sleep 0.2; done\"]\n";
const STEADY_2: &str = "name: steady\nimage: busybox:nodes\nenv: {REV: \"2\"}\ncommand: [/bin/sh, -c, \"while true; do sleep 0.2; done\"]\n";

/// After a node died: a command reaches the device, its container was not
/// touched, a new revision lands, and it was never taken for offline.
fn carries_on(server: &str, world: &World, controller: &Controller, pid: i32) {
    let (ok, out, err) = baton_cli(server, &["exec", "--device", DEVICE, "steady", "--", "echo", "after-the-move"]);
    assert!(ok && out.contains("after-the-move"), "{out}{err}");
    let run = world.path().join(format!("run-{DEVICE}"));
    assert_eq!(running_pid(&run, "steady-0"), Some(pid), "the container was replaced by the move");
    let w = settled(server, "steady", 1, 1).expect("still revision 1, healthy");
    assert_eq!(w.devices[0].reported.as_ref().map(|r| r.restarts), Some(0), "restarted by the move");
    apply_yaml(server, world, "steady.yaml", STEADY_2);
    wait_for("revision 2 after the move", Duration::from_secs(60), || settled(server, "steady", 2, 1));
    assert_eq!(controller.device(DEVICE).map(|d| d.status), Some(Status::Online));
    let (_, events, _) = baton_cli(server, &["get", "events", "--subject", DEVICE, "--limit", "200"]);
    assert!(!events.contains("device.offline"), "the device went offline during the move:\n{events}");
}

/// Symptom this answers: an agent knew one broker URL; when that node of a
/// cluster died, the device was gone until someone reconfigured it.
#[test]
fn a_device_moves_to_the_next_broker_node_when_its_node_dies_and_nothing_restarts() {
    let world = World::new();
    let (mut node_a, node_b) = cluster(&world);
    // Quick to call a silent device offline: a slow move would show.
    let controller = Controller::start(&world, Some(node_b.port), &["--stale-after", "3", "--offline-after", "10"]);
    let server = controller.server_url();
    give_busybox(&world, DEVICE, "busybox:nodes");
    let agent = start_agent(&world, DEVICE, &format!("{},{}", node_a.url(), node_b.url()), &[]);
    apply_yaml(&server, &world, "steady.yaml", STEADY);
    wait_for("revision 1 through the bridge", Duration::from_secs(60), || settled(&server, "steady", 1, 1));
    let run = world.path().join(format!("run-{DEVICE}"));
    let pid = wait_for("its pid", Duration::from_secs(10), || running_pid(&run, "steady-0"));
    // The first node given is the one it uses, so losing it is a loss.
    assert!(connected_through(&agent, "connected to broker", &node_a.url()), "the agent did not start on node a");
    assert!(!connected_through(&agent, "connected to broker", &node_b.url()), "the agent started on node b");

    node_a.proc.kill9();
    wait_for("the agent on node b", Duration::from_secs(20), || {
        connected_through(&agent, "connected to broker", &node_b.url()).then_some(())
    });
    carries_on(&server, &world, &controller, pid);
}

/// Symptom this answers: the controller knew one broker URL; its node dying
/// left the fleet unmanaged though the cluster's other node was up.
#[test]
fn the_controller_moves_to_the_next_broker_node_when_its_node_dies() {
    let world = World::new();
    let (mut node_a, node_b) = cluster(&world);
    let nodes = format!("{},{}", node_a.url(), node_b.url());
    let controller = Controller::start(
        &world,
        Some(node_a.port),
        &["--broker", &nodes, "--stale-after", "3", "--offline-after", "10"],
    );
    let server = controller.server_url();
    give_busybox(&world, DEVICE, "busybox:nodes");
    let _agent = start_agent(&world, DEVICE, &node_b.url(), &[]);
    apply_yaml(&server, &world, "steady.yaml", STEADY);
    wait_for("revision 1 through the bridge", Duration::from_secs(60), || settled(&server, "steady", 1, 1));
    let run = world.path().join(format!("run-{DEVICE}"));
    let pid = wait_for("its pid", Duration::from_secs(10), || running_pid(&run, "steady-0"));
    assert!(connected_through(&controller.proc, "ingest connected", &node_a.url()), "the controller is not on node a");

    node_a.proc.kill9();
    wait_for("the controller on node b", Duration::from_secs(20), || {
        connected_through(&controller.proc, "ingest connected", &node_b.url()).then_some(())
    });
    carries_on(&server, &world, &controller, pid);

    // No node left: a command is refused at once, saying why, rather than
    // waiting out its deadline as if the device were slow.
    let mut node_b = node_b;
    node_b.proc.kill9();
    wait_for("the controller without a broker", Duration::from_secs(10), || {
        get_json::<serde_json::Value>(controller.http, "/healthz").ok().filter(|h| h["broker_connected"] == false)
    });
    let (ok, out, err) = baton_cli(&server, &["exec", "--device", DEVICE, "steady", "--", "true"]);
    assert!(!ok && err.contains("lost its MQTT broker"), "{out}{err}");
}

/// Symptom this answers: a node whose host is silent (a firewall dropping
/// packets, a wedged broker) answered no CONNECT; the agent's connection
/// attempt was restarted by its own timers every second, never timed out,
/// and the next node was never tried.
#[test]
fn a_silent_first_node_is_given_up_for_the_next() {
    let world = World::new();
    // Takes connections (the kernel's backlog) and never says a word.
    let silent = std::net::TcpListener::bind("127.0.0.1:0").expect("a silent node");
    let silent_url = format!("mqtt://127.0.0.1:{}", silent.local_addr().expect("its port").port());
    let controller = Controller::start(&world, None, &[]);
    let agent = start_agent(&world, DEVICE, &format!("{silent_url},{}", controller.broker_url()), &["--no-workloads"]);
    wait_for("the agent on the controller's broker", Duration::from_secs(30), || {
        connected_through(&agent, "connected to broker", &controller.broker_url()).then_some(())
    });
    wait_for("the device online", Duration::from_secs(10), || {
        (controller.device(DEVICE).map(|d| d.status) == Some(Status::Online)).then_some(())
    });
    let log = std::fs::read_to_string(&agent.log).unwrap_or_default();
    assert!(log.contains("trying the next broker node"), "{log}");
}

/// Symptom this answers: the controller's connection attempt was started
/// again by every message it had to send, so while it was busy (documents
/// going out for a rollout) a silent first node kept it off the broker for
/// good, and its start-up never ended.
#[test]
fn a_busy_controller_gives_up_a_silent_node_too() {
    let world = World::new();
    let broker = Mosquitto::start(&world);
    let mut controller = Controller::start(&world, Some(broker.port), &[]);
    let server = controller.server_url();
    let _fleet = start_simulator(&world, "busy", 3, &broker.url(), &[]);
    wait_for("three devices online", Duration::from_secs(30), || {
        let online = controller.devices().iter().filter(|d| d.status == Status::Online).count();
        (online == 3).then_some(())
    });
    let silent = std::net::TcpListener::bind("127.0.0.1:0").expect("a silent node");
    let silent_url = format!("mqtt://127.0.0.1:{}", silent.local_addr().expect("its port").port());

    // A new revision every 200 ms, each a new document for the devices, for
    // as long as the controller is coming back.
    let busy = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(true));
    let applier = {
        let (busy, server, path) = (busy.clone(), server.clone(), world.path().join("busy.yaml"));
        std::thread::spawn(move || {
            let mut applied = 0;
            while busy.load(std::sync::atomic::Ordering::Relaxed) {
                let rev =
                    format!("name: busy\nimage: busybox:busy\nenv: {{N: \"{applied}\"}}\ncommand: [sleep, \"1000\"]\n");
                std::fs::write(&path, rev).expect("manifest");
                if baton_cli(&server, &["apply", "-f", path.to_str().expect("utf-8")]).0 {
                    applied += 1;
                }
                std::thread::sleep(Duration::from_millis(200));
            }
            applied
        })
    };
    // Returns once the controller says it has a broker (or panics after 20 s).
    controller.restart_with(&["--broker", &format!("{silent_url},{}", broker.url())]);
    busy.store(false, std::sync::atomic::Ordering::Relaxed);
    let applied = applier.join().expect("the applier");
    assert!(applied > 10, "only {applied} revisions applied: the controller was not kept busy");
    assert!(connected_through(&controller.proc, "ingest connected", &broker.url()));
    let log = std::fs::read_to_string(&controller.proc.log).unwrap_or_default();
    assert!(log.contains("ingest trying the next broker node"), "{log}");
}
