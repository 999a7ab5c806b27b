//! The `telespool` binary: parse the command line, load and check the config,
//! open the spool, bind, run, and exit with the shutdown sequence's status.

use std::io::IsTerminal;
use std::process::ExitCode;

use clap::Parser;
use telespool::app::{self, Listeners, ShutdownTokens};
use telespool::cli::{Cli, Command, Generated, SpoolCommand};
use telespool::commands;
use telespool::config::{Config, LogFormat, SyncMode};
use telespool::reload::{Files, ReloadRequests};
use telespool::spool::{Spool, SpoolOptions, Synchronous};
use telespool::top;

fn main() -> ExitCode {
    let cli = Cli::parse();
    if let Some(Command::Generate { what, dir }) = &cli.command {
        let written = match what {
            Generated::Man => telespool::manual::write_man(dir),
            Generated::Completions => telespool::manual::write_completions(dir),
        };
        return match written {
            Ok(files) => {
                for file in files {
                    println!("{}", file.display());
                }
                ExitCode::SUCCESS
            }
            Err(e) => {
                eprintln!("telespool: cannot write into {}: {e}", dir.display());
                ExitCode::from(2)
            }
        };
    }
    let layered = match cli.overrides.load_layered(std::env::vars_os()) {
        Ok(layered) => layered,
        Err(e) => {
            eprintln!("telespool: {e}");
            return ExitCode::from(2);
        }
    };
    let config = layered.config;
    match cli.command.unwrap_or(Command::Run) {
        Command::Generate { .. } => ExitCode::SUCCESS,
        Command::CheckConfig { show_origin } => {
            match show_origin {
                true => print!("{}", layered.origins.render(&config)),
                false => print!("{}", config.to_toml()),
            }
            // The files it names too: what a start or a SIGHUP would read.
            match Files::load(&config) {
                Err(e) => {
                    eprintln!("telespool: {e}");
                    return ExitCode::from(2);
                }
                Ok(files) => {
                    if let Some(stamping) = files.resource {
                        print!("{}", stamping.to_comment());
                    }
                }
            }
            eprintln!("telespool: configuration is valid");
            ExitCode::SUCCESS
        }
        Command::Run => run(config, None),
        Command::Drain { timeout } => {
            if config.upstream.endpoint.is_none() {
                eprintln!("telespool: drain needs an upstream: set upstream.endpoint, --upstream or TELESPOOL_UPSTREAM_ENDPOINT");
                return ExitCode::from(2);
            }
            run(config, Some(timeout))
        }
        Command::Status { json } => offline(|| {
            let rt = tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()?;
            let text = rt.block_on(commands::status(config.admin.listen, json))?;
            print!("{text}");
            Ok(ExitCode::SUCCESS)
        }),
        Command::Top { once, interval } => offline(|| {
            let rt = tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()?;
            match once {
                true => print!("{}", rt.block_on(top::once(config.admin.listen, interval))?),
                false => rt.block_on(top::run(config.admin.listen, interval))?,
            }
            Ok(ExitCode::SUCCESS)
        }),
        Command::Spool { command } => {
            let path = config.spool.resolved_path();
            offline(|| match command {
                SpoolCommand::Stats => {
                    print!("{}", commands::spool_stats(&path)?);
                    Ok(ExitCode::SUCCESS)
                }
                SpoolCommand::Verify => {
                    let (sound, text) = commands::spool_verify(&path)?;
                    print!("{text}");
                    Ok(if sound {
                        ExitCode::SUCCESS
                    } else {
                        ExitCode::from(1)
                    })
                }
                SpoolCommand::Export { signal } => {
                    let stdout = std::io::stdout();
                    let mut out = std::io::BufWriter::new(stdout.lock());
                    let n = commands::spool_export(&path, signal, &mut out)?;
                    std::io::Write::flush(&mut out)?;
                    eprintln!("telespool: exported {n} batches");
                    Ok(ExitCode::SUCCESS)
                }
                SpoolCommand::Purge { yes } => {
                    if !yes {
                        eprintln!("telespool: purge deletes every spooled batch for good; run again with --yes");
                        return Ok(ExitCode::from(2));
                    }
                    print!("{}", commands::spool_purge(&path)?);
                    Ok(ExitCode::SUCCESS)
                }
            })
        }
    }
}

/// Run an operator command, printing its error and exiting non-zero on failure.
fn offline(f: impl FnOnce() -> Result<ExitCode, Box<dyn std::error::Error>>) -> ExitCode {
    match f() {
        Ok(code) => code,
        Err(e) => {
            eprintln!("telespool: {e}");
            ExitCode::from(2)
        }
    }
}

fn init_logging(config: &Config) {
    let filter = tracing_subscriber::EnvFilter::try_from_default_env()
        .or_else(|_| tracing_subscriber::EnvFilter::try_new(&config.log.level))
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info"));
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr)
        .with_ansi(std::io::stderr().is_terminal());
    match config.log.format {
        LogFormat::Text => builder.init(),
        LogFormat::Json => builder.json().flatten_event(true).init(),
    }
}

/// glibc malloc thresholds for the agent's allocation pattern, set once at
/// start before any thread exists.
///
/// Request bodies (tens of KiB each) are allocated on the runtime's worker
/// threads, so in glibc's per-thread arenas, and freed together when their
/// batch (~4 MiB) is acknowledged. With the default 128 KiB trim threshold
/// each such free gives the top of the arena back to the kernel
/// (`madvise`), and the next batch's bodies fault the same pages in again:
/// 15-30 K page faults per million realistic spans. Keeping up to 64 MiB of
/// free top per arena, and mmapping only allocations of 4 MiB or more (which
/// also fixes the thresholds that glibc otherwise raises as it goes), cut the
/// page faults by ~85 % and the agent's CPU per span by 4-13 % for +2-3 MiB
/// of peak RSS (benches/RESULTS.md, "Hot path and compression (issue 17), round 3").
/// Memory in use is still bounded by `buffer.max_bytes`; this only decides
/// how much freed memory waits for reuse instead of going back to the
/// kernel.
///
/// One arena for every thread (`M_ARENA_MAX`): a body is allocated by the
/// worker that read it and freed by whichever worker saw its batch
/// acknowledged, and glibc returns a freed chunk to the arena that made it.
/// With an arena per worker each one kept holes the other worker's frees had
/// left, and under a buffer held full by a slower upstream the agent's RSS
/// grew to 123 MiB with a 64 MiB buffer (93 MiB with one arena, same CPU per
/// span; benches/RESULTS.md, "Memory under a saturated buffer"). The arena
/// lock is uncontended at the agent's few allocations per request. Other C
/// libraries (musl) are left as they are.
fn tune_malloc() {
    #[cfg(all(target_os = "linux", target_env = "gnu"))]
    {
        const TRIM_THRESHOLD: libc::c_int = 64 << 20;
        const MMAP_THRESHOLD: libc::c_int = 4 << 20;
        const ARENA_MAX: libc::c_int = 1;
        // SAFETY: mallopt only sets allocator parameters; it is called
        // before the runtime starts any thread (M_ARENA_MAX must be).
        let set = unsafe {
            libc::mallopt(libc::M_TRIM_THRESHOLD, TRIM_THRESHOLD) == 1
                && libc::mallopt(libc::M_MMAP_THRESHOLD, MMAP_THRESHOLD) == 1
                && libc::mallopt(libc::M_ARENA_MAX, ARENA_MAX) == 1
        };
        if !set {
            tracing::warn!("mallopt refused the trim/mmap thresholds or the arena count; keeping glibc's defaults");
        }
    }
}

fn run(config: Config, drain: Option<std::time::Duration>) -> ExitCode {
    init_logging(&config);
    tune_malloc();
    // Token, TLS and header files: before the spool and the sockets, so a bad
    // file stops the start as early as a config error.
    let files = match Files::load(&config) {
        Ok(files) => files,
        Err(e) => {
            tracing::error!(error = %e, "cannot start");
            return ExitCode::from(2);
        }
    };
    let spool_path = config.spool.resolved_path();
    let options = SpoolOptions {
        max_bytes: config.spool.max_bytes.0,
        synchronous: match config.spool.synchronous {
            SyncMode::Normal => Synchronous::Normal,
            SyncMode::Full => Synchronous::Full,
        },
    };
    let (spool, opened) = match Spool::open(&spool_path, options) {
        Ok(opened) => opened,
        Err(e) => {
            tracing::error!(path = %spool_path.display(), error = %e, "cannot open the spool");
            return ExitCode::from(2);
        }
    };
    if let Some((moved_to, why)) = &opened.quarantined {
        // One record, one line: SQLite's check output can span lines.
        let reason = why.split_whitespace().collect::<Vec<_>>().join(" ");
        match &opened.salvaged {
            Some(s) => tracing::error!(
                path = %spool_path.display(),
                moved_to = %moved_to.display(),
                salvaged_rows = s.rows,
                salvaged_items = s.items,
                lost_rows = s.lost_rows,
                lost_items = s.lost_items.iter().sum::<u64>(),
                details = %s.details.display(),
                reason = %reason,
                "spool file was damaged; moved it aside and copied its readable rows into a fresh spool"
            ),
            None => tracing::error!(
                path = %spool_path.display(),
                moved_to = %moved_to.display(),
                reason = %reason,
                "spool file was unusable; moved it aside and started a fresh spool"
            ),
        }
    }
    tracing::info!(
        path = %spool_path.display(),
        rows = opened.stats.rows,
        bytes = opened.stats.bytes,
        "spool open"
    );

    let mut builder = tokio::runtime::Builder::new_multi_thread();
    // 0: tokio's default, one per CPU the process may use (TOKIO_WORKER_THREADS
    // overrides it).
    if config.runtime.worker_threads > 0 {
        builder.worker_threads(config.runtime.worker_threads);
    }
    let runtime = match builder.enable_all().thread_name("telespool").build() {
        Ok(rt) => rt,
        Err(e) => {
            tracing::error!(error = %e, "cannot start the async runtime");
            return ExitCode::from(2);
        }
    };
    let code = runtime.block_on(async move {
        let listeners = match drain {
            Some(_) => Ok(Listeners::default()),
            None => Listeners::bind(&config).await,
        };
        let listeners = match listeners {
            Ok(l) => l,
            Err(e) => {
                tracing::error!(error = %e, "cannot start");
                return ExitCode::from(2);
            }
        };
        let tokens = ShutdownTokens::new();
        let reload = ReloadRequests::default();
        tokio::spawn(watch_signals(tokens.clone(), reload.clone()));
        let result = match drain {
            Some(timeout) => {
                app::drain(config, files, spool, opened, timeout, tokens, reload).await
            }
            None => app::run(config, files, spool, opened, listeners, tokens, reload).await,
        };
        match result {
            Ok(summary) if drain.is_some() && summary.spool_rows_left > 0 => {
                eprintln!(
                    "telespool: drain incomplete: {} batches left in the spool",
                    summary.spool_rows_left
                );
                ExitCode::from(3)
            }
            Ok(summary) => ExitCode::from(summary.exit_code() as u8),
            Err(e) => {
                tracing::error!(error = %e, "cannot start");
                ExitCode::from(2)
            }
        }
    });
    // A blocking task stuck on the spool (a write the deadline cut) must not
    // hold the exit: the shutdown sequence has already accounted for it.
    runtime.shutdown_timeout(std::time::Duration::from_millis(200));
    code
}

/// First SIGTERM/SIGINT begins the shutdown sequence; a second one forces it.
/// SIGHUP re-reads the token, TLS and upstream headers files. The handlers
/// are installed when this is called (inside the runtime), before the agent
/// reports itself ready, so an early SIGHUP cannot kill it.
fn watch_signals(
    tokens: ShutdownTokens,
    reload: ReloadRequests,
) -> impl std::future::Future<Output = ()> {
    use tokio::signal::unix::{signal, SignalKind};
    let handlers = (
        signal(SignalKind::terminate()),
        signal(SignalKind::interrupt()),
        signal(SignalKind::hangup()),
    );
    async move {
        let (Ok(term), Ok(int), Ok(hup)) = handlers else {
            tracing::error!(
                "cannot install signal handlers; stop telespool with SIGKILL only as a last resort"
            );
            return;
        };
        serve_signals(term, int, hup, tokens, reload).await
    }
}

async fn serve_signals(
    mut term: tokio::signal::unix::Signal,
    mut int: tokio::signal::unix::Signal,
    mut hup: tokio::signal::unix::Signal,
    tokens: ShutdownTokens,
    reload: ReloadRequests,
) {
    let mut round = 0;
    while round < 2 {
        let name = tokio::select! {
            _ = term.recv() => "SIGTERM",
            _ = int.recv() => "SIGINT",
            _ = hup.recv() => {
                tracing::info!(signal = "SIGHUP", "reloading token, TLS and upstream headers files");
                reload.request();
                continue;
            }
        };
        round += 1;
        if round == 1 {
            tracing::info!(signal = name, "stop signal received; starting shutdown");
            tokens.begin.cancel();
        } else {
            tracing::warn!(signal = name, "second stop signal; skipping the flush");
            tokens.force.cancel();
        }
    }
}
