//! Every config key from the environment, and where each effective value came from.
//!
//! # Keys
//!
//! The list of keys is not written by hand: [`keys`] walks the serde definition
//! of [`Config`] (`env/keys.rs` says how), so a key another change adds to the
//! serde structs gets its variable with no edit here.
//!
//! # Variables
//!
//! A key's variable is `TELESPOOL_` and the dotted path in upper case, dots and
//! dashes as underscores: `buffer.max_bytes` is `TELESPOOL_BUFFER_MAX_BYTES`.
//! The value is read as a TOML value when it is one (`8192`, `true`,
//! `["https://a.example"]`, `"0660"`) and as a string otherwise (`64MiB`,
//! `http://gw:4317`), then checked exactly like the same key in the file. A map
//! is an inline TOML table: `TELESPOOL_UPSTREAM_HEADERS='{ "x-api-key" = "k" }'`
//! replaces the file's whole table. An empty variable resets the key to its
//! built-in default, whatever the file says. A `TELESPOOL_*` variable that
//! names no key is an error naming the closest key: a misspelt variable would
//! otherwise be silently ignored.
//!
//! Precedence is flag, environment, file, default: the variables are merged
//! into the file's table before it is deserialized, and `cli.rs` applies flags
//! on top. [`Origins`] records which layer set each key, for
//! `check-config --show-origin`.

use std::collections::BTreeMap;
use std::ffi::OsString;
use std::fmt;
use std::path::{Path, PathBuf};

use super::{Config, ConfigError};

mod keys;

pub use keys::{keys, Key, KeyKind};

/// Prefix of every telespool environment variable.
const PREFIX: &str = "TELESPOOL_";

/// Variables with the prefix that are not config keys.
const NOT_KEYS: &[&str] = &["TELESPOOL_CONFIG"];

/// Where an effective value came from.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Origin {
    /// The built-in default.
    Default,
    /// The config file, at this line when it could be found.
    File { path: PathBuf, line: Option<usize> },
    /// An environment variable.
    Env(String),
    /// A command-line flag, such as `--upstream`.
    Flag(&'static str),
}

impl fmt::Display for Origin {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Origin::Default => f.write_str("default"),
            Origin::File {
                path,
                line: Some(line),
            } => write!(f, "file:{}:{line}", path.display()),
            Origin::File { path, line: None } => write!(f, "file:{}", path.display()),
            Origin::Env(var) => write!(f, "env:{var}"),
            Origin::Flag(flag) => write!(f, "flag:{flag}"),
        }
    }
}

/// Which layer set each key; keys not listed are defaults.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Origins(BTreeMap<String, Origin>);

impl Origins {
    pub fn get(&self, path: &str) -> &Origin {
        self.0.get(path).unwrap_or(&Origin::Default)
    }

    pub fn set(&mut self, path: &str, origin: Origin) {
        self.0.insert(path.to_owned(), origin);
    }

    /// `check-config --show-origin`: one line per key, `origin<TAB>key = value`,
    /// with the effective values of `config`.
    pub fn render(&self, config: &Config) -> String {
        let effective = toml::Value::try_from(config).ok();
        let mut out = String::new();
        for key in keys() {
            let value = effective
                .as_ref()
                .and_then(|v| lookup(v, &key.segments()))
                .map(render_value)
                .unwrap_or_else(|| "(none)".to_owned());
            out.push_str(&format!(
                "{}\t{} = {value}\n",
                self.get(&key.path),
                key.path
            ));
        }
        out
    }
}

fn render_value(value: &toml::Value) -> String {
    match value {
        toml::Value::Table(t) => {
            let entries: Vec<String> = t
                .iter()
                .map(|(k, v)| format!("{} = {}", toml::Value::String(k.clone()), v))
                .collect();
            match entries.is_empty() {
                true => "{}".to_owned(),
                false => format!("{{ {} }}", entries.join(", ")),
            }
        }
        other => other.to_string(),
    }
}

fn lookup<'v>(value: &'v toml::Value, path: &[&str]) -> Option<&'v toml::Value> {
    path.iter()
        .try_fold(value, |v, seg| v.as_table()?.get(*seg))
}

/// The file's table with the environment merged in, and the origin of each key.
#[derive(Debug)]
pub struct Layered {
    pub config: Config,
    pub origins: Origins,
}

/// Reads the file (`(path, text)`; already checked with [`Config::from_toml`]
/// by the caller, so its errors keep their line numbers) and the `TELESPOOL_*`
/// variables in `vars`, merges them and deserializes the result.
pub fn layer(
    file: Option<(&Path, &str)>,
    vars: impl IntoIterator<Item = (OsString, OsString)>,
) -> Result<Layered, ConfigError> {
    let keys = keys();
    let mut origins = Origins::default();
    let mut table = match file {
        Some((path, text)) => {
            let table: toml::Table = toml::from_str(text).map_err(|e| ConfigError::Parse {
                path: path.to_owned(),
                message: e.to_string().trim_end().to_owned(),
            })?;
            let lines = file_lines(text);
            let value = toml::Value::Table(table.clone());
            for key in &keys {
                if lookup(&value, &key.segments()).is_some() {
                    let line = lines.get(&key.path).copied();
                    origins.set(
                        &key.path,
                        Origin::File {
                            path: path.to_owned(),
                            line,
                        },
                    );
                }
            }
            table
        }
        None => toml::Table::new(),
    };

    let mut vars: Vec<(String, String)> = vars
        .into_iter()
        .filter_map(|(name, value)| {
            let name = name.into_string().ok()?;
            name.starts_with(PREFIX).then_some((name, value))
        })
        .map(|(name, value)| match value.into_string() {
            Ok(value) => Ok((name, value)),
            Err(_) => Err(ConfigError::Override {
                key: name,
                message: "the value is not valid UTF-8".into(),
            }),
        })
        .collect::<Result<_, _>>()?;
    vars.sort();
    for (name, raw) in vars {
        if NOT_KEYS.contains(&name.as_str()) {
            continue;
        }
        let Some(key) = keys.iter().find(|k| k.env_var() == name) else {
            return Err(unknown_var(&name, &keys));
        };
        let segments = key.segments();
        match parse_value(key, &name, &raw)? {
            Some(value) => insert(&mut table, &segments, value),
            None => remove(&mut table, &segments),
        }
        origins.set(&key.path, Origin::Env(name));
    }

    let config = toml::Value::Table(table)
        .try_into::<Config>()
        .map_err(|e| {
            ConfigError::Invalid(format!(
                "{} (with the TELESPOOL_* environment variables applied to the file)",
                e.to_string().trim_end()
            ))
        })?;
    Ok(Layered { config, origins })
}

/// The error for a `TELESPOOL_*` variable that names no key.
fn unknown_var(name: &str, keys: &[Key]) -> ConfigError {
    let closest = keys
        .iter()
        .min_by_key(|k| strsim::levenshtein(&k.env_var(), name))
        .map(|k| (k.env_var(), k.path.clone()));
    let (closest_var, closest_key) = closest.unwrap_or_default();
    ConfigError::UnknownEnv {
        var: name.to_owned(),
        closest_var,
        closest_key,
    }
}

/// The variable's value as TOML; None for an empty variable (the default).
fn parse_value(key: &Key, name: &str, raw: &str) -> Result<Option<toml::Value>, ConfigError> {
    if raw.trim().is_empty() {
        return Ok(None);
    }
    let bad = |message: String| ConfigError::Override {
        key: format!("{} ({name})", key.path),
        message,
    };
    let typed = toml::from_str::<toml::Table>(&format!("v = {raw}"))
        .ok()
        .and_then(|mut t| t.remove("v"));
    if key.kind == KeyKind::Map {
        return match typed {
            Some(table @ toml::Value::Table(_)) => match check(key, &table) {
                Ok(()) => Ok(Some(table)),
                Err(e) => Err(bad(e)),
            },
            _ => Err(bad(format!(
                "{raw:?} is not an inline TOML table; write the whole table, \
                 such as {name}='{{ \"x-api-key\" = \"secret\" }}'"
            ))),
        };
    }
    let string = toml::Value::String(raw.to_owned());
    let typed_error = match &typed {
        Some(value) => match check(key, value) {
            Ok(()) => return Ok(typed),
            Err(e) => Some(e),
        },
        None => None,
    };
    match check(key, &string) {
        Ok(()) => Ok(Some(string)),
        Err(e) => Err(bad(typed_error.unwrap_or(e))),
    }
}

/// Whether `value` is acceptable for `key` on its own (the other keys at
/// their defaults). A table left incomplete in isolation (a `cert_file`
/// without its `key_file`) is judged once everything is merged.
fn check(key: &Key, value: &toml::Value) -> Result<(), String> {
    let mut table = toml::Table::new();
    insert(&mut table, &key.segments(), value.clone());
    match toml::Value::Table(table).try_into::<Config>() {
        Ok(_) => Ok(()),
        Err(e) if e.to_string().contains("missing field") => Ok(()),
        Err(e) => Err(e.to_string().trim_end().to_owned()),
    }
}

fn insert(table: &mut toml::Table, path: &[&str], value: toml::Value) {
    let Some((last, parents)) = path.split_last() else {
        return;
    };
    let mut at = table;
    for seg in parents {
        let entry = at
            .entry(seg.to_string())
            .or_insert_with(|| toml::Value::Table(toml::Table::new()));
        if !entry.is_table() {
            *entry = toml::Value::Table(toml::Table::new());
        }
        let toml::Value::Table(next) = entry else {
            return;
        };
        at = next;
    }
    at.insert(last.to_string(), value);
}

fn remove(table: &mut toml::Table, path: &[&str]) {
    let Some((last, parents)) = path.split_last() else {
        return;
    };
    let mut at = table;
    for seg in parents {
        match at.get_mut(*seg) {
            Some(toml::Value::Table(next)) => at = next,
            _ => return,
        }
    }
    at.remove(*last);
}

/// The line of each `key = value` and `[table]` in a TOML text, by dotted
/// path: enough for `--show-origin` (the file already parsed).
fn file_lines(text: &str) -> BTreeMap<String, usize> {
    let norm = |s: &str| -> String {
        s.split('.')
            .map(|seg| seg.trim().trim_matches('"').trim_matches('\''))
            .collect::<Vec<_>>()
            .join(".")
    };
    let mut lines = BTreeMap::new();
    let mut table = String::new();
    for (n, line) in text.lines().enumerate() {
        let line = line.trim();
        if line.starts_with('[') {
            let name = line.trim_start_matches('[');
            table = norm(name.split(']').next().unwrap_or(""));
            lines.entry(table.clone()).or_insert(n + 1);
        } else if let Some((key, _)) = line.split_once('=') {
            if line.starts_with('#') || key.contains('"') && key.contains(' ') {
                continue;
            }
            let key = norm(key);
            let path = match table.is_empty() {
                true => key,
                false => format!("{table}.{key}"),
            };
            lines.entry(path).or_insert(n + 1);
        }
    }
    lines
}

#[cfg(test)]
mod tests {
    use super::*;

    fn vars(list: &[(&str, &str)]) -> Vec<(OsString, OsString)> {
        list.iter()
            .map(|(k, v)| (OsString::from(k), OsString::from(v)))
            .collect()
    }

    fn layered(file: &str, env: &[(&str, &str)]) -> Result<Layered, ConfigError> {
        layer(Some((Path::new("t.toml"), file)), vars(env))
    }

    #[test]
    fn environment_wins_over_the_file_and_records_where_each_value_came_from() {
        let file = "durability = \"memory\"\n[buffer]\nmax_bytes = \"32MiB\"\nmax_wait = \"1s\"\n";
        let got = layered(
            file,
            &[
                ("TELESPOOL_DURABILITY", "spool"),
                ("TELESPOOL_BUFFER_MAX_BYTES", "128MiB"),
                ("TELESPOOL_BATCH_MAX_ITEMS", "100"),
                ("TELESPOOL_UPSTREAM_HEADERS", "{ \"x-api-key\" = \"k\" }"),
                (
                    "TELESPOOL_RECEIVER_HTTP_CORS_ALLOWED_ORIGINS",
                    "[\"https://a.example\"]",
                ),
                ("TELESPOOL_RECEIVER_GRPC_UNIX_SOCKET_MODE", "0600"),
                ("TELESPOOL_CONFIG", "/ignored/here"),
                ("OTHER", "x"),
            ],
        )
        .expect("valid");
        let c = &got.config;
        assert_eq!(c.durability, crate::config::Durability::Spool);
        assert_eq!(c.buffer.max_bytes.0, 128 << 20);
        assert_eq!(c.buffer.max_wait, std::time::Duration::from_secs(1));
        assert_eq!(c.batch.max_items, 100);
        assert_eq!(
            c.upstream.headers.get("x-api-key").map(String::as_str),
            Some("k")
        );
        assert_eq!(c.receiver.http.cors.allowed_origins, ["https://a.example"]);
        assert_eq!(c.receiver.grpc.unix_socket_mode.0, 0o600);
        let o = &got.origins;
        assert_eq!(
            o.get("durability"),
            &Origin::Env("TELESPOOL_DURABILITY".into())
        );
        assert_eq!(
            o.get("buffer.max_wait"),
            &Origin::File {
                path: "t.toml".into(),
                line: Some(4)
            }
        );
        assert_eq!(o.get("batch.timeout"), &Origin::Default);
        let shown = o.render(c);
        assert!(
            shown.contains("env:TELESPOOL_BUFFER_MAX_BYTES\tbuffer.max_bytes = \"128MiB\"\n"),
            "{shown}"
        );
        assert!(
            shown.contains("file:t.toml:4\tbuffer.max_wait = \"1s\"\n"),
            "{shown}"
        );
        assert!(
            shown.contains("default\tupstream.endpoint = (none)\n"),
            "{shown}"
        );
        assert!(
            shown.contains("upstream.headers = { \"x-api-key\" = \"k\" }\n"),
            "{shown}"
        );
    }

    #[test]
    fn an_empty_variable_restores_the_built_in_default() {
        let got = layered(
            "[upstream]\nendpoint = \"http://gw:4317\"\n",
            &[("TELESPOOL_UPSTREAM_ENDPOINT", "")],
        )
        .expect("valid");
        assert_eq!(got.config.upstream.endpoint, None);
    }

    #[test]
    fn bad_values_name_the_key_and_the_variable() {
        for (var, value, needle) in [
            ("TELESPOOL_DURABILITY", "spol", "unknown variant"),
            ("TELESPOOL_BUFFER_MAX_BYTES", "64XB", "unknown size unit"),
            ("TELESPOOL_BATCH_MAX_ITEMS", "many", "u64"),
            ("TELESPOOL_BATCH_MAX_ITEMS", "-1", "-1"),
            (
                "TELESPOOL_UPSTREAM_HEADERS",
                "x-api-key=k",
                "inline TOML table",
            ),
            ("TELESPOOL_ADMIN_ENABLED", "yes", "bool"),
        ] {
            let e = layered("", &[(var, value)]).expect_err(var).to_string();
            assert!(e.contains(var) && e.contains(needle), "{var}={value}: {e}");
        }
    }

    #[test]
    fn an_unknown_variable_is_refused_naming_the_closest_key() {
        let e = layered("", &[("TELESPOOL_DURABLITY", "spool")])
            .expect_err("misspelt")
            .to_string();
        assert!(
            e.contains("TELESPOOL_DURABLITY") && e.contains("TELESPOOL_DURABILITY (durability)"),
            "{e}"
        );
        let e = layered("", &[("TELESPOOL_BUFFER_MAXBYTES", "1")])
            .expect_err("misspelt")
            .to_string();
        assert!(e.contains("TELESPOOL_BUFFER_MAX_BYTES"), "{e}");
    }

    #[test]
    fn a_table_completed_across_file_and_environment_is_accepted() {
        let got = layered(
            "[receiver.tls]\ncert_file = \"/c.pem\"\n",
            &[("TELESPOOL_RECEIVER_TLS_KEY_FILE", "/k.pem")],
        )
        .expect("valid");
        let tls = got.config.receiver.tls.expect("tls");
        assert_eq!(tls.key_file, Path::new("/k.pem"));
        let e = layered("", &[("TELESPOOL_RECEIVER_TLS_KEY_FILE", "/k.pem")])
            .expect_err("no cert_file")
            .to_string();
        assert!(e.contains("cert_file"), "{e}");
    }
}
