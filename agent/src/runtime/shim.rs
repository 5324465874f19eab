//! The shim: one small, single-threaded process per container.
//!
//! Why a separate process: libcontainer is unsafe in a multi-threaded process
//! (it `chdir()`s process-wide and forks while other threads may hold locks),
//! and the container init is the caller's child, whose exit code only the
//! caller can collect. So the shim, not the agent, creates the container, is
//! its parent and reaper, records its exit durably, and pumps its output into
//! the log. It runs in its own session, so the agent can die, restart or be
//! upgraded without touching it.
//!
//! Lifecycle: the spawner (see `spawner`) forks the shim, which creates and
//! starts the container and reports "ok" or the error over a pipe the agent
//! reads, so the agent knows the outcome synchronously. Signals to
//! the shim: SIGTERM = stop (SIGTERM to the container, SIGKILL after the grace
//! period), SIGINT = kill now. No tokio here.

use std::fs::File;
use std::io::Write;
use std::os::fd::{AsFd, AsRawFd, OwnedFd};
use std::path::{Path, PathBuf};
use std::time::Duration;

use libcontainer::container::builder::ContainerBuilder;
use libcontainer::syscall::syscall::SyscallType;
use nix::poll::{poll, PollFd, PollFlags, PollTimeout};
use nix::sys::signal::{kill, SigSet, SigmaskHow, Signal};
use nix::sys::signalfd::{SfdFlags, SignalFd};
use nix::sys::wait::{waitpid, WaitPidFlag, WaitStatus};
use nix::unistd::Pid;

use super::layout::{files, write_atomic};
use super::logs::{LogWriter, Stream};
use super::{now_ms, ExitStatus, Running};

#[derive(Debug, Clone)]
pub struct ShimArgs {
    pub id: String,
    /// The container's directory on flash: config.json, exit.json, the log.
    pub bundle: PathBuf,
    /// libcontainer's state root (tmpfs).
    pub root: PathBuf,
    /// The shim's own run-state directory (tmpfs): shim.pid, running.json.
    pub state: PathBuf,
    /// The container's cgroup path (where the OOM counter is read).
    pub cgroup: String,
    pub stop_grace: Duration,
    pub log_max_bytes: u64,
    pub log_flush: Duration,
}

/// The shim's life, in the grandchild the spawner forked for it: a session
/// of its own, output to a file on tmpfs, the container supervised until it
/// ends; `ready` gets "ok" once it runs, or the error.
pub fn run_detached(args: &ShimArgs, ready: File) -> ! {
    let _ = nix::unistd::setsid();
    redirect_stdio(&args.state.join(files::SHIM_LOG));
    let code = supervise(args, ready);
    std::process::exit(code);
}

/// Detaches from the spawner's standard streams and keeps the shim's own messages in a file on tmpfs.
fn redirect_stdio(log: &Path) {
    let devnull = File::open("/dev/null");
    let out = File::options().create(true).append(true).open(log);
    // SAFETY: dup2 onto the standard descriptors of this single-threaded process.
    unsafe {
        if let Ok(null) = &devnull {
            libc::dup2(null.as_raw_fd(), 0);
        }
        if let Ok(out) = &out {
            libc::dup2(out.as_raw_fd(), 1);
            libc::dup2(out.as_raw_fd(), 2);
        }
    }
}

fn report(ready: &mut Option<File>, msg: &str) {
    if let Some(mut f) = ready.take() {
        let _ = f.write_all(msg.as_bytes());
    }
}

/// Removes whatever a failed create left in libcontainer's state and cgroups.
fn force_delete(args: &ShimArgs) {
    if let Some(mut c) = super::libcontainer_state(&args.root.join(&args.id)) {
        let _ = c.delete(true);
    }
}

fn supervise(args: &ShimArgs, ready: File) -> i32 {
    let mut ready = Some(ready);
    let shim_pid = std::process::id() as i32;
    if let Err(e) = write_atomic(&args.state.join(files::SHIM_PID), shim_pid.to_string().as_bytes()) {
        report(&mut ready, &format!("cannot write shim pid: {e}"));
        return 1;
    }
    let pipes = (nix::unistd::pipe2(nix::fcntl::OFlag::O_CLOEXEC), nix::unistd::pipe2(nix::fcntl::OFlag::O_CLOEXEC));
    let ((out_r, out_w), (err_r, err_w)) = match pipes {
        (Ok(o), Ok(e)) => (o, e),
        _ => {
            report(&mut ready, "cannot create output pipes");
            return 1;
        }
    };
    let devnull = match File::open("/dev/null") {
        Ok(f) => f,
        Err(e) => {
            report(&mut ready, &format!("/dev/null: {e}"));
            return 1;
        }
    };

    // The bundle's config says what the container needs before it starts.
    let config = std::fs::read(args.bundle.join(files::CONFIG))
        .ok()
        .and_then(|b| serde_json::from_slice::<serde_json::Value>(&b).ok());
    // The container's seccomp program, compiled once per profile (see filter).
    let named = config.as_ref().is_some_and(super::filter::named_in);
    let cache = super::filter::cache_beside(&args.root);
    let program = match super::filter::for_bundle(&args.bundle, named, &cache) {
        Ok(p) => p,
        Err(e) => {
            report(&mut ready, &e);
            return 1;
        }
    };
    let built = ContainerBuilder::new(args.id.clone(), SyscallType::default())
        .with_root_path(&args.root)
        .map(|b| {
            b.with_stdin(OwnedFd::from(devnull))
                .with_stdout(out_w)
                .with_stderr(err_w)
                .with_executor(super::filter::Filtered(program))
                .as_init(&args.bundle)
                .with_systemd(false)
                .with_detach(true)
        })
        .and_then(|b| b.build());
    let mut container = match built {
        Ok(c) => c,
        Err(e) => {
            force_delete(args);
            report(&mut ready, &format!("create: {e}"));
            return 1;
        }
    };
    // On cgroup v2 the device rules are an eBPF program, attached before the
    // container's own code runs (libcontainer's needs libbpf; see devfilter).
    if super::devfilter::cgroup_v2() {
        let attached =
            config.as_ref().ok_or_else(|| std::io::Error::other("config.json unreadable")).and_then(|config| {
                let prog = super::devfilter::program(&super::devfilter::rules(config));
                super::devfilter::attach(Path::new(&format!("/sys/fs/cgroup{}", args.cgroup)), &prog)
            });
        if let Err(e) = attached {
            let _ = container.delete(true);
            report(&mut ready, &format!("cannot apply the device rules (cgroup v2): {e}"));
            return 1;
        }
    }
    // A network namespace of its own (`network: none`) has its loopback up,
    // as Docker and Podman give it: a server and its probes talk over it.
    let own_netns = config
        .as_ref()
        .and_then(|c| c["linux"]["namespaces"].as_array())
        .is_some_and(|ns| ns.iter().any(|n| n["type"] == "network" && n.get("path").is_none()));
    if own_netns {
        if let Err(e) = container.pid().map_or(Ok(()), |pid| loopback_up(pid.as_raw())) {
            let _ = container.delete(true);
            report(&mut ready, &format!("cannot bring up the container's loopback: {e}"));
            return 1;
        }
    }
    // A failed start leaves init blocked on the notify socket: force-delete.
    if let Err(e) = container.start() {
        let _ = container.delete(true);
        report(&mut ready, &format!("start: {e}"));
        return 1;
    }
    let Some(pid) = container.pid() else {
        let _ = container.delete(true);
        report(&mut ready, "started container has no pid");
        return 1;
    };
    let started_at_ms = now_ms();

    // Only now block the signals we handle: the container init inherited the
    // mask at fork time and must not have SIGTERM blocked.
    let mut mask = SigSet::empty();
    for s in [Signal::SIGTERM, Signal::SIGINT, Signal::SIGCHLD] {
        mask.add(s);
    }
    let sigfd = nix::sys::signal::sigprocmask(SigmaskHow::SIG_BLOCK, Some(&mask), None)
        .ok()
        .and_then(|()| SignalFd::with_flags(&mask, SfdFlags::SFD_NONBLOCK | SfdFlags::SFD_CLOEXEC).ok());
    let Some(mut sigfd) = sigfd else {
        let _ = kill(pid, Signal::SIGKILL);
        let _ = waitpid(pid, None);
        let _ = container.delete(true);
        report(&mut ready, "cannot set up signal handling");
        return 1;
    };

    let running = Running { pid: pid.as_raw(), shim_pid, started_at_ms };
    let running_json = serde_json::to_vec(&running).unwrap_or_default();
    if let Err(e) = write_atomic(&args.state.join(files::RUNNING), &running_json) {
        let _ = kill(pid, Signal::SIGKILL);
        let _ = waitpid(pid, None);
        let _ = container.delete(true);
        report(&mut ready, &format!("cannot record running state: {e}"));
        return 1;
    }
    report(&mut ready, "ok");
    // Creating the container (config parse, seccomp filter, mounts) is done:
    // give the heap it used back, so each of many shims stays small.
    #[cfg(target_env = "gnu")]
    // SAFETY: malloc_trim only releases free memory at the top of the heap.
    unsafe {
        libc::malloc_trim(0);
    }

    let mut log = LogWriter::new(&args.bundle.join(files::LOG), args.log_max_bytes, args.log_flush.as_millis() as u64);
    let status = pump(pid, &out_r, &err_r, &mut sigfd, &mut log, args.stop_grace);
    let oom_killed = oom_kills(&args.cgroup) > 0;
    let _ = log.finish(now_ms());
    if let Err(e) = container.delete(true) {
        eprintln!("shim {}: delete: {e}", args.id);
    }
    let (code, signal) = match status {
        WaitStatus::Exited(_, code) => (code, None),
        WaitStatus::Signaled(_, sig, _) => (128 + sig as i32, Some(sig as i32)),
        _ => (255, None),
    };
    let exit = ExitStatus { code, signal, oom_killed, started_at_ms, finished_at_ms: now_ms() };
    let bytes = serde_json::to_vec(&exit).unwrap_or_default();
    // The one write that must not be lost: retry briefly (e.g. a full disk freeing up).
    for attempt in 0..10 {
        match write_atomic(&args.bundle.join(files::EXIT), &bytes) {
            Ok(()) => break,
            Err(e) => {
                eprintln!("shim {}: cannot record exit (attempt {attempt}): {e}", args.id);
                std::thread::sleep(Duration::from_millis(500));
            }
        }
    }
    // Nothing runs on the rootfs any more: unmount it and free its writable
    // layer now, not when the instance is removed (it is kept for its log
    // and exit record); the run state on tmpfs (pid, config files and
    // secrets) goes too.
    if let Err(e) = super::rootfs::discard(&args.bundle) {
        eprintln!("shim {}: cannot release the rootfs: {e}", args.id);
    }
    let _ = std::fs::remove_dir_all(&args.state);
    0
}

/// Moves output into the log and handles signals until the container exits.
fn pump(
    pid: Pid,
    out: &OwnedFd,
    err: &OwnedFd,
    sigfd: &mut SignalFd,
    log: &mut LogWriter,
    grace: Duration,
) -> WaitStatus {
    for fd in [out, err] {
        let _ = nix::fcntl::fcntl(fd.as_raw_fd(), nix::fcntl::FcntlArg::F_SETFL(nix::fcntl::OFlag::O_NONBLOCK));
    }
    let mut open = [true, true];
    let mut kill_at: Option<u64> = None;
    let mut exited: Option<WaitStatus> = None;
    let mut buf = vec![0u8; 64 * 1024];
    loop {
        if exited.is_none() {
            if let Ok(st @ (WaitStatus::Exited(..) | WaitStatus::Signaled(..))) =
                waitpid(pid, Some(WaitPidFlag::WNOHANG))
            {
                exited = Some(st);
            }
        }
        // After the exit, keep reading only until the pipes close (the pid
        // namespace is gone, so every writer is dead) or a short deadline.
        if let Some(st) = exited {
            let deadline = now_ms() + 1000;
            while open.iter().any(|o| *o) && now_ms() < deadline {
                drain(out, err, &mut open, &mut buf, log, 100);
            }
            return st;
        }
        let now = now_ms();
        if let Some(at) = kill_at {
            if now >= at {
                let _ = kill(pid, Signal::SIGKILL);
                kill_at = None;
            }
        }
        let timeout = [log.due_in_ms(now), kill_at.map(|at| at.saturating_sub(now))]
            .into_iter()
            .flatten()
            .min()
            .unwrap_or(60_000)
            .min(60_000);
        let mut fds = vec![PollFd::new(sigfd.as_fd(), PollFlags::POLLIN)];
        let mut which = Vec::new();
        for (i, fd) in [out, err].into_iter().enumerate() {
            if open[i] {
                fds.push(PollFd::new(fd.as_fd(), PollFlags::POLLIN));
                which.push(i);
            }
        }
        let _ = poll(&mut fds, PollTimeout::try_from(timeout as i32).unwrap_or(PollTimeout::MAX));
        let sig_ready = fds[0].revents().is_some_and(|r| !r.is_empty());
        let pipes_ready: Vec<usize> = which
            .iter()
            .zip(&fds[1..])
            .filter(|(_, f)| f.revents().is_some_and(|r| !r.is_empty()))
            .map(|(i, _)| *i)
            .collect();
        drop(fds);
        for i in pipes_ready {
            read_stream(if i == 0 { out } else { err }, i, &mut open, &mut buf, log);
        }
        if sig_ready {
            while let Ok(Some(info)) = sigfd.read_signal() {
                match Signal::try_from(info.ssi_signo as i32) {
                    Ok(Signal::SIGTERM) if kill_at.is_none() => {
                        let _ = kill(pid, Signal::SIGTERM);
                        kill_at = Some(now_ms() + grace.as_millis() as u64);
                    }
                    Ok(Signal::SIGINT) => {
                        let _ = kill(pid, Signal::SIGKILL);
                    }
                    _ => {}
                }
            }
        }
        let _ = log.maybe_flush(now_ms());
    }
}

fn drain(out: &OwnedFd, err: &OwnedFd, open: &mut [bool; 2], buf: &mut [u8], log: &mut LogWriter, wait_ms: i32) {
    let mut fds: Vec<PollFd> = Vec::new();
    let mut which = Vec::new();
    for (i, fd) in [out, err].into_iter().enumerate() {
        if open[i] {
            fds.push(PollFd::new(fd.as_fd(), PollFlags::POLLIN));
            which.push(i);
        }
    }
    let _ = poll(&mut fds, PollTimeout::try_from(wait_ms).unwrap_or(PollTimeout::ZERO));
    let ready: Vec<usize> =
        which.iter().zip(&fds).filter(|(_, f)| f.revents().is_some_and(|r| !r.is_empty())).map(|(i, _)| *i).collect();
    drop(fds);
    for i in ready {
        read_stream(if i == 0 { out } else { err }, i, open, buf, log);
    }
}

fn read_stream(fd: &OwnedFd, i: usize, open: &mut [bool; 2], buf: &mut [u8], log: &mut LogWriter) {
    let stream = if i == 0 { Stream::Stdout } else { Stream::Stderr };
    loop {
        match nix::unistd::read(fd.as_raw_fd(), buf) {
            Ok(0) => {
                open[i] = false;
                return;
            }
            Ok(n) => log.push(stream, &buf[..n], now_ms()),
            Err(nix::errno::Errno::EINTR) => continue,
            Err(nix::errno::Errno::EAGAIN) => return,
            Err(_) => {
                open[i] = false;
                return;
            }
        }
    }
}

/// OOM kills recorded by the container's memory cgroup (v1 or v2).
fn oom_kills(cgroup: &str) -> u64 {
    let v1 = format!("/sys/fs/cgroup/memory{cgroup}/memory.oom_control");
    let v2 = format!("/sys/fs/cgroup{cgroup}/memory.events");
    [v1, v2]
        .iter()
        .filter_map(|p| std::fs::read_to_string(p).ok())
        .find_map(|text| text.lines().find_map(|l| l.strip_prefix("oom_kill ").and_then(|n| n.trim().parse().ok())))
        .unwrap_or(0)
}

/// Sets `lo` up in the network namespace of process `pid` (from a thread of
/// its own: setns(2) moves only the calling thread).
fn loopback_up(pid: i32) -> std::io::Result<()> {
    use std::os::fd::AsRawFd;
    let ns = File::open(format!("/proc/{pid}/ns/net"))?;
    std::thread::spawn(move || -> std::io::Result<()> {
        let check = |r: libc::c_int| if r < 0 { Err(std::io::Error::last_os_error()) } else { Ok(r) };
        // SAFETY: a valid namespace fd; only this short-lived thread moves.
        check(unsafe { libc::setns(ns.as_raw_fd(), libc::CLONE_NEWNET) })?;
        // SAFETY: plain socket(2); the fd is closed below.
        let sock = check(unsafe { libc::socket(libc::AF_INET, libc::SOCK_DGRAM | libc::SOCK_CLOEXEC, 0) })?;
        // SAFETY: an all-zero ifreq is valid; the name fits (NUL-terminated).
        let mut ifr: libc::ifreq = unsafe { std::mem::zeroed() };
        for (d, s) in ifr.ifr_name.iter_mut().zip(b"lo\0") {
            *d = *s as libc::c_char;
        }
        // SAFETY: SIOCGIFFLAGS/SIOCSIFFLAGS read and write the ifreq given; the union's flags member is what they use.
        let result = check(unsafe { libc::ioctl(sock, libc::SIOCGIFFLAGS as _, &mut ifr) }).and_then(|_| {
            unsafe { ifr.ifr_ifru.ifru_flags |= libc::IFF_UP as libc::c_short };
            check(unsafe { libc::ioctl(sock, libc::SIOCSIFFLAGS as _, &ifr) })
        });
        // SAFETY: closing the socket opened above.
        unsafe { libc::close(sock) };
        result.map(|_| ())
    })
    .join()
    .map_err(|_| std::io::Error::other("the loopback thread panicked"))?
}
