//! The bus against real parts: the gateway's upstream call to subscriber instances listening
//! on real sockets (axum), a real registry snapshot, and both logs (the embedded one and
//! JetStream on the nats-server `scripts/test` makes sure of). Each case runs on both.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::collections::{BTreeMap, HashMap};
use std::net::SocketAddr;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use axum::extract::State;
use axum::http::{HeaderMap, StatusCode};
use bytes::Bytes;
use gantry_bus::{message, Bus, Mode, Start, Subscription};
use gantry_gateway::{Gateway, GatewayConfig};
use gantry_model::{Health, Instance, InstanceSource, RegistrySnapshot};
use gantry_store::{Log, NatsLog, NatsOptions, NatsStore, ReadFrom, RedbStore, SegmentLog, Store};

/// One delivery as a subscriber instance saw it.
#[derive(Debug, Clone)]
struct Seen {
    instance: &'static str,
    id: String,
    key: Option<String>,
    attempt: u32,
    body: String,
    at: Instant,
    traceparent: Option<String>,
}

/// What subscriber instances share: what they saw, and how they answer.
#[derive(Default)]
struct Sink {
    seen: Mutex<Vec<Seen>>,
    /// Per key, deliveries in progress (ordering: never more than one).
    busy: Mutex<HashMap<String, u32>>,
    overlaps: AtomicU64,
}

async fn handle(
    State((name, sink)): State<(&'static str, Arc<Sink>)>,
    headers: HeaderMap,
    body: Bytes,
) -> StatusCode {
    let h = |k: &str| headers.get(k).map(|v| v.to_str().unwrap().to_string());
    let body = String::from_utf8_lossy(&body).into_owned();
    let seen = Seen {
        instance: name,
        id: h("ce-id").unwrap_or_default(),
        key: h("ce-partitionkey"),
        attempt: h("gantry-delivery-attempt").unwrap().parse().unwrap(),
        body: body.clone(),
        at: Instant::now(),
        traceparent: h("traceparent"),
    };
    if let Some(k) = &seen.key {
        let mut b = sink.busy.lock().unwrap();
        let n = b.entry(k.clone()).or_default();
        *n += 1;
        if *n > 1 {
            sink.overlaps.fetch_add(1, Ordering::Relaxed);
        }
    }
    let attempt = seen.attempt;
    let key = seen.key.clone();
    sink.seen.lock().unwrap().push(seen);
    if body.starts_with("slow") {
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    if let Some(k) = key {
        *sink.busy.lock().unwrap().get_mut(&k).unwrap() -= 1;
    }
    // "fail-N": fails its first N attempts; "poison": always.
    if body == "poison" {
        return StatusCode::INTERNAL_SERVER_ERROR;
    }
    if let Some(n) = body.strip_prefix("fail-") {
        if attempt <= n.parse::<u32>().unwrap() {
            return StatusCode::SERVICE_UNAVAILABLE;
        }
    }
    StatusCode::OK
}

async fn instance_server(name: &'static str, sink: Arc<Sink>) -> SocketAddr {
    let app = axum::Router::new()
        .route("/events", axum::routing::post(handle))
        .with_state((name, sink));
    let l = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = l.local_addr().unwrap();
    tokio::spawn(async move { axum::serve(l, app).await.unwrap() });
    addr
}

struct World {
    bus: Arc<Bus>,
    log: Arc<dyn Log>,
    store: Arc<dyn Store>,
    gateway: Arc<Gateway>,
    sink: Arc<Sink>,
    nats: Option<Arc<NatsStore>>,
    _dir: Option<tempfile::TempDir>,
}

impl World {
    async fn cleanup(self) {
        self.bus.stop().await;
        if let Some(n) = self.nats {
            n.destroy_namespace().await.unwrap();
        }
    }
}

/// A gateway that routes service `billing` to two subscriber instances.
async fn gateway(sink: &Arc<Sink>) -> Arc<Gateway> {
    let spec = gantry_spec::parse(
        "[services.billing]\nendpoints = [\"127.0.0.1:1\"]\n",
        std::path::Path::new("t.toml"),
    )
    .unwrap();
    let gw = Gateway::new(
        GatewayConfig {
            node: "n".into(),
            ..GatewayConfig::default()
        },
        &gantry_telemetry::Metrics::new(),
    );
    gw.apply_model(spec.gateway_model(std::path::Path::new(".")));
    let mut list = Vec::new();
    for name in ["billing-1", "billing-2"] {
        let addr = instance_server(name, sink.clone()).await;
        list.push(Arc::new(Instance {
            id: name.into(),
            service: "billing".into(),
            version: semver::Version::new(1, 0, 0),
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
        }));
    }
    let mut services = gantry_model::ServiceMap::new();
    services.insert(Arc::<str>::from("billing"), list.into());
    gw.apply_registry(&Arc::new(RegistrySnapshot {
        revision: 1,
        services,
        changed: vec!["billing".into()],
        since: 0,
    }));
    gw
}

async fn embedded() -> World {
    let dir = tempfile::tempdir().unwrap();
    let log: Arc<dyn Log> = Arc::new(SegmentLog::open(&dir.path().join("log")).unwrap());
    let store: Arc<dyn Store> = Arc::new(RedbStore::open(&dir.path().join("store")).unwrap());
    let sink = Arc::new(Sink::default());
    let gw = gateway(&sink).await;
    let bus = Bus::open(
        log.clone(),
        store.clone(),
        gw.clone(),
        &gantry_telemetry::Metrics::new(),
    )
    .await
    .unwrap();
    World {
        bus,
        log,
        store,
        gateway: gw,
        sink,
        nats: None,
        _dir: Some(dir),
    }
}

async fn nats() -> World {
    static N: AtomicU64 = AtomicU64::new(0);
    let url =
        std::env::var("GANTRY_TEST_NATS_URL").unwrap_or_else(|_| "nats://127.0.0.1:4222".into());
    let mut o = NatsOptions::new(url);
    o.namespace = format!(
        "b{}-{}-{}",
        std::process::id(),
        N.fetch_add(1, Ordering::Relaxed),
        std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .unwrap()
            .subsec_nanos()
            % 100_000
    );
    let n = Arc::new(
        NatsStore::connect(o)
            .await
            .expect("these tests need a nats-server with JetStream; scripts/test starts one"),
    );
    let log: Arc<dyn Log> = Arc::new(NatsLog::new(n.clone()));
    let sink = Arc::new(Sink::default());
    let gw = gateway(&sink).await;
    let bus = Bus::open(
        log.clone(),
        n.clone(),
        gw.clone(),
        &gantry_telemetry::Metrics::new(),
    )
    .await
    .unwrap();
    World {
        bus,
        log,
        store: n.clone(),
        gateway: gw,
        sink,
        nats: Some(n),
        _dir: None,
    }
}

macro_rules! suite {
    ($($case:ident),* $(,)?) => {
        mod on_embedded {
            $(
                #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
                async fn $case() {
                    let w = super::embedded().await;
                    let w = super::$case(w).await;
                    w.cleanup().await;
                }
            )*
        }
        mod on_nats {
            $(
                #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
                async fn $case() {
                    let w = super::nats().await;
                    let w = super::$case(w).await;
                    w.cleanup().await;
                }
            )*
        }
    };
}

suite!(
    every_message_reaches_one_instance_once,
    failures_back_off_then_dead_letter_and_redrive,
    ordering_keys_one_at_a_time_in_order,
    duplicates_are_dropped_and_replay_redelivers,
    pull_fetch_ack_nack_and_deadlines,
    a_restarted_bus_delivers_what_was_not_acknowledged,
);

fn push_sub(topic: &str) -> Subscription {
    Subscription {
        topic: topic.into(),
        name: "billing".into(),
        mode: Mode::Push {
            service: "billing".into(),
            path: "/events".into(),
            timeout_ms: 2000,
        },
        max_attempts: 4,
        backoff_initial_ms: 100,
        backoff_max_ms: 400,
        max_in_flight: 16,
        ordered: true,
        start: Start::Earliest,
        from_spec: false,
    }
}

fn plain(body: &str, id: Option<&str>, key: Option<&str>) -> gantry_bus::Message {
    let mut m = gantry_bus::text_message("orders", body.to_string());
    if let Some(id) = id {
        m.id = id.into();
        m.generated_id = false;
    }
    if let Some(k) = key {
        m.extensions.insert("partitionkey".into(), k.into());
    }
    m
}

/// Wait (bounded) until `f` holds.
async fn until(what: &str, limit: Duration, mut f: impl FnMut() -> bool) {
    let t = Instant::now();
    while !f() {
        assert!(t.elapsed() < limit, "timed out waiting for {what}");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

fn delivered_ok(sink: &Sink) -> Vec<Seen> {
    // A delivery that was answered 2xx: by the rules of `handle`.
    sink.seen
        .lock()
        .unwrap()
        .iter()
        .filter(|s| {
            s.body != "poison"
                && s.body
                    .strip_prefix("fail-")
                    .is_none_or(|n| s.attempt > n.parse::<u32>().unwrap())
        })
        .cloned()
        .collect()
}

async fn every_message_reaches_one_instance_once(w: World) -> World {
    w.bus
        .create_topic("orders", Default::default())
        .await
        .unwrap();
    w.bus.put_subscription(&push_sub("orders")).await.unwrap();
    let mut batch = Vec::new();
    for i in 0..200 {
        let mut m = plain(&format!("m{i}"), None, None);
        m.extensions.insert(
            "traceparent".into(),
            "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01".into(),
        );
        batch.push(m);
        if batch.len() == 50 {
            w.bus
                .publish("orders", std::mem::take(&mut batch))
                .await
                .unwrap();
        }
    }
    until("200 deliveries", Duration::from_secs(20), || {
        w.sink.seen.lock().unwrap().len() >= 200
    })
    .await;
    tokio::time::sleep(Duration::from_millis(300)).await;
    let seen = w.sink.seen.lock().unwrap().clone();
    assert_eq!(seen.len(), 200, "each message once");
    let mut bodies: Vec<&str> = seen.iter().map(|s| s.body.as_str()).collect();
    bodies.sort();
    bodies.dedup();
    assert_eq!(bodies.len(), 200);
    let on_1 = seen.iter().filter(|s| s.instance == "billing-1").count();
    assert!(
        on_1 > 20 && on_1 < 180,
        "balanced over both instances: {on_1}/200"
    );
    assert!(seen.iter().all(|s| s.attempt == 1));
    // Trace context goes on to the subscriber.
    assert!(seen.iter().all(|s| s
        .traceparent
        .as_deref()
        .is_some_and(|t| t.starts_with("00-4bf92f"))));
    until("lag 0", Duration::from_secs(5), || {
        futures_lag(&w.bus) == Some(0)
    })
    .await;
    w
}

fn futures_lag(bus: &Arc<Bus>) -> Option<u64> {
    let bus = bus.clone();
    let h = tokio::runtime::Handle::current();
    std::thread::spawn(move || {
        h.block_on(async {
            bus.subscription("orders", "billing")
                .await
                .ok()?
                .map(|s| s.lag)
        })
    })
    .join()
    .unwrap()
}

async fn failures_back_off_then_dead_letter_and_redrive(w: World) -> World {
    w.bus
        .create_topic("orders", Default::default())
        .await
        .unwrap();
    w.bus.put_subscription(&push_sub("orders")).await.unwrap();
    w.bus
        .publish(
            "orders",
            vec![
                plain("fail-2", None, None),
                plain("poison", Some("p-1"), None),
            ],
        )
        .await
        .unwrap();
    until("the poison's 4 attempts", Duration::from_secs(10), || {
        w.sink
            .seen
            .lock()
            .unwrap()
            .iter()
            .filter(|s| s.body == "poison")
            .count()
            == 4
    })
    .await;
    let seen = w.sink.seen.lock().unwrap().clone();
    let flaky: Vec<&Seen> = seen.iter().filter(|s| s.body == "fail-2").collect();
    assert_eq!(
        flaky.iter().map(|s| s.attempt).collect::<Vec<_>>(),
        vec![1, 2, 3],
        "retried until it succeeded"
    );
    let poison: Vec<&Seen> = seen.iter().filter(|s| s.body == "poison").collect();
    // Backoff: 100, 200, 400 ms, each scaled by a jitter in 0.5..=1.0.
    for (i, min_ms) in [(1, 50u64), (2, 100), (3, 200)] {
        let gap = poison[i].at - poison[i - 1].at;
        assert!(
            gap >= Duration::from_millis(min_ms) && gap < Duration::from_millis(min_ms * 2 + 400),
            "gap {i}: {gap:?}"
        );
    }
    // The dead letter, with why.
    let dlq = gantry_bus::dead_letter_topic("orders", "billing");
    let mut dead = Vec::new();
    until("the dead letter", Duration::from_secs(5), || {
        dead = peek_blocking(&w.bus, &dlq);
        !dead.is_empty()
    })
    .await;
    assert_eq!(dead.len(), 1);
    let m = &dead[0];
    assert_eq!(m.id, "p-1");
    assert_eq!(m.extensions["gantryreason"], "HTTP 500");
    assert_eq!(m.extensions["gantryattempts"], "4");
    assert_eq!(&m.data[..], b"poison");
    // Acknowledged once dead-lettered: nothing more goes out.
    tokio::time::sleep(Duration::from_millis(500)).await;
    assert_eq!(w.sink.seen.lock().unwrap().len(), 7);
    let st = w
        .bus
        .subscription("orders", "billing")
        .await
        .unwrap()
        .unwrap();
    assert_eq!((st.lag, st.dead_letters), (0, 1));
    // Redrive: back to this subscription (it fails again, 4 more attempts, a second dead
    // letter: the subscriber is still broken).
    assert_eq!(w.bus.redrive("orders", "billing").await.unwrap(), 1);
    until("redriven attempts", Duration::from_secs(10), || {
        w.sink
            .seen
            .lock()
            .unwrap()
            .iter()
            .filter(|s| s.body == "poison")
            .count()
            == 8
    })
    .await;
    until("the second dead letter", Duration::from_secs(5), || {
        peek_blocking(&w.bus, &dlq).len() == 2
    })
    .await;
    // The first dead letter went back already: only the new one goes.
    assert_eq!(
        w.bus.redrive("orders", "billing").await.unwrap(),
        1,
        "moved on"
    );
    w
}

fn peek_blocking(bus: &Arc<Bus>, topic: &str) -> Vec<gantry_bus::Message> {
    let (bus, topic) = (bus.clone(), topic.to_string());
    let h = tokio::runtime::Handle::current();
    std::thread::spawn(move || {
        h.block_on(async {
            bus.peek(&topic, ReadFrom::Seq(1), 100)
                .await
                .map(|v| v.into_iter().map(|(_, _, m)| m).collect())
                .unwrap_or_default()
        })
    })
    .join()
    .unwrap()
}

async fn ordering_keys_one_at_a_time_in_order(w: World) -> World {
    w.bus
        .create_topic("orders", Default::default())
        .await
        .unwrap();
    w.bus.put_subscription(&push_sub("orders")).await.unwrap();
    let mut batch = Vec::new();
    for i in 0..40 {
        for k in 0..5 {
            // Every 7th message fails once: its key must wait for its retry.
            let body = if i % 7 == 3 { "fail-1" } else { "slow" };
            let mut m = plain(body, None, Some(&format!("key-{k}")));
            m.id = format!("{k} {i}");
            m.generated_id = false;
            batch.push(m);
        }
    }
    w.bus.publish("orders", batch).await.unwrap();
    until("200 processed", Duration::from_secs(30), || {
        delivered_ok(&w.sink).len() >= 200
    })
    .await;
    assert_eq!(
        w.sink.overlaps.load(Ordering::Relaxed),
        0,
        "one at a time per key"
    );
    let ok = delivered_ok(&w.sink);
    let mut per_key: HashMap<String, Vec<u32>> = HashMap::new();
    for s in &ok {
        let i: u32 = s.id.rsplit(' ').next().unwrap().parse().unwrap();
        per_key.entry(s.key.clone().unwrap()).or_default().push(i);
    }
    for (k, v) in per_key {
        assert_eq!(v, (0..40).collect::<Vec<u32>>(), "{k} in order");
    }
    w
}

async fn duplicates_are_dropped_and_replay_redelivers(w: World) -> World {
    w.bus
        .create_topic("orders", Default::default())
        .await
        .unwrap();
    w.bus.put_subscription(&push_sub("orders")).await.unwrap();
    let a = w
        .bus
        .publish("orders", vec![plain("one", Some("id-1"), None)])
        .await
        .unwrap();
    let b = w
        .bus
        .publish("orders", vec![plain("one again", Some("id-1"), None)])
        .await
        .unwrap();
    assert!(!a[0].duplicate && b[0].duplicate && a[0].seq == b[0].seq);
    until("one delivery", Duration::from_secs(5), || {
        w.sink.seen.lock().unwrap().len() == 1
    })
    .await;
    tokio::time::sleep(Duration::from_millis(150)).await;
    let t = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_millis() as u64;
    tokio::time::sleep(Duration::from_millis(50)).await;
    w.bus
        .publish(
            "orders",
            vec![plain("two", None, None), plain("three", None, None)],
        )
        .await
        .unwrap();
    until("three deliveries", Duration::from_secs(5), || {
        w.sink.seen.lock().unwrap().len() == 3
    })
    .await;
    assert_eq!(w.sink.seen.lock().unwrap()[0].body, "one");
    // Replay from the time between them: two and three again, not one.
    let from = w
        .bus
        .replay("orders", "billing", ReadFrom::Time(t))
        .await
        .unwrap();
    assert_eq!(from, 2);
    until("replayed", Duration::from_secs(5), || {
        w.sink.seen.lock().unwrap().len() == 5
    })
    .await;
    let again: Vec<String> = w.sink.seen.lock().unwrap()[3..]
        .iter()
        .map(|s| s.body.clone())
        .collect();
    assert_eq!(again.len(), 2);
    assert!(again.contains(&"two".into()) && again.contains(&"three".into()));
    // Replay from a seq: everything.
    w.bus
        .replay("orders", "billing", ReadFrom::Seq(1))
        .await
        .unwrap();
    until("replayed from 1", Duration::from_secs(5), || {
        w.sink.seen.lock().unwrap().len() == 8
    })
    .await;
    w
}

async fn pull_fetch_ack_nack_and_deadlines(w: World) -> World {
    w.bus
        .create_topic("orders", Default::default())
        .await
        .unwrap();
    let sub = Subscription {
        name: "puller".into(),
        mode: Mode::Pull {
            ack_deadline_ms: 400,
        },
        ..push_sub("orders")
    };
    w.bus.put_subscription(&sub).await.unwrap();
    // Fetching from an empty topic waits, then returns nothing.
    let t = Instant::now();
    let none = w
        .bus
        .fetch("orders", "puller", 10, Duration::from_millis(300))
        .await
        .unwrap();
    assert!(none.is_empty() && t.elapsed() >= Duration::from_millis(250));
    // A long poll returns as soon as something is published.
    let bus = w.bus.clone();
    let publisher = tokio::spawn(async move {
        tokio::time::sleep(Duration::from_millis(200)).await;
        bus.publish(
            "orders",
            (0..3)
                .map(|i| plain(&format!("p{i}"), None, None))
                .collect(),
        )
        .await
        .unwrap();
    });
    let t = Instant::now();
    let mut got = Vec::new();
    while got.len() < 3 && t.elapsed() < Duration::from_secs(5) {
        got.extend(
            w.bus
                .fetch("orders", "puller", 10, Duration::from_secs(5))
                .await
                .unwrap(),
        );
    }
    publisher.await.unwrap();
    assert_eq!(got.len(), 3);
    assert_eq!(got[0].event["specversion"], "1.0");
    assert_eq!(got[0].attempt, 1);
    // Ack one, nack one, let one's deadline pass.
    assert_eq!(w.bus.ack("orders", "puller", &[got[0].seq]).unwrap(), 1);
    assert_eq!(w.bus.nack("orders", "puller", &[got[1].seq]).unwrap(), 1);
    let mut again = Vec::new();
    let t = Instant::now();
    while again.len() < 2 && t.elapsed() < Duration::from_secs(5) {
        again.extend(
            w.bus
                .fetch("orders", "puller", 10, Duration::from_secs(2))
                .await
                .unwrap(),
        );
    }
    let mut seqs: Vec<(u64, u32)> = again.iter().map(|f| (f.seq, f.attempt)).collect();
    seqs.sort();
    assert_eq!(seqs, vec![(got[1].seq, 2), (got[2].seq, 2)]);
    assert_eq!(
        w.bus
            .ack("orders", "puller", &[got[1].seq, got[2].seq, 999])
            .unwrap(),
        2
    );
    // Still working on them: leases extended past the 400 ms deadline hold.
    w.bus
        .publish(
            "orders",
            (0..2)
                .map(|i| plain(&format!("x{i}"), None, None))
                .collect(),
        )
        .await
        .unwrap();
    let mut held = Vec::new();
    let t = Instant::now();
    while held.len() < 2 && t.elapsed() < Duration::from_secs(5) {
        held.extend(
            w.bus
                .fetch("orders", "puller", 10, Duration::from_secs(2))
                .await
                .unwrap()
                .into_iter()
                .map(|f| f.seq),
        );
    }
    held.push(999);
    assert_eq!(
        w.bus
            .extend("orders", "puller", &held, Some(Duration::from_millis(3000)))
            .unwrap(),
        2
    );
    tokio::time::sleep(Duration::from_millis(700)).await;
    assert!(w
        .bus
        .fetch("orders", "puller", 10, Duration::ZERO)
        .await
        .unwrap()
        .is_empty());
    assert_eq!(w.bus.ack("orders", "puller", &held).unwrap(), 2);
    // A push subscription cannot be fetched from.
    w.bus.put_subscription(&push_sub("orders")).await.unwrap();
    assert!(w
        .bus
        .fetch("orders", "billing", 1, Duration::ZERO)
        .await
        .is_err());
    w
}

async fn a_restarted_bus_delivers_what_was_not_acknowledged(w: World) -> World {
    w.bus
        .create_topic("orders", Default::default())
        .await
        .unwrap();
    let sub = Subscription {
        name: "puller".into(),
        mode: Mode::Pull {
            ack_deadline_ms: 10_000,
        },
        ..push_sub("orders")
    };
    w.bus.put_subscription(&sub).await.unwrap();
    w.bus
        .publish(
            "orders",
            (0..10)
                .map(|i| plain(&format!("r{i}"), None, None))
                .collect(),
        )
        .await
        .unwrap();
    let mut got = Vec::new();
    let t = Instant::now();
    while got.len() < 10 && t.elapsed() < Duration::from_secs(5) {
        got.extend(
            w.bus
                .fetch("orders", "puller", 10, Duration::from_secs(2))
                .await
                .unwrap(),
        );
    }
    assert_eq!(got.len(), 10);
    let acked: Vec<u64> = got
        .iter()
        .filter(|f| f.seq % 2 == 0)
        .map(|f| f.seq)
        .collect();
    w.bus.ack("orders", "puller", &acked).unwrap();
    // A new bus on the same log and store (the old one stopped: its position saved).
    w.bus.stop().await;
    let bus = Bus::open(
        w.log.clone(),
        w.store.clone(),
        w.gateway.clone(),
        &gantry_telemetry::Metrics::new(),
    )
    .await
    .unwrap();
    bus.start().await.unwrap();
    let mut again = Vec::new();
    let t = Instant::now();
    while again.len() < 5 && t.elapsed() < Duration::from_secs(5) {
        again.extend(
            bus.fetch("orders", "puller", 10, Duration::from_secs(2))
                .await
                .unwrap(),
        );
    }
    let mut seqs: Vec<u64> = again.iter().map(|f| f.seq).collect();
    seqs.sort();
    assert_eq!(seqs, vec![1, 3, 5, 7, 9]);
    bus.stop().await;
    let _ = message::new_id();
    World { bus, ..w }
}
