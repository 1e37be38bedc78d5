//! The API's one error type: a status, a stable code and a message, rendered as JSON.

use axum::response::{IntoResponse, Response};
use axum::Json;
use gantry_config::ConfigError;
use gantry_registry::RegistryError;
use gantry_store::StoreError;
use gantry_supervisor::SupervisorError;
use http::StatusCode;

#[derive(Debug)]
pub struct ApiError {
    pub status: StatusCode,
    pub code: &'static str,
    pub message: String,
}

impl ApiError {
    pub fn new(status: StatusCode, code: &'static str, message: impl Into<String>) -> Self {
        Self {
            status,
            code,
            message: message.into(),
        }
    }
    pub fn bad_request(message: impl Into<String>) -> Self {
        Self::new(StatusCode::BAD_REQUEST, "bad_request", message)
    }
    pub fn not_found(message: impl Into<String>) -> Self {
        Self::new(StatusCode::NOT_FOUND, "not_found", message)
    }
    pub fn unauthorized(message: impl Into<String>) -> Self {
        Self::new(StatusCode::UNAUTHORIZED, "unauthorized", message)
    }
    pub fn conflict(message: impl Into<String>) -> Self {
        Self::new(StatusCode::CONFLICT, "conflict", message)
    }
    pub fn internal(message: impl Into<String>) -> Self {
        Self::new(StatusCode::INTERNAL_SERVER_ERROR, "internal", message)
    }
}

/// What every error answer holds.
#[derive(Debug, serde::Serialize, utoipa::ToSchema)]
pub struct ErrorBody {
    /// A stable code: `bad_request`, `unauthorized`, `forbidden`, `not_found`, `conflict`, ...
    pub error: String,
    /// What is wrong, for people.
    pub message: String,
}

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        let body = ErrorBody {
            error: self.code.to_string(),
            message: self.message,
        };
        (self.status, Json(body)).into_response()
    }
}

impl From<StoreError> for ApiError {
    fn from(e: StoreError) -> Self {
        match e {
            StoreError::AlreadyExists { .. } | StoreError::RevisionMismatch { .. } => {
                ApiError::conflict(e.to_string())
            }
            StoreError::InvalidName { .. } | StoreError::InvalidOptions { .. } => {
                ApiError::bad_request(e.to_string())
            }
            StoreError::NotFound(_) => ApiError::not_found(e.to_string()),
            StoreError::TooLarge(_) => ApiError::new(
                http::StatusCode::PAYLOAD_TOO_LARGE,
                "too_large",
                e.to_string(),
            ),
            StoreError::Unavailable(_) => ApiError::new(
                http::StatusCode::SERVICE_UNAVAILABLE,
                "unavailable",
                e.to_string(),
            ),
            _ => {
                tracing::error!(error = %e, "store error in admin API");
                ApiError::internal(e.to_string())
            }
        }
    }
}

impl From<RegistryError> for ApiError {
    fn from(e: RegistryError) -> Self {
        match e {
            RegistryError::Invalid(m) => ApiError::bad_request(m),
            RegistryError::NotFound(_) => ApiError::not_found(e.to_string()),
            RegistryError::Conflict(m) => ApiError::conflict(m),
            RegistryError::Store(s) => s.into(),
        }
    }
}

impl From<ConfigError> for ApiError {
    fn from(e: ConfigError) -> Self {
        match e {
            ConfigError::Invalid(m) => ApiError::bad_request(m),
            ConfigError::NoSuchVersion { .. } => ApiError::not_found(e.to_string()),
            ConfigError::Conflict => {
                ApiError::new(http::StatusCode::CONFLICT, "conflict", e.to_string())
            }
            ConfigError::Secret(m) => ApiError::internal(m),
            ConfigError::Store(s) => s.into(),
        }
    }
}

impl From<SupervisorError> for ApiError {
    fn from(e: SupervisorError) -> Self {
        match e {
            SupervisorError::UnknownService(_) => ApiError::not_found(e.to_string()),
            SupervisorError::NotFound(m) => ApiError::not_found(m),
            SupervisorError::Invalid(m) => ApiError::bad_request(m),
            SupervisorError::Conflict(m) => ApiError::conflict(m),
            SupervisorError::Rollout(m) => {
                ApiError::new(StatusCode::UNPROCESSABLE_ENTITY, "rollout_failed", m)
            }
            SupervisorError::Store(s) => s.into(),
        }
    }
}
