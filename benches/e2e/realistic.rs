//! The realistic payload (`--payload realistic`): requests that look like what
//! an instrumented HTTP service exports, so compression is measured on data
//! that compresses like real telemetry (gzip about 4–6×), not 60× like one
//! repeated string.
//!
//! - Spans: HTTP-server spans with 8 attributes (method, route, full URL with
//!   ids and a query, status code, user agent, client address, request id,
//!   server port), random trace ids (about four spans share a trace, each the
//!   parent of the next), names from the route, durations and error statuses
//!   that vary; about 500 bytes a span.
//! - Logs: bodies from a dozen templates filled with ids, addresses, amounts
//!   and timings; severities, loggers, threads and trace context that vary.
//! - Metrics: four instruments (sums and gauges), each point with its own
//!   attribute set (route, method, status, server, pool).
//!
//! Everything comes from a seeded RNG: request `j` is the same bytes in every
//! run (seed [`SEED`] mixed with `j`), whatever the order it is built in.
//!
//! Counting: the sinks read a span's id from its span id (the harness
//! `Upstream` falls back to it when a span has no `test.id`), a log record's
//! or data point's from its first int attribute `test.id`. Sequential ids would make span ids
//! the one non-random field, so the id carried is [`mix`] of the counting id
//! (the splitmix64 finalizer, a bijection on u64); [`unmix`] turns what the
//! sink saw back into the counting id.

use opentelemetry_proto::tonic::collector::logs::v1::ExportLogsServiceRequest;
use opentelemetry_proto::tonic::collector::metrics::v1::ExportMetricsServiceRequest;
use opentelemetry_proto::tonic::collector::trace::v1::ExportTraceServiceRequest;
use opentelemetry_proto::tonic::common::v1::{any_value, AnyValue, InstrumentationScope, KeyValue};
use opentelemetry_proto::tonic::logs::v1::{LogRecord, ResourceLogs, ScopeLogs};
use opentelemetry_proto::tonic::metrics::v1::{
    metric, number_data_point, AggregationTemporality, Gauge, Metric, NumberDataPoint,
    ResourceMetrics, ScopeMetrics, Sum,
};
use opentelemetry_proto::tonic::resource::v1::Resource;
use opentelemetry_proto::tonic::trace::v1::{status, ResourceSpans, ScopeSpans, Span, Status};
use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};

use crate::support::{ExportRequest, Signal};

/// The payload seed; request `j` uses `SEED ^ mix(j)`.
pub const SEED: u64 = 0x7e1e_5b00_1000_0017;

const NOW_NANOS: u64 = 1_760_000_000_000_000_000;

/// The splitmix64 finalizer: a bijection that makes sequential ids look random.
pub fn mix(mut x: u64) -> u64 {
    x ^= x >> 30;
    x = x.wrapping_mul(0xbf58_476d_1ce4_e5b9);
    x ^= x >> 27;
    x = x.wrapping_mul(0x94d0_49bb_1331_11eb);
    x ^ (x >> 31)
}

/// The inverse of [`mix`].
pub fn unmix(mut x: u64) -> u64 {
    x ^= (x >> 31) ^ (x >> 62);
    x = x.wrapping_mul(0x3196_42b2_d24d_8ec3);
    x ^= (x >> 27) ^ (x >> 54);
    x = x.wrapping_mul(0x96de_1b17_3f11_9089);
    x ^ (x >> 30) ^ (x >> 60)
}

const SERVICES: &[&str] = &[
    "checkout", "cart", "payments", "frontend", "search", "accounts", "catalog", "shipping",
];
const METHODS: &[(&str, u32)] = &[
    ("GET", 70),
    ("POST", 18),
    ("PUT", 6),
    ("DELETE", 4),
    ("PATCH", 2),
];
/// (route template, URL path with `{}` for ids)
const ROUTES: &[&str] = &[
    "/api/v1/users/{user_id}",
    "/api/v1/users/{user_id}/orders",
    "/api/v1/users/{user_id}/orders/{order_id}",
    "/api/v1/products/{product_id}",
    "/api/v1/products/{product_id}/reviews",
    "/api/v1/cart/{cart_id}/items",
    "/api/v1/checkout/{session_id}/confirm",
    "/api/v2/search",
    "/api/v1/payments/{payment_id}/capture",
    "/healthz",
    "/api/v1/shipping/quotes",
    "/api/v1/accounts/{account_id}/preferences",
];
const USER_AGENTS: &[&str] = &[
    "Mozilla/5.0 (Windows NT 10.0; Win64; x64) AppleWebKit/537.36 (KHTML, like Gecko) Chrome/131.0.0.0 Safari/537.36",
    "Mozilla/5.0 (Macintosh; Intel Mac OS X 14_6_1) AppleWebKit/605.1.15 (KHTML, like Gecko) Version/18.1 Safari/605.1.15",
    "Mozilla/5.0 (iPhone; CPU iPhone OS 18_1 like Mac OS X) AppleWebKit/605.1.15 (KHTML, like Gecko) Version/18.1 Mobile/15E148 Safari/604.1",
    "Mozilla/5.0 (X11; Linux x86_64; rv:132.0) Gecko/20100101 Firefox/132.0",
    "Mozilla/5.0 (Linux; Android 14; Pixel 8) AppleWebKit/537.36 (KHTML, like Gecko) Chrome/130.0.6723.102 Mobile Safari/537.36",
    "okhttp/4.12.0",
    "python-requests/2.32.3",
    "Go-http-client/2.0",
    "curl/8.10.1",
];
const STATUSES: &[(i64, u32)] = &[
    (200, 80),
    (201, 6),
    (204, 3),
    (304, 2),
    (400, 3),
    (401, 1),
    (404, 3),
    (429, 1),
    (500, 1),
];

fn weighted<T: Copy>(rng: &mut StdRng, items: &[(T, u32)]) -> T {
    let total: u32 = items.iter().map(|(_, w)| w).sum();
    let mut pick = rng.random_range(0..total);
    for &(item, w) in items {
        if pick < w {
            return item;
        }
        pick -= w;
    }
    items[0].0
}

/// Half browsers, half service and mobile clients (shorter strings).
fn user_agent(rng: &mut StdRng) -> &'static str {
    match rng.random_bool(0.5) {
        true => pick(rng, &USER_AGENTS[..5]),
        false => pick(rng, &USER_AGENTS[5..]),
    }
}

fn pick<'a>(rng: &mut StdRng, items: &[&'a str]) -> &'a str {
    items[rng.random_range(0..items.len())]
}

fn random_bytes(rng: &mut StdRng, n: usize) -> Vec<u8> {
    (0..n).map(|_| rng.random()).collect()
}

fn hex(rng: &mut StdRng, bytes: usize) -> String {
    random_bytes(rng, bytes)
        .iter()
        .map(|b| format!("{b:02x}"))
        .collect()
}

fn uuid(rng: &mut StdRng) -> String {
    let h = hex(rng, 16);
    format!(
        "{}-{}-4{}-a{}-{}",
        &h[0..8],
        &h[8..12],
        &h[13..16],
        &h[17..20],
        &h[20..32]
    )
}

fn kv(key: &str, value: any_value::Value) -> KeyValue {
    KeyValue {
        key: key.to_owned(),
        value: Some(AnyValue { value: Some(value) }),
        ..Default::default()
    }
}

fn s(key: &str, value: impl Into<String>) -> KeyValue {
    kv(key, any_value::Value::StringValue(value.into()))
}

fn i(key: &str, value: i64) -> KeyValue {
    kv(key, any_value::Value::IntValue(value))
}

fn ip(rng: &mut StdRng) -> String {
    match rng.random_range(0..3) {
        0 => format!(
            "10.{}.{}.{}",
            rng.random_range(0..64),
            rng.random::<u8>(),
            rng.random_range(1..255)
        ),
        1 => format!(
            "192.168.{}.{}",
            rng.random_range(0..16),
            rng.random_range(1..255)
        ),
        _ => format!(
            "{}.{}.{}.{}",
            rng.random_range(1..224),
            rng.random::<u8>(),
            rng.random::<u8>(),
            rng.random_range(1..255)
        ),
    }
}

fn resource(rng: &mut StdRng, service: &str) -> Option<Resource> {
    Some(Resource {
        attributes: vec![
            s("service.name", service),
            s(
                "service.version",
                format!("1.{}.{}", rng.random_range(0..4), rng.random_range(0..20)),
            ),
            s("deployment.environment.name", "production"),
            s(
                "host.name",
                format!("node-{:02}.eu-west-1.internal", rng.random_range(1..40)),
            ),
            s(
                "k8s.pod.name",
                format!("{service}-7d9f{}-{}", hex(rng, 2), hex(rng, 3)),
            ),
            s(
                "telemetry.sdk.language",
                pick(rng, &["java", "go", "python", "nodejs", "dotnet"]),
            ),
        ],
        ..Default::default()
    })
}

fn scope(name: &str) -> Option<InstrumentationScope> {
    Some(InstrumentationScope {
        name: name.to_owned(),
        version: "0.58.0".to_owned(),
        ..Default::default()
    })
}

/// A route template filled in: (route, path).
fn route(rng: &mut StdRng) -> (&'static str, String) {
    let route = pick(rng, ROUTES);
    let mut path = String::with_capacity(route.len() + 16);
    for part in route.split('/').filter(|p| !p.is_empty()) {
        path.push('/');
        match part.starts_with('{') {
            true if part.contains("session") || part.contains("payment") => {
                path.push_str(&hex(rng, 8))
            }
            true => path.push_str(&rng.random_range(1_000..9_999_999u32).to_string()),
            false => path.push_str(part),
        }
    }
    (route, path)
}

fn request_rng(j: usize) -> StdRng {
    StdRng::seed_from_u64(SEED ^ mix(j as u64))
}

/// Request `j` of `signal`, one item per id (ids are counting ids, mixed here).
pub fn build(signal: Signal, j: usize, ids: &[u64]) -> ExportRequest {
    let mut rng = request_rng(j);
    let service = pick(&mut rng, SERVICES);
    match signal {
        Signal::Traces => ExportRequest::Traces(spans(&mut rng, service, j, ids)),
        Signal::Logs => ExportRequest::Logs(logs(&mut rng, service, j, ids)),
        Signal::Metrics => ExportRequest::Metrics(metrics(&mut rng, service, j, ids)),
    }
}

fn spans(rng: &mut StdRng, service: &str, j: usize, ids: &[u64]) -> ExportTraceServiceRequest {
    let base = NOW_NANOS + j as u64 * 50_000_000;
    let host = format!("{service}.shop.example");
    let mut trace_id = random_bytes(rng, 16);
    // The trace's previous span: the parent of the next one in the same trace.
    let mut parent: Vec<u8> = random_bytes(rng, 8);
    let spans = ids
        .iter()
        .map(|&id| {
            // About four spans per trace; a new trace's root has a remote
            // parent (random) or none.
            if rng.random_range(0..4) == 0 {
                trace_id = random_bytes(rng, 16);
                parent = match rng.random_bool(0.5) {
                    true => random_bytes(rng, 8),
                    false => Vec::new(),
                };
            }
            let span_id = mix(id).to_be_bytes().to_vec();
            let parent_span_id = std::mem::replace(&mut parent, span_id.clone());
            let method = weighted(rng, METHODS);
            let (route, path) = route(rng);
            let status = weighted(rng, STATUSES);
            let query = match rng.random_range(0..4) {
                0 => format!(
                    "?page={}&limit={}",
                    rng.random_range(1..40),
                    pick(rng, &["20", "50", "100"])
                ),
                1 => format!(
                    "?q={}&sort={}",
                    pick(rng, &["shoes", "red+dress", "laptop", "usb-c", "gift"]),
                    pick(rng, &["price", "relevance", "newest"])
                ),
                _ => String::new(),
            };
            let start = base + rng.random_range(0..50_000_000);
            let duration = 200_000u64 << rng.random_range(0..10);
            Span {
                trace_id: trace_id.clone(),
                span_id,
                parent_span_id,
                name: format!("{method} {route}"),
                kind: 2,
                start_time_unix_nano: start,
                end_time_unix_nano: start + duration + rng.random_range(0..duration),
                attributes: vec![
                    s("http.request.method", method),
                    s("http.route", route),
                    s("url.full", format!("https://{host}{path}{query}")),
                    i("http.response.status_code", status),
                    s("user_agent.original", user_agent(rng)),
                    s("client.address", ip(rng)),
                    s("http.request.header.x-request-id", uuid(rng)),
                    // The counting id is the span id (see the module doc).
                    i("server.port", 443),
                ],
                status: Some(Status {
                    code: match status >= 500 {
                        true => status::StatusCode::Error as i32,
                        false => status::StatusCode::Unset as i32,
                    },
                    message: String::new(),
                }),
                ..Default::default()
            }
        })
        .collect();
    ExportTraceServiceRequest {
        resource_spans: vec![ResourceSpans {
            resource: resource(rng, service),
            scope_spans: vec![ScopeSpans {
                scope: scope("io.opentelemetry.tomcat-10.0"),
                spans,
                schema_url: "https://opentelemetry.io/schemas/1.27.0".to_owned(),
            }],
            schema_url: String::new(),
        }],
    }
}

fn log_body(rng: &mut StdRng) -> (i32, &'static str, String) {
    let (route, path) = route(rng);
    match rng.random_range(0..12) {
        0 => (
            9,
            "INFO",
            format!(
                "{} {path} completed with {} in {} ms",
                weighted(rng, METHODS),
                weighted(rng, STATUSES),
                rng.random_range(1..900)
            ),
        ),
        1 => (
            9,
            "INFO",
            format!(
                "user {} signed in from {}",
                rng.random_range(1_000..9_999_999u32),
                ip(rng)
            ),
        ),
        2 => (
            9,
            "INFO",
            format!(
                "payment {} authorised: {}.{:02} EUR",
                hex(rng, 8),
                rng.random_range(1..900),
                rng.random_range(0..100)
            ),
        ),
        3 => (
            5,
            "DEBUG",
            format!(
                "cache miss for key product:{} (ttl {} s)",
                rng.random_range(1..500_000),
                rng.random_range(30..3600)
            ),
        ),
        4 => (
            13,
            "WARN",
            format!(
                "retrying request to {}.internal:8080 (attempt {} of 5) after {} ms",
                pick(rng, SERVICES),
                rng.random_range(2..5),
                rng.random_range(50..2000)
            ),
        ),
        5 => (
            17,
            "ERROR",
            format!(
                "upstream {route} failed: connection reset by peer ({})",
                ip(rng)
            ),
        ),
        6 => (
            9,
            "INFO",
            format!(
                "order {} placed with {} items, total {}.{:02}",
                rng.random_range(100_000..9_999_999u32),
                rng.random_range(1..12),
                rng.random_range(5..2000),
                rng.random_range(0..100)
            ),
        ),
        7 => (
            13,
            "WARN",
            format!(
                "slow query on table {} took {} ms: SELECT * FROM {} WHERE id = {}",
                pick(rng, &["orders", "users", "carts"]),
                rng.random_range(200..5000),
                pick(rng, &["orders", "users", "carts"]),
                rng.random_range(1..9_999_999u32)
            ),
        ),
        8 => (
            9,
            "INFO",
            format!(
                "session {} refreshed, expires in {} s",
                uuid(rng),
                rng.random_range(600..86_400)
            ),
        ),
        9 => (
            5,
            "DEBUG",
            format!(
                "feature flag {} evaluated to {} for tenant {}",
                pick(rng, &["new-checkout", "fast-search", "dark-mode"]),
                rng.random_bool(0.5),
                rng.random_range(1..5000)
            ),
        ),
        10 => (
            17,
            "ERROR",
            format!(
                "java.lang.IllegalStateException: cart {} is locked by request {}",
                rng.random_range(1..9_999_999u32),
                uuid(rng)
            ),
        ),
        _ => (
            9,
            "INFO",
            format!("GET {path} 200 {} bytes", rng.random_range(200..90_000)),
        ),
    }
}

fn logs(rng: &mut StdRng, service: &str, j: usize, ids: &[u64]) -> ExportLogsServiceRequest {
    let base = NOW_NANOS + j as u64 * 50_000_000;
    let log_records = ids
        .iter()
        .map(|&id| {
            let (severity, text, body) = log_body(rng);
            let time = base + rng.random_range(0..50_000_000);
            LogRecord {
                time_unix_nano: time,
                observed_time_unix_nano: time + rng.random_range(0..2_000_000),
                severity_number: severity,
                severity_text: text.to_owned(),
                body: Some(AnyValue {
                    value: Some(any_value::Value::StringValue(body)),
                }),
                attributes: vec![
                    i("test.id", mix(id) as i64),
                    s(
                        "log.logger",
                        format!(
                            "com.shop.{service}.{}",
                            pick(
                                rng,
                                &[
                                    "web.OrderController",
                                    "service.CartService",
                                    "repo.JdbcRepository",
                                    "client.HttpClient"
                                ]
                            )
                        ),
                    ),
                    s(
                        "thread.name",
                        format!("http-nio-8080-exec-{}", rng.random_range(1..200)),
                    ),
                    s(
                        "code.function",
                        pick(
                            rng,
                            &["handle", "process", "findById", "execute", "onMessage"],
                        ),
                    ),
                ],
                trace_id: random_bytes(rng, 16),
                span_id: random_bytes(rng, 8),
                flags: 1,
                ..Default::default()
            }
        })
        .collect();
    ExportLogsServiceRequest {
        resource_logs: vec![ResourceLogs {
            resource: resource(rng, service),
            scope_logs: vec![ScopeLogs {
                scope: scope("org.slf4j"),
                log_records,
                schema_url: String::new(),
            }],
            schema_url: String::new(),
        }],
    }
}

fn metrics(rng: &mut StdRng, service: &str, j: usize, ids: &[u64]) -> ExportMetricsServiceRequest {
    let time = NOW_NANOS + j as u64 * 10_000_000_000;
    let point = |rng: &mut StdRng, id: u64, kind: usize| {
        let mut attributes = vec![i("test.id", mix(id) as i64)];
        let value = match kind {
            0 | 1 => {
                attributes.push(s("http.request.method", weighted(rng, METHODS)));
                attributes.push(s("http.route", route(rng).0));
                attributes.push(i("http.response.status_code", weighted(rng, STATUSES)));
                attributes.push(s("server.address", format!("{service}.shop.example.com")));
                match kind {
                    0 => number_data_point::Value::AsInt(rng.random_range(1..50_000)),
                    _ => number_data_point::Value::AsDouble(rng.random_range(0.0..2.5)),
                }
            }
            2 => {
                attributes.push(s(
                    "db.client.connection.pool.name",
                    format!(
                        "{service}-{}",
                        pick(rng, &["primary", "replica", "reporting"])
                    ),
                ));
                attributes.push(s(
                    "db.client.connection.state",
                    pick(rng, &["idle", "used"]),
                ));
                number_data_point::Value::AsInt(rng.random_range(0..64))
            }
            _ => {
                attributes.push(s(
                    "messaging.destination.name",
                    format!(
                        "{}.{}",
                        pick(rng, SERVICES),
                        pick(rng, &["events", "commands", "dlq"])
                    ),
                ));
                attributes.push(s(
                    "messaging.consumer.group.name",
                    format!("{service}-workers"),
                ));
                number_data_point::Value::AsDouble(rng.random_range(0.0..10_000.0))
            }
        };
        NumberDataPoint {
            attributes,
            start_time_unix_nano: time - 10_000_000_000,
            time_unix_nano: time + rng.random_range(0..1_000_000),
            value: Some(value),
            ..Default::default()
        }
    };
    let mut per_kind: [Vec<NumberDataPoint>; 4] = Default::default();
    for (n, &id) in ids.iter().enumerate() {
        per_kind[n % 4].push(point(rng, id, n % 4));
    }
    let [requests, duration, pool, lag] = per_kind;
    let sum = |name: &str, unit: &str, data_points| Metric {
        name: name.to_owned(),
        unit: unit.to_owned(),
        data: Some(metric::Data::Sum(Sum {
            data_points,
            aggregation_temporality: AggregationTemporality::Delta as i32,
            is_monotonic: true,
        })),
        ..Default::default()
    };
    let gauge = |name: &str, unit: &str, data_points| Metric {
        name: name.to_owned(),
        unit: unit.to_owned(),
        data: Some(metric::Data::Gauge(Gauge { data_points })),
        ..Default::default()
    };
    ExportMetricsServiceRequest {
        resource_metrics: vec![ResourceMetrics {
            resource: resource(rng, service),
            scope_metrics: vec![ScopeMetrics {
                scope: scope("io.opentelemetry.runtime-telemetry"),
                metrics: vec![
                    sum("http.server.request.count", "{request}", requests),
                    gauge("http.server.request.duration.p99", "s", duration),
                    gauge("db.client.connection.count", "{connection}", pool),
                    gauge("messaging.consumer.lag", "{message}", lag),
                ],
                schema_url: String::new(),
            }],
            schema_url: String::new(),
        }],
    }
}
