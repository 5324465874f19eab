//! Health probes: exec inside the container, TCP connect, HTTP GET. The
//! tracker (when to probe, what a run of results means) is pure; the checks
//! are I/O and run on their own threads so a slow probe stalls nothing else.

use std::io::{Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::time::Duration;

use baton_protocol::spec::{Probe, ProbeCheck};

use crate::runtime::ContainerRuntime;

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Outcome {
    Success,
    Failure(String),
}

/// Runs one check against one container. Implementations must be cheap to
/// share across threads.
pub trait Prober: Send + Sync + 'static {
    fn probe(&self, container: &str, check: &ProbeCheck, timeout: Duration) -> Outcome;

    /// True when `probe` answers at once without I/O (a fake): the
    /// supervisor then calls it on its own thread instead of starting one.
    fn inline(&self) -> bool {
        false
    }
}

/// The real prober: TCP and HTTP from the host (containers probed this way use
/// host networking), exec through the runtime's helper.
pub struct RuntimeProber<R>(pub R);

impl<R: ContainerRuntime + Send + Sync + 'static> Prober for RuntimeProber<R> {
    fn probe(&self, container: &str, check: &ProbeCheck, timeout: Duration) -> Outcome {
        match check {
            ProbeCheck::Tcp { port } => tcp(self.at(container, *port), timeout),
            ProbeCheck::Http { port, path } => http(self.at(container, *port), path, timeout),
            ProbeCheck::Exec(argv) => match self.0.exec(container, argv, timeout) {
                Ok(out) if out.code == 0 => Outcome::Success,
                Ok(out) => Outcome::Failure(format!(
                    "exec {:?} exited {}: {}",
                    argv,
                    out.code,
                    String::from_utf8_lossy(&out.stderr).trim().chars().take(200).collect::<String>()
                )),
                Err(e) => Outcome::Failure(e.to_string()),
            },
        }
    }
}

impl<R: ContainerRuntime> RuntimeProber<R> {
    /// Where a container's port is reached from the host: its own address
    /// when it has a network of its own (bridge), else loopback.
    fn at(&self, container: &str, port: u16) -> SocketAddr {
        SocketAddr::new(self.0.address(container).unwrap_or(std::net::Ipv4Addr::LOCALHOST.into()), port)
    }
}

pub fn tcp(addr: SocketAddr, timeout: Duration) -> Outcome {
    let port = addr.port();
    match TcpStream::connect_timeout(&addr, timeout) {
        Ok(_) => Outcome::Success,
        Err(e) => Outcome::Failure(format!("tcp :{port}: {e}")),
    }
}

/// HTTP/1.0 GET; any 2xx or 3xx status is healthy, as in Kubernetes.
pub fn http(addr: SocketAddr, path: &str, timeout: Duration) -> Outcome {
    let port = addr.port();
    let attempt = || -> std::io::Result<u16> {
        let mut s = TcpStream::connect_timeout(&addr, timeout)?;
        s.set_read_timeout(Some(timeout))?;
        s.set_write_timeout(Some(timeout))?;
        // One write: some servers answer (and close) after the first segment.
        let request = format!("GET {path} HTTP/1.0\r\nHost: {addr}\r\nUser-Agent: baton-probe\r\n\r\n");
        s.write_all(request.as_bytes())?;
        let mut head = [0u8; 64];
        let mut n = 0;
        while n < 12 {
            let r = s.read(&mut head[n..])?;
            if r == 0 {
                break;
            }
            n += r;
        }
        parse_status(&head[..n])
            .ok_or_else(|| std::io::Error::new(std::io::ErrorKind::InvalidData, "not an HTTP response"))
    };
    match attempt() {
        Ok(code) if (200..400).contains(&code) => Outcome::Success,
        Ok(code) => Outcome::Failure(format!("http :{port}{path}: status {code}")),
        Err(e) => Outcome::Failure(format!("http :{port}{path}: {e}")),
    }
}

fn parse_status(head: &[u8]) -> Option<u16> {
    let line = std::str::from_utf8(head.get(..12)?).ok()?;
    let rest = line.strip_prefix("HTTP/1.")?;
    rest.get(2..5)?.parse().ok()
}

/// One probe's schedule and verdict for one container instance.
#[derive(Debug, Clone)]
pub struct Tracker {
    pub probe: Probe,
    next_at_ms: u64,
    failures: u32,
    in_flight: bool,
    /// `None` until the first verdict.
    pub healthy: Option<bool>,
    pub last_failure: Option<String>,
}

impl Tracker {
    pub fn new(probe: Probe, started_ms: u64) -> Self {
        let next_at_ms = started_ms + u64::from(probe.initial_delay_s) * 1000;
        Self { probe, next_at_ms, failures: 0, in_flight: false, healthy: None, last_failure: None }
    }

    pub fn timeout(&self) -> Duration {
        Duration::from_secs(u64::from(self.probe.timeout_s.max(1)))
    }

    /// True (and marks the probe in flight) when a run should start now.
    pub fn start_if_due(&mut self, now_ms: u64) -> bool {
        if self.in_flight || now_ms < self.next_at_ms {
            return false;
        }
        self.in_flight = true;
        true
    }

    /// Records a result; returns true when this result turned the verdict to unhealthy.
    pub fn record(&mut self, outcome: Outcome, now_ms: u64) -> bool {
        self.in_flight = false;
        self.next_at_ms = now_ms + u64::from(self.probe.interval_s.max(1)) * 1000;
        match outcome {
            Outcome::Success => {
                self.failures = 0;
                self.healthy = Some(true);
                false
            }
            Outcome::Failure(why) => {
                self.failures = self.failures.saturating_add(1);
                self.last_failure = Some(why);
                let was = self.healthy;
                if self.failures >= self.probe.failure_threshold.max(1) {
                    self.healthy = Some(false);
                }
                self.healthy == Some(false) && was != Some(false)
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn probe(threshold: u32) -> Probe {
        Probe {
            check: ProbeCheck::Tcp { port: 1 },
            interval_s: 2,
            timeout_s: 1,
            failure_threshold: threshold,
            initial_delay_s: 5,
        }
    }

    #[test]
    fn tracker_waits_for_the_initial_delay_and_the_threshold() {
        let mut t = Tracker::new(probe(3), 1_000);
        assert!(!t.start_if_due(5_999));
        assert!(t.start_if_due(6_000));
        assert!(!t.start_if_due(6_001), "two runs in flight");
        assert!(!t.record(Outcome::Failure("x".into()), 6_100));
        assert_eq!(t.healthy, None);
        assert!(!t.start_if_due(8_099));
        assert!(t.start_if_due(8_100));
        assert!(!t.record(Outcome::Failure("x".into()), 8_100));
        assert!(t.start_if_due(10_100));
        assert!(t.record(Outcome::Failure("refused".into()), 10_100), "third failure must flip the verdict");
        assert_eq!((t.healthy, t.last_failure.as_deref()), (Some(false), Some("refused")));
        assert!(t.start_if_due(12_100));
        assert!(!t.record(Outcome::Failure("x".into()), 12_100), "already unhealthy: no second transition");
        assert!(t.start_if_due(14_100));
        t.record(Outcome::Success, 14_100);
        assert_eq!(t.healthy, Some(true));
    }

    #[test]
    fn tcp_and_http_checks_against_real_sockets() {
        let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let port = listener.local_addr().unwrap().port();
        // Answers 200 for /ok and 503 for anything else, after reading the whole request head.
        let server = std::thread::spawn(move || {
            for conn in listener.incoming().take(3) {
                let mut conn = conn.unwrap();
                let mut req = Vec::new();
                let mut buf = [0u8; 512];
                while !req.windows(4).any(|w| w == b"\r\n\r\n") {
                    match conn.read(&mut buf) {
                        Ok(0) | Err(_) => break,
                        Ok(n) => req.extend_from_slice(&buf[..n]),
                    }
                }
                let status = if req.starts_with(b"GET /ok ") { "200 OK" } else { "503 Service Unavailable" };
                let _ = conn.write_all(format!("HTTP/1.1 {status}\r\nContent-Length: 0\r\n\r\n").as_bytes());
            }
        });
        let t = Duration::from_secs(2);
        let at = |port| SocketAddr::from(([127, 0, 0, 1], port));
        assert_eq!(tcp(at(port), t), Outcome::Success);
        assert_eq!(http(at(port), "/ok", t), Outcome::Success);
        assert!(matches!(http(at(port), "/healthz", t), Outcome::Failure(m) if m.contains("status 503")));
        server.join().unwrap();
        let closed = std::net::TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap().port();
        assert!(matches!(tcp(at(closed), t), Outcome::Failure(_)));
        assert_eq!(parse_status(b"HTTP/1.0 302 Found"), Some(302));
        assert_eq!(parse_status(b"SSH-2.0-Open"), None);
    }
}
