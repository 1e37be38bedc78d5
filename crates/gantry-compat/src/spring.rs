//! Spring Cloud Config's read endpoint, so Spring Boot services (and anything that speaks its
//! format) can use Gantry as their config server: `GET /{application}/{profiles}[/{label}]`
//! answers Spring's `Environment` JSON.
//!
//! Mapping: the application is a config set (a service), the profiles (comma-separated) are
//! environment layers, the label is a version of the service's set (absent: the current one).
//! Property sources come highest precedence first, as Spring expects: the later profile's
//! layer, the earlier's, the service's base, then the global set's layers. Each key appears as
//! stored (`SERVER_PORT`) and in Spring's dotted form (`server.port`), so `@Value` and
//! `@ConfigurationProperties` bind either. Secrets are included only for a principal with
//! `config:reveal` (each such read is audited); others get the rest.

use std::net::SocketAddr;

use axum::extract::{ConnectInfo, Path, State};
use axum::http::{HeaderMap, Method, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::routing::get;
use axum::Router;
use gantry_api::auth::Permission;
use gantry_config::{Document, LayerDoc, GLOBAL};
use serde_json::{json, Map, Value};

use crate::{CompatState, Denied, Fail};

pub fn router(state: CompatState) -> Router {
    Router::new()
        .route("/{application}/{profiles}", get(environment))
        .route("/{application}/{profiles}/{label}", get(environment_at))
        .with_state(state)
}

/// Spring's error body: JSON with the status and the message.
fn error(f: Fail) -> Response {
    (
        f.0,
        axum::Json(json!({"status": f.0.as_u16(), "error": f.1})),
    )
        .into_response()
}

/// Spring's name for an environment-variable style key: `SERVER_PORT` → `server.port`.
fn dotted(key: &str) -> String {
    key.to_ascii_lowercase().replace('_', ".")
}

fn source(name: String, layer: &LayerDoc) -> Option<Value> {
    let mut src = Map::new();
    for (k, v) in layer.values.iter().chain(&layer.secrets) {
        src.insert(k.clone(), v.clone());
        src.entry(dotted(k)).or_insert_with(|| v.clone());
    }
    (!src.is_empty()).then(|| json!({"name": name, "source": src}))
}

fn layer(doc: &Document, env: Option<&str>) -> Option<LayerDoc> {
    match env {
        None => Some(LayerDoc {
            values: doc.values.clone(),
            secrets: doc.secrets.clone(),
            redacted: doc.redacted.clone(),
        }),
        Some(e) => doc.env.get(e).cloned(),
    }
}

async fn environment(
    State(s): State<CompatState>,
    ConnectInfo(remote): ConnectInfo<SocketAddr>,
    Path((application, profiles)): Path<(String, String)>,
    headers: HeaderMap,
) -> Response {
    answer(s, remote, application, profiles, None, headers).await
}

async fn environment_at(
    State(s): State<CompatState>,
    ConnectInfo(remote): ConnectInfo<SocketAddr>,
    Path((application, profiles, label)): Path<(String, String, String)>,
    headers: HeaderMap,
) -> Response {
    answer(s, remote, application, profiles, Some(label), headers).await
}

async fn answer(
    s: CompatState,
    remote: SocketAddr,
    application: String,
    profiles: String,
    label: Option<String>,
    headers: HeaderMap,
) -> Response {
    let token = crate::basic_or_bearer(&headers);
    let principal = match s.authorize(token.as_deref(), Permission::ConfigRead) {
        Ok(p) => p,
        Err(d) => {
            let (status, why) = match d {
                Denied::NoToken => (
                    StatusCode::UNAUTHORIZED,
                    "credentials required: basic auth whose password is a Gantry token or API key (spring.cloud.config.password), or a bearer token".to_string(),
                ),
                Denied::BadToken(w) => (StatusCode::UNAUTHORIZED, w),
                Denied::Forbidden(w) => (StatusCode::FORBIDDEN, w),
            };
            return error(Fail(status, why));
        }
    };
    let reveal = principal.may(Permission::ConfigReveal);
    let result = build(&s, &application, &profiles, label.as_deref(), reveal).await;
    let resp = match result {
        Ok(v) => axum::Json(v).into_response(),
        Err(f) => error(f),
    };
    // A read that included secrets is a reveal: audited.
    if reveal {
        let path = format!("/{application}/{profiles}");
        crate::audit(
            &s,
            Some(&principal),
            gantry_api::audit::Call {
                principal: None,
                method: &Method::GET,
                path: &path,
                template: "spring-config",
                permission: Permission::ConfigReveal,
                remote: Some(remote),
                request_id: &gantry_registry::random_hex(16),
                status: resp.status(),
            },
        )
        .await;
    }
    resp
}

async fn build(
    s: &CompatState,
    application: &str,
    profiles: &str,
    label: Option<&str>,
    reveal: bool,
) -> Result<Value, Fail> {
    gantry_config::check_set(application)?;
    if application == GLOBAL {
        return Err(Fail(
            StatusCode::BAD_REQUEST,
            format!("{GLOBAL} is what every application inherits; ask for an application"),
        ));
    }
    let envs: Vec<&str> = profiles
        .split(',')
        .map(str::trim)
        .filter(|p| !p.is_empty() && *p != "default")
        .collect();
    for e in &envs {
        gantry_config::model::check_env_name(e)?;
    }
    let version = match label {
        None => None,
        Some(l) => Some(l.parse::<u64>().map_err(|_| {
            Fail(
                StatusCode::NOT_FOUND,
                format!("label {l:?}: Gantry's labels are config versions (numbers)"),
            )
        })?),
    };
    let (v, app) = s.config.export(application, version, reveal).await?;
    let (gv, global) = s.config.export(GLOBAL, None, reveal).await?;
    // Highest precedence first: later profiles win, then the base; the application's set
    // before the global one.
    let mut sources = Vec::new();
    for (set, doc) in [(application, &app), (GLOBAL, &global)] {
        for e in envs.iter().rev() {
            if let Some(l) = layer(doc, Some(e)) {
                sources.extend(source(format!("gantry:{set}:{e}"), &l));
            }
        }
        if let Some(l) = layer(doc, None) {
            sources.extend(source(format!("gantry:{set}"), &l));
        }
    }
    Ok(json!({
        "name": application,
        "profiles": if envs.is_empty() { vec!["default"] } else { envs.clone() },
        "label": label,
        "version": format!("{v}.{gv}"),
        "state": null,
        "propertySources": sources,
    }))
}
