//! `baton exec -i/-t`: the operator's end of an interactive session. The
//! local terminal goes raw (every key, Ctrl-C included, goes to the remote
//! terminal, which decides what it means) and comes back as it was however
//! the session ends; stdin is passed on piece by piece, each piece once the
//! device wrote the one before; a change of window size follows.

use std::io::{Read, Write};
use std::time::Duration;

use crate::api::client::Client;
use crate::sessions::Frame;
use crate::view::SessionRequest;

/// How often the window's size is looked at.
const SIZE_EVERY: Duration = Duration::from_millis(250);

/// Runs the session to its end and exits with the remote command's exit
/// code (255 when the session ended otherwise, saying why on stderr).
pub fn run(client: &Client, device: &str, mut req: SessionRequest, pass_stdin: bool) -> anyhow::Result<()> {
    let local_tty = is_terminal(0);
    if req.tty {
        let (rows, cols) = window_size().unwrap_or((24, 80));
        (req.rows, req.cols) = (rows, cols);
    }
    let tty = req.tty;
    let (session, mut frames, mut stream) = client.session_open(device, &req)?;
    // Raw only once the session is open: an error above prints normally.
    let _raw = if tty && local_tty { Raw::enter() } else { None };
    std::thread::scope(|scope| {
        if pass_stdin {
            scope.spawn(move || {
                // Up to as much as the controller sends the device at once.
                let mut buf = vec![0u8; 8 * crate::sessions::INPUT_CHUNK];
                let mut stdin = std::io::stdin().lock();
                let mut escape = Escape::default();
                loop {
                    match stdin.read(&mut buf) {
                        Ok(0) => {
                            // End of input: the remote stdin closes (a terminal has none to close).
                            if !tty {
                                let _ = client.session_input(session, &[], true);
                            }
                            return;
                        }
                        Ok(n) => {
                            let keys =
                                if tty && local_tty { escape.filter(&buf[..n]) } else { Some(buf[..n].to_vec()) };
                            let Some(keys) = keys else {
                                restore_terminal();
                                eprint!("\r\nbaton: session left (~.); it ends on the device\r\n");
                                std::process::exit(255);
                            };
                            if !keys.is_empty() {
                                if let Err(e) = client.session_input(session, &keys, false) {
                                    // Usually the session ended (the output side says so);
                                    // if it did not, say why typing stopped working.
                                    std::thread::sleep(Duration::from_secs(1));
                                    restore_terminal();
                                    eprint!("\r\nbaton: input refused: {e}\r\n");
                                    std::process::exit(255);
                                }
                            }
                        }
                        Err(e) if e.kind() == std::io::ErrorKind::Interrupted => {}
                        Err(_) => return,
                    }
                }
            });
        }
        if tty && local_tty {
            scope.spawn(move || {
                let mut last = window_size();
                loop {
                    std::thread::sleep(SIZE_EVERY);
                    let now = window_size();
                    if now != last {
                        if let Some((rows, cols)) = now {
                            if client.session_resize(session, rows, cols).is_err() {
                                return;
                            }
                        }
                        last = now;
                    }
                }
            });
        }
        let code = relay(&mut frames, &mut stream);
        drop(_raw);
        // The other threads block on stdin or sleep: the exit ends them
        // (a scope would wait for them).
        std::process::exit(code.unwrap_or_else(|e| {
            eprintln!("baton: {e}");
            255
        }))
    })
}

/// Copies output frames to stdout and stderr until the session ends.
fn relay(frames: &mut crate::sessions::FrameReader, stream: &mut dyn Read) -> anyhow::Result<i32> {
    let mut buf = vec![0u8; 32 * 1024];
    let (mut out, mut err) = (std::io::stdout().lock(), std::io::stderr());
    loop {
        while let Some(frame) = frames.next_frame().map_err(|e| anyhow::anyhow!("{e}"))? {
            match frame {
                Frame::Stdout(b) => {
                    out.write_all(&b)?;
                    out.flush()?;
                }
                Frame::Stderr(b) => {
                    err.write_all(&b)?;
                    err.flush()?;
                }
                Frame::Exit(code) => return Ok(code.clamp(0, 255)),
                Frame::Error(why) => {
                    let _ = out.flush();
                    eprint!("\r\nbaton: {why}\r\n");
                    return Ok(255);
                }
                Frame::Opened(_) | Frame::Text(_) => {}
            }
        }
        let n = stream.read(&mut buf).map_err(|e| anyhow::anyhow!("the connection to the controller broke: {e}"))?;
        if n == 0 {
            eprint!("\r\nbaton: the controller ended the session\r\n");
            return Ok(255);
        }
        frames.push(&buf[..n]);
    }
}

fn is_terminal(fd: i32) -> bool {
    // SAFETY: isatty only reads the descriptor's type.
    unsafe { libc::isatty(fd) == 1 }
}

/// The local terminal's rows and columns (None: stdout is no terminal).
fn window_size() -> Option<(u16, u16)> {
    let mut size = libc::winsize { ws_row: 0, ws_col: 0, ws_xpixel: 0, ws_ypixel: 0 };
    // SAFETY: TIOCGWINSZ writes one winsize to a pointer that outlives the call.
    let ok = unsafe { libc::ioctl(1, libc::TIOCGWINSZ, &mut size) } == 0 && size.ws_row > 0;
    ok.then_some((size.ws_row, size.ws_col))
}

/// The local terminal's settings before it went raw (restored from any thread).
static SAVED: std::sync::OnceLock<libc::termios> = std::sync::OnceLock::new();

/// Puts the local terminal back as it was (when it was made raw).
fn restore_terminal() {
    if let Some(saved) = SAVED.get() {
        // SAFETY: restores settings tcgetattr gave.
        unsafe { libc::tcsetattr(0, libc::TCSANOW, saved) };
    }
}

/// The local terminal in raw mode, restored when dropped.
struct Raw;

impl Raw {
    fn enter() -> Option<Self> {
        // SAFETY: tcgetattr/tcsetattr on stdin with termios values we own.
        unsafe {
            let mut saved: libc::termios = std::mem::zeroed();
            if libc::tcgetattr(0, &mut saved) != 0 {
                return None;
            }
            let mut raw = saved;
            libc::cfmakeraw(&mut raw);
            let _ = SAVED.set(saved);
            if libc::tcsetattr(0, libc::TCSANOW, &raw) != 0 {
                return None;
            }
            Some(Self)
        }
    }
}

impl Drop for Raw {
    fn drop(&mut self) {
        restore_terminal();
    }
}

/// ssh's escape: `~.` at the start of a line leaves the session even when
/// nothing answers (every other key, Ctrl-C included, goes to the remote
/// side); `~~` sends one `~`.
#[derive(Default)]
struct Escape {
    /// Not at the start of a line.
    mid_line: bool,
    /// A `~` at the start of a line, held back.
    tilde: bool,
}

impl Escape {
    /// The keys to send; None: leave.
    fn filter(&mut self, keys: &[u8]) -> Option<Vec<u8>> {
        let mut out = Vec::with_capacity(keys.len());
        for &k in keys {
            if self.tilde {
                self.tilde = false;
                match k {
                    b'.' => return None,
                    b'~' => {
                        out.push(b'~');
                        self.mid_line = true;
                        continue;
                    }
                    _ => out.push(b'~'),
                }
            } else if k == b'~' && !self.mid_line {
                self.tilde = true;
                continue;
            }
            out.push(k);
            self.mid_line = !matches!(k, b'\r' | b'\n');
        }
        Some(out)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn tilde_dot_at_a_line_start_leaves_and_nothing_else_does() {
        let mut e = Escape::default();
        assert_eq!(e.filter(b"ls ~/x\r"), Some(b"ls ~/x\r".to_vec()));
        assert_eq!(e.filter(b"~"), Some(Vec::new()), "held back");
        assert_eq!(e.filter(b"~"), Some(b"~".to_vec()), "~~ is one ~");
        assert_eq!(e.filter(b"a.\r~x"), Some(b"a.\r~x".to_vec()));
        assert_eq!(e.filter(b"\r~."), None);
        let mut fresh = Escape::default();
        assert_eq!(fresh.filter(b"~."), None, "at the very start");
        let mut mid = Escape::default();
        assert_eq!(mid.filter(b"echo ~."), Some(b"echo ~.".to_vec()));
    }

    #[test]
    fn the_device_side_of_a_copy_is_workload_colon_absolute_path() {
        assert_eq!(copy_side("web:/etc/x"), CopySide::Remote { workload: "web".into(), path: "/etc/x".into() });
        assert_eq!(copy_side(":/etc/x"), CopySide::Remote { workload: String::new(), path: "/etc/x".into() });
        assert_eq!(copy_side("./a:b"), CopySide::Local("./a:b".into()));
        assert_eq!(copy_side("dir/web:/x"), CopySide::Local("dir/web:/x".into()));
        assert_eq!(copy_side("C:relative"), CopySide::Local("C:relative".into()));
    }
}

/// `baton port-forward`: every connection accepted on `listen` becomes one
/// forwarded connection to `port` on the device, in both directions, until
/// either side closes it. Runs until interrupted.
pub fn forward(
    client: &Client,
    device: &str,
    workload: String,
    listen: std::net::SocketAddr,
    port: u16,
) -> anyhow::Result<()> {
    // Refusals (token, tenant, device, workload) now, not at the first connection.
    client.check_connect(device, &crate::view::ConnectRequest { workload: workload.clone(), port, check: true })?;
    let listener =
        std::net::TcpListener::bind(listen).map_err(|e| anyhow::anyhow!("cannot listen on {listen}: {e}"))?;
    let local = listener.local_addr()?;
    let target =
        if workload.is_empty() { format!("{device} port {port}") } else { format!("{device} {workload} port {port}") };
    eprintln!("Forwarding {local} -> {target} (Ctrl-C to stop)");
    std::thread::scope(|scope| {
        for conn in listener.incoming() {
            let conn = match conn {
                Ok(c) => c,
                Err(e) => {
                    eprintln!("baton: accept: {e}");
                    continue;
                }
            };
            let req = crate::view::ConnectRequest { workload: workload.clone(), port, check: false };
            scope.spawn(move || {
                if let Err(e) = carry(client, device, &req, conn) {
                    eprintln!("baton: connection to {device} port {}: {e}", req.port);
                }
            });
        }
    });
    Ok(())
}

/// One forwarded connection: the local socket's bytes become the session's
/// input (its end half-closes the remote connection), the session's output
/// the socket's.
fn carry(
    client: &Client,
    device: &str,
    req: &crate::view::ConnectRequest,
    conn: std::net::TcpStream,
) -> anyhow::Result<()> {
    let _ = conn.set_nodelay(true);
    let (session, mut frames, mut stream) = client.connect(device, req)?;
    let reader = conn.try_clone()?;
    let writer = conn;
    std::thread::scope(|scope| {
        scope.spawn(move || {
            let mut buf = vec![0u8; 8 * crate::sessions::INPUT_CHUNK];
            let mut reader = &reader;
            loop {
                match reader.read(&mut buf) {
                    Ok(0) | Err(_) => {
                        let _ = client.session_input(session, &[], true);
                        return;
                    }
                    Ok(n) => {
                        if client.session_input(session, &buf[..n], false).is_err() {
                            let _ = reader.shutdown(std::net::Shutdown::Both);
                            return;
                        }
                    }
                }
            }
        });
        let mut out = &writer;
        let mut buf = vec![0u8; 32 * 1024];
        let result = 'relay: loop {
            loop {
                match frames.next_frame() {
                    Ok(Some(Frame::Stdout(b) | Frame::Stderr(b))) => {
                        if let Err(e) = out.write_all(&b) {
                            break 'relay Err(e.into());
                        }
                    }
                    Ok(Some(Frame::Exit(_))) => break 'relay Ok(()),
                    Ok(Some(Frame::Error(why))) => break 'relay Err(anyhow::anyhow!("{why}")),
                    Ok(Some(Frame::Opened(_) | Frame::Text(_))) => {}
                    Ok(None) => break,
                    Err(e) => break 'relay Err(anyhow::anyhow!("{e}")),
                }
            }
            match stream.read(&mut buf) {
                Ok(0) => break Err(anyhow::anyhow!("the controller ended the connection")),
                Ok(n) => frames.push(&buf[..n]),
                Err(e) => break Err(e.into()),
            }
        };
        // Both ways closed: the input thread's read ends too.
        let _ = writer.shutdown(std::net::Shutdown::Both);
        result
    })
}

/// One side of `baton cp`: a local path, or `WORKLOAD:/PATH` on the device
/// (`:/PATH` on its host with `--host`).
#[derive(Debug, PartialEq)]
pub enum CopySide {
    Local(std::path::PathBuf),
    Remote { workload: String, path: String },
}

pub fn copy_side(text: &str) -> CopySide {
    match text.split_once(':') {
        Some((workload, path)) if path.starts_with('/') && !workload.contains('/') => {
            CopySide::Remote { workload: workload.to_string(), path: path.to_string() }
        }
        _ => CopySide::Local(text.into()),
    }
}

/// `baton cp`: a file to or from a container (or the device's host),
/// resumable — a copy cut short continues where it stopped when run again —
/// and checked end to end with SHA-256.
pub fn copy(client: &Client, device: &str, host: bool, src: &str, dst: &str) -> anyhow::Result<()> {
    use crate::view::FileRequest;
    let request = |workload: String, path: String| -> anyhow::Result<FileRequest> {
        match (host, workload.is_empty()) {
            (true, false) => anyhow::bail!("with --host the device side is written :/PATH (no workload)"),
            (false, true) => anyhow::bail!("the device side is WORKLOAD:/PATH (or :/PATH with --host)"),
            _ => Ok(FileRequest { workload, host, path, ..Default::default() }),
        }
    };
    match (copy_side(src), copy_side(dst)) {
        (CopySide::Remote { workload, path }, CopySide::Local(local)) => {
            download(client, device, request(workload, path)?, &local)
        }
        (CopySide::Local(local), CopySide::Remote { workload, path }) => {
            upload(client, device, request(workload, path)?, &local)
        }
        _ => anyhow::bail!("one side of a copy is on the device (WORKLOAD:/PATH), the other here"),
    }
}

fn sha256_file(path: &std::path::Path) -> anyhow::Result<String> {
    let mut f = std::fs::File::open(path)?;
    let mut ctx = ring::digest::Context::new(&ring::digest::SHA256);
    let mut buf = vec![0u8; 256 * 1024];
    loop {
        match f.read(&mut buf)? {
            0 => break,
            n => ctx.update(&buf[..n]),
        }
    }
    Ok(baton_protocol::crypto::hex(ctx.finish().as_ref()))
}

fn download(
    client: &Client,
    device: &str,
    mut req: crate::view::FileRequest,
    local: &std::path::Path,
) -> anyhow::Result<()> {
    let local = if local.is_dir() {
        local.join(req.path.rsplit('/').next().filter(|n| !n.is_empty()).unwrap_or("file"))
    } else {
        local.to_path_buf()
    };
    let part = std::path::PathBuf::from(format!("{}.baton-part", local.display()));
    req.offset = std::fs::metadata(&part).map_or(0, |m| m.len());
    if req.offset > 0 {
        eprintln!("baton: resuming at byte {} ({} holds them)", req.offset, part.display());
    }
    let opened = match client.read_file(device, &req) {
        // The file changed since the cut copy began: start over.
        Err(e) if req.offset > 0 && e.to_string().contains("cannot resume") => {
            eprintln!("baton: the device's file is shorter than {}: starting again", part.display());
            std::fs::remove_file(&part)?;
            req.offset = 0;
            client.read_file(device, &req)?
        }
        other => other?,
    };
    let (_, mut frames, mut stream) = opened;
    let mut file = std::fs::OpenOptions::new().create(true).append(true).open(&part)?;
    let mut digest = None;
    let mut buf = vec![0u8; 64 * 1024];
    loop {
        while let Some(frame) = frames.next_frame().map_err(|e| anyhow::anyhow!("{e}"))? {
            match frame {
                Frame::Stdout(b) | Frame::Stderr(b) => file.write_all(&b)?,
                Frame::Text(t) => digest = t.strip_prefix("sha256:").map(str::to_string).or(digest),
                Frame::Exit(_) => {
                    file.sync_all()?;
                    let got = sha256_file(&part)?;
                    if digest.as_deref() != Some(got.as_str()) {
                        std::fs::remove_file(&part)?;
                        anyhow::bail!(
                            "the copy's SHA-256 {got} is not the device's {}: discarded, copy again",
                            digest.unwrap_or_default()
                        );
                    }
                    std::fs::rename(&part, &local)?;
                    let len = std::fs::metadata(&local)?.len();
                    eprintln!("baton: {len} bytes to {} (sha256 {got})", local.display());
                    return Ok(());
                }
                Frame::Error(why) => {
                    anyhow::bail!("{why} (what arrived is in {}: run the same command to resume)", part.display())
                }
                Frame::Opened(_) => {}
            }
        }
        let n = stream.read(&mut buf)?;
        if n == 0 {
            anyhow::bail!(
                "the copy was cut short ({} holds what arrived: run the same command to resume)",
                part.display()
            );
        }
        frames.push(&buf[..n]);
    }
}

fn upload(
    client: &Client,
    device: &str,
    mut req: crate::view::FileRequest,
    local: &std::path::Path,
) -> anyhow::Result<()> {
    use std::os::unix::fs::PermissionsExt;
    let meta = std::fs::metadata(local).map_err(|e| anyhow::anyhow!("{}: {e}", local.display()))?;
    if !meta.is_file() {
        anyhow::bail!("{} is not a regular file", local.display());
    }
    if req.path.ends_with('/') {
        let name = local.file_name().and_then(|n| n.to_str()).unwrap_or("file");
        req.path = format!("{}{name}", req.path);
    }
    req.mode = meta.permissions().mode() & 0o7777;
    req.sha256 = sha256_file(local)?;
    let (session, mut frames, mut stream) = client.write_file(device, &req)?;
    let mut buf = vec![0u8; 64 * 1024];
    // The device says first how much of the file it already holds.
    let have: u64 = loop {
        if let Some(frame) = frames.next_frame().map_err(|e| anyhow::anyhow!("{e}"))? {
            match frame {
                Frame::Text(t) => {
                    if let Some(n) = t.strip_prefix("offset ").and_then(|n| n.parse().ok()) {
                        break n;
                    }
                }
                Frame::Error(why) => anyhow::bail!("{why}"),
                _ => {}
            }
            continue;
        }
        let n = stream.read(&mut buf)?;
        if n == 0 {
            anyhow::bail!("the controller ended the copy before it started");
        }
        frames.push(&buf[..n]);
    };
    if have > 0 && have <= meta.len() {
        eprintln!("baton: resuming at byte {have} (the device holds them)");
    }
    let from = if have > meta.len() { meta.len() } else { have };
    let sender = std::thread::scope(|scope| {
        let sending = scope.spawn(|| -> anyhow::Result<()> {
            let mut f = std::fs::File::open(local)?;
            std::io::Seek::seek(&mut f, std::io::SeekFrom::Start(from))?;
            let mut chunk = vec![0u8; 8 * crate::sessions::INPUT_CHUNK];
            loop {
                let n = f.read(&mut chunk)?;
                client.session_input(session, &chunk[..n], n == 0)?;
                if n == 0 {
                    return Ok(());
                }
            }
        });
        let end = (|| -> anyhow::Result<()> {
            loop {
                while let Some(frame) = frames.next_frame().map_err(|e| anyhow::anyhow!("{e}"))? {
                    match frame {
                        Frame::Exit(_) => return Ok(()),
                        Frame::Error(why) => anyhow::bail!("{why}"),
                        _ => {}
                    }
                }
                let n = stream.read(&mut buf)?;
                if n == 0 {
                    anyhow::bail!("the copy was cut short: run the same command to resume");
                }
                frames.push(&buf[..n]);
            }
        })();
        let sent = sending.join().unwrap_or_else(|_| Err(anyhow::anyhow!("the sending thread failed")));
        end.and(sent.or_else(|e| if e.to_string().contains("no session") { Ok(()) } else { Err(e) }))
    });
    sender?;
    eprintln!("baton: {} bytes to {}:{} (sha256 {})", meta.len(), req.workload, req.path, req.sha256);
    Ok(())
}
