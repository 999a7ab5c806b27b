//! Resource attributes stamped at the agent (`[resource]`).
//!
//! Operators stamp every item with where it came from (`host.name`, their
//! `deployment.environment`, ...). The agent does it on the bytes, without
//! decoding ([`crate::wire::stamp`]), so the forwarding path keeps its cost.
//!
//! - **What is stamped**: the detected attributes (`resource.detect`, in
//!   detector order), then the static ones (`resource.attributes`, in key
//!   order); a static attribute replaces a detected one with the same key.
//! - **When**: once per request, in [`crate::receiver::Receiver::accept`],
//!   after the wire walk accepted it and before the memory budget counts its
//!   bytes: gRPC, HTTP/protobuf and HTTP/JSON (converted to protobuf on
//!   arrival) alike. What is buffered, exported, spooled and replayed is the
//!   stamped body; replay does not stamp again.
//! - **Not configured** (no `[resource]` table): the receiver holds no
//!   [`Stamping`] and the request path is exactly as without this module.
//! - **Detection** runs at start and on SIGHUP (off the runtime, with the
//!   other files a reload reads). An attribute that cannot be read is logged
//!   and left out; the rest are stamped. Requests in flight keep the stamp
//!   they started with.
//! - **Visible**: `telespool check-config` prints the attributes in effect;
//!   a running agent exports them as `telespool_resource_attribute_info`,
//!   which `telespool status` lists.

pub mod detect;

use std::fmt::Write as _;
use std::sync::Arc;

use crate::config::{OnConflict, ResourceConfig};
use crate::metrics::Metrics;
use crate::reloadable::Reloadable;
use crate::wire::stamp::{Conflict, Stamp};
use detect::{DetectError, Sources};

/// The resource attributes in effect, and their encoded stamp.
#[derive(Debug)]
pub struct Stamping {
    /// Key and value, in stamping order.
    pub attributes: Vec<(String, String)>,
    pub on_conflict: OnConflict,
    /// Detected attributes that could not be read (already logged).
    pub left_out: Vec<DetectError>,
    pub stamp: Stamp,
}

impl Stamping {
    /// Detect and combine the attributes of `config` (blocking file reads);
    /// logs every detector failure.
    pub fn load(config: &ResourceConfig) -> Stamping {
        Stamping::load_from(config, &Sources::default())
    }

    pub fn load_from(config: &ResourceConfig, sources: &Sources) -> Stamping {
        let (mut attributes, left_out) = detect::detect(&config.detect, sources);
        for e in &left_out {
            tracing::warn!(error = %e, "resource detection failed; the attribute is left out");
        }
        attributes.retain(|(key, _)| !config.attributes.contains_key(key));
        attributes.extend(
            config
                .attributes
                .iter()
                .map(|(k, v)| (k.clone(), v.clone())),
        );
        let conflict = match config.on_conflict {
            OnConflict::Keep => Conflict::Keep,
            OnConflict::Replace => Conflict::Replace,
        };
        Stamping {
            stamp: Stamp::new(&attributes, conflict),
            attributes,
            on_conflict: config.on_conflict,
            left_out,
        }
    }

    /// `keep` or `replace`, as in the config.
    pub fn on_conflict_str(&self) -> &'static str {
        match self.on_conflict {
            OnConflict::Keep => "keep",
            OnConflict::Replace => "replace",
        }
    }

    /// The attributes in effect as TOML comments, for `check-config`.
    pub fn to_comment(&self) -> String {
        let mut out = format!(
            "# resource attributes in effect (on_conflict = \"{}\"):\n",
            self.on_conflict_str()
        );
        if self.attributes.is_empty() {
            out.push_str("#   none\n");
        }
        for (key, value) in &self.attributes {
            let _ = writeln!(out, "#   {key:?} = {value:?}");
        }
        for e in &self.left_out {
            let _ = writeln!(out, "#   ({e})");
        }
        out
    }
}

/// The running agent's stamping: what the receiver reads, and what a reload
/// replaces, with the `telespool_resource_attribute_info` metric kept in step.
#[derive(Clone)]
pub struct StampingHandle {
    current: Reloadable<Stamping>,
    metrics: Arc<Metrics>,
}

impl StampingHandle {
    pub fn new(stamping: Stamping, metrics: Arc<Metrics>) -> StampingHandle {
        record(&metrics, &stamping);
        StampingHandle {
            current: Reloadable::new(stamping),
            metrics,
        }
    }

    /// The value the receiver reads on every request.
    pub fn current(&self) -> Reloadable<Stamping> {
        self.current.clone()
    }

    /// Swap in a newly loaded stamping (SIGHUP); requests in flight keep theirs.
    pub fn set(&self, stamping: Stamping) {
        record(&self.metrics, &stamping);
        self.current.set(stamping);
    }
}

/// Log the attributes in effect and publish them as a metric.
fn record(metrics: &Metrics, stamping: &Stamping) {
    let listed: Vec<String> = stamping
        .attributes
        .iter()
        .map(|(k, v)| format!("{k}={v}"))
        .collect();
    tracing::info!(
        attributes = %listed.join(","),
        on_conflict = stamping.on_conflict_str(),
        "resource attributes in effect"
    );
    metrics.resource_in_effect(&stamping.attributes, stamping.on_conflict_str());
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::Detector;
    use std::collections::BTreeMap;

    #[test]
    fn static_attributes_follow_detected_ones_and_win_over_them() {
        let dir = tempfile::tempdir().unwrap();
        let id = dir.path().join("machine-id");
        std::fs::write(&id, "abc\n").unwrap();
        let config = ResourceConfig {
            attributes: BTreeMap::from([
                ("z.last".to_owned(), "1".to_owned()),
                ("host.name".to_owned(), "configured".to_owned()),
            ]),
            detect: vec![Detector::Host, Detector::Os],
            on_conflict: OnConflict::Replace,
        };
        let stamping = Stamping::load_from(
            &config,
            &Sources {
                machine_id: vec![id],
            },
        );
        let keys: Vec<(&str, &str)> = stamping
            .attributes
            .iter()
            .map(|(k, v)| (k.as_str(), v.as_str()))
            .collect();
        assert_eq!(
            keys,
            [
                ("host.id", "abc"),
                ("os.type", detect_os()),
                ("host.name", "configured"),
                ("z.last", "1")
            ]
        );
        assert_eq!(stamping.stamp.conflict(), Conflict::Replace);
        let comment = stamping.to_comment();
        assert!(comment.contains("on_conflict = \"replace\""), "{comment}");
        assert!(
            comment.contains("#   \"host.name\" = \"configured\""),
            "{comment}"
        );
    }

    fn detect_os() -> &'static str {
        let (attrs, _) = detect::detect(&[Detector::Os], &Sources::default());
        match attrs[0].1.as_str() {
            "linux" => "linux",
            "darwin" => "darwin",
            _ => "other",
        }
    }
}
