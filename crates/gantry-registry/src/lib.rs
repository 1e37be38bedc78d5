//! The service registry: which instances of which service are up, where, at what version.
//!
//! Two kinds of instances live here. Supervised ones are put in by the supervisor while they are
//! healthy and taken out the moment they exit, fail health or start draining. External ones
//! register themselves over the admin API with a TTL lease, keep it alive by heartbeats, and
//! expire when a heartbeat is missed; their registrations are persisted in the store, so a
//! restart of gantry keeps them (each gets a fresh lease at start).
//!
//! Architecture invariant: every change bumps the revision, publishes a new immutable
//! [`RegistrySnapshot`], calls the change listeners synchronously (so the gateway's route table is
//! updated before the mutating call returns), and emits a [`RegistryEvent`] for watchers.
#![forbid(unsafe_code)]

use std::collections::BTreeMap;
use std::net::{IpAddr, Ipv4Addr};
use std::sync::{Arc, Mutex, PoisonError};
use std::time::Duration;

use gantry_model::{
    unix_ms, Check, CheckKind, Health, Instance, InstanceSource, RegistryEvent, RegistryEventKind,
    RegistrySnapshot,
};
use gantry_store::{Store, StoreError, StoreJsonExt};
use gantry_telemetry::Metrics;
use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use serde::{Deserialize, Serialize};
use tokio::sync::broadcast;

const BUCKET: &str = "registry";
/// Shortest and longest lease a self-registered instance may ask for.
pub const MIN_TTL_MS: u64 = 1_000;
pub const MAX_TTL_MS: u64 = 24 * 3_600_000;
const DEFAULT_TTL_MS: u64 = 30_000;

#[derive(Debug, thiserror::Error)]
pub enum RegistryError {
    #[error("{0}")]
    Invalid(String),
    #[error("instance {0} is not registered")]
    NotFound(String),
    #[error("{0}")]
    Conflict(String),
    #[error(transparent)]
    Store(#[from] StoreError),
}

/// What a self-registering instance sends.
#[derive(Debug, Clone, Deserialize, Serialize, utoipa::ToSchema)]
#[serde(deny_unknown_fields)]
pub struct Registration {
    pub service: String,
    /// Client-chosen id, for idempotent re-registration; generated when absent.
    #[serde(default)]
    pub id: Option<String>,
    /// Semantic version; default `0.0.0`.
    #[serde(default)]
    pub version: Option<String>,
    /// Default 127.0.0.1.
    #[serde(default)]
    #[schema(value_type = Option<String>)]
    pub address: Option<IpAddr>,
    pub port: u16,
    #[serde(default)]
    pub metadata: BTreeMap<String, String>,
    #[serde(default)]
    pub zone: Option<String>,
    /// Lease length; the instance must heartbeat within it. Default 30000.
    #[serde(default)]
    pub ttl_ms: Option<u64>,
    /// Labels to select it by (at most 64).
    #[serde(default)]
    pub tags: Vec<String>,
    /// TTL health checks the instance keeps alive itself (pass, warn, fail); at most 8.
    #[serde(default)]
    pub checks: Vec<CheckRegistration>,
}

/// A TTL check an instance registers with.
#[derive(Debug, Clone, Deserialize, Serialize, utoipa::ToSchema)]
#[serde(deny_unknown_fields)]
pub struct CheckRegistration {
    /// Unique within the instance; default `ttl`, `ttl-2`, ...
    #[serde(default)]
    pub id: Option<String>,
    #[serde(default)]
    pub name: Option<String>,
    /// The check turns critical when no update came within this (1000..=86400000).
    pub ttl_ms: u64,
    /// Its status until the first update. Default passing.
    #[serde(default)]
    pub status: Option<Health>,
}

/// Which instances a query wants by health.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Deserialize, Serialize, utoipa::ToSchema)]
#[serde(rename_all = "snake_case")]
pub enum HealthFilter {
    /// Passing only.
    Passing,
    /// Passing and warning: what gets traffic (the default).
    #[default]
    Routable,
    /// All, critical ones included.
    Any,
}

impl HealthFilter {
    pub fn admits(self, h: Health) -> bool {
        match self {
            HealthFilter::Passing => h == Health::Passing,
            HealthFilter::Routable => h != Health::Critical,
            HealthFilter::Any => true,
        }
    }
}

/// A lookup: one service's instances by version, tags, metadata, zone and health, ordered for
/// locality (this node first, then the `near` zone, then the rest).
#[derive(Debug, Clone, Default)]
pub struct Query {
    pub service: String,
    pub version: Option<semver::VersionReq>,
    /// Every one of these tags.
    pub tags: Vec<String>,
    /// Every one of these metadata entries.
    pub metadata: BTreeMap<String, String>,
    /// Only this zone.
    pub zone: Option<String>,
    /// Preferred zone: its instances come first.
    pub near: Option<String>,
    pub health: HealthFilter,
}

type Listener = Box<dyn Fn(&Arc<RegistrySnapshot>) + Send + Sync>;

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct ServiceLabel {
    service: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct KindLabel {
    kind: &'static str,
}

struct State {
    revision: u64,
    /// By instance id.
    /// Shared with the snapshots' lists (a change copies the one instance it changes).
    instances: BTreeMap<String, Arc<Instance>>,
    /// Instance ids by service, to rebuild one service's list without a scan of all.
    /// The same instances by service, then id: a service's list is rebuilt by walking its own
    /// map (no lookups in the whole table).
    ids: BTreeMap<Arc<str>, BTreeMap<String, Arc<Instance>>>,
    snapshot: Arc<RegistrySnapshot>,
    /// The revision at which each service's list last changed (kept when it empties): the
    /// index a blocking query on that service waits past.
    index: BTreeMap<Arc<str>, u64>,
}

const WRITE_SHARDS: usize = 64;

/// The registry. Cheap to share behind an `Arc`.
pub struct Registry {
    state: Mutex<State>,
    /// Writes of self-registrations, serialized per id (by hash): the store and the live table
    /// take a given id's writes in the same order, so they agree on the one that won.
    writes: [tokio::sync::Mutex<()>; WRITE_SHARDS],
    listeners: Mutex<Vec<Listener>>,
    /// Changes waiting to be published with the next snapshot (see `apply`).
    pending: Mutex<Vec<(RegistryEventKind, Instance)>>,
    events: broadcast::Sender<RegistryEvent>,
    store: Arc<dyn Store>,
    node: String,
    instances_gauge: Family<ServiceLabel, Gauge>,
    changes: Family<KindLabel, Counter>,
    /// The latest revision, for blocking queries.
    revision_tx: tokio::sync::watch::Sender<u64>,
}

impl Registry {
    /// Build the registry and load persisted self-registrations (each gets a fresh lease).
    pub async fn open(
        store: Arc<dyn Store>,
        node: String,
        metrics: &Metrics,
    ) -> Result<Arc<Self>, RegistryError> {
        let instances_gauge = Family::<ServiceLabel, Gauge>::default();
        let changes = Family::<KindLabel, Counter>::default();
        metrics.register("registry", |r| {
            r.register(
                "instances",
                "Instances in the registry by service",
                instances_gauge.clone(),
            );
            r.register(
                "changes",
                "Registry changes by kind (registered, updated, deregistered, expired)",
                changes.clone(),
            );
        });
        let (events, _) = broadcast::channel(1024);
        let reg = Arc::new(Self {
            writes: std::array::from_fn(|_| tokio::sync::Mutex::new(())),
            state: Mutex::new(State {
                revision: 0,
                instances: BTreeMap::new(),
                ids: BTreeMap::new(),
                snapshot: Arc::new(RegistrySnapshot::default()),
                index: BTreeMap::new(),
            }),
            listeners: Mutex::new(Vec::new()),
            pending: Mutex::new(Vec::new()),
            events,
            store,
            node,
            instances_gauge,
            changes,
            revision_tx: tokio::sync::watch::channel(0).0,
        });
        let now = unix_ms();
        let persisted: Vec<(String, Instance, u64)> = reg.store.list_json(BUCKET, ">").await?;
        // An external instance of one of Gantry's own services (registered before they were
        // refused) is not taken back: it leaves the store.
        for (key, inst, _) in &persisted {
            if gantry_model::is_builtin_service(&inst.service) {
                let _ = reg.store.delete(BUCKET, key).await;
            }
        }
        reg.load(persisted.into_iter().filter_map(|(_, mut inst, _)| {
            if gantry_model::is_builtin_service(&inst.service) {
                return None;
            }
            let InstanceSource::External { ttl_ms, .. } = inst.source else {
                return None;
            };
            inst.source = InstanceSource::External {
                ttl_ms,
                last_heartbeat_ms: now,
            };
            // Checks start again from their registered status, with a full TTL.
            for c in &mut inst.checks {
                c.updated_ms = now;
            }
            Some(inst)
        }));
        Ok(reg)
    }

    /// Put persisted registrations in at once: one snapshot for all of them (linear in their
    /// number, where one change each would rebuild a service's list per instance), no events
    /// (nobody can be watching before `open` returns).
    fn load(&self, instances: impl Iterator<Item = Instance>) {
        let mut st = self.lock();
        for inst in instances {
            let inst = Arc::new(inst);
            st.ids
                .entry(inst.service.as_str().into())
                .or_default()
                .insert(inst.id.clone(), inst.clone());
            st.instances.insert(inst.id.clone(), inst);
        }
        if st.instances.is_empty() {
            return;
        }
        st.revision += 1;
        let mut services = gantry_model::ServiceMap::new();
        for (name, ids) in &st.ids {
            let list: Arc<[Arc<Instance>]> = ids.values().cloned().collect();
            self.instances_gauge
                .get_or_create(&ServiceLabel {
                    service: name.to_string(),
                })
                .set(list.len() as i64);
            services.insert(name.clone(), list);
        }
        let changed: Vec<Arc<str>> = services.keys().cloned().collect();
        let rev = st.revision;
        for name in &changed {
            st.index.insert(name.clone(), rev);
        }
        self.revision_tx.send_replace(rev);
        let since = st.snapshot.revision;
        st.snapshot = Arc::new(RegistrySnapshot {
            revision: st.revision,
            services,
            changed,
            since,
        });
    }

    /// Call `f` with every new snapshot, synchronously, in revision order. `f` must be quick
    /// and must not call back into the registry.
    pub fn on_change(&self, f: impl Fn(&Arc<RegistrySnapshot>) + Send + Sync + 'static) {
        // Lock order (state, then listeners) matches `publish`, so no change can slip between
        // the first call and the registration.
        let st = self.lock();
        f(&st.snapshot);
        self.listeners
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .push(Box::new(f));
        drop(st);
    }

    pub fn node(&self) -> &str {
        &self.node
    }

    pub fn snapshot(&self) -> Arc<RegistrySnapshot> {
        self.lock().snapshot.clone()
    }

    /// Watch stream of changes from now on.
    pub fn subscribe(&self) -> broadcast::Receiver<RegistryEvent> {
        self.events.subscribe()
    }

    /// The instance as stored (shared, not copied).
    fn shared(&self, id: &str) -> Option<Arc<Instance>> {
        self.lock().instances.get(id).cloned()
    }

    pub fn get(&self, id: &str) -> Option<Instance> {
        self.lock().instances.get(id).map(|i| (**i).clone())
    }

    /// The instances a query selects, ordered for locality, and the index of the service's
    /// last change (what a blocking query passes back to wait for the next one).
    pub fn query(&self, q: &Query) -> (u64, Vec<Instance>) {
        let (snap, index) = {
            let st = self.lock();
            (
                st.snapshot.clone(),
                st.index.get(q.service.as_str()).copied().unwrap_or(0),
            )
        };
        let mut out: Vec<Instance> = snap
            .instances(&q.service)
            .iter()
            .filter(|i| q.health.admits(i.health))
            .filter(|i| q.version.as_ref().is_none_or(|r| r.matches(&i.version)))
            .filter(|i| q.tags.iter().all(|t| i.tags.contains(t)))
            .filter(|i| q.metadata.iter().all(|(k, v)| i.metadata.get(k) == Some(v)))
            .filter(|i| q.zone.is_none() || i.zone == q.zone)
            .map(|i| (**i).clone())
            .collect();
        // Locality: this node, then the preferred zone, then the rest (by id within each).
        out.sort_by_key(|i| {
            (
                i.node != self.node,
                q.near.is_some() && i.zone != q.near,
                i.id.clone(),
            )
        });
        (index.max(1), out)
    }

    /// The index of `service`'s last change (0: never seen).
    pub fn service_index(&self, service: &str) -> u64 {
        self.lock().index.get(service).copied().unwrap_or(0)
    }

    /// The registry's revision (the index of its last change of any service).
    pub fn revision(&self) -> u64 {
        self.lock().revision
    }

    /// Wait until `service` changes past `index` (or, with `None`, anything changes past it),
    /// at most `wait`; returns the index then. A blocking query, as Consul's `?index=&wait=`.
    pub async fn wait_past(&self, service: Option<&str>, index: u64, wait: Duration) -> u64 {
        let current = |me: &Self| match service {
            Some(s) => me.service_index(s),
            None => me.revision(),
        };
        let mut rx = self.revision_tx.subscribe();
        let deadline = tokio::time::Instant::now() + wait;
        loop {
            let now = current(self);
            // An index from the future (another gantry's, or before a restart): answer at once
            // with ours, as Consul does when the index goes backwards.
            if now > index || index > self.revision().max(1) {
                return now.max(1);
            }
            if tokio::time::timeout_at(deadline, rx.changed())
                .await
                .is_err()
            {
                return now.max(1);
            }
        }
    }

    /// Put a supervised instance into rotation (or update it).
    pub fn register_supervised(&self, instance: Instance) -> u64 {
        debug_assert!(matches!(instance.source, InstanceSource::Supervised));
        let kind = if self.lock().instances.contains_key(&instance.id) {
            RegistryEventKind::Updated
        } else {
            RegistryEventKind::Registered
        };
        self.apply(kind, instance)
    }

    /// Put a fixed endpoint from the spec into the registry (not persisted: the spec is).
    pub fn register_static(&self, instance: Instance) -> u64 {
        debug_assert!(matches!(instance.source, InstanceSource::Static));
        self.apply(RegistryEventKind::Registered, instance)
    }

    /// Remove a fixed endpoint the spec no longer declares.
    pub fn deregister_static(&self, id: &str) -> Option<u64> {
        match self.get(id)?.source {
            InstanceSource::Static => self.remove(id, RegistryEventKind::Deregistered),
            _ => None,
        }
    }

    /// Take a supervised instance out of rotation. Returns the new revision, or `None` if the
    /// instance was not registered.
    pub fn deregister_supervised(&self, id: &str) -> Option<u64> {
        self.remove(id, RegistryEventKind::Deregistered)
    }

    /// Register (or re-register) a self-registered instance; durable when this returns.
    pub async fn register_external(&self, reg: Registration) -> Result<Instance, RegistryError> {
        if !gantry_model::is_valid_service_name(&reg.service) {
            return Err(RegistryError::Invalid(format!(
                "service: invalid name {:?}; expected 1-63 characters of a-z, 0-9 and '-' starting with a letter",
                reg.service
            )));
        }
        if gantry_model::is_builtin_service(&reg.service) {
            return Err(RegistryError::Invalid(format!(
                "service: {:?} is Gantry's own; only Gantry registers its instances",
                reg.service
            )));
        }
        if reg.version.as_ref().is_some_and(|v| v.len() > 128) {
            return Err(RegistryError::Invalid(
                "version: at most 128 characters".into(),
            ));
        }
        if let Some(z) = &reg.zone {
            let ok = !z.is_empty()
                && z.len() <= 64
                && z.bytes().all(|c| {
                    c.is_ascii_lowercase() || c.is_ascii_digit() || matches!(c, b'-' | b'_' | b'.')
                });
            if !ok {
                return Err(RegistryError::Invalid(format!(
                    "zone: expected 1-64 characters of a-z, 0-9, '-', '_' and '.', got {} bytes",
                    z.len()
                )));
            }
        }
        let version = match &reg.version {
            None => semver::Version::new(0, 0, 0),
            Some(v) => semver::Version::parse(v).map_err(|e| {
                RegistryError::Invalid(format!("version: invalid semantic version {v:?}: {e}"))
            })?,
        };
        if reg.port == 0 {
            return Err(RegistryError::Invalid("port: expected 1-65535".into()));
        }
        let ttl_ms = reg.ttl_ms.unwrap_or(DEFAULT_TTL_MS);
        if !(MIN_TTL_MS..=MAX_TTL_MS).contains(&ttl_ms) {
            return Err(RegistryError::Invalid(format!(
                "ttl_ms: expected {MIN_TTL_MS}..={MAX_TTL_MS}, got {ttl_ms}"
            )));
        }
        if reg.metadata.len() > 64
            || reg
                .metadata
                .iter()
                .any(|(k, v)| k.is_empty() || k.len() > 128 || v.len() > 1024)
        {
            return Err(RegistryError::Invalid(
                "metadata: at most 64 entries, keys 1-128 bytes, values up to 1024 bytes".into(),
            ));
        }
        if reg.tags.len() > 64
            || reg
                .tags
                .iter()
                .any(|t| t.is_empty() || t.len() > 128 || t.chars().any(char::is_control))
        {
            return Err(RegistryError::Invalid(
                "tags: at most 64, each 1-128 characters without control characters".into(),
            ));
        }
        let now = unix_ms();
        let checks = checks_from(&reg.checks, now)?;
        let id = match reg.id {
            Some(id) => {
                if !valid_external_id(&id) {
                    return Err(RegistryError::Invalid(format!(
                        "id: invalid instance id {id:?}; expected 1-128 characters of a-z, 0-9, '-', '_' and '.', not starting or ending with '.' and no '..'"
                    )));
                }
                id
            }
            None => format!("{}-x{}", reg.service, random_hex(4)),
        };
        let _write = self.write_lock(&id).await;
        if let Some(existing) = self.shared(&id) {
            if !matches!(existing.source, InstanceSource::External { .. })
                || existing.service != reg.service
            {
                return Err(RegistryError::Conflict(format!(
                    "instance id {id} is already used by another instance of service {}",
                    existing.service
                )));
            }
        }
        let inst = Instance {
            id: id.clone(),
            service: reg.service,
            version,
            address: reg.address.unwrap_or(IpAddr::V4(Ipv4Addr::LOCALHOST)),
            port: reg.port,
            metadata: reg.metadata,
            node: self.node.clone(),
            zone: reg.zone,
            health: Instance::aggregate(&checks),
            source: InstanceSource::External {
                ttl_ms,
                last_heartbeat_ms: now,
            },
            registered_at_ms: now,
            tags: reg.tags,
            checks,
        };
        self.store.put_json(BUCKET, &id, &inst).await?;
        let kind = if self.lock().instances.contains_key(&id) {
            RegistryEventKind::Updated
        } else {
            RegistryEventKind::Registered
        };
        self.apply_async(kind, inst.clone()).await;
        Ok(inst)
    }

    async fn write_lock(&self, id: &str) -> tokio::sync::MutexGuard<'_, ()> {
        use std::hash::{Hash, Hasher};
        let mut h = std::collections::hash_map::DefaultHasher::new();
        id.hash(&mut h);
        self.writes[(h.finish() as usize) % WRITE_SHARDS]
            .lock()
            .await
    }

    /// Renew a self-registered instance's lease.
    pub fn heartbeat(&self, id: &str) -> Result<Instance, RegistryError> {
        let mut guard = self.lock();
        let st = &mut *guard;
        match st.instances.get_mut(id) {
            Some(shared) => match &mut Arc::make_mut(shared).source {
                InstanceSource::External {
                    last_heartbeat_ms, ..
                } => {
                    *last_heartbeat_ms = unix_ms();
                    // The service's map shares the instance: the renewed one there too.
                    if let Some(m) = st.ids.get_mut(shared.service.as_str()) {
                        m.insert(shared.id.clone(), shared.clone());
                    }
                    Ok((**shared).clone())
                }
                InstanceSource::Supervised | InstanceSource::Static => {
                    Err(RegistryError::Conflict(format!(
                        "instance {id} is declared by the spec; it has no lease"
                    )))
                }
            },
            None => Err(RegistryError::NotFound(id.into())),
        }
    }

    /// Set a TTL check's status (`pass`, `warn`, `fail` of the instance itself); also renews
    /// the instance's lease. A change of status republishes the instance (a critical one
    /// leaves routing before this returns); the status itself is not persisted: after a
    /// restart of gantry each check starts from the status it was registered with.
    pub fn update_check(
        &self,
        id: &str,
        check: &str,
        status: Health,
        output: &str,
    ) -> Result<Instance, RegistryError> {
        let output: String = output.chars().take(4096).collect();
        let mut st = self.lock();
        let Some(inst) = st.instances.get_mut(id).map(Arc::make_mut) else {
            return Err(RegistryError::NotFound(id.into()));
        };
        let InstanceSource::External {
            last_heartbeat_ms, ..
        } = &mut inst.source
        else {
            return Err(RegistryError::Conflict(format!(
                "instance {id} is declared by the spec; its health is the supervisor's probe"
            )));
        };
        let now = unix_ms();
        // The lease is renewed only by an update that lands: a wrong check id renews nothing.
        let Some(pos) = inst.checks.iter().position(|c| c.id == check) else {
            return Err(RegistryError::NotFound(format!("{id}: check {check}")));
        };
        *last_heartbeat_ms = now;
        let c = &mut inst.checks[pos];
        let changed = c.status != status;
        c.status = status;
        c.output = output;
        c.updated_ms = now;
        if !changed {
            return Ok(inst.clone());
        }
        inst.health = Instance::aggregate(&inst.checks);
        let inst = inst.clone();
        // Published under the same lock: updates of one instance publish in the order made.
        self.apply_in(&mut st, RegistryEventKind::Updated, inst.clone());
        Ok(inst)
    }

    /// Set (or clear, with `None`) a check the instance does not keep itself, such as the
    /// gateway's passive signals; republishes the instance only when its status changed.
    pub fn set_check(&self, id: &str, check: &str, status: Option<(Health, String)>) -> bool {
        let mut st = self.lock();
        let Some(inst) = st.instances.get_mut(id).map(Arc::make_mut) else {
            return false;
        };
        let now = unix_ms();
        let pos = inst.checks.iter().position(|c| c.id == check);
        let changed = match (pos, status) {
            (None, None) => false,
            (Some(p), None) => {
                inst.checks.remove(p);
                true
            }
            (Some(p), Some((s, out))) => {
                let c = &mut inst.checks[p];
                let changed = c.status != s;
                c.status = s;
                c.output = out;
                c.updated_ms = now;
                changed
            }
            (None, Some((s, out))) => {
                inst.checks.push(Check {
                    id: check.to_string(),
                    name: check.to_string(),
                    kind: CheckKind::Passive,
                    status: s,
                    output: out,
                    ttl_ms: None,
                    updated_ms: now,
                });
                true
            }
        };
        if changed {
            inst.health = Instance::aggregate(&inst.checks);
            let inst = inst.clone();
            self.apply_in(&mut st, RegistryEventKind::Updated, inst);
        }
        changed
    }

    /// Turn TTL checks whose time ran out critical; returns the instances that changed.
    pub fn expire_checks(&self, now_ms: u64) -> Vec<String> {
        let mut st = self.lock();
        let due: Vec<Instance> = {
            let mut due = Vec::new();
            for inst in st.instances.values_mut() {
                let expiring = inst.checks.iter().any(|c| {
                    c.status != Health::Critical
                        && c.ttl_ms
                            .is_some_and(|ttl| now_ms.saturating_sub(c.updated_ms) > ttl)
                });
                if !expiring {
                    continue;
                }
                let inst = Arc::make_mut(inst);
                let mut changed = false;
                for c in &mut inst.checks {
                    let expired = c
                        .ttl_ms
                        .is_some_and(|ttl| now_ms.saturating_sub(c.updated_ms) > ttl);
                    if expired && c.status != Health::Critical {
                        c.status = Health::Critical;
                        c.output =
                            format!("TTL expired: no update within {} ms", c.ttl_ms.unwrap_or(0));
                        changed = true;
                    }
                }
                if changed {
                    inst.health = Instance::aggregate(&inst.checks);
                    due.push(inst.clone());
                }
            }
            due
        };
        let mut out = Vec::with_capacity(due.len());
        let mut items = Vec::with_capacity(due.len());
        for inst in due {
            tracing::info!(instance = %inst.id, "TTL check expired; instance is critical");
            out.push(inst.id.clone());
            items.push(Self::insert(&mut st, RegistryEventKind::Updated, inst));
        }
        // One snapshot for all of them (many TTLs can run out together, e.g. after a restart).
        if !items.is_empty() {
            self.publish(&mut st, items);
        }
        out
    }

    /// Remove a self-registered instance; durable when this returns.
    pub async fn deregister_external(&self, id: &str) -> Result<(), RegistryError> {
        let _write = self.write_lock(id).await;
        match self.get(id) {
            None => return Err(RegistryError::NotFound(id.into())),
            Some(i) if !matches!(i.source, InstanceSource::External { .. }) => {
                return Err(RegistryError::Conflict(format!(
                    "instance {id} is declared by the spec; change the spec or scale its service instead"
                )))
            }
            Some(_) => {}
        }
        self.store.delete(BUCKET, id).await?;
        self.remove(id, RegistryEventKind::Deregistered);
        Ok(())
    }

    /// Expire self-registered instances whose lease ran out; returns the expired ids.
    pub async fn expire_due(&self, now_ms: u64) -> Vec<String> {
        let due: Vec<String> = self
            .lock()
            .instances
            .values()
            .filter(|i| match i.source {
                InstanceSource::External {
                    ttl_ms,
                    last_heartbeat_ms,
                } => now_ms.saturating_sub(last_heartbeat_ms) > ttl_ms,
                InstanceSource::Supervised | InstanceSource::Static => false,
            })
            .map(|i| i.id.clone())
            .collect();
        let mut expired = Vec::with_capacity(due.len());
        for id in due {
            let _write = self.write_lock(&id).await;
            // Renewed or replaced while we waited for the lock: not due any more.
            let still_due = self.shared(&id).is_some_and(|i| match i.source {
                InstanceSource::External {
                    ttl_ms,
                    last_heartbeat_ms,
                } => now_ms.saturating_sub(last_heartbeat_ms) > ttl_ms,
                InstanceSource::Supervised | InstanceSource::Static => false,
            });
            if !still_due {
                continue;
            }
            tracing::info!(instance = %id, "lease expired; instance removed from registry");
            if let Err(e) = self.store.delete(BUCKET, &id).await {
                tracing::warn!(instance = %id, error = %e, "could not delete expired registration");
            }
            self.remove(&id, RegistryEventKind::Expired);
            expired.push(id);
        }
        expired
    }

    /// Run lease expiry until `shutdown` resolves.
    pub async fn run_expiry(self: Arc<Self>, mut shutdown: tokio::sync::watch::Receiver<bool>) {
        let mut tick = tokio::time::interval(Duration::from_millis(100));
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            tokio::select! {
                _ = tick.tick() => {
                    let now = unix_ms();
                    self.expire_checks(now);
                    self.expire_due(now).await;
                }
                _ = shutdown.changed() => return,
            }
        }
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, State> {
        self.state.lock().unwrap_or_else(PoisonError::into_inner)
    }

    fn remove(&self, id: &str, kind: RegistryEventKind) -> Option<u64> {
        let mut st = self.lock();
        let inst = Arc::unwrap_or_clone(st.instances.remove(id)?);
        if let Some(ids) = st.ids.get_mut(inst.service.as_str()) {
            ids.remove(id);
            if ids.is_empty() {
                st.ids.remove(inst.service.as_str());
            }
        }
        Some(self.publish(&mut st, vec![(kind, inst, None)]))
    }

    /// Put an instance in and publish. Concurrent callers are published together: each queues
    /// its change, and whoever holds the state lock next applies every queued change and
    /// publishes one snapshot for all of them (so 64 registrations in flight cost one snapshot
    /// and one listener call, not 64). A change is published before its `apply` returns.
    fn apply(&self, kind: RegistryEventKind, inst: Instance) -> u64 {
        self.pending
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .push((kind, inst));
        self.publish_pending()
    }

    /// [`Registry::apply`] for async callers: after queueing, let the other tasks that are
    /// ready (registrations whose store write completed in the same group commit) queue
    /// theirs, so that one snapshot publishes them all, also on a single thread.
    async fn apply_async(&self, kind: RegistryEventKind, inst: Instance) -> u64 {
        self.pending
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .push((kind, inst));
        // Published even if this future is dropped at the yield: a queued change never waits
        // for someone else's.
        struct Publish<'a>(&'a Registry, bool);
        impl Drop for Publish<'_> {
            fn drop(&mut self) {
                if !self.1 {
                    self.0.publish_pending();
                }
            }
        }
        let mut guard = Publish(self, false);
        tokio::task::yield_now().await;
        guard.1 = true;
        self.publish_pending()
    }

    fn publish_pending(&self) -> u64 {
        let mut st = self.lock();
        let batch =
            std::mem::take(&mut *self.pending.lock().unwrap_or_else(PoisonError::into_inner));
        if batch.is_empty() {
            // Published by the caller that held the lock before us.
            return st.revision;
        }
        let items = batch
            .into_iter()
            .map(|(kind, inst)| Self::insert(&mut st, kind, inst))
            .collect();
        self.publish(&mut st, items)
    }

    /// [`Registry::apply`] of one change with the state lock already held.
    fn apply_in(&self, st: &mut State, kind: RegistryEventKind, inst: Instance) -> u64 {
        let item = Self::insert(st, kind, inst);
        self.publish(st, vec![item])
    }

    /// Put an instance into the tables; returns what `publish` needs of it.
    fn insert(
        st: &mut State,
        kind: RegistryEventKind,
        inst: Instance,
    ) -> (RegistryEventKind, Instance, Option<String>) {
        let mut moved_from = None;
        let shared = Arc::new(inst.clone());
        if let Some(old) = st.instances.insert(inst.id.clone(), shared.clone()) {
            // Re-registered under another service (self-registrations keep theirs; checked):
            // it leaves the old service's list in the same snapshot.
            if old.service != inst.service {
                if let Some(ids) = st.ids.get_mut(old.service.as_str()) {
                    ids.remove(&old.id);
                    if ids.is_empty() {
                        st.ids.remove(old.service.as_str());
                    }
                }
                moved_from = Some(old.service.clone());
            }
        }
        st.ids
            .entry(inst.service.as_str().into())
            .or_default()
            .insert(inst.id.clone(), shared);
        (kind, inst, moved_from)
    }

    /// Called with the state lock held, after the tables took `items`: bump the revision once
    /// per change, publish one snapshot in which only the changed services' lists are new (the
    /// others are shared with the last one), notify the listeners once, and send one event per
    /// change. Returns the new revision.
    fn publish(
        &self,
        st: &mut State,
        items: Vec<(RegistryEventKind, Instance, Option<String>)>,
    ) -> u64 {
        let mut services = st.snapshot.services.clone();
        let mut changed: Vec<Arc<str>> = Vec::with_capacity(items.len() + 1);
        let mut events = Vec::with_capacity(items.len());
        for (kind, inst, moved_from) in items {
            st.revision += 1;
            for service in std::iter::once(inst.service.as_str()).chain(moved_from.as_deref()) {
                let name: Arc<str> = match st.ids.get_key_value(service) {
                    Some((k, _)) => k.clone(),
                    None => service.into(),
                };
                st.index.insert(name.clone(), st.revision);
                if !changed.contains(&name) {
                    changed.push(name);
                }
            }
            self.changes
                .get_or_create(&KindLabel {
                    kind: kind.as_str(),
                })
                .inc();
            events.push(RegistryEvent {
                revision: st.revision,
                kind,
                at_ms: unix_ms(),
                instance: inst,
            });
        }
        for name in &changed {
            let list: Vec<Arc<Instance>> = st
                .ids
                .get(name)
                .map(|ids| ids.values().cloned().collect())
                .unwrap_or_default();
            self.instances_gauge
                .get_or_create(&ServiceLabel {
                    service: name.to_string(),
                })
                .set(list.len() as i64);
            if list.is_empty() {
                services.remove(name);
            } else {
                services.insert(name.clone(), list.into());
            }
        }
        self.revision_tx.send_replace(st.revision);
        let since = st.snapshot.revision;
        st.snapshot = Arc::new(RegistrySnapshot {
            revision: st.revision,
            services,
            changed,
            since,
        });
        for l in self
            .listeners
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .iter()
        {
            l(&st.snapshot);
        }
        for e in events {
            let _ = self.events.send(e);
        }
        st.revision
    }
}

/// The TTL checks of a registration, validated.
fn checks_from(regs: &[CheckRegistration], now: u64) -> Result<Vec<Check>, RegistryError> {
    if regs.len() > 8 {
        return Err(RegistryError::Invalid("checks: at most 8".into()));
    }
    let mut out: Vec<Check> = Vec::with_capacity(regs.len());
    for (n, c) in regs.iter().enumerate() {
        let id = match &c.id {
            Some(id) => id.clone(),
            None if n == 0 => "ttl".into(),
            None => format!("ttl-{}", n + 1),
        };
        let ok = !id.is_empty()
            && id.len() <= 128
            && id
                .bytes()
                .all(|b| b.is_ascii_alphanumeric() || b"-_.:".contains(&b));
        if !ok {
            return Err(RegistryError::Invalid(format!(
                "checks[{n}].id: expected 1-128 characters of letters, digits, '-', '_', '.' and ':', got {id:?}"
            )));
        }
        if out.iter().any(|x| x.id == id) {
            return Err(RegistryError::Invalid(format!(
                "checks[{n}].id: {id} is given twice"
            )));
        }
        if !(MIN_TTL_MS..=MAX_TTL_MS).contains(&c.ttl_ms) {
            return Err(RegistryError::Invalid(format!(
                "checks[{n}].ttl_ms: expected {MIN_TTL_MS}..={MAX_TTL_MS}, got {}",
                c.ttl_ms
            )));
        }
        let name = c.name.clone().unwrap_or_else(|| id.clone());
        if name.len() > 256 {
            return Err(RegistryError::Invalid(format!(
                "checks[{n}].name: at most 256 bytes"
            )));
        }
        out.push(Check {
            id,
            name,
            kind: CheckKind::Ttl,
            status: c.status.unwrap_or(Health::Passing),
            output: String::new(),
            ttl_ms: Some(c.ttl_ms),
            updated_ms: now,
        });
    }
    Ok(out)
}

fn valid_external_id(id: &str) -> bool {
    !id.is_empty()
        && id.len() <= 128
        && !id.starts_with('.')
        && !id.ends_with('.')
        && !id.contains("..")
        && id.bytes().all(|c| {
            c.is_ascii_lowercase() || c.is_ascii_digit() || matches!(c, b'-' | b'_' | b'.')
        })
}

/// `n` random bytes as lowercase hex.
pub fn random_hex(n: usize) -> String {
    let mut buf = vec![0u8; n];
    if getrandom::fill(&mut buf).is_err() {
        // The OS RNG is unavailable: fall back to time-derived bytes (ids stay unique enough).
        let t = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map(|d| d.as_nanos())
            .unwrap_or(0);
        for (i, b) in buf.iter_mut().enumerate() {
            *b = (t >> ((i % 16) * 8)) as u8;
        }
    }
    buf.iter().map(|b| format!("{b:02x}")).collect()
}

#[cfg(test)]
mod tests;
