//! The request path, as one pipeline. Every filter a request passes is here, in this order:
//!
//!  1. hardening: request-smuggling shapes are refused, the path is normalized (or refused);
//!  2. request id (`X-Request-Id`, kept when sane) and trace context (`traceparent`);
//!  3. route: host, path, method, headers, query against the current table (404 when none);
//!     a redirect route answers here;
//!  4. rate limit (429 with `Retry-After` and `RateLimit-*`), body-size limit (413);
//!  5. target: version from a header or path segment, else a weighted backend;
//!  6. cache: a fresh hit answers here; a stale entry with validators is revalidated;
//!  7. service circuit breaker (503 while open) and bulkhead (503 when full);
//!  8. upstream request: path rewrite, hop-by-hop headers dropped (RFC 9110 §7.6.1),
//!     `X-Forwarded-*`, request id, `traceparent`, configured header changes;
//!  9. mirror: a copy to the shadow target, not awaited (a body is copied as it is sent, and
//!     the copy is abandoned rather than ever slowing the primary);
//! 10. attempts: pick an instance (P2C-EWMA, round robin or hash; local first), connect from the
//!     pool, send with the per-try timeout; on failure retry where safe, within the retry budget,
//!     with jittered backoff; outlier ejection and EWMA learn from every attempt;
//! 11. response: hop-by-hop dropped, header changes, request id; streamed back (WebSocket
//!     upgrades are spliced), cached if allowed; metrics and the access log at the end.

use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use bytes::Bytes;
use gantry_http::client::{self, ErrorKind, ExtraFields, Mode, Outgoing, SendError};
use gantry_http::pool::Target;
use gantry_http::{timer, tunnel, ClientBody, ConnInfo, ConnTimer, Deferred, RequestBody};
use http::header::{self, HeaderMap, HeaderName, HeaderValue};
use http::uri::PathAndQuery;
use http::{Method, Request, Response, StatusCode, Uri, Version};
use http_body::Body as _;

use crate::body::{InflightGuard, ReqBody, RespBody, Tee, UpstreamBody};
use crate::cache::{self, CacheKey, Lookup};
use crate::resilience::{backoff, ejection_allowed, Admission, BreakerChange, OutlierVerdict};
use crate::table::{
    clock_ms, hash64, ms_at, Action, CompiledRoute, EndpointSet, ForwardAction, PathRewrite,
    RequestView, ServiceState,
};
use crate::{path, trace, Gateway};

pub(crate) static X_REQUEST_ID: HeaderName = HeaderName::from_static("x-request-id");
static X_FORWARDED_FOR: HeaderName = HeaderName::from_static("x-forwarded-for");
static X_FORWARDED_PROTO: HeaderName = HeaderName::from_static("x-forwarded-proto");
static X_FORWARDED_HOST: HeaderName = HeaderName::from_static("x-forwarded-host");
static TRACEPARENT: HeaderName = HeaderName::from_static("traceparent");
static KEEP_ALIVE: HeaderName = HeaderName::from_static("keep-alive");
static PROXY_CONNECTION: HeaderName = HeaderName::from_static("proxy-connection");
static X_CACHE: HeaderName = HeaderName::from_static("x-cache");
static RATELIMIT_LIMIT: HeaderName = HeaderName::from_static("ratelimit-limit");
static RATELIMIT_REMAINING: HeaderName = HeaderName::from_static("ratelimit-remaining");
static RATELIMIT_RESET: HeaderName = HeaderName::from_static("ratelimit-reset");

/// Copies a route's mirror may have in flight; more are skipped (and counted). Bounds the
/// sockets and tasks a hung shadow can hold (each copy waits at most connect + 30 s).
const MIRROR_MAX_IN_FLIGHT: i64 = 256;

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

    fn next(&self) -> HeaderValue {
        let n = self.next.fetch_add(1, Ordering::Relaxed);
        let mut buf = [0u8; 32];
        crate::trace::hex_into(&mut buf[..16], self.prefix);
        crate::trace::hex_into(&mut buf[16..], n);
        HeaderValue::from_bytes(&buf).unwrap_or_else(|_| HeaderValue::from_static("0"))
    }
}

/// Why the gateway answered a request itself.
#[derive(Clone, Copy, Debug)]
pub(crate) enum Reject {
    NoRoute,
    NoInstance,
    NoVersion,
    UpstreamError,
    UpstreamTimeout,
    BadRequest(&'static str),
    /// Refused by the HTTP/1.1 parser or framing rules (smuggling shapes among them).
    Malformed(&'static str),
    TooLarge,
    HeadTooLarge,
    /// The request head did not arrive within `header_read_timeout_ms`.
    HeadTimeout,
    /// `max_connections` client connections are open.
    TooManyConnections,
    RateLimited,
    CircuitOpen,
    Bulkhead,
}

impl Reject {
    fn status(self) -> StatusCode {
        match self {
            Reject::NoRoute => StatusCode::NOT_FOUND,
            Reject::NoInstance
            | Reject::NoVersion
            | Reject::CircuitOpen
            | Reject::Bulkhead
            | Reject::TooManyConnections => StatusCode::SERVICE_UNAVAILABLE,
            Reject::HeadTimeout => StatusCode::REQUEST_TIMEOUT,
            Reject::UpstreamError => StatusCode::BAD_GATEWAY,
            Reject::UpstreamTimeout => StatusCode::GATEWAY_TIMEOUT,
            Reject::BadRequest(_) | Reject::Malformed(_) => StatusCode::BAD_REQUEST,
            Reject::TooLarge => StatusCode::PAYLOAD_TOO_LARGE,
            Reject::HeadTooLarge => StatusCode::REQUEST_HEADER_FIELDS_TOO_LARGE,
            Reject::RateLimited => StatusCode::TOO_MANY_REQUESTS,
        }
    }

    fn code(self) -> &'static str {
        match self {
            Reject::NoRoute => "no_route",
            Reject::NoInstance => "no_healthy_instance",
            Reject::NoVersion => "no_matching_version",
            Reject::UpstreamError => "upstream_unavailable",
            Reject::UpstreamTimeout => "upstream_timeout",
            Reject::BadRequest(_) => "bad_request",
            Reject::Malformed(_) => "malformed_request",
            Reject::TooLarge => "body_too_large",
            Reject::HeadTooLarge => "request_head_too_large",
            Reject::HeadTimeout => "header_read_timeout",
            Reject::TooManyConnections => "max_connections",
            Reject::RateLimited => "rate_limited",
            Reject::CircuitOpen => "circuit_open",
            Reject::Bulkhead => "concurrency_limit",
        }
    }
}

/// What the access log and metrics need about one request.
struct Ctx {
    start: Instant,
    request_id: HeaderValue,
    /// The `traceparent` to send upstream.
    traceparent: HeaderValue,
    trace_id: [u8; 32],
    method: Method,
    /// The client's HTTP version (the access log's `protocol`).
    version: Version,
    /// When the response head arrived from the instance (the end of the last attempt): the
    /// route's duration ends there, without another clock read.
    end: Option<Instant>,
    path: String,
    client: SocketAddr,
    host: Host,
}

/// The request's host, lowercased and without port: in place when it is short (no allocation,
/// and no reference to the header's shared bytes, whose count is an atomic), else a String.
#[derive(Clone, Default)]
enum Host {
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
    fn lowercase(raw: &str) -> Host {
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

    fn as_deref(&self) -> Option<&str> {
        match self {
            Host::None => None,
            // ASCII lowercasing of a `str` leaves valid UTF-8.
            Host::Inline { len, bytes } => std::str::from_utf8(&bytes[..*len as usize]).ok(),
            Host::Owned(s) => Some(s),
        }
    }

    fn take(&mut self) -> Host {
        std::mem::take(self)
    }
}

fn is_idempotent(m: &Method) -> bool {
    matches!(
        *m,
        Method::GET | Method::HEAD | Method::OPTIONS | Method::TRACE | Method::PUT | Method::DELETE
    )
}

fn is_sane_request_id(v: &HeaderValue) -> bool {
    let b = v.as_bytes();
    !b.is_empty() && b.len() <= 128 && b.iter().all(|c| c.is_ascii_graphic())
}

/// Request-smuggling shapes: both `Content-Length` and `Transfer-Encoding`, or several
/// `Content-Length` headers. (The in-task server refuses these, malformed lengths, bad
/// `Transfer-Encoding` and obs-fold before routing; hyper's parser refuses the latter three.)
fn smuggling(s: &Seen) -> Option<&'static str> {
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
fn request_host<B>(req: &Request<B>) -> Result<Host, &'static str> {
    let host = req.headers().get(header::HOST);
    if let Some(h) = host {
        if !path::valid_host(h.as_bytes()) {
            return Err("invalid Host header");
        }
    }
    let raw = match req.uri().authority() {
        Some(a) => {
            if !path::valid_host(a.as_str().as_bytes()) {
                return Err("invalid host in the request target");
            }
            a.host()
        }
        None => match host.map(HeaderValue::to_str) {
            Some(Ok(s)) => strip_port(s),
            _ => return Ok(Host::None),
        },
    };
    Ok(Host::lowercase(raw))
}

/// The host and port the client asked for, as sent (the authority, else `Host`), for messages.
fn asked_authority<B>(req: &Request<B>) -> &str {
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
fn truncate(s: &str, max: usize) -> &str {
    if s.len() <= max {
        return s;
    }
    let mut end = max;
    while !s.is_char_boundary(end) {
        end -= 1;
    }
    &s[..end]
}

fn strip_port(h: &str) -> &str {
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
fn remove_hop_by_hop(h: &mut HeaderMap, keep_te_trailers: bool) {
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
struct Seen {
    /// A `Host` header came (its value is read from the map where needed: a copy of the value
    /// would be a reference-count increment and decrement).
    host: bool,
    request_id: Option<HeaderValue>,
    traceparent: Option<HeaderValue>,
    content_lengths: u32,
    transfer_encoding: bool,
    upgrade: bool,
    hop_by_hop: bool,
    forwarded_for: bool,
    /// One of the other headers the gateway sets itself.
    ours: bool,
    /// Names and values, with separators: what the head's header lines weigh.
    head_bytes: usize,
}

fn scan(h: &HeaderMap) -> Seen {
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
        } else if *k == X_FORWARDED_PROTO || *k == X_FORWARDED_HOST {
            s.ours = true;
        }
    }
    s
}

static HTTP: HeaderValue = HeaderValue::from_static("http");
static HTTPS: HeaderValue = HeaderValue::from_static("https");

/// The headers the gateway sets on a forwarded request, kept beside the client's map: the
/// in-task HTTP/1.1 client writes them straight into the request head. A field is `None` when
/// its feature is off (`[gateway] trace_context`, `forwarded_headers`, `request_id`).
#[derive(Clone)]
pub(crate) struct Added {
    traceparent: Option<HeaderValue>,
    forwarded_for: Option<HeaderValue>,
    forwarded_proto: Option<&'static HeaderValue>,
    forwarded_host: Option<HeaderValue>,
    request_id: Option<HeaderValue>,
}

impl Added {
    fn fields(&self) -> [(&'static HeaderName, Option<&HeaderValue>); 5] {
        [
            (&TRACEPARENT, self.traceparent.as_ref()),
            (&X_FORWARDED_FOR, self.forwarded_for.as_ref()),
            (&X_FORWARDED_PROTO, self.forwarded_proto),
            (&X_FORWARDED_HOST, self.forwarded_host.as_ref()),
            (&X_REQUEST_ID, self.request_id.as_ref()),
        ]
    }

    fn get(&self, name: &str) -> Option<&HeaderValue> {
        self.fields()
            .into_iter()
            .find(|(n, _)| n.as_str().eq_ignore_ascii_case(name))
            .and_then(|(_, v)| v)
    }

    fn insert_into(self, h: &mut HeaderMap) {
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
fn set_request_id(h: &mut HeaderMap, id: &HeaderValue) {
    if !id.is_empty() {
        h.insert(X_REQUEST_ID.clone(), id.clone());
    }
}

fn is_websocket_upgrade<B>(req: &Request<B>) -> bool {
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

fn cookie<'a>(h: &'a HeaderMap, name: &str) -> Option<&'a str> {
    h.get_all(header::COOKIE)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(';'))
        .find_map(|kv| {
            let (k, v) = kv.trim().split_once('=')?;
            (k == name).then_some(v)
        })
}

/// Outcome of one attempt, for retries, outlier detection and the breaker. (A short-lived local:
/// boxing the large variant would cost an allocation per request for nothing.)
#[allow(clippy::large_enum_variant)]
enum Attempt {
    Response(Response<ClientBody>),
    /// No response: refused, reset, or the connection died (and whether any of it left).
    Failed(SendError),
    TimedOut,
}

/// Work done when a forwarded response's body ends: release the service slot, store the body in
/// the cache, write the access log.
pub(crate) struct RequestEnd {
    _service_slot: ServiceSlot,
    /// Boxed, like `log`: both are opt-in, and every response body in flight carries this.
    /// With the gateway, which stores the body in its cache.
    cache: Option<Box<(Arc<Gateway>, CacheFill)>>,
    log: Option<Box<LogFill>>,
}

/// What the access-log line at a response's end needs: the request's context, route id,
/// instance id, status, upstream time.
type LogFill = (Ctx, Arc<str>, String, u16, Duration);

/// What a cacheable response's end stores: key, request headers, status, response headers,
/// freshness lifetime.
type CacheFill = (CacheKey, HeaderMap, StatusCode, HeaderMap, u64);

impl RequestEnd {
    /// `complete`: the body reached its end; `body`: its bytes if they were captured.
    pub(crate) fn on_end(&mut self, complete: bool, bytes: u64, body: Option<Bytes>) {
        if let (Some(fill), Some(body)) = (self.cache.take(), body) {
            let (gw, (key, req_h, status, resp_h, fresh)) = *fill;
            if complete {
                gw.cache
                    .insert(&key, &req_h, status, resp_h, body, fresh, clock_ms());
                gw.metrics.cache("stored");
            }
        }
        if let Some(log) = self.log.take() {
            let (ctx, route, upstream, status, upstream_time) = *log;
            access_log(
                &ctx,
                &route,
                &upstream,
                status,
                bytes,
                Some(upstream_time),
                complete,
            );
        }
    }
}

/// A request counted against its service's concurrency limit.
struct ServiceSlot(Arc<ServiceState>);

impl Drop for ServiceSlot {
    fn drop(&mut self) {
        self.0.inflight.fetch_sub(1, Ordering::Relaxed);
    }
}

/// One JSON line per request on stderr (when `[gateway] access_log = true`).
fn access_log(
    ctx: &Ctx,
    route: &str,
    upstream: &str,
    status: u16,
    bytes: u64,
    upstream_time: Option<Duration>,
    complete: bool,
) {
    use std::io::Write;
    let line = serde_json::json!({
        "ts_ms": gantry_model::unix_ms(),
        "type": "access",
        "request_id": ctx.request_id.to_str().unwrap_or(""),
        "trace_id": std::str::from_utf8(&ctx.trace_id).unwrap_or(""),
        "method": ctx.method.as_str(),
        "protocol": format!("{:?}", ctx.version),
        "host": ctx.host.as_deref().unwrap_or(""),
        "path": ctx.path,
        "route": route,
        "upstream": upstream,
        "status": status,
        "bytes": bytes,
        "complete": complete,
        "upstream_ms": upstream_time.map_or(0.0, |d| d.as_secs_f64() * 1000.0),
        "duration_ms": ctx.start.elapsed().as_secs_f64() * 1000.0,
        "client": ctx.client.ip().to_string(),
    });
    let mut err = std::io::stderr().lock();
    let _ = serde_json::to_writer(&mut err, &line);
    let _ = err.write_all(b"\n");
}

/// The engine's way in: every request, whichever stack served it, and every refusal.
impl gantry_http::Handler for Gateway {
    type Body = RespBody;

    fn handle<'a>(
        self: &'a Arc<Self>,
        req: Request<RequestBody>,
        conn: &'a ConnInfo,
        timer: Option<ConnTimer<'a>>,
    ) -> impl std::future::Future<Output = Response<RespBody>> + Send + 'a {
        self.handle_request(req, conn, timer)
    }

    fn refuse(&self, why: gantry_http::Refusal, conn: &ConnInfo) -> Response<RespBody> {
        let (reject, extra) = refusal(why);
        self.reject_unparsed(reject, conn.peer, extra.as_deref())
    }

    fn refused_by_hyper(&self, why: gantry_http::Refusal) {
        self.metrics.reject(refusal(why).0.code());
    }

    fn connection(&self, open: bool) {
        if open {
            self.metrics.open_connections.inc();
            self.metrics.connections.inc();
        } else {
            self.metrics.open_connections.dec();
        }
    }
}

/// A refusal of the engine's as the gateway's rejection, with what its message names.
fn refusal(why: gantry_http::Refusal) -> (Reject, Option<String>) {
    use gantry_http::Refusal as R;
    match why {
        R::Malformed(m) => (Reject::Malformed(m), None),
        R::HeadTooLarge {
            max_header_bytes,
            max_headers,
        } => (
            Reject::HeadTooLarge,
            Some(format!(
                "{max_header_bytes} bytes, {max_headers} header fields"
            )),
        ),
        R::HeadTimeout { after_ms } => (Reject::HeadTimeout, Some(after_ms.to_string())),
        R::TooManyConnections => (Reject::TooManyConnections, None),
    }
}

impl Gateway {
    /// Run the pipeline for one request. `timer`: a timer the caller keeps for the connection,
    /// reused for every attempt's deadline and moved lazily (see `within`; a new timer per
    /// attempt is a wheel insertion and removal); `None` makes one per attempt.
    ///
    /// An `async move` block rather than an `async fn`: the arguments then live in the future
    /// once, not twice.
    #[allow(clippy::manual_async_fn)]
    pub(crate) fn handle_request<'a>(
        self: &'a Arc<Self>,
        mut req: Request<RequestBody>,
        conn: &'a ConnInfo,
        timer: Option<ConnTimer<'a>>,
    ) -> impl std::future::Future<Output = Response<RespBody>> + Send + 'a {
        async move {
            let start = Instant::now();
            let mut seen = scan(req.headers());
            // 2. request id and trace context
            // An empty value: none (`request_id` off and the client sent none).
            let request_id = match seen.request_id.take() {
                Some(v) if is_sane_request_id(&v) => v,
                _ if self.cfg.request_id => self.ids.next(),
                _ => HeaderValue::from_static(""),
            };
            let tc = if self.cfg.trace_context {
                trace::propagate(
                    seen.traceparent
                        .take()
                        .as_ref()
                        .and_then(|v| v.to_str().ok()),
                )
            } else {
                trace::TraceContext::none()
            };
            let host = request_host(&req);
            let mut ctx = Ctx {
                start,
                request_id,
                traceparent: tc.header,
                trace_id: tc.trace_id,
                method: req.method().clone(),
                version: req.version(),
                end: None,
                path: String::new(),
                client: conn.peer,
                host: Host::None,
            };
            if self.cfg.access_log {
                ctx.path = req.uri().path().to_string();
            }
            match host {
                Ok(h) => ctx.host = h,
                Err(why) => {
                    return self.finish_reject(&ctx, None, Reject::BadRequest(why), None);
                }
            }

            // 1. hardening
            let head: usize =
                req.uri().path_and_query().map_or(0, |p| p.as_str().len()) + seen.head_bytes;
            if head > self.cfg.max_header_bytes {
                let limit = format!("{} bytes", self.cfg.max_header_bytes);
                return self.finish_reject(&ctx, None, Reject::HeadTooLarge, Some(&limit));
            }
            // The header count (the HTTP/1.1 parsers stop at it; HTTP/2 frames are checked here).
            if req.headers().len() > self.cfg.max_headers {
                let limit = format!("{} header fields", self.cfg.max_headers);
                return self.finish_reject(&ctx, None, Reject::HeadTooLarge, Some(&limit));
            }
            if let Some(why) = smuggling(&seen) {
                return self.finish_reject(&ctx, None, Reject::Malformed(why), None);
            }
            let normalized = match path::normalize(req.uri().path()) {
                Ok(std::borrow::Cow::Borrowed(_)) => None,
                Ok(std::borrow::Cow::Owned(p)) => Some(p),
                Err(e) => {
                    return self.finish_reject(&ctx, None, Reject::BadRequest(e.message()), None)
                }
            };

            // 3. route
            let table = self.table.load_full();
            let route = {
                let view = RequestView {
                    host: ctx.host.as_deref(),
                    path: normalized.as_deref().unwrap_or(req.uri().path()),
                    method: req.method(),
                    headers: req.headers(),
                    query: req.uri().query(),
                };
                table.find(&view)
            };
            let Some(route) = route else {
                let asked = format!(
                    "{} {} on host {}",
                    req.method(),
                    truncate(normalized.as_deref().unwrap_or(req.uri().path()), 512),
                    truncate(asked_authority(&req), 256),
                );
                return self.finish_reject(&ctx, None, Reject::NoRoute, Some(&asked));
            };
            match &route.action {
                Action::Redirect(r) => {
                    let resp = redirect(r, route, &req, normalized.as_deref(), conn.tls, &ctx);
                    route
                        .metrics
                        .record(resp.status().as_u16(), start.elapsed().as_secs_f64());
                    if self.cfg.access_log {
                        access_log(&ctx, &route.id, "", resp.status().as_u16(), 0, None, true);
                    }
                    resp
                }
                Action::Forward(f) => {
                    let resp = self
                        .forward_boxed(route, f, &mut req, seen, normalized, conn, timer, &mut ctx)
                        .await;
                    let end = ctx.end.unwrap_or_else(Instant::now);
                    let took = end.saturating_duration_since(start);
                    route
                        .metrics
                        .record(resp.status().as_u16(), took.as_secs_f64());
                    resp
                }
            }
        }
    }

    /// A request the HTTP/1.1 server refused before it could be routed (bad framing, a head
    /// too large): answered as JSON and counted like every other rejection.
    pub(crate) fn reject_unparsed(
        &self,
        why: Reject,
        peer: SocketAddr,
        extra: Option<&str>,
    ) -> Response<RespBody> {
        let ctx = Ctx {
            start: Instant::now(),
            request_id: self.ids.next(),
            traceparent: HeaderValue::from_static(""),
            trace_id: [b'0'; 32],
            method: Method::GET,
            version: Version::HTTP_11,
            end: None,
            path: String::new(),
            client: peer,
            host: Host::None,
        };
        self.finish_reject(&ctx, None, why, extra)
    }

    fn finish_reject(
        &self,
        ctx: &Ctx,
        route: Option<&CompiledRoute>,
        why: Reject,
        extra: Option<&str>,
    ) -> Response<RespBody> {
        let resp = self.reject(why, route.map(|r| &*r.service), ctx, extra);
        // A route's answers, its rejections included, are counted once, where `handle` gets
        // them back from `forward`; only those that never reached a route are counted here.
        if route.is_none() {
            self.no_route
                .record(resp.status().as_u16(), ctx.start.elapsed().as_secs_f64());
        }
        if self.cfg.access_log {
            access_log(
                ctx,
                route.map_or("none", |r| &r.id),
                "",
                resp.status().as_u16(),
                0,
                None,
                true,
            );
        }
        resp
    }

    fn reject(
        &self,
        why: Reject,
        service: Option<&str>,
        ctx: &Ctx,
        extra: Option<&str>,
    ) -> Response<RespBody> {
        self.metrics.reject(why.code());
        let svc = service.unwrap_or("?");
        let message = match why {
            Reject::NoRoute => format!("no route matches {}", extra.unwrap_or("the request")),
            Reject::NoInstance => format!("service {svc} has no healthy instance"),
            Reject::NoVersion => format!(
                "service {svc} has no healthy instance matching version {}",
                extra.unwrap_or("?")
            ),
            Reject::UpstreamError => {
                format!("could not get a response from any instance of service {svc}")
            }
            Reject::UpstreamTimeout => {
                format!("service {svc} did not answer within the route's timeout")
            }
            Reject::BadRequest(m) | Reject::Malformed(m) => m.to_string(),
            Reject::TooLarge => format!(
                "request body is larger than the route allows ({} bytes)",
                extra.unwrap_or("?")
            ),
            Reject::HeadTooLarge => format!(
                "request line and headers are larger than the gateway allows ({})",
                extra.unwrap_or("?")
            ),
            Reject::HeadTimeout => format!(
                "the request head did not arrive within {} ms",
                extra.unwrap_or("?")
            ),
            Reject::TooManyConnections => {
                "the gateway has as many connections open as it allows; retry shortly".into()
            }
            Reject::RateLimited => {
                "rate limit exceeded; retry after the time in Retry-After".into()
            }
            Reject::CircuitOpen => format!("service {svc} is failing; its circuit breaker is open"),
            Reject::Bulkhead => format!("service {svc} has too many requests in flight"),
        };
        // Answers of the gateway's own always carry an id, `request_id` off or not.
        let rid = if ctx.request_id.is_empty() {
            self.ids.next()
        } else {
            ctx.request_id.clone()
        };
        let body = serde_json::json!({
            "error": why.code(),
            "message": message,
            "service": service,
            "request_id": rid.to_str().unwrap_or(""),
        });
        let mut resp = Response::new(RespBody::full(body.to_string()));
        *resp.status_mut() = why.status();
        let h = resp.headers_mut();
        h.insert(
            header::CONTENT_TYPE,
            HeaderValue::from_static("application/json"),
        );
        h.insert(X_REQUEST_ID.clone(), rid);
        if matches!(
            why,
            Reject::NoInstance
                | Reject::NoVersion
                | Reject::CircuitOpen
                | Reject::Bulkhead
                | Reject::TooManyConnections
        ) {
            h.insert(header::RETRY_AFTER, HeaderValue::from_static("1"));
        }
        resp
    }

    /// The forwarding future is large; boxing it here keeps the per-request future hyper holds
    /// (and moves) small.
    #[allow(clippy::too_many_arguments)]
    fn forward_boxed<'a>(
        self: &'a Arc<Self>,
        route: &'a CompiledRoute,
        f: &'a ForwardAction,
        req: &'a mut Request<RequestBody>,
        seen: Seen,
        normalized: Option<String>,
        conn: &'a ConnInfo,
        timer: Option<ConnTimer<'a>>,
        ctx: &'a mut Ctx,
    ) -> std::pin::Pin<Box<dyn std::future::Future<Output = Response<RespBody>> + Send + 'a>> {
        Box::pin(self.forward(route, f, req, seen, normalized, conn, timer, ctx))
    }

    /// Steps 4 to 11. An `async move` block rather than an `async fn`: the arguments then live in
    /// the future once, not twice (an `async fn` keeps them and its locals' copies).
    #[allow(clippy::too_many_arguments, clippy::manual_async_fn)]
    fn forward<'a>(
        self: &'a Arc<Self>,
        route: &'a CompiledRoute,
        f: &'a ForwardAction,
        req: &'a mut Request<RequestBody>,
        seen: Seen,
        mut normalized: Option<String>,
        conn: &'a ConnInfo,
        mut timer: Option<ConnTimer<'a>>,
        ctx: &'a mut Ctx,
    ) -> impl std::future::Future<Output = Response<RespBody>> + Send + 'a {
        async move {
            let now = ms_at(ctx.start);
            // 4. rate limit and body size
            if let Some((limiter, key)) = &f.limiter {
                let ip;
                let k: &[u8] = match key {
                    gantry_model::RateLimitKey::ClientIp => {
                        ip = conn.peer.ip().to_string();
                        ip.as_bytes()
                    }
                    gantry_model::RateLimitKey::Route => b"",
                    gantry_model::RateLimitKey::Header(h) => match req.headers().get(h.as_str()) {
                        Some(v) => v.as_bytes(),
                        // Without the header, the client's address is the key (as Kong falls
                        // back to the IP): clients that omit it do not share one bucket, and
                        // cannot drain the bucket of those that send it. A leading NUL keeps
                        // the two kinds of keys apart.
                        None => {
                            ip = format!("\0{}", conn.peer.ip());
                            ip.as_bytes()
                        }
                    },
                };
                let d = limiter.check(k, now);
                if !d.allowed {
                    route.metrics.rate_limited.inc();
                    let mut resp = self.finish_reject(ctx, Some(route), Reject::RateLimited, None);
                    let h = resp.headers_mut();
                    h.insert(header::RETRY_AFTER, HeaderValue::from(d.retry_after_secs));
                    h.insert(RATELIMIT_LIMIT.clone(), HeaderValue::from(d.limit));
                    h.insert(RATELIMIT_REMAINING.clone(), HeaderValue::from(d.remaining));
                    h.insert(RATELIMIT_RESET.clone(), HeaderValue::from(d.reset_secs));
                    return resp;
                }
            }
            if let Some(len) = req
                .body()
                .size_hint()
                .exact()
                .or_else(|| req.body().size_hint().upper())
            {
                if len > f.max_body_bytes {
                    return self.finish_reject(
                        ctx,
                        Some(route),
                        Reject::TooLarge,
                        Some(&f.max_body_bytes.to_string()),
                    );
                }
            }

            // 5. target
            // `normalized` becomes the path that goes upstream (less a version segment).

            // Boxed: version selection is off the common path, and what the request's future
            // holds across its awaits is copied into it and read back cold (ARCHITECTURE.md).
            let mut selected: Option<Box<(EndpointSet, String)>> = None;
            if let Some(h) = &f.version_header {
                if let Some(v) = req.headers().get(h).and_then(|v| v.to_str().ok()) {
                    match semver::VersionReq::parse(v.trim()) {
                        Ok(r) => {
                            selected = Some(Box::new((
                                filter_versions(&f.all_versions, &r),
                                v.trim().to_string(),
                            )))
                        }
                        Err(_) => return self.finish_reject(
                            ctx,
                            Some(route),
                            Reject::BadRequest(
                                "the version header is not a semver requirement (e.g. ^2 or 1.4)",
                            ),
                            None,
                        ),
                    }
                }
            }
            if selected.is_none() && f.version_from_path {
                let cur_path = normalized.as_deref().unwrap_or(req.uri().path());
                let prefix = match &route.matcher.path {
                    crate::table::PathMatcher::Prefix(p) if p != "/" => p.as_str(),
                    _ => "",
                };
                let after = &cur_path[prefix.len().min(cur_path.len())..];
                let seg = after
                    .trim_start_matches('/')
                    .split('/')
                    .next()
                    .unwrap_or("");
                if let Some(major) = seg.strip_prefix('v').and_then(|m| m.parse::<u64>().ok()) {
                    if let Ok(r) = semver::VersionReq::parse(&major.to_string()) {
                        selected = Some(Box::new((
                            filter_versions(&f.all_versions, &r),
                            format!("v{major}"),
                        )));
                        let cut = prefix.len() + 1 + seg.len();
                        let mut rest = format!("{prefix}{}", &cur_path[cut.min(cur_path.len())..]);
                        if rest.is_empty() {
                            rest.push('/');
                        }
                        normalized = Some(rest);
                    }
                }
            }
            let (set, target): (&EndpointSet, &str) = match selected.as_deref() {
                Some((s, v)) => (s, v),
                None => pick_backend(f),
            };
            if set.endpoints.is_empty() {
                return match selected.as_deref() {
                    Some((_, v)) => {
                        self.finish_reject(ctx, Some(route), Reject::NoVersion, Some(v))
                    }
                    None => self.finish_reject(ctx, Some(route), Reject::NoInstance, None),
                };
            }
            let service = &set.service;
            if service.tls_failed {
                // Never fall back to clear text when TLS was asked for.
                return self.finish_reject(ctx, Some(route), Reject::UpstreamError, None);
            }

            // 6. cache
            let mut revalidating: Option<Arc<cache::Entry>> = None;
            let mut cache_key: Option<CacheKey> = None;
            if f.cache.is_some() {
                let rest_path = normalized.as_deref().unwrap_or(req.uri().path());
                let pq = match req.uri().query() {
                    Some(q) => format!("{rest_path}?{q}"),
                    None => rest_path.to_string(),
                };
                let key = cache::key_for(req.method(), ctx.host.as_deref(), &pq, &route.id, target);
                if let Some(key) = key {
                    match self.cache.lookup(&key, req.headers(), now) {
                        Lookup::Fresh(e) => {
                            self.metrics.cache("hit");
                            return self.serve_cached(&e, req, "HIT", ctx, route, f);
                        }
                        Lookup::Stale(e) => revalidating = Some(e),
                        Lookup::Miss => {}
                    }
                    cache_key = Some(key);
                }
            }

            // 7. breaker and bulkhead
            let admission = service.admit(now);
            let probe = match admission {
                Admission::Allowed { probe } => probe,
                Admission::Rejected { retry_after_ms } => {
                    let mut r = self.finish_reject(ctx, Some(route), Reject::CircuitOpen, None);
                    r.headers_mut().insert(
                        header::RETRY_AFTER,
                        HeaderValue::from(retry_after_ms.div_ceil(1000).max(1)),
                    );
                    return r;
                }
            };
            let limit = service.policy.max_concurrent_requests as usize;
            let slot = {
                let n = service.inflight.fetch_add(1, Ordering::Relaxed);
                let slot = ServiceSlot(service.clone());
                if limit > 0 && n >= limit {
                    service.metrics.bulkhead_rejections.inc();
                    if probe {
                        self.record_breaker(service, true, true, now);
                    }
                    return self.finish_reject(ctx, Some(route), Reject::Bulkhead, None);
                }
                slot
            };

            // 8. upstream request, built in place: `req` (borrowed from `handle`, which owns it)
            // keeps its parts, and the attempts borrow what they send.
            let upgrade = seen.upgrade && is_websocket_upgrade(req);
            let on_client_upgrade = upgrade.then(|| tunnel::client_upgrade(&mut *req));
            let version = req.version();
            let mode = match service.policy.protocol {
                _ if upgrade => Mode::Upgrade,
                gantry_model::UpstreamProtocol::H2c => Mode::Http2,
                gantry_model::UpstreamProtocol::Auto if version == Version::HTTP_2 => Mode::Http2,
                _ => Mode::Http1,
            };
            let want_h2 = mode == Mode::Http2;
            let pq = match rewrite_path(route, f, normalized.as_deref(), req.uri()) {
                Some(pq) => pq,
                None => {
                    return self.finish_reject(
                        ctx,
                        Some(route),
                        Reject::BadRequest("the rewritten path is not a valid URI path"),
                        None,
                    )
                }
            };
            let client_conditional = cache_key.is_some()
                && (req.headers().contains_key(header::IF_NONE_MATCH)
                    || req.headers().contains_key(header::IF_MODIFIED_SINCE));
            // The client's authority, where something sends it on: HTTP/2's `:authority`,
            // `X-Forwarded-Host`, a `Host` for an HTTP/1.1 instance when the client sent none,
            // the mirror's copy.
            let forwarding = self.cfg.forwarded_headers;
            let authority: Option<HeaderValue> =
                if want_h2 || forwarding || !seen.host || f.mirror.is_some() {
                    req.uri()
                        .authority()
                        .and_then(|a| HeaderValue::from_str(a.as_str()).ok())
                        .or_else(|| req.headers().get(header::HOST).cloned())
                } else {
                    None
                };
            let mut headers = std::mem::take(req.headers_mut());
            let client_headers = cache_key.as_ref().map(|_| Box::new(headers.clone()));
            if seen.hop_by_hop {
                let upgrade_value = if upgrade {
                    headers.get(header::UPGRADE).cloned()
                } else {
                    None
                };
                remove_hop_by_hop(&mut headers, want_h2);
                if let Some(u) = upgrade_value {
                    headers.insert(header::CONNECTION, HeaderValue::from_static("upgrade"));
                    headers.insert(header::UPGRADE, u);
                }
            }
            // Built in a block: the values it moves in do not keep slots of their own in the
            // request's future.
            let mut added = Some({
                let forwarded_for = forwarding.then(|| {
                    if seen.forwarded_for {
                        forwarded_for(headers.get(&X_FORWARDED_FOR), conn.peer)
                    } else {
                        conn.peer_ip.clone()
                    }
                });
                if forwarding && seen.forwarded_for {
                    headers.remove(&X_FORWARDED_FOR);
                }
                let request_id = (!ctx.request_id.is_empty()).then(|| ctx.request_id.clone());
                let traceparent = self
                    .cfg
                    .trace_context
                    .then(|| std::mem::replace(&mut ctx.traceparent, HeaderValue::from_static("")));
                if seen.ours {
                    // The client's own values of the headers the gateway sets are replaced
                    // (those it does not set pass as they are).
                    for (n, ours) in [
                        (&X_FORWARDED_PROTO, forwarding),
                        (&X_FORWARDED_HOST, forwarding),
                        (&X_REQUEST_ID, request_id.is_some()),
                        (&TRACEPARENT, traceparent.is_some()),
                    ] {
                        if ours {
                            headers.remove(n);
                        }
                    }
                }
                Added {
                    traceparent,
                    forwarded_for,
                    forwarded_proto: forwarding.then_some(if conn.tls { &HTTPS } else { &HTTP }),
                    forwarded_host: authority.clone().filter(|_| forwarding),
                    request_id,
                }
            });
            let mut has_host = seen.host;
            // The engine writes `added` behind the map (or into it, on hyper's paths);
            // configured header changes, which may override them, need them in the map.
            if !f.request_headers.is_empty() {
                if let Some(a) = added.take() {
                    a.insert_into(&mut headers);
                }
                f.request_headers.apply(&mut headers);
                has_host = headers.contains_key(header::HOST);
            }
            if let (Some(e), false) = (&revalidating, client_conditional) {
                if let Some(etag) = &e.etag {
                    headers.insert(header::IF_NONE_MATCH, etag.clone());
                }
                if let Some(lm) = &e.last_modified {
                    headers.insert(header::IF_MODIFIED_SINCE, lm.clone());
                }
            }
            let replayable = req.body().is_end_stream();
            let exceeded = (!replayable).then(|| Arc::new(AtomicBool::new(false)));
            // The body until an attempt takes it; an attempt that did not send it puts it back.
            let mut body = Some({
                let down_body = std::mem::replace(req.body_mut(), RequestBody::Empty);
                // 9. mirror: a body is copied frame by frame as the primary sends it (`Tee`)
                let mut tee = None;
                if let Some(m) = &f.mirror {
                    let sampled = !upgrade && crate::rand::unit() * 100.0 < m.percent;
                    if sampled && m.metrics.in_flight.get() >= MIRROR_MAX_IN_FLIGHT {
                        // A slow or hung shadow must not pile up sockets and tasks.
                        m.metrics.skipped.inc();
                    } else if sampled {
                        let copy = if replayable {
                            ReqBody::Empty
                        } else {
                            let (t, copy) = Tee::new(down_body.size_hint());
                            tee = Some(t);
                            ReqBody::Mirror(Box::new(copy))
                        };
                        self.mirror(
                            m,
                            req.method(),
                            &pq,
                            authority.as_ref(),
                            &headers,
                            added.as_ref(),
                            version == Version::HTTP_2,
                            copy,
                        );
                    }
                }
                match &exceeded {
                    None => ReqBody::Empty,
                    Some(flag) => ReqBody::limited(down_body, f.max_body_bytes, flag.clone(), tee),
                }
            });
            let req: &Request<RequestBody> = req;
            let method = req.method();

            // 10. attempts
            let retry = &f.retry;
            // A request with a body can go again only if it never left (a refused connect,
            // a pooled connection found closed): the body is still whole then. A response or
            // a timeout means the instance may have consumed it.
            let can_retry =
                !upgrade && (is_idempotent(method) || retry.non_idempotent) && retry.attempts > 0;
            let max_attempts = 1 + if can_retry {
                retry.attempts as usize
            } else {
                0
            };
            f.budget.record_request(now);
            let hash_key = match &service.policy.load_balancer {
                gantry_model::LoadBalancer::Hash(on) => match on {
                    gantry_model::HashOn::ClientIp => {
                        Some(hash64(conn.peer.ip().to_string().as_bytes()))
                    }
                    gantry_model::HashOn::Header(h) => headers
                        .get(h.as_str())
                        .or_else(|| added.as_ref().and_then(|a| a.get(h)))
                        .map(|v| hash64(v.as_bytes())),
                    gantry_model::HashOn::Cookie(c) => {
                        cookie(&headers, c).map(|v| hash64(v.as_bytes()))
                    }
                },
                _ => None,
            };
            let deadline = tokio::time::Instant::from_std(ctx.start) + f.request_timeout;
            let connect_timeout = Duration::from_millis(service.policy.connect_timeout_ms);
            let mut tried_buf = [u32::MAX; 12];
            let mut n_tried = 0usize;
            let mut attempt_no = 0usize;
            let mut stale_conns = 0usize;
            let mut last_failure = Reject::UpstreamError;
            // After a status or timeout retry, an instance already tried may be tried again
            // when no other is left (a single instance can have a transient failure); never
            // after a failed connect.
            let mut may_repeat = false;
            // A retry waits first (at the loop's top, so that no attempt's state is kept
            // across the wait).
            let mut pause = false;
            // The first attempt starts when the request arrived (routing took microseconds):
            // one clock read less per request.
            let mut first_attempt = true;
            loop {
                if std::mem::take(&mut pause) {
                    retry_pause(retry, attempt_no).await;
                }
                // One clock read per attempt start (but the first) and one per attempt end.
                let attempt_start = if std::mem::take(&mut first_attempt) {
                    ctx.start
                } else {
                    Instant::now()
                };
                let now = ms_at(attempt_start);
                let attempt_at = tokio::time::Instant::from_std(attempt_start);
                if attempt_at >= deadline {
                    last_failure = Reject::UpstreamTimeout;
                    break;
                }
                let picked = set.pick(&tried_buf[..n_tried], hash_key, now);
                let Some(idx) =
                    picked.or_else(|| may_repeat.then(|| set.pick(&[], hash_key, now)).flatten())
                else {
                    break;
                };
                let ep = &set.endpoints[idx];
                let guard = InflightGuard::new(ep.clone());
                let per_try = f
                    .per_try_timeout
                    .map_or(deadline, |t| deadline.min(attempt_at + t));
                let target = Target {
                    addr: ep.addr,
                    connect_timeout,
                    tls: service.tls.as_ref(),
                };
                let outgoing = Outgoing {
                    method,
                    target: &pq,
                    authority: authority.as_ref(),
                    host_in_map: has_host,
                    headers: &mut headers,
                    extra: added.as_ref(),
                    // hyper takes the request by value: a copy of the headers when another
                    // attempt may need them.
                    keep_headers: can_retry && max_attempts > 1,
                };
                let sent = {
                    let attempt =
                        std::pin::pin!(client::send(&ep.pool, target, mode, outgoing, &mut body));
                    match timer.as_mut() {
                        Some(t) => timer::within(t, per_try, attempt).await,
                        None => {
                            // hyper's stacks lend no timer: the attempt makes its own (boxed:
                            // the request's future does not carry it).
                            let mut own = Box::pin(tokio::time::sleep_until(per_try));
                            let mut t = ConnTimer::new(own.as_mut());
                            timer::within(&mut t, per_try, attempt).await
                        }
                    }
                };
                let outcome = match sent {
                    Ok(Ok(resp)) => Attempt::Response(resp),
                    Ok(Err(e)) => {
                        // Never left: a pooled connection the instance had just closed. The
                        // same request goes again on a fresh one.
                        if e.kind == ErrorKind::Stale {
                            stale_conns += 1;
                            if stale_conns <= 3 {
                                continue;
                            }
                        }
                        Attempt::Failed(e)
                    }
                    Err(_) => Attempt::TimedOut,
                };
                attempt_no += 1;
                if n_tried < tried_buf.len() {
                    tried_buf[n_tried] = idx as u32;
                    n_tried += 1;
                }
                let attempt_end = Instant::now();
                ctx.end = Some(attempt_end);
                let elapsed = attempt_end.saturating_duration_since(attempt_start);
                let end_ms = ms_at(attempt_end);
                match outcome {
                    Attempt::Response(resp) => {
                        let status = resp.status();
                        ep.observe_latency(end_ms, elapsed.as_secs_f64() * 1e6);
                        ep.metrics.record(status.as_u16(), elapsed.as_secs_f64());
                        let failed = status.is_server_error();
                        self.outlier(service, ep, !failed, end_ms);
                        let retry_status = retry.on_statuses.contains(&status.as_u16());
                        if retry_status
                            && replayable
                            && attempt_no < max_attempts
                            && f.budget.try_retry(end_ms)
                        {
                            drop(resp);
                            drop(guard);
                            route.metrics.retries.inc();
                            may_repeat = true;
                            pause = true;
                            continue;
                        }
                        self.record_breaker(service, !failed, probe, end_ms);
                        // The map's table goes back to this thread's pool for the next request.
                        gantry_http::codec::recycle_map(std::mem::take(&mut headers));
                        return self.respond(
                            route,
                            f,
                            ctx,
                            service,
                            slot,
                            ep,
                            guard,
                            resp,
                            elapsed,
                            cache_key,
                            revalidating,
                            client_conditional,
                            on_client_upgrade,
                            method,
                            client_headers.map(|h| *h),
                        );
                    }
                    Attempt::Failed(e) => {
                        drop(guard);
                        ep.metrics.errors.inc();
                        service.metrics.upstream_errors.inc();
                        ep.mark_suspect(end_ms);
                        self.outlier(service, ep, false, end_ms);
                        tracing::debug!(instance = %ep.id, error = %e, "upstream attempt failed");
                        let unsent = !e.sent;
                        if exceeded.as_ref().is_some_and(|e| e.load(Ordering::Relaxed)) {
                            return self.finish_reject(
                                ctx,
                                Some(route),
                                Reject::TooLarge,
                                Some(&f.max_body_bytes.to_string()),
                            );
                        }
                        last_failure = Reject::UpstreamError;
                        if retry.on_connect_failure
                            && (replayable || unsent)
                            && attempt_no < max_attempts
                            && f.budget.try_retry(end_ms)
                        {
                            route.metrics.retries.inc();
                            pause = true;
                            continue;
                        }
                        break;
                    }
                    Attempt::TimedOut => {
                        drop(guard);
                        ep.metrics.errors.inc();
                        service.metrics.upstream_errors.inc();
                        self.outlier(service, ep, false, end_ms);
                        last_failure = Reject::UpstreamTimeout;
                        if retry.on_per_try_timeout
                            && replayable
                            && attempt_no < max_attempts
                            && tokio::time::Instant::from_std(attempt_end) < deadline
                            && f.budget.try_retry(end_ms)
                        {
                            route.metrics.retries.inc();
                            may_repeat = true;
                            continue;
                        }
                        break;
                    }
                }
            }
            // Every attempt failed.
            self.record_breaker(service, false, probe, clock_ms());
            drop(slot);
            if n_tried == 0 && !matches!(last_failure, Reject::UpstreamTimeout) {
                last_failure = Reject::NoInstance;
            }
            self.finish_reject(ctx, Some(route), last_failure, None)
        }
    }

    fn record_breaker(&self, service: &ServiceState, ok: bool, probe: bool, now: u64) {
        let (change, code) = service.record(now, ok, probe);
        if let Some(ch) = change {
            self.breaker_changed(service, ch);
        }
        // Set only when it moved: a gauge's `set` is an atomic swap.
        if service.metrics.circuit_state.get() != code {
            service.metrics.circuit_state.set(code);
        }
    }

    fn breaker_changed(&self, service: &ServiceState, ch: BreakerChange) {
        match ch {
            BreakerChange::Opened => {
                tracing::warn!(service = %service.name, "circuit breaker opened: requests fail fast")
            }
            BreakerChange::Closed => {
                tracing::info!(service = %service.name, "circuit breaker closed")
            }
        }
    }

    /// Feed one attempt's result to the instance's outlier detector; eject within the cap.
    fn outlier(&self, service: &ServiceState, ep: &crate::table::Endpoint, ok: bool, now: u64) {
        let mut o = ep
            .outlier
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        match o.record(now, ok) {
            Some(OutlierVerdict::Restore) => {
                ep.ejected_until_ms.store(0, Ordering::Relaxed);
                service.ejected.fetch_sub(1, Ordering::Relaxed);
                ep.metrics.ejected.set(0);
                tracing::info!(instance = %ep.id, "instance back in rotation after ejection");
            }
            Some(OutlierVerdict::Eject) => {
                let was_ejected = o.is_ejected();
                let total = service.instances.load(Ordering::Relaxed);
                let ejected = service.ejected.load(Ordering::Relaxed);
                if was_ejected
                    || ejection_allowed(ejected, total, service.policy.outlier.max_ejected_percent)
                {
                    let until = o.eject(now);
                    ep.ejected_until_ms.store(until, Ordering::Relaxed);
                    if !was_ejected {
                        service.ejected.fetch_add(1, Ordering::Relaxed);
                    }
                    ep.metrics.ejections.inc();
                    ep.metrics.ejected.set(1);
                    tracing::warn!(instance = %ep.id, ejected_ms = until - now, times = o.ejections, "instance ejected by outlier detection");
                } else {
                    o.spare();
                }
            }
            None => {}
        }
    }

    #[allow(clippy::too_many_arguments)]
    fn respond(
        self: &Arc<Self>,
        route: &CompiledRoute,
        f: &ForwardAction,
        ctx: &mut Ctx,
        service: &Arc<ServiceState>,
        slot: ServiceSlot,
        ep: &Arc<crate::table::Endpoint>,
        guard: InflightGuard,
        resp: Response<ClientBody>,
        upstream_time: Duration,
        cache_key: Option<CacheKey>,
        revalidating: Option<Arc<cache::Entry>>,
        client_conditional: bool,
        on_client_upgrade: Option<tunnel::Upgrade>,
        method: &Method,
        client_headers: Option<HeaderMap>,
    ) -> Response<RespBody> {
        let _ = service;
        let status = resp.status();
        // WebSocket: splice the two upgraded connections.
        let mut resp = resp;
        if status == StatusCode::SWITCHING_PROTOCOLS {
            if let Some(client) = on_client_upgrade {
                let upstream = tunnel::upstream_upgrade(&mut resp);
                let (mut parts, _body) = resp.into_parts();
                tunnel::spawn_splice(client, upstream, f.idle_timeout, (guard, slot));
                set_request_id(&mut parts.headers, &ctx.request_id);
                f.response_headers.apply(&mut parts.headers);
                if self.cfg.access_log {
                    access_log(ctx, &route.id, &ep.id, 101, 0, Some(upstream_time), true);
                }
                return Response::from_parts(parts, RespBody::empty());
            }
        }
        let (mut parts, mut incoming) = resp.into_parts();
        // A head read in-task stays as it came unless something here must read or edit it.
        let mut raw = incoming.take_head();
        let defer = raw.as_ref().is_some_and(|r| !r.needs_map)
            && f.cache.is_none()
            && f.response_headers.is_empty()
            && revalidating.is_none();
        if !defer {
            if let Some(r) = raw.take() {
                match r.to_map(4) {
                    Ok(h) => parts.headers = h,
                    Err(_) => {
                        return self.finish_reject(ctx, Some(route), Reject::UpstreamError, None)
                    }
                }
            }
        }
        // A revalidated cache entry: serve it.
        if let (Some(entry), Some(key), StatusCode::NOT_MODIFIED, false) =
            (&revalidating, &cache_key, status, client_conditional)
        {
            // A 304 has no body: dropped, its connection goes back to the pool.
            drop(incoming);
            let req_headers = client_headers.unwrap_or_default();
            let fresh = self
                .cache
                .refresh(key, &req_headers, entry, &parts.headers, clock_ms());
            self.metrics.cache("revalidated");
            drop(guard);
            drop(slot);
            let mut r = cached_response(&fresh, method, "REVALIDATED", clock_ms());
            set_request_id(r.headers_mut(), &ctx.request_id);
            f.response_headers.apply(r.headers_mut());
            if self.cfg.access_log {
                access_log(
                    ctx,
                    &route.id,
                    &ep.id,
                    r.status().as_u16(),
                    fresh.body.len() as u64,
                    Some(upstream_time),
                    true,
                );
            }
            return r;
        }
        if raw.is_none() {
            remove_hop_by_hop(&mut parts.headers, false);
        }
        let mut body = UpstreamBody::new(incoming, guard, f.idle_timeout);
        let mut end = RequestEnd {
            _service_slot: slot,
            cache: None,
            log: None,
        };
        if let (Some(key), Some(policy)) = (cache_key, &f.cache) {
            // The request headers that matter for Vary are the ones the client sent.
            let client_headers = client_headers.unwrap_or_default();
            if let Some(fresh) =
                cache::Cache::storable(method, &client_headers, status, &parts.headers)
            {
                body.capture(policy.max_object_bytes as usize);
                end.cache = Some(Box::new((
                    self.clone(),
                    (key, client_headers, status, parts.headers.clone(), fresh),
                )));
            }
            self.metrics.cache("miss");
            parts
                .headers
                .insert(X_CACHE.clone(), HeaderValue::from_static("MISS"));
        }
        match raw {
            Some(head) => body.defer_head(Deferred {
                head,
                extra: Some((&X_REQUEST_ID, ctx.request_id.clone())),
            }),
            None => {
                set_request_id(&mut parts.headers, &ctx.request_id);
                f.response_headers.apply(&mut parts.headers);
            }
        }
        if self.cfg.access_log {
            let c = Ctx {
                start: ctx.start,
                request_id: ctx.request_id.clone(),
                traceparent: HeaderValue::from_static(""),
                trace_id: ctx.trace_id,
                method: ctx.method.clone(),
                version: ctx.version,
                end: ctx.end,
                path: std::mem::take(&mut ctx.path),
                client: ctx.client,
                host: ctx.host.take(),
            };
            end.log = Some(Box::new((
                c,
                route.id.clone(),
                ep.id.to_string(),
                status.as_u16(),
                upstream_time,
            )));
        }
        body.on_end(end);
        Response::from_parts(parts, RespBody::Upstream(Box::new(body)))
    }

    fn serve_cached(
        &self,
        e: &cache::Entry,
        req: &Request<RequestBody>,
        how: &'static str,
        ctx: &Ctx,
        route: &CompiledRoute,
        f: &ForwardAction,
    ) -> Response<RespBody> {
        let now = clock_ms();
        let mut r = if cache::etag_matches(req.headers(), e.etag.as_ref()) {
            let mut r = Response::new(RespBody::empty());
            *r.status_mut() = StatusCode::NOT_MODIFIED;
            for name in [
                header::ETAG,
                header::CACHE_CONTROL,
                header::LAST_MODIFIED,
                header::VARY,
            ] {
                if let Some(v) = e.headers.get(&name) {
                    r.headers_mut().insert(name, v.clone());
                }
            }
            r.headers_mut()
                .insert(X_CACHE.clone(), HeaderValue::from_static("HIT"));
            r
        } else {
            cached_response(e, req.method(), how, now)
        };
        set_request_id(r.headers_mut(), &ctx.request_id);
        f.response_headers.apply(r.headers_mut());
        if self.cfg.access_log {
            access_log(
                ctx,
                &route.id,
                "cache",
                r.status().as_u16(),
                e.body.len() as u64,
                None,
                true,
            );
        }
        r
    }

    /// Send a copy to the shadow target; its answer is read and dropped, and never awaited here.
    /// `body` is empty, or the copy a `Tee` feeds as the primary sends the request's body.
    #[allow(clippy::too_many_arguments)]
    fn mirror(
        &self,
        m: &crate::table::Mirror,
        method: &Method,
        pq: &PathAndQuery,
        authority: Option<&HeaderValue>,
        headers: &HeaderMap,
        added: Option<&Added>,
        downstream_h2: bool,
        body: ReqBody,
    ) {
        let set = &m.set;
        let Some(idx) = set.pick(&[], None, clock_ms()) else {
            m.metrics.failed.inc();
            return;
        };
        let ep = set.endpoints[idx].clone();
        let service = set.service.clone();
        let mode = match service.policy.protocol {
            gantry_model::UpstreamProtocol::H2c => Mode::Http2,
            gantry_model::UpstreamProtocol::Auto if downstream_h2 => Mode::Http2,
            _ => Mode::Http1,
        };
        let mut headers = headers.clone();
        if let Some(a) = added {
            a.clone().insert_into(&mut headers);
        }
        let abandoned = match &body {
            ReqBody::Mirror(b) => Some(b.abandoned.clone()),
            _ => None,
        };
        let metrics = m.metrics.clone();
        metrics.in_flight.inc();
        let method = method.clone();
        let pq = pq.clone();
        let authority = authority.cloned();
        let connect = Duration::from_millis(service.policy.connect_timeout_ms);
        let timeout = connect + Duration::from_secs(30);
        tokio::spawn(async move {
            let _guard = InflightGuard::new(ep.clone());
            let target = Target {
                addr: ep.addr,
                connect_timeout: connect,
                tls: service.tls.as_ref(),
            };
            let mut body = Some(body);
            let fut = async {
                let outgoing = Outgoing {
                    method: &method,
                    target: &pq,
                    authority: authority.as_ref(),
                    host_in_map: headers.contains_key(header::HOST),
                    headers: &mut headers,
                    extra: None::<&Added>,
                    keep_headers: false,
                };
                match client::send(&ep.pool, target, mode, outgoing, &mut body).await {
                    Ok(resp) => http_body_util::BodyExt::collect(resp.into_body())
                        .await
                        .is_ok(),
                    Err(_) => false,
                }
            };
            let answered = matches!(tokio::time::timeout(timeout, fut).await, Ok(true));
            metrics.in_flight.dec();
            if answered {
                metrics.answered.inc();
            } else if abandoned.is_some_and(|a| a.load(Ordering::Relaxed)) {
                metrics.abandoned.inc();
            } else {
                metrics.failed.inc();
            }
        });
    }
}

fn cached_response(
    e: &cache::Entry,
    method: &Method,
    how: &'static str,
    now: u64,
) -> Response<RespBody> {
    let body = if *method == Method::HEAD {
        RespBody::empty()
    } else {
        RespBody::full(e.body.clone())
    };
    let mut r = Response::new(body);
    *r.status_mut() = e.status;
    *r.headers_mut() = e.headers.clone();
    r.headers_mut().remove(header::TRANSFER_ENCODING);
    r.headers_mut()
        .insert(header::AGE, HeaderValue::from(e.age_secs(now)));
    r.headers_mut()
        .insert(X_CACHE.clone(), HeaderValue::from_static(how));
    r
}

/// The jittered backoff before retry number `attempt_no`, as a boxed sleep: the wait is rare, so
/// its timer stays out of the request's future.
fn retry_pause(
    retry: &gantry_model::RetryPolicy,
    attempt_no: usize,
) -> std::pin::Pin<Box<tokio::time::Sleep>> {
    Box::pin(tokio::time::sleep(backoff(
        attempt_no as u32,
        retry.backoff_base_ms,
        retry.backoff_max_ms,
    )))
}

fn filter_versions(all: &EndpointSet, req: &semver::VersionReq) -> EndpointSet {
    EndpointSet::new(
        all.service.clone(),
        all.endpoints
            .iter()
            .filter(|e| req.matches(&e.version))
            .cloned()
            .collect(),
    )
}

/// A backend by weight, and its cache label. A share whose target has no instance (a canary
/// not started yet, a version that is down) goes to the others, by their weights.
fn pick_backend(f: &ForwardAction) -> (&EndpointSet, &str) {
    let by_weight = |usable: &dyn Fn(&EndpointSet) -> bool, total: u64| {
        let mut x = crate::rand::below(total);
        for (set, w, key) in &f.backends {
            if !usable(set) {
                continue;
            }
            let w = u64::from(*w);
            if x < w {
                return Some((set, &**key));
            }
            x -= w;
        }
        None
    };
    let first = (&f.backends[0].0, &*f.backends[0].2);
    if f.backends.len() == 1 || f.total_weight == 0 {
        return first;
    }
    let picked = by_weight(&|_| true, f.total_weight).unwrap_or(first);
    if !picked.0.endpoints.is_empty() {
        return picked;
    }
    let live: u64 = f
        .backends
        .iter()
        .filter(|(s, _, _)| !s.endpoints.is_empty())
        .map(|(_, w, _)| u64::from(*w))
        .sum();
    if live == 0 {
        return picked;
    }
    by_weight(&|s| !s.endpoints.is_empty(), live).unwrap_or(picked)
}

/// Path and query to send upstream after the route's rewrite.
fn rewrite_path(
    route: &CompiledRoute,
    f: &ForwardAction,
    normalized: Option<&str>,
    uri: &Uri,
) -> Option<PathAndQuery> {
    let path = normalized.unwrap_or(uri.path());
    let prefix = match &route.matcher.path {
        crate::table::PathMatcher::Prefix(p) => p.as_str(),
        _ => "",
    };
    let new_path: Option<String> = match &f.rewrite {
        PathRewrite::None => normalized.map(str::to_string),
        PathRewrite::Strip => {
            let rest = if prefix == "/" {
                path
            } else {
                path.strip_prefix(prefix).unwrap_or(path)
            };
            Some(if rest.is_empty() {
                "/".to_string()
            } else {
                rest.to_string()
            })
        }
        PathRewrite::Replace(p) => {
            let rest = if prefix == "/" {
                path
            } else {
                path.strip_prefix(prefix).unwrap_or(path)
            };
            let mut s = p.trim_end_matches('/').to_string();
            if rest.is_empty() || !rest.starts_with('/') {
                s.push('/');
            }
            s.push_str(rest);
            Some(s)
        }
        PathRewrite::Regex(re, rep) => Some(re.replace(path, rep.as_str()).into_owned()),
    };
    match new_path {
        None => uri
            .path_and_query()
            .cloned()
            .or_else(|| Some(PathAndQuery::from_static("/"))),
        Some(p) => {
            let s = match uri.query() {
                Some(q) => format!("{p}?{q}"),
                None => p,
            };
            PathAndQuery::try_from(s).ok()
        }
    }
}

fn redirect(
    r: &gantry_model::Redirect,
    route: &CompiledRoute,
    req: &Request<RequestBody>,
    normalized: Option<&str>,
    tls: bool,
    ctx: &Ctx,
) -> Response<RespBody> {
    let scheme = r
        .scheme
        .clone()
        .unwrap_or_else(|| if tls { "https".into() } else { "http".into() });
    // Keep the client's authority (host and port) unless the route replaces them.
    let default_port = if scheme == "https" { 443 } else { 80 };
    let port = r
        .port
        .filter(|p| *p != default_port)
        .map(|p| format!(":{p}"));
    let authority = match (&r.host, port) {
        (Some(h), p) => format!("{h}{}", p.unwrap_or_default()),
        (None, p) => {
            let given = req
                .uri()
                .authority()
                .map(|a| a.as_str().to_string())
                .or_else(|| {
                    req.headers()
                        .get(header::HOST)
                        .and_then(|h| h.to_str().ok())
                        .map(str::to_string)
                })
                .or_else(|| ctx.host.as_deref().map(str::to_string))
                .unwrap_or_else(|| "localhost".into());
            match (p, r.port) {
                (Some(p), _) => format!("{}{p}", strip_port(&given)),
                (None, Some(_)) => strip_port(&given).to_string(),
                (None, None) => given,
            }
        }
    };
    let path = normalized.unwrap_or(req.uri().path());
    let new_path = if let Some(p) = &r.path {
        p.clone()
    } else if let (Some(np), crate::table::PathMatcher::Prefix(prefix)) =
        (&r.prefix, &route.matcher.path)
    {
        let rest = if prefix == "/" {
            path
        } else {
            path.strip_prefix(prefix.as_str()).unwrap_or(path)
        };
        format!(
            "{}{}",
            np.trim_end_matches('/'),
            if rest.is_empty() { "/" } else { rest }
        )
    } else {
        path.to_string()
    };
    let query = req
        .uri()
        .query()
        .map(|q| format!("?{q}"))
        .unwrap_or_default();
    let location = format!("{scheme}://{authority}{new_path}{query}");
    let mut resp = Response::new(RespBody::empty());
    *resp.status_mut() = StatusCode::from_u16(r.status).unwrap_or(StatusCode::FOUND);
    if let Ok(v) = HeaderValue::from_str(&location) {
        resp.headers_mut().insert(header::LOCATION, v);
    }
    set_request_id(resp.headers_mut(), &ctx.request_id);
    resp
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
