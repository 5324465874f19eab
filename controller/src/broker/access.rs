//! Who may connect to the embedded broker with `--mqtt-auth`, and what each
//! may do there: a device publishes only its own state and subscribes only
//! to its own documents and commands; a joining device only asks to enroll.

use baton_protocol::{DeviceId, TopicKind};

use super::wire::Connect;

/// Who a connection is, once authenticated.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Identity {
    Device(DeviceId),
    /// Admitted with a join token: may only ask to enroll, and hear the answer.
    Joining(DeviceId),
}

impl Identity {
    pub fn device(&self) -> &DeviceId {
        match self {
            Self::Device(d) | Self::Joining(d) => d,
        }
    }
}

/// Decides who may connect.
pub trait Authority: Send + Sync + 'static {
    /// The identity behind a CONNECT, or the CONNACK code refusing it and why.
    fn authenticate(&self, connect: &Connect) -> Result<Identity, (u8, &'static str)>;

    /// The broker refused an admitted client a step (a topic outside its
    /// own, another account's session): the authority says so where
    /// operators look. May block (called off the async workers).
    fn denied(&self, _client: &str, _what: &str) {}
}

/// Topics a device publishes on: its own state, nothing else.
pub fn may_publish(identity: &Identity, topic: &str) -> bool {
    let Some((d, kind)) = TopicKind::parse(topic) else { return false };
    match identity {
        Identity::Device(id) => {
            d == *id
                && matches!(
                    kind,
                    TopicKind::Presence
                        | TopicKind::Inventory
                        | TopicKind::Heartbeat
                        | TopicKind::Report
                        | TopicKind::CmdRes
                        | TopicKind::Release
                )
        }
        Identity::Joining(id) => d == *id && kind == TopicKind::Enroll,
    }
}

/// Filters a device subscribes to: exactly its own documents, commands and
/// pieces of agent builds (no wildcards).
pub fn may_subscribe(identity: &Identity, filter: &str) -> bool {
    match identity {
        Identity::Device(id) => {
            [TopicKind::Desired, TopicKind::Cmd, TopicKind::ReleaseRes].into_iter().any(|k| filter == id.topic(k))
        }
        Identity::Joining(id) => filter == id.topic(TopicKind::EnrollRes),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_device_speaks_only_for_itself() {
        let a = Identity::Device(DeviceId::new("pi-a").unwrap());
        for kind in ["presence", "inventory", "heartbeat", "report", "cmd/res"] {
            assert!(may_publish(&a, &format!("baton/v1/dev/pi-a/{kind}")), "{kind}");
            assert!(!may_publish(&a, &format!("baton/v1/dev/pi-b/{kind}")), "{kind}");
        }
        for t in ["baton/v1/dev/pi-a/desired", "baton/v1/dev/pi-a/cmd", "baton/v1/dev/pi-a/other", "x", "#"] {
            assert!(!may_publish(&a, t), "{t}");
        }
        assert!(may_subscribe(&a, "baton/v1/dev/pi-a/desired") && may_subscribe(&a, "baton/v1/dev/pi-a/cmd"));
        for f in [
            "baton/v1/dev/pi-b/desired",
            "baton/v1/dev/+/desired",
            "#",
            "baton/v1/dev/pi-a/#",
            "baton/v1/dev/pi-a/report",
        ] {
            assert!(!may_subscribe(&a, f), "{f}");
        }
    }

    #[test]
    fn a_joining_device_may_only_ask_to_enroll_and_hear_the_answer() {
        let j = Identity::Joining(DeviceId::new("pi-j").unwrap());
        assert!(may_publish(&j, "baton/v1/dev/pi-j/enroll"));
        assert!(may_subscribe(&j, "baton/v1/dev/pi-j/enroll/res"));
        for t in [
            "baton/v1/dev/pi-j/presence",
            "baton/v1/dev/pi-j/report",
            "baton/v1/dev/pi-k/enroll",
            "baton/v1/dev/pi-j/enroll/res",
        ] {
            assert!(!may_publish(&j, t), "{t}");
        }
        for f in [
            "baton/v1/dev/pi-j/desired",
            "baton/v1/dev/pi-j/cmd",
            "baton/v1/dev/+/enroll/res",
            "baton/v1/dev/pi-k/enroll/res",
        ] {
            assert!(!may_subscribe(&j, f), "{f}");
        }
        // An enrolled device no longer speaks on the enrollment topics.
        let d = Identity::Device(DeviceId::new("pi-j").unwrap());
        assert!(!may_publish(&d, "baton/v1/dev/pi-j/enroll") && !may_subscribe(&d, "baton/v1/dev/pi-j/enroll/res"));
    }
}
