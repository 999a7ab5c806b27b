//! Every config key from the environment, and where each effective value came from.
//!
//! # Keys
//!
//! The list of keys is not written by hand: [`keys`] walks the serde definition
//! of [`Config`] with a probing deserializer. Asked for a struct, the probe
//! learns the field names serde passes to `deserialize_struct`; it then asks
//! again for each field, one route at a time, until it reaches a value (a
//! scalar, an array, an enum) or a map (`upstream.headers`). Keys whose default
//! is none (`upstream.endpoint`, `[receiver.tls]`) and maps are found as well
//! as every other, and a key another change adds to the serde structs gets its
//! variable with no edit here.
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

use std::cell::RefCell;
use std::collections::BTreeMap;
use std::ffi::OsString;
use std::fmt;
use std::path::{Path, PathBuf};

use serde::de::{self, Deserialize, IntoDeserializer, MapAccess, Visitor};

use super::{Config, ConfigError};

/// Prefix of every telespool environment variable.
pub const PREFIX: &str = "TELESPOOL_";

/// Variables with the prefix that are not config keys.
pub const NOT_KEYS: &[&str] = &["TELESPOOL_CONFIG"];

/// How a key's value is written.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum KeyKind {
    /// A scalar, an array or an enum name.
    Value,
    /// A table of free-form keys (`upstream.headers`): an inline table in the
    /// environment.
    Map,
}

/// One config key.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Key {
    /// Dotted path, as in the file: `upstream.retry.max_elapsed`.
    pub path: String,
    pub kind: KeyKind,
}

impl Key {
    /// The key's environment variable.
    pub fn env_var(&self) -> String {
        env_var_of(&self.path)
    }

    fn segments(&self) -> Vec<&str> {
        self.path.split('.').collect()
    }
}

/// `TELESPOOL_` + the path in upper case, `.` and `-` as `_`.
pub fn env_var_of(path: &str) -> String {
    let tail: String = path
        .chars()
        .map(|c| match c {
            '.' | '-' => '_',
            c => c.to_ascii_uppercase(),
        })
        .collect();
    format!("{PREFIX}{tail}")
}

/// Every key [`Config`] accepts, in definition order.
pub fn keys() -> Vec<Key> {
    let mut out = Vec::new();
    walk(&mut Vec::new(), &mut out);
    out
}

fn walk(route: &mut Vec<&'static str>, out: &mut Vec<Key>) {
    let path = || route.join(".");
    match probe(route) {
        Some(Seen::Struct(fields)) => {
            for field in fields {
                route.push(field);
                walk(route, out);
                route.pop();
            }
        }
        Some(Seen::Map) => out.push(Key {
            path: path(),
            kind: KeyKind::Map,
        }),
        Some(Seen::Value) => out.push(Key {
            path: path(),
            kind: KeyKind::Value,
        }),
        None => {}
    }
}

/// What the probe met at the end of its route.
enum Seen {
    Struct(&'static [&'static str]),
    Map,
    Value,
}

fn probe(route: &[&'static str]) -> Option<Seen> {
    let seen = RefCell::new(None);
    // The probe always ends in an error (it supplies one field at a time, and
    // no value at the end): what it recorded on the way is the answer.
    let _ = Config::deserialize(Probe { route, seen: &seen });
    seen.into_inner()
}

/// Ends every probe.
#[derive(Debug)]
struct Stop;

impl fmt::Display for Stop {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("probe stop")
    }
}

impl std::error::Error for Stop {}

impl de::Error for Stop {
    fn custom<T: fmt::Display>(_: T) -> Self {
        Stop
    }
}

/// A deserializer that follows `route` through nested structs and records
/// what it finds where the route ends.
struct Probe<'a> {
    route: &'a [&'static str],
    seen: &'a RefCell<Option<Seen>>,
}

impl Probe<'_> {
    fn record(&self, seen: Seen) -> Stop {
        if self.route.is_empty() {
            *self.seen.borrow_mut() = Some(seen);
        }
        Stop
    }
}

impl<'de> de::Deserializer<'de> for Probe<'_> {
    type Error = Stop;

    fn deserialize_any<V: Visitor<'de>>(self, _: V) -> Result<V::Value, Stop> {
        Err(self.record(Seen::Value))
    }

    fn deserialize_struct<V: Visitor<'de>>(
        self,
        _name: &'static str,
        fields: &'static [&'static str],
        visitor: V,
    ) -> Result<V::Value, Stop> {
        match self.route.split_first() {
            None => Err(self.record(Seen::Struct(fields))),
            Some((field, rest)) => visitor.visit_map(OneField {
                key: Some(field),
                value: Some(Probe {
                    route: rest,
                    seen: self.seen,
                }),
            }),
        }
    }

    fn deserialize_map<V: Visitor<'de>>(self, _: V) -> Result<V::Value, Stop> {
        Err(self.record(Seen::Map))
    }

    fn deserialize_option<V: Visitor<'de>>(self, visitor: V) -> Result<V::Value, Stop> {
        visitor.visit_some(self)
    }

    fn deserialize_newtype_struct<V: Visitor<'de>>(
        self,
        _name: &'static str,
        visitor: V,
    ) -> Result<V::Value, Stop> {
        visitor.visit_newtype_struct(self)
    }

    serde::forward_to_deserialize_any! {
        bool i8 i16 i32 i64 i128 u8 u16 u32 u64 u128 f32 f64 char str string
        bytes byte_buf unit unit_struct seq tuple tuple_struct enum
        identifier ignored_any
    }
}

/// A map with one entry: the next field of the probe's route.
struct OneField<'a> {
    key: Option<&'static str>,
    value: Option<Probe<'a>>,
}

impl<'de> MapAccess<'de> for OneField<'_> {
    type Error = Stop;

    fn next_key_seed<K: de::DeserializeSeed<'de>>(
        &mut self,
        seed: K,
    ) -> Result<Option<K::Value>, Stop> {
        match self.key.take() {
            Some(key) => seed.deserialize(key.into_deserializer()).map(Some),
            None => Ok(None),
        }
    }

    fn next_value_seed<V: de::DeserializeSeed<'de>>(&mut self, seed: V) -> Result<V::Value, Stop> {
        match self.value.take() {
            Some(probe) => seed.deserialize(probe),
            None => Err(Stop),
        }
    }
}

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
    fn keys_include_optional_keys_maps_and_nested_tables() {
        let keys = keys();
        let find = |path: &str| keys.iter().find(|k| k.path == path).map(|k| k.kind);
        assert_eq!(find("durability"), Some(KeyKind::Value));
        assert_eq!(find("upstream.endpoint"), Some(KeyKind::Value));
        assert_eq!(find("upstream.retry.max_elapsed"), Some(KeyKind::Value));
        assert_eq!(find("upstream.headers"), Some(KeyKind::Map));
        assert_eq!(find("receiver.tls.cert_file"), Some(KeyKind::Value));
        assert_eq!(find("upstream.tls.server_name"), Some(KeyKind::Value));
        assert_eq!(
            find("receiver.http.cors.allowed_origins"),
            Some(KeyKind::Value)
        );
        assert_eq!(
            find("receiver.grpc.unix_socket_group"),
            Some(KeyKind::Value)
        );
        assert_eq!(find("upstream"), None, "tables are not keys");
        assert_eq!(find("upstream.retry"), None);
    }

    #[test]
    fn every_key_has_its_own_variable() {
        let keys = keys();
        let mut names: Vec<String> = keys.iter().map(Key::env_var).collect();
        names.sort();
        names.dedup();
        assert_eq!(names.len(), keys.len(), "two keys share a variable");
        for reserved in NOT_KEYS {
            assert!(!names.contains(&reserved.to_string()), "{reserved}");
        }
        assert_eq!(
            env_var_of("upstream.retry.max_elapsed"),
            "TELESPOOL_UPSTREAM_RETRY_MAX_ELAPSED"
        );
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
