//! What the gateway routes by, composed from two sources: the spec file (re-read on reload) and
//! routes added over the admin API (persisted in the store, kept across restarts). Every change
//! builds a new model and hands it to the gateway, which swaps its route table without touching
//! open connections.

use std::collections::BTreeMap;
use std::path::PathBuf;
use std::sync::{Arc, Mutex, PoisonError};

use gantry_api::{ReloadReport, RouteControl, RouteControlError, RouteWritten};
use gantry_gateway::Gateway;
use gantry_registry::Registry;
use gantry_spec::{LoadedSpec, RouteSpec};
use gantry_store::{Store, StoreError, StoreJsonExt};
use gantry_supervisor::DesiredState;
use serde::{Deserialize, Serialize};

const BUCKET: &str = "routes";

/// A route added over the admin API.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ApiRoute {
    pub service: String,
    pub route: RouteSpec,
}

struct State {
    spec: Arc<LoadedSpec>,
    /// API routes with the store revision each was read or written at.
    api_routes: BTreeMap<String, (ApiRoute, u64)>,
}

pub struct Control {
    file: PathBuf,
    state: Mutex<State>,
    /// One route write at a time, from its checks to the live table: the duplicate check sees
    /// every earlier write, and the live table takes writes in the order the store did.
    writes: tokio::sync::Mutex<()>,
    store: Arc<dyn Store>,
    desired: DesiredState,
    gateway: Arc<Gateway>,
    registry: Arc<Registry>,
    identity: Arc<gantry_identity::Identity>,
    /// The bus, once built (after the gateway this is part of): reloads apply its topics and
    /// subscriptions.
    bus: std::sync::OnceLock<Arc<gantry_bus::Bus>>,
}

fn valid_route_name(n: &str) -> bool {
    !n.is_empty()
        && n.len() <= 63
        && n.bytes()
            .all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || c == b'-')
}

impl Control {
    /// The bus that reloads apply the spec's topics and subscriptions to.
    pub fn set_bus(&self, bus: Arc<gantry_bus::Bus>) {
        let _ = self.bus.set(bus);
    }

    /// Start from the loaded spec and the API routes the store kept.
    pub async fn load(
        spec: Arc<LoadedSpec>,
        store: Arc<dyn Store>,
        gateway: Arc<Gateway>,
        registry: Arc<Registry>,
        identity: Arc<gantry_identity::Identity>,
    ) -> anyhow::Result<Arc<Self>> {
        let rows: Vec<(String, ApiRoute, u64)> = store.list_json(BUCKET, ">").await?;
        let api_routes = rows.into_iter().map(|(k, r, rev)| (k, (r, rev))).collect();
        let c = Arc::new(Self {
            file: spec.file.clone(),
            state: Mutex::new(State { spec, api_routes }),
            writes: tokio::sync::Mutex::new(()),
            desired: DesiredState::new(store.clone()),
            store,
            gateway,
            registry,
            identity,
            bus: std::sync::OnceLock::new(),
        });
        {
            let st = c.lock();
            crate::components::register_static_endpoints(&st.spec, &c.registry);
            c.apply(&st);
        }
        Ok(c)
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, State> {
        self.state.lock().unwrap_or_else(PoisonError::into_inner)
    }

    /// The gateway model: spec routes, then API routes whose service still exists.
    fn model(st: &State) -> gantry_model::GatewayModel {
        let mut m = st.spec.spec.gateway_model(&st.spec.base_dir);
        for (name, (r, _)) in &st.api_routes {
            if !st.spec.spec.services.contains_key(&r.service) {
                tracing::warn!(route = %name, service = %r.service, "API route targets a service the spec no longer has; skipped");
                continue;
            }
            let mut route = r.route.to_model(&r.service, 0);
            route.id = format!("api/{name}");
            m.routes.push(route);
        }
        m
    }

    fn apply(&self, st: &State) -> gantry_model::GatewayModel {
        let m = Self::model(st);
        self.gateway.apply_model(m.clone());
        m
    }

    /// Whether `route` (for `service`) matches exactly what another route matches.
    fn duplicate_of(st: &State, name: &str, service: &str, route: &RouteSpec) -> Option<String> {
        let key = serde_json::to_string(&route.to_model(service, 0).matcher).ok()?;
        let m = Self::model(st);
        m.routes
            .iter()
            .filter(|r| r.id != format!("api/{name}"))
            .find(|r| serde_json::to_string(&r.matcher).ok().as_deref() == Some(key.as_str()))
            .map(|r| r.id.clone())
    }
}

#[async_trait::async_trait]
impl RouteControl for Control {
    async fn reload(&self) -> Result<ReloadReport, RouteControlError> {
        let file = self.file.clone();
        let new = tokio::task::spawn_blocking(move || gantry_spec::load(&file))
            .await
            .map_err(|e| RouteControlError::Internal(e.to_string()))?
            .map_err(|e| RouteControlError::Invalid(e.0.iter().map(|x| x.to_string()).collect()))?;
        // One reload (or route write) at a time, so that the desired state and the route table
        // always come from the same spec.
        let _write = self.writes.lock().await;
        // Services: the spec's part of the desired state; the supervisor starts, replaces and
        // stops instances to match, while every other service keeps serving.
        let services = self
            .desired
            .apply_spec(new.deployments())
            .await
            .map_err(|e| RouteControlError::Internal(e.to_string()))?;
        // Topics made or changed, subscriptions written (the spec's dropped ones removed).
        if let Some(bus) = self.bus.get() {
            bus.apply_spec(
                &crate::bus::topics_of(&new.spec),
                &crate::bus::subscriptions_of(&new.spec),
            )
            .await
            .map_err(|e| RouteControlError::Internal(format!("the bus: {e}")))?;
        }
        let mut st = self.lock();
        let old = st.spec.clone();
        let mut needs_restart: Vec<String> = Vec::new();
        let (og, ng) = (&old.spec.gateway, &new.spec.gateway);
        if og.listen != ng.listen
            || og.workers != ng.workers
            || og.tls != ng.tls
            || og.limits != ng.limits
            || og.access_log != ng.access_log
            || og.cache_max_bytes != ng.cache_max_bytes
            || old.spec.admin != new.spec.admin
            || old.spec.store != new.spec.store
            || old.spec.logs != new.spec.logs
        {
            needs_restart.push("[gateway], [admin], [store] or [logs] settings changed".into());
        }
        let before = Self::model(&st);
        // Static endpoints: drop the old ones, then declare the new ones.
        for (name, svc) in &old.spec.services {
            for i in 0..svc.endpoints.len() {
                self.registry
                    .deregister_static(&format!("{name}-s{}", i + 1));
            }
        }
        crate::components::register_static_endpoints(&new, &self.registry);
        // The service-to-service policy applies at once; the token service's own settings at
        // the next start.
        self.identity
            .set_calls(crate::identity::call_policy(&new.spec));
        self.identity
            .set_mtls(crate::identity::mtls_services(&new.spec));
        let (oi, ni) = (&old.spec.identity, &new.spec.identity);
        if oi.listen != ni.listen
            || oi.issuer != ni.issuer
            || oi.algorithm != ni.algorithm
            || oi.issuers != ni.issuers
            || oi.audience != ni.audience
            || oi.access_token_ttl_secs != ni.access_token_ttl_secs
            || oi.refresh_token_ttl_secs != ni.refresh_token_ttl_secs
            || oi.workload_token_ttl_secs != ni.workload_token_ttl_secs
            || oi.rotate_every_secs != ni.rotate_every_secs
            || oi.key_propagation_secs != ni.key_propagation_secs
            || oi.session_ttl_secs != ni.session_ttl_secs
            || oi.workload_cert_ttl_secs != ni.workload_cert_ttl_secs
            || oi.sessions_redis != ni.sessions_redis
            || oi.gateway_path != ni.gateway_path
        {
            needs_restart.push("[identity] settings other than service_policy changed".into());
        }
        if old.spec.bus.gateway_path != new.spec.bus.gateway_path {
            needs_restart.push(
                "bus.gateway_path changed: the gateway's route follows now; instances get the new GANTRY_BUS_URL after a restart of gantry".into(),
            );
        }
        st.spec = Arc::new(new);
        let after = self.apply(&st);
        tracing::info!(routes = after.routes.len(), "spec reloaded");
        Ok(ReloadReport {
            routes: after.routes.len(),
            gateway_changed: after != before,
            services,
            needs_restart,
        })
    }

    async fn put_route(
        &self,
        name: &str,
        body: serde_json::Value,
    ) -> Result<RouteWritten, RouteControlError> {
        if !valid_route_name(name) {
            return Err(RouteControlError::Invalid(vec![format!(
                "name: {name:?} must be 1-63 characters of a-z, 0-9 and '-'"
            )]));
        }
        let r: ApiRoute = serde_path_to_error::deserialize(body).map_err(|e| {
            RouteControlError::Invalid(vec![format!("{}: {}", e.path(), e.inner())])
        })?;
        let _write = self.writes.lock().await;
        let current = {
            let st = self.lock();
            let problems = gantry_spec::check_route(&st.spec.spec, &r.service, &r.route);
            if !problems.is_empty() {
                return Err(RouteControlError::Invalid(problems));
            }
            if let Some(other) = Self::duplicate_of(&st, name, &r.service, &r.route) {
                return Err(RouteControlError::Conflict(format!(
                    "route {name} would match exactly what route {other} matches"
                )));
            }
            st.api_routes.get(name).map(|(_, rev)| *rev)
        };
        // Compare-and-set against what this process last saw: a write by anyone else in
        // between is a conflict, not a silent overwrite.
        let written = match current {
            Some(rev) => self.store.update_json(BUCKET, name, &r, rev).await,
            None => self.store.create_json(BUCKET, name, &r).await,
        };
        let rev = written.map_err(|e| match e {
            StoreError::RevisionMismatch { .. } | StoreError::AlreadyExists { .. } => {
                RouteControlError::Conflict(format!(
                    "route {name} was changed elsewhere at the same time; read it and try again"
                ))
            }
            other => RouteControlError::Internal(other.to_string()),
        })?;
        let mut st = self.lock();
        st.api_routes.insert(name.to_string(), (r, rev));
        let m = self.apply(&st);
        Ok(RouteWritten {
            id: format!("api/{name}"),
            routes: m.routes.len(),
        })
    }

    async fn delete_route(&self, name: &str) -> Result<(), RouteControlError> {
        // `gantry route put` reports the route's id (`api/NAME`); either form names it.
        let name = name.strip_prefix("api/").unwrap_or(name);
        let _write = self.writes.lock().await;
        let Some(rev) = self.lock().api_routes.get(name).map(|(_, rev)| *rev) else {
            return Err(RouteControlError::NotFound(format!(
                "no API route named {name} (spec routes change with the spec file)"
            )));
        };
        self.store
            .delete_if(BUCKET, name, rev)
            .await
            .map_err(|e| match e {
                StoreError::RevisionMismatch { .. } => RouteControlError::Conflict(format!(
                    "route {name} was changed elsewhere at the same time; read it and try again"
                )),
                other => RouteControlError::Internal(other.to_string()),
            })?;
        let mut st = self.lock();
        st.api_routes.remove(name);
        self.apply(&st);
        Ok(())
    }
}
