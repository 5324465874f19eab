//! `baton-agent spawner`: the one process that forks every container's shim.
//!
//! Why not exec a fresh `baton-agent shim` per container: the agent is a
//! position-independent executable, and every exec of it relocates its
//! `.data.rel.ro` (vtables, panic locations, tables of strings; ~570 KiB on
//! x86_64) on start — private dirty pages in every process, most of each
//! idle shim's own memory. A shim forked from a long-lived spawner shares
//! the spawner's relocated pages copy-on-write (they are read-only after
//! start, never copied), so each container's shim owns little more than its
//! heap and stack. The spawner costs those pages once per device.
//!
//! Model: the runtime starts the spawner on its first create (`Spawner`),
//! with one end of a `SOCK_SEQPACKET` pair as fd 3; it forks and leaves, so
//! the spawner is nobody's child (no zombie when the agent execs its
//! successor). A request is one packet:
//! the `ShimArgs` (`encode`), with the write end of a pipe attached
//! (`SCM_RIGHTS`). The spawner forks twice — the grandchild is the shim,
//! orphaned at once, in its own session, like the exec'd shim before it —
//! and closes its copy of the pipe; the shim reports "ok" or its error into
//! the pipe, and the runtime reads it to EOF, so the outcome is known
//! synchronously and starts still run side by side. The spawner is
//! single-threaded (no tokio, no logging subscriber), which is what makes
//! running libcontainer after fork sound. It exits when the runtime's end
//! closes (the agent stopped, died, or exec'd its successor); running shims
//! are not its children and do not notice. A spawner that died is started
//! again on the next create (its socket refuses the request).
//!
//! Each shim rewrites its command line to `baton-shim shim --id ID --bundle
//! PATH` (see `set_title`): the runtime recognises a live shim by it, as it
//! recognises shims exec'd by older agents, and `ps` says whose it is.

use std::ffi::OsString;
use std::fs::File;
use std::io::{IoSlice, IoSliceMut, Read, Write};
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd, RawFd};
use std::os::unix::ffi::{OsStrExt, OsStringExt};
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::sync::Mutex;
use std::time::Duration;

use nix::sys::socket::{recvmsg, sendmsg, socketpair, AddressFamily, ControlMessage, ControlMessageOwned};
use nix::sys::socket::{MsgFlags, SockFlag, SockType};
use nix::sys::wait::waitpid;
use nix::unistd::{fork, ForkResult};

use super::shim::ShimArgs;

/// The spawner's end of the socket in its own process.
pub const SOCKET_FD: RawFd = 3;
/// Longest container id (`validate_id`), for the room titles need.
const LONGEST_ID: usize = 100;
/// Largest request: eight fields, paths included.
const MAX_REQUEST: usize = 16 * 1024;
/// How long a shim may take to report its container started. Creating one
/// takes milliseconds to seconds; past this the spawner or the shim is
/// stuck (stopped, or wedged in the kernel), and both are ended so that the
/// agent's loop goes on and says so.
const REPORT_WITHIN: Duration = Duration::from_secs(30);
/// The line the middle process writes into the report pipe first: the
/// shim's pid, so the runtime notices a shim that dies before it reports
/// (a process it forked may keep the pipe open).
const PID_LINE: &str = "shim-pid ";

/// The runtime's side: starts the spawner when needed and asks it for shims.
#[derive(Debug)]
pub struct Spawner {
    exe: PathBuf,
    /// Bytes of command line the spawner is started with, for its shims'
    /// titles: the longest title any container of this layout gets.
    title_room: usize,
    link: Mutex<Option<Link>>,
}

#[derive(Debug)]
struct Link {
    /// Closing it ends the spawner.
    socket: OwnedFd,
    /// The spawner's pid (its first packet says it).
    pid: i32,
}

impl Spawner {
    /// `exe` provides the `spawner` subcommand (the agent binary itself:
    /// `/proc/self/exe`, the build that runs even if its file was replaced);
    /// `bundle_of` names a container's bundle directory.
    pub fn new(exe: PathBuf, bundle_of: impl Fn(&str) -> PathBuf) -> Self {
        let longest = "a".repeat(LONGEST_ID);
        let title_room = title_bytes(&longest, Some(&bundle_of(&longest))).len();
        Self { exe, title_room, link: Mutex::new(None) }
    }

    /// Starts the shim of `args`; returns once it reported the container
    /// started, or with its error.
    pub fn launch(&self, args: &ShimArgs) -> Result<(), String> {
        let (ready_r, ready_w) =
            nix::unistd::pipe2(nix::fcntl::OFlag::O_CLOEXEC).map_err(|e| format!("cannot create a pipe: {e}"))?;
        let request = encode(args);
        {
            let mut link = self.link.lock().unwrap_or_else(|p| p.into_inner());
            let mut sent = Err(String::new());
            // A spawner that died (killed, or its binary replaced) is started again, once.
            for _ in 0..2 {
                if link.is_none() {
                    let started = self.start()?;
                    tracing::info!(pid = started.pid, "started the shim spawner");
                    *link = Some(started);
                }
                let Some(l) = link.as_ref() else { break };
                let fds = [ready_w.as_raw_fd()];
                sent = sendmsg::<()>(
                    l.socket.as_raw_fd(),
                    &[IoSlice::new(&request)],
                    &[ControlMessage::ScmRights(&fds)],
                    MsgFlags::MSG_NOSIGNAL,
                    None,
                )
                .map(drop)
                .map_err(|e| format!("cannot reach the shim spawner: {e}"));
                if sent.is_ok() {
                    break;
                }
                if let Some(gone) = link.take() {
                    tracing::warn!(pid = gone.pid, error = %sent.as_ref().err().map_or("", String::as_str), "the shim spawner is gone; starting another");
                }
            }
            sent?;
        }
        drop(ready_w);
        let msg = match read_report(ready_r, REPORT_WITHIN) {
            Ok(msg) => msg,
            Err(Unreported::ShimDied(pid)) => {
                tracing::warn!(container = %args.id, shim = pid, "the shim died before it reported");
                return Err(format!("the shim (pid {pid}) died before it reported (killed?)"));
            }
            Err(Unreported::TimedOut(shim)) => {
                // Stuck: end the spawner (started again on the next request)
                // and the shim, if it was forked.
                let spawner = self.link.lock().unwrap_or_else(|p| p.into_inner()).take();
                if let Some(l) = &spawner {
                    let _ =
                        nix::sys::signal::kill(nix::unistd::Pid::from_raw(l.pid), nix::sys::signal::Signal::SIGKILL);
                }
                if let Some(pid) = shim.filter(|p| super::alive(*p)) {
                    let _ = nix::sys::signal::kill(nix::unistd::Pid::from_raw(pid), nix::sys::signal::Signal::SIGKILL);
                }
                tracing::warn!(container = %args.id, spawner = ?spawner.map(|l| l.pid), "the shim did not report within {} s: ended it and the spawner", REPORT_WITHIN.as_secs());
                return Err(format!(
                    "the shim did not report within {} s (the spawner or the shim was stuck; both were ended)",
                    REPORT_WITHIN.as_secs()
                ));
            }
        };
        match msg.strip_prefix("ok") {
            Some(_) => Ok(()),
            None if msg.is_empty() => Err("shim exited without reporting".into()),
            None => Err(msg.trim().to_string()),
        }
    }

    fn start(&self) -> Result<Link, String> {
        let (ours, theirs) = socketpair(AddressFamily::Unix, SockType::SeqPacket, None, SockFlag::SOCK_CLOEXEC)
            .map_err(|e| format!("cannot create the spawner's socket: {e}"))?;
        let fd = theirs.as_raw_fd();
        let mut cmd = Command::new(&self.exe);
        // Blank room for its shims' titles (see `title_room`).
        cmd.arg0("baton-spawner").arg("spawner").arg("--title-room").arg(" ".repeat(self.title_room));
        cmd.stdin(Stdio::null()).stdout(Stdio::null()).current_dir("/");
        // SAFETY: between fork and exec only async-signal-safe calls (dup2, fcntl).
        unsafe {
            cmd.pre_exec(move || {
                let r = if fd == SOCKET_FD { libc::fcntl(fd, libc::F_SETFD, 0) } else { libc::dup2(fd, SOCKET_FD) };
                if r < 0 {
                    return Err(std::io::Error::last_os_error());
                }
                Ok(())
            });
        }
        let status = cmd.status().map_err(|e| format!("cannot start the shim spawner {}: {e}", self.exe.display()))?;
        // It forked the spawner proper and left: no child of ours to reap,
        // in this process or in the agent that may exec into its successor.
        if !status.success() {
            return Err(format!("the shim spawner {} did not start: {status}", self.exe.display()));
        }
        drop(theirs);
        // Its first packet is its pid (to end it if it gets stuck).
        let hello = recv_within(&ours, Duration::from_secs(10))
            .map_err(|e| format!("the shim spawner {} did not say hello: {e}", self.exe.display()))?;
        let pid = std::str::from_utf8(&hello)
            .ok()
            .and_then(|h| h.strip_prefix("pid "))
            .and_then(|p| p.parse::<i32>().ok())
            .filter(|p| *p > 0)
            .ok_or_else(|| format!("the shim spawner {} said something else than its pid", self.exe.display()))?;
        Ok(Link { socket: ours, pid })
    }
}

/// Why a report did not come.
enum Unreported {
    /// Nothing by the deadline; the shim's pid, if the pipe said it.
    TimedOut(Option<i32>),
    /// The shim (this pid) is gone without a word.
    ShimDied(i32),
}

/// Reads the report pipe until EOF, without the pid line; gives up when
/// `within` passed, or as soon as the shim died without reporting.
fn read_report(fd: OwnedFd, within: Duration) -> Result<String, Unreported> {
    use nix::poll::{poll, PollFd, PollFlags, PollTimeout};
    let deadline = std::time::Instant::now() + within;
    let mut file = File::from(fd);
    let mut out = Vec::new();
    let mut buf = [0u8; 4096];
    let report = |out: &[u8]| split_pid_line(out).1;
    let shim = |out: &[u8]| split_pid_line(out).0;
    loop {
        let left = deadline.saturating_duration_since(std::time::Instant::now());
        if left.is_zero() {
            return Err(Unreported::TimedOut(shim(&out)));
        }
        let mut fds = [PollFd::new(std::os::fd::AsFd::as_fd(&file), PollFlags::POLLIN)];
        let ms = PollTimeout::try_from(left.as_millis().min(250) as i32).unwrap_or(PollTimeout::MAX);
        match poll(&mut fds, ms) {
            Ok(0) => {
                if let Some(pid) = shim(&out).filter(|p| !super::alive(*p)) {
                    return Err(Unreported::ShimDied(pid));
                }
                continue;
            }
            Err(nix::errno::Errno::EINTR) => continue,
            Err(_) => return Err(Unreported::TimedOut(shim(&out))),
            Ok(_) => {}
        }
        match file.read(&mut buf) {
            Ok(0) => return Ok(report(&out)),
            Ok(n) => out.extend_from_slice(&buf[..n]),
            Err(e) if e.kind() == std::io::ErrorKind::Interrupted => {}
            Err(_) => return Ok(report(&out)),
        }
    }
}

/// The shim's pid from the report pipe, and the report without that line.
/// The two writers race — the middle process writes the pid line, the shim
/// its report — so the line may come after a report with no newline of its
/// own (each write is whole: both are far under `PIPE_BUF`).
fn split_pid_line(out: &[u8]) -> (Option<i32>, String) {
    let text = String::from_utf8_lossy(out);
    let Some(at) = text.find(PID_LINE) else { return (None, text.into_owned()) };
    let rest = &text[at + PID_LINE.len()..];
    let digits = rest.len() - rest.trim_start_matches(|c: char| c.is_ascii_digit()).len();
    let after = &rest[digits..];
    let after = after.strip_prefix('\n').unwrap_or(after);
    (rest[..digits].parse().ok(), format!("{}{after}", &text[..at]))
}

/// One packet from `socket`, waiting at most `within`.
fn recv_within(socket: &OwnedFd, within: Duration) -> Result<Vec<u8>, String> {
    use nix::poll::{poll, PollFd, PollFlags, PollTimeout};
    let mut fds = [PollFd::new(std::os::fd::AsFd::as_fd(socket), PollFlags::POLLIN)];
    let ms = PollTimeout::try_from(within.as_millis() as i32).unwrap_or(PollTimeout::MAX);
    match poll(&mut fds, ms) {
        Ok(0) => return Err(format!("nothing within {} s", within.as_secs())),
        Err(e) => return Err(e.to_string()),
        Ok(_) => {}
    }
    let mut buf = [0u8; 64];
    let n = nix::sys::socket::recv(socket.as_raw_fd(), &mut buf, MsgFlags::empty()).map_err(|e| e.to_string())?;
    if n == 0 {
        return Err("it exited".into());
    }
    Ok(buf[..n].to_vec())
}

/// Entry point of `baton-agent spawner`: forks the spawner proper, which
/// serves requests on fd 3 until the runtime's end closes; returns the exit
/// code.
pub fn serve() -> i32 {
    // SAFETY: the runtime passed fd 3 to this process; nothing else owns it.
    let socket = unsafe { OwnedFd::from_raw_fd(SOCKET_FD) };
    // SAFETY: single-threaded; the parent only leaves.
    match unsafe { fork() } {
        Err(e) => {
            eprintln!("baton-agent spawner: fork: {e}");
            return 1;
        }
        // SAFETY: leaves at once; the child owns everything now.
        Ok(ForkResult::Parent { .. }) => unsafe { libc::_exit(0) },
        Ok(ForkResult::Child) => {
            let _ = nix::unistd::setsid();
        }
    }
    // `top`, `pidof baton-agent` and `killall baton-agent` tell it from the agent.
    set_comm(c"baton-spawner");
    let hello = format!("pid {}", std::process::id());
    if nix::sys::socket::send(socket.as_raw_fd(), hello.as_bytes(), MsgFlags::MSG_NOSIGNAL).is_err() {
        return 1;
    }
    let mut buf = vec![0u8; MAX_REQUEST];
    loop {
        let mut cmsg = nix::cmsg_space!([RawFd; 2]);
        let (n, ready) = {
            let mut iov = [IoSliceMut::new(&mut buf)];
            let msg = match recvmsg::<()>(socket.as_raw_fd(), &mut iov, Some(&mut cmsg), MsgFlags::MSG_CMSG_CLOEXEC) {
                Ok(m) => m,
                Err(nix::errno::Errno::EINTR) => continue,
                Err(_) => return 1,
            };
            let mut fds = Vec::new();
            if let Ok(cmsgs) = msg.cmsgs() {
                for c in cmsgs {
                    if let ControlMessageOwned::ScmRights(r) = c {
                        fds.extend(r);
                    }
                }
            }
            // SAFETY: descriptors just received are this process's to own.
            let mut owned: Vec<OwnedFd> = fds.into_iter().map(|f| unsafe { OwnedFd::from_raw_fd(f) }).collect();
            (msg.bytes, owned.pop())
        };
        // The runtime closed its end (stopped, died, or exec'd its successor).
        if n == 0 && ready.is_none() {
            return 0;
        }
        let Some(ready) = ready else { continue };
        let mut ready = File::from(ready);
        let args = match decode(&buf[..n]) {
            Ok(a) => a,
            Err(e) => {
                let _ = ready.write_all(format!("bad shim request: {e}").as_bytes());
                continue;
            }
        };
        // SAFETY: this process is single-threaded, so the child may run anything.
        match unsafe { fork() } {
            Err(e) => {
                let _ = ready.write_all(format!("fork: {e}").as_bytes());
            }
            Ok(ForkResult::Parent { child }) => {
                drop(ready);
                let _ = waitpid(child, None);
            }
            Ok(ForkResult::Child) => {
                let _ = nix::unistd::close(socket.as_raw_fd());
                // SAFETY: still single-threaded; the middle process only forks and exits.
                match unsafe { fork() } {
                    Ok(ForkResult::Child) => {
                        set_comm(c"baton-shim");
                        if let Err(e) = set_title(&args.id, &args.bundle) {
                            let _ = ready.write_all(format!("cannot set the shim's process title: {e}").as_bytes());
                            std::process::exit(1);
                        }
                        super::shim::run_detached(&args, ready)
                    }
                    Ok(ForkResult::Parent { child }) => {
                        let _ = ready.write_all(format!("{PID_LINE}{child}\n").as_bytes());
                    }
                    Err(e) => {
                        let _ = ready.write_all(format!("fork: {e}").as_bytes());
                    }
                }
                // SAFETY: leaves at once, running no destructors or exit handlers of the spawner's.
                unsafe { libc::_exit(0) }
            }
        }
    }
}

/// Rewrites this process's command line (the bytes the kernel shows in
/// `/proc/PID/cmdline`, on its stack) to `baton-shim shim --id ID --bundle
/// PATH` (without the bundle if it does not fit), and reads it back: the
/// runtime finds live shims by it.
fn set_title(id: &str, bundle: &Path) -> Result<(), String> {
    let stat = std::fs::read_to_string("/proc/self/stat").map_err(|e| format!("/proc/self/stat: {e}"))?;
    // Fields after the command name, which is in parentheses and may hold anything.
    let fields: Vec<&str> =
        stat.rsplit_once(')').map(|(_, rest)| rest.split_whitespace().collect()).unwrap_or_default();
    // arg_start and arg_end are fields 48 and 49; `fields[0]` is field 3.
    let field = |n: usize| fields.get(n - 3).and_then(|f| f.parse::<usize>().ok());
    let (Some(start), Some(end)) = (field(48), field(49)) else {
        return Err("no arg_start/arg_end in /proc/self/stat".into());
    };
    let room = end.saturating_sub(start);
    let title =
        Some(title_bytes(id, Some(bundle))).filter(|t| t.len() <= room).unwrap_or_else(|| title_bytes(id, None));
    if start == 0 || title.len() > room {
        return Err(format!("{} bytes of command line for a {}-byte title", room, title.len()));
    }
    let mut area = vec![0u8; room];
    area[..title.len()].copy_from_slice(&title);
    // SAFETY: [start, end) is this process's own argument area on its stack,
    // writable, and read by nothing else now (single-threaded; the arguments
    // were parsed before the fork).
    unsafe { std::ptr::copy_nonoverlapping(area.as_ptr(), start as *mut u8, room) };
    let shown = std::fs::read("/proc/self/cmdline").map_err(|e| format!("/proc/self/cmdline: {e}"))?;
    if shown.starts_with(&title) {
        Ok(())
    } else {
        Err("the kernel does not show the new command line".into())
    }
}

/// The process's name in `/proc/PID/comm` (what `top`, `pidof` and
/// `killall` match), at most 15 bytes.
fn set_comm(name: &std::ffi::CStr) {
    // SAFETY: PR_SET_NAME reads a NUL-terminated string of at most 16 bytes.
    unsafe { libc::prctl(libc::PR_SET_NAME, name.as_ptr() as libc::c_ulong, 0, 0, 0) };
}

fn title_bytes(id: &str, bundle: Option<&Path>) -> Vec<u8> {
    // `baton-shim` for `pidof`/`killall` (they match argv[0]); `shim` and
    // `--id ID` for the agents that recognise live shims by them, older
    // ones included (after a rollback).
    let mut words: Vec<&[u8]> = vec![b"baton-shim", b"shim", b"--id", id.as_bytes()];
    if let Some(b) = bundle {
        words.extend([b"--bundle".as_slice(), b.as_os_str().as_bytes()]);
    }
    words.iter().flat_map(|w| w.iter().copied().chain([0])).collect()
}

/// A request: the fields of `ShimArgs`, each followed by a NUL.
pub fn encode(args: &ShimArgs) -> Vec<u8> {
    let mut out = Vec::new();
    let fields: [&[u8]; 8] = [
        args.id.as_bytes(),
        args.bundle.as_os_str().as_bytes(),
        args.root.as_os_str().as_bytes(),
        args.state.as_os_str().as_bytes(),
        args.cgroup.as_bytes(),
        &(args.stop_grace.as_millis() as u64).to_string().into_bytes(),
        &args.log_max_bytes.to_string().into_bytes(),
        &(args.log_flush.as_millis() as u64).to_string().into_bytes(),
    ];
    for f in fields {
        out.extend_from_slice(f);
        out.push(0);
    }
    out
}

pub fn decode(bytes: &[u8]) -> Result<ShimArgs, String> {
    let Some(body) = bytes.strip_suffix(&[0]) else { return Err("not NUL-terminated".into()) };
    let fields: Vec<&[u8]> = body.split(|b| *b == 0).collect();
    let [id, bundle, root, state, cgroup, grace, max, flush] = fields[..] else {
        return Err(format!("{} fields, not 8", fields.len()));
    };
    let text = |f: &[u8], what: &str| String::from_utf8(f.to_vec()).map_err(|_| format!("{what} is not UTF-8"));
    let number = |f: &[u8], what: &str| text(f, what)?.parse::<u64>().map_err(|_| format!("{what} is not a number"));
    let path = |f: &[u8]| PathBuf::from(OsString::from_vec(f.to_vec()));
    let id = text(id, "id")?;
    super::validate_id(&id).map_err(|e| e.to_string())?;
    for (p, what) in [(bundle, "bundle"), (root, "root"), (state, "state")] {
        if !Path::new(std::ffi::OsStr::from_bytes(p)).is_absolute() {
            return Err(format!("{what} is not an absolute path"));
        }
    }
    Ok(ShimArgs {
        id,
        bundle: path(bundle),
        root: path(root),
        state: path(state),
        cgroup: text(cgroup, "cgroup")?,
        stop_grace: Duration::from_millis(number(grace, "stop grace")?),
        log_max_bytes: number(max, "log max bytes")?,
        log_flush: Duration::from_millis(number(flush, "log flush")?),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn args() -> ShimArgs {
        ShimArgs {
            id: "web-1.a_b".into(),
            bundle: "/var/lib/baton/containers/web-1".into(),
            root: "/run/baton/youki".into(),
            state: "/run/baton/shims/web-1".into(),
            cgroup: "/baton/web-1".into(),
            stop_grace: Duration::from_millis(2500),
            log_max_bytes: 1 << 20,
            log_flush: Duration::from_millis(1000),
        }
    }

    #[test]
    fn a_request_decodes_to_what_was_encoded() {
        let a = args();
        let b = decode(&encode(&a)).expect("decodes");
        assert_eq!(format!("{a:?}"), format!("{b:?}"));
    }

    #[test]
    fn malformed_requests_are_errors_not_panics() {
        let good = encode(&args());
        assert!(decode(&good[..good.len() - 1]).is_err(), "unterminated");
        for cut in 0..good.len() {
            let _ = decode(&good[..cut]);
        }
        let mut extra = good.clone();
        extra.extend_from_slice(b"more\0");
        assert!(decode(&extra).unwrap_err().contains("9 fields"));
        let bad_id = encode(&ShimArgs { id: "../etc".into(), ..args() });
        assert!(decode(&bad_id).is_err(), "an id that is not a container id");
        let relative = encode(&ShimArgs { bundle: "containers/web".into(), ..args() });
        assert!(decode(&relative).unwrap_err().contains("bundle"));
        let text = String::from_utf8(good).expect("utf8").replace("2500", "25x0");
        assert!(decode(text.as_bytes()).unwrap_err().contains("stop grace"));
    }

    #[test]
    fn a_shim_that_died_without_reporting_is_noticed_though_the_pipe_stays_open() {
        let mut gone = std::process::Command::new("true").spawn().expect("spawn true");
        let pid = gone.id() as i32;
        gone.wait().expect("wait");
        let (r, w) = nix::unistd::pipe2(nix::fcntl::OFlag::O_CLOEXEC).expect("pipe");
        let mut w = File::from(w);
        w.write_all(format!("{PID_LINE}{pid}\n").as_bytes()).expect("write");
        // `w` stays open, as a process the shim forked would keep it.
        let started = std::time::Instant::now();
        assert!(matches!(read_report(r, Duration::from_secs(20)), Err(Unreported::ShimDied(p)) if p == pid));
        assert!(started.elapsed() < Duration::from_secs(10), "noticed only at the deadline");
        drop(w);

        let (r, w) = nix::unistd::pipe2(nix::fcntl::OFlag::O_CLOEXEC).expect("pipe");
        let mut w = File::from(w);
        let me = std::process::id();
        w.write_all(format!("{PID_LINE}{me}\nok").as_bytes()).expect("write");
        drop(w);
        assert_eq!(
            read_report(r, Duration::from_secs(5)).ok().as_deref(),
            Some("ok"),
            "the pid line is not the report"
        );
        // The shim's report first, with no newline, then the pid line.
        let why = "cannot set the shim's process title: no arg_start/arg_end in /proc/self/stat";
        assert_eq!(split_pid_line(format!("{why}{PID_LINE}5674\n").as_bytes()), (Some(5674), why.to_string()));
        assert_eq!(split_pid_line(format!("{PID_LINE}12\nok").as_bytes()), (Some(12), "ok".to_string()));
        assert_eq!(split_pid_line(b"ok"), (None, "ok".to_string()));
    }

    #[test]
    fn the_title_fits_the_room_for_the_longest_id() {
        let spawner = Spawner::new("/proc/self/exe".into(), |id| Path::new("/var/lib/baton/containers").join(id));
        assert!(
            title_bytes(&"a".repeat(100), Some(Path::new("/var/lib/baton/containers/a"))).len() <= spawner.title_room
        );
        assert_eq!(
            spawner.title_room,
            title_bytes(&"a".repeat(100), None).len()
                + "--bundle".len()
                + 1
                + "/var/lib/baton/containers/".len()
                + 100
                + 1
        );
        let bundle = Path::new("/var/lib/baton/containers/web-1");
        assert_eq!(
            title_bytes("web-1", Some(bundle)),
            b"baton-shim\0shim\0--id\0web-1\0--bundle\0/var/lib/baton/containers/web-1\0"
        );
    }
}
