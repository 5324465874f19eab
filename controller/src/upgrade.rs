//! **Pure**: agent upgrades across the fleet — which devices an upgrade
//! covers, which agent each device is told to run, and how a device's
//! reports read as progress. The waves, health gate and automatic rollback
//! are the workloads' own `rollout::Rollout`: an [`AgentRollout`] wraps one,
//! numbering the target version's release as its `to` and using `from = 0`
//! for "the version each device ran before" (kept in `before`).

use std::collections::BTreeMap;

use baton_protocol::release::{compare_versions, AgentTarget, UpgradeState};
use baton_protocol::{Health, Inventory, Phase, WorkloadStatus};
use serde::{Deserialize, Serialize};

use crate::rollout::{Observation, Rollout, State, Strategy};
use crate::schedule::DeviceFacts;

/// Published builds: (version, arch) → (SHA-256, size).
pub type Releases = BTreeMap<(String, String), (Vec<u8>, u64)>;

/// One fleet upgrade of the agent (the last one is kept, finished or not).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct AgentRollout {
    /// What devices see as `AgentTarget::rollout`: a build that failed on a
    /// device is tried there again only under a new number.
    pub id: u64,
    pub version: String,
    /// Devices whose labels include all of these.
    pub selector: BTreeMap<String, String>,
    /// The version each covered device ran when the upgrade started.
    pub before: BTreeMap<String, String>,
    pub rollout: Rollout,
}

/// What a device said of its agent, for the upgrade's health gate.
#[derive(Debug, Clone, Default)]
pub struct AgentState<'a> {
    pub online: bool,
    pub version: &'a str,
    pub inventory: Option<&'a Inventory>,
}

pub fn selected(selector: &BTreeMap<String, String>, d: &DeviceFacts) -> bool {
    selector.iter().all(|(k, v)| d.labels.get(k) == Some(v))
}

/// Why an upgrade cannot start.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum Refused {
    #[error("no device matches the selector")]
    NoDevices,
    /// `missing`: "aarch64 (devices a, b); arm (devices c)".
    #[error("version {version} is not published for {missing}: run `baton agent publish` with those builds")]
    Unpublished { version: String, missing: String },
    #[error("the agent upgrade to {0} is still in progress: pause, abort or undo it first")]
    Busy(String),
    #[error(
        "version {version} is older than the agent devices {devices} run: a device never downgrades by a new upgrade (each would refuse it); `baton agent rollout undo` takes devices back from the last upgrade"
    )]
    Older { version: String, devices: String },
}

/// "a, b, c, d, e and 3 more".
fn some_of(ids: &[&str]) -> String {
    let shown: Vec<&str> = ids.iter().take(5).copied().collect();
    let more = if ids.len() > 5 { format!(" and {} more", ids.len() - 5) } else { String::new() };
    format!("{}{more}", shown.join(", "))
}

impl AgentRollout {
    /// An upgrade of the devices `selector` picks to `version` (release
    /// number `seq`), reachable devices first. Every picked device's
    /// architecture must have a build of it.
    #[allow(clippy::too_many_arguments)]
    pub fn start(
        id: u64,
        version: &str,
        seq: u64,
        selector: BTreeMap<String, String>,
        devices: &[DeviceFacts],
        versions: &BTreeMap<String, String>,
        releases: &Releases,
        strategy: Strategy,
        now: u64,
    ) -> Result<Self, Refused> {
        let mut picked: Vec<&DeviceFacts> = devices.iter().filter(|d| selected(&selector, d)).collect();
        if picked.is_empty() {
            return Err(Refused::NoDevices);
        }
        let mut missing: BTreeMap<&str, Vec<&str>> = BTreeMap::new();
        for d in &picked {
            if !releases.contains_key(&(version.to_owned(), d.arch.clone())) {
                missing.entry(d.arch.as_str()).or_default().push(d.id.as_str());
            }
        }
        if !missing.is_empty() {
            let each = missing.into_iter().map(|(arch, ids)| {
                let arch = if arch.is_empty() { "an unknown architecture" } else { arch };
                format!("{arch} (devices {})", some_of(&ids))
            });
            return Err(Refused::Unpublished { version: version.into(), missing: each.collect::<Vec<_>>().join("; ") });
        }
        let newer: Vec<&str> = picked
            .iter()
            .filter(|d| {
                versions.get(&d.id).is_some_and(|v| compare_versions(version, v) == Some(std::cmp::Ordering::Less))
            })
            .map(|d| d.id.as_str())
            .collect();
        if !newer.is_empty() {
            return Err(Refused::Older { version: version.into(), devices: some_of(&newer) });
        }
        picked.sort_by(|a, b| (!a.reachable, &a.id).cmp(&(!b.reachable, &b.id)));
        let before = picked.iter().map(|d| (d.id.clone(), versions.get(&d.id).cloned().unwrap_or_default())).collect();
        let ids = picked.iter().map(|d| d.id.clone()).collect();
        Ok(AgentRollout {
            id,
            version: version.into(),
            selector,
            before,
            rollout: Rollout::new("agent", 0, seq, ids, strategy, now),
        })
    }

    /// The rollout engine's words (revisions) in an upgrade's (versions).
    pub fn say(&self, message: &str) -> String {
        message
            .replace(&format!("revision {}", self.rollout.to), &format!("version {}", self.version))
            .replace("revision 0", "the version each ran before")
    }

    /// The agent `device` (of architecture `arch`, with `labels`) is told to
    /// run; None: whatever it runs.
    pub fn target_for(&self, d: &DeviceFacts, releases: &Releases) -> Option<AgentTarget> {
        let r = &self.rollout;
        let covered = r.devices.iter().any(|id| id == &d.id);
        let to = |version: &str, downgrade: bool| {
            let (digest, size) = releases.get(&(version.to_owned(), d.arch.clone())).cloned().unwrap_or_default();
            AgentTarget { version: version.into(), digest, size, rollout: self.id, downgrade }
        };
        match r.state {
            State::Progressing | State::Paused => {
                (covered && r.released_set().contains(d.id.as_str())).then(|| to(&self.version, false))
            }
            // Devices that join later (or were away) get it too.
            State::Succeeded => {
                selected(&self.selector, d).then(|| to(&self.version, false)).filter(|t| !t.digest.is_empty())
            }
            // Back to what each ran before (kept on the device, or published).
            State::RolledBack | State::Aborted | State::Superseded => {
                let before = self.before.get(&d.id).filter(|v| !v.is_empty())?;
                Some(to(before, true))
            }
        }
    }

    /// A device's agent as the rollout engine judges workloads: running the
    /// new version and not still trying it is healthy; a rollback or
    /// refusal on the device for this upgrade is a failure.
    pub fn observe(&self, a: &AgentState) -> Observation {
        let outcome = a.inventory.and_then(|i| i.upgrade.as_ref()).filter(|o| o.rollout == self.id);
        let mut status = WorkloadStatus { name: "agent".into(), ..Default::default() };
        match outcome.map(|o| (o.state, o)) {
            Some((UpgradeState::RolledBack | UpgradeState::Refused, o)) if o.version == self.version => {
                status.phase = Phase::RolledBack;
                status.last_error = Some(format!("{}: {}", o.state.as_str(), o.detail));
            }
            Some((UpgradeState::InProgress, o)) => {
                status.phase = Phase::Pulling;
                status.last_error = (!o.detail.is_empty()).then(|| o.detail.clone());
            }
            _ if a.version == self.version => {
                status.revision = self.rollout.to;
                status.phase = Phase::Running;
                status.health = Health::Healthy;
            }
            _ => {}
        }
        Observation { online: a.online, status: Some(status), waiting: None }
    }

    /// `undo`: every covered device goes back to the version it ran before,
    /// whether the upgrade is still going or finished.
    pub fn undo(&mut self, now: u64) {
        let r = &mut self.rollout;
        r.state = State::Aborted;
        r.reason =
            Some(format!("undone by the operator: devices go back to the version they ran before {}", self.version));
        r.finished_ms = Some(now);
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use baton_protocol::release::UpgradeOutcome;

    fn device(id: &str, arch: &str, site: &str) -> DeviceFacts {
        DeviceFacts {
            id: id.into(),
            tenant: "default".into(),
            labels: BTreeMap::from([("site".into(), site.into())]),
            arch: arch.into(),
            reachable: true,
            ..Default::default()
        }
    }

    fn releases() -> Releases {
        BTreeMap::from([
            (("2.0.0".into(), "aarch64".into()), (vec![2; 32], 200)),
            (("2.0.0".into(), "arm".into()), (vec![3; 32], 180)),
            (("1.0.0".into(), "aarch64".into()), (vec![1; 32], 100)),
        ])
    }

    fn strategy() -> Strategy {
        Strategy {
            waves: vec![crate::rollout::Wave::Devices(1)],
            min_ready_ms: 1000,
            max_failure_pct: 0,
            deadline_ms: 10_000,
        }
    }

    fn fleet() -> Vec<DeviceFacts> {
        vec![device("a", "aarch64", "lyon"), device("b", "arm", "lyon"), device("c", "x86_64", "rome")]
    }

    fn versions() -> BTreeMap<String, String> {
        fleet().iter().map(|d| (d.id.clone(), "1.0.0".to_string())).collect()
    }

    #[test]
    fn an_upgrade_covers_the_selected_devices_and_needs_a_build_for_each_arch() {
        let lyon = BTreeMap::from([("site".to_string(), "lyon".to_string())]);
        let r = AgentRollout::start(1, "2.0.0", 7, lyon, &fleet(), &versions(), &releases(), strategy(), 0).unwrap();
        assert_eq!(r.rollout.devices, ["a", "b"]);
        assert_eq!(r.before["a"], "1.0.0");
        let err =
            AgentRollout::start(1, "2.0.0", 7, BTreeMap::new(), &fleet(), &versions(), &releases(), strategy(), 0);
        assert_eq!(
            err.unwrap_err().to_string(),
            "version 2.0.0 is not published for x86_64 (devices c): run `baton agent publish` with those builds"
        );
        let mut two = fleet();
        two.push(device("d", "mips", "rome"));
        let err = AgentRollout::start(1, "2.0.0", 7, BTreeMap::new(), &two, &versions(), &releases(), strategy(), 0);
        assert!(err.unwrap_err().to_string().contains("mips (devices d); x86_64 (devices c)"), "every arch named");
        let none = BTreeMap::from([("site".to_string(), "oslo".to_string())]);
        assert_eq!(
            AgentRollout::start(1, "2.0.0", 7, none, &fleet(), &versions(), &releases(), strategy(), 0).unwrap_err(),
            Refused::NoDevices
        );
    }

    #[test]
    fn an_upgrade_to_a_version_older_than_a_device_runs_is_refused_up_front() {
        let lyon = BTreeMap::from([("site".to_string(), "lyon".to_string())]);
        let mut versions = versions();
        versions.insert("b".into(), "3.1.0".into());
        let err = AgentRollout::start(1, "2.0.0", 7, lyon.clone(), &fleet(), &versions, &releases(), strategy(), 0);
        assert_eq!(err.unwrap_err(), Refused::Older { version: "2.0.0".into(), devices: "b".into() });
        // Unknown versions (never reported) and the same version do not stop it.
        versions.insert("b".into(), String::new());
        versions.insert("a".into(), "2.0.0".into());
        assert!(AgentRollout::start(1, "2.0.0", 7, lyon, &fleet(), &versions, &releases(), strategy(), 0).is_ok());
    }

    #[test]
    fn targets_follow_the_waves_and_go_back_to_what_each_device_ran() {
        let lyon = BTreeMap::from([("site".to_string(), "lyon".to_string())]);
        let mut r =
            AgentRollout::start(4, "2.0.0", 7, lyon, &fleet(), &versions(), &releases(), strategy(), 0).unwrap();
        let [a, b, c] = [&fleet()[0], &fleet()[1], &fleet()[2]];
        let t = r.target_for(a, &releases()).unwrap();
        assert_eq!(
            (t.version.as_str(), t.digest.clone(), t.size, t.rollout, t.downgrade),
            ("2.0.0", vec![2; 32], 200, 4, false)
        );
        assert_eq!(r.target_for(b, &releases()), None, "second wave: not released yet");
        assert_eq!(
            r.say("device a failed revision 7: exited; rolled back to revision 0"),
            "device a failed version 2.0.0: exited; rolled back to the version each ran before"
        );
        assert_eq!(r.target_for(c, &releases()), None, "not selected");
        r.undo(5);
        let back = r.target_for(a, &releases()).unwrap();
        assert_eq!(
            (back.version.as_str(), back.digest.clone(), back.downgrade),
            ("1.0.0", vec![1; 32], true),
            "published: by digest"
        );
        let back = r.target_for(b, &releases()).unwrap();
        assert_eq!(
            (back.version.as_str(), back.digest.is_empty()),
            ("1.0.0", true),
            "not published for arm: the copy kept on the device"
        );
        r.rollout.state = State::Succeeded;
        let late = device("d", "arm", "lyon");
        assert_eq!(r.target_for(&late, &releases()).unwrap().digest, vec![3; 32], "a device that joins later gets it");
    }

    #[test]
    fn reports_read_as_progress_failure_or_health() {
        let r =
            AgentRollout::start(4, "2.0.0", 7, BTreeMap::new(), &fleet()[..1], &versions(), &releases(), strategy(), 0)
                .unwrap();
        let inv = |state, rollout| Inventory {
            upgrade: Some(UpgradeOutcome { version: "2.0.0".into(), rollout, state, detail: "why".into() }),
            ..Default::default()
        };
        let obs = |version, inv: Option<&Inventory>| {
            r.observe(&AgentState { online: true, version, inventory: inv }).status.unwrap()
        };
        let o = obs("1.0.0", Some(&inv(UpgradeState::RolledBack, 4)));
        assert_eq!((o.phase, o.last_error.as_deref()), (Phase::RolledBack, Some("rolled-back: why")));
        assert_eq!(
            obs("1.0.0", Some(&inv(UpgradeState::RolledBack, 3))).phase,
            Phase::Pending,
            "another upgrade's rollback"
        );
        assert_eq!(obs("1.0.0", Some(&inv(UpgradeState::InProgress, 4))).phase, Phase::Pulling);
        let ok = obs("2.0.0", Some(&inv(UpgradeState::Upgraded, 4)));
        assert_eq!((ok.phase, ok.health, ok.revision), (Phase::Running, Health::Healthy, 7));
        assert_eq!(obs("2.0.0", Some(&inv(UpgradeState::InProgress, 4))).phase, Phase::Pulling, "still on trial");
    }
}
