//! The supervisor: runs every service's instances as local processes.
//!
//! Structure: one controller task per service (scale, rolling restart, stop; see `service.rs`)
//! owning one task per instance (spawn, probe, restart with backoff, drain and stop; see
//! `instance.rs`). Health thresholds, backoff and crash-loop detection are sans-io cores in
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

mod health;
mod instance;
mod process;
mod service;
mod status;

use std::collections::BTreeMap;
use std::path::PathBuf;
use std::sync::{Arc, Mutex, PoisonError};

use gantry_config::ConfigStore;
use gantry_registry::Registry;
use gantry_spec::{LoadedSpec, OnConfigChange, ServiceSpec};
use gantry_store::{Store, StoreError, StoreJsonExt};
use gantry_telemetry::{LogStore, LogStream, Metrics};
use serde::{Deserialize, Serialize};
use tokio::sync::{mpsc, oneshot, watch};

pub use health::{Backoff, CrashLoopDetector, HealthTracker, ProbeState, Transition};
pub use service::{Replacement, RestartReport};
pub use status::{EventKind, InstanceState, InstanceStatus, StatusBoard, SupervisorEvent};

const DESIRED_BUCKET: &str = "desired";
/// Most replicas `scale` accepts.
pub const MAX_REPLICAS: u32 = 1000;

#[derive(Debug, thiserror::Error)]
pub enum SupervisorError {
    #[error("unknown service {0:?}")]
    UnknownService(String),
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

/// Everything the supervisor needs from the rest of gantry.
pub struct SupervisorDeps {
    pub spec: Arc<LoadedSpec>,
    pub registry: Arc<Registry>,
    pub config: Arc<ConfigStore>,
    pub store: Arc<dyn Store>,
    pub logs: LogStore,
    pub metrics: Metrics,
    pub drain: Arc<dyn DrainObserver>,
    /// Values of `GANTRY_GATEWAY_URL`, `GANTRY_ADMIN_URL`, `GANTRY_NODE`.
    pub gateway_url: String,
    pub admin_url: String,
    pub node: String,
    pub echo: Option<Echo>,
}

/// Shared by a service's controller and instance tasks.
pub(crate) struct Deps {
    registry: Arc<Registry>,
    config: Arc<ConfigStore>,
    store: Arc<dyn Store>,
    logs: LogStore,
    drain: Arc<dyn DrainObserver>,
    board: Arc<StatusBoard>,
    gateway_url: String,
    admin_url: String,
    node: String,
    echo: Option<Echo>,
}

pub(crate) struct ServiceCtx {
    name: Arc<str>,
    spec: ServiceSpec,
    version: semver::Version,
    cwd: PathBuf,
    deps: Arc<Deps>,
}

/// A scale set with `gantry scale`, kept across restarts of gantry as long as the spec's
/// `replicas` is unchanged (a changed spec is a newer intent and wins).
#[derive(Debug, Clone, Serialize, Deserialize)]
struct DesiredOverride {
    replicas: u32,
    spec_replicas: u32,
}

struct ServiceEntry {
    tx: mpsc::Sender<service::ServiceCmd>,
    desired: watch::Receiver<u32>,
    task: Mutex<Option<tokio::task::JoinHandle<()>>>,
}

/// A service as `gantry services` shows it.
#[derive(Debug, Clone, Serialize)]
pub struct ServiceStatus {
    pub name: String,
    pub version: String,
    pub desired: u32,
    pub healthy: usize,
    pub instances: usize,
    pub depends_on: Vec<String>,
    pub on_config_change: OnConfigChange,
}

pub struct Supervisor {
    spec: Arc<LoadedSpec>,
    services: BTreeMap<String, ServiceEntry>,
    board: Arc<StatusBoard>,
    store: Arc<dyn Store>,
    shutdown: watch::Sender<bool>,
}

impl Supervisor {
    /// Kill what a previous run left behind, then start every service (each waits for its
    /// dependencies on its own).
    pub async fn start(d: SupervisorDeps) -> Result<Arc<Self>, SupervisorError> {
        let reaped = process::reap_orphans(&d.store).await;
        if !reaped.is_empty() {
            tracing::warn!(
                count = reaped.len(),
                "killed process groups left by a previous run"
            );
        }
        let board = StatusBoard::new(&d.metrics);
        let deps = Arc::new(Deps {
            registry: d.registry,
            config: d.config.clone(),
            store: d.store.clone(),
            logs: d.logs,
            drain: d.drain,
            board: board.clone(),
            gateway_url: d.gateway_url,
            admin_url: d.admin_url,
            node: d.node,
            echo: d.echo,
        });
        let (shutdown, shutdown_rx) = watch::channel(false);
        let mut services = BTreeMap::new();
        for (name, spec) in &d.spec.spec.services {
            if spec.program().is_none() {
                // Runs elsewhere (static endpoints or self-registration).
                continue;
            }
            let mut replicas = spec.replicas;
            if let Some((o, _)) = d
                .store
                .get_json::<DesiredOverride>(DESIRED_BUCKET, name)
                .await?
            {
                if o.spec_replicas == spec.replicas {
                    replicas = o.replicas;
                } else {
                    let _ = d.store.delete(DESIRED_BUCKET, name).await;
                }
            }
            let ctx = Arc::new(ServiceCtx {
                name: name.as_str().into(),
                spec: spec.clone(),
                version: spec.semver(),
                cwd: d.spec.service_cwd(spec),
                deps: deps.clone(),
            });
            let (tx, rx) = mpsc::channel(16);
            let (desired_tx, desired_rx) = watch::channel(replicas);
            let task = tokio::spawn(service::run(ctx, desired_tx, rx, shutdown_rx.clone()));
            services.insert(
                name.clone(),
                ServiceEntry {
                    tx,
                    desired: desired_rx,
                    task: Mutex::new(Some(task)),
                },
            );
        }
        let sup = Arc::new(Self {
            spec: d.spec,
            services,
            board,
            store: d.store,
            shutdown,
        });
        tokio::spawn(sup.clone().restart_on_config_change(d.config, shutdown_rx));
        Ok(sup)
    }

    pub fn board(&self) -> &Arc<StatusBoard> {
        &self.board
    }

    pub fn instances(&self) -> Vec<InstanceStatus> {
        self.board.list()
    }

    pub fn has_service(&self, name: &str) -> bool {
        self.services.contains_key(name)
    }

    pub fn services(&self) -> Vec<ServiceStatus> {
        let all = self.board.list();
        self.services
            .iter()
            .filter_map(|(name, e)| {
                let spec = self.spec.spec.services.get(name)?;
                let mine: Vec<&InstanceStatus> =
                    all.iter().filter(|i| &i.service == name).collect();
                Some(ServiceStatus {
                    name: name.clone(),
                    version: spec.version.clone(),
                    desired: *e.desired.borrow(),
                    healthy: mine
                        .iter()
                        .filter(|i| i.state == InstanceState::Healthy)
                        .count(),
                    instances: mine.len(),
                    depends_on: spec.depends_on.clone(),
                    on_config_change: spec.on_config_change,
                })
            })
            .collect()
    }

    fn entry(&self, service: &str) -> Result<&ServiceEntry, SupervisorError> {
        self.services
            .get(service)
            .ok_or_else(|| SupervisorError::UnknownService(service.into()))
    }

    /// Set the number of instances; durable (kept across restarts of gantry).
    pub async fn scale(&self, service: &str, replicas: u32) -> Result<(), SupervisorError> {
        let e = self.entry(service)?;
        if replicas > MAX_REPLICAS {
            return Err(SupervisorError::Invalid(format!(
                "replicas: expected 0..={MAX_REPLICAS}, got {replicas}"
            )));
        }
        let spec = &self.spec.spec.services[service];
        if spec.port.is_some() && replicas > 1 {
            return Err(SupervisorError::Invalid(format!(
                "service {service} has a fixed port, so it can run only one instance"
            )));
        }
        self.store
            .put_json(
                DESIRED_BUCKET,
                service,
                &DesiredOverride {
                    replicas,
                    spec_replicas: spec.replicas,
                },
            )
            .await?;
        let (tx, rx) = oneshot::channel();
        self.send(
            e,
            service::ServiceCmd::Scale {
                replicas,
                reply: tx,
            },
        )
        .await?;
        rx.await.map_err(|_| shutting_down())?
    }

    /// Rolling restart: each instance replaced by a new one that must become healthy first.
    pub async fn restart(&self, service: &str) -> Result<RestartReport, SupervisorError> {
        let e = self.entry(service)?;
        let (tx, rx) = oneshot::channel();
        self.send(
            e,
            service::ServiceCmd::Restart {
                reply: Some(tx),
                reason: "requested".into(),
            },
        )
        .await?;
        rx.await.map_err(|_| shutting_down())?
    }

    async fn send(
        &self,
        e: &ServiceEntry,
        cmd: service::ServiceCmd,
    ) -> Result<(), SupervisorError> {
        if *self.shutdown.borrow() {
            return Err(shutting_down());
        }
        e.tx.send(cmd).await.map_err(|_| shutting_down())
    }

    async fn restart_on_config_change(
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
                Err(tokio::sync::broadcast::error::RecvError::Lagged(_)) => continue,
                Err(_) => return,
            };
            let Some(spec) = self.spec.spec.services.get(&changed.service) else {
                continue;
            };
            if spec.on_config_change != OnConfigChange::Restart {
                continue;
            }
            if let Some(e) = self.services.get(&changed.service) {
                let cmd = service::ServiceCmd::Restart {
                    reply: None,
                    reason: format!("config version {}", changed.version),
                };
                let _ = self.send(e, cmd).await;
            }
        }
    }

    /// Stop everything: services that others depend on stop after those others. Each instance
    /// is drained, signalled, and killed after its stop timeout.
    pub async fn shutdown(&self) {
        self.shutdown.send_replace(true);
        for wave in stop_waves(&self.spec.spec.services) {
            let mut waits = Vec::new();
            for name in wave {
                let Some(e) = self.services.get(&name) else {
                    continue;
                };
                let (tx, rx) = oneshot::channel();
                let sent =
                    e.tx.send(service::ServiceCmd::Stop { reply: tx })
                        .await
                        .is_ok();
                let task = e.task.lock().unwrap_or_else(PoisonError::into_inner).take();
                waits.push(async move {
                    if sent {
                        let _ = rx.await;
                    }
                    if let Some(t) = task {
                        let _ = t.await;
                    }
                });
            }
            futures_join_all(waits).await;
        }
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
fn stop_waves(services: &BTreeMap<String, ServiceSpec>) -> Vec<Vec<String>> {
    let mut left: Vec<String> = services.keys().cloned().collect();
    let mut waves = Vec::new();
    while !left.is_empty() {
        let wave: Vec<String> = left
            .iter()
            .filter(|n| {
                !left
                    .iter()
                    .any(|other| services[other].depends_on.iter().any(|d| d == *n))
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
        let spec = gantry_spec::parse(
            r#"
[services.db]
command = ["x"]
[services.api]
command = ["x"]
depends_on = ["db", "cache"]
[services.cache]
command = ["x"]
depends_on = ["db"]
[services.web]
command = ["x"]
depends_on = ["api"]
"#,
            std::path::Path::new("t.toml"),
        )
        .unwrap();
        let waves = stop_waves(&spec.services);
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
