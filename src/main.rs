//! The `telespool` binary: parse the command line, load and check the config,
//! open the spool, bind, run, and exit with the shutdown sequence's status.

use std::io::IsTerminal;
use std::process::ExitCode;

use clap::Parser;
use telespool::app::{self, Listeners, ShutdownTokens};
use telespool::cli::{Cli, Command};
use telespool::config::{Config, LogFormat};
use telespool::spool::{Spool, SpoolOptions, Synchronous};

fn main() -> ExitCode {
    let cli = Cli::parse();
    let config = match cli.overrides.load() {
        Ok(config) => config,
        Err(e) => {
            eprintln!("telespool: {e}");
            return ExitCode::from(2);
        }
    };
    match cli.command.unwrap_or(Command::Run) {
        Command::CheckConfig => {
            print!("{}", config.to_toml());
            eprintln!("telespool: configuration is valid");
            ExitCode::SUCCESS
        }
        Command::Run => run(config),
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

fn run(config: Config) -> ExitCode {
    init_logging(&config);
    let spool_path = config.spool.resolved_path();
    let options = SpoolOptions {
        max_bytes: config.spool.max_bytes.0,
        synchronous: Synchronous::Normal,
    };
    let (spool, opened) = match Spool::open(&spool_path, options) {
        Ok(opened) => opened,
        Err(e) => {
            tracing::error!(path = %spool_path.display(), error = %e, "cannot open the spool");
            return ExitCode::from(2);
        }
    };
    if let Some((moved_to, why)) = &opened.quarantined {
        tracing::error!(
            path = %spool_path.display(),
            moved_to = %moved_to.display(),
            reason = %why,
            "spool file was unusable; moved it aside and started a fresh spool"
        );
    }
    tracing::info!(
        path = %spool_path.display(),
        rows = opened.stats.rows,
        bytes = opened.stats.bytes,
        "spool open"
    );

    let runtime = match tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .thread_name("telespool")
        .build()
    {
        Ok(rt) => rt,
        Err(e) => {
            tracing::error!(error = %e, "cannot start the async runtime");
            return ExitCode::from(2);
        }
    };
    runtime.block_on(async move {
        let listeners = match Listeners::bind(&config).await {
            Ok(l) => l,
            Err(e) => {
                tracing::error!(error = %e, "cannot start");
                return ExitCode::from(2);
            }
        };
        let tokens = ShutdownTokens::new();
        tokio::spawn(watch_signals(tokens.clone()));
        match app::run(config, spool, opened, listeners, tokens).await {
            Ok(summary) => ExitCode::from(summary.exit_code() as u8),
            Err(e) => {
                tracing::error!(error = %e, "cannot start");
                ExitCode::from(2)
            }
        }
    })
}

/// First SIGTERM/SIGINT begins the shutdown sequence; a second one forces it.
async fn watch_signals(tokens: ShutdownTokens) {
    use tokio::signal::unix::{signal, SignalKind};
    let (Ok(mut term), Ok(mut int)) = (
        signal(SignalKind::terminate()),
        signal(SignalKind::interrupt()),
    ) else {
        tracing::error!(
            "cannot install signal handlers; stop telespool with SIGKILL only as a last resort"
        );
        return;
    };
    for round in 0..2 {
        let name = tokio::select! {
            _ = term.recv() => "SIGTERM",
            _ = int.recv() => "SIGINT",
        };
        if round == 0 {
            tracing::info!(signal = name, "stop signal received; starting shutdown");
            tokens.begin.cancel();
        } else {
            tracing::warn!(signal = name, "second stop signal; skipping the flush");
            tokens.force.cancel();
        }
    }
}
