//! Access-log formats: Envoy's format strings and command operators compiled once,
//! and the record of a request they render. Knows nothing of sinks or config.

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::{Duration, SystemTime};

use chrono::format::{Item, StrftimeItems};
use http::HeaderMap;

use crate::config::metadata::{Metadata, format_value};

/// One command operator of Envoy's substitution format language.
#[derive(Debug, Clone, PartialEq)]
enum Operator {
    StartTime(TimeFormat),
    /// `%REQ(X?Y):Z%`: header X, else Y, truncated to Z bytes.
    Req(String, Option<String>, Option<usize>),
    Resp(String, Option<String>, Option<usize>),
    ResponseCode,
    ResponseFlags,
    ResponseCodeDetails,
    BytesReceived,
    BytesSent,
    Duration,
    ResponseDuration,
    Protocol,
    UpstreamHost,
    UpstreamCluster,
    UpstreamTransportFailureReason,
    DownstreamRemoteAddress,
    DownstreamRemoteAddressWithoutPort,
    DownstreamLocalAddress,
    RouteName,
    /// Read once, when the format is parsed (as Envoy's formatter does).
    Hostname(String),
    /// A fact of the downstream TLS session.
    Tls(TlsField),
    /// `%UPSTREAM_METADATA(NS:KEY*)%`, `%CLUSTER_METADATA(...)%`,
    /// `%METADATA(TYPE:NS:KEY*)%`: a value of that metadata.
    Metadata(MetadataSource, String, Vec<String>),
}

/// Whose metadata a metadata operator reads.
#[derive(Debug, Clone, Copy, PartialEq)]
enum MetadataSource {
    UpstreamHost,
    Cluster,
    Route,
}

/// The downstream TLS operators (`%DOWNSTREAM_PEER_URI_SAN%` and kin).
#[derive(Debug, Clone, Copy, PartialEq)]
enum TlsField {
    PeerUriSan,
    PeerDnsSan,
    PeerSubject,
    PeerIssuer,
    PeerSerial,
    PeerFingerprint256,
    LocalUriSan,
    LocalSubject,
    Version,
    Cipher,
    RequestedServerName,
}

#[derive(Debug, Clone, PartialEq)]
enum Piece {
    Text(String),
    Op(Operator),
}

/// A parsed format string.
#[derive(Debug, Clone, PartialEq)]
pub struct Format(Vec<Piece>);

impl Format {
    pub fn parse(s: &str) -> Result<Self, String> {
        let mut pieces = Vec::new();
        let mut text = String::new();
        let mut rest = s;
        while let Some(start) = rest.find('%') {
            text.push_str(&rest[..start]);
            let after = &rest[start + 1..];
            // `%%` is a literal percent sign; otherwise the operator is a name, an
            // optional `(argument)` that may hold `%` (`%START_TIME(%s.%3f)%`), an
            // optional `:length`, and the closing `%`.
            if let Some(stripped) = after.strip_prefix('%') {
                text.push('%');
                rest = stripped;
                continue;
            }
            let mut end = after
                .find(|c: char| !(c.is_ascii_alphanumeric() || c == '_'))
                .unwrap_or(after.len());
            if after[end..].starts_with('(') {
                if let Some(close) = after[end..].find(')') {
                    end += close + 1;
                }
            }
            end += after[end..].find('%').ok_or_else(|| {
                format!(
                    "Incorrect configuration: {s}. Couldn't find valid command at position {start}"
                )
            })?;
            let command = &after[..end];
            if !text.is_empty() {
                pieces.push(Piece::Text(std::mem::take(&mut text)));
            }
            pieces.push(Piece::Op(parse_operator(command)?));
            rest = &after[end + 1..];
        }
        text.push_str(rest);
        if !text.is_empty() {
            pieces.push(Piece::Text(text));
        }
        Ok(Format(pieces))
    }
}

fn parse_operator(command: &str) -> Result<Operator, String> {
    let (name, arg, max_len) = match command.find('(') {
        Some(open) => {
            let close = command
                .rfind(')')
                .ok_or_else(|| format!("Closing bracket is missing in command: {command}"))?;
            let max_len = match command[close + 1..].strip_prefix(':') {
                Some(n) => Some(
                    n.parse::<usize>()
                        .map_err(|_| format!("Length must be an integer in command: {command}"))?,
                ),
                None => None,
            };
            (&command[..open], Some(&command[open + 1..close]), max_len)
        }
        None => (command, None, None),
    };
    let header = |arg: Option<&str>| -> Result<(String, Option<String>), String> {
        let arg = arg.ok_or_else(|| format!("{name} requires a header name"))?;
        Ok(match arg.split_once('?') {
            Some((main, alt)) => (main.to_ascii_lowercase(), Some(alt.to_ascii_lowercase())),
            None => (arg.to_ascii_lowercase(), None),
        })
    };
    Ok(match name {
        "START_TIME" => Operator::StartTime(TimeFormat::compile(
            arg.filter(|a| !a.is_empty())
                .unwrap_or(DEFAULT_START_TIME_FORMAT),
        )),
        "REQ" => {
            let (h, alt) = header(arg)?;
            Operator::Req(h, alt, max_len)
        }
        "RESP" => {
            let (h, alt) = header(arg)?;
            Operator::Resp(h, alt, max_len)
        }
        "RESPONSE_CODE" => Operator::ResponseCode,
        "RESPONSE_FLAGS" => Operator::ResponseFlags,
        "RESPONSE_CODE_DETAILS" => Operator::ResponseCodeDetails,
        "BYTES_RECEIVED" => Operator::BytesReceived,
        "BYTES_SENT" => Operator::BytesSent,
        "DURATION" => Operator::Duration,
        "RESPONSE_DURATION" => Operator::ResponseDuration,
        "PROTOCOL" => Operator::Protocol,
        "UPSTREAM_HOST" => Operator::UpstreamHost,
        "UPSTREAM_CLUSTER" => Operator::UpstreamCluster,
        "UPSTREAM_TRANSPORT_FAILURE_REASON" => Operator::UpstreamTransportFailureReason,
        "DOWNSTREAM_REMOTE_ADDRESS" => Operator::DownstreamRemoteAddress,
        "DOWNSTREAM_REMOTE_ADDRESS_WITHOUT_PORT" => Operator::DownstreamRemoteAddressWithoutPort,
        "DOWNSTREAM_LOCAL_ADDRESS" => Operator::DownstreamLocalAddress,
        "ROUTE_NAME" => Operator::RouteName,
        "HOSTNAME" => Operator::Hostname(hostname()),
        "DOWNSTREAM_PEER_URI_SAN" => Operator::Tls(TlsField::PeerUriSan),
        "DOWNSTREAM_PEER_DNS_SAN" => Operator::Tls(TlsField::PeerDnsSan),
        "DOWNSTREAM_PEER_SUBJECT" => Operator::Tls(TlsField::PeerSubject),
        "DOWNSTREAM_PEER_ISSUER" => Operator::Tls(TlsField::PeerIssuer),
        "DOWNSTREAM_PEER_SERIAL" => Operator::Tls(TlsField::PeerSerial),
        "DOWNSTREAM_PEER_FINGERPRINT_256" => Operator::Tls(TlsField::PeerFingerprint256),
        "DOWNSTREAM_LOCAL_URI_SAN" => Operator::Tls(TlsField::LocalUriSan),
        "DOWNSTREAM_LOCAL_SUBJECT" => Operator::Tls(TlsField::LocalSubject),
        "DOWNSTREAM_TLS_VERSION" => Operator::Tls(TlsField::Version),
        "DOWNSTREAM_TLS_CIPHER" => Operator::Tls(TlsField::Cipher),
        "REQUESTED_SERVER_NAME" => Operator::Tls(TlsField::RequestedServerName),
        "UPSTREAM_METADATA" | "CLUSTER_METADATA" => {
            let source = if name == "CLUSTER_METADATA" {
                MetadataSource::Cluster
            } else {
                MetadataSource::UpstreamHost
            };
            let (namespace, path) = metadata_key(name, arg, max_len)?;
            Operator::Metadata(source, namespace, path)
        }
        "METADATA" => {
            let arg = arg.unwrap_or_default();
            let (kind, key) = arg.split_once(':').unwrap_or((arg, ""));
            let source = match kind {
                "UPSTREAM_HOST" => MetadataSource::UpstreamHost,
                "CLUSTER" => MetadataSource::Cluster,
                "ROUTE" => MetadataSource::Route,
                other => {
                    return Err(format!(
                        "%METADATA({other}:...)% is not supported by envoyx (CLUSTER, ROUTE and UPSTREAM_HOST are)"
                    ));
                }
            };
            let (namespace, path) = metadata_key(name, Some(key), max_len)?;
            Operator::Metadata(source, namespace, path)
        }
        "DYNAMIC_METADATA" | "UPSTREAM_CLUSTER_METADATA" | "VIRTUAL_CLUSTER_METADATA" => {
            return Err(format!(
                "%{name}% is not supported by envoyx (envoyx keeps no dynamic or virtual-cluster metadata)"
            ));
        }
        other => return Err(format!("Not supported field in StreamInfo: {other}")),
    })
}

/// `NAMESPACE:KEY:...` of a metadata operator (Envoy requires the namespace).
/// Envoy's metadata formatters take no `:length`.
fn metadata_key(
    name: &str,
    arg: Option<&str>,
    max_len: Option<usize>,
) -> Result<(String, Vec<String>), String> {
    if max_len.is_some() {
        return Err(format!("{name} does not allow length to be specified."));
    }
    let mut parts = arg.unwrap_or_default().split(':');
    let namespace = parts.next().filter(|n| !n.is_empty()).ok_or_else(|| {
        format!("{name} requires parameters: a namespace, then keys, separated by ':'")
    })?;
    Ok((namespace.to_string(), parts.map(str::to_string).collect()))
}

/// Everything a log line can refer to, filled in as the request proceeds.
#[derive(Debug, Default)]
pub struct LogRecord {
    pub start: Option<SystemTime>,
    pub request_headers: Option<HeaderMap>,
    /// `:method`, `:path`, `:authority` (pseudo-headers are not in the HeaderMap).
    pub method: String,
    pub path: String,
    pub authority: String,
    pub response_headers: Option<HeaderMap>,
    pub response_code: u16,
    pub response_flags: &'static str,
    pub response_code_details: &'static str,
    pub bytes_received: u64,
    pub bytes_sent: u64,
    pub duration: Duration,
    pub response_duration: Option<Duration>,
    pub protocol: &'static str,
    pub upstream_host: Option<SocketAddr>,
    /// Shared with the cluster: recording it costs a reference count, not a copy.
    pub upstream_cluster: Option<std::sync::Arc<str>>,
    pub upstream_failure: Option<String>,
    pub downstream_remote: Option<SocketAddr>,
    pub downstream_local: Option<SocketAddr>,
    pub route_name: String,
    /// The downstream TLS session, if any.
    pub downstream_tls: Option<std::sync::Arc<crate::tls::PeerTls>>,
    /// The metadata of the upstream host, its cluster and the route, where set.
    pub upstream_metadata: Option<Arc<Metadata>>,
    pub cluster_metadata: Option<Arc<Metadata>>,
    pub route_metadata: Option<Arc<Metadata>>,
}

const NONE: &str = "-";

/// A TLS operator's text (Envoy joins several SANs with `,`).
fn tls_text(t: &crate::tls::PeerTls, field: TlsField) -> Option<String> {
    Some(match field {
        TlsField::PeerUriSan => t.peer()?.uri_sans.join(","),
        TlsField::PeerDnsSan => t.peer()?.dns_sans.join(","),
        TlsField::PeerSubject => t.peer()?.subject.clone(),
        TlsField::PeerIssuer => t.peer()?.issuer.clone(),
        TlsField::PeerSerial => t.peer()?.serial.clone(),
        TlsField::PeerFingerprint256 => t.peer()?.sha256.clone(),
        TlsField::LocalUriSan => t.local()?.uri_sans.join(","),
        TlsField::LocalSubject => t.local()?.subject.clone(),
        TlsField::Version => t.version?.to_string(),
        TlsField::Cipher => t.cipher?.to_string(),
        TlsField::RequestedServerName => t.requested_server_name.as_deref()?.to_string(),
    })
}

/// A header's first value, as bytes: a value may hold obs-text (bytes past
/// 0x7f), which Envoy's formatters copy as they came.
fn header_value<'a>(
    headers: Option<&'a HeaderMap>,
    pseudo: impl Fn(&str) -> Option<&'a str>,
    name: &str,
) -> Option<&'a [u8]> {
    if let Some(v) = pseudo(name) {
        return Some(v.as_bytes());
    }
    headers?.get(name).map(|v| v.as_bytes())
}

fn truncate(s: &[u8], max: Option<usize>) -> &[u8] {
    match max {
        Some(n) if s.len() > n => &s[..n],
        _ => s,
    }
}

/// Where a format renders: an access-log line (text) or a header value (bytes).
pub trait FormatOut: std::fmt::Write {
    fn text(&mut self, s: &str);
    fn bytes(&mut self, b: &[u8]);
}

impl FormatOut for String {
    fn text(&mut self, s: &str) {
        self.push_str(s);
    }
    fn bytes(&mut self, b: &[u8]) {
        self.push_str(&String::from_utf8_lossy(b));
    }
}

/// A header value being rendered.
#[derive(Debug, Default)]
pub struct HeaderBytes(pub Vec<u8>);

impl std::fmt::Write for HeaderBytes {
    fn write_str(&mut self, s: &str) -> std::fmt::Result {
        self.0.extend_from_slice(s.as_bytes());
        Ok(())
    }
}

impl FormatOut for HeaderBytes {
    fn text(&mut self, s: &str) {
        self.0.extend_from_slice(s.as_bytes());
    }
    fn bytes(&mut self, b: &[u8]) {
        self.0.extend_from_slice(b);
    }
}

/// What a format reads of one request: borrowed from a [`LogRecord`] for the
/// access log, or from the request in flight for a header formatter
/// (`request_headers_to_add` and kin), so that both share the operators.
#[derive(Debug, Default, Clone, Copy)]
pub struct StreamFacts<'a> {
    pub start: Option<SystemTime>,
    pub request_headers: Option<&'a HeaderMap>,
    pub method: &'a str,
    pub path: &'a str,
    pub authority: &'a str,
    pub response_headers: Option<&'a HeaderMap>,
    pub response_code: u16,
    pub response_flags: &'a str,
    pub response_code_details: &'a str,
    pub bytes_received: u64,
    pub bytes_sent: u64,
    pub duration: Option<Duration>,
    pub response_duration: Option<Duration>,
    pub protocol: &'a str,
    pub upstream_host: Option<SocketAddr>,
    pub upstream_cluster: Option<&'a str>,
    pub upstream_failure: Option<&'a str>,
    pub downstream_remote: Option<SocketAddr>,
    pub downstream_local: Option<SocketAddr>,
    pub route_name: &'a str,
    pub downstream_tls: Option<&'a crate::tls::PeerTls>,
    pub upstream_metadata: Option<&'a Metadata>,
    pub cluster_metadata: Option<&'a Metadata>,
    pub route_metadata: Option<&'a Metadata>,
}

impl LogRecord {
    pub fn facts(&self) -> StreamFacts<'_> {
        StreamFacts {
            start: self.start,
            request_headers: self.request_headers.as_ref(),
            method: &self.method,
            path: &self.path,
            authority: &self.authority,
            response_headers: self.response_headers.as_ref(),
            response_code: self.response_code,
            response_flags: self.response_flags,
            response_code_details: self.response_code_details,
            bytes_received: self.bytes_received,
            bytes_sent: self.bytes_sent,
            duration: Some(self.duration),
            response_duration: self.response_duration,
            protocol: self.protocol,
            upstream_host: self.upstream_host,
            upstream_cluster: self.upstream_cluster.as_deref(),
            upstream_failure: self.upstream_failure.as_deref(),
            downstream_remote: self.downstream_remote,
            downstream_local: self.downstream_local,
            route_name: &self.route_name,
            downstream_tls: self.downstream_tls.as_deref(),
            upstream_metadata: self.upstream_metadata.as_deref(),
            cluster_metadata: self.cluster_metadata.as_deref(),
            route_metadata: self.route_metadata.as_deref(),
        }
    }
}

impl Format {
    /// An access-log line: an operator without a value prints `-`.
    pub fn render(&self, r: &LogRecord, out: &mut String) {
        self.render_facts(&r.facts(), NONE, out);
    }

    /// A header value (Envoy's formatter with `omit_empty_values`): an operator
    /// without a value prints nothing.
    pub fn render_header(&self, f: &StreamFacts<'_>, out: &mut HeaderBytes) {
        self.render_facts(f, "", out);
    }

    /// Whether the format reads the request's headers (`%REQ(...)%`).
    pub fn reads_request_headers(&self) -> bool {
        self.0
            .iter()
            .any(|p| matches!(p, Piece::Op(Operator::Req(..))))
    }

    /// Whether the format reads metadata (`%UPSTREAM_METADATA%` and kin).
    pub fn reads_metadata(&self) -> bool {
        self.0
            .iter()
            .any(|p| matches!(p, Piece::Op(Operator::Metadata(..))))
    }

    /// Whether the format reads the start time (`%START_TIME%`).
    pub fn reads_start_time(&self) -> bool {
        self.0
            .iter()
            .any(|p| matches!(p, Piece::Op(Operator::StartTime(_))))
    }

    /// The format without operators: its text, when it is only text.
    pub fn as_literal(&self) -> Option<String> {
        let mut s = String::new();
        for p in &self.0 {
            match p {
                Piece::Text(t) => s.push_str(t),
                Piece::Op(_) => return None,
            }
        }
        Some(s)
    }

    fn render_facts<O: FormatOut>(&self, r: &StreamFacts<'_>, none: &str, out: &mut O) {
        for piece in &self.0 {
            match piece {
                Piece::Text(t) => out.text(t),
                Piece::Op(op) => match op {
                    Operator::StartTime(fmt) => match r.start {
                        Some(t) => fmt.render(t, out),
                        None => out.text(none),
                    },
                    Operator::Req(h, alt, max) => {
                        // An empty pseudo-header (a refused request has none) prints as `-`.
                        let pseudo = |n: &str| {
                            match n {
                                ":method" => Some(r.method),
                                ":path" => Some(r.path),
                                ":authority" | "host" => Some(r.authority),
                                _ => None,
                            }
                            .filter(|v| !v.is_empty())
                        };
                        let v = header_value(r.request_headers, pseudo, h).or_else(|| {
                            alt.as_deref()
                                .and_then(|a| header_value(r.request_headers, pseudo, a))
                        });
                        match v {
                            Some(v) => out.bytes(truncate(v, *max)),
                            None => out.text(none),
                        }
                    }
                    Operator::Resp(h, alt, max) => {
                        let no_pseudo = |_: &str| None;
                        let v = header_value(r.response_headers, no_pseudo, h).or_else(|| {
                            alt.as_deref()
                                .and_then(|a| header_value(r.response_headers, no_pseudo, a))
                        });
                        match v {
                            Some(v) => out.bytes(truncate(v, *max)),
                            None => out.text(none),
                        }
                    }
                    Operator::ResponseCode => {
                        let _ = write!(out, "{}", r.response_code);
                    }
                    Operator::ResponseFlags => out.text(r.response_flags),
                    Operator::ResponseCodeDetails => out.text(r.response_code_details),
                    Operator::BytesReceived => {
                        let _ = write!(out, "{}", r.bytes_received);
                    }
                    Operator::BytesSent => {
                        let _ = write!(out, "{}", r.bytes_sent);
                    }
                    Operator::Duration => match r.duration {
                        Some(d) => {
                            let _ = write!(out, "{}", d.as_millis());
                        }
                        None => out.text(none),
                    },
                    Operator::ResponseDuration => match r.response_duration {
                        Some(d) => {
                            let _ = write!(out, "{}", d.as_millis());
                        }
                        None => out.text(none),
                    },
                    Operator::Protocol => out.text(r.protocol),
                    Operator::UpstreamHost => match r.upstream_host {
                        Some(a) => {
                            let _ = write!(out, "{a}");
                        }
                        None => out.text(none),
                    },
                    Operator::UpstreamCluster => out.text(r.upstream_cluster.unwrap_or(none)),
                    Operator::UpstreamTransportFailureReason => {
                        out.text(r.upstream_failure.unwrap_or(none))
                    }
                    Operator::DownstreamRemoteAddress => match r.downstream_remote {
                        Some(a) => {
                            let _ = write!(out, "{a}");
                        }
                        None => out.text(none),
                    },
                    Operator::DownstreamRemoteAddressWithoutPort => match r.downstream_remote {
                        Some(a) => {
                            let _ = write!(out, "{}", a.ip());
                        }
                        None => out.text(none),
                    },
                    Operator::DownstreamLocalAddress => match r.downstream_local {
                        Some(a) => {
                            let _ = write!(out, "{a}");
                        }
                        None => out.text(none),
                    },
                    Operator::RouteName => out.text(if r.route_name.is_empty() {
                        none
                    } else {
                        r.route_name
                    }),
                    Operator::Hostname(name) => out.text(name),
                    Operator::Tls(field) => {
                        let text = r.downstream_tls.and_then(|t| tls_text(t, *field));
                        out.text(text.as_deref().filter(|t| !t.is_empty()).unwrap_or(none));
                    }
                    Operator::Metadata(source, namespace, path) => {
                        let metadata = match source {
                            MetadataSource::UpstreamHost => r.upstream_metadata,
                            MetadataSource::Cluster => r.cluster_metadata,
                            MetadataSource::Route => r.route_metadata,
                        };
                        match metadata.and_then(|m| m.lookup(namespace, path)) {
                            Some(value) => {
                                let mut text = String::new();
                                format_value(value, &mut text);
                                out.text(&text);
                            }
                            None => out.text(none),
                        }
                    }
                },
            }
        }
    }
}

fn hostname() -> String {
    std::fs::read_to_string("/proc/sys/kernel/hostname")
        .map(|s| s.trim().to_string())
        .unwrap_or_else(|_| NONE.to_string())
}

/// Envoy's `%START_TIME%` without an argument: `2016-04-15T20:17:00.310Z`.
const DEFAULT_START_TIME_FORMAT: &str = "%Y-%m-%dT%H:%M:%S.%3fZ";

/// A `%START_TIME(...)%` format, compiled once. strftime specifiers are chrono's;
/// fractional seconds are Envoy's: `%f` is nine digits, `%1f`..`%9f` that many
/// (chrono alone knows only `%3f`, `%6f` and `%9f`).
#[derive(Debug, Clone, PartialEq)]
struct TimeFormat(Vec<TimePiece>);

#[derive(Debug, Clone, PartialEq)]
enum TimePiece {
    Items(Vec<Item<'static>>),
    /// Digits of fractional seconds, truncated.
    Fraction(u32),
}

impl TimeFormat {
    fn compile(format: &str) -> Self {
        fn push_items(pieces: &mut Vec<TimePiece>, text: &mut String) {
            if text.is_empty() {
                return;
            }
            // A run of text holding a specifier chrono does not know is printed
            // as written rather than cut short at it.
            let items = StrftimeItems::new(text)
                .parse_to_owned()
                .unwrap_or_else(|_| vec![Item::OwnedLiteral(text.as_str().into())]);
            pieces.push(TimePiece::Items(items));
            text.clear();
        }
        let mut pieces = Vec::new();
        let mut text = String::new();
        let mut chars = format.chars().peekable();
        while let Some(c) = chars.next() {
            if c != '%' {
                text.push(c);
                continue;
            }
            let mut ahead = chars.clone();
            let digits = match (ahead.next(), ahead.next()) {
                (Some('f'), _) => Some((9, 1)),
                (Some(d @ '1'..='9'), Some('f')) => Some((d.to_digit(10).unwrap_or(9), 2)),
                _ => None,
            };
            match digits {
                Some((digits, len)) => {
                    push_items(&mut pieces, &mut text);
                    pieces.push(TimePiece::Fraction(digits));
                    for _ in 0..len {
                        chars.next();
                    }
                }
                None => {
                    // `%%` stays one unit so that `%%f` is a literal `%f`.
                    text.push('%');
                    if chars.peek() == Some(&'%') {
                        text.push('%');
                        chars.next();
                    }
                }
            }
        }
        push_items(&mut pieces, &mut text);
        TimeFormat(pieces)
    }

    fn render(&self, t: SystemTime, out: &mut impl std::fmt::Write) {
        let dt: chrono::DateTime<chrono::Utc> = t.into();
        for piece in &self.0 {
            match piece {
                TimePiece::Items(items) => {
                    let _ = write!(out, "{}", dt.format_with_items(items.iter()));
                }
                TimePiece::Fraction(digits) => {
                    // A leap second shows as nanoseconds past 1e9; keep nine digits.
                    let nanos = dt.timestamp_subsec_nanos() % 1_000_000_000;
                    let value = nanos / 10u32.pow(9 - digits);
                    let _ = write!(out, "{value:0width$}", width = *digits as usize);
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::network::DEFAULT_ACCESS_LOG_FORMAT;

    #[test]
    fn default_format_renders_like_envoy() {
        let f = Format::parse(DEFAULT_ACCESS_LOG_FORMAT).unwrap();
        let mut headers = HeaderMap::new();
        headers.insert("user-agent", "curl/8".parse().unwrap());
        let r = LogRecord {
            start: Some(SystemTime::UNIX_EPOCH + Duration::from_millis(1_460_751_420_310)),
            request_headers: Some(headers),
            method: "GET".into(),
            path: "/x".into(),
            authority: "h".into(),
            response_code: 200,
            response_flags: "-",
            bytes_sent: 12,
            duration: Duration::from_millis(3),
            protocol: "HTTP/1.1",
            upstream_host: Some("127.0.0.1:80".parse().unwrap()),
            ..Default::default()
        };
        let mut out = String::new();
        f.render(&r, &mut out);
        assert_eq!(
            out,
            "[2016-04-15T20:17:00.310Z] \"GET /x HTTP/1.1\" 200 - 0 12 3 - \"-\" \"curl/8\" \"-\" \"h\" \"127.0.0.1:80\"\n"
        );
    }

    #[test]
    fn unknown_operator_is_an_error() {
        assert_eq!(
            Format::parse("%NOPE%").unwrap_err(),
            "Not supported field in StreamInfo: NOPE"
        );
    }

    #[test]
    fn percent_escape_and_truncation() {
        let f = Format::parse("100%% %REQ(:PATH):2%").unwrap();
        let r = LogRecord {
            path: "/abc".into(),
            ..Default::default()
        };
        let mut out = String::new();
        f.render(&r, &mut out);
        assert_eq!(out, "100% /a");
    }

    #[test]
    fn start_time_fractions_are_envoys() {
        // 2016-04-15T20:17:00.310123456Z
        let t = SystemTime::UNIX_EPOCH + Duration::from_nanos(1_460_751_420_310_123_456);
        let f = Format::parse("%START_TIME(%H:%M:%S.%f|%1f|%3f|%6f|%9f|%s|%%f)%").unwrap();
        let r = LogRecord {
            start: Some(t),
            ..Default::default()
        };
        let mut out = String::new();
        f.render(&r, &mut out);
        assert_eq!(
            out,
            "20:17:00.310123456|3|310|310123|310123456|1460751420|%f"
        );
    }

    #[test]
    fn hostname_is_read_when_parsed() {
        let f = Format::parse("%HOSTNAME%").unwrap();
        let expected = hostname();
        assert!(matches!(&f.0[..], [Piece::Op(Operator::Hostname(h))] if *h == expected));
    }
}
