//! Real containers through shims and libcontainer, from a busybox-static rootfs.
//! Root only; CI runs as root.

mod common;

use std::path::Path;
use std::time::Duration;

use baton_agent::runtime::{ContainerRuntime, ContainerState, CreateRequest, RuntimeError};
use baton_protocol::spec::*;
use common::*;

const T: Duration = Duration::from_secs(20);

fn create(fx: &Fixture, rt: &dyn ContainerRuntime, id: &str, spec: &ContainerSpec) -> Result<(), RuntimeError> {
    rt.create(&CreateRequest { id, spec, rootfs: fx.rootfs.clone().into(), provenance: Default::default() })
}

fn cgroup_exists(fx: &Fixture, id: &str) -> bool {
    let cg = fx.layout.cgroup(id);
    ["/sys/fs/cgroup/memory", "/sys/fs/cgroup/pids", "/sys/fs/cgroup"]
        .iter()
        .any(|p| Path::new(&format!("{p}{cg}")).exists())
}

#[test]
fn runs_to_completion_with_exit_code_and_logs_then_removes_cleanly() {
    let fx = Fixture::new();
    let rt = fx.runtime();
    let id = cid("exit");
    create(&fx, &rt, &id, &sh("echo hello out; echo hello err >&2; exit 3")).unwrap();
    let exit = wait_exit(&rt, &id, T);
    assert_eq!((exit.code, exit.signal, exit.oom_killed), (3, None, false));
    let log = fx.log(&id);
    assert!(log.contains(" stdout hello out\n") && log.contains(" stderr hello err\n"), "{log}");
    assert!(!cgroup_exists(&fx, &id), "cgroup left after exit");
    // Kept for its log and exit record only: no mount, no writable layer, no run state.
    // (The shim records the exit first, then releases the rest.)
    let bundle = fx.layout.container(&id);
    let rootfs = bundle.join("rootfs").display().to_string();
    wait_until("the rootfs unmounted, the writable layer and run state gone", T, || {
        !std::fs::read_to_string("/proc/self/mounts").unwrap().contains(&rootfs)
            && !bundle.join("upper").exists()
            && !fx.layout.run_state(&id).exists()
    });
    assert_eq!(rt.list().unwrap(), vec![id.clone()]);
    rt.remove(&id).unwrap();
    assert_eq!(rt.state(&id).unwrap(), ContainerState::Missing);
    assert!(rt.list().unwrap().is_empty());
}

#[test]
fn container_outlives_the_agent_and_is_readopted_without_restart() {
    let fx = Fixture::new();
    let id = cid("adopt");
    let running = {
        let rt = fx.runtime();
        create(&fx, &rt, &id, &sh("trap 'echo bye; exit 0' TERM; echo ready; while true; do sleep 0.1; done")).unwrap();
        // Stopped before its trap is set, the shell (PID 1 of its namespace)
        // would ignore SIGTERM and die of the SIGKILL after the grace period.
        wait_until("the trap set", T, || fx.log(&id).contains("stdout ready"));
        match rt.state(&id).unwrap() {
            ContainerState::Running(r) => r,
            other => panic!("not running: {other:?}"),
        }
        // `rt` is dropped here, as an agent that died would be.
    };
    let rt = fx.runtime();
    match rt.state(&id).unwrap() {
        ContainerState::Running(r) => assert_eq!(r, running, "re-adopted a different container"),
        other => panic!("lost the container: {other:?}"),
    }
    assert!(Path::new(&format!("/proc/{}", running.pid)).exists());
    let usage = rt.usage(&id).expect("usage from cgroup");
    assert!(usage.memory_bytes > 0, "{usage:?}");
    rt.stop(&id).unwrap();
    let exit = wait_exit(&rt, &id, T);
    assert_eq!(exit.code, 0, "trap should exit 0 on SIGTERM");
    assert_eq!(exit.started_at_ms, running.started_at_ms);
    wait_until("bye in the log", T, || fx.log(&id).contains("stdout bye"));
    rt.remove(&id).unwrap();
}

#[test]
fn exit_while_nobody_watches_is_recorded() {
    let fx = Fixture::new();
    let id = cid("unwatched");
    create(&fx, &fx.runtime(), &id, &sh("sleep 0.3; exit 7")).unwrap();
    // No runtime object exists while the container runs and exits.
    let exit_file = fx.layout.container(&id).join("exit.json");
    wait_until("exit record", T, || exit_file.exists());
    let exit = wait_exit(&fx.runtime(), &id, T);
    assert_eq!(exit.code, 7);
}

#[test]
fn stop_escalates_to_sigkill_and_kill_is_immediate() {
    let fx = Fixture::new();
    let rt = fx.runtime();
    // PID 1 without a TERM handler ignores SIGTERM: stop must escalate after the grace period.
    let stubborn = cid("stubborn");
    create(&fx, &rt, &stubborn, &sh("while true; do sleep 0.1; done")).unwrap();
    rt.stop(&stubborn).unwrap();
    let exit = wait_exit(&rt, &stubborn, T);
    assert_eq!((exit.code, exit.signal), (137, Some(9)));
    let doomed = cid("doomed");
    create(&fx, &rt, &doomed, &sh("trap '' TERM; while true; do sleep 0.1; done")).unwrap();
    rt.kill(&doomed).unwrap();
    assert_eq!(wait_exit(&rt, &doomed, T).code, 137);
}

#[test]
fn memory_limit_oom_kill_is_reported() {
    let fx = Fixture::new();
    let rt = fx.runtime();
    let id = cid("oom");
    let mut spec = sh("a=xxxxxxxxxxxxxxxx; while true; do a=\"$a$a\"; done");
    spec.resources.memory_bytes = Some(16 << 20);
    create(&fx, &rt, &id, &spec).unwrap();
    let exit = wait_exit(&rt, &id, T);
    assert_eq!(exit.code, 137, "{exit:?}");
    assert!(exit.oom_killed, "OOM kill not detected: {exit:?}");
}

#[test]
fn pids_limit_stops_fork_bombs() {
    let fx = Fixture::new();
    let rt = fx.runtime();
    let id = cid("pids");
    let mut spec = sh("for i in 1 2 3 4 5 6 7 8 9 10 11 12; do sleep 5 & done; echo forked");
    spec.resources.pids = Some(4);
    create(&fx, &rt, &id, &spec).unwrap();
    wait_until("a refused fork", T, || fx.log(&id).contains("can't fork"));
    rt.kill(&id).unwrap();
    wait_exit(&rt, &id, T);
}

#[test]
fn volume_data_survives_replacing_the_container() {
    let fx = Fixture::new();
    let rt = fx.runtime();
    let volume = Mount { target: "/data".into(), source: MountSource::Volume(cid("vol")), read_only: false };
    let first = cid("writer");
    let mut spec = sh("echo persisted-$((6*7)) > /data/f");
    spec.mounts = vec![volume.clone()];
    create(&fx, &rt, &first, &spec).unwrap();
    assert_eq!(wait_exit(&rt, &first, T).code, 0);
    rt.remove(&first).unwrap();

    let second = cid("reader");
    let mut spec = sh("cat /data/f");
    spec.mounts = vec![volume];
    create(&fx, &rt, &second, &spec).unwrap();
    assert_eq!(wait_exit(&rt, &second, T).code, 0);
    assert!(fx.log(&second).contains("stdout persisted-42"), "{}", fx.log(&second));
}

#[test]
fn read_only_rootfs_refuses_writes_but_tmpfs_accepts_them() {
    let fx = Fixture::new();
    let rt = fx.runtime();
    let id = cid("ro");
    let mut spec = sh("touch /tmp/ok && echo tmpfs-ok; touch /bin/x || exit 9");
    spec.read_only_rootfs = true;
    spec.mounts = vec![Mount { target: "/tmp".into(), source: MountSource::Tmpfs(1 << 20), read_only: false }];
    create(&fx, &rt, &id, &spec).unwrap();
    assert_eq!(wait_exit(&rt, &id, T).code, 9);
    let log = fx.log(&id);
    assert!(log.contains("tmpfs-ok") && log.contains("Read-only file system"), "{log}");
}

#[test]
fn config_files_are_mounted_read_only_and_kept_off_flash() {
    let fx = Fixture::new();
    let rt = fx.runtime();
    let id = cid("files");
    let mut spec = sh("cat /etc/app/app.conf; ls -l /etc/app/app.conf; echo more >> /etc/app/app.conf || echo refused");
    spec.read_only_rootfs = true;
    spec.files = vec![baton_protocol::spec::File {
        path: "/etc/app/app.conf".into(),
        mode: 0o640,
        contents: b"level = debug\n".to_vec(),
    }];
    create(&fx, &rt, &id, &spec).unwrap();
    assert_eq!(wait_exit(&rt, &id, T).code, 0);
    let log = fx.log(&id);
    assert!(log.contains("stdout level = debug"), "{log}");
    assert!(log.contains("-rw-r-----"), "mode not kept: {log}");
    assert!(log.contains("stdout refused") && log.contains("Read-only file system"), "{log}");
    // The content lives on the run dir (tmpfs), nowhere under the data dir (flash).
    let on_flash = std::process::Command::new("grep")
        .args(["-r", "-l", "level = debug"])
        .arg(&fx.layout.data_dir)
        .output()
        .unwrap();
    let hits = String::from_utf8_lossy(&on_flash.stdout);
    assert!(hits.lines().all(|l| l.ends_with("container.log")), "{hits}");
}

#[test]
fn passed_through_device_works_and_others_are_denied() {
    let fx = Fixture::new();
    let rt = fx.runtime();
    // A stand-in for /dev/ttyUSB0: a null device node the test creates.
    let node = format!("/dev/baton-test-{}", std::process::id());
    nix::sys::stat::mknod(
        Path::new(&node),
        nix::sys::stat::SFlag::S_IFCHR,
        nix::sys::stat::Mode::from_bits_truncate(0o666),
        nix::sys::stat::makedev(1, 3),
    )
    .unwrap();
    let id = cid("dev");
    let mut spec = sh("echo x > /dev/sensor && echo sensor-ok; mknod /tmp/mem c 1 1; cat /tmp/mem || echo mem-denied");
    spec.devices =
        vec![DeviceMount { host_path: node.clone(), container_path: "/dev/sensor".into(), permissions: "rw".into() }];
    create(&fx, &rt, &id, &spec).unwrap();
    wait_exit(&rt, &id, T);
    let _ = std::fs::remove_file(&node);
    let log = fx.log(&id);
    assert!(log.contains("stdout sensor-ok"), "{log}");
    assert!(log.contains("stdout mem-denied") && log.contains("Operation not permitted"), "{log}");
}

#[test]
fn network_none_has_only_loopback_and_host_sees_host_interfaces() {
    let fx = Fixture::new();
    let rt = fx.runtime();
    let isolated = cid("netnone");
    let mut spec = sh("ls /sys/class/net");
    spec.network = NetworkMode::None;
    create(&fx, &rt, &isolated, &spec).unwrap();
    wait_exit(&rt, &isolated, T);
    let lines: Vec<String> =
        fx.log(&isolated).lines().map(|l| l.rsplit(' ').next().unwrap_or("").to_string()).collect();
    assert_eq!(lines, vec!["lo".to_string()]);

    let host = cid("nethost");
    create(&fx, &rt, &host, &sh("ls /sys/class/net")).unwrap();
    wait_exit(&rt, &host, T);
    assert!(fx.log(&host).lines().count() > 1, "host network shows only lo: {}", fx.log(&host));
}

#[test]
fn bad_specs_are_refused_and_leave_nothing_behind() {
    let fx = Fixture::new();
    let rt = fx.runtime();
    let missing_exe = cid("noexe");
    let spec = ContainerSpec { command: vec!["/bin/does-not-exist".into()], ..Default::default() };
    let err = create(&fx, &rt, &missing_exe, &spec).unwrap_err().to_string();
    assert!(err.contains("does-not-exist"), "{err}");

    let bad_mount = cid("nomount");
    let mut spec = sh("true");
    spec.mounts =
        vec![Mount { target: "/x".into(), source: MountSource::Bind("/nonexistent/src".into()), read_only: true }];
    let err = create(&fx, &rt, &bad_mount, &spec).unwrap_err().to_string();
    assert!(err.contains("mounts[0].bind") && err.contains("does not exist"), "{err}");

    let no_device = cid("nodev");
    let mut spec = sh("true");
    spec.devices = vec![DeviceMount {
        host_path: "/dev/ttyUSB99".into(),
        container_path: String::new(),
        permissions: "rw".into(),
    }];
    let err = create(&fx, &rt, &no_device, &spec).unwrap_err().to_string();
    assert!(err.contains("devices[0]") && err.contains("does not exist"), "{err}");

    let bad_limit = cid("nolimit");
    let mut spec = sh("true");
    spec.resources.memory_bytes = Some(1024);
    let err = create(&fx, &rt, &bad_limit, &spec).unwrap_err().to_string();
    assert!(err.contains("resources.memory"), "{err}");

    for id in [&missing_exe, &bad_mount, &no_device, &bad_limit] {
        assert_eq!(rt.state(id).unwrap(), ContainerState::Missing, "{id} left state");
        assert!(!cgroup_exists(&fx, id), "{id} left a cgroup");
        assert!(!fx.layout.youki_root().join(id).exists(), "{id} left libcontainer state");
    }
    assert!(rt.list().unwrap().is_empty());
}

#[test]
fn default_seccomp_profile_blocks_a_denied_syscall_and_can_be_opted_out() {
    let fx = Fixture::new();
    let rt = fx.runtime();
    // unshare(CLONE_NEWUSER) needs no capability: only seccomp stands in its way.
    let confined = cid("seccomp");
    create(&fx, &rt, &confined, &sh("unshare -U true && echo unshared")).unwrap();
    let exit = wait_exit(&rt, &confined, T);
    let log = fx.log(&confined);
    assert_ne!(exit.code, 0, "{log}");
    assert!(log.contains("Operation not permitted") && !log.contains("stdout unshared"), "{log}");

    let unconfined = cid("noseccomp");
    let mut spec = sh("unshare -U true && echo unshared");
    spec.security.seccomp_unconfined = true;
    create(&fx, &rt, &unconfined, &spec).unwrap();
    assert_eq!(wait_exit(&rt, &unconfined, T).code, 0, "{}", fx.log(&unconfined));
    assert!(fx.log(&unconfined).contains("stdout unshared"));

    // The profile lives beside config.json (compiled once, runtime/filter.rs),
    // and what `exec` runs in the container is filtered as its init is.
    let bundle = fx.layout.container(&confined);
    let config: serde_json::Value =
        serde_json::from_slice(&std::fs::read(bundle.join("config.json")).unwrap()).unwrap();
    assert!(config["linux"]["seccomp"].is_null(), "libcontainer would compile it again");
    assert_eq!(config["annotations"]["org.baton.seccomp"], "seccomp.json");
    assert!(bundle.join("seccomp.json").is_file());
    let cached = std::fs::read_dir(fx.layout.run_dir.join("seccomp")).unwrap().count();
    assert_eq!(cached, 1, "one program for one profile");
    let busy = cid("seccomp-exec");
    create(&fx, &rt, &busy, &sh("while true; do sleep 0.1; done")).unwrap();
    let unshare = ["/bin/sh".to_string(), "-c".into(), "unshare -U true && echo unshared".into()];
    let mut refused = None;
    wait_until("exec in the running container", T, || {
        refused = rt.exec(&busy, &unshare, T).ok().filter(|o| o.code != 126);
        refused.is_some()
    });
    let refused = refused.unwrap();
    assert_ne!(refused.code, 0, "{refused:?}");
    assert!(String::from_utf8_lossy(&refused.stderr).contains("Operation not permitted"), "{refused:?}");
    assert_eq!(std::fs::read_dir(fx.layout.run_dir.join("seccomp")).unwrap().count(), cached);
    // A bundle that names a profile it lacks runs nothing unfiltered.
    std::fs::remove_file(fx.layout.container(&busy).join("seccomp.json")).unwrap();
    let out = rt.exec(&busy, &["/bin/true".into()], T).unwrap();
    assert_eq!(out.code, 126, "{out:?}");
    assert!(String::from_utf8_lossy(&out.stderr).contains("seccomp.json"), "{out:?}");
    // Nor one whose config stopped naming it: its init runs filtered.
    let config_path = fx.layout.container(&busy).join("config.json");
    let mut config: serde_json::Value = serde_json::from_slice(&std::fs::read(&config_path).unwrap()).unwrap();
    config["annotations"].as_object_mut().unwrap().remove("org.baton.seccomp");
    std::fs::write(&config_path, config.to_string()).unwrap();
    let out = rt.exec(&busy, &["/bin/true".into()], T).unwrap();
    assert_eq!(out.code, 126, "{out:?}");
    assert!(String::from_utf8_lossy(&out.stderr).contains("seccomp.json"), "{out:?}");
    // A bundle without its config.json says so.
    std::fs::remove_file(&config_path).unwrap();
    let out = rt.exec(&busy, &["/bin/true".into()], T).unwrap();
    assert_eq!(out.code, 126, "{out:?}");
    assert!(String::from_utf8_lossy(&out.stderr).contains("config.json"), "{out:?}");
    rt.kill(&busy).unwrap();
    wait_exit(&rt, &busy, T);
}

/// Privileged means every capability the agent itself holds (a host whose
/// root lacks one, like this machine kind's, which has no SYS_RESOURCE,
/// could not start a privileged container at all); naming a missing one in
/// `cap_add` is refused with its name.
#[test]
fn privileged_gets_what_the_agent_holds_and_a_missing_capability_is_named() {
    let fx = Fixture::new();
    let rt = fx.runtime();
    let status = std::fs::read_to_string("/proc/self/status").unwrap();
    let held = status
        .lines()
        .find_map(|l| l.strip_prefix("CapBnd:"))
        .and_then(|v| u64::from_str_radix(v.trim(), 16).ok())
        .unwrap();
    let known = (1u64 << baton_protocol::spec::CAPABILITIES.len()) - 1;
    let mut spec = sh("grep CapEff /proc/self/status");
    spec.security.privileged = true;
    let id = cid("priv");
    create(&fx, &rt, &id, &spec).unwrap();
    assert_eq!(wait_exit(&rt, &id, T).code, 0, "{}", fx.log(&id));
    let log = fx.log(&id);
    assert!(log.contains(&format!("CapEff:\t{:016x}", held & known)), "{log}");
    match (0..baton_protocol::spec::CAPABILITIES.len()).find(|b| held & (1 << b) == 0) {
        Some(bit) => {
            let name = baton_protocol::spec::CAPABILITIES[bit];
            let mut spec = sh("true");
            spec.security.cap_add = vec![name.to_string()];
            let e = create(&fx, &rt, &cid("missingcap"), &spec).unwrap_err().to_string();
            assert!(e.contains(name) && e.contains("cannot give"), "{e}");
        }
        None => eprintln!("this host's root holds every capability: nothing to refuse"),
    }
}

/// A static C program in the container: `probe NR` makes raw syscall NR
/// (arguments 0) and prints the errno; `probe thread` starts a thread (glibc
/// tries clone3 first and falls back to clone only on ENOSYS).
const PROBE_C: &str = r#"
#include <errno.h>
#include <pthread.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>
#include <sys/syscall.h>
static void *run(void *arg) { return arg; }
int main(int argc, char **argv) {
    if (argc > 1 && strcmp(argv[1], "thread") == 0) {
        pthread_t t;
        int e = pthread_create(&t, NULL, run, NULL);
        if (e == 0) pthread_join(t, NULL);
        printf("thread %d\n", e);
        return 0;
    }
    long nr = strtol(argv[1], NULL, 10);
    long r = syscall(nr, 0, 0, 0, 0);
    printf("syscall %ld errno %d\n", nr, r < 0 ? errno : 0);
    return 0;
}
"#;

/// Compiles the probe statically into the fixture's rootfs.
fn install_probe(fx: &Fixture) {
    let src = fx.dir.path().join("probe.c");
    std::fs::write(&src, PROBE_C).expect("write probe.c");
    let out = std::process::Command::new("cc")
        .args(["-static", "-O2", "-pthread", "-o"])
        .arg(fx.rootfs.join("bin/probe"))
        .arg(&src)
        .output()
        .expect("cc (gcc and libc6-dev: .ci/run installs them)");
    assert!(out.status.success(), "cc: {}", String::from_utf8_lossy(&out.stderr));
}

#[test]
fn default_seccomp_profile_is_an_allowlist_that_keeps_libc_working() {
    let fx = Fixture::new();
    install_probe(&fx);
    let rt = fx.runtime();
    // 1000: no such syscall anywhere; 425: io_uring_setup (same number on
    // x86_64, aarch64 and arm), which Docker's profile refuses; 435: clone3.
    let script = "/bin/probe 1000; /bin/probe 425; /bin/probe 435; /bin/probe thread";
    let confined = cid("allowlist");
    create(&fx, &rt, &confined, &sh(script)).unwrap();
    assert_eq!(wait_exit(&rt, &confined, T).code, 0, "{}", fx.log(&confined));
    let log = fx.log(&confined);
    // Unnamed syscalls get EPERM, not the kernel's ENOSYS: nothing reaches it.
    assert!(log.contains(&format!("syscall 1000 errno {}", libc::EPERM)), "{log}");
    assert!(log.contains(&format!("syscall 425 errno {}", libc::EPERM)), "{log}");
    // clone3 says "not implemented", so glibc falls back to clone and threads work.
    assert!(log.contains(&format!("syscall 435 errno {}", libc::ENOSYS)), "{log}");
    assert!(log.contains("thread 0"), "{log}");

    // The same probes unconfined reach the kernel (positive control).
    let free = cid("noallowlist");
    let mut spec = sh(script);
    spec.security.seccomp_unconfined = true;
    create(&fx, &rt, &free, &spec).unwrap();
    assert_eq!(wait_exit(&rt, &free, T).code, 0, "{}", fx.log(&free));
    let log = fx.log(&free);
    assert!(log.contains(&format!("syscall 1000 errno {}", libc::ENOSYS)), "{log}");
    assert!(!log.contains(&format!("syscall 435 errno {}", libc::ENOSYS)), "{log}");
    assert!(log.contains("thread 0"), "{log}");
}

#[test]
fn exec_runs_inside_the_container_and_returns_output_and_code() {
    let fx = Fixture::new();
    let rt = fx.runtime();
    let id = cid("exec");
    let mut spec = sh("echo inside > /tmp/marker; while true; do sleep 0.1; done");
    spec.hostname = Some("box".into());
    create(&fx, &rt, &id, &spec).unwrap();
    wait_until("marker", T, || rt.exec(&id, &["/bin/cat".into(), "/tmp/marker".into()], T).is_ok_and(|o| o.code == 0));
    let out = rt
        .exec(&id, &["/bin/sh".into(), "-c".into(), "hostname; cat /tmp/marker; echo oops >&2; exit 5".into()], T)
        .unwrap();
    assert_eq!(out.code, 5);
    assert_eq!(String::from_utf8_lossy(&out.stdout), "box\ninside\n");
    assert_eq!(String::from_utf8_lossy(&out.stderr), "oops\n");
    let slow = rt.exec(&id, &["/bin/sleep".into(), "30".into()], Duration::from_millis(300)).unwrap();
    assert_eq!(slow.code, 137, "timeout not enforced");
    rt.kill(&id).unwrap();
    wait_exit(&rt, &id, T);
    assert!(rt.exec(&id, &["/bin/true".into()], T).is_err(), "exec into an exited container");
}

/// A shim killed with kill -9 leaves its container running, unsupervised:
/// the container is reported lost, and killing it (what the supervisor does
/// before it starts the next instance) ends what was left in its cgroup, so
/// that no replacement ever runs beside it.
#[test]
fn a_container_whose_shim_died_is_lost_and_killing_it_ends_what_it_left() {
    let fx = Fixture::new();
    let rt = fx.runtime();
    let id = cid("orphan");
    create(&fx, &rt, &id, &sh("sleep 300 & while true; do sleep 0.1; done")).unwrap();
    wait_until("running", T, || matches!(rt.state(&id), Ok(ContainerState::Running(_))));
    let Ok(ContainerState::Running(running)) = rt.state(&id) else { panic!("not running") };
    // Alive: in /proc and not a zombie.
    let alive = |pid: i32| {
        std::fs::read_to_string(format!("/proc/{pid}/stat"))
            .is_ok_and(|s| s.rsplit_once(')').is_some_and(|(_, rest)| !rest.trim_start().starts_with('Z')))
    };
    let shim: i32 = std::fs::read_to_string(fx.layout.run_state(&id).join("shim.pid")).unwrap().trim().parse().unwrap();
    nix::sys::signal::kill(nix::unistd::Pid::from_raw(shim), nix::sys::signal::Signal::SIGKILL).unwrap();
    wait_until("reported lost", T, || rt.state(&id).ok() == Some(ContainerState::Lost));
    assert!(alive(running.pid), "the container died with its shim");
    rt.kill(&id).unwrap();
    wait_until("the orphaned container gone", T, || !alive(running.pid));
    // And what its shim would have given back at its end: the rootfs mount.
    let bundle = fx.layout.container(&id);
    let mounts = std::fs::read_to_string("/proc/self/mountinfo").unwrap();
    assert!(!mounts.contains(&bundle.display().to_string()), "the lost container's rootfs is still mounted");
    assert_eq!(rt.state(&id).unwrap(), ContainerState::Lost, "a lost container stays lost (no exit record made up)");
    rt.remove(&id).unwrap();
    assert_eq!(rt.state(&id).unwrap(), ContainerState::Missing);
}

/// A shim someone stopped (SIGSTOP) still stops and kills its container
/// when asked: it is woken to act on the signal.
#[test]
fn a_stopped_shim_still_stops_its_container() {
    let fx = Fixture::new();
    let rt = fx.runtime();
    for (name, end) in [("stopped-stop", "stop"), ("stopped-kill", "kill")] {
        let id = cid(name);
        create(&fx, &rt, &id, &sh("while true; do sleep 0.1; done")).unwrap();
        wait_until("running", T, || matches!(rt.state(&id), Ok(ContainerState::Running(_))));
        let shim: i32 =
            std::fs::read_to_string(fx.layout.run_state(&id).join("shim.pid")).unwrap().trim().parse().unwrap();
        let shim = nix::unistd::Pid::from_raw(shim);
        nix::sys::signal::kill(shim, nix::sys::signal::Signal::SIGSTOP).unwrap();
        wait_until("the shim stopped", T, || {
            std::fs::read_to_string(format!("/proc/{shim}/stat"))
                .is_ok_and(|s| s.rsplit_once(')').is_some_and(|(_, rest)| rest.trim_start().starts_with('T')))
        });
        match end {
            "stop" => rt.stop(&id).unwrap(),
            _ => rt.kill(&id).unwrap(),
        }
        // Ends within the deadline, or wait_exit fails the test.
        wait_exit(&rt, &id, T);
    }
}

/// Workloads start as under Docker, with no signal ignored (the agent's
/// Rust runtime ignores SIGPIPE, and ignored signals survive exec): a pipe
/// whose reader left ends its writer quietly, by SIGPIPE. In an exec too.
#[test]
fn containers_and_execs_start_with_no_signal_ignored() {
    let fx = Fixture::new();
    let rt = fx.runtime();
    let id = cid("signals");
    let probe = "grep SigIgn /proc/self/status; (yes; echo yes-rc=$? >&2) | head -1 >/dev/null";
    create(&fx, &rt, &id, &sh(&format!("{probe}; while true; do sleep 0.1; done"))).unwrap();
    wait_until("the probe's lines", T, || fx.log(&id).contains("yes-rc="));
    let log = fx.log(&id);
    assert!(log.contains("SigIgn:\t0000000000000000"), "{log}");
    assert!(log.contains("yes-rc=141"), "yes did not end by SIGPIPE: {log}");
    let out = rt.exec(&id, &["/bin/sh".into(), "-c".into(), probe.into()], T).unwrap();
    let (stdout, stderr) = (String::from_utf8_lossy(&out.stdout), String::from_utf8_lossy(&out.stderr));
    assert!(stdout.contains("SigIgn:\t0000000000000000"), "{stdout}");
    assert!(stderr.contains("yes-rc=141"), "{stderr}");
    rt.kill(&id).unwrap();
    wait_exit(&rt, &id, T);
}

#[test]
fn user_workdir_env_hostname_and_cpu_limit_are_applied() {
    let fx = Fixture::new();
    let rt = fx.runtime();
    let id = cid("identity");
    let mut spec = sh(
        "echo uid=$(id -u) gid=$(id -g) cwd=$(pwd) greeting=$GREETING host=$(hostname); while true; do sleep 0.1; done",
    );
    spec.user = Some(User { uid: 1000, gid: 1000 });
    spec.working_dir = Some("/tmp".into());
    spec.env = vec![("GREETING".into(), "hello".into())];
    spec.hostname = Some("sensor-1".into());
    spec.resources.cpu_millis = Some(250);
    create(&fx, &rt, &id, &spec).unwrap();
    wait_until("identity line", T, || fx.log(&id).contains("uid="));
    let log = fx.log(&id);
    assert!(log.contains("uid=1000 gid=1000 cwd=/tmp greeting=hello host=sensor-1"), "{log}");
    // A quarter CPU: 25 ms of every 100 ms, in whichever cgroup version the host has.
    let cg = fx.layout.cgroup(&id);
    let v1 = std::fs::read_to_string(format!("/sys/fs/cgroup/cpu{cg}/cpu.cfs_quota_us")).ok();
    let v2 = std::fs::read_to_string(format!("/sys/fs/cgroup{cg}/cpu.max")).ok();
    match (v1, v2) {
        (Some(q), _) => assert_eq!(q.trim(), "25000"),
        (None, Some(max)) => assert_eq!(max.trim(), "25000 100000"),
        (None, None) => panic!("no cpu controller file for {cg}"),
    }
    rt.kill(&id).unwrap();
    wait_exit(&rt, &id, T);
}

#[test]
fn a_chatty_container_log_rotates_at_its_cap() {
    let fx = Fixture::new();
    let mut rt = fx.runtime();
    rt.log_max_bytes = 8192;
    let id = cid("chatty");
    create(&fx, &rt, &id, &sh("i=0; while [ $i -lt 2000 ]; do echo line-$i; i=$((i+1)); done")).unwrap();
    assert_eq!(wait_exit(&rt, &id, T).code, 0);
    let dir = fx.layout.container(&id);
    // Whether a `.1` exists depends on how the output fell across flushes;
    // the cap holds either way.
    let current = std::fs::metadata(dir.join("container.log")).unwrap().len();
    let rotated = std::fs::metadata(dir.join("container.log.1")).map_or(0, |m| m.len());
    assert!(current <= 8192 && rotated <= 8192, "{current} {rotated}");
    assert!(current + rotated < 2000 * 20, "nothing was dropped: the cap was not applied");
    assert!(fx.log(&id).contains("stdout line-1999"), "the last line is in the current file");
    assert!(!dir.join("container.log.2").exists(), "more than one old file kept");
}

/// A create that fails half-way, after libcontainer wrote its state (seen
/// with cgroups unreadable, as under `ip netns exec`, which remounts /sys),
/// leaves nothing behind: the same id is created once cgroups are back.
/// Before, every retry failed with "container already exists".
#[test]
fn a_create_that_fails_half_way_leaves_nothing_and_the_id_works_again() {
    use std::os::unix::fs::PermissionsExt;
    let fx = Fixture::new();
    // The shim, run where /sys/fs/cgroup is an empty read-only tmpfs.
    let wrapper = fx.dir.path().join("shim-without-cgroups");
    let script = format!(
        "#!/bin/sh\nexec unshare -m --propagation private sh -c 'umount -l /sys/fs/cgroup && exec \"$0\" \"$@\"' {} \"$@\"\n",
        env!("CARGO_BIN_EXE_baton-agent")
    );
    std::fs::write(&wrapper, script).unwrap();
    std::fs::set_permissions(&wrapper, std::fs::Permissions::from_mode(0o755)).unwrap();
    let broken = baton_agent::runtime::LibcontainerRuntime::new(fx.layout.clone(), wrapper);
    let id = cid("halfway");
    let err = create(&fx, &broken, &id, &sh("sleep 30")).unwrap_err();
    assert!(matches!(err, RuntimeError::Start { .. }), "{err}");
    assert!(!fx.layout.youki_root().join(&id).exists(), "libcontainer's state of the failed create is left");
    assert_eq!(broken.state(&id).unwrap(), ContainerState::Missing);

    let rt = fx.runtime();
    create(&fx, &rt, &id, &sh("echo second try; sleep 30")).unwrap();
    wait_until("the second try running", T, || fx.log(&id).contains("second try"));
    rt.kill(&id).unwrap();
    wait_exit(&rt, &id, T);
}

/// Tests that need no cgroup v2 controller: this host's v2 tree has none
/// but hugetlb (its memory, pids and cpu controllers are bound to v1).
const ON_CGROUP_V2: [&str; 9] = [
    "runs_to_completion_with_exit_code_and_logs_then_removes_cleanly",
    "exit_while_nobody_watches_is_recorded",
    "stop_escalates_to_sigkill_and_kill_is_immediate",
    "bad_specs_are_refused_and_leave_nothing_behind",
    "passed_through_device_works_and_others_are_denied",
    "volume_data_survives_replacing_the_container",
    "read_only_rootfs_refuses_writes_but_tmpfs_accepts_them",
    "exec_runs_inside_the_container_and_returns_output_and_code",
    "default_seccomp_profile_is_an_allowlist_that_keeps_libc_working",
];

/// Raspberry Pi OS mounts cgroup v2 only. This host is hybrid, so the same
/// tests run again in a mount namespace whose /sys/fs/cgroup is the v2 tree:
/// containers are created, run and removed there, device rules hold (an eBPF
/// program: `devfilter`), and no cgroup is left behind.
#[test]
fn on_cgroup_v2_containers_run_device_rules_hold_and_cgroups_are_removed() {
    assert!(nix::unistd::geteuid().is_root(), "container tests need root (CI runs them as root)");
    let exe = std::env::current_exe().expect("this test binary");
    let script = format!(
        "mount --make-rprivate / && umount -l /sys/fs/cgroup && mount -t cgroup2 none /sys/fs/cgroup \
         && [ \"$(stat -fc %T /sys/fs/cgroup)\" = cgroup2fs ] && exec {} --exact --test-threads 2 {}",
        exe.display(),
        ON_CGROUP_V2.join(" ")
    );
    let child = std::process::Command::new("unshare")
        .args(["-m", "sh", "-c", &script])
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .expect("unshare (util-linux)");
    let pid = child.id();
    let out = child.wait_with_output().expect("the v2 run");
    let text = format!("{}{}", String::from_utf8_lossy(&out.stdout), String::from_utf8_lossy(&out.stderr));
    assert!(out.status.success(), "on cgroup v2:\n{text}");
    assert!(text.contains(&format!("test result: ok. {} passed", ON_CGROUP_V2.len())), "{text}");
    // The tests' cgroups were made in the host's v2 tree; none is left.
    let prefix = format!("baton-test-{pid}-");
    for tree in ["/sys/fs/cgroup/unified", "/sys/fs/cgroup"] {
        let left: Vec<_> = std::fs::read_dir(tree)
            .into_iter()
            .flatten()
            .flatten()
            .filter(|e| e.file_name().to_string_lossy().starts_with(&prefix))
            .map(|e| e.path())
            .collect();
        assert!(left.is_empty(), "cgroups left behind: {left:?}");
    }
}

/// Raspberry Pi OS has cgroup v2 with its controllers; this host's v2 tree
/// has none of memory, pids or cpu. So every test above (limits included)
/// runs again in a VM with only cgroup v2 and those controllers enabled
/// (`common::vm`).
#[test]
fn in_a_cgroup_v2_vm_every_runtime_test_passes_limits_included() {
    let Some(out) = vm::run_this_binary_in_a_cgroup_v2_vm(&["in_a_cgroup_v2_vm", "on_cgroup_v2"]) else { return };
    for limits in [
        "memory_limit_oom_kill_is_reported",
        "pids_limit_stops_fork_bombs",
        "user_workdir_env_hostname_and_cpu_limit_are_applied",
        "passed_through_device_works_and_others_are_denied",
        "container_outlives_the_agent_and_is_readopted_without_restart",
    ] {
        assert!(out.contains(&format!("test {limits} ... ok")), "{limits} did not pass in the VM:\n{out}");
    }
}
