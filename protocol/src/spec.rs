//! What a device is asked to run: workload and container specs inside a
//! `Desired` document. The controller validates manifests into these; the
//! agent still checks them, since it trusts no input.

use serde::{Deserialize, Serialize};

#[derive(Serialize, Deserialize, Debug, Clone, PartialEq, Eq, Default)]
#[cfg_attr(feature = "schema", derive(schemars::JsonSchema))]
pub struct WorkloadSpec {
    pub name: String,
    /// Increases with every change of the spec; reports echo it.
    pub revision: u64,
    /// Image reference as written by the operator (`registry/repo:tag`).
    pub image: String,
    /// Manifest digest the controller resolved (`sha256:…`); the fleet runs these bytes.
    pub image_digest: String,
    pub container: ContainerSpec,
    /// Seconds a new revision has to become healthy before the device rolls back.
    pub health_deadline_s: u32,
}

#[derive(Serialize, Deserialize, Debug, Clone, PartialEq, Eq, Default)]
#[cfg_attr(feature = "schema", derive(schemars::JsonSchema))]
pub struct ContainerSpec {
    /// Replaces the image's entrypoint when not empty.
    pub command: Vec<String>,
    /// Replaces the image's cmd when not empty.
    pub args: Vec<String>,
    pub env: Vec<(String, String)>,
    pub working_dir: Option<String>,
    pub user: Option<User>,
    pub hostname: Option<String>,
    pub resources: Resources,
    pub restart: RestartPolicy,
    /// Cap of the exponential restart backoff, seconds (0 = default 300).
    pub backoff_cap_s: u32,
    pub mounts: Vec<Mount>,
    pub devices: Vec<DeviceMount>,
    pub network: NetworkMode,
    pub ports: Vec<Port>,
    pub read_only_rootfs: bool,
    pub security: Security,
    pub liveness: Option<Probe>,
    pub readiness: Option<Probe>,
    /// Files (config, secrets) written under the container, read-only.
    pub files: Vec<File>,
    /// Since 1.5 (travels as an extension, see `wire`): the user as Docker
    /// takes it — `NAME`, `NAME:GROUP`, `UID:GROUP`… — resolved on the device
    /// in the image's /etc/passwd and /etc/group; wins over `user`.
    #[serde(default)]
    pub user_name: Option<String>,
    /// Since 1.5: setuid programs and file capabilities may raise the
    /// process's privileges (no_new_privileges off), as Docker and
    /// Kubernetes allow by default. Off: Baton's default is stricter.
    #[serde(default)]
    pub allow_privilege_escalation: bool,
    /// Since 1.7 (with [`NetworkMode::Bridge`]): host ports forwarded to the
    /// container's own ports.
    #[serde(default)]
    pub publish: Vec<Publish>,
    /// Since 1.7: traffic limits of a bridged container.
    #[serde(default)]
    pub bandwidth: Bandwidth,
    /// Since 1.7: the workloads on the device that may open connections to
    /// this bridged one (None: every workload; published ports stay open).
    #[serde(default)]
    pub allow_from: Option<Vec<String>>,
}

#[derive(Serialize, Deserialize, Debug, Clone, Copy, PartialEq, Eq, Default)]
#[cfg_attr(feature = "schema", derive(schemars::JsonSchema))]
pub struct User {
    pub uid: u32,
    pub gid: u32,
}

#[derive(Serialize, Deserialize, Debug, Clone, Copy, PartialEq, Eq, Default)]
#[cfg_attr(feature = "schema", derive(schemars::JsonSchema))]
pub struct Resources {
    pub memory_bytes: Option<u64>,
    /// CPU limit in thousandths of a CPU (cgroup quota over a 100 ms period).
    pub cpu_millis: Option<u32>,
    pub cpu_shares: Option<u32>,
    pub pids: Option<u32>,
}

#[derive(Serialize, Deserialize, Debug, Clone, Copy, PartialEq, Eq, Default)]
#[cfg_attr(feature = "schema", derive(schemars::JsonSchema))]
pub enum RestartPolicy {
    #[default]
    Always,
    OnFailure,
    Never,
}

#[derive(Serialize, Deserialize, Debug, Clone, PartialEq, Eq)]
#[cfg_attr(feature = "schema", derive(schemars::JsonSchema))]
pub struct Mount {
    pub target: String,
    pub source: MountSource,
    pub read_only: bool,
}

#[derive(Serialize, Deserialize, Debug, Clone, PartialEq, Eq)]
#[cfg_attr(feature = "schema", derive(schemars::JsonSchema))]
pub enum MountSource {
    /// Persistent directory under the agent's data dir, kept across revisions.
    Volume(String),
    /// A path on the host.
    Bind(String),
    /// A memory filesystem of at most this many bytes.
    Tmpfs(u64),
}

#[derive(Serialize, Deserialize, Debug, Clone, PartialEq, Eq)]
#[cfg_attr(feature = "schema", derive(schemars::JsonSchema))]
pub struct DeviceMount {
    /// Host device node, e.g. `/dev/ttyUSB0`.
    pub host_path: String,
    /// Path inside the container; empty means the same as `host_path`.
    pub container_path: String,
    /// cgroup permissions, a subset of `rwm`.
    pub permissions: String,
}

#[derive(Serialize, Deserialize, Debug, Clone, Copy, PartialEq, Eq, Default)]
#[cfg_attr(feature = "schema", derive(schemars::JsonSchema))]
pub enum NetworkMode {
    #[default]
    Host,
    None,
    /// Since 1.7: its own network namespace on the device's bridge, with an
    /// address of the agent's subnet, NAT to the outside and published
    /// ports. Travels in the extension (the 1.4 layout says `None`, so a 1.6
    /// agent runs it with no network rather than on the host's).
    Bridge,
}

/// A host port forwarded to a bridged container (`ports: 8080:80`).
#[derive(Serialize, Deserialize, Debug, Clone, Copy, PartialEq, Eq)]
#[cfg_attr(feature = "schema", derive(schemars::JsonSchema))]
pub struct Publish {
    pub host_port: u16,
    pub port: u16,
    pub protocol: PortProtocol,
}

/// Bits per second; 0 is no limit.
#[derive(Serialize, Deserialize, Debug, Clone, Copy, PartialEq, Eq, Default)]
#[cfg_attr(feature = "schema", derive(schemars::JsonSchema))]
pub struct Bandwidth {
    /// What the container sends.
    pub egress_bps: u64,
    /// What it receives.
    pub ingress_bps: u64,
}

#[derive(Serialize, Deserialize, Debug, Clone, PartialEq, Eq)]
#[cfg_attr(feature = "schema", derive(schemars::JsonSchema))]
pub struct Port {
    pub name: String,
    pub port: u16,
    pub protocol: PortProtocol,
}

#[derive(Serialize, Deserialize, Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Default)]
#[cfg_attr(feature = "schema", derive(schemars::JsonSchema))]
pub enum PortProtocol {
    #[default]
    Tcp,
    Udp,
}

#[derive(Serialize, Deserialize, Debug, Clone, PartialEq, Eq, Default)]
#[cfg_attr(feature = "schema", derive(schemars::JsonSchema))]
pub struct Security {
    /// All capabilities, no seccomp, no masked paths. Off by default.
    pub privileged: bool,
    pub cap_add: Vec<String>,
    pub cap_drop: Vec<String>,
    /// Turns off the default seccomp profile.
    pub seccomp_unconfined: bool,
}

/// Linux's capabilities (5.9+), in kernel order (bit N is `CAPABILITIES[N]`),
/// without their `CAP_` prefix.
pub const CAPABILITIES: [&str; 41] = [
    "CHOWN",
    "DAC_OVERRIDE",
    "DAC_READ_SEARCH",
    "FOWNER",
    "FSETID",
    "KILL",
    "SETGID",
    "SETUID",
    "SETPCAP",
    "LINUX_IMMUTABLE",
    "NET_BIND_SERVICE",
    "NET_BROADCAST",
    "NET_ADMIN",
    "NET_RAW",
    "IPC_LOCK",
    "IPC_OWNER",
    "SYS_MODULE",
    "SYS_RAWIO",
    "SYS_CHROOT",
    "SYS_PTRACE",
    "SYS_PACCT",
    "SYS_ADMIN",
    "SYS_BOOT",
    "SYS_NICE",
    "SYS_RESOURCE",
    "SYS_TIME",
    "SYS_TTY_CONFIG",
    "MKNOD",
    "LEASE",
    "AUDIT_WRITE",
    "AUDIT_CONTROL",
    "SETFCAP",
    "MAC_OVERRIDE",
    "MAC_ADMIN",
    "SYSLOG",
    "WAKE_ALARM",
    "BLOCK_SUSPEND",
    "AUDIT_READ",
    "PERFMON",
    "BPF",
    "CHECKPOINT_RESTORE",
];

/// A capability as `cap_add` / `cap_drop` name it (`NET_ADMIN`,
/// `net_admin`, `CAP_NET_ADMIN`) → `CAP_NET_ADMIN`; `ALL` → `ALL`; None
/// for a name Linux does not have.
pub fn capability(name: &str) -> Option<String> {
    let upper = name.trim().to_ascii_uppercase();
    let bare = upper.strip_prefix("CAP_").unwrap_or(&upper);
    if bare == "ALL" {
        return Some("ALL".into());
    }
    CAPABILITIES.contains(&bare).then(|| format!("CAP_{bare}"))
}

/// The first name in `cap_add` / `cap_drop` that is no capability: the
/// field, its index and the name.
pub fn unknown_capability<'a>(cap_add: &'a [String], cap_drop: &'a [String]) -> Option<(&'static str, usize, &'a str)> {
    [("cap_add", cap_add), ("cap_drop", cap_drop)].into_iter().find_map(|(field, names)| {
        names.iter().enumerate().find(|(_, c)| capability(c).is_none()).map(|(i, c)| (field, i, c.as_str()))
    })
}

#[derive(Serialize, Deserialize, Debug, Clone, PartialEq, Eq)]
#[cfg_attr(feature = "schema", derive(schemars::JsonSchema))]
pub struct Probe {
    pub check: ProbeCheck,
    pub interval_s: u32,
    pub timeout_s: u32,
    pub failure_threshold: u32,
    pub initial_delay_s: u32,
}

#[derive(Serialize, Deserialize, Debug, Clone, PartialEq, Eq)]
#[cfg_attr(feature = "schema", derive(schemars::JsonSchema))]
pub enum ProbeCheck {
    Exec(Vec<String>),
    Tcp { port: u16 },
    Http { port: u16, path: String },
}

#[derive(Serialize, Deserialize, Debug, Clone, PartialEq, Eq)]
#[cfg_attr(feature = "schema", derive(schemars::JsonSchema))]
pub struct File {
    /// Absolute path inside the container.
    pub path: String,
    /// Permission bits; with [`File::SEALED`] set (since 1.2), `contents` is
    /// sealed to the device (`crypto::seal` under
    /// `crypto::secret_context(device, workload, path)`) and is opened only
    /// in memory, just before the file is written to tmpfs.
    pub mode: u32,
    pub contents: Vec<u8>,
}

impl File {
    /// The mode flag of a secret: contents sealed to the device's key.
    pub const SEALED: u32 = 1 << 31;

    pub fn is_sealed(&self) -> bool {
        self.mode & Self::SEALED != 0
    }

    /// The permission bits, without flags.
    pub fn permissions(&self) -> u32 {
        self.mode & 0o7777
    }
}
