//! The three OTLP signals and the names each one goes by on the wire.
//!
//! Everything downstream of the receivers is generic over [`Signal`]: one ingest
//! path, one batcher type, one exporter, parameterised by this enum rather than
//! copied per signal.

use std::fmt;
use std::str::FromStr;

/// An OpenTelemetry signal type.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum Signal {
    Traces,
    Metrics,
    Logs,
}

impl Signal {
    /// Every signal, in a fixed order (also the order of [`Signal::index`]).
    pub const ALL: [Signal; 3] = [Signal::Traces, Signal::Metrics, Signal::Logs];

    /// Lower-case name used in config, metrics labels, logs and the spool.
    pub const fn as_str(self) -> &'static str {
        match self {
            Signal::Traces => "traces",
            Signal::Metrics => "metrics",
            Signal::Logs => "logs",
        }
    }

    /// Dense index for per-signal arrays.
    pub const fn index(self) -> usize {
        self as usize
    }

    /// gRPC method path of the OTLP export call for this signal.
    pub const fn grpc_path(self) -> &'static str {
        match self {
            Signal::Traces => "/opentelemetry.proto.collector.trace.v1.TraceService/Export",
            Signal::Metrics => "/opentelemetry.proto.collector.metrics.v1.MetricsService/Export",
            Signal::Logs => "/opentelemetry.proto.collector.logs.v1.LogsService/Export",
        }
    }

    /// OTLP/HTTP path for this signal.
    pub const fn http_path(self) -> &'static str {
        match self {
            Signal::Traces => "/v1/traces",
            Signal::Metrics => "/v1/metrics",
            Signal::Logs => "/v1/logs",
        }
    }

    /// What one item of this signal is called, for messages and logs.
    pub const fn item_name(self) -> &'static str {
        match self {
            Signal::Traces => "spans",
            Signal::Metrics => "data points",
            Signal::Logs => "log records",
        }
    }

    /// The signal whose gRPC export path is `path`, if any.
    pub fn from_grpc_path(path: &str) -> Option<Signal> {
        Signal::ALL.into_iter().find(|s| s.grpc_path() == path)
    }
}

impl fmt::Display for Signal {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// Error for an unknown signal name.
#[derive(Debug, thiserror::Error)]
#[error("unknown signal {0:?}: expected one of traces, metrics, logs")]
pub struct UnknownSignal(pub String);

impl FromStr for Signal {
    type Err = UnknownSignal;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        Signal::ALL
            .into_iter()
            .find(|sig| sig.as_str() == s)
            .ok_or_else(|| UnknownSignal(s.to_owned()))
    }
}
