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
//!
//! What a request needs of its chain (which filters run, which phases, the timeout and
//! body limits) is a [`FilterPlan`], compiled once per chain when the chain is built
//! ([`FilterChain::default_plan`]); only a route whose `typed_per_filter_config`
//! names one of the chain's filters gets a plan of its own, computed per request.

use std::future::Future;
use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::Arc;
use std::task::Poll;
use std::time::Duration;

use bytes::Bytes;
use http::HeaderMap;
use http::header::{HeaderName, HeaderValue};

use crate::access_log::LogRecord;
pub use crate::config::FilterSettings;
use crate::config::route_action::ClusterWeight;
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
    /// Whether a phase after `phase` has a hook: one that can still read what the
    /// filters were given in `phase` (the request or response headers, through
    /// the request's context).
    pub fn any_after(self, phase: Phase) -> bool {
        self.0 >> (phase as u8 + 1) != 0
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
    pub method: http::Method,
    pub path: String,
    pub authority: String,
    pub scheme: &'static str,
    pub downstream: SocketAddr,
    /// The downstream TLS session (None: plaintext).
    pub tls: Option<Arc<crate::tls::PeerTls>>,
    pub route_name: Option<String>,
    pub cluster: Option<String>,
    /// The active filters; None: the chain's default plan (every filter, no route
    /// override), which the chain's side may have prepared once.
    pub active: Option<Vec<ActiveFilter>>,
    /// The hooks of the active filters.
    pub hooks: Hooks,
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

/// Where a phase's outcome is sent: the worker awaits the other end. Made by the
/// core per call, so that a call allocates no boxed future.
pub struct HookReply(tokio::sync::oneshot::Sender<HookOutcome>);

impl HookReply {
    /// The reply and the future that resolves to it; a reply dropped unsent
    /// resolves to `Failed` (the filter side lost the call: fail closed).
    pub fn channel() -> (HookReply, HookAnswer) {
        let (tx, rx) = tokio::sync::oneshot::channel();
        (HookReply(tx), HookAnswer(rx))
    }

    pub fn send(self, outcome: HookOutcome) {
        // The worker may have given up (timeout, client gone): nothing to do.
        let _ = self.0.send(outcome);
    }
}

/// The outcome of one call, as the worker awaits it.
pub struct HookAnswer(tokio::sync::oneshot::Receiver<HookOutcome>);

impl Future for HookAnswer {
    type Output = HookOutcome;
    fn poll(mut self: Pin<&mut Self>, cx: &mut std::task::Context<'_>) -> Poll<HookOutcome> {
        Pin::new(&mut self.0).poll(cx).map(|r| {
            r.unwrap_or(HookOutcome::Failed {
                filter: String::new(),
            })
        })
    }
}

/// The filters of one HTTP connection manager.
pub trait FilterChain: Send + Sync {
    fn filters(&self) -> &[FilterInfo];
    /// `FilterPlan::compile(self.filters(), None)`, kept from when the chain was built.
    fn default_plan(&self) -> Option<&FilterPlan>;
    fn start(&self, start: StreamStart) -> Arc<dyn FilterStream>;
}

/// One request's run through a chain.
pub trait FilterStream: Send + Sync {
    /// Runs one phase's hooks; the outcome goes to `reply`.
    fn call(self: Arc<Self>, call: HookCall, reply: HookReply);
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

/// The filters active on one route and what they need.
#[derive(Debug)]
pub struct FilterPlan {
    pub active: Vec<ActiveFilter>,
    pub hooks: Hooks,
    /// The sum of the active filters' timeouts: a whole phase may take that long.
    pub timeout: Duration,
    pub max_request_bytes: usize,
    pub max_response_bytes: usize,
}

/// Where a request's `typed_per_filter_config` comes from: its route (with its
/// virtual host's) and the route's weighted cluster entry it picked, the most
/// specific (Envoy's `WeightedClusterEntry::mostSpecificPerFilterConfig`).
#[derive(Clone, Copy, Default)]
pub struct RouteFilterConfigs<'a> {
    pub route: Option<&'a RouteEntry>,
    pub weighted: Option<&'a ClusterWeight>,
}

/// A request's plan: the chain's default one, or the route's own.
pub enum PlanRef {
    Default,
    Route(Box<FilterPlan>),
}

impl FilterPlan {
    /// None when no filter is active on the route (the request never touches them).
    pub fn compile(filters: &[FilterInfo], route: Option<&RouteEntry>) -> Option<FilterPlan> {
        FilterPlan::compile_for(
            filters,
            RouteFilterConfigs {
                route,
                weighted: None,
            },
        )
    }

    /// [`Self::compile`] for a request that picked the weighted cluster entry
    /// `weighted` of its route: the entry's `typed_per_filter_config` is the most
    /// specific (Envoy's `WeightedClusterEntry::mostSpecificPerFilterConfig`).
    fn compile_for(filters: &[FilterInfo], configs: RouteFilterConfigs<'_>) -> Option<FilterPlan> {
        let RouteFilterConfigs { route, weighted } = configs;
        let mut plan = FilterPlan {
            active: Vec::new(),
            hooks: Hooks::default(),
            timeout: Duration::ZERO,
            max_request_bytes: usize::MAX,
            max_response_bytes: usize::MAX,
        };
        for (index, info) in filters.iter().enumerate() {
            let find = |overrides: &'_ [(String, FilterOverride)]| {
                overrides
                    .iter()
                    .find(|(name, _)| *name == info.name)
                    .map(|(_, o)| o.clone())
            };
            let over = weighted
                .and_then(|w| find(&w.filter_overrides))
                .or_else(|| route.and_then(|r| find(&r.filter_overrides)));
            let config_override = match over {
                Some(FilterOverride::Disabled) => continue,
                Some(FilterOverride::Config(json)) => Some(json),
                // A native filter's settings under a Python filter's name: not its.
                Some(FilterOverride::Native(_)) | None => None,
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

    /// The plan of a request on `route`: the chain's default unless the route
    /// overrides one of the chain's filters; None when no filter is active.
    pub fn for_route(chain: &dyn FilterChain, route: Option<&RouteEntry>) -> Option<PlanRef> {
        FilterPlan::for_request(
            chain,
            RouteFilterConfigs {
                route,
                weighted: None,
            },
        )
    }

    /// [`Self::for_route`] for a request that picked the weighted cluster entry
    /// `weighted` of its route (its overrides count too).
    pub fn for_request(
        chain: &dyn FilterChain,
        configs: RouteFilterConfigs<'_>,
    ) -> Option<PlanRef> {
        let RouteFilterConfigs { route, weighted } = configs;
        let filters = chain.filters();
        let names = |overrides: &[(String, FilterOverride)]| {
            overrides
                .iter()
                .any(|(name, _)| filters.iter().any(|f| f.name == *name))
        };
        let overrides = route.is_some_and(|r| names(&r.filter_overrides))
            || weighted.is_some_and(|w| names(&w.filter_overrides));
        if overrides {
            FilterPlan::compile_for(filters, configs).map(|p| PlanRef::Route(Box::new(p)))
        } else {
            chain.default_plan().map(|_| PlanRef::Default)
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::{PathMatch, RouteAction, RouteMatch};

    struct Chain(Vec<FilterInfo>, Option<FilterPlan>);

    impl Chain {
        fn new(filters: Vec<FilterInfo>) -> Chain {
            let plan = FilterPlan::compile(&filters, None);
            Chain(filters, plan)
        }
    }

    impl FilterChain for Chain {
        fn filters(&self) -> &[FilterInfo] {
            &self.0
        }
        fn default_plan(&self) -> Option<&FilterPlan> {
            self.1.as_ref()
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
            route_match: RouteMatch {
                path: PathMatch::Prefix("/".into()),
                case_sensitive: true,
                conditions: None,
            },
            action: RouteAction::Direct {
                status: 200,
                body: None,
                redirect: None,
            },
            filter_overrides: overrides,
            header_mutations: None,
            metadata: None,
        }
    }

    const HEADERS: u8 = 1 << Phase::RequestHeaders as u8;
    const BODY: u8 = 1 << Phase::RequestBody as u8;

    #[test]
    fn plan_drops_disabled_filters_and_sums_what_the_rest_need() {
        let chain = Chain::new(vec![
            info("a", HEADERS, 100, 1000),
            info("b", HEADERS | BODY, 200, 500),
            info("c", BODY, 300, 700),
        ]);
        let r = route(vec![
            ("c".into(), FilterOverride::Disabled),
            ("b".into(), FilterOverride::Config("{}".into())),
        ]);
        let Some(PlanRef::Route(plan)) = FilterPlan::for_route(&chain, Some(&r)) else {
            panic!("the route overrides two filters: a plan of its own")
        };
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
        let chain = Chain::new(vec![info("a", HEADERS, 100, 10)]);
        let r = route(vec![("a".into(), FilterOverride::Disabled)]);
        assert!(FilterPlan::for_route(&chain, Some(&r)).is_none());
        // Without a route (no match), every filter runs.
        assert!(FilterPlan::for_route(&chain, None).is_some());
    }

    #[test]
    fn routes_without_overrides_of_this_chain_share_its_plan() {
        let chain = Chain::new(vec![info("a", HEADERS, 100, 10)]);
        // An override for a filter of another chain changes nothing here.
        let r = route(vec![("other".into(), FilterOverride::Disabled)]);
        assert!(matches!(
            FilterPlan::for_route(&chain, Some(&r)),
            Some(PlanRef::Default)
        ));
        assert!(matches!(
            FilterPlan::for_route(&chain, Some(&route(vec![]))),
            Some(PlanRef::Default)
        ));
    }

    #[test]
    fn hooks_after_a_phase() {
        let response = Hooks(1 << Phase::ResponseHeaders as u8);
        assert!((Hooks(HEADERS) | response).any_after(Phase::RequestHeaders));
        assert!(!response.any_after(Phase::ResponseHeaders));
        assert!(Hooks(1 << Phase::Log as u8).any_after(Phase::ResponseHeaders));
        assert!(!Hooks(HEADERS).any_after(Phase::RequestHeaders));
    }
}
