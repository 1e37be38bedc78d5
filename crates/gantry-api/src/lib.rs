//! The admin REST API (axum), served on loopback by default.
//!
//! Conventions: JSON in and out; every error is a JSON body `{"error": code, "message": ...}`
//! with a 4xx/5xx status (handlers never fail any other way). Every endpoint requires a
//! permission (`auth.rs`: one table), reads included, and every call that changes state is
//! recorded in the audit trail (`audit.rs`). Endpoints are grouped in modules and merged here.
//!
//! Architecture invariant: handlers only translate HTTP to calls on component handles
//! ([`ApiState`]); no business rule lives here.
#![forbid(unsafe_code)]

pub mod audit;
pub mod auth;
pub mod bus;
pub mod config;
mod deployments;
mod error;
mod history;
pub mod identity;
mod observe;
pub mod openapi;
mod parse;
mod registry;
mod routing;
pub mod serve;
pub mod services;
mod stream;
mod system;

use std::sync::Arc;

use axum::extract::DefaultBodyLimit;
use axum::routing::get;
use axum::Router;
use gantry_config::ConfigStore;
use gantry_gateway::Gateway;
use gantry_registry::Registry;
use gantry_supervisor::Supervisor;
use gantry_telemetry::{LogStore, Metrics};

pub use error::ApiError;

/// Largest request body the API reads.
pub const MAX_BODY_BYTES: usize = 1 << 20;

/// Handles on every component the API exposes.
#[derive(Clone)]
pub struct ApiState {
    pub supervisor: Arc<Supervisor>,
    pub registry: Arc<Registry>,
    pub config: Arc<ConfigStore>,
    pub gateway: Arc<Gateway>,
    pub logs: LogStore,
    pub metrics: Metrics,
    /// Turns credentials into principals.
    pub auth: Arc<dyn auth::Authenticator>,
    /// Permissions granted without credentials (`[admin] public`: health, metrics).
    pub public: Arc<std::collections::BTreeSet<auth::Permission>>,
    /// Where the audit trail goes.
    pub store: Arc<dyn gantry_store::Store>,
    /// Spec reload and routes added over the API.
    pub control: Arc<dyn RouteControl>,
    /// Users, clients, roles, API keys, signing keys.
    pub identity: Arc<gantry_identity::Identity>,
    /// The config environment gantry runs with (`gantry up --env`).
    pub config_env: Option<String>,
    /// The message bus.
    pub bus: Arc<gantry_bus::Bus>,
    /// The metrics history.
    pub tsdb: Arc<gantry_tsdb::Tsdb>,
}

/// Why a route change was refused.
#[derive(Debug)]
pub enum RouteControlError {
    /// The spec or the route has problems (one line each).
    Invalid(Vec<String>),
    NotFound(String),
    Conflict(String),
    Internal(String),
}

/// Changes to the gateway's routes while running, implemented by the binary (it owns the spec
/// file and composes spec routes with routes added over the API).
#[async_trait::async_trait]
pub trait RouteControl: Send + Sync {
    /// Apply the spec file again: a report of what changed, or the spec's errors.
    async fn reload(&self) -> Result<ReloadReport, RouteControlError>;
    /// Add or replace the API route `name` (durable when this returns).
    async fn put_route(
        &self,
        name: &str,
        body: serde_json::Value,
    ) -> Result<RouteWritten, RouteControlError>;
    async fn delete_route(&self, name: &str) -> Result<(), RouteControlError>;
}

/// A route added or replaced over the API, now live.
#[derive(Debug, Clone, serde::Serialize, serde::Deserialize, utoipa::ToSchema)]
pub struct RouteWritten {
    /// Its id in the route table and in metrics: `api/NAME`.
    pub id: String,
    /// Routes in the table now.
    pub routes: usize,
}

/// What a reload of the spec file did.
#[derive(Debug, Clone, serde::Serialize, serde::Deserialize, utoipa::ToSchema)]
pub struct ReloadReport {
    /// Routes in the gateway's table now.
    pub routes: usize,
    pub gateway_changed: bool,
    /// Services added, changed (replaced one instance at a time) and removed (drained).
    pub services: gantry_supervisor::SpecApplied,
    /// Settings that only a restart of gantry applies.
    pub needs_restart: Vec<String>,
}

/// The API's router.
pub fn router(state: ApiState) -> Router {
    // One module per endpoint group; each lists its routes, merged here.
    Router::new()
        .merge(system::routes())
        .merge(services::routes())
        .merge(deployments::routes())
        .merge(routing::routes())
        .merge(registry::routes())
        .merge(config::routes())
        .merge(observe::routes())
        .merge(history::routes())
        .merge(identity::routes())
        .merge(bus::routes())
        .route("/v1/audit", get(audit::list))
        .route("/v1/openapi.json", get(openapi::serve))
        .route_layer(axum::middleware::from_fn_with_state(
            state.clone(),
            auth::authorize,
        ))
        .fallback(not_found)
        .method_not_allowed_fallback(method_not_allowed)
        .layer(DefaultBodyLimit::max(MAX_BODY_BYTES))
        .layer(axum::middleware::map_response(serve::json_errors))
        .with_state(state)
}

async fn not_found() -> ApiError {
    ApiError::not_found("no such API endpoint; see /v1/services, /v1/instances, /v1/routes, /v1/registry/..., /v1/config/..., /v1/logs, /metrics")
}

async fn method_not_allowed() -> ApiError {
    ApiError::new(
        http::StatusCode::METHOD_NOT_ALLOWED,
        "method_not_allowed",
        "this endpoint does not accept that method",
    )
}
