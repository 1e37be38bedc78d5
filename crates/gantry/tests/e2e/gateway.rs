use std::time::Duration;

use crate::common::*;

const SPEC: &str = r#"
[services.web]
command = ["{TESTSVC}"]
replicas = 2
health = { type = "http", path = "/health" }
[[services.web.routes]]
path_prefix = "/web"
strip_prefix = true
timeout_ms = 500
[[services.web.routes]]
path_prefix = "/raw"

[services.api]
command = ["{TESTSVC}"]
[[services.api.routes]]
host = "api.example.com"
path_prefix = "/"

[services.empty]
command = ["{TESTSVC}"]
replicas = 0
[[services.empty.routes]]
path_prefix = "/empty"
"#;

#[test]
fn routing_rewrites_headers_and_errors() {
    let g = Gantry::start(SPEC);
    g.wait_healthy("web", 2, Duration::from_secs(20));
    g.wait_healthy("api", 1, Duration::from_secs(20));

    // Strip prefix keeps the query; no-strip forwards the path as is.
    let r = g.get("/web/a/b?c=d");
    assert_eq!(r.status, 200);
    let echo = r.json();
    assert_eq!(echo["path"], "/a/b");
    assert_eq!(echo["query"], "c=d");
    assert_eq!(g.get("/web").json()["path"], "/");
    assert_eq!(g.get("/raw/x").json()["path"], "/raw/x");
    // Segment-wise prefix: /webx is not /web.
    assert_eq!(g.get("/webx").status, 404);

    // Host routing wins over path-only routes.
    let raw = raw_request(
        g.gateway,
        "GET /web/a HTTP/1.1\r\nHost: API.example.com:80\r\nConnection: close\r\n\r\n",
    );
    assert!(raw.contains("\"instance\":\"api-1\""), "{raw}");
    assert!(raw.contains("\"path\":\"/web/a\""), "{raw}");

    // Forwarding headers set, hop-by-hop removed, request id generated and returned.
    let raw = raw_request(
        g.gateway,
        "GET /web/h HTTP/1.1\r\nHost: shop.test\r\nConnection: close, x-drop-me\r\nX-Drop-Me: 1\r\nKeep-Alive: timeout=5\r\nX-Forwarded-For: 10.1.1.1\r\nX-Forwarded-Proto: https\r\nX-Forwarded-Host: evil.example\r\nTraceparent: bogus\r\nX-Keep: yes\r\n\r\n",
    );
    let (head, body) = raw.split_once("\r\n\r\n").unwrap();
    let v: serde_json::Value = serde_json::from_str(body.trim()).unwrap();
    let h = &v["headers"];
    assert_eq!(h["x-forwarded-for"], "10.1.1.1, 127.0.0.1");
    assert_eq!(h["x-forwarded-proto"], "http");
    assert_eq!(h["x-forwarded-host"], "shop.test");
    // What the client claimed is replaced, never sent beside the gateway's own value.
    for name in [
        "x-forwarded-for",
        "x-forwarded-proto",
        "x-forwarded-host",
        "traceparent",
    ] {
        assert_eq!(
            body.matches(&format!("\"{name}\"")).count(),
            1,
            "{name}: {body}"
        );
    }
    assert!(h["traceparent"].as_str().unwrap().starts_with("00-"), "{h}");
    assert_eq!(h["host"], "shop.test");
    assert_eq!(h["x-keep"], "yes");
    assert!(h.get("x-drop-me").is_none(), "{h}");
    assert!(h.get("keep-alive").is_none(), "{h}");
    let rid = h["x-request-id"].as_str().unwrap();
    assert_eq!(rid.len(), 32);
    assert!(
        head.to_ascii_lowercase()
            .contains(&format!("x-request-id: {rid}")),
        "{head}"
    );
    // A client's request id is kept.
    let r = http(
        g.gateway,
        "GET",
        "/web/",
        &[("X-Request-Id", "abc-123")],
        None,
        Duration::from_secs(5),
    )
    .unwrap();
    assert_eq!(r.json()["headers"]["x-request-id"], "abc-123");
    assert_eq!(r.header("x-request-id"), Some("abc-123"));

    // No route → 404 JSON; no instance → 503 JSON naming the service; slow → 504.
    let r = g.get("/nothing/here");
    assert_eq!(r.status, 404);
    assert_eq!(r.json()["error"], "no_route");
    let r = g.get("/empty/x");
    assert_eq!(r.status, 503);
    assert_eq!(r.json()["service"], "empty");
    assert!(r.json()["message"].as_str().unwrap().contains("empty"));
    assert_eq!(r.header("content-type"), Some("application/json"));
    let r = g.get("/web/slow?ms=3000");
    assert_eq!(r.status, 504);
    assert_eq!(r.json()["error"], "upstream_timeout");

    // POST bodies stream through.
    let r = post(g.gateway, "/web/post", "hello", Duration::from_secs(5));
    assert_eq!(r.status, 200);
    assert_eq!(r.json()["method"], "POST");

    let m = g.metrics();
    for want in [
        "gantry_gateway_requests_total{route=\"web/0\",service=\"web\",status=\"2xx\"}",
        "gantry_gateway_requests_total{route=\"web/0\",service=\"web\",status=\"5xx\"}",
        "gantry_gateway_request_duration_seconds_bucket{",
        "gantry_gateway_rejected_requests_total{reason=\"no_route\"}",
        "gantry_supervisor_instances{service=\"web\",state=\"healthy\"} 2",
        "gantry_supervisor_health_checks_total{service=\"web\",result=\"pass\"}",
        "gantry_registry_instances{service=\"web\"} 2",
    ] {
        assert!(m.contains(want), "metrics lack {want}");
    }
}

fn raw_request(addr: std::net::SocketAddr, req: &str) -> String {
    use std::io::{Read, Write};
    let mut s = std::net::TcpStream::connect(addr).unwrap();
    s.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
    s.write_all(req.as_bytes()).unwrap();
    let mut out = String::new();
    let _ = s.read_to_string(&mut out);
    out
}

#[test]
fn connection_refused_goes_to_another_instance() {
    let g = Gantry::start(&SPEC.replace("replicas = 2", "replicas = 3"));
    let list = g.wait_healthy("web", 3, Duration::from_secs(20));
    // Crash one instance and race the registry: requests right after the crash must all
    // succeed (a refused or reset connection sends an idempotent request to another instance).
    let port = list[1]["port"].as_u64().unwrap() as u16;
    let _ = http(
        format!("127.0.0.1:{port}").parse().unwrap(),
        "POST",
        "/admin/crash",
        &[],
        None,
        Duration::from_secs(2),
    );
    for _ in 0..30 {
        let r = g.get("/web/x");
        assert_eq!(r.status, 200, "{}", r.body);
    }
}

#[test]
fn http10_clients_without_host_are_served() {
    let g = Gantry::start(SPEC);
    g.wait_healthy("web", 2, Duration::from_secs(20));
    let r = raw_request(g.gateway, "GET /web/old HTTP/1.0\r\n\r\n");
    assert!(
        r.starts_with("HTTP/1.0 200") || r.starts_with("HTTP/1.1 200"),
        "{r}"
    );
    let body = r.split_once("\r\n\r\n").unwrap().1;
    let v: serde_json::Value = serde_json::from_str(body.trim()).unwrap();
    assert!(
        v["headers"]["host"]
            .as_str()
            .unwrap()
            .starts_with("127.0.0.1:"),
        "{v}"
    );
    assert_eq!(v["path"], "/old");
}

/// On shutdown the gateway lets requests in flight on plain HTTP/1.1 connections finish (and
/// closes their connection after the answer), closes idle keep-alive connections at once, and
/// exits as soon as both are done.
#[test]
fn shutdown_finishes_requests_in_flight_and_closes_idle_connections() {
    use std::io::{Read, Write};
    let own = OwnSvc::start("ext-1", &[]);
    let mut g = Gantry::start(&format!(
        r#"
[services.ext]
endpoints = ["{}"]
[[services.ext.routes]]
path_prefix = "/"
timeout_ms = 10000
"#,
        own.addr()
    ));
    wait_for("route to the endpoint", Duration::from_secs(10), || {
        (g.get("/health").status == 200).then_some(())
    });

    // An idle keep-alive connection (one request served on it).
    let mut idle = std::net::TcpStream::connect(g.gateway).unwrap();
    idle.set_read_timeout(Some(Duration::from_secs(10)))
        .unwrap();
    idle.write_all(b"GET /health HTTP/1.1\r\nHost: x\r\n\r\n")
        .unwrap();
    let mut buf = [0u8; 4096];
    let n = idle.read(&mut buf).unwrap();
    assert!(
        buf[..n].starts_with(b"HTTP/1.1 200"),
        "{}",
        String::from_utf8_lossy(&buf[..n])
    );

    // A request in flight when shutdown begins.
    let gw = g.gateway;
    let slow = std::thread::spawn(move || {
        let mut s = std::net::TcpStream::connect(gw).unwrap();
        s.set_read_timeout(Some(Duration::from_secs(15))).unwrap();
        s.write_all(b"GET /slow?ms=3000 HTTP/1.1\r\nHost: x\r\n\r\n")
            .unwrap();
        let mut out = Vec::new();
        let _ = s.read_to_end(&mut out);
        String::from_utf8_lossy(&out).into_owned()
    });
    std::thread::sleep(Duration::from_millis(300));
    let stopping = std::time::Instant::now();
    let stopper = std::thread::spawn(move || g.stop());

    // The idle connection is closed without waiting for the slow request.
    let closed = idle.read(&mut buf);
    assert!(
        matches!(closed, Ok(0)),
        "idle connection not closed: {closed:?}"
    );
    assert!(
        stopping.elapsed() < Duration::from_millis(1200),
        "{:?}",
        stopping.elapsed()
    );

    // The slow request gets its whole answer, and the connection then closes.
    let answer = slow.join().unwrap();
    assert!(answer.starts_with("HTTP/1.1 200"), "{answer}");
    assert!(
        answer.to_ascii_lowercase().contains("connection: close"),
        "{answer}"
    );
    assert_eq!(stopper.join().unwrap(), Some(0));
}

#[test]
fn an_instance_that_answers_before_reading_the_body_is_heard() {
    // The test service answers these paths without reading the request body, then closes the
    // connection (hyper does with an unread body): the client must get the instance's answer,
    // not a 502, on the plain port (Gantry's own HTTP/1.1 client) whatever the body's size.
    let g = Gantry::start(
        r#"
[services.up]
command = ["{TESTSVC}"]
[[services.up.routes]]
path_prefix = "/"
"#,
    );
    g.wait_healthy("up", 1, Duration::from_secs(20));
    // The instance's close with unread data makes its kernel send a reset; if the reset reaches
    // the gateway before the answer is read, the kernel has already discarded the answer (no
    // proxy can have it then). That race is rare and only under load: one is tolerated in this
    // test, and shows in the 5xx count checked below; a gateway that does not relay early
    // answers fails every time.
    let mut races = 0;
    let mut early = |path: &str, body: &str| {
        let r = post(g.gateway, path, body, Duration::from_secs(10));
        if r.status == 502 && r.body.contains("upstream_unavailable") && races == 0 {
            races += 1;
            return post(g.gateway, path, body, Duration::from_secs(10));
        }
        r
    };
    for size in [200_000usize, 4 << 20] {
        let body = "b".repeat(size);
        let r = early("/status/413", &body);
        assert_eq!(r.status, 413, "{size} bytes: {}", r.body);
        assert_eq!(r.body, "413\n");
        let r = early("/echo", &body);
        assert_eq!(r.status, 200, "{size} bytes: {}", r.body);
        assert_eq!(r.json()["path"], "/echo");
        // And a body the instance does read still arrives whole (on a connection that may be
        // the one the instance is closing after its early answer: the same race, counted
        // with the others).
        let r = early("/digest", &body);
        assert_eq!(r.json()["bytes"], size, "{}", r.body);
    }
    let m = g.metrics();
    assert!(
        m.contains(&format!(
            "gantry_gateway_requests_total{{route=\"up/0\",service=\"up\",status=\"5xx\"}} {races}"
        )),
        "no 5xx answered but the {races} race(s) above: {m}"
    );
}

#[test]
fn idle_upstream_connections_close_and_declined_upgrades_are_never_pooled() {
    let g = Gantry::start(
        r#"
[services.plain]
command = ["{TESTSVC}"]
[services.plain.upstream]
idle_connection_timeout_ms = 1000
[[services.plain.routes]]
path_prefix = "/p"
"#,
    );
    g.wait_healthy("plain", 1, Duration::from_secs(20));
    let inst = g.instance_addr("plain", "plain-1");
    // Connections the instance has open (its own stats call is one of them).
    let open = || {
        http(
            inst,
            "GET",
            "/admin/stats",
            &[],
            None,
            Duration::from_secs(5),
        )
        .unwrap()
        .json()["connections_open"]
            .as_u64()
            .unwrap()
    };
    // WebSocket upgrades the instance declines (a plain 200): each upstream connection is
    // closed with its response, never left in a pool nobody takes from.
    for i in 0..40 {
        let r = raw(
            g.gateway,
            b"GET /p/ws HTTP/1.1\r\nHost: x\r\nUpgrade: websocket\r\nConnection: Upgrade, close\r\nSec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\nSec-WebSocket-Version: 13\r\n\r\n",
        );
        assert_eq!(raw_status(&r), 200, "upgrade {i}: {r}");
    }
    wait_for(
        "declined upgrades' connections to close",
        Duration::from_secs(5),
        || (open() <= 1).then_some(()),
    );
    // Kept-alive connections: eight requests at once open several, which stay pooled...
    // (All eight start together and each takes a second, so that they overlap even on a loaded
    // machine.)
    let gw = g.gateway;
    let start = std::sync::Arc::new(std::sync::Barrier::new(8));
    let slow: Vec<_> = (0..8)
        .map(|_| {
            let start = start.clone();
            std::thread::spawn(move || {
                start.wait();
                http(
                    gw,
                    "GET",
                    "/p/slow?ms=1000",
                    &[],
                    None,
                    Duration::from_secs(10),
                )
                .unwrap()
                .status
            })
        })
        .collect();
    for t in slow {
        assert_eq!(t.join().unwrap(), 200);
    }
    let pooled = open();
    assert!(
        pooled >= 3,
        "{pooled} connections open after 8 concurrent requests"
    );
    // ...until they have been idle for the service's idle_connection_timeout_ms (1 s; swept
    // each second).
    wait_for(
        "idle pooled connections to close",
        Duration::from_secs(6),
        || (open() <= 1).then_some(()),
    );
    // And the pool starts again from nothing when traffic comes back.
    assert_eq!(g.get("/p/again").status, 200);
}
