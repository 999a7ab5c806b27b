//! Operator commands besides `run`: `status` (asks a running agent), the
//! offline spool tools, and `drain` (decommissioning a node).

use std::io::Write;
use std::net::SocketAddr;
use std::path::Path;
use std::time::Duration;

use http_body_util::{BodyExt, Empty};
use prost::Message;

use crate::signal::Signal;
use crate::spool;

/// Why an operator command failed; the message says what to do.
#[derive(Debug, thiserror::Error)]
pub enum CommandError {
    #[error("cannot reach the telespool admin listener at {addr}: {cause}; is the agent running, and is admin.listen right?")]
    Unreachable { addr: SocketAddr, cause: String },
    #[error(transparent)]
    Spool(#[from] spool::SpoolError),
    #[error("cannot write to stdout: {0}")]
    Stdout(#[from] std::io::Error),
}

/// GET `path` from the admin listener over HTTP/1.1.
pub async fn admin_get(addr: SocketAddr, path: &str) -> Result<(u16, String), CommandError> {
    let unreachable = |cause: String| CommandError::Unreachable { addr, cause };
    let stream = tokio::time::timeout(Duration::from_secs(5), tokio::net::TcpStream::connect(addr))
        .await
        .map_err(|_| unreachable("connect timed out".into()))?
        .map_err(|e| unreachable(e.to_string()))?;
    let (mut sender, conn) =
        hyper::client::conn::http1::handshake(hyper_util::rt::TokioIo::new(stream))
            .await
            .map_err(|e| unreachable(e.to_string()))?;
    tokio::spawn(conn);
    let request = http::Request::get(path)
        .header(http::header::HOST, addr.to_string())
        .body(Empty::<bytes::Bytes>::new())
        .map_err(|e| unreachable(e.to_string()))?;
    let response = sender
        .send_request(request)
        .await
        .map_err(|e| unreachable(e.to_string()))?;
    let status = response.status().as_u16();
    let body = response
        .into_body()
        .collect()
        .await
        .map_err(|e| unreachable(e.to_string()))?
        .to_bytes();
    Ok((status, String::from_utf8_lossy(&body).into_owned()))
}

/// `telespool status`: a short human summary from `/readyz` and `/metrics`.
pub async fn status(addr: SocketAddr) -> Result<String, CommandError> {
    let (ready, _) = admin_get(addr, "/readyz").await?;
    let (_, metrics) = admin_get(addr, "/metrics").await?;
    let sample = |name: &str| -> f64 {
        metrics
            .lines()
            .filter(|l| !l.starts_with('#'))
            .filter(|l| l.split([' ', '{']).next() == Some(name))
            .filter_map(|l| l.rsplit(' ').next()?.parse::<f64>().ok())
            .sum()
    };
    let per_signal = |name: &str, signal: Signal| -> f64 {
        let label = format!("signal=\"{}\"", signal.as_str());
        metrics
            .lines()
            .filter(|l| l.starts_with(name) && l.contains(&label))
            .filter(|l| {
                !name.ends_with("received_items_total") || l.contains("outcome=\"accepted\"")
            })
            .filter_map(|l| l.rsplit(' ').next()?.parse::<f64>().ok())
            .sum()
    };
    let mut out = String::new();
    out.push_str(&format!(
        "telespool at {addr}: {}\n",
        if ready == 200 {
            "ready"
        } else {
            "NOT READY (starting or shutting down)"
        }
    ));
    for receiver in ["grpc", "http"] {
        let on: Vec<String> = metrics
            .lines()
            .filter(|l| l.starts_with("telespool_listener_info{"))
            .filter(|l| label_value(l, "receiver").as_deref() == Some(receiver))
            .filter_map(|l| {
                Some(format!(
                    "{} {}",
                    label_value(l, "transport")?,
                    label_value(l, "address")?
                ))
            })
            .collect();
        let on = match on.is_empty() {
            true => "disabled".to_owned(),
            false => on.join(", "),
        };
        out.push_str(&format!("{receiver}: {on}\n"));
    }
    out.push_str(&format!(
        "upstream: {}\n",
        if sample("telespool_upstream_up") >= 1.0 {
            "up"
        } else {
            "failing (or no export yet)"
        }
    ));
    out.push_str(&format!(
        "buffer: {} bytes, {} items in memory\n",
        sample("telespool_buffered_bytes"),
        sample("telespool_buffered_items")
    ));
    out.push_str(&format!(
        "spool: {} rows, {} bytes, oldest {}s old\n",
        sample("telespool_spool_rows"),
        sample("telespool_spool_bytes"),
        sample("telespool_spool_oldest_age_seconds")
    ));
    if sample("telespool_spool_disk_full") >= 1.0 {
        out.push_str("spool: DISK FULL: the spool's filesystem has no space left; new rows go only into free pages of the spool file. Free disk space.\n");
    } else if sample("telespool_spool_max_bytes_reached") >= 1.0 {
        out.push_str(
            "spool: FULL: the spool file is at spool.max_bytes; raise it or restore upstream\n",
        );
    }
    out.push_str("signal    accepted   forwarded   spooled   dropped\n");
    for s in Signal::ALL {
        out.push_str(&format!(
            "{:<8} {:>9} {:>11} {:>9} {:>9}\n",
            s.as_str(),
            per_signal("telespool_received_items_total", s),
            per_signal("telespool_forwarded_items_total", s),
            per_signal("telespool_spooled_items_total", s),
            per_signal("telespool_dropped_items_total", s),
        ));
    }
    Ok(out)
}

/// The value of label `name` in a Prometheus text sample line, unescaped.
fn label_value(line: &str, name: &str) -> Option<String> {
    let labels = &line[line.find('{')? + 1..];
    let start = labels
        .match_indices(&format!("{name}=\""))
        .find(|(i, _)| *i == 0 || labels[..*i].ends_with(','))?
        .0
        + name.len()
        + 2;
    let mut value = String::new();
    let mut chars = labels[start..].chars();
    while let Some(c) = chars.next() {
        match c {
            '"' => return Some(value),
            '\\' => match chars.next()? {
                'n' => value.push('\n'),
                escaped => value.push(escaped),
            },
            c => value.push(c),
        }
    }
    None
}

/// `telespool spool stats`.
pub fn spool_stats(path: &Path) -> Result<String, CommandError> {
    let report = spool::verify(path)?;
    let s = &report.stats;
    let mut out = format!(
        "spool {}: {} rows, {} payload bytes\n",
        path.display(),
        s.rows,
        s.bytes
    );
    for signal in Signal::ALL {
        out.push_str(&format!(
            "  {:<8} {} items\n",
            signal.as_str(),
            s.items[signal.index()]
        ));
    }
    if let Some(ms) = s.oldest_created_ms {
        let age = (crate::batch::unix_ms(std::time::SystemTime::now()) - ms).max(0) / 1000;
        out.push_str(&format!("  oldest batch: {age}s old\n"));
    }
    Ok(out)
}

/// `telespool spool verify`: Ok(report text) when sound, Err-like text otherwise.
pub fn spool_verify(path: &Path) -> Result<(bool, String), CommandError> {
    let report = spool::verify(path)?;
    if report.is_ok() {
        Ok((
            true,
            format!(
                "spool {} is sound: schema version {}, {} rows, {} bytes\n",
                path.display(),
                report.schema_version,
                report.stats.rows,
                report.stats.bytes
            ),
        ))
    } else {
        let mut out = format!("spool {} has problems:\n", path.display());
        for p in &report.problems {
            out.push_str(&format!("  {p}\n"));
        }
        Ok((false, out))
    }
}

/// `telespool spool purge`: delete every row; prints what was removed.
pub fn spool_purge(path: &Path) -> Result<String, CommandError> {
    let removed = spool::purge(path)?;
    Ok(format!(
        "purged spool {}: removed {} rows ({} bytes)\n",
        path.display(),
        removed.rows,
        removed.bytes
    ))
}

/// `telespool spool export`: one OTLP/JSON export request per line on stdout.
pub fn spool_export(
    path: &Path,
    signal: Option<Signal>,
    out: &mut impl Write,
) -> Result<u64, CommandError> {
    use opentelemetry_proto::tonic::collector as c;
    let mut lines = 0;
    for row in spool::read_all(path, signal)? {
        let row = row?;
        let json = match row.signal {
            Signal::Traces => c::trace::v1::ExportTraceServiceRequest::decode(row.payload.clone())
                .map(|m| serde_json::to_string(&m)),
            Signal::Metrics => {
                c::metrics::v1::ExportMetricsServiceRequest::decode(row.payload.clone())
                    .map(|m| serde_json::to_string(&m))
            }
            Signal::Logs => c::logs::v1::ExportLogsServiceRequest::decode(row.payload.clone())
                .map(|m| serde_json::to_string(&m)),
        };
        match json {
            Ok(Ok(line)) => {
                writeln!(out, "{line}")?;
                lines += 1;
            }
            Ok(Err(e)) => eprintln!("telespool: row {} cannot be rendered as JSON: {e}", row.id),
            Err(e) => eprintln!(
                "telespool: row {} is not a valid {} request: {e}",
                row.id, row.signal
            ),
        }
    }
    Ok(lines)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn label_values_are_read_by_name_and_unescaped() {
        let line = r#"telespool_listener_info{receiver="grpc",transport="unix",address="/run/a \"b\"\\c.sock"} 1"#;
        assert_eq!(label_value(line, "receiver").as_deref(), Some("grpc"));
        assert_eq!(label_value(line, "transport").as_deref(), Some("unix"));
        assert_eq!(
            label_value(line, "address").as_deref(),
            Some(r#"/run/a "b"\c.sock"#)
        );
        assert_eq!(label_value(line, "port"), None);
        assert_eq!(label_value("telespool_up 1", "receiver"), None);
    }
}
