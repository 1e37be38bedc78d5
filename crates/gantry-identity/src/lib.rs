//! Identity: who is calling, proven — for users, services and operators.
//!
//! - **Token service** (`oauth.rs`): an OAuth 2.0 authorization server and OpenID provider on a
//!   listener of its own: token endpoint (client credentials, password, refresh token with
//!   rotation and reuse detection, authorization code with PKCE), revocation (RFC 7009),
//!   introspection (RFC 7662), JWKS, discovery, a minimal login page.
//! - **Keys** (`keys.rs`): signing keys rotated on a schedule and on demand, each published
//!   before it signs and kept until its tokens expire.
//! - **Directory** (`directory.rs`): clients, users, roles, API keys; secrets stored as digests.
//! - **Material**: what verifiers trust (`gantry_authn::Material`: issuers' keys, revoked ids,
//!   API keys, the service-to-service policy), rebuilt on every change of the buckets it comes
//!   from and published on a watch channel the gateway follows.
//! - **Workload identity** (`workload.rs`): an `InstanceHook` giving every supervised instance a
//!   short-lived token naming its service, version and instance, renewed at half-life.
//!
//! Every piece of state is in the store (both backends): this process keeps caches that follow
//! the buckets with watches, so a second gantry on the same NATS store sees the same keys.

pub mod ca;
pub mod directory;
pub mod external;
pub mod keys;
mod limiter;
pub mod oauth;
pub mod sessions;
mod sessions_redis;
mod tokens;
pub mod workload;

use std::collections::{BTreeMap, HashMap};
use std::sync::{Arc, Mutex, PoisonError};
use std::time::Duration;

use gantry_authn::{CallPolicy, Identity as Verified, Issuer, KeySet, Kind, Material};
use gantry_store::{
    BucketOptions, Op, Store, StoreError, StoreJsonExt as _, WatchEvent, WatchFrom,
};
use gantry_telemetry::Metrics;
use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use serde::{Deserialize, Serialize};
use tokio::sync::watch;

pub use directory::{ApiKey, Client, ClientKind, Role, User};
pub use keys::{Alg, StoredKey};
pub use tokens::{TokenResponse, WorkloadToken};

pub const KEYS: &str = "identity-keys";
pub const REVOKED: &str = "identity-revoked";
pub const REFRESH: &str = "identity-refresh";
pub const FAMILIES: &str = "identity-families";
pub const CODES: &str = "identity-codes";
/// The built-in client `gantry login` uses.
pub const CLI_CLIENT: &str = "gantry-cli";

/// Random bytes as base64url (`n` bytes of entropy).
pub fn random_token(n: usize) -> String {
    use ring::rand::SecureRandom as _;
    let mut b = vec![0u8; n];
    // The system's random source failing is not recoverable; ring reports it only on
    // platforms without one.
    if ring::rand::SystemRandom::new().fill(&mut b).is_err() {
        panic!("the system random number generator failed");
    }
    gantry_authn::b64url(&b)
}

type MaterialListener = Box<dyn Fn(&Arc<Material>) + Send + Sync>;

/// Hex of a digest (store keys and stored digests).
pub fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

/// How identity runs (from `[identity]` in the spec).
#[derive(Debug, Clone)]
pub struct IdentityConfig {
    /// The `iss` of our tokens and the base URL of the token service.
    pub issuer: String,
    pub algorithm: Alg,
    pub access_ttl: u64,
    pub refresh_ttl: u64,
    pub workload_ttl: u64,
    /// 0: on demand only.
    pub rotate_every: u64,
    pub propagation: u64,
    /// Lifetime of a browser session (absolute).
    pub session_ttl: u64,
    /// Where browser sessions live when several gantrys share them without sharing a store
    /// (`redis://HOST:PORT/DB`); `None`: the store.
    pub sessions_redis: Option<String>,
    /// Lifetime of instances' certificates (renewed at half-life).
    pub cert_ttl: u64,
    /// Services whose instances get certificates (`mtls = true`).
    pub mtls: std::collections::BTreeSet<String>,
    /// What private keys are sealed with in the store.
    pub keyring: Arc<gantry_secrets::Keyring>,
    pub audience: String,
    pub calls: CallPolicy,
    pub external: Vec<external::ExternalIssuer>,
}

impl IdentityConfig {
    /// The longest lifetime of anything our keys sign.
    pub fn longest_ttl(&self) -> u64 {
        self.access_ttl.max(self.workload_ttl)
    }
}

#[derive(Debug, thiserror::Error)]
pub enum IdentityError {
    #[error("{0}")]
    Invalid(String),
    #[error("{0} not found")]
    NotFound(String),
    #[error("{0} already exists")]
    Exists(String),
    #[error(transparent)]
    Store(#[from] StoreError),
    #[error("{0}")]
    Internal(String),
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct GrantLabels {
    grant: &'static str,
    result: &'static str,
}

#[derive(Clone)]
struct IdentityMetrics {
    tokens: Family<GrantLabels, Counter>,
    rotations: Counter,
    keys: Gauge,
    revoked: Gauge,
    refresh_reuse: Counter,
    jwks_fetches: Family<GrantLabels, Counter>,
}

/// What the caches hold (each follows its bucket).
#[derive(Default)]
struct State {
    keys: BTreeMap<String, StoredKey>,
    revoked: HashMap<String, u64>,
    api_keys: HashMap<[u8; 32], Arc<Verified>>,
    external: HashMap<String, (String, KeySet)>,
    /// Custom roles (the built-in ones are not stored).
    roles: BTreeMap<String, Role>,
    sessions: Arc<gantry_authn::Sessions>,
    calls: CallPolicy,
    revision: u64,
    /// The key sets the revision was last bumped for (issuer, sorted kids).
    fingerprint: Vec<(String, Vec<String>)>,
}

/// The identity component.
pub struct Identity {
    store: Arc<dyn Store>,
    cfg: Mutex<IdentityConfig>,
    issuer: String,
    state: Mutex<State>,
    material: watch::Sender<Arc<Material>>,
    /// Called with every new material before `publish` returns (the gateway's swap): a
    /// session or key made by a call is in force when the call answers.
    listeners: Mutex<Vec<MaterialListener>>,
    /// Publishes one at a time, so listeners get the materials in the order they were made.
    publishing: Mutex<()>,
    metrics: IdentityMetrics,
    limiter: limiter::Limits,
    /// Serializes rotations made by this process.
    rotating: tokio::sync::Mutex<()>,
    /// Where unknown external keys are reported (`external.rs`).
    refetch: Mutex<Option<tokio::sync::mpsc::Sender<String>>>,
    /// The internal CA.
    ca: ca::Ca,
    /// Sessions in Redis, when configured.
    redis: Option<Arc<sessions_redis::RedisSessions>>,
    /// Seals private keys before they are stored.
    sealer: Arc<gantry_secrets::Keyring>,
}

impl std::fmt::Debug for Identity {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Identity")
            .field("issuer", &self.issuer)
            .finish()
    }
}

impl Identity {
    /// Make the buckets, load what they hold, and make the first signing key if there is none.
    pub async fn open(
        store: Arc<dyn Store>,
        cfg: IdentityConfig,
        metrics: &Metrics,
    ) -> Result<Arc<Self>, IdentityError> {
        let day = Duration::from_secs(86_400);
        let longest = Duration::from_secs(cfg.longest_ttl() + 120);
        for (bucket, max_age) in [
            (KEYS, None),
            (ca::CA_BUCKET, None),
            (directory::CLIENTS, None),
            (directory::USERS, None),
            (directory::ROLES, None),
            (directory::API_KEYS, None),
            (REVOKED, Some(longest.max(Duration::from_secs(600)))),
            (REFRESH, Some(Duration::from_secs(cfg.refresh_ttl + 60))),
            (
                FAMILIES,
                Some(Duration::from_secs(cfg.refresh_ttl + 60).max(day)),
            ),
            (CODES, Some(Duration::from_secs(600))),
            (
                sessions::SESSIONS,
                Some(Duration::from_secs(cfg.session_ttl + 60)),
            ),
        ] {
            store
                .ensure_bucket(
                    bucket,
                    BucketOptions {
                        history: 1,
                        max_age,
                    },
                )
                .await?;
        }
        let m = metrics.register("identity", |r| {
            let m = IdentityMetrics {
                tokens: Family::default(),
                rotations: Counter::default(),
                keys: Gauge::default(),
                revoked: Gauge::default(),
                refresh_reuse: Counter::default(),
                jwks_fetches: Family::default(),
            };
            r.register(
                "tokens",
                "Token endpoint requests by grant and result",
                m.tokens.clone(),
            );
            r.register(
                "key_rotations",
                "Signing key rotations",
                m.rotations.clone(),
            );
            r.register(
                "published_keys",
                "Signing keys published in the JWKS",
                m.keys.clone(),
            );
            r.register(
                "revoked_tokens",
                "Revoked access tokens not yet expired",
                m.revoked.clone(),
            );
            r.register(
                "refresh_token_reuse",
                "Refresh tokens presented a second time (their family was revoked)",
                m.refresh_reuse.clone(),
            );
            r.register(
                "jwks_fetches",
                "Fetches of external issuers' key sets by issuer and result",
                m.jwks_fetches.clone(),
            );
            m
        });
        let issuer = cfg.issuer.clone();
        let calls = cfg.calls.clone();
        // The CA: the stored one, else a new one (created only if no other gantry made one
        // meanwhile).
        let sealer = cfg.keyring.clone();
        let stored = match store
            .get_json::<ca::StoredCa>(ca::CA_BUCKET, ca::CA_KEY)
            .await?
        {
            Some((mut c, rev)) => {
                // Sealed under a previous secrets key (a rotation): reseal under the current one.
                match sealer.reseal(ca::CA_AAD, &c.key_pem) {
                    Ok(Some(resealed)) if gantry_secrets::Keyring::is_sealed(&c.key_pem) => {
                        c.key_pem = resealed;
                        match store.update_json(ca::CA_BUCKET, ca::CA_KEY, &c, rev).await {
                            Ok(_) => tracing::info!(
                                "identity: internal CA key resealed under the current secrets key"
                            ),
                            Err(e) => {
                                tracing::warn!(error = %e, "identity: could not reseal the internal CA key (another gantry may have)")
                            }
                        }
                    }
                    _ => {}
                }
                c
            }
            None => {
                let fresh = ca::Ca::generate(gantry_authn::now_secs(), &sealer)
                    .map_err(|e| IdentityError::Internal(format!("internal CA: {e}")))?;
                match store.create_json(ca::CA_BUCKET, ca::CA_KEY, &fresh).await {
                    Ok(_) => fresh,
                    Err(StoreError::AlreadyExists { .. }) => store
                        .get_json::<ca::StoredCa>(ca::CA_BUCKET, ca::CA_KEY)
                        .await?
                        .map(|(c, _)| c)
                        .ok_or_else(|| IdentityError::Internal("internal CA vanished".into()))?,
                    Err(e) => return Err(e.into()),
                }
            }
        };
        let redis = match &cfg.sessions_redis {
            Some(url) => Some(Arc::new(sessions_redis::RedisSessions::connect(url).await?)),
            None => None,
        };
        let ca = ca::Ca::load(&stored, &sealer)
            .map_err(|e| IdentityError::Internal(format!("internal CA: {e}")))?;
        let (tx, _) = watch::channel(Arc::new(Material::default()));
        let id = Arc::new(Identity {
            store,
            cfg: Mutex::new(cfg),
            issuer,
            state: Mutex::new(State {
                calls,
                ..State::default()
            }),
            material: tx,
            listeners: Mutex::new(Vec::new()),
            publishing: Mutex::new(()),
            metrics: m,
            limiter: limiter::Limits::default(),
            rotating: tokio::sync::Mutex::new(()),
            refetch: Mutex::new(None),
            ca,
            redis,
            sealer,
        });
        id.load().await?;
        id.ensure_cli_client().await?;
        if id.signing_key().is_none() {
            id.rotate_now(0).await?;
        }
        id.publish();
        Ok(id)
    }

    /// The CLI's client (`gantry login`): public, password and refresh grants.
    async fn ensure_cli_client(&self) -> Result<(), IdentityError> {
        let c = Client {
            id: CLI_CLIENT.into(),
            kind: ClientKind::Public,
            grant_types: vec!["password".into(), "refresh_token".into()],
            redirect_uris: Vec::new(),
            scopes: Vec::new(),
            roles: Vec::new(),
            audiences: Vec::new(),
            secret_sha256: None,
            created_ms: gantry_model::unix_ms(),
        };
        match self
            .store
            .create_json(directory::CLIENTS, CLI_CLIENT, &c)
            .await
        {
            Ok(_) | Err(StoreError::AlreadyExists { .. }) => Ok(()),
            Err(e) => Err(e.into()),
        }
    }

    pub fn issuer(&self) -> &str {
        &self.issuer
    }

    pub fn config(&self) -> IdentityConfig {
        self.cfg
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .clone()
    }

    fn state(&self) -> std::sync::MutexGuard<'_, State> {
        self.state.lock().unwrap_or_else(PoisonError::into_inner)
    }

    /// Follow the material: the current value, then every change.
    pub fn material(&self) -> watch::Receiver<Arc<Material>> {
        self.material.subscribe()
    }

    /// Call `f` with the material now and with every new one, synchronously, before the change
    /// that made it returns. `f` must be quick and must not call back into identity.
    pub fn on_material(&self, f: impl Fn(&Arc<Material>) + Send + Sync + 'static) {
        let _one = self
            .publishing
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        f(&self.material.borrow());
        self.listeners
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .push(Box::new(f));
    }

    /// The material as of now.
    pub fn current_material(&self) -> Arc<Material> {
        self.material.borrow().clone()
    }

    async fn load(&self) -> Result<(), IdentityError> {
        let mut keys: Vec<(String, StoredKey, u64)> = self.store.list_json(KEYS, ">").await?;
        // Sealed under a previous secrets key (a rotation): reseal under the current one, so
        // that the previous key can be removed after this start.
        for (kid, k, rev) in &mut keys {
            if !gantry_secrets::Keyring::is_sealed(&k.private_der) {
                continue;
            }
            let aad = format!("{KEYS}/{kid}");
            if let Ok(Some(resealed)) = self.sealer.reseal(&aad, &k.private_der) {
                let mut updated = k.clone();
                updated.private_der = resealed;
                match self.store.update_json(KEYS, kid, &updated, *rev).await {
                    Ok(r) => {
                        *k = updated;
                        *rev = r;
                        tracing::info!(kid = %kid, "identity: signing key resealed under the current secrets key");
                    }
                    Err(e) => {
                        tracing::warn!(kid = %kid, error = %e, "identity: could not reseal a signing key (another gantry may have)")
                    }
                }
            }
        }
        let revoked: Vec<(String, u64, u64)> = self.store.list_json(REVOKED, ">").await?;
        let api: Vec<(String, ApiKey, u64)> =
            self.store.list_json(directory::API_KEYS, ">").await?;
        let roles: Vec<(String, Role, u64)> = self.store.list_json(directory::ROLES, ">").await?;
        let mut s = self.state();
        s.keys = keys.into_iter().map(|(k, v, _)| (k, v)).collect();
        s.revoked = revoked.into_iter().map(|(k, v, _)| (k, v)).collect();
        s.api_keys = api
            .iter()
            .filter_map(|(_, a, _)| self.api_entry(a))
            .collect();
        s.roles = roles.into_iter().map(|(k, v, _)| (k, v)).collect();
        Ok(())
    }

    /// Rebuild the material from the caches and publish it.
    fn publish(&self) {
        let _one = self
            .publishing
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        let cfg = self.config();
        let now = gantry_authn::now_secs();
        let mut s = self.state();
        let mut own = KeySet::default();
        let published: Vec<&StoredKey> = s
            .keys
            .values()
            .filter(|k| k.published_at(now, cfg.longest_ttl()))
            .collect();
        for k in &published {
            if let Ok(jwk) = serde_json::from_value(k.public.clone()) {
                if let Ok(key) = gantry_authn::Key::from_jwk(&jwk) {
                    own.insert(k.kid.clone(), key);
                }
            }
        }
        self.metrics.keys.set(published.len() as i64);
        self.metrics.revoked.set(s.revoked.len() as i64);
        let mut issuers = vec![Issuer {
            name: "gantry".into(),
            iss: self.issuer.clone(),
            keys: own,
            workloads: true,
        }];
        for (name, (iss, keys)) in &s.external {
            issuers.push(Issuer {
                name: name.clone(),
                iss: iss.clone(),
                keys: keys.clone(),
                workloads: false,
            });
        }
        // The revision (what the gateways' caches of verified tokens are valid under) changes
        // only when a key set does: revocations are checked on every use anyway, and logins,
        // API keys and policy changes must not make every gateway verify every token again.
        let fingerprint: Vec<(String, Vec<String>)> = issuers
            .iter()
            .map(|i| {
                let mut kids: Vec<String> = i.keys.kids().map(str::to_string).collect();
                kids.sort();
                (i.iss.clone(), kids)
            })
            .collect();
        if s.fingerprint != fingerprint || s.revision == 0 {
            s.revision += 1;
            s.fingerprint = fingerprint;
        }
        let m = Material {
            revision: s.revision,
            issuers,
            revoked: s
                .revoked
                .iter()
                .filter(|(_, exp)| **exp + gantry_authn::LEEWAY_SECS > now)
                .map(|(j, _)| j.clone())
                .collect(),
            api_keys: s.api_keys.clone(),
            calls: s.calls.clone(),
            sessions: s.sessions.clone(),
            refetch: self
                .refetch
                .lock()
                .unwrap_or_else(PoisonError::into_inner)
                .clone()
                .map(|tx| -> gantry_authn::Refetch {
                    Arc::new(move |name: &str| {
                        let _ = tx.try_send(name.to_string());
                    })
                }),
        };
        drop(s);
        let m = Arc::new(m);
        self.material.send_replace(m.clone());
        for l in self
            .listeners
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .iter()
        {
            l(&m);
        }
    }

    /// The internal CA's certificate (PEM and DER).
    pub fn ca_certificate(&self) -> (&str, &[u8]) {
        (&self.ca.cert_pem, &self.ca.cert_der)
    }

    /// Whether `service`'s instances get certificates.
    pub fn mtls(&self, service: &str) -> bool {
        self.config().mtls.contains(service)
    }

    /// A certificate for one instance.
    pub fn issue_cert(
        &self,
        service: &str,
        instance: &str,
    ) -> Result<ca::IssuedCert, IdentityError> {
        self.ca
            .issue(
                service,
                instance,
                gantry_authn::now_secs(),
                self.config().cert_ttl,
            )
            .map_err(|e| IdentityError::Internal(format!("issuing a certificate: {e}")))
    }

    /// The gateway's client certificate for mutual TLS to instances.
    pub fn issue_gateway_cert(&self) -> Result<ca::IssuedCert, IdentityError> {
        self.ca
            .issue_gateway(gantry_authn::now_secs(), self.config().cert_ttl)
            .map_err(|e| IdentityError::Internal(format!("issuing a certificate: {e}")))
    }

    /// The services whose instances get certificates (spec reload).
    pub fn set_mtls(&self, services: std::collections::BTreeSet<String>) {
        self.cfg.lock().unwrap_or_else(PoisonError::into_inner).mtls = services;
    }

    /// A new service-to-service policy (spec reload).
    pub fn set_calls(&self, calls: CallPolicy) {
        self.state().calls = calls.clone();
        self.cfg
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .calls = calls;
        self.publish();
    }

    /// The keys published now, newest first, and which one signs.
    pub fn keys(&self) -> (Vec<StoredKey>, Option<String>) {
        let cfg = self.config();
        let now = gantry_authn::now_secs();
        let s = self.state();
        let mut v: Vec<StoredKey> = s
            .keys
            .values()
            .filter(|k| k.published_at(now, cfg.longest_ttl()))
            .cloned()
            .collect();
        v.sort_by_key(|k| std::cmp::Reverse(k.signs_from));
        let signing = keys::signing(s.keys.values(), now).map(|k| k.kid.clone());
        (v, signing)
    }

    /// The JWKS document.
    pub fn jwks(&self) -> serde_json::Value {
        let (keys, _) = self.keys();
        keys::jwks(keys.iter())
    }

    pub(crate) fn signing_key(&self) -> Option<StoredKey> {
        keys::signing(self.state().keys.values(), gantry_authn::now_secs()).cloned()
    }

    /// Rotate: a new key, published now, signing after the propagation delay (or at once when
    /// `propagation` is 0 and nothing signs yet). Returns the new key.
    pub async fn rotate_now(&self, propagation: u64) -> Result<StoredKey, IdentityError> {
        let _one = self.rotating.lock().await;
        let cfg = self.config();
        let now = gantry_authn::now_secs();
        let existing: Vec<StoredKey> = self.state().keys.values().cloned().collect();
        let (new, retire) = keys::rotation(
            existing.iter(),
            cfg.algorithm,
            now,
            propagation,
            &self.sealer,
        )
        .map_err(IdentityError::Internal)?;
        // The new key first: verifiers must hold it before anything says the old one stops.
        self.store.create_json(KEYS, &new.kid, &new).await?;
        for k in &retire {
            self.store.put_json(KEYS, &k.kid, k).await?;
        }
        {
            let mut s = self.state();
            s.keys.insert(new.kid.clone(), new.clone());
            for k in retire {
                s.keys.insert(k.kid.clone(), k);
            }
        }
        self.metrics.rotations.inc();
        tracing::info!(kid = %new.kid, alg = new.alg.as_str(), signs_from = new.signs_from, "identity: new signing key");
        self.publish();
        Ok(new)
    }

    /// Rotate with the configured propagation delay (the API's and the schedule's rotation).
    pub async fn rotate(&self) -> Result<StoredKey, IdentityError> {
        let p = self.config().propagation;
        self.rotate_now(p).await
    }

    /// Background work until `shutdown`: follow the buckets, rotate on schedule, delete keys
    /// no token needs, refetch external key sets.
    pub async fn run(self: Arc<Self>, mut shutdown: watch::Receiver<bool>) {
        let mut tasks = tokio::task::JoinSet::new();
        for bucket in [KEYS, REVOKED, directory::API_KEYS, directory::ROLES] {
            let me = self.clone();
            tasks.spawn(async move { me.follow(bucket).await });
        }
        {
            let me = self.clone();
            tasks.spawn(async move { external::run(me).await });
        }
        match &self.redis {
            Some(r) => {
                tasks.spawn(self.clone().follow_redis_sessions(r.clone()));
            }
            None => {
                tasks.spawn(self.clone().follow_sessions());
            }
        }
        let mut tick = tokio::time::interval(Duration::from_secs(1));
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            tokio::select! {
                _ = tick.tick() => {}
                _ = shutdown.changed() => break,
            }
            if *shutdown.borrow() {
                break;
            }
            if let Err(e) = self.housekeeping().await {
                tracing::warn!(error = %e, "identity: key housekeeping failed; retrying");
            }
            self.renew_sessions();
        }
        tasks.abort_all();
    }

    /// One pass of the schedule: rotate when the signing key is old enough, delete keys whose
    /// tokens have all expired, republish when a key started or stopped signing.
    async fn housekeeping(&self) -> Result<(), IdentityError> {
        let cfg = self.config();
        let now = gantry_authn::now_secs();
        let (due, gone, changed) = {
            let s = self.state();
            let signing = keys::signing(s.keys.values(), now);
            let pending = s.keys.values().any(|k| k.signs_from > now);
            let due = cfg.rotate_every > 0
                && !pending
                && signing.is_none_or(|k| k.signs_from + cfg.rotate_every <= now);
            let gone: Vec<String> = s
                .keys
                .values()
                .filter(|k| !k.published_at(now, cfg.longest_ttl()))
                .map(|k| k.kid.clone())
                .collect();
            // A key started or stopped signing within the last tick: verifiers already have
            // it; republishing drops expired revocations too.
            let changed = s
                .keys
                .values()
                .any(|k| k.signs_from == now || k.retired_at == Some(now));
            (due, gone, changed)
        };
        if due {
            self.rotate().await?;
        }
        for kid in &gone {
            self.store.delete(KEYS, kid).await?;
            self.state().keys.remove(kid);
            tracing::info!(kid = %kid, "identity: signing key withdrawn (its tokens have expired)");
        }
        let expired = {
            let mut s = self.state();
            let before = s.revoked.len();
            s.revoked
                .retain(|_, exp| *exp + gantry_authn::LEEWAY_SECS > now);
            before != s.revoked.len()
        };
        if !gone.is_empty() || changed || expired {
            self.publish();
        }
        Ok(())
    }

    /// Follow one bucket into the caches (changes made by another process, or by this one).
    async fn follow(self: Arc<Self>, bucket: &'static str) {
        loop {
            // From the current values: what exists is replayed, and at `Current` whatever the
            // cache holds that was not replayed (deleted while no watch ran) goes. Changes made
            // meanwhile by this process arrive as events too: nothing is overwritten by a
            // snapshot read earlier.
            let mut w = match self.store.watch(bucket, ">", WatchFrom::Current).await {
                Ok(w) => w,
                Err(e) => {
                    tracing::warn!(bucket, error = %e, "identity: watch failed; retrying");
                    tokio::time::sleep(Duration::from_secs(1)).await;
                    continue;
                }
            };
            let mut replayed: Option<std::collections::HashSet<String>> = Some(Default::default());
            while let Some(ev) = w.next().await {
                let c = match ev {
                    Ok(WatchEvent::Change(c)) => c,
                    Ok(WatchEvent::Current) => {
                        if let Some(seen) = replayed.take() {
                            self.prune(bucket, &seen).await;
                            self.publish();
                        }
                        continue;
                    }
                    Err(_) => continue,
                };
                if let Some(seen) = replayed.as_mut() {
                    seen.insert(c.key.clone());
                }
                {
                    let mut s = self.state();
                    match (bucket, c.op) {
                        (KEYS, Op::Put) => {
                            if let Ok(k) =
                                gantry_store::decode::<StoredKey>(bucket, &c.key, &c.value)
                            {
                                s.keys.insert(c.key.clone(), k);
                            }
                        }
                        (KEYS, Op::Delete) => {
                            s.keys.remove(&c.key);
                        }
                        (REVOKED, Op::Put) => {
                            if let Ok(exp) = gantry_store::decode::<u64>(bucket, &c.key, &c.value) {
                                s.revoked.insert(c.key.clone(), exp);
                            }
                        }
                        (REVOKED, Op::Delete) => {
                            s.revoked.remove(&c.key);
                        }
                        (directory::ROLES, Op::Put) => {
                            if let Ok(r) = gantry_store::decode::<Role>(bucket, &c.key, &c.value) {
                                s.roles.insert(c.key.clone(), r);
                            }
                        }
                        (directory::ROLES, Op::Delete) => {
                            s.roles.remove(&c.key);
                        }
                        (_, Op::Put) => {
                            if let Ok(a) = gantry_store::decode::<ApiKey>(bucket, &c.key, &c.value)
                            {
                                if let Some((d, v)) = self.api_entry(&a) {
                                    s.api_keys.insert(d, v);
                                }
                            }
                        }
                        (_, Op::Delete) => {
                            if let Some(d) = digest_from_hex(&c.key) {
                                s.api_keys.remove(&d);
                            }
                        }
                    }
                }
                self.publish();
            }
            tokio::time::sleep(Duration::from_millis(200)).await;
        }
    }

    /// Drop from the cache of `bucket` what the store no longer has.
    /// Entries the watch did not replay may have been deleted while no watch ran, or written
    /// by this process after the watch's snapshot: only those the store no longer has go.
    /// (Revocations are never dropped here: they leave by expiring.)
    async fn prune(&self, bucket: &str, present: &std::collections::HashSet<String>) {
        let candidates: Vec<String> = {
            let s = self.state();
            match bucket {
                KEYS => s.keys.keys().cloned().collect(),
                directory::ROLES => s.roles.keys().cloned().collect(),
                directory::API_KEYS => s.api_keys.keys().map(|d| hex(d)).collect(),
                _ => Vec::new(),
            }
        };
        for k in candidates.into_iter().filter(|k| !present.contains(k)) {
            if !matches!(self.store.get(bucket, &k).await, Ok(None)) {
                continue;
            }
            let mut s = self.state();
            match bucket {
                KEYS => {
                    s.keys.remove(&k);
                }
                directory::ROLES => {
                    s.roles.remove(&k);
                }
                _ => {
                    if let Some(d) = digest_from_hex(&k) {
                        s.api_keys.remove(&d);
                    }
                }
            }
        }
    }

    pub(crate) fn sessions_now(&self) -> Arc<gantry_authn::Sessions> {
        self.state().sessions.clone()
    }

    pub(crate) fn edit_sessions(
        &self,
        f: impl FnOnce(&mut HashMap<[u8; 32], Arc<gantry_authn::Session>>),
    ) {
        {
            let mut s = self.state();
            s.sessions = Arc::new(sessions::edited(&s.sessions, f));
        }
        self.publish();
    }

    /// What an API key stands for: its client, Gantry's issuer and default audience.
    fn api_entry(&self, a: &ApiKey) -> Option<([u8; 32], Arc<Verified>)> {
        let d = digest_from_hex(&a.sha256)?;
        Some((
            d,
            Arc::new(Verified {
                kind: Kind::ApiKey,
                issuer: self.issuer.clone(),
                subject: a.client_id.clone(),
                client_id: Some(a.client_id.clone()),
                scopes: a.scopes.clone(),
                roles: a.roles.clone(),
                audiences: vec![self.config().audience],
                expires: u64::MAX / 2,
                jti: None,
                service: None,
                claims: serde_json::Map::new(),
                headers: Default::default(),
            }),
        ))
    }

    pub(crate) fn set_refetch(&self, tx: tokio::sync::mpsc::Sender<String>) {
        *self.refetch.lock().unwrap_or_else(PoisonError::into_inner) = Some(tx);
        self.publish();
    }

    pub(crate) fn external_keys(&self, name: &str, iss: &str, keys: KeySet) {
        self.state()
            .external
            .insert(name.to_string(), (iss.to_string(), keys));
        self.publish();
    }

    /// Verify a token against the current material (tokens we issued, and trusted issuers').
    pub fn verify(&self, token: &str) -> Result<Arc<Verified>, gantry_authn::Denial> {
        let m = self.current_material();
        gantry_authn::Cache::verify(token, &m, gantry_authn::now_secs())
    }

    /// Mark an access token id revoked until `exp`.
    pub async fn revoke_jti(&self, jti: &str, exp: u64) -> Result<(), IdentityError> {
        self.store.put_json(REVOKED, jti, &exp).await?;
        self.state().revoked.insert(jti.to_string(), exp);
        self.publish();
        Ok(())
    }

    // ── directory ─────────────────────────────────────────────────────────────────────────

    pub async fn clients(&self) -> Result<Vec<Client>, IdentityError> {
        Ok(self
            .store
            .list_json::<Client>(directory::CLIENTS, ">")
            .await?
            .into_iter()
            .map(|(_, c, _)| c)
            .collect())
    }

    pub async fn client(&self, id: &str) -> Result<Option<Client>, IdentityError> {
        if directory::check_name("client", id).is_err() {
            return Ok(None);
        }
        Ok(self
            .store
            .get_json::<Client>(directory::CLIENTS, id)
            .await?
            .map(|(c, _)| c))
    }

    /// Register a client; a confidential one's secret is returned (once).
    pub async fn create_client(
        &self,
        new: NewClient,
    ) -> Result<(Client, Option<String>), IdentityError> {
        directory::check_name("client id", &new.id).map_err(IdentityError::Invalid)?;
        if new.id.starts_with("service-") || new.id == CLI_CLIENT {
            return Err(IdentityError::Invalid(format!(
                "client id {:?}: reserved",
                new.id
            )));
        }
        let grants = if new.grant_types.is_empty() {
            match new.kind {
                ClientKind::Confidential => vec!["client_credentials".to_string()],
                ClientKind::Public => {
                    vec![
                        "authorization_code".to_string(),
                        "refresh_token".to_string(),
                    ]
                }
            }
        } else {
            new.grant_types.clone()
        };
        for g in &grants {
            if !directory::GRANTS.contains(&g.as_str()) {
                return Err(IdentityError::Invalid(format!(
                    "grant type {g:?}: expected one of {}",
                    directory::GRANTS.join(", ")
                )));
            }
        }
        if new.kind == ClientKind::Public && grants.iter().any(|g| g == "client_credentials") {
            return Err(IdentityError::Invalid(
                "a public client has no secret, so it cannot use client_credentials".into(),
            ));
        }
        if grants.iter().any(|g| g == "authorization_code") && new.redirect_uris.is_empty() {
            return Err(IdentityError::Invalid(
                "authorization_code needs at least one redirect URI".into(),
            ));
        }
        for u in &new.redirect_uris {
            directory::check_redirect_uri(u).map_err(IdentityError::Invalid)?;
        }
        for s in &new.scopes {
            directory::check_scope(s).map_err(IdentityError::Invalid)?;
        }
        for r in &new.roles {
            directory::check_name("role", r).map_err(IdentityError::Invalid)?;
        }
        let secret =
            (new.kind == ClientKind::Confidential).then(|| format!("gcs_{}", random_token(32)));
        let c = Client {
            id: new.id.clone(),
            kind: new.kind,
            grant_types: grants,
            redirect_uris: new.redirect_uris,
            scopes: new.scopes,
            roles: new.roles,
            audiences: new.audiences,
            secret_sha256: secret.as_ref().map(|s| hex(&gantry_authn::digest(s))),
            created_ms: gantry_model::unix_ms(),
        };
        match self.store.create_json(directory::CLIENTS, &c.id, &c).await {
            Ok(_) => Ok((c, secret)),
            Err(StoreError::AlreadyExists { .. }) => {
                Err(IdentityError::Exists(format!("client {}", new.id)))
            }
            Err(e) => Err(e.into()),
        }
    }

    /// A new secret for a confidential client (the old one stops working at once).
    pub async fn reset_client_secret(&self, id: &str) -> Result<String, IdentityError> {
        if directory::check_name("client id", id).is_err() {
            return Err(IdentityError::NotFound(format!("client {id}")));
        }
        let Some((mut c, rev)) = self
            .store
            .get_json::<Client>(directory::CLIENTS, id)
            .await?
        else {
            return Err(IdentityError::NotFound(format!("client {id}")));
        };
        if c.kind != ClientKind::Confidential {
            return Err(IdentityError::Invalid(format!(
                "client {id} is public: it has no secret"
            )));
        }
        let secret = format!("gcs_{}", random_token(32));
        c.secret_sha256 = Some(hex(&gantry_authn::digest(&secret)));
        self.store
            .update_json(directory::CLIENTS, id, &c, rev)
            .await?;
        Ok(secret)
    }

    pub async fn delete_client(&self, id: &str) -> Result<(), IdentityError> {
        directory::check_name("client id", id).map_err(IdentityError::Invalid)?;
        if !self.store.delete(directory::CLIENTS, id).await? {
            return Err(IdentityError::NotFound(format!("client {id}")));
        }
        // Its API keys go with it.
        for (k, a, _) in self
            .store
            .list_json::<ApiKey>(directory::API_KEYS, ">")
            .await?
        {
            if a.client_id == id {
                self.store.delete(directory::API_KEYS, &k).await?;
            }
        }
        Ok(())
    }

    pub async fn users(&self) -> Result<Vec<User>, IdentityError> {
        Ok(self
            .store
            .list_json::<User>(directory::USERS, ">")
            .await?
            .into_iter()
            .map(|(_, u, _)| u)
            .collect())
    }

    pub async fn user(&self, name: &str) -> Result<Option<(User, u64)>, IdentityError> {
        if directory::check_name("user", name).is_err() {
            return Ok(None);
        }
        Ok(self.store.get_json::<User>(directory::USERS, name).await?)
    }

    pub async fn create_user(
        &self,
        username: &str,
        password: &str,
        roles: Vec<String>,
    ) -> Result<User, IdentityError> {
        directory::check_name("username", username).map_err(IdentityError::Invalid)?;
        check_password(password)?;
        self.check_roles(&roles).await?;
        let hash = hash_password(password).await?;
        let u = User {
            username: username.to_string(),
            roles,
            disabled: false,
            password_hash: hash,
            created_ms: gantry_model::unix_ms(),
        };
        match self.store.create_json(directory::USERS, username, &u).await {
            Ok(_) => Ok(u),
            Err(StoreError::AlreadyExists { .. }) => {
                Err(IdentityError::Exists(format!("user {username}")))
            }
            Err(e) => Err(e.into()),
        }
    }

    /// Change a user's password, roles or disabled flag.
    pub async fn update_user(
        &self,
        username: &str,
        password: Option<&str>,
        roles: Option<Vec<String>>,
        disabled: Option<bool>,
    ) -> Result<User, IdentityError> {
        let hash = match password {
            Some(p) => {
                check_password(p)?;
                Some(hash_password(p).await?)
            }
            None => None,
        };
        if let Some(r) = &roles {
            self.check_roles(r).await?;
        }
        loop {
            let Some((mut u, rev)) = self.user(username).await? else {
                return Err(IdentityError::NotFound(format!("user {username}")));
            };
            if let Some(h) = &hash {
                u.password_hash = h.clone();
            }
            if let Some(r) = &roles {
                u.roles = r.clone();
            }
            if let Some(d) = disabled {
                u.disabled = d;
            }
            match self
                .store
                .update_json(directory::USERS, username, &u, rev)
                .await
            {
                Ok(_) => {
                    // What the user held under the old password, roles or state ends now.
                    self.end_user_sessions(username).await?;
                    self.revoke_user_families(username).await?;
                    return Ok(u);
                }
                Err(StoreError::RevisionMismatch { .. }) => continue,
                Err(e) => return Err(e.into()),
            }
        }
    }

    pub async fn delete_user(&self, username: &str) -> Result<(), IdentityError> {
        directory::check_name("username", username).map_err(IdentityError::Invalid)?;
        if !self.store.delete(directory::USERS, username).await? {
            return Err(IdentityError::NotFound(format!("user {username}")));
        }
        self.end_user_sessions(username).await?;
        self.revoke_user_families(username).await?;
        Ok(())
    }

    /// Every role: the built-in ones and the custom ones.
    pub async fn roles(&self) -> Result<Vec<Role>, IdentityError> {
        let mut v = directory::builtin_roles();
        v.extend(
            self.store
                .list_json::<Role>(directory::ROLES, ">")
                .await?
                .into_iter()
                .map(|(_, r, _)| r),
        );
        Ok(v)
    }

    pub async fn put_role(&self, role: Role) -> Result<Role, IdentityError> {
        directory::check_name("role", &role.name).map_err(IdentityError::Invalid)?;
        if directory::builtin_roles()
            .iter()
            .any(|b| b.name == role.name)
        {
            return Err(IdentityError::Invalid(format!(
                "role {:?} is built in and cannot be changed",
                role.name
            )));
        }
        for p in &role.permissions {
            if p != "*" && !p.contains(':') {
                return Err(IdentityError::Invalid(format!(
                    "permission {p:?}: expected GROUP:read|write (e.g. services:read) or *"
                )));
            }
        }
        let r = Role {
            builtin: false,
            ..role
        };
        self.store.put_json(directory::ROLES, &r.name, &r).await?;
        self.state().roles.insert(r.name.clone(), r.clone());
        Ok(r)
    }

    pub async fn delete_role(&self, name: &str) -> Result<(), IdentityError> {
        if directory::builtin_roles().iter().any(|b| b.name == name) {
            return Err(IdentityError::Invalid(format!("role {name:?} is built in")));
        }
        directory::check_name("role", name).map_err(IdentityError::Invalid)?;
        if !self.store.delete(directory::ROLES, name).await? {
            return Err(IdentityError::NotFound(format!("role {name}")));
        }
        self.state().roles.remove(name);
        Ok(())
    }

    async fn check_roles(&self, roles: &[String]) -> Result<(), IdentityError> {
        let known = self.roles().await?;
        for r in roles {
            if !known.iter().any(|k| &k.name == r) {
                return Err(IdentityError::Invalid(format!(
                    "unknown role {r:?} (create it first, or use admin, operator or viewer)"
                )));
            }
        }
        Ok(())
    }

    /// The permissions a set of roles grants (`*` for all), from the built-in roles and the
    /// cached custom ones (no I/O: the admin API asks on every request).
    pub fn role_permissions(&self, roles: &[String]) -> Vec<String> {
        let builtin = directory::builtin_roles();
        let s = self.state();
        let mut out: Vec<String> = roles
            .iter()
            .filter_map(|r| {
                builtin
                    .iter()
                    .find(|b| &b.name == r)
                    .or_else(|| s.roles.get(r))
            })
            .flat_map(|r| r.permissions.iter().cloned())
            .collect();
        out.sort();
        out.dedup();
        out
    }

    /// The permissions a set of roles grants (`*` for all).
    pub async fn permissions_of(&self, roles: &[String]) -> Result<Vec<String>, IdentityError> {
        let all = self.roles().await?;
        let mut out: Vec<String> = all
            .iter()
            .filter(|r| roles.contains(&r.name))
            .flat_map(|r| r.permissions.iter().cloned())
            .collect();
        out.sort();
        out.dedup();
        Ok(out)
    }

    pub async fn api_keys(&self) -> Result<Vec<ApiKey>, IdentityError> {
        Ok(self
            .store
            .list_json::<ApiKey>(directory::API_KEYS, ">")
            .await?
            .into_iter()
            .map(|(_, a, _)| a)
            .collect())
    }

    /// A new API key for a client (returned once), with scopes and roles within the client's.
    pub async fn create_api_key(
        &self,
        client_id: &str,
        scopes: Vec<String>,
    ) -> Result<(ApiKey, String), IdentityError> {
        let Some(c) = self.client(client_id).await? else {
            return Err(IdentityError::NotFound(format!("client {client_id}")));
        };
        for s in &scopes {
            if !c.scopes.contains(s) {
                return Err(IdentityError::Invalid(format!(
                    "scope {s:?} is not one of client {client_id}'s scopes"
                )));
            }
        }
        let key = format!("gk_{}", random_token(32));
        let digest = hex(&gantry_authn::digest(&key));
        let a = ApiKey {
            id: key[..11].to_string(),
            client_id: client_id.to_string(),
            scopes: if scopes.is_empty() {
                c.scopes.clone()
            } else {
                scopes
            },
            roles: c.roles.clone(),
            sha256: digest.clone(),
            created_ms: gantry_model::unix_ms(),
        };
        self.store
            .create_json(directory::API_KEYS, &digest, &a)
            .await?;
        if let Some((d, v)) = self.api_entry(&a) {
            self.state().api_keys.insert(d, v);
        }
        self.publish();
        Ok((a, key))
    }

    /// Delete an API key by its public id.
    pub async fn delete_api_key(&self, id: &str) -> Result<(), IdentityError> {
        for (k, a, _) in self
            .store
            .list_json::<ApiKey>(directory::API_KEYS, ">")
            .await?
        {
            if a.id == id {
                self.store.delete(directory::API_KEYS, &k).await?;
                if let Some(d) = digest_from_hex(&k) {
                    self.state().api_keys.remove(&d);
                }
                self.publish();
                return Ok(());
            }
        }
        Err(IdentityError::NotFound(format!("API key {id}")))
    }
}

/// What a new client is.
#[derive(Debug, Clone, Deserialize, Serialize, utoipa::ToSchema)]
pub struct NewClient {
    pub id: String,
    pub kind: ClientKind,
    #[serde(default)]
    pub grant_types: Vec<String>,
    #[serde(default)]
    pub redirect_uris: Vec<String>,
    #[serde(default)]
    pub scopes: Vec<String>,
    #[serde(default)]
    pub roles: Vec<String>,
    #[serde(default)]
    pub audiences: Vec<String>,
}

fn check_password(p: &str) -> Result<(), IdentityError> {
    if p.chars().count() < 8 || p.len() > 1024 {
        return Err(IdentityError::Invalid(
            "password: expected 8 to 1024 characters".into(),
        ));
    }
    Ok(())
}

async fn hash_password(p: &str) -> Result<String, IdentityError> {
    let p = p.to_string();
    tokio::task::spawn_blocking(move || {
        use argon2::password_hash::{PasswordHasher as _, SaltString};
        let salt = SaltString::encode_b64(random_token(16).as_bytes())
            .map_err(|e| IdentityError::Internal(format!("salt: {e}")))?;
        argon2::Argon2::default()
            .hash_password(p.as_bytes(), &salt)
            .map(|h| h.to_string())
            .map_err(|e| IdentityError::Internal(format!("hash: {e}")))
    })
    .await
    .map_err(|e| IdentityError::Internal(e.to_string()))?
}

/// Check a password against a PHC string (argon2's comparison is constant-time). With no
/// stored hash (unknown user), a dummy hash is checked so that the answer takes as long.
pub(crate) async fn verify_password(p: &str, hash: Option<String>) -> bool {
    static DUMMY: std::sync::OnceLock<String> = std::sync::OnceLock::new();
    let p = p.to_string();
    tokio::task::spawn_blocking(move || {
        use argon2::password_hash::PasswordHasher as _;
        use argon2::password_hash::{PasswordHash, PasswordVerifier as _, SaltString};
        let known = hash.is_some();
        let h = hash.unwrap_or_else(|| {
            DUMMY
                .get_or_init(|| {
                    SaltString::encode_b64(b"gantry-dummy-salt")
                        .ok()
                        .and_then(|s| {
                            argon2::Argon2::default()
                                .hash_password(b"x", &s)
                                .ok()
                                .map(|h| h.to_string())
                        })
                        .unwrap_or_default()
                })
                .clone()
        });
        let ok = PasswordHash::new(&h)
            .map(|parsed| {
                argon2::Argon2::default()
                    .verify_password(p.as_bytes(), &parsed)
                    .is_ok()
            })
            .unwrap_or(false);
        ok && known
    })
    .await
    .unwrap_or(false)
}

fn digest_from_hex(h: &str) -> Option<[u8; 32]> {
    if h.len() != 64 {
        return None;
    }
    let mut out = [0u8; 32];
    for (i, b) in out.iter_mut().enumerate() {
        *b = u8::from_str_radix(h.get(2 * i..2 * i + 2)?, 16).ok()?;
    }
    Some(out)
}

#[cfg(test)]
mod tests;
