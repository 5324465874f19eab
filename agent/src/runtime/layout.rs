//! Where container state lives. Flash (`data_dir`) holds what must survive a
//! reboot or an agent upgrade: specs, exit records, logs, volumes. tmpfs
//! (`run_dir`) holds libcontainer's own state, which is meaningless after a reboot.

use std::path::{Path, PathBuf};

#[derive(Debug, Clone)]
pub struct Layout {
    pub data_dir: PathBuf,
    pub run_dir: PathBuf,
    /// The cgroup every container of this agent lives under. Two agents on
    /// one host (tests, simulations) must not share it: deleting a container
    /// kills every process in its cgroup.
    pub cgroup_parent: String,
}

pub const DEFAULT_CGROUP_PARENT: &str = "/baton";

impl Layout {
    pub fn new(data_dir: impl Into<PathBuf>, run_dir: impl Into<PathBuf>) -> Self {
        Self { data_dir: data_dir.into(), run_dir: run_dir.into(), cgroup_parent: DEFAULT_CGROUP_PARENT.into() }
    }

    pub fn with_cgroup_parent(mut self, parent: impl Into<String>) -> Self {
        self.cgroup_parent = parent.into();
        self
    }

    pub fn containers(&self) -> PathBuf {
        self.data_dir.join("containers")
    }

    /// The OCI bundle (config.json) and the shim's files for one container.
    pub fn container(&self, id: &str) -> PathBuf {
        self.containers().join(id)
    }

    /// Named volumes: kept across container replacement and agent upgrades.
    pub fn volume(&self, name: &str) -> PathBuf {
        self.data_dir.join("volumes").join(name)
    }

    /// A container's state that must not outlive a reboot (tmpfs).
    pub fn run_state(&self, id: &str) -> PathBuf {
        self.run_dir.join("containers").join(id)
    }

    /// The files a spec asks for (config files, later secrets), one per index,
    /// bind-mounted read-only: on tmpfs, so nothing of them reaches flash.
    pub fn container_files(&self, id: &str) -> PathBuf {
        self.run_state(id).join("files")
    }

    /// libcontainer's state root.
    pub fn youki_root(&self) -> PathBuf {
        self.run_dir.join("youki")
    }

    /// Absolute cgroup path of a container, under this agent's parent.
    pub fn cgroup(&self, id: &str) -> String {
        format!("{}/{id}", self.cgroup_parent.trim_end_matches('/'))
    }
}

/// Files inside a container directory.
pub mod files {
    pub const CONFIG: &str = "config.json";
    pub const SHIM_PID: &str = "shim.pid";
    pub const RUNNING: &str = "running.json";
    pub const EXIT: &str = "exit.json";
    pub const PROVENANCE: &str = "provenance.json";
    pub const LOG: &str = "container.log";
    pub const SHIM_LOG: &str = "shim.log";
}

/// `write_atomic` for owner-only files (keys, passwords): the temp file is
/// created 0600, so the bytes are never readable by others, even briefly.
pub fn write_private(path: &Path, bytes: &[u8]) -> std::io::Result<()> {
    use std::io::Write;
    use std::os::unix::fs::OpenOptionsExt;
    if let Some(dir) = path.parent() {
        std::fs::create_dir_all(dir)?;
    }
    let tmp = path.with_extension("new");
    let _ = std::fs::remove_file(&tmp);
    let mut f = std::fs::OpenOptions::new().write(true).create_new(true).mode(0o600).open(&tmp)?;
    f.write_all(bytes)?;
    f.sync_all()?;
    std::fs::rename(&tmp, path)
}

/// Whether `dir` (created if missing) is on a memory filesystem.
pub fn is_tmpfs(dir: &Path) -> bool {
    std::fs::create_dir_all(dir).is_ok()
        && nix::sys::statfs::statfs(dir).is_ok_and(|s| s.filesystem_type() == nix::sys::statfs::TMPFS_MAGIC)
}

/// Writes `bytes` to `path` so that a reader sees the old or the new file,
/// never a torn one, even across power loss: temp file, fsync, rename, fsync dir.
pub fn write_atomic(path: &Path, bytes: &[u8]) -> std::io::Result<()> {
    use std::io::Write;
    let dir = path.parent().unwrap_or(Path::new("."));
    let name = path.file_name().and_then(|n| n.to_str()).unwrap_or("file");
    let tmp = dir.join(format!(".{name}.tmp"));
    {
        let mut f = std::fs::File::create(&tmp)?;
        f.write_all(&bytes[..bytes.len() / 2])?;
        failpoint(name, "torn");
        f.write_all(&bytes[bytes.len() / 2..])?;
        f.sync_all()?;
    }
    failpoint(name, "written");
    std::fs::rename(&tmp, path)?;
    failpoint(name, "renamed");
    std::fs::File::open(dir)?.sync_all()
}

/// Test-only kill points: with `BATON_FAILPOINT=FILE:STAGE` in its
/// environment, a process writing FILE through `write_atomic` kills itself
/// (SIGKILL, as a power cut or `kill -9` would) at STAGE — `torn` (half the
/// temp file written), `written` (temp file whole, not renamed) or `renamed`
/// (in place, directory not synced). With `BATON_FAILPOINT_ONCE=PATH` too,
/// only the first process to reach it dies, and creates PATH (one power cut,
/// not one per restart). Unset (always, on a device): nothing.
pub(crate) fn failpoint(file: &str, stage: &str) {
    static POINT: std::sync::OnceLock<Option<String>> = std::sync::OnceLock::new();
    let point = POINT.get_or_init(|| std::env::var("BATON_FAILPOINT").ok());
    if point.as_deref().is_some_and(|p| p.split_once(':') == Some((file, stage))) {
        if let Some(once) = std::env::var_os("BATON_FAILPOINT_ONCE") {
            if std::fs::OpenOptions::new().write(true).create_new(true).open(once).is_err() {
                return;
            }
        }
        // SAFETY: kill(2) on our own pid.
        unsafe { libc::kill(std::process::id() as i32, libc::SIGKILL) };
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn atomic_write_replaces_whole_file() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("exit.json");
        write_atomic(&p, b"first").unwrap();
        write_atomic(&p, b"second").unwrap();
        assert_eq!(std::fs::read(&p).unwrap(), b"second");
        assert_eq!(std::fs::read_dir(dir.path()).unwrap().count(), 1, "temp file left behind");
    }
}
