//! [`Held`]: one HTTP/1 connection that sends its headers with
//! `Expect: 100-continue` and withholds the body, to hold a connection slot
//! open; it counts as served once the agent asks for the body.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;

use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};

use super::ok;

pub struct Held {
    continued: Arc<AtomicBool>,
    pub task: tokio::task::JoinHandle<()>,
}

impl Held {
    /// Send the request head for `host` over `stream` and keep the stream
    /// open until the task is aborted.
    pub async fn open<S>(mut stream: S, host: &str) -> Held
    where
        S: AsyncRead + AsyncWrite + Unpin + Send + 'static,
    {
        let head = format!(
            "POST /v1/logs HTTP/1.1\r\nHost: {host}\r\nContent-Type: application/x-protobuf\r\nExpect: 100-continue\r\nContent-Length: 10\r\n\r\n"
        );
        ok(stream.write_all(head.as_bytes()).await);
        let continued = Arc::new(AtomicBool::new(false));
        let flag = continued.clone();
        let task = tokio::spawn(async move {
            let mut seen = Vec::new();
            let mut buf = [0u8; 256];
            // Bounded: ends at EOF or error; aborted by the test otherwise.
            while let Ok(n @ 1..) = stream.read(&mut buf).await {
                seen.extend_from_slice(&buf[..n]);
                if String::from_utf8_lossy(&seen).contains("100 Continue") {
                    flag.store(true, Ordering::Release);
                }
            }
            // Hold the connection open until aborted.
            std::future::pending::<()>().await;
        });
        Held { continued, task }
    }

    pub fn served(&self) -> bool {
        self.continued.load(Ordering::Acquire)
    }
}

/// How many of `held` the agent has started serving.
pub fn served(held: &[Held]) -> usize {
    held.iter().filter(|h| h.served()).count()
}
