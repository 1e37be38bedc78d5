//! The policy phase's first step: who is calling, proven, and may they use this route.
//!
//! A route's `Filter::Auth` carries its requirement (compiled from `RouteAuth`); the material
//! (issuers' keys, revoked ids, API keys, the service-to-service policy) is the snapshot's
//! `AuthMaterial`, replaced by identity without touching routes. Tokens are verified through a
//! per-thread cache (`gantry_authn::Cache`): a token seen again costs a hash lookup.
//!
//! Identity reaches the instance in `Gantry-Auth-*` headers, which no client can set: every
//! incoming header named `gantry-*` is removed first, on every route.

use std::sync::Arc;

use gantry_authn::{
    now_secs, presented, Cache, Denial, Forbidden, Identity, Kind, Material, Mode, Presented,
    Requirement, Session, SESSION_COOKIE,
};
use http::header::{self, HeaderMap, HeaderName, HeaderValue};

/// A route's authentication step.
pub(crate) struct RouteAuthFilter {
    pub req: Requirement,
    /// Reachable from outside under the `deny` policy.
    pub public: bool,
    /// The service the route belongs to (what a caller must be allowed to call).
    pub service: Arc<str>,
    /// A workload token goes upstream (Gantry's own services check it themselves).
    pub pass_credentials: bool,
}

/// A verified caller, and the browser session it came with (if it did).
pub(crate) struct Who {
    pub id: Arc<Identity>,
    pub session: Option<Arc<Session>>,
}

impl Who {
    /// The credential was a workload's bearer token: it is not passed on (a callee could
    /// replay it to call what only its caller may).
    pub(crate) fn workload_token(&self) -> bool {
        self.id.kind == Kind::Workload && self.session.is_none() && self.id.jti.is_some()
    }
}

pub(crate) enum Refusal {
    Unauthenticated(Denial),
    Forbidden(Forbidden),
}

static X_API_KEY: HeaderName = HeaderName::from_static("x-api-key");

/// The longest a request waits for an external issuer's keys to be refetched.
pub(crate) const REFETCH_WAIT: std::time::Duration = std::time::Duration::from_secs(2);

/// The SPIFFE ID prefix of the internal CA's workload certificates.
const SPIFFE_SERVICE: &str = "spiffe://gantry/service/";

/// The service a verified client certificate names (its `spiffe://gantry/service/NAME` URI
/// SAN), parsed once per connection. The TLS listener verified the chain against the internal
/// CA, the only CA it trusts for client certificates.
pub(crate) fn cert_service(p: &gantry_http::PeerIdentity) -> Option<&str> {
    p.resolved
        .get_or_init(|| {
            let leaf = p.certificates.first()?;
            let (_, cert) = x509_parser::parse_x509_certificate(leaf.as_ref()).ok()?;
            let san = cert.subject_alternative_name().ok()??;
            san.value.general_names.iter().find_map(|n| match n {
                x509_parser::extensions::GeneralName::URI(u) => u
                    .strip_prefix(SPIFFE_SERVICE)
                    .filter(|s| !s.is_empty() && !s.contains('/'))
                    .map(Box::from),
                _ => None,
            })
        })
        .as_deref()
}

/// The identity a workload certificate stands for.
fn cert_identity(service: &str) -> Arc<Identity> {
    Arc::new(Identity {
        kind: Kind::Workload,
        issuer: "gantry-ca".into(),
        subject: format!("{SPIFFE_SERVICE}{service}"),
        client_id: None,
        scopes: Vec::new(),
        roles: Vec::new(),
        audiences: Vec::new(),
        expires: u64::MAX / 2,
        jti: None,
        service: Some(service.to_string()),
        claims: Default::default(),
        headers: Default::default(),
    })
}

/// The verified caller (if any) or why the request may not pass. Credentials, in order: an
/// `Authorization` header (bearer token or API key), `X-Api-Key`, the session cookie; a
/// verified client certificate (mTLS) names the calling service when no token does.
pub(crate) fn authenticate(
    f: &RouteAuthFilter,
    m: &Material,
    headers: &HeaderMap,
    peer: Option<&gantry_http::PeerIdentity>,
) -> Result<Option<Who>, Refusal> {
    let policy = !m.calls.default_allow;
    if f.req.mode == Mode::None && !policy {
        return Ok(None);
    }
    let authorization = headers
        .get(header::AUTHORIZATION)
        .map(HeaderValue::as_bytes);
    let id = if f.req.mode == Mode::None {
        // Only a workload credential matters here (it names the calling service); any other
        // `Authorization` is the instance's business.
        match presented(authorization, None) {
            Ok(Some(Presented::Bearer(t))) => Cache::verify(t, m, now_secs())
                .ok()
                .filter(|i| i.kind == Kind::Workload),
            _ => None,
        }
        .or_else(|| peer.and_then(cert_service).map(cert_identity))
        .map(|id| Who { id, session: None })
    } else {
        let id = match presented(
            authorization,
            headers.get(&X_API_KEY).map(HeaderValue::as_bytes),
        ) {
            Err(d) => return Err(Refusal::Unauthenticated(d)),
            Ok(None) => match crate::context::cookie(headers, SESSION_COOKIE) {
                None => peer.and_then(cert_service).map(|s| Who {
                    id: cert_identity(s),
                    session: None,
                }),
                Some(c) => match m.session(c, now_secs()) {
                    Ok(s) => Some(Who {
                        id: s.identity.clone(),
                        session: Some(s),
                    }),
                    // A stale cookie (logged out, expired) on an optional route: anonymous.
                    Err(d) if f.req.mode == Mode::Required => {
                        return Err(Refusal::Unauthenticated(d))
                    }
                    Err(_) => None,
                },
            },
            Ok(Some(Presented::Bearer(t))) => Some(Who {
                id: Cache::verify(t, m, now_secs()).map_err(Refusal::Unauthenticated)?,
                session: None,
            }),
            Ok(Some(Presented::ApiKey(k))) => Some(Who {
                id: m.api_key(k).map_err(Refusal::Unauthenticated)?,
                session: None,
            }),
        };
        match id.as_ref().map(|w| &w.id) {
            Some(id) => {
                f.req.accepts(id, m).map_err(Refusal::Unauthenticated)?;
                f.req.check(id).map_err(Refusal::Forbidden)?;
            }
            None if f.req.mode == Mode::Required => {
                return Err(Refusal::Unauthenticated(Denial::Missing))
            }
            None => {}
        }
        id
    };
    if policy {
        // The calling service: from its token, else from its client certificate (a service
        // forwarding a user's token over mTLS is still that service calling).
        let caller = id
            .as_ref()
            .and_then(|w| w.id.service.as_deref())
            .or_else(|| peer.and_then(cert_service));
        m.calls
            .check(caller, &f.service, f.public)
            .map_err(Refusal::Forbidden)?;
    }
    Ok(id)
}

/// A session's request, as the instance gets it: the session's short-lived token in
/// `Authorization`, and the session cookie taken out of `Cookie` (the instance never sees the
/// browser's session id).
pub(crate) fn session_upstream(h: &mut HeaderMap, s: &Session) {
    let token = s.token.load();
    if let Ok(v) = HeaderValue::from_str(&token.0) {
        h.insert(header::AUTHORIZATION, v);
    }
    remove_cookie(h);
}

/// `Cookie` without the session cookie.
fn remove_cookie(h: &mut HeaderMap) {
    let kept: Vec<String> = h
        .get_all(header::COOKIE)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(';'))
        .map(str::trim)
        .filter(|kv| {
            !kv.is_empty()
                && kv
                    .split_once('=')
                    .is_none_or(|(k, _)| k.trim() != SESSION_COOKIE)
        })
        .map(str::to_string)
        .collect();
    h.remove(header::COOKIE);
    if !kept.is_empty() {
        if let Ok(v) = HeaderValue::from_str(&kept.join("; ")) {
            h.insert(header::COOKIE, v);
        }
    }
}

/// Remove every `gantry-*` header the client sent (identity headers cannot be forged).
pub(crate) fn strip_ours(h: &mut HeaderMap) {
    // `gantry_*` too: CGI-style servers read `gantry_auth_roles` as `Gantry-Auth-Roles`.
    let names: Vec<HeaderName> = h.keys().filter(|n| is_ours(n.as_str())).cloned().collect();
    for n in names {
        h.remove(n);
    }
}

/// A header name only the gateway may set (`gantry-*`, or its underscore spelling).
pub(crate) fn is_ours(name: &str) -> bool {
    name.starts_with("gantry-") || name.starts_with("gantry_")
}

/// The session cookie never goes upstream (whatever the route): an instance that got it could
/// act as the user everywhere.
pub(crate) fn strip_session_cookie(h: &mut HeaderMap) {
    let has = h.get_all(header::COOKIE).iter().any(|v| {
        v.as_bytes()
            .windows(SESSION_COOKIE.len())
            .any(|w| w == SESSION_COOKIE.as_bytes())
    });
    if has {
        remove_cookie(h);
    }
}

static KIND: HeaderName = HeaderName::from_static("gantry-auth-kind");
static SUBJECT: HeaderName = HeaderName::from_static("gantry-auth-subject");
static ISSUER: HeaderName = HeaderName::from_static("gantry-auth-issuer");
static CLIENT: HeaderName = HeaderName::from_static("gantry-auth-client");
static SCOPES: HeaderName = HeaderName::from_static("gantry-auth-scopes");
static ROLES: HeaderName = HeaderName::from_static("gantry-auth-roles");
static SERVICE: HeaderName = HeaderName::from_static("gantry-auth-service");

/// The verified identity, for the instance (built once per verified token, kept with it). A
/// value that is not a valid header value (a subject with control characters) is left out
/// rather than mangled.
pub(crate) fn identity_headers(h: &mut HeaderMap, id: &Identity) {
    let list = id.headers.get_or_init(|| {
        let mut out = Vec::with_capacity(7);
        let mut put = |n: &HeaderName, v: &str| {
            if v.is_empty() {
                return;
            }
            if let Ok(v) = HeaderValue::from_str(v) {
                out.push((n.clone(), v));
            }
        };
        put(&KIND, id.kind.as_str());
        put(&SUBJECT, &id.subject);
        put(&ISSUER, &id.issuer);
        if let Some(c) = &id.client_id {
            put(&CLIENT, c);
        }
        put(&SCOPES, &id.scopes.join(" "));
        put(&ROLES, &id.roles.join(","));
        if let Some(s) = &id.service {
            put(&SERVICE, s);
        }
        out
    });
    for (n, v) in list {
        h.insert(n.clone(), v.clone());
    }
}

/// `WWW-Authenticate` for a 401 or a 403 (RFC 6750 section 3).
pub(crate) fn challenge(refusal: &Refusal) -> HeaderValue {
    let v = match refusal {
        Refusal::Unauthenticated(d) => match d.oauth_error() {
            None => "Bearer realm=\"gantry\"".to_string(),
            Some(e) => format!(
                "Bearer realm=\"gantry\", error=\"{e}\", error_description=\"{}\"",
                d.describe().replace('"', "'")
            ),
        },
        Refusal::Forbidden(Forbidden::InsufficientScope(s)) => {
            format!("Bearer realm=\"gantry\", error=\"insufficient_scope\", scope=\"{s}\"")
        }
        Refusal::Forbidden(_) => "Bearer realm=\"gantry\", error=\"insufficient_scope\"".into(),
    };
    HeaderValue::from_str(&v).unwrap_or(HeaderValue::from_static("Bearer realm=\"gantry\""))
}
