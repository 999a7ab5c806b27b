//! Resource detectors (`resource.detect`): attributes read from the host.
//!
//! - `host`: `host.name`, the kernel's hostname (gethostname(2)), and
//!   `host.id`, the machine id from `/etc/machine-id` (falling back to
//!   `/var/lib/dbus/machine-id`), as the semantic conventions say for Linux.
//! - `os`: `os.type`, the semantic conventions' name for the OS the agent
//!   was built for (`linux`, `darwin`, ...).
//!
//! Each attribute is read on its own: one that cannot be read is reported as
//! a [`DetectError`] and left out, and the others are still stamped.

use std::path::{Path, PathBuf};

use crate::config::Detector;

/// Where the detectors read from; tests point it at their own files.
#[derive(Clone, Debug)]
pub struct Sources {
    /// Machine-id files, tried in order.
    pub machine_id: Vec<PathBuf>,
}

impl Default for Sources {
    fn default() -> Self {
        Sources {
            machine_id: vec![
                PathBuf::from("/etc/machine-id"),
                PathBuf::from("/var/lib/dbus/machine-id"),
            ],
        }
    }
}

/// An attribute a detector could not read; it is left out of the stamp.
#[derive(Debug, thiserror::Error)]
pub enum DetectError {
    /// gethostname(2) failed or returned something that is not UTF-8.
    #[error("host.name left out: cannot read the hostname: {0}")]
    Hostname(String),
    /// No machine-id file could be read, or the one found is empty.
    #[error("host.id left out: {0}")]
    MachineId(String),
}

/// Read the attributes of `detectors` (in their order), with the failures.
pub fn detect(
    detectors: &[Detector],
    sources: &Sources,
) -> (Vec<(String, String)>, Vec<DetectError>) {
    let mut attributes = Vec::new();
    let mut failures = Vec::new();
    let mut push = |key: &str, value: Result<String, DetectError>| match value {
        Ok(value) => attributes.push((key.to_owned(), value)),
        Err(e) => failures.push(e),
    };
    for detector in detectors {
        match detector {
            Detector::Host => {
                push("host.name", hostname());
                push("host.id", machine_id(&sources.machine_id));
            }
            Detector::Os => push("os.type", Ok(os_type().to_owned())),
        }
    }
    (attributes, failures)
}

fn hostname() -> Result<String, DetectError> {
    let name = nix::unistd::gethostname().map_err(|e| DetectError::Hostname(e.to_string()))?;
    match name.into_string() {
        Ok(name) if !name.is_empty() => Ok(name),
        Ok(_) => Err(DetectError::Hostname("the hostname is empty".into())),
        Err(raw) => Err(DetectError::Hostname(format!("{raw:?} is not UTF-8"))),
    }
}

fn machine_id(paths: &[PathBuf]) -> Result<String, DetectError> {
    let mut tried = Vec::new();
    for path in paths {
        match read_id(path) {
            Ok(id) => return Ok(id),
            Err(why) => tried.push(format!("{}: {why}", path.display())),
        }
    }
    Err(DetectError::MachineId(match tried.is_empty() {
        true => "no machine-id file to read".into(),
        false => tried.join("; "),
    }))
}

fn read_id(path: &Path) -> Result<String, String> {
    let text = std::fs::read_to_string(path).map_err(|e| e.to_string())?;
    let id = text.trim();
    if id.is_empty() {
        return Err("empty".into());
    }
    Ok(id.to_owned())
}

/// `os.type` as the semantic conventions spell it.
fn os_type() -> &'static str {
    match std::env::consts::OS {
        "macos" => "darwin",
        "dragonfly" => "dragonflybsd",
        "illumos" => "solaris",
        other => other,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn host_and_os_detectors_read_their_sources_in_order() {
        let dir = tempfile::tempdir().unwrap();
        let id = dir.path().join("machine-id");
        std::fs::write(&id, "0123456789abcdef\n").unwrap();
        let sources = Sources {
            machine_id: vec![dir.path().join("missing"), id],
        };
        let (attrs, failures) = detect(&[Detector::Os, Detector::Host], &sources);
        assert!(failures.is_empty(), "{failures:?}");
        let keys: Vec<&str> = attrs.iter().map(|(k, _)| k.as_str()).collect();
        assert_eq!(keys, ["os.type", "host.name", "host.id"]);
        assert_eq!(attrs[0].1, os_type());
        assert_eq!(attrs[2].1, "0123456789abcdef");
        assert!(!attrs[1].1.is_empty());
    }

    #[test]
    fn an_unreadable_machine_id_is_reported_and_left_out() {
        let dir = tempfile::tempdir().unwrap();
        let empty = dir.path().join("empty");
        std::fs::write(&empty, "\n").unwrap();
        let sources = Sources {
            machine_id: vec![dir.path().join("missing"), empty.clone()],
        };
        let (attrs, failures) = detect(&[Detector::Host], &sources);
        assert_eq!(attrs.len(), 1, "host.name still detected: {attrs:?}");
        assert_eq!(attrs[0].0, "host.name");
        let message = failures
            .iter()
            .map(|e| e.to_string())
            .collect::<Vec<_>>()
            .join("\n");
        assert!(message.starts_with("host.id left out: "), "{message}");
        assert!(message.contains("missing"), "{message}");
        assert!(
            message.contains(&format!("{}: empty", empty.display())),
            "{message}"
        );
    }
}
