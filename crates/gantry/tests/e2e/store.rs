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
[[services.web.routes]]
path_prefix = "/secure"
strip_prefix = true
auth = "required"
"#;

/// A stable issuer: tokens issued before a restart must still name it after.
const IDENTITY: &str = "[identity]\nlisten = \"127.0.0.1:0\"\nissuer = \"http://issuer.test\"\n";

fn token_call(g: &Gantry, form: &str) -> serde_json::Value {
    let info: serde_json::Value =
        serde_json::from_slice(&std::fs::read(g.data_dir().join("admin.json")).unwrap()).unwrap();
    let addr = info["identity_url"]
        .as_str()
        .unwrap()
        .trim_start_matches("http://")
        .parse()
        .unwrap();
    let r = http(
        addr,
        "POST",
        "/oauth2/token",
        &[("content-type", "application/x-www-form-urlencoded")],
        Some(form),
        Duration::from_secs(10),
    )
    .unwrap();
    assert_eq!(r.status, 200, "{}", r.body);
    r.json()
}

fn secure(g: &Gantry, token: &str) -> u16 {
    http(
        g.gateway,
        "GET",
        "/secure/x",
        &[("authorization", &format!("Bearer {token}"))],
        None,
        Duration::from_secs(10),
    )
    .unwrap()
    .status
}

pub(crate) fn nats_url() -> String {
    std::env::var("GANTRY_TEST_NATS_URL").unwrap_or_else(|_| "nats://127.0.0.1:4222".into())
}

/// A namespace of its own, removed when the test ends (also when it fails).
pub(crate) struct Namespace(pub String);

impl Namespace {
    pub(crate) fn new() -> Self {
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
    let mut g = Gantry::start(&format!("{store_section}\n{IDENTITY}\n{WEB}"));
    g.wait_healthy("web", 1, Duration::from_secs(20));
    // Identity: a client, a user, tokens, a refresh token, an API key, a revocation.
    let r = g.admin_call(
        "POST",
        "/v1/identity/clients",
        Some(&json!({"id": "m2m", "kind": "confidential"})),
    );
    assert_eq!(r.status, 201, "{}", r.body);
    let secret = r.json()["secret"].as_str().unwrap().to_string();
    let r = g.admin_call(
        "POST",
        "/v1/identity/clients",
        Some(&json!({"id": "app", "kind": "public", "grant_types": ["password", "refresh_token"]})),
    );
    assert_eq!(r.status, 201, "{}", r.body);
    let r = g.admin_call(
        "POST",
        "/v1/identity/users",
        Some(&json!({"username": "ursula", "password": "durable-pass"})),
    );
    assert_eq!(r.status, 201, "{}", r.body);
    let cc = format!("grant_type=client_credentials&client_id=m2m&client_secret={secret}");
    let token = token_call(&g, &cc)["access_token"]
        .as_str()
        .unwrap()
        .to_string();
    let revoked = token_call(&g, &cc)["access_token"]
        .as_str()
        .unwrap()
        .to_string();
    let login = token_call(
        &g,
        "grant_type=password&client_id=app&username=ursula&password=durable-pass",
    );
    let refresh = login["refresh_token"].as_str().unwrap().to_string();
    let r = g.admin_call(
        "POST",
        "/v1/identity/api-keys",
        Some(&json!({"client_id": "m2m"})),
    );
    assert_eq!(r.status, 201, "{}", r.body);
    let api_key = r.json()["key"].as_str().unwrap().to_string();
    let info: serde_json::Value =
        serde_json::from_slice(&std::fs::read(g.data_dir().join("admin.json")).unwrap()).unwrap();
    let id_addr = info["identity_url"]
        .as_str()
        .unwrap()
        .trim_start_matches("http://")
        .parse()
        .unwrap();
    let r = http(
        id_addr,
        "POST",
        "/oauth2/revoke",
        &[("content-type", "application/x-www-form-urlencoded")],
        Some(&format!(
            "token={revoked}&client_id=m2m&client_secret={secret}"
        )),
        Duration::from_secs(10),
    )
    .unwrap();
    assert_eq!(r.status, 200, "{}", r.body);
    assert_eq!(secure(&g, &token), 200);
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

    // Every credential issued before the SIGKILL still works (keys, clients, users, refresh
    // families and API keys are in the store), and the revoked token stays revoked.
    g.wait_healthy("web", 2, Duration::from_secs(20));
    assert_eq!(secure(&g, &token), 200);
    assert_eq!(secure(&g, &revoked), 401);
    let again = token_call(&g, &cc)["access_token"]
        .as_str()
        .unwrap()
        .to_string();
    assert_eq!(secure(&g, &again), 200);
    let rotated = token_call(
        &g,
        &format!("grant_type=refresh_token&client_id=app&refresh_token={refresh}"),
    );
    assert!(rotated["refresh_token"].is_string(), "{rotated}");
    token_call(
        &g,
        "grant_type=password&client_id=app&username=ursula&password=durable-pass",
    );
    let r = http(
        g.gateway,
        "GET",
        "/secure/x",
        &[("x-api-key", &api_key)],
        None,
        Duration::from_secs(10),
    )
    .unwrap();
    assert_eq!(r.status, 200, "{}", r.body);

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

/// Writers commit pairs of keys (`A_n` and `B_n`, one commit each) while gantry is SIGKILLed:
/// after the restart every acknowledged commit is there, whole, and no commit is half there.
fn config_commits_survive_kill_9(store_section: &str) {
    use std::sync::atomic::{AtomicBool, Ordering};
    use std::sync::{Arc, Mutex};
    let mut g = Gantry::start(&format!("{store_section}\n{WEB}"));
    let acked = Arc::new(Mutex::new(Vec::<u64>::new()));
    let stop = Arc::new(AtomicBool::new(false));
    let (admin, token) = (g.admin, g.token.clone());
    let writers: Vec<_> = (0..4u64)
        .map(|w| {
            let (acked, stop, token) = (acked.clone(), stop.clone(), token.clone());
            std::thread::spawn(move || {
                let auth = format!("Bearer {token}");
                for i in 0..400u64 {
                    if stop.load(Ordering::Relaxed) {
                        return;
                    }
                    let n = w * 1000 + i;
                    let body = format!(
                        r#"{{"set": {{"A_{n}": {n}, "B_{n}": "{n}"}}, "secrets": {{"S_{n}": "s{n}"}}, "message": "burst {n}"}}"#
                    );
                    match http(
                        admin,
                        "PATCH",
                        "/v1/config/web",
                        &[("authorization", &auth), ("content-type", "application/json")],
                        Some(&body),
                        Duration::from_secs(10),
                    ) {
                        Ok(r) if r.status == 201 => acked.lock().unwrap().push(n),
                        // Gantry is gone: nothing more is acknowledged.
                        _ => return,
                    }
                }
            })
        })
        .collect();
    wait_for("40 acknowledged commits", Duration::from_secs(30), || {
        (acked.lock().unwrap().len() >= 40).then_some(())
    });
    g.kill();
    stop.store(true, Ordering::Relaxed);
    for w in writers {
        w.join().unwrap();
    }
    let acked = acked.lock().unwrap().clone();
    g.launch();
    let cfg = g.admin_get("/v1/config/web?reveal=true");
    let values = cfg["values"].as_object().unwrap();
    let secrets = cfg["secrets"].as_object().unwrap();
    for n in &acked {
        assert_eq!(
            values[&format!("A_{n}")],
            *n,
            "acknowledged commit {n} lost"
        );
        assert_eq!(secrets[&format!("S_{n}")], format!("s{n}"));
    }
    // Whole or not at all: every commit that is there has all three keys.
    for k in values.keys().filter(|k| k.starts_with("A_")) {
        let n = &k[2..];
        assert!(values.contains_key(&format!("B_{n}")), "half a commit: {k}");
        assert!(
            secrets.contains_key(&format!("S_{n}")),
            "half a commit: {k}"
        );
    }
    // One version per commit there, and history agrees with the values.
    let version = cfg["version"].as_u64().unwrap();
    assert_eq!(version as usize, values.len() / 2, "{version}");
    let h = g.admin_get("/v1/config/web/history");
    assert_eq!(h.as_array().unwrap().last().unwrap()["version"], version);
    // And the store goes on from there.
    let r = g.admin_call(
        "PATCH",
        "/v1/config/web",
        Some(&serde_json::json!({"set": {"AFTER": 1}})),
    );
    assert_eq!(r.status, 201, "{}", r.body);
    assert_eq!(r.json()["version"]["version"], version + 1);
}

#[test]
fn embedded_config_commits_survive_kill_9() {
    config_commits_survive_kill_9("");
}

#[test]
fn nats_config_commits_survive_kill_9() {
    let ns = Namespace::new();
    config_commits_survive_kill_9(&format!(
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
