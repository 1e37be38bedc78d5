//! Browser sessions (the seeds' pattern): the login endpoint sets an HttpOnly, Secure,
//! SameSite cookie naming a session kept in the store (`identity-sessions`, by SHA-256 of the
//! cookie: the store never holds a usable session id); every gateway follows the bucket, finds
//! the session by the cookie and sends the instance a short-lived JWT in its place, which this
//! module re-signs before it expires. The browser never holds a bearer token; logging out
//! deletes the session from the store, and every gateway drops it at once.

use std::sync::Arc;

use gantry_authn::{Identity as Verified, Kind, Session, Sessions};
use gantry_store::{StoreJsonExt as _, WatchEvent, WatchFrom};
use serde::{Deserialize, Serialize};
use serde_json::Map;

use crate::tokens::Subject;
use crate::{hex, random_token, Identity, IdentityError};

pub const SESSIONS: &str = "identity-sessions";
/// The client id session tokens carry.
pub const SESSION_CLIENT: &str = "gantry-session";

/// A session as stored.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct SessionRec {
    pub username: String,
    pub roles: Vec<String>,
    /// Seconds since the epoch.
    pub created: u64,
    pub expires: u64,
}

impl Identity {
    fn session_token_ttl(&self) -> u64 {
        self.config().access_ttl.min(300)
    }

    /// The token the gateway sends in the session's place.
    fn session_token(&self, rec: &SessionRec) -> Result<(String, u64), IdentityError> {
        let s = Subject {
            sub: rec.username.clone(),
            client_id: SESSION_CLIENT.into(),
            scopes: Vec::new(),
            roles: rec.roles.clone(),
            audiences: vec![self.config().audience],
            auth_time: Some(rec.created),
            extra: Map::new(),
        };
        let ttl = self
            .session_token_ttl()
            .min(rec.expires.saturating_sub(gantry_authn::now_secs()).max(1));
        let (t, _, exp) = self.sign_access(&s, ttl)?;
        Ok((format!("Bearer {t}"), exp))
    }

    /// Put a session into the cache the gateway reads (from this process's login or from the
    /// store's watch).
    pub(crate) fn cache_session(&self, key: &str, rec: &SessionRec) {
        let Some(d) = crate::digest_from_hex(key) else {
            return;
        };
        if rec.expires <= gantry_authn::now_secs() {
            return;
        }
        if self
            .sessions_now()
            .map
            .get(&d)
            .is_some_and(|s| s.expires == rec.expires)
        {
            return;
        }
        let token = match self.session_token(rec) {
            Ok(t) => t,
            Err(e) => {
                tracing::warn!(error = %e, "identity: cannot sign a session's token");
                return;
            }
        };
        let identity = Arc::new(Verified {
            kind: Kind::User,
            issuer: self.issuer().to_string(),
            subject: rec.username.clone(),
            client_id: Some(SESSION_CLIENT.into()),
            scopes: Vec::new(),
            roles: rec.roles.clone(),
            audiences: vec![self.config().audience],
            expires: rec.expires,
            jti: None,
            service: None,
            claims: Map::new(),
            headers: Default::default(),
        });
        let session = Arc::new(Session {
            identity,
            expires: rec.expires,
            token: arc_swap::ArcSwap::from_pointee(token),
        });
        self.edit_sessions(|m| {
            m.insert(d, session);
        });
    }

    /// Drop cached sessions the store no longer has (not replayed by a new watch, and gone:
    /// a session created after the watch's snapshot is kept).
    async fn prune_sessions(&self, replayed: &std::collections::HashSet<String>) {
        let candidates: Vec<String> = self
            .sessions_now()
            .map
            .keys()
            .map(|d| hex(d))
            .filter(|k| !replayed.contains(k))
            .collect();
        for k in candidates {
            if matches!(self.store.get(SESSIONS, &k).await, Ok(None)) {
                self.uncache_session(&k);
            }
        }
    }

    pub(crate) fn uncache_session(&self, key: &str) {
        if let Some(d) = crate::digest_from_hex(key) {
            self.edit_sessions(|m| {
                m.remove(&d);
            });
        }
    }

    /// Sign a user in: a new session, stored before its cookie value is returned.
    pub async fn create_session(
        &self,
        username: &str,
        roles: Vec<String>,
    ) -> Result<(String, SessionRec), IdentityError> {
        let now = gantry_authn::now_secs();
        let rec = SessionRec {
            username: username.to_string(),
            roles,
            created: now,
            expires: now + self.config().session_ttl,
        };
        let cookie = format!("gss_{}", random_token(32));
        let key = hex(&gantry_authn::digest(&cookie));
        match &self.redis {
            Some(r) => r.put(&key, &rec, rec.expires - now).await?,
            None => {
                self.store.create_json(SESSIONS, &key, &rec).await?;
            }
        }
        self.cache_session(&key, &rec);
        Ok((cookie, rec))
    }

    /// The session a cookie names, if it is live.
    pub fn session_of(&self, cookie: &str) -> Option<Arc<Session>> {
        self.current_material()
            .session(cookie, gantry_authn::now_secs())
            .ok()
    }

    /// End a session, on every gateway (the store's delete reaches them all).
    pub async fn end_session(&self, cookie: &str) -> Result<bool, IdentityError> {
        let key = hex(&gantry_authn::digest(cookie));
        let existed = match &self.redis {
            Some(r) => r.delete(&key).await?,
            None => self.store.delete(SESSIONS, &key).await?,
        };
        self.uncache_session(&key);
        Ok(existed)
    }

    /// End every session of a user, on every gateway.
    pub(crate) async fn end_user_sessions(&self, username: &str) -> Result<(), IdentityError> {
        let keys: Vec<String> = self
            .sessions_now()
            .map
            .iter()
            .filter(|(_, s)| s.identity.subject == username)
            .map(|(d, _)| hex(d))
            .collect();
        for key in keys {
            match &self.redis {
                Some(r) => {
                    r.delete(&key).await?;
                }
                None => {
                    self.store.delete(SESSIONS, &key).await?;
                }
            }
            self.uncache_session(&key);
        }
        Ok(())
    }

    /// Re-sign session tokens in the second half of their life; drop expired sessions.
    pub(crate) fn renew_sessions(&self) {
        let now = gantry_authn::now_secs();
        let half = self.session_token_ttl() / 2;
        let sessions = self.sessions_now();
        let mut expired = Vec::new();
        for (d, s) in &sessions.map {
            if s.expires <= now {
                expired.push(*d);
                continue;
            }
            let exp = s.token.load().1;
            if exp <= now + half {
                let rec = SessionRec {
                    username: s.identity.subject.clone(),
                    roles: s.identity.roles.clone(),
                    created: now,
                    expires: s.expires,
                };
                match self.session_token(&rec) {
                    Ok(t) => s.token.store(Arc::new(t)),
                    Err(e) => {
                        tracing::warn!(error = %e, "identity: cannot renew a session's token")
                    }
                }
            }
        }
        if !expired.is_empty() {
            self.edit_sessions(|m| {
                for d in &expired {
                    m.remove(d);
                }
            });
        }
    }

    /// Follow the sessions bucket (logins and logouts of every gantry on the store).
    pub(crate) async fn follow_sessions(self: Arc<Self>) {
        loop {
            let mut w = match self.store.watch(SESSIONS, ">", WatchFrom::Current).await {
                Ok(w) => w,
                Err(e) => {
                    tracing::warn!(error = %e, "identity: sessions watch failed; retrying");
                    tokio::time::sleep(std::time::Duration::from_secs(1)).await;
                    continue;
                }
            };
            // Sessions deleted while no watch ran (a logout elsewhere) are dropped at `Current`.
            let mut replayed: Option<std::collections::HashSet<String>> = Some(Default::default());
            while let Some(ev) = w.next().await {
                let c = match ev {
                    Ok(WatchEvent::Change(c)) => c,
                    Ok(WatchEvent::Current) => {
                        if let Some(seen) = replayed.take() {
                            self.prune_sessions(&seen).await;
                        }
                        continue;
                    }
                    Err(_) => continue,
                };
                if let Some(seen) = replayed.as_mut() {
                    seen.insert(c.key.clone());
                }
                match c.op {
                    gantry_store::Op::Put => {
                        if let Ok(rec) =
                            gantry_store::decode::<SessionRec>(SESSIONS, &c.key, &c.value)
                        {
                            self.cache_session(&c.key, &rec);
                        }
                    }
                    gantry_store::Op::Delete => self.uncache_session(&c.key),
                }
            }
            tokio::time::sleep(std::time::Duration::from_millis(200)).await;
        }
    }
}

/// A copy of the sessions with one change (copy-on-write: the gateway's readers keep theirs).
pub(crate) fn edited(
    cur: &Sessions,
    f: impl FnOnce(&mut std::collections::HashMap<[u8; 32], Arc<Session>>),
) -> Sessions {
    let mut map = cur.map.clone();
    f(&mut map);
    Sessions { map }
}
