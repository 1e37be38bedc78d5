//! One behaviour suite, run against both backends: the embedded store and a real nats-server
//! (`GANTRY_TEST_NATS_URL`, default `nats://127.0.0.1:4222`; `scripts/test` starts one with
//! JetStream when none is running). Each NATS case uses a namespace of its own and removes it.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use gantry_store::{
    BucketOptions, Change, NatsOptions, NatsStore, Op, RedbStore, Store, StoreError, WatchEvent,
    WatchFrom, Watcher,
};

/// A store for one case, and what it takes to clean up after it.
struct Fixture {
    store: Arc<dyn Store>,
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
        store: Arc::new(RedbStore::open(dir.path()).unwrap()),
        nats: None,
        _dir: Some(dir),
    }
}

fn nats_url() -> String {
    std::env::var("GANTRY_TEST_NATS_URL").unwrap_or_else(|_| "nats://127.0.0.1:4222".into())
}

async fn nats_in(namespace: String) -> Arc<NatsStore> {
    let mut o = NatsOptions::new(nats_url());
    o.namespace = namespace;
    Arc::new(NatsStore::connect(o).await.unwrap_or_else(|e| {
        panic!("these tests need a nats-server with JetStream ({e}); scripts/test starts one")
    }))
}

fn unique_namespace() -> String {
    static N: AtomicU64 = AtomicU64::new(0);
    format!(
        "t{}-{}-{}",
        std::process::id(),
        N.fetch_add(1, Ordering::Relaxed),
        std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .unwrap()
            .subsec_nanos()
            % 100_000
    )
}

async fn nats() -> Fixture {
    let n = nats_in(unique_namespace()).await;
    Fixture {
        store: n.clone(),
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
                    super::$case(f.store.clone()).await;
                    f.cleanup().await;
                }
            )*
        }
        mod on_nats {
            $(
                #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
                async fn $case() {
                    let f = super::nats().await;
                    super::$case(f.store.clone()).await;
                    f.cleanup().await;
                }
            )*
        }
    };
}

suite!(
    put_get_delete,
    filters_list_and_keys,
    create_and_update_are_conditional,
    delete_if_is_conditional,
    revisions_increase,
    history_keeps_its_depth,
    max_age_expires_values,
    watch_current_then_live,
    watch_from_revision_replays_deletes,
    watch_new_sees_only_new,
    one_winner_among_concurrent_updates,
    concurrent_writes_all_land,
    bad_names_are_refused,
);

fn keys(rows: &[(String, gantry_store::Entry)]) -> Vec<&str> {
    rows.iter().map(|(k, _)| k.as_str()).collect()
}

async fn put_get_delete(s: Arc<dyn Store>) {
    assert_eq!(s.get("b", "k").await.unwrap(), None);
    let r = s.put("b", "k", b"one".to_vec()).await.unwrap();
    let got = s.get("b", "k").await.unwrap().unwrap();
    assert_eq!((got.value.as_slice(), got.revision), (&b"one"[..], r));
    assert!(s.delete("b", "k").await.unwrap());
    assert!(!s.delete("b", "k").await.unwrap());
    assert_eq!(s.get("b", "k").await.unwrap(), None);
    // A deleted key can be created again.
    s.create("b", "k", b"two".to_vec()).await.unwrap();
    assert_eq!(s.get("b", "k").await.unwrap().unwrap().value, b"two");
    // Buckets are separate.
    assert_eq!(s.get("other", "k").await.unwrap(), None);
}

async fn filters_list_and_keys(s: Arc<dyn Store>) {
    for k in [
        "orders.v1",
        "orders.v2",
        "orders.head",
        "orders.v1.x",
        "users.v1",
        "ordersx.v1",
    ] {
        s.put("b", k, k.as_bytes().to_vec()).await.unwrap();
    }
    assert!(s.list("b", ">").await.unwrap().len() == 6);
    let rows = s.list("b", "orders.>").await.unwrap();
    assert_eq!(
        keys(&rows),
        ["orders.head", "orders.v1", "orders.v1.x", "orders.v2"]
    );
    assert_eq!(rows[1].1.value, b"orders.v1");
    let rows = s.list("b", "orders.*").await.unwrap();
    assert_eq!(keys(&rows), ["orders.head", "orders.v1", "orders.v2"]);
    let rows = s.list("b", "*.v1").await.unwrap();
    assert_eq!(keys(&rows), ["orders.v1", "ordersx.v1", "users.v1"]);
    assert_eq!(
        s.keys("b", "orders.v1").await.unwrap(),
        vec!["orders.v1".to_string()]
    );
    s.delete("b", "orders.v2").await.unwrap();
    assert_eq!(
        s.keys("b", "orders.*").await.unwrap(),
        vec!["orders.head".to_string(), "orders.v1".to_string()]
    );
    assert!(s.list("b", "none.>").await.unwrap().is_empty());
    assert!(s.list("empty", ">").await.unwrap().is_empty());
}

async fn create_and_update_are_conditional(s: Arc<dyn Store>) {
    let r = s.create("b", "k", b"1".to_vec()).await.unwrap();
    assert!(matches!(
        s.create("b", "k", b"2".to_vec()).await,
        Err(StoreError::AlreadyExists { .. })
    ));
    match s.update("b", "k", b"2".to_vec(), r + 100).await {
        Err(StoreError::RevisionMismatch {
            expected, found, ..
        }) => assert_eq!((expected, found), (r + 100, Some(r))),
        other => panic!("expected a revision mismatch, got {other:?}"),
    }
    let r2 = s.update("b", "k", b"2".to_vec(), r).await.unwrap();
    assert!(r2 > r);
    assert_eq!(s.get("b", "k").await.unwrap().unwrap().value, b"2");
    // The old revision no longer works.
    assert!(s.update("b", "k", b"3".to_vec(), r).await.is_err());
}

async fn delete_if_is_conditional(s: Arc<dyn Store>) {
    let r = s.put("b", "k", b"1".to_vec()).await.unwrap();
    let r2 = s.put("b", "k", b"2".to_vec()).await.unwrap();
    assert!(matches!(
        s.delete_if("b", "k", r).await,
        Err(StoreError::RevisionMismatch { .. })
    ));
    assert!(s.get("b", "k").await.unwrap().is_some());
    s.delete_if("b", "k", r2).await.unwrap();
    assert!(s.get("b", "k").await.unwrap().is_none());
    assert!(matches!(
        s.delete_if("b", "k", r2).await,
        Err(StoreError::RevisionMismatch { found: None, .. })
    ));
}

async fn revisions_increase(s: Arc<dyn Store>) {
    let mut last = 0;
    for i in 0..20 {
        let r = s.put("b", &format!("k{}", i % 3), vec![i]).await.unwrap();
        assert!(r > last, "revision {r} after {last}");
        last = r;
    }
}

async fn history_keeps_its_depth(s: Arc<dyn Store>) {
    s.ensure_bucket(
        "h",
        BucketOptions {
            history: 3,
            max_age: None,
        },
    )
    .await
    .unwrap();
    for v in 1..=5u8 {
        s.put("h", "k", vec![v]).await.unwrap();
    }
    s.put("h", "other", vec![9]).await.unwrap();
    let h = s.history("h", "k").await.unwrap();
    assert_eq!(
        h.iter().map(|c| c.value.clone()).collect::<Vec<_>>(),
        [vec![3], vec![4], vec![5]]
    );
    assert!(h.windows(2).all(|w| w[0].revision < w[1].revision));
    s.delete("h", "k").await.unwrap();
    let h = s.history("h", "k").await.unwrap();
    assert_eq!(
        h.iter().map(|c| c.op).collect::<Vec<_>>(),
        [Op::Put, Op::Put, Op::Delete]
    );
    assert!(s.history("h", "never").await.unwrap().is_empty());
    // Default buckets keep one change per key.
    s.put("d", "k", vec![1]).await.unwrap();
    s.put("d", "k", vec![2]).await.unwrap();
    assert_eq!(s.history("d", "k").await.unwrap().len(), 1);
    // Options are checked.
    assert!(matches!(
        s.ensure_bucket(
            "h",
            BucketOptions {
                history: 0,
                max_age: None
            }
        )
        .await,
        Err(StoreError::InvalidOptions { .. })
    ));
}

async fn max_age_expires_values(s: Arc<dyn Store>) {
    s.ensure_bucket(
        "ttl",
        BucketOptions {
            history: 1,
            max_age: Some(Duration::from_millis(1500)),
        },
    )
    .await
    .unwrap();
    s.put("ttl", "k", b"v".to_vec()).await.unwrap();
    assert!(s.get("ttl", "k").await.unwrap().is_some());
    let start = Instant::now();
    while s.get("ttl", "k").await.unwrap().is_some() {
        assert!(
            start.elapsed() < Duration::from_secs(10),
            "value not expired after 10s"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    assert!(start.elapsed() >= Duration::from_millis(1000));
    assert!(s.list("ttl", ">").await.unwrap().is_empty());
}

async fn next_event(w: &mut Watcher) -> WatchEvent {
    tokio::time::timeout(Duration::from_secs(5), w.next())
        .await
        .expect("no watch event within 5s")
        .expect("watch ended")
        .expect("watch failed")
}

async fn next_change(w: &mut Watcher) -> Change {
    match next_event(w).await {
        WatchEvent::Change(c) => c,
        WatchEvent::Current => panic!("expected a change, got Current"),
    }
}

async fn quiet(w: &mut Watcher) {
    if let Ok(e) = tokio::time::timeout(Duration::from_millis(300), w.next()).await {
        panic!("expected no event, got {e:?}");
    }
}

async fn watch_current_then_live(s: Arc<dyn Store>) {
    s.put("w", "svc.a", b"1".to_vec()).await.unwrap();
    s.put("w", "svc.b", b"2".to_vec()).await.unwrap();
    s.put("w", "svc.gone", b"x".to_vec()).await.unwrap();
    s.delete("w", "svc.gone").await.unwrap();
    s.put("w", "other.a", b"3".to_vec()).await.unwrap();
    let mut w = s.watch("w", "svc.*", WatchFrom::Current).await.unwrap();
    let mut initial = [next_change(&mut w).await, next_change(&mut w).await];
    initial.sort_by(|a, b| a.key.cmp(&b.key));
    assert_eq!(
        initial
            .iter()
            .map(|c| (c.key.as_str(), c.op, c.value.as_slice()))
            .collect::<Vec<_>>(),
        [("svc.a", Op::Put, &b"1"[..]), ("svc.b", Op::Put, &b"2"[..])]
    );
    assert_eq!(next_event(&mut w).await, WatchEvent::Current);
    let r = s.put("w", "svc.c", b"4".to_vec()).await.unwrap();
    s.put("w", "other.b", b"5".to_vec()).await.unwrap();
    let c = next_change(&mut w).await;
    assert_eq!((c.key.as_str(), c.revision, c.op), ("svc.c", r, Op::Put));
    assert_eq!(c.value, b"4");
    s.delete("w", "svc.a").await.unwrap();
    let c = next_change(&mut w).await;
    assert_eq!((c.key.as_str(), c.op), ("svc.a", Op::Delete));
    quiet(&mut w).await;
    // An empty selection is current at once.
    let mut w = s.watch("w", "none.>", WatchFrom::Current).await.unwrap();
    assert_eq!(next_event(&mut w).await, WatchEvent::Current);
}

async fn watch_from_revision_replays_deletes(s: Arc<dyn Store>) {
    let r1 = s.put("w", "a", b"1".to_vec()).await.unwrap();
    s.put("w", "b", b"2".to_vec()).await.unwrap();
    s.delete("w", "a").await.unwrap();
    let mut w = s.watch("w", ">", WatchFrom::Revision(r1)).await.unwrap();
    // The bucket keeps one change per key, so a's put was replaced by its delete.
    let c = next_change(&mut w).await;
    assert_eq!((c.key.as_str(), c.op), ("b", Op::Put));
    let c = next_change(&mut w).await;
    assert_eq!((c.key.as_str(), c.op), ("a", Op::Delete));
    assert_eq!(next_event(&mut w).await, WatchEvent::Current);
    s.put("w", "late", b"3".to_vec()).await.unwrap();
    assert_eq!(next_change(&mut w).await.key, "late");
    // Resuming after the last revision seen gives only what came later.
    let last = s.put("w", "b", b"4".to_vec()).await.unwrap();
    assert_eq!(next_change(&mut w).await.revision, last);
    let mut resumed = s
        .watch("w", ">", WatchFrom::Revision(last + 1))
        .await
        .unwrap();
    assert_eq!(next_event(&mut resumed).await, WatchEvent::Current);
    quiet(&mut resumed).await;
}

async fn watch_new_sees_only_new(s: Arc<dyn Store>) {
    s.put("w", "old", b"1".to_vec()).await.unwrap();
    let mut w = s.watch("w", ">", WatchFrom::New).await.unwrap();
    assert_eq!(next_event(&mut w).await, WatchEvent::Current);
    s.put("w", "new", b"2".to_vec()).await.unwrap();
    assert_eq!(next_change(&mut w).await.key, "new");
    quiet(&mut w).await;
}

async fn one_winner_among_concurrent_updates(s: Arc<dyn Store>) {
    let base = s.put("c", "k", b"0".to_vec()).await.unwrap();
    let tasks: Vec<_> = (0..16u8)
        .map(|i| {
            let s = s.clone();
            tokio::spawn(async move { s.update("c", "k", vec![i], base).await })
        })
        .collect();
    let mut wins = 0;
    for t in tasks {
        match t.await.unwrap() {
            Ok(_) => wins += 1,
            Err(StoreError::RevisionMismatch { .. }) => {}
            Err(e) => panic!("unexpected error {e}"),
        }
    }
    assert_eq!(wins, 1);
    let creates: Vec<_> = (0..16u8)
        .map(|i| {
            let s = s.clone();
            tokio::spawn(async move { s.create("c", "fresh", vec![i]).await })
        })
        .collect();
    let mut wins = 0;
    for t in creates {
        if t.await.unwrap().is_ok() {
            wins += 1;
        }
    }
    assert_eq!(wins, 1);
}

async fn concurrent_writes_all_land(s: Arc<dyn Store>) {
    let tasks: Vec<_> = (0..200u32)
        .map(|i| {
            let s = s.clone();
            tokio::spawn(async move {
                s.put("many", &format!("k{i:03}"), i.to_le_bytes().to_vec())
                    .await
            })
        })
        .collect();
    let mut revs = Vec::new();
    for t in tasks {
        revs.push(t.await.unwrap().unwrap());
    }
    revs.sort_unstable();
    revs.dedup();
    assert_eq!(revs.len(), 200, "every write has its own revision");
    let rows = s.list("many", ">").await.unwrap();
    assert_eq!(rows.len(), 200);
    for (k, e) in rows {
        let i: u32 = k[1..].parse().unwrap();
        assert_eq!(e.value, i.to_le_bytes());
    }
}

async fn bad_names_are_refused(s: Arc<dyn Store>) {
    assert!(matches!(
        s.put("Bad Bucket", "k", vec![]).await,
        Err(StoreError::InvalidName { .. })
    ));
    for key in ["bad key", ".k", "k.", "a..b", "a*", ""] {
        assert!(
            matches!(
                s.put("b", key, vec![]).await,
                Err(StoreError::InvalidName { .. })
            ),
            "{key:?}"
        );
    }
    for filter in ["", "a.>.b", "a..b"] {
        assert!(s.list("b", filter).await.is_err(), "{filter:?}");
        assert!(s.watch("b", filter, WatchFrom::New).await.is_err());
    }
}
