//! Device-level rollback: a new revision that does not become healthy within
//! its deadline is replaced by the last revision that was healthy on this
//! device, with or without the controller. Pure: desired specs, observed
//! statuses and the time in; what to run and what to report out.
//!
//! A revision is *proven* once it has run healthy for a settle period. The
//! last proven spec of each workload is kept (and persisted by the caller,
//! written only when it changes) so a rollback needs nothing from the network.
//! A rolled-back revision is not tried again until the desired document names
//! another one.

use std::collections::BTreeMap;

use baton_protocol::spec::WorkloadSpec;
use baton_protocol::{Phase, WorkloadStatus};

/// How long a revision must run healthy to be proven (at most).
const SETTLE_MS: u64 = 10_000;

#[derive(Debug, Clone, PartialEq, Eq)]
struct Trial {
    revision: u64,
    since_ms: u64,
    healthy_since_ms: Option<u64>,
}

#[derive(Debug, Default)]
pub struct Guard {
    /// Workload → the last spec proven healthy here.
    proven: BTreeMap<String, WorkloadSpec>,
    trials: BTreeMap<String, Trial>,
    /// Workload → (rolled-back revision, why).
    failed: BTreeMap<String, (u64, String)>,
}

fn settle_ms(w: &WorkloadSpec) -> u64 {
    SETTLE_MS.min(u64::from(w.health_deadline_s) * 1000 / 3).max(1000)
}

impl Guard {
    /// Starts from the proven specs persisted by an earlier run.
    pub fn with_proven(proven: Vec<WorkloadSpec>) -> Self {
        Self { proven: proven.into_iter().map(|w| (w.name.clone(), w)).collect(), ..Self::default() }
    }

    pub fn proven(&self) -> Vec<WorkloadSpec> {
        self.proven.values().cloned().collect()
    }

    /// What to run: the desired specs, except that a rolled-back revision is
    /// replaced by the proven spec it replaced.
    pub fn effective(&self, desired: &[WorkloadSpec]) -> Vec<WorkloadSpec> {
        desired
            .iter()
            .map(|w| match (self.failed.get(&w.name), self.proven.get(&w.name)) {
                (Some((rev, _)), Some(good)) if *rev == w.revision => good.clone(),
                _ => w.clone(),
            })
            .collect()
    }

    /// Judges what runs against what is desired. True when the proven set
    /// changed (the caller persists it).
    pub fn observe(&mut self, desired: &[WorkloadSpec], status: &[WorkloadStatus], now: u64) -> bool {
        let mut changed = false;
        let before = self.proven.len();
        self.proven.retain(|name, _| desired.iter().any(|w| &w.name == name));
        changed |= self.proven.len() != before;
        self.trials.retain(|name, _| desired.iter().any(|w| &w.name == name));
        self.failed.retain(|name, (rev, _)| desired.iter().any(|w| &w.name == name && w.revision == *rev));

        for w in desired {
            if self.failed.contains_key(&w.name) {
                continue; // running the proven spec instead
            }
            let proven_rev = self.proven.get(&w.name).map(|p| p.revision);
            let s = status.iter().find(|s| s.name == w.name);
            let healthy = s.is_some_and(|s| s.proves(w.revision));
            let trial = self.trials.entry(w.name.clone()).or_insert(Trial {
                revision: w.revision,
                since_ms: now,
                healthy_since_ms: None,
            });
            if trial.revision != w.revision {
                *trial = Trial { revision: w.revision, since_ms: now, healthy_since_ms: None };
            }
            if healthy {
                let since = *trial.healthy_since_ms.get_or_insert(now);
                if now.saturating_sub(since) >= settle_ms(w) && proven_rev != Some(w.revision) {
                    self.proven.insert(w.name.clone(), w.clone());
                    changed = true;
                }
                continue;
            }
            trial.healthy_since_ms = None;
            let deadline_ms = u64::from(w.health_deadline_s) * 1000;
            let rollback_possible = proven_rev.is_some_and(|r| r != w.revision) && deadline_ms > 0;
            if rollback_possible && now.saturating_sub(trial.since_ms) >= deadline_ms {
                let why = format!(
                    "revision {} not healthy within {}s ({}); rolled back to revision {}",
                    w.revision,
                    w.health_deadline_s,
                    s.map_or("never started".to_string(), |s| {
                        // What the new revision did, not what the old one does:
                        // a status of another revision means the new one never ran.
                        let mut d = if s.revision == w.revision {
                            format!("{:?}", s.phase).to_lowercase()
                        } else {
                            format!("it never ran; revision {} still {:?}", s.revision, s.phase).to_lowercase()
                        };
                        if let (Some(code), Phase::BackingOff | Phase::Exited | Phase::Failed) =
                            (s.last_exit_code, s.phase)
                        {
                            d = format!("{d}, last exit code {code}");
                        }
                        if let Some(e) = &s.last_error {
                            d = format!("{d}: {e}");
                        }
                        d
                    }),
                    proven_rev.unwrap_or_default()
                );
                tracing::warn!(workload = %w.name, "{why}");
                self.failed.insert(w.name.clone(), (w.revision, why));
                self.trials.remove(&w.name);
            }
        }
        changed
    }

    /// Marks rolled-back workloads in a report: phase `RolledBack`, the
    /// revision they actually run, and why.
    pub fn annotate(&self, report: &mut [WorkloadStatus]) {
        for s in report.iter_mut() {
            if let Some((_, why)) = self.failed.get(&s.name) {
                s.phase = Phase::RolledBack;
                s.last_error = Some(why.clone());
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use baton_protocol::Health;

    fn spec(revision: u64, deadline_s: u32) -> WorkloadSpec {
        WorkloadSpec {
            name: "w".into(),
            revision,
            image: format!("img:{revision}"),
            health_deadline_s: deadline_s,
            ..Default::default()
        }
    }

    fn status(revision: u64, phase: Phase, health: Health) -> Vec<WorkloadStatus> {
        vec![WorkloadStatus { name: "w".into(), revision, phase, health, ..Default::default() }]
    }

    #[test]
    fn a_revision_is_proven_after_settling_healthy() {
        let mut g = Guard::default();
        let d = [spec(1, 30)];
        assert!(!g.observe(&d, &status(1, Phase::Running, Health::Healthy), 0));
        assert!(!g.observe(&d, &status(1, Phase::Running, Health::Healthy), 9_999));
        assert!(g.observe(&d, &status(1, Phase::Running, Health::Healthy), 10_000), "proven: persist");
        assert!(!g.observe(&d, &status(1, Phase::Running, Health::Healthy), 20_000), "already proven");
        assert_eq!(g.proven(), vec![spec(1, 30)]);
    }

    #[test]
    fn an_unhealthy_new_revision_rolls_back_to_the_proven_one() {
        let mut g = Guard::with_proven(vec![spec(1, 30)]);
        let d = [spec(2, 30)];
        g.observe(&d, &status(2, Phase::Running, Health::Unhealthy), 0);
        assert_eq!(g.effective(&d), vec![spec(2, 30)], "still within the deadline");
        g.observe(&d, &status(2, Phase::BackingOff, Health::Unhealthy), 29_999);
        assert_eq!(g.effective(&d)[0].revision, 2);
        g.observe(&d, &status(2, Phase::BackingOff, Health::Unhealthy), 30_000);
        assert_eq!(g.effective(&d), vec![spec(1, 30)], "rolled back");
        let mut report = status(1, Phase::Running, Health::Healthy);
        g.annotate(&mut report);
        assert_eq!(report[0].phase, Phase::RolledBack);
        assert!(report[0].last_error.as_deref().unwrap().contains("revision 2 not healthy within 30s"));
        // Not retried while the document still names revision 2 …
        g.observe(&d, &status(1, Phase::Running, Health::Healthy), 60_000);
        assert_eq!(g.effective(&d)[0].revision, 1);
        // … and forgotten once it names another.
        let d3 = [spec(3, 30)];
        g.observe(&d3, &status(1, Phase::Running, Health::Healthy), 61_000);
        assert_eq!(g.effective(&d3)[0].revision, 3);
    }

    #[test]
    fn a_first_revision_has_nothing_to_roll_back_to() {
        let mut g = Guard::default();
        let d = [spec(1, 5)];
        g.observe(&d, &status(1, Phase::Failed, Health::Unhealthy), 0);
        g.observe(&d, &status(1, Phase::Failed, Health::Unhealthy), 60_000);
        assert_eq!(g.effective(&d)[0].revision, 1);
    }

    #[test]
    fn a_proven_revision_that_later_fails_is_not_rolled_back() {
        let mut g = Guard::with_proven(vec![spec(1, 30)]);
        let d = [spec(1, 30)];
        g.observe(&d, &status(1, Phase::BackingOff, Health::Unhealthy), 0);
        g.observe(&d, &status(1, Phase::BackingOff, Health::Unhealthy), 100_000);
        assert_eq!(g.effective(&d)[0].revision, 1);
        let mut report = status(1, Phase::BackingOff, Health::Unhealthy);
        g.annotate(&mut report);
        assert_eq!(report[0].phase, Phase::BackingOff);
    }

    /// The reason names what the new revision did (a trial read "(running)"
    /// for a revision whose pull kept failing: that was the old one).
    #[test]
    fn the_reason_says_what_the_new_revision_did() {
        let why = |s: WorkloadStatus| {
            let mut g = Guard::with_proven(vec![spec(1, 30)]);
            let d = [spec(2, 30)];
            g.observe(&d, std::slice::from_ref(&s), 0);
            g.observe(&d, std::slice::from_ref(&s), 30_000);
            let mut report = vec![s];
            g.annotate(&mut report);
            report[0].last_error.clone().unwrap_or_default()
        };
        let pulling = WorkloadStatus {
            last_error: Some("revision 2: pull img:2: connection refused".into()),
            ..status(1, Phase::Running, Health::Healthy).remove(0)
        };
        let r = why(pulling);
        assert!(
            r.contains("it never ran; revision 1 still running: revision 2: pull img:2: connection refused"),
            "{r}"
        );
        let crashing =
            WorkloadStatus { last_exit_code: Some(3), ..status(2, Phase::BackingOff, Health::Unhealthy).remove(0) };
        let r = why(crashing);
        assert!(r.contains("(backingoff, last exit code 3)"), "{r}");
    }

    /// A run-to-completion revision that finished with 0 is proven, not
    /// rolled back at its deadline (a trial's abort then re-ran the old job).
    #[test]
    fn a_job_that_finished_cleanly_is_proven() {
        let mut g = Guard::with_proven(vec![spec(1, 30)]);
        let d = [spec(2, 30)];
        let done =
            vec![WorkloadStatus { last_exit_code: Some(0), ..status(2, Phase::Exited, Health::Unknown).remove(0) }];
        g.observe(&d, &done, 0);
        assert!(g.observe(&d, &done, 10_000), "proven: persist");
        g.observe(&d, &done, 60_000);
        assert_eq!(g.effective(&d)[0].revision, 2, "rolled back");
        let failed =
            vec![WorkloadStatus { last_exit_code: Some(3), ..status(2, Phase::Failed, Health::Unknown).remove(0) }];
        let mut g = Guard::with_proven(vec![spec(1, 30)]);
        g.observe(&d, &failed, 0);
        g.observe(&d, &failed, 30_000);
        assert_eq!(g.effective(&d)[0].revision, 1, "a failed job is rolled back");
    }

    #[test]
    fn removed_workloads_are_forgotten() {
        let mut g = Guard::with_proven(vec![spec(1, 30)]);
        assert!(g.observe(&[], &[], 0));
        assert!(g.proven().is_empty());
    }
}
