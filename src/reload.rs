//! The files the agent reads besides its config, at start and again on SIGHUP.
//!
//! They are `receiver.auth.token_file`, the `[receiver.tls]` certificate, key
//! and client CA, `upstream.headers_file` and the `[upstream.tls]` files; and
//! the host facts `[resource]` detects (hostname, machine id).
//!
//! - **At start** [`Files::load`] reads them all before the spool is opened
//!   or a socket bound; any problem stops the start with an error naming the
//!   key and the file, as a config error does.
//! - **On SIGHUP** [`Reloader`] reads them again, each group on its own
//!   (receiver TLS, tokens, upstream). A group whose files are all good
//!   replaces the old one: new connections get the new certificate, new
//!   requests are checked against the new tokens, new exports use the new
//!   headers and (for `https://`) a new channel. Connections already open,
//!   requests and exports in flight keep what they started with, so nothing
//!   is dropped. A group with a bad file keeps its old setting and logs an
//!   error naming the file; a reload never stops the agent.
//! - The config file itself is not re-read: changing a path or any other key
//!   needs a restart.

use std::sync::Arc;

use tokio::sync::Notify;
use tokio_util::sync::CancellationToken;

use crate::config::Config;
use crate::exporter::{Upstream, UpstreamSetup};
use crate::receiver::auth::{TokenFileError, Tokens};
use crate::reloadable::Reloadable;
use crate::resource::{Stamping, StampingHandle};
use crate::tls::TlsError;

/// Requests for a reload (SIGHUP), from `main`'s signal handler to the agent.
/// A request made while a reload runs starts another one after it.
#[derive(Clone, Debug, Default)]
pub struct ReloadRequests(Arc<Notify>);

impl ReloadRequests {
    pub fn request(&self) {
        self.0.notify_one();
    }

    async fn requested(&self) {
        self.0.notified().await;
    }
}

/// A file the config names cannot be used; the start stops with this error.
#[derive(Debug, thiserror::Error)]
pub enum FilesError {
    #[error(transparent)]
    Exporter(#[from] crate::exporter::ExporterError),
    #[error(transparent)]
    TokenFile(#[from] TokenFileError),
    #[error(transparent)]
    Tls(#[from] TlsError),
}

/// Everything read from the files the config names.
pub struct Files {
    pub tokens: Option<Tokens>,
    pub receiver_tls: Option<rustls::ServerConfig>,
    /// None: no `upstream.endpoint`.
    pub upstream: Option<UpstreamSetup>,
    /// `[resource]` with its detected attributes; None: no `[resource]`.
    pub resource: Option<Stamping>,
}

impl Files {
    /// Read every file the config names. Needs no runtime.
    pub fn load(config: &Config) -> Result<Files, FilesError> {
        Ok(Files {
            tokens: load_tokens(config)?,
            receiver_tls: load_receiver_tls(config)?,
            upstream: load_upstream(config)?,
            resource: config.resource.as_ref().map(Stamping::load),
        })
    }
}

fn load_tokens(config: &Config) -> Result<Option<Tokens>, crate::receiver::auth::TokenFileError> {
    config
        .receiver
        .auth
        .token_file
        .as_deref()
        .map(Tokens::from_file)
        .transpose()
}

fn load_receiver_tls(
    config: &Config,
) -> Result<Option<rustls::ServerConfig>, crate::tls::TlsError> {
    config
        .receiver
        .tls
        .as_ref()
        .map(crate::tls::server_config)
        .transpose()
}

fn load_upstream(config: &Config) -> Result<Option<UpstreamSetup>, crate::exporter::ExporterError> {
    config
        .upstream
        .endpoint
        .as_deref()
        .map(|endpoint| UpstreamSetup::load(&config.upstream, endpoint))
        .transpose()
}

/// What the running agent lets a reload replace.
pub struct Reloader {
    /// The config as at start: which files to read.
    pub config: Config,
    pub tokens: Option<Reloadable<Tokens>>,
    pub receiver_tls: Option<Reloadable<rustls::ServerConfig>>,
    pub upstream: Option<Upstream>,
    /// `[resource]`: detection runs again on every reload.
    pub resource: Option<StampingHandle>,
}

/// One reload's files, read off the runtime; each group on its own.
struct Loaded {
    tokens: Option<Result<Tokens, String>>,
    receiver_tls: Option<Result<rustls::ServerConfig, String>>,
    upstream: Option<Result<UpstreamSetup, String>>,
    resource: Option<Stamping>,
}

impl Reloader {
    /// Reload on every request until `stop` fires.
    pub async fn run(self, requests: ReloadRequests, stop: CancellationToken) {
        let this = Arc::new(self);
        loop {
            tokio::select! {
                _ = stop.cancelled() => return,
                _ = requests.requested() => {}
            }
            let reader = this.clone();
            match tokio::task::spawn_blocking(move || reader.read()).await {
                Ok(loaded) => this.apply(loaded),
                Err(e) => {
                    tracing::error!(error = %e, "reloading files failed; kept the previous ones")
                }
            }
        }
    }

    /// Read the files of every configured group (blocking file I/O).
    fn read(&self) -> Loaded {
        let c = &self.config;
        Loaded {
            tokens: self
                .tokens
                .as_ref()
                .and_then(|_| load_tokens(c).map_err(|e| e.to_string()).transpose()),
            receiver_tls: self
                .receiver_tls
                .as_ref()
                .and_then(|_| load_receiver_tls(c).map_err(|e| e.to_string()).transpose()),
            upstream: self
                .upstream
                .as_ref()
                .and_then(|_| load_upstream(c).map_err(|e| e.to_string()).transpose()),
            resource: self
                .resource
                .as_ref()
                .and(c.resource.as_ref())
                .map(Stamping::load),
        }
    }

    /// Swap in every group that loaded; log one line for what was reloaded
    /// and one error per group that kept its old setting.
    fn apply(&self, loaded: Loaded) {
        let mut reloaded = Vec::new();
        let mut kept = Vec::new();
        let mut outcome = |what: &'static str, result: Result<(), String>| match result {
            Ok(()) => reloaded.push(what),
            Err(e) => {
                tracing::error!(error = %e, "reload: kept the previous {what}");
                kept.push(what);
            }
        };
        if let (Some(slot), Some(result)) = (&self.receiver_tls, loaded.receiver_tls) {
            outcome("receiver TLS", result.map(|config| slot.set(config)));
        }
        if let (Some(slot), Some(result)) = (&self.tokens, loaded.tokens) {
            outcome("tokens", result.map(|tokens| slot.set(tokens)));
        }
        if let (Some(upstream), Some(result)) = (&self.upstream, loaded.upstream) {
            outcome(
                "upstream TLS and headers",
                result.map(|setup| upstream.reload(setup)),
            );
        }
        // Detection failures are logged by the load and only leave attributes out.
        if let (Some(handle), Some(stamping)) = (&self.resource, loaded.resource) {
            handle.set(stamping);
            reloaded.push("resource attributes");
        }
        match (reloaded.is_empty(), kept.is_empty()) {
            (true, true) => tracing::info!(
                "reload requested; no token, TLS or upstream headers files are configured"
            ),
            (_, true) => tracing::info!(reloaded = %reloaded.join(", "), "reloaded files"),
            (_, false) => tracing::warn!(
                reloaded = %reloaded.join(", "),
                kept = %kept.join(", "),
                "reload incomplete: some files could not be used"
            ),
        }
    }
}
