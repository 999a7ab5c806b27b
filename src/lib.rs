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
//! and on SIGHUP.
#![forbid(unsafe_code)]

pub mod activation;
pub mod admin;
pub mod app;
pub mod batch;
pub mod buffer;
pub mod cli;
pub mod commands;
pub mod config;
pub mod durable;
pub mod exporter;
pub mod metrics;
pub mod pipeline;
mod probe;
pub mod queue;
pub mod receiver;
pub mod reload;
pub mod retry;
pub mod shutdown;
pub mod signal;
pub mod spool;
pub mod systemd;
pub mod tls;
pub mod wire;
