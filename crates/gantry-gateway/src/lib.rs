//! The data plane: an HTTP/1.1 reverse proxy that routes by host and path prefix to the healthy
//! instances of a service.
//!
//! Two sides share one [`Gateway`]:
//! - the control side ([`Gateway::set_routes`], [`Gateway::apply_registry`]) rebuilds the whole
//!   [`table::RouteTable`] and swaps it in atomically;
//! - the request side ([`proxy`]) loads the current table once per request and never locks.
//!
//! Architecture invariant: this crate depends on `gantry-model` (and `gantry-telemetry` for metric
//! handles) only, never on control-plane crates. Every filter a request passes is in `proxy.rs`.
#![forbid(unsafe_code)]

mod body;
mod metrics;
mod proxy;
pub mod table;

use std::collections::HashMap;
use std::convert::Infallible;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, PoisonError};
use std::time::Duration;

use arc_swap::ArcSwap;
use gantry_model::{RegistrySnapshot, Route};
use gantry_telemetry::Metrics;
use hyper::server::conn::http1;
use hyper::service::service_fn;
use hyper_util::client::legacy::connect::HttpConnector;
use hyper_util::client::legacy::Client;
use hyper_util::rt::{TokioExecutor, TokioIo, TokioTimer};
use serde::Serialize;
use tokio::net::TcpListener;
use tokio::sync::watch;

use crate::metrics::{GatewayMetrics, RouteMetrics};
use crate::table::{clock_ms, sort_by_precedence, CompiledRoute, Endpoint, RouteTable, Upstream};

pub use body::{RequestBody, ResponseBody};

/// Runtime options of the gateway (from `[gateway]` in the spec).
#[derive(Clone, Debug)]
pub struct GatewayConfig {
    /// Log one JSON line per request (target `gantry::access`).
    pub access_log: bool,
    /// Time a client has to send a complete request head (slowloris guard).
    pub header_read_timeout: Duration,
    /// Time to establish a TCP connection to an instance.
    pub connect_timeout: Duration,
    /// Idle upstream connections are closed after this long.
    pub upstream_idle_timeout: Duration,
    /// How long shutdown waits for open requests to finish.
    pub shutdown_grace: Duration,
}

impl Default for GatewayConfig {
    fn default() -> Self {
        Self {
            access_log: false,
            header_read_timeout: Duration::from_secs(30),
            connect_timeout: Duration::from_secs(2),
            upstream_idle_timeout: Duration::from_secs(60),
            shutdown_grace: Duration::from_secs(10),
        }
    }
}

/// What the control side last gave us, plus state carried across rebuilds.
struct Control {
    routes: Vec<Route>,
    registry: Arc<RegistrySnapshot>,
    /// By instance id; kept while the instance is registered or still has requests in flight.
    endpoints: HashMap<Arc<str>, Arc<Endpoint>>,
    cursors: HashMap<String, Arc<AtomicUsize>>,
    route_metrics: HashMap<(String, String), RouteMetrics>,
}

pub struct Gateway {
    table: ArcSwap<RouteTable>,
    control: Mutex<Control>,
    client: Client<HttpConnector, RequestBody>,
    metrics: GatewayMetrics,
    no_route: RouteMetrics,
    cfg: GatewayConfig,
    ids: proxy::RequestIds,
}

/// A route as the admin API shows it: the rule and where it currently sends traffic.
#[derive(Debug, Clone, Serialize)]
pub struct RouteView {
    #[serde(flatten)]
    pub route: Route,
    pub endpoints: Vec<EndpointView>,
}

#[derive(Debug, Clone, Serialize)]
pub struct EndpointView {
    pub instance: String,
    pub address: SocketAddr,
    pub inflight: usize,
    pub suspect: bool,
}

impl Gateway {
    pub fn new(cfg: GatewayConfig, metrics: &Metrics) -> Arc<Self> {
        let mut connector = HttpConnector::new();
        connector.set_nodelay(true);
        connector.set_connect_timeout(Some(cfg.connect_timeout));
        connector.enforce_http(true);
        let client = Client::builder(TokioExecutor::new())
            .pool_idle_timeout(cfg.upstream_idle_timeout)
            .pool_timer(TokioTimer::new())
            .pool_max_idle_per_host(1024)
            .build(connector);
        let metrics = GatewayMetrics::new(metrics);
        let no_route = metrics.route("none", "none");
        Arc::new(Self {
            table: ArcSwap::from_pointee(RouteTable::empty()),
            control: Mutex::new(Control {
                routes: Vec::new(),
                registry: Arc::new(RegistrySnapshot::default()),
                endpoints: HashMap::new(),
                cursors: HashMap::new(),
                route_metrics: HashMap::new(),
            }),
            client,
            metrics,
            no_route,
            cfg,
            ids: proxy::RequestIds::new(),
        })
    }

    /// Replace the route rules.
    pub fn set_routes(&self, routes: Vec<Route>) {
        let mut c = self.lock();
        c.routes = routes;
        self.rebuild(&mut c);
    }

    /// Take in a new registry snapshot.
    pub fn apply_registry(&self, snapshot: &Arc<RegistrySnapshot>) {
        let mut c = self.lock();
        c.registry = snapshot.clone();
        self.rebuild(&mut c);
    }

    /// Registry revision the live table reflects.
    pub fn applied_revision(&self) -> u64 {
        self.table.load().registry_revision
    }

    /// Requests in flight to one instance (0 when unknown).
    pub fn inflight(&self, instance: &str) -> usize {
        self.lock()
            .endpoints
            .get(instance)
            .map_or(0, |e| e.inflight.load(Ordering::Relaxed))
    }

    /// The live route table, for the admin API.
    pub fn routes(&self) -> Vec<RouteView> {
        let table = self.table.load_full();
        let now = clock_ms();
        table
            .routes
            .iter()
            .map(|r| RouteView {
                route: r.route.clone(),
                endpoints: r
                    .upstream
                    .endpoints
                    .iter()
                    .map(|e| EndpointView {
                        instance: e.id.to_string(),
                        address: e.addr,
                        inflight: e.inflight.load(Ordering::Relaxed),
                        suspect: e.is_suspect(now),
                    })
                    .collect(),
            })
            .collect()
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Control> {
        self.control.lock().unwrap_or_else(PoisonError::into_inner)
    }

    fn rebuild(&self, c: &mut Control) {
        let registry = c.registry.clone();
        // Endpoints per service, reusing per-instance state by id.
        let mut live: HashMap<Arc<str>, Arc<Endpoint>> = HashMap::new();
        let mut upstreams: HashMap<String, Arc<Upstream>> = HashMap::new();
        let services: Vec<String> = c.routes.iter().map(|r| r.service.clone()).collect();
        for service in services {
            if upstreams.contains_key(&service) {
                continue;
            }
            let mut eps = Vec::new();
            for inst in registry.instances(&service) {
                if !table::routable(inst.health) {
                    continue;
                }
                let addr = SocketAddr::new(inst.address, inst.port);
                let ep = match c.endpoints.get(inst.id.as_str()) {
                    Some(e) if e.addr == addr => e.clone(),
                    _ => match Endpoint::new(inst.id.as_str().into(), addr) {
                        Some(e) => Arc::new(e),
                        None => continue,
                    },
                };
                live.insert(ep.id.clone(), ep.clone());
                eps.push(ep);
            }
            let cursor = c
                .cursors
                .entry(service.clone())
                .or_insert_with(|| Arc::new(AtomicUsize::new(0)))
                .clone();
            upstreams.insert(
                service.clone(),
                Arc::new(Upstream {
                    service: service.as_str().into(),
                    endpoints: eps,
                    cursor,
                }),
            );
        }
        // Keep state of instances that left but still finish requests (drain accounting).
        for (id, ep) in c.endpoints.drain() {
            if !live.contains_key(&id) && ep.inflight.load(Ordering::Relaxed) > 0 {
                live.insert(id, ep);
            }
        }
        c.endpoints = live;

        let mut routes = Vec::with_capacity(c.routes.len());
        for r in &c.routes {
            let Some(upstream) = upstreams.get(&r.service) else {
                continue;
            };
            let metrics = c
                .route_metrics
                .entry((r.id.clone(), r.service.clone()))
                .or_insert_with(|| self.metrics.route(&r.id, &r.service))
                .clone();
            routes.push(CompiledRoute {
                route: r.clone(),
                upstream: upstream.clone(),
                metrics,
                timeout: Duration::from_millis(r.timeout_ms),
            });
        }
        sort_by_precedence(&mut routes);
        self.table.store(Arc::new(RouteTable {
            registry_revision: registry.revision,
            routes,
        }));
    }

    /// Accept connections on `listener` until `shutdown` turns true, then stop accepting and wait
    /// (up to the shutdown grace) for open requests to finish.
    pub async fn serve(
        self: Arc<Self>,
        listener: TcpListener,
        mut shutdown: watch::Receiver<bool>,
    ) {
        let graceful = hyper_util::server::graceful::GracefulShutdown::new();
        let mut builder = http1::Builder::new();
        builder
            .timer(TokioTimer::new())
            .header_read_timeout(self.cfg.header_read_timeout)
            .keep_alive(true);
        loop {
            let (stream, peer) = tokio::select! {
                res = listener.accept() => match res {
                    Ok(conn) => conn,
                    Err(e) => {
                        // EMFILE and friends: back off instead of spinning.
                        tracing::warn!(error = %e, "gateway accept failed");
                        tokio::time::sleep(Duration::from_millis(10)).await;
                        continue;
                    }
                },
                _ = shutdown.wait_for(|s| *s) => break,
            };
            let _ = stream.set_nodelay(true);
            let gw = self.clone();
            let svc = service_fn(move |req| {
                let gw = gw.clone();
                async move { Ok::<_, Infallible>(gw.handle(req, peer).await) }
            });
            let conn = builder.serve_connection(TokioIo::new(stream), svc);
            let conn = graceful.watch(conn);
            let open = self.metrics.open_connections.clone();
            self.metrics.connections.inc();
            open.inc();
            tokio::spawn(async move {
                let _ = conn.await;
                open.dec();
            });
        }
        drop(listener);
        tokio::select! {
            _ = graceful.shutdown() => {}
            _ = tokio::time::sleep(self.cfg.shutdown_grace) => {
                tracing::warn!("gateway shutdown grace elapsed with requests still open");
            }
        }
    }
}
