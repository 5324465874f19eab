//! The embedded broker's front door when `--mqtt-auth` is on. rumqttd has no
//! topic ACLs, so devices never reach it directly: they connect here, where
//! every CONNECT is authenticated (device id + the password issued at
//! enrollment) and every PUBLISH and SUBSCRIBE is checked against the
//! device's own topics before it is passed on. Bytes from the broker go back
//! unchanged. A device that steps outside its topics is disconnected.
//!
//! rumqttd itself listens on loopback with one internal account, which only
//! the gateway and the controller's own client know, so it cannot be used to
//! go around this door.

mod authority;
pub mod wire;

use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicU64, Ordering::Relaxed};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use baton_protocol::{DeviceId, TopicKind};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};

use wire::{Connect, WireError};

/// Largest packet passed through: the broker's payload limit plus headers.
const MAX_PACKET: usize = crate::broker::MAX_PAYLOAD + 4096;
const CONNECT_TIMEOUT: Duration = Duration::from_secs(10);

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
    /// The identity behind a CONNECT, or the CONNACK code refusing it.
    fn authenticate(&self, connect: &Connect) -> Result<Identity, u8>;
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

pub struct Gateway {
    upstream: SocketAddr,
    /// The internal account rumqttd accepts.
    internal: (String, String),
    authority: Arc<dyn Authority>,
    /// Live connections per device, to cut them on revocation.
    live: Mutex<HashMap<String, Vec<tokio::sync::watch::Sender<bool>>>>,
    pub refused_connects: AtomicU64,
    pub denied_packets: AtomicU64,
    /// MQTT over TLS when set.
    tls: Option<tokio_rustls::TlsAcceptor>,
}

impl Gateway {
    pub fn new(upstream: SocketAddr, internal: (String, String), authority: Arc<dyn Authority>) -> Self {
        Self {
            upstream,
            internal,
            authority,
            live: Mutex::new(HashMap::new()),
            refused_connects: AtomicU64::new(0),
            denied_packets: AtomicU64::new(0),
            tls: None,
        }
    }

    /// Speak MQTT over TLS with this configuration.
    pub fn with_tls(mut self, config: rustls::ServerConfig) -> Self {
        self.tls = Some(tokio_rustls::TlsAcceptor::from(Arc::new(config)));
        self
    }

    /// Closes every connection of `device` (after its credentials were revoked).
    pub fn disconnect(&self, device: &str) {
        let mut live = self.live.lock().unwrap_or_else(std::sync::PoisonError::into_inner);
        for stop in live.remove(device).unwrap_or_default() {
            let _ = stop.send(true);
        }
    }

    /// Accepts connections until `stop` changes.
    pub async fn serve(self: Arc<Self>, listener: TcpListener, mut stop: tokio::sync::watch::Receiver<bool>) {
        loop {
            let (stream, peer) = tokio::select! {
                _ = stop.changed() => return,
                accepted = listener.accept() => match accepted {
                    Ok(a) => a,
                    Err(e) => {
                        tracing::warn!(error = %e, "gateway accept failed");
                        tokio::time::sleep(Duration::from_millis(100)).await;
                        continue;
                    }
                },
            };
            // A relay: each side's bytes go on at once (no Nagle wait on the
            // small packets of MQTT: acks, requests, heartbeats).
            let _ = stream.set_nodelay(true);
            let gw = self.clone();
            tokio::spawn(async move {
                let result = match gw.tls.clone() {
                    Some(tls) => match tokio::time::timeout(CONNECT_TIMEOUT, tls.accept(stream)).await {
                        Ok(Ok(s)) => gw.connection(s).await,
                        Ok(Err(e)) => Err(format!("TLS handshake: {e}")),
                        Err(_) => Err("no TLS handshake within 10 s".into()),
                    },
                    None => gw.connection(stream).await,
                };
                if let Err(why) = result {
                    tracing::info!(%peer, %why, "MQTT connection closed by the gateway");
                }
            });
        }
    }

    async fn connection<S>(self: Arc<Self>, mut client: S) -> Result<(), String>
    where
        S: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin + Send,
    {
        let mut buf = Vec::with_capacity(512);
        let (connect_len, connect) = tokio::time::timeout(CONNECT_TIMEOUT, read_connect(&mut client, &mut buf))
            .await
            .map_err(|_| "no CONNECT within 10 s".to_string())??;
        // The authority may read SQLite (join tokens): off the async workers.
        let (gateway, asked) = (self.clone(), connect.clone());
        let admitted = tokio::task::spawn_blocking(move || gateway.admit(&asked)).await;
        let identity = match admitted.unwrap_or(Err(wire::SERVER_UNAVAILABLE)) {
            Ok(i) => i,
            Err(code) => {
                self.refused_connects.fetch_add(1, Relaxed);
                let _ = client.write_all(&wire::connack(code)).await;
                return Err(format!("client {:?} refused (CONNACK {code})", connect.client_id));
            }
        };
        let device = identity.device();
        let mut upstream = TcpStream::connect(self.upstream).await.map_err(|e| format!("broker: {e}"))?;
        let _ = upstream.set_nodelay(true);
        let inner = Connect {
            username: Some(self.internal.0.clone()),
            password: Some(self.internal.1.clone().into_bytes()),
            ..connect
        };
        upstream.write_all(&wire::encode_connect(&inner)).await.map_err(|e| e.to_string())?;
        buf.drain(..connect_len);

        let (stop_tx, mut stop_rx) = tokio::sync::watch::channel(false);
        self.live
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .entry(device.as_str().to_owned())
            .or_default()
            .push(stop_tx);
        let (mut from_client, mut to_client) = tokio::io::split(client);
        let (mut from_broker, mut to_broker) = upstream.into_split();
        let down = tokio::io::copy(&mut from_broker, &mut to_client);
        let up = self.forward(&identity, &mut from_client, &mut to_broker, buf);
        let result = tokio::select! {
            r = up => r,
            r = down => r.map(|_| ()).map_err(|e| e.to_string()),
            _ = stop_rx.changed() => Err("credentials revoked".into()),
        };
        // This session's receiver goes first, so its sender reads as closed.
        drop(stop_rx);
        let mut live = self.live.lock().unwrap_or_else(std::sync::PoisonError::into_inner);
        if let Some(v) = live.get_mut(device.as_str()) {
            v.retain(|s| !s.is_closed());
            if v.is_empty() {
                live.remove(device.as_str());
            }
        }
        result
    }

    /// Authenticates, and checks the Last Will speaks only for the device itself.
    fn admit(&self, connect: &Connect) -> Result<Identity, u8> {
        let identity = self.authority.authenticate(connect)?;
        if let Some((topic, ..)) = &connect.will {
            if !may_publish(&identity, topic) {
                return Err(wire::NOT_AUTHORIZED);
            }
        }
        Ok(identity)
    }

    /// Client → broker, packet by packet, checking publishes and subscriptions.
    async fn forward(
        &self,
        identity: &Identity,
        from: &mut (impl tokio::io::AsyncRead + Unpin),
        to: &mut tokio::net::tcp::OwnedWriteHalf,
        mut buf: Vec<u8>,
    ) -> Result<(), String> {
        let mut chunk = vec![0u8; 16 * 1024];
        loop {
            while let Some((header, total)) = wire::frame(&buf, MAX_PACKET).map_err(|e| e.to_string())? {
                let packet = &buf[..total];
                let allowed = match packet[0] >> 4 {
                    wire::CONNECT => Err("a second CONNECT".to_string()),
                    wire::PUBLISH => wire::publish_topic(packet, header).map_err(|e| e.to_string()).and_then(|t| {
                        if may_publish(identity, &t) {
                            Ok(())
                        } else {
                            Err(format!("publish on {t}"))
                        }
                    }),
                    wire::SUBSCRIBE => {
                        wire::subscribe_filters(packet, header).map_err(|e| e.to_string()).and_then(|fs| {
                            match fs.iter().find(|f| !may_subscribe(identity, f)) {
                                Some(f) => Err(format!("subscribe to {f}")),
                                None => Ok(()),
                            }
                        })
                    }
                    _ => Ok(()),
                };
                if let Err(what) = allowed {
                    self.denied_packets.fetch_add(1, Relaxed);
                    let d = identity.device();
                    tracing::warn!(device = %d, %what, "device stepped outside its topics; disconnected");
                    return Err(format!("denied: {what}"));
                }
                to.write_all(packet).await.map_err(|e| e.to_string())?;
                buf.drain(..total);
            }
            let n = from.read(&mut chunk).await.map_err(|e| e.to_string())?;
            if n == 0 {
                return Ok(());
            }
            buf.extend_from_slice(&chunk[..n]);
        }
    }
}

/// Reads until a whole first packet is in `buf`; it must be a CONNECT.
async fn read_connect(
    client: &mut (impl tokio::io::AsyncRead + Unpin),
    buf: &mut Vec<u8>,
) -> Result<(usize, Connect), String> {
    let mut chunk = [0u8; 1024];
    loop {
        match wire::frame(buf, 64 * 1024) {
            Ok(Some((_, total))) => {
                let c = wire::parse_connect(&buf[..total]).map_err(|e: WireError| e.to_string())?;
                return Ok((total, c));
            }
            Ok(None) => {}
            Err(e) => return Err(e.to_string()),
        }
        let n = client.read(&mut chunk).await.map_err(|e| e.to_string())?;
        if n == 0 {
            return Err("closed before CONNECT".into());
        }
        buf.extend_from_slice(&chunk[..n]);
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
