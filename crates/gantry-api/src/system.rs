//! `/v1/health` and `/metrics`.

use axum::extract::State;
use axum::response::IntoResponse;
use axum::routing::get;
use axum::{Json, Router};
use http::header;

use crate::ApiState;

pub(crate) fn routes() -> Router<ApiState> {
    Router::new()
        .route("/v1/health", get(health))
        .route("/metrics", get(metrics))
}

pub async fn health() -> Json<serde_json::Value> {
    Json(serde_json::json!({ "status": "ok", "version": env!("CARGO_PKG_VERSION") }))
}

/// The format follows `Accept`: OpenMetrics to scrapers that rank it first (Prometheus does),
/// the 0.0.4 text format otherwise.
pub async fn metrics(State(s): State<ApiState>, headers: http::HeaderMap) -> impl IntoResponse {
    let format = gantry_telemetry::Format::negotiate(
        headers.get(header::ACCEPT).and_then(|v| v.to_str().ok()),
    );
    (
        [
            (header::CONTENT_TYPE, format.content_type()),
            (header::VARY, "Accept"),
        ],
        s.metrics.encode_as(format),
    )
}
