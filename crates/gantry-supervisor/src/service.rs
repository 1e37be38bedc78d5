//! One service: a controller task that owns its instances and applies scale, rolling restart and
//! stop, one command at a time.

use std::sync::Arc;
use std::time::Duration;

use gantry_model::unix_ms;
use serde::Serialize;
use tokio::sync::{mpsc, oneshot, watch};

use crate::instance::{self, InstanceHandle};
use crate::status::{EventKind, InstanceState, InstanceStatus};
use crate::{ServiceCtx, SupervisorError};

/// First wait before a stopped replacement is tried again; it doubles up to the maximum.
const REPLACE_RETRY_FIRST: Duration = Duration::from_secs(10);
const REPLACE_RETRY_MAX: Duration = Duration::from_secs(300);

pub(crate) enum ServiceCmd {
    Scale {
        replicas: u32,
        reply: Option<oneshot::Sender<Result<(), SupervisorError>>>,
    },
    /// Run by a changed deployment from now on: replace every instance, one at a time.
    Replace {
        ctx: Arc<ServiceCtx>,
        reason: String,
    },
    Restart {
        reply: Option<oneshot::Sender<Result<RestartReport, SupervisorError>>>,
        reason: String,
    },
    Stop {
        reply: oneshot::Sender<()>,
    },
    /// Answered once every command sent before it is done.
    Sync {
        reply: oneshot::Sender<()>,
    },
}

/// Result of a rolling restart.
#[derive(Debug, Clone, Serialize, serde::Deserialize, utoipa::ToSchema)]
pub struct RestartReport {
    pub service: String,
    pub replaced: Vec<Replacement>,
}

#[derive(Debug, Clone, Serialize, serde::Deserialize, utoipa::ToSchema)]
pub struct Replacement {
    pub old: String,
    pub new: String,
}

struct Controller {
    svc: Arc<ServiceCtx>,
    instances: Vec<InstanceHandle>,
    desired: watch::Sender<u32>,
    shutdown: watch::Receiver<bool>,
}

pub(crate) async fn run(
    svc: Arc<ServiceCtx>,
    desired: watch::Sender<u32>,
    mut cmds: mpsc::UnboundedReceiver<ServiceCmd>,
    shutdown: watch::Receiver<bool>,
) {
    let mut c = Controller {
        svc,
        instances: Vec::new(),
        desired,
        shutdown,
    };
    // Pending rows until dependencies are up.
    let mut pending: Vec<Arc<str>> = Vec::new();
    c.sync_pending(&mut pending);
    if !c.svc.depends_on.is_empty() {
        let deps = c.svc.depends_on.join(", ");
        c.svc.deps.board.event(
            &c.svc.name,
            None,
            EventKind::Started,
            format!("waiting for {deps}"),
        );
        let mut events = c.svc.deps.registry.subscribe();
        loop {
            if c.deps_ready() {
                break;
            }
            tokio::select! {
                _ = events.recv() => {}
                _ = tokio::time::sleep(Duration::from_millis(250)) => {}
                cmd = cmds.recv() => match cmd {
                    None => return c.remove_rows(&pending),
                    Some(ServiceCmd::Stop { reply }) => {
                        c.remove_rows(&pending);
                        let _ = reply.send(());
                        return;
                    }
                    Some(ServiceCmd::Scale { replicas, reply }) => {
                        c.desired.send_replace(replicas);
                        c.sync_pending(&mut pending);
                        if let Some(reply) = reply {
                            let _ = reply.send(Ok(()));
                        }
                    }
                    Some(ServiceCmd::Replace { ctx, .. }) => {
                        // Nothing runs yet: start with the new deployment.
                        c.svc = ctx;
                    }
                    Some(ServiceCmd::Sync { reply }) => {
                        let _ = reply.send(());
                    }
                    Some(ServiceCmd::Restart { reply, .. }) => {
                        if let Some(reply) = reply {
                            let _ = reply.send(Err(SupervisorError::Conflict(format!(
                                "service {} has not started yet: it waits for {deps}", c.svc.name
                            ))));
                        }
                    }
                }
            }
        }
    }
    for id in pending {
        c.instances.push(instance::start(c.svc.clone(), id));
    }
    // A replacement that stopped (a new instance never became healthy) is tried again, with
    // backoff, until it succeeds or a newer deployment replaces it: the running instances must
    // come to match the desired state, not stay half-replaced.
    let mut retry: Option<(String, tokio::time::Instant, Duration)> = None;
    loop {
        let cmd = match &retry {
            Some((reason, at, delay)) => {
                let (reason, at, delay) = (reason.clone(), *at, *delay);
                tokio::select! {
                    c = cmds.recv() => c,
                    _ = tokio::time::sleep_until(at) => {
                        retry = match c.rolling_restart(&format!("retrying: {reason}")).await {
                            Ok(_) => None,
                            Err(e) => {
                                let next = (delay * 2).min(REPLACE_RETRY_MAX);
                                tracing::warn!(service = %c.svc.name, error = %e, retry_in_ms = next.as_millis() as u64, "replacement stopped again");
                                Some((reason, tokio::time::Instant::now() + next, next))
                            }
                        };
                        continue;
                    }
                }
            }
            None => cmds.recv().await,
        };
        let Some(cmd) = cmd else { break };
        match cmd {
            ServiceCmd::Scale { replicas, reply } => {
                c.desired.send_replace(replicas);
                c.scale_to(replicas).await;
                if let Some(reply) = reply {
                    let _ = reply.send(Ok(()));
                }
            }
            ServiceCmd::Replace { ctx, reason } => {
                c.svc = ctx;
                retry = None;
                if let Err(e) = c.rolling_restart(&reason).await {
                    tracing::warn!(service = %c.svc.name, error = %e, retry_in_ms = REPLACE_RETRY_FIRST.as_millis() as u64, "replacement stopped");
                    retry = Some((
                        reason,
                        tokio::time::Instant::now() + REPLACE_RETRY_FIRST,
                        REPLACE_RETRY_FIRST,
                    ));
                }
            }
            ServiceCmd::Restart { reply, reason } => {
                let res = c.rolling_restart(&reason).await;
                if let Err(e) = &res {
                    tracing::warn!(service = %c.svc.name, error = %e, "rolling restart stopped");
                }
                if let Some(reply) = reply {
                    let _ = reply.send(res);
                }
            }
            ServiceCmd::Sync { reply } => {
                let _ = reply.send(());
            }
            ServiceCmd::Stop { reply } => {
                c.stop_all().await;
                let _ = reply.send(());
                return;
            }
        }
    }
    c.stop_all().await;
}

impl Controller {
    fn new_id(&mut self) -> Arc<str> {
        let n = self
            .svc
            .ids
            .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        format!("{}-{n}", self.svc.name).into()
    }

    fn deps_ready(&self) -> bool {
        let snap = self.svc.deps.registry.snapshot();
        self.svc
            .depends_on
            .iter()
            .all(|d| !snap.instances(d).is_empty())
    }

    /// Make the pending rows match the desired count.
    fn sync_pending(&mut self, pending: &mut Vec<Arc<str>>) {
        let want = *self.desired.borrow() as usize;
        while pending.len() < want {
            let id = self.new_id();
            self.svc.deps.board.insert(InstanceStatus {
                id: id.to_string(),
                service: self.svc.name.to_string(),
                version: self.svc.version.to_string(),
                state: InstanceState::Pending,
                pid: None,
                port: None,
                started_ms: None,
                since_ms: unix_ms(),
                restarts: 0,
                last_exit: None,
                reason: Some(format!("waiting for {}", self.svc.depends_on.join(", "))),
                config_version: 0,
                usage: None,
            });
            pending.push(id);
        }
        while pending.len() > want {
            if let Some(id) = pending.pop() {
                self.svc.deps.board.remove(&id);
            }
        }
    }

    fn remove_rows(&self, ids: &[Arc<str>]) {
        for id in ids {
            self.svc.deps.board.remove(id);
        }
    }

    async fn scale_to(&mut self, replicas: u32) {
        let want = replicas as usize;
        let have = self.instances.len();
        if want > have {
            for _ in have..want {
                let id = self.new_id();
                self.instances.push(instance::start(self.svc.clone(), id));
            }
        } else if want < have {
            // The newest go first.
            let extra: Vec<InstanceHandle> = self.instances.drain(want..).collect();
            self.stop_many(extra).await;
        }
        self.svc.deps.board.event(
            &self.svc.name,
            None,
            EventKind::Scaled,
            format!("scaled from {have} to {want} instances"),
        );
    }

    async fn stop_many(&self, handles: Vec<InstanceHandle>) {
        let ids: Vec<Arc<str>> = handles.iter().map(|h| h.id.clone()).collect();
        let stops: Vec<_> = handles
            .into_iter()
            .map(|h| tokio::spawn(h.stop()))
            .collect();
        for s in stops {
            let _ = s.await;
        }
        self.remove_rows(&ids);
    }

    async fn stop_all(&mut self) {
        let all: Vec<InstanceHandle> = self.instances.drain(..).collect();
        self.stop_many(all).await;
    }

    /// Replace instances one at a time: start a new one, wait until it is healthy, then drain
    /// and stop an old one. Stops at the first replacement that does not become healthy.
    async fn rolling_restart(&mut self, reason: &str) -> Result<RestartReport, SupervisorError> {
        let name = self.svc.name.to_string();
        let old_ids: Vec<Arc<str>> = self.instances.iter().map(|h| h.id.clone()).collect();
        self.svc.deps.board.event(
            &name,
            None,
            EventKind::Rollout,
            format!("rolling restart of {} instances ({reason})", old_ids.len()),
        );
        let wait = Duration::from_millis(self.svc.spec.health.start_grace_ms.saturating_add(2_000));
        let mut replaced = Vec::new();
        for old in old_ids {
            if *self.shutdown.borrow() {
                return Err(SupervisorError::Conflict("gantry is shutting down".into()));
            }
            let new_id = self.new_id();
            let mut new = instance::start(self.svc.clone(), new_id.clone());
            let mut shutdown = self.shutdown.clone();
            let healthy = tokio::select! {
                r = new.wait_healthy(wait) => r,
                _ = shutdown.wait_for(|s| *s) => Err(InstanceState::Stopping),
            };
            if let Err(state) = healthy {
                self.stop_many(vec![new]).await;
                let msg = format!(
                    "new instance {new_id} did not become healthy within {} ms (state {}); rollout stopped after replacing {} of {} instances",
                    wait.as_millis(),
                    state.as_str(),
                    replaced.len(),
                    self.instances.len()
                );
                self.svc
                    .deps
                    .board
                    .event(&name, None, EventKind::Rollout, msg.clone());
                return Err(SupervisorError::Rollout(msg));
            }
            if let Some(pos) = self.instances.iter().position(|h| h.id == old) {
                let h = self.instances.remove(pos);
                self.stop_many(vec![h]).await;
            }
            self.instances.push(new);
            replaced.push(Replacement {
                old: old.to_string(),
                new: new_id.to_string(),
            });
        }
        self.svc.deps.board.event(
            &name,
            None,
            EventKind::Rollout,
            format!(
                "rolling restart done: {} instances replaced",
                replaced.len()
            ),
        );
        Ok(RestartReport {
            service: name,
            replaced,
        })
    }
}
