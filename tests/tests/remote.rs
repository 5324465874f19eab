//! Remote access through the device's own MQTT link: `baton exec -i/-t`
//! driven as an operator drives it — the CLI on a real pseudo-terminal the
//! test holds (it types, resizes the window, presses Ctrl-C), real agents,
//! real containers, the embedded broker. About 40 s.

use std::io::{Read, Write};
use std::process::{Child, Command, Stdio};
use std::time::Duration;

use baton_tests::pty::Terminal;
use baton_tests::*;

/// Pids of processes whose command line contains `needle` (the CLI that
/// names it excepted).
fn processes_with(needle: &str) -> Vec<u32> {
    processes_with_except(needle, 0)
}

fn processes_with_except(needle: &str, except: u32) -> Vec<u32> {
    std::fs::read_dir("/proc")
        .expect("/proc")
        .flatten()
        .filter_map(|e| {
            let pid: u32 = e.file_name().to_str()?.parse().ok()?;
            let cmdline = std::fs::read(e.path().join("cmdline")).ok()?;
            let cmdline = String::from_utf8_lossy(&cmdline).replace('\0', " ");
            (cmdline.contains(needle) && pid != except).then_some(pid)
        })
        .collect()
}

/// A child killed (and reaped) however the test ends.
struct Reap(Child);

impl Drop for Reap {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

fn wait_exit(child: &mut Child, within: Duration) -> i32 {
    let status = wait_for("the CLI to exit", within, || child.try_wait().ok().flatten());
    status.code().unwrap_or(-1)
}

/// An agent whose config file is `config` (the usual test flags otherwise).
fn start_agent_with_config(world: &World, id: &str, broker: &str, config: &str) -> Proc {
    let mut args = agent_args(world, id, broker, &[]);
    args[1] = world.write(&format!("agent-{id}.toml"), config).display().to_string();
    Proc::spawn(&format!("agent-{id}"), &bin("baton-agent"), &args, world.path())
}

/// Symptom this answers: Baton had only a one-shot `baton exec`; reaching a
/// device behind NAT interactively needed ssh and an open port.
#[test]
fn an_interactive_shell_in_a_container_through_a_real_terminal() {
    let world = World::new();
    let controller = Controller::start(&world, None, &[]);
    let server = controller.server_url();
    let broker = controller.broker_url();
    give_busybox(&world, "pi-term", "busybox:term");
    let _agent = start_agent(&world, "pi-term", &broker, &[]);
    apply_yaml(
        &server,
        &world,
        "web.yaml",
        "name: web\nimage: busybox:term\ncommand: [/bin/sh, -c, \"while true; do sleep 1; done\"]\n",
    );
    wait_for("web running", Duration::from_secs(40), || settled(&server, "web", 1, 1));

    let (mut term, cli) =
        Terminal::spawn(&bin("baton"), &server, &["exec", "-it", "--device", "pi-term", "web", "--", "/bin/sh"]);
    let mut cli = Reap(cli);
    term.expect("# ", Duration::from_secs(20));
    // Typed commands run, their echo and output come back.
    term.send("echo $((6*7))-ok\r");
    term.expect("42-ok", Duration::from_secs(10));
    term.send("[ -t 0 ] && [ -t 1 ] && echo on-a-terminal\r");
    term.expect("on-a-terminal", Duration::from_secs(10));
    term.send("stty size\r");
    term.expect("24 80", Duration::from_secs(10));
    // The operator's window grows: the remote terminal follows.
    term.resize(33, 101);
    wait_for("the new size on the remote terminal", Duration::from_secs(15), || {
        term.send("stty size\r");
        wait_until(Duration::from_millis(700), || term.text()[term.mark..].contains("33 101").then_some(()))
    });
    term.mark = term.text().len();
    // Ctrl-C reaches the remote foreground process, not the CLI.
    term.send("sleep 4242\r");
    wait_for("sleep running in the container", Duration::from_secs(10), || {
        (!processes_with("sleep 4242").is_empty()).then_some(())
    });
    term.send("\x03");
    wait_for("sleep interrupted", Duration::from_secs(10), || processes_with("sleep 4242").is_empty().then_some(()));
    term.send("echo rc=$?\r");
    term.expect("rc=130", Duration::from_secs(10));
    assert!(cli.0.try_wait().expect("remote test step").is_none(), "Ctrl-C ended the CLI itself:\n{}", term.text());
    // The remote exit code is the CLI's; what the shell left running goes with it.
    term.send("sleep 4343 &\r");
    wait_for("a background job", Duration::from_secs(10), || (!processes_with("sleep 4343").is_empty()).then_some(()));
    term.send("exit 7\r");
    assert_eq!(wait_exit(&mut cli.0, Duration::from_secs(15)), 7, "{}", term.text());
    wait_for("the background job gone", Duration::from_secs(10), || {
        processes_with("sleep 4343").is_empty().then_some(())
    });
    // Nothing stays behind on the device.
    wait_for("the exec helper gone", Duration::from_secs(10), || {
        processes_with("exec --id web").is_empty().then_some(())
    });
    // Audited: who, where, what, how it ended, how much moved.
    let events = wait_for("the session's events", Duration::from_secs(10), || {
        let (_, out, _) = baton_cli(&server, &["get", "events", "--subject", "pi-term"]);
        (out.contains("session.opened") && out.contains("session.closed")).then_some(out)
    });
    assert!(events.contains("exit code 7") && events.contains("bytes in"), "{events}");
    // A command that is not there: a shell's code and words. One-shot execs are audited too.
    let (ok, _, err) = baton_cli(&server, &["exec", "-i", "--device", "pi-term", "web", "--", "/no/such"]);
    assert!(!ok && err.contains("/no/such: command not found"), "{err}");
    let (ok, out, err) = baton_cli(&server, &["exec", "--device", "pi-term", "web", "--", "/bin/sh", "-c", "exit 4"]);
    assert!(!ok, "{out}{err}");
    wait_for("the one-shot exec's event", Duration::from_secs(10), || {
        let (_, out, _) = baton_cli(&server, &["get", "events", "--subject", "pi-term"]);
        (out.contains("session.exec") && out.contains("exit code 4")).then_some(())
    });
    // A caller that hangs up before the device answers is audited too.
    {
        use std::io::Write;
        let addr = server.trim_start_matches("http://");
        let mut http = std::net::TcpStream::connect(addr).expect("connect to the API");
        let body = r#"{"workload":"web","argv":["/bin/sh","-c","sleep 20 # hung-up-caller"]}"#;
        write!(
            http,
            "POST /api/v1/devices/pi-term/exec HTTP/1.1\r\nHost: {addr}\r\nContent-Type: application/json\r\nContent-Length: {}\r\n\r\n{body}",
            body.len()
        )
        .expect("send the request");
        wait_for("the exec running on the device", Duration::from_secs(10), || {
            (!processes_with("hung-up-caller").is_empty()).then_some(())
        });
    }
    wait_for("the abandoned exec's event", Duration::from_secs(10), || {
        let (_, out, _) = baton_cli(&server, &["get", "events", "--subject", "pi-term", "-o", "json"]);
        (out.contains("hung-up-caller") && out.contains("the caller went away")).then_some(())
    });

    // Not a terminal: stdin passed through and closed at its end, stdout
    // and stderr apart, the exit code kept; a megabyte each way, unchanged.
    let input: Vec<u8> = (0..1_048_576u32).map(|i| (i.wrapping_mul(2_654_435_761) >> 13) as u8).collect();
    let mut cmd = Command::new(bin("baton"));
    cmd.args(["exec", "-i", "--device", "pi-term", "web", "--", "/bin/sh", "-c"])
        .arg("sha256sum; echo to-stderr >&2; head -c 3000000 /dev/zero; exit 3")
        .env("BATON_SERVER", &server)
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped());
    let mut child = cmd.spawn().expect("baton exec -i");
    let mut stdin = child.stdin.take().expect("remote test step");
    let feeder = std::thread::spawn(move || stdin.write_all(&input).map(|()| input));
    let out = child.wait_with_output().expect("baton exec -i");
    let input = feeder.join().expect("remote test step").expect("stdin taken");
    let digest = sha2::Digest::finalize(<sha2::Sha256 as sha2::Digest>::new_with_prefix(&input));
    let hex: String = digest.iter().map(|b| format!("{b:02x}")).collect();
    let stdout = &out.stdout;
    let first_line = stdout.split(|b| *b == b'\n').next().map(|l| String::from_utf8_lossy(l).into_owned());
    assert!(first_line.as_deref().is_some_and(|l| l.starts_with(&hex)), "digest {hex} vs {first_line:?}");
    assert_eq!(stdout.len() - first_line.expect("remote test step").len() - 1, 3_000_000, "stdout bytes");
    assert!(String::from_utf8_lossy(&out.stderr).contains("to-stderr"), "{}", String::from_utf8_lossy(&out.stderr));
    assert_eq!(out.status.code(), Some(3));

    // A crash-looping workload is said to be one (between its restarts it
    // has no process to enter), for a session and a one-shot exec alike.
    apply_yaml(
        &server,
        &world,
        "crasher.yaml",
        "name: crasher\nimage: busybox:term\ncommand: [/bin/sh, -c, \"sleep 1; exit 3\"]\n",
    );
    for session in [true, false] {
        let mut args = vec!["exec"];
        args.extend(session.then_some("-i"));
        // `false`: landing in the second the container runs fails too, but says nothing.
        args.extend(["--device", "pi-term", "crasher", "--", "/bin/false"]);
        wait_for("a crash-looping workload named as one", Duration::from_secs(60), || {
            let (_, _, err) = baton_cli(&server, &args);
            (err.contains("workload crasher is not running on this device right now")
                && err.contains("exited with code 3"))
            .then_some(())
        });
    }
}

/// Sessions are an admin's, bounded by the device, and end cleanly from
/// either side: a read-only token is refused, a tenant's token cannot reach
/// a host, a device that does not allow host sessions says so, the device's
/// session limit and idle timeout hold, and an operator who vanishes
/// (kill -9 of the CLI) leaves nothing running.
#[test]
fn sessions_are_authorised_bounded_and_end_cleanly() {
    let world = World::new();
    let controller = Controller::start(&world, None, &["--api-auth"]);
    let server = controller.server_url();
    let broker = controller.broker_url();
    let admin = std::fs::read_to_string(world.path().join("controller/admin.token")).expect("first admin token");
    let admin = admin.trim();
    let run = |token: &str, args: &[&str]| baton_cli_as(&server, Some(token), args);
    // Devices without workloads get no document to learn the key from: configured, as `baton trust` says.
    let (ok, trust, err) = run(admin, &["trust"]);
    let key = trust.split_whitespace().find(|w| w.starts_with("ed25519:")).unwrap_or_else(|| panic!("{trust}{err}"));
    assert!(ok);
    let _open = start_agent_with_config(
        &world,
        "pi-open",
        &broker,
        &format!(
            "controller_keys = [\"{key}\"]\nremote_host_shell = true\nmax_sessions = 1\nsession_idle_timeout_s = 4\n"
        ),
    );
    let _closed = start_agent_with_config(&world, "pi-closed", &broker, &format!("controller_keys = [\"{key}\"]\n"));
    wait_for("both online", Duration::from_secs(30), || {
        let (_, table, _) = run(admin, &["get", "devices"]);
        (table.lines().filter(|l| l.starts_with("pi-") && l.contains("online")).count() == 2).then_some(())
    });

    // A host session on the host: the host's own PID namespace.
    // (Once the device has its first document, and with it the controller's key.)
    let ours = std::fs::read_link("/proc/self/ns/pid").expect("remote test step").display().to_string();
    let theirs = wait_for("a host session", Duration::from_secs(20), || {
        let (ok, out, _) =
            run(admin, &["exec", "-i", "--host", "--device", "pi-open", "--", "readlink", "/proc/self/ns/pid"]);
        ok.then_some(out)
    });
    assert_eq!(theirs.trim(), ours);

    let (ok, reader, err) = run(admin, &["apitoken", "create", "--role", "read-only", "--name", "viewer"]);
    assert!(ok, "{err}");
    let (ok, _, err) = run(reader.trim(), &["exec", "-i", "--host", "--device", "pi-open", "--", "true"]);
    assert!(!ok && err.contains("cannot change anything"), "{err}");
    let (ok, _, err) = baton_cli_as(
        &server,
        Some(admin),
        &["--tenant", "acme", "exec", "-i", "--host", "--device", "pi-open", "--", "true"],
    );
    assert!(!ok && err.contains("403"), "a tenant reached a host: {err}");
    let (ok, _, err) = run(admin, &["exec", "-i", "--host", "--device", "pi-closed", "--", "true"]);
    assert!(!ok && err.contains("remote_host_shell"), "{err}");

    // One session at most on pi-open: a second is refused while the first
    // waits; the first ends by itself once idle for 4 s.
    let marker = "held-open-session";
    let mut first = Reap(
        Command::new(bin("baton"))
            .args(["exec", "-i", "--host", "--device", "pi-open", "--", "/bin/sh", "-c"])
            .arg(format!("cat; echo {marker}"))
            .env("BATON_SERVER", &server)
            .env("BATON_TOKEN", admin)
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .expect("baton exec -i"),
    );
    let cli = first.0.id();
    wait_for("the first session's process", Duration::from_secs(15), || {
        (!processes_with_except(marker, cli).is_empty()).then_some(())
    });
    let (ok, _, err) = run(admin, &["exec", "-i", "--host", "--device", "pi-open", "--", "true"]);
    assert!(!ok && err.contains("1 sessions open"), "{err}");
    let code = wait_exit(&mut first.0, Duration::from_secs(30));
    let mut err = String::new();
    first.0.stderr.take().expect("remote test step").read_to_string(&mut err).expect("remote test step");
    assert!(code == 255 && err.contains("idle for 4 s"), "{code} {err}");
    wait_for("the idle session's process gone", Duration::from_secs(10), || {
        processes_with(marker).is_empty().then_some(())
    });

    // The operator vanishes: the device ends the session.
    let marker = "abandoned-session";
    let mut gone = Reap(
        Command::new(bin("baton"))
            .args(["exec", "-i", "--host", "--device", "pi-open", "--", "/bin/sh", "-c"])
            .arg(format!("while true; do echo {marker}; sleep 0.5; done"))
            .env("BATON_SERVER", &server)
            .env("BATON_TOKEN", admin)
            .stdin(Stdio::piped())
            .stdout(Stdio::null())
            .spawn()
            .expect("baton exec -i"),
    );
    let cli = gone.0.id();
    wait_for("the abandoned session's process", Duration::from_secs(15), || {
        (!processes_with_except(marker, cli).is_empty()).then_some(())
    });
    // The session's opening was remembered on flash (a replay is refused);
    // the Cancel that ends it is not (it would be one more flash write for
    // every session and log follow ended).
    let seen = world.path().join("agent-pi-open/state/commands.seen");
    let remembered = std::fs::read(&seen).expect("the device's accepted commands");
    gone.0.kill().expect("remote test step");
    let _ = gone.0.wait();
    wait_for("the abandoned session's process gone", Duration::from_secs(15), || {
        processes_with(marker).is_empty().then_some(())
    });
    assert!(
        std::fs::read(&seen).expect("the device's accepted commands") == remembered,
        "ending the session wrote to the device's flash"
    );
    let events = wait_for("the audit trail", Duration::from_secs(10), || {
        let (_, out, _) = run(admin, &["get", "events", "--subject", "pi-open", "--limit", "50"]);
        (out.matches("session.closed").count() >= 3).then_some(out)
    });
    assert!(events.contains("token first admin") && events.contains("the operator went away"), "{events}");
    assert!(events.contains("session.refused") && events.contains("idle for 4 s"), "{events}");
}

/// `baton port-forward` to an HTTP server in a container: two requests at
/// once, a 50 MiB download whose digest matches the container's file while
/// the agent's memory stays flat and its heartbeats keep coming, and a
/// workload that is not there named.
#[test]
fn port_forward_carries_http_and_a_big_download_with_flat_memory() {
    let world = World::new();
    let controller = Controller::start(&world, None, &[]);
    let server = controller.server_url();
    let broker = controller.broker_url();
    give_busybox(&world, "pi-fwd", "busybox:fwd");
    let mut agent = start_agent(&world, "pi-fwd", &broker, &[]);
    let port = free_port();
    apply_yaml(
        &server,
        &world,
        "files.yaml",
        &format!(
            "name: files\nimage: busybox:fwd\ncommand: [/bin/sh, -c, \"mkdir -p /tmp/www && head -c 52428800 /dev/urandom > /tmp/www/big && echo hello > /tmp/www/index.html && exec httpd -f -p {port} -h /tmp/www\"]\n"
        ),
    );
    wait_for("files running", Duration::from_secs(40), || settled(&server, "files", 1, 1));
    // (A `Proc`: killed however the test ends; what it says is in its log.)
    let forward_args = ["port-forward", "--device", "pi-fwd", "files", &format!("0:{port}")].map(String::from);
    let forward =
        Proc::spawn_with_env("port-forward", &bin("baton"), &forward_args, world.path(), &[("BATON_SERVER", &server)]);
    let local = forward_address(&forward);
    let url = format!("http://{local}");
    let get = |path: &str| -> anyhow::Result<Vec<u8>> {
        let mut res = ureq::get(format!("{url}{path}")).call()?;
        Ok(res.body_mut().with_config().limit(u64::MAX).read_to_vec()?)
    };
    // httpd listens once the container wrote its files.
    wait_for("httpd through the forward", Duration::from_secs(30), || get("/index.html").ok());
    let digest = wait_for("the file's digest in the container", Duration::from_secs(30), || {
        let (ok, out, _) = baton_cli(
            &server,
            &["exec", "--device", "pi-fwd", "files", "--", "/bin/sh", "-c", "sha256sum /tmp/www/big"],
        );
        let hex = out.split_whitespace().next().unwrap_or_default().to_string();
        (ok && hex.len() == 64).then_some(hex)
    });

    let both = std::thread::scope(|s| {
        let a = s.spawn(|| get("/index.html"));
        let b = s.spawn(|| get("/index.html"));
        (a.join().expect("thread"), b.join().expect("thread"))
    });
    for r in [both.0, both.1] {
        match r {
            Ok(body) => assert_eq!(body, b"hello\n"),
            Err(e) => panic!("GET through the forward: {e}; it said: {}", said(&forward)),
        }
    }

    // The big one, the agent's resident memory and heartbeats watched meanwhile.
    let rss = |pid: u32| -> u64 {
        std::fs::read_to_string(format!("/proc/{pid}/status"))
            .ok()
            .and_then(|s| {
                s.lines().find_map(|l| {
                    l.strip_prefix("VmRSS:").map(|v| v.trim().trim_end_matches(" kB").trim().parse().ok())
                })?
            })
            .unwrap_or(0)
    };
    let pid = agent.pid();
    let before = rss(pid);
    let done = std::sync::atomic::AtomicBool::new(false);
    let (body, samples) = std::thread::scope(|s| {
        let watcher = s.spawn(|| {
            let mut samples = Vec::new();
            while !done.load(std::sync::atomic::Ordering::Relaxed) {
                let seq = controller.device("pi-fwd").and_then(|d| d.heartbeat.map(|h| h.seq));
                samples.push((std::time::Instant::now(), rss(pid), seq));
                std::thread::sleep(Duration::from_millis(100));
            }
            samples
        });
        let body = get("/big");
        done.store(true, std::sync::atomic::Ordering::Relaxed);
        (body, watcher.join().expect("watcher"))
    });
    let body = body.expect("50 MiB through the forward");
    assert_eq!(body.len(), 52_428_800);
    let got: String = sha2::Digest::finalize(<sha2::Sha256 as sha2::Digest>::new_with_prefix(&body))
        .iter()
        .map(|b| format!("{b:02x}"))
        .collect();
    assert_eq!(got, digest, "the download differs from the container's file");
    let peak = samples.iter().map(|(_, r, _)| *r).max().unwrap_or(0);
    assert!(peak < before + 16 * 1024, "the agent grew from {before} kB to {peak} kB during the download");
    // Heartbeats (every second here) kept coming: no gap of 5 s between two.
    let mut last: Option<(std::time::Instant, u32)> = None;
    let mut longest = Duration::ZERO;
    for (at, _, seq) in &samples {
        let Some(seq) = seq else { continue };
        match last {
            Some((since, prev)) if prev == *seq => longest = longest.max(at.duration_since(since)),
            _ => last = Some((*at, *seq)),
        }
    }
    assert!(longest < Duration::from_secs(5), "no heartbeat for {longest:?} during the download");

    copies_resume_after_a_cut_and_are_checked(&world, &server, port, &digest);

    // A workload that is not there: refused before anything listens.
    let (ok, _, err) = baton_cli(&server, &["port-forward", "--device", "pi-fwd", "nothing-here", "0:80"]);
    assert!(!ok && err.contains("nothing-here") && err.contains("404"), "refused only later: {err}");
    drop(forward);
    let _ = agent.terminate();
}

/// What a `baton port-forward` said so far (its log).
fn said(forward: &Proc) -> String {
    std::fs::read_to_string(&forward.log).unwrap_or_default()
}

/// The local address a `baton port-forward` listens on, from its first line.
fn forward_address(forward: &Proc) -> std::net::SocketAddr {
    wait_for("the forward's address", Duration::from_secs(10), || {
        said(forward).lines().find_map(|l| l.strip_prefix("Forwarding ")?.split_whitespace().next()?.parse().ok())
    })
}

/// Starts `baton ARGS`, and once `grown` says the copy is under way, cuts it:
/// SIGSTOP (so it goes no further), then kill -9.
fn cut_copy(server: &str, args: &[&str], mut grown: impl FnMut() -> bool) {
    let mut cli = Reap(
        Command::new(bin("baton"))
            .args(args)
            .env("BATON_SERVER", server)
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("baton cp"),
    );
    let deadline = std::time::Instant::now() + Duration::from_secs(30);
    while !grown() {
        assert!(std::time::Instant::now() < deadline, "the copy never got under way");
        assert!(cli.0.try_wait().expect("cp").is_none(), "the copy ended before it could be cut");
        std::thread::sleep(Duration::from_millis(2));
    }
    // SAFETY: kill(2) on our own child.
    unsafe { libc::kill(cli.0.id() as i32, libc::SIGSTOP) };
    drop(cli); // kill -9
}

fn sha256_hex(bytes: &[u8]) -> String {
    sha2::Digest::finalize(<sha2::Sha256 as sha2::Digest>::new_with_prefix(bytes))
        .iter()
        .map(|b| format!("{b:02x}"))
        .collect()
}

/// `baton cp` both ways, each cut (SIGSTOP + kill -9 of the CLI) once a
/// megabyte moved, then run again: it resumes, and the digests match.
fn copies_resume_after_a_cut_and_are_checked(world: &World, server: &str, port: u16, big_digest: &str) {
    let httpd = processes_with(&format!("httpd -f -p {port}"));
    let root = format!("/proc/{}/root", httpd.first().expect("httpd's pid"));
    let size = |p: &std::path::Path| std::fs::metadata(p).map_or(0, |m| m.len());

    // Up: 20 MiB.
    let blob: Vec<u8> = (0..20u32 << 20).map(|i| (i.wrapping_mul(2_654_435_761) >> 11) as u8).collect();
    let local = world.path().join("up.bin");
    std::fs::write(&local, &blob).expect("blob");
    let local_s = local.display().to_string();
    let part = std::path::PathBuf::from(format!("{root}/tmp/up.bin.baton-part"));
    cut_copy(server, &["cp", "--device", "pi-fwd", &local_s, "files:/tmp/up.bin"], || size(&part) >= 1 << 20);
    let (ok, _, err) = baton_cli(server, &["cp", "--device", "pi-fwd", &local_s, "files:/tmp/up.bin"]);
    assert!(ok && err.contains("resuming at byte"), "{err}");
    let (ok, out, err) = baton_cli(
        server,
        &["exec", "--device", "pi-fwd", "files", "--", "/bin/sh", "-c", "sha256sum /tmp/up.bin; ls /tmp"],
    );
    assert!(ok && out.starts_with(&sha256_hex(&blob)), "{out}{err}");
    assert!(!out.contains("baton-part"), "the partial copy stayed: {out}");

    // Down: the 50 MiB file.
    let down = world.path().join("big.bin");
    let down_part = world.path().join("big.bin.baton-part");
    let down_s = down.display().to_string();
    cut_copy(server, &["cp", "--device", "pi-fwd", "files:/tmp/www/big", &down_s], || size(&down_part) >= 1 << 20);
    let (ok, _, err) = baton_cli(server, &["cp", "--device", "pi-fwd", "files:/tmp/www/big", &down_s]);
    assert!(ok && err.contains("resuming at byte"), "{err}");
    assert_eq!(sha256_hex(&std::fs::read(&down).expect("the copy")), big_digest);
    assert!(!down_part.exists(), "the partial copy stayed");

    // A symlink in the container to a host path: resolved inside the container.
    let secret = world.write("host-secret", "host-secret-2b7e");
    let link = format!("ln -sf {} /tmp/escape", secret.display());
    let (ok, _, err) = baton_cli(server, &["exec", "--device", "pi-fwd", "files", "--", "/bin/sh", "-c", &link]);
    assert!(ok, "{err}");
    let out = world.path().join("escape");
    let (ok, _, err) =
        baton_cli(server, &["cp", "--device", "pi-fwd", "files:/tmp/escape", &out.display().to_string()]);
    let got = std::fs::read_to_string(&out).unwrap_or_default();
    assert!(!ok && !got.contains("host-secret"), "read a host file through a container's symlink: {got}{err}");
    assert!(err.contains("No such file"), "{err}");

    // A FIFO to read, and a partial copy that is a symlink: refused, and the
    // agent (which opens them) goes on answering.
    let plant = "mkfifo /tmp/fifo && ln -s /etc/passwd /tmp/evil.baton-part && cat /etc/passwd | sha256sum";
    let (ok, before, err) = baton_cli(server, &["exec", "--device", "pi-fwd", "files", "--", "/bin/sh", "-c", plant]);
    assert!(ok, "{err}");
    let (ok, _, err) = baton_cli(server, &["cp", "--device", "pi-fwd", "files:/tmp/fifo", &out.display().to_string()]);
    assert!(!ok && err.contains("not a regular file"), "{err}");
    let (ok, _, err) = baton_cli(server, &["cp", "--device", "pi-fwd", &local_s, "files:/tmp/evil"]);
    assert!(!ok && err.contains("evil.baton-part"), "{err}");
    let (ok, after, err) = baton_cli(
        server,
        &["exec", "--device", "pi-fwd", "files", "--", "/bin/sh", "-c", "cat /etc/passwd | sha256sum"],
    );
    assert!(ok && after == before, "the copy went through the symlink: {after} vs {before} {err}");
}
