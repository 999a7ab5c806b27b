//! The admin API (`proto/telespool/admin/v1/admin.proto`) from tests: the
//! tonic client generated from the proto, and helpers to read a snapshot.

use std::time::Duration;

use telespool::admin::proto::admin_client::AdminClient;
use telespool::admin::proto::{GetStatusRequest, SignalTotals, Status, WatchRequest};
use tonic::transport::Channel;

use super::{AgentProcess, Signal};

/// A client of `agent`'s admin API (h2c on the admin listener).
pub async fn admin_client(agent: &AgentProcess) -> Result<AdminClient<Channel>, String> {
    let channel = Channel::from_shared(format!("http://{}", agent.admin_addr()))
        .map_err(|e| e.to_string())?
        .connect_timeout(Duration::from_secs(5))
        .timeout(Duration::from_secs(10))
        .connect()
        .await
        .map_err(|e| format!("connecting to the admin API: {e}"))?;
    Ok(AdminClient::new(channel))
}

/// One `GetStatus` snapshot from `agent`.
pub async fn get_status(agent: &AgentProcess) -> Result<Status, String> {
    let mut client = admin_client(agent).await?;
    client
        .get_status(GetStatusRequest {})
        .await
        .map(|r| r.into_inner())
        .map_err(|s| format!("GetStatus: {s}"))
}

/// A `Watch` stream from `agent`, one snapshot per `interval`.
pub async fn watch(
    agent: &AgentProcess,
    interval: Duration,
) -> Result<tonic::Streaming<Status>, tonic::Status> {
    let mut client = admin_client(agent)
        .await
        .map_err(tonic::Status::unavailable)?;
    let interval_ms = u32::try_from(interval.as_millis()).unwrap_or(u32::MAX);
    client
        .watch(WatchRequest { interval_ms })
        .await
        .map(|r| r.into_inner())
}

/// The totals of `signal` in `status`.
#[track_caller]
pub fn totals(status: &Status, signal: Signal) -> &SignalTotals {
    status
        .signals
        .iter()
        .find(|t| t.signal == signal.as_str())
        .unwrap_or_else(|| panic!("no {signal} totals in {status:?}"))
}

/// The count for `reason` in a by-reason list (0 when it is not listed).
pub fn by_reason(counts: &[telespool::admin::proto::Count], reason: &str) -> u64 {
    counts
        .iter()
        .find(|c| c.reason == reason)
        .map_or(0, |c| c.value)
}
