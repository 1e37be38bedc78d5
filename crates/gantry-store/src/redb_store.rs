//! The embedded store: one redb file, one table per bucket.
//!
//! Each value is stored as 8 bytes of little-endian revision followed by the payload. Revisions
//! come from one counter for the whole database (kept in the `__meta` table and bumped in the
//! same transaction as the write), so they are unique and increasing like JetStream sequences.

use std::path::{Path, PathBuf};
use std::sync::Arc;

use async_trait::async_trait;
use redb::{Database, Durability, ReadableDatabase, ReadableTable, TableDefinition};

use crate::{check_bucket, check_key, Entry, Store, StoreError};

const META: TableDefinition<&str, u64> = TableDefinition::new("__meta");
const REVISION_KEY: &str = "revision";

/// Embedded, durable [`Store`] on redb.
#[derive(Clone)]
pub struct RedbStore {
    db: Arc<Database>,
    path: PathBuf,
}

impl std::fmt::Debug for RedbStore {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("RedbStore")
            .field("path", &self.path)
            .finish()
    }
}

fn be<E: Into<redb::Error>>(e: E) -> StoreError {
    StoreError::Backend(e.into().to_string())
}

enum Cond {
    Always,
    Absent,
    Revision(u64),
}

impl RedbStore {
    /// Open (or create) `dir/state.redb`. Fails with [`StoreError::Locked`] if another process
    /// has it open.
    pub fn open(dir: &Path) -> Result<Self, StoreError> {
        std::fs::create_dir_all(dir)
            .map_err(|e| StoreError::Backend(format!("create {}: {e}", dir.display())))?;
        let path = dir.join("state.redb");
        let db = Database::create(&path).map_err(|e| match e {
            redb::DatabaseError::DatabaseAlreadyOpen => {
                StoreError::Locked(dir.display().to_string())
            }
            other => StoreError::Backend(format!("open {}: {other}", path.display())),
        })?;
        Ok(Self {
            db: Arc::new(db),
            path,
        })
    }

    pub fn path(&self) -> &Path {
        &self.path
    }

    async fn blocking<T, F>(&self, f: F) -> Result<T, StoreError>
    where
        T: Send + 'static,
        F: FnOnce(&Database) -> Result<T, StoreError> + Send + 'static,
    {
        let db = self.db.clone();
        tokio::task::spawn_blocking(move || f(&db))
            .await
            .map_err(|e| StoreError::Backend(format!("store task failed: {e}")))?
    }

    async fn write(
        &self,
        bucket: &str,
        key: &str,
        value: Option<Vec<u8>>,
        cond: Cond,
    ) -> Result<(u64, bool), StoreError> {
        check_bucket(bucket)?;
        check_key(key)?;
        let (bucket, key) = (bucket.to_string(), key.to_string());
        self.blocking(move |db| {
            let mut tx = db.begin_write().map_err(be)?;
            tx.set_durability(Durability::Immediate)
                .map_err(|e| StoreError::Backend(e.to_string()))?;
            let table_def: TableDefinition<&str, &[u8]> = TableDefinition::new(&bucket);
            let result;
            {
                let mut table = tx.open_table(table_def).map_err(be)?;
                let current = table
                    .get(key.as_str())
                    .map_err(be)?
                    .map(|v| revision_of(v.value()));
                match cond {
                    Cond::Always => {}
                    Cond::Absent => {
                        if current.is_some() {
                            return Err(StoreError::AlreadyExists { bucket, key });
                        }
                    }
                    Cond::Revision(expected) => {
                        if current != Some(expected) {
                            return Err(StoreError::RevisionMismatch {
                                bucket,
                                key,
                                expected,
                                found: current,
                            });
                        }
                    }
                }
                match value {
                    Some(v) => {
                        let mut meta = tx.open_table(META).map_err(be)?;
                        let rev = meta
                            .get(REVISION_KEY)
                            .map_err(be)?
                            .map(|g| g.value())
                            .unwrap_or(0)
                            + 1;
                        meta.insert(REVISION_KEY, rev).map_err(be)?;
                        let mut buf = Vec::with_capacity(8 + v.len());
                        buf.extend_from_slice(&rev.to_le_bytes());
                        buf.extend_from_slice(&v);
                        table.insert(key.as_str(), buf.as_slice()).map_err(be)?;
                        result = (rev, true);
                    }
                    None => {
                        let existed = table.remove(key.as_str()).map_err(be)?.is_some();
                        result = (0, existed);
                    }
                }
            }
            tx.commit().map_err(be)?;
            Ok(result)
        })
        .await
    }
}

fn revision_of(raw: &[u8]) -> u64 {
    let mut b = [0u8; 8];
    if raw.len() >= 8 {
        b.copy_from_slice(&raw[..8]);
    }
    u64::from_le_bytes(b)
}

fn entry_of(raw: &[u8]) -> Entry {
    Entry {
        revision: revision_of(raw),
        value: raw.get(8..).unwrap_or(&[]).to_vec(),
    }
}

#[async_trait]
impl Store for RedbStore {
    async fn get(&self, bucket: &str, key: &str) -> Result<Option<Entry>, StoreError> {
        check_bucket(bucket)?;
        check_key(key)?;
        let (bucket, key) = (bucket.to_string(), key.to_string());
        self.blocking(move |db| {
            let tx = db.begin_read().map_err(be)?;
            let def: TableDefinition<&str, &[u8]> = TableDefinition::new(&bucket);
            let table = match tx.open_table(def) {
                Ok(t) => t,
                Err(redb::TableError::TableDoesNotExist(_)) => return Ok(None),
                Err(e) => return Err(be(e)),
            };
            let got = table.get(key.as_str()).map_err(be)?;
            Ok(got.map(|v| entry_of(v.value())))
        })
        .await
    }

    async fn put(&self, bucket: &str, key: &str, value: Vec<u8>) -> Result<u64, StoreError> {
        Ok(self.write(bucket, key, Some(value), Cond::Always).await?.0)
    }

    async fn create(&self, bucket: &str, key: &str, value: Vec<u8>) -> Result<u64, StoreError> {
        Ok(self.write(bucket, key, Some(value), Cond::Absent).await?.0)
    }

    async fn update(
        &self,
        bucket: &str,
        key: &str,
        value: Vec<u8>,
        expected: u64,
    ) -> Result<u64, StoreError> {
        Ok(self
            .write(bucket, key, Some(value), Cond::Revision(expected))
            .await?
            .0)
    }

    async fn delete(&self, bucket: &str, key: &str) -> Result<bool, StoreError> {
        Ok(self.write(bucket, key, None, Cond::Always).await?.1)
    }

    async fn list(&self, bucket: &str, prefix: &str) -> Result<Vec<(String, Entry)>, StoreError> {
        check_bucket(bucket)?;
        let (bucket, prefix) = (bucket.to_string(), prefix.to_string());
        self.blocking(move |db| {
            let tx = db.begin_read().map_err(be)?;
            let def: TableDefinition<&str, &[u8]> = TableDefinition::new(&bucket);
            let table = match tx.open_table(def) {
                Ok(t) => t,
                Err(redb::TableError::TableDoesNotExist(_)) => return Ok(Vec::new()),
                Err(e) => return Err(be(e)),
            };
            let mut out = Vec::new();
            for item in table.range(prefix.as_str()..).map_err(be)? {
                let (k, v) = item.map_err(be)?;
                let k = k.value();
                if !k.starts_with(prefix.as_str()) {
                    break;
                }
                out.push((k.to_string(), entry_of(v.value())));
            }
            Ok(out)
        })
        .await
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;
    use crate::StoreJsonExt;

    fn tmp() -> PathBuf {
        let p = std::env::temp_dir().join(format!(
            "gantry-store-test-{}-{}",
            std::process::id(),
            gantry_unique()
        ));
        std::fs::create_dir_all(&p).unwrap();
        p
    }

    fn gantry_unique() -> u64 {
        use std::sync::atomic::{AtomicU64, Ordering};
        static N: AtomicU64 = AtomicU64::new(0);
        N.fetch_add(1, Ordering::Relaxed)
    }

    #[tokio::test]
    async fn put_get_list_delete() {
        let dir = tmp();
        let s = RedbStore::open(&dir).unwrap();
        assert_eq!(s.get("b", "k").await.unwrap(), None);
        assert!(s.list("b", "").await.unwrap().is_empty());
        let r1 = s.put("b", "a/1", b"one".to_vec()).await.unwrap();
        let r2 = s.put("b", "a/2", b"two".to_vec()).await.unwrap();
        let r3 = s.put("b", "c/1", b"x".to_vec()).await.unwrap();
        assert!(r1 < r2 && r2 < r3);
        let got = s.get("b", "a/2").await.unwrap().unwrap();
        assert_eq!(got.value, b"two");
        assert_eq!(got.revision, r2);
        let listed = s.list("b", "a/").await.unwrap();
        assert_eq!(
            listed.iter().map(|(k, _)| k.as_str()).collect::<Vec<_>>(),
            ["a/1", "a/2"]
        );
        assert!(s.delete("b", "a/1").await.unwrap());
        assert!(!s.delete("b", "a/1").await.unwrap());
        assert_eq!(s.list("b", "a/").await.unwrap().len(), 1);
        std::fs::remove_dir_all(dir).unwrap();
    }

    #[tokio::test]
    async fn create_and_update_are_conditional() {
        let dir = tmp();
        let s = RedbStore::open(&dir).unwrap();
        let r = s.create("b", "k", b"1".to_vec()).await.unwrap();
        assert!(matches!(
            s.create("b", "k", b"2".to_vec()).await,
            Err(StoreError::AlreadyExists { .. })
        ));
        assert!(matches!(
            s.update("b", "k", b"2".to_vec(), r + 100).await,
            Err(StoreError::RevisionMismatch { .. })
        ));
        let r2 = s.update("b", "k", b"2".to_vec(), r).await.unwrap();
        assert!(r2 > r);
        assert_eq!(s.get("b", "k").await.unwrap().unwrap().value, b"2");
        std::fs::remove_dir_all(dir).unwrap();
    }

    #[tokio::test]
    async fn survives_reopen_and_is_locked_while_open() {
        let dir = tmp();
        {
            let s = RedbStore::open(&dir).unwrap();
            s.put_json("b", "k", &vec![1, 2, 3]).await.unwrap();
        }
        let s = RedbStore::open(&dir).unwrap();
        let (v, _): (Vec<i32>, u64) = s.get_json("b", "k").await.unwrap().unwrap();
        assert_eq!(v, [1, 2, 3]);
        // A second open of the same file while the first is open is refused.
        assert!(matches!(RedbStore::open(&dir), Err(StoreError::Locked(_))));
        drop(s);
        std::fs::remove_dir_all(dir).unwrap();
    }

    #[tokio::test]
    async fn rejects_bad_names() {
        let dir = tmp();
        let s = RedbStore::open(&dir).unwrap();
        assert!(s.put("Bad Bucket", "k", vec![]).await.is_err());
        assert!(s.put("b", "bad key", vec![]).await.is_err());
        assert!(s.put("b", ".k", vec![]).await.is_err());
        std::fs::remove_dir_all(dir).unwrap();
    }
}
