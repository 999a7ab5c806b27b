//! Operator commands besides `run`: `status` (asks a running agent's admin
//! API; `top` is in [`crate::top`]), the
//! offline spool tools, and `drain` (decommissioning a node).

use std::io::Write;
use std::net::SocketAddr;
use std::path::Path;

use prost::Message;

use crate::signal::Signal;
use crate::spool;

pub mod admin_client;

/// Why an operator command failed; the message says what to do.
#[derive(Debug, thiserror::Error)]
pub enum CommandError {
    #[error("cannot reach the telespool admin listener at {addr}: {cause}; is the agent running, and is admin.listen right?")]
    Unreachable { addr: SocketAddr, cause: String },
    /// The admin API answered with an error other than "unavailable".
    #[error("the telespool admin API at {addr} answered {code}: {message}")]
    Api {
        addr: SocketAddr,
        code: String,
        message: String,
    },
    /// `top` without `--once` needs a terminal to draw on.
    #[error("telespool top needs a terminal; use `telespool top --once` for one frame as text")]
    NotATerminal,
    #[error("cannot render the status as JSON: {0}")]
    Json(serde_json::Error),
    #[error(transparent)]
    Spool(#[from] spool::SpoolError),
    #[error("cannot write to stdout: {0}")]
    Stdout(#[from] std::io::Error),
}

/// `telespool status`: the agent's `GetStatus` snapshot, as text for a
/// person or (`json`) as JSON with the proto's field names.
pub async fn status(addr: SocketAddr, json: bool) -> Result<String, CommandError> {
    let snapshot = crate::commands::admin_client::get_status(addr).await?;
    match json {
        true => {
            let mut text = serde_json::to_string_pretty(&snapshot).map_err(CommandError::Json)?;
            text.push('\n');
            Ok(text)
        }
        false => Ok(crate::status::text::render(&addr.to_string(), &snapshot)),
    }
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
