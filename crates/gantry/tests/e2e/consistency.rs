//! Concurrent writes to one object have one winner, and what is live is what a restart loads.

use std::sync::{Arc, Barrier};
use std::time::Duration;

use serde_json::{json, Value};

use crate::common::*;

const WEB: &str = r#"
[services.web]
command = ["{TESTSVC}"]
[[services.web.routes]]
path_prefix = "/web"
"#;

/// `n` calls at once (each thread waits for the others before sending); their responses.
fn burst(
    g: &Gantry,
    n: usize,
    call: impl Fn(usize) -> (String, String, Value) + Sync,
) -> Vec<Resp> {
    let barrier = Arc::new(Barrier::new(n));
    std::thread::scope(|s| {
        let handles: Vec<_> = (0..n)
            .map(|i| {
                let (barrier, call) = (barrier.clone(), &call);
                s.spawn(move || {
                    let (method, path, body) = call(i);
                    let auth = format!("Bearer {}", g.token);
                    barrier.wait();
                    http(
                        g.admin,
                        &method,
                        &path,
                        &[
                            ("authorization", &auth),
                            ("content-type", "application/json"),
                        ],
                        Some(&body.to_string()),
                        Duration::from_secs(10),
                    )
                    .unwrap()
                })
            })
            .collect();
        handles.into_iter().map(|h| h.join().unwrap()).collect()
    })
}

fn api_routes(g: &Gantry) -> Vec<Value> {
    let mut v: Vec<Value> = g
        .admin_get("/v1/routes")
        .as_array()
        .unwrap()
        .iter()
        .filter(|r| r["id"].as_str().unwrap().starts_with("api/"))
        .map(|r| json!({"id": r["id"], "match": r["match"]}))
        .collect();
    v.sort_by_key(|r| r["id"].as_str().unwrap().to_string());
    v
}

fn registered(g: &Gantry, prefix: &str) -> Vec<(String, u64)> {
    let mut v: Vec<(String, u64)> = g
        .admin_get("/v1/registry/services/ext")
        .as_array()
        .unwrap()
        .iter()
        .filter(|i| i["id"].as_str().unwrap().starts_with(prefix))
        .map(|i| {
            (
                i["id"].as_str().unwrap().to_string(),
                i["port"].as_u64().unwrap(),
            )
        })
        .collect();
    v.sort();
    v
}

#[test]
fn concurrent_writes_have_one_winner_that_a_restart_keeps() {
    let mut g = Gantry::start(WEB);
    g.wait_healthy("web", 1, Duration::from_secs(20));
    for round in 0..10 {
        // Same match under different names: one is created, the rest conflict.
        let rs = burst(&g, 8, |i| {
            (
                "PUT".into(),
                format!("/v1/routes/same{round}-{i}"),
                json!({"service": "web", "route": {"path_prefix": format!("/same{round}")}}),
            )
        });
        let ok = rs.iter().filter(|r| r.status == 200).count();
        assert_eq!(
            ok,
            1,
            "round {round}: {:?}",
            rs.iter().map(|r| (r.status, &r.body)).collect::<Vec<_>>()
        );
        assert!(rs.iter().all(|r| r.status == 200 || r.status == 409));
        // One name, different matches: the last write wins in the store and the table alike.
        let rs = burst(&g, 8, |i| {
            (
                "PUT".into(),
                format!("/v1/routes/one{round}"),
                json!({"service": "web", "route": {"path_prefix": format!("/one{round}-{i}")}}),
            )
        });
        assert!(
            rs.iter().all(|r| r.status == 200 || r.status == 409),
            "{:?}",
            rs.iter().map(|r| &r.body).collect::<Vec<_>>()
        );
        // One id, different ports.
        let rs = burst(&g, 8, |i| {
            (
                "POST".into(),
                "/v1/registry/instances".into(),
                json!({"service": "ext", "id": format!("ext-{round}"), "port": 20000 + i, "ttl_ms": 600000}),
            )
        });
        assert!(
            rs.iter().all(|r| r.status == 201 || r.status == 200),
            "{:?}",
            rs.iter().map(|r| &r.body).collect::<Vec<_>>()
        );
    }
    let routes_live = api_routes(&g);
    let regs_live = registered(&g, "ext-");
    assert_eq!(routes_live.len(), 20, "{routes_live:?}");
    assert_eq!(regs_live.len(), 10, "{regs_live:?}");
    g.kill();
    g.launch();
    assert_eq!(api_routes(&g), routes_live, "routes after a restart");
    assert_eq!(
        registered(&g, "ext-"),
        regs_live,
        "registrations after a restart"
    );
}
