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
