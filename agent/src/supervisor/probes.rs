//! The supervisor's probes: launching those that are due (each on its own
//! thread, or inline for a prober that needs none) and acting on results
//! (a failed liveness probe stops the container; readiness sets health).

use tracing::warn;

use super::{container_id, Supervisor, UnitState};
use crate::probe::Outcome;
use crate::runtime::ContainerRuntime;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) enum ProbeKind {
    Liveness,
    Readiness,
}

/// A finished probe run, sent back from its thread.
pub(super) struct ProbeResult {
    name: String,
    instance: u32,
    kind: ProbeKind,
    outcome: Outcome,
}

impl<R: ContainerRuntime> Supervisor<R> {
    pub(super) fn on_probe_result(&mut self, r: ProbeResult, now_ms: u64) {
        let Some(unit) = self.units.get_mut(&r.name) else { return };
        if unit.instance != r.instance || unit.state != UnitState::Running {
            return; // a result about an instance that is gone
        }
        let tracker = match r.kind {
            ProbeKind::Liveness => unit.liveness.as_mut(),
            ProbeKind::Readiness => unit.readiness.as_mut(),
        };
        let Some(tracker) = tracker else { return };
        let turned_unhealthy = tracker.record(r.outcome, now_ms);
        if turned_unhealthy && r.kind == ProbeKind::Liveness {
            let why = tracker.last_failure.clone().unwrap_or_default();
            warn!(workload = %r.name, reason = %why, "liveness probe failed; stopping the container");
            unit.last_error = Some(format!("liveness probe failed: {why}"));
            let _ = self.rt.stop(&container_id(&r.name, unit.instance));
        } else if turned_unhealthy && !unit.last_error.as_deref().is_some_and(|e| e.starts_with("liveness")) {
            // Not ready: nothing is restarted, but the operator sees why (it
            // clears once the container has been healthy for a while).
            let why = tracker.last_failure.clone().unwrap_or_default();
            warn!(workload = %r.name, reason = %why, "readiness probe failing");
            unit.last_error = Some(format!("readiness probe failing: {why}"));
        }
    }

    pub(super) fn launch_probes(&mut self, now_ms: u64) {
        let Some(prober) = self.prober.clone() else { return };
        // Answers of a prober that needs no thread, recorded once the loop is done.
        let mut answered = Vec::new();
        for (name, unit) in &mut self.units {
            if unit.state != UnitState::Running {
                continue;
            }
            for (kind, tracker) in
                [(ProbeKind::Liveness, unit.liveness.as_mut()), (ProbeKind::Readiness, unit.readiness.as_mut())]
            {
                let Some(tracker) = tracker else { continue };
                if !tracker.start_if_due(now_ms) {
                    continue;
                }
                let (check, timeout) = (tracker.probe.check.clone(), tracker.timeout());
                let (name, instance) = (name.clone(), unit.instance);
                if prober.inline() {
                    let outcome = prober.probe(&container_id(&name, instance), &check, timeout);
                    answered.push(ProbeResult { name, instance, kind, outcome });
                    continue;
                }
                let (prober, tx) = (prober.clone(), self.results_tx.clone());
                let spawned = std::thread::Builder::new().name("probe".into()).spawn(move || {
                    let outcome = prober.probe(&container_id(&name, instance), &check, timeout);
                    let _ = tx.send(ProbeResult { name, instance, kind, outcome });
                });
                if let Err(e) = spawned {
                    tracker.record(Outcome::Failure(format!("cannot start probe thread: {e}")), now_ms);
                }
            }
        }
        for result in answered {
            self.on_probe_result(result, now_ms);
        }
    }
}
