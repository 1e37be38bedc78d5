//! The supervisor: runs every service's instances as local processes.
//!
//! Structure: a reconciler follows the desired state in the store (`desired.rs`: one
//! `Deployment` per service, written by the spec and the admin API) with a watch, and keeps one
//! controller task per service version (scale, rolling replacement, stop; see `service.rs`), each
//! owning one task per instance (spawn, probe, restart with backoff, drain and stop; see
//! `instance.rs`). A version that changes is replaced instance by instance; a version or service
//! that leaves the desired state is drained and stopped while the others keep serving. The
//! supervisor does not read the spec file. Health thresholds, backoff and crash-loop detection are sans-io cores in
//! `health.rs`; process groups, signals, log capture and orphan reaping are in `process.rs`.
//!
//! Architecture invariants:
//! - an instance is in the registry only while its probe says healthy; it leaves the registry
//!   the moment its process exits (seen through SIGCHLD, not at the next probe), fails its probe,
//!   or starts to stop — always before any signal is sent;
//! - every process group is recorded in the store while alive, and is killed as a whole when its
//!   leader exits or is stopped, so no process outlives its instance.
//!
//! Unsafe code: `process.rs` uses `pre_exec` (for `PR_SET_PDEATHSIG`) and `kill(2)`; both are
//! small, commented, and the only unsafe code in Gantry.
#![deny(unsafe_code)]

mod desired;
mod health;
mod instance;
mod process;
mod service;
mod status;
pub mod usage;

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::sync::atomic::AtomicU32;
use std::sync::{Arc, Mutex, PoisonError};
use std::time::Duration;

use gantry_config::ConfigStore;
use gantry_model::{Deployment, OnConfigChange, VersionDeployment};
use gantry_registry::Registry;
use gantry_store::{Op, Store, StoreError, WatchEvent, WatchFrom};
use gantry_telemetry::{LogStore, LogStream, Metrics};
use serde::Serialize;
use tokio::sync::{mpsc, oneshot, watch};

pub use desired::{DesiredState, SpecApplied, VersionChange, DEPLOY_BUCKET};
pub use health::{Backoff, CrashLoopDetector, HealthTracker, ProbeState, Transition};
pub use service::{Replacement, RestartReport};
pub use status::{EventKind, InstanceState, InstanceStatus, StatusBoard, SupervisorEvent};

/// Most replicas `scale` accepts.
pub const MAX_REPLICAS: u32 = 1000;

#[derive(Debug, thiserror::Error)]
pub enum SupervisorError {
    #[error("unknown service {0:?}")]
    UnknownService(String),
    #[error("{0}")]
    NotFound(String),
    #[error("{0}")]
    Invalid(String),
    #[error("{0}")]
    Conflict(String),
    #[error("{0}")]
    Rollout(String),
    #[error(transparent)]
    Store(#[from] StoreError),
}

/// Tells the supervisor how many requests the gateway still has in flight to an instance, so
/// draining can wait for them.
pub trait DrainObserver: Send + Sync {
    fn inflight(&self, instance: &str) -> usize;
}

/// Echo of instance output to gantry's terminal: (instance, line, stream).
pub type Echo = Arc<dyn Fn(&str, &str, LogStream) + Send + Sync>;

/// Everything the supervisor needs from the rest of gantry. What to run comes from the desired
/// state in the store (`DEPLOY_BUCKET`), not from here.
pub struct SupervisorDeps {
    pub registry: Arc<Registry>,
    pub config: Arc<ConfigStore>,
    pub store: Arc<dyn Store>,
    pub logs: LogStore,
    pub metrics: Metrics,
    pub drain: Arc<dyn DrainObserver>,
    /// Values of `GANTRY_GATEWAY_URL`, `GANTRY_ADMIN_URL`, `GANTRY_NODE`.
    pub gateway_url: String,
    pub admin_url: String,
    /// `GANTRY_BUS_URL`: where instances publish (the bus under the gateway), if anywhere.
    pub bus_url: Option<String>,
    pub node: String,
    pub echo: Option<Echo>,
    /// Each instance gets a fresh directory here (`<dir>/<instance id>`, mode 0700), named in its
    /// `GANTRY_INSTANCE_DIR`, for what hooks write and for the instance's own scratch files.
    pub instances_dir: PathBuf,
    /// Called before every start of every instance, in order.
    pub hooks: Vec<Arc<dyn InstanceHook>>,
    /// Marks every process this system starts (`GANTRY_SYSTEM`), so that processes which leave
    /// their instance's group are still found; stable across restarts of gantry.
    pub system_id: String,
    /// The config environment instances get (`gantry up --env`, `[config] env`).
    pub environment: Option<String>,
}

/// The instance a hook is asked about.
pub struct InstanceInfo<'a> {
    pub service: &'a str,
    pub version: &'a semver::Version,
    pub id: &'a str,
    pub node: &'a str,
    /// The instance's directory (fresh at each start).
    pub dir: &'a Path,
}

/// A file a hook puts into an instance's directory.
pub struct InstanceFile {
    /// Relative to the instance directory; no `..`.
    pub path: PathBuf,
    pub contents: Vec<u8>,
    /// Unix permission bits, e.g. `0o600` for a credential.
    pub mode: u32,
}

/// What a hook adds to an instance before it starts.
#[derive(Default)]
pub struct InstanceAdditions {
    /// Set over the spec's `env` and the config values (gantry's own variables still win).
    pub env: BTreeMap<String, String>,
    pub files: Vec<InstanceFile>,
}

/// Adds per-instance environment and files before each start (identity credentials are the
/// first user), and releases what it issued when the instance is gone for good.
#[async_trait::async_trait]
pub trait InstanceHook: Send + Sync {
    fn name(&self) -> &'static str;
    /// An `Err` keeps the instance from starting (it counts as a failed start and is retried
    /// with backoff), with the message as its reason.
    async fn prepare(&self, instance: &InstanceInfo<'_>) -> Result<InstanceAdditions, String>;
    async fn release(&self, _instance: &InstanceInfo<'_>) {}
}

/// Shared by every controller and instance task.
pub(crate) struct Deps {
    registry: Arc<Registry>,
    config: Arc<ConfigStore>,
    store: Arc<dyn Store>,
    logs: LogStore,
    drain: Arc<dyn DrainObserver>,
    board: Arc<StatusBoard>,
    gateway_url: String,
    admin_url: String,
    bus_url: Option<String>,
    node: String,
    echo: Option<Echo>,
    instances_dir: PathBuf,
    hooks: Vec<Arc<dyn InstanceHook>>,
    system_id: String,
    environment: Option<String>,
    /// Per-instance cgroups, where the machine allows them.
    cgroups: Option<process::Cgroups>,
}

/// What one version's controller and its instances run by: the version's deployment and the
/// service-wide parts of the service's.
pub(crate) struct ServiceCtx {
    name: Arc<str>,
    spec: VersionDeployment,
    version: semver::Version,
    depends_on: Vec<String>,
    metadata: BTreeMap<String, String>,
    /// The config version instances start with (`None`: the current one).
    config_version: Option<u64>,
    /// Instance numbers, shared by the service's versions so that ids stay unique.
    ids: Arc<AtomicU32>,
    deps: Arc<Deps>,
}

impl ServiceCtx {
    fn new(d: &Deployment, v: &VersionDeployment, ids: Arc<AtomicU32>, deps: Arc<Deps>) -> Self {
        Self {
            name: d.service.as_str().into(),
            spec: v.clone(),
            version: v.version.clone(),
            depends_on: d.depends_on.clone(),
            metadata: d.metadata.clone(),
            config_version: d.config_version,
            ids,
            deps,
        }
    }

    /// Whether instances running by `self` must be replaced to run by `other`.
    fn differs_from(&self, other: &ServiceCtx) -> bool {
        self.spec.needs_replacement(&other.spec)
            || self.metadata != other.metadata
            || self.config_version != other.config_version
    }
}

/// One running version of a service: its controller.
struct VersionEntry {
    ctx: Arc<ServiceCtx>,
    /// Unbounded: the reconciler never waits on a controller that is busy rolling or draining
    /// (commands come from desired-state changes, so their number is bounded by those).
    tx: mpsc::UnboundedSender<service::ServiceCmd>,
    desired: watch::Receiver<u32>,
    /// The last instance count sent to the controller (it may not have applied it yet).
    sent: u32,
    task: Option<tokio::task::JoinHandle<()>>,
}

/// A service as the reconciler last applied it.
struct ServiceEntry {
    deployment: Deployment,
    versions: BTreeMap<semver::Version, VersionEntry>,
    ids: Arc<AtomicU32>,
}

/// A service as `gantry services` shows it.
#[derive(Debug, Clone, Serialize, serde::Deserialize, utoipa::ToSchema)]
pub struct ServiceStatus {
    pub name: String,
    /// The versions that should run, comma-separated (one, except during a release).
    pub version: String,
    pub desired: u32,
    pub healthy: usize,
    pub instances: usize,
    pub depends_on: Vec<String>,
    pub on_config_change: OnConfigChange,
}

pub struct Supervisor {
    services: Mutex<BTreeMap<String, ServiceEntry>>,
    /// Instance numbering per service, kept when a service leaves and comes back, so that a new
    /// instance never takes the id of one still draining.
    ids: Mutex<BTreeMap<String, Arc<AtomicU32>>>,
    /// The last desired-state revision the reconciler applied.
    applied: watch::Sender<u64>,
    /// Controllers of versions and services leaving the desired state, still draining.
    leaving: Mutex<Vec<tokio::task::JoinHandle<()>>>,
    deps: Arc<Deps>,
    desired_state: DesiredState,
    board: Arc<StatusBoard>,
    shutdown: watch::Sender<bool>,
}

impl Supervisor {
    /// Build the supervisor (nothing runs until [`Supervisor::start`]).
    pub fn new(d: SupervisorDeps) -> Arc<Self> {
        let board = StatusBoard::new(&d.metrics);
        let cgroups = process::Cgroups::detect(&d.system_id);
        d.metrics.register("supervisor", |r| {
            r.register_collector(Box::new(usage::UsageCollector {
                board: board.clone(),
                cgroups: cgroups.clone(),
            }))
        });
        let deps = Arc::new(Deps {
            registry: d.registry,
            config: d.config,
            store: d.store.clone(),
            logs: d.logs,
            drain: d.drain,
            board: board.clone(),
            gateway_url: d.gateway_url,
            admin_url: d.admin_url,
            bus_url: d.bus_url,
            node: d.node,
            echo: d.echo,
            instances_dir: d.instances_dir,
            hooks: d.hooks,
            cgroups,
            system_id: d.system_id,
            environment: d.environment,
        });
        let (shutdown, _) = watch::channel(false);
        Arc::new(Self {
            services: Mutex::new(BTreeMap::new()),
            ids: Mutex::new(BTreeMap::new()),
            applied: watch::channel(0).0,
            leaving: Mutex::new(Vec::new()),
            deps,
            desired_state: DesiredState::new(d.store),
            board,
            shutdown,
        })
    }

    /// Kill what a previous run left behind, then follow the desired state: start every
    /// service it holds (each waits for its dependencies on its own) and apply every later
    /// change to it. Returns once the desired state as it stands has been applied.
    pub async fn start(self: &Arc<Self>) -> Result<(), SupervisorError> {
        match &self.deps.cgroups {
            Some(cg) => tracing::info!(cgroups = %cg.base().display(), "each instance runs in a cgroup of its own"),
            None => tracing::info!("no cgroup v2 to make here: instances are contained by process group and environment marks"),
        }
        let reaped = process::reap_orphans(
            &self.deps.store,
            &self.deps.system_id,
            self.deps.cgroups.as_ref(),
        )
        .await;
        if !reaped.is_empty() {
            tracing::warn!(
                count = reaped.len(),
                "killed process groups left by a previous run"
            );
        }
        let watcher = self
            .deps
            .store
            .watch(DEPLOY_BUCKET, ">", WatchFrom::Current)
            .await?;
        let (ready_tx, ready_rx) = oneshot::channel();
        let shutdown_rx = self.shutdown.subscribe();
        tokio::spawn(
            self.clone()
                .reconcile(watcher, ready_tx, shutdown_rx.clone()),
        );
        let _ = ready_rx.await;
        tokio::spawn(
            self.clone()
                .follow_config(self.deps.config.clone(), shutdown_rx),
        );
        Ok(())
    }

    /// The desired state this supervisor follows (for its other writers: spec, API).
    pub fn desired(&self) -> &DesiredState {
        &self.desired_state
    }

    /// Follow the desired state. A watch that fails is started again from the last revision
    /// applied, so no change is missed.
    async fn reconcile(
        self: Arc<Self>,
        mut watcher: gantry_store::Watcher,
        ready: oneshot::Sender<()>,
        mut shutdown: watch::Receiver<bool>,
    ) {
        let mut ready = Some(ready);
        let mut last = 0u64;
        loop {
            let ev = tokio::select! {
                ev = watcher.next() => ev,
                _ = shutdown.wait_for(|s| *s) => return,
            };
            match ev {
                Some(Ok(WatchEvent::Current)) => {
                    if let Some(r) = ready.take() {
                        let _ = r.send(());
                    }
                }
                Some(Ok(WatchEvent::Change(c))) => {
                    last = c.revision;
                    match c.op {
                        Op::Put => {
                            match gantry_store::decode::<Deployment>(
                                DEPLOY_BUCKET,
                                &c.key,
                                &c.value,
                            ) {
                                Ok(d) => self.apply(d).await,
                                Err(e) => {
                                    tracing::error!(service = %c.key, error = %e, "unreadable deployment; ignored")
                                }
                            }
                        }
                        Op::Delete => self.remove(&c.key),
                    }
                    self.applied.send_if_modified(|a| {
                        let newer = c.revision > *a;
                        if newer {
                            *a = c.revision;
                        }
                        newer
                    });
                }
                Some(Err(_)) | None => {
                    if *shutdown.borrow() {
                        return;
                    }
                    tracing::warn!(
                        after_revision = last,
                        "desired-state watch ended; watching again"
                    );
                    tokio::time::sleep(Duration::from_millis(200)).await;
                    let from = if last == 0 {
                        WatchFrom::Current
                    } else {
                        WatchFrom::Revision(last + 1)
                    };
                    match self.deps.store.watch(DEPLOY_BUCKET, ">", from).await {
                        Ok(w) => watcher = w,
                        Err(e) => tracing::warn!(error = %e, "cannot watch the desired state"),
                    }
                }
            }
        }
    }

    /// Make one service's running versions match its deployment: start new versions, scale or
    /// replace (rolling) changed ones, drain and stop versions no longer wanted.
    async fn apply(&self, d: Deployment) {
        if *self.shutdown.borrow() {
            return;
        }
        let mut sends = Vec::new();
        let mut leaving = Vec::new();
        {
            let mut services = self.services.lock().unwrap_or_else(PoisonError::into_inner);
            // Checked again under the lock: `shutdown` sets the flag before it takes the map, so
            // nothing started here can miss being stopped.
            if *self.shutdown.borrow() {
                return;
            }
            let ids = self
                .ids
                .lock()
                .unwrap_or_else(PoisonError::into_inner)
                .entry(d.service.clone())
                .or_insert_with(|| Arc::new(AtomicU32::new(1)))
                .clone();
            let entry = services
                .entry(d.service.clone())
                .or_insert_with(|| ServiceEntry {
                    deployment: d.clone(),
                    versions: BTreeMap::new(),
                    ids,
                });
            let shutdown_rx = self.shutdown.subscribe();
            for v in &d.versions {
                let ctx = Arc::new(ServiceCtx::new(&d, v, entry.ids.clone(), self.deps.clone()));
                match entry.versions.get_mut(&v.version) {
                    None => {
                        let (tx, rx) = mpsc::unbounded_channel();
                        let (desired_tx, desired_rx) = watch::channel(v.replicas);
                        let task = tokio::spawn(service::run(
                            ctx.clone(),
                            desired_tx,
                            rx,
                            shutdown_rx.clone(),
                        ));
                        entry.versions.insert(
                            v.version.clone(),
                            VersionEntry {
                                ctx,
                                tx,
                                desired: desired_rx,
                                sent: v.replicas,
                                task: Some(task),
                            },
                        );
                        tracing::info!(service = %d.service, version = %v.version, replicas = v.replicas, "version started");
                    }
                    Some(e) => {
                        if e.ctx.differs_from(&ctx) {
                            sends.push((
                                e.tx.clone(),
                                service::ServiceCmd::Replace {
                                    ctx: ctx.clone(),
                                    reason: "its deployment changed".into(),
                                },
                            ));
                        }
                        if e.sent != v.replicas {
                            e.sent = v.replicas;
                            sends.push((
                                e.tx.clone(),
                                service::ServiceCmd::Scale {
                                    replicas: v.replicas,
                                    reply: None,
                                },
                            ));
                        }
                        e.ctx = ctx;
                    }
                }
            }
            let gone: Vec<semver::Version> = entry
                .versions
                .keys()
                .filter(|v| d.version(v).is_none())
                .cloned()
                .collect();
            for v in gone {
                if let Some(e) = entry.versions.remove(&v) {
                    tracing::info!(service = %d.service, version = %v, "version leaving the desired state");
                    leaving.push(e);
                }
            }
            // A deployment pinned to a config version keeps that version in history.
            let old_pin = entry.deployment.config_version;
            if let Some(v) = d.config_version {
                self.deps.config.pin(&d.service, v);
            }
            if let Some(v) = old_pin.filter(|v| Some(*v) != d.config_version) {
                self.deps.config.unpin(&d.service, v);
            }
            entry.deployment = d;
        }
        for (tx, cmd) in sends {
            let _ = tx.send(cmd);
        }
        self.stop_in_background(leaving);
    }

    /// A service left the desired state: drain and stop all of its versions.
    fn remove(&self, service: &str) {
        if *self.shutdown.borrow() {
            return;
        }
        let entry = self
            .services
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .remove(service);
        if let Some(e) = entry {
            tracing::info!(service, "service leaving the desired state");
            if let Some(v) = e.deployment.config_version {
                self.deps.config.unpin(service, v);
            }
            self.stop_in_background(e.versions.into_values().collect());
        }
    }

    fn stop_in_background(&self, entries: Vec<VersionEntry>) {
        let mut leaving = self.leaving.lock().unwrap_or_else(PoisonError::into_inner);
        leaving.retain(|h| !h.is_finished());
        for e in entries {
            leaving.push(tokio::spawn(stop_version(e)));
        }
    }

    /// Wait for every version still draining in the background (shutdown waits until none is
    /// left, including any pushed while it waited).
    async fn join_leaving(&self) {
        loop {
            let leaving: Vec<_> =
                std::mem::take(&mut *self.leaving.lock().unwrap_or_else(PoisonError::into_inner));
            if leaving.is_empty() {
                return;
            }
            for h in leaving {
                let _ = h.await;
            }
        }
    }

    pub fn board(&self) -> &Arc<StatusBoard> {
        &self.board
    }

    /// Every instance, with what it uses now.
    pub fn instances(&self) -> Vec<InstanceStatus> {
        let mut list = self.board.list();
        for s in &mut list {
            s.usage = usage::of(s, self.deps.cgroups.as_ref());
        }
        list
    }

    pub fn has_service(&self, name: &str) -> bool {
        self.services
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .contains_key(name)
    }

    pub fn services(&self) -> Vec<ServiceStatus> {
        let all = self.board.list();
        let services = self.services.lock().unwrap_or_else(PoisonError::into_inner);
        services
            .iter()
            .map(|(name, e)| {
                let mine: Vec<&InstanceStatus> =
                    all.iter().filter(|i| &i.service == name).collect();
                ServiceStatus {
                    name: name.clone(),
                    version: e
                        .versions
                        .keys()
                        .map(|v| v.to_string())
                        .collect::<Vec<_>>()
                        .join(", "),
                    desired: e.versions.values().map(|v| *v.desired.borrow()).sum(),
                    healthy: mine
                        .iter()
                        .filter(|i| i.state == InstanceState::Healthy)
                        .count(),
                    instances: mine.len(),
                    depends_on: e.deployment.depends_on.clone(),
                    on_config_change: e.deployment.on_config_change,
                }
            })
            .collect()
    }

    /// The command channels of a service's versions (all, or the one named).
    fn senders(
        &self,
        service: &str,
        version: Option<&semver::Version>,
    ) -> Result<Vec<mpsc::UnboundedSender<service::ServiceCmd>>, SupervisorError> {
        if *self.shutdown.borrow() {
            return Err(shutting_down());
        }
        let services = self.services.lock().unwrap_or_else(PoisonError::into_inner);
        let e = services
            .get(service)
            .ok_or_else(|| SupervisorError::UnknownService(service.into()))?;
        Ok(e.versions
            .iter()
            .filter(|(v, _)| version.is_none_or(|want| want == *v))
            .map(|(_, e)| e.tx.clone())
            .collect())
    }

    /// Set the number of instances of a service (of one of its versions when it runs several):
    /// written to the desired state (durable), then applied; returns once the instances have
    /// started or stopped.
    pub async fn scale(
        &self,
        service: &str,
        version: Option<&semver::Version>,
        replicas: u32,
    ) -> Result<(), SupervisorError> {
        if !self.has_service(service) {
            return Err(SupervisorError::UnknownService(service.into()));
        }
        let (d, rev) = self.desired_state.scale(service, version, replicas).await?;
        // The reconciler applies the change; wait for it to have, then for the controller to
        // have done what it was sent (commands run in order).
        let mut applied = self.applied.subscribe();
        let reached = {
            let r = tokio::time::timeout(Duration::from_secs(30), applied.wait_for(|a| *a >= rev))
                .await;
            matches!(r, Ok(Ok(_)))
        };
        if !reached {
            return Err(SupervisorError::Conflict(format!(
                "the new instance count of {service} is stored (revision {rev}) but was not applied within 30 s"
            )));
        }
        let which = if d.versions.len() == 1 { None } else { version };
        for tx in self.senders(service, which)? {
            let (reply, rx) = oneshot::channel();
            tx.send(service::ServiceCmd::Sync { reply })
                .map_err(|_| shutting_down())?;
            rx.await.map_err(|_| shutting_down())?;
        }
        Ok(())
    }

    /// Rolling restart of every version: each instance replaced by a new one that must become
    /// healthy first.
    pub async fn restart(&self, service: &str) -> Result<RestartReport, SupervisorError> {
        let mut report = RestartReport {
            service: service.to_string(),
            replaced: Vec::new(),
        };
        for tx in self.senders(service, None)? {
            let (reply, rx) = oneshot::channel();
            tx.send(service::ServiceCmd::Restart {
                reply: Some(reply),
                reason: "requested".into(),
            })
            .map_err(|_| shutting_down())?;
            let r = rx.await.map_err(|_| shutting_down())??;
            report.replaced.extend(r.replaced);
        }
        Ok(report)
    }

    /// Follow config changes: each affected service (the set's own, or every service for the
    /// global set) gets its running instances' config files rewritten, then what its
    /// `on_config_change` says: `signal` signals each instance; `restart` rolls the service and,
    /// when a new instance fails its health checks, reverts the change (a new config version
    /// says so; that revert rolls the instances already replaced back).
    async fn follow_config(
        self: Arc<Self>,
        config: Arc<ConfigStore>,
        mut shutdown: watch::Receiver<bool>,
    ) {
        let mut rx = config.subscribe();
        loop {
            let changed = tokio::select! {
                c = rx.recv() => c,
                _ = shutdown.wait_for(|s| *s) => return,
            };
            let changed = match changed {
                Ok(c) => c,
                // Changes were missed: rewrite every service's files as if the global set
                // changed (each file gets what is current, so nothing stays behind).
                Err(tokio::sync::broadcast::error::RecvError::Lagged(n)) => {
                    tracing::warn!(missed = n, "config changes came faster than they were followed; rewriting every instance's config file");
                    gantry_config::ConfigChanged {
                        set: gantry_config::GLOBAL.into(),
                        version: 0,
                        reverts: None,
                    }
                }
                Err(_) => return,
            };
            // A version already superseded (commits faster than rollouts) is skipped: the
            // newer one's event follows and carries its values too.
            if changed.version > 0
                && config
                    .version_of(&changed.set)
                    .await
                    .is_ok_and(|v| v > changed.version)
            {
                continue;
            }
            let affected: Vec<(String, OnConfigChange, String, Option<u64>)> = self
                .services
                .lock()
                .unwrap_or_else(PoisonError::into_inner)
                .iter()
                .filter(|(name, _)| changed.set == gantry_config::GLOBAL || **name == changed.set)
                .map(|(name, e)| {
                    (
                        name.clone(),
                        e.deployment.on_config_change,
                        e.deployment.reload_signal.clone(),
                        e.deployment.config_version,
                    )
                })
                .collect();
            for (service, policy, signal, pinned) in affected {
                // A service pinned to a config version does not follow its own set's changes.
                if pinned.is_some() && changed.set != gantry_config::GLOBAL {
                    continue;
                }
                match policy {
                    OnConfigChange::Restart => {
                        // A revert whose bad version reached no instance (the rollout stopped at
                        // its first new one) leaves nothing to roll back.
                        if let (Some(bad), true) = (changed.reverts, changed.set == service) {
                            let reached = self.board.list().iter().any(|r| {
                                r.service == service && r.pid.is_some() && r.config_version >= bad
                            });
                            if !reached {
                                continue;
                            }
                        }
                        let me = self.clone();
                        let config = config.clone();
                        let changed = changed.clone();
                        tokio::spawn(async move {
                            me.config_rollout(&config, &service, &changed).await;
                        });
                    }
                    // In tasks of their own: a global change reaches every service, and one
                    // service's files must not wait for another's.
                    OnConfigChange::Signal => {
                        let me = self.clone();
                        tokio::spawn(async move {
                            me.reconfigure(&service, Some(process::signal_number(&signal)))
                                .await
                        });
                    }
                    OnConfigChange::None => {
                        let me = self.clone();
                        tokio::spawn(async move { me.reconfigure(&service, None).await });
                    }
                }
            }
        }
    }

    /// Rewrite the config file of each running instance of `service`, then send it `signal`.
    async fn reconfigure(&self, service: &str, signal: Option<i32>) {
        let rows: Vec<status::InstanceStatus> = self
            .board
            .list()
            .into_iter()
            // Healthy ones only: a starting instance reads its file when it starts, and may not
            // handle the signal yet.
            .filter(|r| {
                r.service == service && r.pid.is_some() && r.state == InstanceState::Healthy
            })
            .collect();
        for r in rows {
            let dir = self.deps.instances_dir.join(&r.id);
            let pin = self
                .services
                .lock()
                .unwrap_or_else(PoisonError::into_inner)
                .get(service)
                .and_then(|e| e.deployment.config_version);
            let resolved = match self
                .deps
                .config
                .resolve(service, self.deps.environment.as_deref(), Some(&r.id), pin)
                .await
            {
                Ok(c) => c,
                Err(e) => {
                    tracing::warn!(instance = %r.id, error = %e, "cannot resolve the new config; instance keeps its file");
                    continue;
                }
            };
            let written = tokio::task::spawn_blocking({
                let dir = dir.clone();
                move || instance::write_config_file(&dir, &resolved)
            })
            .await;
            if !matches!(written, Ok(Ok(()))) {
                tracing::warn!(instance = %r.id, "cannot rewrite the config file (the instance may have just stopped)");
                continue;
            }
            if let (Some(sig), Some(pid)) = (signal, r.pid) {
                // The leader only, as `kill -HUP PID` would: the service decides what its
                // children hear.
                if process::signal_process(pid, sig) {
                    self.board.event(
                        service,
                        Some(&r.id),
                        status::EventKind::Rollout,
                        format!("config file rewritten, signal {sig} sent"),
                    );
                }
            }
        }
    }

    /// A rolling restart for a config change, reverted if it fails.
    async fn config_rollout(
        &self,
        config: &ConfigStore,
        service: &str,
        changed: &gantry_config::ConfigChanged,
    ) {
        let reason = if changed.set == gantry_config::GLOBAL {
            format!("global config version {}", changed.version)
        } else {
            format!("config version {}", changed.version)
        };
        let mut failure = None;
        for tx in self.senders(service, None).unwrap_or_default() {
            let (reply, rx) = oneshot::channel();
            let cmd = service::ServiceCmd::Restart {
                reply: Some(reply),
                reason: reason.clone(),
            };
            if tx.send(cmd).is_err() {
                return;
            }
            match rx.await {
                Ok(Ok(_)) => {}
                // New instances failed their health checks: the change is what broke them.
                Ok(Err(SupervisorError::Rollout(why))) => {
                    failure = Some(why);
                    break;
                }
                // Not started yet (waiting for dependencies), shutting down...: its instances
                // start with the new values when they start; nothing to revert.
                Ok(Err(e)) => {
                    tracing::info!(service, error = %e, "config rollout not run");
                    return;
                }
                Err(_) => return,
            }
        }
        let Some(why) = failure else { return };
        if changed.reverts.is_some() {
            tracing::error!(service, set = %changed.set, version = changed.version, error = %why, "the revert's rollout failed too; leaving the config as it is");
            return;
        }
        if *self.shutdown.borrow() {
            return;
        }
        // Only the latest version is reverted: a newer change supersedes this one.
        match config.version_of(&changed.set).await {
            Ok(v) if v == changed.version => {}
            _ => return,
        }
        match config
            .revert(&changed.set, changed.version, &format!("{service}: {why}"))
            .await
        {
            Ok(c) => {
                let msg = format!(
                    "config version {} of {} reverted by version {}: {why}",
                    changed.version, changed.set, c.version.version
                );
                tracing::warn!(service, "{msg}");
                self.board
                    .event(service, None, status::EventKind::Rollout, msg);
            }
            Err(e) => {
                tracing::error!(service, error = %e, "could not revert a failed config change")
            }
        }
    }

    /// Stop everything: services that others depend on stop after those others. Each instance
    /// is drained, signalled, and killed after its stop timeout.
    pub async fn shutdown(&self) {
        self.shutdown.send_replace(true);
        let mut services =
            std::mem::take(&mut *self.services.lock().unwrap_or_else(PoisonError::into_inner));
        let deps: BTreeMap<String, Vec<String>> = services
            .iter()
            .map(|(n, e)| (n.clone(), e.deployment.depends_on.clone()))
            .collect();
        for wave in stop_waves(&deps) {
            let mut waits = Vec::new();
            for name in wave {
                if let Some(e) = services.remove(&name) {
                    for v in e.versions.into_values() {
                        waits.push(stop_version(v));
                    }
                }
            }
            futures_join_all(waits).await;
        }
        self.join_leaving().await;
        // Every instance cgroup is gone with its instance; the system's own goes last.
        if let Some(cg) = &self.deps.cgroups {
            let _ = std::fs::remove_dir(cg.base());
        }
    }
}

/// Drain and stop every instance of a version, then end its controller.
async fn stop_version(mut e: VersionEntry) {
    let (tx, rx) = oneshot::channel();
    let sent = e.tx.send(service::ServiceCmd::Stop { reply: tx }).is_ok();
    if sent {
        let _ = rx.await;
    }
    if let Some(t) = e.task.take() {
        let _ = t.await;
    }
}

impl Supervisor {
    /// Last resort (a second Ctrl-C): SIGKILL every instance's process group now.
    pub fn kill_all(&self) {
        for i in self.board.list() {
            if let Some(pid) = i.pid {
                process::signal_group(pid, libc::SIGKILL);
            }
        }
    }
}

fn shutting_down() -> SupervisorError {
    SupervisorError::Conflict("gantry is shutting down".into())
}

async fn futures_join_all<F: std::future::Future<Output = ()> + Send + 'static>(futs: Vec<F>) {
    let handles: Vec<_> = futs.into_iter().map(tokio::spawn).collect();
    for h in handles {
        let _ = h.await;
    }
}

/// Groups of services to stop together: first those nothing depends on, then those whose
/// dependents are all stopped, and so on. (The spec has no cycles; anything left is stopped last.)
fn stop_waves(depends_on: &BTreeMap<String, Vec<String>>) -> Vec<Vec<String>> {
    let mut left: Vec<String> = depends_on.keys().cloned().collect();
    let mut waves = Vec::new();
    while !left.is_empty() {
        let wave: Vec<String> = left
            .iter()
            .filter(|n| {
                !left
                    .iter()
                    .any(|other| depends_on[other].iter().any(|d| d == *n))
            })
            .cloned()
            .collect();
        if wave.is_empty() {
            waves.push(std::mem::take(&mut left));
            break;
        }
        left.retain(|n| !wave.contains(n));
        waves.push(wave);
    }
    waves
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;

    #[test]
    fn dependents_stop_first() {
        let deps: BTreeMap<String, Vec<String>> = [
            ("db", vec![]),
            ("api", vec!["db", "cache"]),
            ("cache", vec!["db"]),
            ("web", vec!["api"]),
        ]
        .into_iter()
        .map(|(n, d)| (n.to_string(), d.into_iter().map(String::from).collect()))
        .collect();
        let waves = stop_waves(&deps);
        assert_eq!(
            waves,
            vec![
                vec!["web".to_string()],
                vec!["api".into()],
                vec!["cache".into()],
                vec!["db".into()]
            ]
        );
    }
}
