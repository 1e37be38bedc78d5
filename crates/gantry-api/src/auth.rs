//! Who is calling, and may they: every request becomes a [`Principal`] (or none), and every
//! endpoint, reads included, requires a [`Permission`], looked up in one table
//! ([`permission_for`]) by method and route template. No credentials: 401 with
//! `WWW-Authenticate`; a principal without the permission: 403. Both are JSON and name what is
//! missing. `/v1/health` and `/metrics` may be opened by configuration (`[admin] public`).
//!
//! [`Principals`] knows the admin token (every permission) and identity's principals: users and
//! clients with tokens from Gantry's issuer, and API keys, each with the permissions of their
//! roles (`admin`, `operator`, `viewer`, or custom roles as permission sets).

use std::collections::BTreeSet;
use std::sync::Arc;

use axum::extract::{MatchedPath, Request, State};
use axum::middleware::Next;
use axum::response::{IntoResponse, Response};
use http::{HeaderMap, Method, StatusCode};
use serde::Serialize;

use crate::error::ApiError;
use crate::ApiState;

/// What an endpoint requires.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize)]
#[serde(into = "&'static str")]
pub enum Permission {
    HealthRead,
    MetricsRead,
    ServicesRead,
    ServicesWrite,
    DeploymentsRead,
    DeploymentsWrite,
    RoutesRead,
    RoutesWrite,
    TrafficRead,
    RegistryRead,
    RegistryWrite,
    ConfigRead,
    ConfigWrite,
    /// Read secret config values (`reveal=true`); every such read is audited.
    ConfigReveal,
    LogsRead,
    EventsRead,
    AuditRead,
    SystemReload,
    IdentityRead,
    IdentityWrite,
    BusRead,
    /// Publish messages (a data operation: counted by the bus's metrics, not audited per call).
    BusPublish,
    /// Fetch, ack and nack as a pull subscriber (a data operation, like publishing).
    BusConsume,
    /// Topics and subscriptions: make, change, remove, replay, redrive.
    BusAdmin,
}

impl Permission {
    pub const ALL: [Permission; 24] = [
        Permission::HealthRead,
        Permission::MetricsRead,
        Permission::ServicesRead,
        Permission::ServicesWrite,
        Permission::DeploymentsRead,
        Permission::DeploymentsWrite,
        Permission::RoutesRead,
        Permission::RoutesWrite,
        Permission::TrafficRead,
        Permission::RegistryRead,
        Permission::RegistryWrite,
        Permission::ConfigRead,
        Permission::ConfigWrite,
        Permission::ConfigReveal,
        Permission::LogsRead,
        Permission::EventsRead,
        Permission::AuditRead,
        Permission::SystemReload,
        Permission::IdentityRead,
        Permission::IdentityWrite,
        Permission::BusRead,
        Permission::BusPublish,
        Permission::BusConsume,
        Permission::BusAdmin,
    ];

    pub fn as_str(self) -> &'static str {
        match self {
            Permission::HealthRead => "health:read",
            Permission::MetricsRead => "metrics:read",
            Permission::ServicesRead => "services:read",
            Permission::ServicesWrite => "services:write",
            Permission::DeploymentsRead => "deployments:read",
            Permission::DeploymentsWrite => "deployments:write",
            Permission::RoutesRead => "routes:read",
            Permission::RoutesWrite => "routes:write",
            Permission::TrafficRead => "traffic:read",
            Permission::RegistryRead => "registry:read",
            Permission::RegistryWrite => "registry:write",
            Permission::ConfigRead => "config:read",
            Permission::ConfigWrite => "config:write",
            Permission::ConfigReveal => "config:reveal",
            Permission::LogsRead => "logs:read",
            Permission::EventsRead => "events:read",
            Permission::AuditRead => "audit:read",
            Permission::SystemReload => "system:reload",
            Permission::IdentityRead => "identity:read",
            Permission::IdentityWrite => "identity:write",
            Permission::BusRead => "bus:read",
            Permission::BusPublish => "bus:publish",
            Permission::BusConsume => "bus:consume",
            Permission::BusAdmin => "bus:admin",
        }
    }
}

impl Permission {
    /// Whether it only lets a principal read (what is audited is what changes, and reveals).
    pub fn is_read(self) -> bool {
        self.as_str().ends_with(":read")
    }

    /// A data operation (publishing, consuming messages): high-volume, counted by metrics and
    /// not recorded in the audit trail call by call (what is audited is what changes the
    /// system: topics, subscriptions, replays, redrives).
    pub fn is_data(self) -> bool {
        matches!(self, Permission::BusPublish | Permission::BusConsume)
    }
}

impl From<Permission> for &'static str {
    fn from(p: Permission) -> Self {
        p.as_str()
    }
}

/// The permission each endpoint requires, by method and route template. An endpoint missing
/// here is refused to everyone (fail closed); a test checks that every route has an entry.
pub fn permission_for(method: &Method, path: &str) -> Option<Permission> {
    use Permission::*;
    let read = method == Method::GET || method == Method::HEAD;
    Some(match (read, path) {
        (true, "/v1/health" | "/v1/openapi.json") => HealthRead,
        (
            true,
            "/metrics" | "/v1/metrics/query" | "/v1/metrics/query_range" | "/v1/metrics/names",
        ) => MetricsRead,
        (true, "/v1/services" | "/v1/instances" | "/v1/upstreams") => ServicesRead,
        (false, "/v1/services/{name}/scale" | "/v1/services/{name}/restart") => ServicesWrite,
        (true, "/v1/deployments" | "/v1/deployments/{service}") => DeploymentsRead,
        (false, "/v1/deployments/{service}/versions/{version}") => DeploymentsWrite,
        (true, "/v1/routes") => RoutesRead,
        (false, "/v1/routes/{name}") => RoutesWrite,
        (true, "/v1/traffic") => TrafficRead,
        (
            true,
            "/v1/registry/services"
            | "/v1/registry/services/{name}"
            | "/v1/registry/instances"
            | "/v1/registry/instances/{id}"
            | "/v1/registry/watch",
        ) => RegistryRead,
        (
            false,
            "/v1/registry/instances"
            | "/v1/registry/instances/{id}"
            | "/v1/registry/instances/{id}/heartbeat"
            | "/v1/registry/instances/{id}/checks/{check}",
        ) => RegistryWrite,
        // A read with a JSON document for a question.
        (false, "/v1/registry/discover") => RegistryRead,
        (
            true,
            "/v1/config"
            | "/v1/config/{set}"
            | "/v1/config/{set}/history"
            | "/v1/config/{set}/versions/{version}"
            | "/v1/config/{set}/diff"
            | "/v1/config/{set}/export"
            | "/v1/config/{set}/resolved"
            | "/v1/config/{set}/watch",
        ) => ConfigRead,
        (false, "/v1/config/{set}" | "/v1/config/{set}/rollback" | "/v1/config/{set}/import") => {
            ConfigWrite
        }
        (true, "/v1/logs") => LogsRead,
        (true, "/v1/events") => EventsRead,
        (true, "/v1/audit") => AuditRead,
        (false, "/v1/reload") => SystemReload,
        (
            true,
            "/v1/identity/clients"
            | "/v1/identity/users"
            | "/v1/identity/roles"
            | "/v1/identity/api-keys"
            | "/v1/identity/keys",
        ) => IdentityRead,
        (
            false,
            "/v1/identity/clients"
            | "/v1/identity/clients/{id}"
            | "/v1/identity/clients/{id}/secret"
            | "/v1/identity/users"
            | "/v1/identity/users/{name}"
            | "/v1/identity/roles/{name}"
            | "/v1/identity/api-keys"
            | "/v1/identity/api-keys/{id}"
            | "/v1/identity/keys/rotate",
        ) => IdentityWrite,
        (
            true,
            "/v1/topics"
            | "/v1/topics/{topic}"
            | "/v1/topics/{topic}/messages"
            | "/v1/subscriptions"
            | "/v1/topics/{topic}/subscriptions/{name}"
            | "/v1/topics/{topic}/subscriptions/{name}/dead-letters",
        ) => BusRead,
        (false, "/v1/topics/{topic}/messages") => BusPublish,
        (
            false,
            "/v1/topics/{topic}/subscriptions/{name}/fetch"
            | "/v1/topics/{topic}/subscriptions/{name}/ack"
            | "/v1/topics/{topic}/subscriptions/{name}/nack"
            | "/v1/topics/{topic}/subscriptions/{name}/extend",
        ) => BusConsume,
        (
            false,
            "/v1/topics/{topic}"
            | "/v1/topics/{topic}/subscriptions/{name}"
            | "/v1/topics/{topic}/subscriptions/{name}/replay"
            | "/v1/topics/{topic}/subscriptions/{name}/redrive",
        ) => BusAdmin,
        _ => return None,
    })
}

/// Who made a request, as the authentication layer proved it.
#[derive(Debug, Clone, Serialize)]
pub struct Principal {
    /// Stable name in the audit trail, e.g. `admin-token`.
    pub id: String,
    /// What kind of credential proved it: `token` today; `user`, `client` with identity.
    pub kind: &'static str,
    #[serde(skip)]
    pub permissions: Arc<BTreeSet<Permission>>,
    /// A supervised instance's credential: the service it speaks for, which may read its own
    /// resolved config and its stream (`/v1/config/{service}/resolved`, `/watch`), nothing else.
    #[serde(skip)]
    pub service: Option<String>,
}

impl Principal {
    pub fn may(&self, p: Permission) -> bool {
        self.permissions.contains(&p)
    }
}

/// Turns a request's credentials into a principal.
pub trait Authenticator: Send + Sync {
    /// `Ok(None)`: no credentials given. `Err`: credentials given but not valid (the message says
    /// why, without echoing the secret).
    fn authenticate(&self, headers: &HeaderMap) -> Result<Option<Principal>, String>;
}

/// The admin token from the data directory: one principal with every permission.
pub struct AdminToken {
    token: Arc<str>,
    principal: Principal,
}

impl AdminToken {
    pub fn new(token: Arc<str>) -> Self {
        Self {
            token,
            principal: Principal {
                id: "admin-token".into(),
                kind: "token",
                permissions: Arc::new(Permission::ALL.into_iter().collect()),
                service: None,
            },
        }
    }
}

impl Authenticator for AdminToken {
    fn authenticate(&self, headers: &HeaderMap) -> Result<Option<Principal>, String> {
        let Some(value) = headers.get(http::header::AUTHORIZATION) else {
            return Ok(None);
        };
        let given = value
            .to_str()
            .ok()
            .and_then(|v| v.strip_prefix("Bearer "))
            .map(str::trim)
            .ok_or("the Authorization header must be 'Bearer <token>'")?;
        if constant_time_eq(given.as_bytes(), self.token.as_bytes()) {
            Ok(Some(self.principal.clone()))
        } else {
            Err("invalid bearer token".into())
        }
    }
}

fn constant_time_eq(a: &[u8], b: &[u8]) -> bool {
    gantry_authn::constant_time_eq(a, b)
}

/// The admin token and identity's principals.
pub struct Principals {
    token: AdminToken,
    identity: Arc<gantry_identity::Identity>,
}

impl Principals {
    pub fn new(token: Arc<str>, identity: Arc<gantry_identity::Identity>) -> Self {
        Self {
            token: AdminToken::new(token),
            identity,
        }
    }

    fn principal(&self, who: &gantry_authn::Identity) -> Principal {
        let granted = self.identity.role_permissions(&who.roles);
        let permissions = if granted.iter().any(|p| p == "*") {
            Permission::ALL.into_iter().collect()
        } else {
            Permission::ALL
                .into_iter()
                .filter(|p| granted.iter().any(|g| g == p.as_str()))
                .collect()
        };
        let (kind, prefix) = match who.kind {
            gantry_authn::Kind::User => ("user", "user"),
            gantry_authn::Kind::Client => ("client", "client"),
            gantry_authn::Kind::ApiKey => ("api_key", "client"),
            gantry_authn::Kind::Workload => ("workload", "service"),
        };
        let name = who.service.as_deref().unwrap_or(&who.subject);
        Principal {
            id: format!("{prefix}:{name}"),
            kind,
            permissions: Arc::new(permissions),
            service: None,
        }
    }
}

impl Authenticator for Principals {
    fn authenticate(&self, headers: &HeaderMap) -> Result<Option<Principal>, String> {
        let m = self.identity.current_material();
        let presented = gantry_authn::presented(
            headers
                .get(http::header::AUTHORIZATION)
                .map(|v| v.as_bytes()),
            headers.get("x-api-key").map(|v| v.as_bytes()),
        )
        .map_err(|d| d.describe().to_string())?;
        match presented {
            None => Ok(None),
            Some(gantry_authn::Presented::Bearer(t)) => {
                if constant_time_eq(t.as_bytes(), self.token.token.as_bytes()) {
                    return Ok(Some(self.token.principal.clone()));
                }
                if !t.contains('.') {
                    return Err("invalid bearer token".into());
                }
                let who = gantry_authn::Cache::verify(t, &m, gantry_authn::now_secs())
                    .map_err(|d| format!("invalid bearer token: {}", d.describe()))?;
                // Only Gantry's own tokens speak for operators, and only those meant for it: a
                // user's from `gantry login` (the CLI's client), a machine client's own. Not a
                // session's, a workload's, nor one a user gave another application.
                if who.issuer != self.identity.issuer() {
                    return Err("invalid bearer token: not issued by this Gantry".into());
                }
                let meant = match who.kind {
                    gantry_authn::Kind::User => {
                        who.client_id.as_deref() == Some(gantry_identity::CLI_CLIENT)
                    }
                    gantry_authn::Kind::Client => true,
                    // An instance's own credential: its own config, nothing more.
                    gantry_authn::Kind::Workload => {
                        if let Some(service) = who.service.clone() {
                            // It may publish, and consume its own subscriptions (below).
                            return Ok(Some(Principal {
                                id: format!("workload:{service}"),
                                kind: "workload",
                                permissions: Arc::new(BTreeSet::from([Permission::BusPublish])),
                                service: Some(service),
                            }));
                        }
                        false
                    }
                    _ => false,
                };
                if !meant {
                    return Err("this token is not for the admin API: users sign in with `gantry login`, machines use a client's own token (client credentials) or an API key".into());
                }
                Ok(Some(self.principal(&who)))
            }
            Some(gantry_authn::Presented::ApiKey(k)) => {
                let who = m.api_key(k).map_err(|d| d.describe().to_string())?;
                Ok(Some(self.principal(&who)))
            }
        }
    }
}

/// The principal of a request (in its extensions once `authorize` let it through); `None` for an
/// endpoint opened by configuration and called without credentials.
#[derive(Debug, Clone)]
pub struct Caller(pub Option<Principal>);

/// Route layer: authenticate, look up the endpoint's permission, let the request through or
/// answer 401/403. Denied mutating calls are audited too.
pub(crate) async fn authorize(State(s): State<ApiState>, mut req: Request, next: Next) -> Response {
    let template = req
        .extensions()
        .get::<MatchedPath>()
        .map(|m| m.as_str().to_string())
        .unwrap_or_default();
    let Some(mut perm) = permission_for(req.method(), &template) else {
        return ApiError::new(
            StatusCode::FORBIDDEN,
            "forbidden",
            format!(
                "{} {template} has no permission assigned, so no one may call it",
                req.method()
            ),
        )
        .into_response();
    };
    // Secret values are read with `reveal=true`: a permission of its own, audited like a change.
    if perm == Permission::ConfigRead && crate::parse::wants_reveal(req.uri().query()) {
        perm = Permission::ConfigReveal;
    }
    let method = req.method().clone();
    let path = req.uri().path().to_string();
    let remote = crate::audit::remote(&req);
    let request_id = crate::audit::request_id(&req);
    let call = |principal, status| crate::audit::Call {
        principal,
        method: &method,
        path: &path,
        template: &template,
        permission: perm,
        remote,
        request_id: &request_id,
        status,
    };
    let decision = match decide(s.auth.as_ref(), &s.public, req.headers(), perm) {
        // An instance reads its own service's resolved config and its stream (with its
        // secrets, which it has anyway), and nothing else.
        Decision::Forbidden(p) if own_config(&p, &method, &template, &path) => Decision::Allowed(p),
        Decision::Forbidden(p) if own_subscription(&p, &template, &path) => Decision::Allowed(p),
        d => d,
    };
    match decision {
        Decision::Open => {
            req.extensions_mut().insert(Caller(None));
            next.run(req).await
        }
        Decision::Unauthenticated(why) => {
            let resp = unauthorized(&format!(
                "{method} {template}: {why} (the admin token is in the data directory's admin-token file)"
            ));
            crate::audit::denied(&s, call(None, resp.status())).await;
            resp
        }
        Decision::Forbidden(p) => {
            let resp = ApiError::new(
                StatusCode::FORBIDDEN,
                "forbidden",
                format!(
                    "{} ({}) lacks the {} permission that {method} {template} needs",
                    p.id,
                    p.kind,
                    perm.as_str(),
                ),
            )
            .into_response();
            crate::audit::denied(&s, call(Some(&p), resp.status())).await;
            resp
        }
        Decision::Allowed(p) => {
            let mutating = !(method == Method::GET
                || method == Method::HEAD
                || perm.is_read()
                || perm.is_data())
                || perm == Permission::ConfigReveal;
            req.extensions_mut().insert(Caller(Some(p.clone())));
            let mut resp = if mutating {
                // A change and its audit record run to the end in a task of their own, even if
                // the client goes away meanwhile (which would drop this future): nothing that
                // changed state goes unrecorded.
                let (state, principal) = (s.clone(), p.clone());
                let (method, path, template, request_id) = (
                    method.clone(),
                    path.clone(),
                    template.clone(),
                    request_id.clone(),
                );
                let task = tokio::spawn(async move {
                    let resp = next.run(req).await;
                    crate::audit::record(
                        &state,
                        crate::audit::Call {
                            principal: Some(&principal),
                            method: &method,
                            path: &path,
                            template: &template,
                            permission: perm,
                            remote,
                            request_id: &request_id,
                            status: resp.status(),
                        },
                    )
                    .await;
                    resp
                });
                match task.await {
                    Ok(resp) => resp,
                    Err(e) => ApiError::internal(format!("the call failed: {e}")).into_response(),
                }
            } else {
                next.run(req).await
            };
            if let Ok(v) = http::HeaderValue::from_str(&request_id) {
                resp.headers_mut().insert("x-request-id", v);
            }
            resp
        }
    }
}

/// Whether a workload principal asks for its own service's resolved config or its stream.
fn own_config(p: &Principal, method: &Method, template: &str, path: &str) -> bool {
    let Some(service) = &p.service else {
        return false;
    };
    method == Method::GET
        && matches!(
            template,
            "/v1/config/{set}/resolved" | "/v1/config/{set}/watch"
        )
        && path.split('/').nth(3) == Some(service.as_str())
}

/// Whether a workload principal consumes a subscription named after its own service.
fn own_subscription(p: &Principal, template: &str, path: &str) -> bool {
    let Some(service) = &p.service else {
        return false;
    };
    matches!(
        template,
        "/v1/topics/{topic}/subscriptions/{name}/fetch"
            | "/v1/topics/{topic}/subscriptions/{name}/ack"
            | "/v1/topics/{topic}/subscriptions/{name}/nack"
            | "/v1/topics/{topic}/subscriptions/{name}/extend"
    ) && path.split('/').nth(5) == Some(service.as_str())
}

/// What the layer does with a request that needs `perm`.
#[derive(Debug)]
pub(crate) enum Decision {
    /// No credentials, and the permission is open by configuration.
    Open,
    /// 401: no credentials, or credentials that prove nothing (the reason says which).
    Unauthenticated(String),
    /// 403: a principal without the permission.
    Forbidden(Principal),
    Allowed(Principal),
}

pub(crate) fn decide(
    auth: &dyn Authenticator,
    public: &BTreeSet<Permission>,
    headers: &HeaderMap,
    perm: Permission,
) -> Decision {
    match auth.authenticate(headers) {
        Err(why) => Decision::Unauthenticated(why),
        Ok(None) if public.contains(&perm) => Decision::Open,
        Ok(None) => Decision::Unauthenticated(format!(
            "this needs the {} permission: send 'Authorization: Bearer <token>'",
            perm.as_str()
        )),
        Ok(Some(p)) if !p.may(perm) => Decision::Forbidden(p),
        Ok(Some(p)) => Decision::Allowed(p),
    }
}

fn unauthorized(why: &str) -> Response {
    let mut resp = ApiError::unauthorized(why).into_response();
    resp.headers_mut().insert(
        http::header::WWW_AUTHENTICATE,
        http::HeaderValue::from_static("Bearer realm=\"gantry\""),
    );
    resp
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;

    /// A principal that may only read services (what identity's narrower roles will look like).
    struct ReadOnly;

    impl Authenticator for ReadOnly {
        fn authenticate(&self, headers: &HeaderMap) -> Result<Option<Principal>, String> {
            match headers.get("authorization").and_then(|v| v.to_str().ok()) {
                None => Ok(None),
                Some("Bearer reader") => Ok(Some(Principal {
                    id: "reader".into(),
                    kind: "token",
                    permissions: Arc::new([Permission::ServicesRead].into_iter().collect()),
                    service: None,
                })),
                Some(_) => Err("invalid bearer token".into()),
            }
        }
    }

    fn headers(auth: Option<&str>) -> HeaderMap {
        let mut h = HeaderMap::new();
        if let Some(a) = auth {
            h.insert("authorization", a.parse().unwrap());
        }
        h
    }

    #[test]
    fn unauthenticated_forbidden_open_and_allowed() {
        let public: BTreeSet<Permission> = [Permission::HealthRead].into_iter().collect();
        let d = |a, p| decide(&ReadOnly, &public, &headers(a), p);
        assert!(
            matches!(d(Some("Bearer reader"), Permission::ServicesRead), Decision::Allowed(p) if p.id == "reader")
        );
        assert!(
            matches!(d(Some("Bearer reader"), Permission::ServicesWrite), Decision::Forbidden(p) if p.id == "reader")
        );
        assert!(matches!(
            d(Some("Bearer reader"), Permission::AuditRead),
            Decision::Forbidden(_)
        ));
        assert!(
            matches!(d(None, Permission::ServicesRead), Decision::Unauthenticated(w) if w.contains("services:read"))
        );
        assert!(
            matches!(d(Some("Bearer nope"), Permission::ServicesRead), Decision::Unauthenticated(w) if w.contains("invalid"))
        );
        // Open by configuration without credentials; a bad credential is still refused.
        assert!(matches!(d(None, Permission::HealthRead), Decision::Open));
        assert!(matches!(
            d(Some("Bearer nope"), Permission::HealthRead),
            Decision::Unauthenticated(_)
        ));
    }

    #[test]
    fn the_admin_token_may_do_everything_and_compares_exactly() {
        let a = AdminToken::new("s3cret-token-0123456789abcdef0123".into());
        for p in Permission::ALL {
            assert!(matches!(
                decide(
                    &a,
                    &BTreeSet::new(),
                    &headers(Some("Bearer s3cret-token-0123456789abcdef0123")),
                    p
                ),
                Decision::Allowed(_)
            ));
        }
        for bad in [
            "Bearer s3cret-token-0123456789abcdef012",
            "s3cret-token-0123456789abcdef0123",
            "Basic x",
        ] {
            assert!(
                matches!(
                    decide(
                        &a,
                        &BTreeSet::new(),
                        &headers(Some(bad)),
                        Permission::ServicesRead
                    ),
                    Decision::Unauthenticated(_)
                ),
                "{bad}"
            );
        }
    }
}
