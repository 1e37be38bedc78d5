//! `/v1/config/...`: versioned config per service.

use axum::body::Bytes;
use axum::extract::{Path, State};
use axum::response::IntoResponse;
use axum::routing::{get, post};
use axum::{Json, Router};
use gantry_config::{ChangeRequest, CurrentConfig};
use http::StatusCode;
use serde::Deserialize;

use crate::parse::{parse_json, ApiResult};
use crate::ApiState;

pub(crate) fn routes() -> Router<ApiState> {
    Router::new()
        .route("/v1/config", get(config_services))
        .route(
            "/v1/config/{service}",
            get(config_current).patch(config_change),
        )
        .route("/v1/config/{service}/history", get(config_history))
        .route("/v1/config/{service}/rollback", post(config_rollback))
}

pub async fn config_services(State(s): State<ApiState>) -> ApiResult<impl IntoResponse> {
    Ok(Json(s.config.services().await?))
}

pub async fn config_current(
    State(s): State<ApiState>,
    Path(service): Path<String>,
) -> ApiResult<impl IntoResponse> {
    let v = s.config.current(&service).await?;
    Ok(Json(match v {
        Some(v) => CurrentConfig {
            service: v.service,
            version: v.version,
            values: v.values,
        },
        None => CurrentConfig {
            service,
            ..CurrentConfig::default()
        },
    }))
}

pub async fn config_change(
    State(s): State<ApiState>,
    Path(service): Path<String>,
    body: Bytes,
) -> ApiResult<impl IntoResponse> {
    let req: ChangeRequest = parse_json(&body)?;
    let c = s.config.change(&service, req).await?;
    let status = if c.created {
        StatusCode::CREATED
    } else {
        StatusCode::OK
    };
    Ok((status, Json(c)))
}

pub async fn config_history(
    State(s): State<ApiState>,
    Path(service): Path<String>,
) -> ApiResult<impl IntoResponse> {
    Ok(Json(s.config.history(&service).await?))
}

#[derive(serde::Serialize, Deserialize, utoipa::ToSchema)]
#[serde(deny_unknown_fields)]
pub struct RollbackBody {
    pub version: u64,
    #[serde(default)]
    pub message: Option<String>,
}

pub async fn config_rollback(
    State(s): State<ApiState>,
    Path(service): Path<String>,
    body: Bytes,
) -> ApiResult<impl IntoResponse> {
    let b: RollbackBody = parse_json(&body)?;
    let c = s.config.rollback(&service, b.version, b.message).await?;
    Ok((StatusCode::CREATED, Json(c)))
}
