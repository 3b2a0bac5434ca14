//! `typed_per_filter_config` of a virtual host, a route or a weighted cluster
//! entry: per filter name, the filter disabled or its config replaced.

use std::sync::Arc;

use serde_json::Value;

use super::native_filters::{NativeOverride, map_cors_policy, map_fault};
use super::reader::Obj;
use super::type_urls::{
    CORS_POLICY_TYPE, FAULT_TYPE, FILTER_CONFIG_TYPE, PYTHON_FILTER_TYPE, TYPED_STRUCT_TYPE,
    UDPA_TYPED_STRUCT_TYPE,
};

/// A route's `typed_per_filter_config` entry for one filter.
#[derive(Debug, Clone)]
pub enum FilterOverride {
    /// `envoy.config.route.v3.FilterConfig` with `disabled: true`.
    Disabled,
    /// A TypedStruct whose `value.config` replaces the filter's config (JSON text).
    Config(Arc<str>),
    /// The settings of a native filter (`HTTPFault`, `CorsPolicy`).
    Native(NativeOverride),
}

/// `typed_per_filter_config`: per filter name, disabled or a config override.
pub fn map_filter_overrides(owner: &Obj<'_>) -> Vec<(String, FilterOverride)> {
    let mut out = Vec::new();
    for (name, any) in owner.entries("typed_per_filter_config") {
        match any.any_type() {
            Some(FILTER_CONFIG_TYPE) => {
                // `is_optional` only matters for filters envoyx does not know, which it rejects.
                any.ignore(&["is_optional"]);
                if any.raw("config").is_some() {
                    any.error(
                        "config",
                        "not supported by envoyx (use a TypedStruct override)",
                    );
                }
                if any.bool("disabled") == Some(true) {
                    out.push((name.to_string(), FilterOverride::Disabled));
                }
            }
            Some(TYPED_STRUCT_TYPE | UDPA_TYPED_STRUCT_TYPE) => {
                let type_url = any.str("type_url").unwrap_or_default();
                if type_url != PYTHON_FILTER_TYPE {
                    any.error(
                        "type_url",
                        format!("{type_url:?} is not supported by envoyx"),
                    );
                    continue;
                }
                let Some(value) = any.obj("value") else {
                    any.error("value", "is required: {config: ...}");
                    continue;
                };
                let config = value.raw("config").cloned().unwrap_or(Value::Null);
                out.push((
                    name.to_string(),
                    FilterOverride::Config(config.to_string().into()),
                ));
            }
            Some(FAULT_TYPE) => out.push((
                name.to_string(),
                FilterOverride::Native(NativeOverride::Fault(Arc::new(map_fault(&any)))),
            )),
            Some(CORS_POLICY_TYPE) => out.push((
                name.to_string(),
                FilterOverride::Native(NativeOverride::Cors(Arc::new(map_cors_policy(&any)))),
            )),
            Some(other) => any.error(
                "@type",
                format!("per-filter config {other} is not supported by envoyx"),
            ),
            None => {}
        }
    }
    out
}
