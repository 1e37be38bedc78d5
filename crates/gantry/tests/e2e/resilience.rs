//! Resilience under failure: chaos (kills and hangs under load), outlier ejection and the circuit
//! breaker, the retry budget, the bulkhead, timeouts, rate limits.
use std::sync::atomic::Ordering;
use std::time::{Duration, Instant};

use serde_json::json;

use crate::common::*;

#[test]
fn chaos_kills_and_hangs_under_load_fail_no_request() {
    let g = Gantry::start(
        r#"
[services.web]
command = ["{TESTSVC}"]
replicas = 4
health = { type = "http", path = "/health", interval_ms = 200, timeout_ms = 200, unhealthy_threshold = 2, unhealthy_restart_ms = 1000 }
backoff = { initial_ms = 50, max_ms = 200 }
[[services.web.routes]]
path_prefix = "/"
per_try_timeout_ms = 300
retries = { attempts = 3, on = ["connect-failure", "per-try-timeout"], budget_min_per_second = 100 }
"#,
    );
    g.wait_healthy("web", 4, Duration::from_secs(20));
    let load = Load::start(g.gateway, "/chaos", 4, 5000);
    wait_for("load running", Duration::from_secs(5), || {
        (load.ok.load(Ordering::Relaxed) > 100).then_some(())
    });
    // Six rounds: kill one instance or hang another, at pseudo-random, while requests flow.
    let mut seed = 0x2545_f491_u64;
    for round in 0..6 {
        seed ^= seed << 13;
        seed ^= seed >> 7;
        seed ^= seed << 17;
        let healthy: Vec<serde_json::Value> = g
            .instances("web")
            .into_iter()
            .filter(|i| i["state"] == "healthy")
            .collect();
        if healthy.len() >= 2 {
            let victim = &healthy[(seed as usize) % healthy.len()];
            if round % 2 == 0 {
                signal(victim["pid"].as_u64().unwrap() as u32, libc::SIGKILL);
            } else {
                let addr = format!("127.0.0.1:{}", victim["port"]).parse().unwrap();
                let _ = http(
                    addr,
                    "POST",
                    "/admin/hang",
                    &[],
                    None,
                    Duration::from_secs(2),
                );
            }
        }
        std::thread::sleep(Duration::from_millis(700));
    }
    std::thread::sleep(Duration::from_millis(500));
    let (ok, failed) = load.finish();
    println!("chaos: {ok} requests ok, {} failed", failed.len());
    assert!(ok > 200, "too little load got through: {ok}");
    assert!(
        failed.is_empty(),
        "{} failed requests, e.g. {:?}",
        failed.len(),
        &failed[..failed.len().min(3)]
    );
    let m = g.metrics();
    assert!(
        m.contains("gantry_gateway_retries_total{route=\"web/0\""),
        "retries were needed and counted"
    );
}

#[test]
fn failing_instance_is_ejected_and_failing_service_opens_its_circuit() {
    let g = Gantry::start(
        r#"
[services.web]
command = ["{TESTSVC}"]
replicas = 3
[services.web.upstream]
load_balancer = "round_robin"
circuit_breaker = { failure_rate = 0.5, min_requests = 10, window_ms = 10000, open_ms = 1000, half_open_requests = 1 }
outlier = { consecutive_failures = 3, base_ejection_ms = 60000, max_ejected_percent = 50 }
[[services.web.routes]]
path_prefix = "/"
retries = { attempts = 0 }
failure_statuses = [500]
"#,
    );
    let list = g.wait_healthy("web", 3, Duration::from_secs(20));
    let bad = list[0]["id"].as_str().unwrap().to_string();
    let bad_addr = g.instance_addr("web", &bad);
    http(
        bad_addr,
        "POST",
        "/admin/fail",
        &[],
        None,
        Duration::from_secs(2),
    )
    .unwrap();
    // Round robin sends every third request to the bad one: after 3 failures it is ejected.
    let mut failures = 0;
    for _ in 0..30 {
        if g.get("/x").status == 500 {
            failures += 1;
        }
    }
    assert_eq!(
        failures, 3,
        "exactly consecutive_failures requests reach the bad instance before ejection"
    );
    let route = g.first_route();
    let ep = route["endpoints"]
        .as_array()
        .unwrap()
        .iter()
        .find(|e| e["instance"] == bad.as_str())
        .unwrap()
        .clone();
    assert_eq!(ep["ejected"], true, "{ep}");
    // The gateway's passive signal reaches the registry: a `gateway` check at warning (the
    // instance's aggregate health with it), so discovery clients that want passing ones avoid it.
    let inst = wait_for(
        "the gateway check in the registry",
        Duration::from_secs(5),
        || {
            let i = g.admin_get(&format!("/v1/registry/instances/{bad}"));
            (i["health"] == "warning").then_some(i)
        },
    );
    let check = inst["checks"]
        .as_array()
        .unwrap()
        .iter()
        .find(|c| c["id"] == "gateway")
        .unwrap()
        .clone();
    assert_eq!(check["kind"], "passive", "{check}");
    assert!(
        check["output"].as_str().unwrap().contains("ejected"),
        "{check}"
    );
    let passing = g.admin_get("/v1/registry/services/web?health=passing");
    assert!(
        passing
            .as_array()
            .unwrap()
            .iter()
            .all(|i| i["id"] != bad.as_str()),
        "{passing}"
    );
    let m = g.metrics();
    assert!(
        m.contains(&format!(
            "gantry_gateway_ejections_total{{service=\"web\",instance=\"{bad}\"}} 1"
        )),
        "{m}"
    );

    // Now every instance fails: the cap keeps the others in (50% of 3 = 1 ejected), and the
    // service's failure rate opens the circuit: requests fail fast with 503.
    for i in &list[1..] {
        let a = g.instance_addr("web", i["id"].as_str().unwrap());
        http(a, "POST", "/admin/fail", &[], None, Duration::from_secs(2)).unwrap();
    }
    let mut statuses = Vec::new();
    for _ in 0..40 {
        statuses.push(g.get("/x").status);
    }
    let first_503 = statuses
        .iter()
        .position(|s| *s == 503)
        .expect("circuit never opened");
    // 3 of the first 30 failed; with everything failing the rate reaches 50% at about the 24th.
    assert!(
        first_503 <= 30,
        "opened after {first_503} requests: {statuses:?}"
    );
    assert!(
        statuses[first_503..].iter().all(|s| *s == 503),
        "{statuses:?}"
    );
    let r = g.get("/x");
    assert_eq!(r.json()["error"], "circuit_open");
    assert!(r.header("retry-after").is_some());
    assert_eq!(g.first_upstream()["circuit"], "open");
    // Recover: after open_ms a probe goes through and closes the circuit.
    for i in &list {
        let a = g.instance_addr("web", i["id"].as_str().unwrap());
        http(
            a,
            "POST",
            "/admin/recover",
            &[],
            None,
            Duration::from_secs(2),
        )
        .unwrap();
    }
    std::thread::sleep(Duration::from_millis(1100));
    wait_for("circuit closed", Duration::from_secs(5), || {
        (g.get("/x").status == 200 && g.first_upstream()["circuit"] == "closed").then_some(())
    });
}

#[test]
fn retry_budget_caps_extra_load() {
    let a = OwnSvc::start("a", &[]);
    let b = OwnSvc::start("b", &[]);
    for s in [&a, &b] {
        http(
            s.addr(),
            "POST",
            "/admin/fail",
            &[],
            None,
            Duration::from_secs(2),
        )
        .unwrap();
    }
    let g = Gantry::start(&format!(
        r#"
[services.web]
endpoints = ["127.0.0.1:{}", "127.0.0.1:{}"]
upstream = {{ outlier = {{ consecutive_failures = 0, failure_rate = 0.0 }}, circuit_breaker = {{ failure_rate = 0.0 }} }}
[[services.web.routes]]
path_prefix = "/"
retries = {{ attempts = 5, on = ["5xx"], backoff_base_ms = 1, backoff_max_ms = 2, budget_percent = 20, budget_min_per_second = 0 }}
"#,
        a.port, b.port
    ));
    let n = 200;
    for _ in 0..n {
        assert_eq!(g.get("/x").status, 500);
    }
    let attempts =
        a.stats()["requests"].as_u64().unwrap() + b.stats()["requests"].as_u64().unwrap();
    println!("retry budget: {n} requests caused {attempts} upstream attempts");
    // Without a budget: up to 2 attempts each (two instances) = 400. With 20%: at most 240.
    assert!(attempts >= n as u64, "{attempts}");
    assert!(
        attempts <= (n as f64 * 1.2).ceil() as u64 + 2,
        "retry budget exceeded: {attempts} attempts for {n} requests"
    );
}

#[test]
fn bulkhead_timeouts_and_rate_limits() {
    let g = Gantry::start(
        r#"
[services.slow]
command = ["{TESTSVC}"]
upstream = { max_concurrent_requests = 2 }
[[services.slow.routes]]
path_prefix = "/slow"
timeout_ms = 5000
[[services.slow.routes]]
path_prefix = "/tight"
strip_prefix = true
timeout_ms = 300
[[services.slow.routes]]
path_prefix = "/limited"
strip_prefix = true
rate_limit = { requests_per_second = 2, burst = 3 }
"#,
    );
    g.wait_healthy("slow", 1, Duration::from_secs(20));
    // Bulkhead: 2 in flight allowed, the rest refused at once with 503 + Retry-After.
    let gw = g.gateway;
    let hold: Vec<_> = (0..2)
        .map(|_| {
            std::thread::spawn(move || {
                http(
                    gw,
                    "GET",
                    "/slow?ms=1500",
                    &[],
                    None,
                    Duration::from_secs(10),
                )
                .unwrap()
                .status
            })
        })
        .collect();
    std::thread::sleep(Duration::from_millis(300));
    let t = Instant::now();
    let r = g.get("/slow?ms=10");
    assert_eq!(r.status, 503, "{}", r.body);
    assert_eq!(r.json()["error"], "concurrency_limit");
    assert!(r.header("retry-after").is_some());
    assert!(t.elapsed() < Duration::from_millis(500), "refused quickly");
    for h in hold {
        assert_eq!(h.join().unwrap(), 200);
    }
    assert_eq!(g.get("/slow?ms=10").status, 200);

    // Request timeout: 504 after the route's timeout, not the instance's answer.
    let t = Instant::now();
    let r = g.get("/tight/slow?ms=2000");
    assert_eq!(r.status, 504);
    assert!(
        t.elapsed() < Duration::from_millis(1500),
        "{:?}",
        t.elapsed()
    );

    // Rate limit: burst of 3, then 429 with headers.
    let mut statuses = Vec::new();
    let mut last = None;
    for _ in 0..5 {
        let r = g.get("/limited/x");
        statuses.push(r.status);
        last = Some(r);
    }
    assert_eq!(statuses, [200, 200, 200, 429, 429]);
    // Each refusal counted once.
    let m = g.metrics();
    assert!(
        m.contains(
            "gantry_gateway_requests_total{route=\"slow/2\",service=\"slow\",status=\"4xx\"} 2"
        ),
        "{m}"
    );
    let r = last.unwrap();
    assert_eq!(r.json()["error"], "rate_limited");
    assert_eq!(r.header("ratelimit-limit"), Some("3"));
    assert_eq!(r.header("ratelimit-remaining"), Some("0"));
    assert_eq!(r.header("retry-after"), Some("1"));
    std::thread::sleep(Duration::from_millis(600));
    assert_eq!(
        g.get("/limited/x").status,
        200,
        "a token came back after half a second at 2/s"
    );
}

#[test]
fn active_health_checks_take_failing_external_instances_out() {
    let a = OwnSvc::start("a", &[]);
    let b = OwnSvc::start("b", &[]);
    let g = Gantry::start(
        r#"
[services.ext]
command = ["{TESTSVC}"]
replicas = 0
upstream = { load_balancer = "round_robin", active_health = { path = "/health", interval_ms = 100, timeout_ms = 200, unhealthy_threshold = 2 } }
[[services.ext.routes]]
path_prefix = "/"
"#,
    );
    for (s, id) in [(&a, "ext-a"), (&b, "ext-b")] {
        let r = g.admin_call(
            "POST",
            "/v1/registry/instances",
            Some(&json!({"service": "ext", "port": s.port, "id": id, "ttl_ms": 60000})),
        );
        assert_eq!(r.status, 201);
    }
    let seen: std::collections::BTreeSet<String> = (0..6)
        .map(|_| g.get("/").json()["instance"].as_str().unwrap().to_string())
        .collect();
    assert_eq!(seen.len(), 2);
    http(
        b.addr(),
        "POST",
        "/admin/fail-health",
        &[],
        None,
        Duration::from_secs(2),
    )
    .unwrap();
    wait_for("b out of rotation", Duration::from_secs(5), || {
        let route = g.first_route();
        route["endpoints"]
            .as_array()
            .unwrap()
            .iter()
            .any(|e| e["instance"] == "ext-b" && e["healthy"] == false)
            .then_some(())
    });
    // Still registered, but no traffic goes there.
    assert!(g.admin_get("/v1/registry/instances/ext-b")["id"] == "ext-b");
    assert!((0..10).all(|_| g.get("/").json()["instance"] == "a"));
    http(
        b.addr(),
        "POST",
        "/admin/recover",
        &[],
        None,
        Duration::from_secs(2),
    )
    .unwrap();
    wait_for("b back", Duration::from_secs(5), || {
        (0..4)
            .any(|_| g.get("/").json()["instance"] == "b")
            .then_some(())
    });
}

#[test]
fn bodies_go_again_when_nothing_left_and_a_single_instance_gets_a_second_try() {
    // An endpoint nobody listens on, next to a live one: a POST with a body that meets the
    // refused connect still reaches the live instance, whole (it never left).
    let dead = free_port();
    let live = OwnSvc::start("live", &[]);
    let single = OwnSvc::start("single", &[]);
    let g = Gantry::start(&format!(
        r#"
[services.pair]
endpoints = ["127.0.0.1:{dead}", "127.0.0.1:{}"]
upstream = {{ load_balancer = "round_robin" }}
[[services.pair.routes]]
path_prefix = "/digest"
retries = {{ attempts = 2, on = ["connect-failure"], allow_non_idempotent = true }}
[services.single]
endpoints = ["127.0.0.1:{}"]
[[services.single.routes]]
path_prefix = "/single"
retries = {{ attempts = 2, on = ["5xx"], backoff_base_ms = 5 }}
"#,
        live.port, single.port
    ));
    let body = "p".repeat(50_000);
    let refused = || {
        let m = g.metrics();
        m.lines()
            .find(|l| l.starts_with("gantry_gateway_upstream_errors_total{service=\"pair\"}"))
            .and_then(|l| l.rsplit(' ').next()?.parse::<u64>().ok())
            .unwrap_or(0)
    };
    let mut sent = 0;
    // Round robin sends one of every two requests to the dead endpoint, until it is suspect
    // (2 s); a second batch after that makes sure the refused path was taken.
    for batch in 0..2 {
        if batch == 1 {
            if refused() > 0 {
                break;
            }
            std::thread::sleep(Duration::from_millis(2100));
        }
        for _ in 0..4 {
            let r = post(g.gateway, "/digest", &body, Duration::from_secs(5));
            assert_eq!(r.status, 200, "{}", r.body);
            assert_eq!(r.json()["bytes"], 50_000, "{}", r.body);
            sent += 1;
        }
    }
    assert!(refused() > 0, "the dead endpoint was tried");
    assert_eq!(live.stats()["bodies"], sent);

    // One instance with a transient failure: the retry goes to it again.
    for _ in 0..3 {
        let a = single.addr();
        http(
            a,
            "POST",
            "/admin/fail-next?n=1",
            &[],
            None,
            Duration::from_secs(2),
        )
        .unwrap();
        let r = http(
            g.gateway,
            "GET",
            "/single/x",
            &[],
            None,
            Duration::from_secs(5),
        )
        .unwrap();
        assert_eq!(r.status, 200, "{}", r.body);
    }
    assert!(
        g.metrics()
            .contains("gantry_gateway_retries_total{route=\"single/0\",service=\"single\"} 3"),
        "{}",
        g.metrics()
    );
}

#[test]
fn a_per_try_timeout_moves_a_slow_attempt_to_another_instance() {
    let slow = OwnSvc::start("slow", &[("TESTSVC_DELAY_ALL_MS", "2000")]);
    let fast = OwnSvc::start("fast", &[]);
    let g = Gantry::start(&format!(
        r#"
[services.two]
endpoints = ["127.0.0.1:{}", "127.0.0.1:{}"]
upstream = {{ load_balancer = "round_robin" }}
[[services.two.routes]]
path_prefix = "/"
per_try_timeout_ms = 200
retries = {{ attempts = 1, on = ["per-try-timeout"], backoff_base_ms = 5 }}
"#,
        slow.port, fast.port
    ));
    for _ in 0..6 {
        let t = Instant::now();
        let r = g.get("/x");
        assert_eq!(r.status, 200, "{}", r.body);
        assert_eq!(r.json()["instance"], "fast");
        assert!(
            t.elapsed() < Duration::from_millis(900),
            "{:?}",
            t.elapsed()
        );
    }
    assert!(
        slow.stats()["requests"].as_u64().unwrap() >= 1,
        "the slow one was tried"
    );
    // Without a retry, the per-try timeout is the answer: 504 at once, not 2 s later.
    let g2 = Gantry::start(&format!(
        r#"
[services.one]
endpoints = ["127.0.0.1:{}"]
[[services.one.routes]]
path_prefix = "/"
per_try_timeout_ms = 200
"#,
        slow.port
    ));
    let t = Instant::now();
    assert_eq!(g2.get("/y").status, 504);
    assert!(
        t.elapsed() < Duration::from_millis(900),
        "{:?}",
        t.elapsed()
    );
}

#[test]
fn a_failing_call_site_opens_its_own_circuit_only_and_500_is_not_a_failure_by_default() {
    let g = Gantry::start(
        r#"
[services.web]
command = ["{TESTSVC}"]
replicas = 2
[services.web.upstream]
circuit_breaker = { failure_rate = 0.5, min_requests = 10, window_ms = 10000, open_ms = 5000, half_open_requests = 1 }
outlier = { consecutive_failures = 0, failure_rate = 0.0 }
[[services.web.routes]]
path_prefix = "/good"
strip_prefix = true
retries = { attempts = 0 }
[[services.web.routes]]
path_prefix = "/bad"
strip_prefix = true
retries = { attempts = 0 }
"#,
    );
    g.wait_healthy("web", 2, Duration::from_secs(20));
    // A burst of 500s from one path: the application's answer, not a failure of the service.
    for i in 0..40 {
        assert_eq!(g.get("/bad/status/500").status, 500, "request {i}");
    }
    assert_eq!(g.get("/good/x").status, 200);
    // 503s are the service failing: the route that gets them opens its circuit...
    // (The 40 answers of 500 count as successes in the breaker's window: 503s open it once
    // they are half of the window, at about the 40th.)
    let mut open = Vec::new();
    for _ in 0..60 {
        let r = g.get("/bad/status/503");
        assert_eq!(r.status, 503);
        open.push(r.body.contains("circuit_open"));
    }
    let first = open.iter().position(|o| *o);
    assert!(first.is_some_and(|i| i >= 10), "{open:?}");
    assert!(open[first.unwrap_or(0)..].iter().all(|o| *o), "{open:?}");
    let r = g.get("/bad/status/200");
    assert_eq!(r.status, 503);
    assert_eq!(r.json()["error"], "circuit_open", "{}", r.body);
    // ...and only that route: the other call site to the same service is untouched.
    for i in 0..20 {
        let r = g.get(&format!("/good/{i}"));
        assert_eq!(r.status, 200, "{}", r.body);
    }
    let up = &g.first_upstream();
    assert_eq!(up["circuit"], "open", "{up}");
    let states: Vec<(String, String)> = up["circuits"]
        .as_array()
        .unwrap()
        .iter()
        .map(|c| {
            (
                c["route"].as_str().unwrap().to_string(),
                c["state"].as_str().unwrap().to_string(),
            )
        })
        .collect();
    assert_eq!(
        states,
        [
            ("web/0".to_string(), "closed".to_string()),
            ("web/1".to_string(), "open".to_string())
        ]
    );
    let m = g.metrics();
    assert!(
        m.contains("gantry_gateway_circuit_state{route=\"web/1\",service=\"web\"} 1"),
        "{m}"
    );
}

#[test]
fn a_clients_broken_or_slow_upload_is_the_clients_fault() {
    use std::io::{Read, Write};
    let g = Gantry::start(
        r#"
[services.up]
command = ["{TESTSVC}"]
replicas = 2
[services.up.upstream]
circuit_breaker = { consecutive_failures = 2, failure_rate = 0.0 }
outlier = { consecutive_failures = 2, base_ejection_ms = 60000 }
[[services.up.routes]]
path_prefix = "/up"
strip_prefix = true
timeout_ms = 1500
"#,
    );
    g.wait_healthy("up", 2, Duration::from_secs(20));
    let gw = g.gateway;
    // Bad chunk framing: 400, the client's.
    for _ in 0..10 {
        let r = raw(
            gw,
            b"POST /up/digest HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\n\r\n5\r\nhelloXX\r\n0\r\n\r\n",
        );
        assert_eq!(raw_status(&r), 400, "{r}");
        assert!(r.contains("malformed_request_body"), "{r}");
    }
    // Hang up in the middle of the body.
    for _ in 0..10 {
        let mut s = std::net::TcpStream::connect(gw).unwrap();
        s.write_all(
            b"POST /up/digest HTTP/1.1\r\nHost: x\r\nContent-Length: 1000\r\n\r\n0123456789",
        )
        .unwrap();
        std::thread::sleep(Duration::from_millis(30));
        drop(s);
    }
    // Too slow to send: a byte every 400 ms against a 1.5 s timeout, three at once.
    let slow: Vec<_> = (0..3)
        .map(|_| {
            std::thread::spawn(move || {
                let mut s = std::net::TcpStream::connect(gw).unwrap();
                s.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
                s.write_all(b"POST /up/digest HTTP/1.1\r\nHost: x\r\nContent-Length: 100\r\n\r\n")
                    .unwrap();
                for _ in 0..20 {
                    std::thread::sleep(Duration::from_millis(400));
                    if s.write_all(b"x").is_err() {
                        break;
                    }
                }
                let mut out = Vec::new();
                let _ = s.read_to_end(&mut out);
                String::from_utf8_lossy(&out).into_owned()
            })
        })
        .collect();
    for t in slow {
        let r = t.join().unwrap();
        assert_eq!(raw_status(&r), 408, "{r}");
        assert!(r.contains("request_body_timeout"), "{r}");
    }
    // None of it counted against an instance or the service: everyone else is served.
    for i in 0..20 {
        let r = g.get(&format!("/up/after/{i}"));
        assert_eq!(r.status, 200, "{}", r.body);
    }
    for e in g.first_route()["endpoints"].as_array().unwrap() {
        assert_eq!(e["ejected"], false, "{e}");
        assert_eq!(e["suspect"], false, "{e}");
    }
    assert_eq!(g.first_upstream()["circuit"], "closed");
    let m = g.metrics();
    let upstream_errors = m
        .lines()
        .find(|l| l.starts_with("gantry_gateway_upstream_errors_total{service=\"up\"}"))
        .and_then(|l| l.rsplit(' ').next())
        .unwrap_or("0");
    assert_eq!(upstream_errors, "0", "{m}");
    assert!(
        m.contains("gantry_gateway_rejected_requests_total{reason=\"request_body_timeout\"} 3"),
        "{m}"
    );
    assert!(
        m.contains("gantry_gateway_rejected_requests_total{reason=\"malformed_request_body\"} 10"),
        "{m}"
    );
}
