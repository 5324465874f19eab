//! An edge: event webhooks. Every event the controller records is offered to
//! the webhooks whose patterns match its name (`rollout.*`,
//! `device.offline`, `*`) and whose tenant it belongs to; each webhook has
//! its own thread and bounded queue, so a slow or dead endpoint delays
//! nothing but itself and never the controller. A delivery is a JSON POST
//! signed with the webhook's secret (`X-Baton-Signature: sha256=HEX`,
//! HMAC-SHA256 of the body), retried with capped exponential backoff until
//! the endpoint answers 2xx, in order. A queue that overflows drops its
//! oldest events and counts them; `baton webhook list` shows deliveries,
//! failures, the last error, what waits and what was dropped.
//! `matches`, `check_pattern`, `body`, `signature` and `backoff` are pure.

use std::collections::VecDeque;
use std::sync::atomic::{AtomicBool, Ordering::Relaxed};
use std::sync::{Arc, Condvar, Mutex};
use std::time::Duration;

use crate::fleet::Millis;
use crate::tenant::Scope;
use crate::view::{Event, WebhookView};

/// Events a webhook holds while its endpoint does not answer.
pub const QUEUE: usize = 1000;
/// One POST may take this long.
const TIMEOUT: Duration = Duration::from_secs(10);

/// Whether event `name` (`kind.what`) is one `patterns` asks for.
pub fn matches(patterns: &[String], name: &str) -> bool {
    patterns.iter().any(|p| match p.strip_suffix(".*") {
        _ if p == "*" => true,
        Some(kind) => name.split('.').next() == Some(kind),
        None => p == name,
    })
}

/// `*`, `KIND.*` or `KIND.WHAT`, in a-z and `_`.
pub fn check_pattern(p: &str) -> Result<(), String> {
    let word = |w: &str| !w.is_empty() && w.bytes().all(|b| b.is_ascii_lowercase() || b == b'_');
    let ok = p == "*" || p.split_once('.').is_some_and(|(kind, what)| word(kind) && (what == "*" || word(what)));
    if ok {
        Ok(())
    } else {
        Err(format!("event pattern {p:?}: use *, KIND.* or KIND.WHAT (rollout.*, device.offline)"))
    }
}

/// The JSON a webhook receives for `e`.
pub fn body(e: &Event) -> Vec<u8> {
    serde_json::to_vec(&serde_json::json!({
        "name": e.name,
        "kind": e.kind,
        "subject": e.subject,
        "message": e.message,
        "tenant": e.tenant,
        "at_ms": e.at_ms,
    }))
    .unwrap_or_default()
}

/// `sha256=HEX`: the HMAC-SHA256 of `body` under the webhook's secret.
pub fn signature(secret: &[u8], body: &[u8]) -> String {
    format!("sha256={}", baton_protocol::crypto::hex(&baton_protocol::crypto::hmac_sha256(secret, body)))
}

/// How long to wait before the attempt after `failures` failed ones: 1 s,
/// doubling, at most 5 minutes.
pub fn backoff(failures: u32) -> Duration {
    Duration::from_secs(1u64 << failures.saturating_sub(1).min(9)).min(Duration::from_secs(300))
}

/// What one webhook is and how its deliveries go.
#[derive(Debug, Default)]
struct Shared {
    view: Mutex<WebhookView>,
    queue: Mutex<VecDeque<Event>>,
    wake: Condvar,
    stop: AtomicBool,
}

struct Hook {
    shared: Arc<Shared>,
    thread: Option<std::thread::JoinHandle<()>>,
}

/// Every webhook's queue and delivery thread; owned by the controller,
/// stopped and joined by `stop_all` (at shutdown) or `remove`.
#[derive(Default)]
pub struct Hooks {
    hooks: Mutex<Vec<Hook>>,
}

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(std::sync::PoisonError::into_inner)
}

impl Hooks {
    /// Starts delivering to `view`'s endpoint, signing with `secret`.
    pub fn start(&self, view: WebhookView, secret: Vec<u8>) {
        let shared = Arc::new(Shared { view: Mutex::new(view), ..Shared::default() });
        let worker = shared.clone();
        let thread = std::thread::Builder::new()
            .name("webhook".into())
            .spawn(move || deliver(&worker, &secret))
            .map_err(|e| tracing::error!(error = %e, "cannot start a webhook thread"))
            .ok();
        lock(&self.hooks).push(Hook { shared, thread });
    }

    /// Queues `e` for every webhook that wants it. Never blocks on delivery.
    pub fn offer(&self, e: &Event) {
        for h in lock(&self.hooks).iter() {
            let wanted = {
                let v = lock(&h.shared.view);
                v.tenant.as_ref().is_none_or(|t| *t == e.tenant) && matches(&v.events, &e.name)
            };
            if !wanted {
                continue;
            }
            let mut q = lock(&h.shared.queue);
            if q.len() >= QUEUE {
                q.pop_front();
                lock(&h.shared.view).dropped += 1;
            }
            q.push_back(e.clone());
            h.shared.wake.notify_one();
        }
    }

    /// Every webhook `scope` sees, with its delivery counts and what waits.
    pub fn views(&self, scope: &Scope) -> Vec<WebhookView> {
        lock(&self.hooks)
            .iter()
            .map(|h| WebhookView { queued: lock(&h.shared.queue).len() as u64, ..lock(&h.shared.view).clone() })
            .filter(|v| scope.sees_owned(v.tenant.as_deref()))
            .collect()
    }

    /// Stops and forgets webhook `id` (what it still held is dropped).
    pub fn remove(&self, id: &str) {
        let gone: Vec<Hook> = {
            let mut hooks = lock(&self.hooks);
            let (gone, kept) = std::mem::take(&mut *hooks).into_iter().partition(|h| lock(&h.shared.view).id == id);
            *hooks = kept;
            gone
        };
        gone.into_iter().for_each(stop);
    }

    /// Stops every delivery thread and waits for it (an attempt in flight
    /// ends within its timeout).
    pub fn stop_all(&self) {
        let all = std::mem::take(&mut *lock(&self.hooks));
        all.into_iter().for_each(stop);
    }
}

fn stop(mut h: Hook) {
    h.shared.stop.store(true, Relaxed);
    h.shared.wake.notify_all();
    if let Some(t) = h.thread.take() {
        let _ = t.join();
    }
}

/// The delivery loop of one webhook: the oldest queued event, posted until
/// it is taken, then the next.
fn deliver(shared: &Shared, secret: &[u8]) {
    let agent: ureq::Agent =
        ureq::Agent::config_builder().http_status_as_error(false).timeout_global(Some(TIMEOUT)).build().into();
    let url = lock(&shared.view).url.clone();
    let mut failures = 0u32;
    loop {
        let next = {
            let mut q = lock(&shared.queue);
            while q.is_empty() && !shared.stop.load(Relaxed) {
                q = shared.wake.wait(q).unwrap_or_else(std::sync::PoisonError::into_inner);
            }
            if shared.stop.load(Relaxed) {
                return;
            }
            q.front().cloned()
        };
        let Some(e) = next else { continue };
        let payload = body(&e);
        let sent = agent
            .post(&url)
            .header("Content-Type", "application/json")
            .header("X-Baton-Event", &e.name)
            .header("X-Baton-Signature", &signature(secret, &payload))
            .send(&payload[..]);
        let outcome = match sent {
            Ok(res) if res.status().is_success() => Ok(()),
            Ok(res) => Err(format!("HTTP {}", res.status().as_u16())),
            Err(err) => Err(err.to_string()),
        };
        match outcome {
            Ok(()) => {
                failures = 0;
                lock(&shared.queue).pop_front();
                let mut v = lock(&shared.view);
                v.delivered += 1;
                v.last_error = None;
                v.last_delivered_ms = Some(now_ms());
            }
            Err(why) => {
                failures = failures.saturating_add(1);
                let wait = backoff(failures);
                {
                    let mut v = lock(&shared.view);
                    v.failed_attempts += 1;
                    v.last_error = Some(format!("{why} (retrying in {} s)", wait.as_secs()));
                }
                tracing::warn!(%url, error = %why, retry_in_s = wait.as_secs(), "webhook delivery failed");
                // Wait out the backoff, unless told to stop.
                let q = lock(&shared.queue);
                let _ = shared.wake.wait_timeout_while(q, wait, |_| !shared.stop.load(Relaxed));
            }
        }
    }
}

fn now_ms() -> Millis {
    crate::controller::now_ms()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn patterns() {
        let p = |s: &[&str]| s.iter().map(|x| x.to_string()).collect::<Vec<_>>();
        for (patterns, name, want) in [
            (p(&["*"]), "device.offline", true),
            (p(&["rollout.*"]), "rollout.succeeded", true),
            (p(&["rollout.*"]), "rollouts.x", false),
            (p(&["device.offline"]), "device.offline", true),
            (p(&["device.offline"]), "device.online", false),
            (p(&["device.offline", "workload.*"]), "workload.created", true),
            (p(&[]), "device.offline", false),
        ] {
            assert_eq!(matches(&patterns, name), want, "{patterns:?} {name}");
        }
        for ok in ["*", "rollout.*", "device.offline", "rollout.rolled_back"] {
            assert!(check_pattern(ok).is_ok(), "{ok}");
        }
        for bad in ["", "rollout", "Rollout.*", "*.offline", "device.", "a.b.c", "device offline"] {
            assert!(check_pattern(bad).is_err(), "{bad}");
        }
    }

    #[test]
    fn signature_and_backoff() {
        // RFC 4231, test case 2.
        let sig = signature(b"Jefe", b"what do ya want for nothing?");
        assert_eq!(sig, "sha256=5bdcc146bf60754e6a042426089575c75a003f089d2739839dec58b964ec3843");
        let waits: Vec<u64> = (1..=11).map(|n| backoff(n).as_secs()).collect();
        assert_eq!(waits, [1, 2, 4, 8, 16, 32, 64, 128, 256, 300, 300]);
    }

    #[test]
    fn the_body_is_the_event() {
        let e = Event {
            at_ms: 5,
            kind: "device".into(),
            name: "device.offline".into(),
            subject: "pi-1".into(),
            message: "offline".into(),
            tenant: "acme".into(),
        };
        let v: serde_json::Value = serde_json::from_slice(&body(&e)).unwrap();
        assert_eq!(v["name"], "device.offline");
        assert_eq!(
            (v["subject"].as_str(), v["tenant"].as_str(), v["at_ms"].as_u64()),
            (Some("pi-1"), Some("acme"), Some(5))
        );
    }
}
