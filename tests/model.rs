//! The model test: random sequences of ingest, upstream answers (ok,
//! retryable and non-retryable failures), upstream down/up, graceful restart
//! and waiting run against the real agent (`telespool::app::run` in-process,
//! real gRPC sockets, a real SQLite spool; memory or durable acknowledgement)
//! and against a simple model.
//!
//! The model is the set of ids the agent acknowledged, per signal, and two
//! subsets: ids that may legitimately be dropped (acknowledged before or while
//! upstream answered a non-retryable status, so their batch may have been
//! rejected by design, and counted), and ids that may legitimately arrive
//! twice without shutdown declaring it (upstream recorded them in one of the
//! last calls before it was stopped, so the answer may have been cut on the
//! wire and the agent retried).
//!
//! After every graceful shutdown (each `Restart`, and at the end once
//! upstream is healthy and the agent went quiet), with the spool file read
//! and decoded:
//!
//! - every acknowledged id is delivered upstream or held in the spool, unless
//!   it was droppable (nothing acknowledged is lost);
//! - upstream and the spool hold nothing the agent did not acknowledge, and
//!   no id is held twice in the spool;
//! - acknowledged ids neither delivered nor spooled are exactly the runs'
//!   `dropped` counts, per signal (bounded instead of exact when an answer
//!   may have been cut);
//! - extra copies (duplicates upstream, or ids both delivered and still
//!   spooled) are covered by the runs' `duplicates_risked`;
//! - what the runs counted as accepted is exactly what was acknowledged;
//!
//! and at the end the spool is empty.
// Tests and benches drive real processes and sockets: wall-clock time,
// not tokio's (clippy.toml keeps std's Instant out of the agent's code).
#![allow(clippy::disallowed_types)]

mod support;

use std::collections::BTreeSet;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use proptest::prelude::*;
use proptest::test_runner::FileFailurePersistence;
use support::client::{retry_delay, Client};
use support::ids::ids_in_bytes;
use support::*;
use telespool::app::{self, Listeners, ShutdownTokens, StartError};
use telespool::config::{ByteSize, Compression, Config, Durability};
use telespool::shutdown::Summary;
use telespool::spool::{Spool, SpoolOptions, Synchronous};
use tokio::net::TcpListener;
use tokio::task::JoinHandle;
use tonic::Code;

/// Bound on one graceful shutdown (the config's `shutdown.timeout` plus a margin).
const STOP_DEADLINE: Duration = Duration::from_secs(15);
/// Bound on the agent going quiet once upstream is healthy.
const QUIET_DEADLINE: Duration = Duration::from_secs(20);
/// Extra shutdown/start rounds allowed at the end for the spool to empty.
const FINAL_ROUNDS: usize = 4;
/// Each item carries this much padding, so small buffers fill up.
const PAYLOAD_BYTES: usize = 200;

#[derive(Clone, Debug)]
enum Op {
    /// `requests` concurrent export calls of `items` fresh ids each.
    Ingest {
        signal: Signal,
        requests: usize,
        items: usize,
    },
    UpstreamOk,
    /// Upstream refuses every export with this code.
    UpstreamFail(Code),
    /// RESOURCE_EXHAUSTED with a RetryInfo: retryable (a throttling gateway).
    UpstreamThrottle,
    UpstreamDown,
    UpstreamUp,
    /// Graceful shutdown (await the summary), reopen the spool, start again.
    Restart,
    Wait(u64),
}

/// Knobs of the agent's configuration that vary between cases.
#[derive(Clone, Debug)]
struct Knobs {
    buffer_max_bytes: u64,
    max_elapsed: Duration,
    concurrency: usize,
    durability: Durability,
}

fn retryable(code: Code) -> bool {
    matches!(
        code,
        Code::Cancelled
            | Code::DeadlineExceeded
            | Code::Aborted
            | Code::OutOfRange
            | Code::Unavailable
            | Code::DataLoss
    )
}

fn signal() -> impl Strategy<Value = Signal> {
    prop::sample::select(Signal::ALL.to_vec())
}

fn code() -> impl Strategy<Value = Code> {
    prop::sample::select(vec![
        Code::Unavailable,
        Code::DeadlineExceeded,
        Code::Aborted,
        Code::InvalidArgument,
        Code::Internal,
        Code::PermissionDenied,
        // Without RetryInfo: not retryable.
        Code::ResourceExhausted,
    ])
}

fn op() -> impl Strategy<Value = Op> {
    prop_oneof![
        6 => (signal(), 1usize..=6, 1usize..=100).prop_map(|(signal, requests, items)| Op::Ingest {
            signal,
            requests,
            items
        }),
        2 => Just(Op::UpstreamOk),
        2 => code().prop_map(Op::UpstreamFail),
        1 => Just(Op::UpstreamThrottle),
        2 => Just(Op::UpstreamDown),
        2 => Just(Op::UpstreamUp),
        2 => Just(Op::Restart),
        2 => (0u64..=100).prop_map(Op::Wait),
    ]
}

fn knobs() -> impl Strategy<Value = Knobs> {
    (
        prop::sample::select(vec![64u64 << 10, 256 << 10, 8 << 20]),
        prop::sample::select(vec![Duration::from_millis(150), Duration::from_secs(60)]),
        1usize..=4,
        prop_oneof![2 => Just(Durability::Memory), 1 => Just(Durability::Spool)],
    )
        .prop_map(
            |(buffer_max_bytes, max_elapsed, concurrency, durability)| Knobs {
                buffer_max_bytes,
                max_elapsed,
                concurrency,
                durability,
            },
        )
}

fn config(knobs: &Knobs, upstream: &Upstream, spool: &Path) -> Config {
    let mut c = Config::default();
    c.receiver.http.enabled = false;
    c.admin.enabled = false;
    c.receiver.max_request_bytes = ByteSize(32 << 10);
    c.buffer.max_bytes = ByteSize(knobs.buffer_max_bytes);
    c.buffer.max_wait = Duration::from_millis(20);
    c.batch.max_items = 100;
    c.batch.max_bytes = ByteSize(16 << 10);
    c.batch.timeout = Duration::from_millis(5);
    c.upstream.endpoint = Some(upstream.endpoint());
    c.upstream.concurrency = knobs.concurrency;
    c.upstream.timeout = Duration::from_secs(5);
    c.upstream.compression = Compression::None;
    c.upstream.retry.initial_backoff = Duration::from_millis(10);
    c.upstream.retry.max_backoff = Duration::from_millis(50);
    c.upstream.retry.max_elapsed = knobs.max_elapsed;
    c.spool.path = Some(spool.to_path_buf());
    c.spool.max_bytes = ByteSize(64 << 20);
    c.shutdown.flush_budget = Duration::from_millis(100);
    c.shutdown.timeout = Duration::from_secs(10);
    c.durability = knobs.durability;
    ok(c.validate());
    c
}

/// What the agent acknowledged, and which of it may have been dropped.
#[derive(Default)]
struct Model {
    acknowledged: [BTreeSet<u64>; 3],
    /// Acknowledged ids that upstream may have rejected for good.
    droppable: BTreeSet<u64>,
    /// Upstream currently answers with a non-retryable status.
    rejecting: bool,
    /// Ids upstream recorded in one of the last calls before it was stopped:
    /// the answer may have been cut on the wire, so the agent retries a
    /// batch upstream already holds (at-least-once; shutdown's
    /// `duplicates_risked` does not cover it).
    cut_exposed: BTreeSet<u64>,
}

impl Model {
    fn set_rejecting(&mut self, rejecting: bool) {
        self.rejecting = rejecting;
        if rejecting {
            // Everything the agent may still hold can be rejected now.
            for ids in &self.acknowledged {
                self.droppable.extend(ids);
            }
        }
    }

    fn acknowledge(&mut self, signal: Signal, ids: &[u64]) {
        self.acknowledged[signal.index()].extend(ids);
        if self.rejecting {
            self.droppable.extend(ids);
        }
    }

    fn all_acknowledged(&self) -> usize {
        self.acknowledged.iter().map(BTreeSet::len).sum()
    }
}

/// One in-process run of the agent.
struct Running {
    addr: std::net::SocketAddr,
    tokens: ShutdownTokens,
    task: JoinHandle<Result<Summary, StartError>>,
}

/// The agent across restarts, its upstream, its spool file and its summaries.
struct World {
    upstream: Upstream,
    _dir: tempfile::TempDir,
    path: PathBuf,
    config: Config,
    running: Option<Running>,
    summaries: Vec<Summary>,
    log: Vec<String>,
}

impl World {
    async fn new(knobs: &Knobs) -> World {
        let upstream = Upstream::start().await;
        let dir = ok(tempfile::tempdir());
        let path = dir.path().join("spool.db");
        let config = config(knobs, &upstream, &path);
        let mut world = World {
            upstream,
            _dir: dir,
            path,
            config,
            running: None,
            summaries: Vec::new(),
            log: Vec::new(),
        };
        world.start().await;
        world
    }

    async fn start(&mut self) {
        assert!(self.running.is_none(), "the agent is already running");
        let path = self.path.clone();
        let options = SpoolOptions {
            max_bytes: self.config.spool.max_bytes.0,
            synchronous: Synchronous::Normal,
        };
        let (spool, opened) = ok(ok(tokio::task::spawn_blocking(move || {
            Spool::open(&path, options)
        })
        .await));
        assert!(
            opened.quarantined.is_none(),
            "the spool written by the previous run was quarantined: {:?}",
            opened.quarantined
        );
        // While upstream is down its port is free, and port 0 may hand it to
        // the agent: the agent would then forward to itself, over and over.
        // Hold such a listener while binding another.
        let mut grpc = ok(TcpListener::bind("127.0.0.1:0").await);
        let _upstreams_port = if ok(grpc.local_addr()).port() == self.upstream.addr().port() {
            let held = grpc;
            grpc = ok(TcpListener::bind("127.0.0.1:0").await);
            Some(held)
        } else {
            None
        };
        let addr = ok(grpc.local_addr());
        let listeners = Listeners {
            grpc: Some(grpc),
            ..Listeners::default()
        };
        let tokens = ShutdownTokens::new();
        let files = ok(telespool::reload::Files::load(&self.config));
        let task = tokio::spawn(app::run(
            self.config.clone(),
            files,
            spool,
            opened,
            listeners,
            tokens.clone(),
            telespool::reload::ReloadRequests::default(),
        ));
        self.running = Some(Running { addr, tokens, task });
    }

    /// Graceful shutdown; returns the run's summary (also kept in `summaries`).
    async fn stop(&mut self) -> Summary {
        let running = self.running.take().expect("the agent is running");
        running.tokens.begin.cancel();
        let summary = match tokio::time::timeout(STOP_DEADLINE, running.task).await {
            Ok(joined) => ok(ok(joined)),
            Err(_) => {
                running.tokens.force.cancel();
                panic!("graceful shutdown did not finish within {STOP_DEADLINE:?}");
            }
        };
        self.log.push(format!("run summary: {summary}"));
        assert!(!summary.panicked, "a task panicked: {summary}");
        self.summaries.push(summary.clone());
        summary
    }

    fn addr(&self) -> std::net::SocketAddr {
        self.running.as_ref().expect("the agent is running").addr
    }

    /// Rows in the spool file, read through a second connection (WAL allows it).
    fn spool_rows(&self) -> u64 {
        let db = ok(rusqlite::Connection::open(&self.path));
        ok(db.query_row("SELECT count(*) FROM batches", [], |r| r.get::<_, i64>(0))) as u64
    }

    async fn apply(&mut self, op: &Op, model: &mut Model) {
        match op {
            Op::Ingest {
                signal,
                requests,
                items,
            } => {
                let client = Client::new(self.addr());
                let spec = ItemSpec::with_payload(PAYLOAD_BYTES);
                let calls = (0..*requests).map(|_| {
                    let ids = fresh_ids(*items);
                    let client = client.clone();
                    let spec = spec.clone();
                    let signal = *signal;
                    async move {
                        let result = client.export_with(signal, &ids, &spec).await;
                        (ids, result)
                    }
                });
                for (ids, result) in futures::future::join_all(calls).await {
                    match result {
                        Ok(accepted) => {
                            assert_eq!(accepted.rejected, 0, "{accepted:?}");
                            model.acknowledge(*signal, &ids);
                        }
                        Err(status) => {
                            assert_eq!(
                                status.code(),
                                Code::Unavailable,
                                "a refusal must be retryable UNAVAILABLE: {status:?}"
                            );
                            assert!(
                                retry_delay(&status).is_some(),
                                "a refusal carries a RetryInfo: {status:?}"
                            );
                        }
                    }
                }
            }
            Op::UpstreamOk => {
                self.upstream.set_mode(Mode::Healthy);
                model.set_rejecting(false);
            }
            Op::UpstreamFail(code) => {
                self.upstream.set_mode(Mode::Fail(*code));
                model.set_rejecting(!retryable(*code));
            }
            Op::UpstreamThrottle => {
                self.upstream.set_mode(Mode::FailWithRetryInfo(
                    Code::ResourceExhausted,
                    Duration::from_millis(20),
                ));
                model.set_rejecting(false);
            }
            Op::UpstreamDown => {
                if self.upstream.is_running() {
                    self.upstream.stop().await;
                    self.expose_last_calls(model);
                }
            }
            Op::UpstreamUp => {
                if !self.upstream.is_running() {
                    self.upstream.restart().await;
                }
            }
            Op::Restart => {
                self.stop().await;
                self.check_at_rest(model);
                self.start().await;
            }
            Op::Wait(ms) => tokio::time::sleep(Duration::from_millis(*ms)).await,
        }
    }

    /// Every acknowledged, never-droppable id arrived and the spool is empty.
    fn quiet(&self, model: &Model) -> bool {
        let delivered = Signal::ALL.iter().all(|s| {
            let received = self.upstream.unique_ids(*s);
            model.acknowledged[s.index()]
                .iter()
                .all(|id| received.contains(id) || model.droppable.contains(id))
        });
        delivered && self.spool_rows() == 0
    }

    /// Upstream healthy and up; wait for quiet, shut down; again while the
    /// last run left rows in the spool (a flush cut short by the budget).
    async fn settle(&mut self, model: &mut Model) {
        self.upstream.set_mode(Mode::Healthy);
        model.set_rejecting(false);
        if !self.upstream.is_running() {
            self.upstream.restart().await;
        }
        for round in 0..FINAL_ROUNDS {
            let started = Instant::now();
            while !self.quiet(model) && started.elapsed() < QUIET_DEADLINE {
                tokio::time::sleep(Duration::from_millis(10)).await;
            }
            if !self.quiet(model) {
                self.log.push(format!(
                    "not quiet within {QUIET_DEADLINE:?} (round {round})"
                ));
            }
            let summary = self.stop().await;
            if summary.spool_rows_left == 0 || round + 1 == FINAL_ROUNDS {
                return;
            }
            self.start().await;
        }
    }

    /// After a stop: the ids of the last calls upstream recorded per signal,
    /// as many calls as the agent can have in flight (export and replay
    /// workers), are exposed to a cut answer.
    fn expose_last_calls(&self, model: &mut Model) {
        let in_flight = 2 * self.config.upstream.concurrency;
        for signal in Signal::ALL {
            let received = self.upstream.received_ids(signal);
            let sizes = self.upstream.accepted_sizes(signal);
            let last: usize = sizes.iter().rev().take(in_flight).sum();
            model
                .cut_exposed
                .extend(&received[received.len().saturating_sub(last)..]);
        }
    }

    /// Ids in the spool file, per signal, one entry per spooled item.
    fn spooled_ids(&self) -> [Vec<u64>; 3] {
        let db = ok(rusqlite::Connection::open(&self.path));
        let mut statement = ok(db.prepare("SELECT signal, payload FROM batches ORDER BY id"));
        let rows = ok(statement.query_map([], |r| {
            Ok((r.get::<_, String>(0)?, r.get::<_, Vec<u8>>(1)?))
        }));
        let mut ids: [Vec<u64>; 3] = Default::default();
        for row in rows {
            let (signal, payload) = ok(row);
            let signal: Signal = ok(signal.parse());
            ids[signal.index()].extend(ok(ids_in_bytes(signal, &payload)));
        }
        ids
    }

    /// With the agent stopped: every acknowledged id is delivered, held in
    /// the spool or counted as dropped (and then was droppable); nothing is
    /// held twice; counters agree with the model.
    #[track_caller]
    fn check_at_rest(&self, model: &Model) {
        assert!(self.running.is_none(), "check with the agent stopped");
        let context = self.log.join("\n");
        let sum = |f: &dyn Fn(&Summary) -> u64| self.summaries.iter().map(f).sum::<u64>();
        let risked = sum(&|s| s.duplicates_risked);
        let accepted = sum(&|s| s.accepted.iter().sum());
        assert_eq!(
            accepted,
            model.all_acknowledged() as u64,
            "the runs accepted exactly what they acknowledged\n{context}"
        );
        let spooled = self.spooled_ids();
        // Copies beyond the first (upstream duplicates, or delivered and
        // still spooled) of ids no upstream stop exposed: only shutdown's
        // cut-offs may explain those.
        let mut unexplained_copies = 0u64;
        let mut examples = Vec::new();
        for signal in Signal::ALL {
            let i = signal.index();
            let acknowledged = &model.acknowledged[i];
            let received_all = self.upstream.received_ids(signal);
            let received: BTreeSet<u64> = received_all.iter().copied().collect();
            let held: BTreeSet<u64> = spooled[i].iter().copied().collect();
            assert_eq!(
                held.len(),
                spooled[i].len(),
                "{signal}: {} ids are held twice in the spool\n{context}",
                spooled[i].len() - held.len()
            );
            for (what, ids) in [("upstream received", &received), ("the spool holds", &held)] {
                let unacknowledged: Vec<u64> = ids.difference(acknowledged).copied().collect();
                assert!(
                    unacknowledged.is_empty(),
                    "{what} {} {signal} ids the agent never acknowledged, e.g. {:?}\n{context}",
                    unacknowledged.len(),
                    &unacknowledged[..unacknowledged.len().min(8)]
                );
            }
            let gone: BTreeSet<u64> = acknowledged
                .iter()
                .filter(|id| !received.contains(id) && !held.contains(id))
                .copied()
                .collect();
            let lost: Vec<u64> = gone.difference(&model.droppable).copied().collect();
            assert!(
                lost.is_empty(),
                "{} acknowledged {signal} ids, never exposed to a non-retryable answer, are neither \
                 delivered nor spooled, e.g. {:?}\n{context}",
                lost.len(),
                &lost[..lost.len().min(8)]
            );
            let dropped = sum(&|s| s.dropped[i]);
            let gone = gone.len() as u64;
            // A dropped batch may also have arrived earlier: an export whose
            // answer was cut (shutdown: duplicates_risked; upstream stop:
            // cut_exposed) was recorded upstream, retried and then rejected.
            let exposed = acknowledged.intersection(&model.cut_exposed).count() as u64;
            assert!(
                gone <= dropped && dropped <= gone + risked + exposed,
                "{signal}: {gone} acknowledged ids are neither delivered nor spooled, but the runs \
                 counted {dropped} dropped ({risked} duplicates risked, {exposed} exposed to a cut \
                 answer)\n{context}"
            );
            if risked + exposed == 0 {
                assert_eq!(gone, dropped, "{signal}: exact accounting\n{context}");
            }
            let mut copies = std::collections::BTreeMap::<u64, u64>::new();
            for id in received_all.iter().chain(&held) {
                *copies.entry(*id).or_default() += 1;
            }
            for (id, n) in copies {
                if n > 1 && !model.cut_exposed.contains(&id) {
                    unexplained_copies += n - 1;
                    if examples.len() < 8 {
                        examples.push((signal, id));
                    }
                }
            }
        }
        // Each item shutdown cut off in flight can arrive twice once: already
        // (a duplicate upstream) or when its spooled copy is replayed.
        assert!(
            unexplained_copies <= risked,
            "upstream received duplicates, or delivered ids are still spooled, {unexplained_copies} \
             extra copies in all (e.g. {examples:?}), but shutdown declared only {risked} \
             duplicates risked\n{context}"
        );
    }

    #[track_caller]
    fn check_final(&self, model: &Model) {
        self.check_at_rest(model);
        let context = self.log.join("\n");
        let last = self.summaries.last().expect("at least one run");
        assert_eq!(
            last.spool_rows_left, 0,
            "the spool is empty at the end\n{context}"
        );
        assert_eq!(self.spool_rows(), 0, "the spool file is empty\n{context}");
    }
}

async fn run_sequence(knobs: Knobs, ops: Vec<Op>) {
    let mut world = World::new(&knobs).await;
    let mut model = Model::default();
    for op in &ops {
        world.apply(op, &mut model).await;
    }
    world.settle(&mut model).await;
    world.check_final(&model);
}

proptest! {
    #![proptest_config(ProptestConfig {
        cases: 24,
        failure_persistence: Some(Box::new(FileFailurePersistence::Direct("proptest-regressions/model.txt"))),
        ..ProptestConfig::default()
    })]

    #[test]
    fn acknowledged_ids_are_delivered_or_counted_as_dropped_across_outages_rejections_and_restarts(
        knobs in knobs(),
        ops in prop::collection::vec(op(), 5..=15),
    ) {
        let runtime = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(4)
            .enable_all()
            .build()
            .expect("runtime");
        runtime.block_on(run_sequence(knobs, ops));
    }
}
