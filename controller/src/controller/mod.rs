//! The controller's operations, which the HTTP API and MQTT ingest call with
//! plain values; split by subject: `devices`, `workloads` (revisions and
//! rollouts), `secrets`, `access` (device credentials, join and API tokens,
//! enrollment), `publish` (desired documents out). This file holds the
//! shared state: the fleet (in memory, short locks), the workloads, the last
//! placement and published documents — a cache of the store, which is the
//! truth and from which `new` rebuilds all of it — and the store itself.
//! Decisions live in pure modules (`fleet`, `schedule`, `rollout`,
//! `desired`, `workload`); transports (HTTP, MQTT, the gateway, registry
//! lookups) call in from the edges.

use std::collections::{BTreeMap, BTreeSet};
use std::sync::atomic::{AtomicBool, Ordering::Relaxed};
use std::sync::Mutex;
use std::time::{SystemTime, UNIX_EPOCH};

use baton_protocol::{Desired, DeviceId, Message};
use tokio::sync::mpsc::UnboundedSender;

use crate::commands::Outgoing;
use crate::desired::{self, facts_of, is_gone, Entry, Serving};
use crate::fleet::{Fleet, Liveness, Millis};
use crate::keys::Keys;
use crate::metrics::Metrics;
use crate::schedule::{DeviceFacts, Schedule};
use crate::store::{Store, StoreError};
use crate::tenant::Scope;
use crate::view::{Event, Health};

mod access;
mod agents;
mod autoscale;
mod devices;
mod publish;
mod secrets;
mod webhooks;
mod workloads;

pub use agents::MAX_RELEASE_BYTES;
use publish::sign_desired;

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

/// Sealed file contents by (device, workload, path, secret reference), with
/// the device key they were sealed to: a seal is reused until one of those
/// changes — across revisions too (a seal is bound to device, workload and
/// path, not to a revision) — so documents do not change, and containers do
/// not restart, for nothing. A revision the device ran before and is sent
/// back to (a rollback) gets its very bytes again: a trial found a device
/// that never left its stable revision (its successor's pull failed)
/// restarted it when the rollback re-sealed its secret.
type SealCache = BTreeMap<(String, String, String, Vec<u8>), ([u8; 32], Vec<u8>)>;

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
    /// Devices whose topic last showed an older document of this
    /// controller's, and since when (see `reassert_stale_copies`).
    older_on_topic: BTreeMap<String, Millis>,
    /// Devices online but behind their document: since when (or when it was
    /// last sent again), and whether it was sent again already.
    behind: BTreeMap<String, (Millis, bool)>,
    /// The last agent upgrade (`upgrade`), and the agent builds published.
    agent_rollout: Option<crate::upgrade::AgentRollout>,
    releases: crate::upgrade::Releases,
    /// Each autoscaled workload's autoscaler (memory only: a restarted
    /// controller watches a whole window again before scaling down).
    scalers: BTreeMap<String, crate::autoscale::Scaler>,
    /// The week update windows were last computed for (`windows`): when it
    /// turns, documents with windows are composed again.
    windows_week: u64,
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
    /// The registry `pinning` asks at apply to resolve image tags to
    /// digests (None: devices pull tags).
    pub registry: Option<baton_registry::Client>,
    pub broker_connected: AtomicBool,
    /// Why the last connection to the broker failed or ended (for `/healthz`).
    pub broker_error: Mutex<Option<String>>,
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
    /// The last workload errors said as events, per device (workload →
    /// the error without its digits): a leaf lock, taken alone.
    said_errors: Mutex<BTreeMap<String, BTreeMap<String, String>>>,
    /// When a `device.denied` event was last recorded, per client id (at
    /// most one a minute each: a client retrying in a loop is one line).
    denials: Mutex<BTreeMap<String, Millis>>,
    /// Topics whose retained message `delete_device` cleared, until ingest
    /// sees the empty message come back (then it is no device's garbage).
    cleared: Mutex<BTreeSet<String>>,
    /// API tokens and their secrets' hashes.
    api_tokens: Mutex<Vec<(crate::store::ApiToken, Vec<u8>)>>,
    /// Event webhooks: a queue and a delivery thread each (`crate::webhook`).
    pub webhooks: crate::webhook::Hooks,
    /// The embedded broker, when this controller runs one.
    pub broker: std::sync::OnceLock<std::sync::Arc<crate::broker::Broker>>,
    /// Interactive sessions open through this controller.
    pub sessions: crate::sessions::Registry,
    /// Every event as it is recorded, for live feeds (the dashboard's). A
    /// reader that falls behind the last `LIVE_EVENTS` is told it lagged.
    pub live: tokio::sync::broadcast::Sender<Event>,
    /// A device changed what placement is made from (`apply`): the next
    /// `tick` recomputes every document.
    desired_stale: AtomicBool,
    /// The store is held (`Store::acting_flag`): while it is not, nothing
    /// is published from memory (reasserted documents).
    acting: std::sync::Arc<AtomicBool>,
}

/// How many events a live feed may fall behind.
pub const LIVE_EVENTS: usize = 1024;

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    // A panic while holding the lock left plain data behind; keep serving it.
    m.lock().unwrap_or_else(std::sync::PoisonError::into_inner)
}

fn parse_id(id: &str) -> Result<DeviceId, OpError> {
    DeviceId::new(id).map_err(|e| OpError::Invalid(e.to_string()))
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
        let store_acting = store.acting_flag();
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
                // The references behind the seals: the stored revision's spec.
                let spec = workloads.get(&w.name).and_then(|e| e.revisions.get(&w.revision));
                for f in w.container.files.iter().filter(|f| f.is_sealed()) {
                    let reference = spec
                        .and_then(|s| s.container.files.iter().find(|r| r.path == f.path))
                        .map(|r| r.contents.clone());
                    if let (Some(key), Some(reference)) = (key, reference) {
                        let at = (device.clone(), w.name.clone(), f.path.clone(), reference);
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
        let webhooks = crate::webhook::Hooks::default();
        for w in store.webhooks()? {
            match baton_protocol::crypto::decrypt(&keys.secrets, &webhooks::webhook_aad(&w.id), &w.secret) {
                Ok(secret) => webhooks.start(webhooks::view_of(&w), secret),
                Err(_) => {
                    tracing::error!(webhook = %w.id, "a webhook's secret does not decrypt with this controller's secrets key; not delivering to it")
                }
            }
        }
        let api_tokens = store.api_tokens()?;
        let agent_rollout = store.load_agent_rollout()?;
        let releases = agents::index(&store.releases()?);
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
                older_on_topic: BTreeMap::new(),
                behind: BTreeMap::new(),
                agent_rollout,
                releases,
                scalers: BTreeMap::new(),
                windows_week: now_ms() / crate::windows::WEEK_MS,
            }),
            fleet: Mutex::new(fleet),
            store: Mutex::new(store),
            metrics: Metrics::default(),
            liveness,
            reschedule_after_ms: 300_000,
            registry: None,
            broker_connected: AtomicBool::new(false),
            broker_error: Mutex::new(None),
            keys,
            credentials: Mutex::new(credentials),
            api_auth: false,
            dynsec: false,
            swept_tokens: Mutex::new((BTreeSet::new(), 0)),
            said_errors: Mutex::new(BTreeMap::new()),
            denials: Mutex::new(BTreeMap::new()),
            cleared: Mutex::new(BTreeSet::new()),
            api_tokens: Mutex::new(api_tokens),
            broker: std::sync::OnceLock::new(),
            sessions: crate::sessions::Registry::default(),
            live: tokio::sync::broadcast::channel(LIVE_EVENTS).0,
            desired_stale: AtomicBool::new(false),
            acting: store_acting,
            webhooks,
        })
    }

    /// Records that this controller took the store over from another
    /// (`controller.took_over`, fleet-wide).
    pub fn record_takeover(&self, me: &str, now: Millis) {
        let store = lock(&self.store);
        let message = format!("{me} took the store over from the controller that held it, and leads the fleet now");
        self.event(&store, "", "controller.took_over", me, message, now);
    }

    /// Records an event: the store's log, the controller's own, and the
    /// webhooks that want it. `name` is `KIND.WHAT` (`device.offline`);
    /// `tenant` is the subject's (empty for fleet-wide subjects).
    fn event(&self, store: &Store, tenant: &str, name: &str, subject: &str, message: String, now: Millis) {
        let kind = name.split('.').next().unwrap_or(name);
        tracing::info!(event = name, subject, tenant, "{message}");
        let e = Event {
            at_ms: now,
            kind: kind.into(),
            name: name.into(),
            subject: subject.into(),
            message,
            tenant: tenant.into(),
        };
        if let Err(err) = store.add_event(&e) {
            self.metrics.store_errors.fetch_add(1, Relaxed);
            tracing::error!(error = %err, "cannot record an event");
        }
        self.webhooks.offer(&e);
        // No reader is the usual case, not an error.
        let _ = self.live.send(e);
    }

    /// `device.denied`: the embedded broker refused `client` a step
    /// (`what`), as a possibly compromised device or a stolen token would
    /// try. At most one event a minute per client id; the broker's counters
    /// (`baton_mqtt_denied_total`, `baton_mqtt_refused_total`) count them all.
    pub fn record_denial(&self, client: &str, what: &str, now: Millis) {
        {
            let mut said = lock(&self.denials);
            if said.get(client).is_some_and(|at| now.saturating_sub(*at) < 60_000) {
                return;
            }
            if said.len() >= 10_000 {
                said.retain(|_, at| now.saturating_sub(*at) < 60_000);
            }
            said.insert(client.to_owned(), now);
        }
        let tenant = baton_protocol::DeviceId::new(client.to_owned())
            .ok()
            .and_then(|id| self.device_tenant(&id))
            .unwrap_or_default();
        let message = format!("the MQTT gateway refused a client as {client:?}: {what} (further refusals of it for a minute are counted, not recorded)");
        self.event(&lock(&self.store), &tenant, "device.denied", client, message, now);
    }

    /// Whether an empty message on `topic` is the echo of a retained
    /// message `delete_device` cleared (once per clearing); any other empty
    /// message is malformed.
    pub fn take_cleared(&self, topic: &str) -> bool {
        lock(&self.cleared).remove(topic)
    }

    /// Records an event about what an operator did on a device (sessions).
    pub fn audit(&self, tenant: &str, name: &str, subject: &str, message: String) {
        self.event(&lock(&self.store), tenant, name, subject, message, now_ms());
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
        Snapshot { facts, serving: desired::serving(&fleet, now, &self.liveness), sealing, applied, now }
    }

    /// Advances every rollout on what devices reported, and moves replicas
    /// off devices gone past the grace period. Called about once a second.
    pub fn tick(&self, now: Millis) {
        self.sweep_join_accounts(now);
        let mut changed = self.desired_stale.swap(false, Relaxed);
        changed |= self.expire_silent(now);
        {
            let fleet = lock(&self.fleet);
            let mut st = lock(&self.state);
            changed |= self.step_rollouts(&fleet, &mut st, now);
            changed |= self.step_agent_rollout(&fleet, &mut st, now);
            changed |= self.autoscale(&fleet, &mut st, now);
            // A new week: update windows are sent for the next two.
            let week = now / crate::windows::WEEK_MS;
            if week != st.windows_week {
                st.windows_week = week;
                changed |= st.workloads.values().any(|e| e.manifest.updates.is_some());
            }
            let gone: BTreeSet<String> =
                fleet.devices().filter(|d| is_gone(d, now, self.reschedule_after_ms)).map(|d| d.id.clone()).collect();
            changed |= gone != st.gone;
            // A device ahead of the document this controller issued it (see `publish`).
            changed |= fleet
                .devices()
                .any(|d| st.desired.get(&d.id).is_some_and(|doc| d.applied_generation() > doc.generation));
            self.resend_to_devices_behind(&fleet, &mut st, now);
            self.reassert_stale_copies(&mut st, now);
            // Endpoints moved (an instance turned healthy or stopped being so),
            // for services some workload uses.
            if st.workloads.values().any(|e| !e.manifest.uses.is_empty()) {
                changed |=
                    desired::used_serving(&st.workloads, &desired::serving(&fleet, now, &self.liveness)) != st.serving;
            }
        }
        if changed {
            self.sync_desired(now);
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

    pub fn status_counts(&self, now: Millis) -> BTreeMap<&'static str, usize> {
        let mut counts = BTreeMap::from([("online", 0), ("stale", 0), ("offline", 0)]);
        for d in lock(&self.fleet).devices() {
            *counts.entry(d.status(now, &self.liveness).as_str()).or_default() += 1;
        }
        counts
    }

    pub fn health(&self) -> Health {
        let (broker_connected, store_connected) = (self.broker_connected.load(Relaxed), self.acting.load(Relaxed));
        let mut problems = Vec::new();
        if !broker_connected {
            let why = lock(&self.broker_error).clone().map(|e| format!(" (last error: {e})")).unwrap_or_default();
            problems.push(format!("the MQTT broker is not connected: devices are neither heard nor reached{why}"));
        }
        if !store_connected {
            problems.push(
                "the store is unavailable (PostgreSQL session lost): nothing is stored or published until it is back"
                    .to_string(),
            );
        }
        Health {
            status: if problems.is_empty() { "ok" } else { "degraded" }.into(),
            version: env!("CARGO_PKG_VERSION").into(),
            broker_connected,
            store_connected,
            devices: lock(&self.fleet).len(),
            problems,
        }
    }

    pub fn render_metrics(&self, now: Millis) -> String {
        let counts: Vec<(&str, usize)> = self.status_counts(now).into_iter().collect();
        let mut out = self.metrics.render(&counts);
        if let Some(b) = self.broker.get() {
            use std::fmt::Write;
            for (name, help, v) in [
                ("baton_mqtt_refused_total", "MQTT connections the embedded broker refused.", &b.refused_connects),
                (
                    "baton_mqtt_denied_total",
                    "Devices disconnected for stepping outside their topics.",
                    &b.denied_packets,
                ),
                (
                    "baton_mqtt_slow_consumers_total",
                    "Clients disconnected for leaving too many messages unread.",
                    &b.slow_consumers,
                ),
            ] {
                let _ = writeln!(out, "# HELP {name} {help}\n# TYPE {name} counter\n{name} {}", v.load(Relaxed));
            }
            let (connections, sessions, retained, dropped, expired) = b.stats();
            for (name, kind, help, v) in [
                (
                    "baton_mqtt_connections",
                    "gauge",
                    "Live MQTT connections to the embedded broker.",
                    connections as u64,
                ),
                ("baton_mqtt_sessions", "gauge", "MQTT sessions the embedded broker keeps.", sessions as u64),
                ("baton_mqtt_retained", "gauge", "Retained messages the embedded broker holds.", retained as u64),
                (
                    "baton_mqtt_offline_dropped_total",
                    "counter",
                    "Messages an offline session had no room left to keep.",
                    dropped,
                ),
                (
                    "baton_mqtt_sessions_expired_total",
                    "counter",
                    "Persistent sessions dropped after an hour offline, or the longest offline past the cap.",
                    expired,
                ),
            ] {
                let _ = writeln!(out, "# HELP {name} {help}\n# TYPE {name} {kind}\n{name} {v}");
            }
        }
        out
    }
}
