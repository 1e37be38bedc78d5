//! Gateway metrics. Handles per route, service and instance are resolved when the table is built,
//! so the request path only touches atomics (and one histogram) it already holds.

use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::histogram::Histogram;

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

type HistogramFamily<L> = Family<L, Histogram, fn() -> Histogram>;

fn latency_histogram() -> Histogram {
    // 100 µs .. ~26 s
    Histogram::new([
        0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5,
        5.0, 10.0, 25.0,
    ])
}

pub const CLASSES: [&str; 5] = ["1xx", "2xx", "3xx", "4xx", "5xx"];

pub fn class_index(status: u16) -> usize {
    (status / 100).clamp(1, 5) as usize - 1
}

#[derive(Clone)]
pub struct GatewayMetrics {
    requests: Family<RequestLabels, Counter>,
    duration: HistogramFamily<RouteLabels>,
    retries: Family<RouteLabels, Counter>,
    rate_limited: Family<RouteLabels, Counter>,
    mirrored: Family<MirrorLabels, Counter>,
    mirrors_in_flight: Family<RouteLabels, Gauge>,
    upstream_errors: Family<ServiceLabels, Counter>,
    circuit_state: Family<RouteLabels, Gauge>,
    bulkhead_rejections: Family<ServiceLabels, Counter>,
    instance_requests: Family<InstanceStatusLabels, Counter>,
    instance_duration: HistogramFamily<InstanceLabels>,
    ejections: Family<InstanceLabels, Counter>,
    ejected: Family<InstanceLabels, Gauge>,
    cache: Family<ReasonLabels, Counter>,
    rejected: Family<ReasonLabels, Counter>,
    pub open_connections: Gauge,
    pub connections: Counter,
}

impl GatewayMetrics {
    pub fn new(metrics: &Metrics) -> Self {
        let m = Self {
            requests: Family::default(),
            duration: Family::new_with_constructor(latency_histogram as fn() -> Histogram),
            retries: Family::default(),
            rate_limited: Family::default(),
            mirrored: Family::default(),
            mirrors_in_flight: Family::default(),
            upstream_errors: Family::default(),
            circuit_state: Family::default(),
            bulkhead_rejections: Family::default(),
            instance_requests: Family::default(),
            instance_duration: Family::new_with_constructor(latency_histogram as fn() -> Histogram),
            ejections: Family::default(),
            ejected: Family::default(),
            cache: Family::default(),
            rejected: Family::default(),
            open_connections: Gauge::default(),
            connections: Counter::default(),
        };
        metrics.register("gateway", |r| {
            r.register(
                "requests",
                "Requests answered, by route, service and status class",
                m.requests.clone(),
            );
            r.register(
                "request_duration_seconds",
                "Time from request received to response headers sent, by route",
                m.duration.clone(),
            );
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
                "instance_requests",
                "Attempts per instance by status class (error: no response)",
                m.instance_requests.clone(),
            );
            r.register(
                "instance_duration_seconds",
                "Time to response headers per instance",
                m.instance_duration.clone(),
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
        });
        m
    }

    pub fn route(&self, route: &str, service: &str) -> RouteMetrics {
        let labels = RouteLabels {
            route: route.into(),
            service: service.into(),
        };
        RouteMetrics {
            by_class: CLASSES.map(|status| {
                self.requests
                    .get_or_create(&RequestLabels {
                        route: route.into(),
                        service: service.into(),
                        status,
                    })
                    .clone()
            }),
            duration: self.duration.get_or_create(&labels).clone(),
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
        for status in CLASSES {
            self.requests.remove(&RequestLabels {
                route: route.into(),
                service: service.into(),
                status,
            });
        }
        self.duration.remove(&labels);
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
    /// gateway's life, and their series would otherwise grow without end.
    pub fn remove_instance(&self, service: &str, instance: &str) {
        let l = InstanceLabels {
            service: service.into(),
            instance: instance.into(),
        };
        for status in CLASSES.into_iter().chain(["error"]) {
            self.instance_requests.remove(&InstanceStatusLabels {
                service: service.into(),
                instance: instance.into(),
                status,
            });
        }
        self.instance_duration.remove(&l);
        self.ejections.remove(&l);
        self.ejected.remove(&l);
    }

    pub fn instance(&self, service: &str, instance: &str) -> InstanceMetrics {
        let l = InstanceLabels {
            service: service.into(),
            instance: instance.into(),
        };
        let class = |status: &'static str| {
            self.instance_requests
                .get_or_create(&InstanceStatusLabels {
                    service: service.into(),
                    instance: instance.into(),
                    status,
                })
                .clone()
        };
        InstanceMetrics {
            by_class: CLASSES.map(class),
            errors: class("error"),
            duration: self.instance_duration.get_or_create(&l).clone(),
            ejections: self.ejections.get_or_create(&l).clone(),
            ejected: self.ejected.get_or_create(&l).clone(),
        }
    }

    pub fn reject(&self, reason: &'static str) {
        self.rejected.get_or_create(&ReasonLabels { reason }).inc();
    }

    pub fn cache(&self, result: &'static str) {
        self.cache
            .get_or_create(&ReasonLabels { reason: result })
            .inc();
    }
}

#[derive(Clone)]
pub struct RouteMetrics {
    by_class: [Counter; 5],
    pub duration: Histogram,
    pub retries: Counter,
    pub rate_limited: Counter,
}

impl RouteMetrics {
    pub fn record(&self, status: u16, seconds: f64) {
        self.by_class[class_index(status)].inc();
        self.duration.observe(seconds);
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
    by_class: [Counter; 5],
    pub errors: Counter,
    pub duration: Histogram,
    pub ejections: Counter,
    pub ejected: Gauge,
}

impl InstanceMetrics {
    pub fn record(&self, status: u16, seconds: f64) {
        self.by_class[class_index(status)].inc();
        self.duration.observe(seconds);
    }
}
