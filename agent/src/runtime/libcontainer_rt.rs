//! The real [`ContainerRuntime`]: each container gets a bundle directory and a
//! shim process (see `shim`), forked by the spawner (see `spawner`). This
//! side never creates or starts a container through libcontainer: it writes
//! the bundle, has the shim launched, and reads what the shim records; it only deletes libcontainer's
//! state of containers whose shim is gone.

use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::sync::Arc;
use std::time::Duration;

use baton_protocol::spec::NetworkMode;
use nix::sys::signal::{kill, Signal};
use nix::unistd::Pid;

use super::layout::{files, Layout};
use super::shim::ShimArgs;
use super::spawner::Spawner;
use super::{
    oci, validate_id, ContainerRuntime, ContainerState, CreateRequest, ExecOutput, ExitStatus, Running, RuntimeError,
    Usage, EXEC_OUTPUT_CAP,
};
use crate::net::Network;

#[derive(Debug, Clone)]
pub struct LibcontainerRuntime {
    layout: Layout,
    /// The executable that provides `spawner` and `exec` (the agent binary itself).
    shim_exe: PathBuf,
    /// Forks the containers' shims (started on the first create).
    spawner: Arc<Spawner>,
    pub stop_grace: Duration,
    pub log_max_bytes: u64,
    pub log_flush: Duration,
    /// The device's bridge network (None: bridged containers are refused).
    net: Option<Arc<Network>>,
}

impl LibcontainerRuntime {
    pub fn new(layout: Layout, shim_exe: PathBuf) -> Self {
        let spawner = Spawner::new(shim_exe.clone(), |id| layout.container(id));
        Self {
            layout,
            spawner: Arc::new(spawner),
            shim_exe,
            stop_grace: Duration::from_secs(10),
            log_max_bytes: 1 << 20,
            log_flush: Duration::from_secs(1),
            net: None,
        }
    }

    /// Bridged containers join `net`; the addresses of containers that are
    /// gone are freed and the rules of those still here loaded again.
    pub fn with_network(mut self, net: Arc<Network>) -> Self {
        net.recover(&self.list().unwrap_or_default());
        self.net = Some(net);
        self
    }

    pub fn layout(&self) -> &Layout {
        &self.layout
    }

    /// Per-container run state on tmpfs: shim.pid, running.json, shim.log.
    fn run_state(&self, id: &str) -> PathBuf {
        self.layout.run_state(id)
    }

    /// Writes the spec's files where its bind mounts expect them, owned by
    /// the user the container runs as: a secret's 0400 is then readable by
    /// its process and nobody else (owned by root, an image with a USER
    /// could not read its own secrets).
    fn write_files(&self, id: &str, spec: &baton_protocol::spec::ContainerSpec) -> std::io::Result<()> {
        use std::os::unix::fs::PermissionsExt;
        if spec.files.is_empty() {
            return Ok(());
        }
        let dir = self.layout.container_files(id);
        std::fs::create_dir_all(&dir)?;
        let user = spec.user.unwrap_or_default();
        for (i, f) in spec.files.iter().enumerate() {
            let path = dir.join(i.to_string());
            std::fs::write(&path, &f.contents)?;
            if user.uid != 0 || user.gid != 0 {
                std::os::unix::fs::chown(&path, Some(user.uid), Some(user.gid))?;
            }
            std::fs::set_permissions(&path, std::fs::Permissions::from_mode(f.mode & 0o7777))?;
        }
        Ok(())
    }

    /// Deletes a container's directories, unmounting its rootfs first; if the
    /// unmount fails, the bundle stays (deleting through a live mount is never safe).
    fn cleanup(&self, id: &str) -> Result<(), RuntimeError> {
        let bundle = self.layout.container(id);
        // A create that failed half-way (its shim killed, say) may have left
        // the container's init running: nothing of it may outlive this.
        if self.live_shim(id).is_none() {
            self.kill_orphans(id);
        }
        super::rootfs::release(&bundle).map_err(RuntimeError::io(format!("unmount rootfs of {id}")))?;
        let _ = std::fs::remove_dir_all(&bundle);
        self.forget_run(id);
        Ok(())
    }

    /// What outlives a container's processes but not the container: its
    /// run state, libcontainer's state and cgroups, its network attachment.
    fn forget_run(&self, id: &str) {
        let _ = std::fs::remove_dir_all(self.run_state(id));
        self.forget_libcontainer_state(id);
        if let Some(net) = &self.net {
            net.detach(id);
        }
    }

    /// `id`'s cgroup directory in each hierarchy (v1 controllers, then the v2 root).
    fn cgroup_dirs(&self, id: &str) -> impl Iterator<Item = PathBuf> {
        let cgroup = self.layout.cgroup(id).trim_start_matches('/').to_string();
        let v1 = std::fs::read_dir("/sys/fs/cgroup").into_iter().flatten().flatten().map(|c| c.path());
        v1.chain([PathBuf::from("/sys/fs/cgroup")]).map(move |h| h.join(&cgroup))
    }

    /// libcontainer's own state of a container that has no shim: a create
    /// that failed half-way can leave it (its cleanup fails too when, say,
    /// cgroups cannot be detected), and then every create of the same id
    /// would fail with "container already exists". Its empty cgroups go too.
    fn forget_libcontainer_state(&self, id: &str) {
        let state = self.layout.youki_root().join(id);
        if state.exists() {
            if let Some(mut c) = super::libcontainer_state(&state) {
                let _ = c.delete(true);
            }
            if let Err(e) = std::fs::remove_dir_all(&state) {
                tracing::warn!(container = id, error = %e, "cannot remove libcontainer state");
            }
        }
        for dir in self.cgroup_dirs(id) {
            // rmdir: only an empty cgroup goes; one with processes stays.
            let _ = std::fs::remove_dir(dir);
        }
    }

    /// The live shim of `id`, if any: its recorded pid must still be a
    /// shim for this id (pids get reused after a reboot) — the
    /// title a forked shim gives itself, or the command line of a shim an
    /// older agent exec'd.
    fn live_shim(&self, id: &str) -> Option<Pid> {
        let pid: i32 = std::fs::read_to_string(self.run_state(id).join(files::SHIM_PID)).ok()?.trim().parse().ok()?;
        let cmdline = std::fs::read(format!("/proc/{pid}/cmdline")).ok()?;
        let args: Vec<&[u8]> = cmdline.split(|b| *b == 0).collect();
        let is_ours =
            args.iter().any(|a| *a == b"shim") && args.windows(2).any(|w| w[0] == b"--id" && w[1] == id.as_bytes());
        // A zombie shim has exited: only the exit record counts then.
        (is_ours && super::alive(pid)).then_some(Pid::from_raw(pid))
    }

    fn signal_shim(&self, id: &str, sig: Signal) -> Result<(), RuntimeError> {
        validate_id(id)?;
        match self.live_shim(id) {
            Some(pid) => {
                kill(pid, sig).map_err(|e| RuntimeError::Io {
                    context: format!("signal shim of {id}"),
                    source: std::io::Error::from(e),
                })?;
                // A stopped shim (SIGSTOP, a debugger that let go) would hold
                // the signal pending and its container would never stop:
                // it is woken to act on it.
                let _ = kill(pid, Signal::SIGCONT);
                Ok(())
            }
            None if self.layout.container(id).exists() => {
                // Ended — or its shim died (kill -9, OOM) and left the
                // container running unsupervised: end what is left of it, so
                // that a replacement never runs beside it, and give back what
                // its shim would have at its end (mount, writable layer,
                // cgroups, run state); the bundle stays for its log.
                self.kill_orphans(id);
                if !self.layout.container(id).join(files::EXIT).exists() {
                    self.release_lost(id);
                }
                Ok(())
            }
            None => Err(RuntimeError::NotFound(id.to_string())),
        }
    }

    /// What a lost container's shim would have released at its end.
    fn release_lost(&self, id: &str) {
        if let Err(e) = super::rootfs::discard(&self.layout.container(id)) {
            tracing::warn!(container = id, error = %e, "cannot release the rootfs of a lost container");
        }
        self.forget_run(id);
    }

    /// SIGKILL to every process left in `id`'s cgroup (in each hierarchy),
    /// until none is left or 2 s passed. Only for a container with no live shim.
    fn kill_orphans(&self, id: &str) {
        let procs: Vec<PathBuf> = self.cgroup_dirs(id).map(|d| d.join("cgroup.procs")).filter(|p| p.exists()).collect();
        let deadline = std::time::Instant::now() + Duration::from_secs(2);
        let mut killed = 0usize;
        loop {
            let pids: std::collections::BTreeSet<i32> = procs
                .iter()
                .filter_map(|p| std::fs::read_to_string(p).ok())
                .flat_map(|t| t.lines().filter_map(|l| l.trim().parse::<i32>().ok()).collect::<Vec<_>>())
                .filter(|p| *p > 1)
                .collect();
            if pids.is_empty() || std::time::Instant::now() >= deadline {
                if killed > 0 {
                    tracing::warn!(
                        container = id,
                        processes = killed,
                        left = pids.len(),
                        "its shim was gone: killed what was left running in its cgroup"
                    );
                }
                return;
            }
            for pid in pids {
                if kill(Pid::from_raw(pid), Signal::SIGKILL).is_ok() {
                    killed += 1;
                }
            }
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    /// What the shim's records say of `id`.
    fn read_state(&self, id: &str) -> Result<ContainerState, RuntimeError> {
        validate_id(id)?;
        let bundle = self.layout.container(id);
        if let Some(exit) = read_json::<ExitStatus>(&bundle.join(files::EXIT)) {
            return Ok(ContainerState::Exited(exit));
        }
        if !bundle.exists() {
            return Ok(ContainerState::Missing);
        }
        if self.live_shim(id).is_some() {
            if let Some(running) = read_json::<Running>(&self.run_state(id).join(files::RUNNING)) {
                return Ok(ContainerState::Running(running));
            }
        }
        // The shim may have written its exit record between our two reads.
        Ok(match read_json::<ExitStatus>(&bundle.join(files::EXIT)) {
            Some(exit) => ContainerState::Exited(exit),
            None => ContainerState::Lost,
        })
    }
}

fn read_json<T: serde::de::DeserializeOwned>(path: &Path) -> Option<T> {
    serde_json::from_slice(&std::fs::read(path).ok()?).ok()
}

impl ContainerRuntime for LibcontainerRuntime {
    /// Each start is a shim process doing kernel work (mounts, cgroups,
    /// namespaces) and waiting on it: eight overlap well even on one or two cores.
    fn starts_at_once(&self) -> usize {
        8
    }

    fn create(&self, req: &CreateRequest<'_>) -> Result<(), RuntimeError> {
        let id = req.id;
        validate_id(id)?;
        let bundle = self.layout.container(id);
        if bundle.exists() {
            return Err(RuntimeError::Exists(id.to_string()));
        }
        // No bundle, so no container of ours: whatever libcontainer kept is stale.
        self.forget_libcontainer_state(id);
        oci::validate(req.spec).map_err(RuntimeError::InvalidSpec)?;
        oci::check_host(req.spec).map_err(RuntimeError::InvalidSpec)?;
        let devices = oci::resolve_devices(req.spec).map_err(RuntimeError::InvalidSpec)?;
        if let Some(missing) = req.rootfs.layers.iter().find(|l| !l.is_dir()) {
            return Err(RuntimeError::InvalidSpec(format!("rootfs layer {} is not a directory", missing.display())));
        }
        for m in &req.spec.mounts {
            if let baton_protocol::spec::MountSource::Volume(name) = &m.source {
                let dir = self.layout.volume(name);
                if !dir.exists() {
                    new_volume(&dir, &req.rootfs, &m.target)
                        .map_err(RuntimeError::io(format!("create volume {}", dir.display())))?;
                }
            }
        }
        let state = self.run_state(id);
        let prepared = std::fs::create_dir_all(&bundle).and_then(|()| super::rootfs::prepare(&req.rootfs, &bundle));
        if let Err(e) = prepared {
            let _ = self.cleanup(id);
            return Err(RuntimeError::io(format!("prepare the rootfs of {id}"))(e));
        }
        let merged = super::rootfs::merged(&bundle);
        let setup = match process_setup(&merged, req.spec) {
            Ok(s) => s,
            Err(reason) => {
                let _ = self.cleanup(id);
                return Err(RuntimeError::Start { id: id.to_string(), reason });
            }
        };
        let mut spec = req.spec.clone();
        if let Some(home) = setup.home {
            spec.env.push(("HOME".into(), home));
        }
        let mut config = oci::config_json(id, &spec, &merged, &self.layout, &devices);
        if !setup.additional_gids.is_empty() {
            config["process"]["user"]["additionalGids"] = serde_json::json!(setup.additional_gids);
        }
        if let Err(reason) = oci::fit_capabilities(&mut config, &req.spec.security, held_capabilities()) {
            let _ = self.cleanup(id);
            return Err(RuntimeError::Start { id: id.to_string(), reason });
        }
        if spec.network == NetworkMode::Bridge {
            let wired = match &self.net {
                Some(net) => net.attach(id, &spec),
                None => Err("this agent has no bridge network".to_string()),
            };
            match wired {
                Ok(w) => crate::net::into_config(&mut config, &w),
                Err(reason) => {
                    let _ = self.cleanup(id);
                    return Err(RuntimeError::Start { id: id.to_string(), reason });
                }
            }
        }
        let prepared = std::fs::create_dir_all(&bundle)
            .and_then(|()| std::fs::create_dir_all(&state))
            .and_then(|()| std::fs::create_dir_all(self.layout.youki_root()))
            .and_then(|()| self.write_files(id, req.spec))
            // No fsync: after a power loss a half-written bundle is a lost
            // container, which reconcile recreates; only exit records must be durable.
            .and_then(|()| {
                // The seccomp profile goes beside config.json, where the shim
                // finds its compiled program (super::filter), not in it, where
                // libcontainer would compile it again on every start and exec.
                let profile = config["linux"].as_object_mut().and_then(|l| l.remove("seccomp"));
                match profile.filter(|p| !p.is_null()) {
                    Some(p) => {
                        config["annotations"][super::filter::ANNOTATION] = super::filter::PROFILE.into();
                        std::fs::write(bundle.join(super::filter::PROFILE), p.to_string())
                    }
                    None => Ok(()),
                }
            })
            .and_then(|()| std::fs::write(bundle.join(files::CONFIG), config.to_string()))
            .and_then(|()| {
                let provenance = serde_json::to_vec(&req.provenance).map_err(std::io::Error::other)?;
                std::fs::write(bundle.join(files::PROVENANCE), provenance)
            });
        if let Err(e) = prepared {
            let _ = self.cleanup(id);
            return Err(RuntimeError::io(format!("prepare bundle {}", bundle.display()))(e));
        }
        let args = ShimArgs {
            id: id.to_string(),
            bundle,
            root: self.layout.youki_root(),
            state,
            cgroup: self.layout.cgroup(id),
            stop_grace: self.stop_grace,
            log_max_bytes: self.log_max_bytes,
            log_flush: self.log_flush,
        };
        self.spawner.launch(&args).map_err(|reason| {
            let _ = self.cleanup(id);
            RuntimeError::Start { id: id.to_string(), reason }
        })
    }

    fn state(&self, id: &str) -> Result<ContainerState, RuntimeError> {
        let state = self.read_state(id)?;
        // A container that has ended gives its address, port forwards and
        // names back at once (its instance stays for its log and exit code;
        // a restart is a new instance with a network of its own).
        if let (Some(net), ContainerState::Exited(_) | ContainerState::Lost | ContainerState::Missing) =
            (&self.net, &state)
        {
            net.detach(id);
        }
        Ok(state)
    }

    fn stop(&self, id: &str) -> Result<(), RuntimeError> {
        self.signal_shim(id, Signal::SIGTERM)
    }

    fn kill(&self, id: &str) -> Result<(), RuntimeError> {
        self.signal_shim(id, Signal::SIGINT)
    }

    fn remove(&self, id: &str) -> Result<(), RuntimeError> {
        match self.state(id)? {
            ContainerState::Running(_) | ContainerState::Created => Err(RuntimeError::StillRunning(id.to_string())),
            ContainerState::Missing => Err(RuntimeError::NotFound(id.to_string())),
            // A lost container may have left libcontainer state and a cgroup: cleanup removes them.
            ContainerState::Exited(_) | ContainerState::Lost => self.cleanup(id),
        }
    }

    fn list(&self) -> Result<Vec<String>, RuntimeError> {
        let dir = self.layout.containers();
        let entries = match std::fs::read_dir(&dir) {
            Ok(e) => e,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(Vec::new()),
            Err(e) => return Err(RuntimeError::io(format!("list {}", dir.display()))(e)),
        };
        let mut ids: Vec<String> = entries
            .flatten()
            .filter_map(|e| e.file_name().to_str().map(str::to_string))
            .filter(|n| validate_id(n).is_ok())
            .collect();
        ids.sort();
        Ok(ids)
    }

    fn provenance(&self, id: &str) -> Option<super::Provenance> {
        validate_id(id).ok()?;
        read_json(&self.layout.container(id).join(files::PROVENANCE))
    }

    fn exec(&self, id: &str, argv: &[String], timeout: Duration) -> Result<ExecOutput, RuntimeError> {
        if argv.is_empty() {
            return Err(RuntimeError::InvalidSpec("exec: empty command".into()));
        }
        if !matches!(self.state(id)?, ContainerState::Running(_)) {
            return Err(RuntimeError::Start { id: id.to_string(), reason: "exec: container is not running".into() });
        }
        let out = Command::new(&self.shim_exe)
            .arg("exec")
            .args(["--id", id])
            .arg("--root")
            .arg(self.layout.youki_root())
            .args(["--timeout-ms", &timeout.as_millis().to_string(), "--"])
            .args(argv)
            .stdin(Stdio::null())
            .output()
            .map_err(RuntimeError::io(format!("run exec helper {}", self.shim_exe.display())))?;
        let cap = |mut v: Vec<u8>| {
            v.truncate(EXEC_OUTPUT_CAP);
            v
        };
        Ok(ExecOutput { code: out.status.code().unwrap_or(255), stdout: cap(out.stdout), stderr: cap(out.stderr) })
    }

    fn session(
        &self,
        id: &str,
        argv: &[String],
        terminal: Option<&str>,
        max: Duration,
    ) -> Result<Command, RuntimeError> {
        if argv.is_empty() {
            return Err(RuntimeError::InvalidSpec("exec: empty command".into()));
        }
        if !matches!(self.state(id)?, ContainerState::Running(_)) {
            return Err(RuntimeError::Start { id: id.to_string(), reason: "exec: container is not running".into() });
        }
        let mut cmd = Command::new(&self.shim_exe);
        std::os::unix::process::CommandExt::arg0(&mut cmd, "baton-agent");
        cmd.arg("exec").args(["--id", id]).arg("--root").arg(self.layout.youki_root());
        cmd.args(["--timeout-ms", &max.as_millis().to_string(), "--stdin"]);
        if let Some(term) = terminal {
            cmd.args(["--tty", "--env", &format!("TERM={term}")]);
        }
        cmd.arg("--").args(argv);
        Ok(cmd)
    }

    fn route_services(&self, services: &[baton_protocol::ServiceEndpoints], ports: &[baton_protocol::ServicePort]) {
        if let Some(net) = &self.net {
            net.route_services(services, ports);
        }
    }

    fn address(&self, id: &str) -> Option<std::net::IpAddr> {
        self.net.as_ref()?.address(id).map(std::net::IpAddr::V4)
    }

    fn usage(&self, id: &str) -> Option<Usage> {
        validate_id(id).ok()?;
        let cg = self.layout.cgroup(id);
        let read_u64 = |p: String| std::fs::read_to_string(p).ok()?.trim().parse::<u64>().ok();
        // cgroup v2 first (Raspberry Pi OS), then v1 (hybrid hosts).
        if let Some(mem) = read_u64(format!("/sys/fs/cgroup{cg}/memory.current")) {
            let stat = std::fs::read_to_string(format!("/sys/fs/cgroup{cg}/cpu.stat")).unwrap_or_default();
            let usec: u64 = stat.lines().find_map(|l| l.strip_prefix("usage_usec ")?.trim().parse().ok()).unwrap_or(0);
            return Some(Usage { cpu_ns: usec * 1000, memory_bytes: mem });
        }
        let mem = read_u64(format!("/sys/fs/cgroup/memory{cg}/memory.usage_in_bytes"))?;
        let cpu = read_u64(format!("/sys/fs/cgroup/cpuacct{cg}/cpuacct.usage"))
            .or_else(|| read_u64(format!("/sys/fs/cgroup/cpu,cpuacct{cg}/cpuacct.usage")))
            .unwrap_or(0);
        Some(Usage { cpu_ns: cpu, memory_bytes: mem })
    }

    fn signal(&self, id: &str, file: &str) -> Option<String> {
        validate_id(id).ok()?;
        let cg = self.layout.cgroup(id);
        let procs = std::fs::read_to_string(format!("/sys/fs/cgroup{cg}/cgroup.procs"))
            .or_else(|_| std::fs::read_to_string(format!("/sys/fs/cgroup/pids{cg}/cgroup.procs")))
            .or_else(|_| std::fs::read_to_string(format!("/sys/fs/cgroup/memory{cg}/cgroup.procs")))
            .ok()?;
        let pid: u32 = procs.lines().next()?.trim().parse().ok()?;
        read_in_root(&format!("/proc/{pid}/root"), &["run", "baton", file], 64)
    }
}

/// Reads at most `max` bytes of the regular file at `path` (components)
/// under the directory `root`, following no symlink on the way: a container's
/// `/run/baton` → `/etc` must not make the agent read its own host's files
/// (its absolute targets would resolve against the agent's root).
fn read_in_root(root: &str, path: &[&str], max: usize) -> Option<String> {
    use std::io::Read;
    use std::os::fd::{FromRawFd, OwnedFd};
    let open = |dir: libc::c_int, name: &str, flags: libc::c_int| -> Option<OwnedFd> {
        let c = std::ffi::CString::new(name).ok()?;
        // SAFETY: a valid C string; the fd returned (if any) is owned here.
        let fd = unsafe { libc::openat(dir, c.as_ptr(), flags | libc::O_CLOEXEC | libc::O_NOFOLLOW) };
        // SAFETY: a fresh descriptor nobody else owns.
        (fd >= 0).then(|| unsafe { OwnedFd::from_raw_fd(fd) })
    };
    let dir_flags = libc::O_RDONLY | libc::O_DIRECTORY;
    let c = std::ffi::CString::new(root).ok()?;
    // SAFETY: as above; the root itself is /proc's magic link, followed on purpose.
    let fd = unsafe { libc::open(c.as_ptr(), dir_flags | libc::O_CLOEXEC) };
    let mut dir = (fd >= 0).then(|| unsafe { OwnedFd::from_raw_fd(fd) })?;
    let (last, parents) = path.split_last()?;
    for name in parents {
        dir = open(std::os::fd::AsRawFd::as_raw_fd(&dir), name, dir_flags)?;
    }
    // Non-blocking: a FIFO there must not hang the engine.
    let fd = open(std::os::fd::AsRawFd::as_raw_fd(&dir), last, libc::O_RDONLY | libc::O_NONBLOCK)?;
    let mut file = std::fs::File::from(fd);
    if !file.metadata().ok()?.is_file() {
        return None;
    }
    let mut buf = Vec::with_capacity(max);
    file.by_ref().take(max as u64).read_to_end(&mut buf).ok()?;
    String::from_utf8(buf).ok()
}

/// The capabilities this agent can give a container: its own bounding set
/// (`CapBnd` in /proc/self/status, read once: it never grows). All of them
/// when it cannot be read.
fn held_capabilities() -> &'static [String] {
    static HELD: std::sync::OnceLock<Vec<String>> = std::sync::OnceLock::new();
    HELD.get_or_init(|| {
        let bounding = super::proc_status("self", "CapBnd").and_then(|v| u64::from_str_radix(&v, 16).ok());
        let bounding = bounding.unwrap_or(u64::MAX);
        baton_protocol::spec::CAPABILITIES
            .iter()
            .enumerate()
            .filter(|(bit, _)| bounding & (1 << bit) != 0)
            .map(|(_, c)| format!("CAP_{c}"))
            .collect()
    })
}

/// What the container's process needs from its root tree, settled before it
/// starts so that a failure names its cause (youki only says that a syscall
/// failed): the working directory (made when the image lacks it, owned by
/// the container's user, as Podman does; its missing parents too), the program (found, and
/// executable), the user's supplementary groups and HOME from the image's
/// /etc/passwd and /etc/group.
/// A named volume made on its first use takes the owner and mode of the
/// image's directory at its mount point (as Docker does), so an image that
/// runs as a USER owning, say, /data can write to its volume there; where
/// the image has no such directory, root's 0755. Made under a temporary
/// name and renamed, so a volume dir that exists is always whole.
fn new_volume(dir: &Path, rootfs: &super::rootfs::Rootfs, target: &str) -> std::io::Result<()> {
    use std::os::unix::fs::{MetadataExt, PermissionsExt};
    let parent = dir.parent().ok_or_else(|| std::io::Error::other("a volume dir with no parent"))?;
    std::fs::create_dir_all(parent)?;
    // A name no volume can have (they never start with '.').
    let name = dir.file_name().ok_or_else(|| std::io::Error::other("a volume dir with no name"))?;
    let staged = parent.join(format!(".{}.new", name.to_string_lossy()));
    let _ = std::fs::remove_dir(&staged);
    std::fs::create_dir(&staged)?;
    let image_dir = rootfs.lookup(target.trim_start_matches('/')).and_then(|p| std::fs::symlink_metadata(p).ok());
    if let Some(m) = image_dir.filter(|m| m.is_dir()) {
        std::os::unix::fs::chown(&staged, Some(m.uid()), Some(m.gid()))?;
        std::fs::set_permissions(&staged, std::fs::Permissions::from_mode(m.mode() & 0o7777))?;
    }
    std::fs::rename(&staged, dir)
}

pub(crate) struct ProcessSetup {
    pub additional_gids: Vec<u32>,
    /// HOME to set (the spec and the image did not).
    pub home: Option<String>,
}

pub(crate) fn process_setup(root: &Path, spec: &baton_protocol::spec::ContainerSpec) -> Result<ProcessSetup, String> {
    use super::rootfs::{find_program, resolve_in};
    let user = spec.user.unwrap_or_default();
    let sec = &spec.security;
    if spec.allow_privilege_escalation && !sec.privileged && !sec.seccomp_unconfined {
        // The filter is loaded after the capabilities are dropped
        // (runtime/filter.rs), which the kernel refuses without
        // no_new_privileges: say so rather than retry forever.
        return Err("allow_privilege_escalation needs seccomp_unconfined: true as well \
                    (a seccomp filter is loaded only under no_new_privileges)"
            .into());
    }
    if let Some(dir) = &spec.working_dir {
        let p =
            resolve_in(root, dir, Some((user.uid, user.gid))).map_err(|e| format!("working directory {dir}: {e}"))?;
        if !p.is_dir() {
            return Err(format!("working directory {dir} is not a directory in the image"));
        }
    }
    let env = |k: &str| spec.env.iter().rev().find(|(ek, _)| ek == k).map(|(_, v)| v.clone());
    let program = spec.command.first().or(spec.args.first()).map_or("/bin/sh", String::as_str);
    let path = env("PATH").unwrap_or_else(|| oci::DEFAULT_PATH.trim_start_matches("PATH=").to_string());
    find_program(root, program, &path).map_err(|e| format!("cannot run {e}"))?;
    let read = |f: &str| resolve_in(root, f, None).ok().and_then(|p| std::fs::read_to_string(p).ok());
    let (passwd, group) = (read("/etc/passwd"), read("/etc/group"));
    let found =
        crate::image::user::resolve(&user.uid.to_string(), passwd.as_deref(), group.as_deref()).unwrap_or_default();
    let mut additional_gids = found.additional_gids;
    additional_gids.retain(|g| *g != user.gid);
    let home = env("HOME").is_none().then(|| if found.home.is_empty() { "/".to_string() } else { found.home });
    Ok(ProcessSetup { additional_gids, home })
}

#[cfg(test)]
mod tests {
    use super::read_in_root;

    #[test]
    fn signals_are_read_without_following_symlinks() {
        let root = tempfile::tempdir().unwrap();
        let r = root.path().to_str().unwrap();
        let dir = root.path().join("run/baton");
        std::fs::create_dir_all(&dir).unwrap();
        std::fs::write(dir.join("load"), "12.5\n").unwrap();
        assert_eq!(read_in_root(r, &["run", "baton", "load"], 64).as_deref(), Some("12.5\n"));
        // At most `max` bytes.
        std::fs::write(dir.join("big"), "9".repeat(1000)).unwrap();
        assert_eq!(read_in_root(r, &["run", "baton", "big"], 64).map(|s| s.len()), Some(64));
        // A symlink anywhere on the way is not followed, nor a non-file read.
        let outside = tempfile::tempdir().unwrap();
        std::fs::write(outside.path().join("secret"), "1").unwrap();
        std::os::unix::fs::symlink(outside.path().join("secret"), dir.join("link")).unwrap();
        assert_eq!(read_in_root(r, &["run", "baton", "link"], 64), None);
        std::os::unix::fs::symlink(outside.path(), root.path().join("etc")).unwrap();
        assert_eq!(read_in_root(r, &["etc", "secret"], 64), None);
        assert_eq!(read_in_root(r, &["run", "baton"], 64), None, "a directory is no signal");
        assert_eq!(read_in_root(r, &["run", "baton", "missing"], 64), None);
        nix::unistd::mkfifo(&dir.join("fifo"), nix::sys::stat::Mode::from_bits_truncate(0o600)).unwrap();
        assert_eq!(read_in_root(r, &["run", "baton", "fifo"], 64), None, "a FIFO must not hang the agent");
    }
}
