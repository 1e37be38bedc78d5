//! `/v1/deployments`: the desired state, per service. Reading it shows what the supervisor is
//! reconciling to; a version can be deployed beside the others (the base of blue-green and canary
//! releases) and removed again.

use axum::body::Bytes;
use axum::extract::{Path, State};
use axum::routing::{get, put};
use axum::{Json, Router};
use gantry_model::Deployment;
use gantry_supervisor::VersionChange;

use crate::error::ApiError;
use crate::parse::{parse_json, ApiResult};
use crate::ApiState;

pub(crate) fn routes() -> Router<ApiState> {
    Router::new()
        .route("/v1/deployments", get(list))
        .route("/v1/deployments/{service}", get(one))
        .route(
            "/v1/deployments/{service}/versions/{version}",
            put(put_version).delete(delete_version),
        )
}

fn parse_version(v: &str) -> ApiResult<semver::Version> {
    semver::Version::parse(v).map_err(|e| {
        ApiError::bad_request(format!(
            "version {v:?} is not a semantic version (like 2.1.0): {e}"
        ))
    })
}

async fn list(State(s): State<ApiState>) -> ApiResult<Json<Vec<Deployment>>> {
    Ok(Json(s.supervisor.desired().list().await?))
}

async fn one(
    State(s): State<ApiState>,
    Path(service): Path<String>,
) -> ApiResult<Json<Deployment>> {
    s.supervisor
        .desired()
        .get(&service)
        .await?
        .map(Json)
        .ok_or_else(|| ApiError::not_found(format!("no deployment of service {service:?}")))
}

/// Deploy `version` of `service` beside its other versions (or change one deployed this way).
/// The answer is the desired state written (durable); instances start as the supervisor applies
/// it.
async fn put_version(
    State(s): State<ApiState>,
    Path((service, version)): Path<(String, String)>,
    body: Bytes,
) -> ApiResult<Json<Deployment>> {
    let version = parse_version(&version)?;
    let change: VersionChange = parse_json(&body)?;
    Ok(Json(
        s.supervisor
            .desired()
            .put_version(&service, version, change)
            .await?,
    ))
}

async fn delete_version(
    State(s): State<ApiState>,
    Path((service, version)): Path<(String, String)>,
) -> ApiResult<Json<Deployment>> {
    let version = parse_version(&version)?;
    Ok(Json(
        s.supervisor
            .desired()
            .remove_version(&service, &version)
            .await?,
    ))
}
