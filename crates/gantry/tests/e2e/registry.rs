use std::io::{Read, Write};
use std::process::{Child, Command};
use std::time::{Duration, Instant};

use serde_json::json;

use crate::common::*;

const SPEC: &str = r#"
[services.ext]
command = ["{TESTSVC}"]
replicas = 0
[[services.ext.routes]]
path_prefix = "/ext"
strip_prefix = true
"#;

struct Own(Child);
impl Drop for Own {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

/// A test service this test starts itself (not supervised by gantry).
fn external_service() -> (Own, u16) {
    let port = free_port();
    let child = Command::new(testsvc_bin())
        .env("PORT", port.to_string())
        .env("GANTRY_INSTANCE", "outside")
        .stdout(std::process::Stdio::null())
        .spawn()
        .unwrap();
    let addr = format!("127.0.0.1:{port}").parse().unwrap();
    wait_for("external service", Duration::from_secs(10), || {
        http(
            addr,
            "GET",
            "/health",
            &[],
            None,
            Duration::from_millis(200),
        )
        .ok()
    });
    (Own(child), port)
}

#[test]
fn self_registration_heartbeat_and_expiry() {
    let g = Gantry::start(SPEC);
    let (_svc, port) = external_service();
    assert_eq!(g.get("/ext/x").status, 503);

    let r = g.admin_call("POST", "/v1/registry/instances", Some(&json!({
        "service": "ext", "port": port, "version": "1.2.3", "ttl_ms": 1000, "metadata": {"zone": "a"}
    })));
    assert_eq!(r.status, 201, "{}", r.body);
    let id = r.json()["id"].as_str().unwrap().to_string();
    let r = g.get("/ext/hello");
    assert_eq!(r.status, 200);
    assert_eq!(r.json()["instance"], "outside");

    // Versioned lookup.
    assert_eq!(
        g.admin_get("/v1/registry/services/ext?version=%5E1")
            .as_array()
            .unwrap()
            .len(),
        1
    );
    assert_eq!(
        g.admin_get("/v1/registry/services/ext?version=%3E%3D2")
            .as_array()
            .unwrap()
            .len(),
        0
    );

    // Heartbeats keep it past its TTL.
    let t0 = Instant::now();
    while t0.elapsed() < Duration::from_millis(2000) {
        let r = g.admin_call(
            "PUT",
            &format!("/v1/registry/instances/{id}/heartbeat"),
            None,
        );
        assert_eq!(r.status, 200, "{}", r.body);
        std::thread::sleep(Duration::from_millis(300));
    }
    assert_eq!(g.get("/ext/x").status, 200);
    // Without heartbeats it expires, and traffic stops going there.
    let t1 = Instant::now();
    wait_for("lease expiry", Duration::from_secs(5), || {
        (http(
            g.admin,
            "GET",
            &format!("/v1/registry/instances/{id}"),
            &[("authorization", &format!("Bearer {}", g.token))],
            None,
            Duration::from_secs(2),
        )
        .unwrap()
        .status
            == 404)
            .then_some(())
    });
    let waited = t1.elapsed();
    assert!(
        waited >= Duration::from_millis(600),
        "expired too early: {waited:?}"
    );
    assert_eq!(g.get("/ext/x").status, 503);
    let r = g.admin_call(
        "PUT",
        &format!("/v1/registry/instances/{id}/heartbeat"),
        None,
    );
    assert_eq!(r.status, 404);
}

#[test]
fn registrations_survive_restart_and_deregister() {
    let mut g = Gantry::start(SPEC);
    let (_svc, port) = external_service();
    let r = g.admin_call(
        "POST",
        "/v1/registry/instances",
        Some(&json!({
            "service": "ext", "id": "ext-eu-1", "port": port, "ttl_ms": 60000
        })),
    );
    assert_eq!(r.status, 201, "{}", r.body);
    assert_eq!(g.stop(), Some(0));
    g.launch();
    let inst = g.admin_get("/v1/registry/instances/ext-eu-1");
    assert_eq!(inst["port"], port);
    assert_eq!(g.get("/ext/x").status, 200);
    let r = g.admin_call("DELETE", "/v1/registry/instances/ext-eu-1", None);
    assert_eq!(r.status, 204);
    assert_eq!(g.get("/ext/x").status, 503);
    g.stop();
    g.launch();
    let r = http(
        g.admin,
        "GET",
        "/v1/registry/instances/ext-eu-1",
        &[("authorization", &format!("Bearer {}", g.token))],
        None,
        Duration::from_secs(2),
    )
    .unwrap();
    assert_eq!(r.status, 404);
}

#[test]
fn bad_registrations_get_clear_errors() {
    let g = Gantry::start(SPEC);
    let no_token = post(
        g.admin,
        "/v1/registry/instances",
        "{}",
        Duration::from_secs(2),
    );
    assert_eq!(no_token.status, 401);
    assert!(no_token.json()["message"]
        .as_str()
        .unwrap()
        .contains("Bearer"));
    let cases = [
        (json!({"service": "ext", "port": "eighty"}), "port"),
        (json!({"service": "ext", "port": 80, "ttl_ms": 5}), "ttl_ms"),
        (
            json!({"service": "ext", "port": 80, "version": "one"}),
            "version",
        ),
        (json!({"service": "Ext!", "port": 80}), "service"),
        (json!({"service": "ext", "port": 80, "bogus": 1}), "bogus"),
    ];
    for (body, field) in cases {
        let r = g.admin_call("POST", "/v1/registry/instances", Some(&body));
        assert_eq!(r.status, 400, "{body}: {}", r.body);
        assert!(
            r.json()["message"].as_str().unwrap().contains(field),
            "{body}: {}",
            r.body
        );
    }
    let r = http(
        g.admin,
        "POST",
        "/v1/registry/instances",
        &[("authorization", &format!("Bearer {}", g.token))],
        Some("{not json"),
        Duration::from_secs(2),
    )
    .unwrap();
    assert_eq!(r.status, 400);
    assert_eq!(r.json()["error"], "bad_request");
}

#[test]
fn watch_streams_snapshot_then_changes() {
    let g = Gantry::start(SPEC);
    let mut s = std::net::TcpStream::connect(g.admin).unwrap();
    s.set_read_timeout(Some(Duration::from_millis(200)))
        .unwrap();
    s.write_all(
        format!(
            "GET /v1/registry/watch HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer {}\r\n\r\n",
            g.token
        )
        .as_bytes(),
    )
    .unwrap();
    let mut seen = String::new();
    let mut read_until = |needle: &str, seen: &mut String| {
        let deadline = Instant::now() + Duration::from_secs(5);
        let mut buf = [0u8; 4096];
        while !seen.contains(needle) {
            assert!(Instant::now() < deadline, "no {needle:?} in {seen}");
            if let Ok(n) = s.read(&mut buf) {
                seen.push_str(&String::from_utf8_lossy(&buf[..n]));
            }
        }
    };
    read_until("event: snapshot", &mut seen);
    let r = g.admin_call(
        "POST",
        "/v1/registry/instances",
        Some(&json!({"service": "ext", "port": 9, "id": "w-1"})),
    );
    assert_eq!(r.status, 201);
    read_until("event: registered", &mut seen);
    assert!(seen.contains("\"w-1\""));
    g.admin_call("DELETE", "/v1/registry/instances/w-1", None);
    read_until("event: deregistered", &mut seen);
}
