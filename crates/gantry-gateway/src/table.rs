//! The route table: an immutable snapshot the request path reads without locks, rebuilt as a
//! whole by the control side on every route, policy or registry change. Per-instance, per-service
//! and per-route state that must outlive a rebuild (connections, counters, breakers, budgets) is
//! held in `Arc`s the rebuild carries over.
//!
//! Precedence (first match wins, after sorting): host-specific routes before any-host routes
//! (exact hosts before wildcards, longer wildcards first); then exact paths, then regex paths,
//! then prefixes, longer first; then routes with methods; then more header conditions; then more
//! query conditions; then spec order.

use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, PoisonError};
use std::time::Duration;

use gantry_model::{LoadBalancer, PathMatch, UpstreamPolicy, ValueMatch};
use http::header::{HeaderName, HeaderValue};
use http::uri::Authority;
use http::Method;
use regex::Regex;

use crate::body::ReqBody;
use crate::metrics::{InstanceMetrics, RouteMetrics, ServiceMetrics};
use crate::ratelimit::Limiter;
use crate::resilience::{Admission, Breaker, BreakerChange, BreakerState, Outlier, RetryBudget};
use gantry_http::pool::Pool;

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

    /// Eligible for new requests: not suspect, not ejected (an ejection that ran out lets the
    /// next request through as a probe), and not failing active health checks.
    pub fn available(&self, now: u64) -> bool {
        let ej = self.ejected_until_ms.load(Ordering::Relaxed);
        self.suspect_until_ms.load(Ordering::Relaxed) <= now
            && (ej == 0 || ej <= now)
            && self.healthy.load(Ordering::Relaxed)
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
    pub breaker: Mutex<Breaker>,
    /// The breaker is closed (as of its last change): `admit` reads this without the lock.
    breaker_closed: AtomicBool,
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
    pub fn new(name: &str, policy: UpstreamPolicy, metrics: ServiceMetrics) -> Self {
        let tls = policy.tls.as_ref().and_then(|t| {
            match gantry_http::pool::UpstreamTls::new(t.ca_file.as_deref(), t.server_name.as_deref()) {
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
            breaker: Mutex::new(Breaker::new(policy.circuit_breaker.clone())),
            breaker_closed: AtomicBool::new(true),
            policy,
            inflight: AtomicUsize::new(0),
            ejected: AtomicUsize::new(0),
            instances: AtomicUsize::new(0),
            rr: AtomicUsize::new(0),
            metrics,
        }
    }

    /// The breaker, to read (its changes go through `admit` and `record`).
    pub fn breaker(&self) -> std::sync::MutexGuard<'_, Breaker> {
        self.breaker.lock().unwrap_or_else(PoisonError::into_inner)
    }

    /// May a request go to the service now? A closed breaker admits without its lock (two
    /// atomic operations a request otherwise).
    pub fn admit(&self, now: u64) -> Admission {
        if self.breaker_closed.load(Ordering::Relaxed) {
            return Admission::Allowed { probe: false };
        }
        let mut b = self.breaker();
        let admission = b.admit(now);
        self.note_breaker(&b);
        admission
    }

    /// A request's outcome, for the breaker: what changed, and the state's metric value.
    pub fn record(&self, now: u64, ok: bool, probe: bool) -> (Option<BreakerChange>, i64) {
        let mut b = self.breaker();
        let change = b.record(now, ok, probe);
        self.note_breaker(&b);
        (change, b.code())
    }

    fn note_breaker(&self, b: &Breaker) {
        let closed = b.state() == BreakerState::Closed;
        if self.breaker_closed.load(Ordering::Relaxed) != closed {
            self.breaker_closed.store(closed, Ordering::Relaxed);
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
        chosen.or_else(|| (0..n).find(|&i| !tried.contains(&(i as u32))))
    }
}

#[derive(Debug)]
pub enum HostPattern {
    Exact(String),
    /// `*.example.com` stored as `.example.com`.
    Suffix(String),
}

impl HostPattern {
    fn parse(h: &str) -> Self {
        match h.strip_prefix('*') {
            Some(suffix) => HostPattern::Suffix(suffix.to_string()),
            None => HostPattern::Exact(h.to_string()),
        }
    }
    fn matches(&self, host: &str) -> bool {
        match self {
            HostPattern::Exact(h) => h == host,
            HostPattern::Suffix(s) => host.len() > s.len() && host.ends_with(s.as_str()),
        }
    }
    fn rank(&self) -> usize {
        match self {
            HostPattern::Exact(h) => 10_000 + h.len(),
            HostPattern::Suffix(s) => s.len(),
        }
    }
}

pub enum PathMatcher {
    Prefix(String),
    Exact(String),
    /// A regex, and the literal every match must start with (checked first: cheap).
    Regex(Regex, String),
}

impl PathMatcher {
    pub fn matches(&self, path: &str) -> bool {
        match self {
            PathMatcher::Prefix(p) => prefix_matches(p, path),
            PathMatcher::Exact(p) => p == path,
            PathMatcher::Regex(r, lit) => path.starts_with(lit.as_str()) && r.is_match(path),
        }
    }
}

/// Segment-wise prefix match: `/api` matches `/api`, `/api/` and `/api/x`, but not `/apix`.
pub fn prefix_matches(prefix: &str, path: &str) -> bool {
    if prefix == "/" {
        return true;
    }
    match path.strip_prefix(prefix) {
        Some(rest) => rest.is_empty() || rest.starts_with('/'),
        None => false,
    }
}

pub enum ValueMatcher {
    Present,
    Exact(String),
    Regex(Regex),
}

impl ValueMatcher {
    pub fn compile(v: &ValueMatch) -> Option<Self> {
        Some(match v {
            ValueMatch::Present => ValueMatcher::Present,
            ValueMatch::Exact(s) => ValueMatcher::Exact(s.clone()),
            ValueMatch::Regex(r) => ValueMatcher::Regex(compile_regex(r)?),
        })
    }
    pub fn matches(&self, v: &[u8]) -> bool {
        match self {
            ValueMatcher::Present => true,
            ValueMatcher::Exact(s) => s.as_bytes() == v,
            ValueMatcher::Regex(r) => std::str::from_utf8(v).is_ok_and(|s| r.is_match(s)),
        }
    }
}

/// The literal text every match of an anchored (`^...`) pattern starts with: the characters
/// after `^` up to the first one with a special meaning, less the last one if a quantifier
/// follows it. Conservative: "" when unsure (flags, groups, escapes, alternation anywhere).
pub fn required_prefix(pattern: &str) -> String {
    let Some(rest) = pattern.strip_prefix('^') else {
        return String::new();
    };
    if pattern.contains('|') {
        return String::new();
    }
    let mut lit = String::new();
    for c in rest.chars() {
        match c {
            '*' | '?' | '{' => {
                lit.pop();
                break;
            }
            '.' | '[' | ']' | '(' | ')' | '+' | '}' | '\\' | '^' | '$' => break,
            _ => lit.push(c),
        }
    }
    lit
}

pub fn compile_regex(r: &str) -> Option<Regex> {
    regex::RegexBuilder::new(r).size_limit(1 << 20).build().ok()
}

/// The request facts matching looks at.
pub struct RequestView<'a> {
    pub host: Option<&'a str>,
    pub path: &'a str,
    pub method: &'a Method,
    pub headers: &'a http::HeaderMap,
    pub query: Option<&'a str>,
}

pub struct Matcher {
    pub hosts: Vec<HostPattern>,
    pub path: PathMatcher,
    pub methods: Vec<Method>,
    pub headers: Vec<(HeaderName, ValueMatcher)>,
    pub query: Vec<(String, ValueMatcher)>,
}

impl Matcher {
    pub fn compile(m: &gantry_model::RouteMatch) -> Option<Self> {
        Some(Self {
            hosts: m.hosts.iter().map(|h| HostPattern::parse(h)).collect(),
            path: match &m.path {
                PathMatch::Prefix(p) => PathMatcher::Prefix(p.clone()),
                PathMatch::Exact(p) => PathMatcher::Exact(p.clone()),
                // On the whole path, anchored or not (as documented; Envoy's `safe_regex`
                // matches the whole path too).
                PathMatch::Regex(r) => {
                    PathMatcher::Regex(compile_regex(&format!("^(?:{r})$"))?, required_prefix(r))
                }
            },
            methods: m
                .methods
                .iter()
                .filter_map(|s| Method::from_bytes(s.as_bytes()).ok())
                .collect(),
            headers: m
                .headers
                .iter()
                .map(|c| {
                    Some((
                        HeaderName::from_bytes(c.name.as_bytes()).ok()?,
                        ValueMatcher::compile(&c.value)?,
                    ))
                })
                .collect::<Option<Vec<_>>>()?,
            query: m
                .query
                .iter()
                .map(|c| Some((c.name.clone(), ValueMatcher::compile(&c.value)?)))
                .collect::<Option<Vec<_>>>()?,
        })
    }

    pub fn matches(&self, r: &RequestView<'_>) -> bool {
        if !self.hosts.is_empty() {
            match r.host {
                Some(h) if self.hosts.iter().any(|p| p.matches(h)) => {}
                _ => return false,
            }
        }
        if !self.path.matches(r.path) {
            return false;
        }
        if !self.methods.is_empty() && !self.methods.contains(r.method) {
            return false;
        }
        for (name, m) in &self.headers {
            if !r
                .headers
                .get_all(name)
                .iter()
                .any(|v| m.matches(v.as_bytes()))
            {
                return false;
            }
        }
        for (name, m) in &self.query {
            let found = r.query.is_some_and(|q| {
                q.split('&').any(|kv| {
                    let (k, v) = kv.split_once('=').unwrap_or((kv, ""));
                    k == name && m.matches(v.as_bytes())
                })
            });
            if !found {
                return false;
            }
        }
        true
    }

    /// Sort key for precedence (greater first).
    pub fn rank(&self) -> (usize, usize, usize, usize, usize, usize) {
        let host = self
            .hosts
            .iter()
            .map(HostPattern::rank)
            .max()
            .map_or(0, |r| r + 1);
        let (kind, len) = match &self.path {
            PathMatcher::Exact(p) => (3, p.len()),
            PathMatcher::Regex(r, _) => (2, r.as_str().len()),
            PathMatcher::Prefix(p) => (1, p.len()),
        };
        (
            host,
            kind,
            len,
            usize::from(!self.methods.is_empty()),
            self.headers.len(),
            self.query.len(),
        )
    }
}

pub struct CompiledHeaderOps {
    pub remove: Vec<HeaderName>,
    pub set: Vec<(HeaderName, HeaderValue)>,
    pub add: Vec<(HeaderName, HeaderValue)>,
}

impl CompiledHeaderOps {
    pub fn compile(o: &gantry_model::HeaderOps) -> Self {
        let pairs = |m: &std::collections::BTreeMap<String, String>| {
            m.iter()
                .filter_map(|(k, v)| {
                    Some((
                        HeaderName::from_bytes(k.as_bytes()).ok()?,
                        HeaderValue::from_str(v).ok()?,
                    ))
                })
                .collect()
        };
        Self {
            remove: o
                .remove
                .iter()
                .filter_map(|h| HeaderName::from_bytes(h.as_bytes()).ok())
                .collect(),
            set: pairs(&o.set),
            add: pairs(&o.add),
        }
    }

    pub fn is_empty(&self) -> bool {
        self.remove.is_empty() && self.set.is_empty() && self.add.is_empty()
    }

    pub fn apply(&self, h: &mut http::HeaderMap) {
        for n in &self.remove {
            h.remove(n);
        }
        for (n, v) in &self.set {
            h.insert(n.clone(), v.clone());
        }
        for (n, v) in &self.add {
            h.append(n.clone(), v.clone());
        }
    }
}

pub enum PathRewrite {
    None,
    Strip,
    Replace(String),
    Regex(Regex, String),
}

/// Where and how a forwarding route sends requests.
pub struct ForwardAction {
    /// Weighted targets: instances, weight, and `service@version` (what the cache keys on).
    pub backends: Vec<(EndpointSet, u32, Box<str>)>,
    /// In u64: the weights' sum may pass `u32::MAX` (the spec refuses that; the API may not).
    pub total_weight: u64,
    /// Every instance of the first backend's service, for header-selected versions.
    pub all_versions: Arc<EndpointSet>,
    pub version_header: Option<HeaderName>,
    pub version_from_path: bool,
    pub mirror: Option<Mirror>,
    pub rewrite: PathRewrite,
    pub request_headers: CompiledHeaderOps,
    pub response_headers: CompiledHeaderOps,
    pub request_timeout: Duration,
    pub per_try_timeout: Option<Duration>,
    pub idle_timeout: Duration,
    pub retry: gantry_model::RetryPolicy,
    pub budget: Arc<RetryBudget>,
    pub limiter: Option<(Arc<Limiter>, gantry_model::RateLimitKey)>,
    pub cache: Option<gantry_model::CachePolicy>,
    pub max_body_bytes: u64,
}

/// Where a route's shadow copies go.
pub struct Mirror {
    pub set: EndpointSet,
    /// Share of requests copied, 0-100.
    pub percent: f64,
    pub metrics: crate::metrics::MirrorMetrics,
}

pub enum Action {
    Forward(Box<ForwardAction>),
    Redirect(gantry_model::Redirect),
}

pub struct CompiledRoute {
    pub id: Arc<str>,
    pub service: Arc<str>,
    pub matcher: Matcher,
    pub action: Action,
    pub metrics: RouteMetrics,
    pub order: usize,
}

/// The whole routing state at one moment.
pub struct RouteTable {
    /// In precedence order (every route with hosts before every route without).
    pub routes: Vec<CompiledRoute>,
    /// Positions of the routes naming each exact host, ascending.
    by_host: HashMap<String, Vec<u32>>,
    /// Positions of the routes with a wildcard host, ascending.
    wildcard: Vec<u32>,
    /// Positions of the routes for any host, ascending.
    any_host: Vec<u32>,
}

impl RouteTable {
    pub fn empty() -> Self {
        Self::new(Vec::new())
    }

    /// `routes` in precedence order (`sort_by_precedence`).
    pub fn new(routes: Vec<CompiledRoute>) -> Self {
        let mut by_host: HashMap<String, Vec<u32>> = HashMap::new();
        let mut wildcard = Vec::new();
        let mut any_host = Vec::new();
        for (i, r) in routes.iter().enumerate() {
            let i = i as u32;
            if r.matcher.hosts.is_empty() {
                any_host.push(i);
            }
            let mut has_wildcard = false;
            for h in &r.matcher.hosts {
                match h {
                    HostPattern::Exact(h) => {
                        let v = by_host.entry(h.clone()).or_default();
                        if v.last() != Some(&i) {
                            v.push(i);
                        }
                    }
                    HostPattern::Suffix(_) => has_wildcard = true,
                }
            }
            if has_wildcard {
                wildcard.push(i);
            }
        }
        Self {
            routes,
            by_host,
            wildcard,
            any_host,
        }
    }

    /// The first route, in precedence order, that matches: only the routes that can match the
    /// request's host are tried (one hash lookup), as in a virtual-host table.
    pub fn find(&self, r: &RequestView<'_>) -> Option<&CompiledRoute> {
        if let Some(h) = r.host {
            let exact = if self.by_host.is_empty() {
                &[][..]
            } else {
                self.by_host.get(h).map_or(&[][..], Vec::as_slice)
            };
            // Both lists ascend: merge them to keep precedence order.
            let (mut i, mut j) = (0, 0);
            loop {
                let next = match (exact.get(i), self.wildcard.get(j)) {
                    (Some(&a), Some(&b)) if a == b => {
                        i += 1;
                        j += 1;
                        a
                    }
                    (Some(&a), Some(&b)) if a < b => {
                        i += 1;
                        a
                    }
                    (_, Some(&b)) => {
                        j += 1;
                        b
                    }
                    (Some(&a), None) => {
                        i += 1;
                        a
                    }
                    (None, None) => break,
                };
                let c = &self.routes[next as usize];
                if c.matcher.matches(r) {
                    return Some(c);
                }
            }
        }
        self.any_host
            .iter()
            .map(|&i| &self.routes[i as usize])
            .find(|c| c.matcher.matches(r))
    }
}

/// Order routes by precedence (stable: spec order breaks ties).
pub fn sort_by_precedence(routes: &mut [CompiledRoute]) {
    routes.sort_by(|a, b| {
        b.matcher
            .rank()
            .cmp(&a.matcher.rank())
            .then(a.order.cmp(&b.order))
    });
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
        let svc = Arc::new(ServiceState::new("s", p.clone(), gm.service("s")));
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
                        gm.instance("s", "x"),
                    )
                    .unwrap_or_else(|| unreachable!()),
                )
            })
            .collect();
        EndpointSet::new(svc, eps)
    }

    #[test]
    fn the_service_breaker_admits_without_its_lock_only_while_closed() {
        let m = gantry_telemetry::Metrics::new();
        let gm = crate::metrics::GatewayMetrics::new(&m);
        let mut p = policy(LoadBalancer::RoundRobin);
        p.circuit_breaker.consecutive_failures = 2;
        let svc = ServiceState::new("s", p, gm.service("s"));
        let allowed = |a: Admission| matches!(a, Admission::Allowed { probe: false });
        assert!(allowed(svc.admit(0)));
        assert_eq!(svc.record(1, false, false), (None, 0));
        assert!(allowed(svc.admit(2)));
        // The second failure in a row opens it: refused until open_ms (1000) passed.
        assert_eq!(
            svc.record(3, false, false),
            (Some(BreakerChange::Opened), 1)
        );
        assert!(matches!(svc.admit(4), Admission::Rejected { .. }));
        assert!(matches!(svc.admit(500), Admission::Rejected { .. }));
        // Then one probe (half-open), and no other request while it is out.
        assert!(matches!(
            svc.admit(1004),
            Admission::Allowed { probe: true }
        ));
        assert!(matches!(svc.admit(1005), Admission::Rejected { .. }));
        // Its success closes the breaker: admitted again, by the lock-free path.
        assert_eq!(
            svc.record(1006, true, true),
            (Some(BreakerChange::Closed), 0)
        );
        assert!(allowed(svc.admit(1007)));
        assert!(svc.breaker_closed.load(Ordering::Relaxed));
    }

    #[test]
    fn prefixes_match_whole_segments() {
        assert!(prefix_matches("/", "/anything"));
        assert!(prefix_matches("/api", "/api"));
        assert!(prefix_matches("/api", "/api/v1/x"));
        assert!(!prefix_matches("/api", "/apix"));
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

    #[test]
    fn matcher_conditions_and_precedence() {
        let m = |json: &str| -> Matcher {
            let rm: gantry_model::RouteMatch =
                serde_json::from_str(json).unwrap_or_else(|e| panic!("{e}"));
            Matcher::compile(&rm).unwrap_or_else(|| unreachable!())
        };
        let wildcard = m(
            r#"{"hosts":["*.example.com"],"path":{"type":"prefix","value":"/"},"methods":[],"headers":[],"query":[]}"#,
        );
        let exact = m(
            r#"{"hosts":["api.example.com"],"path":{"type":"prefix","value":"/"},"methods":["GET"],"headers":[{"name":"x-canary","value":{"type":"exact","value":"1"}}],"query":[{"name":"beta","value":{"type":"present"}}]}"#,
        );
        let headers = http::HeaderMap::new();
        let view = |host, path, q| RequestView {
            host,
            path,
            method: &Method::GET,
            headers: &headers,
            query: q,
        };
        assert!(wildcard.matches(&view(Some("a.example.com"), "/", None)));
        assert!(!wildcard.matches(&view(Some("example.com"), "/", None)));
        assert!(
            !exact.matches(&view(Some("api.example.com"), "/", Some("beta=1"))),
            "header missing"
        );
        let mut h2 = http::HeaderMap::new();
        h2.insert("x-canary", HeaderValue::from_static("1"));
        let v = RequestView {
            host: Some("api.example.com"),
            path: "/x",
            method: &Method::GET,
            headers: &h2,
            query: Some("a=1&beta"),
        };
        assert!(exact.matches(&v));
        assert!(exact.rank() > wildcard.rank());
        let re = m(
            r#"{"hosts":[],"path":{"type":"regex","value":"^/v[0-9]+/x$"},"methods":[],"headers":[],"query":[]}"#,
        );
        let pre = m(
            r#"{"hosts":[],"path":{"type":"prefix","value":"/v1"},"methods":[],"headers":[],"query":[]}"#,
        );
        let ex = m(
            r#"{"hosts":[],"path":{"type":"exact","value":"/v1/x"},"methods":[],"headers":[],"query":[]}"#,
        );
        assert!(ex.rank() > re.rank() && re.rank() > pre.rank());
        assert!(re.matches(&view(None, "/v12/x", None)));
    }

    #[test]
    fn the_host_index_finds_what_a_scan_in_precedence_order_finds() {
        let metrics = gantry_telemetry::Metrics::new();
        let gm = crate::metrics::GatewayMetrics::new(&metrics);
        let specs = [
            (r#"["a.example.com"]"#, "/"),
            (r#"["*.example.com"]"#, "/api"),
            (r#"["b.example.com", "*.example.org"]"#, "/"),
            (r#"["a.example.com"]"#, "/api/v1"),
            ("[]", "/api"),
            ("[]", "/"),
            (r#"["*.b.example.com"]"#, "/"),
        ];
        let mut routes: Vec<CompiledRoute> = specs
            .iter()
            .enumerate()
            .map(|(i, (hosts, prefix))| {
                let json = format!(
                    r#"{{"hosts":{hosts},"path":{{"type":"prefix","value":"{prefix}"}},"methods":[],"headers":[],"query":[]}}"#
                );
                let rm: gantry_model::RouteMatch = serde_json::from_str(&json).unwrap();
                CompiledRoute {
                    id: format!("r{i}").into(),
                    service: "s".into(),
                    matcher: Matcher::compile(&rm).unwrap(),
                    action: Action::Redirect(gantry_model::Redirect {
                        scheme: None,
                        host: None,
                        port: None,
                        path: None,
                        prefix: None,
                        status: 302,
                    }),
                    metrics: gm.route(&format!("r{i}"), "s"),
                    order: i,
                }
            })
            .collect();
        sort_by_precedence(&mut routes);
        let table = RouteTable::new(routes);
        let headers = http::HeaderMap::new();
        for host in [
            None,
            Some("a.example.com"),
            Some("b.example.com"),
            Some("x.b.example.com"),
            Some("c.example.com"),
            Some("x.example.org"),
            Some("other"),
        ] {
            for path in ["/", "/api", "/api/v1/x", "/z"] {
                let v = RequestView {
                    host,
                    path,
                    method: &Method::GET,
                    headers: &headers,
                    query: None,
                };
                let scan = table
                    .routes
                    .iter()
                    .find(|c| c.matcher.matches(&v))
                    .map(|c| &c.id);
                assert_eq!(table.find(&v).map(|c| &c.id), scan, "{host:?} {path}");
            }
        }
    }

    #[test]
    fn path_regexes_match_the_whole_path() {
        for pattern in ["/v[0-9]+/items", "^/v[0-9]+/items$", "^/v[0-9]+/items"] {
            let m = Matcher::compile(&gantry_model::RouteMatch {
                hosts: vec![],
                path: PathMatch::Regex(pattern.into()),
                methods: vec![],
                headers: vec![],
                query: vec![],
            })
            .unwrap();
            assert!(m.path.matches("/v1/items"), "{pattern}");
            assert!(m.path.matches("/v22/items"), "{pattern}");
            assert!(!m.path.matches("/x/v1/items"), "{pattern}");
            assert!(!m.path.matches("/v1/items/y"), "{pattern}");
        }
    }

    #[test]
    fn regex_routes_check_their_literal_prefix_first() {
        for (pattern, prefix) in [
            ("^/reports/[0-9]+/v1$", "/reports/"),
            ("^/api/v2?/x", "/api/v"),
            ("^/ab+c", "/ab"),
            ("^/a{2}", "/"),
            ("/not/anchored", ""),
            ("^(/api)", ""),
            ("^/a|/b", ""),
            ("^/x\\.y", "/x"),
        ] {
            assert_eq!(required_prefix(pattern), prefix, "{pattern}");
            let re = compile_regex(pattern).unwrap();
            let m = PathMatcher::Regex(re.clone(), required_prefix(pattern));
            for path in [
                "/reports/1/v1",
                "/api/x",
                "/api/v2/x",
                "/abbc",
                "/aa",
                "/B",
                "/x.y",
                "/",
            ] {
                assert_eq!(m.matches(path), re.is_match(path), "{pattern} on {path}");
            }
        }
    }
}
