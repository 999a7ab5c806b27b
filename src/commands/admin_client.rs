//! A client of the admin API for `telespool status` and `telespool top`.

use std::net::SocketAddr;
use std::time::Duration;

use tonic::transport::{Channel, Endpoint};

use crate::api::admin_client::AdminClient;
use crate::api::{GetStatusRequest, Status, WatchRequest};
use crate::commands::CommandError;

/// How long a command waits for the agent to connect and to answer.
pub const TIMEOUT: Duration = Duration::from_secs(5);

/// A connected client of the agent whose admin listener is `addr`.
pub async fn connect(addr: SocketAddr) -> Result<AdminClient<Channel>, CommandError> {
    let unreachable = |cause: String| CommandError::Unreachable { addr, cause };
    let endpoint = Endpoint::from_shared(format!("http://{addr}"))
        .map_err(|e| unreachable(e.to_string()))?
        .connect_timeout(TIMEOUT);
    let channel = endpoint
        .connect()
        .await
        .map_err(|e| unreachable(error_chain(&e)))?;
    Ok(AdminClient::new(channel))
}

/// `GetStatus` from the agent at `addr`.
pub async fn get_status(addr: SocketAddr) -> Result<Status, CommandError> {
    let mut client = connect(addr).await?;
    let mut request = tonic::Request::new(GetStatusRequest {});
    request.set_timeout(TIMEOUT);
    let call = client.get_status(request);
    match tokio::time::timeout(TIMEOUT, call).await {
        Ok(Ok(response)) => Ok(response.into_inner()),
        Ok(Err(status)) => Err(api_error(addr, status)),
        Err(_) => Err(CommandError::Unreachable {
            addr,
            cause: format!("no answer within {TIMEOUT:?}"),
        }),
    }
}

/// `Watch` from the agent at `addr`, one snapshot per `interval`.
pub async fn watch(
    addr: SocketAddr,
    interval: Duration,
) -> Result<tonic::Streaming<Status>, CommandError> {
    let mut client = connect(addr).await?;
    let interval_ms = u32::try_from(interval.as_millis()).unwrap_or(u32::MAX);
    let call = client.watch(WatchRequest { interval_ms });
    match tokio::time::timeout(TIMEOUT, call).await {
        Ok(Ok(response)) => Ok(response.into_inner()),
        Ok(Err(status)) => Err(api_error(addr, status)),
        Err(_) => Err(CommandError::Unreachable {
            addr,
            cause: format!("no answer within {TIMEOUT:?}"),
        }),
    }
}

/// The admin API answered `status` instead of a snapshot.
pub fn api_error(addr: SocketAddr, status: tonic::Status) -> CommandError {
    match status.code() {
        tonic::Code::Unimplemented => CommandError::Unreachable {
            addr,
            cause: "it does not serve the telespool admin API (an older telespool, or another program on that port)".into(),
        },
        tonic::Code::Unavailable | tonic::Code::DeadlineExceeded | tonic::Code::Cancelled => {
            CommandError::Unreachable {
                addr,
                cause: status.message().to_owned(),
            }
        }
        code => CommandError::Api {
            addr,
            code: format!("{code:?}"),
            message: status.message().to_owned(),
        },
    }
}

/// An error and its sources on one line ("transport error: connection refused").
fn error_chain(e: &dyn std::error::Error) -> String {
    let mut text = e.to_string();
    let mut source = e.source();
    while let Some(s) = source {
        // hyper and tonic often repeat their source's text in their own.
        let part = s.to_string();
        if !text.contains(&part) {
            text.push_str(": ");
            text.push_str(&part);
        }
        source = s.source();
    }
    text
}
