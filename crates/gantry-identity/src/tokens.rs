//! Issuing and withdrawing tokens: the grants, refresh-token families with rotation and reuse
//! detection, authorization codes with PKCE, introspection and revocation, workload tokens.
//!
//! Access tokens are JWTs in the RFC 9068 profile (`typ: at+jwt`; `iss`, `sub`, `aud`, `exp`,
//! `iat`, `jti`, `client_id`, `scope`; `roles`; `auth_time` for users). Refresh tokens and codes
//! are 256-bit random strings stored by SHA-256: a leak of the store leaks none of them.

use gantry_store::{StoreError, StoreJsonExt as _};
use serde::{Deserialize, Serialize};
use serde_json::{json, Map, Value};

use crate::directory::{self, Client, ClientKind};
use crate::{hex, random_token, Identity, IdentityError, CODES, FAMILIES, REFRESH};

/// A successful token response (RFC 6749 5.1).
#[derive(Debug, Clone, Serialize, Deserialize, utoipa::ToSchema)]
pub struct TokenResponse {
    pub access_token: String,
    pub token_type: String,
    pub expires_in: u64,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub refresh_token: Option<String>,
    pub scope: String,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub id_token: Option<String>,
}

/// An error response (RFC 6749 5.2), or a rate limit.
#[derive(Debug, Clone)]
pub struct OAuthError {
    pub status: u16,
    pub error: &'static str,
    pub description: String,
    /// 429: seconds until the next attempt may succeed.
    pub retry_after: Option<u64>,
}

impl OAuthError {
    pub(crate) fn new(status: u16, error: &'static str, description: impl Into<String>) -> Self {
        Self {
            status,
            error,
            description: description.into(),
            retry_after: None,
        }
    }
    pub(crate) fn invalid_grant(d: impl Into<String>) -> Self {
        Self::new(400, "invalid_grant", d)
    }
    pub(crate) fn invalid_request(d: impl Into<String>) -> Self {
        Self::new(400, "invalid_request", d)
    }
    pub(crate) fn invalid_client() -> Self {
        Self::new(401, "invalid_client", "client authentication failed")
    }
    pub(crate) fn server(e: impl std::fmt::Display) -> Self {
        tracing::warn!(error = %e, "identity: token endpoint failed");
        Self::new(
            500,
            "server_error",
            "the token service could not complete the request; retry",
        )
    }
    pub(crate) fn slow_down(secs: u64) -> Self {
        Self {
            retry_after: Some(secs),
            ..Self::new(
                429,
                "slow_down",
                "too many attempts; retry after the time in Retry-After",
            )
        }
    }
}

impl From<StoreError> for OAuthError {
    fn from(e: StoreError) -> Self {
        OAuthError::server(e)
    }
}

/// A workload's credential.
#[derive(Debug, Clone)]
pub struct WorkloadToken {
    pub token: String,
    pub jti: String,
    pub expires: u64,
}

/// Who a token is for.
pub(crate) struct Subject {
    pub sub: String,
    pub client_id: String,
    pub scopes: Vec<String>,
    pub roles: Vec<String>,
    pub audiences: Vec<String>,
    pub auth_time: Option<u64>,
    pub extra: Map<String, Value>,
}

#[derive(Serialize, Deserialize)]
struct RefreshRec {
    family: String,
    client_id: String,
    subject: String,
    scopes: Vec<String>,
    expires: u64,
    auth_time: u64,
    used: bool,
}

#[derive(Serialize, Deserialize, Default)]
struct FamilyRec {
    revoked: bool,
    client_id: String,
    subject: String,
    /// Access tokens issued in the family: revoked with it.
    access: Vec<(String, u64)>,
}

#[derive(Serialize, Deserialize)]
pub(crate) struct CodeRec {
    pub client_id: String,
    pub redirect_uri: String,
    pub subject: String,
    pub scopes: Vec<String>,
    pub challenge: String,
    pub nonce: Option<String>,
    pub auth_time: u64,
    pub expires: u64,
}

/// Scopes a user-facing flow may ask for besides the client's own.
const OIDC_SCOPES: [&str; 4] = ["openid", "profile", "email", "offline_access"];

impl Identity {
    /// Sign an access token. Returns it with its `jti` and `exp`.
    pub(crate) fn sign_access(
        &self,
        s: &Subject,
        ttl: u64,
    ) -> Result<(String, String, u64), IdentityError> {
        let key = self
            .signing_key()
            .ok_or_else(|| IdentityError::Internal("no signing key".into()))?;
        let now = gantry_authn::now_secs();
        let jti = random_token(16);
        let exp = now + ttl;
        let mut claims = Map::new();
        claims.insert("iss".into(), json!(self.issuer));
        claims.insert("sub".into(), json!(s.sub));
        claims.insert("aud".into(), json!(s.audiences));
        claims.insert("exp".into(), json!(exp));
        claims.insert("iat".into(), json!(now));
        claims.insert("nbf".into(), json!(now));
        claims.insert("jti".into(), json!(jti));
        claims.insert("client_id".into(), json!(s.client_id));
        claims.insert("scope".into(), json!(s.scopes.join(" ")));
        claims.insert("roles".into(), json!(s.roles));
        if let Some(t) = s.auth_time {
            claims.insert("auth_time".into(), json!(t));
        }
        for (k, v) in &s.extra {
            claims.insert(k.clone(), v.clone());
        }
        let mut h = jsonwebtoken::Header::new(key.alg.jose());
        h.kid = Some(key.kid.clone());
        h.typ = Some("at+jwt".into());
        let enc = key
            .encoding_key(&self.sealer)
            .map_err(IdentityError::Internal)?;
        let t = jsonwebtoken::encode(&h, &claims, &enc)
            .map_err(|e| IdentityError::Internal(format!("sign: {e}")))?;
        Ok((t, jti, exp))
    }

    fn sign_id_token(
        &self,
        sub: &str,
        client_id: &str,
        nonce: Option<&str>,
        auth_time: u64,
        roles: &[String],
    ) -> Result<String, IdentityError> {
        let key = self
            .signing_key()
            .ok_or_else(|| IdentityError::Internal("no signing key".into()))?;
        let now = gantry_authn::now_secs();
        let mut claims = json!({
            "iss": self.issuer, "sub": sub, "aud": client_id, "azp": client_id,
            "exp": now + self.config().access_ttl, "iat": now, "auth_time": auth_time,
            "preferred_username": sub, "roles": roles,
        });
        if let (Some(n), Some(o)) = (nonce, claims.as_object_mut()) {
            o.insert("nonce".into(), json!(n));
        }
        let mut h = jsonwebtoken::Header::new(key.alg.jose());
        h.kid = Some(key.kid.clone());
        let enc = key
            .encoding_key(&self.sealer)
            .map_err(IdentityError::Internal)?;
        jsonwebtoken::encode(&h, &claims, &enc)
            .map_err(|e| IdentityError::Internal(format!("sign: {e}")))
    }

    fn audiences(&self, c: &Client) -> Vec<String> {
        let mut a = vec![self.config().audience];
        for x in &c.audiences {
            if !a.contains(x) {
                a.push(x.clone());
            }
        }
        a
    }

    /// Check a client's credentials (secret for confidential clients, none for public ones).
    pub(crate) async fn authenticate_client(
        &self,
        id: &str,
        secret: Option<&str>,
    ) -> Result<Client, OAuthError> {
        let c = self
            .client(id)
            .await
            .map_err(OAuthError::server)?
            .ok_or_else(OAuthError::invalid_client)?;
        match (c.kind, secret, &c.secret_sha256) {
            (ClientKind::Public, None, _) => Ok(c),
            (ClientKind::Confidential, Some(s), Some(stored)) => {
                let given = hex(&gantry_authn::digest(s));
                if gantry_authn::constant_time_eq(given.as_bytes(), stored.as_bytes()) {
                    Ok(c)
                } else {
                    Err(OAuthError::invalid_client())
                }
            }
            _ => Err(OAuthError::invalid_client()),
        }
    }

    pub(crate) fn granted(
        &self,
        c: &Client,
        requested: Option<&str>,
        user_flow: bool,
    ) -> Result<Vec<String>, OAuthError> {
        let Some(req) = requested.filter(|r| !r.trim().is_empty()) else {
            return Ok(c.scopes.clone());
        };
        let mut out = Vec::new();
        for s in req.split_whitespace() {
            let ok = c.scopes.iter().any(|x| x == s) || (user_flow && OIDC_SCOPES.contains(&s));
            if !ok {
                return Err(OAuthError::new(
                    400,
                    "invalid_scope",
                    format!("scope {s:?} is not allowed for client {}", c.id),
                ));
            }
            if !out.iter().any(|x| x == s) {
                out.push(s.to_string());
            }
        }
        Ok(out)
    }

    fn needs_grant(c: &Client, grant: &str) -> Result<(), OAuthError> {
        if c.grant_types.iter().any(|g| g == grant) {
            Ok(())
        } else {
            Err(OAuthError::new(
                400,
                "unauthorized_client",
                format!("client {} may not use the {grant} grant", c.id),
            ))
        }
    }

    pub(crate) async fn client_credentials(
        &self,
        c: &Client,
        scope: Option<&str>,
    ) -> Result<TokenResponse, OAuthError> {
        Self::needs_grant(c, "client_credentials")?;
        let scopes = self.granted(c, scope, false)?;
        let s = Subject {
            sub: c.id.clone(),
            client_id: c.id.clone(),
            scopes,
            roles: c.roles.clone(),
            audiences: self.audiences(c),
            auth_time: None,
            extra: Map::new(),
        };
        let ttl = self.config().access_ttl;
        let (t, _, _) = self.sign_access(&s, ttl).map_err(OAuthError::server)?;
        Ok(TokenResponse {
            access_token: t,
            token_type: "Bearer".into(),
            expires_in: ttl,
            refresh_token: None,
            scope: s.scopes.join(" "),
            id_token: None,
        })
    }

    /// Check a user's password, within the per-user attempt limit. The failure does not say
    /// whether the user exists.
    pub(crate) async fn check_user(
        &self,
        username: &str,
        password: &str,
    ) -> Result<directory::User, OAuthError> {
        self.limiter.user(username).map_err(OAuthError::slow_down)?;
        let user = self.user(username).await.map_err(OAuthError::server)?;
        let hash = user.as_ref().map(|(u, _)| u.password_hash.clone());
        let ok = crate::verify_password(password, hash).await;
        match user {
            Some((u, _)) if ok && !u.disabled => Ok(u),
            _ => Err(OAuthError::invalid_grant("invalid username or password")),
        }
    }

    pub(crate) async fn password(
        &self,
        c: &Client,
        username: &str,
        password: &str,
        scope: Option<&str>,
    ) -> Result<TokenResponse, OAuthError> {
        Self::needs_grant(c, "password")?;
        let scopes = self.granted(c, scope, true)?;
        let u = self.check_user(username, password).await?;
        let now = gantry_authn::now_secs();
        self.user_tokens(c, &u.username, u.roles, scopes, now, None, None)
            .await
    }

    /// Access token (and refresh token when the client may refresh; an ID token when `openid`
    /// was granted) for a user.
    #[allow(clippy::too_many_arguments)]
    async fn user_tokens(
        &self,
        c: &Client,
        username: &str,
        roles: Vec<String>,
        scopes: Vec<String>,
        auth_time: u64,
        family: Option<String>,
        nonce: Option<&str>,
    ) -> Result<TokenResponse, OAuthError> {
        let cfg = self.config();
        let s = Subject {
            sub: username.to_string(),
            client_id: c.id.clone(),
            scopes: scopes.clone(),
            roles: roles.clone(),
            audiences: self.audiences(c),
            auth_time: Some(auth_time),
            extra: Map::new(),
        };
        let (t, jti, exp) = self
            .sign_access(&s, cfg.access_ttl)
            .map_err(OAuthError::server)?;
        let refresh = if c.grant_types.iter().any(|g| g == "refresh_token") {
            let family = family.unwrap_or_else(|| random_token(16));
            let token = format!("grt_{}", random_token(32));
            let rec = RefreshRec {
                family: family.clone(),
                client_id: c.id.clone(),
                subject: username.to_string(),
                scopes: scopes.clone(),
                expires: gantry_authn::now_secs() + cfg.refresh_ttl,
                auth_time,
                used: false,
            };
            // The family first: a refresh token never exists without it.
            self.family_add(&family, c, username, &jti, exp).await?;
            self.store
                .create_json(REFRESH, &hex(&gantry_authn::digest(&token)), &rec)
                .await?;
            Some(token)
        } else {
            None
        };
        let id_token = if scopes.iter().any(|s| s == "openid") {
            Some(
                self.sign_id_token(username, &c.id, nonce, auth_time, &roles)
                    .map_err(OAuthError::server)?,
            )
        } else {
            None
        };
        Ok(TokenResponse {
            access_token: t,
            token_type: "Bearer".into(),
            expires_in: cfg.access_ttl,
            refresh_token: refresh,
            scope: scopes.join(" "),
            id_token,
        })
    }

    async fn family_add(
        &self,
        family: &str,
        c: &Client,
        subject: &str,
        jti: &str,
        exp: u64,
    ) -> Result<(), OAuthError> {
        loop {
            let cur = self.store.get_json::<FamilyRec>(FAMILIES, family).await?;
            let now = gantry_authn::now_secs();
            let (mut f, rev) = match cur {
                Some((f, rev)) => (f, Some(rev)),
                None => (
                    FamilyRec {
                        revoked: false,
                        client_id: c.id.clone(),
                        subject: subject.to_string(),
                        access: Vec::new(),
                    },
                    None,
                ),
            };
            if f.revoked {
                return Err(OAuthError::invalid_grant(
                    "the refresh token's family is revoked",
                ));
            }
            f.access
                .retain(|(_, e)| *e + gantry_authn::LEEWAY_SECS > now);
            f.access.push((jti.to_string(), exp));
            let r = match rev {
                Some(rev) => self.store.update_json(FAMILIES, family, &f, rev).await,
                None => self.store.create_json(FAMILIES, family, &f).await,
            };
            match r {
                Ok(_) => return Ok(()),
                Err(StoreError::RevisionMismatch { .. } | StoreError::AlreadyExists { .. }) => {
                    continue
                }
                Err(e) => return Err(e.into()),
            }
        }
    }

    /// Revoke every refresh-token family of a user (and their access tokens): after a
    /// password, role or state change, or removal.
    pub(crate) async fn revoke_user_families(&self, username: &str) -> Result<(), IdentityError> {
        let families: Vec<(String, FamilyRec, u64)> = self.store.list_json(FAMILIES, ">").await?;
        for (key, f, _) in families {
            if f.subject == username && !f.revoked {
                self.revoke_family(&key)
                    .await
                    .map_err(|e| IdentityError::Internal(e.description))?;
            }
        }
        Ok(())
    }

    /// Revoke a refresh-token family: its refresh tokens stop working and its access tokens are
    /// revoked.
    async fn revoke_family(&self, family: &str) -> Result<(), OAuthError> {
        loop {
            let Some((mut f, rev)) = self.store.get_json::<FamilyRec>(FAMILIES, family).await?
            else {
                return Ok(());
            };
            f.revoked = true;
            match self.store.update_json(FAMILIES, family, &f, rev).await {
                Ok(_) => {
                    for (jti, exp) in &f.access {
                        self.revoke_jti(jti, *exp)
                            .await
                            .map_err(OAuthError::server)?;
                    }
                    return Ok(());
                }
                Err(StoreError::RevisionMismatch { .. }) => continue,
                Err(e) => return Err(e.into()),
            }
        }
    }

    pub(crate) async fn refresh(
        &self,
        c: &Client,
        token: &str,
        scope: Option<&str>,
    ) -> Result<TokenResponse, OAuthError> {
        Self::needs_grant(c, "refresh_token")?;
        let key = hex(&gantry_authn::digest(token));
        let Some((mut rec, rev)) = self.store.get_json::<RefreshRec>(REFRESH, &key).await? else {
            return Err(OAuthError::invalid_grant(
                "unknown or expired refresh token",
            ));
        };
        if rec.client_id != c.id {
            return Err(OAuthError::invalid_grant(
                "the refresh token was issued to another client",
            ));
        }
        if rec.used {
            self.metrics.refresh_reuse.inc();
            tracing::warn!(client = %c.id, subject = %rec.subject, "identity: refresh token reused; revoking its family");
            self.revoke_family(&rec.family).await?;
            return Err(OAuthError::invalid_grant(
                "refresh token already used: its family is revoked (sign in again)",
            ));
        }
        if rec.expires <= gantry_authn::now_secs() {
            return Err(OAuthError::invalid_grant("the refresh token has expired"));
        }
        let fam = self
            .store
            .get_json::<FamilyRec>(FAMILIES, &rec.family)
            .await?;
        if fam.as_ref().is_none_or(|(f, _)| f.revoked) {
            return Err(OAuthError::invalid_grant(
                "the refresh token's family is revoked",
            ));
        }
        // Narrower scopes may be asked for, never wider (RFC 6749 6).
        let scopes = match scope.filter(|s| !s.trim().is_empty()) {
            None => rec.scopes.clone(),
            Some(s) => {
                let asked: Vec<String> = s.split_whitespace().map(str::to_string).collect();
                if let Some(x) = asked.iter().find(|x| !rec.scopes.contains(x)) {
                    return Err(OAuthError::new(
                        400,
                        "invalid_scope",
                        format!("scope {x:?} was not granted originally"),
                    ));
                }
                asked
            }
        };
        rec.used = true;
        match self.store.update_json(REFRESH, &key, &rec, rev).await {
            Ok(_) => {}
            // Used concurrently: one of the two is a replay.
            Err(StoreError::RevisionMismatch { .. }) => {
                self.metrics.refresh_reuse.inc();
                self.revoke_family(&rec.family).await?;
                return Err(OAuthError::invalid_grant(
                    "refresh token already used: its family is revoked (sign in again)",
                ));
            }
            Err(e) => return Err(e.into()),
        }
        // The user's current roles; a removed or disabled user gets nothing.
        let roles = match self.user(&rec.subject).await.map_err(OAuthError::server)? {
            Some((u, _)) if !u.disabled => u.roles,
            _ => {
                self.revoke_family(&rec.family).await?;
                return Err(OAuthError::invalid_grant(
                    "the user no longer exists or is disabled",
                ));
            }
        };
        self.user_tokens(
            c,
            &rec.subject,
            roles,
            scopes,
            rec.auth_time,
            Some(rec.family),
            None,
        )
        .await
    }

    /// Store an authorization code (after the user signed in on the login page).
    pub(crate) async fn new_code(&self, rec: &CodeRec) -> Result<String, OAuthError> {
        let code = format!("gac_{}", random_token(32));
        self.store
            .create_json(CODES, &hex(&gantry_authn::digest(&code)), rec)
            .await?;
        Ok(code)
    }

    pub(crate) async fn authorization_code(
        &self,
        c: &Client,
        code: &str,
        redirect_uri: Option<&str>,
        verifier: Option<&str>,
    ) -> Result<TokenResponse, OAuthError> {
        Self::needs_grant(c, "authorization_code")?;
        let key = hex(&gantry_authn::digest(code));
        let Some((rec, rev)) = self.store.get_json::<CodeRec>(CODES, &key).await? else {
            return Err(OAuthError::invalid_grant(
                "unknown, used or expired authorization code",
            ));
        };
        // Single use: whoever deletes it first redeems it.
        if self.store.delete_if(CODES, &key, rev).await.is_err() {
            return Err(OAuthError::invalid_grant("authorization code already used"));
        }
        if rec.client_id != c.id {
            return Err(OAuthError::invalid_grant(
                "the code was issued to another client",
            ));
        }
        if rec.expires <= gantry_authn::now_secs() {
            return Err(OAuthError::invalid_grant(
                "the authorization code has expired",
            ));
        }
        if redirect_uri != Some(rec.redirect_uri.as_str()) {
            return Err(OAuthError::invalid_grant(
                "redirect_uri does not match the authorization request",
            ));
        }
        let Some(v) = verifier else {
            return Err(OAuthError::invalid_request(
                "code_verifier is required (PKCE)",
            ));
        };
        if !(43..=128).contains(&v.len()) {
            return Err(OAuthError::invalid_grant(
                "code_verifier must be 43-128 characters",
            ));
        }
        let d = ring::digest::digest(&ring::digest::SHA256, v.as_bytes());
        let computed = gantry_authn::b64url(d.as_ref());
        if !gantry_authn::constant_time_eq(computed.as_bytes(), rec.challenge.as_bytes()) {
            return Err(OAuthError::invalid_grant(
                "code_verifier does not match the code_challenge",
            ));
        }
        let roles = match self.user(&rec.subject).await.map_err(OAuthError::server)? {
            Some((u, _)) if !u.disabled => u.roles,
            _ => {
                return Err(OAuthError::invalid_grant(
                    "the user no longer exists or is disabled",
                ))
            }
        };
        self.user_tokens(
            c,
            &rec.subject,
            roles,
            rec.scopes,
            rec.auth_time,
            None,
            rec.nonce.as_deref(),
        )
        .await
    }

    /// RFC 7662: what a token is, for a client that asks.
    pub(crate) async fn introspect(&self, token: &str) -> Result<Value, OAuthError> {
        if token.starts_with("grt_") {
            let key = hex(&gantry_authn::digest(token));
            let Some((rec, _)) = self.store.get_json::<RefreshRec>(REFRESH, &key).await? else {
                return Ok(json!({"active": false}));
            };
            let fam_ok = self
                .store
                .get_json::<FamilyRec>(FAMILIES, &rec.family)
                .await?
                .is_some_and(|(f, _)| !f.revoked);
            if rec.used || !fam_ok || rec.expires <= gantry_authn::now_secs() {
                return Ok(json!({"active": false}));
            }
            return Ok(json!({
                "active": true, "token_type": "refresh_token", "client_id": rec.client_id,
                "sub": rec.subject, "username": rec.subject, "scope": rec.scopes.join(" "),
                "exp": rec.expires, "iss": self.issuer,
            }));
        }
        match self.verify(token) {
            Ok(id) if id.issuer == self.issuer => {
                let mut out = json!({"active": true, "token_type": "Bearer"});
                if let Some(o) = out.as_object_mut() {
                    for (k, v) in &id.claims {
                        o.insert(k.clone(), v.clone());
                    }
                    if id.kind == gantry_authn::Kind::User {
                        o.insert("username".into(), json!(id.subject));
                    }
                }
                Ok(out)
            }
            _ => Ok(json!({"active": false})),
        }
    }

    /// RFC 7009: revoke a token the client holds. Unknown tokens and tokens of other clients are
    /// ignored (the answer is the same).
    pub(crate) async fn revoke_token(&self, c: &Client, token: &str) -> Result<(), OAuthError> {
        if token.starts_with("grt_") {
            let key = hex(&gantry_authn::digest(token));
            if let Some((rec, _)) = self.store.get_json::<RefreshRec>(REFRESH, &key).await? {
                if rec.client_id == c.id {
                    self.revoke_family(&rec.family).await?;
                }
            }
            return Ok(());
        }
        if let Ok(id) = self.verify(token) {
            if id.issuer == self.issuer && id.client_id.as_deref() == Some(c.id.as_str()) {
                if let Some(j) = &id.jti {
                    self.revoke_jti(j, id.expires)
                        .await
                        .map_err(OAuthError::server)?;
                }
            }
        }
        Ok(())
    }

    /// A supervised instance's credential.
    pub fn workload_token(
        &self,
        service: &str,
        version: &str,
        instance: &str,
    ) -> Result<WorkloadToken, IdentityError> {
        let cfg = self.config();
        let mut extra = Map::new();
        extra.insert(gantry_authn::CLAIM_SERVICE.into(), json!(service));
        extra.insert(gantry_authn::CLAIM_VERSION.into(), json!(version));
        extra.insert(gantry_authn::CLAIM_INSTANCE.into(), json!(instance));
        let s = Subject {
            sub: format!("service/{service}/{instance}"),
            client_id: format!("service-{service}"),
            scopes: Vec::new(),
            roles: Vec::new(),
            audiences: vec![cfg.audience.clone()],
            auth_time: None,
            extra,
        };
        let (token, jti, expires) = self.sign_access(&s, cfg.workload_ttl)?;
        Ok(WorkloadToken {
            token,
            jti,
            expires,
        })
    }
}
