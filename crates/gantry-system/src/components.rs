//! The components of the list in `lib.rs`.

use std::net::{SocketAddr, TcpListener as StdListener};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex, PoisonError};
use std::time::Duration;

use anyhow::{anyhow, Context};
use gantry_config::ConfigStore;
use gantry_gateway::tls::{CertFiles, CertStore};
use gantry_gateway::{Gateway, GatewayConfig, Listener};
use gantry_registry::Registry;
use gantry_spec::LoadedSpec;
use gantry_supervisor::{DrainObserver, Echo, Supervisor, SupervisorDeps};
use gantry_telemetry::{LogStore, Metrics};
use tokio::sync::watch;

use crate::control::Control;
use crate::datadir::DataDir;
use crate::Component;

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(PoisonError::into_inner)
}

/// A component's background task: set when it starts, awaited (within `limit`) when it stops.
#[derive(Default)]
pub(crate) struct TaskSlot(Mutex<Option<tokio::task::JoinHandle<()>>>);

impl TaskSlot {
    pub fn set(&self, task: tokio::task::JoinHandle<()>) {
        *lock(&self.0) = Some(task);
    }

    pub async fn join(&self, limit: Duration) {
        let task = lock(&self.0).take();
        if let Some(t) = task {
            let _ = tokio::time::timeout(limit, t).await;
        }
    }
}

pub(crate) fn node_name() -> String {
    std::fs::read_to_string("/proc/sys/kernel/hostname")
        .ok()
        .map(|s| s.trim().to_string())
        .filter(|s| !s.is_empty())
        .unwrap_or_else(|| "local".into())
}

/// URL other processes on this machine use to reach a listener.
pub fn local_url(addr: SocketAddr) -> String {
    let ip = if addr.ip().is_unspecified() {
        "127.0.0.1".to_string()
    } else if addr.is_ipv6() {
        format!("[{}]", addr.ip())
    } else {
        addr.ip().to_string()
    };
    format!("http://{ip}:{}", addr.port())
}

fn bind(addr: SocketAddr, what: &str) -> anyhow::Result<StdListener> {
    let l = StdListener::bind(addr).with_context(|| format!("{what} cannot listen on {addr}"))?;
    l.set_nonblocking(true)?;
    Ok(l)
}

/// Put the spec's fixed `endpoints` into the registry.
pub fn register_static_endpoints(spec: &LoadedSpec, registry: &Registry) {
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
                tags: Vec::new(),
                checks: Vec::new(),
            });
        }
    }
}

// ---------------------------------------------------------------------------------------------

/// The registry: loaded from the store at build; expires leases while running.
pub(crate) struct RegistryComponent {
    pub registry: Arc<Registry>,
    running: AtomicBool,
}

impl RegistryComponent {
    pub async fn build(data: &DataDir, node: String, metrics: &Metrics) -> anyhow::Result<Self> {
        Ok(Self {
            registry: Registry::open(data.store.clone(), node, metrics).await?,
            running: AtomicBool::new(false),
        })
    }
}

#[async_trait::async_trait]
impl Component for RegistryComponent {
    fn name(&self) -> &'static str {
        "registry"
    }
    async fn start(&self, shutdown: watch::Receiver<bool>) -> anyhow::Result<()> {
        tokio::spawn(self.registry.clone().run_expiry(shutdown));
        self.running.store(true, Ordering::Relaxed);
        Ok(())
    }
    fn ready(&self) -> bool {
        self.running.load(Ordering::Relaxed)
    }
    async fn stopped(&self) {
        self.running.store(false, Ordering::Relaxed);
    }
}

// ---------------------------------------------------------------------------------------------

/// Called on each of the gateway's threads as it starts and stops (the binary's allocator keeps
/// per-thread caches there).
#[derive(Default, Clone, Copy)]
pub struct ThreadHooks {
    pub on_start: Option<fn()>,
    pub on_stop: Option<fn()>,
}

type TlsListener = (StdListener, Arc<CertStore>, Arc<rustls::ServerConfig>);

/// The gateway: its route table (spec and API routes, through `Control`), fed by the registry,
/// serving on its own runtime and threads so that proxy work never competes with control work.
pub(crate) struct GatewayComponent {
    pub gateway: Arc<Gateway>,
    pub control: Arc<Control>,
    pub addr: SocketAddr,
    pub tls_addr: Option<SocketAddr>,
    listeners: Mutex<Option<(StdListener, Option<TlsListener>)>>,
    workers: usize,
    hooks: ThreadHooks,
    thread: Mutex<Option<std::thread::JoinHandle<()>>>,
    running: AtomicBool,
    /// Renews the gateway's certificate (mutual TLS to instances).
    identity: Arc<gantry_identity::Identity>,
    cert_expires: u64,
}

impl GatewayComponent {
    #[allow(clippy::too_many_arguments)]
    pub async fn build(
        spec: &Arc<LoadedSpec>,
        data: &DataDir,
        registry: &Arc<Registry>,
        logs: &LogStore,
        metrics: &Metrics,
        node: String,
        hooks: ThreadHooks,
        identity: &Arc<gantry_identity::Identity>,
    ) -> anyhow::Result<Self> {
        let g = &spec.spec.gateway;
        let limits = &g.limits;
        let gateway = Gateway::new(
            GatewayConfig {
                access_log: g.access_log,
                request_id: g.request_id,
                trace_context: g.trace_context,
                forwarded_headers: g.forwarded_headers,
                max_connections: limits.max_connections as usize,
                max_header_bytes: limits.max_header_bytes as usize,
                max_headers: limits.max_headers as usize,
                header_read_timeout: Duration::from_millis(limits.header_read_timeout_ms),
                shutdown_grace: Duration::from_millis(limits.shutdown_grace_ms),
                cache_max_bytes: g.cache_max_bytes,
                node,
            },
            metrics,
        );
        if let Some(writer) = gateway.start_access_log(logs.clone()) {
            tokio::spawn(writer);
        }
        let auth = identity.material();
        gateway.apply_auth((**auth.borrow()).clone());
        // Mutual TLS to instances: the internal CA and the gateway's own certificate, before
        // the model whose upstreams use them.
        gateway.set_internal_ca(identity.ca_certificate().1.to_vec());
        let cert = identity.issue_gateway_cert()?;
        gateway
            .set_client_certificate(&cert.chain_pem, &cert.key_pem)
            .map_err(|e| anyhow!("the gateway's certificate: {e}"))?;
        gateway.on_refusal(crate::identity::RefusalAudit::start(data.store.clone()));
        {
            let gw = gateway.clone();
            registry.on_change(move |snap| gw.apply_registry(snap));
        }
        // Routes: the spec's plus those added over the admin API (and static endpoints).
        let control = Control::load(
            spec.clone(),
            data.store.clone(),
            gateway.clone(),
            registry.clone(),
            identity.clone(),
        )
        .await?;
        let tls = match &g.tls {
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
                // With services on mTLS, clients may present a certificate of the internal CA:
                // it names the calling service.
                let client_cas = if spec.spec.services.values().any(|s| s.mtls) {
                    vec![rustls_pki_types::CertificateDer::from(
                        identity.ca_certificate().1.to_vec(),
                    )]
                } else {
                    Vec::new()
                };
                let cfg = store
                    .server_config_with_clients(&client_cas)
                    .map_err(|e| anyhow!("gateway.tls: {e}"))?;
                Some((bind(t.listen, "gateway.tls.listen")?, store, cfg))
            }
        };
        let plain = bind(g.listen, "gateway.listen")?;
        let addr = plain.local_addr()?;
        let tls_addr = match &tls {
            Some((l, _, _)) => Some(l.local_addr()?),
            None => None,
        };
        Ok(Self {
            gateway,
            control,
            addr,
            tls_addr,
            listeners: Mutex::new(Some((plain, tls))),
            workers: g.workers,
            hooks,
            thread: Mutex::new(None),
            running: AtomicBool::new(false),
            identity: identity.clone(),
            cert_expires: cert.expires,
        })
    }
}

#[async_trait::async_trait]
impl Component for GatewayComponent {
    fn name(&self) -> &'static str {
        "gateway"
    }

    async fn start(&self, shutdown: watch::Receiver<bool>) -> anyhow::Result<()> {
        let shutdown_rx = shutdown.clone();
        let (plain, tls) = lock(&self.listeners)
            .take()
            .ok_or_else(|| anyhow!("the gateway was started twice"))?;
        let thread = spawn_gateway(
            self.gateway.clone(),
            plain,
            tls,
            self.workers,
            self.hooks,
            shutdown,
        )?;
        *lock(&self.thread) = Some(thread);
        // Every change of identity's material swaps the gateway's (keys before they sign,
        // revocations, API keys, sessions, the call policy) before the change returns: a
        // session made by a sign-in is in force when the sign-in answers.
        let gw = self.gateway.clone();
        self.identity
            .on_material(move |m| gw.apply_auth((**m).clone()));
        let mut stop2 = shutdown_rx;
        // The gateway's certificate, renewed at half-life.
        let (gw, id, mut expires) = (
            self.gateway.clone(),
            self.identity.clone(),
            self.cert_expires,
        );
        tokio::spawn(async move {
            loop {
                let now = gantry_model::unix_ms() / 1000;
                let wait = expires.saturating_sub(now) / 2;
                tokio::select! {
                    _ = tokio::time::sleep(Duration::from_secs(wait.max(1))) => {}
                    _ = stop2.changed() => break,
                }
                match id
                    .issue_gateway_cert()
                    .map_err(|e| e.to_string())
                    .and_then(|c| {
                        gw.set_client_certificate(&c.chain_pem, &c.key_pem)?;
                        Ok(c.expires)
                    }) {
                    Ok(e) => expires = e,
                    Err(e) => {
                        tracing::warn!(error = %e, "cannot renew the gateway's certificate; retrying in a minute");
                        expires = now + 120;
                    }
                }
            }
        });
        self.running.store(true, Ordering::Relaxed);
        Ok(())
    }

    fn ready(&self) -> bool {
        self.running.load(Ordering::Relaxed)
    }

    async fn stopped(&self) {
        let thread = lock(&self.thread).take();
        if let Some(t) = thread {
            let _ = tokio::task::spawn_blocking(move || t.join()).await;
        }
        self.running.store(false, Ordering::Relaxed);
    }
}

/// Run the gateway on its own runtime (its own threads). One worker gets a current-thread
/// runtime (no work stealing).
fn spawn_gateway(
    gateway: Arc<Gateway>,
    listener: StdListener,
    tls: Option<TlsListener>,
    workers: usize,
    hooks: ThreadHooks,
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
        let mut b = tokio::runtime::Builder::new_multi_thread();
        b.worker_threads(workers).thread_name("gantry-gateway");
        if let Some(f) = hooks.on_start {
            b.on_thread_start(f);
        }
        if let Some(f) = hooks.on_stop {
            b.on_thread_stop(f);
        }
        b.enable_all().build()?
    };
    let handle = std::thread::Builder::new()
        .name("gantry-gateway".into())
        .spawn(move || {
            if let Some(f) = hooks.on_start {
                f();
            }
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
            if let Some(f) = hooks.on_stop {
                f();
            }
        })?;
    Ok(handle)
}

// ---------------------------------------------------------------------------------------------

pub(crate) use gantry_api::serve::Limits as AdminLimits;

/// The admin API (axum) on its listener, with the gateway's connection defences.
pub(crate) struct AdminComponent {
    pub addr: SocketAddr,
    limits: AdminLimits,
    pending: Mutex<Option<(StdListener, axum::Router)>>,
    task: TaskSlot,
    running: Arc<AtomicBool>,
}

impl AdminComponent {
    /// Bound early, so that the supervisor can tell instances the admin URL.
    pub fn bind(spec: &LoadedSpec) -> anyhow::Result<(StdListener, SocketAddr)> {
        let l = bind(spec.spec.admin.listen, "admin.listen")?;
        let addr = l.local_addr()?;
        Ok((l, addr))
    }

    pub fn build(
        bound: (StdListener, SocketAddr),
        state: gantry_api::ApiState,
        limits: AdminLimits,
    ) -> Self {
        Self {
            addr: bound.1,
            limits,
            pending: Mutex::new(Some((bound.0, gantry_api::router(state)))),
            task: TaskSlot::default(),
            running: Arc::new(AtomicBool::new(false)),
        }
    }
}

#[async_trait::async_trait]
impl Component for AdminComponent {
    fn name(&self) -> &'static str {
        "admin-api"
    }

    async fn start(&self, shutdown: watch::Receiver<bool>) -> anyhow::Result<()> {
        let (listener, router) = lock(&self.pending)
            .take()
            .ok_or_else(|| anyhow!("the admin API was started twice"))?;
        let listener = tokio::net::TcpListener::from_std(listener)?;
        let running = self.running.clone();
        running.store(true, Ordering::Relaxed);
        let limits = self.limits;
        let task = tokio::spawn(async move {
            gantry_api::serve::serve(listener, router, limits, shutdown).await;
            running.store(false, Ordering::Relaxed);
        });
        self.task.set(task);
        Ok(())
    }

    fn ready(&self) -> bool {
        self.running.load(Ordering::Relaxed)
    }

    async fn stopped(&self) {
        self.task.join(Duration::from_secs(10)).await;
    }
}

// ---------------------------------------------------------------------------------------------

struct GatewayDrain(Arc<Gateway>);

impl DrainObserver for GatewayDrain {
    fn inflight(&self, instance: &str) -> usize {
        self.0.inflight(instance)
    }
}

/// A built-in service the gateway routes to (the token service under `[identity]
/// gateway_path`, the bus under `[bus] gateway_path`): its one instance is the component's
/// own listener.
pub(crate) fn register_builtin(
    registry: &gantry_registry::Registry,
    service: &str,
    addr: std::net::SocketAddr,
) {
    let ip = if addr.ip().is_unspecified() {
        std::net::IpAddr::from([127, 0, 0, 1])
    } else {
        addr.ip()
    };
    registry.register_static(gantry_model::Instance {
        id: format!("{service}-1"),
        service: service.into(),
        version: semver::Version::new(0, 0, 0),
        address: ip,
        port: addr.port(),
        metadata: Default::default(),
        node: registry.node().to_string(),
        zone: None,
        health: gantry_model::Health::Passing,
        source: gantry_model::InstanceSource::Static,
        registered_at_ms: gantry_model::unix_ms(),
        tags: Vec::new(),
        checks: Vec::new(),
    });
}

pub(crate) struct SupervisorInputs {
    pub registry: Arc<Registry>,
    pub config: Arc<ConfigStore>,
    pub logs: LogStore,
    pub metrics: Metrics,
    pub gateway: Arc<Gateway>,
    pub gateway_url: String,
    pub admin_url: String,
    pub bus_url: Option<String>,
    pub node: String,
    pub echo: Option<Echo>,
    pub identity: Arc<gantry_identity::Identity>,
}

/// The supervisor: at start the spec's services become the desired state, then it reconciles
/// running instances to the desired state until stopped (drain, signal, kill; dependents first).
pub(crate) struct SupervisorComponent {
    pub supervisor: Arc<Supervisor>,
    spec: Arc<LoadedSpec>,
    running: AtomicBool,
}

impl SupervisorComponent {
    pub fn build(spec: &Arc<LoadedSpec>, data: &DataDir, i: SupervisorInputs) -> Self {
        let supervisor = Supervisor::new(SupervisorDeps {
            registry: i.registry,
            config: i.config,
            store: data.store.clone(),
            logs: i.logs,
            metrics: i.metrics,
            drain: Arc::new(GatewayDrain(i.gateway)),
            gateway_url: i.gateway_url,
            admin_url: i.admin_url,
            bus_url: i.bus_url,
            node: i.node,
            echo: i.echo,
            instances_dir: data.dir.join("instances"),
            hooks: vec![Arc::new(gantry_identity::workload::WorkloadHook::new(
                i.identity,
            ))],
            system_id: data.system_id.clone(),
            environment: spec.spec.config.env.clone(),
        });
        Self {
            supervisor,
            spec: spec.clone(),
            running: AtomicBool::new(false),
        }
    }
}

#[async_trait::async_trait]
impl Component for SupervisorComponent {
    fn name(&self) -> &'static str {
        "supervisor"
    }

    async fn start(&self, _shutdown: watch::Receiver<bool>) -> anyhow::Result<()> {
        let applied = self
            .supervisor
            .desired()
            .apply_spec(self.spec.deployments())
            .await?;
        if !applied.kept_scale.is_empty() {
            tracing::debug!(services = %applied.kept_scale.join(", "), "instance counts set with `gantry scale` kept");
        }
        self.supervisor.start().await?;
        self.running.store(true, Ordering::Relaxed);
        Ok(())
    }

    fn ready(&self) -> bool {
        self.running.load(Ordering::Relaxed)
    }

    async fn stopped(&self) {
        self.supervisor.shutdown().await;
        self.running.store(false, Ordering::Relaxed);
    }
}
