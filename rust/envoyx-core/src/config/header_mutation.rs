//! Header mutations of a route configuration, virtual host, route or weighted
//! cluster: `request_headers_to_add` / `_to_remove` and `response_headers_to_add`
//! / `_to_remove`, each `HeaderValueOption` compiled once (its value's formatters
//! included) as Envoy's `HeaderParser::configure` does. Applying them is
//! [`crate::router::header_mutation`].

use std::sync::Arc;

use http::{HeaderName, HeaderValue};

use super::reader::Obj;
use crate::access_log::Format;

/// The four mutation fields of one level (Envoy keeps one `HeaderParser` per
/// direction and level).
#[derive(Debug, Default)]
pub struct HeaderMutations {
    pub request: HeaderParser,
    pub response: HeaderParser,
}

/// `*_headers_to_add` and `*_headers_to_remove` of one direction.
#[derive(Debug, Default)]
pub struct HeaderParser {
    pub to_remove: Vec<HeaderName>,
    pub to_add: Vec<HeaderToAdd>,
    /// Some value reads the request's headers (`%REQ(...)%`).
    pub reads_request: bool,
    /// Some value reads the stream's start time (`%START_TIME%`).
    pub reads_start_time: bool,
}

/// One `HeaderValueOption`.
#[derive(Debug)]
pub struct HeaderToAdd {
    pub name: HeaderName,
    pub value: HeaderFormat,
    pub action: AppendAction,
    /// `keep_empty_value`: an empty value is still added.
    pub keep_empty: bool,
}

/// A header value: text made once, or a format rendered per request.
#[derive(Debug)]
pub enum HeaderFormat {
    Literal(HeaderValue),
    Formatted(Format),
}

/// `HeaderValueOption.HeaderAppendAction` (the deprecated `append: true` is
/// `AppendIfExistsOrAdd`, `append: false` `OverwriteIfExistsOrAdd`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum AppendAction {
    AppendIfExistsOrAdd,
    AddIfAbsent,
    OverwriteIfExistsOrAdd,
    OverwriteIfExists,
}

impl HeaderParser {
    pub fn is_empty(&self) -> bool {
        self.to_remove.is_empty() && self.to_add.is_empty()
    }
}

impl HeaderMutations {
    pub fn is_empty(&self) -> bool {
        self.request.is_empty() && self.response.is_empty()
    }
}

/// The mutation fields of `owner` (a `RouteConfiguration`, `VirtualHost`, `Route`
/// or `WeightedCluster.ClusterWeight`); None when it sets none, so that a route
/// without mutations costs nothing per request.
pub fn map_header_mutations(owner: &Obj<'_>) -> Option<Arc<HeaderMutations>> {
    let m = HeaderMutations {
        request: map_parser(owner, "request_headers_to_add", "request_headers_to_remove"),
        response: map_parser(
            owner,
            "response_headers_to_add",
            "response_headers_to_remove",
        ),
    };
    (!m.is_empty()).then(|| Arc::new(m))
}

fn map_parser(
    owner: &Obj<'_>,
    add_field: &'static str,
    remove_field: &'static str,
) -> HeaderParser {
    let mut parser = HeaderParser::default();
    for option in owner.list(add_field) {
        if let Some(entry) = map_header_value_option(&option, &mut parser) {
            parser.to_add.push(entry);
        }
    }
    for (i, name) in owner.strings(remove_field).into_iter().enumerate() {
        let path = format!("{}[{i}]", owner.field_path(remove_field));
        // Envoy's `HeaderUtility::isRemovableHeader`.
        if name.starts_with(':') || name.eq_ignore_ascii_case("host") {
            owner
                .errors()
                .push(&path, ":-prefixed or host headers may not be removed");
            continue;
        }
        match HeaderName::from_bytes(name.as_bytes()) {
            Ok(n) => parser.to_remove.push(n),
            Err(_) => owner
                .errors()
                .push(&path, format!("invalid header name {name:?}")),
        }
    }
    parser
}

fn map_header_value_option(option: &Obj<'_>, parser: &mut HeaderParser) -> Option<HeaderToAdd> {
    let keep_empty = option.bool("keep_empty_value").unwrap_or(false);
    let append = option.bool("append");
    let action = match option.raw("append_action") {
        None => None,
        Some(v) => match (v.as_str(), v.as_i64()) {
            (Some("APPEND_IF_EXISTS_OR_ADD"), _) | (_, Some(0)) => None,
            (Some("ADD_IF_ABSENT"), _) | (_, Some(1)) => Some(AppendAction::AddIfAbsent),
            (Some("OVERWRITE_IF_EXISTS_OR_ADD"), _) | (_, Some(2)) => {
                Some(AppendAction::OverwriteIfExistsOrAdd)
            }
            (Some("OVERWRITE_IF_EXISTS"), _) | (_, Some(3)) => {
                Some(AppendAction::OverwriteIfExists)
            }
            _ => {
                option.error("append_action", format!("unknown append action {v}"));
                None
            }
        },
    };
    let action = match (append, action) {
        (Some(_), Some(_)) => {
            option.error(
                "append",
                "Both append and append_action are set and it's not allowed",
            );
            // One error for the option, not a second one for its unread header.
            option.ignore(&["header"]);
            return None;
        }
        (Some(true), None) | (None, None) => AppendAction::AppendIfExistsOrAdd,
        (Some(false), None) => AppendAction::OverwriteIfExistsOrAdd,
        (None, Some(a)) => a,
    };
    let Some(header) = option.obj("header") else {
        option.error("header", "value is required");
        return None;
    };
    let key = header.str("key").unwrap_or_default();
    let value = header.str("value").unwrap_or_default();
    // Envoy's `HeaderUtility::isModifiableHeader`: `:path` and `:authority` have
    // their own rewrites, and Host behaves differently in HTTP/1 and HTTP/2.
    if key.starts_with(':') || key.eq_ignore_ascii_case("host") {
        header.error("key", ":-prefixed or host headers may not be modified");
        return None;
    }
    let name = match HeaderName::from_bytes(key.as_bytes()) {
        Ok(n) => n,
        Err(_) => {
            header.error("key", format!("invalid header name {key:?}"));
            return None;
        }
    };
    let format = match Format::parse(value) {
        Ok(f) if f.reads_metadata() => {
            // Route headers are written before the upstream host is picked.
            header.error(
                "value",
                "metadata operators (%UPSTREAM_METADATA% and kin) are not supported in header mutations by envoyx",
            );
            return None;
        }
        Ok(f) => f,
        Err(e) => {
            header.error("value", e);
            return None;
        }
    };
    let value = match format.as_literal() {
        Some(text) => match HeaderValue::from_str(&text) {
            Ok(v) => HeaderFormat::Literal(v),
            Err(_) => {
                // CR, LF and NUL are refused by Envoy's schema; envoyx also
                // refuses the other control characters its codecs cannot send.
                header.error("value", format!("invalid header value {text:?}"));
                return None;
            }
        },
        None => {
            parser.reads_request |= format.reads_request_headers();
            parser.reads_start_time |= format.reads_start_time();
            HeaderFormat::Formatted(format)
        }
    };
    Some(HeaderToAdd {
        name,
        value,
        action,
        keep_empty,
    })
}

/// The mutations that apply to the requests of one route, in Envoy's order:
/// route, virtual host, route configuration (each later level wins an
/// overwrite), reversed by `most_specific_header_mutations_wins`.
#[derive(Debug)]
pub struct RouteHeaderMutations {
    pub levels: Vec<Arc<HeaderMutations>>,
    pub has_request: bool,
    pub has_response: bool,
    /// A response-side value reads the request's headers: the stream keeps them.
    pub response_reads_request: bool,
}

impl RouteHeaderMutations {
    /// None when no level sets a mutation.
    pub fn new(
        route: Option<&Arc<HeaderMutations>>,
        virtual_host: Option<&Arc<HeaderMutations>>,
        route_config: Option<&Arc<HeaderMutations>>,
        most_specific_wins: bool,
    ) -> Option<Arc<Self>> {
        let mut levels: Vec<Arc<HeaderMutations>> = [route, virtual_host, route_config]
            .into_iter()
            .flatten()
            .cloned()
            .collect();
        if levels.is_empty() {
            return None;
        }
        if most_specific_wins {
            levels.reverse();
        }
        Some(Arc::new(RouteHeaderMutations {
            has_request: levels.iter().any(|l| !l.request.is_empty()),
            has_response: levels.iter().any(|l| !l.response.is_empty()),
            response_reads_request: levels.iter().any(|l| l.response.reads_request),
            levels,
        }))
    }
}
