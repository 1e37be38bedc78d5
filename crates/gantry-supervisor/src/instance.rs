//! One instance: a task that starts its process, probes it, keeps the registry in step with its
//! health, restarts it with backoff, and stops it by draining first.

use std::collections::BTreeMap;
use std::net::{IpAddr, Ipv4Addr, SocketAddr};
use std::os::unix::process::ExitStatusExt;
use std::sync::Arc;
use std::time::{Duration, Instant};

use gantry_model::{unix_ms, Health, Instance, InstanceSource};
use gantry_model::{ProbeKind, RestartPolicy};
use gantry_store::StoreJsonExt;
use gantry_telemetry::LogStream;
use tokio::process::Child;
use tokio::sync::{mpsc, oneshot, watch};

use crate::health::{self, Backoff, CrashLoopDetector, HealthTracker, ProbeState, Transition};
use crate::process::{self, ProcRecord, PROCS_BUCKET};
use crate::status::{EventKind, InstanceState, InstanceStatus, ProbeLabels, ServiceLabels};
use crate::{InstanceInfo, ServiceCtx};

/// Probe period until the first pass, so new instances join routing quickly.
const STARTING_PROBE_INTERVAL: Duration = Duration::from_millis(50);
/// Least time between leaving routing and the stop signal (covers requests that picked the
/// instance just before the route table changed).
const MIN_DRAIN: Duration = Duration::from_millis(50);

pub(crate) enum InstanceCmd {
    Stop { reply: oneshot::Sender<()> },
}

/// The controller's handle on an instance task.
pub(crate) struct InstanceHandle {
    pub id: Arc<str>,
    ctl: mpsc::Sender<InstanceCmd>,
    pub state: watch::Receiver<InstanceState>,
    task: tokio::task::JoinHandle<()>,
}

impl InstanceHandle {
    /// Drain and stop the instance; returns when its process group is gone.
    pub async fn stop(self) {
        let (tx, rx) = oneshot::channel();
        if self.ctl.send(InstanceCmd::Stop { reply: tx }).await.is_ok() {
            let _ = rx.await;
        }
        let _ = self.task.await;
    }

    /// Wait until the instance is healthy; `Err` with the state it was in at the deadline.
    pub async fn wait_healthy(&mut self, within: Duration) -> Result<(), InstanceState> {
        let ok = tokio::time::timeout(
            within,
            self.state.wait_for(|s| *s == InstanceState::Healthy),
        )
        .await
        .is_ok_and(|r| r.is_ok());
        if ok {
            Ok(())
        } else {
            Err(*self.state.borrow())
        }
    }
}

/// Start the task of instance `id` (whose status row may already exist as `pending`).
pub(crate) fn start(svc: Arc<ServiceCtx>, id: Arc<str>) -> InstanceHandle {
    let (ctl_tx, ctl_rx) = mpsc::channel(4);
    let (state_tx, state_rx) = watch::channel(InstanceState::Starting);
    svc.deps.board.insert(InstanceStatus {
        id: id.to_string(),
        service: svc.name.to_string(),
        version: svc.version.to_string(),
        state: InstanceState::Starting,
        pid: None,
        port: None,
        started_ms: None,
        since_ms: unix_ms(),
        restarts: 0,
        last_exit: None,
        reason: None,
        config_version: 0,
        usage: None,
    });
    let task = tokio::spawn(run(svc, id.clone(), ctl_rx, state_tx));
    InstanceHandle {
        id,
        ctl: ctl_tx,
        state: state_rx,
        task,
    }
}

enum Outcome {
    /// The process ended on its own (or could not start).
    Exited {
        description: String,
        success: bool,
        ran_for: Duration,
    },
    /// Stopped on request; the reply is sent once the status is final.
    Stopped(Option<oneshot::Sender<()>>),
    /// Stopped by the liveness rule; start again at once.
    Replace(String),
}

struct Run<'a> {
    svc: &'a Arc<ServiceCtx>,
    id: &'a Arc<str>,
    state_tx: &'a watch::Sender<InstanceState>,
}

impl Run<'_> {
    fn set_state(&self, state: InstanceState, reason: Option<String>) {
        self.state_tx.send_replace(state);
        self.svc.deps.board.update(self.id, |s| {
            s.state = state;
            s.reason = reason;
        });
    }

    fn event(&self, kind: EventKind, message: String) {
        self.svc
            .deps
            .board
            .event(&self.svc.name, Some(self.id), kind, message);
    }
}

async fn run(
    svc: Arc<ServiceCtx>,
    id: Arc<str>,
    ctl: mpsc::Receiver<InstanceCmd>,
    state_tx: watch::Sender<InstanceState>,
) {
    run_until_stopped(svc.clone(), id.clone(), ctl, state_tx).await;
    // The instance is gone for good: what hooks issued for it is released, its directory removed.
    let dir = instance_dir(&svc, &id);
    for hook in &svc.deps.hooks {
        hook.release(&instance_info(&svc, &id, &dir)).await;
    }
    if let Err(e) = tokio::fs::remove_dir_all(&dir).await {
        if e.kind() != std::io::ErrorKind::NotFound {
            tracing::warn!(instance = %id, dir = %dir.display(), error = %e, "cannot remove instance directory");
        }
    }
}

fn instance_dir(svc: &ServiceCtx, id: &str) -> std::path::PathBuf {
    svc.deps.instances_dir.join(id)
}

fn instance_info<'a>(
    svc: &'a ServiceCtx,
    id: &'a str,
    dir: &'a std::path::Path,
) -> InstanceInfo<'a> {
    InstanceInfo {
        service: &svc.name,
        version: &svc.version,
        id,
        node: &svc.deps.node,
        dir,
    }
}

/// A fresh instance directory, and what the hooks add to the instance (their files written into
/// the directory). An `Err` names the hook or file that failed.
async fn prepare_instance(
    svc: &ServiceCtx,
    id: &str,
) -> Result<(std::path::PathBuf, BTreeMap<String, String>), String> {
    let dir = instance_dir(svc, id);
    match tokio::fs::remove_dir_all(&dir).await {
        Ok(()) => {}
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
        Err(e) => return Err(format!("cannot clear {}: {e}", dir.display())),
    }
    create_private_dir(&dir)
        .map_err(|e| format!("cannot create instance directory {}: {e}", dir.display()))?;
    let mut env = BTreeMap::new();
    for hook in &svc.deps.hooks {
        let add = hook
            .prepare(&instance_info(svc, id, &dir))
            .await
            .map_err(|e| format!("instance hook {}: {e}", hook.name()))?;
        for f in add.files {
            let rel = &f.path;
            let safe = !rel.as_os_str().is_empty()
                && rel
                    .components()
                    .all(|c| matches!(c, std::path::Component::Normal(_)));
            if !safe {
                return Err(format!(
                    "instance hook {}: file path {} must be relative, without '..'",
                    hook.name(),
                    rel.display()
                ));
            }
            let path = dir.join(rel);
            if let Some(parent) = path.parent() {
                create_private_dir(parent)
                    .map_err(|e| format!("cannot create {}: {e}", parent.display()))?;
            }
            write_file(&path, &f.contents, f.mode)
                .map_err(|e| format!("cannot write {}: {e}", path.display()))?;
        }
        env.extend(add.env);
    }
    Ok((dir, env))
}

fn create_private_dir(dir: &std::path::Path) -> std::io::Result<()> {
    use std::os::unix::fs::DirBuilderExt;
    std::fs::DirBuilder::new()
        .recursive(true)
        .mode(0o700)
        .create(dir)
}

/// The instance's config file (`GANTRY_CONFIG_FILE`), readable by the instance only.
pub(crate) const CONFIG_FILE: &str = "config.json";

/// Write the resolved config where the instance reads it: to a temporary file, synced, then
/// renamed over the old one, so a reader sees the old file or the new one, never a part.
/// Writers (an instance's start, a change's rewrite) take turns, and an older config never
/// replaces a newer one.
pub(crate) fn write_config_file(
    dir: &std::path::Path,
    config: &gantry_config::Resolved,
) -> std::io::Result<()> {
    static WRITING: std::sync::Mutex<()> = std::sync::Mutex::new(());
    let _one = WRITING
        .lock()
        .unwrap_or_else(std::sync::PoisonError::into_inner);
    let path = dir.join(CONFIG_FILE);
    if let Ok(old) = std::fs::read(&path) {
        if let Ok(old) = serde_json::from_slice::<serde_json::Value>(&old) {
            let v = |k: &str| old.get(k).and_then(serde_json::Value::as_u64).unwrap_or(0);
            let (ov, og) = (v("version"), v("global_version"));
            // What is there is newer in both sets: keep it.
            if ov >= config.version
                && og >= config.global_version
                && (ov, og) != (config.version, config.global_version)
            {
                return Ok(());
            }
        }
    }
    let mut text = serde_json::to_vec_pretty(&config.file_json())?;
    text.push(b'\n');
    let tmp = dir.join(".config.json.tmp");
    write_file(&tmp, &text, 0o600)?;
    std::fs::rename(&tmp, &path)?;
    // The rename itself is durable once the directory is synced.
    std::fs::File::open(dir)?.sync_all()
}

fn write_file(path: &std::path::Path, contents: &[u8], mode: u32) -> std::io::Result<()> {
    use std::io::Write;
    use std::os::unix::fs::OpenOptionsExt;
    let mut f = std::fs::OpenOptions::new()
        .write(true)
        .create(true)
        .truncate(true)
        .mode(mode)
        .open(path)?;
    f.write_all(contents)?;
    f.sync_all()
}

async fn run_until_stopped(
    svc: Arc<ServiceCtx>,
    id: Arc<str>,
    mut ctl: mpsc::Receiver<InstanceCmd>,
    state_tx: watch::Sender<InstanceState>,
) {
    let r = Run {
        svc: &svc,
        id: &id,
        state_tx: &state_tx,
    };
    let spec = &svc.spec;
    let mut backoff = Backoff::new(
        Duration::from_millis(spec.backoff.initial_ms),
        Duration::from_millis(spec.backoff.max_ms),
    );
    let mut crash = CrashLoopDetector::new(
        spec.backoff.crash_loop_restarts,
        Duration::from_millis(spec.backoff.crash_loop_window_ms),
    );
    let mut restarts = 0u32;
    loop {
        let outcome = run_once(&r, &mut ctl).await;
        match outcome {
            Outcome::Stopped(reply) => {
                r.set_state(InstanceState::Stopped, None);
                r.event(EventKind::Stopped, "stopped".into());
                if let Some(reply) = reply {
                    let _ = reply.send(());
                }
                return;
            }
            Outcome::Replace(reason) => {
                restarts += 1;
                svc.deps.board.update(&id, |s| s.restarts = restarts);
                count_restart(&svc);
                r.event(EventKind::Restarting, format!("restarting: {reason}"));
            }
            Outcome::Exited {
                description,
                success,
                ran_for,
            } => {
                svc.deps.board.update(&id, |s| {
                    s.last_exit = Some(description.clone());
                    s.pid = None;
                });
                r.set_state(InstanceState::Exited, Some(description.clone()));
                r.event(EventKind::Exited, description.clone());
                let again = match spec.restart {
                    RestartPolicy::Always => true,
                    RestartPolicy::OnFailure => !success,
                    RestartPolicy::Never => false,
                };
                if !again {
                    // Stay in `exited` until the controller stops us.
                    let reply = ctl.recv().await.map(|InstanceCmd::Stop { reply }| reply);
                    r.set_state(InstanceState::Stopped, None);
                    if let Some(reply) = reply {
                        let _ = reply.send(());
                    }
                    return;
                }
                let looping = crash.record_exit(Instant::now());
                let delay = backoff.next_delay(ran_for);
                if looping {
                    r.set_state(
                        InstanceState::CrashLoop,
                        Some(format!(
                            "exited {} times within {} ms; last: {description}",
                            spec.backoff.crash_loop_restarts, spec.backoff.crash_loop_window_ms
                        )),
                    );
                    r.event(
                        EventKind::CrashLoop,
                        format!("crash loop: restarting in {} ms", delay.as_millis()),
                    );
                    tracing::warn!(instance = %id, "instance is crash-looping");
                } else {
                    r.set_state(InstanceState::Backoff, Some(description));
                    r.event(
                        EventKind::Restarting,
                        format!("restarting in {} ms", delay.as_millis()),
                    );
                }
                tokio::select! {
                    _ = tokio::time::sleep(delay) => {}
                    cmd = ctl.recv() => {
                        r.set_state(InstanceState::Stopped, None);
                        if let Some(InstanceCmd::Stop { reply }) = cmd {
                            let _ = reply.send(());
                        }
                        return;
                    }
                }
                restarts += 1;
                svc.deps.board.update(&id, |s| s.restarts = restarts);
                count_restart(&svc);
            }
        }
    }
}

fn count_restart(svc: &ServiceCtx) {
    svc.deps
        .board
        .restarts
        .get_or_create(&ServiceLabels {
            service: svc.name.to_string(),
        })
        .inc();
}

/// Start one process and supervise it until it exits or is stopped.
async fn run_once(r: &Run<'_>, ctl: &mut mpsc::Receiver<InstanceCmd>) -> Outcome {
    let svc = r.svc;
    let spec = &svc.spec;
    let deps = &svc.deps;
    let started = Instant::now();
    let port = match spec.port {
        Some(p) => p,
        None => match free_port() {
            Ok(p) => p,
            Err(e) => {
                return Outcome::Exited {
                    description: format!("no free port: {e}"),
                    success: false,
                    ran_for: Duration::ZERO,
                }
            }
        },
    };
    // A deployment pinned to a config version starts with that one.
    let config = deps
        .config
        .resolve(
            &svc.name,
            deps.environment.as_deref(),
            Some(r.id),
            svc.config_version,
        )
        .await;
    let config = match config {
        Ok(c) => c,
        // Starting without its settings (or secrets) would look healthy and be wrong: this start
        // fails and is retried with backoff.
        Err(e) => {
            return Outcome::Exited {
                description: format!("cannot read its config: {e}"),
                success: false,
                ran_for: Duration::ZERO,
            }
        }
    };
    let (dir, added) = match prepare_instance(svc, r.id).await {
        Ok(p) => p,
        Err(description) => {
            return Outcome::Exited {
                description,
                success: false,
                ran_for: Duration::ZERO,
            }
        }
    };
    if let Err(e) = write_config_file(&dir, &config) {
        return Outcome::Exited {
            description: format!("cannot write its config file: {e}"),
            success: false,
            ran_for: Duration::ZERO,
        };
    }
    let config_version = config.version;
    let env = build_env(svc, r.id, port, config_version, &config.env(), &dir, &added);
    r.set_state(InstanceState::Starting, None);
    let cgroup = match &deps.cgroups {
        Some(cg) => {
            let (cg, id) = (cg.clone(), r.id.to_string());
            tokio::task::spawn_blocking(move || cg.create(&id))
                .await
                .ok()
                .flatten()
        }
        None => None,
    };
    let mut child = match process::spawn(&spec.command, &env, &spec.cwd, cgroup.as_deref()) {
        Ok(c) => c,
        Err(e) => {
            return Outcome::Exited {
                description: format!(
                    "cannot start {:?}: {e}",
                    spec.command.first().map_or("", String::as_str)
                ),
                success: false,
                ran_for: Duration::ZERO,
            }
        }
    };
    let pid = child.id().unwrap_or(0);
    let pgid = pid;
    let record = ProcRecord {
        instance: r.id.to_string(),
        service: svc.name.to_string(),
        pid,
        pgid,
        started_ms: unix_ms(),
    };
    let key = process::proc_key(&deps.system_id, r.id);
    if let Err(e) = deps.store.put_json(PROCS_BUCKET, &key, &record).await {
        tracing::warn!(instance = %r.id, error = %e, "cannot record process group; it may outlive a crash of gantry");
    }
    for (stream, kind) in [
        (
            child
                .stdout
                .take()
                .map(|s| Box::new(s) as Box<dyn tokio::io::AsyncRead + Unpin + Send>),
            LogStream::Stdout,
        ),
        (
            child
                .stderr
                .take()
                .map(|s| Box::new(s) as Box<dyn tokio::io::AsyncRead + Unpin + Send>),
            LogStream::Stderr,
        ),
    ] {
        if let Some(stream) = stream {
            tokio::spawn(process::pump(
                stream,
                deps.logs.clone(),
                svc.name.clone(),
                r.id.clone(),
                kind,
                deps.echo.clone(),
            ));
        }
    }
    deps.board.update(r.id, |s| {
        s.pid = Some(pid);
        s.port = Some(port);
        s.started_ms = Some(record.started_ms);
        s.config_version = config_version;
    });
    r.event(
        EventKind::Started,
        format!("started pid {pid} on port {port}"),
    );

    let addr = SocketAddr::new(IpAddr::V4(Ipv4Addr::LOCALHOST), port);
    let mut tracker = HealthTracker::new(&spec.health, started);
    let mut registered = false;
    let mut next_probe = Instant::now()
        + if spec.health.kind == ProbeKind::None {
            Duration::ZERO
        } else {
            Duration::from_millis(20)
        };
    let mut passed_once = false;
    let start_grace = Duration::from_millis(spec.health.start_grace_ms);
    let probe_labels = |result: &'static str| ProbeLabels {
        service: svc.name.to_string(),
        result,
    };

    loop {
        let probe = async {
            tokio::time::sleep_until(next_probe.into()).await;
            health::probe(&spec.health, addr, &env, &spec.cwd).await
        };
        tokio::select! {
            status = child.wait() => {
                if registered {
                    deps.registry.deregister_supervised(r.id);
                }
                // Whatever the leader left behind, in its group or out of it, goes with it.
                process::signal_group(pgid, libc::SIGKILL);
                contain(svc, r.id).await;
                forget(deps, r.id).await;
                let (description, success) = match status {
                    Ok(s) => (describe_exit(&s), s.success()),
                    Err(e) => (format!("wait failed: {e}"), false),
                };
                return Outcome::Exited { description, success, ran_for: started.elapsed() };
            }
            res = probe => {
                let now = Instant::now();
                // A new instance that does not answer yet is starting, not failing: an alert on
                // failures must not fire at every deploy.
                let result = if res.is_ok() {
                    passed_once = true;
                    "pass"
                } else if !passed_once && started.elapsed() < start_grace {
                    "starting"
                } else {
                    "fail"
                };
                deps.board.probes.get_or_create(&probe_labels(result)).inc();
                match tracker.observe(res.is_ok(), now) {
                    Some(Transition::BecameHealthy) => {
                        deps.registry.register_supervised(registry_instance(svc, r.id, port));
                        registered = true;
                        r.set_state(InstanceState::Healthy, None);
                        r.event(EventKind::Healthy, format!("healthy after {} ms", started.elapsed().as_millis()));
                    }
                    Some(Transition::BecameUnhealthy) => {
                        if registered {
                            deps.registry.deregister_supervised(r.id);
                            registered = false;
                        }
                        let why = res.as_ref().err().cloned().unwrap_or_default();
                        r.set_state(InstanceState::Unhealthy, Some(why.clone()));
                        r.event(EventKind::Unhealthy, format!("unhealthy: {why}"));
                    }
                    None => {
                        if let Err(why) = &res {
                            if tracker.state() != ProbeState::Starting {
                                deps.board.update(r.id, |s| s.reason = Some(why.clone()));
                            }
                        }
                    }
                }
                if spec.health.unhealthy_restart_ms > 0 {
                    if let Some(d) = tracker.unhealthy_for(now) {
                        if d >= Duration::from_millis(spec.health.unhealthy_restart_ms) {
                            let reason = format!("unhealthy for {} ms", d.as_millis());
                            stop_process(r, &mut child, pgid, false).await;
                            return Outcome::Replace(reason);
                        }
                    }
                }
                next_probe = now + match tracker.state() {
                    ProbeState::Starting => STARTING_PROBE_INTERVAL.min(Duration::from_millis(spec.health.interval_ms)),
                    _ => Duration::from_millis(spec.health.interval_ms),
                };
            }
            cmd = ctl.recv() => {
                let reply = cmd.map(|InstanceCmd::Stop { reply }| reply);
                stop_process(r, &mut child, pgid, registered).await;
                return Outcome::Stopped(reply);
            }
        }
    }
}

/// Drain (if in rotation), send the stop signal, wait, SIGKILL what is left.
async fn stop_process(r: &Run<'_>, child: &mut Child, pgid: u32, registered: bool) {
    let svc = r.svc;
    let spec = &svc.spec;
    if registered {
        r.set_state(InstanceState::Draining, None);
        r.event(EventKind::Draining, "out of routing; draining".into());
        svc.deps.registry.deregister_supervised(r.id);
        let deadline = Instant::now() + Duration::from_millis(spec.drain_timeout_ms);
        tokio::time::sleep(MIN_DRAIN.min(Duration::from_millis(spec.drain_timeout_ms))).await;
        while svc.deps.drain.inflight(r.id) > 0 && Instant::now() < deadline {
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
    }
    r.set_state(InstanceState::Stopping, None);
    process::signal_group(pgid, process::signal_number(&spec.stop_signal));
    let waited =
        tokio::time::timeout(Duration::from_millis(spec.stop_timeout_ms), child.wait()).await;
    let description = match waited {
        Ok(Ok(s)) => describe_exit(&s),
        Ok(Err(e)) => format!("wait failed: {e}"),
        Err(_) => {
            process::signal_group(pgid, libc::SIGKILL);
            let _ = child.wait().await;
            format!("killed after stop_timeout_ms = {}", spec.stop_timeout_ms)
        }
    };
    process::signal_group(pgid, libc::SIGKILL);
    contain(svc, r.id).await;
    forget(&svc.deps, r.id).await;
    svc.deps.board.update(r.id, |s| {
        s.pid = None;
        s.last_exit = Some(description);
    });
}

/// Kill what the instance started that left its process group (daemons): its cgroup's
/// processes, then any process still carrying its marks.
async fn contain(svc: &ServiceCtx, id: &str) {
    let (system, id) = (svc.deps.system_id.clone(), id.to_string());
    let cgroups = svc.deps.cgroups.clone();
    let killed = tokio::task::spawn_blocking(move || {
        cgroups.map_or(0, |cg| cg.kill(&id)) + process::kill_marked(&system, Some(&id))
    })
    .await
    .unwrap_or(0);
    if killed > 0 {
        tracing::warn!(service = %svc.name, killed, "killed processes that had left the instance's process group");
    }
}

async fn forget(deps: &crate::Deps, id: &str) {
    let key = process::proc_key(&deps.system_id, id);
    if let Err(e) = deps.store.delete(PROCS_BUCKET, &key).await {
        tracing::warn!(instance = %id, error = %e, "cannot delete process record");
    }
}

fn registry_instance(svc: &ServiceCtx, id: &str, port: u16) -> Instance {
    Instance {
        id: id.to_string(),
        service: svc.name.to_string(),
        version: svc.version.clone(),
        address: IpAddr::V4(Ipv4Addr::LOCALHOST),
        port,
        metadata: svc.metadata.clone(),
        node: svc.deps.node.clone(),
        zone: None,
        health: Health::Passing,
        source: InstanceSource::Supervised,
        registered_at_ms: unix_ms(),
        tags: Vec::new(),
        // Registered while its probe passes (it leaves the registry when it fails).
        checks: match svc.spec.health.kind {
            gantry_model::ProbeKind::None => Vec::new(),
            kind => vec![gantry_model::Check {
                id: "probe".into(),
                name: format!("{} probe", kind.as_str()),
                kind: gantry_model::CheckKind::Probe,
                status: Health::Passing,
                output: String::new(),
                ttl_ms: None,
                updated_ms: unix_ms(),
            }],
        },
    }
}

/// Environment of an instance: gantry's own, then the spec's `env`, then config values, then
/// the variables gantry owns.
fn build_env(
    svc: &ServiceCtx,
    id: &str,
    port: u16,
    config_version: u64,
    config: &BTreeMap<String, String>,
    dir: &std::path::Path,
    added: &BTreeMap<String, String>,
) -> Vec<(String, String)> {
    let mut env: BTreeMap<String, String> = std::env::vars()
        .filter(|(k, _)| !gantry_model::is_reserved_env(k))
        .collect();
    env.extend(svc.spec.env.iter().map(|(k, v)| (k.clone(), v.clone())));
    env.extend(config.iter().map(|(k, v)| (k.clone(), v.clone())));
    // What instance hooks add (identity credentials, ...), over the spec and config.
    env.extend(added.iter().map(|(k, v)| (k.clone(), v.clone())));
    env.insert(
        "GANTRY_INSTANCE_DIR".into(),
        dir.to_string_lossy().into_owned(),
    );
    env.insert(
        "GANTRY_CONFIG_FILE".into(),
        dir.join(CONFIG_FILE).to_string_lossy().into_owned(),
    );
    if let Some(e) = &svc.deps.environment {
        env.insert("GANTRY_ENV".into(), e.clone());
    }
    if let Some(u) = &svc.deps.bus_url {
        env.insert("GANTRY_BUS_URL".into(), u.clone());
    }
    let d = &svc.deps;
    for (k, v) in [
        ("PORT", port.to_string()),
        ("GANTRY_SERVICE", svc.name.to_string()),
        ("GANTRY_INSTANCE", id.to_string()),
        ("GANTRY_SYSTEM", d.system_id.clone()),
        ("GANTRY_VERSION", svc.version.to_string()),
        ("GANTRY_NODE", d.node.clone()),
        ("GANTRY_GATEWAY_URL", d.gateway_url.clone()),
        ("GANTRY_ADMIN_URL", d.admin_url.clone()),
        ("GANTRY_CONFIG_VERSION", config_version.to_string()),
    ] {
        env.insert(k.to_string(), v);
    }
    env.into_iter().collect()
}

fn free_port() -> std::io::Result<u16> {
    let l = std::net::TcpListener::bind((Ipv4Addr::LOCALHOST, 0))?;
    Ok(l.local_addr()?.port())
}

fn describe_exit(s: &std::process::ExitStatus) -> String {
    if let Some(code) = s.code() {
        format!("exit status {code}")
    } else if let Some(sig) = s.signal() {
        format!(
            "killed by signal {sig}{}",
            signal_name(sig)
                .map(|n| format!(" ({n})"))
                .unwrap_or_default()
        )
    } else {
        s.to_string()
    }
}

fn signal_name(sig: i32) -> Option<&'static str> {
    Some(match sig {
        libc::SIGHUP => "SIGHUP",
        libc::SIGINT => "SIGINT",
        libc::SIGQUIT => "SIGQUIT",
        libc::SIGABRT => "SIGABRT",
        libc::SIGKILL => "SIGKILL",
        libc::SIGSEGV => "SIGSEGV",
        libc::SIGTERM => "SIGTERM",
        libc::SIGUSR1 => "SIGUSR1",
        libc::SIGUSR2 => "SIGUSR2",
        libc::SIGBUS => "SIGBUS",
        _ => return None,
    })
}
