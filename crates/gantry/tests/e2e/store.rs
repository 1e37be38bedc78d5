//! Both store backends under the whole system: everything acknowledged comes back after a
//! SIGKILL of gantry and a new start.

use std::time::Duration;

use serde_json::json;

use crate::common::*;

const WEB: &str = r#"
[services.web]
command = ["{TESTSVC}"]
health = { type = "http", path = "/health", interval_ms = 200 }
[[services.web.routes]]
path_prefix = "/web"
strip_prefix = true
"#;

fn nats_url() -> String {
    std::env::var("GANTRY_TEST_NATS_URL").unwrap_or_else(|_| "nats://127.0.0.1:4222".into())
}

/// A namespace of its own, removed when the test ends (also when it fails).
struct Namespace(String);

impl Namespace {
    fn new() -> Self {
        Self(format!(
            "e2e-{}-{}",
            std::process::id(),
            std::time::SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)
                .unwrap()
                .subsec_nanos()
                % 1_000_000
        ))
    }
}

impl Drop for Namespace {
    fn drop(&mut self) {
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .unwrap();
        rt.block_on(async {
            let mut o = gantry_store::NatsOptions::new(nats_url());
            o.namespace = self.0.clone();
            if let Ok(s) = gantry_store::NatsStore::connect(o).await {
                let _ = s.destroy_namespace().await;
            }
        });
    }
}

fn state_survives_kill_9(store_section: &str) {
    let mut g = Gantry::start(&format!("{store_section}\n{WEB}"));
    g.wait_healthy("web", 1, Duration::from_secs(20));
    // A registration, a config version, a scale override and an API route, each acknowledged.
    let (_ext, port) = {
        let svc = OwnSvc::start("ext-1", &[]);
        let port = svc.addr().port();
        (svc, port)
    };
    let r = g.admin_call(
        "POST",
        "/v1/registry/instances",
        Some(&json!({"service": "ext", "id": "ext-1", "port": port, "ttl_ms": 600000})),
    );
    assert_eq!(r.status, 201, "{}", r.body);
    let out = g.cli(&["config", "set", "web", "GREETING", "hello"]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let out = g.cli(&["scale", "web", "2"]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let r = g.admin_call(
        "PUT",
        "/v1/routes/beta",
        Some(&json!({"service": "web", "route": {"path_prefix": "/beta", "strip_prefix": true}})),
    );
    assert_eq!(r.status, 200, "{}", r.body);
    g.wait_healthy("web", 2, Duration::from_secs(20));
    // The store's work shows in the metrics, by backend.
    let m = g.metrics();
    let backend = if store_section.contains("nats") {
        "nats"
    } else {
        "embedded"
    };
    assert!(
        m.contains(&format!(
            "gantry_store_operations_total{{backend=\"{backend}\",op=\"update\",outcome=\"ok\"}}"
        )),
        "{m}"
    );
    assert!(m.contains("gantry_store_operation_seconds_bucket"), "{m}");

    g.kill();
    g.launch();

    let inst = g.admin_get("/v1/registry/instances/ext-1");
    assert_eq!(inst["port"], port, "{inst}");
    let cfg = g.admin_get("/v1/config/web");
    assert_eq!(cfg["values"]["GREETING"], "hello", "{cfg}");
    assert_eq!(cfg["version"], 1, "{cfg}");
    g.wait_healthy("web", 2, Duration::from_secs(20));
    let r = g.get("/beta/x");
    assert_eq!(r.status, 200, "{}", r.body);
    assert_eq!(r.json()["path"], "/x");
    // The restarted instances got the config.
    let r = g.get("/web/env/GREETING");
    assert_eq!(r.status, 200, "{}", r.body);
    // A further change builds on what came back.
    let out = g.cli(&["config", "set", "web", "GREETING", "again"]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert_eq!(g.admin_get("/v1/config/web")["version"], 2);
}

#[test]
fn embedded_store_state_survives_kill_9() {
    state_survives_kill_9("");
}

#[test]
fn nats_store_state_survives_kill_9() {
    let ns = Namespace::new();
    state_survives_kill_9(&format!(
        "[store]\nbackend = \"nats\"\nurl = \"{}\"\nnamespace = \"{}\"\n",
        nats_url(),
        ns.0
    ));
}

#[test]
fn unreachable_nats_is_a_clear_error() {
    let dir = tempfile::tempdir().unwrap();
    let spec = dir.path().join("gantry.toml");
    std::fs::write(
        &spec,
        spec_text(&format!(
            "[store]\nbackend = \"nats\"\nurl = \"nats://127.0.0.1:{}\"\n{WEB}",
            free_port()
        )),
    )
    .unwrap();
    let out = std::process::Command::new(gantry_bin())
        .args(["up", "-f"])
        .arg(&spec)
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(1), "{out:?}");
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.contains("cannot connect to NATS at nats://127.0.0.1:"),
        "{err}"
    );
}
