//! `envoy.filters.network.http_connection_manager`: its configuration and stats.
//!
//! One [`HttpConnectionManager`] exists per listener (shared by workers, immutable
//! except for the atomically swapped route table). A downstream connection is
//! served by [`super::downstream`] on its worker; each request is an
//! [`super::active_stream::ActiveStream`], whose terminal filter is the router
//! ([`crate::router::filter`]).

use std::sync::Arc;

use arc_swap::ArcSwap;
use http::header::HeaderValue;

use super::filter::FilterChain;
use crate::access_log::{AccessLogOptions, AccessLogger};
use crate::config::{
    ClientCertDetails, CodecType, ForwardClientCert, HcmLimits, HttpConnectionManagerConfig,
    RouteSource, ServerHeaderTransformation,
};
use crate::router::RouteTable;
use crate::stats::{Counter, Gauge, Histogram, StatStore};
use crate::upstream::cluster::ClusterManager;

/// `http.<stat_prefix>.*` with Envoy's meanings.
#[derive(Debug)]
pub struct HcmStats {
    pub downstream_cx_total: Counter,
    pub downstream_cx_active: Gauge,
    pub downstream_cx_destroy: Counter,
    pub downstream_cx_http1_total: Counter,
    pub downstream_cx_http2_total: Counter,
    pub downstream_cx_http1_active: Gauge,
    pub downstream_cx_http2_active: Gauge,
    pub downstream_cx_ssl_total: Counter,
    pub downstream_cx_ssl_active: Gauge,
    pub downstream_cx_protocol_error: Counter,
    pub downstream_cx_rx_bytes_total: Counter,
    pub downstream_cx_tx_bytes_total: Counter,
    pub downstream_rq_total: Counter,
    pub downstream_rq_http1_total: Counter,
    pub downstream_rq_http2_total: Counter,
    pub downstream_rq_active: Gauge,
    pub downstream_rq_completed: Counter,
    pub downstream_rq_rx_reset: Counter,
    pub downstream_rq_time: Histogram,
    downstream_rq_class: [Counter; 5],
    /// The connection manager's timers and limits (Envoy's names).
    pub downstream_rq_idle_timeout: Counter,
    pub downstream_rq_timeout: Counter,
    pub downstream_rq_header_timeout: Counter,
    pub downstream_rq_max_duration_reached: Counter,
    pub downstream_cx_idle_timeout: Counter,
    pub downstream_cx_max_duration_reached: Counter,
    pub downstream_cx_max_requests_reached: Counter,
    pub downstream_cx_delayed_close_timeout: Counter,
    /// A request target that is not a path (`OPTIONS *`): 404.
    pub downstream_rq_non_relative_path: Counter,
    /// Path normalisation refused the path (400) or redirected to it (307).
    pub downstream_rq_failed_path_normalization: Counter,
    pub downstream_rq_redirected_with_normalized_path: Counter,
    /// The codecs' `http1.*` and `http2.*` stats (not under the stat prefix, as
    /// in Envoy).
    pub http1_dropped_headers_with_underscores: Counter,
    pub http1_requests_rejected_with_underscores_in_headers: Counter,
    pub http2_dropped_headers_with_underscores: Counter,
    pub http2_requests_rejected_with_underscores_in_headers: Counter,
    /// Router filter stats, also under `http.<stat_prefix>.`.
    pub no_route: Counter,
    pub no_cluster: Counter,
    pub rq_direct_response: Counter,
    pub rq_total: Counter,
    /// Upstream redirects a route's `internal_redirect_policy` did not follow.
    pub passthrough_internal_redirect_bad_location: Counter,
    pub passthrough_internal_redirect_unsafe_scheme: Counter,
    pub passthrough_internal_redirect_too_many_redirects: Counter,
    pub passthrough_internal_redirect_no_route: Counter,
    pub passthrough_internal_redirect_predicate: Counter,
    /// `python.errors` / `python.timeouts`: hooks that raised or overran (only
    /// registered when the connection manager has Python filters).
    pub python_errors: Counter,
    pub python_timeouts: Counter,
}

impl HcmStats {
    fn new(store: &StatStore, prefix: &str, python: bool) -> Self {
        let c = |s: &str| store.counter(&format!("http.{prefix}.{s}"));
        let g = |s: &str| store.gauge(&format!("http.{prefix}.{s}"));
        HcmStats {
            downstream_cx_total: c("downstream_cx_total"),
            downstream_cx_active: g("downstream_cx_active"),
            downstream_cx_destroy: c("downstream_cx_destroy"),
            downstream_cx_http1_total: c("downstream_cx_http1_total"),
            downstream_cx_http2_total: c("downstream_cx_http2_total"),
            downstream_cx_http1_active: g("downstream_cx_http1_active"),
            downstream_cx_http2_active: g("downstream_cx_http2_active"),
            downstream_cx_ssl_total: c("downstream_cx_ssl_total"),
            downstream_cx_ssl_active: g("downstream_cx_ssl_active"),
            downstream_cx_protocol_error: c("downstream_cx_protocol_error"),
            downstream_cx_rx_bytes_total: c("downstream_cx_rx_bytes_total"),
            downstream_cx_tx_bytes_total: c("downstream_cx_tx_bytes_total"),
            downstream_rq_total: c("downstream_rq_total"),
            downstream_rq_http1_total: c("downstream_rq_http1_total"),
            downstream_rq_http2_total: c("downstream_rq_http2_total"),
            downstream_rq_active: g("downstream_rq_active"),
            downstream_rq_completed: c("downstream_rq_completed"),
            downstream_rq_rx_reset: c("downstream_rq_rx_reset"),
            downstream_rq_time: store.histogram(&format!("http.{prefix}.downstream_rq_time")),
            downstream_rq_class: [1, 2, 3, 4, 5].map(|d| c(&format!("downstream_rq_{d}xx"))),
            downstream_rq_idle_timeout: c("downstream_rq_idle_timeout"),
            downstream_rq_timeout: c("downstream_rq_timeout"),
            downstream_rq_header_timeout: c("downstream_rq_header_timeout"),
            downstream_rq_max_duration_reached: c("downstream_rq_max_duration_reached"),
            downstream_cx_idle_timeout: c("downstream_cx_idle_timeout"),
            downstream_cx_max_duration_reached: c("downstream_cx_max_duration_reached"),
            downstream_cx_max_requests_reached: c("downstream_cx_max_requests_reached"),
            downstream_cx_delayed_close_timeout: c("downstream_cx_delayed_close_timeout"),
            downstream_rq_non_relative_path: c("downstream_rq_non_relative_path"),
            downstream_rq_failed_path_normalization: c("downstream_rq_failed_path_normalization"),
            downstream_rq_redirected_with_normalized_path: c(
                "downstream_rq_redirected_with_normalized_path",
            ),
            http1_dropped_headers_with_underscores: store
                .counter("http1.dropped_headers_with_underscores"),
            http1_requests_rejected_with_underscores_in_headers: store
                .counter("http1.requests_rejected_with_underscores_in_headers"),
            http2_dropped_headers_with_underscores: store
                .counter("http2.dropped_headers_with_underscores"),
            http2_requests_rejected_with_underscores_in_headers: store
                .counter("http2.requests_rejected_with_underscores_in_headers"),
            no_route: c("no_route"),
            no_cluster: c("no_cluster"),
            rq_direct_response: c("rq_direct_response"),
            rq_total: c("rq_total"),
            passthrough_internal_redirect_bad_location: c(
                "passthrough_internal_redirect_bad_location",
            ),
            passthrough_internal_redirect_unsafe_scheme: c(
                "passthrough_internal_redirect_unsafe_scheme",
            ),
            passthrough_internal_redirect_too_many_redirects: c(
                "passthrough_internal_redirect_too_many_redirects",
            ),
            passthrough_internal_redirect_no_route: c("passthrough_internal_redirect_no_route"),
            passthrough_internal_redirect_predicate: c("passthrough_internal_redirect_predicate"),
            python_errors: if python {
                c("python.errors")
            } else {
                Counter::default()
            },
            python_timeouts: if python {
                c("python.timeouts")
            } else {
                Counter::default()
            },
        }
    }

    pub(crate) fn response_class(&self, status: u16) {
        if (100..600).contains(&status) {
            self.downstream_rq_class[(status / 100 - 1) as usize].inc();
        }
    }
}

/// The runtime form of one listener's HTTP connection manager.
pub struct HttpConnectionManager {
    pub(crate) codec: CodecType,
    pub stat_prefix: String,
    /// `rds.route_config_name`: the table arrives later and is swapped into `routes`.
    pub rds_name: Option<String>,
    pub routes: ArcSwap<RouteTable>,
    /// `scoped_routes`: the request's headers pick the table among scopes; None
    /// for the others, whose requests use `routes`.
    pub scoped: Option<Box<crate::router::scoped::ScopedRoutes>>,
    pub clusters: Arc<ClusterManager>,
    pub stats: HcmStats,
    pub(crate) access_logs: Vec<Arc<AccessLogger>>,
    pub(crate) server_name: HeaderValue,
    pub(crate) generate_request_id: bool,
    pub(crate) use_remote_address: bool,
    /// `strip_matching_host_port` / `strip_any_host_port`.
    pub(crate) strip_host_port: crate::config::route_match::StripHostPort,
    /// Which requests are internal (and keep their `x-envoy-*` control headers).
    pub(crate) internal_policy: super::internal_request::InternalAddressPolicy,
    pub(crate) forward_client_cert: ForwardClientCert,
    pub(crate) client_cert_details: ClientCertDetails,
    /// The Python filters before the router; None on the fast path.
    pub(crate) filters: Option<Arc<dyn FilterChain>>,
    /// The native filters (fault, CORS), before the Python ones; None when none.
    pub(crate) native: Option<super::native::NativeFilters>,
    pub(crate) limits: HcmLimits,
    pub(crate) edits: HeaderEdits,
    /// `upgrade_configs` and the upgrade stats.
    pub(crate) upgrades: super::upgrade::Upgrades,
}

/// The connection manager's own header edits, precomputed (Envoy's
/// `mutateRequestHeaders` / `mutateResponseHeaders` options).
#[derive(Debug, Default)]
pub(crate) struct HeaderEdits {
    /// `via`: appended to request and response.
    pub via: Option<HeaderValue>,
    pub server_header: ServerHeaderTransformation,
    pub preserve_external_request_id: bool,
    pub always_set_request_id_in_response: bool,
    /// `http_protocol_options.default_host_for_http_10`.
    pub default_host_for_http_10: Option<HeaderValue>,
    /// `normalize_path`, `merge_slashes`, `path_with_escaped_slashes_action`.
    pub paths: super::path_normalization::PathNormalization,
    /// `local_reply_config`.
    pub local_reply: Option<super::local_reply::LocalReplyConfig>,
}

impl HttpConnectionManager {
    pub fn new(
        config: HttpConnectionManagerConfig,
        clusters: Arc<ClusterManager>,
        store: &Arc<StatStore>,
        filters: Option<Arc<dyn FilterChain>>,
        log_options: AccessLogOptions,
    ) -> std::io::Result<Arc<Self>> {
        let native =
            super::native::NativeFilters::new(&config.native_filters.0, store, &config.stat_prefix);
        let access_logs = config
            .access_logs
            .iter()
            .map(|c| {
                let grpc = crate::access_log::GrpcLogContext {
                    clusters: &clusters,
                    store,
                };
                AccessLogger::open(c, log_options, Some(grpc))
            })
            .collect::<std::io::Result<Vec<_>>>()?;
        let options = *config.options;
        let header = |v: Option<String>| v.and_then(|v| HeaderValue::from_str(&v).ok());
        let (table, rds_name, scoped) = match config.routes {
            RouteSource::Inline(rc) => (RouteTable::new(rc), None, None),
            RouteSource::Rds(name) => (RouteTable::empty(&name), Some(name), None),
            RouteSource::Scoped(sr) => {
                let scoped =
                    crate::router::scoped::ScopedRoutes::new(*sr, store, &config.stat_prefix);
                (RouteTable::empty(""), None, Some(Box::new(scoped)))
            }
        };
        let upgrades = super::upgrade::Upgrades::new(config.upgrades, store, &config.stat_prefix);
        Ok(Arc::new(HttpConnectionManager {
            codec: config.codec,
            stats: HcmStats::new(store, &config.stat_prefix, filters.is_some()),
            stat_prefix: config.stat_prefix,
            rds_name,
            routes: ArcSwap::new(table),
            scoped,
            clusters,
            access_logs,
            server_name: HeaderValue::from_str(&config.server_name)
                .unwrap_or_else(|_| HeaderValue::from_static("envoy")),
            generate_request_id: config.generate_request_id,
            use_remote_address: config.use_remote_address,
            strip_host_port: config.strip_host_port,
            internal_policy: super::internal_request::InternalAddressPolicy {
                use_remote_address: config.use_remote_address,
                xff_num_trusted_hops: config.xff_num_trusted_hops,
                internal_cidrs: config.internal_cidrs,
                skip_xff_append: options.skip_xff_append,
                scheme_to_overwrite: header(options.scheme_to_overwrite),
            },
            forward_client_cert: config.forward_client_cert,
            client_cert_details: config.client_cert_details,
            filters,
            native,
            limits: *config.limits,
            edits: HeaderEdits {
                via: header(options.via),
                server_header: options.server_header,
                preserve_external_request_id: options.preserve_external_request_id,
                always_set_request_id_in_response: options.always_set_request_id_in_response,
                default_host_for_http_10: header(options.default_host_for_http_10),
                local_reply: options.local_reply,
                paths: super::path_normalization::PathNormalization {
                    normalize_path: options.normalize_path,
                    merge_slashes: options.merge_slashes,
                    escaped_slashes: options.escaped_slashes,
                },
            },
            upgrades,
        }))
    }

    /// The `server` header value as text (for replies the framing guard writes).
    pub fn server_name(&self) -> &str {
        self.server_name.to_str().unwrap_or("envoy")
    }
}
