//! The Raspberry Pi agents built by `cross/build.sh` (static aarch64-musl and
//! armv7 hard-float, Thumb-2) run under qemu-user against a controller on
//! loopback: each joins with a token over TLS (the handshake, certificate
//! and token checks run the build's own crypto code), comes online over TLS,
//! and reports its architecture and heartbeats; the aarch64
//! one upgrades itself over the air to another build of itself, run as
//! a device runs it (binfmt_misc hands every aarch64 exec to qemu, as the
//! switch execs the new build and its watcher).
//!
//! The binaries come from `BATON_CROSS_DIR` (default `target/cross`). Where
//! they were not built, the test says so and checks nothing — unless
//! `BATON_REQUIRE_CROSS=1` (set by `.ci/run`, which builds them first): then
//! a missing binary is a failure.

use std::path::PathBuf;
use std::process::Command;
use std::time::Duration;

use baton_tests::*;

const TARGETS: [(&str, &str, &str, &str); 2] = [
    ("aarch64-unknown-linux-musl", "qemu-aarch64-static", "aarch64", ""),
    ("armv7-unknown-linux-gnueabihf", "qemu-arm-static", "arm", "v7"),
];

fn cross_dir() -> PathBuf {
    std::env::var_os("BATON_CROSS_DIR")
        .map(PathBuf::from)
        .unwrap_or_else(|| PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../target/cross"))
}

#[test]
fn cross_built_agents_come_online_under_qemu() {
    let required = std::env::var("BATON_REQUIRE_CROSS").is_ok_and(|v| v == "1");
    let world = World::new();
    let controller = Controller::start(&world, None, &["--mqtt-auth", "--mqtt-tls"]);
    let server = controller.server_url();
    let tls_broker = format!("mqtts://127.0.0.1:{}", controller.mqtt);
    let mut ran = 0;
    for (target, qemu, arch, variant) in TARGETS {
        let agent = cross_dir().join(target).join("baton-agent");
        if !agent.exists() {
            assert!(!required, "{} is missing: run cross/build.sh", agent.display());
            eprintln!("skipping {target}: {} not built (cross/build.sh builds it)", agent.display());
            continue;
        }
        let qemu = which(qemu).unwrap_or_else(|| panic!("{qemu} not installed (apt-get install qemu-user-static)"));
        let file = Command::new("file").arg("-b").arg(&agent).output().expect("file(1)");
        let file = String::from_utf8_lossy(&file.stdout);
        assert!(file.contains("statically linked"), "{target}: {file}");

        let id = format!("qemu-{arch}");
        let (ok, token, err) = baton_cli(&server, &["token", "create", "--uses", "1"]);
        assert!(ok, "{err}");
        let mut args = vec![agent.display().to_string()];
        args.extend(agent_args(&world, &id, &tls_broker, &[]));
        // `join` takes the same --config/--broker/--device-id/--data-dir.
        let join = Command::new(&qemu)
            .arg(&agent)
            .args(["join", token.trim()])
            .args(&args[1..9])
            .output()
            .expect("join under qemu");
        let said = format!("{}{}", String::from_utf8_lossy(&join.stdout), String::from_utf8_lossy(&join.stderr));
        assert!(join.status.success() && said.contains(&format!("joined as {id}")), "{target} join over TLS: {said}");
        let mut proc = Proc::spawn(&id, &qemu, &args, world.path());
        let device = wait_for(&format!("{target} online over TLS with heartbeats"), Duration::from_secs(60), || {
            controller
                .device(&id)
                .filter(|d| d.status.as_str() == "online" && d.heartbeat.as_ref().is_some_and(|h| h.seq >= 2))
        });
        let inv = device.inventory.expect("inventory");
        assert_eq!((inv.arch.as_str(), inv.arch_variant.as_str()), (arch, variant), "{target}");
        assert!(proc.is_running(), "{target} agent died");
        assert_eq!(proc.terminate(), Some(0), "{target} agent did not stop cleanly on SIGTERM");
        ran += 1;
    }
    eprintln!("{ran} cross-built agent(s) checked");
}

/// Whether the kernel hands aarch64 executables to qemu (binfmt_misc;
/// `cross/binfmt.sh` registers it).
fn aarch64_binfmt() -> bool {
    std::fs::read_to_string("/proc/sys/fs/binfmt_misc/qemu-aarch64").is_ok_and(|s| s.starts_with("enabled"))
}

#[test]
fn the_aarch64_agent_upgrades_itself_under_qemu() {
    use baton_controller::view::AgentRolloutView;
    let required = std::env::var("BATON_REQUIRE_CROSS").is_ok_and(|v| v == "1");
    let agent = cross_dir().join("aarch64-unknown-linux-musl/baton-agent");
    if !agent.exists() || !aarch64_binfmt() {
        assert!(!required, "needs {} (cross/build.sh) and aarch64 in binfmt_misc (cross/binfmt.sh)", agent.display());
        eprintln!("skipping: the aarch64 agent is not built or binfmt_misc does not run aarch64 (cross/binfmt.sh)");
        return;
    }
    const DEV: &str = "pi-arm64";
    let world = World::new();
    let controller = Controller::start(&world, None, &[]);
    let server = controller.server_url();
    // Emulated, the agent is slow to start: a generous trial deadline.
    let (_agent, _) = start_supervised_build(&world, DEV, &controller.broker_url(), &agent, 90);
    let online = |version: Option<&str>| {
        controller.device(DEV).filter(|d| {
            d.status.as_str() == "online" && version.is_none_or(|v| d.agent_version == v) && d.inventory.is_some()
        })
    };
    let before = wait_for("the aarch64 agent online", Duration::from_secs(90), || online(None));
    assert_eq!(before.inventory.as_ref().map(|i| i.arch.as_str()), Some("aarch64"));
    let build = stamped_agent(&world, &agent, "99.8.0");
    let (ok, out, err) = baton_cli(&server, &["agent", "publish", build.to_str().unwrap()]);
    assert!(ok && out.contains("for aarch64"), "{out}{err}");
    let (ok, _, err) = baton_cli(&server, &["agent", "upgrade", "--version", "99.8.0", "--min-ready", "2"]);
    assert!(ok, "{err}");
    let done = wait_for("the aarch64 upgrade to finish", Duration::from_secs(300), || {
        let (ok, out, _) = baton_cli(&server, &["agent", "rollout", "status", "-o", "json"]);
        let r: AgentRolloutView = ok.then(|| serde_json::from_str(&out).ok()).flatten()?;
        (r.version == "99.8.0" && !r.rollout.state.active()).then_some(r)
    });
    assert_eq!(done.rollout.state, baton_controller::rollout::State::Succeeded, "{done:?}");
    let after = wait_for("the device on 99.8.0", Duration::from_secs(60), || online(Some("99.8.0")));
    let inv = after.inventory.expect("inventory");
    assert_eq!(inv.previous_agent_version, before.agent_version);
    let current = std::fs::canonicalize(world.path().join(format!("agent-{DEV}/bin/current"))).expect("bin/current");
    assert!(current.to_string_lossy().contains("baton-agent-99.8.0-"), "{current:?}");
}
