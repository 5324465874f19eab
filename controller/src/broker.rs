//! The embedded MQTT broker (rumqttd), so one command runs a whole controller.
//!
//! The controller talks to it over TCP like any other client: the ingest code
//! is the same whether the broker is this one or an external Mosquitto/EMQX.
//! rumqttd runs on its own threads with its own runtimes (`Broker::start` blocks).

use std::collections::HashMap;
use std::net::SocketAddr;
use std::time::{Duration, Instant};

use rumqttd::{Config, ConnectionSettings, RouterConfig, ServerSettings};

/// Largest MQTT payload the broker accepts: a max-size desired document plus headroom.
/// The controller's own client accepts more, so an oversize publish can never
/// break the controller's connection, only the sender's.
pub const MAX_PAYLOAD: usize = 300 * 1024;

#[derive(Debug, thiserror::Error)]
pub enum BrokerError {
    #[error(
        "cannot listen for MQTT on {addr} (another broker running? use --mqtt-listen ADDR, or --broker URL to use it)"
    )]
    Bind { addr: SocketAddr, source: std::io::Error },
    #[error("embedded broker did not start listening on {0} within 10 s")]
    NotListening(SocketAddr),
    #[error("cannot start the embedded broker thread: {0}")]
    Thread(std::io::Error),
}

/// `auth`: the one (username, password) the broker accepts; None = anyone.
fn config(listen: SocketAddr, max_connections: usize, auth: Option<(String, String)>) -> Config {
    let connections = ConnectionSettings {
        connection_timeout_ms: 10_000,
        max_payload_size: MAX_PAYLOAD,
        // rumqttd hands a new subscriber only as many retained messages as it
        // has free inflight slots and drops the rest, so the controller's
        // subscription to every device's retained presence needs a wide window.
        max_inflight_count: u16::MAX as usize,
        auth: auth.map(|(u, p)| HashMap::from([(u, p)])),
        external_auth: None,
        dynamic_filters: true,
    };
    let server =
        ServerSettings { name: "baton-v4".into(), listen, tls: None, next_connection_delay_ms: 0, connections };
    Config {
        id: 0,
        router: RouterConfig {
            max_connections,
            max_outgoing_packet_count: 1024,
            // Per-topic in-memory log: small, since Baton keeps no history in the broker.
            max_segment_size: 512 * 1024,
            max_segment_count: 2,
            custom_segment: None,
            initialized_filters: None,
            shared_subscriptions_strategy: Default::default(),
        },
        v4: Some(HashMap::from([("1".to_string(), server)])),
        ..Default::default()
    }
}

/// Starts the broker and returns once it accepts connections.
/// It lives until the process exits (rumqttd has no shutdown).
pub fn start(listen: SocketAddr, max_connections: usize, auth: Option<(String, String)>) -> Result<(), BrokerError> {
    // rumqttd only logs a failed bind from its own thread; check first to say why.
    std::net::TcpListener::bind(listen).map_err(|source| BrokerError::Bind { addr: listen, source })?;
    let mut broker = rumqttd::Broker::new(config(listen, max_connections, auth));
    std::thread::Builder::new()
        .name("mqtt-broker".into())
        .spawn(move || {
            if let Err(e) = broker.start() {
                tracing::error!(error = %e, "embedded broker stopped");
            }
        })
        .map_err(BrokerError::Thread)?;
    let deadline = Instant::now() + Duration::from_secs(10);
    while Instant::now() < deadline {
        if std::net::TcpStream::connect_timeout(&listen, Duration::from_millis(200)).is_ok() {
            if !no_delay_on_listener(listen) {
                tracing::warn!(%listen, "cannot turn off Nagle's algorithm on the embedded broker's sockets: small messages (session keystrokes) may wait up to 40 ms");
            }
            tracing::info!(%listen, "embedded MQTT broker listening");
            return Ok(());
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    Err(BrokerError::NotListening(listen))
}

/// Sets TCP_NODELAY on the broker's listening socket, which every socket it
/// accepts inherits (Linux). rumqttd leaves Nagle's algorithm on, and with
/// the peer's delayed acknowledgements a small publish behind an
/// unacknowledged one waits ~40 ms: every keystroke of a session did. The
/// socket is rumqttd's, in this process: found by its address among our
/// descriptors. False when it was not found.
fn no_delay_on_listener(listen: SocketAddr) -> bool {
    let Ok(fds) = std::fs::read_dir("/proc/self/fd") else { return false };
    let mut found = false;
    for fd in fds.flatten().filter_map(|e| e.file_name().to_str()?.parse::<i32>().ok()) {
        let is_socket =
            std::fs::read_link(format!("/proc/self/fd/{fd}")).is_ok_and(|l| l.to_string_lossy().starts_with("socket:"));
        if !is_socket || !listening_on(fd, listen) {
            continue;
        }
        let one: libc::c_int = 1;
        // SAFETY: setsockopt with a pointer to an int that outlives the call.
        let rc = unsafe {
            libc::setsockopt(
                fd,
                libc::IPPROTO_TCP,
                libc::TCP_NODELAY,
                (&one as *const libc::c_int).cast(),
                std::mem::size_of::<libc::c_int>() as libc::socklen_t,
            )
        };
        found |= rc == 0;
    }
    found
}

/// Whether `fd` is a TCP socket listening on `addr`.
fn listening_on(fd: i32, addr: SocketAddr) -> bool {
    let mut accepting: libc::c_int = 0;
    let mut len = std::mem::size_of::<libc::c_int>() as libc::socklen_t;
    // SAFETY: getsockopt writes at most `len` bytes into `accepting`.
    let rc = unsafe {
        libc::getsockopt(
            fd,
            libc::SOL_SOCKET,
            libc::SO_ACCEPTCONN,
            (&mut accepting as *mut libc::c_int).cast(),
            &mut len,
        )
    };
    if rc != 0 || accepting != 1 {
        return false;
    }
    // SAFETY: sockaddr_storage is plain data; getsockname writes at most `len` bytes.
    let mut storage: libc::sockaddr_storage = unsafe { std::mem::zeroed() };
    let mut len = std::mem::size_of::<libc::sockaddr_storage>() as libc::socklen_t;
    // SAFETY: as above.
    if unsafe { libc::getsockname(fd, (&mut storage as *mut libc::sockaddr_storage).cast(), &mut len) } != 0 {
        return false;
    }
    let port = |p: u16| u16::from_be(p) == addr.port();
    match (storage.ss_family as i32, addr) {
        (libc::AF_INET, SocketAddr::V4(a)) => {
            // SAFETY: the family says the storage holds a sockaddr_in.
            let sin = unsafe { &*(&storage as *const libc::sockaddr_storage).cast::<libc::sockaddr_in>() };
            port(sin.sin_port) && u32::from_be(sin.sin_addr.s_addr) == u32::from(*a.ip())
        }
        (libc::AF_INET6, SocketAddr::V6(a)) => {
            // SAFETY: the family says the storage holds a sockaddr_in6.
            let sin6 = unsafe { &*(&storage as *const libc::sockaddr_storage).cast::<libc::sockaddr_in6>() };
            port(sin6.sin6_port) && sin6.sin6_addr.s6_addr == a.ip().octets()
        }
        _ => false,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sockets_accepted_by_a_listener_found_by_its_address_have_no_nagle_delay() {
        let nodelay = |fd: i32| {
            let mut v: libc::c_int = 0;
            let mut len = std::mem::size_of::<libc::c_int>() as libc::socklen_t;
            // SAFETY: getsockopt writes one int.
            unsafe {
                libc::getsockopt(
                    fd,
                    libc::IPPROTO_TCP,
                    libc::TCP_NODELAY,
                    (&mut v as *mut libc::c_int).cast(),
                    &mut len,
                )
            };
            v
        };
        let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let other = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let addr = listener.local_addr().unwrap();
        assert!(no_delay_on_listener(addr), "the listener was not found");
        assert!(!no_delay_on_listener("127.0.0.1:1".parse().unwrap()), "found a listener that is not there");
        let _a = std::net::TcpStream::connect(addr).unwrap();
        let _b = std::net::TcpStream::connect(other.local_addr().unwrap()).unwrap();
        let (accepted, _) = listener.accept().unwrap();
        let (untouched, _) = other.accept().unwrap();
        use std::os::fd::AsRawFd;
        assert_eq!(nodelay(accepted.as_raw_fd()), 1);
        assert_eq!(nodelay(untouched.as_raw_fd()), 0, "another listener was changed");
    }
}
