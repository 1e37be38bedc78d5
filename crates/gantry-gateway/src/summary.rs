//! One summary per request, for observers: at the end of every request (when its response body
//! ended, or when the gateway answered itself) a `RequestSummary` goes to each registered
//! `Observer` — the access log (`AccessLog`: a JSON line written off the gateway's threads, to
//! stderr and into the log store, so `gantry logs gateway` shows it) and, later, span export.
//!
//! Nothing is built when nobody observes: a request then pays one load of a flag. The rolling
//! windows that canary analysis, autoscaling and alerts read are not observers of the summary:
//! they are recorded where their figures are known (the route's at the response head, an
//! instance's and its version's at each attempt, `metrics.rs`), with no allocation and no
//! atomic read-modify-write.

use std::net::IpAddr;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Duration;

use arc_swap::ArcSwap;
use gantry_telemetry::{LogStore, LogStream};
use prometheus_client::metrics::counter::Counter;

use crate::context::Ctx;

/// What happened to one request.
#[derive(Debug, Clone)]
pub struct RequestSummary<'a> {
    /// Wall-clock time the request ended, milliseconds since the Unix epoch.
    pub ts_ms: u64,
    pub request_id: &'a str,
    /// W3C trace id (32 hex digits; zeros when trace context is off).
    pub trace_id: &'a str,
    /// The gateway's span: the parent id the instance got in `traceparent` (16 hex digits;
    /// empty when trace context is off).
    pub span_id: &'a str,
    pub method: &'a str,
    /// `HTTP/1.1`, `HTTP/2.0`...
    pub protocol: &'a str,
    pub host: &'a str,
    pub path: &'a str,
    pub client: Option<IpAddr>,
    /// The route's id; `none` when no route matched.
    pub route: &'a str,
    /// The service that answered (or would have); empty when none.
    pub service: &'a str,
    pub version: Option<&'a semver::Version>,
    /// The instance that answered; empty when the gateway answered itself, `cache` for a hit.
    pub instance: &'a str,
    /// An in-process caller's name (`Gateway::call_service`).
    pub caller: Option<&'a str>,
    pub status: u16,
    /// Why the gateway answered itself (`no_route`, `circuit_open`...).
    pub reason: Option<&'static str>,
    /// The response body reached its end (else the client or the instance went away).
    pub complete: bool,
    /// Response body bytes sent.
    pub bytes: u64,
    /// From the request's arrival to its end.
    pub duration: Duration,
    /// The answering attempt's time to the response head.
    pub upstream: Option<Duration>,
    /// Attempts made (0: answered without one).
    pub attempts: u32,
}

/// Told of every request's summary, on the gateway's threads: it must be quick and must not
/// block (hand the work to a channel).
pub trait Observer: Send + Sync + 'static {
    fn observe(&self, s: &RequestSummary<'_>);
}

/// The registered observers.
pub(crate) struct Observers {
    list: ArcSwap<Vec<Arc<dyn Observer>>>,
    any: AtomicBool,
}

impl Observers {
    pub(crate) fn new() -> Self {
        Self {
            list: ArcSwap::from_pointee(Vec::new()),
            any: AtomicBool::new(false),
        }
    }

    /// Anyone to tell? (One plain load: requests skip building a summary otherwise.)
    pub(crate) fn any(&self) -> bool {
        self.any.load(Ordering::Relaxed)
    }

    pub(crate) fn add(&self, o: Arc<dyn Observer>) {
        let mut v = (**self.list.load()).clone();
        v.push(o);
        self.list.store(Arc::new(v));
        self.any.store(true, Ordering::Relaxed);
    }

    pub(crate) fn tell(&self, s: &RequestSummary<'_>) {
        for o in self.list.load().iter() {
            o.observe(s);
        }
    }
}

/// What the end of a forwarded request needs for its summary, kept from the request (built only
/// when someone observes).
pub(crate) struct Detail {
    pub cx: Ctx,
    pub route: Arc<str>,
    pub service: Arc<str>,
    pub version: Option<semver::Version>,
    pub instance: Arc<str>,
    pub caller: Option<String>,
    pub status: u16,
    pub upstream: Option<Duration>,
    pub attempts: u32,
}

impl Detail {
    /// The summary, once the body ended (`complete`) after `bytes`.
    pub(crate) fn summary(&self, complete: bool, bytes: u64, f: impl FnOnce(&RequestSummary<'_>)) {
        summarize(
            &self.cx,
            Some(&self.route),
            &self.service,
            self.version.as_ref(),
            &self.instance,
            self.caller.as_deref(),
            self.status,
            None,
            complete,
            bytes,
            self.upstream,
            self.attempts,
            f,
        );
    }
}

/// A summary of `cx`'s request as it ended, handed to `f`.
#[allow(clippy::too_many_arguments)]
pub(crate) fn summarize(
    cx: &Ctx,
    route: Option<&str>,
    service: &str,
    version: Option<&semver::Version>,
    instance: &str,
    caller: Option<&str>,
    status: u16,
    reason: Option<&'static str>,
    complete: bool,
    bytes: u64,
    upstream: Option<Duration>,
    attempts: u32,
    f: impl FnOnce(&RequestSummary<'_>),
) {
    let protocol = format!("{:?}", cx.version);
    let s = RequestSummary {
        ts_ms: gantry_model::unix_ms(),
        request_id: cx.request_id.to_str().unwrap_or(""),
        trace_id: std::str::from_utf8(&cx.trace_id).unwrap_or(""),
        span_id: std::str::from_utf8(&cx.span_id).unwrap_or(""),
        method: cx.method.as_str(),
        protocol: &protocol,
        host: cx.host.as_deref().unwrap_or(""),
        path: &cx.path,
        client: Some(cx.client.ip()),
        route: route.unwrap_or("none"),
        service,
        version,
        instance,
        caller,
        status,
        reason,
        complete,
        bytes,
        duration: cx.start.elapsed(),
        upstream,
        attempts,
    };
    f(&s);
}

/// Access-log lines waiting for the writer; beyond this, lines are dropped (and counted)
/// rather than ever slowing a request.
const ACCESS_LOG_BACKLOG: usize = 16 * 1024;

/// The access log: each summary as one JSON line (`type: access`), sent to a writer task that
/// prints it on stderr and keeps it in the log store under service `gateway`, instance `access`.
pub struct AccessLog {
    tx: tokio::sync::mpsc::Sender<String>,
    dropped: Counter,
}

impl AccessLog {
    /// The observer and its writer (spawn the writer on the control plane's runtime).
    pub fn new(
        logs: LogStore,
        dropped: Counter,
    ) -> (
        Arc<Self>,
        impl std::future::Future<Output = ()> + Send + 'static,
    ) {
        let (tx, mut rx) = tokio::sync::mpsc::channel::<String>(ACCESS_LOG_BACKLOG);
        let writer = async move {
            use std::io::Write;
            let service: Arc<str> = "gateway".into();
            let instance: Arc<str> = "access".into();
            while let Some(line) = rx.recv().await {
                {
                    let mut err = std::io::stderr().lock();
                    let _ = err.write_all(line.as_bytes());
                    let _ = err.write_all(b"\n");
                }
                logs.push(&service, &instance, LogStream::Stdout, line);
            }
        };
        (Arc::new(Self { tx, dropped }), writer)
    }
}

impl Observer for AccessLog {
    fn observe(&self, s: &RequestSummary<'_>) {
        let line = serde_json::json!({
            "ts_ms": s.ts_ms,
            "type": "access",
            "request_id": s.request_id,
            "trace_id": s.trace_id,
            "span_id": s.span_id,
            "method": s.method,
            "protocol": s.protocol,
            "host": s.host,
            "path": s.path,
            "route": s.route,
            "service": s.service,
            "version": s.version.map(|v| v.to_string()),
            "upstream": s.instance,
            "caller": s.caller,
            "status": s.status,
            "reason": s.reason,
            "bytes": s.bytes,
            "complete": s.complete,
            "attempts": s.attempts,
            "upstream_ms": s.upstream.map_or(0.0, |d| d.as_secs_f64() * 1000.0),
            "duration_ms": s.duration.as_secs_f64() * 1000.0,
            "client": s.client.map(|c| c.to_string()),
        })
        .to_string();
        if self.tx.try_send(line).is_err() {
            self.dropped.inc();
        }
    }
}
