//! The desired state: what should run, per service and version. The spec file is one writer of
//! it (at `gantry up` and on reload), the admin API another (scale now; deploy, the autoscaler, the
//! release controller and the scheduler later); the supervisor reconciles running instances to
//! it. It lives in the store's `deploy` bucket, one key per service.
//!
//! The runtime policies (health checks, restart and backoff, config-change behaviour) are defined
//! here with their defaults, and the spec file's `[services.NAME.health]` and friends are these
//! same types, so a spec and a stored deployment cannot drift apart.

use std::collections::BTreeMap;
use std::path::PathBuf;

use serde::{Deserialize, Serialize};

/// One service's desired state.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, utoipa::ToSchema)]
pub struct Deployment {
    pub service: String,
    /// Versions that should run side by side (usually one; two during a release).
    pub versions: Vec<VersionDeployment>,
    /// Services whose instances must be up before this one starts.
    #[serde(default)]
    pub depends_on: Vec<String>,
    #[serde(default)]
    pub on_config_change: OnConfigChange,
    /// Sent to each running instance after its config file is rewritten, with
    /// `on_config_change = "signal"`. Default `SIGHUP`.
    #[serde(default = "default_reload_signal")]
    pub reload_signal: String,
    /// The config version instances start with; `None` follows the current version.
    #[serde(default)]
    pub config_version: Option<u64>,
    #[serde(default)]
    pub resources: Resources,
    #[serde(default)]
    pub placement: Placement,
    /// Registered with each instance.
    #[serde(default)]
    pub metadata: BTreeMap<String, String>,
}

fn default_reload_signal() -> String {
    "SIGHUP".into()
}

impl Deployment {
    pub fn version(&self, v: &semver::Version) -> Option<&VersionDeployment> {
        self.versions.iter().find(|d| &d.version == v)
    }

    /// Instances wanted over all versions.
    pub fn replicas(&self) -> u32 {
        self.versions.iter().map(|v| v.replicas).sum()
    }
}

/// Who put a version into the desired state.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize, utoipa::ToSchema)]
#[serde(rename_all = "lowercase")]
pub enum VersionSource {
    /// The spec file: a reload replaces it with the spec's version.
    #[default]
    Spec,
    /// The admin API (a deploy): a reload keeps it.
    Api,
}

/// One version of a service and how to run its instances.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, utoipa::ToSchema)]
pub struct VersionDeployment {
    #[schema(value_type = String)]
    pub version: semver::Version,
    #[serde(default)]
    pub source: VersionSource,
    /// Program and arguments.
    pub command: Vec<String>,
    /// Working directory (absolute).
    #[schema(value_type = String)]
    pub cwd: PathBuf,
    #[serde(default)]
    pub env: BTreeMap<String, String>,
    pub replicas: u32,
    /// The replica count the spec asked for when `replicas` was last set from it: a scale from
    /// the API is kept across reloads and restarts until the spec's own count changes.
    #[serde(default)]
    pub spec_replicas: u32,
    /// A fixed port (then at most one instance), else a free one per instance.
    #[serde(default)]
    pub port: Option<u16>,
    #[serde(default)]
    pub health: HealthSpec,
    #[serde(default)]
    pub restart: RestartPolicy,
    #[serde(default)]
    pub backoff: BackoffSpec,
    /// Signal name, e.g. `SIGTERM`.
    pub stop_signal: String,
    pub stop_timeout_ms: u64,
    pub drain_timeout_ms: u64,
}

impl VersionDeployment {
    /// Whether running instances of `self` must be replaced to become `other` (anything but the
    /// replica count differs).
    pub fn needs_replacement(&self, other: &VersionDeployment) -> bool {
        let mut a = self.clone();
        a.replicas = other.replicas;
        a.spec_replicas = other.spec_replicas;
        a.source = other.source;
        &a != other
    }
}

/// Resource limits per instance (enforced through cgroups v2 where available).
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize, utoipa::ToSchema)]
pub struct Resources {
    /// CPU in thousandths of a core.
    #[serde(default)]
    pub cpu_millis: Option<u32>,
    #[serde(default)]
    pub memory_bytes: Option<u64>,
}

/// Where instances may run (one node today; cluster mode places by these).
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize, utoipa::ToSchema)]
pub struct Placement {
    #[serde(default)]
    pub node: Option<String>,
    #[serde(default)]
    pub zone: Option<String>,
}

#[derive(Debug, Clone, Copy, Default, Deserialize, Serialize, PartialEq, Eq, utoipa::ToSchema)]
#[serde(rename_all = "kebab-case")]
pub enum RestartPolicy {
    /// Restart whenever the process exits (the default: services are meant to run).
    #[default]
    Always,
    /// Restart only after a non-zero exit or a signal.
    OnFailure,
    Never,
}

#[derive(Debug, Clone, Copy, Default, Deserialize, Serialize, PartialEq, Eq, utoipa::ToSchema)]
#[serde(rename_all = "kebab-case")]
pub enum OnConfigChange {
    /// New values reach new instances only; `gantry restart` applies them.
    #[default]
    None,
    /// A rolling restart (one instance at a time, waiting for health) after each change; a
    /// change whose new instances fail their health checks is reverted automatically.
    Restart,
    /// Rewrite each running instance's config file, then send it `reload_signal`.
    Signal,
}

/// Exponential restart backoff: `initial_ms`, doubled per consecutive failed start, capped.
#[derive(Debug, Clone, Deserialize, Serialize, PartialEq, utoipa::ToSchema)]
#[serde(deny_unknown_fields)]
pub struct BackoffSpec {
    /// Default 100: a crash is retried almost at once.
    #[serde(default = "default_backoff_initial_ms")]
    pub initial_ms: u64,
    /// Default 30000: a crash-looping instance costs at most one start per 30 s.
    #[serde(default = "default_backoff_max_ms")]
    pub max_ms: u64,
    /// This many exits within `crash_loop_window_ms` marks the instance as crash-looping.
    /// Default 5.
    #[serde(default = "default_crash_loop_restarts")]
    pub crash_loop_restarts: u32,
    /// Default 60000.
    #[serde(default = "default_crash_loop_window_ms")]
    pub crash_loop_window_ms: u64,
}

impl Default for BackoffSpec {
    fn default() -> Self {
        Self {
            initial_ms: default_backoff_initial_ms(),
            max_ms: default_backoff_max_ms(),
            crash_loop_restarts: default_crash_loop_restarts(),
            crash_loop_window_ms: default_crash_loop_window_ms(),
        }
    }
}

fn default_backoff_initial_ms() -> u64 {
    100
}
fn default_backoff_max_ms() -> u64 {
    30_000
}
fn default_crash_loop_restarts() -> u32 {
    5
}
fn default_crash_loop_window_ms() -> u64 {
    60_000
}

#[derive(Debug, Clone, Copy, Default, Deserialize, Serialize, PartialEq, Eq, utoipa::ToSchema)]
#[serde(rename_all = "snake_case")]
pub enum ProbeKind {
    /// `GET path` on the instance's port; any 2xx or 3xx passes.
    Http,
    /// A TCP connection to the instance's port (the default).
    #[default]
    Tcp,
    /// Run `command` in the instance's environment; exit 0 passes.
    Exec,
    /// No probe: healthy as soon as the process runs (for instances that serve nothing).
    None,
}

impl ProbeKind {
    pub fn as_str(self) -> &'static str {
        match self {
            ProbeKind::Http => "http",
            ProbeKind::Tcp => "tcp",
            ProbeKind::Exec => "exec",
            ProbeKind::None => "none",
        }
    }
}

/// `[services.NAME.health]`
#[derive(Debug, Clone, Deserialize, Serialize, PartialEq, utoipa::ToSchema)]
#[serde(deny_unknown_fields)]
pub struct HealthSpec {
    #[serde(rename = "type", default)]
    pub kind: ProbeKind,
    /// For `http`: the path to GET, e.g. `/health`.
    #[serde(default)]
    pub path: Option<String>,
    /// For `exec`: program and arguments.
    #[serde(default)]
    pub command: Option<Vec<String>>,
    /// Time between probes of a running instance. Default 1000. (Until the first pass, probes
    /// run every 50 ms so that instances join routing as soon as they answer.)
    #[serde(default = "default_interval_ms")]
    pub interval_ms: u64,
    /// Default 1000.
    #[serde(default = "default_probe_timeout_ms")]
    pub timeout_ms: u64,
    /// Consecutive passes to become healthy again after being unhealthy. Default 1.
    #[serde(default = "default_healthy_threshold")]
    pub healthy_threshold: u32,
    /// Consecutive failures to become unhealthy. Default 3.
    #[serde(default = "default_unhealthy_threshold")]
    pub unhealthy_threshold: u32,
    /// Time a new instance has to pass its first probe before it counts as unhealthy.
    /// Default 30000.
    #[serde(default = "default_start_grace_ms")]
    pub start_grace_ms: u64,
    /// Restart an instance that stayed unhealthy this long (a liveness check); 0 never.
    /// Default 30000.
    #[serde(default = "default_unhealthy_restart_ms")]
    pub unhealthy_restart_ms: u64,
}

impl Default for HealthSpec {
    fn default() -> Self {
        Self {
            kind: ProbeKind::Tcp,
            path: None,
            command: None,
            interval_ms: default_interval_ms(),
            timeout_ms: default_probe_timeout_ms(),
            healthy_threshold: default_healthy_threshold(),
            unhealthy_threshold: default_unhealthy_threshold(),
            start_grace_ms: default_start_grace_ms(),
            unhealthy_restart_ms: default_unhealthy_restart_ms(),
        }
    }
}

fn default_interval_ms() -> u64 {
    1000
}
fn default_probe_timeout_ms() -> u64 {
    1000
}
fn default_healthy_threshold() -> u32 {
    1
}
fn default_unhealthy_threshold() -> u32 {
    3
}
fn default_start_grace_ms() -> u64 {
    30_000
}
fn default_unhealthy_restart_ms() -> u64 {
    30_000
}
