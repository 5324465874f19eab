//! `baton-agent exec`: runs one command inside a running container, for exec
//! probes and operators' `baton exec`. A separate single-threaded process for
//! the same reason as the shim: libcontainer's tenant builder forks and
//! changes process-wide state.

use std::os::fd::OwnedFd;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use libcontainer::container::builder::ContainerBuilder;
use libcontainer::syscall::syscall::SyscallType;
use nix::sys::signal::{kill, Signal};
use nix::sys::wait::{waitpid, WaitPidFlag, WaitStatus};

#[derive(Debug, Clone)]
pub struct ExecArgs {
    pub id: String,
    pub root: PathBuf,
    pub timeout: Duration,
    pub argv: Vec<String>,
    /// Pass this process's stdin on (an interactive session) instead of /dev/null.
    pub stdin: bool,
    /// Stdin is a terminal: the command gets it as its controlling terminal,
    /// in a session of its own (job control, Ctrl-C, window size).
    pub tty: bool,
    /// Set in the command's environment, over the container's own.
    pub env: Vec<(String, String)>,
}

/// Set by SIGTERM or SIGHUP: the session is over (the agent ended it, or died).
static ENDED: std::sync::atomic::AtomicBool = std::sync::atomic::AtomicBool::new(false);

extern "C" fn on_end(_: libc::c_int) {
    ENDED.store(true, std::sync::atomic::Ordering::Relaxed);
}

/// Exit code of the command (128 + signal if killed, 137 on timeout); the
/// command's output goes to this process's stdout and stderr.
pub fn run(args: ExecArgs) -> i32 {
    let dup = |fd: i32| {
        nix::unistd::dup(fd).map(|raw| {
            // SAFETY: `dup` just returned this descriptor; we are its only owner.
            unsafe { <OwnedFd as std::os::fd::FromRawFd>::from_raw_fd(raw) }
        })
    };
    let stdin = if args.stdin {
        dup(0)
    } else {
        std::fs::File::open("/dev/null").map(OwnedFd::from).map_err(|_| nix::Error::EBADF)
    };
    let (stdin, stdout, stderr) = match (stdin, dup(1), dup(2)) {
        (Ok(i), Ok(o), Ok(e)) => (i, o, e),
        _ => {
            eprintln!("exec: cannot set up stdio");
            return 126;
        }
    };
    // As `docker exec`: the container's user, groups and working directory.
    let process = match container_process(&args.root, &args.id) {
        Ok(p) => p,
        Err(e) => {
            eprintln!("exec in {}: {e}", args.id);
            return 126;
        }
    };
    // The container's own seccomp filter, for what runs beside it too.
    let program = match &process.bundle {
        Some(bundle) => {
            match super::filter::for_bundle(bundle, process.filtered, &super::filter::cache_beside(&args.root)) {
                Ok(p) => p,
                Err(e) => {
                    eprintln!("exec in {}: {e}", args.id);
                    return 126;
                }
            }
        }
        None => None,
    };
    // The agent ends a session with SIGTERM, and its death with SIGHUP
    // (PR_SET_PDEATHSIG): the command and what it started go with it.
    // Installed before the command exists, so an end that comes while it is
    // being made is not lost (the helper would die and leave it running).
    for sig in [Signal::SIGTERM, Signal::SIGHUP] {
        let action = nix::sys::signal::SigAction::new(
            nix::sys::signal::SigHandler::Handler(on_end),
            nix::sys::signal::SaFlags::empty(),
            nix::sys::signal::SigSet::empty(),
        );
        // SAFETY: the handler only stores to an atomic (async-signal-safe).
        let _ = unsafe { nix::sys::signal::sigaction(sig, &action) };
    }
    let built = ContainerBuilder::new(args.id.clone(), SyscallType::default())
        .with_root_path(&args.root)
        .map(|b| {
            b.with_stdin(stdin)
                .with_stdout(stdout)
                .with_stderr(stderr)
                .with_executor(Session { tty: args.tty, filter: super::filter::Filtered(program) })
                .as_tenant()
        })
        .and_then(|b| {
            b.with_container_args(args.argv.clone())
                .with_user(Some(process.uid))
                .with_group(Some(process.gid))
                .with_additional_gids(process.additional_gids.clone())
                .with_cwd(process.cwd.clone())
                .with_env(args.env.iter().cloned().collect())
                .with_detach(true)
                .build()
        });
    let pid = match built {
        Ok(pid) => pid,
        // As a shell says it, with its code.
        Err(e) if e.to_string().contains("not found in $PATH") => {
            eprintln!("exec: {}: command not found", args.argv.first().map_or("", String::as_str));
            return 127;
        }
        Err(e) => {
            eprintln!("exec in {}: {e}", args.id);
            return 126;
        }
    };
    sweep_notify_sockets(&args.root.join(&args.id));
    // libcontainer made the command a session leader: what it started
    // (background jobs included) ends with it, whichever way it ends.
    let code = wait_for_command(pid, &args);
    if args.stdin {
        super::kill_session(pid.as_raw());
    }
    code
}

/// libcontainer leaves each exec's `tenant-notify-*.sock` in the
/// container's state directory (tmpfs): one file per exec and per exec
/// probe, for as long as the container runs. Those older than a minute are
/// long done with (an exec's process connects within milliseconds).
fn sweep_notify_sockets(state: &Path) {
    let Ok(entries) = std::fs::read_dir(state) else { return };
    for entry in entries.flatten() {
        let name = entry.file_name();
        let name = name.to_string_lossy();
        let stale = entry
            .metadata()
            .and_then(|m| m.modified())
            .is_ok_and(|t| t.elapsed().is_ok_and(|age| age > Duration::from_secs(60)));
        if name.starts_with("tenant-notify-") && name.ends_with(".sock") && stale {
            let _ = std::fs::remove_file(entry.path());
        }
    }
}

fn wait_for_command(pid: nix::unistd::Pid, args: &ExecArgs) -> i32 {
    let deadline = Instant::now() + args.timeout;
    loop {
        match waitpid(pid, Some(WaitPidFlag::WNOHANG)) {
            Ok(WaitStatus::Exited(_, code)) => return code,
            Ok(WaitStatus::Signaled(_, sig, _)) => return 128 + sig as i32,
            Ok(_) => {}
            Err(e) => {
                eprintln!("exec: wait: {e}");
                return 126;
            }
        }
        let ended = ENDED.load(std::sync::atomic::Ordering::Relaxed);
        if ended || Instant::now() >= deadline {
            // A terminal session's command leads its own process group.
            if args.tty {
                let _ = kill(nix::unistd::Pid::from_raw(-pid.as_raw()), Signal::SIGKILL);
            }
            let _ = kill(pid, Signal::SIGKILL);
            let _ = waitpid(pid, None);
            if !ended {
                eprintln!("exec: timed out after {:?}", args.timeout);
            }
            return 137;
        }
        std::thread::sleep(Duration::from_millis(5));
    }
}

/// The container's executor for an exec: with a terminal, the command
/// (which libcontainer made a session leader) takes the terminal on its
/// stdin as its controlling one, as under `docker exec -t`: job control,
/// Ctrl-C and window sizes reach it. Then the seccomp program, then `execve`.
#[derive(Clone)]
struct Session {
    tty: bool,
    filter: super::filter::Filtered,
}

impl libcontainer::workload::Executor for Session {
    fn exec(&self, spec: &libcontainer::oci_spec::runtime::Spec) -> Result<(), libcontainer::workload::ExecutorError> {
        if self.tty {
            let other =
                |what: &str, e: nix::Error| libcontainer::workload::ExecutorError::Other(format!("{what}: {e}"));
            // SAFETY: TIOCSCTTY on fd 0 takes an integer argument, no pointer.
            if unsafe { libc::ioctl(0, libc::TIOCSCTTY, 0) } != 0 {
                return Err(other("cannot take the terminal", nix::Error::last()));
            }
        }
        self.filter.exec(spec)
    }

    fn validate(
        &self,
        spec: &libcontainer::oci_spec::runtime::Spec,
    ) -> Result<(), libcontainer::workload::ExecutorValidationError> {
        self.filter.validate(spec)
    }
}

/// Who the container's own process runs as, and where.
#[derive(Default)]
struct ContainerProcess {
    uid: u32,
    gid: u32,
    additional_gids: Vec<u32>,
    cwd: Option<PathBuf>,
    /// The container's bundle (where its seccomp profile is).
    bundle: Option<PathBuf>,
    /// Whether it must run under a seccomp program: its config.json names
    /// one, or the container's init runs under one.
    filtered: bool,
}

/// Read from the container's bundle (its config.json); root in / for a
/// container libcontainer does not know (the exec then fails there, saying so).
fn container_process(root: &std::path::Path, id: &str) -> Result<ContainerProcess, String> {
    let Some(container) = super::libcontainer_state(&root.join(id)) else {
        return Ok(ContainerProcess::default());
    };
    let bundle = container.bundle().to_path_buf();
    let path = bundle.join("config.json");
    let config = std::fs::read(&path)
        .map_err(|e| e.to_string())
        .and_then(|b| serde_json::from_slice::<serde_json::Value>(&b).map_err(|e| e.to_string()))
        .map_err(|e| format!("cannot read {}: {e}", path.display()))?;
    // What runs beside a filtered init is filtered too, whatever the
    // bundle says now: a profile gone from it stops the exec.
    let init_filtered =
        container.pid().and_then(|pid| super::proc_status(&pid.to_string(), "Seccomp")).is_some_and(|mode| mode != "0");
    let p = &config["process"];
    let num = |v: &serde_json::Value| v.as_u64().and_then(|n| u32::try_from(n).ok()).unwrap_or(0);
    Ok(ContainerProcess {
        uid: num(&p["user"]["uid"]),
        gid: num(&p["user"]["gid"]),
        additional_gids: p["user"]["additionalGids"]
            .as_array()
            .map(|a| a.iter().map(num).collect())
            .unwrap_or_default(),
        cwd: p["cwd"].as_str().map(PathBuf::from),
        bundle: Some(bundle),
        // (A bundle from an agent before the cache keeps its profile in
        // config.json, where libcontainer applies it to the exec itself.)
        filtered: super::filter::named_in(&config) || (init_filtered && config["linux"]["seccomp"].is_null()),
    })
}
