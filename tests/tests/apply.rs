//! The operator's loop end to end: `baton apply` → the controller places
//! workloads and publishes desired documents → agents run them → `baton get
//! workloads` shows them running; updates roll revisions; bad manifests change
//! nothing; a controller restart disturbs nothing; delete removes everywhere.

use std::time::Duration;

use baton_controller::view::{ApplyResult, WorkloadView};
use baton_tests::*;

fn workloads(server: &str) -> Vec<WorkloadView> {
    let (ok, out, err) = baton_cli(server, &["get", "workloads", "-o", "json"]);
    assert!(ok, "{err}");
    serde_json::from_str(&out).expect("json")
}

fn running(server: &str, name: &str, revision: u64, devices: usize) -> Option<()> {
    let w = workloads(server).into_iter().find(|w| w.name == name)?;
    (w.revision == revision && w.devices.len() == devices && w.running() == devices).then_some(())
}

#[test]
fn apply_places_runs_updates_survives_restart_and_deletes() {
    let world = World::new();
    let mut controller = Controller::start(&world, None, &[]);
    let server = controller.server_url();
    let mut agents = Vec::new();
    for (device, site) in [("pi-lyon", "lyon"), ("pi-paris", "paris")] {
        give_busybox(&world, device, "busybox:e2e");
        agents.push(start_agent(&world, device, &controller.broker_url(), &["--label", &format!("site={site}")]));
    }
    wait_for("two devices", Duration::from_secs(20), || (controller.devices().len() == 2).then_some(()));

    let dir = world.path().join("manifests");
    std::fs::create_dir_all(&dir).expect("dir");
    let loop_ = "while true; do sleep 0.2; done";
    std::fs::write(
        dir.join("apps.yaml"),
        format!(
            "name: web\nimage: busybox:e2e\ncommand: [/bin/sh, -c, 'echo v1; {loop_}']\nplacement: {{selector: {{site: lyon}}}}\n---\nname: agent-side\nimage: busybox:e2e\ncommand: [/bin/sh, -c, '{loop_}']\n"
        ),
    )
    .expect("manifest");
    let (ok, out, err) = baton_cli(&server, &["apply", "-f", dir.to_str().expect("utf-8")]);
    assert!(ok, "{err}");
    assert!(out.contains("workload/web created (revision 1)") && out.contains("workload/agent-side created"), "{out}");
    wait_for("web on lyon only", Duration::from_secs(30), || running(&server, "web", 1, 1));
    wait_for("agent-side everywhere", Duration::from_secs(30), || running(&server, "agent-side", 1, 2));
    let (ok, table, _) = baton_cli(&server, &["get", "workloads"]);
    assert!(ok && table.lines().any(|l| l.starts_with("web ") && l.contains("1/1")), "{table}");
    let (ok, text, _) = baton_cli(&server, &["describe", "workload", "web"]);
    assert!(ok && text.contains("pi-lyon") && !text.contains("pi-paris") && text.contains("running"), "{text}");

    // Applying the same file again changes nothing.
    let (ok, out, _) = baton_cli(&server, &["apply", "-f", dir.to_str().expect("utf-8"), "-o", "json"]);
    let results: Vec<ApplyResult> = serde_json::from_str(&out).expect("json");
    assert!(ok && results.iter().all(|r| r.action == "unchanged" && r.revision == 1), "{out}");

    // A bad document anywhere stores nothing, and the error names file, document and field.
    std::fs::write(dir.join("zz-bad.yaml"), "name: broken\nimage: busybox:e2e\nresources: {memory: plenty}\n")
        .expect("write");
    let (ok, _, err) = baton_cli(&server, &["apply", "-f", dir.to_str().expect("utf-8")]);
    assert!(!ok && err.contains("zz-bad.yaml: document 1: resources.memory"), "{err}");
    assert_eq!(workloads(&server).len(), 2, "a rejected apply stored something");
    std::fs::remove_file(dir.join("zz-bad.yaml")).expect("rm");

    // An update rolls the new revision onto the device.
    std::fs::write(
        dir.join("apps.yaml"),
        format!(
            "name: web\nimage: busybox:e2e\ncommand: [/bin/sh, -c, 'echo v2; {loop_}']\nplacement: {{selector: {{site: lyon}}}}\n---\nname: agent-side\nimage: busybox:e2e\ncommand: [/bin/sh, -c, '{loop_}']\n"
        ),
    )
    .expect("manifest");
    let (ok, out, err) = baton_cli(&server, &["apply", "-f", dir.to_str().expect("utf-8")]);
    assert!(ok && out.contains("workload/web updated (revision 2)"), "{out}{err}");
    wait_for("web revision 2", Duration::from_secs(30), || running(&server, "web", 2, 1));

    // A controller restart: state from the store, containers undisturbed.
    controller.restart();
    wait_for("both running after restart", Duration::from_secs(30), || {
        running(&server, "web", 2, 1)?;
        running(&server, "agent-side", 1, 2)
    });
    let w = workloads(&server);
    let side = w.iter().find(|w| w.name == "agent-side").expect("agent-side");
    assert!(
        side.devices.iter().all(|d| d.reported.as_ref().is_some_and(|r| r.restarts == 0)),
        "restarted by the controller restart: {side:?}"
    );

    let (ok, _, err) = baton_cli(&server, &["delete", "workload", "agent-side"]);
    assert!(ok, "{err}");
    wait_for("agent-side gone from devices", Duration::from_secs(30), || {
        controller
            .devices()
            .iter()
            .all(|d| d.report.as_ref().is_some_and(|r| r.workloads.iter().all(|w| w.name != "agent-side")))
            .then_some(())
    });
    let (ok, _, err) = baton_cli(&server, &["describe", "workload", "agent-side"]);
    assert!(!ok && err.contains("workload agent-side not found"), "{err}");
    for a in &mut agents {
        assert!(a.is_running(), "{} died", a.name);
    }
}
