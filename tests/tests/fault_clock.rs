//! Field faults, clocks: Raspberry Pis have no real-time clock, and on an
//! isolated network NTP may never sync. Agents run under `faketime` (Debian's
//! libfaketime) days behind and days ahead: they join over TLS, run their
//! documents and answer commands. Real agents, real containers. About 20 s.

use std::process::Command;
use std::time::Duration;

use baton_controller::fleet::Status;
use baton_tests::*;

/// Symptom: with the agent's clock 3 days behind, `baton logs`, `exec` and
/// `restart` all failed ("deadline … is not within 24 h"); with it ahead,
/// every command was dropped as past its deadline.
#[test]
fn devices_days_behind_or_ahead_join_over_tls_run_and_answer_commands() {
    let world = World::new();
    let controller = Controller::start(&world, None, &["--mqtt-auth", "--mqtt-tls"]);
    let server = controller.server_url();
    let broker = format!("mqtts://127.0.0.1:{}", controller.mqtt);
    let (ok, token, err) = baton_cli(&server, &["token", "create", "--uses", "2"]);
    assert!(ok, "{err}");
    let devices = [("pi-behind", "-3d", "behind"), ("pi-ahead", "+3d", "ahead of")];
    let mut agents = Vec::new();
    for (id, offset, _) in devices {
        give_busybox(&world, id, "busybox:clock");
        std::fs::write(world.path().join("empty.toml"), "").expect("config");
        let out = Command::new(bin("baton-agent"))
            .envs(faketime_env(offset))
            .args(["join", token.trim(), "--config"])
            .arg(world.path().join("empty.toml"))
            .args(["--broker", &broker, "--device-id", id, "--data-dir"])
            .arg(world.path().join(format!("agent-{id}")))
            .output()
            .expect("baton-agent join");
        assert!(out.status.success(), "{id} could not join over TLS: {}", String::from_utf8_lossy(&out.stderr));
        agents.push(start_agent_at_clock(&world, id, &broker, &[], offset));
    }
    wait_for("both online", Duration::from_secs(30), || {
        devices.iter().all(|(id, _, _)| controller.device(id).is_some_and(|d| d.status == Status::Online)).then_some(())
    });
    apply_yaml(
        &server,
        &world,
        "web.yaml",
        "name: web\nimage: busybox:clock\ncommand: [/bin/sh, -c, \"echo tick; while true; do sleep 0.2; done\"]\n",
    );
    wait_for("web on both", Duration::from_secs(40), || settled(&server, "web", 1, 2));

    for (id, _, way) in devices {
        let logs = wait_for("the log through the controller", Duration::from_secs(20), || {
            let (ok, out, _) = baton_cli(&server, &["logs", "web", "--device", id, "--tail", "5"]);
            (ok && out.contains("tick")).then_some(out)
        });
        assert!(logs.contains("tick"));
        let (ok, out, err) = baton_cli(&server, &["exec", "--device", id, "web", "--", "echo", "hi"]);
        assert!(ok && out.contains("hi"), "exec on {id}: {out}{err}");
        let (ok, out, err) = baton_cli(&server, &["restart", "web", "--device", id]);
        assert!(ok, "restart on {id}: {out}{err}");
        wait_for("the restart counted", Duration::from_secs(20), || {
            let w = describe_workload(&server, "web")?;
            let d = w.devices.iter().find(|d| d.device == id)?;
            (d.reported.as_ref()?.restarts == 1).then_some(())
        });
        // The operator sees how far off the clock is.
        let (_, described, _) = baton_cli(&server, &["describe", "device", id]);
        let clock = described.lines().find_map(|l| l.strip_prefix("Clock:")).map(str::trim);
        assert!(clock.is_some_and(|c| c.starts_with(&format!("3d 0h {way} the controller"))), "{described}");
    }
    let (_, table, _) = baton_cli(&server, &["get", "devices"]);
    assert!(table.contains("online (clock -3d 0h)") && table.contains("online (clock +3d 0h)"), "{table}");
}
