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
//! absorbs through the embedded broker and through Mosquitto, same run),
//! `runtime`, `starts` (N containers at once, as a busy device boots: the
//! agent's supervisor vs its one-after-another path vs `runc run -d` in
//! parallel from a shell), `pull`, `schedule` (placing 100,000 instances on 10,000
//! devices), `rollout` (a 4-wave rollout to 1,000 simulated devices),
//! `upgrade` (one real agent upgraded over MQTT: bytes, time, the link's
//! silence during the switch; the same build fetched over HTTP beside it),
//! `net` (bridge networking: setup vs the CNI bridge plugin, start in bridge
//! vs host mode, the load-balanced service address vs direct; in a network
//! namespace of its own), `net-memory` (the agent with N bridged containers)
//! and `remote` (`baton exec -it` keystroke round trips and `baton
//! port-forward` throughput and request latency, beside a direct connection
//! and OpenSSH's `ssh -tt` / `ssh -L` to the same server in the same run)
//! and `dashboard` (the dashboard's pages and API calls on a 10,000-device
//! simulated fleet in headless chromium, beside the whole-fleet listing the
//! CLI reads), `store` (the store's calls on SQLite and on PostgreSQL, same
//! run) and `failover` (kill -9 of the leading controller on PostgreSQL:
//! until the standby serves, and until the rollout moves again), and
//! `fleet-scale` (15,000 simulated devices on one controller with its
//! embedded broker, on one with Mosquitto, and on the deployed cluster of
//! three controllers on PostgreSQL and three NATS nodes: memory, time to
//! register, time until a workload given to every device runs on each,
//! and for the cluster the leader killed: until another serves).

use std::path::{Path, PathBuf};
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
        "traffic" => traffic(secs("BENCH_TRAFFIC_SECS", 600)),
        "ingest" => ingest(secs("BENCH_DEVICES", 200) as usize, secs("BENCH_SECS", 10)),
        "runtime" => runtime(secs("BENCH_ITERS", 50) as usize),
        "starts" => starts(secs("BENCH_CONTAINERS", 20) as usize, secs("BENCH_ROUNDS", 5) as usize),
        "pull" => pull(secs("BENCH_PULLS", 5) as usize),
        "schedule" => schedule(secs("BENCH_SCHED_DEVICES", 10_000) as usize, secs("BENCH_INSTANCES", 100_000) as usize),
        "rollout" => rollout(secs("BENCH_SIM_DEVICES", 1000) as usize, secs("BENCH_GATE_SECS", 5)),
        "upgrade" => upgrade(secs("BENCH_UPGRADES", 3) as usize),
        "fleet-upgrade" => fleet_upgrade(secs("BENCH_SIM_DEVICES", 1000) as usize, secs("BENCH_GATE_SECS", 5)),
        "net" => net(secs("BENCH_ITERS", 50) as usize),
        "net-memory" => net_memory(secs("BENCH_CONTAINERS", 20) as usize),
        "autoscale" => autoscale(secs("BENCH_SIM_DEVICES", 1000) as usize),
        "autoscale-cpu" => autoscale_cpu(secs("BENCH_SIM_DEVICES", 1000) as usize, secs("BENCH_SECS", 60)),
        "remote" => remote(secs("BENCH_KEYS", 100) as usize, secs("BENCH_ROUNDS", 5) as usize),
        "dashboard" => dashboard(secs("BENCH_SIM_DEVICES", 10_000) as usize, secs("BENCH_ROUNDS", 5) as usize),
        "store" => store(secs("BENCH_STORE_DEVICES", 10_000) as usize),
        "failover" => failover(secs("BENCH_ROUNDS", 5) as usize),
        "fleet-memory" => fleet_memory(secs("BENCH_SIM_DEVICES", 10_000) as usize, secs("BENCH_IDLE_SECS", 30)),
        "fleet-scale" => fleet_scale(secs("BENCH_SIM_DEVICES", 15_000) as usize, secs("BENCH_IDLE_SECS", 30)),
        "all" => {
            sizes();
            footprint(secs("BENCH_IDLE_SECS", 60));
            traffic(secs("BENCH_TRAFFIC_SECS", 600));
            ingest(secs("BENCH_DEVICES", 200) as usize, secs("BENCH_SECS", 10));
            runtime(secs("BENCH_ITERS", 50) as usize);
            starts(secs("BENCH_CONTAINERS", 20) as usize, secs("BENCH_ROUNDS", 5) as usize);
            pull(secs("BENCH_PULLS", 5) as usize);
            schedule(secs("BENCH_SCHED_DEVICES", 10_000) as usize, secs("BENCH_INSTANCES", 100_000) as usize);
            rollout(secs("BENCH_SIM_DEVICES", 1000) as usize, secs("BENCH_GATE_SECS", 5));
            upgrade(secs("BENCH_UPGRADES", 3) as usize);
            fleet_upgrade(secs("BENCH_SIM_DEVICES", 1000) as usize, secs("BENCH_GATE_SECS", 5));
            net(secs("BENCH_ITERS", 50) as usize);
            net_memory(secs("BENCH_CONTAINERS", 20) as usize);
            autoscale(secs("BENCH_SIM_DEVICES", 1000) as usize);
            autoscale_cpu(secs("BENCH_SIM_DEVICES", 1000) as usize, secs("BENCH_SECS", 60));
            remote(secs("BENCH_KEYS", 100) as usize, secs("BENCH_ROUNDS", 5) as usize);
            dashboard(secs("BENCH_SIM_DEVICES", 10_000) as usize, secs("BENCH_ROUNDS", 5) as usize);
            store(secs("BENCH_STORE_DEVICES", 10_000) as usize);
            failover(secs("BENCH_ROUNDS", 5) as usize);
            fleet_memory(secs("BENCH_SIM_DEVICES", 10_000) as usize, secs("BENCH_IDLE_SECS", 30));
        }
        other => {
            eprintln!(
                "usage: bench [sizes|footprint|traffic|ingest|runtime|pull|schedule|rollout|upgrade|fleet-upgrade|net|net-memory|autoscale|autoscale-cpu|remote|dashboard|store|failover|fleet-memory|all] (got {other:?})"
            );
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
        unix_ms: u64::MAX,
        loads: Vec::new(),
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
    let target = release.parent().and_then(|p| p.parent()).map(Path::to_path_buf).unwrap_or_default();
    let small = target.join("release-small/baton-agent");
    // The Pi builds are static; this is the same build for x86_64 (see BENCHMARKS.md).
    let fixed = target.join("x86_64-unknown-linux-gnu/release-small/baton-agent");
    println!("| build | size |\n|---|---|");
    for (name, path) in [
        ("release (x86_64, glibc, dynamic)", &release),
        ("release-small (opt-level z, LTO, panic=abort, stripped)", &small),
        ("release-small, static (+crt-static, libseccomp.a)", &fixed),
    ] {
        match std::fs::metadata(path) {
            Ok(m) => println!("| {name} | {:.2} MiB |", m.len() as f64 / (1 << 20) as f64),
            Err(_) => println!("| {name} | not built |"),
        }
    }
    println!();

    let mut builds: Vec<(&str, PathBuf)> = Vec::new();
    if small.exists() {
        builds.push(("release-small", small));
    }
    if fixed.exists() {
        builds.push(("release-small static", fixed));
    }
    if builds.is_empty() {
        builds.push(("release", release));
    }
    for (build, agent_bin) in &builds {
        // Plain MQTT to the embedded broker.
        let world = World::new();
        let controller = Controller::start(&world, None, &[]);
        idle(&world, &controller, agent_bin, &controller.broker_url(), &format!("{build}, plain MQTT"), idle_secs);

        // MQTT over TLS through the gateway, enrolled with a join token.
        let world = World::new();
        let controller = Controller::start(&world, None, &["--mqtt-auth", "--mqtt-tls"]);
        let (ok, token, err) = baton_cli(&controller.server_url(), &["token", "create"]);
        assert!(ok, "token create: {err}");
        let broker = format!("mqtts://127.0.0.1:{}", controller.mqtt);
        let out = std::process::Command::new(agent_bin)
            .args(["join", token.trim(), "--broker", &broker, "--device-id", "bench-idle", "--data-dir"])
            .arg(world.path().join("agent"))
            .args(["--config", "/dev/null"])
            .output()
            .expect("join");
        assert!(out.status.success(), "join: {}", String::from_utf8_lossy(&out.stderr));
        idle(
            &world,
            &controller,
            agent_bin,
            &broker,
            &format!("{build}, MQTT over TLS (gateway, enrolled)"),
            idle_secs,
        );
    }
}

/// Resident KiB per mapping of `pid` (the binary, each library, heap,
/// stacks, anonymous), largest first.
fn rss_by_mapping(pid: u32) -> Vec<(String, u64)> {
    let smaps = std::fs::read_to_string(format!("/proc/{pid}/smaps")).unwrap_or_default();
    let mut by: std::collections::BTreeMap<String, u64> = std::collections::BTreeMap::new();
    let mut current = String::new();
    for line in smaps.lines() {
        let mut words = line.split_whitespace();
        let first = words.next().unwrap_or_default();
        if first.contains('-') && first.chars().all(|c| c.is_ascii_hexdigit() || c == '-') {
            let name = line.split_whitespace().nth(5).unwrap_or("[anonymous]");
            current = Path::new(name).file_name().map_or(name.to_string(), |n| n.to_string_lossy().into_owned());
        } else if first == "Rss:" {
            *by.entry(current.clone()).or_default() += words.next().and_then(|v| v.parse().ok()).unwrap_or(0);
        }
    }
    let mut v: Vec<(String, u64)> = by.into_iter().filter(|(_, k)| *k > 0).collect();
    v.sort_by_key(|e| std::cmp::Reverse(e.1));
    v
}

/// Runs the agent against `broker` for `idle_secs` and prints its memory.
fn idle(world: &World, controller: &Controller, agent_bin: &Path, broker: &str, what: &str, idle_secs: u64) {
    let mut args = vec![
        "--broker".to_string(),
        broker.to_string(),
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
    // `BENCH_COLD=1` (root): the page cache emptied first, as after a
    // device's reboot (a binary just written measured up to ~300 KiB more
    // on its first run than from a cold cache; BENCHMARKS.md).
    if std::env::var("BENCH_COLD").is_ok_and(|v| v == "1") {
        let _ = std::process::Command::new("sync").status();
        if let Err(e) = std::fs::write("/proc/sys/vm/drop_caches", "3") {
            eprintln!("BENCH_COLD: cannot drop the page cache: {e}");
        }
    }
    let agent = Proc::spawn("agent", agent_bin, &args, world.path());
    wait_for("agent online", Duration::from_secs(20), || {
        controller.device("bench-idle").filter(|d| d.heartbeat.is_some())
    });
    std::thread::sleep(Duration::from_secs(idle_secs)); // the measured idle period itself
    let pid = agent.pid();
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap_or_default();
    let rollup = std::fs::read_to_string(format!("/proc/{pid}/smaps_rollup")).unwrap_or_default();
    let private = kib_field(&rollup, "Private_Clean:") + kib_field(&rollup, "Private_Dirty:");
    // RSS = anonymous memory (heap, stacks, .data/.bss: what the agent really
    // holds) + pages of mapped files (its own text and rodata, the libraries):
    // clean, shared with the page cache, and dropped again under memory pressure.
    let anonymous = kib_field(&rollup, "Anonymous:");
    let rss = kib_field(&status, "VmRSS:");
    println!(
        "Agent `{}`, {what}, after {idle_secs} s connected, heartbeat every 1 s: RSS {rss} KiB (anonymous {anonymous} KiB, file-backed {} KiB), PSS {} KiB, private {} KiB, peak RSS {} KiB, threads {}.\n",
        agent_bin.file_name().map(|n| n.to_string_lossy()).unwrap_or_default(),
        rss.saturating_sub(anonymous),
        kib_field(&rollup, "Pss:"),
        private,
        kib_field(&status, "VmHWM:"),
        kib_field(&status, "Threads:"),
    );
    let parts: Vec<String> = rss_by_mapping(pid).iter().map(|(n, k)| format!("{n} {k}")).collect();
    println!("RSS by mapping (KiB): {}.\n", parts.join(", "));
}

/// The bytes on `pid`'s TCP connections to `port`, (sent, received), as
/// the kernel counts them (TCP payload: MQTT, or TLS records carrying it).
fn tcp_bytes(pid: u32, port: u16) -> (u64, u64) {
    let out = std::process::Command::new("ss")
        .args(["-tinpH", "state", "established", "dport", &format!("= :{port}")])
        .output()
        .expect("ss (iproute2)");
    let text = String::from_utf8_lossy(&out.stdout);
    let field =
        |l: &str, k: &str| -> u64 { l.split_whitespace().find_map(|w| w.strip_prefix(k)?.parse().ok()).unwrap_or(0) };
    let (mut sent, mut received, mut ours) = (0, 0, false);
    for line in text.lines() {
        if !line.starts_with(char::is_whitespace) {
            ours = line.contains(&format!("pid={pid},"));
        } else if ours {
            sent += field(line, "bytes_sent:");
            received += field(line, "bytes_received:");
        }
    }
    (sent, received)
}

/// Issue 21: what an idle device with five running containers costs on its
/// MQTT connection, both ways, plain and over TLS, with the heartbeat
/// interval before 1.10 (15 s) and the default since (300 s), at the
/// default keepalive (30 s) and at 120 s. All six agents are measured over
/// the same `secs`.
fn traffic(secs: u64) {
    println!("## Idle MQTT traffic per device\n");
    let agent_bin = bin("baton-agent");
    let mut rows = Vec::new();
    let mut worlds = Vec::new();
    for tls in [false, true] {
        let world = World::new();
        let extra: &[&str] = if tls { &["--mqtt-auth", "--mqtt-tls"] } else { &[] };
        let controller = Controller::start(&world, None, extra);
        let server = controller.server_url();
        let broker = if tls { format!("mqtts://127.0.0.1:{}", controller.mqtt) } else { controller.broker_url() };
        let mut agents = Vec::new();
        for (every, keepalive) in [("15", "30"), ("300", "30"), ("300", "120")] {
            let id = format!("idle-{every}-{keepalive}");
            if tls {
                let (ok, token, err) = baton_cli(&server, &["token", "create"]);
                assert!(ok, "token create: {err}");
                let out = std::process::Command::new(&agent_bin)
                    .args(["join", token.trim(), "--broker", &broker, "--device-id", &id, "--data-dir"])
                    .arg(world.path().join(format!("agent-{id}")))
                    .args(["--config", "/dev/null"])
                    .output()
                    .expect("join");
                assert!(out.status.success(), "join: {}", String::from_utf8_lossy(&out.stderr));
            }
            give_busybox(&world, &id, "busybox:idle");
            let agent = start_agent(&world, &id, &broker, &["--heartbeat-interval", every, "--keepalive", keepalive]);
            agents.push((every, keepalive, agent));
        }
        for i in 0..5 {
            let manifest = format!("name: idle-{i}\nimage: busybox:idle\ncommand: [sleep, \"1000000\"]\n");
            apply_yaml(&server, &world, &format!("idle-{i}.yaml"), &manifest);
        }
        for i in 0..5 {
            wait_for("five containers on every device", Duration::from_secs(120), || {
                settled(&server, &format!("idle-{i}"), 1, 3)
            });
        }
        let port = controller.mqtt;
        for (every, keepalive, agent) in agents {
            rows.push((tls, every, keepalive, port, agent));
        }
        worlds.push((world, controller));
    }
    let before: Vec<(u64, u64)> = rows.iter().map(|(_, _, _, port, a)| tcp_bytes(a.pid(), *port)).collect();
    std::thread::sleep(Duration::from_secs(secs)); // the measured idle period itself
    println!("{secs} s of five idle containers per device, bytes on the device's MQTT connection (TCP payload):\n");
    println!(
        "| link | heartbeat every | keepalive (Will after 1.5×) | device → broker | broker → device | per day, both ways |\n|---|---|---|---|---|---|"
    );
    for ((tls, every, keepalive, port, agent), (s0, r0)) in rows.iter().zip(before) {
        let (s1, r1) = tcp_bytes(agent.pid(), *port);
        let (sent, received) = (s1.saturating_sub(s0), r1.saturating_sub(r0));
        let per_day = (sent + received) as f64 * 86_400.0 / secs as f64 / 1024.0;
        let link = if *tls { "MQTT over TLS" } else { "plain MQTT" };
        println!("| {link} | {every} s | {keepalive} s | {sent} B | {received} B | {per_day:.1} KiB |");
    }
    println!();
    drop(worlds);
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
    let steps = |name: &str, ports: &[u16], http: u16| -> f64 {
        let mut max_absorbed: f64 = 0.0;
        for rate in rates.iter().copied().map(Some).chain([None]) {
            let f = flood(ports, http, devices, rate, Duration::from_secs(secs));
            let offered = rate.map_or("unthrottled".to_string(), |r| r.to_string());
            println!("| {name} | {offered} | {:.0} | {:.0} | {:.3} |", f.sent_per_s, f.absorbed_per_s, f.delivered);
            // "Best" counts only steps where (nearly) everything sent arrived.
            if f.delivered >= 0.99 {
                max_absorbed = max_absorbed.max(f.absorbed_per_s);
            }
        }
        max_absorbed
    };
    for kind in [BrokerKind::Embedded, BrokerKind::Mosquitto] {
        let world = World::new();
        let mosquitto = matches!(kind, BrokerKind::Mosquitto).then(|| Mosquitto::start(&world));
        let controller = Controller::start(&world, mosquitto.as_ref().map(|m| m.port), &[]);
        best.push(steps(&format!("{kind:?}"), &[controller.mqtt], controller.http));
    }
    // deploy/cluster/: three NATS nodes (devices spread over them), three
    // controllers on PostgreSQL, one of which leads and ingests.
    let cluster = DeployedCluster::up(&[]);
    let leader = cluster.serving()[0];
    best.push(steps("NATS ×3 + 3 controllers on PostgreSQL", &cluster.mqtt, leader));
    drop(cluster);
    if let [embedded, mosquitto, nats] = best[..] {
        println!(
            "\nHighest rate absorbed with ≥ 99 % delivered: embedded {embedded:.0}, Mosquitto {mosquitto:.0}, NATS cluster {nats:.0}; \
             embedded / Mosquitto = {:.2}, NATS cluster / Mosquitto = {:.2}\n",
            embedded / mosquitto.max(1.0),
            nats / mosquitto.max(1.0)
        );
    }
}

fn metric(http: u16, series: &str) -> u64 {
    let text = get_text(http, "/metrics").expect("metrics");
    text.lines().find_map(|l| l.strip_prefix(series).and_then(|v| v.trim().parse().ok())).unwrap_or(0)
}

/// `devices` MQTT connections spread over the broker `ports`, heartbeating
/// at `rate` in all; what the controller serving on `http` counted.
fn flood(ports: &[u16], http: u16, devices: usize, rate: Option<u64>, window: Duration) -> Flood {
    let rt = tokio::runtime::Builder::new_multi_thread().enable_all().build().expect("runtime");
    let sent = Arc::new(AtomicU64::new(0));
    let running = Arc::new(AtomicBool::new(false));
    let stop = Arc::new(AtomicBool::new(false));
    // Each device's share of the offered rate, as a publish interval.
    let period = rate.map(|r| Duration::from_secs_f64(devices as f64 / r.max(1) as f64));
    for i in 0..devices {
        let (sent, running, stop) = (sent.clone(), running.clone(), stop.clone());
        let port = ports[i % ports.len()];
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
        let known: Vec<serde_json::Value> = get_json(http, "/api/v1/devices").unwrap_or_default();
        (known.len() >= devices).then_some(())
    });
    let series = "baton_mqtt_messages_total{kind=\"heartbeat\"}";
    let start_count = metric(http, series);
    let started = Instant::now();
    running.store(true, Relaxed);
    std::thread::sleep(window); // the measured window itself
    running.store(false, Relaxed);
    let sending = started.elapsed().as_secs_f64();
    // Let what is queued arrive: the absorbed rate counts the time until the
    // controller's count stops moving (2 s without a change), not just the
    // sending window.
    let mut last = metric(http, series);
    let mut last_moved = started.elapsed();
    while started.elapsed() - last_moved < Duration::from_secs(2) {
        std::thread::sleep(Duration::from_millis(200));
        let now = metric(http, series);
        if now != last {
            last = now;
            last_moved = started.elapsed();
        }
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

fn percentile(sorted: &[f64], p: f64) -> f64 {
    sorted[((sorted.len() - 1) as f64 * p).round() as usize]
}

/// N `sleep` containers started at once, as a busy device boots: the
/// agent's supervisor (one batch: starts side by side) and the same
/// supervisor starting them one after another (the path before batches),
/// vs a shell starting `runc run -d` for each in the background and waiting.
/// Time from the first start until every container runs. Rounds interleaved.
fn starts(n: usize, rounds: usize) {
    use baton_agent::runtime::{ContainerRuntime, ContainerState, Layout, LibcontainerRuntime};
    use baton_agent::supervisor::Supervisor;
    use baton_protocol::spec::ContainerSpec;
    use std::process::{Command, Stdio};

    println!("## {n} containers started at once, {rounds} rounds\n");
    let world = World::new();
    let rootfs = baton_tests::fixtures::busybox_rootfs(world.path()).expect("rootfs");
    let run_dir = PathBuf::from(format!("/run/baton-bench-starts-{}", std::process::id()));
    let layout = Layout::new(world.path().join("data"), &run_dir)
        .with_cgroup_parent(format!("/baton-bench-starts-{}", std::process::id()));
    let spec = ContainerSpec { command: vec!["/bin/sleep".into(), "600".into()], ..Default::default() };
    let peer_root = world.path().join("peer-root");
    for i in 0..n {
        let bundle = world.path().join(format!("bundle-{i}"));
        std::fs::create_dir_all(&bundle).expect("bundle");
        let config = baton_agent::runtime::oci::config_json(&format!("peer-{i}"), &spec, &rootfs, &layout, &[]);
        std::fs::write(bundle.join("config.json"), config.to_string()).expect("config.json");
    }

    let ours = |round: usize, batch: bool| -> f64 {
        let mut rt = LibcontainerRuntime::new(layout.clone(), bin("baton-agent"));
        rt.stop_grace = Duration::from_millis(100);
        let mut sup = Supervisor::new(rt);
        let names: Vec<String> = (0..n).map(|i| format!("w{round}{}-{i}", if batch { "b" } else { "s" })).collect();
        let t = Instant::now();
        if batch {
            sup.begin_batch();
        }
        for name in &names {
            sup.ensure(name, 1, spec.clone(), rootfs.clone().into(), 0);
        }
        sup.end_batch(0);
        let ids: Vec<String> = names.iter().filter_map(|w| sup.current_container(w)).collect();
        assert_eq!(ids.len(), n, "every workload has a container");
        while !ids.iter().all(|id| matches!(sup.runtime().state(id), Ok(ContainerState::Running(_)))) {
            std::thread::sleep(Duration::from_micros(500));
        }
        let ms = t.elapsed().as_secs_f64() * 1000.0;
        for id in &ids {
            let _ = sup.runtime().kill(id);
        }
        for id in &ids {
            let deadline = Instant::now() + Duration::from_secs(10);
            while !matches!(sup.runtime().state(id), Ok(ContainerState::Exited(_))) && Instant::now() < deadline {
                std::thread::sleep(Duration::from_millis(10));
            }
            let _ = sup.runtime().remove(id);
        }
        ms
    };
    let runc = which("runc");
    let peer = |runc: &Path| -> Option<f64> {
        let script = format!(
            "for i in $(seq 0 {last}); do {runc} --root {root} run -d -b {dir}/bundle-$i peer-$i >/dev/null 2>&1 </dev/null & done; wait",
            last = n - 1,
            runc = runc.display(),
            root = peer_root.display(),
            dir = world.path().display()
        );
        let t = Instant::now();
        let ok = Command::new("sh").args(["-c", &script]).stdout(Stdio::null()).status().ok()?.success();
        let list = Command::new(runc).arg("--root").arg(&peer_root).args(["list", "-q"]).output().ok()?;
        let running = String::from_utf8_lossy(&list.stdout).lines().count();
        let ms = t.elapsed().as_secs_f64() * 1000.0;
        for i in 0..n {
            let _ = Command::new(runc)
                .arg("--root")
                .arg(&peer_root)
                .args(["delete", "-f", &format!("peer-{i}")])
                .stdout(Stdio::null())
                .stderr(Stdio::null())
                .status();
        }
        (ok && running == n).then_some(ms)
    };
    let (mut batched, mut serial, mut t_runc) = (Vec::new(), Vec::new(), Vec::new());
    for round in 0..rounds {
        batched.push(ours(round, true));
        serial.push(ours(round, false));
        if let Some(ms) = runc.as_deref().and_then(&peer) {
            t_runc.push(ms);
        }
    }
    println!("| how | median ms to all {n} running | min | max |\n|---|---|---|---|");
    for (name, v) in [
        ("Baton, one batch (side by side)", &mut batched),
        ("Baton, one after another", &mut serial),
        ("runc run -d, all in the background of one shell", &mut t_runc),
    ] {
        if v.is_empty() {
            println!("| {name} | not installed or failed | | |");
            continue;
        }
        v.sort_by(f64::total_cmp);
        println!("| {name} | {:.0} | {:.0} | {:.0} |", percentile(v, 0.5), v[0], v[v.len() - 1]);
    }
    if !t_runc.is_empty() {
        println!("\nBaton (batch) / runc (medians): {:.2}", percentile(&batched, 0.5) / percentile(&t_runc, 0.5));
    }
    println!("Baton (batch) / Baton one after another: {:.2}\n", percentile(&batched, 0.5) / percentile(&serial, 0.5));
    let _ = std::fs::remove_dir_all(&run_dir);
}

/// create+start+wait+delete of `/bin/true`: Baton's runtime path (shim
/// launch included) vs `runc run` and `crun run` on the same bundle, the three
/// interleaved so drift hits them alike. Then the shims' memory.
fn runtime(iters: usize) {
    use baton_agent::runtime::{ContainerRuntime, ContainerState, CreateRequest, Layout, LibcontainerRuntime};
    use baton_protocol::spec::ContainerSpec;
    use std::process::{Command, Stdio};

    println!("## Container start latency: create + start + wait + delete of `/bin/true`, {iters} runs each\n");
    let world = World::new();
    let rootfs = baton_tests::fixtures::busybox_rootfs(world.path()).expect("rootfs");
    // As on a device: state on tmpfs (/run), bundles and exit records on disk.
    let run_dir = PathBuf::from(format!("/run/baton-bench-{}", std::process::id()));
    let layout = Layout::new(world.path().join("data"), &run_dir)
        .with_cgroup_parent(format!("/baton-bench-{}", std::process::id()));
    let mut rt = LibcontainerRuntime::new(layout.clone(), bin("baton-agent"));
    rt.log_flush = Duration::from_millis(0);
    let spec = ContainerSpec { command: vec!["/bin/true".into()], ..Default::default() };

    let bundle = world.path().join("bundle");
    std::fs::create_dir_all(&bundle).expect("bundle");
    let config = baton_agent::runtime::oci::config_json("peer", &spec, &rootfs, &layout, &[]);
    std::fs::write(bundle.join("config.json"), config.to_string()).expect("config.json");
    let peer_root = world.path().join("peer-root");

    let run_peer = |argv: &[String]| -> Option<f64> {
        let t = Instant::now();
        let ok = Command::new(&argv[0])
            .args(&argv[1..])
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .status()
            .ok()?
            .success();
        ok.then(|| t.elapsed().as_secs_f64() * 1000.0)
    };
    let runc = which("runc").map(|p| {
        vec![
            p.display().to_string(),
            "--root".into(),
            peer_root.display().to_string(),
            "run".into(),
            "-b".into(),
            bundle.display().to_string(),
            "peer".into(),
        ]
    });
    // crun refuses this host's hybrid cgroup layout: run it in a private mount
    // namespace with the cgroup2 mount removed (PLATFORM.md); that costs a few ms.
    let crun = which("crun").map(|p| {
        vec![
            "unshare".into(),
            "-m".into(),
            "sh".into(),
            "-c".into(),
            format!(
                "umount /sys/fs/cgroup/unified 2>/dev/null; exec {} --root {} run -b {} peer",
                p.display(),
                peer_root.display(),
                bundle.display()
            ),
        ]
    });

    // The same container without its seccomp filter: what the filter costs a start.
    let mut unconfined_spec = spec.clone();
    unconfined_spec.security.seccomp_unconfined = true;
    let ours_run = |id: &str, spec: &ContainerSpec| -> f64 {
        let t = Instant::now();
        rt.create(&CreateRequest { id, spec, rootfs: rootfs.clone().into(), provenance: Default::default() })
            .expect("create");
        loop {
            match rt.state(id).expect("state") {
                ContainerState::Exited(e) => {
                    assert_eq!(e.code, 0);
                    break;
                }
                _ => std::thread::sleep(Duration::from_micros(200)),
            }
        }
        rt.remove(id).expect("remove");
        t.elapsed().as_secs_f64() * 1000.0
    };
    let (mut ours, mut t_runc, mut t_crun, mut t_unconfined) = (Vec::new(), Vec::new(), Vec::new(), Vec::new());
    let mut t_cold = Vec::new();
    for i in 0..iters {
        ours.push(ours_run(&format!("bench-{i}"), &spec));
        t_unconfined.push(ours_run(&format!("bench-u-{i}"), &unconfined_spec));
        // The seccomp program compiled again (its cache emptied first): a
        // profile's first start, and every start before the cache existed.
        let _ = std::fs::remove_dir_all(run_dir.join("seccomp"));
        t_cold.push(ours_run(&format!("bench-c-{i}"), &spec));
        if let Some(ms) = runc.as_ref().and_then(|a| run_peer(a)) {
            t_runc.push(ms);
        }
        if let Some(ms) = crun.as_ref().and_then(|a| run_peer(a)) {
            t_crun.push(ms);
        }
    }
    println!("| runtime | median ms | p90 ms | vs Baton |\n|---|---|---|---|");
    let mut medians = Vec::new();
    for (name, v) in [
        ("Baton (shim + libcontainer)", &mut ours),
        ("runc run", &mut t_runc),
        ("crun run (in unshare -m)", &mut t_crun),
        ("Baton, seccomp off (`seccomp_unconfined`)", &mut t_unconfined),
        ("Baton, seccomp program compiled on this start (cache emptied)", &mut t_cold),
    ] {
        if v.is_empty() {
            println!("| {name} | not installed or failed | | |");
            continue;
        }
        v.sort_by(f64::total_cmp);
        medians.push(percentile(v, 0.5));
        println!(
            "| {name} | {:.1} | {:.1} | {:.2}× |",
            percentile(v, 0.5),
            percentile(v, 0.9),
            percentile(v, 0.5) / medians[0]
        );
    }
    for (peer, v) in [("runc", &t_runc), ("crun", &t_crun)] {
        if !v.is_empty() {
            println!("\nBaton / {peer} (medians): {:.2}", percentile(&ours, 0.5) / percentile(v, 0.5));
        }
    }
    println!("\nPolling for the exit record adds at most 0.2 ms to Baton's times.\n");

    let n = 10;
    println!("## Shim memory with {n} containers running `sleep`\n");
    let sleeper = ContainerSpec { command: vec!["/bin/sleep".into(), "600".into()], ..Default::default() };
    for i in 0..n {
        rt.create(&CreateRequest {
            id: &format!("mem-{i}"),
            spec: &sleeper,
            rootfs: rootfs.clone().into(),
            provenance: Default::default(),
        })
        .expect("create");
    }
    std::thread::sleep(Duration::from_secs(2)); // let the shims settle before sampling
    let mut rows = Vec::new();
    let mut spawner = None;
    for entry in std::fs::read_dir("/proc").into_iter().flatten().flatten() {
        let pid = entry.file_name().to_string_lossy().to_string();
        let Ok(cmd) = std::fs::read(format!("/proc/{pid}/cmdline")) else { continue };
        let cmd = String::from_utf8_lossy(&cmd).replace('\0', " ");
        let mem = || {
            let rollup = std::fs::read_to_string(format!("/proc/{pid}/smaps_rollup")).unwrap_or_default();
            let private = kib_field(&rollup, "Private_Clean:") + kib_field(&rollup, "Private_Dirty:");
            (kib_field(&rollup, "Rss:"), kib_field(&rollup, "Pss:"), private)
        };
        if cmd.contains(" shim ") && cmd.contains("--id mem-") {
            rows.push(mem());
        } else if cmd.contains(" spawner --title-room ") {
            // The one process that forks the shims (this bench's runtime's).
            spawner = Some(mem());
        }
    }
    for i in 0..n {
        let _ = rt.kill(&format!("mem-{i}"));
    }
    if rows.is_empty() {
        println!("no shims found\n");
        return;
    }
    let avg = |f: fn(&(u64, u64, u64)) -> u64| rows.iter().map(f).sum::<u64>() / rows.len() as u64;
    println!("| per shim (mean of {}) | KiB |\n|---|---|", rows.len());
    println!("| RSS | {} |\n| PSS | {} |\n| private (USS) | {} |\n", avg(|r| r.0), avg(|r| r.1), avg(|r| r.2));
    if let Some((rss, pss, private)) = spawner {
        println!("| the spawner (one per device) | KiB |\n|---|---|");
        println!("| RSS | {rss} |\n| PSS | {pss} |\n| private (USS) | {private} |\n");
        let total: u64 = rows.iter().map(|r| r.1).sum::<u64>() + pss;
        println!("Shims and spawner, PSS per container: {} KiB\n", total / rows.len() as u64);
    }
    for i in 0..n {
        let id = format!("mem-{i}");
        let deadline = Instant::now() + Duration::from_secs(10);
        while !matches!(rt.state(&id), Ok(ContainerState::Exited(_))) && Instant::now() < deadline {
            std::thread::sleep(Duration::from_millis(20));
        }
        let _ = rt.remove(&id);
    }
    let _ = std::fs::remove_dir_all(&run_dir);
    // The peers leave the cgroup parent behind (runc in every hierarchy, the unified one included).
    let parent = format!("baton-bench-{}", std::process::id());
    for tree in std::fs::read_dir("/sys/fs/cgroup").into_iter().flatten().flatten() {
        remove_cgroup_tree(&tree.path().join(&parent));
    }
}

/// Removes an (empty) cgroup and its children: cgroup directories go with rmdir only.
fn remove_cgroup_tree(dir: &std::path::Path) {
    for child in std::fs::read_dir(dir).into_iter().flatten().flatten() {
        if child.file_type().is_ok_and(|t| t.is_dir()) {
            remove_cgroup_tree(&child.path());
        }
    }
    let _ = std::fs::remove_dir(dir);
}

/// Pulling a 3-layer image from a local registry: Baton's registry client
/// into a fresh store vs `skopeo copy` into a fresh OCI directory, then an
/// update that changes one layer, both runs interleaved.
fn pull(runs: usize) {
    use baton_agent::image::manifest::Platform;
    use baton_agent::image::registry::{Registry, RegistryConfig};
    use baton_agent::image::ImageStore;
    use baton_tests::fixtures::{oci_layout_layers, Layer};

    let world = World::new();
    let registry = RegistryServer::start(&world);
    let rootfs = baton_tests::fixtures::busybox_rootfs(world.path()).expect("rootfs");
    // Incompressible data, so sizes mean something: a 4 MiB "runtime" layer.
    let mut x = 0x9e37_79b9_7f4a_7c15u64;
    let blob: Vec<u8> = (0..4 << 20)
        .map(|_| {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            x as u8
        })
        .collect();
    for (tag, app) in [("1", "app v1"), ("2", "app v2")] {
        let layers = [
            Layer::Dir(&rootfs),
            Layer::Files(vec![("opt/runtime.bin", blob.clone())]),
            Layer::Files(vec![("opt/app.txt", app.as_bytes().to_vec())]),
        ];
        let layout = oci_layout_layers(&world.path().join(format!("layout-{tag}")), &layers, "app").expect("layout");
        registry.push(&layout, "app", &format!("bench/app:{tag}"));
    }
    let skopeo = which("skopeo").expect("skopeo");
    let src = |tag: &str| format!("docker://127.0.0.1:{}/bench/app:{tag}", registry.port);
    let reference = |tag: &str| format!("127.0.0.1:{}/bench/app:{tag}", registry.port);
    let client = Registry::new(RegistryConfig::default());

    let (mut ours, mut theirs, mut ours_update, mut theirs_update) = (Vec::new(), Vec::new(), Vec::new(), Vec::new());
    let (mut ours_bytes, mut ours_update_bytes, mut ours_stored, mut theirs_stored, mut theirs_update_written) =
        (0, 0, 0, 0, 0);
    let (mut unpack_first, mut unpack_update) = (Vec::new(), Vec::new());
    let (mut unpacked_first, mut unpacked_update, mut whole_update) = (0, 0, 0);
    let (mut disk_first, mut peer_disk, mut peer_rootfs) = (0, 0, 0);
    for i in 0..runs {
        let store_dir = world.path().join(format!("store-{i}"));
        let store = ImageStore::open(&store_dir).expect("store");
        let t = Instant::now();
        let (first, stats) = client.pull(&store, &reference("1"), &Platform::current()).expect("pull");
        ours.push(t.elapsed().as_secs_f64() * 1000.0);
        ours_bytes = stats.bytes_downloaded;
        ours_stored = dir_bytes(&store_dir.join("blobs"));
        let t = Instant::now();
        let (second, stats) = client.pull(&store, &reference("2"), &Platform::current()).expect("pull v2");
        ours_update.push(t.elapsed().as_secs_f64() * 1000.0);
        ours_update_bytes = stats.bytes_downloaded;
        // Unpacking (off the timings above): each layer once, shared by both tags.
        let t = Instant::now();
        store.rootfs(&first).expect("unpack v1");
        unpack_first.push(t.elapsed().as_secs_f64() * 1000.0);
        unpacked_first = dir_bytes(&store_dir.join("layers"));
        // What the device keeps for tag 1: blobs dropped once unpacked and verified.
        disk_first = store.size();
        let t = Instant::now();
        let rootfs = store.rootfs(&second).expect("unpack v2");
        unpack_update.push(t.elapsed().as_secs_f64() * 1000.0);
        unpacked_update = dir_bytes(&store_dir.join("layers")) - unpacked_first;
        whole_update = rootfs.layers.iter().map(|l| dir_bytes(l)).sum::<u64>();

        let oci_dir = world.path().join(format!("oci-{i}"));
        let copy = |tag: &str| {
            let t = Instant::now();
            let ok = std::process::Command::new(&skopeo)
                .args(["copy", "--src-tls-verify=false", &src(tag)])
                .arg(format!("oci:{}:app-{tag}", oci_dir.display()))
                .output()
                .expect("skopeo")
                .status
                .success();
            assert!(ok, "skopeo copy failed");
            t.elapsed().as_secs_f64() * 1000.0
        };
        theirs.push(copy("1"));
        theirs_stored = dir_bytes(&oci_dir.join("blobs"));
        // The peer's device-side equivalent: the OCI dir plus `umoci unpack` of it.
        let bundle = world.path().join(format!("bundle-{i}"));
        let out = std::process::Command::new("umoci")
            .args(["unpack", "--image"])
            .arg(format!("{}:app-1", oci_dir.display()))
            .arg(&bundle)
            .output()
            .expect("umoci");
        if !out.status.success() {
            eprintln!("umoci unpack: {}", String::from_utf8_lossy(&out.stderr));
        } else {
            peer_rootfs = dir_bytes(&bundle.join("rootfs"));
            peer_disk = dir_bytes(&oci_dir) + dir_bytes(&bundle);
        }
        theirs_update.push(copy("2"));
        theirs_update_written = dir_bytes(&oci_dir.join("blobs")) - theirs_stored;
    }
    for v in [&mut ours, &mut theirs, &mut ours_update, &mut theirs_update, &mut unpack_first, &mut unpack_update] {
        v.sort_by(f64::total_cmp);
    }
    let med = |v: &Vec<f64>| percentile(v, 0.5);
    println!("## Image pull from a local registry: 3 layers (busybox, 4 MiB incompressible, a small app file), {runs} runs\n");
    println!("| | Baton (pull, verify, store) | skopeo copy to an OCI dir | skopeo / Baton |\n|---|---|---|---|");
    println!(
        "| first pull, median | {:.0} ms | {:.0} ms | {:.2} |",
        med(&ours),
        med(&theirs),
        med(&theirs) / med(&ours)
    );
    println!("| bytes stored (blobs) | {ours_stored} | {theirs_stored} | |");
    println!(
        "| update changing the app layer, median | {:.0} ms | {:.0} ms | {:.2} |",
        med(&ours_update),
        med(&theirs_update),
        med(&theirs_update) / med(&ours_update)
    );
    println!("| bytes downloaded (Baton) / written (skopeo) by the update | {ours_update_bytes} | {theirs_update_written} | |\n");
    println!("Baton's first pull downloaded {ours_bytes} bytes of blobs (config + layers; manifests not counted).\n");
    println!("| unpacking (layers shared between images) | median | bytes written |\n|---|---|---|");
    println!("| tag 1, every layer | {:.0} ms | {unpacked_first} |", med(&unpack_first));
    println!("| tag 2, only its new layer | {:.1} ms | {unpacked_update} |", med(&unpack_update));
    println!("| (tag 2 unpacked whole, as one tree per image would) | | {whole_update} |\n");
    println!("| disk used for tag 1, pulled and unpacked | Baton store | skopeo copy + umoci unpack |\n|---|---|---|");
    println!("| total bytes | {disk_first} | {peer_disk} |");
    println!("| of which the unpacked files | {unpacked_first} | {peer_rootfs} |");
    let ratio = |total: u64, files: u64| if files == 0 { f64::NAN } else { total as f64 / files as f64 };
    println!(
        "| total / unpacked | {:.3} | {:.3} |\n",
        ratio(disk_first, unpacked_first),
        ratio(peer_disk, peer_rootfs)
    );
}

/// The scheduler alone, on plain data: `instances` replicas over `devices`
/// devices (1,000-replica workloads, half spread across 20 sites), then the
/// same inputs again (nothing moves), then after 1 % of devices are gone.
fn schedule(devices: usize, instances: usize) {
    use baton_controller::schedule::{schedule, Assignment, DeviceFacts, Placed};
    use baton_controller::workload::Placement;
    use baton_protocol::spec::{ContainerSpec, Resources, WorkloadSpec};
    println!("## Scheduler: {instances} replicas on {devices} devices\n");
    let mut facts: Vec<DeviceFacts> = (0..devices)
        .map(|i| DeviceFacts {
            id: format!("dev-{i:05}"),
            tenant: "default".into(),
            labels: [("site".to_string(), format!("site-{}", i % 20))].into(),
            arch: "aarch64".into(),
            memory_bytes: 4 << 30,
            cpu_millis: 4000,
            reachable: true,
            gone: false,
            no_workloads: false,
        })
        .collect();
    let per_workload = 1000.min(instances);
    let workloads: Vec<Placed> = (0..instances / per_workload)
        .map(|i| Placed {
            tenant: "default".into(),
            spec: WorkloadSpec {
                name: format!("w-{i:04}"),
                container: ContainerSpec {
                    resources: Resources { memory_bytes: Some(16 << 20), cpu_millis: Some(50), ..Default::default() },
                    ..Default::default()
                },
                ..Default::default()
            },
            placement: Placement { spread_by: (i % 2 == 0).then(|| "site".to_string()), ..Default::default() },
            replicas: Some(per_workload as u32),
        })
        .collect();
    let time = |prev: &Assignment, facts: &[DeviceFacts]| {
        let t = Instant::now();
        let s = schedule(facts, &workloads, prev);
        (t.elapsed(), s)
    };
    let (cold, first) = time(&Assignment::new(), &facts);
    let placed: usize = first.assignment.values().map(|d| d.len()).sum();
    let (warm, second) = time(&first.assignment, &facts);
    assert_eq!(first, second, "rescheduling the same inputs moved replicas");
    for f in facts.iter_mut().step_by(100) {
        f.reachable = false;
        f.gone = true;
    }
    let (moved_t, third) = time(&first.assignment, &facts);
    let moved: usize = third.assignment.iter().map(|(w, d)| d.difference(&first.assignment[w]).count()).sum();
    println!("| run | time | replicas placed |\n|---|---|---|");
    println!("| from nothing | {:.0} ms | {placed} |", cold.as_secs_f64() * 1000.0);
    println!("| again, same inputs (nothing moves) | {:.0} ms | {placed} |", warm.as_secs_f64() * 1000.0);
    println!(
        "| 1 % of devices gone (their replicas move) | {:.0} ms | {moved} moved |\n",
        moved_t.as_secs_f64() * 1000.0
    );
}

/// CPU ticks (user + system) and RSS of a process.
fn cpu_and_rss(pid: u32) -> (u64, u64, u64) {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).unwrap_or_default();
    // Fields after the parenthesised command name; utime and stime are the 12th and 13th.
    let fields: Vec<&str> = stat.rsplit_once(')').map(|(_, r)| r.split_whitespace().collect()).unwrap_or_default();
    let ticks = fields.get(11).and_then(|v| v.parse::<u64>().ok()).unwrap_or(0)
        + fields.get(12).and_then(|v| v.parse::<u64>().ok()).unwrap_or(0);
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap_or_default();
    (ticks, kib_field(&status, "VmRSS:"), kib_field(&status, "VmHWM:"))
}

/// The autoscaler's reaction to a load step on `devices` simulated devices
/// (heartbeats every 5 s): `web` (1 CPU requested, 50 % target, 10–200
/// replicas, window 30 s, cooldown 10 s) under 5 CPUs of demand, 50 CPUs
/// from 90 s into the simulator's run, 5 again from 300 s. Times from each
/// step to the first decision and to the count the load calls for, running.
fn autoscale(devices: usize) {
    use baton_controller::view::{Event, WorkloadView};
    let (hb, window, cooldown) = (5, 30, 10);
    println!(
        "## Autoscaling: {devices} simulated devices, heartbeat {hb} s, window {window} s, cooldown {cooldown} s\n"
    );
    let world = World::new();
    let controller = Controller::start(&world, None, &[]);
    let server = controller.server_url();
    let started = Instant::now();
    let hb_arg = hb.to_string();
    let _sim = start_simulator(
        &world,
        "as",
        devices,
        &controller.broker_url(),
        &["--heartbeat-interval", &hb_arg, "--load", "web=0:5000,90:50000,300:5000"],
    );
    wait_for("simulated fleet", Duration::from_secs(120), || (controller.devices().len() == devices).then_some(()));
    let path = world.path().join("web.yaml");
    std::fs::write(
        &path,
        format!(
            "name: web\nimage: 127.0.0.1:9/web:1\nresources: {{cpu: 1000m}}\nreplicas: 10\n\
             autoscale: {{min: 10, max: 200, cpu_percent: 50, window: {window}, cooldown: {cooldown}}}\n"
        ),
    )
    .expect("manifest");
    let (ok, _, err) = baton_cli(&server, &["apply", "-f", path.to_str().expect("utf-8")]);
    assert!(ok, "{err}");
    let (ticks0, _, _) = cpu_and_rss(controller.proc.pid());
    let state = || -> Option<(u32, usize)> {
        let w: WorkloadView = get_json(controller.http, "/api/v1/workloads/web").ok()?;
        Some((w.replicas.unwrap_or(0), w.healthy()))
    };
    let first_decision_after = |at: Duration| -> Option<f64> {
        let events: Vec<Event> = get_json(controller.http, "/api/v1/events?subject=web&limit=1000").ok()?;
        let t0 = controller_epoch_ms(started) + at.as_millis() as u64;
        events
            .iter()
            .filter(|e| e.name == "workload.autoscaled" && e.at_ms >= t0)
            .map(|e| (e.at_ms - t0) as f64 / 1000.0)
            .reduce(f64::min)
    };
    // (first decision, the count running healthy), in seconds after the step at `at`.
    let step = |at: u64, want: u32| -> (f64, f64) {
        let at = Duration::from_secs(at);
        assert!(started.elapsed() < at, "the fleet took too long to settle before the step");
        while started.elapsed() < at {
            std::thread::sleep(Duration::from_millis(100));
        }
        loop {
            let (replicas, healthy) = state().unwrap_or_default();
            let now = started.elapsed().saturating_sub(at).as_secs_f64();
            if replicas == want && healthy == want as usize {
                return (first_decision_after(at).unwrap_or(f64::NAN), now);
            }
            assert!(now < 240.0, "no {want} replicas 240 s after the step: {replicas}, {healthy} healthy");
            std::thread::sleep(Duration::from_millis(250));
        }
    };
    wait_for("10 replicas", Duration::from_secs(60), || (state()? == (10, 10)).then_some(()));
    let (up_first, up_done) = step(90, 100);
    let (down_first, down_done) = step(300, 10);
    let (ticks1, _, hwm) = cpu_and_rss(controller.proc.pid());
    let events: Vec<Event> = get_json(controller.http, "/api/v1/events?subject=web&limit=1000").expect("events");
    let decisions: Vec<String> = events
        .iter()
        .filter(|e| e.name == "workload.autoscaled")
        .map(|e| e.message.split(':').next().unwrap_or("").replace("autoscaled from ", "").replace(" replicas", ""))
        .rev()
        .collect();
    println!("| measure | value |\n|---|---|");
    println!("| load step 5 → 50 CPUs (10 → 100 replicas): first decision | {up_first:.1} s |");
    println!("| … 100 replicas running healthy | {up_done:.1} s |");
    println!("| load step 50 → 5 CPUs (100 → 10): first decision (window {window} s) | {down_first:.1} s |");
    println!("| … back to 10 replicas | {down_done:.1} s |");
    println!("| decisions | {} ({}) |", decisions.len(), decisions.join(", "));
    println!(
        "| controller CPU, apply → end ({:.0} s) / RSS high-water mark | {:.2} s / {hwm} KiB |\n",
        started.elapsed().as_secs_f64(),
        (ticks1 - ticks0) as f64 / 100.0
    );
}

/// The controller's clock when the simulator run began (Unix ms).
fn controller_epoch_ms(started: Instant) -> u64 {
    let now = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map_or(0, |d| d.as_millis() as u64);
    now - started.elapsed().as_millis() as u64
}

/// Controller CPU with 1,000 workloads autoscaled (one replica each, steady:
/// nothing to decide, but every one judged every 500 ms tick from its
/// instance's heartbeats), against the same workloads without autoscale,
/// on `devices` simulated devices with heartbeats every 15 s.
fn autoscale_cpu(devices: usize, secs: u64) {
    let workloads = devices;
    println!("## Autoscaling {workloads} workloads: controller CPU over {secs} s, {devices} simulated devices\n");
    let world = World::new();
    let controller = Controller::start(&world, None, &[]);
    let server = controller.server_url();
    let _sim = start_simulator(&world, "ac", devices, &controller.broker_url(), &["--heartbeat-interval", "15"]);
    wait_for("simulated fleet", Duration::from_secs(120), || (controller.devices().len() == devices).then_some(()));
    let path = world.path().join("many.yaml");
    let apply = |autoscaled: bool| {
        let mut text = String::new();
        for i in 0..workloads {
            let scale = if autoscaled { "autoscale: {min: 1, max: 3, cpu_percent: 50}\n" } else { "" };
            text.push_str(&format!(
                "---\nname: w{i:04}\nimage: 127.0.0.1:9/w:1\nresources: {{cpu: 100m}}\nreplicas: 1\n{scale}"
            ));
        }
        std::fs::write(&path, text).expect("manifest");
        let (ok, _, err) = baton_cli(&server, &["apply", "-f", path.to_str().expect("utf-8"), "-o", "json"]);
        assert!(ok, "{err}");
    };
    let measure = |what: &str| {
        // Settle: every workload placed and running, a heartbeat or two in.
        wait_for("every workload running", Duration::from_secs(180), || {
            let ws: Vec<baton_controller::view::WorkloadView> = get_json(controller.http, "/api/v1/workloads").ok()?;
            (ws.len() == workloads && ws.iter().all(|w| w.healthy() == 1)).then_some(())
        });
        std::thread::sleep(Duration::from_secs(30));
        let (t0, _, _) = cpu_and_rss(controller.proc.pid());
        let began = Instant::now();
        std::thread::sleep(Duration::from_secs(secs));
        let (t1, rss, _) = cpu_and_rss(controller.proc.pid());
        let cpu = (t1 - t0) as f64 / 100.0;
        let pct = cpu / began.elapsed().as_secs_f64() * 100.0;
        println!("| {what} | {cpu:.2} s ({pct:.1} % of one core) | {rss} KiB |");
        pct
    };
    println!("| {workloads} workloads, one replica each | controller CPU over {secs} s | RSS |\n|---|---|---|");
    apply(false);
    let plain = measure("without autoscale");
    apply(true);
    let scaled = measure("autoscaled (min 1, max 3, cpu 50 %)");
    println!("\nAutoscaling {workloads} workloads costs {:.1} % of one core more.\n", scaled - plain);
}

/// A rollout of a new revision to `devices` simulated devices in 4 waves
/// (1, 10 %, 50 %, 100 %), each gated on `gate_s` seconds of health: wall
/// time against the floor (4 gates), controller CPU and memory, and the bytes
/// each device saw on the wire (desired documents in, reports out).
fn rollout(devices: usize, gate_s: u64) {
    use baton_controller::view::RolloutView;
    println!("## Rollout: {devices} simulated devices, waves [1, 10%, 50%, 100%], min_ready {gate_s} s\n");
    let world = World::new();
    let controller = Controller::start(&world, None, &[]);
    let server = controller.server_url();
    let _sim = start_simulator(&world, "sim", devices, &controller.broker_url(), &["--heartbeat-interval", "15"]);
    wait_for("simulated fleet", Duration::from_secs(120), || (controller.devices().len() == devices).then_some(()));
    let manifest = |tag: &str| {
        format!(
            "name: app\nimage: 127.0.0.1:9/app:{tag}\nrollout: {{waves: [1, 10%, 50%, 100%], min_ready: {gate_s}}}\n"
        )
    };
    let path = world.path().join("app.yaml");
    let apply = |tag: &str| {
        std::fs::write(&path, manifest(tag)).expect("manifest");
        let (ok, _, err) = baton_cli(&server, &["apply", "-f", path.to_str().expect("utf-8")]);
        assert!(ok, "{err}");
    };
    apply("1");
    wait_for("revision 1 everywhere", Duration::from_secs(120), || {
        let w: baton_controller::view::WorkloadView = get_json(controller.http, "/api/v1/workloads/app").ok()?;
        (w.healthy() == devices).then_some(())
    });

    // Count what crosses the broker for the devices while revision 2 rolls.
    let mut tap = baton_tests::mqtt::RawClient::connect(controller.mqtt, "bench-tap");
    tap.subscribe("baton/v1/dev/+/desired");
    tap.subscribe("baton/v1/dev/+/report");
    while tap.next_message(Duration::from_millis(500)).is_some() {} // the retained documents
    let (ticks0, _, _) = cpu_and_rss(controller.proc.pid());
    let started = Instant::now();
    apply("2");
    let mut desired_bytes = 0u64;
    let mut report_bytes = 0u64;
    let mut peak_rss = 0;
    let done: RolloutView = loop {
        while let Some((topic, payload, _)) = tap.next_message(Duration::from_millis(100)) {
            if topic.ends_with("/desired") {
                desired_bytes += (payload.len() + topic.len()) as u64;
            } else {
                report_bytes += (payload.len() + topic.len()) as u64;
            }
        }
        peak_rss = peak_rss.max(cpu_and_rss(controller.proc.pid()).1);
        let r: RolloutView = get_json(controller.http, "/api/v1/workloads/app/rollout").expect("rollout");
        if r.to == 2 && !r.state.active() {
            break r;
        }
        assert!(started.elapsed() < Duration::from_secs(600), "rollout did not finish: {r:?}");
    };
    let wall = started.elapsed().as_secs_f64();
    // Reports still in flight from the last devices.
    while let Some((topic, payload, _)) = tap.next_message(Duration::from_millis(500)) {
        if topic.ends_with("/report") {
            report_bytes += (payload.len() + topic.len()) as u64;
        }
    }
    let (ticks1, _, hwm) = cpu_and_rss(controller.proc.pid());
    let hz = 100.0; // USER_HZ on Linux
    let cpu_s = (ticks1 - ticks0) as f64 / hz;
    let floor = 4.0 * gate_s as f64;
    println!("| measure | value |\n|---|---|");
    println!("| outcome | {:?}, {} of {} devices ready |", done.state, done.counts.ready, devices);
    println!("| wall time, apply → succeeded | {wall:.1} s |");
    println!("| floor (4 waves × {gate_s} s gate) | {floor:.0} s |");
    println!("| wall / floor | {:.2} |", wall / floor);
    println!("| controller CPU during the rollout | {cpu_s:.2} s ({:.0} % of one core) |", cpu_s / wall * 100.0);
    println!("| controller RSS, peak during / high-water mark | {} / {} KiB |", peak_rss, hwm);
    println!(
        "| bytes per device (MQTT payload + topic): desired in / reports out | {} / {} |\n",
        desired_bytes / devices as u64,
        report_bytes / devices as u64
    );
}

/// One real agent (supervised as systemd would, running a busybox
/// container) upgraded `runs` times, each to a new stamped copy of the
/// release agent: bytes that cross the broker for it, time from `baton
/// agent upgrade` to the device reporting the new version, the download's
/// time, and the longest silence of the device on MQTT (heartbeats every
/// second) around the switch. Beside it, the same file fetched over HTTP
/// on loopback (`busybox httpd` → `busybox wget`), the plain way to ship a
/// binary.
fn upgrade(runs: usize) {
    use baton_controller::view::AgentRolloutView;
    let world = World::new();
    // `BENCH_MOSQUITTO=1`: through Mosquitto instead of the embedded broker.
    let mosquitto = std::env::var_os("BENCH_MOSQUITTO").map(|_| Mosquitto::start(&world));
    let broker = if mosquitto.is_some() { "Mosquitto" } else { "the embedded broker" };
    println!("## Agent self-update: one real device, {runs} upgrades, through {broker}\n");
    let controller = Controller::start(&world, mosquitto.as_ref().map(|m| m.port), &[]);
    let server = controller.server_url();
    let device = "pi-bench";
    give_busybox(&world, device, "busybox:bench");
    let (_agent, _) = start_supervised_agent(&world, device, &controller.broker_url());
    let yaml = world.write(
        "web.yaml",
        "name: web\nimage: busybox:bench\ncommand: [/bin/sh, -c, \"trap 'exit 0' TERM; while true; do sleep 1; done\"]\n",
    );
    let (ok, _, err) = baton_cli(&server, &["apply", "-f", yaml.to_str().expect("utf-8")]);
    assert!(ok, "{err}");
    wait_for("the workload healthy", Duration::from_secs(60), || settled(&server, "web", 1, 1));
    let size = std::fs::metadata(bin("baton-agent")).map(|m| m.len()).unwrap_or(0);
    let mut rows = Vec::new();
    for run in 0..runs {
        let version = format!("99.0.{run}");
        let build = stamped_agent(&world, &bin("baton-agent"), &version);
        let (ok, _, err) = baton_cli(&server, &["agent", "publish", build.to_str().expect("utf-8")]);
        assert!(ok, "{err}");
        let mut tap = baton_tests::mqtt::RawClient::connect(controller.mqtt, &format!("bench-tap-{run}"));
        tap.subscribe(&format!("baton/v1/dev/{device}/#"));
        while tap.next_message(Duration::from_millis(300)).is_some() {} // retained ones
        let started = Instant::now();
        let (ok, _, err) = baton_cli(&server, &["agent", "upgrade", "--version", &version, "--min-ready", "1"]);
        assert!(ok, "{err}");
        let (mut bytes_in, mut bytes_out) = (0u64, 0u64);
        let (mut first_piece, mut last_piece) = (None, None);
        let mut last_seen = Instant::now();
        let mut longest_silence = Duration::ZERO;
        let done: AgentRolloutView = loop {
            while let Some((topic, payload, _)) = tap.next_message(Duration::from_millis(50)) {
                let now = Instant::now();
                let wire = (payload.len() + topic.len()) as u64;
                if topic.ends_with("/release/res") {
                    bytes_in += wire;
                    first_piece.get_or_insert(now);
                    last_piece = Some(now);
                } else if topic.ends_with("/desired") {
                    bytes_in += wire;
                } else {
                    // The device's own messages: the gaps between them are its silence.
                    bytes_out += wire;
                    longest_silence = longest_silence.max(now - last_seen);
                    last_seen = now;
                }
            }
            let r: AgentRolloutView = get_json(controller.http, "/api/v1/agent/rollout").expect("agent rollout");
            if r.version == version && !r.rollout.state.active() {
                break r;
            }
            assert!(started.elapsed() < Duration::from_secs(300), "upgrade did not finish: {r:?}");
        };
        let wall = started.elapsed().as_secs_f64();
        let download = match (first_piece, last_piece) {
            (Some(a), Some(b)) => (b - a).as_secs_f64(),
            _ => 0.0,
        };
        assert_eq!(done.rollout.state, baton_controller::rollout::State::Succeeded, "{done:?}");
        rows.push((wall, download, longest_silence.as_secs_f64(), bytes_in, bytes_out));
    }
    let w = settled(&server, "web", 1, 1).expect("the container healthy after the upgrades");
    let restarts = w.devices[0].reported.as_ref().map_or(0, |r| r.restarts);

    // The same bytes over HTTP on loopback.
    let www = world.path().join("www");
    std::fs::create_dir_all(&www).expect("www");
    std::fs::copy(bin("baton-agent"), www.join("baton-agent")).expect("copy");
    let port = free_port();
    let mut httpd = std::process::Command::new("busybox")
        .args(["httpd", "-f", "-p", &format!("127.0.0.1:{port}"), "-h"])
        .arg(&www)
        .spawn()
        .expect("busybox httpd");
    wait_for("busybox httpd", Duration::from_secs(10), || std::net::TcpStream::connect(("127.0.0.1", port)).ok());
    let mut http = Vec::new();
    for _ in 0..runs {
        let t = Instant::now();
        let st = std::process::Command::new("busybox")
            .args(["wget", "-q", "-O", "/dev/null", &format!("http://127.0.0.1:{port}/baton-agent")])
            .status()
            .expect("busybox wget");
        assert!(st.success(), "wget over loopback failed");
        http.push(t.elapsed().as_secs_f64());
    }
    let _ = httpd.kill();
    let _ = httpd.wait();

    let med = |mut v: Vec<f64>| {
        v.sort_by(f64::total_cmp);
        v[v.len() / 2]
    };
    let download = med(rows.iter().map(|r| r.1).collect());
    let http_s = med(http);
    println!("release agent: {size} bytes ({:.1} MiB); medians of {runs} upgrades\n", size as f64 / 1048576.0);
    println!("| measure | value |\n|---|---|");
    println!(
        "| `baton agent upgrade` → device reports the new version (min_ready 1 s) | {:.1} s |",
        med(rows.iter().map(|r| r.0).collect())
    );
    println!(
        "| download over MQTT (first piece → last piece) | {download:.2} s ({:.1} MB/s) |",
        size as f64 / download / 1e6
    );
    println!(
        "| same file over HTTP on loopback (busybox httpd → wget) | {http_s:.2} s (MQTT / HTTP: {:.1}×) |",
        download / http_s
    );
    println!(
        "| bytes to the device per upgrade (pieces + documents, payload + topic) | {} ({:.4}× the build) |",
        rows[0].3,
        rows[0].3 as f64 / size as f64
    );
    println!("| bytes from the device per upgrade (requests, reports, heartbeats) | {} |", rows[0].4);
    println!(
        "| longest silence of the device on MQTT (heartbeat every 1 s) | {:.2} s |",
        med(rows.iter().map(|r| r.2).collect())
    );
    println!("| container restarts over all upgrades | {restarts} |\n");
}

/// A simulated fleet (`baton-agent simulate`: real links, real downloads
/// and checks of the build, the switch pretended) upgraded in waves [1,
/// 10%, 50%, 100%] with a `gate_s` gate: time from `baton agent upgrade`
/// to the rollout succeeded against the waves' floor, the bytes of build
/// pieces that crossed the broker, the controller's CPU and memory. The
/// build is `BENCH_BUILD` (a path; give the release agent to see a real
/// size) or, by default, a small C program (`cc`), so that the rollout
/// machinery, not the download, is what is timed.
fn fleet_upgrade(devices: usize, gate_s: u64) {
    use baton_controller::view::AgentRolloutView;
    let world = World::new();
    let build = match std::env::var_os("BENCH_BUILD") {
        Some(p) => PathBuf::from(p),
        None => {
            let src = world.write("small.c", "int main(void) { return 0; }\n");
            let out = world.path().join("small");
            let st = std::process::Command::new("cc").arg("-O2").arg("-o").arg(&out).arg(&src).status().expect("cc");
            assert!(st.success(), "cc failed");
            out
        }
    };
    let size = std::fs::metadata(&build).expect("the build").len();
    println!(
        "## Agent upgrade of {devices} simulated devices, waves [1, 10%, 50%, 100%], min_ready {gate_s} s, a build of {size} bytes\n"
    );
    let controller = Controller::start(&world, None, &[]);
    let server = controller.server_url();
    let _sim = start_simulator(&world, "sim", devices, &controller.broker_url(), &["--heartbeat-interval", "15"]);
    wait_for("simulated fleet", Duration::from_secs(120), || (controller.devices().len() == devices).then_some(()));
    let (ok, _, err) = baton_cli(&server, &["agent", "publish", build.to_str().expect("utf-8"), "--version", "99.0.0"]);
    assert!(ok, "{err}");
    // Pieces asked for, as the controller counts them (a tap on a thousand
    // devices' topics falls behind and loses messages).
    let asked = || {
        let text = get_text(controller.http, "/metrics").expect("metrics");
        text.lines()
            .find_map(|l| l.strip_prefix("baton_mqtt_messages_total{kind=\"release\"} "))
            .and_then(|n| n.trim().parse::<u64>().ok())
            .expect("the release counter")
    };
    let asked0 = asked();
    let (ticks0, _, _) = cpu_and_rss(controller.proc.pid());
    let started = Instant::now();
    let gate = gate_s.to_string();
    let (ok, _, err) = baton_cli(
        &server,
        &["agent", "upgrade", "--version", "99.0.0", "--waves", "1,10%,50%,100%", "--min-ready", &gate],
    );
    assert!(ok, "{err}");
    let mut peak_rss = 0;
    let done: AgentRolloutView = loop {
        std::thread::sleep(Duration::from_millis(100));
        peak_rss = peak_rss.max(cpu_and_rss(controller.proc.pid()).1);
        let r: AgentRolloutView = get_json(controller.http, "/api/v1/agent/rollout").expect("agent rollout");
        if r.version == "99.0.0" && !r.rollout.state.active() {
            break r;
        }
        assert!(started.elapsed() < Duration::from_secs(1800), "upgrade did not finish: {r:?}");
    };
    let wall = started.elapsed().as_secs_f64();
    let (ticks1, _, hwm) = cpu_and_rss(controller.proc.pid());
    let cpu_s = (ticks1 - ticks0) as f64 / 100.0; // USER_HZ
    let upgraded = controller.devices().iter().filter(|d| d.agent_version == "99.0.0").count();
    let floor = 4.0 * gate_s as f64;
    println!("| measure | value |\n|---|---|");
    println!("| outcome | {:?}, {upgraded} of {devices} devices report 99.0.0 |", done.rollout.state);
    println!("| wall time, `baton agent upgrade` → succeeded | {wall:.1} s |");
    println!("| floor (4 waves × {gate_s} s gate) | {floor:.0} s |");
    println!("| wall / floor | {:.2} |", wall / floor);
    println!("| controller CPU during the upgrade | {cpu_s:.2} s ({:.0} % of one core) |", cpu_s / wall * 100.0);
    println!("| controller RSS, peak during / high-water mark | {peak_rss} / {hwm} KiB |");
    let pieces = (asked() - asked0) as f64 / devices as f64;
    println!("| pieces of the build asked for per device (≤ 64 KiB each) | {pieces:.2} |\n");
}

/// Bridge networking, in a network namespace of the bench's own (nothing
/// on the host is touched): the agent's setup per container vs the
/// standard CNI bridge plugin doing the same for runc-style runtimes; a
/// container's start in bridge vs host mode; throughput and connection
/// latency through a load-balanced service address vs straight to the
/// instance; the agent's memory with 20 bridged containers.
fn net(iters: usize) {
    use baton_agent::net::{NetConfig, Network};
    use baton_agent::runtime::{ContainerRuntime, ContainerState, CreateRequest, Layout, LibcontainerRuntime};
    use baton_protocol::spec::{ContainerSpec, NetworkMode};
    use std::process::{Command, Stdio};

    // SAFETY: unshare(2) before any thread exists: every thread and child after this is in the new namespace.
    assert_eq!(unsafe { libc::unshare(libc::CLONE_NEWNET) }, 0, "unshare: {}", std::io::Error::last_os_error());
    let mut sock = baton_agent::net::netlink::Socket::open().expect("netlink");
    sock.set_up(baton_agent::net::netlink::index("lo").expect("lo")).expect("lo up");

    let world = World::new();
    let run_dir = PathBuf::from(format!("/run/baton-bench-net-{}", std::process::id()));
    let cfg = NetConfig { bridge: "bbench0".into(), subnet: "10.77.0.0/24".parse().expect("subnet") };
    let net = Arc::new(Network::open(cfg, "bench", &world.path().join("data"), &run_dir));
    let bridged = ContainerSpec { network: NetworkMode::Bridge, ..Default::default() };
    let ms = |t: Instant| t.elapsed().as_secs_f64() * 1000.0;
    let stats = |v: &mut Vec<f64>| {
        v.sort_by(f64::total_cmp);
        (percentile(v, 0.5), percentile(v, 0.9))
    };

    // 1. Setup and teardown of one container's network.
    let cni_dir = world.path().join("cni");
    std::fs::create_dir_all(&cni_dir).expect("cni dir");
    let cni_conf = format!(
        r#"{{"cniVersion":"1.0.0","name":"cbench","type":"bridge","bridge":"cbench0","isGateway":true,"ipMasq":true,"ipam":{{"type":"host-local","subnet":"10.78.0.0/24","dataDir":"{}"}}}}"#,
        cni_dir.join("ipam").display()
    );
    let plugin = Path::new("/usr/lib/cni/bridge");
    let cni = |command: &str, id: &str, netns: &Path| -> bool {
        let mut child = Command::new(plugin)
            .env("CNI_COMMAND", command)
            .env("CNI_CONTAINERID", id)
            .env("CNI_NETNS", netns)
            .env("CNI_IFNAME", "eth0")
            .env("CNI_PATH", "/usr/lib/cni")
            .stdin(Stdio::piped())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("CNI bridge plugin (containernetworking-plugins)");
        use std::io::Write;
        let _ = child.stdin.take().expect("stdin").write_all(cni_conf.as_bytes());
        child.wait().is_ok_and(|s| s.success())
    };
    // The namespace a runtime makes before calling CNI: made the way the agent makes its own.
    let make_netns = |path: &Path| {
        let path = path.to_path_buf();
        std::thread::spawn(move || {
            // SAFETY: unshare(2) moves only this short-lived thread.
            assert_eq!(unsafe { libc::unshare(libc::CLONE_NEWNET) }, 0);
            std::fs::File::create(&path).expect("netns file");
            let target = std::ffi::CString::new(path.as_os_str().as_encoded_bytes()).expect("path");
            // SAFETY: mount(2) with valid C strings.
            let r = unsafe {
                libc::mount(
                    c"/proc/thread-self/ns/net".as_ptr(),
                    target.as_ptr(),
                    std::ptr::null(),
                    libc::MS_BIND,
                    std::ptr::null(),
                )
            };
            assert_eq!(r, 0, "bind the namespace: {}", std::io::Error::last_os_error());
        })
        .join()
        .expect("netns thread");
    };
    // Warm-up: the bridges exist and each side's first-time work is done.
    net.attach("warm-0", &bridged).expect("attach");
    net.detach("warm-0");
    let warm = cni_dir.join("warm");
    make_netns(&warm);
    assert!(cni("ADD", "warm", &warm), "the CNI bridge plugin failed");
    cni("DEL", "warm", &warm);
    umount(&warm);
    let (mut ours_up, mut ours_down, mut cni_up, mut cni_add, mut cni_down) =
        (Vec::new(), Vec::new(), Vec::new(), Vec::new(), Vec::new());
    for i in 0..iters {
        let id = format!("c-{i}");
        let t = Instant::now();
        net.attach(&id, &bridged).expect("attach");
        ours_up.push(ms(t));
        let t = Instant::now();
        net.detach(&id);
        ours_down.push(ms(t));

        let ns = cni_dir.join(format!("ns-{i}"));
        let t = Instant::now();
        make_netns(&ns);
        let t_add = Instant::now();
        assert!(cni("ADD", &id, &ns), "CNI ADD failed");
        cni_add.push(ms(t_add));
        cni_up.push(ms(t));
        let t = Instant::now();
        cni("DEL", &id, &ns);
        umount(&ns);
        let _ = std::fs::remove_file(&ns);
        cni_down.push(ms(t));
    }
    println!("## Bridge networking: one container's network, {iters} runs each, interleaved\n");
    println!("| | median ms | p90 ms |\n|---|---|---|");
    let (a, a90) = stats(&mut ours_up);
    let (b, b90) = stats(&mut cni_up);
    let (c, c90) = stats(&mut cni_add);
    let (d, d90) = stats(&mut ours_down);
    let (e, e90) = stats(&mut cni_down);
    println!("| Baton: namespace, veth, address, route, hosts files (`Network::attach`) | {a:.2} | {a90:.2} |");
    println!(
        "| CNI bridge plugin: namespace (same code) + `bridge` ADD (host-local IPAM, ipMasq) | {b:.2} | {b90:.2} |"
    );
    println!("| … of which the plugin's ADD | {c:.2} | {c90:.2} |");
    println!("| Baton teardown (`detach`) | {d:.2} | {d90:.2} |");
    println!("| CNI DEL + unmount | {e:.2} | {e90:.2} |");
    println!("\nCNI / Baton (setup): {:.2}×\n", b / a);

    // 2. A container's start, host vs bridge: create + start + wait + delete of /bin/true.
    let rootfs = baton_tests::fixtures::busybox_rootfs(world.path()).expect("rootfs");
    let layout = Layout::new(world.path().join("data"), &run_dir)
        .with_cgroup_parent(format!("/baton-bench-net-{}", std::process::id()));
    let mut rt = LibcontainerRuntime::new(layout, bin("baton-agent")).with_network(net.clone());
    rt.log_flush = Duration::from_millis(0);
    let run = |id: &str, spec: &ContainerSpec| -> f64 {
        let t = Instant::now();
        rt.create(&CreateRequest { id, spec, rootfs: rootfs.clone().into(), provenance: Default::default() })
            .expect("create");
        while !matches!(rt.state(id).expect("state"), ContainerState::Exited(_)) {
            std::thread::sleep(Duration::from_micros(200));
        }
        // The shim unmounts the rootfs as it exits, just after its exit
        // record: a removal racing it finds the mount busy, and is retried.
        let mut tries = 0;
        while let Err(e) = rt.remove(id) {
            tries += 1;
            assert!(tries < 100, "remove {id}: {e}");
            std::thread::sleep(Duration::from_millis(1));
        }
        ms(t)
    };
    let host = ContainerSpec { command: vec!["/bin/true".into()], ..Default::default() };
    let bridge_true = ContainerSpec { network: NetworkMode::Bridge, ..host.clone() };
    let (mut t_host, mut t_bridge) = (Vec::new(), Vec::new());
    for i in 0..iters {
        t_host.push(run(&format!("h-{i}"), &host));
        t_bridge.push(run(&format!("b-{i}"), &bridge_true));
    }
    let (h, h90) = stats(&mut t_host);
    let (b, b90) = stats(&mut t_bridge);
    println!("## Container start, host vs bridge network: create + start + wait + delete of `/bin/true`, {iters} runs each\n");
    println!("| network | median ms | p90 ms |\n|---|---|---|");
    println!("| host | {h:.1} | {h90:.1} |\n| bridge | {b:.1} | {b90:.1} |");
    println!("\nBridge adds {:.1} ms ({:.2}×).\n", b - h, b / h);

    // 3. Through the service address vs straight to the instance.
    let server = net.attach("server-0", &bridged).expect("server");
    let client = net.attach("client-0", &bridged).expect("client");
    net.route_services(
        &[baton_protocol::ServiceEndpoints {
            name: "server".into(),
            consumers: vec!["client".into()],
            endpoints: vec![baton_protocol::Endpoint {
                device: "bench".into(),
                address: String::new(),
                port_name: "p".into(),
                port: 5201,
            }],
        }],
        &[baton_protocol::ServicePort { service: "server".into(), name: "p".into(), port: 5201, ..Default::default() }],
    );
    let hosts = std::fs::read_to_string(&client.hosts).expect("client's hosts");
    let vip: std::net::Ipv4Addr = hosts
        .lines()
        .find(|l| l.ends_with("\tserver"))
        .and_then(|l| l.split('\t').next()?.parse().ok())
        .expect("the service's address");
    let in_ns = |path: &Path| {
        let ns = std::fs::File::open(path).expect("netns");
        use std::os::fd::AsRawFd;
        // SAFETY: setns(2) on this thread only.
        assert_eq!(unsafe { libc::setns(ns.as_raw_fd(), libc::CLONE_NEWNET) }, 0);
    };
    let server_ns = server.netns.clone();
    let (listening_tx, listening) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        in_ns(&server_ns);
        let listener = std::net::TcpListener::bind("0.0.0.0:5201").expect("listen");
        let _ = listening_tx.send(());
        for conn in listener.incoming().flatten() {
            std::thread::spawn(move || {
                use std::io::{Read, Write};
                let mut conn = conn;
                let mut buf = vec![0u8; 256 * 1024];
                let mut first = true;
                while let Ok(n) = conn.read(&mut buf) {
                    if n == 0 {
                        break;
                    }
                    // A one-byte request is a ping: answered.
                    if first && n == 1 {
                        let _ = conn.write_all(&buf[..1]);
                    }
                    first = false;
                }
            });
        }
    });
    listening.recv().expect("the server listens");
    let client_ns = client.netns.clone();
    let measure = move |target: std::net::Ipv4Addr| -> (f64, f64) {
        let client_ns = client_ns.clone();
        std::thread::spawn(move || {
            use std::io::{Read, Write};
            in_ns(&client_ns);
            let addr = std::net::SocketAddr::from((target, 5201));
            // Connection latency: connect, one byte there and back, close.
            let mut lat = Vec::new();
            for _ in 0..500 {
                let t = Instant::now();
                let mut c = std::net::TcpStream::connect(addr).expect("connect");
                c.set_nodelay(true).expect("nodelay");
                c.write_all(&[1]).expect("ping");
                let mut b = [0u8; 1];
                c.read_exact(&mut b).expect("pong");
                lat.push(t.elapsed().as_secs_f64() * 1e6);
            }
            lat.sort_by(f64::total_cmp);
            // Throughput: 2 GiB on one connection.
            let mut c = std::net::TcpStream::connect(addr).expect("connect");
            let chunk = vec![0u8; 256 * 1024];
            c.write_all(&[0, 0]).expect("start");
            let t = Instant::now();
            for _ in 0..8192 {
                c.write_all(&chunk).expect("send");
            }
            let gbit = 2.0 * 8.0 * 1.073_741_824 / t.elapsed().as_secs_f64();
            (gbit, percentile(&lat, 0.5))
        })
        .join()
        .expect("client thread")
    };
    println!("## Load-balanced service address vs straight to the instance (one device, both bridged)\n");
    println!("| round | direct Gbit/s | service Gbit/s | ratio | direct connect+ping µs | service µs |\n|---|---|---|---|---|---|");
    for round in 1..=3 {
        let (dg, dl) = measure(server.address);
        let (sg, sl) = measure(vip);
        println!("| {round} | {dg:.2} | {sg:.2} | {:.2} | {dl:.0} | {sl:.0} |", sg / dg);
    }
    println!();
    net.detach("server-0");
    net.detach("client-0");
    let _ = std::fs::remove_dir_all(&run_dir);
}

fn umount(path: &Path) {
    if let Ok(c) = std::ffi::CString::new(path.as_os_str().as_encoded_bytes()) {
        // SAFETY: umount2(2) with a valid C string.
        unsafe { libc::umount2(c.as_ptr(), libc::MNT_DETACH) };
    }
}

/// The agent's memory with `n` bridged containers (each its own workload,
/// `sleep`), against the same agent with as many host-network ones: what
/// the network state costs the agent.
fn net_memory(n: usize) {
    // SAFETY: unshare(2), as `net` does: the controller and agent run in a namespace of their own.
    if unsafe { libc::unshare(libc::CLONE_NEWNET) } == 0 {
        let mut sock = baton_agent::net::netlink::Socket::open().expect("netlink");
        sock.set_up(baton_agent::net::netlink::index("lo").expect("lo")).expect("lo up");
    }
    println!("## Agent memory with {n} containers, host vs bridge network\n");
    println!("| containers | agent RSS KiB | anonymous KiB |\n|---|---|---|");
    for network in ["host", "bridge"] {
        let world = World::new();
        let controller = Controller::start(&world, None, &[]);
        let server = controller.server_url();
        give_busybox(&world, "bench-net", "busybox:bench");
        let agent = start_agent(&world, "bench-net", &controller.broker_url(), &[]);
        wait_for("agent online", Duration::from_secs(30), || {
            controller.device("bench-net").filter(|d| d.inventory.is_some())
        });
        let mut yaml = String::new();
        for i in 0..n {
            yaml.push_str(&format!(
                "---\nname: w{i}\nimage: busybox:bench\nnetwork: {network}\ncommand: [/bin/sleep, \"3600\"]\n"
            ));
        }
        apply_yaml(&server, &world, "many.yaml", &yaml);
        wait_for(&format!("{n} containers running"), Duration::from_secs(180), || {
            (0..n).all(|i| settled(&server, &format!("w{i}"), 1, 1).is_some()).then_some(())
        });
        std::thread::sleep(Duration::from_secs(5)); // settled: the agent's steady state is what is measured
        let pid = agent.pid();
        let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap_or_default();
        let rollup = std::fs::read_to_string(format!("/proc/{pid}/smaps_rollup")).unwrap_or_default();
        println!("| {n} × {network} | {} | {} |", kib_field(&status, "VmRSS:"), kib_field(&rollup, "Anonymous:"));
    }
    println!();
}

/// OpenSSH's server on a loopback port, root's key only: the peer for `remote`.
struct Sshd {
    port: u16,
    key: PathBuf,
    _proc: Proc,
}

impl Sshd {
    fn start(world: &World) -> Sshd {
        use std::process::Command;
        let dir = world.path().join("ssh");
        std::fs::create_dir_all(&dir).expect("ssh dir");
        std::fs::create_dir_all("/run/sshd").expect("/run/sshd (sshd's privilege separation dir)");
        for name in ["host", "client"] {
            let ok = Command::new("ssh-keygen")
                .args(["-q", "-t", "ed25519", "-N", "", "-f"])
                .arg(dir.join(name))
                .status()
                .is_ok_and(|s| s.success());
            assert!(ok, "ssh-keygen (openssh-client)");
        }
        std::fs::copy(dir.join("client.pub"), dir.join("authorized_keys")).expect("authorized_keys");
        let port = free_port();
        let config = format!(
            "Port {port}\nListenAddress 127.0.0.1\nHostKey {d}/host\nAuthorizedKeysFile {d}/authorized_keys\n\
             PermitRootLogin prohibit-password\nPasswordAuthentication no\nUsePAM no\nStrictModes no\n\
             PidFile {d}/sshd.pid\nAllowTcpForwarding yes\n",
            d = dir.display()
        );
        let config_path = world.write("ssh/sshd_config", &config);
        let proc = Proc::spawn(
            "sshd",
            Path::new("/usr/sbin/sshd"),
            &["-D".into(), "-e".into(), "-f".into(), config_path.display().to_string()],
            world.path(),
        );
        wait_for("sshd listening", Duration::from_secs(10), || {
            std::net::TcpStream::connect(("127.0.0.1", port)).ok().map(drop)
        });
        Sshd { port, key: dir.join("client"), _proc: proc }
    }

    /// `ssh` to root@127.0.0.1 with this server's key, no host key checks.
    fn args(&self) -> Vec<String> {
        [
            "-p",
            &self.port.to_string(),
            "-i",
            &self.key.display().to_string(),
            "-o",
            "StrictHostKeyChecking=no",
            "-o",
            "UserKnownHostsFile=/dev/null",
            "-o",
            "LogLevel=ERROR",
        ]
        .iter()
        .map(|s| s.to_string())
        .collect()
    }
}

/// One HTTP/1.0 GET on a new connection; the body's length.
fn http_get(addr: std::net::SocketAddr, path: &str) -> std::io::Result<usize> {
    use std::io::{Read, Write};
    let mut conn = std::net::TcpStream::connect(addr)?;
    conn.write_all(format!("GET {path} HTTP/1.0\r\n\r\n").as_bytes())?;
    let mut buf = vec![0u8; 256 * 1024];
    let mut total = 0;
    loop {
        match conn.read(&mut buf)? {
            0 => return Ok(total),
            n => total += n,
        }
    }
}

/// Keystroke round trips on `term`: a key typed, its echo read back.
fn keystrokes(term: &mut baton_tests::pty::Terminal, keys: usize) -> Vec<f64> {
    let mut rtts = Vec::with_capacity(keys);
    for i in 0..keys {
        let key = [b'a' + (i % 26) as u8];
        let before = term.seen.lock().expect("terminal").len();
        let t = Instant::now();
        std::io::Write::write_all(&mut term.master, &key).expect("type");
        let deadline = t + Duration::from_secs(5);
        loop {
            if term.seen.lock().expect("terminal")[before..].contains(&key[0]) {
                break;
            }
            assert!(Instant::now() < deadline, "no echo of key {i}");
            std::thread::sleep(Duration::from_micros(100));
        }
        rtts.push(t.elapsed().as_secs_f64() * 1000.0);
    }
    rtts.sort_by(f64::total_cmp);
    rtts
}

fn remote(keys: usize, rounds: usize) {
    use baton_tests::pty::Terminal;
    use std::process::{Command, Stdio};
    let world = World::new();
    // BENCH_BROKER=mosquitto: the same through Mosquitto.
    let mosquitto = (std::env::var("BENCH_BROKER").as_deref() == Ok("mosquitto")).then(|| Mosquitto::start(&world));
    let controller = Controller::start(&world, mosquitto.as_ref().map(|m| m.port), &[]);
    let server = controller.server_url();
    let broker = controller.broker_url();
    let device = "bench-remote";
    give_busybox(&world, device, "busybox:remote");
    let _agent = start_agent(&world, device, &broker, &[]);
    let port = free_port();
    apply_yaml(
        &server,
        &world,
        "files.yaml",
        &format!(
            "name: files\nimage: busybox:remote\ncommand: [/bin/sh, -c, \"mkdir -p /tmp/www && head -c 52428800 /dev/zero > /tmp/www/big && echo hello > /tmp/www/small && exec httpd -f -p {port} -h /tmp/www\"]\n"
        ),
    );
    wait_for("files running", Duration::from_secs(60), || settled(&server, "files", 1, 1));
    let direct: std::net::SocketAddr = format!("127.0.0.1:{port}").parse().expect("address");
    wait_for("httpd", Duration::from_secs(30), || http_get(direct, "/small").ok());
    let sshd = Sshd::start(&world);

    // Keystrokes: a shell in the container through Baton; a shell on this host through ssh -tt.
    println!("\n## Remote access: keystroke round trip ({keys} keys, echo by the remote terminal)\n");
    println!("| path | p50 | p90 | max |");
    println!("|---|---|---|---|");
    let (mut term, mut cli) =
        Terminal::spawn(&bin("baton"), &server, &["exec", "-it", "--device", device, "files", "--", "/bin/sh"]);
    term.expect("# ", Duration::from_secs(20));
    let baton = keystrokes(&mut term, keys);
    let _ = cli.kill();
    let _ = cli.wait();
    let mut ssh_args = sshd.args();
    ssh_args.extend(["-tt".into(), "root@127.0.0.1".into(), "/bin/sh".into()]);
    let ssh_args: Vec<&str> = ssh_args.iter().map(String::as_str).collect();
    let (mut term, mut ssh) = Terminal::spawn(Path::new("/usr/bin/ssh"), &server, &ssh_args);
    term.expect("# ", Duration::from_secs(20));
    let peer = keystrokes(&mut term, keys);
    let _ = ssh.kill();
    let _ = ssh.wait();
    let through = if mosquitto.is_some() { "baton exec -it (Mosquitto)" } else { "baton exec -it (embedded broker)" };
    for (name, v) in [(through, &baton), ("ssh -tt over loopback", &peer)] {
        println!(
            "| {name} | {:.2} ms | {:.2} ms | {:.2} ms |",
            percentile(v, 0.5),
            percentile(v, 0.9),
            v.last().copied().unwrap_or(0.0)
        );
    }
    println!("\nBaton / ssh p50: {:.2}x", percentile(&baton, 0.5) / percentile(&peer, 0.5));

    // Port forwards: baton port-forward and ssh -L to the same httpd.
    let mut forward = Command::new(bin("baton"))
        .args(["port-forward", "--device", device, "files", &format!("0:{port}")])
        .env("BATON_SERVER", &server)
        .stderr(Stdio::piped())
        .spawn()
        .expect("baton port-forward");
    let mut banner = String::new();
    let mut stderr = forward.stderr.take().expect("stderr");
    let mut byte = [0u8; 1];
    while !banner.ends_with('\n') && std::io::Read::read(&mut stderr, &mut byte).expect("banner") == 1 {
        banner.push(byte[0] as char);
    }
    let via_baton: std::net::SocketAddr =
        banner.split_whitespace().nth(1).and_then(|a| a.parse().ok()).expect("forward's address");
    let ssh_local = free_port();
    let mut tunnel_args = sshd.args();
    tunnel_args.extend(["-N".into(), "-L".into(), format!("{ssh_local}:127.0.0.1:{port}"), "root@127.0.0.1".into()]);
    let mut tunnel = Command::new("ssh").args(&tunnel_args).stdin(Stdio::null()).spawn().expect("ssh -L");
    let via_ssh: std::net::SocketAddr = format!("127.0.0.1:{ssh_local}").parse().expect("address");
    wait_for("ssh -L", Duration::from_secs(10), || http_get(via_ssh, "/small").ok());
    wait_for("baton port-forward", Duration::from_secs(10), || http_get(via_baton, "/small").ok());

    println!("\n## Remote access: port forwarding to busybox httpd in a container ({rounds} downloads of 50 MiB, 200 requests)\n");
    println!("| path | download MiB/s (median) | request p50 | request p90 |");
    println!("|---|---|---|---|");
    let mut results = Vec::new();
    for (name, addr) in [("direct", direct), ("baton port-forward", via_baton), ("ssh -L", via_ssh)] {
        let mut rates: Vec<f64> = (0..rounds)
            .map(|_| {
                let t = Instant::now();
                let n = http_get(addr, "/big").expect("download");
                // The body and httpd's header.
                assert!((52_428_800..52_428_800 + 4096).contains(&n), "{name}: {n} bytes");
                52_428_800.0 / (1 << 20) as f64 / t.elapsed().as_secs_f64()
            })
            .collect();
        rates.sort_by(f64::total_cmp);
        let mut lat: Vec<f64> = (0..200)
            .map(|_| {
                let t = Instant::now();
                http_get(addr, "/small").expect("request");
                t.elapsed().as_secs_f64() * 1000.0
            })
            .collect();
        lat.sort_by(f64::total_cmp);
        let row = (percentile(&rates, 0.5), percentile(&lat, 0.5), percentile(&lat, 0.9));
        println!("| {name} | {:.1} | {:.2} ms | {:.2} ms |", row.0, row.1, row.2);
        results.push(row);
    }
    println!(
        "\nBaton / direct: {:.3}x throughput, {:.1}x request time; Baton / ssh -L: {:.2}x throughput, {:.1}x request time",
        results[1].0 / results[0].0,
        results[1].1 / results[0].1,
        results[1].0 / results[2].0,
        results[1].1 / results[2].1
    );
    for child in [&mut forward, &mut tunnel] {
        let _ = child.kill();
        let _ = child.wait();
    }
}

/// The dashboard on a fleet of `devices` simulated devices (through
/// Mosquitto; a label `site` of 20 values, one workload on one site): each API call the pages make, timed
/// and sized, beside `GET /api/v1/devices` for the whole fleet (what `baton
/// get devices` reads, and what a page would fetch without server-side
/// paging); then each page loaded afresh in headless chromium, from the
/// start of navigation to its data drawn.
fn dashboard(devices: usize, rounds: usize) {
    println!("## Dashboard: {devices} simulated devices, {rounds} rounds (median)\n");
    let world = World::new();
    // The fleet's 10,000 connections go to Mosquitto: this measures the
    // dashboard, not how fast the embedded broker takes connections.
    let mosquitto = Mosquitto::start(&world);
    let controller = Controller::start(&world, Some(mosquitto.port), &[]);
    let server = controller.server_url();
    let sites: Vec<String> = (0..20).map(|i| format!("site-{i:02}")).collect();
    let cycle = format!("site={}", sites.join(","));
    let _sim = start_simulator(
        &world,
        "sim",
        devices,
        &controller.broker_url(),
        &["--heartbeat-interval", "30", "--label-cycle", &cycle],
    );
    let count = || -> Option<usize> {
        let r = ureq::get(format!("http://127.0.0.1:{}/api/v1/devices?limit=1", controller.http)).call().ok()?;
        r.headers().get("x-total-count")?.to_str().ok()?.parse().ok()
    };
    // Registration is the slow part (each new device recomputes the fleet's
    // documents: about 20 a second at 10,000 here).
    let registering = Instant::now();
    wait_for("simulated fleet", Duration::from_secs(1500), || (count()? == devices).then_some(()));
    println!("(the simulated fleet registered in {:.0} s)\n", registering.elapsed().as_secs_f64());
    let path = world.path().join("app.yaml");
    // On one site (a twentieth of the fleet): the controller cannot yet
    // push 10,000 first documents at once (its MQTT queue refuses most, and
    // it resends them every second; see BENCHMARKS.md).
    std::fs::write(&path, "name: app\nimage: 127.0.0.1:9/app:1\nplacement: {selector: {site: site-00}}\n")
        .expect("manifest");
    let (ok, _, err) = baton_cli(&server, &["apply", "-f", path.to_str().expect("utf-8")]);
    assert!(ok, "{err}");
    wait_for("app everywhere", Duration::from_secs(300), || {
        let w: baton_controller::view::WorkloadView = get_json(controller.http, "/api/v1/workloads/app").ok()?;
        (w.healthy() == devices / 20).then_some(())
    });

    println!("| API call | median | bytes |\n|---|---|---|");
    let calls = [
        ("overview, grouped by site", "/api/v1/overview?group=site".to_string()),
        ("devices, first page of 50", "/api/v1/devices?offset=0&limit=50".to_string()),
        (
            "devices, searched and sorted (page of 50)",
            "/api/v1/devices?q=site-07&sort=last_seen&desc=true&limit=50".to_string(),
        ),
        ("one device", "/api/v1/devices/sim-0042".to_string()),
        ("one device's last hour", "/api/v1/devices/sim-0042/samples".to_string()),
        ("the workload (its 500 devices' state)", "/api/v1/workloads/app".to_string()),
        ("**whole fleet** (`baton get devices`)", "/api/v1/devices".to_string()),
    ];
    let mut page_ms = 0.0;
    let mut whole_ms = 0.0;
    for (name, path) in &calls {
        let mut times = Vec::new();
        let mut size = 0;
        for _ in 0..rounds.max(3) {
            let t = Instant::now();
            let url = format!("http://127.0.0.1:{}{path}", controller.http);
            let mut r = ureq::get(&url).call().expect("API call");
            // The whole fleet is past ureq's 10 MiB default.
            let body = r.body_mut().with_config().limit(1 << 30).read_to_string().expect("API answer");
            times.push(t.elapsed().as_secs_f64() * 1000.0);
            size = body.len();
        }
        times.sort_by(f64::total_cmp);
        let median = percentile(&times, 0.5);
        if path.ends_with("limit=50") && path.contains("offset") {
            page_ms = median;
        }
        if path == "/api/v1/devices" {
            whole_ms = median;
        }
        println!("| {name} | {median:.1} ms | {size} |");
    }
    println!("| whole fleet / first page | {:.0}× |\n", whole_ms / page_ms.max(0.001));

    let b = baton_tests::webdriver::Browser::start(&world, "bench", 1280, 900);
    let base = format!("http://127.0.0.1:{}/ui/", controller.http);
    let total = devices.to_string();
    let pages = [
        ("overview", "#/".to_string(), "#status-cards", total.clone()),
        ("devices (first 50)", "#/devices".to_string(), "#count", format!("of {devices}")),
        ("devices searched", "#/devices?q=site-07".to_string(), "#count", format!("of {}", devices / 20)),
        ("a device (inventory, charts, events)", "#/devices/sim-0042".to_string(), "#charts", "Load".to_string()),
        (
            "the workload (500 devices, 200 rows shown)",
            "#/workloads/app".to_string(),
            "#workload-devices",
            "sim-".to_string(),
        ),
    ];
    println!("| page, navigation → data drawn | median | max |\n|---|---|---|");
    for (name, hash, css, text) in pages {
        let mut times: Vec<f64> = (0..rounds).map(|_| b.load_until(&format!("{base}{hash}"), css, &text)).collect();
        times.sort_by(f64::total_cmp);
        println!("| {name} | {:.0} ms | {:.0} ms |", percentile(&times, 0.5), times[times.len() - 1]);
    }
    println!();
}

/// The store's heavy calls, on SQLite (a file in a temp dir) and on
/// PostgreSQL (Debian's, on loopback, started here like the tests do).
fn store(devices: usize) {
    use baton_controller::fleet::Device;
    use baton_controller::store::{Store, StoreAt};
    use baton_controller::view::Event;
    println!("## Store: SQLite vs PostgreSQL, {devices} devices\n");
    let world = World::new();
    let device = |i: usize, seen: u64| -> Device {
        let mut d = stored_device(&format!("dev-{i:05}"), seen);
        d.operator_labels.insert("site".into(), format!("site-{}", i % 20));
        d
    };
    let fleet: Vec<Device> = (0..devices).map(|i| device(i, 2)).collect();
    let spec = baton_protocol::spec::WorkloadSpec { name: "web".into(), revision: 1, ..Default::default() };
    let payload = vec![7u8; 600];
    let ones = 1000.min(devices);
    let mut rows: Vec<(String, [Duration; 2])> = Vec::new();
    let mut add = |name: String, i: usize, d: Duration| {
        if let Some(r) = rows.iter_mut().find(|r| r.0 == name) {
            r.1[i] = d;
        } else {
            let mut both = [Duration::ZERO; 2];
            both[i] = d;
            rows.push((name, both));
        }
    };
    let ats = [StoreAt::Sqlite(world.path().join("bench.db")), StoreAt::Postgres(world.postgres().database("bench"))];
    for (i, at) in ats.iter().enumerate() {
        let s = Store::open_at(at).expect("open the store");
        let t = Instant::now();
        s.save_devices(fleet.iter()).expect("save devices");
        add(format!("flush: {devices} devices in one transaction"), i, t.elapsed());
        let t = Instant::now();
        s.save_devices(fleet.iter()).expect("save devices");
        add(format!("flush again (updates): {devices} devices"), i, t.elapsed());
        let t = Instant::now();
        let n = s.load_devices().expect("load").len();
        assert_eq!(n, devices);
        add(format!("start-up: load {devices} devices"), i, t.elapsed());
        let t = Instant::now();
        for d in &fleet[..ones] {
            s.save_device(d).expect("save a device");
        }
        add(format!("{ones} presence changes, one write each"), i, t.elapsed());
        let t = Instant::now();
        for k in 0..ones {
            let e = Event {
                at_ms: k as u64,
                kind: "device".into(),
                name: "device.online".into(),
                subject: format!("dev-{k:05}"),
                message: "online".into(),
                tenant: String::new(),
            };
            s.add_event(&e).expect("event");
        }
        add(format!("{ones} events"), i, t.elapsed());
        let t = Instant::now();
        for d in &fleet[..ones] {
            s.save_desired(&d.id, 2, std::slice::from_ref(&spec), &payload).expect("desired");
        }
        add(format!("{ones} desired documents stored (a rollout wave)"), i, t.elapsed());
        let t = Instant::now();
        let n = s.load_desired().expect("load desired").len();
        assert_eq!(n, ones);
        add(format!("start-up: load {ones} desired documents"), i, t.elapsed());
    }
    println!("| operation | SQLite | PostgreSQL | PostgreSQL / SQLite |");
    println!("|---|---|---|---|");
    for (name, [sqlite, pg]) in &rows {
        println!(
            "| {name} | {:.1} ms | {:.1} ms | {:.1}x |",
            sqlite.as_secs_f64() * 1e3,
            pg.as_secs_f64() * 1e3,
            pg.as_secs_f64() / sqlite.as_secs_f64().max(1e-9)
        );
    }
    println!("\n(SQLite: WAL, synchronous=NORMAL, on this machine's disk; PostgreSQL: loopback TCP, fsync off as in the tests.)\n");
}

/// kill -9 of the leading controller mid-rollout, `rounds` times: how long
/// until the standby serves its API, and until the rollout moves again.
fn failover(rounds: usize) {
    use baton_controller::rollout::State;
    println!("## Failover: two controllers on PostgreSQL, the leader killed mid-rollout ({rounds} rounds)\n");
    let mut serve = Vec::new();
    let mut moved = Vec::new();
    for round in 0..rounds {
        let world = World::new();
        let mosquitto = Mosquitto::start(&world);
        let store = world.postgres().url();
        let mut leader = Controller::start(&world, Some(mosquitto.port), &["--store", &store]);
        let standby = Controller::start_replica(&world, &leader, "controller-b");
        let _sim = start_simulator(&world, "f", 50, &leader.broker_url(), &[]);
        wait_for("50 devices", Duration::from_secs(60), || (leader.devices().len() == 50).then_some(()));
        let server = leader.server_url();
        let app = |tag: &str| {
            format!("name: app\nimage: 127.0.0.1:9/app:{tag}\nrollout: {{waves: [1, 10%, 50%, 100%], min_ready: 1}}\n")
        };
        apply_yaml(&server, &world, "app.yaml", &app("1"));
        wait_for("revision 1", Duration::from_secs(60), || settled(&server, "app", 1, 50));
        apply_yaml(&server, &world, "app.yaml", &app("2"));
        let before = wait_for("the second wave", Duration::from_secs(60), || {
            describe_workload(&server, "app")?.rollout.filter(|r| r.wave >= 2 && r.state == State::Progressing)
        });
        leader.proc.kill9();
        let killed = Instant::now();
        wait_for("the standby serving", Duration::from_secs(60), || standby.serving().then_some(()));
        serve.push(killed.elapsed());
        let server = standby.server_url();
        wait_for("the rollout moving again", Duration::from_secs(60), || {
            let r = describe_workload(&server, "app")?.rollout?;
            (r.wave > before.wave || r.counts.ready > before.counts.ready || !r.state.active()).then_some(())
        });
        moved.push(killed.elapsed());
        eprintln!("round {round}: served after {:?}, rollout moved after {:?}", serve[round], moved[round]);
    }
    let median = |v: &mut Vec<Duration>| {
        v.sort();
        v[v.len() / 2]
    };
    println!("| leader killed → | median | worst |");
    println!("|---|---|---|");
    let (s, m) = (median(&mut serve), median(&mut moved));
    println!(
        "| standby serves the API | {:.0} ms | {:.0} ms |",
        s.as_secs_f64() * 1e3,
        serve.last().expect("a round").as_secs_f64() * 1e3
    );
    println!(
        "| the rollout moves again | {:.0} ms | {:.0} ms |\n",
        m.as_secs_f64() * 1e3,
        moved.last().expect("a round").as_secs_f64() * 1e3
    );
}

/// Memory of the controller holding `devices` connected idle simulated
/// devices (heartbeats every 300 s), with its embedded broker and with
/// Mosquitto beside it: resident set once every device is online and
/// `idle_secs` have passed, per device.
fn fleet_memory(devices: usize, idle_secs: u64) {
    println!("## Controller memory per connected idle device: {devices} simulated devices\n");
    println!(
        "| broker | controller RSS before | controller RSS with the fleet | broker process RSS | per device, all told | registered in |\n|---|---|---|---|---|---|"
    );
    for kind in [BrokerKind::Embedded, BrokerKind::Mosquitto] {
        let world = World::new();
        let mosquitto = matches!(kind, BrokerKind::Mosquitto).then(|| Mosquitto::start(&world));
        let controller = Controller::start(&world, mosquitto.as_ref().map(|m| m.port), &[]);
        let before = cpu_and_rss(controller.proc.pid()).1;
        let registering = Instant::now();
        // At most 2,500 connections per simulator process (its descriptors).
        let per = 2_500;
        let _sims: Vec<Proc> = (0..devices.div_ceil(per))
            .map(|i| {
                let n = per.min(devices - i * per);
                start_simulator(&world, &format!("m{i}"), n, &controller.broker_url(), &["--heartbeat-interval", "300"])
            })
            .collect();
        wait_for("fleet online", Duration::from_secs(1800), || {
            (metric(controller.http, "baton_devices{status=\"online\"}") as usize >= devices).then_some(())
        });
        let took = registering.elapsed();
        // Idle: what stays resident, not the registration's peak.
        std::thread::sleep(Duration::from_secs(idle_secs));
        let with = cpu_and_rss(controller.proc.pid()).1;
        let broker_rss = mosquitto.as_ref().map_or(0, |m| cpu_and_rss(m.proc.pid()).1);
        let per_device = (with + broker_rss) as f64 / devices as f64;
        println!(
            "| {kind:?} | {:.1} MiB | {:.1} MiB | {} | {per_device:.1} KiB | {:.0} s |",
            before as f64 / 1024.0,
            with as f64 / 1024.0,
            if broker_rss == 0 { "–".to_string() } else { format!("{:.1} MiB", broker_rss as f64 / 1024.0) },
            took.as_secs_f64()
        );
    }
    println!();
}

/// Issue 18's three setups side by side with `devices` simulated devices
/// (2,500 per simulator process, heartbeats every 300 s): (a) one
/// controller with its embedded broker, (b) one with Mosquitto, (c)
/// `deploy/cluster` (three controllers on PostgreSQL, three NATS nodes,
/// devices spread over the nodes). For each: the time until all are
/// online, the resident memory once idle for `idle_secs`, the time from
/// applying a workload to every device until each reports it running; for
/// (c) also the leader killed with kill -9: until another controller serves,
/// and until a second revision runs on every device through it.
fn fleet_scale(devices: usize, idle_secs: u64) {
    println!("## Fleet at scale: {devices} simulated devices, three setups\n");
    println!("| setup | online in | controller RSS | broker RSS | per device, all told | workload on all in | leader killed → another serves | revision 2 on all through it |\n|---|---|---|---|---|---|---|---|");
    let per = 2_500;
    let sims = |world: &World, nodes: &[String]| -> Vec<Proc> {
        (0..devices.div_ceil(per))
            .map(|i| {
                let n = per.min(devices - i * per);
                // Each process starts on another node (the list is tried in order).
                let mut list = nodes.to_vec();
                list.rotate_left(i % nodes.len());
                start_simulator(world, &format!("s{i}"), n, &list.join(","), &["--heartbeat-interval", "300"])
            })
            .collect()
    };
    let app = |tag: &str| format!("name: wide\nimage: busybox:wide\ncommand: [/bin/sleep, \"{tag}\"]\n");
    let online = |api: u16| metric(api, "baton_devices{status=\"online\"}") as usize;
    let everywhere = |server: &str, revision: u64| {
        wait_for("the workload on every device", Duration::from_secs(1800), || {
            settled(server, "wide", revision, devices)
        })
    };
    for kind in ["embedded", "Mosquitto", "NATS ×3 + 3 controllers on PostgreSQL"] {
        let world = World::new();
        let max = (devices + 100).to_string();
        let (mosquitto, controller, cluster) = match kind {
            "embedded" => (None, Some(Controller::start(&world, None, &["--max-devices", &max])), None),
            "Mosquitto" => {
                let m = Mosquitto::start(&world);
                let c = Controller::start(&world, Some(m.port), &[]);
                (Some(m), Some(c), None)
            }
            _ => (None, None, Some(DeployedCluster::up(&["--resolve-digests", "false"]))),
        };
        let (api, nodes) = match (&controller, &cluster) {
            (Some(c), _) => (c.http, vec![c.broker_url()]),
            (_, Some(cl)) => (cl.serving()[0], cl.mqtt.iter().map(|p| format!("mqtt://127.0.0.1:{p}")).collect()),
            _ => unreachable!("one setup or the other"),
        };
        let registering = Instant::now();
        let _sims = sims(&world, &nodes);
        wait_for("fleet online", Duration::from_secs(1800), || (online(api) >= devices).then_some(()));
        let registered = registering.elapsed();
        std::thread::sleep(Duration::from_secs(idle_secs));
        let controller_rss = match (&controller, &cluster) {
            (Some(c), _) => cpu_and_rss(c.proc.pid()).1,
            (_, Some(cl)) => {
                let leader = cl.api.iter().position(|p| *p == api).expect("the leader's port");
                cpu_and_rss(cl.pid(&format!("controller-{}", leader + 1)) as u32).1
            }
            _ => 0,
        };
        let broker_rss = match (&mosquitto, &cluster) {
            (Some(m), _) => cpu_and_rss(m.proc.pid()).1,
            (_, Some(cl)) => (1..=3).map(|i| cpu_and_rss(cl.pid(&format!("nats-{i}")) as u32).1).sum(),
            _ => 0,
        };
        let server = format!("http://127.0.0.1:{api}");
        let pushing = Instant::now();
        apply_yaml(&server, &world, "wide.yaml", &app("1000"));
        everywhere(&server, 1);
        let pushed = pushing.elapsed();
        let (mut serves, mut again) = ("–".to_string(), "–".to_string());
        if let Some(cl) = &cluster {
            let leader = cl.api.iter().position(|p| *p == api).expect("the leader's port");
            cl.kill9(&format!("controller-{}", leader + 1));
            let killed = Instant::now();
            let next =
                wait_for("another controller serving", Duration::from_secs(120), || cl.serving().first().copied());
            serves = format!("{:.1} s", killed.elapsed().as_secs_f64());
            let server = format!("http://127.0.0.1:{next}");
            let rolling = Instant::now();
            apply_yaml(&server, &world, "wide.yaml", &app("2000"));
            everywhere(&server, 2);
            again = format!("{:.1} s", rolling.elapsed().as_secs_f64());
        }
        let per_device = (controller_rss + broker_rss) as f64 / devices as f64;
        println!(
            "| {kind} | {:.0} s | {:.1} MiB | {} | {per_device:.1} KiB | {:.1} s | {serves} | {again} |",
            registered.as_secs_f64(),
            controller_rss as f64 / 1024.0,
            if broker_rss == 0 { "–".to_string() } else { format!("{:.1} MiB", broker_rss as f64 / 1024.0) },
            pushed.as_secs_f64(),
        );
    }
    println!();
}
