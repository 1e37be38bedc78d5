//! `gantry up`: wire every component together, run until Ctrl-C, stop everything gracefully.
//!
//! Start order: spec → store → registry → config → gateway (routes, then registry feed) →
//! listeners → admin API → supervisor (which reaps orphans of a previous run first).
//! Stop order: supervisor (drain, signal, kill; dependents before dependencies) → gateway
//! (finish open requests) → admin API.

use std::io::Write;
use std::net::{SocketAddr, TcpListener as StdListener};
use std::path::{Path, PathBuf};
use std::process::ExitCode;
use std::sync::Arc;
use std::time::Duration;

use anyhow::{anyhow, Context};
use gantry_api::RouteControl;
use gantry_config::ConfigStore;
use gantry_gateway::tls::{CertFiles, CertStore};
use gantry_gateway::{Gateway, GatewayConfig, Listener};
use gantry_registry::Registry;
use gantry_spec::{LoadedSpec, StoreBackend, StoreSpec};
use gantry_store::{NatsOptions, NatsStore, RedbStore, Store, StoreError};
use gantry_supervisor::{DesiredState, DrainObserver, EventKind, Supervisor, SupervisorDeps};
use gantry_telemetry::{LogStore, LogStream, Metrics};
use tokio::sync::watch;

use crate::client::{AdminInfo, ADMIN_INFO_FILE, TOKEN_FILE};
use crate::control::Control;
use crate::table;
use crate::{UpArgs, EXIT_FAILURE, EXIT_USAGE};

pub fn run(file: &Path, args: &UpArgs) -> ExitCode {
    let spec = match gantry_spec::load(file) {
        Ok(s) => Arc::new(s),
        Err(e) => {
            eprintln!("{e}");
            return ExitCode::from(EXIT_USAGE);
        }
    };
    gantry_telemetry::init_tracing(args.json_logs, "info,async_nats=warn");
    let rt = match tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .thread_name("gantry-control")
        .enable_all()
        .build()
    {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("error: cannot start runtime: {e}");
            return ExitCode::from(EXIT_FAILURE);
        }
    };
    match rt.block_on(up(spec, args)) {
        Ok(code) => code,
        Err(e) => {
            eprintln!("error: {e:#}");
            ExitCode::from(EXIT_FAILURE)
        }
    }
}

struct GatewayDrain(Arc<Gateway>);

impl DrainObserver for GatewayDrain {
    fn inflight(&self, instance: &str) -> usize {
        self.0.inflight(instance)
    }
}

fn bind(addr: SocketAddr, what: &str) -> anyhow::Result<StdListener> {
    let l = StdListener::bind(addr).with_context(|| format!("{what} cannot listen on {addr}"))?;
    l.set_nonblocking(true)?;
    Ok(l)
}

/// URL other processes on this machine use to reach a listener.
fn local_url(addr: SocketAddr) -> String {
    let ip = if addr.ip().is_unspecified() {
        "127.0.0.1".to_string()
    } else if addr.is_ipv6() {
        format!("[{}]", addr.ip())
    } else {
        addr.ip().to_string()
    };
    format!("http://{ip}:{}", addr.port())
}

fn node_name() -> String {
    std::fs::read_to_string("/proc/sys/kernel/hostname")
        .ok()
        .map(|s| s.trim().to_string())
        .filter(|s| !s.is_empty())
        .unwrap_or_else(|| "local".into())
}

/// The admin token: generated once, kept in the data directory (mode 0600).
fn admin_token(dir: &Path) -> anyhow::Result<String> {
    let path = dir.join(TOKEN_FILE);
    if let Ok(t) = std::fs::read_to_string(&path) {
        let t = t.trim().to_string();
        if t.len() >= 32 {
            return Ok(t);
        }
    }
    let token = gantry_registry::random_hex(32);
    let tmp = dir.join(format!("{TOKEN_FILE}.tmp"));
    {
        use std::os::unix::fs::OpenOptionsExt;
        let mut f = std::fs::OpenOptions::new()
            .write(true)
            .create(true)
            .truncate(true)
            .mode(0o600)
            .open(&tmp)
            .with_context(|| format!("cannot write {}", tmp.display()))?;
        f.write_all(token.as_bytes())?;
        f.sync_all()?;
    }
    std::fs::rename(&tmp, &path)?;
    Ok(token)
}

fn write_admin_info(dir: &Path, info: &AdminInfo) -> anyhow::Result<PathBuf> {
    let path = dir.join(ADMIN_INFO_FILE);
    let tmp = dir.join(format!("{ADMIN_INFO_FILE}.tmp"));
    std::fs::write(&tmp, serde_json::to_vec_pretty(info)?)?;
    std::fs::rename(&tmp, &path)?;
    Ok(path)
}

/// Run the gateway on its own runtime (its own threads), so proxy work never competes with the
/// control plane's tasks. One worker gets a current-thread runtime (no work stealing).
fn spawn_gateway(
    gateway: Arc<Gateway>,
    listener: StdListener,
    tls: Option<(StdListener, Arc<CertStore>, Arc<rustls::ServerConfig>)>,
    workers: usize,
    shutdown: watch::Receiver<bool>,
) -> anyhow::Result<std::thread::JoinHandle<()>> {
    let workers = if workers == 0 {
        std::thread::available_parallelism().map_or(1, |n| n.get())
    } else {
        workers
    };
    let rt = if workers == 1 {
        tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()?
    } else {
        tokio::runtime::Builder::new_multi_thread()
            .worker_threads(workers)
            .thread_name("gantry-gateway")
            .on_thread_start(crate::alloc::reuse_hot_blocks)
            .on_thread_stop(crate::alloc::release_hot_blocks)
            .enable_all()
            .build()?
    };
    let handle = std::thread::Builder::new()
        .name("gantry-gateway".into())
        .spawn(move || {
            crate::alloc::reuse_hot_blocks();
            rt.block_on(async move {
                let plain = match tokio::net::TcpListener::from_std(listener) {
                    Ok(l) => l,
                    Err(e) => {
                        tracing::error!(error = %e, "gateway listener unusable");
                        return;
                    }
                };
                let background = tokio::spawn(gateway.clone().run_background(shutdown.clone()));
                let mut tasks = vec![tokio::spawn(
                    gateway
                        .clone()
                        .serve(Listener::Plain(plain), shutdown.clone()),
                )];
                if let Some((l, store, cfg)) = tls {
                    match tokio::net::TcpListener::from_std(l) {
                        Ok(l) => {
                            tasks.push(tokio::spawn(
                                gateway
                                    .clone()
                                    .serve(Listener::Tls(l, cfg), shutdown.clone()),
                            ));
                            tasks.push(tokio::spawn(store.watch(shutdown.clone())));
                        }
                        Err(e) => tracing::error!(error = %e, "TLS listener unusable"),
                    }
                }
                for t in tasks {
                    let _ = t.await;
                }
                background.abort();
            });
            // The runtime's tasks free their memory as it drops, into the kept blocks.
            drop(rt);
            crate::alloc::release_hot_blocks();
        })?;
    Ok(handle)
}

/// Raise the open-file soft limit to the hard limit (nginx's `worker_rlimit_nofile`): every
/// client connection, upstream connection and instance pipe is a descriptor, and the common
/// default soft limit (1024) runs out long before `max_connections`. Returns the limit now in
/// force and what it was, if it was raised.
fn raise_open_file_limit() -> (Option<u64>, Option<u64>) {
    use rustix::process::{getrlimit, setrlimit, Resource, Rlimit};
    let lim = getrlimit(Resource::Nofile);
    let (Some(cur), hard) = (lim.current, lim.maximum) else {
        return (None, None);
    };
    // No hard limit: ask for what the kernel allows a process (`nr_open`).
    let want = hard.unwrap_or_else(|| {
        std::fs::read_to_string("/proc/sys/fs/nr_open")
            .ok()
            .and_then(|s| s.trim().parse().ok())
            .unwrap_or(cur)
    });
    if want <= cur {
        return (Some(cur), None);
    }
    let raised = Rlimit {
        current: Some(want),
        maximum: hard,
    };
    match setrlimit(Resource::Nofile, raised) {
        Ok(()) => (Some(want), Some(cur)),
        Err(_) => (Some(cur), None),
    }
}

async fn up(spec: Arc<LoadedSpec>, args: &UpArgs) -> anyhow::Result<ExitCode> {
    let (files, was) = raise_open_file_limit();
    match (files, was) {
        (Some(now), Some(before)) => {
            tracing::info!(open_files = now, was = before, "open-file limit raised")
        }
        (Some(now), None) => tracing::info!(open_files = now, "open-file limit"),
        _ => {}
    }
    // Each client connection is a descriptor; instances, the store and pooled upstream
    // connections need some more.
    let wanted = u64::from(spec.spec.gateway.limits.max_connections) + 256;
    if let Some(now) = files.filter(|n| *n < wanted) {
        tracing::warn!(
            open_files = now,
            max_connections = spec.spec.gateway.limits.max_connections,
            "the open-file limit is below what gateway.limits.max_connections needs; raise the hard \
             limit (ulimit -Hn) or lower max_connections"
        );
    }
    let data_dir = spec.data_dir();
    std::fs::create_dir_all(&data_dir)
        .with_context(|| format!("cannot create data directory {}", data_dir.display()))?;
    let _lock = lock_data_dir(&data_dir)?;
    let store = open_store(&spec.spec.store, &data_dir).await?;
    tracing::info!(
        backend = store.backend(),
        "store open{}",
        match spec.spec.store.backend {
            StoreBackend::Nats => format!(
                " (NATS at {}, namespace {}, {} replica(s))",
                spec.spec.store.url, spec.spec.store.namespace, spec.spec.store.replicas
            ),
            StoreBackend::Embedded => format!(" ({})", data_dir.join("state.redb").display()),
        }
    );
    let token: Arc<str> = admin_token(&data_dir)?.into();
    let metrics = Metrics::new();
    let logs = LogStore::new(spec.spec.logs.max_bytes, &metrics);
    let node = node_name();
    let registry = Registry::open(store.clone(), node.clone(), &metrics).await?;
    let config = Arc::new(ConfigStore::new(store.clone()));

    let limits = &spec.spec.gateway.limits;
    let gateway = Gateway::new(
        GatewayConfig {
            access_log: spec.spec.gateway.access_log,
            request_id: spec.spec.gateway.request_id,
            trace_context: spec.spec.gateway.trace_context,
            forwarded_headers: spec.spec.gateway.forwarded_headers,
            max_connections: limits.max_connections as usize,
            max_header_bytes: limits.max_header_bytes as usize,
            max_headers: limits.max_headers as usize,
            header_read_timeout: Duration::from_millis(limits.header_read_timeout_ms),
            shutdown_grace: Duration::from_millis(limits.shutdown_grace_ms),
            cache_max_bytes: spec.spec.gateway.cache_max_bytes,
            node: node.clone(),
        },
        &metrics,
    );
    if let Some(writer) = gateway.start_access_log(logs.clone()) {
        tokio::spawn(writer);
    }
    {
        let gw = gateway.clone();
        registry.on_change(move |snap| gw.apply_registry(snap));
    }
    // Routes: the spec's plus those added over the admin API (and static endpoints).
    let control = Control::load(
        spec.clone(),
        store.clone(),
        gateway.clone(),
        registry.clone(),
    )
    .await?;
    let tls = match &spec.spec.gateway.tls {
        None => None,
        Some(t) => {
            let files = t
                .certificates
                .iter()
                .map(|c| CertFiles {
                    cert: spec.base_dir.join(&c.cert),
                    key: spec.base_dir.join(&c.key),
                    hosts: c.hosts.clone(),
                })
                .collect();
            let store = CertStore::load(files).map_err(|e| anyhow!("gateway.tls: {e}"))?;
            let cfg = store
                .server_config()
                .map_err(|e| anyhow!("gateway.tls: {e}"))?;
            Some((bind(t.listen, "gateway.tls.listen")?, store, cfg))
        }
    };

    let gw_listener = bind(spec.spec.gateway.listen, "gateway.listen")?;
    let admin_listener = bind(spec.spec.admin.listen, "admin.listen")?;
    let gw_addr = gw_listener.local_addr()?;
    let admin_addr = admin_listener.local_addr()?;
    let (shutdown_tx, shutdown_rx) = watch::channel(false);

    let tls_addr = match &tls {
        Some((l, _, _)) => Some(l.local_addr()?),
        None => None,
    };
    let gw_thread = spawn_gateway(
        gateway.clone(),
        gw_listener,
        tls,
        spec.spec.gateway.workers,
        shutdown_rx.clone(),
    )?;

    let echo: Option<gantry_supervisor::Echo> = if args.logs {
        Some(Arc::new(|instance: &str, line: &str, stream: LogStream| {
            let mut out = std::io::stdout().lock();
            let mark = if stream == LogStream::Stderr {
                "!"
            } else {
                "|"
            };
            let _ = writeln!(out, "{instance:>14} {mark} {line}");
        }))
    } else {
        None
    };

    // The spec's services become the desired state; the supervisor follows it from here on.
    let applied = DesiredState::new(store.clone())
        .apply_spec(spec.deployments())
        .await?;
    if !applied.kept_scale.is_empty() {
        println!(
            "kept from an earlier run: the instance counts set with `gantry scale` for {} (the spec's own counts for them did not change)",
            applied.kept_scale.join(", ")
        );
    }
    let supervisor = Supervisor::start(SupervisorDeps {
        registry: registry.clone(),
        config: config.clone(),
        store: store.clone(),
        logs: logs.clone(),
        metrics: metrics.clone(),
        drain: Arc::new(GatewayDrain(gateway.clone())),
        gateway_url: local_url(gw_addr),
        admin_url: local_url(admin_addr),
        node,
        echo,
        instances_dir: data_dir.join("instances"),
        hooks: Vec::new(),
    })
    .await?;

    // Lifecycle events on the terminal.
    let mut events = supervisor.board().subscribe();
    let printer = tokio::spawn(async move {
        loop {
            match events.recv().await {
                Ok(e) => {
                    let who = e.instance.as_deref().unwrap_or(&e.service);
                    let mark = match e.kind {
                        EventKind::Healthy => "✓",
                        EventKind::Unhealthy | EventKind::Exited | EventKind::CrashLoop => "✗",
                        _ => "·",
                    };
                    println!("{} {mark} {who:<14} {}", table::clock(e.at_ms), e.message);
                }
                Err(tokio::sync::broadcast::error::RecvError::Lagged(_)) => continue,
                Err(_) => return,
            }
        }
    });

    tokio::spawn(registry.clone().run_expiry(shutdown_rx.clone()));

    {
        // SIGHUP reloads the spec, as it does for nginx and HAProxy.
        let c = control.clone();
        tokio::spawn(async move {
            use tokio::signal::unix::{signal, SignalKind};
            let Ok(mut hup) = signal(SignalKind::hangup()) else {
                return;
            };
            while hup.recv().await.is_some() {
                match c.reload().await {
                    Ok(report) => println!("spec reloaded: {report}"),
                    Err(gantry_api::RouteControlError::Invalid(errors)) => {
                        eprintln!("spec reload refused:\n{}", errors.join("\n"))
                    }
                    Err(e) => eprintln!("spec reload failed: {e:?}"),
                }
            }
        });
    }
    let api = gantry_api::router(gantry_api::ApiState {
        supervisor: supervisor.clone(),
        registry: registry.clone(),
        config: config.clone(),
        gateway: gateway.clone(),
        logs: logs.clone(),
        metrics: metrics.clone(),
        token,
        control,
    });
    let admin_l = tokio::net::TcpListener::from_std(admin_listener)?;
    let mut admin_shutdown = shutdown_rx.clone();
    let admin_task = tokio::spawn(async move {
        let serve = axum::serve(admin_l, api).with_graceful_shutdown(async move {
            let _ = admin_shutdown.wait_for(|s| *s).await;
        });
        if let Err(e) = serve.await {
            tracing::error!(error = %e, "admin API stopped");
        }
    });

    let info_path = write_admin_info(
        &data_dir,
        &AdminInfo {
            admin_url: local_url(admin_addr),
            gateway_url: local_url(gw_addr),
            pid: std::process::id(),
            started_ms: gantry_model::unix_ms(),
        },
    )?;
    let https = tls_addr
        .map(|a| format!(" | https {}", local_url(a).replace("http://", "https://")))
        .unwrap_or_default();
    println!(
        "gantry {}: {} services | gateway {}{https} | admin {} | data {}",
        env!("CARGO_PKG_VERSION"),
        spec.spec.services.len(),
        local_url(gw_addr),
        local_url(admin_addr),
        data_dir.display()
    );

    wait_for_signal().await?;
    println!("stopping: draining and stopping every instance (Ctrl-C again to kill now)");
    let sup = supervisor.clone();
    let stopping = tokio::spawn(async move { sup.shutdown().await });
    let mut forced = false;
    tokio::select! {
        _ = stopping => {}
        r = wait_for_signal() => {
            if r.is_ok() {
                forced = true;
                eprintln!("killing every instance now");
                supervisor.kill_all();
            }
        }
    }
    shutdown_tx.send_replace(true);
    let _ = tokio::task::spawn_blocking(move || gw_thread.join()).await;
    let _ = tokio::time::timeout(Duration::from_secs(5), admin_task).await;
    let _ = std::fs::remove_file(info_path);
    printer.abort();
    println!("stopped");
    Ok(if forced {
        ExitCode::from(130)
    } else {
        ExitCode::SUCCESS
    })
}

/// Put the spec's fixed `endpoints` into the registry.
pub(crate) fn register_static_endpoints(spec: &LoadedSpec, registry: &Registry) {
    for (name, svc) in &spec.spec.services {
        for (i, e) in svc.endpoints.iter().enumerate() {
            let Some(addr) = gantry_spec::parse_endpoint(e) else {
                continue;
            };
            registry.register_static(gantry_model::Instance {
                id: format!("{name}-s{}", i + 1),
                service: name.clone(),
                version: svc.semver(),
                address: addr.ip(),
                port: addr.port(),
                metadata: svc.metadata.clone(),
                node: if addr.ip().is_loopback() {
                    registry.node().to_string()
                } else {
                    String::new()
                },
                zone: None,
                health: gantry_model::Health::Passing,
                source: gantry_model::InstanceSource::Static,
                registered_at_ms: gantry_model::unix_ms(),
            });
        }
    }
}

async fn wait_for_signal() -> anyhow::Result<()> {
    use tokio::signal::unix::{signal, SignalKind};
    let mut int = signal(SignalKind::interrupt())?;
    let mut term = signal(SignalKind::terminate())?;
    tokio::select! {
        _ = int.recv() => {}
        _ = term.recv() => {}
    }
    Ok(())
}

/// Keeps a second gantry off this data directory (and so off its store) while this one runs.
fn lock_data_dir(data_dir: &Path) -> anyhow::Result<std::fs::File> {
    let path = data_dir.join("gantry.lock");
    let file = std::fs::OpenOptions::new()
        .create(true)
        .truncate(false)
        .write(true)
        .open(&path)
        .with_context(|| format!("cannot open {}", path.display()))?;
    match file.try_lock() {
        Ok(()) => Ok(file),
        Err(std::fs::TryLockError::WouldBlock) => Err(anyhow!(
            "data directory {} is in use by another gantry; stop it first (or give this spec another [store] data_dir)",
            data_dir.display()
        )),
        Err(std::fs::TryLockError::Error(e)) => {
            Err(anyhow!("cannot lock {}: {e}", path.display()))
        }
    }
}

/// The store the spec asks for: embedded in the data directory, or NATS JetStream KV.
async fn open_store(spec: &StoreSpec, data_dir: &Path) -> anyhow::Result<Arc<dyn Store>> {
    match spec.backend {
        StoreBackend::Embedded => match RedbStore::open(data_dir) {
            Ok(s) => Ok(Arc::new(s)),
            Err(StoreError::Locked(d)) => Err(anyhow!(
                "data directory {d} is in use by another gantry; stop it first (or give this spec another [store] data_dir)"
            )),
            Err(e) => Err(e.into()),
        },
        StoreBackend::Nats => {
            let mut o = NatsOptions::new(spec.url.clone());
            o.replicas = usize::from(spec.replicas);
            o.namespace = spec.namespace.clone();
            let s = NatsStore::connect(o)
                .await
                .map_err(|e| anyhow!("[store] backend = \"nats\": {e}"))?;
            Ok(Arc::new(s))
        }
    }
}
