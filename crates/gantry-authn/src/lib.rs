//! Verifying credentials, with no I/O: what the gateway runs on every request that a route asks
//! to authenticate, and what the identity service and the admin API use to read the tokens they
//! issued.
//!
//! - [`Material`]: everything a verifier trusts, as of one moment — issuers and their keys
//!   ([`KeySet`], from JWKS documents), revoked token ids, API keys (by their SHA-256), and the
//!   service-to-service call policy. Identity builds it; the gateway swaps it in whole.
//! - [`verify_jwt`]: a compact JWS checked step by step, each failure a [`Denial`] with a reason
//!   (never a panic): size, shape, algorithm (asymmetric only: `none` and HMAC are refused, so no
//!   algorithm confusion), `crit`, embedded keys (`jwk`, `jku`, `x5u`, `x5c` are refused, never
//!   followed), the issuer (from the trusted list), the key (by `kid`, with its own algorithm:
//!   a token cannot pick another), the signature (ring, through `jsonwebtoken`), then `exp`,
//!   `nbf` and revocation.
//! - [`Requirement`]: what a route asks of a verified [`Identity`] (issuers, audiences, scopes,
//!   roles, claims), [`Requirement::check`] says why not.
//! - [`Cache`]: verified tokens per thread, so a token seen again costs a hash lookup, not a
//!   signature check; an entry is used only under the material it was verified with and until
//!   its token expires.
//!
//! No cryptography is written here: signatures are `jsonwebtoken`'s (ring underneath), digests
//! and constant-time comparisons ring's and `subtle`'s.

use std::cell::RefCell;
use std::collections::{HashMap, HashSet};
use std::fmt;
use std::sync::Arc;
use std::time::{SystemTime, UNIX_EPOCH};

use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use base64::Engine as _;
use jsonwebtoken::jwk::{AlgorithmParameters, EllipticCurve, Jwk, KeyAlgorithm};
use jsonwebtoken::{Algorithm, DecodingKey};
use serde::Deserialize;
use serde_json::{Map, Value};

/// The largest token accepted (bytes). Real access tokens are well under 2 KiB.
pub const MAX_TOKEN_BYTES: usize = 8 * 1024;

/// Clock skew tolerated on `exp` and `nbf` (seconds).
pub const LEEWAY_SECS: u64 = 30;

/// Names of the claims Gantry puts in a workload's credential.
pub const CLAIM_SERVICE: &str = "gantry_service";
pub const CLAIM_VERSION: &str = "gantry_version";
pub const CLAIM_INSTANCE: &str = "gantry_instance";

/// Base64url without padding (JOSE's encoding).
pub fn b64url(bytes: &[u8]) -> String {
    URL_SAFE_NO_PAD.encode(bytes)
}

/// Decode base64url without padding.
pub fn b64url_decode(s: &str) -> Option<Vec<u8>> {
    URL_SAFE_NO_PAD.decode(s).ok()
}

/// SHA-256 of a secret (API keys, client secrets, refresh tokens: high-entropy values stored
/// and looked up by digest).
pub fn digest(secret: &str) -> [u8; 32] {
    let d = ring::digest::digest(&ring::digest::SHA256, secret.as_bytes());
    let mut out = [0u8; 32];
    out.copy_from_slice(d.as_ref());
    out
}

/// Constant-time equality of two byte strings (the lengths are not secret).
pub fn constant_time_eq(a: &[u8], b: &[u8]) -> bool {
    use subtle::ConstantTimeEq as _;
    a.len() == b.len() && bool::from(a.ct_eq(b))
}

/// Seconds since the Unix epoch.
pub fn now_secs() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_secs())
}

/// Why a credential was not accepted (401). `as_str` is the reason in bodies and metrics.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Denial {
    /// No credential, on a route that requires one.
    Missing,
    /// The `Authorization` header is not `Bearer <token>` (or `ApiKey <key>`).
    BadScheme,
    TooLarge,
    /// Not three base64url parts with JSON header and payload.
    Malformed,
    /// `none`, HMAC, or an algorithm the key is not for.
    AlgorithmNotAllowed,
    /// A `crit` header: no extension is understood, so the token must be refused (RFC 7515 4.1.11).
    CriticalHeader,
    /// `jwk`, `jku`, `x5u` or `x5c`: keys are never taken from the token itself.
    EmbeddedKey,
    /// No trusted issuer has that `iss`.
    UntrustedIssuer,
    /// The issuer has no key with that `kid` (or the token names none).
    UnknownKey,
    BadSignature,
    Expired,
    NotYetValid,
    Revoked,
    /// The route accepts other issuers only.
    WrongIssuer,
    /// The token is not meant for this route's audience.
    WrongAudience,
    /// An API key no client has.
    InvalidApiKey,
    /// A session cookie that names no live session.
    InvalidSession,
    /// Not an access token (an ID token, say).
    WrongTokenType,
}

impl Denial {
    pub fn as_str(self) -> &'static str {
        match self {
            Denial::Missing => "missing_credentials",
            Denial::BadScheme => "bad_authorization_scheme",
            Denial::TooLarge => "token_too_large",
            Denial::Malformed => "malformed_token",
            Denial::AlgorithmNotAllowed => "algorithm_not_allowed",
            Denial::CriticalHeader => "critical_header",
            Denial::EmbeddedKey => "embedded_key",
            Denial::UntrustedIssuer => "untrusted_issuer",
            Denial::UnknownKey => "unknown_key",
            Denial::BadSignature => "bad_signature",
            Denial::Expired => "expired",
            Denial::NotYetValid => "not_yet_valid",
            Denial::Revoked => "revoked",
            Denial::WrongIssuer => "wrong_issuer",
            Denial::WrongAudience => "wrong_audience",
            Denial::InvalidApiKey => "invalid_api_key",
            Denial::InvalidSession => "invalid_session",
            Denial::WrongTokenType => "wrong_token_type",
        }
    }

    /// A sentence for the JSON body and `error_description`.
    pub fn describe(self) -> &'static str {
        match self {
            Denial::Missing => "this route requires credentials: a bearer token or an API key",
            Denial::BadScheme => "the Authorization header must be 'Bearer <token>' or 'ApiKey <key>'",
            Denial::TooLarge => "the token is larger than 8 KiB",
            Denial::Malformed => "the token is not a compact JWS (three base64url parts, JSON header and payload)",
            Denial::AlgorithmNotAllowed => "the token's algorithm is not allowed (asymmetric signatures only, the key's own algorithm)",
            Denial::CriticalHeader => "the token has a 'crit' header naming extensions this verifier does not understand",
            Denial::EmbeddedKey => "the token carries or points to its own key (jwk, jku, x5u, x5c); keys come only from trusted issuers",
            Denial::UntrustedIssuer => "the token's issuer is not trusted",
            Denial::UnknownKey => "the token's key id is not one of its issuer's keys",
            Denial::BadSignature => "the token's signature does not verify",
            Denial::Expired => "the token has expired",
            Denial::NotYetValid => "the token is not valid yet",
            Denial::Revoked => "the token has been revoked",
            Denial::WrongIssuer => "this route does not accept tokens from the token's issuer",
            Denial::WrongAudience => "the token is not meant for this route's audience",
            Denial::InvalidApiKey => "the API key is not valid",
            Denial::InvalidSession => "the session has ended or never existed; sign in again",
            Denial::WrongTokenType => "not an access token (typ at+jwt): ID tokens are not credentials for APIs",
        }
    }

    /// The RFC 6750 error code for `WWW-Authenticate`.
    pub fn oauth_error(self) -> Option<&'static str> {
        match self {
            Denial::Missing => None,
            Denial::BadScheme | Denial::TooLarge | Denial::Malformed => Some("invalid_request"),
            _ => Some("invalid_token"),
        }
    }
}

impl fmt::Display for Denial {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.describe())
    }
}

/// Why an authenticated caller may not do this (403).
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Forbidden {
    /// A scope the route requires is missing (named).
    InsufficientScope(String),
    /// None of the roles the route accepts.
    MissingRole,
    /// A claim the route requires has another value (named).
    ClaimMismatch(String),
    /// Service-to-service policy: the calling service may not call this one.
    CallNotAllowed { caller: String, service: String },
    /// Under the `deny` policy, a route not marked public, called from outside.
    NotPublic,
}

impl Forbidden {
    pub fn as_str(&self) -> &'static str {
        match self {
            Forbidden::InsufficientScope(_) => "insufficient_scope",
            Forbidden::MissingRole => "missing_role",
            Forbidden::ClaimMismatch(_) => "claim_mismatch",
            Forbidden::CallNotAllowed { .. } => "call_not_allowed",
            Forbidden::NotPublic => "not_public",
        }
    }
}

impl fmt::Display for Forbidden {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Forbidden::InsufficientScope(s) => write!(f, "the token lacks the scope '{s}'"),
            Forbidden::MissingRole => f.write_str("the caller has none of the roles this route accepts"),
            Forbidden::ClaimMismatch(c) => write!(f, "the token's '{c}' claim does not have the value this route requires"),
            Forbidden::CallNotAllowed { caller, service } => write!(
                f,
                "service '{caller}' may not call service '{service}' (add it to {caller}'s calls)"
            ),
            Forbidden::NotPublic => f.write_str(
                "this route is internal: under the deny policy only services allowed to call it reach it",
            ),
        }
    }
}

/// What kind of principal a credential names.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Kind {
    User,
    Client,
    /// A supervised instance (its service, version and instance are in the claims).
    Workload,
    ApiKey,
}

impl Kind {
    pub fn as_str(self) -> &'static str {
        match self {
            Kind::User => "user",
            Kind::Client => "client",
            Kind::Workload => "workload",
            Kind::ApiKey => "api_key",
        }
    }
}

/// A verified caller.
#[derive(Debug, Clone)]
pub struct Identity {
    pub kind: Kind,
    pub issuer: String,
    pub subject: String,
    pub client_id: Option<String>,
    pub scopes: Vec<String>,
    pub roles: Vec<String>,
    pub audiences: Vec<String>,
    /// `exp` (seconds since the epoch); `u64::MAX` for API keys.
    pub expires: u64,
    pub jti: Option<String>,
    /// The calling service (workload credentials only).
    pub service: Option<String>,
    /// Every claim of the token (empty for API keys).
    pub claims: Map<String, Value>,
    /// Headers a consumer derives from the identity (the gateway's `Gantry-Auth-*`), built
    /// once: a cached token pays nothing for them again.
    pub headers: std::sync::OnceLock<Vec<(http::HeaderName, http::HeaderValue)>>,
}

impl Identity {
    pub fn has_scope(&self, s: &str) -> bool {
        self.scopes.iter().any(|x| x == s)
    }
    pub fn has_role(&self, r: &str) -> bool {
        self.roles.iter().any(|x| x == r)
    }
}

/// One verification key.
#[derive(Clone)]
pub struct Key {
    pub alg: Algorithm,
    key: DecodingKey,
}

impl Key {
    /// The public key of a JWK, with the algorithm it is for: its `alg`, else what its type
    /// implies (OKP Ed25519 → EdDSA, EC P-256 → ES256, P-384 → ES384, RSA → RS256). Symmetric
    /// keys (`oct`) are refused.
    pub fn from_jwk(jwk: &Jwk) -> Result<Self, String> {
        let implied = match &jwk.algorithm {
            AlgorithmParameters::OctetKey(_) => {
                return Err("symmetric (oct) keys are not accepted".into())
            }
            AlgorithmParameters::OctetKeyPair(p) => {
                if p.curve != EllipticCurve::Ed25519 {
                    return Err(format!("unsupported OKP curve {:?}", p.curve));
                }
                Algorithm::EdDSA
            }
            AlgorithmParameters::EllipticCurve(p) => match p.curve {
                EllipticCurve::P256 => Algorithm::ES256,
                EllipticCurve::P384 => Algorithm::ES384,
                ref c => return Err(format!("unsupported EC curve {c:?}")),
            },
            AlgorithmParameters::RSA(_) => Algorithm::RS256,
        };
        let alg = match jwk.common.key_algorithm {
            None => implied,
            Some(a) => {
                let a = match a {
                    KeyAlgorithm::EdDSA => Algorithm::EdDSA,
                    KeyAlgorithm::ES256 => Algorithm::ES256,
                    KeyAlgorithm::ES384 => Algorithm::ES384,
                    KeyAlgorithm::RS256 => Algorithm::RS256,
                    KeyAlgorithm::RS384 => Algorithm::RS384,
                    KeyAlgorithm::RS512 => Algorithm::RS512,
                    KeyAlgorithm::PS256 => Algorithm::PS256,
                    KeyAlgorithm::PS384 => Algorithm::PS384,
                    KeyAlgorithm::PS512 => Algorithm::PS512,
                    other => return Err(format!("unsupported key algorithm {other:?}")),
                };
                if family(a) != family(implied) {
                    return Err(format!("key algorithm {a:?} does not fit its key type"));
                }
                if matches!(implied, Algorithm::ES256 | Algorithm::ES384) && a != implied {
                    return Err(format!("key algorithm {a:?} does not fit its curve"));
                }
                a
            }
        };
        let key = DecodingKey::from_jwk(jwk).map_err(|e| format!("bad key: {e}"))?;
        Ok(Key { alg, key })
    }
}

fn family(a: Algorithm) -> u8 {
    match a {
        Algorithm::EdDSA => 1,
        Algorithm::ES256 | Algorithm::ES384 => 2,
        Algorithm::RS256
        | Algorithm::RS384
        | Algorithm::RS512
        | Algorithm::PS256
        | Algorithm::PS384
        | Algorithm::PS512 => 3,
        Algorithm::HS256 | Algorithm::HS384 | Algorithm::HS512 => 4,
    }
}

/// An issuer's verification keys, by `kid`.
#[derive(Clone, Default)]
pub struct KeySet {
    keys: HashMap<String, Key>,
}

impl KeySet {
    /// From a JWKS document. Keys without `kid`, with `use` other than `sig`, or of a kind not
    /// supported are skipped (their reasons returned); a document that is not a JWKS is an error.
    pub fn from_jwks(doc: &[u8]) -> Result<(Self, Vec<String>), String> {
        #[derive(Deserialize)]
        struct Doc {
            keys: Vec<Value>,
        }
        let doc: Doc =
            serde_json::from_slice(doc).map_err(|e| format!("not a JWKS document: {e}"))?;
        let mut set = KeySet::default();
        let mut skipped = Vec::new();
        for (i, v) in doc.keys.into_iter().enumerate() {
            let jwk: Jwk = match serde_json::from_value(v) {
                Ok(j) => j,
                Err(e) => {
                    skipped.push(format!("key {i}: {e}"));
                    continue;
                }
            };
            let Some(kid) = jwk.common.key_id.clone() else {
                skipped.push(format!("key {i}: no kid"));
                continue;
            };
            if matches!(
                jwk.common.public_key_use,
                Some(jsonwebtoken::jwk::PublicKeyUse::Encryption)
            ) {
                skipped.push(format!("key {kid}: for encryption"));
                continue;
            }
            match Key::from_jwk(&jwk) {
                Ok(k) => {
                    set.keys.insert(kid, k);
                }
                Err(e) => skipped.push(format!("key {kid}: {e}")),
            }
        }
        Ok((set, skipped))
    }

    pub fn insert(&mut self, kid: String, key: Key) {
        self.keys.insert(kid, key);
    }

    pub fn get(&self, kid: &str) -> Option<&Key> {
        self.keys.get(kid)
    }

    pub fn kids(&self) -> impl Iterator<Item = &str> {
        self.keys.keys().map(String::as_str)
    }

    pub fn len(&self) -> usize {
        self.keys.len()
    }

    pub fn is_empty(&self) -> bool {
        self.keys.is_empty()
    }
}

/// A trusted issuer.
#[derive(Clone)]
pub struct Issuer {
    /// The name routes use (`gantry` for the built-in one).
    pub name: String,
    /// The `iss` its tokens carry.
    pub iss: String,
    pub keys: KeySet,
    /// Its tokens may name a calling service (`gantry_service`): Gantry's own issuer only, so
    /// that no other issuer can mint a workload identity.
    pub workloads: bool,
}

/// Service-to-service policy: who may call whom. The default allows every call (no policy);
/// identity sets the spec's.
#[derive(Clone, Debug)]
pub struct CallPolicy {
    /// `false`: the `deny` default — a service reaches only the services it lists, and outside
    /// traffic only routes marked public.
    pub default_allow: bool,
    /// Per calling service, the services it may call.
    pub calls: HashMap<String, HashSet<String>>,
}

impl Default for CallPolicy {
    fn default() -> Self {
        Self {
            default_allow: true,
            calls: HashMap::new(),
        }
    }
}

impl CallPolicy {
    /// May `caller` (a service, if the request carries a workload credential) reach `service`
    /// through a route that is (or is not) public?
    pub fn check(
        &self,
        caller: Option<&str>,
        service: &str,
        public: bool,
    ) -> Result<(), Forbidden> {
        if self.default_allow {
            return Ok(());
        }
        match caller {
            Some(c) if c == service => Ok(()),
            Some(c) if self.calls.get(c).is_some_and(|s| s.contains(service)) => Ok(()),
            Some(c) if !public => Err(Forbidden::CallNotAllowed {
                caller: c.to_string(),
                service: service.to_string(),
            }),
            // A service calling a public route is outside traffic as far as policy goes.
            Some(_) => Ok(()),
            None if public => Ok(()),
            None => Err(Forbidden::NotPublic),
        }
    }
}

/// Everything a verifier trusts, as of one moment.
#[derive(Clone, Default)]
pub struct Material {
    /// Bumped by whoever replaces it; cached verifications are used only under the revision
    /// they were made with.
    pub revision: u64,
    pub issuers: Vec<Issuer>,
    /// `jti`s of revoked access tokens that have not expired yet.
    pub revoked: HashSet<String>,
    /// API keys, by SHA-256 of the key.
    pub api_keys: HashMap<[u8; 32], Arc<Identity>>,
    pub calls: CallPolicy,
    /// Told the name of an external issuer when a token names a key its set lacks (the
    /// provider may have rotated): whoever fetches key sets refetches, rate-limited.
    pub refetch: Option<Refetch>,
    /// Browser sessions, by SHA-256 of the session cookie's value (shared, not copied, when
    /// the rest of the material changes).
    pub sessions: Arc<Sessions>,
}

/// The name of the session cookie.
pub const SESSION_COOKIE: &str = "gantry_session";

/// Live browser sessions.
#[derive(Default)]
pub struct Sessions {
    pub map: HashMap<[u8; 32], Arc<Session>>,
}

/// One signed-in browser: who it is, and the short-lived token the gateway sends upstream in
/// its place (renewed by identity before it expires; the browser never holds it).
pub struct Session {
    pub identity: Arc<Identity>,
    /// Seconds since the epoch.
    pub expires: u64,
    /// `Bearer <JWT>`, as the instance gets it.
    pub token: arc_swap::ArcSwap<(String, u64)>,
}

impl Material {
    /// The live session a cookie value names.
    pub fn session(&self, cookie: &str, now: u64) -> Result<Arc<Session>, Denial> {
        match self.sessions.map.get(&digest(cookie)) {
            Some(s) if s.expires > now => Ok(s.clone()),
            _ => Err(Denial::InvalidSession),
        }
    }
}

/// See [`Material::refetch`].
pub type Refetch = Arc<dyn Fn(&str) + Send + Sync>;

impl fmt::Debug for Material {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Material")
            .field("revision", &self.revision)
            .field(
                "issuers",
                &self
                    .issuers
                    .iter()
                    .map(|i| (&i.name, &i.iss, i.keys.kids().collect::<Vec<_>>()))
                    .collect::<Vec<_>>(),
            )
            .field("revoked", &self.revoked.len())
            .field("api_keys", &self.api_keys.len())
            .field("calls", &self.calls)
            .field("sessions", &self.sessions.map.len())
            .finish()
    }
}

impl Material {
    pub fn issuer(&self, iss: &str) -> Option<&Issuer> {
        self.issuers.iter().find(|i| i.iss == iss)
    }

    /// The identity an API key stands for.
    pub fn api_key(&self, key: &str) -> Result<Arc<Identity>, Denial> {
        self.api_keys
            .get(&digest(key))
            .cloned()
            .ok_or(Denial::InvalidApiKey)
    }
}

#[derive(Deserialize)]
struct Header {
    alg: String,
    #[serde(default)]
    typ: Option<String>,
    #[serde(default)]
    kid: Option<String>,
    #[serde(default)]
    crit: Option<Value>,
    #[serde(default)]
    jwk: Option<Value>,
    #[serde(default)]
    jku: Option<Value>,
    #[serde(default)]
    x5u: Option<Value>,
    #[serde(default)]
    x5c: Option<Value>,
}

fn algorithm(name: &str) -> Option<Algorithm> {
    Some(match name {
        "EdDSA" => Algorithm::EdDSA,
        "ES256" => Algorithm::ES256,
        "ES384" => Algorithm::ES384,
        "RS256" => Algorithm::RS256,
        "RS384" => Algorithm::RS384,
        "RS512" => Algorithm::RS512,
        "PS256" => Algorithm::PS256,
        "PS384" => Algorithm::PS384,
        "PS512" => Algorithm::PS512,
        _ => return None,
    })
}

/// Verify a compact JWS against the material, at `now` (seconds since the epoch).
pub fn verify_jwt(token: &str, m: &Material, now: u64) -> Result<Identity, Denial> {
    if token.len() > MAX_TOKEN_BYTES {
        return Err(Denial::TooLarge);
    }
    let mut parts = token.split('.');
    let (Some(h64), Some(p64), Some(s64), None) =
        (parts.next(), parts.next(), parts.next(), parts.next())
    else {
        return Err(Denial::Malformed);
    };
    let header: Header = b64url_decode(h64)
        .and_then(|b| serde_json::from_slice(&b).ok())
        .ok_or(Denial::Malformed)?;
    let payload: Map<String, Value> = b64url_decode(p64)
        .and_then(|b| serde_json::from_slice(&b).ok())
        .ok_or(Denial::Malformed)?;
    // The algorithm first: `alg: none` comes with an empty signature, and is refused as what
    // it is.
    let Some(alg) = algorithm(&header.alg) else {
        return Err(Denial::AlgorithmNotAllowed);
    };
    if s64.is_empty() || b64url_decode(s64).is_none() {
        return Err(Denial::Malformed);
    }
    if header.crit.is_some() {
        return Err(Denial::CriticalHeader);
    }
    if header.jwk.is_some() || header.jku.is_some() || header.x5u.is_some() || header.x5c.is_some()
    {
        return Err(Denial::EmbeddedKey);
    }
    let iss = payload
        .get("iss")
        .and_then(Value::as_str)
        .ok_or(Denial::UntrustedIssuer)?;
    let issuer = m.issuer(iss).ok_or(Denial::UntrustedIssuer)?;
    let Some(key) = header.kid.as_deref().and_then(|k| issuer.keys.get(k)) else {
        if let (false, Some(f)) = (issuer.workloads, &m.refetch) {
            f(&issuer.name);
        }
        return Err(Denial::UnknownKey);
    };
    if key.alg != alg {
        return Err(Denial::AlgorithmNotAllowed);
    }
    // Gantry's own issuer marks its access tokens `at+jwt` (RFC 9068): anything else it signed
    // (an ID token) is not a credential for an API.
    if issuer.workloads
        && !header
            .typ
            .as_deref()
            .is_some_and(|t| t.eq_ignore_ascii_case("at+jwt"))
    {
        return Err(Denial::WrongTokenType);
    }
    let message = &token[..h64.len() + 1 + p64.len()];
    match jsonwebtoken::crypto::verify(s64, message.as_bytes(), &key.key, alg) {
        Ok(true) => {}
        _ => return Err(Denial::BadSignature),
    }
    // Authentic from here on.
    let exp = payload
        .get("exp")
        .and_then(numeric_date)
        .ok_or(Denial::Malformed)?;
    if exp.saturating_add(LEEWAY_SECS) <= now {
        return Err(Denial::Expired);
    }
    if let Some(nbf) = payload.get("nbf") {
        let nbf = numeric_date(nbf).ok_or(Denial::Malformed)?;
        if nbf > now.saturating_add(LEEWAY_SECS) {
            return Err(Denial::NotYetValid);
        }
    }
    if let Some(iat) = payload.get("iat").and_then(numeric_date) {
        if iat > now.saturating_add(LEEWAY_SECS) {
            return Err(Denial::NotYetValid);
        }
    }
    let jti = payload
        .get("jti")
        .and_then(Value::as_str)
        .map(str::to_string);
    if let Some(j) = &jti {
        if m.revoked.contains(j) {
            return Err(Denial::Revoked);
        }
    }
    Ok(identity_from_claims(issuer, exp, jti, payload))
}

/// A JWT NumericDate (RFC 7519 2: seconds since the epoch, possibly fractional), truncated.
fn numeric_date(v: &Value) -> Option<u64> {
    v.as_u64().or_else(|| {
        v.as_f64()
            .filter(|f| f.is_finite() && *f >= 0.0 && *f < u64::MAX as f64)
            .map(|f| f as u64)
    })
}

fn strings(v: Option<&Value>, split: bool) -> Vec<String> {
    match v {
        Some(Value::String(s)) if split => s.split_whitespace().map(str::to_string).collect(),
        Some(Value::String(s)) => vec![s.clone()],
        Some(Value::Array(a)) => a
            .iter()
            .filter_map(Value::as_str)
            .map(str::to_string)
            .collect(),
        _ => Vec::new(),
    }
}

fn identity_from_claims(
    issuer: &Issuer,
    exp: u64,
    jti: Option<String>,
    claims: Map<String, Value>,
) -> Identity {
    let subject = claims
        .get("sub")
        .and_then(Value::as_str)
        .unwrap_or_default()
        .to_string();
    let client_id = claims
        .get("client_id")
        .or_else(|| claims.get("azp"))
        .and_then(Value::as_str)
        .map(str::to_string);
    let mut scopes = strings(claims.get("scope"), true);
    if scopes.is_empty() {
        scopes = strings(claims.get("scp"), true);
    }
    let mut roles = strings(claims.get("roles"), false);
    // Keycloak puts realm roles under `realm_access.roles`.
    if roles.is_empty() {
        roles = strings(
            claims.get("realm_access").and_then(|r| r.get("roles")),
            false,
        );
    }
    let audiences = strings(claims.get("aud"), false);
    let service = claims
        .get(CLAIM_SERVICE)
        .and_then(Value::as_str)
        .filter(|_| issuer.workloads)
        .map(str::to_string);
    let kind = if service.is_some() {
        Kind::Workload
    } else if client_id.as_deref() == Some(subject.as_str()) {
        Kind::Client
    } else {
        Kind::User
    };
    Identity {
        kind,
        issuer: issuer.iss.clone(),
        subject,
        client_id,
        scopes,
        roles,
        audiences,
        expires: exp,
        jti,
        service,
        claims,
        headers: Default::default(),
    }
}

/// Whether a route needs a credential.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum Mode {
    /// Credentials are not read (identity headers are still stripped).
    #[default]
    None,
    /// A valid credential is used; an invalid one is refused; none is fine.
    Optional,
    Required,
}

/// What a route asks of a caller, compiled from its spec.
#[derive(Debug, Clone, Default)]
pub struct Requirement {
    pub mode: Mode,
    /// Issuer names or `iss` values accepted; empty: any trusted issuer.
    pub issuers: Vec<String>,
    /// At least one of these must be in the token's `aud`; empty: not checked.
    pub audiences: Vec<String>,
    /// Every one of these scopes.
    pub scopes: Vec<String>,
    /// At least one of these roles; empty: not checked.
    pub roles: Vec<String>,
    /// Claims that must have these values (a string claim equal to it, or an array claim
    /// containing it).
    pub claims: Vec<(String, String)>,
}

impl Requirement {
    /// Issuer and audience (401 when they do not fit: the token is not for this route).
    pub fn accepts(&self, id: &Identity, m: &Material) -> Result<(), Denial> {
        if !self.issuers.is_empty() {
            let name = m
                .issuers
                .iter()
                .find(|i| i.iss == id.issuer)
                .map(|i| i.name.as_str());
            let ok = self
                .issuers
                .iter()
                .any(|a| *a == id.issuer || Some(a.as_str()) == name);
            if !ok {
                return Err(Denial::WrongIssuer);
            }
        }
        if !self.audiences.is_empty() && !self.audiences.iter().any(|a| id.audiences.contains(a)) {
            return Err(Denial::WrongAudience);
        }
        Ok(())
    }

    /// Scopes, roles and claims (403 when missing).
    pub fn check(&self, id: &Identity) -> Result<(), Forbidden> {
        for s in &self.scopes {
            if !id.has_scope(s) {
                return Err(Forbidden::InsufficientScope(s.clone()));
            }
        }
        if !self.roles.is_empty() && !self.roles.iter().any(|r| id.has_role(r)) {
            return Err(Forbidden::MissingRole);
        }
        for (name, want) in &self.claims {
            let ok = match id.claims.get(name) {
                Some(Value::String(s)) => s == want,
                Some(Value::Array(a)) => a.iter().any(|v| v.as_str() == Some(want)),
                Some(Value::Bool(b)) => want == if *b { "true" } else { "false" },
                Some(Value::Number(n)) => n.to_string() == *want,
                _ => false,
            };
            if !ok {
                return Err(Forbidden::ClaimMismatch(name.clone()));
            }
        }
        Ok(())
    }
}

/// A credential as presented.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Presented<'a> {
    Bearer(&'a str),
    ApiKey(&'a str),
}

/// Read `Authorization: Bearer …` / `Authorization: ApiKey …` (scheme case-insensitive, RFC
/// 7235) or `X-Api-Key`. `Ok(None)`: nothing presented.
pub fn presented<'a>(
    authorization: Option<&'a [u8]>,
    x_api_key: Option<&'a [u8]>,
) -> Result<Option<Presented<'a>>, Denial> {
    if let Some(v) = authorization {
        let v = std::str::from_utf8(v).map_err(|_| Denial::BadScheme)?;
        let (scheme, rest) = v.split_once(' ').ok_or(Denial::BadScheme)?;
        let rest = rest.trim();
        if rest.is_empty() {
            return Err(Denial::BadScheme);
        }
        return if scheme.eq_ignore_ascii_case("bearer") {
            Ok(Some(Presented::Bearer(rest)))
        } else if scheme.eq_ignore_ascii_case("apikey") {
            Ok(Some(Presented::ApiKey(rest)))
        } else {
            Err(Denial::BadScheme)
        };
    }
    if let Some(v) = x_api_key {
        let v = std::str::from_utf8(v).map_err(|_| Denial::InvalidApiKey)?;
        return Ok(Some(Presented::ApiKey(v.trim())));
    }
    Ok(None)
}

/// Verified tokens, per thread: a token seen again under the same material costs a hash
/// lookup (its expiry and revocation are checked again on every use).
pub struct Cache;

/// Entries per thread; the map is cleared when it fills (tokens are short-lived, and a burst of
/// new ones costs one verification each, as without a cache).
const CACHE_ENTRIES: usize = 4096;

type Entries = HashMap<Box<str>, (u64, Arc<Identity>)>;

thread_local! {
    static VERIFIED: RefCell<Entries> = RefCell::new(HashMap::new());
}

impl Cache {
    /// Verify `token`, through this thread's cache.
    pub fn verify(token: &str, m: &Material, now: u64) -> Result<Arc<Identity>, Denial> {
        let hit = VERIFIED.with(|c| {
            c.borrow()
                .get(token)
                .filter(|(rev, _)| *rev == m.revision)
                .map(|(_, id)| id.clone())
        });
        if let Some(id) = hit {
            if id.expires.saturating_add(LEEWAY_SECS) <= now {
                return Err(Denial::Expired);
            }
            if id.jti.as_ref().is_some_and(|j| m.revoked.contains(j)) {
                return Err(Denial::Revoked);
            }
            return Ok(id);
        }
        let id = Arc::new(verify_jwt(token, m, now)?);
        VERIFIED.with(|c| {
            let mut c = c.borrow_mut();
            if c.len() >= CACHE_ENTRIES {
                c.clear();
            }
            c.insert(token.into(), (m.revision, id.clone()));
        });
        Ok(id)
    }
}

#[cfg(test)]
mod tests;
