//! Integrity and secrecy end to end: agents apply only documents their
//! controller signed, and a secret's plaintext never appears on the device's
//! disk, in the controller's store, or on the wire. Root (real containers).

use std::path::Path;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use baton_protocol::spec::{ContainerSpec, WorkloadSpec};
use baton_protocol::{decode, encode, Desired, Message};
use baton_tests::mqtt::{wait_report, RawClient};
use baton_tests::*;

fn doc(generation: u64) -> Desired {
    Desired { generation, ..Default::default() }
}

fn refused_with(watch: &mut RawClient, needle: &str) {
    let r = wait_report(watch, &format!("a refusal mentioning {needle:?}"), |r| {
        r.refused.as_deref().is_some_and(|why| why.contains(needle))
    });
    assert_eq!(r.generation, 2, "a refused document must not change what is applied");
}

#[test]
fn agents_refuse_unsigned_forged_misaddressed_and_replayed_documents() {
    let world = World::new();
    let controller = Controller::start(&world, None, &[]);
    const DEVICE: &str = "pi-sig";
    let key = test_controller_key();
    let mut agent = start_agent(&world, DEVICE, &controller.broker_url(), &["--controller-key", &key]);
    let mut watch = RawClient::connect(controller.mqtt, "watch");
    watch.subscribe(&format!("baton/v1/dev/{DEVICE}/report"));
    let mut op = RawClient::connect(controller.mqtt, "forger");
    let topic = format!("baton/v1/dev/{DEVICE}/desired");

    let gen1 = signed_desired(DEVICE, &doc(1), &TEST_SIGNING_SEED);
    op.publish(&topic, gen1.clone(), true);
    wait_report(&mut watch, "generation 1 applied", |r| r.generation == 1 && r.refused.is_none());
    op.publish(&topic, signed_desired(DEVICE, &doc(2), &TEST_SIGNING_SEED), true);
    wait_report(&mut watch, "generation 2 applied", |r| r.generation == 2 && r.refused.is_none());

    // Unsigned, as a 1.1 controller (or anyone on the broker) would send it.
    op.publish(&topic, encode(&Message::Desired(doc(3))).expect("encode"), true);
    refused_with(&mut watch, "unsigned");
    // Signed, but by a key this agent was not told to trust.
    op.publish(&topic, signed_desired(DEVICE, &doc(4), &[7; 32]), true);
    refused_with(&mut watch, "untrusted key");
    // Signed by the right key for another device, replayed here.
    op.publish(&topic, signed_desired("pi-other", &doc(5), &TEST_SIGNING_SEED), true);
    refused_with(&mut watch, "bad signature");
    // A valid document with one byte changed (generation 6 → 7).
    let mut forged = signed_desired(DEVICE, &doc(6), &TEST_SIGNING_SEED);
    let at = forged.iter().rposition(|b| *b == 6).expect("generation byte");
    forged[at] = 7;
    op.publish(&topic, forged, true);
    refused_with(&mut watch, "bad signature");
    // A genuine older document, replayed.
    op.publish(&topic, gen1, true);
    refused_with(&mut watch, "not newer");

    // The refusals were survivable: the next genuine document applies, and a
    // restarted agent keeps what it had (generation 8, from flash: documents
    // are written when their workloads change, so this one brings one).
    let mut eight = doc(8);
    eight.workloads.push(WorkloadSpec {
        name: "w".into(),
        revision: 1,
        image: "127.0.0.1:1/nothing:here".into(),
        container: ContainerSpec { command: vec!["/bin/true".into()], ..Default::default() },
        ..Default::default()
    });
    op.publish(&topic, signed_desired(DEVICE, &eight, &TEST_SIGNING_SEED), true);
    wait_report(&mut watch, "generation 8 applied", |r| r.generation == 8 && r.refused.is_none());
    agent.terminate();
    let _agent = start_agent(&world, DEVICE, &controller.broker_url(), &["--controller-key", &key]);
    wait_report(&mut watch, "generation 8 after restart", |r| r.generation == 8 && r.refused.is_none());
}

/// Every file under `dir` whose bytes contain `needle`.
fn files_containing(dir: &Path, needle: &[u8]) -> Vec<String> {
    let mut hits = Vec::new();
    let mut stack = vec![dir.to_path_buf()];
    while let Some(d) = stack.pop() {
        let Ok(entries) = std::fs::read_dir(&d) else { continue };
        for e in entries.flatten() {
            let path = e.path();
            let Ok(meta) = std::fs::symlink_metadata(&path) else { continue };
            if meta.is_dir() {
                stack.push(path);
            } else if meta.is_file() {
                if let Ok(bytes) = std::fs::read(&path) {
                    if bytes.windows(needle.len()).any(|w| w == needle) {
                        hits.push(path.display().to_string());
                    }
                }
            }
        }
    }
    hits
}

fn sha256_hex(bytes: &[u8]) -> String {
    use std::process::{Command, Stdio};
    let mut child = Command::new("sha256sum").stdin(Stdio::piped()).stdout(Stdio::piped()).spawn().expect("sha256sum");
    std::io::Write::write_all(child.stdin.as_mut().expect("stdin"), bytes).expect("write");
    let out = child.wait_with_output().expect("sha256sum");
    String::from_utf8_lossy(&out.stdout).split_whitespace().next().unwrap_or_default().to_string()
}

#[test]
fn secrets_reach_the_container_sealed_and_their_plaintext_is_nowhere_else() {
    let world = World::new();
    let mut controller = Controller::start(&world, None, &[]);
    let server = controller.server_url();
    const DEVICE: &str = "pi-sec";
    // Everything on the wire, from before the first secret to the end.
    let wire = Arc::new(Mutex::new(Vec::<u8>::new()));
    let mut tap = RawClient::connect(controller.mqtt, "tap");
    tap.subscribe("#");
    let stop = Arc::new(std::sync::atomic::AtomicBool::new(false));
    let tapper = {
        let (wire, stop) = (wire.clone(), stop.clone());
        std::thread::spawn(move || {
            while !stop.load(std::sync::atomic::Ordering::Relaxed) {
                if let Some((topic, payload, _)) = tap.next_message(Duration::from_millis(200)) {
                    let mut w = wire.lock().expect("wire");
                    w.extend_from_slice(topic.as_bytes());
                    w.extend_from_slice(&payload);
                }
            }
        })
    };

    // The device's run dir is memory, as /run is on a real device.
    let tmpfs = TmpfsRunDir::mount(&world, DEVICE);
    let run = tmpfs.0.clone();

    give_busybox(&world, DEVICE, "busybox:sec");
    let _agent = start_agent(&world, DEVICE, &controller.broker_url(), &[]);
    wait_for("device online with a sealing key", Duration::from_secs(30), || {
        controller.device(DEVICE).filter(|d| d.inventory.as_ref().is_some_and(|i| i.sealing_key.len() == 32))
    });

    let first = format!("pw-{}-first", std::process::id());
    let second = format!("pw-{}-second", std::process::id());
    let (ok, out, err) = baton_cli(&server, &["secret", "create", "db-pw", "--from-literal", &first]);
    assert!(ok, "secret create: {err}");
    assert!(out.contains("secret/db-pw version 1"), "{out}");
    // A manifest naming a secret that does not exist is refused.
    let manifest = world.path().join("db.yaml");
    std::fs::write(&manifest, "name: db\nimage: busybox:sec\nsecrets: [{name: nope, path: /run/secrets/pw}]\n")
        .expect("manifest");
    let (ok, _, err) = baton_cli(&server, &["apply", "-f", manifest.to_str().expect("utf-8")]);
    assert!(!ok && err.contains("secret nope does not exist"), "{err}");

    // The container proves it has the value by its hash (its log is on flash).
    std::fs::write(
        &manifest,
        "name: db\nimage: busybox:sec\nsecrets: [{name: db-pw, path: /run/secrets/pw}]\ncommand:\n  - /bin/sh\n  - -c\n  - |\n    while true; do echo \"hash $(sha256sum /run/secrets/pw | cut -d' ' -f1) $(stat -c %a /run/secrets/pw)\"; sleep 0.3; done\n",
    )
    .expect("manifest");
    let (ok, _, err) = baton_cli(&server, &["apply", "-f", manifest.to_str().expect("utf-8")]);
    assert!(ok, "apply: {err}");
    let logs = |want: &str| {
        wait_until(Duration::from_secs(60), || {
            let (ok, out, _) = baton_cli(&server, &["logs", "db", "--device", DEVICE, "--tail", "3"]);
            (ok && out.contains(want)).then_some(out)
        })
    };
    let want = format!("hash {} 400", sha256_hex(first.as_bytes()));
    assert!(logs(&want).is_some(), "the container never saw the secret (want {want:?})");

    // A new version rolls the workload to a new revision with the new value.
    let (ok, out, err) = baton_cli(&server, &["secret", "create", "db-pw", "--from-literal", &second]);
    assert!(ok, "secret update: {err}");
    assert!(out.contains("version 2") && out.contains("rolling out db"), "{out}");
    let want = format!("hash {} 400", sha256_hex(second.as_bytes()));
    assert!(logs(&want).is_some(), "the new secret version never reached the container");
    let (_, list, _) = baton_cli(&server, &["secret", "list", "-o", "json"]);
    assert!(list.contains("\"version\": 2") && list.contains("\"db\""), "{list}");
    assert!(!list.contains(&second), "the API showed a secret value");

    stop.store(true, std::sync::atomic::Ordering::Relaxed);
    let _ = tapper.join();
    let wire = wire.lock().expect("wire");
    assert!(wire.len() > 1000, "the tap saw almost nothing ({} bytes)", wire.len());
    for plain in [&first, &second] {
        let needle = plain.as_bytes();
        assert!(!wire.windows(needle.len()).any(|w| w == needle), "{plain} crossed the broker in clear");
        let device_disk = files_containing(&world.path().join(format!("agent-{DEVICE}")), needle);
        assert!(device_disk.is_empty(), "{plain} on the device's disk: {device_disk:?}");
        let store = files_containing(&world.path().join("controller"), needle);
        assert!(store.is_empty(), "{plain} in the controller's data dir: {store:?}");
    }
    // Positive control: the value does exist, on the device's tmpfs only.
    assert!(!files_containing(&run, second.as_bytes()).is_empty(), "the grep cannot find the file the container reads");
    drop(wire);

    // A controller restart republishes the same bytes: no new generation, no restart.
    let generation = |c: &Controller| c.device(DEVICE).and_then(|d| d.report).map(|r| r.generation);
    let before = generation(&controller);
    let restarts = describe_restarts(&server);
    controller.restart();
    let changed = wait_until(Duration::from_secs(5), || generation(&controller).filter(|g| Some(*g) != before));
    assert_eq!(changed, None, "a controller restart gave the device a new document");
    assert_eq!(describe_restarts(&server), restarts, "the workload restarted");
}

/// Restarts of workload `db` on the device, from `baton describe`.
fn describe_restarts(server: &str) -> u64 {
    let (ok, out, err) = baton_cli(server, &["describe", "workload", "db", "-o", "json"]);
    assert!(ok, "describe: {err}");
    let v: serde_json::Value = serde_json::from_str(&out).expect("json");
    v["devices"].as_array().and_then(|d| d.first()).and_then(|d| d["reported"]["restarts"].as_u64()).unwrap_or(u64::MAX)
}

#[test]
fn a_controller_restarted_with_a_new_signing_key_reaches_agents_trusting_both() {
    use baton_protocol::crypto::{hex, SigningKey};
    let world = World::new();
    let seed_file = |name: &str, seed: u8| {
        let path = world.path().join(name);
        std::fs::write(&path, hex(&[seed; 32])).expect("key file");
        (path.display().to_string(), format!("ed25519:{}", hex(&SigningKey::from_seed(&[seed; 32]).public())))
    };
    let (old_file, old_key) = seed_file("old.key", 1);
    let (new_file, new_key) = seed_file("new.key", 2);
    let mut controller = Controller::start(&world, None, &["--signing-key", &old_file]);
    const DEVICE: &str = "pi-rot";
    let args = ["--controller-key", old_key.as_str(), "--controller-key", new_key.as_str()];
    let _agent = start_agent(&world, DEVICE, &controller.broker_url(), &args);
    wait_for("device online", Duration::from_secs(30), || controller.device(DEVICE));
    let manifest = world.path().join("w.yaml");
    // The image is never pulled (nothing listens there): only documents matter here.
    std::fs::write(&manifest, "name: w\nimage: 127.0.0.1:1/nothing:here\n").expect("manifest");
    let (ok, _, err) = baton_cli(&controller.server_url(), &["apply", "-f", manifest.to_str().expect("utf-8")]);
    assert!(ok, "apply: {err}");
    let applied =
        |c: &Controller| c.device(DEVICE).and_then(|d| d.report).filter(|r| r.refused.is_none()).map(|r| r.generation);
    let before =
        wait_for("the first document applied", Duration::from_secs(30), || applied(&controller).filter(|g| *g > 0));

    controller.restart_with(&["--signing-key", &new_file]);
    let after = wait_for("the re-signed document applied", Duration::from_secs(30), || {
        applied(&controller).filter(|g| *g > before)
    });
    assert_eq!(after, before + 1);
    let mut watch = RawClient::connect(controller.mqtt, "watch");
    watch.subscribe(&format!("baton/v1/dev/{DEVICE}/desired"));
    let (_, payload, _) = watch.next_message(Duration::from_secs(10)).expect("the retained document");
    match decode(&payload) {
        Ok((_, Message::SignedDesired(s))) => assert_eq!(format!("ed25519:{}", hex(&s.key)), new_key),
        other => panic!("not a signed document: {other:?}"),
    }
}

#[test]
fn api_tokens_gate_the_api_and_read_only_ones_change_nothing() {
    let world = World::new();
    let controller = Controller::start(&world, None, &["--api-auth"]);
    let server = controller.server_url();
    let admin = std::fs::read_to_string(world.path().join("controller/admin.token")).expect("first admin token");
    let admin = admin.trim();
    let meta = std::fs::metadata(world.path().join("controller/admin.token")).expect("token file");
    assert_eq!(std::os::unix::fs::PermissionsExt::mode(&meta.permissions()) & 0o777, 0o600);

    // No token, a made-up one: refused, and the error says what to do.
    let (ok, _, err) = baton_cli(&server, &["get", "devices"]);
    assert!(!ok && err.contains("API token") && err.contains("401"), "{err}");
    let fake = format!("baton-api.{}.{}", "ab".repeat(8), "cd".repeat(32));
    let (ok, _, err) = baton_cli_as(&server, Some(&fake), &["get", "devices"]);
    assert!(!ok && err.contains("401"), "{err}");
    // /healthz stays open for probes; /metrics needs a token.
    assert!(get_text(controller.http, "/healthz").is_ok());
    let err = get_text(controller.http, "/metrics").expect_err("metrics without a token");
    assert!(err.to_string().contains("401"), "{err}");

    let (ok, _, err) = baton_cli_as(&server, Some(admin), &["get", "devices"]);
    assert!(ok, "{err}");
    let (ok, reader, err) =
        baton_cli_as(&server, Some(admin), &["apitoken", "create", "--role", "read-only", "--name", "dash"]);
    assert!(ok && reader.starts_with("baton-api."), "{reader}{err}");
    let reader = reader.trim();

    // A read-only token reads…
    for args in [&["get", "devices"][..], &["get", "workloads"], &["secret", "list"], &["get", "events"]] {
        let (ok, _, err) = baton_cli_as(&server, Some(reader), args);
        assert!(ok, "read-only {args:?}: {err}");
    }
    // (a fleet-wide one reads the metrics; a tenant's does not: they count the whole fleet)
    let metrics = get_text_as(controller.http, "/metrics", Some(reader)).expect("metrics with a read-only token");
    assert!(metrics.contains("baton_devices"), "{metrics}");
    let (ok, tenant_reader, err) = baton_cli_as(
        &server,
        Some(admin),
        &["--tenant", "acme", "apitoken", "create", "--role", "read-only", "--name", "acme-dash"],
    );
    assert!(ok, "{err}");
    let err = get_text_as(controller.http, "/metrics", Some(tenant_reader.trim())).expect_err("a tenant reads metrics");
    assert!(err.to_string().contains("403"), "{err}");
    // …and changes nothing.
    let manifest = world.path().join("w.yaml");
    std::fs::write(&manifest, "name: w\nimage: 127.0.0.1:1/nothing:here\n").expect("manifest");
    let m = manifest.to_str().expect("utf-8");
    for args in [
        &["apply", "-f", m][..],
        &["secret", "create", "s", "--from-literal", "x"],
        &["token", "create"],
        &["apitoken", "create", "--role", "admin"],
        &["device", "revoke", "pi-x"],
        &["label", "device", "pi-x", "a=b"],
    ] {
        let (ok, _, err) = baton_cli_as(&server, Some(reader), args);
        assert!(!ok && err.contains("403"), "read-only {args:?} was allowed: {err}");
    }
    let (_, list, _) = baton_cli_as(&server, Some(admin), &["get", "workloads", "-o", "json"]);
    assert_eq!(list.trim(), "[]", "a read-only token created a workload");

    // Revoked, it stops working.
    let id = reader.split('.').nth(1).expect("token id");
    let (ok, _, err) = baton_cli_as(&server, Some(admin), &["apitoken", "revoke", id]);
    assert!(ok, "{err}");
    let (ok, _, err) = baton_cli_as(&server, Some(reader), &["get", "devices"]);
    assert!(!ok && err.contains("401"), "a revoked token still reads: {err}");
}

#[test]
fn the_api_over_https_is_trusted_through_the_controller_ca_and_plain_listeners_stay_on_loopback() {
    let world = World::new();
    let data = world.path().join("controller");
    let (http, mqtt) = (free_port(), free_port());
    let args: Vec<String> = [
        "server",
        "--listen",
        &format!("127.0.0.1:{http}"),
        "--mqtt-listen",
        &format!("127.0.0.1:{mqtt}"),
        "--data-dir",
        data.to_str().expect("utf-8"),
        "--resolve-digests",
        "false",
        "--api-tls",
        "--api-auth",
    ]
    .iter()
    .map(|s| s.to_string())
    .collect();
    let _server = Proc::spawn("controller", &bin("baton"), &args, world.path());
    let url = format!("https://127.0.0.1:{http}");
    let ca = data.join("ca.crt");
    let token = wait_for("the HTTPS API answering", Duration::from_secs(20), || {
        let token = std::fs::read_to_string(data.join("admin.token")).ok()?;
        let (ok, _, _) = baton_cli_as(&url, Some(token.trim()), &["--ca-file", ca.to_str()?, "get", "devices"]);
        ok.then_some(token)
    });
    let token = token.trim();
    // Without the CA the CLI refuses the certificate; plain HTTP gets no answer.
    let (ok, _, err) = baton_cli_as(&url, Some(token), &["get", "devices"]);
    assert!(!ok && err.to_lowercase().contains("certificate") && err.contains("--ca-file"), "{err}");
    let (ok, _, _) = baton_cli_as(&format!("http://127.0.0.1:{http}"), Some(token), &["get", "devices"]);
    assert!(!ok, "plain HTTP was answered on the HTTPS port");

    // Off loopback, plain HTTP is refused at start, and so is an embedded
    // broker open to the network without authentication and TLS.
    for (http, mqtt, says) in
        [("0.0.0.0:0", "127.0.0.1:0", "--api-tls"), ("127.0.0.1:0", "0.0.0.0:0", "--mqtt-auth --mqtt-tls")]
    {
        let out = std::process::Command::new(bin("baton"))
            .args(["server", "--listen", http, "--mqtt-listen", mqtt, "--data-dir"])
            .arg(world.path().join("other"))
            .output()
            .expect("baton server");
        let text = String::from_utf8_lossy(&out.stderr);
        assert!(!out.status.success() && text.contains(says), "{text}");
    }
}
