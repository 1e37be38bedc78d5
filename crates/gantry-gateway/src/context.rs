//! Request facts: the per-request context the phases share (`Ctx`), what one scan of the
//! headers finds (`Seen`), request ids, the host (checked and lowercased), and the header rules
//! the pipeline applies to every forwarded request (hop-by-hop fields, forwarding headers, the
//! headers the gateway sets itself: `Added`).

use std::net::SocketAddr;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Instant;

use gantry_http::client::ExtraFields;
use http::header::{self, HeaderMap, HeaderName, HeaderValue};
use http::{Method, Request, Version};

use crate::path;

pub(crate) static X_REQUEST_ID: HeaderName = HeaderName::from_static("x-request-id");
pub(crate) static X_FORWARDED_FOR: HeaderName = HeaderName::from_static("x-forwarded-for");
pub(crate) static X_FORWARDED_PROTO: HeaderName = HeaderName::from_static("x-forwarded-proto");
pub(crate) static X_FORWARDED_HOST: HeaderName = HeaderName::from_static("x-forwarded-host");
pub(crate) static TRACEPARENT: HeaderName = HeaderName::from_static("traceparent");
pub(crate) static KEEP_ALIVE: HeaderName = HeaderName::from_static("keep-alive");
pub(crate) static PROXY_CONNECTION: HeaderName = HeaderName::from_static("proxy-connection");
pub(crate) static X_CACHE: HeaderName = HeaderName::from_static("x-cache");
pub(crate) static RATELIMIT_LIMIT: HeaderName = HeaderName::from_static("ratelimit-limit");
pub(crate) static RATELIMIT_REMAINING: HeaderName = HeaderName::from_static("ratelimit-remaining");
pub(crate) static RATELIMIT_RESET: HeaderName = HeaderName::from_static("ratelimit-reset");

pub(crate) static X_FORWARDED_PREFIX: HeaderName = HeaderName::from_static("x-forwarded-prefix");

/// Request ids: a random per-process prefix and a counter, 32 hex digits.
pub(crate) struct RequestIds {
    prefix: u64,
    next: AtomicU64,
}

impl RequestIds {
    pub(crate) fn new() -> Self {
        Self {
            prefix: crate::rand::next_u64(),
            next: AtomicU64::new(1),
        }
    }

    pub(crate) fn next(&self) -> HeaderValue {
        let n = self.next.fetch_add(1, Ordering::Relaxed);
        let mut buf = [0u8; 32];
        crate::trace::hex_into(&mut buf[..16], self.prefix);
        crate::trace::hex_into(&mut buf[16..], n);
        HeaderValue::from_bytes(&buf).unwrap_or_else(|_| HeaderValue::from_static("0"))
    }
}

/// The per-request context: what the phases learn about a request and hand on to the next
/// (`proxy.rs` runs them). It is what `forward`'s locals and `respond`'s parameters used to
/// carry, in one place.
pub(crate) struct Ctx {
    /// When the request's head was parsed: durations run from here, and the first attempt
    /// starts here (no clock read of its own).
    pub start: Instant,
    /// `start` on the gateway's millisecond clock (`endpoints::ms_at`), read once.
    pub start_ms: u64,
    /// What one pass over the request's headers found.
    pub seen: Seen,
    /// The request id: the client's when sane, else a new one; empty when `request_id` is off
    /// and the client sent none.
    pub request_id: HeaderValue,
    /// The `traceparent` to send upstream (empty when `trace_context` is off).
    pub traceparent: HeaderValue,
    pub trace_id: [u8; 32],
    /// The gateway's span in the trace: the parent id the instance gets (zeros when trace
    /// context is off).
    pub span_id: [u8; 16],
    pub method: Method,
    /// The client's HTTP version (the access log's `protocol`).
    pub version: Version,
    pub host: Host,
    /// The normalized path, when normalizing changed it, then the path the target phase left
    /// (less a version segment); `None`: the request's own.
    pub normalized: Option<String>,
    /// The request's path as it came, for the request's summary (empty unless someone
    /// observes summaries).
    pub path: String,
    pub client: SocketAddr,
    /// The client's connection is TLS (its scheme is `https`).
    pub tls: bool,
    /// When the response head arrived from the instance (the end of the last attempt): the
    /// route's duration ends there, without another clock read.
    pub end: Option<Instant>,
    /// `end` on the millisecond clock.
    pub end_ms: u64,
}

impl Ctx {
    /// The path the route matched (and the upstream path starts from).
    pub(crate) fn path<'a, B>(&'a self, req: &'a Request<B>) -> &'a str {
        self.normalized.as_deref().unwrap_or(req.uri().path())
    }

    /// The facts a request's summary needs, moved out for the end of the response body.
    pub(crate) fn take_for_summary(&mut self) -> Ctx {
        Ctx {
            start: self.start,
            start_ms: self.start_ms,
            end_ms: self.end_ms,
            seen: Seen::default(),
            request_id: self.request_id.clone(),
            traceparent: HeaderValue::from_static(""),
            trace_id: self.trace_id,
            span_id: self.span_id,
            method: self.method.clone(),
            version: self.version,
            host: self.host.take(),
            normalized: None,
            path: std::mem::take(&mut self.path),
            client: self.client,
            tls: self.tls,
            end: self.end,
        }
    }
}

/// The request's host, lowercased and without port: in place when it is short (no allocation,
/// and no reference to the header's shared bytes, whose count is an atomic), else a String.
#[derive(Clone, Default)]
pub(crate) enum Host {
    #[default]
    None,
    Inline {
        len: u8,
        bytes: [u8; HOST_INLINE],
    },
    Owned(String),
}

/// Hosts up to this long are kept in place (the enum is then 56 bytes, what a `HeaderValue`
/// and a length take).
const HOST_INLINE: usize = 54;

impl Host {
    pub(crate) fn lowercase(raw: &str) -> Host {
        if raw.len() <= HOST_INLINE {
            let mut bytes = [0u8; HOST_INLINE];
            bytes[..raw.len()].copy_from_slice(raw.as_bytes());
            bytes[..raw.len()].make_ascii_lowercase();
            Host::Inline {
                len: raw.len() as u8,
                bytes,
            }
        } else {
            Host::Owned(raw.to_ascii_lowercase())
        }
    }

    /// A `Host` value's host, lowercased and without its port, in the one pass that checks it
    /// (`uri-host [":" port]`, as `path::valid_host`); `None` when it is not valid. Every
    /// request's host goes through here.
    pub(crate) fn from_header(v: &[u8]) -> Option<Host> {
        if v.first() == Some(&b'[') {
            // An IPv6 literal: rare, the general path.
            if !path::valid_host(v) {
                return None;
            }
            return Some(Host::lowercase(strip_port(std::str::from_utf8(v).ok()?)));
        }
        let mut bytes = [0u8; HOST_INLINE];
        let mut n = 0;
        while n < v.len() && path::is_host_char(v[n]) {
            if n < HOST_INLINE {
                bytes[n] = v[n].to_ascii_lowercase();
            }
            n += 1;
        }
        if n == 0 || (n < v.len() && (v[n] != b':' || !path::valid_port(&v[n + 1..]))) {
            return None;
        }
        Some(if n <= HOST_INLINE {
            Host::Inline {
                len: n as u8,
                bytes,
            }
        } else {
            Host::Owned(String::from_utf8_lossy(&v[..n]).to_ascii_lowercase())
        })
    }

    pub(crate) fn as_deref(&self) -> Option<&str> {
        match self {
            Host::None => None,
            // ASCII lowercasing of a `str` leaves valid UTF-8.
            Host::Inline { len, bytes } => std::str::from_utf8(&bytes[..*len as usize]).ok(),
            Host::Owned(s) => Some(s),
        }
    }

    pub(crate) fn take(&mut self) -> Host {
        std::mem::take(self)
    }
}

pub(crate) fn is_sane_request_id(v: &HeaderValue) -> bool {
    let b = v.as_bytes();
    !b.is_empty() && b.len() <= 128 && b.iter().all(|c| c.is_ascii_graphic())
}

/// Request-smuggling shapes: both `Content-Length` and `Transfer-Encoding`, or several
/// `Content-Length` headers. (The in-task server refuses these, malformed lengths, bad
/// `Transfer-Encoding` and obs-fold before routing; hyper's parser refuses the latter three.)
pub(crate) fn smuggling(s: &Seen) -> Option<&'static str> {
    if s.content_lengths > 1 {
        return Some("several Content-Length headers");
    }
    if s.content_lengths == 1 && s.transfer_encoding {
        return Some("both Content-Length and Transfer-Encoding");
    }
    None
}

/// The request's host, lowercased and without port: from the target's authority (HTTP/2,
/// absolute form), else `Host`. A host that is not `uri-host [":" port]` is refused (400), in
/// the authority and in `Host` alike (the latter goes upstream as it came).
pub(crate) fn request_host<B>(req: &Request<B>) -> Result<Host, &'static str> {
    let host = req.headers().get(header::HOST);
    match req.uri().authority() {
        Some(a) => {
            if host.is_some_and(|h| !path::valid_host(h.as_bytes())) {
                return Err("invalid Host header");
            }
            if !path::valid_host(a.as_str().as_bytes()) {
                return Err("invalid host in the request target");
            }
            Ok(Host::lowercase(a.host()))
        }
        None => match host {
            None => Ok(Host::None),
            Some(h) => Host::from_header(h.as_bytes()).ok_or("invalid Host header"),
        },
    }
}

/// The host and port the client asked for, as sent (the authority, else `Host`), for messages.
pub(crate) fn asked_authority<B>(req: &Request<B>) -> &str {
    req.uri()
        .authority()
        .map(|a| a.as_str())
        .or_else(|| {
            req.headers()
                .get(header::HOST)
                .and_then(|h| h.to_str().ok())
        })
        .unwrap_or("(none)")
}

/// At most `max` bytes of `s` (cut at a character boundary), for messages that echo input.
pub(crate) fn truncate(s: &str, max: usize) -> &str {
    if s.len() <= max {
        return s;
    }
    let mut end = max;
    while !s.is_char_boundary(end) {
        end -= 1;
    }
    &s[..end]
}

pub(crate) fn strip_port(h: &str) -> &str {
    if h.starts_with('[') {
        return match h.find(']') {
            Some(i) => &h[..=i],
            None => h,
        };
    }
    match h.rsplit_once(':') {
        Some((host, port)) if port.bytes().all(|c| c.is_ascii_digit()) => host,
        _ => h,
    }
}

/// RFC 9110 §7.6.1: remove `Connection` and every header it names, plus the standard
/// hop-by-hop headers. `keep_te_trailers` keeps `TE: trailers` (needed by gRPC over HTTP/2).
pub(crate) fn remove_hop_by_hop(h: &mut HeaderMap, keep_te_trailers: bool) {
    // Most messages have none: one pass over the names (no hashing) decides.
    let any = h.keys().any(|k| {
        *k == header::CONNECTION
            || *k == header::TE
            || *k == header::TRAILER
            || *k == header::TRANSFER_ENCODING
            || *k == header::UPGRADE
            || *k == KEEP_ALIVE
            || *k == PROXY_CONNECTION
    });
    if !any {
        return;
    }
    if h.contains_key(header::CONNECTION) {
        let named: Vec<HeaderName> = h
            .get_all(header::CONNECTION)
            .iter()
            .filter_map(|v| v.to_str().ok())
            .flat_map(|v| v.split(','))
            .filter_map(|t| HeaderName::from_bytes(t.trim().as_bytes()).ok())
            .collect();
        for n in named {
            h.remove(n);
        }
        h.remove(header::CONNECTION);
    }
    let te_trailers = keep_te_trailers
        && h.get(header::TE)
            .is_some_and(|v| v.as_bytes().eq_ignore_ascii_case(b"trailers"));
    for n in [
        &KEEP_ALIVE,
        &PROXY_CONNECTION,
        &header::TE,
        &header::TRAILER,
        &header::TRANSFER_ENCODING,
        &header::UPGRADE,
    ] {
        h.remove(n);
    }
    if te_trailers {
        h.insert(header::TE, HeaderValue::from_static("trailers"));
    }
}

/// `X-Forwarded-For`: the client's chain (if any) with the peer appended.
pub(crate) fn forwarded_for(prev: Option<&HeaderValue>, peer: SocketAddr) -> HeaderValue {
    use std::io::Write;
    let prev = prev
        .map(HeaderValue::as_bytes)
        .filter(|p| !p.iter().all(u8::is_ascii_whitespace));
    let Some(prev) = prev else {
        return gantry_http::ip_value(peer.ip());
    };
    let mut buf = [0u8; 512];
    let mut cur = std::io::Cursor::new(&mut buf[..]);
    let ok = cur.write_all(prev).is_ok() && write!(cur, ", {}", peer.ip()).is_ok();
    let n = cur.position() as usize;
    if ok {
        if let Ok(v) = HeaderValue::from_bytes(&buf[..n]) {
            return v;
        }
    }
    // An absurdly long incoming chain: start a new one rather than grow it.
    gantry_http::ip_value(peer.ip())
}

/// What one pass over a request's headers found: the few values the pipeline reads, and which
/// of its slower edits are needed (no hashing).
#[derive(Default)]
pub(crate) struct Seen {
    /// A `Host` header came (its value is read from the map where needed: a copy of the value
    /// would be a reference-count increment and decrement).
    pub host: bool,
    pub request_id: Option<HeaderValue>,
    pub traceparent: Option<HeaderValue>,
    pub content_lengths: u32,
    pub transfer_encoding: bool,
    pub upgrade: bool,
    pub hop_by_hop: bool,
    pub forwarded_for: bool,
    /// One of the other headers the gateway sets itself.
    pub ours: bool,
    /// A `gantry-*` header (identity headers are the gateway's to set: removed).
    pub gantry: bool,
    /// A `Cookie` header (the session cookie never goes upstream).
    pub cookie: bool,
    /// Names and values, with separators: what the head's header lines weigh.
    pub head_bytes: usize,
}

pub(crate) fn scan(h: &HeaderMap) -> Seen {
    let mut s = Seen::default();
    for (k, v) in h {
        s.head_bytes += k.as_str().len() + v.len() + 4;
        if *k == header::HOST {
            s.host = true;
        } else if *k == header::CONTENT_LENGTH {
            s.content_lengths += 1;
        } else if *k == header::CONNECTION
            || *k == header::TE
            || *k == header::TRAILER
            || *k == KEEP_ALIVE
            || *k == PROXY_CONNECTION
        {
            s.hop_by_hop = true;
        } else if *k == header::TRANSFER_ENCODING {
            s.hop_by_hop = true;
            s.transfer_encoding = true;
        } else if *k == header::UPGRADE {
            s.hop_by_hop = true;
            s.upgrade = true;
        } else if *k == X_FORWARDED_FOR {
            s.forwarded_for = true;
        } else if *k == X_REQUEST_ID {
            s.ours = true;
            if s.request_id.is_none() {
                s.request_id = Some(v.clone());
            }
        } else if *k == TRACEPARENT {
            s.ours = true;
            if s.traceparent.is_none() {
                s.traceparent = Some(v.clone());
            }
        } else if *k == X_FORWARDED_PROTO || *k == X_FORWARDED_HOST || *k == X_FORWARDED_PREFIX {
            s.ours = true;
        } else if *k == header::COOKIE {
            s.cookie = true;
        } else if crate::auth::is_ours(k.as_str()) {
            s.gantry = true;
        }
    }
    s
}

pub(crate) static HTTP: HeaderValue = HeaderValue::from_static("http");
pub(crate) static HTTPS: HeaderValue = HeaderValue::from_static("https");

/// The headers the gateway sets on a forwarded request, kept beside the client's map: the
/// in-task HTTP/1.1 client writes them straight into the request head. A field is `None` when
/// its feature is off (`[gateway] trace_context`, `forwarded_headers`, `request_id`).
#[derive(Clone)]
pub(crate) struct Added {
    pub traceparent: Option<HeaderValue>,
    pub forwarded_for: Option<HeaderValue>,
    pub forwarded_proto: Option<&'static HeaderValue>,
    pub forwarded_host: Option<HeaderValue>,
    /// The path prefix the route took off (or replaced), for applications that build links.
    pub forwarded_prefix: Option<HeaderValue>,
    pub request_id: Option<HeaderValue>,
}

impl Added {
    fn fields(&self) -> [(&'static HeaderName, Option<&HeaderValue>); 6] {
        [
            (&TRACEPARENT, self.traceparent.as_ref()),
            (&X_FORWARDED_FOR, self.forwarded_for.as_ref()),
            (&X_FORWARDED_PROTO, self.forwarded_proto),
            (&X_FORWARDED_HOST, self.forwarded_host.as_ref()),
            (&X_FORWARDED_PREFIX, self.forwarded_prefix.as_ref()),
            (&X_REQUEST_ID, self.request_id.as_ref()),
        ]
    }

    pub(crate) fn get(&self, name: &str) -> Option<&HeaderValue> {
        self.fields()
            .into_iter()
            .find(|(n, _)| n.as_str().eq_ignore_ascii_case(name))
            .and_then(|(_, v)| v)
    }

    pub(crate) fn insert_into(self, h: &mut HeaderMap) {
        self.for_each(|n, v| {
            h.insert(n.clone(), v.clone());
        });
    }
}

impl ExtraFields for Added {
    fn for_each(&self, mut f: impl FnMut(&HeaderName, &HeaderValue)) {
        for (n, v) in self.fields() {
            if let Some(v) = v {
                f(n, v);
            }
        }
    }
}

/// The response's `X-Request-Id`, unless there is none (`request_id` off, none from the client).
pub(crate) fn set_request_id(h: &mut HeaderMap, id: &HeaderValue) {
    if !id.is_empty() {
        h.insert(X_REQUEST_ID.clone(), id.clone());
    }
}

pub(crate) fn is_websocket_upgrade<B>(req: &Request<B>) -> bool {
    req.version() == Version::HTTP_11
        && req
            .headers()
            .get(header::UPGRADE)
            .is_some_and(|v| v.as_bytes().eq_ignore_ascii_case(b"websocket"))
        && req.headers().get_all(header::CONNECTION).iter().any(|v| {
            v.to_str().is_ok_and(|s| {
                s.split(',')
                    .any(|t| t.trim().eq_ignore_ascii_case("upgrade"))
            })
        })
}

pub(crate) fn cookie<'a>(h: &'a HeaderMap, name: &str) -> Option<&'a str> {
    h.get_all(header::COOKIE)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(';'))
        .find_map(|kv| {
            let (k, v) = kv.trim().split_once('=')?;
            (k == name).then_some(v)
        })
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;
    #[test]
    fn hop_by_hop_headers_go() {
        let mut h = HeaderMap::new();
        h.insert(
            header::CONNECTION,
            HeaderValue::from_static("keep-alive, x-secret"),
        );
        h.insert("x-secret", HeaderValue::from_static("1"));
        h.insert("keep-alive", HeaderValue::from_static("timeout=5"));
        h.insert(header::TE, HeaderValue::from_static("trailers"));
        h.insert(
            header::TRANSFER_ENCODING,
            HeaderValue::from_static("chunked"),
        );
        h.insert(header::UPGRADE, HeaderValue::from_static("websocket"));
        h.insert("x-keep", HeaderValue::from_static("1"));
        let mut h2 = h.clone();
        remove_hop_by_hop(&mut h, false);
        assert_eq!(h.len(), 1, "{h:?}");
        assert!(h.contains_key("x-keep"));
        remove_hop_by_hop(&mut h2, true);
        assert_eq!(h2.get(header::TE).unwrap(), "trailers");
    }

    #[test]
    fn smuggling_shapes() {
        let mut h = HeaderMap::new();
        h.append(header::CONTENT_LENGTH, HeaderValue::from_static("5"));
        assert!(smuggling(&scan(&h)).is_none());
        h.append(header::CONTENT_LENGTH, HeaderValue::from_static("5"));
        assert!(smuggling(&scan(&h)).is_some());
        let mut h = HeaderMap::new();
        h.append(header::CONTENT_LENGTH, HeaderValue::from_static("5"));
        h.append(
            header::TRANSFER_ENCODING,
            HeaderValue::from_static("chunked"),
        );
        assert!(smuggling(&scan(&h)).is_some());
    }

    #[test]
    fn one_scan_finds_what_the_pipeline_reads() {
        let mut h = HeaderMap::new();
        h.insert(header::HOST, HeaderValue::from_static("a.example"));
        h.insert(X_REQUEST_ID.clone(), HeaderValue::from_static("rid"));
        h.insert(header::UPGRADE, HeaderValue::from_static("websocket"));
        h.insert("x-other", HeaderValue::from_static("1"));
        let s = scan(&h);
        assert!(s.host);
        assert_eq!(s.request_id.unwrap(), "rid");
        assert!(s.upgrade && s.hop_by_hop && s.ours && !s.forwarded_for);
        assert_eq!(s.head_bytes, (4 + 9) + (12 + 3) + (7 + 9) + (7 + 1) + 4 * 4);
    }

    #[test]
    fn hosts_lose_port_and_case() {
        assert_eq!(strip_port("Example.com:8080"), "Example.com");
        assert_eq!(strip_port("[::1]:80"), "[::1]");
        let req = |uri: &str, host: &str| {
            Request::builder()
                .uri(uri)
                .header("host", host)
                .body(())
                .unwrap()
        };
        let host = |uri: &str, host: &str| request_host(&req(uri, host)).unwrap();
        assert_eq!(
            host("/x", "API.Example.com:80").as_deref(),
            Some("api.example.com")
        );
        assert!(matches!(
            host("/x", "api.example.com:80"),
            Host::Inline { .. }
        ));
        assert_eq!(
            host("/x", "api.example.com:80").as_deref(),
            Some("api.example.com")
        );
        // Past the inline room: a String, lowercased all the same.
        let long = format!("{}.Example.com", "a".repeat(60));
        let with_port = format!("{long}:8443");
        assert!(matches!(host("/x", &with_port), Host::Owned(_)));
        assert_eq!(
            host("/x", &with_port).as_deref(),
            Some(long.to_ascii_lowercase().as_str())
        );
        // The absolute form's authority wins over `Host`.
        assert_eq!(
            host("http://Other.example:81/x", "api.example.com").as_deref(),
            Some("other.example")
        );
    }

    #[test]
    fn one_pass_over_a_host_header_agrees_with_the_general_rules() {
        let long = format!("{}.example.com:80", "A".repeat(60));
        for v in [
            "Example.COM:8080",
            "127.0.0.1",
            "[::1]:80",
            "a b",
            "a:99999",
            "",
            "[::1",
            "host:",
            "x:8o",
            "user@host",
            long.as_str(),
        ] {
            let one = Host::from_header(v.as_bytes());
            let general = path::valid_host(v.as_bytes()).then(|| Host::lowercase(strip_port(v)));
            assert_eq!(
                one.as_ref().and_then(Host::as_deref),
                general.as_ref().and_then(Host::as_deref),
                "{v:?}"
            );
            assert_eq!(one.is_some(), general.is_some(), "{v:?}");
        }
    }

    #[test]
    fn request_ids_are_unique_and_sane() {
        let ids = RequestIds::new();
        let (a, b) = (ids.next(), ids.next());
        assert_ne!(a, b);
        assert!(is_sane_request_id(&a));
        assert_eq!(a.len(), 32);
    }

    #[test]
    fn cookies() {
        let mut h = HeaderMap::new();
        h.insert(
            header::COOKIE,
            HeaderValue::from_static("a=1; sid=xyz; b=2"),
        );
        assert_eq!(cookie(&h, "sid"), Some("xyz"));
        assert_eq!(cookie(&h, "nope"), None);
    }
}
