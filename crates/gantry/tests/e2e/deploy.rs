//! The desired state: services added, changed and removed while running, and versions side by
//! side, with the other services serving throughout.

use std::time::Duration;

use serde_json::{json, Value};

use crate::common::*;

const WEB: &str = r#"
[services.web]
command = ["{TESTSVC}"]
replicas = 2
health = { type = "http", path = "/health", interval_ms = 200 }
[[services.web.routes]]
path_prefix = "/web"
strip_prefix = true
"#;

fn api(greeting: &str) -> String {
    format!(
        r#"
[services.api]
command = ["{{TESTSVC}}"]
env = {{ GREETING = "{greeting}" }}
health = {{ type = "http", path = "/health", interval_ms = 200 }}
[[services.api.routes]]
path_prefix = "/api"
strip_prefix = true
"#
    )
}

/// Instances of `service` (none while it is not, or no longer, in the desired state).
fn instances_of(g: &Gantry, service: &str) -> Vec<Value> {
    g.admin_get("/v1/instances")
        .as_array()
        .unwrap()
        .iter()
        .filter(|i| i["service"] == service)
        .cloned()
        .collect()
}

fn wait_healthy_of(g: &Gantry, service: &str, n: usize) {
    wait_for(
        &format!("{n} healthy {service} instances"),
        Duration::from_secs(20),
        || {
            let healthy = instances_of(g, service)
                .iter()
                .filter(|i| i["state"] == "healthy")
                .count();
            (healthy == n).then_some(())
        },
    );
}

fn names(report: &Value, what: &str) -> Vec<String> {
    report["services"][what]
        .as_array()
        .unwrap_or_else(|| panic!("no services.{what} in {report}"))
        .iter()
        .map(|v| v.as_str().unwrap().to_string())
        .collect()
}

#[test]
fn services_added_changed_and_removed_by_reload_under_load() {
    let g = Gantry::start(WEB);
    g.wait_healthy("web", 2, Duration::from_secs(20));
    let web_load = Load::start(g.gateway, "/web/", 4, 100_000);

    // Added: started and routed, no restart of gantry.
    let report = g.rewrite_and_reload(&format!("{WEB}{}", api("one")));
    assert_eq!(names(&report, "added"), ["api"], "{report}");
    assert!(report["needs_restart"].as_array().unwrap().is_empty());
    wait_healthy_of(&g, "api", 1);
    let r = g.get("/api/env/GREETING");
    assert_eq!((r.status, r.body.as_str()), (200, "one"));

    // Changed: replaced one instance at a time, serving throughout.
    let api_load = Load::start(g.gateway, "/api/", 2, 100_000);
    let report = g.rewrite_and_reload(&format!("{WEB}{}", api("two")));
    assert_eq!(names(&report, "changed"), ["api"], "{report}");
    wait_for(
        "api to run with its new env",
        Duration::from_secs(30),
        || {
            let r = g.get("/api/env/GREETING");
            let replaced = instances_of(&g, "api").len() == 1;
            (r.status == 200 && r.body == "two" && replaced).then_some(())
        },
    );
    let (ok, failed) = api_load.finish();
    assert!(
        ok > 0 && failed.is_empty(),
        "api: {ok} ok, failed: {failed:?}"
    );

    // Removed: drained and stopped; its routes are gone.
    let report = g.rewrite_and_reload(WEB);
    assert_eq!(names(&report, "removed"), ["api"], "{report}");
    wait_for("api's instances to stop", Duration::from_secs(30), || {
        instances_of(&g, "api").is_empty().then_some(())
    });
    assert_eq!(g.get("/api/x").status, 404);
    assert!(!g
        .admin_get("/v1/services")
        .as_array()
        .unwrap()
        .iter()
        .any(|s| s["name"] == "api"));

    let (ok, failed) = web_load.finish();
    assert!(ok > 100, "web served only {ok} requests");
    assert!(
        failed.is_empty(),
        "web failed while api came and went: {failed:?}"
    );
}

#[test]
fn two_versions_side_by_side() {
    let spec = WEB
        .replace("replicas = 2", "replicas = 1\nversion = \"1.0.0\"")
        .replace(
            "strip_prefix = true\n",
            "strip_prefix = true\nversion_header = \"accept-version\"\n",
        );
    let mut g = Gantry::start(&spec);
    g.wait_healthy("web", 1, Duration::from_secs(20));
    let r = g.admin_call(
        "PUT",
        "/v1/deployments/web/versions/2.0.0",
        Some(&json!({"replicas": 1, "env": {"GREETING": "v2"}})),
    );
    assert_eq!(r.status, 200, "{}", r.body);
    let d = r.json();
    assert_eq!(d["versions"].as_array().unwrap().len(), 2, "{d}");
    let both = g.wait_healthy("web", 2, Duration::from_secs(20));
    let mut versions: Vec<&str> = both
        .iter()
        .map(|i| i["version"].as_str().unwrap())
        .collect();
    versions.sort_unstable();
    assert_eq!(versions, ["1.0.0", "2.0.0"]);
    // Each instance is registered with its version, and the gateway routes by it.
    let reg = g.admin_get("/v1/registry/services/web");
    let registered: Vec<String> = reg
        .as_array()
        .unwrap_or_else(|| panic!("{reg}"))
        .iter()
        .map(|i| i["version"].as_str().unwrap().to_string())
        .collect();
    assert_eq!(registered.len(), 2, "{reg}");
    for _ in 0..10 {
        let r = http(
            g.gateway,
            "GET",
            "/web/env/GREETING",
            &[("accept-version", "^2")],
            None,
            Duration::from_secs(5),
        )
        .unwrap();
        assert_eq!((r.status, r.body.as_str()), (200, "v2"));
        let r = http(
            g.gateway,
            "GET",
            "/web/env/GREETING",
            &[("accept-version", "^1")],
            None,
            Duration::from_secs(5),
        )
        .unwrap();
        assert_eq!(r.status, 404, "1.0.0 has no GREETING: {}", r.body);
    }
    // Scaling needs the version when there are two; the desired state keeps both across a
    // restart of gantry.
    let r = g.admin_call(
        "POST",
        "/v1/services/web/scale",
        Some(&json!({"replicas": 2})),
    );
    assert_eq!(r.status, 400, "{}", r.body);
    assert!(r.body.contains("several versions"), "{}", r.body);
    let r = g.admin_call(
        "POST",
        "/v1/services/web/scale",
        Some(&json!({"replicas": 2, "version": "2.0.0"})),
    );
    assert_eq!(r.status, 200, "{}", r.body);
    g.wait_healthy("web", 3, Duration::from_secs(20));
    g.kill();
    g.launch();
    g.wait_healthy("web", 3, Duration::from_secs(20));
    // A version from the spec cannot be removed through the API; the added one can.
    let r = g.admin_call("DELETE", "/v1/deployments/web/versions/1.0.0", None);
    assert_eq!(r.status, 409, "{}", r.body);
    let r = g.admin_call("DELETE", "/v1/deployments/web/versions/2.0.0", None);
    assert_eq!(r.status, 200, "{}", r.body);
    wait_for("2.0.0 to drain and stop", Duration::from_secs(30), || {
        let all = g.instances("web");
        (all.len() == 1 && all[0]["version"] == "1.0.0").then_some(())
    });
    // Bad input is named.
    for (path, body, want) in [
        (
            "/v1/deployments/web/versions/two",
            json!({"replicas": 1}),
            "semantic version",
        ),
        (
            "/v1/deployments/web/versions/3.0.0",
            json!({"replicas": "1"}),
            "replicas",
        ),
        (
            "/v1/deployments/web/versions/3.0.0",
            json!({"replicas": 1, "env": {"PORT": "1"}}),
            "PORT",
        ),
        (
            "/v1/deployments/web/versions/3.0.0",
            json!({"replicas": 1, "command": []}),
            "command",
        ),
        (
            "/v1/deployments/nope/versions/3.0.0",
            json!({"replicas": 1}),
            "nope",
        ),
    ] {
        let r = g.admin_call("PUT", path, Some(&body));
        assert!(
            r.status == 400 || r.status == 404,
            "{path} {body}: {} {}",
            r.status,
            r.body
        );
        assert!(r.body.contains(want), "{path} {body}: {}", r.body);
    }
}
