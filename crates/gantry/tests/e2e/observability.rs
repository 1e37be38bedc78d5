//! What the gateway tells about its traffic: rolling windows per route, service and version
//! (`/v1/traffic`), the access log in the log store (`gantry logs gateway`), and metric series
//! that leave with the instances they describe.
use std::time::Duration;

use crate::common::*;

#[test]
fn traffic_windows_the_access_log_and_series_of_gone_instances() {
    let dir = tempfile::tempdir().unwrap();
    let spec = dir.path().join("gantry.toml");
    let text = spec_text(
        r#"
[services.web]
command = ["{TESTSVC}"]
version = "1.4.0"
replicas = 2
[[services.web.routes]]
path_prefix = "/web"
strip_prefix = true
"#,
    )
    .replace("workers = 2", "workers = 2\naccess_log = true");
    std::fs::write(&spec, text).unwrap();
    let g = Gantry::start_at(dir, spec);
    g.wait_healthy("web", 2, Duration::from_secs(20));
    for i in 0..20 {
        assert_eq!(g.get(&format!("/web/ok/{i}")).status, 200);
    }
    for _ in 0..5 {
        assert_eq!(g.get("/web/status/503").status, 503);
    }
    assert_eq!(g.get("/nowhere").status, 404);

    // The last minute's figures, per route, service and version.
    let t = g.admin_get("/v1/traffic");
    let row = |kind: &str, key: &str, value: &str| {
        t[kind]
            .as_array()
            .unwrap()
            .iter()
            .find(|r| r[key] == value)
            .cloned()
            .unwrap_or_else(|| panic!("no {kind} row {key}={value}: {t}"))
    };
    let route = row("routes", "route", "web/0");
    assert_eq!(route["requests"], 25, "{route}");
    assert_eq!(route["errors"], 5, "{route}");
    assert_eq!(route["error_rate"], 0.2, "{route}");
    assert!(route["p50_ms"].as_f64().unwrap() > 0.0, "{route}");
    assert!(route["p99_ms"].as_f64().unwrap() >= route["p50_ms"].as_f64().unwrap());
    let version = row("versions", "version", "1.4.0");
    assert_eq!(version["service"], "web");
    assert_eq!(version["requests"], 25, "{version}");
    assert_eq!(version["errors"], 5, "{version}");
    let service = row("services", "service", "web");
    assert_eq!(service["requests"], 25, "{service}");
    assert!(t["window_seconds"].as_f64().unwrap() >= 60.0);

    // The access log: every request, in the log store, with what it was and where it went.
    let lines = wait_for(
        "25 forwarded access-log lines",
        Duration::from_secs(5),
        || {
            let r = http(
                g.admin,
                "GET",
                "/v1/logs?service=gateway",
                &[("authorization", &format!("Bearer {}", g.token))],
                None,
                Duration::from_secs(5),
            )
            .unwrap();
            let lines: Vec<serde_json::Value> = r
                .body
                .lines()
                .filter_map(|l| serde_json::from_str::<serde_json::Value>(l).ok())
                .filter_map(|l| serde_json::from_str(l["line"].as_str()?).ok())
                .collect();
            (lines.iter().filter(|l| l["route"] == "web/0").count() == 25).then_some(lines)
        },
    );
    let ok = lines.iter().find(|l| l["path"] == "/web/ok/0").unwrap();
    assert_eq!(ok["type"], "access");
    assert_eq!(ok["service"], "web");
    assert_eq!(ok["version"], "1.4.0");
    assert_eq!(ok["status"], 200);
    assert_eq!(ok["attempts"], 1);
    assert_eq!(ok["span_id"].as_str().unwrap().len(), 16);
    assert!(ok["upstream"].as_str().unwrap().starts_with("web-"), "{ok}");
    let missed = lines.iter().find(|l| l["path"] == "/nowhere").unwrap();
    assert_eq!(missed["status"], 404);
    assert_eq!(missed["reason"], "no_route");
    assert_eq!(missed["route"], "none");
    // And the CLI shows it.
    let out = g.cli(&["logs", "gateway", "-n", "3"]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(
        String::from_utf8_lossy(&out.stdout).contains("\"type\":\"access\""),
        "{}",
        String::from_utf8_lossy(&out.stdout)
    );

    // Series of an instance that is gone go with it.
    let m = g.metrics();
    assert!(
        m.contains("gantry_gateway_instance_requests_total{service=\"web\",instance=\"web-2\""),
        "{m}"
    );
    assert!(
        m.contains(
            "gantry_gateway_requests_total{route=\"web/0\",service=\"web\",status=\"2xx\"} 20"
        ),
        "{m}"
    );
    let r = g.admin_call(
        "POST",
        "/v1/services/web/scale",
        Some(&serde_json::json!({ "replicas": 1 })),
    );
    assert!(r.status < 300, "{}", r.body);
    wait_for("web-2's series to go", Duration::from_secs(20), || {
        (!g.metrics().contains("instance=\"web-2\"")).then_some(())
    });
    assert!(g.metrics().contains("instance=\"web-1\""));
}
