//! Interactive sessions (`baton exec -i/-t`): a process in a container, or
//! on the host when the device allows it, whose output goes to the
//! controller on `cmd/res` under the opening command's id and whose input
//! comes back as `Input` commands — all through the device's own outbound
//! MQTT connection.
//!
//! Each session is one thread that polls the process's output (a
//! pseudo-terminal, or stdout and stderr pipes) and one that writes its
//! input, so the link's loop never waits on a process. Bounded everywhere:
//! at most `WINDOW` bytes of output are sent ahead of the controller's
//! `Ack`s (so a fast process cannot fill the broker's queues or this
//! device's memory, and the link's request queue keeps room for heartbeats),
//! input waits in a short queue and each piece is answered once written, and
//! a session ends after `Limits::idle` without traffic, after `Limits::max`,
//! when the operator goes away (`Cancel`), or when the broker connection is
//! lost — its process and everything it started are killed, nothing stays.

use std::collections::HashMap;
use std::io::{Read, Write};
use std::os::fd::{AsFd, AsRawFd, FromRawFd, OwnedFd};
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Condvar, Mutex, PoisonError};
use std::time::{Duration, Instant};

use baton_protocol::{encode, CommandOutput, CommandResult, Message};
use rumqttc::{AsyncClient, QoS};
use tracing::{info, warn};

/// Output sent ahead of the controller's acknowledgements, per session.
pub const WINDOW: u64 = 128 * 1024;
/// … and by all sessions together, beyond one message each: with the
/// default limits (4 sessions, 32 connections) at most 16 + 36 messages sit
/// in the link's 64-slot request queue, so heartbeats and reports always
/// find room.
const DEVICE_WINDOW: u64 = 256 * 1024;
/// Output per message: 8 of them fill the window, so four sessions leave
/// half the link's request queue to heartbeats and reports.
const CHUNK: usize = 16 * 1024;
/// Input pieces waiting to be written (each at most a command's size).
const INPUT_QUEUE: usize = 8;
/// How often a session looks at its end conditions while its process is quiet.
const TICK: Duration = Duration::from_millis(200);

/// What the device allows (agent configuration).
#[derive(Debug, Clone)]
pub struct Limits {
    /// Sessions on the host itself (`--host`): off unless configured.
    pub host: bool,
    pub max_sessions: usize,
    /// Port-forwarded connections open at once (`Connect`).
    pub max_connections: usize,
    pub idle: Duration,
    pub max: Duration,
}

impl Default for Limits {
    fn default() -> Self {
        Self {
            host: false,
            max_sessions: 4,
            max_connections: 32,
            idle: Duration::from_secs(15 * 60),
            max: Duration::from_secs(8 * 3600),
        }
    }
}

/// What a session needs to open.
pub struct Open {
    pub id: u64,
    pub workload: String,
    pub host: bool,
    pub argv: Vec<String>,
    pub tty: bool,
    pub rows: u16,
    pub cols: u16,
    /// The operator's terminal type.
    pub term: String,
}

/// The terminal type a session's process gets: the operator's when it looks
/// like one, else xterm-256color.
pub fn terminal_type(term: &str) -> &str {
    let plausible = !term.is_empty()
        && term.len() <= 64
        && term.bytes().all(|b| b.is_ascii_alphanumeric() || matches!(b, b'-' | b'_' | b'.' | b'+'));
    if plausible {
        term
    } else {
        "xterm-256color"
    }
}

/// Where a session's messages go: `cmd/res`, from any thread.
#[derive(Clone)]
pub struct Out {
    pub client: AsyncClient,
    pub topic: String,
    pub rt: tokio::runtime::Handle,
}

impl Out {
    /// False when it could not be queued within 10 s (the link is gone).
    fn send(&self, id: u64, seq: u32, body: CommandOutput) -> bool {
        let Ok(bytes) = encode(&Message::CommandResult(CommandResult { id, seq, body })) else { return false };
        let publish = self.client.publish(&self.topic, QoS::AtLeastOnce, false, bytes);
        matches!(self.rt.block_on(async { tokio::time::timeout(Duration::from_secs(10), publish).await }), Ok(Ok(())))
    }
}

/// State a session's threads and the link share.
struct Shared {
    /// Output bytes the controller has passed on.
    acked: Mutex<u64>,
    moved: Condvar,
    /// Why it must end (set once; the session thread acts on it).
    end: Mutex<Option<String>>,
    /// Milliseconds since `opened` of the last input or output.
    active_ms: AtomicU64,
    opened: Instant,
    /// Output bytes sent.
    sent: AtomicU64,
    /// Output of all the device's sessions not acknowledged yet.
    device: Arc<AtomicU64>,
}

impl Shared {
    /// Forgets `bytes` of this session's output from the device's count.
    fn settle(&self, bytes: u64) {
        let _ = self.device.fetch_update(Ordering::Relaxed, Ordering::Relaxed, |v| Some(v.saturating_sub(bytes)));
    }
}

impl Shared {
    fn touch(&self) {
        self.active_ms.store(self.opened.elapsed().as_millis() as u64, Ordering::Relaxed);
    }

    fn end(&self, why: &str) {
        let mut end = self.end.lock().unwrap_or_else(PoisonError::into_inner);
        if end.is_none() {
            *end = Some(why.to_string());
        }
        self.moved.notify_all();
    }

    fn ended(&self) -> Option<String> {
        self.end.lock().unwrap_or_else(PoisonError::into_inner).clone()
    }

    /// Why `what` (a session, a copy) must end now: told to, idle too long,
    /// or open too long.
    fn must_end(&self, limits: &Limits, what: &str) -> Option<String> {
        self.ended().or_else(|| {
            let active = Duration::from_millis(self.active_ms.load(Ordering::Relaxed));
            if self.opened.elapsed().saturating_sub(active) >= limits.idle {
                Some(format!("{what} ended: idle for {} s (the device's limit)", limits.idle.as_secs()))
            } else if self.opened.elapsed() >= limits.max {
                Some(format!("{what} ended: open for {} s (the device's limit)", limits.max.as_secs()))
            } else {
                None
            }
        })
    }
}

/// One piece of input, answered on `cmd/res` under `id` once written.
struct Piece {
    id: u64,
    data: Vec<u8>,
    eof: bool,
}

struct Handle {
    input: std::sync::mpsc::SyncSender<Piece>,
    /// Offset of the next input byte taken.
    next_offset: u64,
    resize_seq: u32,
    /// The terminal's controlling side, for resizes.
    terminal: Option<Arc<OwnedFd>>,
    /// A port-forwarded connection (counted apart from processes).
    connection: bool,
    shared: Arc<Shared>,
}

/// The device's open sessions.
#[derive(Clone)]
pub struct Sessions {
    limits: Limits,
    open: Arc<Mutex<HashMap<u64, Handle>>>,
    /// Output of all sessions not acknowledged yet (`DEVICE_WINDOW`).
    in_flight: Arc<AtomicU64>,
}

impl Sessions {
    pub fn new(limits: Limits) -> Self {
        Self { limits, open: Arc::new(Mutex::new(HashMap::new())), in_flight: Arc::new(AtomicU64::new(0)) }
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, HashMap<u64, Handle>> {
        self.open.lock().unwrap_or_else(PoisonError::into_inner)
    }

    /// Open sessions: (processes, connections).
    pub fn count(&self) -> (usize, usize) {
        let open = self.lock();
        let connections = open.values().filter(|h| h.connection).count();
        (open.len() - connections, connections)
    }

    /// Starts a session; its output and end are answered under `req.id`.
    /// Err: why not (answered by the caller).
    pub fn open(
        &self,
        req: Open,
        runtime: Option<&Arc<dyn crate::runtime::ContainerRuntime + Send + Sync>>,
        data_dir: &std::path::Path,
        out: Out,
    ) -> Result<(), String> {
        if req.argv.is_empty() {
            return Err("a session needs a command to run".into());
        }
        if self.count().0 >= self.limits.max_sessions {
            return Err(format!(
                "this device already has {} sessions open, its limit (max_sessions in the agent's configuration)",
                self.limits.max_sessions
            ));
        }
        let mut cmd = if req.host {
            if !self.limits.host {
                return Err(
                    "this device does not allow sessions on its host (set remote_host_shell = true in its agent configuration)"
                        .into(),
                );
            }
            // A login's environment, not the agent's.
            let mut cmd = Command::new(&req.argv[0]);
            cmd.args(&req.argv[1..]).current_dir("/").env_clear().envs([
                ("PATH", "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"),
                ("HOME", "/root"),
                ("USER", "root"),
                ("LOGNAME", "root"),
            ]);
            if req.tty {
                cmd.env("TERM", terminal_type(&req.term));
            }
            cmd
        } else {
            let Some(rt) = runtime else { return Err("this agent runs no workloads".into()) };
            let Some(dir) = crate::commands::newest_container(data_dir, &req.workload) else {
                return Err(format!("workload {} is not running on this device", req.workload));
            };
            let id = dir.file_name().and_then(|n| n.to_str()).unwrap_or_default().to_string();
            if let Some(why) = crate::commands::not_running(rt.as_ref(), &id, &req.workload) {
                return Err(why);
            }
            let term = req.tty.then(|| terminal_type(&req.term));
            rt.session(&id, &req.argv, term, self.limits.max).map_err(|e| e.to_string())?
        };
        let host = req.host;
        let tty = req.tty;
        // SAFETY: only async-signal-safe calls between fork and exec.
        unsafe {
            std::os::unix::process::CommandExt::pre_exec(&mut cmd, move || {
                // The agent's death ends the session (the exec helper kills
                // its command on SIGHUP; a host shell gets it directly).
                libc::prctl(libc::PR_SET_PDEATHSIG, libc::SIGHUP);
                if host {
                    if libc::setsid() < 0 {
                        return Err(std::io::Error::last_os_error());
                    }
                    if tty && libc::ioctl(0, libc::TIOCSCTTY, 0) != 0 {
                        return Err(std::io::Error::last_os_error());
                    }
                }
                Ok(())
            });
        }
        let (mut child, io) = if req.tty {
            let (master, slave) = open_terminal(req.rows, req.cols).map_err(|e| format!("no terminal: {e}"))?;
            let dup = |fd: &OwnedFd| fd.try_clone().map(Stdio::from);
            let (i, o, e) = (dup(&slave), dup(&slave), dup(&slave));
            let (Ok(i), Ok(o), Ok(e)) = (i, o, e) else { return Err("no terminal: cannot share it".into()) };
            cmd.stdin(i).stdout(o).stderr(e);
            let child = cmd.spawn().map_err(|e| format!("cannot start {}: {e}", req.argv[0]))?;
            drop(slave);
            (Spawned { child: Some(child), host }, Io::Terminal(Arc::new(master)))
        } else {
            cmd.stdin(Stdio::piped()).stdout(Stdio::piped()).stderr(Stdio::piped());
            let child = cmd.spawn().map_err(|e| format!("cannot start {}: {e}", req.argv[0]))?;
            let mut child = Spawned { child: Some(child), host };
            let stdio = child.child.as_mut().map(|c| (c.stdin.take(), c.stdout.take(), c.stderr.take()));
            let Some((Some(i), Some(o), Some(e))) = stdio else {
                return Err("the process has no stdio".into());
            };
            (child, Io::Pipes { stdin: i.into(), stdout: o.into(), stderr: e.into() })
        };
        let shared = self.new_shared();
        let (input, pieces) = std::sync::mpsc::sync_channel(INPUT_QUEUE);
        let (writer, readers, terminal) = match io {
            Io::Terminal(master) => {
                let w = master.try_clone().map_err(|e| format!("no terminal: {e}"))?;
                (w, vec![(master.clone(), false)], Some(master))
            }
            Io::Pipes { stdin, stdout, stderr } => {
                (stdin, vec![(Arc::new(stdout), false), (Arc::new(stderr), true)], None)
            }
        };
        let what = if req.host { "the host".to_string() } else { format!("workload {}", req.workload) };
        info!(session = req.id, %what, tty, argv = ?req.argv, "session opened");
        let handle = Handle { input, next_offset: 0, resize_seq: 0, terminal, connection: false, shared };
        let (limits, id) = (self.limits.clone(), req.id);
        self.start(id, "session", handle, out, move |out, shared| {
            Self::start_input(writer, false, pieces, out, shared);
            run(child.child.take(), host, &readers, out, id, shared, &limits)
        })
    }

    /// Opens a port-forwarded connection to `port` of a workload's newest
    /// container, or of this device (`workload` empty), answered under `id`:
    /// `Text` once connected, then what the other side sends, `Exit(0)`
    /// when it closes, or `Error`.
    pub fn connect(
        &self,
        id: u64,
        workload: &str,
        port: u16,
        runtime: Option<&Arc<dyn crate::runtime::ContainerRuntime + Send + Sync>>,
        data_dir: &std::path::Path,
        out: Out,
    ) -> Result<(), String> {
        if port == 0 {
            return Err("port 0: which port to connect to".into());
        }
        if self.count().1 >= self.limits.max_connections {
            return Err(format!(
                "this device already has {} forwarded connections open, its limit (max_forwarded_connections)",
                self.limits.max_connections
            ));
        }
        let ip = if workload.is_empty() {
            std::net::IpAddr::V4(std::net::Ipv4Addr::LOCALHOST)
        } else {
            let Some(dir) = crate::commands::newest_container(data_dir, workload) else {
                return Err(format!("workload {workload} is not running on this device"));
            };
            let container = dir.file_name().and_then(|n| n.to_str()).unwrap_or_default().to_string();
            let Some(rt) = runtime else { return Err("this agent runs no workloads".into()) };
            // The host's loopback only for a container that runs on the
            // host's network (it reaches it itself): a stopped, restarting or
            // network-less one is refused, never sent to the host's ports.
            match (rt.on_host_network(&container), rt.address(&container)) {
                (Some(true), _) => std::net::IpAddr::V4(std::net::Ipv4Addr::LOCALHOST),
                (Some(false), Some(ip)) => ip,
                (Some(false), None) => {
                    return Err(format!("workload {workload} has no address on this device (network: none?)"))
                }
                (None, _) => return Err(format!("workload {workload} is not running on this device")),
            }
        };
        let addr = std::net::SocketAddr::new(ip, port);
        let (input, pieces) = std::sync::mpsc::sync_channel(INPUT_QUEUE);
        let handle = self.stream_handle(input);
        let limits = self.limits.clone();
        self.start(id, "forward", handle, out, move |out, shared| {
            let stream = match std::net::TcpStream::connect_timeout(&addr, Duration::from_secs(5)) {
                Ok(s) => s,
                Err(e) => return CommandOutput::Error(format!("cannot connect to {addr}: {e}")),
            };
            let _ = stream.set_nodelay(true);
            let socket = OwnedFd::from(stream);
            let writer = match socket.try_clone() {
                Ok(w) => w,
                Err(e) => return CommandOutput::Error(format!("cannot share the connection: {e}")),
            };
            info!(session = id, %addr, "forwarded connection opened");
            let _ = out.send(id, 0, CommandOutput::Text(format!("connected to {addr}")));
            Self::start_input(writer, true, pieces, out, shared);
            let socket = Arc::new(socket);
            let end = run(None, false, &[(socket.clone(), false)], out, id, shared, &limits);
            // Both ways: an input thread blocked writing to a peer that stopped
            // reading wakes up and ends with the session.
            // SAFETY: shutdown(2) on a socket we hold.
            unsafe { libc::shutdown(socket.as_raw_fd(), libc::SHUT_RDWR) };
            end
        })
    }

    /// The root a file transfer resolves its path in: the workload's newest
    /// container's, or the host's when host sessions are allowed.
    fn file_root(
        &self,
        workload: &str,
        host: bool,
        runtime: Option<&Arc<dyn crate::runtime::ContainerRuntime + Send + Sync>>,
        data_dir: &std::path::Path,
    ) -> Result<std::fs::File, String> {
        // Opened once: a container that restarts during a long copy cannot
        // lend its pid (and `/proc/PID/root`) to another process's root.
        let path = self.file_root_path(workload, host, runtime, data_dir)?;
        std::fs::File::open(&path).map_err(|e| format!("cannot open the root of {workload}: {e}"))
    }

    fn file_root_path(
        &self,
        workload: &str,
        host: bool,
        runtime: Option<&Arc<dyn crate::runtime::ContainerRuntime + Send + Sync>>,
        data_dir: &std::path::Path,
    ) -> Result<std::path::PathBuf, String> {
        if host {
            if !self.limits.host {
                return Err(
                    "this device does not allow file copies on its host (set remote_host_shell = true in its agent configuration)"
                        .into(),
                );
            }
            return Ok("/".into());
        }
        let Some(dir) = crate::commands::newest_container(data_dir, workload) else {
            return Err(format!("workload {workload} is not running on this device"));
        };
        let id = dir.file_name().and_then(|n| n.to_str()).unwrap_or_default().to_string();
        runtime
            .and_then(|rt| rt.root_of(&id))
            .ok_or_else(|| format!("workload {workload} is not running on this device"))
    }

    /// Registers a session and runs `body` on a thread of its own; when it
    /// returns, the session is forgotten and its final answer sent.
    fn start(
        &self,
        id: u64,
        kind: &'static str,
        handle: Handle,
        out: Out,
        body: impl FnOnce(&Out, &Arc<Shared>) -> CommandOutput + Send + 'static,
    ) -> Result<(), String> {
        let shared = handle.shared.clone();
        self.lock().insert(id, handle);
        let sessions = self.clone();
        let spawned = std::thread::Builder::new().name(format!("{kind}-{id}")).spawn(move || {
            let end = body(&out, &shared);
            sessions.lock().remove(&id);
            // What it sent and nobody acknowledged no longer counts against the others.
            let acked = *shared.acked.lock().unwrap_or_else(PoisonError::into_inner);
            shared.settle(shared.sent.load(Ordering::Relaxed).saturating_sub(acked));
            info!(session = id, kind, seconds = shared.opened.elapsed().as_secs(), outcome = ?end, "session closed");
            let _ = out.send(id, u32::MAX, end);
        });
        if let Err(e) = spawned {
            self.lock().remove(&id);
            return Err(format!("cannot start the {kind}'s thread: {e}"));
        }
        Ok(())
    }

    /// Starts the thread that writes a session's input.
    fn start_input(
        to: OwnedFd,
        socket: bool,
        pieces: std::sync::mpsc::Receiver<Piece>,
        out: &Out,
        shared: &Arc<Shared>,
    ) {
        let (out, shared2) = (out.clone(), shared.clone());
        let started = std::thread::Builder::new()
            .name("session-input".into())
            .spawn(move || write_input(to, socket, pieces, &out, &shared2));
        if started.is_err() {
            shared.end("cannot start the session's input thread");
        }
    }

    /// The handle of a session without a terminal or process: a forwarded
    /// connection or a copy (counted against `max_connections`).
    fn stream_handle(&self, input: std::sync::mpsc::SyncSender<Piece>) -> Handle {
        Handle { input, next_offset: 0, resize_seq: 0, terminal: None, connection: true, shared: self.new_shared() }
    }

    fn new_shared(&self) -> Arc<Shared> {
        Arc::new(Shared {
            acked: Mutex::new(0),
            moved: Condvar::new(),
            end: Mutex::new(None),
            active_ms: AtomicU64::new(0),
            opened: Instant::now(),
            sent: AtomicU64::new(0),
            device: self.in_flight.clone(),
        })
    }

    /// `baton cp` from the device: the file's bytes from `offset` as output,
    /// windowed like any session's, then its whole digest and `Exit(0)`.
    #[allow(clippy::too_many_arguments)]
    pub fn read_file(
        &self,
        id: u64,
        workload: &str,
        host: bool,
        path: &str,
        offset: u64,
        runtime: Option<&Arc<dyn crate::runtime::ContainerRuntime + Send + Sync>>,
        data_dir: &std::path::Path,
        out: Out,
    ) -> Result<(), String> {
        if self.count().1 >= self.limits.max_connections {
            return Err(format!("this device already has {} forwarded connections and copies open, its limit (max_forwarded_connections)", self.limits.max_connections));
        }
        let root = self.file_root(workload, host, runtime, data_dir)?;
        // Non-blocking: a FIFO the container planted opens at once (and is refused below).
        let mut file = open_in_root(&root, path, libc::O_RDONLY | libc::O_NONBLOCK, 0)
            .map_err(|e| format!("cannot open {path}: {e}"))?;
        let meta = file.metadata().map_err(|e| format!("{path}: {e}"))?;
        if !meta.is_file() {
            return Err(format!("{path} is not a regular file"));
        }
        if offset > meta.len() {
            return Err(format!("{path} has {} bytes; cannot resume at byte {offset}", meta.len()));
        }
        std::io::Seek::seek(&mut file, std::io::SeekFrom::Start(offset)).map_err(|e| format!("{path}: {e}"))?;
        let (input, _pieces) = std::sync::mpsc::sync_channel(1);
        let handle = self.stream_handle(input);
        let (limits, path) = (self.limits.clone(), path.to_string());
        self.start(id, "read", handle, out, move |out, shared| {
            let digest_of = file.try_clone().map_err(|e| e.to_string());
            match run(None, false, &[(Arc::new(OwnedFd::from(file)), false)], out, id, shared, &limits) {
                CommandOutput::Exit(_) => match digest_of.and_then(|f| sha256_hex(f).map_err(|e| e.to_string())) {
                    Ok(hex) => {
                        let _ = out.send(id, u32::MAX - 1, CommandOutput::Text(format!("sha256:{hex}")));
                        CommandOutput::Exit(0)
                    }
                    Err(e) => CommandOutput::Error(format!("cannot read {path} again for its digest: {e}")),
                },
                other => other,
            }
        })
    }

    /// `baton cp` to the device: the input appended to `PATH.baton-part`
    /// (kept between attempts: the first answer says how much it holds),
    /// checked against `sha256` at the end and renamed over `path`.
    #[allow(clippy::too_many_arguments)]
    pub fn write_file(
        &self,
        id: u64,
        workload: &str,
        host: bool,
        path: &str,
        mode: u32,
        sha256: Vec<u8>,
        runtime: Option<&Arc<dyn crate::runtime::ContainerRuntime + Send + Sync>>,
        data_dir: &std::path::Path,
        out: Out,
    ) -> Result<(), String> {
        if self.count().1 >= self.limits.max_connections {
            return Err(format!("this device already has {} forwarded connections and copies open, its limit (max_forwarded_connections)", self.limits.max_connections));
        }
        if sha256.len() != 32 {
            return Err("a copy needs the file's SHA-256 (32 bytes)".into());
        }
        if path.ends_with('/') || path.is_empty() {
            return Err(format!("{path:?} names no file"));
        }
        let root = self.file_root(workload, host, runtime, data_dir)?;
        let part = format!("{path}.baton-part");
        // Never through a symlink, never a FIFO or device: a regular file of
        // ours, read back (for the digest) and given its mode through this
        // same descriptor, whatever the container does to the name meanwhile.
        let flags = libc::O_RDWR | libc::O_CREAT | libc::O_APPEND | libc::O_NOFOLLOW | libc::O_NONBLOCK;
        let file = open_in_root(&root, &part, flags, 0o600).map_err(|e| format!("cannot write {part}: {e}"))?;
        if !file.metadata().is_ok_and(|m| m.is_file()) {
            return Err(format!("{part} is not a regular file"));
        }
        let have = file.metadata().map_err(|e| format!("{part}: {e}"))?.len();
        let (input, pieces) = std::sync::mpsc::sync_channel(INPUT_QUEUE);
        let handle = self.stream_handle(input);
        let (limits, path) = (self.limits.clone(), path.to_string());
        self.start(id, "write", handle, out, move |out, shared| {
            let _ = out.send(id, 0, CommandOutput::Text(format!("offset {have}")));
            let target = FileTarget { root, path: &path, part: &part, mode, sha256 };
            receive_file(file, &pieces, out, shared, &limits, &target)
        })
    }

    /// Input for a session: None when it was queued (the writer answers
    /// once written), else the answer now.
    pub fn input(&self, id: u64, session: u64, offset: u64, data: Vec<u8>, eof: bool) -> Option<CommandOutput> {
        let mut open = self.lock();
        let Some(h) = open.get_mut(&session) else { return Some(CommandOutput::Error("no such session".into())) };
        if offset != h.next_offset {
            // A replay, or a piece after a lost one: never written twice or out of order.
            return Some(CommandOutput::Error(format!(
                "input at byte {offset}, but the session's input is at byte {}",
                h.next_offset
            )));
        }
        let len = data.len() as u64;
        match h.input.try_send(Piece { id, data, eof }) {
            Ok(()) => {
                h.next_offset += len;
                h.shared.touch();
                None
            }
            Err(_) => Some(CommandOutput::Error("the session's input is full or closed; send it again".into())),
        }
    }

    pub fn resize(&self, session: u64, seq: u32, rows: u16, cols: u16) {
        let mut open = self.lock();
        let Some(h) = open.get_mut(&session) else { return };
        if seq <= h.resize_seq && h.resize_seq != 0 {
            return;
        }
        h.resize_seq = seq;
        if let Some(t) = &h.terminal {
            let _ = set_size(t, rows, cols);
        }
    }

    pub fn ack(&self, session: u64, received: u64) {
        let open = self.lock();
        let Some(h) = open.get(&session) else { return };
        let mut acked = h.shared.acked.lock().unwrap_or_else(PoisonError::into_inner);
        // (Never beyond what was sent: a bogus ack cannot free the device's budget.)
        let received = received.min(h.shared.sent.load(Ordering::Relaxed));
        if received > *acked {
            h.shared.settle(received - *acked);
            *acked = received;
            h.shared.moved.notify_all();
        }
        drop(acked);
        h.shared.touch();
    }

    /// Ends a session; false when there is none of that id.
    pub fn end(&self, session: u64, why: &str) -> bool {
        match self.lock().get(&session) {
            Some(h) => {
                h.shared.end(why);
                true
            }
            None => false,
        }
    }

    pub fn end_all(&self, why: &str) {
        for h in self.lock().values() {
            h.shared.end(why);
        }
    }
}

enum Io {
    Terminal(Arc<OwnedFd>),
    Pipes { stdin: OwnedFd, stdout: OwnedFd, stderr: OwnedFd },
}

/// A pseudo-terminal pair, both ends close-on-exec (no other child of the
/// agent inherits them), of this size.
fn open_terminal(rows: u16, cols: u16) -> std::io::Result<(OwnedFd, OwnedFd)> {
    // SAFETY: plain syscalls; each descriptor is owned as soon as it exists.
    unsafe {
        let raw = libc::posix_openpt(libc::O_RDWR | libc::O_NOCTTY | libc::O_CLOEXEC);
        if raw < 0 {
            return Err(std::io::Error::last_os_error());
        }
        let master = OwnedFd::from_raw_fd(raw);
        if libc::grantpt(raw) != 0 || libc::unlockpt(raw) != 0 {
            return Err(std::io::Error::last_os_error());
        }
        // The peer by descriptor (Linux 4.13+), not by a path in /dev/pts.
        let peer = libc::ioctl(raw, libc::TIOCGPTPEER, libc::O_RDWR | libc::O_NOCTTY | libc::O_CLOEXEC);
        if peer < 0 {
            return Err(std::io::Error::last_os_error());
        }
        let slave = OwnedFd::from_raw_fd(peer);
        set_size(&master, rows, cols)?;
        Ok((master, slave))
    }
}

fn set_size(terminal: &OwnedFd, rows: u16, cols: u16) -> std::io::Result<()> {
    let size = libc::winsize { ws_row: rows.max(1), ws_col: cols.max(1), ws_xpixel: 0, ws_ypixel: 0 };
    // SAFETY: TIOCSWINSZ reads one winsize from the pointer, which outlives the call.
    if unsafe { libc::ioctl(terminal.as_raw_fd(), libc::TIOCSWINSZ, &size) } != 0 {
        return Err(std::io::Error::last_os_error());
    }
    Ok(())
}

/// Writes input pieces in order, answering each; ends when the session does.
/// `socket`: the end of input half-closes the connection (its reading side
/// holds the descriptor open).
fn write_input(to: OwnedFd, socket: bool, pieces: std::sync::mpsc::Receiver<Piece>, out: &Out, shared: &Shared) {
    let mut to = Some(std::fs::File::from(to));
    while let Ok(piece) = pieces.recv() {
        let written = match &mut to {
            Some(f) => f.write_all(&piece.data),
            None => Err(std::io::Error::new(std::io::ErrorKind::BrokenPipe, "stdin was closed")),
        };
        if piece.eof {
            if let (true, Some(f)) = (socket, &to) {
                // SAFETY: shutdown(2) on a socket we hold.
                unsafe { libc::shutdown(f.as_raw_fd(), libc::SHUT_WR) };
            }
            to = None;
        }
        shared.touch();
        let answer = match written {
            Ok(()) => CommandOutput::Done,
            Err(e) => CommandOutput::Error(format!("the session's input is closed: {e}")),
        };
        if !out.send(piece.id, 0, answer) {
            break;
        }
    }
}

/// The session's life: output sent within the window until the process
/// ends (then what it left is drained) or the session must end (then the
/// process and what it started are killed). Returns the final answer.
fn run(
    mut child: Option<Child>,
    host: bool,
    readers: &[(Arc<OwnedFd>, bool)],
    out: &Out,
    id: u64,
    shared: &Shared,
    limits: &Limits,
) -> CommandOutput {
    let mut open: Vec<bool> = vec![true; readers.len()];
    let (mut sent, mut seq) = (0u64, 0u32);
    let mut buf = vec![0u8; CHUNK];
    let mut exited: Option<i32> = None;
    let mut why: Option<String> = None;
    loop {
        let must_end = || shared.must_end(limits, "session");
        if exited.is_none() {
            if let Some(reason) = must_end() {
                why = Some(reason);
                match &mut child {
                    Some(c) => stop(c, host),
                    // A connection: closed with the session, nothing to drain.
                    None => break,
                }
            }
            match child.as_mut().map(Child::try_wait) {
                Some(Ok(Some(status))) => exited = Some(code_of(status)),
                Some(Ok(None)) => {}
                Some(Err(e)) => {
                    warn!(session = id, error = %e, "cannot wait for the session's process");
                    exited = Some(255);
                }
                // A connection ends when the other side closed it.
                None if !open.iter().any(|o| *o) => exited = Some(0),
                None => {}
            }
        }
        if !open.iter().any(|o| *o) && exited.is_some() {
            break;
        }
        // What escaped the process (a daemon still writing) does not keep the session past its limits.
        if exited.is_some() {
            if let Some(reason) = must_end() {
                why.get_or_insert(reason);
                break;
            }
        }
        // A window ahead of the controller at most: wait for it to catch up
        // (also after the process ended, so its last words are not lost).
        let acked = shared.acked.lock().unwrap_or_else(PoisonError::into_inner);
        let own = sent.saturating_sub(*acked);
        if own >= WINDOW || (own > 0 && shared.device.load(Ordering::Relaxed) >= DEVICE_WINDOW) {
            if why.is_some() || (exited.is_some() && must_end().is_some()) {
                break; // the output the controller did not take goes with the session
            }
            let _ = shared.moved.wait_timeout(acked, TICK);
            continue;
        }
        drop(acked);
        let timeout = if exited.is_some() { 0u16 } else { TICK.as_millis() as u16 };
        let mut fds: Vec<nix::poll::PollFd> = readers
            .iter()
            .zip(&open)
            .filter(|(_, o)| **o)
            .map(|((fd, _), _)| nix::poll::PollFd::new(fd.as_fd(), nix::poll::PollFlags::POLLIN))
            .collect();
        let ready = nix::poll::poll(&mut fds, nix::poll::PollTimeout::from(timeout));
        let revents: Vec<bool> = fds.iter().map(|p| p.revents().is_some_and(|r| !r.is_empty())).collect();
        drop(fds);
        match ready {
            Ok(0) if exited.is_some() => break, // drained: nothing more came
            Ok(_) => {}
            Err(nix::Error::EINTR) => continue,
            Err(e) => {
                warn!(session = id, error = %e, "cannot poll the session's output");
                break;
            }
        }
        let mut which = revents.into_iter();
        for (i, (fd, stderr)) in readers.iter().enumerate() {
            if !open[i] || !which.next().unwrap_or(false) {
                continue;
            }
            let mut f = std::mem::ManuallyDrop::new(unsafe_file(fd));
            match f.read(&mut buf) {
                Ok(0) | Err(_) => open[i] = false, // EOF, or EIO: the terminal's last user left
                Ok(n) => {
                    let body = if *stderr {
                        CommandOutput::Stderr(buf[..n].to_vec())
                    } else {
                        CommandOutput::Stdout(buf[..n].to_vec())
                    };
                    sent += n as u64;
                    shared.sent.store(sent, Ordering::Relaxed);
                    shared.device.fetch_add(n as u64, Ordering::Relaxed);
                    shared.touch();
                    if !out.send(id, seq, body) {
                        shared.end("the link is gone");
                    }
                    seq += 1;
                }
            }
        }
    }
    if let (None, Some(c)) = (exited, &mut child) {
        stop(c, host);
    }
    // What a host session started goes with it (background jobs included);
    // the exec helper does the same in a container.
    if let (true, Some(c)) = (host, &child) {
        crate::runtime::kill_session(c.id() as i32);
    }
    match why {
        Some(reason) => CommandOutput::Error(reason),
        None => CommandOutput::Exit(exited.unwrap_or(255)),
    }
}

/// A `File` view of a descriptor someone else owns (never dropped as a File).
fn unsafe_file(fd: &OwnedFd) -> std::fs::File {
    // SAFETY: wrapped in ManuallyDrop by the caller, so `fd` is never closed twice.
    unsafe { std::fs::File::from_raw_fd(fd.as_raw_fd()) }
}

/// Ends the process and what it started: the exec helper kills its command
/// on SIGTERM; a host session leads its own process group.
/// A session's process until its thread takes it over. Dropped on any way
/// out before that (a step that failed after the spawn, a thread that could
/// not start), it is stopped with what it started, so nothing is left
/// running on the device for an operator nobody answers.
struct Spawned {
    child: Option<Child>,
    host: bool,
}

impl Drop for Spawned {
    fn drop(&mut self) {
        if let Some(mut c) = self.child.take() {
            stop(&mut c, self.host);
            if self.host {
                crate::runtime::kill_session(c.id() as i32);
            }
        }
    }
}

fn stop(child: &mut Child, host: bool) {
    let pid = child.id() as i32;
    // SAFETY: kill(2) with our own child's pid (or its process group).
    unsafe {
        if host {
            libc::kill(-pid, libc::SIGKILL);
        } else {
            libc::kill(pid, libc::SIGTERM);
        }
    }
    let deadline = Instant::now() + Duration::from_secs(5);
    while Instant::now() < deadline {
        if let Ok(Some(_)) = child.try_wait() {
            return;
        }
        std::thread::sleep(Duration::from_millis(10));
    }
    let _ = child.kill();
    let _ = child.wait();
}

fn code_of(status: std::process::ExitStatus) -> i32 {
    use std::os::unix::process::ExitStatusExt;
    status.code().unwrap_or_else(|| 128 + status.signal().unwrap_or(0))
}

/// Where a received file goes.
struct FileTarget<'a> {
    root: std::fs::File,
    path: &'a str,
    part: &'a str,
    mode: u32,
    sha256: Vec<u8>,
}

/// Writes a transfer's pieces to its partial copy, answering each; at the
/// end checks the digest and puts the copy in place.
fn receive_file(
    mut file: std::fs::File,
    pieces: &std::sync::mpsc::Receiver<Piece>,
    out: &Out,
    shared: &Shared,
    limits: &Limits,
    target: &FileTarget<'_>,
) -> CommandOutput {
    let discard = || {
        let _ = remove_in_root(&target.root, target.part);
    };
    loop {
        // Also while pieces keep coming: a copy stays within session_max_s.
        if let Some(why) = shared.must_end(limits, "copy") {
            return CommandOutput::Error(why);
        }
        let piece = match pieces.recv_timeout(TICK) {
            Ok(p) => p,
            Err(std::sync::mpsc::RecvTimeoutError::Timeout) => continue,
            Err(std::sync::mpsc::RecvTimeoutError::Disconnected) => {
                return CommandOutput::Error(shared.ended().unwrap_or_else(|| "copy ended".into()));
            }
        };
        let written = file.write_all(&piece.data);
        shared.touch();
        let answer = match &written {
            Ok(()) => CommandOutput::Done,
            Err(e) => CommandOutput::Error(format!("cannot write {}: {e}", target.part)),
        };
        if !out.send(piece.id, 0, answer) || written.is_err() {
            return CommandOutput::Error(format!("copy to {} stopped", target.path));
        }
        if !piece.eof {
            continue;
        }
        if let Err(e) = file.sync_all() {
            return CommandOutput::Error(format!("cannot write {}: {e}", target.part));
        }
        let digest = file.try_clone().and_then(sha256_hex);
        let want: String = target.sha256.iter().map(|b| format!("{b:02x}")).collect();
        return match digest {
            Ok(hex) if hex == want => {
                match finish_in_root(&file, &target.root, target.part, target.path, target.mode) {
                    Ok(()) => CommandOutput::Exit(0),
                    Err(e) => CommandOutput::Error(format!("cannot put {} in place: {e}", target.path)),
                }
            }
            Ok(hex) => {
                discard();
                CommandOutput::Error(format!(
                    "the copy's SHA-256 is {hex}, not {want}: it was discarded (copy again from the start)"
                ))
            }
            Err(e) => CommandOutput::Error(format!("cannot read {} back: {e}", target.part)),
        };
    }
}

fn sha256_hex(mut file: std::fs::File) -> std::io::Result<String> {
    use sha2::Digest;
    std::io::Seek::seek(&mut file, std::io::SeekFrom::Start(0))?;
    let mut hasher = sha2::Sha256::new();
    let mut buf = vec![0u8; 64 * 1024];
    loop {
        match file.read(&mut buf)? {
            0 => break,
            n => hasher.update(&buf[..n]),
        }
    }
    Ok(hasher.finalize().iter().map(|b| format!("{b:02x}")).collect())
}

/// Opens `path` as seen from `root` (a container's `/proc/PID/root`, or
/// `/`): absolute symlinks and `..` resolve inside it (openat2
/// RESOLVE_IN_ROOT), so no path a container's files name can reach the
/// host's. Linux 5.6+.
fn open_in_root(dir: &std::fs::File, path: &str, flags: i32, mode: u32) -> std::io::Result<std::fs::File> {
    let rel = std::ffi::CString::new(path.trim_start_matches('/').as_bytes())
        .map_err(|_| std::io::Error::new(std::io::ErrorKind::InvalidInput, "a path with a NUL byte"))?;
    let rel = if rel.as_bytes().is_empty() { std::ffi::CString::new(".").unwrap_or_default() } else { rel };
    // SAFETY: open_how is plain data, zeroed then filled.
    let mut how: libc::open_how = unsafe { std::mem::zeroed() };
    // (openat2 refuses any flag O_PATH does not take, O_NOCTTY included.)
    let extra = if flags & libc::O_PATH != 0 { libc::O_CLOEXEC } else { libc::O_CLOEXEC | libc::O_NOCTTY };
    how.flags = (flags | extra) as u64;
    how.mode = if flags & libc::O_CREAT != 0 { u64::from(mode) } else { 0 };
    how.resolve = libc::RESOLVE_IN_ROOT | libc::RESOLVE_NO_MAGICLINKS;
    // SAFETY: openat2 reads `how` (its size given) and the NUL-terminated path.
    let fd = unsafe {
        libc::syscall(
            libc::SYS_openat2,
            dir.as_raw_fd(),
            rel.as_ptr(),
            &how as *const libc::open_how,
            std::mem::size_of::<libc::open_how>(),
        )
    };
    if fd < 0 {
        return Err(std::io::Error::last_os_error());
    }
    // SAFETY: openat2 just returned this descriptor; we own it.
    Ok(unsafe { std::fs::File::from_raw_fd(fd as i32) })
}

/// The directory holding `path` inside `root`, opened the same safe way, and the file's name.
fn parent_in_root(root: &std::fs::File, path: &str) -> std::io::Result<(std::fs::File, std::ffi::CString)> {
    let trimmed = path.trim_start_matches('/');
    let (dir, name) = match trimmed.rsplit_once('/') {
        Some((d, n)) => (d, n),
        None => ("", trimmed),
    };
    if name.is_empty() || name == "." || name == ".." {
        return Err(std::io::Error::new(std::io::ErrorKind::InvalidInput, "the path names no file"));
    }
    let parent = open_in_root(root, dir, libc::O_RDONLY | libc::O_DIRECTORY, 0)?;
    let name = std::ffi::CString::new(name)
        .map_err(|_| std::io::Error::new(std::io::ErrorKind::InvalidInput, "a path with a NUL byte"))?;
    Ok((parent, name))
}

fn remove_in_root(root: &std::fs::File, path: &str) -> std::io::Result<()> {
    let (dir, name) = parent_in_root(root, path)?;
    // SAFETY: unlinkat relative to a directory we hold open.
    if unsafe { libc::unlinkat(dir.as_raw_fd(), name.as_ptr(), 0) } != 0 {
        return Err(std::io::Error::last_os_error());
    }
    Ok(())
}

/// Gives the partial copy (`file`) its mode and renames it over `path`,
/// once sure the name still holds that file (not a link put there since).
fn finish_in_root(
    file: &std::fs::File,
    root: &std::fs::File,
    part: &str,
    path: &str,
    mode: u32,
) -> std::io::Result<()> {
    use std::os::unix::fs::{MetadataExt, PermissionsExt};
    file.set_permissions(std::fs::Permissions::from_mode(mode & 0o7777))?;
    let (dir, part_name) = parent_in_root(root, part)?;
    let (dir2, name) = parent_in_root(root, path)?;
    let ours = file.metadata()?;
    // What the name holds now (a link itself, not followed): it must be our file.
    let now = open_in_root(root, part, libc::O_PATH | libc::O_NOFOLLOW, 0)?.metadata()?;
    if now.dev() != ours.dev() || now.ino() != ours.ino() {
        return Err(std::io::Error::other(format!("{part} was replaced during the copy")));
    }
    // SAFETY: renameat relative to directories we hold open.
    if unsafe { libc::renameat(dir.as_raw_fd(), part_name.as_ptr(), dir2.as_raw_fd(), name.as_ptr()) } != 0 {
        return Err(std::io::Error::last_os_error());
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn shared_opened(ago: Duration) -> Shared {
        Shared {
            acked: Mutex::new(0),
            moved: Condvar::new(),
            end: Mutex::new(None),
            active_ms: AtomicU64::new(0),
            opened: Instant::now().checked_sub(ago).unwrap(),
            sent: AtomicU64::new(0),
            device: Arc::new(AtomicU64::new(0)),
        }
    }

    #[test]
    fn sessions_and_copies_end_when_idle_open_too_long_or_told() {
        let limits = Limits { idle: Duration::from_secs(5), max: Duration::from_secs(60), ..Limits::default() };
        // Nothing moved for 10 s: idle.
        let s = shared_opened(Duration::from_secs(10));
        assert_eq!(s.must_end(&limits, "copy").unwrap(), "copy ended: idle for 5 s (the device's limit)");
        // Busy, but open past the maximum (a copy that never stops sending).
        let s = shared_opened(Duration::from_secs(61));
        s.touch();
        assert_eq!(s.must_end(&limits, "copy").unwrap(), "copy ended: open for 60 s (the device's limit)");
        // Busy and young: goes on until told.
        let s = shared_opened(Duration::from_secs(3));
        s.touch();
        assert_eq!(s.must_end(&limits, "session"), None);
        s.end("session ended by the operator");
        assert_eq!(s.must_end(&limits, "session").unwrap(), "session ended by the operator");
    }

    #[test]
    fn a_process_no_session_took_over_is_stopped() {
        let child = Command::new("sleep").arg("313").spawn().unwrap();
        let pid = child.id();
        let alive = || std::fs::read_to_string(format!("/proc/{pid}/stat")).is_ok();
        assert!(alive());
        // The session's thread never ran: its closure, and this, dropped.
        drop(Spawned { child: Some(child), host: false });
        assert!(!alive(), "the session's process was left running");
        // Taken over: left to the session.
        let mut child = Spawned { child: Some(Command::new("sleep").arg("314").spawn().unwrap()), host: false };
        let mut taken = child.child.take().unwrap();
        drop(child);
        assert!(taken.try_wait().unwrap().is_none(), "a process the session owns was stopped");
        let _ = taken.kill();
        let _ = taken.wait();
    }
}
