//! Configuration: Envoy v3 proto-JSON in, the core's typed model out.

pub mod bootstrap;
pub mod circuit_breakers;
pub mod filter_override;
pub mod header_key_format;
pub mod header_mutation;
pub mod health_check;
pub mod internal_redirect;
pub mod listener;
pub mod local_reply;
pub mod matcher;
pub mod metadata;
pub mod model;
pub mod native_filters;
pub mod network;
pub mod reader;
pub mod retry;
pub mod route;
pub mod route_action;
pub mod route_match;
pub mod scoped_route;
pub mod tls;
pub mod type_urls;
pub mod upgrade;

pub use bootstrap::map_bootstrap;
pub use header_key_format::{HeaderKeyFormat, PreserveCase};
pub use health_check::{HealthCheckConfig, OutlierConfig};
pub use model::*;
pub use route::*;
pub use route_action::{ForwardAction, RouteAction, RouteStreamDuration};
pub use route_match::{PathMatch, RouteMatch};
