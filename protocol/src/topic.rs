//! Topic names under `baton/v1/dev/{id}/…` and the device id they carry.

use std::fmt;

/// Root of every Baton topic; the major protocol version is part of it.
pub const ROOT: &str = "baton/v1";

/// A device id: 1–64 characters of `[A-Za-z0-9._-]`, not starting with `.` or `-`.
///
/// The character set keeps ids safe as MQTT topic levels (no `/`, `+`, `#`),
/// as file names and as MQTT client ids on every broker.
#[derive(Clone, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct DeviceId(String);

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("invalid device id {0:?}: use 1-64 characters of A-Z a-z 0-9 . _ - (not starting with . or -)")]
pub struct InvalidDeviceId(pub String);

impl DeviceId {
    pub const MAX_LEN: usize = 64;

    pub fn new(id: impl Into<String>) -> Result<Self, InvalidDeviceId> {
        let id = id.into();
        let ok = !id.is_empty()
            && id.len() <= Self::MAX_LEN
            && !id.starts_with(['.', '-'])
            && id.bytes().all(|b| b.is_ascii_alphanumeric() || matches!(b, b'.' | b'_' | b'-'));
        if ok {
            Ok(Self(id))
        } else {
            Err(InvalidDeviceId(id))
        }
    }

    pub fn as_str(&self) -> &str {
        &self.0
    }

    /// The topic this device uses for `kind`.
    pub fn topic(&self, kind: TopicKind) -> String {
        format!("{ROOT}/dev/{}/{}", self.0, kind.suffix())
    }
}

impl fmt::Display for DeviceId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

impl std::str::FromStr for DeviceId {
    type Err = InvalidDeviceId;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        Self::new(s)
    }
}

/// The per-device topics. Direction, QoS and retain are part of the contract.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum TopicKind {
    /// agent → controller, QoS 1, retained; also the agent's Last Will (offline).
    Presence,
    /// agent → controller, QoS 1, retained.
    Inventory,
    /// agent → controller, QoS 0.
    Heartbeat,
    /// agent → controller, QoS 1, retained; sent when observed state changes and on connect.
    Report,
    /// controller → agent, QoS 1, retained: the whole desired state.
    Desired,
    /// controller → agent, QoS 1: requests with correlation ids.
    Cmd,
    /// agent → controller, QoS 1: responses to `Cmd`.
    CmdRes,
    /// agent → controller, QoS 1, since 1.2: a join request (`EnrollRequest`),
    /// from a session authenticated with a join token.
    Enroll,
    /// controller → agent, QoS 1, since 1.2: the answer (`EnrollResponse`).
    EnrollRes,
    /// agent → controller, QoS 1, since 1.6: a piece of an agent release (`ReleaseRequest`).
    Release,
    /// controller → agent, QoS 1, since 1.6: the piece (`ReleaseChunk`).
    ReleaseRes,
}

impl TopicKind {
    pub const ALL: [TopicKind; 11] = [
        Self::Presence,
        Self::Inventory,
        Self::Heartbeat,
        Self::Report,
        Self::Desired,
        Self::Cmd,
        Self::CmdRes,
        Self::Enroll,
        Self::EnrollRes,
        Self::Release,
        Self::ReleaseRes,
    ];

    pub fn suffix(self) -> &'static str {
        match self {
            Self::Presence => "presence",
            Self::Inventory => "inventory",
            Self::Heartbeat => "heartbeat",
            Self::Report => "report",
            Self::Desired => "desired",
            Self::Cmd => "cmd",
            Self::CmdRes => "cmd/res",
            Self::Enroll => "enroll",
            Self::EnrollRes => "enroll/res",
            Self::Release => "release",
            Self::ReleaseRes => "release/res",
        }
    }

    /// QoS level the publisher must use (0 or 1).
    pub fn qos(self) -> u8 {
        match self {
            Self::Heartbeat => 0,
            _ => 1,
        }
    }

    /// Whether the publisher sets the retain flag. A device's last report is
    /// retained like its presence: a controller that (re)subscribes after a
    /// broker lost its session learns what every device runs without waiting
    /// for each to change something.
    pub fn retained(self) -> bool {
        matches!(self, Self::Presence | Self::Inventory | Self::Report | Self::Desired)
    }

    /// Filter matching this kind for every device: `baton/v1/dev/+/{suffix}`.
    pub fn filter_all_devices(self) -> String {
        format!("{ROOT}/dev/+/{}", self.suffix())
    }

    /// Splits a topic into device id and kind; `None` for anything that is not
    /// exactly a Baton v1 device topic.
    pub fn parse(topic: &str) -> Option<(DeviceId, TopicKind)> {
        let rest = topic.strip_prefix(ROOT)?.strip_prefix("/dev/")?;
        let (id, suffix) = rest.split_once('/')?;
        let kind = Self::ALL.into_iter().find(|k| k.suffix() == suffix)?;
        Some((DeviceId::new(id).ok()?, kind))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn topics_round_trip_for_every_kind() {
        let id = DeviceId::new("pi-01.site_a").unwrap();
        for kind in TopicKind::ALL {
            let t = id.topic(kind);
            assert_eq!(TopicKind::parse(&t), Some((id.clone(), kind)), "{t}");
        }
    }

    #[test]
    fn device_ids_that_would_break_topics_or_paths_are_refused() {
        for bad in ["", "a/b", "+", "#", "-x", ".x", "..", "a b", "é", &"x".repeat(65)] {
            assert!(DeviceId::new(bad).is_err(), "{bad:?} accepted");
        }
        assert!(DeviceId::new("x".repeat(64)).is_ok());
    }

    #[test]
    fn foreign_topics_do_not_parse() {
        for t in [
            "baton/v2/dev/a/presence",
            "baton/v1/dev/a/unknown",
            "baton/v1/dev/a/presence/extra",
            "baton/v1/dev//presence",
            "baton/v1/devices/a/presence",
            "other",
        ] {
            assert_eq!(TopicKind::parse(t), None, "{t}");
        }
    }
}
