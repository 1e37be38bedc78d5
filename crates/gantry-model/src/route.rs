//! What the gateway is told to do: routes (match + action) and per-service upstream policies,
//! with every option resolved (no defaults left to apply).

use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};

/// One routing rule.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize, utoipa::ToSchema)]
pub struct Route {
    /// Stable name used in metrics and logs, e.g. `catalog/0`.
    pub id: String,
    /// The service whose spec declares the route (the default target).
    pub service: String,
    #[serde(rename = "match")]
    pub matcher: RouteMatch,
    pub action: RouteAction,
}

/// Conditions a request must meet; all given conditions must hold.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize, utoipa::ToSchema)]
pub struct RouteMatch {
    /// Lowercase hosts without port: exact (`api.example.com`) or wildcard (`*.example.com`,
    /// matching any subdomain but not the bare domain). Empty: any host.
    pub hosts: Vec<String>,
    pub path: PathMatch,
    /// Uppercase method names; empty: any method.
    pub methods: Vec<String>,
    pub headers: Vec<ValueCondition>,
    pub query: Vec<ValueCondition>,
}

#[derive(Clone, Debug, PartialEq, Serialize, Deserialize, utoipa::ToSchema)]
#[serde(tag = "type", content = "value", rename_all = "snake_case")]
pub enum PathMatch {
    /// Whole-segment prefix, normalized without trailing slash (`/` matches everything).
    Prefix(String),
    Exact(String),
    /// Regular expression matched against the whole (normalized) path.
    Regex(String),
}

impl Default for PathMatch {
    fn default() -> Self {
        PathMatch::Prefix("/".into())
    }
}

/// A header (name lowercase) or query parameter condition.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize, utoipa::ToSchema)]
pub struct ValueCondition {
    pub name: String,
    pub value: ValueMatch,
}

#[derive(Clone, Debug, PartialEq, Serialize, Deserialize, utoipa::ToSchema)]
#[serde(tag = "type", content = "value", rename_all = "snake_case")]
pub enum ValueMatch {
    Present,
    Exact(String),
    Regex(String),
}

#[derive(Clone, Debug, PartialEq, Serialize, Deserialize, utoipa::ToSchema)]
#[serde(tag = "type", rename_all = "snake_case")]
pub enum RouteAction {
    Forward(Box<Forward>),
    Redirect(Redirect),
}

/// Answer with a redirect; unset parts keep the request's.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize, utoipa::ToSchema)]
pub struct Redirect {
    pub scheme: Option<String>,
    pub host: Option<String>,
    pub port: Option<u16>,
    /// Replaces the whole path.
    pub path: Option<String>,
    /// Replaces the matched prefix (prefix routes only).
    pub prefix: Option<String>,
    pub status: u16,
}

/// Send the request to a service.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize, utoipa::ToSchema)]
pub struct Forward {
    /// Weighted targets (one for a plain route; several for blue/green or canary splits).
    pub backends: Vec<Backend>,
    /// A request header whose value is a semver requirement choosing the version
    /// (e.g. `accept-version: ^2`); it overrides the backends' own requirements.
    pub version_header: Option<String>,
    /// A first path segment `v<major>` (after the route prefix) selects that major version and
    /// is removed before forwarding.
    pub version_from_path: bool,
    pub mirror: Option<Mirror>,
    pub rewrite: Rewrite,
    pub request_headers: HeaderOps,
    pub response_headers: HeaderOps,
    pub timeouts: Timeouts,
    pub retry: RetryPolicy,
    pub rate_limit: Option<RateLimit>,
    pub cache: Option<CachePolicy>,
    /// Largest request body accepted (413 above).
    pub max_body_bytes: u64,
    /// Statuses from an instance that count as failures for the route's circuit breakers,
    /// besides connection failures, resets, timeouts, 502, 503 and 504.
    #[serde(default)]
    pub failure_statuses: Vec<u16>,
    /// Who may use the route (identity).
    #[serde(default)]
    pub auth: RouteAuth,
}

/// What a route asks of its callers.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize, utoipa::ToSchema)]
#[serde(default)]
pub struct RouteAuth {
    pub mode: AuthMode,
    /// Reachable from outside under the `deny` service policy (without it, only services
    /// allowed to call the route's service reach it).
    pub public: bool,
    /// Issuer names (`gantry`, or an `[[identity.issuers]]` name) or `iss` values accepted;
    /// empty: any trusted issuer.
    pub issuers: Vec<String>,
    /// At least one of these in the token's `aud`; empty: not checked.
    pub audiences: Vec<String>,
    /// Every one of these scopes.
    pub scopes: Vec<String>,
    /// At least one of these roles; empty: not checked.
    pub roles: Vec<String>,
    /// Claims that must have these values.
    pub claims: BTreeMap<String, String>,
    /// The caller's credential goes upstream as received, a workload token included: only
    /// for Gantry's own services (the bus under the gateway), which check it themselves.
    pub pass_credentials: bool,
}

#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize, utoipa::ToSchema)]
#[serde(rename_all = "snake_case")]
pub enum AuthMode {
    /// Credentials are not read.
    #[default]
    None,
    /// A valid credential is used, an invalid one refused, none accepted.
    Optional,
    Required,
}

impl AuthMode {
    pub fn parse(s: &str) -> Option<Self> {
        Some(match s {
            "none" => AuthMode::None,
            "optional" => AuthMode::Optional,
            "required" => AuthMode::Required,
            _ => return None,
        })
    }
}

#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize, utoipa::ToSchema)]
pub struct Backend {
    pub service: String,
    /// Semver requirement on instance versions; `None`: any version.
    pub version: Option<String>,
    pub weight: u32,
}

/// Copy a share of requests to a shadow target; its answers are discarded.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize, utoipa::ToSchema)]
pub struct Mirror {
    pub service: String,
    pub version: Option<String>,
    /// 0..=100
    pub percent: f64,
}

#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize, utoipa::ToSchema)]
pub struct Rewrite {
    /// Remove the matched prefix (prefix routes).
    pub strip_prefix: bool,
    /// Replace the matched prefix with this one (prefix routes).
    pub replace_prefix: Option<String>,
    /// Regex rewrite of the path: (pattern, replacement with `$1`-style groups).
    pub regex: Option<(String, String)>,
    /// With a stripped or replaced prefix: point the instance's redirects (`Location`) back
    /// under the route's prefix, and send `X-Forwarded-Prefix`.
    #[serde(default = "yes")]
    pub redirects: bool,
}

fn yes() -> bool {
    true
}

impl Default for Rewrite {
    fn default() -> Self {
        Self {
            strip_prefix: false,
            replace_prefix: None,
            regex: None,
            redirects: true,
        }
    }
}

/// Header changes, applied in order: remove, set (replace), add (append).
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize, utoipa::ToSchema)]
pub struct HeaderOps {
    pub remove: Vec<String>,
    pub set: BTreeMap<String, String>,
    pub add: BTreeMap<String, String>,
}

impl HeaderOps {
    pub fn is_empty(&self) -> bool {
        self.remove.is_empty() && self.set.is_empty() && self.add.is_empty()
    }
}

#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize, utoipa::ToSchema)]
pub struct Timeouts {
    /// Whole request, all attempts included, until response headers.
    pub request_ms: u64,
    /// One attempt, until response headers; `None`: bounded by `request_ms` only.
    pub per_try_ms: Option<u64>,
    /// Longest silence on an open response (or WebSocket) before it is closed.
    pub idle_ms: u64,
}

#[derive(Clone, Debug, PartialEq, Serialize, Deserialize, utoipa::ToSchema)]
pub struct RetryPolicy {
    /// Extra attempts after the first (0 disables retries).
    pub attempts: u32,
    /// Retry on connection failures (refused, reset before a response, connect timeout).
    pub on_connect_failure: bool,
    /// Retry when an instance answers one of these statuses.
    pub on_statuses: Vec<u16>,
    /// Retry after a per-try timeout.
    pub on_per_try_timeout: bool,
    /// Also retry methods that are not idempotent once the request may have reached an
    /// instance (only if it has no body). A request that never left is retried whatever its
    /// method.
    pub non_idempotent: bool,
    pub backoff_base_ms: u64,
    pub backoff_max_ms: u64,
    /// Retries may add at most this share of the route's normal traffic...
    pub budget_ratio: f64,
    /// ...plus this many retries per second.
    pub budget_min_per_second: u32,
}

impl RetryPolicy {
    /// One attempt, never another (mirrored copies, health checks).
    pub fn none() -> Self {
        Self {
            attempts: 0,
            on_connect_failure: false,
            on_statuses: Vec::new(),
            on_per_try_timeout: false,
            non_idempotent: false,
            backoff_base_ms: 0,
            backoff_max_ms: 0,
            budget_ratio: 0.0,
            budget_min_per_second: 0,
        }
    }
}

#[derive(Clone, Debug, PartialEq, Serialize, Deserialize, utoipa::ToSchema)]
pub struct RateLimit {
    pub requests_per_second: f64,
    pub burst: u32,
    pub key: RateLimitKey,
}

#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize, utoipa::ToSchema)]
#[serde(tag = "type", content = "value", rename_all = "snake_case")]
pub enum RateLimitKey {
    ClientIp,
    /// One bucket for the whole route.
    Route,
    /// The value of a header (e.g. an API key); requests without it share one bucket.
    Header(String),
    /// The verified caller's subject (`sub`, or the API key's client); anonymous requests are
    /// keyed by client address.
    Subject,
    /// The verified caller's client id; anonymous requests are keyed by client address.
    Client,
}

#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize, utoipa::ToSchema)]
pub struct CachePolicy {
    /// Responses larger than this are not stored.
    pub max_object_bytes: u64,
}

/// How the gateway talks to one service.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize, utoipa::ToSchema)]
pub struct UpstreamPolicy {
    pub protocol: UpstreamProtocol,
    pub load_balancer: LoadBalancer,
    /// Prefer instances on the gateway's own node; others only when none is available.
    pub prefer_local: bool,
    pub connect_timeout_ms: u64,
    /// In-flight requests to the service above which new ones get 503 (bulkhead); 0: no limit.
    pub max_concurrent_requests: u32,
    pub max_idle_connections_per_instance: u32,
    /// Idle keep-alive connections are closed after this long.
    pub idle_connection_timeout_ms: u64,
    pub circuit_breaker: CircuitBreakerPolicy,
    pub outlier: OutlierPolicy,
    /// Active probes for instances gantry does not supervise (self-registered ones).
    pub active_health: Option<ActiveHealth>,
    /// Speak TLS to the instances.
    pub tls: Option<UpstreamTls>,
}

/// TLS from the gateway to a service's instances.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize, utoipa::ToSchema)]
pub struct UpstreamTls {
    /// PEM file of the CAs to trust (absolute path); `None`: the system's roots.
    pub ca_file: Option<String>,
    /// Name to send as SNI and verify the certificate against; `None`: the instance's IP.
    pub server_name: Option<String>,
    /// Mutual TLS with Gantry's internal CA: the instances' certificates are verified against
    /// it (not `ca_file`), and the gateway presents its own certificate from it.
    #[serde(default)]
    pub mtls: bool,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize, utoipa::ToSchema)]
#[serde(rename_all = "snake_case")]
pub enum UpstreamProtocol {
    Http1,
    /// HTTP/2 over cleartext with prior knowledge (gRPC services).
    H2c,
    /// HTTP/2 when the client spoke HTTP/2, else HTTP/1.1.
    Auto,
}

#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize, utoipa::ToSchema)]
#[serde(tag = "type", content = "on", rename_all = "snake_case")]
pub enum LoadBalancer {
    RoundRobin,
    /// Power of two random choices on outstanding requests weighted by EWMA latency.
    P2cEwma,
    /// Consistent hashing (sticky sessions).
    Hash(HashOn),
}

#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize, utoipa::ToSchema)]
#[serde(tag = "type", content = "name", rename_all = "snake_case")]
pub enum HashOn {
    Header(String),
    Cookie(String),
    ClientIp,
}

/// Service-level breaker: opens when the service as a whole keeps failing; while open, requests
/// fail fast with 503; after `open_ms` a few probe requests decide.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize, utoipa::ToSchema)]
pub struct CircuitBreakerPolicy {
    /// 0 disables the consecutive-failure trigger.
    pub consecutive_failures: u32,
    /// 0 disables the failure-rate trigger; else 0 < rate <= 1.
    pub failure_rate: f64,
    pub min_requests: u32,
    pub window_ms: u64,
    pub open_ms: u64,
    pub half_open_requests: u32,
}

/// Instance-level breaker (outlier ejection): a failing instance is taken out of load balancing
/// for `base_ejection_ms × times ejected` (capped), then probed; at most `max_ejected_percent` of
/// a service's instances (but at least one) are out at a time.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize, utoipa::ToSchema)]
pub struct OutlierPolicy {
    pub consecutive_failures: u32,
    pub failure_rate: f64,
    pub min_requests: u32,
    pub window_ms: u64,
    pub base_ejection_ms: u64,
    pub max_ejection_ms: u64,
    pub max_ejected_percent: u32,
}

#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize, utoipa::ToSchema)]
pub struct ActiveHealth {
    pub path: String,
    pub interval_ms: u64,
    pub timeout_ms: u64,
    pub healthy_threshold: u32,
    pub unhealthy_threshold: u32,
}

/// Everything the gateway needs besides the registry.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize, utoipa::ToSchema)]
pub struct GatewayModel {
    pub routes: Vec<Route>,
    pub upstreams: BTreeMap<String, UpstreamPolicy>,
}
