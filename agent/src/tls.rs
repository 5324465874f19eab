//! The agent's MQTT-over-TLS client (`mqtts://` brokers).
//!
//! With `mqtt_ca_file`, the broker's certificate must chain to that CA (an
//! operator's Mosquitto, say). Otherwise it must chain to a CA that the
//! server sends along whose key *is* a controller key this agent trusts
//! (`controller_keys`, or the key pinned by `join`): the controller makes its
//! TLS CA from its signing key, so there is one key to trust, delivered with
//! the join token, and nothing else to copy to the device.

use std::path::Path;
use std::sync::Arc;

use rustls::client::danger::{HandshakeSignatureValid, ServerCertVerified, ServerCertVerifier};
use rustls::crypto::CryptoProvider;
use rustls::pki_types::{CertificateDer, ServerName, UnixTime};
use rustls::{CertificateError, DigitallySignedStruct, Error, RootCertStore, SignatureScheme};

fn provider() -> Arc<CryptoProvider> {
    Arc::new(rustls::crypto::ring::default_provider())
}

/// The client configuration for a TLS broker.
pub fn client_config(trusted_keys: &[[u8; 32]], ca_file: Option<&Path>) -> Result<rustls::ClientConfig, String> {
    let builder = rustls::ClientConfig::builder_with_provider(provider())
        .with_safe_default_protocol_versions()
        .map_err(|e| e.to_string())?;
    let config = match ca_file {
        Some(path) => {
            let pem = std::fs::read(path).map_err(|e| format!("mqtt_ca_file {}: {e}", path.display()))?;
            let mut roots = RootCertStore::empty();
            for der in pem_certificates(&pem) {
                roots.add(der).map_err(|e| format!("mqtt_ca_file {}: {e}", path.display()))?;
            }
            if roots.is_empty() {
                return Err(format!("mqtt_ca_file {}: no certificate in it", path.display()));
            }
            builder.with_root_certificates(roots).with_no_client_auth()
        }
        None => {
            if trusted_keys.is_empty() {
                return Err(
                    "an mqtts:// broker needs a trust anchor: controller_keys, a join token, or mqtt_ca_file".into()
                );
            }
            builder
                .dangerous()
                .with_custom_certificate_verifier(Arc::new(ControllerCa {
                    keys: trusted_keys.to_vec(),
                    provider: provider(),
                }))
                .with_no_client_auth()
        }
    };
    Ok(config)
}

/// The DER certificates in a PEM file.
fn pem_certificates(pem: &[u8]) -> Vec<CertificateDer<'static>> {
    use rustls::pki_types::pem::PemObject;
    CertificateDer::pem_slice_iter(pem).filter_map(Result::ok).collect()
}

/// The SubjectPublicKeyInfo contents of an Ed25519 key (RFC 8410).
fn ed25519_spki(key: &[u8; 32]) -> Vec<u8> {
    let mut spki = vec![0x30, 0x05, 0x06, 0x03, 0x2b, 0x65, 0x70, 0x03, 0x21, 0x00];
    spki.extend_from_slice(key);
    spki
}

/// Accepts a server chain whose CA holds a trusted controller key.
#[derive(Debug)]
struct ControllerCa {
    keys: Vec<[u8; 32]>,
    provider: Arc<CryptoProvider>,
}

impl ServerCertVerifier for ControllerCa {
    fn verify_server_cert(
        &self,
        end_entity: &CertificateDer<'_>,
        intermediates: &[CertificateDer<'_>],
        server_name: &ServerName<'_>,
        ocsp: &[u8],
        now: UnixTime,
    ) -> Result<ServerCertVerified, Error> {
        let wanted: Vec<Vec<u8>> = self.keys.iter().map(ed25519_spki).collect();
        // The anchor's key is read by webpki's parser, not found by a byte search.
        let anchor = intermediates
            .iter()
            .filter_map(|c| webpki::anchor_from_trusted_cert(c).ok())
            .find(|a| wanted.iter().any(|w| a.subject_public_key_info.as_ref() == w.as_slice()))
            .ok_or(Error::InvalidCertificate(CertificateError::UnknownIssuer))?;
        let roots = RootCertStore { roots: vec![anchor.to_owned()] };
        let inner = rustls::client::WebPkiServerVerifier::builder_with_provider(Arc::new(roots), self.provider.clone())
            .build()
            .map_err(|e| Error::General(e.to_string()))?;
        inner.verify_server_cert(end_entity, &[], server_name, ocsp, now)
    }

    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, Error> {
        rustls::crypto::verify_tls12_signature(message, cert, dss, &self.provider.signature_verification_algorithms)
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, Error> {
        rustls::crypto::verify_tls13_signature(message, cert, dss, &self.provider.signature_verification_algorithms)
    }

    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        self.provider.signature_verification_algorithms.supported_schemes()
    }
}

/// The rumqttc transport for a broker URL.
pub fn transport(
    broker: &baton_protocol::BrokerUrl,
    trusted_keys: &[[u8; 32]],
    ca_file: Option<&Path>,
) -> Result<rumqttc::Transport, String> {
    if !broker.tls {
        return Ok(rumqttc::Transport::Tcp);
    }
    let config = client_config(trusted_keys, ca_file)?;
    Ok(rumqttc::Transport::tls_with_config(rumqttc::TlsConfiguration::Rustls(Arc::new(config))))
}
