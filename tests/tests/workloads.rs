//! The agent daemon running real containers from desired documents: apply,
//! survive `kill -9` of the agent without restarts, boot offline into the
//! persisted state, roll a new revision, remove. Root only (CI is root).

use std::path::PathBuf;
use std::time::Duration;

use baton_protocol::spec::{ContainerSpec, WorkloadSpec};
use baton_protocol::{Desired, Phase, Report};
use baton_tests::mqtt::{wait_report, RawClient};
use baton_tests::*;

const DEVICE: &str = "pi-w";

/// Signed as the test's own controller key, which the agents are told to trust.
fn desired_for(device: &str, generation: u64, workloads: Vec<WorkloadSpec>) -> Vec<u8> {
    signed_desired(device, &Desired { generation, workloads, ..Default::default() }, &TEST_SIGNING_SEED)
}

fn desired(generation: u64, workloads: Vec<WorkloadSpec>) -> Vec<u8> {
    desired_for(DEVICE, generation, workloads)
}

fn web(revision: u64, script: &str) -> WorkloadSpec {
    WorkloadSpec {
        name: "web".into(),
        revision,
        image: "busybox:e2e".into(),
        container: ContainerSpec { command: vec!["/bin/sh".into(), "-c".into(), script.into()], ..Default::default() },
        ..Default::default()
    }
}

fn is_web(r: &Report, revision: u64, phase: Phase) -> bool {
    r.workloads.iter().any(|w| w.name == "web" && w.revision == revision && w.phase == phase)
}

#[test]
fn agent_runs_desired_workloads_survives_kill_9_and_boots_offline() {
    let world = World::new();
    let controller = Controller::start(&world, None, &[]);
    let data = world.path().join(format!("agent-{DEVICE}"));
    let run: PathBuf = world.path().join(format!("run-{DEVICE}"));

    // Air-gapped image load through the CLI.
    let rootfs = baton_tests::fixtures::busybox_rootfs(world.path()).expect("rootfs");
    let layout =
        baton_tests::fixtures::oci_layout(&world.path().join("layout"), &rootfs, "busybox:e2e").expect("layout");
    assert!(load_image(&data, &layout).contains("loaded busybox:e2e"));

    let mut agent = start_agent(&world, DEVICE, &controller.broker_url(), &[]);
    let mut watch = RawClient::connect(controller.mqtt, "watch");
    watch.subscribe(&format!("baton/v1/dev/{DEVICE}/report"));
    let mut op = RawClient::connect(controller.mqtt, "operator");
    let topic = format!("baton/v1/dev/{DEVICE}/desired");
    op.publish(&topic, desired(1, vec![web(1, "echo serving; while true; do sleep 0.2; done")]), true);
    let r = wait_report(&mut watch, "web running", |r| r.generation == 1 && is_web(r, 1, Phase::Running));
    assert_eq!(r.workloads[0].restarts, 0);
    let pid = wait_for("web-0 pid", Duration::from_secs(10), || running_pid(&run, "web-0"));
    assert!(data.join("state/desired.bin").exists(), "desired document not persisted");

    // The agent crashes: the container does not notice.
    agent.kill9();
    assert!(alive(pid), "container died with the agent");
    agent = start_agent(&world, DEVICE, &controller.broker_url(), &[]);
    let r = wait_report(&mut watch, "web re-adopted", |r| is_web(r, 1, Phase::Running));
    assert_eq!(r.workloads[0].restarts, 0, "re-adoption restarted the container");
    assert_eq!(running_pid(&run, "web-0"), Some(pid));
    assert!(alive(pid));

    // Offline boot: the agent is down, its container dies, the broker is unreachable;
    // the agent starts the persisted state anyway.
    agent.kill9();
    // SAFETY: kill(2) on the container's pid, which this test observed running.
    unsafe { libc::kill(pid, libc::SIGKILL) };
    wait_for("exit record of web-0", Duration::from_secs(10), || {
        data.join("containers/web-0/exit.json").exists().then_some(())
    });
    let dead_broker = format!("mqtt://127.0.0.1:{}", free_port());
    agent = start_agent(&world, DEVICE, &dead_broker, &[]);
    let new_pid = wait_for("web-1 started offline", Duration::from_secs(20), || running_pid(&run, "web-1"));
    assert!(alive(new_pid));
    agent.kill9();

    // Back online: a new revision replaces the old, then removal stops everything.
    agent = start_agent(&world, DEVICE, &controller.broker_url(), &[]);
    wait_report(&mut watch, "web back", |r| is_web(r, 1, Phase::Running));
    op.publish(&topic, desired(2, vec![web(2, "echo v2; while true; do sleep 0.2; done")]), true);
    wait_report(&mut watch, "revision 2 running", |r| r.generation == 2 && is_web(r, 2, Phase::Running));
    // Start-first (no ports, devices or volumes): the old revision stops once
    // the new one is healthy — a running container without probes is.
    wait_for("the old revision to stop", Duration::from_secs(20), || (!alive(new_pid)).then_some(()));
    // Logs are written in batches (at most once a second): poll for the line.
    wait_for("v2 in the new container's log", Duration::from_secs(10), || {
        let log = std::fs::read_dir(data.join("containers"))
            .ok()?
            .flatten()
            .filter_map(|e| std::fs::read_to_string(e.path().join("container.log")).ok())
            .collect::<String>();
        log.contains("stdout v2").then_some(())
    });
    op.publish(&topic, desired(3, vec![]), true);
    wait_report(&mut watch, "no workloads", |r| r.generation == 3 && r.workloads.is_empty());
    wait_for("containers removed", Duration::from_secs(20), || {
        std::fs::read_dir(data.join("containers")).map(|d| d.count() == 0).unwrap_or(true).then_some(())
    });
    assert!(agent.is_running());
}

#[test]
fn missing_image_and_bad_documents_are_reported_not_fatal() {
    let world = World::new();
    let controller = Controller::start(&world, None, &[]);
    let agent = start_agent(&world, "pi-x", &controller.broker_url(), &[]);
    let mut watch = RawClient::connect(controller.mqtt, "watch");
    watch.subscribe("baton/v1/dev/pi-x/report");
    let mut op = RawClient::connect(controller.mqtt, "operator");
    // An image nobody serves: a loopback registry port with no listener (tests
    // never reach outside this machine), so the pull fails at once.
    let missing = format!("127.0.0.1:{}/nowhere/app:1", free_port());
    let mut w = web(1, "true");
    w.image = missing.clone();
    op.publish("baton/v1/dev/pi-x/desired", desired_for("pi-x", 1, vec![w]), true);
    let r = wait_report(&mut watch, "a failed pull with its reason", |r| {
        r.workloads.iter().any(|w| w.phase == Phase::Failed && w.last_error.as_deref().unwrap_or("").contains(&missing))
    });
    assert_eq!(r.generation, 1);
    // The operator hears of it as an event on the device, once per reason.
    let workload_errors = || -> Vec<String> {
        controller
            .events("pi-x")
            .iter()
            .filter(|e| e["name"] == "device.workload_error")
            .filter_map(|e| e["message"].as_str().map(str::to_string))
            .collect()
    };
    let said = wait_for("a device.workload_error event", Duration::from_secs(20), || {
        let said = workload_errors();
        said.iter().any(|m| m.contains("workload web") && m.contains(&missing)).then_some(said)
    });
    assert_eq!(said.len(), 1, "the same failure said twice: {said:?}");
    let mut bad = web(1, "true");
    bad.name = "Bad Name".into();
    op.publish("baton/v1/dev/pi-x/desired", desired_for("pi-x", 2, vec![bad]), true);
    let r = wait_report(&mut watch, "a refusal", |r| r.refused.is_some());
    assert!(r.refused.as_deref().unwrap_or("").contains("workloads[0].name"), "{r:?}");
    let mut a = agent;
    assert!(a.is_running());
}

#[test]
fn operators_read_logs_exec_and_restart_through_the_controller() {
    use std::io::BufRead;
    let world = World::new();
    // The test publishes the documents; the controller relays commands, signed with the same key.
    let key = test_signing_key_file(&world);
    let controller = Controller::start(&world, None, &["--signing-key", key.to_str().expect("utf-8")]);
    let device = "pi-l";
    let data = world.path().join(format!("agent-{device}"));
    let rootfs = baton_tests::fixtures::busybox_rootfs(world.path()).expect("rootfs");
    let layout =
        baton_tests::fixtures::oci_layout(&world.path().join("layout"), &rootfs, "busybox:e2e").expect("layout");
    load_image(&data, &layout);
    let mut agent = start_agent(&world, device, &controller.broker_url(), &[]);
    let mut watch = RawClient::connect(controller.mqtt, "watch");
    watch.subscribe(&format!("baton/v1/dev/{device}/report"));
    let mut op = RawClient::connect(controller.mqtt, "operator");
    let counter = "i=0; while true; do echo line-$i; i=$((i+1)); sleep 0.2; done";
    let mut job = web(1, "echo job-finished");
    job.name = "job".into();
    job.container.restart = baton_protocol::spec::RestartPolicy::Never;
    op.publish(&format!("baton/v1/dev/{device}/desired"), desired_for(device, 1, vec![web(1, counter), job]), true);
    wait_report(&mut watch, "web running, job exited", |r| {
        is_web(r, 1, Phase::Running) && r.workloads.iter().any(|w| w.name == "job" && w.phase == Phase::Exited)
    });
    let server = controller.server_url();

    let tail = wait_for("two log lines", Duration::from_secs(15), || {
        let (ok, out, _) = baton_cli(&server, &["logs", "web", "--device", device, "--tail", "2"]);
        (ok && out.lines().count() == 2).then_some(out)
    });
    assert!(tail.lines().all(|l| l.contains(" stdout line-")), "{tail}");
    let (ok, out, err) = baton_cli(&server, &["logs", "job", "--device", device]);
    assert!(ok && out.contains("stdout job-finished"), "logs of an exited container: {out} {err}");
    // A workload the device does not have: not found (was 502), in the device's words.
    let (status, body) = get_status(controller.http, &format!("/api/v1/devices/{device}/logs/nosuch")).expect("logs");
    assert_eq!(status, 404, "{body}");
    assert!(body.contains("no containers"), "{body}");

    // Follow: new lines keep arriving on a live stream.
    let mut follow = std::process::Command::new(bin("baton"))
        .args(["logs", "web", "--device", device, "--tail", "1", "-f"])
        .env("BATON_SERVER", &server)
        .stdout(std::process::Stdio::piped())
        .spawn()
        .expect("baton logs -f");
    let mut lines = std::io::BufReader::new(follow.stdout.take().expect("stdout")).lines();
    let first = lines.next().expect("a first line").expect("utf-8");
    let n = |l: &str| l.rsplit("line-").next().and_then(|n| n.trim().parse::<u64>().ok()).unwrap_or(0);
    let later = lines.nth(3).expect("more lines while following").expect("utf-8");
    assert!(n(&later) > n(&first), "{first} then {later}");
    let _ = follow.kill();
    let _ = follow.wait();

    let out = std::process::Command::new(bin("baton"))
        .args(["exec", "--device", device, "web", "--", "/bin/sh", "-c", "echo inside $(hostname); exit 3"])
        .env("BATON_SERVER", &server)
        .output()
        .expect("baton exec");
    assert_eq!(out.status.code(), Some(3), "{}", String::from_utf8_lossy(&out.stderr));
    assert_eq!(String::from_utf8_lossy(&out.stdout), "inside web-0\n");

    let (ok, out, err) = baton_cli(&server, &["restart", "web", "--device", device]);
    assert!(ok && out.contains("restarting"), "{out} {err}");
    wait_report(&mut watch, "a restart", |r| {
        r.workloads.iter().any(|w| w.name == "web" && w.restarts == 1 && w.phase == Phase::Running)
    });
    // Who restarted what, where: an event on the device.
    wait_for("a workload.restarted event", Duration::from_secs(10), || {
        controller
            .events(device)
            .iter()
            .any(|e| {
                e["name"] == "workload.restarted"
                    && e["message"].as_str().is_some_and(|m| m.contains("restarted workload web on pi-l"))
            })
            .then_some(())
    });

    let (ok, _, err) = baton_cli(&server, &["logs", "nope", "--device", device]);
    assert!(!ok && err.contains("workload nope has no containers"), "{err}");
    agent.kill9();
    wait_for("pi-l offline", Duration::from_secs(10), || {
        (controller.device(device)?.status == baton_controller::fleet::Status::Offline).then_some(())
    });
    let (ok, _, err) = baton_cli(&server, &["logs", "web", "--device", device]);
    assert!(!ok && err.contains("device pi-l is offline"), "{err}");
}
