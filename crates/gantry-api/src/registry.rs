//! `/v1/registry/...`: lookups, self-registration with leases, and the watch stream.

use std::collections::BTreeMap;
use std::sync::Arc;

use axum::body::Bytes;
use axum::extract::rejection::QueryRejection;
use axum::extract::{Path, Query, State};
use axum::response::IntoResponse;
use axum::routing::{get, post, put};
use axum::{Json, Router};
use std::time::Duration;

use gantry_model::{Health, Instance, RegistryEvent};
use gantry_registry::{HealthFilter, Query as RegistryQuery, Registration};
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
        .route(
            "/v1/registry/instances/{id}/checks/{check}",
            put(registry_check),
        )
        .route("/v1/registry/discover", post(registry_discover))
        .route("/v1/registry/watch", get(registry_watch))
}

/// The header blocking queries read the index from (Consul's is `X-Consul-Index`).
pub const INDEX_HEADER: &str = "x-gantry-index";

/// Longest `wait` of a blocking query (Consul's cap), and the wait when only `index` is given.
const MAX_WAIT: Duration = Duration::from_secs(600);
const DEFAULT_WAIT: Duration = Duration::from_secs(300);

/// `wait=30s` (`ms`, `s`, `m`), bounded.
pub(crate) fn parse_wait(w: Option<&str>) -> ApiResult<Duration> {
    match w {
        None => Ok(DEFAULT_WAIT),
        Some(w) => {
            let d = humantime::parse_duration(w).map_err(|e| {
                ApiError::bad_request(format!(
                    "wait: expected a duration such as 30s, got {w:?}: {e}"
                ))
            })?;
            Ok(d.min(MAX_WAIT))
        }
    }
}

fn index_header(index: u64) -> [(http::HeaderName, String); 1] {
    [(
        http::HeaderName::from_static(INDEX_HEADER),
        index.to_string(),
    )]
}

/// Every registered instance, by service then id.
pub async fn registry_instances(State(s): State<ApiState>) -> Json<Vec<Instance>> {
    let snap = s.registry.snapshot();
    Json(
        snap.services
            .values()
            .flat_map(|v| v.iter().map(|i| (**i).clone()))
            .collect(),
    )
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
pub struct BlockingQuery {
    /// Answer once the registry changed past this index (from `X-Gantry-Index`).
    #[serde(default)]
    index: Option<u64>,
    /// How long to wait for that change (default 5m, at most 10m).
    #[serde(default)]
    wait: Option<String>,
}

pub async fn registry_services(
    State(s): State<ApiState>,
    q: Result<Query<BlockingQuery>, QueryRejection>,
) -> ApiResult<impl IntoResponse> {
    let q = query(q)?;
    if let Some(index) = q.index {
        s.registry
            .wait_past(None, index, parse_wait(q.wait.as_deref())?)
            .await;
    }
    let snap = s.registry.snapshot();
    let out: BTreeMap<&str, &[Arc<Instance>]> =
        snap.services.iter().map(|(k, v)| (&**k, &v[..])).collect();
    Ok((
        index_header(snap.revision.max(1)),
        Json(serde_json::json!({ "revision": snap.revision, "services": out })),
    ))
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
pub struct LookupQuery {
    /// A semver requirement such as `^1.2` or `>=2, <3`.
    #[serde(default)]
    version: Option<String>,
    /// Comma-separated tags an instance must all have.
    #[serde(default)]
    tags: Option<String>,
    /// Comma-separated `key:value` metadata an instance must all have.
    #[serde(default)]
    meta: Option<String>,
    #[serde(default)]
    zone: Option<String>,
    /// Preferred zone: its instances come first.
    #[serde(default)]
    near: Option<String>,
    /// `passing`, `routable` (passing and warning; the default) or `any`.
    #[serde(default)]
    health: Option<HealthFilter>,
    #[serde(default)]
    index: Option<u64>,
    #[serde(default)]
    wait: Option<String>,
}

fn version_req(v: Option<&str>) -> ApiResult<Option<semver::VersionReq>> {
    v.map(|v| {
        semver::VersionReq::parse(v).map_err(|e| {
            ApiError::bad_request(format!("version: invalid semver requirement {v:?}: {e}"))
        })
    })
    .transpose()
}

/// Instances of one service by version, tags, metadata, zone and health, ordered for
/// locality; with `index`, a blocking query (answers when the service changes past it).
pub async fn registry_lookup(
    State(s): State<ApiState>,
    Path(name): Path<String>,
    q: Result<Query<LookupQuery>, QueryRejection>,
) -> ApiResult<impl IntoResponse> {
    let q = query(q)?;
    let mut metadata = BTreeMap::new();
    for kv in q
        .meta
        .as_deref()
        .unwrap_or("")
        .split(',')
        .filter(|s| !s.is_empty())
    {
        let (k, v) = kv.split_once(':').ok_or_else(|| {
            ApiError::bad_request(format!("meta: expected key:value, got {kv:?}"))
        })?;
        metadata.insert(k.to_string(), v.to_string());
    }
    let rq = RegistryQuery {
        service: name,
        version: version_req(q.version.as_deref())?,
        tags: q
            .tags
            .as_deref()
            .unwrap_or("")
            .split(',')
            .filter(|t| !t.is_empty())
            .map(str::to_string)
            .collect(),
        metadata,
        zone: q.zone,
        near: q.near,
        health: q.health.unwrap_or_default(),
    };
    if let Some(index) = q.index {
        let wait = parse_wait(q.wait.as_deref())?;
        s.registry.wait_past(Some(&rq.service), index, wait).await;
    }
    let (index, instances) = s.registry.query(&rq);
    Ok((index_header(index), Json(instances)))
}

#[derive(Deserialize, serde::Serialize, utoipa::ToSchema)]
#[serde(deny_unknown_fields)]
pub struct CheckUpdate {
    pub status: Health,
    #[serde(default)]
    pub output: Option<String>,
}

/// Set a TTL check's status (also renews the instance's lease).
pub async fn registry_check(
    State(s): State<ApiState>,
    Path((id, check)): Path<(String, String)>,
    body: Bytes,
) -> ApiResult<Json<Instance>> {
    let b: CheckUpdate = parse_json(&body)?;
    Ok(Json(s.registry.update_check(
        &id,
        &check,
        b.status,
        b.output.as_deref().unwrap_or(""),
    )?))
}

/// Client-side discovery in one document: the client names the service, the version it
/// wants and its preferences, and gets full endpoints back, best first.
#[derive(Deserialize, serde::Serialize, utoipa::ToSchema)]
#[serde(deny_unknown_fields)]
pub struct DiscoverRequest {
    pub service: String,
    /// A semver requirement such as `^2`.
    #[serde(default)]
    pub version: Option<String>,
    #[serde(default)]
    pub tags: Vec<String>,
    #[serde(default)]
    pub metadata: BTreeMap<String, String>,
    /// Only this zone.
    #[serde(default)]
    pub zone: Option<String>,
    /// Preferred zone (its instances first).
    #[serde(default)]
    pub near: Option<String>,
    #[serde(default)]
    pub health: Option<HealthFilter>,
    /// At most this many endpoints (default all).
    #[serde(default)]
    pub limit: Option<usize>,
    /// `http` (default) or `https`: the scheme of the endpoints' URLs.
    #[serde(default)]
    pub scheme: Option<String>,
}

#[derive(Deserialize, serde::Serialize, utoipa::ToSchema)]
pub struct DiscoveredEndpoint {
    pub id: String,
    pub url: String,
    pub address: String,
    pub port: u16,
    pub version: String,
    pub node: String,
    #[serde(default)]
    pub zone: Option<String>,
    pub health: Health,
    pub tags: Vec<String>,
    pub metadata: BTreeMap<String, String>,
}

#[derive(Deserialize, serde::Serialize, utoipa::ToSchema)]
pub struct DiscoverAnswer {
    pub service: String,
    /// Pass back as `?index=` of a blocking lookup to hear of the next change.
    pub index: u64,
    pub endpoints: Vec<DiscoveredEndpoint>,
}

pub async fn registry_discover(
    State(s): State<ApiState>,
    body: Bytes,
) -> ApiResult<impl IntoResponse> {
    let d: DiscoverRequest = parse_json(&body)?;
    let scheme = match d.scheme.as_deref().unwrap_or("http") {
        s @ ("http" | "https") => s.to_string(),
        other => {
            return Err(ApiError::bad_request(format!(
                "scheme: expected http or https, got {other:?}"
            )))
        }
    };
    let rq = RegistryQuery {
        service: d.service.clone(),
        version: version_req(d.version.as_deref())?,
        tags: d.tags,
        metadata: d.metadata,
        zone: d.zone,
        near: d.near,
        health: d.health.unwrap_or_default(),
    };
    let (index, instances) = s.registry.query(&rq);
    let endpoints = instances
        .into_iter()
        .take(d.limit.unwrap_or(usize::MAX))
        .map(|i| {
            let sa = std::net::SocketAddr::new(i.address, i.port);
            DiscoveredEndpoint {
                url: format!("{scheme}://{sa}"),
                address: i.address.to_string(),
                port: i.port,
                version: i.version.to_string(),
                id: i.id,
                node: i.node,
                zone: i.zone,
                health: i.health,
                tags: i.tags,
                metadata: i.metadata,
            }
        })
        .collect();
    Ok((
        index_header(index),
        Json(DiscoverAnswer {
            service: d.service,
            index,
            endpoints,
        }),
    ))
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
    let all: Vec<&Arc<Instance>> = snap.services.values().flat_map(|v| v.iter()).collect();
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
