//! The HTTP filter extension point: filters that run before the router.
//!
//! The core knows filters only through these traits. The Python bindings implement
//! them (rust/envoyx-py/src/filters.rs): a [`FilterFactory`] builds one
//! [`FilterChain`] per HTTP connection manager from its `http_filters`, the chain
//! starts one [`FilterStream`] per request whose route has active filters, and each
//! hook phase of that request is one [`FilterStream::call`] whose future the worker
//! awaits — the worker never runs filter code itself.
//!
//! Requests on routes where no filter is active never build a stream.

use std::future::Future;
use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use http::HeaderMap;
use http::header::{HeaderName, HeaderValue};

use crate::access_log::LogRecord;
pub use crate::config::FilterSettings;
use crate::config::{FilterOverride, HttpFilterSpec, RouteEntry};
use crate::stats::StatStore;

/// The hook phases of a request, in the order they run. The numbering is shared with
/// `envoyx.filters` (Python).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
#[repr(u8)]
pub enum Phase {
    RequestHeaders = 0,
    RequestBody = 1,
    RequestTrailers = 2,
    ResponseHeaders = 3,
    ResponseBody = 4,
    ResponseTrailers = 5,
    Log = 6,
}

/// A set of phases, one bit per [`Phase`]: the hooks a filter overrides.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Hooks(pub u8);

impl Hooks {
    pub fn has(self, phase: Phase) -> bool {
        self.0 & (1 << phase as u8) != 0
    }
    pub fn is_empty(self) -> bool {
        self.0 == 0
    }
    /// The request body must be buffered: a body or trailers hook wants it whole.
    pub fn buffers_request(self) -> bool {
        self.has(Phase::RequestBody) || self.has(Phase::RequestTrailers)
    }
    pub fn buffers_response(self) -> bool {
        self.has(Phase::ResponseBody) || self.has(Phase::ResponseTrailers)
    }
}

impl std::ops::BitOr for Hooks {
    type Output = Hooks;
    fn bitor(self, rhs: Hooks) -> Hooks {
        Hooks(self.0 | rhs.0)
    }
}

/// One filter of a chain as the core sees it.
#[derive(Debug, Clone)]
pub struct FilterInfo {
    /// The HTTP filter's `name`, the key of `typed_per_filter_config`.
    pub name: String,
    pub hooks: Hooks,
    pub settings: FilterSettings,
}

/// A filter active on one request, with its route's config override (JSON text).
#[derive(Debug, Clone)]
pub struct ActiveFilter {
    pub index: usize,
    pub config_override: Option<Arc<str>>,
}

/// What a stream starts with: the request as routed.
#[derive(Debug)]
pub struct StreamStart {
    pub method: String,
    pub path: String,
    pub authority: String,
    pub scheme: &'static str,
    pub downstream: SocketAddr,
    pub route_name: Option<String>,
    pub cluster: Option<String>,
    pub active: Vec<ActiveFilter>,
    /// A copy of the request headers when no request-headers hook will get them, so
    /// that later hooks can read them.
    pub request_headers: Option<HeaderMap>,
}

/// One hook phase's input. `headers` are the request or response headers, or the
/// trailers, of the phase; `status` is the response status in response phases.
#[derive(Debug)]
pub struct HookCall {
    pub phase: Phase,
    pub headers: Option<HeaderMap>,
    /// In response body and trailers phases, a copy of the response headers when
    /// the stream has not had them (no response-headers hook).
    pub message_headers: Option<HeaderMap>,
    pub status: u16,
    pub body: Option<Bytes>,
}

/// How a phase ended.
#[derive(Debug)]
pub enum HookOutcome {
    /// Go on, with the phase's headers (possibly edited), the body (for body phases),
    /// and the cluster the filters chose (request phases).
    Continue {
        headers: Option<HeaderMap>,
        body: Option<Bytes>,
        cluster: Option<String>,
    },
    /// Answer the request from the proxy.
    LocalReply {
        status: u16,
        headers: Vec<(HeaderName, HeaderValue)>,
        body: Bytes,
    },
    /// A hook raised (the filter has logged why).
    Failed { filter: String },
    /// A hook took longer than its timeout.
    TimedOut,
}

pub type HookFuture = Pin<Box<dyn Future<Output = HookOutcome> + Send>>;

/// The filters of one HTTP connection manager.
pub trait FilterChain: Send + Sync {
    fn filters(&self) -> &[FilterInfo];
    fn start(&self, start: StreamStart) -> Arc<dyn FilterStream>;
}

/// One request's run through a chain.
pub trait FilterStream: Send + Sync {
    fn call(self: Arc<Self>, call: HookCall) -> HookFuture;
    /// The finished request, for `on_log` hooks; nothing is awaited.
    fn log(self: Arc<Self>, record: LogRecord);
}

/// Builds chains from configuration (given to the server by the bindings).
pub trait FilterFactory: Send + Sync {
    /// Every problem as `"<field path>: <message>"`.
    fn build(
        &self,
        specs: &[HttpFilterSpec],
        store: &Arc<StatStore>,
    ) -> Result<Arc<dyn FilterChain>, Vec<String>>;
}

/// The filters active on one route and what they need, computed per request from
/// the chain and the route's `typed_per_filter_config`.
pub struct FilterPlan {
    pub active: Vec<ActiveFilter>,
    pub hooks: Hooks,
    /// The sum of the active filters' timeouts: a whole phase may take that long.
    pub timeout: Duration,
    pub max_request_bytes: usize,
    pub max_response_bytes: usize,
}

impl FilterPlan {
    /// None when no filter is active on the route (the request never touches them).
    pub fn new(chain: &dyn FilterChain, route: Option<&RouteEntry>) -> Option<FilterPlan> {
        let mut plan = FilterPlan {
            active: Vec::new(),
            hooks: Hooks::default(),
            timeout: Duration::ZERO,
            max_request_bytes: usize::MAX,
            max_response_bytes: usize::MAX,
        };
        for (index, info) in chain.filters().iter().enumerate() {
            let over = route.and_then(|r| {
                r.filter_overrides
                    .iter()
                    .find(|(name, _)| *name == info.name)
                    .map(|(_, o)| o)
            });
            let config_override = match over {
                Some(FilterOverride::Disabled) => continue,
                Some(FilterOverride::Config(json)) => Some(json.clone()),
                None => None,
            };
            plan.hooks = plan.hooks | info.hooks;
            plan.timeout += info.settings.timeout;
            if info.hooks.buffers_request() {
                plan.max_request_bytes =
                    plan.max_request_bytes.min(info.settings.max_request_bytes);
            }
            if info.hooks.buffers_response() {
                plan.max_response_bytes = plan
                    .max_response_bytes
                    .min(info.settings.max_response_bytes);
            }
            plan.active.push(ActiveFilter {
                index,
                config_override,
            });
        }
        (!plan.hooks.is_empty()).then_some(plan)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::{PathMatch, RouteAction};

    struct Chain(Vec<FilterInfo>);

    impl FilterChain for Chain {
        fn filters(&self) -> &[FilterInfo] {
            &self.0
        }
        fn start(&self, _start: StreamStart) -> Arc<dyn FilterStream> {
            unreachable!("FilterPlan never starts a stream")
        }
    }

    fn info(name: &str, hooks: u8, timeout_ms: u64, max_request_bytes: usize) -> FilterInfo {
        FilterInfo {
            name: name.into(),
            hooks: Hooks(hooks),
            settings: FilterSettings {
                timeout: Duration::from_millis(timeout_ms),
                max_request_bytes,
                ..FilterSettings::default()
            },
        }
    }

    fn route(overrides: Vec<(String, FilterOverride)>) -> RouteEntry {
        RouteEntry {
            name: "r".into(),
            path_match: PathMatch::Prefix("/".into()),
            case_sensitive: true,
            action: RouteAction::Direct {
                status: 200,
                body: None,
            },
            filter_overrides: overrides,
        }
    }

    const HEADERS: u8 = 1 << Phase::RequestHeaders as u8;
    const BODY: u8 = 1 << Phase::RequestBody as u8;

    #[test]
    fn plan_drops_disabled_filters_and_sums_what_the_rest_need() {
        let chain = Chain(vec![
            info("a", HEADERS, 100, 1000),
            info("b", HEADERS | BODY, 200, 500),
            info("c", BODY, 300, 700),
        ]);
        let r = route(vec![
            ("c".into(), FilterOverride::Disabled),
            ("b".into(), FilterOverride::Config("{}".into())),
        ]);
        let plan = FilterPlan::new(&chain, Some(&r)).expect("two filters are active");
        let active: Vec<_> = plan
            .active
            .iter()
            .map(|a| (a.index, a.config_override.as_deref()))
            .collect();
        assert_eq!(active, vec![(0, None), (1, Some("{}"))]);
        assert_eq!(plan.hooks, Hooks(HEADERS | BODY));
        assert!(plan.hooks.buffers_request() && !plan.hooks.buffers_response());
        assert_eq!(plan.timeout, Duration::from_millis(300));
        // Only filters that buffer the request body bound it.
        assert_eq!(plan.max_request_bytes, 500);
        assert_eq!(plan.max_response_bytes, usize::MAX);
    }

    #[test]
    fn no_plan_when_every_filter_is_disabled() {
        let chain = Chain(vec![info("a", HEADERS, 100, 10)]);
        let r = route(vec![("a".into(), FilterOverride::Disabled)]);
        assert!(FilterPlan::new(&chain, Some(&r)).is_none());
        // Without a route (no match), every filter runs.
        assert!(FilterPlan::new(&chain, None).is_some());
    }
}
