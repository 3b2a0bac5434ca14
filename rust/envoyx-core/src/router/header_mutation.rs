//! Applying header mutations to a request or a response, as Envoy's
//! `HeaderParser::evaluateHeaders`: the removals first, then every value is
//! formatted against the headers as they are after the removals, then the
//! overwrites are set and last the additions appended. The model and its mapping
//! are [`crate::config::header_mutation`].

use http::{HeaderMap, HeaderValue};

use crate::access_log::{HeaderBytes, StreamFacts};
use crate::config::header_mutation::{
    AppendAction, HeaderFormat, HeaderMutations, HeaderParser, RouteHeaderMutations,
};

impl HeaderParser {
    /// Applies this parser to `headers`; `read_as` tells the formatters which
    /// side `headers` is (`%REQ%` on the request, `%RESP%` on the response).
    fn evaluate(&self, headers: &mut HeaderMap, facts: &StreamFacts<'_>, side: Side) {
        for name in &self.to_remove {
            headers.remove(name);
        }
        if self.to_add.is_empty() {
            return;
        }
        // Values are formatted and presence is checked before any header is
        // set, so that one entry never sees another's value (Envoy's order).
        let mut overwrite: Vec<(usize, HeaderValue)> = Vec::new();
        let mut append: Vec<(usize, HeaderValue)> = Vec::new();
        {
            let mut facts = *facts;
            match side {
                Side::Request => facts.request_headers = Some(headers),
                Side::Response => facts.response_headers = Some(headers),
            }
            let mut buf = HeaderBytes::default();
            for (i, entry) in self.to_add.iter().enumerate() {
                let value = match &entry.value {
                    HeaderFormat::Literal(v) => v.clone(),
                    HeaderFormat::Formatted(f) => {
                        buf.0.clear();
                        f.render_header(&facts, &mut buf);
                        // Every operator's value is a valid header value (the
                        // sources are headers the codecs accepted, addresses and
                        // times); one that is not is left out rather than sent.
                        match HeaderValue::from_bytes(&buf.0) {
                            Ok(v) => v,
                            Err(_) => continue,
                        }
                    }
                };
                if value.is_empty() && !entry.keep_empty {
                    continue;
                }
                let present = || headers.contains_key(&entry.name);
                match entry.action {
                    AppendAction::AppendIfExistsOrAdd => append.push((i, value)),
                    AppendAction::AddIfAbsent => {
                        if !present() {
                            append.push((i, value));
                        }
                    }
                    AppendAction::OverwriteIfExists => {
                        if present() {
                            overwrite.push((i, value));
                        }
                    }
                    AppendAction::OverwriteIfExistsOrAdd => overwrite.push((i, value)),
                }
            }
        }
        for (i, value) in overwrite {
            headers.insert(self.to_add[i].name.clone(), value);
        }
        for (i, value) in append {
            headers.append(self.to_add[i].name.clone(), value);
        }
    }
}

#[derive(Clone, Copy)]
enum Side {
    Request,
    Response,
}

impl HeaderMutations {
    /// `request_headers_to_remove`, then `request_headers_to_add`, on a request's
    /// headers (`facts` for the formatters; its request headers are `headers`).
    pub fn apply_request(&self, headers: &mut HeaderMap, facts: &StreamFacts<'_>) {
        self.request.evaluate(headers, facts, Side::Request);
    }

    /// `response_headers_to_remove`, then `response_headers_to_add`, on a
    /// response's headers (upstream or local; its response headers are `headers`).
    pub fn apply_response(&self, headers: &mut HeaderMap, facts: &StreamFacts<'_>) {
        self.response.evaluate(headers, facts, Side::Response);
    }
}

impl RouteHeaderMutations {
    /// Every level's request mutations, in the route's order.
    pub fn apply_request(&self, headers: &mut HeaderMap, facts: &StreamFacts<'_>) {
        for level in &self.levels {
            level.apply_request(headers, facts);
        }
    }

    /// Every level's response mutations, in the route's order.
    pub fn apply_response(&self, headers: &mut HeaderMap, facts: &StreamFacts<'_>) {
        for level in &self.levels {
            level.apply_response(headers, facts);
        }
    }

    /// Whether a value reads the stream's start time.
    pub fn reads_start_time(&self) -> bool {
        self.levels
            .iter()
            .any(|l| l.request.reads_start_time || l.response.reads_start_time)
    }
}

/// A route's request mutations (and its picked weighted cluster's) with what
/// their formatters read of the request, applied by the router to each try's
/// headers.
pub(crate) struct RequestMutations<'a> {
    /// The weighted cluster entry's, evaluated first whatever
    /// `most_specific_header_mutations_wins` says (Envoy's
    /// `WeightedClusterEntry::finalizeRequestHeaders`).
    cluster: Option<&'a HeaderMutations>,
    route: Option<&'a RouteHeaderMutations>,
    facts: StreamFacts<'a>,
}

impl<'a> RequestMutations<'a> {
    /// None when neither the route nor its picked weighted cluster mutates a
    /// request header: the router then does nothing more per request.
    pub fn of(
        route: &'a crate::config::RouteEntry,
        weighted: Option<&'a crate::config::route_action::ClusterWeight>,
        conn: &'a crate::http::connection::DownstreamConnection,
        authority: &'a str,
        path: &'a str,
        start: Option<std::time::SystemTime>,
    ) -> Option<Self> {
        let mutations = route.header_mutations.as_deref().filter(|m| m.has_request);
        let cluster = weighted
            .and_then(|w| w.header_mutations.as_deref())
            .filter(|m| !m.request.is_empty());
        if mutations.is_none() && cluster.is_none() {
            return None;
        }
        let reads_start = mutations.is_some_and(RouteHeaderMutations::reads_start_time)
            || cluster.is_some_and(|c| c.request.reads_start_time);
        let start = match start {
            None if reads_start => Some(std::time::SystemTime::now()),
            start => start,
        };
        Some(RequestMutations {
            cluster,
            route: mutations,
            facts: StreamFacts {
                start,
                authority,
                path,
                downstream_remote: Some(conn.peer),
                downstream_local: conn.local,
                downstream_tls: conn.tls.as_deref(),
                route_name: &route.name,
                ..Default::default()
            },
        })
    }

    /// Applies the mutations to one try's request headers.
    pub fn apply(&self, headers: &mut HeaderMap, method: &http::Method, version: http::Version) {
        let mut facts = self.facts;
        facts.method = method.as_str();
        facts.protocol = crate::http::headers::protocol_name(version);
        if let Some(cluster) = self.cluster {
            cluster.apply_request(headers, &facts);
        }
        if let Some(route) = self.route {
            route.apply_request(headers, &facts);
        }
    }
}

#[cfg(test)]
mod tests {
    use std::sync::Arc;

    use super::*;
    use crate::config::header_mutation::map_header_mutations;
    use crate::config::reader::{Errors, Obj};

    fn mutations(json: serde_json::Value) -> Result<Arc<HeaderMutations>, Vec<String>> {
        let errors = Errors::default();
        let m = {
            let obj = Obj::new(&json, "route".into(), &errors).unwrap();
            map_header_mutations(&obj)
        };
        if errors.is_empty() {
            Ok(m.expect("mutations"))
        } else {
            Err(errors.into_vec())
        }
    }

    fn headers(pairs: &[(&'static str, &'static str)]) -> HeaderMap {
        let mut h = HeaderMap::new();
        for (k, v) in pairs {
            h.append(*k, HeaderValue::from_static(v));
        }
        h
    }

    fn values(h: &HeaderMap, name: &str) -> Vec<String> {
        h.get_all(name)
            .iter()
            .map(|v| v.to_str().unwrap().to_string())
            .collect()
    }

    #[test]
    fn append_actions_are_envoys() {
        let m = mutations(serde_json::json!({"request_headers_to_add": [
            {"header": {"key": "a", "value": "1"}},
            {"header": {"key": "b", "value": "1"}, "append_action": "ADD_IF_ABSENT"},
            {"header": {"key": "c", "value": "1"}, "append_action": "ADD_IF_ABSENT"},
            {"header": {"key": "d", "value": "1"}, "append_action": "OVERWRITE_IF_EXISTS_OR_ADD"},
            {"header": {"key": "e", "value": "1"}, "append_action": "OVERWRITE_IF_EXISTS"},
            {"header": {"key": "f", "value": "1"}, "append_action": "OVERWRITE_IF_EXISTS"},
            {"header": {"key": "g", "value": "1"}, "append": false},
        ]}))
        .unwrap();
        let mut h = headers(&[
            ("a", "0"),
            ("b", "0"),
            ("d", "0"),
            ("d", "0"),
            ("e", "0"),
            ("g", "0"),
        ]);
        m.apply_request(&mut h, &StreamFacts::default());
        assert_eq!(values(&h, "a"), ["0", "1"]);
        assert_eq!(values(&h, "b"), ["0"]);
        assert_eq!(values(&h, "c"), ["1"]);
        assert_eq!(values(&h, "d"), ["1"]);
        assert_eq!(values(&h, "e"), ["1"]);
        assert!(values(&h, "f").is_empty());
        assert_eq!(values(&h, "g"), ["1"]);
    }

    #[test]
    fn overwrites_come_before_additions_and_presence_is_checked_first() {
        let m = mutations(serde_json::json!({"request_headers_to_add": [
            {"header": {"key": "x", "value": "appended"}},
            {"header": {"key": "x", "value": "set"}, "append_action": "OVERWRITE_IF_EXISTS_OR_ADD"},
            {"header": {"key": "y", "value": "1"}},
            {"header": {"key": "y", "value": "2"}, "append_action": "ADD_IF_ABSENT"},
        ]}))
        .unwrap();
        let mut h = HeaderMap::new();
        m.apply_request(&mut h, &StreamFacts::default());
        assert_eq!(values(&h, "x"), ["set", "appended"]);
        assert_eq!(values(&h, "y"), ["1", "2"]);
    }

    #[test]
    fn removal_comes_first_and_empty_values_are_skipped_unless_kept() {
        let m = mutations(serde_json::json!({
        "request_headers_to_remove": ["x-gone"],
        "request_headers_to_add": [
            {"header": {"key": "x-gone", "value": "new"}, "append_action": "OVERWRITE_IF_EXISTS"},
            {"header": {"key": "x-empty", "value": ""}},
            {"header": {"key": "x-kept", "value": ""}, "keep_empty_value": true},
            {"header": {"key": "x-missing", "value": "%REQ(nope)%"}},
            {"header": {"key": "x-copy", "value": "<%REQ(x-gone)%>"}},
        ]}))
        .unwrap();
        let mut h = headers(&[("x-gone", "old")]);
        m.apply_request(&mut h, &StreamFacts::default());
        assert!(!h.contains_key("x-gone"));
        assert!(!h.contains_key("x-empty"));
        assert_eq!(values(&h, "x-kept"), [""]);
        assert!(!h.contains_key("x-missing"));
        assert_eq!(values(&h, "x-copy"), ["<>"]);
    }

    #[test]
    fn formatters_read_the_request_or_the_response() {
        let m = mutations(serde_json::json!({
        "request_headers_to_add": [
            {"header": {"key": "x-peer", "value": "%DOWNSTREAM_REMOTE_ADDRESS_WITHOUT_PORT%"}},
            {"header": {"key": "x-path", "value": "%REQ(:path)% %REQ(x-a)% %PROTOCOL%"}},
            {"header": {"key": "x-pct", "value": "100%%"}},
        ],
        "response_headers_to_add": [
            {"header": {"key": "x-echo", "value": "%REQ(x-a)%/%RESP(x-b)%/%UPSTREAM_HOST%"}},
        ]}))
        .unwrap();
        let req = headers(&[("x-a", "1")]);
        let facts = StreamFacts {
            path: "/p",
            protocol: "HTTP/1.1",
            downstream_remote: Some("10.0.0.1:5555".parse().unwrap()),
            upstream_host: Some("127.0.0.1:80".parse().unwrap()),
            request_headers: Some(&req),
            ..Default::default()
        };
        let mut h = req.clone();
        m.apply_request(&mut h, &facts);
        assert_eq!(values(&h, "x-peer"), ["10.0.0.1"]);
        assert_eq!(values(&h, "x-path"), ["/p 1 HTTP/1.1"]);
        assert_eq!(values(&h, "x-pct"), ["100%"]);
        let mut resp = headers(&[("x-b", "2")]);
        m.apply_response(&mut resp, &facts);
        assert_eq!(values(&resp, "x-echo"), ["1/2/127.0.0.1:80"]);
    }

    #[test]
    fn levels_apply_in_envoys_order() {
        let level = |v: &str| {
            mutations(serde_json::json!({"response_headers_to_add": [
                {"header": {"key": "x", "value": v}, "append_action": "OVERWRITE_IF_EXISTS_OR_ADD"},
            ]}))
            .unwrap()
        };
        let (route, vhost, global) = (level("route"), level("vhost"), level("global"));
        for (most_specific_wins, winner) in [(false, "global"), (true, "route")] {
            let chain = RouteHeaderMutations::new(
                Some(&route),
                Some(&vhost),
                Some(&global),
                most_specific_wins,
            )
            .unwrap();
            let mut h = HeaderMap::new();
            chain.apply_response(&mut h, &StreamFacts::default());
            assert_eq!(values(&h, "x"), [winner]);
        }
        assert!(RouteHeaderMutations::new(None, None, None, false).is_none());
    }

    #[test]
    fn invalid_options_are_refused_with_their_paths() {
        let errors = mutations(serde_json::json!({
            "request_headers_to_add": [
                {"header": {"key": ":path", "value": "/x"}},
                {"header": {"key": "Host", "value": "h"}},
                {"header": {"key": "x", "value": "1"}, "append": true, "append_action": "ADD_IF_ABSENT"},
                {"header": {"key": "x", "value": "%UPSTREAM_METADATA(a:b)%"}},
                {"header": {"key": "x", "value": "%NOPE%"}},
            ],
            "response_headers_to_remove": [":status", "host"],
        }))
        .unwrap_err();
        assert_eq!(
            errors,
            [
                "route.request_headers_to_add[0].header.key: :-prefixed or host headers may not be modified",
                "route.request_headers_to_add[1].header.key: :-prefixed or host headers may not be modified",
                "route.request_headers_to_add[2].append: Both append and append_action are set and it's not allowed",
                "route.request_headers_to_add[3].header.value: metadata operators (%UPSTREAM_METADATA% and kin) are not supported in header mutations by envoyx",
                "route.request_headers_to_add[4].header.value: Not supported field in StreamInfo: NOPE",
                "route.response_headers_to_remove[0]: :-prefixed or host headers may not be removed",
                "route.response_headers_to_remove[1]: :-prefixed or host headers may not be removed",
            ]
        );
    }

    #[test]
    fn a_level_without_mutations_is_none() {
        let errors = Errors::default();
        let json =
            serde_json::json!({"request_headers_to_add": [], "response_headers_to_remove": []});
        let obj = Obj::new(&json, "route".into(), &errors).unwrap();
        assert!(map_header_mutations(&obj).is_none());
    }
}
