//! Field faults, restores: a controller's store restored from an older
//! backup, or lost with the signing key kept, takes its fleet back; replays
//! of old documents stay refused. Simulated devices (the real MQTT link and
//! document checks). About 30 s.

use std::time::Duration;

use baton_tests::*;

fn manifest(tag: &str) -> String {
    format!("name: app\nimage: 127.0.0.1:9/app:{tag}\nrollout: {{waves: [100%], min_ready: 1}}\n")
}

fn events(server: &str) -> String {
    let (ok, out, err) = baton_cli(server, &["get", "events"]);
    assert!(ok, "{err}");
    out
}

/// Symptom: restoring the data dir from a backup froze the fleet — every
/// device refused every document ("generation 1 is not newer than 3") until
/// the controller's counter happened to pass each device's, and the operator
/// saw nothing of it.
#[test]
fn a_controller_restored_from_an_older_backup_takes_its_fleet_back() {
    let world = World::new();
    let mut controller = Controller::start(&world, None, &[]);
    let server = controller.server_url();
    let _sim = start_simulator(&world, "r", 2, &controller.broker_url(), &[]);
    wait_for("2 devices", Duration::from_secs(30), || (controller.devices().len() == 2).then_some(()));
    apply_yaml(&server, &world, "app.yaml", &manifest("1"));
    wait_for("revision 1", Duration::from_secs(30), || settled(&server, "app", 1, 2));

    let backup = world.path().join("fleet.backup");
    let (ok, out, err) = baton_cli(&server, &["backup", "-o", backup.to_str().expect("utf-8")]);
    assert!(ok && out.contains("signing.key"), "{out}{err}");
    // The store and its copy hold workload specs and events: owner only (a trial found 0644).
    use std::os::unix::fs::PermissionsExt;
    let db = world.path().join("controller").join("baton.db");
    for file in [&backup, &db, &db.with_extension("db-wal")] {
        let mode = std::fs::metadata(file).expect("the file").permissions().mode() & 0o777;
        assert_eq!(mode, 0o600, "{} is {mode:o}", file.display());
    }
    for tag in ["2", "3"] {
        apply_yaml(&server, &world, "app.yaml", &manifest(tag));
    }
    wait_for("revision 3", Duration::from_secs(30), || settled(&server, "app", 3, 2));

    // Restoring needs the controller stopped: its data dir is locked while it runs.
    let data_dir = world.path().join("controller");
    let args = ["restore", backup.to_str().expect("utf-8"), "--data-dir", data_dir.to_str().expect("utf-8")];
    let (ok, _, err) = baton_cli(&server, &args);
    assert!(!ok && err.contains("in use by a running controller"), "{err}");
    assert_eq!(controller.proc.terminate(), Some(0));
    let (ok, out, err) = baton_cli(&server, &args);
    assert!(ok, "{out}{err}");
    controller.restart_after_stop();

    // The restored store knows revision 1 only (and, until the devices report
    // again, what they ran when the backup was taken); the devices run 3
    // under a newer generation. They are given revision 1 again, past it.
    wait_for("both devices taken back", Duration::from_secs(30), || {
        let log = events(&server);
        (log.matches("issued again as generation").count() == 2).then_some(())
    });
    let w = wait_for("the fleet back on the restored revision 1", Duration::from_secs(30), || {
        let w = settled(&server, "app", 1, 2)?;
        let applied = |id: &str| controller.device(id).and_then(|d| d.heartbeat).map_or(0, |h| h.applied_generation);
        (applied("r-0000") > 3 && applied("r-0001") > 3).then_some(w)
    });
    assert_eq!(w.revision, 1, "{w:?}");
    for d in &w.devices {
        assert_eq!(d.refused, None, "{} still refuses: {d:?}", d.device);
    }

    // And the fleet follows it from there.
    apply_yaml(&server, &world, "app.yaml", &manifest("4"));
    wait_for("revision 2 (of tag 4) after the restore", Duration::from_secs(30), || settled(&server, "app", 2, 2));
}

/// The store lost, the signing key kept: the rebuilt controller leaves
/// devices alone until it has something for them, then is obeyed.
#[test]
fn a_controller_rebuilt_with_its_key_but_no_store_is_obeyed() {
    let world = World::new();
    let mut controller = Controller::start(&world, None, &[]);
    let server = controller.server_url();
    let _sim = start_simulator(&world, "n", 2, &controller.broker_url(), &[]);
    wait_for("2 devices", Duration::from_secs(30), || (controller.devices().len() == 2).then_some(()));
    for tag in ["1", "2", "3"] {
        apply_yaml(&server, &world, "app.yaml", &manifest(tag));
        wait_for("each revision", Duration::from_secs(30), || settled(&server, "app", tag.parse().unwrap_or(0), 2));
    }
    assert_eq!(controller.proc.terminate(), Some(0));
    for f in ["baton.db", "baton.db-wal", "baton.db-shm"] {
        let _ = std::fs::remove_file(world.path().join("controller").join(f));
    }
    controller.restart_after_stop();
    wait_for("the devices registered again", Duration::from_secs(30), || {
        (controller.devices().len() == 2).then_some(())
    });
    apply_yaml(&server, &world, "other.yaml", "name: other\nimage: 127.0.0.1:9/other:1\n");
    wait_for("the new store's workload running", Duration::from_secs(30), || settled(&server, "other", 1, 2));
}
