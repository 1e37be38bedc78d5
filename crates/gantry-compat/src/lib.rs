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
                });
            }
            return Err(Denied::NoToken);
        };
        let mut headers = http::HeaderMap::new();
        let value = http::HeaderValue::from_str(&format!("Bearer {token}")).map_err(|_| {
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
