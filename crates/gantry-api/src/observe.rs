//! `/v1/logs` (NDJSON) and `/v1/events` (Server-Sent Events).

use std::sync::Arc;

use axum::extract::{RawQuery, State};
use axum::response::{IntoResponse, Response};
use axum::routing::get;
use axum::Router;
use gantry_telemetry::LogFilter;

use crate::parse::ApiResult;
use crate::stream::{self, Format, Item};
use crate::{ApiError, ApiState};

pub(crate) fn routes() -> Router<ApiState> {
    Router::new()
        .route("/v1/logs", get(logs))
        .route("/v1/events", get(events))
}

/// The query of `/v1/logs` (read by hand: `field` may repeat).
#[derive(Default)]
pub struct LogsQuery {
    service: Option<String>,
    instance: Option<String>,
    /// RFC 3339 time, unix milliseconds, or a duration back from now (`90s`, `5m`, `1h`).
    since: Option<String>,
    /// The same forms: only lines before it.
    until: Option<String>,
    /// A regular expression the line must match.
    grep: Option<String>,
    /// The least severity: trace, debug, info, warn, error, fatal.
    level: Option<String>,
    /// `KEY=VALUE`: a JSON line's top-level field (repeatable).
    fields: Vec<(String, String)>,
    /// Lines of one request: its request id or trace id (the access log's, or named in a
    /// service's line).
    request_id: Option<String>,
    trace_id: Option<String>,
    tail: Option<usize>,
    /// At most this many lines (default 10000, at most 100000).
    limit: Option<usize>,
    follow: bool,
}

impl LogsQuery {
    fn parse(raw: Option<&str>) -> ApiResult<Self> {
        let mut q = LogsQuery::default();
        let number = |k: &str, v: &str| {
            v.parse::<usize>()
                .map_err(|_| ApiError::bad_request(format!("{k}: {v:?} is not a whole number")))
        };
        for (k, v) in form_urlencoded::parse(raw.unwrap_or("").as_bytes()) {
            let v = v.into_owned();
            match &*k {
                "service" => q.service = Some(v),
                "instance" => q.instance = Some(v),
                "since" => q.since = Some(v),
                "until" => q.until = Some(v),
                "grep" => q.grep = Some(v),
                "level" => q.level = Some(v),
                "field" => {
                    let Some((name, value)) = v.split_once('=') else {
                        return Err(ApiError::bad_request(format!(
                            "field: {v:?}: expected KEY=VALUE"
                        )));
                    };
                    q.fields.push((name.to_string(), value.to_string()));
                }
                "request_id" => q.request_id = Some(v),
                "trace_id" => q.trace_id = Some(v),
                "tail" => q.tail = Some(number("tail", &v)?),
                "limit" => q.limit = Some(number("limit", &v)?),
                "follow" => {
                    q.follow = match v.as_str() {
                        "true" | "1" | "" => true,
                        "false" | "0" => false,
                        _ => {
                            return Err(ApiError::bad_request(format!(
                                "follow: {v:?}: expected true or false"
                            )))
                        }
                    }
                }
                other => {
                    return Err(ApiError::bad_request(format!(
                        "unknown query parameter {other:?}; expected service, instance, since, until, grep, level, field, request_id, trace_id, tail, limit, follow"
                    )))
                }
            }
        }
        Ok(q)
    }
}

fn parse_time(what: &str, s: &str) -> ApiResult<u64> {
    crate::parse::time_ms(s).ok_or_else(|| {
        ApiError::bad_request(format!(
            "{what}: {s:?} is not an RFC 3339 time, unix milliseconds, or a duration like 5m"
        ))
    })
}

/// A line as the API gives it: with its level and, for a JSON line, its fields.
#[derive(serde::Serialize)]
struct LineOut<'a> {
    #[serde(flatten)]
    line: &'a gantry_telemetry::LogLine,
    #[serde(skip_serializing_if = "Option::is_none")]
    level: Option<gantry_telemetry::Level>,
    #[serde(skip_serializing_if = "Option::is_none")]
    fields: Option<serde_json::Map<String, serde_json::Value>>,
}

fn line_item(l: &gantry_telemetry::LogLine) -> Item {
    let fields = l.json();
    Item::new(
        "line",
        LineOut {
            line: l,
            level: gantry_telemetry::level_of(&l.line, fields.as_ref()),
            fields,
        },
    )
}

fn filter_of(q: &LogsQuery) -> ApiResult<LogFilter> {
    let grep = q
        .grep
        .as_deref()
        .map(|g| {
            regex::RegexBuilder::new(g)
                .size_limit(1 << 20)
                .build()
                .map_err(|e| ApiError::bad_request(format!("grep: {e}")))
        })
        .transpose()?;
    let level = q
        .level
        .as_deref()
        .map(|l| {
            gantry_telemetry::Level::parse(l).ok_or_else(|| {
                ApiError::bad_request(format!(
                    "level: {l:?}: expected trace, debug, info, warn, error or fatal"
                ))
            })
        })
        .transpose()?;
    if q.request_id.is_some() && q.trace_id.is_some() {
        return Err(ApiError::bad_request(
            "give request_id or trace_id, not both",
        ));
    }
    if q.limit.is_some_and(|l| l == 0 || l > 100_000) {
        return Err(ApiError::bad_request("limit: expected 1..=100000"));
    }
    Ok(LogFilter {
        service: q.service.clone(),
        instance: q.instance.clone(),
        since_ms: q
            .since
            .as_deref()
            .map(|s| parse_time("since", s))
            .transpose()?,
        until_ms: q
            .until
            .as_deref()
            .map(|s| parse_time("until", s))
            .transpose()?,
        grep,
        level,
        fields: q.fields.clone(),
        correlate: q.request_id.clone().or(q.trace_id.clone()),
        tail: q.tail,
    })
}

/// Newline-delimited JSON, one object per line, oldest first: from `since` on, else the newest
/// (`tail`, else up to `limit`). When more lines matched than `limit` (without an explicit
/// `tail`), the first object is `{"truncated": true}`. With `follow=true` the response stays
/// open and new lines are sent as they are captured.
pub async fn logs(State(s): State<ApiState>, RawQuery(raw): RawQuery) -> ApiResult<Response> {
    let q = LogsQuery::parse(raw.as_deref())?;
    let mut filter = filter_of(&q)?;
    let limit = q.limit.unwrap_or(10_000);
    // Without a start or a tail: the newest lines (up to `limit`), as a terminal shows them.
    if filter.tail.is_none() && filter.since_ms.is_none() {
        filter.tail = Some(limit);
    }
    // Subscribe before reading what is kept, then skip what was already sent.
    let rx = q.follow.then(|| s.logs.subscribe());
    let (lines, truncated) = s
        .logs
        .search(&filter, limit)
        .await
        .map_err(|e| ApiError::internal(format!("reading the log store: {e}")))?;
    // `gateway`: the gateway's access log (instance `access`), when it is on. A service that
    // is gone still has its lines; a name that never had any is not found.
    if let Some(svc) = &q.service {
        if lines.is_empty() && svc != "gateway" && !s.supervisor.has_service(svc) {
            // The search was for the service alone: nothing found means it never had a line.
            let only_service = q.instance.is_none()
                && q.since.is_none()
                && q.until.is_none()
                && q.grep.is_none()
                && q.level.is_none()
                && q.fields.is_empty()
                && q.request_id.is_none()
                && q.trace_id.is_none();
            if only_service {
                return Err(ApiError::not_found(format!("unknown service {svc:?}")));
            }
            let any = LogFilter {
                service: Some(svc.clone()),
                tail: Some(1),
                ..Default::default()
            };
            let seen = s
                .logs
                .search(&any, 1)
                .await
                .is_ok_and(|(v, _)| !v.is_empty());
            if !seen {
                return Err(ApiError::not_found(format!("unknown service {svc:?}")));
            }
        }
    }
    // Lines left out that the caller did not ask to leave out (an explicit tail asks to).
    let mut items: Vec<Item> = Vec::new();
    if truncated && q.tail.is_none() {
        items.push(Item::new(
            "truncated",
            serde_json::json!({ "truncated": true }),
        ));
    }
    items.extend(lines.iter().map(|l| line_item(l)));
    let Some(rx) = rx else {
        return Ok(stream::once(Format::Ndjson, items));
    };
    let mut last = lines.last().map_or(0, |l| l.seq);
    Ok(stream::follow(
        Format::Ndjson,
        items,
        rx,
        move |l: Arc<gantry_telemetry::LogLine>| {
            (l.seq > last && filter.matches(&l)).then(|| {
                last = l.seq;
                line_item(&l)
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
