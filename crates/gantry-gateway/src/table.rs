//! The route table: an immutable snapshot the request path reads without locks, rebuilt as a
//! whole by the control side on every route or registry change.

use std::net::SocketAddr;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::Duration;

use gantry_model::{Health, Route};
use http::uri::Authority;

use crate::metrics::RouteMetrics;

/// Per-instance state that outlives table rebuilds (it is carried over by instance id).
#[derive(Debug)]
pub struct Endpoint {
    pub id: Arc<str>,
    pub addr: SocketAddr,
    pub authority: Authority,
    /// Requests sent to this instance whose response has not finished.
    pub inflight: AtomicUsize,
    /// Monotonic ms (see [`clock_ms`]) until which the instance is avoided after a transport
    /// error; 0 when not suspect.
    pub suspect_until_ms: AtomicU64,
}

impl Endpoint {
    pub fn new(id: Arc<str>, addr: SocketAddr) -> Option<Self> {
        let authority = Authority::try_from(addr.to_string()).ok()?;
        Some(Self {
            id,
            addr,
            authority,
            inflight: AtomicUsize::new(0),
            suspect_until_ms: AtomicU64::new(0),
        })
    }

    pub fn is_suspect(&self, now_ms: u64) -> bool {
        self.suspect_until_ms.load(Ordering::Relaxed) > now_ms
    }

    /// Avoid this instance for a while after a transport error; the registry removes it for good
    /// if it really went away.
    pub fn mark_suspect(&self, now_ms: u64) {
        self.suspect_until_ms
            .store(now_ms + SUSPECT_MS, Ordering::Relaxed);
    }
}

/// How long an instance that refused or reset a connection is skipped by load balancing.
pub const SUSPECT_MS: u64 = 2_000;

/// Milliseconds since the gateway's first use of the clock (monotonic).
pub fn clock_ms() -> u64 {
    use std::sync::OnceLock;
    static START: OnceLock<std::time::Instant> = OnceLock::new();
    let start = START.get_or_init(std::time::Instant::now);
    start.elapsed().as_millis() as u64
}

/// A service's healthy instances and its round-robin cursor (shared across rebuilds).
#[derive(Debug)]
pub struct Upstream {
    pub service: Arc<str>,
    pub endpoints: Vec<Arc<Endpoint>>,
    pub cursor: Arc<AtomicUsize>,
}

impl Upstream {
    /// Round robin over instances that are not suspect, skipping those in `tried`; when every
    /// instance is suspect, fall back to plain round robin over the untried ones.
    pub fn pick(&self, tried: &[usize], now_ms: u64) -> Option<(usize, &Arc<Endpoint>)> {
        let n = self.endpoints.len();
        if n == 0 || tried.len() >= n {
            return None;
        }
        let start = self.cursor.fetch_add(1, Ordering::Relaxed);
        let mut fallback = None;
        for k in 0..n {
            let i = (start + k) % n;
            if tried.contains(&i) {
                continue;
            }
            let ep = &self.endpoints[i];
            if !ep.is_suspect(now_ms) {
                return Some((i, ep));
            }
            if fallback.is_none() {
                fallback = Some((i, ep));
            }
        }
        fallback
    }
}

/// One route, ready for matching.
pub struct CompiledRoute {
    pub route: Route,
    pub upstream: Arc<Upstream>,
    pub metrics: RouteMetrics,
    pub timeout: Duration,
}

impl CompiledRoute {
    /// Host (already lowercased, port removed) and path match.
    pub fn matches(&self, host: Option<&str>, path: &str) -> bool {
        if let Some(h) = &self.route.host {
            if host != Some(h.as_str()) {
                return false;
            }
        }
        prefix_matches(&self.route.path_prefix, path)
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

/// The whole routing state at one moment.
pub struct RouteTable {
    /// Registry revision this table reflects.
    pub registry_revision: u64,
    /// Routes by precedence: host-specific before any-host, then longer prefixes first.
    pub routes: Vec<CompiledRoute>,
}

impl RouteTable {
    pub fn empty() -> Self {
        Self {
            registry_revision: 0,
            routes: Vec::new(),
        }
    }

    pub fn find(&self, host: Option<&str>, path: &str) -> Option<&CompiledRoute> {
        self.routes.iter().find(|r| r.matches(host, path))
    }
}

/// Order routes by precedence (stable for equal keys, i.e. spec order).
pub fn sort_by_precedence(routes: &mut [CompiledRoute]) {
    routes.sort_by(|a, b| {
        b.route
            .host
            .is_some()
            .cmp(&a.route.host.is_some())
            .then(b.route.path_prefix.len().cmp(&a.route.path_prefix.len()))
    });
}

/// Whether a registry instance can receive traffic.
pub fn routable(h: Health) -> bool {
    h == Health::Passing
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ep(id: &str, port: u16) -> Arc<Endpoint> {
        Arc::new(
            Endpoint::new(id.into(), SocketAddr::from(([127, 0, 0, 1], port)))
                .unwrap_or_else(|| unreachable!()),
        )
    }

    #[test]
    fn prefixes_match_whole_segments() {
        assert!(prefix_matches("/", "/anything"));
        assert!(prefix_matches("/api", "/api"));
        assert!(prefix_matches("/api", "/api/"));
        assert!(prefix_matches("/api", "/api/v1/x"));
        assert!(!prefix_matches("/api", "/apix"));
        assert!(!prefix_matches("/api", "/ap"));
    }

    #[test]
    fn round_robin_skips_suspects_and_tried() {
        let up = Upstream {
            service: "s".into(),
            endpoints: vec![ep("a", 1), ep("b", 2), ep("c", 3)],
            cursor: Arc::new(AtomicUsize::new(0)),
        };
        let picks: Vec<usize> = (0..6)
            .map(|_| up.pick(&[], 0).map(|p| p.0).unwrap_or(9))
            .collect();
        assert_eq!(picks, [0, 1, 2, 0, 1, 2]);
        up.endpoints[1].mark_suspect(100);
        let picks: Vec<usize> = (0..4)
            .map(|_| up.pick(&[], 100).map(|p| p.0).unwrap_or(9))
            .collect();
        assert!(!picks.contains(&1), "{picks:?}");
        // Suspicion wears off.
        assert!(!up.endpoints[1].is_suspect(100 + SUSPECT_MS));
        // Tried instances are skipped; all tried → none.
        assert_eq!(up.pick(&[0, 2], 100).map(|p| p.0), Some(1));
        assert!(up.pick(&[0, 1, 2], 100).is_none());
        // All suspect: still answers (fallback) rather than failing.
        for e in &up.endpoints {
            e.mark_suspect(100);
        }
        assert!(up.pick(&[], 100).is_some());
    }
}
