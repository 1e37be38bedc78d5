//! `/v1/registry/...`: lookups, self-registration with leases, and the watch stream.

use std::collections::BTreeMap;

use axum::body::Bytes;
use axum::extract::rejection::QueryRejection;
use axum::extract::{Path, Query, State};
use axum::response::IntoResponse;
use axum::routing::{get, put};
use axum::{Json, Router};
use gantry_model::{Instance, RegistryEvent};
use gantry_registry::Registration;
use http::StatusCode;
use serde::Deserialize;

use crate::parse::{parse_json, query, ApiResult};
use crate::stream::{self, Format, Item};
use crate::{ApiError, ApiState};

pub(crate) fn routes() -> Router<ApiState> {
    Router::new()
        .route("/v1/registry/services", get(registry_services))
        .route("/v1/registry/services/{name}", get(registry_lookup))
        .route(
            "/v1/registry/instances",
            get(registry_instances).post(registry_register),
        )
        .route(
            "/v1/registry/instances/{id}",
            get(registry_get).delete(registry_deregister),
        )
        .route(
            "/v1/registry/instances/{id}/heartbeat",
            put(registry_heartbeat),
        )
        .route("/v1/registry/watch", get(registry_watch))
}

/// Every registered instance, by service then id.
pub async fn registry_instances(State(s): State<ApiState>) -> Json<Vec<Instance>> {
    let snap = s.registry.snapshot();
    Json(
        snap.services
            .values()
            .flat_map(|v| v.iter().cloned())
            .collect(),
    )
}

pub async fn registry_services(State(s): State<ApiState>) -> impl IntoResponse {
    let snap = s.registry.snapshot();
    let out: BTreeMap<&str, &[Instance]> =
        snap.services.iter().map(|(k, v)| (&**k, &v[..])).collect();
    Json(serde_json::json!({ "revision": snap.revision, "services": out }))
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
pub struct LookupQuery {
    /// A semver requirement such as `^1.2` or `>=2, <3`.
    version: Option<String>,
}

pub async fn registry_lookup(
    State(s): State<ApiState>,
    Path(name): Path<String>,
    q: Result<Query<LookupQuery>, QueryRejection>,
) -> ApiResult<impl IntoResponse> {
    let q = query(q)?;
    let req = match &q.version {
        None => None,
        Some(v) => Some(semver::VersionReq::parse(v).map_err(|e| {
            ApiError::bad_request(format!("version: invalid semver requirement {v:?}: {e}"))
        })?),
    };
    Ok(Json(s.registry.lookup(&name, req.as_ref())))
}

pub async fn registry_register(
    State(s): State<ApiState>,
    body: Bytes,
) -> ApiResult<impl IntoResponse> {
    let reg: Registration = parse_json(&body)?;
    let inst = s.registry.register_external(reg).await?;
    Ok((StatusCode::CREATED, Json(inst)))
}

pub async fn registry_get(
    State(s): State<ApiState>,
    Path(id): Path<String>,
) -> ApiResult<Json<Instance>> {
    s.registry
        .get(&id)
        .map(Json)
        .ok_or_else(|| ApiError::not_found(format!("instance {id} is not registered")))
}

pub async fn registry_heartbeat(
    State(s): State<ApiState>,
    Path(id): Path<String>,
) -> ApiResult<Json<Instance>> {
    Ok(Json(s.registry.heartbeat(&id)?))
}

pub async fn registry_deregister(
    State(s): State<ApiState>,
    Path(id): Path<String>,
) -> ApiResult<StatusCode> {
    s.registry.deregister_external(&id).await?;
    Ok(StatusCode::NO_CONTENT)
}

/// Server-Sent Events: first `snapshot` (all instances), then one event per change, named by
/// kind (`registered`, `updated`, `deregistered`, `expired`), with the revision as event id.
pub async fn registry_watch(State(s): State<ApiState>) -> impl IntoResponse {
    let rx = s.registry.subscribe();
    let snap = s.registry.snapshot();
    let all: Vec<&Instance> = snap.services.values().flat_map(|v| v.iter()).collect();
    let first = Item::new(
        "snapshot",
        serde_json::json!({ "revision": snap.revision, "instances": all }),
    )
    .with_id(snap.revision);
    let since = snap.revision;
    stream::follow(Format::Sse, vec![first], rx, move |e: RegistryEvent| {
        (e.revision > since).then(|| Item::new(e.kind.as_str(), &e).with_id(e.revision))
    })
}
