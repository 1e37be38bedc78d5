//! Appends per second to the log: `IN_FLIGHT` single-record appends in flight, 256-byte records,
//! on the embedded log (fsynced, on DATA_DIR) and the NATS log, interleaved rounds; medians.
//!
//!   log_bench NATS_URL SECONDS ROUNDS DATA_DIR IN_FLIGHT
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use gantry_store::{Append, Log, NatsLog, NatsOptions, NatsStore, SegmentLog, StreamOptions};

async fn appends_per_second(log: Arc<dyn Log>, secs: u64, in_flight: usize) -> f64 {
    let stream = format!("bench-{}", std::process::id());
    log.ensure_stream(&stream, StreamOptions::default())
        .await
        .unwrap();
    let stop = Arc::new(AtomicBool::new(false));
    let done = Arc::new(AtomicU64::new(0));
    let mut tasks = Vec::new();
    for _ in 0..in_flight {
        let (log, stop, done, stream) = (log.clone(), stop.clone(), done.clone(), stream.clone());
        tasks.push(tokio::spawn(async move {
            while !stop.load(Ordering::Relaxed) {
                log.append(
                    &stream,
                    vec![Append {
                        id: None,
                        data: vec![b'x'; 256],
                    }],
                )
                .await
                .unwrap();
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
    log.delete_stream(&stream).await.unwrap();
    rate
}

fn median(mut v: Vec<f64>) -> f64 {
    v.sort_by(|a, b| a.total_cmp(b));
    v[v.len() / 2]
}

#[tokio::main(flavor = "multi_thread", worker_threads = 2)]
async fn main() {
    let args: Vec<String> = std::env::args().collect();
    let url = args
        .get(1)
        .cloned()
        .unwrap_or("nats://127.0.0.1:4222".into());
    let secs: u64 = args.get(2).and_then(|a| a.parse().ok()).unwrap_or(3);
    let rounds: usize = args.get(3).and_then(|a| a.parse().ok()).unwrap_or(3);
    let data = args.get(4).cloned().unwrap_or("target".into());
    let in_flight: usize = args.get(5).and_then(|a| a.parse().ok()).unwrap_or(256);
    std::fs::create_dir_all(&data).unwrap();
    let dir = tempfile::tempdir_in(&data).unwrap();
    let embedded: Arc<dyn Log> = Arc::new(SegmentLog::open(dir.path()).unwrap());
    let mut o = NatsOptions::new(url);
    o.namespace = format!("logbench-{}", std::process::id());
    let nats = NatsStore::connect(o).await.ok().map(Arc::new);
    let nats_log: Option<Arc<dyn Log>> = nats
        .clone()
        .map(|n| Arc::new(NatsLog::new(n)) as Arc<dyn Log>);
    let (mut e, mut n) = (Vec::new(), Vec::new());
    for r in 0..rounds {
        e.push(appends_per_second(embedded.clone(), secs, in_flight).await);
        if let Some(l) = &nats_log {
            n.push(appends_per_second(l.clone(), secs, in_flight).await);
        }
        eprintln!("round {} of {rounds} done", r + 1);
    }
    println!(
        "log: {in_flight} appends in flight, 256-byte records, {secs}s each, median of {rounds}"
    );
    println!("embedded (fsynced)  appends/s= {:>8.0}", median(e));
    if !n.is_empty() {
        println!("nats log            appends/s= {:>8.0}", median(n));
    }
    if let Some(n) = nats {
        let _ = n.destroy_namespace().await;
    }
}
