//! Gateway parts of the spec: routes (`[[services.NAME.routes]]`), per-service upstream policy
//! (`[services.NAME.upstream]`), listener limits and TLS (`[gateway.limits]`, `[gateway.tls]`);
//! their checks, and their conversion to the resolved `gantry_model` types the gateway takes.
//!
//! Every default is written next to its field with the reason for the value.

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::path::PathBuf;

use gantry_model as m;
use serde::{Deserialize, Serialize};

use crate::types::{normalize_prefix, Spec};

// ---------------------------------------------------------------------------------------------
// [gateway.limits], [gateway.tls]

#[derive(Debug, Clone, Deserialize, Serialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct GatewayLimitsSpec {
    /// Open client connections; beyond it new ones are closed at once. Default 10000 (about what
    /// one process's default file-descriptor limit allows after upstream connections).
    #[serde(default = "d_max_connections")]
    pub max_connections: u32,
    /// Bytes of one request head (request line and headers). Default 16384: larger than any
    /// browser sends, small enough to bound memory per connection.
    #[serde(default = "d_max_header_bytes")]
    pub max_header_bytes: u32,
    /// Header lines in one request. Default 100 (as Envoy and Go's net/http).
    #[serde(default = "d_max_headers")]
    pub max_headers: u32,
    /// Time a client has to send a complete request head (slowloris). Default 10000.
    #[serde(default = "d_header_read_timeout_ms")]
    pub header_read_timeout_ms: u64,
    /// Time open requests get to finish when gantry stops. Default 10000.
    #[serde(default = "d_shutdown_grace_ms")]
    pub shutdown_grace_ms: u64,
}

fn d_max_connections() -> u32 {
    10_000
}
fn d_max_header_bytes() -> u32 {
    16 * 1024
}
fn d_max_headers() -> u32 {
    100
}
fn d_header_read_timeout_ms() -> u64 {
    10_000
}
fn d_shutdown_grace_ms() -> u64 {
    10_000
}

impl Default for GatewayLimitsSpec {
    fn default() -> Self {
        Self {
            max_connections: d_max_connections(),
            max_header_bytes: d_max_header_bytes(),
            max_headers: d_max_headers(),
            header_read_timeout_ms: d_header_read_timeout_ms(),
            shutdown_grace_ms: d_shutdown_grace_ms(),
        }
    }
}

/// `[gateway.tls]`: an HTTPS listener (HTTP/1.1 and HTTP/2 by ALPN).
#[derive(Debug, Clone, Deserialize, Serialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct TlsSpec {
    pub listen: SocketAddr,
    /// Certificates chosen by SNI; the first one also serves clients that send no (or an
    /// unknown) server name. Files are reloaded when they change.
    pub certificates: Vec<CertificateSpec>,
}

#[derive(Debug, Clone, Deserialize, Serialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct CertificateSpec {
    /// PEM certificate chain, relative to the spec's directory.
    pub cert: PathBuf,
    /// PEM private key (PKCS#8, PKCS#1 or SEC1).
    pub key: PathBuf,
    /// Server names this certificate answers: exact (`api.example.com`) or wildcard
    /// (`*.example.com`).
    pub hosts: Vec<String>,
}

// ---------------------------------------------------------------------------------------------
// [[services.NAME.routes]]

#[derive(Debug, Clone, Default, Deserialize, Serialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct RouteSpec {
    /// One host to match: exact or `*.example.com`. Default: any host.
    #[serde(default)]
    pub host: Option<String>,
    /// Several hosts (any of them).
    #[serde(default)]
    pub hosts: Vec<String>,
    /// Whole-segment path prefix (the default, `/`, when no path field is given).
    #[serde(default)]
    pub path_prefix: Option<String>,
    /// Exact path.
    #[serde(default)]
    pub path: Option<String>,
    /// Regular expression the whole path must match.
    #[serde(default)]
    pub path_regex: Option<String>,
    /// Methods to match, e.g. `["GET", "HEAD"]`. Default: any.
    #[serde(default)]
    pub methods: Vec<String>,
    /// Header conditions: `{ name = "x-canary", value = "1" }`, `{ name, regex }`, or `{ name }`
    /// for presence.
    #[serde(default)]
    pub headers: Vec<ConditionSpec>,
    /// Query parameter conditions, same shape as `headers`.
    #[serde(default)]
    pub query: Vec<ConditionSpec>,

    /// Remove the matched prefix before forwarding.
    #[serde(default)]
    pub strip_prefix: bool,
    /// Replace the matched prefix with this one.
    #[serde(default)]
    pub rewrite_prefix: Option<String>,
    /// Rewrite the path with a regex: `{ pattern = "^/old/(.*)", replacement = "/new/$1" }`.
    #[serde(default)]
    pub rewrite_regex: Option<RegexRewriteSpec>,
    /// With `strip_prefix` or `rewrite_prefix`: point the instance's redirects back under the
    /// route's prefix (a `Location: /next` from behind `/hb` becomes `/hb/next`, as nginx's
    /// `proxy_redirect default` does) and send `X-Forwarded-Prefix`. Default true: without it an
    /// application behind a stripped prefix sends its clients where no route leads.
    #[serde(default = "d_true")]
    pub rewrite_redirects: bool,
    /// Answer with a redirect instead of forwarding.
    #[serde(default)]
    pub redirect: Option<RedirectSpec>,

    /// Semver requirement on the target service's instances, e.g. `"^1.2"`. Default: any.
    #[serde(default)]
    pub version: Option<String>,
    /// Request header a client may send a semver requirement in (e.g. `accept-version`).
    #[serde(default)]
    pub version_header: Option<String>,
    /// A first path segment `v<major>` after the prefix selects that major version (and is
    /// removed).
    #[serde(default)]
    pub version_from_path: bool,
    /// Weighted split: `[{ version = "^1", weight = 90 }, { version = "^2", weight = 10 }]`;
    /// `service` defaults to this route's service.
    #[serde(default)]
    pub split: Vec<SplitSpec>,
    /// Shadow traffic: `{ version = "^2", percent = 10 }`.
    #[serde(default)]
    pub mirror: Option<MirrorSpec>,

    #[serde(default)]
    pub request_headers: HeaderOpsSpec,
    #[serde(default)]
    pub response_headers: HeaderOpsSpec,

    /// Whole request (all attempts) until response headers. Default 30000: long enough for slow
    /// APIs, short enough that a stuck instance frees the client.
    #[serde(default = "d_timeout_ms")]
    pub timeout_ms: u64,
    /// One attempt until response headers. Default: none (the whole timeout applies).
    #[serde(default)]
    pub per_try_timeout_ms: Option<u64>,
    /// Silence on an open response body or WebSocket before it is closed. Default 300000
    /// (Envoy's stream idle timeout): long polls and quiet sockets survive, dead ones do not.
    #[serde(default = "d_idle_timeout_ms")]
    pub idle_timeout_ms: u64,
    #[serde(default)]
    pub retries: RetrySpec,
    #[serde(default)]
    pub rate_limit: Option<RateLimitSpec>,
    /// Cache responses (RFC 9111 subset); `cache = {}` for defaults.
    #[serde(default)]
    pub cache: Option<CacheSpec>,
    /// Largest request body. Default 16 MiB (413 above); bodies stream, so this bounds abuse,
    /// not memory.
    #[serde(default = "d_max_body_bytes")]
    pub max_body_bytes: u64,
    /// Statuses from an instance that count as failures for this route's circuit breaker,
    /// besides what always counts: no connection, a reset, a timeout, 502, 503 and 504.
    /// Default none: a deliberate 500 from one endpoint (a bug, a test) must not cut the route
    /// off; list 500 here when it means the service is down. (Resilience4j counts every
    /// exception its caller records; Envoy's outlier detection counts 5xx per host, and its
    /// gateway-failure detector exactly these.)
    #[serde(default)]
    pub failure_statuses: Vec<u16>,

    /// `none` (default: credentials are not read), `optional` (a valid one is used, an invalid
    /// one refused) or `required` (401 without one).
    #[serde(default)]
    pub auth: Option<String>,
    /// Reachable from outside when `[identity] service_policy = "deny"` (otherwise only
    /// services allowed to call this route's service reach it).
    #[serde(default)]
    pub public: bool,
    /// Scopes the token must all have.
    #[serde(default)]
    pub scopes: Vec<String>,
    /// Roles of which the caller must have one.
    #[serde(default)]
    pub roles: Vec<String>,
    /// Claims the token must carry with these values: `claims = { tenant = "acme" }`.
    #[serde(default)]
    pub claims: BTreeMap<String, String>,
    /// Issuers accepted: `gantry` or the names of `[[identity.issuers]]`. Default: any trusted.
    #[serde(default)]
    pub issuers: Vec<String>,
    /// Audiences of which the token's `aud` must name one. Default: not checked.
    #[serde(default)]
    pub audiences: Vec<String>,
}

fn d_timeout_ms() -> u64 {
    30_000
}
fn d_idle_timeout_ms() -> u64 {
    300_000
}
fn d_max_body_bytes() -> u64 {
    16 << 20
}

#[derive(Debug, Clone, Deserialize, Serialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct ConditionSpec {
    pub name: String,
    #[serde(default)]
    pub value: Option<String>,
    #[serde(default)]
    pub regex: Option<String>,
}

#[derive(Debug, Clone, Deserialize, Serialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct RegexRewriteSpec {
    pub pattern: String,
    pub replacement: String,
}

#[derive(Debug, Clone, Deserialize, Serialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct RedirectSpec {
    #[serde(default)]
    pub scheme: Option<String>,
    #[serde(default)]
    pub host: Option<String>,
    #[serde(default)]
    pub port: Option<u16>,
    #[serde(default)]
    pub path: Option<String>,
    /// Replace the matched prefix (prefix routes).
    #[serde(default)]
    pub prefix: Option<String>,
    /// 301, 302, 303, 307 or 308. Default 302.
    #[serde(default = "d_redirect_status")]
    pub status: u16,
}

fn d_redirect_status() -> u16 {
    302
}

#[derive(Debug, Clone, Deserialize, Serialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct SplitSpec {
    #[serde(default)]
    pub service: Option<String>,
    #[serde(default)]
    pub version: Option<String>,
    pub weight: u32,
}

#[derive(Debug, Clone, Deserialize, Serialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct MirrorSpec {
    #[serde(default)]
    pub service: Option<String>,
    #[serde(default)]
    pub version: Option<String>,
    /// Share of requests copied, 0-100. Default 100.
    #[serde(default = "d_mirror_percent")]
    pub percent: f64,
}

fn d_mirror_percent() -> f64 {
    100.0
}

#[derive(Debug, Clone, Default, Deserialize, Serialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct HeaderOpsSpec {
    #[serde(default)]
    pub set: BTreeMap<String, String>,
    #[serde(default)]
    pub add: BTreeMap<String, String>,
    #[serde(default)]
    pub remove: Vec<String>,
}

/// `retries = { ... }`
#[derive(Debug, Clone, Deserialize, Serialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct RetrySpec {
    /// Extra attempts. Default 2: one failed instance among several costs the client nothing.
    #[serde(default = "d_attempts")]
    pub attempts: u32,
    /// When to retry: `connect-failure` (refused, reset before any response, connect timeout),
    /// `per-try-timeout`, `gateway-error` (502, 503, 504), `5xx`, `retriable-status`
    /// (the `statuses` list). Default `["connect-failure"]`: the only case that is always safe.
    #[serde(default = "d_retry_on")]
    pub on: Vec<String>,
    #[serde(default)]
    pub statuses: Vec<u16>,
    /// Retry POST and PATCH too once they may have reached an instance (still only without a
    /// body). Default false: a request that never left is retried whatever its method.
    #[serde(default)]
    pub allow_non_idempotent: bool,
    /// Exponential backoff with full jitter between attempts. Defaults 25 and 250 (Envoy's).
    #[serde(default = "d_backoff_base_ms")]
    pub backoff_base_ms: u64,
    #[serde(default = "d_backoff_max_ms")]
    pub backoff_max_ms: u64,
    /// Retry budget: retries may add this percentage of the route's requests over the last
    /// 10 s... Default 20 (Linkerd's), so a failing service sees at most 1.2× its load.
    #[serde(default = "d_budget_percent")]
    pub budget_percent: f64,
    /// ...plus this many retries per second, so low-traffic routes can still retry. Default 10.
    #[serde(default = "d_budget_min")]
    pub budget_min_per_second: u32,
}

fn d_attempts() -> u32 {
    2
}
fn d_retry_on() -> Vec<String> {
    vec!["connect-failure".into()]
}
fn d_backoff_base_ms() -> u64 {
    25
}
fn d_backoff_max_ms() -> u64 {
    250
}
fn d_budget_percent() -> f64 {
    20.0
}
fn d_budget_min() -> u32 {
    10
}

impl Default for RetrySpec {
    fn default() -> Self {
        Self {
            attempts: d_attempts(),
            on: d_retry_on(),
            statuses: Vec::new(),
            allow_non_idempotent: false,
            backoff_base_ms: d_backoff_base_ms(),
            backoff_max_ms: d_backoff_max_ms(),
            budget_percent: d_budget_percent(),
            budget_min_per_second: d_budget_min(),
        }
    }
}

pub const RETRY_ON: &[&str] = &[
    "connect-failure",
    "per-try-timeout",
    "gateway-error",
    "5xx",
    "retriable-status",
];

/// `rate_limit = { requests_per_second = 100, burst = 200, key = "client_ip" }`
#[derive(Debug, Clone, Deserialize, Serialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct RateLimitSpec {
    pub requests_per_second: f64,
    /// Bucket size. Default: one second's worth (at least 1).
    #[serde(default)]
    pub burst: Option<u32>,
    /// `client_ip` (default), `route`, or `header:NAME` (e.g. `header:x-api-key`).
    #[serde(default = "d_rl_key")]
    pub key: String,
}

fn d_rl_key() -> String {
    "client_ip".into()
}

#[derive(Debug, Clone, Deserialize, Serialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct CacheSpec {
    /// Responses larger than this are not stored. Default 1 MiB.
    #[serde(default = "d_cache_object")]
    pub max_object_bytes: u64,
}

fn d_cache_object() -> u64 {
    1 << 20
}

// ---------------------------------------------------------------------------------------------
// [services.NAME.upstream]

#[derive(Debug, Clone, Deserialize, Serialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct UpstreamSpec {
    /// `http1` (default), `h2c` (HTTP/2 with prior knowledge, e.g. gRPC) or `auto` (HTTP/2 when
    /// the client used HTTP/2).
    #[serde(default = "d_protocol")]
    pub protocol: String,
    /// `p2c` (default: power of two choices on outstanding requests × EWMA latency, which
    /// routes around slow instances), `round_robin`, or `hash` (sticky, see `hash_on`).
    #[serde(default = "d_lb")]
    pub load_balancer: String,
    /// For `hash`: `client_ip`, `header:NAME` or `cookie:NAME`.
    #[serde(default)]
    pub hash_on: Option<String>,
    /// Prefer instances on the gateway's node. Default true (no network hop).
    #[serde(default = "d_true")]
    pub prefer_local: bool,
    /// Default 5000 (Envoy's): the kernel retries a dropped SYN after 1 s and 3 s, so a shorter
    /// timeout fails connections that would succeed when an instance's accept queue overflows
    /// in a burst; a refused connection fails at once whatever this is.
    #[serde(default = "d_connect_timeout_ms")]
    pub connect_timeout_ms: u64,
    /// Bulkhead: requests in flight to this service above which the gateway answers 503 with
    /// `Retry-After`. Default 1024 (Envoy's); 0 = no limit.
    #[serde(default = "d_max_concurrent")]
    pub max_concurrent_requests: u32,
    /// Idle keep-alive connections kept per instance. Default 1024 (nginx's benchmark setting,
    /// Envoy keeps all): fewer makes a busy gateway close and reopen connections under load.
    #[serde(default = "d_max_idle")]
    pub max_idle_connections_per_instance: u32,
    /// An idle keep-alive connection is closed after this long. Default 60000 (nginx's
    /// upstream `keepalive_timeout`): long enough to carry a steady trickle of requests, short
    /// enough that a burst's connections do not stay open (and hold the instance's threads or
    /// sockets) for the rest of the day. Instances that close sooner are fine: a connection
    /// found closed is replaced without failing the request.
    #[serde(default = "d_idle_connection_timeout_ms")]
    pub idle_connection_timeout_ms: u64,
    #[serde(default)]
    pub circuit_breaker: BreakerSpec,
    #[serde(default)]
    pub outlier: OutlierSpec,
    /// Active HTTP probes by the gateway for instances gantry does not supervise.
    #[serde(default)]
    pub active_health: Option<ActiveHealthSpec>,
    /// TLS to the instances: `tls = {}` trusts the system's CAs and verifies the instance's IP;
    /// `tls = { ca_file = "certs/ca.pem", server_name = "api.internal" }` for a private CA.
    #[serde(default)]
    pub tls: Option<UpstreamTlsSpec>,
}

#[derive(Debug, Clone, Default, Deserialize, Serialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct UpstreamTlsSpec {
    /// PEM file of CAs to trust, relative to the spec's directory.
    #[serde(default)]
    pub ca_file: Option<PathBuf>,
    #[serde(default)]
    pub server_name: Option<String>,
    /// Mutual TLS with Gantry's internal CA (instances of a service with `mtls = true` hold
    /// its certificates): verify the instances against it and present the gateway's own
    /// certificate. The server name defaults to `SERVICE.service.gantry`.
    #[serde(default)]
    pub mtls: bool,
}

fn d_protocol() -> String {
    "http1".into()
}
fn d_lb() -> String {
    "p2c".into()
}
fn d_true() -> bool {
    true
}
fn d_connect_timeout_ms() -> u64 {
    5_000
}
fn d_max_concurrent() -> u32 {
    1024
}
fn d_max_idle() -> u32 {
    1024
}
fn d_idle_connection_timeout_ms() -> u64 {
    60_000
}

impl Default for UpstreamSpec {
    fn default() -> Self {
        Self {
            protocol: d_protocol(),
            load_balancer: d_lb(),
            hash_on: None,
            prefer_local: true,
            connect_timeout_ms: d_connect_timeout_ms(),
            max_concurrent_requests: d_max_concurrent(),
            max_idle_connections_per_instance: d_max_idle(),
            idle_connection_timeout_ms: d_idle_connection_timeout_ms(),
            circuit_breaker: BreakerSpec::default(),
            outlier: OutlierSpec::default(),
            active_health: None,
            tls: None,
        }
    }
}

/// Service-level circuit breaker.
#[derive(Debug, Clone, Deserialize, Serialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct BreakerSpec {
    /// Open after this many failures in a row. Default 0 (off at service level: one bad
    /// instance should be ejected, not the whole service cut off).
    #[serde(default)]
    pub consecutive_failures: u32,
    /// Open when this share of requests in the window failed. Default 0.5.
    #[serde(default = "d_breaker_rate")]
    pub failure_rate: f64,
    /// ...counting only once the window has this many requests. Default 20 (a rate on fewer is
    /// noise).
    #[serde(default = "d_breaker_min")]
    pub min_requests: u32,
    /// Default 10000.
    #[serde(default = "d_window_ms")]
    pub window_ms: u64,
    /// Time open before probing. Default 5000.
    #[serde(default = "d_open_ms")]
    pub open_ms: u64,
    /// Probe requests let through when half-open. Default 3.
    #[serde(default = "d_half_open")]
    pub half_open_requests: u32,
}

fn d_breaker_rate() -> f64 {
    0.5
}
fn d_breaker_min() -> u32 {
    20
}
fn d_window_ms() -> u64 {
    10_000
}
fn d_open_ms() -> u64 {
    5_000
}
fn d_half_open() -> u32 {
    3
}

impl Default for BreakerSpec {
    fn default() -> Self {
        Self {
            consecutive_failures: 0,
            failure_rate: d_breaker_rate(),
            min_requests: d_breaker_min(),
            window_ms: d_window_ms(),
            open_ms: d_open_ms(),
            half_open_requests: d_half_open(),
        }
    }
}

/// Instance-level breaker: outlier ejection.
#[derive(Debug, Clone, Deserialize, Serialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct OutlierSpec {
    /// Eject after this many failures in a row. Default 5 (Envoy's consecutive_5xx).
    #[serde(default = "d_outlier_consecutive")]
    pub consecutive_failures: u32,
    /// Or when this share failed in the window. Default 0.5.
    #[serde(default = "d_breaker_rate")]
    pub failure_rate: f64,
    /// Default 10.
    #[serde(default = "d_outlier_min")]
    pub min_requests: u32,
    /// Default 10000.
    #[serde(default = "d_window_ms")]
    pub window_ms: u64,
    /// First ejection; each further ejection of the same instance adds this much. Default 5000
    /// (local instances restart in well under that).
    #[serde(default = "d_open_ms")]
    pub base_ejection_ms: u64,
    /// Default 300000.
    #[serde(default = "d_max_ejection_ms")]
    pub max_ejection_ms: u64,
    /// At most this share of a service's instances ejected at once (always at least one).
    /// Default 50: ejection must not leave the rest overloaded.
    #[serde(default = "d_max_ejected_percent")]
    pub max_ejected_percent: u32,
}

fn d_outlier_consecutive() -> u32 {
    5
}
fn d_outlier_min() -> u32 {
    10
}
fn d_max_ejection_ms() -> u64 {
    300_000
}
fn d_max_ejected_percent() -> u32 {
    50
}

impl Default for OutlierSpec {
    fn default() -> Self {
        Self {
            consecutive_failures: d_outlier_consecutive(),
            failure_rate: d_breaker_rate(),
            min_requests: d_outlier_min(),
            window_ms: d_window_ms(),
            base_ejection_ms: d_open_ms(),
            max_ejection_ms: d_max_ejection_ms(),
            max_ejected_percent: d_max_ejected_percent(),
        }
    }
}

#[derive(Debug, Clone, Deserialize, Serialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct ActiveHealthSpec {
    pub path: String,
    /// Default 2000.
    #[serde(default = "d_ah_interval")]
    pub interval_ms: u64,
    /// Default 1000.
    #[serde(default = "d_ah_timeout")]
    pub timeout_ms: u64,
    /// Default 1.
    #[serde(default = "d_one")]
    pub healthy_threshold: u32,
    /// Default 2.
    #[serde(default = "d_two")]
    pub unhealthy_threshold: u32,
}

fn d_ah_interval() -> u64 {
    2_000
}
fn d_ah_timeout() -> u64 {
    1_000
}
fn d_one() -> u32 {
    1
}
fn d_two() -> u32 {
    2
}

// ---------------------------------------------------------------------------------------------
// Validation

type Problems = Vec<(String, String)>;

fn check_regex(p: &mut Problems, field: String, pattern: &str) {
    if pattern.len() > 4096 {
        p.push((field, "regex longer than 4096 characters".into()));
        return;
    }
    if let Err(e) = regex::RegexBuilder::new(pattern)
        .size_limit(1 << 20)
        .build()
    {
        let msg = e
            .to_string()
            .lines()
            .last()
            .unwrap_or("invalid")
            .trim()
            .to_string();
        p.push((field, format!("invalid regex: {msg}")));
    }
}

fn check_version_req(p: &mut Problems, field: String, v: &str) {
    if let Err(e) = semver::VersionReq::parse(v) {
        p.push((
            field,
            format!("invalid semver requirement {v:?} ({e}); expected e.g. \"^1.2\""),
        ));
    }
}

pub(crate) fn is_valid_host_pattern(h: &str) -> bool {
    let h = h.strip_prefix("*.").unwrap_or(h);
    crate::validate::is_valid_host(h)
}

fn is_token(s: &str) -> bool {
    !s.is_empty()
        && s.bytes()
            .all(|c| c.is_ascii_alphanumeric() || b"!#$%&'*+-.^_`|~".contains(&c))
}

fn check_header_ops(p: &mut Problems, at: &str, ops: &HeaderOpsSpec) {
    for name in ops
        .set
        .keys()
        .chain(ops.add.keys())
        .chain(ops.remove.iter())
    {
        if !is_token(name) {
            p.push((format!("{at}.{name}"), "invalid header name".into()));
        }
    }
    for (k, v) in ops.set.iter().chain(ops.add.iter()) {
        if v.bytes().any(|c| c < 0x20 && c != b'\t' || c == 0x7f) {
            p.push((
                format!("{at}.{k}"),
                "header value must not contain control characters".into(),
            ));
        }
        if crate::validate::HOP_BY_HOP.contains(&k.to_ascii_lowercase().as_str()) {
            p.push((
                format!("{at}.{k}"),
                "hop-by-hop headers cannot be set".into(),
            ));
        }
    }
}

pub(crate) fn validate_upstream(p: &mut Problems, name: &str, u: &UpstreamSpec) {
    let at = |f: &str| format!("services.{name}.upstream.{f}");
    if !matches!(u.protocol.as_str(), "http1" | "h2c" | "auto") {
        p.push((
            at("protocol"),
            format!(
                "unknown protocol {:?}; expected http1, h2c or auto",
                u.protocol
            ),
        ));
    }
    match u.load_balancer.as_str() {
        "p2c" | "round_robin" => {
            if u.hash_on.is_some() {
                p.push((
                    at("hash_on"),
                    "only used with load_balancer = \"hash\"".into(),
                ));
            }
        }
        "hash" => match u.hash_on.as_deref() {
            None => p.push((
                at("hash_on"),
                "load_balancer = \"hash\" needs hash_on: client_ip, header:NAME or cookie:NAME"
                    .into(),
            )),
            Some(h) => {
                if parse_hash_on(h).is_none() {
                    p.push((
                        at("hash_on"),
                        format!("{h:?}: expected client_ip, header:NAME or cookie:NAME"),
                    ));
                }
            }
        },
        other => p.push((
            at("load_balancer"),
            format!("unknown load balancer {other:?}; expected p2c, round_robin or hash"),
        )),
    }
    if u.connect_timeout_ms == 0 {
        p.push((at("connect_timeout_ms"), "expected at least 1".into()));
    }
    if u.idle_connection_timeout_ms == 0 {
        p.push((
            at("idle_connection_timeout_ms"),
            "expected at least 1".into(),
        ));
    }
    let b = &u.circuit_breaker;
    if !(0.0..=1.0).contains(&b.failure_rate) {
        p.push((
            at("circuit_breaker.failure_rate"),
            "expected 0 (off) to 1".into(),
        ));
    }
    if b.window_ms == 0 || b.open_ms == 0 {
        p.push((
            at("circuit_breaker"),
            "window_ms and open_ms must be at least 1".into(),
        ));
    }
    if b.half_open_requests == 0 {
        p.push((
            at("circuit_breaker.half_open_requests"),
            "expected at least 1".into(),
        ));
    }
    let o = &u.outlier;
    if !(0.0..=1.0).contains(&o.failure_rate) {
        p.push((at("outlier.failure_rate"), "expected 0 (off) to 1".into()));
    }
    if o.base_ejection_ms == 0 || o.max_ejection_ms < o.base_ejection_ms {
        p.push((
            at("outlier.max_ejection_ms"),
            "need 1 <= base_ejection_ms <= max_ejection_ms".into(),
        ));
    }
    if o.window_ms == 0 {
        p.push((at("outlier.window_ms"), "expected at least 1".into()));
    }
    if o.max_ejected_percent > 100 {
        p.push((at("outlier.max_ejected_percent"), "expected 0-100".into()));
    }
    if let Some(t) = &u.tls {
        if t.mtls && t.ca_file.is_some() {
            p.push((
                at("tls.ca_file"),
                "with mtls the instances are verified against Gantry's internal CA; leave ca_file out".into(),
            ));
        }
        if let Some(n) = &t.server_name {
            if !crate::validate::is_valid_host(n) && n.parse::<std::net::IpAddr>().is_err() {
                p.push((at("tls.server_name"), format!("invalid server name {n:?}")));
            }
        }
    }
    if let Some(h) = &u.active_health {
        if !h.path.starts_with('/') {
            p.push((
                at("active_health.path"),
                "expected an absolute path such as \"/health\"".into(),
            ));
        }
        if h.interval_ms < 10
            || h.timeout_ms == 0
            || h.healthy_threshold == 0
            || h.unhealthy_threshold == 0
        {
            p.push((
                at("active_health"),
                "interval_ms >= 10, timeout_ms and thresholds >= 1".into(),
            ));
        }
    }
}

/// Whether a route could match a request meant for the bus under the gateway before the bus's
/// own route does (a longer or exact path under it, a regex matching it, or any path over it on
/// a route for the local host services publish to — routes with hosts precede every route
/// without): the field and the bus's path.
///
/// Host routes are checked only for routes that arrive over the API (`local_hosts`): a spec may
/// well give its local host a catch-all route, and its author decides what its services get;
/// a principal allowed to add routes must not be able to take other services' credentials.
fn outranks_the_bus(
    spec: &Spec,
    r: &RouteSpec,
    local_hosts: bool,
) -> Option<(&'static str, String)> {
    if spec.bus.gateway_path.is_empty() {
        return None;
    }
    let bus = crate::normalize_prefix(&spec.bus.gateway_path);
    let under = |p: &str, prefix: &str| {
        prefix == "/" || p == prefix || p.starts_with(&format!("{prefix}/"))
    };
    // Only a host services use to reach the bus (GANTRY_BUS_URL names the gateway's loopback
    // or listen address) lets a host route come first for them.
    let local = [
        "127.0.0.1".to_string(),
        "localhost".to_string(),
        spec.gateway.listen.ip().to_string(),
    ];
    let matches_local = |pattern: &str| {
        let pattern = pattern.to_ascii_lowercase();
        local.iter().any(|h| match pattern.strip_prefix('*') {
            Some(suffix) => h.len() > suffix.len() && h.ends_with(suffix),
            None => *h == pattern,
        })
    };
    let hosts = local_hosts
        && r.host
            .iter()
            .chain(r.hosts.iter())
            .any(|h| matches_local(h));
    let hit = if let Some(pp) = &r.path_prefix {
        let pp = crate::normalize_prefix(pp);
        (under(&pp, &bus) || (hosts && under(&bus, &pp))).then_some("path_prefix")
    } else if let Some(path) = &r.path {
        under(path, &bus).then_some("path")
    } else if let Some(re) = &r.path_regex {
        // The literal an anchored regex starts with: under the bus's path, the route takes
        // some of its requests (regex routes outrank prefixes); otherwise try a few.
        let under_bus =
            literal_prefix(re).is_some_and(|l| l.starts_with(&format!("{bus}/")) || l == bus);
        (under_bus
            || regex::RegexBuilder::new(re)
                .size_limit(1 << 20)
                .build()
                .is_ok_and(|re| {
                    [
                        bus.clone(),
                        format!("{bus}/"),
                        format!("{bus}/orders/messages"),
                        format!("{bus}/orders/subscriptions/orders/fetch"),
                    ]
                    .iter()
                    .any(|s| re.is_match(s))
                }))
        .then_some("path_regex")
    } else {
        hosts.then_some("hosts")
    };
    hit.map(|f| (f, bus))
}

/// The literal text every match of an anchored (`^...`) regex starts with.
fn literal_prefix(re: &str) -> Option<String> {
    let rest = re.strip_prefix('^')?;
    let mut out = String::new();
    let mut chars = rest.chars().peekable();
    while let Some(c) = chars.next() {
        if ".[]()*+?{}|\\$^".contains(c) {
            break;
        }
        // A quantified character is not certain.
        if chars.peek().is_some_and(|n| "*?{".contains(*n)) {
            break;
        }
        out.push(c);
    }
    Some(out)
}

/// Check a route that arrives at runtime (admin API) against a loaded spec; problems are
/// `field: message` lines, fields relative to the route.
pub fn check_route(spec: &Spec, service: &str, r: &RouteSpec) -> Vec<String> {
    if !spec.services.contains_key(service) {
        return vec![format!(
            "service: unknown service {service:?}; routes can target services of the spec"
        )];
    }
    let mut p = Problems::new();
    validate_route(&mut p, spec, service, 0, r);
    if let Some((field, bus)) = outranks_the_bus(spec, r, true) {
        let f = format!("services.{service}.routes[0].{field}");
        if !p.iter().any(|(x, _)| *x == f) {
            p.push((
                f,
                format!("this route could take requests for {bus:?} on the local host services publish to (bus.gateway_path); give it another path or host"),
            ));
        }
    }
    let prefix = format!("services.{service}.routes[0].");
    p.into_iter()
        .map(|(f, m)| format!("{}: {m}", f.strip_prefix(&prefix).unwrap_or(&f)))
        .collect()
}

pub(crate) fn validate_route(p: &mut Problems, spec: &Spec, name: &str, i: usize, r: &RouteSpec) {
    crate::identity::validate_route(p, spec, name, i, r);
    let rf = |f: &str| format!("services.{name}.routes[{i}].{f}");
    let paths = [
        r.path_prefix.is_some(),
        r.path.is_some(),
        r.path_regex.is_some(),
    ]
    .iter()
    .filter(|b| **b)
    .count();
    if paths > 1 {
        p.push((
            rf("path"),
            "give only one of path_prefix, path and path_regex".into(),
        ));
    }
    for (f, v) in [("path_prefix", &r.path_prefix), ("path", &r.path)] {
        if let Some(v) = v {
            if !v.starts_with('/') {
                p.push((rf(f), "expected a path starting with '/'".into()));
            } else if let Some(why) = crate::validate::bad_prefix(v) {
                p.push((rf(f), why.into()));
            }
        }
    }
    if let Some(re) = &r.path_regex {
        check_regex(p, rf("path_regex"), re);
    }
    if let Some((field, bus)) = outranks_the_bus(spec, r, false) {
        p.push((
            rf(field),
            format!("this route could take requests for {bus:?} (bus.gateway_path: where services publish, with their credentials); give it another path"),
        ));
    }
    if r.host.is_some() && !r.hosts.is_empty() {
        p.push((rf("hosts"), "give host or hosts, not both".into()));
    }
    for (j, h) in r.host.iter().chain(r.hosts.iter()).enumerate() {
        if !is_valid_host_pattern(h) {
            let f = if r.host.is_some() {
                rf("host")
            } else {
                rf(&format!("hosts[{j}]"))
            };
            p.push((f, format!("invalid host {h:?}; expected e.g. \"api.example.com\" or \"*.example.com\", without port")));
        }
    }
    for (j, m) in r.methods.iter().enumerate() {
        if !is_token(m) {
            p.push((
                rf(&format!("methods[{j}]")),
                format!("invalid method {m:?}"),
            ));
        }
    }
    for (kind, conds) in [("headers", &r.headers), ("query", &r.query)] {
        for (j, c) in conds.iter().enumerate() {
            let f = rf(&format!("{kind}[{j}]"));
            if c.name.is_empty() || (kind == "headers" && !is_token(&c.name)) {
                p.push((f.clone(), format!("invalid name {:?}", c.name)));
            }
            if c.value.is_some() && c.regex.is_some() {
                p.push((f.clone(), "give value or regex, not both".into()));
            }
            if let Some(re) = &c.regex {
                check_regex(p, format!("{f}.regex"), re);
            }
        }
    }
    let is_prefix = r.path.is_none() && r.path_regex.is_none();
    let rewrites = [
        r.strip_prefix,
        r.rewrite_prefix.is_some(),
        r.rewrite_regex.is_some(),
    ]
    .iter()
    .filter(|b| **b)
    .count();
    if rewrites > 1 {
        p.push((
            rf("rewrite_prefix"),
            "give only one of strip_prefix, rewrite_prefix and rewrite_regex".into(),
        ));
    }
    if (r.strip_prefix || r.rewrite_prefix.is_some()) && !is_prefix {
        p.push((
            rf("strip_prefix"),
            "prefix rewrites need a path_prefix route".into(),
        ));
    }
    if r.strip_prefix
        && is_prefix
        && normalize_prefix(r.path_prefix.as_deref().unwrap_or("/")) == "/"
    {
        p.push((
            rf("strip_prefix"),
            "stripping the prefix \"/\" does nothing; remove strip_prefix".into(),
        ));
    }
    if let Some(rp) = &r.rewrite_prefix {
        if !rp.starts_with('/') {
            p.push((
                rf("rewrite_prefix"),
                "expected a path starting with '/'".into(),
            ));
        }
    }
    if let Some(rr) = &r.rewrite_regex {
        check_regex(p, rf("rewrite_regex.pattern"), &rr.pattern);
    }
    if let Some(red) = &r.redirect {
        if ![301, 302, 303, 307, 308].contains(&red.status) {
            p.push((
                rf("redirect.status"),
                "expected 301, 302, 303, 307 or 308".into(),
            ));
        }
        if let Some(s) = &red.scheme {
            if s != "http" && s != "https" {
                p.push((rf("redirect.scheme"), "expected http or https".into()));
            }
        }
        if let Some(h) = &red.host {
            if !crate::validate::is_valid_host(h) {
                p.push((rf("redirect.host"), format!("invalid host {h:?}")));
            }
        }
        for (f, v) in [
            ("redirect.path", &red.path),
            ("redirect.prefix", &red.prefix),
        ] {
            if let Some(v) = v {
                if !v.starts_with('/') || v.chars().any(|c| c.is_ascii_control() || c == ' ') {
                    p.push((rf(f), "expected a path starting with '/'".into()));
                }
            }
        }
        if red.prefix.is_some() && !is_prefix {
            p.push((rf("redirect.prefix"), "needs a path_prefix route".into()));
        }
        if red.path.is_some() && red.prefix.is_some() {
            p.push((rf("redirect"), "give path or prefix, not both".into()));
        }
    }
    if let Some(v) = &r.version {
        check_version_req(p, rf("version"), v);
    }
    if let Some(h) = &r.version_header {
        if !is_token(h) {
            p.push((rf("version_header"), "invalid header name".into()));
        }
    }
    if r.version.is_some() && !r.split.is_empty() {
        p.push((
            rf("split"),
            "give version or split, not both (put versions in the split)".into(),
        ));
    }
    let mut total = 0u64;
    for (j, s) in r.split.iter().enumerate() {
        let f = rf(&format!("split[{j}]"));
        if let Some(svc) = &s.service {
            if !spec.services.contains_key(svc) {
                p.push((format!("{f}.service"), format!("unknown service {svc:?}")));
            }
        }
        if let Some(v) = &s.version {
            check_version_req(p, format!("{f}.version"), v);
        }
        total += u64::from(s.weight);
    }
    if !r.split.is_empty() && total == 0 {
        p.push((rf("split"), "weights must not all be 0".into()));
    }
    if total > u64::from(u32::MAX) {
        // The gateway draws a share below the total: a sum that wraps would misroute silently.
        p.push((
            rf("split"),
            format!("weights add up to {total}; at most {} in all", u32::MAX),
        ));
    }
    if let Some(mi) = &r.mirror {
        if let Some(svc) = &mi.service {
            if !spec.services.contains_key(svc) {
                p.push((rf("mirror.service"), format!("unknown service {svc:?}")));
            }
        }
        if let Some(v) = &mi.version {
            check_version_req(p, rf("mirror.version"), v);
        }
        if !(0.0..=100.0).contains(&mi.percent) {
            p.push((rf("mirror.percent"), "expected 0-100".into()));
        }
    }
    check_header_ops(p, &rf("request_headers"), &r.request_headers);
    check_header_ops(p, &rf("response_headers"), &r.response_headers);
    if r.timeout_ms == 0 {
        p.push((rf("timeout_ms"), "expected at least 1".into()));
    }
    for (j, st) in r.failure_statuses.iter().enumerate() {
        if !(100..=599).contains(st) {
            p.push((
                rf(&format!("failure_statuses[{j}]")),
                format!("{st} is not an HTTP status (100-599)"),
            ));
        }
    }
    if r.per_try_timeout_ms == Some(0) {
        p.push((rf("per_try_timeout_ms"), "expected at least 1".into()));
    }
    if r.idle_timeout_ms == 0 {
        p.push((rf("idle_timeout_ms"), "expected at least 1".into()));
    }
    let rt = &r.retries;
    if rt.attempts > 10 {
        p.push((rf("retries.attempts"), "expected at most 10".into()));
    }
    for (j, on) in rt.on.iter().enumerate() {
        if !RETRY_ON.contains(&on.as_str()) {
            p.push((
                rf(&format!("retries.on[{j}]")),
                format!(
                    "unknown condition {on:?}; expected one of {}",
                    RETRY_ON.join(", ")
                ),
            ));
        }
    }
    if rt.statuses.iter().any(|s| !(100..=599).contains(s)) {
        p.push((rf("retries.statuses"), "expected HTTP status codes".into()));
    }
    if rt.backoff_max_ms < rt.backoff_base_ms {
        p.push((
            rf("retries.backoff_max_ms"),
            "must be at least backoff_base_ms".into(),
        ));
    }
    if !(0.0..=1000.0).contains(&rt.budget_percent) {
        p.push((rf("retries.budget_percent"), "expected 0-1000".into()));
    }
    if let Some(rl) = &r.rate_limit {
        if !(rl.requests_per_second > 0.0 && rl.requests_per_second.is_finite()) {
            p.push((
                rf("rate_limit.requests_per_second"),
                "expected a positive number".into(),
            ));
        }
        if rl.burst == Some(0) {
            p.push((rf("rate_limit.burst"), "expected at least 1".into()));
        }
        if parse_rl_key(&rl.key).is_none() {
            p.push((
                rf("rate_limit.key"),
                format!(
                    "{:?}: expected client_ip, route, subject, client or header:NAME",
                    rl.key
                ),
            ));
        }
    }
    if let Some(c) = &r.cache {
        if c.max_object_bytes == 0 {
            p.push((rf("cache.max_object_bytes"), "expected at least 1".into()));
        }
    }
}

pub(crate) fn validate_gateway(p: &mut Problems, spec: &Spec) {
    let l = &spec.gateway.limits;
    if l.max_connections == 0 {
        p.push((
            "gateway.limits.max_connections".into(),
            "expected at least 1".into(),
        ));
    }
    if !(1024..=1 << 20).contains(&l.max_header_bytes) {
        p.push((
            "gateway.limits.max_header_bytes".into(),
            "expected 1024 to 1048576".into(),
        ));
    }
    if !(8..=10_000).contains(&l.max_headers) {
        p.push((
            "gateway.limits.max_headers".into(),
            "expected 8 to 10000".into(),
        ));
    }
    if l.header_read_timeout_ms == 0 {
        p.push((
            "gateway.limits.header_read_timeout_ms".into(),
            "expected at least 1".into(),
        ));
    }
    if let Some(t) = &spec.gateway.tls {
        if t.certificates.is_empty() {
            p.push((
                "gateway.tls.certificates".into(),
                "expected at least one certificate".into(),
            ));
        }
        if t.listen == spec.gateway.listen && t.listen.port() != 0 {
            p.push((
                "gateway.tls.listen".into(),
                "is the same address as gateway.listen".into(),
            ));
        }
        for (i, c) in t.certificates.iter().enumerate() {
            if c.hosts.is_empty() {
                p.push((
                    format!("gateway.tls.certificates[{i}].hosts"),
                    "expected at least one host name".into(),
                ));
            }
            for (j, h) in c.hosts.iter().enumerate() {
                if !is_valid_host_pattern(h) {
                    p.push((
                        format!("gateway.tls.certificates[{i}].hosts[{j}]"),
                        format!("invalid host {h:?}"),
                    ));
                }
            }
        }
    }
}

pub(crate) fn parse_hash_on(s: &str) -> Option<m::HashOn> {
    if s == "client_ip" {
        return Some(m::HashOn::ClientIp);
    }
    if let Some(h) = s.strip_prefix("header:") {
        return is_token(h).then(|| m::HashOn::Header(h.to_ascii_lowercase()));
    }
    if let Some(c) = s.strip_prefix("cookie:") {
        return is_token(c).then(|| m::HashOn::Cookie(c.to_string()));
    }
    None
}

pub(crate) fn parse_rl_key(s: &str) -> Option<m::RateLimitKey> {
    match s {
        "client_ip" => Some(m::RateLimitKey::ClientIp),
        "route" => Some(m::RateLimitKey::Route),
        "subject" => Some(m::RateLimitKey::Subject),
        "client" => Some(m::RateLimitKey::Client),
        _ => s
            .strip_prefix("header:")
            .filter(|h| is_token(h))
            .map(|h| m::RateLimitKey::Header(h.to_ascii_lowercase())),
    }
}

// ---------------------------------------------------------------------------------------------
// Conversion to the model (only called on a validated spec)

fn cond(c: &ConditionSpec, lower_name: bool) -> m::ValueCondition {
    m::ValueCondition {
        name: if lower_name {
            c.name.to_ascii_lowercase()
        } else {
            c.name.clone()
        },
        value: match (&c.value, &c.regex) {
            (Some(v), _) => m::ValueMatch::Exact(v.clone()),
            (None, Some(r)) => m::ValueMatch::Regex(r.clone()),
            (None, None) => m::ValueMatch::Present,
        },
    }
}

fn header_ops(o: &HeaderOpsSpec) -> m::HeaderOps {
    m::HeaderOps {
        remove: o.remove.iter().map(|h| h.to_ascii_lowercase()).collect(),
        set: o
            .set
            .iter()
            .map(|(k, v)| (k.to_ascii_lowercase(), v.clone()))
            .collect(),
        add: o
            .add
            .iter()
            .map(|(k, v)| (k.to_ascii_lowercase(), v.clone()))
            .collect(),
    }
}

impl RouteSpec {
    pub fn to_model(&self, service: &str, index: usize) -> m::Route {
        let path = if let Some(p) = &self.path {
            m::PathMatch::Exact(p.clone())
        } else if let Some(r) = &self.path_regex {
            m::PathMatch::Regex(r.clone())
        } else {
            m::PathMatch::Prefix(normalize_prefix(self.path_prefix.as_deref().unwrap_or("/")))
        };
        let matcher = m::RouteMatch {
            hosts: self
                .host
                .iter()
                .chain(self.hosts.iter())
                .map(|h| h.to_ascii_lowercase())
                .collect(),
            path,
            methods: self
                .methods
                .iter()
                .map(|m| m.to_ascii_uppercase())
                .collect(),
            headers: self.headers.iter().map(|c| cond(c, true)).collect(),
            query: self.query.iter().map(|c| cond(c, false)).collect(),
        };
        let action = match &self.redirect {
            Some(r) => m::RouteAction::Redirect(m::Redirect {
                scheme: r.scheme.clone(),
                host: r.host.clone(),
                port: r.port,
                path: r.path.clone(),
                prefix: r.prefix.clone(),
                status: r.status,
            }),
            None => {
                let backends = if self.split.is_empty() {
                    vec![m::Backend {
                        service: service.to_string(),
                        version: self.version.clone(),
                        weight: 1,
                    }]
                } else {
                    self.split
                        .iter()
                        .map(|s| m::Backend {
                            service: s.service.clone().unwrap_or_else(|| service.to_string()),
                            version: s.version.clone(),
                            weight: s.weight,
                        })
                        .collect()
                };
                let on = |c: &str| self.retries.on.iter().any(|o| o == c);
                let mut statuses: Vec<u16> = Vec::new();
                if on("gateway-error") {
                    statuses.extend([502, 503, 504]);
                }
                if on("5xx") {
                    statuses.extend(500..=599);
                }
                if on("retriable-status") {
                    statuses.extend(self.retries.statuses.iter().copied());
                }
                statuses.sort_unstable();
                statuses.dedup();
                m::RouteAction::Forward(Box::new(m::Forward {
                    backends,
                    version_header: self.version_header.as_ref().map(|h| h.to_ascii_lowercase()),
                    version_from_path: self.version_from_path,
                    mirror: self.mirror.as_ref().map(|mi| m::Mirror {
                        service: mi.service.clone().unwrap_or_else(|| service.to_string()),
                        version: mi.version.clone(),
                        percent: mi.percent,
                    }),
                    rewrite: m::Rewrite {
                        strip_prefix: self.strip_prefix,
                        replace_prefix: self.rewrite_prefix.clone(),
                        regex: self
                            .rewrite_regex
                            .as_ref()
                            .map(|r| (r.pattern.clone(), r.replacement.clone())),
                        redirects: self.rewrite_redirects,
                    },
                    request_headers: header_ops(&self.request_headers),
                    response_headers: header_ops(&self.response_headers),
                    timeouts: m::Timeouts {
                        request_ms: self.timeout_ms,
                        per_try_ms: self.per_try_timeout_ms,
                        idle_ms: self.idle_timeout_ms,
                    },
                    retry: m::RetryPolicy {
                        attempts: self.retries.attempts,
                        on_connect_failure: on("connect-failure"),
                        on_statuses: statuses,
                        on_per_try_timeout: on("per-try-timeout"),
                        non_idempotent: self.retries.allow_non_idempotent,
                        backoff_base_ms: self.retries.backoff_base_ms,
                        backoff_max_ms: self.retries.backoff_max_ms,
                        budget_ratio: self.retries.budget_percent / 100.0,
                        budget_min_per_second: self.retries.budget_min_per_second,
                    },
                    rate_limit: self.rate_limit.as_ref().and_then(|rl| {
                        Some(m::RateLimit {
                            requests_per_second: rl.requests_per_second,
                            burst: rl
                                .burst
                                .unwrap_or_else(|| rl.requests_per_second.ceil().max(1.0) as u32),
                            key: parse_rl_key(&rl.key)?,
                        })
                    }),
                    cache: self.cache.as_ref().map(|c| m::CachePolicy {
                        max_object_bytes: c.max_object_bytes,
                    }),
                    max_body_bytes: self.max_body_bytes,
                    failure_statuses: self.failure_statuses.clone(),
                    auth: m::RouteAuth {
                        mode: self
                            .auth
                            .as_deref()
                            .and_then(m::AuthMode::parse)
                            .unwrap_or_default(),
                        public: self.public,
                        issuers: self.issuers.clone(),
                        audiences: self.audiences.clone(),
                        scopes: self.scopes.clone(),
                        roles: self.roles.clone(),
                        claims: self.claims.clone(),
                        pass_credentials: false,
                    },
                }))
            }
        };
        m::Route {
            id: format!("{service}/{index}"),
            service: service.to_string(),
            matcher,
            action,
        }
    }
}

impl UpstreamSpec {
    /// `base_dir` resolves a relative `tls.ca_file`.
    pub fn to_model(&self, base_dir: &std::path::Path) -> m::UpstreamPolicy {
        m::UpstreamPolicy {
            protocol: match self.protocol.as_str() {
                "h2c" => m::UpstreamProtocol::H2c,
                "auto" => m::UpstreamProtocol::Auto,
                _ => m::UpstreamProtocol::Http1,
            },
            load_balancer: match self.load_balancer.as_str() {
                "round_robin" => m::LoadBalancer::RoundRobin,
                "hash" => self
                    .hash_on
                    .as_deref()
                    .and_then(parse_hash_on)
                    .map(m::LoadBalancer::Hash)
                    .unwrap_or(m::LoadBalancer::P2cEwma),
                _ => m::LoadBalancer::P2cEwma,
            },
            prefer_local: self.prefer_local,
            connect_timeout_ms: self.connect_timeout_ms,
            max_concurrent_requests: self.max_concurrent_requests,
            max_idle_connections_per_instance: self.max_idle_connections_per_instance,
            idle_connection_timeout_ms: self.idle_connection_timeout_ms,
            circuit_breaker: m::CircuitBreakerPolicy {
                consecutive_failures: self.circuit_breaker.consecutive_failures,
                failure_rate: self.circuit_breaker.failure_rate,
                min_requests: self.circuit_breaker.min_requests,
                window_ms: self.circuit_breaker.window_ms,
                open_ms: self.circuit_breaker.open_ms,
                half_open_requests: self.circuit_breaker.half_open_requests,
            },
            outlier: m::OutlierPolicy {
                consecutive_failures: self.outlier.consecutive_failures,
                failure_rate: self.outlier.failure_rate,
                min_requests: self.outlier.min_requests,
                window_ms: self.outlier.window_ms,
                base_ejection_ms: self.outlier.base_ejection_ms,
                max_ejection_ms: self.outlier.max_ejection_ms,
                max_ejected_percent: self.outlier.max_ejected_percent,
            },
            tls: self.tls.as_ref().map(|t| m::UpstreamTls {
                ca_file: t
                    .ca_file
                    .as_ref()
                    .map(|f| base_dir.join(f).display().to_string()),
                server_name: t.server_name.clone(),
                mtls: t.mtls,
            }),
            active_health: self.active_health.as_ref().map(|h| m::ActiveHealth {
                path: h.path.clone(),
                interval_ms: h.interval_ms,
                timeout_ms: h.timeout_ms,
                healthy_threshold: h.healthy_threshold,
                unhealthy_threshold: h.unhealthy_threshold,
            }),
        }
    }
}

impl Spec {
    /// Every route of every service, in spec order, with options resolved.
    pub fn routes(&self) -> Vec<m::Route> {
        self.services
            .iter()
            .flat_map(|(name, svc)| {
                svc.routes
                    .iter()
                    .enumerate()
                    .map(move |(i, r)| r.to_model(name, i))
            })
            .collect()
    }

    /// What the gateway needs from the spec; `base_dir` resolves relative file names.
    pub fn gateway_model(&self, base_dir: &std::path::Path) -> m::GatewayModel {
        let mut model = m::GatewayModel {
            routes: self.routes(),
            upstreams: self
                .services
                .iter()
                .map(|(n, s)| (n.clone(), s.upstream.to_model(base_dir)))
                .collect(),
        };
        // The token service under the gateway (`[identity] gateway_path`): a public route to
        // the built-in service whose one instance is the identity listener.
        if let Some(p) = &self.identity.gateway_path {
            let text = format!("path_prefix = {p:?}\nstrip_prefix = true\npublic = true\n");
            builtin_route(
                &mut model,
                crate::IDENTITY_SERVICE,
                "identity/0",
                &text,
                false,
                base_dir,
            );
        }
        // The bus under the gateway (`[bus] gateway_path`): the admin API's `/v1/topics`,
        // which checks the caller's credentials itself (so the route passes them on).
        if !self.bus.gateway_path.is_empty() {
            let text = format!(
                "path_prefix = {:?}\nrewrite_prefix = \"/v1/topics\"\npublic = true\ntimeout_ms = 90000\n",
                self.bus.gateway_path
            );
            builtin_route(
                &mut model,
                crate::BUS_SERVICE,
                "bus/0",
                &text,
                true,
                base_dir,
            );
        }
        model
    }
}

/// A route to one of Gantry's own services (`route` in the spec's route syntax) and that
/// service's upstream with every default.
fn builtin_route(
    model: &mut m::GatewayModel,
    service: &str,
    id: &str,
    route: &str,
    pass_credentials: bool,
    base_dir: &std::path::Path,
) {
    if let Ok(r) = toml::from_str::<RouteSpec>(route) {
        let mut route = r.to_model(service, 0);
        route.id = id.into();
        if let m::RouteAction::Forward(f) = &mut route.action {
            f.auth.pass_credentials = pass_credentials;
        }
        model.routes.push(route);
    }
    if let Ok(u) = toml::from_str::<UpstreamSpec>("") {
        model.upstreams.insert(service.into(), u.to_model(base_dir));
    }
}
