//! Fixtures for container tests: a busybox-static rootfs and a runtime in a temp dir.

#![allow(dead_code, clippy::unwrap_used)]

use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use baton_agent::runtime::{ContainerRuntime, ContainerState, ExitStatus, Layout, LibcontainerRuntime};

pub const BUSYBOX: &str = "/bin/busybox";

/// Builds a minimal rootfs from Debian's busybox-static.
pub fn busybox_rootfs(dir: &Path) -> PathBuf {
    let root = dir.join("rootfs");
    for d in ["bin", "dev", "proc", "sys", "tmp", "etc", "data"] {
        std::fs::create_dir_all(root.join(d)).unwrap();
    }
    assert!(Path::new(BUSYBOX).exists(), "{BUSYBOX} missing: apt-get install busybox-static");
    std::fs::copy(BUSYBOX, root.join("bin/busybox")).unwrap();
    for applet in [
        "sh", "sleep", "echo", "cat", "true", "false", "ls", "touch", "head", "yes", "seq", "wc", "id", "hostname",
        "env", "mknod", "dd", "grep", "kill", "mkdir", "rm", "unshare", "httpd",
    ] {
        std::os::unix::fs::symlink("busybox", root.join("bin").join(applet)).unwrap();
    }
    std::fs::write(root.join("etc/passwd"), "root:x:0:0:root:/:/bin/sh\nnobody:x:65534:65534:nobody:/:/bin/sh\n")
        .unwrap();
    root
}

pub struct Fixture {
    pub dir: tempfile::TempDir,
    pub rootfs: PathBuf,
    pub layout: Layout,
}

impl Fixture {
    pub fn new() -> Fixture {
        assert!(nix::unistd::geteuid().is_root(), "container tests need root (CI runs them as root)");
        let dir = tempfile::Builder::new().prefix("baton-rt-").tempdir().unwrap();
        let rootfs = busybox_rootfs(dir.path());
        let layout = Layout::new(dir.path().join("data"), dir.path().join("run"));
        Fixture { dir, rootfs, layout }
    }

    /// A runtime as a (re)started agent would build it.
    pub fn runtime(&self) -> LibcontainerRuntime {
        let mut rt = LibcontainerRuntime::new(self.layout.clone(), PathBuf::from(env!("CARGO_BIN_EXE_baton-agent")));
        rt.stop_grace = Duration::from_millis(500);
        rt.log_flush = Duration::from_millis(50);
        rt
    }

    pub fn log(&self, id: &str) -> String {
        std::fs::read_to_string(self.layout.container(id).join("container.log")).unwrap_or_default()
    }
}

/// A container id unique to this test process.
pub fn cid(name: &str) -> String {
    format!("t{}-{name}", std::process::id())
}

pub fn wait_exit(rt: &dyn ContainerRuntime, id: &str, timeout: Duration) -> ExitStatus {
    let deadline = Instant::now() + timeout;
    loop {
        match rt.state(id).unwrap() {
            ContainerState::Exited(e) => return e,
            other => assert!(Instant::now() < deadline, "{id} did not exit within {timeout:?}: {other:?}"),
        }
        std::thread::sleep(Duration::from_millis(20));
    }
}

pub fn wait_until(what: &str, timeout: Duration, mut f: impl FnMut() -> bool) {
    let deadline = Instant::now() + timeout;
    while !f() {
        assert!(Instant::now() < deadline, "timed out after {timeout:?} waiting for {what}");
        std::thread::sleep(Duration::from_millis(20));
    }
}

pub fn sh(script: &str) -> baton_protocol::spec::ContainerSpec {
    baton_protocol::spec::ContainerSpec {
        command: vec!["/bin/sh".into(), "-c".into(), script.into()],
        ..Default::default()
    }
}
