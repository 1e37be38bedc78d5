//! Listeners that speak other systems' HTTP APIs, so that clients written for them work
//! unchanged against Gantry: the subset of Consul's agent, catalog, health and KV API that
//! service-discovery clients use ([`consul`]). Each is off by default and has a listener of its
//! own (`[registry] consul = "127.0.0.1:8500"`); likewise the subset of Eureka's REST API its
//! clients use ([`eureka`], `[registry] eureka`).
//!
//! They hold no state of their own: registrations go to the registry (durable, as the admin
//! API's), KV to the config store (with its history), and every call is authorized as a
//! Gantry principal (a Consul token is a Gantry token or API key) and, when it changes
//! something, audited.
#![forbid(unsafe_code)]

pub mod consul;
pub mod eureka;
pub mod spring;

use std::sync::Arc;

use gantry_api::auth::{Authenticator, Permission, Principal};

/// What a compatibility listener needs from the rest of Gantry.
#[derive(Clone)]
pub struct CompatState {
    pub registry: Arc<gantry_registry::Registry>,
    pub config: Arc<gantry_config::ConfigStore>,
    pub auth: Arc<dyn Authenticator>,
    /// The audit trail's store.
    pub store: Arc<dyn gantry_store::Store>,
    /// This listener's address, as Consul's `status/leader` names it.
    pub advertise: String,
    /// What calls without a token may do (none by default).
    pub anonymous: Arc<std::collections::BTreeSet<Permission>>,
    /// Services gantry runs or whose endpoints the spec fixes: not open to registrations
    /// through these listeners (no one outside can add an address to them).
    pub managed: Arc<std::collections::BTreeSet<String>>,
    /// Blocking queries waiting at once, at most (beyond: answered at once, as after `wait`),
    /// so that waiters cannot take every connection a listener has.
    pub waiters: Arc<tokio::sync::Semaphore>,
}

/// Blocking queries one listener lets wait at once.
pub const MAX_WAITERS: usize = 128;

/// Metadata key naming the listener an instance registered through; writes through a listener
/// touch only its own instances.
pub const SOURCE_META: &str = "gantry.registered-through";

impl CompatState {
    /// Refuse a registration into a service gantry runs or fixes in the spec.
    pub(crate) fn open_to_registration(&self, service: &str) -> Result<(), String> {
        if self.managed.contains(service) {
            return Err(format!(
                "service {service} is run by gantry (or has fixed endpoints in the spec): instances cannot register into it from outside"
            ));
        }
        Ok(())
    }

    /// The instance `id` if it registered through `listener`.
    pub(crate) fn own_instance(&self, id: &str, listener: &str) -> Option<gantry_model::Instance> {
        self.registry
            .get(id)
            .filter(|i| i.metadata.get(SOURCE_META).map(String::as_str) == Some(listener))
    }
}

/// Run a change to the end in a task of its own, audit record included, even if the client
/// goes away (dropping the handler): nothing that changed state goes unrecorded.
pub(crate) async fn detached<F>(f: F) -> axum::response::Response
where
    F: std::future::Future<Output = axum::response::Response> + Send + 'static,
{
    use axum::response::IntoResponse as _;
    match tokio::spawn(f).await {
        Ok(r) => r,
        Err(e) => (
            http::StatusCode::INTERNAL_SERVER_ERROR,
            format!("the call failed: {e}"),
        )
            .into_response(),
    }
}

impl CompatState {
    /// The principal of a token given in one of the ways clients send it, if it has `perm`.
    pub(crate) fn authorize(
        &self,
        token: Option<&str>,
        perm: Permission,
    ) -> Result<Principal, Denied> {
        let Some(token) = token.filter(|t| !t.is_empty()) else {
            if self.anonymous.contains(&perm) {
                return Ok(Principal {
                    id: "anonymous".into(),
                    kind: "anonymous",
                    permissions: self.anonymous.clone(),
                    service: None,
                });
            }
            return Err(Denied::NoToken);
        };
        let mut headers = http::HeaderMap::new();
        // An API key goes as one (`ApiKey`), anything else as a bearer token.
        let scheme = if token.starts_with("gk_") {
            "ApiKey"
        } else {
            "Bearer"
        };
        let value = http::HeaderValue::from_str(&format!("{scheme} {token}")).map_err(|_| {
            Denied::BadToken("the token has characters a header cannot carry".into())
        })?;
        headers.insert(http::header::AUTHORIZATION, value);
        match self.auth.authenticate(&headers) {
            Ok(Some(p)) if p.may(perm) => Ok(p),
            Ok(Some(p)) => Err(Denied::Forbidden(format!(
                "{} ({}) lacks the {} permission",
                p.id,
                p.kind,
                perm.as_str()
            ))),
            Ok(None) => Err(Denied::NoToken),
            Err(why) => Err(Denied::BadToken(why)),
        }
    }
}

#[derive(Debug)]
pub(crate) enum Denied {
    NoToken,
    BadToken(String),
    Forbidden(String),
}

/// The caller's token: basic auth's password (Eureka and Spring clients put credentials in the
/// server URL or their config), or a bearer token.
pub(crate) fn basic_or_bearer(headers: &http::HeaderMap) -> Option<String> {
    use base64::Engine as _;
    let v = headers.get(http::header::AUTHORIZATION)?.to_str().ok()?;
    if let Some(t) = v.strip_prefix("Bearer ") {
        return Some(t.to_string());
    }
    let b = v.strip_prefix("Basic ")?;
    let raw = base64::engine::general_purpose::STANDARD.decode(b).ok()?;
    let text = String::from_utf8(raw).ok()?;
    let (_, password) = text.split_once(':')?;
    // Clients percent-encode credentials in URLs.
    Some(
        form_urlencoded::parse(format!("p={password}").as_bytes())
            .next()
            .map(|(_, v)| v.into_owned())
            .unwrap_or_default(),
    )
}

/// An error answered in the other system's way: a status and plain text.
pub(crate) struct Fail(pub http::StatusCode, pub String);

impl axum::response::IntoResponse for Fail {
    fn into_response(self) -> axum::response::Response {
        (
            self.0,
            [(http::header::CONTENT_TYPE, "text/plain; charset=utf-8")],
            self.1,
        )
            .into_response()
    }
}

impl From<gantry_registry::RegistryError> for Fail {
    fn from(e: gantry_registry::RegistryError) -> Self {
        use gantry_registry::RegistryError as E;
        use http::StatusCode as S;
        match e {
            E::Invalid(m) => Fail(S::BAD_REQUEST, m),
            E::NotFound(m) => Fail(S::NOT_FOUND, format!("{m} not found")),
            E::Conflict(m) => Fail(S::CONFLICT, m),
            E::Store(e) => Fail(S::INTERNAL_SERVER_ERROR, e.to_string()),
        }
    }
}

impl From<gantry_config::ConfigError> for Fail {
    fn from(e: gantry_config::ConfigError) -> Self {
        use gantry_config::ConfigError as E;
        use http::StatusCode as S;
        let status = match &e {
            E::Invalid(_) => S::BAD_REQUEST,
            E::NoSuchVersion { .. } => S::NOT_FOUND,
            E::Conflict => S::CONFLICT,
            E::Secret(_) | E::Store(_) => S::INTERNAL_SERVER_ERROR,
        };
        Fail(status, e.to_string())
    }
}

/// One call in the audit trail: recorded when a principal made it, within the refusals'
/// rate limit when none could be proved.
pub(crate) async fn audit(
    s: &CompatState,
    principal: Option<&Principal>,
    call: gantry_api::audit::Call<'_>,
) {
    let call = gantry_api::audit::Call { principal, ..call };
    if principal.is_some() {
        gantry_api::audit::record_in(s.store.as_ref(), call).await;
    } else {
        gantry_api::audit::denied_in(s.store.as_ref(), call).await;
    }
}
