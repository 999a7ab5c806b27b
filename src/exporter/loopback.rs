//! Upstream on the same host: no pacing congestion control.
//!
//! BBR (the default on many current distributions and cloud images) models
//! the path's bandwidth and round trip and paces every segment out on a
//! timer (TCP's internal pacing, unless the `fq` qdisc does it). Over a
//! loopback connection there is no path to model and no queue to keep
//! short, and the pacing timer and the model's update on every ACK are pure
//! kernel work per segment, paid by the sender. For an upstream on a
//! loopback address (a collector on the node, the bench's sink) the
//! connection switches from `bbr*` to `cubic`: the kernel's compiled-in
//! default, and so in `net.ipv4.tcp_allowed_congestion_control` even where
//! BBR was made the default at boot (checked as an unprivileged user, as the
//! packaged unit runs the agent). Any other congestion control, and every
//! remote upstream, is left as the host configured it. Failing to switch
//! (a host that does not allow `cubic`) only loses the saving, so errors
//! are logged at debug.
//!
//! On the e2e bench (2 cores, the host's default `bbr`, the sink on
//! loopback), `typical-nogzip`: agent task-clock 0.93x (601 against 646 ms
//! per million realistic spans, medians of 8 interleaved runs), the whole
//! machine's CPU per span 0.95x; `compression-grpc` without compression
//! 0.92x. Durable mode, whose exports are one commit group each (~180 KB),
//! does not gain: its agent task-clock went up 2-5 % while the machine's
//! stayed within the noise. `cargo bench --bench upstream_write`: a 4 MiB
//! batch in 16 KiB frames over a corked loopback socket takes 0.66 ms with
//! `cubic` against 1.65 ms with `bbr` (pacing waits included).

use tokio::net::TcpStream;

/// The congestion control a loopback upstream connection gets instead of BBR.
const INSTEAD_OF_BBR: &[u8] = b"cubic";

/// Switches a connection to a loopback peer away from BBR.
pub(super) fn unpace_loopback(tcp: &TcpStream) {
    let Ok(peer) = tcp.peer_addr() else {
        return;
    };
    if !peer.ip().to_canonical().is_loopback() {
        return;
    }
    let socket = socket2::SockRef::from(tcp);
    match socket.tcp_congestion() {
        Ok(name) if name.starts_with(b"bbr") => {
            if let Err(e) = socket.set_tcp_congestion(INSTEAD_OF_BBR) {
                tracing::debug!(error = %e, %peer, "cannot switch the loopback upstream connection from bbr to cubic");
            }
        }
        Ok(_) => {}
        Err(e) => {
            tracing::debug!(error = %e, %peer, "cannot read the upstream connection's congestion control")
        }
    }
}

/// A connected TCP pair on 127.0.0.1 (the client, the accepted end), for
/// the exporter's socket tests.
#[cfg(test)]
pub(super) async fn loopback_pair() -> (TcpStream, TcpStream) {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
        .await
        .expect("bind");
    let addr = listener.local_addr().expect("addr");
    let (client, accepted) = tokio::join!(TcpStream::connect(addr), listener.accept());
    (client.expect("connect"), accepted.expect("accept").0)
}

#[cfg(test)]
mod tests {
    use super::*;
    use tokio::net::TcpListener;

    /// The connection's congestion control (the kernel pads the name with NULs).
    fn congestion(tcp: &TcpStream) -> Vec<u8> {
        let mut name = socket2::SockRef::from(tcp)
            .tcp_congestion()
            .expect("TCP_CONGESTION");
        name.retain(|&b| b != 0);
        name
    }

    /// Whether new connections on this host start with BBR (as on the
    /// machines this project is built and benched on).
    fn host_default_is_bbr() -> bool {
        std::fs::read_to_string("/proc/sys/net/ipv4/tcp_congestion_control")
            .is_ok_and(|name| name.trim().starts_with("bbr"))
    }

    #[tokio::test]
    async fn both_upstream_connectors_take_a_loopback_upstream_off_the_hosts_bbr() {
        if !host_default_is_bbr() {
            eprintln!("skipped: connections on this host do not start with bbr");
            return;
        }
        let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind");
        let uri: http::Uri = format!("http://{}", listener.local_addr().expect("addr"))
            .parse()
            .expect("uri");
        let timeout = std::time::Duration::from_secs(5);

        let mut grpc = super::super::cork::CorkedConnector::new(timeout);
        let io = tower_service::Service::call(&mut grpc, uri.clone())
            .await
            .expect("connect");
        assert_eq!(congestion(io.inner().tcp()), b"cubic", "OTLP/gRPC");

        let mut http = super::super::connect::Connector::new(None, timeout);
        let io = tower_service::Service::call(&mut http, uri)
            .await
            .expect("connect");
        match io.inner() {
            super::super::connect::Stream::Plain(tcp) => {
                assert_eq!(congestion(tcp), b"cubic", "OTLP/HTTP")
            }
            super::super::connect::Stream::Tls(_) => panic!("http:// made a TLS stream"),
        }
    }

    #[tokio::test]
    async fn a_loopback_connection_leaves_bbr_for_cubic_and_keeps_any_other_choice() {
        let (tcp, _peer) = loopback_pair().await;
        if let Err(e) = socket2::SockRef::from(&tcp).set_tcp_congestion(b"bbr") {
            // tcp_bbr is neither built in nor loadable here: nothing to undo.
            eprintln!("skipped: this kernel refuses bbr: {e}");
            return;
        }
        assert_eq!(congestion(&tcp), b"bbr");
        unpace_loopback(&tcp);
        assert_eq!(congestion(&tcp), b"cubic");

        let (tcp, _peer) = loopback_pair().await;
        socket2::SockRef::from(&tcp)
            .set_tcp_congestion(b"reno")
            .expect("reno is always built in");
        unpace_loopback(&tcp);
        assert_eq!(congestion(&tcp), b"reno", "not bbr: left as it was");
    }
}
