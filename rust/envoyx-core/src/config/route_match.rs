//! A route's `match`: which requests a route takes. Everything is compiled here
//! (regexes, URI templates, header names); [`crate::router::route_match`] only
//! compares.

use http::HeaderName;
use regex::Regex;

use super::matcher::{StringMatcher, StringPattern, map_safe_regex, map_string_matcher};
use super::reader::Obj;

/// `envoy.extensions.path.match.uri_template.v3.UriTemplateMatchConfig`.
pub const URI_TEMPLATE_MATCH_TYPE: &str =
    "envoy.extensions.path.match.uri_template.v3.UriTemplateMatchConfig";
/// `envoy.extensions.path.rewrite.uri_template.v3.UriTemplateRewriteConfig`.
pub const URI_TEMPLATE_REWRITE_TYPE: &str =
    "envoy.extensions.path.rewrite.uri_template.v3.UriTemplateRewriteConfig";

#[derive(Debug)]
pub struct RouteMatch {
    pub path: PathMatch,
    /// `case_sensitive` (default true; regexes and URI templates are not affected,
    /// as in Envoy).
    pub case_sensitive: bool,
    /// `headers`, `query_parameters`, `grpc`, `runtime_fraction`. None for a route
    /// with only a path matcher (most routes): checking it then costs one branch.
    pub conditions: Option<Box<MatchConditions>>,
}

#[derive(Debug)]
pub enum PathMatch {
    /// `match.prefix`: compared with the path and its query, as in Envoy.
    Prefix(String),
    /// `match.path`: the whole path without the query string.
    Path(String),
    /// `match.safe_regex.regex`, anchored: it must match the whole path without query.
    Regex(Regex),
    /// `match.path_separated_prefix`: the path without query is the prefix, or
    /// continues after it with `/`.
    PathSeparatedPrefix(String),
    /// `match.path_match_policy` with a URI template.
    Template(Box<UriTemplate>),
    /// `match.connect_matcher`: CONNECT requests (looked up with an empty path,
    /// since they have none), and only those.
    Connect,
}

/// What a route requires beyond its path.
#[derive(Debug, Default)]
pub struct MatchConditions {
    /// `headers`: all must match.
    pub headers: Vec<HeaderMatcher>,
    /// `query_parameters`: all must match (the query is only scanned when set).
    pub query_parameters: Vec<QueryParameterMatcher>,
    /// `grpc`: the request has a gRPC content-type.
    pub grpc: bool,
    /// `runtime_fraction`.
    pub runtime_fraction: Option<RuntimeFraction>,
    /// `tls_context`: what the downstream connection's client certificate must
    /// be (Envoy's `TlsContextMatchCriteria`); None when neither is set.
    pub tls_context: Option<TlsContextMatch>,
}

/// `match.tls_context`: each set field must equal the connection's fact; a
/// plaintext connection has neither a presented nor a validated certificate.
#[derive(Debug, Clone, Copy)]
pub struct TlsContextMatch {
    pub presented: Option<bool>,
    pub validated: Option<bool>,
}

/// Which request header a header matcher reads. Envoy keeps the request line in
/// pseudo-headers; envoyx keeps it in the request, so these are read from there.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum HeaderSource {
    /// `:authority`, and `host` (Envoy's header map keeps Host as `:authority`).
    Authority,
    /// `:path`: the path with its query.
    Path,
    /// `:method`.
    Method,
    /// `:scheme`.
    Scheme,
    /// Any other pseudo-header name (`:protocol`, `:status`…): never present.
    OtherPseudo,
    Header(HeaderName),
}

/// `envoy.config.route.v3.HeaderMatcher`.
#[derive(Debug)]
pub struct HeaderMatcher {
    pub name: HeaderSource,
    pub kind: HeaderMatchKind,
    /// `invert_match`; it does not rescue a missing header (unless it is treated
    /// as empty), as in Envoy.
    pub invert: bool,
    /// `treat_missing_header_as_empty`.
    pub treat_missing_as_empty: bool,
}

#[derive(Debug)]
pub enum HeaderMatchKind {
    /// `present_match` (and a matcher naming only the header: present).
    Present(bool),
    /// `string_match`, or a deprecated `safe_regex_match`, `prefix_match`,
    /// `suffix_match`, `contains_match`.
    String(StringMatcher),
    /// The deprecated `exact_match`: an empty value matches any value (Envoy's
    /// HeaderDataExactMatch).
    LegacyExact(String),
    /// `range_match`: the value as a signed integer in `[start, end)`.
    Range { start: i64, end: i64 },
}

/// `envoy.config.route.v3.QueryParameterMatcher`.
#[derive(Debug)]
pub struct QueryParameterMatcher {
    pub name: String,
    pub kind: QueryMatchKind,
}

#[derive(Debug)]
pub enum QueryMatchKind {
    /// `string_match` on the first value of the parameter (raw, not decoded).
    String(StringMatcher),
    /// `present_match`: whether the parameter is there must equal this.
    Present(bool),
    /// Neither set: the parameter is there.
    Exists,
}

/// `runtime_fraction`: `default_value`, replaced by the runtime value of
/// `runtime_key` when the bootstrap's static layer has one.
#[derive(Debug, Clone)]
pub struct RuntimeFraction {
    pub numerator: u64,
    pub denominator: u64,
    pub runtime_key: Option<String>,
}

/// A URI template (`path_match_policy`) compiled into an anchored regex with one
/// named group per variable, and the route's `path_rewrite_policy` if it has one.
#[derive(Debug)]
pub struct UriTemplate {
    pub template: String,
    pub regex: Regex,
    pub rewrite: Option<Vec<RewriteSegment>>,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum RewriteSegment {
    Literal(String),
    /// The capture group index of a template variable.
    Variable(usize),
}

/// The HCM's `strip_matching_host_port` / `strip_any_host_port`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum StripHostPort {
    #[default]
    No,
    /// Strip a port equal to the listener's.
    Matching,
    /// Strip any port.
    Any,
}

/// Reads the connection manager's two host-port fields.
pub fn map_strip_host_port(hcm: &Obj<'_>) -> StripHostPort {
    let matching = hcm.bool("strip_matching_host_port").unwrap_or(false);
    let any = hcm.bool("strip_any_host_port").unwrap_or(false);
    match (matching, any) {
        (true, true) => {
            hcm.errors().push(
                hcm.path(),
                "Error: Only one of `strip_matching_host_port` or `strip_any_host_port` can be set.",
            );
            StripHostPort::No
        }
        (true, false) => StripHostPort::Matching,
        (false, true) => StripHostPort::Any,
        (false, false) => StripHostPort::No,
    }
}

/// `match`.
pub fn map_route_match(m: &Obj<'_>) -> Option<RouteMatch> {
    // Matchers on what envoyx does not keep per request: named, so that the
    // message says what is missing rather than only "not supported".
    for (field, what) in [
        ("dynamic_metadata", "dynamic metadata"),
        ("filter_state", "filter state"),
    ] {
        if m.raw(field).is_some() {
            m.error(
                field,
                format!("route matching on {what} is not supported by envoyx"),
            );
        }
    }
    let case_sensitive = m.bool("case_sensitive").unwrap_or(true);
    let path = if let Some(p) = m.str("prefix") {
        PathMatch::Prefix(p.to_string())
    } else if let Some(p) = m.str("path") {
        PathMatch::Path(p.to_string())
    } else if let Some(sr) = m.obj("safe_regex") {
        PathMatch::Regex(map_safe_regex(&sr)?)
    } else if let Some(p) = m.str("path_separated_prefix") {
        // Envoy's own checks (route_components.proto's rule only forbids ? and #).
        if p.ends_with('/') {
            m.error(
                "path_separated_prefix",
                format!("path_separated_prefix {p} can not end with '/'"),
            );
            return None;
        }
        PathMatch::PathSeparatedPrefix(p.to_string())
    } else if let Some(policy) = m.obj("path_match_policy") {
        PathMatch::Template(Box::new(map_path_match_policy(&policy)?))
    } else if m.obj("connect_matcher").is_some() {
        PathMatch::Connect
    } else {
        m.errors().push(
            m.path(),
            "one of prefix, path, safe_regex, path_separated_prefix, path_match_policy or connect_matcher is required by envoyx",
        );
        return None;
    };
    let conditions = MatchConditions {
        headers: m
            .list("headers")
            .iter()
            .filter_map(map_header_matcher)
            .collect(),
        query_parameters: m
            .list("query_parameters")
            .iter()
            .filter_map(map_query_parameter_matcher)
            .collect(),
        grpc: m.obj("grpc").is_some(),
        runtime_fraction: m.obj("runtime_fraction").map(|f| map_runtime_fraction(&f)),
        tls_context: m
            .obj("tls_context")
            .map(|t| TlsContextMatch {
                presented: t.bool("presented"),
                validated: t.bool("validated"),
            })
            .filter(|t| t.presented.is_some() || t.validated.is_some()),
    };
    let any = !conditions.headers.is_empty()
        || !conditions.query_parameters.is_empty()
        || conditions.grpc
        || conditions.runtime_fraction.is_some()
        || conditions.tls_context.is_some();
    Some(RouteMatch {
        path,
        case_sensitive,
        conditions: any.then(|| Box::new(conditions)),
    })
}

pub(crate) fn map_header_matcher(h: &Obj<'_>) -> Option<HeaderMatcher> {
    let name = h.str("name").unwrap_or_default().to_ascii_lowercase();
    let source = match name.as_str() {
        ":authority" | "host" => HeaderSource::Authority,
        ":path" => HeaderSource::Path,
        ":method" => HeaderSource::Method,
        ":scheme" => HeaderSource::Scheme,
        n if n.starts_with(':') => HeaderSource::OtherPseudo,
        n => match HeaderName::from_bytes(n.as_bytes()) {
            Ok(name) => HeaderSource::Header(name),
            Err(_) => {
                h.error("name", format!("invalid header name {n:?}"));
                return None;
            }
        },
    };
    let legacy = |pattern: StringPattern| {
        HeaderMatchKind::String(StringMatcher {
            pattern,
            ignore_case: false,
        })
    };
    let kind = if let Some(s) = h.obj("string_match") {
        HeaderMatchKind::String(map_string_matcher(&s)?)
    } else if let Some(v) = h.str("exact_match") {
        HeaderMatchKind::LegacyExact(v.to_string())
    } else if let Some(sr) = h.obj("safe_regex_match") {
        legacy(StringPattern::Regex(map_safe_regex(&sr)?))
    } else if let Some(v) = h.str("prefix_match") {
        legacy(StringPattern::Prefix(v.to_string()))
    } else if let Some(v) = h.str("suffix_match") {
        legacy(StringPattern::Suffix(v.to_string()))
    } else if let Some(v) = h.str("contains_match") {
        legacy(StringPattern::Contains(v.to_string()))
    } else if let Some(r) = h.obj("range_match") {
        let int = |field| {
            r.raw(field)
                .and_then(|v| match v {
                    serde_json::Value::Number(n) => n.as_i64(),
                    serde_json::Value::String(s) => s.parse().ok(),
                    _ => None,
                })
                .unwrap_or(0)
        };
        HeaderMatchKind::Range {
            start: int("start"),
            end: int("end"),
        }
    } else if let Some(p) = h.bool("present_match") {
        HeaderMatchKind::Present(p)
    } else {
        HeaderMatchKind::Present(true)
    };
    Some(HeaderMatcher {
        name: source,
        kind,
        invert: h.bool("invert_match").unwrap_or(false),
        treat_missing_as_empty: h.bool("treat_missing_header_as_empty").unwrap_or(false),
    })
}

fn map_query_parameter_matcher(q: &Obj<'_>) -> Option<QueryParameterMatcher> {
    let name = q.str("name").unwrap_or_default().to_string();
    let kind = if let Some(s) = q.obj("string_match") {
        QueryMatchKind::String(map_string_matcher(&s)?)
    } else if let Some(p) = q.bool("present_match") {
        QueryMatchKind::Present(p)
    } else {
        QueryMatchKind::Exists
    };
    Some(QueryParameterMatcher { name, kind })
}

/// `envoy.config.core.v3.RuntimeFractionalPercent`.
fn map_runtime_fraction(f: &Obj<'_>) -> RuntimeFraction {
    let (numerator, denominator) = f
        .obj("default_value")
        .map(|d| map_fractional_percent(&d))
        .unwrap_or((0, 100));
    RuntimeFraction {
        numerator,
        denominator,
        runtime_key: f
            .str("runtime_key")
            .filter(|k| !k.is_empty())
            .map(str::to_string),
    }
}

/// `envoy.type.v3.FractionalPercent`: (numerator, denominator).
pub fn map_fractional_percent(d: &Obj<'_>) -> (u64, u64) {
    let numerator = d.u64("numerator").unwrap_or(0);
    let denominator = match d.str("denominator").unwrap_or("HUNDRED") {
        "TEN_THOUSAND" => 10_000,
        "MILLION" => 1_000_000,
        _ => 100,
    };
    (numerator, denominator)
}

/// `path_match_policy`: a typed extension, of which Envoy has one.
fn map_path_match_policy(policy: &Obj<'_>) -> Option<UriTemplate> {
    policy.ignore(&["name"]);
    let config = policy.obj("typed_config")?;
    match config.any_type() {
        Some(URI_TEMPLATE_MATCH_TYPE) => {}
        other => {
            config.error(
                "@type",
                format!(
                    "path_match_policy {} is not supported by envoyx",
                    other.unwrap_or("")
                ),
            );
            return None;
        }
    }
    let template = config.str("path_template").unwrap_or_default();
    match uri_template_regex(template) {
        Ok(regex) => match Regex::new(&format!("^(?:{regex})$")) {
            Ok(regex) => Some(UriTemplate {
                template: template.to_string(),
                regex,
                rewrite: None,
            }),
            Err(e) => {
                config.error("path_template", format!("{template} is invalid: {e}"));
                None
            }
        },
        Err(reason) => {
            // Envoy: "path_match_policy.path_template {} is invalid".
            config.error("path_template", format!("{template} is invalid ({reason})"));
            None
        }
    }
}

/// The route's `route.path_rewrite_policy`, compiled against its URI template. Errors
/// are Envoy's: the rewrite needs a template match, shares its variables, and
/// excludes `prefix_rewrite` and `regex_rewrite`.
pub fn map_path_rewrite_policy(route: &Obj<'_>, route_match: &mut RouteMatch) {
    let Some(policy) = route.obj("path_rewrite_policy") else {
        return;
    };
    policy.ignore(&["name"]);
    let Some(config) = policy.obj("typed_config") else {
        return;
    };
    match config.any_type() {
        Some(URI_TEMPLATE_REWRITE_TYPE) => {}
        other => {
            config.error(
                "@type",
                format!(
                    "path_rewrite_policy {} is not supported by envoyx",
                    other.unwrap_or("")
                ),
            );
            return;
        }
    }
    let rewrite = config.str("path_template_rewrite").unwrap_or_default();
    if route.has("prefix_rewrite") || route.has("regex_rewrite") {
        route.errors().push(
            route.path(),
            "Specify only one of prefix_rewrite, regex_rewrite or path_rewrite_policy",
        );
        return;
    }
    let PathMatch::Template(template) = &mut route_match.path else {
        route.error(
            "path_rewrite_policy",
            "unable to use envoy.path.rewrite.uri_template.uri_template_rewriter extension without envoy.path.match.uri_template.uri_template_matcher extension",
        );
        return;
    };
    let segments = match parse_rewrite(rewrite) {
        Ok(s) => s,
        Err(reason) => {
            config.error(
                "path_template_rewrite",
                format!("{rewrite} is invalid ({reason})"),
            );
            return;
        }
    };
    let mut compiled = Vec::with_capacity(segments.len());
    for s in segments {
        match s {
            RawSegment::Literal(l) => compiled.push(RewriteSegment::Literal(l.to_string())),
            RawSegment::Variable(v) => {
                let index = template.regex.capture_names().position(|n| n == Some(v));
                match index {
                    Some(i) => compiled.push(RewriteSegment::Variable(i)),
                    None => {
                        policy.error(
                            "typed_config",
                            format!(
                                "mismatch between variables in path_match_policy {} and path_rewrite_policy {rewrite}",
                                template.template
                            ),
                        );
                        return;
                    }
                }
            }
        }
    }
    template.rewrite = Some(compiled);
}

// ---------------------------------------------------------------------------------
// URI templates, as Envoy's uri_template library parses them
// ---------------------------------------------------------------------------------

/// RFC 3986 pchar without `*` and `=`: what a literal and a glob may contain.
const LITERAL_CHARS: &str = "a-zA-Z0-9\\-._~%!$&'()+,;:@";
const MAX_VARIABLES: usize = 5;
const MAX_VARIABLE_NAME: usize = 16;

fn is_literal_char(c: char) -> bool {
    c.is_ascii_alphanumeric() || "-._~%!$&'()+,;:@".contains(c)
}

fn is_valid_literal(s: &str) -> bool {
    !s.is_empty() && s.chars().all(is_literal_char)
}

fn is_valid_variable_name(s: &str) -> bool {
    let mut chars = s.chars();
    chars.next().is_some_and(|c| c.is_ascii_alphabetic())
        && chars.all(|c| c.is_ascii_alphanumeric() || c == '_')
}

fn escape_literal(s: &str) -> String {
    regex::escape(s)
}

fn glob_regex(text_glob: bool) -> String {
    if text_glob {
        format!("[{LITERAL_CHARS}/]*")
    } else {
        format!("[{LITERAL_CHARS}]+")
    }
}

/// Converts a URI template (`/{lang}/static/{file=**}`, `/*/x/**.css`) to a regex
/// with one named group per variable; the error says why it is invalid.
pub fn uri_template_regex(template: &str) -> Result<String, &'static str> {
    if !template.starts_with('/') || !template.chars().all(|c| c.is_ascii_graphic()) {
        return Err("Invalid pattern");
    }
    let mut rest = &template[1..];
    let mut segments: Vec<String> = Vec::new();
    let mut suffix = String::new();
    let mut names: Vec<&str> = Vec::new();
    // Envoy forbids any glob after a `**`.
    let mut seen_text_glob = false;
    let mut glob = |text: bool| -> Result<String, &'static str> {
        if seen_text_glob {
            return Err("Glob after text glob.");
        }
        seen_text_glob = text;
        Ok(glob_regex(text))
    };
    while !rest.is_empty() {
        let segment = if let Some(after) = rest.strip_prefix("**") {
            rest = after;
            glob(true)?
        } else if let Some(after) = rest.strip_prefix('*') {
            rest = after;
            glob(false)?
        } else if let Some(after) = rest.strip_prefix('{') {
            let Some((var, after)) = after.split_once('}') else {
                return Err("Unmatched variable bracket");
            };
            rest = after;
            let (name, pattern) = match var.split_once('=') {
                Some((n, p)) => (n, Some(p)),
                None => (var, None),
            };
            if !is_valid_variable_name(name) {
                return Err("Invalid variable name");
            }
            if names.len() >= MAX_VARIABLES {
                return Err("Exceeded variable count limit");
            }
            if name.len() > MAX_VARIABLE_NAME {
                return Err("Invalid variable length");
            }
            if names.contains(&name) {
                return Err("Repeated variable name");
            }
            names.push(name);
            let inner = match pattern {
                None => glob(false).map_err(|_| "Implicit variable path glob after text glob.")?,
                Some("") => return Err("Empty variable match"),
                Some(p) => {
                    let mut parts = Vec::new();
                    let mut p = p;
                    while !p.is_empty() {
                        let (part, after) = match p.find('/') {
                            Some(i) => (&p[..i], &p[i..]),
                            None => (p, ""),
                        };
                        let piece = if part == "**" {
                            glob(true)?
                        } else if part == "*" {
                            glob(false)?
                        } else if part.starts_with('*') {
                            return Err("Invalid variable match");
                        } else if is_valid_literal(part) {
                            escape_literal(part)
                        } else {
                            return Err("Invalid literal");
                        };
                        parts.push(piece);
                        p = after;
                        if let Some(after) = p.strip_prefix('/') {
                            if after.is_empty() {
                                return Err("Invalid variable match");
                            }
                            p = after;
                        }
                    }
                    parts.join("/")
                }
            };
            format!("(?P<{name}>{inner})")
        } else {
            let end = rest.find('/').unwrap_or(rest.len());
            let literal = &rest[..end];
            if !is_valid_literal(literal) {
                return Err("Invalid literal");
            }
            rest = &rest[end..];
            escape_literal(literal)
        };
        segments.push(segment);
        if rest.is_empty() {
            break;
        }
        if rest == "/" {
            // A trailing '/' is an empty last segment.
            segments.push(String::new());
            break;
        }
        if let Some(after) = rest.strip_prefix('/') {
            rest = after;
        } else {
            // Text right after a glob or a variable is a suffix and must end the template.
            if rest.contains('/') {
                return Err("Prefix match not supported.");
            }
            if !is_valid_literal(rest) {
                return Err("Invalid literal");
            }
            suffix = escape_literal(rest);
            break;
        }
    }
    Ok(format!("/{}{suffix}", segments.join("/")))
}

enum RawSegment<'a> {
    Literal(&'a str),
    Variable(&'a str),
}

/// Parses a rewrite template (`/{lang}/static/{file}`): literals and `{variable}`s.
fn parse_rewrite(pattern: &str) -> Result<Vec<RawSegment<'_>>, &'static str> {
    if !pattern.starts_with('/') {
        return Err("Invalid rewrite variable placement");
    }
    if pattern.contains("//") {
        return Err("Invalid rewrite literal");
    }
    let mut out = Vec::new();
    let mut rest = pattern;
    while !rest.is_empty() {
        let (literal, after) = match rest.split_once('{') {
            Some((l, a)) => (l, Some(a)),
            None => (rest, None),
        };
        if !literal.is_empty() {
            if !literal.chars().all(|c| is_literal_char(c) || c == '/') {
                return Err("Invalid rewrite literal pattern");
            }
            out.push(RawSegment::Literal(literal));
        }
        let Some(after) = after else { break };
        let Some((name, after)) = after.split_once('}') else {
            return Err("Unmatched variable bracket");
        };
        if !is_valid_variable_name(name) {
            return Err("Invalid variable name");
        }
        out.push(RawSegment::Variable(name));
        rest = after;
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn re(t: &str) -> Regex {
        Regex::new(&format!("^(?:{})$", uri_template_regex(t).unwrap())).unwrap()
    }

    #[test]
    fn uri_templates_match_as_envoy_documents() {
        let r = re("/{lang}/static/{file=**}");
        let c = r.captures("/en/static/css/site.css").unwrap();
        assert_eq!(&c["lang"], "en");
        assert_eq!(&c["file"], "css/site.css");
        assert!(!r.is_match("/en/dynamic/x"));
        assert!(!r.is_match("/en/fr/static/x"));
        let r = re("/*/x/**.css");
        assert!(r.is_match("/a/x/b/c.css"));
        assert!(!r.is_match("/a/x/b/c.js"));
        assert_eq!(uri_template_regex("/api/{v=v*}/"), Err("Invalid literal"));
        assert_eq!(uri_template_regex("/{v=*x}"), Err("Invalid variable match"));
        assert!(re("/a/").is_match("/a/"));
        assert!(!re("/a/").is_match("/a"));
        // `.` is a literal, not any character.
        assert!(!re("/a.b").is_match("/axb"));
    }

    #[test]
    fn invalid_uri_templates_say_why() {
        assert_eq!(uri_template_regex("x"), Err("Invalid pattern"));
        assert_eq!(uri_template_regex("/{a"), Err("Unmatched variable bracket"));
        assert_eq!(uri_template_regex("/{1a}"), Err("Invalid variable name"));
        assert_eq!(
            uri_template_regex("/{a}/{a}"),
            Err("Repeated variable name")
        );
        assert_eq!(uri_template_regex("/**/*"), Err("Glob after text glob."));
        assert_eq!(uri_template_regex("/a b"), Err("Invalid pattern"));
        assert_eq!(uri_template_regex("/a=b"), Err("Invalid literal"));
        assert_eq!(uri_template_regex("/{a=}"), Err("Empty variable match"));
        assert_eq!(
            uri_template_regex("/{a}/{b}/{c}/{d}/{e}/{f}"),
            Err("Exceeded variable count limit")
        );
        assert_eq!(
            uri_template_regex("/*x/y"),
            Err("Prefix match not supported.")
        );
    }

    #[test]
    fn rewrite_templates() {
        assert!(parse_rewrite("/{a}/x/{b}").is_ok());
        assert_eq!(
            parse_rewrite("x/{a}").err(),
            Some("Invalid rewrite variable placement")
        );
        assert_eq!(
            parse_rewrite("/a//{b}").err(),
            Some("Invalid rewrite literal")
        );
        assert_eq!(
            parse_rewrite("/{a").err(),
            Some("Unmatched variable bracket")
        );
        assert_eq!(
            parse_rewrite("/*").err(),
            Some("Invalid rewrite literal pattern")
        );
    }
}
