//! Envoy access logs: format strings with command operators, file/stdout/stderr sinks.
//!
//! A format is parsed once when configuration is applied; logging a request only
//! walks the parsed pieces.

use std::fs::OpenOptions;
use std::io::{LineWriter, Write};
use std::net::SocketAddr;
use std::sync::{Arc, Mutex};
use std::time::{Duration, SystemTime};

use http::HeaderMap;

use crate::config::{AccessLogConfig, AccessLogFormat, AccessLogSink};

/// One command operator of Envoy's substitution format language.
#[derive(Debug, Clone, PartialEq)]
enum Operator {
    StartTime(Option<String>),
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
    Hostname,
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
            // `%%` is a literal percent sign; otherwise read up to the closing `%`
            // that ends the operator (parentheses may hold `%`-free text).
            if let Some(stripped) = after.strip_prefix('%') {
                text.push('%');
                rest = stripped;
                continue;
            }
            let end = after.find('%').ok_or_else(|| {
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
        "START_TIME" => Operator::StartTime(arg.filter(|a| !a.is_empty()).map(str::to_string)),
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
        "HOSTNAME" => Operator::Hostname,
        other => return Err(format!("Not supported field in StreamInfo: {other}")),
    })
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
    pub upstream_cluster: Option<String>,
    pub upstream_failure: Option<String>,
    pub downstream_remote: Option<SocketAddr>,
    pub downstream_local: Option<SocketAddr>,
    pub route_name: String,
}

const NONE: &str = "-";

fn header_value<'a>(
    headers: Option<&'a HeaderMap>,
    pseudo: impl Fn(&str) -> Option<&'a str>,
    name: &str,
) -> Option<&'a str> {
    if let Some(v) = pseudo(name) {
        return Some(v);
    }
    headers?.get(name).and_then(|v| v.to_str().ok())
}

fn truncate(s: &str, max: Option<usize>) -> &str {
    match max {
        Some(n) if s.len() > n => {
            let mut end = n;
            while !s.is_char_boundary(end) {
                end -= 1;
            }
            &s[..end]
        }
        _ => s,
    }
}

impl Format {
    pub fn render(&self, r: &LogRecord, out: &mut String) {
        use std::fmt::Write as _;
        for piece in &self.0 {
            match piece {
                Piece::Text(t) => out.push_str(t),
                Piece::Op(op) => match op {
                    Operator::StartTime(fmt) => match r.start {
                        Some(t) => {
                            let dt: chrono::DateTime<chrono::Utc> = t.into();
                            match fmt {
                                Some(f) => {
                                    let _ = write!(out, "{}", dt.format(&f.replace("%f", "%3f")));
                                }
                                None => {
                                    let _ = write!(out, "{}", dt.format("%Y-%m-%dT%H:%M:%S%.3fZ"));
                                }
                            }
                        }
                        None => out.push_str(NONE),
                    },
                    Operator::Req(h, alt, max) => {
                        // An empty pseudo-header (a refused request has none) prints as `-`.
                        let pseudo = |n: &str| {
                            match n {
                                ":method" => Some(r.method.as_str()),
                                ":path" => Some(r.path.as_str()),
                                ":authority" | "host" => Some(r.authority.as_str()),
                                _ => None,
                            }
                            .filter(|v| !v.is_empty())
                        };
                        let v = header_value(r.request_headers.as_ref(), pseudo, h).or_else(|| {
                            alt.as_deref()
                                .and_then(|a| header_value(r.request_headers.as_ref(), pseudo, a))
                        });
                        out.push_str(v.map_or(NONE, |v| truncate(v, *max)));
                    }
                    Operator::Resp(h, alt, max) => {
                        let none = |_: &str| None;
                        let v = header_value(r.response_headers.as_ref(), none, h).or_else(|| {
                            alt.as_deref()
                                .and_then(|a| header_value(r.response_headers.as_ref(), none, a))
                        });
                        out.push_str(v.map_or(NONE, |v| truncate(v, *max)));
                    }
                    Operator::ResponseCode => {
                        let _ = write!(out, "{}", r.response_code);
                    }
                    Operator::ResponseFlags => out.push_str(r.response_flags),
                    Operator::ResponseCodeDetails => out.push_str(r.response_code_details),
                    Operator::BytesReceived => {
                        let _ = write!(out, "{}", r.bytes_received);
                    }
                    Operator::BytesSent => {
                        let _ = write!(out, "{}", r.bytes_sent);
                    }
                    Operator::Duration => {
                        let _ = write!(out, "{}", r.duration.as_millis());
                    }
                    Operator::ResponseDuration => match r.response_duration {
                        Some(d) => {
                            let _ = write!(out, "{}", d.as_millis());
                        }
                        None => out.push_str(NONE),
                    },
                    Operator::Protocol => out.push_str(r.protocol),
                    Operator::UpstreamHost => match r.upstream_host {
                        Some(a) => {
                            let _ = write!(out, "{a}");
                        }
                        None => out.push_str(NONE),
                    },
                    Operator::UpstreamCluster => {
                        out.push_str(r.upstream_cluster.as_deref().unwrap_or(NONE))
                    }
                    Operator::UpstreamTransportFailureReason => {
                        out.push_str(r.upstream_failure.as_deref().unwrap_or(NONE))
                    }
                    Operator::DownstreamRemoteAddress => match r.downstream_remote {
                        Some(a) => {
                            let _ = write!(out, "{a}");
                        }
                        None => out.push_str(NONE),
                    },
                    Operator::DownstreamRemoteAddressWithoutPort => match r.downstream_remote {
                        Some(a) => {
                            let _ = write!(out, "{}", a.ip());
                        }
                        None => out.push_str(NONE),
                    },
                    Operator::DownstreamLocalAddress => match r.downstream_local {
                        Some(a) => {
                            let _ = write!(out, "{a}");
                        }
                        None => out.push_str(NONE),
                    },
                    Operator::RouteName => out.push_str(if r.route_name.is_empty() {
                        NONE
                    } else {
                        &r.route_name
                    }),
                    Operator::Hostname => out.push_str(&hostname()),
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

#[derive(Debug)]
enum CompiledFormat {
    Text(Format),
    Json(Vec<(String, Format)>),
}

/// One configured access logger.
pub struct AccessLogger {
    format: CompiledFormat,
    sink: Mutex<Box<dyn Write + Send>>,
}

impl std::fmt::Debug for AccessLogger {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("AccessLogger")
            .field("format", &self.format)
            .finish_non_exhaustive()
    }
}

impl AccessLogger {
    pub fn open(config: &AccessLogConfig) -> std::io::Result<Arc<Self>> {
        let format = match &config.format {
            AccessLogFormat::Text(s) => {
                CompiledFormat::Text(Format::parse(s).map_err(std::io::Error::other)?)
            }
            AccessLogFormat::Json(fields) => CompiledFormat::Json(
                fields
                    .iter()
                    .map(|(k, v)| Format::parse(v).map(|f| (k.clone(), f)))
                    .collect::<Result<_, _>>()
                    .map_err(std::io::Error::other)?,
            ),
        };
        // Lines are written whole, one write per line, so that tailing readers
        // never see a partial line.
        let sink: Box<dyn Write + Send> = match &config.sink {
            AccessLogSink::File(path) if path == "/dev/stdout" => {
                Box::new(LineWriter::new(std::io::stdout()))
            }
            AccessLogSink::File(path) if path == "/dev/stderr" => {
                Box::new(LineWriter::new(std::io::stderr()))
            }
            AccessLogSink::File(path) => Box::new(LineWriter::new(
                OpenOptions::new().create(true).append(true).open(path)?,
            )),
            AccessLogSink::Stdout => Box::new(LineWriter::new(std::io::stdout())),
            AccessLogSink::Stderr => Box::new(LineWriter::new(std::io::stderr())),
        };
        Ok(Arc::new(AccessLogger {
            format,
            sink: Mutex::new(sink),
        }))
    }

    pub fn log(&self, record: &LogRecord) {
        let mut line = String::with_capacity(256);
        match &self.format {
            CompiledFormat::Text(f) => f.render(record, &mut line),
            CompiledFormat::Json(fields) => {
                let mut map = serde_json::Map::new();
                for (k, f) in fields {
                    let mut v = String::new();
                    f.render(record, &mut v);
                    map.insert(k.clone(), serde_json::Value::String(v));
                }
                line = serde_json::Value::Object(map).to_string();
                line.push('\n');
            }
        }
        let mut sink = self.sink.lock().unwrap_or_else(|e| e.into_inner());
        let _ = sink.write_all(line.as_bytes());
        let _ = sink.flush();
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::bootstrap::DEFAULT_ACCESS_LOG_FORMAT;

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
}
