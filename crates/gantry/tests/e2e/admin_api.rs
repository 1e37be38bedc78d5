//! The admin API: a permission for every endpoint, 401/403 as JSON, the audit trail, and the
//! gateway's defences on its listener.

use std::io::{Read, Write};
use std::net::TcpStream;
use std::time::{Duration, Instant};

use serde_json::{json, Value};

use crate::common::*;

const WEB: &str = r#"
[services.web]
command = ["{TESTSVC}"]
[[services.web.routes]]
path_prefix = "/web"
"#;

/// Every endpoint, with a path that reaches it.
const ENDPOINTS: &[(&str, &str)] = &[
    ("GET", "/v1/health"),
    ("GET", "/metrics"),
    ("GET", "/v1/services"),
    ("GET", "/v1/instances"),
    ("GET", "/v1/upstreams"),
    ("POST", "/v1/services/web/scale"),
    ("POST", "/v1/services/web/restart"),
    ("GET", "/v1/deployments"),
    ("GET", "/v1/deployments/web"),
    ("PUT", "/v1/deployments/web/versions/9.0.0"),
    ("DELETE", "/v1/deployments/web/versions/9.0.0"),
    ("GET", "/v1/routes"),
    ("PUT", "/v1/routes/x"),
    ("DELETE", "/v1/routes/x"),
    ("GET", "/v1/traffic"),
    ("GET", "/v1/registry/services"),
    ("GET", "/v1/registry/services/web"),
    ("GET", "/v1/registry/instances"),
    ("POST", "/v1/registry/instances"),
    ("GET", "/v1/registry/instances/x"),
    ("DELETE", "/v1/registry/instances/x"),
    ("PUT", "/v1/registry/instances/x/heartbeat"),
    ("GET", "/v1/config"),
    ("GET", "/v1/config/web"),
    ("PATCH", "/v1/config/web"),
    ("GET", "/v1/config/web/history"),
    ("POST", "/v1/config/web/rollback"),
    ("GET", "/v1/logs?tail=1"),
    ("GET", "/v1/audit"),
    ("POST", "/v1/reload"),
];

fn call(
    g: &Gantry,
    method: &str,
    path: &str,
    headers: &[(&str, &str)],
    body: Option<&str>,
) -> Resp {
    http(
        g.admin,
        method,
        path,
        headers,
        body,
        Duration::from_secs(10),
    )
    .unwrap()
}

#[test]
fn every_endpoint_needs_a_permission_and_changes_are_audited() {
    let mut g = Gantry::start(WEB);
    g.wait_healthy("web", 1, Duration::from_secs(20));
    // Without credentials: 401, JSON, naming the permission; reads included.
    for (method, path) in ENDPOINTS {
        let r = call(&g, method, path, &[], Some("{}"));
        assert_eq!(r.status, 401, "{method} {path}: {}", r.body);
        assert_eq!(r.json()["error"], "unauthorized", "{method} {path}");
        assert!(
            r.json()["message"].as_str().unwrap().contains(':'),
            "{}",
            r.body
        );
        assert_eq!(
            r.header("www-authenticate"),
            Some("Bearer realm=\"gantry\"")
        );
        let r = call(
            &g,
            method,
            path,
            &[("authorization", "Bearer wrong")],
            Some("{}"),
        );
        assert_eq!(
            r.status, 401,
            "{method} {path} with a wrong token: {}",
            r.body
        );
    }
    // With the admin token no endpoint is refused for want of a permission.
    let auth = format!("Bearer {}", g.token);
    for (method, path) in ENDPOINTS {
        if *path == "/v1/reload" || path.ends_with("/restart") {
            continue;
        }
        let r = call(&g, method, path, &[("authorization", &auth)], Some("{}"));
        assert!(
            r.status != 401 && r.status != 403,
            "{method} {path}: {} {}",
            r.status,
            r.body
        );
    }

    // Changes are recorded: who, what, from where, request id, outcome; refusals too.
    let r = call(
        &g,
        "PUT",
        "/v1/routes/audited",
        &[("authorization", &auth), ("x-request-id", "req-audit-1")],
        Some(&json!({"service": "web", "route": {"path_prefix": "/audited"}}).to_string()),
    );
    assert_eq!(r.status, 200, "{}", r.body);
    assert_eq!(r.header("x-request-id"), Some("req-audit-1"));
    // (Refusals are recorded up to a rate per second; the burst above used this second's.)
    std::thread::sleep(Duration::from_millis(1100));
    let denied = call(&g, "DELETE", "/v1/routes/audited", &[], None);
    assert_eq!(denied.status, 401);
    let records = g.admin_get("/v1/audit?limit=1000");
    let find = |pred: &dyn Fn(&Value) -> bool| {
        records
            .as_array()
            .unwrap()
            .iter()
            .find(|r| pred(r))
            .cloned()
            .unwrap_or_else(|| panic!("no such record in {records}"))
    };
    let put = find(&|r| r["request_id"] == "req-audit-1");
    assert_eq!(put["principal"], "admin-token");
    assert_eq!(put["action"], "routes:write");
    assert_eq!(
        (put["method"].as_str(), put["path"].as_str()),
        (Some("PUT"), Some("/v1/routes/audited"))
    );
    assert_eq!(
        (put["status"].as_u64(), put["outcome"].as_str()),
        (Some(200), Some("ok"))
    );
    assert!(
        put["remote"].as_str().unwrap().starts_with("127.0.0.1:"),
        "{put}"
    );
    let refused = find(&|r| r["method"] == "DELETE" && r["path"] == "/v1/routes/audited");
    assert_eq!(refused["principal"], Value::Null);
    assert_eq!(refused["outcome"], "denied");
    // Reads are not recorded.
    assert!(!records
        .as_array()
        .unwrap()
        .iter()
        .any(|r| r["method"] == "GET"));
    // The trail is in the store: it survives a restart; the CLI shows it.
    g.kill();
    g.launch();
    let after = g.admin_get("/v1/audit?limit=1000");
    assert!(after
        .as_array()
        .unwrap()
        .iter()
        .any(|r| r["request_id"] == "req-audit-1"));
    let out = g.cli(&["audit", "-n", "500"]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(
        text.contains("PUT /v1/routes/audited") && text.contains("admin-token"),
        "{text}"
    );
    let bad = call(
        &g,
        "GET",
        "/v1/audit?limit=0",
        &[("authorization", &auth)],
        None,
    );
    assert_eq!(bad.status, 400);
}

#[test]
fn health_and_metrics_can_be_opened() {
    let dir = tempfile::tempdir().unwrap();
    let spec = dir.path().join("gantry.toml");
    let text = spec_text(WEB).replace(
        "[admin]\nlisten = \"127.0.0.1:0\"\n",
        "[admin]\nlisten = \"127.0.0.1:0\"\npublic = [\"health\", \"metrics\"]\n",
    );
    assert!(text.contains("public"), "{text}");
    std::fs::write(&spec, text).unwrap();
    let g = Gantry::start_at(dir, spec);
    assert_eq!(call(&g, "GET", "/v1/health", &[], None).status, 200);
    let m = call(&g, "GET", "/metrics", &[], None);
    assert_eq!(m.status, 200);
    assert!(m.body.contains("gantry_"));
    assert_eq!(call(&g, "GET", "/v1/services", &[], None).status, 401);
    assert_eq!(call(&g, "GET", "/v1/config", &[], None).status, 401);
}

#[test]
fn the_admin_listener_survives_hostile_clients_and_answers_in_json() {
    let g = Gantry::start(&format!(
        "[gateway.limits]\nheader_read_timeout_ms = 1000\n{WEB}"
    ));
    g.wait_healthy("web", 1, Duration::from_secs(20));
    let auth = format!("Bearer {}", g.token);
    // 600 half-sent requests: more than the connection cap (256). The gateway keeps serving;
    // the admin API serves again once the header-read timeout closes them.
    let mut held = Vec::new();
    for _ in 0..600 {
        if let Ok(mut s) = TcpStream::connect_timeout(&g.admin, Duration::from_millis(500)) {
            let _ = s.write_all(b"GET /v1/health HTTP/1.1\r\nHost: x\r\n");
            held.push(s);
        }
    }
    for _ in 0..20 {
        assert_eq!(g.get("/web/x").status, 200);
    }
    let start = Instant::now();
    wait_for(
        "the admin API to serve again",
        Duration::from_secs(15),
        || {
            let r = http(
                g.admin,
                "GET",
                "/v1/health",
                &[("authorization", &auth)],
                None,
                Duration::from_secs(3),
            )
            .ok()?;
            (r.status == 200).then_some(())
        },
    );
    assert!(start.elapsed() < Duration::from_secs(10));
    // The half-sent requests were closed by the server.
    let mut closed = 0;
    for s in held.iter_mut().take(50) {
        s.set_read_timeout(Some(Duration::from_secs(3))).unwrap();
        let mut buf = [0u8; 256];
        if s.read(&mut buf).is_ok() {
            closed += 1;
        }
    }
    assert_eq!(closed, 50);
    drop(held);

    // Oversized and malformed requests: JSON errors.
    let long = format!("/v1/services?x={}", "a".repeat(9000));
    let r = call(&g, "GET", &long, &[("authorization", &auth)], None);
    assert_eq!(r.status, 414, "{}", r.body);
    assert_eq!(r.json()["error"], "uri_too_long");
    let big = "b".repeat(30_000);
    let r = call(
        &g,
        "GET",
        "/v1/services",
        &[("authorization", &auth), ("x-big", &big)],
        None,
    );
    assert_eq!(r.status, 431, "{}", r.body);
    assert_eq!(r.json()["error"], "headers_too_large");
    let huge = format!("{{\"set\":{{\"A\":\"{}\"}}}}", "c".repeat(2 << 20));
    let r = call(
        &g,
        "PATCH",
        "/v1/config/web",
        &[("authorization", &auth)],
        Some(&huge),
    );
    assert_eq!(r.status, 413, "{}", r.body);
    assert_eq!(r.json()["error"], "payload_too_large");
    let r = raw(
        g.admin,
        format!(
            "PATCH /v1/config/web HTTP/1.1\r\nHost: x\r\nAuthorization: {auth}\r\nContent-Type: application/json\r\nTransfer-Encoding: chunked\r\n\r\nzz\r\n{{}}\r\n0\r\n\r\n"
        )
        .as_bytes(),
    );
    assert!(r.starts_with("HTTP/1.1 400"), "{r}");
    assert!(
        r.contains("application/json") && r.contains("\"error\""),
        "{r}"
    );
    let r = call(
        &g,
        "PATCH",
        "/v1/config/web",
        &[("authorization", &auth)],
        Some("{\"set\":{\"A\":\"1\"}} trailing"),
    );
    assert_eq!(r.status, 400, "{}", r.body);
    assert!(r.body.contains("after the JSON value"), "{}", r.body);
    // None of the refused writes made a config version.
    assert_eq!(g.admin_get("/v1/config/web")["version"], 0);
}

/// The OpenAPI document, checked by tools we did not write: openapi-spec-validator, and
/// schemathesis driving the running API from the document (no 5xx, nothing the document does not
/// say). See `fixtures/openapi_check.py` for what is left out and why.
#[test]
fn openapi_document_is_valid_and_the_api_keeps_to_it() {
    let g = Gantry::start(WEB);
    g.wait_healthy("web", 1, Duration::from_secs(20));
    let doc = g.admin_get("/v1/openapi.json");
    assert_eq!(doc["openapi"], "3.1.0");
    assert!(doc["paths"]["/v1/deployments/{service}/versions/{version}"]["put"].is_object());
    assert_eq!(call(&g, "GET", "/v1/openapi.json", &[], None).status, 401);
    let out = std::process::Command::new("python3")
        .arg(fixture("openapi_check.py"))
        .arg(format!("http://{}", g.admin))
        .arg(&g.token)
        .arg("60")
        .output()
        .unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "{stdout}\n{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(stdout.contains("openapi-spec-validator: valid"), "{stdout}");
    // The system still serves after the fuzzing.
    assert_eq!(g.get("/web/x").status, 200);
}
