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
    assert_eq!(h[0]["author"], "admin-token");
    assert_eq!(h[0]["changes"][0]["key"], "GREETING");
    assert_eq!(h[0]["changes"][0]["after"], "hello world");
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

/// The CLI with `input` on its stdin.
fn cli_stdin(g: &Gantry, args: &[&str], input: &str) -> std::process::Output {
    use std::io::Write;
    let mut child = std::process::Command::new(gantry_bin())
        .arg("-f")
        .arg(&g.spec)
        .args(args)
        .stdin(std::process::Stdio::piped())
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    child
        .stdin
        .take()
        .unwrap()
        .write_all(input.as_bytes())
        .unwrap();
    child.wait_with_output().unwrap()
}

fn ok(o: &std::process::Output) -> String {
    assert!(o.status.success(), "{}{}", stdout(o), stderr(o));
    stdout(o)
}

/// Read Server-Sent Events from `path` until `n` events named `event` came (bounded).
fn sse_events(
    g: &Gantry,
    path: &str,
    event: &str,
    n: usize,
) -> std::thread::JoinHandle<Vec<String>> {
    use std::io::{Read, Write};
    let (addr, token, path, event) = (
        g.admin,
        g.token.clone(),
        path.to_string(),
        event.to_string(),
    );
    let mut s = std::net::TcpStream::connect(addr).unwrap();
    s.set_read_timeout(Some(Duration::from_secs(20))).unwrap();
    write!(
        s,
        "GET {path} HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer {token}\r\nAccept: text/event-stream\r\n\r\n"
    )
    .unwrap();
    std::thread::spawn(move || {
        let mut buf = Vec::new();
        let mut chunk = [0u8; 4096];
        let deadline = std::time::Instant::now() + Duration::from_secs(20);
        loop {
            let text = String::from_utf8_lossy(&buf).into_owned();
            let events: Vec<String> = text
                .split(&format!("event: {event}\n"))
                .skip(1)
                .map(|e| {
                    e.lines()
                        .find(|l| l.starts_with("data: "))
                        .unwrap_or("")
                        .to_string()
                })
                .filter(|d| !d.is_empty())
                .collect();
            if events.len() >= n || std::time::Instant::now() > deadline {
                return events;
            }
            match s.read(&mut chunk) {
                Ok(0) | Err(_) => return events,
                Ok(k) => buf.extend_from_slice(&chunk[..k]),
            }
        }
    })
}

#[test]
fn layered_typed_and_secret_config_reaches_instances_by_env_file_and_signal() {
    let mut g = Gantry::start(
        r#"
[config]
env = "prod"

[services.web]
command = ["{TESTSVC}"]
on_config_change = "signal"
health = { type = "http", path = "/health" }
[[services.web.routes]]
path_prefix = "/web"
strip_prefix = true
"#,
    );
    g.wait_healthy("web", 1, Duration::from_secs(20));
    let secret = "s3cr3t-value-7f1e";
    ok(&g.cli(&[
        "config",
        "set",
        "_global",
        "REGION=eu",
        "LEVEL=info",
        "SHARED=global",
    ]));
    ok(&g.cli(&["config", "set", "web", "LEVEL=debug", "--env", "prod"]));
    ok(&g.cli(&["config", "set", "web", "LEVEL=trace", "--env", "dev"]));
    ok(&g.cli(&[
        "config",
        "set",
        "web",
        "LIMIT:=5",
        "FLAGS:={\"a\":[1,true]}",
        "SHARED=web",
        "-m",
        "typed",
    ]));
    // The secret's value comes on stdin: never on a command line (`ps`).
    let out = ok(&cli_stdin(
        &g,
        &[
            "config",
            "set",
            "web",
            "--secret",
            "DB_PASSWORD",
            "-m",
            "db",
        ],
        &format!("{secret}\n"),
    ));
    assert!(out.contains("config version 4 committed"), "{out}");
    ok(&g.cli(&["restart", "web"]));
    g.wait_healthy("web", 1, Duration::from_secs(20));
    for (k, v) in [
        ("REGION", "eu"),
        ("LEVEL", "debug"),
        ("SHARED", "web"),
        ("LIMIT", "5"),
        ("FLAGS", r#"{"a":[1,true]}"#),
        ("DB_PASSWORD", secret),
        ("GANTRY_ENV", "prod"),
    ] {
        let r = g.get(&format!("/web/env/{k}"));
        assert_eq!((r.status, r.body.as_str()), (200, v), "{k}");
    }
    // The config file holds the typed values.
    let file = g.get("/web/config-file").json();
    assert_eq!(file["values"]["LIMIT"], 5, "{file}");
    assert_eq!(file["values"]["FLAGS"]["a"][1], true, "{file}");
    assert_eq!(file["version"], 4);

    // A change rewrites the file, then signals the instance (on_config_change = "signal").
    let out = ok(&g.cli(&["config", "set", "web", "LEVEL=warn", "--env", "prod"]));
    assert!(out.contains("signalled"), "{out}");
    wait_for(
        "rewritten file and a SIGHUP",
        Duration::from_secs(10),
        || {
            let f = g.get("/web/config-file").json();
            let reloads: u64 = g.get("/web/reloads").body.trim().parse().unwrap_or(0);
            (f["values"]["LEVEL"] == "warn" && reloads >= 1).then_some(())
        },
    );
    // A global change reaches it too.
    ok(&g.cli(&["config", "set", "_global", "REGION=us"]));
    wait_for("global change in the file", Duration::from_secs(10), || {
        (g.get("/web/config-file").json()["values"]["REGION"] == "us").then_some(())
    });

    // The secret is redacted everywhere unless revealed.
    let listed = ok(&g.cli(&["config", "list", "web"]));
    assert!(
        listed.contains("DB_PASSWORD=<secret, redacted>"),
        "{listed}"
    );
    assert!(
        listed.contains("[env prod]") && listed.contains("LEVEL=warn"),
        "{listed}"
    );
    let got = g.cli(&["config", "get", "web", "DB_PASSWORD"]);
    assert_eq!(got.status.code(), Some(1));
    assert!(stderr(&got).contains("--reveal"), "{}", stderr(&got));
    let shown = ok(&g.cli(&["config", "get", "web", "DB_PASSWORD", "--reveal"]));
    assert_eq!(shown.trim(), secret);
    let mut everywhere = String::new();
    for args in [
        &["config", "get", "web"][..],
        &["config", "get", "web", "--json"],
        &["config", "list", "web", "--json"],
        &["config", "history", "web", "--json"],
        &["config", "diff", "web", "3", "--json"],
        &["config", "export", "web", "--format", "json"],
        &["config", "export", "web", "--format", "env"],
    ] {
        everywhere.push_str(&ok(&g.cli(args)));
    }
    everywhere.push_str(&g.metrics());
    everywhere.push_str(&g.admin_get("/v1/audit").to_string());
    everywhere.push_str(&g.admin_get("/v1/config/web/resolved").to_string());
    // The instance's file is the instance's; gantry's own log must not carry the value.
    everywhere.push_str(&g.output());
    assert!(!everywhere.contains(secret), "a secret leaked");
    assert!(everywhere.contains("DB_PASSWORD"));
    // The reveal was audited, with its own permission.
    let audit = g.admin_get("/v1/audit");
    assert!(
        audit
            .as_array()
            .unwrap()
            .iter()
            .any(|r| r["action"] == "config:reveal" && r["outcome"] == "ok"),
        "{audit}"
    );
    // Not in the store file in the clear either.
    let raw = std::fs::read(g.data_dir().join("state.redb")).unwrap();
    assert!(!String::from_utf8_lossy(&raw).contains(secret));

    // History, diff and layers as the CLI shows them.
    let hist = ok(&g.cli(&["config", "history", "web"]));
    assert!(
        hist.contains("+DB_PASSWORD") && hist.contains("~LEVEL@prod"),
        "{hist}"
    );
    let diff = ok(&g.cli(&["config", "diff", "web", "3", "5"]));
    assert!(
        diff.contains("+DB_PASSWORD: (absent) -> <secret>"),
        "{diff}"
    );
    assert!(diff.contains("~LEVEL@prod: debug -> warn"), "{diff}");

    // Export and import: the set into another service, secrets kept out unless revealed.
    let exported = ok(&g.cli(&["config", "export", "web", "--reveal"]));
    let file = g.dir.path().join("web.toml");
    std::fs::write(&file, &exported).unwrap();
    let out = ok(&g.cli(&[
        "config",
        "import",
        "api",
        file.to_str().unwrap(),
        "-m",
        "copy",
    ]));
    assert!(out.contains("config version 1 committed"), "{out}");
    let api = g.admin_get("/v1/config/api?reveal=true");
    assert_eq!(api["secrets"]["DB_PASSWORD"], secret, "{api}");
    assert_eq!(api["env"]["prod"]["values"]["LEVEL"], "warn", "{api}");
    assert_eq!(api["values"]["LIMIT"], 5);
    let dotenv = g.dir.path().join("extra.env");
    std::fs::write(&dotenv, "export EXTRA=\"two words\"\nTOKEN=abc\n").unwrap();
    ok(&g.cli(&[
        "config",
        "import",
        "api",
        dotenv.to_str().unwrap(),
        "--secret",
        "TOKEN",
    ]));
    let api = g.admin_get("/v1/config/api");
    assert_eq!(api["values"]["EXTRA"], "two words");
    assert!(
        api["redacted"]
            .as_array()
            .unwrap()
            .contains(&"TOKEN".into()),
        "{api}"
    );
    let bad = g.cli(&[
        "config",
        "import",
        "api",
        dotenv.to_str().unwrap(),
        "--format",
        "yaml",
    ]);
    assert_eq!(bad.status.code(), Some(2), "{}", stderr(&bad));

    // An instance reads its own service's resolved config with its own credential (the
    // workload token it is given), and nothing else.
    let token = g.get("/web/env/GANTRY_TOKEN").body;
    assert!(token.contains('.'), "{token}");
    let as_instance = |method: &str, path: &str| {
        http(
            g.admin,
            method,
            path,
            &[("authorization", &format!("Bearer {token}"))],
            None,
            Duration::from_secs(5),
        )
        .unwrap()
    };
    let own = as_instance("GET", "/v1/config/web/resolved?reveal=true");
    assert_eq!(own.status, 200, "{}", own.body);
    assert_eq!(own.json()["values"]["DB_PASSWORD"], secret);
    for (m, p) in [
        ("GET", "/v1/config/api/resolved"),
        ("GET", "/v1/config/web"),
        ("GET", "/v1/config/web/history"),
        ("GET", "/v1/services"),
    ] {
        assert_eq!(as_instance(m, p).status, 403, "{m} {p}");
    }

    // The watch: the resolved config now, then each change that reaches the service.
    let watch = sse_events(&g, "/v1/config/web/watch", "config", 2);
    std::thread::sleep(Duration::from_millis(300));
    ok(&g.cli(&["config", "set", "web", "LEVEL=error", "--env", "prod"]));
    let events = watch.join().unwrap();
    assert_eq!(events.len(), 2, "{events:?}");
    let first: serde_json::Value = serde_json::from_str(&events[0][6..]).unwrap();
    let second: serde_json::Value = serde_json::from_str(&events[1][6..]).unwrap();
    assert_eq!(first["values"]["LEVEL"], "warn");
    assert_eq!(second["values"]["LEVEL"], "error");
    assert!(second["values"].get("DB_PASSWORD").is_none(), "{second}");

    // `gantry up --env` picks another environment's layer.
    g.stop();
    g.launch_with(&["--env", "dev"]);
    g.wait_healthy("web", 1, Duration::from_secs(20));
    assert_eq!(g.get("/web/env/LEVEL").body, "trace");
    assert_eq!(g.get("/web/env/GANTRY_ENV").body, "dev");
    let bad = std::process::Command::new(gantry_bin())
        .args(["up", "-f"])
        .arg(&g.spec)
        .args(["--env", "Prod!"])
        .output()
        .unwrap();
    assert_eq!(bad.status.code(), Some(2));
    assert!(stderr(&bad).contains("invalid environment name"));
}

#[test]
fn a_config_change_that_breaks_health_is_reverted_with_zero_failed_requests() {
    let g = Gantry::start(
        r#"
[services.web]
command = ["{TESTSVC}"]
replicas = 2
on_config_change = "restart"
health = { type = "http", path = "/health", interval_ms = 100, start_grace_ms = 1000 }
[[services.web.routes]]
path_prefix = "/web"
strip_prefix = true
"#,
    );
    g.wait_healthy("web", 2, Duration::from_secs(20));
    let load = Load::start(g.gateway, "/web/env/GANTRY_SERVICE", 4, 100_000);
    // A good change rolls out and the CLI says so.
    let out = ok(&g.cli(&["config", "set", "web", "COLOR=blue"]));
    assert!(out.contains("rollout done"), "{out}");
    assert_eq!(g.get("/web/env/COLOR").body, "blue");
    // A bad one: its first new instance never becomes healthy.
    let bad = g.cli(&[
        "config",
        "set",
        "web",
        "TESTSVC_UNHEALTHY=1",
        "-m",
        "break it",
    ]);
    assert_eq!(
        bad.status.code(),
        Some(1),
        "{}{}",
        stdout(&bad),
        stderr(&bad)
    );
    let err = stderr(&bad);
    assert!(
        err.contains("failed and was reverted by version 3"),
        "{err}"
    );
    let (served, failed) = load.finish();
    assert!(
        failed.is_empty(),
        "{} failed: {:?}",
        failed.len(),
        &failed[..failed.len().min(5)]
    );
    assert!(served > 50, "{served}");
    let h = g.admin_get("/v1/config/web/history");
    let last = &h.as_array().unwrap()[2];
    assert_eq!(last["reverts"], 2, "{h}");
    assert_eq!(last["author"], "gantry");
    assert!(
        last["message"]
            .as_str()
            .unwrap()
            .starts_with("automatic revert of version 2: web:"),
        "{last}"
    );
    assert!(g.admin_get("/v1/config/web/resolved")["values"]
        .get("TESTSVC_UNHEALTHY")
        .is_none());
    // The old instances kept serving, with the good config.
    let healthy = g.wait_healthy("web", 2, Duration::from_secs(20));
    assert!(
        healthy.iter().all(|i| i["config_version"] == 1),
        "{healthy:?}"
    );
    assert_eq!(g.get("/web/env/COLOR").body, "blue");
}

/// Spring's documented client behaviour: property sources in order, the first that has a key
/// wins.
fn spring_merge(env: &serde_json::Value) -> serde_json::Map<String, serde_json::Value> {
    let mut out = serde_json::Map::new();
    for ps in env["propertySources"].as_array().unwrap() {
        for (k, v) in ps["source"].as_object().unwrap() {
            out.entry(k.clone()).or_insert_with(|| v.clone());
        }
    }
    out
}

#[test]
fn spring_cloud_config_clients_read_the_environment_in_springs_format() {
    let g = Gantry::start(
        r#"
[config]
spring = "127.0.0.1:0"
"#,
    );
    let info: serde_json::Value =
        serde_json::from_slice(&std::fs::read(g.data_dir().join("admin.json")).unwrap()).unwrap();
    let addr: std::net::SocketAddr = info["spring_config_url"]
        .as_str()
        .unwrap()
        .trim_start_matches("http://")
        .parse()
        .unwrap();
    ok(&g.cli(&["config", "set", "_global", "REGION=eu", "LOG_LEVEL=info"]));
    ok(&g.cli(&[
        "config",
        "set",
        "web",
        "SERVER_PORT:=8081",
        "LOG_LEVEL=debug",
    ]));
    ok(&g.cli(&["config", "set", "web", "LOG_LEVEL=warn", "--env", "prod"]));
    ok(&g.cli(&["config", "set", "web", "FEATURE=on", "--env", "eu"]));
    ok(&cli_stdin(
        &g,
        &["config", "set", "web", "--secret", "DB_PASSWORD"],
        "pw-9c1d\n",
    ));
    // Spring's client authenticates with basic auth (spring.cloud.config.password).
    use base64::Engine as _;
    let basic = format!(
        "Basic {}",
        base64::engine::general_purpose::STANDARD.encode(format!("user:{}", g.token))
    );
    let get = |path: &str, auth: &str| {
        http(
            addr,
            "GET",
            path,
            &[("authorization", auth)],
            None,
            Duration::from_secs(5),
        )
        .unwrap()
    };
    let r = get("/web/prod,eu", &basic);
    assert_eq!(r.status, 200, "{}", r.body);
    let env = r.json();
    assert_eq!(env["name"], "web");
    assert_eq!(env["profiles"], serde_json::json!(["prod", "eu"]));
    let names: Vec<&str> = env["propertySources"]
        .as_array()
        .unwrap()
        .iter()
        .map(|p| p["name"].as_str().unwrap())
        .collect();
    assert_eq!(
        names,
        [
            "gantry:web:eu",
            "gantry:web:prod",
            "gantry:web",
            "gantry:_global"
        ]
    );
    let merged = spring_merge(&env);
    assert_eq!(merged["LOG_LEVEL"], "warn");
    assert_eq!(merged["log.level"], "warn", "Spring's dotted form too");
    assert_eq!(merged["server.port"], 8081);
    assert_eq!(merged["REGION"], "eu");
    assert_eq!(merged["FEATURE"], "on");
    assert_eq!(
        merged["DB_PASSWORD"], "pw-9c1d",
        "the admin token may reveal"
    );
    // Labels are versions.
    let v1 = get("/web/default/1", &basic).json();
    let m1 = spring_merge(&v1);
    assert_eq!(m1["LOG_LEVEL"], "debug");
    assert!(!m1.contains_key("DB_PASSWORD"));
    assert_eq!(get("/web/default/99", &basic).status, 404);
    assert_eq!(get("/web/default/main", &basic).status, 404);
    assert_eq!(get("/web/prod", "Basic bm9wZTpub3Bl").status, 401);
    assert_eq!(get("/Bad!/prod", &basic).status, 400);
    // A viewer (config:read, not config:reveal) gets everything but the secret.
    g.admin_call(
        "POST",
        "/v1/identity/users",
        Some(&serde_json::json!({"username": "vera", "password": "viewer-pass", "roles": ["viewer"]})),
    );
    let id_addr: std::net::SocketAddr = info["identity_url"]
        .as_str()
        .unwrap()
        .trim_start_matches("http://")
        .parse()
        .unwrap();
    let t = http(
        id_addr,
        "POST",
        "/oauth2/token",
        &[("content-type", "application/x-www-form-urlencoded")],
        Some("grant_type=password&client_id=gantry-cli&username=vera&password=viewer-pass"),
        Duration::from_secs(5),
    )
    .unwrap();
    let token = t.json()["access_token"].as_str().unwrap().to_string();
    let viewer = spring_merge(&get("/web/prod", &format!("Bearer {token}")).json());
    assert_eq!(viewer["LOG_LEVEL"], "warn");
    assert!(!viewer.contains_key("DB_PASSWORD"));
    // Reads that included secrets are audited as reveals.
    let audit = g.admin_get("/v1/audit?limit=200");
    assert!(audit
        .as_array()
        .unwrap()
        .iter()
        .any(|r| r["action"] == "config:reveal" && r["path"] == "/web/prod,eu"));
}

#[test]
fn the_config_watch_delivers_every_change_in_order() {
    let g = Gantry::start("");
    let r = g.admin_call(
        "PATCH",
        "/v1/config/web",
        Some(&serde_json::json!({"set": {"COUNTER": 0}})),
    );
    assert_eq!(r.status, 201, "{}", r.body);
    let watch = sse_events(&g, "/v1/config/web/watch", "config", 21);
    std::thread::sleep(Duration::from_millis(300));
    // Twenty commits as fast as they go, from four writers at once.
    let writers: Vec<_> = (0..4)
        .map(|w| {
            let (admin, token) = (g.admin, g.token.clone());
            std::thread::spawn(move || {
                for i in 0..5 {
                    let body = format!(r#"{{"set": {{"W{w}": {i}}}}}"#);
                    let r = http(
                        admin,
                        "PATCH",
                        "/v1/config/web",
                        &[
                            ("authorization", &format!("Bearer {token}")),
                            ("content-type", "application/json"),
                        ],
                        Some(&body),
                        Duration::from_secs(10),
                    )
                    .unwrap();
                    assert_eq!(r.status, 201, "{}", r.body);
                }
            })
        })
        .collect();
    for w in writers {
        w.join().unwrap();
    }
    let events = watch.join().unwrap();
    assert_eq!(events.len(), 21, "{events:?}");
    let versions: Vec<u64> = events
        .iter()
        .map(|e| {
            serde_json::from_str::<serde_json::Value>(&e[6..]).unwrap()["version"]
                .as_u64()
                .unwrap()
        })
        .collect();
    assert_eq!(
        versions,
        (1..=21).collect::<Vec<u64>>(),
        "every version, in order"
    );
    // Each writer's values arrive in the order written.
    for w in 0..4 {
        let seen: Vec<i64> = events
            .iter()
            .filter_map(|e| {
                serde_json::from_str::<serde_json::Value>(&e[6..]).unwrap()["values"]
                    [format!("W{w}")]
                .as_i64()
            })
            .collect();
        let mut dedup = seen.clone();
        dedup.dedup();
        assert_eq!(dedup, (0..5).collect::<Vec<i64>>(), "writer {w}: {seen:?}");
    }
}
