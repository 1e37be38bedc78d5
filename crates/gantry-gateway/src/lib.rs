//! The data plane: an HTTP/1.1 and HTTP/2 (cleartext and TLS) reverse proxy with routing on host,
//! path, method, headers and query; version-aware targets, weighted splits and mirroring; load
//! balancing (P2C-EWMA, round robin, consistent hashing, locality); timeouts, retries with a
//! budget, circuit breaking, outlier ejection, bulkheads, rate limits and a response cache.
//!
//! Two sides share one [`Gateway`]:
//! - the control side ([`Gateway::apply_model`], [`Gateway::apply_registry`]) rebuilds the whole
//!   [`table::RouteTable`] and swaps it in atomically; state that must survive a rebuild
//!   (connections, breakers, budgets, limiters) is carried over by identity;
//! - the request side (`proxy.rs`, served by the `gantry-http` engine through its `Handler`
//!   trait) loads the current table once per request and never takes a lock it could wait on.
//!
//! Architecture invariant: this crate depends on `gantry-model` (and `gantry-telemetry` for metric
//! handles) only, never on control-plane crates. Every filter a request passes is in `proxy.rs`.
// No `unsafe` but in `sys.rs` (which says why); the workspace denies it everywhere else.
#![deny(unsafe_code)]

mod body;
mod cache;
mod health;
mod metrics;
pub mod path;
mod proxy;
mod rand;
mod ratelimit;
pub mod resilience;
pub mod table;
pub mod tls;
mod trace;

use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::atomic::Ordering;
use std::sync::{Arc, Mutex, PoisonError};
use std::time::Duration;

use arc_swap::ArcSwap;
use gantry_model::{GatewayModel, RegistrySnapshot, RouteAction};
use gantry_telemetry::Metrics;
use serde::Serialize;
use tokio::sync::watch;

use crate::metrics::{GatewayMetrics, RouteMetrics};
use crate::table::{
    clock_ms, sort_by_precedence, Action, CompiledHeaderOps, CompiledRoute, Endpoint, EndpointSet,
    ForwardAction, Matcher, PathRewrite, RouteTable, ServiceState,
};

pub use body::{ReqBody, RespBody};
pub use gantry_http::Listener;

/// Runtime options of the gateway (from `[gateway]` in the spec).
#[derive(Clone, Debug)]
pub struct GatewayConfig {
    /// Log one JSON line per request (target `gantry::access`).
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

/// What the control side last gave us, plus state carried across rebuilds.
struct Control {
    model: GatewayModel,
    registry: Arc<RegistrySnapshot>,
    /// By instance id; kept while registered, or while requests to it are still in flight.
    endpoints: HashMap<Arc<str>, Arc<Endpoint>>,
    services: HashMap<String, Arc<ServiceState>>,
    budgets: HashMap<String, (String, Arc<resilience::RetryBudget>)>,
    limiters: HashMap<String, (String, Arc<ratelimit::Limiter>)>,
    route_metrics: HashMap<(String, String), RouteMetrics>,
}

pub struct Gateway {
    table: ArcSwap<RouteTable>,
    control: Mutex<Control>,
    metrics: GatewayMetrics,
    no_route: RouteMetrics,
    cfg: GatewayConfig,
    ids: proxy::RequestIds,
    cache: cache::Cache,
    /// The engine's server side: limits, and the connections open over every listener.
    server: Arc<gantry_http::Server>,
}

/// A route as the admin API shows it: the rule, resolved, and where it sends traffic now.
#[derive(Debug, Clone, Serialize)]
pub struct RouteView {
    #[serde(flatten)]
    pub route: gantry_model::Route,
    /// Precedence position (0 = tried first).
    pub position: usize,
    pub endpoints: Vec<EndpointView>,
}

#[derive(Debug, Clone, Serialize)]
pub struct EndpointView {
    pub instance: String,
    pub service: String,
    pub version: String,
    pub address: SocketAddr,
    pub local: bool,
    pub inflight: usize,
    pub ewma_ms: f64,
    pub suspect: bool,
    pub ejected: bool,
    pub healthy: bool,
}

/// A service's data-plane state for the admin API.
#[derive(Debug, Clone, Serialize)]
pub struct UpstreamView {
    pub service: String,
    pub policy: gantry_model::UpstreamPolicy,
    /// closed, open or half_open
    pub circuit: &'static str,
    pub inflight: usize,
    pub ejected: usize,
}

impl Gateway {
    pub fn new(cfg: GatewayConfig, metrics: &Metrics) -> Arc<Self> {
        let metrics = GatewayMetrics::new(metrics);
        let no_route = metrics.route("none", "none");
        Arc::new(Self {
            table: ArcSwap::from_pointee(RouteTable::empty()),
            control: Mutex::new(Control {
                model: GatewayModel::default(),
                registry: Arc::new(RegistrySnapshot::default()),
                endpoints: HashMap::new(),
                services: HashMap::new(),
                budgets: HashMap::new(),
                limiters: HashMap::new(),
                route_metrics: HashMap::new(),
            }),
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
            ids: proxy::RequestIds::new(),
        })
    }

    /// Accept on `listener` until `shutdown` turns true, then wait (up to the shutdown grace)
    /// for open requests to finish.
    pub async fn serve(self: Arc<Self>, listener: Listener, shutdown: watch::Receiver<bool>) {
        let server = self.server.clone();
        server.serve(self, listener, shutdown).await
    }

    /// Replace the routes and upstream policies (spec load or reload). Open connections and
    /// requests are not disturbed.
    pub fn apply_model(&self, model: GatewayModel) {
        let mut c = self.lock();
        c.model = model;
        self.rebuild(&mut c);
    }

    /// Take in a new registry snapshot.
    pub fn apply_registry(&self, snapshot: &Arc<RegistrySnapshot>) {
        let mut c = self.lock();
        c.registry = snapshot.clone();
        self.rebuild(&mut c);
    }

    /// Requests in flight to one instance (0 when unknown).
    pub fn inflight(&self, instance: &str) -> usize {
        self.lock()
            .endpoints
            .get(instance)
            .map_or(0, |e| e.inflight.load(Ordering::Relaxed))
    }

    /// The live route table, in precedence order.
    pub fn routes(&self) -> Vec<RouteView> {
        let table = self.table.load_full();
        let c = self.lock();
        let now = clock_ms();
        table
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
                            .flat_map(|(set, _, _)| set.endpoints.iter())
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
            .services
            .values()
            .map(|s| UpstreamView {
                service: s.name.to_string(),
                policy: s.policy.clone(),
                circuit: match s.breaker().code() {
                    0 => "closed",
                    1 => "open",
                    _ => "half_open",
                },
                inflight: s.inflight.load(Ordering::Relaxed),
                ejected: s.ejected.load(Ordering::Relaxed),
            })
            .collect();
        out.sort_by(|a, b| a.service.cmp(&b.service));
        out
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Control> {
        self.control.lock().unwrap_or_else(PoisonError::into_inner)
    }

    pub(crate) fn endpoints_snapshot(&self) -> Vec<(Arc<Endpoint>, Option<Probed>)> {
        let c = self.lock();
        c.endpoints
            .values()
            .map(|e| {
                let ah = c
                    .services
                    .get(&*e.service)
                    .and_then(|s| Some((s.policy.active_health.clone()?, s.clone())));
                (e.clone(), ah)
            })
            .collect()
    }

    fn rebuild(&self, c: &mut Control) {
        // Services: keep state unless the policy changed.
        let mut services = HashMap::new();
        for (name, policy) in &c.model.upstreams {
            let st = match c.services.get(name) {
                Some(s) if s.policy == *policy => s.clone(),
                _ => Arc::new(ServiceState::new(
                    name,
                    policy.clone(),
                    self.metrics.service(name),
                )),
            };
            services.insert(name.clone(), st);
        }

        // Endpoints: keep state by instance id while address, version and the service's policy
        // stay the same (an endpoint holds what the policy sets: outlier thresholds, pool size,
        // connections made under its TLS settings).
        let mut live: HashMap<Arc<str>, Arc<Endpoint>> = HashMap::new();
        let mut by_service: HashMap<String, Vec<Arc<Endpoint>>> = HashMap::new();
        for (service, instances) in &c.registry.services {
            let Some(st) = services.get(service) else {
                continue;
            };
            let same_policy = c
                .services
                .get(service)
                .is_some_and(|old| Arc::ptr_eq(old, st));
            for inst in instances.iter() {
                if inst.health != gantry_model::Health::Passing {
                    continue;
                }
                let addr = SocketAddr::new(inst.address, inst.port);
                let external = !matches!(inst.source, gantry_model::InstanceSource::Supervised);
                let reuse = c.endpoints.get(inst.id.as_str()).filter(|e| {
                    same_policy
                        && e.addr == addr
                        && e.version == inst.version
                        && *e.service == *service
                        && e.external == external
                });
                let ep = match reuse {
                    Some(e) => e.clone(),
                    None => match Endpoint::new(
                        &inst.id,
                        service,
                        addr,
                        inst.version.clone(),
                        inst.node == self.cfg.node,
                        external,
                        &st.policy,
                        self.metrics.instance(service, &inst.id),
                    ) {
                        Some(e) => Arc::new(e),
                        None => continue,
                    },
                };
                live.insert(ep.id.clone(), ep.clone());
                by_service.entry(service.clone()).or_default().push(ep);
            }
        }
        for (id, ep) in c.endpoints.drain() {
            if let std::collections::hash_map::Entry::Vacant(slot) = live.entry(id) {
                if ep.inflight.load(Ordering::Relaxed) > 0 {
                    slot.insert(ep);
                } else {
                    ep.pool.clear();
                    ep.metrics.ejected.set(0);
                }
            }
        }
        for st in services.values() {
            let ejected = by_service.get(&*st.name).map_or(0, |eps| {
                eps.iter()
                    .filter(|e| e.ejected_until_ms.load(Ordering::Relaxed) > 0)
                    .count()
            });
            st.ejected.store(ejected, Ordering::Relaxed);
            st.instances.store(
                by_service.get(&*st.name).map_or(0, Vec::len),
                Ordering::Relaxed,
            );
            st.metrics.circuit_state.set(st.breaker().code());
        }

        let set_for = |service: &str, version: Option<&str>| -> Option<EndpointSet> {
            let st = services.get(service)?.clone();
            let req = version.and_then(|v| semver::VersionReq::parse(v).ok());
            let eps = by_service
                .get(service)
                .map(|v| {
                    v.iter()
                        .filter(|e| req.as_ref().is_none_or(|r| r.matches(&e.version)))
                        .cloned()
                        .collect()
                })
                .unwrap_or_default();
            Some(EndpointSet::new(st, eps))
        };

        let mut routes = Vec::with_capacity(c.model.routes.len());
        let mut budgets = HashMap::new();
        let mut limiters = HashMap::new();
        for (order, r) in c.model.routes.iter().enumerate() {
            let Some(matcher) = Matcher::compile(&r.matcher) else {
                tracing::error!(route = %r.id, "route has an invalid matcher; skipped");
                continue;
            };
            let metrics = c
                .route_metrics
                .entry((r.id.clone(), r.service.clone()))
                .or_insert_with(|| self.metrics.route(&r.id, &r.service))
                .clone();
            let action = match &r.action {
                RouteAction::Redirect(red) => Action::Redirect(red.clone()),
                RouteAction::Forward(f) => {
                    let backends: Vec<(EndpointSet, u32, Box<str>)> = f
                        .backends
                        .iter()
                        .filter_map(|b| {
                            let set = set_for(&b.service, b.version.as_deref())?;
                            let key =
                                format!("{}@{}", b.service, b.version.as_deref().unwrap_or("*"));
                            Some((set, b.weight, key.into_boxed_str()))
                        })
                        .collect();
                    let Some(first) = f.backends.first() else {
                        continue;
                    };
                    let Some(all_versions) = set_for(&first.service, None) else {
                        tracing::error!(route = %r.id, service = %first.service, "route targets an unknown service; skipped");
                        continue;
                    };
                    let budget_key =
                        format!("{}/{}", f.retry.budget_ratio, f.retry.budget_min_per_second);
                    let budget = match c.budgets.get(&r.id) {
                        Some((k, b)) if *k == budget_key => b.clone(),
                        _ => Arc::new(resilience::RetryBudget::new(
                            f.retry.budget_ratio,
                            f.retry.budget_min_per_second,
                        )),
                    };
                    budgets.insert(r.id.clone(), (budget_key, budget.clone()));
                    let limiter = f.rate_limit.as_ref().map(|rl| {
                        let key = format!("{}/{}", rl.requests_per_second, rl.burst);
                        let l = match c.limiters.get(&r.id) {
                            Some((k, l)) if *k == key => l.clone(),
                            _ => Arc::new(ratelimit::Limiter::new(rl)),
                        };
                        limiters.insert(r.id.clone(), (key, l.clone()));
                        (l, rl.key.clone())
                    });
                    let rewrite = if f.rewrite.strip_prefix {
                        PathRewrite::Strip
                    } else if let Some(p) = &f.rewrite.replace_prefix {
                        PathRewrite::Replace(p.clone())
                    } else if let Some((pat, rep)) = &f.rewrite.regex {
                        match table::compile_regex(pat) {
                            Some(re) => PathRewrite::Regex(re, rep.clone()),
                            None => PathRewrite::None,
                        }
                    } else {
                        PathRewrite::None
                    };
                    Action::Forward(Box::new(ForwardAction {
                        total_weight: backends.iter().map(|(_, w, _)| u64::from(*w)).sum(),
                        backends,
                        all_versions: Arc::new(all_versions),
                        version_header: f
                            .version_header
                            .as_ref()
                            .and_then(|h| http::HeaderName::from_bytes(h.as_bytes()).ok()),
                        version_from_path: f.version_from_path,
                        mirror: f.mirror.as_ref().and_then(|m| {
                            Some(table::Mirror {
                                set: set_for(&m.service, m.version.as_deref())?,
                                percent: m.percent,
                                metrics: self.metrics.mirror(&r.id, &r.service),
                            })
                        }),
                        rewrite,
                        request_headers: CompiledHeaderOps::compile(&f.request_headers),
                        response_headers: CompiledHeaderOps::compile(&f.response_headers),
                        request_timeout: Duration::from_millis(f.timeouts.request_ms),
                        per_try_timeout: f.timeouts.per_try_ms.map(Duration::from_millis),
                        idle_timeout: Duration::from_millis(f.timeouts.idle_ms),
                        retry: f.retry.clone(),
                        budget,
                        limiter,
                        cache: f.cache.clone(),
                        max_body_bytes: f.max_body_bytes,
                    }))
                }
            };
            routes.push(CompiledRoute {
                id: r.id.as_str().into(),
                service: r.service.as_str().into(),
                matcher,
                action,
                metrics,
                order,
            });
        }
        sort_by_precedence(&mut routes);
        c.endpoints = live;
        c.services = services;
        c.budgets = budgets;
        c.limiters = limiters;
        self.table.store(Arc::new(RouteTable::new(routes)));
    }
}
