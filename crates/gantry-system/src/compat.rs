//! Listeners that speak other systems' APIs over Gantry's registry and config store
//! (`gantry-compat`), each a component of its own, present only when the spec asks for it.

use std::net::SocketAddr;
use std::net::TcpListener as StdListener;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex, PoisonError};
use std::time::Duration;

use anyhow::{anyhow, Context as _};
use gantry_spec::LoadedSpec;
use tokio::sync::watch;

use crate::components::TaskSlot;
use crate::components::{local_url, AdminLimits};
use crate::Component;

/// A listener that speaks another system's HTTP API (`[registry] consul`, `eureka`).
pub(crate) struct CompatListener {
    name: &'static str,
    pub addr: SocketAddr,
    limits: AdminLimits,
    pending: Mutex<Option<(StdListener, axum::Router)>>,
    task: TaskSlot,
    running: Arc<AtomicBool>,
}

impl CompatListener {
    /// `None` when the spec gives no address; bound here, so a taken port fails the build.
    pub fn build(
        name: &'static str,
        addr: Option<SocketAddr>,
        mut state: gantry_compat::CompatState,
        router: fn(gantry_compat::CompatState) -> axum::Router,
        limits: AdminLimits,
    ) -> anyhow::Result<Option<Self>> {
        let Some(addr) = addr else {
            return Ok(None);
        };
        let field = match name {
            "spring-config" => "config.spring".to_string(),
            other => format!("registry.{other}"),
        };
        let l =
            StdListener::bind(addr).with_context(|| format!("{field} cannot listen on {addr}"))?;
        l.set_nonblocking(true)?;
        let addr = l.local_addr()?;
        state.advertise = local_url(addr).trim_start_matches("http://").to_string();
        Ok(Some(Self {
            name,
            addr,
            limits,
            pending: Mutex::new(Some((l, router(state)))),
            task: TaskSlot::default(),
            running: Arc::new(AtomicBool::new(false)),
        }))
    }
}

#[async_trait::async_trait]
impl Component for CompatListener {
    fn name(&self) -> &'static str {
        self.name
    }

    async fn start(&self, shutdown: watch::Receiver<bool>) -> anyhow::Result<()> {
        let (listener, router) = self
            .pending
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .take()
            .ok_or_else(|| anyhow!("the {} listener was started twice", self.name))?;
        let listener = tokio::net::TcpListener::from_std(listener)?;
        let running = self.running.clone();
        running.store(true, Ordering::Relaxed);
        let limits = self.limits;
        let task = tokio::spawn(async move {
            gantry_api::serve::serve(listener, router, limits, shutdown).await;
            running.store(false, Ordering::Relaxed);
        });
        self.task.set(task);
        tracing::info!(addr = %self.addr, api = self.name, "compatible API listening");
        Ok(())
    }

    fn ready(&self) -> bool {
        self.running.load(Ordering::Relaxed)
    }

    async fn stopped(&self) {
        self.task.join(Duration::from_secs(10)).await;
    }
}

/// DNS for the registry (`[registry] dns`).
pub(crate) struct DnsComponent {
    pub addr: SocketAddr,
    pending: Mutex<Option<(std::net::UdpSocket, StdListener, gantry_dns::DnsHandler)>>,
    task: TaskSlot,
    running: Arc<AtomicBool>,
}

impl DnsComponent {
    pub fn build(
        spec: &LoadedSpec,
        registry: Arc<gantry_registry::Registry>,
        metrics: &gantry_telemetry::Metrics,
    ) -> anyhow::Result<Option<Self>> {
        let Some(addr) = spec.spec.registry.dns else {
            return Ok(None);
        };
        let (udp, tcp) = gantry_dns::bind(addr)
            .with_context(|| format!("registry.dns cannot listen on {addr} (UDP and TCP)"))?;
        let addr = udp.local_addr()?;
        let handler = gantry_dns::DnsHandler::new(
            registry,
            Duration::from_secs(u64::from(spec.spec.registry.dns_ttl_secs)),
            metrics,
        );
        Ok(Some(Self {
            addr,
            pending: Mutex::new(Some((udp, tcp, handler))),
            task: TaskSlot::default(),
            running: Arc::new(AtomicBool::new(false)),
        }))
    }
}

#[async_trait::async_trait]
impl Component for DnsComponent {
    fn name(&self) -> &'static str {
        "dns"
    }

    async fn start(&self, shutdown: watch::Receiver<bool>) -> anyhow::Result<()> {
        let (udp, tcp, handler) = self
            .pending
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .take()
            .ok_or_else(|| anyhow!("DNS was started twice"))?;
        let running = self.running.clone();
        running.store(true, Ordering::Relaxed);
        let task = tokio::spawn(async move {
            if let Err(e) = gantry_dns::serve(handler, udp, tcp, shutdown).await {
                tracing::error!(error = %e, "DNS stopped");
            }
            running.store(false, Ordering::Relaxed);
        });
        self.task.set(task);
        tracing::info!(addr = %self.addr, "DNS listening (UDP and TCP)");
        Ok(())
    }

    fn ready(&self) -> bool {
        self.running.load(Ordering::Relaxed)
    }

    async fn stopped(&self) {
        self.task.join(Duration::from_secs(10)).await;
    }
}

/// The gateway's passive signals in the registry: an instance its outlier detection has
/// ejected shows a `gateway` check at warning (clients that want passing instances only, such
/// as Consul's `passing` queries and DNS users that filter, then avoid it); the check goes
/// when the ejection ends. Sampled every 250 ms: the request path is never touched.
pub(crate) struct PassiveHealth {
    registry: Arc<gantry_registry::Registry>,
    gateway: Arc<gantry_gateway::Gateway>,
    running: Arc<AtomicBool>,
}

const PASSIVE_CHECK: &str = "gateway";

impl PassiveHealth {
    pub fn new(
        registry: Arc<gantry_registry::Registry>,
        gateway: Arc<gantry_gateway::Gateway>,
    ) -> Self {
        Self {
            registry,
            gateway,
            running: Arc::new(AtomicBool::new(false)),
        }
    }

    /// One sample: returns how many instances changed.
    pub fn sample(
        registry: &gantry_registry::Registry,
        gateway: &gantry_gateway::Gateway,
    ) -> usize {
        let ejected: std::collections::HashMap<String, u32> =
            gateway.ejected_instances().into_iter().collect();
        let snap = registry.snapshot();
        let mut changed = 0;
        for inst in snap.services.values().flat_map(|l| l.iter()) {
            let has = inst.checks.iter().any(|c| c.id == PASSIVE_CHECK);
            let status = ejected.get(&inst.id).map(|n| {
                (
                    gantry_model::Health::Warning,
                    format!(
                        "ejected by the gateway's outlier detection ({n} ejection(s) in a row)"
                    ),
                )
            });
            if (has || status.is_some()) && registry.set_check(&inst.id, PASSIVE_CHECK, status) {
                changed += 1;
            }
        }
        changed
    }
}

#[async_trait::async_trait]
impl Component for PassiveHealth {
    fn name(&self) -> &'static str {
        "passive-health"
    }

    async fn start(&self, mut shutdown: watch::Receiver<bool>) -> anyhow::Result<()> {
        let (registry, gateway, running) = (
            self.registry.clone(),
            self.gateway.clone(),
            self.running.clone(),
        );
        running.store(true, Ordering::Relaxed);
        tokio::spawn(async move {
            let mut tick = tokio::time::interval(Duration::from_millis(250));
            tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
            loop {
                tokio::select! {
                    _ = tick.tick() => { Self::sample(&registry, &gateway); }
                    _ = shutdown.wait_for(|s| *s) => break,
                }
            }
            running.store(false, Ordering::Relaxed);
        });
        Ok(())
    }

    fn ready(&self) -> bool {
        self.running.load(Ordering::Relaxed)
    }

    async fn stopped(&self) {}
}
