//! Client commands: each calls the admin API and prints a table (or JSON with `--json`).

use std::io::Write;
use std::path::Path;
use std::process::ExitCode;

use http_body_util::BodyExt;
use hyper::Method;
use serde_json::{json, Value};

use std::net::SocketAddr;

use gantry_api::audit::AuditRecord;
use gantry_api::config::RollbackBody;
use gantry_api::services::ScaleBody;
use gantry_api::{ReloadReport, RouteWritten};
use gantry_config::{
    ChangeKind, ChangeRequest, ChangeView, Committed, ConfigView, ResolvedView, VersionView,
};
use gantry_gateway::RouteView;
use gantry_model::{Instance, InstanceSource, PathMatch, RouteAction};
use gantry_supervisor::{InstanceState, InstanceStatus, RestartReport, ServiceStatus};
use gantry_telemetry::LogLine;

use crate::client::{enc, CliError, Client, Target};
use crate::table;
use crate::{Cmd, ConfigCmd, Output, RegistryCmd, RouteCmd, EXIT_USAGE};

pub fn validate(file: &Path) -> ExitCode {
    match gantry_spec::load(file) {
        Ok(s) => {
            let n = s.spec.services.len();
            let r = s.spec.routes().len();
            println!("{}: ok ({n} services, {r} routes)", file.display());
            ExitCode::SUCCESS
        }
        Err(e) => {
            eprintln!("{e}");
            ExitCode::from(EXIT_USAGE)
        }
    }
}

pub async fn run_client(cmd: Cmd, target: Target) -> ExitCode {
    let res = async {
        let explicit = target.token.is_some();
        let mut c = Client::connect(target)?;
        match &cmd {
            Cmd::Login { username } => {
                let id = c.identity_url().ok_or_else(|| {
                    CliError::usage(
                        "gantry login finds the token service through the spec: pass -f FILE",
                    )
                })?;
                return crate::identity_cmd::login(c.base(), &id, username).await;
            }
            Cmd::Logout => return crate::identity_cmd::logout(c.base()),
            _ => {}
        }
        // A user who logged in acts with their own roles, not the admin token.
        if !explicit {
            if let Some(t) = crate::identity_cmd::current_token(c.base()).await {
                c.set_token(t);
            }
        }
        dispatch(cmd, &c).await
    }
    .await;
    match res {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("error: {}", e.message);
            ExitCode::from(e.code)
        }
    }
}

pub(crate) fn print_json(v: &Value) {
    println!("{}", serde_json::to_string_pretty(v).unwrap_or_default());
}

async fn dispatch(cmd: Cmd, c: &Client) -> Result<(), CliError> {
    match cmd {
        Cmd::Up(_) | Cmd::Validate => Ok(()),
        Cmd::Ps { service, out } => ps(c, service, out).await,
        Cmd::Services { out } => services(c, out).await,
        Cmd::Query {
            expr,
            range,
            step,
            json,
        } => query_history(c, &expr, range, step, json).await,
        Cmd::Top {
            interval,
            once,
            json,
        } => {
            if !(interval.is_finite() && (0.2..=3600.0).contains(&interval)) {
                return Err(CliError::usage(format!(
                    "--interval {interval}: expected 0.2 to 3600 seconds"
                )));
            }
            crate::top::top(c, std::time::Duration::from_secs_f64(interval), once, json).await
        }
        Cmd::Logs {
            service,
            follow,
            instance,
            since,
            until,
            grep,
            level,
            fields,
            request_id,
            trace_id,
            tail,
            limit,
            json,
        } => {
            let mut q: Vec<(&str, String)> = Vec::new();
            for (k, v) in [
                ("service", service),
                ("instance", instance),
                ("since", since),
                ("until", until),
                ("grep", grep),
                ("level", level),
                ("request_id", request_id),
                ("trace_id", trace_id),
                ("tail", tail.map(|t| t.to_string())),
                ("limit", limit.map(|t| t.to_string())),
            ] {
                if let Some(v) = v {
                    q.push((k, v));
                }
            }
            for f in fields {
                if !f.contains('=') {
                    return Err(CliError::usage(format!(
                        "--field {f:?}: expected KEY=VALUE"
                    )));
                }
                q.push(("field", f));
            }
            if follow {
                q.push(("follow", "true".into()));
            }
            logs(c, &q, json).await
        }
        Cmd::Scale { service, replicas } => {
            let body = ScaleBody {
                replicas,
                version: None,
            };
            let _: Value = c
                .send(
                    Method::POST,
                    &format!("/v1/services/{}/scale", enc(&service)),
                    Some(&body),
                )
                .await?;
            println!("{service} scaled to {replicas} instances");
            Ok(())
        }
        Cmd::Restart { service } => restart(c, &service).await,
        Cmd::Routes { out } => routes(c, out).await,
        Cmd::Audit {
            limit,
            principal,
            out,
        } => audit(c, limit, principal, out).await,
        Cmd::Reload => {
            let r: ReloadReport = c.send(Method::POST, "/v1/reload", None::<&Value>).await?;
            println!("spec reloaded: {} routes", r.routes);
            for (what, verb, names) in [
                ("added", "started", &r.services.added),
                (
                    "changed",
                    "being replaced, one instance at a time",
                    &r.services.changed,
                ),
                ("removed", "draining and stopping", &r.services.removed),
            ] {
                if !names.is_empty() {
                    println!("services {what} ({verb}): {}", names.join(", "));
                }
            }
            for n in &r.needs_restart {
                println!("not applied until gantry restarts: {n}");
            }
            Ok(())
        }
        Cmd::Registry(RegistryCmd::Ls {
            service,
            version,
            tags,
            health,
            near,
            out,
        }) => {
            let filters = RegistryFilters {
                version,
                tags,
                health,
                near,
            };
            registry_ls(c, service, filters, out).await
        }
        Cmd::Config(cc) => config(c, cc).await,
        Cmd::Bus(bc) => crate::bus_cmd::run(c, bc).await,
        Cmd::Identity(ic) => crate::identity_cmd::run(c, ic).await,
        Cmd::Login { .. } | Cmd::Logout => Ok(()),
        Cmd::Route(RouteCmd::Put {
            name,
            service,
            path_prefix,
            host,
            strip_prefix,
            json,
        }) => {
            let mut route: serde_json::Map<String, Value> = match json {
                Some(j) => serde_json::from_str(&j)
                    .map_err(|e| CliError::usage(format!("--json: not a JSON object: {e}")))?,
                None => serde_json::Map::new(),
            };
            if let Some(p) = path_prefix {
                route.insert("path_prefix".into(), json!(p));
            }
            if let Some(h) = host {
                route.insert("host".into(), json!(h));
            }
            if strip_prefix {
                route.insert("strip_prefix".into(), json!(true));
            }
            let w: RouteWritten = c
                .send(
                    Method::PUT,
                    &format!("/v1/routes/{}", enc(&name)),
                    Some(&json!({ "service": service, "route": route })),
                )
                .await?;
            println!("route {} is live ({} routes)", w.id, w.routes);
            Ok(())
        }
        Cmd::Route(RouteCmd::Rm { name }) => {
            c.call(Method::DELETE, &format!("/v1/routes/{}", enc(&name)), None)
                .await?;
            println!("route api/{name} removed");
            Ok(())
        }
    }
}

/// GET a list, then print it as JSON (`--json`) or as a table of `row(item)`: the API's own
/// response types, so the CLI reads what the API documents, not untyped JSON.
pub(crate) async fn list<T: serde::de::DeserializeOwned + serde::Serialize>(
    c: &Client,
    path: &str,
    out: Output,
    headers: &[&str],
    row: impl Fn(&T) -> Vec<String>,
) -> Result<(), CliError> {
    let items: Vec<T> = serde_json::from_value(c.get(path).await?).map_err(|e| {
        CliError::new(format!(
            "unexpected answer from GET {path}: {e} (is gantry the same version as this CLI?)"
        ))
    })?;
    if out.json {
        print_json(&serde_json::to_value(&items).unwrap_or_default());
        return Ok(());
    }
    let rows: Vec<Vec<String>> = items.iter().map(row).collect();
    table::print(headers, &rows);
    Ok(())
}

fn or_dash<T: ToString>(v: Option<T>) -> String {
    v.map_or_else(|| "-".into(), |v| v.to_string())
}

async fn ps(c: &Client, service: Option<String>, out: Output) -> Result<(), CliError> {
    let path = match &service {
        Some(s) => format!("/v1/instances?service={}", enc(s)),
        None => "/v1/instances".into(),
    };
    let now = gantry_model::unix_ms();
    let headers = [
        "SERVICE", "INSTANCE", "VERSION", "PID", "PORT", "STATE", "UPTIME", "RESTARTS",
    ];
    list(c, &path, out, &headers, |i: &InstanceStatus| {
        let uptime = match (i.started_ms, i.pid) {
            (Some(t), Some(_)) => table::short_duration(now.saturating_sub(t)),
            _ => "-".into(),
        };
        let mut state = i.state.as_str().to_string();
        if let Some(r) = &i.reason {
            if !matches!(i.state, InstanceState::Healthy | InstanceState::Starting) {
                state = format!("{state} ({r})");
            }
        }
        vec![
            i.service.clone(),
            i.id.clone(),
            i.version.clone(),
            or_dash(i.pid),
            or_dash(i.port),
            state,
            uptime,
            i.restarts.to_string(),
        ]
    })
    .await
}

async fn services(c: &Client, out: Output) -> Result<(), CliError> {
    let headers = [
        "SERVICE",
        "VERSION",
        "HEALTHY",
        "DEPENDS ON",
        "ON CONFIG CHANGE",
    ];
    list(c, "/v1/services", out, &headers, |x: &ServiceStatus| {
        vec![
            x.name.clone(),
            x.version.clone(),
            format!("{}/{}", x.healthy, x.desired),
            if x.depends_on.is_empty() {
                "-".into()
            } else {
                x.depends_on.join(",")
            },
            match x.on_config_change {
                gantry_model::OnConfigChange::None => "none",
                gantry_model::OnConfigChange::Restart => "restart",
                gantry_model::OnConfigChange::Signal => "signal",
            }
            .to_string(),
        ]
    })
    .await
}

async fn logs(c: &Client, q: &[(&str, String)], json: bool) -> Result<(), CliError> {
    let path = if q.is_empty() {
        "/v1/logs".to_string()
    } else {
        let q: Vec<String> = q.iter().map(|(k, v)| format!("{k}={}", enc(v))).collect();
        format!("/v1/logs?{}", q.join("&"))
    };
    let mut body = c.stream(&path).await?;
    let mut buf: Vec<u8> = Vec::new();
    let stdout = std::io::stdout();
    while let Some(frame) = body.frame().await {
        let frame = frame.map_err(|e| CliError::new(format!("log stream ended: {e}")))?;
        let Ok(data) = frame.into_data() else {
            continue;
        };
        buf.extend_from_slice(&data);
        while let Some(i) = buf.iter().position(|&b| b == b'\n') {
            let line: Vec<u8> = buf.drain(..=i).collect();
            let mut out = stdout.lock();
            if json {
                let _ = out.write_all(&line);
            } else if let Ok(l) = serde_json::from_slice::<LogLine>(&line) {
                let _ = writeln!(out, "{} {} | {}", table::clock(l.ts_ms), l.instance, l.line);
            } else if serde_json::from_slice::<Value>(&line)
                .ok()
                .is_some_and(|v| v.get("truncated").is_some())
            {
                let _ = writeln!(
                    out,
                    "... more lines matched than --limit shows: narrow the query or raise --limit"
                );
            } else if let Some(n) = serde_json::from_slice::<Value>(&line)
                .ok()
                .and_then(|v| v.get("lagged").cloned())
            {
                let _ = writeln!(out, "... {n} lines skipped (reader too slow)");
            }
            if out.flush().is_err() {
                // stdout closed (e.g. piped into head): stop quietly.
                return Ok(());
            }
        }
    }
    Ok(())
}

async fn restart(c: &Client, service: &str) -> Result<(), CliError> {
    eprintln!("rolling restart of {service} (each new instance must become healthy first)...");
    let report: RestartReport = c
        .send(
            Method::POST,
            &format!("/v1/services/{}/restart", enc(service)),
            None::<&Value>,
        )
        .await?;
    for r in &report.replaced {
        println!("{} -> {}", r.old, r.new);
    }
    println!("{service} restarted");
    Ok(())
}

async fn routes(c: &Client, out: Output) -> Result<(), CliError> {
    let headers = ["ROUTE", "HOSTS", "MATCH", "REWRITE", "TARGET", "ENDPOINTS"];
    list(c, "/v1/routes", out, &headers, |r: &RouteView| {
        let eps = r
            .endpoints
            .iter()
            .map(|x| {
                let mut s = format!("{}@{}", x.instance, x.address);
                if x.ejected {
                    s.push_str("(ejected)");
                } else if !x.healthy {
                    s.push_str("(failing)");
                }
                s
            })
            .collect::<Vec<_>>()
            .join(" ");
        let m = &r.route.matcher;
        let hosts = if m.hosts.is_empty() {
            "*".to_string()
        } else {
            m.hosts.join(",")
        };
        let mut matcher = match &m.path {
            PathMatch::Prefix(p) => format!("prefix {p}"),
            PathMatch::Exact(p) => format!("exact {p}"),
            PathMatch::Regex(p) => format!("regex {p}"),
        };
        if !m.methods.is_empty() {
            matcher = format!("{} {matcher}", m.methods.join(","));
        }
        let extra = m.headers.len() + m.query.len();
        if extra > 0 {
            matcher.push_str(&format!(" +{extra} conditions"));
        }
        let (rewrite, action) = match &r.route.action {
            RouteAction::Redirect(rd) => ("-".to_string(), format!("redirect {}", rd.status)),
            RouteAction::Forward(f) => {
                let rw = &f.rewrite;
                let rewrite = if let Some(to) = &rw.replace_prefix {
                    format!("prefix -> {to}")
                } else if rw.strip_prefix {
                    "strip prefix".to_string()
                } else if let Some((re, to)) = &rw.regex {
                    format!("{re} -> {to}")
                } else {
                    "-".to_string()
                };
                let target = f
                    .backends
                    .iter()
                    .map(|b| match &b.version {
                        Some(v) => format!("{}@{v}", b.service),
                        None => b.service.clone(),
                    })
                    .collect::<Vec<_>>()
                    .join(" | ");
                (rewrite, target)
            }
        };
        vec![
            r.route.id.clone(),
            hosts,
            matcher,
            rewrite,
            action,
            if eps.is_empty() { "-".into() } else { eps },
        ]
    })
    .await
}

pub(crate) struct RegistryFilters {
    version: Option<String>,
    tags: Vec<String>,
    health: Option<String>,
    near: Option<String>,
}

async fn registry_ls(
    c: &Client,
    service: Option<String>,
    f: RegistryFilters,
    out: Output,
) -> Result<(), CliError> {
    let path = match &service {
        Some(svc) => {
            let mut q = vec![format!(
                "health={}",
                enc(f.health.as_deref().unwrap_or("any"))
            )];
            if let Some(v) = &f.version {
                q.push(format!("version={}", enc(v)));
            }
            if !f.tags.is_empty() {
                q.push(format!("tags={}", enc(&f.tags.join(","))));
            }
            if let Some(n) = &f.near {
                q.push(format!("near={}", enc(n)));
            }
            format!("/v1/registry/services/{}?{}", enc(svc), q.join("&"))
        }
        None if f.version.is_some()
            || !f.tags.is_empty()
            || f.health.is_some()
            || f.near.is_some() =>
        {
            return Err(CliError::usage(
                "--version, --tag, --health and --near need a service",
            ))
        }
        None => "/v1/registry/instances".into(),
    };
    let headers = [
        "SERVICE", "INSTANCE", "VERSION", "ADDRESS", "HEALTH", "CHECKS", "TAGS", "SOURCE", "NODE",
    ];
    list(c, &path, out, &headers, |i: &Instance| {
        vec![
            i.service.clone(),
            i.id.clone(),
            i.version.to_string(),
            SocketAddr::new(i.address, i.port).to_string(),
            i.health.as_str().to_string(),
            if i.checks.is_empty() {
                "-".into()
            } else {
                i.checks
                    .iter()
                    .map(|c| format!("{}:{}", c.id, c.status.as_str()))
                    .collect::<Vec<_>>()
                    .join(",")
            },
            if i.tags.is_empty() {
                "-".into()
            } else {
                i.tags.join(",")
            },
            match i.source {
                InstanceSource::Supervised => "supervised",
                InstanceSource::Static => "static",
                InstanceSource::External { .. } => "external",
            }
            .to_string(),
            i.node.clone(),
        ]
    })
    .await
}

async fn audit(
    c: &Client,
    limit: usize,
    principal: Option<String>,
    out: Output,
) -> Result<(), CliError> {
    let mut path = format!("/v1/audit?limit={limit}");
    if let Some(p) = &principal {
        path.push_str(&format!("&principal={}", enc(p)));
    }
    let headers = [
        "TIME",
        "PRINCIPAL",
        "CALL",
        "ACTION",
        "STATUS",
        "OUTCOME",
        "FROM",
        "REQUEST",
    ];
    list(c, &path, out, &headers, |r: &AuditRecord| {
        vec![
            table::clock(r.time_ms),
            or_dash(r.principal.as_deref()),
            format!("{} {}", r.method, r.path),
            r.action.clone(),
            r.status.to_string(),
            r.outcome.clone(),
            or_dash(r.remote.as_deref()),
            r.request_id.clone(),
        ]
    })
    .await
}

async fn config(c: &Client, cmd: ConfigCmd) -> Result<(), CliError> {
    match cmd {
        ConfigCmd::Set {
            service,
            pairs,
            secrets,
            layer,
            message,
            restart: and_restart,
            no_wait,
        } => {
            let mut body = ChangeRequest {
                env: layer.env,
                instance: layer.instance,
                message,
                ..Default::default()
            };
            // The old form: `set SERVICE KEY VALUE`.
            let pairs = if pairs.len() == 2 && !pairs[0].contains('=') {
                vec![format!("{}={}", pairs[0], pairs[1])]
            } else {
                pairs
            };
            for p in &pairs {
                let (k, v) = parse_pair(p)?;
                body.set.insert(k, v);
            }
            let mut stdin_lines = None;
            for sec in &secrets {
                let (k, v) = match sec.split_once('=') {
                    Some((k, v)) => (k.to_string(), v.to_string()),
                    None => {
                        let lines = stdin_lines
                            .get_or_insert_with(|| std::io::stdin().lines().map_while(Result::ok));
                        let v = lines.next().ok_or_else(|| {
                            CliError::usage(format!(
                                "--secret {sec}: no value on stdin (give one line per secret, or KEY=VALUE)"
                            ))
                        })?;
                        (sec.clone(), v)
                    }
                };
                body.secrets.insert(k, Value::String(v));
            }
            if body.set.is_empty() && body.secrets.is_empty() {
                return Err(CliError::usage(
                    "give KEY=VALUE pairs or --secret KEY to set",
                ));
            }
            commit(c, &service, body, and_restart, no_wait).await
        }
        ConfigCmd::Unset {
            service,
            keys,
            layer,
            message,
            restart: and_restart,
            no_wait,
        } => {
            let body = ChangeRequest {
                unset: keys,
                env: layer.env,
                instance: layer.instance,
                message,
                ..Default::default()
            };
            commit(c, &service, body, and_restart, no_wait).await
        }
        ConfigCmd::Rollback {
            service,
            version,
            message,
            restart: and_restart,
            no_wait,
        } => {
            let done: Committed = c
                .send(
                    Method::POST,
                    &format!("/v1/config/{}/rollback", enc(&service)),
                    Some(&RollbackBody { version, message }),
                )
                .await?;
            println!(
                "{service}: config version {} restores version {version}",
                done.version.version
            );
            after_commit(c, &service, done.version.version, and_restart, no_wait).await
        }
        ConfigCmd::Get {
            service,
            key,
            layer,
            reveal,
            out,
        } => {
            let mut q = Vec::new();
            if let Some(e) = &layer.env {
                q.push(format!("env={}", enc(e)));
            }
            if let Some(i) = &layer.instance {
                q.push(format!("instance={}", enc(i)));
            }
            if reveal {
                q.push("reveal=true".into());
            }
            let v: ResolvedView = c
                .send(
                    Method::GET,
                    &format!("/v1/config/{}/resolved?{}", enc(&service), q.join("&")),
                    None::<&Value>,
                )
                .await?;
            match key {
                Some(k) => match v.values.get(&k) {
                    Some(val) if out.json => {
                        print_json(&json!({ "key": k, "value": val, "version": v.version, "secret": v.secrets.contains(&k) }))
                    }
                    Some(val) => println!("{}", gantry_config::model::env_text(val)),
                    None if v.secrets.contains(&k) => {
                        return Err(CliError {
                            message: format!("{k} is a secret: add --reveal to show it (needs config:reveal; the read is audited)"),
                            code: crate::EXIT_FAILURE,
                        })
                    }
                    None => {
                        return Err(CliError {
                            message: format!("{service} has no config key {k}"),
                            code: crate::EXIT_FAILURE,
                        })
                    }
                },
                None if out.json => print_json(&json!(v)),
                None => {
                    println!(
                        "# {} config version {} (global {})",
                        v.service, v.version, v.global_version
                    );
                    for (k, val) in &v.values {
                        println!("{k}={}", gantry_config::model::env_text(val));
                    }
                    for k in v.secrets.iter().filter(|k| !v.values.contains_key(*k)) {
                        println!("{k}=<secret, redacted>");
                    }
                }
            }
            Ok(())
        }
        ConfigCmd::List {
            service,
            reveal,
            out,
        } => match service {
            Some(svc) => {
                let v: ConfigView = c
                    .send(
                        Method::GET,
                        &format!(
                            "/v1/config/{}{}",
                            enc(&svc),
                            if reveal { "?reveal=true" } else { "" }
                        ),
                        None::<&Value>,
                    )
                    .await?;
                if out.json {
                    print_json(&json!(v));
                } else {
                    print_view(&v);
                }
                Ok(())
            }
            None => {
                let sets: Vec<String> = c.send(Method::GET, "/v1/config", None::<&Value>).await?;
                if out.json {
                    print_json(&json!(sets));
                } else {
                    for set in sets {
                        println!("{set}");
                    }
                }
                Ok(())
            }
        },
        ConfigCmd::History {
            service,
            reveal,
            out,
        } => {
            let path = format!(
                "/v1/config/{}/history{}",
                enc(&service),
                if reveal { "?reveal=true" } else { "" }
            );
            let headers = ["VERSION", "TIME", "AUTHOR", "CHANGES", "MESSAGE"];
            list(c, &path, out, &headers, |h: &VersionView| {
                let changes = h
                    .changes
                    .iter()
                    .map(|x| format!("{}{}", sign(x.kind), layered_key(x)))
                    .collect::<Vec<_>>()
                    .join(" ");
                vec![
                    h.version.to_string(),
                    rfc3339(h.time_ms),
                    or_dash(Some(h.author.clone()).filter(|a| !a.is_empty())),
                    changes,
                    h.message.clone(),
                ]
            })
            .await
        }
        ConfigCmd::Diff {
            service,
            from,
            to,
            reveal,
            out,
        } => {
            let mut path = format!("/v1/config/{}/diff?from={from}", enc(&service));
            if let Some(t) = to {
                path.push_str(&format!("&to={t}"));
            }
            if reveal {
                path.push_str("&reveal=true");
            }
            let changes: Vec<ChangeView> = c.send(Method::GET, &path, None::<&Value>).await?;
            if out.json {
                print_json(&json!(changes));
                return Ok(());
            }
            for x in &changes {
                let show = |v: &Option<Value>, absent: bool| match v {
                    _ if absent => "(absent)".to_string(),
                    Some(v) => gantry_config::model::env_text(v),
                    None => "<secret>".into(),
                };
                println!(
                    "{}{}: {} -> {}",
                    sign(x.kind),
                    layered_key(x),
                    show(&x.before, x.kind == ChangeKind::Added),
                    show(&x.after, x.kind == ChangeKind::Removed)
                );
            }
            Ok(())
        }
        ConfigCmd::Export {
            service,
            format,
            version,
            layer,
            reveal,
        } => {
            let mut path = format!(
                "/v1/config/{}/export?format={}",
                enc(&service),
                enc(&format)
            );
            if let Some(v) = version {
                path.push_str(&format!("&version={v}"));
            }
            if let Some(e) = &layer.env {
                path.push_str(&format!("&env={}", enc(e)));
            }
            if let Some(i) = &layer.instance {
                path.push_str(&format!("&instance={}", enc(i)));
            }
            if reveal {
                path.push_str("&reveal=true");
            }
            print!("{}", c.get_text(&path).await?);
            Ok(())
        }
        ConfigCmd::Import {
            service,
            path: file,
            format,
            replace,
            layer,
            secrets,
            message,
        } => {
            let format = match format {
                Some(f) => f,
                None => match file.extension().and_then(|e| e.to_str()) {
                    Some("json") => "json".into(),
                    Some("toml") => "toml".into(),
                    Some("env") => "env".into(),
                    _ if file.file_name().is_some_and(|n| n == ".env") => "env".into(),
                    _ => {
                        return Err(CliError::usage(format!(
                        "{}: cannot tell the format from the name; pass --format json, toml or env",
                        file.display()
                    )))
                    }
                },
            };
            let body = if file.as_os_str() == "-" {
                let mut b = Vec::new();
                std::io::Read::read_to_end(&mut std::io::stdin(), &mut b)
                    .map_err(|e| CliError::new(format!("reading stdin: {e}")))?;
                b
            } else {
                std::fs::read(&file)
                    .map_err(|e| CliError::usage(format!("cannot read {}: {e}", file.display())))?
            };
            let mut path = format!(
                "/v1/config/{}/import?format={}&replace={replace}",
                enc(&service),
                enc(&format)
            );
            if let Some(e) = &layer.env {
                path.push_str(&format!("&env={}", enc(e)));
            }
            if let Some(i) = &layer.instance {
                path.push_str(&format!("&instance={}", enc(i)));
            }
            if !secrets.is_empty() {
                path.push_str(&format!("&secrets={}", enc(&secrets.join(","))));
            }
            if let Some(m) = &message {
                path.push_str(&format!("&message={}", enc(m)));
            }
            let done: Committed = c.send_text(Method::POST, &path, "text/plain", body).await?;
            if done.created {
                println!(
                    "{service}: config version {} committed ({} keys changed)",
                    done.version.version,
                    done.version.changes.len()
                );
            } else {
                println!(
                    "{service}: no change (config version {} already has these values)",
                    done.version.version
                );
            }
            Ok(())
        }
    }
}

/// `KEY=VALUE` (a string) or `KEY:=JSON` (typed).
fn parse_pair(p: &str) -> Result<(String, Value), CliError> {
    if let Some((k, v)) = p.split_once(":=") {
        if !k.contains('=') {
            let v: Value = serde_json::from_str(v).map_err(|e| {
                CliError::usage(format!(
                    "{k}:= expects JSON (a number, true, an object...): {e}"
                ))
            })?;
            return Ok((k.to_string(), v));
        }
    }
    match p.split_once('=') {
        Some((k, v)) if !k.is_empty() => Ok((k.to_string(), Value::String(v.to_string()))),
        _ => Err(CliError::usage(format!(
            "{p:?}: expected KEY=VALUE or KEY:=JSON"
        ))),
    }
}

fn sign(k: ChangeKind) -> &'static str {
    match k {
        ChangeKind::Added => "+",
        ChangeKind::Changed => "~",
        ChangeKind::Removed => "-",
    }
}

fn layered_key(x: &ChangeView) -> String {
    match (&x.env, &x.instance) {
        (Some(e), _) => format!("{}@{e}", x.key),
        (_, Some(i)) => format!("{}#{i}", x.key),
        _ => x.key.clone(),
    }
}

fn rfc3339(ms: u64) -> String {
    humantime::format_rfc3339_seconds(std::time::UNIX_EPOCH + std::time::Duration::from_millis(ms))
        .to_string()
}

fn print_view(v: &ConfigView) {
    println!("# {} config version {}", v.set, v.version);
    let print_layer = |title: Option<String>, l: &gantry_config::LayerDoc| {
        if let Some(t) = title {
            println!("[{t}]");
        }
        for (k, val) in l.values.iter().chain(&l.secrets) {
            println!("{k}={}", gantry_config::model::env_text(val));
        }
        for k in &l.redacted {
            println!("{k}=<secret, redacted>");
        }
    };
    let d = &v.document;
    print_layer(
        None,
        &gantry_config::LayerDoc {
            values: d.values.clone(),
            secrets: d.secrets.clone(),
            redacted: d.redacted.clone(),
        },
    );
    for (e, l) in &d.env {
        print_layer(Some(format!("env {e}")), l);
    }
    for (i, l) in &d.instance {
        print_layer(Some(format!("instance {i}")), l);
    }
}

async fn commit(
    c: &Client,
    service: &str,
    body: ChangeRequest,
    and_restart: bool,
    no_wait: bool,
) -> Result<(), CliError> {
    let done: Committed = c
        .send(
            Method::PATCH,
            &format!("/v1/config/{}", enc(service)),
            Some(&body),
        )
        .await?;
    let version = done.version.version;
    if done.created {
        println!("{service}: config version {version} committed");
    } else {
        println!("{service}: no change (config version {version} already has these values)");
        return Ok(());
    }
    after_commit(c, service, version, and_restart, no_wait).await
}

/// What happens to running instances after a commit; for a service that restarts on config
/// changes, wait for the rollout's outcome (done, or reverted).
async fn after_commit(
    c: &Client,
    service: &str,
    version: u64,
    and_restart: bool,
    no_wait: bool,
) -> Result<(), CliError> {
    let svcs: Vec<ServiceStatus> = c.send(Method::GET, "/v1/services", None::<&Value>).await?;
    let policy = svcs
        .iter()
        .find(|x| x.name == service)
        .map(|x| x.on_config_change);
    use gantry_model::OnConfigChange;
    match policy {
        Some(OnConfigChange::Restart) if no_wait => {
            println!("{service} restarts automatically (on_config_change = \"restart\")")
        }
        Some(OnConfigChange::Restart) => {
            println!("{service} restarts automatically (on_config_change = \"restart\"); waiting for the rollout");
            return wait_rollout(c, service, version).await;
        }
        Some(OnConfigChange::Signal) => println!(
            "{service}: running instances' config files rewritten and signalled (on_config_change = \"signal\")"
        ),
        Some(OnConfigChange::None) if and_restart => restart(c, service).await?,
        Some(OnConfigChange::None) => println!(
            "running instances keep their environment (their config file is rewritten); apply with: gantry restart {service} (or pass --restart)"
        ),
        None => {}
    }
    Ok(())
}

/// Until every instance of `service` runs config `version` (or later), or a later version
/// reverts it.
async fn wait_rollout(c: &Client, service: &str, version: u64) -> Result<(), CliError> {
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(300);
    loop {
        let history: Vec<VersionView> = c
            .send(
                Method::GET,
                &format!("/v1/config/{}/history?limit=20", enc(service)),
                None::<&Value>,
            )
            .await?;
        if let Some(r) = history.iter().find(|h| h.reverts == Some(version)) {
            return Err(CliError {
                message: format!(
                    "{service}: the rollout of config version {version} failed and was reverted by version {}: {}",
                    r.version, r.message
                ),
                code: crate::EXIT_FAILURE,
            });
        }
        let instances: Vec<InstanceStatus> = c
            .send(
                Method::GET,
                &format!("/v1/instances?service={}", enc(service)),
                None::<&Value>,
            )
            .await?;
        let running: Vec<&InstanceStatus> = instances
            .iter()
            .filter(|i| i.state == InstanceState::Healthy)
            .collect();
        if !running.is_empty() && running.iter().all(|i| i.config_version >= version) {
            println!(
                "{service}: rollout done, {} instance(s) run config version {version}",
                running.len()
            );
            return Ok(());
        }
        if std::time::Instant::now() > deadline {
            return Err(CliError::new(format!(
                "{service}: the rollout of config version {version} is still running after 5 minutes (see gantry ps)"
            )));
        }
        tokio::time::sleep(std::time::Duration::from_millis(200)).await;
    }
}

/// `gantry query`: the metrics history, now or over a range.
async fn query_history(
    c: &Client,
    expr: &str,
    range: Option<String>,
    step: Option<String>,
    json: bool,
) -> Result<(), CliError> {
    let path = match &range {
        None => format!("/v1/metrics/query?query={}", enc(expr)),
        Some(r) => {
            let d = humantime::parse_duration(r)
                .map_err(|e| CliError::usage(format!("--range {r:?}: {e} (e.g. 1h, 30m)")))?;
            let mut p = format!(
                "/v1/metrics/query_range?query={}&start={}",
                enc(expr),
                gantry_model::unix_ms().saturating_sub(d.as_millis() as u64)
            );
            if let Some(s) = &step {
                p.push_str(&format!("&step={}", enc(s)));
            }
            p
        }
    };
    let v = c.get(&path).await?;
    if json {
        println!("{v}");
        return Ok(());
    }
    let data = &v["data"];
    let labels = |m: &Value| -> String {
        let Some(o) = m.as_object() else {
            return String::new();
        };
        let name = o.get("__name__").and_then(Value::as_str).unwrap_or("");
        let rest: Vec<String> = o
            .iter()
            .filter(|(k, _)| *k != "__name__")
            .map(|(k, v)| format!("{k}={}", v.as_str().unwrap_or("")))
            .collect();
        if rest.is_empty() {
            name.to_string()
        } else {
            format!("{name}{{{}}}", rest.join(","))
        }
    };
    let num = |x: &Value| x.as_str().and_then(|s| s.parse::<f64>().ok());
    let fmt = |x: Option<f64>| x.map_or_else(|| "-".into(), |x| format!("{x:.4}"));
    match data["resultType"].as_str() {
        Some("scalar") => println!("{}", fmt(num(&data["result"][1]))),
        Some("vector") => {
            let rows: Vec<Vec<String>> = data["result"]
                .as_array()
                .into_iter()
                .flatten()
                .map(|r| vec![labels(&r["metric"]), fmt(num(&r["value"][1]))])
                .collect();
            table::print(&["SERIES", "VALUE"], &rows);
        }
        _ => {
            let rows: Vec<Vec<String>> = data["result"]
                .as_array()
                .into_iter()
                .flatten()
                .map(|r| {
                    let xs: Vec<f64> = r["values"]
                        .as_array()
                        .into_iter()
                        .flatten()
                        .filter_map(|p| num(&p[1]))
                        .collect();
                    vec![
                        labels(&r["metric"]),
                        fmt(xs.last().copied()),
                        fmt(xs.iter().copied().reduce(f64::min)),
                        fmt(xs.iter().copied().reduce(f64::max)),
                        xs.len().to_string(),
                    ]
                })
                .collect();
            table::print(&["SERIES", "LAST", "MIN", "MAX", "POINTS"], &rows);
        }
    }
    Ok(())
}
