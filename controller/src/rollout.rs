//! Fleet rollouts: moving a workload's devices from one revision to another
//! in waves, gated on health, rolled back automatically when too many devices
//! fail. Pure: the controller feeds it what devices report and the time, and
//! asks it which revision each device should run. Its whole state is plain
//! data, stored as one JSON document, so a restarted controller resumes it.

use std::collections::{BTreeMap, BTreeSet};

use baton_protocol::{Phase, WorkloadStatus};
use serde::{Deserialize, Serialize};

/// How much of the fleet a wave covers, cumulatively.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, schemars::JsonSchema)]
pub enum Wave {
    Devices(u32),
    Percent(u32),
}

impl Wave {
    /// `3` (devices) or `25%`.
    pub fn parse(s: &str) -> Option<Wave> {
        let s = s.trim();
        match s.strip_suffix('%') {
            Some(p) => p.trim().parse().ok().filter(|p| (1..=100).contains(p)).map(Wave::Percent),
            None => s.parse().ok().filter(|n| *n >= 1).map(Wave::Devices),
        }
    }
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, schemars::JsonSchema)]
pub struct Strategy {
    pub waves: Vec<Wave>,
    /// A device counts once it has run the new revision healthy this long.
    pub min_ready_ms: u64,
    /// More failed devices than this share of those updated rolls everything back.
    pub max_failure_pct: u32,
    /// A device not healthy this long after it was given the revision has failed.
    pub deadline_ms: u64,
}

impl Default for Strategy {
    fn default() -> Self {
        Self {
            waves: vec![Wave::Devices(1), Wave::Percent(25), Wave::Percent(100)],
            min_ready_ms: 10_000,
            max_failure_pct: 10,
            deadline_ms: 180_000,
        }
    }
}

/// Cumulative device counts at the end of each wave; the last is `n`.
pub fn wave_ends(waves: &[Wave], n: usize) -> Vec<usize> {
    let mut ends: Vec<usize> = Vec::new();
    for w in waves {
        let upto = match *w {
            Wave::Devices(d) => d as usize,
            Wave::Percent(p) => (n * p as usize).div_ceil(100),
        }
        .min(n);
        if upto > ends.last().copied().unwrap_or(0) {
            ends.push(upto);
        }
    }
    if ends.last().copied().unwrap_or(0) < n {
        ends.push(n);
    }
    ends
}

/// A disruption budget: per group of devices (a label's value), how many
/// may be updating at once.
#[derive(Debug, Clone, PartialEq, Eq, Default, Serialize, Deserialize, schemars::JsonSchema)]
pub struct Budget {
    /// Each device's group.
    pub group: BTreeMap<String, String>,
    /// Each group's allowance (at least 1).
    pub allowance: BTreeMap<String, usize>,
}

impl Budget {
    fn group_of(&self, device: &str) -> &str {
        self.group.get(device).map_or("", String::as_str)
    }

    fn allows(&self, group: &str) -> usize {
        self.allowance.get(group).copied().unwrap_or(1).max(1)
    }

    /// Reorders `devices` and cuts the waves `ends` so that no wave holds
    /// more of a group than its allowance: a wave that cannot be filled
    /// without that is split (waves are released one after another, so at
    /// most that many of a group update at once).
    pub fn shape(&self, devices: Vec<String>, ends: &[usize]) -> (Vec<String>, Vec<usize>) {
        let mut remaining: std::collections::VecDeque<String> = devices.into();
        let mut out: Vec<String> = Vec::with_capacity(remaining.len());
        let mut new_ends = Vec::new();
        for &target in ends {
            while out.len() < target && !remaining.is_empty() {
                let need = target - out.len();
                let mut taken: BTreeMap<&str, usize> = BTreeMap::new();
                let mut wave = Vec::new();
                let mut rest = std::collections::VecDeque::new();
                while let Some(d) = remaining.pop_front() {
                    let g = self.group_of(&d);
                    let n = taken.get(g).copied().unwrap_or(0);
                    if wave.len() < need && n < self.allows(g) {
                        taken.insert(self.group.get(&d).map_or("", String::as_str), n + 1);
                        wave.push(d);
                    } else {
                        rest.push_back(d);
                    }
                }
                remaining = rest;
                out.extend(wave);
                new_ends.push(out.len());
            }
        }
        (out, new_ends)
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, schemars::JsonSchema)]
#[serde(rename_all = "kebab-case")]
pub enum State {
    Progressing,
    Paused,
    Succeeded,
    /// Too many devices failed: every device went back to `from`.
    RolledBack,
    /// Stopped by the operator: every device went back to `from`.
    Aborted,
    /// A newer revision was applied before this one finished.
    Superseded,
}

impl State {
    pub fn active(self) -> bool {
        matches!(self, State::Progressing | State::Paused)
    }
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, schemars::JsonSchema)]
pub enum Outcome {
    Pending,
    Ready,
    Failed(String),
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, schemars::JsonSchema)]
pub struct DeviceProgress {
    /// When the device was given the new revision (moved while it is away).
    pub released_ms: u64,
    pub healthy_since_ms: Option<u64>,
    pub outcome: Outcome,
    /// Since when it has been away (not online, or holding the revision
    /// back for its update window or lock), while pending.
    #[serde(default)]
    pub away_since_ms: Option<u64>,
    /// Why it holds the revision back, while it does.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub waiting: Option<String>,
}

/// What the controller knows of one device for this workload.
#[derive(Debug, Clone, Default)]
pub struct Observation {
    pub online: bool,
    pub status: Option<WorkloadStatus>,
    /// Why the device holds the new revision back (its update window or
    /// lock): waiting, like being away, is neither failing nor blocking.
    pub waiting: Option<String>,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, schemars::JsonSchema)]
pub struct Rollout {
    pub workload: String,
    pub from: u64,
    pub to: u64,
    /// In release order.
    pub devices: Vec<String>,
    pub wave_ends: Vec<usize>,
    /// Index of the wave released last.
    pub wave: usize,
    pub state: State,
    pub strategy: Strategy,
    pub started_ms: u64,
    pub finished_ms: Option<u64>,
    pub reason: Option<String>,
    pub progress: BTreeMap<String, DeviceProgress>,
    /// Why an active rollout cannot move on right now (every device it could
    /// judge is away), for `rollout status`.
    #[serde(default)]
    pub waiting: Option<String>,
    /// The workload's disruption budget, when it has one: waves were cut to
    /// it, and a stand-in for an away device keeps to it.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub budget: Option<Budget>,
}

/// An operator's step the rollout's state does not allow.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum Refused {
    #[error("the rollout is {}, not progressing", lower(.0))]
    NotProgressing(State),
    #[error("the rollout is {}, not paused", lower(.0))]
    NotPaused(State),
    #[error("the rollout is already {}", lower(.0))]
    Ended(State),
}

fn lower(s: &State) -> String {
    format!("{s:?}").to_lowercase()
}

/// What a step changed, for the event log; empty when nothing did.
pub type Events = Vec<String>;

impl Rollout {
    pub fn new(workload: &str, from: u64, to: u64, devices: Vec<String>, strategy: Strategy, now: u64) -> Self {
        Self::with_budget(workload, from, to, devices, strategy, None, now)
    }

    /// As `new`, with the waves cut to a disruption budget.
    pub fn with_budget(
        workload: &str,
        from: u64,
        to: u64,
        devices: Vec<String>,
        strategy: Strategy,
        budget: Option<Budget>,
        now: u64,
    ) -> Self {
        let ends = wave_ends(&strategy.waves, devices.len());
        let (devices, ends) = match &budget {
            Some(b) => b.shape(devices, &ends),
            None => (devices, ends),
        };
        let mut r = Rollout {
            workload: workload.into(),
            from,
            to,
            wave_ends: ends,
            devices,
            wave: 0,
            state: State::Progressing,
            strategy,
            started_ms: now,
            finished_ms: None,
            reason: None,
            progress: BTreeMap::new(),
            waiting: None,
            budget,
        };
        r.release(now);
        r
    }

    /// How long a released device may be away before another device takes
    /// its place in the wave: long enough for a reboot, short next to the deadline.
    fn away_grace_ms(&self) -> u64 {
        (self.strategy.deadline_ms / 3).clamp(1_000, 60_000)
    }

    pub fn released(&self) -> usize {
        self.wave_ends.get(self.wave).copied().unwrap_or(0)
    }

    fn release(&mut self, now: u64) {
        for d in &self.devices[..self.released()] {
            self.progress.entry(d.clone()).or_insert(DeviceProgress {
                released_ms: now,
                healthy_since_ms: None,
                outcome: Outcome::Pending,
                away_since_ms: None,
                waiting: None,
            });
        }
    }

    /// Devices currently meant to run `to`.
    pub fn released_set(&self) -> BTreeSet<&str> {
        self.devices[..self.released()].iter().map(String::as_str).collect()
    }

    /// The revision `device` should run, given whether it was released.
    pub fn revision_for(&self, released: bool) -> u64 {
        match self.state {
            State::Progressing | State::Paused if released => self.to,
            State::Succeeded => self.to,
            _ => self.from,
        }
    }

    pub fn counts(&self) -> Counts {
        let mut c = Counts { devices: self.devices.len(), released: self.released(), ..Default::default() };
        for p in self.progress.values() {
            match p.outcome {
                Outcome::Pending => c.pending += 1,
                Outcome::Ready => c.ready += 1,
                Outcome::Failed(_) => c.failed += 1,
            }
        }
        c
    }

    fn finish(&mut self, state: State, reason: Option<String>, now: u64) {
        self.state = state;
        self.reason = reason;
        self.finished_ms = Some(now);
    }

    pub fn pause(&mut self) -> Result<(), Refused> {
        match self.state {
            State::Progressing | State::Paused => {
                self.state = State::Paused;
                Ok(())
            }
            s => Err(Refused::NotProgressing(s)),
        }
    }

    pub fn resume(&mut self) -> Result<(), Refused> {
        match self.state {
            State::Paused | State::Progressing => {
                self.state = State::Progressing;
                Ok(())
            }
            s => Err(Refused::NotPaused(s)),
        }
    }

    pub fn abort(&mut self, now: u64) -> Result<(), Refused> {
        if !self.state.active() {
            return Err(Refused::Ended(self.state));
        }
        self.finish(State::Aborted, Some("aborted by the operator".into()), now);
        Ok(())
    }

    pub fn supersede(&mut self, by: u64, now: u64) {
        if self.state.active() {
            self.finish(State::Superseded, Some(format!("superseded by revision {by}")), now);
        }
    }

    /// Judges every released device, trips the failure threshold, and
    /// releases the next wave once this one is done.
    pub fn step(&mut self, now: u64, observe: impl Fn(&str) -> Observation) -> Events {
        let mut events = Vec::new();
        if !self.state.active() {
            return events;
        }
        let s = &self.strategy;
        let (to, min_ready, deadline) = (self.to, s.min_ready_ms, s.deadline_ms);
        let away_grace = self.away_grace_ms();
        let mut wave_done = true;
        // Released devices away for longer than the grace: another device takes their place.
        let mut long_away = Vec::new();
        for (i, d) in self.devices[..self.released()].iter().enumerate() {
            let Some(p) = self.progress.get_mut(d) else { continue };
            if p.outcome != Outcome::Pending {
                continue;
            }
            let o = observe(d);
            p.waiting.clone_from(&o.waiting);
            if !o.online || o.waiting.is_some() {
                // Away (or waiting for its window or lock): not judged, not
                // blocking, and its deadline waits for it.
                p.released_ms = now;
                p.healthy_since_ms = None;
                if now.saturating_sub(*p.away_since_ms.get_or_insert(now)) >= away_grace {
                    long_away.push(i);
                }
                continue;
            }
            p.away_since_ms = None;
            let st = o.status.as_ref();
            let healthy = st.is_some_and(|s| s.proves(to));
            if healthy {
                let since = *p.healthy_since_ms.get_or_insert(now);
                if now.saturating_sub(since) >= min_ready {
                    p.outcome = Outcome::Ready;
                    continue;
                }
            } else {
                p.healthy_since_ms = None;
                if let Some(s) = st.filter(|s| s.phase == Phase::RolledBack) {
                    let why = s.last_error.clone().unwrap_or_else(|| "rolled back on the device".into());
                    events.push(format!("device {d} failed revision {to}: {why}"));
                    p.outcome = Outcome::Failed(why);
                    continue;
                }
                if now.saturating_sub(p.released_ms) > deadline {
                    let why = match st {
                        Some(s) if s.revision == to => format!(
                            "not healthy within {}s ({:?}{})",
                            deadline / 1000,
                            s.phase,
                            s.last_error.as_ref().map(|e| format!(": {e}")).unwrap_or_default()
                        ),
                        _ => format!("did not run revision {to} within {}s", deadline / 1000),
                    };
                    events.push(format!("device {d} failed revision {to}: {why}"));
                    p.outcome = Outcome::Failed(why);
                    continue;
                }
            }
            wave_done = false;
        }

        for i in long_away {
            // With a budget: a stand-in of the same group (the wave stays
            // within it); without one, the first online device.
            let same_group = |j: usize| {
                self.budget.as_ref().is_none_or(|b| b.group_of(&self.devices[j]) == b.group_of(&self.devices[i]))
            };
            let Some(j) = (self.released()..self.devices.len()).find(|&j| {
                same_group(j) && observe(&self.devices[j]).online && observe(&self.devices[j]).waiting.is_none()
            }) else {
                continue;
            };
            let (gone, stand_in) = (self.devices[i].clone(), self.devices[j].clone());
            self.devices.swap(i, j);
            self.progress.remove(&gone);
            self.progress.insert(
                stand_in.clone(),
                DeviceProgress {
                    released_ms: now,
                    healthy_since_ms: None,
                    outcome: Outcome::Pending,
                    away_since_ms: None,
                    waiting: None,
                },
            );
            events.push(format!(
                "device {gone} is away: {stand_in} takes its place in wave {} (it gets revision {to} with a later wave)",
                self.wave + 1
            ));
            wave_done = false;
        }

        let c = self.counts();
        if c.failed > 0 && c.failed * 100 > self.strategy.max_failure_pct as usize * c.released {
            let why = format!(
                "{} of {} updated devices failed (threshold {}%); rolled back to revision {}",
                c.failed, c.released, self.strategy.max_failure_pct, self.from
            );
            events.push(format!("rollout of revision {to} stopped: {why}"));
            self.finish(State::RolledBack, Some(why), now);
            return events;
        }
        // Every device that could prove the revision is away, and none could
        // stand in for them: say so, once.
        let stuck = wave_done
            && c.ready == 0
            && c.released > 0
            && !self.devices[self.released()..].iter().any(|d| observe(d).online);
        let held = self.devices[..self.released()]
            .iter()
            .filter(|d| self.progress.get(*d).is_some_and(|p| p.waiting.is_some()))
            .count();
        let waiting = stuck.then(|| match held {
            0 => format!("waiting for a device to come online: none of the {} released devices is", c.released),
            n => format!(
                "waiting for update windows or locks: {n} of the {} released devices hold the revision back",
                c.released
            ),
        });
        if waiting != self.waiting {
            if let Some(w) = &waiting {
                events.push(format!("rollout of revision {to} {w}"));
            }
            self.waiting = waiting;
        }
        // A wave is done when every reachable device in it is judged, and at
        // least one device has proven the revision.
        if wave_done && self.state == State::Progressing && (c.ready > 0 || c.released == 0) {
            if self.wave + 1 < self.wave_ends.len() {
                self.wave += 1;
                self.release(now);
                events.push(format!(
                    "wave {}/{} released: {} of {} devices get revision {to}",
                    self.wave + 1,
                    self.wave_ends.len(),
                    self.released(),
                    self.devices.len()
                ));
            } else {
                let away = c.pending;
                let why = (away > 0).then(|| {
                    format!("{away} device(s) away during the rollout never reported it: they get it when they return")
                });
                events.push(format!(
                    "rollout of revision {to} succeeded: {} of {} devices run it{}",
                    c.ready,
                    c.devices,
                    why.as_ref().map(|w| format!("; {w}")).unwrap_or_default()
                ));
                self.finish(State::Succeeded, why, now);
            }
        }
        events
    }
}

#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize, schemars::JsonSchema)]
pub struct Counts {
    pub devices: usize,
    pub released: usize,
    pub pending: usize,
    pub ready: usize,
    pub failed: usize,
}

#[cfg(test)]
mod tests {
    use super::*;
    use baton_protocol::Health;

    fn devices(n: usize) -> Vec<String> {
        (0..n).map(|i| format!("d{i:02}")).collect()
    }

    fn strategy(waves: &[&str]) -> Strategy {
        Strategy {
            waves: waves.iter().map(|w| Wave::parse(w).unwrap()).collect(),
            min_ready_ms: 1000,
            max_failure_pct: 20,
            deadline_ms: 5000,
        }
    }

    fn running(revision: u64, health: Health) -> Observation {
        Observation {
            online: true,
            status: Some(WorkloadStatus { revision, phase: Phase::Running, health, ..Default::default() }),
            waiting: None,
        }
    }

    #[test]
    fn a_disruption_budget_cuts_waves_to_its_allowance_per_group() {
        // Six devices on two sites, one wave of all: at most one per site at a time.
        let group: BTreeMap<String, String> =
            devices(6).into_iter().enumerate().map(|(i, d)| (d, ["a", "b"][i / 3].to_string())).collect();
        let b = Budget { group, allowance: BTreeMap::from([("a".into(), 1), ("b".into(), 1)]) };
        let (order, ends) = b.shape(devices(6), &[6]);
        assert_eq!(ends, [2, 4, 6]);
        assert_eq!(order, ["d00", "d03", "d01", "d04", "d02", "d05"]);
        // Waves [1, 100%]: the canary alone, then the rest within the budget.
        let (order, ends) = b.shape(devices(6), &[1, 6]);
        assert_eq!(ends, [1, 3, 5, 6]);
        assert_eq!(order[..3], ["d00", "d01", "d03"]);
        // An allowance of 2 on site a.
        let b = Budget { allowance: BTreeMap::from([("a".into(), 2), ("b".into(), 1)]), ..b };
        assert_eq!(b.shape(devices(6), &[6]).1, [3, 5, 6]);
        // A rollout made with it keeps the shape.
        let r = Rollout::with_budget("w", 1, 2, devices(6), strategy(&["100%"]), Some(b), 0);
        assert_eq!((r.released(), r.wave_ends.len()), (3, 3));
    }

    #[test]
    fn a_device_waiting_for_its_window_is_neither_failed_nor_blocking() {
        let mut r = Rollout::new("w", 1, 2, devices(3), strategy(&["1", "100%"]), 0);
        let held = |_: &str| Observation {
            online: true,
            status: Some(WorkloadStatus {
                revision: 1,
                phase: Phase::Running,
                health: Health::Healthy,
                ..Default::default()
            }),
            waiting: Some("outside its install window (0 2 * * * for 2h UTC)".into()),
        };
        // Far past the deadline: still pending, not failed.
        r.step(10_000_000, held);
        assert_eq!(r.counts().failed, 0);
        // With nobody online to stand in, the rollout says what it waits for.
        let none_else = |d: &str| if d == r_first() { held(d) } else { Observation::default() };
        let events = r.step(20_000_000, none_else);
        assert!(r.progress.values().next().is_some_and(|p| p.waiting.is_some()));
        assert!(
            events.iter().any(|e| e.contains("waiting for update windows or locks: 1 of the 1 released devices")),
            "{events:?}"
        );
        // The window opens: the device runs it healthy and the rollout goes on.
        r.step(20_001_000, |_| running(2, Health::Healthy));
        r.step(20_100_000, |_| running(2, Health::Healthy));
        assert!(r.released() > 1 || r.state == State::Succeeded, "{r:?}");
    }

    /// A run-to-completion workload (a trial's `echo job done`, restart
    /// on-failure) finishes with 0: that proves the revision; a non-zero
    /// exit does not.
    #[test]
    fn a_job_that_finished_cleanly_is_updated() {
        let exited = |code: i32| Observation {
            online: true,
            status: Some(WorkloadStatus {
                revision: 2,
                phase: Phase::Exited,
                last_exit_code: Some(code),
                ..Default::default()
            }),
            waiting: None,
        };
        let mut r = Rollout::new("w", 1, 2, devices(2), strategy(&["100%"]), 0);
        r.step(0, |_| exited(0));
        r.step(2_000, |_| exited(0));
        assert_eq!((r.state, r.counts().ready), (State::Succeeded, 2), "{r:?}");
        let mut r = Rollout::new("w", 1, 2, devices(2), strategy(&["100%"]), 0);
        r.step(0, |_| exited(1));
        r.step(2_000, |_| exited(1));
        assert_eq!(r.counts().ready, 0, "{r:?}");
    }

    fn r_first() -> &'static str {
        "d00"
    }

    #[test]
    fn wave_sizes() {
        let w = |s: &[&str], n| wave_ends(&strategy(s).waves, n);
        assert_eq!(w(&["1", "10%", "50%", "100%"], 100), vec![1, 10, 50, 100]);
        assert_eq!(w(&["1", "10%", "50%"], 5), vec![1, 3, 5]);
        assert_eq!(w(&["2"], 10), vec![2, 10], "the last wave always covers everyone");
        assert_eq!(w(&["50%", "3"], 4), vec![2, 3, 4]);
        assert_eq!(w(&["1", "100%"], 0), Vec::<usize>::new());
        assert_eq!(Wave::parse("0"), None);
        assert_eq!(Wave::parse("120%"), None);
    }

    #[test]
    fn waves_advance_only_after_min_ready() {
        let mut r = Rollout::new("w", 1, 2, devices(10), strategy(&["1", "50%"]), 0);
        assert_eq!(r.released(), 1);
        // Healthy at t=0, but min_ready is 1 s.
        assert!(r.step(0, |_| running(2, Health::Healthy)).is_empty());
        assert!(r.step(500, |_| running(2, Health::Healthy)).is_empty());
        let ev = r.step(1000, |_| running(2, Health::Healthy));
        assert_eq!(r.released(), 5, "{ev:?}");
        // Still on the old revision: wave 2 waits.
        r.step(2000, |d| if d == "d00" { running(2, Health::Healthy) } else { running(1, Health::Healthy) });
        assert_eq!(r.released(), 5);
        r.step(3000, |_| running(2, Health::Healthy));
        r.step(4000, |_| running(2, Health::Healthy));
        assert_eq!(r.released(), 10);
        r.step(5000, |_| running(2, Health::Healthy));
        r.step(6000, |_| running(2, Health::Healthy));
        assert_eq!(r.state, State::Succeeded);
        assert_eq!(r.counts().ready, 10);
    }

    #[test]
    fn unhealthy_blinks_reset_the_ready_clock() {
        let mut r = Rollout::new("w", 1, 2, devices(2), strategy(&["1"]), 0);
        r.step(0, |_| running(2, Health::Healthy));
        r.step(600, |_| running(2, Health::Unhealthy));
        r.step(1200, |_| running(2, Health::Healthy));
        assert_eq!(r.released(), 1, "healthy for 0 ms only");
        r.step(2200, |_| running(2, Health::Healthy));
        assert_eq!(r.released(), 2);
    }

    #[test]
    fn a_device_rollback_trips_the_threshold_and_rolls_everyone_back() {
        let mut r = Rollout::new("w", 1, 2, devices(10), strategy(&["1", "100%"]), 0);
        let rolled_back = Observation {
            waiting: None,
            online: true,
            status: Some(WorkloadStatus {
                revision: 1,
                phase: Phase::RolledBack,
                last_error: Some("revision 2 not healthy within 30s".into()),
                ..Default::default()
            }),
        };
        let ev = r.step(100, |_| rolled_back.clone());
        assert_eq!(r.state, State::RolledBack, "{ev:?}");
        assert!(r.reason.as_deref().unwrap().contains("1 of 1 updated devices failed"));
        assert_eq!(r.revision_for(true), 1);
        assert_eq!(r.revision_for(false), 1);
    }

    #[test]
    fn failures_under_the_threshold_do_not_stop_the_rollout() {
        let mut r = Rollout::new("w", 1, 2, devices(10), strategy(&["100%"]), 0);
        // d00 never runs revision 2; 1 of 10 failing is under 20 %.
        let obs = |d: &str| if d == "d00" { running(1, Health::Healthy) } else { running(2, Health::Healthy) };
        r.step(0, obs);
        r.step(1000, obs);
        assert_eq!(r.state, State::Progressing, "d00 is still within its deadline");
        r.step(5001, obs);
        assert_eq!(r.state, State::Succeeded);
        assert_eq!(r.counts().failed, 1);
        assert!(matches!(&r.progress["d00"].outcome, Outcome::Failed(w) if w.contains("did not run revision 2")));
    }

    #[test]
    fn offline_devices_neither_block_nor_fail() {
        let mut r = Rollout::new("w", 1, 2, devices(3), strategy(&["2", "100%"]), 0);
        let obs = |d: &str| if d == "d01" { Observation::default() } else { running(2, Health::Healthy) };
        r.step(0, obs);
        r.step(1000, obs);
        assert_eq!(r.released(), 3, "d01 is away: wave 1 completes without it");
        r.step(10_000, obs);
        r.step(11_000, obs);
        assert_eq!(r.state, State::Succeeded);
        assert_eq!(r.progress["d01"].outcome, Outcome::Pending, "away the whole time: never judged");
    }

    #[test]
    fn a_canary_that_stays_away_hands_its_place_to_an_online_device() {
        // deadline 5 s: a device away for 1.666 s is replaced in its wave.
        let mut r = Rollout::new("w", 1, 2, devices(4), strategy(&["1", "100%"]), 0);
        let obs = |d: &str| if d == "d00" { Observation::default() } else { running(2, Health::Healthy) };
        assert!(r.step(0, obs).is_empty());
        assert!(r.step(1_000, obs).is_empty(), "replaced before its grace");
        let ev = r.step(2_000, obs);
        assert!(ev.iter().any(|e| e.contains("device d00 is away: d01 takes its place in wave 1")), "{ev:?}");
        assert_eq!(r.released_set().into_iter().collect::<Vec<_>>(), ["d01"]);
        assert!(!r.progress.contains_key("d00"), "the away device stays asked for the new revision");
        r.step(2_000, obs);
        r.step(3_000, obs);
        assert_eq!(r.released(), 4, "the stand-in proved the revision: the next wave goes");
        r.step(5_000, obs);
        let ev = r.step(6_000, obs);
        assert_eq!(r.state, State::Succeeded, "{ev:?}");
        // Counted as updated only when it said so: d00 never did.
        assert_eq!((r.counts().ready, r.counts().pending), (3, 1));
        assert!(ev.iter().any(|e| e.contains("succeeded: 3 of 4 devices run it; 1 device(s) away")), "{ev:?}");
        assert!(r.reason.as_deref().unwrap_or("").contains("get it when they return"));
    }

    #[test]
    fn a_rollout_with_every_device_away_says_it_waits_and_resumes_when_one_returns() {
        let mut r = Rollout::new("w", 1, 2, devices(2), strategy(&["1", "100%"]), 0);
        let ev = r.step(0, |_| Observation::default());
        assert!(ev.iter().any(|e| e.contains("waiting for a device to come online")), "{ev:?}");
        assert!(r.waiting.is_some() && r.state == State::Progressing);
        assert!(r.step(10_000, |_| Observation::default()).is_empty(), "the waiting event repeated");
        r.step(20_000, |_| running(2, Health::Healthy));
        r.step(21_000, |_| running(2, Health::Healthy));
        assert_eq!((r.waiting.as_deref(), r.released()), (None, 2));
    }

    #[test]
    fn paused_rollouts_hold_their_wave_and_abort_reverts() {
        let mut r = Rollout::new("w", 1, 2, devices(4), strategy(&["1", "100%"]), 0);
        r.pause().unwrap();
        r.step(0, |_| running(2, Health::Healthy));
        r.step(5000, |_| running(2, Health::Healthy));
        assert_eq!((r.released(), r.counts().ready), (1, 1), "judged, not advanced");
        r.resume().unwrap();
        r.step(5001, |_| running(2, Health::Healthy));
        assert_eq!(r.released(), 4);
        r.abort(6000).unwrap();
        assert_eq!((r.state, r.revision_for(true)), (State::Aborted, 1));
        assert!(r.resume().is_err());
    }

    #[test]
    fn state_survives_a_json_round_trip() {
        let mut r = Rollout::new("w", 3, 4, devices(5), Strategy::default(), 7);
        r.step(8, |_| running(4, Health::Healthy));
        let back: Rollout = serde_json::from_str(&serde_json::to_string(&r).unwrap()).unwrap();
        assert_eq!(back, r);
    }
}
