use std::collections::BTreeMap;
use std::net::IpAddr;
use std::sync::Arc;

use serde::{Deserialize, Serialize};

/// One running copy of a service, as the registry knows it.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize, utoipa::ToSchema)]
pub struct Instance {
    /// Unique within the registry: `catalog-3` for supervised instances, `ext-<hex>` for
    /// self-registered ones.
    pub id: String,
    pub service: String,
    #[schema(value_type = String)]
    pub version: semver::Version,
    #[schema(value_type = String)]
    pub address: IpAddr,
    pub port: u16,
    #[serde(default)]
    pub metadata: BTreeMap<String, String>,
    /// The node (machine) the instance runs on; one node for now, many in cluster mode.
    pub node: String,
    #[serde(default)]
    pub zone: Option<String>,
    /// The aggregate of `checks` (the worst of them), or what its source says when it has
    /// none. Critical instances get no traffic; warning ones still do.
    pub health: Health,
    pub source: InstanceSource,
    pub registered_at_ms: u64,
    /// Labels to select instances by (Consul's tags).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub tags: Vec<String>,
    /// What vouches for its health: the supervisor's probe, TTL checks kept alive by the
    /// instance, ...
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub checks: Vec<Check>,
}

impl Instance {
    /// The worst status of its checks (passing when it has none).
    pub fn aggregate(checks: &[Check]) -> Health {
        checks
            .iter()
            .map(|c| c.status)
            .max()
            .unwrap_or(Health::Passing)
    }
}

/// Whether the instance may receive traffic: passing and warning ones do, critical ones not.
#[derive(
    Clone,
    Copy,
    Debug,
    PartialEq,
    Eq,
    PartialOrd,
    Ord,
    Hash,
    Serialize,
    Deserialize,
    utoipa::ToSchema,
)]
#[serde(rename_all = "snake_case")]
pub enum Health {
    Passing,
    Warning,
    Critical,
}

impl Health {
    pub fn as_str(self) -> &'static str {
        match self {
            Health::Passing => "passing",
            Health::Warning => "warning",
            Health::Critical => "critical",
        }
    }
}

/// One health check of an instance.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize, utoipa::ToSchema)]
pub struct Check {
    /// Unique within the instance.
    pub id: String,
    #[serde(default)]
    pub name: String,
    pub kind: CheckKind,
    pub status: Health,
    /// What the check last said (a probe's failure, a TTL update's note).
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub output: String,
    /// A TTL check turns critical when no update came within this.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub ttl_ms: Option<u64>,
    /// When the status was last set (unix ms).
    pub updated_ms: u64,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize, utoipa::ToSchema)]
#[serde(rename_all = "snake_case")]
pub enum CheckKind {
    /// The supervisor's health probe (HTTP, TCP or a command).
    Probe,
    /// Kept alive by the instance (pass, warn, fail) within its TTL.
    Ttl,
    /// The gateway's passive signals: warning while its outlier detection has the instance
    /// ejected (it still gets the traffic the ejection rules allow).
    Passive,
}

/// Who vouches for an instance.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize, utoipa::ToSchema)]
#[serde(tag = "type", rename_all = "snake_case")]
pub enum InstanceSource {
    /// Started and probed by the supervisor; registered while healthy.
    Supervised,
    /// A fixed address from the spec (`endpoints`); lives as long as the spec says so.
    Static,
    /// Registered itself over the admin API and keeps a lease alive by heartbeats.
    External {
        ttl_ms: u64,
        /// Wall-clock time of the last heartbeat (or registration).
        last_heartbeat_ms: u64,
    },
}

/// Instances by service name, in name order (a persistent map: clones share structure).
pub type ServiceMap = imbl::OrdMap<Arc<str>, Arc<[Arc<Instance>]>>;

/// An immutable view of the whole registry at one revision.
#[derive(Clone, Debug, Default)]
pub struct RegistrySnapshot {
    pub revision: u64,
    /// Instances by service name, sorted by instance id. A service whose instances did not
    /// change keeps the very same list (pointer-equal) from one snapshot to the next, so a
    /// reader can tell what changed without comparing instances. Instances are shared too: a
    /// list rebuilt for one change copies pointers, not instances. The map is persistent
    /// (structurally shared): the next snapshot copies only the paths to what changed, so
    /// publishing costs what changed, not the number of services.
    pub services: ServiceMap,
    /// The services whose instance lists changed since the snapshot of revision `since` (the
    /// one this was made from; several changes may be published in one snapshot).
    pub changed: Vec<Arc<str>>,
    pub since: u64,
}

impl RegistrySnapshot {
    pub fn instances(&self, service: &str) -> &[Arc<Instance>] {
        self.services.get(service).map(|v| &v[..]).unwrap_or(&[])
    }
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize, utoipa::ToSchema)]
#[serde(rename_all = "snake_case")]
pub enum RegistryEventKind {
    Registered,
    Updated,
    Deregistered,
    Expired,
}

impl RegistryEventKind {
    /// The name it serializes to.
    pub fn as_str(self) -> &'static str {
        match self {
            RegistryEventKind::Registered => "registered",
            RegistryEventKind::Updated => "updated",
            RegistryEventKind::Deregistered => "deregistered",
            RegistryEventKind::Expired => "expired",
        }
    }
}

/// One change to the registry, as streamed to watchers.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize, utoipa::ToSchema)]
pub struct RegistryEvent {
    pub revision: u64,
    pub kind: RegistryEventKind,
    pub at_ms: u64,
    pub instance: Instance,
}
