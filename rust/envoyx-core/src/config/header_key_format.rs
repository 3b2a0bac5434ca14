//! `Http1ProtocolOptions.header_key_format`, for the connection manager (the
//! case of response header names) and for clusters (the case of request header
//! names). The codecs apply it in `http/header_case.rs`.

use super::reader::Obj;

pub const PRESERVE_CASE_TYPE: &str =
    "envoy.extensions.http.header_formatters.preserve_case.v3.PreserveCaseFormatterConfig";

/// How an HTTP/1 codec writes header names (Envoy's header key formatters).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub enum HeaderKeyFormat {
    /// Lowercase, as the names are held.
    #[default]
    Default,
    /// `proper_case_words`: every name written by this codec is Proper-Cased.
    ProperCase,
    /// `stateful_formatter` `envoy.http.stateful_header_formatters.preserve_case`:
    /// this codec remembers the case of the names it reads, and the other side's
    /// codec writes them so.
    PreserveCase(PreserveCase),
}

/// `PreserveCaseFormatterConfig`.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct PreserveCase {
    /// `forward_reason_phrase`: a response's reason phrase is passed on (read on
    /// the upstream side).
    pub forward_reason_phrase: bool,
    /// `formatter_type_on_envoy_headers` PROPER_CASE: names the peer did not
    /// send (those the proxy adds) are Proper-Cased rather than lowercase.
    pub proper_case_envoy_headers: bool,
}

impl HeaderKeyFormat {
    /// The preserve-case formatter's settings, when it is the one configured.
    pub fn preserve(self) -> Option<PreserveCase> {
        match self {
            HeaderKeyFormat::PreserveCase(p) => Some(p),
            _ => None,
        }
    }
}

/// Reads `header_key_format` of an `Http1ProtocolOptions`, if set.
pub fn map_header_key_format(h1: &Obj<'_>) -> HeaderKeyFormat {
    let Some(format) = h1.obj("header_key_format") else {
        return HeaderKeyFormat::Default;
    };
    if let Some(proper) = format.obj("proper_case_words") {
        drop(proper);
        return HeaderKeyFormat::ProperCase;
    }
    let Some(stateful) = format.obj("stateful_formatter") else {
        return HeaderKeyFormat::Default;
    };
    stateful.str("name");
    let Some(tc) = stateful.obj("typed_config") else {
        stateful.error("typed_config", "is required");
        return HeaderKeyFormat::Default;
    };
    match tc.any_type() {
        Some(PRESERVE_CASE_TYPE) => {}
        Some(other) => {
            tc.error(
                "@type",
                format!("header formatter {other} is not supported by envoyx (only {PRESERVE_CASE_TYPE})"),
            );
            return HeaderKeyFormat::Default;
        }
        None => return HeaderKeyFormat::Default,
    }
    let proper_case_envoy_headers = match tc.str("formatter_type_on_envoy_headers") {
        None | Some("DEFAULT") => false,
        Some("PROPER_CASE") => true,
        Some(other) => {
            tc.error(
                "formatter_type_on_envoy_headers",
                format!("unknown value {other}"),
            );
            false
        }
    };
    HeaderKeyFormat::PreserveCase(PreserveCase {
        forward_reason_phrase: tc.bool("forward_reason_phrase").unwrap_or(false),
        proper_case_envoy_headers,
    })
}

#[cfg(test)]
mod tests {
    use serde_json::json;

    use super::*;
    use crate::config::reader::Errors;

    fn map(v: serde_json::Value) -> (HeaderKeyFormat, Vec<String>) {
        let errors = Errors::default();
        let format = {
            let obj = Obj::new(&v, "h1".into(), &errors).unwrap();
            map_header_key_format(&obj)
        };
        (format, errors.into_vec())
    }

    #[test]
    fn proper_case_and_preserve_case_are_read() {
        let (f, e) = map(json!({"header_key_format": {"proper_case_words": {}}}));
        assert_eq!((f, e), (HeaderKeyFormat::ProperCase, vec![]));
        let (f, e) = map(json!({"header_key_format": {"stateful_formatter": {
            "name": "preserve_case",
            "typed_config": {
                "@type": format!("type.googleapis.com/{PRESERVE_CASE_TYPE}"),
                "forward_reason_phrase": true,
                "formatter_type_on_envoy_headers": "PROPER_CASE"
            }
        }}}));
        assert!(e.is_empty(), "{e:?}");
        assert_eq!(
            f,
            HeaderKeyFormat::PreserveCase(PreserveCase {
                forward_reason_phrase: true,
                proper_case_envoy_headers: true
            })
        );
    }

    #[test]
    fn another_stateful_formatter_is_refused_by_name() {
        let (_, e) = map(json!({"header_key_format": {"stateful_formatter": {
            "name": "x",
            "typed_config": {"@type": "type.googleapis.com/some.Other"}
        }}}));
        assert!(
            e.iter()
                .any(|m| m.contains("header formatter some.Other is not supported")),
            "{e:?}"
        );
    }
}
