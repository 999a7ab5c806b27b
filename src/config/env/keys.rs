//! The list of config keys, read from the serde definition of [`Config`].
//!
//! The list of keys is not written by hand: [`keys`] walks the serde definition
//! of [`Config`] with a probing deserializer. Asked for a struct, the probe
//! learns the field names serde passes to `deserialize_struct`; it then asks
//! again for each field, one route at a time, until it reaches a value (a
//! scalar, an array, an enum) or a map (`upstream.headers`). Keys whose default
//! is none (`upstream.endpoint`, `[receiver.tls]`) and maps are found as well
//! as every other, and a key another change adds to the serde structs gets its
//! variable with no edit here.

use std::cell::RefCell;
use std::fmt;

use serde::de::{self, Deserialize, IntoDeserializer, MapAccess, Visitor};

use super::PREFIX;
use crate::config::Config;

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

    pub(super) fn segments(&self) -> Vec<&str> {
        self.path.split('.').collect()
    }
}

/// `TELESPOOL_` + the path in upper case, `.` and `-` as `_`.
fn env_var_of(path: &str) -> String {
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

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::env::NOT_KEYS;

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
}
