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
    pub health: Health,
    pub source: InstanceSource,
    pub registered_at_ms: u64,
}

/// Whether the instance may receive traffic.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize, utoipa::ToSchema)]
#[serde(rename_all = "snake_case")]
pub enum Health {
    Passing,
    Critical,
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

/// An immutable view of the whole registry at one revision.
#[derive(Clone, Debug, Default)]
pub struct RegistrySnapshot {
    pub revision: u64,
    /// Instances by service name, sorted by instance id. A service whose instances did not
    /// change keeps the very same list (pointer-equal) from one snapshot to the next, so a
    /// reader can tell what changed without comparing instances.
    pub services: BTreeMap<Arc<str>, Arc<[Instance]>>,
    /// The services whose instance lists changed at this revision (from the one before).
    pub changed: Vec<Arc<str>>,
}

impl RegistrySnapshot {
    pub fn instances(&self, service: &str) -> &[Instance] {
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
