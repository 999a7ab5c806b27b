//! Unix domain socket listeners for the OTLP receivers
//! (`receiver.grpc.unix_socket`, `receiver.http.unix_socket`): the cheapest
//! local transport, with the socket file's mode and group as access control.
//!
//! Starting, in order:
//!
//! 1. [`prepare`], before any listener is bound: the group name is looked up
//!    and the socket's directory must exist. The directory is never created:
//!    its owner and mode are part of the access control (under systemd,
//!    `RuntimeDirectory=telespool` creates `/run/telespool`).
//! 2. [`Prepared::bind`]: a file already at the path is examined. A socket
//!    that nothing accepts on is what a killed agent leaves behind, and is
//!    removed. A socket that accepts a connection belongs to a running process
//!    (another telespool): start fails. Any other file is never deleted:
//!    start fails naming it.
//! 3. The socket is bound, given its group (`chown`) and mode (`chmod`), and
//!    only then listens: no client can connect while the file still has the
//!    mode the umask gave it.
//!
//! The file is removed when the listener is dropped: when the accept loop ends
//! at shutdown, or when start fails after binding. Only if it is still the
//! file this process bound (same device and inode): a socket that a later
//! agent bound at the same path is left alone.
//!
//! Connections get the same limits as on TCP: the socket is one more listener
//! for [`super::connections::serve`], with its own `max_connections`.

use std::fs::{self, Permissions};
use std::future::Future;
use std::io;
use std::os::unix::fs::{FileTypeExt, MetadataExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::time::Duration;

use socket2::{Domain, SockAddr, Socket, Type};
use tokio::net::{UnixListener, UnixStream};

use crate::config::{Group, UnixSocketConfig};

/// Pending connections the kernel queues (capped by `net.core.somaxconn`).
const BACKLOG: i32 = 1024;
/// How long the check for a live listener at the path may take.
const PROBE_TIMEOUT: Duration = Duration::from_secs(2);

/// Why a Unix socket listener could not be set up. `section` is
/// `receiver.grpc` or `receiver.http`.
#[derive(Debug, thiserror::Error)]
pub enum UnixSocketError {
    /// The socket's directory does not exist; telespool does not create it.
    #[error("cannot create the Unix socket {path} ({section}.unix_socket): directory {dir} does not exist; create it (under systemd: RuntimeDirectory=telespool makes /run/telespool) or set {section}.unix_socket to a path in an existing directory")]
    NoDirectory {
        section: &'static str,
        path: PathBuf,
        dir: PathBuf,
    },
    /// A socket at the path accepts connections: another telespool, or
    /// another program, serves there.
    #[error("another telespool is listening on {path} ({section}.unix_socket), or another program is; stop it or set {section}.unix_socket to another path")]
    InUse {
        section: &'static str,
        path: PathBuf,
    },
    /// A file that is not a socket is at the path. It is left as it is.
    #[error("{path} ({section}.unix_socket) exists and is not a socket; telespool does not delete it. Move it away or set {section}.unix_socket to another path")]
    NotASocket {
        section: &'static str,
        path: PathBuf,
    },
    /// `unix_socket_group` names a group the system does not know.
    #[error("group {group:?} ({section}.unix_socket_group) does not exist; create it, or name an existing group or a numeric gid")]
    UnknownGroup {
        section: &'static str,
        group: String,
    },
    /// The socket cannot be given its group: the agent's user is not a
    /// member of it (and is not root).
    #[error("cannot give the Unix socket {path} to group {group} ({section}.unix_socket_group): {source}; the agent's user must be a member of that group (under systemd: SupplementaryGroups=)")]
    Chown {
        section: &'static str,
        path: PathBuf,
        group: Group,
        source: io::Error,
    },
    /// Any other failure: looking up the group, checking or removing an old
    /// file, binding, setting the mode.
    #[error("cannot {action} the Unix socket {path} ({section}.unix_socket): {source}")]
    Io {
        action: &'static str,
        section: &'static str,
        path: PathBuf,
        source: io::Error,
    },
}

/// A receiver's socket whose group and directory were checked; nothing bound yet.
#[derive(Debug)]
pub struct Prepared {
    config: UnixSocketConfig,
    gid: Option<u32>,
}

/// Looks up the group and checks the directory (step 1).
pub fn prepare(config: UnixSocketConfig) -> Result<Prepared, UnixSocketError> {
    let section = config.section;
    let gid = match &config.group {
        None => None,
        Some(Group::Id(gid)) => Some(*gid),
        Some(Group::Name(name)) => match nix::unistd::Group::from_name(name) {
            Ok(Some(group)) => Some(group.gid.as_raw()),
            Ok(None) => {
                return Err(UnixSocketError::UnknownGroup {
                    section,
                    group: name.clone(),
                })
            }
            Err(errno) => {
                return Err(UnixSocketError::Io {
                    action: "look up the group of",
                    section,
                    path: config.path.clone(),
                    source: errno.into(),
                })
            }
        },
    };
    let dir = match config.path.parent() {
        Some(dir) if !dir.as_os_str().is_empty() => dir,
        _ => Path::new("/"),
    };
    let io_err = |source| UnixSocketError::Io {
        action: "check the directory of",
        section,
        path: config.path.clone(),
        source,
    };
    match fs::metadata(dir) {
        Ok(meta) if meta.is_dir() => Ok(Prepared { config, gid }),
        Ok(_) => Err(io_err(io::Error::new(
            io::ErrorKind::NotADirectory,
            format!("{} is not a directory", dir.display()),
        ))),
        Err(e) if e.kind() == io::ErrorKind::NotFound => Err(UnixSocketError::NoDirectory {
            section,
            path: config.path.clone(),
            dir: dir.to_owned(),
        }),
        Err(e) => Err(io_err(e)),
    }
}

impl Prepared {
    /// Clears a stale socket, binds, sets group and mode, listens (steps 2, 3).
    pub async fn bind(self) -> Result<UnixSocketListener, UnixSocketError> {
        let Prepared { config, gid } = self;
        let (section, path) = (config.section, config.path.as_path());
        let io_err = |action| io_err(action, section, path);
        remove_if_stale(section, path).await?;

        let socket = Socket::new(Domain::UNIX, Type::STREAM, None).map_err(io_err("create"))?;
        let address = SockAddr::unix(path).map_err(io_err("bind"))?;
        socket.bind(&address).map_err(io_err("bind"))?;
        let meta = fs::symlink_metadata(path).map_err(io_err("inspect"))?;
        // From here on, dropping `file` removes the socket file again.
        let file = SocketFile {
            path: path.to_owned(),
            dev: meta.dev(),
            ino: meta.ino(),
        };
        if let Some(gid) = gid {
            std::os::unix::fs::chown(path, None, Some(gid)).map_err(|source| {
                UnixSocketError::Chown {
                    section,
                    path: path.to_owned(),
                    group: config.group.clone().unwrap_or(Group::Id(gid)),
                    source,
                }
            })?;
        }
        fs::set_permissions(path, Permissions::from_mode(config.mode.0))
            .map_err(io_err("set the mode of"))?;
        socket.listen(BACKLOG).map_err(io_err("listen on"))?;
        socket.set_nonblocking(true).map_err(io_err("listen on"))?;
        let listener = UnixListener::from_std(socket.into()).map_err(io_err("listen on"))?;
        Ok(UnixSocketListener { listener, file })
    }
}

/// Maps an I/O error of `action` on the socket file at `path` to its error.
fn io_err<'a>(
    action: &'static str,
    section: &'static str,
    path: &'a Path,
) -> impl Fn(io::Error) -> UnixSocketError + 'a {
    move |source| UnixSocketError::Io {
        action,
        section,
        path: path.to_owned(),
        source,
    }
}

/// Removes a socket at `path` that nothing accepts on; refuses anything else.
async fn remove_if_stale(section: &'static str, path: &Path) -> Result<(), UnixSocketError> {
    let io_err = |action| io_err(action, section, path);
    let meta = match fs::symlink_metadata(path) {
        Ok(meta) => meta,
        Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(()),
        Err(e) => return Err(io_err("inspect")(e)),
    };
    if !meta.file_type().is_socket() {
        return Err(UnixSocketError::NotASocket {
            section,
            path: path.to_owned(),
        });
    }
    let in_use = || UnixSocketError::InUse {
        section,
        path: path.to_owned(),
    };
    match tokio::time::timeout(PROBE_TIMEOUT, UnixStream::connect(path)).await {
        // Accepted, or queued behind a full backlog: someone serves there.
        Ok(Ok(_)) | Err(_) => Err(in_use()),
        Ok(Err(e)) if e.kind() == io::ErrorKind::WouldBlock => Err(in_use()),
        Ok(Err(e)) if e.kind() == io::ErrorKind::ConnectionRefused => {
            match fs::remove_file(path) {
                Ok(()) => {}
                Err(e) if e.kind() == io::ErrorKind::NotFound => {}
                Err(e) => return Err(io_err("remove the stale socket file")(e)),
            }
            tracing::info!(
                path = %path.display(),
                "removed a stale Unix socket file (left by an agent that did not shut down)"
            );
            Ok(())
        }
        Ok(Err(e)) if e.kind() == io::ErrorKind::NotFound => Ok(()),
        Ok(Err(e)) => Err(io_err("check for a running listener on")(e)),
    }
}

/// A listening Unix socket; its file is removed when this is dropped.
#[derive(Debug)]
pub struct UnixSocketListener {
    listener: UnixListener,
    file: SocketFile,
}

impl UnixSocketListener {
    pub fn path(&self) -> &Path {
        &self.file.path
    }
}

impl axum::serve::Listener for UnixSocketListener {
    type Io = UnixStream;
    type Addr = tokio::net::unix::SocketAddr;

    fn accept(&mut self) -> impl Future<Output = (Self::Io, Self::Addr)> + Send {
        axum::serve::Listener::accept(&mut self.listener)
    }

    fn local_addr(&self) -> io::Result<Self::Addr> {
        self.listener.local_addr()
    }
}

/// The socket file this process bound, identified by device and inode.
#[derive(Debug)]
struct SocketFile {
    path: PathBuf,
    dev: u64,
    ino: u64,
}

impl Drop for SocketFile {
    fn drop(&mut self) {
        let ours = fs::symlink_metadata(&self.path).is_ok_and(|meta| {
            meta.file_type().is_socket() && meta.dev() == self.dev && meta.ino() == self.ino
        });
        if !ours {
            return; // gone already, or replaced by someone else's
        }
        match fs::remove_file(&self.path) {
            Ok(()) => tracing::debug!(path = %self.path.display(), "removed the Unix socket file"),
            Err(e) => tracing::warn!(
                path = %self.path.display(),
                error = %e,
                "cannot remove the Unix socket file; the next start removes it"
            ),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::SocketMode;

    fn config(path: &Path) -> UnixSocketConfig {
        UnixSocketConfig {
            section: "receiver.grpc",
            path: path.to_owned(),
            mode: SocketMode(0o640),
            group: None,
        }
    }

    #[tokio::test]
    async fn a_bound_socket_has_its_mode_and_is_removed_when_dropped() {
        let dir = tempfile::tempdir().expect("tempdir");
        let path = dir.path().join("otlp.sock");
        let listener = prepare(config(&path))
            .expect("prepare")
            .bind()
            .await
            .expect("bind");
        let meta = fs::symlink_metadata(&path).expect("socket file");
        assert!(meta.file_type().is_socket());
        assert_eq!(meta.permissions().mode() & 0o7777, 0o640);
        UnixStream::connect(&path).await.expect("connect");
        drop(listener);
        assert!(!path.exists(), "socket file removed on drop");
    }

    #[tokio::test]
    async fn dropping_a_listener_leaves_a_socket_that_replaced_its_file() {
        let dir = tempfile::tempdir().expect("tempdir");
        let path = dir.path().join("otlp.sock");
        let first = prepare(config(&path)).expect("prepare").bind().await;
        let first = first.expect("bind");
        // Someone removes the file and binds their own at the same path.
        fs::remove_file(&path).expect("remove");
        let _second = std::os::unix::net::UnixListener::bind(&path).expect("bind second");
        drop(first);
        assert!(path.exists(), "the other socket file is left alone");
    }

    #[tokio::test]
    async fn a_stale_socket_is_replaced_a_live_one_and_a_regular_file_are_refused() {
        let dir = tempfile::tempdir().expect("tempdir");
        let path = dir.path().join("otlp.sock");
        let bind = || async { prepare(config(&path)).expect("prepare").bind().await };

        // A socket whose listener is gone (std does not unlink on drop).
        drop(std::os::unix::net::UnixListener::bind(&path).expect("bind"));
        assert!(path.exists());
        let listener = bind().await.expect("stale socket replaced");

        let e = bind().await.expect_err("in use").to_string();
        assert!(e.contains("another telespool is listening on"), "{e}");
        assert!(path.exists(), "the live socket is left alone");
        drop(listener);

        fs::write(&path, b"not a socket").expect("write");
        let e = bind().await.expect_err("regular file").to_string();
        assert!(
            e.contains("is not a socket") && e.contains("does not delete it"),
            "{e}"
        );
        assert_eq!(fs::read(&path).expect("read"), b"not a socket");
    }

    #[tokio::test]
    async fn an_unknown_group_and_a_missing_directory_are_refused_before_binding() {
        let dir = tempfile::tempdir().expect("tempdir");
        let mut c = config(&dir.path().join("otlp.sock"));
        c.group = Some(Group::Name("telespool-no-such-group".into()));
        let e = prepare(c).expect_err("unknown group").to_string();
        assert!(
            e.contains("telespool-no-such-group") && e.contains("receiver.grpc.unix_socket_group"),
            "{e}"
        );
        let missing = dir.path().join("missing");
        let e = prepare(config(&missing.join("otlp.sock")))
            .expect_err("no directory")
            .to_string();
        assert!(
            e.contains(&missing.display().to_string()) && e.contains("does not exist"),
            "{e}"
        );
        assert!(!missing.exists(), "the directory is not created");
    }
}
