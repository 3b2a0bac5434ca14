//! Header names the proxy writes or removes, and the hop-by-hop rule.

use http::HeaderMap;
use http::Version;
use http::header::{self, HeaderName};

/// Hop-by-hop headers, never forwarded (RFC 9110 §7.6.1); `Connection` first.
static HOP_BY_HOP: [HeaderName; 7] = [
    header::CONNECTION,
    HeaderName::from_static("keep-alive"),
    HeaderName::from_static("proxy-connection"),
    header::TRANSFER_ENCODING,
    header::UPGRADE,
    header::TE,
    header::TRAILER,
];

pub static X_FORWARDED_PROTO: HeaderName = HeaderName::from_static("x-forwarded-proto");
pub static X_FORWARDED_FOR: HeaderName = HeaderName::from_static("x-forwarded-for");
pub static X_REQUEST_ID: HeaderName = HeaderName::from_static("x-request-id");
pub static X_ENVOY_EXPECTED_TIMEOUT: HeaderName =
    HeaderName::from_static("x-envoy-expected-rq-timeout-ms");
pub static X_ENVOY_UPSTREAM_SERVICE_TIME: HeaderName =
    HeaderName::from_static("x-envoy-upstream-service-time");
pub static X_ENVOY_ORIGINAL_PATH: HeaderName = HeaderName::from_static("x-envoy-original-path");

/// Removes hop-by-hop headers, and those `Connection` names, in place.
pub fn strip_hop_by_hop(headers: &mut HeaderMap) {
    // One pass over the (few) names finds which hop-by-hop headers are there;
    // only those are removed (a removal hashes the name). Most requests have none;
    // most HTTP/1.1 responses have just `connection: keep-alive`.
    let mut present = [false; HOP_BY_HOP.len()];
    let mut any = false;
    for name in headers.keys() {
        if let Some(i) = HOP_BY_HOP.iter().position(|h| h == name) {
            present[i] = true;
            any = true;
        }
    }
    if !any {
        return;
    }
    if present[0] {
        // Headers `Connection` names are hop-by-hop too.
        let named: Vec<HeaderName> = headers
            .get_all(header::CONNECTION)
            .iter()
            .filter_map(|v| v.to_str().ok())
            .flat_map(|v| v.split(','))
            .filter_map(|n| HeaderName::from_bytes(n.trim().as_bytes()).ok())
            .filter(|n| !HOP_BY_HOP.contains(n))
            .collect();
        for n in &named {
            remove_unless_grpc_te(headers, n);
        }
    }
    for (name, _) in HOP_BY_HOP.iter().zip(present).filter(|(_, p)| *p) {
        remove_unless_grpc_te(headers, name);
    }
}

fn remove_unless_grpc_te(headers: &mut HeaderMap, name: &HeaderName) {
    // gRPC needs `te: trailers` end to end.
    if *name == header::TE && headers.get(header::TE).is_some_and(|v| v == "trailers") {
        return;
    }
    headers.remove(name);
}

/// `%PROTOCOL%`'s spelling of an HTTP version.
pub fn protocol_name(v: Version) -> &'static str {
    match v {
        Version::HTTP_10 => "HTTP/1.0",
        Version::HTTP_11 => "HTTP/1.1",
        Version::HTTP_2 => "HTTP/2",
        Version::HTTP_3 => "HTTP/3",
        _ => "-",
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn hop_by_hop_and_connection_named_headers_go_grpc_te_stays() {
        let mut h = HeaderMap::new();
        h.insert("connection", "x-private, keep-alive".parse().unwrap());
        h.insert("x-private", "1".parse().unwrap());
        h.insert("keep-alive", "5".parse().unwrap());
        h.insert("te", "trailers".parse().unwrap());
        h.insert("x-kept", "1".parse().unwrap());
        strip_hop_by_hop(&mut h);
        let names: Vec<_> = h.keys().map(|k| k.as_str()).collect();
        assert_eq!(names, ["te", "x-kept"]);

        let mut plain = HeaderMap::new();
        plain.insert("x-kept", "1".parse().unwrap());
        plain.insert("content-length", "1".parse().unwrap());
        strip_hop_by_hop(&mut plain);
        assert_eq!(plain.len(), 2);
        let mut upgrade = HeaderMap::new();
        upgrade.insert("upgrade", "websocket".parse().unwrap());
        strip_hop_by_hop(&mut upgrade);
        assert!(upgrade.is_empty());
    }
}
