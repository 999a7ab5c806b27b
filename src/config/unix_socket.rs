//! The `unix_socket*` keys of `[receiver.grpc]` and `[receiver.http]`: a
//! listener's Unix domain socket, its file mode and group.

use std::fmt;
use std::path::{Path, PathBuf};

use serde::{Deserialize, Deserializer, Serialize, Serializer};

use super::ConfigError;

/// One receiver's Unix domain socket, from its `unix_socket*` keys.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct UnixSocketConfig {
    /// `receiver.grpc` or `receiver.http`: errors name `<section>.unix_socket`.
    pub section: &'static str,
    pub path: PathBuf,
    pub mode: SocketMode,
    pub group: Option<Group>,
}

impl UnixSocketConfig {
    pub(super) fn of(
        section: &'static str,
        enabled: bool,
        path: &Option<PathBuf>,
        mode: SocketMode,
        group: &Option<Group>,
    ) -> Option<UnixSocketConfig> {
        let path = path.as_ref().filter(|_| enabled)?;
        Some(UnixSocketConfig {
            section,
            path: path.clone(),
            mode,
            group: group.clone(),
        })
    }
}

/// Longest Unix socket path: `sun_path` is 108 bytes on Linux, with a NUL at the end.
const MAX_UNIX_SOCKET_PATH: usize = 107;

/// Checks one receiver's `unix_socket*` keys.
pub(super) fn validate_unix_socket(
    section: &str,
    path: Option<&Path>,
    group: Option<&Group>,
    only: bool,
) -> Result<(), ConfigError> {
    let bad = |msg: String| Err(ConfigError::Invalid(msg));
    let Some(path) = path else {
        if only {
            return bad(format!(
                "{section}.unix_socket_only = true needs {section}.unix_socket; \
                 to turn the receiver off set {section}.enabled = false"
            ));
        }
        if group.is_some() {
            return bad(format!(
                "{section}.unix_socket_group is set but {section}.unix_socket is not"
            ));
        }
        return Ok(());
    };
    if !path.is_absolute() {
        return bad(format!(
            "{section}.unix_socket {path:?} must be an absolute path (such as \
             \"/run/telespool/otlp.sock\")"
        ));
    }
    if path.file_name().is_none() || path.as_os_str().as_encoded_bytes().ends_with(b"/") {
        return bad(format!(
            "{section}.unix_socket {path:?} names a directory; give the socket's file path"
        ));
    }
    let len = path.as_os_str().len();
    if len > MAX_UNIX_SOCKET_PATH {
        return bad(format!(
            "{section}.unix_socket {path:?} is {len} bytes long; a Unix socket path can \
             have at most {MAX_UNIX_SOCKET_PATH} (the kernel's sun_path), so pick a shorter one"
        ));
    }
    Ok(())
}

/// File mode of a Unix socket; in TOML an octal string such as `"0660"`.
///
/// Connecting needs write permission on the socket file, so the mode decides
/// who may send: `"0660"` (the default) the agent's user and the socket's
/// group, `"0666"` every local user (like a loopback TCP port).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct SocketMode(pub u32);

impl Default for SocketMode {
    fn default() -> Self {
        SocketMode(0o660)
    }
}

impl fmt::Display for SocketMode {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{:04o}", self.0)
    }
}

impl std::str::FromStr for SocketMode {
    type Err = String;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        let digits = s.trim();
        let digits = digits.strip_prefix("0o").unwrap_or(digits);
        let octal =
            (3..=4).contains(&digits.len()) && digits.bytes().all(|b| (b'0'..=b'7').contains(&b));
        let mode = match octal {
            true => u32::from_str_radix(digits, 8).ok(),
            false => None,
        };
        match mode {
            Some(mode) if mode <= 0o777 => Ok(SocketMode(mode)),
            Some(_) => Err(format!(
                "{s:?}: a socket's mode has permission bits only (at most \"0777\")"
            )),
            None => Err(format!(
                "{s:?} is not a file mode: expected octal digits such as \"0660\""
            )),
        }
    }
}

impl<'de> Deserialize<'de> for SocketMode {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let s = String::deserialize(d).map_err(|_| {
            serde::de::Error::custom(
                "expected the mode as a string such as \"0660\" (a bare 660 would be read as decimal)",
            )
        })?;
        s.parse().map_err(serde::de::Error::custom)
    }
}

impl Serialize for SocketMode {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.serialize_str(&self.to_string())
    }
}

/// A group, by name or numeric gid; in TOML a string (`"otel"`, `"1001"`) or
/// an integer (`1001`). A string of digits is a gid.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Group {
    Name(String),
    Id(u32),
}

impl fmt::Display for Group {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Group::Name(name) => f.write_str(name),
            Group::Id(gid) => write!(f, "{gid}"),
        }
    }
}

impl<'de> Deserialize<'de> for Group {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        #[derive(Deserialize)]
        #[serde(untagged)]
        enum Raw {
            Int(u32),
            Str(String),
        }
        let raw = Raw::deserialize(d)
            .map_err(|_| serde::de::Error::custom("expected a group name or a numeric gid"))?;
        match raw {
            Raw::Int(gid) => Ok(Group::Id(gid)),
            Raw::Str(s) if s.is_empty() => Err(serde::de::Error::custom(
                "the group name is empty; give a group name or a numeric gid",
            )),
            Raw::Str(s) => Ok(match s.parse::<u32>() {
                Ok(gid) if s.bytes().all(|b| b.is_ascii_digit()) => Group::Id(gid),
                _ => Group::Name(s),
            }),
        }
    }
}

impl Serialize for Group {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        match self {
            Group::Name(name) => s.serialize_str(name),
            Group::Id(gid) => s.serialize_u32(*gid),
        }
    }
}

#[cfg(test)]
mod unix_socket_tests {
    use super::*;
    use crate::config::{Config, ReceiverConfig};

    fn parse(text: &str) -> Result<Config, ConfigError> {
        let config = Config::from_toml(text, Path::new("test.toml"))?;
        config.validate()?;
        Ok(config)
    }

    #[track_caller]
    fn refused(text: &str, needles: &[&str]) {
        let e = parse(text).expect_err(text).to_string();
        for needle in needles {
            assert!(e.contains(needle), "{needle:?} not in: {e}");
        }
    }

    #[test]
    fn socket_keys_are_read_with_a_0660_default_mode_next_to_the_tcp_address() {
        let config = parse(
            "[receiver.grpc]\nunix_socket = \"/run/telespool/grpc.sock\"\n\
             unix_socket_group = \"otel\"\n\
             [receiver.http]\nunix_socket = \"/run/telespool/http.sock\"\n\
             unix_socket_mode = \"0600\"\nunix_socket_group = 1001\nunix_socket_only = true\n",
        )
        .expect("valid");
        let (grpc, http) = (&config.receiver.grpc, &config.receiver.http);
        assert_eq!(
            grpc.listen,
            ReceiverConfig::default().grpc.listen,
            "listen keeps its default"
        );
        assert!(grpc.serves_tcp());
        let socket = grpc.unix_socket().expect("grpc socket");
        assert_eq!(socket.path, Path::new("/run/telespool/grpc.sock"));
        assert_eq!(socket.mode, SocketMode(0o660));
        assert_eq!(socket.group, Some(Group::Name("otel".into())));
        assert!(!http.serves_tcp(), "unix_socket_only");
        let socket = http.unix_socket().expect("http socket");
        assert_eq!(
            (socket.mode, socket.group),
            (SocketMode(0o600), Some(Group::Id(1001)))
        );

        let off = parse("[receiver.grpc]\nenabled = false\nunix_socket = \"/run/x.sock\"\n")
            .expect("valid");
        assert!(
            off.receiver.grpc.unix_socket().is_none(),
            "enabled = false turns both off"
        );
        assert!(!off.receiver.grpc.serves_tcp());

        let shown = config.to_toml();
        assert!(shown.contains("unix_socket_mode = \"0600\""), "{shown}");
        assert_eq!(parse(&shown).expect("round trip"), config);
    }

    #[test]
    fn socket_paths_must_be_absolute_short_and_distinct() {
        refused(
            "[receiver.grpc]\nunix_socket = \"otlp.sock\"\n",
            &["receiver.grpc.unix_socket", "absolute path"],
        );
        refused(
            "[receiver.http]\nunix_socket = \"/run/telespool/\"\n",
            &["receiver.http.unix_socket", "directory"],
        );
        let long = format!("/run/{}.sock", "x".repeat(100));
        refused(
            &format!("[receiver.http]\nunix_socket = {long:?}\n"),
            &["receiver.http.unix_socket", "110 bytes", "at most 107"],
        );
        let longest = format!("/run/{}.sock", "x".repeat(97));
        assert_eq!(longest.len(), MAX_UNIX_SOCKET_PATH);
        parse(&format!("[receiver.http]\nunix_socket = {longest:?}\n")).expect("107 bytes fit");
        refused(
            "[receiver.grpc]\nunix_socket = \"/run/a.sock\"\n[receiver.http]\nunix_socket = \"/run/a.sock\"\n",
            &["receiver.grpc.unix_socket and receiver.http.unix_socket", "own socket"],
        );
    }

    #[test]
    fn socket_mode_group_and_only_switch_are_checked() {
        for (mode, needle) in [
            ("660", "decimal"),
            ("\"rw-rw----\"", "not a file mode"),
            ("\"0668\"", "not a file mode"),
            ("\"04660\"", "not a file mode"),
            ("\"1777\"", "permission bits only"),
        ] {
            refused(
                &format!(
                    "[receiver.grpc]\nunix_socket = \"/run/a.sock\"\nunix_socket_mode = {mode}\n"
                ),
                &["unix_socket_mode", needle],
            );
        }
        for (text, mode) in [("\"640\"", 0o640), ("\"0o666\"", 0o666), ("\"0000\"", 0)] {
            let config = parse(&format!(
                "[receiver.grpc]\nunix_socket = \"/run/a.sock\"\nunix_socket_mode = {text}\n"
            ))
            .expect(text);
            assert_eq!(config.receiver.grpc.unix_socket_mode, SocketMode(mode));
        }
        refused(
            "[receiver.grpc]\nunix_socket_only = true\n",
            &[
                "receiver.grpc.unix_socket_only",
                "needs receiver.grpc.unix_socket",
            ],
        );
        refused(
            "[receiver.http]\nunix_socket_group = \"otel\"\n",
            &["receiver.http.unix_socket_group is set"],
        );
        refused(
            "[receiver.grpc]\nunix_socket = \"/run/a.sock\"\nunix_socket_group = \"\"\n",
            &["unix_socket_group", "empty"],
        );
        refused(
            "[receiver.grpc]\nunix_sock = \"/run/a.sock\"\n",
            &["unknown field `unix_sock`"],
        );
    }
}
