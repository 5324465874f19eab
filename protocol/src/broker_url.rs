//! `mqtt://host[:port]` and `mqtts://host[:port]` (TLS) addresses of brokers, parsed once at the edge.
//! Pure string handling; both agent and controller take it from config.

use std::fmt;

pub const DEFAULT_MQTT_PORT: u16 = 1883;
pub const DEFAULT_MQTTS_PORT: u16 = 8883;

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct BrokerUrl {
    pub host: String,
    pub port: u16,
    /// `mqtts://`: MQTT over TLS.
    pub tls: bool,
}

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("invalid broker URL {url:?}: {reason} (expected mqtt://HOST[:PORT] or mqtts://HOST[:PORT], e.g. mqtt://127.0.0.1:1883)")]
pub struct InvalidBrokerUrl {
    pub url: String,
    pub reason: &'static str,
}

impl std::str::FromStr for BrokerUrl {
    type Err = InvalidBrokerUrl;

    fn from_str(url: &str) -> Result<Self, Self::Err> {
        let bad = |reason| InvalidBrokerUrl { url: url.to_string(), reason };
        let (rest, tls) = match url.split_once("://") {
            Some((scheme, rest)) => match scheme.to_ascii_lowercase().as_str() {
                "mqtt" | "tcp" => (rest, false),
                "mqtts" | "ssl" => (rest, true),
                _ => return Err(bad("unknown scheme")),
            },
            None => (url, false),
        };
        let rest = rest.trim_end_matches('/');
        if rest.contains(|c: char| c.is_whitespace() || c == ';') {
            return Err(bad("a space or ';' in it (separate the nodes of a cluster with commas)"));
        }
        if rest.contains('/') || rest.contains('@') {
            return Err(bad("paths and credentials do not belong in the URL"));
        }
        let (host, port) = if let Some(v6) = rest.strip_prefix('[') {
            let (host, tail) = v6.split_once(']').ok_or_else(|| bad("unclosed '['"))?;
            let port = match tail {
                "" => None,
                _ => Some(tail.strip_prefix(':').ok_or_else(|| bad("only ':PORT' may follow ']'"))?),
            };
            (host, port)
        } else {
            let (host, port) = match rest.rsplit_once(':') {
                Some((h, p)) => (h, Some(p)),
                None => (rest, None),
            };
            if host.contains(':') {
                return Err(bad("an IPv6 address needs brackets, as in mqtt://[fd00::2]:1883"));
            }
            (host, port)
        };
        if host.is_empty() {
            return Err(bad("missing host"));
        }
        let port = match port {
            Some(p) => p.parse().ok().filter(|p| *p != 0).ok_or_else(|| bad("port must be 1-65535"))?,
            None if tls => DEFAULT_MQTTS_PORT,
            None => DEFAULT_MQTT_PORT,
        };
        Ok(Self { host: host.to_string(), port, tls })
    }
}

/// One broker, or the nodes of one broker cluster (`URL,URL,…`), tried in
/// turn: the first while it answers, then the next. Never empty.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct BrokerNodes(Vec<BrokerUrl>);

impl BrokerNodes {
    /// The node tried first.
    pub fn first(&self) -> &BrokerUrl {
        &self.0[0]
    }

    pub fn all(&self) -> &[BrokerUrl] {
        &self.0
    }

    /// The node after `i` (round the list).
    pub fn next_after(&self, i: usize) -> usize {
        (i + 1) % self.0.len()
    }
}

impl From<BrokerUrl> for BrokerNodes {
    fn from(url: BrokerUrl) -> Self {
        Self(vec![url])
    }
}

impl std::str::FromStr for BrokerNodes {
    type Err = InvalidBrokerUrl;

    fn from_str(list: &str) -> Result<Self, Self::Err> {
        let mut nodes = Vec::new();
        for entry in list.split(',').map(str::trim) {
            if entry.is_empty() {
                return Err(InvalidBrokerUrl {
                    url: list.to_string(),
                    reason: "an empty entry in a list of broker nodes",
                });
            }
            let url: BrokerUrl = entry.parse()?;
            if nodes.contains(&url) {
                return Err(InvalidBrokerUrl { url: list.to_string(), reason: "a broker node listed twice" });
            }
            nodes.push(url);
        }
        Ok(Self(nodes))
    }
}

impl fmt::Display for BrokerNodes {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        for (i, url) in self.0.iter().enumerate() {
            if i > 0 {
                f.write_str(",")?;
            }
            write!(f, "{url}")?;
        }
        Ok(())
    }
}

impl fmt::Display for BrokerUrl {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let scheme = if self.tls { "mqtts" } else { "mqtt" };
        if self.host.contains(':') {
            write!(f, "{scheme}://[{}]:{}", self.host, self.port)
        } else {
            write!(f, "{scheme}://{}:{}", self.host, self.port)
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn lists_of_nodes_are_read_in_order_and_bad_entries_named() {
        let nodes: BrokerNodes = "mqtts://b1:8883, mqtts://[::1]:8883,b3".parse().unwrap();
        assert_eq!(nodes.to_string(), "mqtts://b1:8883,mqtts://[::1]:8883,mqtt://b3:1883");
        assert_eq!(nodes.first().host, "b1");
        assert_eq!("MQTTS://Up:1".parse::<BrokerUrl>().unwrap().to_string(), "mqtts://Up:1");
        assert_eq!((nodes.next_after(0), nodes.next_after(2)), (1, 0));
        let one: BrokerNodes = "mqtt://solo".parse().unwrap();
        assert_eq!((one.all().len(), one.next_after(0)), (1, 0));
        for (bad, why) in [
            ("mqtt://a,,mqtt://b", "an empty entry"),
            ("mqtt://a,", "an empty entry"),
            ("", "an empty entry"),
            ("mqtt://a,ftp://b", "unknown scheme"),
            ("mqtt://a:1883,a", "listed twice"),
            ("mqtt://a mqtt://b", "separate the nodes of a cluster with commas"),
            ("mqtt://a;mqtt://b", "separate the nodes of a cluster with commas"),
            ("mqtt://::1", "needs brackets"),
            ("mqtt://fd00::2:1883", "needs brackets"),
            ("mqtt://[::1]junk", "only ':PORT' may follow ']'"),
        ] {
            let e = bad.parse::<BrokerNodes>().unwrap_err().to_string();
            assert!(e.contains(why), "{bad:?}: {e}");
        }
    }

    #[test]
    fn parses_the_forms_operators_write() {
        let p = |s: &str| s.parse::<BrokerUrl>().map(|u| (u.host, u.port));
        assert_eq!(p("mqtt://127.0.0.1:1884"), Ok(("127.0.0.1".into(), 1884)));
        assert_eq!(p("mqtt://broker.lan"), Ok(("broker.lan".into(), 1883)));
        assert_eq!(p("broker.lan:2000"), Ok(("broker.lan".into(), 2000)));
        assert_eq!(p("tcp://[::1]:1885/"), Ok(("::1".into(), 1885)));
        let tls = "mqtts://broker.lan".parse::<BrokerUrl>().unwrap();
        assert_eq!((tls.port, tls.tls, tls.to_string().as_str()), (8883, true, "mqtts://broker.lan:8883"));
        for bad in ["http://x", "mqtt://", "mqtt://x:0", "mqtt://x:99999", "mqtt://u:p@x", "mqtts://"] {
            assert!(bad.parse::<BrokerUrl>().is_err(), "{bad}");
        }
    }
}
