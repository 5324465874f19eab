//! The controller's state and operations: the HTTP API and MQTT ingest call
//! these with plain values. Owns the fleet (in memory, behind a short-held
//! lock) and the store (the durable truth). Not yet independent of
//! transports: it also composes, signs and publishes desired documents,
//! resolves image tags over HTTP, and builds Mosquitto dynamic-security
//! batches and gateway CONNECT decisions (issue 15 moves them to the edges).

use std::collections::{BTreeMap, BTreeSet};
use std::sync::atomic::{AtomicBool, Ordering::Relaxed};
use std::sync::Mutex;
use std::time::{SystemTime, UNIX_EPOCH};

use baton_protocol::{validate_label, DeviceId, PresenceState};

use baton_protocol::spec::{File, WorkloadSpec};
use baton_protocol::{crypto, encode, Desired, Endpoint, Message, ServiceEndpoints};
use tokio::sync::mpsc::UnboundedSender;

use crate::commands::Outgoing;
use crate::fleet::{Change, Delivery, Device, Fleet, FleetEvent, Liveness, Millis, Status};
use crate::keys::Keys;
use crate::metrics::{Metrics, Rejection};
use crate::rollout::{Observation, Rollout, State as RolloutState};
use crate::schedule::{schedule, DeviceFacts, Placed, Schedule};
use crate::store::{Store, StoreError, REVISION_HISTORY};
use crate::tenant::Scope;
use crate::view::{
    ApplyResult, DeviceView, Event, Health, LabelChange, RevisionView, RolloutView, SecretView, WorkloadOnDevice,
    WorkloadView,
};
use crate::workload::{Manifest, Validated};

/// What placement sees of a device.
fn facts_of(d: &Device, now: Millis, liveness: &Liveness, grace_ms: Millis) -> DeviceFacts {
    let status = d.status(now, liveness);
    let inv = d.inventory.as_ref();
    DeviceFacts {
        id: d.id.clone(),
        tenant: d.tenant.clone(),
        labels: d.labels(),
        arch: inv.map(|i| i.arch.clone()).unwrap_or_default(),
        memory_bytes: inv.map_or(0, |i| i.memory_bytes),
        cpu_millis: inv.map_or(0, |i| u64::from(i.cpus) * 1000),
        reachable: status == Status::Online,
        gone: is_gone(d, now, grace_ms),
    }
}

/// Offline for longer than the grace period (counted from going offline,
/// not from its last message): its replicas move elsewhere.
fn is_gone(d: &Device, now: Millis, grace_ms: Millis) -> bool {
    d.offline_for(now) > grace_ms
}

/// Healthy running instances of each workload: (device, address, revision).
type Serving = BTreeMap<String, Vec<(String, String, u64)>>;

/// What placement and service discovery need from the fleet, taken in one lock.
struct Snapshot {
    facts: Vec<DeviceFacts>,
    serving: Serving,
    /// Each device's X25519 key (from its inventory), for sealing secrets.
    sealing: BTreeMap<String, [u8; 32]>,
    /// The generation each device says it has in force.
    applied: BTreeMap<String, u64>,
    /// When it was taken.
    now: Millis,
}

/// Sealed file contents by (device, workload, revision, path), with the device
/// key they were sealed to: a seal is reused until one of those changes, so
/// documents do not change (and containers do not restart) for nothing.
type SealCache = BTreeMap<(String, String, u64, String), ([u8; 32], Vec<u8>)>;

/// The contents a secret file has in a revision: which secret, which version.
pub fn secret_reference(name: &str, version: u64) -> Vec<u8> {
    format!("baton-secret:{name}:{version}").into_bytes()
}

/// Binds a stored secret ciphertext to its name and version.
fn secret_aad(name: &str, version: u64) -> Vec<u8> {
    format!("baton secret {name} v{version}").into_bytes()
}

fn parse_secret_reference(contents: &[u8]) -> Option<(&str, u64)> {
    let text = std::str::from_utf8(contents).ok()?.strip_prefix("baton-secret:")?;
    let (name, version) = text.rsplit_once(':')?;
    Some((name, version.parse().ok()?))
}

/// One workload as the controller holds it.
#[derive(Debug, Clone)]
struct Entry {
    tenant: String,
    manifest: Manifest,
    revisions: BTreeMap<u64, WorkloadSpec>,
    latest: u64,
    stable: u64,
    rollout: Option<Rollout>,
}

impl Entry {
    fn active_rollout(&self) -> Option<&Rollout> {
        self.rollout.as_ref().filter(|r| r.state.active())
    }

    /// Revisions the history must keep.
    fn pinned(&self) -> Vec<u64> {
        let mut keep = vec![self.stable, self.latest];
        keep.extend(self.rollout.iter().flat_map(|r| [r.from, r.to]));
        keep
    }
}

/// Workloads, where they run, and what each device was last given.
#[derive(Default)]
struct State {
    workloads: BTreeMap<String, Entry>,
    schedule: Schedule,
    /// Device → the document last published.
    desired: BTreeMap<String, Desired>,
    /// The endpoints last published (only services someone uses matter).
    serving: Serving,
    /// Devices gone past the grace period when placement last ran.
    gone: BTreeSet<String>,
    sealed: SealCache,
    /// When a device's document was last published again over a foreign one.
    reasserted: BTreeMap<String, Millis>,
    /// Devices online but behind their document: since when (or when it was last sent again).
    behind: BTreeMap<String, Millis>,
}

/// An online device still behind its document this long gets it again.
const RESEND_BEHIND_MS: Millis = 60_000;

pub fn now_ms() -> Millis {
    SystemTime::now().duration_since(UNIX_EPOCH).map_or(0, |d| d.as_millis() as u64)
}

#[derive(Debug, thiserror::Error)]
pub enum OpError {
    #[error("{0}")]
    NotFound(String),
    #[error("{0}")]
    Invalid(String),
    #[error("{0}")]
    Forbidden(String),
    #[error(transparent)]
    Store(#[from] StoreError),
}

pub struct Controller {
    pub commands: crate::commands::CommandRouter,
    outbox: UnboundedSender<Outgoing>,
    /// Lock order: fleet, then state, then store.
    fleet: Mutex<Fleet>,
    state: Mutex<State>,
    store: Mutex<Store>,
    pub metrics: Metrics,
    /// When a silent device is stale, and when offline (`fleet::Liveness`).
    pub liveness: Liveness,
    /// An offline device's `replicas` workloads move elsewhere after this long.
    pub reschedule_after_ms: Millis,
    /// Resolves image tags to digests at apply (None: devices pull tags).
    pub registry: Option<baton_registry::Client>,
    pub broker_connected: AtomicBool,
    /// Signs every desired document; encrypts secrets at rest.
    pub keys: Keys,
    /// Device → SHA-256 of its MQTT password (checked by the gateway).
    credentials: Mutex<BTreeMap<String, Vec<u8>>>,
    /// Operator tokens required on the API (`--api-auth`).
    pub api_auth: bool,
    /// Device and join accounts kept on an external Mosquitto through its
    /// dynamic-security plugin (`--broker-dynsec`).
    pub dynsec: bool,
    /// Join tokens whose Mosquitto account was removed (used up or expired),
    /// and when tokens were last looked at for that.
    swept_tokens: Mutex<(BTreeSet<String>, Millis)>,
    /// API tokens and their secrets' hashes.
    api_tokens: Mutex<Vec<(crate::store::ApiToken, Vec<u8>)>>,
    /// The gateway in front of the embedded broker, when `--mqtt-auth` is on.
    pub gateway: std::sync::OnceLock<std::sync::Arc<crate::gateway::Gateway>>,
}

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    // A panic while holding the lock left plain data behind; keep serving it.
    m.lock().unwrap_or_else(std::sync::PoisonError::into_inner)
}

impl Controller {
    /// Loads every stored device: the fleet is known before the broker says anything.
    pub fn new(
        store: Store,
        liveness: Liveness,
        commands: crate::commands::CommandRouter,
        outbox: UnboundedSender<Outgoing>,
        keys: Keys,
    ) -> Result<Self, StoreError> {
        let fleet = Fleet::from_devices(store.load_devices()?);
        let workloads: BTreeMap<String, Entry> = store
            .load_workloads()?
            .into_iter()
            .map(|w| {
                let entry = Entry {
                    tenant: w.tenant,
                    manifest: w.manifest,
                    revisions: w.revisions,
                    latest: w.latest,
                    stable: w.stable,
                    rollout: w.rollout,
                };
                (entry.manifest.name.clone(), entry)
            })
            .collect();
        // The documents as published (services included), and the seals in them.
        let mut desired: BTreeMap<String, Desired> = BTreeMap::new();
        let mut sealed = SealCache::new();
        for (device, stored) in store.load_desired()? {
            let published = stored.payload.as_deref().and_then(|p| match baton_protocol::decode(p) {
                Ok((_, Message::SignedDesired(s))) => match baton_protocol::decode(&s.document) {
                    // Republished today it would be other bytes (signed with
                    // another key after a rotation, or encoded by an older
                    // protocol version): the same generation in other bytes is
                    // "not newer" to agents, so it is one generation on.
                    Ok((_, Message::Desired(mut d))) => {
                        if sign_desired(&keys, &device, &d).is_ok_and(|again| again != p) {
                            d.generation += 1;
                        }
                        Some(d)
                    }
                    _ => None,
                },
                _ => None,
            });
            let doc = published.unwrap_or(Desired {
                generation: stored.generation,
                workloads: stored.workloads,
                ..Default::default()
            });
            let key = fleet
                .devices()
                .find(|d| d.id == device)
                .and_then(|d| d.inventory.as_ref())
                .and_then(|i| <[u8; 32]>::try_from(i.sealing_key.as_slice()).ok());
            for w in &doc.workloads {
                for f in w.container.files.iter().filter(|f| f.is_sealed()) {
                    if let Some(key) = key {
                        let at = (device.clone(), w.name.clone(), w.revision, f.path.clone());
                        sealed.insert(at, (key, f.contents.clone()));
                    }
                }
            }
            desired.insert(device, doc);
        }
        // Replicas stay where the last documents put them.
        let mut schedule = Schedule::default();
        for (device, Desired { workloads: specs, .. }) in &desired {
            for s in specs {
                schedule.assignment.entry(s.name.clone()).or_default().insert(device.clone());
            }
        }
        let credentials = store.load_credentials()?;
        let api_tokens = store.api_tokens()?;
        tracing::info!(devices = fleet.len(), workloads = workloads.len(), "fleet loaded from store");
        Ok(Self {
            commands,
            outbox,
            state: Mutex::new(State {
                workloads,
                schedule,
                desired,
                serving: Serving::new(),
                gone: BTreeSet::new(),
                sealed,
                reasserted: BTreeMap::new(),
                behind: BTreeMap::new(),
            }),
            fleet: Mutex::new(fleet),
            store: Mutex::new(store),
            metrics: Metrics::default(),
            liveness,
            reschedule_after_ms: 300_000,
            registry: None,
            broker_connected: AtomicBool::new(false),
            keys,
            credentials: Mutex::new(credentials),
            api_auth: false,
            dynsec: false,
            swept_tokens: Mutex::new((BTreeSet::new(), 0)),
            api_tokens: Mutex::new(api_tokens),
            gateway: std::sync::OnceLock::new(),
        })
    }

    /// Applies a decoded device event and persists it when durable state changed.
    pub fn apply(&self, id: &DeviceId, event: FleetEvent, delivery: Delivery, now: Millis) -> Change {
        let is_presence = matches!(event, FleetEvent::Presence(_));
        let mut placement_relevant = matches!(event, FleetEvent::Presence(_) | FleetEvent::Inventory(_));
        let (change, snapshot) = {
            let mut fleet = lock(&self.fleet);
            let before = fleet.get(id).map(|d| d.presence.state);
            let refused_before = fleet.get(id).and_then(|d| d.refusal.clone());
            let change = fleet.apply(id, event, delivery, now);
            let after = fleet.get(id).map(|d| d.presence.state);
            if let Some(d) = fleet.get(id) {
                // A device that refuses its document says so to the operator, not
                // only in its own log: an event when the reason is new (or old news
                // from more than 10 minutes ago).
                let refused = d.refusal.as_ref().filter(|r| r.at_ms == now);
                let news = refused.is_some_and(|r| {
                    refused_before.as_ref().is_none_or(|b| b.reason != r.reason || now - b.at_ms > 600_000)
                });
                if let Some(r) = refused.filter(|_| news) {
                    let message = format!("refused its desired document: {}", r.reason);
                    self.event(&lock(&self.store), &d.tenant, "device", id.as_str(), message, now);
                }
            }
            if change == Change::Persist && before != after {
                placement_relevant = true;
                let what = match (before, after) {
                    (None, _) => "registered".to_string(),
                    (_, Some(PresenceState::Online)) if is_presence => "online".to_string(),
                    (_, Some(PresenceState::Online)) => "online again (heard from it without a new connection)".into(),
                    (_, _) => "offline".to_string(),
                };
                let tenant = fleet.get(id).map_or(crate::tenant::DEFAULT, |d| d.tenant.as_str());
                self.event(&lock(&self.store), tenant, "device", id.as_str(), what, now);
            }
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
                    self.sync_desired(now);
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

    pub fn devices(&self, now: Millis, scope: &Scope) -> Vec<DeviceView> {
        lock(&self.fleet)
            .devices()
            .filter(|d| scope.sees(&d.tenant))
            .map(|d| DeviceView::new(d, now, &self.liveness))
            .collect()
    }

    pub fn device(&self, id: &str, now: Millis, scope: &Scope) -> Result<DeviceView, OpError> {
        let id = parse_id(id)?;
        let fleet = lock(&self.fleet);
        let d = Self::visible_device(&fleet, &id, scope)?;
        Ok(DeviceView::new(d, now, &self.liveness))
    }

    /// A device `scope` may see; another tenant's device is "not found", as an unknown one.
    fn visible_device<'f>(fleet: &'f Fleet, id: &DeviceId, scope: &Scope) -> Result<&'f Device, OpError> {
        fleet
            .get(id)
            .filter(|d| scope.sees(&d.tenant))
            .ok_or_else(|| OpError::NotFound(format!("device {id} not found")))
    }

    /// The tenant of a known device.
    fn device_tenant(&self, id: &DeviceId) -> Option<String> {
        lock(&self.fleet).get(id).map(|d| d.tenant.clone())
    }

    pub fn relabel(&self, id: &str, change: &LabelChange, now: Millis, scope: &Scope) -> Result<DeviceView, OpError> {
        let id = parse_id(id)?;
        for (k, v) in &change.set {
            validate_label(k, v).map_err(OpError::Invalid)?;
        }
        let device = {
            let mut fleet = lock(&self.fleet);
            Self::visible_device(&fleet, &id, scope)?;
            fleet
                .relabel(&id, &change.set, &change.remove)
                .cloned()
                .ok_or_else(|| OpError::NotFound(format!("device {id} not found")))?
        };
        lock(&self.store).save_device(&device)?;
        self.metrics.store_writes.fetch_add(1, Relaxed);
        self.sync_desired(now);
        Ok(DeviceView::new(&device, now, &self.liveness))
    }

    /// `baton device assign ID TENANT`: moves a device to another tenant; its
    /// workloads leave it and the new tenant's arrive. Fleet-wide operators only.
    pub fn assign_device(&self, id: &str, tenant: &str, now: Millis, scope: &Scope) -> Result<DeviceView, OpError> {
        if *scope != Scope::All {
            return Err(OpError::Forbidden("only a fleet-wide token, acting for no tenant, moves devices".into()));
        }
        let id = parse_id(id)?;
        crate::tenant::validate(tenant).map_err(OpError::Invalid)?;
        let (device, from) = {
            let mut fleet = lock(&self.fleet);
            let from = fleet.get(&id).map(|d| d.tenant.clone());
            let device = fleet.assign(&id, tenant).cloned();
            (device.ok_or_else(|| OpError::NotFound(format!("device {id} not found")))?, from.unwrap_or_default())
        };
        let store = lock(&self.store);
        store.save_device(&device)?;
        self.event(&store, tenant, "device", id.as_str(), format!("moved from tenant {from} to tenant {tenant}"), now);
        drop(store);
        self.sync_desired(now);
        Ok(DeviceView::new(&device, now, &self.liveness))
    }

    /// Records an event: the store's log and the controller's own. `tenant`
    /// is the subject's (empty for fleet-wide subjects).
    fn event(&self, store: &Store, tenant: &str, kind: &str, subject: &str, message: String, now: Millis) {
        tracing::info!(kind, subject, tenant, "{message}");
        let e = Event { at_ms: now, kind: kind.into(), subject: subject.into(), message, tenant: tenant.into() };
        if let Err(err) = store.add_event(&e) {
            self.metrics.store_errors.fetch_add(1, Relaxed);
            tracing::error!(error = %err, "cannot record an event");
        }
    }

    pub fn events(&self, subject: Option<&str>, limit: usize, scope: &Scope) -> Result<Vec<Event>, OpError> {
        Ok(lock(&self.store).load_events(subject, scope.tenant(), limit)?)
    }

    fn snapshot(&self, now: Millis) -> Snapshot {
        let fleet = lock(&self.fleet);
        let facts = fleet.devices().map(|d| facts_of(d, now, &self.liveness, self.reschedule_after_ms)).collect();
        let sealing = fleet
            .devices()
            .filter_map(|d| {
                let key = d.inventory.as_ref().and_then(|i| <[u8; 32]>::try_from(i.sealing_key.as_slice()).ok())?;
                Some((d.id.clone(), key))
            })
            .collect();
        let applied = fleet.devices().map(|d| (d.id.clone(), d.applied_generation())).collect();
        Snapshot { facts, serving: self.serving_of(&fleet, now), sealing, applied, now }
    }

    fn serving_of(&self, fleet: &Fleet, now: Millis) -> Serving {
        let mut serving = Serving::new();
        for d in fleet.devices() {
            if d.status(now, &self.liveness) == Status::Offline {
                continue;
            }
            let address = d.inventory.as_ref().and_then(|i| i.addresses.first().cloned()).unwrap_or_default();
            for w in d.report.iter().flat_map(|r| &r.workloads) {
                if w.phase == baton_protocol::Phase::Running && w.health == baton_protocol::Health::Healthy {
                    serving.entry(w.name.clone()).or_default().push((d.id.clone(), address.clone(), w.revision));
                }
            }
        }
        serving
    }

    /// The endpoints of the services some workload uses.
    fn used_serving(st: &State, serving: &Serving) -> Serving {
        let used: BTreeSet<&String> = st.workloads.values().flat_map(|e| &e.manifest.uses).collect();
        serving.iter().filter(|(name, _)| used.contains(name)).map(|(k, v)| (k.clone(), v.clone())).collect()
    }

    /// Pins each workload's image to the digest its tag names now, so every
    /// device of a revision runs the same bytes. Blocking (registry HTTP): call
    /// off the async workers. A registry that cannot answer does not fail the
    /// apply: the digest already pinned for the same image is kept, else
    /// devices pull the tag; the returned note says which.
    pub fn pin_digests(&self, validated: &mut [Validated]) -> Vec<Pinned> {
        let mut notes = Vec::new();
        for v in validated.iter_mut() {
            let spec = &mut v.spec;
            if let Some((_, digest)) = spec.image.split_once('@') {
                spec.image_digest = digest.to_string();
                notes.push(Pinned::default());
                continue;
            }
            let Some(client) = &self.registry else {
                notes.push(Pinned::default());
                continue;
            };
            let mut platforms = None;
            let note = match client.resolve_platforms(&spec.image) {
                Ok((digest, offered)) => {
                    let note = format!("{} → {digest}", spec.image);
                    spec.image_digest = digest;
                    platforms = offered;
                    note
                }
                Err(e) => {
                    let known = lock(&self.state).workloads.get(&spec.name).and_then(|e| {
                        let latest = &e.revisions[&e.latest];
                        (latest.image == spec.image && !latest.image_digest.is_empty())
                            .then(|| latest.image_digest.clone())
                    });
                    match known {
                        Some(d) => {
                            let note = format!("cannot resolve {} ({e}); keeping {d}", spec.image);
                            spec.image_digest = d;
                            note
                        }
                        None => format!("cannot resolve {} ({e}); devices pull the tag", spec.image),
                    }
                }
            };
            notes.push(Pinned { note: Some(note), platforms });
        }
        notes
    }

    /// The devices `workload` is placed on whose platform `platforms` (what
    /// its image's index offers) lacks, with that platform: they would only
    /// fail at the pull. The apply says so; it still goes ahead (the missing
    /// platform may be pushed next, and other devices run it meanwhile).
    pub fn devices_without_platform(
        &self,
        workload: &str,
        platforms: &[String],
        now: Millis,
        scope: &Scope,
    ) -> Vec<(String, String)> {
        let Ok(w) = self.workload(workload, now, scope) else { return Vec::new() };
        let fleet = lock(&self.fleet);
        w.devices
            .iter()
            .filter_map(|d| {
                let inv = fleet.get(&DeviceId::new(d.device.clone()).ok()?)?.inventory.clone()?;
                let arch = match inv.arch.as_str() {
                    "x86_64" => "amd64",
                    "aarch64" => "arm64",
                    other => other,
                };
                let offered = platforms.iter().any(|p| {
                    let mut parts = p.split('/');
                    let (os, a, variant) = (parts.next(), parts.next(), parts.next());
                    os == Some("linux")
                        && a == Some(arch)
                        && (variant.is_none()
                            || inv.arch_variant.is_empty()
                            || variant == Some(inv.arch_variant.as_str()))
                });
                let wanted = if inv.arch_variant.is_empty() {
                    format!("linux/{arch}")
                } else {
                    format!("linux/{arch}/{}", inv.arch_variant)
                };
                (!offered).then(|| (d.device.clone(), wanted))
            })
            .collect()
    }

    /// Stores validated workloads (the caller validated every document first,
    /// so an invalid file stores nothing). A spec change makes a new revision
    /// and starts its rollout; a change of placement, replicas or strategy
    /// alone moves no container; applying the same file twice changes nothing.
    pub fn apply_workloads(
        &self,
        validated: Vec<Validated>,
        now: Millis,
        scope: &Scope,
    ) -> Result<Vec<ApplyResult>, OpError> {
        let snap = self.snapshot(now);
        let facts = &snap.facts;
        let mut st = lock(&self.state);
        let store = lock(&self.store);
        let tenant = scope.owner();
        let mut validated = validated;
        // Names are unique across tenants: one taken elsewhere refuses the whole apply.
        for v in &validated {
            if let Some(e) = st.workloads.get(&v.spec.name).filter(|e| e.tenant != tenant) {
                return Err(OpError::Invalid(match scope {
                    Scope::All => format!(
                        "workload {} belongs to tenant {}: apply it with --tenant {}",
                        v.spec.name, e.tenant, e.tenant
                    ),
                    Scope::Tenant(_) => format!("workload name {} is taken by another tenant", v.spec.name),
                }));
            }
        }
        // Read once: every workload of this apply pins against the same
        // versions, of this tenant's secrets only.
        let versions: BTreeMap<String, u64> =
            store.list_secrets()?.into_iter().filter(|s| s.tenant == tenant).map(|s| (s.name, s.version)).collect();
        for v in &mut validated {
            Self::pin_secret_versions(&versions, &mut v.spec)?;
        }
        // One transaction, and the in-memory state only changes with it: an
        // apply that cannot be stored whole (a full disk) leaves nothing of itself.
        let before = st.workloads.clone();
        let batch = store.batch()?;
        let stored = self
            .store_applied(&mut st, &store, validated, tenant, facts, now)
            .and_then(|applied| Ok(batch.commit().map(|()| applied)?));
        let (results, schedule) = match stored {
            Ok(applied) => applied,
            Err(e) => {
                st.workloads = before;
                return Err(e);
            }
        };
        crate::datadir::failpoint("apply:committed");
        drop(store);
        self.publish(&mut st, schedule, &snap);
        Ok(results)
    }

    /// The stores and state changes of `apply_workloads` (in its transaction):
    /// new revisions, changed manifests, rollouts started. Returns what
    /// happened to each workload and the placement that follows.
    fn store_applied(
        &self,
        st: &mut State,
        store: &Store,
        validated: Vec<Validated>,
        tenant: &str,
        facts: &[DeviceFacts],
        now: Millis,
    ) -> Result<(Vec<ApplyResult>, Schedule), OpError> {
        let mut results = Vec::new();
        // Workloads whose revision must now reach the fleet: (name, from, to).
        let mut roll = Vec::new();
        for v in validated {
            let name = v.spec.name.clone();
            let Some(e) = st.workloads.get_mut(&name) else {
                let spec = WorkloadSpec { revision: 1, ..v.spec };
                store.save_workload(tenant, &v.manifest, &spec, 1, now)?;
                store.save_revision(&spec, &[], now)?;
                self.event(store, tenant, "workload", &name, format!("created with image {}", spec.image), now);
                let entry = Entry {
                    tenant: tenant.into(),
                    manifest: v.manifest,
                    revisions: BTreeMap::from([(1, spec)]),
                    latest: 1,
                    stable: 1,
                    rollout: None,
                };
                st.workloads.insert(name.clone(), entry);
                results.push(ApplyResult { name, revision: 1, action: "created".into(), note: None });
                continue;
            };
            let same_spec = e
                .revisions
                .get(&e.latest)
                .is_some_and(|old| WorkloadSpec { revision: e.latest, ..v.spec.clone() } == *old);
            let action = if same_spec {
                let manifest_changed = e.manifest != v.manifest;
                e.manifest = v.manifest;
                // The newest revision was rolled back or aborted: applying it again retries it.
                let retry = e.latest != e.stable && e.active_rollout().is_none();
                if manifest_changed {
                    store.save_workload(&e.tenant, &e.manifest, &e.revisions[&e.latest], e.stable, now)?;
                }
                if retry {
                    roll.push((name.clone(), e.stable, e.latest));
                    "retried"
                } else if manifest_changed {
                    "configured"
                } else {
                    "unchanged"
                }
            } else {
                let revision = e.latest + 1;
                let spec = WorkloadSpec { revision, ..v.spec };
                e.manifest = v.manifest;
                e.latest = revision;
                if let Some(r) = e.rollout.as_mut().filter(|r| r.state.active()) {
                    r.supersede(revision, now);
                    store.save_rollout(r)?;
                }
                store.save_workload(&e.tenant, &e.manifest, &spec, e.stable, now)?;
                store.save_revision(&spec, &e.pinned(), now)?;
                e.revisions.insert(revision, spec);
                let keep = e.pinned();
                while e.revisions.len() > REVISION_HISTORY + keep.len() {
                    let Some(oldest) = e.revisions.keys().copied().find(|r| !keep.contains(r)) else { break };
                    e.revisions.remove(&oldest);
                }
                roll.push((name.clone(), e.stable, revision));
                "updated"
            };
            results.push(ApplyResult { name, revision: e.latest, action: action.into(), note: None });
        }
        let schedule = self.compute_schedule(st, facts);
        for (name, from, to) in roll {
            self.start_rollout(st, store, &schedule, facts, &name, from, to, now)?;
        }
        Ok((results, schedule))
    }

    /// Starts moving `name`'s devices from revision `from` to `to`: the
    /// devices placed now, reachable ones first (a canary that is away would
    /// hold the first wave), then by id.
    #[allow(clippy::too_many_arguments)]
    fn start_rollout(
        &self,
        st: &mut State,
        store: &Store,
        schedule: &Schedule,
        facts: &[DeviceFacts],
        name: &str,
        from: u64,
        to: u64,
        now: Millis,
    ) -> Result<(), OpError> {
        let Some(e) = st.workloads.get_mut(name) else { return Ok(()) };
        let placed = schedule.assignment.get(name).cloned().unwrap_or_default();
        let mut devices: Vec<&DeviceFacts> = facts.iter().filter(|d| placed.contains(&d.id)).collect();
        devices.sort_by(|a, b| (!a.reachable, &a.id).cmp(&(!b.reachable, &b.id)));
        if devices.is_empty() || from == to {
            // Nobody runs it: nothing to roll; the new revision is simply the one in force.
            e.stable = to;
            store.save_workload(&e.tenant, &e.manifest, &e.revisions[&e.latest], e.stable, now)?;
            let message = format!("revision {to} in force (no device runs {name} yet)");
            self.event(store, &e.tenant, "rollout", name, message, now);
            return Ok(());
        }
        let strategy = crate::workload::strategy(&e.manifest).unwrap_or_default();
        let ids = devices.iter().map(|d| d.id.clone()).collect();
        let r = Rollout::new(name, from, to, ids, strategy, now);
        store.save_rollout(&r)?;
        self.event(
            store,
            &e.tenant,
            "rollout",
            name,
            format!(
                "rollout of revision {to} (from {from}) started: {} devices in {} waves, first wave {}",
                r.devices.len(),
                r.wave_ends.len(),
                r.released()
            ),
            now,
        );
        e.rollout = Some(r);
        Ok(())
    }

    /// Points every secret file of a spec at its secret's current version, so
    /// a new secret version is a new revision (and rolls out like one).
    fn pin_secret_versions(versions: &BTreeMap<String, u64>, spec: &mut WorkloadSpec) -> Result<(), OpError> {
        for f in spec.container.files.iter_mut().filter(|f| f.is_sealed()) {
            let name = parse_secret_reference(&f.contents)
                .map(|(n, _)| n.to_string())
                .ok_or_else(|| OpError::Invalid(format!("{}: malformed secret reference", f.path)))?;
            let version = versions.get(&name).ok_or_else(|| {
                OpError::Invalid(format!(
                    "workload {}: secret {name} does not exist; create it with `baton secret create {name} --from-file FILE`",
                    spec.name
                ))
            })?;
            f.contents = secret_reference(&name, *version);
        }
        Ok(())
    }

    /// `baton secret create`: stores a new version (encrypted) and rolls every
    /// workload that uses the secret to a new revision.
    pub fn put_secret(&self, name: &str, value: &[u8], now: Millis, scope: &Scope) -> Result<SecretView, OpError> {
        if !crate::workload::valid_name(name) {
            return Err(OpError::Invalid(format!("{name:?}: secret names are 1-63 characters of a-z 0-9 -")));
        }
        if value.len() > crate::workload::MAX_FILES_BYTES {
            return Err(OpError::Invalid(format!(
                "secret of {} bytes; secrets travel inside desired documents, keep them under {}",
                value.len(),
                crate::workload::MAX_FILES_BYTES
            )));
        }
        let tenant = scope.owner();
        let users: Vec<Validated> = {
            let st = lock(&self.state);
            let mut store = lock(&self.store);
            let latest = store.secret_latest(name)?;
            if let Some(other) = latest.as_ref().filter(|s| s.tenant != tenant) {
                return Err(OpError::Invalid(match scope {
                    Scope::All => {
                        format!("secret {name} belongs to tenant {0}: set it with --tenant {0}", other.tenant)
                    }
                    Scope::Tenant(_) => format!("secret name {name} is taken by another tenant"),
                }));
            }
            let version = latest.map_or(0, |s| s.version) + 1;
            let data = crypto::encrypt(&self.keys.secrets, &secret_aad(name, version), value)
                .map_err(|e| OpError::Invalid(e.to_string()))?;
            store.put_secret(tenant, name, version, &data, now)?;
            self.event(&store, tenant, "secret", name, format!("version {version} set"), now);
            st.workloads
                .values()
                .filter(|e| e.tenant == tenant && e.manifest.secrets.iter().any(|s| s.name == name))
                .map(|e| Validated { manifest: e.manifest.clone(), spec: e.revisions[&e.latest].clone() })
                .collect()
        };
        if !users.is_empty() {
            for r in self.apply_workloads(users, now, &Scope::Tenant(tenant.into()))? {
                tracing::info!(workload = %r.name, revision = r.revision, action = %r.action, secret = name, "secret changed");
            }
        }
        self.secrets(scope)?.into_iter().find(|s| s.name == name).ok_or_else(|| OpError::NotFound(name.into()))
    }

    /// Every secret `scope` sees: name, version, when set, and the workloads
    /// using it. Never values.
    pub fn secrets(&self, scope: &Scope) -> Result<Vec<SecretView>, OpError> {
        let st = lock(&self.state);
        let list = lock(&self.store).list_secrets()?;
        Ok(list
            .into_iter()
            .filter(|s| scope.sees(&s.tenant))
            .map(|s| SecretView {
                used_by: st
                    .workloads
                    .values()
                    .filter(|e| e.tenant == s.tenant && e.manifest.secrets.iter().any(|m| m.name == s.name))
                    .map(|e| e.manifest.name.clone())
                    .collect(),
                name: s.name,
                tenant: s.tenant,
                version: s.version,
                updated_at_ms: s.updated_at,
            })
            .collect())
    }

    /// `baton device credentials ID`: a new MQTT password for a device (the
    /// old one stops working, and its connections are cut). Returned once;
    /// only its hash is kept.
    /// A device not known yet is registered (offline) in the caller's tenant;
    /// another tenant's device is "not found".
    pub fn issue_credentials(&self, id: &str, now: Millis, scope: &Scope) -> Result<String, OpError> {
        let device = parse_id(id)?;
        let (tenant, registered) = {
            let mut fleet = lock(&self.fleet);
            match fleet.get(&device) {
                Some(_) => (Self::visible_device(&fleet, &device, scope)?.tenant.clone(), None),
                None => {
                    fleet.register(&device, Vec::new(), BTreeMap::new(), scope.owner(), now);
                    (scope.owner().to_string(), fleet.get(&device).cloned())
                }
            }
        };
        if let Some(d) = registered {
            self.persist(&d);
        }
        let password = self.new_credentials(&device, &tenant, now)?;
        if let Some(g) = self.gateway.get() {
            g.disconnect(id);
        }
        Ok(password)
    }

    /// Stores a new password for a device of `tenant` and returns it.
    fn new_credentials(&self, id: &DeviceId, tenant: &str, now: Millis) -> Result<String, OpError> {
        let (_, password, hash) = crate::keys::new_secret().map_err(|e| OpError::Invalid(e.to_string()))?;
        let store = lock(&self.store);
        store.save_credentials(id.as_str(), &hash, now)?;
        self.event(&store, tenant, "device", id.as_str(), "credentials issued".into(), now);
        drop(store);
        lock(&self.credentials).insert(id.as_str().to_owned(), hash);
        self.dynsec_send(|| crate::dynsec::device(id.as_str(), &password));
        Ok(password)
    }

    /// `baton apitoken create`: an operator token (`admin` or `read-only`),
    /// `baton-api.<id>.<secret>`, shown once.
    /// The token acts for the caller's tenant; a fleet-wide caller acting
    /// for no tenant makes a fleet-wide token.
    pub fn create_api_token(
        &self,
        role: &str,
        name: &str,
        now: Millis,
        scope: &Scope,
    ) -> Result<(String, crate::store::ApiToken), OpError> {
        if role != ROLE_ADMIN && role != ROLE_READ_ONLY {
            return Err(OpError::Invalid(format!("role {role:?}: use {ROLE_ADMIN} or {ROLE_READ_ONLY}")));
        }
        let (id, secret, hash) = crate::keys::new_secret().map_err(|e| OpError::Invalid(e.to_string()))?;
        let tenant = scope.tenant().map(str::to_string);
        let t =
            crate::store::ApiToken { id: id.clone(), role: role.into(), name: name.into(), created_at: now, tenant };
        let store = lock(&self.store);
        store.save_api_token(&t, &hash)?;
        let tenant = t.tenant.as_deref().unwrap_or_default();
        self.event(&store, tenant, "apitoken", &id, format!("{role} token {name:?} created"), now);
        drop(store);
        lock(&self.api_tokens).push((t.clone(), hash));
        Ok((format!("baton-api.{id}.{secret}"), t))
    }

    /// A tenant's tokens, or (fleet-wide) every token.
    pub fn api_token_list(&self, scope: &Scope) -> Vec<crate::store::ApiToken> {
        lock(&self.api_tokens).iter().filter(|(t, _)| api_token_visible(t, scope)).map(|(t, _)| t.clone()).collect()
    }

    pub fn delete_api_token(&self, id: &str, now: Millis, scope: &Scope) -> Result<(), OpError> {
        let not_found = || OpError::NotFound(format!("API token {id} not found"));
        let tenant = lock(&self.api_tokens)
            .iter()
            .find(|(t, _)| t.id == id && api_token_visible(t, scope))
            .map(|(t, _)| t.tenant.clone().unwrap_or_default())
            .ok_or_else(not_found)?;
        let store = lock(&self.store);
        if !store.delete_api_token(id)? {
            return Err(not_found());
        }
        self.event(&store, &tenant, "apitoken", id, "revoked".into(), now);
        drop(store);
        lock(&self.api_tokens).retain(|(t, _)| t.id != id);
        Ok(())
    }

    /// The role and tenant (`None`: fleet-wide) of a bearer token, or why it is not accepted.
    pub fn authorize(&self, bearer: Option<&str>) -> Result<(String, Option<String>), String> {
        let token = bearer.ok_or("this controller requires an API token: pass --token or set BATON_TOKEN")?;
        let mut parts = token.trim().split('.');
        let (Some("baton-api"), Some(id), Some(secret), None) =
            (parts.next(), parts.next(), parts.next(), parts.next())
        else {
            return Err("malformed API token".into());
        };
        let hash = crate::keys::sha256(secret.as_bytes());
        lock(&self.api_tokens)
            .iter()
            .find(|(t, h)| t.id == id && same_hash(h, &hash))
            .map(|(t, _)| (t.role.clone(), t.tenant.clone()))
            .ok_or_else(|| "unknown or revoked API token".into())
    }

    /// With `--api-auth` and no admin token yet: makes one and writes it to
    /// `path` (0600), so the operator on this machine can start.
    pub fn ensure_admin_token(&self, path: &std::path::Path, now: Millis) -> anyhow::Result<()> {
        if lock(&self.api_tokens).iter().any(|(t, _)| t.role == ROLE_ADMIN && t.tenant.is_none()) {
            return Ok(());
        }
        let (token, _) =
            self.create_api_token(ROLE_ADMIN, "first admin", now, &Scope::All).map_err(|e| anyhow::anyhow!("{e}"))?;
        crate::keys::write_private(path, format!("{token}\n").as_bytes())?;
        tracing::warn!(path = %path.display(), "created the first admin API token (BATON_TOKEN=$(cat FILE))");
        Ok(())
    }

    /// `baton token create`: a join token. Returned once as
    /// `baton1.<id>.<secret>.<controller signing key>`; only the secret's hash is kept.
    pub fn create_token(
        &self,
        ttl_s: u64,
        uses: u32,
        labels: BTreeMap<String, String>,
        now: Millis,
        scope: &Scope,
    ) -> Result<(String, crate::store::StoredToken), OpError> {
        if uses == 0 || ttl_s == 0 {
            return Err(OpError::Invalid("a token needs at least one use and a lifetime".into()));
        }
        for (k, v) in &labels {
            validate_label(k, v).map_err(OpError::Invalid)?;
        }
        let (id, secret, hash) = crate::keys::new_secret().map_err(|e| OpError::Invalid(e.to_string()))?;
        let t = crate::store::StoredToken {
            id: id.clone(),
            expires_at: now.saturating_add(ttl_s.saturating_mul(1000)),
            uses_left: uses,
            labels,
            created_at: now,
            tenant: scope.owner().into(),
        };
        let store = lock(&self.store);
        store.save_token(&t, &hash)?;
        self.event(&store, &t.tenant, "token", &id, format!("created: {uses} use(s), expires in {ttl_s} s"), now);
        drop(store);
        self.dynsec_send(|| crate::dynsec::join_token(&id, &secret));
        Ok((format!("baton1.{id}.{secret}.{}", crypto::hex(&self.keys.signing.public())), t))
    }

    pub fn tokens(&self, scope: &Scope) -> Result<Vec<crate::store::StoredToken>, OpError> {
        Ok(lock(&self.store).tokens()?.into_iter().filter(|t| scope.sees(&t.tenant)).collect())
    }

    pub fn delete_token(&self, id: &str, now: Millis, scope: &Scope) -> Result<(), OpError> {
        let store = lock(&self.store);
        let not_found = || OpError::NotFound(format!("token {id} not found"));
        let (t, _) = store.token(id)?.filter(|(t, _)| scope.sees(&t.tenant)).ok_or_else(not_found)?;
        if !store.delete_token(id)? {
            return Err(not_found());
        }
        self.event(&store, &t.tenant, "token", id, "deleted".into(), now);
        self.dynsec_send(|| crate::dynsec::remove_join(id));
        Ok(())
    }

    /// Queues a dynamic-security batch when Mosquitto keeps the accounts.
    fn dynsec_send(&self, batch: impl FnOnce() -> Vec<u8>) {
        if self.dynsec {
            let _ = self.outbox.send(Outgoing::Dynsec(batch()));
        }
    }

    /// With `--broker-dynsec`, every 30 s: join accounts of tokens used up or
    /// expired are removed (not at the join itself: the joining session must
    /// still receive its answer).
    fn sweep_join_accounts(&self, now: Millis) {
        if !self.dynsec {
            return;
        }
        let mut swept = lock(&self.swept_tokens);
        if now.saturating_sub(swept.1) < 30_000 {
            return;
        }
        swept.1 = now;
        let tokens = match lock(&self.store).tokens() {
            Ok(t) => t,
            Err(e) => return tracing::warn!(error = %e, "cannot list join tokens"),
        };
        for t in tokens.iter().filter(|t| t.uses_left == 0 || now >= t.expires_at) {
            if swept.0.insert(t.id.clone()) {
                let _ = self.outbox.send(Outgoing::Dynsec(crate::dynsec::remove_join(&t.id)));
            }
        }
    }

    /// A token that admits a join right now: known, this secret, unexpired, uses left.
    fn valid_token(&self, id: &str, secret: &[u8], now: Millis) -> Result<crate::store::StoredToken, String> {
        let (t, hash) = lock(&self.store).token(id).map_err(|e| e.to_string())?.ok_or("unknown token")?;
        if !same_hash(&hash, &crate::keys::sha256(secret)) {
            return Err("wrong token secret".into());
        }
        if now >= t.expires_at {
            return Err("token expired".into());
        }
        if t.uses_left == 0 {
            return Err("token used up".into());
        }
        Ok(t)
    }

    /// A device joining with a token (`enroll` topic): spends one use, issues
    /// its MQTT password sealed to the key it sent, registers it with the
    /// token's labels and that key. Every refusal is answered with its reason.
    pub fn enroll(
        &self,
        id: &DeviceId,
        req: &baton_protocol::EnrollRequest,
        now: Millis,
    ) -> baton_protocol::EnrollResponse {
        let refuse = |why: String| {
            tracing::warn!(device = %id, %why, "enrollment refused");
            baton_protocol::EnrollResponse { sealed_password: Vec::new(), error: Some(why) }
        };
        let token = match self.valid_token(&req.token_id, req.token_secret.as_bytes(), now) {
            Ok(t) => t,
            Err(why) => return refuse(why),
        };
        let Ok(key) = <[u8; 32]>::try_from(req.sealing_key.as_slice()) else {
            return refuse("the request carries no 32-byte sealing key".into());
        };
        if lock(&self.credentials).contains_key(id.as_str()) {
            return refuse(format!(
                "device {id} is already enrolled; `baton device revoke {id}` first to enroll it again"
            ));
        }
        // A token of one tenant cannot take over another tenant's device.
        if self.device_tenant(id).is_some_and(|t| t != token.tenant) {
            return refuse(format!("device id {id} is taken"));
        }
        match lock(&self.store).spend_token(&token.id) {
            Ok(true) => {}
            Ok(false) => return refuse("token used up".into()),
            Err(e) => return refuse(e.to_string()),
        }
        // Not `issue_credentials`: that would cut this very (join) session.
        let password = match self.new_credentials(id, &token.tenant, now) {
            Ok(p) => p,
            Err(e) => return refuse(e.to_string()),
        };
        let sealed =
            match crypto::seal(&key, &crypto::secret_context(id.as_str(), "enroll", "password"), password.as_bytes()) {
                Ok(s) => s,
                Err(e) => return refuse(e.to_string()),
            };
        let device = {
            let mut fleet = lock(&self.fleet);
            fleet.register(id, req.sealing_key.clone(), token.labels.clone(), &token.tenant, now);
            fleet.get(id).cloned()
        };
        if let Some(d) = device {
            self.persist(&d);
        }
        let message = format!("enrolled with token {}", token.id);
        self.event(&lock(&self.store), &token.tenant, "device", id.as_str(), message, now);
        baton_protocol::EnrollResponse { sealed_password: sealed, error: None }
    }

    /// `baton device revoke ID`: the device can no longer connect, and its
    /// open connections are cut.
    /// A tenant may revoke only its own devices; a fleet-wide operator any
    /// id, known or not.
    pub fn revoke_device(&self, id: &str, now: Millis, scope: &Scope) -> Result<(), OpError> {
        let id = parse_id(id)?;
        let tenant = match (self.device_tenant(&id), scope) {
            (Some(t), s) if s.sees(&t) => t,
            (None, Scope::All) => crate::tenant::default_tenant(),
            _ => return Err(OpError::NotFound(format!("device {id} not found"))),
        };
        let store = lock(&self.store);
        let had = store.revoke(id.as_str(), now)?;
        self.event(&store, &tenant, "device", id.as_str(), "revoked".into(), now);
        drop(store);
        lock(&self.credentials).remove(id.as_str());
        if let Some(g) = self.gateway.get() {
            g.disconnect(id.as_str());
        }
        self.dynsec_send(|| crate::dynsec::remove_device(id.as_str()));
        // Its Last Will may never come (a broker drops it once the account is
        // gone): the controller says "offline" for it, retained, as the Will would.
        let last = lock(&self.fleet).get(&id).map(|d| d.presence.clone());
        if let Some(p) = last.filter(|p| p.state == PresenceState::Online) {
            let offline = baton_protocol::Presence { state: PresenceState::Offline, ..p };
            if let Ok(bytes) = encode(&Message::Presence(offline.clone())) {
                let _ = self.outbox.send(Outgoing::Retained(id.topic(baton_protocol::TopicKind::Presence), bytes));
            }
            self.apply(&id, FleetEvent::Presence(offline), Delivery::Live, now);
        }
        if !had {
            tracing::info!(device = %id, "revoked a device that had no credentials");
        }
        Ok(())
    }

    /// Deletes a secret no workload uses.
    pub fn delete_secret(&self, name: &str, now: Millis, scope: &Scope) -> Result<(), OpError> {
        let secret = self
            .secrets(scope)?
            .into_iter()
            .find(|s| s.name == name)
            .ok_or_else(|| OpError::NotFound(format!("secret {name} not found")))?;
        let users = secret.used_by;
        if !users.is_empty() {
            return Err(OpError::Invalid(format!(
                "secret {name} is used by {}; change or delete them first",
                users.join(", ")
            )));
        }
        let store = lock(&self.store);
        if !store.delete_secret(name)? {
            return Err(OpError::NotFound(format!("secret {name} not found")));
        }
        self.event(&store, &secret.tenant, "secret", name, "deleted".into(), now);
        Ok(())
    }

    pub fn delete_workload(&self, name: &str, now: Millis, scope: &Scope) -> Result<(), OpError> {
        {
            let mut st = lock(&self.state);
            let tenant = Self::visible_workload(&st, name, scope)?.tenant.clone();
            st.workloads.remove(name);
            let store = lock(&self.store);
            store.delete_workload(name)?;
            self.event(&store, &tenant, "workload", name, "deleted".into(), now);
        }
        self.sync_desired(now);
        Ok(())
    }

    /// `baton scale`: the number of devices a workload runs on.
    pub fn scale(&self, name: &str, replicas: u32, now: Millis, scope: &Scope) -> Result<WorkloadView, OpError> {
        if replicas == 0 {
            return Err(OpError::Invalid("replicas must be at least 1 (delete the workload to run it nowhere)".into()));
        }
        {
            let mut st = lock(&self.state);
            let e = Self::visible_workload_mut(&mut st, name, scope)?;
            let before = e.manifest.replicas;
            e.manifest.replicas = Some(replicas);
            let store = lock(&self.store);
            store.save_workload(&e.tenant, &e.manifest, &e.revisions[&e.latest], e.stable, now)?;
            let was = before.map_or_else(|| "every device".to_string(), |n| n.to_string());
            self.event(&store, &e.tenant, "workload", name, format!("scaled from {was} to {replicas} replicas"), now);
        }
        self.sync_desired(now);
        self.workload(name, now, scope)
    }

    /// `baton rollout pause|resume|abort|undo`.
    pub fn rollout_action(&self, name: &str, action: &str, now: Millis, scope: &Scope) -> Result<RolloutView, OpError> {
        let snap = self.snapshot(now);
        let facts = &snap.facts;
        let mut st = lock(&self.state);
        let store = lock(&self.store);
        let e = Self::visible_workload_mut(&mut st, name, scope)?;
        let tenant = e.tenant.clone();
        let no_rollout = || OpError::Invalid(format!("workload {name} has no rollout"));
        let message = match action {
            "pause" | "resume" | "abort" => {
                let r = e.rollout.as_mut().ok_or_else(no_rollout)?;
                match action {
                    "pause" => r.pause(),
                    "resume" => r.resume(),
                    _ => r.abort(now),
                }
                .map_err(OpError::Invalid)?;
                store.save_rollout(r)?;
                match action {
                    "pause" => format!("rollout of revision {} paused", r.to),
                    "resume" => format!("rollout of revision {} resumed", r.to),
                    _ => format!("rollout of revision {} aborted: devices go back to revision {}", r.to, r.from),
                }
            }
            "undo" => {
                if let Some(r) = e.rollout.as_mut().filter(|r| r.state.active()) {
                    r.abort(now).map_err(OpError::Invalid)?;
                    store.save_rollout(r)?;
                    format!("rollout of revision {} undone: back to revision {}", r.to, r.from)
                } else {
                    let previous =
                        e.revisions.range(..e.stable).next_back().map(|(_, s)| s.clone()).ok_or_else(|| {
                            OpError::Invalid(format!("workload {name} has no revision before {}", e.stable))
                        })?;
                    let revision = e.latest + 1;
                    let spec = WorkloadSpec { revision, ..previous.clone() };
                    e.latest = revision;
                    store.save_workload(&e.tenant, &e.manifest, &spec, e.stable, now)?;
                    store.save_revision(&spec, &e.pinned(), now)?;
                    e.revisions.insert(revision, spec);
                    let from = e.stable;
                    let schedule = self.compute_schedule(&st, facts);
                    self.start_rollout(&mut st, &store, &schedule, facts, name, from, revision, now)?;
                    format!("undo: revision {revision} restores the spec of revision {}", previous.revision)
                }
            }
            other => return Err(OpError::Invalid(format!("unknown rollout action {other:?}"))),
        };
        self.event(&store, &tenant, "rollout", name, message, now);
        drop(store);
        let view = st.workloads.get(name).and_then(|e| e.rollout.as_ref()).map(RolloutView::new);
        let schedule = self.compute_schedule(&st, facts);
        self.publish(&mut st, schedule, &snap);
        view.ok_or_else(|| OpError::Invalid(format!("workload {name} has no rollout")))
    }

    /// Advances every rollout on what devices reported, and moves replicas
    /// off devices gone past the grace period. Called about once a second.
    pub fn tick(&self, now: Millis) {
        self.sweep_join_accounts(now);
        let mut changed = self.expire_silent(now);
        {
            let fleet = lock(&self.fleet);
            let mut st = lock(&self.state);
            let rolling = st.workloads.values().any(|e| e.active_rollout().is_some());
            let devices: std::collections::HashMap<&str, &Device> =
                if rolling { fleet.devices().map(|d| (d.id.as_str(), d)).collect() } else { Default::default() };
            let store = lock(&self.store);
            for (name, e) in st.workloads.iter_mut().filter(|(_, e)| e.active_rollout().is_some()) {
                let Some(r) = e.rollout.as_mut().filter(|r| r.state.active()) else { continue };
                let observe = |id: &str| -> Observation {
                    let Some(d) = devices.get(id) else { return Observation::default() };
                    Observation {
                        online: d.status(now, &self.liveness) == Status::Online,
                        status: d.report.as_ref().and_then(|r| r.workloads.iter().find(|w| &w.name == name).cloned()),
                    }
                };
                let events = r.step(now, observe);
                if events.is_empty() {
                    continue;
                }
                changed = true;
                if let Err(err) = store.save_rollout(r) {
                    tracing::error!(workload = %name, error = %err, "cannot store rollout progress");
                }
                if r.state == RolloutState::Succeeded {
                    e.stable = r.to;
                    if let Err(err) =
                        store.save_workload(&e.tenant, &e.manifest, &e.revisions[&e.latest], e.stable, now)
                    {
                        tracing::error!(workload = %name, error = %err, "cannot store the stable revision");
                    }
                }
                for message in events {
                    self.event(&store, &e.tenant, "rollout", name, message, now);
                }
            }
            drop(store);
            let gone: BTreeSet<String> =
                fleet.devices().filter(|d| is_gone(d, now, self.reschedule_after_ms)).map(|d| d.id.clone()).collect();
            changed |= gone != st.gone;
            // A device ahead of the document this controller issued it (see `publish`).
            changed |= fleet
                .devices()
                .any(|d| st.desired.get(&d.id).is_some_and(|doc| d.applied_generation() > doc.generation));
            self.resend_to_devices_behind(&fleet, &mut st, now);
            // Endpoints moved (an instance turned healthy or stopped being so),
            // for services some workload uses.
            if st.workloads.values().any(|e| !e.manifest.uses.is_empty()) {
                changed |= Self::used_serving(&st, &self.serving_of(&fleet, now)) != st.serving;
            }
        }
        if changed {
            self.sync_desired(now);
        }
    }

    /// An online device that has not applied the document it was given for a
    /// minute gets it again (a message lost on the way: an agent killed
    /// between receiving and keeping it, a broker that lost its retained copy).
    /// Every minute while it stays behind; a refusal shows as an event.
    fn resend_to_devices_behind(&self, fleet: &Fleet, st: &mut State, now: Millis) {
        let behind: BTreeSet<&str> = fleet
            .devices()
            .filter(|d| d.status(now, &self.liveness) == Status::Online)
            .filter(|d| st.desired.get(&d.id).is_some_and(|doc| d.applied_generation() < doc.generation))
            .map(|d| d.id.as_str())
            .collect();
        st.behind.retain(|id, _| behind.contains(id.as_str()));
        for id in behind {
            let since = st.behind.entry(id.to_string()).or_insert(now);
            if now.saturating_sub(*since) < RESEND_BEHIND_MS {
                continue;
            }
            *since = now;
            let (Some(doc), Ok(device)) = (st.desired.get(id), DeviceId::new(id)) else { continue };
            if let Ok(payload) = self.sign(id, doc) {
                tracing::info!(
                    device = id,
                    generation = doc.generation,
                    "device still behind its document: sending it again"
                );
                let _ = self.outbox.send(Outgoing::Desired(device, payload));
            }
        }
    }

    /// Devices silent past `offline_after` are offline, whatever the broker
    /// said (it may have lost their Last Will): stored, and recorded as an event.
    fn expire_silent(&self, now: Millis) -> bool {
        let expired = lock(&self.fleet).expire_silent(now, &self.liveness);
        for d in &expired {
            self.persist(d);
            let silent_s = now.saturating_sub(d.last_seen.max(self.liveness.since_ms)) / 1000;
            let why = format!("offline: silent for {silent_s} s (no goodbye and no Last Will received)");
            self.event(&lock(&self.store), &d.tenant, "device", &d.id, why, now);
        }
        !expired.is_empty()
    }

    fn compute_schedule(&self, st: &State, facts: &[DeviceFacts]) -> Schedule {
        let placed: Vec<Placed> = st
            .workloads
            .values()
            .map(|e| Placed {
                tenant: e.tenant.clone(),
                spec: e.revisions[&e.latest].clone(),
                placement: e.manifest.placement.clone(),
                replicas: e.manifest.replicas,
            })
            .collect();
        schedule(facts, &placed, &st.schedule.assignment)
    }

    /// Recomputes placement and every device's desired document; stores and
    /// publishes the ones that changed, each with the next generation.
    pub fn sync_desired(&self, now: Millis) {
        let snap = self.snapshot(now);
        let mut st = lock(&self.state);
        let schedule = self.compute_schedule(&st, &snap.facts);
        self.publish(&mut st, schedule, &snap);
    }

    /// Each used service's endpoints: its healthy instances on devices it is
    /// placed on, one per named port of the revision they run.
    fn endpoints(st: &State, schedule: &Schedule, serving: &Serving) -> BTreeMap<String, Vec<Endpoint>> {
        let mut out = BTreeMap::new();
        for (name, instances) in serving {
            let Some(e) = st.workloads.get(name) else { continue };
            let placed = schedule.assignment.get(name);
            let mut endpoints = Vec::new();
            for (device, address, revision) in instances {
                if !placed.is_some_and(|p| p.contains(device)) {
                    continue;
                }
                let spec = e.revisions.get(revision).or_else(|| e.revisions.get(&e.latest));
                for p in spec.iter().flat_map(|s| &s.container.ports) {
                    endpoints.push(Endpoint {
                        device: device.clone(),
                        address: address.clone(),
                        port_name: p.name.clone(),
                        port: p.port,
                    });
                }
            }
            out.insert(name.clone(), endpoints);
        }
        out
    }

    fn publish(&self, st: &mut State, schedule: Schedule, snap: &Snapshot) {
        let facts = &snap.facts;
        let serving = Self::used_serving(st, &snap.serving);
        let endpoints = Self::endpoints(st, &schedule, &serving);
        for (name, n) in &schedule.unplaced {
            if st.schedule.unplaced.get(name) != Some(n) {
                tracing::warn!(workload = %name, replicas = n, "replicas fit on no device");
            }
        }
        // Which devices each active rollout has released.
        let released: BTreeMap<&str, BTreeSet<&str>> = st
            .workloads
            .iter()
            .filter_map(|(n, e)| e.active_rollout().map(|r| (n.as_str(), r.released_set())))
            .collect();
        let by_device = schedule.by_device();
        let mut docs = Vec::new();
        for d in facts {
            let mut specs = Vec::new();
            for name in by_device.get(d.id.as_str()).into_iter().flatten() {
                let Some(e) = st.workloads.get(*name) else { continue };
                let revision = match e.active_rollout() {
                    Some(r) => r.revision_for(released.get(name).is_some_and(|s| s.contains(d.id.as_str()))),
                    None => e.stable,
                };
                if let Some(spec) = e.revisions.get(&revision).or_else(|| e.revisions.get(&e.latest)) {
                    specs.push(spec.clone());
                }
            }
            specs.sort_by(|a, b| a.name.cmp(&b.name));
            let mut services: BTreeMap<&str, ServiceEndpoints> = BTreeMap::new();
            for spec in &specs {
                let Some(consumer) = st.workloads.get(&spec.name) else { continue };
                for service in &consumer.manifest.uses {
                    // Another tenant's workload of that name is not a service of this one.
                    let own = st.workloads.get(service).is_some_and(|e| e.tenant == consumer.tenant);
                    let entry = services.entry(service.as_str()).or_insert_with(|| ServiceEndpoints {
                        name: service.clone(),
                        consumers: Vec::new(),
                        endpoints: endpoints.get(service).filter(|_| own).cloned().unwrap_or_default(),
                    });
                    entry.consumers.push(spec.name.clone());
                }
            }
            docs.push((d.id.clone(), specs, services.into_values().collect::<Vec<_>>()));
        }
        st.serving = serving;
        st.gone = facts.iter().filter(|d| d.gone).map(|d| d.id.clone()).collect();
        st.schedule = schedule;
        let store = lock(&self.store);
        let mut cache = std::mem::take(&mut st.sealed);
        let mut sealed = SealCache::new();
        for (device, workloads, services) in docs {
            let workloads = self.seal(&store, &mut cache, &mut sealed, &device, snap.sealing.get(&device), workloads);
            let stored = st.desired.get(&device).map_or(0, |d| d.generation);
            // A device with a newer generation in force than the last this
            // controller issued it: the store was restored from a backup (or
            // rebuilt with the same key). It would refuse anything numbered
            // below, so its document is issued again past its generation.
            let applied = snap.applied.get(&device).copied().unwrap_or(0);
            let ahead = applied > stored;
            // Unchanged, or nothing to say to a device that never had a
            // document (a rebuilt store does not empty a device it knows nothing of).
            let unchanged = match st.desired.get(&device) {
                Some(d) => d.workloads == workloads && d.services == services && !ahead,
                None => workloads.is_empty(),
            };
            if unchanged {
                continue;
            }
            let generation = stored.max(applied).saturating_add(1);
            if ahead {
                let tenant = snap.facts.iter().find(|f| f.id == device).map_or("", |f| f.tenant.as_str());
                let message = format!(
                    "has generation {applied} in force, newer than the {stored} this controller issued \
                     (store restored from a backup?): its document is issued again as generation {generation}"
                );
                self.event(&store, tenant, "device", &device, message, snap.now);
            }
            let doc = Desired { generation, workloads, services, issued_ms: snap.now };
            let payload = match self.sign(&device, &doc) {
                Ok(p) => p,
                Err(e) => {
                    tracing::error!(%device, error = %e, "cannot encode a desired document; not publishing it");
                    continue;
                }
            };
            if let Err(e) = store.save_desired(&device, generation, &doc.workloads, &payload) {
                self.metrics.store_errors.fetch_add(1, Relaxed);
                tracing::error!(%device, error = %e, "cannot store a desired document; not publishing it");
                continue;
            }
            tracing::debug!(%device, generation, workloads = doc.workloads.len(), "desired document changed");
            if let Ok(id) = DeviceId::new(device.clone()) {
                let _ = self.outbox.send(Outgoing::Desired(id, payload));
            }
            st.desired.insert(device, doc);
        }
        // Seals of documents no longer published are dropped.
        st.sealed = sealed;
    }

    /// The document as it travels: encoded, then signed for `device`.
    fn sign(&self, device: &str, doc: &Desired) -> Result<Vec<u8>, baton_protocol::codec::EncodeError> {
        sign_desired(&self.keys, device, doc)
    }

    /// Seals every secret file of `specs` to `device`'s key, reusing earlier
    /// seals. A workload whose secrets cannot be sealed (the device never
    /// reported a key, or the secret version is gone) is left out of the
    /// device's document, with a warning: it never runs without its secrets.
    fn seal(
        &self,
        store: &Store,
        cache: &mut SealCache,
        used: &mut SealCache,
        device: &str,
        key: Option<&[u8; 32]>,
        specs: Vec<WorkloadSpec>,
    ) -> Vec<WorkloadSpec> {
        let mut out = Vec::with_capacity(specs.len());
        'spec: for mut spec in specs {
            for i in 0..spec.container.files.len() {
                let file = &spec.container.files[i];
                if !file.is_sealed() {
                    continue;
                }
                let at = (device.to_string(), spec.name.clone(), spec.revision, file.path.clone());
                let Some(key) = key else {
                    tracing::warn!(%device, workload = %spec.name, "device reported no sealing key (agent too old?): workload with secrets not sent");
                    continue 'spec;
                };
                let contents = match cache.remove(&at).filter(|(k, _)| k == key) {
                    Some((_, c)) => c,
                    None => match self.seal_file(store, device, &spec.name, file, key) {
                        Ok(c) => c,
                        Err(why) => {
                            tracing::warn!(%device, workload = %spec.name, path = %file.path, %why, "cannot seal a secret: workload not sent");
                            continue 'spec;
                        }
                    },
                };
                used.insert(at, (*key, contents.clone()));
                spec.container.files[i].contents = contents;
            }
            out.push(spec);
        }
        out
    }

    fn seal_file(
        &self,
        store: &Store,
        device: &str,
        workload: &str,
        file: &File,
        key: &[u8; 32],
    ) -> Result<Vec<u8>, String> {
        let (name, version) =
            parse_secret_reference(&file.contents).ok_or_else(|| "malformed secret reference".to_string())?;
        let value = self.secret_value(store, name, version)?;
        crypto::seal(key, &crypto::secret_context(device, workload, &file.path), &value).map_err(|e| e.to_string())
    }

    fn secret_value(&self, store: &Store, name: &str, version: u64) -> Result<Vec<u8>, String> {
        let data = store
            .secret(name, version)
            .map_err(|e| e.to_string())?
            .ok_or_else(|| format!("secret {name} version {version} no longer exists"))?;
        crypto::decrypt(&self.keys.secrets, &secret_aad(name, version), &data)
            .map_err(|_| format!("secret {name} version {version} does not decrypt with this controller's secrets key"))
    }

    /// What the broker holds on a device's `desired` topic (the controller
    /// subscribes to them): if it is not the document this controller issued
    /// (garbage, a forgery, a copy from another store), it is published again,
    /// at most once every 10 s per device (two publishers would otherwise
    /// fight over the topic as fast as the broker goes).
    pub fn check_desired(&self, id: &DeviceId, payload: &[u8], now: Millis) {
        let mut st = lock(&self.state);
        let Some(doc) = st.desired.get(id.as_str()) else { return };
        let Ok(ours) = self.sign(id.as_str(), doc) else { return };
        if ours == payload || self.own_older_document(id.as_str(), payload, doc.generation) {
            return;
        }
        let last = st.reasserted.get(id.as_str()).copied().unwrap_or(0);
        if now.saturating_sub(last) < 10_000 {
            return;
        }
        st.reasserted.insert(id.to_string(), now);
        tracing::warn!(device = %id, len = payload.len(), "the broker held a desired document this controller did not issue; publishing its own again");
        let _ = self.outbox.send(Outgoing::Desired(id.clone(), ours));
    }

    /// Whether `payload` is one of this controller's own documents for
    /// `device`, older than `generation`: the echo of a publish that a newer
    /// one is already replacing.
    fn own_older_document(&self, device: &str, payload: &[u8], generation: u64) -> bool {
        let Ok((_, Message::SignedDesired(signed))) = baton_protocol::decode(payload) else { return false };
        let ours = [self.keys.signing.public()];
        let Ok(document) = crypto::verify_desired(&ours, device, &signed) else { return false };
        matches!(baton_protocol::decode(document), Ok((_, Message::Desired(d))) if d.generation < generation)
    }

    /// Publishes every stored desired document again (after a (re)connect:
    /// an embedded broker keeps no retained messages across a restart).
    pub fn republish_desired(&self) {
        for (device, doc) in lock(&self.state).desired.iter() {
            // Ed25519 and postcard are deterministic: the same bytes as first published.
            if let (Ok(id), Ok(payload)) = (DeviceId::new(device.clone()), self.sign(device, doc)) {
                let _ = self.outbox.send(Outgoing::Desired(id, payload));
            }
        }
    }

    /// `baton backup`: a consistent copy of the store (fleet-wide operators
    /// only: it holds every tenant). Blocking: call off the async workers.
    pub fn backup(&self, scope: &Scope) -> Result<Vec<u8>, OpError> {
        if *scope != Scope::All {
            return Err(OpError::Forbidden("only a fleet-wide token, acting for no tenant, backs up the store".into()));
        }
        Ok(lock(&self.store).backup()?)
    }

    pub fn workloads(&self, now: Millis, scope: &Scope) -> Vec<WorkloadView> {
        let names: Vec<String> =
            lock(&self.state).workloads.iter().filter(|(_, e)| scope.sees(&e.tenant)).map(|(n, _)| n.clone()).collect();
        names.iter().filter_map(|n| self.workload(n, now, scope).ok()).collect()
    }

    /// A workload `scope` may see; another tenant's is "not found", as an unknown one.
    fn visible_workload<'s>(st: &'s State, name: &str, scope: &Scope) -> Result<&'s Entry, OpError> {
        st.workloads
            .get(name)
            .filter(|e| scope.sees(&e.tenant))
            .ok_or_else(|| OpError::NotFound(format!("workload {name} not found")))
    }

    fn visible_workload_mut<'s>(st: &'s mut State, name: &str, scope: &Scope) -> Result<&'s mut Entry, OpError> {
        st.workloads
            .get_mut(name)
            .filter(|e| scope.sees(&e.tenant))
            .ok_or_else(|| OpError::NotFound(format!("workload {name} not found")))
    }

    pub fn workload(&self, name: &str, now: Millis, scope: &Scope) -> Result<WorkloadView, OpError> {
        let fleet = lock(&self.fleet);
        let st = lock(&self.state);
        let e = Self::visible_workload(&st, name, scope)?;
        let latest = &e.revisions[&e.latest];
        let placed = st.schedule.assignment.get(name);
        let released = e.active_rollout().map(Rollout::released_set).unwrap_or_default();
        let devices = fleet
            .devices()
            .filter(|d| placed.is_some_and(|p| p.contains(&d.id)))
            .map(|d| WorkloadOnDevice {
                device: d.id.clone(),
                device_status: d.status(now, &self.liveness),
                desired_revision: e
                    .active_rollout()
                    .map_or(e.stable, |r| r.revision_for(released.contains(d.id.as_str()))),
                reported: d.report.as_ref().and_then(|r| r.workloads.iter().find(|w| w.name == name).cloned()),
                refused: d
                    .refusal
                    .as_ref()
                    .filter(|_| st.desired.get(&d.id).is_some_and(|doc| d.applied_generation() < doc.generation))
                    .map(|r| r.reason.clone()),
            })
            .collect();
        Ok(WorkloadView {
            name: name.to_string(),
            tenant: e.tenant.clone(),
            revision: e.latest,
            stable_revision: e.stable,
            image: latest.image.clone(),
            placement: e.manifest.placement.clone(),
            replicas: e.manifest.replicas,
            unplaced: st.schedule.unplaced.get(name).copied().unwrap_or(0),
            revisions: e
                .revisions
                .values()
                .enumerate()
                .map(|(i, s)| RevisionView {
                    revision: s.revision,
                    image: s.image.clone(),
                    digest: s.image_digest.clone(),
                    changes: match i.checked_sub(1).and_then(|p| e.revisions.values().nth(p)) {
                        Some(before) => crate::workload::spec_changes(before, s),
                        None => Vec::new(),
                    },
                })
                .rev()
                .collect(),
            rollout: e.rollout.as_ref().map(RolloutView::new),
            devices,
            manifest: e.manifest.clone(),
        })
    }

    pub fn rollout(&self, name: &str, scope: &Scope) -> Result<RolloutView, OpError> {
        let st = lock(&self.state);
        let e = Self::visible_workload(&st, name, scope)?;
        e.rollout
            .as_ref()
            .map(RolloutView::new)
            .ok_or_else(|| OpError::NotFound(format!("workload {name} has had no rollout")))
    }

    pub fn status_counts(&self, now: Millis) -> BTreeMap<&'static str, usize> {
        let mut counts = BTreeMap::from([("online", 0), ("stale", 0), ("offline", 0)]);
        for d in lock(&self.fleet).devices() {
            *counts.entry(d.status(now, &self.liveness).as_str()).or_default() += 1;
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
        let mut out = self.metrics.render(&counts);
        if let Some(g) = self.gateway.get() {
            use std::fmt::Write;
            for (name, help, v) in [
                ("baton_gateway_refused_total", "MQTT connections refused by the gateway.", &g.refused_connects),
                (
                    "baton_gateway_denied_total",
                    "Devices disconnected for stepping outside their topics.",
                    &g.denied_packets,
                ),
            ] {
                let _ = writeln!(out, "# HELP {name} {help}\n# TYPE {name} counter\n{name} {}", v.load(Relaxed));
            }
        }
        out
    }
}

/// A desired document as it travels: encoded, then signed for `device`.
fn sign_desired(keys: &Keys, device: &str, doc: &Desired) -> Result<Vec<u8>, baton_protocol::codec::EncodeError> {
    let inner = encode(&Message::Desired(doc.clone()))?;
    encode(&Message::SignedDesired(keys.signing.sign_desired(device, inner)))
}

fn parse_id(id: &str) -> Result<DeviceId, OpError> {
    DeviceId::new(id).map_err(|e| OpError::Invalid(e.to_string()))
}

impl crate::gateway::Authority for Controller {
    /// A device connects with client id = username = its id, and the password
    /// issued for it.
    fn authenticate(&self, c: &crate::gateway::wire::Connect) -> Result<crate::gateway::Identity, u8> {
        use crate::gateway::wire::{BAD_CREDENTIALS, NOT_AUTHORIZED};
        let (Some(user), Some(password)) = (&c.username, &c.password) else { return Err(NOT_AUTHORIZED) };
        // A join session: username `join:<token id>`, the token secret as password.
        if let Some(token) = user.strip_prefix("join:") {
            let id = DeviceId::new(c.client_id.clone()).map_err(|_| NOT_AUTHORIZED)?;
            return match self.valid_token(token, password, now_ms()) {
                Ok(_) => Ok(crate::gateway::Identity::Joining(id)),
                Err(why) => {
                    tracing::info!(device = %id, %why, "join refused");
                    Err(BAD_CREDENTIALS)
                }
            };
        }
        if *user != c.client_id {
            return Err(NOT_AUTHORIZED);
        }
        let id = DeviceId::new(user.clone()).map_err(|_| BAD_CREDENTIALS)?;
        let hash = crate::keys::sha256(password);
        let known = lock(&self.credentials);
        let stored = known.get(id.as_str()).ok_or(BAD_CREDENTIALS)?;
        if !same_hash(stored, &hash) {
            return Err(BAD_CREDENTIALS);
        }
        Ok(crate::gateway::Identity::Device(id))
    }
}

fn api_token_visible(t: &crate::store::ApiToken, scope: &Scope) -> bool {
    match scope {
        Scope::All => true,
        Scope::Tenant(s) => t.tenant.as_deref() == Some(s.as_str()),
    }
}

pub const ROLE_ADMIN: &str = "admin";
pub const ROLE_READ_ONLY: &str = "read-only";

/// Compares every byte: no early exit on the first difference.
fn same_hash(a: &[u8], b: &[u8]) -> bool {
    a.len() == b.len() && a.iter().zip(b).fold(0u8, |acc, (x, y)| acc | (x ^ y)) == 0
}

/// What pinning an image's tag found: a note for the apply's output, and the
/// platforms its index offers (None: a single-platform manifest, or unknown).
#[derive(Debug, Default)]
pub struct Pinned {
    pub note: Option<String>,
    pub platforms: Option<Vec<String>>,
}
