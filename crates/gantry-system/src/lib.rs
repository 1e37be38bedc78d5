//! The composition root: what `gantry up` runs, as a list of components.
//!
//! Every component follows one contract ([`Component`]): it is *built* from the spec and the
//! handles of the components built before it (binding its listeners, loading its state: anything
//! that can fail fails here, before anything runs), *started* with a shutdown signal of its own
//! (returning once it is ready), asked whether it is *ready*, and *stopped* in order: the system
//! starts components in list order and stops them in reverse, each after its signal flips.
//!
//! The list ([`System::build`]): registry → identity (token service, keys, the verifiers'
//! material) → gateway (routes from the spec and the API, listeners, its own runtime; follows
//! identity's material) → admin API → supervisor (desired state from the spec, then
//! reconciling; identity's hook gives each instance its credential). So the stop order is:
//! supervisor (drain, signal, kill; dependents before dependencies) → admin API → gateway
//! (finish open requests) → identity → registry. Components to come (the bus, telemetry stores,
//! the release controller, the autoscaler) attach as entries of this list.
#![forbid(unsafe_code)]

mod bus;
mod compat;
mod components;
pub mod control;
mod datadir;
pub mod identity;
mod tsdb;

use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::Arc;

use gantry_config::ConfigStore;
use gantry_gateway::Gateway;
use gantry_registry::Registry;
use gantry_spec::LoadedSpec;
use gantry_store::Store;
use gantry_supervisor::{Echo, Supervisor};
use gantry_telemetry::{LogStore, Metrics};
use tokio::sync::watch;

pub use components::{local_url, register_static_endpoints, ThreadHooks};
pub use control::Control;
pub use datadir::{AdminInfo, ADMIN_INFO_FILE, TOKEN_FILE};

/// One part of the running system.
#[async_trait::async_trait]
pub trait Component: Send + Sync {
    fn name(&self) -> &'static str;
    /// Start; return once ready to serve. Background work ends when `shutdown` becomes true.
    async fn start(&self, shutdown: watch::Receiver<bool>) -> anyhow::Result<()>;
    /// Whether it is serving now (for health reports).
    fn ready(&self) -> bool;
    /// Called after this component's shutdown signal flipped: finish what it does (drain) and
    /// return when stopped.
    async fn stopped(&self);
}

/// What the binary adds to a system: terminal echo of instance output, and hooks for the
/// gateway's threads (the allocator's per-thread caches).
#[derive(Default)]
pub struct Options {
    pub echo: Option<Echo>,
    pub gateway_threads: ThreadHooks,
    /// Start clean: forget registrations, config, routes added over the API, scale and deployed
    /// versions of earlier runs.
    pub fresh: bool,
}

/// What an earlier run left in the store that this run picks up (said at start, so that it
/// never carries over silently).
#[derive(Debug, Default, Clone, PartialEq, Eq)]
pub struct EarlierState {
    pub api_routes: usize,
    pub registrations: usize,
    pub configured_services: usize,
    /// Services whose instance count was set through the API, or that run versions deployed
    /// through it.
    pub changed_deployments: Vec<String>,
}

impl EarlierState {
    pub fn is_empty(&self) -> bool {
        *self == Self::default()
    }
}

impl std::fmt::Display for EarlierState {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let mut parts = Vec::new();
        if self.api_routes > 0 {
            parts.push(format!("{} route(s) added over the API", self.api_routes));
        }
        if self.registrations > 0 {
            parts.push(format!("{} self-registration(s)", self.registrations));
        }
        if self.configured_services > 0 {
            parts.push(format!("config of {} service(s)", self.configured_services));
        }
        if !self.changed_deployments.is_empty() {
            parts.push(format!(
                "scale or deployed versions of {}",
                self.changed_deployments.join(", ")
            ));
        }
        f.write_str(&parts.join(", "))
    }
}

fn admin_limits(spec: &LoadedSpec) -> components::AdminLimits {
    let g = &spec.spec.gateway.limits;
    components::AdminLimits {
        max_connections: spec.spec.admin.max_connections as usize,
        header_read_timeout: std::time::Duration::from_millis(g.header_read_timeout_ms),
        max_header_bytes: g.max_header_bytes as usize,
    }
}

/// A built system: its components in start order, and handles on the shared parts.
pub struct System {
    components: Vec<Arc<dyn Component>>,
    signals: Vec<watch::Sender<bool>>,
    pub spec: Arc<LoadedSpec>,
    pub data_dir: PathBuf,
    pub store: Arc<dyn Store>,
    pub metrics: Metrics,
    pub logs: LogStore,
    pub registry: Arc<Registry>,
    pub config: Arc<ConfigStore>,
    pub gateway: Arc<Gateway>,
    pub control: Arc<Control>,
    pub supervisor: Arc<Supervisor>,
    pub gateway_addr: SocketAddr,
    pub tls_addr: Option<SocketAddr>,
    pub admin_addr: SocketAddr,
    pub identity: Arc<gantry_identity::Identity>,
    pub identity_addr: SocketAddr,
    pub consul_addr: Option<SocketAddr>,
    pub eureka_addr: Option<SocketAddr>,
    pub spring_addr: Option<SocketAddr>,
    pub dns_addr: Option<SocketAddr>,
    _lock: std::fs::File,
}

impl System {
    /// Build every component from the spec (nothing runs yet).
    pub async fn build(spec: Arc<LoadedSpec>, opts: Options) -> anyhow::Result<Self> {
        let metrics = Metrics::new();
        let data = datadir::DataDir::open(&spec, opts.fresh, &metrics).await?;
        data.store
            .ensure_bucket(
                gantry_api::audit::AUDIT_BUCKET,
                gantry_api::audit::bucket_options(),
            )
            .await?;
        let logs = datadir::open_logs(&spec.spec.logs, &data.dir, &metrics).await?;
        let tsdb = tsdb::TsdbComponent::build(&spec.spec.metrics, &data.dir, &metrics).await?;
        let node = components::node_name();
        let registry = components::RegistryComponent::build(&data, node.clone(), &metrics).await?;
        let config = ConfigStore::open(
            data.store.clone(),
            data.keyring.clone(),
            gantry_config::ConfigOptions {
                history: spec.spec.config.history,
            },
        )
        .await?;
        let identity =
            identity::IdentityComponent::build(&spec, &data, &metrics, admin_limits(&spec)).await?;

        let gateway = components::GatewayComponent::build(
            &spec,
            &data,
            &registry.registry,
            &logs,
            &metrics,
            node.clone(),
            opts.gateway_threads,
            &identity.identity,
        )
        .await?;
        // After the gateway follows the registry.
        if spec.spec.identity.gateway_path.is_some() {
            components::register_builtin(
                &registry.registry,
                gantry_spec::IDENTITY_SERVICE,
                identity.addr,
            );
        }
        let bus = bus::BusComponent::new(
            gantry_bus::Bus::open(
                data.log.clone(),
                data.store.clone(),
                gateway.gateway.clone(),
                &metrics,
            )
            .await?,
            &spec.spec,
        );
        gateway.control.set_bus(bus.bus.clone());
        let admin_addr = components::AdminComponent::bind(&spec)?;
        // Services publish on the gateway: the bus's route goes to the admin API.
        components::register_builtin(&registry.registry, gantry_spec::BUS_SERVICE, admin_addr.1);
        let bus_path = &spec.spec.bus.gateway_path;
        let supervisor = components::SupervisorComponent::build(
            &spec,
            &data,
            components::SupervisorInputs {
                registry: registry.registry.clone(),
                config: config.clone(),
                logs: logs.clone(),
                metrics: metrics.clone(),
                gateway: gateway.gateway.clone(),
                gateway_url: local_url(gateway.addr),
                admin_url: local_url(admin_addr.1),
                bus_url: (!bus_path.is_empty()).then(|| {
                    format!(
                        "{}{}",
                        local_url(gateway.addr),
                        bus_path.trim_end_matches('/')
                    )
                }),
                node,
                echo: opts.echo,
                identity: identity.identity.clone(),
            },
        );
        let admin = components::AdminComponent::build(
            admin_addr,
            gantry_api::ApiState {
                supervisor: supervisor.supervisor.clone(),
                registry: registry.registry.clone(),
                config: config.clone(),
                gateway: gateway.gateway.clone(),
                logs: logs.clone(),
                metrics: metrics.clone(),
                auth: Arc::new(gantry_api::auth::Principals::new(
                    data.token.clone(),
                    identity.identity.clone(),
                )),
                identity: identity.identity.clone(),
                config_env: spec.spec.config.env.clone(),
                bus: bus.bus.clone(),
                tsdb: tsdb.tsdb.clone(),
                public: Arc::new(
                    spec.spec
                        .admin
                        .public
                        .iter()
                        .map(|p| match p {
                            gantry_spec::AdminPublic::Health => {
                                gantry_api::auth::Permission::HealthRead
                            }
                            gantry_spec::AdminPublic::Metrics => {
                                gantry_api::auth::Permission::MetricsRead
                            }
                        })
                        .collect(),
                ),
                store: data.store.clone(),
                control: gateway.control.clone(),
            },
            admin_limits(&spec),
        );
        let identity_addr = identity.addr;
        let anonymous = |a: gantry_spec::AnonymousAccess| {
            use gantry_api::auth::Permission as P;
            Arc::new(
                match a {
                    gantry_spec::AnonymousAccess::None => vec![],
                    gantry_spec::AnonymousAccess::Read => vec![P::RegistryRead, P::ConfigRead],
                    gantry_spec::AnonymousAccess::Register => {
                        vec![P::RegistryRead, P::ConfigRead, P::RegistryWrite]
                    }
                }
                .into_iter()
                .collect(),
            )
        };
        // Services gantry runs or fixes: closed to registrations from the compatible APIs.
        let managed: Arc<std::collections::BTreeSet<String>> = Arc::new(
            spec.spec
                .services
                .iter()
                .filter(|(_, s)| !s.external)
                .map(|(n, _)| n.clone())
                .chain(gantry_model::BUILTIN_SERVICES.iter().map(|s| s.to_string()))
                .collect(),
        );
        let compat_state = |anonymous| gantry_compat::CompatState {
            managed: managed.clone(),
            waiters: Arc::new(tokio::sync::Semaphore::new(gantry_compat::MAX_WAITERS)),
            registry: registry.registry.clone(),
            config: config.clone(),
            auth: Arc::new(gantry_api::auth::Principals::new(
                data.token.clone(),
                identity.identity.clone(),
            )),
            store: data.store.clone(),
            advertise: String::new(),
            anonymous,
        };
        let reg = &spec.spec.registry;
        let consul = compat::CompatListener::build(
            "consul",
            reg.consul,
            compat_state(anonymous(reg.consul_anonymous)),
            gantry_compat::consul::router,
            admin_limits(&spec),
        )?;
        let eureka = compat::CompatListener::build(
            "eureka",
            reg.eureka,
            compat_state(anonymous(reg.eureka_anonymous)),
            gantry_compat::eureka::router,
            admin_limits(&spec),
        )?;
        let eureka_addr = eureka.as_ref().map(|c| c.addr);
        let spring = compat::CompatListener::build(
            "spring-config",
            spec.spec.config.spring,
            compat_state(Arc::new(Default::default())),
            gantry_compat::spring::router,
            admin_limits(&spec),
        )?;
        let spring_addr = spring.as_ref().map(|c| c.addr);
        let consul_addr = consul.as_ref().map(|c| c.addr);
        let dns = compat::DnsComponent::build(&spec, registry.registry.clone(), &metrics)?;
        let dns_addr = dns.as_ref().map(|c| c.addr);
        let system = Self {
            spec,
            data_dir: data.dir.clone(),
            store: data.store.clone(),
            metrics,
            logs,
            registry: registry.registry.clone(),
            config,
            gateway: gateway.gateway.clone(),
            control: gateway.control.clone(),
            supervisor: supervisor.supervisor.clone(),
            gateway_addr: gateway.addr,
            tls_addr: gateway.tls_addr,
            admin_addr: admin.addr,
            identity: identity.identity.clone(),
            identity_addr,
            consul_addr,
            eureka_addr,
            spring_addr,
            dns_addr,
            // Start order; stopped in reverse.
            components: {
                let passive =
                    compat::PassiveHealth::new(registry.registry.clone(), gateway.gateway.clone());
                let mut c: Vec<Arc<dyn Component>> = vec![
                    // First: its sampling covers every other component's life, and its last
                    // sample is taken after they stopped.
                    Arc::new(tsdb),
                    Arc::new(registry),
                    Arc::new(identity),
                    Arc::new(gateway),
                    Arc::new(passive),
                    Arc::new(bus),
                    Arc::new(admin),
                ];
                if let Some(consul) = consul {
                    c.push(Arc::new(consul));
                }
                if let Some(eureka) = eureka {
                    c.push(Arc::new(eureka));
                }
                if let Some(spring) = spring {
                    c.push(Arc::new(spring));
                }
                if let Some(dns) = dns {
                    c.push(Arc::new(dns));
                }
                c.push(Arc::new(supervisor));
                c
            },
            signals: Vec::new(),
            _lock: data.lock,
        };
        Ok(system)
    }

    /// What earlier runs left in the store (read before `start` changes it).
    pub async fn earlier_state(&self) -> anyhow::Result<EarlierState> {
        let spec_replicas: std::collections::BTreeMap<&str, u32> = self
            .spec
            .spec
            .services
            .iter()
            .map(|(n, s)| (n.as_str(), s.replicas))
            .collect();
        let changed_deployments = self
            .supervisor
            .desired()
            .list()
            .await?
            .into_iter()
            .filter(|d| {
                d.versions.iter().any(|v| {
                    v.source == gantry_model::VersionSource::Api
                        || (v.replicas != v.spec_replicas
                            && spec_replicas.get(d.service.as_str()) == Some(&v.spec_replicas))
                })
            })
            .map(|d| d.service)
            .collect();
        Ok(EarlierState {
            api_routes: self.store.keys("routes", ">").await?.len(),
            registrations: self.store.keys("registry", ">").await?.len(),
            configured_services: self.config.sets().await?.len(),
            changed_deployments,
        })
    }

    /// Start every component in order; each is ready when the next starts. Then write
    /// `admin.json`, which tells clients (and tests) the system is up.
    pub async fn start(&mut self) -> anyhow::Result<()> {
        for c in &self.components {
            let (tx, rx) = watch::channel(false);
            c.start(rx)
                .await
                .map_err(|e| e.context(format!("starting {}", c.name())))?;
            tracing::debug!(component = c.name(), "started");
            self.signals.push(tx);
        }
        datadir::write_admin_info(
            &self.data_dir,
            &AdminInfo {
                admin_url: local_url(self.admin_addr),
                gateway_url: local_url(self.gateway_addr),
                identity_url: local_url(self.identity_addr),
                consul_url: self.consul_addr.map(local_url),
                eureka_url: self.eureka_addr.map(local_url),
                spring_config_url: self.spring_addr.map(local_url),
                dns_addr: self.dns_addr.map(|a| a.to_string()),
                pid: std::process::id(),
                started_ms: gantry_model::unix_ms(),
            },
        )?;
        Ok(())
    }

    /// Each component by name with whether it is ready.
    pub fn readiness(&self) -> Vec<(&'static str, bool)> {
        self.components
            .iter()
            .map(|c| (c.name(), c.ready()))
            .collect()
    }

    /// Stop the started components in reverse order.
    pub async fn stop(&mut self) {
        let _ = std::fs::remove_file(self.data_dir.join(ADMIN_INFO_FILE));
        while let Some(tx) = self.signals.pop() {
            let c = &self.components[self.signals.len()];
            tx.send_replace(true);
            c.stopped().await;
            tracing::debug!(component = c.name(), "stopped");
        }
        // The instances' last lines, on disk before the process ends.
        if !self.logs.flush(std::time::Duration::from_secs(2)).await {
            tracing::warn!("logs: not every line reached the disk before the stop");
        }
    }
}
