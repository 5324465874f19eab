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
//! Each shim rewrites its command line to `baton-agent shim --id ID --bundle
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
/// Bytes of command line the spawner is started with, for its shims' titles
/// (`baton-agent shim --id ID --bundle PATH`; ids are at most 100 bytes).
const TITLE_ROOM: usize = 1024;
/// Largest request: eight fields, paths included.
const MAX_REQUEST: usize = 16 * 1024;

/// The runtime's side: starts the spawner when needed and asks it for shims.
#[derive(Debug)]
pub struct Spawner {
    exe: PathBuf,
    link: Mutex<Option<Link>>,
}

#[derive(Debug)]
struct Link {
    /// Closing it ends the spawner.
    socket: OwnedFd,
}

impl Spawner {
    /// `exe` provides the `spawner` subcommand (the agent binary itself).
    pub fn new(exe: PathBuf) -> Self {
        Self { exe, link: Mutex::new(None) }
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
                    *link = Some(self.start()?);
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
                *link = None;
            }
            sent?;
        }
        drop(ready_w);
        let mut msg = String::new();
        let _ = File::from(ready_r).read_to_string(&mut msg);
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
        // Blank room for its shims' titles: invisible in `ps`.
        cmd.arg("spawner").arg("--title-room").arg(" ".repeat(TITLE_ROOM));
        cmd.stdin(Stdio::null()).stdout(Stdio::null());
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
        Ok(Link { socket: ours })
    }
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
                        if let Err(e) = set_title(&args.id, &args.bundle) {
                            let _ = ready.write_all(format!("cannot set the shim's process title: {e}").as_bytes());
                            std::process::exit(1);
                        }
                        super::shim::run_detached(&args, ready)
                    }
                    Ok(ForkResult::Parent { .. }) => {}
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
/// `/proc/PID/cmdline`, on its stack) to `baton-agent shim --id ID --bundle
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

fn title_bytes(id: &str, bundle: Option<&Path>) -> Vec<u8> {
    let mut words: Vec<&[u8]> = vec![b"baton-agent", b"shim", b"--id", id.as_bytes()];
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
    fn the_title_fits_the_room_for_the_longest_id() {
        assert!(title_bytes(&"a".repeat(100), None).len() <= TITLE_ROOM);
        let bundle = Path::new("/var/lib/baton/containers/web-1");
        assert_eq!(
            title_bytes("web-1", Some(bundle)),
            b"baton-agent\0shim\0--id\0web-1\0--bundle\0/var/lib/baton/containers/web-1\0"
        );
    }
}
