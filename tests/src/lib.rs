//! Harness for end-to-end tests: real `baton` and `baton-agent` processes,
//! real brokers, each test in its own temp dir with its own ports. Waits are
//! polls with deadlines, never bare sleeps.

use std::fs::File;
use std::net::TcpListener;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use baton_controller::view::{DeviceView, WorkloadView};

pub mod fixtures;
pub mod mqtt;
pub mod pty;
pub mod webdriver;

/// Where cargo put the workspace binaries: next to the test executable's `deps/`.
pub fn bin(name: &str) -> PathBuf {
    let dir = std::env::var_os("BATON_BIN_DIR").map(PathBuf::from).unwrap_or_else(|| {
        // Test executables live in target/<profile>/deps, binaries one level up.
        let exe = std::env::current_exe().expect("current_exe");
        let dir = exe.parent().expect("exe dir");
        if dir.ends_with("deps") { dir.parent().expect("profile dir") } else { dir }.to_path_buf()
    });
    let path = dir.join(name);
    assert!(
        path.exists(),
        "{} not built: run `cargo test --workspace` (or `cargo build --workspace --bins`)",
        path.display()
    );
    path
}

/// A port nothing listens on right now.
pub fn free_port() -> u16 {
    TcpListener::bind("127.0.0.1:0").and_then(|l| l.local_addr()).map(|a| a.port()).expect("free port")
}

/// Polls `f` every 50 ms until it returns `Some`, or panics after `timeout` naming `what`.
pub fn wait_for<T>(what: &str, timeout: Duration, mut f: impl FnMut() -> Option<T>) -> T {
    let deadline = Instant::now() + timeout;
    loop {
        if let Some(v) = f() {
            return v;
        }
        assert!(Instant::now() < deadline, "timed out after {timeout:?} waiting for {what}");
        std::thread::sleep(Duration::from_millis(50));
    }
}

/// Polls `f` every 50 ms until it returns `Some`, or returns `None` after `timeout`.
pub fn wait_until<T>(timeout: Duration, mut f: impl FnMut() -> Option<T>) -> Option<T> {
    let deadline = Instant::now() + timeout;
    loop {
        if let Some(v) = f() {
            return Some(v);
        }
        if Instant::now() >= deadline {
            return None;
        }
        std::thread::sleep(Duration::from_millis(50));
    }
}

/// A child process killed when dropped; its output goes to a log file.
pub struct Proc {
    pub name: String,
    child: Child,
    pub log: PathBuf,
}

impl Proc {
    pub fn spawn(name: &str, program: &Path, args: &[String], log_dir: &Path) -> Proc {
        Self::spawn_with_env(name, program, args, log_dir, &[])
    }

    /// As `spawn`, with these variables added to the environment.
    pub fn spawn_with_env(name: &str, program: &Path, args: &[String], log_dir: &Path, env: &[(&str, &str)]) -> Proc {
        let log = log_dir.join(format!("{name}.log"));
        let out = File::options().create(true).append(true).open(&log).expect("log file");
        let child = Command::new(program)
            .args(args)
            .envs(env.iter().copied())
            // `BATON_TEST_LOG=debug,rumqttc=debug` to see more of a failing test.
            .env("BATON_LOG", std::env::var("BATON_TEST_LOG").unwrap_or_else(|_| "debug,rumqttc=info".into()))
            .stdin(Stdio::null())
            .stdout(out.try_clone().expect("dup"))
            .stderr(out)
            .spawn()
            .unwrap_or_else(|e| panic!("spawn {}: {e}", program.display()));
        Proc { name: name.into(), child, log }
    }

    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    /// SIGKILL: no goodbye, as when a device loses power or the agent crashes.
    pub fn kill9(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }

    /// SIGTERM and wait for a clean exit; returns the exit code.
    pub fn terminate(&mut self) -> Option<i32> {
        // SAFETY: plain kill(2) on our own child's pid.
        unsafe { libc::kill(self.child.id() as i32, libc::SIGTERM) };
        let deadline = Instant::now() + Duration::from_secs(10);
        while Instant::now() < deadline {
            if let Ok(Some(status)) = self.child.try_wait() {
                return status.code();
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        self.kill9();
        None
    }

    pub fn is_running(&mut self) -> bool {
        matches!(self.child.try_wait(), Ok(None))
    }

    /// Its exit code once it has exited on its own; None while it runs (or
    /// when a signal ended it).
    pub fn exit_code(&mut self) -> Option<i32> {
        self.child.try_wait().ok().flatten().and_then(|s| s.code())
    }
}

impl Drop for Proc {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// One test's world: a temp dir for data and logs; logs are printed if the test fails.
pub struct World {
    /// The world's PostgreSQL, started by the first controller that needs one
    /// (`BATON_TEST_STORE=postgres`, or `World::postgres`); stopped first.
    postgres: std::sync::OnceLock<Postgres>,
    pub dir: tempfile::TempDir,
}

impl Default for World {
    fn default() -> Self {
        Self::new()
    }
}

impl World {
    pub fn new() -> Self {
        Self {
            postgres: std::sync::OnceLock::new(),
            dir: tempfile::Builder::new().prefix("baton-e2e-").tempdir().expect("tempdir"),
        }
    }

    /// This world's PostgreSQL server, started on first use.
    pub fn postgres(&self) -> &Postgres {
        self.postgres.get_or_init(|| Postgres::start(self))
    }

    /// The `--store` a controller of this world is given: the world's
    /// PostgreSQL when the run asks for it (`BATON_TEST_STORE=postgres`:
    /// every end-to-end suite on PostgreSQL), else the default (SQLite).
    pub fn store_args(&self) -> Vec<String> {
        match std::env::var("BATON_TEST_STORE").as_deref() {
            Ok("postgres") => vec!["--store".into(), self.postgres().url()],
            Ok("sqlite") | Ok("") | Err(_) => Vec::new(),
            Ok(other) => panic!("BATON_TEST_STORE={other}: expected postgres or sqlite"),
        }
    }

    pub fn path(&self) -> &Path {
        self.dir.path()
    }

    /// Writes `text` to `name` in the world's dir; returns its path.
    pub fn write(&self, name: &str, text: &str) -> PathBuf {
        let path = self.path().join(name);
        std::fs::write(&path, text).expect("write a file in the test's dir");
        path
    }

    /// The bridge and subnet `start_agent` gives device `id`: named after
    /// the world (so that its end can find them) and the device; the subnet
    /// is in 10.100–199.x (NetNs links use 10.231.x).
    pub fn bridge(&self, id: &str) -> (String, String) {
        let h = fnv(id.as_bytes());
        let subnet =
            format!("10.{}.{}.0/24", 100 + (h % 100), ((h >> 8) % 256) ^ (fnv(self.bridge_prefix().as_bytes()) % 256));
        (format!("{}{:04x}", self.bridge_prefix(), h & 0xffff), subnet)
    }

    /// `bw` and six hex digits of the world's dir name.
    fn bridge_prefix(&self) -> String {
        format!("bw{:06x}", fnv(self.cgroup_prefix().as_bytes()) & 0xff_ffff)
    }

    /// Agents of this world put their containers under cgroups named with this
    /// prefix: parallel tests reuse container names and must not share cgroups.
    pub fn cgroup_prefix(&self) -> String {
        self.path().file_name().map(|n| n.to_string_lossy().into_owned()).unwrap_or_default()
    }
}

impl World {
    /// Containers outlive agents by design; a test's must not outlive the test.
    /// Kills the shims started under this world (which kills their containers)
    /// and unmounts the overlays beneath it.
    fn reap_containers(&self) {
        let root = self.path().display().to_string();
        let ours = || {
            std::fs::read_dir("/proc").into_iter().flatten().flatten().filter_map(|entry| {
                let pid = entry.file_name().to_string_lossy().parse::<i32>().ok()?;
                let cmd = std::fs::read(format!("/proc/{pid}/cmdline")).ok()?;
                let cmd = String::from_utf8_lossy(&cmd).into_owned();
                cmd.contains(&root).then_some((pid, cmd.contains("\0shim\0")))
            })
        };
        // Anything of this test still running that is not a shim (an agent a
        // wrapper kept alive) goes first, or it would start containers again.
        for (pid, _) in ours().filter(|(pid, shim)| !shim && *pid != std::process::id() as i32) {
            // SAFETY: kill(2) on a process running from this test's dir.
            unsafe { libc::kill(pid, libc::SIGKILL) };
        }
        let mut shims = Vec::new();
        for (pid, _) in ours().filter(|(_, shim)| *shim) {
            // SAFETY: kill(2) on a shim this test's agents started.
            unsafe { libc::kill(pid, libc::SIGINT) };
            shims.push(pid);
        }
        let deadline = Instant::now() + Duration::from_secs(10);
        while shims.iter().any(|p| Path::new(&format!("/proc/{p}")).exists()) && Instant::now() < deadline {
            std::thread::sleep(Duration::from_millis(20));
        }
        let mounts = std::fs::read_to_string("/proc/self/mounts").unwrap_or_default();
        let mut targets: Vec<&str> =
            mounts.lines().filter_map(|l| l.split(' ').nth(1)).filter(|m| m.starts_with(&root)).collect();
        targets.sort_by_key(|t| std::cmp::Reverse(t.len()));
        for t in targets {
            if let Ok(c) = std::ffi::CString::new(t) {
                // SAFETY: umount2(2) with a valid C string.
                unsafe { libc::umount2(c.as_ptr(), libc::MNT_DETACH) };
            }
        }
        // The bridges (and nftables tables) of this world's agents on the
        // host's network; the containers' veths went with their namespaces.
        let bridges = self.bridge_prefix();
        for link in std::fs::read_dir("/sys/class/net").into_iter().flatten().flatten() {
            let name = link.file_name().to_string_lossy().into_owned();
            if name.starts_with(&bridges) {
                let _ = std::process::Command::new("ip").args(["link", "del", &name]).output();
                for family in ["ip", "bridge"] {
                    let _ = std::process::Command::new("nft").args(["delete", "table", family, &name]).output();
                }
            }
        }
        let prefix = self.cgroup_prefix();
        for controller in std::fs::read_dir("/sys/fs/cgroup").into_iter().flatten().flatten() {
            for parent in std::fs::read_dir(controller.path()).into_iter().flatten().flatten() {
                if !prefix.is_empty() && parent.file_name().to_string_lossy().starts_with(&prefix) {
                    for child in std::fs::read_dir(parent.path()).into_iter().flatten().flatten() {
                        if child.path().is_dir() {
                            let _ = std::fs::remove_dir(child.path());
                        }
                    }
                    let _ = std::fs::remove_dir(parent.path());
                }
            }
        }
    }
}

impl Drop for World {
    fn drop(&mut self) {
        self.reap_containers();
        // `BATON_KEEP_WORLD=always`: every world's dir stays (benches, debugging).
        let keep_always = std::env::var("BATON_KEEP_WORLD").is_ok_and(|v| v == "always");
        if !std::thread::panicking() && !keep_always {
            return;
        }
        let Ok(entries) = std::fs::read_dir(self.path()) else {
            return;
        };
        for e in entries.flatten() {
            if e.path().extension().is_some_and(|x| x == "log") {
                let text = std::fs::read_to_string(e.path()).unwrap_or_default();
                let tail: Vec<&str> = text.lines().rev().take(60).collect();
                eprintln!("----- {} (last {} lines) -----", e.path().display(), tail.len());
                for l in tail.iter().rev() {
                    eprintln!("{l}");
                }
            }
        }
        // `BATON_KEEP_WORLD=1`: a failed test's dir (logs, data) stays for a look.
        if std::env::var_os("BATON_KEEP_WORLD").is_some() {
            let kept = std::mem::replace(&mut self.dir, tempfile::tempdir().expect("tempdir")).keep();
            eprintln!("kept {}", kept.display());
        }
    }
}

/// The broker a test's controller and agents use.
#[derive(Clone, Copy, Debug)]
pub enum BrokerKind {
    Embedded,
    Mosquitto,
}

/// How a `baton server` is launched: kept so a test can restart it identically.
struct ServerSpec {
    /// Its log file's and process's name ("controller" but for replicas).
    name: String,
    http: u16,
    mqtt: u16,
    /// The address the embedded broker listens on (loopback unless a test's
    /// devices live in network namespaces).
    mqtt_host: String,
    external: bool,
    data_dir: PathBuf,
    log_dir: PathBuf,
    extra: Vec<String>,
    /// Added to the environment (a kill point, `BATON_FAILPOINT`).
    env: Vec<(String, String)>,
}

impl ServerSpec {
    fn launch(&self) -> Proc {
        let proc = self.spawn();
        let http = self.http;
        wait_for("controller health", Duration::from_secs(20), || {
            get_json::<serde_json::Value>(http, "/healthz").ok().filter(|h| h["broker_connected"] == true)
        });
        proc
    }

    fn spawn(&self) -> Proc {
        let mut args = vec![
            "server".to_string(),
            "--listen".into(),
            format!("127.0.0.1:{}", self.http),
            "--data-dir".into(),
            self.data_dir.display().to_string(),
        ];
        if self.extra.iter().any(|a| a == "--broker") {
            // The test names the broker nodes itself.
        } else if self.external {
            args.extend(["--broker".into(), format!("mqtt://127.0.0.1:{}", self.mqtt)]);
        } else {
            args.extend(["--mqtt-listen".into(), format!("{}:{}", self.mqtt_host, self.mqtt)]);
        }
        // Tests name images that exist only in devices' local stores (loaded
        // from files) or in a loopback registry: only tests that ask resolve
        // digests, so nothing ever looks up Docker Hub.
        if !self.extra.iter().any(|a| a == "--resolve-digests") {
            args.extend(["--resolve-digests".into(), "false".into()]);
        }
        args.extend(self.extra.iter().cloned());
        let env: Vec<(&str, &str)> = self.env.iter().map(|(k, v)| (k.as_str(), v.as_str())).collect();
        Proc::spawn_with_env(&self.name, &bin("baton"), &args, &self.log_dir, &env)
    }
}

/// A running `baton server`.
pub struct Controller {
    pub proc: Proc,
    pub http: u16,
    pub mqtt: u16,
    spec: ServerSpec,
}

impl Controller {
    /// Starts `baton server`; with `mqtt_external`, uses that broker port instead of embedding one.
    pub fn start(world: &World, mqtt_external: Option<u16>, extra: &[&str]) -> Controller {
        Self::start_with_broker_on(world, "127.0.0.1", mqtt_external, extra)
    }

    /// As `start`, the embedded broker listening on `host` (a network
    /// namespace's gateway address: off loopback, so a lab setting).
    pub fn start_for_namespaces(world: &World, host: &str, extra: &[&str]) -> Controller {
        let mut extra = extra.to_vec();
        extra.push("--allow-insecure-mqtt");
        Self::start_with_broker_on(world, host, None, &extra)
    }

    fn start_with_broker_on(world: &World, host: &str, mqtt_external: Option<u16>, extra: &[&str]) -> Controller {
        let mut extra: Vec<String> = extra.iter().map(|s| s.to_string()).collect();
        if !extra.iter().any(|a| a == "--store") {
            extra.extend(world.store_args());
        }
        let spec = ServerSpec {
            name: "controller".into(),
            http: free_port(),
            mqtt: mqtt_external.unwrap_or_else(free_port),
            mqtt_host: host.to_string(),
            external: mqtt_external.is_some(),
            data_dir: world.path().join("controller"),
            log_dir: world.path().to_path_buf(),
            extra,
            env: Vec::new(),
        };
        Controller { proc: spec.launch(), http: spec.http, mqtt: spec.mqtt, spec }
    }

    /// Another `baton server` on `leader`'s store and external broker, with
    /// its own data dir (`world/NAME`) and HTTP port and the leader's keys
    /// (replicas sign with one key). On PostgreSQL it stands by until the
    /// leader's session ends: this returns without waiting for it to serve.
    pub fn start_replica(world: &World, leader: &Controller, name: &str) -> Controller {
        assert!(leader.spec.external, "replicas share an external broker");
        let keys = &leader.spec.data_dir;
        let mut extra = leader.spec.extra.clone();
        if extra.iter().any(|a| a == "--signing-key") {
            // The leader is a replica itself: its keys are named already.
        } else {
            extra.extend([
                "--signing-key".into(),
                keys.join("signing.key").display().to_string(),
                "--secrets-key".into(),
                keys.join("secrets.key").display().to_string(),
            ]);
        }
        let spec = ServerSpec {
            name: name.into(),
            http: free_port(),
            mqtt: leader.spec.mqtt,
            mqtt_host: leader.spec.mqtt_host.clone(),
            external: true,
            data_dir: world.path().join(name),
            log_dir: world.path().to_path_buf(),
            extra,
            env: Vec::new(),
        };
        Controller { proc: spec.spawn(), http: spec.http, mqtt: spec.mqtt, spec }
    }

    /// Whether it serves (its `/healthz` answers with the broker connected).
    pub fn serving(&self) -> bool {
        get_json::<serde_json::Value>(self.http, "/healthz").is_ok_and(|h| h["broker_connected"] == true)
    }

    /// Stops it (SIGKILL if `kill9`, else SIGTERM) and starts it again on the
    /// same ports and data, with a kill point armed (`BATON_FAILPOINT`, see
    /// the controller's `datadir::failpoint`), or none.
    pub fn restart_armed(&mut self, kill9: bool, failpoint: Option<&str>) {
        if kill9 {
            self.proc.kill9();
        } else {
            self.proc.terminate();
        }
        self.spec.env = failpoint.map(|f| vec![("BATON_FAILPOINT".to_string(), f.to_string())]).unwrap_or_default();
        self.proc = self.spec.launch();
    }

    /// Stops the server (SIGTERM, clean) and starts it again on the same ports and data.
    pub fn restart(&mut self) {
        assert_eq!(self.proc.terminate(), Some(0), "controller did not exit cleanly");
        self.proc = self.spec.launch();
    }

    /// Starts it again on the same ports and data, after the test stopped it.
    pub fn restart_after_stop(&mut self) {
        assert!(!self.proc.is_running(), "the controller is still running");
        self.proc = self.spec.launch();
    }

    /// As `restart`, with these extra flags instead of the first start's
    /// (the same store).
    pub fn restart_with(&mut self, extra: &[&str]) {
        assert_eq!(self.proc.terminate(), Some(0), "controller did not exit cleanly");
        let store: Vec<String> = match self.spec.extra.iter().position(|a| a == "--store") {
            Some(i) if !extra.contains(&"--store") => self.spec.extra[i..i + 2].to_vec(),
            _ => Vec::new(),
        };
        self.spec.extra = extra.iter().map(|s| s.to_string()).chain(store).collect();
        self.proc = self.spec.launch();
    }

    pub fn broker_url(&self) -> String {
        format!("mqtt://{}:{}", self.spec.mqtt_host, self.mqtt)
    }

    pub fn devices(&self) -> Vec<DeviceView> {
        get_json(self.http, "/api/v1/devices").expect("list devices")
    }

    pub fn device(&self, id: &str) -> Option<DeviceView> {
        get_json(self.http, &format!("/api/v1/devices/{id}")).ok()
    }

    /// The last 200 events about `subject`, as the API gives them.
    pub fn events(&self, subject: &str) -> Vec<serde_json::Value> {
        get_json(self.http, &format!("/api/v1/events?subject={subject}&limit=200")).expect("events")
    }

    /// The value of one Prometheus sample line, e.g. `baton_mqtt_rejected_total{reason="malformed"}`.
    pub fn metric(&self, series: &str) -> u64 {
        let text = get_text(self.http, "/metrics").expect("metrics");
        text.lines()
            .find_map(|l| l.strip_prefix(series).and_then(|v| v.trim().parse().ok()))
            .unwrap_or_else(|| panic!("no series {series} in:\n{text}"))
    }

    pub fn server_url(&self) -> String {
        format!("http://127.0.0.1:{}", self.http)
    }
}

/// Starts `baton-agent` for device `id` against `broker`.
pub fn start_agent(world: &World, id: &str, broker: &str, extra: &[&str]) -> Proc {
    Proc::spawn(&format!("agent-{id}"), &bin("baton-agent"), &agent_args(world, id, broker, extra), world.path())
}

/// As `start_agent`, with a kill point armed (`BATON_FAILPOINT=FILE:STAGE`,
/// see the agent's `write_atomic`): it SIGKILLs itself there.
pub fn start_agent_to_die_at(world: &World, id: &str, broker: &str, failpoint: &str) -> Proc {
    let args = agent_args(world, id, broker, &[]);
    Proc::spawn_with_env(
        &format!("agent-{id}"),
        &bin("baton-agent"),
        &args,
        world.path(),
        &[("BATON_FAILPOINT", failpoint)],
    )
}

/// Starts `baton-agent` for device `id` with its wall clock shifted by
/// `offset` (libfaketime's relative syntax: `-3d`, `+3d`), as a Raspberry Pi
/// without a real-time clock or NTP would run. Monotonic time is left alone.
/// libfaketime is preloaded into the agent itself (its shims inherit it):
/// the `faketime` command would fork it, and a `kill -9` of the test's
/// process would then leave the agent running.
pub fn start_agent_at_clock(world: &World, id: &str, broker: &str, extra: &[&str], offset: &str) -> Proc {
    let args = agent_args(world, id, broker, extra);
    let env = faketime_env(offset);
    let env: Vec<(&str, &str)> = env.iter().map(|(k, v)| (*k, v.as_str())).collect();
    Proc::spawn_with_env(&format!("agent-{id}"), &bin("baton-agent"), &args, world.path(), &env)
}

/// The environment that shifts a process's wall clock by `offset` (libfaketime, preloaded).
pub fn faketime_env(offset: &str) -> Vec<(&'static str, String)> {
    let lib =
        ["/usr/lib/x86_64-linux-gnu/faketime/libfaketime.so.1", "/usr/lib/aarch64-linux-gnu/faketime/libfaketime.so.1"]
            .into_iter()
            .find(|p| Path::new(p).exists())
            .expect("libfaketime is not installed: .ci/run installs it (apt-get install faketime)");
    vec![("LD_PRELOAD", lib.into()), ("FAKETIME", offset.into()), ("FAKETIME_DONT_FAKE_MONOTONIC", "1".into())]
}

/// A tmpfs mounted on device `id`'s run dir (as /run is on a real device;
/// an agent writes secrets only there), unmounted when dropped.
pub struct TmpfsRunDir(pub PathBuf);

impl TmpfsRunDir {
    pub fn mount(world: &World, id: &str) -> TmpfsRunDir {
        let run = world.path().join(format!("run-{id}"));
        std::fs::create_dir_all(&run).expect("run dir");
        let mounted = Command::new("mount").args(["-t", "tmpfs", "-o", "size=16m", "tmpfs"]).arg(&run).status();
        assert!(mounted.expect("mount").success(), "cannot mount a tmpfs (tests run as root)");
        TmpfsRunDir(run)
    }
}

impl Drop for TmpfsRunDir {
    fn drop(&mut self) {
        let _ = Command::new("umount").arg("-l").arg(&self.0).status();
    }
}

/// The flags `start_agent` runs an agent with: this world's dirs and cgroup
/// parent, an empty config file, heartbeats every second unless `extra` says.
pub fn agent_args(world: &World, id: &str, broker: &str, extra: &[&str]) -> Vec<String> {
    let mut args = vec![
        "--config".to_string(),
        world.path().join("no-such-agent.toml").display().to_string(),
        "--broker".into(),
        broker.into(),
        "--device-id".into(),
        id.into(),
        "--data-dir".into(),
        world.path().join(format!("agent-{id}")).display().to_string(),
        "--run-dir".into(),
        world.path().join(format!("run-{id}")).display().to_string(),
        "--cgroup-parent".into(),
        format!("/{}-{id}", world.cgroup_prefix()),
    ];
    // Agents on the host's network (not in a device namespace) must not share a bridge.
    if !extra.contains(&"--bridge-name") {
        let (name, subnet) = world.bridge(id);
        args.extend(["--bridge-name".into(), name, "--bridge-subnet".into(), subnet]);
    }
    if !extra.contains(&"--heartbeat-interval") {
        args.extend(["--heartbeat-interval".into(), "1".into()]);
    }
    args.extend(extra.iter().map(|s| s.to_string()));
    // The config file is named explicitly: write an empty one so only flags apply.
    std::fs::write(world.path().join("no-such-agent.toml"), "").expect("empty config");
    args
}

/// A copy of `agent` with `version` stamped in place of its own: the
/// binary `BATON_AGENT_VERSION=<version> cargo build` gives, without a
/// second build of the workspace.
pub fn stamped_agent(world: &World, agent: &Path, version: &str) -> PathBuf {
    use baton_protocol::release::{version_stamp_prefix, VERSION_STAMP_LEN};
    let mut bytes = std::fs::read(agent).expect("the agent binary");
    let prefix = version_stamp_prefix();
    let at = bytes.windows(prefix.len()).position(|w| w == prefix).expect("the agent carries a version stamp")
        + prefix.len();
    let again = bytes[at..].windows(prefix.len()).any(|w| w == prefix);
    assert!(!again, "the agent binary holds its version stamp twice");
    let field = &mut bytes[at..at + VERSION_STAMP_LEN];
    field.fill(0);
    field[..version.len()].copy_from_slice(version.as_bytes());
    let dir = world.path().join(format!("build-{version}"));
    std::fs::create_dir_all(&dir).expect("build dir");
    let path = dir.join("baton-agent");
    std::fs::write(&path, bytes).expect("stamped build");
    path
}

/// The agent as a device runs it: a copy at its own entry path, restarted
/// one second after it exits (systemd's `Restart=always`), with a short
/// trial deadline. Each start arms the kill point named in `<world>/failpoint`
/// (if any), to fire once.
pub fn start_supervised_agent(world: &World, device: &str, broker: &str) -> (Proc, PathBuf) {
    start_supervised_build(world, device, broker, &bin("baton-agent"), 12)
}

/// `start_supervised_agent` with this agent build (another architecture's,
/// run through binfmt_misc) and trial deadline.
pub fn start_supervised_build(
    world: &World,
    device: &str,
    broker: &str,
    build: &Path,
    deadline_s: u64,
) -> (Proc, PathBuf) {
    let entry_dir = world.path().join(format!("usr-local-bin-{device}"));
    std::fs::create_dir_all(&entry_dir).expect("entry dir");
    let entry = entry_dir.join("baton-agent");
    std::fs::copy(build, &entry).expect("install the agent");
    let config = world.write(
        &format!("agent-{device}.toml"),
        &format!("upgrade_deadline_s = {deadline_s}\nagent_entry = {:?}\n", entry.display().to_string()),
    );
    let mut args = agent_args(world, device, broker, &[]);
    let at = args.iter().position(|a| a == "--config").expect("--config") + 1;
    args[at] = config.display().to_string();
    let fp = world.path().join("failpoint");
    let script = format!(
        "while :; do BATON_FAILPOINT=\"$(cat {fp} 2>/dev/null)\" BATON_FAILPOINT_ONCE={fp}.fired \"$0\" \"$@\"; sleep 1; done",
        fp = fp.display()
    );
    let mut sh = vec!["-c".to_string(), script];
    sh.push(entry.display().to_string());
    sh.extend(args);
    (Proc::spawn(&format!("agent-{device}"), Path::new("/bin/sh"), &sh, world.path()), entry)
}

/// Pids of `device`'s agent processes (not the supervising shell, not the
/// upgrade watcher, not shims).
pub fn agent_pids(device: &str) -> Vec<i32> {
    let needle = format!("--device-id\0{device}\0");
    std::fs::read_dir("/proc")
        .into_iter()
        .flatten()
        .flatten()
        .filter_map(|e| {
            let pid: i32 = e.file_name().to_str()?.parse().ok()?;
            let cmd = String::from_utf8_lossy(&std::fs::read(format!("/proc/{pid}/cmdline")).ok()?).into_owned();
            (cmd.contains(&needle) && !cmd.starts_with("/bin/sh\0")).then_some(pid)
        })
        .collect()
}

/// Starts `baton-agent simulate`: `devices` fake devices named `{prefix}-0000`…
pub fn start_simulator(world: &World, prefix: &str, devices: usize, broker: &str, extra: &[&str]) -> Proc {
    let mut args = vec![
        "simulate".to_string(),
        "--devices".into(),
        devices.to_string(),
        "--prefix".into(),
        prefix.into(),
        "--broker".into(),
        broker.into(),
        "--data-dir".into(),
        world.path().join(format!("sim-{prefix}")).display().to_string(),
    ];
    if !extra.contains(&"--heartbeat-interval") {
        args.extend(["--heartbeat-interval".into(), "2".into()]);
    }
    args.extend(extra.iter().map(|s| s.to_string()));
    Proc::spawn(&format!("sim-{prefix}"), &bin("baton-agent"), &args, world.path())
}

/// A Mosquitto broker on a free loopback port, configured as Baton documents.
pub struct Mosquitto {
    pub proc: Proc,
    pub port: u16,
    name: String,
    conf: PathBuf,
}

impl Mosquitto {
    pub fn start(world: &World) -> Mosquitto {
        Self::start_with(world, "allow_anonymous true\n")
    }

    /// Starts Mosquitto with `auth` lines (allow_anonymous, password_file, acl_file…).
    pub fn start_with(world: &World, auth: &str) -> Mosquitto {
        Self::start_as(world, "mosquitto", auth)
    }

    /// Starts a Mosquitto named `name` (its config and log files: several
    /// brokers in one world) with `lines` added to Baton's documented config.
    pub fn start_as(world: &World, name: &str, lines: &str) -> Mosquitto {
        let port = free_port();
        let conf = world.path().join(format!("{name}.conf"));
        std::fs::write(
            &conf,
            format!(
                "listener {port} 127.0.0.1\npersistence false\n\
                 max_queued_messages 100000\nmax_inflight_messages 1000\nmessage_size_limit 307200\nset_tcp_nodelay true\nlog_dest stderr\n{lines}"
            ),
        )
        .expect("mosquitto.conf");
        let mosquitto =
            which("mosquitto").expect("mosquitto is not installed: .ci/run installs it (apt-get install mosquitto)");
        let proc = Proc::spawn(name, &mosquitto, &["-c".into(), conf.display().to_string()], world.path());
        wait_for("mosquitto listening", Duration::from_secs(10), || {
            std::net::TcpStream::connect(("127.0.0.1", port)).ok()
        });
        Mosquitto { proc, port, name: name.into(), conf }
    }

    pub fn url(&self) -> String {
        format!("mqtt://127.0.0.1:{}", self.port)
    }
}

impl Mosquitto {
    /// Kills it and starts it again on the same port (with its config).
    pub fn restart(&mut self) {
        self.proc.kill9();
        let mosquitto = which("mosquitto").expect("mosquitto");
        self.proc = Proc::spawn(
            &self.name,
            &mosquitto,
            &["-c".into(), self.conf.display().to_string()],
            self.conf.parent().expect("dir"),
        );
        let port = self.port;
        wait_for("mosquitto listening again", Duration::from_secs(10), || {
            std::net::TcpStream::connect(("127.0.0.1", port)).ok()
        });
    }
}

/// A device record as the controller stores it (online, tenant `acme`,
/// label `site=lab`), for store tests and benchmarks.
pub fn stored_device(id: &str, last_seen: u64) -> baton_controller::fleet::Device {
    use baton_protocol::{Presence, PresenceState};
    baton_controller::fleet::Device {
        id: id.into(),
        first_seen: 1,
        last_seen,
        presence: Presence {
            state: PresenceState::Online,
            agent_version: "0.1.0".into(),
            boot_id: "b".into(),
            started_at: 3,
        },
        inventory: None,
        heartbeat: None,
        operator_labels: [("site".to_string(), "lab".to_string())].into(),
        report: None,
        tenant: "acme".into(),
        offline_since: None,
        refusal: None,
        clock_offset_ms: None,
        history: Default::default(),
        connected_at: 0,
    }
}

/// Debian's PostgreSQL on a free loopback port, its cluster in a temp dir
/// of its own (`initdb`, trust authentication on loopback, no fsync: a test
/// store), with a database `baton` for the controllers of one world. As
/// root the server runs as the `postgres` user: PostgreSQL refuses root.
pub struct Postgres {
    /// Behind a lock: a test stops and starts the server its world owns.
    proc: std::sync::Mutex<Proc>,
    pub port: u16,
    bin: PathBuf,
    data: tempfile::TempDir,
    log_dir: PathBuf,
    user: Option<(u32, u32)>,
}

impl Postgres {
    pub fn start(world: &World) -> Postgres {
        let bin = postgres_bin().expect(
            "PostgreSQL is not installed: .ci/run installs it (apt-get install postgresql; its binaries are in /usr/lib/postgresql/VERSION/bin)",
        );
        let user = postgres_user();
        let data = tempfile::Builder::new().prefix("baton-pg-").tempdir_in("/tmp").expect("postgres dir");
        if let Some((uid, gid)) = user {
            std::os::unix::fs::chown(data.path(), Some(uid), Some(gid)).expect("chown the postgres dir");
        }
        let cluster = data.path().join("cluster");
        let out = as_user(Command::new(bin.join("initdb")), user)
            .args(["-D", &cluster.display().to_string(), "-U", "baton", "-A", "trust", "-E", "UTF8", "--no-sync"])
            .output()
            .expect("run initdb");
        assert!(out.status.success(), "initdb failed: {}", String::from_utf8_lossy(&out.stderr));
        let port = free_port();
        let proc = Self::launch(&bin, data.path(), port, world.path(), user);
        let pg = Postgres { proc: proc.into(), port, bin, data, log_dir: world.path().to_path_buf(), user };
        let created = Command::new(pg.bin.join("createdb"))
            .args(["-h", "127.0.0.1", "-p", &pg.port.to_string(), "-U", "baton", "baton"])
            .output()
            .expect("run createdb");
        assert!(created.status.success(), "createdb failed: {}", String::from_utf8_lossy(&created.stderr));
        pg
    }

    fn launch(bin: &Path, data: &Path, port: u16, log_dir: &Path, user: Option<(u32, u32)>) -> Proc {
        let cluster = data.join("cluster").display().to_string();
        let log = log_dir.join("postgres.log");
        let out = File::options().create(true).append(true).open(&log).expect("postgres log");
        let mut cmd = as_user(Command::new(bin.join("postgres")), user);
        let settings = [
            "listen_addresses=127.0.0.1".to_string(),
            format!("port={port}"),
            format!("unix_socket_directories={}", data.display()),
            "fsync=off".into(),
            "full_page_writes=off".into(),
            "max_connections=100".into(),
            "shared_buffers=32MB".into(),
        ];
        cmd.args(["-D", &cluster]);
        for s in &settings {
            cmd.args(["-c", s]);
        }
        let child =
            cmd.stdin(Stdio::null()).stdout(out.try_clone().expect("dup")).stderr(out).spawn().expect("spawn postgres");
        wait_for("postgres accepting connections", Duration::from_secs(30), || {
            Command::new(bin.join("pg_isready"))
                .args(["-q", "-h", "127.0.0.1", "-U", "baton", "-p", &port.to_string()])
                .status()
                .ok()
                .filter(|s| s.success())
        });
        Proc { name: "postgres".into(), child, log }
    }

    /// The URL a controller is given.
    pub fn url(&self) -> String {
        format!("postgres://baton@127.0.0.1:{}/baton", self.port)
    }

    /// A new empty database `name`; its URL.
    pub fn database(&self, name: &str) -> String {
        self.psql(&format!("CREATE DATABASE {name}"));
        format!("postgres://baton@127.0.0.1:{}/{name}", self.port)
    }

    /// Stops it as an operator restarting it does (fast shutdown: clients
    /// are disconnected, the data is flushed).
    pub fn stop(&self) {
        let mut proc = self.proc.lock().unwrap_or_else(|e| e.into_inner());
        // SAFETY: kill(2) on our own child's pid.
        unsafe { libc::kill(proc.pid() as i32, libc::SIGINT) };
        let _ = proc.child.wait();
    }

    /// Starts it again on the same port and data.
    pub fn start_again(&self) {
        let new = Self::launch(&self.bin, self.data.path(), self.port, &self.log_dir, self.user);
        *self.proc.lock().unwrap_or_else(|e| e.into_inner()) = new;
    }

    /// Turns TLS on (a certificate for 127.0.0.1 from a fresh CA; plain
    /// connections are still accepted) and returns the CA's PEM file.
    pub fn enable_tls(&self) -> PathBuf {
        let dir = self.data.path().join("tls");
        std::fs::create_dir_all(&dir).expect("tls dir");
        let (ca, cert, key) = test_certificates(&dir, "127.0.0.1".parse().expect("ip"));
        for f in [&cert, &key] {
            std::fs::set_permissions(f, std::os::unix::fs::PermissionsExt::from_mode(0o600)).expect("chmod");
            if let Some((uid, gid)) = self.user {
                std::os::unix::fs::chown(f, Some(uid), Some(gid)).expect("chown");
            }
        }
        self.psql(&format!("ALTER SYSTEM SET ssl_cert_file = '{}'", cert.display()));
        self.psql(&format!("ALTER SYSTEM SET ssl_key_file = '{}'", key.display()));
        self.psql("ALTER SYSTEM SET ssl = on");
        self.psql("SELECT pg_reload_conf()");
        wait_for("PostgreSQL speaking TLS", Duration::from_secs(10), || (self.psql("SHOW ssl") == "on").then_some(()));
        ca
    }

    /// Accepts TCP clients only over TLS and with a client certificate
    /// (pg_hba `cert`: its common name is the user) from `enable_tls`'s
    /// CA; `psql` still gets in through the Unix socket. The client's
    /// certificate and key files.
    pub fn require_client_certificates(&self) -> (PathBuf, PathBuf) {
        let tls = self.data.path().join("tls");
        let ca = tls.join("ca.pem");
        if let Some((uid, gid)) = self.user {
            std::os::unix::fs::chown(&ca, Some(uid), Some(gid)).expect("chown");
        }
        let hba = self.data.path().join("cluster/pg_hba.conf");
        let rest = std::fs::read_to_string(&hba).expect("pg_hba.conf");
        let lines = "local all all trust\nhostssl all all 127.0.0.1/32 cert\nhost all all 127.0.0.1/32 reject\n";
        std::fs::write(&hba, format!("{lines}{rest}")).expect("pg_hba.conf");
        self.psql(&format!("ALTER SYSTEM SET ssl_ca_file = '{}'", ca.display()));
        self.psql("SELECT pg_reload_conf()");
        wait_for("PostgreSQL asking for client certificates", Duration::from_secs(10), || {
            (self.psql("SHOW ssl_ca_file") == ca.display().to_string()).then_some(())
        });
        (tls.join("client.pem"), tls.join("client.key"))
    }

    /// Runs SQL through psql (on the Unix socket); its output (unaligned, tuples only).
    pub fn psql(&self, sql: &str) -> String {
        let socket = self.data.path().display().to_string();
        let out = Command::new(self.bin.join("psql"))
            .args(["-h", &socket, "-p", &self.port.to_string(), "-U", "baton", "-d", "baton", "-At", "-c", sql])
            .output()
            .expect("run psql");
        assert!(out.status.success(), "psql {sql}: {}", String::from_utf8_lossy(&out.stderr));
        String::from_utf8_lossy(&out.stdout).trim().to_string()
    }
}

impl Drop for Postgres {
    fn drop(&mut self) {
        let running = self.proc.get_mut().map(|p| p.is_running()).unwrap_or(false);
        if running {
            self.stop();
        }
    }
}

/// The newest PostgreSQL's binaries (Debian: /usr/lib/postgresql/VERSION/bin).
fn postgres_bin() -> Option<PathBuf> {
    let mut versions: Vec<(u32, PathBuf)> = std::fs::read_dir("/usr/lib/postgresql")
        .ok()?
        .flatten()
        .filter_map(|e| Some((e.file_name().to_str()?.parse().ok()?, e.path().join("bin"))))
        .filter(|(_, bin): &(u32, PathBuf)| bin.join("postgres").exists())
        .collect();
    versions.sort();
    versions.pop().map(|(_, bin)| bin)
}

/// As root: the `postgres` user's uid and gid (the server refuses root).
fn postgres_user() -> Option<(u32, u32)> {
    // SAFETY: geteuid has no preconditions.
    if unsafe { libc::geteuid() } != 0 {
        return None;
    }
    let id = |flag: &str| -> u32 {
        let out = Command::new("id").args([flag, "postgres"]).output().expect("run id");
        assert!(out.status.success(), "no postgres user (Debian's postgresql package makes it)");
        String::from_utf8_lossy(&out.stdout).trim().parse().expect("a numeric id")
    };
    Some((id("-u"), id("-g")))
}

fn as_user(mut cmd: Command, user: Option<(u32, u32)>) -> Command {
    use std::os::unix::process::CommandExt;
    if let Some((uid, gid)) = user {
        cmd.uid(uid).gid(gid);
    }
    cmd
}

/// `deploy/cluster/` brought up by its `up.sh` on free loopback ports
/// (PostgreSQL, three NATS nodes, three controllers), stopped by its
/// `down.sh` however the test ends.
pub struct DeployedCluster {
    dir: tempfile::TempDir,
    /// What `up.sh` wrote to `cluster.env`.
    pub env: std::collections::BTreeMap<String, String>,
    /// The NATS nodes' MQTT ports.
    pub mqtt: Vec<u16>,
    /// The controllers' HTTP ports.
    pub api: Vec<u16>,
}

impl DeployedCluster {
    /// `server_args`: more flags for every controller.
    pub fn up(server_args: &[&str]) -> DeployedCluster {
        // Outside the world's private dir: PostgreSQL runs as its own user.
        let dir = tempfile::Builder::new().prefix("baton-cluster-").tempdir_in("/tmp").expect("cluster dir");
        std::fs::set_permissions(dir.path(), std::os::unix::fs::PermissionsExt::from_mode(0o755)).expect("chmod");
        let ports = |n: usize| (0..n).map(|_| free_port()).collect::<Vec<u16>>();
        let (nats, mqtt, routes, api) = (ports(3), ports(3), ports(3), ports(3));
        let list = |p: &[u16]| p.iter().map(u16::to_string).collect::<Vec<_>>().join(" ");
        let out = Command::new(cluster_script("up.sh"))
            .env("DIR", dir.path())
            .env("PG_PORT", free_port().to_string())
            .env("NATS_PORTS", list(&nats))
            .env("MQTT_PORTS", list(&mqtt))
            .env("ROUTE_PORTS", list(&routes))
            .env("API_PORTS", list(&api))
            .env("BATON", bin("baton"))
            .env("BATON_SERVER_ARGS", server_args.join(" "))
            .output()
            .expect("run deploy/cluster/up.sh");
        let mut cluster = DeployedCluster { env: Default::default(), dir, mqtt, api };
        assert!(
            out.status.success(),
            "up.sh failed: {}{}\n{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr),
            cluster.logs()
        );
        let env = std::fs::read_to_string(cluster.dir.path().join("cluster.env")).expect("cluster.env");
        cluster.env = env
            .lines()
            .filter_map(|l| l.split_once('='))
            .map(|(k, v)| (k.to_string(), v.trim_matches('"').to_string()))
            .collect();
        cluster
    }

    pub fn pid(&self, name: &str) -> i32 {
        let pid = std::fs::read_to_string(self.dir.path().join("pids").join(name)).expect("a pid file");
        pid.trim().parse().expect("a pid")
    }

    /// SIGKILL to `name` (`nats-1`, `controller-2`, `postgres`).
    pub fn kill9(&self, name: &str) {
        let pid = self.pid(name);
        // SAFETY: kill(2) on a process up.sh started for this test.
        unsafe { libc::kill(pid, libc::SIGKILL) };
        wait_for(name, Duration::from_secs(10), || (!alive(pid)).then_some(()));
    }

    /// The controllers' ports that answer `/healthz` with their broker connected.
    pub fn serving(&self) -> Vec<u16> {
        self.api
            .iter()
            .copied()
            .filter(|p| get_json::<serde_json::Value>(*p, "/healthz").is_ok_and(|h| h["broker_connected"] == true))
            .collect()
    }

    pub fn logs(&self) -> String {
        let mut out = String::new();
        for e in std::fs::read_dir(self.dir.path().join("logs")).into_iter().flatten().flatten() {
            let text = std::fs::read_to_string(e.path()).unwrap_or_default();
            let tail: Vec<&str> = text.lines().rev().take(30).collect();
            out += &format!("----- {} -----\n", e.path().display());
            for l in tail.iter().rev() {
                out += l;
                out.push('\n');
            }
        }
        out
    }
}

impl Drop for DeployedCluster {
    fn drop(&mut self) {
        if std::thread::panicking() {
            eprintln!("{}", self.logs());
        }
        let _ = Command::new(cluster_script("down.sh")).env("DIR", self.dir.path()).status();
    }
}

fn cluster_script(name: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../deploy/cluster").join(name)
}

/// Debian's docker-registry (the CNCF distribution registry) on a free
/// loopback port, storing under the world's temp dir.
pub struct RegistryServer {
    pub proc: Proc,
    pub port: u16,
    /// `address:port` clients use (`127.0.0.1:port` unless started with TLS).
    pub host: String,
}

/// This machine's first non-loopback IPv4 address (the route a packet to a
/// documentation address would take; nothing is sent).
pub fn host_address() -> std::net::IpAddr {
    let s = std::net::UdpSocket::bind("0.0.0.0:0").expect("udp socket");
    s.connect("198.51.100.1:9").expect("this test needs a non-loopback IPv4 route");
    let ip = s.local_addr().expect("local address").ip();
    assert!(!ip.is_loopback() && !ip.is_unspecified(), "no non-loopback IPv4 address ({ip})");
    ip
}

/// A fresh CA and a server certificate for `ip` signed by it, as PEM files
/// in `dir`: (ca.pem, cert.pem, key.pem).
pub fn test_certificates(dir: &Path, ip: std::net::IpAddr) -> (PathBuf, PathBuf, PathBuf) {
    use rcgen::{BasicConstraints, CertificateParams, IsCa, KeyPair, SanType};
    let ca_key = KeyPair::generate().expect("CA key");
    let mut ca = CertificateParams::new(Vec::<String>::new()).expect("CA params");
    ca.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
    let ca_cert = ca.self_signed(&ca_key).expect("CA certificate");
    let key = KeyPair::generate().expect("server key");
    let mut p = CertificateParams::new(Vec::<String>::new()).expect("server params");
    p.subject_alt_names.push(SanType::IpAddress(ip));
    let cert = p.signed_by(&key, &ca_cert, &ca_key).expect("server certificate");
    let paths = (dir.join("ca.pem"), dir.join("cert.pem"), dir.join("key.pem"));
    std::fs::write(&paths.0, ca_cert.pem()).expect("ca.pem");
    std::fs::write(&paths.1, cert.pem()).expect("cert.pem");
    std::fs::write(&paths.2, key.serialize_pem()).expect("key.pem");
    // A client certificate from the same CA, for the user "baton"
    // (PostgreSQL's `cert` authentication matches its common name).
    let client_key = KeyPair::generate().expect("client key");
    let mut p = CertificateParams::new(Vec::<String>::new()).expect("client params");
    p.distinguished_name.push(rcgen::DnType::CommonName, "baton");
    let client = p.signed_by(&client_key, &ca_cert, &ca_key).expect("client certificate");
    std::fs::write(dir.join("client.pem"), client.pem()).expect("client.pem");
    write_private(&dir.join("client.key"), &client_key.serialize_pem());
    paths
}

fn write_private(path: &Path, text: &str) {
    use std::io::Write;
    use std::os::unix::fs::OpenOptionsExt;
    let mut f = File::options().write(true).create(true).truncate(true).mode(0o600).open(path).expect("private file");
    f.write_all(text.as_bytes()).expect("write private file");
}

impl RegistryServer {
    pub fn start(world: &World) -> RegistryServer {
        Self::start_with(world, None, None)
    }

    /// A registry that requires this user and password (htpasswd, bcrypt).
    pub fn start_with_auth(world: &World, user: &str, password: &str) -> RegistryServer {
        Self::start_with(world, Some((user, password)), None)
    }

    /// A registry on this machine's network address (not loopback, so
    /// clients speak HTTPS to it) with a certificate from a CA of its own;
    /// returns it and the CA's PEM file.
    pub fn start_tls(world: &World) -> (RegistryServer, PathBuf) {
        let dir = world.path().join("registry-tls");
        std::fs::create_dir_all(&dir).expect("tls dir");
        let ip = host_address();
        let (ca, cert, key) = test_certificates(&dir, ip);
        (Self::start_with(world, None, Some((ip, &cert, &key))), ca)
    }

    fn start_with(
        world: &World,
        auth: Option<(&str, &str)>,
        tls: Option<(std::net::IpAddr, &Path, &Path)>,
    ) -> RegistryServer {
        let port = free_port();
        let storage = world.path().join("registry-storage");
        let conf = world.path().join("registry.yml");
        let ip = tls.map_or_else(|| "127.0.0.1".to_string(), |(ip, _, _)| ip.to_string());
        let mut yaml = format!(
            "version: 0.1\nlog:\n  level: warn\nstorage:\n  filesystem:\n    rootdirectory: {}\nhttp:\n  addr: {ip}:{port}\n",
            storage.display()
        );
        if let Some((_, cert, key)) = tls {
            yaml.push_str(&format!("  tls:\n    certificate: {}\n    key: {}\n", cert.display(), key.display()));
        }
        if let Some((user, password)) = auth {
            let htpasswd = which("htpasswd").expect("htpasswd is not installed: .ci/run installs apache2-utils");
            let out = Command::new(htpasswd).args(["-Bbn", user, password]).output().expect("htpasswd");
            let file = world.path().join("htpasswd");
            std::fs::write(&file, &out.stdout).expect("htpasswd file");
            yaml.push_str(&format!("auth:\n  htpasswd:\n    realm: baton-test\n    path: {}\n", file.display()));
        }
        std::fs::write(&conf, yaml).expect("registry.yml");
        let exe = which("docker-registry")
            .expect("docker-registry is not installed: .ci/run installs it (apt-get install docker-registry)");
        let proc = Proc::spawn("registry", &exe, &["serve".into(), conf.display().to_string()], world.path());
        // /v2/ answers 200, or 401 when auth is on: either way it is up.
        let host = format!("{ip}:{port}");
        wait_for("registry listening", Duration::from_secs(20), || std::net::TcpStream::connect(&host).ok());
        RegistryServer { proc, port, host }
    }

    /// Pushes the image named `name` in an OCI layout to `repo:tag` with skopeo.
    pub fn push(&self, layout: &Path, name: &str, repo_tag: &str) {
        self.push_as(layout, name, repo_tag, None)
    }

    pub fn push_as(&self, layout: &Path, name: &str, repo_tag: &str, creds: Option<&str>) {
        let skopeo = which("skopeo").expect("skopeo is not installed: .ci/run installs it");
        let mut cmd = Command::new(skopeo);
        // --all: an index is pushed whole, every platform's image with it.
        cmd.args(["copy", "--all", "--dest-tls-verify=false"]);
        if let Some(c) = creds {
            cmd.args(["--dest-creds", c]);
        }
        let out = cmd
            .arg(format!("oci:{}:{name}", layout.display()))
            .arg(format!("docker://{}/{repo_tag}", self.host))
            .output()
            .expect("skopeo");
        assert!(out.status.success(), "skopeo copy: {}", String::from_utf8_lossy(&out.stderr));
    }
}

/// Bytes of the files under `path` (apparent sizes; 0 for what cannot be read).
pub fn dir_bytes(path: &Path) -> u64 {
    let mut total = 0;
    for e in std::fs::read_dir(path).into_iter().flatten().flatten() {
        let Ok(m) = e.metadata() else { continue };
        total += if m.is_dir() { dir_bytes(&e.path()) } else { m.len() };
    }
    total
}

pub fn which(name: &str) -> Option<PathBuf> {
    let path = std::env::var_os("PATH")?;
    std::env::split_paths(&path).chain(["/usr/sbin".into(), "/sbin".into()]).map(|d| d.join(name)).find(|p| p.exists())
}

fn agent() -> ureq::Agent {
    ureq::Agent::config_builder().http_status_as_error(true).timeout_global(Some(Duration::from_secs(5))).build().into()
}

pub fn get_json<T: serde::de::DeserializeOwned>(port: u16, path: &str) -> anyhow::Result<T> {
    Ok(agent().get(format!("http://127.0.0.1:{port}{path}")).call()?.body_mut().read_json()?)
}

pub fn get_text(port: u16, path: &str) -> anyhow::Result<String> {
    get_text_as(port, path, None)
}

/// Status and body of a GET, whatever the status.
pub fn get_status(port: u16, path: &str) -> anyhow::Result<(u16, String)> {
    let mut res =
        agent().get(format!("http://127.0.0.1:{port}{path}")).config().http_status_as_error(false).build().call()?;
    Ok((res.status().as_u16(), res.body_mut().read_to_string()?))
}

/// `get_text` with `Authorization: Bearer <token>` when a token is given.
pub fn get_text_as(port: u16, path: &str, token: Option<&str>) -> anyhow::Result<String> {
    let mut req = agent().get(format!("http://127.0.0.1:{port}{path}"));
    if let Some(token) = token {
        req = req.header("authorization", format!("Bearer {token}"));
    }
    Ok(req.call()?.body_mut().read_to_string()?)
}

/// Loads an OCI layout into an agent's data dir the way an air-gapped device
/// does (`baton-agent image load`); panics with its stderr on failure, returns its stdout.
pub fn load_image(data_dir: &Path, layout: &Path) -> String {
    let out = Command::new(bin("baton-agent"))
        .args(["image", "load"])
        .arg(layout)
        .arg("--data-dir")
        .arg(data_dir)
        .output()
        .expect("run baton-agent image load");
    assert!(out.status.success(), "image load: {}", String::from_utf8_lossy(&out.stderr));
    String::from_utf8_lossy(&out.stdout).into_owned()
}

/// Gives device `device` (an agent started with `start_agent`) a busybox
/// image named `reference` in its local store, as `baton-agent image load` would.
pub fn give_busybox(world: &World, device: &str, reference: &str) {
    let dir = world.path().join(format!("img-{device}"));
    let rootfs = fixtures::busybox_rootfs(&dir).expect("busybox rootfs");
    let layout = fixtures::oci_layout(&dir.join("layout"), &rootfs, reference).expect("OCI layout");
    load_image(&world.path().join(format!("agent-{device}")), &layout);
}

/// Runs the `baton` CLI against `server`; returns (exit ok, stdout, stderr).
pub fn baton_cli(server: &str, args: &[&str]) -> (bool, String, String) {
    baton_cli_as(server, None, args)
}

/// `baton_cli` with an API token (`BATON_TOKEN`).
pub fn baton_cli_as(server: &str, token: Option<&str>, args: &[&str]) -> (bool, String, String) {
    let mut cmd = Command::new(bin("baton"));
    cmd.args(args).env("BATON_SERVER", server).env_remove("BATON_TOKEN").stdin(Stdio::null());
    if let Some(t) = token {
        cmd.env("BATON_TOKEN", t);
    }
    let out = cmd.output().expect("run baton");
    (out.status.success(), String::from_utf8_lossy(&out.stdout).into(), String::from_utf8_lossy(&out.stderr).into())
}

/// The signing key tests use when they act as the controller themselves.
pub const TEST_SIGNING_SEED: [u8; 32] = [42; 32];

/// `ed25519:HEX` of [`TEST_SIGNING_SEED`]: what such tests pass as `--controller-key`.
pub fn test_controller_key() -> String {
    let key = baton_protocol::crypto::SigningKey::from_seed(&TEST_SIGNING_SEED);
    format!("ed25519:{}", baton_protocol::crypto::hex(&key.public()))
}

/// A key file holding [`TEST_SIGNING_SEED`], for a controller that signs as
/// the tests do (`--signing-key`): its commands reach agents that pinned the
/// test key from documents the test published itself.
pub fn test_signing_key_file(world: &World) -> PathBuf {
    let path = world.path().join("test-signing.key");
    std::fs::write(&path, format!("{}\n", baton_protocol::crypto::hex(&TEST_SIGNING_SEED))).expect("key file");
    path
}

/// A desired document for `device`, encoded and signed as a controller would.
pub fn signed_desired(device: &str, doc: &baton_protocol::Desired, seed: &[u8; 32]) -> Vec<u8> {
    use baton_protocol::{encode, Message};
    let inner = encode(&Message::Desired(doc.clone())).expect("encode");
    let signed = baton_protocol::crypto::SigningKey::from_seed(seed).sign_desired(device, inner);
    encode(&Message::SignedDesired(signed)).expect("encode")
}

/// `baton apply -f` of `yaml`, written to `file` in the world's dir; panics
/// with the CLI's stderr when refused, returns its stdout.
pub fn apply_yaml(server: &str, world: &World, file: &str, yaml: &str) -> String {
    let path = world.path().join(file);
    std::fs::write(&path, yaml).expect("manifest");
    let (ok, out, err) = baton_cli(server, &["apply", "-f", path.to_str().expect("utf-8")]);
    assert!(ok, "apply {file}: {err}");
    out
}

/// `baton describe workload NAME -o json`, or None when the CLI fails.
pub fn describe_workload(server: &str, name: &str) -> Option<WorkloadView> {
    let (ok, out, _) = baton_cli(server, &["describe", "workload", name, "-o", "json"]);
    ok.then(|| serde_json::from_str(&out).expect("describe workload: json"))
}

/// The workload once each of its `devices` placed devices is asked for and
/// reports `revision` running and healthy.
pub fn settled(server: &str, name: &str, revision: u64, devices: usize) -> Option<WorkloadView> {
    let w = describe_workload(server, name)?;
    let ok = w.devices.len() == devices
        && w.devices.iter().all(|d| {
            d.desired_revision == revision
                && d.reported.as_ref().is_some_and(|r| {
                    r.revision == revision
                        && r.phase == baton_protocol::Phase::Running
                        && r.health == baton_protocol::Health::Healthy
                })
        });
    ok.then_some(w)
}

/// The pid of a running container, from the record its shim keeps in `run_dir`.
pub fn running_pid(run_dir: &Path, container: &str) -> Option<i32> {
    let bytes = std::fs::read(run_dir.join("containers").join(container).join("running.json")).ok()?;
    serde_json::from_slice::<serde_json::Value>(&bytes).ok()?["pid"].as_i64().map(|p| p as i32)
}

/// Whether `pid` is a live (not zombie) process.
pub fn alive(pid: i32) -> bool {
    std::fs::read_to_string(format!("/proc/{pid}/stat"))
        .is_ok_and(|s| !s.rsplit(')').next().unwrap_or("").trim_start().starts_with('Z'))
}

/// Every container log of an agent's data dir, concatenated.
pub fn container_logs(data_dir: &Path) -> String {
    std::fs::read_dir(data_dir.join("containers"))
        .into_iter()
        .flatten()
        .flatten()
        .filter_map(|e| std::fs::read_to_string(e.path().join("container.log")).ok())
        .collect()
}

/// A "device" host: a network namespace joined to this machine by a veth
/// pair, addresses only inside it (`10.231.N.2`, this side `10.231.N.1`).
/// Removed, with its links and rules, when dropped.
pub struct NetNs {
    pub name: String,
    /// This machine's end of the link: where the device reaches the controller.
    pub host_ip: String,
    pub device_ip: String,
}

impl NetNs {
    pub fn new() -> NetNs {
        static N: std::sync::atomic::AtomicU32 = std::sync::atomic::AtomicU32::new(0);
        // A subnet per namespace: 5 per test process (test binaries run one at a time).
        let n = 1 + (std::process::id() % 50) * 5 + N.fetch_add(1, std::sync::atomic::Ordering::Relaxed) % 5;
        let name = format!("baton-{}-{n}", std::process::id());
        let (host_if, dev_if) =
            (format!("bh{n}x{}", std::process::id() % 1000), format!("bd{n}x{}", std::process::id() % 1000));
        let ns = NetNs { name: name.clone(), host_ip: format!("10.231.{n}.1"), device_ip: format!("10.231.{n}.2") };
        let ip = |args: &[&str]| {
            let out = Command::new("ip").args(args).output().expect("ip (iproute2)");
            assert!(out.status.success(), "ip {args:?}: {}", String::from_utf8_lossy(&out.stderr));
        };
        ip(&["netns", "add", &name]);
        ip(&["link", "add", &host_if, "type", "veth", "peer", "name", &dev_if]);
        ip(&["link", "set", &dev_if, "netns", &name]);
        ip(&["addr", "add", &format!("{}/24", ns.host_ip), "dev", &host_if]);
        ip(&["link", "set", &host_if, "up"]);
        ns.run(&["ip", "addr", "add", &format!("{}/24", ns.device_ip), "dev", &dev_if]);
        ns.run(&["ip", "link", "set", &dev_if, "up"]);
        ns.run(&["ip", "link", "set", "lo", "up"]);
        ns
    }

    /// `nsenter` arguments that run the next program in this namespace's
    /// network only (`ip netns exec` would also remount /sys, hiding cgroups).
    pub fn enter(&self) -> Vec<String> {
        vec![format!("--net=/run/netns/{}", self.name)]
    }

    /// Runs a command in the namespace; panics with its stderr if it fails.
    pub fn run(&self, argv: &[&str]) {
        let out = Command::new("nsenter").args(self.enter()).args(argv).output().expect("nsenter (util-linux)");
        assert!(out.status.success(), "{argv:?} in {}: {}", self.name, String::from_utf8_lossy(&out.stderr));
    }

    /// Cuts the device off: every packet in or out is dropped.
    pub fn partition(&self) {
        self.run(&["iptables", "-I", "INPUT", "-j", "DROP"]);
        self.run(&["iptables", "-I", "OUTPUT", "-j", "DROP"]);
    }

    pub fn heal(&self) {
        self.run(&["iptables", "-D", "INPUT", "-j", "DROP"]);
        self.run(&["iptables", "-D", "OUTPUT", "-j", "DROP"]);
    }
}

impl Default for NetNs {
    fn default() -> Self {
        Self::new()
    }
}

impl Drop for NetNs {
    fn drop(&mut self) {
        // Deleting the namespace deletes its end of the veth, and with it ours.
        let _ = Command::new("ip").args(["netns", "del", &self.name]).status();
    }
}

/// Starts `baton-agent` for device `id` inside `ns`'s network.
pub fn start_agent_in(world: &World, ns: &NetNs, id: &str, broker: &str, extra: &[&str]) -> Proc {
    let mut args = ns.enter();
    args.push(bin("baton-agent").display().to_string());
    args.extend(agent_args(world, id, broker, extra));
    let nsenter = which("nsenter").expect("nsenter (util-linux)");
    Proc::spawn(&format!("agent-{id}"), &nsenter, &args, world.path())
}

/// FNV-1a: names derived from paths and ids.
fn fnv(bytes: &[u8]) -> u32 {
    bytes.iter().fold(0x811c_9dc5u32, |h, b| (h ^ u32::from(*b)).wrapping_mul(0x0100_0193))
}
