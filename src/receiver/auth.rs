//! Bearer-token authentication for the OTLP receivers (`receiver.auth.token_file`).
//!
//! Tokens are read from a file at start and again on SIGHUP (one per line;
//! blank lines and lines starting with `#` are skipped), never from the
//! command line or the environment, where other users could read them. A
//! reload replaces the whole set: the next request is checked against the
//! new tokens. A request must carry
//! `Authorization: Bearer <token>` matching one of them; otherwise it is refused
//! with gRPC UNAUTHENTICATED / HTTP 401 (through [`IngestError::Unauthenticated`],
//! so the mapping stays in one place), counted as `outcome="unauthenticated"`.
//! Neither the expected nor the presented token is ever logged.
//!
//! Comparison is constant-time in the token's contents: `subtle`'s
//! `ConstantTimeEq` (already in the dependency tree through rustls) and every
//! configured token is compared, with no early exit. Only the lengths can leak,
//! as with any such comparison. `subtle` is used rather than a hand-written
//! xor-fold because it puts an optimisation barrier around the result, which a
//! plain fold lacks (the compiler may turn it back into an early exit).
//!
//! The gRPC health service is outside the check, so probes need no token;
//! CORS preflights are answered before it (browsers send no credentials there).

use std::path::{Path, PathBuf};
use std::sync::Arc;

use axum::extract::{Request, State};
use axum::middleware::{self, Next};
use axum::response::Response;
use axum::Router;
use http::header;
use subtle::ConstantTimeEq;

use super::{IngestError, Receiver};
use crate::reloadable::Reloadable;
use crate::signal::Signal;

/// Why the token file could not be used.
#[derive(Debug, thiserror::Error)]
pub enum TokenFileError {
    /// The file named by `receiver.auth.token_file` cannot be read.
    #[error("cannot read receiver.auth.token_file {path}: {source}")]
    Read {
        path: PathBuf,
        source: std::io::Error,
    },
    /// The file holds no token: every client would be refused.
    #[error("receiver.auth.token_file {path} holds no token (one per line; # starts a comment)")]
    Empty { path: PathBuf },
}

/// The accepted bearer tokens. `Debug` shows only how many there are.
pub struct Tokens(Vec<Vec<u8>>);

impl std::fmt::Debug for Tokens {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "Tokens({} configured)", self.0.len())
    }
}

impl Tokens {
    /// Read tokens from `path`, one per line.
    pub fn from_file(path: &Path) -> Result<Tokens, TokenFileError> {
        let text = std::fs::read_to_string(path).map_err(|source| TokenFileError::Read {
            path: path.to_owned(),
            source,
        })?;
        let tokens = Tokens::parse(&text);
        match tokens.0.is_empty() {
            true => Err(TokenFileError::Empty {
                path: path.to_owned(),
            }),
            false => Ok(tokens),
        }
    }

    /// One token per line, trimmed; blank lines and `#` comments skipped.
    pub fn parse(text: &str) -> Tokens {
        Tokens(
            text.lines()
                .map(str::trim)
                .filter(|l| !l.is_empty() && !l.starts_with('#'))
                .map(|l| l.as_bytes().to_vec())
                .collect(),
        )
    }

    /// Whether `presented` equals one of the tokens; compares against all.
    pub fn accepts(&self, presented: &[u8]) -> bool {
        let mut matched = subtle::Choice::from(0);
        for token in &self.0 {
            matched |= token.as_slice().ct_eq(presented);
        }
        matched.into()
    }

    /// Whether the request's `Authorization: Bearer` token is accepted.
    fn authorizes(&self, request: &Request) -> bool {
        let Some(value) = request.headers().get(header::AUTHORIZATION) else {
            return false;
        };
        let value = value.as_bytes();
        let scheme = b"bearer ";
        if value.len() <= scheme.len() || !value[..scheme.len()].eq_ignore_ascii_case(scheme) {
            return false;
        }
        self.accepts(value[scheme.len()..].trim_ascii())
    }
}

/// Which protocol's answer a refusal takes.
#[derive(Clone, Copy, Debug)]
pub enum Protocol {
    Grpc,
    Http,
}

#[derive(Clone)]
struct Guard {
    tokens: Reloadable<Tokens>,
    receiver: Arc<Receiver>,
    protocol: Protocol,
}

/// Require a bearer token on every route of `router`.
pub fn require_token(
    router: Router,
    tokens: Reloadable<Tokens>,
    receiver: Arc<Receiver>,
    protocol: Protocol,
) -> Router {
    let guard = Guard {
        tokens,
        receiver,
        protocol,
    };
    router.layer(middleware::from_fn_with_state(guard, check))
}

async fn check(State(guard): State<Guard>, request: Request, next: Next) -> Response {
    if guard.tokens.get().authorizes(&request) {
        return next.run(request).await;
    }
    let e = IngestError::Unauthenticated;
    let path = request.uri().path();
    let signal = Signal::ALL
        .into_iter()
        .find(|s| s.grpc_path() == path || s.http_path() == path);
    if let Some(signal) = signal {
        guard.receiver.refused(signal, &e, 0);
    }
    match guard.protocol {
        Protocol::Grpc => e.to_status().into_http(),
        Protocol::Http => {
            let mut response = super::http::refusal_response(request.headers(), &e);
            response.headers_mut().insert(
                header::WWW_AUTHENTICATE,
                http::HeaderValue::from_static("Bearer"),
            );
            response
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn tokens_are_read_one_per_line_and_compared_exactly() {
        let tokens = Tokens::parse("# comment\n\n  alpha  \nbeta\n");
        assert!(tokens.accepts(b"alpha"));
        assert!(tokens.accepts(b"beta"));
        for wrong in [&b""[..], b"alph", b"alphaa", b"# comment", b"Alpha"] {
            assert!(
                !tokens.accepts(wrong),
                "{:?}",
                String::from_utf8_lossy(wrong)
            );
        }
        assert_eq!(format!("{tokens:?}"), "Tokens(2 configured)");
    }

    #[test]
    fn the_bearer_scheme_is_required_and_case_insensitive() {
        let tokens = Tokens::parse("secret\n");
        let with = |value: &str| {
            let request = http::Request::builder()
                .header(header::AUTHORIZATION, value)
                .body(axum::body::Body::empty())
                .expect("valid request");
            tokens.authorizes(&request)
        };
        assert!(with("Bearer secret"));
        assert!(with("bearer  secret "));
        assert!(!with("Basic secret"));
        assert!(!with("Bearer"));
        assert!(!with("secret"));
    }
}
