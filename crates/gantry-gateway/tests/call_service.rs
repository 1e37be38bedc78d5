//! In-process calls (`Gateway::call_service`) through the one upstream call, against real
//! sockets: balancing over the registry's instances, version narrowing, retries past a refusing
//! instance, typed failures, and the headers every call carries.
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
    }
}

fn gateway(instances: Vec<Instance>) -> Arc<Gateway> {
    let gw = Gateway::new(
        GatewayConfig {
            node: "n".into(),
            ..GatewayConfig::default()
        },
        &gantry_telemetry::Metrics::new(),
    );
    let mut model = GatewayModel::default();
    model.upstreams.insert("svc".into(), policy());
    gw.apply_model(model);
    let mut services = BTreeMap::new();
    services.insert(Arc::<str>::from("svc"), instances.into());
    gw.apply_registry(&Arc::new(RegistrySnapshot {
        revision: 1,
        services,
        changed: vec!["svc".into()],
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
