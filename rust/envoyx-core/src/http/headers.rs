//! Header names the proxy writes or removes, and the hop-by-hop rule.

use std::time::Duration;

use http::HeaderMap;
use http::Version;
use http::header::{self, HeaderName};

use crate::config::{ClientCertDetails, ForwardClientCert};
use crate::tls::PeerTls;

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
pub static X_ENVOY_IMMEDIATE_HEALTH_CHECK_FAIL: HeaderName =
    HeaderName::from_static("x-envoy-immediate-health-check-fail");
pub static X_ENVOY_DEGRADED: HeaderName = HeaderName::from_static("x-envoy-degraded");
/// The cluster a health-checked host says it is (its `service_cluster`), matched
/// by `service_name_matcher`.
pub static X_ENVOY_UPSTREAM_HEALTHCHECKED_CLUSTER: HeaderName =
    HeaderName::from_static("x-envoy-upstream-healthchecked-cluster");
pub static GRPC_STATUS: HeaderName = HeaderName::from_static("grpc-status");
pub static GRPC_MESSAGE: HeaderName = HeaderName::from_static("grpc-message");
pub static GRPC_TIMEOUT: HeaderName = HeaderName::from_static("grpc-timeout");
/// On a reply to a request a circuit breaker refused.
pub static X_ENVOY_OVERLOADED: HeaderName = HeaderName::from_static("x-envoy-overloaded");

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

pub static X_FORWARDED_CLIENT_CERT: HeaderName = HeaderName::from_static("x-forwarded-client-cert");

/// `x-forwarded-client-cert` as Envoy's connection manager writes it
/// (`forward_client_cert_details`, `set_current_client_cert_details`).
pub fn forward_client_cert(
    headers: &mut HeaderMap,
    mode: ForwardClientCert,
    details: ClientCertDetails,
    tls: Option<&PeerTls>,
) {
    if mode == ForwardClientCert::AlwaysForwardOnly {
        return;
    }
    let mutual = tls.filter(|t| t.peer_presented());
    let Some(tls) = mutual.filter(|_| mode != ForwardClientCert::Sanitize) else {
        headers.remove(&X_FORWARDED_CLIENT_CERT);
        return;
    };
    if mode == ForwardClientCert::ForwardOnly {
        return;
    }
    let mut parts: Vec<String> = Vec::new();
    if let Some(by) = tls.local().and_then(|l| l.uri_sans.first()) {
        parts.push(format!("By={by}"));
    }
    let peer = tls.peer();
    if let Some(p) = peer {
        parts.push(format!("Hash={}", p.sha256));
    }
    if details.cert
        && let Some(leaf) = tls.peer_chain.first()
    {
        parts.push(format!(
            "Cert=\"{}\"",
            url_encoded_pem(std::slice::from_ref(leaf))
        ));
    }
    if details.chain && !tls.peer_chain.is_empty() {
        parts.push(format!("Chain=\"{}\"", url_encoded_pem(&tls.peer_chain)));
    }
    if details.subject {
        let subject = peer.map_or("", |p| p.subject.as_str());
        parts.push(format!("Subject=\"{subject}\""));
    }
    if details.uri {
        let uri = peer
            .and_then(|p| p.uri_sans.first())
            .map_or("", String::as_str);
        parts.push(format!("URI={uri}"));
    }
    if details.dns
        && let Some(p) = peer
    {
        parts.extend(p.dns_sans.iter().map(|d| format!("DNS={d}")));
    }
    let value = parts.join(";");
    let value = match (mode, headers.get(&X_FORWARDED_CLIENT_CERT)) {
        (ForwardClientCert::AppendForward, Some(old)) => {
            format!("{},{value}", String::from_utf8_lossy(old.as_bytes()))
        }
        _ => value,
    };
    if let Ok(v) = http::HeaderValue::from_str(&value) {
        headers.insert(X_FORWARDED_CLIENT_CERT.clone(), v);
    }
}

/// Certificates as PEM, percent-encoded for a header value.
fn url_encoded_pem(chain: &[rustls::pki_types::CertificateDer<'_>]) -> String {
    use base64::Engine;
    let mut pem = String::new();
    for der in chain {
        pem.push_str("-----BEGIN CERTIFICATE-----\n");
        let b64 = base64::engine::general_purpose::STANDARD.encode(der.as_ref());
        for line in b64.as_bytes().chunks(64) {
            pem.push_str(std::str::from_utf8(line).unwrap_or_default());
            pem.push('\n');
        }
        pem.push_str("-----END CERTIFICATE-----\n");
    }
    let mut out = String::with_capacity(pem.len() * 3 / 2);
    for b in pem.bytes() {
        if b.is_ascii_alphanumeric() || matches!(b, b'-' | b'.' | b'_' | b'~') {
            out.push(b as char);
        } else {
            out.push_str(&format!("%{b:02X}"));
        }
    }
    out
}

/// A `grpc-timeout` value: up to 8 digits and a unit (H, M, S, m, u, n).
pub fn parse_grpc_timeout(v: &str) -> Option<Duration> {
    let (digits, unit) = v.split_at(v.len().checked_sub(1)?);
    if digits.is_empty() || digits.len() > 8 || !digits.bytes().all(|b| b.is_ascii_digit()) {
        return None;
    }
    let n: u64 = digits.parse().ok()?;
    Some(match unit {
        "H" => Duration::from_secs(n * 3600),
        "M" => Duration::from_secs(n * 60),
        "S" => Duration::from_secs(n),
        "m" => Duration::from_millis(n),
        "u" => Duration::from_micros(n),
        "n" => Duration::from_nanos(n),
        _ => return None,
    })
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
