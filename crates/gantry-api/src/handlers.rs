//! Request handlers, one per endpoint, in the order of `router()`.

use std::collections::BTreeMap;

use axum::body::Bytes;
use axum::extract::rejection::QueryRejection;
use axum::extract::{Path, Query, State};
use axum::response::{IntoResponse, Response};
use axum::Json;
use gantry_config::ChangeRequest;
use gantry_model::{Instance, RegistryEvent};
use gantry_registry::Registration;
use gantry_telemetry::LogFilter;
use http::{header, StatusCode};
use serde::de::DeserializeOwned;
use serde::Deserialize;
use std::sync::Arc;

use crate::stream::{self, Format, Item};
use crate::{ApiError, ApiState};

pub(crate) type ApiResult<T> = Result<T, ApiError>;

/// Parse a JSON body, naming the offending field on error.
pub(crate) fn parse_json<T: DeserializeOwned>(body: &Bytes) -> ApiResult<T> {
    if body.is_empty() {
        return Err(ApiError::bad_request("expected a JSON request body"));
    }
    let mut de = serde_json::Deserializer::from_slice(body);
    let value = serde_path_to_error::deserialize(&mut de).map_err(|e| {
        let path = e.path().to_string();
        if path == "." {
            ApiError::bad_request(format!("invalid JSON body: {}", e.inner()))
        } else {
            ApiError::bad_request(format!("invalid JSON body at {path}: {}", e.inner()))
        }
    })?;
    // One JSON document: anything after it but whitespace is refused, not ignored.
    de.end().map_err(|e| {
        ApiError::bad_request(format!(
            "invalid JSON body: unexpected data after the JSON value ({e})"
        ))
    })?;
    Ok(value)
}

fn query<T>(q: Result<Query<T>, QueryRejection>) -> ApiResult<T> {
    q.map(|Query(t)| t)
        .map_err(|e| ApiError::bad_request(format!("invalid query string: {}", e.body_text())))
}

pub async fn health() -> Json<serde_json::Value> {
    Json(serde_json::json!({ "status": "ok", "version": env!("CARGO_PKG_VERSION") }))
}

pub async fn list_services(State(s): State<ApiState>) -> impl IntoResponse {
    Json(s.supervisor.services())
}

#[derive(Deserialize, utoipa::ToSchema)]
#[serde(deny_unknown_fields)]
pub struct ScaleBody {
    replicas: u32,
    /// Which version, when the service runs several.
    #[serde(default)]
    #[schema(value_type = Option<String>)]
    version: Option<semver::Version>,
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

pub async fn reload(State(s): State<ApiState>) -> ApiResult<Json<serde_json::Value>> {
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
) -> ApiResult<Json<serde_json::Value>> {
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

pub async fn config_services(State(s): State<ApiState>) -> ApiResult<impl IntoResponse> {
    Ok(Json(s.config.services().await?))
}

pub async fn config_current(
    State(s): State<ApiState>,
    Path(service): Path<String>,
) -> ApiResult<impl IntoResponse> {
    let v = s.config.current(&service).await?;
    Ok(Json(match v {
        Some(v) => serde_json::to_value(v).unwrap_or_default(),
        None => serde_json::json!({ "service": service, "version": 0, "values": {} }),
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

#[derive(Deserialize, utoipa::ToSchema)]
#[serde(deny_unknown_fields)]
pub struct RollbackBody {
    version: u64,
    #[serde(default)]
    message: Option<String>,
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
    if let Ok(ms) = s.parse::<u64>() {
        return Ok(ms);
    }
    if let Ok(t) = humantime::parse_rfc3339_weak(s) {
        return Ok(t
            .duration_since(std::time::UNIX_EPOCH)
            .map(|d| d.as_millis() as u64)
            .unwrap_or(0));
    }
    if let Ok(d) = humantime::parse_duration(s) {
        return Ok(gantry_model::unix_ms().saturating_sub(d.as_millis() as u64));
    }
    Err(ApiError::bad_request(format!(
        "since: {s:?} is not an RFC 3339 time, unix milliseconds, or a duration like 5m"
    )))
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

pub async fn metrics(State(s): State<ApiState>) -> impl IntoResponse {
    (
        [(
            header::CONTENT_TYPE,
            "text/plain; version=0.0.4; charset=utf-8",
        )],
        s.metrics.encode(),
    )
}
