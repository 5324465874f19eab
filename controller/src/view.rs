//! The JSON shapes of the HTTP API, shared by the server and the CLI.

use std::collections::BTreeMap;

use baton_protocol::{Heartbeat, Inventory, Presence};
use serde::{Deserialize, Serialize};

use crate::fleet::{Device, Millis, Status};

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct DeviceView {
    pub id: String,
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
}

impl DeviceView {
    pub fn new(d: &Device, now: Millis, stale_after_ms: Millis) -> Self {
        Self {
            id: d.id.clone(),
            status: d.status(now, stale_after_ms),
            agent_version: d.presence.agent_version.clone(),
            arch: d.inventory.as_ref().map(|i| i.arch.clone()).unwrap_or_default(),
            labels: d.labels(),
            operator_labels: d.operator_labels.clone(),
            first_seen_ms: d.first_seen,
            last_seen_ms: d.last_seen,
            presence: d.presence.clone(),
            inventory: d.inventory.clone(),
            heartbeat: d.heartbeat.clone(),
        }
    }
}

/// Body of `PATCH /api/v1/devices/{id}/labels`.
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
pub struct LabelChange {
    #[serde(default)]
    pub set: BTreeMap<String, String>,
    #[serde(default)]
    pub remove: Vec<String>,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Health {
    pub status: String,
    pub version: String,
    pub broker_connected: bool,
    pub devices: usize,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct ApiError {
    pub error: String,
}

/// Body of `POST /api/v1/devices/{id}/exec`.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct ExecRequest {
    pub workload: String,
    pub argv: Vec<String>,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct ExecResponse {
    pub exit_code: i32,
    pub stdout: String,
    pub stderr: String,
}
