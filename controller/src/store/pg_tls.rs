//! TLS to PostgreSQL (`sslmode=require` in `--store`): the `postgres`
//! client's connector hooks answered with rustls (ring), the server's
//! certificate checked against `sslrootcert=FILE` or, without one, the web
//! PKI's roots, and its name against the host the URL names. No channel
//! binding (SCRAM without `-PLUS`). Also the URL handling around it:
//! libpq's `sslrootcert` and `verify-ca`/`verify-full`, which the client's
//! own parser does not know.

use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};

use postgres::tls::{ChannelBinding, MakeTlsConnect, TlsConnect, TlsStream};
use postgres::Socket;
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};

/// Makes a TLS connection per server the client connects to.
#[derive(Clone)]
pub struct Rustls(pub Arc<rustls::ClientConfig>);

impl MakeTlsConnect<Socket> for Rustls {
    type Stream = Stream;
    type TlsConnect = Connect;
    type Error = std::io::Error;

    fn make_tls_connect(&mut self, domain: &str) -> Result<Connect, std::io::Error> {
        let name = rustls::pki_types::ServerName::try_from(domain.to_owned()).map_err(|e| {
            std::io::Error::new(std::io::ErrorKind::InvalidInput, format!("{domain} as a TLS server name: {e}"))
        })?;
        Ok(Connect { config: self.0.clone(), name })
    }
}

/// One TLS handshake, with the server named in the URL.
pub struct Connect {
    config: Arc<rustls::ClientConfig>,
    name: rustls::pki_types::ServerName<'static>,
}

impl TlsConnect<Socket> for Connect {
    type Stream = Stream;
    type Error = std::io::Error;
    type Future = Pin<Box<dyn Future<Output = std::io::Result<Stream>> + Send>>;

    fn connect(self, socket: Socket) -> Self::Future {
        Box::pin(
            async move { tokio_rustls::TlsConnector::from(self.config).connect(self.name, socket).await.map(Stream) },
        )
    }
}

/// The session's stream once TLS is up.
pub struct Stream(tokio_rustls::client::TlsStream<Socket>);

impl AsyncRead for Stream {
    fn poll_read(mut self: Pin<&mut Self>, cx: &mut Context<'_>, buf: &mut ReadBuf<'_>) -> Poll<std::io::Result<()>> {
        Pin::new(&mut self.0).poll_read(cx, buf)
    }
}

impl AsyncWrite for Stream {
    fn poll_write(mut self: Pin<&mut Self>, cx: &mut Context<'_>, buf: &[u8]) -> Poll<std::io::Result<usize>> {
        Pin::new(&mut self.0).poll_write(cx, buf)
    }
    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        Pin::new(&mut self.0).poll_flush(cx)
    }
    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        Pin::new(&mut self.0).poll_shutdown(cx)
    }
}

impl TlsStream for Stream {
    fn channel_binding(&self) -> ChannelBinding {
        ChannelBinding::none()
    }
}

/// The files libpq's TLS keys name in a URL.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct TlsFiles {
    /// `sslrootcert`: the CA the server's certificate must chain to.
    pub root: Option<String>,
    /// `sslcert` and `sslkey`: this controller's client certificate (chain)
    /// and its private key, for servers that authenticate clients by
    /// certificate (pg_hba's `cert`, or `clientcert=verify-full`).
    pub cert: Option<String>,
    pub key: Option<String>,
}

impl TlsFiles {
    pub fn any(&self) -> bool {
        self.root.is_some() || self.cert.is_some() || self.key.is_some()
    }
}

/// `--store` as the client's parser takes it, and the files libpq's
/// `sslrootcert`, `sslcert` and `sslkey` name (taken out: the parser
/// refuses keys it does not know). libpq's
/// `sslmode=verify-ca` and `verify-full` become `require`, which here
/// always checks the chain and the name (so `verify-ca` is stricter than
/// libpq's). URL (`postgres://…?a=b&c=d`) and key=value forms.
pub fn split_url(url: &str) -> (String, TlsFiles) {
    let mut files = TlsFiles::default();
    let mut take = |key: &str, value: &str| -> Option<String> {
        let slot = match key {
            "sslrootcert" => &mut files.root,
            "sslcert" => &mut files.cert,
            "sslkey" => &mut files.key,
            _ => &mut None,
        };
        if matches!(key, "sslrootcert" | "sslcert" | "sslkey") {
            *slot = Some(value.to_owned());
            return None;
        }
        match key {
            "sslmode" if value == "verify-ca" || value == "verify-full" => Some(format!("{key}=require")),
            _ => Some(format!("{key}={value}")),
        }
    };
    let out = if url.starts_with("postgres://") || url.starts_with("postgresql://") {
        match url.split_once('?') {
            Some((base, query)) => {
                let kept: Vec<String> = query
                    .split('&')
                    .filter(|p| !p.is_empty())
                    .filter_map(|p| match p.split_once('=') {
                        Some((k, v)) => take(k, v),
                        None => Some(p.to_owned()),
                    })
                    .collect();
                if kept.is_empty() {
                    base.to_owned()
                } else {
                    format!("{base}?{}", kept.join("&"))
                }
            }
            None => url.to_owned(),
        }
    } else {
        url.split_whitespace()
            .filter_map(|p| match p.split_once('=') {
                Some((k, v)) => take(k, v),
                None => Some(p.to_owned()),
            })
            .collect::<Vec<_>>()
            .join(" ")
    };
    (out, files)
}

/// The client certificate chain and key in `files` (PEM), checked as libpq
/// checks a key file: not readable by others (0600, or 0640 owned by root).
pub fn client_identity(
    files: &TlsFiles,
) -> anyhow::Result<Option<(Vec<rustls::pki_types::CertificateDer<'static>>, rustls::pki_types::PrivateKeyDer<'static>)>>
{
    use anyhow::Context;
    use rustls::pki_types::pem::PemObject;
    use std::os::unix::fs::MetadataExt;
    let (cert, key) = match (&files.cert, &files.key) {
        (None, None) => return Ok(None),
        (Some(cert), Some(key)) => (cert, key),
        (Some(_), None) => anyhow::bail!("sslcert needs its sslkey (the client certificate's private key)"),
        (None, Some(_)) => anyhow::bail!("sslkey needs its sslcert (the client certificate)"),
    };
    let meta = std::fs::metadata(key).with_context(|| format!("sslkey {key}"))?;
    let allowed = if meta.uid() == 0 { 0o640 } else { 0o600 };
    anyhow::ensure!(
        meta.mode() & 0o777 & !allowed == 0,
        "sslkey {key}: readable by others (mode {:o}); chmod 600 it (or 640 owned by root), as libpq requires",
        meta.mode() & 0o777
    );
    let chain = rustls::pki_types::CertificateDer::pem_file_iter(cert)
        .and_then(|certs| certs.collect::<Result<Vec<_>, _>>())
        .map_err(|e| anyhow::anyhow!("sslcert {cert}: {e}"))?;
    anyhow::ensure!(!chain.is_empty(), "sslcert {cert}: no PEM certificate in it");
    let private =
        rustls::pki_types::PrivateKeyDer::from_pem_file(key).map_err(|e| anyhow::anyhow!("sslkey {key}: {e}"))?;
    Ok(Some((chain, private)))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sslrootcert_is_taken_out_and_verify_modes_become_require() {
        let root = |r: &str| TlsFiles { root: Some(r.to_owned()), ..Default::default() };
        assert_eq!(
            split_url("postgres://b@db/baton?sslmode=verify-full&sslrootcert=/etc/ca.pem&application_name=x"),
            ("postgres://b@db/baton?sslmode=require&application_name=x".to_owned(), root("/etc/ca.pem"))
        );
        assert_eq!(
            split_url("postgres://b@db/baton?sslrootcert=/ca.pem"),
            ("postgres://b@db/baton".to_owned(), root("/ca.pem"))
        );
        assert_eq!(split_url("postgres://b@db/baton"), ("postgres://b@db/baton".to_owned(), TlsFiles::default()));
        assert_eq!(
            split_url("host=db user=b sslmode=verify-ca sslrootcert=/ca.pem"),
            ("host=db user=b sslmode=require".to_owned(), root("/ca.pem"))
        );
        assert_eq!(
            split_url("postgres://b@db/baton?sslcert=/c.pem&sslmode=require&sslkey=/c.key"),
            (
                "postgres://b@db/baton?sslmode=require".to_owned(),
                TlsFiles { root: None, cert: Some("/c.pem".into()), key: Some("/c.key".into()) }
            )
        );
    }

    #[test]
    fn a_client_key_must_come_with_its_certificate_and_be_private() {
        let dir = tempfile::tempdir().unwrap();
        let files = |cert: Option<&str>, key: Option<&str>| TlsFiles {
            root: None,
            cert: cert.map(|c| dir.path().join(c).display().to_string()),
            key: key.map(|k| dir.path().join(k).display().to_string()),
        };
        assert!(client_identity(&files(None, None)).unwrap().is_none());
        assert!(client_identity(&files(Some("c.pem"), None)).unwrap_err().to_string().contains("needs its sslkey"));
        assert!(client_identity(&files(None, Some("c.key"))).unwrap_err().to_string().contains("needs its sslcert"));
        let key = rcgen::KeyPair::generate().unwrap();
        let cert = rcgen::CertificateParams::new(vec!["baton".to_string()]).unwrap().self_signed(&key).unwrap();
        std::fs::write(dir.path().join("c.pem"), cert.pem()).unwrap();
        std::fs::write(dir.path().join("c.key"), key.serialize_pem()).unwrap();
        use std::os::unix::fs::PermissionsExt;
        std::fs::set_permissions(dir.path().join("c.key"), std::fs::Permissions::from_mode(0o644)).unwrap();
        let e = client_identity(&files(Some("c.pem"), Some("c.key"))).unwrap_err().to_string();
        assert!(e.contains("readable by others"), "{e}");
        std::fs::set_permissions(dir.path().join("c.key"), std::fs::Permissions::from_mode(0o600)).unwrap();
        let (chain, _) = client_identity(&files(Some("c.pem"), Some("c.key"))).unwrap().expect("an identity");
        assert_eq!(chain.len(), 1);
        std::fs::write(dir.path().join("empty.pem"), "").unwrap();
        let e = client_identity(&files(Some("empty.pem"), Some("c.key"))).unwrap_err().to_string();
        assert!(e.contains("no PEM certificate"), "{e}");
    }
}
