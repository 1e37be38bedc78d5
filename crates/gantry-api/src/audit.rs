//! The audit trail: every call that changes state (and every such call refused) is recorded in
//! the store's `audit` bucket — who, what, when, from where, its request id and its outcome —
//! before its answer goes out. `GET /v1/audit` and `gantry audit` read it.

use std::net::SocketAddr;
use std::time::Duration;

use axum::extract::{ConnectInfo, Query, Request, State};
use axum::Json;
use gantry_store::{BucketOptions, StoreJsonExt};
use http::{Method, StatusCode};
use serde::{Deserialize, Serialize};

use crate::auth::{Permission, Principal};
use crate::error::ApiError;
use crate::ApiState;

pub const AUDIT_BUCKET: &str = "audit";
/// Records older than this are dropped by the store.
pub const AUDIT_MAX_AGE: Duration = Duration::from_secs(90 * 24 * 3600);

/// The audit bucket's options (set once at start).
pub fn bucket_options() -> BucketOptions {
    BucketOptions {
        history: 1,
        max_age: Some(AUDIT_MAX_AGE),
    }
}

/// One recorded call.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, utoipa::ToSchema)]
pub struct AuditRecord {
    pub id: String,
    pub time_ms: u64,
    /// The principal's id; absent when the call had no valid credentials.
    pub principal: Option<String>,
    pub principal_kind: Option<String>,
    pub method: String,
    pub path: String,
    /// The permission the endpoint requires, e.g. `routes:write`.
    pub action: String,
    pub remote: Option<String>,
    pub request_id: String,
    pub status: u16,
    /// `ok` (2xx/3xx), `denied` (401/403) or `failed` (any other status).
    pub outcome: String,
}

/// One call to record.
pub struct Call<'a> {
    pub principal: Option<&'a Principal>,
    pub method: &'a Method,
    pub path: &'a str,
    pub template: &'a str,
    pub permission: Permission,
    pub remote: Option<SocketAddr>,
    pub request_id: &'a str,
    pub status: StatusCode,
}

pub fn remote(req: &Request) -> Option<SocketAddr> {
    req.extensions()
        .get::<ConnectInfo<SocketAddr>>()
        .map(|c| c.0)
}

/// The caller's `x-request-id` when it is sane, else a new one.
pub fn request_id(req: &Request) -> String {
    req.headers()
        .get("x-request-id")
        .and_then(|v| v.to_str().ok())
        .filter(|v| {
            !v.is_empty()
                && v.len() <= 128
                && v.bytes()
                    .all(|c| c.is_ascii_alphanumeric() || b"-_.:".contains(&c))
        })
        .map(str::to_string)
        .unwrap_or_else(|| gantry_registry::random_hex(16))
}

pub(crate) async fn record(s: &ApiState, c: Call<'_>) {
    record_in(s.store.as_ref(), c).await
}

/// Record a call in the audit trail of `store` (for listeners other than the admin API's:
/// the Consul and Eureka compatible ones).
pub async fn record_in(store: &dyn gantry_store::Store, c: Call<'_>) {
    let time_ms = gantry_model::unix_ms();
    let outcome = match c.status.as_u16() {
        200..=399 => "ok",
        401 | 403 => "denied",
        _ => "failed",
    };
    let rec = AuditRecord {
        id: format!("{time_ms:013}-{}", gantry_registry::random_hex(4)),
        time_ms,
        principal: c.principal.map(|p| p.id.clone()),
        principal_kind: c.principal.map(|p| p.kind.to_string()),
        method: c.method.to_string(),
        path: c.path.to_string(),
        action: c.permission.as_str().to_string(),
        remote: c.remote.map(|a| a.to_string()),
        request_id: c.request_id.to_string(),
        status: c.status.as_u16(),
        outcome: outcome.into(),
    };
    tracing::info!(
        target: "gantry::audit",
        principal = rec.principal.as_deref().unwrap_or("-"),
        method = %rec.method,
        path = %rec.path,
        template = c.template,
        action = %rec.action,
        status = rec.status,
        request_id = %rec.request_id,
        "audit"
    );
    if let Err(e) = store.create_json(AUDIT_BUCKET, &rec.id, &rec).await {
        tracing::error!(error = %e, request_id = %rec.request_id, "cannot write audit record");
    }
}

/// Refused calls recorded per second, at most: anyone who can reach the listener can be
/// refused, and must not be able to fill the store with the trail of it.
const DENIED_PER_SECOND: u64 = 50;

/// A refused call: recorded when it would have changed state (within the rate above; the rest
/// are counted in the log).
pub(crate) async fn denied(s: &ApiState, c: Call<'_>) {
    denied_in(s.store.as_ref(), c).await
}

/// A refused call on any listener: recorded when it would have changed state, at most
/// `DENIED_PER_SECOND` a second over all listeners (the rest are counted in the log).
pub async fn denied_in(store: &dyn gantry_store::Store, c: Call<'_>) {
    use std::sync::atomic::{AtomicU64, Ordering};
    static WINDOW: AtomicU64 = AtomicU64::new(0);
    static COUNT: AtomicU64 = AtomicU64::new(0);
    if c.method == Method::GET || c.method == Method::HEAD {
        return;
    }
    let second = gantry_model::unix_ms() / 1000;
    if WINDOW.swap(second, Ordering::Relaxed) != second {
        COUNT.store(0, Ordering::Relaxed);
    }
    if COUNT.fetch_add(1, Ordering::Relaxed) >= DENIED_PER_SECOND {
        tracing::warn!(target: "gantry::audit", method = %c.method, path = c.path, "refused call not recorded: over {DENIED_PER_SECOND} refusals this second");
        return;
    }
    record_in(store, c).await;
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
pub(crate) struct AuditQuery {
    /// Newest first, at most this many (default 100, at most 10,000).
    #[serde(default)]
    limit: Option<usize>,
    /// Only records at or after this time (ms since the epoch).
    #[serde(default)]
    since: Option<u64>,
    #[serde(default)]
    principal: Option<String>,
}

pub(crate) async fn list(
    State(s): State<ApiState>,
    q: Result<Query<AuditQuery>, axum::extract::rejection::QueryRejection>,
) -> Result<Json<Vec<AuditRecord>>, ApiError> {
    let Query(q) = q.map_err(|e| ApiError::bad_request(e.body_text()))?;
    let limit = q.limit.unwrap_or(100);
    if limit == 0 || limit > 10_000 {
        return Err(ApiError::bad_request("limit: expected 1..=10000"));
    }
    // Keys start with the time (13 digits), so the newest are last and `since` needs no value:
    // only the records returned are read.
    let keys = s.store.keys(AUDIT_BUCKET, ">").await?;
    let mut out = Vec::with_capacity(limit.min(keys.len()));
    for key in keys.iter().rev() {
        if out.len() >= limit {
            break;
        }
        let time_ms: u64 = key.get(..13).and_then(|t| t.parse().ok()).unwrap_or(0);
        if q.since.is_some_and(|t| time_ms < t) {
            break;
        }
        let Some((r, _)) = s.store.get_json::<AuditRecord>(AUDIT_BUCKET, key).await? else {
            continue;
        };
        if q.principal
            .as_deref()
            .is_some_and(|p| r.principal.as_deref() != Some(p))
        {
            continue;
        }
        out.push(r);
    }
    Ok(Json(out))
}
