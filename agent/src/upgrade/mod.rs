//! Agent self-update: the controller names a build in the desired document;
//! the device fetches it over its MQTT link (`fetch`), checks it, stages it
//! next to the running one and switches to it on trial, going back by itself
//! when it does not come online (`switch`, with its decisions in the pure
//! `plan`). [`Upgrader`] is the link's side of it: it turns targets, pieces
//! and ticks into requests to send, inventories to republish, and the
//! moment to hand over.

pub mod fetch;
pub mod plan;
pub mod switch;

use std::time::{Duration, Instant};

use baton_protocol::release::{AgentTarget, ReleaseChunk, ReleaseRequest, UpgradeOutcome, UpgradeState};

use crate::config::AgentConfig;
use fetch::{Download, Progress};
use plan::{Marker, MarkerPhase, Want};
use switch::Paths;

/// How long the new agent stays connected before it says it came online.
pub const CONFIRM_AFTER: Duration = Duration::from_secs(5);

/// How long the new agent, online, waits for the watcher to make it
/// current before doing so itself (the watcher was killed).
pub const COMMIT_AFTER: Duration = Duration::from_secs(10);

/// What the link should do after an upgrade step.
#[derive(Debug, Default)]
pub struct Effects {
    pub send: Vec<ReleaseRequest>,
    /// The inventory (which carries the upgrade's outcome) changed.
    pub report: bool,
    /// Stop and hand over to the staged build (`switch::hand_over`).
    pub hand_over: bool,
}

pub struct Upgrader {
    paths: Paths,
    enabled: bool,
    reserve: u64,
    deadline_s: u64,
    /// Some(version) while this process is the new agent on trial.
    on_trial: Option<String>,
    /// When this agent on trial left its sign of life.
    confirmed: Option<Instant>,
    last: Option<Marker>,
    download: Option<Download>,
    /// The agent the newest document names: looked at again once a trial
    /// ends (the fleet may have rolled back meanwhile).
    wanted: Option<AgentTarget>,
    /// The version this agent reports: its own, or a simulated device's.
    running: String,
    /// When this process started (a new agent's probation counts from it).
    started: Instant,
    /// The file the service manager starts (`agent_entry`).
    entry: std::path::PathBuf,
    /// A simulated device (`simulate`): the version it would go back to.
    /// Its switches happen in memory; its downloads are real.
    simulated: Option<Option<String>>,
}

impl Upgrader {
    pub fn new(config: &AgentConfig, on_trial: Option<String>) -> Self {
        let paths = Paths::new(&config.data_dir);
        let last = switch::read_marker(&paths);
        Upgrader {
            paths,
            enabled: config.self_update,
            reserve: config.disk_reserve_bytes,
            deadline_s: config.upgrade_deadline.as_secs(),
            on_trial,
            confirmed: None,
            last,
            download: None,
            wanted: None,
            running: crate::version::version().to_owned(),
            started: Instant::now(),
            entry: config.agent_entry.clone(),
            simulated: config.simulated_upgrades.then_some(None),
        }
    }

    /// The version this agent reports as running.
    pub fn running(&self) -> &str {
        &self.running
    }

    /// The version kept to go back to.
    pub fn previous_version(&self) -> Option<String> {
        if let Some(previous) = &self.simulated {
            return previous.clone();
        }
        switch::linked(&self.paths.previous).and_then(|n| switch::version_of(&n).map(str::to_owned))
    }

    /// What the inventory says of upgrades: the previous version and the last outcome.
    pub fn outcome(&self) -> Option<UpgradeOutcome> {
        if let Some(d) = &self.download {
            return Some(UpgradeOutcome {
                version: d.target.version.clone(),
                rollout: d.target.rollout,
                state: UpgradeState::InProgress,
                detail: format!("downloading: {} of {} bytes", d.offset, d.target.size),
            });
        }
        self.last.as_ref().map(Marker::outcome)
    }

    fn refuse(&mut self, target: &AgentTarget, why: String) -> Effects {
        tracing::warn!(version = %target.version, reason = %why, "agent upgrade refused");
        self.download = None;
        let m = Marker {
            phase: MarkerPhase::Refused,
            version: target.version.clone(),
            rollout: target.rollout,
            detail: why,
            ..Default::default()
        };
        if let Err(e) = switch::write_marker(&self.paths, &m) {
            tracing::warn!(error = %e, "cannot record the refusal; it will be reported until the agent restarts");
        }
        self.last = Some(m);
        Effects { report: true, ..Default::default() }
    }

    /// The agent the newest desired document names (None: keep this one).
    pub fn on_target(&mut self, target: Option<&AgentTarget>, now: Instant) -> Effects {
        self.wanted = target.cloned();
        let Some(target) = target else {
            if self.download.take().is_some() {
                tracing::info!("agent upgrade withdrawn; the download stops (its part is kept)");
                return Effects { report: true, ..Default::default() };
            }
            return Effects::default();
        };
        if !self.enabled {
            // Said once per upgrade, so that the controller counts this
            // device out at once rather than at its deadline.
            let said = self.last.as_ref().is_some_and(|m| {
                m.phase == MarkerPhase::Refused && m.rollout == target.rollout && m.version == target.version
            });
            if target.version == self.running || said {
                return Effects::default();
            }
            return self.refuse(target, "self-update is off on this device (self_update = false in its config)".into());
        }
        if self.on_trial.is_some() {
            return Effects::default();
        }
        if self.download.as_ref().is_some_and(|d| d.target == *target) {
            return Effects::default();
        }
        self.download = None;
        let previous = self.previous_version();
        match plan::want(target, &self.running, previous.as_deref(), self.last.as_ref()) {
            Want::Nothing => Effects::default(),
            Want::Refuse(why) => self.refuse(target, why),
            Want::SwitchBack if self.simulated.is_some() => self.simulate_switch(target),
            Want::SwitchBack => {
                let Some(to) = switch::linked(&self.paths.previous) else {
                    return self.refuse(target, "the previous agent is gone".into());
                };
                self.stage_trial(target, to)
            }
            Want::Fetch if self.kept(target) => {
                tracing::info!(version = %target.version, "the new agent is on this device already (kept from before): no download");
                self.stage_trial(target, switch::release_name(&target.version, &target.digest))
            }
            Want::Fetch => match self.entry_refusal() {
                Some(why) => self.refuse(target, why),
                None => self.fetch(target, now),
            },
        }
    }

    /// Starts (or resumes) the download of `target`.
    fn fetch(&mut self, target: &AgentTarget, now: Instant) -> Effects {
        match Download::start(&self.paths, target.clone(), self.reserve) {
            Err(why) => self.refuse(target, why),
            Ok(mut d) => {
                tracing::info!(version = %target.version, size = target.size, resume_at = d.offset, "downloading a new agent");
                let send = d.restart(now);
                let done = d.complete();
                self.download = Some(d);
                if done {
                    // Whole already (downloaded before a restart): check and stage it.
                    if let Err(why) = self.download.as_ref().map_or(Ok(()), Download::verify) {
                        let _ = std::fs::remove_file(self.paths.part(&target.digest));
                        return self.refuse(target, why);
                    }
                    return self.finish();
                }
                Effects { send, report: true, ..Default::default() }
            }
        }
    }

    /// A new agent that came online and has now run `STABLE_AFTER` in this
    /// process is kept for good: its restarts no longer count.
    fn prove_stable(&mut self, now: Instant) {
        let on_probation = self.last.as_ref().is_some_and(|m| m.phase == MarkerPhase::Upgraded && !m.stable);
        if !on_probation || self.simulated.is_some() || now.duration_since(self.started) < plan::STABLE_AFTER {
            return;
        }
        let Some(mut m) = switch::read_marker(&self.paths).filter(|m| m.phase == MarkerPhase::Upgraded) else {
            return;
        };
        m.stable = true;
        match switch::write_marker(&self.paths, &m) {
            Ok(()) => tracing::info!(version = %m.version, "the new agent is stable; kept for good"),
            Err(e) => tracing::warn!(error = %e, "cannot record that the new agent is stable"),
        }
        self.last = Some(m);
    }

    /// Why this agent could not switch builds (it runs from a file its
    /// service manager does not start), before anything is downloaded.
    fn entry_refusal(&self) -> Option<String> {
        if self.simulated.is_some() {
            return None;
        }
        let exe = std::env::current_exe().ok()?;
        switch::check_entry(&self.paths, &exe, &self.entry).err()
    }

    /// Whether `target`'s build is in `releases/` already, whole.
    fn kept(&self, target: &AgentTarget) -> bool {
        if self.simulated.is_some() {
            return false;
        }
        let path = self.paths.release(&switch::release_name(&target.version, &target.digest));
        switch::sha256_file(&path).is_ok_and(|d| d == target.digest)
    }

    /// A piece from the controller.
    pub fn on_chunk(&mut self, chunk: &ReleaseChunk, now: Instant) -> Effects {
        let Some(d) = &mut self.download else { return Effects::default() };
        match d.accept(chunk, now) {
            Ok(Progress::Next(r)) => Effects { send: r, ..Default::default() },
            Ok(Progress::Ignored) => Effects::default(),
            Ok(Progress::Complete) => self.finish(),
            Err(why) => {
                let target = d.target.clone();
                self.refuse(&target, why)
            }
        }
    }

    /// A download whose bytes are all there and verified (by `accept`, or
    /// after a restart by `Download::verify`): staged and tried.
    fn finish(&mut self) -> Effects {
        let Some(d) = self.download.take() else { return Effects::default() };
        let target = d.target.clone();
        if self.simulated.is_some() {
            let _ = std::fs::remove_file(&d.part);
            return self.simulate_switch(&target);
        }
        let name = switch::release_name(&target.version, &target.digest);
        if let Err(e) = switch::stage(&self.paths, &d.part, &name) {
            return self.refuse(&target, format!("cannot stage the new agent: {e}"));
        }
        self.stage_trial(&target, name)
    }

    /// A simulated device "switches" to a verified build: it reports the new
    /// version, keeps the old one to go back to, and the upgrade as done.
    fn simulate_switch(&mut self, target: &AgentTarget) -> Effects {
        let from = std::mem::replace(&mut self.running, target.version.clone());
        self.simulated = Some(Some(from.clone()));
        self.last = Some(Marker {
            phase: MarkerPhase::Upgraded,
            version: target.version.clone(),
            rollout: target.rollout,
            from,
            to: target.version.clone(),
            stable: true,
            ..Default::default()
        });
        Effects { report: true, ..Default::default() }
    }

    /// Records the trial of release `to` and asks the link to hand over.
    fn stage_trial(&mut self, target: &AgentTarget, to: String) -> Effects {
        let exe = match std::env::current_exe() {
            Ok(p) => p,
            Err(e) => return self.refuse(target, format!("cannot find the running agent's binary: {e}")),
        };
        let from = match switch::adopt(&self.paths, &exe, &self.entry, &self.running) {
            Ok(name) => name,
            Err(e) => return self.refuse(target, format!("{e}; reinstall the agent with cross/install.sh")),
        };
        // A build kept from before may have lost its mode (copied by hand, restored).
        let executable =
            std::fs::set_permissions(self.paths.release(&to), std::os::unix::fs::PermissionsExt::from_mode(0o755));
        if let Err(e) = executable {
            return self.refuse(target, format!("cannot make {to} executable: {e}"));
        }
        let same = |m: &&Marker| m.rollout == target.rollout && m.version == target.version;
        let tries = self.last.as_ref().filter(same).map_or(0, |m| m.tries + 1);
        let m = Marker {
            phase: MarkerPhase::Trying,
            version: target.version.clone(),
            rollout: target.rollout,
            to,
            from,
            attempts: 0,
            deadline_s: self.deadline_s,
            detail: String::new(),
            tries,
            restarts: 0,
            // Set on probation by the commit.
            stable: true,
        };
        if let Err(e) = switch::write_marker(&self.paths, &m) {
            return self.refuse(target, format!("cannot record the upgrade: {e}"));
        }
        tracing::info!(version = %m.version, to = %m.to, from = %m.from, "new agent staged; switching to it on trial");
        self.last = Some(m);
        Effects { hand_over: true, ..Default::default() }
    }

    /// Connected again: ask for the piece in flight once more.
    pub fn on_connect(&mut self, now: Instant) -> Effects {
        Effects { send: self.download.as_mut().map(|d| d.restart(now)).unwrap_or_default(), ..Default::default() }
    }

    /// About once a second: pieces overdue are asked for again; the new agent
    /// on trial says it came online once connected for `CONFIRM_AFTER`, then
    /// reports the upgrade once the watcher made it current.
    pub fn on_tick(&mut self, now: Instant, connected_since: Option<Instant>) -> Effects {
        switch::reap_watcher();
        self.prove_stable(now);
        let fx =
            Effects { send: self.download.as_mut().map(|d| d.overdue(now)).unwrap_or_default(), ..Default::default() };
        let Some(version) = self.on_trial.clone() else { return fx };
        if self.confirmed.is_none() && connected_since.is_some_and(|t| now.duration_since(t) >= CONFIRM_AFTER) {
            match switch::confirm(&self.paths, &version) {
                Ok(()) => {
                    tracing::info!(%version, "came online on trial; the watcher makes this agent current");
                    self.confirmed = Some(now);
                }
                Err(e) => tracing::warn!(error = %e, "cannot leave the sign of life; the upgrade will roll back"),
            }
        }
        let Some(confirmed) = self.confirmed else { return fx };
        let Some(mut m) = switch::read_marker(&self.paths) else { return fx };
        if m.phase == MarkerPhase::Trying {
            if now.duration_since(confirmed) < COMMIT_AFTER {
                return fx;
            }
            // Online, and nobody made it current: the watcher is gone.
            tracing::warn!(%version, "the upgrade watcher did not finish the switch; this agent does");
            if let Err(e) = switch::commit(&self.paths, &mut m) {
                tracing::warn!(error = %e, "cannot finish the switch; the next start will");
                return fx;
            }
        }
        tracing::info!(%version, phase = ?m.phase, "agent upgrade finished");
        self.last = Some(m);
        self.on_trial = None;
        // What the controller asked while this agent was on trial (an abort,
        // a rollback of the fleet) is for this agent now.
        let wanted = self.wanted.clone();
        let next = self.on_target(wanted.as_ref(), now);
        Effects { send: [fx.send, next.send].concat(), report: true, hand_over: next.hand_over }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::{AgentConfig, FileConfig, Overrides};

    fn config(dir: &std::path::Path, toml: &str) -> AgentConfig {
        let mid = dir.join("machine-id");
        std::fs::write(&mid, "4f1c0b7e9d2a4c6b8e0f1a2b3c4d5e6f\n").unwrap();
        let path = dir.join("agent.toml");
        let cli = Overrides { data_dir: Some(dir.join("data")), ..Default::default() };
        AgentConfig::resolve(FileConfig::parse(&path, toml).unwrap(), &path, cli, &mid).unwrap()
    }

    fn target(version: &str, rollout: u64) -> AgentTarget {
        AgentTarget { version: version.into(), digest: vec![7; 32], size: 10, rollout, downgrade: false }
    }

    #[test]
    fn a_device_with_self_update_off_refuses_each_upgrade_once_and_says_why() {
        let dir = tempfile::tempdir().unwrap();
        let mut u = Upgrader::new(&config(dir.path(), "self_update = false\n"), None);
        let now = Instant::now();
        let fx = u.on_target(Some(&target("99.0.0", 1)), now);
        assert!(fx.report && fx.send.is_empty() && !fx.hand_over, "{fx:?}");
        let o = u.outcome().unwrap();
        assert_eq!((o.state, o.rollout), (UpgradeState::Refused, 1));
        assert!(o.detail.contains("self_update = false"), "{o:?}");
        // The same upgrade again (every document repeats it): said already.
        assert!(!u.on_target(Some(&target("99.0.0", 1)), now).report);
        // A new upgrade: said again. The version it runs: nothing to say.
        assert!(u.on_target(Some(&target("99.0.0", 2)), now).report);
        let running = u.running().to_owned();
        assert!(!u.on_target(Some(&target(&running, 3)), now).report);
    }

    #[test]
    fn a_simulated_device_switches_in_memory_and_goes_back() {
        let dir = tempfile::tempdir().unwrap();
        let mut cfg = config(dir.path(), "");
        cfg.simulated_upgrades = true;
        let mut u = Upgrader::new(&cfg, None);
        let before = u.running().to_owned();
        let t = target("99.0.0", 1);
        u.simulate_switch(&t);
        assert_eq!((u.running(), u.previous_version().as_deref()), ("99.0.0", Some(before.as_str())));
        assert_eq!(u.outcome().unwrap().state, UpgradeState::Upgraded);
        // Undo: the version kept, by name only (no digest), downgrade allowed.
        let back = AgentTarget { version: before.clone(), digest: Vec::new(), size: 0, rollout: 1, downgrade: true };
        let fx = u.on_target(Some(&back), Instant::now());
        assert!(fx.report && fx.send.is_empty(), "{fx:?}");
        assert_eq!((u.running(), u.previous_version().as_deref()), (before.as_str(), Some("99.0.0")));
    }
}
