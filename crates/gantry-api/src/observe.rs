//! `/v1/logs` (NDJSON) and `/v1/events` (Server-Sent Events).

use std::sync::Arc;

use axum::extract::rejection::QueryRejection;
use axum::extract::{Query, State};
use axum::response::{IntoResponse, Response};
use axum::routing::get;
use axum::Router;
use gantry_telemetry::LogFilter;
use serde::Deserialize;

use crate::parse::{query, ApiResult};
use crate::stream::{self, Format, Item};
use crate::{ApiError, ApiState};

pub(crate) fn routes() -> Router<ApiState> {
    Router::new()
        .route("/v1/logs", get(logs))
        .route("/v1/events", get(events))
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
pub struct LogsQuery {
    service: Option<String>,
    instance: Option<String>,
    /// RFC 3339 time, unix milliseconds, or a duration back from now (`90s`, `5m`, `1h`).
    since: Option<String>,
    tail: Option<usize>,
    #[serde(default)]
    follow: bool,
}

fn parse_since(s: &str) -> ApiResult<u64> {
    crate::parse::time_ms(s).ok_or_else(|| {
        ApiError::bad_request(format!(
            "since: {s:?} is not an RFC 3339 time, unix milliseconds, or a duration like 5m"
        ))
    })
}

/// Newline-delimited JSON, one object per line; with `follow=true` the response stays open and
/// new lines are sent as they are captured.
pub async fn logs(
    State(s): State<ApiState>,
    q: Result<Query<LogsQuery>, QueryRejection>,
) -> ApiResult<Response> {
    let q = query(q)?;
    if let Some(svc) = &q.service {
        // `gateway`: the gateway's access log (instance `access`), when it is on.
        if svc != "gateway" && !s.supervisor.has_service(svc) {
            return Err(ApiError::not_found(format!("unknown service {svc:?}")));
        }
    }
    let filter = LogFilter {
        service: q.service,
        instance: q.instance,
        since_ms: q.since.as_deref().map(parse_since).transpose()?,
        tail: q.tail,
    };
    let line = |l: &gantry_telemetry::LogLine| Item::new("line", l);
    if !q.follow {
        let lines = s.logs.query(&filter);
        return Ok(stream::once(Format::Ndjson, lines.iter().map(|l| line(l))));
    }
    // Subscribe before reading what is kept, then skip what was already sent.
    let rx = s.logs.subscribe();
    let initial = s.logs.query(&filter);
    let mut last = initial.last().map_or(0, |l| l.seq);
    let first = initial.iter().map(|l| line(l)).collect();
    Ok(stream::follow(
        Format::Ndjson,
        first,
        rx,
        move |l: Arc<gantry_telemetry::LogLine>| {
            (l.seq > last && filter.matches(&l)).then(|| {
                last = l.seq;
                line(&l)
            })
        },
    ))
}

/// Server-Sent Events of supervisor lifecycle events (started, healthy, exited, ...).
pub async fn events(State(s): State<ApiState>) -> impl IntoResponse {
    let rx = s.supervisor.board().subscribe();
    stream::follow(Format::Sse, Vec::new(), rx, |e| {
        Some(Item::new("lifecycle", &e))
    })
}
