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

/// `--store` as the client's parser takes it, and the `sslrootcert` file
/// it named (taken out: the parser refuses keys it does not know). libpq's
/// `sslmode=verify-ca` and `verify-full` become `require`, which here
/// always checks the chain and the name (so `verify-ca` is stricter than
/// libpq's). URL (`postgres://…?a=b&c=d`) and key=value forms.
pub fn split_url(url: &str) -> (String, Option<String>) {
    let mut root = None;
    let mut take = |key: &str, value: &str| -> Option<String> {
        match key {
            "sslrootcert" => {
                root = Some(value.to_owned());
                None
            }
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
    (out, root)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sslrootcert_is_taken_out_and_verify_modes_become_require() {
        assert_eq!(
            split_url("postgres://b@db/baton?sslmode=verify-full&sslrootcert=/etc/ca.pem&application_name=x"),
            ("postgres://b@db/baton?sslmode=require&application_name=x".to_owned(), Some("/etc/ca.pem".to_owned()))
        );
        assert_eq!(
            split_url("postgres://b@db/baton?sslrootcert=/ca.pem"),
            ("postgres://b@db/baton".to_owned(), Some("/ca.pem".to_owned()))
        );
        assert_eq!(split_url("postgres://b@db/baton"), ("postgres://b@db/baton".to_owned(), None));
        assert_eq!(
            split_url("host=db user=b sslmode=verify-ca sslrootcert=/ca.pem"),
            ("host=db user=b sslmode=require".to_owned(), Some("/ca.pem".to_owned()))
        );
    }
}
