//! Discovery any client can use: queries, health checks, blocking queries, and clients we did
//! not write (python-consul) on the compatible listener.

use std::time::{Duration, Instant};

use serde_json::json;

use crate::common::*;

fn consul_addr(g: &Gantry) -> std::net::SocketAddr {
    let info: serde_json::Value =
        serde_json::from_slice(&std::fs::read(g.data_dir().join("admin.json")).unwrap()).unwrap();
    info["consul_url"]
        .as_str()
        .expect("consul_url in admin.json")
        .trim_start_matches("http://")
        .parse()
        .unwrap()
}

#[test]
fn python_consul_registers_passes_discovers_blocks_and_uses_kv() {
    let svc = OwnSvc::start("pay-1", &[]);
    let g = Gantry::start(
        r#"
[registry]
consul = "127.0.0.1:0"
consul_anonymous = "register"

[services.pay]
external = true
[[services.pay.routes]]
path_prefix = "/pay"
strip_prefix = true

[services.db]
endpoints = ["127.0.0.1:1"]
"#,
    );
    let consul = consul_addr(&g);
    let out = std::process::Command::new("python3")
        .arg(fixture("consul_scenario.py"))
        .args([
            "127.0.0.1",
            &consul.port().to_string(),
            &g.token,
            &svc.port.to_string(),
        ])
        .output()
        .unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "{stdout}\n{}\n{}",
        String::from_utf8_lossy(&out.stderr),
        g.output()
    );
    let seen: serde_json::Value = serde_json::from_str(stdout.trim()).unwrap();
    eprintln!("python-consul scenario: {seen}");
    // Routable through the gateway while its TTL check passes...
    assert_eq!(g.get("/pay/health").status, 200);
    // ... and out of rotation when it stops passing, at its TTL (3 s).
    let due = seen["last_pass_ms"].as_u64().unwrap() + 3_000;
    let gone = wait_for("pay-1 out of rotation", Duration::from_secs(10), || {
        let r = g.get("/pay/health");
        (r.status != 200).then(gantry_model::unix_ms)
    });
    let late = gone.saturating_sub(due);
    eprintln!("Consul-registered instance out of rotation {late} ms after its check's TTL");
    assert!(gone + 50 >= due, "left before its TTL ran out");
    assert!(late < 1_000, "{late} ms after its TTL");
    let inst = g.admin_get("/v1/registry/instances/pay-1");
    assert_eq!(inst["health"], "critical", "{inst}");
    assert!(inst["checks"][0]["output"]
        .as_str()
        .unwrap()
        .contains("TTL expired"));
    // KV writes are config commits, with history and the principal as author.
    let h = g.admin_get("/v1/config/pay/history");
    let h = h.as_array().unwrap();
    assert!(h.len() >= 3, "{h:?}");
    assert_eq!(h[0]["message"], "consul kv put");
    assert_eq!(h[0]["author"], "admin-token");
    // Every Consul write is audited.
    let audit = g.admin_get("/v1/audit?limit=200");
    assert!(audit
        .as_array()
        .unwrap()
        .iter()
        .any(|r| r["path"] == "/v1/agent/service/register" && r["action"] == "registry:write"));
    // Refused writes too.
    let r = http(
        consul,
        "PUT",
        "/v1/kv/pay/X",
        &[("x-consul-token", "wrong")],
        Some("v"),
        Duration::from_secs(5),
    )
    .unwrap();
    assert_eq!(r.status, 403, "{}", r.body);
    // No one registers into a service gantry runs or fixes, whatever their permissions.
    let r = http(
        consul,
        "PUT",
        "/v1/agent/service/register",
        &[("x-consul-token", &g.token)],
        Some(r#"{"Name": "db", "ID": "db-evil", "Port": 6666}"#),
        Duration::from_secs(5),
    )
    .unwrap();
    assert_eq!(r.status, 403, "{}", r.body);
    // An API key is a Consul token too, with its client's roles: a viewer reads, cannot write.
    let r = g.admin_call(
        "POST",
        "/v1/identity/clients",
        Some(&json!({"id": "reader", "kind": "confidential", "roles": ["viewer"]})),
    );
    assert_eq!(r.status, 201, "{}", r.body);
    let r = g.admin_call(
        "POST",
        "/v1/identity/api-keys",
        Some(&json!({"client_id": "reader"})),
    );
    assert_eq!(r.status, 201, "{}", r.body);
    let key = r.json()["key"].as_str().unwrap().to_string();
    let r = http(
        consul,
        "GET",
        "/v1/catalog/services",
        &[("x-consul-token", &key)],
        None,
        Duration::from_secs(5),
    )
    .unwrap();
    assert_eq!(r.status, 200, "{}", r.body);
    let r = http(
        consul,
        "PUT",
        "/v1/kv/pay/X",
        &[("x-consul-token", &key)],
        Some("v"),
        Duration::from_secs(5),
    )
    .unwrap();
    assert_eq!(r.status, 403, "{}", r.body);
    // The KV root lists every set, and a missing key's 404 carries the index.
    let r = http(
        consul,
        "GET",
        "/v1/kv/?recurse",
        &[("x-consul-token", &g.token)],
        None,
        Duration::from_secs(5),
    )
    .unwrap();
    assert_eq!(r.status, 200, "{}", r.body);
    let r = http(
        consul,
        "GET",
        "/v1/kv/pay/NOPE",
        &[("x-consul-token", &g.token)],
        None,
        Duration::from_secs(5),
    )
    .unwrap();
    assert_eq!(r.status, 404);
    assert!(r.header("x-consul-index").is_some());
}

#[test]
fn queries_blocking_waits_checks_and_client_side_discovery_on_the_admin_api() {
    let g = Gantry::start(
        r#"
[services.web]
command = ["{TESTSVC}"]
replicas = 2
health = { type = "http", path = "/health" }
"#,
    );
    g.wait_healthy("web", 2, Duration::from_secs(20));
    let svc = OwnSvc::start("ext-eu", &[]);
    let r = g.admin_call(
        "POST",
        "/v1/registry/instances",
        Some(
            &json!({"service": "web", "id": "web-eu", "port": svc.port, "version": "2.1.0",
                     "zone": "eu-1", "tags": ["canary"], "metadata": {"team": "a"},
                     "checks": [{"ttl_ms": 60000}]}),
        ),
    );
    assert_eq!(r.status, 201, "{}", r.body);
    // Supervised instances carry their probe as a check.
    let all = g.admin_call("GET", "/v1/registry/services/web", None);
    let index: u64 = all.header("x-gantry-index").unwrap().parse().unwrap();
    let list = all.json();
    assert_eq!(list.as_array().unwrap().len(), 3);
    let sup = list
        .as_array()
        .unwrap()
        .iter()
        .find(|i| i["id"] != "web-eu")
        .unwrap();
    assert_eq!(sup["checks"][0]["kind"], "probe", "{sup}");
    // Filters: version, tags, metadata, zone; locality order.
    for (q, want) in [
        ("version=^2", vec!["web-eu"]),
        ("tags=canary", vec!["web-eu"]),
        ("meta=team:a", vec!["web-eu"]),
        ("zone=eu-1", vec!["web-eu"]),
    ] {
        let got = g.admin_get(&format!("/v1/registry/services/web?{q}"));
        let ids: Vec<&str> = got
            .as_array()
            .unwrap()
            .iter()
            .map(|i| i["id"].as_str().unwrap())
            .collect();
        assert_eq!(ids, want, "{q}");
    }
    // Client-side discovery: one JSON question, full endpoints back.
    let d = g
        .admin_call(
            "POST",
            "/v1/registry/discover",
            Some(&json!({"service": "web", "version": ">=2", "near": "eu-1", "limit": 5})),
        )
        .json();
    assert_eq!(d["endpoints"][0]["id"], "web-eu", "{d}");
    assert_eq!(
        d["endpoints"][0]["url"],
        format!("http://127.0.0.1:{}", svc.port)
    );
    // A read, not audited as a change.
    let audit = g.admin_get("/v1/audit?limit=500").to_string();
    assert!(!audit.contains("/v1/registry/discover"));
    // A failing TTL check: critical, out of the default answer, still in `health=any`.
    let r = g.admin_call(
        "PUT",
        "/v1/registry/instances/web-eu/checks/ttl",
        Some(&json!({"status": "critical", "output": "disk full"})),
    );
    assert_eq!(r.status, 200, "{}", r.body);
    assert_eq!(r.json()["health"], "critical");
    assert_eq!(
        g.admin_get("/v1/registry/services/web")
            .as_array()
            .unwrap()
            .len(),
        2
    );
    assert_eq!(
        g.admin_get("/v1/registry/services/web?health=any")
            .as_array()
            .unwrap()
            .len(),
        3
    );
    // A blocking query: answers at once for an old index, on a change, or at its wait.
    let now = g.admin_call("GET", "/v1/registry/services/web", None);
    let index2: u64 = now.header("x-gantry-index").unwrap().parse().unwrap();
    assert!(index2 > index);
    let t = Instant::now();
    let r = g.admin_call(
        "GET",
        &format!("/v1/registry/services/web?index={index2}&wait=1s"),
        None,
    );
    assert!(
        t.elapsed() >= Duration::from_millis(900),
        "{:?}",
        t.elapsed()
    );
    assert_eq!(r.header("x-gantry-index").unwrap(), index2.to_string());
    let (admin, token) = (g.admin, g.token.clone());
    let waiter = std::thread::spawn(move || {
        let t = Instant::now();
        let r = http(
            admin,
            "GET",
            &format!("/v1/registry/services/web?index={index2}&wait=20s"),
            &[("authorization", &format!("Bearer {token}"))],
            None,
            Duration::from_secs(30),
        )
        .unwrap();
        (t.elapsed(), r)
    });
    std::thread::sleep(Duration::from_millis(300));
    let r = g.admin_call(
        "PUT",
        "/v1/registry/instances/web-eu/checks/ttl",
        Some(&json!({"status": "passing"})),
    );
    assert_eq!(r.status, 200);
    let (took, r) = waiter.join().unwrap();
    assert!(took < Duration::from_secs(5), "{took:?}");
    assert_eq!(r.json().as_array().unwrap().len(), 3, "{}", r.body);
    // The CLI: filters, and each instance's checks and tags.
    let out = g.cli(&["registry", "ls", "web", "--tag", "canary"]);
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(out.status.success(), "{text}");
    assert!(
        text.contains("web-eu") && text.contains("ttl:passing") && text.contains("canary"),
        "{text}"
    );
    assert_eq!(text.lines().count(), 2, "{text}");
    let all = String::from_utf8_lossy(&g.cli(&["registry", "ls", "web"]).stdout).into_owned();
    assert!(all.contains("probe:passing"), "{all}");
    assert_eq!(
        g.cli(&["registry", "ls", "--tag", "canary"]).status.code(),
        Some(2)
    );
    // Bad input: clear 400s.
    for (m, p, b) in [
        ("GET", "/v1/registry/services/web?version=%3E%3D%3D2", None),
        (
            "GET",
            "/v1/registry/services/web?index=1&wait=forever",
            None,
        ),
        ("GET", "/v1/registry/services/web?health=sometimes", None),
        (
            "POST",
            "/v1/registry/instances",
            Some(json!({"service": "x", "port": 1, "checks": [{"ttl_ms": 5}]})),
        ),
        (
            "PUT",
            "/v1/registry/instances/web-eu/checks/ttl",
            Some(json!({"status": "fine"})),
        ),
    ] {
        let r = g.admin_call(m, p, b.as_ref());
        assert_eq!(r.status, 400, "{m} {p}: {}", r.body);
    }
}

fn dns_port(g: &Gantry) -> u16 {
    let info: serde_json::Value =
        serde_json::from_slice(&std::fs::read(g.data_dir().join("admin.json")).unwrap()).unwrap();
    let addr: std::net::SocketAddr = info["dns_addr"].as_str().unwrap().parse().unwrap();
    addr.port()
}

fn dig(port: u16, args: &[&str]) -> String {
    let out = std::process::Command::new("dig")
        .args(["@127.0.0.1", "-p", &port.to_string(), "+time=2", "+tries=1"])
        .args(args)
        .output()
        .expect("dig (Debian bind9-dnsutils; scripts/test installs it)");
    String::from_utf8_lossy(&out.stdout).into_owned()
}

#[test]
fn dns_answers_dig_and_dnspython_with_healthy_instances_only() {
    let g = Gantry::start(
        r#"
[registry]
dns = "127.0.0.1:0"

[services.web]
command = ["{TESTSVC}"]
replicas = 2
health = { type = "http", path = "/health", interval_ms = 100 }
"#,
    );
    g.wait_healthy("web", 2, Duration::from_secs(20));
    let port = dns_port(&g);
    for (id, addr, version) in [
        ("web-a", "127.0.0.2", "1.4.0"),
        ("web-b", "127.0.0.3", "2.1.3"),
    ] {
        let r = g.admin_call(
            "POST",
            "/v1/registry/instances",
            Some(
                &json!({"service": "web", "id": id, "address": addr, "port": 9000,
                         "version": version, "tags": ["ext"], "ttl_ms": 60000}),
            ),
        );
        assert_eq!(r.status, 201, "{}", r.body);
    }
    // dig: A records (one per address), with the short TTL.
    let a = dig(port, &["web.service.gantry", "A", "+noall", "+answer"]);
    let mut addrs: Vec<&str> = a
        .lines()
        .filter_map(|l| l.split_whitespace().nth(4))
        .collect();
    addrs.sort();
    assert_eq!(addrs, ["127.0.0.1", "127.0.0.2", "127.0.0.3"], "{a}");
    assert!(
        a.lines().all(|l| l.split_whitespace().nth(1) == Some("1")),
        "TTL 1: {a}"
    );
    let v2 = dig(port, &["v2.web.service.gantry", "A", "+short"]);
    assert_eq!(v2.trim(), "127.0.0.3");
    let tagged = dig(port, &["ext.web.service.consul", "A", "+short"]);
    assert_eq!(tagged.lines().count(), 2, "{tagged}");
    // SRV: every instance with its port, targets resolvable (TCP as well as UDP).
    let srv = dig(
        port,
        &[
            "+tcp",
            "_web._tcp.service.consul",
            "SRV",
            "+noall",
            "+answer",
            "+additional",
        ],
    );
    let instances = g.instances("web");
    for i in &instances {
        assert!(
            srv.contains(&format!(
                "{} {}.instance.gantry.",
                i["port"],
                i["id"].as_str().unwrap()
            )),
            "{srv}"
        );
    }
    assert!(srv.contains("9000 web-b.instance.gantry."), "{srv}");
    let nx = dig(port, &["nope.service.gantry", "A"]);
    assert!(nx.contains("status: NXDOMAIN"), "{nx}");
    let refused = dig(port, &["example.com", "A"]);
    assert!(refused.contains("status: REFUSED"), "{refused}");

    // dnspython, a resolver library we did not write.
    let script = format!(
        r#"
import dns.resolver
r = dns.resolver.Resolver(configure=False)
r.nameservers = ["127.0.0.1"]
r.port = {port}
a = sorted(x.address for x in r.resolve("web.service.gantry", "A"))
srv = sorted((x.port, str(x.target)) for x in r.resolve("web.service.gantry", "SRV", tcp=True))
v1 = [x.address for x in r.resolve("1.web.service.gantry", "A")]
try:
    r.resolve("missing.service.gantry", "A")
    nx = False
except dns.resolver.NXDOMAIN:
    nx = True
print(a, len(srv), v1, nx)
"#
    );
    let out = std::process::Command::new("python3")
        .args(["-c", &script])
        .output()
        .unwrap();
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "{text}{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert_eq!(
        text.trim(),
        "['127.0.0.1', '127.0.0.2', '127.0.0.3'] 4 ['127.0.0.2'] True"
    );

    // A crashed instance leaves the answers at once.
    let victim = &instances[0];
    let id = victim["id"].as_str().unwrap().to_string();
    let pid = victim["pid"].as_u64().unwrap() as u32;
    let t = std::time::Instant::now();
    signal(pid, libc::SIGKILL);
    wait_for(
        "crashed instance out of DNS",
        Duration::from_secs(5),
        || {
            let srv = dig(port, &["web.service.gantry", "SRV", "+short"]);
            (!srv.contains(&format!("{id}.instance.gantry"))).then_some(())
        },
    );
    eprintln!(
        "crashed instance out of DNS answers within {:?}",
        t.elapsed()
    );
}

#[test]
fn py_eureka_client_registers_renews_discovers_and_expires_when_it_stops_renewing() {
    let svc = OwnSvc::start("pay-eureka", &[]);
    let g = Gantry::start(
        r#"
[registry]
eureka = "127.0.0.1:0"

[services.web]
command = ["{TESTSVC}"]
health = { type = "http", path = "/health" }

[services.pay]
external = true
[[services.pay.routes]]
path_prefix = "/pay"
strip_prefix = true
"#,
    );
    g.wait_healthy("web", 1, Duration::from_secs(20));
    let info: serde_json::Value =
        serde_json::from_slice(&std::fs::read(g.data_dir().join("admin.json")).unwrap()).unwrap();
    let base = info["eureka_url"].as_str().unwrap();
    // Credentials as Eureka clients give them: in the server URL (the password is the token).
    let url = base.replace("http://", &format!("http://gantry:{}@", g.token)) + "/eureka/";
    let mut child = std::process::Command::new("python3")
        .arg(fixture("eureka_scenario.py"))
        .args([&url, &svc.port.to_string()])
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    let stdout = child.stdout.take().unwrap();
    let (tx, rx) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        use std::io::BufRead;
        for line in std::io::BufReader::new(stdout)
            .lines()
            .map_while(Result::ok)
        {
            let _ = tx.send(line);
        }
    });
    let line = match rx.recv_timeout(Duration::from_secs(30)) {
        Ok(l) => l,
        Err(_) => {
            let _ = child.kill();
            let out = child.wait_with_output().unwrap();
            panic!(
                "no answer from the scenario: {}\n{}",
                String::from_utf8_lossy(&out.stderr),
                g.output()
            );
        }
    };
    let seen: serde_json::Value = match serde_json::from_str(&line) {
        Ok(v) => v,
        Err(_) => {
            let _ = child.kill();
            let out = child.wait_with_output().unwrap();
            panic!("{line}\n{}", String::from_utf8_lossy(&out.stderr))
        }
    };
    assert_eq!(seen["called"], "web", "{seen}");
    assert_eq!(seen["renewed"], true, "{seen}");
    // Registered in gantry's registry, routable through the gateway.
    let id = "127-0-0-1-pay-".to_string() + &svc.port.to_string();
    let inst = g.admin_get(&format!("/v1/registry/instances/{id}"));
    assert_eq!(inst["service"], "pay", "{inst}");
    assert_eq!(g.get("/pay/health").status, 200);
    // The client dies without cancelling: gone when its lease (2 s) runs out.
    let last = g.admin_get(&format!("/v1/registry/instances/{id}"))["source"]["last_heartbeat_ms"]
        .as_u64()
        .unwrap();
    signal(child.id(), libc::SIGKILL);
    let _ = child.wait();
    let gone = wait_for("expiry", Duration::from_secs(10), || {
        let r = g.admin_call("GET", &format!("/v1/registry/instances/{id}"), None);
        (r.status == 404).then(gantry_model::unix_ms)
    });
    let after_lease = gone.saturating_sub(last + 2_000);
    eprintln!("Eureka-registered instance expired {after_lease} ms after its lease");
    assert!(gone >= last + 2_000, "expired before its lease ran out");
    assert!(after_lease < 1_500, "{after_lease} ms late");
    assert_ne!(g.get("/pay/health").status, 200);
    // Without credentials: refused, and the refusal of a write is audited.
    let r = http(
        base.trim_start_matches("http://").parse().unwrap(),
        "DELETE",
        "/eureka/apps/WEB/x",
        &[],
        None,
        Duration::from_secs(5),
    )
    .unwrap();
    assert_eq!(r.status, 401, "{}", r.body);
    let audit = g.admin_get("/v1/audit?limit=500").to_string();
    assert!(
        audit.contains("/eureka/apps/PAY") || audit.contains("/eureka/apps/pay"),
        "{audit}"
    );
}

/// The registry watch's events as (kind, instance id, at_ms), read by a thread until `stop`.
fn watch_events(
    g: &Gantry,
    stop: std::sync::Arc<std::sync::atomic::AtomicBool>,
) -> std::thread::JoinHandle<Vec<(String, String, u64)>> {
    use std::io::{Read, Write};
    let mut s = std::net::TcpStream::connect(g.admin).unwrap();
    s.set_read_timeout(Some(Duration::from_millis(200)))
        .unwrap();
    write!(
        s,
        "GET /v1/registry/watch HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer {}\r\n\r\n",
        g.token
    )
    .unwrap();
    std::thread::spawn(move || {
        let mut buf = Vec::new();
        let mut chunk = [0u8; 8192];
        let deadline = Instant::now() + Duration::from_secs(120);
        while !stop.load(std::sync::atomic::Ordering::Relaxed) && Instant::now() < deadline {
            match s.read(&mut chunk) {
                Ok(0) => break,
                Ok(n) => buf.extend_from_slice(&chunk[..n]),
                Err(_) => {}
            }
        }
        String::from_utf8_lossy(&buf)
            .lines()
            .filter_map(|l| l.strip_prefix("data: "))
            .filter_map(|d| serde_json::from_str::<serde_json::Value>(d).ok())
            .filter(|v| v.get("kind").is_some())
            .map(|v| {
                (
                    v["kind"].as_str().unwrap().to_string(),
                    v["instance"]["id"].as_str().unwrap().to_string(),
                    v["at_ms"].as_u64().unwrap(),
                )
            })
            .collect()
    })
}

/// How soon each kind of failure takes an instance out of rotation, from gantry's own
/// timestamps (the registry watch's `at_ms`) against the moment of the failure.
#[test]
fn failure_detection_figures() {
    let g = Gantry::start(
        r#"
[services.web]
command = ["{TESTSVC}"]
replicas = 4
health = { type = "http", path = "/health", interval_ms = 100, timeout_ms = 100, unhealthy_threshold = 3 }
backoff = { initial_ms = 50, max_ms = 200, crash_loop_restarts = 100, crash_loop_window_ms = 1000 }
"#,
    );
    g.wait_healthy("web", 4, Duration::from_secs(20));
    let stop = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
    let watcher = watch_events(&g, stop.clone());
    std::thread::sleep(Duration::from_millis(300));
    // Crashes: kill -9, 20 times, one healthy instance at a time.
    let mut kills: Vec<(String, u64)> = Vec::new();
    for n in 0..20 {
        let list = g.wait_healthy("web", 4, Duration::from_secs(20));
        let victim = &list[n % 4];
        let id = victim["id"].as_str().unwrap().to_string();
        let pid = victim["pid"].as_u64().unwrap() as u32;
        let at = gantry_model::unix_ms();
        signal(pid, libc::SIGKILL);
        kills.push((id.clone(), at));
        wait_for("the crash seen", Duration::from_secs(5), || {
            g.instances("web")
                .iter()
                .any(|i| i["id"] == id.as_str() && i["state"] != "healthy")
                .then_some(())
        });
    }
    // A hung instance: its probes time out (interval 100 ms x threshold 3).
    let list = g.wait_healthy("web", 4, Duration::from_secs(20));
    let hung = list[0]["id"].as_str().unwrap().to_string();
    let port = list[0]["port"].as_u64().unwrap() as u16;
    let hung_at = gantry_model::unix_ms();
    let r = http(
        format!("127.0.0.1:{port}").parse().unwrap(),
        "POST",
        "/admin/hang",
        &[],
        None,
        Duration::from_secs(5),
    )
    .unwrap();
    assert_eq!(r.status, 200);
    // A self-registered instance that stops heartbeating: out at its TTL (1 s).
    let svc = OwnSvc::start("lease-1", &[]);
    let r = g.admin_call(
        "POST",
        "/v1/registry/instances",
        Some(&json!({"service": "web", "id": "lease-1", "port": svc.port, "ttl_ms": 1000})),
    );
    assert_eq!(r.status, 201, "{}", r.body);
    let leased_at = r.json()["source"]["last_heartbeat_ms"].as_u64().unwrap();
    std::thread::sleep(Duration::from_millis(2_500));
    stop.store(true, std::sync::atomic::Ordering::Relaxed);
    let events = watcher.join().unwrap();
    let out_at = |id: &str, after: u64| {
        events
            .iter()
            .find(|(k, i, at)| {
                i == id && *at >= after && matches!(k.as_str(), "deregistered" | "expired")
            })
            .map(|(_, _, at)| *at)
    };
    let mut crash: Vec<u64> = kills
        .iter()
        .map(|(id, at)| out_at(id, *at).expect("deregistered event") - at)
        .collect();
    crash.sort_unstable();
    let p50 = crash[crash.len() / 2];
    let p99 = crash[((crash.len() - 1) as f64 * 0.99).round() as usize];
    let hung_out = out_at(&hung, hung_at).expect("hung instance deregistered") - hung_at;
    let lease_out = out_at("lease-1", leased_at).expect("lease expired") - leased_at;
    eprintln!(
        "failure detection: crash (kill -9) out of rotation p50 {p50} ms, p99 {p99} ms (n={}); hung instance out after {hung_out} ms (probe interval 100 ms x threshold 3, timeout 100 ms); self-registration out {lease_out} ms after its last heartbeat (TTL 1000 ms)",
        crash.len()
    );
    assert!(p99 < 100, "crash p99 {p99} ms: {crash:?}");
    assert!((250..1_500).contains(&hung_out), "hung: {hung_out} ms");
    assert!((1_000..1_500).contains(&lease_out), "lease: {lease_out} ms");
}
