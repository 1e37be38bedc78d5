//! Durable state behind one key-value trait with watches, and two backends.
//!
//! The trait is shaped like a NATS JetStream KV bucket: buckets of keys whose `.` separates a
//! hierarchy (keys are valid JetStream subjects), each value with a revision, create-if-absent,
//! compare-and-set updates and deletes, per-bucket history depth and maximum age, key filters with
//! the subject wildcards `*` (one token) and `>` (one or more trailing tokens), and watches from a
//! revision. Two implementations pass the same behaviour suite (`tests/behaviour.rs`):
//!
//! - [`RedbStore`], embedded: one redb file in the data directory. Writes from all callers are
//!   queued to one writer thread that commits everything waiting in one transaction and one fsync
//!   (group commit), so that concurrent writers share the cost of durability.
//! - [`NatsStore`], on NATS JetStream KV (async-nats), for cluster mode and for users who run NATS.
//!
//! Architecture invariant: when a write method returns `Ok`, the embedded store has the change on
//! disk (fsync). JetStream acknowledges once the write is stored by the stream's replicas, which
//! by default is before fsync (the server syncs on an interval); replicas, not fsync, are what
//! make a NATS-backed write survive the loss of a machine. ARCHITECTURE.md says more.
#![forbid(unsafe_code)]

mod filter;
pub mod log;
mod metered;
mod nats_store;
mod redb_store;

use std::time::Duration;

use async_trait::async_trait;
use serde::de::DeserializeOwned;
use serde::{Deserialize, Serialize};
use tokio::sync::mpsc;

pub use filter::{check_filter, filter_matches, literal_prefix};
pub use log::{
    Append, Appended, ConsumerPosition, Log, NatsLog, ReadFrom, Record, SegmentLog, StreamInfo,
    StreamOptions,
};
pub use metered::MeteredStore;
pub use nats_store::{NatsOptions, NatsStore};
pub use redb_store::RedbStore;

/// A stored value and the revision of the write that produced it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Entry {
    pub value: Vec<u8>,
    pub revision: u64,
}

/// What a change did to its key.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Op {
    Put,
    Delete,
}

/// One change to one key, as a watch or a key's history reports it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Change {
    pub key: String,
    pub revision: u64,
    pub op: Op,
    /// The value written (empty for a delete).
    pub value: Vec<u8>,
}

/// Where a watch starts.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum WatchFrom {
    /// The current value of every matching key, then [`WatchEvent::Current`], then every change.
    /// This is how a component loads its state and follows it without a gap.
    Current,
    /// Every retained change with a revision at or after this one (deletes included), then
    /// [`WatchEvent::Current`], then every later change. Resumes a watch that stopped.
    Revision(u64),
    /// Only changes made after the watch starts ([`WatchEvent::Current`] comes first).
    New,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum WatchEvent {
    Change(Change),
    /// Everything that existed when the watch started has been delivered; what follows is live.
    Current,
}

/// Per-bucket options; both backends honour them.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct BucketOptions {
    /// How many changes (deletes included) each key keeps, 1..=64.
    pub history: u8,
    /// Changes older than this are removed; a key whose latest change expires disappears.
    #[serde(default, with = "opt_millis")]
    pub max_age: Option<Duration>,
}

impl Default for BucketOptions {
    fn default() -> Self {
        Self {
            history: 1,
            max_age: None,
        }
    }
}

impl BucketOptions {
    pub const MAX_HISTORY: u8 = 64;

    fn check(&self, bucket: &str) -> Result<(), StoreError> {
        if self.history == 0 || self.history > Self::MAX_HISTORY {
            return Err(StoreError::InvalidOptions {
                bucket: bucket.into(),
                why: format!(
                    "history must be 1..={}, got {}",
                    Self::MAX_HISTORY,
                    self.history
                ),
            });
        }
        if self.max_age.is_some_and(|d| d < Duration::from_millis(100)) {
            return Err(StoreError::InvalidOptions {
                bucket: bucket.into(),
                why: "max_age must be at least 100ms".into(),
            });
        }
        Ok(())
    }
}

pub(crate) mod opt_millis {
    use serde::{Deserialize, Deserializer, Serializer};
    use std::time::Duration;

    pub fn serialize<S: Serializer>(d: &Option<Duration>, s: S) -> Result<S::Ok, S::Error> {
        match d {
            Some(d) => s.serialize_some(&(d.as_millis() as u64)),
            None => s.serialize_none(),
        }
    }

    pub fn deserialize<'de, D: Deserializer<'de>>(d: D) -> Result<Option<Duration>, D::Error> {
        Ok(Option::<u64>::deserialize(d)?.map(Duration::from_millis))
    }
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
    #[error("invalid options for bucket {bucket}: {why}")]
    InvalidOptions { bucket: String, why: String },
    #[error("stored value of {bucket}/{key} is not valid: {reason}")]
    Corrupt {
        bucket: String,
        key: String,
        reason: String,
    },
    #[error("store unavailable: {0}")]
    Unavailable(String),
    #[error("no such {0}")]
    NotFound(String),
    #[error("too large: {0}")]
    TooLarge(String),
    #[error("store: {0}")]
    Backend(String),
}

/// A stream of [`WatchEvent`]s. Dropping it stops the watch.
pub struct Watcher {
    rx: mpsc::Receiver<Result<WatchEvent, StoreError>>,
}

impl Watcher {
    /// A watcher fed by a task that sends into the returned sender until it is closed.
    pub(crate) fn channel() -> (mpsc::Sender<Result<WatchEvent, StoreError>>, Self) {
        let (tx, rx) = mpsc::channel(256);
        (tx, Self { rx })
    }

    /// The next event; `None` when the watch ended (the store shut down). An `Err` is followed by
    /// the end of the watch: start a new one from the last revision seen.
    pub async fn next(&mut self) -> Option<Result<WatchEvent, StoreError>> {
        self.rx.recv().await
    }
}

impl std::fmt::Debug for Watcher {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("Watcher")
    }
}

/// The storage every control-plane component writes through.
#[async_trait]
pub trait Store: Send + Sync + 'static {
    /// Which implementation this is ("embedded" or "nats"), for logs and status.
    fn backend(&self) -> &'static str;
    /// Create a bucket with these options, or change the options of an existing one. Buckets
    /// written without this call get [`BucketOptions::default`].
    async fn ensure_bucket(&self, bucket: &str, options: BucketOptions) -> Result<(), StoreError>;
    async fn get(&self, bucket: &str, key: &str) -> Result<Option<Entry>, StoreError>;
    /// Write unconditionally; returns the new revision.
    async fn put(&self, bucket: &str, key: &str, value: Vec<u8>) -> Result<u64, StoreError>;
    /// Write only if the key does not exist (a deleted key does not exist).
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
    /// Remove a key only if its current revision is `expected`.
    async fn delete_if(&self, bucket: &str, key: &str, expected: u64) -> Result<(), StoreError>;
    /// Current keys and values matching `filter` (`>` for all), in key order.
    async fn list(&self, bucket: &str, filter: &str) -> Result<Vec<(String, Entry)>, StoreError>;
    /// Current keys matching `filter`, in key order.
    async fn keys(&self, bucket: &str, filter: &str) -> Result<Vec<String>, StoreError>;
    /// The retained changes of one key, oldest first (as many as the bucket's history keeps).
    async fn history(&self, bucket: &str, key: &str) -> Result<Vec<Change>, StoreError>;
    /// Follow changes to keys matching `filter`.
    async fn watch(
        &self,
        bucket: &str,
        filter: &str,
        from: WatchFrom,
    ) -> Result<Watcher, StoreError>;
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

    async fn update_json<T: Serialize + Sync>(
        &self,
        bucket: &str,
        key: &str,
        value: &T,
        expected: u64,
    ) -> Result<u64, StoreError> {
        self.update(bucket, key, encode(value)?, expected).await
    }

    async fn list_json<T: DeserializeOwned>(
        &self,
        bucket: &str,
        filter: &str,
    ) -> Result<Vec<(String, T, u64)>, StoreError> {
        self.list(bucket, filter)
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

/// Decode a JSON value read from `bucket/key`.
pub fn decode<T: DeserializeOwned>(bucket: &str, key: &str, bytes: &[u8]) -> Result<T, StoreError> {
    serde_json::from_slice(bytes).map_err(|e| StoreError::Corrupt {
        bucket: bucket.into(),
        key: key.into(),
        reason: e.to_string(),
    })
}

/// Bucket names: `[a-z0-9_-]`, 1..=64 (valid as JetStream KV bucket names), not starting with
/// `__` (the embedded store's own tables).
pub fn check_bucket(bucket: &str) -> Result<(), StoreError> {
    let ok = !bucket.is_empty()
        && bucket.len() <= 64
        && !bucket.starts_with("__")
        && bucket
            .bytes()
            .all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || c == b'_' || c == b'-');
    if ok {
        Ok(())
    } else {
        Err(StoreError::InvalidName {
            what: "bucket",
            name: bucket.into(),
            why: "expected 1-64 characters of a-z, 0-9, '_' and '-', not starting with '__'",
        })
    }
}

/// Whether `c` may appear in a key (the JetStream KV key alphabet).
pub(crate) fn key_byte(c: u8) -> bool {
    c.is_ascii_alphanumeric() || matches!(c, b'-' | b'/' | b'_' | b'=' | b'.')
}

/// Keys: `[-/_=.a-zA-Z0-9]`, 1..=512, `.`-separated tokens none of which is empty (valid
/// JetStream KV keys and subjects).
pub fn check_key(key: &str) -> Result<(), StoreError> {
    let ok = !key.is_empty()
        && key.len() <= 512
        && key.bytes().all(key_byte)
        && key.split('.').all(|t| !t.is_empty());
    if ok {
        Ok(())
    } else {
        Err(StoreError::InvalidName {
            what: "key",
            name: key.into(),
            why: "expected 1-512 characters of a-z, A-Z, 0-9 and -/_=. in '.'-separated tokens, none empty",
        })
    }
}
