//! Bridge networking on real devices: each "device" is a network namespace
//! (addresses only inside it) running a real agent, whose bridged busybox
//! containers get their own namespaces, addresses, names, NAT and published
//! ports. Checked from outside the device as a user would: `baton exec`
//! into containers, connections from this machine to the device's address,
//! a listener here that sees where the containers' connections come from.
//! Root only (CI is root). About 1 min.

use std::io::{Read, Write};
use std::net::{TcpListener, TcpStream};
use std::process::Command;
use std::time::{Duration, Instant};

use baton_tests::*;

const DEVICE: &str = "pi-net";

fn exec(server: &str, workload: &str, script: &str) -> (bool, String) {
    let (ok, out, err) = baton_cli(server, &["exec", "--device", DEVICE, workload, "--", "/bin/sh", "-c", script]);
    (ok, format!("{out}{err}"))
}

/// A shell line that GETs /index.html from `host`:80 in a container (with
/// nc: busybox-static's wget crashes in a bare rootfs, looking up services
/// through NSS, which a static glibc cannot load).
fn get(host: &str) -> String {
    format!("printf 'GET /index.html HTTP/1.0\\r\\n\\r\\n' | nc -w 3 {host} 80")
}

/// An HTTP GET from this machine; the body, or None.
fn http_get(addr: &str) -> Option<String> {
    let mut s = TcpStream::connect_timeout(&addr.parse().ok()?, Duration::from_secs(2)).ok()?;
    s.set_read_timeout(Some(Duration::from_secs(5))).ok()?;
    s.write_all(b"GET /index.html HTTP/1.0\r\nHost: x\r\n\r\n").ok()?;
    let mut out = String::new();
    s.read_to_string(&mut out).ok()?;
    out.contains(" 200 ").then_some(out)
}

/// A busybox httpd serving `text` on `port` in the container.
fn server(name: &str, port: u16, text: &str, extra: &str) -> String {
    format!(
        "name: {name}\nimage: busybox:net\nnetwork: bridge\ncommand: [/bin/sh, -c, \"mkdir -p /www; echo {text} > /www/index.html; exec httpd -f -p {port} -h /www\"]\nreadiness: {{tcp: {port}}}\nrollout: {{min_ready: 1}}\n{extra}"
    )
}

/// What the device's namespace holds of the agent's network: veth host
/// ends (`bt…`), and the agent's nftables rules.
fn device_links(ns: &NetNs) -> Vec<String> {
    let out = Command::new("nsenter").args(ns.enter()).args(["ip", "-o", "link"]).output().expect("ip link");
    String::from_utf8_lossy(&out.stdout)
        .lines()
        .filter_map(|l| l.split(':').nth(1).map(|n| n.trim().split('@').next().unwrap_or("").to_string()))
        .collect()
}

fn device_rules(ns: &NetNs) -> String {
    let out = Command::new("nsenter").args(ns.enter()).args(["nft", "list", "ruleset"]).output().expect("nft");
    String::from_utf8_lossy(&out.stdout).into_owned()
}

#[test]
fn bridged_workloads_get_addresses_names_nat_published_ports_and_policies_and_leave_nothing_behind() {
    let world = World::new();
    let ns = NetNs::new();
    let controller = Controller::start_for_namespaces(&world, &ns.host_ip, &[]);
    let server_url = controller.server_url();
    give_busybox(&world, DEVICE, "busybox:net");
    let mut agent = start_agent_in(&world, &ns, DEVICE, &controller.broker_url(), &[]);

    // api listens on 80 in its own namespace, published as the device's 8080;
    // web listens on 80 too (no clash: each has its own address); guarded
    // lets only web connect.
    apply_yaml(
        &server_url,
        &world,
        "api.yaml",
        &server("api", 80, "from-api", "ports: [{name: http, port: 80, publish: 8080}]\n"),
    );
    // web uses db, whose port is not published: reached by name on the device.
    apply_yaml(&server_url, &world, "web.yaml", &server("web", 80, "from-web", "uses: [db]\n"));
    apply_yaml(
        &server_url,
        &world,
        "db.yaml",
        "name: db\nimage: busybox:net\nnetwork: bridge\nports: [{name: pg, port: 5432}]\nreadiness: {tcp: 5432}\n\
         command: [/bin/sh, -c, \"while true; do echo db-here | nc -l -p 5432; done\"]\nrollout: {min_ready: 1}\n",
    );
    apply_yaml(
        &server_url,
        &world,
        "guarded.yaml",
        &server("guarded", 80, "from-guarded", "allow_from: [web]\nports: [{name: http, port: 80, publish: 8081}]\n"),
    );
    for name in ["api", "web", "guarded", "db"] {
        wait_for(&format!("{name} healthy (its tcp probe reaches its own address)"), Duration::from_secs(60), || {
            settled(&server_url, name, 1, 1)
        });
    }

    // Its own address, on the agent's subnet, with a default route out.
    let (ok, addr) = exec(&server_url, "web", "ip -o -4 addr show eth0; ip route");
    assert!(ok, "{addr}");
    let (_, subnet) = world.bridge(DEVICE);
    let prefix = subnet.rsplit_once(".0/").map(|(p, _)| p).expect("subnet");
    assert!(addr.contains(&format!("inet {prefix}.")) && addr.contains("default via"), "{addr}");
    // … which the device reports: `describe workload` shows it.
    let reported = wait_for("web's address reported", Duration::from_secs(20), || {
        describe_workload(&server_url, "web")?.devices.first()?.address.clone()
    });
    assert!(addr.contains(&format!("inet {reported}/")), "reported {reported}, has {addr}");
    let (_, text, _) = baton_cli(&server_url, &["describe", "workload", "web"]);
    assert!(text.contains("ADDRESS") && text.contains(&reported), "{text}");

    // Names: web reaches api and guarded by workload name.
    let (ok, page) = exec(&server_url, "web", &get("api"));
    assert!(ok && page.contains("from-api"), "{page}");
    let (ok, page) = exec(&server_url, "web", &get("guarded"));
    assert!(ok && page.contains("from-guarded"), "web is allowed: {page}");
    // A service it uses, by name, on a port that is not published.
    let page = wait_for("web reaching db by name", Duration::from_secs(20), || {
        let (ok, out) = exec(&server_url, "web", "nc -w 3 db 5432 < /dev/null");
        (ok && out.contains("db-here")).then_some(out)
    });
    assert!(page.contains("db-here"));
    // No IPv6 in a bridged container: link-local addresses would go around the rules.
    let (_, v6) = exec(&server_url, "web", "cat /proc/sys/net/ipv6/conf/all/disable_ipv6");
    assert_eq!(v6.trim(), "1", "{v6}");
    // The policy: api is not on guarded's list, its connection fails.
    let (ok, page) = exec(&server_url, "api", &get("guarded"));
    assert!(!ok && !page.contains("from-guarded"), "api reached guarded: {page}");
    // Nor through the device: its published port, from a container, is routed
    // (not bridged) and meets the same policy; web still gets through.
    let via_device = format!("printf 'GET /index.html HTTP/1.0\\r\\n\\r\\n' | nc -w 3 {} 8081", ns.device_ip);
    let (ok, page) = exec(&server_url, "api", &via_device);
    assert!(!ok && !page.contains("from-guarded"), "api reached guarded through the device: {page}");
    let (ok, page) = exec(&server_url, "web", &via_device);
    assert!(ok && page.contains("from-guarded"), "web through the device: {page}");
    // From outside, guarded's published port is open (allow_from is for the device's workloads).
    assert!(http_get(&format!("{}:8081", ns.device_ip)).is_some_and(|p| p.contains("from-guarded")));

    // The published port, from outside the device, at the device's address.
    let page =
        wait_for("api at the device's 8080", Duration::from_secs(10), || http_get(&format!("{}:8080", ns.device_ip)));
    assert!(page.contains("from-api"), "{page}");

    // A LAN host that routes the device's container subnet through it gets
    // nowhere but the published ports.
    let web_ip =
        describe_workload(&server_url, "web").and_then(|w| w.devices.first()?.address.clone()).expect("web's address");
    let route = format!("{prefix}.0/24");
    let added = Command::new("ip").args(["route", "add", &route, "via", &ns.device_ip]).status().expect("ip route");
    assert!(added.success());
    let direct = http_get(&format!("{web_ip}:80"));
    let _ = Command::new("ip").args(["route", "del", &route]).status();
    assert!(direct.is_none(), "a container's unpublished port answered the LAN: {direct:?}");

    // Out through NAT: a listener on this machine sees the device's address.
    let listener = TcpListener::bind((ns.host_ip.as_str(), 0)).expect("listener");
    let port = listener.local_addr().expect("addr").port();
    let accepted = std::thread::spawn(move || {
        let (mut conn, peer) = listener.accept().expect("the container's connection");
        let mut line = [0u8; 6];
        conn.read_exact(&mut line).expect("its line");
        (peer, line)
    });
    let (ok, out) = exec(&server_url, "web", &format!("echo hello | nc -w 3 {} {port}", ns.host_ip));
    assert!(ok, "{out}");
    let (peer, line) = accepted.join().expect("listener thread");
    assert_eq!(&line, b"hello\n");
    assert_eq!(peer.ip().to_string(), ns.device_ip, "not masqueraded as the device");

    // A device port a process of the device listens on is not taken from it:
    // the workload fails, saying why, and the process keeps its port.
    let mut squatter = Command::new("nsenter")
        .args(ns.enter())
        .args(["busybox", "nc", "-l", "-p", "9099"])
        .spawn()
        .expect("a listener on the device");
    wait_for("the device's own listener", Duration::from_secs(10), || {
        let out = Command::new("nsenter").args(ns.enter()).args(["ss", "-Htln", "sport = :9099"]).output().ok()?;
        (!out.stdout.is_empty()).then_some(())
    });
    apply_yaml(
        &server_url,
        &world,
        "steal.yaml",
        &server("steal", 80, "x", "ports: [{name: h, port: 80, publish: 9099}]\n"),
    );
    let why = wait_for("steal refused on the device", Duration::from_secs(30), || {
        describe_workload(&server_url, "steal")?.devices.first()?.reported.as_ref()?.last_error.clone()
    });
    assert!(why.contains("device port 9099/tcp is in use by a process on the device"), "{why}");
    let _ = squatter.kill();
    let _ = squatter.wait();
    // The other way round: a published port is held, a process of the device
    // that wants it later is told it is in use.
    let late =
        Command::new("nsenter").args(ns.enter()).args(["busybox", "nc", "-l", "-p", "8080"]).output().expect("nc");
    assert!(!late.status.success(), "a device process took api's published port");
    assert!(String::from_utf8_lossy(&late.stderr).contains("in use"), "{}", String::from_utf8_lossy(&late.stderr));
    let (ok, _, err) = baton_cli(&server_url, &["delete", "workload", "steal"]);
    assert!(ok, "{err}");

    // A second workload wanting device port 8080 is refused at apply.
    let clash = world.write("clash.yaml", &server("clash", 81, "x", "ports: [{name: h, port: 81, publish: 8080}]\n"));
    let (ok, _, err) = baton_cli(&server_url, &["apply", "-f", clash.to_str().expect("utf-8")]);
    assert!(!ok && err.contains("device port 8080/tcp") && err.contains("api"), "{err}");

    // kill -9 of the agent: the containers run on, keep their addresses, and
    // the rules are there again after the restart.
    let run = world.path().join(format!("run-{DEVICE}"));
    let pid = running_pid(&run, "api-0").expect("api's pid");
    let (_, before) = exec(&server_url, "api", "ip -o -4 addr show eth0");
    agent.kill9();
    agent = start_agent_in(&world, &ns, DEVICE, &controller.broker_url(), &[]);
    wait_for("online again", Duration::from_secs(30), || {
        controller.device(DEVICE).filter(|d| d.status.as_str() == "online" && d.inventory.is_some())
    });
    let deadline = Instant::now() + Duration::from_secs(5);
    while Instant::now() < deadline {
        assert_eq!(running_pid(&run, "api-0"), Some(pid), "the agent's restart restarted api");
        std::thread::sleep(Duration::from_millis(200));
    }
    let (_, after) = exec(&server_url, "api", "ip -o -4 addr show eth0");
    assert_eq!(before, after, "api's address changed");
    assert!(http_get(&format!("{}:8080", ns.device_ip)).is_some_and(|p| p.contains("from-api")));

    // A restarted container is a new instance: the port forward follows it,
    // and the one that ended holds no address.
    let leases_file = world.path().join(format!("agent-{DEVICE}/net/leases"));
    let (ok, _, err) = baton_cli(&server_url, &["restart", "api", "--device", DEVICE]);
    assert!(ok, "{err}");
    let restarted = Instant::now();
    // httpd as PID 1 ignores SIGTERM: the old instance goes at the end of its 10 s grace.
    wait_for("api-1 serving the published port", Duration::from_secs(60), || {
        let leases = std::fs::read_to_string(&leases_file).ok()?;
        let page = http_get(&format!("{}:8080", ns.device_ip))?;
        (leases.contains(" api-1\n") && !leases.contains(" api-0\n") && page.contains("from-api")).then_some(())
    });
    eprintln!("api-1 served the published port {:?} after the restart", restarted.elapsed());

    // Deleted: nothing of them is left on the device.
    assert!(device_links(&ns).iter().any(|l| l.starts_with("bt")), "no veths while running?");
    for name in ["api", "web", "guarded", "db"] {
        let (ok, _, err) = baton_cli(&server_url, &["delete", "workload", name]);
        assert!(ok, "{err}");
    }
    let leases = world.path().join(format!("agent-{DEVICE}/net/leases"));
    wait_for("veths, leases and rules gone", Duration::from_secs(60), || {
        let links = device_links(&ns);
        let rules = device_rules(&ns);
        let clean = !links.iter().any(|l| l.starts_with("bt"))
            && std::fs::read_to_string(&leases).is_ok_and(|l| l.trim().is_empty())
            && !rules.contains("dnat to")
            && !rules.contains("ct state new drop")
            && !rules.contains("== syn drop");
        clean.then_some(())
    });
    let left: Vec<_> = std::fs::read_dir(run.join("net")).map(|d| d.flatten().collect()).unwrap_or_default();
    assert!(left.is_empty(), "left under run/net: {left:?}");
    drop(agent);
}

/// The address that answered, from the page an `api` instance serves.
fn who(page: &str) -> Option<&str> {
    page.split_whitespace().skip_while(|w| *w != "inet").nth(1).map(|a| a.split('/').next().unwrap_or(a))
}

/// `n` connections from `client` (on device `pi-a`) to the service name
/// `api`: how many each instance answered.
fn spread(server: &str, n: u32) -> std::collections::BTreeMap<String, u32> {
    let script = format!(
        "for i in $(seq {n}); do printf 'GET /index.html HTTP/1.0\\r\\n\\r\\n' | nc -w 3 api 80 | grep inet; done; true"
    );
    let (ok, out, err) = baton_cli(server, &["exec", "--device", "pi-a", "client", "--", "/bin/sh", "-c", &script]);
    assert!(ok, "{err}");
    let mut counts = std::collections::BTreeMap::new();
    for line in out.lines() {
        if let Some(ip) = who(line) {
            *counts.entry(ip.to_string()).or_insert(0) += 1;
        }
    }
    counts
}

/// A service with an instance on each of three devices (one per device, as
/// Baton places replicas), a consumer on one of them: the consumer reaches
/// `api:80` by name, its connections are spread evenly over all three
/// (its own device's instance straight to the container, the others
/// through their devices' published ports), and an instance that turns
/// unhealthy gets no new connection once its device has said so.
#[test]
fn connections_to_a_service_name_are_spread_over_its_healthy_instances_on_every_device() {
    let world = World::new();
    let devices: Vec<(&str, NetNs)> = ["pi-a", "pi-b", "pi-c"].into_iter().map(|d| (d, NetNs::new())).collect();
    // Devices reach each other through this machine, as hosts on one LAN would.
    std::fs::write("/proc/sys/net/ipv4/ip_forward", "1").expect("ip_forward");
    for (_, ns) in &devices {
        ns.run(&["ip", "route", "add", "default", "via", &ns.host_ip]);
    }
    let controller = Controller::start_for_namespaces(&world, "0.0.0.0", &[]);
    let server_url = controller.server_url();
    let port = controller.broker_url().rsplit(':').next().expect("port").to_string();
    let mut agents = Vec::new();
    for (id, ns) in &devices {
        give_busybox(&world, id, "busybox:net");
        let broker = format!("mqtt://{}:{port}", ns.host_ip);
        let role = if *id == "pi-a" { "role=client" } else { "role=server" };
        agents.push(start_agent_in(&world, ns, id, &broker, &["--label", role]));
    }
    wait_for("three devices", Duration::from_secs(30), || (controller.devices().len() == 3).then_some(()));

    // Each instance serves its own address; readiness is that page.
    apply_yaml(
        &server_url,
        &world,
        "api.yaml",
        "name: api\nimage: busybox:net\nnetwork: bridge\nreplicas: 3\n\
         command: [/bin/sh, -c, \"mkdir -p /www; ip -o -4 addr show eth0 > /www/index.html; exec httpd -f -p 80 -h /www\"]\n\
         ports: [{name: http, port: 80, publish: 8080}]\n\
         readiness: {http: {port: 80, path: /index.html}, interval: 1, failure_threshold: 1}\n\
         rollout: {min_ready: 1}\n",
    );
    apply_yaml(
        &server_url,
        &world,
        "client.yaml",
        "name: client\nimage: busybox:net\nnetwork: bridge\nuses: [api]\nplacement: {selector: {role: client}}\n\
         command: [/bin/sh, -c, \"while true; do sleep 1; done\"]\n",
    );
    wait_for("api on three devices", Duration::from_secs(90), || settled(&server_url, "api", 1, 3));
    wait_for("client", Duration::from_secs(60), || settled(&server_url, "client", 1, 1));

    // `api` is one stable address on the consumer's device, none of the instances'.
    let (ok, hosts, err) = baton_cli(&server_url, &["exec", "--device", "pi-a", "client", "--", "cat", "/etc/hosts"]);
    assert!(ok, "{err}");
    let vip = hosts.lines().find(|l| l.ends_with("\tapi")).and_then(|l| l.split('\t').next()).expect("api in hosts");

    // Every instance has its endpoint in the consumer's rules once the
    // three reported healthy; then 300 connections.
    let counts = wait_for("three instances answering", Duration::from_secs(30), || {
        let c = spread(&server_url, 30);
        (c.len() == 3).then_some(c)
    });
    assert!(!counts.contains_key(vip), "{counts:?}");
    let counts = spread(&server_url, 300);
    assert_eq!(counts.values().sum::<u32>(), 300, "connections failed: {counts:?}");
    for (instance, n) in &counts {
        assert!((80..=120).contains(n), "{instance} answered {n} of 300: {counts:?}");
    }

    // pi-c's instance turns unhealthy (its page goes): within seconds no new
    // connection reaches it, and none fails.
    let c_addr = {
        let (ok, out, err) =
            baton_cli(&server_url, &["exec", "--device", "pi-c", "api", "--", "/bin/sh", "-c", "cat /www/index.html"]);
        assert!(ok, "{err}");
        who(&out).expect("pi-c's address").to_string()
    };
    let (ok, _, err) =
        baton_cli(&server_url, &["exec", "--device", "pi-c", "api", "--", "/bin/sh", "-c", "rm /www/index.html"]);
    assert!(ok, "{err}");
    let cut = Instant::now();
    wait_for("pi-c's instance out of the rotation", Duration::from_secs(30), || {
        let c = spread(&server_url, 20);
        (!c.contains_key(&c_addr) && c.values().sum::<u32>() == 20).then_some(())
    });
    eprintln!("pi-c's instance left the rotation within {:?}", cut.elapsed());
    let counts = spread(&server_url, 100);
    assert_eq!(counts.values().sum::<u32>(), 100, "{counts:?}");
    assert_eq!(counts.len(), 2, "{counts:?}");
    assert!(!counts.contains_key(&c_addr), "{counts:?}");
    // The service's address stayed put through all this.
    let (_, hosts, _) = baton_cli(&server_url, &["exec", "--device", "pi-a", "client", "--", "cat", "/etc/hosts"]);
    assert!(hosts.contains(&format!("{vip}\tapi")), "the service address moved: {hosts}");
    drop(agents);
}

/// `resources.network` limits, measured with real transfers between a
/// bridged container and this machine: each rate within ±20 % of its limit.
#[test]
fn bandwidth_limits_hold_within_a_fifth_of_their_rate() {
    let world = World::new();
    let ns = NetNs::new();
    let controller = Controller::start_for_namespaces(&world, &ns.host_ip, &[]);
    let server_url = controller.server_url();
    give_busybox(&world, DEVICE, "busybox:net");
    let _agent = start_agent_in(&world, &ns, DEVICE, &controller.broker_url(), &[]);
    apply_yaml(
        &server_url,
        &world,
        "shaped.yaml",
        "name: shaped\nimage: busybox:net\nnetwork: bridge\nresources: {network: {egress: 2mbit, ingress: 4mbit}}\n\
         command: [/bin/sh, -c, \"while true; do sleep 1; done\"]\nrollout: {min_ready: 1}\n",
    );
    wait_for("shaped running", Duration::from_secs(60), || settled(&server_url, "shaped", 1, 1));
    let mbit = |bytes: usize, took: Duration| bytes as f64 * 8.0 / took.as_secs_f64() / 1e6;

    // Egress: the container sends 1.5 MB to a listener here.
    let listener = TcpListener::bind((ns.host_ip.as_str(), 0)).expect("listener");
    let port = listener.local_addr().expect("addr").port();
    let (host, url) = (ns.host_ip.clone(), server_url.clone());
    let sender = std::thread::spawn(move || {
        let script = format!("dd if=/dev/zero bs=1024 count=1500 2>/dev/null | nc {host} {port}; true");
        exec(&url, "shaped", &script)
    });
    let (mut conn, _) = listener.accept().expect("the container's connection");
    let total = 1500 * 1024;
    let mut buf = vec![0u8; 64 * 1024];
    // Timed from the first bytes (the connection's setup is not the limit's).
    let first_read = conn.read(&mut buf).expect("first bytes");
    let first = Instant::now();
    let mut got = first_read;
    while got < total {
        match conn.read(&mut buf).expect("read") {
            0 => break,
            n => got += n,
        }
    }
    let egress = mbit(got - first_read, first.elapsed());
    drop(conn);
    let _ = sender.join();
    assert_eq!(got, total, "the transfer was cut");
    eprintln!("egress: {egress:.2} Mbit/s (limit 2)");
    assert!((1.6..=2.4).contains(&egress), "egress {egress:.2} Mbit/s, limit 2");

    // Ingress: the container downloads 3 MB from a server here.
    let listener = TcpListener::bind((ns.host_ip.as_str(), 0)).expect("listener");
    let port = listener.local_addr().expect("addr").port();
    let (host, url) = (ns.host_ip.clone(), server_url.clone());
    let receiver = std::thread::spawn(move || {
        let done = exec(&url, "shaped", &format!("nc {host} {port} | wc -c"));
        (done, Instant::now())
    });
    let (mut conn, _) = listener.accept().expect("the container's connection");
    let total = 3_000_000;
    let start = Instant::now();
    conn.write_all(&vec![7u8; total]).expect("send");
    conn.shutdown(std::net::Shutdown::Write).expect("shutdown");
    // Done when the container's nc has read it all and exited: the exec
    // returns then (its own latency, tens of ms, is in the time). The
    // connection's end says nothing: nc closes its side at once (its
    // stdin is empty).
    let ((ok, out), end) = receiver.join().expect("receiver");
    assert!(ok && out.trim() == total.to_string(), "received: {out}");
    let ingress = mbit(total, end - start);
    eprintln!("ingress: {ingress:.2} Mbit/s (limit 4)");
    assert!((3.2..=4.8).contains(&ingress), "ingress {ingress:.2} Mbit/s, limit 4");
}
