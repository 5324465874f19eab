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
    #[error("cannot listen for MQTT on {addr}: {source} (another broker running? use --mqtt-listen ADDR, or --broker URL to use it)")]
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
            tracing::info!(%listen, "embedded MQTT broker listening");
            return Ok(());
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    Err(BrokerError::NotListening(listen))
}
