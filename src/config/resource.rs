//! `[resource]`: attributes stamped on every resource entry, static and
//! detected from the host.

use std::collections::BTreeMap;

use serde::{Deserialize, Deserializer, Serialize, Serializer};

use super::ConfigError;

/// Attributes stamped on every resource entry on arrival (`[resource]`).
#[derive(Clone, Debug, Default, Deserialize, Serialize, PartialEq)]
#[serde(default, deny_unknown_fields)]
pub struct ResourceConfig {
    /// Static string attributes, stamped in key order.
    pub attributes: BTreeMap<String, String>,
    /// Attributes read from the host at start and on SIGHUP; a static
    /// attribute with the same key wins over a detected one.
    pub detect: Vec<Detector>,
    pub on_conflict: OnConflict,
}

/// A source of detected resource attributes (`resource.detect`).
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord)]
pub enum Detector {
    /// `host.name` (the kernel's hostname) and `host.id` (`/etc/machine-id`).
    Host,
    /// `os.type` (`linux`, ...).
    Os,
}

impl Detector {
    const ALL: [Detector; 2] = [Detector::Host, Detector::Os];

    fn as_str(self) -> &'static str {
        match self {
            Detector::Host => "host",
            Detector::Os => "os",
        }
    }
}

impl<'de> Deserialize<'de> for Detector {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let name = String::deserialize(d)?;
        Detector::ALL
            .into_iter()
            .find(|detector| detector.as_str() == name)
            .ok_or_else(|| {
                serde::de::Error::custom(format!(
                    "resource.detect: unknown detector {name:?}; use \"host\" (host.name, host.id) or \"os\" (os.type)"
                ))
            })
    }
}

impl Serialize for Detector {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.serialize_str(self.as_str())
    }
}

/// Whose value wins when an application already sets a stamped key.
#[derive(Clone, Copy, Debug, Default, Deserialize, Serialize, PartialEq, Eq)]
#[serde(rename_all = "snake_case")]
pub enum OnConflict {
    /// The application's value (the Collector's `insert`).
    #[default]
    Keep,
    /// The agent's value; the application's key-value is cut out (`upsert`).
    Replace,
}

impl ResourceConfig {
    /// At most this many attributes, static and detected together.
    const MAX_ATTRIBUTES: usize = 64;

    pub(super) fn validate(&self) -> Result<(), ConfigError> {
        let bad = |msg: String| Err(ConfigError::Invalid(msg));
        for (key, value) in &self.attributes {
            if key.trim().is_empty() {
                return bad(format!(
                    "resource.attributes: the key {key:?} (value {value:?}) is empty; \
                     name the attribute, such as \"deployment.environment\""
                ));
            }
        }
        let mut seen = Vec::new();
        for detector in &self.detect {
            if seen.contains(detector) {
                return bad(format!(
                    "resource.detect: detector {:?} is listed twice",
                    detector.as_str()
                ));
            }
            seen.push(*detector);
        }
        // host gives two attributes, os one.
        let most = self.attributes.len() + 3;
        if most > Self::MAX_ATTRIBUTES {
            return bad(format!(
                "resource.attributes: {} attributes; at most {} can be stamped \
                 (static and detected together)",
                self.attributes.len(),
                Self::MAX_ATTRIBUTES - 3
            ));
        }
        Ok(())
    }
}

#[cfg(test)]
mod resource_tests {
    use std::path::Path;

    use super::*;
    use crate::config::Config;

    fn parse(text: &str) -> Result<Config, ConfigError> {
        let config = Config::from_toml(text, Path::new("test.toml"))?;
        config.validate()?;
        Ok(config)
    }

    #[test]
    fn resource_table_is_read_with_keep_as_the_default() {
        let config = parse(
            "[resource]\nattributes = { \"deployment.environment\" = \"prod\", rack = \"r1\" }\n\
             detect = [\"host\", \"os\"]\n",
        )
        .expect("valid");
        let resource = config.resource.expect("[resource] given");
        assert_eq!(resource.on_conflict, OnConflict::Keep);
        assert_eq!(resource.detect, vec![Detector::Host, Detector::Os]);
        assert_eq!(resource.attributes["deployment.environment"], "prod");
        assert_eq!(parse("").expect("valid").resource, None);
        let replace = parse("[resource]\non_conflict = \"replace\"\n").expect("valid");
        assert_eq!(replace.resource.unwrap().on_conflict, OnConflict::Replace);
    }

    #[test]
    fn resource_errors_name_the_key() {
        for (text, needles) in [
            (
                "[resource]\nattributes = { \"\" = \"x\" }\n",
                &["resource.attributes", "empty"][..],
            ),
            (
                "[resource]\nattributes = { env = \"a\", env = \"b\" }\n",
                &["env", "duplicate"],
            ),
            (
                "[resource]\ndetect = [\"hots\"]\n",
                &["resource.detect", "\"hots\""],
            ),
            (
                "[resource]\ndetect = [\"os\", \"os\"]\n",
                &["resource.detect", "twice"],
            ),
            (
                "[resource]\non_conflict = \"upsert\"\n",
                &["on_conflict", "upsert"],
            ),
            (
                "[resource]\nattributes = { rack = 3 }\n",
                &["rack", "string"],
            ),
            ("[resource]\nattribute = {}\n", &["attribute"]),
        ] {
            let e = parse(text).expect_err(text).to_string();
            for needle in needles {
                assert!(e.contains(needle), "{text}: {e:?} lacks {needle:?}");
            }
        }
    }
}
