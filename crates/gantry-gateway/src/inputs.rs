//! The request path's inputs, each built and replaced on its own:
//!
//! - **routes** (`Routes`): matchers, filters, regexes and the host index; rebuilt when routes
//!   or upstream policies change (rare);
//! - **endpoints** (`Endpoints`): per target (a service, optionally narrowed by version) the
//!   instances it may use, and per service all of them; a registry change rebuilds only the
//!   changed services' sets and shares the others with the last snapshot — nothing recompiles
//!   because an instance came or went;
//! - **traffic weights** (`TrafficWeights`, from releases): the share of a service's traffic
//!   each of its versions gets, compiled into the endpoints of that service's any-version
//!   targets;
//! - **authentication material** (`AuthMaterial`: trusted issuers' keys, revoked token ids, API
//!   keys, the service-to-service policy; filled by identity).
//!
//! The request path reads them through one `Snapshot` pointer (one atomic load a request, as
//! before the inputs were separate); the control side (`Control`) keeps what must outlive a
//! snapshot — instances' connection pools and outlier state, services' concurrency counts,
//! routes' retry budgets, rate limiters and breakers — and carries it by identity.
//!
//! Invariant: every `apply_*` swaps the new snapshot in before it returns, so when the
//! supervisor's deregister returns, no new request goes to that instance.

use std::collections::{BTreeMap, HashMap};
use std::net::SocketAddr;
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::Duration;

use gantry_model::{GatewayModel, Instance, RegistrySnapshot, RouteAction};
use serde::{Deserialize, Serialize};

use crate::endpoints::{BreakerScope, Endpoint, EndpointSet, ServiceState};
use crate::filters::{CompiledHeaderOps, Filter, Filters, LocationRewrite, Mirror, PathRewrite};
use crate::metrics::{GatewayMetrics, RouteMetrics};
use crate::ratelimit::Limiter;
use crate::resilience::RetryBudget;
use crate::table::{
    compile_regex, sort_by_precedence, Action, Backend, CompiledRoute, ForwardAction, Matcher,
    PathMatcher, RouteTable,
};

/// What one request reads: every input, as of one moment.
pub(crate) struct Snapshot {
    pub routes: Arc<Routes>,
    pub endpoints: Arc<Endpoints>,
    pub weights: Arc<TrafficWeights>,
    pub auth: Arc<AuthMaterial>,
}

/// The compiled routes, and the targets they send to.
pub(crate) struct Routes {
    pub table: RouteTable,
    /// What each target index stands for.
    pub targets: Vec<TargetKey>,
}

/// A service, optionally narrowed to the versions a requirement allows.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub(crate) struct TargetKey {
    pub service: Arc<str>,
    pub version: Option<String>,
}

/// The instances each target may use now.
pub(crate) struct Endpoints {
    /// By target index (`Routes::targets`); `None` for a service the model does not know
    /// (routes are compiled against the model, so none is expected).
    pub sets: Vec<Option<Arc<EndpointSet>>>,
    /// By target index: how release weights split an any-version target between versions
    /// (`None`: no weights for its service).
    pub splits: Vec<Option<Arc<Split>>>,
    /// Every routable instance of each service (for in-process callers and views). Persistent
    /// maps (clones share structure): a registry change copies the paths to the services it
    /// changed, not a map of every service.
    pub services: imbl::HashMap<Arc<str>, Arc<EndpointSet>>,
    /// The release weights' split of each service that has weights (in-process callers).
    pub service_splits: imbl::HashMap<Arc<str>, Arc<Split>>,
}

impl Endpoints {
    /// The instances target `i` may use now.
    pub(crate) fn set(&self, i: u32) -> Option<&EndpointSet> {
        self.sets.get(i as usize).and_then(Option::as_deref)
    }

    /// The release weights' split of target `i`, if its service has weights.
    pub(crate) fn split(&self, i: u32) -> Option<&Split> {
        self.splits.get(i as usize).and_then(Option::as_deref)
    }
}

/// A target's traffic split between versions, by weight.
pub(crate) struct Split {
    pub parts: Vec<(Arc<EndpointSet>, u32, Box<str>)>,
    pub total: u64,
}

/// The share of each service's traffic each of its versions gets (what a release controller
/// sets during a canary or blue/green switch). A route's target that names no version is split
/// by these; one that names a version is not.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct TrafficWeights {
    pub services: BTreeMap<String, Vec<VersionWeight>>,
}

#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct VersionWeight {
    /// A semver requirement (`1.4.2`, `^2`).
    pub version: String,
    pub weight: u32,
}

/// What the routes' authentication verifies credentials against: trusted issuers' keys,
/// revoked token ids, API keys, the service-to-service policy. Identity fills it; a change
/// swaps it without touching routes or endpoints. Empty: no token verifies, every service may
/// call every other.
pub type AuthMaterial = gantry_authn::Material;

/// One service's control-side state.
struct ServiceEntry {
    state: Arc<ServiceState>,
    /// Routable instances, sorted by id (local ones first in the sets built from them): the
    /// registry's lists are sorted by id too, so a rebuild is one merge of the two.
    endpoints: Vec<Arc<Endpoint>>,
}

impl ServiceEntry {
    fn endpoint(&self, id: &str) -> Option<&Arc<Endpoint>> {
        self.endpoints
            .binary_search_by(|e| (*e.id).cmp(id))
            .ok()
            .map(|i| &self.endpoints[i])
    }
}

/// The control side: the last model and registry snapshot, the state carried between
/// snapshots, and the current snapshot's parts.
pub(crate) struct Control {
    pub model: GatewayModel,
    registry: Arc<RegistrySnapshot>,
    services: HashMap<Arc<str>, ServiceEntry>,
    /// Instances out of routing with requests still in flight (kept for `inflight` and their
    /// pools until those end).
    draining: Vec<Arc<Endpoint>>,
    budgets: HashMap<String, (String, Arc<RetryBudget>)>,
    limiters: HashMap<String, (String, Arc<Limiter>)>,
    breakers: HashMap<(String, String), Arc<BreakerScope>>,
    route_metrics: HashMap<(String, String), RouteMetrics>,
    routes: Arc<Routes>,
    endpoints: Arc<Endpoints>,
    pub weights: Arc<TrafficWeights>,
    pub auth: Arc<AuthMaterial>,
    /// Target indices by service.
    targets_of: HashMap<Arc<str>, Vec<u32>>,
    /// This gateway's node: its instances are "local".
    node: String,
    /// Mutual TLS with the internal CA (for services whose upstream asks for it).
    internal_tls: Arc<crate::tls::InternalTls>,
}

impl Control {
    pub(crate) fn new(node: String, internal_tls: Arc<crate::tls::InternalTls>) -> Self {
        Self {
            internal_tls,
            model: GatewayModel::default(),
            registry: Arc::new(RegistrySnapshot::default()),
            services: HashMap::new(),
            draining: Vec::new(),
            budgets: HashMap::new(),
            limiters: HashMap::new(),
            breakers: HashMap::new(),
            route_metrics: HashMap::new(),
            routes: Arc::new(Routes {
                table: RouteTable::empty(),
                targets: Vec::new(),
            }),
            endpoints: Arc::new(Endpoints {
                sets: Vec::new(),
                splits: Vec::new(),
                services: imbl::HashMap::new(),
                service_splits: imbl::HashMap::new(),
            }),
            weights: Arc::default(),
            auth: Arc::default(),
            targets_of: HashMap::new(),
            node,
        }
    }

    /// The snapshot of the current inputs.
    pub(crate) fn snapshot(&self) -> Arc<Snapshot> {
        Arc::new(Snapshot {
            routes: self.routes.clone(),
            endpoints: self.endpoints.clone(),
            weights: self.weights.clone(),
            auth: self.auth.clone(),
        })
    }

    /// Every instance the gateway knows (routable or draining), with its service's state.
    pub(crate) fn all_endpoints(&self) -> Vec<(Arc<Endpoint>, Option<Arc<ServiceState>>)> {
        let mut out: Vec<_> = self
            .services
            .values()
            .flat_map(|s| {
                s.endpoints
                    .iter()
                    .map(|e| (e.clone(), Some(s.state.clone())))
            })
            .collect();
        out.extend(self.draining.iter().map(|e| (e.clone(), None)));
        out
    }

    pub(crate) fn endpoint(&self, id: &str) -> Option<&Arc<Endpoint>> {
        self.services
            .values()
            .find_map(|s| s.endpoint(id))
            .or_else(|| self.draining.iter().find(|e| &*e.id == id))
    }

    /// Every routable instance's endpoint.
    pub(crate) fn routable_endpoints(&self) -> impl Iterator<Item = &Arc<Endpoint>> {
        self.services.values().flat_map(|s| s.endpoints.iter())
    }

    pub(crate) fn service_states(&self) -> impl Iterator<Item = &Arc<ServiceState>> {
        self.services.values().map(|s| &s.state)
    }

    pub(crate) fn breakers(&self) -> impl Iterator<Item = &Arc<BreakerScope>> {
        self.breakers.values()
    }

    // -----------------------------------------------------------------------------------------
    // Inputs

    /// New routes and upstream policies: services whose policy changed get new state (and new
    /// instances' state: an endpoint holds what the policy set), routes are compiled, every
    /// target's set is rebuilt.
    pub(crate) fn apply_model(&mut self, model: GatewayModel, metrics: &GatewayMetrics) {
        self.model = model;
        let mut services: HashMap<Arc<str>, ServiceEntry> = HashMap::new();
        let mut old = std::mem::take(&mut self.services);
        let mut retired = Vec::new();
        for (name, policy) in &self.model.upstreams {
            let entry = match old.remove(name.as_str()) {
                Some(e) if e.state.policy == *policy => e,
                previous => {
                    if let Some(p) = previous {
                        retired.extend(p.endpoints);
                    }
                    ServiceEntry {
                        state: Arc::new(ServiceState::new(
                            name,
                            policy.clone(),
                            metrics.service(name),
                            &self.internal_tls,
                        )),
                        endpoints: Vec::new(),
                    }
                }
            };
            services.insert(name.as_str().into(), entry);
        }
        // Services no longer in the model: their instances are gone for good.
        for (_, e) in old {
            for ep in e.endpoints {
                ep.retired.store(true, Ordering::Relaxed);
                retired.push(ep);
            }
        }
        self.services = services;
        self.retire(retired.into_iter(), metrics);
        let registry = self.registry.clone();
        let names: Vec<Arc<str>> = self.services.keys().cloned().collect();
        for name in names {
            self.rebuild_service(&name, registry.instances(&name), metrics);
        }
        self.compile_routes(metrics);
        self.build_all_targets();
    }

    /// A new registry snapshot: only the services it changed are rebuilt (the others' sets are
    /// shared with the last snapshot).
    pub(crate) fn apply_registry(
        &mut self,
        snap: &Arc<RegistrySnapshot>,
        metrics: &GatewayMetrics,
    ) {
        let prev = std::mem::replace(&mut self.registry, snap.clone());
        let changed: Vec<Arc<str>> = if snap.since == prev.revision && snap.revision > 0 {
            snap.changed.clone()
        } else {
            // Not the next one (a listener registered late, a test): tell by the lists.
            let mut c: Vec<Arc<str>> = snap
                .services
                .iter()
                .filter(|(k, v)| prev.services.get(*k).is_none_or(|p| !Arc::ptr_eq(p, v)))
                .map(|(k, _)| k.clone())
                .collect();
            c.extend(
                prev.services
                    .keys()
                    .filter(|k| !snap.services.contains_key(*k))
                    .cloned(),
            );
            c
        };
        let mut rebuilt = Vec::new();
        for name in changed {
            if self.services.contains_key(&name) {
                self.rebuild_service(&name, snap.instances(&name), metrics);
                rebuilt.push(name);
            }
        }
        self.sweep_draining(metrics);
        if !rebuilt.is_empty() {
            self.build_targets_of(&rebuilt);
        }
    }

    /// New traffic weights: the services whose weights changed get their splits rebuilt.
    pub(crate) fn apply_weights(&mut self, weights: TrafficWeights) {
        let changed: Vec<Arc<str>> = self
            .services
            .keys()
            .filter(|s| weights.services.get(&***s) != self.weights.services.get(&***s))
            .cloned()
            .collect();
        self.weights = Arc::new(weights);
        if !changed.is_empty() {
            self.build_targets_of(&changed);
        }
    }

    // -----------------------------------------------------------------------------------------
    // Instances

    /// Rebuild one service's routable instances from the registry: an instance keeps its state
    /// (pool, outlier, EWMA) while its address, version and kind stay the same.
    fn rebuild_service(
        &mut self,
        name: &Arc<str>,
        instances: &[Arc<Instance>],
        metrics: &GatewayMetrics,
    ) {
        let node = self.node.clone();
        let Some(entry) = self.services.get_mut(name) else {
            return;
        };
        let old = std::mem::take(&mut entry.endpoints);
        // Both lists sorted by id (a caller's unsorted list is sorted here): one merge pairs
        // each instance with the endpoint it had.
        let mut sorted;
        let mut instances = instances;
        if !instances.is_sorted_by(|a, b| a.id < b.id) {
            sorted = instances.to_vec();
            sorted.sort_by(|a, b| a.id.cmp(&b.id));
            sorted.dedup_by(|a, b| a.id == b.id);
            instances = &sorted;
        }
        let mut live = Vec::with_capacity(instances.len());
        let mut gone = Vec::new();
        let mut old = old.into_iter().peekable();
        for inst in instances {
            while let Some(e) = old.next_if(|e| *e.id < *inst.id) {
                gone.push(e);
            }
            let previous = old.next_if(|e| *e.id == *inst.id);
            if inst.health == gantry_model::Health::Critical {
                gone.extend(previous);
                continue;
            }
            let addr = SocketAddr::new(inst.address, inst.port);
            let external = !matches!(inst.source, gantry_model::InstanceSource::Supervised);
            let ep = match previous {
                Some(e)
                    if e.addr == addr && e.version == inst.version && e.external == external =>
                {
                    e
                }
                other => {
                    // Same id, another address or version: a new endpoint.
                    gone.extend(other);
                    match Endpoint::new(
                        &inst.id,
                        name,
                        addr,
                        inst.version.clone(),
                        inst.node == node,
                        external,
                        &entry.state.policy,
                        metrics.instance(name, &inst.id, &inst.version),
                    ) {
                        Some(e) => Arc::new(e),
                        None => continue,
                    }
                }
            };
            live.push(ep);
        }
        gone.extend(old);
        let st = &entry.state;
        st.instances.store(live.len(), Ordering::Relaxed);
        st.ejected.store(
            live.iter()
                .filter(|e| e.ejected_until_ms.load(Ordering::Relaxed) > 0)
                .count(),
            Ordering::Relaxed,
        );
        entry.endpoints = live;
        // Gone from the registry (or back at another address or version): marked before the
        // snapshot without them is published, so that no attempt of a request admitted earlier
        // (a retry, a mirror copy) picks them either.
        for ep in &gone {
            ep.retired.store(true, Ordering::Relaxed);
        }
        self.retire(gone.into_iter(), metrics);
    }

    /// Instances out of routing: kept while requests to them are in flight, else closed and
    /// their metric series removed (unless the same id lives on in another endpoint).
    fn retire(&mut self, gone: impl Iterator<Item = Arc<Endpoint>>, metrics: &GatewayMetrics) {
        for ep in gone {
            if ep.inflight.load(Ordering::Relaxed) > 0 {
                self.draining.push(ep);
            } else {
                self.close(&ep, metrics);
            }
        }
    }

    fn close(&self, ep: &Endpoint, metrics: &GatewayMetrics) {
        ep.pool.clear();
        let still_routed = self
            .services
            .get(&*ep.service)
            .is_some_and(|s| s.endpoint(&ep.id).is_some());
        if !still_routed {
            metrics.remove_instance(&ep.service, &ep.id, crate::endpoints::clock_ms());
        } else {
            ep.metrics.ejected.set(0);
        }
    }

    /// Close the draining instances whose last request ended (each registry change, and every
    /// second from the background task: a quiet registry must not keep them).
    pub(crate) fn sweep_draining(&mut self, metrics: &GatewayMetrics) {
        let draining = std::mem::take(&mut self.draining);
        for ep in draining {
            if ep.inflight.load(Ordering::Relaxed) > 0 {
                self.draining.push(ep);
            } else {
                self.close(&ep, metrics);
            }
        }
    }

    // -----------------------------------------------------------------------------------------
    // Targets

    /// The set for one target, from its service's routable instances.
    fn target_set(&self, key: &TargetKey) -> Option<Arc<EndpointSet>> {
        let entry = self.services.get(&key.service)?;
        let req = key
            .version
            .as_deref()
            .and_then(|v| semver::VersionReq::parse(v).ok());
        Some(Arc::new(narrowed(entry, req.as_ref())))
    }

    /// The release weights' split of an any-version target.
    fn target_split(&self, key: &TargetKey) -> Option<Arc<Split>> {
        if key.version.is_some() {
            return None;
        }
        let weights = self.weights.services.get(&*key.service)?;
        let entry = self.services.get(&key.service)?;
        let parts: Vec<(Arc<EndpointSet>, u32, Box<str>)> = weights
            .iter()
            .filter_map(|w| {
                let req = semver::VersionReq::parse(&w.version).ok()?;
                Some((
                    Arc::new(narrowed(entry, Some(&req))),
                    w.weight,
                    format!("{}@{}", key.service, w.version).into_boxed_str(),
                ))
            })
            .collect();
        let total = parts.iter().map(|(_, w, _)| u64::from(*w)).sum();
        (total > 0).then(|| Arc::new(Split { parts, total }))
    }

    fn build_all_targets(&mut self) {
        let targets = &self.routes.targets;
        let sets = targets.iter().map(|k| self.target_set(k)).collect();
        let splits = targets.iter().map(|k| self.target_split(k)).collect();
        let services = self
            .services
            .iter()
            .map(|(k, e)| (k.clone(), Arc::new(narrowed(e, None))))
            .collect();
        let service_splits = self
            .services
            .keys()
            .filter_map(|k| Some((k.clone(), self.service_split(k)?)))
            .collect();
        self.endpoints = Arc::new(Endpoints {
            sets,
            splits,
            services,
            service_splits,
        });
    }

    /// Rebuild the targets of `changed` services; every other set is shared.
    fn build_targets_of(&mut self, changed: &[Arc<str>]) {
        let mut sets = self.endpoints.sets.clone();
        let mut splits = self.endpoints.splits.clone();
        let mut services = self.endpoints.services.clone();
        let mut service_splits = self.endpoints.service_splits.clone();
        for name in changed {
            match self.service_split(name) {
                Some(s) => service_splits.insert(name.clone(), s),
                None => service_splits.remove(name),
            };
            if let Some(idx) = self.targets_of.get(name) {
                for &i in idx {
                    let key = &self.routes.targets[i as usize];
                    sets[i as usize] = self.target_set(key);
                    splits[i as usize] = self.target_split(key);
                }
            }
            match self.services.get(name) {
                Some(e) => services.insert(name.clone(), Arc::new(narrowed(e, None))),
                None => services.remove(name),
            };
        }
        self.endpoints = Arc::new(Endpoints {
            sets,
            splits,
            services,
            service_splits,
        });
    }

    fn service_split(&self, service: &Arc<str>) -> Option<Arc<Split>> {
        self.target_split(&TargetKey {
            service: service.clone(),
            version: None,
        })
    }

    // -----------------------------------------------------------------------------------------
    // Routes

    fn compile_routes(&mut self, metrics: &GatewayMetrics) {
        let mut targets: Vec<TargetKey> = Vec::new();
        let mut target_ids: HashMap<TargetKey, u32> = HashMap::new();
        let mut target = |service: &str, version: Option<&str>| -> u32 {
            let key = TargetKey {
                service: service.into(),
                version: version.map(str::to_string),
            };
            *target_ids.entry(key.clone()).or_insert_with(|| {
                targets.push(key);
                (targets.len() - 1) as u32
            })
        };
        let mut routes = Vec::with_capacity(self.model.routes.len());
        let mut budgets = HashMap::new();
        let mut limiters = HashMap::new();
        let mut breakers = HashMap::new();
        let mut route_metrics = HashMap::new();
        for (order, r) in self.model.routes.iter().enumerate() {
            let Some(matcher) = Matcher::compile(&r.matcher) else {
                tracing::error!(route = %r.id, "route has an invalid matcher; skipped");
                continue;
            };
            let key = (r.id.clone(), r.service.clone());
            let rm = match self.route_metrics.get(&key) {
                Some(m) => m.clone(),
                None => metrics.route(&r.id, &r.service),
            };
            route_metrics.insert(key, rm.clone());
            let action = match &r.action {
                RouteAction::Redirect(red) => Action::Redirect(red.clone()),
                RouteAction::Forward(f) => {
                    let Some(first) = f.backends.first() else {
                        continue;
                    };
                    if !self.services.contains_key(first.service.as_str()) {
                        tracing::error!(route = %r.id, service = %first.service, "route targets an unknown service; skipped");
                        continue;
                    }
                    let mut backends = Vec::with_capacity(f.backends.len());
                    for b in &f.backends {
                        let Some(svc) = self.services.get(b.service.as_str()) else {
                            continue;
                        };
                        let bkey = (r.id.clone(), b.service.clone());
                        let policy = &svc.state.policy.circuit_breaker;
                        let breaker = match self.breakers.get(&bkey) {
                            Some(s) if s.policy == *policy => s.clone(),
                            _ => Arc::new(BreakerScope::new(
                                &r.id,
                                &b.service,
                                policy.clone(),
                                metrics.circuit(&r.id, &b.service),
                            )),
                        };
                        breakers.insert(bkey, breaker.clone());
                        backends.push(Backend {
                            target: target(&b.service, b.version.as_deref()),
                            weight: b.weight,
                            label: format!("{}@{}", b.service, b.version.as_deref().unwrap_or("*"))
                                .into_boxed_str(),
                            breaker,
                        });
                    }
                    let all_versions = target(&first.service, None);
                    let budget_key =
                        format!("{}/{}", f.retry.budget_ratio, f.retry.budget_min_per_second);
                    let budget = match self.budgets.get(&r.id) {
                        Some((k, b)) if *k == budget_key => b.clone(),
                        _ => Arc::new(RetryBudget::new(
                            f.retry.budget_ratio,
                            f.retry.budget_min_per_second,
                        )),
                    };
                    budgets.insert(r.id.clone(), (budget_key, budget.clone()));
                    let mut list = vec![Filter::Auth(Box::new(crate::auth::RouteAuthFilter {
                        req: requirement(&f.auth),
                        public: f.auth.public,
                        service: Arc::from(r.service.as_str()),
                        pass_credentials: f.auth.pass_credentials,
                    }))];
                    if let Some(rl) = &f.rate_limit {
                        let key = format!("{}/{}", rl.requests_per_second, rl.burst);
                        let l = match self.limiters.get(&r.id) {
                            Some((k, l)) if *k == key => l.clone(),
                            _ => Arc::new(Limiter::new(rl)),
                        };
                        limiters.insert(r.id.clone(), (key, l.clone()));
                        list.push(Filter::RateLimit {
                            limiter: l,
                            key: rl.key.clone(),
                        });
                    }
                    list.push(Filter::BodyLimit(f.max_body_bytes));
                    if let Some(h) = &f.version_header {
                        if let Ok(name) = http::HeaderName::from_bytes(h.as_bytes()) {
                            list.push(Filter::VersionHeader(name));
                        }
                    }
                    if f.version_from_path {
                        list.push(Filter::VersionPath);
                    }
                    if let Some(c) = &f.cache {
                        list.push(Filter::Cache(c.clone()));
                    }
                    let rewrite = if f.rewrite.strip_prefix {
                        PathRewrite::Strip
                    } else if let Some(p) = &f.rewrite.replace_prefix {
                        PathRewrite::Replace(p.clone())
                    } else if let Some((pat, rep)) = &f.rewrite.regex {
                        match compile_regex(pat) {
                            Some(re) => PathRewrite::Regex(re, rep.clone()),
                            None => PathRewrite::None,
                        }
                    } else {
                        PathRewrite::None
                    };
                    if let (Some(up), PathMatcher::Prefix(public), true) = (
                        rewrite.upstream_prefix(),
                        &matcher.path,
                        f.rewrite.redirects,
                    ) {
                        if public != "/" {
                            list.push(Filter::RedirectRewrite(LocationRewrite {
                                public: public.clone(),
                                upstream: up.to_string(),
                            }));
                        }
                    }
                    if !matches!(rewrite, PathRewrite::None) {
                        list.push(Filter::Rewrite(rewrite));
                    }
                    if !f.request_headers.is_empty() {
                        list.push(Filter::RequestHeaders(CompiledHeaderOps::compile(
                            &f.request_headers,
                        )));
                    }
                    if let Some(m) = &f.mirror {
                        if self.services.contains_key(m.service.as_str()) {
                            list.push(Filter::Mirror(Mirror {
                                target: target(&m.service, m.version.as_deref()),
                                percent: m.percent,
                                metrics: metrics.mirror(&r.id, &r.service),
                            }));
                        }
                    }
                    if !f.response_headers.is_empty() {
                        list.push(Filter::ResponseHeaders(CompiledHeaderOps::compile(
                            &f.response_headers,
                        )));
                    }
                    Action::Forward(Box::new(ForwardAction {
                        total_weight: backends.iter().map(|b| u64::from(b.weight)).sum(),
                        backends,
                        all_versions,
                        filters: Filters::new(list),
                        request_timeout: Duration::from_millis(f.timeouts.request_ms),
                        per_try_timeout: f.timeouts.per_try_ms.map(Duration::from_millis),
                        idle_timeout: Duration::from_millis(f.timeouts.idle_ms),
                        retry: f.retry.clone(),
                        budget,
                        max_body_bytes: f.max_body_bytes,
                        failure_statuses: f.failure_statuses.clone(),
                    }))
                }
            };
            routes.push(CompiledRoute {
                id: r.id.as_str().into(),
                service: r.service.as_str().into(),
                matcher,
                action,
                metrics: rm,
                order,
            });
        }
        sort_by_precedence(&mut routes);
        // Series of routes that are gone.
        for (k, _) in self.route_metrics.iter() {
            if !route_metrics.contains_key(k) {
                metrics.remove_route(&k.0, &k.1);
            }
        }
        for k in self.breakers.keys() {
            if !breakers.contains_key(k) {
                metrics.remove_circuit(&k.0, &k.1);
            }
        }
        self.budgets = budgets;
        self.limiters = limiters;
        self.breakers = breakers;
        self.route_metrics = route_metrics;
        let mut targets_of: HashMap<Arc<str>, Vec<u32>> = HashMap::new();
        for (i, t) in targets.iter().enumerate() {
            targets_of
                .entry(t.service.clone())
                .or_default()
                .push(i as u32);
        }
        self.targets_of = targets_of;
        self.routes = Arc::new(Routes {
            table: RouteTable::new(routes),
            targets,
        });
    }
}

/// A service's routable instances, narrowed to a version requirement.
fn narrowed(entry: &ServiceEntry, req: Option<&semver::VersionReq>) -> EndpointSet {
    let eps = entry
        .endpoints
        .iter()
        .filter(|e| req.is_none_or(|r| r.matches(&e.version)))
        .cloned()
        .collect();
    EndpointSet::new(entry.state.clone(), eps)
}

/// A route's authentication, as the verifier takes it.
fn requirement(a: &gantry_model::RouteAuth) -> gantry_authn::Requirement {
    gantry_authn::Requirement {
        mode: match a.mode {
            gantry_model::AuthMode::None => gantry_authn::Mode::None,
            gantry_model::AuthMode::Optional => gantry_authn::Mode::Optional,
            gantry_model::AuthMode::Required => gantry_authn::Mode::Required,
        },
        issuers: a.issuers.clone(),
        audiences: a.audiences.clone(),
        scopes: a.scopes.clone(),
        roles: a.roles.clone(),
        claims: a
            .claims
            .iter()
            .map(|(k, v)| (k.clone(), v.clone()))
            .collect(),
    }
}
