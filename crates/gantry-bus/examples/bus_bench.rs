//! The bus's figures: acknowledged (durable) publishes per second with IN_FLIGHT publishers
//! (256-byte messages), on the embedded log (fsynced, on DATA_DIR) and on the NATS log; and
//! publish → pushed to the service latency at RATE messages/s through the gateway to a real
//! HTTP subscriber (axum on a socket). Medians of ROUNDS interleaved rounds.
//!
//!   bus_bench NATS_URL SECONDS ROUNDS DATA_DIR IN_FLIGHT RATE
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::collections::{BTreeMap, HashMap};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use axum::http::HeaderMap;
use gantry_bus::{Bus, Mode, Start, Subscription};
use gantry_gateway::{Gateway, GatewayConfig};
use gantry_model::{Health, Instance, InstanceSource, RegistrySnapshot};
use gantry_store::{Log, NatsLog, NatsOptions, NatsStore, RedbStore, SegmentLog, Store};

type Arrivals = Arc<Mutex<HashMap<String, Instant>>>;

async fn subscriber(arrivals: Arrivals) -> std::net::SocketAddr {
    let app = axum::Router::new()
        .route(
            "/events",
            axum::routing::post(
                |axum::extract::State(a): axum::extract::State<Arrivals>, h: HeaderMap| async move {
                    if let Some(id) = h.get("ce-id").and_then(|v| v.to_str().ok()) {
                        a.lock()
                            .unwrap()
                            .entry(id.to_string())
                            .or_insert_with(Instant::now);
                    }
                    axum::http::StatusCode::NO_CONTENT
                },
            ),
        )
        .with_state(arrivals);
    let l = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = l.local_addr().unwrap();
    tokio::spawn(async move { axum::serve(l, app).await.unwrap() });
    addr
}

fn gateway(addr: std::net::SocketAddr) -> Arc<Gateway> {
    let spec = gantry_spec::parse(
        "[services.sink]\nendpoints = [\"127.0.0.1:1\"]\n",
        std::path::Path::new("b.toml"),
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
    let mut services = gantry_model::ServiceMap::new();
    services.insert(
        Arc::<str>::from("sink"),
        vec![Arc::new(Instance {
            id: "sink-1".into(),
            service: "sink".into(),
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
        })]
        .into(),
    );
    gw.apply_registry(&Arc::new(RegistrySnapshot {
        revision: 1,
        services,
        changed: vec!["sink".into()],
        since: 0,
    }));
    gw
}

fn msg(id: String) -> gantry_bus::Message {
    let mut m = gantry_bus::text_message("bench", vec![b'x'; 256]);
    m.id = id;
    m.generated_id = false;
    m
}

async fn publishes_per_second(bus: &Arc<Bus>, topic: &str, secs: u64, in_flight: usize) -> f64 {
    let stop = Arc::new(AtomicBool::new(false));
    let done = Arc::new(AtomicU64::new(0));
    let mut tasks = Vec::new();
    for t in 0..in_flight {
        let (bus, stop, done, topic) = (bus.clone(), stop.clone(), done.clone(), topic.to_string());
        tasks.push(tokio::spawn(async move {
            let mut i = 0u64;
            while !stop.load(Ordering::Relaxed) {
                bus.publish(&topic, vec![msg(format!("t{t}-{i}"))])
                    .await
                    .unwrap();
                i += 1;
                done.fetch_add(1, Ordering::Relaxed);
            }
        }));
    }
    tokio::time::sleep(Duration::from_millis(300)).await;
    let (t, n0) = (Instant::now(), done.load(Ordering::Relaxed));
    tokio::time::sleep(Duration::from_secs(secs)).await;
    let rate = (done.load(Ordering::Relaxed) - n0) as f64 / t.elapsed().as_secs_f64();
    stop.store(true, Ordering::Relaxed);
    for t in tasks {
        t.await.unwrap();
    }
    rate
}

/// Publish at `rate`/s for `secs`; each message's publish start → arrival at the subscriber.
async fn push_latency(
    bus: &Arc<Bus>,
    topic: &str,
    arrivals: &Arrivals,
    rate: u64,
    secs: u64,
) -> Vec<f64> {
    let n = rate * secs;
    let started: Arc<Mutex<HashMap<String, Instant>>> = Arc::default();
    let mut tick = tokio::time::interval(Duration::from_secs_f64(1.0 / rate as f64));
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Burst);
    static RUN: AtomicU64 = AtomicU64::new(0);
    let run = RUN.fetch_add(1, Ordering::Relaxed);
    let mut pubs = Vec::new();
    for i in 0..n {
        tick.tick().await;
        let id = format!("lat-{topic}-{run}-{i}");
        started.lock().unwrap().insert(id.clone(), Instant::now());
        let (bus, topic) = (bus.clone(), topic.to_string());
        pubs.push(tokio::spawn(async move {
            bus.publish(&topic, vec![msg(id)]).await.unwrap();
        }));
    }
    for p in pubs {
        p.await.unwrap();
    }
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let got = {
            let a = arrivals.lock().unwrap();
            started
                .lock()
                .unwrap()
                .keys()
                .filter(|k| a.contains_key(*k))
                .count()
        };
        if got as u64 >= n || Instant::now() > deadline {
            break;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let a = arrivals.lock().unwrap();
    let mut us: Vec<f64> = started
        .lock()
        .unwrap()
        .iter()
        .filter_map(|(id, t0)| Some(a.get(id)?.duration_since(*t0).as_secs_f64() * 1e6))
        .collect();
    us.sort_by(|a, b| a.total_cmp(b));
    us
}

/// The peer: raw async-nats JetStream publishes (each with a message id, as the bus sends
/// them, and each awaited for its ack) to a file stream on the same server, IN_FLIGHT at a
/// time: what the NATS backend is held to.
async fn raw_jetstream_per_second(url: &str, secs: u64, in_flight: usize) -> Option<f64> {
    let client = async_nats::connect(url).await.ok()?;
    let js = async_nats::jetstream::new(client);
    let name = format!("BUSBENCHRAW{}", std::process::id());
    let subject = format!("busbenchraw.{}", std::process::id());
    js.create_stream(async_nats::jetstream::stream::Config {
        name: name.clone(),
        subjects: vec![subject.clone()],
        storage: async_nats::jetstream::stream::StorageType::File,
        ..Default::default()
    })
    .await
    .ok()?;
    let stop = Arc::new(AtomicBool::new(false));
    let done = Arc::new(AtomicU64::new(0));
    let mut tasks = Vec::new();
    for t in 0..in_flight {
        let (js, stop, done, subject) = (js.clone(), stop.clone(), done.clone(), subject.clone());
        tasks.push(tokio::spawn(async move {
            let mut i = 0u64;
            while !stop.load(Ordering::Relaxed) {
                // With a message id, as the bus publishes (JetStream's duplicate window).
                let mut h = async_nats::HeaderMap::new();
                h.insert("Nats-Msg-Id", format!("t{t}-{i}").as_str());
                i += 1;
                let ack = js
                    .publish_with_headers(subject.clone(), h, bytes::Bytes::from(vec![b'x'; 256]))
                    .await;
                if let Ok(ack) = ack {
                    if ack.await.is_ok() {
                        done.fetch_add(1, Ordering::Relaxed);
                    }
                }
            }
        }));
    }
    tokio::time::sleep(Duration::from_millis(300)).await;
    let (t, n0) = (Instant::now(), done.load(Ordering::Relaxed));
    tokio::time::sleep(Duration::from_secs(secs)).await;
    let rate = (done.load(Ordering::Relaxed) - n0) as f64 / t.elapsed().as_secs_f64();
    stop.store(true, Ordering::Relaxed);
    for t in tasks {
        let _ = t.await;
    }
    let _ = js.delete_stream(&name).await;
    Some(rate)
}

fn pct(v: &[f64], p: f64) -> f64 {
    if v.is_empty() {
        return f64::NAN;
    }
    v[((v.len() as f64 - 1.0) * p).round() as usize]
}

fn median(mut v: Vec<f64>) -> f64 {
    v.sort_by(|a, b| a.total_cmp(b));
    v.get(v.len() / 2).copied().unwrap_or(f64::NAN)
}

async fn bus_on(log: Arc<dyn Log>, store: Arc<dyn Store>, gw: Arc<Gateway>) -> Arc<Bus> {
    let bus = Bus::open(log, store, gw, &gantry_telemetry::Metrics::new())
        .await
        .unwrap();
    for t in ["bench", "latency"] {
        bus.create_topic(t, Default::default()).await.unwrap();
    }
    bus.put_subscription(&Subscription {
        topic: "latency".into(),
        name: "sink".into(),
        mode: Mode::Push {
            service: "sink".into(),
            path: "/events".into(),
            timeout_ms: 5000,
        },
        max_attempts: 5,
        backoff_initial_ms: 100,
        backoff_max_ms: 1000,
        max_in_flight: 256,
        ordered: false,
        start: Start::New,
        from_spec: false,
    })
    .await
    .unwrap();
    bus
}

#[tokio::main(flavor = "multi_thread", worker_threads = 2)]
async fn main() {
    let args: Vec<String> = std::env::args().collect();
    let arg = |i: usize, d: &str| args.get(i).cloned().unwrap_or(d.to_string());
    let url = arg(1, "nats://127.0.0.1:4222");
    let url = url.as_str();
    let secs: u64 = arg(2, "3").parse().unwrap();
    let rounds: usize = arg(3, "3").parse().unwrap();
    let data = arg(4, "target");
    let in_flight: usize = arg(5, "256").parse().unwrap();
    let rate: u64 = arg(6, "1000").parse().unwrap();
    std::fs::create_dir_all(&data).unwrap();
    let dir = tempfile::tempdir_in(&data).unwrap();
    let arrivals: Arrivals = Arc::default();
    let gw = gateway(subscriber(arrivals.clone()).await);
    let embedded = bus_on(
        Arc::new(SegmentLog::open(&dir.path().join("log")).unwrap()),
        Arc::new(RedbStore::open(&dir.path().join("store")).unwrap()),
        gw.clone(),
    )
    .await;
    let mut o = NatsOptions::new(url.to_string());
    o.namespace = format!("busbench-{}", std::process::id());
    let nats = NatsStore::connect(o).await.ok().map(Arc::new);
    let on_nats = match &nats {
        Some(n) => Some(bus_on(Arc::new(NatsLog::new(n.clone())), n.clone(), gw.clone()).await),
        None => None,
    };
    let (mut e, mut n, mut el, mut nl) = (Vec::new(), Vec::new(), Vec::new(), Vec::new());
    let mut raw = Vec::new();
    for r in 0..rounds {
        e.push(publishes_per_second(&embedded, "bench", secs, in_flight).await);
        el.push(push_latency(&embedded, "latency", &arrivals, rate, secs).await);
        if let Some(b) = &on_nats {
            n.push(publishes_per_second(b, "bench", secs, in_flight).await);
            nl.push(push_latency(b, "latency", &arrivals, rate, secs).await);
            if let Some(r) = raw_jetstream_per_second(url, secs, in_flight).await {
                raw.push(r);
            }
        }
        eprintln!("round {} of {rounds} done", r + 1);
    }
    println!("bus: 256-byte messages, {in_flight} publishers in flight, {secs}s per measure, median of {rounds}");
    let lat = |v: &Vec<Vec<f64>>, p: f64| median(v.iter().map(|l| pct(l, p)).collect());
    println!(
        "gantry embedded   publishes/s= {:>8.0}  publish->pushed at {rate}/s: p50= {:>7.0}us p99= {:>7.0}us",
        median(e.clone()),
        lat(&el, 0.5),
        lat(&el, 0.99)
    );
    if !n.is_empty() {
        println!(
            "gantry nats       publishes/s= {:>8.0}  publish->pushed at {rate}/s: p50= {:>7.0}us p99= {:>7.0}us",
            median(n.clone()),
            lat(&nl, 0.5),
            lat(&nl, 0.99)
        );
    }
    if !raw.is_empty() {
        println!(
            "raw async-nats    publishes/s= {:>8.0}  (JetStream file stream, message ids, each ack awaited)",
            median(raw.clone())
        );
        println!(
            "NATS backend / raw async-nats publishes: {:.2} (goal >= 0.8)",
            median(n.clone()) / median(raw)
        );
    }
    embedded.stop().await;
    if let Some(b) = on_nats {
        b.stop().await;
    }
    if let Some(n) = nats {
        let _ = n.destroy_namespace().await;
    }
}
