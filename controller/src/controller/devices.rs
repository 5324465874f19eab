//! Devices: what their MQTT messages change (`apply`, then stored when
//! durable state moved), silence turned offline, labels, tenants, views.

use std::collections::BTreeMap;
use std::sync::atomic::Ordering::Relaxed;

use baton_protocol::release::UpgradeState;
use baton_protocol::{validate_label, DeviceId, Health, Phase, PresenceState, TopicKind};

use crate::dashboard::{FailingWorkload, Filter, Overview, Row, Sample, StoppedRollout};
use crate::fleet::{Change, Delivery, Device, Fleet, FleetEvent, Liveness, Millis};
use crate::metrics::Rejection;
use crate::rollout::State as RolloutState;
use crate::store::StoreError;
use crate::tenant::Scope;
use crate::view::{DeviceView, LabelChange};

use super::{lock, parse_id, Controller, OpError, Outgoing};

impl Controller {
    /// Applies a decoded device event and persists it when durable state changed.
    pub fn apply(&self, id: &DeviceId, event: FleetEvent, delivery: Delivery, now: Millis) -> Change {
        let is_presence = matches!(event, FleetEvent::Presence(_));
        let came_as = event.what();
        let is_report = matches!(event, FleetEvent::Report(_));
        // What documents are made from: placement's facts, the address
        // services are reached at, the key secrets are sealed to. Only a
        // change there recomputes every device's document (an inventory
        // that says an upgrade moved on does not).
        let relevant = |d: &Device| {
            let inv = d.inventory.as_ref();
            (
                crate::desired::facts_of(d, now, &self.liveness, self.reschedule_after_ms),
                inv.and_then(|i| i.addresses.first().cloned()),
                inv.map(|i| i.sealing_key.clone()),
            )
        };
        let (change, snapshot, placement_relevant) = {
            let mut fleet = lock(&self.fleet);
            let relevant_before = fleet.get(id).map(relevant);
            let upgrade_before = fleet.get(id).and_then(|d| d.inventory.as_ref()?.upgrade.clone());
            let before = fleet.get(id).map(|d| d.presence.state);
            let refused_before = fleet.get(id).and_then(|d| d.refusal.clone());
            let change = fleet.apply(id, event, delivery, now);
            let after = fleet.get(id).map(|d| d.presence.state);
            let placement_relevant = fleet.get(id).map(relevant) != relevant_before;
            // A device's agent upgrade that did not go through, said as an
            // event whether or not a fleet upgrade is still watching (an
            // undo cut by a power loss, a refusal after the upgrade ended).
            if let Some(d) = fleet.get(id) {
                let outcome = d.inventory.as_ref().and_then(|i| i.upgrade.as_ref());
                let failed = outcome.filter(|o| {
                    matches!(o.state, UpgradeState::RolledBack | UpgradeState::Refused)
                        && upgrade_before.as_ref() != Some(*o)
                });
                if let Some(o) = failed {
                    let name = match o.state {
                        UpgradeState::Refused => "agent.device_refused",
                        _ => "agent.device_rolled_back",
                    };
                    let message = format!("agent {} (agent upgrade {}): {}", o.version, o.rollout, o.detail);
                    self.event(&lock(&self.store), &d.tenant, name, id.as_str(), message, now);
                }
            }
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
                    self.event(&lock(&self.store), &d.tenant, "device.refused", id.as_str(), message, now);
                }
            }
            if let Some(d) = fleet.get(id).filter(|_| is_report && change != Change::UnknownDevice) {
                // A workload that cannot run on a device (a pull, a create,
                // a start that failed or stuck, a container lost, a crash
                // loop) says so as an event when its reason is new, not only
                // in describe.
                let news = {
                    let mut said = lock(&self.said_errors);
                    let known = said.entry(id.as_str().to_owned()).or_default();
                    let news = news_of(known, d.report.as_ref());
                    if known.is_empty() {
                        said.remove(id.as_str());
                    }
                    news
                };
                for (workload, error) in news {
                    let message = format!("workload {workload}: {error}");
                    self.event(&lock(&self.store), &d.tenant, "device.workload_error", id.as_str(), message, now);
                }
            }
            if change == Change::Persist && before != after {
                let (name, what) = match (before, after) {
                    (None, _) => ("device.registered", "registered".to_string()),
                    (_, Some(PresenceState::Online)) if is_presence => ("device.online", "online".to_string()),
                    // A partition healed on the same connection, or a
                    // message queued before a reconnect that overtook the
                    // new presence: either way it is alive.
                    (_, Some(PresenceState::Online)) => {
                        ("device.online", format!("online again (a {came_as} arrived)"))
                    }
                    (_, _) => ("device.offline", "offline".to_string()),
                };
                let tenant = fleet.get(id).map_or(crate::tenant::DEFAULT, |d| d.tenant.as_str());
                self.event(&lock(&self.store), tenant, name, id.as_str(), what, now);
            }
            let snapshot = (change == Change::Persist).then(|| fleet.get(id).cloned()).flatten();
            (change, snapshot, placement_relevant)
        };
        match change {
            Change::UnknownDevice => self.metrics.rejected(Rejection::UnknownDevice),
            Change::Persist => {
                if let Some(device) = snapshot {
                    self.persist(&device);
                }
                // A new device, or new labels or architecture: placement may
                // change. Recomputed by the next tick (within a second), once
                // for every device that changed since: a fleet coming online
                // together is one recomputation a second, not one per device.
                if placement_relevant {
                    self.desired_stale.store(true, Relaxed);
                }
            }
            Change::InMemory => {}
        }
        change
    }

    pub(super) fn persist(&self, device: &Device) {
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

    /// One page of the devices `scope` sees that pass `filter`, and how many
    /// pass it in all. Views are built for the page only.
    pub fn devices_page(&self, filter: &Filter, now: Millis, scope: &Scope) -> (usize, Vec<DeviceView>) {
        let fleet = lock(&self.fleet);
        let labels: Vec<(&Device, BTreeMap<String, String>)> =
            fleet.devices().filter(|d| scope.sees(&d.tenant)).map(|d| (d, d.labels())).collect();
        let mut rows: Vec<(Row<'_>, &Device)> = labels
            .iter()
            .map(|(d, l)| (row(d, l, now, &self.liveness), *d))
            .filter(|(r, _)| filter.matches(r))
            .collect();
        let total = rows.len();
        let range = filter.order_by(&mut rows, |(r, _)| r);
        let page = rows[range].iter().map(|(_, d)| DeviceView::new(d, now, &self.liveness)).collect();
        (total, page)
    }

    /// The fleet at a glance (`scope`'s part of it), grouped by label `group`.
    pub fn overview(&self, group: Option<&str>, now: Millis, scope: &Scope) -> Overview {
        let mut o = {
            let fleet = lock(&self.fleet);
            let labels: Vec<(&Device, BTreeMap<String, String>)> =
                fleet.devices().filter(|d| scope.sees(&d.tenant)).map(|d| (d, d.labels())).collect();
            crate::dashboard::overview(labels.iter().map(|(d, l)| row(d, l, now, &self.liveness)), group)
        };
        for w in self.workloads(now, scope) {
            let mut failing = Vec::new();
            let mut reason = String::new();
            for d in &w.devices {
                let Some(r) = &d.reported else { continue };
                let bad = matches!(r.phase, Phase::Failed | Phase::BackingOff | Phase::RolledBack)
                    || r.health == Health::Unhealthy;
                if bad {
                    failing.push(d.device.clone());
                    if reason.is_empty() {
                        reason = r.last_error.clone().unwrap_or_else(|| format!("{:?}, {:?}", r.phase, r.health));
                    }
                }
            }
            if !failing.is_empty() {
                o.attention.failing.push(FailingWorkload { workload: w.name.clone(), devices: failing, reason });
            }
            if let Some(r) = w
                .rollout
                .filter(|r| matches!(r.state, RolloutState::Paused | RolloutState::RolledBack | RolloutState::Aborted))
            {
                o.attention.stopped_rollouts.push(StoppedRollout {
                    workload: w.name,
                    state: r.state,
                    to: r.to,
                    reason: r.reason,
                });
            }
        }
        o
    }

    /// A device's last hour of heartbeats.
    pub fn samples(&self, id: &str, now: Millis, scope: &Scope) -> Result<Vec<Sample>, OpError> {
        let id = parse_id(id)?;
        let fleet = lock(&self.fleet);
        Ok(Self::visible_device(&fleet, &id, scope)?.history.last_hour(now))
    }

    pub fn device(&self, id: &str, now: Millis, scope: &Scope) -> Result<DeviceView, OpError> {
        let id = parse_id(id)?;
        let fleet = lock(&self.fleet);
        let d = Self::visible_device(&fleet, &id, scope)?;
        Ok(DeviceView::new(d, now, &self.liveness))
    }

    /// A device `scope` may see; another tenant's device is "not found", as an unknown one.
    pub(super) fn visible_device<'f>(fleet: &'f Fleet, id: &DeviceId, scope: &Scope) -> Result<&'f Device, OpError> {
        fleet
            .get(id)
            .filter(|d| scope.sees(&d.tenant))
            .ok_or_else(|| OpError::NotFound(format!("device {id} not found")))
    }

    /// The tenant of a known device.
    pub(super) fn device_tenant(&self, id: &DeviceId) -> Option<String> {
        lock(&self.fleet).get(id).map(|d| d.tenant.clone())
    }

    pub fn relabel(&self, id: &str, change: &LabelChange, now: Millis, scope: &Scope) -> Result<DeviceView, OpError> {
        let id = parse_id(id)?;
        for (k, v) in &change.set {
            validate_label(k, v).map_err(|e| OpError::Invalid(e.to_string()))?;
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
        crate::tenant::validate(tenant).map_err(|e| OpError::Invalid(e.to_string()))?;
        let (device, from) = {
            let mut fleet = lock(&self.fleet);
            let from = fleet.get(&id).map(|d| d.tenant.clone());
            let device = fleet.assign(&id, tenant).cloned();
            (device.ok_or_else(|| OpError::NotFound(format!("device {id} not found")))?, from.unwrap_or_default())
        };
        let store = lock(&self.store);
        store.save_device(&device)?;
        self.event(
            &store,
            tenant,
            "device.moved",
            id.as_str(),
            format!("moved from tenant {from} to tenant {tenant}"),
            now,
        );
        drop(store);
        self.sync_desired(now);
        Ok(DeviceView::new(&device, now, &self.liveness))
    }

    /// `baton delete device ID`: forgets an offline device — its record,
    /// its document, what the broker retains for it (so no reconnect of
    /// this controller brings it back) — and places its workloads again
    /// without it: a dead Pi stops counting. Its credentials, revocation and
    /// events stay (`revoke` is what keeps it out); an agent that comes back
    /// under the id registers anew and gets a fresh document. A connected
    /// device is refused: its agent would only register it again.
    pub fn delete_device(&self, id: &str, now: Millis, scope: &Scope) -> Result<(), OpError> {
        let id = parse_id(id)?;
        let tenant = {
            let mut fleet = lock(&self.fleet);
            let d = Self::visible_device(&fleet, &id, scope)?;
            if d.presence.state == PresenceState::Online {
                return Err(OpError::Invalid(format!(
                    "device {id} is connected: stop its agent (or revoke it: baton device revoke {id}), then delete it"
                )));
            }
            let tenant = d.tenant.clone();
            fleet.remove(&id);
            tenant
        };
        let store = lock(&self.store);
        store.delete_device(id.as_str())?;
        self.event(&store, &tenant, "device.deleted", id.as_str(), "deleted: forgotten with its document".into(), now);
        drop(store);
        lock(&self.state).desired.remove(id.as_str());
        lock(&self.said_errors).remove(id.as_str());
        for kind in [TopicKind::Desired, TopicKind::Presence, TopicKind::Inventory, TopicKind::Report] {
            // Ingest hears its own clearing of what it subscribes to: expected, not garbage.
            if kind != TopicKind::Desired {
                lock(&self.cleared).insert(id.topic(kind));
            }
            let _ = self.outbox.send(Outgoing::Retained(id.topic(kind), Vec::new()));
        }
        self.desired_stale.store(true, Relaxed);
        self.sync_desired(now);
        Ok(())
    }

    /// Devices silent past `offline_after` are offline, whatever the broker
    /// said (it may have lost their Last Will): stored, and recorded as an event.
    pub(super) fn expire_silent(&self, now: Millis) -> bool {
        let expired = lock(&self.fleet).expire_silent(now, &self.liveness);
        for d in &expired {
            self.persist(d);
            let silent_s = now.saturating_sub(d.last_seen.max(self.liveness.since_ms)) / 1000;
            let why = format!("offline: silent for {silent_s} s (no goodbye and no Last Will received)");
            self.event(&lock(&self.store), &d.tenant, "device.offline", &d.id, why, now);
        }
        !expired.is_empty()
    }
}

/// What lists and the overview filter a device on.
fn row<'a>(d: &'a Device, labels: &'a BTreeMap<String, String>, now: Millis, liveness: &Liveness) -> Row<'a> {
    Row {
        id: &d.id,
        tenant: &d.tenant,
        status: d.status(now, liveness),
        labels,
        agent_version: &d.presence.agent_version,
        arch: d.inventory.as_ref().map_or("", |i| i.arch.as_str()),
        last_seen: d.last_seen,
    }
}

/// The workload errors in `report` not yet said, remembering them in
/// `said` (workload → the error without its digits: the same failure again
/// with another pid, port or attempt count is not news). While a workload
/// is pending, pulling or starting, its text is where it stands ("pulling
/// IMAGE"), and what was said stays remembered, so each retry of a failing
/// pull is not news; a workload that runs without an error, or is gone,
/// is forgotten. A crash loop with no error text is said by its exit code.
fn news_of(said: &mut BTreeMap<String, String>, report: Option<&baton_protocol::Report>) -> Vec<(String, String)> {
    let workloads = report.map(|r| r.workloads.as_slice()).unwrap_or_default();
    said.retain(|name, _| workloads.iter().any(|w| w.name == *name));
    let mut news = Vec::new();
    for w in workloads {
        if matches!(w.phase, Phase::Pending | Phase::Pulling | Phase::Starting) {
            continue;
        }
        let error = w.last_error.clone().or_else(|| {
            let code = w.last_exit_code.filter(|c| *c != 0)?;
            matches!(w.phase, Phase::BackingOff | Phase::Failed)
                .then(|| format!("exited with code {code}; {} restarts so far", w.restarts))
        });
        // A successor's pull under way (`revision N: pulling IMAGE`, the old
        // revision running meanwhile) is progress, not an error: every
        // update would page whoever listens for workload errors.
        let progress = |e: &String| {
            let rest = e.strip_prefix("revision ").and_then(|r| r.split_once(": ")).map_or(e.as_str(), |(_, r)| r);
            rest.starts_with("pulling ")
        };
        let Some(error) = error.filter(|e| !progress(e)) else {
            said.remove(&w.name);
            continue;
        };
        let shape: String = error.chars().filter(|c| !c.is_ascii_digit()).collect();
        if said.get(&w.name) != Some(&shape) {
            said.insert(w.name.clone(), shape);
            news.push((w.name.clone(), error));
        }
    }
    news
}

#[cfg(test)]
mod tests {
    use super::*;
    use baton_protocol::{Report, WorkloadStatus};

    /// (name, phase, last error, last exit code, restarts)
    type Row<'a> = (&'a str, Phase, Option<&'a str>, Option<i32>, u32);

    fn report(workloads: &[Row<'_>]) -> Report {
        Report {
            workloads: workloads
                .iter()
                .map(|(name, phase, error, code, restarts)| WorkloadStatus {
                    name: (*name).into(),
                    phase: *phase,
                    last_error: error.map(Into::into),
                    last_exit_code: *code,
                    restarts: *restarts,
                    ..Default::default()
                })
                .collect(),
            ..Default::default()
        }
    }

    #[test]
    fn a_workload_error_is_news_once_per_reason() {
        let mut said = BTreeMap::new();
        let refused = "pull reg:5000/app:1: reg:5000: io: Connection refused (os error 111)";
        let mut news =
            |r: Report| news_of(&mut said, Some(&r)).into_iter().map(|(w, e)| format!("{w}: {e}")).collect::<Vec<_>>();
        // A failing pull retried: pulling, failed, pulling, failed — said once.
        assert!(news(report(&[("web", Phase::Pulling, Some("pulling reg:5000/app:1"), None, 0)])).is_empty());
        assert_eq!(news(report(&[("web", Phase::BackingOff, Some(refused), None, 0)])), [format!("web: {refused}")]);
        assert!(news(report(&[("web", Phase::Pulling, Some("pulling reg:5000/app:1"), None, 0)])).is_empty());
        assert!(news(report(&[("web", Phase::BackingOff, Some(refused), None, 1)])).is_empty());
        // Another pid or port is the same failure; another reason is news.
        assert!(news(report(&[("web", Phase::BackingOff, Some(&refused.replace("5000", "5001")), None, 1)])).is_empty());
        assert_eq!(news(report(&[("web", Phase::BackingOff, Some("no space on the data disk"), None, 1)])).len(), 1);
        // Running clean forgets it: the same failure later is news again.
        assert!(news(report(&[("web", Phase::Running, None, None, 1)])).is_empty());
        assert_eq!(news(report(&[("web", Phase::BackingOff, Some(refused), None, 1)])).len(), 1);
        // A crash loop with no error text: said by its exit code, once.
        let crash = news(report(&[("job", Phase::BackingOff, None, Some(3), 1)]));
        assert_eq!(crash, ["job: exited with code 3; 1 restarts so far"]);
        assert!(news(report(&[("job", Phase::BackingOff, None, Some(3), 7)])).is_empty());
        // An update's pull under way beside the running revision is progress;
        // its failure is news.
        let pulling = "revision 2: pulling reg:5000/app:2";
        assert!(news(report(&[("web", Phase::Running, Some(pulling), None, 0)])).is_empty());
        let failed = "revision 2: pull reg:5000/app:2: refused";
        assert_eq!(news(report(&[("web", Phase::Running, Some(failed), None, 0)])), [format!("web: {failed}")]);
        assert!(news(report(&[("web", Phase::Running, None, None, 0)])).is_empty());
        // A clean exit is not an error; a workload gone is forgotten.
        assert!(news(report(&[("done", Phase::Exited, None, Some(0), 0)])).is_empty());
        assert!(news(report(&[])).is_empty());
        assert!(said.is_empty(), "{said:?}");
    }
}
