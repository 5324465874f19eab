//! Field faults, flash wear: SD cards wear out, so an idle device must write
//! nothing. An agent with five running containers (run_dir on tmpfs, as on a
//! device), once settled, leaves its data dir exactly as it was — no file or
//! directory created, rewritten or touched — for longer than every periodic
//! job it has (image GC runs every 60 s). About 90 s.

use std::collections::BTreeMap;
use std::os::unix::fs::MetadataExt;
use std::path::Path;
use std::process::Command;
use std::time::Duration;

use baton_tests::*;

const DEVICE: &str = "pi-f";

/// Every file and directory under `dir`, with what a write changes.
fn snapshot(dir: &Path) -> BTreeMap<String, (u64, i64, i64, u64)> {
    let mut out = BTreeMap::new();
    let mut stack = vec![dir.to_path_buf()];
    while let Some(d) = stack.pop() {
        for e in std::fs::read_dir(&d).into_iter().flatten().flatten() {
            let Ok(m) = e.path().symlink_metadata() else { continue };
            if m.is_dir() {
                stack.push(e.path());
            }
            out.insert(e.path().display().to_string(), (m.ino(), m.mtime(), m.mtime_nsec(), m.size()));
        }
    }
    out.insert(
        dir.display().to_string(),
        std::fs::metadata(dir).map_or((0, 0, 0, 0), |m| (m.ino(), m.mtime(), m.mtime_nsec(), m.size())),
    );
    out
}

#[test]
fn an_idle_agent_with_five_containers_writes_nothing_to_flash() {
    let world = World::new();
    let run = world.path().join(format!("run-{DEVICE}"));
    std::fs::create_dir_all(&run).expect("run dir");
    let mounted = Command::new("mount").args(["-t", "tmpfs", "-o", "size=32m", "tmpfs"]).arg(&run).status();
    assert!(mounted.is_ok_and(|s| s.success()), "mount a tmpfs run dir (root only; CI is root)");
    let controller = Controller::start(&world, None, &[]);
    let server = controller.server_url();
    give_busybox(&world, DEVICE, "busybox:flash");
    let _agent = start_agent(&world, DEVICE, &controller.broker_url(), &[]);
    // Silent containers: their logs are not the agent's writes.
    let manifests: String = (0..5)
        .map(|i| {
            format!(
                "---\nname: idle-{i}\nimage: busybox:flash\ncommand: [/bin/sh, -c, \"while true; do sleep 1; done\"]\n"
            )
        })
        .collect();
    apply_yaml(&server, &world, "idle.yaml", &manifests);
    wait_for("5 containers healthy", Duration::from_secs(60), || {
        (0..5).all(|i| settled(&server, &format!("idle-{i}"), 1, 1).is_some()).then_some(())
    });
    // Settled: every revision proven on the device (its rollback point written).
    let data = world.path().join(format!("agent-{DEVICE}"));
    wait_for("5 revisions proven", Duration::from_secs(30), || {
        let bytes = std::fs::read(data.join("state/proven.bin")).ok()?;
        let (_, msg) = baton_protocol::decode(&bytes).ok()?;
        matches!(msg, baton_protocol::Message::Desired(d) if d.workloads.len() == 5).then_some(())
    });
    // Past the last write the settling made, then a window longer than any periodic job.
    let before = wait_for("the data dir at rest", Duration::from_secs(20), || {
        let a = snapshot(&data);
        wait_until(Duration::from_secs(2), || (snapshot(&data) != a).then_some(())).is_none().then_some(a)
    });
    let window = Duration::from_secs(65);
    let start = std::time::Instant::now();
    while start.elapsed() < window {
        let now = snapshot(&data);
        let changed: Vec<&String> = now
            .iter()
            .filter(|(k, v)| before.get(*k) != Some(v))
            .map(|(k, _)| k)
            .chain(before.keys().filter(|k| !now.contains_key(*k)))
            .collect();
        assert!(changed.is_empty(), "an idle agent wrote to flash after {:?}: {changed:?}", start.elapsed());
        std::thread::sleep(Duration::from_millis(500));
    }
}
