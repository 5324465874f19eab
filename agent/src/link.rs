//! The agent's MQTT session: presence (with a Last Will), inventory, heartbeats,
//! and the device's own `desired` and `cmd` topics.
//!
//! One task owns the rumqttc event loop and does everything through
//! non-blocking `try_*` calls, so a full request queue can never deadlock the
//! loop that drains it. The session reconnects forever with jittered backoff.

use std::future::Future;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use baton_protocol::{
    codec::decode_on, encode, Command, CommandAction, CommandOutput, CommandResult, Message, Presence, PresenceState,
    TopicKind,
};
use rumqttc::{AsyncClient, Event, LastWill, MqttOptions, Outgoing, Packet, QoS};
use tracing::{debug, info, warn};

use crate::backoff::Backoff;
use crate::config::AgentConfig;
use crate::engine::{EngineHandle, Input};
use crate::node::{self, HeartbeatSampler};
use crate::runtime::layout::write_atomic;

/// Reconnect delays grow to this (with jitter): a fleet is back within
/// seconds of its broker or controller coming back.
const RECONNECT_CAP: Duration = Duration::from_secs(10);

/// How often a warning of one kind that others can trigger is logged (`LogRate`).
const WARN_EVERY: Duration = Duration::from_secs(60);

/// Logs a warning unless one of `kind` went out within `WARN_EVERY`; then at debug.
macro_rules! warn_limited {
    ($link:expr, $kind:literal, $($field:tt)*) => {
        match $link.quiet.allow($kind, std::time::Instant::now()) {
            Some(held_back) => warn!(held_back, $($field)*),
            None => debug!($($field)*),
        }
    };
}

/// Requests the session may queue while the broker is unreachable; beyond
/// that, heartbeats are dropped rather than memory grown.
const REQUEST_QUEUE: usize = 64;
const MAX_INCOMING_PACKET: usize = 300 * 1024;
const MAX_OUTGOING_PACKET: usize = 96 * 1024;

pub struct Link {
    config: AgentConfig,
    client: AsyncClient,
    boot_id: String,
    started_at: u64,
    heartbeat: HeartbeatSampler,
    /// When the last heartbeat went out on this connection (None: none yet).
    last_heartbeat: Option<std::time::Instant>,
    /// The protocol minor version of the controller's last document (None:
    /// none yet): one before 1.10 does not read the heartbeat interval in
    /// the inventory, and would take a quiet device for a silent one.
    controller_minor: Option<u8>,
    /// Each autoscaled workload's sample at the last heartbeat (CPU rates).
    rates: crate::load::Rates,
    /// Generation of the desired document in force (persisted, handed to the engine).
    desired_generation: u64,
    /// The encoded document in force, to recognise a redelivery of it.
    desired_bytes: Vec<u8>,
    /// The workloads and agent of the document on flash (None: nothing
    /// there yet): a new document that changes only service endpoints is
    /// applied but not written again.
    persisted: Option<Persisted>,
    applied_generation: u64,
    engine: Option<EngineHandle>,
    /// Controller keys whose documents are applied.
    trust: crate::trust::Trust,
    /// This device's key (None only when it could not be created: secrets then cannot be opened).
    identity: Option<baton_protocol::crypto::DeviceKey>,
    /// Long-running commands (log follows), by id, for `Cancel`.
    running: std::collections::HashMap<u64, tokio::sync::watch::Sender<bool>>,
    /// Interactive sessions (`baton exec -i/-t`).
    sessions: crate::session::Sessions,
    /// Ids of commands accepted, until their deadline (kept in `state/commands.seen`): a replay is refused.
    accepted: crate::trust::SeenCommands,
    /// The controller's time as learned from its signed messages: command
    /// deadlines are judged by it, not by this device's wall clock.
    clock: crate::clock::ControllerClock,
    /// The origin of the monotonic milliseconds the clock is kept in.
    mono_origin: std::time::Instant,
    /// Warnings others can trigger at any rate, limited.
    quiet: crate::lograte::LogRate,
    /// Agent self-update: targets, pieces, the trial's sign of life.
    upgrade: crate::upgrade::Upgrader,
    /// Set when a new agent is staged: the session ends and the agent hands over.
    hand_over: bool,
}

/// What of a desired document is worth a flash write: its workloads and
/// the agent it names (an upgrade resumes after a restart from it).
type Persisted = (Vec<baton_protocol::spec::WorkloadSpec>, Option<baton_protocol::release::AgentTarget>);

/// Why the session ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum LinkExit {
    /// Shutdown asked for.
    Stopped,
    /// A new agent is staged: replace this process with it (`upgrade::switch::hand_over`).
    HandOver,
}

/// How often heartbeats go out at most: while the document asks for
/// workloads' loads, autoscaling decides on them.
const LOAD_HEARTBEAT: Duration = Duration::from_secs(15);

/// The heartbeat timer's period for `interval`: `interval` divided evenly
/// into ticks of at most `LOAD_HEARTBEAT` (300 s: 15 s ticks; 20 s: 10 s).
fn heartbeat_tick(interval: Duration) -> Duration {
    let n = interval.as_millis().div_ceil(LOAD_HEARTBEAT.as_millis()).max(1);
    interval / n as u32
}

/// The interval heartbeats go out at: the configured one, but no more than
/// `LOAD_HEARTBEAT` (the old default) for a controller before 1.10, which
/// judges devices by its own stale window alone.
fn heartbeat_interval(configured: Duration, controller_minor: Option<u8>) -> Duration {
    match controller_minor {
        Some(minor) if minor < 10 => configured.min(LOAD_HEARTBEAT),
        _ => configured,
    }
}

fn qos(kind: TopicKind) -> QoS {
    if kind.qos() == 0 {
        QoS::AtMostOnce
    } else {
        QoS::AtLeastOnce
    }
}

fn unix_now() -> Duration {
    SystemTime::now().duration_since(UNIX_EPOCH).unwrap_or_default()
}

/// How to reach broker node `node` of the configuration's list.
fn mqtt_options(config: &AgentConfig, node: usize, trust: &crate::trust::Trust, will: Option<Vec<u8>>) -> MqttOptions {
    let broker = &config.brokers.all()[node];
    let mut opts = MqttOptions::new(config.device_id.as_str(), broker.host.clone(), broker.port);
    match crate::tls::transport(broker, &trust.keys(), config.mqtt_ca_file.as_deref()) {
        Ok(t) => {
            opts.set_transport(t);
        }
        Err(e) => warn!(%broker, error = %e, "no TLS configuration; the broker will be unreachable"),
    }
    // Acknowledged only once handled (a document persisted, a command
    // admitted): an agent killed in between gets the message again.
    opts.set_manual_acks(true);
    opts.set_keep_alive(config.keepalive)
        .set_clean_session(false)
        .set_max_packet_size(MAX_INCOMING_PACKET, MAX_OUTGOING_PACKET)
        .set_request_channel_capacity(REQUEST_QUEUE)
        .set_inflight(16);
    if let Some((user, password)) = &config.mqtt_credentials {
        opts.set_credentials(user.clone(), password.clone());
    }
    if let Some(payload) = will {
        opts.set_last_will(LastWill::new(config.device_id.topic(TopicKind::Presence), payload, QoS::AtLeastOnce, true));
    }
    opts
}

impl Link {
    /// Runs the session until `shutdown` resolves, then says goodbye: a retained
    /// offline presence and a clean MQTT disconnect. Never gives up on the broker.
    pub async fn run(config: AgentConfig, engine: Option<EngineHandle>, shutdown: impl Future<Output = ()>) {
        Self::run_agent(config, engine, None, shutdown).await;
    }

    /// `run`, for the device's own agent: `on_trial` is the version this
    /// process was started to try (`upgrade::switch::TRIAL_ENV`). Ends with
    /// `HandOver` when a new agent is staged (the session closed without an
    /// offline presence: the next agent reconnects at once).
    pub async fn run_agent(
        config: AgentConfig,
        engine: Option<EngineHandle>,
        on_trial: Option<String>,
        shutdown: impl Future<Output = ()>,
    ) -> LinkExit {
        let boot_id = std::fs::read_to_string("/proc/sys/kernel/random/boot_id")
            .map(|s| s.trim().to_string())
            .unwrap_or_default();
        let id = config.device_id.clone();
        let upgrade = crate::upgrade::Upgrader::new(&config, on_trial);
        let will = Presence {
            state: PresenceState::Offline,
            agent_version: upgrade.running().into(),
            boot_id: boot_id.clone(),
            started_at: 0,
        };
        let trust = crate::trust::Trust::load(config.controller_keys.clone(), &config.data_dir);
        let will = encode(&Message::Presence(will)).ok();
        let mut node = 0;
        let (client, mut events) = AsyncClient::new(mqtt_options(&config, node, &trust, will.clone()), REQUEST_QUEUE);
        // Small messages (acks, requests for pieces of a build) go out at
        // once rather than waiting for Nagle to fill a segment.
        let mut net = events.network_options();
        net.set_tcp_nodelay(true);
        events.set_network_options(net);
        let desired_bytes = std::fs::read(crate::engine::desired_path(&config.data_dir)).unwrap_or_default();
        let identity = match crate::trust::load_or_create_identity(&config.data_dir) {
            Ok(k) => Some(k),
            Err(e) => {
                warn!(error = %e, "no device identity key: documents with secrets will be refused");
                None
            }
        };
        let persisted = crate::trust::read_persisted(&desired_bytes).ok();
        let accepted = crate::trust::SeenCommands::load(
            &crate::trust::seen_commands_path(&config.data_dir),
            unix_now().as_millis() as u64,
        );
        // Where the controller's time stood when this device last knew it.
        let floor = accepted.floor_ms.max(persisted.as_ref().map_or(0, |d| d.issued_ms));
        let mut link = Link {
            upgrade,
            hand_over: false,
            client,
            boot_id,
            started_at: unix_now().as_secs(),
            heartbeat: HeartbeatSampler::default(),
            last_heartbeat: None,
            controller_minor: baton_protocol::codec::peek(&desired_bytes).ok().map(|e| e.minor),
            rates: crate::load::Rates::default(),
            desired_generation: 0,
            desired_bytes,
            persisted: None,
            applied_generation: 0,
            engine,
            trust,
            identity,
            running: std::collections::HashMap::new(),
            sessions: crate::session::Sessions::new(config.sessions.clone()),
            accepted,
            clock: crate::clock::ControllerClock::starting_at(floor, 0),
            mono_origin: std::time::Instant::now(),
            quiet: crate::lograte::LogRate::new(WARN_EVERY),
            config,
        };
        if let Some(d) = persisted {
            link.desired_generation = d.generation;
            link.persisted = Some((d.workloads, d.agent.clone()));
            // An upgrade under way before a restart goes on (or is judged done).
            let fx = link.upgrade.on_target(d.agent.as_ref(), std::time::Instant::now());
            link.upgrade_effects(fx);
        }
        let mut upgrade_ticker = tokio::time::interval(Duration::from_secs(1));
        upgrade_ticker.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        let mut connected_at: Option<std::time::Instant> = None;

        let mut backoff = Backoff::with_entropy(Duration::from_millis(500), RECONNECT_CAP);
        let mut ticker = tokio::time::interval(heartbeat_tick(link.config.heartbeat_interval));
        ticker.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        let mut connected = false;
        tokio::pin!(shutdown);
        info!(device = %id, brokers = %link.config.brokers, "agent link starting");

        // A receiver that never changes when there is no engine (presence-only agents).
        let (_idle_tx, idle_rx) = tokio::sync::watch::channel(baton_protocol::Report::default());
        let mut reports = link.engine.as_ref().map_or(idle_rx, |e| e.reports.clone());
        loop {
            if link.hand_over {
                break;
            }
            tokio::select! {
                () = &mut shutdown => break,
                _ = ticker.tick(), if connected => link.on_heartbeat_tick(),
                // Only while connected: a tick or a report would cancel a
                // connection attempt under way, which then restarts and never
                // reaches its timeout (a silent node kept the agent forever).
                // Each failed attempt ticks the upgrade once instead.
                _ = upgrade_ticker.tick(), if connected => {
                    let fx = link.upgrade.on_tick(std::time::Instant::now(), connected_at);
                    link.upgrade_effects(fx);
                }
                Ok(()) = reports.changed(), if connected => {
                    let report = reports.borrow_and_update().clone();
                    link.applied_generation = report.generation;
                    link.publish(TopicKind::Report, &Message::Report(report));
                }
                event = events.poll() => match event {
                    Ok(Event::Incoming(Packet::ConnAck(ack))) => {
                        info!(broker = %link.config.brokers.all()[node], session_present = ack.session_present, "connected to broker");
                        connected = true;
                        connected_at = Some(std::time::Instant::now());
                        backoff.reset();
                        link.on_connect();
                        // A heartbeat on every connect, then at the interval.
                        link.last_heartbeat = None;
                        let fx = link.upgrade.on_connect(std::time::Instant::now());
                        link.upgrade_effects(fx);
                        if link.engine.is_some() {
                            // Whatever changed while we were away: the latest state, once.
                            let report = reports.borrow_and_update().clone();
                            link.applied_generation = report.generation;
                            link.publish(TopicKind::Report, &Message::Report(report));
                        }
                        ticker.reset_immediately();
                    }
                    Ok(Event::Incoming(Packet::Publish(p))) => {
                        link.on_publish(&p.topic, &p.payload);
                        if let Err(e) = link.client.try_ack(&p) {
                            debug!(error = %e, "cannot queue an acknowledgement; the broker will send it again");
                        }
                    }
                    Ok(_) => {}
                    Err(e) => {
                        let delay = backoff.next_delay();
                        let fx = link.upgrade.on_tick(std::time::Instant::now(), None);
                        link.upgrade_effects(fx);
                        let broker = &link.config.brokers.all()[node];
                        if connected {
                            warn!(%broker, error = %e, "lost the broker; reconnecting");
                            link.sessions.end_all("session ended: the device lost its broker connection");
                        } else {
                            warn_limited!(link, "unreachable", %broker, error = %e, retry_in_ms = delay.as_millis() as u64, "cannot reach the broker");
                        }
                        // Another node of the cluster, if there is one. What
                        // was in flight at the break is dropped by rumqttc when
                        // that node holds no session for us; presence, inventory
                        // and the report go out again on its ConnAck.
                        if link.config.brokers.all().len() > 1 {
                            node = link.config.brokers.next_after(node);
                            events.mqtt_options = mqtt_options(&link.config, node, &link.trust, will.clone());
                            info!(broker = %link.config.brokers.all()[node], "trying the next broker node");
                        }
                        connected = false;
                        connected_at = None;
                        tokio::select! {
                            () = &mut shutdown => break,
                            () = tokio::time::sleep(delay) => {}
                        }
                    }
                },
            }
        }

        // Sessions end with this agent (the next one does not know them):
        // their processes go and their operators are told.
        link.sessions.end_all("session ended: the agent is stopping");
        let ended = std::time::Instant::now();
        while link.sessions.count() != (0, 0) && ended.elapsed() < Duration::from_secs(3) {
            tokio::select! {
                _ = events.poll() => {}
                () = tokio::time::sleep(Duration::from_millis(20)) => {}
            }
        }
        if link.hand_over {
            if connected {
                link.close_quietly(&mut events).await;
            }
            // The socket closes with the event loop. A broker may handle a
            // DISCONNECT and the closed socket as two events (rumqttd, once
            // Baton's embedded broker, did); a client reconnecting
            // with the same id between them would have its new session torn
            // down by the second: let both pass.
            drop(events);
            tokio::time::sleep(Duration::from_millis(500)).await;
            info!("agent link closed for the hand-over to the new agent");
            return LinkExit::HandOver;
        }
        if connected {
            link.say_goodbye(&mut events).await;
        }
        info!("agent link stopped");
        LinkExit::Stopped
    }

    /// Carries out what an upgrade step asked for.
    fn upgrade_effects(&mut self, fx: crate::upgrade::Effects) {
        for req in fx.send {
            self.publish(TopicKind::Release, &Message::ReleaseRequest(req));
        }
        if fx.report {
            self.publish(TopicKind::Inventory, &Message::Inventory(self.inventory()));
        }
        self.hand_over |= fx.hand_over;
    }

    fn inventory(&self) -> baton_protocol::Inventory {
        let mut inventory = node::inventory(&self.config);
        inventory.sealing_key = self.identity.as_ref().map(|k| k.public().to_vec()).unwrap_or_default();
        inventory.agent_version = self.upgrade.running().into();
        inventory.previous_agent_version = self.upgrade.previous_version().unwrap_or_default();
        inventory.upgrade = self.upgrade.outcome();
        inventory.no_workloads = self.engine.is_none();
        inventory
    }

    fn mono_ms(&self) -> u64 {
        self.mono_origin.elapsed().as_millis() as u64
    }

    fn publish(&self, kind: TopicKind, msg: &Message) {
        let payload = match encode(msg) {
            Ok(p) => p,
            Err(e) => return warn!(error = %e, "not sending an unencodable message"),
        };
        let topic = self.config.device_id.topic(kind);
        if let Err(e) = self.client.try_publish(topic, qos(kind), kind.retained(), payload) {
            debug!(error = %e, kind = kind.suffix(), "request queue full; message dropped");
        }
    }

    fn presence(&self, state: PresenceState) -> Message {
        Message::Presence(Presence {
            state,
            agent_version: self.upgrade.running().into(),
            boot_id: self.boot_id.clone(),
            started_at: self.started_at,
        })
    }

    fn on_connect(&mut self) {
        self.publish(TopicKind::Presence, &self.presence(PresenceState::Online));
        self.publish(TopicKind::Inventory, &Message::Inventory(self.inventory()));
        // Subscribing again is harmless when the broker kept the session, and
        // needed when it did not (a restarted embedded broker keeps nothing).
        for kind in [TopicKind::Desired, TopicKind::Cmd, TopicKind::ReleaseRes] {
            if let Err(e) = self.client.try_subscribe(self.config.device_id.topic(kind), QoS::AtLeastOnce) {
                warn!(error = %e, "cannot queue subscription");
            }
        }
    }

    /// Sends a heartbeat when one is due: every `heartbeat_interval`, or at
    /// each tick (`LOAD_HEARTBEAT` at most) while the document asks for
    /// workloads' loads (autoscaling decides on them).
    fn on_heartbeat_tick(&mut self) {
        let interval = heartbeat_interval(self.config.heartbeat_interval, self.controller_minor);
        let tick = heartbeat_tick(self.config.heartbeat_interval);
        let due = self.last_heartbeat.is_none_or(|t| t.elapsed() + tick / 2 >= interval);
        let loads_asked = self.engine.as_ref().is_some_and(|e| !crate::load::read(&e.loads).is_empty());
        if due || loads_asked {
            self.last_heartbeat = Some(std::time::Instant::now());
            self.send_heartbeat();
        }
    }

    fn send_heartbeat(&mut self) {
        let mut hb = self.heartbeat.sample(&self.config.data_dir, self.applied_generation);
        if let Some(e) = &self.engine {
            hb.loads = self.rates.loads(&crate::load::read(&e.loads));
            // Loads that would take it past its limit stay out (a device
            // with dozens of autoscaled workloads): the heartbeat must go.
            let before = hb.loads.len();
            while !hb.loads.is_empty() && encode(&Message::Heartbeat(hb.clone())).is_err() {
                hb.loads.pop();
            }
            if hb.loads.len() < before {
                warn_limited!(self, "loads", left_out = before - hb.loads.len(), "loads left out of a full heartbeat");
            }
        }
        self.publish(TopicKind::Heartbeat, &Message::Heartbeat(hb));
    }

    fn on_publish(&mut self, topic: &str, payload: &[u8]) {
        let Some((device, kind)) = TopicKind::parse(topic) else {
            return warn_limited!(self, "foreign", topic, "message on a foreign topic ignored");
        };
        if device != self.config.device_id {
            return warn_limited!(self, "misaddressed", topic, "message for another device ignored");
        }
        if kind == TopicKind::Desired {
            return self.on_desired(payload);
        }
        match decode_on(kind, payload) {
            Ok((_, Message::Command(cmd))) => self.on_command(cmd),
            Ok((_, Message::ReleaseChunk(chunk))) => {
                let fx = self.upgrade.on_chunk(&chunk, std::time::Instant::now());
                self.upgrade_effects(fx);
            }
            Ok((_, other)) => debug!(kind = ?other.kind(), "ignoring message"),
            Err(e) => {
                warn_limited!(self, "undecodable", topic, error = %e, len = payload.len(), "undecodable message ignored")
            }
        }
    }

    /// A document is applied only when signed by a trusted controller key, for
    /// this device, and newer than the one in force; the same one again (a
    /// retained redelivery) changes nothing and writes nothing. Anything else
    /// is refused and the refusal reported. A new document is validated,
    /// persisted as received (signed, secrets sealed: offline first, and no
    /// plaintext on flash), then handed to the engine with its secrets opened.
    fn on_desired(&mut self, payload: &[u8]) {
        if payload == self.desired_bytes.as_slice() {
            return debug!(generation = self.desired_generation, "desired document unchanged");
        }
        let device = self.config.device_id.as_str().to_owned();
        let opened = crate::trust::open_signed(&mut self.trust, &device, payload).and_then(|d| {
            if d.generation <= self.desired_generation {
                return Err(crate::trust::Refusal::Stale {
                    generation: d.generation,
                    current: self.desired_generation,
                });
            }
            crate::trust::check_secrets(self.identity.as_ref(), &device, &d)?;
            Ok(d)
        });
        let d = match opened {
            Ok(d) => d,
            Err(why) => return self.refuse(why.to_string()),
        };
        if let Err(why) = crate::reconcile::validate(&d) {
            return self.refuse(format!("generation {}: {why}", d.generation));
        }
        self.controller_minor = baton_protocol::codec::peek(payload).ok().map(|e| e.minor);
        let fx = self.upgrade.on_target(d.agent.as_ref(), std::time::Instant::now());
        self.upgrade_effects(fx);
        let Some(engine) = &self.engine else {
            if d.workloads.is_empty() {
                return info!(generation = d.generation, "desired document received; this agent runs no workloads");
            }
            // A controller before 1.10 does not know: say so where it shows.
            return self.refuse(format!(
                "generation {}: this agent runs no workloads (started with --no-workloads); {} not run",
                d.generation,
                d.workloads.iter().map(|w| w.name.as_str()).collect::<Vec<_>>().join(", ")
            ));
        };
        // Endpoints move far more often than workloads; a boot with stale
        // endpoints gets fresh ones with the next document anyway.
        let kept = (d.workloads.clone(), d.agent.clone());
        if self.persisted.as_ref() != Some(&kept) {
            let path = crate::engine::desired_path(&self.config.data_dir);
            let persisted =
                path.parent().map_or(Ok(()), std::fs::create_dir_all).and_then(|()| write_atomic(&path, payload));
            match persisted {
                Ok(()) => self.persisted = Some(kept),
                // Still apply it: running the new state beats running the old one; it
                // just will not survive a reboot without the network.
                Err(e) => warn!(error = %e, "cannot persist the desired document"),
            }
        }
        self.desired_generation = d.generation;
        self.desired_bytes = payload.to_vec();
        self.clock.learn(d.issued_ms, self.mono_ms());
        let _ = engine.tx.send(Input::Desired(d));
    }

    fn refuse(&mut self, why: String) {
        warn_limited!(self, "refused-document", error = %why, "desired document refused");
        let refused =
            baton_protocol::Report { generation: self.applied_generation, refused: Some(why), ..Default::default() };
        self.publish(TopicKind::Report, &Message::Report(refused));
        // Reports are retained: the broker's copy goes back to what runs.
        if let Some(e) = &self.engine {
            let runs = e.reports.borrow().clone();
            self.publish(TopicKind::Report, &Message::Report(runs));
        }
    }

    /// Only commands the controller signed for this device, before their
    /// deadline and never twice, are carried out; a refusal is answered
    /// (the operator sees why) and logged.
    fn on_command(&mut self, cmd: Command) {
        let (mono, wall) = (self.mono_ms(), unix_now().as_millis() as u64);
        let checked = crate::trust::check_command(&self.trust.keys(), self.config.device_id.as_str(), &cmd)
            .and_then(|issued| self.clock.judge(&cmd, issued, mono, wall))
            .and_then(|now| {
                self.accepted.floor_ms = self.clock.now(mono).unwrap_or(0);
                // Within a session, offsets and sequence numbers stop
                // replays; each keystroke is not a write to flash. A
                // `Cancel` is not remembered either: its target's id is
                // never used again, so a replay stops what already stopped
                // (and every ended log follow or session was a flash write).
                match (cmd.action.in_session(), &cmd.action) {
                    (Some(_), _) | (None, CommandAction::Cancel { .. }) => Ok(()),
                    (None, _) => self.accepted.admit(&cmd, now),
                }
            });
        if let Err(why) = checked {
            warn_limited!(self, "refused-command", id = cmd.id, error = %why, "command refused");
            let res = CommandResult { id: cmd.id, seq: 0, body: CommandOutput::Error(format!("refused: {why}")) };
            return self.publish(TopicKind::CmdRes, &Message::CommandResult(res));
        }
        let body = match &cmd.action {
            CommandAction::Diagnostics => {
                let inv = self.inventory();
                let hb = self.heartbeat.sample(&self.config.data_dir, self.applied_generation);
                CommandOutput::Text(format!(
                    "device {}\nagent {} (started {})\nboot {}\n{} {} {}\nuptime {}s load {:.2} mem {}/{} KiB disk free {} MiB\ndesired generation {} applied {}\n",
                    self.config.device_id,
                    inv.agent_version,
                    self.started_at,
                    self.boot_id,
                    inv.os,
                    inv.kernel,
                    inv.arch,
                    hb.uptime_s,
                    f64::from(hb.load1_centi) / 100.0,
                    hb.mem_used_kib,
                    hb.mem_total_kib,
                    hb.disk_free_mib,
                    self.desired_generation,
                    self.applied_generation,
                ))
            }
            CommandAction::Cancel { id } => {
                if let Some(stop) = self.running.remove(id) {
                    let _ = stop.send(true);
                }
                self.sessions.end(*id, "session ended by the operator");
                CommandOutput::Done
            }
            CommandAction::Session { workload, host, argv, tty, rows, cols, term } => {
                let open = crate::session::Open {
                    id: cmd.id,
                    workload: workload.clone(),
                    host: *host,
                    argv: argv.clone(),
                    tty: *tty,
                    rows: *rows,
                    cols: *cols,
                    term: term.clone(),
                };
                let out = self.session_out();
                let runtime = self.engine.as_ref().and_then(|e| e.runtime.clone());
                match self.sessions.open(open, runtime.as_ref(), &self.config.data_dir, out) {
                    // Said at once: a quiet process (`cat`) shows nothing for a while.
                    Ok(()) => CommandOutput::Text("session opened".into()),
                    Err(why) => {
                        warn!(id = cmd.id, error = %why, "session refused");
                        CommandOutput::Error(why)
                    }
                }
            }
            CommandAction::Connect { workload, port } => {
                let out = self.session_out();
                let runtime = self.engine.as_ref().and_then(|e| e.runtime.clone());
                match self.sessions.connect(cmd.id, workload, *port, runtime.as_ref(), &self.config.data_dir, out) {
                    // Said by the connection's thread once connected.
                    Ok(()) => return,
                    Err(why) => CommandOutput::Error(why),
                }
            }
            CommandAction::ReadFile { workload, host, path, offset } => {
                let out = self.session_out();
                let runtime = self.engine.as_ref().and_then(|e| e.runtime.clone());
                let dir = self.config.data_dir.clone();
                match self.sessions.read_file(cmd.id, workload, *host, path, *offset, runtime.as_ref(), &dir, out) {
                    Ok(()) => return,
                    Err(why) => CommandOutput::Error(why),
                }
            }
            CommandAction::WriteFile { workload, host, path, mode, sha256 } => {
                let out = self.session_out();
                let runtime = self.engine.as_ref().and_then(|e| e.runtime.clone());
                let dir = self.config.data_dir.clone();
                let started = self.sessions.write_file(
                    cmd.id,
                    workload,
                    *host,
                    path,
                    *mode,
                    sha256.clone(),
                    runtime.as_ref(),
                    &dir,
                    out,
                );
                match started {
                    Ok(()) => return,
                    Err(why) => CommandOutput::Error(why),
                }
            }
            CommandAction::Input { session, offset, data, eof } => {
                match self.sessions.input(cmd.id, *session, *offset, data.clone(), *eof) {
                    Some(answer) => answer,
                    None => return,
                }
            }
            CommandAction::Resize { session, seq, rows, cols } => {
                self.sessions.resize(*session, *seq, *rows, *cols);
                return;
            }
            CommandAction::Ack { session, received } => {
                self.sessions.ack(*session, *received);
                return;
            }
            _ => return self.spawn_command(cmd),
        };
        let res = CommandResult { id: cmd.id, seq: 0, body };
        self.publish(TopicKind::CmdRes, &Message::CommandResult(res));
    }

    /// Where a session's threads answer.
    fn session_out(&self) -> crate::session::Out {
        crate::session::Out {
            client: self.client.clone(),
            topic: self.config.device_id.topic(TopicKind::CmdRes),
            rt: tokio::runtime::Handle::current(),
        }
    }

    /// Logs, exec and restart run on their own tasks and answer as they go.
    fn spawn_command(&mut self, cmd: Command) {
        self.running.retain(|_, stop| !stop.is_closed());
        let (stop, cancel) = tokio::sync::watch::channel(false);
        self.running.insert(cmd.id, stop);
        let ctx = crate::commands::Context {
            data_dir: self.config.data_dir.clone(),
            runtime: self.engine.as_ref().and_then(|e| e.runtime.clone()),
            engine: self.engine.as_ref().map(|e| e.tx.clone()),
        };
        tokio::spawn(crate::commands::run(cmd, ctx, self.client.clone(), self.config.device_id.clone(), cancel));
    }

    /// Ends the session without saying goodbye: the retained presence stays
    /// online and no Will is published, for the new agent that reconnects at
    /// once. Returns once the broker closed the connection (or after 3 s).
    async fn close_quietly(&mut self, events: &mut rumqttc::EventLoop) {
        let _ = self.client.try_disconnect();
        let closed = async {
            loop {
                if events.poll().await.is_err() {
                    break;
                }
            }
        };
        let _ = tokio::time::timeout(Duration::from_secs(3), closed).await;
    }

    /// Marks the device offline on purpose (the broker would only publish the
    /// Will on an unclean loss) and disconnects, waiting briefly for the bytes to leave.
    async fn say_goodbye(&mut self, events: &mut rumqttc::EventLoop) {
        self.publish(TopicKind::Presence, &self.presence(PresenceState::Offline));
        let _ = self.client.try_disconnect();
        let drain = async {
            loop {
                match events.poll().await {
                    Ok(Event::Outgoing(Outgoing::Disconnect)) | Err(_) => break,
                    Ok(_) => {}
                }
            }
        };
        if tokio::time::timeout(Duration::from_secs(3), drain).await.is_err() {
            warn!("broker did not take the goodbye within 3 s");
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn heartbeat_ticks_divide_the_interval_evenly_and_are_at_most_15_s() {
        let s = Duration::from_secs;
        for (interval, tick) in [(s(300), s(15)), (s(20), s(10)), (s(16), s(8)), (s(1), s(1)), (s(15), s(15))] {
            assert_eq!(heartbeat_tick(interval), tick, "{interval:?}");
        }
        assert_eq!(heartbeat_tick(s(3600)), s(15));
        assert_eq!(heartbeat_tick(Duration::from_millis(22_500)), Duration::from_millis(11_250));
    }

    #[test]
    fn a_controller_before_1_10_gets_heartbeats_at_the_old_rate() {
        let s = Duration::from_secs;
        assert_eq!(heartbeat_interval(s(300), Some(9)), s(15));
        assert_eq!(heartbeat_interval(s(5), Some(9)), s(5));
        assert_eq!(heartbeat_interval(s(300), Some(10)), s(300));
        assert_eq!(heartbeat_interval(s(300), None), s(300));
    }
}
