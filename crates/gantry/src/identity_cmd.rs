//! `gantry identity ...` (clients, users, roles, API keys, signing keys) and `gantry login` /
//! `gantry logout` (a user's own credentials for the admin API, instead of the admin token).

use std::io::BufRead as _;
use std::path::PathBuf;

use clap::Subcommand;
use gantry_api::identity::{
    ApiKeyView, CreatedApiKey, CreatedClient, KeyView, NewApiKey, NewSecret, NewUser, RoleBody,
    UserChange, UserView,
};
use gantry_identity::{Client as OAuthClient, ClientKind, NewClient, Role};
use hyper::Method;
use serde::{Deserialize, Serialize};

use crate::client::{enc, CliError, Client};
use crate::commands::list;
use crate::{table, Output};

#[derive(Subcommand)]
pub enum IdentityCmd {
    /// OAuth clients (applications and machines).
    Clients {
        #[command(flatten)]
        out: Output,
    },
    /// Register a client; a confidential client's secret is printed once.
    CreateClient {
        id: String,
        /// A public client (browser or CLI app: PKCE, no secret).
        #[arg(long)]
        public: bool,
        /// Grant types (client_credentials, password, refresh_token, authorization_code).
        #[arg(long = "grant")]
        grants: Vec<String>,
        #[arg(long = "scope")]
        scopes: Vec<String>,
        #[arg(long = "role")]
        roles: Vec<String>,
        #[arg(long = "redirect-uri")]
        redirect_uris: Vec<String>,
        #[arg(long = "audience")]
        audiences: Vec<String>,
    },
    /// Remove a client (and its API keys).
    DeleteClient {
        id: String,
    },
    /// A new secret for a confidential client (the old one stops working), printed once.
    ResetSecret {
        id: String,
    },
    /// Users.
    Users {
        #[command(flatten)]
        out: Output,
    },
    /// Create a user; the password is read from the first line of standard input.
    CreateUser {
        username: String,
        #[arg(long = "role")]
        roles: Vec<String>,
    },
    /// Change a user: roles, enabled or disabled, or (with --password-stdin) the password.
    SetUser {
        username: String,
        /// Replace the roles with these.
        #[arg(long = "role")]
        roles: Vec<String>,
        #[arg(long, conflicts_with = "enable")]
        disable: bool,
        #[arg(long)]
        enable: bool,
        /// Read a new password from the first line of standard input.
        #[arg(long)]
        password_stdin: bool,
    },
    DeleteUser {
        username: String,
    },
    /// Roles: the built-in ones (admin, operator, viewer) and custom permission sets.
    Roles {
        #[command(flatten)]
        out: Output,
    },
    /// Create or replace a custom role.
    PutRole {
        name: String,
        /// Admin API permissions, e.g. services:read (or * for all).
        #[arg(long = "permission", required = true)]
        permissions: Vec<String>,
        #[arg(long, default_value = "")]
        description: String,
    },
    DeleteRole {
        name: String,
    },
    /// API keys (never the keys themselves).
    ApiKeys {
        #[command(flatten)]
        out: Output,
    },
    /// A new API key for a client, printed once.
    CreateApiKey {
        client: String,
        #[arg(long = "scope")]
        scopes: Vec<String>,
    },
    DeleteApiKey {
        id: String,
    },
    /// Signing keys published now, and which one signs.
    Keys {
        #[command(flatten)]
        out: Output,
    },
    /// Rotate the signing key now (published at once, signing after the propagation delay).
    Rotate,
}

fn read_secret_line(what: &str) -> Result<String, CliError> {
    let mut line = String::new();
    std::io::stdin()
        .lock()
        .read_line(&mut line)
        .map_err(|e| CliError::usage(format!("reading the {what} from standard input: {e}")))?;
    let p = line.trim_end_matches(['\r', '\n']).to_string();
    if p.is_empty() {
        return Err(CliError::usage(format!(
            "no {what} on standard input (e.g. echo \"$PASSWORD\" | gantry ...)"
        )));
    }
    Ok(p)
}

pub async fn run(c: &Client, cmd: IdentityCmd) -> Result<(), CliError> {
    match cmd {
        IdentityCmd::Clients { out } => {
            list(
                c,
                "/v1/identity/clients",
                out,
                &["CLIENT", "KIND", "GRANTS", "SCOPES", "ROLES"],
                |k: &OAuthClient| {
                    vec![
                        k.id.clone(),
                        format!("{:?}", k.kind).to_lowercase(),
                        k.grant_types.join(","),
                        k.scopes.join(" "),
                        k.roles.join(","),
                    ]
                },
            )
            .await
        }
        IdentityCmd::CreateClient {
            id,
            public,
            grants,
            scopes,
            roles,
            redirect_uris,
            audiences,
        } => {
            let body = NewClient {
                id,
                kind: if public {
                    ClientKind::Public
                } else {
                    ClientKind::Confidential
                },
                grant_types: grants,
                redirect_uris,
                scopes,
                roles,
                audiences,
            };
            let r: CreatedClient = c
                .send(Method::POST, "/v1/identity/clients", Some(&body))
                .await?;
            println!(
                "client {} created ({})",
                r.client.id,
                r.client.grant_types.join(", ")
            );
            if let Some(s) = r.secret {
                println!("secret: {s}");
                println!(
                    "(shown only now: store it; `gantry identity reset-secret` makes a new one)"
                );
            }
            Ok(())
        }
        IdentityCmd::DeleteClient { id } => {
            c.call(
                Method::DELETE,
                &format!("/v1/identity/clients/{}", enc(&id)),
                None,
            )
            .await?;
            println!("client {id} removed");
            Ok(())
        }
        IdentityCmd::ResetSecret { id } => {
            let r: NewSecret = c
                .send::<(), _>(
                    Method::POST,
                    &format!("/v1/identity/clients/{}/secret", enc(&id)),
                    None,
                )
                .await?;
            println!("secret: {}", r.secret);
            Ok(())
        }
        IdentityCmd::Users { out } => {
            list(
                c,
                "/v1/identity/users",
                out,
                &["USER", "ROLES", "STATE"],
                |u: &UserView| {
                    vec![
                        u.username.clone(),
                        u.roles.join(","),
                        if u.disabled { "disabled" } else { "active" }.into(),
                    ]
                },
            )
            .await
        }
        IdentityCmd::CreateUser { username, roles } => {
            let password = read_secret_line("password")?;
            let body = NewUser {
                username,
                password,
                roles,
            };
            let u: UserView = c
                .send(Method::POST, "/v1/identity/users", Some(&body))
                .await?;
            println!(
                "user {} created (roles: {})",
                u.username,
                u.roles.join(", ")
            );
            Ok(())
        }
        IdentityCmd::SetUser {
            username,
            roles,
            disable,
            enable,
            password_stdin,
        } => {
            let body = UserChange {
                password: if password_stdin {
                    Some(read_secret_line("password")?)
                } else {
                    None
                },
                roles: (!roles.is_empty()).then_some(roles),
                disabled: if disable {
                    Some(true)
                } else if enable {
                    Some(false)
                } else {
                    None
                },
            };
            let u: UserView = c
                .send(
                    Method::PATCH,
                    &format!("/v1/identity/users/{}", enc(&username)),
                    Some(&body),
                )
                .await?;
            println!(
                "user {}: roles {}, {}",
                u.username,
                u.roles.join(","),
                if u.disabled { "disabled" } else { "active" }
            );
            Ok(())
        }
        IdentityCmd::DeleteUser { username } => {
            c.call(
                Method::DELETE,
                &format!("/v1/identity/users/{}", enc(&username)),
                None,
            )
            .await?;
            println!("user {username} removed");
            Ok(())
        }
        IdentityCmd::Roles { out } => {
            list(
                c,
                "/v1/identity/roles",
                out,
                &["ROLE", "PERMISSIONS", "DESCRIPTION"],
                |r: &Role| {
                    vec![
                        format!("{}{}", r.name, if r.builtin { " (built in)" } else { "" }),
                        r.permissions.join(" "),
                        r.description.clone(),
                    ]
                },
            )
            .await
        }
        IdentityCmd::PutRole {
            name,
            permissions,
            description,
        } => {
            let r: Role = c
                .send(
                    Method::PUT,
                    &format!("/v1/identity/roles/{}", enc(&name)),
                    Some(&RoleBody {
                        permissions,
                        description,
                    }),
                )
                .await?;
            println!("role {}: {}", r.name, r.permissions.join(" "));
            Ok(())
        }
        IdentityCmd::DeleteRole { name } => {
            c.call(
                Method::DELETE,
                &format!("/v1/identity/roles/{}", enc(&name)),
                None,
            )
            .await?;
            println!("role {name} removed");
            Ok(())
        }
        IdentityCmd::ApiKeys { out } => {
            list(
                c,
                "/v1/identity/api-keys",
                out,
                &["ID", "CLIENT", "SCOPES"],
                |k: &ApiKeyView| vec![k.id.clone(), k.client_id.clone(), k.scopes.join(" ")],
            )
            .await
        }
        IdentityCmd::CreateApiKey { client, scopes } => {
            let r: CreatedApiKey = c
                .send(
                    Method::POST,
                    "/v1/identity/api-keys",
                    Some(&NewApiKey {
                        client_id: client,
                        scopes,
                    }),
                )
                .await?;
            println!("API key {} for {}", r.api_key.id, r.api_key.client_id);
            println!("key: {}", r.key);
            println!("(shown only now; send it as 'Authorization: ApiKey <key>' or 'X-Api-Key')");
            Ok(())
        }
        IdentityCmd::DeleteApiKey { id } => {
            c.call(
                Method::DELETE,
                &format!("/v1/identity/api-keys/{}", enc(&id)),
                None,
            )
            .await?;
            println!("API key {id} removed");
            Ok(())
        }
        IdentityCmd::Keys { out } => {
            list(
                c,
                "/v1/identity/keys",
                out,
                &["KID", "ALG", "STATE", "SIGNS FROM", "RETIRED"],
                |k: &KeyView| {
                    let now = gantry_model::unix_ms() / 1000;
                    let state = if k.signing {
                        "signing"
                    } else if k.signs_from > now {
                        "published, signs soon"
                    } else {
                        "retired, still published"
                    };
                    vec![
                        k.kid.clone(),
                        k.alg.clone(),
                        state.into(),
                        table::clock(k.signs_from * 1000),
                        k.retired_at
                            .map_or_else(|| "-".into(), |t| table::clock(t * 1000)),
                    ]
                },
            )
            .await
        }
        IdentityCmd::Rotate => {
            let k: KeyView = c
                .send::<(), _>(Method::POST, "/v1/identity/keys/rotate", None)
                .await?;
            println!(
                "new key {} ({}) published now, signing from {}",
                k.kid,
                k.alg,
                table::clock(k.signs_from * 1000)
            );
            Ok(())
        }
    }
}

// ── login ────────────────────────────────────────────────────────────────────────────────────

/// What `gantry login` keeps, per admin API URL, in `$XDG_CONFIG_HOME/gantry/login.json`
/// (0600).
#[derive(Serialize, Deserialize, Default)]
struct Logins {
    #[serde(flatten)]
    by_admin: std::collections::BTreeMap<String, Login>,
}

#[derive(Serialize, Deserialize, Clone)]
struct Login {
    username: String,
    token_url: String,
    access_token: String,
    refresh_token: Option<String>,
    /// Seconds since the epoch.
    expires: u64,
}

fn logins_path() -> Option<PathBuf> {
    let base = std::env::var_os("XDG_CONFIG_HOME")
        .map(PathBuf::from)
        .or_else(|| std::env::var_os("HOME").map(|h| PathBuf::from(h).join(".config")))?;
    Some(base.join("gantry").join("login.json"))
}

fn load_logins() -> Logins {
    logins_path()
        .and_then(|p| std::fs::read(p).ok())
        .and_then(|b| serde_json::from_slice(&b).ok())
        .unwrap_or_default()
}

fn save_logins(l: &Logins) -> Result<(), CliError> {
    use std::io::Write as _;
    use std::os::unix::fs::OpenOptionsExt as _;
    let p = logins_path()
        .ok_or_else(|| CliError::new("no HOME or XDG_CONFIG_HOME to keep the login in"))?;
    if let Some(d) = p.parent() {
        std::fs::create_dir_all(d).map_err(|e| CliError::new(format!("{}: {e}", d.display())))?;
    }
    let tmp = p.with_extension("tmp");
    let mut f = std::fs::OpenOptions::new()
        .write(true)
        .create(true)
        .truncate(true)
        .mode(0o600)
        .open(&tmp)
        .map_err(|e| CliError::new(format!("{}: {e}", tmp.display())))?;
    f.write_all(&serde_json::to_vec_pretty(l).unwrap_or_default())
        .and_then(|()| std::fs::rename(&tmp, &p))
        .map_err(|e| CliError::new(format!("{}: {e}", p.display())))
}

fn now() -> u64 {
    gantry_model::unix_ms() / 1000
}

async fn token_request(url: &str, form: &str) -> Result<serde_json::Value, CliError> {
    use http_body_util::{BodyExt as _, Full};
    let client = hyper_util::client::legacy::Client::builder(hyper_util::rt::TokioExecutor::new())
        .build(hyper_util::client::legacy::connect::HttpConnector::new());
    let req = hyper::Request::post(url)
        .header("content-type", "application/x-www-form-urlencoded")
        .body(Full::new(bytes::Bytes::from(form.to_string())))
        .map_err(|e| CliError::usage(format!("{url}: {e}")))?;
    let resp = client
        .request(req)
        .await
        .map_err(|e| CliError::new(format!("cannot reach the token service at {url}: {e}")))?;
    let status = resp.status();
    let body = resp
        .into_body()
        .collect()
        .await
        .map_err(|e| CliError::new(format!("reading the token response: {e}")))?
        .to_bytes();
    let v: serde_json::Value = serde_json::from_slice(&body).unwrap_or_default();
    if !status.is_success() {
        let why = v["error_description"]
            .as_str()
            .or(v["error"].as_str())
            .unwrap_or("refused");
        return Err(CliError::new(format!(
            "login failed: {why} (HTTP {})",
            status.as_u16()
        )));
    }
    Ok(v)
}

fn login_from(username: &str, token_url: &str, v: &serde_json::Value) -> Result<Login, CliError> {
    Ok(Login {
        username: username.to_string(),
        token_url: token_url.to_string(),
        access_token: v["access_token"]
            .as_str()
            .ok_or_else(|| CliError::new("the token service sent no access token"))?
            .to_string(),
        refresh_token: v["refresh_token"].as_str().map(str::to_string),
        expires: now() + v["expires_in"].as_u64().unwrap_or(0),
    })
}

/// `gantry login USER`: the password from stdin, a token from the token service (password
/// grant, the built-in `gantry-cli` client), kept for this admin API.
pub async fn login(admin_url: &str, identity_url: &str, username: &str) -> Result<(), CliError> {
    let password = read_secret_line("password")?;
    let token_url = format!("{}/oauth2/token", identity_url.trim_end_matches('/'));
    let v = token_request(
        &token_url,
        &format!(
            "grant_type=password&client_id=gantry-cli&username={}&password={}",
            enc(username),
            enc(&password)
        ),
    )
    .await?;
    let mut all = load_logins();
    all.by_admin
        .insert(admin_url.to_string(), login_from(username, &token_url, &v)?);
    save_logins(&all)?;
    println!("logged in as {username}; the CLI now uses your roles' permissions on {admin_url}");
    Ok(())
}

pub fn logout(admin_url: &str) -> Result<(), CliError> {
    let mut all = load_logins();
    match all.by_admin.remove(admin_url) {
        Some(l) => {
            save_logins(&all)?;
            println!("logged out {} from {admin_url}", l.username);
        }
        None => println!("not logged in to {admin_url}"),
    }
    Ok(())
}

/// The logged-in user's access token for this admin API, refreshed when it is about to expire.
pub async fn current_token(admin_url: &str) -> Option<String> {
    let mut all = load_logins();
    let l = all.by_admin.get(admin_url)?.clone();
    if l.expires > now() + 30 {
        return Some(l.access_token);
    }
    let r = l.refresh_token.as_deref()?;
    let v = token_request(
        &l.token_url,
        &format!(
            "grant_type=refresh_token&client_id=gantry-cli&refresh_token={}",
            enc(r)
        ),
    )
    .await
    .ok()?;
    let fresh = login_from(&l.username, &l.token_url, &v).ok()?;
    let t = fresh.access_token.clone();
    all.by_admin.insert(admin_url.to_string(), fresh);
    save_logins(&all).ok()?;
    Some(t)
}
