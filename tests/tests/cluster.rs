//! The highly available control plane of `deploy/cluster/` brought up on
//! loopback by its own `up.sh`: PostgreSQL, a three-node NATS cluster (MQTT
//! with JetStream) and three controllers. A real agent with a container and
//! twelve simulated devices run on it; the simulated devices' NATS node,
//! then (with that node still down) the leading controller are killed with
//! kill -9. About 45 s.

use std::time::Duration;

use baton_controller::fleet::Status;
use baton_tests::*;

const DEVICE: &str = "pi-cl";

fn devices(api: u16) -> Vec<baton_controller::view::DeviceView> {
    get_json(api, "/api/v1/devices").unwrap_or_default()
}

/// It was ignored while NATS 2.9 refused the controller's QoS 1
/// subscriptions under load (`Unable to add JetStream consumer … timeout`:
/// about half the runs beside CI's other suites); `up.sh` now starts the
/// controllers with `--ingest-qos 0`, whose subscriptions need no JetStream
/// consumer (deploy/cluster/README.md).
#[test]
fn the_deployed_cluster_survives_a_broker_node_and_its_leader_killed() {
    let world = World::new();
    let cluster = DeployedCluster::up(&["--resolve-digests", "false"]);
    let leaders = cluster.serving();
    assert_eq!(leaders.len(), 1, "exactly one controller serves: {leaders:?}");
    let leader = leaders[0];
    for other in cluster.api.iter().filter(|p| **p != leader) {
        let (status, body) = get_status(*other, "/healthz").expect("every controller is up");
        assert_eq!(status, 503, "{body}");
        assert!(body.contains("standby"), "{body}");
        // Yet it serves the API, forwarded to the leader — once it has read
        // where the leader is: the three start together, and a standby that
        // was already waiting for the store's lock reads the leader's address
        // at its next try (every 2 s), answering 503 "not known yet" until then.
        wait_for("a standby forwarding to the leader", Duration::from_secs(10), || {
            get_status(*other, "/api/v1/devices").ok().filter(|(status, _)| *status == 200)
        });
    }
    assert_eq!(cluster.env["BATON_LEADER"], format!("http://127.0.0.1:{leader}"));
    let node = |i: usize| format!("mqtt://127.0.0.1:{}", cluster.mqtt[i]);

    // The real device on node 1 (where the first controller is too), the
    // simulated ones on node 2, then node 3.
    give_busybox(&world, DEVICE, "busybox:cl");
    let _agent = start_agent(&world, DEVICE, &format!("{},{},{}", node(0), node(1), node(2)), &[]);
    let _sim = start_simulator(&world, "c", 12, &format!("{},{},{}", node(1), node(2), node(0)), &[]);
    let online = |api: u16| devices(api).iter().filter(|d| d.status == Status::Online).count();
    wait_for("13 devices online", Duration::from_secs(60), || (online(leader) == 13).then_some(()));
    let server = format!("http://127.0.0.1:{leader}");
    let forever = |name: &str, word: &str| {
        format!(
            "name: {name}\nimage: busybox:cl\ncommand: [/bin/sh, -c, \"echo {word}; while true; do sleep 0.2; done\"]\nrollout: {{waves: [1, 50%, 100%], min_ready: 1}}\n"
        )
    };
    apply_yaml(&server, &world, "steady.yaml", &forever("steady", "steady"));
    apply_yaml(&server, &world, "app.yaml", &forever("app", "one"));
    wait_for("steady everywhere", Duration::from_secs(60), || settled(&server, "steady", 1, 13));
    wait_for("app everywhere", Duration::from_secs(60), || settled(&server, "app", 1, 13));
    let run = world.path().join(format!("run-{DEVICE}"));
    let steady = wait_for("the real steady container", Duration::from_secs(10), || running_pid(&run, "steady-0"));

    // A broker node dies under the simulated devices.
    let killed_at = baton_controller::controller::now_ms();
    cluster.kill9("nats-2");
    wait_for("every device heard again through the other nodes", Duration::from_secs(60), || {
        let back = devices(leader).iter().filter(|d| d.status == Status::Online && d.last_seen_ms > killed_at).count();
        (back == 13).then_some(())
    });
    apply_yaml(&server, &world, "app.yaml", &forever("app", "two"));
    let r = wait_for("the rollout through the remaining nodes", Duration::from_secs(90), || {
        baton_tests::describe_workload(&server, "app")?.rollout.filter(|r| !r.state.active())
    });
    assert_eq!(r.state, baton_controller::rollout::State::Succeeded, "{r:?}");
    assert_eq!((r.counts.ready, r.counts.failed), (13, 0), "{r:?}");

    // The leading controller dies, with a node still down: another one
    // serves, with the same fleet, and its subscriptions work.
    let index = cluster.api.iter().position(|p| *p == leader).expect("the leader's port");
    cluster.kill9(&format!("controller-{}", index + 1));
    let next = wait_for("another controller serving", Duration::from_secs(30), || cluster.serving().first().copied());
    assert_ne!(next, leader);
    let server = format!("http://127.0.0.1:{next}");
    wait_for("13 devices online at the new leader", Duration::from_secs(60), || {
        let online = devices(next).iter().filter(|d| d.status == Status::Online).count();
        (online == 13).then_some(())
    });
    apply_yaml(&server, &world, "app.yaml", &forever("app", "three"));
    wait_for("revision 3 everywhere", Duration::from_secs(90), || settled(&server, "app", 3, 13));

    assert!(alive(steady) && running_pid(&run, "steady-0") == Some(steady), "a container was touched");
    let w = describe_workload(&server, "steady").expect("steady");
    let real = w.devices.iter().find(|d| d.device == DEVICE).expect("the real device");
    assert_eq!(real.reported.as_ref().map(|r| r.restarts), Some(0), "{real:?}");
    assert_eq!(w.revision, 1);
}
