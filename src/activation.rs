//! Socket activation: listeners inherited from the service manager.
//!
//! With `telespool.socket`, systemd binds 127.0.0.1:4317 and :4318 itself and
//! passes the listening sockets to the agent as file descriptors 3, 4, …
//! (`LISTEN_FDS` = how many, `LISTEN_PID` = the pid they are meant for,
//! `LISTEN_FDNAMES` = colon-separated names from `FileDescriptorName=`). The
//! sockets stay open across a restart of the service, so clients connecting
//! while the agent restarts wait in the kernel's accept backlog instead of
//! being refused.
//!
//! Which fd serves what:
//!
//! - if any fd is named `grpc` or `http`, by name (other names are ignored
//!   with a warning);
//! - otherwise by position: the first is OTLP/gRPC, the second OTLP/HTTP.
//!
//! The fds are validated as TCP listening sockets and marked close-on-exec by
//! the `listenfd` crate (the crate root forbids `unsafe`; `listenfd` holds the
//! `FromRawFd` calls). The `LISTEN_*` variables are removed from the
//! environment once read, so a child process does not take them for its own.
//! They are read once, while the runtime's worker threads are still idle.

use std::io;

use tokio::net::TcpListener;

/// Listeners inherited from the service manager; `None` where nothing was passed.
#[derive(Debug, Default)]
pub struct Inherited {
    /// For `receiver.grpc` (fd named `grpc`, or the first fd).
    pub grpc: Option<TcpListener>,
    /// For `receiver.http` (fd named `http`, or the second fd).
    pub http: Option<TcpListener>,
}

/// Why an inherited socket could not be used.
#[derive(Debug, thiserror::Error)]
pub enum ActivationError {
    /// `LISTEN_FDS` passed an fd for `grpc`/`http` that is not a TCP listening
    /// socket (a UDP or Unix socket, or not a socket at all).
    #[error("inherited fd {fd} ({name}) is not a usable TCP listener: {source}; check ListenStream= and FileDescriptorName= in telespool.socket")]
    NotTcp {
        fd: usize,
        name: &'static str,
        source: io::Error,
    },
}

/// Which inherited fd (by position) serves which listener.
#[derive(Debug, Default, PartialEq, Eq)]
pub struct Assignment {
    pub grpc: Option<usize>,
    pub http: Option<usize>,
    /// Fds neither listener uses, with their names (for the warning).
    pub ignored: Vec<(usize, String)>,
}

/// Assign `count` inherited fds from their `LISTEN_FDNAMES` (if any).
///
/// Names are used when they match the fd count and at least one is `grpc` or
/// `http` (systemd names unnamed sockets after the socket unit, e.g.
/// `telespool.socket`: those fall back to position).
pub fn assign(count: usize, names: Option<&str>) -> Assignment {
    let names: Vec<&str> = match names {
        Some(n) if !n.is_empty() => n.split(':').collect(),
        _ => Vec::new(),
    };
    let by_name = names.len() == count && names.iter().any(|n| matches!(*n, "grpc" | "http"));
    let mut a = Assignment::default();
    for index in 0..count {
        let name = names.get(index).copied().unwrap_or("");
        let slot = match (by_name, name, index) {
            (true, "grpc", _) | (false, _, 0) => &mut a.grpc,
            (true, "http", _) | (false, _, 1) => &mut a.http,
            _ => {
                a.ignored.push((index, name.to_owned()));
                continue;
            }
        };
        match slot {
            None => *slot = Some(index),
            Some(_) => a.ignored.push((index, name.to_owned())),
        }
    }
    a
}

/// Take the listeners the service manager passed, and clear `LISTEN_*`.
///
/// Returns an empty [`Inherited`] when the agent was not socket-activated (or
/// the fds were meant for another pid). Must run inside the tokio runtime.
pub fn take_from_env() -> Result<Inherited, ActivationError> {
    let names = std::env::var("LISTEN_FDNAMES").ok();
    // Reads LISTEN_FDS / LISTEN_PID and removes both from the environment.
    let mut fds = listenfd::ListenFd::from_env();
    // Once, while binding, before any task that reads the environment is
    // spawned (listenfd clears LISTEN_FDS and LISTEN_PID the same way), so
    // a child process never inherits sockets meant for us.
    #[allow(clippy::disallowed_methods)]
    std::env::remove_var("LISTEN_FDNAMES");
    if fds.len() == 0 {
        return Ok(Inherited::default());
    }
    let assignment = assign(fds.len(), names.as_deref());
    for (index, name) in &assignment.ignored {
        tracing::warn!(
            fd = 3 + index,
            name = %name,
            "ignoring an inherited socket: telespool uses the ones named grpc and http"
        );
    }
    let mut take = |index: Option<usize>, name: &'static str| match index {
        None => Ok(None),
        Some(index) => {
            let not_tcp = |source| ActivationError::NotTcp {
                fd: 3 + index,
                name,
                source,
            };
            let std_listener = fds
                .take_tcp_listener(index)
                .map_err(not_tcp)?
                .ok_or_else(|| not_tcp(io::Error::other("already taken")))?;
            std_listener.set_nonblocking(true).map_err(not_tcp)?;
            let listener = TcpListener::from_std(std_listener).map_err(not_tcp)?;
            tracing::info!(
                listener = name,
                fd = 3 + index,
                addr = %listener.local_addr().map_or_else(|e| e.to_string(), |a| a.to_string()),
                "using a socket passed by the service manager (socket activation)"
            );
            Ok(Some(listener))
        }
    };
    Ok(Inherited {
        grpc: take(assignment.grpc, "grpc")?,
        http: take(assignment.http, "http")?,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn a(grpc: Option<usize>, http: Option<usize>, ignored: &[(usize, &str)]) -> Assignment {
        Assignment {
            grpc,
            http,
            ignored: ignored.iter().map(|(i, n)| (*i, n.to_string())).collect(),
        }
    }

    #[test]
    fn names_choose_the_listener_whatever_the_order() {
        assert_eq!(assign(2, Some("http:grpc")), a(Some(1), Some(0), &[]));
        assert_eq!(assign(1, Some("http")), a(None, Some(0), &[]));
    }

    #[test]
    fn without_names_the_first_fd_is_grpc_and_the_second_http() {
        assert_eq!(assign(1, None), a(Some(0), None, &[]));
        assert_eq!(assign(2, None), a(Some(0), Some(1), &[]));
        assert_eq!(assign(3, Some("")), a(Some(0), Some(1), &[(2, "")]));
    }

    #[test]
    fn default_unit_names_fall_back_to_position() {
        let names = "telespool.socket:telespool.socket";
        assert_eq!(assign(2, Some(names)), a(Some(0), Some(1), &[]));
    }

    #[test]
    fn unknown_and_duplicate_names_are_ignored() {
        assert_eq!(
            assign(4, Some("unix:grpc:grpc:http")),
            a(Some(1), Some(3), &[(0, "unix"), (2, "grpc")])
        );
    }

    #[test]
    fn a_name_count_mismatch_falls_back_to_position() {
        assert_eq!(assign(2, Some("http")), a(Some(0), Some(1), &[]));
    }

    #[test]
    fn no_fds_assign_nothing() {
        assert_eq!(assign(0, Some("grpc")), Assignment::default());
    }
}
