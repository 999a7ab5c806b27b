//! TLS: PEM files to rustls configurations, and the handshake of one accepted
//! connection.
//!
//! - **Receivers** (`[receiver.tls]`): one [`rustls::ServerConfig`] for both
//!   OTLP listeners, offering ALPN `h2` and `http/1.1` so gRPC clients (which
//!   insist on `h2`) and HTTP/1 clients both work. With `client_ca_file` every
//!   client must present a certificate issued by one of those CAs (mutual TLS);
//!   a client without one, or with one from another CA, fails the handshake.
//! - **Upstream** (`[upstream.tls]`): a tonic [`ClientTlsConfig`]; `ca_file`
//!   *replaces* the system's roots (trust exactly the CA that issued the
//!   gateway's certificate), an optional client certificate, an optional
//!   server name. The files are checked here with rustls first, so that a bad
//!   file is reported by name, not as a tonic transport error.
//! - **Errors** ([`TlsError`]) name the config key and the file, and say what
//!   is wrong: unreadable, no certificate, no private key, a key that does not
//!   match the certificate, an unusable CA. Never the key's contents.
//! - **Handshake** ([`ServerTls::accept`]): in the connection's own task, never
//!   in the accept loop, so a slow client cannot hold up others; bounded by
//!   `receiver.header_timeout`; a failure closes the connection, is counted in
//!   `telespool_tls_handshake_failures_total{listener, reason}` and logged at
//!   debug (a port scanner or a plaintext client is not worth a warning).
//! - **Reload**: [`ServerTls`] reads its config from a [`Reloadable`] that a
//!   SIGHUP replaces; a connection uses the config current at its handshake and
//!   keeps it, so connections already up (and their requests) are untouched.
//!
//! The crypto provider is always *ring*, passed explicitly: the process-wide
//! default is never relied on (two providers in the tree would make it panic).

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use rustls::crypto::CryptoProvider;
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer};
use rustls::server::WebPkiClientVerifier;
use rustls::sign::{CertifiedKey, SingleCertAndKey};
use rustls::RootCertStore;
use tokio::io::{AsyncRead, AsyncWrite};
use tokio_rustls::server::TlsStream;
use tokio_rustls::TlsAcceptor;
use tokio_util::sync::CancellationToken;
use tonic::transport::{Certificate, ClientTlsConfig, Identity};

use crate::config::{ReceiverTlsConfig, UpstreamTlsConfig};
use crate::reloadable::Reloadable;

/// Why a TLS file could not be used. `key` is the config key naming the file.
#[derive(Debug, thiserror::Error)]
pub enum TlsError {
    /// The file cannot be read (missing, permissions).
    #[error("cannot read {key} {path}: {source}")]
    Read {
        key: &'static str,
        path: PathBuf,
        source: std::io::Error,
    },
    /// The file is not well-formed PEM.
    #[error("{key} {path} is not valid PEM: {message}")]
    Pem {
        key: &'static str,
        path: PathBuf,
        message: String,
    },
    /// A certificate or CA file without a `CERTIFICATE` block.
    #[error(
        "{key} {path} holds no certificate (expected a PEM \"-----BEGIN CERTIFICATE-----\" block)"
    )]
    NoCertificate { key: &'static str, path: PathBuf },
    /// A key file without a private key block.
    #[error("{key} {path} holds no private key (expected a PEM PRIVATE KEY, RSA PRIVATE KEY or EC PRIVATE KEY block)")]
    NoPrivateKey { key: &'static str, path: PathBuf },
    /// The private key is of a kind rustls cannot sign with.
    #[error("{key} {path}: the private key cannot be used: {source}")]
    BadKey {
        key: &'static str,
        path: PathBuf,
        source: rustls::Error,
    },
    /// The leaf certificate cannot be parsed.
    #[error("{key} {path}: the first certificate cannot be used: {source}")]
    BadCertificate {
        key: &'static str,
        path: PathBuf,
        source: rustls::Error,
    },
    /// The private key belongs to another certificate.
    #[error("{key_key} {key_path} does not match the certificate in {cert_key} {cert_path}; install the key and certificate that belong together")]
    KeyMismatch {
        cert_key: &'static str,
        cert_path: PathBuf,
        key_key: &'static str,
        key_path: PathBuf,
    },
    /// A CA file whose certificates cannot serve as trust anchors.
    #[error("{key} {path}: the CA certificates cannot be used: {message}")]
    BadCa {
        key: &'static str,
        path: PathBuf,
        message: String,
    },
    /// rustls refused the assembled configuration (should not happen with
    /// files that passed the checks above).
    #[error("TLS configuration ({what}) refused: {source}")]
    Config {
        what: &'static str,
        source: rustls::Error,
    },
}

fn provider() -> Arc<CryptoProvider> {
    Arc::new(rustls::crypto::ring::default_provider())
}

fn read(key: &'static str, path: &Path) -> Result<Vec<u8>, TlsError> {
    std::fs::read(path).map_err(|source| TlsError::Read {
        key,
        path: path.to_owned(),
        source,
    })
}

/// Every `CERTIFICATE` block of `pem`; at least one.
fn certificates(
    key: &'static str,
    path: &Path,
    pem: &[u8],
) -> Result<Vec<CertificateDer<'static>>, TlsError> {
    let certs = CertificateDer::pem_slice_iter(pem)
        .collect::<Result<Vec<_>, _>>()
        .map_err(|e| TlsError::Pem {
            key,
            path: path.to_owned(),
            message: e.to_string(),
        })?;
    match certs.is_empty() {
        true => Err(TlsError::NoCertificate {
            key,
            path: path.to_owned(),
        }),
        false => Ok(certs),
    }
}

fn private_key(
    key: &'static str,
    path: &Path,
    pem: &[u8],
) -> Result<PrivateKeyDer<'static>, TlsError> {
    PrivateKeyDer::from_pem_slice(pem).map_err(|e| match e {
        rustls::pki_types::pem::Error::NoItemsFound => TlsError::NoPrivateKey {
            key,
            path: path.to_owned(),
        },
        e => TlsError::Pem {
            key,
            path: path.to_owned(),
            message: e.to_string(),
        },
    })
}

/// The config keys of a certificate/key pair, for error messages.
struct PairKeys {
    cert: &'static str,
    key: &'static str,
}

/// Read a certificate chain and its key, and check that they belong together.
fn certified_key(
    keys: PairKeys,
    cert_path: &Path,
    key_path: &Path,
    provider: &CryptoProvider,
) -> Result<CertifiedKey, TlsError> {
    let chain = certificates(keys.cert, cert_path, &read(keys.cert, cert_path)?)?;
    let der = private_key(keys.key, key_path, &read(keys.key, key_path)?)?;
    let signing_key = provider
        .key_provider
        .load_private_key(der)
        .map_err(|source| TlsError::BadKey {
            key: keys.key,
            path: key_path.to_owned(),
            source,
        })?;
    let certified = CertifiedKey::new(chain, signing_key);
    match certified.keys_match() {
        // Unknown: the key type cannot tell its public key; rustls accepts it too.
        Ok(()) | Err(rustls::Error::InconsistentKeys(rustls::InconsistentKeys::Unknown)) => {
            Ok(certified)
        }
        Err(rustls::Error::InconsistentKeys(rustls::InconsistentKeys::KeyMismatch)) => {
            Err(TlsError::KeyMismatch {
                cert_key: keys.cert,
                cert_path: cert_path.to_owned(),
                key_key: keys.key,
                key_path: key_path.to_owned(),
            })
        }
        Err(source) => Err(TlsError::BadCertificate {
            key: keys.cert,
            path: cert_path.to_owned(),
            source,
        }),
    }
}

/// The CA certificates of `path` as trust anchors, and the PEM they came from.
fn roots(key: &'static str, path: &Path) -> Result<(RootCertStore, Vec<u8>), TlsError> {
    let pem = read(key, path)?;
    let mut store = RootCertStore::empty();
    for cert in certificates(key, path, &pem)? {
        store.add(cert).map_err(|e| TlsError::BadCa {
            key,
            path: path.to_owned(),
            message: e.to_string(),
        })?;
    }
    Ok((store, pem))
}

/// The receivers' server configuration from `[receiver.tls]`.
pub fn server_config(cfg: &ReceiverTlsConfig) -> Result<rustls::ServerConfig, TlsError> {
    let provider = provider();
    let certified = certified_key(
        PairKeys {
            cert: "receiver.tls.cert_file",
            key: "receiver.tls.key_file",
        },
        &cfg.cert_file,
        &cfg.key_file,
        &provider,
    )?;
    let builder = rustls::ServerConfig::builder_with_provider(provider.clone())
        .with_safe_default_protocol_versions()
        .map_err(|source| TlsError::Config {
            what: "protocol versions",
            source,
        })?;
    let builder = match &cfg.client_ca_file {
        None => builder.with_no_client_auth(),
        Some(path) => {
            let key = "receiver.tls.client_ca_file";
            let (store, _) = roots(key, path)?;
            let verifier = WebPkiClientVerifier::builder_with_provider(Arc::new(store), provider)
                .build()
                .map_err(|e| TlsError::BadCa {
                    key,
                    path: path.clone(),
                    message: e.to_string(),
                })?;
            builder.with_client_cert_verifier(verifier)
        }
    };
    let mut config = builder.with_cert_resolver(Arc::new(SingleCertAndKey::from(certified)));
    config.alpn_protocols = vec![b"h2".to_vec(), b"http/1.1".to_vec()];
    Ok(config)
}

/// The upstream client's TLS settings from `[upstream.tls]` (None: system
/// roots, no client certificate).
pub fn client_config(cfg: Option<&UpstreamTlsConfig>) -> Result<ClientTlsConfig, TlsError> {
    let mut tls = ClientTlsConfig::new();
    let Some(cfg) = cfg else {
        return Ok(tls.with_native_roots());
    };
    tls = match &cfg.ca_file {
        Some(path) => {
            let (_, pem) = roots("upstream.tls.ca_file", path)?;
            tls.ca_certificate(Certificate::from_pem(pem))
        }
        None => tls.with_native_roots(),
    };
    if let (Some(cert_path), Some(key_path)) = (&cfg.cert_file, &cfg.key_file) {
        let keys = PairKeys {
            cert: "upstream.tls.cert_file",
            key: "upstream.tls.key_file",
        };
        // Checked here for the error messages; tonic parses the PEM again.
        certified_key(keys, cert_path, key_path, &provider())?;
        let cert = read("upstream.tls.cert_file", cert_path)?;
        let key = read("upstream.tls.key_file", key_path)?;
        tls = tls.identity(Identity::from_pem(cert, key));
    }
    if let Some(name) = &cfg.server_name {
        tls = tls.domain_name(name.clone());
    }
    Ok(tls)
}

/// The OTLP/HTTP exporter's rustls client config from `[upstream.tls]`:
/// the same trust and client certificate as [`client_config`] gives tonic,
/// with ALPN `h2` and `http/1.1`.
pub fn http_client_config(
    cfg: Option<&UpstreamTlsConfig>,
) -> Result<rustls::ClientConfig, TlsError> {
    let provider = provider();
    let store = match cfg.and_then(|c| c.ca_file.as_ref()) {
        Some(path) => roots("upstream.tls.ca_file", path)?.0,
        None => {
            let mut store = RootCertStore::empty();
            // Unreadable system certificates are skipped, as tonic does.
            let found = rustls_native_certs::load_native_certs();
            store.add_parsable_certificates(found.certs);
            store
        }
    };
    let builder = rustls::ClientConfig::builder_with_provider(provider.clone())
        .with_safe_default_protocol_versions()
        .map_err(|source| TlsError::Config {
            what: "upstream client",
            source,
        })?
        .with_root_certificates(store);
    let pair = cfg.and_then(|c| c.cert_file.as_ref().zip(c.key_file.as_ref()));
    let mut config = match pair {
        Some((cert_path, key_path)) => {
            let keys = PairKeys {
                cert: "upstream.tls.cert_file",
                key: "upstream.tls.key_file",
            };
            let certified = certified_key(keys, cert_path, key_path, &provider)?;
            builder.with_client_cert_resolver(Arc::new(SingleCertAndKey::from(certified)))
        }
        None => builder.with_no_client_auth(),
    };
    config.alpn_protocols = vec![b"h2".to_vec(), b"http/1.1".to_vec()];
    Ok(config)
}

/// Why a handshake failed (label `reason` of the failure counter).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum HandshakeFailure {
    /// Not finished within `receiver.header_timeout`.
    Timeout,
    /// mTLS: no client certificate, or one the client CA did not issue.
    ClientCertificate,
    /// Anything else: a plaintext client, a protocol mismatch, a reset.
    Error,
}

impl HandshakeFailure {
    fn as_str(self) -> &'static str {
        match self {
            HandshakeFailure::Timeout => "timeout",
            HandshakeFailure::ClientCertificate => "client_certificate",
            HandshakeFailure::Error => "error",
        }
    }

    fn of(e: &std::io::Error) -> HandshakeFailure {
        let tls = e.get_ref().and_then(|e| e.downcast_ref::<rustls::Error>());
        match tls {
            Some(rustls::Error::NoCertificatesPresented)
            | Some(rustls::Error::InvalidCertificate(_)) => HandshakeFailure::ClientCertificate,
            _ => HandshakeFailure::Error,
        }
    }
}

/// Labels of `telespool_tls_handshake_failures_total`: listener and reason.
pub type HandshakeLabels = [(&'static str, &'static str); 2];

/// TLS on one OTLP listener: the current server config and the handshake.
#[derive(Clone)]
pub struct ServerTls {
    config: Reloadable<rustls::ServerConfig>,
    /// `receiver.header_timeout`: the whole handshake must fit in it.
    timeout: Duration,
    /// `grpc` or `http`, the metric label.
    listener: &'static str,
    failures: Family<HandshakeLabels, Counter>,
}

impl ServerTls {
    pub fn new(
        config: Reloadable<rustls::ServerConfig>,
        timeout: Duration,
        listener: &'static str,
        failures: Family<HandshakeLabels, Counter>,
    ) -> ServerTls {
        ServerTls {
            config,
            timeout,
            listener,
            failures,
        }
    }

    /// Run the server side of the handshake on `io`; `None` (counted and
    /// logged) if it failed, timed out or `stop` fired first.
    pub async fn accept<IO>(&self, io: IO, stop: &CancellationToken) -> Option<TlsStream<IO>>
    where
        IO: AsyncRead + AsyncWrite + Unpin,
    {
        let acceptor = TlsAcceptor::from(self.config.get());
        let failure = tokio::select! {
            _ = stop.cancelled() => return None,
            result = tokio::time::timeout(self.timeout, acceptor.accept(io)) => match result {
                Ok(Ok(stream)) => return Some(stream),
                Ok(Err(e)) => {
                    let failure = HandshakeFailure::of(&e);
                    tracing::debug!(listener = self.listener, reason = failure.as_str(), error = %e, "TLS handshake failed");
                    failure
                }
                Err(_) => {
                    tracing::debug!(listener = self.listener, timeout = ?self.timeout, "TLS handshake timed out");
                    HandshakeFailure::Timeout
                }
            },
        };
        self.failures
            .get_or_create(&[("listener", self.listener), ("reason", failure.as_str())])
            .inc();
        None
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_missing_file_is_named_with_its_key() {
        let cfg = ReceiverTlsConfig {
            cert_file: PathBuf::from("/nonexistent/telespool/cert.pem"),
            key_file: PathBuf::from("/nonexistent/telespool/key.pem"),
            client_ca_file: None,
        };
        let e = server_config(&cfg).expect_err("no such file").to_string();
        assert!(
            e.contains("receiver.tls.cert_file") && e.contains("/nonexistent/telespool/cert.pem"),
            "{e}"
        );
    }

    #[test]
    fn a_file_without_pem_blocks_is_reported_as_holding_no_certificate_or_key() {
        let path = Path::new("empty.pem");
        let e = certificates("k", path, b"not pem at all\n").expect_err("no certificate");
        assert!(matches!(e, TlsError::NoCertificate { .. }), "{e}");
        let e = private_key("k", path, b"not pem at all\n").expect_err("no key");
        assert!(matches!(e, TlsError::NoPrivateKey { .. }), "{e}");
    }
}
