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
    let mut controller = Controller::start(
        &world,
        Some(mosquitto.port),
        &["--broker-username", "baton-controller", "--broker-password-file", &controller_pw],
    );
    let broker = controller.broker_url();
    let mut agents = Vec::new();
    for id in ["pi-a", "pi-b"] {
        let pw = dir.join(format!("{id}.pw")).display().to_string();
        // They run workloads: a presence-only agent is given no document.
        agents.push(start_agent(&world, id, &broker, &["--mqtt-password-file", &pw]));
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

    // B gone for good: deleted, with what Mosquitto retains for it (its
    // presence, inventory, report, document), so the controller's next
    // connection is not handed it back.
    agents[1].kill9();
    wait_for("pi-b offline", Duration::from_secs(60), || {
        controller.device("pi-b").filter(|d| d.status == Status::Offline)
    });
    let (ok, out, err) = baton_cli(&controller.server_url(), &["delete", "device", "pi-b"]);
    assert!(ok, "{out}{err}");
    controller.restart();
    wait_for("pi-a online again", Duration::from_secs(30), || {
        controller.device("pi-a").filter(|d| d.status == Status::Online)
    });
    let mut watcher =
        RawClient::try_connect(mosquitto.port, "baton-watch", Some(("baton-controller", "controller-pw")))
            .expect("the controller's account");
    watcher.subscribe("baton/v1/dev/pi-b/#");
    let retained = watcher.next_message(Duration::from_secs(2));
    assert!(
        retained.as_ref().is_none_or(|(_, payload, _)| payload.is_empty()),
        "still retained for pi-b: {retained:?}"
    );
    assert!(controller.device("pi-b").is_none(), "pi-b came back from the broker's retained messages");
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
        agents.push(start_agent(&world, id, &broker, &["--mqtt-password-file", &file]));
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
    assert!(controller.metric("baton_mqtt_denied_total") >= 3);

    // A join token's holder naming A's client id (a trial found it took A's
    // session over: A's commands, A cut off in a loop) is refused, and A
    // keeps its connection; both kinds of refusal are events.
    let agent_log = || std::fs::read_to_string(dir.join("agent-pi-a.log")).unwrap_or_default();
    let cuts = agent_log().matches("lost the broker").count();
    let (ok, token, err) = baton_cli(&server, &["token", "create", "--uses", "5"]);
    assert!(ok, "{err}");
    let parts: Vec<&str> = token.trim().split('.').collect();
    let user = format!("join:{}", parts[1]);
    assert!(RawClient::try_connect(port, "pi-a", Some((&user, parts[2]))).is_err(), "a join token took A's session");
    // (the same token under a fresh id still gets in: it is valid)
    assert!(RawClient::try_connect(port, "pi-fresh", Some((&user, parts[2]))).is_ok(), "the token itself was refused");
    let (ok, out, _) = baton_cli(&server, &["get", "events", "-o", "json"]);
    assert!(ok && out.contains("device.denied") && out.contains("take over"), "{out}");
    assert!(out.contains("outside its topics"), "B's reach for A's topics is no event: {out}");
    assert_eq!(agent_log().matches("lost the broker").count(), cuts, "A was cut off: {}", agent_log());
    assert_eq!(controller.device("pi-a").map(|d| d.status), Some(Status::Online));

    // Revoke B: its connections are cut and it cannot come back; A is untouched.
    let (ok, _, err) = baton_cli(&server, &["device", "revoke", "pi-b"]);
    assert!(ok, "revoke: {err}");
    assert!(RawClient::try_connect(port, "pi-b", Some(("pi-b", b_pw))).is_err(), "a revoked device connected");
    // The cut is asynchronous to the CLI's answer: the session must be gone shortly after.
    let cut = wait_until(Duration::from_secs(10), || {
        rogue.try_publish("baton/v1/dev/pi-b/heartbeat", vec![1], false).is_err().then_some(())
    });
    assert!(cut.is_some(), "a revoked session stayed open");
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

/// `baton-agent join TOKEN` as a device would run it; (success, stdout + stderr).
fn join(world: &World, id: &str, broker: &str, token: &str) -> (bool, String) {
    std::fs::write(world.path().join("empty.toml"), "").expect("config");
    let out = Command::new(bin("baton-agent"))
        .args(["join", token, "--config"])
        .arg(world.path().join("empty.toml"))
        .args(["--broker", broker, "--device-id", id, "--data-dir"])
        .arg(world.path().join(format!("agent-{id}")))
        .output()
        .expect("baton-agent join");
    let text = format!("{}{}", String::from_utf8_lossy(&out.stdout), String::from_utf8_lossy(&out.stderr));
    (out.status.success(), text)
}

/// A token made to last one second, once expired, does not let a device join.
fn an_expired_token_cannot_join(world: &World, server: &str, broker: &str) {
    let (ok, short, err) = baton_cli(server, &["token", "create", "--ttl", "1s"]);
    assert!(ok, "{err}");
    wait_for("the short token expired", Duration::from_secs(10), || {
        let (_, list, _) = baton_cli(server, &["token", "list"]);
        list.contains("expired").then_some(())
    });
    let (ok, out) = join(world, "pi-x", broker, short.trim());
    assert!(!ok && out.contains("refused"), "an expired token enrolled: {out}");
}

#[test]
fn a_device_joins_with_a_token_once_and_a_revoked_one_stays_out() {
    let world = World::new();
    let controller = Controller::start(&world, None, &["--mqtt-auth"]);
    let server = controller.server_url();
    let broker = controller.broker_url();
    let (ok, token, err) =
        baton_cli(&server, &["token", "create", "--ttl", "1h", "--uses", "1", "--label", "site=lyon"]);
    assert!(ok && token.starts_with("baton1."), "token create: {token}{err}");
    let token = token.trim();

    // Options before the subcommand are refused, not ignored (a trial's join
    // used the defaults instead, and spent the token).
    let out = Command::new(bin("baton-agent"))
        .args(["--device-id", "pi-j", "join", token, "--broker", &broker])
        .output()
        .expect("baton-agent");
    let text = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.code() == Some(2) && text.contains("--device-id given before `join`"), "{text}");
    let (ok, out) = join(&world, "pi-j", &broker, token);
    assert!(ok && out.contains("joined as pi-j"), "{out}");
    let data = world.path().join("agent-pi-j");
    let pw = std::fs::metadata(data.join("state/mqtt.pw")).expect("password kept");
    assert_eq!(std::os::unix::fs::PermissionsExt::mode(&pw.permissions()) & 0o777, 0o600);
    let (_, key, _) = baton_cli(&server, &["trust"]);
    let pinned = std::fs::read_to_string(data.join("state/controller.pub")).expect("pinned key");
    assert_eq!(pinned.trim(), key.trim(), "the token's controller key is the one pinned");
    // The password never crossed the broker in clear: it is nowhere but in the file.
    let (_, events, _) = baton_cli(&server, &["get", "events", "-o", "json"]);
    assert!(events.contains("enrolled with token"), "{events}");

    // One use only; a second device is turned away, as is a made-up token.
    let (ok, out) = join(&world, "pi-k", &broker, token);
    assert!(!ok && out.contains("refused"), "a used-up token enrolled another device: {out}");
    let mut fake = token.split('.').map(str::to_string).collect::<Vec<_>>();
    fake[2] = "00".repeat(32);
    let (ok2, out2) = join(&world, "pi-k", &broker, &fake.join("."));
    assert!(!ok2 && out2.contains("refused"), "a wrong secret enrolled: {out2}");

    // An expired token cannot enroll.
    an_expired_token_cannot_join(&world, &server, &broker);

    // The joined agent runs with what it received: online, with the token's label.
    let _agent = start_agent(&world, "pi-j", &broker, &["--no-workloads"]);
    let d = wait_for("pi-j online", Duration::from_secs(30), || {
        controller.device("pi-j").filter(|d| d.status == Status::Online)
    });
    assert_eq!(d.labels.get("site").map(String::as_str), Some("lyon"));

    // Revoked: cut off now, and it does not come back.
    let (ok, _, err) = baton_cli(&server, &["device", "revoke", "pi-j"]);
    assert!(ok, "revoke: {err}");
    wait_for("pi-j offline after revocation", Duration::from_secs(30), || {
        controller.device("pi-j").filter(|d| d.status == Status::Offline)
    });
    let back = wait_until(Duration::from_secs(5), || controller.device("pi-j").filter(|d| d.status == Status::Online));
    assert!(back.is_none(), "a revoked device came back online");
    assert!(controller.metric("baton_mqtt_refused_total") >= 1);
}

#[test]
fn over_tls_the_gateway_proves_it_holds_the_controller_key_and_plain_mqtt_is_refused() {
    let world = World::new();
    let controller = Controller::start(&world, None, &["--mqtt-auth", "--mqtt-tls"]);
    let server = controller.server_url();
    let tls_broker = format!("mqtts://127.0.0.1:{}", controller.mqtt);
    let (ok, token, err) = baton_cli(&server, &["token", "create", "--uses", "2"]);
    assert!(ok, "{err}");
    let token = token.trim();

    // A token naming another controller key: the gateway cannot prove it holds it.
    let mut parts: Vec<String> = token.split('.').map(str::to_string).collect();
    parts[3] = "11".repeat(32);
    let (ok, out) = join(&world, "pi-t0", &tls_broker, &parts.join("."));
    assert!(!ok && out.to_lowercase().contains("certificate"), "joined a gateway it cannot trust: {out}");

    // The real token: join and run over TLS.
    let (ok, out) = join(&world, "pi-t", &tls_broker, token);
    assert!(ok, "join over TLS: {out}");
    let _agent = start_agent(&world, "pi-t", &tls_broker, &["--no-workloads"]);
    wait_for("pi-t online over TLS", Duration::from_secs(30), || {
        controller.device("pi-t").filter(|d| d.status == Status::Online)
    });

    // Plain MQTT to the TLS port gets nowhere, credentials or not.
    let pw = std::fs::read_to_string(world.path().join("agent-pi-t/state/mqtt.pw")).expect("password");
    assert!(RawClient::try_connect(controller.mqtt, "pi-t", Some(("pi-t", pw.trim()))).is_err());
    // An agent with nothing to trust refuses to start against an mqtts:// broker.
    let out = Command::new(bin("baton-agent"))
        .args(agent_args(&world, "pi-none", &tls_broker, &["--no-workloads"]))
        .output()
        .expect("baton-agent");
    let text = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success() && text.contains("trust anchor"), "{text}");
}

/// Mosquitto's dynamic-security plugin, wherever Debian put it.
fn dynsec_plugin() -> std::path::PathBuf {
    std::fs::read_dir("/usr/lib")
        .expect("/usr/lib")
        .flatten()
        .map(|d| d.path().join("mosquitto_dynamic_security.so"))
        .chain([Path::new("/usr/lib/mosquitto_dynamic_security.so").to_path_buf()])
        .find(|p| p.exists())
        .expect("mosquitto_dynamic_security.so (package mosquitto, 2.0)")
}

#[test]
fn devices_join_through_mosquitto_whose_accounts_the_controller_keeps() {
    let world = World::new();
    let dir = world.path();
    // The operator's one step: make the controller's account an admin of the plugin.
    let dynsec = dir.join("dynamic-security.json");
    let out = Command::new(which("mosquitto_ctrl").expect("mosquitto_ctrl (package mosquitto)"))
        .args(["dynsec", "init"])
        .arg(&dynsec)
        .args(["baton-controller", "controller-pw"])
        .output()
        .expect("mosquitto_ctrl");
    assert!(out.status.success(), "dynsec init: {}", String::from_utf8_lossy(&out.stderr));
    let mosquitto = Mosquitto::start_with(
        &world,
        &format!(
            "allow_anonymous false\nplugin {}\nplugin_opt_config_file {}\n",
            dynsec_plugin().display(),
            dynsec.display()
        ),
    );
    std::fs::write(dir.join("controller.pw"), "controller-pw\n").expect("password file");
    let controller_pw = dir.join("controller.pw").display().to_string();
    let controller = Controller::start(
        &world,
        Some(mosquitto.port),
        &["--broker-username", "baton-controller", "--broker-password-file", &controller_pw, "--broker-dynsec"],
    );
    wait_for("the controller on Mosquitto", Duration::from_secs(20), || {
        get_json::<baton_controller::view::Health>(controller.http, "/healthz").ok().filter(|h| h.broker_connected)
    });
    let (server, broker) = (controller.server_url(), controller.broker_url());
    let (ok, token, err) = baton_cli(&server, &["token", "create", "--uses", "2", "--label", "site=lab"]);
    assert!(ok, "{err}");
    let token = token.trim();

    // Two devices join with it, through Mosquitto, and run with what they got.
    let mut agents = Vec::new();
    for id in ["pi-a", "pi-b"] {
        let (ok, out) = join(&world, id, &broker, token);
        assert!(ok && out.contains(&format!("joined as {id}")), "{out}");
        agents.push(start_agent(&world, id, &broker, &["--no-workloads"]));
    }
    for id in ["pi-a", "pi-b"] {
        let d = wait_for(&format!("{id} online"), Duration::from_secs(30), || {
            controller.device(id).filter(|d| d.status == Status::Online)
        });
        assert_eq!(d.labels.get("site").map(String::as_str), Some("lab"));
    }
    // Used up: a third device is refused; so is an expired token.
    let (ok, out) = join(&world, "pi-c", &broker, token);
    assert!(!ok && out.contains("refused"), "a used-up token enrolled: {out}");
    an_expired_token_cannot_join(&world, &server, &broker);

    // B's account reaches its own documents only, under its own client id only.
    let b_pw = std::fs::read_to_string(dir.join("agent-pi-b/state/mqtt.pw")).expect("pi-b's password");
    let b_pw = b_pw.trim();
    drop(agents.pop()); // pi-b's agent, so its session is ours to take
    assert!(
        RawClient::try_connect(mosquitto.port, "not-pi-b", Some(("pi-b", b_pw))).is_err(),
        "another client id got in"
    );
    let mut b = RawClient::try_connect(mosquitto.port, "pi-b", Some(("pi-b", b_pw))).expect("pi-b's account");
    assert!(b.try_subscribe("baton/v1/dev/pi-b/desired"), "pi-b cannot read its own document");
    assert!(!b.try_subscribe("baton/v1/dev/pi-a/desired"), "pi-b reads pi-a's document");
    assert!(!b.try_subscribe("baton/v1/dev/+/desired"), "pi-b reads every document");
    drop(b);

    // Revoked: pi-a is cut off, and its password no longer opens anything.
    let a_pw = std::fs::read_to_string(dir.join("agent-pi-a/state/mqtt.pw")).expect("pi-a's password");
    let (ok, _, err) = baton_cli(&server, &["device", "revoke", "pi-a"]);
    assert!(ok, "{err}");
    wait_for("pi-a offline after revocation", Duration::from_secs(30), || {
        controller.device("pi-a").filter(|d| d.status == Status::Offline)
    });
    // (The broker applies the revocation when the controller's message reaches it.)
    wait_for("pi-a's account gone", Duration::from_secs(10), || {
        RawClient::try_connect(mosquitto.port, "pi-a", Some(("pi-a", a_pw.trim()))).err()
    });

    // A join account lives as long as its token.
    let (_, second, _) = baton_cli(&server, &["token", "create"]);
    let parts: Vec<&str> = second.trim().split('.').collect();
    let (id, secret) = (parts[1], parts[2]);
    let user = format!("join:{id}");
    wait_for("the join account", Duration::from_secs(10), || {
        RawClient::try_connect(mosquitto.port, "pi-j", Some((&user, secret))).ok()
    });
    let (ok, _, err) = baton_cli(&server, &["token", "delete", id]);
    assert!(ok, "{err}");
    wait_for("the join account gone", Duration::from_secs(10), || {
        RawClient::try_connect(mosquitto.port, "pi-j2", Some((&user, secret))).err()
    });
}

#[test]
fn a_join_token_in_agent_toml_enrolls_at_the_first_start_only() {
    let world = World::new();
    let controller = Controller::start(&world, None, &["--mqtt-auth"]);
    let (ok, token, err) = baton_cli(&controller.server_url(), &["token", "create", "--uses", "1"]);
    assert!(ok, "{err}");
    let config = world.path().join("agent.toml");
    std::fs::write(
        &config,
        format!(
            "broker = \"{}\"\ndevice_id = \"pi-cfg\"\ndata_dir = \"{}\"\nrun_dir = \"{}\"\njoin_token = \"{}\"\n",
            controller.broker_url(),
            world.path().join("agent-pi-cfg").display(),
            world.path().join("run-pi-cfg").display(),
            token.trim()
        ),
    )
    .expect("agent.toml");
    let args = vec!["--config".to_string(), config.display().to_string(), "--no-workloads".into()];
    let online = || {
        wait_for("pi-cfg online", Duration::from_secs(30), || {
            controller.device("pi-cfg").filter(|d| d.status == Status::Online)
        })
    };
    let mut agent = Proc::spawn("agent-pi-cfg", &bin("baton-agent"), &args, world.path());
    online();
    assert!(world.path().join("agent-pi-cfg/state/mqtt.pw").is_file(), "the join's password is kept");
    // Restarted with the same file: it runs with what it got (the one-use token
    // is spent, so a second join would fail and stop the agent).
    assert_eq!(agent.terminate(), Some(0));
    wait_for("pi-cfg offline", Duration::from_secs(30), || {
        controller.device("pi-cfg").filter(|d| d.status == Status::Offline)
    });
    let mut again = Proc::spawn("agent-pi-cfg-2", &bin("baton-agent"), &args, world.path());
    online();
    assert!(again.is_running());
}

/// The controller and its devices reach an external Mosquitto over TLS
/// (`--broker mqtts://…` with `--broker-ca`; agents with `mqtt_ca_file`).
/// Without the broker's CA (the web PKI's roots instead) the controller
/// refuses its certificate and says so.
#[test]
fn the_controller_and_devices_reach_mosquitto_over_tls() {
    let world = World::new();
    let dir = world.path().join("mqtt-tls");
    std::fs::create_dir_all(&dir).expect("tls dir");
    let (ca, cert, key) = test_certificates(&dir, "127.0.0.1".parse().expect("ip"));
    let tls_port = free_port();
    let mosquitto = Mosquitto::start_with(
        &world,
        &format!(
            "allow_anonymous true\nlistener {tls_port} 127.0.0.1\ncertfile {}\nkeyfile {}\n",
            cert.display(),
            key.display()
        ),
    );
    let tls_broker = format!("mqtts://127.0.0.1:{tls_port}");
    let ca = ca.to_str().expect("utf-8");
    // `start` waits until the controller says its broker is connected.
    let controller = Controller::start(&world, Some(mosquitto.port), &["--broker", &tls_broker, "--broker-ca", ca]);
    let args = agent_args(&world, "pi-tls", &tls_broker, &["--no-workloads"]);
    std::fs::write(world.path().join("no-such-agent.toml"), format!("mqtt_ca_file = \"{ca}\"\n")).expect("config");
    let _agent = Proc::spawn("pi-tls", &bin("baton-agent"), &args, world.path());
    wait_for("pi-tls online through Mosquitto over TLS", Duration::from_secs(30), || {
        controller.device("pi-tls").filter(|d| d.status == Status::Online)
    });
    // The simulator, told the CA, too.
    let _sim = start_simulator(&world, "tls", 3, &tls_broker, &["--mqtt-ca-file", ca]);
    wait_for("3 simulated devices online over TLS", Duration::from_secs(30), || {
        let online =
            controller.devices().iter().filter(|d| d.id.starts_with("tls-") && d.status == Status::Online).count();
        (online == 3).then_some(())
    });

    // The web PKI does not vouch for this broker: refused, and said.
    let data = world.path().join("controller-untrusting");
    let port = free_port();
    let args: Vec<String> =
        ["server", "--listen", &format!("127.0.0.1:{port}"), "--data-dir", data.to_str().expect("utf-8")]
            .iter()
            .map(|s| s.to_string())
            .chain(["--broker".to_string(), tls_broker.clone()])
            .collect();
    let _untrusting = Proc::spawn("controller-untrusting", &bin("baton"), &args, world.path());
    let log = wait_for("the untrusting controller refusing the certificate", Duration::from_secs(20), || {
        let log = std::fs::read_to_string(world.path().join("controller-untrusting.log")).ok()?;
        log.contains("UnknownIssuer").then_some(log)
    });
    let (_, health) = get_status(port, "/healthz").expect("it serves its API");
    assert!(health.contains("\"broker_connected\":false"), "{health}\n{log}");
    assert!(health.contains("UnknownIssuer"), "/healthz says why the broker is not connected: {health}");
    assert!(log.contains("cannot reach the broker"), "it never connected, so nothing was lost: {log}");
}
