use std::time::Duration;

use crate::common::*;

fn stdout(o: &std::process::Output) -> String {
    String::from_utf8_lossy(&o.stdout).into_owned()
}
fn stderr(o: &std::process::Output) -> String {
    String::from_utf8_lossy(&o.stderr).into_owned()
}

#[test]
fn config_set_history_and_restart_reach_the_instance_env() {
    let g = Gantry::start(
        r#"
[services.web]
command = ["{TESTSVC}"]
replicas = 2
health = { type = "http", path = "/health" }
[[services.web.routes]]
path_prefix = "/web"
strip_prefix = true
"#,
    );
    let before = g.wait_healthy("web", 2, Duration::from_secs(20));
    assert_eq!(g.get("/web/env/GREETING").status, 404);

    let out = g.cli(&[
        "config",
        "set",
        "web",
        "GREETING",
        "hello world",
        "-m",
        "first greeting",
    ]);
    assert!(out.status.success(), "{}", stderr(&out));
    assert!(
        stdout(&out).contains("config version 1 committed"),
        "{}",
        stdout(&out)
    );
    assert!(
        stdout(&out).contains("gantry restart web"),
        "{}",
        stdout(&out)
    );
    // Running instances keep their environment until restarted.
    assert_eq!(g.get("/web/env/GREETING").status, 404);

    let hist = g.cli(&["config", "history", "web", "--json"]);
    let h: serde_json::Value = serde_json::from_slice(&hist.stdout).unwrap();
    assert_eq!(h[0]["version"], 1);
    assert_eq!(h[0]["message"], "first greeting");
    assert_eq!(h[0]["values"]["GREETING"], "hello world");
    let table = stdout(&g.cli(&["config", "history", "web"]));
    assert!(
        table.contains("+GREETING") && table.contains("first greeting"),
        "{table}"
    );

    let out = g.cli(&["restart", "web"]);
    assert!(out.status.success(), "{}", stderr(&out));
    let after = g.wait_healthy("web", 2, Duration::from_secs(20));
    let old: Vec<&str> = before.iter().map(|i| i["id"].as_str().unwrap()).collect();
    assert!(
        after
            .iter()
            .all(|i| !old.contains(&i["id"].as_str().unwrap())),
        "{after:?}"
    );
    assert!(after.iter().all(|i| i["config_version"] == 1));
    for _ in 0..4 {
        let r = g.get("/web/env/GREETING");
        assert_eq!((r.status, r.body.as_str()), (200, "hello world"));
    }
    let got = g.cli(&["config", "get", "web", "GREETING"]);
    assert_eq!(stdout(&got).trim(), "hello world");

    // Bad keys are refused with a reason.
    let bad = g.cli(&["config", "set", "web", "PORT", "1"]);
    assert_eq!(bad.status.code(), Some(2));
    assert!(stderr(&bad).contains("reserved"), "{}", stderr(&bad));
    let bad = g.cli(&["config", "set", "web", "no-dash", "1"]);
    assert_eq!(bad.status.code(), Some(2));
}

#[test]
fn on_config_change_restart_rolls_automatically() {
    let g = Gantry::start(
        r#"
[services.web]
command = ["{TESTSVC}"]
on_config_change = "restart"
[[services.web.routes]]
path_prefix = "/"
"#,
    );
    g.wait_healthy("web", 1, Duration::from_secs(20));
    let out = g.cli(&["config", "set", "web", "COLOR", "blue"]);
    assert!(out.status.success(), "{}", stderr(&out));
    assert!(stdout(&out).contains("restarts automatically"));
    wait_for(
        "restarted instance with the new value",
        Duration::from_secs(20),
        || {
            let r = g.get("/env/COLOR");
            (r.status == 200 && r.body == "blue").then_some(())
        },
    );
    // Rollback is a new version with the old values.
    let out = g.cli(&["config", "unset", "web", "COLOR"]);
    assert!(out.status.success());
    let out = g.cli(&["config", "rollback", "web", "1"]);
    assert!(out.status.success(), "{}", stderr(&out));
    assert!(
        stdout(&out).contains("config version 3 restores version 1"),
        "{}",
        stdout(&out)
    );
}
