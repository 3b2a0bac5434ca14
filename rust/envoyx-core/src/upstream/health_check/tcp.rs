//! The TCP checker (Envoy's `TcpHealthCheckerImpl`): connect, write `send`, and
//! pass once every `receive` segment has arrived in order (or on connect when
//! there is nothing to receive).

use std::sync::Arc;

use tokio::io::{AsyncReadExt, AsyncWriteExt};

use super::Outcome;
use crate::config::health_check::TcpHealthCheck;
use crate::upstream::cluster::{Cluster, Host};
use crate::upstream::connect::UpstreamStream;

/// What a host may send before the check gives up matching (the timeout ends it
/// sooner in practice).
const MAX_BUFFERED: usize = 64 * 1024;

/// Whether `segments` appear in `buf` in order (Envoy's `PayloadMatcher::match`).
pub(super) fn matches(segments: &[Vec<u8>], buf: &[u8]) -> bool {
    let mut start = 0;
    for seg in segments {
        match buf[start..]
            .windows(seg.len().max(1))
            .position(|w| w == seg.as_slice())
        {
            Some(i) => start += i + seg.len(),
            None => return false,
        }
    }
    true
}

/// One check; returns the connection when it may be used again.
pub(super) async fn check(
    cluster: &Arc<Cluster>,
    host: &Arc<Host>,
    config: &TcpHealthCheck,
    conn: Option<UpstreamStream>,
) -> (Outcome, Option<UpstreamStream>) {
    let mut stream = match conn {
        Some(s) => s,
        None => match super::open(cluster, host.address).await {
            Ok(s) => s,
            Err(_) => return (Outcome::NETWORK, None),
        },
    };
    if !config.send.is_empty() && stream.write_all(&config.send).await.is_err() {
        return (Outcome::NETWORK, None);
    }
    if config.receive.is_empty() {
        return (Outcome::Healthy { degraded: false }, Some(stream));
    }
    let mut buf = Vec::new();
    let mut chunk = [0u8; 4096];
    loop {
        match stream.read(&mut chunk).await {
            Ok(0) | Err(_) => return (Outcome::NETWORK, None),
            Ok(n) => {
                buf.extend_from_slice(&chunk[..n]);
                if matches(&config.receive, &buf) {
                    return (Outcome::Healthy { degraded: false }, Some(stream));
                }
                if buf.len() > MAX_BUFFERED {
                    // Keep the tail: a segment may straddle what is dropped.
                    buf.drain(..buf.len() - MAX_BUFFERED / 2);
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::matches;

    #[test]
    fn segments_match_in_order() {
        let segs = vec![b"AB".to_vec(), b"CD".to_vec()];
        assert!(matches(&segs, b"xxABxxCDxx"));
        assert!(!matches(&segs, b"CDAB"));
        assert!(!matches(&segs, b"AB"));
    }
}
