//! Sessions in Redis (`[identity] sessions_redis`), for several gantrys that do not share a
//! store: each session is a key `gantry:session:<sha256 of the cookie>` expiring with the
//! session, and every login and logout is announced on the channel `gantry:sessions`, which
//! every gantry follows (after loading the keys that exist), so a logout anywhere ends the
//! session on every gateway.

use std::sync::Arc;
use std::time::Duration;

use futures_util::StreamExt as _;
use redis::AsyncCommands as _;

use crate::sessions::SessionRec;
use crate::{Identity, IdentityError};

pub(crate) const PREFIX: &str = "gantry:session:";
pub(crate) const CHANNEL: &str = "gantry:sessions";

/// A connection to the Redis that holds the sessions.
pub(crate) struct RedisSessions {
    pub client: redis::Client,
    pub conn: redis::aio::MultiplexedConnection,
}

impl RedisSessions {
    pub(crate) async fn connect(url: &str) -> Result<Self, IdentityError> {
        let client = redis::Client::open(url)
            .map_err(|e| IdentityError::Invalid(format!("identity.sessions_redis {url:?}: {e}")))?;
        let conn = tokio::time::timeout(
            Duration::from_secs(5),
            client.get_multiplexed_tokio_connection(),
        )
        .await
        .map_err(|_| IdentityError::Internal(format!("Redis at {url}: no answer within 5 s")))?
        .map_err(|e| IdentityError::Internal(format!("Redis at {url}: {e}")))?;
        Ok(Self { client, conn })
    }

    pub(crate) async fn put(
        &self,
        key: &str,
        rec: &SessionRec,
        ttl: u64,
    ) -> Result<(), IdentityError> {
        let mut c = self.conn.clone();
        let v = serde_json::to_string(rec).map_err(|e| IdentityError::Internal(e.to_string()))?;
        let err = |e: redis::RedisError| IdentityError::Internal(format!("Redis: {e}"));
        let _: () = c
            .set_ex(format!("{PREFIX}{key}"), v, ttl.max(1))
            .await
            .map_err(err)?;
        let _: () = c
            .publish(CHANNEL, format!("put:{key}"))
            .await
            .map_err(err)?;
        Ok(())
    }

    pub(crate) async fn delete(&self, key: &str) -> Result<bool, IdentityError> {
        let mut c = self.conn.clone();
        let err = |e: redis::RedisError| IdentityError::Internal(format!("Redis: {e}"));
        let n: u64 = c.del(format!("{PREFIX}{key}")).await.map_err(err)?;
        let _: () = c
            .publish(CHANNEL, format!("del:{key}"))
            .await
            .map_err(err)?;
        Ok(n > 0)
    }

    async fn get(&self, key: &str) -> Option<SessionRec> {
        let mut c = self.conn.clone();
        let v: Option<String> = c.get(format!("{PREFIX}{key}")).await.ok()?;
        serde_json::from_str(&v?).ok()
    }
}

impl Identity {
    /// Follow the sessions in Redis: subscribe, load what exists (dropping what no longer
    /// does), then apply every announced change; on a lost connection, start over.
    pub(crate) async fn follow_redis_sessions(self: Arc<Self>, r: Arc<RedisSessions>) {
        loop {
            if let Err(e) = self.clone().follow_redis_once(&r).await {
                tracing::warn!(error = %e, "identity: Redis sessions feed lost; reconnecting");
            }
            tokio::time::sleep(Duration::from_secs(1)).await;
        }
    }

    async fn follow_redis_once(self: Arc<Self>, r: &RedisSessions) -> Result<(), String> {
        let mut pubsub = r
            .client
            .get_async_pubsub()
            .await
            .map_err(|e| e.to_string())?;
        pubsub.subscribe(CHANNEL).await.map_err(|e| e.to_string())?;
        // What exists now (after subscribing: nothing announced meanwhile is missed).
        let mut c = r.conn.clone();
        let keys: Vec<String> = {
            let mut it = c
                .scan_match::<_, String>(format!("{PREFIX}*"))
                .await
                .map_err(|e| e.to_string())?;
            let mut v = Vec::new();
            while let Some(k) = it.next().await {
                v.push(k);
            }
            v
        };
        let mut live = std::collections::HashSet::new();
        for k in keys {
            let key = k.trim_start_matches(PREFIX).to_string();
            if let Some(rec) = r.get(&key).await {
                self.cache_session(&key, &rec);
                live.insert(key);
            }
        }
        // Cached sessions Redis no longer has (logged out while the feed was down); one created
        // after the scan is still there and stays.
        let stale: Vec<String> = self
            .sessions_now()
            .map
            .keys()
            .map(|d| crate::hex(d))
            .filter(|k| !live.contains(k))
            .collect();
        for k in stale {
            if r.get(&k).await.is_none() {
                self.uncache_session(&k);
            }
        }
        let mut stream = pubsub.on_message();
        while let Some(msg) = stream.next().await {
            let Ok(payload) = msg.get_payload::<String>() else {
                continue;
            };
            match payload.split_once(':') {
                Some(("put", key)) => {
                    if let Some(rec) = r.get(key).await {
                        self.cache_session(key, &rec);
                    }
                }
                Some(("del", key)) => self.uncache_session(key),
                _ => {}
            }
        }
        Err("the subscription ended".into())
    }
}
