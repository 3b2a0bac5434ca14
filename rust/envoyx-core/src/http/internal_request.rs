//! Internal and external requests (the rule of Envoy's
//! `ConnectionManagerUtility::mutateRequestHeaders`): a request is internal when,
//! after `x-forwarded-for` is considered, it has a single client address and that
//! address is in `internal_address_config`. Only internal requests may steer the
//! proxy with `x-envoy-*` control headers (timeouts, retries); an external request
//! loses them before any filter or the router reads them, so a client outside can
//! never shorten a timeout or multiply the requests an upstream sees.

use std::net::{IpAddr, Ipv4Addr, SocketAddr};
use std::sync::OnceLock;

use http::HeaderMap;
use http::header::{HeaderName, HeaderValue};

use super::headers::{X_FORWARDED_FOR, X_FORWARDED_PROTO};
use crate::config::CidrRange;

pub static X_ENVOY_INTERNAL: HeaderName = HeaderName::from_static("x-envoy-internal");
pub static X_ENVOY_EXTERNAL_ADDRESS: HeaderName =
    HeaderName::from_static("x-envoy-external-address");

/// The control headers an external request loses (Envoy 1.40's list).
static EXTERNAL_REMOVED: [HeaderName; 14] = [
    HeaderName::from_static("x-envoy-internal"),
    HeaderName::from_static("x-envoy-retry-on"),
    HeaderName::from_static("x-envoy-retry-grpc-on"),
    HeaderName::from_static("x-envoy-max-retries"),
    HeaderName::from_static("x-envoy-retriable-status-codes"),
    HeaderName::from_static("x-envoy-retriable-header-names"),
    HeaderName::from_static("x-envoy-upstream-alt-stat-name"),
    HeaderName::from_static("x-envoy-upstream-rq-timeout-ms"),
    HeaderName::from_static("x-envoy-upstream-rq-per-try-timeout-ms"),
    HeaderName::from_static("x-envoy-upstream-rq-timeout-alt-response"),
    HeaderName::from_static("x-envoy-expected-rq-timeout-ms"),
    HeaderName::from_static("x-envoy-hedge-on-per-try-timeout"),
    HeaderName::from_static("x-envoy-force-trace"),
    HeaderName::from_static("x-envoy-ip-tags"),
];

/// What an edge request (external, `use_remote_address`) loses besides.
static EDGE_REMOVED: [HeaderName; 3] = [
    HeaderName::from_static("x-envoy-decorator-operation"),
    HeaderName::from_static("x-envoy-downstream-service-cluster"),
    HeaderName::from_static("x-envoy-downstream-service-node"),
];

/// A connection manager's settings for the rule.
#[derive(Debug, Clone, Default)]
pub struct InternalAddressPolicy {
    pub use_remote_address: bool,
    pub xff_num_trusted_hops: u32,
    /// `internal_address_config.cidr_ranges` (empty: nothing is internal).
    pub internal_cidrs: Vec<CidrRange>,
    /// `skip_xff_append`: at the edge, `x-forwarded-for` is left as it came.
    pub skip_xff_append: bool,
    /// `scheme_header_transformation.scheme_to_overwrite`, as the
    /// `x-forwarded-proto` every request gets.
    pub scheme_to_overwrite: Option<HeaderValue>,
}

/// How the rule classified a request.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Origin {
    Internal,
    External,
    /// External and at the edge (`use_remote_address`): Envoy's `edge_request`.
    Edge,
}

impl InternalAddressPolicy {
    /// Classifies the request from `peer` and edits its headers as Envoy's
    /// `mutateRequestHeaders` does: at the edge the peer appended to
    /// `x-forwarded-for` (a loopback peer as the proxy's own address) and
    /// `x-forwarded-proto` written; `x-envoy-internal: true` on an internal
    /// request; on an external one the control headers removed and, at the
    /// edge, `x-envoy-external-address` set.
    pub fn apply(&self, headers: &mut HeaderMap, peer: SocketAddr, tls: bool) -> Origin {
        let (client, single) = self.client_address(headers, peer);
        let scheme = HeaderValue::from_static(if tls { "https" } else { "http" });
        if self.use_remote_address {
            if !self.skip_xff_append {
                append_xff(headers, xff_address(peer.ip()));
            }
            // A proto from an untrusted hop is overwritten.
            if self.xff_num_trusted_hops == 0 || !headers.contains_key(&X_FORWARDED_PROTO) {
                headers.insert(X_FORWARDED_PROTO.clone(), scheme);
            }
        } else if !headers.contains_key(&X_FORWARDED_PROTO) {
            headers.insert(X_FORWARDED_PROTO.clone(), scheme);
        }
        if let Some(s) = &self.scheme_to_overwrite {
            headers.insert(X_FORWARDED_PROTO.clone(), s.clone());
        }
        let internal =
            single && client.is_some_and(|ip| self.internal_cidrs.iter().any(|c| c.contains(ip)));
        if internal {
            headers.insert(X_ENVOY_INTERNAL.clone(), HeaderValue::from_static("true"));
            return Origin::Internal;
        }
        let edge = self.use_remote_address;
        if has_envoy_header(headers) {
            for name in &EXTERNAL_REMOVED {
                headers.remove(name);
            }
            if edge {
                for name in &EDGE_REMOVED {
                    headers.remove(name);
                }
            }
        }
        if edge {
            let ip = client.unwrap_or(peer.ip());
            if let Ok(v) = HeaderValue::from_str(&ip.to_string()) {
                headers.insert(X_ENVOY_EXTERNAL_ADDRESS.clone(), v);
            }
            return Origin::Edge;
        }
        Origin::External
    }

    /// The trusted client address and whether `x-forwarded-for` held a single
    /// address (Envoy's `final_remote_address` and `single_xff_address`).
    fn client_address(&self, headers: &HeaderMap, peer: SocketAddr) -> (Option<IpAddr>, bool) {
        let hops = self.xff_num_trusted_hops;
        if self.use_remote_address {
            let single = !headers.contains_key(&X_FORWARDED_FOR);
            let from_xff = if hops > 0 {
                last_xff_address(headers, hops - 1).0
            } else {
                None
            };
            (Some(from_xff.unwrap_or(peer.ip())), single)
        } else if self.internal_cidrs.is_empty() {
            // Nothing can be internal: the header need not be parsed.
            (None, false)
        } else {
            last_xff_address(headers, hops)
        }
    }
}

/// The address appended to `x-forwarded-for` for `peer`: Envoy appends its own
/// (the node's) address instead of a loopback peer's.
fn xff_address(peer: IpAddr) -> IpAddr {
    if peer.is_loopback() {
        local_address()
    } else {
        peer
    }
}

/// `x-forwarded-for` with `ip` appended, Envoy's way (`,` without a space).
fn append_xff(headers: &mut HeaderMap, ip: IpAddr) {
    use std::fmt::Write as _;
    let mut value = String::with_capacity(64);
    if let Some(existing) = headers.get(&X_FORWARDED_FOR).and_then(|v| v.to_str().ok())
        && !existing.is_empty()
    {
        value.push_str(existing);
        value.push(',');
    }
    let _ = write!(value, "{ip}");
    if let Ok(v) = HeaderValue::from_str(&value) {
        headers.insert(X_FORWARDED_FOR.clone(), v);
    }
}

/// The node's address, as Envoy's `LocalInfo` has it
/// (`Network::Utility::getLocalAddress(v4)`): the first IPv4 address of a
/// non-loopback interface, else 127.0.0.1. Found once.
pub fn local_address() -> IpAddr {
    static LOCAL: OnceLock<IpAddr> = OnceLock::new();
    *LOCAL.get_or_init(|| first_interface_v4().map_or(IpAddr::V4(Ipv4Addr::LOCALHOST), IpAddr::V4))
}

fn first_interface_v4() -> Option<Ipv4Addr> {
    nix::ifaddrs::getifaddrs().ok()?.find_map(|ifa| {
        let ip = ifa.address?.as_sockaddr_in()?.ip();
        (!ip.is_loopback()).then_some(ip)
    })
}

/// Whether any header name starts with `x-envoy-`: one pass over the names, so
/// that a request without such headers costs no removal (each hashes the name).
pub fn has_envoy_header(headers: &HeaderMap) -> bool {
    headers
        .keys()
        .any(|k| k.as_str().as_bytes().starts_with(b"x-envoy-"))
}

/// The address `skip` entries from the end of `x-forwarded-for` and whether the
/// header holds exactly one (Envoy's `getLastAddressFromXFF`).
fn last_xff_address(headers: &HeaderMap, skip: u32) -> (Option<IpAddr>, bool) {
    let Some(xff) = headers.get(&X_FORWARDED_FOR).and_then(|v| v.to_str().ok()) else {
        return (None, false);
    };
    let entries: Vec<&str> = xff.split(',').collect();
    let single = entries.len() == 1;
    let skip = skip as usize;
    if skip >= entries.len() {
        return (None, single);
    }
    let entry = entries[entries.len() - 1 - skip].trim();
    (entry.parse().ok(), single)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn cidr(s: &str, len: u8) -> CidrRange {
        CidrRange {
            address: s.parse().unwrap(),
            prefix_len: len,
        }
    }

    fn headers(pairs: &[(&str, &str)]) -> HeaderMap {
        let mut h = HeaderMap::new();
        for (k, v) in pairs {
            h.append(
                HeaderName::from_bytes(k.as_bytes()).unwrap(),
                HeaderValue::from_str(v).unwrap(),
            );
        }
        h
    }

    const PEER: &str = "127.0.0.1:5555";

    #[test]
    fn without_internal_ranges_every_request_is_external() {
        let policy = InternalAddressPolicy::default();
        let mut h = headers(&[
            ("x-forwarded-for", "10.0.0.1"),
            ("x-envoy-retry-on", "5xx"),
            ("x-envoy-upstream-rq-timeout-ms", "1"),
            ("x-envoy-decorator-operation", "op"),
        ]);
        assert_ne!(
            policy.apply(&mut h, PEER.parse().unwrap(), false),
            Origin::Internal
        );
        assert!(h.get("x-envoy-retry-on").is_none());
        assert!(h.get("x-envoy-upstream-rq-timeout-ms").is_none());
        // Not at the edge: only the control headers go.
        assert_eq!(h.get("x-envoy-decorator-operation").unwrap(), "op");
        assert!(h.get("x-envoy-external-address").is_none());
    }

    #[test]
    fn an_edge_request_loses_more_and_gets_its_external_address() {
        let policy = InternalAddressPolicy {
            use_remote_address: true,
            ..Default::default()
        };
        let mut h = headers(&[
            ("x-envoy-decorator-operation", "op"),
            ("x-envoy-external-address", "1.2.3.4"),
        ]);
        assert_ne!(
            policy.apply(&mut h, PEER.parse().unwrap(), false),
            Origin::Internal
        );
        assert!(h.get("x-envoy-decorator-operation").is_none());
        assert_eq!(h.get("x-envoy-external-address").unwrap(), "127.0.0.1");
        // A loopback peer is appended as the node's own address, Envoy's way.
        assert_eq!(
            h.get("x-forwarded-for").unwrap(),
            local_address().to_string().as_str()
        );
        let mut h = headers(&[("x-forwarded-for", "203.0.113.7")]);
        assert_eq!(
            policy.apply(&mut h, "198.51.100.1:1".parse().unwrap(), true),
            Origin::Edge
        );
        assert_eq!(
            h.get("x-forwarded-for").unwrap(),
            "203.0.113.7,198.51.100.1"
        );
        assert_eq!(h.get("x-forwarded-proto").unwrap(), "https");
    }

    #[test]
    fn an_internal_peer_keeps_its_control_headers() {
        let policy = InternalAddressPolicy {
            use_remote_address: true,
            internal_cidrs: vec![cidr("127.0.0.0", 8)],
            ..Default::default()
        };
        let mut h = headers(&[("x-envoy-retry-on", "5xx")]);
        assert_eq!(
            policy.apply(&mut h, PEER.parse().unwrap(), false),
            Origin::Internal
        );
        assert_eq!(h.get("x-envoy-retry-on").unwrap(), "5xx");
        assert_eq!(h.get("x-envoy-internal").unwrap(), "true");
        // A forwarded request is not "single address": external.
        let mut h = headers(&[
            ("x-forwarded-for", "127.0.0.2"),
            ("x-envoy-retry-on", "5xx"),
        ]);
        assert_ne!(
            policy.apply(&mut h, PEER.parse().unwrap(), false),
            Origin::Internal
        );
        assert!(h.get("x-envoy-retry-on").is_none());
    }

    #[test]
    fn without_remote_address_the_forwarded_address_decides() {
        let policy = InternalAddressPolicy {
            internal_cidrs: vec![cidr("10.0.0.0", 8)],
            ..Default::default()
        };
        let mut h = headers(&[("x-forwarded-for", "10.1.2.3")]);
        assert_eq!(
            policy.apply(&mut h, PEER.parse().unwrap(), false),
            Origin::Internal
        );
        let mut h = headers(&[("x-forwarded-for", "8.8.8.8")]);
        assert_ne!(
            policy.apply(&mut h, PEER.parse().unwrap(), false),
            Origin::Internal
        );
        // No header at all: external, even from an internal peer.
        let mut h = HeaderMap::new();
        assert_ne!(
            policy.apply(&mut h, "10.0.0.9:1".parse().unwrap(), false),
            Origin::Internal
        );
    }
}
