//! Service discovery between real devices: a workload that `uses` another
//! finds its healthy endpoints in `/run/baton/services/NAME` (kept current as
//! they move) and in `BATON_SERVICE_NAME_PORT` at start. Root only (CI is root).

use std::time::Duration;

use baton_controller::view::WorkloadView;
use baton_tests::*;

fn exec(server: &str, device: &str, workload: &str, script: &str) -> Option<String> {
    let (ok, out, _) = baton_cli(server, &["exec", "--device", device, workload, "--", "/bin/sh", "-c", script]);
    ok.then_some(out)
}

fn running(server: &str, name: &str) -> Option<()> {
    let (ok, out, _) = baton_cli(server, &["describe", "workload", name, "-o", "json"]);
    let w: WorkloadView = ok.then(|| serde_json::from_str(&out).ok()).flatten()?;
    (w.devices.len() == 1 && w.running() == 1).then_some(())
}

#[test]
fn a_consumer_sees_the_healthy_endpoints_of_what_it_uses_and_follows_them() {
    let world = World::new();
    let controller = Controller::start(&world, None, &[]);
    let server = controller.server_url();
    let mut agents = Vec::new();
    for (device, role) in [("pi-api", "api"), ("pi-client", "client")] {
        give_busybox(&world, device, "busybox:sd");
        agents.push(start_agent(&world, device, &controller.broker_url(), &["--label", &format!("role={role}")]));
    }
    wait_for("two devices", Duration::from_secs(20), || (controller.devices().len() == 2).then_some(()));
    let address = wait_for("pi-api's address", Duration::from_secs(20), || {
        controller.device("pi-api")?.inventory?.addresses.first().cloned()
    });

    let loop_ = "while true; do sleep 0.2; done";
    let manifest = world.path().join("apps.yaml");
    std::fs::write(
        &manifest,
        format!(
            "name: api\nimage: busybox:sd\ncommand: [/bin/sh, -c, '{loop_}']\nports: [{{name: http, port: 8080}}]\nplacement: {{selector: {{role: api}}}}\n---\nname: client\nimage: busybox:sd\ncommand: [/bin/sh, -c, '{loop_}']\nuses: [api]\nplacement: {{selector: {{role: client}}}}\n"
        ),
    )
    .expect("manifest");
    let (ok, _, err) = baton_cli(&server, &["apply", "-f", manifest.to_str().expect("utf-8")]);
    assert!(ok, "{err}");
    wait_for("api running", Duration::from_secs(30), || running(&server, "api"));
    wait_for("client running", Duration::from_secs(30), || running(&server, "client"));

    let expected = format!("{address}:8080 http pi-api");
    wait_for("the endpoint file inside the client", Duration::from_secs(30), || {
        exec(&server, "pi-client", "client", "cat /run/baton/services/api")
            .filter(|out| out.trim() == expected)
            .map(|_| ())
    });
    // The file is read-only for the container.
    let out = exec(&server, "pi-client", "client", "echo x > /run/baton/services/api && echo wrote || echo refused");
    assert_eq!(out.as_deref().map(str::trim), Some("refused"));

    // The api goes away: the client's list empties, live, without a restart.
    let (ok, _, err) = baton_cli(&server, &["delete", "workload", "api"]);
    assert!(ok, "{err}");
    wait_for("the endpoint list to empty", Duration::from_secs(30), || {
        exec(&server, "pi-client", "client", "cat /run/baton/services/api; echo end")
            .filter(|out| out.trim() == "end")
            .map(|_| ())
    });
    let (ok, out, _) = baton_cli(&server, &["describe", "workload", "client", "-o", "json"]);
    let w: WorkloadView = serde_json::from_str(&out).expect("json");
    assert!(ok && w.devices[0].reported.as_ref().is_some_and(|r| r.restarts == 0), "client restarted: {w:?}");

    // It comes back: a client started from now on also gets it in its environment.
    let (ok, _, err) = baton_cli(&server, &["apply", "-f", manifest.to_str().expect("utf-8")]);
    assert!(ok, "{err}");
    wait_for("the endpoint back", Duration::from_secs(30), || {
        exec(&server, "pi-client", "client", "cat /run/baton/services/api").filter(|o| o.trim() == expected).map(|_| ())
    });
    let (ok, _, err) = baton_cli(&server, &["restart", "client", "--device", "pi-client"]);
    assert!(ok, "{err}");
    wait_for("the environment of a restarted client", Duration::from_secs(30), || {
        exec(&server, "pi-client", "client", "echo $BATON_SERVICE_API_HTTP")
            .filter(|o| o.trim() == format!("{address}:8080"))
            .map(|_| ())
    });
    for a in &mut agents {
        assert!(a.is_running(), "{} died", a.name);
    }
}
