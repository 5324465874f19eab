//! The Raspberry Pi agents built by `cross/build.sh` (static aarch64-musl and
//! armv7 hard-float) run under qemu-user against a controller on loopback,
//! come online, and report their architecture and heartbeats.
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
    let controller = Controller::start(&world, None, &[]);
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
        let mut args = vec![agent.display().to_string()];
        args.extend(agent_args(&world, &id, &controller.broker_url(), &[]));
        let mut proc = Proc::spawn(&id, &qemu, &args, world.path());
        let device = wait_for(&format!("{target} online with heartbeats"), Duration::from_secs(60), || {
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
