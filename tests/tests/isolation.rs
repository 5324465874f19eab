//! Per-device identities on Mosquitto with the ACLs Baton ships
//! (`deploy/mosquitto/baton.acl`): a device cannot speak for another nor read
//! its documents, and a revoked device cannot connect.

use std::path::Path;
use std::process::Command;
use std::time::Duration;

use baton_controller::fleet::Status;
use baton_protocol::{encode, Message, Presence, PresenceState, TopicKind};
use baton_tests::mqtt::RawClient;
use baton_tests::*;

fn passwd(file: &Path, user: &str, password: &str, create: bool) {
    let mut cmd = Command::new(which("mosquitto_passwd").expect("mosquitto_passwd (package mosquitto)"));
    if create {
        cmd.arg("-c");
    }
    let out = cmd.arg("-b").arg(file).args([user, password]).output().expect("mosquitto_passwd");
    assert!(out.status.success(), "mosquitto_passwd: {}", String::from_utf8_lossy(&out.stderr));
}

#[test]
fn devices_speak_only_for_themselves_read_only_their_documents_and_revoked_ones_stay_out() {
    let world = World::new();
    let dir = world.path();
    let passwords = dir.join("baton.passwd");
    passwd(&passwords, "baton-controller", "controller-pw", true);
    for (id, pw) in [("pi-a", "a-pw"), ("pi-b", "b-pw")] {
        passwd(&passwords, id, pw, false);
        std::fs::write(dir.join(format!("{id}.pw")), format!("{pw}\n")).expect("password file");
    }
    std::fs::write(dir.join("controller.pw"), "controller-pw\n").expect("password file");
    let acl = Path::new(env!("CARGO_MANIFEST_DIR")).join("../deploy/mosquitto/baton.acl");
    let mosquitto = Mosquitto::start_with(
        &world,
        &format!("allow_anonymous false\npassword_file {}\nacl_file {}\n", passwords.display(), acl.display()),
    );
    let controller_pw = dir.join("controller.pw").display().to_string();
    let controller = Controller::start(
        &world,
        Some(mosquitto.port),
        &["--broker-username", "baton-controller", "--broker-password-file", &controller_pw],
    );
    let broker = controller.broker_url();
    let mut agents = Vec::new();
    for id in ["pi-a", "pi-b"] {
        let pw = dir.join(format!("{id}.pw")).display().to_string();
        agents.push(start_agent(&world, id, &broker, &["--no-workloads", "--mqtt-password-file", &pw]));
    }
    for id in ["pi-a", "pi-b"] {
        wait_for(&format!("{id} online"), Duration::from_secs(30), || {
            controller.device(id).filter(|d| d.status == Status::Online)
        });
    }
    // Anonymous clients and wrong passwords are turned away.
    assert!(RawClient::try_connect(mosquitto.port, "anon", None).is_err(), "an anonymous client got in");
    assert!(
        RawClient::try_connect(mosquitto.port, "pi-a-x", Some(("pi-a", "guess"))).is_err(),
        "a wrong password got in"
    );

    // Both devices get a document; B may read only its own.
    let manifest = dir.join("w.yaml");
    std::fs::write(&manifest, "name: w\nimage: 127.0.0.1:1/nothing:here\n").expect("manifest");
    let (ok, _, err) = baton_cli(&controller.server_url(), &["apply", "-f", manifest.to_str().expect("utf-8")]);
    assert!(ok, "apply: {err}");
    let mut rogue = RawClient::try_connect(mosquitto.port, "pi-b-rogue", Some(("pi-b", "b-pw"))).expect("B's identity");
    assert!(rogue.try_subscribe("baton/v1/dev/pi-b/desired"), "B may read its own document");
    assert!(
        rogue.next_message(Duration::from_secs(10)).is_some_and(|(t, _, _)| t == "baton/v1/dev/pi-b/desired"),
        "B's own retained document did not arrive"
    );
    let granted = rogue.try_subscribe("baton/v1/dev/pi-a/desired");
    let leaked = rogue.next_message(Duration::from_secs(2));
    assert!(!granted || leaked.is_none(), "B read A's document: {leaked:?}");
    if rogue.try_subscribe("baton/v1/dev/+/desired") {
        while let Some((topic, _, _)) = rogue.next_message(Duration::from_secs(2)) {
            assert_eq!(topic, "baton/v1/dev/pi-b/desired", "a wildcard let B read another device's document");
        }
    }

    // B, claiming A is gone: Mosquitto drops it; A stays online.
    let offline =
        Presence { state: PresenceState::Offline, agent_version: "x".into(), boot_id: "x".into(), started_at: 0 };
    let forged = encode(&Message::Presence(offline)).expect("encode");
    rogue.publish(&format!("baton/v1/dev/pi-a/{}", TopicKind::Presence.suffix()), forged.clone(), true);
    // The same message on B's own topic goes through: the controller sees B offline.
    rogue.publish(&format!("baton/v1/dev/pi-b/{}", TopicKind::Presence.suffix()), forged, true);
    wait_for("B's own (forged) offline presence", Duration::from_secs(10), || {
        controller.device("pi-b").filter(|d| d.status == Status::Offline)
    });
    assert_eq!(controller.device("pi-a").map(|d| d.status), Some(Status::Online), "B spoke for A");

    // Revoke B: it cannot connect again.
    drop(rogue);
    let out = Command::new(which("mosquitto_passwd").expect("mosquitto_passwd"))
        .arg("-D")
        .arg(&passwords)
        .arg("pi-b")
        .output()
        .expect("mosquitto_passwd -D");
    assert!(out.status.success());
    let hup = Command::new("kill").args(["-HUP", &mosquitto.proc.pid().to_string()]).status().expect("kill -HUP");
    assert!(hup.success());
    let refused = wait_until(Duration::from_secs(10), || {
        RawClient::try_connect(mosquitto.port, "pi-b-again", Some(("pi-b", "b-pw"))).err()
    });
    assert!(refused.is_some(), "a revoked device could still connect");
    // A is unaffected.
    assert!(RawClient::try_connect(mosquitto.port, "pi-a-2", Some(("pi-a", "a-pw"))).is_ok());
}

/// The embedded broker behind the gateway (`--mqtt-auth`): the same promises,
/// with credentials issued and revoked through `baton device`.
#[test]
fn with_the_embedded_broker_the_gateway_keeps_devices_apart_and_revocation_cuts_them_off() {
    let world = World::new();
    let dir = world.path();
    let controller = Controller::start(&world, None, &["--mqtt-auth"]);
    let server = controller.server_url();
    let broker = controller.broker_url();
    let mut passwords = std::collections::BTreeMap::new();
    let mut agents = Vec::new();
    for id in ["pi-a", "pi-b"] {
        let (ok, out, err) = baton_cli(&server, &["device", "credentials", id]);
        assert!(ok && out.trim().len() == 64, "credentials for {id}: {out}{err}");
        let file = dir.join(format!("{id}.pw"));
        std::fs::write(&file, &out).expect("password file");
        passwords.insert(id, out.trim().to_string());
        let file = file.display().to_string();
        agents.push(start_agent(&world, id, &broker, &["--no-workloads", "--mqtt-password-file", &file]));
    }
    for id in ["pi-a", "pi-b"] {
        wait_for(&format!("{id} online through the gateway"), Duration::from_secs(30), || {
            controller.device(id).filter(|d| d.status == Status::Online)
        });
    }
    let (a_pw, b_pw) = (passwords["pi-a"].as_str(), passwords["pi-b"].as_str());
    let port = controller.mqtt;
    assert!(RawClient::try_connect(port, "anon", None).is_err(), "an anonymous client got in");
    assert!(RawClient::try_connect(port, "pi-a", Some(("pi-a", b_pw))).is_err(), "B's password opened A");
    assert!(
        RawClient::try_connect(port, "pi-a", Some(("pi-b", b_pw))).is_err(),
        "a client id other than the user got in"
    );

    let manifest = dir.join("w.yaml");
    std::fs::write(&manifest, "name: w\nimage: 127.0.0.1:1/nothing:here\n").expect("manifest");
    let (ok, _, err) = baton_cli(&server, &["apply", "-f", manifest.to_str().expect("utf-8")]);
    assert!(ok, "apply: {err}");

    // B (a second session of its identity) reads its own document…
    let mut rogue = RawClient::try_connect(port, "pi-b", Some(("pi-b", b_pw))).expect("B's identity");
    assert!(rogue.try_subscribe("baton/v1/dev/pi-b/desired"));
    assert!(rogue.next_message(Duration::from_secs(10)).is_some_and(|(t, _, _)| t == "baton/v1/dev/pi-b/desired"));
    // …and is cut off when it reaches for A's, directly or by wildcard.
    assert!(!rogue.try_subscribe("baton/v1/dev/pi-a/desired"), "B subscribed to A's document");
    let mut rogue = RawClient::try_connect(port, "pi-b", Some(("pi-b", b_pw))).expect("B again");
    assert!(!rogue.try_subscribe("baton/v1/dev/+/desired"), "B subscribed with a wildcard");

    // B claiming A is offline is refused; the same message for itself goes through.
    let offline =
        Presence { state: PresenceState::Offline, agent_version: "x".into(), boot_id: "x".into(), started_at: 0 };
    let forged = encode(&Message::Presence(offline)).expect("encode");
    let mut rogue = RawClient::try_connect(port, "pi-b", Some(("pi-b", b_pw))).expect("B again");
    assert!(rogue.try_publish("baton/v1/dev/pi-a/presence", forged.clone(), true).is_err(), "B published as A");
    let mut rogue = RawClient::try_connect(port, "pi-b", Some(("pi-b", b_pw))).expect("B again");
    rogue.publish("baton/v1/dev/pi-b/presence", forged, true);
    wait_for("B's own offline presence", Duration::from_secs(10), || {
        controller.device("pi-b").filter(|d| d.status == Status::Offline)
    });
    assert_eq!(controller.device("pi-a").map(|d| d.status), Some(Status::Online), "B spoke for A");
    assert!(controller.metric("baton_gateway_denied_total") >= 3);

    // Revoke B: its connections are cut and it cannot come back; A is untouched.
    let (ok, _, err) = baton_cli(&server, &["device", "revoke", "pi-b"]);
    assert!(ok, "revoke: {err}");
    assert!(RawClient::try_connect(port, "pi-b", Some(("pi-b", b_pw))).is_err(), "a revoked device connected");
    assert!(rogue.try_publish("baton/v1/dev/pi-b/heartbeat", vec![1], false).is_err(), "a revoked session stayed open");
    assert!(
        RawClient::try_connect(port, "pi-a-check", Some(("pi-a", a_pw))).is_err(),
        "client id must be the device id"
    );
    wait_for("A still online", Duration::from_secs(5), || {
        controller.device("pi-a").filter(|d| d.status == Status::Online)
    });
    let (ok, out, _) = baton_cli(&server, &["get", "events", "-o", "json"]);
    assert!(ok && out.contains("revoked"), "{out}");
}
