//! One agent per data dir and per cgroup parent. Two agents on one data dir
//! (the service, and the same binary run by hand to "have a look") would
//! both reconcile the same containers and fight over the device's MQTT
//! session; two on one cgroup parent would kill each other's containers as
//! orphans. So `run` takes a lock on each first, and a second agent is
//! refused with the pid of the one that holds it.
//!
//! The locks are POSIX record locks (`fcntl(F_SETLK)`), not `flock`: they
//! belong to the process, so the spawner and shims it forks never hold them
//! (a shim outlives the agent; with `flock` it would keep the next agent
//! out), and they go when the process exits or execs its successor (the fd
//! is close-on-exec; the successor takes them again). A holder that is on
//! its way out (a killed agent an upgrade watcher replaces) is waited for
//! up to `wait`.

use std::fs::File;
use std::os::fd::AsRawFd;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

/// Held for the agent's life.
#[derive(Debug)]
pub struct InstanceLock {
    _files: Vec<File>,
}

impl InstanceLock {
    pub fn take(data_dir: &Path, cgroup_parent: &str, wait: Duration) -> Result<Self, String> {
        std::fs::create_dir_all(data_dir).map_err(|e| format!("cannot create data dir {}: {e}", data_dir.display()))?;
        let data = lock(&data_dir.join("agent.lock"), wait)
            .map_err(|why| format!("data dir {}: {why}", data_dir.display()))?;
        let cgroups = lock(&cgroup_lock_path(cgroup_parent), wait)
            .map_err(|why| format!("cgroup parent {cgroup_parent}: {why}"))?;
        Ok(Self { _files: vec![data, cgroups] })
    }
}

/// Machine-wide (not in any data dir): `/run/lock/baton-agent+baton.lock`
/// for `/baton`.
pub fn cgroup_lock_path(cgroup_parent: &str) -> PathBuf {
    let dir = ["/run/lock", "/run"].into_iter().map(Path::new).find(|d| d.is_dir());
    let dir = dir.map_or_else(std::env::temp_dir, Path::to_path_buf);
    // '+' is not allowed in a cgroup parent (config.rs): no two parents share a name.
    dir.join(format!("baton-agent{}.lock", cgroup_parent.replace('/', "+")))
}

fn lock(path: &Path, wait: Duration) -> Result<File, String> {
    let file = File::options()
        .read(true)
        .write(true)
        .create(true)
        .truncate(false)
        .open(path)
        .map_err(|e| format!("cannot open {}: {e}", path.display()))?;
    let deadline = Instant::now() + wait;
    loop {
        match set_lock(&file) {
            Ok(()) => {
                // For people reading the file; the lock itself says who holds it.
                let _ = file.set_len(0);
                let _ = std::io::Write::write_all(&mut &file, format!("{}\n", std::process::id()).as_bytes());
                return Ok(file);
            }
            Err(e) if matches!(e.raw_os_error(), Some(libc::EAGAIN) | Some(libc::EACCES)) => {
                if Instant::now() >= deadline {
                    let holder =
                        holder(&file).map_or_else(|| "another process".to_string(), |pid| format!("pid {pid}"));
                    return Err(format!(
                        "another baton-agent ({holder}) runs with it ({} is locked); stop that one first, \
                         or give this one its own --data-dir and --cgroup-parent",
                        path.display()
                    ));
                }
                std::thread::sleep(Duration::from_millis(50));
            }
            Err(e) => return Err(format!("cannot lock {}: {e}", path.display())),
        }
    }
}

fn whole_file(kind: libc::c_short) -> libc::flock {
    // SAFETY: flock is a plain C struct; all-zero is a valid value.
    let mut l: libc::flock = unsafe { std::mem::zeroed() };
    l.l_type = kind;
    l.l_whence = libc::SEEK_SET as libc::c_short;
    l
}

fn set_lock(file: &File) -> std::io::Result<()> {
    let l = whole_file(libc::F_WRLCK as libc::c_short);
    // SAFETY: fcntl on an fd we own, with a valid flock.
    if unsafe { libc::fcntl(file.as_raw_fd(), libc::F_SETLK, &l) } == 0 {
        Ok(())
    } else {
        Err(std::io::Error::last_os_error())
    }
}

/// The pid holding a lock on `file`, if any.
fn holder(file: &File) -> Option<i32> {
    let mut l = whole_file(libc::F_WRLCK as libc::c_short);
    // SAFETY: fcntl on an fd we own, with a valid flock it fills in.
    let ok = unsafe { libc::fcntl(file.as_raw_fd(), libc::F_GETLK, &mut l) } == 0;
    (ok && l.l_type != libc::F_UNLCK as libc::c_short).then_some(l.l_pid)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn cgroup_parents_get_distinct_lock_files() {
        assert_ne!(cgroup_lock_path("/a/b"), cgroup_lock_path("/a_b"));
        assert!(cgroup_lock_path("/baton").display().to_string().ends_with("baton-agent+baton.lock"));
    }
}
