//! Hostile and broken input on device topics: the controller counts and logs
//! it, keeps serving, and its stored state does not change. Agents survive
//! garbage on their own topics and still answer real commands.

use std::time::Duration;

use baton_controller::fleet::Status;
use baton_controller::view::DeviceView;
use baton_protocol::{
    decode, encode, samples, Command, CommandAction, CommandOutput, Message, MessageKind, PROTOCOL_MAJOR,
    PROTOCOL_MINOR,
};
use baton_tests::mqtt::RawClient;
use baton_tests::*;

/// What must not change: everything but the liveness fields heartbeats move.
fn durable(devices: Vec<DeviceView>) -> Vec<String> {
    devices
        .into_iter()
        .map(|d| {
            format!(
                "{} {:?} {:?} {:?} {:?} {}",
                d.id, d.presence, d.inventory, d.operator_labels, d.labels, d.first_seen_ms
            )
        })
        .collect()
}

/// Random bytes behind a valid envelope header, so they reach the body decoder.
fn garbage_body(kind: MessageKind, n: usize, seed: u64) -> Vec<u8> {
    let mut bytes = vec![PROTOCOL_MAJOR, PROTOCOL_MINOR, kind as u8];
    bytes.extend(pseudo_random(n, seed));
    bytes
}

fn pseudo_random(n: usize, seed: u64) -> Vec<u8> {
    let mut x = seed | 1;
    (0..n)
        .map(|_| {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            x as u8
        })
        .collect()
}

#[test]
fn garbage_on_device_topics_is_counted_and_changes_nothing() {
    let world = World::new();
    let mut controller = Controller::start(&world, None, &[]);
    let _agent = start_agent(&world, "pi-good", &controller.broker_url(), &[]);
    wait_for("pi-good online", Duration::from_secs(20), || {
        (controller.device("pi-good")?.inventory.is_some()).then_some(())
    });
    let before = durable(controller.devices());

    let mut evil = RawClient::connect(controller.mqtt, "evil");
    let hb = encode(&Message::Heartbeat(samples::heartbeat())).expect("encode");
    let mut wrong_major = encode(&Message::Presence(samples::presence())).expect("encode");
    wrong_major[0] = PROTOCOL_MAJOR + 1;
    let mut oversize = vec![PROTOCOL_MAJOR, PROTOCOL_MINOR, MessageKind::Heartbeat as u8];
    oversize.resize(200 * 1024, 0xAB);

    let cases: Vec<(&str, String, Vec<u8>, bool)> = vec![
        ("malformed", "baton/v1/dev/pi-good/heartbeat".into(), garbage_body(MessageKind::Heartbeat, 40, 1), false),
        // Retained: it will be delivered again after the controller restarts.
        ("malformed", "baton/v1/dev/pi-good/inventory".into(), garbage_body(MessageKind::Inventory, 300, 2), true),
        ("wrong_version", "baton/v1/dev/pi-good/heartbeat".into(), vec![0xff; 40], false),
        ("malformed", "baton/v1/dev/pi-good/presence".into(), hb.clone(), false),
        ("malformed", "baton/v1/dev/pi-good/report".into(), Vec::new(), false),
        ("oversize", "baton/v1/dev/pi-good/heartbeat".into(), oversize, false),
        ("wrong_version", "baton/v1/dev/pi-good/presence".into(), wrong_major, false),
        ("unknown_device", "baton/v1/dev/ghost/heartbeat".into(), hb.clone(), false),
        ("bad_topic", "baton/v1/dev/not an id/heartbeat".into(), hb.clone(), false),
        ("bad_topic", format!("baton/v1/dev/{}/heartbeat", "x".repeat(65)), hb.clone(), false),
    ];
    let mut expected = std::collections::BTreeMap::<&str, u64>::new();
    for (reason, topic, payload, retain) in cases {
        evil.publish(&topic, payload, retain);
        *expected.entry(reason).or_default() += 1;
    }
    for (reason, n) in &expected {
        let series = format!("baton_mqtt_rejected_total{{reason=\"{reason}\"}}");
        wait_for(&format!("{n} {reason} rejections counted"), Duration::from_secs(10), || {
            (controller.metric(&series) >= *n).then_some(())
        });
    }

    // Bigger than the broker allows: the sender is cut off, nobody else notices.
    let mut huge_sender = RawClient::connect(controller.mqtt, "huge");
    assert!(huge_sender.try_publish("baton/v1/dev/pi-good/heartbeat", vec![0; 400 * 1024], false).is_err());

    assert!(controller.device("ghost").is_none(), "an unknown device was created");
    assert_eq!(durable(controller.devices()), before);
    let last_seen = controller.device("pi-good").expect("pi-good").last_seen_ms;
    wait_for("pi-good still heard from", Duration::from_secs(10), || {
        let d = controller.device("pi-good")?;
        (d.status == Status::Online && d.last_seen_ms > last_seen).then_some(())
    });

    let restarted_at = baton_controller::controller::now_ms();
    controller.restart();
    assert_eq!(durable(controller.devices()), before, "stored state changed");
    // The embedded broker kept no retained messages across the restart; the
    // agent reconnects and republishes, and the result is the same device.
    wait_for("pi-good heard from after restart", Duration::from_secs(20), || {
        (controller.device("pi-good")?.last_seen_ms > restarted_at).then_some(())
    });
    assert_eq!(durable(controller.devices()), before);
}

#[test]
fn agent_survives_garbage_and_answers_only_commands_its_controller_signed() {
    let world = World::new();
    let controller = Controller::start(&world, None, &[]);
    // The test signs commands itself, as the controller whose key the agent trusts.
    let mut agent =
        start_agent(&world, "pi-cmd", &controller.broker_url(), &["--controller-key", &test_controller_key()]);
    wait_for("pi-cmd online", Duration::from_secs(20), || {
        (controller.device("pi-cmd")?.status == Status::Online).then_some(())
    });

    let mut op = RawClient::connect(controller.mqtt, "operator");
    for (i, topic) in ["baton/v1/dev/pi-cmd/desired", "baton/v1/dev/pi-cmd/cmd"].into_iter().enumerate() {
        op.publish(topic, pseudo_random(64, i as u64 + 7), false);
        op.publish(topic, Vec::new(), false);
    }
    // A flood of garbage: handled, and logged as a warning once (the rest at debug).
    for i in 0..200 {
        op.publish("baton/v1/dev/pi-cmd/cmd", pseudo_random(48, 1000 + i), false);
    }
    let mut watcher = RawClient::connect(controller.mqtt, "watcher");
    watcher.subscribe("baton/v1/dev/pi-cmd/cmd/res");
    let mut ask = |cmd: Command| -> CommandOutput {
        op.publish("baton/v1/dev/pi-cmd/cmd", encode(&Message::Command(cmd.clone())).expect("encode"), false);
        let (_, payload, _) = watcher.next_message(Duration::from_secs(10)).expect("no answer to a command");
        match decode(&payload).expect("decodable answer").1 {
            Message::CommandResult(r) => {
                assert_eq!(r.id, cmd.id, "answered under another id");
                r.body
            }
            other => panic!("unexpected answer {other:?}"),
        }
    };
    let deadline = baton_controller::controller::now_ms() + 60_000;
    let unsigned = Command {
        id: 4242,
        deadline_ms: deadline,
        action: CommandAction::Diagnostics,
        key: vec![],
        signature: vec![],
        issued_ms: 0,
        time_signature: vec![],
    };
    let key = baton_protocol::crypto::SigningKey::from_seed(&TEST_SIGNING_SEED);
    let refused = |body: &CommandOutput, why: &str| matches!(body, CommandOutput::Error(e) if e.contains(why));

    // Anyone on the broker can publish on `cmd`: unsigned, forged or misaddressed commands are refused.
    let body = ask(unsigned.clone());
    assert!(refused(&body, "unsigned command"), "{body:?}");
    let other_key = baton_protocol::crypto::SigningKey::from_seed(&[9; 32]).sign_command("pi-cmd", unsigned.clone());
    assert!(refused(&ask(other_key), "untrusted key"));
    let for_another = key.sign_command("pi-other", Command { id: 4243, ..unsigned.clone() });
    assert!(refused(&ask(for_another), "bad signature"));
    let mut forged = key.sign_command("pi-cmd", Command { id: 4244, ..unsigned.clone() });
    forged.deadline_ms += 1;
    assert!(refused(&ask(forged), "bad signature"));
    // Signed for this device: answered, once.
    let genuine = key.sign_command("pi-cmd", Command { id: 4245, ..unsigned });
    let body = ask(genuine.clone());
    assert!(matches!(&body, CommandOutput::Text(t) if t.contains("device pi-cmd")), "{body:?}");
    assert!(refused(&ask(genuine.clone()), "replayed"));
    assert!(agent.is_running(), "agent died on garbage");
    // (The answers above came after the flood: the link handles its messages in order.)
    let log = std::fs::read_to_string(world.path().join("agent-pi-cmd.log")).expect("agent log");
    let warned = log.lines().filter(|l| l.contains("WARN") && l.contains("undecodable message ignored")).count();
    assert_eq!(warned, 1, "garbage warnings are not limited: {warned}");
    assert_eq!(controller.device("pi-cmd").map(|d| d.status), Some(Status::Online));

    // A restarted agent still remembers what it carried out: the replay stays refused.
    let before_restart = controller.device("pi-cmd").expect("pi-cmd").last_seen_ms;
    agent.terminate();
    agent = start_agent(&world, "pi-cmd", &controller.broker_url(), &["--controller-key", &test_controller_key()]);
    wait_for("pi-cmd back online", Duration::from_secs(20), || {
        let d = controller.device("pi-cmd")?;
        (d.status == Status::Online && d.last_seen_ms > before_restart).then_some(())
    });
    let body = ask(genuine);
    assert!(refused(&body, "replayed"), "replayed after a restart: {body:?}");
    let fresh = Command {
        id: 4246,
        deadline_ms: deadline,
        action: CommandAction::Diagnostics,
        key: vec![],
        signature: vec![],
        issued_ms: 0,
        time_signature: vec![],
    };
    let fresh = key.sign_command("pi-cmd", fresh);
    let body = ask(fresh);
    assert!(matches!(&body, CommandOutput::Text(t) if t.contains("device pi-cmd")), "{body:?}");
    assert!(agent.is_running());
}

/// Symptom: garbage published (retained) on a device's `desired` topic was
/// refused by the device, but only its own log said so, and the broker kept
/// the garbage for every later (re)subscribe. Now the refusal is an event and
/// part of `describe device`, and the controller publishes its own document again.
#[test]
fn a_foreign_desired_document_is_refused_visibly_and_replaced_by_the_controllers() {
    let world = World::new();
    let controller = Controller::start(&world, None, &[]);
    let server = controller.server_url();
    let _sim = start_simulator(&world, "g", 1, &controller.broker_url(), &[]);
    wait_for("the device", Duration::from_secs(30), || (controller.devices().len() == 1).then_some(()));
    apply_yaml(&server, &world, "app.yaml", "name: app\nimage: 127.0.0.1:9/app:1\n");
    wait_for("revision 1", Duration::from_secs(30), || settled(&server, "app", 1, 1));

    let topic = "baton/v1/dev/g-0000/desired";
    let mut attacker = RawClient::connect(controller.mqtt, "attacker");
    attacker.publish(topic, garbage_body(MessageKind::SignedDesired, 64, 7), true);

    wait_for("the refusal as an event", Duration::from_secs(20), || {
        let (_, out, _) = baton_cli(&server, &["get", "events"]);
        out.contains("refused its desired document").then_some(())
    });
    let (ok, described, _) = baton_cli(&server, &["describe", "device", "g-0000"]);
    assert!(ok && described.contains("Last refusal:"), "{described}");
    // What the broker holds again is the controller's own, signed document
    // (the device's refusal can reach the controller before its republish
    // reaches the broker: each look is a new late subscriber).
    let mut n = 0;
    let signed = wait_for("the controller's document retained again", Duration::from_secs(30), || {
        match decode(&retained_on(controller.mqtt, topic, &mut n)?) {
            Ok((_, Message::SignedDesired(signed))) => Some(signed),
            _ => None,
        }
    });
    let trust = baton_cli(&server, &["trust"]).1;
    assert!(trust.trim().ends_with(&baton_protocol::crypto::hex(&signed.key)), "signed by another key");
    // The device never stopped running what it ran.
    assert!(settled(&server, "app", 1, 1).is_some());
}

/// The generation of the controller's signed document in `payload`.
fn generation_of(payload: &[u8]) -> Option<u64> {
    let Ok((_, Message::SignedDesired(signed))) = decode(payload) else { return None };
    match decode(&signed.document) {
        Ok((_, Message::Desired(d))) => Some(d.generation),
        _ => None,
    }
}

/// What a late subscriber is given on `topic` (retained), looked at afresh.
fn retained_on(port: u16, topic: &str, n: &mut u32) -> Option<Vec<u8>> {
    *n += 1;
    let mut fresh = RawClient::connect(port, &format!("look-{n}"));
    fresh.subscribe(topic);
    let (_, payload, retained) = fresh.next_message(Duration::from_secs(5))?;
    retained.then_some(payload)
}

/// Symptom: a Mosquitto bridge that reconnects replays the retained copies
/// it kept, and an old desired document of the controller's own spread back
/// onto a device's topic. The controller took it for the echo of its own
/// publish and left it there, so a device that subscribed again (a reflashed
/// one) was given the old revision. Now an older document of its own that
/// stays on the topic is replaced by the current one.
#[test]
fn an_older_document_replayed_onto_a_devices_topic_is_replaced() {
    let world = World::new();
    let controller = Controller::start(&world, None, &[]);
    let server = controller.server_url();
    let _sim = start_simulator(&world, "r", 1, &controller.broker_url(), &[]);
    wait_for("the device", Duration::from_secs(30), || (controller.devices().len() == 1).then_some(()));
    let topic = "baton/v1/dev/r-0000/desired";
    apply_yaml(&server, &world, "app.yaml", "name: app\nimage: 127.0.0.1:9/app:1\n");
    wait_for("revision 1", Duration::from_secs(30), || settled(&server, "app", 1, 1));
    let mut n = 0;
    let old =
        wait_for("revision 1's document", Duration::from_secs(20), || retained_on(controller.mqtt, topic, &mut n));
    let old_generation = generation_of(&old).expect("a document of the controller's");
    apply_yaml(&server, &world, "app.yaml", "name: app\nimage: 127.0.0.1:9/app:2\n");
    wait_for("revision 2", Duration::from_secs(30), || settled(&server, "app", 2, 1));
    let current = wait_for("revision 2's document", Duration::from_secs(20), || {
        retained_on(controller.mqtt, topic, &mut n).and_then(|p| generation_of(&p)).filter(|g| *g > old_generation)
    });

    // The replay: the old copy, retained, as a bridge republishes it.
    let mut bridge = RawClient::connect(controller.mqtt, "a-bridge");
    bridge.publish(topic, old, true);
    wait_for("the controller seeing the old copy stay", Duration::from_secs(30), || {
        let log = std::fs::read_to_string(&controller.proc.log).unwrap_or_default();
        log.contains("still holds an older document").then_some(())
    });
    wait_for("the current document on the topic again", Duration::from_secs(30), || {
        retained_on(controller.mqtt, topic, &mut n).and_then(|p| generation_of(&p)).filter(|g| *g == current)
    });
    // The device kept what it ran.
    assert!(settled(&server, "app", 2, 1).is_some());
}
