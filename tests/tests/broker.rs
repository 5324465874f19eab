//! The embedded MQTT broker as others see it: Mosquitto's own command-line
//! clients (mosquitto_pub, mosquitto_sub; not our client library) against
//! `baton server`, and a flood of device messages that must arrive whole.

use std::process::{Command, Stdio};
use std::sync::atomic::{AtomicU64, Ordering::Relaxed};
use std::sync::Arc;
use std::time::Duration;

use baton_protocol::{encode, samples, DeviceId, Message, TopicKind};
use baton_tests::*;

fn tool(name: &str) -> std::path::PathBuf {
    which(name)
        .unwrap_or_else(|| panic!("{name} is not installed: .ci/run installs it (apt-get install mosquitto-clients)"))
}

/// Runs a Mosquitto client against the controller's broker: (success, stdout, stderr).
fn run(program: &str, port: u16, args: &[&str]) -> (bool, String, String) {
    let out = Command::new(tool(program))
        .args(["-h", "127.0.0.1", "-p", &port.to_string()])
        .args(args)
        .stdin(Stdio::null())
        .output()
        .expect("run");
    (
        out.status.success(),
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

#[test]
fn mosquittos_own_clients_get_retained_messages_wills_and_persistent_sessions() {
    let world = World::new();
    let controller = Controller::start(&world, None, &[]);
    let port = controller.mqtt;

    // Retained, at QoS 1 and QoS 2 (mosquitto_pub exits 0 only after the
    // broker's PUBACK, or PUBREC and PUBCOMP).
    let (ok, _, err) = run("mosquitto_pub", port, &["-q", "1", "-r", "-t", "lab/a", "-m", "one"]);
    assert!(ok, "{err}");
    let (ok, _, err) = run("mosquitto_pub", port, &["-q", "2", "-r", "-t", "lab/b", "-m", "two"]);
    assert!(ok, "{err}");
    let (ok, out, err) = run("mosquitto_sub", port, &["-t", "lab/+", "-C", "2", "-W", "10", "-v"]);
    assert!(ok, "{err}");
    let mut got: Vec<&str> = out.lines().collect();
    got.sort();
    assert_eq!(got, ["lab/a one", "lab/b two"], "retained messages for a new wildcard subscription");
    // An empty retained message clears it.
    let (ok, _, err) = run("mosquitto_pub", port, &["-q", "1", "-r", "-t", "lab/a", "-n"]);
    assert!(ok, "{err}");
    let (_, out, _) = run("mosquitto_sub", port, &["-t", "lab/a", "-C", "1", "-W", "2"]);
    assert_eq!(out, "", "a cleared retained message came back");

    // A persistent session keeps its subscription and what came while it was away.
    let (ok, _, err) = run("mosquitto_sub", port, &["-i", "keeper", "-c", "-q", "1", "-t", "box/t", "-E"]);
    assert!(ok, "{err}");
    let (ok, _, err) = run("mosquitto_pub", port, &["-q", "1", "-t", "box/t", "-m", "while-away"]);
    assert!(ok, "{err}");
    let (ok, out, err) =
        run("mosquitto_sub", port, &["-i", "keeper", "-c", "-q", "1", "-t", "box/t", "-C", "1", "-W", "10"]);
    assert!(ok, "{err}");
    assert_eq!(out.trim(), "while-away");
    // A clean session does not.
    let (ok, _, err) = run("mosquitto_sub", port, &["-i", "forgetful", "-q", "1", "-t", "box/u", "-E"]);
    assert!(ok, "{err}");
    let (ok, _, err) = run("mosquitto_pub", port, &["-q", "1", "-t", "box/u", "-m", "lost"]);
    assert!(ok, "{err}");
    let (_, out, _) = run("mosquitto_sub", port, &["-i", "forgetful", "-q", "1", "-t", "box/u", "-C", "1", "-W", "2"]);
    assert_eq!(out, "", "a clean session got a message from before it");

    // The Last Will of a client killed -9, retained; none after a clean DISCONNECT.
    let connections = || controller.metric("baton_mqtt_connections");
    let before = connections();
    let port_arg = port.to_string();
    let args = ["-h", "127.0.0.1", "-p", &port_arg, "-i", "willer", "-t", "quiet/t"]
        .into_iter()
        .chain(["--will-topic", "will/t", "--will-payload", "gone", "--will-qos", "1", "--will-retain"])
        .map(String::from)
        .collect::<Vec<_>>();
    let mut willer = Proc::spawn("willer", &tool("mosquitto_sub"), &args, world.path());
    wait_for("the will's client connected", Duration::from_secs(10), || (connections() > before).then_some(()));
    willer.kill9();
    let (ok, out, err) = run("mosquitto_sub", port, &["-t", "will/t", "-C", "1", "-W", "10"]);
    assert!(ok, "{err}");
    assert_eq!(out.trim(), "gone");
    let (ok, _, err) = run(
        "mosquitto_sub",
        port,
        &["-i", "polite", "-t", "quiet/t", "--will-topic", "will/polite", "--will-payload", "x", "--will-retain", "-E"],
    );
    assert!(ok, "{err}");
    let (_, out, _) = run("mosquitto_sub", port, &["-t", "will/polite", "-C", "1", "-W", "2"]);
    assert_eq!(out, "", "a Will after a clean DISCONNECT");

    // MQTT 5 is refused with the 3.1.1 answer for it, not a dropped socket.
    let (ok, _, err) = run("mosquitto_sub", port, &["-V", "mqttv5", "-t", "x", "-C", "1", "-W", "5"]);
    assert!(!ok && err.to_lowercase().contains("protocol"), "{err}");
}

/// 40 devices publish heartbeats as fast as they can (QoS 0): the broker
/// may slow them down, but the controller counts every one.
#[test]
fn a_flood_of_device_messages_is_slowed_down_not_lost() {
    const DEVICES: usize = 40;
    const EACH: u64 = 2_500;
    let world = World::new();
    let controller = Controller::start(&world, None, &[]);
    let port = controller.mqtt;
    let rt = tokio::runtime::Builder::new_multi_thread().worker_threads(2).enable_all().build().expect("runtime");
    let series = "baton_mqtt_messages_total{kind=\"heartbeat\"}";
    let sent = Arc::new(AtomicU64::new(0));
    let (go_tx, go_rx) = tokio::sync::watch::channel(false);
    let mut tasks = Vec::new();
    for i in 0..DEVICES {
        let (sent, mut go) = (sent.clone(), go_rx.clone());
        tasks.push(rt.spawn(async move {
            let id = DeviceId::new(format!("flood-{i:02}")).expect("id");
            let mut opts = rumqttc::MqttOptions::new(id.as_str(), "127.0.0.1", port);
            opts.set_keep_alive(Duration::from_secs(60));
            let (client, mut events) = rumqttc::AsyncClient::new(opts, 64);
            let poller = tokio::spawn(async move {
                loop {
                    if let Err(e) = events.poll().await {
                        return e.to_string();
                    }
                }
            });
            let presence = encode(&Message::Presence(samples::presence())).expect("encode");
            client
                .publish(id.topic(TopicKind::Presence), rumqttc::QoS::AtLeastOnce, true, presence)
                .await
                .expect("presence");
            let _ = go.wait_for(|g| *g).await;
            let mut hb = samples::heartbeat();
            for _ in 0..EACH {
                hb.seq += 1;
                let payload = encode(&Message::Heartbeat(hb.clone())).expect("encode");
                client
                    .publish(id.topic(TopicKind::Heartbeat), rumqttc::QoS::AtMostOnce, false, payload)
                    .await
                    .expect("publish");
                sent.fetch_add(1, Relaxed);
            }
            // Stay connected until the test ends: a disconnect must not be what delivers them.
            let _ = client.disconnect().await;
            poller.await.unwrap_or_default()
        }));
    }
    wait_for("the flooding devices registered", Duration::from_secs(60), || {
        (controller.devices().len() == DEVICES).then_some(())
    });
    let start = controller.metric(series);
    go_tx.send(true).expect("go");
    let expected = DEVICES as u64 * EACH;
    let counted = wait_until(Duration::from_secs(120), || {
        let n = controller.metric(series) - start;
        (n >= expected).then_some(n)
    });
    assert_eq!(
        counted,
        Some(expected),
        "the controller counted {} of {expected} heartbeats ({} sent)",
        controller.metric(series) - start,
        sent.load(Relaxed)
    );
    assert_eq!(controller.metric("baton_mqtt_slow_consumers_total"), 0);
    for t in tasks {
        let _ = rt.block_on(t);
    }
}

/// A client that goes silent with its socket open (a device whose link
/// died without a FIN): closed after one and a half keep-alive periods,
/// its Will published.
#[test]
fn a_silent_client_is_closed_after_its_keep_alive_and_its_will_published() {
    use std::io::{Read, Write};
    let world = World::new();
    let controller = Controller::start(&world, None, &[]);
    let connect = baton_controller::broker::wire::Connect {
        client_id: "silent".into(),
        clean_session: true,
        keep_alive: 2,
        will: Some(("will/silent".into(), b"timed out".to_vec(), 1, true)),
        username: None,
        password: None,
    };
    let mut socket = std::net::TcpStream::connect(("127.0.0.1", controller.mqtt)).expect("connect");
    socket.write_all(&baton_controller::broker::wire::encode_connect(&connect)).expect("CONNECT");
    let mut connack = [0u8; 4];
    socket.read_exact(&mut connack).expect("CONNACK");
    assert_eq!(connack, [0x20, 2, 0, 0]);
    let since = std::time::Instant::now();
    socket.set_read_timeout(Some(Duration::from_secs(10))).expect("timeout");
    let mut rest = [0u8; 16];
    let n = socket.read(&mut rest).expect("the broker closed the silent connection");
    let after = since.elapsed();
    assert_eq!(n, 0, "the broker sent something instead of closing");
    assert!(after >= Duration::from_secs(3), "closed after {after:?}, before 1.5 × 2 s");
    let (ok, out, err) = run("mosquitto_sub", controller.mqtt, &["-t", "will/silent", "-C", "1", "-W", "10"]);
    assert!(ok, "{err}");
    assert_eq!(out.trim(), "timed out");
}

/// A client subscribed to everything that never reads its socket: the
/// broker disconnects it once 4 MiB wait for it, and nobody else is held up.
#[test]
fn a_subscriber_that_never_reads_is_disconnected_and_holds_nobody_up() {
    use std::io::{Read, Write};
    let world = World::new();
    let controller = Controller::start(&world, None, &[]);
    let port = controller.mqtt;
    let connect = baton_controller::broker::wire::Connect {
        client_id: "sleeper".into(),
        clean_session: true,
        keep_alive: 0,
        will: None,
        username: None,
        password: None,
    };
    let mut sleeper = std::net::TcpStream::connect(("127.0.0.1", port)).expect("connect");
    sleeper.write_all(&baton_controller::broker::wire::encode_connect(&connect)).expect("CONNECT");
    // SUBSCRIBE id 1, "#" at QoS 0; then never read again.
    sleeper.write_all(&[0x82, 6, 0, 1, 0, 1, b'#', 0]).expect("SUBSCRIBE");
    let mut connack = [0u8; 4];
    sleeper.read_exact(&mut connack).expect("CONNACK");
    wait_for("the sleeper subscribed", Duration::from_secs(10), || {
        (controller.metric("baton_mqtt_connections") >= 2).then_some(())
    });

    // 40 MiB of QoS 0 messages on a topic nobody else wants.
    let payload = "x".repeat(1024);
    let mut flood = Command::new(tool("mosquitto_pub"))
        .args(["-h", "127.0.0.1", "-p", &port.to_string(), "-t", "bulk/data", "-l", "-q", "0"])
        .stdin(Stdio::piped())
        .stdout(Stdio::null())
        .spawn()
        .expect("mosquitto_pub -l");
    {
        let mut stdin = flood.stdin.take().expect("stdin");
        for _ in 0..40_000 {
            if writeln!(stdin, "{payload}").is_err() {
                break;
            }
        }
    }
    let status = flood.wait().expect("mosquitto_pub");
    assert!(status.success(), "the flooding publisher failed: {status}");
    wait_for("the sleeper disconnected as a slow consumer", Duration::from_secs(20), || {
        (controller.metric("baton_mqtt_slow_consumers_total") >= 1).then_some(())
    });
    // Others are served at once.
    let (ok, _, err) = run("mosquitto_pub", port, &["-q", "1", "-r", "-t", "probe/x", "-m", "still-here"]);
    assert!(ok, "{err}");
    let (ok, out, err) = run("mosquitto_sub", port, &["-t", "probe/x", "-q", "1", "-C", "1", "-W", "10"]);
    assert!(ok, "{err}");
    assert_eq!(out.trim(), "still-here");
}

/// Clients making up persistent sessions (a new client id each time, as a
/// misconfigured tool or a device reflashed under new ids would) cannot make
/// the broker keep sessions for ever: past twice the connection limit, the
/// longest offline ones are dropped, and a recent one keeps what came for it.
#[test]
fn persistent_sessions_past_the_cap_are_dropped_longest_offline_first() {
    let world = World::new();
    // Connections allowed: 2 + 16, so at most 36 sessions.
    let controller = Controller::start(&world, None, &["--max-devices", "2"]);
    let port = controller.mqtt;
    for i in 0..50 {
        let (id, topic) = (format!("ghost-{i}"), format!("ghost/{i}"));
        let (ok, _, err) = run("mosquitto_sub", port, &["-i", &id, "-c", "-q", "1", "-t", &topic, "-E"]);
        assert!(ok, "{err}");
    }
    wait_for("sessions back under the cap", Duration::from_secs(10), || {
        (controller.metric("baton_mqtt_sessions") <= 36).then_some(())
    });
    assert!(controller.metric("baton_mqtt_sessions_expired_total") >= 14);

    // The newest kept its subscription and what came while it was away; the oldest did not.
    for i in [0, 49] {
        let (ok, _, err) = run("mosquitto_pub", port, &["-q", "1", "-t", &format!("ghost/{i}"), "-m", "kept"]);
        assert!(ok, "{err}");
    }
    let got = |i: u32, wait: &str| {
        let (id, topic) = (format!("ghost-{i}"), format!("ghost/{i}"));
        run("mosquitto_sub", port, &["-i", &id, "-c", "-q", "1", "-t", &topic, "-C", "1", "-W", wait]).1
    };
    assert_eq!(got(49, "10"), "kept\n");
    assert_eq!(got(0, "2"), "", "a dropped session still held a message");
}
