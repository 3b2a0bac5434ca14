//! Configuration: Envoy v3 proto-JSON in, the core's typed model out.

pub mod bootstrap;
pub mod model;
pub mod reader;

pub use bootstrap::map_bootstrap;
pub use model::*;
