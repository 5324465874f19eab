//! `baton server`: assembles broker, store, ingest, API, and shuts them down in order.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use anyhow::Context;
use baton_protocol::{BrokerNodes, BrokerUrl};

use crate::controller::{now_ms, Controller};
use crate::store::Store;
use crate::{api, broker, ingest};

#[derive(Debug, Clone)]
pub enum BrokerMode {
    /// Run the embedded broker in-process, listening here.
    Embedded(SocketAddr),
    /// Use a broker someone else runs: the nodes of its cluster, tried in
    /// turn (the first while it answers).
    External(BrokerNodes),
}

#[derive(Debug, Clone)]
pub struct ServerConfig {
    pub http_listen: SocketAddr,
    pub broker: BrokerMode,
    pub data_dir: PathBuf,
    /// The database (SQLite in the data dir, or PostgreSQL).
    pub store: crate::store::StoreAt,
    /// A device online but silent for longer is reported `stale`.
    pub stale_after: Duration,
    /// A device silent for longer is `offline`, Last Will or not.
    pub offline_after: Duration,
    /// How often heartbeat-only changes (`last_seen`) are written to the store.
    pub flush_every: Duration,
    /// QoS of the controller's subscriptions (`--ingest-qos`).
    pub ingest_qos: rumqttc::QoS,
    pub max_devices: usize,
    /// An offline device's `replicas` workloads move elsewhere after this long.
    pub reschedule_after: Duration,
    /// Pin image tags to digests at apply.
    pub resolve_digests: bool,
    pub insecure_registries: Vec<String>,
    /// Registry host → (username, password), for resolving private images.
    pub registry_credentials: std::collections::BTreeMap<String, (String, String)>,
    /// Registry host → the CA (PEM) its certificate chains to.
    pub registry_ca: std::collections::BTreeMap<String, Vec<u8>>,
    /// Seed files of the signing and secrets keys (default: created in the data dir).
    pub signing_key: Option<PathBuf>,
    pub secrets_key: Option<PathBuf>,
    /// (username, password) for an external broker that wants them.
    pub broker_credentials: Option<(String, String)>,
    /// The CA file for an external broker's TLS (mqtts://; default: web PKI roots).
    pub broker_ca: Option<PathBuf>,
    /// Embedded broker: every client authenticates (device credentials) and
    /// stays on its own topics.
    pub mqtt_auth: bool,
    /// Operator API tokens required.
    pub api_auth: bool,
    /// The embedded broker speaks MQTT over TLS (certificates from the controller's own CA).
    pub mqtt_tls: bool,
    /// Extra names the MQTT and API server certificates are valid for.
    pub tls_names: Vec<String>,
    /// The API over HTTPS (certificate from the same CA).
    pub api_tls: bool,
    /// Let the embedded broker listen off loopback without `mqtt_auth` and
    /// `mqtt_tls` (a lab network the operator trusts).
    pub allow_insecure_mqtt: bool,
    /// An external Mosquitto whose dynamic-security plugin the controller
    /// keeps device and join accounts in.
    pub broker_dynsec: bool,
    /// HOST:PORT at which the other controllers of a PostgreSQL store reach
    /// this one's API (default: the listen address; this machine's name when
    /// listening on every address). Standbys forward API requests there.
    pub advertise: Option<String>,
}

impl ServerConfig {
    /// Secure by default: what listens off this machine authenticates its
    /// clients and speaks TLS; plain HTTP and plain MQTT stay on loopback.
    pub fn check_exposure(&self) -> Result<(), String> {
        let api_secure = self.api_tls && self.api_auth;
        if !(self.http_listen.ip().is_loopback() || api_secure) {
            return Err(format!(
                "the API on {} would be reachable from other machines without {}: add --api-tls --api-auth, or listen on 127.0.0.1",
                self.http_listen,
                match (self.api_tls, self.api_auth) {
                    (false, false) => "TLS or tokens",
                    (false, true) => "TLS",
                    _ => "tokens",
                }
            ));
        }
        if let BrokerMode::Embedded(addr) = &self.broker {
            let mqtt_secure = self.mqtt_auth && self.mqtt_tls;
            if !(addr.ip().is_loopback() || mqtt_secure || self.allow_insecure_mqtt) {
                return Err(format!(
                    "the embedded MQTT broker on {addr} would let any machine that reaches it {}: add --mqtt-auth --mqtt-tls \
                     (devices join with `baton token create`), or --allow-insecure-mqtt on a network you trust",
                    if self.mqtt_auth { "read the traffic" } else { "speak for any device" }
                ));
            }
        }
        Ok(())
    }

    /// The URL agents on this machine use to reach the broker.
    pub fn broker_url(&self) -> BrokerUrl {
        match &self.broker {
            BrokerMode::Embedded(addr) => {
                let host = if addr.ip().is_unspecified() { "127.0.0.1".to_string() } else { addr.ip().to_string() };
                BrokerUrl { host, port: addr.port(), tls: self.mqtt_tls }
            }
            BrokerMode::External(nodes) => nodes.first().clone(),
        }
    }
}

/// Until the controller holds its store (a standby waiting for it), its
/// API's port forwards each connection's requests to the leader's API (the
/// address the leader recorded in the store), so that any replica serves
/// the API, the CLI and the dashboard, with the leader's state
/// (read-your-writes through any of them). `/healthz` and `/metrics` it
/// answers itself, 503 `{"status":"standby","leader":…}`: load balancers
/// and the CLI tell replicas apart by it, and a scrape of every replica
/// counts the leader's numbers once. While the leader is not known or not
/// reachable, or a forward comes back to this controller (a leader
/// advertising an address that reaches this one), every request gets that
/// 503 with the reason. With `--api-tls` the standby ends TLS with its own
/// certificate and speaks TLS to the leader, whose certificate must chain
/// to the fleet's CA. Stopped through the sender; connections being
/// forwarded then end with the leader's.
#[allow(clippy::type_complexity)]
fn standby_page(
    socket: &std::net::TcpListener,
    tls: Option<StandbyTls>,
    leader: Arc<std::sync::Mutex<Option<String>>>,
) -> anyhow::Result<(tokio::sync::oneshot::Sender<()>, tokio::task::JoinHandle<()>)> {
    let (stop, mut stopped) = tokio::sync::oneshot::channel::<()>();
    let listener = tokio::net::TcpListener::from_std(socket.try_clone()?)?;
    let tls = tls.map(Arc::new);
    // The local addresses of this controller's own forwards: one arriving
    // back here is a loop.
    let forwards = Forwards::default();
    let page = tokio::spawn(async move {
        loop {
            tokio::select! {
                _ = &mut stopped => break,
                accepted = listener.accept() => match accepted {
                    Ok((conn, peer)) => {
                        tokio::spawn(standby_connection(conn, peer, tls.clone(), leader.clone(), forwards.clone()));
                    }
                    // Out of file descriptors, say: the next accept may work.
                    Err(_) => tokio::time::sleep(Duration::from_millis(100)).await,
                },
            }
        }
    });
    Ok((stop, page))
}

/// The local addresses of a standby's forwards to the leader.
type Forwards = Arc<std::sync::Mutex<std::collections::HashSet<SocketAddr>>>;

/// A standby's TLS (`--api-tls`): its own API certificate toward clients,
/// and the fleet's CA to check the leader's.
struct StandbyTls {
    acceptor: tokio_rustls::TlsAcceptor,
    connector: tokio_rustls::TlsConnector,
}

impl StandbyTls {
    fn new(signing_seed: &[u8; 32], server: rustls::ServerConfig) -> anyhow::Result<Self> {
        let mut roots = rustls::RootCertStore::empty();
        roots.add(crate::tls::ca(signing_seed)?.0.der().clone())?;
        let client = crate::tls::trusting(roots)?;
        Ok(Self {
            acceptor: tokio_rustls::TlsAcceptor::from(Arc::new(server)),
            connector: tokio_rustls::TlsConnector::from(Arc::new(client)),
        })
    }
}

/// A byte stream either side of a standby's forward (TCP, or TLS over it).
trait Stream: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin + Send {}
impl<T: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin + Send> Stream for T {}

/// A stream whose first bytes were already read: they are read again first.
struct Replayed {
    first: Vec<u8>,
    at: usize,
    rest: Box<dyn Stream>,
}

impl tokio::io::AsyncRead for Replayed {
    fn poll_read(
        mut self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
        buf: &mut tokio::io::ReadBuf<'_>,
    ) -> std::task::Poll<std::io::Result<()>> {
        if self.at < self.first.len() {
            let n = buf.remaining().min(self.first.len() - self.at);
            let at = self.at;
            buf.put_slice(&self.first[at..at + n]);
            self.at += n;
            return std::task::Poll::Ready(Ok(()));
        }
        std::pin::Pin::new(&mut self.rest).poll_read(cx, buf)
    }
}

impl tokio::io::AsyncWrite for Replayed {
    fn poll_write(
        mut self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
        buf: &[u8],
    ) -> std::task::Poll<std::io::Result<usize>> {
        std::pin::Pin::new(&mut self.rest).poll_write(cx, buf)
    }
    fn poll_flush(
        mut self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<std::io::Result<()>> {
        std::pin::Pin::new(&mut self.rest).poll_flush(cx)
    }
    fn poll_shutdown(
        mut self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<std::io::Result<()>> {
        std::pin::Pin::new(&mut self.rest).poll_shutdown(cx)
    }
}

/// One connection to a standby's API port (see `standby_page`).
async fn standby_connection(
    conn: tokio::net::TcpStream,
    peer: SocketAddr,
    tls: Option<Arc<StandbyTls>>,
    leader: Arc<std::sync::Mutex<Option<String>>>,
    forwards: Forwards,
) {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    const WAIT: Duration = Duration::from_secs(10);
    let _ = conn.set_nodelay(true);
    let mut client: Box<dyn Stream> = match &tls {
        Some(t) => match tokio::time::timeout(WAIT, t.acceptor.accept(conn)).await {
            Ok(Ok(s)) => Box::new(s),
            _ => return,
        },
        None => Box::new(conn),
    };
    // The request line (what was read with it is forwarded or answered too).
    let mut first = Vec::with_capacity(256);
    let read = tokio::time::timeout(WAIT, async {
        let mut buf = [0u8; 256];
        while !first.contains(&b'\n') && first.len() < buf.len() {
            let n = client.read(&mut buf[..256 - first.len()]).await?;
            if n == 0 {
                break;
            }
            first.extend_from_slice(&buf[..n]);
        }
        Ok::<_, std::io::Error>(())
    })
    .await;
    if !matches!(read, Ok(Ok(()))) || first.is_empty() {
        return;
    }
    let line = String::from_utf8_lossy(&first);
    // Its own health and metrics a standby answers itself (a scrape of every
    // replica must not count the leader's numbers three times).
    let own = ["GET /healthz", "HEAD /healthz", "GET /metrics", "HEAD /metrics"];
    let health = own.iter().any(|p| line.starts_with(p) && matches!(line.as_bytes().get(p.len()), Some(b' ' | b'?')));
    let leader = leader.lock().ok().and_then(|l| l.clone());
    let looped = forwards.lock().is_ok_and(|f| f.contains(&peer));
    let why = match &leader {
        _ if health => None,
        _ if looped => Some(format!(
            "the leader records its API at {}, which reaches this standby itself: give each controller --advertise HOST:PORT that the others reach it at",
            leader.as_deref().unwrap_or("?")
        )),
        None => Some("the leading controller's API address is not known yet (a leader older than this version, or none)".to_string()),
        Some(addr) => match tokio::time::timeout(Duration::from_secs(3), leader_connection(addr, tls.as_deref(), &forwards)).await {
            Ok(Ok((mut up, _own))) => {
                if up.write_all(&first).await.is_ok() {
                    let _ = tokio::io::copy_bidirectional(&mut client, &mut up).await;
                }
                return;
            }
            Ok(Err(e)) => Some(format!("cannot reach the leading controller's API at {addr}: {e}")),
            Err(_) => Some(format!("cannot reach the leading controller's API at {addr}: no answer in 3 s")),
        },
    };
    let mut body = serde_json::json!({
        "status": "standby",
        "version": env!("CARGO_PKG_VERSION"),
        "leader": leader,
        "error": "this controller is standing by: another controller holds the store and serves the fleet; this one takes over when that one is gone",
    });
    if let Some(why) = why {
        body["error"] = format!("this controller is standing by and cannot forward to the leader: {why}").into();
    }
    let body = bytes::Bytes::from(body.to_string());
    let service = hyper::service::service_fn(move |req: hyper::Request<hyper::body::Incoming>| {
        let body = body.clone();
        async move {
            // Read what was sent, so that closing does not reset the connection under the answer.
            let _ = axum::body::to_bytes(axum::body::Body::new(req.into_body()), 1 << 20).await;
            axum::http::Response::builder()
                .status(axum::http::StatusCode::SERVICE_UNAVAILABLE)
                .header(axum::http::header::CONTENT_TYPE, "application/json")
                .body(axum::body::Body::from(body))
        }
    });
    let replayed = Replayed { first, at: 0, rest: client };
    let _ = hyper::server::conn::http1::Builder::new()
        .keep_alive(false)
        .serve_connection(hyper_util::rt::TokioIo::new(replayed), service)
        .await;
}

/// One of this standby's forwards, its local address known as its own (a
/// loop) while the forward lasts.
struct OwnForward {
    local: SocketAddr,
    forwards: Forwards,
}

impl Drop for OwnForward {
    fn drop(&mut self) {
        if let Ok(mut f) = self.forwards.lock() {
            f.remove(&self.local);
        }
    }
}

/// A connection to the leader's API (TLS when this standby's is).
async fn leader_connection(
    addr: &str,
    tls: Option<&StandbyTls>,
    forwards: &Forwards,
) -> std::io::Result<(Box<dyn Stream>, OwnForward)> {
    let up = tokio::net::TcpStream::connect(addr).await?;
    let _ = up.set_nodelay(true);
    let own = OwnForward { local: up.local_addr()?, forwards: forwards.clone() };
    if let Ok(mut f) = forwards.lock() {
        f.insert(own.local);
    }
    let up: Box<dyn Stream> = match tls {
        // Any certificate of this fleet's CA is a controller of this fleet
        // (only they hold its key); every one names localhost, which is the
        // name checked, so the advertised host need not be in the leader's
        // --tls-name list.
        Some(t) => {
            let name = rustls::pki_types::ServerName::try_from("localhost").expect("a valid name");
            Box::new(t.connector.connect(name, up).await?)
        }
        None => Box::new(up),
    };
    Ok((up, own))
}

/// HOST:PORT at which the other controllers reach this one's API:
/// `--advertise`, else the listen address (this machine's name in place of
/// an unspecified address).
fn advertised_api(cfg: &ServerConfig, socket: &std::net::TcpListener) -> anyhow::Result<String> {
    if let Some(a) = &cfg.advertise {
        return Ok(a.clone());
    }
    let bound = socket.local_addr()?;
    Ok(if bound.ip().is_unspecified() { format!("{}:{}", hostname(), bound.port()) } else { bound.to_string() })
}

/// This machine's name, for messages that tell controllers apart.
fn hostname() -> String {
    std::fs::read_to_string("/proc/sys/kernel/hostname")
        .map(|h| h.trim().to_string())
        .unwrap_or_else(|_| "controller".into())
}

/// Runs the controller until `shutdown` resolves. Returns the bound HTTP
/// address through `ready` as soon as it serves.
pub async fn serve(
    cfg: ServerConfig,
    shutdown: impl std::future::Future<Output = ()> + Send + 'static,
    ready: Option<tokio::sync::oneshot::Sender<SocketAddr>>,
) -> anyhow::Result<()> {
    cfg.check_exposure().map_err(anyhow::Error::msg)?;
    std::fs::create_dir_all(&cfg.data_dir)
        .with_context(|| format!("cannot create data dir {}", cfg.data_dir.display()))?;
    let _lock = crate::datadir::DataDirLock::take(&cfg.data_dir)?;
    // The API's port, taken before anything else: a standby with a port
    // that is not free says so now, not when it takes over.
    let http_socket = std::net::TcpListener::bind(cfg.http_listen)
        .with_context(|| format!("cannot listen for HTTP on {} (use --listen ADDR)", cfg.http_listen))?;
    http_socket.set_nonblocking(true)?;
    let (outbox_tx, outbox) = tokio::sync::mpsc::unbounded_channel();
    // Where the other replicas reach this one's API, and where this one
    // forwards while it stands by.
    let advertised = advertised_api(&cfg, &http_socket)?;
    let replica = crate::store::Replica { api: Some(advertised.clone()), ..Default::default() };
    let leader_api = replica.leader_api.clone();
    let keys = crate::keys::Keys::load(&cfg.data_dir, cfg.signing_key.as_deref(), cfg.secrets_key.as_deref())?;
    // The API's certificate, served while standing by and then while leading.
    let tls_config =
        if cfg.api_tls { Some(crate::tls::server_config(&keys.signing_seed, &cfg.tls_names)?) } else { None };
    let standby_tls = match &tls_config {
        Some(server) => Some(StandbyTls::new(&keys.signing_seed, server.clone())?),
        None => None,
    };
    let startup = cfg.clone();
    let me_advertised = advertised.clone();
    // A standby's copy of the fleet's CA too (the same bytes on every replica).
    let mut created = keys.created.clone();
    if cfg.mqtt_tls || cfg.api_tls {
        let ca = crate::tls::ca_pem(&keys.signing_seed)?;
        let path = cfg.data_dir.join("ca.crt");
        std::fs::write(&path, ca).context("cannot write ca.crt")?;
        if !created.is_empty() {
            created.push(path); // made from the new keys
        }
    }
    // Opening the store, loading the fleet and signing documents: off the async workers.
    let startup = tokio::task::spawn_blocking(move || -> anyhow::Result<Controller> {
        let cfg = startup;
        let fleet = crate::store::FleetKeys {
            signing: keys.signing_public(),
            secrets_digest: baton_protocol::crypto::hex(
                &ring::digest::digest(&ring::digest::SHA256, &keys.secrets).as_ref()[..8],
            ),
        };
        // On a PostgreSQL store another controller holds, this waits as a
        // standby until that one is gone.
        // A replica refused for other keys leaves no key files of its own
        // behind: the operator's next try with the fleet's files finds the
        // data dir as it was.
        let store = match Store::open_leading(&cfg.store, Some(fleet), replica) {
            Err(e @ crate::store::StoreError::OtherKeys { .. }) if !created.is_empty() => {
                let removed = crate::keys::Keys::forget_created(&created);
                anyhow::bail!("{e} (the key files this start made are removed again: {})", removed.join(", "));
            }
            other => other?,
        };
        let signer = baton_protocol::crypto::SigningKey::from_seed(&keys.signing_seed);
        let commands = crate::commands::CommandRouter::new(outbox_tx.clone(), signer);
        tracing::info!(signing_key = %keys.signing_public(), "desired documents are signed with this key (agents: controller_keys)");
        let liveness = crate::fleet::Liveness {
            stale_after_ms: cfg.stale_after.as_millis() as u64,
            offline_after_ms: cfg.offline_after.as_millis() as u64,
            since_ms: now_ms(),
            broker_started_with_us: matches!(cfg.broker, BrokerMode::Embedded(_)),
        };
        let took_over = store.took_over();
        let mut controller = Controller::new(store, liveness, commands, outbox_tx, keys)?;
        if took_over {
            let me = format!("{}:{}", hostname(), me_advertised);
            controller.record_takeover(&me, now_ms());
        }
        controller.reschedule_after_ms = cfg.reschedule_after.as_millis() as u64;
        if cfg.resolve_digests {
            controller.registry = Some(baton_registry::Client::new(baton_registry::RegistryConfig {
                insecure: cfg.insecure_registries.clone(),
                credentials: cfg.registry_credentials.clone(),
                ca_pem: cfg.registry_ca.clone(),
            }));
        }
        controller.api_auth = cfg.api_auth;
        controller.dynsec = cfg.broker_dynsec;
        if cfg.api_auth {
            controller.ensure_admin_token(&cfg.data_dir.join("admin.token"), now_ms())?;
        }
        // Documents are derived from the store: a controller that stopped between
        // storing a change and publishing its documents publishes them now
        // (unchanged documents are not touched; ingest sends what is queued once connected).
        controller.sync_desired(now_ms());
        Ok(controller)
    });
    // A standby waits in the startup for the store; a stop meanwhile ends it
    // there (the waiting thread cannot be interrupted, so the process exits).
    // Meanwhile the API's port forwards to the leader (`standby_page`).
    let (standby_stop, standby) = standby_page(&http_socket, standby_tls, leader_api)?;
    let mut shutdown = std::pin::pin!(shutdown);
    let controller = tokio::select! {
        started = startup => started??,
        () = &mut shutdown => {
            tracing::info!("stopped before this controller held its store");
            std::process::exit(0);
        }
    };
    let _ = standby_stop.send(());
    let _ = standby.await;
    let controller = Arc::new(controller);
    let (stop_tx, stop_rx) = tokio::sync::watch::channel(false);

    // Where the controller's own client connects, and as whom.
    let (ingest_broker, ingest_credentials, ingest_tls) = match &cfg.broker {
        BrokerMode::Embedded(addr) => {
            let broker = broker::Broker::start(cfg.max_devices + 16, stop_rx.clone())?;
            let _ = controller.broker.set(broker.clone());
            // The controller's own client signs in with a one-time internal
            // account: the broker makes devices wait for that connection
            // (never for another client), and with --mqtt-auth it is the
            // only account that is not a device.
            let password = baton_protocol::crypto::hex(&baton_protocol::crypto::random_seed()?);
            let internal = ("baton-internal".to_string(), password);
            if cfg.mqtt_auth {
                // Devices authenticate on ADDR; the controller connects on a loopback port.
                let loopback = std::net::SocketAddr::from(([127, 0, 0, 1], 0));
                let account = broker::Admission::Account(internal.0.clone(), internal.1.clone());
                let internal_addr = broker.listen(loopback, account, None, stop_rx.clone())?;
                let tls = if cfg.mqtt_tls {
                    Some(crate::tls::server_config(&controller.keys.signing_seed, &cfg.tls_names)?)
                } else {
                    None
                };
                let authority: Arc<dyn broker::access::Authority> = controller.clone();
                broker.listen(*addr, broker::Admission::Devices(authority), tls, stop_rx.clone())?;
                tracing::info!(%addr, "embedded MQTT broker listening: devices authenticate and stay on their own topics");
                (
                    BrokerUrl { host: "127.0.0.1".into(), port: internal_addr.port(), tls: false }.into(),
                    Some(internal),
                    None,
                )
            } else {
                broker.listen(*addr, broker::Admission::Anyone(Some(internal.clone())), None, stop_rx.clone())?;
                tracing::info!(%addr, "embedded MQTT broker listening");
                (cfg.broker_url().into(), Some(internal), None)
            }
        }
        BrokerMode::External(nodes) => {
            // TLS to the nodes given as mqtts://, checked against --broker-ca (or the web PKI).
            let tls = if nodes.all().iter().any(|n| n.tls) {
                Some(Arc::new(crate::tls::client_config(cfg.broker_ca.as_deref(), "--broker-ca", None)?))
            } else {
                None
            };
            (nodes.clone(), cfg.broker_credentials.clone(), tls)
        }
    };
    let listener = tokio::net::TcpListener::from_std(http_socket)?;
    let http_addr = listener.local_addr()?;

    let client_id = format!("baton-controller-{}", std::process::id());
    let ingest = tokio::spawn(ingest::run(
        controller.clone(),
        ingest_broker,
        ingest::BrokerAccess { credentials: ingest_credentials, tls: ingest_tls },
        cfg.ingest_qos,
        client_id,
        outbox,
        stop_rx.clone(),
    ));
    let flusher = tokio::spawn(flush_loop(controller.clone(), cfg.flush_every, stop_rx.clone()));
    let ticker = tokio::spawn(tick_loop(controller.clone(), stop_rx.clone()));

    tracing::info!(
        api = %format!("{}://{http_addr}", if cfg.api_tls { "https" } else { "http" }),
        advertised = %advertised,
        broker = %cfg.broker_url(),
        data = %cfg.data_dir.display(),
        "controller serving (standbys of its store forward API requests to the advertised address)"
    );
    if let Some(ready) = ready {
        let _ = ready.send(http_addr);
    }
    let mut http_stop = stop_rx.clone();
    let router = api::router(controller.clone());
    let stopped = async move {
        let _ = http_stop.changed().await;
    };
    let http = match tls_config {
        Some(config) => {
            let listener = crate::tls::TlsListener::new(listener, config)?;
            tokio::spawn(async move { axum::serve(listener, router).with_graceful_shutdown(stopped).await })
        }
        None => {
            use axum::serve::ListenerExt;
            // Keystrokes and session output are small writes: no Nagle delay.
            let listener = listener.tap_io(|tcp| {
                let _ = tcp.set_nodelay(true);
            });
            tokio::spawn(async move { axum::serve(listener, router).with_graceful_shutdown(stopped).await })
        }
    };

    shutdown.await;
    tracing::info!("shutting down");
    let _ = stop_tx.send(true);
    let _ = ingest.await;
    let _ = flusher.await;
    let _ = ticker.await;
    let _ = tokio::time::timeout(Duration::from_secs(5), http).await;
    // Whatever heartbeats moved since the last flush.
    let c = controller.clone();
    tokio::task::spawn_blocking(move || c.flush_seen(0)).await??;
    // Webhook threads: an attempt in flight ends within its timeout.
    let c = controller.clone();
    tokio::task::spawn_blocking(move || c.webhooks.stop_all()).await?;
    tracing::info!("controller stopped");
    Ok(())
}

async fn flush_loop(controller: Arc<Controller>, every: Duration, mut stop: tokio::sync::watch::Receiver<bool>) {
    let mut since = now_ms();
    let mut tick = tokio::time::interval(every);
    tick.tick().await;
    loop {
        tokio::select! {
            _ = stop.changed() => return,
            _ = tick.tick() => {}
        }
        let started = now_ms();
        // SQLite: off the async workers.
        let c = controller.clone();
        match tokio::task::spawn_blocking(move || c.flush_seen(since)).await {
            Ok(Ok(n)) => {
                since = started;
                tracing::debug!(devices = n, "flushed last_seen");
            }
            Ok(Err(e)) => tracing::error!(error = %e, "cannot flush last_seen; will retry"),
            Err(e) => tracing::error!(error = %e, "the last_seen flush failed; will retry"),
        }
    }
}

/// Rollout gates and grace periods are judged on the clock, twice a second.
async fn tick_loop(controller: Arc<Controller>, mut stop: tokio::sync::watch::Receiver<bool>) {
    let mut tick = tokio::time::interval(Duration::from_millis(500));
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tokio::select! {
            _ = stop.changed() => return,
            _ = tick.tick() => {}
        }
        // Placement and rollout steps take locks and may write SQLite: off the async workers.
        let c = controller.clone();
        let _ = tokio::task::spawn_blocking(move || c.tick(now_ms())).await;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn config(http: &str, mqtt: &str) -> ServerConfig {
        ServerConfig {
            http_listen: http.parse().unwrap(),
            broker: BrokerMode::Embedded(mqtt.parse().unwrap()),
            data_dir: PathBuf::from("/nonexistent"),
            store: crate::store::StoreAt::Sqlite(PathBuf::from("/nonexistent/baton.db")),
            stale_after: Duration::from_secs(60),
            offline_after: Duration::from_secs(120),
            flush_every: Duration::from_secs(30),
            ingest_qos: rumqttc::QoS::AtLeastOnce,
            max_devices: 10,
            reschedule_after: Duration::from_secs(300),
            resolve_digests: false,
            insecure_registries: Vec::new(),
            registry_credentials: Default::default(),
            registry_ca: Default::default(),
            signing_key: None,
            secrets_key: None,
            broker_credentials: None,
            mqtt_auth: false,
            api_auth: false,
            mqtt_tls: false,
            tls_names: Vec::new(),
            api_tls: false,
            allow_insecure_mqtt: false,
            broker_dynsec: false,
            advertise: None,
            broker_ca: None,
        }
    }

    #[test]
    fn loopback_may_be_plain_and_the_network_needs_tls_and_authentication() {
        assert_eq!(config("127.0.0.1:8080", "127.0.0.1:1883").check_exposure(), Ok(()));
        assert_eq!(config("[::1]:8080", "[::1]:1883").check_exposure(), Ok(()));

        let e = config("0.0.0.0:8080", "127.0.0.1:1883").check_exposure().unwrap_err();
        assert!(e.contains("--api-tls --api-auth"), "{e}");
        let tls_only = ServerConfig { api_tls: true, ..config("0.0.0.0:8443", "127.0.0.1:1883") };
        assert!(tls_only.check_exposure().unwrap_err().contains("without tokens"));
        let api = ServerConfig { api_tls: true, api_auth: true, ..config("0.0.0.0:8443", "127.0.0.1:1883") };
        assert_eq!(api.check_exposure(), Ok(()));

        let e = config("127.0.0.1:8080", "0.0.0.0:1883").check_exposure().unwrap_err();
        assert!(e.contains("speak for any device") && e.contains("--mqtt-auth --mqtt-tls"), "{e}");
        let auth_only = ServerConfig { mqtt_auth: true, ..config("127.0.0.1:8080", "0.0.0.0:1883") };
        assert!(auth_only.check_exposure().unwrap_err().contains("read the traffic"));
        let secure = ServerConfig { mqtt_auth: true, mqtt_tls: true, ..config("127.0.0.1:8080", "0.0.0.0:1883") };
        assert_eq!(secure.check_exposure(), Ok(()));
        let lab = ServerConfig { allow_insecure_mqtt: true, ..config("127.0.0.1:8080", "0.0.0.0:1883") };
        assert_eq!(lab.check_exposure(), Ok(()));
        // An external broker is the operator's to secure: the controller only connects to it.
        let external = ServerConfig {
            broker: BrokerMode::External("mqtt://10.0.0.1:1883".parse().unwrap()),
            ..config("127.0.0.1:8080", "0.0.0.0:1")
        };
        assert_eq!(external.check_exposure(), Ok(()));
    }
}
