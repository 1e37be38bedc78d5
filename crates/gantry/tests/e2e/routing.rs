//! Routing: precedence, rewrites, redirects, header changes, versions (header, path, splits),
//! mirroring, sticky and latency-aware balancing, the response cache, hot reload under load,
//! access log and trace context.
use std::collections::BTreeMap;
use std::time::{Duration, Instant};

use serde_json::json;

use crate::common::*;

#[test]
fn matching_precedence_rewrites_redirects_and_header_changes() {
    let g = Gantry::start(
        r#"
[services.a]
command = ["{TESTSVC}"]
[[services.a.routes]]
path_prefix = "/"
[[services.a.routes]]
path = "/exact"
[[services.a.routes]]
path_regex = "^/v[0-9]+/items$"
rewrite_regex = { pattern = "^/v([0-9]+)/items$", replacement = "/items/version-$1" }
[[services.a.routes]]
path_prefix = "/old"
redirect = { prefix = "/new", status = 308 }
[[services.a.routes]]
path_prefix = "/api"
rewrite_prefix = "/internal/api"
request_headers = { set = { "x-from" = "gantry" }, remove = ["x-secret"] }
response_headers = { set = { "x-served-by" = "gantry" }, add = { "cache-control" = "no-store" } }

[services.b]
command = ["{TESTSVC}"]
[[services.b.routes]]
path_prefix = "/api"
methods = ["POST"]
[[services.b.routes]]
path_prefix = "/api"
headers = [{ name = "x-canary", value = "1" }]
[[services.b.routes]]
hosts = ["*.example.com"]
path_prefix = "/"
[[services.b.routes]]
path_prefix = "/api"
query = [{ name = "beta", regex = "^(1|true)$" }]
"#,
    );
    g.wait_healthy("a", 1, Duration::from_secs(20));
    g.wait_healthy("b", 1, Duration::from_secs(20));
    let inst = |r: &Resp| r.json()["instance"].as_str().unwrap().to_string();
    let get_h = |path: &str, h: &[(&str, &str)]| {
        http(g.gateway, "GET", path, h, None, Duration::from_secs(5)).unwrap()
    };

    // Fallback, exact, regex with rewrite.
    assert_eq!(inst(&g.get("/anything")), "a-1");
    assert_eq!(g.get("/exact").json()["path"], "/exact");
    assert_eq!(g.get("/v7/items").json()["path"], "/items/version-7");
    // Redirect keeps the rest of the path and the query.
    let r = get_h("/old/x/y?q=1", &[]);
    assert_eq!(r.status, 308);
    assert_eq!(
        r.header("location"),
        Some(format!("http://{}/new/x/y?q=1", g.gateway).as_str())
    );
    // Method, header and query conditions outrank the plain /api prefix.
    let plain = get_h("/api/users", &[("x-secret", "s3")]);
    assert_eq!(inst(&plain), "a-1");
    let v = plain.json();
    assert_eq!(v["path"], "/internal/api/users");
    // The bare prefix becomes the replacement itself, as Envoy's prefix_rewrite does.
    assert_eq!(get_h("/api", &[]).json()["path"], "/internal/api");
    assert_eq!(get_h("/api/", &[]).json()["path"], "/internal/api/");
    assert_eq!(v["headers"]["x-from"], "gantry");
    assert!(v["headers"].get("x-secret").is_none());
    assert_eq!(plain.header("x-served-by"), Some("gantry"));
    assert!(plain
        .headers
        .iter()
        .any(|(k, v)| k.eq_ignore_ascii_case("cache-control") && v == "no-store"));
    let posted = post(g.gateway, "/api/users", "{}", Duration::from_secs(5));
    assert_eq!(inst(&posted), "b-1");
    assert_eq!(inst(&get_h("/api/users", &[("x-canary", "1")])), "b-1");
    assert_eq!(inst(&get_h("/api/users", &[("x-canary", "2")])), "a-1");
    assert_eq!(inst(&get_h("/api/users?beta=true", &[])), "b-1");
    assert_eq!(inst(&get_h("/api/users?beta=no", &[])), "a-1");
    // Wildcard host beats any-host routes.
    let raw_resp = raw(
        g.gateway,
        b"GET /anything HTTP/1.1\r\nHost: shop.example.com\r\nConnection: close\r\n\r\n",
    );
    assert!(raw_resp.contains("\"instance\":\"b-1\""), "{raw_resp}");
    let raw_resp = raw(
        g.gateway,
        b"GET /anything HTTP/1.1\r\nHost: example.com\r\nConnection: close\r\n\r\n",
    );
    assert!(
        raw_resp.contains("\"instance\":\"a-1\""),
        "bare domain is not *.example.com: {raw_resp}"
    );
    // The admin API lists routes in precedence order.
    let routes = g.admin_get("/v1/routes");
    let order: Vec<&str> = routes
        .as_array()
        .unwrap()
        .iter()
        .map(|r| r["id"].as_str().unwrap())
        .collect();
    assert_eq!(order[0], "b/2", "{order:?}");
    assert_eq!(*order.last().unwrap(), "a/0", "{order:?}");
}

/// Two self-registered instances of `api`, versions 1.4.0 and 2.1.0.
fn two_versions(g: &Gantry) -> (OwnSvc, OwnSvc) {
    let v1 = OwnSvc::start("v1", &[]);
    let v2 = OwnSvc::start("v2", &[]);
    for (s, v, id) in [(&v1, "1.4.0", "api-one"), (&v2, "2.1.0", "api-two")] {
        let r = g.admin_call(
            "POST",
            "/v1/registry/instances",
            Some(
                &json!({"service": "api", "id": id, "port": s.port, "version": v, "ttl_ms": 60000}),
            ),
        );
        assert_eq!(r.status, 201, "{}", r.body);
    }
    (v1, v2)
}

#[test]
fn versions_by_header_path_and_weighted_split_and_their_cache_entries() {
    let g = Gantry::start(
        r#"
[services.api]
command = ["{TESTSVC}"]
replicas = 0
[[services.api.routes]]
path_prefix = "/api"
strip_prefix = true
version_header = "accept-version"
version_from_path = true
split = [{ version = "^1", weight = 80 }, { version = "^2", weight = 20 }]
cache = {}
[[services.api.routes]]
path_prefix = "/stable"
strip_prefix = true
version = "~1.4"
[[services.api.routes]]
path_prefix = "/canary"
strip_prefix = true
split = [{ version = "^1", weight = 50 }, { version = "^3", weight = 50 }]
"#,
    );
    let (_v1, _v2) = two_versions(&g);
    let inst = |r: Resp| r.json()["instance"].as_str().unwrap().to_string();
    // A pinned route.
    assert!((0..5).all(|_| inst(g.get("/stable/x")) == "v1"));
    // The client picks a version by header...
    let h = |v: &str| {
        http(
            g.gateway,
            "GET",
            "/api/x",
            &[("accept-version", v)],
            None,
            Duration::from_secs(5),
        )
        .unwrap()
    };
    assert!((0..5).all(|_| inst(h("^2")) == "v2"));
    assert!((0..5).all(|_| inst(h("1.4")) == "v1"));
    let none = h(">=3");
    assert_eq!(none.status, 503);
    assert_eq!(none.json()["error"], "no_matching_version");
    assert_eq!(h("not a version").status, 400);
    // ...or by path segment, which is removed before forwarding.
    let r = g.get("/api/v2/items?x=1");
    assert_eq!(r.json()["instance"], "v2");
    assert_eq!(r.json()["path"], "/items");
    assert_eq!(r.json()["query"], "x=1");
    assert_eq!(g.get("/api/v1/items").json()["instance"], "v1");
    // Otherwise the weighted split decides: 80/20 within a statistical bound.
    let n = 1000;
    let mut count: BTreeMap<String, usize> = BTreeMap::new();
    for _ in 0..n {
        *count.entry(inst(g.get("/api/items"))).or_default() += 1;
    }
    let v2 = count.get("v2").copied().unwrap_or(0) as f64 / n as f64;
    println!("split 80/20 over {n}: {count:?}");
    // sd = sqrt(0.2*0.8/1000) = 1.3%: 5 sd either way.
    assert!((v2 - 0.2).abs() < 0.065, "v2 share {v2}");

    let x_cache = |r: &Resp| r.header("x-cache").unwrap_or("").to_string();
    // The same path for two versions: two cache entries, never one version's answer for the
    // other's clients.
    assert_eq!(x_cache(&g.get("/api/v1/cacheable")), "MISS");
    assert_eq!(x_cache(&g.get("/api/v1/cacheable")), "HIT");
    assert_eq!(x_cache(&g.get("/api/v2/cacheable")), "MISS");
    assert_eq!(x_cache(&g.get("/api/v2/cacheable")), "HIT");
    let by_header = |v: &str| {
        http(
            g.gateway,
            "GET",
            "/api/cacheable",
            &[("accept-version", v)],
            None,
            Duration::from_secs(5),
        )
        .unwrap()
    };
    assert_eq!(x_cache(&by_header("^2")), "MISS");
    assert_eq!(x_cache(&by_header("^2")), "HIT");
    // A canary share whose version has no instance goes to the live one instead of failing.
    for _ in 0..40 {
        let r = g.get("/canary/x");
        assert_eq!(r.status, 200, "{}", r.body);
        assert_eq!(r.json()["instance"], "v1");
    }
}

/// FNV-1a 64 of `b`, hex: what the test service's `/digest` answers.
fn fnv1a(b: &[u8]) -> String {
    format!("{:016x}", fnv1a_u64(b))
}

fn fnv1a_u64(b: &[u8]) -> u64 {
    b.iter().fold(0xcbf2_9ce4_8422_2325u64, |h, &x| {
        (h ^ u64::from(x)).wrapping_mul(0x0100_0000_01b3)
    })
}

#[test]
fn mirroring_copies_traffic_and_bodies_and_abandons_a_shadow_that_falls_behind() {
    use std::io::{Read, Write};
    // The shadow waits 1.5 s before it reads anything.
    let shadow = OwnSvc::start("shadow", &[("TESTSVC_DELAY_ALL_MS", "1500")]);
    let primary = OwnSvc::start("primary", &[]);
    let g = Gantry::start(&format!(
        r#"
[services.api]
endpoints = ["127.0.0.1:{}"]
[[services.api.routes]]
path_prefix = "/"
mirror = {{ service = "shadow", percent = 100 }}
max_body_bytes = 67108864
[services.shadow]
endpoints = ["127.0.0.1:{}"]
"#,
        primary.port, shadow.port
    ));
    // Requests without a body: copied, and the slow shadow delays nothing.
    let t = Instant::now();
    for _ in 0..5 {
        let r = g.get("/m");
        assert_eq!(r.json()["instance"], "primary");
    }
    assert!(
        t.elapsed() < Duration::from_millis(1000),
        "the slow shadow delayed the primary: {:?}",
        t.elapsed()
    );
    wait_for("shadow got the copies", Duration::from_secs(10), || {
        (shadow.stats()["requests"] == 5).then_some(())
    });
    // Bodies with a length: the primary answers at once, the shadow gets the same bytes.
    let body: String = (0..100_000)
        .map(|i| (b'a' + (i % 26) as u8) as char)
        .collect();
    let t = Instant::now();
    for _ in 0..3 {
        let r = post(g.gateway, "/digest", &body, Duration::from_secs(5));
        assert_eq!(r.status, 200, "{}", r.body);
        assert_eq!(r.json()["instance"], "primary");
        assert_eq!(r.json()["digest"], fnv1a(body.as_bytes()));
    }
    // A chunked body (the copy is re-framed for the shadow).
    let mut s = std::net::TcpStream::connect(g.gateway).unwrap();
    s.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
    s.write_all(
        b"POST /digest HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\nConnection: close\r\n\r\n\
          5\r\nhello\r\n6\r\n world\r\n0\r\n\r\n",
    )
    .unwrap();
    let mut out = String::new();
    let _ = s.read_to_string(&mut out);
    assert!(out.starts_with("HTTP/1.1 200"), "{out}");
    assert!(out.contains(&fnv1a(b"hello world")), "{out}");
    assert!(
        t.elapsed() < Duration::from_millis(1400),
        "the slow shadow delayed the primary: {:?}",
        t.elapsed()
    );
    wait_for("shadow read the copies", Duration::from_secs(15), || {
        (shadow.stats()["bodies"] == 4).then_some(())
    });
    let st = shadow.stats();
    assert_eq!(st["body_bytes"], 3 * 100_000 + 11, "{st}");
    // The same bytes, not only as many: the digests of the four copies, added.
    let sum = (0..3).fold(fnv1a_u64(b"hello world"), |acc, _| {
        acc.wrapping_add(fnv1a_u64(body.as_bytes()))
    });
    assert_eq!(st["digest_sum"], format!("{sum:016x}"), "{st}");

    // A body far larger than what the shadow's socket and the copy's buffer hold while the
    // shadow is not reading: the primary still gets all of it at its own pace, and the copy is
    // abandoned (the shadow never sees a truncated body as a whole one).
    let big: String = "x".repeat(32 << 20);
    let t = Instant::now();
    let r = post(g.gateway, "/digest", &big, Duration::from_secs(10));
    let took = t.elapsed();
    assert_eq!(r.status, 200, "{}", r.body);
    assert_eq!(r.json()["bytes"], 32 << 20);
    assert!(
        took < Duration::from_millis(1400),
        "the shadow held the primary back: {took:?}"
    );
    wait_for(
        "the copy counted as abandoned",
        Duration::from_secs(40),
        || {
            g.metrics()
            .contains(r#"gantry_gateway_mirrored_requests_total{route="api/0",service="api",outcome="abandoned"} 1"#)
            .then_some(())
        },
    );
    let m = g.metrics();
    assert!(
        m.contains(r#"gantry_gateway_mirrored_requests_total{route="api/0",service="api",outcome="answered"} 9"#),
        "{m}"
    );
    let st = shadow.stats();
    assert_eq!(
        st["bodies"], 4,
        "no truncated body reached the shadow: {st}"
    );
    assert_eq!(primary.stats()["bodies"], 5);
}

#[test]
fn sticky_hashing_keeps_users_on_their_instance() {
    let g = Gantry::start(
        r#"
[services.sticky]
command = ["{TESTSVC}"]
replicas = 3
upstream = { load_balancer = "hash", hash_on = "header:x-user" }
[[services.sticky.routes]]
path_prefix = "/sticky"
"#,
    );
    g.wait_healthy("sticky", 3, Duration::from_secs(20));
    let by_user = |u: &str| {
        http(
            g.gateway,
            "GET",
            "/sticky",
            &[("x-user", u)],
            None,
            Duration::from_secs(5),
        )
        .unwrap()
        .json()["instance"]
            .as_str()
            .unwrap()
            .to_string()
    };
    let mut used = std::collections::BTreeSet::new();
    for u in 0..30 {
        let user = format!("user-{u}");
        let first = by_user(&user);
        assert!((0..3).all(|_| by_user(&user) == first), "{user} moved");
        used.insert(first);
    }
    assert_eq!(used.len(), 3, "users spread over all instances: {used:?}");
}

#[test]
fn latency_aware_balancing_avoids_a_slow_instance() {
    let slow = OwnSvc::start("slow", &[("TESTSVC_DELAY_ALL_MS", "40")]);
    let fast = OwnSvc::start("fast", &[]);
    let g = Gantry::start(&format!(
        r#"
[services.api]
endpoints = ["127.0.0.1:{}", "127.0.0.1:{}"]
[[services.api.routes]]
path_prefix = "/"
"#,
        slow.port, fast.port
    ));
    let gw = g.gateway;
    let workers: Vec<_> = (0..4)
        .map(|_| {
            std::thread::spawn(move || {
                for _ in 0..50 {
                    http(gw, "GET", "/x", &[], None, Duration::from_secs(10)).unwrap();
                }
            })
        })
        .collect();
    for w in workers {
        w.join().unwrap();
    }
    let (s, f) = (
        slow.stats()["requests"].as_u64().unwrap(),
        fast.stats()["requests"].as_u64().unwrap(),
    );
    println!("p2c-ewma: slow instance {s}, fast instance {f}");
    assert_eq!(s + f, 200);
    assert!(s < 40, "the slow instance got {s} of 200");
}

#[test]
fn response_cache_hit_miss_and_revalidation() {
    let g = Gantry::start(
        r#"
[services.web]
command = ["{TESTSVC}"]
[[services.web.routes]]
path_prefix = "/"
cache = {}
"#,
    );
    g.wait_healthy("web", 1, Duration::from_secs(20));
    let addr = g.instance_addr("web", "web-1");
    let stats = || {
        http(
            addr,
            "GET",
            "/admin/stats",
            &[],
            None,
            Duration::from_secs(2),
        )
        .unwrap()
        .json()
    };
    let a = g.get("/cacheable?max_age=1&etag=e1");
    assert_eq!(a.header("x-cache"), Some("MISS"));
    let b = g.get("/cacheable?max_age=1&etag=e1");
    assert_eq!(b.header("x-cache"), Some("HIT"));
    assert_eq!(a.body, b.body);
    assert!(b.header("age").is_some());
    assert_eq!(stats()["requests"], 1, "the hit did not reach the instance");
    // A client's own conditional request is answered from the cache.
    let c = http(
        g.gateway,
        "GET",
        "/cacheable?max_age=1&etag=e1",
        &[("if-none-match", "\"e1\"")],
        None,
        Duration::from_secs(2),
    )
    .unwrap();
    assert_eq!(c.status, 304);
    // After max-age: revalidated with If-None-Match, the instance says 304, the body is reused.
    std::thread::sleep(Duration::from_millis(1100));
    let d = g.get("/cacheable?max_age=1&etag=e1");
    assert_eq!(d.status, 200);
    assert_eq!(d.header("x-cache"), Some("REVALIDATED"));
    assert_eq!(d.body, a.body);
    assert_eq!(stats()["revalidations"], 1);
    // Uncacheable answers are not stored; other URLs are separate entries.
    assert_eq!(g.get("/plain").header("x-cache"), Some("MISS"));
    assert_eq!(g.get("/plain").header("x-cache"), Some("MISS"));
    assert_eq!(
        g.get("/cacheable?max_age=60&etag=e2").header("x-cache"),
        Some("MISS")
    );
    let m = g.metrics();
    assert!(
        m.contains("gantry_gateway_cache_total{reason=\"hit\"}"),
        "{m}"
    );
}

#[test]
fn hundred_route_changes_under_load_drop_nothing() {
    let base = format!(
        r#"
[services.web]
command = ["{{TESTSVC}}"]
replicas = 2
[[services.web.routes]]
path_prefix = "/live"
strip_prefix = true
[services.ws]
command = ["python3", "-u", "{}"]
health = {{ type = "http", path = "/health" }}
[[services.ws.routes]]
path_prefix = "/ws"
strip_prefix = true
"#,
        fixture("ws_echo.py")
    );
    let g = Gantry::start(&base);
    g.wait_healthy("web", 2, Duration::from_secs(20));
    g.wait_healthy("ws", 1, Duration::from_secs(30));
    // Load on new connections, requests on one kept-alive connection, and a WebSocket, all
    // across the 100 changes.
    let load = Load::start(g.gateway, "/live/x", 3, 1_000_000);
    let stop = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
    let keepalive = {
        let (gw, stop) = (g.gateway, stop.clone());
        std::thread::spawn(move || keepalive_gets(gw, "/live/k", &stop, 100_000))
    };
    let mut ws = std::process::Command::new("python3")
        .args([
            &fixture("ws_client.py"),
            &format!("ws://{}/ws/chat", g.gateway),
            "400",
            "0.02",
        ])
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    std::thread::sleep(Duration::from_millis(500));
    for i in 0..100 {
        let spec = format!("{base}[[services.web.routes]]\npath_prefix = \"/extra{i}\"\nheaders = [{{ name = \"x-n\", value = \"{i}\" }}]\n");
        let report = g.rewrite_and_reload(&spec);
        // The spec's routes and the bus's (`/_gantry/topics`).
        assert_eq!(report["routes"], 4);
        assert!(
            report["needs_restart"].as_array().unwrap().is_empty(),
            "{report}"
        );
    }
    assert!(
        ws.try_wait().unwrap().is_none(),
        "the WebSocket client must still be running after the 100 changes"
    );
    stop.store(true, std::sync::atomic::Ordering::Relaxed);
    let kept = keepalive.join().unwrap();
    let ws_out = ws.wait_with_output().unwrap();
    let ws_stdout = String::from_utf8_lossy(&ws_out.stdout);
    assert!(
        ws_out.status.success(),
        "{ws_stdout}{}",
        String::from_utf8_lossy(&ws_out.stderr)
    );
    assert_eq!(
        ws_stdout
            .lines()
            .filter(|l| l.starts_with("ws-1:m"))
            .count(),
        400,
        "every message on the one WebSocket"
    );
    let kept = kept.unwrap_or_else(|e| panic!("the kept-alive connection failed: {e}"));
    println!("hot reload: {kept} requests on one kept-alive connection");
    assert!(kept > 50, "{kept}");
    let (ok, failed) = load.finish();
    println!(
        "hot reload: 100 route changes, {ok} requests ok, {} failed",
        failed.len()
    );
    assert!(failed.is_empty(), "{:?}", &failed[..failed.len().min(3)]);
    assert!(ok > 100);
    // The last route is live; a bad spec is refused and changes nothing.
    assert_eq!(
        http(
            g.gateway,
            "GET",
            "/extra99",
            &[("x-n", "99")],
            None,
            Duration::from_secs(5)
        )
        .unwrap()
        .status,
        200
    );
    std::fs::write(
        &g.spec,
        spec_text("[services.web]\ncommand = [\"{TESTSVC}\"]\nbogus = 1\n"),
    )
    .unwrap();
    let r = g.admin_call("POST", "/v1/reload", None);
    assert_eq!(r.status, 400);
    assert!(r.json()["message"].as_str().unwrap().contains("bogus"));
    assert_eq!(g.get("/live/x").status, 200);
}

#[test]
fn access_log_and_trace_context() {
    let dir = tempfile::tempdir().unwrap();
    let spec = dir.path().join("gantry.toml");
    let text = spec_text(
        "[services.web]\ncommand = [\"{TESTSVC}\"]\n[[services.web.routes]]\npath_prefix = \"/\"\n",
    )
    .replace("workers = 2", "workers = 2\naccess_log = true");
    std::fs::write(&spec, text).unwrap();
    let g = Gantry::start_at(dir, spec);
    g.wait_healthy("web", 1, Duration::from_secs(20));
    // A valid traceparent keeps its trace id; the parent id is the gateway's own.
    let tp = "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01";
    let r = http(
        g.gateway,
        "GET",
        "/traced",
        &[("traceparent", tp), ("x-request-id", "rid-42")],
        None,
        Duration::from_secs(5),
    )
    .unwrap();
    let up = r.json()["headers"]["traceparent"]
        .as_str()
        .unwrap()
        .to_string();
    assert!(
        up.starts_with("00-4bf92f3577b34da6a3ce929d0e0e4736-"),
        "{up}"
    );
    assert!(!up.contains("00f067aa0ba902b7"));
    // Without one, a new trace starts.
    let r = g.get("/untraced");
    let up2 = r.json()["headers"]["traceparent"]
        .as_str()
        .unwrap()
        .to_string();
    assert_eq!(up2.len(), 55);
    assert!(!up2.contains("4bf92f3577b34da6a3ce929d0e0e4736"));
    // One JSON access-log line per request.
    let line = wait_for("access log line", Duration::from_secs(5), || {
        g.output()
            .lines()
            .find(|l| l.contains("\"request_id\":\"rid-42\""))
            .map(str::to_string)
    });
    let v: serde_json::Value = serde_json::from_str(&line).unwrap();
    assert_eq!(v["type"], "access");
    assert_eq!(v["trace_id"], "4bf92f3577b34da6a3ce929d0e0e4736");
    assert_eq!(v["route"], "web/0");
    assert_eq!(v["upstream"], "web-1");
    assert_eq!(v["status"], 200);
    assert_eq!(v["path"], "/traced");
    assert!(v["bytes"].as_u64().unwrap() > 0);
    assert!(v["duration_ms"].as_f64().is_some());
}

#[test]
fn routes_added_over_the_api_apply_at_once_and_persist() {
    let mut g = Gantry::start(
        r#"
[services.web]
command = ["{TESTSVC}"]
[[services.web.routes]]
path_prefix = "/web"
"#,
    );
    g.wait_healthy("web", 1, Duration::from_secs(20));
    assert_eq!(g.get("/beta/x").status, 404);
    let out = g.cli(&[
        "route",
        "put",
        "beta",
        "--service",
        "web",
        "--path-prefix",
        "/beta",
        "--strip-prefix",
        "--json",
        r#"{"methods":["GET"]}"#,
    ]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let r = g.get("/beta/x");
    assert_eq!(r.status, 200);
    assert_eq!(r.json()["path"], "/x");
    assert!(g
        .admin_get("/v1/routes")
        .as_array()
        .unwrap()
        .iter()
        .any(|r| r["id"] == "api/beta"));
    // Bad routes are refused with the field named; duplicates conflict.
    let bad = g.admin_call(
        "PUT",
        "/v1/routes/bad",
        Some(&json!({"service": "web", "route": {"path_prefix": "nope"}})),
    );
    assert_eq!(bad.status, 400);
    assert!(
        bad.json()["message"]
            .as_str()
            .unwrap()
            .contains("path_prefix"),
        "{}",
        bad.body
    );
    let bad = g.admin_call(
        "PUT",
        "/v1/routes/bad",
        Some(&json!({"service": "ghost", "route": {}})),
    );
    assert_eq!(bad.status, 400);
    let bad = g.admin_call(
        "PUT",
        "/v1/routes/bad",
        Some(&json!({"service": "web", "route": {"bogus": 1}})),
    );
    assert_eq!(bad.status, 400);
    assert!(
        bad.json()["message"].as_str().unwrap().contains("bogus"),
        "{}",
        bad.body
    );
    let dup = g.admin_call(
        "PUT",
        "/v1/routes/dup",
        Some(&json!({"service": "web", "route": {"path_prefix": "/web"}})),
    );
    assert_eq!(dup.status, 409, "{}", dup.body);
    // Kept across a restart of gantry, and across spec reloads.
    assert_eq!(g.stop(), Some(0));
    g.launch();
    g.wait_healthy("web", 1, Duration::from_secs(20));
    assert_eq!(g.get("/beta/x").status, 200);
    g.admin_call("POST", "/v1/reload", None);
    assert_eq!(g.get("/beta/x").status, 200);
    let out = g.cli(&["route", "rm", "beta"]);
    assert!(out.status.success());
    assert_eq!(g.get("/beta/x").status, 404);
    assert_eq!(g.admin_call("DELETE", "/v1/routes/beta", None).status, 404);
}

#[test]
fn request_ids_trace_context_and_forwarding_headers_can_be_turned_off() {
    let dir = tempfile::tempdir().unwrap();
    let spec = dir.path().join("gantry.toml");
    let text = spec_text(
        "[services.web]\ncommand = [\"{TESTSVC}\"]\n[[services.web.routes]]\npath_prefix = \"/\"\n",
    )
    .replace(
        "workers = 2",
        "workers = 2\nrequest_id = false\ntrace_context = false\nforwarded_headers = false",
    );
    std::fs::write(&spec, text).unwrap();
    let g = Gantry::start_at(dir, spec);
    g.wait_healthy("web", 1, Duration::from_secs(20));
    // Nothing added: the instance sees the client's headers only, the client gets no id.
    let r = g.get("/plain");
    assert_eq!(r.status, 200);
    let seen = &r.json()["headers"];
    for h in [
        "x-request-id",
        "traceparent",
        "x-forwarded-for",
        "x-forwarded-proto",
        "x-forwarded-host",
    ] {
        assert!(seen.get(h).is_none(), "{h} was added: {seen}");
    }
    assert!(r.header("x-request-id").is_none());
    // What the client sent passes as it was (a sane request id is still echoed back).
    let tp = "00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01";
    let r = http(
        g.gateway,
        "GET",
        "/sent",
        &[
            ("x-forwarded-for", "10.1.2.3"),
            ("traceparent", tp),
            ("x-request-id", "client-id-1"),
        ],
        None,
        Duration::from_secs(5),
    )
    .unwrap();
    let seen = &r.json()["headers"];
    assert_eq!(seen["x-forwarded-for"], "10.1.2.3");
    assert_eq!(seen["traceparent"], tp);
    assert_eq!(seen["x-request-id"], "client-id-1");
    assert_eq!(r.header("x-request-id"), Some("client-id-1"));
    // The gateway's own answers still carry an id.
    let r = http(
        g.gateway,
        "GET",
        "/web/../../x",
        &[],
        None,
        Duration::from_secs(5),
    )
    .unwrap();
    assert_eq!(r.status, 400, "{}", r.body);
    assert!(
        !r.json()["request_id"].as_str().unwrap().is_empty(),
        "{}",
        r.body
    );
    assert!(r.header("x-request-id").is_some());
}

#[test]
fn redirects_from_behind_a_stripped_prefix_lead_back_under_it() {
    let g = Gantry::start(
        r#"
[services.hb]
command = ["{TESTSVC}"]
[[services.hb.routes]]
path_prefix = "/hb"
strip_prefix = true
[[services.hb.routes]]
path_prefix = "/api"
rewrite_prefix = "/v2"
[[services.hb.routes]]
path_prefix = "/raw"
strip_prefix = true
rewrite_redirects = false
"#,
    );
    g.wait_healthy("hb", 1, Duration::from_secs(20));
    let location = |path: &str, host: &str| {
        let r = raw(
            g.gateway,
            format!("GET {path} HTTP/1.1\r\nHost: {host}\r\nConnection: close\r\n\r\n").as_bytes(),
        );
        assert_eq!(raw_status(&r), 302, "{path}: {r}");
        r.lines()
            .find_map(|l| {
                l.strip_prefix("location: ")
                    .or(l.strip_prefix("Location: "))
            })
            .unwrap_or_else(|| panic!("no Location: {r}"))
            .trim()
            .to_string()
    };
    // A path: back under the prefix the route stripped.
    assert_eq!(location("/hb/hop/1", "shop.test"), "/hb/hop/0");
    // An absolute URL on the host the client asked for (the instance saw it in Host).
    assert_eq!(
        location("/hb/hop/1?absolute=1", "shop.test:8080"),
        "http://shop.test:8080/hb/hop/0?absolute=1"
    );
    // The instance's own address means nothing to the client: the client's host instead.
    assert_eq!(
        location("/hb/hop/1?self=1", "shop.test:8080"),
        "http://shop.test:8080/hb/hop/0?self=1"
    );
    // A replaced prefix: what is under the replacement goes back under the route's prefix.
    assert_eq!(location("/api/hop/1", "shop.test"), "/api/hop/0");
    // Switched off: as the instance sent it.
    assert_eq!(location("/raw/hop/1", "shop.test"), "/hop/0");
    // A client that follows: three hops, each through the gateway, and it arrives.
    let out = std::process::Command::new("curl")
        .args(["-sS", "-L", "--max-time", "10", "--max-redirs", "5"])
        .arg(format!("http://{}/hb/hop/3?absolute=1", g.gateway))
        .output()
        .unwrap();
    let body = String::from_utf8_lossy(&out.stdout);
    assert!(out.status.success(), "{body}");
    assert!(body.contains("\"arrived\":\"/hop/0\""), "{body}");
    // The instance learns the prefix it is served under.
    let echo = g.get("/hb/echo").json();
    assert_eq!(echo["headers"]["x-forwarded-prefix"], "/hb", "{echo}");
    assert_eq!(echo["path"], "/echo");
    let echo = g.get("/api/echo").json();
    assert_eq!(echo["headers"]["x-forwarded-prefix"], "/api", "{echo}");
    assert_eq!(echo["path"], "/v2/echo");
    // A client's own X-Forwarded-Prefix is replaced, never passed beside the gateway's.
    let resp = raw(
        g.gateway,
        b"GET /hb/echo HTTP/1.1\r\nHost: shop.test\r\nX-Forwarded-Prefix: /evil\r\nConnection: close\r\n\r\n",
    );
    let body = resp.split_once("\r\n\r\n").unwrap().1;
    assert!(!body.contains("/evil"), "{body}");
    let echo: serde_json::Value = serde_json::from_str(body.trim()).unwrap();
    assert_eq!(echo["headers"]["x-forwarded-prefix"], "/hb", "{echo}");
}
