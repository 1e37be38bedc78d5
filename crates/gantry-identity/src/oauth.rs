//! The token service's HTTP endpoints (an axum router the composition root serves on
//! `[identity] listen`): OpenID discovery, JWKS, token (RFC 6749), introspection (RFC 7662),
//! revocation (RFC 7009), userinfo, and the authorization endpoint with its login page
//! (authorization code with PKCE, S256 only).
//!
//! Every endpoint that takes a secret is limited per client address; password checks also per
//! username. Errors are RFC 6749 JSON (`error`, `error_description`) and never echo a secret.

use std::net::SocketAddr;
use std::sync::Arc;

use axum::extract::{ConnectInfo, Query, State};
use axum::http::{header, HeaderMap, HeaderValue, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use axum::{Form, Json, Router};
use base64::Engine as _;
use serde_json::json;

use crate::tokens::{CodeRec, OAuthError};
use crate::Identity;

pub fn router(id: Arc<Identity>) -> Router {
    Router::new()
        .route("/.well-known/openid-configuration", get(discovery))
        .route("/.well-known/oauth-authorization-server", get(discovery))
        .route("/oauth2/jwks", get(jwks))
        .route("/.well-known/jwks.json", get(jwks))
        .route("/oauth2/token", post(token))
        .route("/oauth2/introspect", post(introspect))
        .route("/oauth2/revoke", post(revoke))
        .route("/oauth2/userinfo", get(userinfo).post(userinfo))
        .route(
            "/oauth2/authorize",
            get(authorize_page).post(authorize_submit),
        )
        .route("/session/login", get(session_page).post(session_login))
        .route("/session/logout", post(session_logout))
        .route("/session", get(session_info))
        .with_state(id)
}

impl IntoResponse for OAuthError {
    fn into_response(self) -> Response {
        let status = StatusCode::from_u16(self.status).unwrap_or(StatusCode::BAD_REQUEST);
        let mut resp = (
            status,
            Json(json!({"error": self.error, "error_description": self.description})),
        )
            .into_response();
        let h = resp.headers_mut();
        h.insert(header::CACHE_CONTROL, HeaderValue::from_static("no-store"));
        if status == StatusCode::UNAUTHORIZED {
            h.insert(
                header::WWW_AUTHENTICATE,
                HeaderValue::from_static("Basic realm=\"gantry\""),
            );
        }
        if let Some(s) = self.retry_after {
            if let Ok(v) = HeaderValue::from_str(&s.to_string()) {
                h.insert(header::RETRY_AFTER, v);
            }
        }
        resp
    }
}

async fn discovery(State(id): State<Arc<Identity>>) -> Response {
    let i = id.issuer();
    let alg = id.config().algorithm.as_str();
    let mut resp = Json(json!({
        "issuer": i,
        "authorization_endpoint": format!("{i}/oauth2/authorize"),
        "token_endpoint": format!("{i}/oauth2/token"),
        "jwks_uri": format!("{i}/oauth2/jwks"),
        "userinfo_endpoint": format!("{i}/oauth2/userinfo"),
        "introspection_endpoint": format!("{i}/oauth2/introspect"),
        "revocation_endpoint": format!("{i}/oauth2/revoke"),
        "response_types_supported": ["code"],
        "response_modes_supported": ["query"],
        "grant_types_supported": crate::directory::GRANTS,
        "subject_types_supported": ["public"],
        "id_token_signing_alg_values_supported": [alg],
        "token_endpoint_auth_methods_supported": ["client_secret_basic", "client_secret_post", "none"],
        "introspection_endpoint_auth_methods_supported": ["client_secret_basic", "client_secret_post"],
        "revocation_endpoint_auth_methods_supported": ["client_secret_basic", "client_secret_post", "none"],
        "code_challenge_methods_supported": ["S256"],
        "scopes_supported": ["openid", "profile", "offline_access"],
        "claims_supported": ["iss", "sub", "aud", "exp", "iat", "auth_time", "nonce", "roles", "scope", "client_id"],
        "authorization_response_iss_parameter_supported": true,
    }))
    .into_response();
    resp.headers_mut().insert(
        header::CACHE_CONTROL,
        HeaderValue::from_static("public, max-age=300"),
    );
    resp
}

async fn jwks(State(id): State<Arc<Identity>>) -> Response {
    let mut resp = Json(id.jwks()).into_response();
    // Short: a verifier that caches the set still learns of a new key well within the
    // propagation delay (60 s by default).
    resp.headers_mut().insert(
        header::CACHE_CONTROL,
        HeaderValue::from_static("public, max-age=15"),
    );
    resp.headers_mut().insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static("application/jwk-set+json"),
    );
    resp
}

/// The form's parameters; a parameter given twice is refused (RFC 6749 3.1, 3.2).
struct Params(Vec<(String, String)>);

impl Params {
    fn parse(
        form: Result<Form<Vec<(String, String)>>, axum::extract::rejection::FormRejection>,
    ) -> Result<Self, OAuthError> {
        let Form(v) = form.map_err(|e| {
            OAuthError::invalid_request(format!(
                "expected an application/x-www-form-urlencoded body: {}",
                e.body_text()
            ))
        })?;
        for (i, (k, _)) in v.iter().enumerate() {
            if v[..i].iter().any(|(k2, _)| k2 == k) {
                return Err(OAuthError::invalid_request(format!(
                    "parameter {k:?} is given more than once"
                )));
            }
        }
        Ok(Params(v))
    }

    fn get(&self, k: &str) -> Option<&str> {
        self.0
            .iter()
            .find(|(n, _)| n == k)
            .map(|(_, v)| v.as_str())
            .filter(|v| !v.is_empty())
    }

    fn need(&self, k: &str) -> Result<&str, OAuthError> {
        self.get(k)
            .ok_or_else(|| OAuthError::invalid_request(format!("missing parameter {k:?}")))
    }
}

/// `client_secret_basic` (RFC 6749 2.3.1: form-urlencoded id and secret in Basic) or
/// `client_secret_post`, or a public client's bare `client_id`. Both at once is refused.
fn client_credentials(
    headers: &HeaderMap,
    p: &Params,
) -> Result<(String, Option<String>), OAuthError> {
    let basic = headers
        .get(header::AUTHORIZATION)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| {
            let (scheme, rest) = v.split_once(' ')?;
            scheme.eq_ignore_ascii_case("basic").then_some(rest.trim())
        });
    match (basic, p.get("client_secret")) {
        (Some(_), Some(_)) => Err(OAuthError::invalid_request(
            "give the client's credentials once: in Authorization or in the body, not both",
        )),
        (Some(b), None) => {
            let raw = base64::engine::general_purpose::STANDARD
                .decode(b)
                .map_err(|_| OAuthError::invalid_client())?;
            let s = String::from_utf8(raw).map_err(|_| OAuthError::invalid_client())?;
            let (u, pw) = s.split_once(':').ok_or_else(OAuthError::invalid_client)?;
            let dec = |x: &str| form_decode(x).ok_or_else(OAuthError::invalid_client);
            Ok((dec(u)?, Some(dec(pw)?)))
        }
        (None, secret) => Ok((
            p.need("client_id")
                .map_err(|_| OAuthError::invalid_client())?
                .to_string(),
            secret.map(str::to_string),
        )),
    }
}

/// Decode `application/x-www-form-urlencoded` text (`+` is a space); a malformed escape is an
/// error (client credentials are refused rather than guessed at).
fn form_decode(s: &str) -> Option<String> {
    let b = s.as_bytes();
    let bad_escape = b.iter().enumerate().any(|(i, c)| {
        *c == b'%'
            && !b
                .get(i + 1..i + 3)
                .is_some_and(|h| h.iter().all(u8::is_ascii_hexdigit))
    });
    if bad_escape {
        return None;
    }
    percent_encoding::percent_decode_str(&s.replace('+', " "))
        .decode_utf8()
        .ok()
        .map(|c| c.into_owned())
}

/// The client's address (for attempt limits): the connection's peer, or, when the peer is this
/// machine (the gateway, under `gateway_path`), the address the gateway appended to
/// `X-Forwarded-For`, so that clients behind the gateway do not share one limit.
struct Remote(Option<std::net::IpAddr>);

impl<S: Send + Sync> axum::extract::FromRequestParts<S> for Remote {
    type Rejection = std::convert::Infallible;
    async fn from_request_parts(
        parts: &mut axum::http::request::Parts,
        _: &S,
    ) -> Result<Self, Self::Rejection> {
        let peer = parts
            .extensions
            .get::<ConnectInfo<SocketAddr>>()
            .map(|c| c.0.ip());
        let forwarded = peer
            .filter(std::net::IpAddr::is_loopback)
            .and_then(|_| parts.headers.get("x-forwarded-for"))
            .and_then(|v| v.to_str().ok())
            .and_then(|s| s.rsplit(',').next())
            .and_then(|s| s.trim().parse::<std::net::IpAddr>().ok());
        Ok(Remote(forwarded.or(peer)))
    }
}

impl Remote {
    fn ip(&self) -> String {
        self.0.map_or_else(|| "?".into(), |a| a.to_string())
    }
}

fn no_store(mut resp: Response) -> Response {
    let h = resp.headers_mut();
    h.insert(header::CACHE_CONTROL, HeaderValue::from_static("no-store"));
    h.insert(header::PRAGMA, HeaderValue::from_static("no-cache"));
    resp
}

async fn token(
    State(id): State<Arc<Identity>>,
    remote: Remote,
    headers: HeaderMap,
    form: Result<Form<Vec<(String, String)>>, axum::extract::rejection::FormRejection>,
) -> Response {
    let grant_label;
    let r = async {
        let (c, p) = client_call(&id, &remote, &headers, form, false).await?;
        let grant = p.need("grant_type")?.to_string();
        let scope = p.get("scope");
        let resp = match grant.as_str() {
            "client_credentials" => id.client_credentials(&c, scope).await,
            "password" => {
                id.password(&c, p.need("username")?, p.need("password")?, scope)
                    .await
            }
            "refresh_token" => id.refresh(&c, p.need("refresh_token")?, scope).await,
            "authorization_code" => {
                id.authorization_code(
                    &c,
                    p.need("code")?,
                    p.get("redirect_uri"),
                    p.get("code_verifier"),
                )
                .await
            }
            other => Err(OAuthError::new(
                400,
                "unsupported_grant_type",
                format!("grant type {other:?} is not supported"),
            )),
        };
        resp.map(|r| (grant, r))
    }
    .await;
    match r {
        Ok((grant, t)) => {
            grant_label = crate::directory::GRANTS
                .iter()
                .find(|g| **g == grant)
                .copied()
                .unwrap_or("other");
            id.count(grant_label, "ok");
            no_store(Json(t).into_response())
        }
        Err(e) => {
            id.count("any", e.error);
            if matches!(e.error, "invalid_client" | "invalid_grant") {
                id.limiter.address_failed(&remote.ip());
            }
            e.into_response()
        }
    }
}

async fn introspect(
    State(id): State<Arc<Identity>>,
    remote: Remote,
    headers: HeaderMap,
    form: Result<Form<Vec<(String, String)>>, axum::extract::rejection::FormRejection>,
) -> Response {
    let r = async {
        // Only confidential clients may introspect (RFC 7662 2.1: the caller is authorized).
        let (_, p) = client_call(&id, &remote, &headers, form, true).await?;
        id.introspect(p.need("token")?).await
    }
    .await;
    answer(&id, &remote, r, |v| Json(v).into_response())
}

async fn revoke(
    State(id): State<Arc<Identity>>,
    remote: Remote,
    headers: HeaderMap,
    form: Result<Form<Vec<(String, String)>>, axum::extract::rejection::FormRejection>,
) -> Response {
    let r = async {
        let (c, p) = client_call(&id, &remote, &headers, form, false).await?;
        id.revoke_token(&c, p.need("token")?).await
    }
    .await;
    // RFC 7009 2.2: 200 whether or not the token was known.
    answer(&id, &remote, r, |()| StatusCode::OK.into_response())
}

/// What every endpoint a client calls starts with: the address's attempt limit, the form, the
/// client's credentials (`confidential`: a secret is required).
async fn client_call(
    id: &Identity,
    remote: &Remote,
    headers: &HeaderMap,
    form: Result<Form<Vec<(String, String)>>, axum::extract::rejection::FormRejection>,
    confidential: bool,
) -> Result<(crate::Client, Params), OAuthError> {
    id.limiter
        .address(&remote.ip())
        .map_err(OAuthError::slow_down)?;
    let p = Params::parse(form)?;
    let (cid, secret) = client_credentials(headers, &p)?;
    if confidential && secret.is_none() {
        return Err(OAuthError::invalid_client());
    }
    let c = id.authenticate_client(&cid, secret.as_deref()).await?;
    Ok((c, p))
}

/// The answer to a call a client authenticates: a failed authentication counts against the
/// client's address.
fn answer<T>(
    id: &Identity,
    remote: &Remote,
    r: Result<T, OAuthError>,
    ok: impl FnOnce(T) -> Response,
) -> Response {
    match r {
        Ok(v) => no_store(ok(v)),
        Err(e) => {
            if e.error == "invalid_client" {
                id.limiter.address_failed(&remote.ip());
            }
            e.into_response()
        }
    }
}

async fn userinfo(State(id): State<Arc<Identity>>, headers: HeaderMap) -> Response {
    let token = headers
        .get(header::AUTHORIZATION)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.strip_prefix("Bearer "));
    let bad = |e: &str| {
        let mut r = (
            StatusCode::UNAUTHORIZED,
            Json(json!({"error": "invalid_token", "error_description": e})),
        )
            .into_response();
        r.headers_mut().insert(
            header::WWW_AUTHENTICATE,
            HeaderValue::from_static("Bearer realm=\"gantry\", error=\"invalid_token\""),
        );
        r
    };
    let Some(t) = token else {
        return bad("a bearer access token is required");
    };
    match id.verify(t.trim()) {
        Ok(v) if v.issuer == id.issuer() && v.kind == gantry_authn::Kind::User => no_store(
            Json(json!({"sub": v.subject, "preferred_username": v.subject, "roles": v.roles}))
                .into_response(),
        ),
        Ok(_) => bad("not a user's access token from this issuer"),
        Err(d) => bad(d.describe()),
    }
}

// ── authorization endpoint and login page ────────────────────────────────────────────────────

fn esc(s: &str) -> String {
    s.replace('&', "&amp;")
        .replace('<', "&lt;")
        .replace('>', "&gt;")
        .replace('"', "&quot;")
        .replace('\'', "&#39;")
}

fn page(status: StatusCode, body: String) -> Response {
    let html = format!(
        "<!doctype html><html lang=\"en\"><head><meta charset=\"utf-8\"><meta name=\"viewport\" content=\"width=device-width\"><title>Sign in · Gantry</title>\
<style>body{{font-family:system-ui,sans-serif;max-width:22rem;margin:4rem auto;padding:0 1rem}}label{{display:block;margin:.8rem 0 .2rem}}input{{width:100%;padding:.4rem;box-sizing:border-box}}button{{margin-top:1rem;padding:.5rem 1rem}}.err{{color:#a00}}</style></head>\
<body><main>{body}</main></body></html>"
    );
    let mut r = (status, html).into_response();
    let h = r.headers_mut();
    h.insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static("text/html; charset=utf-8"),
    );
    h.insert(header::CACHE_CONTROL, HeaderValue::from_static("no-store"));
    h.insert(
        header::CONTENT_SECURITY_POLICY,
        HeaderValue::from_static("default-src 'none'; style-src 'unsafe-inline'; form-action 'self'; frame-ancestors 'none'"),
    );
    h.insert(header::X_FRAME_OPTIONS, HeaderValue::from_static("DENY"));
    h.insert(
        header::REFERRER_POLICY,
        HeaderValue::from_static("no-referrer"),
    );
    r
}

/// A checked authorization request.
struct AuthzReq {
    client_id: String,
    redirect_uri: String,
    scope: Vec<String>,
    state: Option<String>,
    challenge: String,
    nonce: Option<String>,
}

const AUTHZ_FIELDS: [&str; 7] = [
    "client_id",
    "redirect_uri",
    "response_type",
    "scope",
    "state",
    "code_challenge",
    "code_challenge_method",
];

/// Errors before the redirect URI is known to be the client's are shown on the page (never
/// redirected: RFC 6749 4.1.2.1); later ones go back to the client.
enum AuthzError {
    Page(String),
    Redirect {
        uri: String,
        state: Option<String>,
        error: &'static str,
        description: String,
    },
}

async fn check_authz(id: &Identity, p: &[(String, String)]) -> Result<AuthzReq, AuthzError> {
    let get = |k: &str| {
        p.iter()
            .find(|(n, _)| n == k)
            .map(|(_, v)| v.clone())
            .filter(|v| !v.is_empty())
    };
    let Some(cid) = get("client_id") else {
        return Err(AuthzError::Page(
            "the request names no client (client_id)".into(),
        ));
    };
    let c = match id.client(&cid).await {
        Ok(Some(c)) => c,
        _ => return Err(AuthzError::Page(format!("unknown client {:?}", cid))),
    };
    let redirect_uri = match get("redirect_uri") {
        Some(u) if c.redirect_uris.contains(&u) => u,
        Some(_) => {
            return Err(AuthzError::Page(
                "redirect_uri is not one of the client's registered redirect URIs".into(),
            ))
        }
        None if c.redirect_uris.len() == 1 => c.redirect_uris[0].clone(),
        None => return Err(AuthzError::Page("redirect_uri is required".into())),
    };
    let state = get("state");
    let back = |error: &'static str, d: &str| AuthzError::Redirect {
        uri: redirect_uri.clone(),
        state: state.clone(),
        error,
        description: d.to_string(),
    };
    if !c.grant_types.iter().any(|g| g == "authorization_code") {
        return Err(back(
            "unauthorized_client",
            "the client may not use the authorization code flow",
        ));
    }
    if get("response_type").as_deref() != Some("code") {
        return Err(back(
            "unsupported_response_type",
            "only response_type=code is supported",
        ));
    }
    let Some(challenge) = get("code_challenge") else {
        return Err(back(
            "invalid_request",
            "PKCE is required: give code_challenge (S256)",
        ));
    };
    if get("code_challenge_method").as_deref() != Some("S256") {
        return Err(back(
            "invalid_request",
            "code_challenge_method must be S256",
        ));
    }
    if challenge.len() != 43 || gantry_authn::b64url_decode(&challenge).is_none() {
        return Err(back(
            "invalid_request",
            "code_challenge must be a base64url SHA-256",
        ));
    }
    let scope = match id.granted(&c, get("scope").as_deref(), true) {
        Ok(s) => s,
        Err(e) => return Err(back("invalid_scope", &e.description)),
    };
    Ok(AuthzReq {
        client_id: cid,
        redirect_uri,
        scope,
        state,
        challenge,
        nonce: get("nonce"),
    })
}

fn redirect_with(uri: &str, params: &[(&str, &str)]) -> Response {
    let mut u = uri.to_string();
    let mut sep = if u.contains('?') { '&' } else { '?' };
    for (k, v) in params {
        u.push(sep);
        u.push_str(k);
        u.push('=');
        u.push_str(&pct(v));
        sep = '&';
    }
    let mut r = StatusCode::FOUND.into_response();
    if let Ok(v) = HeaderValue::from_str(&u) {
        r.headers_mut().insert(header::LOCATION, v);
    }
    r.headers_mut()
        .insert(header::CACHE_CONTROL, HeaderValue::from_static("no-store"));
    r
}

/// Characters kept as they are in a query value: RFC 3986's unreserved ones.
const QUERY_VALUE: &percent_encoding::AsciiSet = &percent_encoding::NON_ALPHANUMERIC
    .remove(b'-')
    .remove(b'_')
    .remove(b'.')
    .remove(b'~');

fn pct(s: &str) -> String {
    percent_encoding::utf8_percent_encode(s, QUERY_VALUE).to_string()
}

fn authz_error(id: &Identity, e: AuthzError) -> Response {
    match e {
        AuthzError::Page(m) => page(
            StatusCode::BAD_REQUEST,
            format!("<h1>Cannot sign in</h1><p class=\"err\">{}</p>", esc(&m)),
        ),
        AuthzError::Redirect {
            uri,
            state,
            error,
            description,
        } => {
            let mut p = vec![
                ("error", error),
                ("error_description", description.as_str()),
                ("iss", id.issuer()),
            ];
            if let Some(s) = &state {
                p.push(("state", s));
            }
            redirect_with(&uri, &p)
        }
    }
}

fn login_form(p: &[(String, String)], error: Option<&str>) -> String {
    let mut hidden = String::new();
    for f in AUTHZ_FIELDS.iter().chain(["nonce"].iter()) {
        if let Some((_, v)) = p.iter().find(|(n, _)| n == f) {
            hidden.push_str(&format!(
                "<input type=\"hidden\" name=\"{}\" value=\"{}\">",
                f,
                esc(v)
            ));
        }
    }
    let client = p
        .iter()
        .find(|(n, _)| n == "client_id")
        .map(|(_, v)| esc(v))
        .unwrap_or_default();
    let err = error
        .map(|e| format!("<p class=\"err\" role=\"alert\">{}</p>", esc(e)))
        .unwrap_or_default();
    format!(
        "<h1>Sign in</h1><p>to continue to <strong>{client}</strong></p>{err}\
<form method=\"post\" action=\"authorize\">{hidden}\
<label for=\"username\">Username</label><input id=\"username\" name=\"username\" autocomplete=\"username\" required autofocus>\
<label for=\"password\">Password</label><input id=\"password\" name=\"password\" type=\"password\" autocomplete=\"current-password\" required>\
<button type=\"submit\">Sign in</button></form>"
    )
}

async fn authorize_page(
    State(id): State<Arc<Identity>>,
    Query(p): Query<Vec<(String, String)>>,
) -> Response {
    match check_authz(&id, &p).await {
        Ok(_) => page(StatusCode::OK, login_form(&p, None)),
        Err(e) => authz_error(&id, e),
    }
}

async fn authorize_submit(
    State(id): State<Arc<Identity>>,
    remote: Remote,
    headers: HeaderMap,
    form: Result<Form<Vec<(String, String)>>, axum::extract::rejection::FormRejection>,
) -> Response {
    if !same_origin(&headers) {
        return cross_site();
    }
    let Ok(Form(p)) = form else {
        return page(
            StatusCode::BAD_REQUEST,
            "<h1>Cannot sign in</h1><p class=\"err\">the form could not be read</p>".into(),
        );
    };
    let req = match check_authz(&id, &p).await {
        Ok(r) => r,
        Err(e) => return authz_error(&id, e),
    };
    let user = match sign_in(&id, &remote, &p, |e| login_form(&p, Some(e))).await {
        Ok(u) => u,
        Err(page) => return page,
    };
    let now = gantry_authn::now_secs();
    let rec = CodeRec {
        client_id: req.client_id,
        redirect_uri: req.redirect_uri.clone(),
        subject: user.username,
        scopes: req.scope,
        challenge: req.challenge,
        nonce: req.nonce,
        auth_time: now,
        expires: now + 60,
    };
    match id.new_code(&rec).await {
        Ok(code) => {
            let mut params = vec![("code", code.as_str()), ("iss", id.issuer())];
            if let Some(s) = &req.state {
                params.push(("state", s));
            }
            redirect_with(&req.redirect_uri, &params)
        }
        Err(e) => e.into_response(),
    }
}

// ── browser sessions ─────────────────────────────────────────────────────────────────────────

/// Login forms refuse cross-site submissions (login CSRF: signing a victim's browser in as the
/// attacker): a browser's `Origin` (or, without it, `Referer`) must name the host the form was
/// posted to. Clients that are not browsers send neither and are not affected.
fn same_origin(headers: &HeaderMap) -> bool {
    let host = headers.get(header::HOST).and_then(|v| v.to_str().ok());
    let from = headers
        .get(header::ORIGIN)
        .or_else(|| headers.get(header::REFERER))
        .and_then(|v| v.to_str().ok());
    match (from, host) {
        (None, _) => true,
        (Some(f), Some(h)) => f
            .split_once("://")
            .map(|(_, rest)| rest.split('/').next().unwrap_or(""))
            .is_some_and(|authority| authority.eq_ignore_ascii_case(h)),
        (Some(_), None) => false,
    }
}

fn cross_site() -> Response {
    page(
        StatusCode::FORBIDDEN,
        "<h1>Cannot sign in</h1><p class=\"err\">This form was submitted from another site.</p>"
            .into(),
    )
}

/// Where to send the browser after a login or logout: a path on this site only (no scheme, no
/// `//host`, no backslash), so the endpoint cannot be used to redirect elsewhere.
fn local_path(p: Option<&str>) -> Option<String> {
    let p = p?;
    let ok = p.starts_with('/')
        && !p.starts_with("//")
        && !p.contains('\\')
        && p.len() <= 2048
        && !p.chars().any(|c| c.is_control() || c.is_whitespace());
    ok.then(|| p.to_string())
}

fn session_form(return_to: Option<&str>, error: Option<&str>) -> String {
    let err = error
        .map(|e| format!("<p class=\"err\" role=\"alert\">{}</p>", esc(e)))
        .unwrap_or_default();
    let back = return_to
        .map(|r| {
            format!(
                "<input type=\"hidden\" name=\"return_to\" value=\"{}\">",
                esc(r)
            )
        })
        .unwrap_or_default();
    format!(
        "<h1>Sign in</h1>{err}<form method=\"post\" action=\"login\">{back}\
<label for=\"username\">Username</label><input id=\"username\" name=\"username\" autocomplete=\"username\" required autofocus>\
<label for=\"password\">Password</label><input id=\"password\" name=\"password\" type=\"password\" autocomplete=\"current-password\" required>\
<button type=\"submit\">Sign in</button></form>"
    )
}

async fn session_page(Query(p): Query<Vec<(String, String)>>) -> Response {
    let back = local_path(
        p.iter()
            .find(|(k, _)| k == "return_to")
            .map(|(_, v)| v.as_str()),
    );
    page(StatusCode::OK, session_form(back.as_deref(), None))
}

fn session_cookie(value: &str, max_age: u64) -> HeaderValue {
    HeaderValue::from_str(&format!(
        "{}={value}; Path=/; HttpOnly; Secure; SameSite=Lax; Max-Age={max_age}",
        gantry_authn::SESSION_COOKIE
    ))
    .unwrap_or(HeaderValue::from_static(
        "gantry_session=; Path=/; Max-Age=0",
    ))
}

/// A login form's check: the address's attempt limit, the password (the user's limit), a
/// failure counted against the address; refusals are the form again (`form`, with the message)
/// with 401 or 429 and `Retry-After`.
async fn sign_in(
    id: &Identity,
    remote: &Remote,
    p: &[(String, String)],
    form: impl Fn(&str) -> String,
) -> Result<crate::User, Response> {
    let field = |k: &str| {
        p.iter()
            .find(|(n, _)| n == k)
            .map_or("", |(_, v)| v.as_str())
    };
    let checked = match id.limiter.address(&remote.ip()) {
        Err(secs) => Err(OAuthError::slow_down(secs)),
        Ok(()) => id.check_user(field("username"), field("password")).await,
    };
    checked.map_err(|e| {
        let mut r = match e.retry_after {
            Some(_) => page(
                StatusCode::TOO_MANY_REQUESTS,
                form("Too many attempts; wait a moment and try again."),
            ),
            None => {
                id.limiter.address_failed(&remote.ip());
                page(
                    StatusCode::UNAUTHORIZED,
                    form("Invalid username or password."),
                )
            }
        };
        if let Some(v) = e
            .retry_after
            .and_then(|s| HeaderValue::from_str(&s.to_string()).ok())
        {
            r.headers_mut().insert(header::RETRY_AFTER, v);
        }
        r
    })
}

fn see_other(to: &str) -> Response {
    let mut r = StatusCode::SEE_OTHER.into_response();
    if let Ok(v) = HeaderValue::from_str(to) {
        r.headers_mut().insert(header::LOCATION, v);
    }
    r
}

async fn session_login(
    State(id): State<Arc<Identity>>,
    remote: Remote,
    headers: HeaderMap,
    form: Result<Form<Vec<(String, String)>>, axum::extract::rejection::FormRejection>,
) -> Response {
    if !same_origin(&headers) {
        return cross_site();
    }
    let Ok(Form(p)) = form else {
        return page(
            StatusCode::BAD_REQUEST,
            session_form(None, Some("The form could not be read.")),
        );
    };
    let field = |k: &str| p.iter().find(|(n, _)| n == k).map(|(_, v)| v.as_str());
    let back = local_path(field("return_to"));
    let user = match sign_in(&id, &remote, &p, |e| session_form(back.as_deref(), Some(e))).await {
        Ok(u) => u,
        Err(page) => return page,
    };
    let (cookie, rec) = match id.create_session(&user.username, user.roles.clone()).await {
        Ok(s) => s,
        Err(e) => return OAuthError::server(e).into_response(),
    };
    let mut r = match back {
        Some(to) => see_other(&to),
        None => Json(json!({"username": rec.username, "roles": rec.roles, "expires": rec.expires}))
            .into_response(),
    };
    r.headers_mut().insert(
        header::SET_COOKIE,
        session_cookie(&cookie, rec.expires.saturating_sub(rec.created)),
    );
    no_store(r)
}

fn cookie_of(headers: &HeaderMap) -> Option<String> {
    headers
        .get_all(header::COOKIE)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(';'))
        .find_map(|kv| {
            let (k, v) = kv.trim().split_once('=')?;
            (k == gantry_authn::SESSION_COOKIE).then(|| v.to_string())
        })
}

async fn session_logout(
    State(id): State<Arc<Identity>>,
    Query(q): Query<Vec<(String, String)>>,
    headers: HeaderMap,
) -> Response {
    if !same_origin(&headers) {
        return cross_site();
    }
    let ended = match cookie_of(&headers) {
        Some(c) => match id.end_session(&c).await {
            Ok(e) => e,
            Err(e) => return OAuthError::server(e).into_response(),
        },
        None => false,
    };
    let back = local_path(
        q.iter()
            .find(|(k, _)| k == "return_to")
            .map(|(_, v)| v.as_str()),
    );
    let mut r = match back {
        Some(to) => see_other(&to),
        None => Json(json!({"logged_out": ended})).into_response(),
    };
    r.headers_mut()
        .insert(header::SET_COOKIE, session_cookie("", 0));
    no_store(r)
}

async fn session_info(State(id): State<Arc<Identity>>, headers: HeaderMap) -> Response {
    match cookie_of(&headers).and_then(|c| id.session_of(&c)) {
        Some(s) => no_store(
            Json(json!({"username": s.identity.subject, "roles": s.identity.roles, "expires": s.expires}))
                .into_response(),
        ),
        None => (
            StatusCode::UNAUTHORIZED,
            Json(json!({"error": "invalid_session", "error_description": "no live session; sign in at /session/login"})),
        )
            .into_response(),
    }
}

impl Identity {
    fn count(&self, grant: &'static str, result: &'static str) {
        self.metrics
            .tokens
            .get_or_create(&crate::GrantLabels { grant, result })
            .inc();
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn form_decoding_and_escaping() {
        assert_eq!(form_decode("a%3Ab+c").as_deref(), Some("a:b c"));
        assert_eq!(form_decode("%zz"), None);
        assert_eq!(esc("<a href=\"x\">"), "&lt;a href=&quot;x&quot;&gt;");
        assert_eq!(pct("a b&c"), "a%20b%26c");
        assert_eq!(local_path(Some("/app?x=1")).as_deref(), Some("/app?x=1"));
        for bad in ["//evil.example", "https://evil.example", "/\\evil", "app"] {
            assert_eq!(local_path(Some(bad)), None, "{bad}");
        }
        let h = |pairs: &[(&'static str, &'static str)]| {
            let mut m = HeaderMap::new();
            for (k, v) in pairs {
                m.insert(*k, HeaderValue::from_static(v));
            }
            m
        };
        assert!(same_origin(&h(&[("host", "id.example:7072")])));
        assert!(same_origin(&h(&[
            ("host", "id.example:7072"),
            ("origin", "https://id.example:7072")
        ])));
        assert!(same_origin(&h(&[
            ("host", "id.example"),
            ("referer", "https://id.example/oauth2/authorize?x")
        ])));
        assert!(!same_origin(&h(&[
            ("host", "id.example"),
            ("origin", "https://evil.example")
        ])));
        assert!(!same_origin(&h(&[
            ("host", "id.example"),
            ("origin", "null")
        ])));
    }
}
