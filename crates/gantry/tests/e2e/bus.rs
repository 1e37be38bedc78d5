//! The message bus end to end: CloudEvents made by the CloudEvents SDK (PyPI) published in
//! every mode, pushed to a service that parses them with the same SDK, retried, dead-lettered,
//! inspected and redriven by the CLI; bad input refused with nothing stored; and acknowledged
//! publishes surviving a kill -9 of gantry on both store backends.

use std::collections::{BTreeMap, BTreeSet};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use serde_json::Value;

use crate::common::*;

fn records(path: &std::path::Path) -> Vec<Value> {
    std::fs::read_to_string(path)
        .unwrap_or_default()
        .lines()
        .filter_map(|l| serde_json::from_str(l).ok())
        .collect()
}

fn attempts_of(recs: &[Value], id: &str) -> usize {
    recs.iter().filter(|r| r["id"] == id).count()
}

fn sink_spec(store: &str, record: &std::path::Path, topic_extra: &str, sub_extra: &str) -> String {
    sink_spec_slow(store, record, topic_extra, sub_extra, 0)
}

fn sink_spec_slow(
    store: &str,
    record: &std::path::Path,
    topic_extra: &str,
    sub_extra: &str,
    slow_ms: u64,
) -> String {
    format!(
        r#"{store}
[bus.topics.orders]
{topic_extra}

[services.sink]
command = ["python3", "-u", "{script}"]
env = {{ RECORD = "{record}", SLOW_MS = "{slow_ms}" }}
health = {{ type = "http", path = "/health", interval_ms = 200 }}
[[services.sink.subscribe]]
topic = "orders"
path = "/events"
start = "earliest"
{sub_extra}
"#,
        script = fixture("ce_subscriber.py"),
        record = record.display(),
    )
}

fn cli_ok(g: &Gantry, args: &[&str]) -> String {
    let out = g.cli(args);
    let text = String::from_utf8_lossy(&out.stdout).into_owned();
    assert!(
        out.status.success(),
        "gantry {args:?}: {text}{}",
        String::from_utf8_lossy(&out.stderr)
    );
    text
}

#[test]
fn bus_carries_cloudevents_from_the_sdk_retries_dead_letters_and_refuses_bad_input() {
    let dir = tempfile::tempdir().unwrap();
    let record = dir.path().join("record.jsonl");
    let g = Gantry::start(&sink_spec(
        "",
        &record,
        "max_message_bytes = 4096",
        "max_attempts = 3\nbackoff_initial_ms = 100\nbackoff_max_ms = 400",
    ));
    g.wait_healthy("sink", 1, Duration::from_secs(30));

    // The SDK publishes: structured, binary, a poison, a batch of two, a duplicate.
    let out = std::process::Command::new("python3")
        .arg(fixture("ce_publisher.py"))
        .args([&format!("http://{}", g.admin), &g.token, "orders"])
        .output()
        .unwrap();
    let text = String::from_utf8_lossy(&out.stdout).into_owned();
    assert!(
        out.status.success(),
        "{text}{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let answers: Vec<Value> = text
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect();
    assert_eq!(answers.len(), 5, "{text}");
    assert!(answers.iter().all(|a| a["status"] == 201), "{text}");
    let first = &answers[0]["answer"]["messages"][0];
    let dup = &answers[4]["answer"]["messages"][0];
    assert_eq!(
        (dup["duplicate"].clone(), dup["seq"].clone()),
        (Value::Bool(true), first["seq"].clone())
    );
    assert_eq!(
        answers[3]["answer"]["messages"].as_array().unwrap().len(),
        2
    );

    // Each delivered, parsed by the SDK on the other side; the poison tried 3 times.
    wait_for("deliveries", Duration::from_secs(30), || {
        let r = records(&record);
        (["s-1", "b-1", "c-1", "c-2"]
            .iter()
            .all(|id| attempts_of(&r, id) == 1)
            && attempts_of(&r, "p-1") == 3)
            .then_some(())
    });
    let r = records(&record);
    let by_id: BTreeMap<String, &Value> = r
        .iter()
        .map(|v| (v["id"].as_str().unwrap().to_string(), v))
        .collect();
    assert_eq!(by_id["s-1"]["data"], r#"{"n": 1, "what": "structured"}"#);
    assert_eq!(by_id["s-1"]["type"], "order.placed");
    assert_eq!(by_id["s-1"]["source"], "/e2e/publisher");
    assert_eq!(by_id["b-1"]["data"], r#"{"n": 2, "what": "binary"}"#);
    assert_eq!(by_id["b-1"]["key"], "k1");
    assert_eq!(by_id["c-2"]["data"], r#"{"n": 12}"#);
    let mut poison_attempts: Vec<u64> = r
        .iter()
        .filter(|v| v["id"] == "p-1")
        .map(|v| v["attempt"].as_u64().unwrap())
        .collect();
    poison_attempts.sort();
    assert_eq!(poison_attempts, vec![1, 2, 3]);

    // The dead letter, by CLI, with why.
    let dead: Value = wait_for("the dead letter", Duration::from_secs(10), || {
        let v: Value = serde_json::from_str(&cli_ok(
            &g,
            &["bus", "dead-letters", "orders", "sink", "--json"],
        ))
        .unwrap();
        (v.as_array().unwrap().len() == 1).then_some(v)
    });
    let e = &dead[0]["event"];
    assert_eq!(
        (
            e["id"].as_str(),
            e["gantryreason"].as_str(),
            e["gantryattempts"].as_str()
        ),
        (Some("p-1"), Some("HTTP 500"), Some("3"))
    );
    assert!(cli_ok(&g, &["bus", "dead-letters", "orders", "sink"]).contains("HTTP 500"));
    wait_for("lag 0", Duration::from_secs(10), || {
        let s = g.admin_get("/v1/topics/orders/subscriptions/sink");
        (s["lag"] == 0 && s["dead_letters"] == 1).then_some(())
    });
    let subs = cli_ok(&g, &["bus", "subs"]);
    assert!(subs.contains("push sink/events"), "{subs}");

    // Redrive: three more attempts (the service still refuses it).
    assert!(cli_ok(&g, &["bus", "redrive", "orders", "sink"]).starts_with("1 dead letter"));
    wait_for("redriven attempts", Duration::from_secs(20), || {
        (attempts_of(&records(&record), "p-1") == 6).then_some(())
    });

    // The CLI publishes too (an id, an ordering key).
    let said = cli_ok(
        &g,
        &[
            "bus",
            "publish",
            "orders",
            "--data",
            r#"{"x":1}"#,
            "--id",
            "cli-1",
            "--key",
            "k9",
        ],
    );
    assert!(said.starts_with("cli-1 seq "), "{said}");
    wait_for("the CLI's message", Duration::from_secs(10), || {
        records(&record)
            .iter()
            .find(|v| v["id"] == "cli-1")
            .map(|v| {
                assert_eq!(
                    (v["data"].as_str(), v["key"].as_str()),
                    (Some(r#"{"x": 1}"#), Some("k9"))
                )
            })
    });

    // Bad input: a clear 4xx each, and nothing stored.
    let last = g.admin_get("/v1/topics/orders")["last_seq"].clone();
    let auth = format!("Bearer {}", g.token);
    let publish = |headers: &[(&str, &str)], body: &str, topic: &str| {
        let mut h = vec![("authorization", auth.as_str())];
        h.extend_from_slice(headers);
        http(
            g.admin,
            "POST",
            &format!("/v1/topics/{topic}/messages"),
            &h,
            Some(body),
            Duration::from_secs(10),
        )
        .unwrap()
    };
    let big = "x".repeat(5000);
    let r = publish(&[("content-type", "text/plain")], &big, "orders");
    assert_eq!(r.status, 413, "{}", r.body);
    assert!(r.body.contains("4096"), "{}", r.body);
    let r = publish(
        &[("content-type", "application/cloudevents+json")],
        r#"{"specversion":"1.0","source":"/s","type":"t"}"#,
        "orders",
    );
    assert_eq!(r.status, 400, "{}", r.body);
    assert!(r.body.contains("id"), "{}", r.body);
    let r = publish(
        &[("content-type", "application/cloudevents-batch+json")],
        r#"[{"specversion":"1.0","id":"ok-1","source":"/s","type":"t"},{"specversion":"0.3","id":"2","source":"/s","type":"t"}]"#,
        "orders",
    );
    assert_eq!(r.status, 400, "{}", r.body);
    assert!(r.body.contains("event 1"), "{}", r.body);
    let r = publish(&[("ce-id", "1"), ("ce-source", "/s")], "x", "orders");
    assert_eq!(r.status, 400, "{}", r.body);
    let r = publish(&[], "x", "nope");
    assert_eq!(r.status, 404, "{}", r.body);
    let r = publish(&[], "x", "Bad.Topic");
    assert_eq!(r.status, 400, "{}", r.body);
    assert_eq!(g.admin_get("/v1/topics/orders")["last_seq"], last);
    assert!(g.cli(&["bus", "replay", "orders", "sink"]).status.code() == Some(2));

    // Replay from the start: everything again.
    let before = attempts_of(&records(&record), "s-1");
    let said = cli_ok(&g, &["bus", "replay", "orders", "sink", "--from-seq", "1"]);
    assert!(said.contains("from seq 1"), "{said}");
    wait_for("replayed", Duration::from_secs(20), || {
        (attempts_of(&records(&record), "s-1") == before + 1).then_some(())
    });

    // A reload makes the spec's new topics; dropping a subscription from the spec removes it.
    let mut text = sink_spec(
        "",
        &record,
        "max_message_bytes = 4096",
        "max_attempts = 3\nbackoff_initial_ms = 100\nbackoff_max_ms = 400",
    );
    text.push_str("\n[bus.topics.audit]\nmax_messages = 100\n");
    g.rewrite_and_reload(&text);
    assert_eq!(g.admin_get("/v1/topics/audit")["messages"], 0);
    assert!(g.admin_get("/v1/subscriptions").as_array().unwrap().len() == 1);

    // Counted.
    let m = g.metrics();
    assert!(
        m.contains("gantry_bus_published_total{topic=\"orders\"}"),
        "{m}"
    );
    assert!(
        m.contains("gantry_bus_dead_lettered_total{topic=\"orders\",subscription=\"sink\"}"),
        "{m}"
    );
    assert!(
        m.contains("gantry_bus_duplicates_total{topic=\"orders\"} 1"),
        "{m}"
    );
}

/// Writers publish (each message with an id of its own) while gantry is SIGKILLed: after the
/// restart every publish that was acknowledged reaches the subscriber (at least once).
fn acknowledged_messages_survive_kill_9(store: &str) {
    let dir = tempfile::tempdir().unwrap();
    let record = dir.path().join("record.jsonl");
    let mut g = Gantry::start(&sink_spec(
        store,
        &record,
        "",
        "max_in_flight = 16\nbackoff_initial_ms = 50",
    ));
    g.wait_healthy("sink", 1, Duration::from_secs(30));
    let acked = Arc::new(Mutex::new(BTreeSet::<String>::new()));
    let stop = Arc::new(AtomicBool::new(false));
    let (admin, token) = (g.admin, g.token.clone());
    let writers: Vec<_> = (0..4)
        .map(|w| {
            let (acked, stop, token) = (acked.clone(), stop.clone(), token.clone());
            std::thread::spawn(move || {
                let auth = format!("Bearer {token}");
                for i in 0..5000 {
                    if stop.load(Ordering::Relaxed) {
                        return;
                    }
                    let id = format!("w{w}-{i}");
                    match http(
                        admin,
                        "POST",
                        "/v1/topics/orders/messages",
                        &[
                            ("authorization", &auth),
                            ("content-type", "application/json"),
                            ("gantry-message-id", &id),
                        ],
                        Some(r#"{"n":1}"#),
                        Duration::from_secs(5),
                    ) {
                        Ok(r) if r.status == 201 => {
                            acked.lock().unwrap().insert(id);
                        }
                        Ok(_) => {}
                        Err(_) => return,
                    }
                }
            })
        })
        .collect();
    std::thread::sleep(Duration::from_millis(1500));
    g.kill();
    stop.store(true, Ordering::Relaxed);
    for w in writers {
        w.join().unwrap();
    }
    let acked = acked.lock().unwrap().clone();
    assert!(
        acked.len() > 50,
        "only {} publishes before the kill",
        acked.len()
    );
    g.launch();
    wait_for(
        "every acknowledged message delivered",
        Duration::from_secs(90),
        || {
            let got: BTreeSet<String> = records(&record)
                .iter()
                .filter_map(|v| v["id"].as_str().map(str::to_string))
                .collect();
            let missing = acked.difference(&got).count();
            (missing == 0).then_some(())
        },
    );
    // And the subscription catches up.
    wait_for("lag 0", Duration::from_secs(30), || {
        (g.admin_get("/v1/topics/orders/subscriptions/sink")["lag"] == 0).then_some(())
    });
}

#[test]
fn embedded_bus_delivers_every_acknowledged_message_after_kill_9() {
    acknowledged_messages_survive_kill_9("");
}

#[test]
fn nats_bus_delivers_every_acknowledged_message_after_kill_9() {
    let ns = crate::store::Namespace::new();
    acknowledged_messages_survive_kill_9(&format!(
        "[store]\nbackend = \"nats\"\nurl = \"{}\"\nnamespace = \"{}\"\n",
        crate::store::nats_url(),
        ns.0
    ));
}

/// The subscriber is killed (-9) with messages in flight: the supervisor restarts it, and what
/// it had not answered is delivered again (a second attempt), nothing lost.
#[test]
fn a_killed_subscriber_gets_its_messages_again() {
    let dir = tempfile::tempdir().unwrap();
    let record = dir.path().join("record.jsonl");
    let g = Gantry::start(&sink_spec_slow(
        "",
        &record,
        "",
        "max_in_flight = 8\nbackoff_initial_ms = 100\nbackoff_max_ms = 500",
        150,
    ));
    g.wait_healthy("sink", 1, Duration::from_secs(30));
    let pid = g.instances("sink")[0]["pid"].as_u64().unwrap() as u32;
    let auth = format!("Bearer {}", g.token);
    for i in 0..40 {
        let id = format!("k-{i}");
        let r = http(
            g.admin,
            "POST",
            "/v1/topics/orders/messages",
            &[
                ("authorization", &auth),
                ("content-type", "application/json"),
                ("gantry-message-id", &id),
            ],
            Some(r#"{"n":1}"#),
            Duration::from_secs(5),
        )
        .unwrap();
        assert_eq!(r.status, 201, "{}", r.body);
    }
    wait_for("deliveries in flight", Duration::from_secs(10), || {
        (records(&record).len() >= 10).then_some(())
    });
    signal(pid, libc::SIGKILL);
    let deadline = std::time::Instant::now() + Duration::from_secs(60);
    loop {
        let r = records(&record);
        let ids: BTreeSet<&str> = r.iter().filter_map(|v| v["id"].as_str()).collect();
        if ids.len() == 40 {
            break;
        }
        assert!(
            std::time::Instant::now() < deadline,
            "{} of 40 delivered; subscription: {}; dead letters: {}",
            ids.len(),
            g.admin_get("/v1/topics/orders/subscriptions/sink"),
            g.admin_get("/v1/topics/orders/subscriptions/sink/dead-letters")
        );
        std::thread::sleep(Duration::from_millis(50));
    }
    wait_for("lag 0", Duration::from_secs(30), || {
        (g.admin_get("/v1/topics/orders/subscriptions/sink")["lag"] == 0).then_some(())
    });
    // Those in flight at the kill went out again.
    let r = records(&record);
    assert!(
        r.iter().any(|v| v["attempt"].as_u64() >= Some(2)),
        "no redelivery after the kill: {r:?}"
    );
    let new_pid = g.instances("sink")[0]["pid"].as_u64().unwrap() as u32;
    assert_ne!(new_pid, pid, "restarted");
}

#[test]
fn services_publish_through_the_gateway_with_their_workload_token() {
    let dir = tempfile::tempdir().unwrap();
    let record = dir.path().join("record.jsonl");
    let spec = sink_spec("", &record, "", "").replace(
        r#"SLOW_MS = "0""#,
        r#"SLOW_MS = "0", PUBLISH_TO = "orders""#,
    );
    let g = Gantry::start(&spec);
    g.wait_healthy("sink", 1, Duration::from_secs(30));

    // The service published its own message on the gateway (GANTRY_BUS_URL, its workload
    // token) as a plain body with an id and an ordering key; the bus pushed it back.
    let got = wait_for(
        "its own message, pushed back",
        Duration::from_secs(20),
        || records(&record).into_iter().find(|v| v["id"] == "self-1"),
    );
    let r = records(&record);
    let published = r.iter().find(|v| v.get("published").is_some()).unwrap();
    assert_eq!(published["published"], 201, "{r:?}");
    assert_eq!(
        published["url"],
        format!("http://{}/_gantry/topics/orders/messages", g.gateway)
    );
    assert_eq!(
        (got["key"].clone(), got["data"].clone()),
        ("k-self".into(), "self".into())
    );
    assert_eq!(got["source"], "/topics/orders");
    let stored = || {
        g.admin_get("/v1/topics/orders")["messages"]
            .as_u64()
            .unwrap()
    };
    assert_eq!(stored(), 1);

    // Without a credential, or with a forged one, nothing is stored.
    for auth in [None, Some("Bearer not-a-token")] {
        let mut h = vec![("content-type", "text/plain")];
        if let Some(a) = auth {
            h.push(("authorization", a));
        }
        let r = http(
            g.gateway,
            "POST",
            "/_gantry/topics/orders/messages",
            &h,
            Some("x"),
            Duration::from_secs(5),
        )
        .unwrap();
        assert_eq!(r.status, 401, "{auth:?}: {}", r.body);
    }
    assert_eq!(stored(), 1);

    // The route reaches the topics and nothing else of the admin API.
    let admin = format!("Bearer {}", g.token);
    let r = http(
        g.gateway,
        "GET",
        "/_gantry/topics",
        &[("authorization", &admin)],
        None,
        Duration::from_secs(5),
    )
    .unwrap();
    assert_eq!(r.status, 200, "{}", r.body);
    assert!(r.body.contains("\"orders\""), "{}", r.body);
    for path in [
        "/_gantry/topics/../identity/users",
        "/_gantry/topics/%2e%2e/identity/users",
        "/_gantry/topics/..%2fidentity%2fusers",
        "/_gantry/topics/%2E%2E%2F..%2Fv1%2Fusers",
        "/_gantry/topics/../../v1/identity/users",
        "/_gantry/topicsx",
    ] {
        let r = http(
            g.gateway,
            "GET",
            path,
            &[("authorization", &admin)],
            None,
            Duration::from_secs(5),
        )
        .unwrap();
        assert!(
            (400..500).contains(&r.status) && !r.body.contains("\"username\""),
            "{path}: {} {}",
            r.status,
            r.body
        );
    }
}
