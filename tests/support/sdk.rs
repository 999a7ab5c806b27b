//! Emitting through the real OpenTelemetry SDK (opentelemetry-otlp's tonic
//! exporter), so tests prove an unmodified application's exporter works.
//!
//! Each helper builds a provider exporting to `endpoint`, emits one item per
//! id carrying the int attribute `test.id`, then `force_flush`es and shuts the
//! provider down, returning the ids. The SDK's batch processors and periodic
//! reader run on their own threads and block in `force_flush`/`shutdown`, so
//! those run on `spawn_blocking`; the exporter's tonic channel is driven by
//! the test's tokio runtime (either flavour works).
//!
//! Metrics: one `u64` counter `test.counter`, `add(1, [test.id = id])` per
//! id, DELTA temporality. The SDK aggregates per attribute set, so each id
//! becomes its own NumberDataPoint in one Sum metric; the stream's
//! cardinality limit is raised to fit all ids (the default, 2000, would fold
//! the rest into one `otel.metric.overflow` point). Delta temporality
//! means the final collection at `shutdown` exports nothing again (with
//! cumulative every collection re-exports every point: duplicates).

use std::time::Duration;

use opentelemetry::logs::{LogRecord as _, Logger as _, LoggerProvider as _, Severity};
use opentelemetry::metrics::MeterProvider as _;
use opentelemetry::trace::{Span as _, Tracer as _, TracerProvider as _};
use opentelemetry::KeyValue;
use opentelemetry_otlp::{Compression, WithExportConfig, WithTonicConfig};
use opentelemetry_sdk::logs::SdkLoggerProvider;
use opentelemetry_sdk::metrics::{
    Instrument, PeriodicReader, SdkMeterProvider, Stream, Temporality,
};
use opentelemetry_sdk::trace::SdkTracerProvider;
use opentelemetry_sdk::Resource;

use super::ids::{fresh_ids, ID_KEY};
use super::Signal;

/// How the SDK exporter is configured.
#[derive(Clone, Debug)]
pub struct SdkOptions {
    pub gzip: bool,
    /// Exporter per-export timeout.
    pub timeout: Duration,
}

impl Default for SdkOptions {
    fn default() -> Self {
        SdkOptions {
            gzip: false,
            timeout: Duration::from_secs(5),
        }
    }
}

fn resource() -> Resource {
    Resource::builder()
        .with_service_name("telespool-sdk-test")
        .build()
}

fn sdk_err(what: &str, e: impl std::fmt::Display) -> String {
    format!("OpenTelemetry SDK {what}: {e}")
}

/// Emits `n` fresh ids of `signal` through the SDK to `endpoint`.
pub async fn emit(signal: Signal, endpoint: &str, n: usize) -> Result<Vec<u64>, String> {
    let ids = fresh_ids(n);
    emit_ids(signal, endpoint, &ids, &SdkOptions::default()).await?;
    Ok(ids)
}

pub async fn emit_spans(endpoint: &str, n: usize) -> Result<Vec<u64>, String> {
    emit(Signal::Traces, endpoint, n).await
}

pub async fn emit_logs(endpoint: &str, n: usize) -> Result<Vec<u64>, String> {
    emit(Signal::Logs, endpoint, n).await
}

pub async fn emit_metrics(endpoint: &str, n: usize) -> Result<Vec<u64>, String> {
    emit(Signal::Metrics, endpoint, n).await
}

/// Emits one item per id; `Err` if building, flushing or shutting down the
/// provider failed (a failed export surfaces here as a flush error).
pub async fn emit_ids(
    signal: Signal,
    endpoint: &str,
    ids: &[u64],
    options: &SdkOptions,
) -> Result<(), String> {
    match signal {
        Signal::Traces => emit_spans_ids(endpoint, ids, options).await,
        Signal::Metrics => emit_metrics_ids(endpoint, ids, options).await,
        Signal::Logs => emit_logs_ids(endpoint, ids, options).await,
    }
}

fn compression(options: &SdkOptions) -> Option<Compression> {
    options.gzip.then_some(Compression::Gzip)
}

/// Flush then shut down on a blocking thread; both results reported.
async fn flush_and_shutdown(
    what: &'static str,
    flush: impl FnOnce() -> Result<(), String> + Send + 'static,
    shutdown: impl FnOnce() -> Result<(), String> + Send + 'static,
) -> Result<(), String> {
    tokio::task::spawn_blocking(move || {
        let flushed = flush();
        let shut = shutdown();
        flushed.map_err(|e| format!("{what} force_flush: {e}"))?;
        shut.map_err(|e| format!("{what} shutdown: {e}"))
    })
    .await
    .map_err(|e| format!("{what} flush thread: {e}"))?
}

pub async fn emit_spans_ids(
    endpoint: &str,
    ids: &[u64],
    options: &SdkOptions,
) -> Result<(), String> {
    let mut builder = opentelemetry_otlp::SpanExporter::builder()
        .with_tonic()
        .with_endpoint(endpoint)
        .with_timeout(options.timeout);
    if let Some(c) = compression(options) {
        builder = builder.with_compression(c);
    }
    let exporter = builder.build().map_err(|e| sdk_err("span exporter", e))?;
    export_spans(exporter, ids).await
}

pub async fn emit_logs_ids(
    endpoint: &str,
    ids: &[u64],
    options: &SdkOptions,
) -> Result<(), String> {
    let mut builder = opentelemetry_otlp::LogExporter::builder()
        .with_tonic()
        .with_endpoint(endpoint)
        .with_timeout(options.timeout);
    if let Some(c) = compression(options) {
        builder = builder.with_compression(c);
    }
    let exporter = builder.build().map_err(|e| sdk_err("log exporter", e))?;
    export_logs(exporter, ids).await
}

pub async fn emit_metrics_ids(
    endpoint: &str,
    ids: &[u64],
    options: &SdkOptions,
) -> Result<(), String> {
    let mut builder = opentelemetry_otlp::MetricExporter::builder()
        .with_tonic()
        .with_endpoint(endpoint)
        .with_timeout(options.timeout)
        .with_temporality(Temporality::Delta);
    if let Some(c) = compression(options) {
        builder = builder.with_compression(c);
    }
    let exporter = builder.build().map_err(|e| sdk_err("metric exporter", e))?;
    export_metrics(exporter, ids).await
}

/// Emit one item per id through an already built exporter (gRPC or HTTP),
/// then flush and shut the provider down.
pub async fn export_spans(
    exporter: opentelemetry_otlp::SpanExporter,
    ids: &[u64],
) -> Result<(), String> {
    let config = opentelemetry_sdk::trace::BatchConfigBuilder::default()
        .with_max_queue_size(ids.len().max(2048) + 16)
        .with_max_export_batch_size(512)
        .with_scheduled_delay(Duration::from_millis(100))
        .build();
    let processor = opentelemetry_sdk::trace::BatchSpanProcessor::builder(exporter)
        .with_batch_config(config)
        .build();
    let provider = SdkTracerProvider::builder()
        .with_span_processor(processor)
        .with_resource(resource())
        .build();
    let tracer = provider.tracer("telespool-test");
    for &id in ids {
        let mut span = tracer
            .span_builder(format!("sdk-span-{id}"))
            .with_attributes(vec![KeyValue::new(ID_KEY, id as i64)])
            .start(&tracer);
        span.end();
    }
    let (p1, p2) = (provider.clone(), provider);
    flush_and_shutdown(
        "tracer provider",
        move || p1.force_flush().map_err(|e| e.to_string()),
        move || p2.shutdown().map_err(|e| e.to_string()),
    )
    .await
}

/// Emit one item per id through an already built exporter (gRPC or HTTP),
/// then flush and shut the provider down.
pub async fn export_logs(
    exporter: opentelemetry_otlp::LogExporter,
    ids: &[u64],
) -> Result<(), String> {
    let config = opentelemetry_sdk::logs::BatchConfigBuilder::default()
        .with_max_queue_size(ids.len().max(2048) + 16)
        .with_max_export_batch_size(512)
        .with_scheduled_delay(Duration::from_millis(100))
        .build();
    let processor = opentelemetry_sdk::logs::BatchLogProcessor::builder(exporter)
        .with_batch_config(config)
        .build();
    let provider = SdkLoggerProvider::builder()
        .with_log_processor(processor)
        .with_resource(resource())
        .build();
    let logger = provider.logger("telespool-test");
    for &id in ids {
        let mut record = logger.create_log_record();
        record.set_severity_number(Severity::Info);
        record.set_severity_text("INFO");
        record.set_body(format!("sdk log {id}").into());
        record.add_attribute(ID_KEY, id as i64);
        logger.emit(record);
    }
    let (p1, p2) = (provider.clone(), provider);
    flush_and_shutdown(
        "logger provider",
        move || p1.force_flush().map_err(|e| e.to_string()),
        move || p2.shutdown().map_err(|e| e.to_string()),
    )
    .await
}

/// Emit one item per id through an already built exporter (gRPC or HTTP),
/// then flush and shut the provider down.
pub async fn export_metrics(
    exporter: opentelemetry_otlp::MetricExporter,
    ids: &[u64],
) -> Result<(), String> {
    // Only force_flush and shutdown collect: the interval never fires in a test.
    let reader = PeriodicReader::builder(exporter)
        .with_interval(Duration::from_secs(3600))
        .build();
    let limit = ids.len() + 16;
    let provider = SdkMeterProvider::builder()
        .with_reader(reader)
        .with_resource(resource())
        .with_view(move |i: &Instrument| {
            (i.name() == "test.counter")
                .then(|| Stream::builder().with_cardinality_limit(limit).build().ok())
                .flatten()
        })
        .build();
    let meter = provider.meter("telespool-test");
    let counter = meter.u64_counter("test.counter").build();
    for &id in ids {
        counter.add(1, &[KeyValue::new(ID_KEY, id as i64)]);
    }
    let (p1, p2) = (provider.clone(), provider);
    flush_and_shutdown(
        "meter provider",
        move || p1.force_flush().map_err(|e| e.to_string()),
        move || p2.shutdown().map_err(|e| e.to_string()),
    )
    .await
}
