//! Fixtures for container tests: a busybox-static rootfs and a runtime in a temp dir.

#![allow(dead_code, clippy::unwrap_used)]

use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use baton_agent::runtime::{ContainerRuntime, ContainerState, ExitStatus, Layout, LibcontainerRuntime};

pub mod vm;

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
        // A cgroup parent of its own: tests run in parallel and reuse container names.
        static N: std::sync::atomic::AtomicU32 = std::sync::atomic::AtomicU32::new(0);
        let parent =
            format!("/baton-test-{}-{}", std::process::id(), N.fetch_add(1, std::sync::atomic::Ordering::Relaxed));
        let layout = Layout::new(dir.path().join("data"), dir.path().join("run")).with_cgroup_parent(parent);
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

/// Containers a test leaves behind are killed and removed, so no overlay
/// mount or cgroup outlives the test.
impl Drop for Fixture {
    fn drop(&mut self) {
        let rt = self.runtime();
        for id in rt.list().unwrap_or_default() {
            let _ = rt.kill(&id);
            let deadline = Instant::now() + Duration::from_secs(10);
            while matches!(rt.state(&id), Ok(ContainerState::Running(_))) && Instant::now() < deadline {
                std::thread::sleep(Duration::from_millis(20));
            }
            let _ = rt.remove(&id);
        }
        let parent = self.layout.cgroup_parent.trim_start_matches('/');
        for controller in std::fs::read_dir("/sys/fs/cgroup").into_iter().flatten().flatten() {
            let _ = std::fs::remove_dir(controller.path().join(parent));
        }
        // cgroup v2: one tree, the parent right under the root.
        let _ = std::fs::remove_dir(std::path::Path::new("/sys/fs/cgroup").join(parent));
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

/// Writes an OCI image layout for testing: each image is a list of layers,
/// each layer a list of (path, contents) files (`None` contents = whiteout
/// marker file created as given). Returns the layout dir.
pub mod layout {
    use std::io::Write;
    use std::path::{Path, PathBuf};

    use sha2::Digest as _;

    pub struct Blob {
        pub digest: String,
        pub size: u64,
    }

    pub fn put(dir: &Path, bytes: &[u8]) -> Blob {
        let hex: String = sha2::Sha256::digest(bytes).iter().map(|b| format!("{b:02x}")).collect();
        std::fs::create_dir_all(dir.join("blobs/sha256")).unwrap();
        std::fs::write(dir.join("blobs/sha256").join(&hex), bytes).unwrap();
        Blob { digest: format!("sha256:{hex}"), size: bytes.len() as u64 }
    }

    /// A gzipped tar layer from a directory tree on disk plus extra files.
    pub fn layer_from(base: Option<&Path>, files: &[(&str, &[u8])]) -> Vec<u8> {
        let gz = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::fast());
        let mut b = tar::Builder::new(gz);
        b.follow_symlinks(false);
        if let Some(base) = base {
            b.append_dir_all(".", base).unwrap();
        }
        append_files(&mut b, files);
        let mut gz = b.into_inner().unwrap();
        gz.flush().unwrap();
        gz.finish().unwrap()
    }

    /// Regular files (mode 0644) into a tar stream.
    fn append_files<W: Write>(b: &mut tar::Builder<W>, files: &[(&str, &[u8])]) {
        for (path, data) in files {
            let mut h = tar::Header::new_gnu();
            h.set_path(path).unwrap();
            h.set_size(data.len() as u64);
            h.set_mode(0o644);
            h.set_cksum();
            b.append(&h, *data).unwrap();
        }
    }

    /// A zstd-compressed tar layer holding `files`.
    pub fn zstd_layer(files: &[(&str, &[u8])]) -> Vec<u8> {
        let mut b = tar::Builder::new(Vec::new());
        append_files(&mut b, files);
        let tar = b.into_inner().unwrap();
        ruzstd::encoding::compress_to_vec(&tar[..], ruzstd::encoding::CompressionLevel::Fastest)
    }

    /// Stores config + manifest for `layers` (already stored blobs); returns the manifest blob.
    pub fn image(dir: &Path, arch: &str, layers: &[&Blob]) -> Blob {
        let config = serde_json::json!({
            "architecture": arch, "os": "linux",
            "config": {"Cmd": ["/bin/sh"], "Env": ["PATH=/bin"]},
            "rootfs": {"type": "layers", "diff_ids": []},
        });
        let config = put(dir, config.to_string().as_bytes());
        let manifest = serde_json::json!({
            "schemaVersion": 2,
            "mediaType": "application/vnd.oci.image.manifest.v1+json",
            "config": {"mediaType": "application/vnd.oci.image.config.v1+json", "digest": config.digest, "size": config.size},
            "layers": layers.iter().map(|l| serde_json::json!({
                "mediaType": "application/vnd.oci.image.layer.v1.tar+gzip", "digest": l.digest, "size": l.size,
            })).collect::<Vec<_>>(),
        });
        put(dir, manifest.to_string().as_bytes())
    }

    /// index.json naming `manifests` (with platforms when given) under `name`.
    pub fn index(dir: &Path, name: &str, manifests: &[(&Blob, Option<&str>)]) -> PathBuf {
        let entries: Vec<serde_json::Value> = manifests
            .iter()
            .map(|(m, arch)| {
                let mut d = serde_json::json!({
                    "mediaType": "application/vnd.oci.image.manifest.v1+json", "digest": m.digest, "size": m.size,
                    "annotations": {"org.opencontainers.image.ref.name": name},
                });
                if let Some(arch) = arch {
                    d["platform"] = serde_json::json!({"architecture": arch, "os": "linux"});
                }
                d
            })
            .collect();
        std::fs::write(dir.join("oci-layout"), r#"{"imageLayoutVersion":"1.0.0"}"#).unwrap();
        std::fs::write(
            dir.join("index.json"),
            serde_json::json!({"schemaVersion": 2, "manifests": entries}).to_string(),
        )
        .unwrap();
        dir.to_path_buf()
    }

    /// The OCI architecture name of this machine.
    pub fn here() -> &'static str {
        match std::env::consts::ARCH {
            "x86_64" => "amd64",
            "aarch64" => "arm64",
            other => other,
        }
    }
}
