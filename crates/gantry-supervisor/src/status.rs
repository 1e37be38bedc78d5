//! What the supervisor reports: instance states, the status board `gantry ps` reads, lifecycle
//! events, and the metrics that go with them.

use std::collections::BTreeMap;
use std::sync::{Arc, Mutex, PoisonError};

use gantry_telemetry::Metrics;
use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use serde::Serialize;
use tokio::sync::broadcast;

/// Lifecycle of one instance.
///
/// ```text
/// starting ─► healthy ⇄ unhealthy ─► draining ─► stopping ─► stopped
///     └──────────┴──────────┴─► exited ─► backoff | crash_loop ─► starting
/// ```
#[derive(
    Clone, Copy, Debug, PartialEq, Eq, Hash, Serialize, serde::Deserialize, utoipa::ToSchema,
)]
#[serde(rename_all = "snake_case")]
pub enum InstanceState {
    /// Waiting for the services it depends on.
    Pending,
    Starting,
    Healthy,
    Unhealthy,
    /// Out of routing, waiting for in-flight requests.
    Draining,
    /// Stop signal sent, waiting for exit.
    Stopping,
    Stopped,
    Exited,
    Backoff,
    /// Exited too often in the crash-loop window; restarts continue with backoff.
    CrashLoop,
}

impl InstanceState {
    pub const ALL: [InstanceState; 10] = [
        InstanceState::Pending,
        InstanceState::Starting,
        InstanceState::Healthy,
        InstanceState::Unhealthy,
        InstanceState::Draining,
        InstanceState::Stopping,
        InstanceState::Stopped,
        InstanceState::Exited,
        InstanceState::Backoff,
        InstanceState::CrashLoop,
    ];

    pub fn as_str(self) -> &'static str {
        match self {
            InstanceState::Pending => "pending",
            InstanceState::Starting => "starting",
            InstanceState::Healthy => "healthy",
            InstanceState::Unhealthy => "unhealthy",
            InstanceState::Draining => "draining",
            InstanceState::Stopping => "stopping",
            InstanceState::Stopped => "stopped",
            InstanceState::Exited => "exited",
            InstanceState::Backoff => "backoff",
            InstanceState::CrashLoop => "crash_loop",
        }
    }
}

/// One row of `gantry ps`.
#[derive(Clone, Debug, Serialize, serde::Deserialize, utoipa::ToSchema)]
pub struct InstanceStatus {
    pub id: String,
    pub service: String,
    pub version: String,
    pub state: InstanceState,
    pub pid: Option<u32>,
    pub port: Option<u16>,
    /// When the current process started (unix ms).
    pub started_ms: Option<u64>,
    /// When the instance entered its current state (unix ms).
    pub since_ms: u64,
    pub restarts: u32,
    /// Last exit, e.g. `exit status 1` or `signal 9 (SIGKILL)`.
    pub last_exit: Option<String>,
    /// Last failed probe or other reason for the current state.
    pub reason: Option<String>,
    /// Config version the process was started with.
    pub config_version: u64,
    /// What it uses now (CPU, memory, open files), when it runs; read when listed.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub usage: Option<crate::usage::Usage>,
}

#[derive(Clone, Debug, Serialize, utoipa::ToSchema)]
#[serde(rename_all = "snake_case")]
pub enum EventKind {
    Started,
    Healthy,
    Unhealthy,
    Draining,
    Stopped,
    Exited,
    Restarting,
    CrashLoop,
    Scaled,
    Rollout,
}

/// A lifecycle event, printed by `gantry up` and kept for the API.
#[derive(Clone, Debug, Serialize, utoipa::ToSchema)]
pub struct SupervisorEvent {
    pub at_ms: u64,
    pub service: String,
    pub instance: Option<String>,
    pub kind: EventKind,
    pub message: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct StateLabels {
    service: String,
    state: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub(crate) struct ServiceLabels {
    pub service: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub(crate) struct ProbeLabels {
    pub service: String,
    pub result: &'static str,
}

/// Shared status of all instances plus the event stream.
pub struct StatusBoard {
    instances: Mutex<BTreeMap<String, InstanceStatus>>,
    events: broadcast::Sender<SupervisorEvent>,
    by_state: Family<StateLabels, Gauge>,
    pub(crate) restarts: Family<ServiceLabels, Counter>,
    pub(crate) probes: Family<ProbeLabels, Counter>,
}

impl StatusBoard {
    pub(crate) fn new(metrics: &Metrics) -> Arc<Self> {
        let by_state = Family::<StateLabels, Gauge>::default();
        let restarts = Family::<ServiceLabels, Counter>::default();
        let probes = Family::<ProbeLabels, Counter>::default();
        metrics.register("supervisor", |r| {
            r.register(
                "instances",
                "Instances by service and state",
                by_state.clone(),
            );
            r.register("restarts", "Instance restarts by service", restarts.clone());
            r.register(
                "health_checks",
                "Health probe results by service: pass, fail, or starting (a new instance that does not answer yet, within its start grace)",
                probes.clone(),
            );
        });
        let (events, _) = broadcast::channel(1024);
        Arc::new(Self {
            instances: Mutex::new(BTreeMap::new()),
            events,
            by_state,
            restarts,
            probes,
        })
    }

    pub fn subscribe(&self) -> broadcast::Receiver<SupervisorEvent> {
        self.events.subscribe()
    }

    pub fn list(&self) -> Vec<InstanceStatus> {
        self.lock().values().cloned().collect()
    }

    pub fn get(&self, id: &str) -> Option<InstanceStatus> {
        self.lock().get(id).cloned()
    }

    pub(crate) fn event(
        &self,
        service: &str,
        instance: Option<&str>,
        kind: EventKind,
        message: String,
    ) {
        let _ = self.events.send(SupervisorEvent {
            at_ms: gantry_model::unix_ms(),
            service: service.into(),
            instance: instance.map(str::to_string),
            kind,
            message,
        });
    }

    /// Insert or change an instance's row, keeping the per-state gauges right.
    pub(crate) fn update(&self, id: &str, f: impl FnOnce(&mut InstanceStatus)) {
        let mut g = self.lock();
        if let Some(st) = g.get_mut(id) {
            let before = st.state;
            f(st);
            if st.state != before {
                st.since_ms = gantry_model::unix_ms();
                self.gauge(&st.service, before).dec();
                self.gauge(&st.service, st.state).inc();
            }
        }
    }

    pub(crate) fn insert(&self, status: InstanceStatus) {
        let mut g = self.lock();
        self.gauge(&status.service, status.state).inc();
        if let Some(old) = g.insert(status.id.clone(), status) {
            self.gauge(&old.service, old.state).dec();
        }
    }

    pub(crate) fn remove(&self, id: &str) {
        let mut g = self.lock();
        if let Some(old) = g.remove(id) {
            self.gauge(&old.service, old.state).dec();
        }
    }

    fn gauge(&self, service: &str, state: InstanceState) -> Gauge {
        self.by_state
            .get_or_create(&StateLabels {
                service: service.into(),
                state: state.as_str(),
            })
            .clone()
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, BTreeMap<String, InstanceStatus>> {
        self.instances
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
    }
}
