//! Workloads: apply (new revisions only when a spec changes), scale,
//! delete, rollouts started, stepped and steered, views.

use std::collections::BTreeMap;

use baton_protocol::spec::WorkloadSpec;
use baton_protocol::DeviceId;

use crate::desired::Entry;
use crate::fleet::{Device, Fleet, Millis, Status};
use crate::rollout::{Observation, Rollout, State as RolloutState};
use crate::schedule::{schedule, DeviceFacts, Placed, Schedule};
use crate::store::{Store, REVISION_HISTORY};
use crate::tenant::Scope;
use crate::view::{ApplyResult, RevisionView, RolloutAction, RolloutView, WorkloadOnDevice, WorkloadView};
use crate::workload::Validated;

use super::{lock, Controller, OpError, State};

impl Controller {
    /// The digest already pinned for `image` in `workload`'s newest
    /// revision, if any (kept when the registry cannot answer at apply).
    pub fn pinned_digest(&self, workload: &str, image: &str) -> Option<String> {
        let st = lock(&self.state);
        let latest = st.workloads.get(workload)?.latest_spec();
        (latest.image == image && !latest.image_digest.is_empty()).then(|| latest.image_digest.clone())
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
                let inv = fleet.get(&DeviceId::new(d.device.clone()).ok()?)?.inventory.as_ref()?;
                let wanted = crate::pinning::missing_platform(&inv.arch, &inv.arch_variant, platforms)?;
                Some((d.device.clone(), wanted))
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
    pub(super) fn store_applied(
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
        for mut v in validated {
            let name = v.spec.name.clone();
            // An autoscaled workload keeps the count it runs at (within the
            // new range); `replicas` is only where a new one starts.
            let mut note = None;
            if let Some(a) = &v.manifest.autoscale {
                let current = st.workloads.get(&name).and_then(|e| e.manifest.replicas);
                let given = v.manifest.replicas;
                let wanted = current.or(given).unwrap_or(a.min);
                let count = wanted.clamp(a.min, a.max);
                v.manifest.replicas = Some(count);
                if count != wanted {
                    let why = format!("{wanted} replicas is outside autoscale's range {}..={}: {count}", a.min, a.max);
                    if current.is_some() {
                        let message =
                            format!("autoscaled from {wanted} to {count} replicas: the range changed ({why})");
                        self.event(store, tenant, "workload.autoscaled", &name, message, now);
                    }
                    note = Some(why);
                } else if current.is_none() && given.is_none() {
                    note = Some(format!("autoscaled: starts at min, {count} replica(s)"));
                }
            }
            let Some(e) = st.workloads.get_mut(&name) else {
                let spec = WorkloadSpec { revision: 1, ..v.spec };
                store.save_workload(tenant, &v.manifest, &spec, 1, now)?;
                store.save_revision(&spec, &[], now)?;
                self.event(store, tenant, "workload.created", &name, format!("created with image {}", spec.image), now);
                let entry = Entry {
                    tenant: tenant.into(),
                    manifest: v.manifest,
                    revisions: BTreeMap::from([(1, spec)]),
                    latest: 1,
                    stable: 1,
                    rollout: None,
                };
                st.workloads.insert(name.clone(), entry);
                results.push(ApplyResult { name, revision: 1, action: "created".into(), note });
                continue;
            };
            // A file that sets another count than the workload runs at (say,
            // one `baton scale` changed) says so: it is easy to undo a scale
            // by re-applying the file that predates it.
            if note.is_none() && e.manifest.replicas != v.manifest.replicas {
                let shown = |r: Option<u32>| r.map_or("one per matching device".to_string(), |n| n.to_string());
                note = Some(format!(
                    "replicas {} → {} (the file's)",
                    shown(e.manifest.replicas),
                    shown(v.manifest.replicas)
                ));
            }
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
                    store.save_workload(&e.tenant, &e.manifest, e.latest_spec(), e.stable, now)?;
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
            results.push(ApplyResult { name, revision: e.latest, action: action.into(), note });
        }
        let schedule = self.compute_schedule(st, facts);
        let applied: Vec<String> = results.iter().map(|r| r.name.clone()).collect();
        // A name in allow_from that is no workload (a typo) would shut out every client: said.
        for r in &mut results {
            let Some(names) = st.workloads.get(&r.name).and_then(|e| e.manifest.allow_from.as_ref()) else { continue };
            let unknown: Vec<&str> =
                names.iter().filter(|n| !st.workloads.contains_key(*n)).map(String::as_str).collect();
            if !unknown.is_empty() && r.note.is_none() {
                r.note = Some(format!("allow_from names {}, which is no workload (yet)", unknown.join(", ")));
            }
        }
        if let Some(clash) = crate::desired::port_clash(&st.workloads, &schedule, &applied) {
            return Err(OpError::Invalid(clash));
        }
        for (name, from, to) in roll {
            self.start_rollout(st, store, &schedule, facts, &name, from, to, now)?;
        }
        Ok((results, schedule))
    }

    /// Starts moving `name`'s devices from revision `from` to `to`: the
    /// devices placed now, reachable ones first (a canary that is away would
    /// hold the first wave), then by id.
    #[allow(clippy::too_many_arguments)]
    pub(super) fn start_rollout(
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
            store.save_workload(&e.tenant, &e.manifest, e.latest_spec(), e.stable, now)?;
            let message = format!("revision {to} in force (no device runs {name} yet)");
            self.event(store, &e.tenant, "rollout.in_force", name, message, now);
            return Ok(());
        }
        let strategy = crate::workload::strategy(&e.manifest).unwrap_or_default();
        let ids = devices.iter().map(|d| d.id.clone()).collect();
        let budget = e.manifest.disruption.as_ref().map(|d| budget(d, &devices));
        let r = Rollout::with_budget(name, from, to, ids, strategy, budget, now);
        store.save_rollout(&r)?;
        self.event(
            store,
            &e.tenant,
            "rollout.started",
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

    pub fn delete_workload(&self, name: &str, now: Millis, scope: &Scope) -> Result<(), OpError> {
        {
            let mut st = lock(&self.state);
            let tenant = Self::visible_workload(&st, name, scope)?.tenant.clone();
            st.workloads.remove(name);
            let store = lock(&self.store);
            store.delete_workload(name)?;
            self.event(&store, &tenant, "workload.deleted", name, "deleted".into(), now);
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
            if let Some(a) = &e.manifest.autoscale {
                return Err(OpError::Invalid(format!(
                    "workload {name} is autoscaled between {} and {} replicas: change autoscale in its manifest \
                     (or remove it) to set the count by hand",
                    a.min, a.max
                )));
            }
            let before = e.manifest.replicas;
            e.manifest.replicas = Some(replicas);
            let store = lock(&self.store);
            store.save_workload(&e.tenant, &e.manifest, e.latest_spec(), e.stable, now)?;
            let was = before.map_or_else(|| "every device".to_string(), |n| n.to_string());
            self.event(
                &store,
                &e.tenant,
                "workload.scaled",
                name,
                format!("scaled from {was} to {replicas} replicas"),
                now,
            );
        }
        self.sync_desired(now);
        self.workload(name, now, scope)
    }

    /// `baton rollout pause|resume|abort|undo`.
    pub fn rollout_action(
        &self,
        name: &str,
        action: RolloutAction,
        now: Millis,
        scope: &Scope,
    ) -> Result<RolloutView, OpError> {
        let snap = self.snapshot(now);
        let facts = &snap.facts;
        let mut st = lock(&self.state);
        let store = lock(&self.store);
        let e = Self::visible_workload_mut(&mut st, name, scope)?;
        let tenant = e.tenant.clone();
        let no_rollout = || OpError::Invalid(format!("workload {name} has no rollout"));
        let message = match action {
            RolloutAction::Pause | RolloutAction::Resume | RolloutAction::Abort => {
                let r = e.rollout.as_mut().ok_or_else(no_rollout)?;
                match action {
                    RolloutAction::Pause => r.pause(),
                    RolloutAction::Resume => r.resume(),
                    _ => r.abort(now),
                }
                .map_err(|e| OpError::Invalid(e.to_string()))?;
                store.save_rollout(r)?;
                match action {
                    RolloutAction::Pause => format!("rollout of revision {} paused", r.to),
                    RolloutAction::Resume => format!("rollout of revision {} resumed", r.to),
                    _ => format!("rollout of revision {} aborted: devices go back to revision {}", r.to, r.from),
                }
            }
            RolloutAction::Undo => {
                if let Some(r) = e.rollout.as_mut().filter(|r| r.state.active()) {
                    r.abort(now).map_err(|e| OpError::Invalid(e.to_string()))?;
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
        };
        let event = match action {
            RolloutAction::Pause => "rollout.paused",
            RolloutAction::Resume => "rollout.resumed",
            RolloutAction::Abort => "rollout.aborted",
            RolloutAction::Undo => "rollout.undone",
        };
        self.event(&store, &tenant, event, name, message, now);
        drop(store);
        let view = st.workloads.get(name).and_then(|e| e.rollout.as_ref()).map(RolloutView::new);
        let schedule = self.compute_schedule(&st, facts);
        self.publish(&mut st, schedule, &snap);
        view.ok_or_else(|| OpError::Invalid(format!("workload {name} has no rollout")))
    }

    pub(super) fn compute_schedule(&self, st: &State, facts: &[DeviceFacts]) -> Schedule {
        let placed: Vec<Placed> = st
            .workloads
            .values()
            .map(|e| Placed {
                tenant: e.tenant.clone(),
                spec: e.latest_spec().clone(),
                placement: e.manifest.placement.clone(),
                replicas: e.manifest.replicas,
            })
            .collect();
        schedule(facts, &placed, &st.schedule.assignment)
    }

    pub fn workloads(&self, now: Millis, scope: &Scope) -> Vec<WorkloadView> {
        let names: Vec<String> =
            lock(&self.state).workloads.iter().filter(|(_, e)| scope.sees(&e.tenant)).map(|(n, _)| n.clone()).collect();
        names.iter().filter_map(|n| self.workload(n, now, scope).ok()).collect()
    }

    /// A workload `scope` may see; another tenant's is "not found", as an unknown one.
    pub(super) fn visible_workload<'s>(st: &'s State, name: &str, scope: &Scope) -> Result<&'s Entry, OpError> {
        st.workloads
            .get(name)
            .filter(|e| scope.sees(&e.tenant))
            .ok_or_else(|| OpError::NotFound(format!("workload {name} not found")))
    }

    pub(super) fn visible_workload_mut<'s>(
        st: &'s mut State,
        name: &str,
        scope: &Scope,
    ) -> Result<&'s mut Entry, OpError> {
        st.workloads
            .get_mut(name)
            .filter(|e| scope.sees(&e.tenant))
            .ok_or_else(|| OpError::NotFound(format!("workload {name} not found")))
    }

    pub fn workload(&self, name: &str, now: Millis, scope: &Scope) -> Result<WorkloadView, OpError> {
        let fleet = lock(&self.fleet);
        let st = lock(&self.state);
        let e = Self::visible_workload(&st, name, scope)?;
        let latest = e.latest_spec();
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
                address: d
                    .report
                    .as_ref()
                    .and_then(|r| r.addresses.iter().find(|(w, _)| w == name).map(|(_, a)| a.clone())),
                load: d.heartbeat.as_ref().and_then(|h| h.loads.iter().find(|l| l.workload == name).cloned()),
                waiting: d.report.as_ref().and_then(|r| r.waiting.iter().find(|w| w.workload == name).cloned()),
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
            autoscale: Self::autoscale_view(&st, name).map(|mut a| {
                // The scalers live in memory: after a restart, the last decision is the event's.
                if a.last_decision.is_none() {
                    a.last_decision = self.last_scale_event(name, &e.tenant);
                }
                a
            }),
        })
    }

    pub fn rollout(&self, name: &str, scope: &Scope) -> Result<RolloutView, OpError> {
        self.last_rollout(name, scope)?.ok_or_else(|| OpError::NotFound(format!("workload {name} has had no rollout")))
    }

    /// A workload's last rollout, None before its first (the dashboard's
    /// watch: cheap enough to ask twice a second).
    pub fn last_rollout(&self, name: &str, scope: &Scope) -> Result<Option<RolloutView>, OpError> {
        let st = lock(&self.state);
        Ok(Self::visible_workload(&st, name, scope)?.rollout.as_ref().map(RolloutView::new))
    }

    /// Steps every active rollout on what devices reported; a success moves
    /// the stable revision. True when any moved.
    pub(super) fn step_rollouts(&self, fleet: &Fleet, st: &mut State, now: Millis) -> bool {
        let mut changed = false;
        let rolling = st.workloads.values().any(|e| e.active_rollout().is_some());
        let devices: std::collections::HashMap<&str, &Device> =
            if rolling { fleet.devices().map(|d| (d.id.as_str(), d)).collect() } else { Default::default() };
        let store = lock(&self.store);
        for (name, e) in st.workloads.iter_mut().filter(|(_, e)| e.active_rollout().is_some()) {
            let Some(r) = e.rollout.as_mut().filter(|r| r.state.active()) else { continue };
            let to = r.to;
            let observe = |id: &str| -> Observation {
                let Some(d) = devices.get(id) else { return Observation::default() };
                Observation {
                    online: d.status(now, &self.liveness) == Status::Online,
                    status: d.report.as_ref().and_then(|r| r.workloads.iter().find(|w| &w.name == name).cloned()),
                    waiting: d
                        .report
                        .as_ref()
                        .and_then(|rep| rep.waiting.iter().find(|w| &w.workload == name && w.revision == to))
                        .map(|w| w.reason.clone()),
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
            let event = match r.state {
                RolloutState::Succeeded => "rollout.succeeded",
                RolloutState::RolledBack => "rollout.rolled_back",
                _ => "rollout.progress",
            };
            if r.state == RolloutState::Succeeded {
                e.stable = r.to;
                if let Err(err) = store.save_workload(&e.tenant, &e.manifest, e.latest_spec(), e.stable, now) {
                    tracing::error!(workload = %name, error = %err, "cannot store the stable revision");
                }
            }
            for message in events {
                self.event(&store, &e.tenant, event, name, message, now);
            }
        }
        drop(store);
        changed
    }
}

/// A workload's disruption budget over `devices`: each device's group (its
/// value of the `per` label), each group's allowance.
pub(super) fn budget(d: &crate::workload::DisruptionManifest, devices: &[&DeviceFacts]) -> crate::rollout::Budget {
    let group: BTreeMap<String, String> = devices
        .iter()
        .map(|f| (f.id.clone(), d.per.as_ref().and_then(|k| f.labels.get(k)).cloned().unwrap_or_default()))
        .collect();
    let mut sizes: BTreeMap<String, usize> = BTreeMap::new();
    for g in group.values() {
        *sizes.entry(g.clone()).or_default() += 1;
    }
    let allowance = sizes.into_iter().map(|(g, n)| (g, crate::workload::allowance(d, n))).collect();
    crate::rollout::Budget { group, allowance }
}
