//! Per-route filters, compiled when the route table is built: a list of `Filter`s in phase
//! order (static dispatch: an enum, no boxing per request). `proxy.rs` runs each phase's slice
//! of the list at that phase's turn; what each filter does is here, one function per variant.
//!
//! Adding a filter is one variant (with its phase in `Filter::phase`), its compile arm in
//! `inputs.rs`, its arm in the phase that runs it (`proxy.rs`), and its tests.

use std::ops::Range;
use std::sync::Arc;

use gantry_model::RateLimitKey;
use http::header::{self, HeaderMap, HeaderName, HeaderValue};
use http::uri::PathAndQuery;
use http::{Request, Response, StatusCode, Uri};
use regex::Regex;

use crate::body::RespBody;
use crate::context::{
    set_request_id, strip_port, Ctx, RATELIMIT_LIMIT, RATELIMIT_REMAINING, RATELIMIT_RESET,
};
use crate::endpoints::EndpointSet;
use crate::ratelimit::{Decision, Limiter};
use crate::table::{CompiledRoute, PathMatcher};

/// The phases a forwarded request passes after routing, in order (admit and route come
/// before, for every request; respond's filters edit the instance's response).
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub(crate) enum Phase {
    /// May the request go at all: authentication and the call policy, rate limit, body size.
    Policy,
    /// Which instances: a version from a header or a path segment (else the route's split).
    Target,
    /// A fresh cached answer ends the request here.
    Cache,
    /// The request the instance gets: path rewrite, header changes, a copy to a mirror.
    Upstream,
    /// The response the client gets: header changes, redirects pointed back under the prefix.
    Respond,
}

/// One step of a route's pipeline.
pub(crate) enum Filter {
    /// Credentials, the route's requirement and the service-to-service policy (every forwarding
    /// route has one; it does nothing when the route reads no credentials and the policy is
    /// `allow`).
    Auth(Box<crate::auth::RouteAuthFilter>),
    /// 429 beyond the route's rate, per key (client address, a header, or the whole route).
    RateLimit {
        limiter: Arc<Limiter>,
        key: RateLimitKey,
    },
    /// 413 for a request whose declared body is larger (a streamed body is cut as it passes).
    BodyLimit(u64),
    /// A request header with a semver requirement chooses the version.
    VersionHeader(HeaderName),
    /// A first path segment `v<major>` (after the route's prefix) chooses the major version
    /// and is removed.
    VersionPath,
    /// The response cache (RFC 9111 subset): fresh hits answer here, stale ones revalidate.
    Cache(gantry_model::CachePolicy),
    /// The path the instance gets.
    Rewrite(PathRewrite),
    /// Configured request header changes (after the gateway's own headers, which they may
    /// override).
    RequestHeaders(CompiledHeaderOps),
    /// A copy of a share of the requests to a shadow target.
    Mirror(Mirror),
    /// Configured response header changes.
    ResponseHeaders(CompiledHeaderOps),
    /// A redirect from behind a stripped or replaced prefix points back under the route's
    /// prefix (nginx's `proxy_redirect default`).
    RedirectRewrite(LocationRewrite),
}

impl Filter {
    pub(crate) fn phase(&self) -> Phase {
        match self {
            Filter::Auth(_) | Filter::RateLimit { .. } | Filter::BodyLimit(_) => Phase::Policy,
            Filter::VersionHeader(_) | Filter::VersionPath => Phase::Target,
            Filter::Cache(_) => Phase::Cache,
            Filter::Rewrite(_) | Filter::RequestHeaders(_) | Filter::Mirror(_) => Phase::Upstream,
            Filter::ResponseHeaders(_) | Filter::RedirectRewrite(_) => Phase::Respond,
        }
    }
}

/// A route's filters in phase order, with each phase's slice and what the fast paths need to
/// know about them.
pub(crate) struct Filters {
    list: Box<[Filter]>,
    ranges: [Range<usize>; 5],
    /// The response's head must be read into a map (header changes, a cache, redirects to
    /// rewrite), rather than go to the client as the instance sent it.
    pub reads_response_head: bool,
    pub cache: Option<gantry_model::CachePolicy>,
    /// The path rewrite (also what the cache and redirects need to know).
    pub rewrite: Option<usize>,
}

impl Filters {
    pub(crate) fn new(mut list: Vec<Filter>) -> Self {
        list.sort_by_key(Filter::phase);
        let mut ranges: [Range<usize>; 5] = Default::default();
        for (p, r) in ranges.iter_mut().enumerate() {
            let start = list
                .iter()
                .position(|f| f.phase() as usize >= p)
                .unwrap_or(list.len());
            let end = list
                .iter()
                .position(|f| f.phase() as usize > p)
                .unwrap_or(list.len());
            *r = start..end;
        }
        let cache = list.iter().find_map(|f| match f {
            Filter::Cache(c) => Some(c.clone()),
            _ => None,
        });
        let reads_response_head = cache.is_some()
            || list
                .iter()
                .any(|f| matches!(f, Filter::ResponseHeaders(_) | Filter::RedirectRewrite(_)));
        let rewrite = list.iter().position(|f| matches!(f, Filter::Rewrite(_)));
        Self {
            list: list.into_boxed_slice(),
            ranges,
            reads_response_head,
            cache,
            rewrite,
        }
    }

    /// The filters of one phase, in order.
    pub(crate) fn phase(&self, p: Phase) -> &[Filter] {
        &self.list[self.ranges[p as usize].clone()]
    }

    #[cfg(test)]
    pub(crate) fn all(&self) -> &[Filter] {
        &self.list
    }

    pub(crate) fn rewrite(&self) -> &PathRewrite {
        match self.rewrite.map(|i| &self.list[i]) {
            Some(Filter::Rewrite(r)) => r,
            _ => &PathRewrite::None,
        }
    }
}

// ---------------------------------------------------------------------------------------------
// Policy

/// Take a token for this request; the refusal's headers when there is none.
pub(crate) fn rate_limit(
    limiter: &Limiter,
    key: &RateLimitKey,
    headers: &HeaderMap,
    peer: std::net::SocketAddr,
    now_ms: u64,
    who: Option<&gantry_authn::Identity>,
) -> Result<(), Decision> {
    let ip;
    let k: &[u8] = match key {
        // Anonymous callers are keyed by address (a leading NUL keeps the kinds apart).
        RateLimitKey::Subject | RateLimitKey::Client => {
            let id = who.map(|w| match key {
                RateLimitKey::Client => w.client_id.as_deref().unwrap_or(&w.subject),
                _ => w.subject.as_str(),
            });
            match id {
                Some(s) => s.as_bytes(),
                None => {
                    ip = format!("\0{}", peer.ip());
                    ip.as_bytes()
                }
            }
        }
        RateLimitKey::ClientIp => {
            ip = peer.ip().to_string();
            ip.as_bytes()
        }
        RateLimitKey::Route => b"",
        RateLimitKey::Header(h) => match headers.get(h.as_str()) {
            Some(v) => v.as_bytes(),
            // Without the header, the client's address is the key (as Kong falls back to the
            // IP): clients that omit it do not share one bucket, and cannot drain the bucket of
            // those that send it. A leading NUL keeps the two kinds of keys apart.
            None => {
                ip = format!("\0{}", peer.ip());
                ip.as_bytes()
            }
        },
    };
    let d = limiter.check(k, now_ms);
    if d.allowed {
        Ok(())
    } else {
        Err(d)
    }
}

/// The `Retry-After` and `RateLimit-*` headers of a 429.
pub(crate) fn rate_limit_headers(h: &mut HeaderMap, d: &Decision) {
    h.insert(header::RETRY_AFTER, HeaderValue::from(d.retry_after_secs));
    h.insert(RATELIMIT_LIMIT.clone(), HeaderValue::from(d.limit));
    h.insert(RATELIMIT_REMAINING.clone(), HeaderValue::from(d.remaining));
    h.insert(RATELIMIT_RESET.clone(), HeaderValue::from(d.reset_secs));
}

/// The body's size as declared (exact, else its upper bound), against the limit.
pub(crate) fn body_too_large(hint: http_body::SizeHint, max: u64) -> bool {
    hint.exact()
        .or_else(|| hint.upper())
        .is_some_and(|n| n > max)
}

// ---------------------------------------------------------------------------------------------
// Target

/// Instances a header or path chose, and the label the cache keys on.
pub(crate) type Selected = Box<(EndpointSet, String)>;

pub(crate) fn filter_versions(all: &EndpointSet, req: &semver::VersionReq) -> EndpointSet {
    EndpointSet::new(
        all.service.clone(),
        all.endpoints
            .iter()
            .filter(|e| req.matches(&e.version))
            .cloned()
            .collect(),
    )
}

/// The version a header asks for: `None` without the header, `Err` when it is not a semver
/// requirement.
pub(crate) fn version_from_header(
    name: &HeaderName,
    headers: &HeaderMap,
    all: &EndpointSet,
) -> Option<Result<Selected, &'static str>> {
    let v = headers.get(name).and_then(|v| v.to_str().ok())?;
    Some(match semver::VersionReq::parse(v.trim()) {
        Ok(r) => Ok(Box::new((filter_versions(all, &r), v.trim().to_string()))),
        Err(_) => Err("the version header is not a semver requirement (e.g. ^2 or 1.4)"),
    })
}

/// The major version a first path segment `v<N>` after the route's prefix asks for, and the
/// path without that segment.
pub(crate) fn version_from_path(
    route: &CompiledRoute,
    path: &str,
    all: &EndpointSet,
) -> Option<(Selected, String)> {
    let prefix = match &route.matcher.path {
        PathMatcher::Prefix(p) if p != "/" => p.as_str(),
        _ => "",
    };
    let after = &path[prefix.len().min(path.len())..];
    let seg = after
        .trim_start_matches('/')
        .split('/')
        .next()
        .unwrap_or("");
    let major = seg.strip_prefix('v').and_then(|m| m.parse::<u64>().ok())?;
    let r = semver::VersionReq::parse(&major.to_string()).ok()?;
    let cut = prefix.len() + 1 + seg.len();
    let mut rest = format!("{prefix}{}", &path[cut.min(path.len())..]);
    if rest.is_empty() {
        rest.push('/');
    }
    Some((
        Box::new((filter_versions(all, &r), format!("v{major}"))),
        rest,
    ))
}

// ---------------------------------------------------------------------------------------------
// Upstream

pub(crate) struct CompiledHeaderOps {
    pub remove: Vec<HeaderName>,
    pub set: Vec<(HeaderName, HeaderValue)>,
    pub add: Vec<(HeaderName, HeaderValue)>,
}

impl CompiledHeaderOps {
    pub(crate) fn compile(o: &gantry_model::HeaderOps) -> Self {
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

    pub(crate) fn apply(&self, h: &mut HeaderMap) {
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

pub(crate) enum PathRewrite {
    None,
    Strip,
    Replace(String),
    Regex(Regex, String),
}

impl PathRewrite {
    /// The prefix the instance sees in place of the route's, for strip and replace rewrites:
    /// `Some("")` when stripped.
    pub(crate) fn upstream_prefix(&self) -> Option<&str> {
        match self {
            PathRewrite::Strip => Some(""),
            PathRewrite::Replace(p) => Some(p.trim_end_matches('/')),
            PathRewrite::None | PathRewrite::Regex(..) => None,
        }
    }
}

/// Where a route's shadow copies go.
pub(crate) struct Mirror {
    /// The shadow's target (an index into the snapshot's targets).
    pub target: u32,
    /// Share of requests copied, 0-100.
    pub percent: f64,
    pub metrics: crate::metrics::MirrorMetrics,
}

/// Path and query to send upstream after the route's rewrite; `None` when the result is not a
/// valid path.
pub(crate) fn rewrite_path(
    route: &CompiledRoute,
    rewrite: &PathRewrite,
    normalized: Option<&str>,
    uri: &Uri,
) -> Option<PathAndQuery> {
    let path = normalized.unwrap_or(uri.path());
    let prefix = match &route.matcher.path {
        PathMatcher::Prefix(p) => p.as_str(),
        _ => "",
    };
    let new_path: Option<String> = match rewrite {
        PathRewrite::None => normalized.map(str::to_string),
        PathRewrite::Strip => {
            let rest = if prefix == "/" {
                path
            } else {
                path.strip_prefix(prefix).unwrap_or(path)
            };
            Some(if rest.is_empty() {
                "/".to_string()
            } else {
                rest.to_string()
            })
        }
        PathRewrite::Replace(p) => {
            let rest = if prefix == "/" {
                path
            } else {
                path.strip_prefix(prefix).unwrap_or(path)
            };
            // The bare prefix becomes the replacement itself (`/api` → `/internal/api`, as
            // Envoy's `prefix_rewrite` does); a replacement of "/" keeps its slash.
            let mut s = p.trim_end_matches('/').to_string();
            if (rest.is_empty() && s.is_empty()) || (!rest.is_empty() && !rest.starts_with('/')) {
                s.push('/');
            }
            s.push_str(rest);
            Some(s)
        }
        PathRewrite::Regex(re, rep) => Some(re.replace(path, rep.as_str()).into_owned()),
    };
    match new_path {
        None => uri
            .path_and_query()
            .cloned()
            .or_else(|| Some(PathAndQuery::from_static("/"))),
        Some(p) => {
            let s = match uri.query() {
                Some(q) => format!("{p}?{q}"),
                None => p,
            };
            PathAndQuery::try_from(s).ok()
        }
    }
}

// ---------------------------------------------------------------------------------------------
// Respond

/// How a route that strips or replaces its prefix points an instance's redirects back under it.
pub(crate) struct LocationRewrite {
    /// The route's prefix, as clients see it (`/hb`).
    pub public: String,
    /// What the instance sees in its place: `""` when stripped, the replacement otherwise.
    pub upstream: String,
}

impl LocationRewrite {
    /// The `Location` an instance sent, as the client must follow it; `None` to leave it.
    /// Rewritten: a path (`/next`), or an absolute URL whose authority is the one the client
    /// asked for or the instance's own address (which means nothing to the client, and is not
    /// for it to see: the client's scheme and authority take its place, whatever the path).
    /// Left alone: relative references (they resolve under the client's URL already), other
    /// hosts, paths outside the replaced prefix, and paths already under the route's prefix
    /// (an application that honours `X-Forwarded-Prefix`). `client_scheme`: `http` or `https`.
    pub(crate) fn rewrite(
        &self,
        location: &str,
        client_scheme: &str,
        client_authority: Option<&str>,
        instance_authority: &str,
    ) -> Option<String> {
        let (origin, path) = if location.starts_with('/') && !location.starts_with("//") {
            ("", location)
        } else {
            let after_scheme = location
                .strip_prefix("http://")
                .or_else(|| location.strip_prefix("https://"))
                .or_else(|| location.strip_prefix("//"))?;
            let slash = after_scheme.find('/').unwrap_or(after_scheme.len());
            let authority = &after_scheme[..slash];
            let ours = client_authority.is_some_and(|c| c.eq_ignore_ascii_case(authority))
                || authority == instance_authority;
            if !ours {
                return None;
            }
            let origin_len = location.len() - after_scheme.len() + slash;
            let origin = if authority == instance_authority {
                let path = &after_scheme[slash..];
                let p = self
                    .path_under(path)
                    .unwrap_or_else(|| if path.is_empty() { "/" } else { path }.to_string());
                return Some(match client_authority {
                    Some(c) => format!("{client_scheme}://{c}{p}"),
                    None => p,
                });
            } else {
                &location[..origin_len]
            };
            (origin, &after_scheme[slash..])
        };
        let p = self.path_under(if path.is_empty() { "/" } else { path })?;
        Some(format!("{origin}{p}"))
    }

    /// `path` as the instance sent it, moved under the route's prefix.
    fn path_under(&self, path: &str) -> Option<String> {
        let path = if path.is_empty() { "/" } else { path };
        let segment_prefix = |prefix: &str, p: &str| {
            p.strip_prefix(prefix)
                .is_some_and(|rest| rest.is_empty() || rest.starts_with(['/', '?', '#']))
        };
        if self.upstream.is_empty() {
            if self.public == "/" || segment_prefix(&self.public, path) {
                return None;
            }
            return Some(format!("{}{path}", self.public));
        }
        if !segment_prefix(&self.upstream, path) {
            return None;
        }
        let rest = &path[self.upstream.len()..];
        let public = if self.public == "/" { "" } else { &self.public };
        Some(if rest.is_empty() {
            format!("{public}/")
        } else {
            format!("{public}{rest}")
        })
    }
}

/// A redirect route's answer: the request's URL with the parts the route replaces.
pub(crate) fn redirect<B>(
    r: &gantry_model::Redirect,
    route: &CompiledRoute,
    req: &Request<B>,
    tls: bool,
    cx: &Ctx,
) -> Response<RespBody> {
    let scheme = r
        .scheme
        .clone()
        .unwrap_or_else(|| if tls { "https".into() } else { "http".into() });
    // Keep the client's authority (host and port) unless the route replaces them.
    let default_port = if scheme == "https" { 443 } else { 80 };
    let port = r
        .port
        .filter(|p| *p != default_port)
        .map(|p| format!(":{p}"));
    let authority = match (&r.host, port) {
        (Some(h), p) => format!("{h}{}", p.unwrap_or_default()),
        (None, p) => {
            let given = req
                .uri()
                .authority()
                .map(|a| a.as_str().to_string())
                .or_else(|| {
                    req.headers()
                        .get(header::HOST)
                        .and_then(|h| h.to_str().ok())
                        .map(str::to_string)
                })
                .or_else(|| cx.host.as_deref().map(str::to_string))
                .unwrap_or_else(|| "localhost".into());
            match (p, r.port) {
                (Some(p), _) => format!("{}{p}", strip_port(&given)),
                (None, Some(_)) => strip_port(&given).to_string(),
                (None, None) => given,
            }
        }
    };
    let path = cx.path(req);
    let new_path = if let Some(p) = &r.path {
        p.clone()
    } else if let (Some(np), PathMatcher::Prefix(prefix)) = (&r.prefix, &route.matcher.path) {
        let rest = if prefix == "/" {
            path
        } else {
            path.strip_prefix(prefix.as_str()).unwrap_or(path)
        };
        format!(
            "{}{}",
            np.trim_end_matches('/'),
            if rest.is_empty() { "/" } else { rest }
        )
    } else {
        path.to_string()
    };
    let query = req
        .uri()
        .query()
        .map(|q| format!("?{q}"))
        .unwrap_or_default();
    let location = format!("{scheme}://{authority}{new_path}{query}");
    let mut resp = Response::new(RespBody::empty());
    *resp.status_mut() = StatusCode::from_u16(r.status).unwrap_or(StatusCode::FOUND);
    if let Ok(v) = HeaderValue::from_str(&location) {
        resp.headers_mut().insert(header::LOCATION, v);
    }
    set_request_id(resp.headers_mut(), &cx.request_id);
    resp
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;

    #[test]
    fn filters_run_in_phase_order_whatever_the_order_they_were_given() {
        let f = Filters::new(vec![
            Filter::ResponseHeaders(CompiledHeaderOps::compile(&Default::default())),
            Filter::Rewrite(PathRewrite::Strip),
            Filter::BodyLimit(10),
            Filter::VersionPath,
            Filter::Cache(gantry_model::CachePolicy {
                max_object_bytes: 1,
            }),
        ]);
        let phases: Vec<Phase> = f.all().iter().map(Filter::phase).collect();
        assert_eq!(
            phases,
            [
                Phase::Policy,
                Phase::Target,
                Phase::Cache,
                Phase::Upstream,
                Phase::Respond
            ]
        );
        assert!(matches!(f.phase(Phase::Policy), [Filter::BodyLimit(10)]));
        assert!(matches!(f.phase(Phase::Upstream), [Filter::Rewrite(_)]));
        assert!(f.reads_response_head);
        assert!(matches!(f.rewrite(), PathRewrite::Strip));
        let none = Filters::new(vec![]);
        assert!(none.phase(Phase::Respond).is_empty());
        assert!(!none.reads_response_head);
        assert!(matches!(none.rewrite(), PathRewrite::None));
    }

    #[test]
    fn redirects_from_behind_a_stripped_prefix_point_back_under_it() {
        let strip = LocationRewrite {
            public: "/hb".into(),
            upstream: String::new(),
        };
        let gw = Some("gw.example:8080");
        let inst = "127.0.0.1:4001";
        for (loc, want) in [
            ("/next", Some("/hb/next")),
            ("/", Some("/hb/")),
            ("/next?a=1", Some("/hb/next?a=1")),
            (
                "http://gw.example:8080/next",
                Some("http://gw.example:8080/hb/next"),
            ),
            (
                "https://GW.example:8080/n",
                Some("https://GW.example:8080/hb/n"),
            ),
            ("http://gw.example:8080", Some("http://gw.example:8080/hb/")),
            // The instance's own address: the client's scheme and authority take its place,
            // even where the path stays as it is.
            (
                "http://127.0.0.1:4001/next",
                Some("https://gw.example:8080/hb/next"),
            ),
            (
                "http://127.0.0.1:4001/hb/x?y=1",
                Some("https://gw.example:8080/hb/x?y=1"),
            ),
            ("http://127.0.0.1:4001", Some("https://gw.example:8080/hb/")),
            // Left alone: other hosts, relative references, paths already under the prefix.
            ("http://other.example/next", None),
            ("next", None),
            ("../up", None),
            ("/hb/already", None),
            ("/hb", None),
        ] {
            assert_eq!(
                strip.rewrite(loc, "https", gw, inst).as_deref(),
                want,
                "{loc}"
            );
        }
        // A replaced prefix: only what is under the replacement moves back.
        let replace = LocationRewrite {
            public: "/api".into(),
            upstream: "/v2".into(),
        };
        assert_eq!(
            replace.rewrite("/v2/items/7", "http", gw, inst).as_deref(),
            Some("/api/items/7")
        );
        let r = |loc| replace.rewrite(loc, "http", gw, inst);
        assert_eq!(r("/v2").as_deref(), Some("/api/"));
        assert_eq!(r("/v20/x"), None);
        assert_eq!(r("/elsewhere"), None);
        // Outside the replaced prefix, but on the instance's address: not left to leak.
        assert_eq!(
            r("http://127.0.0.1:4001/elsewhere").as_deref(),
            Some("http://gw.example:8080/elsewhere")
        );
    }

    #[test]
    fn body_limits_read_the_declared_size() {
        assert!(body_too_large(http_body::SizeHint::with_exact(11), 10));
        assert!(!body_too_large(http_body::SizeHint::with_exact(10), 10));
        // Chunked: no upper bound known, the body is cut as it streams instead.
        assert!(!body_too_large(http_body::SizeHint::new(), 10));
    }
}
