//! The request path: every step a request passes, in order, in this file.
//!
//!  1. **admit** — request id (`X-Request-Id`, kept when sane) and W3C trace context; the host
//!     checked; hardening: head size and field count, smuggling shapes, the path normalized (or
//!     refused). (Framing rules came first, in the engine.)
//!  2. **route** — host, path, method, headers, query against the current routes (404 when
//!     none); a redirect route answers here.
//!  3. **policy** — `gantry-*` headers from the client removed; credentials verified against
//!     the route's requirement (401 with `WWW-Authenticate`, 403) and the service-to-service
//!     policy (`auth.rs`); the route's rate limit (429 with `Retry-After` and `RateLimit-*`),
//!     by client, header or verified subject; body size (413). The verified identity goes
//!     upstream in `Gantry-Auth-*` headers.
//!  4. **target** — a version from a header or a path segment, else a weighted backend of the
//!     route, else the release weights' split of the service's versions.
//!  5. **cache** — a fresh hit answers here; a stale entry with validators is revalidated.
//!  6. **upstream** — admission (the route's circuit breaker for the service, the service's
//!     concurrency limit), the request the instance gets (path rewrite, hop-by-hop fields
//!     dropped, `X-Forwarded-*`, request id, `traceparent`, configured header changes), a copy
//!     to the mirror, then the one upstream call (`upstream.rs`: balancing, attempts, retries).
//!  7. **respond** — WebSocket upgrades spliced; the instance's head passed through as it came
//!     unless a filter reads it: header changes, redirects pointed back under the prefix, the
//!     cache's store; request id.
//!  8. **end** — when the response body ends: the cache stores it, metrics and the access log.
//!
//! Each route's filters (`filters.rs`) were compiled into phase order when the routes were
//! built; each phase runs its slice of them.

use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::{Duration, Instant};

use bytes::Bytes;
use gantry_http::client::Mode;
use gantry_http::{tunnel, ConnInfo, ConnTimer, Deferred, RequestBody};
use http::header::{self, HeaderMap, HeaderValue};
use http::uri::PathAndQuery;
use http::{Method, Request, Response, StatusCode, Version};
use http_body::Body as _;

use crate::body::{BodyWatch, ReqBody, RespBody, Tee, UpstreamBody};
use crate::cache::{self, CacheKey, Lookup};
use crate::context::{
    asked_authority, cookie, forwarded_for, is_sane_request_id, is_websocket_upgrade,
    remove_hop_by_hop, request_host, scan, set_request_id, smuggling, truncate, Added, Ctx, Host,
    HTTP, HTTPS, TRACEPARENT, X_CACHE, X_FORWARDED_FOR, X_FORWARDED_HOST, X_FORWARDED_PREFIX,
    X_FORWARDED_PROTO, X_REQUEST_ID,
};
use crate::endpoints::{clock_ms, hash64, ms_at, EndpointSet};
use crate::filters::{self, Filter, PathRewrite, Phase, Selected};
use crate::inputs::Snapshot;
use crate::reject::Reject;
use crate::summary::{summarize, Detail};
use crate::table::{Action, CompiledRoute, ForwardAction, RequestView};
use crate::upstream::{Admitted, Answer, Call, Failure, Policy, ServiceSlot, UpstreamError};
use crate::{auth, path, trace, Gateway};

/// Copies a route's mirror may have in flight; more are skipped (and counted). Bounds the
/// sockets and tasks a hung shadow can hold (each copy waits at most connect + 30 s).
const MIRROR_MAX_IN_FLIGHT: i64 = 256;

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

/// Work done when a forwarded response's body ends: release the service slot, store the body in
/// the cache, tell the observers the request's summary.
pub(crate) struct RequestEnd {
    _service_slot: ServiceSlot,
    /// Boxed, like `detail`: both are opt-in, and every response body in flight carries this.
    /// With the gateway, which stores the body in its cache.
    cache: Option<Box<(Arc<Gateway>, CacheFill)>>,
    /// With the gateway, whose observers hear of the request.
    detail: Option<Box<(Arc<Gateway>, Detail)>>,
}

/// What a cacheable response's end stores: key, request headers, status, response headers,
/// freshness lifetime.
type CacheFill = (CacheKey, HeaderMap, StatusCode, HeaderMap, u64);

impl RequestEnd {
    /// Work that only holds the service's concurrency slot until the body ends.
    pub(crate) fn holding(slot: ServiceSlot, detail: Option<Box<(Arc<Gateway>, Detail)>>) -> Self {
        Self {
            _service_slot: slot,
            cache: None,
            detail,
        }
    }

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
        if let Some(d) = self.detail.take() {
            let (gw, detail) = *d;
            detail.summary(complete, bytes, |s| gw.observers.tell(s));
        }
    }
}

/// The target the target phase chose: a set of instances and the label the cache keys on.
enum Chosen<'s> {
    /// One of the snapshot's sets.
    Set(&'s EndpointSet, &'s str),
    /// A set a header or path segment narrowed to a version (boxed: off the common path, and
    /// what the request's future holds across its awaits is copied into it and read back cold).
    Selected(Selected),
}

impl Chosen<'_> {
    fn set(&self) -> &EndpointSet {
        match self {
            Chosen::Set(s, _) => s,
            Chosen::Selected(b) => &b.0,
        }
    }

    fn label(&self) -> &str {
        match self {
            Chosen::Set(_, l) => l,
            Chosen::Selected(b) => &b.1,
        }
    }
}

/// What the cache phase leaves for the respond phase.
#[derive(Default)]
struct CacheState {
    key: Option<CacheKey>,
    /// A stale entry being revalidated.
    revalidating: Option<Arc<cache::Entry>>,
    /// The client's own request is conditional (then the instance's 304 is the client's).
    client_conditional: bool,
    /// The client's headers, for `Vary` (boxed: only cached routes carry them).
    client_headers: Option<Box<HeaderMap>>,
}

impl Gateway {
    /// Run the pipeline for one request. `timer`: a timer the caller keeps for the connection,
    /// reused for every attempt's deadline and moved lazily (`gantry_http::timer`); `None`
    /// makes one per attempt.
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
            // ── 1. admit ──────────────────────────────────────────────────────────────────
            // The context is built in place (returned from a function it would be copied).
            let start = Instant::now();
            let mut cx = Ctx {
                start,
                start_ms: ms_at(start),
                end_ms: 0,
                seen: scan(req.headers()),
                request_id: HeaderValue::from_static(""),
                traceparent: HeaderValue::from_static(""),
                trace_id: [b'0'; 32],
                span_id: [b'0'; 16],
                method: req.method().clone(),
                version: req.version(),
                host: Host::None,
                normalized: None,
                path: String::new(),
                client: conn.peer,
                tls: conn.tls,
                end: None,
            };
            if let Err((why, extra)) = self.admit_request(&mut cx, &req) {
                return self.finish_reject(&cx, None, why, extra.as_deref());
            }

            // ── 2. route ──────────────────────────────────────────────────────────────────
            let snap = self.inputs.load_full();
            let route = {
                let view = RequestView {
                    host: cx.host.as_deref(),
                    path: cx.path(&req),
                    method: req.method(),
                    headers: req.headers(),
                    query: req.uri().query(),
                };
                snap.routes.table.find(&view)
            };
            let Some(route) = route else {
                let asked = format!(
                    "{} {} on host {}",
                    req.method(),
                    truncate(cx.path(&req), 512),
                    truncate(asked_authority(&req), 256),
                );
                return self.finish_reject(&cx, None, Reject::NoRoute, Some(&asked));
            };
            let resp = match &route.action {
                Action::Redirect(r) => {
                    let resp = filters::redirect(r, route, &req, conn.tls, &cx);
                    let status = resp.status().as_u16();
                    self.observe_now(&cx, Some(route), "", None, status, None, 0, None);
                    resp
                }
                Action::Forward(f) => {
                    self.forward_boxed(&snap, route, f, &mut req, conn, timer, &mut cx)
                        .await
                }
            };
            // The route's figures end at the response head (the last attempt's end: no clock
            // read of their own).
            let (end, end_ms) = match cx.end {
                Some(e) => (e, cx.end_ms),
                None => {
                    let e = Instant::now();
                    (e, ms_at(e))
                }
            };
            let took = end.saturating_duration_since(cx.start);
            route
                .metrics
                .record(end_ms, resp.status().as_u16(), took.as_secs_f64());
            resp
        }
    }

    /// Phase 1: the request's identity (its id, its trace context, its host, checked), then
    /// hardening: what no route may see — a head too large, request-smuggling shapes, a path
    /// that climbs out of its prefix.
    fn admit_request(
        &self,
        cx: &mut Ctx,
        req: &Request<RequestBody>,
    ) -> Result<(), (Reject, Option<String>)> {
        // An empty value: none (`request_id` off and the client sent none).
        cx.request_id = match cx.seen.request_id.take() {
            Some(v) if is_sane_request_id(&v) => v,
            _ if self.cfg.request_id => self.ids.next(),
            _ => HeaderValue::from_static(""),
        };
        if self.cfg.trace_context {
            let tc = trace::propagate(
                cx.seen
                    .traceparent
                    .take()
                    .as_ref()
                    .and_then(|v| v.to_str().ok()),
            );
            cx.span_id.copy_from_slice(&tc.header.as_bytes()[36..52]);
            cx.traceparent = tc.header;
            cx.trace_id = tc.trace_id;
        }
        if self.observers.any() {
            cx.path = req.uri().path().to_string();
        }
        cx.host = request_host(req).map_err(|why| (Reject::BadRequest(why), None))?;
        let head: usize =
            req.uri().path_and_query().map_or(0, |p| p.as_str().len()) + cx.seen.head_bytes;
        if head > self.cfg.max_header_bytes {
            let limit = format!("{} bytes", self.cfg.max_header_bytes);
            return Err((Reject::HeadTooLarge, Some(limit)));
        }
        // The header count (the HTTP/1.1 parsers stop at it; HTTP/2 frames are checked here).
        if req.headers().len() > self.cfg.max_headers {
            let limit = format!("{} header fields", self.cfg.max_headers);
            return Err((Reject::HeadTooLarge, Some(limit)));
        }
        if let Some(why) = smuggling(&cx.seen) {
            return Err((Reject::Malformed(why), None));
        }
        match path::normalize(req.uri().path()) {
            Ok(std::borrow::Cow::Borrowed(_)) => {}
            Ok(std::borrow::Cow::Owned(p)) => cx.normalized = Some(p),
            Err(e) => return Err((Reject::BadRequest(e.message()), None)),
        }
        Ok(())
    }

    /// The forwarding future is large; boxing it here keeps the per-request future hyper holds
    /// (and moves) small.
    #[allow(clippy::too_many_arguments)]
    fn forward_boxed<'a>(
        self: &'a Arc<Self>,
        snap: &'a Snapshot,
        route: &'a CompiledRoute,
        f: &'a ForwardAction,
        req: &'a mut Request<RequestBody>,
        conn: &'a ConnInfo,
        timer: Option<ConnTimer<'a>>,
        cx: &'a mut Ctx,
    ) -> std::pin::Pin<Box<dyn std::future::Future<Output = Response<RespBody>> + Send + 'a>> {
        Box::pin(self.forward(snap, route, f, req, conn, timer, cx))
    }

    /// Phases 3 to 8 for a forwarding route. An `async move` block rather than an `async fn`:
    /// the arguments then live in the future once, not twice.
    #[allow(clippy::too_many_arguments, clippy::manual_async_fn)]
    fn forward<'a>(
        self: &'a Arc<Self>,
        snap: &'a Snapshot,
        route: &'a CompiledRoute,
        f: &'a ForwardAction,
        req: &'a mut Request<RequestBody>,
        conn: &'a ConnInfo,
        mut timer: Option<ConnTimer<'a>>,
        cx: &'a mut Ctx,
    ) -> impl std::future::Future<Output = Response<RespBody>> + Send + 'a {
        async move {
            let now = cx.start_ms;

            // ── 3. policy ─────────────────────────────────────────────────────────────────
            if cx.seen.gantry {
                auth::strip_ours(req.headers_mut());
            }
            let mut who = None;
            let mut pass_credentials = false;
            for filter in f.filters.phase(Phase::Policy) {
                match filter {
                    // Nothing to read: no credentials asked for and every call allowed.
                    Filter::Auth(a)
                        if a.req.mode == gantry_authn::Mode::None
                            && snap.auth.calls.default_allow => {}
                    Filter::Auth(a) => {
                        let mut r = auth::authenticate(
                            a,
                            &snap.auth,
                            req.headers(),
                            conn.peer_identity.as_deref(),
                        );
                        // A key an external issuer's set lacks: it may have just rotated, and
                        // the refetch is asked for; wait (briefly) for it rather than refuse.
                        if matches!(
                            r,
                            Err(auth::Refusal::Unauthenticated(
                                gantry_authn::Denial::UnknownKey
                            ))
                        ) && snap.auth.refetch.is_some()
                        {
                            // Boxed: the wait is rare, and the forwarding future stays small.
                            let wait =
                                Box::pin(self.next_auth(snap.auth.revision, auth::REFETCH_WAIT));
                            if let Some(m) = wait.await {
                                r = auth::authenticate(
                                    a,
                                    &m,
                                    req.headers(),
                                    conn.peer_identity.as_deref(),
                                );
                            }
                        }
                        pass_credentials = a.pass_credentials;
                        match r {
                            Ok(id) => who = id,
                            Err(refusal) => {
                                return self.refuse(cx, route, &refusal, req.uri().path())
                            }
                        }
                    }
                    Filter::RateLimit { limiter, key } => {
                        if let Err(d) = filters::rate_limit(
                            limiter,
                            key,
                            req.headers(),
                            conn.peer,
                            now,
                            who.as_ref().map(|w| &*w.id),
                        ) {
                            route.metrics.rate_limited.inc();
                            let mut resp =
                                self.finish_reject(cx, Some(route), Reject::RateLimited, None);
                            filters::rate_limit_headers(resp.headers_mut(), &d);
                            return resp;
                        }
                    }
                    Filter::BodyLimit(max)
                        if filters::body_too_large(req.body().size_hint(), *max) =>
                    {
                        let limit = max.to_string();
                        return self.finish_reject(cx, Some(route), Reject::TooLarge, Some(&limit));
                    }
                    _ => {}
                }
            }
            if let Some(w) = &who {
                auth::identity_headers(req.headers_mut(), &w.id);
                if let Some(s) = &w.session {
                    auth::session_upstream(req.headers_mut(), s);
                } else if w.workload_token() && !pass_credentials {
                    req.headers_mut().remove(header::AUTHORIZATION);
                }
            }
            // (A session's request lost the cookie in `session_upstream` already.)
            if cx.seen.cookie && who.as_ref().is_none_or(|w| w.session.is_none()) {
                auth::strip_session_cookie(req.headers_mut());
            }

            // ── 4. target ─────────────────────────────────────────────────────────────────
            // `cx.normalized` becomes the path that goes upstream (less a version segment).
            let mut chosen: Option<Chosen<'_>> = None;
            for filter in f.filters.phase(Phase::Target) {
                if chosen.is_some() {
                    break;
                }
                let Some(all) = snap.endpoints.set(f.all_versions) else {
                    break;
                };
                match filter {
                    Filter::VersionHeader(name) => {
                        match filters::version_from_header(name, req.headers(), all) {
                            Some(Ok(s)) => chosen = Some(Chosen::Selected(s)),
                            Some(Err(why)) => {
                                return self.finish_reject(
                                    cx,
                                    Some(route),
                                    Reject::BadRequest(why),
                                    None,
                                )
                            }
                            None => {}
                        }
                    }
                    Filter::VersionPath => {
                        if let Some((s, rest)) =
                            filters::version_from_path(route, cx.path(req), all)
                        {
                            chosen = Some(Chosen::Selected(s));
                            cx.normalized = Some(rest);
                        }
                    }
                    _ => {}
                }
            }
            let (chosen, backend) = match chosen {
                Some(c) => (c, &f.backends[0]),
                None => match pick_backend(snap, f) {
                    Some((set, label, b)) => (Chosen::Set(set, label), b),
                    None => return self.finish_reject(cx, Some(route), Reject::NoInstance, None),
                },
            };
            let set = chosen.set();
            if set.endpoints.is_empty() {
                return match &chosen {
                    Chosen::Selected(s) => {
                        self.finish_reject(cx, Some(route), Reject::NoVersion, Some(&s.1))
                    }
                    Chosen::Set(..) => {
                        self.finish_reject(cx, Some(route), Reject::NoInstance, None)
                    }
                };
            }
            let service = &set.service;

            // ── 5. cache ──────────────────────────────────────────────────────────────────
            let mut cache = CacheState::default();
            if let Some(Filter::Cache(_)) = f.filters.phase(Phase::Cache).first() {
                let rest = cx.path(req);
                let pq = match req.uri().query() {
                    Some(q) => format!("{rest}?{q}"),
                    None => rest.to_string(),
                };
                let key = cache::key_for(
                    req.method(),
                    cx.host.as_deref(),
                    &pq,
                    &route.id,
                    chosen.label(),
                );
                if let Some(key) = key {
                    match self.cache.lookup(&key, req.headers(), now) {
                        Lookup::Fresh(e) => {
                            self.metrics.cache("hit");
                            return self.serve_cached(&e, req, "HIT", cx, route, f);
                        }
                        Lookup::Stale(e) => cache.revalidating = Some(e),
                        Lookup::Miss => {}
                    }
                    cache.client_conditional = req.headers().contains_key(header::IF_NONE_MATCH)
                        || req.headers().contains_key(header::IF_MODIFIED_SINCE);
                    cache.key = Some(key);
                }
            }

            // ── 6. upstream ───────────────────────────────────────────────────────────────
            let mut admitted = match self.admit(service, Some(&*backend.breaker), now) {
                Ok(a) => a,
                Err(failure) => return self.failed(cx, route, f, failure),
            };
            // The upstream request, built in place: `req` (borrowed from `handle_request`,
            // which owns it) keeps its parts, and the attempts borrow what they send.
            let upgrade = cx.seen.upgrade && is_websocket_upgrade(req);
            let on_client_upgrade = upgrade.then(|| tunnel::client_upgrade(&mut *req));
            let version = req.version();
            let mode = match service.policy.protocol {
                _ if upgrade => Mode::Upgrade,
                gantry_model::UpstreamProtocol::H2c => Mode::Http2,
                gantry_model::UpstreamProtocol::Auto if version == Version::HTTP_2 => Mode::Http2,
                _ => Mode::Http1,
            };
            let rewrite = f.filters.rewrite();
            let Some(pq) =
                filters::rewrite_path(route, rewrite, cx.normalized.as_deref(), req.uri())
            else {
                return self.finish_reject(
                    cx,
                    Some(route),
                    Reject::BadRequest("the rewritten path is not a valid URI path"),
                    None,
                );
            };
            // The client's authority, where something sends it on: HTTP/2's `:authority`,
            // `X-Forwarded-Host`, a `Host` for an HTTP/1.1 instance when the client sent none,
            // a mirror's copy, redirects to rewrite.
            let forwarding = self.cfg.forwarded_headers;
            let authority: Option<HeaderValue> = if mode == Mode::Http2
                || forwarding
                || !cx.seen.host
                || f.filters.reads_response_head
                || !f.filters.phase(Phase::Upstream).is_empty()
            {
                req.uri()
                    .authority()
                    .and_then(|a| HeaderValue::from_str(a.as_str()).ok())
                    .or_else(|| req.headers().get(header::HOST).cloned())
            } else {
                None
            };
            let mut headers = std::mem::take(req.headers_mut());
            if cache.key.is_some() {
                cache.client_headers = Some(Box::new(headers.clone()));
            }
            if cx.seen.hop_by_hop {
                let upgrade_value = if upgrade {
                    headers.get(header::UPGRADE).cloned()
                } else {
                    None
                };
                remove_hop_by_hop(&mut headers, mode == Mode::Http2);
                if let Some(u) = upgrade_value {
                    headers.insert(header::CONNECTION, HeaderValue::from_static("upgrade"));
                    headers.insert(header::UPGRADE, u);
                }
            }
            // The headers the gateway sets, built in a block: the values it moves in do not
            // keep slots of their own in the request's future.
            let mut added = Some({
                let forwarded_for = forwarding.then(|| {
                    if cx.seen.forwarded_for {
                        forwarded_for(headers.get(&X_FORWARDED_FOR), conn.peer)
                    } else {
                        conn.peer_ip.clone()
                    }
                });
                if forwarding && cx.seen.forwarded_for {
                    headers.remove(&X_FORWARDED_FOR);
                }
                let request_id = (!cx.request_id.is_empty()).then(|| cx.request_id.clone());
                let traceparent = self
                    .cfg
                    .trace_context
                    .then(|| std::mem::replace(&mut cx.traceparent, HeaderValue::from_static("")));
                if cx.seen.ours {
                    // The client's own values of the headers the gateway sets are replaced
                    // (those it does not set pass as they are).
                    for (n, ours) in [
                        (&X_FORWARDED_PROTO, forwarding),
                        (&X_FORWARDED_HOST, forwarding),
                        (&X_FORWARDED_PREFIX, forwarding),
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
                    forwarded_prefix: None,
                    request_id,
                }
            });
            let mut has_host = cx.seen.host;
            // The route's upstream filters; the mirror's turn comes once the body is known.
            let mut mirror = None;
            for filter in f.filters.phase(Phase::Upstream) {
                match filter {
                    Filter::Rewrite(r) => {
                        if let (Some(a), true) = (added.as_mut(), forwarding) {
                            a.forwarded_prefix = forwarded_prefix(route, r);
                        }
                    }
                    Filter::RequestHeaders(ops) => {
                        // Configured changes may override the gateway's own headers: those go
                        // into the map first.
                        if let Some(a) = added.take() {
                            a.insert_into(&mut headers);
                        }
                        ops.apply(&mut headers);
                        has_host = headers.contains_key(header::HOST);
                    }
                    Filter::Mirror(m) => mirror = Some(m),
                    _ => {}
                }
            }
            if let (Some(e), false) = (&cache.revalidating, cache.client_conditional) {
                if let Some(etag) = &e.etag {
                    headers.insert(header::IF_NONE_MATCH, etag.clone());
                }
                if let Some(lm) = &e.last_modified {
                    headers.insert(header::IF_MODIFIED_SINCE, lm.clone());
                }
            }
            let replayable = req.body().is_end_stream();
            let watch = (!replayable).then(|| Arc::new(BodyWatch::default()));
            // The body until an attempt takes it; an attempt that did not send it puts it back.
            let body = Some({
                let down_body = std::mem::replace(req.body_mut(), RequestBody::Empty);
                // A body is copied frame by frame to the mirror as the primary sends it (`Tee`).
                let mut tee = None;
                if let Some(m) = mirror {
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
                            snap,
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
                match &watch {
                    None => ReqBody::Empty,
                    Some(w) => ReqBody::limited(down_body, f.max_body_bytes, w.clone(), tee),
                }
            });
            let req: &Request<RequestBody> = req;
            let method = req.method();
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
            let mut call = Call {
                set,
                mode,
                method,
                target: &pq,
                authority: authority.as_ref(),
                host_in_map: has_host,
                headers: &mut headers,
                extra: added.as_ref(),
                body,
                watch: watch.as_deref(),
                hash_key,
            };
            let policy = Policy {
                retry: &f.retry,
                budget: Some(&f.budget),
                retries: Some(&route.metrics.retries),
                start: cx.start,
                start_ms: cx.start_ms,
                request_timeout: f.request_timeout,
                per_try_timeout: f.per_try_timeout,
                failure_statuses: &f.failure_statuses,
                passive_health: true,
            };
            let breaker = admitted.breaker.map(|b| (b, &mut admitted.probe));
            let answer = self.call(&mut call, &policy, breaker, timer.as_mut()).await;
            drop(call);
            // The map's table goes back to this thread's pool for the next request.
            gantry_http::codec::recycle_map(headers);
            let answer = match answer {
                Ok(a) => a,
                Err(e) => {
                    let end = Instant::now();
                    cx.end = Some(end);
                    cx.end_ms = ms_at(end);
                    return self.upstream_failed(cx, route, f, e);
                }
            };
            cx.end = Some(answer.end);
            cx.end_ms = answer.end_ms;

            // ── 7. respond ────────────────────────────────────────────────────────────────
            self.respond(
                route,
                f,
                cx,
                admitted,
                answer,
                cache,
                on_client_upgrade,
                method,
                authority.as_ref(),
            )
        }
    }

    /// The answer when the upstream phase got no response.
    fn upstream_failed(
        &self,
        cx: &Ctx,
        route: &CompiledRoute,
        f: &ForwardAction,
        e: UpstreamError,
    ) -> Response<RespBody> {
        if e.attempts > 0 {
            tracing::debug!(route = %route.id, failure = e.failure.as_str(), attempts = e.attempts, sent = e.sent, "upstream call failed");
        }
        self.failed(cx, route, f, e.failure)
    }

    /// The gateway's own answer for a failure.
    fn failed(
        &self,
        cx: &Ctx,
        route: &CompiledRoute,
        f: &ForwardAction,
        failure: Failure,
    ) -> Response<RespBody> {
        let (why, extra) = match failure {
            Failure::NoInstance => (Reject::NoInstance, None),
            Failure::CircuitOpen { retry_after_ms } => {
                let mut r = self.finish_reject(cx, Some(route), Reject::CircuitOpen, None);
                r.headers_mut().insert(
                    header::RETRY_AFTER,
                    HeaderValue::from(retry_after_ms.div_ceil(1000).max(1)),
                );
                return r;
            }
            Failure::Bulkhead => (Reject::Bulkhead, None),
            Failure::TlsUnavailable
            | Failure::Connect(_)
            | Failure::Reset(_)
            | Failure::Status(_)
            | Failure::BodyFailed => (Reject::UpstreamError, None),
            Failure::Timeout => (Reject::UpstreamTimeout, None),
            Failure::Client(c) => (Reject::Client(c), None),
            Failure::BodyTooLarge => (Reject::TooLarge, Some(f.max_body_bytes.to_string())),
        };
        self.finish_reject(cx, Some(route), why, extra.as_deref())
    }

    /// Phase 7: the instance's response as the client gets it.
    #[allow(clippy::too_many_arguments)]
    fn respond(
        self: &Arc<Self>,
        route: &CompiledRoute,
        f: &ForwardAction,
        cx: &mut Ctx,
        admitted: Admitted<'_>,
        answer: Answer<'_>,
        cache: CacheState,
        on_client_upgrade: Option<tunnel::Upgrade>,
        method: &Method,
        authority: Option<&HeaderValue>,
    ) -> Response<RespBody> {
        let Answer {
            resp,
            ep,
            guard,
            elapsed: upstream_time,
            attempts,
            ..
        } = answer;
        let slot = admitted.slot;
        let status = resp.status();
        // WebSocket: splice the two upgraded connections.
        let mut resp = resp;
        if status == StatusCode::SWITCHING_PROTOCOLS {
            if let Some(client) = on_client_upgrade {
                let upstream = tunnel::upstream_upgrade(&mut resp);
                let (mut parts, _body) = resp.into_parts();
                tunnel::spawn_splice(client, upstream, f.idle_timeout, (guard, slot));
                set_request_id(&mut parts.headers, &cx.request_id);
                self.respond_filters(f, &mut parts.headers, cx, authority, &ep.authority);
                let (version, took) = (Some(&ep.version), Some(upstream_time));
                self.observe_now(cx, Some(route), &ep.id, version, 101, None, 0, took);
                return Response::from_parts(parts, RespBody::empty());
            }
        }
        let (mut parts, mut incoming) = resp.into_parts();
        // A head read in-task stays as it came unless something here must read or edit it.
        let mut raw = incoming.take_head();
        let defer = raw.as_ref().is_some_and(|r| !r.needs_map)
            && !f.filters.reads_response_head
            && cache.revalidating.is_none();
        if !defer {
            if let Some(r) = raw.take() {
                match r.to_map(4) {
                    Ok(h) => parts.headers = h,
                    Err(_) => {
                        return self.finish_reject(cx, Some(route), Reject::UpstreamError, None)
                    }
                }
            }
        }
        // A revalidated cache entry: serve it.
        if let (Some(entry), Some(key), StatusCode::NOT_MODIFIED, false) = (
            &cache.revalidating,
            &cache.key,
            status,
            cache.client_conditional,
        ) {
            // A 304 has no body: dropped, its connection goes back to the pool.
            drop(incoming);
            let req_headers = cache.client_headers.map(|h| *h).unwrap_or_default();
            let fresh = self
                .cache
                .refresh(key, &req_headers, entry, &parts.headers, clock_ms());
            self.metrics.cache("revalidated");
            drop(guard);
            drop(slot);
            let mut r = cached_response(&fresh, method, "REVALIDATED", clock_ms());
            set_request_id(r.headers_mut(), &cx.request_id);
            self.respond_filters(f, r.headers_mut(), cx, authority, &ep.authority);
            let (status, bytes) = (r.status().as_u16(), fresh.body.len() as u64);
            let (version, took) = (Some(&ep.version), Some(upstream_time));
            self.observe_now(cx, Some(route), &ep.id, version, status, None, bytes, took);
            return r;
        }
        if raw.is_none() {
            remove_hop_by_hop(&mut parts.headers, false);
        }
        let mut body = UpstreamBody::new(incoming, guard, f.idle_timeout);
        let mut end = RequestEnd {
            _service_slot: slot,
            cache: None,
            detail: None,
        };
        if let (Some(key), Some(policy)) = (cache.key, &f.filters.cache) {
            // The request headers that matter for Vary are the ones the client sent.
            let client_headers = cache.client_headers.map(|h| *h).unwrap_or_default();
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
                extra: Some((&X_REQUEST_ID, cx.request_id.clone())),
            }),
            None => {
                set_request_id(&mut parts.headers, &cx.request_id);
                self.respond_filters(f, &mut parts.headers, cx, authority, &ep.authority);
            }
        }
        if self.observers.any() {
            end.detail = Some(Box::new((
                self.clone(),
                Detail {
                    cx: cx.take_for_summary(),
                    route: route.id.clone(),
                    service: ep.service.clone(),
                    version: Some(ep.version.clone()),
                    instance: ep.id.clone(),
                    caller: None,
                    status: status.as_u16(),
                    upstream: Some(upstream_time),
                    attempts,
                },
            )));
        }
        body.on_end(end);
        Response::from_parts(parts, RespBody::Upstream(Box::new(body)))
    }

    /// The respond phase's filters, on a response head in a map.
    fn respond_filters(
        &self,
        f: &ForwardAction,
        h: &mut HeaderMap,
        cx: &Ctx,
        authority: Option<&HeaderValue>,
        instance: &http::uri::Authority,
    ) {
        for filter in f.filters.phase(Phase::Respond) {
            match filter {
                Filter::ResponseHeaders(ops) => ops.apply(h),
                Filter::RedirectRewrite(lr) => {
                    let Some(loc) = h.get(header::LOCATION).and_then(|v| v.to_str().ok()) else {
                        continue;
                    };
                    let asked = authority
                        .and_then(|a| a.to_str().ok())
                        .or(cx.host.as_deref());
                    let scheme = if cx.tls { "https" } else { "http" };
                    if let Some(v) = lr
                        .rewrite(loc, scheme, asked, instance.as_str())
                        .and_then(|l| HeaderValue::from_str(&l).ok())
                    {
                        h.insert(header::LOCATION, v);
                    }
                }
                _ => {}
            }
        }
    }

    fn serve_cached(
        &self,
        e: &cache::Entry,
        req: &Request<RequestBody>,
        how: &'static str,
        cx: &Ctx,
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
        set_request_id(r.headers_mut(), &cx.request_id);
        for filter in f.filters.phase(Phase::Respond) {
            if let Filter::ResponseHeaders(ops) = filter {
                ops.apply(r.headers_mut());
            }
        }
        let (status, bytes) = (r.status().as_u16(), e.body.len() as u64);
        self.observe_now(cx, Some(route), "cache", None, status, None, bytes, None);
        r
    }

    /// Tell the observers (if any) of a request that ends now.
    #[allow(clippy::too_many_arguments)]
    pub(crate) fn observe_now(
        &self,
        cx: &Ctx,
        route: Option<&CompiledRoute>,
        instance: &str,
        version: Option<&semver::Version>,
        status: u16,
        reason: Option<&'static str>,
        bytes: u64,
        upstream: Option<Duration>,
    ) {
        if !self.observers.any() {
            return;
        }
        summarize(
            cx,
            route.map(|r| &*r.id),
            route.map_or("", |r| &*r.service),
            version,
            instance,
            None,
            status,
            reason,
            true,
            bytes,
            upstream,
            u32::from(upstream.is_some()),
            |s| self.observers.tell(s),
        );
    }

    /// Send a copy to the shadow target through the upstream call (no retries, no breaker);
    /// its answer is read and dropped, and never awaited here. `body` is empty, or the copy a
    /// `Tee` feeds as the primary sends the request's body.
    #[allow(clippy::too_many_arguments)]
    fn mirror(
        self: &Arc<Self>,
        snap: &Snapshot,
        m: &filters::Mirror,
        method: &Method,
        pq: &PathAndQuery,
        authority: Option<&HeaderValue>,
        headers: &HeaderMap,
        added: Option<&Added>,
        downstream_h2: bool,
        body: ReqBody,
    ) {
        let Some(set) = snap
            .endpoints
            .sets
            .get(m.target as usize)
            .cloned()
            .flatten()
        else {
            m.metrics.failed.inc();
            return;
        };
        let mode = match set.service.policy.protocol {
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
        let gw = self.clone();
        let timeout =
            Duration::from_millis(set.service.policy.connect_timeout_ms) + Duration::from_secs(30);
        tokio::spawn(async move {
            let no_retries = gantry_model::RetryPolicy::none();
            let answered = match gw.admit(&set.service, None, clock_ms()) {
                Err(_) => false,
                Ok(admitted) => {
                    let host_in_map = headers.contains_key(header::HOST);
                    let mut call = Call {
                        set: &set,
                        mode,
                        method: &method,
                        target: &pq,
                        authority: authority.as_ref(),
                        host_in_map,
                        headers: &mut headers,
                        extra: None,
                        body: Some(body),
                        watch: None,
                        hash_key: None,
                    };
                    let start = Instant::now();
                    let policy = Policy {
                        retry: &no_retries,
                        budget: None,
                        retries: None,
                        start,
                        start_ms: ms_at(start),
                        request_timeout: timeout,
                        per_try_timeout: None,
                        failure_statuses: &[],
                        passive_health: true,
                    };
                    let _slot = admitted.slot;
                    match gw.call(&mut call, &policy, None, None).await {
                        Ok(a) => {
                            let _guard = a.guard;
                            let read = http_body_util::BodyExt::collect(a.resp.into_body());
                            matches!(tokio::time::timeout(timeout, read).await, Ok(Ok(_)))
                        }
                        Err(_) => false,
                    }
                }
            };
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

/// `X-Forwarded-Prefix` for a route that strips or replaces its prefix: what the client's path
/// had in front of what the instance got.
fn forwarded_prefix(route: &CompiledRoute, rewrite: &PathRewrite) -> Option<HeaderValue> {
    rewrite.upstream_prefix()?;
    match &route.matcher.path {
        crate::table::PathMatcher::Prefix(p) if p != "/" => HeaderValue::from_str(p).ok(),
        _ => None,
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

/// A backend by weight, its set and its cache label: the route's own split, then the release
/// weights' split of that backend's service. A share whose target has no instance (a canary
/// not started yet, a version that is down) goes to the others, by their weights.
fn pick_backend<'s>(
    snap: &'s Snapshot,
    f: &'s ForwardAction,
) -> Option<(&'s EndpointSet, &'s str, &'s crate::table::Backend)> {
    let eps = &snap.endpoints;
    let backend = if f.backends.len() == 1 || f.total_weight == 0 {
        f.backends.first()?
    } else {
        let live =
            |b: &&crate::table::Backend| eps.set(b.target).is_some_and(|s| !s.endpoints.is_empty());
        weighted(&f.backends, |b| b.weight, &|_| true, f.total_weight)
            .filter(live)
            .or_else(|| {
                let total = f
                    .backends
                    .iter()
                    .filter(live)
                    .map(|b| u64::from(b.weight))
                    .sum();
                weighted(&f.backends, |b| b.weight, &live, total)
            })
            .or_else(|| f.backends.first())?
    };
    if let Some(split) = eps.split(backend.target) {
        if let Some(p) = pick_part(split) {
            return Some((&p.0, &p.2, backend));
        }
    }
    Some((eps.set(backend.target)?, &backend.label, backend))
}

/// A version's part of a release split, by weight, among the parts with instances.
fn pick_part(split: &crate::inputs::Split) -> Option<&(Arc<EndpointSet>, u32, Box<str>)> {
    let parts = &split.parts;
    let live = |p: &&(Arc<EndpointSet>, u32, Box<str>)| !p.0.endpoints.is_empty();
    weighted(parts, |p| p.1, &|_| true, split.total)
        .filter(live)
        .or_else(|| {
            let total = parts.iter().filter(live).map(|p| u64::from(p.1)).sum();
            weighted(parts, |p| p.1, &live, total)
        })
}

/// The instances a release split sends one request to.
pub(crate) fn pick_split(split: &crate::inputs::Split) -> Option<&EndpointSet> {
    pick_part(split).map(|p| &*p.0)
}

/// One of `items`, drawn by weight among those `usable` keeps (`total`: their weights' sum).
fn weighted<'i, T>(
    items: &'i [T],
    weight: impl Fn(&T) -> u32,
    usable: &dyn Fn(&&'i T) -> bool,
    total: u64,
) -> Option<&'i T> {
    if total == 0 {
        return None;
    }
    let mut x = crate::rand::below(total);
    for it in items {
        if !usable(&it) {
            continue;
        }
        let w = u64::from(weight(it));
        if x < w {
            return Some(it);
        }
        x -= w;
    }
    None
}
