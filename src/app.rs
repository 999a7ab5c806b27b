//! Assembly: build the stages, start them on task trackers under one
//! cancellation tree, and hand over to the shutdown sequence.
//!
//! Longer than 500 lines on purpose: the assembly reads top to bottom in one
//! place (what is built, in which order, which token stops it).
//!
//! Entry points take what the caller bound ([`Listeners`]), the opened spool
//! and the files the config names, read before either ([`Files`]), so tests,
//! `main` and socket activation all share [`run`].

use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;

use tokio::net::TcpListener;
use tokio_util::task::TaskTracker;

use crate::admin::{self, AdminState};
use crate::config::Config;
use crate::exporter::{ExporterError, Upstream};
use crate::metrics::Metrics;
use crate::pipeline::Pipeline;
use crate::receiver::auth::{self, TokenFileError};
use crate::receiver::connections::{self, ConnectionLimits};
use crate::receiver::unix_socket::{self, UnixSocketError, UnixSocketListener};
use crate::receiver::{self, Receiver};
use crate::reload::{Files, FilesError, ReloadRequests, Reloader};
use crate::reloadable::Reloadable;
pub use crate::shutdown::ShutdownTokens;
use crate::shutdown::{self, Summary};
use crate::signal::Signal;
use crate::spool::{OpenReport, Spool};
pub use crate::task::PanicFlag;
use crate::tls::{ServerTls, TlsError};

/// The sockets the agent serves on, bound by the caller.
#[derive(Debug, Default)]
pub struct Listeners {
    pub grpc: Option<TcpListener>,
    pub http: Option<TcpListener>,
    pub admin: Option<TcpListener>,
    /// `receiver.grpc.unix_socket`, served besides (or instead of) TCP.
    pub grpc_unix: Option<UnixSocketListener>,
    /// `receiver.http.unix_socket`.
    pub http_unix: Option<UnixSocketListener>,
}

/// Why the agent could not start.
#[derive(Debug, thiserror::Error)]
pub enum StartError {
    /// A listen address is taken or not allowed.
    #[error("cannot listen on {addr} ({what}): {source}; is another telespool (or collector) running? Set {key} to another address")]
    Bind {
        addr: SocketAddr,
        what: &'static str,
        key: &'static str,
        source: std::io::Error,
    },
    #[error(transparent)]
    Activation(#[from] crate::activation::ActivationError),
    #[error(transparent)]
    Exporter(#[from] ExporterError),
    #[error(transparent)]
    TokenFile(#[from] TokenFileError),
    /// `upstream.endpoint` names one of the agent's own OTLP listeners, so
    /// every batch would come straight back in, forever.
    #[error("upstream.endpoint {endpoint} is telespool's own OTLP/{what} listener ({addr}): every batch would come straight back in. Point upstream.endpoint at the collector, or move receiver.{key}.listen")]
    UpstreamIsSelf {
        endpoint: String,
        addr: SocketAddr,
        what: &'static str,
        key: &'static str,
    },
    #[error(transparent)]
    UnixSocket(#[from] UnixSocketError),
    #[error(transparent)]
    Tls(#[from] TlsError),
    #[error(transparent)]
    Files(#[from] FilesError),
}

impl Listeners {
    /// Bind every enabled listener of `config`, or adopt the socket the
    /// service manager passed for it ([`crate::activation`]).
    pub async fn bind(config: &Config) -> Result<Listeners, StartError> {
        async fn bind(
            addr: SocketAddr,
            what: &'static str,
            key: &'static str,
        ) -> Result<TcpListener, StartError> {
            TcpListener::bind(addr)
                .await
                .map_err(|source| StartError::Bind {
                    addr,
                    what,
                    key,
                    source,
                })
        }
        let r = &config.receiver;
        // Group lookups and directory checks fail before anything is bound.
        let grpc_unix = r.grpc.unix_socket().map(unix_socket::prepare).transpose()?;
        let http_unix = r.http.unix_socket().map(unix_socket::prepare).transpose()?;
        let inherited = crate::activation::take_from_env()?;
        Ok(Listeners {
            grpc: match (r.grpc.serves_tcp(), inherited.grpc) {
                (true, Some(listener)) => Some(listener),
                (true, None) => {
                    Some(bind(r.grpc.listen, "OTLP/gRPC", "receiver.grpc.listen").await?)
                }
                (false, _) => None,
            },
            http: match (r.http.serves_tcp(), inherited.http) {
                (true, Some(listener)) => Some(listener),
                (true, None) => {
                    Some(bind(r.http.listen, "OTLP/HTTP", "receiver.http.listen").await?)
                }
                (false, _) => None,
            },
            admin: match config.admin.enabled {
                true => Some(bind(config.admin.listen, "admin", "admin.listen").await?),
                false => None,
            },
            grpc_unix: match grpc_unix {
                Some(socket) => Some(socket.bind().await?),
                None => None,
            },
            http_unix: match http_unix {
                Some(socket) => Some(socket.bind().await?),
                None => None,
            },
        })
    }
}

/// The running stages, as `run` assembles them: the whole config beside the
/// handles the shutdown sequence will stop.
pub struct Agent {
    pub config: Config,
    pub stages: shutdown::Stages,
}

/// Run the agent until the shutdown sequence completes. `files` is
/// [`Files::load`] of `config`; a request on `reload` re-reads them.
pub async fn run(
    config: Config,
    files: Files,
    spool: Spool,
    opened: OpenReport,
    listeners: Listeners,
    tokens: ShutdownTokens,
    reload: ReloadRequests,
) -> Result<Summary, StartError> {
    if let Some(endpoint) = &config.upstream.endpoint {
        check_upstream_is_not_self(endpoint, &listeners)?;
    }
    let tokens_required = files.tokens.map(Reloadable::new);
    let receiver_tls = files.receiver_tls.map(Reloadable::new);
    let metrics = Arc::new(Metrics::new());
    for signal in Signal::ALL {
        // Items of damaged rows found at start count as held, then dropped.
        let lost = opened
            .salvaged
            .as_ref()
            .map_or(0, |s| s.lost_items[signal.index()]);
        metrics.set_spooled_at_start(signal, opened.stats.items[signal.index()] + lost);
        metrics.dropped(signal, crate::metrics::DropReason::SpoolCorrupt, lost);
    }
    if let Some(salvaged) = &opened.salvaged {
        metrics.spool_lost_rows.inc_by(salvaged.lost_rows);
    }
    let now_s = crate::batch::unix_ms(std::time::SystemTime::now()) / 1000;
    metrics.started(config.buffer.max_bytes.0, config.spool.max_bytes.0, now_s);
    let workers = tokio::runtime::Handle::current().metrics().num_workers();
    metrics
        .runtime_workers
        .set(i64::try_from(workers).unwrap_or(i64::MAX));
    let upstream = match (&config.upstream.endpoint, files.upstream) {
        (Some(endpoint), Some(setup)) => Some(Upstream::new(&config.upstream, endpoint, setup)),
        // `files` was loaded from another config: read the upstream's files now.
        (Some(endpoint), None) => {
            let setup = crate::exporter::UpstreamSetup::load(&config.upstream, endpoint)?;
            Some(Upstream::new(&config.upstream, endpoint, setup))
        }
        (None, _) => {
            tracing::warn!(
                "no upstream.endpoint configured: data is buffered, then refused with backpressure, and spooled at shutdown"
            );
            None
        }
    };
    let stamping = files
        .resource
        .map(|s| crate::resource::StampingHandle::new(s, metrics.clone()));
    let reloader = Reloader {
        resource: stamping.clone(),
        tokens: tokens_required.clone(),
        receiver_tls: receiver_tls.clone(),
        upstream: upstream.clone().filter(|_| config.upstream.reads_files()),
        config: config.clone(),
    };
    let pipeline = Pipeline::new(&config, metrics.clone(), spool, upstream);
    let receiver = Receiver::new(
        pipeline.clone(),
        metrics.clone(),
        config.receiver.max_request_bytes.0,
        config.receiver.body_timeout,
        stamping.as_ref().map(|s| s.current()),
    );
    let admin = Arc::new(AdminState {
        ready: AtomicBool::new(false),
        registry: metrics.registry(),
        pipeline: pipeline.clone(),
        status: crate::status::StatusSource::new(
            &config,
            listeners_of(&listeners),
            metrics.clone(),
            pipeline.clone(),
        )
        .with_resource(stamping.as_ref().map(|s| s.current())),
    });
    let (health, health_service) = tonic_health::server::health_reporter();
    health
        .set_service_status("", tonic_health::ServingStatus::Serving)
        .await;

    let agent = Agent {
        stages: shutdown::Stages {
            config: config.shutdown.clone(),
            metrics,
            pipeline,
            receiver,
            admin,
            health,
            // Cancelled by the shutdown sequence in its order; children of
            // `force`, so the one tree's root stops everything.
            close_listeners: tokens.force.child_token(),
            stop_background: tokens.force.child_token(),
            servers: TaskTracker::new(),
            exporters: TaskTracker::new(),
            background: TaskTracker::new(),
            panics: PanicFlag::default(),
            tokens,
        },
        config,
    };

    let addr = |l: &Option<TcpListener>| {
        l.as_ref()
            .and_then(|l| l.local_addr().ok())
            .map_or_else(|| "disabled".to_owned(), |a| a.to_string())
    };
    let (grpc_addr, http_addr, admin_addr) = (
        addr(&listeners.grpc),
        addr(&listeners.http),
        addr(&listeners.admin),
    );
    let (grpc_socket, http_socket) = record_listening(&agent.stages.metrics, &listeners);

    if listeners.grpc.is_some() || listeners.grpc_unix.is_some() {
        let mut otlp = receiver::grpc::router(agent.stages.receiver.clone());
        if let Some(tokens) = &tokens_required {
            let receiver = agent.stages.receiver.clone();
            otlp = auth::require_token(otlp, tokens.clone(), receiver, auth::Protocol::Grpc);
        }
        // Health stays outside the token check, so probes need no token.
        let router = tonic::service::Routes::new(health_service)
            .into_axum_router()
            .merge(otlp);
        let names = ["grpc server", "grpc unix socket server"];
        let tls = server_tls(&agent, &receiver_tls, "grpc");
        serve_both(
            &agent,
            names,
            listeners.grpc,
            listeners.grpc_unix,
            router,
            tls,
        );
    }
    if listeners.http.is_some() || listeners.http_unix.is_some() {
        let router = receiver::http::router(
            agent.stages.receiver.clone(),
            &agent.config.receiver.http.cors,
            tokens_required.clone(),
        );
        let names = ["http server", "http unix socket server"];
        let tls = server_tls(&agent, &receiver_tls, "http");
        serve_both(
            &agent,
            names,
            listeners.http,
            listeners.http_unix,
            router,
            tls,
        );
    }
    if let Some(listener) = listeners.admin {
        // The admin listener stays up through shutdown so /readyz shows 503.
        let stop = agent.stages.tokens.force.clone();
        let router = admin::router(agent.stages.admin.clone(), stop.clone());
        agent
            .stages
            .panics
            .spawn(&agent.stages.background, "admin server", async move {
                let result = axum::serve(listener, router)
                    .with_graceful_shutdown(stop.cancelled_owned())
                    .await;
                if let Err(e) = result {
                    tracing::error!(error = %e, "admin server failed");
                }
            });
    }

    start_pipeline_tasks(&agent);
    agent.stages.panics.spawn(
        &agent.stages.background,
        "reloader",
        reloader.run(reload, agent.stages.stop_background.clone()),
    );
    agent.stages.admin.ready.store(true, Ordering::Release);
    tracing::info!(
        grpc = %grpc_addr,
        http = %http_addr,
        admin = %admin_addr,
        grpc_socket = %grpc_socket.as_deref().unwrap_or("none"),
        http_socket = %http_socket.as_deref().unwrap_or("none"),
        tls = receiver_tls.is_some(),
        upstream = agent.config.upstream.endpoint.as_deref().unwrap_or("none"),
        spool_rows = opened.stats.rows,
        "listening"
    );
    let mut status = format!("listening grpc={grpc_addr} http={http_addr}");
    for (key, socket) in [("grpc_socket", &grpc_socket), ("http_socket", &http_socket)] {
        if let Some(socket) = socket {
            status.push_str(&format!(" {key}={socket}"));
        }
    }
    crate::systemd::ready(
        &status,
        &agent.stages.panics,
        &agent.stages.background,
        agent.stages.tokens.force.clone(),
    );

    agent.stages.tokens.begin.cancelled().await;
    Ok(shutdown::run(agent.stages).await)
}

/// `telespool drain`: no listeners; replay the spool until it is empty or
/// `timeout` passes, then run the normal shutdown sequence.
pub async fn drain(
    config: Config,
    files: Files,
    spool: Spool,
    opened: OpenReport,
    timeout: std::time::Duration,
    tokens: ShutdownTokens,
    reload: ReloadRequests,
) -> Result<Summary, StartError> {
    let watch = spool.clone();
    let begin = tokens.begin.clone();
    tokio::spawn(async move {
        let deadline = tokio::time::Instant::now() + timeout;
        loop {
            let rows = watch.stats_cached().rows;
            if rows == 0 {
                tracing::info!("spool is empty; drain complete");
                break;
            }
            if tokio::time::Instant::now() >= deadline {
                tracing::warn!(rows_left = rows, "drain timeout reached");
                break;
            }
            tokio::select! {
                _ = begin.cancelled() => return,
                _ = tokio::time::sleep(std::time::Duration::from_millis(100)) => {}
            }
        }
        begin.cancel();
    });
    let listeners = Listeners::default();
    run(config, files, spool, opened, listeners, tokens, reload).await
}

/// Refuse an `upstream.endpoint` that is one of our own TCP listeners (say,
/// `--upstream` and `--grpc-listen` both 127.0.0.1:4317): the agent would
/// forward every batch to itself. Only literal IP addresses and `localhost`
/// are compared; a name that resolves to this host is not caught.
fn check_upstream_is_not_self(endpoint: &str, listeners: &Listeners) -> Result<(), StartError> {
    let Ok(uri) = endpoint.parse::<http::Uri>() else {
        return Ok(()); // the exporter reports a malformed endpoint itself
    };
    let Some(host) = uri.host() else {
        return Ok(());
    };
    let port = uri
        .port_u16()
        .unwrap_or(if uri.scheme_str() == Some("https") {
            443
        } else {
            80
        });
    let host = host.trim_start_matches('[').trim_end_matches(']');
    let ips: Vec<IpAddr> = if host.eq_ignore_ascii_case("localhost") {
        vec![Ipv4Addr::LOCALHOST.into(), Ipv6Addr::LOCALHOST.into()]
    } else {
        host.parse().ok().into_iter().collect()
    };
    let ours = [
        (&listeners.grpc, "gRPC", "grpc"),
        (&listeners.http, "HTTP", "http"),
    ];
    for (listener, what, key) in ours {
        let Some(addr) = listener.as_ref().and_then(|l| l.local_addr().ok()) else {
            continue;
        };
        let same_ip =
            |ip: &IpAddr| *ip == addr.ip() || (addr.ip().is_unspecified() && ip.is_loopback());
        if addr.port() == port && ips.iter().any(same_ip) {
            return Err(StartError::UpstreamIsSelf {
                endpoint: endpoint.to_owned(),
                addr,
                what,
                key,
            });
        }
    }
    Ok(())
}

/// The handshake side of `[receiver.tls]` for one listener, if configured.
fn server_tls(
    agent: &Agent,
    config: &Option<Reloadable<rustls::ServerConfig>>,
    listener: &'static str,
) -> Option<ServerTls> {
    config.as_ref().map(|config| {
        ServerTls::new(
            config.clone(),
            agent.config.receiver.header_timeout,
            listener,
            agent.stages.metrics.tls_handshake_failures.clone(),
        )
    })
}

/// Every address the receivers serve on, as `listener_info` metrics; returns
/// the Unix socket paths (gRPC, HTTP) for the `listening` line.
fn record_listening(metrics: &Metrics, l: &Listeners) -> (Option<String>, Option<String>) {
    let tcp = |l: &Option<TcpListener>| {
        l.as_ref()
            .and_then(|l| l.local_addr().ok())
            .map(|a| a.to_string())
    };
    let unix = |l: &Option<UnixSocketListener>| l.as_ref().map(|l| l.path().display().to_string());
    let (grpc_socket, http_socket) = (unix(&l.grpc_unix), unix(&l.http_unix));
    for (receiver, transport, address) in [
        ("grpc", "tcp", tcp(&l.grpc)),
        ("grpc", "unix", grpc_socket.clone()),
        ("http", "tcp", tcp(&l.http)),
        ("http", "unix", http_socket.clone()),
    ] {
        if let Some(address) = address {
            metrics.listening(receiver, transport, &address);
        }
    }
    (grpc_socket, http_socket)
}

/// Serve one receiver's router on its TCP listener and its Unix socket.
fn serve_both(
    agent: &Agent,
    names: [&'static str; 2],
    tcp: Option<TcpListener>,
    unix: Option<UnixSocketListener>,
    router: axum::Router,
    tls: Option<ServerTls>,
) {
    if let Some(listener) = tcp {
        let listener =
            connections::NoDelayListener::new(listener, agent.stages.close_listeners.clone());
        serve(agent, names[0], listener, router.clone(), tls.clone());
    }
    if let Some(listener) = unix {
        serve(agent, names[1], listener, router, tls);
    }
}

/// Serve an OTLP listener (TCP or Unix socket) with the `[receiver]` connection limits.
fn serve<L: axum::serve::Listener>(
    agent: &Agent,
    name: &'static str,
    listener: L,
    router: axum::Router,
    tls: Option<ServerTls>,
) {
    let limits = ConnectionLimits::from(&agent.config.receiver);
    let serving = connections::serve(
        listener,
        router,
        limits,
        tls,
        agent.stages.close_listeners.clone(),
        agent.stages.panics.clone(),
    );
    agent
        .stages
        .panics
        .spawn(&agent.stages.servers, name, serving);
}

fn start_pipeline_tasks(agent: &Agent) {
    let p = &agent.stages.pipeline;
    let panics = &agent.stages.panics;
    panics.spawn(
        &agent.stages.background,
        "batch timer",
        p.clone()
            .run_batch_timer(agent.stages.stop_background.clone()),
    );
    panics.spawn(
        &agent.stages.background,
        "spiller",
        p.clone().run_spiller(agent.stages.stop_background.clone()),
    );
    for _ in 0..agent.config.upstream.concurrency {
        panics.spawn(
            &agent.stages.exporters,
            "export worker",
            p.clone()
                .run_export_worker(agent.stages.tokens.force.clone()),
        );
    }
    // Durable mode sends everything through the spool: replay is the export path.
    let replay_workers = match p.is_durable() {
        true => agent.config.upstream.concurrency,
        false => (agent.config.upstream.concurrency / 2).max(1),
    };
    panics.spawn(
        &agent.stages.exporters,
        "durable writer",
        p.clone()
            .run_durable_writer(agent.stages.tokens.force.clone()),
    );
    panics.spawn(
        &agent.stages.exporters,
        "replay pace",
        p.clone()
            .run_replay_pace(agent.stages.stop_background.clone()),
    );
    for _ in 0..replay_workers {
        panics.spawn(
            &agent.stages.exporters,
            "replay worker",
            p.clone().run_replay_worker(
                agent.stages.stop_background.clone(),
                agent.stages.tokens.force.clone(),
            ),
        );
    }
}

/// The listeners of `l` (and the admin listener) as the snapshot lists them.
pub fn listeners_of(l: &Listeners) -> Vec<crate::api::Listener> {
    let tcp = |l: &Option<tokio::net::TcpListener>| {
        l.as_ref()
            .and_then(|l| l.local_addr().ok())
            .map(|a| a.to_string())
    };
    let unix = |l: &Option<UnixSocketListener>| l.as_ref().map(|l| l.path().display().to_string());
    [
        ("grpc", "tcp", tcp(&l.grpc)),
        ("grpc", "unix", unix(&l.grpc_unix)),
        ("http", "tcp", tcp(&l.http)),
        ("http", "unix", unix(&l.http_unix)),
        ("admin", "tcp", tcp(&l.admin)),
    ]
    .into_iter()
    .filter_map(|(receiver, transport, address)| {
        Some(crate::api::Listener {
            receiver: receiver.to_owned(),
            transport: transport.to_owned(),
            address: address?,
        })
    })
    .collect()
}
