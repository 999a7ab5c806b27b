//! Certificates made in the test (rcgen) and TLS clients that trust them.
//!
//! [`TestCa`] is a self-signed CA that issues server certificates (for
//! `localhost` and `127.0.0.1`) and client certificates; [`PemFiles`] writes a
//! certificate, its key and the CA into a directory the agent's config can
//! name. [`grpc_channel`] is a tonic channel over TLS that trusts one CA and
//! optionally presents a client certificate; [`https_request`] sends one raw
//! HTTP/1.1 request over TLS.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use rcgen::{
    BasicConstraints, CertificateParams, DnType, ExtendedKeyUsagePurpose, IsCa, Issuer, KeyPair,
    KeyUsagePurpose,
};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tonic::transport::{Certificate, Channel, ClientTlsConfig, Endpoint, Identity};

use super::http::HttpReply;

/// A certificate and its private key, PEM.
#[derive(Clone, Debug)]
pub struct CertKey {
    pub cert_pem: String,
    pub key_pem: String,
}

impl CertKey {
    /// For tonic (client identity or server identity).
    pub fn identity(&self) -> Identity {
        Identity::from_pem(&self.cert_pem, &self.key_pem)
    }
}

/// A throwaway certificate authority.
pub struct TestCa {
    issuer: Issuer<'static, KeyPair>,
    /// The CA certificate, PEM.
    pub pem: String,
}

impl TestCa {
    /// A new CA whose certificate names `name`.
    pub fn new(name: &str) -> TestCa {
        let mut params = CertificateParams::new(Vec::<String>::new()).expect("CA params");
        params.distinguished_name.push(DnType::CommonName, name);
        params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
        params.key_usages = vec![
            KeyUsagePurpose::KeyCertSign,
            KeyUsagePurpose::CrlSign,
            KeyUsagePurpose::DigitalSignature,
        ];
        let key = KeyPair::generate().expect("CA key");
        let cert = params.self_signed(&key).expect("self-signed CA");
        TestCa {
            pem: cert.pem(),
            issuer: Issuer::new(params, key),
        }
    }

    fn issue(&self, names: &[&str], common_name: &str, usage: ExtendedKeyUsagePurpose) -> CertKey {
        let names: Vec<String> = names.iter().map(|s| s.to_string()).collect();
        let mut params = CertificateParams::new(names).expect("leaf params");
        params
            .distinguished_name
            .push(DnType::CommonName, common_name);
        params.extended_key_usages = vec![usage];
        params.key_usages = vec![KeyUsagePurpose::DigitalSignature];
        let key = KeyPair::generate().expect("leaf key");
        let cert = params.signed_by(&key, &self.issuer).expect("sign leaf");
        CertKey {
            cert_pem: cert.pem(),
            key_pem: key.serialize_pem(),
        }
    }

    /// A server certificate for `localhost` and `127.0.0.1`.
    pub fn server_cert(&self) -> CertKey {
        self.issue(
            &["localhost", "127.0.0.1"],
            "telespool test server",
            ExtendedKeyUsagePurpose::ServerAuth,
        )
    }

    /// A client certificate naming `name`.
    pub fn client_cert(&self, name: &str) -> CertKey {
        self.issue(&[name], name, ExtendedKeyUsagePurpose::ClientAuth)
    }

    pub fn certificate(&self) -> Certificate {
        Certificate::from_pem(&self.pem)
    }
}

/// A certificate, its key and a CA certificate written to files.
#[derive(Clone, Debug)]
pub struct PemFiles {
    pub cert: PathBuf,
    pub key: PathBuf,
    pub ca: PathBuf,
}

impl PemFiles {
    /// Writes `<prefix>-cert.pem`, `<prefix>-key.pem` and `<prefix>-ca.pem` in `dir`.
    pub fn write(dir: &Path, prefix: &str, cert: &CertKey, ca: &TestCa) -> PemFiles {
        let files = PemFiles {
            cert: dir.join(format!("{prefix}-cert.pem")),
            key: dir.join(format!("{prefix}-key.pem")),
            ca: dir.join(format!("{prefix}-ca.pem")),
        };
        files.replace(cert, ca);
        files
    }

    /// Overwrites the files with another certificate, key and CA (each
    /// written to a temporary name and renamed, as a deploy tool would).
    pub fn replace(&self, cert: &CertKey, ca: &TestCa) {
        write_atomically(&self.cert, &cert.cert_pem);
        write_atomically(&self.key, &cert.key_pem);
        write_atomically(&self.ca, &ca.pem);
    }
}

/// Writes `contents` to `path` through a temporary file and a rename.
pub fn write_atomically(path: &Path, contents: &str) {
    let tmp = path.with_extension("tmp");
    std::fs::write(&tmp, contents).unwrap_or_else(|e| panic!("writing {}: {e}", tmp.display()));
    std::fs::rename(&tmp, path)
        .unwrap_or_else(|e| panic!("renaming {} to {}: {e}", tmp.display(), path.display()));
}

/// TOML path string.
pub fn toml_path(path: &Path) -> String {
    format!("{:?}", path.display().to_string())
}

/// A lazily connecting gRPC channel to `https://addr` that trusts only `ca`
/// and checks the name `localhost`; `client` is presented for mutual TLS.
pub fn grpc_channel(addr: SocketAddr, ca: &TestCa, client: Option<&CertKey>) -> Channel {
    let mut tls = ClientTlsConfig::new()
        .ca_certificate(ca.certificate())
        .domain_name("localhost");
    if let Some(client) = client {
        tls = tls.identity(client.identity());
    }
    Endpoint::from_shared(format!("https://{addr}"))
        .expect("valid endpoint")
        .tls_config(tls)
        .expect("client TLS config")
        .connect_timeout(Duration::from_secs(5))
        .timeout(Duration::from_secs(10))
        .connect_lazy()
}

/// A rustls client config trusting only `ca`, offering HTTP/1.1 by ALPN.
fn rustls_client(ca: &TestCa, client: Option<&CertKey>) -> rustls::ClientConfig {
    use rustls::pki_types::pem::PemObject;
    use rustls::pki_types::{CertificateDer, PrivateKeyDer};
    let mut roots = rustls::RootCertStore::empty();
    roots
        .add(CertificateDer::from_pem_slice(ca.pem.as_bytes()).expect("CA pem"))
        .expect("CA as root");
    let builder = rustls::ClientConfig::builder_with_provider(Arc::new(
        rustls::crypto::ring::default_provider(),
    ))
    .with_safe_default_protocol_versions()
    .expect("protocol versions")
    .with_root_certificates(roots);
    let mut config = match client {
        None => builder.with_no_client_auth(),
        Some(c) => builder
            .with_client_auth_cert(
                vec![CertificateDer::from_pem_slice(c.cert_pem.as_bytes()).expect("cert pem")],
                PrivateKeyDer::from_pem_slice(c.key_pem.as_bytes()).expect("key pem"),
            )
            .expect("client cert"),
    };
    config.alpn_protocols = vec![b"http/1.1".to_vec()];
    config
}

/// POSTs `body` to `https://localhost{path}` at `addr` over HTTP/1.1 with
/// TLS trusting `ca`; reads the whole answer (the server closes).
pub async fn https_post(
    addr: SocketAddr,
    ca: &TestCa,
    path: &str,
    content_type: &str,
    body: &[u8],
) -> Result<HttpReply, String> {
    let connector = tokio_rustls::TlsConnector::from(Arc::new(rustls_client(ca, None)));
    let what = format!("POST https://{addr}{path}");
    let io = async {
        let tcp = tokio::net::TcpStream::connect(addr).await?;
        let name = rustls::pki_types::ServerName::try_from("localhost")
            .expect("valid name")
            .to_owned();
        let mut tls = connector.connect(name, tcp).await?;
        let head = format!(
            "POST {path} HTTP/1.1\r\nHost: localhost\r\nConnection: close\r\n\
             Content-Type: {content_type}\r\nContent-Length: {}\r\n\r\n",
            body.len()
        );
        tls.write_all(head.as_bytes()).await?;
        tls.write_all(body).await?;
        tls.flush().await?;
        let mut raw = Vec::new();
        // A peer that closes without close_notify is an error for rustls;
        // what was read up to then is the answer.
        match tls.read_to_end(&mut raw).await {
            Ok(_) => {}
            Err(e) if e.kind() == std::io::ErrorKind::UnexpectedEof && !raw.is_empty() => {}
            Err(e) => return Err(e),
        }
        Ok::<_, std::io::Error>(raw)
    };
    let raw = tokio::time::timeout(Duration::from_secs(10), io)
        .await
        .map_err(|_| format!("{what}: timed out"))?
        .map_err(|e| format!("{what}: {e}"))?;
    super::http::parse_reply(&raw).map_err(|e| format!("{what}: {e}"))
}
