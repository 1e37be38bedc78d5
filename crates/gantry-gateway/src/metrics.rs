//! Gateway metrics. Handles per route are resolved when the table is built, so the request path
//! only increments atomics it already holds.

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

const CLASSES: [&str; 5] = ["1xx", "2xx", "3xx", "4xx", "5xx"];

#[derive(Clone)]
pub struct GatewayMetrics {
    requests: Family<RequestLabels, Counter>,
    duration: HistogramFamily<RouteLabels>,
    retries: Family<RouteLabels, Counter>,
    upstream_errors: Family<RouteLabels, Counter>,
    pub rejected: Family<ReasonLabels, Counter>,
    pub open_connections: Gauge,
    pub connections: Counter,
}

impl GatewayMetrics {
    pub fn new(metrics: &Metrics) -> Self {
        let m = Self {
            requests: Family::default(),
            duration: Family::new_with_constructor(latency_histogram as fn() -> Histogram),
            retries: Family::default(),
            upstream_errors: Family::default(),
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
                "Requests sent again to another instance after a transport error",
                m.retries.clone(),
            );
            r.register(
                "upstream_errors",
                "Attempts that failed to reach an instance or get its response",
                m.upstream_errors.clone(),
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

    /// Handles for one route (or for `route = "none"` when nothing matched).
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
            upstream_errors: self.upstream_errors.get_or_create(&labels).clone(),
        }
    }

    pub fn reject(&self, reason: &'static str) {
        self.rejected.get_or_create(&ReasonLabels { reason }).inc();
    }
}

#[derive(Clone)]
pub struct RouteMetrics {
    by_class: [Counter; 5],
    pub duration: Histogram,
    pub retries: Counter,
    pub upstream_errors: Counter,
}

impl RouteMetrics {
    pub fn record(&self, status: u16, seconds: f64) {
        let class = (status / 100).clamp(1, 5) as usize - 1;
        self.by_class[class].inc();
        self.duration.observe(seconds);
    }
}
