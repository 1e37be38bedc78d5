//! `/v1/identity/...`: clients, users, roles, API keys and signing keys. Secrets (client
//! secrets, API keys) are in the answer to the call that creates them and nowhere else; stored
//! digests and private keys never leave the store.

use axum::body::Bytes;
use axum::extract::{Path, State};
use axum::http::StatusCode;
use axum::response::IntoResponse;
use axum::routing::{delete, get, post, put};
use axum::{Json, Router};
use gantry_identity::{ApiKey, Client, IdentityError, NewClient, Role, StoredKey, User};
use serde::{Deserialize, Serialize};

use crate::parse::{parse_json, ApiResult};
use crate::{ApiError, ApiState};

pub(crate) fn routes() -> Router<ApiState> {
    Router::new()
        .route(
            "/v1/identity/clients",
            get(list_clients).post(create_client),
        )
        .route("/v1/identity/clients/{id}", delete(delete_client))
        .route("/v1/identity/clients/{id}/secret", post(reset_secret))
        .route("/v1/identity/users", get(list_users).post(create_user))
        .route(
            "/v1/identity/users/{name}",
            axum::routing::patch(update_user).delete(delete_user),
        )
        .route("/v1/identity/roles", get(list_roles))
        .route(
            "/v1/identity/roles/{name}",
            put(put_role).delete(delete_role),
        )
        .route(
            "/v1/identity/api-keys",
            get(list_api_keys).post(create_api_key),
        )
        .route("/v1/identity/api-keys/{id}", delete(delete_api_key))
        .route("/v1/identity/keys", get(list_keys))
        .route("/v1/identity/keys/rotate", post(rotate_keys))
}

impl From<IdentityError> for ApiError {
    fn from(e: IdentityError) -> Self {
        match e {
            IdentityError::Invalid(m) => ApiError::bad_request(m),
            IdentityError::NotFound(m) => ApiError::not_found(format!("{m} not found")),
            IdentityError::Exists(m) => ApiError::conflict(format!("{m} already exists")),
            IdentityError::Store(e) => ApiError::internal(e.to_string()),
            IdentityError::Internal(m) => ApiError::internal(m),
        }
    }
}

/// A client without its secret's digest.
fn public(mut c: Client) -> Client {
    c.secret_sha256 = None;
    c
}

pub async fn list_clients(State(s): State<ApiState>) -> ApiResult<Json<Vec<Client>>> {
    Ok(Json(
        s.identity
            .clients()
            .await?
            .into_iter()
            .map(public)
            .collect(),
    ))
}

/// A new client, and its secret (shown once).
#[derive(Serialize, Deserialize, utoipa::ToSchema)]
pub struct CreatedClient {
    pub client: Client,
    /// The secret of a confidential client: shown only here.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub secret: Option<String>,
}

pub async fn create_client(State(s): State<ApiState>, body: Bytes) -> ApiResult<impl IntoResponse> {
    let b: NewClient = parse_json(&body)?;
    let (c, secret) = s.identity.create_client(b).await?;
    Ok((
        StatusCode::CREATED,
        Json(CreatedClient {
            client: public(c),
            secret,
        }),
    ))
}

pub async fn delete_client(
    State(s): State<ApiState>,
    Path(id): Path<String>,
) -> ApiResult<StatusCode> {
    s.identity.delete_client(&id).await?;
    Ok(StatusCode::NO_CONTENT)
}

#[derive(Serialize, Deserialize, utoipa::ToSchema)]
pub struct NewSecret {
    pub client_id: String,
    pub secret: String,
}

pub async fn reset_secret(
    State(s): State<ApiState>,
    Path(id): Path<String>,
) -> ApiResult<Json<NewSecret>> {
    let secret = s.identity.reset_client_secret(&id).await?;
    Ok(Json(NewSecret {
        client_id: id,
        secret,
    }))
}

/// A user as the API shows it (never the password hash).
#[derive(Serialize, Deserialize, utoipa::ToSchema)]
pub struct UserView {
    pub username: String,
    pub roles: Vec<String>,
    pub disabled: bool,
    pub created_ms: u64,
}

fn user_view(u: User) -> UserView {
    UserView {
        username: u.username,
        roles: u.roles,
        disabled: u.disabled,
        created_ms: u.created_ms,
    }
}

pub async fn list_users(State(s): State<ApiState>) -> ApiResult<Json<Vec<UserView>>> {
    Ok(Json(
        s.identity
            .users()
            .await?
            .into_iter()
            .map(user_view)
            .collect(),
    ))
}

#[derive(Serialize, Deserialize, utoipa::ToSchema)]
#[serde(deny_unknown_fields)]
pub struct NewUser {
    pub username: String,
    /// 8 to 1024 characters; stored as an argon2id hash.
    pub password: String,
    #[serde(default)]
    pub roles: Vec<String>,
}

pub async fn create_user(State(s): State<ApiState>, body: Bytes) -> ApiResult<impl IntoResponse> {
    let b: NewUser = parse_json(&body)?;
    let u = s
        .identity
        .create_user(&b.username, &b.password, b.roles)
        .await?;
    Ok((StatusCode::CREATED, Json(user_view(u))))
}

#[derive(Serialize, Deserialize, utoipa::ToSchema)]
#[serde(deny_unknown_fields)]
pub struct UserChange {
    #[serde(default)]
    pub password: Option<String>,
    #[serde(default)]
    pub roles: Option<Vec<String>>,
    #[serde(default)]
    pub disabled: Option<bool>,
}

pub async fn update_user(
    State(s): State<ApiState>,
    Path(name): Path<String>,
    body: Bytes,
) -> ApiResult<Json<UserView>> {
    let b: UserChange = parse_json(&body)?;
    let u = s
        .identity
        .update_user(&name, b.password.as_deref(), b.roles, b.disabled)
        .await?;
    Ok(Json(user_view(u)))
}

pub async fn delete_user(
    State(s): State<ApiState>,
    Path(name): Path<String>,
) -> ApiResult<StatusCode> {
    s.identity.delete_user(&name).await?;
    Ok(StatusCode::NO_CONTENT)
}

pub async fn list_roles(State(s): State<ApiState>) -> ApiResult<Json<Vec<Role>>> {
    Ok(Json(s.identity.roles().await?))
}

#[derive(Serialize, Deserialize, utoipa::ToSchema)]
#[serde(deny_unknown_fields)]
pub struct RoleBody {
    /// Admin API permissions (`services:read`, `config:write`, ...; `*` for all).
    pub permissions: Vec<String>,
    #[serde(default)]
    pub description: String,
}

pub async fn put_role(
    State(s): State<ApiState>,
    Path(name): Path<String>,
    body: Bytes,
) -> ApiResult<Json<Role>> {
    let b: RoleBody = parse_json(&body)?;
    for p in &b.permissions {
        if p != "*" && !crate::auth::Permission::ALL.iter().any(|x| x.as_str() == p) {
            return Err(ApiError::bad_request(format!(
                "unknown permission {p:?}; expected * or one of {}",
                crate::auth::Permission::ALL
                    .iter()
                    .map(|x| x.as_str())
                    .collect::<Vec<_>>()
                    .join(", ")
            )));
        }
    }
    Ok(Json(
        s.identity
            .put_role(Role {
                name,
                permissions: b.permissions,
                description: b.description,
                builtin: false,
            })
            .await?,
    ))
}

pub async fn delete_role(
    State(s): State<ApiState>,
    Path(name): Path<String>,
) -> ApiResult<StatusCode> {
    s.identity.delete_role(&name).await?;
    Ok(StatusCode::NO_CONTENT)
}

/// An API key as listed (never the key or its digest).
#[derive(Serialize, Deserialize, utoipa::ToSchema)]
pub struct ApiKeyView {
    pub id: String,
    pub client_id: String,
    pub scopes: Vec<String>,
    pub roles: Vec<String>,
    pub created_ms: u64,
}

fn key_view(a: ApiKey) -> ApiKeyView {
    ApiKeyView {
        id: a.id,
        client_id: a.client_id,
        scopes: a.scopes,
        roles: a.roles,
        created_ms: a.created_ms,
    }
}

pub async fn list_api_keys(State(s): State<ApiState>) -> ApiResult<Json<Vec<ApiKeyView>>> {
    Ok(Json(
        s.identity
            .api_keys()
            .await?
            .into_iter()
            .map(key_view)
            .collect(),
    ))
}

#[derive(Serialize, Deserialize, utoipa::ToSchema)]
#[serde(deny_unknown_fields)]
pub struct NewApiKey {
    pub client_id: String,
    /// Within the client's scopes; default: all of them.
    #[serde(default)]
    pub scopes: Vec<String>,
}

#[derive(Serialize, Deserialize, utoipa::ToSchema)]
pub struct CreatedApiKey {
    pub api_key: ApiKeyView,
    /// The key: shown only here.
    pub key: String,
}

pub async fn create_api_key(
    State(s): State<ApiState>,
    body: Bytes,
) -> ApiResult<impl IntoResponse> {
    let b: NewApiKey = parse_json(&body)?;
    let (a, key) = s.identity.create_api_key(&b.client_id, b.scopes).await?;
    Ok((
        StatusCode::CREATED,
        Json(CreatedApiKey {
            api_key: key_view(a),
            key,
        }),
    ))
}

pub async fn delete_api_key(
    State(s): State<ApiState>,
    Path(id): Path<String>,
) -> ApiResult<StatusCode> {
    s.identity.delete_api_key(&id).await?;
    Ok(StatusCode::NO_CONTENT)
}

/// A signing key as the API shows it (its public half).
#[derive(Serialize, Deserialize, utoipa::ToSchema)]
pub struct KeyView {
    pub kid: String,
    pub alg: String,
    /// Seconds since the epoch.
    pub created: u64,
    pub signs_from: u64,
    pub retired_at: Option<u64>,
    /// The key that signs now.
    pub signing: bool,
    /// The public JWK.
    #[schema(value_type = Object)]
    pub public: serde_json::Value,
}

fn view(k: StoredKey, signing: &Option<String>) -> KeyView {
    KeyView {
        signing: signing.as_deref() == Some(k.kid.as_str()),
        kid: k.kid,
        alg: k.alg.as_str().into(),
        created: k.created,
        signs_from: k.signs_from,
        retired_at: k.retired_at,
        public: k.public,
    }
}

pub async fn list_keys(State(s): State<ApiState>) -> Json<Vec<KeyView>> {
    let (keys, signing) = s.identity.keys();
    Json(keys.into_iter().map(|k| view(k, &signing)).collect())
}

/// Rotate now: the new key is published at once and signs after the propagation delay.
pub async fn rotate_keys(State(s): State<ApiState>) -> ApiResult<impl IntoResponse> {
    let k = s.identity.rotate().await?;
    let (_, signing) = s.identity.keys();
    Ok((StatusCode::CREATED, Json(view(k, &signing))))
}
