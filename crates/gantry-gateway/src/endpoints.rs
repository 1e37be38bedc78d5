//! Instances and services as the request path sees them: each instance's `Endpoint` (its
//! connection pool, in-flight count, latency average, outlier state and active-health verdict),
//! each service's `ServiceState` (policy, concurrency limit, TLS to its instances), the sets of
//! instances a target may use (`EndpointSet`, with the load balancers), and the circuit
//! breakers, one per route and service (`BreakerScope`). All of it outlives the snapshots that
//! point at it: the control side carries each by identity from one build to the next.

use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, PoisonError};
use std::time::Duration;

use gantry_http::pool::Pool;
use gantry_model::{LoadBalancer, UpstreamPolicy};
use gantry_telemetry::stats::Outcome;
use http::uri::Authority;
use prometheus_client::metrics::gauge::Gauge;

use crate::body::ReqBody;
use crate::metrics::{InstanceMetrics, ServiceMetrics};
use crate::resilience::{Admission, Breaker, BreakerChange, BreakerState, Outlier};

/// Milliseconds since the gateway's first use of the clock (monotonic).
pub fn clock_ms() -> u64 {
    ms_at(std::time::Instant::now())
}

/// `clock_ms` of an instant already read (saves reading the clock again).
pub fn ms_at(t: std::time::Instant) -> u64 {
    use std::sync::OnceLock;
    static START: OnceLock<std::time::Instant> = OnceLock::new();
    let start = START.get_or_init(std::time::Instant::now);
    t.saturating_duration_since(*start).as_millis() as u64
}

/// How long an instance that refused or reset a connection is skipped.
pub const SUSPECT_MS: u64 = 2_000;
/// Decay time of the latency average used by P2C.
const EWMA_DECAY_MS: f64 = 10_000.0;
/// Assumed latency of an instance without measurements (µs).
const EWMA_DEFAULT_US: f64 = 1_000.0;

/// One instance, with the state that outlives table rebuilds.
pub struct Endpoint {
    pub id: Arc<str>,
    pub service: Arc<str>,
    pub addr: SocketAddr,
    pub authority: Authority,
    pub version: semver::Version,
    pub local: bool,
    /// Self-registered: the gateway probes it when the service asks for active health checks.
    pub external: bool,
    pub inflight: AtomicUsize,
    pub suspect_until_ms: AtomicU64,
    /// Mirror of the outlier state for lock-free reads: 0 when in rotation.
    pub ejected_until_ms: AtomicU64,
    pub outlier: Mutex<Outlier>,
    /// Active health verdict (true unless a probe says otherwise).
    pub healthy: AtomicBool,
    /// Gone from the registry (set before the snapshot without it is published): no attempt
    /// picks it any more, not even a retry or a mirror copy of a request admitted before.
    pub retired: AtomicBool,
    pub next_probe_ms: AtomicU64,
    pub probe_streak: AtomicU64,
    ewma_us: AtomicU64,
    ewma_stamp_ms: AtomicU64,
    /// Connections to the instance (shared with the response bodies that give them back).
    pub pool: Arc<Pool<ReqBody>>,
    pub metrics: InstanceMetrics,
}

impl Endpoint {
    #[allow(clippy::too_many_arguments)]
    pub fn new(
        id: &str,
        service: &str,
        addr: SocketAddr,
        version: semver::Version,
        local: bool,
        external: bool,
        policy: &UpstreamPolicy,
        metrics: InstanceMetrics,
    ) -> Option<Self> {
        let authority = Authority::try_from(addr.to_string()).ok()?;
        Some(Self {
            id: id.into(),
            service: service.into(),
            addr,
            authority,
            version,
            local,
            external,
            inflight: AtomicUsize::new(0),
            suspect_until_ms: AtomicU64::new(0),
            ejected_until_ms: AtomicU64::new(0),
            outlier: Mutex::new(Outlier::new(policy.outlier.clone())),
            healthy: AtomicBool::new(true),
            retired: AtomicBool::new(false),
            next_probe_ms: AtomicU64::new(0),
            probe_streak: AtomicU64::new(0),
            ewma_us: AtomicU64::new(EWMA_DEFAULT_US.to_bits()),
            ewma_stamp_ms: AtomicU64::new(0),
            pool: Arc::new(Pool::new(
                policy.max_idle_connections_per_instance as usize,
                Duration::from_millis(policy.idle_connection_timeout_ms),
            )),
            metrics,
        })
    }

    /// One attempt's outcome, at monotonic `now_ms`, in the instance's statistics (its
    /// version's figures are its instances' added up).
    pub fn record(&self, now_ms: u64, outcome: Outcome, elapsed: std::time::Duration) {
        self.metrics
            .stats
            .record(now_ms, outcome, elapsed.as_micros() as u64);
    }

    /// Eligible for new requests: not suspect, not ejected (an ejection that ran out lets the
    /// next request through as a probe), and not failing active health checks.
    pub fn available(&self, now: u64) -> bool {
        let ej = self.ejected_until_ms.load(Ordering::Relaxed);
        self.suspect_until_ms.load(Ordering::Relaxed) <= now
            && (ej == 0 || ej <= now)
            && self.healthy.load(Ordering::Relaxed)
            && !self.is_retired()
    }

    pub fn is_retired(&self) -> bool {
        self.retired.load(Ordering::Relaxed)
    }

    pub fn mark_suspect(&self, now: u64) {
        self.suspect_until_ms
            .store(now + SUSPECT_MS, Ordering::Relaxed);
    }

    pub fn ewma_us(&self) -> f64 {
        f64::from_bits(self.ewma_us.load(Ordering::Relaxed))
    }

    /// Peak-EWMA: a slower sample is taken at once, a faster one decays in.
    pub fn observe_latency(&self, now: u64, sample_us: f64) {
        let prev = self.ewma_us();
        let last = self.ewma_stamp_ms.swap(now, Ordering::Relaxed);
        let next = if sample_us > prev {
            sample_us
        } else {
            let w = (-(now.saturating_sub(last) as f64) / EWMA_DECAY_MS).exp();
            prev * w + sample_us * (1.0 - w)
        };
        self.ewma_us.store(next.to_bits(), Ordering::Relaxed);
    }

    /// P2C score: lower is better.
    fn score(&self) -> f64 {
        (self.inflight.load(Ordering::Relaxed) as f64 + 1.0) * self.ewma_us()
    }
}

/// Per-service state that outlives table rebuilds.
pub struct ServiceState {
    pub name: Arc<str>,
    pub policy: UpstreamPolicy,
    /// Requests in flight (bulkhead).
    pub inflight: AtomicUsize,
    pub ejected: AtomicUsize,
    /// Instances currently routable (for the ejection cap).
    pub instances: AtomicUsize,
    pub rr: AtomicUsize,
    pub metrics: ServiceMetrics,
    /// TLS to the instances, when the policy asks for it.
    pub tls: Option<gantry_http::pool::UpstreamTls>,
    /// TLS was asked for but could not be set up: refuse to send in clear text.
    pub tls_failed: bool,
}

impl ServiceState {
    pub fn new(
        name: &str,
        policy: UpstreamPolicy,
        metrics: ServiceMetrics,
        internal: &Arc<crate::tls::InternalTls>,
    ) -> Self {
        let tls = policy.tls.as_ref().and_then(|t| {
            let made = if t.mtls {
                // The instances' certificates name `NAME.service.gantry`.
                let sni = t
                    .server_name
                    .clone()
                    .unwrap_or_else(|| format!("{name}.service.gantry"));
                gantry_http::pool::UpstreamTls::mtls(&internal.ca(), internal.resolver(), Some(&sni))
            } else {
                gantry_http::pool::UpstreamTls::new(t.ca_file.as_deref(), t.server_name.as_deref())
            };
            match made {
                Ok(c) => Some(c),
                Err(e) => {
                    tracing::error!(service = name, error = %e, "upstream TLS unusable; connections to this service will fail");
                    None
                }
            }
        });
        let tls_failed = policy.tls.is_some() && tls.is_none();
        Self {
            tls_failed,
            tls,
            name: name.into(),
            policy,
            inflight: AtomicUsize::new(0),
            ejected: AtomicUsize::new(0),
            instances: AtomicUsize::new(0),
            rr: AtomicUsize::new(0),
            metrics,
        }
    }
}

/// A circuit breaker for the requests one route (or one in-process caller) sends to one
/// service: a failing call site opens its own circuit, never the service's other callers'
/// (Resilience4j scopes breakers by call site the same way; Envoy's are per cluster but count
/// connection and request limits, not failures). What counts as a failure is the gateway's
/// kind by default (no connection, a reset, a timeout, 502/503/504), plus the statuses the
/// route lists.
pub struct BreakerScope {
    pub route: Arc<str>,
    pub service: Arc<str>,
    breaker: Mutex<Breaker>,
    /// The breaker is closed (as of its last change): `admit` reads this without the lock.
    closed: AtomicBool,
    /// The policy it was built with (a changed policy makes a new scope).
    pub policy: gantry_model::CircuitBreakerPolicy,
    /// 0 closed, 1 open, 2 half-open.
    pub state_gauge: Gauge,
}

impl BreakerScope {
    pub fn new(
        route: &str,
        service: &str,
        policy: gantry_model::CircuitBreakerPolicy,
        state_gauge: Gauge,
    ) -> Self {
        state_gauge.set(0);
        Self {
            route: route.into(),
            service: service.into(),
            breaker: Mutex::new(Breaker::new(policy.clone())),
            closed: AtomicBool::new(true),
            policy,
            state_gauge,
        }
    }

    /// The breaker, to read (its changes go through `admit` and `record`).
    pub fn breaker(&self) -> std::sync::MutexGuard<'_, Breaker> {
        self.breaker.lock().unwrap_or_else(PoisonError::into_inner)
    }

    /// May a request go now? A closed breaker admits without its lock (two atomic operations a
    /// request otherwise).
    pub fn admit(&self, now: u64) -> Admission {
        if self.closed.load(Ordering::Relaxed) {
            return Admission::Allowed { probe: false };
        }
        let mut b = self.breaker();
        let admission = b.admit(now);
        self.note(&b);
        admission
    }

    /// A probe that ended without an outcome: its half-open slot is free again.
    pub fn release_probe(&self) {
        let mut b = self.breaker();
        b.release();
        self.note(&b);
    }

    /// A request's outcome: what changed, and the state's metric value.
    pub fn record(&self, now: u64, ok: bool, probe: bool) -> (Option<BreakerChange>, i64) {
        let mut b = self.breaker();
        let change = b.record(now, ok, probe);
        self.note(&b);
        (change, b.code())
    }

    fn note(&self, b: &Breaker) {
        let closed = b.state() == BreakerState::Closed;
        if self.closed.load(Ordering::Relaxed) != closed {
            self.closed.store(closed, Ordering::Relaxed);
        }
    }
}

/// The instances one backend of a route may use (a service, optionally narrowed by version),
/// local ones first.
pub struct EndpointSet {
    pub service: Arc<ServiceState>,
    pub endpoints: Vec<Arc<Endpoint>>,
    pub local_count: usize,
    /// Consistent-hash ring (hash, index) when the service balances by hash.
    pub ring: Vec<(u64, u32)>,
}

const RING_POINTS: u64 = 64;

pub fn hash64(data: &[u8]) -> u64 {
    // FNV-1a, then a mixing finalizer (splitmix64) for better spread on short keys.
    let mut h: u64 = 0xcbf2_9ce4_8422_2325;
    for b in data {
        h ^= u64::from(*b);
        h = h.wrapping_mul(0x0000_0100_0000_01b3);
    }
    h ^= h >> 30;
    h = h.wrapping_mul(0xbf58_476d_1ce4_e5b9);
    h ^= h >> 27;
    h = h.wrapping_mul(0x94d0_49bb_1331_11eb);
    h ^ (h >> 31)
}

impl EndpointSet {
    pub fn new(service: Arc<ServiceState>, mut endpoints: Vec<Arc<Endpoint>>) -> Self {
        endpoints.sort_by(|a, b| b.local.cmp(&a.local).then_with(|| a.id.cmp(&b.id)));
        let local_count = endpoints.iter().filter(|e| e.local).count();
        let ring = if matches!(service.policy.load_balancer, LoadBalancer::Hash(_)) {
            let mut r: Vec<(u64, u32)> = endpoints
                .iter()
                .enumerate()
                .flat_map(|(i, e)| {
                    (0..RING_POINTS)
                        .map(move |p| (hash64(format!("{}#{p}", e.id).as_bytes()), i as u32))
                })
                .collect();
            r.sort_unstable();
            r
        } else {
            Vec::new()
        };
        Self {
            service,
            endpoints,
            local_count,
            ring,
        }
    }

    /// Choose an instance not in `tried`, by the service's policy; `hash_key` for hash
    /// balancing. Falls back to unavailable (suspect, ejected) instances rather than failing
    /// when nothing else is left.
    pub fn pick(&self, tried: &[u32], hash_key: Option<u64>, now: u64) -> Option<usize> {
        let n = self.endpoints.len();
        if n == 0 || tried.len() >= n {
            return None;
        }
        let ok = |i: usize| !tried.contains(&(i as u32)) && self.endpoints[i].available(now);
        // Locality: only local instances while any of them is available.
        let m = if self.service.policy.prefer_local && (0..self.local_count).any(ok) {
            self.local_count
        } else {
            n
        };
        let chosen = match &self.service.policy.load_balancer {
            LoadBalancer::RoundRobin => {
                let start = self.service.rr.fetch_add(1, Ordering::Relaxed);
                (0..m).map(|k| (start + k) % m).find(|&i| ok(i))
            }
            LoadBalancer::P2cEwma => {
                if m == 1 {
                    ok(0).then_some(0)
                } else {
                    let a = crate::rand::below(m as u64) as usize;
                    let mut b = crate::rand::below(m as u64 - 1) as usize;
                    if b >= a {
                        b += 1;
                    }
                    match (ok(a), ok(b)) {
                        (true, true) => {
                            Some(if self.endpoints[b].score() < self.endpoints[a].score() {
                                b
                            } else {
                                a
                            })
                        }
                        (true, false) => Some(a),
                        (false, true) => Some(b),
                        (false, false) => (0..m).map(|k| (a + k) % m).find(|&i| ok(i)),
                    }
                }
            }
            LoadBalancer::Hash(_) => match hash_key {
                Some(h) if !self.ring.is_empty() => {
                    let start = self.ring.partition_point(|(p, _)| *p < h);
                    (0..self.ring.len())
                        .map(|k| self.ring[(start + k) % self.ring.len()].1 as usize)
                        .find(|&i| ok(i) && (m == n || i < m))
                }
                _ => {
                    let start = crate::rand::below(m as u64) as usize;
                    (0..m).map(|k| (start + k) % m).find(|&i| ok(i))
                }
            },
        };
        // None available: any not tried yet (ejection and suspicion are guesses; a retired
        // instance is gone for certain).
        chosen.or_else(|| {
            (0..n).find(|&i| !tried.contains(&(i as u32)) && !self.endpoints[i].is_retired())
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use gantry_model::{CircuitBreakerPolicy, OutlierPolicy, UpstreamProtocol};

    pub(crate) fn policy(lb: LoadBalancer) -> UpstreamPolicy {
        UpstreamPolicy {
            protocol: UpstreamProtocol::Http1,
            load_balancer: lb,
            prefer_local: true,
            connect_timeout_ms: 1000,
            max_concurrent_requests: 0,
            max_idle_connections_per_instance: 8,
            idle_connection_timeout_ms: 60_000,
            circuit_breaker: CircuitBreakerPolicy {
                consecutive_failures: 0,
                failure_rate: 0.0,
                min_requests: 1,
                window_ms: 1000,
                open_ms: 1000,
                half_open_requests: 1,
            },
            outlier: OutlierPolicy {
                consecutive_failures: 5,
                failure_rate: 0.0,
                min_requests: 1,
                window_ms: 1000,
                base_ejection_ms: 1000,
                max_ejection_ms: 1000,
                max_ejected_percent: 50,
            },
            active_health: None,
            tls: None,
        }
    }

    fn set(lb: LoadBalancer, locals: &[bool]) -> EndpointSet {
        let m = gantry_telemetry::Metrics::new();
        let gm = crate::metrics::GatewayMetrics::new(&m);
        let p = policy(lb);
        let svc = Arc::new(ServiceState::new(
            "s",
            p.clone(),
            gm.service("s"),
            &Arc::new(crate::tls::InternalTls::default()),
        ));
        let eps = locals
            .iter()
            .enumerate()
            .map(|(i, l)| {
                Arc::new(
                    Endpoint::new(
                        &format!("s-{i}"),
                        "s",
                        SocketAddr::from(([127, 0, 0, 1], 1000 + i as u16)),
                        semver::Version::new(1, 0, 0),
                        *l,
                        false,
                        &p,
                        gm.instance("s", "x", &semver::Version::new(1, 0, 0)),
                    )
                    .unwrap_or_else(|| unreachable!()),
                )
            })
            .collect();
        EndpointSet::new(svc, eps)
    }

    #[test]
    fn a_breaker_admits_without_its_lock_only_while_closed() {
        let mut p = policy(LoadBalancer::RoundRobin).circuit_breaker;
        p.consecutive_failures = 2;
        let b = BreakerScope::new("r", "s", p, Gauge::default());
        let allowed = |a: Admission| matches!(a, Admission::Allowed { probe: false });
        assert!(allowed(b.admit(0)));
        assert_eq!(b.record(1, false, false), (None, 0));
        assert!(allowed(b.admit(2)));
        // The second failure in a row opens it: refused until open_ms (1000) passed.
        assert_eq!(b.record(3, false, false), (Some(BreakerChange::Opened), 1));
        assert!(matches!(b.admit(4), Admission::Rejected { .. }));
        assert!(matches!(b.admit(500), Admission::Rejected { .. }));
        // Then one probe (half-open), and no other request while it is out.
        assert!(matches!(b.admit(1004), Admission::Allowed { probe: true }));
        assert!(matches!(b.admit(1005), Admission::Rejected { .. }));
        // Its success closes the breaker: admitted again, by the lock-free path.
        assert_eq!(b.record(1006, true, true), (Some(BreakerChange::Closed), 0));
        assert!(allowed(b.admit(1007)));
        assert!(b.closed.load(Ordering::Relaxed));
    }

    #[test]
    fn round_robin_is_even_and_skips_unavailable() {
        let s = set(LoadBalancer::RoundRobin, &[true, true, true]);
        let picks: Vec<usize> = (0..6).filter_map(|_| s.pick(&[], None, 0)).collect();
        assert_eq!(picks, [0, 1, 2, 0, 1, 2]);
        s.endpoints[1].mark_suspect(100);
        assert!((0..6)
            .filter_map(|_| s.pick(&[], None, 100))
            .all(|i| i != 1));
        assert_eq!(
            s.pick(&[0, 2], None, 100),
            Some(1),
            "fallback to a suspect one"
        );
        assert_eq!(s.pick(&[0, 1, 2], None, 100), None);
        // A retired instance is never picked, not even as the last resort.
        s.endpoints[1].retired.store(true, Ordering::Relaxed);
        assert!((0..6)
            .filter_map(|_| s.pick(&[], None, 200))
            .all(|i| i != 1));
        assert_eq!(s.pick(&[0, 2], None, 200), None);
    }

    #[test]
    fn p2c_prefers_fewer_outstanding_and_lower_latency() {
        let s = set(LoadBalancer::P2cEwma, &[true, true]);
        s.endpoints[0].inflight.store(10, Ordering::Relaxed);
        assert!((0..50).all(|_| s.pick(&[], None, 0) == Some(1)));
        s.endpoints[0].inflight.store(0, Ordering::Relaxed);
        s.endpoints[1].observe_latency(1, 50_000.0);
        assert!((0..50).all(|_| s.pick(&[], None, 1) == Some(0)));
    }

    #[test]
    fn hashing_is_sticky_and_moves_only_when_needed() {
        let s = set(
            LoadBalancer::Hash(gantry_model::HashOn::ClientIp),
            &[true, true, true, true],
        );
        let keys: Vec<u64> = (0..200)
            .map(|i| hash64(format!("user-{i}").as_bytes()))
            .collect();
        let first: Vec<usize> = keys
            .iter()
            .filter_map(|k| s.pick(&[], Some(*k), 0))
            .collect();
        let again: Vec<usize> = keys
            .iter()
            .filter_map(|k| s.pick(&[], Some(*k), 0))
            .collect();
        assert_eq!(first, again);
        let used: std::collections::BTreeSet<_> = first.iter().collect();
        assert_eq!(used.len(), 4, "keys spread over all instances");
        // Take instance 2 away: only its keys move.
        s.endpoints[2].mark_suspect(0);
        let after: Vec<usize> = keys
            .iter()
            .filter_map(|k| s.pick(&[], Some(*k), 1))
            .collect();
        for (a, b) in first.iter().zip(&after) {
            if *a != 2 {
                assert_eq!(a, b);
            } else {
                assert_ne!(*b, 2);
            }
        }
    }

    #[test]
    fn locality_prefers_local_instances() {
        let s = set(LoadBalancer::RoundRobin, &[false, true, false, true]);
        // Sorted local first.
        assert!(s.endpoints[0].local && s.endpoints[1].local);
        assert!((0..10).filter_map(|_| s.pick(&[], None, 0)).all(|i| i < 2));
        s.endpoints[0].mark_suspect(0);
        s.endpoints[1].mark_suspect(0);
        assert!((0..10).filter_map(|_| s.pick(&[], None, 1)).all(|i| i >= 2));
    }
}
