//! Durable state behind one small key-value trait.
//!
//! The trait is shaped like a NATS JetStream KV bucket (buckets of keys, each value with a
//! revision, create-if-absent and compare-and-set updates), so that cluster mode can implement it
//! on JetStream without changing any caller. The embedded implementation, [`RedbStore`], keeps
//! everything in one redb file in the data directory.
//!
//! Architecture invariant: when a write method returns `Ok`, the change is on disk (redb commits
//! with `Durability::Immediate`, i.e. fsync). Callers acknowledge to clients only after that.
#![forbid(unsafe_code)]

mod redb_store;

use async_trait::async_trait;
use serde::de::DeserializeOwned;
use serde::Serialize;

pub use redb_store::RedbStore;

/// A stored value and the revision of the write that produced it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Entry {
    pub value: Vec<u8>,
    pub revision: u64,
}

#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    #[error("key {bucket}/{key} already exists")]
    AlreadyExists { bucket: String, key: String },
    #[error(
        "key {bucket}/{key} changed concurrently (expected revision {expected}, found {found:?})"
    )]
    RevisionMismatch {
        bucket: String,
        key: String,
        expected: u64,
        found: Option<u64>,
    },
    #[error("data directory {0} is in use by another gantry process")]
    Locked(String),
    #[error("invalid {what} {name:?}: {why}")]
    InvalidName {
        what: &'static str,
        name: String,
        why: &'static str,
    },
    #[error("stored value of {bucket}/{key} is not valid: {reason}")]
    Corrupt {
        bucket: String,
        key: String,
        reason: String,
    },
    #[error("store: {0}")]
    Backend(String),
}

/// The storage every control-plane component writes through.
#[async_trait]
pub trait Store: Send + Sync + 'static {
    async fn get(&self, bucket: &str, key: &str) -> Result<Option<Entry>, StoreError>;
    /// Write unconditionally; returns the new revision.
    async fn put(&self, bucket: &str, key: &str, value: Vec<u8>) -> Result<u64, StoreError>;
    /// Write only if the key does not exist.
    async fn create(&self, bucket: &str, key: &str, value: Vec<u8>) -> Result<u64, StoreError>;
    /// Write only if the key's current revision is `expected`.
    async fn update(
        &self,
        bucket: &str,
        key: &str,
        value: Vec<u8>,
        expected: u64,
    ) -> Result<u64, StoreError>;
    /// Remove a key; returns whether it existed.
    async fn delete(&self, bucket: &str, key: &str) -> Result<bool, StoreError>;
    /// All keys starting with `prefix`, in key order.
    async fn list(&self, bucket: &str, prefix: &str) -> Result<Vec<(String, Entry)>, StoreError>;
}

/// Typed JSON access on top of any [`Store`].
#[async_trait]
pub trait StoreJsonExt: Store {
    async fn get_json<T: DeserializeOwned>(
        &self,
        bucket: &str,
        key: &str,
    ) -> Result<Option<(T, u64)>, StoreError> {
        match self.get(bucket, key).await? {
            None => Ok(None),
            Some(e) => decode(bucket, key, &e.value).map(|v| Some((v, e.revision))),
        }
    }

    async fn put_json<T: Serialize + Sync>(
        &self,
        bucket: &str,
        key: &str,
        value: &T,
    ) -> Result<u64, StoreError> {
        self.put(bucket, key, encode(value)?).await
    }

    async fn create_json<T: Serialize + Sync>(
        &self,
        bucket: &str,
        key: &str,
        value: &T,
    ) -> Result<u64, StoreError> {
        self.create(bucket, key, encode(value)?).await
    }

    async fn list_json<T: DeserializeOwned>(
        &self,
        bucket: &str,
        prefix: &str,
    ) -> Result<Vec<(String, T, u64)>, StoreError> {
        self.list(bucket, prefix)
            .await?
            .into_iter()
            .map(|(k, e)| decode(bucket, &k, &e.value).map(|v| (k, v, e.revision)))
            .collect()
    }
}

impl<S: Store + ?Sized> StoreJsonExt for S {}

fn encode<T: Serialize>(value: &T) -> Result<Vec<u8>, StoreError> {
    serde_json::to_vec(value).map_err(|e| StoreError::Backend(format!("encode: {e}")))
}

fn decode<T: DeserializeOwned>(bucket: &str, key: &str, bytes: &[u8]) -> Result<T, StoreError> {
    serde_json::from_slice(bytes).map_err(|e| StoreError::Corrupt {
        bucket: bucket.into(),
        key: key.into(),
        reason: e.to_string(),
    })
}

/// Bucket names: `[a-z0-9_-]`, 1..=64 (valid as JetStream KV bucket names).
pub fn check_bucket(bucket: &str) -> Result<(), StoreError> {
    let ok = !bucket.is_empty()
        && bucket.len() <= 64
        && bucket
            .bytes()
            .all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || c == b'_' || c == b'-');
    if ok {
        Ok(())
    } else {
        Err(StoreError::InvalidName {
            what: "bucket",
            name: bucket.into(),
            why: "expected 1-64 characters of a-z, 0-9, '_' and '-'",
        })
    }
}

/// Keys: `[-/_=.a-zA-Z0-9]`, 1..=512, not starting or ending with `.` (valid JetStream KV keys).
pub fn check_key(key: &str) -> Result<(), StoreError> {
    let ok = !key.is_empty()
        && key.len() <= 512
        && !key.starts_with('.')
        && !key.ends_with('.')
        && key
            .bytes()
            .all(|c| c.is_ascii_alphanumeric() || matches!(c, b'-' | b'/' | b'_' | b'=' | b'.'));
    if ok {
        Ok(())
    } else {
        Err(StoreError::InvalidName {
            what: "key",
            name: key.into(),
            why: "expected 1-512 characters of a-z, A-Z, 0-9 and -/_=. not starting or ending with '.'",
        })
    }
}
