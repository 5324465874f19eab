//! `bench`: the measurements behind BENCHMARKS.md. Build and run in release:
//!
//! ```text
//! cargo build --release --workspace --bins
//! cargo build --profile release-small -p baton-agent
//! target/release/bench all
//! ```
//!
//! Sections: `sizes` (encoded message sizes), `footprint` (agent binary size,
//! RSS/PSS after 60 s connected), `ingest` (heartbeats/s the controller
//! absorbs through the embedded broker and through Mosquitto, same run).

use std::sync::atomic::{AtomicBool, AtomicU64, Ordering::Relaxed};
use std::sync::Arc;
use std::time::{Duration, Instant};

use baton_protocol::{encode, samples, Heartbeat, Message, TopicKind};
use baton_tests::*;
use rumqttc::{AsyncClient, MqttOptions, QoS};

fn main() {
    let what = std::env::args().nth(1).unwrap_or_else(|| "all".into());
    let secs = |name: &str, default: u64| std::env::var(name).ok().and_then(|v| v.parse().ok()).unwrap_or(default);
    match what.as_str() {
        "sizes" => sizes(),
        "footprint" => footprint(secs("BENCH_IDLE_SECS", 60)),
        "ingest" => ingest(secs("BENCH_DEVICES", 200) as usize, secs("BENCH_SECS", 10)),
        "all" => {
            sizes();
            footprint(secs("BENCH_IDLE_SECS", 60));
            ingest(secs("BENCH_DEVICES", 200) as usize, secs("BENCH_SECS", 10));
        }
        other => {
            eprintln!("usage: bench [sizes|footprint|ingest|all] (got {other:?})");
            std::process::exit(2);
        }
    }
}

fn sizes() {
    println!("## Encoded message sizes (envelope + postcard body, the samples in protocol/src/samples.rs)\n");
    println!("| kind | bytes |\n|---|---|");
    for msg in samples::all() {
        let len = encode(&msg).map(|b| b.len()).unwrap_or(0);
        println!("| {} | {len} |", msg.kind().name());
    }
    // Worst case of the fields that vary: every counter at its maximum.
    let worst = Heartbeat {
        seq: u32::MAX,
        uptime_s: u32::MAX,
        load1_centi: u32::MAX,
        mem_used_kib: u64::MAX,
        mem_total_kib: u64::MAX,
        disk_free_mib: u64::MAX,
        temp_milli_c: Some(i32::MIN),
        applied_generation: u64::MAX,
    };
    let worst = encode(&Message::Heartbeat(worst)).map(|b| b.len()).unwrap_or(0);
    println!("| heartbeat, every field at its maximum | {worst} |\n");
}

fn kib_field(text: &str, key: &str) -> u64 {
    text.lines().find_map(|l| l.strip_prefix(key)?.split_whitespace().next()?.parse().ok()).unwrap_or(0)
}

fn footprint(idle_secs: u64) {
    println!("## Agent footprint\n");
    let release = bin("baton-agent");
    let small = release.parent().and_then(|p| p.parent()).map(|t| t.join("release-small/baton-agent"));
    println!("| build | size |\n|---|---|");
    for (name, path) in [
        ("release (x86_64, glibc, dynamic)", Some(release.clone())),
        ("release-small (opt-level z, LTO, panic=abort, stripped)", small.clone()),
    ] {
        match path.and_then(|p| std::fs::metadata(&p).ok()) {
            Some(m) => println!("| {name} | {:.2} MiB |", m.len() as f64 / (1 << 20) as f64),
            None => println!("| {name} | not built |"),
        }
    }
    println!();

    let world = World::new();
    let controller = Controller::start(&world, None, &[]);
    let agent_bin = small.filter(|p| p.exists()).unwrap_or(release);
    let mut args = vec![
        "--broker".to_string(),
        controller.broker_url(),
        "--device-id".into(),
        "bench-idle".into(),
        "--data-dir".into(),
        world.path().join("agent").display().to_string(),
        "--heartbeat-interval".into(),
        "1".into(),
    ];
    let cfg = world.path().join("agent.toml");
    std::fs::write(&cfg, "").expect("config");
    args.extend(["--config".into(), cfg.display().to_string()]);
    let agent = Proc::spawn("agent", &agent_bin, &args, world.path());
    wait_for("agent online", Duration::from_secs(20), || {
        controller.device("bench-idle").filter(|d| d.heartbeat.is_some())
    });
    std::thread::sleep(Duration::from_secs(idle_secs)); // the measured idle period itself
    let pid = agent.pid();
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap_or_default();
    let rollup = std::fs::read_to_string(format!("/proc/{pid}/smaps_rollup")).unwrap_or_default();
    let private = kib_field(&rollup, "Private_Clean:") + kib_field(&rollup, "Private_Dirty:");
    println!(
        "Agent `{}` after {idle_secs} s connected, heartbeat every 1 s: RSS {} KiB, PSS {} KiB, private {} KiB, peak RSS {} KiB, threads {}.\n",
        agent_bin.file_name().map(|n| n.to_string_lossy()).unwrap_or_default(),
        kib_field(&status, "VmRSS:"),
        kib_field(&rollup, "Pss:"),
        private,
        kib_field(&status, "VmHWM:"),
        kib_field(&status, "Threads:"),
    );
}

/// `devices` MQTT connections each register, then publish heartbeats at a
/// fixed total offered rate (and once unthrottled, to see overload) for
/// `secs`; "absorbed" is what the controller counted on its own `/metrics`.
fn ingest(devices: usize, secs: u64) {
    let rates: Vec<u64> = std::env::var("BENCH_RATES")
        .ok()
        .map(|v| v.split(',').filter_map(|r| r.trim().parse().ok()).collect())
        .unwrap_or_else(|| vec![1_000, 10_000, 50_000, 100_000, 200_000]);
    println!("## Controller ingest: {devices} concurrent device connections, {secs} s per step, heartbeats at QoS 0\n");
    println!("| broker | offered/s | sent/s | absorbed by controller/s | delivered/sent |\n|---|---|---|---|---|");
    let mut best = Vec::new();
    for kind in [BrokerKind::Embedded, BrokerKind::Mosquitto] {
        let world = World::new();
        let mosquitto = matches!(kind, BrokerKind::Mosquitto).then(|| Mosquitto::start(&world));
        let controller = Controller::start(&world, mosquitto.as_ref().map(|m| m.port), &[]);
        let mut max_absorbed: f64 = 0.0;
        for rate in rates.iter().copied().map(Some).chain([None]) {
            let f = flood(&controller, devices, rate, Duration::from_secs(secs));
            let offered = rate.map_or("unthrottled".to_string(), |r| r.to_string());
            println!("| {kind:?} | {offered} | {:.0} | {:.0} | {:.3} |", f.sent_per_s, f.absorbed_per_s, f.delivered);
            // "Best" counts only steps where (nearly) everything sent arrived.
            if f.delivered >= 0.99 {
                max_absorbed = max_absorbed.max(f.absorbed_per_s);
            }
        }
        best.push(max_absorbed);
    }
    if let [embedded, mosquitto] = best[..] {
        println!(
            "\nHighest rate absorbed with ≥ 99 % delivered, embedded / Mosquitto: {embedded:.0} / {mosquitto:.0} = {:.2}\n",
            embedded / mosquitto.max(1.0)
        );
    }
}

fn flood(controller: &Controller, devices: usize, rate: Option<u64>, window: Duration) -> Flood {
    let rt = tokio::runtime::Builder::new_multi_thread().enable_all().build().expect("runtime");
    let sent = Arc::new(AtomicU64::new(0));
    let running = Arc::new(AtomicBool::new(false));
    let stop = Arc::new(AtomicBool::new(false));
    let port = controller.mqtt;
    // Each device's share of the offered rate, as a publish interval.
    let period = rate.map(|r| Duration::from_secs_f64(devices as f64 / r.max(1) as f64));
    for i in 0..devices {
        let (sent, running, stop) = (sent.clone(), running.clone(), stop.clone());
        rt.spawn(async move {
            let id = baton_protocol::DeviceId::new(format!("sim-{i:05}")).expect("id");
            let mut opts = MqttOptions::new(format!("{}-{}", id, std::process::id()), "127.0.0.1", port);
            opts.set_keep_alive(Duration::from_secs(60)).set_inflight(100);
            let (client, mut events) = AsyncClient::new(opts, 256);
            tokio::spawn(async move { while events.poll().await.is_ok() {} });
            let presence = encode(&Message::Presence(samples::presence())).expect("encode");
            let _ = client.publish(id.topic(TopicKind::Presence), QoS::AtLeastOnce, true, presence).await;
            let mut hb = samples::heartbeat();
            while !running.load(Relaxed) {
                if stop.load(Relaxed) {
                    return;
                }
                tokio::time::sleep(Duration::from_millis(10)).await;
            }
            let mut ticker = period.map(|p| {
                let mut t = tokio::time::interval(p);
                t.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Burst);
                t
            });
            while running.load(Relaxed) && !stop.load(Relaxed) {
                if let Some(t) = ticker.as_mut() {
                    t.tick().await;
                }
                hb.seq = hb.seq.wrapping_add(1);
                let payload = encode(&Message::Heartbeat(hb.clone())).expect("encode");
                if client.publish(id.topic(TopicKind::Heartbeat), QoS::AtMostOnce, false, payload).await.is_err() {
                    return;
                }
                sent.fetch_add(1, Relaxed);
            }
            let _ = client.disconnect().await;
        });
    }
    wait_for("all simulated devices registered", Duration::from_secs(60), || {
        (controller.devices().len() >= devices).then_some(())
    });
    let series = "baton_mqtt_messages_total{kind=\"heartbeat\"}";
    let start_count = controller.metric(series);
    let started = Instant::now();
    running.store(true, Relaxed);
    std::thread::sleep(window); // the measured window itself
    running.store(false, Relaxed);
    let sending = started.elapsed().as_secs_f64();
    // Let what is queued arrive: the absorbed rate counts the time until the
    // controller's count stops moving, not just the sending window.
    let mut last = controller.metric(series);
    let mut last_moved = started.elapsed();
    loop {
        std::thread::sleep(Duration::from_millis(200));
        let now = controller.metric(series);
        if now == last {
            break;
        }
        last = now;
        last_moved = started.elapsed();
    }
    stop.store(true, Relaxed);
    rt.shutdown_timeout(Duration::from_secs(2));
    let sent = sent.load(Relaxed);
    Flood {
        sent_per_s: sent as f64 / sending,
        absorbed_per_s: (last - start_count) as f64 / last_moved.as_secs_f64().max(sending),
        delivered: (last - start_count) as f64 / sent.max(1) as f64,
    }
}

struct Flood {
    sent_per_s: f64,
    absorbed_per_s: f64,
    /// Fraction of what was sent that the controller ever counted.
    delivered: f64,
}
