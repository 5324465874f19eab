//! Field faults, processes: agents and controllers killed at the worst
//! moments. Real processes and real containers (root; CI is root).
//! About 1.5 min.

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

/// Symptom: a second agent started by hand on a device whose service
/// already runs one (to "have a look") fought the first over the MQTT
/// session and the same containers; one on another data dir but the same
/// cgroup parent would kill the first's containers as orphans. Both are
/// refused now, naming the pid that runs, and nothing of the first is touched.
#[test]
fn a_second_agent_on_one_device_is_refused_and_touches_nothing() {
    let world = World::new();
    let controller = Controller::start(&world, None, &[]);
    let server = controller.server_url();
    let run = world.path().join(format!("run-{DEVICE}"));
    give_busybox(&world, DEVICE, "busybox:field");
    let mut agent = start_agent(&world, DEVICE, &controller.broker_url(), &[]);
    let log_of = |name: &str| std::fs::read_to_string(world.path().join(format!("{name}.log"))).unwrap_or_default();
    apply_yaml(&server, &world, "web.yaml", &web("while true; do sleep 0.2; done"));
    wait_for("revision 1 healthy", Duration::from_secs(30), || settled(&server, "web", 1, 1));
    let pid = wait_for("its pid", Duration::from_secs(10), || running_pid(&run, "web-0"));

    // The same flags again: the same data dir and cgroup parent.
    let args = agent_args(&world, DEVICE, &controller.broker_url(), &[]);
    let mut again = Proc::spawn("agent-again", &bin("baton-agent"), &args, world.path());
    let code = wait_for("the second agent refused", Duration::from_secs(30), || again.exit_code());
    assert_ne!(code, 0);
    let log = log_of("agent-again");
    assert!(log.contains(&format!("another baton-agent (pid {})", agent.pid())) && log.contains("data dir"), "{log}");

    // Its own data dir, but the first one's cgroup parent.
    let mut args = agent_args(&world, "pi-other", &controller.broker_url(), &[]);
    let parent = args.iter().position(|a| a == "--cgroup-parent").expect("--cgroup-parent") + 1;
    args[parent] = format!("/{}-{DEVICE}", world.cgroup_prefix());
    let mut other = Proc::spawn("agent-other", &bin("baton-agent"), &args, world.path());
    let code = wait_for("the agent on the same cgroup parent refused", Duration::from_secs(30), || other.exit_code());
    assert_ne!(code, 0);
    let log = log_of("agent-other");
    assert!(log.contains("cgroup parent") && log.contains(&format!("pid {}", agent.pid())), "{log}");

    assert!(agent.is_running(), "the first agent stopped");
    assert_eq!(running_pid(&run, "web-0"), Some(pid), "the container was replaced");
    assert!(alive(pid));
    let d = controller.device(DEVICE).expect("the device");
    assert_eq!(d.status, baton_controller::fleet::Status::Online, "{d:?}");
    assert!(controller.device("pi-other").is_none(), "the refused agent reached the broker");
}

/// Symptom: a device reflashed under its old id (a fresh data dir) while
/// the broker still held its session got no document for a minute: its
/// repeated subscription was not handed the retained document, and it
/// waited for the controller's once-a-minute resend. A device that reports
/// no document at all now gets it again after 5 s.
#[test]
fn a_reflashed_device_gets_its_document_at_once_from_the_session_it_left() {
    let world = World::new();
    let controller = Controller::start(&world, None, &[]);
    let server = controller.server_url();
    let data = world.path().join(format!("agent-{DEVICE}"));
    let run = world.path().join(format!("run-{DEVICE}"));
    let mut agent = start_agent(&world, DEVICE, &controller.broker_url(), &[]);
    // An image nobody serves: the document is applied and nothing runs.
    let image = format!("127.0.0.1:{}/nowhere/app:1", free_port());
    apply_yaml(&server, &world, "ghost.yaml", &format!("name: ghost\nimage: {image}\n"));
    let desired = data.join("state").join("desired.bin");
    wait_for("the document kept by the first agent", Duration::from_secs(30), || desired.exists().then_some(()));

    agent.kill9();
    std::fs::remove_dir_all(&data).expect("reflash: the data dir");
    let _ = std::fs::remove_dir_all(&run);
    let _agent = start_agent(&world, DEVICE, &controller.broker_url(), &[]);
    // Well inside the controller's one-minute resend.
    wait_for("the document kept by the reflashed agent", Duration::from_secs(20), || desired.exists().then_some(()));
}

/// Symptom: a device that died while the controller was restarting (its
/// embedded broker lost the Last Will) stayed `stale` forever, was chosen as
/// the canary of the next rollout and held it in wave 1 forever; rollouts
/// counted devices as updated that never ran the revision.
#[test]
fn a_device_that_died_while_the_controller_was_down_goes_offline_and_holds_no_rollout() {
    let world = World::new();
    let mut controller =
        Controller::start(&world, None, &["--stale-after", "3", "--offline-after", "8", "--reschedule-after", "600"]);
    let server = controller.server_url();
    let broker = controller.broker_url();
    // `a-0000` sorts first: the canary of any rollout, if it were taken for reachable.
    // Heartbeats every 300 s (the agent's default): between them the
    // controller lets a device be quiet for 10 min, but not one it has not
    // heard since a start that restarted its (embedded) broker.
    let mut doomed = start_simulator(&world, "a", 1, &broker, &["--heartbeat-interval", "300"]);
    let _alive = start_simulator(&world, "b", 2, &broker, &["--heartbeat-interval", "300"]);
    wait_for("3 devices", Duration::from_secs(30), || (controller.devices().len() == 3).then_some(()));
    let manifest =
        |tag: &str| format!("name: app\nimage: 127.0.0.1:9/app:{tag}\nrollout: {{waves: [1, 100%], min_ready: 1}}\n");
    apply_yaml(&server, &world, "app.yaml", &manifest("1"));
    wait_for("revision 1 on 3 devices", Duration::from_secs(30), || settled(&server, "app", 1, 3));

    // The controller (and its embedded broker) goes down; meanwhile a-0000 loses power.
    assert_eq!(controller.proc.terminate(), Some(0));
    doomed.kill9();
    controller.restart_after_stop();
    let status = |id: &str| controller.device(id).map(|d| d.status);
    use baton_controller::fleet::Status;
    wait_for("the others online, a-0000 stale", Duration::from_secs(30), || {
        let online = status("b-0000") == Some(Status::Online) && status("b-0001") == Some(Status::Online);
        (online && status("a-0000") == Some(Status::Stale)).then_some(())
    });

    // A rollout now does not wait for it: another device leads.
    apply_yaml(&server, &world, "app.yaml", &manifest("2"));
    let r = wait_for("the rollout to finish", Duration::from_secs(60), || {
        describe_workload(&server, "app")?.rollout.filter(|r| !r.state.active())
    });
    assert_eq!(r.state, baton_controller::rollout::State::Succeeded, "{r:?}");
    assert_eq!((r.counts.ready, r.counts.devices), (2, 3), "a device counted as updated that never ran it: {r:?}");
    assert!(r.reason.as_deref().unwrap_or("").contains("get it when they return"), "{r:?}");

    // Silent past --offline-after: offline, whatever the broker said, with an event saying why.
    wait_for("a-0000 offline", Duration::from_secs(30), || (status("a-0000") == Some(Status::Offline)).then_some(()));
    let (ok, events, _) = baton_cli(&server, &["get", "events"]);
    assert!(ok && events.contains("no goodbye and no Last Will received"), "{events}");

    // It never comes back: the operator deletes it (a connected device is
    // refused), and it no longer counts anywhere, across a restart too.
    let (ok, _, err) = baton_cli(&server, &["delete", "device", "b-0000"]);
    assert!(!ok && err.contains("is connected"), "{err}");
    let (ok, out, err) = baton_cli(&server, &["delete", "device", "a-0000"]);
    assert!(ok && out.contains("device/a-0000 deleted"), "{out}{err}");
    let gone = |c: &Controller| c.device("a-0000").is_none() && c.devices().len() == 2;
    assert!(gone(&controller), "{:?}", controller.devices());
    let w = describe_workload(&server, "app").expect("app");
    assert_eq!(w.devices.len(), 2, "{:?}", w.devices);
    controller.restart();
    let status = |id: &str| controller.device(id).map(|d| d.status);
    wait_for("the two others online", Duration::from_secs(30), || {
        (status("b-0000") == Some(Status::Online) && status("b-0001") == Some(Status::Online)).then_some(())
    });
    assert!(gone(&controller), "the deleted device came back with the restart: {:?}", controller.devices());
    let (ok, events, _) = baton_cli(&server, &["get", "events", "--subject", "a-0000"]);
    assert!(ok && events.contains("device.deleted"), "{events}");
    // An agent that does come back under the id registers anew.
    let _back = start_simulator(&world, "a", 1, &broker, &["--heartbeat-interval", "300"]);
    wait_for("a-0000 back", Duration::from_secs(30), || (status("a-0000") == Some(Status::Online)).then_some(()));
}

/// Symptom (a new user's trial): a device frozen (SIGSTOP) across a
/// controller restart showed `online … 6s ago` after the restart — the
/// store's last word from before it — although the embedded broker had
/// restarted too and the device had not reconnected; README says such a
/// device is `stale` until heard. Default windows (60 s stale): the old
/// rule kept it `online` for a minute.
#[test]
fn a_device_frozen_across_a_controller_restart_is_stale_until_heard() {
    let world = World::new();
    let mut controller = Controller::start(&world, None, &[]);
    let broker = controller.broker_url();
    let frozen = start_simulator(&world, "f", 1, &broker, &[]);
    let _alive = start_simulator(&world, "g", 1, &broker, &[]);
    let status = |c: &Controller, id: &str| c.device(id).map(|d| d.status);
    use baton_controller::fleet::Status;
    wait_for("2 devices online", Duration::from_secs(30), || {
        (status(&controller, "f-0000") == Some(Status::Online) && status(&controller, "g-0000") == Some(Status::Online))
            .then_some(())
    });

    let pid = frozen.pid().to_string();
    let signal = |sig: &str| {
        let ok = std::process::Command::new("kill").args([sig, &pid]).status().expect("kill").success();
        assert!(ok, "kill {sig} {pid}");
    };
    signal("-STOP");
    controller.restart();
    // The live one reconnects and is heard; the frozen one is never shown
    // online meanwhile.
    wait_for("g-0000 online again", Duration::from_secs(30), || {
        let f = status(&controller, "f-0000");
        assert_ne!(f, Some(Status::Online), "a device not heard since the restart shown online");
        (status(&controller, "g-0000") == Some(Status::Online)).then_some(())
    });
    assert_eq!(status(&controller, "f-0000"), Some(Status::Stale));

    signal("-CONT");
    wait_for("f-0000 online once heard", Duration::from_secs(30), || {
        (status(&controller, "f-0000") == Some(Status::Online)).then_some(())
    });
}

/// kill -9 of the agent while it writes each of its state files, at each
/// stage of the write (half the temp file written; the temp file whole but
/// not renamed): every time it comes back with whole state and reaches what
/// is desired. `exit.json` is the shim's: killed writing it, the container is
/// lost and started again.
#[test]
fn an_agent_killed_while_writing_each_state_file_comes_back_whole() {
    let world = World::new();
    let controller = Controller::start(&world, None, &[]);
    let server = controller.server_url();
    let broker = controller.broker_url();
    let registry = RegistryServer::start(&world);
    let rootfs = baton_tests::fixtures::busybox_rootfs(&world.path().join("bb")).expect("rootfs");
    let layout = baton_tests::fixtures::oci_layout(&world.path().join("layout"), &rootfs, "kp").expect("layout");
    let data = world.path().join(format!("agent-{DEVICE}"));
    give_busybox(&world, DEVICE, "busybox:field");
    let revision = std::cell::Cell::new(0);
    let apply = |image: &str, text: &str| {
        revision.set(revision.get() + 1);
        let yaml = format!(
            "name: web\nimage: {image}\nhealth_deadline: 3\ncommand: [/bin/sh, -c, \"trap 'exit 0' TERM; echo {text}; while true; do sleep 0.2; done\"]\nrollout: {{min_ready: 1}}\n"
        );
        apply_yaml(&server, &world, "web.yaml", &yaml);
        revision.get()
    };
    let mut agent = start_agent(&world, DEVICE, &broker, &[]);
    let r = apply("busybox:field", "start");
    wait_for("the first revision", Duration::from_secs(30), || settled(&server, "web", r, 1));
    agent.terminate();

    for stage in ["torn", "written"] {
        for file in ["desired.bin", "proven.bin", "commands.seen", "images.json", "exit.json"] {
            let point = format!("{file}:{stage}");
            let mut doomed = start_agent_to_die_at(&world, DEVICE, &broker, &point);
            wait_for("online", Duration::from_secs(20), || {
                (controller.device(DEVICE)?.status == baton_controller::fleet::Status::Online).then_some(())
            });
            // Make the agent (or a shim) write the file.
            let mut want = revision.get();
            match file {
                "desired.bin" | "proven.bin" => want = apply("busybox:field", &point),
                "commands.seen" => {
                    let _ = baton_cli(&server, &["exec", "--device", DEVICE, "web", "--", "true"]);
                }
                "images.json" => {
                    let tag = format!("kp-{stage}");
                    registry.push(&layout, "kp", &format!("field/busybox:{tag}"));
                    want = apply(&format!("{}/field/busybox:{tag}", registry.host), &point);
                }
                _ => {
                    let (ok, _, err) = baton_cli(&server, &["restart", "web", "--device", DEVICE]);
                    assert!(ok, "{err}");
                }
            }
            if file == "exit.json" {
                // The shim died writing the exit record: the agent finds the container lost and starts another.
                wait_for("the container started again", Duration::from_secs(30), || {
                    let w = settled(&server, "web", want, 1)?;
                    (w.devices[0].reported.as_ref()?.restarts >= 1).then_some(())
                });
                doomed.terminate();
            } else {
                wait_for(&format!("the agent killed at {point}"), Duration::from_secs(30), || {
                    (!doomed.is_running()).then_some(())
                });
            }
            // Started again, unarmed: whole state, and what is desired runs.
            let killed_at = baton_controller::controller::now_ms();
            let mut agent = start_agent(&world, DEVICE, &broker, &[]);
            wait_for("online again", Duration::from_secs(20), || {
                let d = controller.device(DEVICE)?;
                (d.status == baton_controller::fleet::Status::Online && d.last_seen_ms > killed_at).then_some(())
            });
            wait_for(&format!("revision {want} after the kill at {point}"), Duration::from_secs(40), || {
                settled(&server, "web", want, 1)
            });
            let (ok, out, err) = baton_cli(&server, &["exec", "--device", DEVICE, "web", "--", "echo", "whole"]);
            assert!(ok && out.contains("whole"), "after {point}: {out}{err}");
            for state in ["state/desired.bin", "state/proven.bin"] {
                // (proven.bin appears once the revision has settled healthy.)
                if let Ok(bytes) = std::fs::read(data.join(state)) {
                    assert!(baton_protocol::decode(&bytes).is_ok(), "{state} unreadable after {point}");
                }
            }
            let images: serde_json::Value =
                serde_json::from_slice(&std::fs::read(data.join("images/images.json")).expect("images.json"))
                    .unwrap_or_else(|e| panic!("images.json unreadable after {point}: {e}"));
            assert!(images["images"].is_object());
            agent.terminate();
        }
    }
}

/// kill -9 of the controller right after an apply was stored, before its
/// documents went out (devices on Mosquitto, so they stay connected and
/// nothing on their side reminds the controller): the restarted controller
/// publishes what its store says, and the fleet runs it.
#[test]
fn a_controller_killed_mid_apply_publishes_what_it_stored_when_it_restarts() {
    let world = World::new();
    let mosquitto = Mosquitto::start(&world);
    let mut controller = Controller::start(&world, Some(mosquitto.port), &[]);
    let server = controller.server_url();
    let _sim = start_simulator(&world, "m", 3, &controller.broker_url(), &[]);
    wait_for("3 devices", Duration::from_secs(30), || (controller.devices().len() == 3).then_some(()));
    apply_yaml(&server, &world, "a.yaml", "name: a\nimage: 127.0.0.1:9/a:1\n");
    wait_for("a on 3", Duration::from_secs(30), || settled(&server, "a", 1, 3));

    controller.restart_armed(false, Some("apply:committed"));
    let path = world.path().join("b.yaml");
    std::fs::write(&path, "name: b\nimage: 127.0.0.1:9/b:1\n").expect("manifest");
    let (ok, _, _) = baton_cli(&server, &["apply", "-f", path.to_str().expect("utf-8")]);
    assert!(!ok, "the controller answered an apply it should have died in");
    wait_for("the controller dead", Duration::from_secs(10), || (!controller.proc.is_running()).then_some(()));
    controller.restart_armed(true, None);
    wait_for("b on 3 after the restart", Duration::from_secs(30), || settled(&server, "b", 1, 3));
}

/// kill -9 of the controller in the middle of a rollout: the restarted one
/// resumes it from the store, and it ends as it would have.
#[test]
fn a_controller_killed_mid_rollout_resumes_it_to_the_same_end() {
    let world = World::new();
    let mosquitto = Mosquitto::start(&world);
    let mut controller = Controller::start(&world, Some(mosquitto.port), &[]);
    let server = controller.server_url();
    let _sim = start_simulator(&world, "r", 12, &controller.broker_url(), &[]);
    wait_for("12 devices", Duration::from_secs(30), || (controller.devices().len() == 12).then_some(()));
    let app = |tag: &str| {
        format!("name: app\nimage: 127.0.0.1:9/app:{tag}\nrollout: {{waves: [1, 25%, 100%], min_ready: 2}}\n")
    };
    apply_yaml(&server, &world, "app.yaml", &app("1"));
    wait_for("revision 1", Duration::from_secs(30), || settled(&server, "app", 1, 12));
    apply_yaml(&server, &world, "app.yaml", &app("2"));
    wait_for("the second wave released", Duration::from_secs(30), || {
        (describe_workload(&server, "app")?.rollout?.wave >= 2).then_some(())
    });
    controller.restart_armed(true, None);
    let r = wait_for("the rollout to end", Duration::from_secs(60), || {
        describe_workload(&server, "app")?.rollout.filter(|r| !r.state.active())
    });
    assert_eq!(r.state, baton_controller::rollout::State::Succeeded, "{r:?}");
    assert_eq!((r.counts.ready, r.counts.failed), (12, 0), "{r:?}");
    assert!(settled(&server, "app", 2, 12).is_some());
}

/// The broker restarted under a connected fleet (a real device with a
/// container, simulated ones beside it): every device is back within
/// seconds, and no container is touched.
#[test]
fn a_broker_restarted_under_a_connected_fleet_gets_every_device_back_and_touches_no_container() {
    let world = World::new();
    let mut mosquitto = Mosquitto::start(&world);
    let controller = Controller::start(&world, Some(mosquitto.port), &[]);
    let server = controller.server_url();
    give_busybox(&world, DEVICE, "busybox:field");
    let _agent = start_agent(&world, DEVICE, &controller.broker_url(), &[]);
    let _sim = start_simulator(&world, "b", 20, &controller.broker_url(), &[]);
    wait_for("21 devices", Duration::from_secs(30), || (controller.devices().len() == 21).then_some(()));
    apply_yaml(
        &server,
        &world,
        "web.yaml",
        &web("while true; do sleep 0.2; done").replace("name: web", "name: web\nplacement: {selector: {}}"),
    );
    let run = world.path().join(format!("run-{DEVICE}"));
    let pid = wait_for("the real container", Duration::from_secs(40), || running_pid(&run, "web-0"));

    let restarted_at = baton_controller::controller::now_ms();
    mosquitto.restart();
    // Heard from since (reconnects are capped at 10 s, with jitter).
    let back = |c: &Controller| {
        c.devices()
            .iter()
            .filter(|d| d.status == baton_controller::fleet::Status::Online && d.last_seen_ms > restarted_at)
            .count()
    };
    wait_for("every device back", Duration::from_secs(40), || (back(&controller) == 21).then_some(()));
    wait_for("web running everywhere, reported again", Duration::from_secs(20), || settled(&server, "web", 1, 21));
    assert!(alive(pid) && running_pid(&run, "web-0") == Some(pid), "the container was touched");
    let w = describe_workload(&server, "web").expect("web");
    let real = w.devices.iter().find(|d| d.device == DEVICE).expect("the real device");
    assert_eq!(real.reported.as_ref().map(|r| r.restarts), Some(0), "{real:?}");
}
