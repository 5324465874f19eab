//! One engine step on fakes: no thread, no file, simulated time.

use super::*;
use crate::reconcile::container_spec;
use crate::runtime::fake::{FakeImages, FakeProber, FakeRuntime, Knobs};
use crate::step::{PullOutcome, PullRequest};
use baton_protocol::{Health, Phase};

/// Images by reference: those present, those whose spec cannot be built,
/// and the pulls asked for.
#[derive(Default)]
struct Images {
    present: BTreeSet<String>,
    broken: BTreeMap<String, String>,
    can_pull: bool,
    asked: Vec<PullRequest>,
    finished: Vec<PullOutcome>,
}

impl ImageSource for Images {
    fn build(&self, w: &WorkloadSpec) -> Result<(ContainerSpec, Rootfs), ImageError> {
        if let Some(why) = self.broken.get(&w.image) {
            return Err(ImageError::Invalid(why.clone()));
        }
        if !self.present.contains(&w.image) {
            return Err(ImageError::NotFound(w.image.clone()));
        }
        Ok((container_spec(w, &Default::default()), Rootfs { layers: vec![PathBuf::from(&w.image)] }))
    }
    fn can_pull(&self) -> bool {
        self.can_pull
    }
    fn request_pull(&mut self, request: PullRequest) {
        self.asked.push(request);
    }
    fn finished_pulls(&mut self) -> Vec<PullOutcome> {
        std::mem::take(&mut self.finished)
    }
    fn gc(&mut self, _: &BTreeSet<String>, _: &BTreeSet<PathBuf>, _: u64) {}
}

fn engine(images: Images) -> (FakeRuntime, Engine<FakeRuntime, Images>) {
    let rt = FakeRuntime::default();
    let sup = Supervisor::new(rt.clone());
    (rt.clone(), Engine::new(sup, images, Desired::default(), Vec::new(), Options::default()))
}

fn w(name: &str, revision: u64, image: &str) -> WorkloadSpec {
    WorkloadSpec { name: name.into(), revision, image: image.into(), health_deadline_s: 3, ..Default::default() }
}

fn doc(generation: u64, workloads: Vec<WorkloadSpec>) -> Input {
    Input::Desired(Desired { generation, workloads, ..Default::default() })
}

fn status(r: &Report, name: &str) -> WorkloadStatus {
    r.workloads.iter().find(|s| s.name == name).cloned().unwrap_or_default()
}

/// Steps until `now` reaches `until`, every 100 ms; the last report sent.
fn run<I: ImageSource>(e: &mut Engine<FakeRuntime, I>, rt: &FakeRuntime, from: u64, until: u64) -> Option<Report> {
    let mut last = None;
    for now in (from..=until).step_by(100) {
        rt.set_now(now);
        last = e.step(now).or(last);
    }
    last
}

#[test]
fn a_new_document_starts_its_workloads_and_an_unchanged_step_sends_nothing() {
    let (rt, mut e) = engine(Images { present: ["reg/a:1".to_string()].into(), ..Default::default() });
    e.input(doc(4, vec![w("a", 1, "reg/a:1")]));
    let r = e.step(0).expect("a report");
    let a = status(&r, "a");
    assert_eq!((r.generation, a.revision, a.phase, a.health), (4, 1, Phase::Running, Health::Healthy));
    assert_eq!(rt.ids(), ["a-0"]);
    assert_eq!(e.step(100), None, "a report sent with nothing changed");
}

#[test]
fn a_missing_image_is_pulled_once_then_the_workload_starts() {
    let (rt, mut e) = engine(Images { can_pull: true, ..Default::default() });
    e.input(doc(1, vec![w("a", 1, "reg/a:1")]));
    let a = status(&e.step(0).expect("a report"), "a");
    assert_eq!((a.phase, a.last_error.as_deref()), (Phase::Pulling, Some("pulling reg/a:1")));
    assert_eq!(e.step(100), None);
    assert_eq!(e.images.asked.len(), 1, "asked for the image twice");
    assert!(rt.ids().is_empty());

    e.images.present.insert("reg/a:1".into());
    e.images.finished.push(PullOutcome { image: "reg/a:1".into(), result: Ok(()), no_space: false });
    let a = status(&e.step(200).expect("a report"), "a");
    assert_eq!((a.phase, a.health, a.last_error), (Phase::Running, Health::Healthy, None));
}

#[test]
fn without_a_puller_a_missing_image_waits_to_be_loaded() {
    let (_, mut e) = engine(Images::default());
    e.input(doc(1, vec![w("a", 1, "reg/a:1")]));
    let a = status(&e.step(0).expect("a report"), "a");
    assert_eq!(a.phase, Phase::Pending);
    assert!(a.last_error.unwrap_or_default().contains("load it with `baton-agent image load`"));
    assert!(e.images.asked.is_empty());
}

#[test]
fn a_failed_pull_reports_its_error_and_is_retried_only_after_its_backoff() {
    let (_, mut e) = engine(Images { can_pull: true, ..Default::default() });
    e.input(doc(1, vec![w("a", 1, "reg/a:1")]));
    e.step(0);
    e.images.finished.push(PullOutcome { image: "reg/a:1".into(), result: Err("401".into()), no_space: false });
    let a = status(&e.step(100).expect("a report"), "a");
    assert_eq!((a.phase, a.last_error.as_deref()), (Phase::Failed, Some("pull reg/a:1: 401")));
    let first_retry = 100 + crate::restart::Backoff::default().delay(0).as_millis() as u64;
    e.step(first_retry - 1);
    assert_eq!(e.images.asked.len(), 1, "retried within the backoff");
    e.step(first_retry);
    assert_eq!(e.images.asked.len(), 2, "not retried after the backoff");
}

#[test]
fn a_replacement_waits_for_its_image_while_the_old_revision_runs() {
    let (rt, mut e) = engine(Images { present: ["reg/a:1".to_string()].into(), can_pull: true, ..Default::default() });
    e.input(doc(1, vec![w("a", 1, "reg/a:1")]));
    e.step(0);
    e.input(doc(2, vec![w("a", 2, "reg/a:2")]));
    let a = status(&e.step(100).expect("a report"), "a");
    assert_eq!((a.revision, a.phase, a.health), (1, Phase::Running, Health::Healthy), "the old revision stopped");
    assert_eq!(a.last_error.as_deref(), Some("revision 2: pulling reg/a:2"));
    assert_eq!(rt.ids(), ["a-0"]);

    e.images.present.insert("reg/a:2".into());
    e.images.finished.push(PullOutcome { image: "reg/a:2".into(), result: Ok(()), no_space: false });
    let r = run(&mut e, &rt, 200, 400).expect("a report");
    let a = status(&r, "a");
    assert_eq!((a.revision, a.phase, a.health, a.last_error), (2, Phase::Running, Health::Healthy, None));
    assert!(matches!(rt.state("a-0"), Ok(crate::runtime::ContainerState::Exited(_))), "the old one still runs");
}

#[test]
fn a_spec_that_cannot_be_built_leaves_the_old_revision_running_and_says_why() {
    let images = Images {
        present: ["reg/a:1".to_string()].into(),
        broken: [("reg/a:2".to_string(), "user \"app\": no such user".to_string())].into(),
        ..Default::default()
    };
    let (rt, mut e) = engine(images);
    e.input(doc(1, vec![w("a", 1, "reg/a:1")]));
    e.step(0);
    e.input(doc(2, vec![w("a", 2, "reg/a:2")]));
    let a = status(&e.step(100).expect("a report"), "a");
    assert_eq!((a.revision, a.phase), (1, Phase::Running));
    assert_eq!(a.last_error.as_deref(), Some("revision 2: user \"app\": no such user"));
    assert_eq!(rt.ids(), ["a-0"]);

    // Removed from the document while it waits: nothing is left of it.
    e.input(doc(3, Vec::new()));
    let r = run(&mut e, &rt, 200, 400).expect("a report");
    assert!(r.workloads.is_empty(), "{r:?}");
}

#[test]
fn an_unhealthy_revision_is_rolled_back_to_the_proven_one_which_kept_running() {
    let knobs = Knobs { unhealthy: Some("bad".into()), ..Default::default() };
    let rt = FakeRuntime::new(knobs);
    let sup = Supervisor::new(rt.clone()).with_prober(Arc::new(FakeProber(rt.clone())));
    let images = FakeImages { unhealthy: Some("bad".into()) };
    let mut e = Engine::new(sup, images, Desired::default(), Vec::new(), Options::default());
    e.input(doc(1, vec![w("a", 1, "reg/a:1")]));
    run(&mut e, &rt, 0, 2_000); // proven after 1 s healthy (a third of the deadline)
    e.input(doc(2, vec![w("a", 2, "reg/a:bad2")]));
    let r = run(&mut e, &rt, 2_100, 2_500).expect("a report");
    let a = status(&r, "a");
    assert_eq!((a.revision, a.phase, a.health), (2, Phase::Running, Health::Unhealthy), "{a:?}");
    let r = run(&mut e, &rt, 2_600, 6_000).expect("a report");
    let a = status(&r, "a");
    assert_eq!((a.revision, a.phase), (1, Phase::RolledBack), "{a:?}");
    assert!(a.last_error.unwrap_or_default().contains("rolled back to revision 1"));
    assert_eq!(a.restarts, 0);
    assert_eq!(e.supervisor().current_container("a").as_deref(), Some("a-0"), "revision 1 was restarted");
}

#[test]
fn an_operators_restart_is_answered_and_counted() {
    let (rt, mut e) = engine(Images { present: ["reg/a:1".to_string()].into(), ..Default::default() });
    e.input(doc(1, vec![w("a", 1, "reg/a:1")]));
    e.step(0);
    let (done, mut answer) = tokio::sync::oneshot::channel();
    e.input(Input::Restart("a".into(), done));
    let (nope, mut no_answer) = tokio::sync::oneshot::channel();
    e.input(Input::Restart("b".into(), nope));
    e.step(100);
    assert_eq!((answer.try_recv(), no_answer.try_recv()), (Ok(true), Ok(false)));
    let r = run(&mut e, &rt, 200, 400).expect("a report");
    let a = status(&r, "a");
    assert_eq!((a.phase, a.restarts), (Phase::Running, 1));
}
