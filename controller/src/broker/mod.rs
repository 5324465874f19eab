//! The embedded MQTT 3.1.1 broker, so one command runs a whole controller.
//!
//! The controller's own client reaches it over TCP like any other client:
//! the ingest code is the same whether the broker is this one or an external
//! Mosquitto or NATS. Built for many idle devices in little memory — one
//! task per connection, buffers only while bytes are moving, payloads shared
//! between subscribers — and for overload without loss: publishers wait
//! while the controller's queue is long (`router::TRUNK_HIGH`), and a device
//! that does not read what is sent to it is disconnected, not buffered for.
//!
//! With `--mqtt-auth` it is also the front door: every CONNECT on the
//! public listener is authenticated (`access::Authority`: the device's id
//! and the password issued at enrollment, or a join token), and every
//! PUBLISH and SUBSCRIBE is checked against the device's own topics; a step
//! outside them disconnects the device. The controller then connects on a
//! second, loopback-only listener with a one-time internal account.
//!
//! QoS: messages go out at QoS 0 or 1. A QoS 2 PUBLISH is taken (PUBREC,
//! PUBREL, PUBCOMP answered) and delivered at least once; Baton never sends one.

pub mod access;
mod authority;
pub mod router;
pub mod topic;
pub mod wire;

use std::collections::VecDeque;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering::Relaxed};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};
use tokio::net::TcpListener;

use access::{may_publish, may_subscribe, Authority, Identity};
use router::{Close, Message, Out, Outbox, Owner, Router};
use wire::{Connect, WireError};

/// Largest MQTT payload the broker accepts: a max-size desired document plus headroom.
/// The controller's own client accepts more, so an oversize publish can never
/// break the controller's connection, only the sender's.
pub const MAX_PAYLOAD: usize = 300 * 1024;
/// Largest packet: the payload limit plus topic and headers.
const MAX_PACKET: usize = MAX_PAYLOAD + 4096;
const CONNECT_TIMEOUT: Duration = Duration::from_secs(10);
/// QoS 1 messages sent to one connection and not yet acknowledged.
const MAX_INFLIGHT: usize = 1000;
/// Bytes gathered for one write before the socket is asked to take them.
const WRITE_BATCH: usize = 64 * 1024;
/// Bytes read at a time: into a small array in the connection's task while
/// no packet is under way, else into a buffer with room for the rest of
/// the packet (at least `READ_CHUNK`), given back once the packet is handled.
const SMALL_READ: usize = 128;
const READ_CHUNK: usize = 512;

#[derive(Debug, thiserror::Error)]
pub enum BrokerError {
    #[error(
        "cannot listen for MQTT on {addr} (another broker running? use --mqtt-listen ADDR, or --broker URL to use it)"
    )]
    Bind { addr: SocketAddr, source: std::io::Error },
    #[error("cannot start the embedded broker's thread: {0}")]
    Thread(std::io::Error),
}

/// Who a listener lets in.
pub enum Admission {
    /// Any client, any topic (loopback, or an operator who chose so); with
    /// these (username, password), the controller's own connection.
    Anyone(Option<(String, String)>),
    /// Only this (username, password): the controller's own connection.
    Account(String, String),
    /// Enrolled devices and join sessions, each on its own topics.
    Devices(Arc<dyn Authority>),
}

/// Who a connection turned out to be.
enum Who {
    Anyone,
    Internal,
    Device(Identity),
}

pub struct Broker {
    router: Mutex<Router>,
    max_connections: usize,
    connections: AtomicUsize,
    next_conn: AtomicU64,
    pub refused_connects: AtomicU64,
    pub denied_packets: AtomicU64,
    pub slow_consumers: AtomicU64,
    /// When a refused CONNECT was last logged at warn (ms since start).
    refusal_logged_ms: AtomicU64,
    /// Keep-alive is checked by one sweep for all connections, not a timer each.
    started: std::time::Instant,
    /// The broker's own runtime: one thread, like Mosquitto's event loop.
    /// Its tasks wake each other without crossing threads, and the
    /// controller's workers are left to the controller.
    rt: tokio::runtime::Handle,
}

impl Broker {
    /// Starts the broker's thread; it serves until `stop` changes.
    pub fn start(max_connections: usize, stop: tokio::sync::watch::Receiver<bool>) -> Result<Arc<Self>, BrokerError> {
        let rt = tokio::runtime::Builder::new_current_thread().enable_all().build().map_err(BrokerError::Thread)?;
        let handle = rt.handle().clone();
        let mut until = stop.clone();
        std::thread::Builder::new()
            .name("mqtt-broker".into())
            .spawn(move || {
                rt.block_on(async move {
                    let _ = until.changed().await;
                });
            })
            .map_err(BrokerError::Thread)?;
        let broker = Arc::new(Self {
            router: Mutex::new(Router::default()),
            max_connections,
            connections: AtomicUsize::new(0),
            next_conn: AtomicU64::new(1),
            refused_connects: AtomicU64::new(0),
            denied_packets: AtomicU64::new(0),
            slow_consumers: AtomicU64::new(0),
            refusal_logged_ms: AtomicU64::new(0),
            started: std::time::Instant::now(),
            rt: handle,
        });
        broker.rt.spawn(broker.clone().sweep(stop));
        Ok(broker)
    }

    /// Milliseconds since the broker started (connections' last packet).
    fn now_ms(&self) -> u64 {
        self.started.elapsed().as_millis() as u64
    }

    /// Closes, once a second, every connection silent for one and a half
    /// keep-alive periods (MQTT 3.1.1 §3.1.2.10).
    async fn sweep(self: Arc<Self>, mut stop: tokio::sync::watch::Receiver<bool>) {
        let mut every = tokio::time::interval(Duration::from_secs(1));
        let mut next_expiry = 60_000;
        loop {
            tokio::select! {
                _ = stop.changed() => return,
                _ = every.tick() => {}
            }
            let now = self.now_ms();
            let mut router = self.router();
            router.each_live(|o| {
                let grace = o.grace_ms.load(Relaxed);
                if grace > 0 && now.saturating_sub(o.heard_ms.load(Relaxed)) > grace {
                    o.close(Close::KeepAlive);
                }
            });
            // Sessions: at most twice the connections allowed, so offline
            // ones (a fleet's away devices) fit beside the live ones; the
            // scan of offline sessions runs once a minute or when over.
            let cap = self.max_connections.saturating_mul(2);
            if router.sessions() > cap || now >= next_expiry {
                next_expiry = now + 60_000;
                router.expire(now, router::SESSION_EXPIRY_MS, cap);
            }
        }
    }

    fn router(&self) -> std::sync::MutexGuard<'_, Router> {
        self.router.lock().unwrap_or_else(std::sync::PoisonError::into_inner)
    }

    /// Binds `addr` and serves MQTT there (over TLS when `tls` is set) until `stop` changes.
    pub fn listen(
        self: &Arc<Self>,
        addr: SocketAddr,
        admission: Admission,
        tls: Option<rustls::ServerConfig>,
        stop: tokio::sync::watch::Receiver<bool>,
    ) -> Result<SocketAddr, BrokerError> {
        let bind = |source| BrokerError::Bind { addr, source };
        let listener = std::net::TcpListener::bind(addr).map_err(bind)?;
        let local = listener.local_addr().map_err(bind)?;
        listener.set_nonblocking(true).map_err(bind)?;
        let tls = tls.map(|c| tokio_rustls::TlsAcceptor::from(Arc::new(c)));
        let broker = self.clone();
        self.rt.spawn(async move {
            // Registered with the broker's own runtime, on its thread.
            match TcpListener::from_std(listener) {
                Ok(listener) => broker.serve(listener, Arc::new(admission), tls, stop).await,
                Err(e) => tracing::error!(%addr, error = %e, "the embedded broker cannot serve its listener"),
            }
        });
        Ok(local)
    }

    async fn serve(
        self: Arc<Self>,
        listener: TcpListener,
        admission: Arc<Admission>,
        tls: Option<tokio_rustls::TlsAcceptor>,
        mut stop: tokio::sync::watch::Receiver<bool>,
    ) {
        loop {
            let (stream, peer) = tokio::select! {
                _ = stop.changed() => return,
                accepted = listener.accept() => match accepted {
                    Ok(a) => a,
                    Err(e) => {
                        // Out of descriptors, most likely: say so, and give the others a moment.
                        tracing::warn!(error = %e, "MQTT accept failed");
                        tokio::time::sleep(Duration::from_millis(100)).await;
                        continue;
                    }
                },
            };
            // MQTT's packets are small (acks, keystrokes of a session): no Nagle wait.
            let _ = stream.set_nodelay(true);
            let (broker, admission) = (self.clone(), admission.clone());
            // Two kinds of task: a plain connection's does not carry the
            // room a TLS session needs (most of a connection's memory).
            match tls.clone() {
                Some(tls) => tokio::spawn(async move {
                    let result = match tokio::time::timeout(CONNECT_TIMEOUT, tls.accept(stream)).await {
                        Ok(Ok(s)) => broker.connection(s, &admission).await,
                        Ok(Err(e)) => Err(format!("TLS handshake: {e}")),
                        Err(_) => Err("no TLS handshake within 10 s".into()),
                    };
                    if let Err(why) = result {
                        tracing::debug!(%peer, %why, "MQTT connection closed");
                    }
                }),
                None => tokio::spawn(async move {
                    if let Err(why) = broker.connection(stream, &admission).await {
                        tracing::debug!(%peer, %why, "MQTT connection closed");
                    }
                }),
            };
        }
    }

    /// Closes every connection of `device` and forgets its session (its credentials were revoked).
    pub fn disconnect(&self, device: &str) {
        self.router().remove(device, Close::Revoked);
    }

    /// Connections now, sessions kept, retained messages, messages offline
    /// sessions could not keep, offline sessions dropped.
    pub fn stats(&self) -> (usize, usize, usize, u64, u64) {
        let r = self.router();
        (self.connections.load(Relaxed), r.sessions(), r.retained(), r.dropped, r.expired)
    }

    /// Routes a message. A publisher that is not the trunk (`waiter`: its
    /// own outbox) then waits, at most `TRUNK_WAIT`, while the trunk has too
    /// much queued, or until its own connection is told to close.
    async fn route(&self, m: Message, waiter: Option<&Outbox>) {
        let live = self.router().publish(Arc::new(m));
        let Some(own) = waiter else { return };
        for target in live {
            let wait = async {
                loop {
                    let space = target.space.notified();
                    let closing = own.space.notified();
                    tokio::pin!(space, closing);
                    space.as_mut().enable();
                    closing.as_mut().enable();
                    if !target.full() || own.closed.load(Relaxed) {
                        break;
                    }
                    tokio::select! {
                        _ = space => {}
                        _ = closing => {}
                    }
                }
            };
            // A controller that stopped reading does not hold devices for good.
            let _ = tokio::time::timeout(router::TRUNK_WAIT, wait).await;
        }
    }

    async fn connection<S>(self: &Arc<Self>, stream: S, admission: &Admission) -> Result<(), String>
    where
        S: AsyncRead + AsyncWrite + Unpin + Send,
    {
        let (mut rd, mut wr) = tokio::io::split(stream);
        let mut rbuf = Vec::with_capacity(READ_CHUNK);
        let read = tokio::time::timeout(CONNECT_TIMEOUT, read_connect(&mut rd, &mut rbuf))
            .await
            .map_err(|_| "no CONNECT within 10 s".to_string())?;
        let (connect_len, mut connect) = match read {
            Ok(c) => c,
            Err(Some(WireError::Protocol(name, level))) => {
                self.refused_connects.fetch_add(1, Relaxed);
                let _ = wr.write_all(&wire::connack(false, wire::BAD_PROTOCOL)).await;
                let _ = wr.flush().await;
                return Err(WireError::Protocol(name, level).to_string());
            }
            Err(Some(e)) => return Err(e.to_string()),
            Err(None) => return Err("closed before CONNECT".into()),
        };
        rbuf.drain(..connect_len);
        let who = match self.admit(admission, &connect).await {
            Ok(who) => who,
            Err((code, why)) => {
                self.refused_connects.fetch_add(1, Relaxed);
                // Said where an operator looks, at most once per 10 s (a
                // fleet with a bad password must not flood the log).
                let now = self.now_ms();
                let last = self.refusal_logged_ms.load(Relaxed);
                if (last == 0 || now.saturating_sub(last) >= 10_000)
                    && self.refusal_logged_ms.compare_exchange(last, now.max(1), Relaxed, Relaxed).is_ok()
                {
                    tracing::warn!(client = %connect.client_id, code, reason = why, "refused an MQTT connection (further refusals for 10 s at debug; baton_mqtt_refused_total counts them)");
                } else {
                    tracing::debug!(client = %connect.client_id, code, reason = why, "refused an MQTT connection");
                }
                let _ = wr.write_all(&wire::connack(false, code)).await;
                let _ = wr.flush().await;
                return Err(format!("client {:?} refused (CONNACK {code}): {why}", connect.client_id));
            }
        };
        let conn = self.next_conn.fetch_add(1, Relaxed);
        if connect.client_id.is_empty() {
            connect.client_id = format!("baton-auto-{conn}");
        }
        if self.connections.fetch_add(1, Relaxed) >= self.max_connections {
            self.connections.fetch_sub(1, Relaxed);
            self.refused_connects.fetch_add(1, Relaxed);
            let _ = wr.write_all(&wire::connack(false, wire::SERVER_UNAVAILABLE)).await;
            let _ = wr.flush().await;
            return Err(format!(
                "client {:?} refused: {} connections already",
                connect.client_id, self.max_connections
            ));
        }
        // The credentials are not needed past here.
        connect.password = None;
        connect.username = None;
        let outbox = Outbox::new(conn, matches!(who, Who::Internal));
        outbox.heard_ms.store(self.now_ms(), Relaxed);
        outbox.grace_ms.store(u64::from(connect.keep_alive) * 1500, Relaxed);
        // A join token's session never outlives its connection.
        let (owner, clean) = match &who {
            Who::Anyone => (Owner::Anyone, connect.clean_session),
            Who::Internal => (Owner::Internal, connect.clean_session),
            Who::Device(Identity::Device(_)) => (Owner::Device, connect.clean_session),
            Who::Device(Identity::Joining(_)) => (Owner::Joining, true),
        };
        let connected = self.router().connect_as(&connect.client_id, clean, owner, &outbox);
        let Some(connected) = connected else {
            self.connections.fetch_sub(1, Relaxed);
            self.refused_connects.fetch_add(1, Relaxed);
            tracing::debug!(client = %connect.client_id, account = ?owner, "refused an MQTT connection: its client id is another account's session");
            let what = match owner {
                Owner::Joining => "a join token's holder tried to take over this client id's session",
                _ => "a client of another account tried to take over this client id's session",
            };
            denied(admission, &connect.client_id, what);
            let _ = wr.write_all(&wire::connack(false, wire::NOT_AUTHORIZED)).await;
            let _ = wr.flush().await;
            return Err(format!("client {:?} refused: its client id is another account's session", connect.client_id));
        };
        let session_present = connected.session_present;
        let mut link = Link {
            broker: self,
            admission,
            who: &who,
            client: &connect.client_id,
            outbox: &outbox,
            inflight: VecDeque::new(),
            next_id: 0,
            wbuf: wire::connack(session_present, 0).to_vec(),
            graceful: false,
        };
        let ended = link.run(&mut rd, &mut wr, rbuf).await;
        let (graceful, unacked) = link.finish();
        self.connections.fetch_sub(1, Relaxed);
        let now = self.now_ms();
        self.router().disconnected(&connect.client_id, conn, unacked, now);
        let taken_over = matches!(ended, Ended::Closed(Close::TakenOver));
        if let Ended::Closed(Close::SlowConsumer) = ended {
            self.slow_consumers.fetch_add(1, Relaxed);
            tracing::warn!(client = %connect.client_id, "MQTT client disconnected: it left too many messages unread");
        }
        if !graceful && !taken_over {
            if let Some((topic, payload, qos, retain)) = connect.will.take() {
                let will = Message { topic: topic.into(), payload: payload.into(), qos: qos.min(1), retain };
                Box::pin(self.route(will, None)).await;
            }
        }
        match ended {
            Ended::Error(e) => Err(e),
            _ => Ok(()),
        }
    }

    /// Who may connect; otherwise the CONNACK code refusing it, and why.
    async fn admit(&self, admission: &Admission, connect: &Connect) -> Result<Who, (u8, &'static str)> {
        if connect.client_id.is_empty() && !connect.clean_session {
            return Err((wire::BAD_CLIENT_ID, "an empty client id asks for a persistent session"));
        }
        if let Some((topic, ..)) = &connect.will {
            if !topic::valid_name(topic) {
                return Err((wire::NOT_AUTHORIZED, "its Last Will's topic is not a valid topic name"));
            }
        }
        match admission {
            Admission::Anyone(internal) => {
                let is_internal = internal.as_ref().is_some_and(|(user, password)| {
                    connect.username.as_deref() == Some(user.as_str())
                        && connect.password.as_deref().is_some_and(|p| constant_time_eq(p, password.as_bytes()))
                });
                Ok(if is_internal { Who::Internal } else { Who::Anyone })
            }
            Admission::Account(user, password) => {
                let matches = connect.username.as_deref() == Some(user.as_str())
                    && connect.password.as_deref().is_some_and(|p| constant_time_eq(p, password.as_bytes()));
                if matches {
                    Ok(Who::Internal)
                } else {
                    Err((wire::BAD_CREDENTIALS, "wrong user name or password for the internal listener"))
                }
            }
            Admission::Devices(authority) => {
                // The authority may read the store (join tokens): off the async workers.
                let (authority, asked) = (authority.clone(), connect.clone());
                let identity = tokio::task::spawn_blocking(move || authority.authenticate(&asked))
                    .await
                    .unwrap_or(Err((wire::SERVER_UNAVAILABLE, "the controller could not check its credentials")))?;
                if let Some((topic, ..)) = &connect.will {
                    if !may_publish(&identity, topic) {
                        return Err((wire::NOT_AUTHORIZED, "its Last Will is for a topic it may not publish to"));
                    }
                }
                Ok(Who::Device(identity))
            }
        }
    }
}

/// Tells the listener's authority (devices' listeners only) that `client`
/// was refused `what`; off the async workers (it records an event).
fn denied(admission: &Admission, client: &str, what: &str) {
    if let Admission::Devices(authority) = admission {
        let (authority, client, what) = (authority.clone(), client.to_owned(), what.to_owned());
        drop(tokio::task::spawn_blocking(move || authority.denied(&client, &what)));
    }
}

fn constant_time_eq(a: &[u8], b: &[u8]) -> bool {
    a.len() == b.len() && a.iter().zip(b).fold(0u8, |acc, (x, y)| acc | (x ^ y)) == 0
}

/// Why a connection's loop ended.
enum Ended {
    /// The client hung up (after DISCONNECT or not).
    Hangup,
    Closed(Close),
    Error(String),
}

/// One live connection's state.
struct Link<'a> {
    broker: &'a Arc<Broker>,
    admission: &'a Admission,
    who: &'a Who,
    client: &'a str,
    outbox: &'a Arc<Outbox>,
    /// QoS 1 messages sent and not yet acknowledged, oldest first.
    inflight: VecDeque<(u16, Arc<Message>, u8)>,
    next_id: u16,
    /// Bytes for the client, not yet taken by the socket.
    wbuf: Vec<u8>,
    graceful: bool,
}

impl Link<'_> {
    /// Moves bytes both ways until the connection ends. Every await point
    /// here is small (what an idle connection's task holds): handling
    /// packets, which may wait on a full trunk, and the last flush are boxed.
    async fn run<R, W>(&mut self, rd: &mut R, wr: &mut W, mut rbuf: Vec<u8>) -> Ended
    where
        R: AsyncRead + Unpin,
        W: AsyncWrite + Unpin,
    {
        // Where a read lands while no packet is under way: an idle
        // connection holds no buffer on the heap.
        let mut small = [0u8; SMALL_READ];
        let outbox = self.outbox;
        let ended = 'link: loop {
            // Whatever is buffered may already hold whole packets (the CONNECT's read).
            if !matches!(wire::frame(&rbuf, MAX_PACKET), Ok(None)) {
                match Box::pin(self.handle(&mut rbuf)).await {
                    Ok(true) => {}
                    Ok(false) => break Ended::Hangup,
                    Err(e) => break e,
                }
            }
            if rbuf.is_empty() {
                rbuf = Vec::new();
            }
            if self.wbuf.is_empty() {
                self.wbuf = Vec::new();
            }
            if self.inflight.is_empty() && self.inflight.capacity() > 16 {
                self.inflight = VecDeque::new();
            }
            let room = self.wbuf.len() < WRITE_BATCH && self.inflight.len() < MAX_INFLIGHT;
            tokio::select! {
                read = read_some(rd, &mut rbuf, &mut small) => match read {
                    Ok(0) => return Ended::Hangup,
                    Ok(_) => outbox.heard_ms.store(self.broker.now_ms(), Relaxed),
                    Err(e) => return Ended::Error(e.to_string()),
                },
                written = wr.write(&self.wbuf), if !self.wbuf.is_empty() => match written {
                    Ok(0) => return Ended::Hangup,
                    Ok(n) => {
                        self.wbuf.drain(..n);
                        if self.wbuf.is_empty() {
                            if let Err(e) = wr.flush().await {
                                return Ended::Error(e.to_string());
                            }
                        }
                    }
                    Err(e) => return Ended::Error(e.to_string()),
                },
                // Told to close while it cannot take from its queue (a
                // client that does not read): close now, not when it reads.
                why = outbox.closing(), if !room => break 'link Ended::Closed(why),
                out = outbox.next(), if room => {
                    if let Some(why) = self.take(out) {
                        break 'link Ended::Closed(why);
                    }
                    // Gather what else is queued into the same write.
                    while self.wbuf.len() < WRITE_BATCH && self.inflight.len() < MAX_INFLIGHT {
                        let Some(out) = self.outbox.try_next() else { break };
                        if let Some(why) = self.take(out) {
                            break 'link Ended::Closed(why);
                        }
                    }
                }
            }
        };
        let _ = Box::pin(self.flush(wr)).await;
        ended
    }

    /// Writes out what is buffered (on the way out: best effort, bounded).
    async fn flush<W: AsyncWrite + Unpin>(&mut self, wr: &mut W) -> std::io::Result<()> {
        let write = async {
            wr.write_all(&self.wbuf).await?;
            wr.flush().await
        };
        let r = tokio::time::timeout(Duration::from_secs(2), write).await.unwrap_or(Ok(()));
        self.wbuf.clear();
        r
    }

    /// Puts a message from the outbox into the write buffer; `Some` to close.
    fn take(&mut self, out: Out) -> Option<Close> {
        match out {
            Out::Close(why) => Some(why),
            Out::Publish(m, qos, retain) => {
                let id = if qos > 0 {
                    let id = self.free_id();
                    self.inflight.push_back((id, m.clone(), qos));
                    id
                } else {
                    0
                };
                wire::encode_publish(&mut self.wbuf, &m.topic, &m.payload, qos, retain, id);
                None
            }
        }
    }

    fn free_id(&mut self) -> u16 {
        loop {
            self.next_id = self.next_id.checked_add(1).unwrap_or(1);
            if !self.inflight.iter().any(|(i, ..)| *i == self.next_id) {
                return self.next_id;
            }
        }
    }

    /// Handles every whole packet in `rbuf`. Ok(false): the client said DISCONNECT.
    async fn handle(&mut self, rbuf: &mut Vec<u8>) -> Result<bool, Ended> {
        let mut used = 0;
        let result = loop {
            let (header, total) = match wire::frame(&rbuf[used..], MAX_PACKET) {
                Ok(Some(f)) => f,
                Ok(None) => break Ok(true),
                Err(e) => break Err(Ended::Error(e.to_string())),
            };
            let packet = &rbuf[used..used + total];
            used += total;
            match self.packet(packet, header).await {
                Ok(true) => {}
                other => break other,
            }
        };
        rbuf.drain(..used);
        result
    }

    async fn packet(&mut self, packet: &[u8], header: usize) -> Result<bool, Ended> {
        let malformed = |e: WireError| Ended::Error(e.to_string());
        // §2.2.2: the fixed header's flag bits are fixed for all but PUBLISH.
        let flags = match packet[0] >> 4 {
            wire::PUBLISH => packet[0] & 0x0f,
            wire::PUBREL | wire::SUBSCRIBE | wire::UNSUBSCRIBE => 0x02,
            _ => 0,
        };
        if packet[0] & 0x0f != flags {
            return Err(Ended::Error(format!(
                "reserved flags {:#04x} in a packet of type {}",
                packet[0] & 0x0f,
                packet[0] >> 4
            )));
        }
        match packet[0] >> 4 {
            wire::PUBLISH => {
                let p = wire::parse_publish(packet, header).map_err(malformed)?;
                if !topic::valid_name(p.topic) {
                    return Err(Ended::Error(format!("PUBLISH on {:?}: not a topic name", p.topic)));
                }
                if !self.permits(|id| may_publish(id, p.topic)) {
                    return Err(self.deny(format!("publish on {}", p.topic)));
                }
                let waits = !matches!(self.who, Who::Internal);
                let message =
                    Message { topic: p.topic.into(), payload: p.payload.into(), qos: p.qos.min(1), retain: p.retain };
                self.broker.route(message, waits.then_some(&**self.outbox)).await;
                match p.qos {
                    1 => self.wbuf.extend_from_slice(&wire::ack(wire::PUBACK, p.id)),
                    2 => self.wbuf.extend_from_slice(&wire::ack(wire::PUBREC, p.id)),
                    _ => {}
                }
            }
            wire::PUBACK => {
                let id = wire::packet_id(packet, header).map_err(malformed)?;
                if let Some(i) = self.inflight.iter().position(|(i, ..)| *i == id) {
                    self.inflight.remove(i);
                }
            }
            wire::PUBREL => {
                let id = wire::packet_id(packet, header).map_err(malformed)?;
                self.wbuf.extend_from_slice(&wire::ack(wire::PUBCOMP, id));
            }
            // Never asked for: Baton sends at most QoS 1.
            wire::PUBREC | wire::PUBCOMP => {}
            wire::SUBSCRIBE => {
                let (id, filters) = wire::parse_subscribe(packet, header).map_err(malformed)?;
                if let Some((f, _)) = filters.iter().find(|(f, _)| !self.permits(|i| may_subscribe(i, f))) {
                    return Err(self.deny(format!("subscribe to {f}")));
                }
                // The retained messages it brings are queued, so they follow the SUBACK.
                let codes = self.broker.router().subscribe(self.client, &filters);
                self.wbuf.extend_from_slice(&wire::suback(id, &codes));
            }
            wire::UNSUBSCRIBE => {
                let (id, filters) = wire::parse_unsubscribe(packet, header).map_err(malformed)?;
                self.broker.router().unsubscribe(self.client, &filters);
                self.wbuf.extend_from_slice(&wire::ack(wire::UNSUBACK, id));
            }
            wire::PINGREQ => self.wbuf.extend_from_slice(&wire::PINGRESP_BYTES),
            wire::DISCONNECT => {
                self.graceful = true;
                return Ok(false);
            }
            wire::CONNECT => return Err(Ended::Error("a second CONNECT".into())),
            other => return Err(Ended::Error(format!("packet type {other} from a client"))),
        }
        Ok(true)
    }

    /// Whether the connection's identity permits a step (anyone else may do anything).
    fn permits(&self, check: impl FnOnce(&Identity) -> bool) -> bool {
        match self.who {
            Who::Device(identity) => check(identity),
            Who::Anyone | Who::Internal => true,
        }
    }

    /// A device stepped outside its topics: counted, said, and the connection ends.
    fn deny(&self, what: String) -> Ended {
        self.broker.denied_packets.fetch_add(1, Relaxed);
        tracing::warn!(device = %self.client, %what, "device stepped outside its topics; disconnected");
        denied(self.admission, self.client, &format!("{what} (outside its topics; disconnected)"));
        Ended::Error(format!("denied: {what}"))
    }

    /// Ends the link: whether it said DISCONNECT, and the QoS 1 messages it
    /// took without an acknowledgement (sent or still queued), oldest first.
    fn finish(mut self) -> (bool, Vec<(Arc<Message>, u8)>) {
        self.outbox.close(Close::TakenOver);
        let mut unacked: Vec<(Arc<Message>, u8)> = self.inflight.drain(..).map(|(_, m, q)| (m, q)).collect();
        while let Some(out) = self.outbox.try_next() {
            if let Out::Publish(m, qos, _) = out {
                if qos > 0 {
                    unacked.push((m, qos));
                }
            }
        }
        (self.graceful, unacked)
    }
}

/// Reads what is there: into `small` when no packet is under way, else
/// straight into `rbuf` with room for the rest of the packet.
async fn read_some<R: AsyncRead + Unpin>(rd: &mut R, rbuf: &mut Vec<u8>, small: &mut [u8]) -> std::io::Result<usize> {
    if rbuf.is_empty() {
        let n = rd.read(small).await?;
        rbuf.extend_from_slice(&small[..n]);
        return Ok(n);
    }
    let rest = wire::declared_len(rbuf).map_or(0, |total| total.saturating_sub(rbuf.len()));
    rbuf.reserve(rest.clamp(READ_CHUNK, MAX_PACKET));
    rd.read_buf(rbuf).await
}

/// Reads until a whole first packet is in `buf`; it must be a CONNECT.
/// `Err(None)`: the client hung up or the socket failed first.
async fn read_connect(
    client: &mut (impl AsyncRead + Unpin),
    buf: &mut Vec<u8>,
) -> Result<(usize, Connect), Option<WireError>> {
    loop {
        if let Some((_, total)) = wire::frame(buf, 64 * 1024).map_err(Some)? {
            return Ok((total, wire::parse_connect(&buf[..total]).map_err(Some)?));
        }
        if buf.capacity() - buf.len() < READ_CHUNK {
            buf.reserve(READ_CHUNK);
        }
        if client.read_buf(buf).await.map_err(|_| None)? == 0 {
            return Err(None);
        }
    }
}
