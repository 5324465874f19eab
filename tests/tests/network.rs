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
    apply_yaml(&server_url, &world, "web.yaml", &server("web", 80, "from-web", ""));
    apply_yaml(&server_url, &world, "guarded.yaml", &server("guarded", 80, "from-guarded", "allow_from: [web]\n"));
    for name in ["api", "web", "guarded"] {
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

    // Names: web reaches api and guarded by workload name.
    let (ok, page) = exec(&server_url, "web", &get("api"));
    assert!(ok && page.contains("from-api"), "{page}");
    let (ok, page) = exec(&server_url, "web", &get("guarded"));
    assert!(ok && page.contains("from-guarded"), "web is allowed: {page}");
    // The policy: api is not on guarded's list, its connection fails.
    let (ok, page) = exec(&server_url, "api", &get("guarded"));
    assert!(!ok && !page.contains("from-guarded"), "api reached guarded: {page}");

    // The published port, from outside the device, at the device's address.
    let page =
        wait_for("api at the device's 8080", Duration::from_secs(10), || http_get(&format!("{}:8080", ns.device_ip)));
    assert!(page.contains("from-api"), "{page}");

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

    // Deleted: nothing of them is left on the device.
    assert!(device_links(&ns).iter().any(|l| l.starts_with("bt")), "no veths while running?");
    for name in ["api", "web", "guarded"] {
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
            && !rules.contains("drop");
        clean.then_some(())
    });
    let left: Vec<_> = std::fs::read_dir(run.join("net")).map(|d| d.flatten().collect()).unwrap_or_default();
    assert!(left.is_empty(), "left under run/net: {left:?}");
    drop(agent);
}
