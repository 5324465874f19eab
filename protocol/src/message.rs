//! The messages carried on each topic. Field order is part of the wire format:
//! see `codec` for how fields may be added without breaking older peers.

use serde::{Deserialize, Serialize};

use crate::spec::WorkloadSpec;

/// `presence`: retained; the broker publishes the agent's Last Will
/// (`state: Offline`) when its connection dies.
#[derive(Serialize, Deserialize, Debug, Clone, PartialEq, Eq)]
#[cfg_attr(feature = "schema", derive(schemars::JsonSchema))]
pub struct Presence {
    pub state: PresenceState,
    pub agent_version: String,
    /// `/proc/sys/kernel/random/boot_id`: tells a reboot from a reconnect.
    pub boot_id: String,
    /// Unix seconds when this agent process started (0 in the Last Will).
    pub started_at: u64,
}

#[derive(Serialize, Deserialize, Debug, Clone, Copy, PartialEq, Eq)]
#[cfg_attr(feature = "schema", derive(schemars::JsonSchema))]
pub enum PresenceState {
    Offline,
    Online,
}

#[derive(Serialize, Deserialize, Debug, Clone, Copy, PartialEq, Eq, Default)]
#[cfg_attr(feature = "schema", derive(schemars::JsonSchema))]
pub enum CgroupVersion {
    #[default]
    Unknown,
    V1,
    Hybrid,
    V2,
}

/// `inventory`: retained; what the device is. Republished on every connect.
#[derive(Serialize, Deserialize, Debug, Clone, PartialEq, Eq, Default)]
#[cfg_attr(feature = "schema", derive(schemars::JsonSchema))]
pub struct Inventory {
    pub agent_version: String,
    /// Rust target-arch name (`aarch64`, `arm`, `x86_64`).
    pub arch: String,
    /// OCI platform variant where it matters (`v7` for 32-bit ARM), else empty.
    pub arch_variant: String,
    /// `PRETTY_NAME` from /etc/os-release.
    pub os: String,
    pub kernel: String,
    pub hostname: String,
    pub cpus: u16,
    pub memory_bytes: u64,
    /// Size of the filesystem holding the agent's data dir (free space is in
    /// heartbeats: inventory holds only what rarely changes, so a reconnect
    /// does not rewrite the controller's store).
    pub disk_bytes: u64,
    pub cgroup: CgroupVersion,
    /// Labels from the agent's config, sorted by key.
    pub labels: Vec<(String, String)>,
    /// Non-loopback IP addresses, for service discovery.
    pub addresses: Vec<String>,
    /// Since 1.2: the device's X25519 public key; secrets are sealed to it.
    pub sealing_key: Vec<u8>,
    /// Since 1.6: the agent version kept to go back to (empty: none yet).
    pub previous_agent_version: String,
    /// Since 1.6: how the last agent upgrade this device was asked for went.
    pub upgrade: Option<crate::release::UpgradeOutcome>,
    /// Since 1.10: seconds between this agent's heartbeats when no
    /// autoscaled workload asks for faster ones (its liveness between them
    /// is the MQTT keepalive and its Last Will); the controller lets it be
    /// silent that long. 0: an agent before 1.10, which did not say.
    pub heartbeat_interval_s: u32,
    /// Since 1.10: this agent runs no workloads (`--no-workloads`: presence
    /// and inventory only); the controller places none on it.
    pub no_workloads: bool,
}

/// `heartbeat`: QoS 0, every `heartbeat_interval`. Kept small: it is most of
/// the fleet's steady-state traffic (target ≤ 64 bytes encoded).
#[derive(Serialize, Deserialize, Debug, Clone, PartialEq, Eq, Default)]
#[cfg_attr(feature = "schema", derive(schemars::JsonSchema))]
pub struct Heartbeat {
    pub seq: u32,
    pub uptime_s: u32,
    /// 1-minute load average × 100.
    pub load1_centi: u32,
    pub mem_used_kib: u64,
    pub mem_total_kib: u64,
    pub disk_free_mib: u64,
    /// CPU temperature in milli-°C, where the device has a thermal zone.
    pub temp_milli_c: Option<i32>,
    pub applied_generation: u64,
    /// Since 1.4: the device's wall clock when it sampled this (Unix ms), so
    /// the controller can show how far off it is. Nothing depends on it.
    pub unix_ms: u64,
    /// Since 1.8: the load of each workload the document asks about
    /// (`Desired::load_reports`), for autoscaling. Empty otherwise, so an
    /// ordinary heartbeat stays as small as before.
    pub loads: Vec<WorkloadLoad>,
}

/// Since 1.8: one workload's load on the device, sampled for a heartbeat.
#[derive(Serialize, Deserialize, Debug, Clone, PartialEq, Eq, Default)]
#[cfg_attr(feature = "schema", derive(schemars::JsonSchema))]
pub struct WorkloadLoad {
    pub workload: String,
    /// CPU used since the previous heartbeat, in thousandths of a CPU (None:
    /// no earlier sample of this instance yet).
    pub cpu_milli: Option<u32>,
    pub memory_bytes: u64,
    /// What the workload says its load is (`/run/baton/load` in the
    /// container: one decimal number), × 1000; None when it says nothing.
    pub load_milli: Option<u64>,
    /// Why what it wrote there is no load (not a number, out of range).
    pub load_error: Option<String>,
}

/// `report`: observed state of every workload, sent when it changes.
#[derive(Serialize, Deserialize, Debug, Clone, PartialEq, Eq, Default)]
#[cfg_attr(feature = "schema", derive(schemars::JsonSchema))]
pub struct Report {
    /// The desired generation the agent has applied.
    pub generation: u64,
    pub workloads: Vec<WorkloadStatus>,
    /// Set when a desired document was refused (bad signature, bad spec…).
    pub refused: Option<String>,
    /// Since 1.7: (workload, address) of each running container with an
    /// address of its own on the device's bridge.
    pub addresses: Vec<(String, String)>,
    /// Since 1.8: workloads whose new revision the device holds back
    /// (outside its install window, or under the application's update lock).
    pub waiting: Vec<Waiting>,
}

/// Since 1.8: a revision a device has been given but holds back, and why.
#[derive(Serialize, Deserialize, Debug, Clone, PartialEq, Eq, Default)]
#[cfg_attr(feature = "schema", derive(schemars::JsonSchema))]
pub struct Waiting {
    pub workload: String,
    /// The revision held back (the running one is in `workloads`).
    pub revision: u64,
    pub reason: String,
    /// When the device expects to go ahead (Unix ms; 0: it cannot tell).
    pub until_ms: u64,
}

#[derive(Serialize, Deserialize, Debug, Clone, PartialEq, Eq, Default)]
#[cfg_attr(feature = "schema", derive(schemars::JsonSchema))]
pub struct WorkloadStatus {
    pub name: String,
    pub revision: u64,
    pub phase: Phase,
    pub health: Health,
    pub restarts: u32,
    pub last_exit_code: Option<i32>,
    pub last_error: Option<String>,
    pub cpu_usage_ns: u64,
    pub memory_bytes: u64,
}

impl WorkloadStatus {
    /// Whether this status proves `revision` good: running healthy, or —
    /// a run-to-completion workload (`restart: on-failure` or `never`) —
    /// finished with exit code 0 (a workload restarted always never stays
    /// `Exited`). Rollouts and device rollbacks judge by this.
    pub fn proves(&self, revision: u64) -> bool {
        self.revision == revision
            && ((self.phase == Phase::Running && self.health == Health::Healthy)
                || (self.phase == Phase::Exited && self.last_exit_code == Some(0)))
    }
}

#[derive(Serialize, Deserialize, Debug, Clone, Copy, PartialEq, Eq, Default)]
#[cfg_attr(feature = "schema", derive(schemars::JsonSchema))]
pub enum Phase {
    #[default]
    Pending,
    Pulling,
    Starting,
    Running,
    BackingOff,
    Exited,
    Failed,
    RolledBack,
}

#[derive(Serialize, Deserialize, Debug, Clone, Copy, PartialEq, Eq, Default)]
#[cfg_attr(feature = "schema", derive(schemars::JsonSchema))]
pub enum Health {
    #[default]
    Unknown,
    Healthy,
    Unhealthy,
}

/// `desired`: retained; the whole truth for one device, never a delta.
/// Agents ignore a generation lower than the one they applied. On the wire
/// it is a [`crate::wire::DesiredV1`] (workload specs in their 1.4 layout,
/// later fields as extensions).
#[derive(Serialize, Deserialize, Debug, Clone, PartialEq, Eq, Default)]
#[serde(try_from = "crate::wire::DesiredV1", into = "crate::wire::DesiredV1")]
pub struct Desired {
    pub generation: u64,
    pub workloads: Vec<WorkloadSpec>,
    /// Since 1.1: the endpoints of the services this device's workloads use.
    pub services: Vec<ServiceEndpoints>,
    /// Since 1.4: the controller's clock when it issued the document (Unix
    /// ms; signed with it): a lower bound on the controller's time for a
    /// device whose own clock cannot be trusted (see `Command::issued_ms`).
    pub issued_ms: u64,
    /// Since 1.6: the agent build this device should run (None: keep the
    /// one it runs). See `release`.
    pub agent: Option<crate::release::AgentTarget>,
    /// Since 1.7: the ports the services in `services` declare. A bridged
    /// consumer reaches a service at its name on this port, and the device
    /// spreads the connections over the service's endpoints.
    pub service_ports: Vec<ServicePort>,
    /// Since 1.8: the workloads whose load the device puts in its
    /// heartbeats (autoscaled ones). Changing it restarts nothing.
    pub load_reports: Vec<String>,
    /// Since 1.8: when workloads may change on this device (update windows,
    /// update locks). The device enforces them itself, so they hold while
    /// the controller is unreachable. Changing them restarts nothing.
    pub updates: Vec<UpdatePolicy>,
}

/// Since 1.8: when a running workload may be replaced by another revision
/// on this device. A workload not running yet starts at once, and a
/// device-level rollback is never held.
#[derive(Serialize, Deserialize, Debug, Clone, PartialEq, Eq, Default)]
#[cfg_attr(feature = "schema", derive(schemars::JsonSchema))]
pub struct UpdatePolicy {
    pub workload: String,
    /// When it may switch (None: any time).
    pub install: Option<Windows>,
    /// When its new image may be downloaded ahead of the switch (None: any
    /// time; the install window always allows it).
    pub download: Option<Windows>,
    /// Switch anyway once a change has waited this long for a window (0: never).
    pub max_delay_s: u32,
    /// Honour `/run/baton/update.lock` in the running container.
    pub lock: Option<UpdateLock>,
}

/// Time windows as the controller computed them (it knows the time zone):
/// spans in Unix ms over the period `from_ms..until_ms` (two weeks). Past
/// that period a device repeats its last week, so the windows hold while it
/// hears nothing (a daylight-saving change can move them by an hour then).
#[derive(Serialize, Deserialize, Debug, Clone, PartialEq, Eq, Default)]
#[cfg_attr(feature = "schema", derive(schemars::JsonSchema))]
pub struct Windows {
    /// As the operator wrote it (`0 2 * * * for 2h Europe/Paris`), for messages.
    pub text: String,
    pub from_ms: u64,
    pub until_ms: u64,
    /// Sorted, disjoint (start, end) spans.
    pub spans: Vec<(u64, u64)>,
}

/// The application's own hold on updates: while `/run/baton/update.lock`
/// exists in its running container, it is not replaced.
#[derive(Serialize, Deserialize, Debug, Clone, Copy, PartialEq, Eq, Default)]
#[cfg_attr(feature = "schema", derive(schemars::JsonSchema))]
pub struct UpdateLock {
    /// How long a lock is honoured (0: for as long as it is held).
    pub max_s: u32,
    /// Past `max_s`: switch anyway (else go on waiting, and say so).
    pub override_after_max: bool,
}

/// A port a service declares: its container port, by name.
#[derive(Serialize, Deserialize, Debug, Clone, PartialEq, Eq, Default)]
#[cfg_attr(feature = "schema", derive(schemars::JsonSchema))]
pub struct ServicePort {
    pub service: String,
    /// The port's name, as in `Endpoint::port_name`.
    pub name: String,
    pub port: u16,
    pub protocol: crate::spec::PortProtocol,
}

/// Since 1.2, what travels on `desired`: an encoded [`Desired`] message and the
/// controller's Ed25519 signature over it and the device id (see `crypto`).
/// Agents refuse unsigned, unknown-key, forged and older documents.
#[derive(Serialize, Deserialize, Debug, Clone, PartialEq, Eq, Default)]
#[cfg_attr(feature = "schema", derive(schemars::JsonSchema))]
pub struct SignedDesired {
    /// The signer's Ed25519 public key (32 bytes); it must be one the agent trusts.
    pub key: Vec<u8>,
    pub signature: Vec<u8>,
    /// A whole encoded `Desired` message (envelope included).
    pub document: Vec<u8>,
}

/// Where a service (a workload with named ports) can be reached right now:
/// its healthy instances.
#[derive(Serialize, Deserialize, Debug, Clone, PartialEq, Eq, Default)]
#[cfg_attr(feature = "schema", derive(schemars::JsonSchema))]
pub struct ServiceEndpoints {
    /// The workload that serves.
    pub name: String,
    /// Workloads on this device that use it.
    pub consumers: Vec<String>,
    pub endpoints: Vec<Endpoint>,
}

#[derive(Serialize, Deserialize, Debug, Clone, PartialEq, Eq, Default)]
#[cfg_attr(feature = "schema", derive(schemars::JsonSchema))]
pub struct Endpoint {
    pub device: String,
    /// The device's address (from its inventory).
    pub address: String,
    pub port_name: String,
    pub port: u16,
}

/// `cmd`: a request to one device, answered on `cmd/res` with the same id.
#[derive(Serialize, Deserialize, Debug, Clone, PartialEq, Eq)]
#[cfg_attr(feature = "schema", derive(schemars::JsonSchema))]
pub struct Command {
    /// Correlation id chosen by the controller, unique per device.
    pub id: u64,
    /// Unix milliseconds after which the agent drops the request unanswered.
    pub deadline_ms: u64,
    pub action: CommandAction,
    /// Since 1.3: the signer's Ed25519 public key and its signature over the
    /// device id, `id`, `deadline_ms` and `action` (`crypto::sign_command`).
    /// Agents refuse commands that are unsigned or not signed by a key they trust.
    pub key: Vec<u8>,
    pub signature: Vec<u8>,
    /// Since 1.4: the controller's clock when it signed the command (Unix
    /// ms), and `key`'s signature over the whole command with it
    /// (`crypto::sign_command`). A 1.4 agent judges `deadline_ms` against the
    /// controller's time it learned from these, never against its own wall
    /// clock, which may be days off on a device without an RTC.
    pub issued_ms: u64,
    pub time_signature: Vec<u8>,
}

#[derive(Serialize, Deserialize, Debug, Clone, PartialEq, Eq)]
#[cfg_attr(feature = "schema", derive(schemars::JsonSchema))]
pub enum CommandAction {
    Logs {
        workload: String,
        tail: u32,
        follow: bool,
    },
    Exec {
        workload: String,
        argv: Vec<String>,
    },
    Restart {
        workload: String,
    },
    Diagnostics,
    /// Ends a `follow` stream early, or a session.
    Cancel {
        id: u64,
    },
    /// Since 1.9: an interactive session — a process on the device whose
    /// output is answered on `cmd/res` under this command's id (`Stdout`,
    /// `Stderr`, then `Exit` or `Error`) and whose input arrives as `Input`.
    /// `workload` empty with `host` set: on the device's host (the agent
    /// must allow it in its configuration). The device sends at most its
    /// window of output ahead of the controller's `Ack`s.
    Session {
        workload: String,
        host: bool,
        argv: Vec<String>,
        /// A pseudo-terminal (`-t`): one output stream, its size below.
        tty: bool,
        rows: u16,
        cols: u16,
        /// The operator's terminal type (`TERM`; empty: xterm-256color).
        term: String,
    },
    /// Since 1.9: bytes for a session's stdin, starting at byte `offset` of
    /// its input (the device takes only the next one in order, so a replay
    /// changes nothing); `eof` closes stdin after them. Answered `Done` once
    /// written.
    Input {
        session: u64,
        offset: u64,
        data: Vec<u8>,
        eof: bool,
    },
    /// Since 1.9: a session's terminal size changed; `seq` increases with each.
    Resize {
        session: u64,
        seq: u32,
        rows: u16,
        cols: u16,
    },
    /// Since 1.9: a TCP connection from the device to `port` of a
    /// workload's newest container (its bridge address, or loopback on the
    /// host's network), or of the device itself (`workload` empty) — one
    /// connection of `baton port-forward`. A session without a process:
    /// `Input` is what the connection sends, its replies come as `Stdout`,
    /// its close as `Exit(0)`, and `Input { eof }` half-closes it.
    Connect {
        workload: String,
        port: u16,
    },
    /// Since 1.9: `baton cp` from the device: the file at `path` in a
    /// workload's newest container (or on the host, `host`, when the agent
    /// allows host sessions), resolved inside that root (symlinks cannot
    /// leave it), sent from byte `offset` as a session's output (`Stdout`),
    /// then `Text("sha256:HEX")` of the whole file and `Exit(0)`.
    ReadFile {
        workload: String,
        host: bool,
        path: String,
        offset: u64,
    },
    /// Since 1.9: `baton cp` to the device: a session whose input is written
    /// to `path`'s partial copy (`PATH.baton-part`, kept between attempts).
    /// The device first answers `Text("offset N")`: how much of the copy it
    /// already has (the input continues from there). At the input's end the
    /// copy must have SHA-256 `sha256`; then it replaces `path` with mode
    /// `mode` and the answer is `Exit(0)`, else `Error` (and the copy goes).
    WriteFile {
        workload: String,
        host: bool,
        path: String,
        mode: u32,
        sha256: Vec<u8>,
    },
    /// Since 1.9: the controller has passed on `received` bytes of a
    /// session's output; the device may send up to its window beyond that.
    /// Not answered.
    Ack {
        session: u64,
        received: u64,
    },
}

impl CommandAction {
    /// Part of a session already admitted: carried out without being
    /// remembered as a command (each keystroke would otherwise be a write to
    /// flash); `Input`'s offsets and `Resize`'s sequence stop replays.
    pub fn in_session(&self) -> Option<u64> {
        match self {
            Self::Input { session, .. } | Self::Resize { session, .. } | Self::Ack { session, .. } => Some(*session),
            _ => None,
        }
    }
}

/// `cmd/res`: one response message; a request may get several (`seq` orders them).
#[derive(Serialize, Deserialize, Debug, Clone, PartialEq, Eq)]
#[cfg_attr(feature = "schema", derive(schemars::JsonSchema))]
pub struct CommandResult {
    pub id: u64,
    pub seq: u32,
    pub body: CommandOutput,
}

#[derive(Serialize, Deserialize, Debug, Clone, PartialEq, Eq)]
#[cfg_attr(feature = "schema", derive(schemars::JsonSchema))]
pub enum CommandOutput {
    Stdout(Vec<u8>),
    Stderr(Vec<u8>),
    /// Final message of an exec: the exit code.
    Exit(i32),
    /// Final message of a successful request with no exit code.
    Done,
    /// Final message of a failed request.
    Error(String),
    Text(String),
}

/// `enroll` (since 1.2): a device joining with a token. Sent from a session
/// the broker admitted with the token (username `join:<id>`), and carrying it
/// again so the controller can spend one of its uses.
#[derive(Serialize, Deserialize, Debug, Clone, PartialEq, Eq, Default)]
#[cfg_attr(feature = "schema", derive(schemars::JsonSchema))]
pub struct EnrollRequest {
    pub token_id: String,
    pub token_secret: String,
    /// The device's X25519 public key: the password comes back sealed to it,
    /// and it is the key the controller keeps for this device.
    pub sealing_key: Vec<u8>,
}

/// `enroll/res` (since 1.2): the device's MQTT password, sealed to its key
/// under `crypto::secret_context(device, "enroll", "password")`, or why not.
#[derive(Serialize, Deserialize, Debug, Clone, PartialEq, Eq, Default)]
#[cfg_attr(feature = "schema", derive(schemars::JsonSchema))]
pub struct EnrollResponse {
    pub sealed_password: Vec<u8>,
    pub error: Option<String>,
}

/// Every message of the contract, tagged by kind.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Message {
    Presence(Presence),
    Inventory(Inventory),
    Heartbeat(Heartbeat),
    Report(Report),
    Desired(Desired),
    Command(Command),
    CommandResult(CommandResult),
    SignedDesired(SignedDesired),
    EnrollRequest(EnrollRequest),
    EnrollResponse(EnrollResponse),
    ReleaseRequest(crate::release::ReleaseRequest),
    ReleaseChunk(crate::release::ReleaseChunk),
}
