//! Counters the controller exposes on `/metrics` (Prometheus text format).
//! Plain atomics: ingest bumps them on the hot path without locks.

use std::fmt::Write;
use std::sync::atomic::{AtomicU64, Ordering::Relaxed};

use baton_protocol::TopicKind;

/// Why a message from the broker was not used.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Rejection {
    /// Not a Baton device topic, or a device id that is not valid.
    BadTopic,
    /// The payload is larger than its kind allows.
    Oversize,
    /// A protocol major version this controller does not speak.
    WrongVersion,
    /// Undecodable bytes (bad envelope or body, wrong kind for the topic).
    Malformed,
    /// A heartbeat, report or result from a device that never registered.
    UnknownDevice,
}

impl Rejection {
    pub const ALL: [Rejection; 5] =
        [Self::BadTopic, Self::Oversize, Self::WrongVersion, Self::Malformed, Self::UnknownDevice];

    pub fn as_str(self) -> &'static str {
        match self {
            Self::BadTopic => "bad_topic",
            Self::Oversize => "oversize",
            Self::WrongVersion => "wrong_version",
            Self::Malformed => "malformed",
            Self::UnknownDevice => "unknown_device",
        }
    }
}

#[derive(Default)]
pub struct Metrics {
    received: [AtomicU64; TopicKind::ALL.len()],
    rejected: [AtomicU64; 5],
    pub store_writes: AtomicU64,
    pub store_errors: AtomicU64,
    pub broker_connects: AtomicU64,
}

fn topic_index(kind: TopicKind) -> usize {
    TopicKind::ALL.iter().position(|k| *k == kind).unwrap_or(0)
}

impl Metrics {
    pub fn received(&self, kind: TopicKind) {
        self.received[topic_index(kind)].fetch_add(1, Relaxed);
    }

    pub fn received_count(&self, kind: TopicKind) -> u64 {
        self.received[topic_index(kind)].load(Relaxed)
    }

    pub fn rejected(&self, why: Rejection) {
        self.rejected[why as usize].fetch_add(1, Relaxed);
    }

    pub fn rejected_count(&self, why: Rejection) -> u64 {
        self.rejected[why as usize].load(Relaxed)
    }

    /// Renders every counter; `devices` is (status, count) for the gauge.
    pub fn render(&self, devices: &[(&str, usize)]) -> String {
        let mut out = String::new();
        out.push_str("# HELP baton_mqtt_messages_total Device messages accepted, by topic kind.\n");
        out.push_str("# TYPE baton_mqtt_messages_total counter\n");
        for kind in TopicKind::ALL {
            let _ =
                writeln!(out, "baton_mqtt_messages_total{{kind=\"{}\"}} {}", kind.suffix(), self.received_count(kind));
        }
        out.push_str("# HELP baton_mqtt_rejected_total Device messages refused, by reason.\n");
        out.push_str("# TYPE baton_mqtt_rejected_total counter\n");
        for why in Rejection::ALL {
            let _ =
                writeln!(out, "baton_mqtt_rejected_total{{reason=\"{}\"}} {}", why.as_str(), self.rejected_count(why));
        }
        for (name, help, v) in [
            ("baton_store_writes_total", "Rows written to the store.", &self.store_writes),
            ("baton_store_errors_total", "Failed store writes.", &self.store_errors),
            ("baton_broker_connects_total", "Connections the controller made to the broker.", &self.broker_connects),
        ] {
            let _ = writeln!(out, "# HELP {name} {help}\n# TYPE {name} counter\n{name} {}", v.load(Relaxed));
        }
        out.push_str("# HELP baton_devices Devices known, by status.\n# TYPE baton_devices gauge\n");
        for (status, n) in devices {
            let _ = writeln!(out, "baton_devices{{status=\"{status}\"}} {n}");
        }
        out
    }
}
