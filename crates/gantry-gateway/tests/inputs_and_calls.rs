//! The gateway's inputs and its one upstream call, against real sockets: in-process calls
//! (`Gateway::call_service`: balancing over the registry's instances, version narrowing,
//! retries past a refusing instance, typed failures, the headers every call carries), release
//! weights splitting a route's and a caller's traffic between versions, and registry changes
//! that rebuild one service's instances without touching the routes.
#![allow(clippy::unwrap_used)]

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use bytes::Bytes;
use gantry_gateway::{CallOptions, Caller, Failure, Gateway, GatewayConfig};
use gantry_model::{
    CircuitBreakerPolicy, GatewayModel, Health, Instance, InstanceSource, LoadBalancer,
    OutlierPolicy, RegistrySnapshot, UpstreamPolicy, UpstreamProtocol,
};
use http_body_util::BodyExt;
use tokio::io::{AsyncReadExt, AsyncWriteExt};

/// An HTTP/1.1 server that answers every request with its name, and keeps each request's head.
async fn server(name: &'static str) -> (SocketAddr, Arc<Mutex<Vec<String>>>) {
    let l = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = l.local_addr().unwrap();
    let heads = Arc::new(Mutex::new(Vec::new()));
    let seen = heads.clone();
    tokio::spawn(async move {
        loop {
            let Ok((mut s, _)) = l.accept().await else {
                return;
            };
            let seen = seen.clone();
            tokio::spawn(async move {
                let mut buf = Vec::new();
                let mut chunk = [0u8; 4096];
                loop {
                    let Some(end) = buf.windows(4).position(|w| w == b"\r\n\r\n") else {
                        match s.read(&mut chunk).await {
                            Ok(0) | Err(_) => return,
                            Ok(n) => buf.extend_from_slice(&chunk[..n]),
                        }
                        continue;
                    };
                    let head = String::from_utf8_lossy(&buf[..end]).into_owned();
                    let len: usize = head
                        .lines()
                        .find_map(|l| {
                            l.to_ascii_lowercase()
                                .strip_prefix("content-length:")
                                .map(|v| v.trim().parse().unwrap_or(0))
                        })
                        .unwrap_or(0);
                    while buf.len() < end + 4 + len {
                        match s.read(&mut chunk).await {
                            Ok(0) | Err(_) => return,
                            Ok(n) => buf.extend_from_slice(&chunk[..n]),
                        }
                    }
                    let body = String::from_utf8_lossy(&buf[end + 4..end + 4 + len]).into_owned();
                    buf.drain(..end + 4 + len);
                    seen.lock().unwrap().push(format!("{head}\r\n\r\n{body}"));
                    let reply = format!("{name}:{body}");
                    let resp = format!(
                        "HTTP/1.1 200 OK\r\nContent-Length: {}\r\nX-Served-By: {name}\r\n\r\n{reply}",
                        reply.len()
                    );
                    if s.write_all(resp.as_bytes()).await.is_err() {
                        return;
                    }
                }
            });
        }
    });
    (addr, heads)
}

fn policy() -> UpstreamPolicy {
    UpstreamPolicy {
        protocol: UpstreamProtocol::Http1,
        load_balancer: LoadBalancer::RoundRobin,
        prefer_local: false,
        connect_timeout_ms: 1000,
        max_concurrent_requests: 0,
        max_idle_connections_per_instance: 8,
        idle_connection_timeout_ms: 60_000,
        circuit_breaker: CircuitBreakerPolicy {
            consecutive_failures: 0,
            failure_rate: 0.0,
            min_requests: 1,
            window_ms: 1000,
            open_ms: 1000,
            half_open_requests: 1,
        },
        outlier: OutlierPolicy {
            consecutive_failures: 0,
            failure_rate: 0.0,
            min_requests: 1,
            window_ms: 1000,
            base_ejection_ms: 1000,
            max_ejection_ms: 1000,
            max_ejected_percent: 50,
        },
        active_health: None,
        tls: None,
    }
}

fn instance(id: &str, addr: SocketAddr, version: &str) -> Instance {
    Instance {
        id: id.into(),
        service: "svc".into(),
        version: semver::Version::parse(version).unwrap(),
        address: addr.ip(),
        port: addr.port(),
        metadata: BTreeMap::new(),
        node: "n".into(),
        zone: None,
        health: Health::Passing,
        source: InstanceSource::Supervised,
        registered_at_ms: 0,
        tags: Vec::new(),
        checks: Vec::new(),
    }
}

fn gateway(instances: Vec<Instance>) -> Arc<Gateway> {
    gateway_with(GatewayModel::default(), instances)
}

fn gateway_with(mut model: GatewayModel, instances: Vec<Instance>) -> Arc<Gateway> {
    let gw = Gateway::new(
        GatewayConfig {
            node: "n".into(),
            ..GatewayConfig::default()
        },
        &gantry_telemetry::Metrics::new(),
    );
    model.upstreams.insert("svc".into(), policy());
    gw.apply_model(model);
    let mut services = gantry_model::ServiceMap::new();
    services.insert(
        Arc::<str>::from("svc"),
        instances.into_iter().map(Arc::new).collect(),
    );
    gw.apply_registry(&Arc::new(RegistrySnapshot {
        revision: 1,
        services,
        changed: vec!["svc".into()],
        since: 0,
    }));
    gw
}

async fn call(gw: &Arc<Gateway>, version: Option<&str>, body: &str) -> Result<String, Failure> {
    let req = http::Request::post("/work?x=1")
        .header(
            "traceparent",
            "00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01",
        )
        .body(Bytes::from(body.to_string()))
        .unwrap();
    let v = version.map(|v| semver::VersionReq::parse(v).unwrap());
    let caller = Caller {
        name: "test:caller".into(),
    };
    match gw
        .call_service("svc", v.as_ref(), req, &caller, &CallOptions::default())
        .await
    {
        Ok(resp) => {
            assert_eq!(resp.status(), 200);
            let by = resp.headers()["x-served-by"].to_str().unwrap().to_string();
            let text = resp.into_body().collect().await.unwrap().to_bytes();
            assert!(String::from_utf8_lossy(&text).starts_with(&by));
            Ok(String::from_utf8_lossy(&text).into_owned())
        }
        Err(e) => Err(e.failure),
    }
}

#[tokio::test]
async fn calls_are_balanced_narrowed_by_version_and_carry_identity_and_trace() {
    let (a, heads_a) = server("a").await;
    let (b, _) = server("b").await;
    let gw = gateway(vec![
        instance("svc-1", a, "1.0.0"),
        instance("svc-2", b, "2.0.0"),
    ]);
    let mut served = std::collections::BTreeSet::new();
    for i in 0..6 {
        let out = call(&gw, None, &format!("m{i}")).await.unwrap();
        served.insert(out[..1].to_string());
        assert!(out.ends_with(&format!(":m{i}")), "{out}");
    }
    assert_eq!(served.len(), 2, "round robin over both instances");
    for _ in 0..4 {
        assert!(call(&gw, Some("^1"), "v").await.unwrap().starts_with("a:"));
        assert!(call(&gw, Some(">=2"), "v").await.unwrap().starts_with("b:"));
    }
    assert_eq!(call(&gw, Some("^3"), "v").await, Err(Failure::NoInstance));
    let head = heads_a.lock().unwrap()[0].to_ascii_lowercase();
    assert!(head.starts_with("post /work?x=1 http/1.1"), "{head}");
    assert!(head.contains("gantry-caller: test:caller"), "{head}");
    assert!(head.contains("x-request-id: "), "{head}");
    // The caller's trace goes on, with the gateway's hop as the parent.
    assert!(
        head.contains("traceparent: 00-0af7651916cd43dd8448eb211c80319c-"),
        "{head}"
    );
    assert!(!head.contains("b7ad6b7169203331"), "{head}");
}

#[tokio::test]
async fn a_refusing_instance_is_retried_past_and_failures_are_typed() {
    let (a, _) = server("a").await;
    // A port nothing listens on.
    let closed = {
        let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        l.local_addr().unwrap()
    };
    let gw = gateway(vec![
        instance("svc-1", a, "1.0.0"),
        instance("svc-2", closed, "1.0.0"),
    ]);
    // Every call succeeds: a refused connect never left, so even a POST goes again.
    for i in 0..6 {
        let out = call(&gw, None, &format!("p{i}")).await.unwrap();
        assert!(out.starts_with("a:"), "{out}");
    }
    // Only the refusing instance: a connect failure, nothing sent, safe to retry.
    let gw = gateway(vec![instance("svc-2", closed, "1.0.0")]);
    let req = http::Request::post("/")
        .body(Bytes::from_static(b"x"))
        .unwrap();
    let caller = Caller { name: "t".into() };
    let opts = CallOptions {
        timeout: Duration::from_secs(5),
        ..CallOptions::default()
    };
    let e = gw
        .call_service("svc", None, req, &caller, &opts)
        .await
        .unwrap_err();
    assert!(matches!(e.failure, Failure::Connect(_)), "{e}");
    assert!(!e.sent && e.retry_safe, "{e:?}");
    assert_eq!(e.attempts, 1, "one instance, tried once: {e:?}");
    // An unknown service.
    let req = http::Request::get("/").body(Bytes::new()).unwrap();
    let e = gw
        .call_service("nope", None, req, &caller, &opts)
        .await
        .unwrap_err();
    assert_eq!(e.failure, Failure::NoInstance);
}

/// A route to `svc` on `path`, any version (or `version`).
fn route(id: &str, path: &str, version: Option<&str>) -> gantry_model::Route {
    let json = serde_json::json!({
        "id": id,
        "service": "svc",
        "match": { "hosts": [], "path": { "type": "prefix", "value": path }, "methods": [], "headers": [], "query": [] },
        "action": { "type": "forward",
            "backends": [{ "service": "svc", "version": version, "weight": 1 }],
            "version_header": null, "version_from_path": false, "mirror": null,
            "rewrite": { "strip_prefix": false, "replace_prefix": null, "regex": null },
            "request_headers": { "remove": [], "set": {}, "add": {} },
            "response_headers": { "remove": [], "set": {}, "add": {} },
            "timeouts": { "request_ms": 5000, "per_try_ms": null, "idle_ms": 5000 },
            "retry": { "attempts": 0, "on_connect_failure": false, "on_statuses": [], "on_per_try_timeout": false, "non_idempotent": false, "backoff_base_ms": 1, "backoff_max_ms": 1, "budget_ratio": 0.2, "budget_min_per_second": 10 },
            "rate_limit": null, "cache": null, "max_body_bytes": 1024 }
    });
    serde_json::from_value(json).unwrap()
}

/// Serve `gw` on a port of its own; GET `path` `n` times, one connection each; which
/// instance answered, counted.
async fn served_by(
    gw: &Arc<Gateway>,
    addr: SocketAddr,
    path: &str,
    n: usize,
) -> BTreeMap<String, usize> {
    let _ = gw;
    let mut counts = BTreeMap::new();
    for _ in 0..n {
        let mut s = tokio::net::TcpStream::connect(addr).await.unwrap();
        let req = format!("GET {path} HTTP/1.1\r\nHost: t\r\nConnection: close\r\n\r\n");
        s.write_all(req.as_bytes()).await.unwrap();
        let mut out = Vec::new();
        s.read_to_end(&mut out).await.unwrap();
        let text = String::from_utf8_lossy(&out).to_ascii_lowercase();
        let by = text
            .lines()
            .find_map(|l| l.strip_prefix("x-served-by: "))
            .unwrap_or("none")
            .trim()
            .to_string();
        *counts.entry(by).or_default() += 1;
    }
    counts
}

async fn listen(gw: &Arc<Gateway>) -> (SocketAddr, tokio::sync::watch::Sender<bool>) {
    let l = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = l.local_addr().unwrap();
    let (tx, rx) = tokio::sync::watch::channel(false);
    tokio::spawn(gw.clone().serve(gantry_gateway::Listener::Plain(l), rx));
    (addr, tx)
}

#[tokio::test]
async fn release_weights_split_a_services_traffic_between_versions() {
    let (a, _) = server("v1").await;
    let (b, _) = server("v2").await;
    let model = GatewayModel {
        routes: vec![
            route("svc/0", "/", None),
            route("svc/1", "/pinned", Some("^2")),
        ],
        ..GatewayModel::default()
    };
    let gw = gateway_with(
        model,
        vec![instance("svc-1", a, "1.0.0"), instance("svc-2", b, "2.0.0")],
    );
    let (addr, _stop) = listen(&gw).await;
    // No weights: the route's balancer over both.
    let even = served_by(&gw, addr, "/x", 40).await;
    assert_eq!(even.get("v1"), Some(&20), "{even:?}");
    // A canary at 10%: about 40 of 400.
    let weights = gantry_gateway::TrafficWeights {
        services: BTreeMap::from([(
            "svc".to_string(),
            vec![
                gantry_gateway::VersionWeight {
                    version: "^1".into(),
                    weight: 90,
                },
                gantry_gateway::VersionWeight {
                    version: "^2".into(),
                    weight: 10,
                },
            ],
        )]),
    };
    gw.apply_weights(weights.clone());
    assert_eq!(gw.weights(), weights);
    let canary = served_by(&gw, addr, "/x", 400).await;
    let v2 = canary.get("v2").copied().unwrap_or(0);
    assert!((15..=75).contains(&v2), "{canary:?}");
    // A route pinned to a version is not split.
    let pinned = served_by(&gw, addr, "/pinned", 20).await;
    assert_eq!(pinned.get("v2"), Some(&20), "{pinned:?}");
    // In-process callers are split the same way.
    let mut by_caller = 0;
    for i in 0..200 {
        if call(&gw, None, &format!("c{i}"))
            .await
            .unwrap()
            .starts_with("v2:")
        {
            by_caller += 1;
        }
    }
    assert!((5..=45).contains(&by_caller), "{by_caller} of 200 to v2");
    // The switch: all to v2 at once (blue/green). A share whose version has no instance goes
    // to the others.
    gw.apply_weights(gantry_gateway::TrafficWeights {
        services: BTreeMap::from([(
            "svc".to_string(),
            vec![
                gantry_gateway::VersionWeight {
                    version: "^2".into(),
                    weight: 1,
                },
                gantry_gateway::VersionWeight {
                    version: "^3".into(),
                    weight: 1,
                },
            ],
        )]),
    });
    let switched = served_by(&gw, addr, "/x", 30).await;
    assert_eq!(switched.get("v2"), Some(&30), "{switched:?}");
}

#[tokio::test]
async fn a_registry_change_rebuilds_only_its_service_and_takes_effect_before_it_returns() {
    let (a, _) = server("a").await;
    let (b, _) = server("b").await;
    let model = GatewayModel {
        routes: vec![route("svc/0", "/", None)],
        ..GatewayModel::default()
    };
    let gw = gateway_with(model, vec![instance("svc-1", a, "1.0.0")]);
    let (addr, _stop) = listen(&gw).await;
    let routes_before = gw.routes();
    assert_eq!(served_by(&gw, addr, "/", 4).await.get("a"), Some(&4));
    // Revision 2 adds an instance; revision 3 takes the first away: each is in force as soon
    // as apply_registry returns.
    let snap = |rev: u64, list: Vec<Instance>| {
        let mut services = gantry_model::ServiceMap::new();
        services.insert(
            Arc::<str>::from("svc"),
            list.into_iter().map(Arc::new).collect(),
        );
        Arc::new(RegistrySnapshot {
            revision: rev,
            services,
            changed: vec!["svc".into()],
            since: rev - 1,
        })
    };
    gw.apply_registry(&snap(
        2,
        vec![instance("svc-1", a, "1.0.0"), instance("svc-2", b, "1.0.0")],
    ));
    let both = served_by(&gw, addr, "/", 10).await;
    assert_eq!(both.len(), 2, "{both:?}");
    gw.apply_registry(&snap(3, vec![instance("svc-2", b, "1.0.0")]));
    assert_eq!(served_by(&gw, addr, "/", 10).await.get("b"), Some(&10));
    // A snapshot that skips revisions (a listener that missed one) is diffed by its lists.
    gw.apply_registry(&snap(9, vec![instance("svc-1", a, "1.0.0")]));
    assert_eq!(served_by(&gw, addr, "/", 10).await.get("a"), Some(&10));
    // The routes were not rebuilt: same route, same position.
    let after = gw.routes();
    assert_eq!(after.len(), routes_before.len());
    assert_eq!(after[0].route, routes_before[0].route);
}

#[tokio::test]
async fn large_in_process_bodies_arrive_whole() {
    let (a, _) = server("a").await;
    let gw = gateway(vec![instance("svc-1", a, "1.0.0")]);
    // Over the size that goes out with the request head: the rest follows it.
    for size in [40_000usize, 300_000] {
        let body = "b".repeat(size);
        let out = call(&gw, None, &body).await.unwrap();
        assert_eq!(out.len(), "a:".len() + size, "{size} bytes sent");
    }
}

/// A server that reads requests and never answers.
async fn silent_server() -> SocketAddr {
    let l = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = l.local_addr().unwrap();
    tokio::spawn(async move {
        while let Ok((mut s, _)) = l.accept().await {
            tokio::spawn(async move {
                let mut buf = [0u8; 4096];
                while matches!(s.read(&mut buf).await, Ok(n) if n > 0) {}
            });
        }
    });
    addr
}

#[tokio::test]
async fn a_probe_that_ends_without_an_outcome_frees_its_slot() {
    let silent = silent_server().await;
    let gw = Gateway::new(
        GatewayConfig {
            node: "n".into(),
            ..GatewayConfig::default()
        },
        &gantry_telemetry::Metrics::new(),
    );
    let mut model = GatewayModel::default();
    let mut p = policy();
    p.circuit_breaker.consecutive_failures = 1;
    p.circuit_breaker.open_ms = 300;
    model.upstreams.insert("svc".into(), p);
    gw.apply_model(model);
    let mut services = gantry_model::ServiceMap::new();
    services.insert(
        Arc::<str>::from("svc"),
        [Arc::new(instance("svc-1", silent, "1.0.0"))].into(),
    );
    gw.apply_registry(&Arc::new(RegistrySnapshot {
        revision: 1,
        services,
        changed: vec!["svc".into()],
        since: 0,
    }));
    let caller = Caller { name: "t".into() };
    let within = |ms| CallOptions {
        timeout: Duration::from_millis(ms),
        ..CallOptions::default()
    };
    let get = || http::Request::get("/").body(Bytes::new()).unwrap();
    // A timeout opens the caller's breaker; calls then fail fast.
    let e = gw
        .call_service("svc", None, get(), &caller, &within(100))
        .await
        .unwrap_err();
    assert_eq!(e.failure, Failure::Timeout);
    let e = gw
        .call_service("svc", None, get(), &caller, &within(100))
        .await
        .unwrap_err();
    assert!(matches!(e.failure, Failure::CircuitOpen { .. }), "{e:?}");
    tokio::time::sleep(Duration::from_millis(350)).await;
    // The half-open probe is cancelled by its caller: no outcome.
    let opts = within(5_000);
    let cancelled = tokio::time::timeout(
        Duration::from_millis(50),
        gw.call_service("svc", None, get(), &caller, &opts),
    )
    .await;
    assert!(cancelled.is_err(), "the probe was still waiting");
    // Its slot is free at once: the next call is the probe (and times out), not refused.
    let e = gw
        .call_service("svc", None, get(), &caller, &within(200))
        .await
        .unwrap_err();
    assert_eq!(e.failure, Failure::Timeout, "{e:?}");
}
