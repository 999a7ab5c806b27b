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
//! order of the stop sequence.
#![forbid(unsafe_code)]

pub mod config;
pub mod signal;
pub mod spool;
