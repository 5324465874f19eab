//! Agent self-update, the controller's side: builds published (`baton agent
//! publish`), fleet upgrades started, stepped and steered (the decisions in
//! the pure `upgrade` and `rollout`), and the pieces of a build sent to the
//! devices that ask for them over MQTT.

use baton_protocol::release::{elf_arch, find_version_stamp, ReleaseChunk, ReleaseRequest, CHUNK_BYTES};
use baton_protocol::DeviceId;

use super::{lock, Controller, OpError, State};
use crate::fleet::{Fleet, Millis, Status};
use crate::rollout::{Strategy, Wave};
use crate::store::AgentRelease;
use crate::tenant::Scope;
use crate::upgrade::{AgentRollout, AgentState, Releases};
use crate::view::{AgentRolloutView, AgentUpgradeRequest, RolloutAction, RolloutView};

/// The largest agent build accepted (today's are ~5 MiB).
pub const MAX_RELEASE_BYTES: usize = 64 << 20;

fn fleet_wide(scope: &Scope, what: &str) -> Result<(), OpError> {
    if *scope != Scope::All {
        return Err(OpError::Forbidden(format!(
            "the agent runs the whole device: only a fleet-wide token, acting for no tenant, {what}"
        )));
    }
    Ok(())
}

pub(super) fn index(releases: &[AgentRelease]) -> Releases {
    releases.iter().map(|r| ((r.version.clone(), r.arch.clone()), (r.digest.clone(), r.size))).collect()
}

impl Controller {
    /// `baton agent publish`: stores a build for the architecture its ELF
    /// header names, under the version stamped in it (or `version` for a
    /// build without a stamp; both must agree when both are there).
    pub fn publish_release(
        &self,
        version: Option<&str>,
        data: &[u8],
        now: Millis,
        scope: &Scope,
    ) -> Result<AgentRelease, OpError> {
        fleet_wide(scope, "publishes agent builds")?;
        let arch = elf_arch(data).ok_or_else(|| {
            OpError::Invalid("not an agent build: not an ELF executable for x86_64, aarch64 or 32-bit arm".into())
        })?;
        let stamped = find_version_stamp(data);
        let version = match (stamped, version) {
            (Some(s), Some(v)) if s != v => {
                return Err(OpError::Invalid(format!(
                    "the build says it is version {s}, not {v}: devices report the version in the build"
                )))
            }
            (Some(s), _) => s.to_owned(),
            (None, Some(v)) => v.to_owned(),
            (None, None) => {
                return Err(OpError::Invalid("the build carries no version stamp: give one with --version".into()))
            }
        };
        if version.is_empty()
            || version.len() > 48
            || !version.chars().all(|c| c.is_ascii_alphanumeric() || ".-+_".contains(c))
        {
            return Err(OpError::Invalid(format!("version {version:?}: use letters, digits and . - + _ (at most 48)")));
        }
        let digest = ring::digest::digest(&ring::digest::SHA256, data).as_ref().to_vec();
        let store = lock(&self.store);
        let release = store.add_release(&version, arch, &digest, data, now).map_err(|e| match e {
            crate::store::releases::PublishError::Conflict { .. } => OpError::Invalid(e.to_string()),
            crate::store::releases::PublishError::Store(s) => OpError::Store(s),
        })?;
        let all = store.releases()?;
        let message = format!("agent {version} for {arch} published ({} bytes)", data.len());
        self.event(&store, "", "agent.published", &version, message, now);
        drop(store);
        lock(&self.state).releases = index(&all);
        Ok(release)
    }

    /// `baton agent unpublish`: deletes a version's builds (one
    /// architecture's, or all). Refused for the version of the last upgrade
    /// while it runs or once it succeeded (devices that join later fetch it).
    pub fn unpublish_release(
        &self,
        version: &str,
        arch: Option<&str>,
        now: Millis,
        scope: &Scope,
    ) -> Result<usize, OpError> {
        fleet_wide(scope, "unpublishes agent builds")?;
        let st = lock(&self.state);
        if let Some(r) = st.agent_rollout.as_ref().filter(|r| r.version == version) {
            if r.rollout.state.active() || r.rollout.state == crate::rollout::State::Succeeded {
                return Err(OpError::Invalid(format!(
                    "version {version} is the last agent upgrade's ({:?}): devices fetch it from here; upgrade to another version first",
                    r.rollout.state
                )));
            }
        }
        let store = lock(&self.store);
        let n = store.remove_release(version, arch)?;
        if n == 0 {
            let what = arch.map_or(String::new(), |a| format!(" for {a}"));
            return Err(OpError::NotFound(format!("agent version {version}{what} is not published")));
        }
        let all = store.releases()?;
        let what = arch.map_or("every architecture".to_string(), str::to_owned);
        self.event(&store, "", "agent.unpublished", version, format!("agent {version} for {what} unpublished"), now);
        drop(store);
        drop(st);
        lock(&self.state).releases = index(&all);
        Ok(n)
    }

    pub fn releases(&self) -> Result<Vec<AgentRelease>, OpError> {
        Ok(lock(&self.store).releases()?)
    }

    /// `baton agent upgrade`: moves the selected devices to `version` in
    /// health-gated waves, rolled back automatically past the failure threshold.
    pub fn start_agent_upgrade(
        &self,
        req: &AgentUpgradeRequest,
        now: Millis,
        scope: &Scope,
    ) -> Result<AgentRolloutView, OpError> {
        fleet_wide(scope, "upgrades agents")?;
        // An agent comes over the device's own link, often a slow one: ten
        // minutes before a device that never ran it counts as failed.
        let defaults = Strategy { deadline_ms: 600_000, ..Strategy::default() };
        let waves = match &req.waves {
            None => defaults.waves,
            Some(w) => w
                .iter()
                .map(|s| {
                    Wave::parse(s).ok_or_else(|| OpError::Invalid(format!("wave {s:?}: a count (3) or a share (25%)")))
                })
                .collect::<Result<_, _>>()?,
        };
        let strategy = Strategy {
            waves,
            min_ready_ms: req.min_ready_s.map_or(defaults.min_ready_ms, |s| s * 1000),
            max_failure_pct: req.max_failure_pct.unwrap_or(defaults.max_failure_pct).min(100),
            deadline_ms: req.deadline_s.map_or(defaults.deadline_ms, |s| s * 1000),
        };
        for (k, v) in &req.selector {
            baton_protocol::validate_label(k, v).map_err(|e| OpError::Invalid(e.to_string()))?;
        }
        let snap = self.snapshot(now);
        let versions = lock(&self.fleet).devices().map(|d| (d.id.clone(), d.presence.agent_version.clone())).collect();
        let view = {
            let mut st = lock(&self.state);
            if let Some(r) = st.agent_rollout.as_ref().filter(|r| r.rollout.state.active()) {
                return Err(OpError::Invalid(crate::upgrade::Refused::Busy(r.version.clone()).to_string()));
            }
            let seq = lock(&self.store)
                .releases()?
                .iter()
                .find(|r| r.version == req.version)
                .map(|r| r.seq)
                .ok_or_else(|| OpError::NotFound(format!("agent version {} is not published", req.version)))?;
            let id = st.agent_rollout.as_ref().map_or(1, |r| r.id + 1);
            let r = AgentRollout::start(
                id,
                &req.version,
                seq,
                req.selector.clone(),
                &snap.facts,
                &versions,
                &st.releases,
                strategy,
                now,
            )
            .map_err(|e| OpError::Invalid(e.to_string()))?;
            let store = lock(&self.store);
            store.save_agent_rollout(&r)?;
            let message = format!(
                "agent upgrade {id} to {} started: {} devices in {} waves, first wave {}",
                r.version,
                r.rollout.devices.len(),
                r.rollout.wave_ends.len(),
                r.rollout.released()
            );
            self.event(&store, "", "agent.upgrade_started", &r.version, message, now);
            let view = AgentRolloutView::new(&r);
            st.agent_rollout = Some(r);
            view
        };
        self.sync_desired(now);
        Ok(view)
    }

    pub fn agent_rollout(&self, scope: &Scope) -> Result<AgentRolloutView, OpError> {
        fleet_wide(scope, "watches agent upgrades")?;
        let mut view = lock(&self.state)
            .agent_rollout
            .as_ref()
            .map(AgentRolloutView::new)
            .ok_or_else(|| OpError::NotFound("no agent upgrade yet (baton agent upgrade --version V)".into()))?;
        let before = lock(&self.state).agent_rollout.as_ref().map(|r| r.before.clone()).unwrap_or_default();
        let fleet = lock(&self.fleet);
        for (id, was) in &before {
            let runs = DeviceId::new(id.as_str())
                .ok()
                .and_then(|id| fleet.get(&id))
                .map(|d| d.presence.agent_version.as_str());
            match runs {
                Some(v) if v == view.version => view.now.on_version += 1,
                Some(v) if v == was => view.now.on_before += 1,
                _ => view.now.other += 1,
            }
        }
        Ok(view)
    }

    /// `baton agent rollout pause|resume|abort|undo`.
    pub fn agent_rollout_action(
        &self,
        action: RolloutAction,
        now: Millis,
        scope: &Scope,
    ) -> Result<AgentRolloutView, OpError> {
        fleet_wide(scope, "steers agent upgrades")?;
        let view = {
            let mut st = lock(&self.state);
            let r = st.agent_rollout.as_mut().ok_or_else(|| OpError::NotFound("no agent upgrade yet".into()))?;
            let refused = |e: crate::rollout::Refused| OpError::Invalid(e.to_string());
            let (event, message) = match action {
                RolloutAction::Pause => {
                    r.rollout.pause().map_err(refused)?;
                    ("agent.upgrade_paused", format!("agent upgrade {} to {} paused", r.id, r.version))
                }
                RolloutAction::Resume => {
                    r.rollout.resume().map_err(refused)?;
                    ("agent.upgrade_resumed", format!("agent upgrade {} to {} resumed", r.id, r.version))
                }
                RolloutAction::Abort => {
                    r.rollout.abort(now).map_err(refused)?;
                    let m =
                        format!("agent upgrade {} to {} aborted: devices go back to what they ran", r.id, r.version);
                    ("agent.upgrade_aborted", m)
                }
                RolloutAction::Undo => {
                    r.undo(now);
                    let m = format!("agent upgrade {} to {} undone: devices go back to what they ran", r.id, r.version);
                    ("agent.upgrade_undone", m)
                }
            };
            let store = lock(&self.store);
            store.save_agent_rollout(r)?;
            let version = r.version.clone();
            let view = AgentRolloutView::new(r);
            self.event(&store, "", event, &version, message, now);
            view
        };
        self.sync_desired(now);
        Ok(view)
    }

    /// Steps the agent upgrade on what devices reported. True when it moved.
    pub(super) fn step_agent_rollout(&self, fleet: &Fleet, st: &mut State, now: Millis) -> bool {
        let Some(r) = st.agent_rollout.as_mut().filter(|r| r.rollout.state.active()) else { return false };
        let seen: std::collections::HashMap<String, crate::rollout::Observation> = r
            .rollout
            .devices
            .iter()
            .map(|id| {
                let d = DeviceId::new(id.as_str()).ok().and_then(|id| fleet.get(&id));
                let state = AgentState {
                    online: d.is_some_and(|d| d.status(now, &self.liveness) == Status::Online),
                    version: d.map_or("", |d| d.presence.agent_version.as_str()),
                    inventory: d.and_then(|d| d.inventory.as_ref()),
                };
                (id.clone(), r.observe(&state))
            })
            .collect();
        // Judged progress (healthy since…) is kept in memory even when nothing was said.
        let events = r.rollout.step(now, |id| seen.get(id).cloned().unwrap_or_default());
        if events.is_empty() {
            return false;
        }
        let store = lock(&self.store);
        if let Err(err) = store.save_agent_rollout(r) {
            tracing::error!(error = %err, "cannot store the agent upgrade's progress");
        }
        let name = match r.rollout.state {
            crate::rollout::State::Succeeded => "agent.upgrade_succeeded",
            crate::rollout::State::RolledBack => "agent.upgrade_rolled_back",
            _ => "agent.upgrade_progress",
        };
        for message in events {
            let message = r.say(&message);
            self.event(&store, "", name, &r.version, format!("agent upgrade {}: {message}", r.id), now);
        }
        true
    }

    /// A piece of a build, for a device that asked on `release`.
    pub fn release_chunk(&self, device: &DeviceId, req: &ReleaseRequest) -> ReleaseChunk {
        let mut chunk = ReleaseChunk { digest: req.digest.clone(), offset: req.offset, ..Default::default() };
        let len = req.len.min(CHUNK_BYTES) as usize;
        match lock(&self.store).release_chunk(&req.digest, req.offset, len) {
            Ok(Some((total, data))) => {
                chunk.total = total;
                chunk.data = data;
            }
            Ok(None) => chunk.error = Some("no agent build with that digest is published".into()),
            Err(e) => {
                tracing::error!(%device, error = %e, "cannot read an agent build");
                chunk.error = Some("the controller cannot read that build right now".into());
            }
        }
        chunk
    }
}

impl AgentRolloutView {
    pub fn new(r: &AgentRollout) -> Self {
        let mut rollout = RolloutView::new(&r.rollout);
        rollout.workload = "agent".into();
        rollout.reason = rollout.reason.map(|why| r.say(&why));
        for (_, why) in &mut rollout.failed {
            *why = r.say(why);
        }
        AgentRolloutView {
            id: r.id,
            version: r.version.clone(),
            selector: r.selector.clone(),
            rollout,
            now: Default::default(),
        }
    }
}
