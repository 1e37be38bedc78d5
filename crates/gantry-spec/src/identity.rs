//! `[identity]`: the token service, signing keys, trusted issuers and the service-to-service
//! policy; and the route and service fields that use them.

use std::net::SocketAddr;

use gantry_model as m;
use serde::{Deserialize, Serialize};

use crate::types::Spec;

type Problems = Vec<(String, String)>;

/// `[identity]`
#[derive(Debug, Clone, Deserialize, Serialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct IdentitySpec {
    /// Where the token service listens (OAuth 2.0 token, JWKS, OpenID discovery, login).
    /// Default `127.0.0.1:7072`.
    #[serde(default = "default_listen")]
    pub listen: SocketAddr,
    /// The `iss` of Gantry's tokens and the base of its endpoints' URLs. Default
    /// `http://<listen>` (the bound address, when the port is 0).
    #[serde(default)]
    pub issuer: Option<String>,
    /// Signing algorithm of new keys: `EdDSA` (default), `ES256` or `RS256`.
    #[serde(default = "default_algorithm")]
    pub algorithm: String,
    /// Lifetime of access tokens. Default 900 (15 minutes).
    #[serde(default = "default_access_ttl")]
    pub access_token_ttl_secs: u64,
    /// Lifetime of refresh tokens (each use rotates it). Default 2592000 (30 days).
    #[serde(default = "default_refresh_ttl")]
    pub refresh_token_ttl_secs: u64,
    /// Lifetime of the credentials supervised instances get (renewed at half-life). Default 600.
    #[serde(default = "default_workload_ttl")]
    pub workload_token_ttl_secs: u64,
    /// A new signing key every this long. Default 604800 (a week); 0: only on demand.
    #[serde(default = "default_rotate")]
    pub rotate_every_secs: u64,
    /// How long a new key is published (in the JWKS and at the gateway) before tokens are signed
    /// with it, so that every verifier holds it first. Default 60.
    #[serde(default = "default_propagation")]
    pub key_propagation_secs: u64,
    /// Lifetime of the certificates instances of `mtls` services get (renewed at half-life).
    /// Default 3600.
    #[serde(default = "default_cert_ttl")]
    pub workload_cert_ttl_secs: u64,
    /// Serve the token service through the gateway too, under this path prefix (e.g.
    /// `/auth`), so that browser apps sign in on their own origin; set `issuer` to the URL
    /// clients use (e.g. `https://shop.example/auth`). Default: its own listener only.
    #[serde(default)]
    pub gateway_path: Option<String>,
    /// Keep browser sessions in Redis (`redis://HOST:PORT[/DB]`) rather than the store: for
    /// several gantrys that share sessions but not a store. Default: the store.
    #[serde(default)]
    pub sessions_redis: Option<String>,
    /// Lifetime of a browser session (signed in at `/session/login`). Default 28800 (8 hours).
    #[serde(default = "default_session_ttl")]
    pub session_ttl_secs: u64,
    /// Service-to-service calls: `allow` (default: every caller reaches every route) or `deny`
    /// (a service reaches only the services in its `calls`; outside traffic only routes marked
    /// `public`).
    #[serde(default = "default_policy")]
    pub service_policy: String,
    /// The default audience of Gantry's tokens. Default `gantry`.
    #[serde(default = "default_audience")]
    pub audience: String,
    /// Other issuers whose tokens routes may accept.
    #[serde(default)]
    pub issuers: Vec<ExternalIssuerSpec>,
}

/// `[[identity.issuers]] name = "keycloak", issuer = "https://…/realms/x", jwks_uri = "…"`
#[derive(Debug, Clone, Deserialize, Serialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct ExternalIssuerSpec {
    /// What routes call it in `issuers`.
    pub name: String,
    /// The `iss` its tokens carry.
    pub issuer: String,
    /// Where its keys are. Default: `jwks_uri` from its OpenID discovery document.
    #[serde(default)]
    pub jwks_uri: Option<String>,
    /// PEM file of the CAs its https endpoints are verified against (relative to the spec's
    /// directory). Default: the system's.
    #[serde(default)]
    pub ca_file: Option<std::path::PathBuf>,
}

fn default_listen() -> SocketAddr {
    SocketAddr::from(([127, 0, 0, 1], 7072))
}
fn default_algorithm() -> String {
    "EdDSA".into()
}
fn default_access_ttl() -> u64 {
    900
}
fn default_refresh_ttl() -> u64 {
    30 * 86_400
}
fn default_workload_ttl() -> u64 {
    600
}
fn default_rotate() -> u64 {
    7 * 86_400
}
fn default_propagation() -> u64 {
    60
}
fn default_cert_ttl() -> u64 {
    3600
}
fn default_session_ttl() -> u64 {
    8 * 3600
}
fn default_policy() -> String {
    "allow".into()
}
fn default_audience() -> String {
    "gantry".into()
}

impl Default for IdentitySpec {
    fn default() -> Self {
        Self {
            listen: default_listen(),
            issuer: None,
            algorithm: default_algorithm(),
            access_token_ttl_secs: default_access_ttl(),
            refresh_token_ttl_secs: default_refresh_ttl(),
            workload_token_ttl_secs: default_workload_ttl(),
            rotate_every_secs: default_rotate(),
            key_propagation_secs: default_propagation(),
            session_ttl_secs: default_session_ttl(),
            sessions_redis: None,
            gateway_path: None,
            workload_cert_ttl_secs: default_cert_ttl(),
            service_policy: default_policy(),
            audience: default_audience(),
            issuers: Vec::new(),
        }
    }
}

impl IdentitySpec {
    /// `deny` is the policy.
    pub fn deny_by_default(&self) -> bool {
        self.service_policy == "deny"
    }
}

/// The built-in service the token service is routed as (`gateway_path`).
pub const IDENTITY_SERVICE: &str = "gantry-identity";

/// The name of Gantry's own issuer in routes' `issuers`.
pub const BUILTIN_ISSUER: &str = "gantry";

fn is_url(s: &str) -> bool {
    (s.starts_with("http://") || s.starts_with("https://"))
        && s.len() > 8
        && !s.chars().any(|c| c.is_whitespace() || c.is_control())
}

pub(crate) fn validate(p: &mut Problems, spec: &Spec) {
    let id = &spec.identity;
    if !["EdDSA", "ES256", "RS256"].contains(&id.algorithm.as_str()) {
        p.push((
            "identity.algorithm".into(),
            format!("{:?}: expected EdDSA, ES256 or RS256", id.algorithm),
        ));
    }
    if let Some(iss) = &id.issuer {
        if !is_url(iss) {
            p.push((
                "identity.issuer".into(),
                format!("{iss:?}: expected an http:// or https:// URL"),
            ));
        }
    }
    for (f, v, min, max) in [
        (
            "access_token_ttl_secs",
            id.access_token_ttl_secs,
            10,
            86_400,
        ),
        (
            "refresh_token_ttl_secs",
            id.refresh_token_ttl_secs,
            60,
            365 * 86_400,
        ),
        (
            "workload_token_ttl_secs",
            id.workload_token_ttl_secs,
            30,
            86_400,
        ),
        ("key_propagation_secs", id.key_propagation_secs, 0, 86_400),
        ("session_ttl_secs", id.session_ttl_secs, 60, 30 * 86_400),
        (
            "workload_cert_ttl_secs",
            id.workload_cert_ttl_secs,
            60,
            30 * 86_400,
        ),
    ] {
        if !(min..=max).contains(&v) {
            p.push((format!("identity.{f}"), format!("expected {min}..={max}")));
        }
    }
    if id.rotate_every_secs != 0
        && id.rotate_every_secs < id.key_propagation_secs + id.access_token_ttl_secs
    {
        p.push((
            "identity.rotate_every_secs".into(),
            "expected 0 (on demand only) or at least key_propagation_secs + access_token_ttl_secs"
                .into(),
        ));
    }
    if !["allow", "deny"].contains(&id.service_policy.as_str()) {
        p.push((
            "identity.service_policy".into(),
            format!("{:?}: expected allow or deny", id.service_policy),
        ));
    }
    if let Some(u) = &id.sessions_redis {
        if !u.starts_with("redis://") || u.len() <= 8 || u.chars().any(char::is_whitespace) {
            p.push((
                "identity.sessions_redis".into(),
                format!("{u:?}: expected redis://HOST:PORT[/DB]"),
            ));
        }
    }
    if let Some(g) = &id.gateway_path {
        let ok = g.starts_with('/') && g.len() > 1 && crate::validate::bad_prefix(g).is_none();
        if !ok {
            p.push((
                "identity.gateway_path".into(),
                format!("{g:?}: expected a path prefix such as \"/auth\" (not \"/\")"),
            ));
        }
        let g = crate::normalize_prefix(g);
        for (name, svc) in &spec.services {
            for (i, r) in svc.routes.iter().enumerate() {
                if r.path_prefix
                    .as_deref()
                    .map(crate::normalize_prefix)
                    .as_deref()
                    == Some(g.as_str())
                {
                    p.push((
                        format!("services.{name}.routes[{i}].path_prefix"),
                        format!("{g:?} is identity.gateway_path (the token service's prefix)"),
                    ));
                }
            }
        }
    }
    if spec.services.contains_key(IDENTITY_SERVICE) {
        p.push((
            format!("services.{IDENTITY_SERVICE}"),
            "this name is Gantry's own (the token service)".into(),
        ));
    }
    if id.audience.is_empty() {
        p.push(("identity.audience".into(), "must not be empty".into()));
    }
    let mut names = vec![BUILTIN_ISSUER];
    for (i, e) in id.issuers.iter().enumerate() {
        let f = |x: &str| format!("identity.issuers[{i}].{x}");
        if e.name.is_empty() || names.contains(&e.name.as_str()) {
            p.push((
                f("name"),
                format!("{:?}: empty or used twice (gantry is taken)", e.name),
            ));
        }
        names.push(&e.name);
        if !is_url(&e.issuer) {
            p.push((
                f("issuer"),
                format!("{:?}: expected an http(s) URL", e.issuer),
            ));
        }
        if let Some(u) = &e.jwks_uri {
            if !is_url(u) {
                p.push((f("jwks_uri"), format!("{u:?}: expected an http(s) URL")));
            }
        }
    }
    for (name, svc) in &spec.services {
        for (i, c) in svc.calls.iter().enumerate() {
            if !spec.services.contains_key(c) {
                p.push((
                    format!("services.{name}.calls[{i}]"),
                    format!("unknown service {c:?}"),
                ));
            }
        }
    }
}

/// A route's identity fields (spec routes and routes added over the API alike).
pub(crate) fn validate_route(
    p: &mut Problems,
    spec: &Spec,
    name: &str,
    i: usize,
    r: &crate::gateway::RouteSpec,
) {
    let rf = |x: &str| format!("services.{name}.routes[{i}].{x}");
    let mode = match r.auth.as_deref() {
        None => m::AuthMode::None,
        Some(a) => match m::AuthMode::parse(a) {
            Some(m) => m,
            None => {
                p.push((
                    rf("auth"),
                    format!("{a:?}: expected none, optional or required"),
                ));
                return;
            }
        },
    };
    let asks = !(r.scopes.is_empty()
        && r.roles.is_empty()
        && r.claims.is_empty()
        && r.issuers.is_empty()
        && r.audiences.is_empty());
    if asks && mode == m::AuthMode::None {
        p.push((
            rf("auth"),
            "scopes, roles, claims, issuers and audiences need auth = \"required\" or \"optional\""
                .into(),
        ));
    }
    if r.redirect.is_some() && (mode != m::AuthMode::None || r.public) {
        p.push((
            rf("auth"),
            "a redirect route answers before authentication: auth and public apply to forwarding routes".into(),
        ));
    }
    let mut names = vec![BUILTIN_ISSUER];
    names.extend(spec.identity.issuers.iter().map(|e| e.name.as_str()));
    for (j, iss) in r.issuers.iter().enumerate() {
        if !names.contains(&iss.as_str()) && !is_url(iss) {
            p.push((
                rf(&format!("issuers[{j}]")),
                format!("unknown issuer {iss:?}: expected gantry, a name from [[identity.issuers]] or an issuer URL"),
            ));
        }
    }
    for (j, s) in r.scopes.iter().enumerate() {
        if s.is_empty()
            || s.chars()
                .any(|c| c.is_whitespace() || c == '"' || c == '\\')
        {
            p.push((
                rf(&format!("scopes[{j}]")),
                format!("{s:?}: a scope is a non-empty token without spaces or quotes"),
            ));
        }
    }
    for k in r.claims.keys() {
        if k.is_empty() {
            p.push((rf("claims"), "claim names must not be empty".into()));
        }
    }
}
