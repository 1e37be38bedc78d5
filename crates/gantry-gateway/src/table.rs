//! Routes and their matching: what the request path reads to find a request's route. Compiled
//! when routes change (rare): regexes, the host index and the filter lists are built here and
//! nowhere else; a registry change never recompiles a route.
//!
//! Precedence (first match wins, after sorting): host-specific routes before any-host routes
//! (exact hosts before wildcards, longer wildcards first); then exact paths, then regex paths,
//! then prefixes, longer first; then routes with methods; then more header conditions; then more
//! query conditions; then spec order.

use std::collections::HashMap;
use std::sync::Arc;
use std::time::Duration;

use gantry_model::{PathMatch, ValueMatch};
use http::header::HeaderName;
use http::Method;
use regex::Regex;

use crate::endpoints::BreakerScope;
use crate::filters::Filters;
use crate::metrics::RouteMetrics;
use crate::resilience::RetryBudget;

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

/// One weighted target of a forwarding route.
pub struct Backend {
    /// An index into the snapshot's targets (`inputs::Endpoints::sets`).
    pub target: u32,
    pub weight: u32,
    /// `service@version`: what the cache keys on.
    pub label: Box<str>,
    /// This route's circuit breaker for the target's service.
    pub breaker: Arc<BreakerScope>,
}

/// Where and how a forwarding route sends requests.
pub struct ForwardAction {
    /// Weighted targets (one for a plain route; several for blue/green or canary splits).
    pub backends: Vec<Backend>,
    /// In u64: the weights' sum may pass `u32::MAX` (the spec refuses that; the API may not).
    pub total_weight: u64,
    /// Every instance of the first backend's service, for versions chosen by a header or a
    /// path segment (a target index).
    pub all_versions: u32,
    /// The route's filters, in phase order.
    pub filters: Filters,
    pub request_timeout: Duration,
    pub per_try_timeout: Option<Duration>,
    pub idle_timeout: Duration,
    pub retry: gantry_model::RetryPolicy,
    pub budget: Arc<RetryBudget>,
    /// Largest request body: the streamed body is cut past it (`BodyLimit` refuses one that
    /// declares more).
    pub max_body_bytes: u64,
    /// Statuses that count as failures for the route's breakers, besides 502, 503 and 504.
    pub failure_statuses: Vec<u16>,
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
    #![allow(clippy::unwrap_used)]
    use super::*;

    #[test]
    fn prefixes_match_whole_segments() {
        assert!(prefix_matches("/", "/anything"));
        assert!(prefix_matches("/api", "/api"));
        assert!(prefix_matches("/api", "/api/v1/x"));
        assert!(!prefix_matches("/api", "/apix"));
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
        h2.insert("x-canary", http::HeaderValue::from_static("1"));
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
