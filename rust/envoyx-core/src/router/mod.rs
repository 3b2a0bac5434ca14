//! Routing: the compiled route tables ([`table`]), the router filter that ends
//! every HTTP filter chain ([`filter`]), and one upstream try ([`upstream_request`]),
//! as Envoy's `source/common/router/` splits them.

pub mod cluster_specifier;
pub mod filter;
pub mod hash_policy;
pub mod header_mutation;
mod hedge;
pub mod internal_redirect;
pub mod mirror;
pub mod redirect;
pub mod retry_state;
pub mod route_match;
pub mod scoped;
pub mod table;
pub mod upstream_request;

pub use table::{RouteTable, VirtualHost, cluster_of};
