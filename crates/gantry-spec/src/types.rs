//! The spec's typed structure. Units are in field names; every default is documented here and in
//! `docs/spec.md`.

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::path::PathBuf;

use serde::{Deserialize, Serialize};

use crate::gateway::{GatewayLimitsSpec, RouteSpec, TlsSpec, UpstreamSpec};
use crate::identity::IdentitySpec;

/// The whole `gantry.toml`.
#[derive(Debug, Clone, Default, Deserialize, Serialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct Spec {
    #[serde(default)]
    pub gateway: GatewaySpec,
    #[serde(default)]
    pub admin: AdminSpec,
    #[serde(default)]
    pub store: StoreSpec,
    #[serde(default)]
    pub logs: LogsSpec,
    #[serde(default)]
    pub metrics: MetricsSpec,
    #[serde(default)]
    pub identity: IdentitySpec,
    #[serde(default)]
    pub config: ConfigSpec,
    #[serde(default)]
    pub registry: RegistrySpec,
    #[serde(default)]
    pub bus: BusSpec,
    #[serde(default)]
    pub services: BTreeMap<String, ServiceSpec>,
}

/// `[bus]`: the message bus.
#[derive(Debug, Clone, Deserialize, Serialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct BusSpec {
    /// Topics by name (`[bus.topics.orders]`); more can be made over the admin API.
    #[serde(default)]
    pub topics: BTreeMap<String, TopicSpec>,
    /// Where services reach the bus on the gateway (`GANTRY_BUS_URL` in their environment):
    /// `{gateway_path}/{topic}/messages` is the admin API's `/v1/topics/{topic}/messages` (and
    /// the rest of `/v1/topics`), with the same credentials (a workload token). `""` turns it
    /// off. Default `/_gantry/topics`.
    #[serde(default = "default_bus_gateway_path")]
    pub gateway_path: String,
}

impl Default for BusSpec {
    fn default() -> Self {
        BusSpec {
            topics: BTreeMap::new(),
            gateway_path: default_bus_gateway_path(),
        }
    }
}

fn default_bus_gateway_path() -> String {
    "/_gantry/topics".into()
}

/// The built-in service the bus is routed as on the gateway (`[bus] gateway_path`): its one
/// instance is the admin API.
pub const BUS_SERVICE: &str = "gantry-bus";

/// `[bus.topics.NAME]`: a topic's retention and limits.
#[derive(Debug, Clone, Deserialize, Serialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct TopicSpec {
    /// Messages older than this are dropped, e.g. `"7d"`, `"12h"`. Default: kept.
    #[serde(default)]
    pub max_age: Option<String>,
    /// The oldest messages are dropped beyond this many bytes. Default: no limit.
    #[serde(default)]
    pub max_bytes: Option<u64>,
    /// The oldest messages are dropped beyond this many. Default: no limit.
    #[serde(default)]
    pub max_messages: Option<u64>,
    /// The largest message (bytes of data). Default 1 MiB.
    #[serde(default = "default_max_message_bytes")]
    pub max_message_bytes: u32,
    /// How long a publisher-given message id is remembered (a second publish with it is
    /// dropped), e.g. `"2m"`. Default 2 minutes.
    #[serde(default = "default_dedup_window")]
    pub dedup_window: String,
}

fn default_max_message_bytes() -> u32 {
    1 << 20
}
fn default_dedup_window() -> String {
    "2m".into()
}

/// `[[services.NAME.subscribe]]`: the service gets every message of a topic, each POSTed to
/// one healthy instance.
#[derive(Debug, Clone, Deserialize, Serialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct SubscribeSpec {
    pub topic: String,
    /// The path messages are POSTed to (CloudEvents binary mode).
    pub path: String,
    /// Attempts before a message goes to the dead-letter topic. Default 5.
    #[serde(default = "default_max_attempts")]
    pub max_attempts: u32,
    /// The wait after the first failed attempt, doubled after each one. Default 500.
    #[serde(default = "default_backoff_initial_ms")]
    pub backoff_initial_ms: u64,
    /// The longest wait between attempts. Default 60000.
    #[serde(default = "default_backoff_max_ms")]
    pub backoff_max_ms: u64,
    /// Messages out to the service at once. Default 64.
    #[serde(default = "default_max_in_flight")]
    pub max_in_flight: usize,
    /// Messages with the same ordering key (CloudEvents `partitionkey`) one at a time, in
    /// order. Default true.
    #[serde(default = "default_true")]
    pub ordered: bool,
    /// One attempt's limit, until the response head. Default 10000.
    #[serde(default = "default_delivery_timeout_ms")]
    pub timeout_ms: u64,
    /// Where a new subscription starts: `new` (messages published from now on, the default)
    /// or `earliest` (every retained message).
    #[serde(default = "default_start")]
    pub start: String,
}

fn default_max_attempts() -> u32 {
    5
}
fn default_backoff_initial_ms() -> u64 {
    500
}
fn default_backoff_max_ms() -> u64 {
    60_000
}
fn default_max_in_flight() -> usize {
    64
}
fn default_delivery_timeout_ms() -> u64 {
    10_000
}
fn default_start() -> String {
    "new".into()
}

/// `[registry]`: listeners that speak other registries' APIs (each off unless given).
#[derive(Debug, Clone, Deserialize, Serialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct RegistrySpec {
    /// Consul's HTTP API (the agent, catalog, health and KV subset its clients use), e.g.
    /// `127.0.0.1:8500`.
    #[serde(default)]
    pub consul: Option<SocketAddr>,
    /// What Consul calls without a token may do (as a Consul agent's anonymous token):
    /// `none` (the default), `read` (catalog, health, KV reads) or `register` (also register,
    /// deregister and update checks: Consul clients send check updates without their token).
    #[serde(default)]
    pub consul_anonymous: AnonymousAccess,
    /// Eureka's REST API (register, renew, cancel, apps), e.g. `127.0.0.1:8761`.
    #[serde(default)]
    pub eureka: Option<SocketAddr>,
    /// What Eureka calls without credentials may do: `none` (the default), `read` or
    /// `register` (also register, renew and cancel).
    #[serde(default)]
    pub eureka_anonymous: AnonymousAccess,
    /// DNS for healthy instances (`NAME.service.gantry`, SRV too), UDP and TCP, e.g.
    /// `127.0.0.1:8600`.
    #[serde(default)]
    pub dns: Option<SocketAddr>,
    /// TTL of DNS answers. Default 1.
    #[serde(default = "default_dns_ttl")]
    pub dns_ttl_secs: u32,
}

fn default_dns_ttl() -> u32 {
    1
}

impl Default for RegistrySpec {
    fn default() -> Self {
        Self {
            consul: None,
            consul_anonymous: AnonymousAccess::None,
            eureka: None,
            eureka_anonymous: AnonymousAccess::None,
            dns: None,
            dns_ttl_secs: default_dns_ttl(),
        }
    }
}

#[derive(Debug, Clone, Copy, Default, Deserialize, Serialize, PartialEq, Eq)]
#[serde(rename_all = "snake_case")]
pub enum AnonymousAccess {
    #[default]
    None,
    Read,
    Register,
}

/// `[config]`: the config store.
#[derive(Debug, Clone, Deserialize, Serialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct ConfigSpec {
    /// The environment whose layer instances get (`dev`, `staging`, `prod`, ...);
    /// `gantry up --env` overrides it. Default: none (base layers only).
    #[serde(default)]
    pub env: Option<String>,
    /// Versions of each config set history keeps. Default 100.
    #[serde(default = "default_config_history")]
    pub history: u64,
    /// Spring Cloud Config's read endpoint (`/{application}/{profiles}[/{label}]`) for Spring
    /// Boot services, e.g. `127.0.0.1:8888`; off unless given.
    #[serde(default)]
    pub spring: Option<SocketAddr>,
}

impl Default for ConfigSpec {
    fn default() -> Self {
        Self {
            env: None,
            history: default_config_history(),
            spring: None,
        }
    }
}

fn default_config_history() -> u64 {
    100
}

#[derive(Debug, Clone, Deserialize, Serialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct GatewaySpec {
    /// Where the gateway accepts traffic. Default `127.0.0.1:8080`.
    #[serde(default = "default_gateway_listen")]
    pub listen: SocketAddr,
    /// Gateway worker threads; 0 means one per CPU.
    #[serde(default)]
    pub workers: usize,
    /// Write one JSON access-log line per request to stderr. Default off (it costs CPU on every
    /// request; benchmarks run without it).
    #[serde(default)]
    pub access_log: bool,
    /// Give every request an `X-Request-Id` (kept when the client sent a sane one), sent to the
    /// instance and returned to the client. Default on.
    #[serde(default = "default_true")]
    pub request_id: bool,
    /// W3C trace context: continue the client's `traceparent` with the gateway as the new
    /// parent, or start a trace. Default on.
    #[serde(default = "default_true")]
    pub trace_context: bool,
    /// Set `X-Forwarded-For/-Proto/-Host` (the client's `X-Forwarded-For` is appended to).
    /// Default on. Off: these headers pass as the client sent them.
    #[serde(default = "default_true")]
    pub forwarded_headers: bool,
    /// Memory for cached responses (routes opt in with `cache`). Default 64 MiB.
    #[serde(default = "default_cache_bytes")]
    pub cache_max_bytes: u64,
    #[serde(default)]
    pub limits: GatewayLimitsSpec,
    /// HTTPS listener; absent: plain HTTP only.
    #[serde(default)]
    pub tls: Option<TlsSpec>,
}

fn default_true() -> bool {
    true
}

fn default_cache_bytes() -> u64 {
    64 << 20
}

impl Default for GatewaySpec {
    fn default() -> Self {
        Self {
            listen: default_gateway_listen(),
            workers: 0,
            access_log: false,
            request_id: true,
            trace_context: true,
            forwarded_headers: true,
            cache_max_bytes: default_cache_bytes(),
            limits: GatewayLimitsSpec::default(),
            tls: None,
        }
    }
}

fn default_gateway_listen() -> SocketAddr {
    SocketAddr::from(([127, 0, 0, 1], 8080))
}

#[derive(Debug, Clone, Deserialize, Serialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct AdminSpec {
    /// Where the admin API listens. Default `127.0.0.1:7070` (loopback: the API can change
    /// everything, so exposing it is an explicit choice).
    #[serde(default = "default_admin_listen")]
    pub listen: SocketAddr,
    /// Endpoints readable without credentials: any of `"health"` (`/v1/health`) and
    /// `"metrics"` (`/metrics`, for scrapers without a token). Default none.
    #[serde(default)]
    pub public: Vec<AdminPublic>,
    /// Most admin connections open at once; more wait in the listen queue. Default 256.
    #[serde(default = "default_admin_max_connections")]
    pub max_connections: u32,
}

#[derive(Debug, Clone, Copy, Deserialize, Serialize, PartialEq, Eq, PartialOrd, Ord)]
#[serde(rename_all = "lowercase")]
pub enum AdminPublic {
    Health,
    Metrics,
}

fn default_admin_max_connections() -> u32 {
    256
}

impl Default for AdminSpec {
    fn default() -> Self {
        Self {
            listen: default_admin_listen(),
            public: Vec::new(),
            max_connections: default_admin_max_connections(),
        }
    }
}

fn default_admin_listen() -> SocketAddr {
    SocketAddr::from(([127, 0, 0, 1], 7070))
}

#[derive(Debug, Clone, Deserialize, Serialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct StoreSpec {
    /// Data directory, relative to the spec file's directory. Default `.gantry`. Holds the
    /// embedded store, the admin token and the lock that keeps a second gantry out.
    #[serde(default = "default_data_dir")]
    pub data_dir: PathBuf,
    /// Where control-plane state lives: `embedded` (a file in the data directory, the default)
    /// or `nats` (JetStream KV buckets on the NATS server at `url`).
    #[serde(default)]
    pub backend: StoreBackend,
    /// NATS server(s), for `backend = "nats"`: `nats://host:port`, comma-separated for several.
    #[serde(default = "default_nats_url")]
    pub url: String,
    /// Copies JetStream keeps of each bucket: 1 on one server, 3 or 5 in a cluster.
    #[serde(default = "default_store_replicas")]
    pub replicas: u8,
    /// Prefix of this system's bucket names, so that several systems can share one NATS.
    #[serde(default = "default_namespace")]
    pub namespace: String,
}

#[derive(Debug, Clone, Copy, Default, Deserialize, Serialize, PartialEq, Eq)]
#[serde(rename_all = "lowercase")]
pub enum StoreBackend {
    #[default]
    Embedded,
    Nats,
}

impl Default for StoreSpec {
    fn default() -> Self {
        Self {
            data_dir: default_data_dir(),
            backend: StoreBackend::Embedded,
            url: default_nats_url(),
            replicas: default_store_replicas(),
            namespace: default_namespace(),
        }
    }
}

fn default_nats_url() -> String {
    "nats://127.0.0.1:4222".into()
}

fn default_store_replicas() -> u8 {
    1
}

fn default_namespace() -> String {
    "gantry".into()
}

fn default_data_dir() -> PathBuf {
    PathBuf::from(".gantry")
}

#[derive(Debug, Clone, Deserialize, Serialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct LogsSpec {
    /// Bytes of the newest instance output also kept in memory (for followers), over all
    /// services; oldest lines go first. Default 32 MiB.
    #[serde(default = "default_log_bytes")]
    pub max_bytes: u64,
    /// Bytes of output kept on disk (`.gantry/logs/`); the oldest lines go first. Default 1 GiB.
    #[serde(default = "default_log_disk_bytes")]
    pub max_disk_bytes: u64,
    /// Lines older than this are deleted from disk, e.g. `"7d"`, `"12h"`. Default 7 days.
    #[serde(default = "default_log_age")]
    pub max_age: String,
}

impl Default for LogsSpec {
    fn default() -> Self {
        Self {
            max_bytes: default_log_bytes(),
            max_disk_bytes: default_log_disk_bytes(),
            max_age: default_log_age(),
        }
    }
}

/// `[metrics]`: the history of Gantry's metrics (queried with PromQL over the admin API).
#[derive(Debug, Clone, Deserialize, Serialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct MetricsSpec {
    /// How often every series is sampled into the history, e.g. `"30s"`. Default 30 s.
    #[serde(default = "default_metrics_step")]
    pub step: String,
    /// How long samples are kept, e.g. `"7d"`. Default 7 days.
    #[serde(default = "default_log_age")]
    pub retention: String,
    /// Bytes of history kept on disk (`.gantry/tsdb/`); the oldest samples go first. Default
    /// 512 MiB.
    #[serde(default = "default_metrics_bytes")]
    pub max_disk_bytes: u64,
}

impl Default for MetricsSpec {
    fn default() -> Self {
        Self {
            step: default_metrics_step(),
            retention: default_log_age(),
            max_disk_bytes: default_metrics_bytes(),
        }
    }
}

fn default_metrics_step() -> String {
    "30s".into()
}

fn default_metrics_bytes() -> u64 {
    512 << 20
}

fn default_log_disk_bytes() -> u64 {
    1 << 30
}

fn default_log_age() -> String {
    "7d".into()
}

fn default_log_bytes() -> u64 {
    32 << 20
}

/// `[services.NAME]`
#[derive(Debug, Clone, Deserialize, Serialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct ServiceSpec {
    /// Program and arguments (no shell). Absent for a service gantry does not run (see
    /// `endpoints`, or instances that register themselves).
    #[serde(default)]
    pub command: Option<Vec<String>>,
    /// Fixed addresses (`host:port`) of instances gantry does not run, e.g. a database proxy or
    /// a service on another machine. Only without `command`.
    #[serde(default)]
    pub endpoints: Vec<String>,
    /// Its instances register themselves (the admin API, the Consul or Eureka listeners):
    /// gantry neither runs them nor knows their addresses in advance; the spec routes to them.
    #[serde(default)]
    pub external: bool,
    /// Working directory, relative to the spec file's directory. Default: that directory.
    #[serde(default)]
    pub cwd: Option<PathBuf>,
    /// Extra environment. Config store values override these; `PORT` and `GANTRY_*` are reserved.
    #[serde(default)]
    pub env: BTreeMap<String, String>,
    /// Semantic version of what `command` runs. Default `0.0.0`.
    #[serde(default = "default_version")]
    pub version: String,
    /// Number of instances. Default 1.
    #[serde(default = "default_replicas")]
    pub replicas: u32,
    /// Fixed port (only with one replica). Default: a free port is chosen per instance.
    #[serde(default)]
    pub port: Option<u16>,
    /// Free-form metadata copied to every instance in the registry.
    #[serde(default)]
    pub metadata: BTreeMap<String, String>,
    #[serde(default)]
    pub health: HealthSpec,
    /// Services that must have a healthy instance before this one starts.
    #[serde(default)]
    pub depends_on: Vec<String>,
    /// Services this one may call through the gateway when `[identity] service_policy =
    /// "deny"` (its instances' workload credentials name it).
    #[serde(default)]
    pub calls: Vec<String>,
    /// Its instances get a certificate from the internal CA (`$GANTRY_TLS_CERT`,
    /// `$GANTRY_TLS_KEY`, `$GANTRY_TLS_CA`), renewed before it expires; presented to the
    /// gateway's TLS listener, it names the calling service.
    #[serde(default)]
    pub mtls: bool,
    #[serde(default)]
    pub restart: RestartPolicy,
    #[serde(default)]
    pub backoff: BackoffSpec,
    /// Signal sent to the instance's process group to stop it. Default `SIGTERM`.
    #[serde(default = "default_stop_signal")]
    pub stop_signal: String,
    /// Time between the stop signal and SIGKILL. Default 10000.
    #[serde(default = "default_stop_timeout_ms")]
    pub stop_timeout_ms: u64,
    /// Longest wait, after an instance leaves routing and before its stop signal, for requests
    /// the gateway already sent it to finish. Default 5000.
    #[serde(default = "default_drain_timeout_ms")]
    pub drain_timeout_ms: u64,
    /// What a config change does to running instances: `none` (new instances get it; the
    /// config file is rewritten), `restart` (rolling, reverted if unhealthy) or `signal`.
    /// Default `none`.
    #[serde(default)]
    pub on_config_change: OnConfigChange,
    /// The signal `on_config_change = "signal"` sends. Default `SIGHUP`.
    #[serde(default = "default_reload_signal")]
    pub reload_signal: String,
    /// How the gateway reaches this service.
    #[serde(default)]
    pub upstream: UpstreamSpec,
    #[serde(default)]
    pub routes: Vec<RouteSpec>,
    /// Topics this service subscribes to (`[[services.NAME.subscribe]]`).
    #[serde(default)]
    pub subscribe: Vec<SubscribeSpec>,
}

fn default_version() -> String {
    "0.0.0".into()
}
fn default_replicas() -> u32 {
    1
}
fn default_stop_signal() -> String {
    "SIGTERM".into()
}
fn default_reload_signal() -> String {
    "SIGHUP".into()
}
fn default_stop_timeout_ms() -> u64 {
    10_000
}
fn default_drain_timeout_ms() -> u64 {
    5_000
}

impl ServiceSpec {
    /// The program and arguments, for services gantry runs.
    pub fn program(&self) -> Option<&[String]> {
        self.command.as_deref().filter(|c| !c.is_empty())
    }

    /// The parsed version (validated at load time).
    pub fn semver(&self) -> semver::Version {
        semver::Version::parse(&self.version).unwrap_or_else(|_| semver::Version::new(0, 0, 0))
    }
}

pub use gantry_model::{BackoffSpec, HealthSpec, OnConfigChange, ProbeKind, RestartPolicy};

/// `/api/` and `/api` are the same prefix; `/` stays `/`.
pub fn normalize_prefix(p: &str) -> String {
    let t = p.trim_end_matches('/');
    if t.is_empty() {
        "/".into()
    } else {
        t.to_string()
    }
}
