//! Durable writes per second at a concurrency, and watch latency, for the embedded store, the
//! NATS backend and raw async-nats KV on the same server (the reference), in one run.
//!
//!   store_bench NATS_URL [SECONDS=3] [CONCURRENCY=64] [ROUNDS=3] [DATA_DIR]
//!
//! Rounds interleave the three systems; medians are printed, then the ratios the issue asks for.
//! Values are 128 bytes, written over 1,000 keys. Watch latency: 1,000 puts per second for
//! SECONDS, each carrying its send time, received by one watcher of the bucket.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use async_nats::jetstream;
use futures_util::StreamExt;
use gantry_store::{
    BucketOptions, NatsOptions, NatsStore, RedbStore, Store, WatchEvent, WatchFrom,
};

const VALUE_BYTES: usize = 128;
const KEYS: usize = 1000;

#[derive(Clone)]
enum System {
    Embedded(Arc<RedbStore>),
    Nats(Arc<NatsStore>),
    Raw(Box<jetstream::kv::Store>),
}

impl System {
    fn name(&self) -> &'static str {
        match self {
            System::Embedded(_) => "embedded",
            System::Nats(_) => "nats backend",
            System::Raw(_) => "raw async-nats kv",
        }
    }

    async fn put(&self, key: &str, value: Vec<u8>) {
        match self {
            System::Embedded(s) => {
                s.put("bench", key, value).await.unwrap();
            }
            System::Nats(s) => {
                s.put("bench", key, value).await.unwrap();
            }
            System::Raw(kv) => {
                kv.put(key, value.into()).await.unwrap();
            }
        }
    }
}

async fn writes_per_second(sys: &System, secs: u64, concurrency: usize) -> f64 {
    let done = Arc::new(AtomicU64::new(0));
    let stop = Arc::new(AtomicBool::new(false));
    let start = Instant::now();
    let tasks: Vec<_> = (0..concurrency)
        .map(|t| {
            let (sys, done, stop) = (sys.clone(), done.clone(), stop.clone());
            tokio::spawn(async move {
                let mut i = t;
                while !stop.load(Ordering::Relaxed) {
                    sys.put(&format!("k{}", i % KEYS), vec![b'x'; VALUE_BYTES])
                        .await;
                    done.fetch_add(1, Ordering::Relaxed);
                    i += concurrency;
                }
            })
        })
        .collect();
    tokio::time::sleep(Duration::from_secs(secs)).await;
    stop.store(true, Ordering::Relaxed);
    for t in tasks {
        t.await.unwrap();
    }
    done.load(Ordering::Relaxed) as f64 / start.elapsed().as_secs_f64()
}

/// p50 and p99 in microseconds of put -> watcher, at 1,000 puts per second.
async fn watch_latency(sys: &System, secs: u64) -> (f64, f64) {
    let base = Instant::now();
    let n = secs * 1000;
    let (tx, mut rx) = tokio::sync::mpsc::unbounded_channel::<u64>();
    let watcher = {
        let sys = sys.clone();
        tokio::spawn(async move {
            let decode = |v: &[u8]| u64::from_le_bytes(v[..8].try_into().unwrap());
            match sys {
                System::Embedded(s) => watch_store(&*s, tx, base, decode).await,
                System::Nats(s) => watch_store(&*s, tx, base, decode).await,
                System::Raw(kv) => {
                    let mut w = kv.watch("lat.>").await.unwrap();
                    while let Some(e) = w.next().await {
                        let e = e.unwrap();
                        let sent = decode(&e.value);
                        let now = base.elapsed().as_nanos() as u64;
                        if tx.send(now - sent).is_err() {
                            return;
                        }
                    }
                }
            }
        })
    };
    // Let the watch start before the first put.
    tokio::time::sleep(Duration::from_millis(300)).await;
    let mut tick = tokio::time::interval(Duration::from_millis(1));
    for i in 0..n {
        tick.tick().await;
        let mut v = (base.elapsed().as_nanos() as u64).to_le_bytes().to_vec();
        v.resize(VALUE_BYTES, b'x');
        sys.put(&format!("lat.k{}", i % 100), v).await;
    }
    let mut lat = Vec::with_capacity(n as usize);
    while lat.len() < n as usize {
        match tokio::time::timeout(Duration::from_secs(10), rx.recv()).await {
            Ok(Some(l)) => lat.push(l),
            _ => break,
        }
    }
    watcher.abort();
    assert!(
        lat.len() as u64 >= n * 99 / 100,
        "{}: only {} of {n} changes seen",
        sys.name(),
        lat.len()
    );
    lat.sort_unstable();
    let pct = |p: f64| lat[((lat.len() as f64 * p) as usize).min(lat.len() - 1)] as f64 / 1e3;
    (pct(0.50), pct(0.99))
}

async fn watch_store<S: Store>(
    s: &S,
    tx: tokio::sync::mpsc::UnboundedSender<u64>,
    base: Instant,
    decode: impl Fn(&[u8]) -> u64,
) {
    let mut w = s.watch("bench", "lat.>", WatchFrom::New).await.unwrap();
    while let Some(ev) = w.next().await {
        if let WatchEvent::Change(c) = ev.unwrap() {
            let now = base.elapsed().as_nanos() as u64;
            if tx.send(now - decode(&c.value)).is_err() {
                return;
            }
        }
    }
}

fn median(mut v: Vec<f64>) -> f64 {
    v.sort_by(|a, b| a.partial_cmp(b).unwrap());
    v[v.len() / 2]
}

#[tokio::main(flavor = "multi_thread", worker_threads = 2)]
async fn main() {
    let args: Vec<String> = std::env::args().collect();
    let url = args
        .get(1)
        .cloned()
        .unwrap_or("nats://127.0.0.1:4222".into());
    let secs: u64 = args.get(2).map_or(3, |s| s.parse().unwrap());
    let conc: usize = args.get(3).map_or(64, |s| s.parse().unwrap());
    let rounds: usize = args.get(4).map_or(3, |s| s.parse().unwrap());
    let dir = tempfile::tempdir_in(args.get(5).cloned().unwrap_or(".".into())).unwrap();

    let embedded = Arc::new(RedbStore::open(dir.path()).unwrap());
    let mut o = NatsOptions::new(url.clone());
    o.namespace = format!("bench-{}", std::process::id());
    let nats = Arc::new(NatsStore::connect(o.clone()).await.unwrap());
    nats.ensure_bucket("bench", BucketOptions::default())
        .await
        .unwrap();
    // The raw reference: the same server, its own bucket (made like the backend's), used through
    // async-nats's KV API directly.
    let mut raw_o = o.clone();
    raw_o.namespace = format!("raw-{}", std::process::id());
    let raw_store = NatsStore::connect(raw_o).await.unwrap();
    raw_store
        .ensure_bucket("bench", BucketOptions::default())
        .await
        .unwrap();
    let client = async_nats::connect(url.as_str()).await.unwrap();
    let raw = jetstream::new(client)
        .get_key_value(format!("raw-{}_bench", std::process::id()))
        .await
        .unwrap();
    let systems = [
        System::Embedded(embedded),
        System::Nats(nats.clone()),
        System::Raw(Box::new(raw)),
    ];

    let mut writes: Vec<Vec<f64>> = vec![Vec::new(); 3];
    let mut p50: Vec<Vec<f64>> = vec![Vec::new(); 3];
    let mut p99: Vec<Vec<f64>> = vec![Vec::new(); 3];
    for round in 0..rounds {
        // Alternate the order, so that no system always runs first.
        let order: Vec<usize> = if round % 2 == 0 {
            vec![0, 1, 2]
        } else {
            vec![2, 1, 0]
        };
        for &i in &order {
            writes[i].push(writes_per_second(&systems[i], secs, conc).await);
        }
        for &i in &order {
            let (a, b) = watch_latency(&systems[i], secs).await;
            p50[i].push(a);
            p99[i].push(b);
        }
        eprintln!("round {} of {rounds} done", round + 1);
    }
    println!(
        "store: {conc} in flight, {VALUE_BYTES}-byte values, {secs}s per measure, median of {rounds} interleaved rounds"
    );
    let mut med = [(0.0, 0.0, 0.0); 3];
    for (i, s) in systems.iter().enumerate() {
        med[i] = (
            median(writes[i].clone()),
            median(p50[i].clone()),
            median(p99[i].clone()),
        );
        println!(
            "{:<18} writes/s={:>9.0}  watch p50={:>7.0}us p99={:>7.0}us",
            s.name(),
            med[i].0,
            med[i].1,
            med[i].2
        );
    }
    println!(
        "nats backend / raw kv: writes {:.3} (goal >= 0.8), watch p99 {:.3}",
        med[1].0 / med[2].0,
        med[1].2 / med[2].2
    );
    println!(
        "embedded durable writes/s: {:.0} (goal >= 30000); embedded / raw kv writes {:.3}",
        med[0].0,
        med[0].0 / med[2].0
    );
    nats.destroy_namespace().await.unwrap();
    raw_store.destroy_namespace().await.unwrap();
}
