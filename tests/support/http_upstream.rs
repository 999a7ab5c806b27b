//! An in-process OTLP/HTTP upstream (axum) that decodes and records every id
//! it accepts, for `upstream.protocol = "http/protobuf"` tests.
//!
//! `HttpUpstream::start()` serves `/v1/traces`, `/v1/metrics`, `/v1/logs`
//! (and any other path ending in one of those, for per-signal URLs) on
//! `127.0.0.1:0`. Bodies are decompressed by `Content-Encoding` (none,
//! gzip, zstd) and decoded with the OTLP types. Answers: 200 with an empty
//! response by default; [`HttpUpstream::script`] queues answers for the next
//! requests (a 503 with `Retry-After`, a 400 with a `google.rpc.Status`);
//! [`HttpUpstream::limit`] answers 413 to any request whose decompressed
//! body is larger; [`HttpUpstream::poison`] answers 400, as the Collector
//! does to a body it cannot decode, to any request holding a poisoned id.
//! Only requests answered 2xx contribute ids.

use std::collections::{BTreeSet, HashSet, VecDeque};
use std::io::Read;
use std::net::SocketAddr;
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::{Duration, Instant};

use axum::body::Bytes;
use axum::extract::State;
use axum::http::{HeaderMap, StatusCode, Uri};
use axum::response::{IntoResponse, Response};
use prost::Message;
use tokio::task::JoinHandle;

use super::ids::ids_in_bytes;
use super::Signal;

/// One scripted answer.
#[derive(Clone, Debug)]
pub struct Answer {
    pub status: u16,
    pub headers: Vec<(&'static str, String)>,
    pub body: Vec<u8>,
}

impl Answer {
    /// 503 with `Retry-After: seconds`.
    pub fn unavailable_retry_after(seconds: u64) -> Answer {
        Answer {
            status: 503,
            headers: vec![("retry-after", seconds.to_string())],
            body: Vec::new(),
        }
    }

    /// `status` with a `google.rpc.Status` body carrying `message`.
    pub fn status_body(status: u16, message: &str) -> Answer {
        let body = tonic_types::Status {
            code: 3,
            message: message.to_owned(),
            details: vec![],
        }
        .encode_to_vec();
        Answer {
            status,
            headers: vec![("content-type", "application/x-protobuf".into())],
            body,
        }
    }
}

/// What one request looked like.
#[derive(Clone, Debug)]
pub struct Seen {
    pub signal: Signal,
    pub path: String,
    pub at: Instant,
    pub status: u16,
    pub content_encoding: Option<String>,
    pub content_type: Option<String>,
    /// Decompressed body size.
    pub bytes: usize,
    pub version: axum::http::Version,
    pub headers: HeaderMap,
}

#[derive(Default)]
struct State_ {
    script: VecDeque<Answer>,
    limit: Option<usize>,
    poisoned: HashSet<u64>,
    received: [Vec<u64>; 3],
    seen: Vec<Seen>,
}

type Shared = Arc<Mutex<State_>>;

fn lock(shared: &Shared) -> MutexGuard<'_, State_> {
    shared.lock().unwrap_or_else(|e| e.into_inner())
}

fn signal_of(path: &str) -> Option<Signal> {
    Signal::ALL
        .into_iter()
        .find(|s| path.ends_with(s.http_path().trim_start_matches("/v1")))
}

fn decompress(encoding: Option<&str>, body: &[u8]) -> Result<Vec<u8>, String> {
    let mut out = Vec::new();
    match encoding {
        None | Some("identity") => return Ok(body.to_vec()),
        Some("gzip") => flate2::read::GzDecoder::new(body)
            .read_to_end(&mut out)
            .map_err(|e| format!("gzip: {e}"))?,
        Some("zstd") => zstd::stream::read::Decoder::new(body)
            .and_then(|mut d| d.read_to_end(&mut out))
            .map_err(|e| format!("zstd: {e}"))?,
        Some(other) => return Err(format!("unknown Content-Encoding {other}")),
    };
    Ok(out)
}

async fn handle(
    State(shared): State<Shared>,
    version: axum::http::Version,
    uri: Uri,
    headers: HeaderMap,
    body: Bytes,
) -> Response {
    let path = uri.path().to_owned();
    let Some(signal) = signal_of(&path) else {
        return (StatusCode::NOT_FOUND, "no such OTLP path").into_response();
    };
    let header = |name: &str| {
        headers
            .get(name)
            .and_then(|v| v.to_str().ok())
            .map(str::to_owned)
    };
    let encoding = header("content-encoding");
    let plain = match decompress(encoding.as_deref(), &body) {
        Ok(plain) => plain,
        Err(e) => return (StatusCode::BAD_REQUEST, e).into_response(),
    };
    let mut st = lock(&shared);
    let mut seen = Seen {
        signal,
        path,
        at: Instant::now(),
        status: 200,
        content_encoding: encoding,
        content_type: header("content-type"),
        bytes: plain.len(),
        version,
        headers: headers.clone(),
    };
    if let Ok(ids) = ids_in_bytes(signal, &plain) {
        if let Some(bad) = ids.iter().find(|id| st.poisoned.contains(id)) {
            let answer = Answer::status_body(400, &format!("request holds poisoned id {bad}"));
            seen.status = 400;
            st.seen.push(seen);
            return (StatusCode::BAD_REQUEST, answer.body).into_response();
        }
    }
    let answer = match st.limit {
        Some(limit) if plain.len() > limit => Answer {
            status: 413,
            headers: vec![],
            body: format!("request of {} bytes is over {limit}", plain.len()).into_bytes(),
        },
        _ => st.script.pop_front().unwrap_or(Answer {
            status: 200,
            headers: vec![],
            body: vec![],
        }),
    };
    seen.status = answer.status;
    if (200..300).contains(&answer.status) {
        match ids_in_bytes(signal, &plain) {
            Ok(ids) => st.received[signal.index()].extend(ids),
            Err(e) => {
                seen.status = 400;
                st.seen.push(seen);
                return (StatusCode::BAD_REQUEST, format!("not protobuf: {e}")).into_response();
            }
        }
    }
    st.seen.push(seen);
    let mut response = (
        StatusCode::from_u16(answer.status).unwrap_or(StatusCode::INTERNAL_SERVER_ERROR),
        answer.body,
    )
        .into_response();
    for (k, v) in answer.headers {
        if let Ok(v) = v.parse() {
            response.headers_mut().insert(k, v);
        }
    }
    response
}

fn app(shared: &Shared) -> axum::Router {
    axum::Router::new()
        .fallback(handle)
        .layer(axum::extract::DefaultBodyLimit::max(64 << 20))
        .with_state(shared.clone())
}

/// HTTP/1.1 and HTTP/2 (ALPN) over TLS, one task per connection.
async fn serve_tls(
    listener: tokio::net::TcpListener,
    app: axum::Router,
    tls: rustls::ServerConfig,
) {
    let acceptor = tokio_rustls::TlsAcceptor::from(Arc::new(tls));
    loop {
        let Ok((tcp, _)) = listener.accept().await else {
            return;
        };
        let (acceptor, app) = (acceptor.clone(), app.clone());
        tokio::spawn(async move {
            let Ok(stream) = acceptor.accept(tcp).await else {
                return;
            };
            let service = hyper_util::service::TowerToHyperService::new(app);
            let _ =
                hyper_util::server::conn::auto::Builder::new(hyper_util::rt::TokioExecutor::new())
                    .serve_connection(hyper_util::rt::TokioIo::new(stream), service)
                    .await;
        });
    }
}

/// The in-process OTLP/HTTP upstream. Dropping it stops the server.
pub struct HttpUpstream {
    shared: Shared,
    addr: SocketAddr,
    task: JoinHandle<()>,
    tls: bool,
}

impl HttpUpstream {
    pub async fn start() -> HttpUpstream {
        HttpUpstream::serve(None).await
    }

    /// Over TLS with this server certificate (ALPN `h2`, `http/1.1`);
    /// `endpoint()` is `https://localhost:PORT`.
    pub async fn start_tls(cert: &super::tls::CertKey) -> HttpUpstream {
        use rustls::pki_types::pem::PemObject;
        let chain = rustls::pki_types::CertificateDer::pem_slice_iter(cert.cert_pem.as_bytes())
            .collect::<Result<Vec<_>, _>>()
            .expect("test server certificate");
        let key = rustls::pki_types::PrivateKeyDer::from_pem_slice(cert.key_pem.as_bytes())
            .expect("test server key");
        let mut config = rustls::ServerConfig::builder_with_provider(Arc::new(
            rustls::crypto::ring::default_provider(),
        ))
        .with_safe_default_protocol_versions()
        .expect("TLS versions")
        .with_no_client_auth()
        .with_single_cert(chain, key)
        .expect("test server TLS config");
        config.alpn_protocols = vec![b"h2".to_vec(), b"http/1.1".to_vec()];
        HttpUpstream::serve(Some(config)).await
    }

    async fn serve(tls: Option<rustls::ServerConfig>) -> HttpUpstream {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
            .await
            .expect("bind test HTTP upstream on 127.0.0.1:0");
        let addr = listener.local_addr().expect("local_addr");
        let shared: Shared = Arc::default();
        let app = app(&shared);
        let is_tls = tls.is_some();
        let task = tokio::spawn(async move {
            match tls {
                Some(tls) => serve_tls(listener, app, tls).await,
                None => {
                    if let Err(e) = axum::serve(listener, app).await {
                        eprintln!("[http upstream] server ended: {e}");
                    }
                }
            }
        });
        HttpUpstream {
            shared,
            addr,
            task,
            tls: is_tls,
        }
    }

    /// `http://127.0.0.1:PORT` (`https://localhost:PORT` over TLS), the
    /// base URL for `upstream.endpoint`.
    pub fn endpoint(&self) -> String {
        match self.tls {
            true => format!("https://localhost:{}", self.addr.port()),
            false => format!("http://{}", self.addr),
        }
    }

    /// Answer the next requests with these, in order (then 200 again).
    pub fn script(&self, answers: impl IntoIterator<Item = Answer>) {
        lock(&self.shared).script.extend(answers);
    }

    /// Forget the answers not used yet.
    pub fn clear_script(&self) {
        lock(&self.shared).script.clear();
    }

    /// Answer 400 to any later request holding `id` (none of its ids are
    /// recorded), whatever is scripted.
    pub fn poison(&self, id: u64) {
        lock(&self.shared).poisoned.insert(id);
    }

    /// Answer 413 to requests whose decompressed body is over `bytes`.
    pub fn limit(&self, bytes: usize) {
        lock(&self.shared).limit = Some(bytes);
    }

    pub fn unique_ids(&self, signal: Signal) -> BTreeSet<u64> {
        lock(&self.shared).received[signal.index()]
            .iter()
            .copied()
            .collect()
    }

    pub fn duplicates(&self, signal: Signal) -> usize {
        let st = lock(&self.shared);
        let all = &st.received[signal.index()];
        all.len() - all.iter().collect::<HashSet<_>>().len()
    }

    /// Every request, in arrival order.
    pub fn seen(&self) -> Vec<Seen> {
        lock(&self.shared).seen.clone()
    }

    pub fn requests(&self, signal: Signal) -> usize {
        lock(&self.shared)
            .seen
            .iter()
            .filter(|s| s.signal == signal)
            .count()
    }

    /// Polls until every id of `expected` was received, or `deadline` passes.
    pub async fn wait_for_ids(
        &self,
        signal: Signal,
        expected: &BTreeSet<u64>,
        deadline: Duration,
    ) -> Result<(), String> {
        let started = Instant::now();
        loop {
            let missing = expected.difference(&self.unique_ids(signal)).count();
            if missing == 0 {
                return Ok(());
            }
            if started.elapsed() >= deadline {
                let statuses: Vec<u16> = self.seen().iter().map(|s| s.status).collect();
                return Err(format!(
                    "HTTP upstream is missing {missing} of {} {signal} ids after {deadline:?}; \
                     answers so far: {statuses:?}",
                    expected.len()
                ));
            }
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
    }

    /// Polls until `predicate(self)` holds or `deadline` passes.
    pub async fn wait_until(
        &self,
        what: &str,
        deadline: Duration,
        mut predicate: impl FnMut(&HttpUpstream) -> bool,
    ) -> Result<(), String> {
        let started = Instant::now();
        while !predicate(self) {
            if started.elapsed() >= deadline {
                return Err(format!(
                    "HTTP upstream: {what} did not happen within {deadline:?}"
                ));
            }
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        Ok(())
    }

    /// Exactly `expected` received: nothing missing, nothing extra, no duplicates.
    #[track_caller]
    pub fn assert_received_exactly(&self, signal: Signal, expected: &BTreeSet<u64>) {
        super::assert_ids_eq(
            &format!("HTTP upstream {signal}"),
            &self.unique_ids(signal),
            expected,
        );
        assert_eq!(self.duplicates(signal), 0, "duplicate {signal} ids");
    }
}

impl Drop for HttpUpstream {
    fn drop(&mut self) {
        self.task.abort();
    }
}
