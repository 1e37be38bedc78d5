//! `/v1/routes`, `/v1/upstreams`, `/v1/traffic`, `/v1/reload`: the gateway's table, its
//! upstreams and figures, routes added over the API, and spec reloads.

use axum::body::Bytes;
use axum::extract::{Path, State};
use axum::response::IntoResponse;
use axum::routing::{get, post, put};
use axum::{Json, Router};
use http::StatusCode;
use serde::Deserialize;

use crate::parse::{parse_json, ApiResult};
use crate::{ApiError, ApiState};

pub(crate) fn routes() -> Router<ApiState> {
    Router::new()
        .route("/v1/routes", get(list_routes))
        .route("/v1/routes/{name}", put(put_route).delete(delete_route))
        .route("/v1/upstreams", get(list_upstreams))
        .route("/v1/traffic", get(traffic))
        .route("/v1/reload", post(reload))
}

pub async fn list_routes(State(s): State<ApiState>) -> impl IntoResponse {
    Json(s.gateway.routes())
}

fn control_error(e: crate::RouteControlError) -> ApiError {
    match e {
        crate::RouteControlError::Invalid(lines) => ApiError::bad_request(lines.join("\n")),
        crate::RouteControlError::NotFound(m) => ApiError::not_found(m),
        crate::RouteControlError::Conflict(m) => ApiError::conflict(m),
        crate::RouteControlError::Internal(m) => ApiError::internal(m),
    }
}

pub async fn reload(State(s): State<ApiState>) -> ApiResult<Json<crate::ReloadReport>> {
    s.control.reload().await.map(Json).map_err(|e| match e {
        crate::RouteControlError::Invalid(lines) => ApiError::bad_request(format!(
            "the spec file has errors; nothing was changed:\n{}",
            lines.join("\n")
        )),
        other => control_error(other),
    })
}

/// `PUT /v1/routes/{name}` with `{"service": "...", "route": { same fields as a spec route }}`.
/// The body of `PUT /v1/routes/{name}` (for the OpenAPI document; the route's fields are those
/// of a spec route, validated by the spec's own rules).
#[derive(Deserialize, utoipa::ToSchema)]
#[allow(dead_code)]
pub struct RoutePutBody {
    /// The target service.
    service: String,
    /// A route as in the spec file (`path_prefix`, `strip_prefix`, `methods`, ...).
    #[schema(value_type = Object)]
    route: serde_json::Value,
}

pub async fn put_route(
    State(s): State<ApiState>,
    Path(name): Path<String>,
    body: Bytes,
) -> ApiResult<Json<crate::RouteWritten>> {
    let v: serde_json::Value = parse_json(&body)?;
    s.control
        .put_route(&name, v)
        .await
        .map(Json)
        .map_err(control_error)
}

pub async fn delete_route(
    State(s): State<ApiState>,
    Path(name): Path<String>,
) -> ApiResult<StatusCode> {
    s.control.delete_route(&name).await.map_err(control_error)?;
    Ok(StatusCode::NO_CONTENT)
}

pub async fn list_upstreams(State(s): State<ApiState>) -> impl IntoResponse {
    Json(s.gateway.upstreams())
}

/// The gateway's rolling window (the last minute) per route, service and version.
pub async fn traffic(State(s): State<ApiState>) -> impl IntoResponse {
    Json(s.gateway.traffic())
}
