//! Desired document vs what the supervisor runs → what to do. Pure: plain
//! data in, actions out. What runs is compared by `fingerprint` (what the
//! spec says), not only by revision number: a restored controller may send
//! a revision number again for another spec, or a new number for the spec
//! that already runs. `replace_start_first` decides how a new revision
//! takes over.

use std::collections::BTreeSet;

use baton_protocol::spec::{ContainerSpec, MountSource, NetworkMode, WorkloadSpec};
use baton_protocol::Desired;

use crate::image::manifest::ImageConfig;

/// One workload as the supervisor has it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Observed {
    pub name: String,
    pub revision: u64,
    /// `fingerprint` of the spec it runs; empty when unknown (a container
    /// adopted from an agent that did not record it).
    pub fingerprint: String,
    pub stopping: bool,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Action {
    Start(String),
    Stop(String),
    /// Another spec for a running workload: a new container.
    Replace(String),
    /// The spec that runs, under another revision number: only the label moves.
    Relabel(String),
}

/// What identifies a workload's spec whatever its revision number: a hash of
/// the spec as the desired document gives it, revision left out. Stable
/// across agent versions of one protocol major (the encoding is postcard's).
pub fn fingerprint(w: &WorkloadSpec) -> String {
    use sha2::Digest;
    let unnumbered = WorkloadSpec { revision: 0, ..w.clone() };
    // The wire's bytes: the same for a spec an older agent fingerprinted.
    let bytes = baton_protocol::wire::workload_bytes(&unnumbered);
    let digest = sha2::Sha256::digest(&bytes);
    digest[..12].iter().map(|b| format!("{b:02x}")).collect()
}

/// Workload names become container ids and directory names.
pub fn validate(desired: &Desired) -> Result<(), String> {
    let mut seen = BTreeSet::new();
    for (i, w) in desired.workloads.iter().enumerate() {
        let ok = !w.name.is_empty()
            && w.name.len() <= 63
            && w.name.bytes().all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-')
            && !w.name.starts_with('-');
        if !ok {
            return Err(format!("workloads[{i}].name {:?}: use 1-63 characters of a-z 0-9 -", w.name));
        }
        if !seen.insert(&w.name) {
            return Err(format!("workloads[{i}].name {:?} appears twice", w.name));
        }
        if w.image.is_empty() {
            return Err(format!("workloads[{i}].image: missing"));
        }
    }
    Ok(())
}

pub fn plan(desired: &[WorkloadSpec], observed: &[Observed]) -> Vec<Action> {
    let mut actions = Vec::new();
    for o in observed.iter().filter(|o| !o.stopping) {
        let Some(w) = desired.iter().find(|w| w.name == o.name) else {
            actions.push(Action::Stop(o.name.clone()));
            continue;
        };
        // Unknown fingerprint: only the revision number can tell.
        let same_spec =
            if o.fingerprint.is_empty() { w.revision == o.revision } else { fingerprint(w) == o.fingerprint };
        match (same_spec, w.revision == o.revision) {
            (true, true) => {}
            (true, false) => actions.push(Action::Relabel(o.name.clone())),
            (false, _) => actions.push(Action::Replace(o.name.clone())),
        }
    }
    for w in desired {
        if !observed.iter().any(|o| o.name == w.name) {
            actions.push(Action::Start(w.name.clone()));
        }
    }
    actions
}

/// Whether a new revision may start next to the old one: not when either
/// binds host ports, passes through devices or writes a named volume (two
/// writers, or a port or device held by the old one). Otherwise the new one
/// starts first and the old stops once the new is healthy.
pub fn replace_start_first(old: &ContainerSpec, new: &ContainerSpec) -> bool {
    let exclusive = |s: &ContainerSpec| {
        (s.network == NetworkMode::Host && !s.ports.is_empty())
            || !s.publish.is_empty()
            || !s.devices.is_empty()
            || s.mounts.iter().any(|m| matches!(m.source, MountSource::Volume(_)) && !m.read_only)
    };
    !exclusive(old) && !exclusive(new)
}

/// The container to run: the workload's spec, with the image's entrypoint,
/// cmd, env and working dir where the spec does not set them (Docker's rules).
pub fn container_spec(w: &WorkloadSpec, image: &ImageConfig) -> ContainerSpec {
    let mut spec = w.container.clone();
    let cfg = &image.config;
    if spec.command.is_empty() {
        spec.command = cfg.entrypoint.clone().unwrap_or_default();
        if spec.args.is_empty() {
            spec.args = cfg.cmd.clone().unwrap_or_default();
        }
    }
    let mut env: Vec<(String, String)> = cfg
        .env
        .iter()
        .flatten()
        .filter_map(|kv| kv.split_once('=').map(|(k, v)| (k.to_string(), v.to_string())))
        .collect();
    for (k, v) in spec.env.drain(..) {
        env.retain(|(ek, _)| *ek != k);
        env.push((k, v));
    }
    spec.env = env;
    if spec.working_dir.is_none() {
        spec.working_dir = cfg.working_dir.clone().filter(|d| d.starts_with('/'));
    }
    spec
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::image::manifest::RunConfig;

    fn w(name: &str, revision: u64) -> WorkloadSpec {
        WorkloadSpec { name: name.into(), revision, image: "img".into(), ..Default::default() }
    }

    fn o(name: &str, revision: u64, stopping: bool) -> Observed {
        Observed { name: name.into(), revision, fingerprint: String::new(), stopping }
    }

    /// Observed running `w`'s spec, under revision `revision`.
    fn running(w: &WorkloadSpec, revision: u64) -> Observed {
        Observed { name: w.name.clone(), revision, fingerprint: fingerprint(w), stopping: false }
    }

    #[test]
    fn plan_table() {
        use Action::*;
        let cases: Vec<(Vec<WorkloadSpec>, Vec<Observed>, Vec<Action>)> = vec![
            (vec![w("a", 1)], vec![], vec![Start("a".into())]),
            (vec![w("a", 1)], vec![o("a", 1, false)], vec![]),
            (vec![], vec![o("a", 1, false)], vec![Stop("a".into())]),
            (vec![w("a", 2)], vec![o("a", 1, false)], vec![Replace("a".into())]),
            // Still stopping the old revision: wait, do not start a second one.
            (vec![w("a", 2)], vec![o("a", 1, true)], vec![]),
            (
                vec![w("a", 1), w("b", 1)],
                vec![o("a", 1, false), o("c", 1, false)],
                vec![Stop("c".into()), Start("b".into())],
            ),
        ];
        for (desired, observed, expected) in cases {
            assert_eq!(plan(&desired, &observed), expected, "{desired:?} / {observed:?}");
        }
    }

    #[test]
    fn what_runs_is_compared_by_spec_not_only_by_revision_number() {
        use Action::*;
        let v2 = WorkloadSpec { image: "img:2".into(), ..w("a", 2) };
        let v3 = WorkloadSpec { image: "img:3".into(), ..w("a", 3) };
        // Runs revision 2's spec, labelled 3 (an agent restarted across an update): replaced.
        assert_eq!(plan(std::slice::from_ref(&v3), &[running(&v2, 3)]), vec![Replace("a".into())]);
        // A restored controller sends revision 2 again, for another spec: replaced.
        let other2 = WorkloadSpec { image: "img:other".into(), ..w("a", 2) };
        assert_eq!(plan(&[other2], &[running(&v2, 2)]), vec![Replace("a".into())]);
        // The same spec under a new number: relabelled, never restarted.
        let renumbered = WorkloadSpec { revision: 7, ..v2.clone() };
        assert_eq!(plan(&[renumbered], &[running(&v2, 2)]), vec![Relabel("a".into())]);
        assert!(plan(std::slice::from_ref(&v2), &[running(&v2, 2)]).is_empty());
        // The fingerprint ignores the revision number and sees every other field.
        assert_eq!(fingerprint(&v2), fingerprint(&WorkloadSpec { revision: 9, ..v2.clone() }));
        let mut env = v2.clone();
        env.container.env.push(("X".into(), "1".into()));
        assert_ne!(fingerprint(&v2), fingerprint(&env));
    }

    #[test]
    fn applying_the_same_document_twice_changes_nothing() {
        let desired = vec![w("a", 3), w("b", 1)];
        let observed = vec![o("a", 3, false), o("b", 1, false)];
        assert!(plan(&desired, &observed).is_empty());
    }

    #[test]
    fn validation_names_the_bad_workload() {
        let bad = Desired { generation: 1, workloads: vec![w("ok", 1), w("Bad_Name", 1)], ..Default::default() };
        assert!(validate(&bad).unwrap_err().starts_with("workloads[1].name"));
        let dup = Desired { generation: 1, workloads: vec![w("a", 1), w("a", 2)], ..Default::default() };
        assert!(validate(&dup).unwrap_err().contains("twice"));
    }

    #[test]
    fn image_config_fills_what_the_spec_leaves_out() {
        let image = ImageConfig {
            config: RunConfig {
                entrypoint: Some(vec!["/entry".into()]),
                cmd: Some(vec!["--serve".into()]),
                env: Some(vec!["PATH=/bin".into(), "MODE=image".into()]),
                working_dir: Some("/app".into()),
                user: None,
            },
            ..Default::default()
        };
        let mut wl = w("a", 1);
        wl.container.env = vec![("MODE".into(), "spec".into())];
        let spec = container_spec(&wl, &image);
        assert_eq!((spec.command, spec.args), (vec!["/entry".to_string()], vec!["--serve".to_string()]));
        assert_eq!(spec.env, vec![("PATH".into(), "/bin".into()), ("MODE".into(), "spec".into())]);
        assert_eq!(spec.working_dir.as_deref(), Some("/app"));
        wl.container.command = vec!["/bin/sh".into()];
        let spec = container_spec(&wl, &image);
        assert_eq!((spec.command, spec.args), (vec!["/bin/sh".to_string()], vec![]));
    }
}
