//! OTLP/HTTP export (`upstream.protocol = "http/protobuf"`) of raw batch bytes.
//!
//! The body is the batch's chunks as they are (sent as a list, not copied
//! into one buffer: [`ChunkBody`]; or compressed in one pass), `Content-Type: application/x-protobuf`, POSTed to the signal's
//! URL: `upstream.<signal>_endpoint` as given, else `upstream.endpoint` +
//! `/v1/<signal>`. One hyper-util pooled client per setup: keep-alive
//! connections (at most `upstream.concurrency` idle ones kept), HTTP/1.1, or
//! HTTP/2 when a TLS upstream picks `h2` by ALPN.
//!
//! Answers, as the OTLP/HTTP specification says ([`outcome`], pure): 2xx is
//! success, with a partial success decoded from the body; 429, 502, 503 and
//! 504 are retryable, honouring `Retry-After` (seconds or an HTTP date); 413
//! is "too large" (the pipeline splits the batch); 400 is a refused request
//! (the pipeline cuts the batch to find it, `pipeline/parts.rs`); any other
//! status drops the batch. Drops log the `google.rpc.Status` message of the body.
//! Redirects are not followed: the failure names the `Location`.

use std::sync::{Arc, RwLock};
use std::time::{Duration, SystemTime};

use bytes::Bytes;
use http::header::{CONTENT_ENCODING, CONTENT_TYPE, LOCATION, RETRY_AFTER};
use http::{HeaderMap, HeaderValue, StatusCode, Uri};
use http_body_util::BodyExt;
use hyper_util::client::legacy::Client;
use hyper_util::rt::TokioExecutor;
use prost::Message;

use super::body::ChunkBody;
use super::compress::{compress, decompress_reply, encoding_name};
use super::connect::{ClientTls, Connector};
use super::{partial_success, Accepted, Cause, ExportFailure, ExporterError, MAX_REPLY_BYTES};
use crate::config::{Compression, UpstreamConfig};
use crate::signal::Signal;

/// The signals' URLs and the TLS config, read before anything is bound.
#[derive(Clone, Debug)]
pub(super) struct HttpSetup {
    /// By `Signal::index`.
    urls: [Uri; 3],
    tls: Option<ClientTls>,
    connect_timeout: Duration,
    idle_per_host: usize,
}

impl HttpSetup {
    pub(super) fn load(cfg: &UpstreamConfig, endpoint: &str) -> Result<HttpSetup, ExporterError> {
        let per_signal = cfg.signal_endpoints();
        let mut urls = Vec::with_capacity(3);
        let mut https = false;
        for signal in Signal::ALL {
            let (key, given) = per_signal[signal.index()];
            let (key, url) = match given {
                Some(url) => (key, url.to_owned()),
                None => (
                    "upstream.endpoint",
                    format!("{}{}", endpoint.trim_end_matches('/'), signal.http_path()),
                ),
            };
            let uri: Uri = url.parse().map_err(|e| ExporterError::Url {
                key,
                url: url.clone(),
                message: format!("{e}"),
            })?;
            https |= uri.scheme_str() == Some("https");
            urls.push(uri);
        }
        let tls = match https {
            true => Some(ClientTls {
                config: Arc::new(crate::tls::http_client_config(cfg.tls.as_ref())?),
                server_name: cfg
                    .tls
                    .as_ref()
                    .and_then(|t| t.server_name.as_deref())
                    .and_then(|n| rustls::pki_types::ServerName::try_from(n.to_owned()).ok()),
            }),
            false => None,
        };
        let urls: [Uri; 3] = urls.try_into().map_err(|_| ExporterError::Url {
            key: "upstream.endpoint",
            url: endpoint.to_owned(),
            message: "not one URL per signal".into(),
        })?;
        Ok(HttpSetup {
            urls,
            tls,
            connect_timeout: cfg.timeout.min(Duration::from_secs(5)),
            idle_per_host: cfg.concurrency,
        })
    }

    fn client(&self) -> Client<Connector, ChunkBody> {
        Client::builder(TokioExecutor::new())
            .pool_max_idle_per_host(self.idle_per_host)
            .pool_idle_timeout(Duration::from_secs(90))
            .build(Connector::new(self.tls.clone(), self.connect_timeout))
    }
}

/// What a reload replaces: the client (new TLS files) and the headers. An
/// export takes clones when it starts and finishes on them.
struct Live {
    client: Client<Connector, ChunkBody>,
    headers: HeaderMap,
}

/// The OTLP/HTTP side of an [`super::Upstream`].
#[derive(Clone)]
pub(super) struct HttpUpstream {
    live: Arc<RwLock<Live>>,
    urls: [Uri; 3],
    timeout: Duration,
    compression: Compression,
}

impl std::fmt::Debug for HttpUpstream {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("HttpUpstream")
            .field("urls", &self.urls)
            .finish_non_exhaustive()
    }
}

impl HttpUpstream {
    /// Must be called inside a tokio runtime (the pool spawns its tasks there).
    pub(super) fn new(
        setup: HttpSetup,
        headers: HeaderMap,
        timeout: Duration,
        compression: Compression,
    ) -> HttpUpstream {
        HttpUpstream {
            live: Arc::new(RwLock::new(Live {
                client: setup.client(),
                headers,
            })),
            urls: setup.urls,
            timeout,
            compression,
        }
    }

    pub(super) fn reload(&self, setup: HttpSetup, headers: HeaderMap) {
        let client = setup.tls.is_some().then(|| setup.client());
        let mut live = self.live.write().unwrap_or_else(|e| e.into_inner());
        if let Some(client) = client {
            live.client = client;
        }
        live.headers = headers;
    }

    pub(super) async fn call(
        &self,
        signal: Signal,
        chunks: &[Bytes],
    ) -> Result<Accepted, ExportFailure> {
        let url = &self.urls[signal.index()];
        let no_answer = |what: &str, e: &dyn std::fmt::Display| ExportFailure {
            cause: Cause::NoAnswer,
            message: format!("upstream {url} {what}: {e}"),
            retry_after: None,
        };
        let body = match self.compression {
            Compression::None => ChunkBody::new(None, chunks),
            c => ChunkBody::one(Bytes::from(
                compress(chunks, c, 0).map_err(|e| no_answer("compression failed", &e))?,
            )),
        };
        let (client, extra) = {
            let live = self.live.read().unwrap_or_else(|e| e.into_inner());
            (live.client.clone(), live.headers.clone())
        };
        let mut request = http::Request::new(body);
        *request.method_mut() = http::Method::POST;
        *request.uri_mut() = url.clone();
        let headers = request.headers_mut();
        headers.extend(extra);
        headers.insert(
            CONTENT_TYPE,
            HeaderValue::from_static("application/x-protobuf"),
        );
        if let Some(name) = encoding_name(self.compression) {
            headers.insert(CONTENT_ENCODING, HeaderValue::from_static(name));
        }
        headers.insert(
            http::header::ACCEPT_ENCODING,
            HeaderValue::from_static("gzip, zstd"),
        );
        let exchange = async {
            let response = client
                .request(request)
                .await
                .map_err(|e| no_answer("connection failed", &error_chain(&e)))?;
            let (parts, body) = response.into_parts();
            let body = http_body_util::Limited::new(body, MAX_REPLY_BYTES)
                .collect()
                .await
                .map_err(|e| no_answer("reply cut off", &e))?
                .to_bytes();
            let encoding = parts
                .headers
                .get(CONTENT_ENCODING)
                .and_then(|v| v.to_str().ok());
            let body =
                decompress_reply(encoding, &body, MAX_REPLY_BYTES as u64).unwrap_or_default();
            outcome(
                signal,
                parts.status,
                &parts.headers,
                &body,
                SystemTime::now(),
            )
        };
        tokio::time::timeout(self.timeout, exchange)
            .await
            .map_err(|_| ExportFailure {
                cause: Cause::Timeout,
                message: format!("no answer from upstream {url} within {:?}", self.timeout),
                retry_after: None,
            })?
    }
}

/// An error and its sources, "a: b: c" (hyper's top-level message alone
/// says only "client error (Connect)").
fn error_chain(e: &dyn std::error::Error) -> String {
    let mut out = e.to_string();
    let mut source = e.source();
    while let Some(s) = source {
        out.push_str(": ");
        out.push_str(&s.to_string());
        source = s.source();
    }
    out
}

/// What upstream's answer means for the batch. `body` is the decompressed
/// reply; `now` dates a `Retry-After` given as an HTTP date.
pub(super) fn outcome(
    signal: Signal,
    status: StatusCode,
    headers: &HeaderMap,
    body: &[u8],
    now: SystemTime,
) -> Result<Accepted, ExportFailure> {
    if status.is_success() {
        return Ok(partial_success(signal, &Bytes::copy_from_slice(body)));
    }
    let cause = Cause::Http(status.as_u16());
    if status.is_redirection() {
        let location = headers
            .get(LOCATION)
            .and_then(|v| v.to_str().ok())
            .unwrap_or("(none)");
        return Err(ExportFailure {
            cause,
            message: format!(
                "upstream answered a redirect to Location {location}, which is not followed; \
                 set the upstream URL to where it points"
            ),
            retry_after: None,
        });
    }
    let retry_after = headers
        .get(RETRY_AFTER)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| crate::retry::parse_retry_after(v, now));
    let message = match tonic_types::Status::decode(body) {
        Ok(s) if !s.message.is_empty() => s.message,
        // Not a Status: show a little of what it is, if it is text.
        _ => String::from_utf8_lossy(&body[..body.len().min(200)])
            .trim()
            .to_owned(),
    };
    let message = match message.is_empty() {
        true => format!("upstream answered HTTP {status}"),
        false => format!("upstream answered HTTP {status}: {message}"),
    };
    Err(ExportFailure {
        cause,
        message,
        retry_after,
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::retry::{classify, Verdict};

    fn answer(
        status: u16,
        headers: &[(&'static str, &str)],
        body: &[u8],
    ) -> Result<Accepted, ExportFailure> {
        let mut map = HeaderMap::new();
        for (k, v) in headers {
            map.insert(*k, HeaderValue::from_str(v).unwrap());
        }
        let now = SystemTime::UNIX_EPOCH + Duration::from_secs(1_700_000_000);
        outcome(
            Signal::Traces,
            StatusCode::from_u16(status).unwrap(),
            &map,
            body,
            now,
        )
    }

    fn verdict(f: &ExportFailure) -> Verdict {
        classify(&f.cause, f.retry_after.is_some(), &f.message)
    }

    #[test]
    fn success_reads_partial_success_from_the_body() {
        use opentelemetry_proto::tonic::collector::trace::v1::{
            ExportTracePartialSuccess, ExportTraceServiceResponse,
        };
        let body = ExportTraceServiceResponse {
            partial_success: Some(ExportTracePartialSuccess {
                rejected_spans: 3,
                error_message: "three bad".into(),
            }),
        }
        .encode_to_vec();
        let accepted = answer(200, &[], &body).expect("2xx is success");
        assert_eq!(
            (accepted.rejected, accepted.message.as_str()),
            (3, "three bad")
        );
        assert_eq!(answer(202, &[], b"").expect("202").rejected, 0);
    }

    #[test]
    fn throttling_and_gateway_errors_are_retried_after_retry_after_seconds_or_date() {
        let f = answer(503, &[("retry-after", "2")], b"").unwrap_err();
        assert_eq!(
            (verdict(&f), f.retry_after),
            (Verdict::Retry, Some(Duration::from_secs(2)))
        );
        let f = answer(
            429,
            &[("retry-after", "Tue, 14 Nov 2023 22:13:30 GMT")],
            b"",
        )
        .unwrap_err();
        assert_eq!(
            (verdict(&f), f.retry_after),
            (Verdict::Retry, Some(Duration::from_secs(10)))
        );
        for status in [502, 504] {
            let f = answer(status, &[], b"").unwrap_err();
            assert_eq!((verdict(&f), f.retry_after), (Verdict::Retry, None));
        }
    }

    #[test]
    fn other_client_and_server_errors_drop_with_the_status_message() {
        let body = tonic_types::Status {
            code: 3,
            message: "span 7 has no trace id".into(),
            details: vec![],
        }
        .encode_to_vec();
        for status in [400, 401, 404, 500] {
            let f = answer(status, &[], &body).unwrap_err();
            let expected = match status {
                400 => Verdict::Refused,
                _ => Verdict::Drop,
            };
            assert_eq!(verdict(&f), expected, "{status}");
            assert!(
                f.message.contains("span 7 has no trace id"),
                "{}",
                f.message
            );
        }
        let f = answer(400, &[], b"plain text reason").unwrap_err();
        assert!(f.message.contains("plain text reason"), "{}", f.message);
    }

    #[test]
    fn too_large_is_split_and_redirects_are_not_followed() {
        let f = answer(413, &[], b"").unwrap_err();
        assert_eq!(verdict(&f), Verdict::TooLarge);
        let f = answer(308, &[("location", "https://elsewhere/v1/traces")], b"").unwrap_err();
        assert_eq!(verdict(&f), Verdict::Drop);
        assert!(
            f.message.contains("Location https://elsewhere/v1/traces"),
            "{}",
            f.message
        );
    }
}
