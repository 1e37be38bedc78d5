//! The data plane's pipeline: an HTTP/1.1 and HTTP/2 (cleartext and TLS) reverse proxy with
//! routing on host, path, method, headers and query; version-aware targets, weighted splits and
//! release weights, mirroring; load balancing (P2C-EWMA, round robin, consistent hashing,
//! locality); timeouts, retries with a budget, circuit breaking per route, outlier ejection,
//! bulkheads, rate limits and a response cache — on the `gantry-http` engine, whose `Handler`
//! it is.
//!
//! Two sides share one [`Gateway`]:
//! - the control side ([`Gateway::apply_model`], [`Gateway::apply_registry`],
//!   [`Gateway::apply_weights`], [`Gateway::apply_auth`]) builds each input on its own
//!   (`inputs.rs`) and swaps a new snapshot in; state that must survive (connections,
//!   breakers, budgets, limiters) is carried over by identity;
//! - the request side (`proxy.rs`: every phase a request passes, in order; `upstream.rs`: the
//!   one upstream call) loads the snapshot once per request and never takes a lock it could
//!   wait on. In-process callers use the same upstream call ([`Gateway::call_service`]).
//!
//! Architecture invariant: this crate depends on `gantry-model`, `gantry-http` (and
//! `gantry-telemetry` for metric handles) only, never on control-plane crates.
// No `unsafe` here; the workspace denies it.
#![forbid(unsafe_code)]

mod auth;
mod body;
mod cache;
mod context;
mod endpoints;
mod filters;
#[doc(hidden)]
pub mod fuzzing;
mod health;
mod inputs;
mod metrics;
pub mod path;
mod proxy;
mod rand;
mod ratelimit;
mod reject;
pub mod resilience;
mod summary;
mod table;
pub mod tls;
mod trace;
mod upstream;

use std::net::SocketAddr;
use std::sync::atomic::Ordering;
use std::sync::{Arc, Mutex, PoisonError};
use std::time::Duration;

use arc_swap::ArcSwap;
use gantry_model::{GatewayModel, RegistrySnapshot};
use gantry_telemetry::Metrics;
use serde::Serialize;
use tokio::sync::watch;

use crate::endpoints::{clock_ms, Endpoint, ServiceState};
use crate::inputs::{Control, Snapshot};
use crate::metrics::{GatewayMetrics, RouteMetrics};
use crate::table::Action;

pub use body::{ReqBody, RespBody};
pub use gantry_http::Listener;
pub use inputs::{AuthMaterial, TrafficWeights, VersionWeight};
pub use summary::{AccessLog, Observer, RequestSummary};
pub use upstream::{CallError, CallOptions, Caller, Failure};

/// Runtime options of the gateway (from `[gateway]` in the spec).
#[derive(Clone, Debug)]
pub struct GatewayConfig {
    /// One JSON line per request, on stderr and in the log store (`start_access_log`).
    pub access_log: bool,
    /// Generate `X-Request-Id` (a client's sane one is kept either way).
    pub request_id: bool,
    /// Propagate or start W3C `traceparent`.
    pub trace_context: bool,
    /// Set `X-Forwarded-For/-Proto/-Host`.
    pub forwarded_headers: bool,
    pub max_connections: usize,
    pub max_header_bytes: usize,
    pub max_headers: usize,
    /// Time a client has to send a complete request head (slowloris guard).
    pub header_read_timeout: Duration,
    /// How long shutdown waits for open requests to finish.
    pub shutdown_grace: Duration,
    pub cache_max_bytes: u64,
    /// This node's name: instances on it are "local" for load balancing.
    pub node: String,
}

impl Default for GatewayConfig {
    fn default() -> Self {
        Self {
            access_log: false,
            request_id: true,
            trace_context: true,
            forwarded_headers: true,
            max_connections: 10_000,
            max_header_bytes: 16 * 1024,
            max_headers: 100,
            header_read_timeout: Duration::from_secs(10),
            shutdown_grace: Duration::from_secs(10),
            cache_max_bytes: 64 << 20,
            node: String::new(),
        }
    }
}

/// An active health policy and the service it belongs to.
pub(crate) type Probed = (gantry_model::ActiveHealth, Arc<ServiceState>);

pub struct Gateway {
    /// What the request path reads: one pointer, loaded once per request.
    inputs: ArcSwap<Snapshot>,
    /// The control side; held while an input is rebuilt (never on the request path).
    control: Mutex<Control>,
    metrics: GatewayMetrics,
    no_route: RouteMetrics,
    cfg: GatewayConfig,
    ids: context::RequestIds,
    cache: cache::Cache,
    /// The engine's server side: limits, and the connections open over every listener.
    server: Arc<gantry_http::Server>,
    /// Circuit breakers of in-process callers, by (caller, service).
    caller_breakers:
        Mutex<std::collections::HashMap<(String, String), Arc<endpoints::BreakerScope>>>,
    /// Who hears of every request's summary (the access log, span export).
    observers: summary::Observers,
    /// Who hears of calls the service-to-service policy refused (the audit trail).
    refusals: std::sync::OnceLock<Arc<dyn RefusalObserver>>,
    /// Woken when the authentication material changes.
    auth_changed: tokio::sync::Notify,
    /// Mutual TLS to instances with the internal CA.
    internal_tls: Arc<tls::InternalTls>,
}

/// A call the service-to-service policy refused.
#[derive(Debug)]
pub struct Refused<'a> {
    /// `call_not_allowed` or `not_public`.
    pub reason: &'static str,
    /// The calling service (its workload credential), if any.
    pub caller: Option<&'a str>,
    /// The service the route belongs to.
    pub service: &'a str,
    pub route: &'a str,
    pub method: &'a str,
    pub path: &'a str,
    pub client: std::net::IpAddr,
    pub request_id: &'a str,
}

/// Told of each refused service-to-service call, on the gateway's threads: quick, never
/// blocking (hand the work to a channel).
pub trait RefusalObserver: Send + Sync + 'static {
    fn refused(&self, r: &Refused<'_>);
}

/// A route as the admin API shows it: the rule, resolved, and where it sends traffic now.
#[derive(Debug, Clone, Serialize, serde::Deserialize, utoipa::ToSchema)]
pub struct RouteView {
    #[serde(flatten)]
    pub route: gantry_model::Route,
    /// Precedence position (0 = tried first).
    pub position: usize,
    pub endpoints: Vec<EndpointView>,
}

#[derive(Debug, Clone, Serialize, serde::Deserialize, utoipa::ToSchema)]
pub struct EndpointView {
    pub instance: String,
    pub service: String,
    pub version: String,
    #[schema(value_type = String)]
    pub address: SocketAddr,
    pub local: bool,
    pub inflight: usize,
    pub ewma_ms: f64,
    pub suspect: bool,
    pub ejected: bool,
    pub healthy: bool,
}

/// A service's data-plane state for the admin API.
#[derive(Debug, Clone, Serialize, utoipa::ToSchema)]
pub struct UpstreamView {
    pub service: String,
    pub policy: gantry_model::UpstreamPolicy,
    /// The worst state of the service's circuit breakers (one per route that sends to it):
    /// open, half_open or closed.
    pub circuit: &'static str,
    /// Each route's breaker for the service.
    pub circuits: Vec<CircuitView>,
    pub inflight: usize,
    pub ejected: usize,
}

/// One circuit breaker: the requests one route sends to one service.
#[derive(Debug, Clone, Serialize, utoipa::ToSchema)]
pub struct CircuitView {
    pub route: String,
    /// closed, open or half_open
    pub state: &'static str,
}

/// Rolling-window figures of the gateway's traffic (the last minute): what canary analysis,
/// autoscaling and alert rules read.
#[derive(Debug, Clone, Serialize, utoipa::ToSchema)]
pub struct Traffic {
    /// The window's length, seconds.
    pub window_seconds: f64,
    pub routes: Vec<TrafficRow>,
    /// Each service, all its versions together.
    pub services: Vec<TrafficRow>,
    /// Each version of each service.
    pub versions: Vec<TrafficRow>,
}

/// One route's, service's or version's figures over the window.
#[derive(Debug, Clone, Serialize, utoipa::ToSchema)]
pub struct TrafficRow {
    #[serde(skip_serializing_if = "Option::is_none")]
    pub route: Option<String>,
    pub service: String,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub version: Option<String>,
    pub requests: u64,
    /// 5xx answers and attempts without an answer.
    pub errors: u64,
    pub error_rate: Option<f64>,
    pub requests_per_second: f64,
    pub mean_ms: Option<f64>,
    pub p50_ms: Option<f64>,
    pub p90_ms: Option<f64>,
    pub p99_ms: Option<f64>,
}

impl TrafficRow {
    fn of(
        route: Option<&str>,
        service: &str,
        version: Option<&str>,
        w: &gantry_telemetry::stats::Window,
    ) -> Self {
        Self {
            route: route.map(str::to_string),
            service: service.to_string(),
            version: version.map(str::to_string),
            requests: w.requests,
            errors: w.errors,
            error_rate: w.error_rate(),
            requests_per_second: (w.rate() * 100.0).round() / 100.0,
            mean_ms: w.mean_ms(),
            p50_ms: w.quantile_ms(0.5),
            p90_ms: w.quantile_ms(0.9),
            p99_ms: w.quantile_ms(0.99),
        }
    }
}

fn circuit_name(code: i64) -> &'static str {
    match code {
        0 => "closed",
        1 => "open",
        _ => "half_open",
    }
}

impl Gateway {
    pub fn new(cfg: GatewayConfig, metrics: &Metrics) -> Arc<Self> {
        let metrics = GatewayMetrics::new(metrics);
        let no_route = metrics.route("none", "none");
        let internal_tls = Arc::new(tls::InternalTls::default());
        let control = Control::new(cfg.node.clone(), internal_tls.clone());
        Arc::new(Self {
            inputs: ArcSwap::new(control.snapshot()),
            control: Mutex::new(control),
            cache: cache::Cache::new(cfg.cache_max_bytes),
            metrics,
            no_route,
            server: gantry_http::Server::new(gantry_http::ServerConfig {
                max_connections: cfg.max_connections,
                max_header_bytes: cfg.max_header_bytes,
                max_headers: cfg.max_headers,
                header_read_timeout: cfg.header_read_timeout,
                shutdown_grace: cfg.shutdown_grace,
            }),
            cfg,
            ids: context::RequestIds::new(),
            caller_breakers: Mutex::new(std::collections::HashMap::new()),
            observers: summary::Observers::new(),
            refusals: std::sync::OnceLock::new(),
            auth_changed: tokio::sync::Notify::new(),
            internal_tls,
        })
    }

    /// Tell `o` of every request's summary from now on.
    pub fn add_observer(&self, o: Arc<dyn Observer>) {
        self.observers.add(o);
    }

    /// The access log, when `[gateway] access_log` asks for it: registers its observer and
    /// returns its writer, for the caller to run on the control plane's runtime (the gateway's
    /// threads only hand lines over).
    pub fn start_access_log(
        &self,
        logs: gantry_telemetry::LogStore,
    ) -> Option<impl std::future::Future<Output = ()> + Send + 'static> {
        if !self.cfg.access_log {
            return None;
        }
        let (log, writer) = AccessLog::new(logs, self.metrics.access_log_dropped.clone());
        self.add_observer(log);
        Some(writer)
    }

    /// Accept on `listener` until `shutdown` turns true, then wait (up to the shutdown grace)
    /// for open requests to finish.
    pub async fn serve(self: Arc<Self>, listener: Listener, shutdown: watch::Receiver<bool>) {
        let server = self.server.clone();
        server.serve(self, listener, shutdown).await
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Control> {
        self.control.lock().unwrap_or_else(PoisonError::into_inner)
    }

    /// Swap in the control side's current inputs (under its lock: snapshots go out in order).
    fn publish(&self, c: &Control) {
        self.inputs.store(c.snapshot());
    }

    /// Replace the routes and upstream policies (spec load or reload). Open connections and
    /// requests are not disturbed.
    pub fn apply_model(&self, model: GatewayModel) {
        let mut c = self.lock();
        c.apply_model(model, &self.metrics);
        self.publish(&c);
    }

    /// Take in a new registry snapshot: only the services it changed are rebuilt. When this
    /// returns, no new request goes to an instance the snapshot no longer has.
    pub fn apply_registry(&self, snapshot: &Arc<RegistrySnapshot>) {
        let mut c = self.lock();
        c.apply_registry(snapshot, &self.metrics);
        self.publish(&c);
    }

    /// Set the share of each service's traffic its versions get (releases).
    pub fn apply_weights(&self, weights: TrafficWeights) {
        let mut c = self.lock();
        c.apply_weights(weights);
        self.publish(&c);
    }

    /// The release weights in force (as the request path sees them).
    pub fn weights(&self) -> TrafficWeights {
        (*self.inputs.load().weights).clone()
    }

    /// The authentication material in force (as the request path sees it).
    pub fn auth(&self) -> AuthMaterial {
        (*self.inputs.load().auth).clone()
    }

    /// The internal CA (mutual TLS to instances): set before the model that uses it.
    pub fn set_internal_ca(&self, der: Vec<u8>) {
        self.internal_tls.set_ca(der);
    }

    /// The certificate the gateway presents to instances over mutual TLS (and its renewals).
    pub fn set_client_certificate(&self, chain_pem: &str, key_pem: &str) -> Result<(), String> {
        self.internal_tls.set_key(chain_pem, key_pem)
    }

    /// Hear of calls the service-to-service policy refuses (set once; later calls are
    /// ignored).
    pub fn on_refusal(&self, o: Arc<dyn RefusalObserver>) {
        let _ = self.refusals.set(o);
    }

    /// Replace the authentication material (identity's keys, JWKS and allow-lists).
    pub fn apply_auth(&self, auth: AuthMaterial) {
        let mut c = self.lock();
        c.auth = Arc::new(auth);
        self.publish(&c);
        drop(c);
        self.auth_changed.notify_waiters();
    }

    /// The material after the next change (at most `limit` from now), unless it changed since
    /// `revision` already: a request whose token names a key an external issuer's set lacks
    /// waits here for the refetch it asked for, rather than being refused.
    pub(crate) async fn next_auth(
        &self,
        revision: u64,
        limit: Duration,
    ) -> Option<Arc<AuthMaterial>> {
        let changed = self.auth_changed.notified();
        tokio::pin!(changed);
        changed.as_mut().enable();
        let now = self.inputs.load().auth.clone();
        if now.revision != revision {
            return Some(now);
        }
        tokio::time::timeout(limit, changed).await.ok()?;
        Some(self.inputs.load().auth.clone())
    }

    /// The instances a request to `service` may go to now (as the request path sees them).
    pub fn routable(&self, service: &str) -> Vec<String> {
        self.inputs
            .load()
            .endpoints
            .services
            .get(service)
            .map(|s| s.endpoints.iter().map(|e| e.id.to_string()).collect())
            .unwrap_or_default()
    }

    /// Requests in flight to one instance (0 when unknown).
    pub fn inflight(&self, instance: &str) -> usize {
        self.lock()
            .endpoint(instance)
            .map_or(0, |e| e.inflight.load(Ordering::Relaxed))
    }

    /// Instances the gateway's passive health (outlier detection) has ejected now, with their
    /// consecutive ejections: what the registry shows as each instance's `gateway` check.
    pub fn ejected_instances(&self) -> Vec<(String, u32)> {
        let now = clock_ms();
        let c = self.lock();
        c.routable_endpoints()
            .filter(|e| e.ejected_until_ms.load(Ordering::Relaxed) > now)
            .map(|e| {
                let n = e
                    .outlier
                    .lock()
                    .unwrap_or_else(std::sync::PoisonError::into_inner)
                    .ejections;
                (e.id.to_string(), n)
            })
            .collect()
    }

    /// The live route table, in precedence order.
    pub fn routes(&self) -> Vec<RouteView> {
        let snap = self.inputs.load_full();
        let c = self.lock();
        let now = clock_ms();
        snap.routes
            .table
            .routes
            .iter()
            .enumerate()
            .filter_map(|(position, r)| {
                let route = c.model.routes.iter().find(|m| *m.id == *r.id)?.clone();
                let endpoints = match &r.action {
                    Action::Forward(f) => {
                        let mut seen = std::collections::BTreeSet::new();
                        f.backends
                            .iter()
                            .filter_map(|b| snap.endpoints.set(b.target))
                            .flat_map(|set| set.endpoints.iter())
                            .filter(|e| seen.insert(e.id.clone()))
                            .map(|e| EndpointView {
                                instance: e.id.to_string(),
                                service: e.service.to_string(),
                                version: e.version.to_string(),
                                address: e.addr,
                                local: e.local,
                                inflight: e.inflight.load(Ordering::Relaxed),
                                ewma_ms: (e.ewma_us() / 10.0).round() / 100.0,
                                suspect: e.suspect_until_ms.load(Ordering::Relaxed) > now,
                                ejected: e.ejected_until_ms.load(Ordering::Relaxed) > now,
                                healthy: e.healthy.load(Ordering::Relaxed),
                            })
                            .collect()
                    }
                    Action::Redirect(_) => Vec::new(),
                };
                Some(RouteView {
                    route,
                    position,
                    endpoints,
                })
            })
            .collect()
    }

    pub fn upstreams(&self) -> Vec<UpstreamView> {
        let c = self.lock();
        let mut out: Vec<UpstreamView> = c
            .service_states()
            .map(|s| {
                let mut circuits: Vec<CircuitView> = c
                    .breakers()
                    .filter(|b| b.service == s.name)
                    .map(|b| CircuitView {
                        route: b.route.to_string(),
                        state: circuit_name(b.breaker().code()),
                    })
                    .collect();
                circuits.sort_by(|a, b| a.route.cmp(&b.route));
                let worst = |name: &str| circuits.iter().any(|c| c.state == name);
                let circuit = if worst("open") {
                    "open"
                } else if worst("half_open") {
                    "half_open"
                } else {
                    "closed"
                };
                UpstreamView {
                    service: s.name.to_string(),
                    policy: s.policy.clone(),
                    circuit,
                    circuits,
                    inflight: s.inflight.load(Ordering::Relaxed),
                    ejected: s.ejected.load(Ordering::Relaxed),
                }
            })
            .collect();
        out.sort_by(|a, b| a.service.cmp(&b.service));
        out
    }

    /// The rolling window's figures (the last minute) per route, service and version.
    pub fn traffic(&self) -> Traffic {
        let now = clock_ms();
        let stats = &self.metrics.stats;
        let lock = |m| metrics::lock(m);
        let routes: Vec<TrafficRow> = lock(&stats.routes)
            .iter()
            .filter(|((route, _), _)| route != "none")
            .map(|((route, service), st)| {
                TrafficRow::of(Some(route), service, None, &st.window(now))
            })
            .collect();
        let mut services: std::collections::BTreeMap<String, gantry_telemetry::stats::Window> =
            std::collections::BTreeMap::new();
        let versions: Vec<TrafficRow> = stats
            .versions(now)
            .iter()
            .map(|((service, version), w)| {
                services.entry(service.clone()).or_default().merge(w);
                TrafficRow::of(None, service, Some(version), w)
            })
            .collect();
        let window_seconds = (gantry_telemetry::stats::WINDOW_MS as f64) / 1000.0;
        Traffic {
            window_seconds,
            routes,
            services: services
                .iter()
                .map(|(service, w)| TrafficRow::of(None, service, None, w))
                .collect(),
            versions,
        }
    }

    /// Every instance the gateway knows, with its service's active health policy when there is
    /// one (draining instances have none: they are not probed).
    pub(crate) fn endpoints_snapshot(&self) -> Vec<(Arc<Endpoint>, Option<Probed>)> {
        self.lock()
            .all_endpoints()
            .into_iter()
            .map(|(e, st)| {
                let ah = st.and_then(|s| Some((s.policy.active_health.clone()?, s)));
                (e, ah)
            })
            .collect()
    }
}
