//! Hostile requests: smuggling shapes, path tricks, size limits, slow and excess connections.
use std::io::{Read, Write};
use std::net::TcpStream;
use std::time::{Duration, Instant};

use crate::common::*;

const SPEC: &str = r#"
[services.public]
command = ["{TESTSVC}"]
[[services.public.routes]]
path_prefix = "/public"
[[services.public.routes]]
path_prefix = "/upload"
max_body_bytes = 100
[services.admin]
command = ["{TESTSVC}"]
[[services.admin.routes]]
path_prefix = "/admin"
"#;

fn start() -> Gantry {
    let dir = tempfile::tempdir().unwrap();
    let spec = dir.path().join("gantry.toml");
    let text = spec_text(SPEC).replace(
        "workers = 2",
        "workers = 2\n[gateway.limits]\nmax_headers = 20\nmax_header_bytes = 2048\nheader_read_timeout_ms = 500\nmax_connections = 40",
    );
    std::fs::write(&spec, text).unwrap();
    let g = Gantry::start_at(dir, spec);
    g.wait_healthy("public", 1, Duration::from_secs(20));
    g.wait_healthy("admin", 1, Duration::from_secs(20));
    g
}

fn json_error(resp: &str) -> serde_json::Value {
    let body = resp.split_once("\r\n\r\n").map(|(_, b)| b).unwrap_or("");
    serde_json::from_str(body.trim()).unwrap_or_else(|e| panic!("not a JSON error ({e}): {resp}"))
}

#[test]
fn smuggling_shapes_are_refused() {
    let g = start();
    let gw = g.gateway;
    // Every ambiguous framing is refused before routing with a JSON 400 and the connection is
    // closed, so a request smuggled behind it is never read: both framings, two
    // Content-Length lines (even equal ones), a malformed length, a transfer coding other than
    // chunked, obs-fold, HTTP/1.1 without Host.
    for bad in [
        &b"POST /public HTTP/1.1\r\nHost: x\r\nContent-Length: 5\r\nTransfer-Encoding: chunked\r\n\r\n0\r\n\r\nGET /admin/smuggled HTTP/1.1\r\nHost: x\r\n\r\n"[..],
        b"POST /public HTTP/1.1\r\nHost: x\r\nContent-Length: 5\r\nContent-Length: 5\r\n\r\nhelloGET /admin/smuggled HTTP/1.1\r\nHost: x\r\n\r\n",
        b"POST /public HTTP/1.1\r\nHost: x\r\nContent-Length: 5\r\nContent-Length: 6\r\n\r\nhello!",
        b"POST /public HTTP/1.1\r\nHost: x\r\nContent-Length: 5x\r\n\r\nhello",
        b"POST /public HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: gzip\r\n\r\nhello",
        b"POST /public HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: gzip, chunked\r\n\r\n0\r\n\r\n",
        b"GET /public HTTP/1.1\r\nHost: x\r\nX-Folded: a\r\n  b\r\n\r\n",
        b"GET /public HTTP/1.1\r\nHost: x\r\nHost: y\r\n\r\n",
        b"GET /public HTTP/1.1\r\n\r\n",
    ] {
        let r = raw(gw, bad);
        let what = String::from_utf8_lossy(bad);
        assert_eq!(raw_status(&r), 400, "{what}: {r}");
        assert!(!r.contains("\nHTTP/1.1 "), "one response only: {what}: {r}");
        assert!(r.to_ascii_lowercase().contains("connection: close"), "{r}");
        let e = json_error(&r);
        assert_eq!(e["error"], "malformed_request", "{r}");
        assert!(!e["message"].as_str().unwrap().is_empty(), "{r}");
    }
    // Well-framed bodies pass: a length, and chunks (with the next request pipelined behind).
    let r = raw(
        gw,
        b"POST /public HTTP/1.1\r\nHost: x\r\nContent-Length: 5\r\nConnection: close\r\n\r\nhello",
    );
    assert_eq!(raw_status(&r), 200, "{r}");
    assert!(r.contains("\"content-length\":\"5\""), "{r}");
    let r = raw(gw, b"POST /public HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\n\r\n5\r\nhello\r\n0\r\n\r\nGET /public HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n");
    assert_eq!(r.matches("HTTP/1.1 200").count(), 2, "{r}");
    // None of them reached an instance; all were counted.
    let stats = |svc: &str| {
        let a = g.instance_addr(svc, &format!("{svc}-1"));
        http(a, "GET", "/admin/stats", &[], None, Duration::from_secs(2))
            .unwrap()
            .json()["requests"]
            .as_u64()
            .unwrap()
    };
    assert_eq!(stats("admin"), 0, "the smuggled request never ran");
    assert_eq!(stats("public"), 3, "the three well-framed requests");
    let m = g.metrics();
    assert!(
        m.contains("gantry_gateway_rejected_requests_total{reason=\"malformed_request\"} 9"),
        "{m}"
    );
}

#[test]
fn invalid_hosts_are_refused_and_a_404_names_the_request() {
    let g = start();
    let gw = g.gateway;
    // RFC 9112 §3.2: a Host that is not `uri-host [":" port]` gets a 400, never forwarded.
    for host in ["", "a b", "a:99999", "[::1", "user@host", "a:"] {
        let r = raw(
            gw,
            format!("GET /public HTTP/1.1\r\nHost: {host}\r\nConnection: close\r\n\r\n").as_bytes(),
        );
        assert_eq!(raw_status(&r), 400, "Host {host:?}: {r}");
        let e = json_error(&r);
        assert_eq!(e["error"], "bad_request", "{r}");
        assert!(e["message"].as_str().unwrap().contains("Host"), "{r}");
    }
    // The absolute form's authority is checked the same way.
    let r = raw(
        gw,
        b"GET http://a:99999/public HTTP/1.1\r\nHost: a\r\nConnection: close\r\n\r\n",
    );
    assert_eq!(raw_status(&r), 400, "{r}");
    // Good ones pass: a port, an IPv6 literal, a name.
    for host in ["127.0.0.1:80", "[::1]:8080", "api.example.com"] {
        let r = raw(
            gw,
            format!("GET /public HTTP/1.1\r\nHost: {host}\r\nConnection: close\r\n\r\n").as_bytes(),
        );
        assert_eq!(raw_status(&r), 200, "Host {host:?}: {r}");
    }
    // No route: the message names the method, the path and the host as asked (port kept).
    let r = raw(
        gw,
        b"GET /nowhere/x?q=1 HTTP/1.1\r\nHost: example.com:8080\r\nConnection: close\r\n\r\n",
    );
    assert_eq!(raw_status(&r), 404, "{r}");
    assert_eq!(
        json_error(&r)["message"],
        "no route matches GET /nowhere/x on host example.com:8080",
        "{r}"
    );
}

#[test]
fn paths_cannot_escape_a_route_prefix() {
    let g = start();
    let inst = |path: &str| -> (u16, String, String) {
        let r = raw(
            g.gateway,
            format!("GET {path} HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n").as_bytes(),
        );
        let status = raw_status(&r);
        let body = r
            .split_once("\r\n\r\n")
            .map(|(_, b)| b.to_string())
            .unwrap_or_default();
        let v: serde_json::Value = serde_json::from_str(body.trim()).unwrap_or_default();
        (
            status,
            v["instance"].as_str().unwrap_or("").to_string(),
            v["path"].as_str().unwrap_or("").to_string(),
        )
    };
    // Dot segments and doubled slashes are resolved before matching, and the resolved path is
    // what the instance receives: /public/../admin is /admin, for the admin service.
    for p in [
        "/public/../admin/x",
        "/public/%2e%2e/admin/x",
        "/public/%2E%2e/admin/x",
        "/public/./../admin/x",
        "//admin/x",
    ] {
        assert_eq!(inst(p), (200, "admin-1".into(), "/admin/x".into()), "{p}");
    }
    assert_eq!(
        inst("/public//a/./b/../c"),
        (200, "public-1".into(), "/public/a/c".into())
    );
    // Encoded separators, climbing above the root, control bytes: refused.
    for p in [
        "/public/..%2fadmin",
        "/public/%2Fadmin",
        "/public/%5cadmin",
        "/../admin",
        "/public/%00x",
        "/public/%zz",
    ] {
        let (status, instance, _) = inst(p);
        assert_eq!((status, instance.as_str()), (400, ""), "{p}");
    }
}

#[test]
fn size_limits_slow_clients_and_connection_cap() {
    let g = start();
    let gw = g.gateway;
    // Too many headers, too large a head: 431 from the parser.
    let mut many = String::from("GET /public HTTP/1.1\r\nHost: x\r\n");
    for i in 0..30 {
        many.push_str(&format!("X-H{i}: v\r\n"));
    }
    many.push_str("\r\n");
    assert_eq!(raw_status(&raw(gw, many.as_bytes())), 431);
    let big = format!(
        "GET /public HTTP/1.1\r\nHost: x\r\nX-Big: {}\r\n\r\n",
        "a".repeat(4000)
    );
    let r = raw(gw, big.as_bytes());
    assert_eq!(raw_status(&r), 431, "{r}");
    assert_eq!(json_error(&r)["error"], "request_head_too_large");
    // The same count over HTTP/2 (curl, prior knowledge).
    let mut curl = std::process::Command::new("curl");
    curl.args(["-sS", "--max-time", "10", "--http2-prior-knowledge"]);
    for i in 0..30 {
        curl.args(["-H", &format!("x-h{i}: v")]);
    }
    let o = curl.arg(format!("http://{gw}/public")).output().unwrap();
    let body = String::from_utf8_lossy(&o.stdout);
    assert!(
        body.contains("\"error\":\"request_head_too_large\""),
        "{body}"
    );
    // Body over the route's limit: 413, announced or streamed.
    let r = http(
        gw,
        "POST",
        "/upload",
        &[],
        Some(&"x".repeat(101)),
        Duration::from_secs(5),
    )
    .unwrap();
    assert_eq!(r.status, 413);
    assert_eq!(r.json()["error"], "body_too_large");
    let chunked = format!("POST /upload HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\nConnection: close\r\n\r\n80\r\n{}\r\n0\r\n\r\n", "y".repeat(128));
    assert_eq!(raw_status(&raw(gw, chunked.as_bytes())), 413);
    assert_eq!(
        post(gw, "/upload", "small", Duration::from_secs(5)).status,
        200
    );

    // Slowloris: a head that never completes is cut off after header_read_timeout_ms, with a
    // JSON 408.
    let mut s = TcpStream::connect(gw).unwrap();
    s.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
    s.write_all(b"GET /public HTTP/1.1\r\nHost: x\r\nX-Slow: ")
        .unwrap();
    let t = Instant::now();
    let mut buf = Vec::new();
    let _ = s.read_to_end(&mut buf);
    let waited = t.elapsed();
    assert!(
        waited >= Duration::from_millis(400) && waited < Duration::from_secs(3),
        "{waited:?}"
    );
    let r = String::from_utf8_lossy(&buf).into_owned();
    assert_eq!(raw_status(&r), 408, "{r}");
    assert_eq!(json_error(&r)["error"], "header_read_timeout");

    // Connection cap: with 40 connections open, the next one gets a 503 and is closed at once.
    let held: Vec<TcpStream> = (0..40)
        .map(|_| {
            let c = TcpStream::connect(gw).unwrap();
            // Keep each one busy-but-valid: a complete keep-alive request.
            let mut c2 = c.try_clone().unwrap();
            c2.write_all(b"GET /public HTTP/1.1\r\nHost: x\r\n\r\n")
                .unwrap();
            c
        })
        .collect();
    std::thread::sleep(Duration::from_millis(200));
    let mut extra = TcpStream::connect(gw).unwrap();
    extra
        .set_read_timeout(Some(Duration::from_secs(3)))
        .unwrap();
    let mut got = Vec::new();
    let mut buf = [0u8; 1024];
    // Whatever came before the close (a reset may follow the answer).
    while let Ok(n) = extra.read(&mut buf) {
        if n == 0 {
            break;
        }
        got.extend_from_slice(&buf[..n]);
    }
    let r = String::from_utf8_lossy(&got).into_owned();
    assert_eq!(raw_status(&r), 503, "the 41st connection: {r}");
    assert_eq!(json_error(&r)["error"], "max_connections");
    assert!(r.to_ascii_lowercase().contains("retry-after: 1"), "{r}");
    drop(held);
    std::thread::sleep(Duration::from_millis(300));
    assert_eq!(g.get("/public").status, 200);
    let m = g.metrics();
    assert!(
        m.contains("gantry_gateway_rejected_requests_total{reason=\"max_connections\"}"),
        "{m}"
    );
}

/// A refused request, or one answered without reading its body, is still answered while the
/// client keeps sending: the gateway half-closes and reads on for a while (lingering close), so
/// the client sees the answer and then a clean end of stream, not a connection reset (a close
/// with unread bytes in the socket resets it, and a reset can take an unread answer with it).
#[test]
fn answers_reach_clients_that_are_still_sending() {
    let g = start();
    for (head, status) in [
        // Refused before routing: two lengths.
        (
            "POST /public HTTP/1.1\r\nHost: x\r\nContent-Length: 2097152\r\nContent-Length: 2097152\r\n\r\n",
            400,
        ),
        // No route: answered at once, the body never read (too large to drain).
        (
            "POST /nowhere HTTP/1.1\r\nHost: x\r\nContent-Length: 2097152\r\n\r\n",
            404,
        ),
    ] {
        let mut s = TcpStream::connect(g.gateway).unwrap();
        s.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
        // The head and the first part of the body in one write, so body bytes are in the
        // gateway's socket before it answers.
        let chunk = vec![b'x'; 64 * 1024];
        let mut first = head.as_bytes().to_vec();
        first.extend_from_slice(&chunk);
        s.write_all(&first).unwrap();
        let mut w = s.try_clone().unwrap();
        let writer = std::thread::spawn(move || {
            // Slower than the gateway reads, so the client is still sending when it answers.
            for _ in 0..3 {
                std::thread::sleep(Duration::from_millis(100));
                if w.write_all(&chunk).is_err() {
                    break;
                }
            }
        });
        let mut out = Vec::new();
        let mut buf = [0u8; 4096];
        let started = Instant::now();
        let end = loop {
            assert!(started.elapsed() < Duration::from_secs(10), "no end of stream");
            match s.read(&mut buf) {
                Ok(0) => break Ok(()),
                Ok(n) => out.extend_from_slice(&buf[..n]),
                Err(e) => break Err(e),
            }
        };
        let text = String::from_utf8_lossy(&out);
        assert_eq!(raw_status(&text), status, "{head:?}: {text}");
        assert!(json_error(&text)["error"].is_string(), "{text}");
        assert!(end.is_ok(), "{head:?}: reset instead of a clean close: {end:?}");
        writer.join().unwrap();
    }
}
