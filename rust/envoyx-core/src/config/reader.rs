//! Reading canonical proto-JSON with field paths, collecting every error.
//!
//! An [`Obj`] wraps one JSON object. Each accessor marks the field it reads as
//! consumed; when the `Obj` is dropped, every field that was set but never read is
//! reported as `<path>: not supported by envoyx`. That is how envoyx refuses the Envoy
//! fields it does not implement instead of silently ignoring them: a mapping function
//! only has to read what it supports.

use std::cell::RefCell;
use std::time::Duration;

use serde_json::{Map, Value};

/// Every error of one document, in the order found.
#[derive(Debug, Default)]
pub struct Errors(RefCell<Vec<String>>);

impl Errors {
    pub fn push(&self, path: &str, msg: impl std::fmt::Display) {
        let line = if path.is_empty() {
            msg.to_string()
        } else {
            format!("{path}: {msg}")
        };
        self.0.borrow_mut().push(line);
    }

    pub fn is_empty(&self) -> bool {
        self.0.borrow().is_empty()
    }

    pub fn into_vec(self) -> Vec<String> {
        self.0.into_inner()
    }
}

/// Joins a field name onto a path: `a.b` + `c` = `a.b.c`.
pub fn join(path: &str, field: &str) -> String {
    if path.is_empty() {
        field.to_string()
    } else {
        format!("{path}.{field}")
    }
}

pub struct Obj<'a> {
    path: String,
    map: &'a Map<String, Value>,
    /// Fields read so far; objects have few fields, so a Vec beats a set.
    used: RefCell<Vec<&'a str>>,
    errors: &'a Errors,
}

impl<'a> Obj<'a> {
    /// Wraps `value` found at `path`; reports and returns `None` if it is not an object.
    pub fn new(value: &'a Value, path: String, errors: &'a Errors) -> Option<Self> {
        match value {
            Value::Object(map) => Some(Obj {
                path,
                map,
                used: RefCell::new(Vec::new()),
                errors,
            }),
            _ => {
                errors.push(&path, "expected an object");
                None
            }
        }
    }

    pub fn path(&self) -> &str {
        &self.path
    }

    pub fn field_path(&self, field: &str) -> String {
        join(&self.path, field)
    }

    pub fn errors(&self) -> &'a Errors {
        self.errors
    }

    /// Reports an error about one field of this object.
    pub fn error(&self, field: &str, msg: impl std::fmt::Display) {
        self.errors.push(&self.field_path(field), msg);
    }

    pub fn has(&self, key: &str) -> bool {
        self.map.contains_key(key)
    }

    /// Marks fields as accepted without being used (documented no-ops).
    pub fn ignore(&self, keys: &[&'a str]) {
        let mut used = self.used.borrow_mut();
        used.extend_from_slice(keys);
    }

    fn take(&self, key: &'a str) -> Option<&'a Value> {
        let (k, v) = self.map.get_key_value(key)?;
        self.used.borrow_mut().push(k.as_str());
        Some(v)
    }

    pub fn raw(&self, key: &'a str) -> Option<&'a Value> {
        self.take(key)
    }

    pub fn str(&self, key: &'a str) -> Option<&'a str> {
        match self.take(key)? {
            Value::String(s) => Some(s.as_str()),
            _ => {
                self.error(key, "expected a string");
                None
            }
        }
    }

    pub fn bool(&self, key: &'a str) -> Option<bool> {
        match self.take(key)? {
            Value::Bool(b) => Some(*b),
            _ => {
                self.error(key, "expected a boolean");
                None
            }
        }
    }

    /// An integer field; proto-JSON writes 64-bit integers as strings.
    pub fn u64(&self, key: &'a str) -> Option<u64> {
        let v = self.take(key)?;
        let n = match v {
            Value::Number(n) => n.as_u64(),
            Value::String(s) => s.parse().ok(),
            _ => None,
        };
        if n.is_none() {
            self.error(key, "expected an unsigned integer");
        }
        n
    }

    pub fn u32(&self, key: &'a str) -> Option<u32> {
        let n = self.u64(key)?;
        match u32::try_from(n) {
            Ok(n) => Some(n),
            Err(_) => {
                self.error(key, "value out of range for uint32");
                None
            }
        }
    }

    /// A whole non-negative number inside a google.protobuf.Struct (a TypedStruct's
    /// `value`), where every number is a double: `403.0` reads as 403.
    pub fn struct_uint(&self, key: &'a str) -> Option<u64> {
        match self.take(key)?.as_f64() {
            Some(f) if f >= 0.0 && f.fract() == 0.0 && f < 9.0e15 => Some(f as u64),
            _ => {
                self.error(key, "expected a whole non-negative number");
                None
            }
        }
    }

    /// A google.protobuf.Duration in proto-JSON form (`"1.5s"`).
    pub fn duration(&self, key: &'a str) -> Option<Duration> {
        let s = self.str(key)?;
        match parse_duration(s) {
            Some(d) => Some(d),
            None => {
                self.error(key, format!("invalid duration {s:?}"));
                None
            }
        }
    }

    pub fn obj(&self, key: &'a str) -> Option<Obj<'a>> {
        let v = self.take(key)?;
        Obj::new(v, self.field_path(key), self.errors)
    }

    /// A repeated message field; each element comes with its index path.
    pub fn list(&self, key: &'a str) -> Vec<Obj<'a>> {
        let Some(v) = self.take(key) else {
            return Vec::new();
        };
        let Value::Array(items) = v else {
            self.error(key, "expected a list");
            return Vec::new();
        };
        items
            .iter()
            .enumerate()
            .filter_map(|(i, item)| {
                Obj::new(item, format!("{}[{i}]", self.field_path(key)), self.errors)
            })
            .collect()
    }

    /// A repeated string field.
    pub fn strings(&self, key: &'a str) -> Vec<&'a str> {
        let Some(v) = self.take(key) else {
            return Vec::new();
        };
        let Value::Array(items) = v else {
            self.error(key, "expected a list of strings");
            return Vec::new();
        };
        let mut out = Vec::with_capacity(items.len());
        for (i, item) in items.iter().enumerate() {
            match item {
                Value::String(s) => out.push(s.as_str()),
                _ => self.errors.push(
                    &format!("{}[{i}]", self.field_path(key)),
                    "expected a string",
                ),
            }
        }
        out
    }

    /// The entries of a map field (proto `map<string, Message>`).
    pub fn entries(&self, key: &'a str) -> Vec<(&'a str, Obj<'a>)> {
        let Some(v) = self.take(key) else {
            return Vec::new();
        };
        let Value::Object(map) = v else {
            self.error(key, "expected a map");
            return Vec::new();
        };
        map.iter()
            .filter_map(|(k, v)| {
                Obj::new(v, format!("{}[{k:?}]", self.field_path(key)), self.errors)
                    .map(|o| (k.as_str(), o))
            })
            .collect()
    }

    /// The `@type` of a `google.protobuf.Any`, without its `type.googleapis.com/` prefix.
    pub fn any_type(&self) -> Option<&'a str> {
        let t = self.str("@type")?;
        Some(t.rsplit_once('/').map_or(t, |(_, name)| name))
    }

    /// The whole object as JSON, e.g. to echo it in `/config_dump`.
    pub fn to_value(&self) -> Value {
        Value::Object(self.map.clone())
    }
}

impl Drop for Obj<'_> {
    fn drop(&mut self) {
        let used = self.used.borrow();
        for key in self.map.keys() {
            if !used.contains(&key.as_str()) {
                self.errors
                    .push(&self.field_path(key), "not supported by envoyx");
            }
        }
    }
}

/// Parses proto-JSON Duration text: a decimal number of seconds followed by `s`.
pub fn parse_duration(s: &str) -> Option<Duration> {
    let secs = s.strip_suffix('s')?;
    let value: f64 = secs.parse().ok()?;
    if !value.is_finite() || value < 0.0 {
        return None;
    }
    Some(Duration::from_secs_f64(value))
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn unread_fields_are_reported_with_their_path() {
        let errors = Errors::default();
        let doc = json!({"a": {"known": 1, "unknown": true}});
        {
            let root = Obj::new(&doc, String::new(), &errors).unwrap();
            let a = root.obj("a").unwrap();
            assert_eq!(a.u32("known"), Some(1));
        }
        assert_eq!(
            errors.into_vec(),
            vec!["a.unknown: not supported by envoyx"]
        );
    }

    #[test]
    fn list_elements_carry_their_index() {
        let errors = Errors::default();
        let doc = json!({"items": [{"x": "1"}, {"x": "oops"}]});
        {
            let root = Obj::new(&doc, "root".into(), &errors).unwrap();
            for item in root.list("items") {
                item.u64("x");
            }
        }
        assert_eq!(
            errors.into_vec(),
            vec!["root.items[1].x: expected an unsigned integer"]
        );
    }

    #[test]
    fn durations() {
        assert_eq!(parse_duration("0.25s"), Some(Duration::from_millis(250)));
        assert_eq!(parse_duration("5s"), Some(Duration::from_secs(5)));
        assert_eq!(parse_duration("5"), None);
        assert_eq!(parse_duration("-1s"), None);
    }
}
