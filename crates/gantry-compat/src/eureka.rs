//! The subset of Eureka's REST API its clients use (Spring Cloud Netflix, py-eureka-client):
//! register (`POST /eureka/apps/APP`), renew (`PUT /eureka/apps/APP/ID?status=`), cancel
//! (`DELETE`), status (`PUT …/status?value=`), and reads (`GET /eureka/apps`, `/apps/delta`,
//! `/apps/APP`, `/apps/APP/ID`, `/instances/ID`) in XML (the default) or JSON (`Accept:
//! application/json`), under `/eureka`, `/eureka/v2` or the root.
//!
//! Over Gantry's registry: an application is a service (its name lowercased), an instance a
//! self-registration whose lease is the instance's `leaseInfo.durationInSecs` (an instance that
//! stops renewing is gone at that time, not Eureka's 90 s to several minutes) and whose status
//! is a check (UP is passing; DOWN, OUT_OF_SERVICE and the rest critical: no traffic). The
//! reads list every service of the registry, those Gantry runs included, so Eureka clients
//! discover them too. Credentials: HTTP basic (the password is a Gantry token or API key) or a
//! bearer token; writes are audited.

use std::collections::BTreeMap;
use std::fmt::Write as _;
use std::net::{IpAddr, SocketAddr};

use axum::body::Bytes;
use axum::extract::{ConnectInfo, Path, RawQuery, State};
use axum::http::{HeaderMap, Method, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, put};
use axum::Router;
use gantry_api::auth::Permission;
use gantry_model::{Health, Instance};
use gantry_registry::{CheckRegistration, Registration, RegistryError};
use serde_json::{json, Value};

use crate::{CompatState, Denied, Fail};

/// Metadata keys Gantry keeps for what Eureka clients sent and expect back.
const META_ID: &str = "eureka.instanceId";
const META_HOST: &str = "eureka.hostName";
const META_APP: &str = "eureka.app";
const META_RENEW: &str = "eureka.renewalIntervalInSecs";
const STATUS_CHECK: &str = "eureka-status";
/// This listener's name in instances' `gantry.registered-through` metadata.
const LISTENER: &str = "eureka";
/// The status check's output while an operator's status override holds (renewals keep it).
const OVERRIDE: &str = "overridden: ";

pub fn router(state: CompatState) -> Router {
    let mut r = Router::new();
    for prefix in ["", "/eureka", "/eureka/v2"] {
        r = r
            .route(&format!("{prefix}/apps"), get(apps))
            .route(&format!("{prefix}/apps/"), get(apps))
            .route(&format!("{prefix}/apps/delta"), get(apps))
            .route(&format!("{prefix}/apps/{{app}}"), get(app).post(register))
            .route(
                &format!("{prefix}/apps/{{app}}/{{id}}"),
                get(app_instance).put(renew).delete(cancel),
            )
            .route(
                &format!("{prefix}/apps/{{app}}/{{id}}/status"),
                put(set_status).delete(clear_status),
            )
            .route(&format!("{prefix}/instances/{{id}}"), get(instance_by_id));
    }
    r.fallback(|| async {
        (
            StatusCode::NOT_FOUND,
            "this Eureka endpoint is not part of the subset Gantry speaks (apps, instances)",
        )
    })
    .with_state(state)
}

fn params(q: Option<&str>) -> Vec<(String, String)> {
    form_urlencoded::parse(q.unwrap_or("").as_bytes())
        .map(|(k, v)| (k.into_owned(), v.into_owned()))
        .collect()
}

fn param<'a>(p: &'a [(String, String)], k: &str) -> Option<&'a str> {
    p.iter().find(|(key, _)| key == k).map(|(_, v)| v.as_str())
}

fn principal(
    s: &CompatState,
    headers: &HeaderMap,
    perm: Permission,
) -> Result<gantry_api::auth::Principal, Fail> {
    s.authorize(crate::basic_or_bearer(headers).as_deref(), perm)
        .map_err(|d| match d {
            Denied::NoToken => Fail(
                StatusCode::UNAUTHORIZED,
                "credentials required: basic auth whose password is a Gantry token or API key"
                    .into(),
            ),
            Denied::BadToken(why) => Fail(StatusCode::UNAUTHORIZED, why),
            Denied::Forbidden(why) => Fail(StatusCode::FORBIDDEN, why),
        })
}

async fn write<F, Fut>(
    s: &CompatState,
    headers: &HeaderMap,
    remote: SocketAddr,
    method: Method,
    path: &str,
    f: F,
) -> Response
where
    F: FnOnce() -> Fut,
    Fut: std::future::Future<Output = Result<Response, Fail>>,
{
    let request_id = gantry_registry::random_hex(16);
    let perm = Permission::RegistryWrite;
    let (p, resp) = match principal(s, headers, perm) {
        Ok(p) => (
            Some(p),
            f().await.unwrap_or_else(IntoResponse::into_response),
        ),
        Err(e) => (None, e.into_response()),
    };
    let rec = gantry_api::audit::Call {
        principal: None,
        method: &method,
        path,
        template: "eureka",
        permission: perm,
        remote: Some(remote),
        request_id: &request_id,
        status: resp.status(),
    };
    crate::audit(s, p.as_ref(), rec).await;
    resp
}

/// Eureka's instance ids (`host:app:port`) as registry ids: lowercase, other characters `-`.
fn registry_id(eureka_id: &str) -> String {
    let mut id: String = eureka_id
        .chars()
        .map(|c| {
            let c = c.to_ascii_lowercase();
            if c.is_ascii_lowercase() || c.is_ascii_digit() || c == '-' || c == '_' {
                c
            } else {
                '-'
            }
        })
        .collect();
    id.truncate(128);
    id
}

/// The registry id of an instance registered through this listener, and the instance; 404
/// for any other.
fn own(s: &CompatState, id: &str) -> Result<(String, Instance), Fail> {
    let rid = registry_id(id);
    let inst = s.own_instance(&rid, LISTENER).ok_or_else(|| {
        Fail(
            StatusCode::NOT_FOUND,
            format!("instance {id} is not registered"),
        )
    })?;
    Ok((rid, inst))
}

fn service_name(app: &str) -> String {
    app.to_ascii_lowercase()
}

/// `{"$": 8080, "@enabled": "true"}`, or a bare number.
fn port_of(v: Option<&Value>) -> Option<u16> {
    let n = match v? {
        Value::Object(o) => o.get("$")?.clone(),
        other => other.clone(),
    };
    match n {
        Value::Number(n) => n.as_u64(),
        Value::String(s) => s.parse().ok(),
        _ => None,
    }
    .filter(|p| (1..=65535).contains(p))
    .map(|p| p as u16)
}

fn status_health(status: &str) -> Result<Health, Fail> {
    match status {
        "UP" => Ok(Health::Passing),
        "DOWN" | "OUT_OF_SERVICE" | "STARTING" | "UNKNOWN" => Ok(Health::Critical),
        other => Err(Fail(
            StatusCode::BAD_REQUEST,
            format!(
                "status: expected UP, DOWN, STARTING, OUT_OF_SERVICE or UNKNOWN, got {other:?}"
            ),
        )),
    }
}

async fn register(
    State(s): State<CompatState>,
    ConnectInfo(remote): ConnectInfo<SocketAddr>,
    Path(app_name): Path<String>,
    headers: HeaderMap,
    body: Bytes,
) -> Response {
    let path = format!("/eureka/apps/{app_name}");
    let s2 = s.clone();
    crate::detached(async move {
        write(&s, &headers, remote, Method::POST, &path, || async move {
            let s = s2;
            let v: Value = serde_json::from_slice(&body).map_err(|e| {
                Fail(
                    StatusCode::BAD_REQUEST,
                    format!("expected a JSON body {{\"instance\": {{...}}}}: {e}"),
                )
            })?;
            let inst = v
                .get("instance")
                .and_then(Value::as_object)
                .ok_or_else(|| Fail(StatusCode::BAD_REQUEST, "instance: required object".into()))?;
            let str_of = |k: &str| inst.get(k).and_then(Value::as_str).map(str::to_string);
            let app = str_of("app").unwrap_or_else(|| app_name.clone());
            if !app.eq_ignore_ascii_case(&app_name) {
                return Err(Fail(
                    StatusCode::BAD_REQUEST,
                    format!(
                        "instance.app {app:?} is not the application of the path, {app_name:?}"
                    ),
                ));
            }
            let ip = str_of("ipAddr")
                .ok_or_else(|| Fail(StatusCode::BAD_REQUEST, "instance.ipAddr: required".into()))?;
            let address: IpAddr = ip.parse().map_err(|_| {
                Fail(
                    StatusCode::BAD_REQUEST,
                    format!("instance.ipAddr: expected an IP address, got {ip:?}"),
                )
            })?;
            let port = port_of(inst.get("port")).ok_or_else(|| {
                Fail(
                    StatusCode::BAD_REQUEST,
                    "instance.port: expected {\"$\": 1-65535}".into(),
                )
            })?;
            let eureka_id = str_of("instanceId")
                .or_else(|| str_of("hostName").map(|h| format!("{h}:{app}:{port}")))
                .unwrap_or_else(|| format!("{ip}:{app}:{port}"));
            let lease = inst.get("leaseInfo").and_then(Value::as_object);
            let lease_num = |k: &str| {
                lease
                    .and_then(|l| l.get(k))
                    .and_then(|v| v.as_u64().or_else(|| v.as_str()?.parse().ok()))
            };
            let duration_s = lease_num("durationInSecs").unwrap_or(90);
            let renew_s = lease_num("renewalIntervalInSecs").unwrap_or(30);
            let health = status_health(&str_of("status").unwrap_or_else(|| "UP".into()))?;
            let mut metadata: BTreeMap<String, String> = inst
                .get("metadata")
                .and_then(Value::as_object)
                .map(|m| {
                    m.iter()
                        .filter(|(k, _)| k.as_str() != "@class")
                        .filter_map(|(k, v)| {
                            let v = match v {
                                Value::String(s) => s.clone(),
                                Value::Number(n) => n.to_string(),
                                Value::Bool(b) => b.to_string(),
                                _ => return None,
                            };
                            Some((k.clone(), v))
                        })
                        .collect()
                })
                .unwrap_or_default();
            s.open_to_registration(&service_name(&app))
                .map_err(|m| Fail(StatusCode::FORBIDDEN, m))?;
            let rid = registry_id(&eureka_id);
            if s.registry.get(&rid).is_some() && s.own_instance(&rid, LISTENER).is_none() {
                return Err(Fail(
                    StatusCode::FORBIDDEN,
                    format!("instance {eureka_id} exists and was not registered through Eureka"),
                ));
            }
            metadata.insert(crate::SOURCE_META.into(), LISTENER.into());
            metadata.insert(META_ID.into(), eureka_id.clone());
            metadata.insert(META_APP.into(), app.to_ascii_uppercase());
            metadata.insert(META_RENEW.into(), renew_s.to_string());
            if let Some(h) = str_of("hostName") {
                metadata.insert(META_HOST.into(), h);
            }
            let ttl_ms = duration_s.saturating_mul(1000);
            let version = metadata
                .get("version")
                .filter(|v| semver::Version::parse(v).is_ok())
                .cloned();
            s.registry
                .register_external(Registration {
                    service: service_name(&app),
                    id: Some(registry_id(&eureka_id)),
                    version,
                    address: Some(address),
                    port,
                    metadata,
                    zone: None,
                    ttl_ms: Some(ttl_ms),
                    tags: Vec::new(),
                    // The instance's status as a check, kept by its renewals.
                    checks: vec![CheckRegistration {
                        id: Some(STATUS_CHECK.into()),
                        name: Some("Eureka status".into()),
                        ttl_ms,
                        status: Some(health),
                    }],
                })
                .await?;
            Ok(StatusCode::NO_CONTENT.into_response())
        })
        .await
    })
    .await
}

async fn renew(
    State(s): State<CompatState>,
    ConnectInfo(remote): ConnectInfo<SocketAddr>,
    Path((app, id)): Path<(String, String)>,
    RawQuery(q): RawQuery,
    headers: HeaderMap,
) -> Response {
    let path = format!("/eureka/apps/{app}/{id}");
    let s2 = s.clone();
    crate::detached(async move {
        write(&s, &headers, remote, Method::PUT, &path, || async move {
            let p = params(q.as_deref());
            // Not known (expired, or gantry lost it): 404 tells the client to register again.
            let (rid, inst) = own(&s2, &id)?;
            // An operator's status override outlives the instance's own renewals (as Eureka's).
            let current = inst.checks.iter().find(|c| c.id == STATUS_CHECK);
            let (health, note) = match current {
                Some(c) if c.output.starts_with(OVERRIDE) => (c.status, c.output.clone()),
                _ => (
                    status_health(param(&p, "status").unwrap_or("UP"))?,
                    "renewed".to_string(),
                ),
            };
            match s2.registry.update_check(&rid, STATUS_CHECK, health, &note) {
                Ok(_) => Ok(StatusCode::OK.into_response()),
                Err(RegistryError::NotFound(_)) => Err(Fail(
                    StatusCode::NOT_FOUND,
                    format!("instance {id} of {app} is not registered"),
                )),
                Err(e) => Err(e.into()),
            }
        })
        .await
    })
    .await
}

async fn set_status(
    State(s): State<CompatState>,
    ConnectInfo(remote): ConnectInfo<SocketAddr>,
    Path((app, id)): Path<(String, String)>,
    RawQuery(q): RawQuery,
    headers: HeaderMap,
) -> Response {
    let path = format!("/eureka/apps/{app}/{id}/status");
    let s2 = s.clone();
    crate::detached(async move {
        write(&s, &headers, remote, Method::PUT, &path, || async move {
            let p = params(q.as_deref());
            let value = param(&p, "value").ok_or_else(|| {
                Fail(
                    StatusCode::BAD_REQUEST,
                    "value: required (UP, OUT_OF_SERVICE...)".into(),
                )
            })?;
            let health = status_health(value)?;
            let (rid, _) = own(&s2, &id)?;
            let note = format!("{OVERRIDE}{value}");
            s2.registry
                .update_check(&rid, STATUS_CHECK, health, &note)?;
            Ok(StatusCode::OK.into_response())
        })
        .await
    })
    .await
}

async fn clear_status(
    State(s): State<CompatState>,
    ConnectInfo(remote): ConnectInfo<SocketAddr>,
    Path((app, id)): Path<(String, String)>,
    headers: HeaderMap,
) -> Response {
    let path = format!("/eureka/apps/{app}/{id}/status");
    let s2 = s.clone();
    crate::detached(async move {
        write(&s, &headers, remote, Method::DELETE, &path, || async move {
            let (rid, _) = own(&s2, &id)?;
            s2.registry
                .update_check(&rid, STATUS_CHECK, Health::Passing, "override removed")?;
            Ok(StatusCode::OK.into_response())
        })
        .await
    })
    .await
}

async fn cancel(
    State(s): State<CompatState>,
    ConnectInfo(remote): ConnectInfo<SocketAddr>,
    Path((app, id)): Path<(String, String)>,
    headers: HeaderMap,
) -> Response {
    let path = format!("/eureka/apps/{app}/{id}");
    let s2 = s.clone();
    crate::detached(async move {
        write(&s, &headers, remote, Method::DELETE, &path, || async move {
            let (rid, _) = own(&s2, &id)?;
            s2.registry.deregister_external(&rid).await?;
            Ok(StatusCode::OK.into_response())
        })
        .await
    })
    .await
}

// ---------------------------------------------------------------------------------------------
// Reads

fn wants_json(headers: &HeaderMap) -> bool {
    headers
        .get(http::header::ACCEPT)
        .and_then(|v| v.to_str().ok())
        .is_some_and(|a| a.contains("json"))
}

/// What an Eureka client reads about one instance.
struct View<'a> {
    i: &'a Instance,
    app: String,
    id: String,
    host: String,
    status: &'static str,
    renew: u64,
    duration: u64,
    heartbeat_ms: u64,
}

fn view(i: &Instance) -> View<'_> {
    let (duration, heartbeat_ms) = match i.source {
        gantry_model::InstanceSource::External {
            ttl_ms,
            last_heartbeat_ms,
        } => (ttl_ms / 1000, last_heartbeat_ms),
        _ => (90, i.registered_at_ms),
    };
    View {
        app: i
            .metadata
            .get(META_APP)
            .cloned()
            .unwrap_or_else(|| i.service.to_ascii_uppercase()),
        id: i
            .metadata
            .get(META_ID)
            .cloned()
            .unwrap_or_else(|| i.id.clone()),
        host: i
            .metadata
            .get(META_HOST)
            .cloned()
            .unwrap_or_else(|| i.address.to_string()),
        status: if i.health == Health::Critical {
            "DOWN"
        } else {
            "UP"
        },
        renew: i
            .metadata
            .get(META_RENEW)
            .and_then(|v| v.parse().ok())
            .unwrap_or(30),
        duration,
        heartbeat_ms,
        i,
    }
}

fn user_metadata(i: &Instance) -> impl Iterator<Item = (&String, &String)> {
    i.metadata.iter().filter(|(k, _)| !k.starts_with("eureka."))
}

fn instance_json(v: &View<'_>) -> Value {
    let i = v.i;
    let url = format!("http://{}:{}/", i.address, i.port);
    json!({
        "instanceId": v.id,
        "hostName": v.host,
        "app": v.app,
        "ipAddr": i.address.to_string(),
        "status": v.status,
        "overriddenStatus": "UNKNOWN",
        "port": {"$": i.port, "@enabled": "true"},
        "securePort": {"$": 443, "@enabled": "false"},
        "countryId": 1,
        "dataCenterInfo": {"@class": "com.netflix.appinfo.InstanceInfo$DefaultDataCenterInfo", "name": "MyOwn"},
        "leaseInfo": {
            "renewalIntervalInSecs": v.renew,
            "durationInSecs": v.duration,
            "registrationTimestamp": i.registered_at_ms,
            "lastRenewalTimestamp": v.heartbeat_ms,
            "evictionTimestamp": 0,
            "serviceUpTimestamp": i.registered_at_ms,
        },
        "metadata": user_metadata(i).collect::<BTreeMap<_, _>>(),
        "homePageUrl": url,
        "statusPageUrl": format!("{url}info"),
        "healthCheckUrl": format!("{url}health"),
        "vipAddress": i.service,
        "secureVipAddress": i.service,
        "isCoordinatingDiscoveryServer": "false",
        "lastUpdatedTimestamp": v.heartbeat_ms.to_string(),
        "lastDirtyTimestamp": i.registered_at_ms.to_string(),
        "actionType": "ADDED",
    })
}

/// XML text with its five special characters escaped.
fn esc(s: &str) -> String {
    let mut out = String::with_capacity(s.len());
    for c in s.chars() {
        match c {
            '&' => out.push_str("&amp;"),
            '<' => out.push_str("&lt;"),
            '>' => out.push_str("&gt;"),
            '"' => out.push_str("&quot;"),
            '\'' => out.push_str("&apos;"),
            // Not characters XML can carry.
            c if c.is_control() && c != '\t' && c != '\n' => {}
            '\u{FFFE}' | '\u{FFFF}' => {}
            c => out.push(c),
        }
    }
    out
}

/// Metadata keys become element names in Eureka's XML: only those that are valid names.
fn xml_name(k: &str) -> bool {
    let mut chars = k.chars();
    chars
        .next()
        .is_some_and(|c| c.is_ascii_alphabetic() || c == '_')
        && chars.all(|c| c.is_ascii_alphanumeric() || matches!(c, '_' | '-' | '.'))
        && !k.to_ascii_lowercase().starts_with("xml")
}

fn instance_xml(out: &mut String, v: &View<'_>) {
    let i = v.i;
    let url = format!("http://{}:{}/", i.address, i.port);
    let _ = write!(
        out,
        "<instance><instanceId>{}</instanceId><hostName>{}</hostName><app>{}</app><ipAddr>{}</ipAddr><status>{}</status><overriddenstatus>UNKNOWN</overriddenstatus><port enabled=\"true\">{}</port><securePort enabled=\"false\">443</securePort><countryId>1</countryId><dataCenterInfo class=\"com.netflix.appinfo.InstanceInfo$DefaultDataCenterInfo\"><name>MyOwn</name></dataCenterInfo><leaseInfo><renewalIntervalInSecs>{}</renewalIntervalInSecs><durationInSecs>{}</durationInSecs><registrationTimestamp>{}</registrationTimestamp><lastRenewalTimestamp>{}</lastRenewalTimestamp><evictionTimestamp>0</evictionTimestamp><serviceUpTimestamp>{}</serviceUpTimestamp></leaseInfo>",
        esc(&v.id),
        esc(&v.host),
        esc(&v.app),
        i.address,
        v.status,
        i.port,
        v.renew,
        v.duration,
        i.registered_at_ms,
        v.heartbeat_ms,
        i.registered_at_ms,
    );
    out.push_str("<metadata>");
    for (k, val) in user_metadata(i).filter(|(k, _)| xml_name(k)) {
        let _ = write!(out, "<{k}>{}</{k}>", esc(val));
    }
    out.push_str("</metadata>");
    let _ = write!(
        out,
        "<homePageUrl>{url}</homePageUrl><statusPageUrl>{url}info</statusPageUrl><healthCheckUrl>{url}health</healthCheckUrl><vipAddress>{svc}</vipAddress><secureVipAddress>{svc}</secureVipAddress><isCoordinatingDiscoveryServer>false</isCoordinatingDiscoveryServer><lastUpdatedTimestamp>{}</lastUpdatedTimestamp><lastDirtyTimestamp>{}</lastDirtyTimestamp><actionType>ADDED</actionType></instance>",
        v.heartbeat_ms,
        i.registered_at_ms,
        url = esc(&url),
        svc = esc(&i.service),
    );
}

fn xml(body: String) -> Response {
    (
        [(http::header::CONTENT_TYPE, "application/xml")],
        format!("<?xml version=\"1.0\" encoding=\"UTF-8\" standalone=\"yes\"?>{body}"),
    )
        .into_response()
}

/// Every service with instances, as Eureka applications.
async fn apps(State(s): State<CompatState>, headers: HeaderMap) -> Result<Response, Fail> {
    principal(&s, &headers, Permission::RegistryRead)?;
    let snap = s.registry.snapshot();
    let up: usize = snap
        .services
        .values()
        .flat_map(|l| l.iter())
        .filter(|i| i.health != Health::Critical)
        .count();
    let down: usize = snap
        .services
        .values()
        .flat_map(|l| l.iter())
        .filter(|i| i.health == Health::Critical)
        .count();
    let hash = if down > 0 {
        format!("DOWN_{down}_UP_{up}_")
    } else {
        format!("UP_{up}_")
    };
    if wants_json(&headers) {
        let apps: Vec<Value> = snap
            .services
            .values()
            .filter(|l| !l.is_empty())
            .map(|l| {
                let views: Vec<View<'_>> = l.iter().map(|i| view(i)).collect();
                json!({
                    "name": views[0].app,
                    "instance": views.iter().map(instance_json).collect::<Vec<_>>(),
                })
            })
            .collect();
        return Ok(axum::Json(json!({
            "applications": {
                "versions__delta": snap.revision.to_string(),
                "apps__hashcode": hash,
                "application": apps,
            }
        }))
        .into_response());
    }
    let mut out = format!(
        "<applications><versions__delta>{}</versions__delta><apps__hashcode>{hash}</apps__hashcode>",
        snap.revision
    );
    for l in snap.services.values().filter(|l| !l.is_empty()) {
        let views: Vec<View<'_>> = l.iter().map(|i| view(i)).collect();
        let _ = write!(out, "<application><name>{}</name>", esc(&views[0].app));
        for v in &views {
            instance_xml(&mut out, v);
        }
        out.push_str("</application>");
    }
    out.push_str("</applications>");
    Ok(xml(out))
}

async fn app(
    State(s): State<CompatState>,
    Path(app): Path<String>,
    headers: HeaderMap,
) -> Result<Response, Fail> {
    principal(&s, &headers, Permission::RegistryRead)?;
    let snap = s.registry.snapshot();
    let list = snap.instances(&service_name(&app));
    if list.is_empty() {
        return Err(Fail(
            StatusCode::NOT_FOUND,
            format!("application {app} has no instances"),
        ));
    }
    let views: Vec<View<'_>> = list.iter().map(|i| view(i)).collect();
    if wants_json(&headers) {
        return Ok(axum::Json(json!({"application": {
            "name": views[0].app,
            "instance": views.iter().map(instance_json).collect::<Vec<_>>(),
        }}))
        .into_response());
    }
    let mut out = format!("<application><name>{}</name>", esc(&views[0].app));
    for v in &views {
        instance_xml(&mut out, v);
    }
    out.push_str("</application>");
    Ok(xml(out))
}

fn one(s: &CompatState, id: &str, headers: &HeaderMap) -> Result<Response, Fail> {
    let inst = s
        .registry
        .get(&registry_id(id))
        .or_else(|| s.registry.get(id))
        .ok_or_else(|| Fail(StatusCode::NOT_FOUND, format!("instance {id} not found")))?;
    let v = view(&inst);
    if wants_json(headers) {
        return Ok(axum::Json(json!({"instance": instance_json(&v)})).into_response());
    }
    let mut out = String::new();
    instance_xml(&mut out, &v);
    Ok(xml(out))
}

async fn app_instance(
    State(s): State<CompatState>,
    Path((_app, id)): Path<(String, String)>,
    headers: HeaderMap,
) -> Result<Response, Fail> {
    principal(&s, &headers, Permission::RegistryRead)?;
    one(&s, &id, &headers)
}

async fn instance_by_id(
    State(s): State<CompatState>,
    Path(id): Path<String>,
    headers: HeaderMap,
) -> Result<Response, Fail> {
    principal(&s, &headers, Permission::RegistryRead)?;
    one(&s, &id, &headers)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ids_names_and_escapes() {
        assert_eq!(registry_id("127.0.0.1:PAY:9000"), "127-0-0-1-pay-9000");
        assert_eq!(esc("a<b>&\"'"), "a&lt;b&gt;&amp;&quot;&apos;");
        assert!(xml_name("zone") && xml_name("management.port"));
        assert!(!xml_name("1a") && !xml_name("a b") && !xml_name("xmlns") && !xml_name(""));
        assert_eq!(
            port_of(Some(&json!({"$": 8080, "@enabled": "true"}))),
            Some(8080)
        );
        assert_eq!(port_of(Some(&json!("9000"))), Some(9000));
        assert_eq!(port_of(Some(&json!(0))), None);
    }
}
