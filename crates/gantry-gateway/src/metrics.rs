//! Gateway metrics. Handles per route, service and instance are resolved when the table is built,
//! so the request path only touches what it already holds. A request's figures (status class,
//! latency) go into per-thread statistics (`gantry_telemetry::stats`: no atomic
//! read-modify-write, no lock) per route, per instance and per service version; a collector
//! turns them into the Prometheus families at scrape time, and the same statistics give the
//! rolling windows canary analysis, autoscaling and alerts read (`Gateway::traffic`).

use std::collections::BTreeMap;
use std::sync::{Arc, Mutex, PoisonError};

use prometheus_client::collector::Collector;
use prometheus_client::encoding::{DescriptorEncoder, EncodeLabelSet, EncodeMetric};
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::MetricType;

use gantry_telemetry::stats::{Outcome, RequestStats, Totals, BUCKETS_US, CLASSES};
use gantry_telemetry::Metrics;

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct RequestLabels {
    pub route: String,
    pub service: String,
    pub status: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct RouteLabels {
    pub route: String,
    pub service: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct MirrorLabels {
    pub route: String,
    pub service: String,
    pub outcome: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct ServiceLabels {
    pub service: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct InstanceLabels {
    pub service: String,
    pub instance: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct InstanceStatusLabels {
    pub service: String,
    pub instance: String,
    pub status: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct ReasonLabels {
    pub reason: &'static str,
}

/// The live statistics, by what their series are labelled with: what the collector encodes, and
/// what `Gateway::traffic` reads.
/// An instance's statistics, with its version.
pub type InstanceStats = (String, Arc<RequestStats>);
/// A gone instance's statistics: when it left (ms clock), service, version.
pub type RetiredStats = (u64, String, String, Arc<RequestStats>);

#[derive(Default)]
pub struct StatsRegistry {
    pub routes: Mutex<BTreeMap<(String, String), Arc<RequestStats>>>,
    /// By service and instance, with the instance's version.
    pub instances: Mutex<BTreeMap<(String, String), InstanceStats>>,
    /// Instances gone from routing, kept (with when they left, service and version) while
    /// their last minute still counts in their version's window.
    pub retired: Mutex<Vec<RetiredStats>>,
}

impl StatsRegistry {
    /// An instance's figures leave routing: kept in its version's window until they age out.
    fn retire(&self, now_ms: u64, service: &str, (version, stats): InstanceStats) {
        lock(&self.retired).push((now_ms, service.to_string(), version, stats));
    }

    /// Each version's window (its instances', live and recently gone, added up).
    pub fn versions(
        &self,
        now_ms: u64,
    ) -> BTreeMap<(String, String), gantry_telemetry::stats::Window> {
        let mut out: BTreeMap<(String, String), gantry_telemetry::stats::Window> = BTreeMap::new();
        for ((service, _), (version, st)) in lock(&self.instances).iter() {
            out.entry((service.clone(), version.clone()))
                .or_default()
                .merge(&st.window(now_ms));
        }
        for (_, service, version, st) in lock(&self.retired).iter() {
            out.entry((service.clone(), version.clone()))
                .or_default()
                .merge(&st.window(now_ms));
        }
        out
    }
}

pub(crate) fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(PoisonError::into_inner)
}

impl std::fmt::Debug for StatsRegistry {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "StatsRegistry")
    }
}

/// The histogram's buckets as Prometheus wants them: upper bounds in seconds, the last +Inf.
fn histogram_buckets(counts: &[u64]) -> Vec<(f64, u64)> {
    BUCKETS_US
        .iter()
        .map(|b| *b as f64 / 1e6)
        .chain([f64::INFINITY])
        .zip(counts.iter().copied())
        .collect()
}

/// A counter value for the collector.
struct ConstCounter(u64);

impl EncodeMetric for ConstCounter {
    fn encode(
        &self,
        mut encoder: prometheus_client::encoding::MetricEncoder,
    ) -> Result<(), std::fmt::Error> {
        encoder.encode_counter::<prometheus_client::encoding::NoLabelSet, _, u64>(&self.0, None)
    }
    fn metric_type(&self) -> MetricType {
        MetricType::Counter
    }
}

/// One counter family, a series per row.
fn counters<L: EncodeLabelSet>(
    encoder: &mut DescriptorEncoder<'_>,
    name: &str,
    help: &str,
    rows: impl Iterator<Item = (L, u64)>,
) -> Result<(), std::fmt::Error> {
    let mut m = encoder.encode_descriptor(name, help, None, MetricType::Counter)?;
    for (labels, value) in rows {
        ConstCounter(value).encode(m.encode_family(&labels)?)?;
    }
    Ok(())
}

/// One histogram family (seconds), a series per row.
fn histograms<'a, L: EncodeLabelSet>(
    encoder: &mut DescriptorEncoder<'_>,
    name: &str,
    help: &str,
    rows: impl Iterator<Item = (L, &'a Totals)>,
) -> Result<(), std::fmt::Error> {
    let mut m = encoder.encode_descriptor(name, help, None, MetricType::Histogram)?;
    for (labels, t) in rows {
        m.encode_family(&labels)?
            .encode_histogram::<prometheus_client::encoding::NoLabelSet>(
                t.sum_us as f64 / 1e6,
                t.count(),
                &histogram_buckets(&t.buckets),
                None,
            )?;
    }
    Ok(())
}

impl Collector for StatsRegistry {
    fn encode(&self, mut encoder: DescriptorEncoder) -> Result<(), std::fmt::Error> {
        let routes: Vec<_> = lock(&self.routes)
            .iter()
            .map(|(k, v)| (k.clone(), v.totals()))
            .collect();
        let instances: Vec<_> = lock(&self.instances)
            .iter()
            .map(|(k, (_, v))| (k.clone(), v.totals()))
            .collect();
        counters(
            &mut encoder,
            "requests",
            "Requests answered, by route, service and status class",
            routes.iter().flat_map(|((route, service), t)| {
                CLASSES[..5].iter().enumerate().map(|(i, status)| {
                    let labels = RequestLabels {
                        route: route.clone(),
                        service: service.clone(),
                        status,
                    };
                    (labels, t.classes[i])
                })
            }),
        )?;
        histograms(
            &mut encoder,
            "request_duration_seconds",
            "Time from request received to response headers sent, by route",
            routes.iter().map(|((route, service), t)| {
                let labels = RouteLabels {
                    route: route.clone(),
                    service: service.clone(),
                };
                (labels, t)
            }),
        )?;
        counters(
            &mut encoder,
            "instance_requests",
            "Attempts per instance by status class (error: no response)",
            instances.iter().flat_map(|((service, instance), t)| {
                CLASSES.iter().enumerate().map(|(i, status)| {
                    let labels = InstanceStatusLabels {
                        service: service.clone(),
                        instance: instance.clone(),
                        status,
                    };
                    (labels, t.classes[i])
                })
            }),
        )?;
        histograms(
            &mut encoder,
            "instance_duration_seconds",
            "Time to response headers per instance (attempts that got a response)",
            instances.iter().map(|((service, instance), t)| {
                let labels = InstanceLabels {
                    service: service.clone(),
                    instance: instance.clone(),
                };
                (labels, t)
            }),
        )?;
        Ok(())
    }
}

#[derive(Clone)]
pub struct GatewayMetrics {
    /// Per-thread statistics of routes, instances and versions.
    pub stats: Arc<StatsRegistry>,
    retries: Family<RouteLabels, Counter>,
    rate_limited: Family<RouteLabels, Counter>,
    mirrored: Family<MirrorLabels, Counter>,
    mirrors_in_flight: Family<RouteLabels, Gauge>,
    upstream_errors: Family<ServiceLabels, Counter>,
    circuit_state: Family<RouteLabels, Gauge>,
    bulkhead_rejections: Family<ServiceLabels, Counter>,
    ejections: Family<InstanceLabels, Counter>,
    ejected: Family<InstanceLabels, Gauge>,
    cache: Family<ReasonLabels, Counter>,
    rejected: Family<ReasonLabels, Counter>,
    auth_denied: Family<ReasonLabels, Counter>,
    pub open_connections: Gauge,
    pub connections: Counter,
    /// Access-log lines dropped because the writer fell behind.
    pub access_log_dropped: Counter,
}

impl GatewayMetrics {
    pub fn new(metrics: &Metrics) -> Self {
        let m = Self {
            stats: Arc::new(StatsRegistry::default()),
            retries: Family::default(),
            rate_limited: Family::default(),
            mirrored: Family::default(),
            mirrors_in_flight: Family::default(),
            upstream_errors: Family::default(),
            circuit_state: Family::default(),
            bulkhead_rejections: Family::default(),
            ejections: Family::default(),
            ejected: Family::default(),
            cache: Family::default(),
            rejected: Family::default(),
            auth_denied: Family::default(),
            open_connections: Gauge::default(),
            connections: Counter::default(),
            access_log_dropped: Counter::default(),
        };
        metrics.register("gateway", |r| {
            r.register_collector(Box::new(m.stats.clone()));
            r.register(
                "retries",
                "Attempts sent again after a failure, by route",
                m.retries.clone(),
            );
            r.register(
                "rate_limited",
                "Requests refused with 429, by route",
                m.rate_limited.clone(),
            );
            r.register(
                "mirrored_requests",
                "Copies for a route's mirror, by outcome: answered, failed (no answer), \
                 abandoned (the mirror fell behind the request body), skipped (too many copies \
                 in flight)",
                m.mirrored.clone(),
            );
            r.register(
                "mirrors_in_flight",
                "Copies sent to a route's mirror and not answered yet",
                m.mirrors_in_flight.clone(),
            );
            r.register(
                "upstream_errors",
                "Attempts that got no response (refused, reset, timeout), by service",
                m.upstream_errors.clone(),
            );
            r.register(
                "circuit_state",
                "Circuit breaker of the requests a route sends to a service: 0 closed, 1 open, \
                 2 half-open",
                m.circuit_state.clone(),
            );
            r.register(
                "bulkhead_rejections",
                "Requests refused because the service's concurrency limit was reached",
                m.bulkhead_rejections.clone(),
            );
            r.register(
                "ejections",
                "Times an instance was ejected by outlier detection",
                m.ejections.clone(),
            );
            r.register(
                "ejected",
                "1 while an instance is ejected",
                m.ejected.clone(),
            );
            r.register(
                "auth_denied",
                "Requests refused by a route's authentication or the service-to-service policy, by reason",
                m.auth_denied.clone(),
            );
            r.register(
                "cache",
                "Cache lookups by result (hit, miss, revalidated, stored)",
                m.cache.clone(),
            );
            r.register(
                "rejected_requests",
                "Requests answered by the gateway itself, by reason",
                m.rejected.clone(),
            );
            r.register(
                "open_connections",
                "Client connections currently open",
                m.open_connections.clone(),
            );
            r.register(
                "connections",
                "Client connections accepted",
                m.connections.clone(),
            );
            r.register(
                "access_log_dropped",
                "Access-log lines dropped because the writer fell behind",
                m.access_log_dropped.clone(),
            );
        });
        m
    }

    pub fn route(&self, route: &str, service: &str) -> RouteMetrics {
        let labels = RouteLabels {
            route: route.into(),
            service: service.into(),
        };
        let stats = lock(&self.stats.routes)
            .entry((route.into(), service.into()))
            .or_default()
            .clone();
        RouteMetrics {
            stats,
            retries: self.retries.get_or_create(&labels).clone(),
            rate_limited: self.rate_limited.get_or_create(&labels).clone(),
        }
    }

    /// Handles for a route that has a mirror (routes without one get no series).
    pub fn mirror(&self, route: &str, service: &str) -> MirrorMetrics {
        let c = |outcome: &'static str| {
            self.mirrored
                .get_or_create(&MirrorLabels {
                    route: route.into(),
                    service: service.into(),
                    outcome,
                })
                .clone()
        };
        MirrorMetrics {
            answered: c("answered"),
            failed: c("failed"),
            abandoned: c("abandoned"),
            skipped: c("skipped"),
            in_flight: self
                .mirrors_in_flight
                .get_or_create(&RouteLabels {
                    route: route.into(),
                    service: service.into(),
                })
                .clone(),
        }
    }

    pub fn service(&self, service: &str) -> ServiceMetrics {
        let l = ServiceLabels {
            service: service.into(),
        };
        ServiceMetrics {
            upstream_errors: self.upstream_errors.get_or_create(&l).clone(),
            bulkhead_rejections: self.bulkhead_rejections.get_or_create(&l).clone(),
        }
    }

    /// The state gauge of a route's breaker for a service.
    pub fn circuit(&self, route: &str, service: &str) -> Gauge {
        self.circuit_state
            .get_or_create(&RouteLabels {
                route: route.into(),
                service: service.into(),
            })
            .clone()
    }

    /// Forget a breaker's series (the route or its target is gone).
    pub fn remove_circuit(&self, route: &str, service: &str) {
        self.circuit_state.remove(&RouteLabels {
            route: route.into(),
            service: service.into(),
        });
    }

    /// Forget a route's series (the route is gone): they would otherwise stay in every scrape.
    pub fn remove_route(&self, route: &str, service: &str) {
        let labels = RouteLabels {
            route: route.into(),
            service: service.into(),
        };
        lock(&self.stats.routes).remove(&(route.to_string(), service.to_string()));
        self.retries.remove(&labels);
        self.rate_limited.remove(&labels);
        for outcome in ["answered", "failed", "abandoned", "skipped"] {
            self.mirrored.remove(&MirrorLabels {
                route: route.into(),
                service: service.into(),
                outcome,
            });
        }
        self.mirrors_in_flight.remove(&labels);
    }

    /// Forget an instance's series (it left): instances come and go by the thousand over a
    /// gateway's life, and their series would otherwise grow without end. Its figures stay in
    /// its version's window until they age out.
    pub fn remove_instance(&self, service: &str, instance: &str, now_ms: u64) {
        let l = InstanceLabels {
            service: service.into(),
            instance: instance.into(),
        };
        let gone = lock(&self.stats.instances).remove(&(service.to_string(), instance.to_string()));
        if let Some(gone) = gone {
            self.stats.retire(now_ms, service, gone);
        }
        self.ejections.remove(&l);
        self.ejected.remove(&l);
    }

    pub fn instance(
        &self,
        service: &str,
        instance: &str,
        version: &semver::Version,
    ) -> InstanceMetrics {
        let l = InstanceLabels {
            service: service.into(),
            instance: instance.into(),
        };
        let stats = {
            let mut m = lock(&self.stats.instances);
            let e = m
                .entry((service.into(), instance.into()))
                .or_insert_with(|| (version.to_string(), Arc::default()));
            // Same id, another version (a redeploy): figures of their own; the old version's
            // stay in its window until they age out.
            let old = (e.0 != version.to_string())
                .then(|| std::mem::replace(e, (version.to_string(), Arc::default())));
            let stats = e.1.clone();
            drop(m);
            if let Some(old) = old {
                self.stats
                    .retire(crate::endpoints::clock_ms(), service, old);
            }
            stats
        };
        InstanceMetrics {
            stats,
            ejections: self.ejections.get_or_create(&l).clone(),
            ejected: self.ejected.get_or_create(&l).clone(),
        }
    }

    /// Forget gone instances whose last minute has passed.
    pub fn prune_retired(&self, now_ms: u64) {
        lock(&self.stats.retired).retain(|(at, ..)| {
            now_ms.saturating_sub(*at)
                <= gantry_telemetry::stats::WINDOW_MS + gantry_telemetry::stats::SLOT_MS
        });
    }

    pub fn reject(&self, reason: &'static str) {
        self.rejected.get_or_create(&ReasonLabels { reason }).inc();
    }

    pub fn auth_denied(&self, reason: &'static str) {
        self.auth_denied
            .get_or_create(&ReasonLabels { reason })
            .inc();
    }

    pub fn cache(&self, result: &'static str) {
        self.cache
            .get_or_create(&ReasonLabels { reason: result })
            .inc();
    }
}

#[derive(Clone)]
pub struct RouteMetrics {
    /// Requests and their latency to the response head.
    pub stats: Arc<RequestStats>,
    pub retries: Counter,
    pub rate_limited: Counter,
}

impl RouteMetrics {
    /// A request answered with `status`, `seconds` after it arrived, at monotonic `now_ms`.
    pub fn record(&self, now_ms: u64, status: u16, seconds: f64) {
        self.stats
            .record(now_ms, Outcome::Status(status), (seconds * 1e6) as u64);
    }
}

#[derive(Clone)]
pub struct MirrorMetrics {
    pub answered: Counter,
    pub failed: Counter,
    pub abandoned: Counter,
    pub skipped: Counter,
    /// Shared by every build of the route table: the bound on copies in flight holds across
    /// reloads.
    pub in_flight: Gauge,
}

#[derive(Clone)]
pub struct ServiceMetrics {
    pub upstream_errors: Counter,
    pub bulkhead_rejections: Counter,
}

#[derive(Clone)]
pub struct InstanceMetrics {
    /// Attempts and their time to the response head.
    pub stats: Arc<RequestStats>,
    pub ejections: Counter,
    pub ejected: Gauge,
}
