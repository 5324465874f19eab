//! **Pure**: the decisions of an agent upgrade, over plain data — what to do
//! with a target the controller names, what a starting agent does with an
//! upgrade left in progress, and what the watcher does while the new agent
//! proves itself. `switch` and `fetch` carry them out on disk.

use baton_protocol::release::{compare_versions, AgentTarget, UpgradeOutcome, UpgradeState};
use serde::{Deserialize, Serialize};

/// `upgrade/state.json`: the last upgrade this device was asked for, and
/// where it stands. Written before every step that changes what runs.
#[derive(Serialize, Deserialize, Debug, Clone, PartialEq, Eq, Default)]
pub struct Marker {
    pub phase: MarkerPhase,
    /// The version asked for, and by which upgrade (`AgentTarget::rollout`).
    pub version: String,
    pub rollout: u64,
    /// File names under `bin/releases/`: the new agent and the one it replaces.
    pub to: String,
    pub from: String,
    /// Times the new agent was started on trial (0: staged, not started yet).
    pub attempts: u32,
    /// How long the new agent has to come online.
    pub deadline_s: u64,
    /// Why, when it did not go through.
    pub detail: String,
    /// Earlier trials of this same request that rolled back (a way back
    /// cut by a power loss is tried again, up to `WAY_BACK_TRIES`).
    #[serde(default)]
    pub tries: u32,
    /// Starts of the new agent after it came online, before it was stable.
    #[serde(default)]
    pub restarts: u32,
    /// The new agent stayed up `STABLE_AFTER` after it came online (markers
    /// written before this field existed read as stable).
    #[serde(default = "stable_by_default")]
    pub stable: bool,
}

fn stable_by_default() -> bool {
    true
}

/// How long a new agent, once it came online, must stay up (or, after each
/// restart, stay up again) to be kept for good.
pub const STABLE_AFTER: std::time::Duration = std::time::Duration::from_secs(60);

/// Starts of a new agent that came online but keeps stopping before it is
/// stable, after which the device goes back to the one it ran before.
pub const PROBATION_STARTS: u32 = 3;

/// Trials of a way back (`AgentTarget::downgrade`: an undo, a fleet
/// rollback) before the device gives up on it: the version it goes back to
/// ran here before, so a failed trial was more likely cut than broken.
pub const WAY_BACK_TRIES: u32 = 3;

#[derive(Serialize, Deserialize, Debug, Clone, Copy, PartialEq, Eq, Default)]
#[serde(rename_all = "kebab-case")]
pub enum MarkerPhase {
    /// Staged and being tried; `current` still names the old agent.
    #[default]
    Trying,
    /// The new agent came online; `current` names it, `previous` the old one.
    Upgraded,
    /// The new agent did not come online in time; the old one runs.
    RolledBack,
    /// Never tried (see `detail`).
    Refused,
}

impl Marker {
    /// What the device reports of it.
    pub fn outcome(&self) -> UpgradeOutcome {
        let state = match self.phase {
            MarkerPhase::Trying => UpgradeState::InProgress,
            MarkerPhase::Upgraded => UpgradeState::Upgraded,
            MarkerPhase::RolledBack => UpgradeState::RolledBack,
            MarkerPhase::Refused => UpgradeState::Refused,
        };
        UpgradeOutcome { version: self.version.clone(), rollout: self.rollout, state, detail: self.detail.clone() }
    }
}

/// What to do about the agent a desired document names.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Want {
    /// Nothing: it runs already, or it failed here before for this same upgrade.
    Nothing,
    /// Download it (then verify, stage, try).
    Fetch,
    /// Go back to the previous agent kept on the device (no download).
    SwitchBack,
    /// Do not try it, for this reason (reported, remembered for this upgrade).
    Refuse(String),
}

/// Decides about `target` for an agent running `running`, keeping
/// `previous`, whose last upgrade is `last`.
pub fn want(target: &AgentTarget, running: &str, previous: Option<&str>, last: Option<&Marker>) -> Want {
    if target.version == running {
        return Want::Nothing;
    }
    let same_request = |m: &Marker| m.rollout == target.rollout && m.version == target.version;
    if let Some(m) = last.filter(|m| same_request(m)) {
        match m.phase {
            // A way back that did not come through: tried again, a few times.
            MarkerPhase::RolledBack if target.downgrade && m.tries + 1 < WAY_BACK_TRIES => {}
            // Failed here for this upgrade: tried again only when a new one asks.
            MarkerPhase::RolledBack | MarkerPhase::Refused => return Want::Nothing,
            // Staged or tried already: the start-up logic owns it.
            MarkerPhase::Trying => return Want::Nothing,
            MarkerPhase::Upgraded => {}
        }
    }
    if !target.downgrade && compare_versions(&target.version, running) == Some(std::cmp::Ordering::Less) {
        return Want::Refuse(format!(
            "{} is older than the agent running ({running}); a device downgrades only when the operator asks (undo)",
            target.version
        ));
    }
    if target.digest.is_empty() {
        return match previous {
            Some(p) if p == target.version => Want::SwitchBack,
            Some(p) => Want::Refuse(format!(
                "version {} is not kept on this device (it keeps {p}); publish it for this architecture",
                target.version
            )),
            None => Want::Refuse(format!(
                "version {} is not kept on this device (it keeps no other); publish it for this architecture",
                target.version
            )),
        };
    }
    if target.digest.len() != 32 {
        return Want::Refuse(format!("the release digest is {} bytes, not a SHA-256", target.digest.len()));
    }
    Want::Fetch
}

/// What a starting agent does with the upgrade on record.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum AtStart {
    /// Run as usual.
    Run,
    /// Staged but never started (the agent stopped in between): start the trial now.
    HandOver,
    /// The new agent came online but the switch was not finished: finish it.
    Commit,
    /// The new agent was tried and did not come online: the old one stays.
    RollBack(String),
    /// The new agent came online but stopped before it was stable: count this start.
    CountStart,
    /// … for the `PROBATION_STARTS`th time: go back to the old one.
    GoBack(String),
}

/// `on_trial`: this process is the new agent, started for its trial.
/// `confirmed`: the new agent left its sign of life (`upgrade/ok`).
pub fn at_start(last: Option<&Marker>, on_trial: bool, confirmed: bool) -> AtStart {
    match last {
        _ if on_trial => AtStart::Run,
        Some(m) if m.phase == MarkerPhase::Trying => {
            if confirmed {
                AtStart::Commit
            } else if m.attempts == 0 {
                AtStart::HandOver
            } else {
                AtStart::RollBack(format!(
                    "the new agent ({}) stopped before it came online: it exited, was killed, or the device restarted",
                    m.version
                ))
            }
        }
        Some(m) if m.phase == MarkerPhase::Upgraded && !m.stable => {
            if m.restarts + 1 >= PROBATION_STARTS {
                AtStart::GoBack(format!(
                    "the new agent ({}) came online, then stopped {} times before it had run {} s",
                    m.version,
                    m.restarts + 1,
                    STABLE_AFTER.as_secs()
                ))
            } else {
                AtStart::CountStart
            }
        }
        _ => AtStart::Run,
    }
}

/// The watcher's verdict, looked at every half second while the new agent is on trial.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Watch {
    Wait,
    /// It came online: make it current.
    Commit,
    /// Its process is gone: roll back (the service manager starts the old agent again).
    Gone,
    /// It did not come online in time: roll back and stop it.
    TimedOut,
}

pub fn watch(confirmed: bool, alive: bool, elapsed_ms: u64, deadline_s: u64) -> Watch {
    if confirmed {
        Watch::Commit
    } else if !alive {
        Watch::Gone
    } else if elapsed_ms >= deadline_s.saturating_mul(1000) {
        Watch::TimedOut
    } else {
        Watch::Wait
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn target(version: &str, digest: usize, rollout: u64) -> AgentTarget {
        AgentTarget { version: version.into(), digest: vec![7; digest], size: 10, rollout, downgrade: false }
    }

    fn marker(phase: MarkerPhase, version: &str, rollout: u64, attempts: u32) -> Marker {
        Marker { phase, version: version.into(), rollout, attempts, stable: true, ..Default::default() }
    }

    #[test]
    fn what_a_device_does_with_a_named_agent() {
        let rolled_back = marker(MarkerPhase::RolledBack, "1.1.0", 4, 1);
        let tried_twice = Marker { tries: 2, ..rolled_back.clone() };
        let cases: Vec<(AgentTarget, Option<&str>, Option<&Marker>, Want)> = vec![
            (target("1.0.0", 32, 4), None, None, Want::Nothing),
            (target("1.1.0", 32, 4), None, None, Want::Fetch),
            (target("1.1.0", 32, 4), None, Some(&rolled_back), Want::Nothing),
            (target("1.1.0", 32, 5), None, Some(&rolled_back), Want::Fetch),
            (target("1.1.0", 31, 4), None, None, Want::Refuse("the release digest is 31 bytes, not a SHA-256".into())),
            (target("0.9.0", 0, 4), Some("0.9.0"), None, Want::Refuse("0.9.0 is older than the agent running (1.0.0); a device downgrades only when the operator asks (undo)".into())),
            (AgentTarget { downgrade: true, ..target("0.9.0", 0, 4) }, Some("0.9.0"), None, Want::SwitchBack),
            (AgentTarget { downgrade: true, ..target("0.8.0", 0, 4) }, Some("0.9.0"), None, Want::Refuse("version 0.8.0 is not kept on this device (it keeps 0.9.0); publish it for this architecture".into())),
            (AgentTarget { downgrade: true, ..target("0.8.0", 32, 4) }, Some("0.9.0"), None, Want::Fetch),
            // Versions that do not compare are not downgrades.
            (target("nightly", 32, 4), None, None, Want::Fetch),
            // A way back that rolled back (cut by a power loss) is tried again, three times in all.
            (AgentTarget { downgrade: true, ..target("1.1.0", 32, 4) }, None, Some(&rolled_back), Want::Fetch),
            (AgentTarget { downgrade: true, ..target("1.1.0", 32, 4) }, None, Some(&tried_twice), Want::Nothing),
        ];
        for (t, previous, last, expected) in cases {
            assert_eq!(want(&t, "1.0.0", previous, last), expected, "{t:?} {previous:?} {last:?}");
        }
    }

    #[test]
    fn what_a_starting_agent_does_with_an_upgrade_in_progress() {
        let trying = |attempts| marker(MarkerPhase::Trying, "1.1.0", 1, attempts);
        assert_eq!(at_start(None, false, false), AtStart::Run);
        assert_eq!(at_start(Some(&trying(0)), false, false), AtStart::HandOver);
        assert_eq!(at_start(Some(&trying(1)), false, true), AtStart::Commit);
        assert_eq!(at_start(Some(&trying(0)), false, true), AtStart::Commit, "confirmation wins");
        assert!(matches!(at_start(Some(&trying(1)), false, false), AtStart::RollBack(why) if why.contains("1.1.0")));
        assert_eq!(at_start(Some(&trying(1)), true, false), AtStart::Run, "the new agent itself, on trial");
        for phase in [MarkerPhase::Upgraded, MarkerPhase::RolledBack, MarkerPhase::Refused] {
            assert_eq!(at_start(Some(&marker(phase, "1.1.0", 1, 1)), false, false), AtStart::Run);
        }
        // Came online, then keeps stopping before it is stable: counted, then given up.
        let shaky = |restarts| Marker { stable: false, restarts, ..marker(MarkerPhase::Upgraded, "1.1.0", 1, 1) };
        assert_eq!(at_start(Some(&shaky(0)), false, false), AtStart::CountStart);
        assert_eq!(at_start(Some(&shaky(1)), false, false), AtStart::CountStart);
        assert!(
            matches!(at_start(Some(&shaky(2)), false, false), AtStart::GoBack(why) if why.contains("stopped 3 times"))
        );
        // A marker from before probation existed reads as stable.
        let old: Marker = serde_json::from_str(r#"{"phase":"upgraded","version":"1.1.0","rollout":1,"to":"a","from":"b","attempts":1,"deadline_s":60,"detail":""}"#).unwrap();
        assert!(old.stable);
        assert_eq!(at_start(Some(&old), false, false), AtStart::Run);
    }

    #[test]
    fn the_watcher_commits_on_a_sign_of_life_and_gives_up_at_the_deadline() {
        assert_eq!(watch(false, true, 0, 60), Watch::Wait);
        assert_eq!(watch(true, true, 0, 60), Watch::Commit);
        assert_eq!(watch(true, false, 99_000, 60), Watch::Commit, "it confirmed, then was restarted");
        assert_eq!(watch(false, false, 1_000, 60), Watch::Gone);
        assert_eq!(watch(false, true, 60_000, 60), Watch::TimedOut);
    }

    #[test]
    fn outcomes_report_the_phase() {
        let m = Marker { detail: "no".into(), ..marker(MarkerPhase::RolledBack, "1.1.0", 3, 1) };
        let o = m.outcome();
        assert_eq!(
            (o.state, o.version.as_str(), o.rollout, o.detail.as_str()),
            (UpgradeState::RolledBack, "1.1.0", 3, "no")
        );
    }
}
