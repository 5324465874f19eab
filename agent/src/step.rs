//! The decisions of one engine step that are not the supervisor's, pure:
//! which workloads wait for their image and what they report meanwhile,
//! which pulls to ask for and when a failed one may be retried, and the
//! report a step composes and whether it is worth sending. The engine
//! (`engine`) does the I/O around them; the simulator runs the same engine.

use std::collections::{BTreeMap, BTreeSet};
use std::time::Duration;

use baton_protocol::spec::WorkloadSpec;
use baton_protocol::{Health, Phase, Report, WorkloadStatus};

use crate::rollback::Guard;

/// A pull to ask the image source for.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PullRequest {
    pub image: String,
    /// The digest the controller pinned (None: the tag as it is now).
    pub digest: Option<String>,
}

/// A pull that ended.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PullOutcome {
    pub image: String,
    pub result: Result<(), String>,
    /// It failed for want of disk space (unused images should go now).
    pub no_space: bool,
}

/// The pin of `w`'s image, if the controller resolved one.
pub fn digest_of(w: &WorkloadSpec) -> Option<&str> {
    Some(w.image_digest.as_str()).filter(|d| !d.is_empty())
}

/// What a workload reports when its image is missing and nothing can pull it.
pub fn load_hint(image: &str) -> String {
    format!("image {image} is not in the local store; load it with `baton-agent image load`")
}

#[derive(Debug, Default)]
struct Pulls {
    in_flight: BTreeSet<String>,
    /// Image → (earliest retry time, failures so far) after a failed pull.
    backoff: BTreeMap<String, (u64, u32)>,
}

/// Workloads that cannot start (or be replaced) yet — their image is being
/// pulled, must be loaded, or their spec cannot be built — and the pulls.
#[derive(Debug)]
pub struct Waits {
    /// Workload → (phase to report, reason).
    waiting: BTreeMap<String, (Phase, String)>,
    /// None: this device cannot pull; images are loaded by hand.
    pulls: Option<Pulls>,
}

impl Waits {
    pub fn new(can_pull: bool) -> Self {
        Self { waiting: BTreeMap::new(), pulls: can_pull.then(Pulls::default) }
    }

    /// `w`'s image is not in the store: records what `w` reports, and
    /// returns the pull to ask for now — none while one is under way, none
    /// while a failed one waits for its retry (its error stays reported).
    pub fn image_missing(&mut self, w: &WorkloadSpec, now: u64) -> Option<PullRequest> {
        let Some(p) = self.pulls.as_mut() else {
            self.waiting.insert(w.name.clone(), (Phase::Pending, load_hint(&w.image)));
            return None;
        };
        if p.backoff.get(&w.image).is_some_and(|(until, _)| now < *until) && !p.in_flight.contains(&w.image) {
            return None;
        }
        self.waiting.insert(w.name.clone(), (Phase::Pulling, format!("pulling {}", w.image)));
        p.in_flight
            .insert(w.image.clone())
            .then(|| PullRequest { image: w.image.clone(), digest: digest_of(w).map(str::to_string) })
    }

    /// `name`'s spec cannot be built (its image will not unpack, its user
    /// is unknown…): it reports `Failed` with the reason. True when the
    /// reason is new (worth a log line; the next steps say the same).
    pub fn cannot_build(&mut self, name: &str, reason: String) -> bool {
        let before = self.waiting.insert(name.to_string(), (Phase::Failed, reason.clone()));
        before.map(|(_, r)| r) != Some(reason)
    }

    /// `name` has what it waited for.
    pub fn ready(&mut self, name: &str) {
        self.waiting.remove(name);
    }

    /// A pull ended. A failure is reported by every workload of `effective`
    /// on that image, and the pull is retried after a backoff, returned.
    pub fn pull_finished(&mut self, outcome: &PullOutcome, effective: &[WorkloadSpec], now: u64) -> Option<Duration> {
        let p = self.pulls.as_mut()?;
        p.in_flight.remove(&outcome.image);
        let Err(e) = &outcome.result else {
            p.backoff.remove(&outcome.image);
            return None;
        };
        let failures = p.backoff.get(&outcome.image).map_or(0, |(_, f)| *f) + 1;
        let delay = crate::restart::Backoff::default().delay(failures - 1);
        p.backoff.insert(outcome.image.clone(), (now + delay.as_millis() as u64, failures));
        for w in effective.iter().filter(|w| w.image == outcome.image) {
            self.waiting.insert(w.name.clone(), (Phase::Failed, format!("pull {}: {e}", outcome.image)));
        }
        Some(delay)
    }

    /// A new document is the operator asking again: failed pulls retry now.
    pub fn retry_pulls_now(&mut self) {
        if let Some(p) = self.pulls.as_mut() {
            p.backoff.clear();
        }
    }

    /// Forgets workloads `effective` no longer names.
    pub fn retain(&mut self, effective: &[WorkloadSpec]) {
        self.waiting.retain(|name, _| effective.iter().any(|w| &w.name == name));
    }

    pub fn get(&self, name: &str) -> Option<&(Phase, String)> {
        self.waiting.get(name)
    }
}

/// What the device reports: the supervisor's statuses, an old revision that
/// still runs while its replacement waits saying what for (`revision N:
/// pulling …`), workloads that wait with nothing running yet, sorted by
/// name, and the rollback guard's annotations.
pub fn report(
    generation: u64,
    mut workloads: Vec<WorkloadStatus>,
    effective: &[WorkloadSpec],
    waits: &Waits,
    guard: &Guard,
) -> Report {
    for st in &mut workloads {
        let next = effective.iter().find(|w| w.name == st.name).map(|w| w.revision);
        if let (Some(rev), Some((_, reason))) = (next, waits.get(&st.name)) {
            if rev != st.revision {
                st.last_error = Some(format!("revision {rev}: {reason}"));
            }
        }
    }
    for (name, (phase, reason)) in &waits.waiting {
        if workloads.iter().any(|w| &w.name == name) {
            continue;
        }
        let revision = effective.iter().find(|w| &w.name == name).map_or(0, |w| w.revision);
        workloads.push(WorkloadStatus {
            name: name.clone(),
            revision,
            phase: *phase,
            health: Health::Unknown,
            last_error: Some(reason.clone()),
            ..Default::default()
        });
    }
    workloads.sort_by(|a, b| a.name.cmp(&b.name));
    guard.annotate(&mut workloads);
    Report { generation, workloads, refused: None, addresses: Vec::new(), waiting: Vec::new() }
}

/// Usage moves every step; a report is sent when anything else changes.
pub fn without_usage(r: &Report) -> Report {
    let mut r = r.clone();
    for w in &mut r.workloads {
        w.cpu_usage_ns = 0;
        w.memory_bytes = 0;
    }
    r
}

/// Whether `report` is worth sending after `last` (the last one sent,
/// without usage): true when it differs in anything but usage, and then
/// it becomes the last one.
pub fn changed(last: &mut Option<Report>, report: &Report) -> bool {
    let bare = without_usage(report);
    if last.as_ref() == Some(&bare) {
        return false;
    }
    *last = Some(bare);
    true
}

#[cfg(test)]
mod tests {
    use super::*;

    fn w(name: &str, revision: u64, image: &str) -> WorkloadSpec {
        WorkloadSpec { name: name.into(), revision, image: image.into(), health_deadline_s: 30, ..Default::default() }
    }

    fn running(name: &str, revision: u64) -> WorkloadStatus {
        WorkloadStatus {
            name: name.into(),
            revision,
            phase: Phase::Running,
            health: Health::Healthy,
            ..Default::default()
        }
    }

    /// (case, waits, what the report says of workload "a" at revision 1 when
    /// nothing runs: phase and error).
    #[test]
    fn a_workload_waiting_for_its_image_reports_why() {
        let a = w("a", 1, "reg/a:1");
        let cases: Vec<(&str, Waits, Phase, String)> = vec![
            (
                "no puller: pending, with the load hint",
                {
                    let mut ws = Waits::new(false);
                    assert_eq!(ws.image_missing(&a, 0), None, "asked a pull of a device that cannot pull");
                    ws
                },
                Phase::Pending,
                "image reg/a:1 is not in the local store; load it with `baton-agent image load`".into(),
            ),
            (
                "puller: pulling",
                {
                    let mut ws = Waits::new(true);
                    assert!(ws.image_missing(&a, 0).is_some());
                    ws
                },
                Phase::Pulling,
                "pulling reg/a:1".into(),
            ),
            (
                "pull failed: failed, with the error",
                {
                    let mut ws = Waits::new(true);
                    ws.image_missing(&a, 0);
                    let failed = PullOutcome { image: a.image.clone(), result: Err("401".into()), no_space: false };
                    ws.pull_finished(&failed, std::slice::from_ref(&a), 10);
                    ws.image_missing(&a, 20); // within the backoff: the error stays
                    ws
                },
                Phase::Failed,
                "pull reg/a:1: 401".into(),
            ),
            (
                "spec cannot be built: failed, with the reason",
                {
                    let mut ws = Waits::new(true);
                    ws.cannot_build("a", "user \"app\": no such user".into());
                    ws
                },
                Phase::Failed,
                "user \"app\": no such user".into(),
            ),
        ];
        for (case, waits, phase, error) in cases {
            let r = report(7, Vec::new(), std::slice::from_ref(&a), &waits, &Guard::default());
            let st = &r.workloads[0];
            assert_eq!(
                (r.generation, st.name.as_str(), st.revision, st.phase, st.health, st.last_error.as_deref()),
                (7, "a", 1, phase, Health::Unknown, Some(error.as_str())),
                "{case}"
            );
        }
    }

    #[test]
    fn a_pull_is_requested_once_while_under_way_and_retried_only_after_its_backoff() {
        let (a, b) = (w("a", 1, "reg/x:1"), w("b", 1, "reg/x:1"));
        let effective = [a.clone(), b.clone()];
        let mut ws = Waits::new(true);
        let asked = ws.image_missing(&a, 0);
        assert_eq!(asked, Some(PullRequest { image: "reg/x:1".into(), digest: None }));
        assert_eq!(ws.image_missing(&a, 500), None, "asked twice while under way");
        assert_eq!(ws.image_missing(&b, 500), None, "asked again for another workload on the same image");
        assert_eq!(ws.get("b").map(|(p, _)| *p), Some(Phase::Pulling));

        let failed = PullOutcome { image: "reg/x:1".into(), result: Err("timeout".into()), no_space: false };
        let delay = ws.pull_finished(&failed, &effective, 1_000).expect("a retry delay");
        assert_eq!(ws.get("b").map(|(p, _)| *p), Some(Phase::Failed), "every workload on the image says it failed");
        let retry_at = 1_000 + delay.as_millis() as u64;
        assert_eq!(ws.image_missing(&a, retry_at - 1), None, "retried before the backoff");
        assert!(ws.image_missing(&a, retry_at).is_some(), "not retried after the backoff");
        let again = ws.pull_finished(&failed, &effective, retry_at).expect("a retry delay");
        assert!(again > delay, "the backoff does not grow: {again:?} after {delay:?}");

        // A new document retries at once; a success forgets the failures.
        ws.retry_pulls_now();
        assert!(ws.image_missing(&a, retry_at + 1).is_some());
        let ok = PullOutcome { image: "reg/x:1".into(), result: Ok(()), no_space: false };
        assert_eq!(ws.pull_finished(&ok, &effective, retry_at + 2), None);
        ws.ready("a");
        assert_eq!(ws.get("a"), None);
    }

    #[test]
    fn a_pinned_digest_travels_with_the_pull() {
        let mut a = w("a", 1, "reg/a:1");
        a.image_digest = "sha256:abc".into();
        let mut ws = Waits::new(true);
        assert_eq!(ws.image_missing(&a, 0).and_then(|p| p.digest).as_deref(), Some("sha256:abc"));
    }

    #[test]
    fn an_old_revision_running_while_the_new_one_waits_says_what_for() {
        let next = w("a", 2, "reg/a:2");
        let mut ws = Waits::new(true);
        ws.image_missing(&next, 0);
        let r = report(3, vec![running("a", 1)], std::slice::from_ref(&next), &ws, &Guard::default());
        let st = &r.workloads[0];
        assert_eq!((st.revision, st.phase, st.health), (1, Phase::Running, Health::Healthy), "the old one stopped");
        assert_eq!(st.last_error.as_deref(), Some("revision 2: pulling reg/a:2"));
        assert_eq!(r.workloads.len(), 1, "the waiting revision reported twice");

        // The same once the new revision runs: nothing to say.
        let r = report(3, vec![running("a", 2)], std::slice::from_ref(&next), &ws, &Guard::default());
        assert_eq!(r.workloads[0].last_error, None);

        // A spec that cannot be built: the old one keeps running and says why.
        let mut ws = Waits::new(true);
        assert!(ws.cannot_build("a", "layer refused".into()));
        assert!(!ws.cannot_build("a", "layer refused".into()), "the same reason logged again");
        let r = report(3, vec![running("a", 1)], std::slice::from_ref(&next), &ws, &Guard::default());
        assert_eq!(r.workloads[0].last_error.as_deref(), Some("revision 2: layer refused"));
    }

    #[test]
    fn workloads_no_longer_desired_stop_waiting_and_reports_are_sorted() {
        let (a, b) = (w("a", 1, "reg/a:1"), w("b", 1, "reg/b:1"));
        let mut ws = Waits::new(false);
        ws.image_missing(&b, 0);
        ws.image_missing(&a, 0);
        let r = report(1, vec![running("c", 1)], &[a.clone(), b.clone()], &ws, &Guard::default());
        let names: Vec<&str> = r.workloads.iter().map(|w| w.name.as_str()).collect();
        assert_eq!(names, ["a", "b", "c"]);
        ws.retain(std::slice::from_ref(&a));
        assert!(ws.get("b").is_none() && ws.get("a").is_some());
    }

    #[test]
    fn a_rollback_reports_the_proven_revision_with_the_guards_reason() {
        // Revision 1 proven, revision 2 never healthy past its deadline.
        let (v1, v2) = (w("a", 1, "reg/a:1"), WorkloadSpec { health_deadline_s: 3, ..w("a", 2, "reg/a:2") });
        let mut guard = Guard::default();
        guard.observe(std::slice::from_ref(&v1), &[running("a", 1)], 0);
        guard.observe(std::slice::from_ref(&v1), &[running("a", 1)], 20_000);
        let unhealthy = WorkloadStatus { health: Health::Unhealthy, ..running("a", 2) };
        guard.observe(std::slice::from_ref(&v2), std::slice::from_ref(&unhealthy), 21_000);
        assert_eq!(guard.effective(std::slice::from_ref(&v2)), vec![v2.clone()], "rolled back before its deadline");
        guard.observe(std::slice::from_ref(&v2), &[unhealthy], 24_000);
        let effective = guard.effective(std::slice::from_ref(&v2));
        assert_eq!(effective, vec![v1], "effective is not the proven revision");
        let r = report(5, vec![running("a", 1)], &effective, &Waits::new(true), &guard);
        let st = &r.workloads[0];
        assert_eq!((st.revision, st.phase), (1, Phase::RolledBack));
        assert!(st.last_error.as_deref().unwrap_or("").contains("rolled back to revision 1"), "{st:?}");
    }

    #[test]
    fn a_report_that_changed_only_in_usage_is_not_sent() {
        let mut last = None;
        let r = Report { generation: 1, workloads: vec![running("a", 1)], ..Default::default() };
        assert!(changed(&mut last, &r), "the first report is not sent");
        let mut busier = r.clone();
        busier.workloads[0].cpu_usage_ns = 5_000;
        busier.workloads[0].memory_bytes = 1 << 20;
        assert!(!changed(&mut last, &busier), "sent for usage alone");
        let mut other = busier.clone();
        other.workloads[0].health = Health::Unhealthy;
        assert!(changed(&mut last, &other), "a change of health not sent");
        assert!(!changed(&mut last, &other));
    }
}
