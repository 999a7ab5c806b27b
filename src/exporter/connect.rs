//! The OTLP/HTTP exporter's connector: TCP, then TLS for `https://`.
//!
//! hyper-util's `HttpConnector` makes the TCP connection (no Nagle, connect
//! timeout; a loopback upstream leaves BBR, `loopback.rs`); for `https://` a tokio-rustls handshake follows with the
//! `[upstream.tls]` client config (ring provider, ALPN `h2` then
//! `http/1.1`), and the connection is marked HTTP/2 when the server picked
//! `h2`, so the pooled client speaks whatever upstream chose. Plain `http://`
//! is HTTP/1.1 (no cleartext HTTP/2 upgrade, as in the Collector).

use std::future::Future;
use std::io;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::Duration;

use http::Uri;
use hyper_util::client::legacy::connect::{Connected, Connection, HttpConnector};
use hyper_util::rt::TokioIo;
use rustls::pki_types::ServerName;
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::net::TcpStream;
use tokio_rustls::client::TlsStream;
use tokio_rustls::TlsConnector;

/// TLS for `https://` upstream URLs: the client config, and the name to
/// verify instead of the URL's host (`upstream.tls.server_name`).
#[derive(Clone)]
pub(super) struct ClientTls {
    pub(super) config: Arc<rustls::ClientConfig>,
    pub(super) server_name: Option<ServerName<'static>>,
}

impl std::fmt::Debug for ClientTls {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ClientTls")
            .field("server_name", &self.server_name)
            .finish_non_exhaustive()
    }
}

/// Connects to `http://` and `https://` URLs.
#[derive(Clone)]
pub(super) struct Connector {
    tcp: HttpConnector,
    tls: Option<ClientTls>,
}

impl Connector {
    pub(super) fn new(tls: Option<ClientTls>, connect_timeout: Duration) -> Connector {
        let mut tcp = HttpConnector::new();
        tcp.enforce_http(false);
        tcp.set_nodelay(true);
        tcp.set_connect_timeout(Some(connect_timeout));
        tcp.set_keepalive(Some(Duration::from_secs(60)));
        Connector { tcp, tls }
    }
}

/// A connection to upstream, plain or TLS.
pub(super) enum Stream {
    Plain(TcpStream),
    Tls(Box<TlsStream<TcpStream>>),
}

impl Connection for Stream {
    fn connected(&self) -> Connected {
        match self {
            Stream::Plain(tcp) => tcp.connected(),
            Stream::Tls(tls) => {
                let (tcp, session) = tls.get_ref();
                let connected = tcp.connected();
                match session.alpn_protocol() {
                    Some(b"h2") => connected.negotiated_h2(),
                    _ => connected,
                }
            }
        }
    }
}

impl AsyncRead for Stream {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        match self.get_mut() {
            Stream::Plain(s) => Pin::new(s).poll_read(cx, buf),
            Stream::Tls(s) => Pin::new(s).poll_read(cx, buf),
        }
    }
}

impl AsyncWrite for Stream {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        match self.get_mut() {
            Stream::Plain(s) => Pin::new(s).poll_write(cx, buf),
            Stream::Tls(s) => Pin::new(s).poll_write(cx, buf),
        }
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        match self.get_mut() {
            Stream::Plain(s) => Pin::new(s).poll_flush(cx),
            Stream::Tls(s) => Pin::new(s).poll_flush(cx),
        }
    }

    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        match self.get_mut() {
            Stream::Plain(s) => Pin::new(s).poll_shutdown(cx),
            Stream::Tls(s) => Pin::new(s).poll_shutdown(cx),
        }
    }
}

type Connecting = Pin<Box<dyn Future<Output = io::Result<TokioIo<Stream>>> + Send>>;

impl tower_service::Service<Uri> for Connector {
    type Response = TokioIo<Stream>;
    type Error = io::Error;
    type Future = Connecting;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
        tower_service::Service::<Uri>::poll_ready(&mut self.tcp, cx).map_err(io::Error::other)
    }

    fn call(&mut self, uri: Uri) -> Self::Future {
        let https = uri.scheme_str() == Some("https");
        let host = uri.host().unwrap_or_default().to_owned();
        let tls = self.tls.clone();
        let connecting = tower_service::Service::<Uri>::call(&mut self.tcp, uri);
        Box::pin(async move {
            let tcp = connecting.await.map_err(io::Error::other)?.into_inner();
            super::loopback::unpace_loopback(&tcp);
            if !https {
                return Ok(TokioIo::new(Stream::Plain(tcp)));
            }
            let Some(tls) = tls else {
                return Err(io::Error::other("https:// URL without a TLS configuration"));
            };
            let name = match tls.server_name {
                Some(name) => name,
                None => {
                    // IPv6 hosts come bracketed in URLs.
                    let bare = host.trim_start_matches('[').trim_end_matches(']');
                    ServerName::try_from(bare.to_owned()).map_err(|_| {
                        io::Error::new(
                            io::ErrorKind::InvalidInput,
                            format!("{host:?} is not a DNS name or IP address for TLS"),
                        )
                    })?
                }
            };
            let stream = TlsConnector::from(tls.config).connect(name, tcp).await?;
            Ok(TokioIo::new(Stream::Tls(Box::new(stream))))
        })
    }
}
