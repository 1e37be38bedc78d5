//! `/v1/services`, `/v1/instances`: what runs, scale and rolling restart.

use axum::body::Bytes;
use axum::extract::rejection::QueryRejection;
use axum::extract::{Path, Query, State};
use axum::response::IntoResponse;
use axum::routing::{get, post};
use axum::{Json, Router};
use serde::Deserialize;

use crate::parse::{parse_json, query, ApiResult};
use crate::{ApiError, ApiState};

pub(crate) fn routes() -> Router<ApiState> {
    Router::new()
        .route("/v1/services", get(list_services))
        .route("/v1/services/{name}/scale", post(scale))
        .route("/v1/services/{name}/restart", post(restart))
        .route("/v1/instances", get(list_instances))
}

pub async fn list_services(State(s): State<ApiState>) -> impl IntoResponse {
    Json(s.supervisor.services())
}

#[derive(serde::Serialize, Deserialize, utoipa::ToSchema)]
#[serde(deny_unknown_fields)]
pub struct ScaleBody {
    pub replicas: u32,
    /// Which version, when the service runs several.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schema(value_type = Option<String>)]
    pub version: Option<semver::Version>,
}

pub async fn scale(
    State(s): State<ApiState>,
    Path(name): Path<String>,
    body: Bytes,
) -> ApiResult<Json<serde_json::Value>> {
    let b: ScaleBody = parse_json(&body)?;
    s.supervisor
        .scale(&name, b.version.as_ref(), b.replicas)
        .await?;
    Ok(Json(
        serde_json::json!({ "service": name, "version": b.version, "replicas": b.replicas }),
    ))
}

pub async fn restart(
    State(s): State<ApiState>,
    Path(name): Path<String>,
) -> ApiResult<impl IntoResponse> {
    Ok(Json(s.supervisor.restart(&name).await?))
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
pub struct InstancesQuery {
    service: Option<String>,
}

pub async fn list_instances(
    State(s): State<ApiState>,
    q: Result<Query<InstancesQuery>, QueryRejection>,
) -> ApiResult<impl IntoResponse> {
    let q = query(q)?;
    if let Some(svc) = &q.service {
        if !s.supervisor.has_service(svc) {
            return Err(ApiError::not_found(format!("unknown service {svc:?}")));
        }
    }
    let list: Vec<_> = s
        .supervisor
        .instances()
        .into_iter()
        .filter(|i| q.service.as_ref().is_none_or(|svc| &i.service == svc))
        .collect();
    Ok(Json(list))
}
