//! MQTT over TLS on the gateway (`--mqtt-tls`). The certificate authority is
//! made from the controller's Ed25519 signing key, so the one key an agent
//! trusts for documents is also its TLS trust anchor: an agent accepts the
//! gateway's certificate when it chains to a CA whose key is a controller key
//! it trusts (`baton-agent`'s `tls` module). The CA certificate is
//! deterministic (fixed fields, deterministic Ed25519 signature), so it is the
//! same bytes on every start; the server certificate (ECDSA P-256) is made
//! fresh at each start for the configured names.

use std::sync::Arc;

use rcgen::{BasicConstraints, CertificateParams, DistinguishedName, DnType, IsCa, KeyPair, KeyUsagePurpose, SanType};

/// PKCS#8 v1 (RFC 8410) for an Ed25519 seed.
fn ed25519_pkcs8(seed: &[u8; 32]) -> Vec<u8> {
    let mut der = vec![0x30, 0x2e, 0x02, 0x01, 0x00, 0x30, 0x05, 0x06, 0x03, 0x2b, 0x65, 0x70, 0x04, 0x22, 0x04, 0x20];
    der.extend_from_slice(seed);
    der
}

/// Valid from the Unix epoch: a device without a real-time clock may boot at
/// its image's build date, or at 1970, and must still reach its controller
/// (a certificate "not yet valid" there would cut it off until NTP syncs,
/// which on an isolated network is never). What it trusts is the key.
fn valid_from_the_epoch(p: &mut CertificateParams) {
    p.not_before = rcgen::date_time_ymd(1970, 1, 1);
    p.not_after = rcgen::date_time_ymd(2125, 1, 1);
}

/// The CA certificate and key for a signing seed.
pub fn ca(signing_seed: &[u8; 32]) -> anyhow::Result<(rcgen::Certificate, KeyPair)> {
    let key = KeyPair::try_from(ed25519_pkcs8(signing_seed).as_slice())?;
    let mut p = CertificateParams::new(Vec::<String>::new())?;
    p.distinguished_name = DistinguishedName::new();
    p.distinguished_name.push(DnType::CommonName, "Baton controller CA");
    p.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
    p.key_usages = vec![KeyUsagePurpose::KeyCertSign, KeyUsagePurpose::CrlSign, KeyUsagePurpose::DigitalSignature];
    valid_from_the_epoch(&mut p);
    p.serial_number = Some(rcgen::SerialNumber::from(vec![1]));
    Ok((p.self_signed(&key)?, key))
}

/// The gateway's TLS configuration: a fresh server certificate for `names`
/// (plus localhost and the loopback addresses), sent with the CA.
pub fn server_config(signing_seed: &[u8; 32], names: &[String]) -> anyhow::Result<rustls::ServerConfig> {
    let (ca_cert, ca_key) = ca(signing_seed)?;
    let mut sans: Vec<String> = vec!["localhost".into(), "127.0.0.1".into(), "::1".into()];
    sans.extend(names.iter().cloned());
    let mut p = CertificateParams::new(Vec::<String>::new())?;
    p.distinguished_name = DistinguishedName::new();
    p.distinguished_name.push(DnType::CommonName, "Baton MQTT gateway");
    for n in &sans {
        p.subject_alt_names.push(match n.parse::<std::net::IpAddr>() {
            Ok(ip) => SanType::IpAddress(ip),
            Err(_) => SanType::DnsName(n.clone().try_into()?),
        });
    }
    valid_from_the_epoch(&mut p);
    let key = KeyPair::generate()?;
    let cert = p.signed_by(&key, &ca_cert, &ca_key)?;
    let chain = vec![cert.der().clone(), ca_cert.der().clone()];
    let key = rustls::pki_types::PrivateKeyDer::Pkcs8(key.serialize_der().into());
    let config = rustls::ServerConfig::builder_with_provider(Arc::new(rustls::crypto::ring::default_provider()))
        .with_safe_default_protocol_versions()?
        .with_no_client_auth()
        .with_single_cert(chain, key)?;
    Ok(config)
}

/// A TLS client configuration for a service the controller connects to (an
/// external MQTT broker, PostgreSQL): trusting the CA certificates in the
/// PEM file `ca_file`, or without one the web PKI's roots. `what` names the
/// setting in messages.
pub fn client_config(
    ca_file: Option<&std::path::Path>,
    what: &str,
    identity: Option<(Vec<rustls::pki_types::CertificateDer<'static>>, rustls::pki_types::PrivateKeyDer<'static>)>,
) -> anyhow::Result<rustls::ClientConfig> {
    use anyhow::Context;
    use rustls::pki_types::pem::PemObject;
    let mut roots = rustls::RootCertStore::empty();
    match ca_file {
        Some(path) => {
            let pem = std::fs::read(path).with_context(|| format!("{what} {}", path.display()))?;
            for der in rustls::pki_types::CertificateDer::pem_slice_iter(&pem) {
                let der = der.map_err(|e| anyhow::anyhow!("{what} {}: {e}", path.display()))?;
                roots.add(der).with_context(|| format!("{what} {}", path.display()))?;
            }
            anyhow::ensure!(!roots.is_empty(), "{what} {}: no PEM certificate in it", path.display());
        }
        None => roots.extend(webpki_roots::TLS_SERVER_ROOTS.iter().cloned()),
    }
    match identity {
        None => trusting(roots),
        Some((chain, key)) => Ok(builder()?
            .with_root_certificates(roots)
            .with_client_auth_cert(chain, key)
            .map_err(|e| anyhow::anyhow!("the client certificate and key do not go together: {e}"))?),
    }
}

fn builder() -> anyhow::Result<rustls::ConfigBuilder<rustls::ClientConfig, rustls::WantsVerifier>> {
    Ok(rustls::ClientConfig::builder_with_provider(Arc::new(rustls::crypto::ring::default_provider()))
        .with_safe_default_protocol_versions()?)
}

/// A TLS client configuration (rustls with ring) trusting `roots`.
pub fn trusting(roots: rustls::RootCertStore) -> anyhow::Result<rustls::ClientConfig> {
    Ok(builder()?.with_root_certificates(roots).with_no_client_auth())
}

/// The CA certificate as PEM (what `--ca-file` and `mqtt_ca_file` take).
pub fn ca_pem(signing_seed: &[u8; 32]) -> anyhow::Result<String> {
    Ok(ca(signing_seed)?.0.pem())
}

/// An HTTPS listener for axum: handshakes run concurrently (a slow client
/// cannot hold up the others) and at most 10 s each; failed ones are dropped.
pub struct TlsListener {
    local: std::net::SocketAddr,
    ready: tokio::sync::mpsc::Receiver<(tokio_rustls::server::TlsStream<tokio::net::TcpStream>, std::net::SocketAddr)>,
}

impl TlsListener {
    pub fn new(listener: tokio::net::TcpListener, config: rustls::ServerConfig) -> std::io::Result<Self> {
        let local = listener.local_addr()?;
        let acceptor = tokio_rustls::TlsAcceptor::from(Arc::new(config));
        let (tx, ready) = tokio::sync::mpsc::channel(64);
        tokio::spawn(async move {
            loop {
                let (stream, peer) = match listener.accept().await {
                    Ok(a) => a,
                    Err(e) => {
                        tracing::warn!(error = %e, "HTTPS accept failed");
                        tokio::time::sleep(std::time::Duration::from_millis(100)).await;
                        continue;
                    }
                };
                if tx.is_closed() {
                    return;
                }
                // Keystrokes and session output are small writes: no Nagle delay.
                let _ = stream.set_nodelay(true);
                let (acceptor, tx) = (acceptor.clone(), tx.clone());
                tokio::spawn(async move {
                    match tokio::time::timeout(std::time::Duration::from_secs(10), acceptor.accept(stream)).await {
                        Ok(Ok(tls)) => {
                            let _ = tx.send((tls, peer)).await;
                        }
                        Ok(Err(e)) => tracing::debug!(%peer, error = %e, "HTTPS handshake failed"),
                        Err(_) => tracing::debug!(%peer, "HTTPS handshake timed out"),
                    }
                });
            }
        });
        Ok(Self { local, ready })
    }
}

impl axum::serve::Listener for TlsListener {
    type Io = tokio_rustls::server::TlsStream<tokio::net::TcpStream>;
    type Addr = std::net::SocketAddr;

    async fn accept(&mut self) -> (Self::Io, Self::Addr) {
        match self.ready.recv().await {
            Some(conn) => conn,
            // The acceptor task is gone (shutdown): never yield again.
            None => std::future::pending().await,
        }
    }

    fn local_addr(&self) -> std::io::Result<Self::Addr> {
        Ok(self.local)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_ca_is_the_same_bytes_every_time_and_holds_the_signing_key() {
        let seed = [5u8; 32];
        let (a, _) = ca(&seed).unwrap();
        let (b, _) = ca(&seed).unwrap();
        assert_eq!(a.der(), b.der());
        let public = baton_protocol::crypto::SigningKey::from_seed(&seed).public();
        assert!(a.der().windows(32).any(|w| w == public), "the CA's key is the signing key");
        assert!(server_config(&seed, &["broker.lan".into(), "10.0.0.5".into()]).is_ok());
    }
}
