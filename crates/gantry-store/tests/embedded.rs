//! What only the embedded store has: its file, its lock, its migration and its group commit.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::sync::Arc;
use std::time::Duration;

use gantry_store::{Op, RedbStore, Store, StoreError, StoreJsonExt, WatchEvent, WatchFrom};
use redb::{Database, TableDefinition};

#[tokio::test]
async fn survives_reopen_and_is_locked_while_open() {
    let dir = tempfile::tempdir().unwrap();
    let r = {
        let s = RedbStore::open(dir.path()).unwrap();
        s.put_json("b", "k", &vec![1, 2, 3]).await.unwrap()
    };
    let s = RedbStore::open(dir.path()).unwrap();
    let (v, rev): (Vec<i32>, u64) = s.get_json("b", "k").await.unwrap().unwrap();
    assert_eq!((v, rev), (vec![1, 2, 3], r));
    // Revisions keep increasing across restarts, and the log came back with the values.
    assert!(s.put("b", "k2", vec![]).await.unwrap() > r);
    assert_eq!(s.history("b", "k").await.unwrap().len(), 1);
    assert!(matches!(
        RedbStore::open(dir.path()),
        Err(StoreError::Locked(_))
    ));
}

/// A data directory written before watches existed: value tables only, `/` in keys.
#[tokio::test]
async fn migrates_format_one() {
    let dir = tempfile::tempdir().unwrap();
    {
        let db = Database::create(dir.path().join("state.redb")).unwrap();
        let tx = db.begin_write().unwrap();
        {
            let mut meta = tx
                .open_table(TableDefinition::<&str, u64>::new("__meta"))
                .unwrap();
            meta.insert("revision", 7).unwrap();
            let mut config = tx
                .open_table(TableDefinition::<&str, &[u8]>::new("config"))
                .unwrap();
            for (k, rev, v) in [
                ("orders/000000000001", 3u64, "one"),
                ("orders/000000000002", 5, "two"),
            ] {
                let mut raw = rev.to_le_bytes().to_vec();
                raw.extend_from_slice(v.as_bytes());
                config.insert(k, raw.as_slice()).unwrap();
            }
            let mut reg = tx
                .open_table(TableDefinition::<&str, &[u8]>::new("registry"))
                .unwrap();
            let mut raw = 7u64.to_le_bytes().to_vec();
            raw.extend_from_slice(b"{}");
            reg.insert("orders-1", raw.as_slice()).unwrap();
        }
        tx.commit().unwrap();
    }
    let s = RedbStore::open(dir.path()).unwrap();
    let rows = s.list("config", "orders.*").await.unwrap();
    assert_eq!(
        rows.iter()
            .map(|(k, e)| (k.as_str(), e.revision, e.value.as_slice()))
            .collect::<Vec<_>>(),
        [
            ("orders.000000000001", 3, &b"one"[..]),
            ("orders.000000000002", 5, &b"two"[..])
        ]
    );
    assert!(s
        .get("config", "orders/000000000001")
        .await
        .unwrap()
        .is_none());
    assert_eq!(s.keys("registry", ">").await.unwrap(), ["orders-1"]);
    // Watches replay the migrated values from the log.
    let mut w = s
        .watch("config", ">", WatchFrom::Revision(1))
        .await
        .unwrap();
    let mut seen = Vec::new();
    while let WatchEvent::Change(c) = w.next().await.unwrap().unwrap() {
        seen.push((c.key, c.revision, c.op));
    }
    assert_eq!(
        seen,
        [
            ("orders.000000000001".to_string(), 3, Op::Put),
            ("orders.000000000002".to_string(), 5, Op::Put)
        ]
    );
    // New writes continue after the old counter.
    assert!(s.put("config", "x", vec![]).await.unwrap() > 7);
    drop(w);
    drop(s);
    // The migration runs once.
    let s = RedbStore::open(dir.path()).unwrap();
    assert_eq!(s.list("config", ">").await.unwrap().len(), 3);
}

/// A watcher that reads slowly still sees every key's last value, in revision order, with no
/// gap, while writers run flat out.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn watch_keeps_up_with_group_commits() {
    let dir = tempfile::tempdir().unwrap();
    let s = Arc::new(RedbStore::open(dir.path()).unwrap());
    let mut w = s.watch("b", ">", WatchFrom::New).await.unwrap();
    assert_eq!(w.next().await.unwrap().unwrap(), WatchEvent::Current);
    let writers: Vec<_> = (0..8)
        .map(|t| {
            let s = s.clone();
            tokio::spawn(async move {
                let mut last = 0;
                for i in 0..100u32 {
                    last = s
                        .put("b", &format!("t{t}.k{i}"), i.to_le_bytes().to_vec())
                        .await
                        .unwrap();
                }
                last
            })
        })
        .collect();
    let mut last_rev = 0;
    for wr in writers {
        last_rev = last_rev.max(wr.await.unwrap());
    }
    let mut seen = std::collections::BTreeSet::new();
    let mut prev = 0;
    while prev < last_rev {
        let ev = tokio::time::timeout(Duration::from_secs(5), w.next())
            .await
            .expect("watch stalled")
            .unwrap()
            .unwrap();
        let WatchEvent::Change(c) = ev else {
            panic!("unexpected {ev:?}")
        };
        assert!(c.revision > prev, "revisions out of order");
        prev = c.revision;
        seen.insert(c.key);
    }
    assert_eq!(seen.len(), 800, "every key's change was delivered");
}

/// Keys that come and go leave no trace forever: delete markers go after their time.
#[tokio::test]
async fn old_delete_markers_are_removed() {
    let dir = tempfile::tempdir().unwrap();
    let s = RedbStore::open_with(dir.path(), Duration::from_millis(300)).unwrap();
    let first = s.put("b", "gone", b"1".to_vec()).await.unwrap();
    s.delete("b", "gone").await.unwrap();
    assert_eq!(s.history("b", "gone").await.unwrap().len(), 1);
    let start = std::time::Instant::now();
    while !s.history("b", "gone").await.unwrap().is_empty() {
        assert!(start.elapsed() < Duration::from_secs(10), "marker kept");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    // A watch from an old revision no longer replays it; the key stays gone.
    let mut w = s.watch("b", ">", WatchFrom::Revision(first)).await.unwrap();
    assert_eq!(w.next().await.unwrap().unwrap(), WatchEvent::Current);
    assert!(s.get("b", "gone").await.unwrap().is_none());
}
