//! The gRPC checker (Envoy's `GrpcHealthCheckerImpl`): `grpc.health.v1.Health/Check`
//! over HTTP/2; the host passes when it answers `SERVING` with grpc-status 0.

use std::sync::Arc;

use bytes::{BufMut, Bytes, BytesMut};
use http::{HeaderValue, Method, Request, header};
use http_body_util::{BodyExt, Full};

use super::Outcome;
use super::http::{Conn, authority, uri};
use crate::config::health_check::GrpcHealthCheck;
use crate::http::headers::GRPC_STATUS;
use crate::upstream::cluster::{Cluster, Host};

const PATH: &str = "/grpc.health.v1.Health/Check";
/// `HealthCheckResponse.ServingStatus.SERVING`.
const SERVING: u64 = 1;
/// Larger answers are not a health check response.
const MAX_RESPONSE: usize = 64 * 1024;

/// A length-prefixed gRPC message of `HealthCheckRequest { service = 1 }`.
fn request_body(service: &str) -> Bytes {
    let mut msg = BytesMut::new();
    if !service.is_empty() {
        msg.put_u8(0x0a);
        put_varint(&mut msg, service.len() as u64);
        msg.put_slice(service.as_bytes());
    }
    let mut framed = BytesMut::with_capacity(5 + msg.len());
    framed.put_u8(0);
    framed.put_u32(msg.len() as u32);
    framed.put_slice(&msg);
    framed.freeze()
}

fn put_varint(buf: &mut BytesMut, mut v: u64) {
    while v >= 0x80 {
        buf.put_u8((v as u8) | 0x80);
        v >>= 7;
    }
    buf.put_u8(v as u8);
}

fn read_varint(buf: &[u8], pos: &mut usize) -> Option<u64> {
    let mut v = 0u64;
    for shift in (0..64).step_by(7) {
        let b = *buf.get(*pos)?;
        *pos += 1;
        v |= u64::from(b & 0x7f) << shift;
        if b & 0x80 == 0 {
            return Some(v);
        }
    }
    None
}

/// `HealthCheckResponse.status` of one uncompressed gRPC message (0 when absent).
fn serving_status(framed: &[u8]) -> Option<u64> {
    if framed.len() < 5 || framed[0] != 0 {
        return None;
    }
    let len = u32::from_be_bytes(framed[1..5].try_into().ok()?) as usize;
    let msg = framed.get(5..5 + len)?;
    let (mut pos, mut status) = (0, 0);
    while pos < msg.len() {
        let tag = read_varint(msg, &mut pos)?;
        match (tag >> 3, tag & 7) {
            (1, 0) => status = read_varint(msg, &mut pos)?,
            (_, 0) => {
                read_varint(msg, &mut pos)?;
            }
            (_, 2) => {
                let n = read_varint(msg, &mut pos)? as usize;
                pos = pos.checked_add(n).filter(|p| *p <= msg.len())?;
            }
            (_, 1) => pos += 8,
            (_, 5) => pos += 4,
            _ => return None,
        }
    }
    Some(status)
}

/// One check; returns the connection when it may be used again.
pub(super) async fn check(
    cluster: &Arc<Cluster>,
    host: &Arc<Host>,
    config: &GrpcHealthCheck,
    conn: Option<Conn>,
) -> (Outcome, Option<Conn>) {
    let mut conn = match conn.filter(|c| !c.is_closed()) {
        Some(c) => c,
        None => match Conn::open(cluster, host, true).await {
            Some(c) => c,
            None => return (Outcome::NETWORK, None),
        },
    };
    let authority = authority(cluster, config.authority.as_deref());
    let mut req = Request::builder()
        .method(Method::POST)
        .uri(uri(cluster, true, authority, PATH))
        .body(Full::new(request_body(&config.service_name)))
        .expect("a request from checked parts");
    let h = req.headers_mut();
    h.insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static("application/grpc"),
    );
    h.insert(header::TE, HeaderValue::from_static("trailers"));
    h.insert(header::USER_AGENT, HeaderValue::from_static("Envoy/HC"));
    for (name, value, append) in &config.initial_metadata {
        if *append {
            h.append(name.clone(), value.clone());
        } else {
            h.insert(name.clone(), value.clone());
        }
    }
    let Some(response) = conn.send(req).await else {
        return (Outcome::NETWORK, None);
    };
    let (parts, mut body) = response.into_parts();
    let mut data = Vec::new();
    let mut grpc_status = parts.headers.get(&GRPC_STATUS).cloned();
    while let Some(frame) = body.frame().await {
        let Ok(frame) = frame else {
            return (Outcome::NETWORK, None);
        };
        match frame.into_data() {
            Ok(d) if data.len() + d.len() <= MAX_RESPONSE => data.extend_from_slice(&d),
            Ok(_) => return (Outcome::ACTIVE, None),
            Err(frame) => {
                if let Some(t) = frame.trailers_ref() {
                    grpc_status = t.get(&GRPC_STATUS).cloned().or(grpc_status);
                }
            }
        }
    }
    let ok = parts.status == http::StatusCode::OK
        && grpc_status.as_ref().is_some_and(|s| s.as_bytes() == b"0")
        && serving_status(&data) == Some(SERVING);
    let outcome = if ok {
        Outcome::Healthy { degraded: false }
    } else {
        Outcome::ACTIVE
    };
    (outcome, Some(conn))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn request_and_response_messages() {
        assert_eq!(&request_body("")[..], &[0, 0, 0, 0, 0]);
        assert_eq!(
            &request_body("ab")[..],
            &[0, 0, 0, 0, 4, 0x0a, 2, b'a', b'b']
        );
        assert_eq!(serving_status(&[0, 0, 0, 0, 2, 0x08, 1]), Some(1));
        assert_eq!(serving_status(&[0, 0, 0, 0, 0]), Some(0));
        assert_eq!(serving_status(&[0, 0, 0, 0, 9, 0x08]), None);
        assert_eq!(serving_status(&[1, 0]), None);
    }
}
