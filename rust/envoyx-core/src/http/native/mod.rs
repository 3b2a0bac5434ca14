//! The HTTP filters envoyx implements in Rust (Envoy's `envoy.filters.http.fault`,
//! `envoy.filters.http.cors` and `envoy.filters.http.grpc_stats`), on the
//! [`NativeFilter`] trait.
//!
//! Python filters ([`super::filter`]) run on the executor thread and are awaited
//! through a channel; these run on the worker, inside the request's own task, before
//! the Python filters and the router, in the order of `http_filters`. A filter keeps
//! what a request needs after its request headers (a CORS origin, an active fault) in
//! the request's [`NativeState`], boxed only when a filter sets something, so a
//! request that no filter acts on allocates nothing.

pub(crate) mod cors;
pub(crate) mod fault;
pub(crate) mod grpc_stats;

use std::sync::Arc;
use std::time::Duration;

use http::HeaderMap;

use super::body::{PeerBody, ProxyBody};
use super::local_reply::LocalReply;
use crate::access_log::LogRecord;
use crate::config::native_filters::{NativeFilterKind, NativeFilterSpec, NativeOverride};
use crate::config::{FilterOverride, RouteAction, RouteEntry};
use crate::router::route_match::RouteRequest;
use crate::stats::StatStore;

/// What a filter decided on the request headers (Envoy's `FilterHeadersStatus`).
pub(crate) enum Decode {
    Continue,
    /// Hold the request this long, then ask [`NativeFilter::after_delay`].
    Delay(Duration),
    /// Answer the request from the proxy (the filters after it do not run).
    Reply(LocalReply),
}

/// The request as a filter sees it.
pub(crate) struct DecodeRequest<'a> {
    pub req: RouteRequest<'a>,
    pub route: Option<&'a RouteEntry>,
    pub state: &'a mut Option<Box<NativeState>>,
}

impl DecodeRequest<'_> {
    /// The cluster the route sends to (empty: none, or chosen per request).
    pub fn route_cluster(&self) -> &str {
        match self.route.map(|r| &r.action) {
            Some(RouteAction::Forward(f)) => &f.cluster,
            _ => "",
        }
    }

    pub fn state(&mut self) -> &mut NativeState {
        self.state.get_or_insert_with(Default::default)
    }
}

/// A filter compiled into the core. `over` is the route's `typed_per_filter_config`
/// for the filter's name, if any.
pub(crate) trait NativeFilter: Send + Sync {
    /// The request headers (Envoy's `decodeHeaders`).
    fn decode_headers(&self, cx: &mut DecodeRequest<'_>, over: Option<&NativeOverride>) -> Decode;

    /// After the delay asked for by [`Decode::Delay`]: answer, or go on (None).
    fn after_delay(
        &self,
        _cx: &mut DecodeRequest<'_>,
        _over: Option<&NativeOverride>,
    ) -> Option<LocalReply> {
        None
    }
}

/// What the native filters keep of one request.
#[derive(Default)]
pub(crate) struct NativeState {
    /// The origin the CORS filter accepted, and its policy (for the response).
    pub cors: Option<cors::Latched>,
    /// A fault counted in `fault.active_faults` until the request is done with it.
    pub fault: Option<fault::ActiveFault>,
    /// A gRPC call whose stats the gRPC stats filter keeps.
    pub grpc: Option<std::rc::Rc<grpc_stats::GrpcCall>>,
}

impl NativeState {
    /// The response headers (Envoy's `encodeHeaders`), for every response the
    /// request gets: the upstream's or a local reply.
    pub fn encode_headers(&self, headers: &mut HeaderMap) {
        if let Some(c) = &self.cors {
            c.encode_headers(headers);
        }
        if let Some(g) = &self.grpc {
            g.on_response_headers(headers);
        }
    }

    /// The request body as it goes upstream.
    pub fn decode_body(&self, body: PeerBody) -> PeerBody {
        match &self.grpc {
            Some(g) => g.inspect_request(body),
            None => body,
        }
    }

    /// The upstream's response body, after [`Self::encode_headers`].
    pub fn encode_body(&self, body: ProxyBody) -> ProxyBody {
        match (&self.grpc, body) {
            (Some(g), ProxyBody::Stream(b)) => ProxyBody::Stream(g.inspect_response(b)),
            (_, body) => body,
        }
    }
}

/// A local reply's `%RESPONSE_FLAGS%` after those a filter set earlier (a fault's
/// delay, `DI`): Envoy 1.40 keeps every flag of a request, in the order they were set.
pub(crate) fn with_earlier_flags(earlier: &'static str, reply: &'static str) -> &'static str {
    match (earlier, reply) {
        ("DI", r) => match r {
            "-" => "DI",
            "UH" => "DI,UH",
            "UT" => "DI,UT",
            "UR" => "DI,UR",
            "UF" => "DI,UF",
            "UC" => "DI,UC",
            "UO" => "DI,UO",
            "NR" => "DI,NR",
            "SI" => "DI,SI",
            "DPE" => "DI,DPE",
            r => r,
        },
        (_, r) => r,
    }
}

/// The native filters of one connection manager, in order.
pub(crate) struct NativeFilters {
    filters: Vec<(String, Box<dyn NativeFilter>)>,
}

impl NativeFilters {
    /// None when the connection manager has none (the request path skips them).
    pub fn new(
        specs: &[NativeFilterSpec],
        store: &Arc<StatStore>,
        stat_prefix: &str,
    ) -> Option<NativeFilters> {
        if specs.is_empty() {
            return None;
        }
        // Envoy's filter stats live under the connection manager's prefix.
        let prefix = format!("http.{stat_prefix}.");
        let filters = specs
            .iter()
            .map(|spec| {
                let filter: Box<dyn NativeFilter> = match &spec.kind {
                    NativeFilterKind::Fault(config) => {
                        Box::new(fault::FaultFilter::new(config.clone(), store, &prefix))
                    }
                    NativeFilterKind::Cors => Box::new(cors::CorsFilter::new(store, &prefix)),
                    NativeFilterKind::GrpcStats(config) => {
                        Box::new(grpc_stats::GrpcStatsFilter::new(config.clone(), store))
                    }
                };
                (spec.name.clone(), filter)
            })
            .collect();
        Some(NativeFilters { filters })
    }

    /// Runs the filters' request-headers steps in order; `Err` is the reply that
    /// ends the request. A delay sets `DI` on the access-log record.
    pub async fn decode(
        &self,
        req: RouteRequest<'_>,
        route: Option<&RouteEntry>,
        state: &mut Option<Box<NativeState>>,
        record: &mut Option<Box<LogRecord>>,
    ) -> Result<(), LocalReply> {
        let cx = &mut DecodeRequest { req, route, state };
        for (name, filter) in &self.filters {
            let over = match cx
                .route
                .and_then(|r| r.filter_overrides.iter().find(|(n, _)| n == name))
            {
                Some((_, FilterOverride::Disabled)) => continue,
                Some((_, FilterOverride::Native(o))) => Some(o),
                _ => None,
            };
            match filter.decode_headers(cx, over) {
                Decode::Continue => {}
                Decode::Reply(reply) => return Err(reply),
                Decode::Delay(d) => {
                    if let Some(r) = record.as_mut() {
                        r.response_flags = "DI";
                    }
                    tokio::time::sleep(d).await;
                    if let Some(reply) = filter.after_delay(cx, over) {
                        return Err(reply);
                    }
                }
            }
        }
        Ok(())
    }
}
