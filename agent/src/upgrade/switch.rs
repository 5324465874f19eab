//! The A/B layout on disk and the steps that switch agents, each safe to
//! cut at any point (power loss, `kill -9`): what a restart finds is either
//! the old agent, the new one on trial, or the new one committed.
//!
//! ```text
//! <data_dir>/bin/releases/baton-agent-<version>-<sha256 12 hex>   each build kept (current and previous)
//! <data_dir>/bin/current  -> releases/…    what the service starts (the entry point links here)
//! <data_dir>/bin/previous -> releases/…    the build before, to go back to
//! <data_dir>/upgrade/state.json            `plan::Marker`: the last upgrade and where it stands
//! <data_dir>/upgrade/ok                    the new agent's sign of life (its version)
//! <data_dir>/upgrade/<sha256 hex>.part     a download in progress
//! ```
//!
//! The service manager (systemd's unit from `cross/install.sh`, or any that
//! restarts the agent when it exits) starts the entry point, which links to
//! `current`; `current` moves to a new build only once that build came
//! online. The switch: the old agent stages the new build, writes the marker
//! (`Trying`), starts a watcher from its own binary, and replaces itself
//! (`exec`, same pid) with the new build on trial. The new build leaves
//! `upgrade/ok` once it is connected and running; the watcher then flips
//! `previous` and `current` and marks `Upgraded`. If the new build exits,
//! the service manager starts `current` — still the old build — which reads
//! the marker and rolls back; if it hangs past the deadline, the watcher
//! marks the rollback and kills it, with the same result. Nothing here
//! depends on the new build working.

use std::io;
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};

use baton_protocol::crypto::hex;
use sha2::{Digest, Sha256};

use super::plan::{AtStart, Marker, MarkerPhase, Watch};
use crate::runtime::layout::{failpoint, write_atomic};

/// How long the watcher waits for the old agent to become the new one (`exec`).
const EXEC_GRACE: std::time::Duration = std::time::Duration::from_secs(10);

/// Set in the new build's environment by the old one: "you are on trial".
pub const TRIAL_ENV: &str = "BATON_UPGRADE_TRIAL";

#[derive(Debug, Clone)]
pub struct Paths {
    pub bin: PathBuf,
    pub releases: PathBuf,
    pub current: PathBuf,
    pub previous: PathBuf,
    pub upgrade: PathBuf,
    pub marker: PathBuf,
    pub ok: PathBuf,
}

impl Paths {
    pub fn new(data_dir: &Path) -> Self {
        let bin = data_dir.join("bin");
        let upgrade = data_dir.join("upgrade");
        Paths {
            releases: bin.join("releases"),
            current: bin.join("current"),
            previous: bin.join("previous"),
            marker: upgrade.join("state.json"),
            ok: upgrade.join("ok"),
            bin,
            upgrade,
        }
    }

    pub fn part(&self, digest: &[u8]) -> PathBuf {
        self.upgrade.join(format!("{}.part", hex(digest)))
    }

    pub fn release(&self, name: &str) -> PathBuf {
        self.releases.join(name)
    }
}

/// `baton-agent-<version>-<first 12 hex digits of its SHA-256>`.
pub fn release_name(version: &str, digest: &[u8]) -> String {
    let h = hex(digest);
    format!("baton-agent-{version}-{}", &h[..h.len().min(12)])
}

/// The version in a release's file name.
pub fn version_of(name: &str) -> Option<&str> {
    let rest = name.strip_prefix("baton-agent-")?;
    let (version, hash) = rest.rsplit_once('-')?;
    (hash.len() == 12 && !version.is_empty()).then_some(version)
}

/// The release a link (`current`, `previous`) names, if any.
pub fn linked(link: &Path) -> Option<String> {
    let target = std::fs::read_link(link).ok()?;
    target.file_name()?.to_str().map(str::to_owned)
}

pub fn read_marker(paths: &Paths) -> Option<Marker> {
    let bytes = std::fs::read(&paths.marker).ok()?;
    serde_json::from_slice(&bytes).ok()
}

pub fn write_marker(paths: &Paths, m: &Marker) -> io::Result<()> {
    std::fs::create_dir_all(&paths.upgrade)?;
    write_atomic(&paths.marker, &serde_json::to_vec_pretty(m).map_err(io::Error::other)?)
}

/// Whether the new build `version` left its sign of life.
pub fn confirmed(paths: &Paths, version: &str) -> bool {
    std::fs::read_to_string(&paths.ok).is_ok_and(|v| v.trim() == version)
}

/// The new build's sign of life: it is connected and runs its workloads.
pub fn confirm(paths: &Paths, version: &str) -> io::Result<()> {
    write_atomic(&paths.ok, version.as_bytes())
}

pub fn sha256_file(path: &Path) -> io::Result<Vec<u8>> {
    let mut f = std::fs::File::open(path)?;
    let mut h = Sha256::new();
    io::copy(&mut f, &mut h)?;
    Ok(h.finalize().to_vec())
}

/// `path` with every link resolved, as /proc shows executables (or as given).
fn canonical(path: &Path) -> PathBuf {
    std::fs::canonicalize(path).unwrap_or_else(|_| path.to_owned())
}

fn sync_dir(dir: &Path) -> io::Result<()> {
    std::fs::File::open(dir)?.sync_all()
}

/// Points `link` at `releases/<name>`: a new symlink renamed over the old
/// one (atomic), then the directory synced. Kill points `<link>:linked`
/// (the new link made, not in place) and `<link>:flipped` (in place, not synced).
fn flip(link: &Path, name: &str) -> io::Result<()> {
    let dir = link.parent().unwrap_or(Path::new("."));
    let file = link.file_name().and_then(|n| n.to_str()).unwrap_or("link");
    let tmp = dir.join(format!(".{file}.tmp"));
    let _ = std::fs::remove_file(&tmp);
    std::os::unix::fs::symlink(Path::new("releases").join(name), &tmp)?;
    failpoint(file, "linked");
    std::fs::rename(&tmp, link)?;
    failpoint(file, "flipped");
    sync_dir(dir)
}

/// Makes sure the running agent is in the layout: its binary under
/// `releases/`, `current` naming it, and `entry` (the path the service
/// manager starts, when it is not a link into the layout already) a link to
/// `current`. A device installed before the layout existed moves into it
/// here, at its first upgrade. Returns the running build's release name.
pub fn adopt(paths: &Paths, exe: &Path, entry: &Path, version: &str) -> io::Result<String> {
    std::fs::create_dir_all(&paths.releases)?;
    if let Some(name) = exe.strip_prefix(&paths.releases).ok().and_then(|n| n.to_str()) {
        if linked(&paths.current).is_none() {
            flip(&paths.current, name)?;
        }
        return Ok(name.to_owned());
    }
    check_entry(paths, exe, entry).map_err(io::Error::other)?;
    // Not started from the layout: copy this binary in (it may have been
    // replaced on disk since it started: /proc/self/exe is the one running).
    let digest = sha256_file(Path::new("/proc/self/exe"))?;
    let name = release_name(version, &digest);
    let dest = paths.release(&name);
    if !dest.exists() {
        let tmp = paths.releases.join(format!(".{name}.tmp"));
        std::fs::copy("/proc/self/exe", &tmp)?;
        std::fs::set_permissions(&tmp, std::fs::Permissions::from_mode(0o755))?;
        std::fs::File::open(&tmp)?.sync_all()?;
        std::fs::rename(&tmp, &dest)?;
        sync_dir(&paths.releases)?;
    }
    flip(&paths.current, &name)?;
    // The entry point becomes a link to `current`, renamed over the file (the
    // running process keeps its inode).
    let entry_dir = exe.parent().unwrap_or(Path::new("/"));
    let entry_name = exe.file_name().and_then(|n| n.to_str()).unwrap_or("baton-agent");
    let tmp = entry_dir.join(format!(".{entry_name}.tmp"));
    let _ = std::fs::remove_file(&tmp);
    std::os::unix::fs::symlink(&paths.current, &tmp)
        .map_err(|e| io::Error::new(e.kind(), format!("cannot take over the entry point {}: {e}", exe.display())))?;
    std::fs::rename(&tmp, exe)?;
    sync_dir(entry_dir)?;
    tracing::info!(entry = %exe.display(), release = %name, "moved into the A/B layout: the entry point now links to bin/current");
    Ok(name)
}

/// Whether an agent running from `exe` can move into the A/B layout: it
/// runs from it already, or from `entry`, the file its service manager
/// starts. Never a build tree's output, nor a binary other agents run too.
pub fn check_entry(paths: &Paths, exe: &Path, entry: &Path) -> Result<(), String> {
    let same = |a: &Path, b: &Path| a == b || std::fs::canonicalize(a).ok() == std::fs::canonicalize(b).ok();
    if exe.starts_with(&paths.releases) || same(exe, entry) {
        return Ok(());
    }
    Err(format!(
        "this agent runs from {}, which is neither its A/B layout ({}) nor agent_entry ({}): an upgrade replaces only the file the service manager starts; set agent_entry to that file, or install with cross/install.sh",
        exe.display(),
        paths.releases.display(),
        entry.display()
    ))
}

/// Moves a verified download into `releases/` under `name`, executable.
pub fn stage(paths: &Paths, part: &Path, name: &str) -> io::Result<PathBuf> {
    std::fs::set_permissions(part, std::fs::Permissions::from_mode(0o755))?;
    std::fs::File::open(part)?.sync_all()?;
    std::fs::create_dir_all(&paths.releases)?;
    let dest = paths.release(name);
    std::fs::rename(part, &dest)?;
    sync_dir(&paths.releases)?;
    Ok(dest)
}

/// Starts the trial of the staged build named in the marker: counts the
/// attempt, starts the watcher from the old build's binary, and replaces
/// this process with the new build (same pid, same arguments). Returns only
/// if that could not be done.
pub fn hand_over(paths: &Paths, data_dir: &Path) -> io::Error {
    use std::os::unix::process::CommandExt;
    let Some(mut m) = read_marker(paths).filter(|m| m.phase == MarkerPhase::Trying) else {
        return io::Error::other("no upgrade staged");
    };
    let (from, to) = (paths.release(&m.from), paths.release(&m.to));
    m.attempts += 1;
    let _ = std::fs::remove_file(&paths.ok);
    if let Err(e) = write_marker(paths, &m) {
        return e;
    }
    let watcher = std::process::Command::new(&from)
        .arg("upgrade-watch")
        .arg("--data-dir")
        .arg(data_dir)
        .arg("--pid")
        .arg(std::process::id().to_string())
        .stdin(std::process::Stdio::null())
        .spawn();
    let watcher = match watcher {
        Ok(child) => child.id(),
        Err(e) => return io::Error::new(e.kind(), format!("cannot start the upgrade watcher {}: {e}", from.display())),
    };
    failpoint("handover", "watching");
    tracing::info!(from = %m.from, to = %m.to, attempt = m.attempts, "handing over to the new agent on trial");
    let args: Vec<_> = std::env::args_os().skip(1).collect();
    std::process::Command::new(&to).args(args).env(TRIAL_ENV, &m.version).env(WATCHER_ENV, watcher.to_string()).exec()
}

/// Set on the build `at_start` execs: that process's start is the same start.
const EXECD_ENV: &str = "BATON_UPGRADE_EXECD";

/// The watcher's pid, for the new agent: the watcher is its child (started
/// by the process it replaced), and it reaps it once it exits.
pub const WATCHER_ENV: &str = "BATON_UPGRADE_WATCHER";

static WATCHER: std::sync::atomic::AtomicI32 = std::sync::atomic::AtomicI32::new(0);

/// Takes the watcher's pid from the environment (call once, at start,
/// before threads: shims and execs must not inherit it).
pub fn take_watcher_env() {
    if let Some(pid) = std::env::var(WATCHER_ENV).ok().and_then(|v| v.parse::<i32>().ok()) {
        WATCHER.store(pid, std::sync::atomic::Ordering::Relaxed);
    }
    std::env::remove_var(WATCHER_ENV);
}

/// Reaps the watcher if it has exited (no zombie left behind it); cheap
/// and idempotent, called about once a second.
pub fn reap_watcher() {
    use nix::sys::wait::{waitpid, WaitPidFlag, WaitStatus};
    let pid = WATCHER.load(std::sync::atomic::Ordering::Relaxed);
    if pid <= 0 {
        return;
    }
    match waitpid(nix::unistd::Pid::from_raw(pid), Some(WaitPidFlag::WNOHANG)) {
        Ok(WaitStatus::StillAlive) => {}
        // Exited and reaped, or not (or no longer) this process's child.
        _ => WATCHER.store(0, std::sync::atomic::Ordering::Relaxed),
    }
}

/// Makes the tried build current (`previous` first, then `current`, then the
/// marker: a cut anywhere is finished by the next start).
pub fn commit(paths: &Paths, m: &mut Marker) -> io::Result<()> {
    if linked(&paths.current).as_deref() != Some(&m.to) {
        flip(&paths.previous, &m.from)?;
    }
    flip(&paths.current, &m.to)?;
    m.phase = MarkerPhase::Upgraded;
    m.detail.clear();
    // On probation until it has stayed up a while (`plan::STABLE_AFTER`).
    m.restarts = 0;
    m.stable = false;
    write_marker(paths, m)?;
    let _ = std::fs::remove_file(&paths.ok);
    prune(paths);
    Ok(())
}

/// A new build that came online but kept stopping: `current` goes back to
/// the old build (kept as `from`), `previous` names the new one.
pub fn go_back(paths: &Paths, m: &mut Marker, why: String) -> io::Result<()> {
    flip(&paths.previous, &m.to)?;
    flip(&paths.current, &m.from)?;
    m.phase = MarkerPhase::RolledBack;
    m.detail = why;
    write_marker(paths, m)
}

/// Marks the trial failed; `current` never moved, so the old build runs next.
pub fn roll_back(paths: &Paths, m: &mut Marker, why: String) -> io::Result<()> {
    m.phase = MarkerPhase::RolledBack;
    m.detail = why;
    write_marker(paths, m)
}

/// Deletes releases that are neither `current` nor `previous` (running
/// shims started from them keep their inode).
fn prune(paths: &Paths) {
    let keep = [linked(&paths.current), linked(&paths.previous)];
    let Ok(entries) = std::fs::read_dir(&paths.releases) else { return };
    for e in entries.flatten() {
        let name = e.file_name().to_string_lossy().into_owned();
        if !keep.iter().any(|k| k.as_deref() == Some(name.as_str())) {
            let _ = std::fs::remove_file(e.path());
        }
    }
}

/// What a starting agent does first (before anything else runs): finish a
/// switch that was cut, roll back a trial that failed, or start one that
/// was staged. Returns only when this agent should run.
pub fn at_start(data_dir: &Path, on_trial: bool) {
    let paths = Paths::new(data_dir);
    // Exec'd by the start just before this one (below): not a start of its own.
    let execd = std::env::var_os(EXECD_ENV).is_some();
    std::env::remove_var(EXECD_ENV);
    let Some(mut m) = read_marker(&paths) else { return };
    let action = super::plan::at_start(Some(&m), on_trial || execd, confirmed(&paths, &m.version));
    let (going_back, committing) = (matches!(action, AtStart::GoBack(_)), action == AtStart::Commit);
    let done = match action {
        AtStart::Run => return,
        AtStart::HandOver => Err(hand_over(&paths, data_dir)),
        AtStart::Commit => commit(&paths, &mut m),
        AtStart::RollBack(why) => {
            tracing::warn!(version = %m.version, reason = %why, "agent upgrade rolled back");
            roll_back(&paths, &mut m, why)
        }
        AtStart::CountStart => {
            m.restarts += 1;
            tracing::warn!(version = %m.version, restarts = m.restarts, "the new agent stopped before it was stable; on probation");
            write_marker(&paths, &m)
        }
        AtStart::GoBack(why) => {
            tracing::warn!(version = %m.version, reason = %why, "agent upgrade rolled back after it came online");
            go_back(&paths, &mut m, why)
        }
    };
    if let Err(e) = done {
        tracing::error!(error = %e, "cannot finish the agent upgrade on record; running this agent");
        return;
    }
    // Run what `current` names, if that is not this process: the committed
    // build, or the old one gone back to.
    let run = match m.phase {
        MarkerPhase::Upgraded if committing => Some(&m.to),
        MarkerPhase::RolledBack if going_back => Some(&m.from),
        _ => None,
    };
    if let Some(name) = run {
        let me = std::env::current_exe().ok();
        if me.as_deref() != Some(canonical(&paths.release(name)).as_path()) {
            use std::os::unix::process::CommandExt;
            let args: Vec<_> = std::env::args_os().skip(1).collect();
            let e = std::process::Command::new(paths.release(name)).args(args).env(EXECD_ENV, "1").exec();
            tracing::error!(error = %e, "cannot start the agent `current` names; running this one");
        }
    }
}

/// `baton-agent upgrade-watch`: run from the old build's binary while the
/// new one (pid `pid`) is on trial. Commits when it comes online; when it
/// is gone or past the deadline, marks the rollback (and kills it) so the
/// service manager brings the old build back.
pub fn watch(data_dir: &Path, pid: u32) -> io::Result<()> {
    let paths = Paths::new(data_dir);
    let started = std::time::Instant::now();
    loop {
        let Some(mut m) = read_marker(&paths).filter(|m| m.phase == MarkerPhase::Trying) else {
            return Ok(()); // finished by someone else (a restarted agent)
        };
        let to = canonical(&paths.release(&m.to));
        // The old agent may not have replaced itself yet when this starts:
        // its pid runs another binary for a moment (never 10 s).
        let exe = std::fs::read_link(format!("/proc/{pid}/exe"));
        let alive = exe.is_ok_and(|exe| exe == to || started.elapsed() < EXEC_GRACE);
        let ok = confirmed(&paths, &m.version);
        match super::plan::watch(ok, alive, started.elapsed().as_millis() as u64, m.deadline_s) {
            Watch::Wait => std::thread::sleep(std::time::Duration::from_millis(500)),
            Watch::Commit => {
                commit(&paths, &mut m)?;
                eprintln!("baton-agent upgrade-watch: {} came online; it is now current", m.version);
                return Ok(());
            }
            Watch::Gone => {
                let why = format!("the new agent ({}) exited before it came online", m.version);
                eprintln!("baton-agent upgrade-watch: {why}; rolling back");
                return roll_back(&paths, &mut m, why);
            }
            Watch::TimedOut => {
                let why = format!("the new agent ({}) did not come online within {} s", m.version, m.deadline_s);
                eprintln!("baton-agent upgrade-watch: {why}; rolling back");
                roll_back(&paths, &mut m, why)?;
                // SAFETY: kill(2); the pid was checked to run the new build just above.
                unsafe { libc::kill(pid as i32, libc::SIGKILL) };
                return Ok(());
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn only_the_entry_the_service_manager_starts_is_taken_over() {
        let dir = tempfile::tempdir().unwrap();
        let paths = Paths::new(&dir.path().join("data"));
        let exe = dir.path().join("target/release/baton-agent");
        std::fs::create_dir_all(exe.parent().unwrap()).unwrap();
        std::fs::write(&exe, b"agent").unwrap();
        let entry = dir.path().join("usr/local/bin/baton-agent");
        let err = adopt(&paths, &exe, &entry, "1.0.0").unwrap_err().to_string();
        assert!(err.contains("neither its A/B layout") && err.contains("agent_entry"), "{err}");
        assert!(!std::fs::symlink_metadata(&exe).unwrap().file_type().is_symlink(), "the file was taken over");
        assert_eq!(check_entry(&paths, &paths.release("baton-agent-1.0.0-ab"), &entry), Ok(()));
        assert_eq!(check_entry(&paths, &entry, &entry), Ok(()));
    }

    #[test]
    fn release_names_carry_the_version() {
        let name = release_name("1.2.0-rc1", &[0xab; 32]);
        assert_eq!(name, "baton-agent-1.2.0-rc1-abababababab");
        assert_eq!(version_of(&name), Some("1.2.0-rc1"));
        assert_eq!(version_of("baton-agent-1.0.0"), None);
        assert_eq!(version_of("other"), None);
    }

    #[test]
    fn flips_are_atomic_links_and_commit_keeps_the_previous_build() {
        let dir = tempfile::tempdir().unwrap();
        let paths = Paths::new(dir.path());
        std::fs::create_dir_all(&paths.releases).unwrap();
        for n in ["a", "b", "old"] {
            std::fs::write(paths.release(n), n).unwrap();
        }
        flip(&paths.current, "a").unwrap();
        let mut m = Marker { to: "b".into(), from: "a".into(), version: "2".into(), ..Default::default() };
        commit(&paths, &mut m).unwrap();
        assert_eq!((linked(&paths.current).unwrap(), linked(&paths.previous).unwrap()), ("b".into(), "a".into()));
        assert_eq!(std::fs::read_to_string(&paths.current).unwrap(), "b");
        assert!(!paths.release("old").exists(), "neither current nor previous: pruned");
        assert_eq!(read_marker(&paths).unwrap().phase, MarkerPhase::Upgraded);
        // Committing again (a cut after the marker write) changes nothing.
        commit(&paths, &mut m).unwrap();
        assert_eq!(linked(&paths.previous).unwrap(), "a");
    }
}
