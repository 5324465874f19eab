//! The controller's state and operations, independent of transports: the HTTP
//! API and MQTT ingest call these with plain values. Owns the fleet (in
//! memory, behind a short-held lock) and the store (the durable truth).

use std::collections::BTreeMap;
use std::sync::atomic::{AtomicBool, Ordering::Relaxed};
use std::sync::Mutex;
use std::time::{SystemTime, UNIX_EPOCH};

use baton_protocol::{validate_label, DeviceId};

use crate::fleet::{Change, Device, Fleet, FleetEvent, Millis};
use crate::metrics::{Metrics, Rejection};
use crate::store::{Store, StoreError};
use crate::view::{DeviceView, Health, LabelChange};

pub fn now_ms() -> Millis {
    SystemTime::now().duration_since(UNIX_EPOCH).map_or(0, |d| d.as_millis() as u64)
}

#[derive(Debug, thiserror::Error)]
pub enum OpError {
    #[error("{0}")]
    NotFound(String),
    #[error("{0}")]
    Invalid(String),
    #[error(transparent)]
    Store(#[from] StoreError),
}

pub struct Controller {
    pub commands: crate::commands::CommandRouter,
    fleet: Mutex<Fleet>,
    store: Mutex<Store>,
    pub metrics: Metrics,
    pub stale_after_ms: Millis,
    pub broker_connected: AtomicBool,
}

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    // A panic while holding the lock left plain data behind; keep serving it.
    m.lock().unwrap_or_else(std::sync::PoisonError::into_inner)
}

impl Controller {
    /// Loads every stored device: the fleet is known before the broker says anything.
    pub fn new(
        store: Store,
        stale_after_ms: Millis,
        commands: crate::commands::CommandRouter,
    ) -> Result<Self, StoreError> {
        let fleet = Fleet::from_devices(store.load_devices()?);
        tracing::info!(devices = fleet.len(), "fleet loaded from store");
        Ok(Self {
            commands,
            fleet: Mutex::new(fleet),
            store: Mutex::new(store),
            metrics: Metrics::default(),
            stale_after_ms,
            broker_connected: AtomicBool::new(false),
        })
    }

    /// Applies a decoded device event and persists it when durable state changed.
    pub fn apply(&self, id: &DeviceId, event: FleetEvent, now: Millis) -> Change {
        let (change, snapshot) = {
            let mut fleet = lock(&self.fleet);
            let change = fleet.apply(id, event, now);
            let snapshot = (change == Change::Persist).then(|| fleet.get(id).cloned()).flatten();
            (change, snapshot)
        };
        match change {
            Change::UnknownDevice => self.metrics.rejected(Rejection::UnknownDevice),
            Change::Persist => {
                if let Some(device) = snapshot {
                    self.persist(&device);
                }
            }
            Change::InMemory => {}
        }
        change
    }

    fn persist(&self, device: &Device) {
        match lock(&self.store).save_device(device) {
            Ok(()) => {
                self.metrics.store_writes.fetch_add(1, Relaxed);
            }
            Err(e) => {
                self.metrics.store_errors.fetch_add(1, Relaxed);
                tracing::error!(device = %device.id, error = %e, "cannot persist device");
            }
        }
    }

    /// Writes `last_seen` and the last heartbeat of devices heard from since
    /// `since`: heartbeats move them in memory only, so the store is written
    /// in one batch per flush period, not once per heartbeat.
    pub fn flush_seen(&self, since: Millis) -> Result<usize, StoreError> {
        let devices: Vec<Device> = lock(&self.fleet).devices().filter(|d| d.last_seen >= since).cloned().collect();
        if devices.is_empty() {
            return Ok(0);
        }
        let n = lock(&self.store).save_devices(&devices)?;
        self.metrics.store_writes.fetch_add(n as u64, Relaxed);
        Ok(n)
    }

    pub fn devices(&self, now: Millis) -> Vec<DeviceView> {
        lock(&self.fleet).devices().map(|d| DeviceView::new(d, now, self.stale_after_ms)).collect()
    }

    pub fn device(&self, id: &str, now: Millis) -> Result<DeviceView, OpError> {
        let id = parse_id(id)?;
        let fleet = lock(&self.fleet);
        let d = fleet.get(&id).ok_or_else(|| OpError::NotFound(format!("device {id} not found")))?;
        Ok(DeviceView::new(d, now, self.stale_after_ms))
    }

    pub fn relabel(&self, id: &str, change: &LabelChange, now: Millis) -> Result<DeviceView, OpError> {
        let id = parse_id(id)?;
        for (k, v) in &change.set {
            validate_label(k, v).map_err(OpError::Invalid)?;
        }
        let device = {
            let mut fleet = lock(&self.fleet);
            fleet
                .relabel(&id, &change.set, &change.remove)
                .cloned()
                .ok_or_else(|| OpError::NotFound(format!("device {id} not found")))?
        };
        lock(&self.store).save_device(&device)?;
        self.metrics.store_writes.fetch_add(1, Relaxed);
        Ok(DeviceView::new(&device, now, self.stale_after_ms))
    }

    pub fn status_counts(&self, now: Millis) -> BTreeMap<&'static str, usize> {
        let mut counts = BTreeMap::from([("online", 0), ("stale", 0), ("offline", 0)]);
        for d in lock(&self.fleet).devices() {
            *counts.entry(d.status(now, self.stale_after_ms).as_str()).or_default() += 1;
        }
        counts
    }

    pub fn health(&self) -> Health {
        Health {
            status: "ok".into(),
            version: env!("CARGO_PKG_VERSION").into(),
            broker_connected: self.broker_connected.load(Relaxed),
            devices: lock(&self.fleet).len(),
        }
    }

    pub fn render_metrics(&self, now: Millis) -> String {
        let counts: Vec<(&str, usize)> = self.status_counts(now).into_iter().collect();
        self.metrics.render(&counts)
    }
}

fn parse_id(id: &str) -> Result<DeviceId, OpError> {
    DeviceId::new(id).map_err(|e| OpError::Invalid(e.to_string()))
}
