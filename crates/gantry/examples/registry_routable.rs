//! Registration (or deregistration) to routable at the gateway: how long from a registry change
//! to the gateway's request path seeing it, with a large system loaded (by default 1,000
//! services × 3 instances and 200 routes). The registry calls the gateway's listener before the
//! change returns, so the time of the registry call is the time to routable; each change is
//! checked against what the request path sees after it.
//!
//!     cargo run --profile dist -p gantry --example registry_routable -- [SERVICES] [ROUTES] [CHANGES]
//!
//! Prints one line per kind of change: p50, p99 and max in microseconds. Used by
//! `bench/registry.sh`, which sets it beside a NATS KV watch measured in the same run.
#![allow(clippy::unwrap_used)]

use std::collections::BTreeMap;
use std::net::{IpAddr, Ipv4Addr};
use std::sync::Arc;
use std::time::Instant;

use gantry_gateway::{Gateway, GatewayConfig};
use gantry_model::{GatewayModel, Health, Instance, InstanceSource};
use gantry_registry::{Registration, Registry};
use gantry_store::RedbStore;
use gantry_telemetry::Metrics;

fn instance(service: &str, id: &str, port: u16) -> Instance {
    Instance {
        id: id.into(),
        service: service.into(),
        version: semver::Version::new(1, 0, 0),
        address: IpAddr::V4(Ipv4Addr::LOCALHOST),
        port,
        metadata: BTreeMap::new(),
        node: "bench".into(),
        zone: None,
        health: Health::Passing,
        source: InstanceSource::Supervised,
        registered_at_ms: 0,
        tags: Vec::new(),
        checks: Vec::new(),
    }
}

fn percentile(sorted: &[f64], p: f64) -> f64 {
    sorted[((sorted.len() as f64 - 1.0) * p).round() as usize]
}

fn report(what: &str, mut us: Vec<f64>) {
    us.sort_by(f64::total_cmp);
    println!(
        "{what}: n={} p50={:.1}us p99={:.1}us max={:.1}us",
        us.len(),
        percentile(&us, 0.5),
        percentile(&us, 0.99),
        us[us.len() - 1]
    );
}

/// The spec of a system of `services` services, `routes` of them routed.
fn model(services: usize, routes: usize) -> GatewayModel {
    let mut text =
        String::from("[gateway]\nlisten = \"127.0.0.1:0\"\n[admin]\nlisten = \"127.0.0.1:0\"\n");
    for i in 0..services {
        text.push_str(&format!("[services.s{i}]\nendpoints = [\"127.0.0.1:1\"]\n"));
        if i < routes {
            text.push_str(&format!(
                "[[services.s{i}.routes]]\npath_prefix = \"/s{i}\"\nstrip_prefix = true\n"
            ));
        }
    }
    let spec = gantry_spec::parse(&text, std::path::Path::new("bench.toml")).unwrap();
    spec.gateway_model(std::path::Path::new("."))
}

// The runtime `gantry up` runs (two workers): the throughput figures are the product's.
#[tokio::main(flavor = "multi_thread", worker_threads = 2)]
async fn main() {
    let arg = |i: usize, d: usize| {
        std::env::args()
            .nth(i)
            .and_then(|a| a.parse().ok())
            .unwrap_or(d)
    };
    let (services, routes, changes) = (arg(1, 1000), arg(2, 200), arg(3, 2000));
    let dir = tempfile::tempdir().unwrap();
    let metrics = Metrics::new();
    let store = Arc::new(RedbStore::open(dir.path()).unwrap());
    let registry = Registry::open(store, "bench".into(), &metrics)
        .await
        .unwrap();
    let gateway = Gateway::new(
        GatewayConfig {
            node: "bench".into(),
            ..GatewayConfig::default()
        },
        &metrics,
    );
    gateway.apply_model(model(services, routes));
    {
        let gw = gateway.clone();
        registry.on_change(move |snap| gw.apply_registry(snap));
    }
    for s in 0..services {
        for i in 0..3 {
            let svc = format!("s{s}");
            registry.register_supervised(instance(&svc, &format!("{svc}-{i}"), 10_000 + i as u16));
        }
    }
    assert_eq!(gateway.routable("s0").len(), 3);
    println!("loaded: {services} services x 3 instances, {routes} routes");

    // A supervised instance comes and goes (in memory: what the supervisor does on health).
    let mut up = Vec::with_capacity(changes);
    let mut down = Vec::with_capacity(changes);
    for n in 0..changes {
        let svc = format!("s{}", (n * 7919) % services);
        let id = format!("{svc}-x{n}");
        let t = Instant::now();
        registry.register_supervised(instance(&svc, &id, 20_000));
        up.push(t.elapsed().as_secs_f64() * 1e6);
        assert!(gateway.routable(&svc).contains(&id), "{id} not routable");
        let t = Instant::now();
        registry.deregister_supervised(&id);
        down.push(t.elapsed().as_secs_f64() * 1e6);
        assert!(!gateway.routable(&svc).contains(&id), "{id} still routable");
    }
    report("supervised register -> routable", up);
    report("supervised deregister -> not routable", down);

    // A self-registration over the API's path (durable first: one fsync'd write).
    let mut ext = Vec::with_capacity(changes / 4);
    for n in 0..changes / 4 {
        let svc = format!("s{}", (n * 104_729) % services);
        let t = Instant::now();
        let inst = registry
            .register_external(Registration {
                service: svc.clone(),
                id: None,
                version: None,
                address: None,
                port: 30_000,
                metadata: BTreeMap::new(),
                zone: None,
                ttl_ms: Some(60_000),
                tags: Vec::new(),
                checks: Vec::new(),
            })
            .await
            .unwrap();
        ext.push(t.elapsed().as_secs_f64() * 1e6);
        assert!(gateway.routable(&svc).contains(&inst.id));
        registry.deregister_external(&inst.id).await.unwrap();
    }
    report("self-registration (durable) -> routable", ext);

    // Throughput: self-registrations with 64 in flight, each durable before it returns, into
    // a registry followed by the gateway; on the embedded store (fsynced, on DATA_DIR: a real
    // disk) and on NATS (JetStream acknowledges before fsync), beside plain NATS KV puts.
    let total = arg(4, 20_000);
    let data_dir = std::env::var("DATA_DIR").unwrap_or_else(|_| "target".into());
    std::fs::create_dir_all(&data_dir).unwrap();
    let disk = tempfile::tempdir_in(&data_dir).unwrap();
    let embedded: Arc<dyn gantry_store::Store> = Arc::new(RedbStore::open(disk.path()).unwrap());
    let rate = registrations_per_second(embedded.clone(), services, routes, total).await;
    println!("self-registrations (durable, embedded, c=64): {rate:.0}/s");
    // A restart with many stored registrations: the registry loads them all before the
    // gateway starts serving.
    let stored = arg(5, 100_000);
    if stored > total {
        registrations_per_second(embedded.clone(), services, routes, stored - total).await;
    }
    drop(embedded);
    let t = Instant::now();
    let reopened: Arc<dyn gantry_store::Store> = Arc::new(RedbStore::open(disk.path()).unwrap());
    let registry = Registry::open(reopened, "bench".into(), &Metrics::new())
        .await
        .unwrap();
    let n: usize = registry.snapshot().services.values().map(|l| l.len()).sum();
    println!(
        "restart with {n} stored registrations: registry loaded in {:.0} ms",
        t.elapsed().as_secs_f64() * 1e3
    );
    if let Ok(url) = std::env::var("NATS_URL") {
        let mut o = gantry_store::NatsOptions::new(url);
        o.namespace = format!("bench-reg-{}", std::process::id());
        match gantry_store::NatsStore::connect(o).await {
            Ok(nats) => {
                let nats = Arc::new(nats);
                let r = registrations_per_second(nats.clone(), services, routes, total).await;
                println!("self-registrations (NATS backend, c=64): {r:.0}/s");
                let kv = kv_puts_per_second(nats.clone(), total).await;
                println!("nats kv puts (c=64): {kv:.0}/s");
                println!(
                    "ratio embedded registrations / NATS KV puts: {:.2}",
                    rate / kv
                );
                let _ = nats.destroy_namespace().await;
            }
            Err(e) => println!("nats: unavailable ({e})"),
        }
    }
}

const IN_FLIGHT: usize = 64;

async fn registrations_per_second(
    store: Arc<dyn gantry_store::Store>,
    services: usize,
    routes: usize,
    total: usize,
) -> f64 {
    let metrics = Metrics::new();
    let registry = Registry::open(store, "bench".into(), &metrics)
        .await
        .unwrap();
    let gateway = Gateway::new(
        GatewayConfig {
            node: "bench".into(),
            ..GatewayConfig::default()
        },
        &metrics,
    );
    gateway.apply_model(model(services, routes));
    let snapshots = Arc::new(std::sync::atomic::AtomicUsize::new(0));
    {
        let (gw, snapshots) = (gateway.clone(), snapshots.clone());
        registry.on_change(move |snap| {
            snapshots.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
            gw.apply_registry(snap)
        });
    }
    let next = Arc::new(std::sync::atomic::AtomicUsize::new(0));
    let offset = gantry_registry::random_hex(3);
    let t = Instant::now();
    let mut tasks = tokio::task::JoinSet::new();
    for _ in 0..IN_FLIGHT {
        let (registry, next, offset) = (registry.clone(), next.clone(), offset.clone());
        tasks.spawn(async move {
            loop {
                let n = next.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
                if n >= total {
                    return;
                }
                registry
                    .register_external(Registration {
                        service: format!("s{}", n % services),
                        id: Some(format!("r-{}-{n}", offset)),
                        version: None,
                        address: None,
                        port: 30_000,
                        metadata: BTreeMap::new(),
                        zone: None,
                        ttl_ms: Some(600_000),
                        tags: Vec::new(),
                        checks: Vec::new(),
                    })
                    .await
                    .unwrap();
            }
        });
    }
    while tasks.join_next().await.is_some() {}
    let rate = total as f64 / t.elapsed().as_secs_f64();
    println!(
        "  ({total} registrations published in {} snapshots)",
        snapshots.load(std::sync::atomic::Ordering::Relaxed)
    );
    assert!(gateway.routable("s0").len() >= total / services);
    rate
}

async fn kv_puts_per_second(store: Arc<dyn gantry_store::Store>, total: usize) -> f64 {
    store
        .ensure_bucket("benchkv", Default::default())
        .await
        .unwrap();
    let next = Arc::new(std::sync::atomic::AtomicUsize::new(0));
    let t = Instant::now();
    let mut tasks = tokio::task::JoinSet::new();
    for _ in 0..IN_FLIGHT {
        let (store, next) = (store.clone(), next.clone());
        tasks.spawn(async move {
            loop {
                let n = next.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
                if n >= total {
                    return;
                }
                store
                    .put("benchkv", &format!("k{n}"), vec![b'x'; 200])
                    .await
                    .unwrap();
            }
        });
    }
    while tasks.join_next().await.is_some() {}
    total as f64 / t.elapsed().as_secs_f64()
}
