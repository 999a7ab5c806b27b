//! Cost of accepting a batch of trace requests on the forwarding path.
//!
//! For 64 requests of 10, 100 and 1000 spans each (5 attributes per span, 200-byte
//! values), compares:
//! - `walk_concat`: the agent's path, [`telespool::wire::walk`] over each body then
//!   concatenation into one upstream body (DESIGN.md decision 2);
//! - `prost_decode_merge_encode`: decoding each body into an
//!   `ExportTraceServiceRequest`, merging the resource lists and encoding once;
//! - `walk_only`: the walk without the copy, to separate the two costs.
//!
//! Throughput is in spans, so criterion reports time per span.
//!
//! The `stamp_64_requests` group measures the `[resource]` stamp against the
//! plain walk, per request as the receiver does it: `walk` alone, then
//! `walk_stamp_keep` / `walk_stamp_replace` (three attributes, one of which,
//! `service.name`, the request already has: kept, or cut out and replaced),
//! and `prost_decode_stamp_encode`, what a decoding agent would do.
// Tests and benches drive real processes and sockets: wall-clock time,
// not tokio's (clippy.toml keeps std's Instant out of the agent's code).
#![allow(clippy::disallowed_types)]

use bytes::{Bytes, BytesMut};
use criterion::{criterion_group, criterion_main, BenchmarkId, Criterion, Throughput};
use opentelemetry_proto::tonic::collector::trace::v1::ExportTraceServiceRequest;
use opentelemetry_proto::tonic::common::v1::{any_value, AnyValue, InstrumentationScope, KeyValue};
use opentelemetry_proto::tonic::resource::v1::Resource;
use opentelemetry_proto::tonic::trace::v1::{ResourceSpans, ScopeSpans, Span};
use prost::Message;
use std::hint::black_box;
use telespool::signal::Signal;
use telespool::wire::stamp::{Conflict, Stamp};
use telespool::wire::walk;

const REQUESTS_PER_BATCH: usize = 64;

fn string_kv(key: &str, value: String) -> KeyValue {
    KeyValue {
        key: key.to_owned(),
        value: Some(AnyValue {
            value: Some(any_value::Value::StringValue(value)),
        }),
        ..Default::default()
    }
}

fn request(spans: usize, seed: usize) -> ExportTraceServiceRequest {
    let spans = (0..spans)
        .map(|i| Span {
            trace_id: (0..16).map(|b| (b + i + seed) as u8).collect(),
            span_id: (0..8).map(|b| (b * 3 + i) as u8).collect(),
            name: format!("GET /api/items/{i}"),
            kind: 2,
            start_time_unix_nano: 1_700_000_000_000_000_000 + i as u64,
            end_time_unix_nano: 1_700_000_000_000_900_000 + i as u64,
            attributes: (0..5)
                .map(|a| {
                    string_kv(
                        &format!("attr.{a}"),
                        format!("{a}{i}").repeat(200)[..200].to_owned(),
                    )
                })
                .collect(),
            ..Default::default()
        })
        .collect();
    ExportTraceServiceRequest {
        resource_spans: vec![ResourceSpans {
            resource: Some(Resource {
                attributes: vec![string_kv("service.name", format!("svc-{seed}"))],
                ..Default::default()
            }),
            scope_spans: vec![ScopeSpans {
                scope: Some(InstrumentationScope {
                    name: "bench".to_owned(),
                    ..Default::default()
                }),
                spans,
                schema_url: String::new(),
            }],
            schema_url: String::new(),
        }],
    }
}

fn walk_concat(bodies: &[Bytes]) -> BytesMut {
    let total = bodies.iter().map(Bytes::len).sum();
    let mut out = BytesMut::with_capacity(total);
    for body in bodies {
        walk(Signal::Traces, body).expect("valid request");
        out.extend_from_slice(body);
    }
    out
}

fn decode_merge_encode(bodies: &[Bytes]) -> Vec<u8> {
    let mut merged = ExportTraceServiceRequest::default();
    for body in bodies {
        let request = ExportTraceServiceRequest::decode(body.clone()).expect("valid request");
        merged.resource_spans.extend(request.resource_spans);
    }
    merged.encode_to_vec()
}

fn bench_wire(c: &mut Criterion) {
    let mut group = c.benchmark_group("trace_batch_of_64");
    for spans in [10usize, 100, 1000] {
        let bodies: Vec<Bytes> = (0..REQUESTS_PER_BATCH)
            .map(|seed| Bytes::from(request(spans, seed).encode_to_vec()))
            .collect();
        // Both paths must produce the same upstream request.
        let merged = ExportTraceServiceRequest::decode(walk_concat(&bodies).freeze())
            .expect("concatenation decodes");
        assert_eq!(merged.encode_to_vec(), decode_merge_encode(&bodies));

        if spans == 1000 {
            group.sample_size(10);
        }
        group.throughput(Throughput::Elements((spans * REQUESTS_PER_BATCH) as u64));
        group.bench_with_input(
            BenchmarkId::new("walk_concat", spans),
            &bodies,
            |b, bodies| b.iter(|| walk_concat(black_box(bodies))),
        );
        group.bench_with_input(
            BenchmarkId::new("walk_only", spans),
            &bodies,
            |b, bodies| {
                b.iter(|| {
                    for body in black_box(bodies) {
                        black_box(walk(Signal::Traces, body).expect("valid request"));
                    }
                })
            },
        );
        group.bench_with_input(
            BenchmarkId::new("prost_decode_merge_encode", spans),
            &bodies,
            |b, bodies| b.iter(|| decode_merge_encode(black_box(bodies))),
        );
    }
    group.finish();
}

fn stamp_attributes() -> Vec<(String, String)> {
    [
        ("deployment.environment", "production"),
        ("k8s.cluster.name", "eu-west-1-prod"),
        ("service.name", "from-the-agent"),
    ]
    .map(|(k, v)| (k.to_owned(), v.to_owned()))
    .to_vec()
}

fn walk_stamp(bodies: &[Bytes], stamp: &Stamp) -> usize {
    let mut len = 0;
    for body in bodies {
        walk(Signal::Traces, body).expect("valid request");
        len += stamp
            .apply(Signal::Traces, body, usize::MAX)
            .expect("stamps")
            .len();
    }
    len
}

fn decode_stamp_encode(bodies: &[Bytes]) -> usize {
    let mut len = 0;
    for body in bodies {
        let mut request = ExportTraceServiceRequest::decode(body.clone()).expect("valid request");
        for entry in &mut request.resource_spans {
            let resource = entry.resource.get_or_insert_with(Resource::default);
            for (key, value) in stamp_attributes() {
                if !resource.attributes.iter().any(|kv| kv.key == key) {
                    resource.attributes.push(string_kv(&key, value));
                }
            }
        }
        len += request.encode_to_vec().len();
    }
    len
}

fn bench_stamp(c: &mut Criterion) {
    let mut group = c.benchmark_group("stamp_64_requests");
    let keep = Stamp::new(&stamp_attributes(), Conflict::Keep);
    let replace = Stamp::new(&stamp_attributes(), Conflict::Replace);
    for spans in [10usize, 100] {
        let bodies: Vec<Bytes> = (0..REQUESTS_PER_BATCH)
            .map(|seed| Bytes::from(request(spans, seed).encode_to_vec()))
            .collect();
        group.throughput(Throughput::Elements((spans * REQUESTS_PER_BATCH) as u64));
        group.bench_with_input(BenchmarkId::new("walk", spans), &bodies, |b, bodies| {
            b.iter(|| {
                for body in black_box(bodies) {
                    black_box(walk(Signal::Traces, body).expect("valid request"));
                }
            })
        });
        group.bench_with_input(
            BenchmarkId::new("walk_stamp_keep", spans),
            &bodies,
            |b, bodies| b.iter(|| walk_stamp(black_box(bodies), &keep)),
        );
        group.bench_with_input(
            BenchmarkId::new("walk_stamp_replace", spans),
            &bodies,
            |b, bodies| b.iter(|| walk_stamp(black_box(bodies), &replace)),
        );
        group.bench_with_input(
            BenchmarkId::new("prost_decode_stamp_encode", spans),
            &bodies,
            |b, bodies| b.iter(|| decode_stamp_encode(black_box(bodies))),
        );
    }
    group.finish();
}

criterion_group!(benches, bench_wire, bench_stamp);
criterion_main!(benches);
