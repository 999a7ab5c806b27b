//! telespool: a node-local OpenTelemetry agent.
//!
//! Data flows through the modules in this order:
//!
//! ```text
//! receiver (gRPC, HTTP) ─► wire (validate + count) ─► buffer (memory budget)
//!      ─► batch (per-signal open batch) ─► exporter (upstream, retry) ─► upstream
//!                                              │
//!                                              └─► spool (SQLite) ─► replay ─► exporter
//! ```
//!
//! `app` assembles the stages under one cancellation tree; `shutdown` owns the
//! order of the stop sequence; `tls` and `reload` hold the files read at start
//! and on SIGHUP; `resource` the attributes the receiver stamps on arrival.
//!
//! # Layers
//!
//! Each top-level module (a folder counts as one) belongs to one layer and
//! imports only modules of its own layer or the layers below it, and the
//! imports have no cycle. `tests/layers.rs` reads this table and checks the
//! source against it, so it stays true.
//!
//! ```text
//! layer      modules
//! app        app
//! lifecycle  shutdown reload systemd commands cli manual top
//! edges      receiver admin
//! pipeline   pipeline status
//! stages     batch queue spool durable exporter resource probe
//! leaves     signal config reloadable task activation api retry wire metrics tls buffer
//! ```
//!
//! Modules that neither the binary (`main.rs`) nor the integration tests,
//! benches and fuzz targets use are `pub(crate)`, so the compiler reports
//! what in them has become dead.
#![forbid(unsafe_code)]

pub(crate) mod activation;
pub mod admin;
pub mod api;
pub mod app;
pub mod batch;
pub(crate) mod buffer;
pub mod cli;
pub mod commands;
pub mod config;
pub(crate) mod durable;
pub mod exporter;
pub mod manual;
pub mod metrics;
pub mod pipeline;
mod probe;
pub(crate) mod queue;
pub mod receiver;
pub mod reload;
pub(crate) mod reloadable;
pub mod resource;
pub(crate) mod retry;
pub mod shutdown;
pub mod signal;
pub mod spool;
pub mod status;
pub(crate) mod systemd;
pub(crate) mod task;
pub(crate) mod tls;
pub mod top;
pub mod wire;
