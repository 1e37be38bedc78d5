use std::process::Command;
use std::time::Duration;

use crate::common::*;

fn validate(text: &str) -> (i32, String) {
    let dir = tempfile::tempdir().unwrap();
    let spec = dir.path().join("gantry.toml");
    std::fs::write(&spec, text).unwrap();
    let v = Command::new(gantry_bin())
        .args(["validate", "-f"])
        .arg(&spec)
        .output()
        .unwrap();
    let up = Command::new(gantry_bin())
        .args(["up", "-f"])
        .arg(&spec)
        .output()
        .unwrap();
    // `up` refuses the same spec the same way, before starting anything.
    assert_eq!(v.status.code(), up.status.code());
    assert_eq!(v.stderr, up.stderr);
    assert!(
        !dir.path().join(".gantry").exists(),
        "up must not create state for a bad spec"
    );
    (
        v.status.code().unwrap_or(-1),
        String::from_utf8_lossy(&v.stderr).into_owned(),
    )
}

#[test]
fn spec_errors_exit_2_and_name_the_field() {
    let (code, err) = validate("[services.a]\ncommand = [\"x\"]\nreplica = 2\n");
    assert_eq!(code, 2);
    assert!(
        err.contains("gantry.toml:3:1: services.a.replica: unknown field `replica`"),
        "{err}"
    );

    let (code, err) = validate("[services.a]\ncommand = [\"x\"]\nversion = \"1.0\"\n");
    assert_eq!(code, 2);
    assert!(
        err.contains(":3:11: services.a.version: invalid semantic version \"1.0\""),
        "{err}"
    );

    let (code, err) = validate("[services.a]\nreplicas = 2\n");
    assert_eq!(code, 2);
    assert!(
        err.contains("services.a.command: missing field `command`"),
        "{err}"
    );

    let (code, err) = validate(
        "[services.a]\ncommand = [\"x\"]\n[[services.a.routes]]\npath_prefix = \"/api\"\n[services.b]\ncommand = [\"x\"]\n[[services.b.routes]]\npath_prefix = \"/api\"\n",
    );
    assert_eq!(code, 2);
    assert!(
        err.contains(":8:15: services.b.routes[0].path_prefix: duplicate route"),
        "{err}"
    );

    let (code, err) = validate("[gateway\nlisten = 1");
    assert_eq!(code, 2);
    assert!(err.contains("gantry.toml:1:"), "{err}");

    let v = Command::new(gantry_bin())
        .args(["validate", "-f", "/nonexistent/g.toml"])
        .output()
        .unwrap();
    assert_eq!(v.status.code(), Some(2));
    assert!(String::from_utf8_lossy(&v.stderr).contains("cannot read spec file"));
}

#[test]
fn bad_cli_arguments_exit_2() {
    let o = Command::new(gantry_bin())
        .args(["scale", "web", "many"])
        .output()
        .unwrap();
    assert_eq!(o.status.code(), Some(2));
    assert!(String::from_utf8_lossy(&o.stderr).contains("invalid value 'many'"));
    let o = Command::new(gantry_bin())
        .arg("frobnicate")
        .output()
        .unwrap();
    assert_eq!(o.status.code(), Some(2));
}

#[test]
fn cli_without_running_gantry_says_so() {
    let dir = tempfile::tempdir().unwrap();
    let spec = dir.path().join("gantry.toml");
    std::fs::write(&spec, "[services.a]\ncommand = [\"x\"]\n").unwrap();
    let o = Command::new(gantry_bin())
        .arg("-f")
        .arg(&spec)
        .arg("ps")
        .output()
        .unwrap();
    assert_eq!(o.status.code(), Some(1));
    assert!(
        String::from_utf8_lossy(&o.stderr).contains("gantry is not running"),
        "{}",
        String::from_utf8_lossy(&o.stderr)
    );
}

#[test]
fn ps_logs_and_listings() {
    let g = Gantry::start(
        r#"
[services.web]
command = ["{TESTSVC}"]
version = "2.3.4"
replicas = 2
[[services.web.routes]]
path_prefix = "/web"
strip_prefix = true
"#,
    );
    g.wait_healthy("web", 2, Duration::from_secs(20));
    let ps = g.cli(&["ps"]);
    let text = String::from_utf8_lossy(&ps.stdout);
    let mut lines = text.lines();
    let header = lines.next().unwrap();
    assert_eq!(
        header.split_whitespace().collect::<Vec<_>>(),
        ["SERVICE", "INSTANCE", "VERSION", "PID", "PORT", "STATE", "UPTIME", "RESTARTS"]
    );
    let rows: Vec<Vec<&str>> = lines.map(|l| l.split_whitespace().collect()).collect();
    assert_eq!(rows.len(), 2, "{text}");
    assert!(rows
        .iter()
        .all(|r| r[0] == "web" && r[2] == "2.3.4" && r[5] == "healthy" && r[7] == "0"));
    // Columns are aligned: every STATE starts at the header's STATE column.
    let col = header.find("STATE").unwrap();
    assert!(
        text.lines().skip(1).all(|l| &l[col..col + 7] == "healthy"),
        "{text}"
    );
    let json: serde_json::Value = serde_json::from_slice(&g.cli(&["ps", "--json"]).stdout).unwrap();
    assert_eq!(json.as_array().unwrap().len(), 2);
    for cmd in [
        &["services", "--json"][..],
        &["routes", "--json"],
        &["registry", "ls", "--json"],
        &["config", "list", "--json"],
    ] {
        let o = g.cli(cmd);
        assert!(o.status.success(), "{cmd:?}");
        serde_json::from_slice::<serde_json::Value>(&o.stdout)
            .unwrap_or_else(|e| panic!("{cmd:?}: {e}"));
    }

    // Logs: startup lines, then a followed line written later.
    let logs = String::from_utf8_lossy(&g.cli(&["logs", "web"]).stdout).into_owned();
    assert!(logs.contains("web-1 | web-1 listening on"), "{logs}");
    let mut follow = Command::new(gantry_bin())
        .arg("-f")
        .arg(&g.spec)
        .args(["logs", "web", "-f", "--instance", "web-2", "--json"])
        .stdout(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    std::thread::sleep(Duration::from_millis(300));
    let web2 = g
        .instances("web")
        .into_iter()
        .find(|i| i["id"] == "web-2")
        .unwrap();
    let addr = format!("127.0.0.1:{}", web2["port"]).parse().unwrap();
    let r = http(
        addr,
        "GET",
        "/log?msg=marker-line&stream=stderr",
        &[],
        None,
        Duration::from_secs(5),
    )
    .unwrap();
    assert_eq!(r.status, 200);
    let mut out = follow.stdout.take().unwrap();
    let reader = std::thread::spawn(move || {
        use std::io::BufRead;
        let mut lines = std::io::BufReader::new(&mut out).lines();
        let mut found = None;
        for l in lines.by_ref().take(50) {
            let l = l.unwrap();
            if l.contains("marker-line") {
                found = Some(l);
                break;
            }
        }
        found
    });
    wait_for("followed line", Duration::from_secs(10), || {
        reader.is_finished().then_some(())
    });
    let line = reader
        .join()
        .unwrap()
        .expect("marker line in followed logs");
    let v: serde_json::Value = serde_json::from_str(&line).unwrap();
    assert_eq!(v["instance"], "web-2");
    assert_eq!(v["stream"], "stderr");
    let _ = follow.kill();
    let _ = follow.wait();

    let bad = g.cli(&["logs", "nope"]);
    assert_eq!(bad.status.code(), Some(2));
    let bad = g.cli(&["logs", "--since", "yesterday-ish"]);
    assert_eq!(bad.status.code(), Some(2));
    assert!(String::from_utf8_lossy(&bad.stderr).contains("since"));
}

#[test]
fn the_open_file_soft_limit_is_raised_to_the_hard_limit() {
    // Started with a soft limit of 256 (a client and an upstream connection each cost one):
    // gantry raises it to the hard limit at once, as nginx's worker_rlimit_nofile does, and
    // says so.
    let g = Gantry::start_with_soft_nofile("", 256);
    let limits = std::fs::read_to_string(format!("/proc/{}/limits", g.pid())).unwrap();
    let line = limits
        .lines()
        .find(|l| l.starts_with("Max open files"))
        .unwrap();
    let nums: Vec<&str> = line.split_whitespace().skip(3).take(2).collect();
    assert_eq!(
        nums[0], nums[1],
        "soft limit raised to the hard one: {line}"
    );
    assert_ne!(nums[0], "256", "{line}");
    let out = wait_for(
        "the start-up log line",
        std::time::Duration::from_secs(5),
        || {
            let o = g.output();
            o.contains("open-file limit raised").then_some(o)
        },
    );
    let line = out
        .lines()
        .find(|l| l.contains("open-file limit raised"))
        .unwrap();
    assert!(line.contains("256") && line.contains(nums[0]), "{line}");
}

/// Found when tried as a new user would: options after the command, `logs -f`, rewrites in
/// `gantry routes`, no colour codes in a file, earlier state said at start, `--fresh`, and no
/// probe failures counted while a new instance starts.
#[test]
fn new_user_papercuts() {
    let mut g = Gantry::start(
        r#"
[services.web]
command = ["{TESTSVC}"]
env = { TESTSVC_START_DELAY_MS = "300" }
health = { type = "http", path = "/health" }
[[services.web.routes]]
path_prefix = "/web"
strip_prefix = true
"#,
    );
    g.wait_healthy("web", 1, Duration::from_secs(20));
    let spec = g.spec.display().to_string();
    // The spec file after the command, as docker and kubectl users write it.
    let out = std::process::Command::new(gantry_bin())
        .args(["ps", "-f", &spec])
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(String::from_utf8_lossy(&out.stdout).contains("web-1"));
    // `logs NAME -f --file F` follows: it is still running after a while.
    let mut follow = std::process::Command::new(gantry_bin())
        .args(["logs", "web", "-f", "--file", &spec])
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    std::thread::sleep(Duration::from_millis(700));
    assert!(
        follow.try_wait().unwrap().is_none(),
        "logs -f should keep following"
    );
    let _ = follow.kill();
    let _ = follow.wait();
    // Rewrites show in `gantry routes`.
    let out = g.cli(&["routes"]);
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(
        text.contains("REWRITE") && text.contains("strip prefix"),
        "{text}"
    );
    // Output to a file has no colour codes.
    assert!(
        !g.output().contains('\u{1b}'),
        "escape codes in redirected output"
    );
    // A new instance's unanswered probes are "starting", not failures.
    let m = g.metrics();
    assert!(
        !m.contains(r#"gantry_supervisor_health_checks_total{service="web",result="fail"}"#),
        "{m}"
    );
    assert!(m.contains(r#"result="starting""#), "{m}");

    // State an earlier run left is said at start; --fresh forgets it.
    assert!(g.cli(&["scale", "web", "2"]).status.success());
    let r = g.admin_call(
        "PUT",
        "/v1/routes/extra",
        Some(&serde_json::json!({"service": "web", "route": {"path_prefix": "/extra"}})),
    );
    assert_eq!(r.status, 200);
    g.stop();
    g.launch();
    g.wait_healthy("web", 2, Duration::from_secs(20));
    let out = g.output();
    assert!(
        out.contains("kept from earlier runs: 1 route(s) added over the API")
            && out.contains("scale or deployed versions of web")
            && out.contains("--fresh"),
        "{out}"
    );
    g.stop();
    g.launch_with(&["--fresh"]);
    g.wait_healthy("web", 1, Duration::from_secs(20));
    assert_eq!(g.get("/extra/x").status, 404);
    assert_eq!(g.instances("web").len(), 1);
}
