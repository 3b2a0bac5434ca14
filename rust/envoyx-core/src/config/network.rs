//! Mapping the network filters of a filter chain — the HTTP connection manager
//! (its HTTP filters, route configuration and access logs) and the TCP proxy — onto
//! the model. RDS route configurations and admin access logs use the same mappers.

use std::collections::HashSet;

use serde_json::Value;

use super::local_reply::{
    BodyFormat, BodyFormatKind, BodyText, Comparison, HeaderValueMatch, LocalReplyConfig,
    ReplyFilter, ReplyMapper,
};
use super::model::*;
use super::native_filters::{
    NativeFilterKind, NativeFilterSpec, NativeFilterSpecs, map_fault, map_grpc_stats,
};
use super::reader::Obj;
use super::route::map_inline_route_config;
pub use super::type_urls::*;

pub const UUID_REQUEST_ID_TYPE: &str = "envoy.extensions.request_id.uuid.v3.UuidRequestIdConfig";
/// Envoy's default access log format (`DEFAULT_FORMAT` in substitution_format_string).
pub const DEFAULT_ACCESS_LOG_FORMAT: &str = "[%START_TIME%] \"%REQ(:METHOD)% %REQ(X-ENVOY-ORIGINAL-PATH?:PATH)% %PROTOCOL%\" %RESPONSE_CODE% %RESPONSE_FLAGS% %BYTES_RECEIVED% %BYTES_SENT% %DURATION% %RESP(X-ENVOY-UPSTREAM-SERVICE-TIME)% \"%REQ(X-FORWARDED-FOR)%\" \"%REQ(USER-AGENT)%\" \"%REQ(X-REQUEST-ID)%\" \"%REQ(:AUTHORITY)%\" \"%UPSTREAM_HOST%\"\n";

pub fn map_hcm(hcm: &Obj<'_>) -> Option<HttpConnectionManagerConfig> {
    let stat_prefix = hcm.str("stat_prefix").unwrap_or_default().to_string();
    let codec = match hcm.str("codec_type").unwrap_or("AUTO") {
        "AUTO" => CodecType::Auto,
        "HTTP1" => CodecType::Http1,
        "HTTP2" => CodecType::Http2,
        other => {
            hcm.error("codec_type", format!("{other} is not supported by envoyx"));
            CodecType::Auto
        }
    };
    let (http_filters, native_filters) = map_http_filters(hcm);
    let routes = if let Some(rc) = hcm.obj("route_config") {
        RouteSource::Inline(map_inline_route_config(&rc)?)
    } else if let Some(rds) = hcm.obj("rds") {
        let Some(name) = rds.str("route_config_name") else {
            rds.error("route_config_name", "is required");
            return None;
        };
        // The config source is the Python xDS client's business; it validates it.
        rds.raw("config_source");
        RouteSource::Rds(name.to_string())
    } else if let Some(scoped) = hcm.obj("scoped_routes") {
        RouteSource::Scoped(Box::new(super::scoped_route::map_scoped_routes(&scoped)?))
    } else {
        hcm.error(
            "route_config",
            "one of route_config, rds or scoped_routes is required",
        );
        return None;
    };
    let access_logs = hcm
        .list("access_log")
        .iter()
        .filter_map(map_access_log)
        .collect();
    let mut limits = map_hcm_limits(hcm);
    let options = map_hcm_options(hcm, &mut limits);
    Some(HttpConnectionManagerConfig {
        stat_prefix,
        codec,
        routes,
        access_logs,
        // Empty is unset, as Envoy reads it (proto3 cannot tell them apart).
        server_name: hcm
            .str("server_name")
            .filter(|s| !s.is_empty())
            .unwrap_or("envoy")
            .to_string(),
        generate_request_id: hcm.bool("generate_request_id").unwrap_or(true),
        use_remote_address: hcm.bool("use_remote_address").unwrap_or(false),
        xff_num_trusted_hops: hcm.u32("xff_num_trusted_hops").unwrap_or(0),
        strip_host_port: super::route_match::map_strip_host_port(hcm),
        internal_cidrs: hcm
            .obj("internal_address_config")
            .map(|c| {
                // envoyx listens on IP sockets only: no request comes over a
                // Unix socket, so `unix_sockets` changes nothing.
                c.bool("unix_sockets");
                super::matcher::map_cidrs(&c, "cidr_ranges")
            })
            .unwrap_or_default(),
        forward_client_cert: match hcm.str("forward_client_cert_details").unwrap_or("SANITIZE") {
            "SANITIZE" => ForwardClientCert::Sanitize,
            "FORWARD_ONLY" => ForwardClientCert::ForwardOnly,
            "APPEND_FORWARD" => ForwardClientCert::AppendForward,
            "SANITIZE_SET" => ForwardClientCert::SanitizeSet,
            "ALWAYS_FORWARD_ONLY" => ForwardClientCert::AlwaysForwardOnly,
            other => {
                hcm.error(
                    "forward_client_cert_details",
                    format!("unknown value {other}"),
                );
                ForwardClientCert::Sanitize
            }
        },
        client_cert_details: hcm
            .obj("set_current_client_cert_details")
            .map(|d| ClientCertDetails {
                subject: d.bool("subject").unwrap_or(false),
                cert: d.bool("cert").unwrap_or(false),
                chain: d.bool("chain").unwrap_or(false),
                dns: d.bool("dns").unwrap_or(false),
                uri: d.bool("uri").unwrap_or(false),
            })
            .unwrap_or_default(),
        http_filters,
        native_filters: Box::new(NativeFilterSpecs(native_filters)),
        limits: Box::new(limits),
        options: Box::new(options),
        upgrades: super::upgrade::map_hcm_upgrades(hcm),
    })
}

/// The connection manager's header edits and request-id options, and
/// `http_protocol_options` (its codec switches go into `limits`).
fn map_hcm_options(hcm: &Obj<'_>, limits: &mut HcmLimits) -> HcmOptions {
    let server_header = match hcm
        .str("server_header_transformation")
        .unwrap_or("OVERWRITE")
    {
        "OVERWRITE" => ServerHeaderTransformation::Overwrite,
        "APPEND_IF_ABSENT" => ServerHeaderTransformation::AppendIfAbsent,
        "PASS_THROUGH" => ServerHeaderTransformation::PassThrough,
        other => {
            hcm.error(
                "server_header_transformation",
                format!("unknown value {other}"),
            );
            ServerHeaderTransformation::Overwrite
        }
    };
    let scheme_to_overwrite = hcm.obj("scheme_header_transformation").and_then(|t| {
        // `match_upstream` (the upstream connection's scheme) is not read: refused.
        let scheme = t.str("scheme_to_overwrite")?;
        if scheme != "http" && scheme != "https" {
            t.error("scheme_to_overwrite", "must be http or https");
        }
        Some(scheme.to_string())
    });
    let via = hcm.str("via").filter(|v| !v.is_empty()).map(|v| {
        if http::HeaderValue::from_str(v).is_err() {
            hcm.error("via", "is not a valid header value");
        }
        v.to_string()
    });
    limits.proxy_100_continue = hcm.bool("proxy_100_continue").unwrap_or(false);
    let mut default_host_for_http_10 = None;
    if let Some(h1) = hcm.obj("http_protocol_options") {
        limits.accept_http_10 = h1.bool("accept_http_10").unwrap_or(false);
        limits.allow_chunked_length = h1.bool("allow_chunked_length").unwrap_or(false);
        limits.header_key_format = super::header_key_format::map_header_key_format(&h1);
        default_host_for_http_10 = h1
            .str("default_host_for_http_10")
            .filter(|h| !h.is_empty())
            .map(str::to_string);
    }
    let escaped_slashes = match hcm
        .str("path_with_escaped_slashes_action")
        .unwrap_or("IMPLEMENTATION_SPECIFIC_DEFAULT")
    {
        "IMPLEMENTATION_SPECIFIC_DEFAULT" | "KEEP_UNCHANGED" => EscapedSlashesAction::KeepUnchanged,
        "REJECT_REQUEST" => EscapedSlashesAction::RejectRequest,
        "UNESCAPE_AND_REDIRECT" => EscapedSlashesAction::UnescapeAndRedirect,
        "UNESCAPE_AND_FORWARD" => EscapedSlashesAction::UnescapeAndForward,
        other => {
            hcm.error(
                "path_with_escaped_slashes_action",
                format!("unknown value {other}"),
            );
            EscapedSlashesAction::KeepUnchanged
        }
    };
    if let Some(ext) = hcm.obj("request_id_extension") {
        map_request_id_extension(&ext);
    }
    HcmOptions {
        local_reply: hcm.obj("local_reply_config").map(|c| map_local_reply(&c)),
        normalize_path: hcm.bool("normalize_path").unwrap_or(false),
        merge_slashes: hcm.bool("merge_slashes").unwrap_or(false),
        escaped_slashes,
        skip_xff_append: hcm.bool("skip_xff_append").unwrap_or(false),
        via,
        server_header,
        scheme_to_overwrite,
        preserve_external_request_id: hcm.bool("preserve_external_request_id").unwrap_or(false),
        always_set_request_id_in_response: hcm
            .bool("always_set_request_id_in_response")
            .unwrap_or(false),
        default_host_for_http_10,
    }
}

/// The connection manager's timeouts and `common_http_protocol_options`.
fn map_hcm_limits(hcm: &Obj<'_>) -> HcmLimits {
    let d = HcmLimits::default();
    let timer = |o: &Obj<'_>, key, default| match o.duration(key) {
        Some(t) if t.is_zero() => None,
        Some(t) => Some(t),
        None => default,
    };
    let mut limits = HcmLimits {
        stream_idle_timeout: timer(hcm, "stream_idle_timeout", d.stream_idle_timeout),
        request_timeout: timer(hcm, "request_timeout", None),
        request_headers_timeout: timer(hcm, "request_headers_timeout", None),
        drain_timeout: hcm.duration("drain_timeout").unwrap_or(d.drain_timeout),
        delayed_close_timeout: timer(hcm, "delayed_close_timeout", d.delayed_close_timeout),
        ..d
    };
    if let Some(kb) = hcm.u32("max_request_headers_kb") {
        // Envoy's bounds: (0, 8192].
        if kb == 0 || kb > 8192 {
            hcm.error("max_request_headers_kb", "must be in [1, 8192]");
        }
        limits.max_request_headers_bytes = kb.clamp(1, 8192) as usize * 1024;
    }
    if let Some(common) = hcm.obj("common_http_protocol_options") {
        limits.idle_timeout = timer(&common, "idle_timeout", d.idle_timeout);
        limits.max_connection_duration = timer(&common, "max_connection_duration", None);
        limits.max_stream_duration = timer(&common, "max_stream_duration", None);
        limits.max_requests_per_connection =
            common.u32("max_requests_per_connection").filter(|n| *n > 0);
        if let Some(n) = common.u32("max_headers_count") {
            if n == 0 {
                common.error("max_headers_count", "must be at least 1");
            }
            limits.max_headers_count = n.max(1) as usize;
        }
        limits.headers_with_underscores = match common
            .str("headers_with_underscores_action")
            .unwrap_or("ALLOW")
        {
            "ALLOW" => UnderscoresAction::Allow,
            "REJECT_REQUEST" => UnderscoresAction::RejectRequest,
            "DROP_HEADER" => UnderscoresAction::DropHeader,
            other => {
                common.error(
                    "headers_with_underscores_action",
                    format!("unknown value {other}"),
                );
                UnderscoresAction::Allow
            }
        };
    }
    if let Some(h2) = hcm.obj("http2_protocol_options") {
        if let Some(n) = h2.u32("max_concurrent_streams") {
            limits.h2_max_concurrent_streams = n;
        }
        let window = |key, default| {
            let Some(n) = h2.u32(key) else {
                return default;
            };
            if !(65_535..=2_147_483_647).contains(&n) {
                h2.error(key, "must be in [65535, 2147483647]");
            }
            n
        };
        limits.h2_initial_stream_window_size = window(
            "initial_stream_window_size",
            limits.h2_initial_stream_window_size,
        );
        limits.h2_initial_connection_window_size = window(
            "initial_connection_window_size",
            limits.h2_initial_connection_window_size,
        );
        limits.h2_allow_connect = h2.bool("allow_connect").unwrap_or(false);
    }
    limits
}

/// `request_id_extension`: Envoy's UUID extension is the only one, and the
/// default. Its two switches act on tracing decisions (the trace reason packed
/// into the id, sampling by the id), and envoyx has no tracing: with any values
/// the ids are what the default makes, as in Envoy without a tracer.
fn map_request_id_extension(ext: &Obj<'_>) {
    let Some(tc) = ext.obj("typed_config") else {
        ext.error("typed_config", "is required");
        return;
    };
    match tc.any_type() {
        Some(UUID_REQUEST_ID_TYPE) => {
            tc.bool("pack_trace_reason");
            tc.bool("use_request_id_for_trace_sampling");
        }
        Some(other) => tc.error(
            "@type",
            format!("request id extension {other} is not supported by envoyx"),
        ),
        None => {}
    }
}

/// `local_reply_config`: mappers and the body format.
fn map_local_reply(c: &Obj<'_>) -> LocalReplyConfig {
    let mappers = c
        .list("mappers")
        .iter()
        .filter_map(|m| {
            let Some(filter) = m.obj("filter").and_then(|f| map_reply_filter(&f)) else {
                m.error("filter", "is required");
                return None;
            };
            let status_code = m.u32("status_code").map(|n| {
                if !(200..600).contains(&n) {
                    m.error("status_code", "must be in [200, 600)");
                }
                n as u16
            });
            let body = m.obj("body").and_then(|b| {
                let s = b.str("inline_string");
                if s.is_none() {
                    b.errors()
                        .push(b.path(), "only inline_string is supported by envoyx");
                }
                s.map(|s| bytes::Bytes::copy_from_slice(s.as_bytes()))
            });
            let body_format_override = m
                .obj("body_format_override")
                .and_then(|f| map_body_format(&f));
            let headers_to_add = m
                .list("headers_to_add")
                .iter()
                .filter_map(map_literal_header)
                .collect();
            Some(ReplyMapper {
                filter,
                status_code,
                body,
                body_format_override,
                headers_to_add,
            })
        })
        .collect();
    LocalReplyConfig {
        mappers,
        body_format: c.obj("body_format").and_then(|f| map_body_format(&f)),
    }
}

/// The `AccessLogFilter` kinds a local reply mapper may use.
fn map_reply_filter(f: &Obj<'_>) -> Option<ReplyFilter> {
    if let Some(s) = f.obj("status_code_filter") {
        let cmp = s.obj("comparison")?;
        let op = match cmp.str("op").unwrap_or("EQ") {
            "EQ" => Comparison::Eq,
            "GE" => Comparison::Ge,
            "LE" => Comparison::Le,
            "NE" => Comparison::Ne,
            other => {
                cmp.error("op", format!("unknown value {other}"));
                return None;
            }
        };
        let value = cmp.obj("value")?;
        // The runtime key names a runtime override envoyx has none of: the
        // default value applies, as in Envoy without that key.
        value.str("runtime_key");
        let n = value.u32("default_value").unwrap_or(0);
        return Some(ReplyFilter::Status(op, n.min(u32::from(u16::MAX)) as u16));
    }
    if let Some(r) = f.obj("response_flag_filter") {
        let flags = r
            .raw("flags")
            .and_then(Value::as_array)
            .map(|a| {
                a.iter()
                    .filter_map(|v| v.as_str().map(str::to_string))
                    .collect()
            })
            .unwrap_or_default();
        return Some(ReplyFilter::Flags(flags));
    }
    if let Some(h) = f.obj("header_filter") {
        let header = h.obj("header")?;
        let name = header.str("name").unwrap_or_default();
        let Ok(name) = http::header::HeaderName::from_bytes(name.to_ascii_lowercase().as_bytes())
        else {
            header.error("name", "is not a valid header name");
            return None;
        };
        let invert = header.bool("invert_match").unwrap_or(false);
        let matcher = if let Some(p) = header.bool("present_match") {
            HeaderValueMatch::Present(p)
        } else if let Some(e) = header.str("exact_match") {
            HeaderValueMatch::Exact(e.to_string())
        } else if let Some(sm) = header.obj("string_match") {
            if let Some(e) = sm.str("exact") {
                HeaderValueMatch::Exact(e.to_string())
            } else if let Some(e) = sm.str("prefix") {
                HeaderValueMatch::Prefix(e.to_string())
            } else if let Some(e) = sm.str("suffix") {
                HeaderValueMatch::Suffix(e.to_string())
            } else if let Some(e) = sm.str("contains") {
                HeaderValueMatch::Contains(e.to_string())
            } else {
                sm.errors().push(
                    sm.path(),
                    "envoyx supports exact, prefix, suffix and contains here",
                );
                return None;
            }
        } else {
            HeaderValueMatch::Present(true)
        };
        return Some(ReplyFilter::Header {
            name,
            matcher,
            invert,
        });
    }
    for (key, and) in [("and_filter", true), ("or_filter", false)] {
        if let Some(g) = f.obj(key) {
            let filters: Vec<ReplyFilter> = g
                .list("filters")
                .iter()
                .filter_map(map_reply_filter)
                .collect();
            return Some(if and {
                ReplyFilter::And(filters)
            } else {
                ReplyFilter::Or(filters)
            });
        }
    }
    // Any other filter kind stays unread: refused by name.
    None
}

/// A `SubstitutionFormatString` for local reply bodies.
fn map_body_format(f: &Obj<'_>) -> Option<BodyFormat> {
    let parse = |s: &str, field: &str| match BodyText::parse(s) {
        Ok(t) => Some(t),
        Err(e) => {
            f.error(field, e);
            None
        }
    };
    let (kind, default_type) = if let Some(src) = f.obj("text_format_source") {
        let Some(s) = src.str("inline_string") else {
            src.errors()
                .push(src.path(), "only inline_string is supported by envoyx");
            return None;
        };
        (
            BodyFormatKind::Text(parse(s, "text_format_source")?),
            "text/plain",
        )
    } else if let Some(s) = f.str("text_format") {
        (BodyFormatKind::Text(parse(s, "text_format")?), "text/plain")
    } else if let Some(Value::Object(map)) = f.raw("json_format") {
        let mut fields = Vec::new();
        for (k, v) in map {
            match v {
                Value::String(s) => fields.push((k.clone(), parse(s, "json_format")?)),
                _ => {
                    f.error(
                        &format!("json_format.{k}"),
                        "only string values are supported by envoyx",
                    );
                    return None;
                }
            }
        }
        (BodyFormatKind::Json(fields), "application/json")
    } else {
        f.errors().push(
            f.path(),
            "text_format, text_format_source or json_format is required",
        );
        return None;
    };
    let content_type = f
        .str("content_type")
        .filter(|c| !c.is_empty())
        .unwrap_or(default_type);
    let Ok(content_type) = http::HeaderValue::from_str(content_type) else {
        f.error("content_type", "is not a valid header value");
        return None;
    };
    Some(BodyFormat { kind, content_type })
}

/// A `HeaderValueOption` with a literal value (`append_action` or the older
/// `append`); values with `%` formatters are refused.
fn map_literal_header(o: &Obj<'_>) -> Option<(http::header::HeaderName, http::HeaderValue, bool)> {
    let h = o.obj("header")?;
    let key = h.str("key").unwrap_or_default();
    let value = h.str("value").unwrap_or_default();
    if value.contains('%') {
        h.error(
            "value",
            "formatters in local reply headers are not supported by envoyx",
        );
        return None;
    }
    let append = match o.str("append_action") {
        Some("APPEND_IF_EXISTS_OR_ADD") => true,
        Some("OVERWRITE_IF_EXISTS_OR_ADD") => false,
        Some(other) => {
            o.error(
                "append_action",
                format!("{other} is not supported by envoyx"),
            );
            return None;
        }
        None => o.bool("append").unwrap_or(true),
    };
    match (
        http::header::HeaderName::from_bytes(key.to_ascii_lowercase().as_bytes()),
        http::HeaderValue::from_str(value),
    ) {
        (Ok(n), Ok(v)) => Some((n, v, append)),
        _ => {
            h.error("key", "is not a valid header");
            None
        }
    }
}

/// `http_filters`: native filters (fault, CORS), Python filters, then the router,
/// which must be last.
fn map_http_filters(hcm: &Obj<'_>) -> (Vec<HttpFilterSpec>, Vec<NativeFilterSpec>) {
    let filters = hcm.list("http_filters");
    let mut specs = Vec::new();
    let mut native = Vec::new();
    // envoyx runs its native filters before the Python ones: a native filter after a
    // Python filter would run out of the configured order, so it is refused.
    let mut native_filter =
        |f: &Obj<'_>, name: &str, kind: NativeFilterKind, after_python: bool| {
            if after_python {
                f.error(
                "name",
                format!(
                    "{name}: envoyx runs native filters before Python filters; put it before them"
                ),
            );
            }
            native.push(NativeFilterSpec {
                name: name.to_string(),
                kind,
            });
        };
    let mut names = HashSet::new();
    for (i, f) in filters.iter().enumerate() {
        let name = f.str("name").unwrap_or_default();
        if !names.insert(name) {
            f.error("name", format!("duplicate HTTP filter name {name:?}"));
        }
        let Some(tc) = f.obj("typed_config") else {
            f.error("typed_config", "is required");
            continue;
        };
        let last = i + 1 == filters.len();
        match tc.any_type() {
            Some(ROUTER_TYPE) if last => {}
            Some(ROUTER_TYPE) => f.error("name", "the router must be the last HTTP filter"),
            Some(FAULT_TYPE) if !last => {
                let kind = NativeFilterKind::Fault(std::sync::Arc::new(map_fault(&tc)));
                native_filter(f, name, kind, !specs.is_empty());
            }
            Some(CORS_TYPE) if !last => {
                tc.str("@type");
                native_filter(f, name, NativeFilterKind::Cors, !specs.is_empty());
            }
            Some(GRPC_STATS_TYPE) if !last => {
                let kind = NativeFilterKind::GrpcStats(std::sync::Arc::new(map_grpc_stats(&tc)));
                native_filter(f, name, kind, !specs.is_empty());
            }
            Some(TYPED_STRUCT_TYPE | UDPA_TYPED_STRUCT_TYPE) => {
                if let Some(spec) = map_python_filter(name, &tc) {
                    specs.push(spec);
                }
                if last {
                    f.error(
                        "name",
                        "the last HTTP filter must be envoy.filters.http.router",
                    );
                }
            }
            Some(FAULT_TYPE | CORS_TYPE | GRPC_STATS_TYPE) => {
                tc.ignore(&["@type"]);
                f.error(
                    "name",
                    "the last HTTP filter must be envoy.filters.http.router",
                );
            }
            Some(other) => tc.error(
                "@type",
                format!("HTTP filter {other} is not supported by envoyx"),
            ),
            None => {}
        }
    }
    if filters.is_empty() {
        hcm.error("http_filters", "must end with envoy.filters.http.router");
    }
    (specs, native)
}

/// The TypedStruct of an `envoyx.filters.http.python` filter.
fn map_python_filter(name: &str, tc: &Obj<'_>) -> Option<HttpFilterSpec> {
    let type_url = tc.str("type_url").unwrap_or_default();
    if type_url != PYTHON_FILTER_TYPE {
        tc.error(
            "type_url",
            format!(
                "HTTP filter {type_url:?} is not supported by envoyx (only {PYTHON_FILTER_TYPE})"
            ),
        );
        return None;
    }
    let Some(value) = tc.obj("value") else {
        tc.error("value", "is required: {module, class} or {object}");
        return None;
    };
    let module = value.str("module").map(str::to_string);
    let class = value.str("class").map(str::to_string);
    let object = value.str("object").map(str::to_string);
    match (&module, &class, &object) {
        (Some(_), Some(_), None) | (None, None, Some(_)) => {}
        _ => value.errors().push(
            value.path(),
            "needs `module` and `class`, or `object` (a filter given to envoyx.Server(filters=...))",
        ),
    }
    let defaults = FilterSettings::default();
    let settings = FilterSettings {
        timeout: value.duration("timeout").unwrap_or(defaults.timeout),
        error_status: value
            .struct_uint("error_status")
            .map(|n| {
                if !(200..=599).contains(&n) {
                    value.error("error_status", "must be in [200, 599]");
                }
                n as u16
            })
            .unwrap_or(defaults.error_status),
        max_request_bytes: value
            .struct_uint("max_request_bytes")
            .map_or(defaults.max_request_bytes, |n| n as usize),
        max_response_bytes: value
            .struct_uint("max_response_bytes")
            .map_or(defaults.max_response_bytes, |n| n as usize),
    };
    if settings.timeout.is_zero() {
        value.error("timeout", "must be greater than 0s");
    }
    Some(HttpFilterSpec {
        name: name.to_string(),
        path: value.path().to_string(),
        module,
        class,
        object,
        config: value.raw("config").cloned().unwrap_or(Value::Null),
        settings,
    })
}

pub fn map_tcp_proxy(tc: &Obj<'_>) -> Option<TcpProxyConfig> {
    let stat_prefix = tc.str("stat_prefix").unwrap_or_default().to_string();
    let Some(cluster) = tc.str("cluster") else {
        tc.error(
            "cluster",
            "is required (weighted_clusters are not supported by envoyx)",
        );
        return None;
    };
    let access_logs = tc
        .list("access_log")
        .iter()
        .filter_map(map_access_log)
        .collect();
    Some(TcpProxyConfig {
        stat_prefix,
        cluster: cluster.to_string(),
        access_logs,
    })
}

pub fn map_access_log(al: &Obj<'_>) -> Option<AccessLogConfig> {
    al.str("name");
    let tc = al.obj("typed_config").or_else(|| {
        al.error("typed_config", "is required");
        None
    })?;
    let sink = match tc.any_type()? {
        FILE_LOG_TYPE => AccessLogSink::File(tc.str("path").unwrap_or("/dev/stdout").to_string()),
        STDOUT_LOG_TYPE => AccessLogSink::Stdout,
        STDERR_LOG_TYPE => AccessLogSink::Stderr,
        HTTP_GRPC_LOG_TYPE => {
            return Some(AccessLogConfig {
                sink: AccessLogSink::Grpc(map_grpc_access_log(&tc, GrpcLogKind::Http)?.into()),
                format: AccessLogFormat::Text(String::new()),
            });
        }
        OTEL_LOG_TYPE => {
            return Some(AccessLogConfig {
                sink: AccessLogSink::Grpc(
                    map_grpc_access_log(&tc, GrpcLogKind::OpenTelemetry)?.into(),
                ),
                format: AccessLogFormat::Text(String::new()),
            });
        }
        TCP_GRPC_LOG_TYPE => {
            return Some(AccessLogConfig {
                sink: AccessLogSink::Grpc(map_grpc_access_log(&tc, GrpcLogKind::Tcp)?.into()),
                format: AccessLogFormat::Text(String::new()),
            });
        }
        other => {
            tc.error(
                "@type",
                format!("access logger {other} is not supported by envoyx"),
            );
            return None;
        }
    };
    let format = if let Some(lf) = tc.obj("log_format") {
        map_log_format(&lf)
    } else if let Some(f) = tc.str("format") {
        AccessLogFormat::Text(f.to_string())
    } else {
        AccessLogFormat::Text(DEFAULT_ACCESS_LOG_FORMAT.to_string())
    };
    let formats: Vec<&str> = match &format {
        AccessLogFormat::Text(s) => vec![s.as_str()],
        AccessLogFormat::Json(fields) => fields.iter().map(|(_, v)| v.as_str()).collect(),
    };
    for f in formats {
        if let Err(e) = crate::access_log::Format::parse(f) {
            tc.errors().push(&tc.field_path("log_format"), e);
            return None;
        }
    }
    Some(AccessLogConfig { sink, format })
}

/// `HttpGrpcAccessLogConfig` / `TcpGrpcAccessLogConfig`. Fields envoyx cannot
/// honour stay unread and so are refused by name: `filter_state_objects_to_log`
/// (envoyx keeps no filter state), `custom_tags`, `grpc_stream_retry_policy`,
/// `additional_response_trailers_to_log` (the access-log record keeps no
/// trailers), and of `grpc_service` everything but `envoy_grpc.cluster_name`.
fn map_grpc_access_log(tc: &Obj<'_>, kind: GrpcLogKind) -> Option<GrpcAccessLogConfig> {
    let Some(common) = tc.obj("common_config") else {
        tc.error("common_config", "is required");
        return None;
    };
    let log_name = common.str("log_name").unwrap_or_default();
    if log_name.is_empty() {
        common.error("log_name", "must not be empty");
    }
    // Envoy 1.40 speaks only the v3 transport; an unset enum is AUTO, which is v3 too.
    match common.str("transport_api_version") {
        None | Some("V3") | Some("AUTO") => {}
        Some(other) => common.error(
            "transport_api_version",
            format!("{other} is not supported (only V3)"),
        ),
    }
    let buffer_size_bytes = common.u32("buffer_size_bytes").unwrap_or(16384);
    let buffer_flush_interval = common
        .duration("buffer_flush_interval")
        .unwrap_or(std::time::Duration::from_secs(1));
    let cluster = match common.obj("grpc_service") {
        Some(gs) => match gs.obj("envoy_grpc") {
            Some(eg) => {
                let name = eg.str("cluster_name").unwrap_or_default();
                if name.is_empty() {
                    eg.error("cluster_name", "must not be empty");
                }
                Some(name.to_string())
            }
            None if gs.raw("google_grpc").is_some() => {
                gs.error(
                    "google_grpc",
                    "not supported by envoyx (use envoy_grpc with a cluster)",
                );
                None
            }
            None => {
                gs.error("envoy_grpc", "is required");
                None
            }
        },
        None => {
            common.error("grpc_service", "is required");
            None
        }
    };
    let headers = |key: &'static str| -> Vec<String> {
        tc.strings(key)
            .into_iter()
            .map(str::to_ascii_lowercase)
            .collect()
    };
    let (request_headers, response_headers) = match kind {
        GrpcLogKind::Http => (
            headers("additional_request_headers_to_log"),
            headers("additional_response_headers_to_log"),
        ),
        GrpcLogKind::Tcp | GrpcLogKind::OpenTelemetry => (Vec::new(), Vec::new()),
    };
    let otel = (kind == GrpcLogKind::OpenTelemetry).then(|| map_otel_log(tc));
    Some(GrpcAccessLogConfig {
        kind,
        log_name: log_name.to_string(),
        cluster: cluster?,
        buffer_size_bytes,
        buffer_flush_interval,
        request_headers,
        response_headers,
        otel,
    })
}

/// `OpenTelemetryAccessLogConfig`'s own fields. Values are `string_value`s (a
/// `kvlist_value`, `array_value` or another kind stays unread, so refused by
/// name); `stat_prefix` and `formatters` are refused.
fn map_otel_log(tc: &Obj<'_>) -> OtelLogConfig {
    let check = |o: &Obj<'_>, key: &str, format: &str| {
        if let Err(e) = crate::access_log::Format::parse(format) {
            o.errors().push(&o.field_path(key), e);
        }
    };
    let body = tc.obj("body").and_then(|b| {
        let s = b.str("string_value")?;
        check(&b, "string_value", s);
        Some(s.to_string())
    });
    let key_values = |key: &'static str, formatted: bool| -> Vec<(String, String)> {
        let Some(list) = tc.obj(key) else {
            return Vec::new();
        };
        list.list("values")
            .iter()
            .filter_map(|kv| {
                let k = kv.str("key").unwrap_or_default().to_string();
                let v = kv.obj("value")?;
                let s = v.str("string_value")?;
                if formatted {
                    check(&v, "string_value", s);
                }
                Some((k, s.to_string()))
            })
            .collect()
    };
    OtelLogConfig {
        body,
        attributes: key_values("attributes", true),
        resource_attributes: key_values("resource_attributes", false),
        disable_builtin_labels: tc.bool("disable_builtin_labels").unwrap_or(false),
    }
}

/// `envoy.config.core.v3.SubstitutionFormatString`.
fn map_log_format(lf: &Obj<'_>) -> AccessLogFormat {
    if let Some(src) = lf.obj("text_format_source") {
        if let Some(s) = src.str("inline_string") {
            return AccessLogFormat::Text(s.to_string());
        }
        src.errors()
            .push(src.path(), "only inline_string is supported by envoyx");
    } else if let Some(s) = lf.str("text_format") {
        return AccessLogFormat::Text(s.to_string());
    } else if let Some(Value::Object(map)) = lf.raw("json_format") {
        let mut fields = Vec::new();
        for (k, v) in map {
            match v {
                Value::String(s) => fields.push((k.clone(), s.clone())),
                _ => lf.error(
                    &format!("json_format.{k}"),
                    "only string values are supported by envoyx",
                ),
            }
        }
        return AccessLogFormat::Json(fields);
    }
    AccessLogFormat::Text(DEFAULT_ACCESS_LOG_FORMAT.to_string())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::reader::Errors;
    use serde_json::json;
    use std::time::Duration;

    fn limits(hcm: Value) -> (HcmLimits, Vec<String>) {
        let errors = Errors::default();
        let limits = {
            let obj = Obj::new(&hcm, "hcm".into(), &errors).unwrap();
            map_hcm_limits(&obj)
        };
        (limits, errors.into_vec())
    }

    #[test]
    fn hcm_limits_default_as_envoy_and_zero_disables() {
        let (d, errs) = limits(json!({}));
        assert!(errs.is_empty(), "{errs:?}");
        assert_eq!(d, HcmLimits::default());
        assert_eq!(d.stream_idle_timeout, Some(Duration::from_secs(300)));
        assert_eq!(d.idle_timeout, Some(Duration::from_secs(3600)));
        let (l, errs) = limits(json!({
            "stream_idle_timeout": "0s",
            "request_timeout": "2s",
            "delayed_close_timeout": "0s",
            "common_http_protocol_options": {
                "idle_timeout": "0s",
                "max_requests_per_connection": 0,
                "max_headers_count": 7,
                "headers_with_underscores_action": "DROP_HEADER"
            }
        }));
        assert!(errs.is_empty(), "{errs:?}");
        assert_eq!(l.stream_idle_timeout, None);
        assert_eq!(l.request_timeout, Some(Duration::from_secs(2)));
        assert_eq!(l.delayed_close_timeout, None);
        assert_eq!(l.idle_timeout, None);
        assert_eq!(l.max_requests_per_connection, None);
        assert_eq!(l.max_headers_count, 7);
        assert_eq!(l.headers_with_underscores, UnderscoresAction::DropHeader);
    }

    #[test]
    fn unimplemented_protocol_options_are_refused_by_path() {
        let (_, errs) = limits(json!({
            "common_http_protocol_options": {"max_response_headers_kb": 80}
        }));
        assert_eq!(
            errs,
            vec![
                "hcm.common_http_protocol_options.max_response_headers_kb: not supported by envoyx"
            ]
        );
    }

    fn options(hcm: Value) -> (HcmOptions, Vec<String>) {
        let errors = Errors::default();
        let options = {
            let obj = Obj::new(&hcm, "hcm".into(), &errors).unwrap();
            map_hcm_options(&obj, &mut HcmLimits::default())
        };
        (options, errors.into_vec())
    }

    #[test]
    fn local_reply_config_maps_and_refuses_by_path() {
        let (o, errs) = options(json!({
            "local_reply_config": {
                "mappers": [{
                    "filter": {"status_code_filter": {"comparison": {
                        "op": "GE", "value": {"default_value": 500, "runtime_key": "k"}}}},
                    "status_code": 502,
                    "body": {"inline_string": "down"},
                    "headers_to_add": [{"header": {"key": "X-A", "value": "1"}, "append": false}]
                }],
                "body_format": {"json_format": {"m": "%LOCAL_REPLY_BODY%"}}
            },
            "normalize_path": true,
            "path_with_escaped_slashes_action": "UNESCAPE_AND_REDIRECT"
        }));
        assert!(errs.is_empty(), "{errs:?}");
        let lr = o.local_reply.unwrap();
        assert_eq!(lr.mappers.len(), 1);
        assert_eq!(lr.mappers[0].status_code, Some(502));
        assert!(o.normalize_path);
        assert_eq!(o.escaped_slashes, EscapedSlashesAction::UnescapeAndRedirect);
        let (_, errs) = options(json!({
            "local_reply_config": {"mappers": [{"filter": {"duration_filter": {}}}]},
            "http_protocol_options": {"enable_trailers": true}
        }));
        assert!(
            errs.iter()
                .any(|e| e.contains("mappers[0].filter.duration_filter: not supported")),
            "{errs:?}"
        );
        assert!(
            errs.iter()
                .any(|e| e.contains("http_protocol_options.enable_trailers: not supported")),
            "{errs:?}"
        );
    }
}
