//! Request mirroring (Envoy's shadowing): a copy of the request goes to another
//! cluster with `-shadow` appended to its host; its answer is read and dropped.
//! The copy runs as its own task, so the client's request never waits for it and
//! nothing the shadow does (refuse, hang, fail) changes the client's answer.

use std::rc::Rc;
use std::time::Duration;

use http::header::{self, HeaderValue};
use http::{HeaderMap, Uri};
use http_body_util::BodyExt;

use super::upstream_request::UpstreamRequest;
use crate::config::route_action::{MirrorCluster, MirrorPolicy};
use crate::http::body::{ProxyBody, ReplayBuffer};
use crate::http::internal_request::X_ENVOY_INTERNAL;
use crate::per_worker::LocalHandle;
use crate::upstream::lb::LbContext;
use crate::upstream::{Cluster, ClusterManager, WorkerPools};

/// The shadow requests of one request: the policies whose fraction is met, with
/// the cluster each names.
pub fn active<'a>(
    policies: &'a [MirrorPolicy],
    headers: &'a HeaderMap,
) -> Vec<(&'a MirrorPolicy, &'a str)> {
    policies
        .iter()
        .filter(|p| match p.fraction {
            None => true,
            Some((numerator, denominator)) => rand::random::<u64>() % denominator < numerator,
        })
        .filter_map(|p| {
            let cluster = match &p.cluster {
                MirrorCluster::Name(n) => n.as_str(),
                MirrorCluster::Header(h) => headers.get(h)?.to_str().ok()?,
            };
            (!cluster.is_empty()).then_some((p, cluster))
        })
        .collect()
}

/// Starts one shadow request. `head` is the request as it goes upstream in
/// HTTP/1.1 form (rewrites applied, `Host` set); `body` the shared copy of the
/// request body (None: no body).
pub fn spawn(
    clusters: &ClusterManager,
    pools: &Rc<WorkerPools>,
    policy: &MirrorPolicy,
    cluster: &str,
    mut head: http::request::Parts,
    body: Option<ReplayBuffer>,
    timeout: Option<Duration>,
) {
    // A cluster removed since the configuration was checked: nothing is sent, as
    // in Envoy.
    let Some(cluster) = clusters.get(cluster).map(LocalHandle::new) else {
        return;
    };
    if !policy.keep_host
        && let Some(host) = head.headers.get(header::HOST).and_then(|h| h.to_str().ok())
        && let Ok(v) = HeaderValue::from_str(&shadow_host(host))
    {
        head.headers.insert(header::HOST, v);
    }
    // Envoy's shadow goes through its async client, which marks it internal.
    // (It also appends the server's own address to `x-forwarded-for`; envoyx
    // does not.)
    head.headers
        .insert(X_ENVOY_INTERNAL.clone(), HeaderValue::from_static("true"));
    let pools = pools.clone();
    tokio::task::spawn_local(async move {
        let body = match body {
            Some(buffer) => buffer.shadow_body(),
            None => ProxyBody::Empty,
        };
        send(cluster, pools, head, body, timeout).await;
    });
}

/// `host-shadow`, or `host-shadow:port` (Envoy's shadow writer).
fn shadow_host(host: &str) -> String {
    match host.split_once(':') {
        Some((name, port)) if !port.contains(':') => format!("{name}-shadow:{port}"),
        _ => format!("{host}-shadow"),
    }
}

async fn send(
    cluster: LocalHandle<Cluster>,
    pools: Rc<WorkerPools>,
    head: http::request::Parts,
    body: ProxyBody,
    timeout: Option<Duration>,
) {
    // Envoy's shadows go through its async client, whose routes have the
    // default priority.
    let upstream = UpstreamRequest {
        cluster: &cluster,
        pools: &pools,
        priority: crate::config::circuit_breakers::Priority::Default,
    };
    let context = LbContext {
        previous_hosts: &[],
        host_selection_attempts: 1,
        hash: None,
        headers: Some(&head.headers),
        // A shadow goes through Envoy's async client: no downstream connection.
        restored_local_address: None,
    };
    let Ok(host) = upstream.choose_host(&context) else {
        return;
    };
    let tls = cluster.tls.is_some();
    let sni = cluster.tls.as_ref().and_then(|t| {
        let host = head.headers.get(header::HOST).and_then(|h| h.to_str().ok());
        t.sni_for(host)
    });
    let deadline = timeout.map(|t| tokio::time::Instant::now() + t);
    let Ok(resp) = upstream
        .send(&host, sni, head, body, timeout, |p, h2| {
            if h2 {
                to_h2_form(p, tls);
            }
        })
        .await
    else {
        return;
    };
    cluster.stats.response(resp.response.status().as_u16());
    let (_, incoming) = resp.response.into_parts();
    let mut handle = resp.handle;
    let drained = async {
        let mut incoming = incoming;
        while let Some(frame) = incoming.frame().await {
            if frame.is_err() {
                return false;
            }
        }
        true
    };
    let complete = match deadline {
        Some(d) => tokio::time::timeout_at(d, drained).await.unwrap_or(false),
        None => drained.await,
    };
    if complete {
        handle.finish(crate::http::body::StreamEnd::Complete);
    } else {
        handle.forgo_reuse();
    }
}

/// An HTTP/1.1-form head (origin-form target, `Host`) in HTTP/2 form.
fn to_h2_form(p: &mut http::request::Parts, tls: bool) {
    let Some(host) = p.headers.remove(header::HOST) else {
        return;
    };
    let path = p.uri.path_and_query().map_or("/", |pq| pq.as_str());
    if let Ok(uri) = Uri::builder()
        .scheme(if tls { "https" } else { "http" })
        .authority(host.as_bytes())
        .path_and_query(path)
        .build()
    {
        p.uri = uri;
    }
}
