//! Containers on the device. The rest of the agent sees only the
//! [`ContainerRuntime`] trait; the libcontainer implementation runs every
//! container under its own shim process, so containers outlive
//! the agent and a restarted agent re-adopts them from the files the shims keep.

pub mod devfilter;
pub mod exec;
pub mod fake;
pub mod filter;
pub mod layout;
pub mod libcontainer_rt;
pub mod logs;
pub mod oci;
pub mod rootfs;
pub mod seccomp;
pub mod shim;
pub mod spawner;

use baton_protocol::spec::ContainerSpec;
use serde::{Deserialize, Serialize};

pub use layout::Layout;
pub use libcontainer_rt::LibcontainerRuntime;

/// How a container ended, recorded durably by its shim (`exit.json`).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ExitStatus {
    /// The exit code, or 128 + signal number when killed by a signal.
    pub code: i32,
    pub signal: Option<i32>,
    /// The kernel's OOM killer acted inside the container's cgroup.
    pub oom_killed: bool,
    pub started_at_ms: u64,
    pub finished_at_ms: u64,
}

/// Written by the shim once the container runs (`running.json`).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Running {
    pub pid: i32,
    pub shim_pid: i32,
    pub started_at_ms: u64,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ContainerState {
    /// Its shim is alive and the container runs.
    Running(Running),
    /// Created, its process not started yet. The shims never report it
    /// (their create returns once the process runs); the simulator's fake
    /// runtime does, for the `start_ms` a simulated container takes.
    Created,
    /// Ended; the exit status survived whatever happened to the agent.
    Exited(ExitStatus),
    /// A directory without a live shim or an exit record: the device rebooted
    /// or the shim was killed. The exit status is unknown.
    Lost,
    /// No such container.
    Missing,
}

/// What the agent records with each container it creates (`provenance.json`
/// in the bundle), so that after a restart it knows what a running container
/// runs instead of assuming it runs what is desired now.
#[derive(Debug, Clone, PartialEq, Eq, Default, Serialize, Deserialize)]
pub struct Provenance {
    /// The workload revision the container was created for.
    pub revision: u64,
    /// `reconcile::fingerprint` of the workload spec it was created from:
    /// what decides whether it still runs what is desired (revision numbers
    /// alone do not: a restored controller may reuse them).
    pub fingerprint: String,
    /// Restarts of the workload before this instance (replacements by a new
    /// revision are not restarts).
    pub restarts: u32,
    /// Failed runs in a row before this instance (the restart back-off's
    /// step): an agent restarted under a crash loop goes on backing off
    /// where it was instead of starting again from the shortest delay.
    #[serde(default)]
    pub failures: u32,
}

/// CPU and memory use from the container's cgroup.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct Usage {
    pub cpu_ns: u64,
    pub memory_bytes: u64,
}

/// The result of a command run inside a container.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ExecOutput {
    pub code: i32,
    /// At most `EXEC_OUTPUT_CAP` bytes of each stream.
    pub stdout: Vec<u8>,
    pub stderr: Vec<u8>,
}

/// Output kept from an exec; a probe or an operator's command is not a data channel.
pub const EXEC_OUTPUT_CAP: usize = 64 * 1024;

/// What to run: the spec from the desired document and an unpacked rootfs.
#[derive(Debug, Clone)]
pub struct CreateRequest<'a> {
    pub id: &'a str,
    pub spec: &'a ContainerSpec,
    /// The image's unpacked layers; used read-only (each container gets
    /// its own writable layer over them).
    pub rootfs: rootfs::Rootfs,
    /// Kept with the container; read back by [`ContainerRuntime::provenance`].
    pub provenance: Provenance,
}

#[derive(Debug, thiserror::Error)]
pub enum RuntimeError {
    #[error("invalid container id {0:?}: use 1-100 characters of a-z 0-9 . _ -")]
    InvalidId(String),
    #[error("invalid spec: {0}")]
    InvalidSpec(String),
    #[error("container {0} already exists")]
    Exists(String),
    #[error("container {0} not found")]
    NotFound(String),
    #[error("container {0} is still running")]
    StillRunning(String),
    #[error("cannot start container {id}: {reason}")]
    Start { id: String, reason: String },
    #[error("{context}: {source}")]
    Io { context: String, source: std::io::Error },
}

impl RuntimeError {
    pub fn io(context: impl Into<String>) -> impl FnOnce(std::io::Error) -> RuntimeError {
        let context = context.into();
        move |source| RuntimeError::Io { context, source }
    }
}

/// Container ids become directory names, cgroup names and libcontainer ids.
pub fn validate_id(id: &str) -> Result<(), RuntimeError> {
    let ok = !id.is_empty()
        && id.len() <= 100
        && !id.starts_with(['.', '-'])
        && id.bytes().all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b"._-".contains(&b));
    if ok {
        Ok(())
    } else {
        Err(RuntimeError::InvalidId(id.to_string()))
    }
}

/// The agent's view of running containers; reconcile code talks only to this.
/// Shared by threads: the supervisor makes a batch of starts side by side.
pub trait ContainerRuntime: Sync {
    /// Creates and starts a container. On error nothing of it is left behind.
    fn create(&self, req: &CreateRequest<'_>) -> Result<(), RuntimeError>;
    /// How many `create`s may run side by side (from as many threads).
    fn starts_at_once(&self) -> usize {
        1
    }
    fn state(&self, id: &str) -> Result<ContainerState, RuntimeError>;
    /// Asks the container to stop: SIGTERM, then SIGKILL after its grace period.
    fn stop(&self, id: &str) -> Result<(), RuntimeError>;
    /// Kills the container at once.
    fn kill(&self, id: &str) -> Result<(), RuntimeError>;
    /// Forgets an exited (or lost) container: its directory and logs go.
    fn remove(&self, id: &str) -> Result<(), RuntimeError>;
    fn list(&self) -> Result<Vec<String>, RuntimeError>;
    /// What `id` was created for (None: unknown, e.g. made by an agent
    /// that did not record it).
    fn provenance(&self, id: &str) -> Option<Provenance>;
    fn usage(&self, id: &str) -> Option<Usage>;
    /// Runs `argv` inside the running container `id`, killing it after `timeout`.
    fn exec(&self, id: &str, argv: &[String], timeout: std::time::Duration) -> Result<ExecOutput, RuntimeError>;
    /// The process that runs `argv` inside the running container `id` for an
    /// interactive session, its stdio left to the caller: stdin passed on,
    /// taken as the controlling terminal of type `terminal` when there is
    /// one; ended by SIGTERM, or after `max`.
    fn session(
        &self,
        id: &str,
        _argv: &[String],
        _terminal: Option<&str>,
        _max: std::time::Duration,
    ) -> Result<std::process::Command, RuntimeError> {
        Err(RuntimeError::Start { id: id.into(), reason: "this runtime runs no sessions".into() })
    }
    /// The root directory the running container `id` sees (its init's
    /// `/proc/PID/root`: its mounts and volumes included); None when it
    /// does not run here.
    fn root_of(&self, id: &str) -> Option<std::path::PathBuf> {
        match self.state(id).ok()? {
            ContainerState::Running(r) if r.pid > 0 => Some(format!("/proc/{}/root", r.pid).into()),
            _ => None,
        }
    }
    /// Whether the running container `id` shares this agent's network
    /// namespace (the host's network); None when it does not run.
    fn on_host_network(&self, id: &str) -> Option<bool> {
        match self.state(id).ok()? {
            ContainerState::Running(r) if r.pid > 0 => {
                let ns = |pid: &str| std::fs::read_link(format!("/proc/{pid}/ns/net")).ok();
                let (theirs, ours) = (ns(&r.pid.to_string())?, ns("self")?);
                Some(theirs == ours)
            }
            _ => None,
        }
    }
    /// The address of a container with a network of its own (bridge);
    /// None for one on the host's network (probes then use loopback).
    fn address(&self, _id: &str) -> Option<std::net::IpAddr> {
        None
    }
    /// The services the desired document gives this device, for a runtime
    /// that routes them (bridge networking); the others ignore them.
    fn route_services(&self, _services: &[baton_protocol::ServiceEndpoints], _ports: &[baton_protocol::ServicePort]) {}
    /// What the running container `id` wrote in `/run/baton/<file>` (at most
    /// 64 bytes; None: no such regular file, or no such container).
    fn signal(&self, _id: &str, _file: &str) -> Option<String> {
        None
    }
}

/// libcontainer's record of the container kept under `state_dir`, if there
/// is one: asking libcontainer for one that is not there is not an error
/// here, but it logs one (every removal did).
pub fn libcontainer_state(state_dir: &std::path::Path) -> Option<libcontainer::container::Container> {
    if !state_dir.join("state.json").is_file() {
        return None;
    }
    libcontainer::container::Container::load(state_dir.to_path_buf()).ok()
}

/// A field of `/proc/<pid>/status` (`pid`: a number or `self`), trimmed.
pub fn proc_status(pid: &str, field: &str) -> Option<String> {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).ok()?;
    status.lines().find_map(|l| l.strip_prefix(field)?.strip_prefix(':')).map(|v| v.trim().to_string())
}

/// SIGKILLs every process of session `sid` (what a session's command
/// started: background jobs sit in process groups of their own but stay in
/// its session), until none is left or after a few rounds (a process that
/// keeps forking). Processes that made sessions of their own (daemons) are
/// not found. Returns how many were killed. A session id is not reused
/// while any process of it lives, so `sid` cannot name a stranger.
pub fn kill_session(sid: i32) -> usize {
    let mut killed = 0;
    for _ in 0..5 {
        let members: Vec<i32> = std::fs::read_dir("/proc")
            .into_iter()
            .flatten()
            .flatten()
            .filter_map(|e| e.file_name().to_str()?.parse::<i32>().ok())
            .filter(|pid| session_of(*pid) == Some(sid))
            .collect();
        if members.is_empty() {
            break;
        }
        for pid in members {
            // SAFETY: kill(2); the pid is a member of a session we own.
            if unsafe { libc::kill(pid, libc::SIGKILL) } == 0 {
                killed += 1;
            }
        }
        std::thread::sleep(std::time::Duration::from_millis(10));
    }
    killed
}

/// The session id of the live process `pid` (field 6 of `/proc/PID/stat`,
/// after the command name); None for a zombie, dead already.
fn session_of(pid: i32) -> Option<i32> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    let mut fields = stat[stat.rfind(')')? + 1..].split_whitespace();
    if matches!(fields.next(), Some("Z" | "X")) {
        return None;
    }
    fields.nth(2)?.parse().ok()
}

/// `pid` is a running process: in /proc and not a zombie.
pub(crate) fn alive(pid: i32) -> bool {
    std::fs::read_to_string(format!("/proc/{pid}/stat"))
        .is_ok_and(|s| s.rsplit_once(')').is_some_and(|(_, rest)| !rest.trim_start().starts_with('Z')))
}

pub fn now_ms() -> u64 {
    std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map_or(0, |d| d.as_millis() as u64)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_session_is_killed_whole_and_nothing_else() {
        // A shell leading its own session, a background job in another
        // process group of it; a process outside it.
        let mut leader = std::process::Command::new("/bin/sh");
        leader.args(["-c", "set -m; sleep 300 & sleep 301"]);
        // SAFETY: setsid is async-signal-safe.
        unsafe {
            std::os::unix::process::CommandExt::pre_exec(&mut leader, || {
                libc::setsid();
                Ok(())
            });
        }
        let mut leader = leader.spawn().unwrap();
        let mut outsider = std::process::Command::new("sleep").arg("302").spawn().unwrap();
        let sid = leader.id() as i32;
        let deadline = std::time::Instant::now() + std::time::Duration::from_secs(10);
        let members = || {
            std::fs::read_dir("/proc")
                .unwrap()
                .flatten()
                .filter_map(|e| e.file_name().to_str()?.parse::<i32>().ok())
                .filter(|p| session_of(*p) == Some(sid))
                .count()
        };
        while members() < 3 {
            assert!(std::time::Instant::now() < deadline, "the session's jobs never started");
            std::thread::sleep(std::time::Duration::from_millis(10));
        }
        assert!(kill_session(sid) >= 3);
        let _ = leader.wait();
        assert_eq!(members(), 0, "a member of the session survived");
        assert!(outsider.try_wait().unwrap().is_none(), "a process outside the session was killed");
        let _ = outsider.kill();
        let _ = outsider.wait();
    }

    #[test]
    fn container_ids_are_safe_names() {
        assert!(validate_id("web.1_rev-3").is_ok());
        for bad in ["", "Web", "a/b", "..", "-x", "a b", &"x".repeat(101)] {
            assert!(validate_id(bad).is_err(), "{bad:?}");
        }
    }
}
