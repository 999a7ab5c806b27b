//! The fuzz targets' bodies, shared by the libFuzzer binaries
//! (`fuzz_targets/`, run with `cargo +nightly fuzz run`) and the corpus replay
//! test (`tests/corpus_replay.rs`, runs on stable with `cargo test`).
//!
//! Each body checks more than "does not panic": a converted JSON request must
//! walk as valid protobuf, and a valid config must survive a round trip.

use std::path::Path;

use telespool::config::Config;
use telespool::receiver::otlp_json::json_to_protobuf;
use telespool::signal::Signal;
use telespool::wire;

/// The first input byte picks the signal; the rest is the payload.
fn split(data: &[u8]) -> Option<(Signal, &[u8])> {
    let (&first, rest) = data.split_first()?;
    Some((Signal::ALL[first as usize % Signal::ALL.len()], rest))
}

/// The allocation-free wire walk on arbitrary bytes: an error or counts, never a panic.
pub fn wire_walk(data: &[u8]) {
    if let Some((signal, payload)) = split(data) {
        let _ = wire::walk(signal, payload);
    }
}

/// OTLP/JSON conversion: whatever converts must be a request the walk accepts.
pub fn otlp_json(data: &[u8]) {
    if let Some((signal, json)) = split(data) {
        if let Ok(protobuf) = json_to_protobuf(signal, json) {
            if let Err(e) = wire::walk(signal, &protobuf) {
                panic!("json_to_protobuf produced a request the wire walk refuses: {e}");
            }
        }
    }
}

/// The config parser: a valid config renders to TOML that parses to the same config.
pub fn config(data: &[u8]) {
    let Ok(text) = std::str::from_utf8(data) else {
        return;
    };
    let origin = Path::new("fuzz.toml");
    let Ok(config) = Config::from_toml(text, origin) else {
        return;
    };
    if config.validate().is_err() {
        return;
    }
    let rendered = config.to_toml();
    match Config::from_toml(&rendered, origin) {
        Ok(again) => assert_eq!(again, config, "round trip changed the config:\n{rendered}"),
        Err(e) => panic!("rendered config does not parse: {e}\n{rendered}"),
    }
}
