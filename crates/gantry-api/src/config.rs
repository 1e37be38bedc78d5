//! `/v1/config/...`: layered, versioned config per service (`{set}` is a service name or
//! `_global`), with secrets redacted unless `reveal=true` is asked by a principal with
//! `config:reveal` (checked and audited by the auth layer).

use axum::body::Bytes;
use axum::extract::rejection::QueryRejection;
use axum::extract::{Path, Query, State};
use axum::response::IntoResponse;
use axum::routing::{get, post};
use axum::{Extension, Json, Router};
use gantry_config::format::{self, Format};
use gantry_config::{Author, ChangeRequest, Layer, Replace};
use http::{header, StatusCode};
use serde::Deserialize;

use crate::auth::Caller;
use crate::parse::{parse_json, query, ApiResult};
use crate::stream::{self, Item};
use crate::{ApiError, ApiState};

pub(crate) fn routes() -> Router<ApiState> {
    Router::new()
        .route("/v1/config", get(config_sets))
        .route("/v1/config/{set}", get(config_current).patch(config_change))
        .route("/v1/config/{set}/history", get(config_history))
        .route("/v1/config/{set}/versions/{version}", get(config_version))
        .route("/v1/config/{set}/diff", get(config_diff))
        .route("/v1/config/{set}/rollback", post(config_rollback))
        .route("/v1/config/{set}/export", get(config_export))
        .route("/v1/config/{set}/import", post(config_import))
        .route("/v1/config/{set}/resolved", get(config_resolved))
        .route("/v1/config/{set}/watch", get(config_watch))
}

fn author(c: &Caller) -> String {
    c.0.as_ref()
        .map_or_else(|| "anonymous".into(), |p| p.id.clone())
}

pub async fn config_sets(State(s): State<ApiState>) -> ApiResult<Json<Vec<String>>> {
    Ok(Json(s.config.sets().await?))
}

#[derive(Deserialize, Default)]
#[serde(deny_unknown_fields)]
pub struct RevealQuery {
    /// Show secret values (needs `config:reveal`; audited).
    #[serde(default)]
    reveal: Option<bool>,
}

pub async fn config_current(
    State(s): State<ApiState>,
    Path(set): Path<String>,
    q: Result<Query<RevealQuery>, QueryRejection>,
) -> ApiResult<impl IntoResponse> {
    let q = query(q)?;
    Ok(Json(s.config.view(&set, q.reveal.unwrap_or(false)).await?))
}

pub async fn config_change(
    State(s): State<ApiState>,
    Path(set): Path<String>,
    Extension(caller): Extension<Caller>,
    body: Bytes,
) -> ApiResult<impl IntoResponse> {
    let req: ChangeRequest = parse_json(&body)?;
    let c = s.config.change(&set, req, &author(&caller)).await?;
    let status = if c.created {
        StatusCode::CREATED
    } else {
        StatusCode::OK
    };
    Ok((status, Json(c)))
}

#[derive(Deserialize, Default)]
#[serde(deny_unknown_fields)]
pub struct HistoryQuery {
    #[serde(default)]
    reveal: Option<bool>,
    /// Only the newest N versions.
    #[serde(default)]
    limit: Option<usize>,
}

pub async fn config_history(
    State(s): State<ApiState>,
    Path(set): Path<String>,
    q: Result<Query<HistoryQuery>, QueryRejection>,
) -> ApiResult<impl IntoResponse> {
    let q = query(q)?;
    let mut h = s.config.history(&set, q.reveal.unwrap_or(false)).await?;
    if let Some(n) = q.limit {
        h.drain(..h.len().saturating_sub(n));
    }
    Ok(Json(h))
}

pub async fn config_version(
    State(s): State<ApiState>,
    Path((set, version)): Path<(String, String)>,
    q: Result<Query<RevealQuery>, QueryRejection>,
) -> ApiResult<impl IntoResponse> {
    let q = query(q)?;
    let version: u64 = version.parse().map_err(|_| {
        ApiError::bad_request(format!("version: expected a number, got {version:?}"))
    })?;
    Ok(Json(
        s.config
            .version(&set, version, q.reveal.unwrap_or(false))
            .await?,
    ))
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
pub struct DiffQuery {
    from: u64,
    /// Default: the current version.
    #[serde(default)]
    to: Option<u64>,
    #[serde(default)]
    reveal: Option<bool>,
}

pub async fn config_diff(
    State(s): State<ApiState>,
    Path(set): Path<String>,
    q: Result<Query<DiffQuery>, QueryRejection>,
) -> ApiResult<impl IntoResponse> {
    let q = query(q)?;
    let to = match q.to {
        Some(v) => v,
        None => s.config.version_of(&set).await?,
    };
    Ok(Json(
        s.config
            .diff(&set, q.from, to, q.reveal.unwrap_or(false))
            .await?,
    ))
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
    Path(set): Path<String>,
    Extension(caller): Extension<Caller>,
    body: Bytes,
) -> ApiResult<impl IntoResponse> {
    let b: RollbackBody = parse_json(&body)?;
    let c = s
        .config
        .rollback(
            &set,
            b.version,
            Author {
                name: author(&caller),
                message: b.message.unwrap_or_default(),
            },
        )
        .await?;
    Ok((StatusCode::CREATED, Json(c)))
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ExportQuery {
    /// `json` (default), `toml` or `env` (one layer, see `env`/`instance`).
    #[serde(default)]
    format: Option<String>,
    /// Default: the current version.
    #[serde(default)]
    version: Option<u64>,
    /// With `format=env`: which layer (default the base layer).
    #[serde(default)]
    env: Option<String>,
    #[serde(default)]
    instance: Option<String>,
    #[serde(default)]
    reveal: Option<bool>,
}

pub async fn config_export(
    State(s): State<ApiState>,
    Path(set): Path<String>,
    q: Result<Query<ExportQuery>, QueryRejection>,
) -> ApiResult<impl IntoResponse> {
    let q = query(q)?;
    let f = Format::parse(q.format.as_deref().unwrap_or("json"))?;
    let layer = Layer::from_parts(q.env.as_deref(), q.instance.as_deref())?;
    if f != Format::Env && layer != Layer::Base {
        return Err(ApiError::bad_request(
            "env and instance pick the layer of a .env export; json and toml carry every layer",
        ));
    }
    let (version, mut doc) = s
        .config
        .export(&set, q.version, q.reveal.unwrap_or(false))
        .await?;
    let text = match f {
        Format::Env => {
            let l = doc.layers().into_iter().find(|(l, _)| *l == layer);
            format::render_env(&l.map(|(_, d)| d).unwrap_or_default())
        }
        _ => {
            doc.env.retain(|_, d| !d.is_empty());
            format::render(&doc, f)?
        }
    };
    Ok((
        [
            (header::CONTENT_TYPE, f.content_type().to_string()),
            (
                header::HeaderName::from_static("gantry-config-version"),
                version.to_string(),
            ),
        ],
        text,
    ))
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ImportQuery {
    /// `json` (default), `toml` or `env`.
    #[serde(default)]
    format: Option<String>,
    /// Remove keys the document does not mention (secrets it lists as redacted are kept).
    #[serde(default)]
    replace: Option<bool>,
    /// With `format=env`: the layer the lines go to.
    #[serde(default)]
    env: Option<String>,
    #[serde(default)]
    instance: Option<String>,
    /// With `format=env`: comma-separated keys to store as secrets.
    #[serde(default)]
    secrets: Option<String>,
    #[serde(default)]
    message: Option<String>,
}

pub async fn config_import(
    State(s): State<ApiState>,
    Path(set): Path<String>,
    Extension(caller): Extension<Caller>,
    q: Result<Query<ImportQuery>, QueryRejection>,
    body: Bytes,
) -> ApiResult<impl IntoResponse> {
    let q = query(q)?;
    let f = Format::parse(q.format.as_deref().unwrap_or("json"))?;
    let text = std::str::from_utf8(&body)
        .map_err(|_| ApiError::bad_request("the document must be UTF-8 text"))?;
    let mut doc = format::parse(text, f)?;
    let layer = Layer::from_parts(q.env.as_deref(), q.instance.as_deref())?;
    if f == Format::Env {
        let secrets: Vec<&str> = q
            .secrets
            .as_deref()
            .map(|s| s.split(',').filter(|k| !k.is_empty()).collect())
            .unwrap_or_default();
        for k in &secrets {
            let v = doc.values.remove(*k).ok_or_else(|| {
                ApiError::bad_request(format!("secrets: {k} is not in the document"))
            })?;
            doc.secrets.insert((*k).to_string(), v);
        }
        if layer != Layer::Base {
            let moved = gantry_config::LayerDoc {
                values: std::mem::take(&mut doc.values),
                secrets: std::mem::take(&mut doc.secrets),
                redacted: std::mem::take(&mut doc.redacted),
            };
            match &layer {
                Layer::Env(e) => {
                    doc.env.insert(e.clone(), moved);
                }
                Layer::Instance(i) => {
                    doc.instance.insert(i.clone(), moved);
                }
                Layer::Base => {}
            }
        }
    } else if layer != Layer::Base || q.secrets.is_some() {
        return Err(ApiError::bad_request(
            "env, instance and secrets apply to a .env import; json and toml documents say them themselves",
        ));
    }
    // A .env file carries one layer: replacing touches that layer only.
    let replace = match (q.replace.unwrap_or(false), f) {
        (false, _) => Replace::Nothing,
        (true, Format::Env) => Replace::Layers(vec![layer]),
        (true, _) => Replace::All,
    };
    let c = s
        .config
        .import(
            &set,
            doc,
            replace,
            Author {
                name: author(&caller),
                message: q.message.unwrap_or_else(|| {
                    format!("import ({})", q.format.as_deref().unwrap_or("json"))
                }),
            },
        )
        .await?;
    let status = if c.created {
        StatusCode::CREATED
    } else {
        StatusCode::OK
    };
    Ok((status, Json(c)))
}

#[derive(Deserialize, Default)]
#[serde(deny_unknown_fields)]
pub struct ResolvedQuery {
    /// The environment layer (default: the one gantry runs with).
    #[serde(default)]
    env: Option<String>,
    #[serde(default)]
    instance: Option<String>,
    #[serde(default)]
    reveal: Option<bool>,
    /// `sse` (default) or `ndjson`, for the watch.
    #[serde(default)]
    format: Option<String>,
}

fn resolved_args(s: &ApiState, q: &ResolvedQuery) -> ApiResult<(Option<String>, Option<String>)> {
    if let Some(e) = &q.env {
        gantry_config::model::check_env_name(e)?;
    }
    if let Some(i) = &q.instance {
        Layer::from_parts(None, Some(i))?;
    }
    Ok((
        q.env.clone().or_else(|| s.config_env.clone()),
        q.instance.clone(),
    ))
}

/// A service's config as an instance sees it (global, service, environment and instance layers
/// merged).
pub async fn config_resolved(
    State(s): State<ApiState>,
    Path(set): Path<String>,
    q: Result<Query<ResolvedQuery>, QueryRejection>,
) -> ApiResult<impl IntoResponse> {
    let q = query(q)?;
    if q.format.is_some() {
        return Err(ApiError::bad_request("format applies to the watch only"));
    }
    let (env, instance) = resolved_args(&s, &q)?;
    let r = s
        .config
        .resolve(&set, env.as_deref(), instance.as_deref(), None)
        .await?;
    Ok(Json(if q.reveal.unwrap_or(false) {
        r.revealed()
    } else {
        r.redacted()
    }))
}

/// The resolved config now, then again after every change that reaches it (its own set's or
/// the global set's), as Server-Sent Events (`event: config`, `id:` the service's version).
pub async fn config_watch(
    State(s): State<ApiState>,
    Path(set): Path<String>,
    q: Result<Query<ResolvedQuery>, QueryRejection>,
) -> ApiResult<impl IntoResponse> {
    let q = query(q)?;
    let fmt = match q.format.as_deref().unwrap_or("sse") {
        "sse" => stream::Format::Sse,
        "ndjson" => stream::Format::Ndjson,
        other => {
            return Err(ApiError::bad_request(format!(
                "format: expected sse or ndjson, got {other:?}"
            )))
        }
    };
    let (env, instance) = resolved_args(&s, &q)?;
    let reveal = q.reveal.unwrap_or(false);
    // Subscribed before the first read: no change between them goes unseen.
    let rx = s.config.subscribe();
    let first = s
        .config
        .resolve(&set, env.as_deref(), instance.as_deref(), None)
        .await?;
    let initial = vec![view(&first, reveal)];
    let config = s.config.clone();
    let last = std::sync::Arc::new(std::sync::Mutex::new(first));
    Ok(stream::follow_async(fmt, initial, rx, move |changed| {
        let config = config.clone();
        let last = last.clone();
        let (set, env, instance) = (set.clone(), env.clone(), instance.clone());
        async move {
            if changed.set != set && changed.set != gantry_config::GLOBAL {
                return None;
            }
            // The service's own changes at the version announced: every one, in order, even
            // when commits come faster than this stream is read.
            let pin = (changed.set == set).then_some(changed.version);
            let r = match config
                .resolve(&set, env.as_deref(), instance.as_deref(), pin)
                .await
            {
                Ok(r) => r,
                Err(e) => {
                    tracing::warn!(set = %set, error = %e, "config watch: cannot resolve");
                    return None;
                }
            };
            let mut prev = last
                .lock()
                .unwrap_or_else(std::sync::PoisonError::into_inner);
            // Only when what this service sees changed.
            if r.values == prev.values && r.secret_keys == prev.secret_keys {
                return None;
            }
            *prev = r.clone();
            Some(view(&r, reveal))
        }
    }))
}

fn view(r: &gantry_config::Resolved, reveal: bool) -> Item {
    let v = if reveal { r.revealed() } else { r.redacted() };
    Item::new("config", &v).with_id(format!("{}.{}", v.version, v.global_version))
}
