//! The one upstream call: everything between "this request goes to service S" and an
//! instance's response head — admission (the call site's circuit breaker, the service's
//! concurrency limit), then attempts: pick an instance (the service's load balancer; local
//! first), send on a pooled connection (`gantry_http::client::send`) within the per-try
//! timeout, learn from the result (latency average, outlier detection, instance metrics), and
//! retry where safe, within the retry budget, after a jittered backoff.
//!
//! Proxied requests, mirrored copies, active health checks and in-process callers
//! ([`Gateway::call_service`]: the message bus's push delivery, aggregation routes) all go
//! through it, with the same balancing, retries, breakers and metrics.
//!
//! A failure is typed ([`Failure`]): what went wrong, whether any of the request left, and
//! whether it was the client's doing — a client's broken or aborted upload, or one too slow to
//! arrive, is answered 400/408 and never counted against an instance or the service (Envoy
//! tells downstream resets from upstream ones the same way).

use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::{Duration, Instant};

use gantry_http::client::{self, ErrorKind, Mode, Outgoing};
use gantry_http::pool::Target;
use gantry_http::{timer, ClientBody, ConnTimer};
use gantry_model::RetryPolicy;
use gantry_telemetry::stats::Outcome;
use http::header::{HeaderMap, HeaderValue};
use http::uri::PathAndQuery;
use http::{Method, Response};
use prometheus_client::metrics::counter::Counter;

use crate::body::{BodyFault, BodyWatch, ClientFault, InflightGuard, ReqBody, UpstreamBody};
use crate::context::Added;
use crate::endpoints::{clock_ms, ms_at, BreakerScope, Endpoint, EndpointSet, ServiceState};
use crate::resilience::{backoff, ejection_allowed, Admission, BreakerChange, OutlierVerdict};
use crate::Gateway;

/// Why an upstream call got no usable response.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Failure {
    /// The service has no routable instance (or none of the version asked for).
    NoInstance,
    /// The call site's circuit breaker is open.
    CircuitOpen { retry_after_ms: u64 },
    /// The service has as many requests in flight as its policy allows.
    Bulkhead,
    /// The service asked for TLS and it could not be set up: never sent in clear text.
    TlsUnavailable,
    /// No connection: refused, unreachable, connect timeout, TLS or HTTP/2 handshake.
    Connect(ErrorKind),
    /// The connection closed or reset before a response head, or the answer was not HTTP.
    Reset(ErrorKind),
    /// No response head within the per-try or the request timeout.
    Timeout,
    /// The instance answered with a status the retry policy retries (the last attempt's
    /// answer is returned instead, when there is one).
    Status(u16),
    /// The client's side failed: its body's framing was bad, it went away, or it sent its body
    /// too slowly for the timeout. Nobody else's fault.
    Client(ClientFault),
    /// The request body is larger than the route allows.
    BodyTooLarge,
    /// The request body's own source failed (a mirror's copy that fell behind its primary, an
    /// in-process caller's body): not the instance's doing.
    BodyFailed,
}

impl Failure {
    /// A failure of the instance or the network, which the breaker and outlier detection
    /// count; `false` for the client's faults and the gateway's own refusals.
    pub fn is_upstream(self) -> bool {
        matches!(
            self,
            Failure::Connect(_) | Failure::Reset(_) | Failure::Timeout | Failure::Status(_)
        )
    }

    /// The metric and log name of the failure.
    pub fn as_str(self) -> &'static str {
        match self {
            Failure::NoInstance => "no_instance",
            Failure::CircuitOpen { .. } => "circuit_open",
            Failure::Bulkhead => "concurrency_limit",
            Failure::TlsUnavailable => "tls_unavailable",
            Failure::Connect(k) | Failure::Reset(k) => k.as_str(),
            Failure::Timeout => "timeout",
            Failure::Status(_) => "status",
            Failure::Client(ClientFault::Malformed) => "client_body_malformed",
            Failure::Client(ClientFault::Closed) => "client_closed",
            Failure::Client(ClientFault::Slow) => "client_body_timeout",
            Failure::BodyTooLarge => "body_too_large",
            Failure::BodyFailed => "request_body_failed",
        }
    }
}

/// An upstream call that got no usable response.
#[derive(Debug, Clone, Copy)]
pub struct UpstreamError {
    pub failure: Failure,
    /// Some of the request may have reached an instance.
    pub sent: bool,
    /// Sending the request again would be safe: none of it left, or its method is idempotent.
    pub retry_safe: bool,
    /// Attempts made (0: refused before any).
    pub attempts: u32,
}

/// The request to send, borrowed from whoever builds it; the body moves in.
pub(crate) struct Call<'s, 'a> {
    pub set: &'s EndpointSet,
    pub mode: Mode,
    pub method: &'a Method,
    pub target: &'a PathAndQuery,
    /// Who the request is for (HTTP/2's `:authority`; `Host` when the map has none).
    pub authority: Option<&'a HeaderValue>,
    pub host_in_map: bool,
    pub headers: &'a mut HeaderMap,
    /// Header fields the in-task client writes behind the map.
    pub extra: Option<&'a Added>,
    pub body: Option<ReqBody>,
    /// What the request body's reader saw of the client (its faults, whether it was waiting).
    pub watch: Option<&'a BodyWatch>,
    /// For hash load balancing.
    pub hash_key: Option<u64>,
}

/// How the call behaves.
pub(crate) struct Policy<'a> {
    pub retry: &'a RetryPolicy,
    /// Retries are also limited by this budget (none: only by `retry.attempts`).
    pub budget: Option<&'a crate::resilience::RetryBudget>,
    /// Counted on every retry.
    pub retries: Option<&'a Counter>,
    /// When the request arrived: the first attempt starts then (no clock read of its own), and
    /// the request timeout runs from it.
    pub start: Instant,
    /// `start` on the millisecond clock.
    pub start_ms: u64,
    pub request_timeout: Duration,
    pub per_try_timeout: Option<Duration>,
    /// Statuses that count as failures for the breaker, besides 502, 503 and 504.
    pub failure_statuses: &'a [u16],
    /// Feed what the attempts show to outlier detection, the latency average and the
    /// instance metrics (not for active health checks).
    pub passive_health: bool,
}

/// An admitted call: its breaker, its probe slot (when the breaker is half-open) and its place
/// under the service's limit.
pub(crate) struct Admitted<'a> {
    pub breaker: Option<&'a BreakerScope>,
    pub probe: Probe<'a>,
    pub slot: ServiceSlot,
}

/// A half-open breaker's probe slot, held by the call it admitted. The call's outcome reports
/// it ([`Probe::take`]); a call that ends without one (the client's fault, a request cancelled
/// or turned away by the concurrency limit, nothing to send to) frees the slot when dropped, so
/// a lost probe never keeps a circuit shut and never counts as a success.
pub(crate) struct Probe<'a>(Option<&'a BreakerScope>);

impl Probe<'_> {
    /// Whether this call is the probe (still unreported); it reports now.
    fn take(&mut self) -> bool {
        self.0.take().is_some()
    }
}

impl Drop for Probe<'_> {
    fn drop(&mut self) {
        if let Some(b) = self.0.take() {
            b.release_probe();
        }
    }
}

/// A request counted against its service's concurrency limit until dropped.
pub(crate) struct ServiceSlot(Arc<ServiceState>);

impl Drop for ServiceSlot {
    fn drop(&mut self) {
        self.0.inflight.fetch_sub(1, Ordering::Relaxed);
    }
}

/// An instance's answer.
pub(crate) struct Answer<'s> {
    pub resp: Response<ClientBody>,
    pub ep: &'s Arc<Endpoint>,
    /// The instance's in-flight count, held until the response body ends.
    pub guard: InflightGuard,
    /// The answering attempt's time to the response head.
    pub elapsed: Duration,
    /// When the response head arrived.
    pub end: Instant,
    /// `end` on the millisecond clock.
    pub end_ms: u64,
    pub attempts: u32,
}

/// Outcome of one attempt. (A short-lived local: boxing the large variant would cost an
/// allocation per request for nothing.)
#[allow(clippy::large_enum_variant)]
enum Attempt {
    Response(Response<ClientBody>),
    Failed(client::SendError),
    TimedOut,
}

fn is_idempotent(m: &Method) -> bool {
    matches!(
        *m,
        Method::GET | Method::HEAD | Method::OPTIONS | Method::TRACE | Method::PUT | Method::DELETE
    )
}

/// Does an answer with this status count as a failure for the breaker?
fn breaker_failure(status: u16, extra: &[u16]) -> bool {
    matches!(status, 502..=504) || extra.contains(&status)
}

/// The jittered backoff before retry number `attempt_no`, ending at the deadline at the latest,
/// as a boxed sleep: the wait is rare, so its timer stays out of the request's future.
fn retry_pause(
    retry: &RetryPolicy,
    attempt_no: u32,
    deadline: tokio::time::Instant,
) -> std::pin::Pin<Box<tokio::time::Sleep>> {
    let wait = backoff(attempt_no, retry.backoff_base_ms, retry.backoff_max_ms);
    Box::pin(tokio::time::sleep_until(
        (tokio::time::Instant::now() + wait).min(deadline),
    ))
}

impl Gateway {
    /// Admission for a call to `service`: the call site's breaker (if any), then the service's
    /// concurrency limit (bulkhead).
    pub(crate) fn admit<'a>(
        &self,
        service: &Arc<ServiceState>,
        breaker: Option<&'a BreakerScope>,
        now: u64,
    ) -> Result<Admitted<'a>, Failure> {
        if service.tls_failed {
            return Err(Failure::TlsUnavailable);
        }
        let probe = match breaker.map(|b| (b, b.admit(now))) {
            None | Some((_, Admission::Allowed { probe: false })) => Probe(None),
            Some((b, Admission::Allowed { probe: true })) => Probe(Some(b)),
            Some((_, Admission::Rejected { retry_after_ms })) => {
                return Err(Failure::CircuitOpen { retry_after_ms })
            }
        };
        let limit = service.policy.max_concurrent_requests as usize;
        let n = service.inflight.fetch_add(1, Ordering::Relaxed);
        let slot = ServiceSlot(service.clone());
        if limit > 0 && n >= limit {
            service.metrics.bulkhead_rejections.inc();
            // A probe turned away never went: its slot is freed (dropped), nothing recorded.
            return Err(Failure::Bulkhead);
        }
        Ok(Admitted {
            breaker,
            probe,
            slot,
        })
    }

    /// Send `call`, with retries as `policy` allows. `breaker`: the call site's breaker, and
    /// the call's probe slot (from `admit`), which the outcome reports. `timer`: the connection's
    /// attempt timer, when the request came on the in-task server (else one is made per
    /// attempt).
    ///
    /// An `async move` block rather than an `async fn`: the arguments then live in the future
    /// once, not twice.
    #[allow(clippy::manual_async_fn)]
    pub(crate) fn call<'s, 'a, 'c, 'p, 't>(
        &'c self,
        call: &'c mut Call<'s, 'a>,
        policy: &'c Policy<'p>,
        mut breaker: Option<(&'s BreakerScope, &'c mut Probe<'s>)>,
        mut timer: Option<&'c mut ConnTimer<'t>>,
    ) -> impl std::future::Future<Output = Result<Answer<'s>, UpstreamError>>
           + Send
           + use<'s, 'a, 'c, 'p, 't>
    where
        's: 'c,
        'a: 'c,
        'p: 'c,
        't: 'c,
    {
        async move {
            // The call's fields are read in place: destructured, they would take slots of
            // their own in this future (which is copied into its caller's).
            let set = call.set;
            let body = &mut call.body;
            let service = &set.service;
            let retry = policy.retry;
            // A body in hand (an in-process caller's) goes again as it is.
            let replay = match &*body {
                Some(ReqBody::Full(b)) => Some(b.clone()),
                _ => None,
            };
            let replayable =
                replay.is_some() || body.as_ref().is_none_or(http_body::Body::is_end_stream);
            // A request that never left (a refused connect, a pooled connection found closed)
            // can go again whatever its method: the instance saw none of it (nginx retries such
            // requests too). Once it may have left, only an idempotent one (or the policy says
            // so) without a body (a response or a timeout means the body may be consumed).
            let idempotent = is_idempotent(call.method);
            let resend_ok = idempotent || retry.non_idempotent;
            let can_retry = call.mode != Mode::Upgrade && retry.attempts > 0;
            let max_attempts = 1 + if can_retry { retry.attempts } else { 0 };
            if let Some(b) = policy.budget {
                b.record_request(policy.start_ms);
            }
            let deadline = tokio::time::Instant::from_std(policy.start) + policy.request_timeout;
            let connect_timeout = Duration::from_millis(service.policy.connect_timeout_ms);
            let mut tried_buf = [u32::MAX; 12];
            let mut n_tried = 0usize;
            let mut attempt_no = 0u32;
            let mut stale_conns = 0usize;
            let mut last = Failure::Connect(ErrorKind::Connect);
            let mut sent_any = false;
            // After a status or timeout retry, an instance already tried may be tried again
            // when no other is left (a single instance can have a transient failure); never
            // after a failed connect.
            let mut may_repeat = false;
            // A retry waits first (at the loop's top, so that no attempt's state is kept
            // across the wait).
            let mut pause = false;
            let mut first_attempt = true;
            loop {
                if std::mem::take(&mut pause) {
                    retry_pause(retry, attempt_no, deadline).await;
                }
                // One clock read per attempt start (but the first) and one per attempt end.
                let (attempt_start, now) = if std::mem::take(&mut first_attempt) {
                    (policy.start, policy.start_ms)
                } else {
                    let t = Instant::now();
                    (t, ms_at(t))
                };
                let attempt_at = tokio::time::Instant::from_std(attempt_start);
                if attempt_at >= deadline {
                    last = Failure::Timeout;
                    break;
                }
                let picked = set.pick(&tried_buf[..n_tried], call.hash_key, now);
                let Some(idx) = picked.or_else(|| {
                    may_repeat
                        .then(|| set.pick(&[], call.hash_key, now))
                        .flatten()
                }) else {
                    if n_tried == 0 {
                        last = Failure::NoInstance;
                    }
                    break;
                };
                let ep = &set.endpoints[idx];
                if let (None, Some(b)) = (&*body, &replay) {
                    *body = Some(ReqBody::Full(b.clone()));
                }
                let guard = InflightGuard::new(ep.clone());
                let per_try = policy
                    .per_try_timeout
                    .map_or(deadline, |t| deadline.min(attempt_at + t));
                let target = Target {
                    addr: ep.addr,
                    connect_timeout,
                    tls: service.tls.as_ref(),
                };
                let outgoing = Outgoing {
                    method: call.method,
                    target: call.target,
                    authority: call.authority,
                    host_in_map: call.host_in_map,
                    headers: &mut *call.headers,
                    extra: call.extra,
                    // hyper takes the request by value: a copy of the headers when another
                    // attempt may need them.
                    keep_headers: max_attempts > 1,
                };
                let sent = {
                    let attempt =
                        std::pin::pin!(client::send(&ep.pool, target, call.mode, outgoing, body));
                    match timer.as_deref_mut() {
                        Some(t) => timer::within(t, per_try, attempt).await,
                        None => {
                            // No connection timer lent: one of the attempt's own (boxed: the
                            // request's future does not carry it).
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
                let elapsed = attempt_end.saturating_duration_since(attempt_start);
                let end_ms = ms_at(attempt_end);
                let can_go_again = attempt_no < max_attempts;
                match outcome {
                    Attempt::Response(resp) => {
                        sent_any = true;
                        let status = resp.status();
                        if policy.passive_health {
                            ep.observe_latency(end_ms, elapsed.as_secs_f64() * 1e6);
                            ep.record(end_ms, Outcome::Status(status.as_u16()), elapsed);
                            self.outlier(service, ep, !status.is_server_error(), end_ms);
                        }
                        if retry.on_statuses.contains(&status.as_u16())
                            && resend_ok
                            && replayable
                            && can_go_again
                            && policy.budget.is_none_or(|b| b.try_retry(end_ms))
                        {
                            drop(resp);
                            drop(guard);
                            if let Some(c) = policy.retries {
                                c.inc();
                            }
                            may_repeat = true;
                            pause = true;
                            continue;
                        }
                        if let Some((b, probe)) = &mut breaker {
                            let failed = breaker_failure(status.as_u16(), policy.failure_statuses);
                            self.record_breaker(b, !failed, probe.take(), end_ms);
                        }
                        return Ok(Answer {
                            resp,
                            ep,
                            guard,
                            elapsed,
                            end: attempt_end,
                            end_ms,
                            attempts: attempt_no,
                        });
                    }
                    Attempt::Failed(e) => {
                        drop(guard);
                        sent_any |= e.sent;
                        // The request's body failed while it went: the client's doing, the
                        // route's size limit, or the body's own source (a mirror's copy), never
                        // the instance's; and the body is gone, so nothing goes again.
                        let fault = call.watch.and_then(BodyWatch::fault);
                        if e.kind == ErrorKind::RequestBody || fault.is_some() {
                            last = match fault {
                                Some(BodyFault::TooLarge) => Failure::BodyTooLarge,
                                Some(BodyFault::Client(f)) => Failure::Client(f),
                                None => Failure::BodyFailed,
                            };
                            break;
                        }
                        if policy.passive_health {
                            ep.record(end_ms, Outcome::NoResponse, elapsed);
                            service.metrics.upstream_errors.inc();
                            ep.mark_suspect(end_ms);
                            self.outlier(service, ep, false, end_ms);
                        }
                        tracing::debug!(instance = %ep.id, error = %e, "upstream attempt failed");
                        last = if e.sent {
                            Failure::Reset(e.kind)
                        } else {
                            Failure::Connect(e.kind)
                        };
                        if retry.on_connect_failure
                            && (!e.sent || (resend_ok && replayable))
                            && can_go_again
                            && policy.budget.is_none_or(|b| b.try_retry(end_ms))
                        {
                            if let Some(c) = policy.retries {
                                c.inc();
                            }
                            pause = true;
                            continue;
                        }
                        break;
                    }
                    Attempt::TimedOut => {
                        drop(guard);
                        sent_any = true;
                        // A body still waiting on the client when time ran out: the client was
                        // too slow, not the instance.
                        if call.watch.is_some_and(BodyWatch::waiting_on_client) {
                            last = Failure::Client(ClientFault::Slow);
                            break;
                        }
                        if policy.passive_health {
                            ep.record(end_ms, Outcome::NoResponse, elapsed);
                            service.metrics.upstream_errors.inc();
                            self.outlier(service, ep, false, end_ms);
                        }
                        last = Failure::Timeout;
                        if retry.on_per_try_timeout
                            && resend_ok
                            && replayable
                            && can_go_again
                            && tokio::time::Instant::from_std(attempt_end) < deadline
                            && policy.budget.is_none_or(|b| b.try_retry(end_ms))
                        {
                            if let Some(c) = policy.retries {
                                c.inc();
                            }
                            may_repeat = true;
                            continue;
                        }
                        break;
                    }
                }
            }
            // Every attempt failed (or none could be made). Anything else than the service's
            // failure says nothing about it: a probe's slot is freed when its `Probe` drops.
            if let Some((b, probe)) = &mut breaker {
                if last.is_upstream() {
                    self.record_breaker(b, false, probe.take(), clock_ms());
                }
            }
            Err(UpstreamError {
                failure: last,
                sent: sent_any,
                retry_safe: !sent_any || idempotent,
                attempts: attempt_no,
            })
        }
    }

    pub(crate) fn record_breaker(&self, b: &BreakerScope, ok: bool, probe: bool, now: u64) {
        let (change, code) = b.record(now, ok, probe);
        match change {
            Some(BreakerChange::Opened) => {
                tracing::warn!(route = %b.route, service = %b.service, "circuit breaker opened: requests fail fast")
            }
            Some(BreakerChange::Closed) => {
                tracing::info!(route = %b.route, service = %b.service, "circuit breaker closed")
            }
            None => {}
        }
        // Set only when it moved: a gauge's `set` is an atomic swap.
        if b.state_gauge.get() != code {
            b.state_gauge.set(code);
        }
    }

    /// Feed one attempt's result to the instance's outlier detector; eject within the cap.
    fn outlier(&self, service: &ServiceState, ep: &Endpoint, ok: bool, now: u64) {
        let mut o = ep
            .outlier
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        match o.record(now, ok) {
            Some(OutlierVerdict::Restore) => {
                ep.ejected_until_ms.store(0, Ordering::Relaxed);
                // Saturating: a rebuild of the service may have recounted it meanwhile.
                let _ = service
                    .ejected
                    .fetch_update(Ordering::Relaxed, Ordering::Relaxed, |v| {
                        Some(v.saturating_sub(1))
                    });
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
}

/// Who calls a service from inside Gantry (the message bus, an aggregation route): named in the
/// request summary and the instance's `Gantry-Caller` header, and the scope of its own circuit
/// breaker (a failing caller does not cut off the service's other callers).
#[derive(Debug, Clone)]
pub struct Caller {
    /// A stable name, e.g. `bus:orders/billing` (lowercase letters, digits, `-`, `:`, `/`, `.`).
    pub name: String,
}

/// How an in-process call behaves.
#[derive(Debug, Clone)]
pub struct CallOptions {
    /// The whole call, all attempts included, until the response head.
    pub timeout: Duration,
    /// One attempt; `None`: bounded by `timeout` only.
    pub per_try_timeout: Option<Duration>,
    pub retry: RetryPolicy,
    /// Statuses that count as failures for the caller's breaker, besides 502, 503 and 504.
    pub failure_statuses: Vec<u16>,
}

impl Default for CallOptions {
    /// A route's defaults: 30 s, two retries on connection failures and 502/503/504, for
    /// idempotent methods (a body goes again only if it never left).
    fn default() -> Self {
        Self {
            timeout: Duration::from_secs(30),
            per_try_timeout: None,
            retry: RetryPolicy {
                attempts: 2,
                on_connect_failure: true,
                on_statuses: vec![502, 503, 504],
                on_per_try_timeout: true,
                non_idempotent: false,
                backoff_base_ms: 25,
                backoff_max_ms: 250,
                budget_ratio: 0.2,
                budget_min_per_second: 10,
            },
            failure_statuses: Vec::new(),
        }
    }
}

/// Why an in-process call got no response.
#[derive(Debug, Clone)]
pub struct CallError {
    pub service: String,
    pub failure: Failure,
    /// Some of the request may have reached an instance.
    pub sent: bool,
    /// Sending it again would be safe (none of it left, or its method is idempotent).
    pub retry_safe: bool,
    pub attempts: u32,
}

impl std::fmt::Display for CallError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "call to service {} failed: {} after {} attempt(s)",
            self.service,
            self.failure.as_str(),
            self.attempts
        )
    }
}

impl std::error::Error for CallError {}

/// The header that names an in-process caller to the instance.
static GANTRY_CALLER: http::HeaderName = http::HeaderName::from_static("gantry-caller");

impl Gateway {
    /// Call a service from inside Gantry (the message bus's push delivery, aggregation routes)
    /// with what a proxied request gets: the service's load balancer over its routable
    /// instances (narrowed to `version` when given), retries within `options`, outlier
    /// detection and instance metrics, a request id and W3C trace context (the request's own
    /// `traceparent` is continued), and a circuit breaker of the caller's own. The response
    /// body streams; the instance's in-flight count and the service's concurrency slot are held
    /// until it ends.
    pub async fn call_service(
        self: &Arc<Self>,
        service: &str,
        version: Option<&semver::VersionReq>,
        request: http::Request<bytes::Bytes>,
        caller: &Caller,
        options: &CallOptions,
    ) -> Result<Response<crate::RespBody>, CallError> {
        let err = |failure, sent, retry_safe, attempts| CallError {
            service: service.to_string(),
            failure,
            sent,
            retry_safe,
            attempts,
        };
        let snap = self.inputs.load_full();
        let Some(all) = snap.endpoints.services.get(service) else {
            return Err(err(Failure::NoInstance, false, true, 0));
        };
        let narrowed;
        let set: &EndpointSet = match version {
            Some(r) => {
                narrowed = crate::filters::filter_versions(all, r);
                &narrowed
            }
            // A release in progress: its weights split the caller's traffic too.
            None => match snap.endpoints.service_splits.get(service) {
                Some(split) => crate::proxy::pick_split(split).unwrap_or(all),
                None => all,
            },
        };
        let breaker = self.caller_breaker(&caller.name, &set.service);
        let start = Instant::now();
        let mut admitted = self
            .admit(&set.service, Some(&breaker), ms_at(start))
            .map_err(|f| err(f, false, true, 0))?;
        let (parts, body) = request.into_parts();
        let mut headers = parts.headers;
        let request_id = match headers.get(&crate::context::X_REQUEST_ID) {
            Some(v) if crate::context::is_sane_request_id(v) => v.clone(),
            _ => self.ids.next(),
        };
        let tc = crate::trace::propagate(
            headers
                .get(&crate::context::TRACEPARENT)
                .and_then(|v| v.to_str().ok()),
        );
        let tc_trace = tc.trace_id;
        let mut tc_span = [b'0'; 16];
        tc_span.copy_from_slice(&tc.header.as_bytes()[36..52]);
        headers.insert(crate::context::TRACEPARENT.clone(), tc.header);
        let request_id_out = request_id.clone();
        headers.insert(crate::context::X_REQUEST_ID.clone(), request_id);
        if let Ok(v) = HeaderValue::from_str(&caller.name) {
            headers.insert(GANTRY_CALLER.clone(), v);
        }
        crate::context::remove_hop_by_hop(&mut headers, false);
        if !body.is_empty() && !headers.contains_key(http::header::CONTENT_LENGTH) {
            headers.insert(http::header::CONTENT_LENGTH, HeaderValue::from(body.len()));
        }
        let pq = parts
            .uri
            .path_and_query()
            .cloned()
            .unwrap_or_else(|| PathAndQuery::from_static("/"));
        let mode = match set.service.policy.protocol {
            gantry_model::UpstreamProtocol::H2c => Mode::Http2,
            _ => Mode::Http1,
        };
        let host_in_map = headers.contains_key(http::header::HOST);
        let mut call = Call {
            set,
            mode,
            method: &parts.method,
            target: &pq,
            authority: None,
            host_in_map,
            headers: &mut headers,
            extra: None,
            body: Some(if body.is_empty() {
                ReqBody::Empty
            } else {
                ReqBody::Full(body)
            }),
            watch: None,
            hash_key: None,
        };
        let policy = Policy {
            retry: &options.retry,
            budget: None,
            retries: None,
            start,
            start_ms: ms_at(start),
            request_timeout: options.timeout,
            per_try_timeout: options.per_try_timeout,
            failure_statuses: &options.failure_statuses,
            passive_health: true,
        };
        let parts_method = parts.method.clone();
        let answer = self
            .call(
                &mut call,
                &policy,
                Some((&breaker, &mut admitted.probe)),
                None,
            )
            .await
            .map_err(|e| err(e.failure, e.sent, e.retry_safe, e.attempts))?;
        drop(call);
        tracing::debug!(service, caller = %caller.name, instance = %answer.ep.id, status = answer.resp.status().as_u16(), attempts = answer.attempts, "in-process call answered");
        let (mut parts, mut incoming) = answer.resp.into_parts();
        if let Some(head) = incoming.take_head() {
            let extra = head.len();
            match head.to_map(extra.min(4)) {
                Ok(h) => parts.headers = h,
                Err(_) => return Err(err(Failure::Reset(ErrorKind::Protocol), true, false, 1)),
            }
        }
        crate::context::remove_hop_by_hop(&mut parts.headers, false);
        let status = parts.status.as_u16();
        let detail = self.observers.any().then(|| {
            let cx = crate::context::Ctx {
                start,
                start_ms: ms_at(start),
                end_ms: answer.end_ms,
                seen: crate::context::Seen::default(),
                request_id: request_id_out,
                traceparent: HeaderValue::from_static(""),
                trace_id: tc_trace,
                span_id: tc_span,
                method: parts_method,
                version: http::Version::HTTP_11,
                host: crate::context::Host::None,
                normalized: None,
                path: pq.path().to_string(),
                tls: false,
                client: std::net::SocketAddr::from(([127, 0, 0, 1], 0)),
                end: Some(answer.end),
            };
            Box::new((
                self.clone(),
                crate::summary::Detail {
                    cx,
                    route: "none".into(),
                    service: answer.ep.service.clone(),
                    version: Some(answer.ep.version.clone()),
                    instance: answer.ep.id.clone(),
                    caller: Some(caller.name.clone()),
                    status,
                    upstream: Some(answer.elapsed),
                    attempts: answer.attempts,
                },
            ))
        });
        let mut body = UpstreamBody::new(incoming, answer.guard, options.timeout);
        body.on_end(crate::proxy::RequestEnd::holding(admitted.slot, detail));
        Ok(Response::from_parts(
            parts,
            crate::RespBody::Upstream(Box::new(body)),
        ))
    }

    /// The circuit breaker of an in-process caller's calls to a service (made on first use;
    /// a new one when the service's breaker policy changed).
    fn caller_breaker(&self, caller: &str, service: &ServiceState) -> Arc<BreakerScope> {
        let mut m = self
            .caller_breakers
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        let key = (caller.to_string(), service.name.to_string());
        let policy = &service.policy.circuit_breaker;
        if let Some(b) = m.get(&key).filter(|b| b.policy == *policy) {
            return b.clone();
        }
        let scope = format!("caller:{caller}");
        let b = Arc::new(BreakerScope::new(
            &scope,
            &service.name,
            policy.clone(),
            self.metrics.circuit(&scope, &service.name),
        ));
        m.insert(key, b.clone());
        b
    }
}
