//! MQTT → controller: subscribes to every device's upstream topics, turns
//! each publish into a checked `FleetEvent`, and counts what it refuses.
//! Thin translation; the decisions live in `fleet`.

use std::sync::atomic::Ordering::Relaxed;
use std::sync::Arc;
use std::time::{Duration, Instant};

use baton_protocol::{codec::decode_on, encode, BrokerNodes, BrokerUrl, DecodeError, DeviceId, Message, TopicKind};
use rumqttc::{AsyncClient, Event, MqttOptions, Packet, QoS};
use tracing::{debug, info, warn};

use crate::commands::Outgoing;
use crate::controller::{now_ms, Controller};
use crate::fleet::{Delivery, FleetEvent};
use crate::metrics::Rejection;

/// Topics the controller reads: everything agents publish.
pub const UPSTREAM: [TopicKind; 7] = [
    TopicKind::Presence,
    TopicKind::Inventory,
    TopicKind::Heartbeat,
    TopicKind::Report,
    TopicKind::CmdRes,
    TopicKind::Enroll,
    TopicKind::Release,
];

/// Larger than any broker limit we configure, so an oversize publish is
/// refused by the codec, never by a broken controller connection.
const MAX_PACKET: usize = 1024 * 1024;

/// Device messages received and not yet applied. Past this the MQTT loop
/// stops reading, and the broker holds devices back (the embedded one
/// makes publishers wait; an external one queues per its own limits).
const APPLY_QUEUE: usize = 4096;

/// A device's message, checked, on its way to the fleet.
struct Received {
    id: DeviceId,
    event: FleetEvent,
    delivery: Delivery,
    /// The answer to a command someone awaits, handed over once applied.
    result: Option<baton_protocol::CommandResult>,
}

/// Applies device messages in the order they arrived, on one thread of its
/// own (applying may write SQLite): a busy fleet keeps it running through
/// its queue instead of paying a hand-off and a wake-up per message, which
/// was what bounded the rate the controller absorbed.
fn apply_all(controller: &Controller, mut queue: tokio::sync::mpsc::Receiver<Received>) {
    while let Some(r) = queue.blocking_recv() {
        let applied = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
            controller.apply(&r.id, r.event, r.delivery, now_ms());
        }));
        if applied.is_err() {
            tracing::error!(device = %r.id, "applying a device message failed");
            continue;
        }
        if let Some(result) = r.result {
            if !controller.commands.deliver(&r.id, result) {
                debug!(device = %r.id, "answer to no pending request (late, cancelled, or not for this device)");
            }
        }
    }
}

/// Checks a publish: a Baton device topic and a message of the kind it carries. Pure.
pub fn classify(topic: &str, payload: &[u8]) -> Result<(DeviceId, TopicKind, Message), Rejection> {
    let (id, kind) = TopicKind::parse(topic).ok_or(Rejection::BadTopic)?;
    let (_, msg) = decode_on(kind, payload).map_err(|e| match e {
        DecodeError::TooLarge { .. } => Rejection::Oversize,
        DecodeError::UnsupportedMajor(_) => Rejection::WrongVersion,
        _ => Rejection::Malformed,
    })?;
    // We subscribe to neither desired nor cmd; a message of theirs here was misrouted.
    if matches!(
        msg,
        Message::Desired(_)
            | Message::SignedDesired(_)
            | Message::Command(_)
            | Message::EnrollResponse(_)
            | Message::ReleaseChunk(_)
    ) {
        return Err(Rejection::BadTopic);
    }
    Ok((id, kind, msg))
}

/// What a device message means for the fleet registry.
pub fn fleet_event(msg: Message) -> FleetEvent {
    match msg {
        Message::Presence(p) => FleetEvent::Presence(p),
        Message::Inventory(i) => FleetEvent::Inventory(Box::new(i)),
        Message::Heartbeat(h) => FleetEvent::Heartbeat(h),
        Message::Report(r) => FleetEvent::Report(r),
        _ => FleetEvent::Seen,
    }
}

/// Warns at most once per `every` per reason; the rest go to debug. A
/// misbehaving device must not be able to flood the controller's log.
struct LogLimiter {
    last: [Option<Instant>; 5],
    every: Duration,
}

impl LogLimiter {
    fn allow(&mut self, why: Rejection) -> bool {
        let slot = &mut self.last[why as usize];
        let now = Instant::now();
        if slot.is_some_and(|t| now.duration_since(t) < self.every) {
            return false;
        }
        *slot = Some(now);
        true
    }
}

/// Runs a controller operation on the blocking pool (it may write SQLite
/// and sign documents), as the API does, and waits for it: the rarer
/// messages (enrollments, pieces of builds, documents to check) that need
/// an answer. None if it panicked.
async fn blocking<T: Send + 'static>(
    c: &Arc<Controller>,
    f: impl FnOnce(&Controller) -> T + Send + 'static,
) -> Option<T> {
    let c = c.clone();
    match tokio::task::spawn_blocking(move || f(&c)).await {
        Ok(v) => Some(v),
        Err(e) => {
            tracing::error!(error = %e, "a controller operation failed");
            None
        }
    }
}

/// A message or subscription for the broker, as the controller's MQTT
/// client takes it.
enum Unsent {
    /// QoS 1.
    Publish {
        topic: String,
        retain: bool,
        payload: Vec<u8>,
    },
    Subscribe(Vec<rumqttc::SubscribeFilter>),
}

impl Unsent {
    /// `out` encoded (None, said, when it cannot be).
    fn of(out: Outgoing) -> Option<Unsent> {
        let (topic, retain, encoded) = match out {
            Outgoing::Command(device, cmd) => (device.topic(TopicKind::Cmd), false, encode(&Message::Command(cmd))),
            Outgoing::Desired(device, payload) => (device.topic(TopicKind::Desired), true, Ok(payload)),
            Outgoing::Dynsec(batch) => (crate::dynsec::TOPIC.to_string(), false, Ok(batch)),
            Outgoing::Retained(topic, bytes) => (topic, true, Ok(bytes)),
        };
        match encoded {
            Ok(payload) => Some(Unsent::Publish { topic, retain, payload }),
            Err(e) => {
                warn!(topic, error = %e, "cannot encode a message to a device");
                None
            }
        }
    }

    /// `msg` (QoS 1, not retained) for `device`, on the topic its kind travels on.
    fn answer(device: &DeviceId, msg: &Message, what: &str) -> Option<Unsent> {
        match encode(msg) {
            Ok(payload) => Some(Unsent::Publish { topic: device.topic(msg.kind().topic()), retain: false, payload }),
            Err(e) => {
                warn!(%device, error = %e, "cannot encode {what}");
                None
            }
        }
    }

    /// A device's desired document (republished from the store on every connect).
    fn is_document(&self) -> bool {
        matches!(self, Unsent::Publish { topic, .. } if TopicKind::parse(topic).is_some_and(|(_, k)| k == TopicKind::Desired))
    }

    /// Handed to the client, or given back when its queue is full.
    fn try_send(self, client: &AsyncClient) -> Result<(), Unsent> {
        use rumqttc::{ClientError, Request};
        match self {
            Unsent::Publish { topic, retain, payload } => {
                match client.try_publish(topic, QoS::AtLeastOnce, retain, payload) {
                    Ok(()) => Ok(()),
                    // Full (a topic with a wildcard is refused the same way, and never fits).
                    Err(ClientError::TryRequest(Request::Publish(p))) if !p.topic.contains(['+', '#']) => {
                        Err(Unsent::Publish { topic: p.topic, retain: p.retain, payload: p.payload.into() })
                    }
                    Err(e) => {
                        warn!(error = %e, "cannot queue a message to a device");
                        Ok(())
                    }
                }
            }
            Unsent::Subscribe(filters) => match client.try_subscribe_many(filters.clone()) {
                Ok(()) => Ok(()),
                Err(_) => Err(Unsent::Subscribe(filters)),
            },
        }
    }
}

/// What goes to the broker, in order, none of it dropped for want of room:
/// what the client's queue (1,024 requests) has no room for waits here,
/// and meanwhile the outbox is not read, so a rollout's 10,000 documents
/// go out as fast as the connection takes them instead of most being
/// refused and sent again a minute later. Each time the broker is lost,
/// documents waiting here or in the outbox are forgotten (the next connect
/// republishes every document from the store), so they never pile up.
#[derive(Default)]
struct Outbound {
    waiting: std::collections::VecDeque<Unsent>,
}

impl Outbound {
    fn send(&mut self, client: &AsyncClient, u: Option<Unsent>) {
        let Some(u) = u else { return };
        if !self.waiting.is_empty() {
            self.waiting.push_back(u);
        } else if let Err(u) = u.try_send(client) {
            self.waiting.push_back(u);
        }
    }

    /// Before anything waiting (subscriptions on a new connection).
    fn send_first(&mut self, client: &AsyncClient, first: Vec<Unsent>) {
        for u in first.into_iter().rev() {
            self.waiting.push_front(u);
        }
        self.flush(client);
    }

    /// Hands the client what it has room for.
    fn flush(&mut self, client: &AsyncClient) {
        while let Some(u) = self.waiting.pop_front() {
            if let Err(u) = u.try_send(client) {
                self.waiting.push_front(u);
                break;
            }
        }
    }

    fn idle(&self) -> bool {
        self.waiting.is_empty()
    }

    /// The broker is lost: forgets the documents waiting here and in the
    /// outbox (anything else from the outbox waits, in order); how many.
    fn forget_documents(
        &mut self,
        client: &AsyncClient,
        outbox: &mut tokio::sync::mpsc::UnboundedReceiver<Outgoing>,
    ) -> usize {
        let before = self.waiting.len();
        self.waiting.retain(|u| !u.is_document());
        let mut forgot = before - self.waiting.len();
        while let Ok(out) = outbox.try_recv() {
            if matches!(out, Outgoing::Desired(..)) {
                forgot += 1;
            } else {
                self.send(client, Unsent::of(out));
            }
        }
        forgot
    }
}

/// How the controller's client signs in to its broker.
pub struct BrokerAccess {
    /// (username, password), when the broker wants them.
    pub credentials: Option<(String, String)>,
    /// For the nodes given as mqtts:// (an external broker).
    pub tls: Option<Arc<rustls::ClientConfig>>,
}

/// Runs until `shutdown` resolves. Reconnects forever; the API keeps serving
/// the last known fleet meanwhile.
pub async fn run(
    controller: Arc<Controller>,
    brokers: BrokerNodes,
    access: BrokerAccess,
    qos: QoS,
    client_id: String,
    mut outbox: tokio::sync::mpsc::UnboundedReceiver<Outgoing>,
    mut shutdown: tokio::sync::watch::Receiver<bool>,
) {
    let options = |broker: &BrokerUrl| {
        let mut opts = MqttOptions::new(client_id.clone(), broker.host.clone(), broker.port);
        opts.set_keep_alive(Duration::from_secs(30))
            .set_clean_session(true)
            .set_max_packet_size(MAX_PACKET, MAX_PACKET)
            .set_inflight(1000);
        if let Some((user, password)) = &access.credentials {
            opts.set_credentials(user.clone(), password.clone());
        }
        if let (true, Some(tls)) = (broker.tls, &access.tls) {
            opts.set_transport(rumqttc::Transport::tls_with_config(rumqttc::TlsConfiguration::Rustls(tls.clone())));
        }
        opts
    };
    let user = access.credentials.as_ref().map(|(u, _)| u.clone()).unwrap_or_default();
    let mut node = 0;
    let (client, mut events) = AsyncClient::new(options(brokers.first()), 1024);
    // Answers (pieces of builds, enrollments) go out at once, not after Nagle.
    let mut net = events.network_options();
    net.set_tcp_nodelay(true);
    events.set_network_options(net);
    let mut limiter = LogLimiter { last: [None; 5], every: Duration::from_secs(10) };
    let mut failures = 0u32;
    let mut outbound = Outbound::default();
    let (applier, queue) = tokio::sync::mpsc::channel(APPLY_QUEUE);
    let worker = {
        let c = controller.clone();
        tokio::task::spawn_blocking(move || apply_all(&c, queue))
    };
    info!(%brokers, "ingest connecting");
    loop {
        // One poll is awaited to its end while the outbox is served beside
        // it: a poll dropped half-way through a connection attempt starts it
        // again, so a node that never answers was never given up while the
        // controller had something to send.
        // The outbox is read only while nothing waits for room in the client.
        let event = {
            let poll = events.poll();
            tokio::pin!(poll);
            loop {
                tokio::select! {
                    _ = shutdown.changed() => break None,
                    Some(out) = outbox.recv(), if outbound.idle() => outbound.send(&client, Unsent::of(out)),
                    e = &mut poll => break Some(e),
                }
            }
        };
        // Each poll took a request from the client's queue or handled a packet: room, perhaps.
        outbound.flush(&client);
        let Some(event) = event else { break };
        match event {
            Ok(Event::Incoming(Packet::ConnAck(_))) => {
                info!(broker = %brokers.all()[node], "ingest connected");
                failures = 0;
                controller.broker_connected.store(true, Relaxed);
                controller.metrics.broker_connects.fetch_add(1, Relaxed);
                // Before anything that waits: a subscription given up
                // for want of room would leave the controller deaf.
                let mut first = Vec::new();
                if controller.dynsec {
                    // Our own role first: Mosquitto handles a client's packets in order,
                    // so the subscriptions below are checked against it.
                    first.push(Unsent::Publish {
                        topic: crate::dynsec::TOPIC.into(),
                        retain: false,
                        payload: crate::dynsec::setup(&user),
                    });
                    first.push(Unsent::Subscribe(vec![rumqttc::SubscribeFilter::new(
                        crate::dynsec::RESPONSES.into(),
                        QoS::AtLeastOnce,
                    )]));
                }
                first.push(subscriptions(qos));
                outbound.send_first(&client, first);
                // The store is the truth; retained desired documents are its cache
                // in the broker, which an embedded broker loses on restart.
                blocking(&controller, Controller::republish_desired).await;
            }
            // The controller's own documents, as the broker holds them: one
            // that is not ours (garbage, a forgery, a stale copy) is replaced.
            Ok(Event::Incoming(Packet::Publish(p)))
                if TopicKind::parse(&p.topic).is_some_and(|(_, k)| k == TopicKind::Desired) =>
            {
                if let Some((id, _)) = TopicKind::parse(&p.topic) {
                    let payload = p.payload.clone();
                    blocking(&controller, move |c| c.check_desired(&id, &payload, now_ms())).await;
                }
            }
            Ok(Event::Incoming(Packet::Publish(p))) if p.topic == crate::dynsec::RESPONSES => {
                for failure in crate::dynsec::failures(&p.payload) {
                    warn!(%failure, "Mosquitto's dynamic-security plugin refused a change");
                }
            }
            // The echo of a retained message `delete device` cleared: expected.
            // (Any other empty message is malformed, below.)
            Ok(Event::Incoming(Packet::Publish(p))) if p.payload.is_empty() && controller.take_cleared(&p.topic) => {
                debug!(topic = %p.topic, "a retained message cleared");
            }
            Ok(Event::Incoming(Packet::Publish(p))) => match classify(&p.topic, &p.payload) {
                Ok((id, kind, Message::EnrollRequest(req))) => {
                    controller.metrics.received(kind);
                    let who = id.clone();
                    let Some(res) = blocking(&controller, move |c| c.enroll(&who, &req, now_ms())).await else {
                        continue;
                    };
                    // What the enrollment queued (the device's Mosquitto account) goes out before the answer.
                    while let Ok(out) = outbox.try_recv() {
                        outbound.send(&client, Unsent::of(out));
                    }
                    outbound.send(&client, Unsent::answer(&id, &Message::EnrollResponse(res), "an enrollment answer"));
                }
                Ok((id, kind, Message::ReleaseRequest(req))) => {
                    // A piece of an agent build: read from the store off the
                    // async workers, sent back on the device's own topic.
                    controller.metrics.received(kind);
                    let who = id.clone();
                    let Some(chunk) = blocking(&controller, move |c| c.release_chunk(&who, &req)).await else {
                        continue;
                    };
                    outbound
                        .send(&client, Unsent::answer(&id, &Message::ReleaseChunk(chunk), "a piece of an agent build"));
                }
                Ok((id, kind, msg)) => {
                    controller.metrics.received(kind);
                    let delivery = if p.retain { Delivery::Retained } else { Delivery::Live };
                    let (event, result) = match msg {
                        Message::CommandResult(result) => (FleetEvent::Seen, Some(result)),
                        msg => (fleet_event(msg), None),
                    };
                    // Waits while the queue is full: reading stops, so the
                    // broker holds the devices back instead of us growing.
                    if applier.send(Received { id, event, delivery, result }).await.is_err() {
                        tracing::error!("the thread applying device messages is gone; ingest stops");
                        break;
                    }
                }
                Err(why) => {
                    controller.metrics.rejected(why);
                    if limiter.allow(why) {
                        warn!(topic = %p.topic, len = p.payload.len(), reason = why.as_str(), "refused a device message (further ones logged at debug for 10 s)");
                    } else {
                        debug!(topic = %p.topic, len = p.payload.len(), reason = why.as_str(), "refused a device message");
                    }
                }
            },
            // A broker may refuse a subscription it could not set up (NATS,
            // when a JetStream consumer times out while a node is lost): the
            // controller would not hear those topics, so it asks again.
            Ok(Event::Incoming(Packet::SubAck(ack)))
                if ack.return_codes.iter().any(|c| matches!(c, rumqttc::SubscribeReasonCode::Failure)) =>
            {
                let refused =
                    ack.return_codes.iter().filter(|c| matches!(c, rumqttc::SubscribeReasonCode::Failure)).count();
                warn!(broker = %brokers.all()[node], refused, "the broker refused some of the controller's subscriptions; subscribing again");
                outbound.send_first(&client, vec![subscriptions(qos)]);
            }
            Ok(_) => {}
            Err(e) => {
                // Connected until now: a loss, not a refusal.
                let was_connected = controller.broker_connected.swap(false, Relaxed);
                let forgot = outbound.forget_documents(&client, &mut outbox);
                if forgot > 0 {
                    debug!(forgot, "documents not yet sent when the broker was lost: republished from the store on the next connect");
                }
                failures = failures.saturating_add(1);
                if let Ok(mut last) = controller.broker_error.lock() {
                    *last = Some(format!("{}: {e}", brokers.all()[node]));
                }
                let delay = Duration::from_millis(200u64.saturating_mul(1 << failures.min(5)));
                if was_connected {
                    warn!(broker = %brokers.all()[node], error = %e, retry_in_ms = delay.as_millis() as u64, "ingest lost the broker");
                } else {
                    warn!(broker = %brokers.all()[node], error = %e, retry_in_ms = delay.as_millis() as u64, "ingest cannot reach the broker");
                }
                // Another node of the cluster, if there is one (subscriptions
                // and documents are set up again on its ConnAck).
                if brokers.all().len() > 1 {
                    node = brokers.next_after(node);
                    events.mqtt_options = options(&brokers.all()[node]);
                    info!(broker = %brokers.all()[node], "ingest trying the next broker node");
                }
                tokio::select! {
                    _ = shutdown.changed() => break,
                    () = tokio::time::sleep(delay) => {}
                }
            }
        }
    }
    let _ = client.try_disconnect();
    controller.broker_connected.store(false, Relaxed);
    // What was received is applied before the controller's last flush.
    drop(applier);
    if let Err(e) = worker.await {
        tracing::error!(error = %e, "the thread applying device messages failed");
    }
}

/// Every device's upstream topics and the `desired` topics, at `qos`.
fn subscriptions(qos: QoS) -> Unsent {
    Unsent::Subscribe(
        UPSTREAM
            .into_iter()
            .chain([TopicKind::Desired])
            .map(|k| rumqttc::SubscribeFilter::new(k.filter_all_devices(), qos))
            .collect(),
    )
}

#[cfg(test)]
mod tests {
    use super::*;
    use baton_protocol::{encode, samples};

    #[test]
    fn classifies_good_and_bad_publishes() {
        let hb = encode(&Message::Heartbeat(samples::heartbeat())).unwrap();
        let pres = encode(&Message::Presence(samples::presence())).unwrap();
        assert!(matches!(
            classify("baton/v1/dev/a/heartbeat", &hb),
            Ok((_, TopicKind::Heartbeat, Message::Heartbeat(_)))
        ));
        assert_eq!(classify("baton/v1/dev/a b/heartbeat", &hb).err(), Some(Rejection::BadTopic));
        assert_eq!(classify("baton/v1/dev/a/presence", &hb).err(), Some(Rejection::Malformed));
        assert_eq!(classify("baton/v1/dev/a/heartbeat", &[0xde, 0xad]).err(), Some(Rejection::Malformed));
        let mut v2 = pres.clone();
        v2[0] = 2;
        assert_eq!(classify("baton/v1/dev/a/presence", &v2).err(), Some(Rejection::WrongVersion));
        let mut big = hb.clone();
        big.resize(10_000, 0);
        assert_eq!(classify("baton/v1/dev/a/heartbeat", &big).err(), Some(Rejection::Oversize));
    }
}
