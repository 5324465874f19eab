//! The device registry: what the controller knows of each device, and the
//! rules that turn messages and time into a status. Pure: no MQTT, no HTTP, no
//! SQL; the shell feeds it events with a timestamp and persists what it says changed.

use std::collections::BTreeMap;

use baton_protocol::{DeviceId, Heartbeat, Inventory, Presence, PresenceState, Report};
use serde::{Deserialize, Serialize};

/// Milliseconds since the Unix epoch; the core never reads a clock itself.
pub type Millis = u64;

/// What a device's status means, one rule for every consumer:
/// Silences are the device's own when it heartbeats more rarely than these
/// windows allow: see `Liveness::stale_after` and `offline_after`.
/// - `online`: connected, and heard from within `stale_after`. Only online
///   devices are given new replicas, lead a rollout's waves, and are judged
///   by rollouts.
/// - `stale`: presence says online but the device has been silent past
///   `stale_after`: a half-open connection, a wedged agent, a partition. It
///   keeps what it runs (placement and service endpoints), but a rollout
///   treats it as away (neither judged nor blocking) and it is no canary.
/// - `offline`: it said goodbye, the broker published its Last Will, or the
///   controller heard nothing for `offline_after` (whatever the broker did).
///   Its `replicas` move elsewhere `--reschedule-after` after it went offline.
///
/// For `offline`, silence is counted from the later of the device's last
/// message and the controller's start: a restarted controller heard nothing
/// while it was down, and must not declare the whole fleet offline for it.
/// (It shows devices it has not heard from since as `stale` meanwhile.)
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Liveness {
    pub stale_after_ms: Millis,
    pub offline_after_ms: Millis,
    /// When this controller started listening.
    pub since_ms: Millis,
    /// Its broker started with it (the embedded one): every device alive
    /// reconnects after a start and is heard at once, so one not heard
    /// since is judged by the controller's own windows, however rarely it
    /// heartbeats.
    pub broker_started_with_us: bool,
}

impl Liveness {
    /// Defaults: stale after 60 s of silence, offline after 120 s.
    pub const DEFAULT: Liveness =
        Liveness { stale_after_ms: 60_000, offline_after_ms: 120_000, since_ms: 0, broker_started_with_us: false };

    /// Silence that counts towards `offline`.
    fn silence(&self, d: &Device, now: Millis) -> Millis {
        now.saturating_sub(d.last_seen.max(self.since_ms))
    }

    /// The silence after which `d` is stale: `stale_after`, or two of its
    /// own heartbeat intervals if that is longer (an agent from 1.10 on
    /// says its interval; between heartbeats a quiet device's liveness is
    /// its MQTT keepalive, and the broker publishes its Will when that lapses).
    pub fn stale_after(&self, d: &Device) -> Millis {
        self.stale_after_ms.max(2 * self.interval_ms(d))
    }

    /// The silence after which `d` is taken for offline without a Will:
    /// `offline_after`, or three of its heartbeat intervals if that is longer.
    pub fn offline_after(&self, d: &Device) -> Millis {
        self.offline_after_ms.max(3 * self.interval_ms(d))
    }

    /// `d`'s heartbeat interval, as far as its windows go: none for a device
    /// not heard since a start that restarted the broker too (see
    /// `broker_started_with_us`).
    fn interval_ms(&self, d: &Device) -> Millis {
        if self.broker_started_with_us && d.last_seen < self.since_ms {
            0
        } else {
            d.heartbeat_interval_ms()
        }
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, schemars::JsonSchema)]
#[serde(rename_all = "lowercase")]
pub enum Status {
    /// Connected, and heard from within the stale window.
    Online,
    /// Presence says online but nothing arrived within the stale window:
    /// a half-open connection, a wedged agent, or a broker that lost it.
    Stale,
    /// Said goodbye, the broker published its Last Will, or silent past
    /// `offline_after`.
    Offline,
}

impl Status {
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Online => "online",
            Self::Stale => "stale",
            Self::Offline => "offline",
        }
    }
}

/// Everything known about one device; the store persists it as is.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, schemars::JsonSchema)]
pub struct Device {
    pub id: String,
    pub first_seen: Millis,
    /// Last time any message from the device arrived.
    pub last_seen: Millis,
    pub presence: Presence,
    pub inventory: Option<Inventory>,
    pub heartbeat: Option<Heartbeat>,
    /// Labels set by operators; they override the agent's labels of the same key.
    pub operator_labels: BTreeMap<String, String>,
    /// The device's last report of its workloads.
    #[serde(default)]
    pub report: Option<Report>,
    /// The tenant it belongs to (`tenant::DEFAULT` until an operator moves it
    /// or it joins with a tenant's token).
    #[serde(default = "crate::tenant::default_tenant")]
    pub tenant: String,
    /// When it went offline (None while online, and for devices stored
    /// before this was kept: their last message stands in).
    #[serde(default)]
    pub offline_since: Option<Millis>,
    /// The last desired document it refused, and why (kept: a refusal is
    /// for the operator to see, not only in the device's own log).
    #[serde(default)]
    pub refusal: Option<Refusal>,
    /// How far its wall clock is from the controller's (device − controller,
    /// ms), from its last heartbeat (agents from 1.4 on). Shown, never relied on.
    #[serde(default)]
    pub clock_offset_ms: Option<i64>,
    /// Its last hour of heartbeats, for the dashboard (memory only).
    #[serde(skip)]
    pub history: crate::dashboard::History,
    /// When its last live "online" presence (a new connection) or its
    /// registration arrived, by this controller's clock (memory only: 0
    /// after a restart until it connects again).
    #[serde(skip)]
    pub connected_at: Millis,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, schemars::JsonSchema)]
pub struct Refusal {
    pub at_ms: Millis,
    pub reason: String,
}

impl Device {
    pub fn status(&self, now: Millis, liveness: &Liveness) -> Status {
        match self.presence.state {
            PresenceState::Offline => Status::Offline,
            PresenceState::Online if now.saturating_sub(self.last_seen) > liveness.stale_after(self) => Status::Stale,
            // Its broker restarted with this controller, so a live device
            // reconnects and is heard within seconds: until then, what the
            // store remembers (online a moment before the restart) proves
            // nothing. A frozen or dead device is not online meanwhile.
            PresenceState::Online if liveness.broker_started_with_us && self.last_seen < liveness.since_ms => {
                Status::Stale
            }
            PresenceState::Online => Status::Online,
        }
    }

    /// The heartbeat interval its agent says it keeps (0: not said, an agent
    /// before 1.10).
    pub fn heartbeat_interval_ms(&self) -> Millis {
        self.inventory.as_ref().map_or(0, |i| Millis::from(i.heartbeat_interval_s) * 1000)
    }

    /// The generation of the desired document it has in force, as it last said.
    pub fn applied_generation(&self) -> u64 {
        let reported = self.report.as_ref().map_or(0, |r| r.generation);
        reported.max(self.heartbeat.as_ref().map_or(0, |h| h.applied_generation))
    }

    /// How long it has been offline (0 when it is not).
    pub fn offline_for(&self, now: Millis) -> Millis {
        match self.presence.state {
            PresenceState::Online => 0,
            PresenceState::Offline => now.saturating_sub(self.offline_since.unwrap_or(self.last_seen)),
        }
    }

    /// Agent labels overlaid with operator labels.
    pub fn labels(&self) -> BTreeMap<String, String> {
        let mut labels: BTreeMap<String, String> =
            self.inventory.iter().flat_map(|i| i.labels.iter().cloned()).collect();
        labels.extend(self.operator_labels.iter().map(|(k, v)| (k.clone(), v.clone())));
        labels
    }
}

/// What happened on a device topic, already decoded and checked.
#[derive(Debug, Clone)]
pub enum FleetEvent {
    Presence(Presence),
    Inventory(Box<Inventory>),
    Heartbeat(Heartbeat),
    Report(Report),
    /// Any other message from the device (a command result): proof of life.
    Seen,
}

impl FleetEvent {
    /// What kind of message it came in, as the event log names it.
    pub fn what(&self) -> &'static str {
        match self {
            FleetEvent::Presence(_) => "presence",
            FleetEvent::Inventory(_) => "inventory",
            FleetEvent::Heartbeat(_) => "heartbeat",
            FleetEvent::Report(_) => "report",
            FleetEvent::Seen => "message",
        }
    }
}

/// How a message reached the controller. A retained one (delivered because
/// the controller subscribed) is old news: it says what the device last
/// published, not that it is alive now.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Delivery {
    Live,
    Retained,
}

/// What applying an event did; the shell persists on `Persist`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Change {
    /// Nothing the store keeps changed (e.g. a heartbeat: only `last_seen` moved).
    InMemory,
    /// A durable field changed; write the device.
    Persist,
    /// The device is not registered and this event cannot register it.
    UnknownDevice,
}

#[derive(Debug, Default)]
pub struct Fleet {
    devices: BTreeMap<DeviceId, Device>,
}

impl Fleet {
    pub fn from_devices(devices: impl IntoIterator<Item = (DeviceId, Device)>) -> Self {
        Self { devices: devices.into_iter().collect() }
    }

    pub fn get(&self, id: &DeviceId) -> Option<&Device> {
        self.devices.get(id)
    }

    /// Forgets a device (`delete device`).
    pub fn remove(&mut self, id: &DeviceId) -> Option<Device> {
        self.devices.remove(id)
    }

    pub fn devices(&self) -> impl Iterator<Item = &Device> {
        self.devices.values()
    }

    pub fn len(&self) -> usize {
        self.devices.len()
    }

    pub fn is_empty(&self) -> bool {
        self.devices.is_empty()
    }

    /// Registers a device before it connects (it just enrolled, or an
    /// operator issued its credentials): offline, in `tenant`, with the
    /// operator labels given and its sealing key when known (the one it
    /// enrolled with is the one kept). A known device is replaced.
    pub fn register(
        &mut self,
        id: &DeviceId,
        sealing_key: Vec<u8>,
        labels: BTreeMap<String, String>,
        tenant: &str,
        now: Millis,
    ) {
        let device = Device {
            id: id.to_string(),
            first_seen: now,
            last_seen: now,
            presence: Presence {
                state: PresenceState::Offline,
                agent_version: String::new(),
                boot_id: String::new(),
                started_at: 0,
            },
            inventory: (!sealing_key.is_empty()).then(|| Inventory { sealing_key, ..Default::default() }),
            heartbeat: None,
            operator_labels: labels,
            report: None,
            tenant: tenant.into(),
            offline_since: Some(now),
            refusal: None,
            clock_offset_ms: None,
            history: Default::default(),
            connected_at: 0,
        };
        self.devices.insert(id.clone(), device);
    }

    /// Applies one event. A device is registered by its first online presence
    /// or inventory (both retained, so they arrive whatever the order); other
    /// messages from unregistered ids change nothing. A live message other
    /// than a goodbye proves the device alive now (and online again, if it
    /// was taken for offline); a retained one does not.
    pub fn apply(&mut self, id: &DeviceId, event: FleetEvent, delivery: Delivery, now: Millis) -> Change {
        let Some(device) = self.devices.get_mut(id) else {
            let presence = match &event {
                FleetEvent::Presence(p) if p.state == PresenceState::Online => p.clone(),
                FleetEvent::Inventory(inv) => Presence {
                    state: PresenceState::Online,
                    agent_version: inv.agent_version.clone(),
                    boot_id: String::new(),
                    started_at: 0,
                },
                _ => return Change::UnknownDevice,
            };
            let inventory = match event {
                FleetEvent::Inventory(inv) => Some(*inv),
                _ => None,
            };
            let device = Device {
                id: id.to_string(),
                first_seen: now,
                last_seen: now,
                presence,
                inventory,
                heartbeat: None,
                operator_labels: BTreeMap::new(),
                report: None,
                tenant: crate::tenant::DEFAULT.into(),
                offline_since: None,
                refusal: None,
                clock_offset_ms: None,
                history: Default::default(),
                connected_at: if delivery == Delivery::Live { now } else { 0 },
            };
            self.devices.insert(id.clone(), device);
            return Change::Persist;
        };

        let was = device.presence.state;
        let goodbye = matches!(&event, FleetEvent::Presence(p) if p.state == PresenceState::Offline);
        let mut changed = match event {
            FleetEvent::Presence(p) => {
                let changed = device.presence != p;
                // A retained "online" for a device taken for offline: it
                // connected while we were not listening. Its silence counts
                // from now (a live heartbeat follows within one interval).
                if delivery == Delivery::Retained && was == PresenceState::Offline && p.state == PresenceState::Online {
                    device.last_seen = now;
                }
                if delivery == Delivery::Live && p.state == PresenceState::Online {
                    device.connected_at = now;
                }
                device.presence = p;
                changed
            }
            FleetEvent::Inventory(mut inv) => {
                // The first sealing key a device reports is its identity: a
                // different one later is refused (a clone or an impostor
                // would otherwise get secrets sealed to it).
                let pinned = device.inventory.as_ref().map(|i| &i.sealing_key).filter(|k| !k.is_empty());
                if let Some(pinned) = pinned.filter(|k| **k != inv.sealing_key) {
                    tracing::warn!(device = %device.id, "device reported a different sealing key; keeping the first one (see SECURITY.md: re-keying a device)");
                    inv.sealing_key = pinned.clone();
                }
                let mut changed = device.inventory.as_ref() != Some(&inv);
                // It names the agent that runs (a simulated device's changes
                // without a new session).
                if !inv.agent_version.is_empty() && inv.agent_version != device.presence.agent_version {
                    device.presence.agent_version = inv.agent_version.clone();
                    changed = true;
                }
                device.inventory = Some(*inv);
                changed
            }
            FleetEvent::Heartbeat(hb) => {
                if hb.unix_ms != 0 && delivery == Delivery::Live {
                    device.clock_offset_ms = Some(hb.unix_ms as i64 - now as i64);
                }
                if delivery == Delivery::Live {
                    device.history.record(now, &hb);
                }
                device.heartbeat = Some(hb);
                false
            }
            // A refusal carries no workloads: what the device runs is still its last report.
            FleetEvent::Report(Report { refused: Some(reason), .. }) => {
                let changed = device.refusal.as_ref().is_none_or(|r| r.reason != reason);
                device.refusal = Some(Refusal { at_ms: now, reason });
                changed
            }
            FleetEvent::Report(r) => {
                let changed = device.report.as_ref() != Some(&r);
                device.report = Some(r);
                changed
            }
            FleetEvent::Seen => false,
        };
        if delivery == Delivery::Live && !goodbye {
            device.last_seen = now;
            // Heard from without a new session (a partition healed, or the
            // controller's silence rule was early): online again.
            if device.presence.state == PresenceState::Offline {
                device.presence.state = PresenceState::Online;
                changed = true;
            }
        }
        match (was, device.presence.state) {
            (PresenceState::Online, PresenceState::Offline) => {
                device.offline_since = Some(now);
                changed = true;
            }
            (PresenceState::Offline, PresenceState::Online) => {
                device.offline_since = None;
                changed = true;
            }
            _ => {}
        }
        if changed {
            Change::Persist
        } else {
            Change::InMemory
        }
    }

    /// Takes devices silent for longer than `offline_after` for offline (as
    /// their Last Will would have: a broker may have lost it, e.g. an embedded
    /// one restarted with the controller). Returns them: the shell persists
    /// them and records why.
    pub fn expire_silent(&mut self, now: Millis, liveness: &Liveness) -> Vec<Device> {
        let mut expired = Vec::new();
        for d in self.devices.values_mut() {
            if d.presence.state == PresenceState::Online && liveness.silence(d, now) > liveness.offline_after(d) {
                d.presence.state = PresenceState::Offline;
                d.offline_since = Some(now);
                expired.push(d.clone());
            }
        }
        expired
    }

    /// Moves a device to another tenant; `None` when the device is unknown.
    pub fn assign(&mut self, id: &DeviceId, tenant: &str) -> Option<&Device> {
        let device = self.devices.get_mut(id)?;
        device.tenant = tenant.into();
        Some(device)
    }

    /// Sets and removes operator labels; `None` when the device is unknown.
    pub fn relabel(&mut self, id: &DeviceId, set: &BTreeMap<String, String>, remove: &[String]) -> Option<&Device> {
        let device = self.devices.get_mut(id)?;
        for key in remove {
            device.operator_labels.remove(key);
        }
        device.operator_labels.extend(set.iter().map(|(k, v)| (k.clone(), v.clone())));
        Some(device)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const LIVENESS: Liveness = Liveness::DEFAULT;

    fn id(s: &str) -> DeviceId {
        DeviceId::new(s).unwrap()
    }

    fn presence(state: PresenceState) -> Presence {
        Presence { state, agent_version: "0.1.0".into(), boot_id: "b".into(), started_at: 1 }
    }

    #[test]
    fn online_presence_registers_and_heartbeats_only_touch_memory() {
        let mut f = Fleet::default();
        assert_eq!(
            f.apply(&id("a"), FleetEvent::Presence(presence(PresenceState::Online)), Delivery::Live, 1000),
            Change::Persist
        );
        assert_eq!(
            f.apply(&id("a"), FleetEvent::Heartbeat(Heartbeat::default()), Delivery::Live, 2000),
            Change::InMemory
        );
        assert_eq!(f.get(&id("a")).unwrap().last_seen, 2000);
        // The same retained presence again (a controller resubscribe) persists nothing.
        assert_eq!(
            f.apply(&id("a"), FleetEvent::Presence(presence(PresenceState::Online)), Delivery::Live, 3000),
            Change::InMemory
        );
    }

    #[test]
    fn unknown_devices_are_not_created_by_heartbeats_or_wills() {
        let mut f = Fleet::default();
        for ev in [
            FleetEvent::Heartbeat(Heartbeat::default()),
            FleetEvent::Seen,
            FleetEvent::Presence(presence(PresenceState::Offline)),
        ] {
            assert_eq!(f.apply(&id("ghost"), ev, Delivery::Live, 1), Change::UnknownDevice);
        }
        assert!(f.is_empty());
        assert_eq!(f.apply(&id("ghost"), FleetEvent::Inventory(Box::default()), Delivery::Live, 1), Change::Persist);
        assert_eq!(f.len(), 1);
    }

    #[test]
    fn status_follows_presence_and_silence() {
        let mut f = Fleet::default();
        let a = id("a");
        f.apply(&a, FleetEvent::Presence(presence(PresenceState::Online)), Delivery::Live, 1_000);
        let d = f.get(&a).unwrap();
        assert_eq!(d.status(1_000 + 60_000, &LIVENESS), Status::Online);
        assert_eq!(d.status(1_000 + 60_001, &LIVENESS), Status::Stale);
        f.apply(&a, FleetEvent::Heartbeat(Heartbeat::default()), Delivery::Live, 61_500);
        assert_eq!(f.get(&a).unwrap().status(62_000, &LIVENESS), Status::Online);
        assert_eq!(
            f.apply(&a, FleetEvent::Presence(presence(PresenceState::Offline)), Delivery::Live, 63_000),
            Change::Persist
        );
        assert_eq!(f.get(&a).unwrap().status(63_000, &LIVENESS), Status::Offline);
        // A Will does not count as being heard from.
        assert_eq!(f.get(&a).unwrap().last_seen, 61_500);
    }

    #[test]
    fn a_device_that_heartbeats_rarely_is_judged_by_its_own_interval() {
        let a = id("a");
        let quiet = || {
            let mut f = Fleet::default();
            f.apply(&a, FleetEvent::Presence(presence(PresenceState::Online)), Delivery::Live, 0);
            let inv = Inventory { heartbeat_interval_s: 300, ..Default::default() };
            f.apply(&a, FleetEvent::Inventory(Box::new(inv)), Delivery::Live, 1_000);
            f
        };
        let mut f = quiet();
        let d = f.get(&a).unwrap();
        // Quiet for four minutes is normal for it; past two intervals it is stale.
        assert_eq!(d.status(1_000 + 240_000, &LIVENESS), Status::Online);
        assert_eq!(d.status(1_000 + 600_000, &LIVENESS), Status::Online);
        assert_eq!(d.status(1_000 + 600_001, &LIVENESS), Status::Stale);
        // Taken for offline without a Will past three intervals, not two minutes.
        assert!(f.expire_silent(1_000 + 900_000, &LIVENESS).is_empty());
        assert_eq!(f.expire_silent(1_000 + 900_001, &LIVENESS).len(), 1);

        // After a start that restarted the broker too (the embedded one),
        // every live device reconnects: one not heard since gets no more
        // than the controller's own windows. With an external broker it
        // keeps its own (it has no reason to reconnect).
        let restarted = Liveness { since_ms: 2_000, broker_started_with_us: true, ..LIVENESS };
        let external = Liveness { broker_started_with_us: false, ..restarted };
        let mut f = quiet();
        // Stale from the start until heard, not only past the window: the
        // store's "online" is from before the restart.
        assert_eq!(f.get(&a).unwrap().status(2_000 + 1, &restarted), Status::Stale);
        assert_eq!(f.get(&a).unwrap().status(2_000 + 60_001, &restarted), Status::Stale);
        assert_eq!(f.get(&a).unwrap().status(2_000 + 60_001, &external), Status::Online);
        assert!(f.expire_silent(2_000 + 120_001, &external).is_empty());
        f.apply(&a, FleetEvent::Heartbeat(Heartbeat::default()), Delivery::Live, 3_000);
        assert_eq!(f.get(&a).unwrap().status(3_000 + 600_000, &restarted), Status::Online);
        assert_eq!(quiet().expire_silent(2_000 + 120_001, &restarted).len(), 1);

        // A fast one keeps the controller's settings: they are the floor.
        let mut g = Fleet::default();
        g.apply(
            &a,
            FleetEvent::Inventory(Box::new(Inventory { heartbeat_interval_s: 1, ..Default::default() })),
            Delivery::Live,
            0,
        );
        assert_eq!(g.get(&a).unwrap().status(60_001, &LIVENESS), Status::Stale);
    }

    #[test]
    fn an_inventory_names_the_agent_that_runs() {
        let mut f = Fleet::default();
        let a = id("a");
        f.apply(&a, FleetEvent::Presence(presence(PresenceState::Online)), Delivery::Live, 1);
        let inv = Inventory { agent_version: "0.2.0".into(), ..Default::default() };
        assert_eq!(f.apply(&a, FleetEvent::Inventory(Box::new(inv)), Delivery::Live, 2), Change::Persist);
        assert_eq!(f.get(&a).unwrap().presence.agent_version, "0.2.0");
        // An inventory that names none (an old agent's) leaves it.
        f.apply(&a, FleetEvent::Inventory(Box::default()), Delivery::Live, 3);
        assert_eq!(f.get(&a).unwrap().presence.agent_version, "0.2.0");
    }

    #[test]
    fn operator_labels_override_agent_labels() {
        let mut f = Fleet::default();
        let a = id("a");
        let inv = Inventory {
            labels: vec![("site".into(), "lyon".into()), ("role".into(), "x".into())],
            ..Default::default()
        };
        f.apply(&a, FleetEvent::Inventory(Box::new(inv)), Delivery::Live, 1);
        let set = BTreeMap::from([("role".to_string(), "gateway".to_string()), ("tier".into(), "1".into())]);
        f.relabel(&a, &set, &[]).unwrap();
        let l = f.get(&a).unwrap().labels();
        assert_eq!((l["site"].as_str(), l["role"].as_str(), l["tier"].as_str()), ("lyon", "gateway", "1"));
        f.relabel(&a, &BTreeMap::new(), &["role".into()]).unwrap();
        assert_eq!(f.get(&a).unwrap().labels()["role"], "x");
        assert!(f.relabel(&id("nope"), &set, &[]).is_none());
    }

    #[test]
    fn silence_ends_in_offline_in_bounded_time_and_a_live_message_brings_it_back() {
        let mut f = Fleet::default();
        let a = id("a");
        f.apply(&a, FleetEvent::Presence(presence(PresenceState::Online)), Delivery::Live, 1_000);
        // Its Last Will never comes (the broker lost it): the controller decides.
        assert!(f.expire_silent(1_000 + 120_000, &LIVENESS).is_empty());
        let expired = f.expire_silent(1_000 + 120_001, &LIVENESS);
        assert_eq!(expired.iter().map(|d| d.id.as_str()).collect::<Vec<_>>(), ["a"]);
        let d = f.get(&a).unwrap();
        assert_eq!((d.status(121_001, &LIVENESS), d.offline_for(121_001 + 5_000)), (Status::Offline, 5_000));
        assert!(f.expire_silent(500_000, &LIVENESS).is_empty(), "expired twice");
        // A partition heals without a new session: its next heartbeat is proof enough.
        assert_eq!(f.apply(&a, FleetEvent::Heartbeat(Heartbeat::default()), Delivery::Live, 600_000), Change::Persist);
        let d = f.get(&a).unwrap();
        assert_eq!((d.status(600_000, &LIVENESS), d.offline_since), (Status::Online, None));
    }

    #[test]
    fn a_refusal_is_kept_beside_the_last_report_of_what_runs() {
        let mut f = Fleet::default();
        let a = id("a");
        f.apply(&a, FleetEvent::Presence(presence(PresenceState::Online)), Delivery::Live, 1);
        let runs = Report { generation: 3, workloads: vec![Default::default()], ..Default::default() };
        f.apply(&a, FleetEvent::Report(runs.clone()), Delivery::Live, 2);
        let refused = Report { generation: 3, refused: Some("generation 2 is not newer".into()), ..Default::default() };
        assert_eq!(f.apply(&a, FleetEvent::Report(refused.clone()), Delivery::Live, 3), Change::Persist);
        let d = f.get(&a).unwrap();
        assert_eq!(d.report.as_ref(), Some(&runs), "a refusal erased what the device runs");
        assert_eq!(d.refusal, Some(Refusal { at_ms: 3, reason: "generation 2 is not newer".into() }));
        assert_eq!(d.applied_generation(), 3);
        // The same refusal again is not news for the store.
        assert_eq!(f.apply(&a, FleetEvent::Report(refused), Delivery::Live, 4), Change::InMemory);
    }

    #[test]
    fn retained_messages_are_old_news_and_the_grace_counts_from_going_offline() {
        let mut f = Fleet::default();
        let a = id("a");
        f.apply(&a, FleetEvent::Presence(presence(PresenceState::Online)), Delivery::Live, 1_000);
        // A controller restarted at 500 s gets the retained online presence of a
        // device that died meanwhile: that proves nothing, silence counts from
        // the controller's start.
        let restarted = Liveness { since_ms: 500_000, ..LIVENESS };
        f.apply(&a, FleetEvent::Presence(presence(PresenceState::Online)), Delivery::Retained, 500_000);
        assert_eq!(f.get(&a).unwrap().last_seen, 1_000, "a retained message moved last_seen");
        assert_eq!(f.get(&a).unwrap().status(500_000 + 60_001, &restarted), Status::Stale);
        assert!(f.expire_silent(500_000 + 120_000, &restarted).is_empty());
        assert_eq!(f.expire_silent(500_000 + 120_001, &restarted).len(), 1);

        // A Will: offline from the moment it arrives, however long ago its last heartbeat was.
        let b = id("b");
        f.apply(&b, FleetEvent::Presence(presence(PresenceState::Online)), Delivery::Live, 1_000);
        f.apply(&b, FleetEvent::Presence(presence(PresenceState::Offline)), Delivery::Live, 60_000);
        let d = f.get(&b).unwrap();
        assert_eq!((d.offline_since, d.last_seen, d.offline_for(65_000)), (Some(60_000), 1_000, 5_000));
        // It reconnected while the controller was away: a retained online
        // presence is believed, and its silence counts from now.
        f.apply(&b, FleetEvent::Presence(presence(PresenceState::Online)), Delivery::Retained, 90_000);
        let d = f.get(&b).unwrap();
        assert_eq!((d.status(90_000, &LIVENESS), d.last_seen, d.offline_since), (Status::Online, 90_000, None));
    }
}
