//! The request path, as one pipeline. Every filter a request passes is here, in this order:
//!
//! 1. request id: keep a sane incoming `X-Request-Id`, else generate one;
//! 2. route: match host and path prefix against the current table (404 when nothing matches);
//! 3. upstream request: rewrite the path (strip prefix), drop hop-by-hop headers (RFC 9110
//!    §7.6.1), set `X-Forwarded-For/-Proto/-Host` and `X-Request-Id`;
//! 4. pick an instance: round robin over healthy, non-suspect instances (503 when none);
//! 5. send with the route's timeout (504 on timeout); on a transport error the instance is marked
//!    suspect and, if the request is idempotent and has no body, it goes to another instance;
//! 6. response: drop hop-by-hop headers, add `X-Request-Id`, stream the body back;
//! 7. record metrics and, if enabled, one access-log line.

use std::net::SocketAddr;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Instant;

use bytes::Bytes;
use http::header::{self, HeaderMap, HeaderName, HeaderValue};
use http::uri::{PathAndQuery, Scheme};
use http::{Method, Request, Response, StatusCode, Uri, Version};
use http_body::Body as _;
use http_body_util::{Either, Empty, Full};
use hyper::body::Incoming;

use crate::body::{InflightGuard, ResponseBody, UpstreamBody};
use crate::table::{clock_ms, CompiledRoute};
use crate::Gateway;

static X_REQUEST_ID: HeaderName = HeaderName::from_static("x-request-id");
static X_FORWARDED_FOR: HeaderName = HeaderName::from_static("x-forwarded-for");
static X_FORWARDED_PROTO: HeaderName = HeaderName::from_static("x-forwarded-proto");
static X_FORWARDED_HOST: HeaderName = HeaderName::from_static("x-forwarded-host");
static KEEP_ALIVE: HeaderName = HeaderName::from_static("keep-alive");
static PROXY_CONNECTION: HeaderName = HeaderName::from_static("proxy-connection");

/// Most attempts one request may take (first try plus retries on other instances).
const MAX_ATTEMPTS: usize = 3;

/// Request ids: a random per-process prefix and a counter, 32 hex digits.
pub(crate) struct RequestIds {
    prefix: u64,
    next: AtomicU64,
}

impl RequestIds {
    pub(crate) fn new() -> Self {
        let mut b = [0u8; 8];
        let prefix = match getrandom::fill(&mut b) {
            Ok(()) => u64::from_le_bytes(b),
            Err(_) => std::time::SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)
                .map(|d| d.as_nanos() as u64)
                .unwrap_or(0x6761_6e74_7279),
        };
        Self {
            prefix,
            next: AtomicU64::new(1),
        }
    }

    fn next(&self) -> HeaderValue {
        let n = self.next.fetch_add(1, Ordering::Relaxed);
        let s = format!("{:016x}{:016x}", self.prefix, n);
        HeaderValue::from_str(&s).unwrap_or_else(|_| HeaderValue::from_static("0"))
    }
}

/// Why the gateway answered a request itself.
#[derive(Clone, Copy, Debug)]
enum Reject {
    NoRoute,
    NoInstance,
    UpstreamError,
    UpstreamTimeout,
    BadRequest(&'static str),
}

impl Reject {
    fn status(self) -> StatusCode {
        match self {
            Reject::NoRoute => StatusCode::NOT_FOUND,
            Reject::NoInstance => StatusCode::SERVICE_UNAVAILABLE,
            Reject::UpstreamError => StatusCode::BAD_GATEWAY,
            Reject::UpstreamTimeout => StatusCode::GATEWAY_TIMEOUT,
            Reject::BadRequest(_) => StatusCode::BAD_REQUEST,
        }
    }

    fn code(self) -> &'static str {
        match self {
            Reject::NoRoute => "no_route",
            Reject::NoInstance => "no_healthy_instance",
            Reject::UpstreamError => "upstream_unavailable",
            Reject::UpstreamTimeout => "upstream_timeout",
            Reject::BadRequest(_) => "bad_request",
        }
    }
}

impl Gateway {
    pub(crate) async fn handle(
        &self,
        req: Request<Incoming>,
        peer: SocketAddr,
    ) -> Response<ResponseBody> {
        let start = Instant::now();
        // 1. request id
        let request_id = match req.headers().get(&X_REQUEST_ID) {
            Some(v) if is_sane_request_id(v) => v.clone(),
            _ => self.ids.next(),
        };
        let method = req.method().clone();
        let path_for_log = self.cfg.access_log.then(|| req.uri().path().to_string());

        // 2. route
        let table = self.table.load_full();
        let host = request_host(&req);
        let route = match req.uri().path() {
            p if p.starts_with('/') => table.find(host.as_deref(), p),
            _ => None,
        };
        let (resp, upstream_id) = match route {
            None => {
                let why = if req.uri().path().starts_with('/') {
                    Reject::NoRoute
                } else {
                    Reject::BadRequest("request target must be an absolute path")
                };
                let r = self.reject(why, None, &request_id, host.as_deref(), req.uri().path());
                self.no_route
                    .record(r.status().as_u16(), start.elapsed().as_secs_f64());
                (r, None)
            }
            Some(route) => {
                let (r, up) = self.forward(route, req, peer, host, &request_id).await;
                route
                    .metrics
                    .record(r.status().as_u16(), start.elapsed().as_secs_f64());
                (r, up)
            }
        };

        // 7. access log
        if let Some(path) = path_for_log {
            tracing::info!(
                target: "gantry::access",
                request_id = request_id.to_str().unwrap_or(""),
                method = %method,
                path = %path,
                route = route.map(|r| r.route.id.as_str()).unwrap_or("none"),
                upstream = upstream_id.as_deref().unwrap_or(""),
                status = resp.status().as_u16(),
                duration_us = start.elapsed().as_micros() as u64,
                client = %peer.ip(),
            );
        }
        resp
    }

    async fn forward(
        &self,
        route: &CompiledRoute,
        req: Request<Incoming>,
        peer: SocketAddr,
        host: Option<String>,
        request_id: &HeaderValue,
    ) -> (Response<ResponseBody>, Option<String>) {
        let (parts, body) = req.into_parts();
        let path_and_query = match upstream_path(route, &parts.uri) {
            Some(pq) => pq,
            None => {
                let r = Reject::BadRequest("request path cannot be rewritten for the upstream");
                return (
                    self.reject(
                        r,
                        Some(&route.route.service),
                        request_id,
                        host.as_deref(),
                        parts.uri.path(),
                    ),
                    None,
                );
            }
        };

        // 3. upstream request headers
        let mut headers = parts.headers;
        remove_hop_by_hop(&mut headers);
        append_forwarded_for(&mut headers, peer);
        headers.insert(X_FORWARDED_PROTO.clone(), HeaderValue::from_static("http"));
        if let Some(h) = parts
            .uri
            .authority()
            .and_then(|a| HeaderValue::from_str(a.as_str()).ok())
            .or_else(|| headers.get(header::HOST).cloned())
        {
            headers.insert(X_FORWARDED_HOST.clone(), h);
        }
        headers.insert(X_REQUEST_ID.clone(), request_id.clone());

        // A request can go to another instance after a transport error only if sending it again
        // is safe (idempotent method) and possible (no body to replay).
        let replayable = body.is_end_stream() && is_idempotent(&parts.method);
        let mut body = Some(body);
        let upstream = &route.upstream;
        let mut tried: Vec<usize> = Vec::new();
        loop {
            // 4. pick an instance
            let now = clock_ms();
            let Some((idx, ep)) = upstream.pick(&tried, now) else {
                let why = if tried.is_empty() {
                    Reject::NoInstance
                } else {
                    Reject::UpstreamError
                };
                return (
                    self.reject(
                        why,
                        Some(&upstream.service),
                        request_id,
                        host.as_deref(),
                        parts.uri.path(),
                    ),
                    None,
                );
            };
            tried.push(idx);
            let last_try = !replayable || tried.len() >= MAX_ATTEMPTS.min(upstream.endpoints.len());
            let uri = Uri::from_parts({
                let mut p = http::uri::Parts::default();
                p.scheme = Some(Scheme::HTTP);
                p.authority = Some(ep.authority.clone());
                p.path_and_query = Some(path_and_query.clone());
                p
            });
            let Ok(uri) = uri else {
                return (
                    self.reject(
                        Reject::UpstreamError,
                        Some(&upstream.service),
                        request_id,
                        host.as_deref(),
                        parts.uri.path(),
                    ),
                    None,
                );
            };
            let up_body = match (replayable, body.take()) {
                (false, Some(b)) => Either::Left(b),
                _ => Either::Right(Empty::<Bytes>::new()),
            };
            let mut up_req = Request::new(up_body);
            *up_req.method_mut() = parts.method.clone();
            *up_req.uri_mut() = uri;
            *up_req.version_mut() = Version::HTTP_11;
            *up_req.headers_mut() = if last_try {
                std::mem::take(&mut headers)
            } else {
                headers.clone()
            };
            let guard = InflightGuard::new(ep.clone());

            // 5. send
            match tokio::time::timeout(route.timeout, self.client.request(up_req)).await {
                Ok(Ok(resp)) => {
                    // 6. response
                    let (mut rparts, rbody) = resp.into_parts();
                    remove_hop_by_hop(&mut rparts.headers);
                    rparts
                        .headers
                        .insert(X_REQUEST_ID.clone(), request_id.clone());
                    let body = Either::Left(UpstreamBody::new(rbody, guard));
                    return (Response::from_parts(rparts, body), Some(ep.id.to_string()));
                }
                Ok(Err(e)) => {
                    drop(guard);
                    route.metrics.upstream_errors.inc();
                    ep.mark_suspect(clock_ms());
                    tracing::debug!(instance = %ep.id, error = %e, "upstream attempt failed");
                    if last_try {
                        return (
                            self.reject(
                                Reject::UpstreamError,
                                Some(&upstream.service),
                                request_id,
                                host.as_deref(),
                                parts.uri.path(),
                            ),
                            Some(ep.id.to_string()),
                        );
                    }
                    route.metrics.retries.inc();
                }
                Err(_) => {
                    // Not retried: the instance may still be working on it.
                    return (
                        self.reject(
                            Reject::UpstreamTimeout,
                            Some(&upstream.service),
                            request_id,
                            host.as_deref(),
                            parts.uri.path(),
                        ),
                        Some(ep.id.to_string()),
                    );
                }
            }
        }
    }

    fn reject(
        &self,
        why: Reject,
        service: Option<&str>,
        request_id: &HeaderValue,
        host: Option<&str>,
        path: &str,
    ) -> Response<ResponseBody> {
        self.metrics.reject(why.code());
        let message = match why {
            Reject::NoRoute => format!(
                "no route matches host {} and path {path}",
                host.unwrap_or("(none)")
            ),
            Reject::NoInstance => {
                format!("service {} has no healthy instance", service.unwrap_or("?"))
            }
            Reject::UpstreamError => format!(
                "could not get a response from any instance of service {}",
                service.unwrap_or("?")
            ),
            Reject::UpstreamTimeout => format!(
                "service {} did not answer within the route's timeout",
                service.unwrap_or("?")
            ),
            Reject::BadRequest(m) => m.to_string(),
        };
        let body = serde_json::json!({
            "error": why.code(),
            "message": message,
            "service": service,
            "request_id": request_id.to_str().unwrap_or(""),
        });
        let mut resp = Response::new(Either::Right(Full::new(Bytes::from(body.to_string()))));
        *resp.status_mut() = why.status();
        let h = resp.headers_mut();
        h.insert(
            header::CONTENT_TYPE,
            HeaderValue::from_static("application/json"),
        );
        h.insert(X_REQUEST_ID.clone(), request_id.clone());
        if matches!(why, Reject::NoInstance) {
            h.insert(header::RETRY_AFTER, HeaderValue::from_static("1"));
        }
        resp
    }
}

fn is_idempotent(m: &Method) -> bool {
    matches!(
        *m,
        Method::GET | Method::HEAD | Method::OPTIONS | Method::TRACE | Method::PUT | Method::DELETE
    )
}

fn is_sane_request_id(v: &HeaderValue) -> bool {
    let b = v.as_bytes();
    !b.is_empty() && b.len() <= 128 && b.iter().all(|c| c.is_ascii_graphic())
}

/// The request's host, lowercased and without port: from an absolute-form target, else `Host`.
fn request_host<B>(req: &Request<B>) -> Option<String> {
    let raw = match req.uri().host() {
        Some(h) => h,
        None => {
            let h = req.headers().get(header::HOST)?.to_str().ok()?;
            strip_port(h)
        }
    };
    if raw.is_empty() {
        return None;
    }
    Some(raw.to_ascii_lowercase())
}

fn strip_port(h: &str) -> &str {
    if h.starts_with('[') {
        // [v6]:port
        return match h.find(']') {
            Some(i) => &h[..=i],
            None => h,
        };
    }
    match h.rsplit_once(':') {
        Some((host, port)) if port.bytes().all(|c| c.is_ascii_digit()) => host,
        _ => h,
    }
}

/// Path and query to send upstream, with the route prefix removed when asked.
fn upstream_path(route: &CompiledRoute, uri: &Uri) -> Option<PathAndQuery> {
    let pq = uri.path_and_query()?;
    if !route.route.strip_prefix {
        return Some(pq.clone());
    }
    let rest = uri
        .path()
        .strip_prefix(route.route.path_prefix.as_str())
        .unwrap_or(uri.path());
    let path = if rest.is_empty() { "/" } else { rest };
    let s = match uri.query() {
        Some(q) => format!("{path}?{q}"),
        None => path.to_string(),
    };
    PathAndQuery::try_from(s).ok()
}

/// RFC 9110 §7.6.1: remove `Connection` and every header it names, plus the standard
/// hop-by-hop headers.
fn remove_hop_by_hop(h: &mut HeaderMap) {
    let named: Vec<HeaderName> = h
        .get_all(header::CONNECTION)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(','))
        .filter_map(|t| HeaderName::from_bytes(t.trim().as_bytes()).ok())
        .collect();
    for n in named {
        h.remove(n);
    }
    for n in [
        &header::CONNECTION,
        &KEEP_ALIVE,
        &PROXY_CONNECTION,
        &header::TE,
        &header::TRAILER,
        &header::TRANSFER_ENCODING,
        &header::UPGRADE,
        &header::PROXY_AUTHENTICATE,
        &header::PROXY_AUTHORIZATION,
    ] {
        h.remove(n);
    }
}

fn append_forwarded_for(h: &mut HeaderMap, peer: SocketAddr) {
    let ip = peer.ip().to_string();
    let value = match h.get(&X_FORWARDED_FOR).and_then(|v| v.to_str().ok()) {
        Some(prev) if !prev.trim().is_empty() => format!("{prev}, {ip}"),
        _ => ip,
    };
    if let Ok(v) = HeaderValue::from_str(&value) {
        h.insert(X_FORWARDED_FOR.clone(), v);
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;

    #[test]
    fn hop_by_hop_headers_go() {
        let mut h = HeaderMap::new();
        h.insert(
            header::CONNECTION,
            HeaderValue::from_static("keep-alive, x-secret"),
        );
        h.insert("x-secret", HeaderValue::from_static("1"));
        h.insert("keep-alive", HeaderValue::from_static("timeout=5"));
        h.insert(header::TE, HeaderValue::from_static("trailers"));
        h.insert(
            header::TRANSFER_ENCODING,
            HeaderValue::from_static("chunked"),
        );
        h.insert(header::UPGRADE, HeaderValue::from_static("websocket"));
        h.insert("x-keep", HeaderValue::from_static("1"));
        remove_hop_by_hop(&mut h);
        assert_eq!(h.len(), 1, "{h:?}");
        assert!(h.contains_key("x-keep"));
    }

    #[test]
    fn forwarded_for_appends() {
        let mut h = HeaderMap::new();
        let peer: SocketAddr = "10.0.0.9:5555".parse().unwrap();
        append_forwarded_for(&mut h, peer);
        assert_eq!(h[&X_FORWARDED_FOR], "10.0.0.9");
        h.insert(&X_FORWARDED_FOR, HeaderValue::from_static("1.2.3.4"));
        append_forwarded_for(&mut h, peer);
        assert_eq!(h[&X_FORWARDED_FOR], "1.2.3.4, 10.0.0.9");
    }

    #[test]
    fn hosts_lose_port_and_case() {
        assert_eq!(strip_port("Example.com:8080"), "Example.com");
        assert_eq!(strip_port("example.com"), "example.com");
        assert_eq!(strip_port("[::1]:80"), "[::1]");
        let req = Request::builder()
            .uri("/x")
            .header("host", "API.Example.com:80")
            .body(())
            .unwrap();
        assert_eq!(request_host(&req).as_deref(), Some("api.example.com"));
    }

    #[test]
    fn request_ids_are_unique_and_sane() {
        let ids = RequestIds::new();
        let a = ids.next();
        let b = ids.next();
        assert_ne!(a, b);
        assert!(is_sane_request_id(&a));
        assert_eq!(a.len(), 32);
        assert!(!is_sane_request_id(&HeaderValue::from_static("has space")));
    }
}
