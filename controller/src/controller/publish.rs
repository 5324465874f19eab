//! Desired documents out: placement and composition (`desired`, pure) →
//! sealed, signed, stored, then sent through the outbox; re-sent to devices
//! still behind after a minute, republished after a broker (re)connect, and
//! reasserted over documents on the broker this controller did not issue and
//! over its own older ones that stay there.

use std::collections::BTreeMap;
use std::sync::atomic::Ordering::Relaxed;

use baton_protocol::{crypto, encode, Desired, DeviceId, Message};

use crate::commands::Outgoing;
use crate::desired;
use crate::fleet::{Fleet, Millis, Status};
use crate::keys::Keys;
use crate::schedule::Schedule;

use super::{lock, Controller, SealCache, Snapshot, State};

/// An online device still behind its document this long gets it again.
pub(super) const RESEND_BEHIND_MS: Millis = 60_000;

/// An online device that says it holds no document at all and connected
/// after its document was issued (a reflashed device under its old id,
/// whose broker session outlived its data) gets its document again this
/// soon: the broker will not hand its kept subscription the retained copy,
/// and nothing on the device can be in the middle of applying one.
pub(super) const RESEND_EMPTY_MS: Millis = 5_000;

/// An older document of this controller's still the last one seen on a
/// device's topic this long after is a stale copy, not an echo.
pub(super) const ECHO_MS: Millis = 5_000;

/// A desired document as it travels: encoded, then signed for `device`.
pub(super) fn sign_desired(
    keys: &Keys,
    device: &str,
    doc: &Desired,
) -> Result<Vec<u8>, baton_protocol::codec::EncodeError> {
    let inner = encode(&Message::Desired(doc.clone()))?;
    encode(&Message::SignedDesired(keys.signing.sign_desired(device, inner)))
}

impl Controller {
    /// An online device that has not applied the document it was given for a
    /// minute gets it again (a message lost on the way: an agent killed
    /// between receiving and keeping it, a broker that lost its retained copy).
    /// Every minute while it stays behind; a refusal shows as an event.
    pub(super) fn resend_to_devices_behind(&self, fleet: &Fleet, st: &mut State, now: Millis) {
        // "Holds none" counts only for a device that connected after its
        // document was issued (a reflashed one): one connected before gets it
        // from its subscription, however long a push to the whole fleet takes.
        let behind: BTreeMap<&str, bool> = fleet
            .devices()
            .filter(|d| d.status(now, &self.liveness) == Status::Online)
            .filter_map(|d| {
                let doc = st.desired.get(&d.id).filter(|doc| d.applied_generation() < doc.generation)?;
                Some((d.id.as_str(), d.applied_generation() == 0 && d.connected_at > doc.issued_ms))
            })
            .collect();
        st.behind.retain(|id, _| behind.contains_key(id.as_str()));
        for (id, empty) in behind {
            let (since, sent) = st.behind.entry(id.to_string()).or_insert((now, false));
            // Once soon for a device with no document, then every minute.
            let wait = if empty && !*sent { RESEND_EMPTY_MS } else { RESEND_BEHIND_MS };
            if now.saturating_sub(*since) < wait {
                continue;
            }
            (*since, *sent) = (now, true);
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

    /// Recomputes placement and every device's desired document; stores and
    /// publishes the ones that changed, each with the next generation.
    pub fn sync_desired(&self, now: Millis) {
        let snap = self.snapshot(now);
        let mut st = lock(&self.state);
        let schedule = self.compute_schedule(&st, &snap.facts);
        self.publish(&mut st, schedule, &snap);
    }

    /// Composes every device's document (`desired::compose`), seals its
    /// secrets to the device, and stores then sends those `desired::issue`
    /// calls new; remembers the placement and endpoints they were made from.
    pub(super) fn publish(&self, st: &mut State, schedule: Schedule, snap: &Snapshot) {
        let serving = desired::used_serving(&st.workloads, &snap.serving);
        let endpoints = desired::endpoints(&st.workloads, &schedule, &serving);
        let unplaced_changed: Vec<(String, u32)> = schedule
            .unplaced
            .iter()
            .filter(|(name, n)| st.schedule.unplaced.get(*name) != Some(*n))
            .map(|(name, n)| (name.clone(), *n))
            .collect();
        let docs = desired::compose(&st.workloads, &schedule, &snap.facts, &endpoints);
        st.serving = serving;
        st.gone = snap.facts.iter().filter(|d| d.gone).map(|d| d.id.clone()).collect();
        st.schedule = schedule;
        let store = lock(&self.store);
        // Replicas that fit nowhere are a symptom an operator must see, not only a log line.
        for (name, n) in unplaced_changed {
            tracing::warn!(workload = %name, replicas = n, "replicas fit on no device");
            let tenant = st.workloads.get(&name).map_or("", |e| e.tenant.as_str());
            let message = format!(
                "{n} replica(s) fit on no device: no other reachable device matches its placement with room for its requests"
            );
            self.event(&store, tenant, "workload.unplaced", &name, message, snap.now);
        }
        let mut cache = std::mem::take(&mut st.sealed);
        let mut sealed = SealCache::new();
        let facts: BTreeMap<&str, &crate::schedule::DeviceFacts> =
            snap.facts.iter().map(|f| (f.id.as_str(), f)).collect();
        // Each window's spans, computed once for every device it applies to.
        let mut windows = BTreeMap::new();
        let mut unstored = false;
        for desired::Composed { device, workloads, services, service_ports, load_reports } in docs {
            let workloads = self.seal(&store, &mut cache, &mut sealed, &device, snap.sealing.get(&device), workloads);
            let applied = snap.applied.get(&device).copied().unwrap_or(0);
            let agent = st
                .agent_rollout
                .as_ref()
                .zip(facts.get(device.as_str()))
                .and_then(|(r, f)| r.target_for(f, &st.releases));
            let updates = workloads
                .iter()
                .filter_map(|w| {
                    let u = st.workloads.get(&w.name)?.manifest.updates.as_ref()?;
                    let labels = facts.get(device.as_str()).map(|f| &f.labels)?;
                    Some(crate::windows::policy_for(&w.name, u, labels, snap.now, &mut windows))
                })
                .collect();
            let mut doc = Desired {
                generation: 0,
                workloads,
                services,
                issued_ms: snap.now,
                agent,
                service_ports,
                load_reports,
                updates,
            };
            doc.generation = match desired::issue(st.desired.get(&device), &doc, applied) {
                desired::Issue::Unchanged => continue,
                desired::Issue::New { generation, ahead } => {
                    if let Some((applied, stored)) = ahead {
                        let tenant = snap.facts.iter().find(|f| f.id == device).map_or("", |f| f.tenant.as_str());
                        let message = format!(
                            "has generation {applied} in force, newer than the {stored} this controller issued \
                             (store restored from a backup?): its document is issued again as generation {generation}"
                        );
                        self.event(&store, tenant, "device.reissued", &device, message, snap.now);
                    }
                    generation
                }
            };
            let generation = doc.generation;
            let payload = match self.sign(&device, &doc) {
                Ok(p) => p,
                Err(e) => {
                    tracing::error!(%device, error = %e, "cannot encode a desired document; not publishing it");
                    continue;
                }
            };
            if let Err(e) = store.save_desired(&device, generation, &doc.workloads, &payload) {
                self.metrics.store_errors.fetch_add(1, Relaxed);
                if !unstored {
                    tracing::error!(%device, error = %e, "cannot store a desired document; not publishing it (every document not stored is tried again on the next tick)");
                }
                unstored = true;
                continue;
            }
            tracing::debug!(%device, generation, workloads = doc.workloads.len(), "desired document changed");
            if let Ok(id) = DeviceId::new(device.clone()) {
                let _ = self.outbox.send(Outgoing::Desired(id, payload));
            }
            st.desired.insert(device, doc);
        }
        // Seals no document uses any more are dropped, except those of a
        // workload's stable revision while the workload is on the device
        // (its document names another revision now): a rollback to it sends
        // the very bytes the running container came from.
        for ((device, workload, path, reference), seal) in cache {
            let stable = st.workloads.get(&workload).and_then(|e| e.revisions.get(&e.stable));
            let keep = stable
                .is_some_and(|spec| spec.container.files.iter().any(|f| f.path == path && f.contents == reference))
                && st.desired.get(&device).is_some_and(|d| d.workloads.iter().any(|w| w.name == workload));
            if keep {
                sealed.entry((device, workload, path, reference)).or_insert(seal);
            }
        }
        st.sealed = sealed;
        if unstored {
            // The next tick computes them again (a store that was away: a
            // rollout's wave must still reach its devices).
            self.desired_stale.store(true, Relaxed);
        }
    }

    /// The document as it travels: encoded, then signed for `device`.
    pub(super) fn sign(&self, device: &str, doc: &Desired) -> Result<Vec<u8>, baton_protocol::codec::EncodeError> {
        sign_desired(&self.keys, device, doc)
    }

    /// What the broker holds on a device's `desired` topic (the controller
    /// subscribes to them): if it is not the document this controller issued
    /// (garbage, a forgery, a copy from another store), it is published again
    /// (see `reassert`); an older one of its own, if it stays (see
    /// `reassert_stale_copies`).
    pub fn check_desired(&self, id: &DeviceId, payload: &[u8], now: Millis) {
        if !self.acting.load(Relaxed) {
            return; // another controller may hold the store now: publish nothing from memory
        }
        let mut st = lock(&self.state);
        let Some(doc) = st.desired.get(id.as_str()) else { return };
        let Ok(ours) = self.sign(id.as_str(), doc) else { return };
        if ours == payload {
            st.older_on_topic.remove(id.as_str());
            return;
        }
        if self.own_older_document(id.as_str(), payload, doc.generation) {
            // The echo of a publish a newer one is replacing, or a stale copy
            // (a bridge or a restored broker replaying what it kept): told
            // apart by whether the newer one follows (see `reassert_stale_copies`).
            st.older_on_topic.entry(id.to_string()).or_insert(now);
            return;
        }
        if self.reassert(&mut st, id, ours, now) {
            tracing::warn!(device = %id, len = payload.len(), "the broker held a desired document this controller did not issue; publishing its own again");
        }
    }

    /// Publishes `ours` over what the broker holds for `id`, at most once
    /// every 10 s per device (two publishers would otherwise fight over the
    /// topic as fast as the broker goes); whether it did.
    fn reassert(&self, st: &mut State, id: &DeviceId, ours: Vec<u8>, now: Millis) -> bool {
        let last = st.reasserted.get(id.as_str()).copied().unwrap_or(0);
        if now.saturating_sub(last) < 10_000 {
            return false;
        }
        st.reasserted.insert(id.to_string(), now);
        let _ = self.outbox.send(Outgoing::Desired(id.clone(), ours));
        true
    }

    /// Devices whose topic still shows an older document of this
    /// controller's `ECHO_MS` after it was seen get the current one again:
    /// a bridge that reconnects, or a broker restored from a backup, replays
    /// old retained copies, and a device that (re)subscribes would be given
    /// one (it refuses an older generation, but a reflashed device takes it).
    pub(super) fn reassert_stale_copies(&self, st: &mut State, now: Millis) {
        if !self.acting.load(Relaxed) {
            return;
        }
        let stale: Vec<String> = st
            .older_on_topic
            .iter()
            .filter(|(_, since)| now.saturating_sub(**since) >= ECHO_MS)
            .map(|(id, _)| id.clone())
            .collect();
        for device in stale {
            let (Some(doc), Ok(id)) = (st.desired.get(&device), DeviceId::new(device.clone())) else {
                st.older_on_topic.remove(&device);
                continue;
            };
            let generation = doc.generation;
            let Ok(ours) = self.sign(&device, doc) else { continue };
            // Kept until published (another reassert may have just gone out).
            if self.reassert(st, &id, ours, now) {
                st.older_on_topic.remove(&device);
                tracing::warn!(%device, generation, "the broker still holds an older document of this controller's (replayed by a bridge or a restored broker); publishing the current one again");
            }
        }
    }

    /// Whether `payload` is one of this controller's own documents for
    /// `device`, older than `generation`: the echo of a publish that a newer
    /// one is already replacing, or a stale copy.
    pub(super) fn own_older_document(&self, device: &str, payload: &[u8], generation: u64) -> bool {
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
}
