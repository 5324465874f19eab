//! The controller's data dir is one controller's: `baton server` holds an
//! exclusive lock on `DATA_DIR/controller.lock` while it runs, so a second
//! controller (or `baton restore`) on the same dir is refused instead of
//! corrupting the store.

use std::path::Path;

/// Held for as long as the data dir is in use; released when dropped (or
/// when the process dies: the kernel drops flock locks with the file).
pub struct DataDirLock {
    _file: std::fs::File,
}

impl DataDirLock {
    pub fn take(data_dir: &Path) -> anyhow::Result<Self> {
        use std::os::fd::AsRawFd;
        let path = data_dir.join("controller.lock");
        let file = std::fs::OpenOptions::new()
            .create(true)
            .truncate(false)
            .write(true)
            .open(&path)
            .map_err(|e| anyhow::anyhow!("cannot open {}: {e}", path.display()))?;
        // SAFETY: flock(2) on a descriptor this function owns.
        if unsafe { libc::flock(file.as_raw_fd(), libc::LOCK_EX | libc::LOCK_NB) } != 0 {
            anyhow::bail!(
                "{} is in use by a running controller (stop it first; two controllers never share a data dir)",
                data_dir.display()
            );
        }
        Ok(Self { _file: file })
    }
}

/// Test-only kill points: with `BATON_FAILPOINT=NAME` in its environment
/// the controller kills itself (SIGKILL, as a crash or `kill -9` would) when
/// it reaches NAME — e.g. `apply:committed` (an apply stored, its documents
/// not yet published). Unset (always, in production): nothing.
pub fn failpoint(name: &str) {
    static POINT: std::sync::OnceLock<Option<String>> = std::sync::OnceLock::new();
    if POINT.get_or_init(|| std::env::var("BATON_FAILPOINT").ok()).as_deref() == Some(name) {
        // SAFETY: kill(2) on our own pid.
        unsafe { libc::kill(std::process::id() as i32, libc::SIGKILL) };
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn one_holder_at_a_time() {
        let dir = tempfile::tempdir().unwrap();
        let first = DataDirLock::take(dir.path()).unwrap();
        let second = DataDirLock::take(dir.path()).err().expect("a second holder was let in");
        assert!(second.to_string().contains("in use by a running controller"), "{second}");
        drop(first);
        DataDirLock::take(dir.path()).unwrap();
    }
}
