//! Autoscaling: each tick, every autoscaled workload's instances' loads (from
//! their devices' last heartbeats) → `autoscale::recommend` → its
//! `Scaler` → a new replica count, stored and announced like `baton scale`.

use baton_protocol::DeviceId;

use super::{Controller, State};
use crate::autoscale::{recommend, Requests, Sample};
use crate::fleet::{Fleet, Millis, Status};

impl Controller {
    /// Steps every autoscaler; true when a replica count changed.
    pub(super) fn autoscale(&self, fleet: &Fleet, st: &mut State, now: Millis) -> bool {
        let mut decisions = Vec::new();
        let State { workloads, schedule, scalers, .. } = &mut *st;
        scalers.retain(|name, _| workloads.get(name).is_some_and(|e| e.manifest.autoscale.is_some()));
        for (name, e) in workloads.iter() {
            let Ok(Some(policy)) = crate::workload::autoscale(&e.manifest) else { continue };
            let current = e.manifest.replicas.unwrap_or(policy.min);
            let r = e.latest_spec().container.resources;
            let req = Requests { cpu_milli: r.cpu_millis.unwrap_or(0), memory_bytes: r.memory_bytes.unwrap_or(0) };
            let placed: Vec<&crate::fleet::Device> = schedule
                .assignment
                .get(name)
                .into_iter()
                .flatten()
                .filter_map(|id| fleet.get(&DeviceId::new(id.clone()).ok()?))
                .collect();
            let samples: Vec<Sample> = placed
                .iter()
                .filter(|d| d.status(now, &self.liveness) == Status::Online)
                .filter_map(|d| d.heartbeat.as_ref()?.loads.iter().find(|l| &l.workload == name))
                .map(|l| Sample { cpu_milli: l.cpu_milli, memory_bytes: l.memory_bytes, load_milli: l.load_milli })
                .collect();
            let rec = recommend(&policy, req, current, &samples);
            // A disruption budget bounds how many instances one scale-down removes.
            let max_down = e.manifest.disruption.as_ref().map_or(u32::MAX, |d| {
                let facts: Vec<crate::schedule::DeviceFacts> = placed
                    .iter()
                    .map(|d| crate::desired::facts_of(d, now, &self.liveness, self.reschedule_after_ms))
                    .collect();
                let b = super::workloads::budget(d, &facts.iter().collect::<Vec<_>>());
                b.allowance.values().copied().min().unwrap_or(1) as u32
            });
            let scaler = scalers.entry(name.clone()).or_default();
            if let Some(d) = scaler.step(&policy, current, rec, max_down, now) {
                if d.to != current {
                    decisions.push((name.clone(), d));
                }
            }
        }
        if decisions.is_empty() {
            return false;
        }
        let store = super::lock(&self.store);
        for (name, d) in decisions {
            let Some(e) = st.workloads.get_mut(&name) else { continue };
            e.manifest.replicas = Some(d.to);
            if let Err(err) = store.save_workload(&e.tenant, &e.manifest, e.latest_spec(), e.stable, now) {
                self.metrics.store_errors.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
                tracing::error!(workload = %name, error = %err, "cannot store an autoscaling decision");
            }
            let message = format!("autoscaled from {} to {} replicas: {}", d.from, d.to, d.reason);
            self.event(&store, &e.tenant, "workload.autoscaled", &name, message, now);
        }
        true
    }

    /// The newest `workload.autoscaled` event of `name`, as a decision.
    pub(super) fn last_scale_event(&self, name: &str, tenant: &str) -> Option<crate::view::ScaleDecision> {
        let events = super::lock(&self.store).load_events(Some(name), Some(tenant), 50).ok()?;
        let e = events.into_iter().filter(|e| e.name == "workload.autoscaled").max_by_key(|e| e.at_ms)?;
        let rest = e.message.strip_prefix("autoscaled from ")?;
        let (from, rest) = rest.split_once(" to ")?;
        let (to, reason) = rest.split_once(" replicas: ")?;
        Some(crate::view::ScaleDecision {
            at_ms: e.at_ms,
            from: from.parse().ok()?,
            to: to.parse().ok()?,
            reason: reason.to_string(),
        })
    }

    /// What `describe workload` shows of a workload's autoscaler.
    pub(super) fn autoscale_view(st: &State, name: &str) -> Option<crate::view::AutoscaleView> {
        let e = st.workloads.get(name)?;
        let policy = crate::workload::autoscale(&e.manifest).ok().flatten()?;
        let scaler = st.scalers.get(name);
        Some(crate::view::AutoscaleView {
            min: policy.min,
            max: policy.max,
            current: e.manifest.replicas.unwrap_or(policy.min),
            recommended: scaler.and_then(|s| s.recommended.as_ref()).map(|r| r.replicas),
            reason: scaler.and_then(|s| s.recommended.as_ref()).map(|r| r.reason.clone()),
            last_decision: scaler.and_then(|s| s.last.as_ref()).map(|d| crate::view::ScaleDecision {
                at_ms: d.at_ms,
                from: d.from,
                to: d.to,
                reason: d.reason.clone(),
            }),
        })
    }
}
