//! The identity component: the token service on its own listener, signing keys kept and
//! rotated, the verifiers' material published (the gateway follows it), workload credentials
//! for the supervisor's instances.

use std::net::{SocketAddr, TcpListener as StdListener};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex, PoisonError};

use anyhow::{anyhow, Context};
use gantry_identity::{external::ExternalIssuer, Alg, Identity, IdentityConfig};
use gantry_spec::{LoadedSpec, Spec};
use gantry_telemetry::Metrics;
use tokio::sync::watch;

use crate::components::{local_url, AdminLimits};
use crate::datadir::DataDir;
use crate::Component;

/// The service-to-service policy the spec declares.
pub fn call_policy(spec: &Spec) -> gantry_authn::CallPolicy {
    gantry_authn::CallPolicy {
        default_allow: !spec.identity.deny_by_default(),
        calls: spec
            .services
            .iter()
            .map(|(name, s)| (name.clone(), s.calls.iter().cloned().collect()))
            .collect(),
    }
}

/// The services whose instances get certificates.
pub fn mtls_services(spec: &Spec) -> std::collections::BTreeSet<String> {
    spec.services
        .iter()
        .filter(|(_, s)| s.mtls)
        .map(|(n, _)| n.clone())
        .collect()
}

pub(crate) struct IdentityComponent {
    pub identity: Arc<Identity>,
    pub addr: SocketAddr,
    listener: Mutex<Option<StdListener>>,
    limits: AdminLimits,
    running: AtomicBool,
}

impl IdentityComponent {
    pub async fn build(
        spec: &LoadedSpec,
        data: &DataDir,
        metrics: &Metrics,
        limits: AdminLimits,
    ) -> anyhow::Result<Self> {
        let s = &spec.spec.identity;
        let listener = StdListener::bind(s.listen)
            .with_context(|| format!("identity cannot listen on {}", s.listen))?;
        listener.set_nonblocking(true)?;
        let addr = listener.local_addr()?;
        let issuer = s
            .issuer
            .clone()
            .unwrap_or_else(|| local_url(addr))
            .trim_end_matches('/')
            .to_string();
        let cfg = IdentityConfig {
            issuer,
            algorithm: Alg::parse(&s.algorithm)
                .ok_or_else(|| anyhow!("identity.algorithm {:?}", s.algorithm))?,
            access_ttl: s.access_token_ttl_secs,
            refresh_ttl: s.refresh_token_ttl_secs,
            workload_ttl: s.workload_token_ttl_secs,
            rotate_every: s.rotate_every_secs,
            propagation: s.key_propagation_secs,
            session_ttl: s.session_ttl_secs,
            cert_ttl: s.workload_cert_ttl_secs,
            sessions_redis: s.sessions_redis.clone(),
            keyring: data.keyring.clone(),
            mtls: mtls_services(&spec.spec),
            audience: s.audience.clone(),
            calls: call_policy(&spec.spec),
            external: s
                .issuers
                .iter()
                .map(|e| ExternalIssuer {
                    name: e.name.clone(),
                    issuer: e.issuer.trim_end_matches('/').to_string(),
                    jwks_uri: e.jwks_uri.clone(),
                    ca_file: e
                        .ca_file
                        .as_ref()
                        .map(|f| spec.base_dir.join(f).display().to_string()),
                })
                .collect(),
        };
        let identity = Identity::open(data.store.clone(), cfg, metrics).await?;
        Ok(Self {
            identity,
            addr,
            listener: Mutex::new(Some(listener)),
            limits,
            running: AtomicBool::new(false),
        })
    }
}

#[async_trait::async_trait]
impl Component for IdentityComponent {
    fn name(&self) -> &'static str {
        "identity"
    }

    async fn start(&self, shutdown: watch::Receiver<bool>) -> anyhow::Result<()> {
        let l = self
            .listener
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .take()
            .ok_or_else(|| anyhow!("identity was started twice"))?;
        let l = tokio::net::TcpListener::from_std(l)?;
        tokio::spawn(self.identity.clone().run(shutdown.clone()));
        tokio::spawn(gantry_api::serve::serve(
            l,
            gantry_identity::oauth::router(self.identity.clone()),
            self.limits,
            shutdown,
        ));
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

/// Calls the service-to-service policy refused go into the audit trail (at most 50 a second:
/// whoever can reach the gateway can be refused, and must not fill the store with it).
pub(crate) struct RefusalAudit {
    tx: tokio::sync::mpsc::Sender<gantry_api::audit::AuditRecord>,
}

const REFUSALS_PER_SECOND: u32 = 50;

impl RefusalAudit {
    pub fn start(store: Arc<dyn gantry_store::Store>) -> Arc<Self> {
        use gantry_store::StoreJsonExt as _;
        let (tx, mut rx) = tokio::sync::mpsc::channel::<gantry_api::audit::AuditRecord>(1024);
        tokio::spawn(async move {
            let (mut second, mut count) = (0u64, 0u32);
            while let Some(rec) = rx.recv().await {
                let now = rec.time_ms / 1000;
                if now != second {
                    (second, count) = (now, 0);
                }
                count += 1;
                if count > REFUSALS_PER_SECOND {
                    continue;
                }
                if let Err(e) = store
                    .create_json(gantry_api::audit::AUDIT_BUCKET, &rec.id, &rec)
                    .await
                {
                    tracing::error!(error = %e, "cannot write audit record of a refused call");
                }
            }
        });
        Arc::new(Self { tx })
    }
}

impl gantry_gateway::RefusalObserver for RefusalAudit {
    fn refused(&self, r: &gantry_gateway::Refused<'_>) {
        let time_ms = gantry_model::unix_ms();
        tracing::info!(
            target: "gantry::audit",
            caller = r.caller.unwrap_or("-"),
            service = r.service,
            route = r.route,
            reason = r.reason,
            request_id = r.request_id,
            "service call refused"
        );
        let rec = gantry_api::audit::AuditRecord {
            id: format!("{time_ms:013}-{}", gantry_registry::random_hex(4)),
            time_ms,
            principal: r.caller.map(|c| format!("service:{c}")),
            principal_kind: r.caller.map(|_| "workload".to_string()),
            method: r.method.to_string(),
            path: r.path.chars().take(1024).collect(),
            action: format!("call:{} ({})", r.service, r.reason),
            remote: Some(r.client.to_string()),
            request_id: r.request_id.to_string(),
            status: 403,
            outcome: "denied".into(),
        };
        let _ = self.tx.try_send(rec);
    }
}
