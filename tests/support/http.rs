//! OTLP/HTTP helpers: a raw HTTP/1.1 client over loopback, and the
//! OpenTelemetry SDK's HTTP exporters (protobuf or JSON, optionally gzip).
//!
//! The raw client writes the body while it reads the answer, so a server that
//! answers early (413) does not deadlock it, and [`HeldRequest`] sends all but
//! the last bytes of a request and waits to be told to finish (a request that
//! is in flight across an agent's shutdown).
//!
//! The SDK helpers mirror [`super::sdk`] (same instruments, ids in `test.id`,
//! flush and shut down on a blocking thread) with `.with_http()`; the
//! exporters use the blocking reqwest client on the SDK's own threads.

use std::net::SocketAddr;
use std::time::Duration;

use opentelemetry_otlp::{Compression, Protocol, WithExportConfig, WithHttpConfig};
use opentelemetry_sdk::metrics::Temporality;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

use super::Signal;

/// How long one raw request may take, connect to last byte.
const REQUEST_DEADLINE: Duration = Duration::from_secs(10);

/// An HTTP answer.
#[derive(Clone, Debug)]
pub struct HttpReply {
    pub status: u16,
    /// Header names lower-cased, in order.
    pub headers: Vec<(String, String)>,
    pub body: Vec<u8>,
}

impl HttpReply {
    /// The first value of header `name` (case-insensitive).
    pub fn header(&self, name: &str) -> Option<&str> {
        let name = name.to_ascii_lowercase();
        self.headers
            .iter()
            .find(|(k, _)| *k == name)
            .map(|(_, v)| v.as_str())
    }

    pub fn text(&self) -> String {
        String::from_utf8_lossy(&self.body).into_owned()
    }
}

/// The bytes of one HTTP/1.1 request (`Connection: close`, `Content-Length`).
fn request_bytes(
    addr: SocketAddr,
    method: &str,
    path: &str,
    headers: &[(&str, &str)],
    body: &[u8],
) -> Vec<u8> {
    let mut head = format!("{method} {path} HTTP/1.1\r\nHost: {addr}\r\nConnection: close\r\n");
    for (k, v) in headers {
        head.push_str(&format!("{k}: {v}\r\n"));
    }
    head.push_str(&format!("Content-Length: {}\r\n\r\n", body.len()));
    let mut out = head.into_bytes();
    out.extend_from_slice(body);
    out
}

/// Sends one request and reads the whole answer (the server closes).
pub async fn request(
    addr: SocketAddr,
    method: &str,
    path: &str,
    headers: &[(&str, &str)],
    body: &[u8],
) -> Result<HttpReply, String> {
    let bytes = request_bytes(addr, method, path, headers, body);
    let what = format!("{method} http://{addr}{path}");
    let io = async {
        let stream = TcpStream::connect(addr).await?;
        exchange(stream, bytes).await
    };
    let raw = tokio::time::timeout(REQUEST_DEADLINE, io)
        .await
        .map_err(|_| format!("{what}: timed out"))?
        .map_err(|e| format!("{what}: {e}"))?;
    parse_reply(&raw).map_err(|e| format!("{what}: {e}"))
}

/// POST `body` to `path` with this content type (and optional encoding).
pub async fn post(
    addr: SocketAddr,
    path: &str,
    content_type: &str,
    content_encoding: Option<&str>,
    body: &[u8],
) -> Result<HttpReply, String> {
    let mut headers = vec![("Content-Type", content_type)];
    if let Some(encoding) = content_encoding {
        headers.push(("Content-Encoding", encoding));
    }
    request(addr, "POST", path, &headers, body).await
}

/// Write `bytes` while reading the answer to EOF; a write cut short by an
/// early answer is not an error.
async fn exchange(stream: TcpStream, bytes: Vec<u8>) -> std::io::Result<Vec<u8>> {
    let (mut reader, mut writer) = stream.into_split();
    let write = async move {
        let _ = writer.write_all(&bytes).await;
        // Keep the write half open: shutting it down would end the request early.
        writer
    };
    let read = async {
        let mut raw = Vec::new();
        reader.read_to_end(&mut raw).await.map(|_| raw)
    };
    let (_writer, raw) = tokio::join!(write, read);
    raw
}

/// A request sent except for its last bytes, held open until [`HeldRequest::finish`].
pub struct HeldRequest {
    stream: TcpStream,
    rest: Vec<u8>,
}

impl HeldRequest {
    /// Connects and sends all of the request but the last `hold_back` body bytes.
    pub async fn start(
        addr: SocketAddr,
        path: &str,
        headers: &[(&str, &str)],
        body: &[u8],
        hold_back: usize,
    ) -> Result<HeldRequest, String> {
        let mut bytes = request_bytes(addr, "POST", path, headers, body);
        let split = bytes.len() - hold_back.min(body.len());
        let rest = bytes.split_off(split);
        let io = async {
            let mut stream = TcpStream::connect(addr).await?;
            stream.write_all(&bytes).await?;
            Ok::<_, std::io::Error>(stream)
        };
        let stream = tokio::time::timeout(REQUEST_DEADLINE, io)
            .await
            .map_err(|_| format!("held POST {path}: timed out"))?
            .map_err(|e| format!("held POST {path}: {e}"))?;
        Ok(HeldRequest { stream, rest })
    }

    /// For a request sent with `Expect: 100-continue`: waits for the server's
    /// `100 Continue`, which proves its handler is reading the body (the
    /// request is in flight), and consumes it.
    pub async fn wait_continue(&mut self) -> Result<(), String> {
        let mut head = Vec::new();
        let mut byte = [0u8; 1];
        let read = async {
            // Bounded: a head over 1 KiB is not a `100 Continue`.
            while !head.ends_with(b"\r\n\r\n") && head.len() < 1024 {
                if self.stream.read(&mut byte).await? == 0 {
                    break;
                }
                head.push(byte[0]);
            }
            Ok::<_, std::io::Error>(())
        };
        tokio::time::timeout(REQUEST_DEADLINE, read)
            .await
            .map_err(|_| "held request: no 100 Continue".to_owned())?
            .map_err(|e| format!("held request: {e}"))?;
        match head.starts_with(b"HTTP/1.1 100") {
            true => Ok(()),
            false => Err(format!(
                "held request: expected 100 Continue, got {:?}",
                String::from_utf8_lossy(&head)
            )),
        }
    }

    /// Sends the held bytes and reads the answer.
    pub async fn finish(self) -> Result<HttpReply, String> {
        let raw = tokio::time::timeout(REQUEST_DEADLINE, exchange(self.stream, self.rest))
            .await
            .map_err(|_| "held request: timed out".to_owned())?
            .map_err(|e| format!("held request: {e}"))?;
        parse_reply(&raw)
    }
}

pub fn parse_reply(raw: &[u8]) -> Result<HttpReply, String> {
    let split = raw
        .windows(4)
        .position(|w| w == b"\r\n\r\n")
        .ok_or_else(|| format!("no complete head in {:?}", String::from_utf8_lossy(raw)))?;
    let head = String::from_utf8_lossy(&raw[..split]).into_owned();
    let mut body = raw[split + 4..].to_vec();
    let mut lines = head.lines();
    let status = lines
        .next()
        .and_then(|l| l.split_whitespace().nth(1))
        .and_then(|s| s.parse().ok())
        .ok_or_else(|| format!("no status line in {head:?}"))?;
    let headers: Vec<(String, String)> = lines
        .filter_map(|l| l.split_once(':'))
        .map(|(k, v)| (k.trim().to_ascii_lowercase(), v.trim().to_owned()))
        .collect();
    let chunked = headers
        .iter()
        .any(|(k, v)| k == "transfer-encoding" && v.eq_ignore_ascii_case("chunked"));
    if chunked {
        body = dechunk(&body)?;
    }
    Ok(HttpReply {
        status,
        headers,
        body,
    })
}

fn dechunk(mut raw: &[u8]) -> Result<Vec<u8>, String> {
    let mut out = Vec::new();
    // Bounded: every round consumes at least the size line.
    while let Some(eol) = raw.windows(2).position(|w| w == b"\r\n") {
        let size_text = String::from_utf8_lossy(&raw[..eol]);
        let size = usize::from_str_radix(size_text.split(';').next().unwrap_or("").trim(), 16)
            .map_err(|e| format!("bad chunk size {size_text:?}: {e}"))?;
        raw = &raw[eol + 2..];
        if size == 0 {
            return Ok(out);
        }
        let chunk = raw
            .get(..size)
            .ok_or_else(|| "truncated chunk".to_owned())?;
        out.extend_from_slice(chunk);
        raw = raw.get(size + 2..).unwrap_or(&[]);
    }
    Err("chunked body without its last chunk".into())
}

/// How the SDK's HTTP exporter is configured.
#[derive(Clone, Copy, Debug)]
pub struct HttpSdkOptions {
    /// JSON (`http/json`) instead of protobuf (`http/protobuf`).
    pub json: bool,
    pub gzip: bool,
}

impl HttpSdkOptions {
    fn protocol(&self) -> Protocol {
        match self.json {
            true => Protocol::HttpJson,
            false => Protocol::HttpBinary,
        }
    }

    fn compression(&self) -> Option<Compression> {
        self.gzip.then_some(Compression::Gzip)
    }
}

const SDK_TIMEOUT: Duration = Duration::from_secs(5);

fn sdk_err(what: &str, e: impl std::fmt::Display) -> String {
    format!("OpenTelemetry SDK {what}: {e}")
}

/// Emits one item of `signal` per id through the SDK's HTTP exporter to the
/// agent's OTLP/HTTP address; `Err` if an export failed (flush reports it).
pub async fn emit_http(
    signal: Signal,
    addr: SocketAddr,
    ids: &[u64],
    options: HttpSdkOptions,
) -> Result<(), String> {
    let url = format!("http://{addr}{}", signal.http_path());
    match signal {
        Signal::Traces => emit_spans(&url, ids, options).await,
        Signal::Metrics => emit_metrics(&url, ids, options).await,
        Signal::Logs => emit_logs(&url, ids, options).await,
    }
}

async fn emit_spans(url: &str, ids: &[u64], options: HttpSdkOptions) -> Result<(), String> {
    let mut builder = opentelemetry_otlp::SpanExporter::builder()
        .with_http()
        .with_protocol(options.protocol())
        .with_endpoint(url)
        .with_timeout(SDK_TIMEOUT);
    if let Some(c) = options.compression() {
        builder = builder.with_compression(c);
    }
    let exporter = builder.build().map_err(|e| sdk_err("span exporter", e))?;
    super::sdk::export_spans(exporter, ids).await
}

async fn emit_logs(url: &str, ids: &[u64], options: HttpSdkOptions) -> Result<(), String> {
    let mut builder = opentelemetry_otlp::LogExporter::builder()
        .with_http()
        .with_protocol(options.protocol())
        .with_endpoint(url)
        .with_timeout(SDK_TIMEOUT);
    if let Some(c) = options.compression() {
        builder = builder.with_compression(c);
    }
    let exporter = builder.build().map_err(|e| sdk_err("log exporter", e))?;
    super::sdk::export_logs(exporter, ids).await
}

async fn emit_metrics(url: &str, ids: &[u64], options: HttpSdkOptions) -> Result<(), String> {
    let mut builder = opentelemetry_otlp::MetricExporter::builder()
        .with_http()
        .with_protocol(options.protocol())
        .with_endpoint(url)
        .with_timeout(SDK_TIMEOUT)
        .with_temporality(Temporality::Delta);
    if let Some(c) = options.compression() {
        builder = builder.with_compression(c);
    }
    let exporter = builder.build().map_err(|e| sdk_err("metric exporter", e))?;
    super::sdk::export_metrics(exporter, ids).await
}
