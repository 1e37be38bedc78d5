//! `/v1/metrics/query` and `/v1/metrics/query_range`: the metrics history, queried with a
//! PromQL subset and answered in the shape of Prometheus's HTTP API (`{"status": "success",
//! "data": {"resultType": ..., "result": ...}}`), so its clients read it.

use axum::extract::rejection::QueryRejection;
use axum::extract::{Query, State};
use axum::routing::get;
use axum::{Json, Router};
use serde::Deserialize;

use crate::parse::{query, ApiResult};
use crate::{ApiError, ApiState};

pub(crate) fn routes() -> Router<ApiState> {
    Router::new()
        .route("/v1/metrics/query", get(instant))
        .route("/v1/metrics/query_range", get(range))
        .route("/v1/metrics/names", get(names))
}

/// A time: unix seconds (Prometheus's form, fractions allowed), unix milliseconds, RFC 3339, or
/// a duration back from now (`1h`).
fn time_of(what: &str, s: &str) -> ApiResult<i64> {
    if let Ok(x) = s.parse::<f64>() {
        if x.is_finite() && x >= 0.0 {
            // Below 10^11 it is seconds (until the year 5138), above milliseconds.
            return Ok(if x < 1e11 {
                (x * 1000.0) as i64
            } else {
                x as i64
            });
        }
    }
    crate::parse::time_ms(s).map(|t| t as i64).ok_or_else(|| {
        ApiError::bad_request(format!(
            "{what}: {s:?} is not unix seconds, unix milliseconds, an RFC 3339 time or a duration like 1h"
        ))
    })
}

fn step_of(s: &str) -> ApiResult<i64> {
    let ms = match s.parse::<f64>() {
        Ok(x) if x.is_finite() => (x * 1000.0) as i64,
        _ => humantime::parse_duration(s)
            .map(|d| d.as_millis() as i64)
            .map_err(|_| {
                ApiError::bad_request(format!("step: {s:?} is not seconds or a duration like 30s"))
            })?,
    };
    if ms < 100 {
        return Err(ApiError::bad_request("step: expected at least 0.1 s"));
    }
    Ok(ms)
}

fn answer(
    r: Result<gantry_tsdb::QueryResult, gantry_tsdb::QueryError>,
) -> ApiResult<Json<serde_json::Value>> {
    match r {
        Ok(data) => Ok(Json(
            serde_json::json!({ "status": "success", "data": data }),
        )),
        Err(gantry_tsdb::QueryError::Bad(m)) => Err(ApiError::bad_request(format!("query: {m}"))),
        Err(e) => Err(ApiError::internal(e.to_string())),
    }
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
pub struct InstantQuery {
    query: String,
    /// Default: now.
    time: Option<String>,
}

pub async fn instant(
    State(s): State<ApiState>,
    q: Result<Query<InstantQuery>, QueryRejection>,
) -> ApiResult<Json<serde_json::Value>> {
    let q = query(q)?;
    let t = match &q.time {
        Some(t) => time_of("time", t)?,
        None => gantry_model::unix_ms() as i64,
    };
    answer(s.tsdb.query(&q.query, t).await)
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RangeQuery {
    query: String,
    start: String,
    /// Default: now.
    end: Option<String>,
    /// Default: the history's sampling step (coarser for long ranges).
    step: Option<String>,
}

pub async fn range(
    State(s): State<ApiState>,
    q: Result<Query<RangeQuery>, QueryRejection>,
) -> ApiResult<Json<serde_json::Value>> {
    let q = query(q)?;
    let start = time_of("start", &q.start)?;
    let end = match &q.end {
        Some(t) => time_of("end", t)?,
        None => gantry_model::unix_ms() as i64,
    };
    // By default the sampling step, or coarser when the range would need too many steps.
    let step = match &q.step {
        Some(st) => step_of(st)?,
        None => (s.tsdb.options.step.as_millis() as i64)
            .max(end.saturating_sub(start) / gantry_tsdb::MAX_STEPS + 1),
    };
    answer(s.tsdb.query_range(&q.query, start, end, step).await)
}

/// The metric names the history has.
pub async fn names(State(s): State<ApiState>) -> Json<serde_json::Value> {
    Json(serde_json::json!({ "status": "success", "data": s.tsdb.names() }))
}
