//! `envoy.config.core.v3.Metadata` of clusters, endpoints and routes: data a control
//! plane attaches (Istio's `istio` namespace, workload names, …) that Envoy only reads
//! where something asks for it — the `%UPSTREAM_METADATA%` / `%CLUSTER_METADATA%` /
//! `%METADATA(...)%` formatters, and `/config_dump`.

use std::sync::Arc;

use serde_json::{Map, Value};

use super::reader::Obj;

/// `filter_metadata`: per namespace, a `google.protobuf.Struct` (as JSON).
#[derive(Debug, Clone, PartialEq, Default)]
pub struct Metadata {
    filter_metadata: Map<String, Value>,
}

impl Metadata {
    /// The value at `path` (keys into nested structs) of namespace `namespace`;
    /// the whole namespace with an empty path, as Envoy's `metadataValue`.
    pub fn lookup(&self, namespace: &str, path: &[String]) -> Option<&Value> {
        let mut value = self.filter_metadata.get(namespace)?;
        for key in path {
            value = value.as_object()?.get(key)?;
        }
        Some(value)
    }
}

/// `<owner>.metadata`; None when unset or empty. `typed_filter_metadata` is not read
/// (so it is refused by its path): nothing in envoyx would read it.
pub fn map_metadata(owner: &Obj<'_>) -> Option<Arc<Metadata>> {
    let m = owner.obj("metadata")?;
    let filter_metadata = match m.raw("filter_metadata") {
        Some(Value::Object(map)) => map.clone(),
        Some(_) => {
            m.error("filter_metadata", "must be a map of structs");
            return None;
        }
        None => Map::new(),
    };
    for (namespace, value) in &filter_metadata {
        if !value.is_object() {
            m.error(
                &format!("filter_metadata.{namespace}"),
                "must be a google.protobuf.Struct",
            );
        }
    }
    (!filter_metadata.is_empty()).then(|| Arc::new(Metadata { filter_metadata }))
}

/// A metadata value as Envoy's text formatters print it: a string as itself, a whole
/// number without a fraction (proto-JSON numbers are doubles), anything else as JSON.
pub fn format_value(value: &Value, out: &mut String) {
    match value {
        Value::String(s) => out.push_str(s),
        Value::Number(n) => match n.as_f64() {
            Some(f) if f.fract() == 0.0 && f.abs() < 9.0e15 => {
                out.push_str(&(f as i64).to_string());
            }
            _ => out.push_str(&n.to_string()),
        },
        other => out.push_str(&other.to_string()),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::reader::Errors;
    use serde_json::json;

    fn mapped(doc: Value) -> (Option<Arc<Metadata>>, Vec<String>) {
        let errors = Errors::default();
        let m = {
            let obj = Obj::new(&doc, "c".into(), &errors).unwrap();
            map_metadata(&obj)
        };
        (m, errors.into_vec())
    }

    #[test]
    fn lookup_walks_nested_structs() {
        let (m, errors) = mapped(json!({"metadata": {"filter_metadata": {
            "istio": {"workload": "reviews-v1", "nested": {"n": 5.0}}
        }}}));
        assert!(errors.is_empty(), "{errors:?}");
        let m = m.unwrap();
        let key = |k: &[&str]| k.iter().map(|s| s.to_string()).collect::<Vec<_>>();
        assert_eq!(
            m.lookup("istio", &key(&["workload"])),
            Some(&json!("reviews-v1"))
        );
        let mut out = String::new();
        format_value(m.lookup("istio", &key(&["nested", "n"])).unwrap(), &mut out);
        assert_eq!(out, "5");
        assert_eq!(m.lookup("istio", &key(&["missing"])), None);
        assert_eq!(m.lookup("other", &[]), None);
        let mut whole = String::new();
        format_value(m.lookup("istio", &key(&["nested"])).unwrap(), &mut whole);
        assert_eq!(whole, r#"{"n":5.0}"#);
    }

    #[test]
    fn typed_filter_metadata_is_refused_by_its_path() {
        let (_, errors) = mapped(json!({"metadata": {"typed_filter_metadata": {"x": {}}}}));
        assert!(
            errors
                .iter()
                .any(|e| e.contains("metadata.typed_filter_metadata: not supported")),
            "{errors:?}"
        );
    }
}
