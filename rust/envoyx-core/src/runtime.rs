//! Envoy's runtime, as far as envoyx has one: the values of the bootstrap's
//! `layered_runtime` static layers (later layers override earlier ones). Envoy's
//! runtime belongs to the process; so does this one, installed when a server is
//! built from a bootstrap. Disk, admin and RTDS layers are accepted without effect
//! (docs/config-support.md): their values would only replace static ones at run time.

use std::collections::HashMap;
use std::sync::{Arc, LazyLock};

use arc_swap::ArcSwap;
use serde_json::Value;

use crate::config::reader::Obj;

#[derive(Debug, Clone, PartialEq)]
pub enum RuntimeValue {
    /// A whole non-negative number (or a string that parses as one).
    Uint(u64),
    /// An `envoy.type.v3.FractionalPercent` (`{numerator, denominator}`).
    Fraction { numerator: u64, denominator: u64 },
    /// Anything else (text, booleans, fractional numbers): no feature reads them yet.
    Other,
}

#[derive(Debug, Default, Clone)]
pub struct Runtime {
    values: HashMap<String, RuntimeValue>,
}

static CURRENT: LazyLock<ArcSwap<Runtime>> = LazyLock::new(Default::default);

/// Makes `runtime` the process's runtime.
pub fn install(runtime: Runtime) {
    CURRENT.store(Arc::new(runtime));
}

/// The process's runtime (one atomic load; only read by features that name a key).
pub fn snapshot() -> arc_swap::Guard<Arc<Runtime>> {
    CURRENT.load()
}

impl Runtime {
    pub fn get(&self, key: &str) -> Option<&RuntimeValue> {
        self.values.get(key)
    }

    /// Envoy's `Snapshot::featureEnabled(key, FractionalPercent default, random)`:
    /// the key's fraction, or its integer as a numerator over the default's
    /// denominator (above 100: always), else the default.
    pub fn feature_enabled(
        &self,
        key: Option<&str>,
        numerator: u64,
        denominator: u64,
        random: u64,
    ) -> bool {
        let (n, d) = match key.and_then(|k| self.values.get(k)) {
            Some(RuntimeValue::Fraction {
                numerator,
                denominator,
            }) => (*numerator, *denominator),
            Some(RuntimeValue::Uint(v)) if *v > 100 => return true,
            Some(RuntimeValue::Uint(v)) => (*v, denominator),
            _ => (numerator, denominator),
        };
        random % d.max(1) < n
    }
}

/// `layered_runtime`: the static layers' values, flattened as Envoy flattens them
/// (`{a: {b: 1}}` is key `a.b`).
pub fn map_layered_runtime(lr: &Obj<'_>) -> Runtime {
    let mut runtime = Runtime::default();
    for layer in lr.list("layers") {
        layer.ignore(&["name", "disk_layer", "admin_layer", "rtds_layer"]);
        if let Some(v) = layer.raw("static_layer") {
            walk(&layer, v, String::new(), &mut runtime.values);
        }
    }
    runtime
}

fn walk(layer: &Obj<'_>, v: &Value, prefix: String, out: &mut HashMap<String, RuntimeValue>) {
    let value = match v {
        Value::Object(map) => {
            if map.is_empty() || map.contains_key("numerator") || map.contains_key("denominator") {
                fraction(map)
            } else {
                for (k, v) in map {
                    let key = if prefix.is_empty() {
                        k.clone()
                    } else {
                        format!("{prefix}.{k}")
                    };
                    walk(layer, v, key, out);
                }
                return;
            }
        }
        Value::Number(n) => match n.as_f64() {
            Some(f) if f >= 0.0 && f.fract() == 0.0 && f < 1.8e19 => RuntimeValue::Uint(f as u64),
            _ => RuntimeValue::Other,
        },
        Value::String(s) => s
            .trim()
            .parse()
            .map_or(RuntimeValue::Other, RuntimeValue::Uint),
        Value::Bool(_) => RuntimeValue::Other,
        Value::Null | Value::Array(_) => {
            layer.error(
                "static_layer",
                format!("Invalid runtime entry value for {prefix}"),
            );
            return;
        }
    };
    out.insert(prefix, value);
}

fn fraction(map: &serde_json::Map<String, Value>) -> RuntimeValue {
    let numerator = map
        .get("numerator")
        .and_then(|n| n.as_f64().or_else(|| n.as_str()?.parse().ok()))
        .unwrap_or(0.0);
    let denominator = match map.get("denominator").and_then(Value::as_str) {
        Some("TEN_THOUSAND") => 10_000,
        Some("MILLION") => 1_000_000,
        _ => 100,
    };
    RuntimeValue::Fraction {
        numerator: numerator.max(0.0) as u64,
        denominator,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::reader::Errors;
    use serde_json::json;

    #[test]
    fn static_layers_flatten_and_override() {
        let doc = json!({"layers": [
            {"name": "a", "static_layer": {"routing": {"canary": 20.0, "split": {"numerator": 5.0, "denominator": "TEN_THOUSAND"}}, "text": "x"}},
            {"name": "b", "static_layer": {"routing.canary": "100"}},
            {"name": "c", "admin_layer": {}}
        ]});
        let errors = Errors::default();
        let rt = {
            let lr = Obj::new(&doc, String::new(), &errors).unwrap();
            map_layered_runtime(&lr)
        };
        assert!(errors.is_empty());
        assert_eq!(rt.get("routing.canary"), Some(&RuntimeValue::Uint(100)));
        assert_eq!(
            rt.get("routing.split"),
            Some(&RuntimeValue::Fraction {
                numerator: 5,
                denominator: 10_000
            })
        );
        assert_eq!(rt.get("text"), Some(&RuntimeValue::Other));
        assert!(rt.feature_enabled(Some("routing.canary"), 0, 100, 99));
        assert!(rt.feature_enabled(Some("routing.split"), 0, 100, 10_004));
        assert!(!rt.feature_enabled(Some("routing.split"), 100, 100, 5));
        assert!(rt.feature_enabled(Some("missing"), 30, 100, 129));
        assert!(!rt.feature_enabled(None, 30, 100, 130));
    }
}
