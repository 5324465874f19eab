//! The JSON shapes of the HTTP API, shared by the server and the CLI.

use std::collections::BTreeMap;

use baton_protocol::{Heartbeat, Inventory, Presence};
use serde::{Deserialize, Serialize};

use crate::fleet::{Device, Liveness, Millis, Status};

#[derive(Debug, Clone, Serialize, Deserialize, schemars::JsonSchema)]
pub struct DeviceView {
    pub id: String,
    pub tenant: String,
    pub status: Status,
    pub agent_version: String,
    pub arch: String,
    /// Effective labels: the agent's, overridden by the operator's.
    pub labels: BTreeMap<String, String>,
    pub operator_labels: BTreeMap<String, String>,
    pub first_seen_ms: Millis,
    pub last_seen_ms: Millis,
    pub presence: Presence,
    pub inventory: Option<Inventory>,
    pub heartbeat: Option<Heartbeat>,
    pub report: Option<baton_protocol::Report>,
    /// The last desired document it refused, and why.
    #[serde(default)]
    pub refusal: Option<crate::fleet::Refusal>,
    /// How far the device's clock is from the controller's (ms, device − controller).
    #[serde(default)]
    pub clock_offset_ms: Option<i64>,
}

impl DeviceView {
    pub fn new(d: &Device, now: Millis, liveness: &Liveness) -> Self {
        Self {
            id: d.id.clone(),
            tenant: d.tenant.clone(),
            status: d.status(now, liveness),
            agent_version: d.presence.agent_version.clone(),
            arch: d.inventory.as_ref().map(|i| i.arch.clone()).unwrap_or_default(),
            labels: d.labels(),
            operator_labels: d.operator_labels.clone(),
            first_seen_ms: d.first_seen,
            last_seen_ms: d.last_seen,
            presence: d.presence.clone(),
            inventory: d.inventory.clone(),
            heartbeat: d.heartbeat.clone(),
            report: d.report.clone(),
            refusal: d.refusal.clone(),
            clock_offset_ms: d.clock_offset_ms,
        }
    }
}

/// Body of `PATCH /api/v1/devices/{id}/labels`.
#[derive(Debug, Clone, Default, Serialize, Deserialize, schemars::JsonSchema)]
pub struct LabelChange {
    #[serde(default)]
    pub set: BTreeMap<String, String>,
    #[serde(default)]
    pub remove: Vec<String>,
}

/// `GET /healthz`: always 200 from a serving controller (a standby answers
/// 503 `{"status":"standby","leader":"HOST:PORT"}` itself, and forwards
/// other requests to the leader); `status` is "ok", or "degraded" with the
/// reasons in `problems`.
#[derive(Debug, Clone, Serialize, Deserialize, schemars::JsonSchema)]
pub struct Health {
    pub status: String,
    pub version: String,
    pub broker_connected: bool,
    /// It holds its store (PostgreSQL: its session is up and still leads;
    /// SQLite: always).
    #[serde(default = "yes")]
    pub store_connected: bool,
    pub devices: usize,
    /// Why `status` is "degraded" (empty when "ok").
    #[serde(default)]
    pub problems: Vec<String>,
}

fn yes() -> bool {
    true
}

#[derive(Debug, Clone, Serialize, Deserialize, schemars::JsonSchema)]
pub struct ApiError {
    pub error: String,
}

/// Body of `POST /api/v1/devices/{id}/exec`.
#[derive(Debug, Clone, Serialize, Deserialize, schemars::JsonSchema)]
pub struct ExecRequest {
    pub workload: String,
    pub argv: Vec<String>,
}

/// Body of `POST /api/v1/devices/{id}/sessions`: an interactive session
/// (`baton exec -i/-t`); the answer streams `sessions::Frame`s.
#[derive(Debug, Clone, Default, Serialize, Deserialize, schemars::JsonSchema)]
pub struct SessionRequest {
    /// The workload whose newest container it runs in (empty with `host`).
    #[serde(default)]
    pub workload: String,
    /// On the device's host (an admin of the whole fleet, and a device that allows it).
    #[serde(default)]
    pub host: bool,
    pub argv: Vec<String>,
    /// A pseudo-terminal of this size.
    #[serde(default)]
    pub tty: bool,
    #[serde(default)]
    pub rows: u16,
    #[serde(default)]
    pub cols: u16,
    /// The operator's `TERM` (a terminal session's type).
    #[serde(default)]
    pub term: String,
}

/// Body of `POST /api/v1/devices/{id}/connections`: one connection of
/// `baton port-forward` (the answer streams like a session's).
#[derive(Debug, Clone, Default, Serialize, Deserialize, schemars::JsonSchema)]
pub struct ConnectRequest {
    /// The workload whose newest container to reach (empty: the device's host).
    #[serde(default)]
    pub workload: String,
    pub port: u16,
    /// Only check that the connection would be allowed (no device asked).
    #[serde(default)]
    pub check: bool,
}

/// Body of `POST /api/v1/devices/{id}/files/read|write` (`baton cp`).
#[derive(Debug, Clone, Default, Serialize, Deserialize, schemars::JsonSchema)]
pub struct FileRequest {
    #[serde(default)]
    pub workload: String,
    #[serde(default)]
    pub host: bool,
    /// Absolute, inside the container (or on the host).
    pub path: String,
    /// Read: the byte to start from (a resumed copy).
    #[serde(default)]
    pub offset: u64,
    /// Write: the file's mode bits.
    #[serde(default)]
    pub mode: u32,
    /// Write: the whole file's SHA-256, hex.
    #[serde(default)]
    pub sha256: String,
}

/// Body of `POST /api/v1/sessions/{id}/resize`.
#[derive(Debug, Clone, Copy, Serialize, Deserialize, schemars::JsonSchema)]
pub struct ResizeRequest {
    pub rows: u16,
    pub cols: u16,
}

#[derive(Debug, Clone, Serialize, Deserialize, schemars::JsonSchema)]
pub struct ExecResponse {
    pub exit_code: i32,
    pub stdout: String,
    pub stderr: String,
}

/// One manifest file sent by `baton apply`.
#[derive(Debug, Clone, Serialize, Deserialize, schemars::JsonSchema)]
pub struct ManifestFile {
    pub name: String,
    pub text: String,
}

/// Body of `POST /api/v1/workloads`.
#[derive(Debug, Clone, Serialize, Deserialize, schemars::JsonSchema)]
pub struct ApplyRequest {
    pub files: Vec<ManifestFile>,
}

/// A secret as the API shows it: never its value.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq, schemars::JsonSchema)]
pub struct SecretView {
    pub name: String,
    pub tenant: String,
    pub version: u64,
    pub updated_at_ms: u64,
    pub used_by: Vec<String>,
}

/// `POST /api/v1/tokens`.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq, schemars::JsonSchema)]
pub struct TokenRequest {
    pub ttl_s: u64,
    pub uses: u32,
    #[serde(default)]
    pub labels: BTreeMap<String, String>,
}

/// A new join token: the whole `token` is shown once.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq, schemars::JsonSchema)]
pub struct TokenView {
    pub token: String,
    #[serde(flatten)]
    pub info: JoinTokenView,
}

/// A join token as listed (never its secret).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, schemars::JsonSchema)]
pub struct JoinTokenView {
    pub id: String,
    pub expires_at: u64,
    pub uses_left: u32,
    pub labels: BTreeMap<String, String>,
    pub created_at: u64,
    /// The tenant a device joining with it belongs to.
    #[serde(default = "crate::tenant::default_tenant")]
    pub tenant: String,
}

impl From<crate::store::StoredToken> for JoinTokenView {
    fn from(t: crate::store::StoredToken) -> Self {
        let crate::store::StoredToken { id, expires_at, uses_left, labels, created_at, tenant } = t;
        Self { id, expires_at, uses_left, labels, created_at, tenant }
    }
}

/// An operator API token as listed (never its secret).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, schemars::JsonSchema)]
pub struct ApiTokenView {
    pub id: String,
    pub role: Role,
    pub name: String,
    pub created_at: u64,
    /// The tenant it acts for; `None`: fleet-wide.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub tenant: Option<String>,
}

impl From<crate::store::ApiToken> for ApiTokenView {
    fn from(t: crate::store::ApiToken) -> Self {
        let crate::store::ApiToken { id, role, name, created_at, tenant } = t;
        Self { id, role, name, created_at, tenant }
    }
}

/// `POST /api/v1/apitokens`: the token, shown once, and what it is.
#[derive(Debug, Clone, Serialize, Deserialize, schemars::JsonSchema)]
pub struct ApiTokenCreated {
    pub token: String,
    #[serde(flatten)]
    pub info: ApiTokenView,
}

/// `POST /api/v1/apitokens`.
#[derive(Debug, Clone, Serialize, Deserialize, schemars::JsonSchema)]
pub struct ApiTokenRequest {
    /// A `Role` by name (checked by the controller, which says what it takes).
    pub role: String,
    #[serde(default)]
    pub name: String,
}

/// A device's newly issued MQTT password (shown once).
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq, schemars::JsonSchema)]
pub struct CredentialsView {
    pub device: String,
    /// The MQTT username is the device id.
    pub password: String,
}

/// The controller's public signing key.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq, schemars::JsonSchema)]
pub struct TrustView {
    /// `ed25519:HEX`: what agents put in `controller_keys`.
    pub signing_key: String,
}

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq, schemars::JsonSchema)]
pub struct ApplyResult {
    pub name: String,
    pub revision: u64,
    /// `created`, `updated`, `configured`, `retried` or `unchanged`.
    pub action: String,
    /// The digest its image tag was pinned to, and anything worth saying about it.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub note: Option<String>,
}

/// A workload and how it is doing on each device it is placed on.
#[derive(Debug, Clone, Serialize, Deserialize, schemars::JsonSchema)]
pub struct WorkloadView {
    pub name: String,
    pub tenant: String,
    /// The newest revision.
    pub revision: u64,
    /// The revision the fleet settled on (differs from `revision` while a
    /// rollout runs, or after one was rolled back).
    pub stable_revision: u64,
    pub image: String,
    pub placement: crate::workload::Placement,
    /// `None`: every matching device.
    pub replicas: Option<u32>,
    /// Replicas that fit on no device.
    pub unplaced: u32,
    pub revisions: Vec<RevisionView>,
    pub rollout: Option<RolloutView>,
    pub devices: Vec<WorkloadOnDevice>,
    pub manifest: crate::workload::Manifest,
    /// The autoscaler's state (autoscaled workloads, in `describe`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub autoscale: Option<AutoscaleView>,
}

/// An autoscaled workload: its range, count, what the load calls for now
/// and the last decision (since the controller started).
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq, schemars::JsonSchema)]
pub struct AutoscaleView {
    pub min: u32,
    pub max: u32,
    pub current: u32,
    /// What the instances' load calls for now (None: no load reported yet).
    pub recommended: Option<u32>,
    pub reason: Option<String>,
    pub last_decision: Option<ScaleDecision>,
}

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq, schemars::JsonSchema)]
pub struct ScaleDecision {
    pub at_ms: u64,
    pub from: u32,
    pub to: u32,
    pub reason: String,
}

#[derive(Debug, Clone, Serialize, Deserialize, schemars::JsonSchema)]
pub struct RevisionView {
    pub revision: u64,
    pub image: String,
    /// The digest the image was pinned to at apply (empty: devices pull the tag).
    pub digest: String,
    /// What differs from the revision before it (`image`, `env`, …); empty for the first kept.
    #[serde(default)]
    pub changes: Vec<String>,
}

#[derive(Debug, Clone, Serialize, Deserialize, schemars::JsonSchema)]
pub struct WorkloadOnDevice {
    pub device: String,
    pub device_status: Status,
    /// The revision this device is asked to run.
    pub desired_revision: u64,
    /// What the device last reported for this workload (None: nothing yet).
    pub reported: Option<baton_protocol::WorkloadStatus>,
    /// Its load at the device's last heartbeat (autoscaled workloads).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub load: Option<baton_protocol::WorkloadLoad>,
    /// A new revision the device holds back (update window, update lock).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub waiting: Option<baton_protocol::Waiting>,
    /// Its container's address on the device's bridge (bridged workloads).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub address: Option<String>,
    /// Why the device refused the document that asks it for this workload,
    /// while that document is not in force there.
    #[serde(default)]
    pub refused: Option<String>,
}

/// `baton agent upgrade`.
#[derive(Debug, Clone, PartialEq, Eq, Default, Serialize, Deserialize, schemars::JsonSchema)]
pub struct AgentUpgradeRequest {
    pub version: String,
    /// Devices whose labels include all of these (empty: every device).
    #[serde(default)]
    pub selector: BTreeMap<String, String>,
    /// `1`, `10%`, `100%`… (default 1, 25%, 100%).
    #[serde(default)]
    pub waves: Option<Vec<String>>,
    #[serde(default)]
    pub min_ready_s: Option<u64>,
    #[serde(default)]
    pub max_failure_pct: Option<u32>,
    #[serde(default)]
    pub deadline_s: Option<u64>,
}

/// An agent upgrade: its number (what devices see), target and progress.
#[derive(Debug, Clone, Serialize, Deserialize, schemars::JsonSchema)]
pub struct AgentRolloutView {
    pub id: u64,
    pub version: String,
    pub selector: BTreeMap<String, String>,
    /// As it was when it ended (or now, while it runs).
    pub rollout: RolloutView,
    /// Where its devices stand now (the counts above stop at its end).
    #[serde(default)]
    pub now: AgentFleetNow,
}

/// The devices an agent upgrade covered, as they report now.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize, schemars::JsonSchema)]
pub struct AgentFleetNow {
    /// Running the upgrade's version.
    pub on_version: usize,
    /// Running the version they ran before it.
    pub on_before: usize,
    /// Running something else, or never heard of.
    pub other: usize,
}

#[derive(Debug, Clone, Serialize, Deserialize, schemars::JsonSchema)]
pub struct RolloutView {
    pub workload: String,
    pub from: u64,
    pub to: u64,
    pub state: crate::rollout::State,
    /// 1-based number of the wave released last, and how many there are.
    pub wave: usize,
    pub waves: usize,
    pub counts: crate::rollout::Counts,
    pub started_ms: Millis,
    pub finished_ms: Option<Millis>,
    pub reason: Option<String>,
    /// Why it cannot move on right now (every device it could judge is away).
    #[serde(default)]
    pub waiting: Option<String>,
    /// Devices that failed the new revision, with why.
    pub failed: Vec<(String, String)>,
    /// Released devices that hold the new revision back (update window or
    /// lock), with why.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub held: Vec<(String, String)>,
}

impl RolloutView {
    pub fn new(r: &crate::rollout::Rollout) -> Self {
        Self {
            workload: r.workload.clone(),
            from: r.from,
            to: r.to,
            state: r.state,
            wave: if r.wave_ends.is_empty() { 0 } else { r.wave + 1 },
            waves: r.wave_ends.len(),
            counts: r.counts(),
            started_ms: r.started_ms,
            finished_ms: r.finished_ms,
            reason: r.reason.clone(),
            waiting: r.waiting.clone(),
            failed: r
                .progress
                .iter()
                .filter_map(|(d, p)| match &p.outcome {
                    crate::rollout::Outcome::Failed(why) => Some((d.clone(), why.clone())),
                    _ => None,
                })
                .collect(),
            held: r
                .progress
                .iter()
                .filter(|(_, p)| p.outcome == crate::rollout::Outcome::Pending)
                .filter_map(|(d, p)| Some((d.clone(), p.waiting.clone()?)))
                .collect(),
        }
    }
}

/// One entry of the event log (`baton get events`).
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq, schemars::JsonSchema)]
pub struct Event {
    pub at_ms: Millis,
    /// `workload`, `rollout`, `device`, `secret`, `token`, `apitoken`.
    pub kind: String,
    /// `KIND.WHAT`: `device.offline`, `rollout.succeeded` (webhooks filter on it;
    /// empty for events recorded before names existed).
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub name: String,
    pub subject: String,
    pub message: String,
    /// The subject's tenant; empty for fleet-wide subjects.
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub tenant: String,
}

/// Body of `POST /api/v1/workloads/{name}/scale`.
#[derive(Debug, Clone, Serialize, Deserialize, schemars::JsonSchema)]
pub struct ScaleRequest {
    pub replicas: u32,
}

impl WorkloadView {
    /// Devices reporting the revision they are asked to run, running; an
    /// offline device's last report is no news of what runs there now, so
    /// it does not count (a trial's revoked, dead device counted as running
    /// and healthy for ever).
    pub fn running(&self) -> usize {
        self.devices
            .iter()
            .filter(|d| d.device_status != crate::fleet::Status::Offline)
            .filter(|d| {
                d.reported
                    .as_ref()
                    .is_some_and(|r| r.revision == d.desired_revision && r.phase == baton_protocol::Phase::Running)
            })
            .count()
    }

    /// Devices that hold the desired revision back (window, lock) while
    /// an older one runs.
    pub fn holding(&self) -> usize {
        self.devices.iter().filter(|d| d.waiting.as_ref().is_some_and(|h| h.revision == d.desired_revision)).count()
    }

    pub fn healthy(&self) -> usize {
        self.devices
            .iter()
            .filter(|d| d.device_status != crate::fleet::Status::Offline)
            .filter(|d| {
                d.reported.as_ref().is_some_and(|r| {
                    r.revision == d.desired_revision
                        && r.phase == baton_protocol::Phase::Running
                        && r.health == baton_protocol::Health::Healthy
                })
            })
            .count()
    }
}

/// What an operator API token may do.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, schemars::JsonSchema)]
#[serde(rename_all = "kebab-case")]
pub enum Role {
    /// Everything its scope allows.
    Admin,
    /// GET and HEAD only.
    ReadOnly,
}

impl Role {
    pub fn as_str(self) -> &'static str {
        match self {
            Role::Admin => "admin",
            Role::ReadOnly => "read-only",
        }
    }
}

impl std::fmt::Display for Role {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.as_str())
    }
}

impl std::str::FromStr for Role {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        match s {
            "admin" => Ok(Role::Admin),
            "read-only" => Ok(Role::ReadOnly),
            other => Err(format!("role {other:?}: use admin or read-only")),
        }
    }
}

/// `baton rollout pause|resume|abort|undo` (the last path segment of
/// `POST /api/v1/workloads/{name}/rollout/{action}`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum RolloutAction {
    Pause,
    Resume,
    /// Every device back to the stable revision.
    Abort,
    /// Abort a running rollout, or roll out the revision before the stable one.
    Undo,
}

impl RolloutAction {
    pub fn as_str(self) -> &'static str {
        match self {
            RolloutAction::Pause => "pause",
            RolloutAction::Resume => "resume",
            RolloutAction::Abort => "abort",
            RolloutAction::Undo => "undo",
        }
    }
}

impl std::str::FromStr for RolloutAction {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        match s {
            "pause" => Ok(RolloutAction::Pause),
            "resume" => Ok(RolloutAction::Resume),
            "abort" => Ok(RolloutAction::Abort),
            "undo" => Ok(RolloutAction::Undo),
            other => Err(format!("unknown rollout action {other:?}")),
        }
    }
}

/// `POST /api/v1/webhooks`.
#[derive(Debug, Clone, Serialize, Deserialize, schemars::JsonSchema)]
pub struct WebhookRequest {
    pub url: String,
    /// Event names or patterns: `rollout.*`, `device.offline`, `*`.
    pub events: Vec<String>,
}

/// A webhook as listed: where it posts, what, and how delivery goes.
#[derive(Debug, Clone, Default, Serialize, Deserialize, schemars::JsonSchema)]
pub struct WebhookView {
    pub id: String,
    pub url: String,
    pub events: Vec<String>,
    /// `None`: fleet-wide (every tenant's events).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub tenant: Option<String>,
    pub created_at_ms: Millis,
    /// Events delivered (answered 2xx).
    pub delivered: u64,
    /// Attempts that failed (each is retried, with backoff, until it succeeds).
    pub failed_attempts: u64,
    /// Events waiting (the oldest is being retried when `last_error` is set).
    pub queued: u64,
    /// Events dropped because the queue was full (the endpoint was down too long).
    pub dropped: u64,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub last_error: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub last_delivered_ms: Option<Millis>,
}

/// `POST /api/v1/webhooks`: the webhook and its signing secret, shown once.
#[derive(Debug, Clone, Serialize, Deserialize, schemars::JsonSchema)]
pub struct WebhookCreated {
    /// Receivers check `X-Baton-Signature: sha256=HEX(HMAC-SHA256(secret, body))`.
    pub secret: String,
    #[serde(flatten)]
    pub webhook: WebhookView,
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::fleet::Status;
    use baton_protocol::{Health, Phase, WorkloadStatus};

    #[test]
    fn an_offline_devices_last_report_does_not_count_as_running() {
        let on = |device: &str, device_status| WorkloadOnDevice {
            device: device.into(),
            device_status,
            desired_revision: 1,
            reported: Some(WorkloadStatus {
                name: "w".into(),
                revision: 1,
                phase: Phase::Running,
                health: Health::Healthy,
                ..Default::default()
            }),
            load: None,
            waiting: None,
            address: None,
            refused: None,
        };
        let w = WorkloadView {
            name: "w".into(),
            tenant: String::new(),
            revision: 1,
            stable_revision: 1,
            image: "img".into(),
            placement: Default::default(),
            replicas: None,
            unplaced: 0,
            revisions: Vec::new(),
            rollout: None,
            devices: vec![on("a", Status::Online), on("b", Status::Stale), on("dead", Status::Offline)],
            manifest: Default::default(),
            autoscale: None,
        };
        assert_eq!((w.running(), w.healthy()), (2, 2));
    }
}
