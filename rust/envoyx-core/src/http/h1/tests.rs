//! The codec's parsing, fed whole and in random splits: valid and malformed
//! requests, random bytes. No panic, and the same result however reads split.

use bytes::Bytes;
use http_body::Frame;

use super::body::{BodyState, InBuf, ReadSide, Step, decode};
use super::head::{self, Framing, MAX_HEAD, Parsed};

/// What a byte stream parses into, as the connection would see it.
#[derive(Debug, PartialEq, Eq, Clone)]
enum Event {
    Head(String, String, Vec<(String, Vec<u8>)>),
    Body(Vec<u8>),
    Trailers(Vec<(String, Vec<u8>)>),
    Refused(u16, &'static str),
    BodyError(&'static str),
    /// The stream ended with this many bytes unparsed.
    Incomplete(usize),
}

fn read_side() -> ReadSide {
    ReadSide {
        buf: None,
        body: BodyState::Done,
        eof: false,
        expect_continue: None,
        continue_gate: None,
        waiter: None,
        ahead: false,
    }
}

fn push(read: &mut ReadSide, mut data: &[u8]) -> bool {
    let buf = read.buf.get_or_insert_with(InBuf::new);
    while !data.is_empty() {
        let Some(space) = buf.space_mut() else {
            return false;
        };
        let n = space.len().min(data.len());
        space[..n].copy_from_slice(&data[..n]);
        buf.advance(n);
        data = &data[n..];
    }
    true
}

/// Runs the codec's parsing over `chunks`, one read each.
fn run(chunks: &[&[u8]]) -> Vec<Event> {
    let mut events = Vec::new();
    let mut read = read_side();
    let mut body = Vec::new();
    let mut in_body = false;
    for chunk in chunks {
        if !push(&mut read, chunk) {
            events.push(Event::Refused(431, "buffer"));
            return events;
        }
        loop {
            if in_body {
                match decode(&mut read) {
                    Step::Frame(f) => match f.into_data() {
                        Ok(d) => body.extend_from_slice(&d),
                        Err(f) => {
                            let t = f.into_trailers().ok().unwrap_or_default();
                            events.push(Event::Body(std::mem::take(&mut body)));
                            events.push(Event::Trailers(
                                t.iter()
                                    .map(|(n, v)| (n.to_string(), v.as_bytes().to_vec()))
                                    .collect(),
                            ));
                            in_body = false;
                        }
                    },
                    Step::End => {
                        if read.body == BodyState::Done && in_body {
                            events.push(Event::Body(std::mem::take(&mut body)));
                            in_body = false;
                        }
                    }
                    Step::NeedMore => break,
                    Step::Fail(why) => {
                        events.push(Event::BodyError(why));
                        return events;
                    }
                }
                if read.body == BodyState::Done && in_body {
                    events.push(Event::Body(std::mem::take(&mut body)));
                    in_body = false;
                }
                continue;
            }
            let Some(buf) = read.buf.as_mut() else { break };
            if buf.pending().is_empty() {
                break;
            }
            match head::parse(buf.pending()) {
                Parsed::Partial => break,
                Parsed::Refused(r) => {
                    events.push(Event::Refused(r.status, r.details));
                    return events;
                }
                Parsed::Head(h, len) => {
                    buf.consume(len);
                    let req = &h.request;
                    events.push(Event::Head(
                        req.method().to_string(),
                        req.uri().to_string(),
                        req.headers()
                            .iter()
                            .map(|(n, v)| (n.to_string(), v.as_bytes().to_vec()))
                            .collect(),
                    ));
                    read.body = match h.framing {
                        Framing::None => BodyState::Done,
                        Framing::Length(n) => BodyState::Length(n),
                        Framing::Chunked => BodyState::ChunkSize,
                    };
                    in_body = true;
                    if read.body == BodyState::Done {
                        events.push(Event::Body(Vec::new()));
                        in_body = false;
                    }
                }
            }
        }
    }
    let left = read.buf.as_ref().map_or(0, |b| b.pending().len());
    if in_body || left > 0 {
        events.push(Event::Incomplete(left));
    }
    events
}

/// A small deterministic generator (xorshift64*).
struct Rng(u64);

impl Rng {
    fn next(&mut self) -> u64 {
        self.0 ^= self.0 >> 12;
        self.0 ^= self.0 << 25;
        self.0 ^= self.0 >> 27;
        self.0.wrapping_mul(0x2545_f491_4f6c_dd1d)
    }

    fn below(&mut self, n: usize) -> usize {
        (self.next() % n as u64) as usize
    }
}

fn split<'a>(rng: &mut Rng, data: &'a [u8]) -> Vec<&'a [u8]> {
    let mut out = Vec::new();
    let mut rest = data;
    while !rest.is_empty() {
        let n = match rng.below(4) {
            0 => 1,
            1 => 1 + rng.below(8),
            _ => 1 + rng.below(rest.len()),
        }
        .min(rest.len());
        out.push(&rest[..n]);
        rest = &rest[n..];
    }
    out
}

fn corpus() -> Vec<Vec<u8>> {
    let mut c: Vec<Vec<u8>> = [
        &b"GET / HTTP/1.1\r\nHost: x\r\n\r\n"[..],
        b"GET /a?b=c HTTP/1.1\r\nhost: x\r\nx-a: 1\r\nx-a: 2\r\n\r\nGET /b HTTP/1.1\r\nhost: y\r\n\r\n",
        b"POST /u HTTP/1.1\r\nhost: x\r\ncontent-length: 5\r\n\r\nhelloGET / HTTP/1.1\r\nhost: x\r\n\r\n",
        b"POST /c HTTP/1.1\r\nhost: x\r\ntransfer-encoding: chunked\r\n\r\n5\r\nhello\r\n1a;ext=1\r\nabcdefghijklmnopqrstuvwxyz\r\n0\r\n\r\n",
        b"POST /t HTTP/1.1\r\nhost: x\r\ntransfer-encoding: chunked\r\n\r\n3\r\nabc\r\n0\r\nx-trailer: yes\r\nx-other: 2\r\n\r\nHEAD / HTTP/1.1\r\nhost: x\r\n\r\n",
        b"GET http://example.com/abs HTTP/1.1\r\nhost: example.com\r\nconnection: close\r\n\r\n",
        b"PUT /e HTTP/1.1\r\nhost: x\r\nexpect: 100-continue\r\ncontent-length: 3\r\n\r\nabc",
        b"POST / HTTP/1.1\r\nHost: x\r\nContent-Length: 3\r\nTransfer-Encoding: chunked\r\n\r\n",
        b"POST / HTTP/1.1\r\nTransfer-Encoding: gzip\r\n\r\n",
        b"POST / HTTP/1.1\r\ncontent-length: 1\r\ncontent-length: 2\r\n\r\nab",
        b"POST / HTTP/1.1\r\ncontent-length: +1\r\n\r\na",
        b"GET / HTTP/1.0\r\n\r\n",
        b"GET / HTTP/9.9\r\n\r\n",
        b"GET /\r\nhost: x\r\n\r\n",
        b"GET /a b c HTTP/1.1\r\nhost: x\r\n\r\n",
        b"GARBAGE\r\n\r\n",
        b"GET /ok HTTP/1.1\r\nHost: x\r\n\r\nGARBAGE\r\n\r\n",
        b"POST /bad HTTP/1.1\r\nhost: x\r\ntransfer-encoding: chunked\r\n\r\nzz\r\nhello\r\n0\r\n\r\n",
        b"POST /bad HTTP/1.1\r\nhost: x\r\ntransfer-encoding: chunked\r\n\r\n3\r\nabcXY0\r\n\r\n",
        b"POST /short HTTP/1.1\r\nhost: x\r\ncontent-length: 100\r\n\r\npartial",
        b"GET / HTTP/1.1\r\nhost: x\r\n",
        b"GET / HTTP/1.1\r\nbad header\r\n\r\n",
        b"GET / HTTP/1.1\r\nx: \x7f\r\n\r\n",
    ]
    .iter()
    .map(|r| r.to_vec())
    .collect();
    let mut many = b"GET / HTTP/1.1\r\n".to_vec();
    for i in 0..101 {
        many.extend_from_slice(format!("x-{i}: v\r\n").as_bytes());
    }
    many.extend_from_slice(b"\r\n");
    c.push(many);
    let mut big = b"GET / HTTP/1.1\r\nx: ".to_vec();
    big.extend(std::iter::repeat_n(b'a', MAX_HEAD + 1));
    c.push(big);
    c
}

#[test]
fn same_parse_however_reads_split() {
    let mut rng = Rng(0x9e37_79b9_7f4a_7c15);
    for request in corpus() {
        let whole = run(&[&request]);
        for _ in 0..200 {
            let parts = split(&mut rng, &request);
            assert_eq!(
                run(&parts),
                whole,
                "{:?} split as {parts:?}",
                String::from_utf8_lossy(&request)
            );
        }
    }
}

#[test]
fn random_and_mutated_bytes_never_panic() {
    let mut rng = Rng(42);
    let corpus = corpus();
    for _ in 0..20_000 {
        let mut input = corpus[rng.below(corpus.len())].clone();
        for _ in 0..=rng.below(6) {
            match rng.below(4) {
                0 if !input.is_empty() => {
                    let i = rng.below(input.len());
                    input[i] = rng.next() as u8;
                }
                1 if !input.is_empty() => {
                    let i = rng.below(input.len());
                    input.remove(i);
                }
                2 => {
                    let i = rng.below(input.len() + 1);
                    let b = b"\r\n: ;0aZ \t\x00\xff"[rng.below(12)];
                    input.insert(i, b);
                }
                _ => {
                    let n = rng.below(64);
                    input.extend((0..n).map(|_| rng.next() as u8));
                }
            }
        }
        let whole = run(&[&input]);
        let parts = split(&mut rng, &input);
        assert_eq!(run(&parts), whole, "{input:?}");
    }
}

#[test]
fn expected_parses() {
    let ev = run(&[b"POST /t HTTP/1.1\r\nhost: x\r\ntransfer-encoding: chunked\r\n\r\n3\r\nabc\r\n0\r\nx-trailer: yes\r\n\r\n"]);
    assert_eq!(ev[1], Event::Body(b"abc".to_vec()));
    assert_eq!(
        ev[2],
        Event::Trailers(vec![("x-trailer".into(), b"yes".to_vec())])
    );
    let status = |r: &[u8]| match run(&[r]).last() {
        Some(Event::Refused(s, _)) => Some(*s),
        _ => None,
    };
    let corpus = corpus();
    assert_eq!(status(&corpus[7]), Some(400), "both framings");
    assert_eq!(status(&corpus[8]), Some(501), "not exactly chunked");
    assert_eq!(status(&corpus[9]), Some(400), "content-lengths disagree");
    assert_eq!(status(&corpus[11]), Some(426), "HTTP/1.0");
    assert_eq!(status(&corpus[12]), Some(426), "HTTP/9.9");
    assert_eq!(status(&corpus[13]), Some(426), "HTTP/0.9");
    assert_eq!(status(&corpus[14]), Some(400), "spaces in the target");
    assert_eq!(status(&corpus[15]), Some(400), "garbage");
    assert_eq!(status(corpus.last().unwrap()), Some(431), "too large");
    assert_eq!(status(&corpus[corpus.len() - 2]), Some(431), "too many");
    assert!(matches!(
        run(&[&corpus[16]])[..],
        [Event::Head(..), Event::Body(_), Event::Refused(400, _)]
    ));
    assert!(matches!(
        run(&[&corpus[17]]).last(),
        Some(Event::BodyError(_))
    ));
    assert!(matches!(
        run(&[&corpus[18]]).last(),
        Some(Event::BodyError(_))
    ));
    let _: Option<Frame<Bytes>> = None;
}

#[test]
fn response_heads_as_hyper_writes_them() {
    use head::{BodyLength, Encoder, encode_response};
    let mut parts = http::Response::new(()).into_parts().0;
    parts.headers.insert("server", "envoy".parse().unwrap());
    let mut out = Vec::new();
    let (enc, last) = encode_response(&mut parts, BodyLength::Known(12), false, true, &mut out);
    let text = String::from_utf8(out).unwrap();
    assert!(text.starts_with("HTTP/1.1 200 OK\r\nserver: envoy\r\ncontent-length: 12\r\ndate: "));
    assert!(text.ends_with(" GMT\r\n\r\n"));
    assert_eq!((enc, last), (Encoder::Length(12), false));

    let mut parts = http::Response::new(()).into_parts().0;
    parts.status = http::StatusCode::NOT_FOUND;
    let mut out = Vec::new();
    let (enc, last) = encode_response(&mut parts, BodyLength::Unknown, false, false, &mut out);
    let text = String::from_utf8(out).unwrap();
    assert!(text.starts_with(
        "HTTP/1.1 404 Not Found\r\nconnection: close\r\ntransfer-encoding: chunked\r\ndate: "
    ));
    assert_eq!((enc, last), (Encoder::Chunked(None), true));

    let mut parts = http::Response::new(()).into_parts().0;
    parts.headers.insert("content-length", "5".parse().unwrap());
    let mut out = Vec::new();
    let (enc, _) = encode_response(&mut parts, BodyLength::Empty, true, true, &mut out);
    assert!(
        String::from_utf8(out)
            .unwrap()
            .contains("content-length: 5\r\n")
    );
    assert_eq!(enc, Encoder::None);
}

/// The state an idle connection keeps lives in these futures (the request's own
/// state is boxed while it runs).
#[test]
fn connection_futures_are_small() {
    fn size<A, B, C, F>(_: fn(A, B, C) -> F) -> usize {
        std::mem::size_of::<F>()
    }
    let h1 = size(super::conn::serve);
    eprintln!("HTTP/1 connection future: {h1} bytes");
    assert!(h1 <= 512, "{h1}");
}

#[test]
fn head_rules_count_headers_and_screen_underscores() {
    use crate::config::UnderscoresAction;
    use head::{HeadRules, RefusalCause, parse_with};
    let req = b"GET / HTTP/1.1\r\nhost: x\r\nx_a: 1\r\nx-b: 2\r\n\r\n";
    let rules = |max_headers, underscores| HeadRules {
        max_headers,
        underscores,
        ..HeadRules::default()
    };
    let Parsed::Head(h, _) = parse_with(req, rules(3, UnderscoresAction::Allow)) else {
        panic!("three headers are allowed");
    };
    assert!(h.request.headers().contains_key("x_a"));
    let Parsed::Refused(r) = parse_with(req, rules(2, UnderscoresAction::Allow)) else {
        panic!("three headers are too many");
    };
    assert_eq!((r.status, r.details), (431, "http1.too_many_headers"));
    let Parsed::Head(h, _) = parse_with(req, rules(100, UnderscoresAction::DropHeader)) else {
        panic!("dropped, not refused");
    };
    assert!(!h.request.headers().contains_key("x_a"));
    assert_eq!(h.dropped_underscores, 1);
    let Parsed::Refused(r) = parse_with(req, rules(100, UnderscoresAction::RejectRequest)) else {
        panic!("refused");
    };
    assert_eq!(
        (r.status, r.details, r.cause),
        (400, "http1.unexpected_underscore", RefusalCause::Underscore)
    );
    // More than the default 100 slots when configured so.
    let mut many = b"GET / HTTP/1.1\r\n".to_vec();
    for i in 0..150 {
        many.extend(format!("x-{i}: v\r\n").as_bytes());
    }
    many.extend(b"\r\n");
    assert!(matches!(
        parse_with(&many, rules(150, UnderscoresAction::Allow)),
        Parsed::Head(..)
    ));
    assert!(matches!(
        parse_with(&many, rules(149, UnderscoresAction::Allow)),
        Parsed::Refused(_)
    ));
}

#[test]
fn heads_screened_as_envoy() {
    use head::{HeadRules, Parsed, parse, parse_with};
    let refused = |r: &[u8]| match parse(r) {
        Parsed::Refused(refusal) => Some(refusal.status),
        _ => None,
    };
    assert_eq!(refused(b"GET * HTTP/1.1\r\nhost: x\r\n\r\n"), Some(400));
    assert_eq!(refused(b"OPTIONS * HTTP/1.1\r\nhost: x\r\n\r\n"), None);
    let te2 = b"POST / HTTP/1.1\r\nhost: x\r\ntransfer-encoding: chunked\r\ntransfer-encoding: chunked\r\n\r\n";
    assert_eq!(refused(te2), Some(501));
    assert_eq!(
        refused(b"POST / HTTP/1.1\r\nhost: x\r\ntransfer-encoding: CHUNKED\r\n\r\n"),
        None
    );
    // An absolute-form target names the host.
    let Parsed::Head(h, _) =
        parse(b"GET http://abs.example:8080/p?q HTTP/1.1\r\nhost: other\r\n\r\n")
    else {
        panic!("refused")
    };
    assert_eq!(h.request.uri(), "/p?q");
    assert_eq!(h.request.headers()["host"], "abs.example:8080");
    // Expect: 100-continue is answered, not forwarded.
    let Parsed::Head(h, _) =
        parse(b"PUT / HTTP/1.1\r\nhost: x\r\nexpect: 100-continue\r\ncontent-length: 1\r\n\r\n")
    else {
        panic!("refused")
    };
    assert!(h.expect_continue && !h.request.headers().contains_key("expect"));
    // HTTP/1.0 when accepted: it closes unless asked to keep the connection.
    let rules = HeadRules {
        accept_http_10: true,
        allow_chunked_length: true,
        ..HeadRules::default()
    };
    let Parsed::Head(h, _) = parse_with(b"GET / HTTP/1.0\r\n\r\n", rules) else {
        panic!("refused")
    };
    assert_eq!(h.request.version(), http::Version::HTTP_10);
    assert!(!h.keep_alive);
    let Parsed::Head(h, _) = parse_with(b"GET / HTTP/1.0\r\nconnection: keep-alive\r\n\r\n", rules)
    else {
        panic!("refused")
    };
    assert!(h.keep_alive);
    let both =
        b"POST / HTTP/1.1\r\nhost: x\r\ncontent-length: 3\r\ntransfer-encoding: chunked\r\n\r\n";
    let Parsed::Head(h, _) = parse_with(both, rules) else {
        panic!("refused")
    };
    assert!(!h.request.headers().contains_key("content-length"));
    assert_eq!(refused(both), Some(400));
    let small = HeadRules {
        max_head: 64,
        ..HeadRules::default()
    };
    let big = [
        &b"GET / HTTP/1.1\r\nhost: x\r\nx: "[..],
        &[b'a'; 80],
        b"\r\n\r\n",
    ]
    .concat();
    assert!(matches!(parse_with(&big, small), Parsed::Refused(r) if r.status == 431));
}
