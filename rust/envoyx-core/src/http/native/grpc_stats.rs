//! `envoy.filters.http.grpc_stats`: per-call counters of gRPC requests under the
//! route's cluster, as Envoy's `grpc_stats_filter.cc` and `Grpc::ContextImpl` name
//! them: `cluster.<c>.grpc[.<service>.<method>].{<status>, success, failure, total,
//! request_message_count, response_message_count}`.

use std::cell::Cell;
use std::collections::HashMap;
use std::rc::Rc;
use std::sync::{Arc, Mutex};

use bytes::Bytes;
use http::HeaderMap;
use http_body::Frame;

use super::{Decode, DecodeRequest, NativeFilter};
use crate::config::native_filters::{GrpcStatsConfig, NativeOverride};
use crate::http::body::{FrameInspector, InspectedBody, PeerBody};
use crate::http::headers::GRPC_STATUS;
use crate::stats::{Counter, StatStore};

pub(crate) struct GrpcStatsFilter {
    config: Arc<GrpcStatsConfig>,
    store: Arc<StatStore>,
    /// The counters of each stat prefix met so far: a call looks its method up
    /// once instead of registering five names.
    methods: Mutex<HashMap<String, Arc<MethodStats>>>,
}

struct MethodStats {
    /// `cluster.<c>.grpc.` or `cluster.<c>.grpc.<service>.<method>.`.
    prefix: String,
    success: Counter,
    failure: Counter,
    total: Counter,
    request_message_count: Counter,
    response_message_count: Counter,
}

/// One tracked gRPC call.
pub(crate) struct GrpcCall {
    stats: Arc<MethodStats>,
    store: Arc<StatStore>,
    /// The response's `content-type` is gRPC: its messages are counted.
    grpc_response: Cell<bool>,
}

impl GrpcCall {
    /// Envoy's `chargeStat`: the status's own counter, success or failure, total.
    fn charge(&self, status: &http::HeaderValue) {
        let s = String::from_utf8_lossy(status.as_bytes());
        let stats = &self.stats;
        self.store.counter(&format!("{}{s}", stats.prefix)).inc();
        if s == "0" {
            stats.success.inc();
        } else {
            stats.failure.inc();
        }
        stats.total.inc();
    }

    /// The response headers (an upstream's, or a local reply's): a trailers-only
    /// response carries its `grpc-status` here.
    pub fn on_response_headers(&self, headers: &HeaderMap) {
        if let Some(status) = headers.get(&GRPC_STATUS) {
            self.charge(status);
        }
        self.grpc_response
            .set(crate::router::route_match::is_grpc_content_type(headers));
    }

    /// The request body, its messages counted as they go upstream.
    pub fn inspect_request(self: &Rc<Self>, body: PeerBody) -> PeerBody {
        inspect(body, self.clone(), false)
    }

    /// The upstream's response body (messages, then the trailers' status).
    pub fn inspect_response(self: &Rc<Self>, body: PeerBody) -> PeerBody {
        if self.grpc_response.get() {
            inspect(body, self.clone(), true)
        } else {
            body
        }
    }
}

fn inspect(inner: PeerBody, call: Rc<GrpcCall>, response: bool) -> PeerBody {
    PeerBody::Inspected(Box::new(InspectedBody {
        inner,
        inspector: Box::new(Messages {
            call,
            response,
            header_left: 0,
            payload_left: 0,
            length: [0; 4],
        }),
    }))
}

/// Counts gRPC messages (a 5-byte prefix: flags, 4-byte length; then the
/// payload) across data frames however they are split, as Envoy's
/// `FrameInspector`: a message counts when its first byte is seen.
struct Messages {
    call: Rc<GrpcCall>,
    response: bool,
    /// Bytes of the current message's 5-byte prefix still to read (0: none).
    header_left: u8,
    payload_left: u64,
    length: [u8; 4],
}

impl Messages {
    fn count(&mut self, mut data: &[u8]) -> u64 {
        let mut new = 0;
        while !data.is_empty() {
            if self.header_left == 0 && self.payload_left > 0 {
                let take = self.payload_left.min(data.len() as u64);
                self.payload_left -= take;
                data = &data[take as usize..];
                continue;
            }
            if self.header_left == 0 {
                new += 1;
                self.header_left = 5;
            }
            let at = 5 - self.header_left;
            if at > 0 {
                self.length[usize::from(at) - 1] = data[0];
            }
            self.header_left -= 1;
            data = &data[1..];
            if self.header_left == 0 {
                self.payload_left = u64::from(u32::from_be_bytes(self.length));
            }
        }
        new
    }
}

impl FrameInspector for Messages {
    fn frame(&mut self, frame: &Frame<Bytes>) {
        if let Some(data) = frame.data_ref() {
            let n = self.count(data);
            if n > 0 {
                let stats = &self.call.stats;
                if self.response {
                    stats.response_message_count.add(n);
                } else {
                    stats.request_message_count.add(n);
                }
            }
        } else if let Some(trailers) = frame.trailers_ref()
            && self.response
            && let Some(status) = trailers.get(&GRPC_STATUS)
        {
            self.call.charge(status);
        }
    }
}

impl GrpcStatsFilter {
    pub fn new(config: Arc<GrpcStatsConfig>, store: &Arc<StatStore>) -> GrpcStatsFilter {
        GrpcStatsFilter {
            config,
            store: store.clone(),
            methods: Mutex::new(HashMap::new()),
        }
    }

    fn method_stats(&self, prefix: String) -> Arc<MethodStats> {
        let mut methods = self.methods.lock().unwrap_or_else(|e| e.into_inner());
        if let Some(m) = methods.get(&prefix) {
            return m.clone();
        }
        let c = |s: &str| self.store.counter(&format!("{prefix}{s}"));
        let stats = Arc::new(MethodStats {
            success: c("success"),
            failure: c("failure"),
            total: c("total"),
            request_message_count: c("request_message_count"),
            response_message_count: c("response_message_count"),
            prefix: prefix.clone(),
        });
        methods.insert(prefix, stats.clone());
        stats
    }
}

/// Envoy's `resolveServiceAndMethod`: `/<service>/<method>` (empty segments
/// dropped, the query ignored), else nothing.
fn service_and_method(path: &str) -> Option<(&str, &str)> {
    let path = path.split('?').next().unwrap_or_default();
    let mut parts = path.split('/').filter(|p| !p.is_empty());
    let (service, method) = (parts.next()?, parts.next()?);
    parts.next().is_none().then_some((service, method))
}

impl NativeFilter for GrpcStatsFilter {
    fn decode_headers(&self, cx: &mut DecodeRequest<'_>, _: Option<&NativeOverride>) -> Decode {
        if !crate::router::route_match::is_grpc_content_type(cx.req.headers) {
            return Decode::Continue;
        }
        let cluster = cx.route_cluster();
        if cluster.is_empty() {
            return Decode::Continue;
        }
        let Some((service, method)) = service_and_method(cx.req.path) else {
            return Decode::Continue;
        };
        let config = &self.config;
        let prefix = if config.stats_for_all_methods {
            let service = if config.replace_dots_in_service_name {
                service.replace('.', "_")
            } else {
                service.to_string()
            };
            format!("cluster.{cluster}.grpc.{service}.{method}.")
        } else if config
            .allowlist
            .iter()
            .any(|(s, m)| s == service && m == method)
        {
            format!("cluster.{cluster}.grpc.{service}.{method}.")
        } else {
            // Tracked all the same, without the method in the names.
            format!("cluster.{cluster}.grpc.")
        };
        let call = Rc::new(GrpcCall {
            stats: self.method_stats(prefix),
            store: self.store.clone(),
            grpc_response: Cell::new(false),
        });
        cx.state().grpc = Some(call);
        Decode::Continue
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn service_and_method_as_envoy_resolves_them() {
        assert_eq!(
            service_and_method("/pkg.Svc/Call"),
            Some(("pkg.Svc", "Call"))
        );
        assert_eq!(
            service_and_method("//pkg.Svc//Call?x=1"),
            Some(("pkg.Svc", "Call"))
        );
        assert_eq!(service_and_method("/pkg.Svc"), None);
        assert_eq!(service_and_method("/a/b/c"), None);
    }

    #[test]
    fn messages_are_counted_across_splits() {
        let call = Rc::new(GrpcCall {
            stats: Arc::new(MethodStats {
                prefix: String::new(),
                success: Counter::default(),
                failure: Counter::default(),
                total: Counter::default(),
                request_message_count: Counter::default(),
                response_message_count: Counter::default(),
            }),
            store: StatStore::new(),
            grpc_response: Cell::new(true),
        });
        let mut m = Messages {
            call,
            response: false,
            header_left: 0,
            payload_left: 0,
            length: [0; 4],
        };
        // Three messages: 3 bytes, 0 bytes, 2 bytes.
        let wire = [
            0, 0, 0, 0, 3, b'a', b'b', b'c', 0, 0, 0, 0, 0, 1, 0, 0, 0, 2, b'x', b'y',
        ];
        assert_eq!(m.count(&wire), 3);
        for split in 1..wire.len() {
            let (a, b) = wire.split_at(split);
            assert_eq!(m.count(a) + m.count(b), 3, "split at {split}");
        }
    }
}
