//! Who exists: clients (applications and machines), users, roles and API keys, as stored.
//! Secrets are shown once, at creation, and stored only as digests: client secrets and API keys
//! (256 random bits each) as SHA-256, user passwords (chosen by people) as argon2id.

use serde::{Deserialize, Serialize};

pub const CLIENTS: &str = "identity-clients";
pub const USERS: &str = "identity-users";
pub const ROLES: &str = "identity-roles";
pub const API_KEYS: &str = "identity-apikeys";

/// An OAuth client.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, utoipa::ToSchema)]
pub struct Client {
    pub id: String,
    /// `confidential` (has a secret) or `public` (a browser or CLI app: PKCE, no secret).
    pub kind: ClientKind,
    /// Grants it may use: `client_credentials`, `password`, `refresh_token`,
    /// `authorization_code`.
    pub grant_types: Vec<String>,
    /// Where the authorization-code flow may send the browser back (exact match).
    #[serde(default)]
    pub redirect_uris: Vec<String>,
    /// Scopes it may be granted (and gets when it asks for none).
    #[serde(default)]
    pub scopes: Vec<String>,
    /// Roles its own tokens (client credentials) carry.
    #[serde(default)]
    pub roles: Vec<String>,
    /// Audiences its tokens name besides the default one.
    #[serde(default)]
    pub audiences: Vec<String>,
    /// Hex SHA-256 of the secret (confidential clients).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schema(ignore)]
    pub secret_sha256: Option<String>,
    pub created_ms: u64,
}

#[derive(Debug, Clone, Copy, Serialize, Deserialize, PartialEq, Eq, utoipa::ToSchema)]
#[serde(rename_all = "snake_case")]
pub enum ClientKind {
    Confidential,
    Public,
}

/// A person who signs in.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, utoipa::ToSchema)]
pub struct User {
    pub username: String,
    pub roles: Vec<String>,
    #[serde(default)]
    pub disabled: bool,
    /// The argon2id PHC string.
    #[schema(ignore)]
    pub password_hash: String,
    pub created_ms: u64,
}

/// A named set of admin permissions (`services:read`, ...) and token scopes.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, utoipa::ToSchema)]
pub struct Role {
    pub name: String,
    /// Admin API permissions (`*` for all).
    pub permissions: Vec<String>,
    #[serde(default)]
    pub description: String,
    /// Built in: cannot be changed or removed.
    #[serde(default)]
    pub builtin: bool,
}

/// An API key, stored by its digest (the key itself is shown once).
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, utoipa::ToSchema)]
pub struct ApiKey {
    /// Public id (`gk_` + first characters), for listing and deletion.
    pub id: String,
    pub client_id: String,
    pub scopes: Vec<String>,
    pub roles: Vec<String>,
    /// Hex SHA-256 of the key.
    #[schema(ignore)]
    pub sha256: String,
    pub created_ms: u64,
}

/// The built-in roles: `admin` (everything), `operator` (reads and day-to-day changes),
/// `viewer` (reads).
pub fn builtin_roles() -> Vec<Role> {
    let reads = [
        "health:read",
        "metrics:read",
        "services:read",
        "deployments:read",
        "routes:read",
        "traffic:read",
        "registry:read",
        "config:read",
        "logs:read",
        "events:read",
        "audit:read",
        "identity:read",
    ];
    let mut operator: Vec<String> = reads.iter().map(|s| s.to_string()).collect();
    operator.extend(
        [
            "services:write",
            "deployments:write",
            "routes:write",
            "registry:write",
            "config:write",
            "system:reload",
        ]
        .map(String::from),
    );
    vec![
        Role {
            name: "admin".into(),
            permissions: vec!["*".into()],
            description: "every permission, identity management included".into(),
            builtin: true,
        },
        Role {
            name: "operator".into(),
            permissions: operator,
            description:
                "reads, and the day-to-day changes (scale, deploy, routes, config, reload)".into(),
            builtin: true,
        },
        Role {
            name: "viewer".into(),
            permissions: reads.map(String::from).to_vec(),
            description: "reads only".into(),
            builtin: true,
        },
    ]
}

/// Names of clients, users and roles: 1-64 of `a-z A-Z 0-9 _ -` (they are store keys and
/// appear in tokens and headers).
pub fn check_name(what: &str, name: &str) -> Result<(), String> {
    let ok = !name.is_empty()
        && name.len() <= 64
        && name
            .bytes()
            .all(|c| c.is_ascii_alphanumeric() || c == b'_' || c == b'-');
    if ok {
        Ok(())
    } else {
        Err(format!(
            "{what} {name:?}: expected 1-64 characters of a-z, A-Z, 0-9, '_' and '-'"
        ))
    }
}

/// A scope: printable ASCII without space, `"` or `\` (RFC 6749 3.3).
pub fn check_scope(s: &str) -> Result<(), String> {
    let ok = !s.is_empty()
        && s.len() <= 128
        && s.bytes()
            .all(|c| (0x21..=0x7e).contains(&c) && c != b'"' && c != b'\\');
    if ok {
        Ok(())
    } else {
        Err(format!(
            "scope {s:?}: expected printable ASCII without spaces, quotes or backslashes"
        ))
    }
}

pub const GRANTS: [&str; 4] = [
    "client_credentials",
    "password",
    "refresh_token",
    "authorization_code",
];

pub fn check_redirect_uri(u: &str) -> Result<(), String> {
    let ok = (u.starts_with("https://") || u.starts_with("http://"))
        && !u.contains('#')
        && u.len() <= 2048
        && !u.chars().any(|c| c.is_whitespace() || c.is_control());
    if ok {
        Ok(())
    } else {
        Err(format!(
            "redirect URI {u:?}: expected an absolute http(s) URL without a fragment"
        ))
    }
}
