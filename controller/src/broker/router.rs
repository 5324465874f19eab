//! The embedded broker's shared state: sessions, who subscribes to what,
//! retained messages, and each live connection's outbox. One `Router` sits
//! behind one mutex; every operation is short and never waits.
//!
//! Delivery rules (MQTT 3.1.1, at most QoS 1 out):
//! - a message goes to each session with a matching subscription once, at
//!   the lower of its QoS and the highest granted among those subscriptions;
//! - a persistent session (clean_session = false) that is offline keeps
//!   QoS 1 messages for its next connection, at most `OFFLINE_LIMIT` (the
//!   oldest give way, counted in `dropped`), and of retained messages only
//!   the newest per topic;
//! - QoS 1 messages a connection of a persistent session took but never saw
//!   acknowledged go back to the session (`disconnected`);
//! - a persistent session offline for `SESSION_EXPIRY` is dropped, and the
//!   longest offline ones first while there are more sessions than the
//!   broker's cap (`expire`): a client that never comes back, or one
//!   making up client ids, holds nothing for ever. A device that returns
//!   after that subscribes again and gets its retained document.

use std::collections::{HashMap, VecDeque};
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering::Relaxed};
use std::sync::Arc;

use tokio::sync::Notify;

use super::topic;

/// QoS 1 messages an offline persistent session keeps.
pub const OFFLINE_LIMIT: usize = 100;
/// A subscriber that is not the trunk (devices, any other client) and lets
/// this many messages, or `QUEUE_BYTES_LIMIT` bytes, pile up unread is
/// disconnected: it will reconnect and get its retained document again.
pub const QUEUE_LIMIT: usize = 1000;
pub const QUEUE_BYTES_LIMIT: usize = 4 << 20;
/// Publishers wait while the trunk (the controller's own connection) has
/// more than this queued: overload slows devices down instead of losing
/// their messages. Each waits at most `TRUNK_WAIT` per message, so a
/// controller that stops reading does not hold devices up for good.
pub const TRUNK_HIGH: usize = 20_000;
pub const TRUNK_HIGH_BYTES: usize = 64 << 20;
pub const TRUNK_WAIT: std::time::Duration = std::time::Duration::from_secs(5);
/// Past this the trunk itself is closed as a slow consumer (the controller
/// reconnects and reads the retained state again): memory stays bounded.
pub const TRUNK_LIMIT: usize = 1_000_000;
pub const TRUNK_BYTES_LIMIT: usize = 256 << 20;
/// Bytes of messages an offline session keeps (at least the newest one).
pub const OFFLINE_BYTES_LIMIT: usize = 1 << 20;
/// How long a persistent session is kept offline (as AWS IoT's default:
/// what it holds is for a flaky link's short absences; desired documents
/// are retained and commands time out at the controller long before).
pub const SESSION_EXPIRY_MS: u64 = 3_600_000;

/// One published message, shared by every subscriber it goes to.
#[derive(Debug)]
pub struct Message {
    /// Shared with the retained map's key.
    pub topic: Arc<str>,
    pub payload: Box<[u8]>,
    pub qos: u8,
    pub retain: bool,
}

/// What a connection's task is handed to do.
#[derive(Debug)]
pub enum Out {
    /// Send this message at this QoS, with this RETAIN flag.
    Publish(Arc<Message>, u8, bool),
    /// Close the connection, for this reason.
    Close(Close),
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[repr(u8)]
pub enum Close {
    /// Another connection took over the client id (no Last Will).
    TakenOver,
    /// The device's credentials were revoked.
    Revoked,
    /// It let too much pile up unread.
    SlowConsumer,
    /// Nothing heard for one and a half keep-alive periods.
    KeepAlive,
}

/// What is queued for a live connection, and its counters. The queue is a
/// plain deque (no memory while empty, unlike a channel's first block).
#[derive(Debug)]
pub struct Outbox {
    pub id: u64,
    queue: std::sync::Mutex<VecDeque<Out>>,
    /// Told when something is queued.
    ready: Notify,
    /// Messages (and their bytes) sent here and not yet taken by the connection's task.
    pub queued: AtomicUsize,
    pub queued_bytes: AtomicUsize,
    /// Told when the queue shrinks below the trunk mark, or closes.
    pub space: Notify,
    /// The controller's own connection (the internal account): publishers
    /// wait for it, and it never waits for anyone.
    pub trunk: AtomicBool,
    pub closed: AtomicBool,
    /// Why it was closed (a `Close` as u8, 0 = not closed).
    why: std::sync::atomic::AtomicU8,
    /// When the connection's last packet came (the broker's clock, ms), and
    /// how long it may stay silent (0: forever).
    pub heard_ms: std::sync::atomic::AtomicU64,
    pub grace_ms: std::sync::atomic::AtomicU64,
}

impl Outbox {
    pub fn new(id: u64, trunk: bool) -> Arc<Self> {
        Arc::new(Self {
            id,
            queue: std::sync::Mutex::new(VecDeque::new()),
            ready: Notify::new(),
            queued: AtomicUsize::new(0),
            queued_bytes: AtomicUsize::new(0),
            space: Notify::new(),
            trunk: AtomicBool::new(trunk),
            closed: AtomicBool::new(false),
            why: Default::default(),
            heard_ms: Default::default(),
            grace_ms: Default::default(),
        })
    }

    fn queue(&self) -> std::sync::MutexGuard<'_, VecDeque<Out>> {
        self.queue.lock().unwrap_or_else(std::sync::PoisonError::into_inner)
    }

    fn push(&self, out: Out) {
        let was_empty = {
            let mut q = self.queue();
            q.push_back(out);
            q.len() == 1
        };
        // The connection's task looks at the queue before it waits: only
        // the first of a batch needs to wake it.
        if was_empty {
            self.ready.notify_one();
        }
    }

    /// The next thing queued, if any (counted as taken).
    pub fn try_next(&self) -> Option<Out> {
        let out = {
            let mut q = self.queue();
            let out = q.pop_front();
            if q.is_empty() && q.capacity() > 16 {
                *q = VecDeque::new();
            }
            out
        }?;
        self.taken(&out);
        Some(out)
    }

    /// Waits for the next thing queued.
    pub async fn next(&self) -> Out {
        until(&self.ready, || self.try_next()).await
    }

    /// Queues a message; false if the connection is closing. A slow
    /// subscriber that is not a trunk is told to close instead.
    pub fn publish(&self, m: &Arc<Message>, qos: u8, retain: bool) -> bool {
        if self.closed.load(Relaxed) {
            return false;
        }
        let queued = self.queued.fetch_add(1, Relaxed) + 1;
        let bytes = self.queued_bytes.fetch_add(m.payload.len(), Relaxed) + m.payload.len();
        let (limit, bytes_limit) =
            if self.trunk.load(Relaxed) { (TRUNK_LIMIT, TRUNK_BYTES_LIMIT) } else { (QUEUE_LIMIT, QUEUE_BYTES_LIMIT) };
        if queued > limit || bytes > bytes_limit {
            self.queued.fetch_sub(1, Relaxed);
            self.queued_bytes.fetch_sub(m.payload.len(), Relaxed);
            self.close(Close::SlowConsumer);
            return false;
        }
        self.push(Out::Publish(m.clone(), qos, retain));
        true
    }

    /// Tells the connection to close (once).
    pub fn close(&self, why: Close) {
        if !self.closed.swap(true, Relaxed) {
            self.why.store(why as u8 + 1, Relaxed);
            self.push(Out::Close(why));
        }
        self.space.notify_waiters();
    }

    /// `out` was taken off the queue.
    fn taken(&self, out: &Out) {
        if let Out::Publish(m, ..) = out {
            let queued = self.queued.fetch_sub(1, Relaxed) - 1;
            let bytes = self.queued_bytes.fetch_sub(m.payload.len(), Relaxed) - m.payload.len();
            if queued <= TRUNK_HIGH && bytes <= TRUNK_HIGH_BYTES && queued % 256 == 0 {
                self.space.notify_waiters();
            }
        }
    }

    /// Why it was told to close, if it was.
    pub fn closed_for(&self) -> Option<Close> {
        match self.why.load(Relaxed) {
            0 => None,
            1 => Some(Close::TakenOver),
            2 => Some(Close::Revoked),
            3 => Some(Close::SlowConsumer),
            _ => Some(Close::KeepAlive),
        }
    }

    /// Waits until the connection is told to close.
    pub async fn closing(&self) -> Close {
        until(&self.space, || self.closed_for()).await
    }

    /// Whether a publisher that is not a trunk should wait before sending more here.
    pub fn full(&self) -> bool {
        self.trunk.load(Relaxed)
            && !self.closed.load(Relaxed)
            && (self.queued.load(Relaxed) > TRUNK_HIGH || self.queued_bytes.load(Relaxed) > TRUNK_HIGH_BYTES)
    }
}

/// The kind of account a session belongs to. A connection resumes or
/// takes over only a session of its own kind: a session's subscriptions
/// were checked against the account that made them, so a device resuming
/// the controller's session, or a join token's holder resuming a device's,
/// would receive what that account may read without ever being checked
/// (and would cut its connection off).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum Owner {
    /// A listener that checks no credentials (`--mqtt-auth` off).
    #[default]
    Anyone,
    /// The controller's own clients.
    Internal,
    /// A device with its password (client id = its id).
    Device,
    /// A join token's holder, enrolling under the client id it names.
    Joining,
}

impl Owner {
    /// Whether a connection of this kind may take a session of `existing`'s:
    /// its own kind, or a device over its own join session.
    pub fn may_take(self, existing: Owner) -> bool {
        self == existing || (self == Owner::Device && existing == Owner::Joining)
    }
}

#[derive(Debug)]
struct Session {
    clean: bool,
    owner: Owner,
    /// (filter, granted QoS); the filter shared with the index's key.
    subs: Vec<(Arc<str>, u8)>,
    conn: Option<Arc<Outbox>>,
    offline: VecDeque<(Arc<Message>, u8)>,
    /// When its last connection ended (the broker's clock), while it has none.
    offline_since: u64,
}

#[derive(Debug, Default)]
pub struct Router {
    sessions: HashMap<Arc<str>, Session>,
    /// Filters without wildcards: filter → (client, granted QoS).
    exact: HashMap<Arc<str>, Vec<(Arc<str>, u8)>>,
    /// Filters with wildcards: (filter, client, granted QoS).
    wild: Vec<(Arc<str>, Arc<str>, u8)>,
    retained: HashMap<Arc<str>, Arc<Message>>,
    /// Messages an offline session could not keep.
    pub dropped: u64,
    /// Offline sessions dropped for their age or the cap on sessions.
    pub expired: u64,
}

/// What `connect` found.
pub struct Connected {
    pub session_present: bool,
    /// The connection this one replaces, told to close.
    pub replaced: Option<Arc<Outbox>>,
}

impl Router {
    /// A connection for `client` was accepted: it takes over the session
    /// (or a new one), and gets what the session kept while offline.
    pub fn connect(&mut self, client: &str, clean: bool, outbox: &Arc<Outbox>) -> Connected {
        self.connect_as(client, clean, Owner::Anyone, outbox).expect("a session of anyone's")
    }

    /// `connect` for an account of kind `owner`; None (nothing touched) when
    /// the client id is another kind of account's session.
    pub fn connect_as(&mut self, client: &str, clean: bool, owner: Owner, outbox: &Arc<Outbox>) -> Option<Connected> {
        if self.sessions.get(client).is_some_and(|s| !owner.may_take(s.owner)) {
            return None;
        }
        let mut replaced = None;
        if let Some(s) = self.sessions.get_mut(client) {
            replaced = s.conn.take();
            if let Some(old) = &replaced {
                old.close(Close::TakenOver);
            }
        }
        if clean || self.sessions.get(client).is_some_and(|s| s.clean || s.owner != owner) {
            self.forget(client);
        }
        let present = self.sessions.contains_key(client);
        let key: Arc<str> = Arc::from(client);
        let s = self.sessions.entry(key).or_insert_with(|| Session {
            clean,
            owner,
            subs: Vec::new(),
            conn: None,
            offline: VecDeque::new(),
            offline_since: 0,
        });
        s.conn = Some(outbox.clone());
        for (m, qos) in std::mem::take(&mut s.offline) {
            outbox.publish(&m, qos, false);
        }
        Some(Connected { session_present: present, replaced })
    }

    /// Connection `conn` of `client` ended. `unacked`: QoS 1 messages it
    /// took and never saw acknowledged, oldest first; for a persistent
    /// session they go to its live connection, or wait for the next one.
    /// `now`: the broker's clock, from which its offline time counts.
    pub fn disconnected(&mut self, client: &str, conn: u64, unacked: Vec<(Arc<Message>, u8)>, now: u64) {
        let Some(s) = self.sessions.get_mut(client) else { return };
        if s.conn.as_ref().is_some_and(|c| c.id == conn) {
            s.conn = None;
            s.offline_since = now;
            if s.clean {
                self.forget(client);
                return;
            }
        }
        if s.clean {
            return;
        }
        match &s.conn {
            Some(live) => {
                for (m, qos) in unacked {
                    live.publish(&m, qos, false);
                }
            }
            None => {
                for (m, qos) in unacked.into_iter().rev() {
                    s.offline.push_front((m, qos));
                }
                self.dropped += trim(&mut s.offline);
            }
        }
    }

    /// Removes a session and its subscriptions; its connection, if any, is closed.
    pub fn remove(&mut self, client: &str, why: Close) {
        if let Some(c) = self.sessions.get_mut(client).and_then(|s| s.conn.take()) {
            c.close(why);
        }
        self.forget(client);
    }

    fn forget(&mut self, client: &str) {
        let Some(s) = self.sessions.remove(client) else { return };
        for (filter, _) in &s.subs {
            self.unindex(client, filter);
        }
    }

    fn unindex(&mut self, client: &str, filter: &str) {
        if topic::is_wildcard(filter) {
            self.wild.retain(|(f, c, _)| !(&**f == filter && &**c == client));
        } else if let Some(v) = self.exact.get_mut(filter) {
            v.retain(|(c, _)| &**c != client);
            if v.is_empty() {
                self.exact.remove(filter);
            }
        }
    }

    /// Adds (or replaces) subscriptions; returns the SUBACK codes, and
    /// queues the retained messages they match on the session's connection.
    pub fn subscribe(&mut self, client: &str, filters: &[(String, u8)]) -> Vec<u8> {
        let Some(key) = self.sessions.get_key_value(client).map(|(k, _)| k.clone()) else {
            return vec![super::wire::SUBSCRIBE_FAILED; filters.len()];
        };
        let Some(s) = self.sessions.get_mut(client) else { return Vec::new() };
        let conn = s.conn.clone();
        let mut codes = Vec::with_capacity(filters.len());
        let mut added: Vec<(Arc<str>, u8)> = Vec::new();
        for (filter, asked) in filters {
            if !topic::valid_filter(filter) {
                codes.push(super::wire::SUBSCRIBE_FAILED);
                continue;
            }
            let granted = (*asked).min(1);
            codes.push(granted);
            let shared = match s.subs.iter_mut().find(|(f, _)| **f == **filter) {
                Some(sub) => {
                    sub.1 = granted;
                    sub.0.clone()
                }
                None => {
                    // One allocation per filter, shared by session and index.
                    let shared = self
                        .exact
                        .get_key_value(filter.as_str())
                        .map_or_else(|| Arc::from(filter.as_str()), |(k, _)| k.clone());
                    s.subs.push((shared.clone(), granted));
                    shared
                }
            };
            added.push((shared, granted));
        }
        s.subs.shrink_to_fit();
        for (filter, granted) in &added {
            self.unindex(client, filter);
            if topic::is_wildcard(filter) {
                self.wild.push((filter.clone(), key.clone(), *granted));
            } else {
                self.exact.entry(filter.clone()).or_insert_with(|| Vec::with_capacity(1)).push((key.clone(), *granted));
            }
        }
        if let Some(c) = conn {
            for (filter, granted) in &added {
                let mut send = |m: &Arc<Message>| {
                    c.publish(m, m.qos.min(*granted), true);
                };
                if topic::is_wildcard(filter) {
                    self.retained.values().filter(|m| topic::matches(filter, &m.topic)).for_each(&mut send);
                } else if let Some(m) = self.retained.get(filter) {
                    send(m);
                }
            }
        }
        codes
    }

    pub fn unsubscribe(&mut self, client: &str, filters: &[String]) {
        let Some(s) = self.sessions.get_mut(client) else { return };
        s.subs.retain(|(f, _)| !filters.iter().any(|u| **u == **f));
        for f in filters {
            self.unindex(client, f);
        }
    }

    /// Routes a message: keeps (or, empty, clears) it when retained, and
    /// queues it for every matching session. Returns the live connections
    /// it was queued on.
    pub fn publish(&mut self, m: Arc<Message>) -> Vec<Arc<Outbox>> {
        if m.retain {
            if m.payload.is_empty() {
                self.retained.remove(&m.topic);
            } else {
                self.retained.insert(m.topic.clone(), m.clone());
            }
        }
        let mut targets: Vec<(Arc<str>, u8)> = Vec::new();
        let mut add = |c: &Arc<str>, q: u8| match targets.iter_mut().find(|(t, _)| t == c) {
            Some(t) => t.1 = t.1.max(q),
            None => targets.push((c.clone(), q)),
        };
        if let Some(v) = self.exact.get(&*m.topic) {
            v.iter().for_each(|(c, q)| add(c, *q));
        }
        self.wild.iter().filter(|(f, ..)| topic::matches(f, &m.topic)).for_each(|(_, c, q)| add(c, *q));
        let mut live = Vec::with_capacity(targets.len());
        for (client, granted) in targets {
            let Some(s) = self.sessions.get_mut(&client) else { continue };
            let qos = m.qos.min(granted);
            match &s.conn {
                Some(c) if c.publish(&m, qos, false) => live.push(c.clone()),
                // Offline, or its connection is closing: a persistent session keeps it.
                _ if !s.clean && qos > 0 => {
                    // A newer retained message on a topic replaces the one
                    // kept for it: a device that was away gets its latest
                    // document, not every one it missed, in order.
                    if m.retain {
                        s.offline.retain(|(o, _)| !(o.retain && o.topic == m.topic));
                    }
                    s.offline.push_back((m.clone(), qos));
                    self.dropped += trim(&mut s.offline);
                }
                _ => {}
            }
        }
        live
    }

    /// Drops persistent sessions offline for longer than `after` ms, then,
    /// while more than `cap` sessions remain, the longest offline ones.
    /// Returns how many went.
    pub fn expire(&mut self, now: u64, after: u64, cap: usize) -> usize {
        let mut offline: Vec<(u64, Arc<str>)> = self
            .sessions
            .iter()
            .filter(|(_, s)| s.conn.is_none())
            .map(|(client, s)| (s.offline_since, client.clone()))
            .collect();
        offline.sort_unstable();
        let over = self.sessions.len().saturating_sub(cap);
        let gone: Vec<Arc<str>> = offline
            .into_iter()
            .enumerate()
            .take_while(|(i, (since, _))| *i < over || now.saturating_sub(*since) > after)
            .map(|(_, (_, client))| client)
            .collect();
        for client in &gone {
            self.forget(client);
        }
        self.expired += gone.len() as u64;
        gone.len()
    }

    /// Calls `f` with every live connection's outbox.
    pub fn each_live(&self, mut f: impl FnMut(&Outbox)) {
        self.sessions.values().filter_map(|s| s.conn.as_deref()).for_each(&mut f);
    }

    pub fn sessions(&self) -> usize {
        self.sessions.len()
    }

    pub fn retained(&self) -> usize {
        self.retained.len()
    }
}

/// Waits until `check` has an answer, looking again each time `notify` is told.
async fn until<T>(notify: &Notify, mut check: impl FnMut() -> Option<T>) -> T {
    loop {
        let told = notify.notified();
        tokio::pin!(told);
        // Registered before looking, so a notification in between is not missed.
        told.as_mut().enable();
        if let Some(answer) = check() {
            return answer;
        }
        told.await;
    }
}

/// Drops the oldest of what an offline session keeps until it is within
/// `OFFLINE_LIMIT` messages and `OFFLINE_BYTES_LIMIT` bytes (the newest
/// message stays, whatever its size); returns how many went.
fn trim(offline: &mut VecDeque<(Arc<Message>, u8)>) -> u64 {
    let mut bytes: usize = offline.iter().map(|(m, _)| m.payload.len()).sum();
    let mut dropped = 0;
    while offline.len() > OFFLINE_LIMIT || (offline.len() > 1 && bytes > OFFLINE_BYTES_LIMIT) {
        if let Some((m, _)) = offline.pop_front() {
            bytes -= m.payload.len();
            dropped += 1;
        }
    }
    dropped
}

#[cfg(test)]
mod tests {
    use super::*;

    fn msg(topic: &str, payload: &str, qos: u8, retain: bool) -> Arc<Message> {
        Arc::new(Message { topic: topic.into(), payload: payload.as_bytes().into(), qos, retain })
    }

    fn drain(rx: &Arc<Outbox>) -> Vec<(String, String, u8, bool)> {
        let mut got = Vec::new();
        while let Some(out) = rx.try_next() {
            match out {
                Out::Publish(m, q, r) => {
                    got.push((m.topic.to_string(), String::from_utf8_lossy(&m.payload).into_owned(), q, r))
                }
                Out::Close(c) => got.push(("CLOSE".into(), format!("{c:?}"), 0, false)),
            }
        }
        got
    }

    #[test]
    fn subscribers_get_matching_messages_once_at_the_lower_qos() {
        let mut r = Router::default();
        let ctl_rx = Outbox::new(1, false);
        let ctl = ctl_rx.clone();
        let dev_rx = Outbox::new(2, false);
        let dev = dev_rx.clone();
        r.connect("ctl", true, &ctl);
        r.connect("pi", false, &dev);
        assert_eq!(
            r.subscribe("ctl", &[("d/+/presence".into(), 1), ("d/#".into(), 0), ("a/#/b".into(), 1)]),
            [1, 0, 0x80]
        );
        assert!(!ctl.trunk.load(Relaxed), "a wildcard subscriber is no trunk: only the controller's account is");
        assert_eq!(r.subscribe("pi", &[("d/pi/desired".into(), 2)]), [1], "QoS 2 is granted as 1");
        r.publish(msg("d/pi/presence", "on", 1, true));
        r.publish(msg("d/pi/desired", "doc", 1, true));
        r.publish(msg("x/y", "nobody", 1, false));
        assert_eq!(
            drain(&ctl_rx),
            [("d/pi/presence".into(), "on".into(), 1, false), ("d/pi/desired".into(), "doc".into(), 0, false)],
            "overlapping subscriptions deliver once, at the highest granted; QoS 0 granted, QoS 0 sent"
        );
        assert_eq!(drain(&dev_rx), [("d/pi/desired".into(), "doc".into(), 1, false)]);
    }

    #[test]
    fn retained_messages_go_to_new_subscriptions_and_an_empty_one_clears_them() {
        let mut r = Router::default();
        r.publish(msg("d/a/presence", "on", 1, true));
        r.publish(msg("d/b/presence", "on", 0, true));
        r.publish(msg("d/c/presence", "on", 1, true));
        r.publish(msg("d/c/presence", "", 1, true));
        let rx = Outbox::new(1, false);
        let ctl = rx.clone();
        r.connect("ctl", true, &ctl);
        r.subscribe("ctl", &[("d/+/presence".into(), 1)]);
        let mut got = drain(&rx);
        got.sort();
        assert_eq!(got, [("d/a/presence".into(), "on".into(), 1, true), ("d/b/presence".into(), "on".into(), 0, true)]);
        // Subscribing again sends them again (MQTT 3.1.1 §3.8.4).
        r.subscribe("ctl", &[("d/a/presence".into(), 1)]);
        assert_eq!(drain(&rx), [("d/a/presence".into(), "on".into(), 1, true)]);
        assert_eq!(r.retained(), 2);
    }

    #[test]
    fn a_session_is_taken_only_by_its_own_kind_of_account() {
        let mut r = Router::default();
        let ctl = Outbox::new(1, false);
        r.connect_as("baton-controller-1", false, Owner::Internal, &ctl).expect("the controller");
        r.subscribe("baton-controller-1", &[("d/+/report".into(), 1)]);
        let pi = Outbox::new(2, false);
        r.connect_as("pi", false, Owner::Device, &pi).expect("a device");
        r.subscribe("pi", &[("d/pi/cmd".into(), 1)]);
        r.disconnected("pi", 2, Vec::new(), 0);
        // A device named like the controller's client, a join token's holder
        // naming a device (online or away): refused, nothing touched.
        let thief = Outbox::new(3, false);
        assert!(r.connect_as("baton-controller-1", false, Owner::Device, &thief).is_none());
        assert!(r.connect_as("pi", false, Owner::Joining, &thief).is_none());
        assert!(r.connect_as("pi", true, Owner::Anyone, &thief).is_none());
        assert!(ctl.closed_for().is_none(), "the controller's connection was cut");
        r.publish(msg("d/pi/cmd", "for pi", 1, false));
        r.publish(msg("d/x/report", "r", 1, false));
        assert!(drain(&thief).is_empty(), "the refused client got messages");
        assert_eq!(drain(&ctl), [("d/x/report".into(), "r".into(), 1, false)]);
        let back = Outbox::new(4, false);
        assert!(r.connect_as("pi", false, Owner::Device, &back).expect("the device itself").session_present);
        assert_eq!(drain(&back), [("d/pi/cmd".into(), "for pi".into(), 1, false)]);
        // A device takes over its own join session, inheriting none of it.
        let joining = Outbox::new(5, false);
        r.connect_as("pi-new", false, Owner::Joining, &joining).expect("a join");
        r.subscribe("pi-new", &[("d/pi-new/enroll-res".into(), 1)]);
        let enrolled = Outbox::new(6, false);
        let c = r.connect_as("pi-new", false, Owner::Device, &enrolled).expect("the enrolled device");
        assert!(!c.session_present && c.replaced.is_some_and(|o| o.id == 5));
    }

    #[test]
    fn a_persistent_session_keeps_its_subscriptions_and_qos1_messages_while_offline() {
        let mut r = Router::default();
        let first = Outbox::new(1, false);
        assert!(!r.connect("pi", false, &first).session_present);
        r.subscribe("pi", &[("d/pi/cmd".into(), 1)]);
        // Connection 1 took a command and went away before acknowledging it.
        r.disconnected("pi", 1, vec![(msg("d/pi/cmd", "unacked", 1, false), 1)], 0);
        r.publish(msg("d/pi/cmd", "while away", 1, false));
        r.publish(msg("d/pi/cmd", "qos0 is not kept", 0, false));
        r.subscribe("pi", &[("d/pi/desired".into(), 1)]);
        r.publish(msg("d/pi/desired", "generation 1", 1, true));
        r.publish(msg("d/pi/desired", "generation 2", 1, true));
        let rx = Outbox::new(2, false);
        let second = rx.clone();
        assert!(r.connect("pi", false, &second).session_present);
        assert_eq!(
            drain(&rx),
            [
                ("d/pi/cmd".into(), "unacked".into(), 1, false),
                ("d/pi/cmd".into(), "while away".into(), 1, false),
                ("d/pi/desired".into(), "generation 2".into(), 1, false)
            ],
            "the newest retained document only"
        );
        r.publish(msg("d/pi/cmd", "live", 1, false));
        assert_eq!(drain(&rx), [("d/pi/cmd".into(), "live".into(), 1, false)]);
        // A clean session starts from nothing.
        let rx = Outbox::new(3, false);
        let third = rx.clone();
        let c = r.connect("pi", true, &third);
        assert!(!c.session_present && c.replaced.is_some_and(|o| o.id == 2));
        r.publish(msg("d/pi/cmd", "no subscription", 1, false));
        assert!(drain(&rx).is_empty());
        r.disconnected("pi", 3, Vec::new(), 0);
        assert_eq!(r.sessions(), 0, "a clean session ends with its connection");
    }

    #[test]
    fn an_offline_session_keeps_a_bounded_number_and_a_taken_over_connection_closes() {
        let mut r = Router::default();
        let first_rx = Outbox::new(1, false);
        let first = first_rx.clone();
        r.connect("pi", false, &first);
        r.subscribe("pi", &[("t".into(), 1)]);
        let rx = Outbox::new(2, false);
        let second = rx.clone();
        r.connect("pi", false, &second);
        assert_eq!(drain(&first_rx), [("CLOSE".into(), "TakenOver".into(), 0, false)]);
        // The old connection's unacked message goes to the new one.
        r.disconnected("pi", 1, vec![(msg("t", "old", 1, false), 1)], 0);
        assert_eq!(drain(&rx), [("t".into(), "old".into(), 1, false)]);
        r.disconnected("pi", 2, Vec::new(), 0);
        for i in 0..OFFLINE_LIMIT + 5 {
            r.publish(msg("t", &i.to_string(), 1, false));
        }
        assert_eq!(r.dropped, 5);
        let rx = Outbox::new(3, false);
        let third = rx.clone();
        r.connect("pi", false, &third);
        let got = drain(&rx);
        assert_eq!((got.len(), got[0].1.as_str()), (OFFLINE_LIMIT, "5"), "the oldest gave way");
        // And by bytes: three 400 KiB messages while away, two kept (1 MiB).
        r.disconnected("pi", 3, Vec::new(), 0);
        let big = "x".repeat(400 << 10);
        for _ in 0..3 {
            r.publish(msg("t", &big, 1, false));
        }
        let fourth = Outbox::new(4, false);
        r.connect("pi", false, &fourth);
        assert_eq!(drain(&fourth).len(), 2);
    }

    #[test]
    fn a_slow_device_is_closed_and_a_full_trunk_makes_publishers_wait() {
        let rx = Outbox::new(1, false);
        let dev = rx.clone();
        let m = msg("t", "x", 1, false);
        for _ in 0..QUEUE_LIMIT {
            assert!(dev.publish(&m, 1, false));
        }
        assert!(!dev.publish(&m, 1, false), "one past the limit");
        assert!(!dev.full(), "a device never makes others wait");
        let got = drain(&rx);
        assert_eq!(got.last().map(|g| g.1.as_str()), Some("SlowConsumer"));
        let rx = Outbox::new(2, true);
        let trunk = rx.clone();
        for _ in 0..=TRUNK_HIGH {
            assert!(trunk.publish(&m, 1, false), "a trunk is not closed below its own limit");
        }
        assert!(trunk.full());
        while rx.try_next().is_some() {}
        assert!(!trunk.full() && trunk.queued.load(Relaxed) == 0);
    }

    #[test]
    fn offline_sessions_expire_with_age_and_the_longest_offline_go_first_past_the_cap() {
        let mut r = Router::default();
        let live = Outbox::new(9, false);
        r.connect("live", false, &live);
        for (i, client) in ["a", "b", "c"].into_iter().enumerate() {
            let o = Outbox::new(i as u64 + 1, false);
            r.connect(client, false, &o);
            r.subscribe(client, &[(format!("d/{client}/cmd"), 1)]);
            r.disconnected(client, i as u64 + 1, Vec::new(), 1_000 * (i as u64 + 1));
        }
        assert_eq!(r.expire(2_000, 10_000, 10), 0, "nothing old enough, under the cap");
        // Past the cap by one: the longest offline ("a") goes, never a live one.
        assert_eq!(r.expire(2_000, 10_000, 3), 1);
        assert!(!r.sessions.contains_key("a") && r.sessions.contains_key("live"));
        assert!(r.publish(msg("d/a/cmd", "x", 1, false)).is_empty() && r.exact.len() == 2);
        // Offline longer than the expiry: "b" (since 2 s) at 12.5 s, then "c".
        assert_eq!(r.expire(12_500, 10_000, 10), 1);
        assert_eq!(r.expire(13_001, 10_000, 10), 1);
        assert_eq!((r.sessions(), r.expired), (1, 3));
        // A session that reconnected is live again whatever its age.
        let o = Outbox::new(20, false);
        r.connect("d", false, &o);
        r.disconnected("d", 20, Vec::new(), 20_000);
        r.connect("d", false, &o);
        assert_eq!(r.expire(1_000_000, 10_000, 0), 0, "a live session expired");
    }

    #[test]
    fn removing_a_session_closes_its_connection_and_drops_its_subscriptions() {
        let mut r = Router::default();
        let rx = Outbox::new(1, false);
        let dev = rx.clone();
        r.connect("pi", false, &dev);
        r.subscribe("pi", &[("t".into(), 1), ("u/+".into(), 1)]);
        r.remove("pi", Close::Revoked);
        assert_eq!(drain(&rx), [("CLOSE".into(), "Revoked".into(), 0, false)]);
        assert!(r.publish(msg("t", "x", 1, false)).is_empty() && r.publish(msg("u/v", "x", 1, false)).is_empty());
        assert!(r.exact.is_empty() && r.wild.is_empty() && r.sessions() == 0);
        r.disconnected("pi", 1, vec![(msg("t", "x", 1, false), 1)], 0);
        assert_eq!(r.sessions(), 0, "a removed session is not brought back");
    }
}
