//! Agent self-update end to end: a real agent, run the way a service
//! manager runs it (restarted whenever it exits), running a real container,
//! upgraded through the controller to another build, then offered builds
//! that exit at start or never come online, which it rolls back by itself
//! while the fleet upgrade stops. Kill points at every step of the switch.
//! A download cut by a kill -9 resumes where it stopped; a build whose bytes
//! are not the signed ones is refused with nothing changed. A simulated
//! fleet upgraded in waves and undone. Root (containers). About 4 min.

use std::path::PathBuf;
use std::time::Duration;

use baton_controller::rollout::State;
use baton_controller::view::{AgentRolloutView, DeviceView};
use baton_protocol::release::UpgradeState;
use baton_tests::*;

const DEVICE: &str = "pi-ota";

/// A native executable from C source (`cc`), standing in for a broken agent build.
fn c_build(world: &World, name: &str, source: &str) -> PathBuf {
    let dir = world.path().join(format!("build-{name}"));
    std::fs::create_dir_all(&dir).expect("build dir");
    let src = dir.join("main.c");
    std::fs::write(&src, source).expect("source");
    let out = dir.join("baton-agent");
    let status = std::process::Command::new("cc").arg("-O2").arg("-o").arg(&out).arg(&src).status().expect("run cc");
    assert!(status.success(), "cc failed");
    out
}

/// Children of `device`'s agent that exited and were never reaped.
fn zombies_of(device: &str) -> Vec<i32> {
    let parents = agent_pids(device);
    let children = std::fs::read_dir("/proc").into_iter().flatten().flatten().filter_map(|e| {
        let pid: i32 = e.file_name().to_str()?.parse().ok()?;
        let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
        // pid (comm) state ppid …: comm may hold spaces, so read after its ')'.
        let mut rest = stat.rsplit_once(')')?.1.split_whitespace();
        let (state, ppid) = (rest.next()?, rest.next()?.parse::<i32>().ok()?);
        (state == "Z" && parents.contains(&ppid)).then_some(pid)
    });
    children.collect()
}

fn agent_rollout(server: &str) -> Option<AgentRolloutView> {
    let (ok, out, _) = baton_cli(server, &["agent", "rollout", "status", "-o", "json"]);
    ok.then(|| serde_json::from_str(&out).expect("agent rollout json"))
}

fn device(server: &str) -> Option<DeviceView> {
    device_named(server, DEVICE)
}

fn device_named(server: &str, id: &str) -> Option<DeviceView> {
    let (ok, out, _) = baton_cli(server, &["describe", "device", id, "-o", "json"]);
    ok.then(|| serde_json::from_str(&out).expect("device json"))
}

fn cli_ok(server: &str, args: &[&str]) -> String {
    let (ok, out, err) = baton_cli(server, args);
    assert!(ok, "baton {args:?}: {err}");
    out
}

/// Runs an upgrade to `version` to its end; returns the finished rollout.
fn upgrade(server: &str, version: &str) -> AgentRolloutView {
    cli_ok(server, &["agent", "upgrade", "--version", version, "--min-ready", "2", "--deadline", "90"]);
    wait_for(&format!("the upgrade to {version} to finish"), Duration::from_secs(120), || {
        agent_rollout(server).filter(|r| r.version == version && !r.rollout.state.active())
    })
}

#[test]
fn an_agent_upgrades_in_place_and_rolls_back_builds_that_do_not_come_online() {
    let world = World::new();
    let controller = Controller::start(&world, None, &[]);
    let server = controller.server_url();
    let data = world.path().join(format!("agent-{DEVICE}"));
    let run = world.path().join(format!("run-{DEVICE}"));
    give_busybox(&world, DEVICE, "busybox:ota");
    let (_agent, entry) = start_supervised_agent(&world, DEVICE, &controller.broker_url());
    let yaml = "name: web\nimage: busybox:ota\ncommand: [/bin/sh, -c, \"trap 'exit 0' TERM; while true; do sleep 0.2; done\"]\n";
    apply_yaml(&server, &world, "web.yaml", yaml);
    wait_for("the workload healthy", Duration::from_secs(30), || settled(&server, "web", 1, 1));
    let container = wait_for("the container's pid", Duration::from_secs(10), || running_pid(&run, "web-0"));
    let old_version = device(&server).expect("device").agent_version;

    // A build that is not an agent, and one that says it is another version, are refused.
    let (ok, _, err) = baton_cli(&server, &["agent", "publish", world.write("notes.txt", "hello").to_str().unwrap()]);
    assert!(!ok && err.contains("not an ELF executable"), "{err}");
    let b = stamped_agent(&world, &bin("baton-agent"), "99.0.0");
    let (ok, _, err) = baton_cli(&server, &["agent", "publish", b.to_str().unwrap(), "--version", "98.0.0"]);
    assert!(!ok && err.contains("says it is version 99.0.0"), "{err}");

    // Build B: published, rolled out, running — the container untouched.
    let out = cli_ok(&server, &["agent", "publish", b.to_str().unwrap()]);
    assert!(out.contains(&format!("agent 99.0.0 for {} published", std::env::consts::ARCH)), "{out}");
    let (ok, _, err) = baton_cli(&server, &["agent", "upgrade", "--version", "97.0.0"]);
    assert!(!ok && err.contains("not published"), "{err}");
    let done = upgrade(&server, "99.0.0");
    assert_eq!(done.rollout.state, State::Succeeded, "{done:?}");
    let d = wait_for("the device to report 99.0.0 upgraded", Duration::from_secs(20), || {
        let d = device(&server)?;
        let inv = d.inventory.clone()?;
        (d.agent_version == "99.0.0" && inv.upgrade.as_ref()?.state == UpgradeState::Upgraded).then_some(d)
    });
    assert_eq!(d.inventory.as_ref().unwrap().previous_agent_version, old_version);
    // The watcher, a child of the process the new agent replaced, is reaped once done.
    wait_for("the watcher gone, and reaped", Duration::from_secs(15), || {
        let watching = std::fs::read_dir("/proc").into_iter().flatten().flatten().any(|e| {
            std::fs::read(e.path().join("cmdline")).is_ok_and(|c| {
                String::from_utf8_lossy(&c).contains(&format!("upgrade-watch\0--data-dir\0{}", data.display()))
            })
        });
        (!watching && zombies_of(DEVICE).is_empty()).then_some(())
    });
    assert!(alive(container), "the container died with the old agent");
    assert_eq!(running_pid(&run, "web-0"), Some(container), "the container was replaced");
    let w = settled(&server, "web", 1, 1).expect("still healthy under the new agent");
    assert_eq!(w.devices[0].reported.as_ref().unwrap().restarts, 0);
    // The A/B layout: the entry point links to `current`, which names the new build; the old one is kept.
    let current = std::fs::read_link(data.join("bin/current")).expect("bin/current");
    assert!(current.to_string_lossy().contains("baton-agent-99.0.0-"), "{current:?}");
    let previous = std::fs::read_link(data.join("bin/previous")).expect("bin/previous");
    assert!(previous.to_string_lossy().contains(&format!("baton-agent-{old_version}-")), "{previous:?}");
    assert_eq!(std::fs::read_link(&entry).expect("entry is a link"), data.join("bin/current"));
    let described = cli_ok(&server, &["describe", "device", DEVICE]);
    assert!(described.contains(&format!("Previous agent: {old_version}")), "{described}");

    // A build that exits at once: the service manager starts `current` (still
    // 99.0.0) again, which rolls back; the fleet upgrade stops.
    let crash = c_build(&world, "crash", "int main(void) { return 3; }\n");
    cli_ok(&server, &["agent", "publish", crash.to_str().unwrap(), "--version", "100.0.0"]);
    let done = upgrade(&server, "100.0.0");
    assert_eq!(done.rollout.state, State::RolledBack, "{done:?}");
    assert!(done.rollout.failed.iter().any(|(_, why)| why.contains("exited") || why.contains("stopped")), "{done:?}");
    let d = wait_for("the device back on 99.0.0", Duration::from_secs(20), || {
        device(&server).filter(|d| d.agent_version == "99.0.0" && d.status == baton_controller::fleet::Status::Online)
    });
    let outcome = d.inventory.unwrap().upgrade.unwrap();
    assert_eq!((outcome.version.as_str(), outcome.state), ("100.0.0", UpgradeState::RolledBack), "{outcome:?}");

    // A build that starts and never comes online: the watcher gives up after
    // the trial deadline (12 s), stops it, and the old agent is back.
    let hang = c_build(&world, "hang", "#include <unistd.h>\nint main(void) { for (;;) pause(); }\n");
    cli_ok(&server, &["agent", "publish", hang.to_str().unwrap(), "--version", "101.0.0"]);
    let done = upgrade(&server, "101.0.0");
    assert_eq!(done.rollout.state, State::RolledBack, "{done:?}");
    let d = wait_for("the device back on 99.0.0 after the hang", Duration::from_secs(30), || {
        let d = device(&server)?;
        let o = d.inventory.clone()?.upgrade?;
        (d.agent_version == "99.0.0" && o.version == "101.0.0" && o.state == UpgradeState::RolledBack).then_some(o)
    });
    assert!(d.detail.contains("did not come online within 12 s"), "{d:?}");

    // Through all of it: one container, never restarted.
    assert_eq!(running_pid(&run, "web-0"), Some(container));
    let w = wait_for("the workload healthy at the end", Duration::from_secs(20), || settled(&server, "web", 1, 1));
    assert_eq!(w.devices[0].reported.as_ref().unwrap().restarts, 0);
    let (_, events, _) = baton_cli(&server, &["get", "events"]);
    assert!(events.contains("agent.upgrade_rolled_back"), "{events}");
}

/// Every step of the switch cut by a kill -9 (once, at a test-only kill
/// point), the agent then started again by its service manager as after a
/// power cut: each time the device comes back with a working agent (the new
/// one or the old one, never neither), the upgrade on record settled, and
/// its container never restarted. The builds are put on the device
/// beforehand (as a download finished before the cut would have), so each
/// round tests the switch, not the download.
#[test]
fn a_kill_at_any_step_of_the_switch_leaves_a_working_agent() {
    const KILLED: &str = "pi-kill";
    let world = World::new();
    let controller = Controller::start(&world, None, &[]);
    let server = controller.server_url();
    let data = world.path().join(format!("agent-{KILLED}"));
    let run = world.path().join(format!("run-{KILLED}"));
    let paths = baton_agent::upgrade::switch::Paths::new(&data);
    give_busybox(&world, KILLED, "busybox:ota");
    let (_agent, _) = start_supervised_agent(&world, KILLED, &controller.broker_url());
    let yaml = "name: web\nimage: busybox:ota\ncommand: [/bin/sh, -c, \"trap 'exit 0' TERM; while true; do sleep 0.2; done\"]\n";
    apply_yaml(&server, &world, "web.yaml", yaml);
    wait_for("the workload healthy", Duration::from_secs(30), || settled(&server, "web", 1, 1));
    let container = wait_for("the container's pid", Duration::from_secs(10), || running_pid(&run, "web-0"));

    let points = [
        "state.json:written",
        "state.json:renamed",
        "handover:watching",
        "ok:written",
        "ok:renamed",
        "current:linked",
        "current:flipped",
        "previous:flipped",
    ];
    let fp = world.path().join("failpoint");
    let mut outcomes = Vec::new();
    for (i, point) in points.iter().enumerate() {
        let version = format!("99.1.{i}");
        let build = stamped_agent(&world, &bin("baton-agent"), &version);
        cli_ok(&server, &["agent", "publish", build.to_str().unwrap()]);
        let digest = baton_agent::upgrade::switch::sha256_file(&build).expect("digest");
        let name = baton_agent::upgrade::switch::release_name(&version, &digest);
        std::fs::create_dir_all(&paths.releases).expect("releases dir");
        std::fs::copy(&build, paths.release(&name)).expect("seed the build");
        // Arm the point, then restart the agent so that it takes it.
        std::fs::write(&fp, point).expect("failpoint file");
        let _ = std::fs::remove_file(fp.with_extension("fired"));
        for pid in agent_pids(KILLED) {
            // SAFETY: kill(2) on this test's agent.
            unsafe { libc::kill(pid, libc::SIGTERM) };
        }
        wait_for("the agent back with the kill point armed", Duration::from_secs(30), || {
            let pids = agent_pids(KILLED);
            let armed = pids.iter().any(|p| {
                std::fs::read(format!("/proc/{p}/environ"))
                    .is_ok_and(|e| String::from_utf8_lossy(&e).contains(&format!("BATON_FAILPOINT={point}")))
            });
            let online = device_named(&server, KILLED)?.status == baton_controller::fleet::Status::Online;
            (armed && online).then_some(())
        });
        cli_ok(&server, &["agent", "upgrade", "--version", &version, "--min-ready", "2", "--deadline", "60"]);
        let r = wait_for(&format!("the upgrade cut at {point} to finish"), Duration::from_secs(90), || {
            agent_rollout(&server).filter(|r| r.version == version && !r.rollout.state.active())
        });
        assert!(fp.with_extension("fired").exists(), "the kill point {point} was never reached");
        // A working agent: online, running one of the two builds, the switch settled on disk.
        let d = wait_for(&format!("a working agent after a kill at {point}"), Duration::from_secs(40), || {
            let d = device_named(&server, KILLED)?;
            let m = baton_agent::upgrade::switch::read_marker(&paths)?;
            let settled = m.phase != baton_agent::upgrade::plan::MarkerPhase::Trying;
            (d.status == baton_controller::fleet::Status::Online && settled).then_some(d)
        });
        let current = std::fs::canonicalize(&paths.current).expect("bin/current resolves");
        assert!(current.is_file(), "bin/current names no build after a kill at {point}");
        let runs = &d.agent_version;
        let expected = if r.rollout.state == State::Succeeded { version.as_str() } else { runs.as_str() };
        assert_eq!(runs, expected, "after a kill at {point}: {r:?}");
        assert!(
            std::fs::canonicalize(&paths.current).unwrap().to_string_lossy().contains(&format!("baton-agent-{runs}-")),
            "bin/current is not the build that runs ({runs}) after a kill at {point}"
        );
        assert_eq!(running_pid(&run, "web-0"), Some(container), "the container was replaced at {point}");
        outcomes.push(format!("{point}: {:?}, runs {runs}", r.rollout.state));
    }
    std::fs::remove_file(&fp).expect("disarm");
    eprintln!("kill points: {outcomes:#?}");
    let w = wait_for("the workload healthy at the end", Duration::from_secs(20), || settled(&server, "web", 1, 1));
    assert_eq!(w.devices[0].reported.as_ref().unwrap().restarts, 0);
}

/// The device's download cut by a kill -9 half-way goes on from where it
/// stopped once the agent is back; a build whose stored bytes were damaged
/// (flipped in the controller's database) is refused by the device — the
/// SHA-256 is not the signed one — with the running agent, `bin/` and the
/// upgrade's scratch files as they were.
#[test]
fn a_cut_download_resumes_and_a_damaged_build_is_refused_with_nothing_changed() {
    const DEV: &str = "pi-cut";
    let world = World::new();
    let controller = Controller::start(&world, None, &[]);
    let server = controller.server_url();
    let data = world.path().join(format!("agent-{DEV}"));
    let paths = baton_agent::upgrade::switch::Paths::new(&data);
    let (agent, _) = start_supervised_agent(&world, DEV, &controller.broker_url());
    wait_for("the device online", Duration::from_secs(30), || {
        device_named(&server, DEV).filter(|d| d.status == baton_controller::fleet::Status::Online)
    });

    let build = stamped_agent(&world, &bin("baton-agent"), "99.2.0");
    let size = std::fs::metadata(&build).expect("build").len();
    cli_ok(&server, &["agent", "publish", build.to_str().unwrap()]);
    let digest = baton_agent::upgrade::switch::sha256_file(&build).expect("digest");
    let part = paths.part(&digest);
    cli_ok(&server, &["agent", "upgrade", "--version", "99.2.0", "--min-ready", "2", "--deadline", "120"]);
    // Half-way (a quarter of the build at least, not all of it): the power goes.
    let cut_at = wait_for("the download under way", Duration::from_secs(60), || {
        let n = std::fs::metadata(&part).ok()?.len();
        (n >= size / 4 && n < size).then_some(n)
    });
    for pid in agent_pids(DEV) {
        // SAFETY: kill(2) on this test's agent.
        unsafe { libc::kill(pid, libc::SIGKILL) };
    }
    let done = wait_for("the upgrade to 99.2.0 to finish", Duration::from_secs(120), || {
        agent_rollout(&server).filter(|r| r.version == "99.2.0" && !r.rollout.state.active())
    });
    assert_eq!(done.rollout.state, State::Succeeded, "{done:?}");
    let log = std::fs::read_to_string(&agent.log).expect("agent log");
    let resumed: Vec<u64> = log
        .lines()
        .filter(|l| l.contains("downloading a new agent"))
        .filter_map(|l| l.split("resume_at=").nth(1)?.split_whitespace().next()?.parse().ok())
        .collect();
    assert!(
        resumed.len() >= 2 && resumed[0] == 0 && resumed[1] > 0 && resumed[1] < size,
        "the download did not resume from the part kept (cut at {cut_at} of {size}): {resumed:?}"
    );
    assert!(!part.exists(), "the finished download's part file is left behind");

    // A build whose bytes in the controller's store are damaged after publishing.
    let damaged = stamped_agent(&world, &bin("baton-agent"), "99.3.0");
    cli_ok(&server, &["agent", "publish", damaged.to_str().unwrap()]);
    {
        let db = rusqlite::Connection::open(world.path().join("controller/baton.db")).expect("open the store");
        db.busy_timeout(Duration::from_secs(10)).expect("busy timeout");
        let mut bytes: Vec<u8> = db
            .query_row("SELECT data FROM agent_releases WHERE version = '99.3.0'", [], |r| r.get(0))
            .expect("the build");
        let mid = bytes.len() / 2;
        bytes[mid] ^= 0xff;
        let n = db.execute("UPDATE agent_releases SET data = ?1 WHERE version = '99.3.0'", [bytes]).expect("damage it");
        assert_eq!(n, 1);
    }
    let before = (
        std::fs::read_link(&paths.current).expect("bin/current"),
        std::fs::read_link(&paths.previous).expect("bin/previous"),
        std::fs::read_dir(&paths.releases).expect("releases").count(),
    );
    let done = upgrade(&server, "99.3.0");
    assert_eq!(done.rollout.state, State::RolledBack, "{done:?}");
    let outcome = wait_for("the device to report the refusal", Duration::from_secs(20), || {
        let d = device_named(&server, DEV)?;
        let o = d.inventory?.upgrade?;
        (o.version == "99.3.0" && d.agent_version == "99.2.0").then_some(o)
    });
    assert_eq!(outcome.state, UpgradeState::Refused, "{outcome:?}");
    assert!(outcome.detail.contains("SHA-256"), "{outcome:?}");
    let after = (
        std::fs::read_link(&paths.current).expect("bin/current"),
        std::fs::read_link(&paths.previous).expect("bin/previous"),
        std::fs::read_dir(&paths.releases).expect("releases").count(),
    );
    assert_eq!(before, after, "a refused build changed bin/");
    let parts = std::fs::read_dir(&paths.upgrade).expect("upgrade dir").flatten();
    let parts: Vec<_> = parts.filter(|e| e.file_name().to_string_lossy().ends_with(".part")).collect();
    assert!(parts.is_empty(), "the damaged download is kept: {parts:?}");
    let described = cli_ok(&server, &["describe", "device", DEV]);
    assert!(described.contains("SHA-256"), "describe does not say why: {described}");
}

/// Twenty simulated devices (`baton-agent simulate`: real links, real
/// downloads and checks, the switch pretended) upgraded in waves to a small
/// build, every one then reporting it with its old version kept; two that
/// were away during the upgrade get it when they come back; `undo`
/// takes every one back; the build is unpublished once no upgrade stands on it.
#[test]
fn a_simulated_fleet_upgrades_in_waves_and_goes_back_on_undo() {
    const N: usize = 20;
    let world = World::new();
    let controller = Controller::start(&world, None, &[]);
    let server = controller.server_url();
    let _sim = start_simulator(&world, "ota", N, &controller.broker_url(), &[]);
    // Two more devices that are away (powered off) while the upgrade runs.
    let mut away = start_simulator(&world, "away", 2, &controller.broker_url(), &[]);
    let online = || controller.devices().iter().filter(|d| d.status == baton_controller::fleet::Status::Online).count();
    wait_for("the simulated fleet online", Duration::from_secs(60), || (online() == N + 2).then_some(()));
    away.terminate();
    wait_for("two devices offline", Duration::from_secs(30), || (online() == N).then_some(()));
    let before = device_named(&server, "ota-0000").expect("a device").agent_version;
    let small = c_build(&world, "small", "int main(void) { return 0; }\n");
    cli_ok(&server, &["agent", "publish", small.to_str().unwrap(), "--version", "99.7.0"]);
    cli_ok(&server, &["agent", "upgrade", "--version", "99.7.0", "--waves", "1,50%,100%", "--min-ready", "1"]);
    let done = wait_for("the fleet upgrade to finish", Duration::from_secs(120), || {
        agent_rollout(&server).filter(|r| r.version == "99.7.0" && !r.rollout.state.active())
    });
    assert_eq!(done.rollout.state, State::Succeeded, "{done:?}");
    let all_on = |version: &str, previous: &str| {
        (0..N).all(|i| {
            device_named(&server, &format!("ota-{i:04}")).is_some_and(|d| {
                d.agent_version == version && d.inventory.is_some_and(|inv| inv.previous_agent_version == previous)
            })
        })
    };
    wait_for("every device on 99.7.0, keeping its old version", Duration::from_secs(30), || {
        all_on("99.7.0", &before).then_some(())
    });
    // The devices that were away upgrade when they come back.
    let _back = start_simulator(&world, "away", 2, &controller.broker_url(), &[]);
    wait_for("the devices that were away on 99.7.0", Duration::from_secs(60), || {
        (0..2)
            .all(|i| device_named(&server, &format!("away-{i:04}")).is_some_and(|d| d.agent_version == "99.7.0"))
            .then_some(())
    });
    // Devices that join later fetch it: it stays published while the upgrade stands.
    let (ok, _, err) = baton_cli(&server, &["agent", "unpublish", "99.7.0"]);
    assert!(!ok && err.contains("last agent upgrade"), "{err}");
    cli_ok(&server, &["agent", "rollout", "undo"]);
    wait_for("every device back on its old version", Duration::from_secs(60), || {
        all_on(&before, "99.7.0").then_some(())
    });
    // The upgrade's status says where its devices stand now, not only where they stood at its end.
    wait_for("the status to show every device back", Duration::from_secs(30), || {
        let (ok, out, _) = baton_cli(&server, &["agent", "rollout", "status"]);
        (ok && out.contains(&format!("Now: 0 on 99.7.0, {} back on the version they ran before", N + 2))).then_some(())
    });
    let out = cli_ok(&server, &["agent", "unpublish", "99.7.0"]);
    assert!(out.contains("1 build(s) unpublished"), "{out}");
    assert!(!cli_ok(&server, &["agent", "releases"]).contains("99.7.0"));
    let (ok, _, err) = baton_cli(&server, &["agent", "unpublish", "99.7.0"]);
    assert!(!ok && err.contains("not published"), "{err}");
}

/// A build that comes online, is made current, then keeps stopping (here:
/// a wrapper that starts the real new agent with a 12 s alarm) is on
/// probation: at its third start before it has run 60 s the device goes
/// back to the old build by itself, says why, and the fleet upgrade
/// (watching with a long `--min-ready`) rolls back.
#[test]
fn a_build_that_keeps_stopping_after_it_came_online_is_given_up() {
    const DEV: &str = "pi-shaky";
    let world = World::new();
    let controller = Controller::start(&world, None, &[]);
    let server = controller.server_url();
    let data = world.path().join(format!("agent-{DEV}"));
    let (_agent, _) = start_supervised_agent(&world, DEV, &controller.broker_url());
    let old = wait_for("the device online", Duration::from_secs(30), || {
        device_named(&server, DEV).filter(|d| d.status == baton_controller::fleet::Status::Online)
    })
    .agent_version;
    let real = stamped_agent(&world, &bin("baton-agent"), "99.9.0");
    std::fs::set_permissions(&real, std::os::unix::fs::PermissionsExt::from_mode(0o755)).expect("chmod");
    let source = format!(
        "#include <unistd.h>\nint main(int argc, char **argv) {{ (void)argc; alarm(12); execv({path:?}, argv); return 127; }}\n",
        path = real.display().to_string()
    );
    let shaky = c_build(&world, "shaky", &source);
    cli_ok(&server, &["agent", "publish", shaky.to_str().unwrap(), "--version", "99.9.0"]);
    cli_ok(&server, &["agent", "upgrade", "--version", "99.9.0", "--min-ready", "90", "--deadline", "300"]);
    let done = wait_for("the upgrade to 99.9.0 to end", Duration::from_secs(240), || {
        agent_rollout(&server).filter(|r| r.version == "99.9.0" && !r.rollout.state.active())
    });
    assert_eq!(done.rollout.state, State::RolledBack, "{done:?}");
    let outcome = wait_for("the device back on its old build", Duration::from_secs(60), || {
        let d = device_named(&server, DEV)?;
        let o = d.inventory?.upgrade?;
        (d.agent_version == old && o.version == "99.9.0").then_some(o)
    });
    assert_eq!(outcome.state, UpgradeState::RolledBack, "{outcome:?}");
    assert!(outcome.detail.contains("stopped 3 times"), "{outcome:?}");
    let current = std::fs::canonicalize(data.join("bin/current")).expect("bin/current");
    assert!(current.to_string_lossy().contains(&format!("baton-agent-{old}-")), "{current:?}");
    let (_, events, _) = baton_cli(&server, &["get", "events"]);
    assert!(events.contains("agent.device_rolled_back"), "{events}");
}
