//! The subset of Consul's HTTP API that service-discovery clients use (python-consul, Spring
//! Cloud Consul, consul-template's reads), over Gantry's registry and config store:
//!
//! - agent: `PUT /v1/agent/service/register` (TTL checks), `PUT /v1/agent/service/deregister/ID`,
//!   `PUT /v1/agent/check/{pass,warn,fail}/ID`, `PUT /v1/agent/check/update/ID`,
//!   `GET /v1/agent/services`, `GET /v1/agent/checks`, `GET /v1/agent/self`;
//! - catalog and health: `GET /v1/catalog/services`, `GET /v1/catalog/service/NAME`,
//!   `GET /v1/health/service/NAME` (`passing`, `tag`), with blocking queries (`index`, `wait`,
//!   `X-Consul-Index`);
//! - KV: `GET/PUT/DELETE /v1/kv/SERVICE/KEY` (`recurse`, `keys`, `cas`), mapped onto the config
//!   store: the first path segment names the config set (a service, or `_global`), the rest the
//!   key (an environment-variable name), so a KV write is a config commit with history;
//! - `GET /v1/status/leader`, `GET /v1/catalog/nodes`.
//!
//! A Consul token (`X-Consul-Token`, `?token=` or a bearer token) is a Gantry token or API key:
//! reads need `registry:read` / `config:read`, writes `registry:write` / `config:write`, and
//! every write is audited. Errors are plain text with Consul's status codes.

use std::collections::BTreeMap;
use std::net::{IpAddr, SocketAddr};
use std::time::Duration;

use axum::body::Bytes;
use axum::extract::{ConnectInfo, Path, RawQuery, State};
use axum::http::{HeaderMap, Method, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, put};
use axum::Router;
use base64::Engine as _;
use gantry_api::auth::Permission;
use gantry_config::ChangeRequest;
use gantry_model::{Health, Instance, InstanceSource};
use gantry_registry::{CheckRegistration, HealthFilter, Query, Registration, RegistryError};
use serde_json::{json, Map, Value};

use crate::{CompatState, Denied, Fail};

const INDEX: &str = "x-consul-index";
/// This listener's name in instances' `gantry.registered-through` metadata.
const LISTENER: &str = "consul";
const DATACENTER: &str = "dc1";
/// Longest blocking query (Consul's cap) and the default when only `index` is given.
const MAX_WAIT: Duration = Duration::from_secs(600);
const DEFAULT_WAIT: Duration = Duration::from_secs(300);
/// Largest KV value (Consul's limit is 512 KiB; the config store's is 64 KiB).
const MAX_KV_BODY: usize = 64 * 1024;

pub fn router(state: CompatState) -> Router {
    Router::new()
        .route("/v1/agent/service/register", put(register))
        .route("/v1/agent/service/deregister/{id}", put(deregister))
        .route("/v1/agent/check/{verb}/{id}", put(check_verb))
        .route("/v1/agent/services", get(agent_services))
        .route("/v1/agent/checks", get(agent_checks))
        .route("/v1/agent/self", get(agent_self))
        .route("/v1/catalog/services", get(catalog_services))
        .route("/v1/catalog/service/{name}", get(catalog_service))
        .route("/v1/catalog/nodes", get(catalog_nodes))
        .route("/v1/health/service/{name}", get(health_service))
        .route("/v1/status/leader", get(status_leader))
        .route("/v1/kv/{*key}", get(kv_get).put(kv_put).delete(kv_delete))
        .route("/v1/kv/", get(kv_get_root))
        .route("/v1/kv", get(kv_get_root))
        .fallback(not_found)
        .with_state(state)
}

async fn not_found() -> Response {
    // With an index, as every Consul answer has (clients read it even from a 404).
    (
        StatusCode::NOT_FOUND,
        [(http::HeaderName::from_static(INDEX), "1")],
        "this Consul endpoint is not part of the subset Gantry speaks (agent service and check, catalog, health, kv, status)",
    )
        .into_response()
}

/// `GET /v1/kv/?recurse`: every set's keys.
async fn kv_get_root(
    s: State<CompatState>,
    q: RawQuery,
    headers: HeaderMap,
) -> Result<Response, Fail> {
    kv_get(s, Path(String::new()), q, headers).await
}

/// Query parameters as Consul reads them: `?passing` alone means true.
#[derive(Clone)]
struct Params(Vec<(String, String)>);

impl Params {
    fn parse(q: Option<&str>) -> Self {
        Params(
            form_urlencoded::parse(q.unwrap_or("").as_bytes())
                .map(|(k, v)| (k.into_owned(), v.into_owned()))
                .collect(),
        )
    }

    fn get(&self, k: &str) -> Option<&str> {
        self.0
            .iter()
            .find(|(key, _)| key == k)
            .map(|(_, v)| v.as_str())
    }

    fn flag(&self, k: &str) -> bool {
        self.get(k).is_some_and(|v| !matches!(v, "false" | "0"))
    }

    fn all(&self, k: &str) -> Vec<String> {
        self.0
            .iter()
            .filter(|(key, _)| key == k)
            .map(|(_, v)| v.clone())
            .collect()
    }

    fn index(&self) -> Result<Option<u64>, Fail> {
        self.get("index")
            .map(|v| {
                v.parse().map_err(|_| {
                    Fail(
                        StatusCode::BAD_REQUEST,
                        format!("index: expected a number, got {v:?}"),
                    )
                })
            })
            .transpose()
    }

    /// Consul's `wait`: `10s`, `500ms`, `5m` (bounded).
    fn wait(&self) -> Result<Duration, Fail> {
        match self.get("wait") {
            None => Ok(DEFAULT_WAIT),
            Some(w) => humantime::parse_duration(w)
                .map(|d| d.min(MAX_WAIT))
                .map_err(|e| {
                    Fail(
                        StatusCode::BAD_REQUEST,
                        format!("wait: expected a duration such as 10s, got {w:?}: {e}"),
                    )
                }),
        }
    }
}

/// Who calls, if allowed: the token from `X-Consul-Token`, `?token=` or `Authorization`.
fn principal(
    s: &CompatState,
    headers: &HeaderMap,
    params: &Params,
    perm: Permission,
) -> Result<gantry_api::auth::Principal, Fail> {
    let bearer = headers
        .get(http::header::AUTHORIZATION)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.strip_prefix("Bearer "));
    let token = headers
        .get("x-consul-token")
        .and_then(|v| v.to_str().ok())
        .or(params.get("token"))
        .or(bearer);
    s.authorize(token, perm).map_err(|d| match d {
        Denied::NoToken => Fail(
            StatusCode::FORBIDDEN,
            "Permission denied: a token is required (X-Consul-Token: a Gantry token or API key)"
                .into(),
        ),
        Denied::BadToken(why) => Fail(StatusCode::FORBIDDEN, format!("ACL not found: {why}")),
        Denied::Forbidden(why) => Fail(StatusCode::FORBIDDEN, format!("Permission denied: {why}")),
    })
}

/// Run a write: authorize, do it, audit it (refusals included), answer.
/// A write's request, as the audit trail records it.
struct WriteCall<'a> {
    headers: &'a HeaderMap,
    params: &'a Params,
    remote: Option<SocketAddr>,
    method: Method,
    path: &'a str,
}

async fn write<F, Fut>(s: &CompatState, call: WriteCall<'_>, perm: Permission, f: F) -> Response
where
    F: FnOnce(gantry_api::auth::Principal) -> Fut,
    Fut: std::future::Future<Output = Result<Response, Fail>>,
{
    let request_id = gantry_registry::random_hex(16);
    let (principal, resp) = match principal(s, call.headers, call.params, perm) {
        Ok(p) => {
            let resp = f(p.clone())
                .await
                .unwrap_or_else(IntoResponse::into_response);
            (Some(p), resp)
        }
        Err(e) => (None, e.into_response()),
    };
    // Whatever the path carried after the endpoint (a KV key, an id) is recorded; a token
    // in the query never is (only the path goes in).
    let rec = gantry_api::audit::Call {
        principal: None,
        method: &call.method,
        path: call.path,
        template: "consul",
        permission: perm,
        remote: call.remote,
        request_id: &request_id,
        status: resp.status(),
    };
    crate::audit(s, principal.as_ref(), rec).await;
    resp
}

fn with_index(index: u64, body: Value) -> Response {
    (
        [
            (
                http::HeaderName::from_static(INDEX),
                index.max(1).to_string(),
            ),
            (
                http::HeaderName::from_static("x-consul-knownleader"),
                "true".to_string(),
            ),
            (
                http::HeaderName::from_static("x-consul-lastcontact"),
                "0".to_string(),
            ),
        ],
        axum::Json(body),
    )
        .into_response()
}

/// JSON object with its keys lowercased (Consul reads `Name`, `name` and `NAME` alike); maps
/// whose keys are data (`Meta`) keep theirs.
fn lower_keys(v: Value) -> Value {
    match v {
        Value::Object(m) => {
            let mut out = Map::new();
            for (k, v) in m {
                let lk = k.to_ascii_lowercase();
                let v = if lk == "meta" { v } else { lower_keys(v) };
                out.insert(lk, v);
            }
            Value::Object(out)
        }
        Value::Array(a) => Value::Array(a.into_iter().map(lower_keys).collect()),
        other => other,
    }
}

fn str_field<'a>(o: &'a Map<String, Value>, k: &str) -> Result<Option<&'a str>, Fail> {
    match o.get(k) {
        None | Some(Value::Null) => Ok(None),
        Some(Value::String(s)) => Ok(Some(s)),
        Some(_) => Err(Fail(
            StatusCode::BAD_REQUEST,
            format!("{k}: expected a string"),
        )),
    }
}

/// Consul durations: `10s`, `1m`, `500ms`.
fn duration_ms(field: &str, v: &str) -> Result<u64, Fail> {
    humantime::parse_duration(v)
        .map(|d| d.as_millis() as u64)
        .map_err(|e| {
            Fail(
                StatusCode::BAD_REQUEST,
                format!("{field}: expected a duration such as 10s, got {v:?}: {e}"),
            )
        })
}

/// The check definitions of a registration: TTL checks only (Gantry probes the instances it
/// runs itself; a service registered from outside vouches for itself).
fn checks(o: &Map<String, Value>, service_id: &str) -> Result<Vec<CheckRegistration>, Fail> {
    let mut defs: Vec<Value> = Vec::new();
    if let Some(c) = o.get("check").filter(|c| !c.is_null()) {
        defs.push(c.clone());
    }
    if let Some(cs) = o.get("checks").filter(|c| !c.is_null()) {
        match cs {
            Value::Array(a) => defs.extend(a.iter().cloned()),
            _ => {
                return Err(Fail(
                    StatusCode::BAD_REQUEST,
                    "Checks: expected a list".into(),
                ))
            }
        }
    }
    let many = defs.len() > 1;
    defs.iter()
        .enumerate()
        .map(|(n, c)| {
            let Value::Object(c) = c else {
                return Err(Fail(
                    StatusCode::BAD_REQUEST,
                    "Check: expected an object".into(),
                ));
            };
            let Some(ttl) = str_field(c, "ttl")? else {
                return Err(Fail(
                    StatusCode::BAD_REQUEST,
                    "only TTL checks are supported (Check.TTL): Gantry probes the instances it runs; a service registered from outside reports its own health with check pass/warn/fail".into(),
                ));
            };
            let id = match str_field(c, "checkid")?.or(str_field(c, "id")?) {
                Some(id) => id.to_string(),
                None if many => format!("service:{service_id}:{}", n + 1),
                None => format!("service:{service_id}"),
            };
            let status = match str_field(c, "status")? {
                None => Health::Critical,
                Some("passing") => Health::Passing,
                Some("warning") => Health::Warning,
                Some("critical") => Health::Critical,
                Some(other) => {
                    return Err(Fail(
                        StatusCode::BAD_REQUEST,
                        format!("Check.Status: expected passing, warning or critical, got {other:?}"),
                    ))
                }
            };
            Ok(CheckRegistration {
                id: Some(id),
                name: str_field(c, "name")?.map(str::to_string),
                ttl_ms: duration_ms("Check.TTL", ttl)?,
                // Consul's default: critical until the first pass.
                status: Some(status),
            })
        })
        .collect()
}

async fn register(
    State(s): State<CompatState>,
    ConnectInfo(remote): ConnectInfo<SocketAddr>,
    RawQuery(q): RawQuery,
    headers: HeaderMap,
    body: Bytes,
) -> Response {
    let params = Params::parse(q.as_deref());
    let (s2, params2) = (s.clone(), params.clone());
    crate::detached(async move {
    write(
        &s,
        WriteCall {
            headers: &headers,
            params: &params,
            remote: Some(remote),
            method: Method::PUT,
            path: "/v1/agent/service/register",
        },
        Permission::RegistryWrite,
        |_| async move {
            let (s, params) = (s2, params2);
            let _ = &params;
            let v: Value = serde_json::from_slice(&body).map_err(|e| {
                Fail(StatusCode::BAD_REQUEST, format!("Request decode failed: {e}"))
            })?;
            let Value::Object(o) = lower_keys(v) else {
                return Err(Fail(
                    StatusCode::BAD_REQUEST,
                    "Request decode failed: expected a JSON object".into(),
                ));
            };
            let name = str_field(&o, "name")?
                .ok_or_else(|| Fail(StatusCode::BAD_REQUEST, "Missing service name".into()))?
                .to_string();
            let id = str_field(&o, "id")?.unwrap_or(&name).to_string();
            let address = match str_field(&o, "address")? {
                None | Some("") => None,
                Some(a) => Some(a.parse::<IpAddr>().map_err(|_| {
                    Fail(
                        StatusCode::BAD_REQUEST,
                        format!("Address: expected an IP address, got {a:?} (Gantry routes to addresses, not names)"),
                    )
                })?),
            };
            let port = match o.get("port") {
                Some(Value::Number(n)) => n
                    .as_u64()
                    .filter(|p| (1..=65535).contains(p))
                    .ok_or_else(|| Fail(StatusCode::BAD_REQUEST, "Port: expected 1-65535".into()))?
                    as u16,
                _ => {
                    return Err(Fail(
                        StatusCode::BAD_REQUEST,
                        "Port: required (Gantry routes to an address and port)".into(),
                    ))
                }
            };
            let tags: Vec<String> = match o.get("tags") {
                None | Some(Value::Null) => Vec::new(),
                Some(Value::Array(a)) => a
                    .iter()
                    .map(|t| {
                        t.as_str().map(str::to_string).ok_or_else(|| {
                            Fail(StatusCode::BAD_REQUEST, "Tags: expected strings".into())
                        })
                    })
                    .collect::<Result<_, _>>()?,
                Some(_) => return Err(Fail(StatusCode::BAD_REQUEST, "Tags: expected a list".into())),
            };
            let metadata: BTreeMap<String, String> = match o.get("meta") {
                None | Some(Value::Null) => BTreeMap::new(),
                Some(Value::Object(m)) => m
                    .iter()
                    .map(|(k, v)| {
                        v.as_str()
                            .map(|v| (k.clone(), v.to_string()))
                            .ok_or_else(|| {
                                Fail(StatusCode::BAD_REQUEST, format!("Meta.{k}: expected a string"))
                            })
                    })
                    .collect::<Result<_, _>>()?,
                Some(_) => return Err(Fail(StatusCode::BAD_REQUEST, "Meta: expected an object".into())),
            };
            // A version, if the service says one in its metadata.
            let version = metadata
                .get("version")
                .filter(|v| semver::Version::parse(v).is_ok())
                .cloned();
            let checks = checks(&o, &id)?;
            s.open_to_registration(&name)
                .map_err(|m| Fail(StatusCode::FORBIDDEN, format!("Permission denied: {m}")))?;
            if s.registry.get(&id).is_some() && s.own_instance(&id, LISTENER).is_none() {
                return Err(Fail(
                    StatusCode::FORBIDDEN,
                    format!("Permission denied: instance {id} exists and was not registered through the Consul API"),
                ));
            }
            let mut metadata = metadata;
            metadata.insert(crate::SOURCE_META.into(), LISTENER.into());
            let reg = Registration {
                service: name,
                id: Some(id),
                version,
                address,
                port,
                metadata,
                zone: None,
                // Consul keeps an agent's services until they are deregistered: the longest
                // lease, renewed by every check update.
                ttl_ms: Some(gantry_registry::MAX_TTL_MS),
                tags,
                checks,
            };
            s.registry.register_external(reg).await?;
            Ok(StatusCode::OK.into_response())
        },
    )
    .await
    })
    .await
}

async fn deregister(
    State(s): State<CompatState>,
    ConnectInfo(remote): ConnectInfo<SocketAddr>,
    Path(id): Path<String>,
    RawQuery(q): RawQuery,
    headers: HeaderMap,
) -> Response {
    let params = Params::parse(q.as_deref());
    let path = format!("/v1/agent/service/deregister/{id}");
    let (s2, params2) = (s.clone(), params.clone());
    crate::detached(async move {
        write(
            &s,
            WriteCall {
                headers: &headers,
                params: &params,
                remote: Some(remote),
                method: Method::PUT,
                path: &path,
            },
            Permission::RegistryWrite,
            |_| async move {
                let (s, params) = (s2, params2);
                let _ = &params;
                if s.registry.get(&id).is_some() && s.own_instance(&id, LISTENER).is_none() {
                    return Err(Fail(
                        StatusCode::FORBIDDEN,
                        format!(
                            "Permission denied: {id} was not registered through the Consul API"
                        ),
                    ));
                }
                match s.registry.deregister_external(&id).await {
                    // Consul answers 200 for a service that is not there.
                    Ok(()) | Err(RegistryError::NotFound(_)) => Ok(StatusCode::OK.into_response()),
                    Err(e) => Err(e.into()),
                }
            },
        )
        .await
    })
    .await
}

/// The instance a check id belongs to: `service:ID[:N]` (Consul's default ids), else any
/// instance with a check of that id.
fn check_owner(s: &CompatState, check: &str) -> Result<String, Fail> {
    if let Some(rest) = check.strip_prefix("service:") {
        let id = rest.rsplit_once(':').map_or(rest, |(id, n)| {
            if n.bytes().all(|b| b.is_ascii_digit()) {
                id
            } else {
                rest
            }
        });
        if let Some(i) = s.own_instance(id, LISTENER) {
            if i.checks.iter().any(|c| c.id == check) {
                return Ok(i.id);
            }
        }
    }
    // Only instances registered through this listener, and only an unambiguous check id.
    let snap = s.registry.snapshot();
    let owners: Vec<String> = snap
        .services
        .values()
        .flat_map(|l| l.iter())
        .filter(|i| i.metadata.get(crate::SOURCE_META).map(String::as_str) == Some(LISTENER))
        .filter(|i| i.checks.iter().any(|c| c.id == check))
        .map(|i| i.id.clone())
        .collect();
    match owners.as_slice() {
        [one] => Ok(one.clone()),
        [] => Err(Fail(
            StatusCode::NOT_FOUND,
            format!("Unknown check ID {check:?}"),
        )),
        _ => Err(Fail(
            StatusCode::BAD_REQUEST,
            format!("check ID {check:?} belongs to several services; use service:SERVICE_ID"),
        )),
    }
}

/// A check update: a status by the verb (`pass`, `warn`, `fail`), or `update`'s JSON body.
enum CheckSet {
    Status(Health, &'static str),
    Body(Bytes),
}

async fn set_check(
    s: CompatState,
    remote: SocketAddr,
    check: String,
    q: Option<String>,
    headers: HeaderMap,
    how: CheckSet,
) -> Response {
    let verb = match &how {
        CheckSet::Status(_, verb) => *verb,
        CheckSet::Body(_) => "update",
    };
    let params = Params::parse(q.as_deref());
    let path = format!("/v1/agent/check/{verb}/{check}");
    let (s2, params2) = (s.clone(), params.clone());
    crate::detached(async move {
        write(
            &s,
            WriteCall {
                headers: &headers,
                params: &params,
                remote: Some(remote),
                method: Method::PUT,
                path: &path,
            },
            Permission::RegistryWrite,
            |_| async move {
                let (s, params) = (s2, params2);
                let _ = &params;
                let (status, output) = match how {
                    CheckSet::Status(st, _) => (st, params.get("note").unwrap_or("").to_string()),
                    CheckSet::Body(b) => {
                        let v: Value = serde_json::from_slice(&b).map_err(|e| {
                            Fail(
                                StatusCode::BAD_REQUEST,
                                format!("Request decode failed: {e}"),
                            )
                        })?;
                        let Value::Object(o) = lower_keys(v) else {
                            return Err(Fail(
                                StatusCode::BAD_REQUEST,
                                "expected a JSON object".into(),
                            ));
                        };
                        let st = match str_field(&o, "status")? {
                            Some("passing") => Health::Passing,
                            Some("warning") => Health::Warning,
                            Some("critical") => Health::Critical,
                            other => {
                                return Err(Fail(
                                    StatusCode::BAD_REQUEST,
                                    format!(
                                    "Status: expected passing, warning or critical, got {other:?}"
                                ),
                                ))
                            }
                        };
                        (st, str_field(&o, "output")?.unwrap_or("").to_string())
                    }
                };
                let owner = check_owner(&s, &check)?;
                s.registry.update_check(&owner, &check, status, &output)?;
                Ok(StatusCode::OK.into_response())
            },
        )
        .await
    })
    .await
}

/// `PUT /v1/agent/check/{pass,warn,fail}/ID` (`?note=`) and `/update/ID` (a JSON body).
async fn check_verb(
    State(s): State<CompatState>,
    ConnectInfo(remote): ConnectInfo<SocketAddr>,
    Path((verb, id)): Path<(String, String)>,
    RawQuery(q): RawQuery,
    headers: HeaderMap,
    body: Bytes,
) -> Response {
    let how = match verb.as_str() {
        "pass" => CheckSet::Status(Health::Passing, "pass"),
        "warn" => CheckSet::Status(Health::Warning, "warn"),
        "fail" => CheckSet::Status(Health::Critical, "fail"),
        "update" => CheckSet::Body(body),
        _ => return not_found().await,
    };
    set_check(s, remote, id, q, headers, how).await
}

fn service_json(i: &Instance) -> Value {
    json!({
        "ID": i.id,
        "Service": i.service,
        "Tags": i.tags,
        "Address": i.address.to_string(),
        "Port": i.port,
        "Meta": i.metadata,
        "EnableTagOverride": false,
        "Weights": {"Passing": 1, "Warning": 1},
        "Datacenter": DATACENTER,
    })
}

fn check_json(s: &CompatState, i: &Instance, c: &gantry_model::Check) -> Value {
    json!({
        "Node": node_name(s, i),
        "CheckID": c.id,
        "Name": c.name,
        "Status": c.status.as_str(),
        "Notes": "",
        "Output": c.output,
        "ServiceID": i.id,
        "ServiceName": i.service,
        "ServiceTags": i.tags,
        "Type": match c.kind {
            gantry_model::CheckKind::Ttl => "ttl",
            gantry_model::CheckKind::Probe => "script",
            gantry_model::CheckKind::Passive => "alias",
        },
        "CreateIndex": 1,
        "ModifyIndex": 1,
    })
}

fn node_name(_s: &CompatState, i: &Instance) -> String {
    i.node.clone()
}

fn all_instances(s: &CompatState) -> Vec<std::sync::Arc<Instance>> {
    s.registry
        .snapshot()
        .services
        .values()
        .flat_map(|l| l.iter().cloned())
        .collect()
}

async fn agent_services(
    State(s): State<CompatState>,
    RawQuery(q): RawQuery,
    headers: HeaderMap,
) -> Result<Response, Fail> {
    let params = Params::parse(q.as_deref());
    principal(&s, &headers, &params, Permission::RegistryRead)?;
    let out: Map<String, Value> = all_instances(&s)
        .iter()
        .filter(|i| matches!(i.source, InstanceSource::External { .. }))
        .map(|i| (i.id.clone(), service_json(i)))
        .collect();
    Ok(axum::Json(Value::Object(out)).into_response())
}

async fn agent_checks(
    State(s): State<CompatState>,
    RawQuery(q): RawQuery,
    headers: HeaderMap,
) -> Result<Response, Fail> {
    let params = Params::parse(q.as_deref());
    principal(&s, &headers, &params, Permission::RegistryRead)?;
    let mut out = Map::new();
    for i in all_instances(&s) {
        for c in &i.checks {
            out.insert(c.id.clone(), check_json(&s, &i, c));
        }
    }
    Ok(axum::Json(Value::Object(out)).into_response())
}

async fn agent_self(
    State(s): State<CompatState>,
    RawQuery(q): RawQuery,
    headers: HeaderMap,
) -> Result<Response, Fail> {
    let params = Params::parse(q.as_deref());
    principal(&s, &headers, &params, Permission::RegistryRead)?;
    Ok(axum::Json(json!({
        "Config": {
            "Datacenter": DATACENTER,
            "NodeName": s.registry.node(),
            "Server": true,
            "Version": "1.15.0",
            "Revision": "gantry",
        },
        "Member": {"Name": s.registry.node(), "Addr": "127.0.0.1", "Status": 1},
        "Meta": {"gantry": "true"},
    }))
    .into_response())
}

async fn status_leader(State(s): State<CompatState>) -> Response {
    axum::Json(Value::String(s.advertise.clone())).into_response()
}

async fn catalog_nodes(
    State(s): State<CompatState>,
    RawQuery(q): RawQuery,
    headers: HeaderMap,
) -> Result<Response, Fail> {
    let params = Params::parse(q.as_deref());
    principal(&s, &headers, &params, Permission::RegistryRead)?;
    let node = s.registry.node().to_string();
    Ok(with_index(
        s.registry.revision(),
        json!([{"ID": node, "Node": node, "Address": "127.0.0.1", "Datacenter": DATACENTER,
                "TaggedAddresses": {}, "Meta": {}}]),
    ))
}

async fn catalog_services(
    State(s): State<CompatState>,
    RawQuery(q): RawQuery,
    headers: HeaderMap,
) -> Result<Response, Fail> {
    let params = Params::parse(q.as_deref());
    principal(&s, &headers, &params, Permission::RegistryRead)?;
    if let Some(index) = params.index()? {
        if let Ok(_slot) = s.waiters.clone().try_acquire_owned() {
            s.registry.wait_past(None, index, params.wait()?).await;
        }
    }
    let snap = s.registry.snapshot();
    let mut out = Map::new();
    for (name, list) in &snap.services {
        let mut tags: Vec<String> = list.iter().flat_map(|i| i.tags.iter().cloned()).collect();
        tags.sort();
        tags.dedup();
        out.insert(name.to_string(), json!(tags));
    }
    Ok(with_index(snap.revision, Value::Object(out)))
}

/// One service's instances for a catalog or health query (a blocking one with `index`).
async fn service_query(
    s: &CompatState,
    name: &str,
    params: &Params,
    health: HealthFilter,
) -> Result<(u64, Vec<Instance>), Fail> {
    if let Some(index) = params.index()? {
        if let Ok(_slot) = s.waiters.clone().try_acquire_owned() {
            s.registry
                .wait_past(Some(name), index, params.wait()?)
                .await;
        }
    }
    let q = Query {
        service: name.to_string(),
        tags: params.all("tag"),
        near: params
            .get("near")
            .filter(|n| *n != "_agent")
            .map(str::to_string),
        health,
        ..Query::default()
    };
    Ok(s.registry.query(&q))
}

async fn catalog_service(
    State(s): State<CompatState>,
    Path(name): Path<String>,
    RawQuery(q): RawQuery,
    headers: HeaderMap,
) -> Result<Response, Fail> {
    let params = Params::parse(q.as_deref());
    principal(&s, &headers, &params, Permission::RegistryRead)?;
    // The catalog lists every instance, whatever its health (as Consul's does).
    let (index, list) = service_query(&s, &name, &params, HealthFilter::Any).await?;
    let out: Vec<Value> = list
        .iter()
        .map(|i| {
            json!({
                "ID": i.node,
                "Node": i.node,
                "Address": "127.0.0.1",
                "Datacenter": DATACENTER,
                "TaggedAddresses": {},
                "NodeMeta": {},
                "ServiceKind": "",
                "ServiceID": i.id,
                "ServiceName": i.service,
                "ServiceTags": i.tags,
                "ServiceAddress": i.address.to_string(),
                "ServicePort": i.port,
                "ServiceMeta": i.metadata,
                "ServiceEnableTagOverride": false,
                "ServiceWeights": {"Passing": 1, "Warning": 1},
                "CreateIndex": index,
                "ModifyIndex": index,
            })
        })
        .collect();
    Ok(with_index(index, Value::Array(out)))
}

async fn health_service(
    State(s): State<CompatState>,
    Path(name): Path<String>,
    RawQuery(q): RawQuery,
    headers: HeaderMap,
) -> Result<Response, Fail> {
    let params = Params::parse(q.as_deref());
    principal(&s, &headers, &params, Permission::RegistryRead)?;
    let filter = if params.flag("passing") {
        HealthFilter::Passing
    } else {
        HealthFilter::Any
    };
    let (index, list) = service_query(&s, &name, &params, filter).await?;
    let out: Vec<Value> = list
        .iter()
        .map(|i| {
            let mut checks = vec![json!({
                "Node": i.node, "CheckID": "serfHealth", "Name": "Serf Health Status",
                "Status": "passing", "Notes": "", "Output": "Agent alive and reachable",
                "ServiceID": "", "ServiceName": "", "ServiceTags": [], "Type": "",
                "CreateIndex": 1, "ModifyIndex": 1,
            })];
            checks.extend(i.checks.iter().map(|c| check_json(&s, i, c)));
            json!({
                "Node": {"ID": i.node, "Node": i.node, "Address": "127.0.0.1",
                         "Datacenter": DATACENTER, "TaggedAddresses": {}, "Meta": {}},
                "Service": service_json(i),
                "Checks": checks,
            })
        })
        .collect();
    Ok(with_index(index, Value::Array(out)))
}

// ---------------------------------------------------------------------------------------------
// KV over the config store

/// `SERVICE/KEY` → (set, key); `SERVICE/` or `SERVICE` → (set, prefix "").
fn kv_path(key: &str) -> Result<(String, String), Fail> {
    let (set, rest) = key.split_once('/').unwrap_or((key, ""));
    if gantry_config::check_set(set).is_err() {
        return Err(Fail(
            StatusCode::BAD_REQUEST,
            format!(
                "Gantry maps Consul KV onto its config store as SERVICE/KEY (or {}/KEY): {set:?} is not a service name",
                gantry_config::GLOBAL
            ),
        ));
    }
    if rest.contains('/') {
        return Err(Fail(
            StatusCode::BAD_REQUEST,
            format!("Gantry maps Consul KV onto its config store as SERVICE/KEY: {key:?} has more than two segments"),
        ));
    }
    Ok((set.to_string(), rest.to_string()))
}

fn kv_entry(set: &str, key: &str, value: &Value, index: u64) -> Value {
    let text = gantry_config::model::env_text(value);
    json!({
        "Key": format!("{set}/{key}"),
        "Value": base64::engine::general_purpose::STANDARD.encode(text.as_bytes()),
        "Flags": 0,
        "LockIndex": 0,
        "Session": null,
        "CreateIndex": index,
        "ModifyIndex": index,
    })
}

async fn kv_get(
    State(s): State<CompatState>,
    Path(key): Path<String>,
    RawQuery(q): RawQuery,
    headers: HeaderMap,
) -> Result<Response, Fail> {
    let params = Params::parse(q.as_deref());
    principal(&s, &headers, &params, Permission::ConfigRead)?;
    let recurse = params.flag("recurse") || params.get("keys").is_some();
    // Every set under an empty prefix; else one.
    let sets: Vec<String> = if recurse && key.is_empty() {
        s.config.sets().await?
    } else {
        vec![kv_path(&key)?.0]
    };
    let prefix = if key.is_empty() {
        String::new()
    } else {
        kv_path(&key)?.1
    };
    if let Some(index) = params.index()? {
        wait_config(&s, &sets, index, params.wait()?).await?;
    }
    let mut index = 0;
    let mut out = Vec::new();
    for set in &sets {
        let view = s.config.view(set, false).await?;
        // The KV index: the sum of the sets' versions, plus one (monotonic: every commit to
        // any of them moves it; never 0).
        index += view.version;
        for (k, v) in &view.document.values {
            let hit = if recurse {
                k.starts_with(&prefix)
            } else {
                *k == prefix
            };
            if hit {
                out.push(kv_entry(set, k, v, view.version + 1));
            }
        }
        if !recurse && view.document.redacted.contains(&prefix) {
            return Err(Fail(
                StatusCode::FORBIDDEN,
                format!("{set}/{prefix} is a secret: read it with `gantry config get {set} {prefix} --reveal`"),
            ));
        }
    }
    index += 1;
    if out.is_empty() {
        // python-consul and others read the index even from a 404.
        return Ok((
            StatusCode::NOT_FOUND,
            [(
                http::HeaderName::from_static(INDEX),
                index.max(1).to_string(),
            )],
        )
            .into_response());
    }
    if params.get("keys").is_some() {
        let keys: Vec<Value> = out.iter().map(|e| e["Key"].clone()).collect();
        return Ok(with_index(index, Value::Array(keys)));
    }
    if params.flag("raw") && out.len() == 1 {
        let v = out[0]["Value"].as_str().unwrap_or("");
        let bytes = base64::engine::general_purpose::STANDARD
            .decode(v)
            .unwrap_or_default();
        return Ok((
            [(
                http::HeaderName::from_static(INDEX),
                index.max(1).to_string(),
            )],
            bytes,
        )
            .into_response());
    }
    Ok(with_index(index, Value::Array(out)))
}

/// The KV index of `sets`: the sum of their versions, plus one.
async fn kv_index(s: &CompatState, sets: &[String]) -> Result<u64, Fail> {
    let mut sum = 1;
    for set in sets {
        sum += s.config.version_of(set).await?;
    }
    Ok(sum)
}

/// Wait until the KV index of `sets` moves past `index` (or `wait` passes).
async fn wait_config(
    s: &CompatState,
    sets: &[String],
    index: u64,
    wait: Duration,
) -> Result<(), Fail> {
    let Ok(_slot) = s.waiters.clone().try_acquire_owned() else {
        // Too many waiting: answer now, as at the end of `wait`.
        return Ok(());
    };
    let mut rx = s.config.subscribe();
    let deadline = tokio::time::Instant::now() + wait;
    let now = kv_index(s, sets).await?;
    // An index from the future (another store, a restart): answer at once, as Consul does.
    if now > index || index > now.saturating_add(1_000_000) {
        return Ok(());
    }
    loop {
        match tokio::time::timeout_at(deadline, rx.recv()).await {
            Err(_) => return Ok(()),
            Ok(Ok(c)) if sets.contains(&c.set) => {
                if kv_index(s, sets).await? > index {
                    return Ok(());
                }
            }
            Ok(Ok(_)) => {}
            Ok(Err(_)) => return Ok(()),
        }
    }
}

async fn kv_put(
    State(s): State<CompatState>,
    ConnectInfo(remote): ConnectInfo<SocketAddr>,
    Path(key): Path<String>,
    RawQuery(q): RawQuery,
    headers: HeaderMap,
    body: Bytes,
) -> Response {
    let params = Params::parse(q.as_deref());
    let path = format!("/v1/kv/{key}");
    let (s2, params2) = (s.clone(), params.clone());
    crate::detached(async move {
        write(
            &s,
            WriteCall {
                headers: &headers,
                params: &params,
                remote: Some(remote),
                method: Method::PUT,
                path: &path,
            },
            Permission::ConfigWrite,
            |p| async move {
                let (s, params) = (s2, params2);
                let _ = &params;
                let (set, k) = kv_path(&key)?;
                if k.is_empty() {
                    return Err(Fail(
                        StatusCode::BAD_REQUEST,
                        "a KV write needs a key: SERVICE/KEY".into(),
                    ));
                }
                if body.len() > MAX_KV_BODY {
                    return Err(Fail(
                        StatusCode::PAYLOAD_TOO_LARGE,
                        format!("Value exceeds {MAX_KV_BODY} byte limit"),
                    ));
                }
                let text = String::from_utf8(body.to_vec()).map_err(|_| {
                    Fail(
                        StatusCode::BAD_REQUEST,
                        "the config store keeps text: the value must be UTF-8".into(),
                    )
                })?;
                if params.get("acquire").is_some() || params.get("release").is_some() {
                    return Err(Fail(
                        StatusCode::BAD_REQUEST,
                        "sessions and locks (acquire, release) are not supported".into(),
                    ));
                }
                let view = s.config.view(&set, false).await?;
                if view.document.redacted.contains(&k) {
                    return Err(Fail(
                        StatusCode::FORBIDDEN,
                        format!("Permission denied: {set}/{k} is a secret; change it with `gantry config set {set} --secret {k}`"),
                    ));
                }
                let req = ChangeRequest {
                    set: BTreeMap::from([(k.clone(), Value::String(text))]),
                    message: Some("consul kv put".into()),
                    ..ChangeRequest::default()
                };
                // `cas`: the index (the set's version + 1) must still be this one; 0: the key
                // must not exist. Checked by the commit itself (compare-and-set of the head).
                if let Some(cas) = params.get("cas") {
                    let cas: u64 = cas.parse().map_err(|_| {
                        Fail(
                            StatusCode::BAD_REQUEST,
                            format!("cas: expected a number, got {cas:?}"),
                        )
                    })?;
                    if cas == 0 && view.document.values.contains_key(&k) {
                        return Ok(axum::Json(false).into_response());
                    }
                    let expected = if cas == 0 { view.version } else { cas - 1 };
                    return match s.config.change_if(&set, req, &p.id, expected).await {
                        Ok(_) => Ok(axum::Json(true).into_response()),
                        Err(gantry_config::ConfigError::Conflict) => {
                            Ok(axum::Json(false).into_response())
                        }
                        Err(e) => Err(e.into()),
                    };
                }
                s.config.change(&set, req, &p.id).await?;
                Ok(axum::Json(true).into_response())
            },
        )
        .await
    })
    .await
}

async fn kv_delete(
    State(s): State<CompatState>,
    ConnectInfo(remote): ConnectInfo<SocketAddr>,
    Path(key): Path<String>,
    RawQuery(q): RawQuery,
    headers: HeaderMap,
) -> Response {
    let params = Params::parse(q.as_deref());
    let path = format!("/v1/kv/{key}");
    let (s2, params2) = (s.clone(), params.clone());
    crate::detached(async move {
        write(
            &s,
            WriteCall {
                headers: &headers,
                params: &params,
                remote: Some(remote),
                method: Method::DELETE,
                path: &path,
            },
            Permission::ConfigWrite,
            |p| async move {
                let (s, params) = (s2, params2);
                let _ = &params;
                let (set, k) = kv_path(&key)?;
                let view = s.config.view(&set, false).await?;
                let keys: Vec<String> = if params.flag("recurse") {
                    view.document
                        .values
                        .keys()
                        .chain(&view.document.redacted)
                        .filter(|x| x.starts_with(&k))
                        .cloned()
                        .collect()
                } else if view.document.values.contains_key(&k)
                    || view.document.redacted.contains(&k)
                {
                    vec![k]
                } else {
                    Vec::new()
                };
                if keys.is_empty() {
                    // Consul answers true for a key that is not there.
                    return Ok(axum::Json(true).into_response());
                }
                let req = ChangeRequest {
                    unset: keys,
                    message: Some("consul kv delete".into()),
                    ..ChangeRequest::default()
                };
                s.config.change(&set, req, &p.id).await?;
                Ok(axum::Json(true).into_response())
            },
        )
        .await
    })
    .await
}
