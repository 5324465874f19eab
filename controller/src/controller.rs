//! The controller's state and operations, independent of transports: the HTTP
//! API and MQTT ingest call these with plain values. Owns the fleet (in
//! memory, behind a short-held lock) and the store (the durable truth).

use std::collections::BTreeMap;
use std::sync::atomic::{AtomicBool, Ordering::Relaxed};
use std::sync::Mutex;
use std::time::{SystemTime, UNIX_EPOCH};

use baton_protocol::{validate_label, DeviceId};

use baton_protocol::spec::WorkloadSpec;
use baton_protocol::Desired;
use tokio::sync::mpsc::UnboundedSender;

use crate::commands::Outgoing;
use crate::fleet::{Change, Device, Fleet, FleetEvent, Millis};
use crate::metrics::{Metrics, Rejection};
use crate::schedule::{fits, place, DeviceFacts, Placed};
use crate::store::{Store, StoreError};
use crate::view::{ApplyResult, DeviceView, Health, LabelChange, WorkloadOnDevice, WorkloadView};
use crate::workload::{Manifest, Validated};

/// What placement sees of a device.
fn facts_of(d: &Device) -> DeviceFacts {
    DeviceFacts {
        id: d.id.clone(),
        labels: d.labels(),
        arch: d.inventory.as_ref().map(|i| i.arch.clone()).unwrap_or_default(),
    }
}

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
    outbox: UnboundedSender<Outgoing>,
    fleet: Mutex<Fleet>,
    /// Name → (manifest, spec with its revision); the store has the same.
    workloads: Mutex<BTreeMap<String, (Manifest, WorkloadSpec)>>,
    /// Device → (generation, workloads) last published.
    desired: Mutex<BTreeMap<String, (u64, Vec<WorkloadSpec>)>>,
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
        outbox: UnboundedSender<Outgoing>,
    ) -> Result<Self, StoreError> {
        let fleet = Fleet::from_devices(store.load_devices()?);
        let workloads: BTreeMap<String, (Manifest, WorkloadSpec)> =
            store.load_workloads()?.into_iter().map(|(m, s)| (s.name.clone(), (m, s))).collect();
        let desired = store.load_desired()?;
        tracing::info!(devices = fleet.len(), workloads = workloads.len(), "fleet loaded from store");
        Ok(Self {
            commands,
            outbox,
            workloads: Mutex::new(workloads),
            desired: Mutex::new(desired),
            fleet: Mutex::new(fleet),
            store: Mutex::new(store),
            metrics: Metrics::default(),
            stale_after_ms,
            broker_connected: AtomicBool::new(false),
        })
    }

    /// Applies a decoded device event and persists it when durable state changed.
    pub fn apply(&self, id: &DeviceId, event: FleetEvent, now: Millis) -> Change {
        let placement_relevant = matches!(event, FleetEvent::Presence(_) | FleetEvent::Inventory(_));
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
                // A new device, or new labels or architecture: placement may change.
                if placement_relevant {
                    self.sync_desired();
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
        self.sync_desired();
        Ok(DeviceView::new(&device, now, self.stale_after_ms))
    }

    /// Stores validated workloads (the caller validated every document first,
    /// so an invalid file stores nothing). A revision changes only when the
    /// spec or the placement did: applying the same file twice changes nothing.
    pub fn apply_workloads(&self, validated: Vec<Validated>, now: Millis) -> Result<Vec<ApplyResult>, OpError> {
        let mut results = Vec::new();
        {
            let mut workloads = lock(&self.workloads);
            let store = lock(&self.store);
            for v in validated {
                let (revision, action) = match workloads.get(&v.spec.name) {
                    None => (1, "created"),
                    Some((old_manifest, old)) => {
                        let same = WorkloadSpec { revision: old.revision, ..v.spec.clone() } == *old
                            && old_manifest.placement == v.manifest.placement;
                        if same {
                            (old.revision, "unchanged")
                        } else {
                            (old.revision + 1, "updated")
                        }
                    }
                };
                let spec = WorkloadSpec { revision, ..v.spec };
                if action != "unchanged" {
                    store.save_workload(&v.manifest, &spec, now)?;
                    self.metrics.store_writes.fetch_add(1, Relaxed);
                }
                results.push(ApplyResult { name: spec.name.clone(), revision, action: action.into() });
                workloads.insert(spec.name.clone(), (v.manifest, spec));
            }
        }
        self.sync_desired();
        Ok(results)
    }

    pub fn delete_workload(&self, name: &str) -> Result<(), OpError> {
        if lock(&self.workloads).remove(name).is_none() {
            return Err(OpError::NotFound(format!("workload {name} not found")));
        }
        lock(&self.store).delete_workload(name)?;
        self.sync_desired();
        Ok(())
    }

    /// Recomputes every device's desired document; stores and publishes the
    /// ones that changed, each with the next generation.
    pub fn sync_desired(&self) {
        let facts: Vec<DeviceFacts> = lock(&self.fleet).devices().map(facts_of).collect();
        let placed: Vec<Placed> = lock(&self.workloads)
            .values()
            .map(|(m, s)| Placed { spec: s.clone(), placement: m.placement.clone() })
            .collect();
        let mut desired = lock(&self.desired);
        let store = lock(&self.store);
        for (device, workloads) in place(&facts, &placed) {
            // Unchanged, or nothing to say to a device that never had a document.
            let unchanged = match desired.get(&device) {
                Some((_, w)) => *w == workloads,
                None => workloads.is_empty(),
            };
            if unchanged {
                continue;
            }
            let generation = desired.get(&device).map_or(1, |(g, _)| g + 1);
            if let Err(e) = store.save_desired(&device, generation, &workloads) {
                self.metrics.store_errors.fetch_add(1, Relaxed);
                tracing::error!(%device, error = %e, "cannot store a desired document; not publishing it");
                continue;
            }
            tracing::info!(%device, generation, workloads = workloads.len(), "desired document changed");
            if let Ok(id) = DeviceId::new(device.clone()) {
                let _ = self.outbox.send(Outgoing::Desired(id, Desired { generation, workloads: workloads.clone() }));
            }
            desired.insert(device, (generation, workloads));
        }
    }

    /// Publishes every stored desired document again (after a (re)connect:
    /// an embedded broker keeps no retained messages across a restart).
    pub fn republish_desired(&self) {
        for (device, (generation, workloads)) in lock(&self.desired).iter() {
            if let Ok(id) = DeviceId::new(device.clone()) {
                let doc = Desired { generation: *generation, workloads: workloads.clone() };
                let _ = self.outbox.send(Outgoing::Desired(id, doc));
            }
        }
    }

    pub fn workloads(&self, now: Millis) -> Vec<WorkloadView> {
        let names: Vec<String> = lock(&self.workloads).keys().cloned().collect();
        names.iter().filter_map(|n| self.workload(n, now).ok()).collect()
    }

    pub fn workload(&self, name: &str, now: Millis) -> Result<WorkloadView, OpError> {
        let (manifest, spec) = lock(&self.workloads)
            .get(name)
            .cloned()
            .ok_or_else(|| OpError::NotFound(format!("workload {name} not found")))?;
        let devices = lock(&self.fleet)
            .devices()
            .filter(|d| fits(&manifest.placement, &facts_of(d)))
            .map(|d| WorkloadOnDevice {
                device: d.id.clone(),
                device_status: d.status(now, self.stale_after_ms),
                reported: d.report.as_ref().and_then(|r| r.workloads.iter().find(|w| w.name == name).cloned()),
            })
            .collect();
        Ok(WorkloadView {
            name: spec.name.clone(),
            revision: spec.revision,
            image: spec.image.clone(),
            placement: manifest.placement.clone(),
            devices,
            manifest,
        })
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
