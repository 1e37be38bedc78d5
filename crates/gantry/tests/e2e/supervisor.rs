use std::sync::atomic::Ordering;
use std::time::{Duration, Instant};

use crate::common::*;

const THREE: &str = r#"
[services.web]
command = ["{TESTSVC}"]
replicas = 3
health = { type = "http", path = "/health", interval_ms = 200, timeout_ms = 300, unhealthy_threshold = 2 }
[[services.web.routes]]
path_prefix = "/web"
strip_prefix = true
timeout_ms = 2000
"#;

#[test]
fn requests_spread_over_all_replicas() {
    let g = Gantry::start(&format!(
        "{THREE}\n[services.web.upstream]\nload_balancer = \"round_robin\"\n"
    ));
    g.wait_healthy("web", 3, Duration::from_secs(20));
    let mut counts = std::collections::BTreeMap::<String, usize>::new();
    for _ in 0..30 {
        let r = g.get("/web/hello");
        assert_eq!(r.status, 200, "{}", r.body);
        *counts
            .entry(r.json()["instance"].as_str().unwrap().to_string())
            .or_default() += 1;
    }
    assert_eq!(counts.len(), 3, "{counts:?}");
    // Round robin: an even spread.
    assert!(counts.values().all(|&n| n == 10), "{counts:?}");
}

#[test]
fn kill_9_under_load_fails_no_request_and_restarts() {
    let g = Gantry::start(THREE);
    let before = g.wait_healthy("web", 3, Duration::from_secs(20));
    let victim = before[0]["id"].as_str().unwrap().to_string();
    let victim_pid = before[0]["pid"].as_u64().unwrap() as u32;

    // Steady, bounded load: 4 clients, each at most 3000 requests or until told to stop.
    let load = Load::start(g.gateway, "/web/x", 4, 3000);
    wait_for("load to start", Duration::from_secs(5), || {
        (load.ok.load(Ordering::Relaxed) > 50).then_some(())
    });

    let killed_at = Instant::now();
    signal(victim_pid, libc::SIGKILL);
    // Out of rotation: the gateway's live table no longer lists the instance.
    wait_for(
        "victim out of the route table",
        Duration::from_secs(5),
        || (!g.routed("web/0").contains(&victim)).then_some(()),
    );
    let out_of_rotation = killed_at.elapsed();
    // Keep the load going across the restart.
    let restarted = wait_for(
        "victim restarted and healthy",
        Duration::from_secs(15),
        || {
            g.instances("web").into_iter().find(|i| {
                i["id"] == victim.as_str() && i["state"] == "healthy" && i["restarts"] == 1
            })
        },
    );
    std::thread::sleep(Duration::from_millis(300));
    let (ok, failed) = load.finish();
    println!(
        "kill -9: out of rotation after {:?} (measured by polling the admin API); {} requests ok, {} failed",
        out_of_rotation,
        ok,
        failed.len()
    );
    assert!(
        failed.is_empty(),
        "failed requests: {:?}",
        &failed[..failed.len().min(5)]
    );
    assert!(
        out_of_rotation < Duration::from_millis(1000),
        "{out_of_rotation:?}"
    );
    assert_ne!(restarted["pid"].as_u64().unwrap() as u32, victim_pid);
    assert!(g.routed("web/0").contains(&victim));
}

#[test]
fn hung_instance_is_marked_unhealthy_and_taken_out() {
    let g = Gantry::start(&THREE.replace("replicas = 3", "replicas = 2"));
    let list = g.wait_healthy("web", 2, Duration::from_secs(20));
    let hung = list[0]["id"].as_str().unwrap().to_string();
    let port = list[0]["port"].as_u64().unwrap() as u16;
    let addr = format!("127.0.0.1:{port}").parse().unwrap();
    let r = http(
        addr,
        "POST",
        "/admin/hang",
        &[],
        None,
        Duration::from_secs(2),
    )
    .unwrap();
    assert_eq!(r.status, 200);
    let t0 = Instant::now();
    let row = wait_for("hung instance unhealthy", Duration::from_secs(5), || {
        g.instances("web")
            .into_iter()
            .find(|i| i["id"] == hung.as_str() && i["state"] == "unhealthy")
    });
    println!(
        "hung instance unhealthy after {:?}: {}",
        t0.elapsed(),
        row["reason"]
    );
    assert!(
        row["reason"].as_str().unwrap().contains("timed out"),
        "{row}"
    );
    assert!(!g.routed("web/0").contains(&hung));
    // Traffic only reaches the other instance now.
    for _ in 0..10 {
        let r = g.get("/web/x");
        assert_eq!(r.status, 200);
        assert_ne!(r.json()["instance"], hung.as_str());
    }
}

#[test]
fn graceful_shutdown_leaves_no_process() {
    let mut g = Gantry::start(
        r#"
[services.web]
command = ["{TESTSVC}"]
replicas = 2
env = { TESTSVC_SPAWN_CHILD = "1" }
[services.stubborn]
command = ["{TESTSVC}"]
env = { TESTSVC_IGNORE_TERM = "1" }
stop_timeout_ms = 300
"#,
    );
    let mut groups: Vec<u32> = g
        .wait_healthy("web", 2, Duration::from_secs(20))
        .iter()
        .map(|i| i["pid"].as_u64().unwrap() as u32)
        .collect();
    groups.extend(
        g.wait_healthy("stubborn", 1, Duration::from_secs(20))
            .iter()
            .map(|i| i["pid"].as_u64().unwrap() as u32),
    );
    // Each web group holds the service and its `sleep` child.
    wait_for("children spawned", Duration::from_secs(5), || {
        groups[..2]
            .iter()
            .all(|&pg| group_members(pg).len() >= 2)
            .then_some(())
    });
    let code = g.stop();
    assert_eq!(code, Some(0), "{}", g.output());
    for pg in groups {
        assert!(
            group_members(pg).is_empty(),
            "process group {pg} still has {:?}",
            group_members(pg)
        );
    }
    let out = g.output();
    assert!(
        out.contains("killed after stop_timeout_ms = 300") || out.contains("stopped"),
        "{out}"
    );
}

#[test]
fn sigkill_of_gantry_then_up_reaps_orphans() {
    let mut g = Gantry::start(
        r#"
[services.web]
command = ["{TESTSVC}"]
replicas = 2
env = { TESTSVC_SPAWN_CHILD = "1" }
"#,
    );
    let groups: Vec<u32> = g
        .wait_healthy("web", 2, Duration::from_secs(20))
        .iter()
        .map(|i| i["pid"].as_u64().unwrap() as u32)
        .collect();
    wait_for("children spawned", Duration::from_secs(5), || {
        groups
            .iter()
            .all(|&pg| group_members(pg).len() >= 2)
            .then_some(())
    });
    g.kill();
    // The leaders die with gantry (PR_SET_PDEATHSIG); their `sleep` children are orphans now.
    wait_for("leaders gone", Duration::from_secs(5), || {
        groups
            .iter()
            .all(|&pg| !group_members(pg).contains(&pg))
            .then_some(())
    });
    let orphans: usize = groups.iter().map(|&pg| group_members(pg).len()).sum();
    assert!(
        orphans >= 2,
        "expected orphaned grandchildren to exist before the restart"
    );
    g.launch();
    wait_for("orphans reaped", Duration::from_secs(5), || {
        groups
            .iter()
            .all(|&pg| group_members(pg).is_empty())
            .then_some(())
    });
    assert!(g
        .output()
        .contains("killed process group left by a previous gantry run"));
    g.wait_healthy("web", 2, Duration::from_secs(20));
}

#[test]
fn crash_looping_instance_is_reported_and_backs_off() {
    let g = Gantry::start(
        r#"
[services.bad]
command = ["{TESTSVC}"]
env = { TESTSVC_EXIT_AT_START = "7" }
backoff = { initial_ms = 20, max_ms = 400, crash_loop_restarts = 3, crash_loop_window_ms = 10000 }
"#,
    );
    let row = wait_for("crash loop", Duration::from_secs(10), || {
        g.instances("bad")
            .into_iter()
            .find(|i| i["state"] == "crash_loop")
    });
    assert!(
        row["last_exit"].as_str().unwrap().contains("exit status 7"),
        "{row}"
    );
    assert!(row["restarts"].as_u64().unwrap() >= 2, "{row}");
    // Backoff grows: after 2 s there have been far fewer than 2000/20 restarts.
    std::thread::sleep(Duration::from_secs(2));
    let restarts = g.instances("bad")[0]["restarts"].as_u64().unwrap();
    assert!(restarts < 12, "restarts = {restarts}");
    let metrics = g.metrics();
    assert!(
        metrics.contains("gantry_supervisor_restarts_total{service=\"bad\"}"),
        "{metrics}"
    );
}

#[test]
fn scale_up_takes_traffic_scale_down_drains_and_survives_restart() {
    let mut g = Gantry::start(&format!(
        "{}\n[services.web.upstream]\nload_balancer = \"round_robin\"\n",
        THREE.replace("replicas = 3", "replicas = 1")
    ));
    g.wait_healthy("web", 1, Duration::from_secs(20));
    let out = g.cli(&["scale", "web", "3"]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    g.wait_healthy("web", 3, Duration::from_secs(20));
    let seen: std::collections::BTreeSet<String> = (0..9)
        .map(|_| {
            g.get("/web/").json()["instance"]
                .as_str()
                .unwrap()
                .to_string()
        })
        .collect();
    assert_eq!(seen.len(), 3, "{seen:?}");
    let out = g.cli(&["scale", "web", "2"]);
    assert!(out.status.success());
    assert_eq!(g.instances("web").len(), 2);
    // The scale is durable.
    assert_eq!(g.stop(), Some(0));
    g.launch();
    g.wait_healthy("web", 2, Duration::from_secs(20));
    let bad = g.cli(&["scale", "nope", "2"]);
    assert_eq!(bad.status.code(), Some(2));
    assert!(String::from_utf8_lossy(&bad.stderr).contains("unknown service"));
}

#[test]
fn dependencies_start_first() {
    let g = Gantry::start(
        r#"
[services.api]
command = ["{TESTSVC}"]
depends_on = ["db"]
[services.db]
command = ["{TESTSVC}"]
env = { TESTSVC_START_DELAY_MS = "600" }
"#,
    );
    // While db is starting, api waits.
    let api = g.instances("api");
    assert_eq!(api[0]["state"], "pending", "{api:?}");
    g.wait_healthy("api", 1, Duration::from_secs(20));
    let db = g.instances("db");
    let api = g.instances("api");
    assert!(api[0]["started_ms"].as_u64().unwrap() >= db[0]["since_ms"].as_u64().unwrap());
}

/// A service that daemonizes (new session, its own process group, SIGTERM and SIGHUP ignored)
/// leaves nothing behind: not when gantry stops it, and not after a SIGKILL of gantry either
/// (the next start kills it).
#[test]
fn daemonized_processes_are_contained() {
    let dir = tempfile::tempdir().unwrap();
    let script = dir.path().join("daemonize.sh");
    std::fs::write(
        &script,
        "#!/bin/sh\nsetsid sh -c 'trap \"\" TERM HUP; echo $$ > \"$PIDFILE\"; exec sleep 300' &\nsetsid env -i sh -c 'trap \"\" TERM HUP; echo $$ > \"'\"$PIDFILE\"'.bare\"; exec sleep 301' &\nexec \"$@\"\n",
    )
    .unwrap();
    let pidfile = dir.path().join("daemon.pid");
    let spec = dir.path().join("gantry.toml");
    std::fs::write(
        &spec,
        spec_text(&format!(
            "[services.web]\ncommand = [\"sh\", \"{}\", \"{{TESTSVC}}\"]\nenv = {{ PIDFILE = \"{}\" }}\n",
            script.display(),
            pidfile.display()
        )),
    )
    .unwrap();
    let alive = |pid: i32| std::path::Path::new(&format!("/proc/{pid}")).exists();
    let daemon = |pidfile: &std::path::Path| -> i32 {
        wait_for("the daemon's pid file", Duration::from_secs(10), || {
            std::fs::read_to_string(pidfile).ok()?.trim().parse().ok()
        })
    };
    let mut g = Gantry::start_at(dir, spec);
    g.wait_healthy("web", 1, Duration::from_secs(20));
    let first = daemon(&pidfile);
    assert!(alive(first));
    // Its own process group: the instance's group kill does not reach it.
    let pgid = |pid: i32| -> i32 {
        let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).unwrap();
        let rest = &stat[stat.rfind(')').unwrap() + 1..];
        rest.split_whitespace().nth(2).unwrap().parse().unwrap()
    };
    let leader = g.instances("web")[0]["pid"].as_i64().unwrap() as i32;
    assert_ne!(pgid(first), pgid(leader));
    // A daemon that also cleared its environment: only a cgroup still holds it.
    let bare_file = std::path::PathBuf::from(format!("{}.bare", pidfile.display()));
    let bare = daemon(&bare_file);
    let cgroups = g
        .output()
        .contains("each instance runs in a cgroup of its own");
    // Stopped with gantry.
    assert_eq!(g.stop(), Some(0));
    wait_for(
        "the daemon to be gone after a stop",
        Duration::from_secs(5),
        || (!alive(first)).then_some(()),
    );
    if cgroups {
        wait_for(
            "the environment-less daemon to be gone (its cgroup)",
            Duration::from_secs(5),
            || (!alive(bare)).then_some(()),
        );
    } else {
        eprintln!("no cgroup v2 here: the environment-less daemon is not contained");
        signal(bare as u32, libc::SIGKILL);
    }

    // After a SIGKILL of gantry the daemon outlives it, until the next start.
    std::fs::remove_file(&pidfile).unwrap();
    g.launch();
    g.wait_healthy("web", 1, Duration::from_secs(20));
    let second = daemon(&pidfile);
    g.kill();
    std::thread::sleep(Duration::from_millis(300));
    assert!(
        alive(second),
        "a daemon survives a SIGKILL of gantry (until the next start)"
    );
    g.launch();
    wait_for(
        "the next start to kill the leftover daemon",
        Duration::from_secs(10),
        || (!alive(second)).then_some(()),
    );
    g.wait_healthy("web", 1, Duration::from_secs(20));
}
