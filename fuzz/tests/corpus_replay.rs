//! Replays every committed corpus file (seeds and any regression inputs saved
//! under `corpus/<target>/`) through the fuzz target bodies. Runs on stable:
//! `cargo test --manifest-path fuzz/Cargo.toml`.

use std::path::Path;

fn replay(target: &str, body: fn(&[u8])) {
    let dir = Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("corpus")
        .join(target);
    let entries =
        std::fs::read_dir(&dir).unwrap_or_else(|e| panic!("corpus {}: {e}", dir.display()));
    let mut count = 0;
    for entry in entries {
        let path = entry.expect("corpus entry").path();
        let data = std::fs::read(&path).unwrap_or_else(|e| panic!("{}: {e}", path.display()));
        body(&data);
        count += 1;
    }
    assert!(count > 0, "corpus {} is empty", dir.display());
}

#[test]
fn wire_walk_corpus_replays_clean() {
    replay("wire_walk", telespool_fuzz::wire_walk);
}

#[test]
fn otlp_json_corpus_replays_clean() {
    replay("otlp_json", telespool_fuzz::otlp_json);
}

#[test]
fn config_corpus_replays_clean() {
    replay("config", telespool_fuzz::config);
}

/// Regenerates `corpus/wire_walk/` from the OTLP/JSON seeds:
/// `cargo test --manifest-path fuzz/Cargo.toml -- --ignored write_wire_seeds`.
#[test]
#[ignore]
fn write_wire_seeds() {
    use telespool::receiver::otlp_json::json_to_protobuf;
    use telespool::signal::Signal;
    let root = Path::new(env!("CARGO_MANIFEST_DIR")).join("corpus");
    for entry in std::fs::read_dir(root.join("otlp_json")).expect("json seeds") {
        let path = entry.expect("seed").path();
        let data = std::fs::read(&path).expect("read seed");
        let Some((&first, json)) = data.split_first() else {
            continue;
        };
        let signal = Signal::ALL[first as usize % Signal::ALL.len()];
        let Ok(protobuf) = json_to_protobuf(signal, json) else {
            continue;
        };
        let mut out = vec![first];
        out.extend_from_slice(&protobuf);
        let name = path.file_name().expect("file name");
        std::fs::write(root.join("wire_walk").join(name), out).expect("write seed");
    }
}
