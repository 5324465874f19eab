//! Desired document vs what the supervisor runs → what to do. Pure: plain
//! data in, actions out. `replace_start_first` decides how a new revision
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
    pub stopping: bool,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Action {
    Start(String),
    Stop(String),
    /// A new revision of a running workload.
    Replace(String),
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
        match desired.iter().find(|w| w.name == o.name) {
            Some(w) if w.revision == o.revision => {}
            Some(_) => actions.push(Action::Replace(o.name.clone())),
            None => actions.push(Action::Stop(o.name.clone())),
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
        Observed { name: name.into(), revision, stopping }
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
    fn applying_the_same_document_twice_changes_nothing() {
        let desired = vec![w("a", 3), w("b", 1)];
        let observed = vec![o("a", 3, false), o("b", 1, false)];
        assert!(plan(&desired, &observed).is_empty());
    }

    #[test]
    fn validation_names_the_bad_workload() {
        let bad = Desired { generation: 1, workloads: vec![w("ok", 1), w("Bad_Name", 1)], services: vec![] };
        assert!(validate(&bad).unwrap_err().starts_with("workloads[1].name"));
        let dup = Desired { generation: 1, workloads: vec![w("a", 1), w("a", 2)], services: vec![] };
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
