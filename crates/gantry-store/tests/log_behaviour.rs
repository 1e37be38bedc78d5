//! One behaviour suite for the log, run against both backends: the embedded segment log and a
//! real nats-server (`GANTRY_TEST_NATS_URL`, default `nats://127.0.0.1:4222`; `scripts/test`
//! starts one with JetStream when none is running). Then what only the embedded log has to
//! show: recovery after a restart and a torn write, and segments deleted by retention.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use gantry_store::{
    Append, ConsumerPosition, Log, NatsLog, NatsOptions, NatsStore, ReadFrom, SegmentLog,
    StoreError, StreamOptions,
};

struct Fixture {
    log: Arc<dyn Log>,
    nats: Option<Arc<NatsStore>>,
    _dir: Option<tempfile::TempDir>,
}

impl Fixture {
    async fn cleanup(self) {
        if let Some(n) = self.nats {
            n.destroy_namespace().await.unwrap();
        }
    }
}

async fn embedded() -> Fixture {
    let dir = tempfile::tempdir().unwrap();
    Fixture {
        log: Arc::new(SegmentLog::open(dir.path()).unwrap()),
        nats: None,
        _dir: Some(dir),
    }
}

async fn nats() -> Fixture {
    static N: AtomicU64 = AtomicU64::new(0);
    let url =
        std::env::var("GANTRY_TEST_NATS_URL").unwrap_or_else(|_| "nats://127.0.0.1:4222".into());
    let mut o = NatsOptions::new(url);
    o.namespace = format!(
        "l{}-{}-{}",
        std::process::id(),
        N.fetch_add(1, Ordering::Relaxed),
        std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .unwrap()
            .subsec_nanos()
            % 100_000
    );
    let n = Arc::new(NatsStore::connect(o).await.unwrap_or_else(|e| {
        panic!("these tests need a nats-server with JetStream ({e}); scripts/test starts one")
    }));
    Fixture {
        log: Arc::new(NatsLog::new(n.clone())),
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
                    let f = super::embedded().await;
                    super::$case(f.log.clone()).await;
                    f.cleanup().await;
                }
            )*
        }
        mod on_nats {
            $(
                #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
                async fn $case() {
                    let f = super::nats().await;
                    super::$case(f.log.clone()).await;
                    f.cleanup().await;
                }
            )*
        }
    };
}

suite!(
    append_then_read_in_order,
    ids_are_deduplicated_within_the_window,
    read_waits_at_the_tail,
    retention_by_count,
    retention_by_age,
    retention_by_bytes,
    read_from_a_time,
    oversized_records_are_refused_whole,
    consumer_positions,
    unknown_streams,
    concurrent_appends_all_land,
    streams_are_listed_and_deleted,
);

fn rec(data: &str) -> Append {
    Append {
        id: None,
        data: data.as_bytes().to_vec(),
    }
}

fn with_id(id: &str, data: &str) -> Append {
    Append {
        id: Some(id.into()),
        data: data.as_bytes().to_vec(),
    }
}

async fn read_all(log: &Arc<dyn Log>, s: &str, from: u64) -> Vec<(u64, String)> {
    let mut out = Vec::new();
    let mut next = from;
    for _ in 0..1000 {
        let batch = log
            .read(s, ReadFrom::Seq(next), 100, Duration::ZERO)
            .await
            .unwrap();
        let Some(last) = batch.last() else { break };
        next = last.seq + 1;
        out.extend(
            batch
                .into_iter()
                .map(|r| (r.seq, String::from_utf8(r.data).unwrap())),
        );
    }
    out
}

async fn append_then_read_in_order(log: Arc<dyn Log>) {
    log.ensure_stream("orders", StreamOptions::default())
        .await
        .unwrap();
    let info = log.info("orders").await.unwrap().unwrap();
    assert_eq!((info.first_seq, info.last_seq, info.messages), (1, 0, 0));
    let out = log
        .append("orders", vec![rec("a"), with_id("x-1", "b"), rec("c")])
        .await
        .unwrap();
    assert_eq!(
        out.iter().map(|a| (a.seq, a.duplicate)).collect::<Vec<_>>(),
        vec![(1, false), (2, false), (3, false)]
    );
    log.append("orders", vec![rec("d")]).await.unwrap();
    let all = log
        .read("orders", ReadFrom::Seq(1), 10, Duration::ZERO)
        .await
        .unwrap();
    assert_eq!(
        all.iter()
            .map(|r| (
                r.seq,
                r.id.clone(),
                String::from_utf8(r.data.clone()).unwrap()
            ))
            .collect::<Vec<_>>(),
        vec![
            (1, None, "a".into()),
            (2, Some("x-1".into()), "b".into()),
            (3, None, "c".into()),
            (4, None, "d".into())
        ]
    );
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_millis() as u64;
    assert!(all
        .iter()
        .all(|r| r.time_ms <= now + 1000 && r.time_ms + 60_000 > now));
    // From the middle, and a bounded count.
    let mid = log
        .read("orders", ReadFrom::Seq(3), 1, Duration::ZERO)
        .await
        .unwrap();
    assert_eq!(mid.iter().map(|r| r.seq).collect::<Vec<_>>(), vec![3]);
    let info = log.info("orders").await.unwrap().unwrap();
    assert_eq!((info.first_seq, info.last_seq, info.messages), (1, 4, 4));
    assert!(info.bytes > 0);
}

async fn ids_are_deduplicated_within_the_window(log: Arc<dyn Log>) {
    let o = StreamOptions {
        dedup_window: Duration::from_secs(1),
        ..StreamOptions::default()
    };
    log.ensure_stream("d", o).await.unwrap();
    let a = log
        .append("d", vec![with_id("m1", "one"), with_id("m2", "two")])
        .await
        .unwrap();
    assert_eq!((a[0].seq, a[1].seq), (1, 2));
    let again = log
        .append(
            "d",
            vec![with_id("m1", "one again"), with_id("m3", "three")],
        )
        .await
        .unwrap();
    assert_eq!((again[0].seq, again[0].duplicate), (1, true));
    assert_eq!((again[1].seq, again[1].duplicate), (3, false));
    assert_eq!(
        read_all(&log, "d", 1).await.len(),
        3,
        "nothing stored twice"
    );
    // After the window the id is new again.
    tokio::time::sleep(Duration::from_millis(1600)).await;
    let later = log.append("d", vec![with_id("m1", "later")]).await.unwrap();
    assert!(!later[0].duplicate);
    assert_eq!(later[0].seq, 4);
}

async fn read_waits_at_the_tail(log: Arc<dyn Log>) {
    log.ensure_stream("t", StreamOptions::default())
        .await
        .unwrap();
    log.append("t", vec![rec("1")]).await.unwrap();
    let t = Instant::now();
    let none = log
        .read("t", ReadFrom::Seq(2), 10, Duration::ZERO)
        .await
        .unwrap();
    assert!(none.is_empty());
    assert!(t.elapsed() < Duration::from_millis(500), "did not wait");
    let l2 = log.clone();
    let writer = tokio::spawn(async move {
        tokio::time::sleep(Duration::from_millis(200)).await;
        l2.append("t", vec![rec("2")]).await.unwrap();
    });
    let t = Instant::now();
    let got = log
        .read("t", ReadFrom::Seq(2), 10, Duration::from_secs(5))
        .await
        .unwrap();
    assert_eq!(got.iter().map(|r| r.seq).collect::<Vec<_>>(), vec![2]);
    assert!(t.elapsed() < Duration::from_secs(3), "woke on the append");
    writer.await.unwrap();
    // A wait that runs out returns nothing.
    let t = Instant::now();
    let none = log
        .read("t", ReadFrom::Seq(3), 10, Duration::from_millis(300))
        .await
        .unwrap();
    assert!(none.is_empty());
    assert!(t.elapsed() >= Duration::from_millis(250));
}

async fn retention_by_count(log: Arc<dyn Log>) {
    let o = StreamOptions {
        max_messages: Some(10),
        ..StreamOptions::default()
    };
    log.ensure_stream("c", o).await.unwrap();
    for i in 0..25 {
        log.append("c", vec![rec(&i.to_string())]).await.unwrap();
    }
    let info = log.info("c").await.unwrap().unwrap();
    assert_eq!((info.first_seq, info.last_seq, info.messages), (16, 25, 10));
    let all = read_all(&log, "c", 1).await;
    assert_eq!(all.first().unwrap(), &(16, "15".to_string()));
    assert_eq!(all.len(), 10);
}

async fn retention_by_age(log: Arc<dyn Log>) {
    let o = StreamOptions {
        max_age: Some(Duration::from_secs(1)),
        dedup_window: Duration::from_millis(500),
        ..StreamOptions::default()
    };
    log.ensure_stream("a", o).await.unwrap();
    log.append("a", vec![rec("old1"), rec("old2")])
        .await
        .unwrap();
    tokio::time::sleep(Duration::from_millis(1500)).await;
    log.append("a", vec![rec("new")]).await.unwrap();
    // JetStream expires on its own timer: give it a moment.
    let mut all = Vec::new();
    for _ in 0..30 {
        all = read_all(&log, "a", 1).await;
        if all.len() == 1 {
            break;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    assert_eq!(all, vec![(3, "new".to_string())]);
    let info = log.info("a").await.unwrap().unwrap();
    assert_eq!((info.first_seq, info.last_seq, info.messages), (3, 3, 1));
}

async fn retention_by_bytes(log: Arc<dyn Log>) {
    let o = StreamOptions {
        max_bytes: Some(8192),
        ..StreamOptions::default()
    };
    log.ensure_stream("b", o).await.unwrap();
    let body = "x".repeat(200);
    for _ in 0..10 {
        log.append("b", (0..10).map(|_| rec(&body)).collect())
            .await
            .unwrap();
    }
    let info = log.info("b").await.unwrap().unwrap();
    assert_eq!(info.last_seq, 100);
    assert!(info.bytes <= 8192, "{info:?}");
    assert!(info.first_seq > 50, "{info:?}");
    let all = read_all(&log, "b", 1).await;
    assert_eq!(all.len() as u64, info.messages);
    assert_eq!(all.last().unwrap().0, 100);
}

async fn read_from_a_time(log: Arc<dyn Log>) {
    log.ensure_stream("tm", StreamOptions::default())
        .await
        .unwrap();
    log.append("tm", vec![rec("1"), rec("2")]).await.unwrap();
    tokio::time::sleep(Duration::from_millis(100)).await;
    let t = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_millis() as u64;
    tokio::time::sleep(Duration::from_millis(20)).await;
    log.append("tm", vec![rec("3"), rec("4")]).await.unwrap();
    let got = log
        .read("tm", ReadFrom::Time(t), 10, Duration::ZERO)
        .await
        .unwrap();
    assert_eq!(got.iter().map(|r| r.seq).collect::<Vec<_>>(), vec![3, 4]);
    let none = log
        .read("tm", ReadFrom::Time(t + 60_000), 10, Duration::ZERO)
        .await
        .unwrap();
    assert!(none.is_empty());
}

async fn oversized_records_are_refused_whole(log: Arc<dyn Log>) {
    let o = StreamOptions {
        max_record_bytes: 1000,
        ..StreamOptions::default()
    };
    log.ensure_stream("big", o).await.unwrap();
    let err = log
        .append("big", vec![rec("small"), rec(&"y".repeat(1001))])
        .await
        .unwrap_err();
    assert!(matches!(err, StoreError::TooLarge(_)), "{err}");
    assert!(err.to_string().contains("record 1"), "{err}");
    assert_eq!(log.info("big").await.unwrap().unwrap().last_seq, 0);
    log.append("big", vec![rec(&"y".repeat(1000))])
        .await
        .unwrap();
    assert_eq!(log.info("big").await.unwrap().unwrap().last_seq, 1);
}

async fn consumer_positions(log: Arc<dyn Log>) {
    log.ensure_stream("p", StreamOptions::default())
        .await
        .unwrap();
    assert_eq!(log.position("p", "billing").await.unwrap(), None);
    let mut pos = ConsumerPosition::default();
    pos.ack(1);
    pos.ack(2);
    pos.ack(5);
    log.save_position("p", "billing", &pos).await.unwrap();
    let back = log.position("p", "billing").await.unwrap().unwrap();
    assert_eq!((back.ack_floor, back.acked.clone()), (2, vec![5]));
    assert!(log.delete_position("p", "billing").await.unwrap());
    assert!(!log.delete_position("p", "billing").await.unwrap());
    assert_eq!(log.position("p", "billing").await.unwrap(), None);
    // Deleting the stream forgets its consumers.
    log.save_position("p", "shipping", &pos).await.unwrap();
    assert!(log.delete_stream("p").await.unwrap());
    log.ensure_stream("p", StreamOptions::default())
        .await
        .unwrap();
    assert_eq!(log.position("p", "shipping").await.unwrap(), None);
    assert!(log.position("p", "Bad.Name").await.is_err());
}

async fn unknown_streams(log: Arc<dyn Log>) {
    assert_eq!(log.info("nope").await.unwrap(), None);
    let err = log.append("nope", vec![rec("x")]).await.unwrap_err();
    assert!(matches!(err, StoreError::NotFound(_)), "{err}");
    assert!(log
        .read("nope", ReadFrom::Seq(1), 1, Duration::ZERO)
        .await
        .is_err());
    assert!(log
        .ensure_stream("Bad Name", StreamOptions::default())
        .await
        .is_err());
    let bad = StreamOptions {
        max_messages: Some(0),
        ..StreamOptions::default()
    };
    assert!(matches!(
        log.ensure_stream("ok", bad).await,
        Err(StoreError::InvalidOptions { .. })
    ));
}

async fn concurrent_appends_all_land(log: Arc<dyn Log>) {
    log.ensure_stream("many", StreamOptions::default())
        .await
        .unwrap();
    let mut tasks = Vec::new();
    for t in 0..8 {
        let log = log.clone();
        tasks.push(tokio::spawn(async move {
            let mut seqs = Vec::new();
            for i in 0..100 {
                let a = log
                    .append("many", vec![rec(&format!("{t}-{i}"))])
                    .await
                    .unwrap();
                seqs.push(a[0].seq);
            }
            seqs
        }));
    }
    let mut seqs = Vec::new();
    for t in tasks {
        let s = t.await.unwrap();
        assert!(s.windows(2).all(|w| w[0] < w[1]), "each writer's in order");
        seqs.extend(s);
    }
    seqs.sort();
    assert_eq!(seqs, (1..=800).collect::<Vec<u64>>());
    let all = read_all(&log, "many", 1).await;
    assert_eq!(all.len(), 800);
    assert!(all.iter().enumerate().all(|(i, (s, _))| *s == i as u64 + 1));
}

async fn streams_are_listed_and_deleted(log: Arc<dyn Log>) {
    log.ensure_stream("s-b", StreamOptions::default())
        .await
        .unwrap();
    log.ensure_stream("s-a", StreamOptions::default())
        .await
        .unwrap();
    // Ensuring again (other options) keeps the records.
    log.append("s-a", vec![rec("kept")]).await.unwrap();
    let o = StreamOptions {
        max_messages: Some(100),
        ..StreamOptions::default()
    };
    log.ensure_stream("s-a", o).await.unwrap();
    assert_eq!(read_all(&log, "s-a", 1).await.len(), 1);
    assert_eq!(log.streams().await.unwrap(), vec!["s-a", "s-b"]);
    assert!(log.delete_stream("s-a").await.unwrap());
    assert!(!log.delete_stream("s-a").await.unwrap());
    assert_eq!(log.streams().await.unwrap(), vec!["s-b"]);
    assert_eq!(log.info("s-a").await.unwrap(), None);
}

// ---------------------------------------------------------------------------------------------
// The embedded log only

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn embedded_restart_keeps_records_ids_and_positions() {
    let dir = tempfile::tempdir().unwrap();
    {
        let log = SegmentLog::open(dir.path()).unwrap();
        log.ensure_stream("r", StreamOptions::default())
            .await
            .unwrap();
        log.append("r", vec![with_id("a", "1"), rec("2")])
            .await
            .unwrap();
        let mut p = ConsumerPosition::default();
        p.ack(1);
        log.save_position("r", "c", &p).await.unwrap();
    }
    let log: Arc<dyn Log> = Arc::new(SegmentLog::open(dir.path()).unwrap());
    assert_eq!(
        read_all(&log, "r", 1).await,
        vec![(1, "1".into()), (2, "2".into())]
    );
    let dup = log.append("r", vec![with_id("a", "again")]).await.unwrap();
    assert_eq!((dup[0].seq, dup[0].duplicate), (1, true));
    let next = log.append("r", vec![rec("3")]).await.unwrap();
    assert_eq!(next[0].seq, 3);
    assert_eq!(log.position("r", "c").await.unwrap().unwrap().ack_floor, 1);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn embedded_torn_tail_is_cut_and_appends_continue() {
    let dir = tempfile::tempdir().unwrap();
    {
        let log = SegmentLog::open(dir.path()).unwrap();
        log.ensure_stream("torn", StreamOptions::default())
            .await
            .unwrap();
        log.append("torn", vec![rec("one"), rec("two")])
            .await
            .unwrap();
    }
    // A crash in the middle of a write: half a record at the end of the segment.
    let seg = std::fs::read_dir(dir.path().join("torn"))
        .unwrap()
        .map(|e| e.unwrap().path())
        .find(|p| p.extension().is_some_and(|e| e == "seg"))
        .unwrap();
    let len = std::fs::metadata(&seg).unwrap().len();
    {
        use std::io::Write;
        let mut f = std::fs::OpenOptions::new().append(true).open(&seg).unwrap();
        f.write_all(&[40, 0, 0, 0, 1, 2, 3, 4, 3, 0, 0]).unwrap();
    }
    let log: Arc<dyn Log> = Arc::new(SegmentLog::open(dir.path()).unwrap());
    assert_eq!(std::fs::metadata(&seg).unwrap().len(), len, "tail cut");
    assert_eq!(read_all(&log, "torn", 1).await.len(), 2);
    let a = log.append("torn", vec![rec("three")]).await.unwrap();
    assert_eq!(a[0].seq, 3);
    assert_eq!(
        read_all(&log, "torn", 1).await.last().unwrap(),
        &(3, "three".to_string())
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn embedded_retention_deletes_whole_segments() {
    let dir = tempfile::tempdir().unwrap();
    let log: Arc<dyn Log> = Arc::new(SegmentLog::open(dir.path()).unwrap());
    let o = StreamOptions {
        max_messages: Some(80),
        ..StreamOptions::default()
    };
    log.ensure_stream("seg", o).await.unwrap();
    for i in 0..400 {
        log.append("seg", vec![rec(&i.to_string())]).await.unwrap();
    }
    let segments = || {
        std::fs::read_dir(dir.path().join("seg"))
            .unwrap()
            .filter(|e| {
                e.as_ref()
                    .unwrap()
                    .path()
                    .extension()
                    .is_some_and(|x| x == "seg")
            })
            .count()
    };
    // Segments of 10 records: 80 retained in 8 or 9 of them, never the 40 written.
    let n = segments();
    assert!((8..=10).contains(&n), "{n} segments");
    let all = read_all(&log, "seg", 1).await;
    assert_eq!(all.len(), 80);
    assert_eq!(all[0].0, 321);
    // And after a restart the same.
    drop(log);
    let log: Arc<dyn Log> = Arc::new(SegmentLog::open(dir.path()).unwrap());
    let info = log.info("seg").await.unwrap().unwrap();
    assert_eq!((info.first_seq, info.last_seq), (321, 400));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn embedded_empty_segments_left_by_a_crash_end_the_log() {
    let dir = tempfile::tempdir().unwrap();
    {
        let log = SegmentLog::open(dir.path()).unwrap();
        let o = StreamOptions {
            max_messages: Some(16),
            ..StreamOptions::default()
        };
        log.ensure_stream("e", o).await.unwrap();
        for i in 0..5 {
            log.append("e", vec![rec(&i.to_string())]).await.unwrap();
        }
    }
    // A commit that made two new segments and died before filling them.
    for first in [6u64, 9] {
        std::fs::write(dir.path().join("e").join(format!("{first:020}.seg")), b"").unwrap();
    }
    let log: Arc<dyn Log> = Arc::new(SegmentLog::open(dir.path()).unwrap());
    assert_eq!(read_all(&log, "e", 1).await.len(), 5);
    let a = log.append("e", vec![rec("next")]).await.unwrap();
    assert_eq!(a[0].seq, 6);
    assert!(!dir.path().join("e").join(format!("{:020}.seg", 9)).exists());
    // A deleted stream leaves nothing behind, even its renamed remains.
    assert!(log.delete_stream("e").await.unwrap());
    let left: Vec<_> = std::fs::read_dir(dir.path()).unwrap().collect();
    assert!(left.is_empty(), "{left:?}");
}
