//! The NATS JetStream KV backend (async-nats).
//!
//! Each Gantry bucket is a JetStream KV bucket named `{namespace}_{bucket}` (the namespace lets
//! several Gantry systems, or test runs, share one NATS), created with file storage, the
//! configured replica count and the bucket's options. Revisions are the stream's sequences: unique
//! and increasing per bucket. Watches, listings and histories are ordered push consumers on the
//! bucket's stream, filtered by subject, so key filters are JetStream's own wildcards.

use std::collections::HashMap;
use std::time::Duration;

use async_nats::jetstream::{
    self,
    consumer::{push, DeliverPolicy, ReplayPolicy},
    kv,
    stream::{self, StorageType},
};
use async_trait::async_trait;
use bytes::Bytes;
use futures_util::StreamExt;
use tokio::sync::RwLock;

use crate::{
    check_bucket, check_filter, check_key, BucketOptions, Change, Entry, Op, Store, StoreError,
    WatchEvent, WatchFrom, Watcher,
};

/// How to reach NATS and how to keep Gantry's buckets there.
#[derive(Debug, Clone)]
pub struct NatsOptions {
    /// `nats://host:port` (or a comma-separated list of servers).
    pub url: String,
    /// Copies JetStream keeps of each bucket (1, 3 or 5 in a cluster; 1 on a single server).
    pub replicas: usize,
    /// Prefix of every bucket name, so that several systems can share one NATS: `[a-z0-9-]`.
    pub namespace: String,
    /// How long to wait for the first connection.
    pub connect_timeout: Duration,
}

impl NatsOptions {
    pub fn new(url: impl Into<String>) -> Self {
        Self {
            url: url.into(),
            replicas: 1,
            namespace: "gantry".into(),
            connect_timeout: Duration::from_secs(5),
        }
    }
}

/// Whether a namespace is usable as the prefix of JetStream bucket names.
pub fn valid_namespace(ns: &str) -> bool {
    !ns.is_empty()
        && ns.len() <= 32
        && ns
            .bytes()
            .all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || c == b'-')
}

/// [`Store`] on NATS JetStream KV.
pub struct NatsStore {
    js: jetstream::Context,
    opts: NatsOptions,
    buckets: RwLock<HashMap<String, kv::Store>>,
}

impl std::fmt::Debug for NatsStore {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("NatsStore")
            .field("url", &self.opts.url)
            .field("namespace", &self.opts.namespace)
            .finish()
    }
}

pub(crate) fn nats_err(what: &str, e: impl std::fmt::Display) -> StoreError {
    let msg = e.to_string();
    if msg.contains("timed out") || msg.contains("no responders") || msg.contains("disconnected") {
        StoreError::Unavailable(format!("nats {what}: {msg}"))
    } else {
        StoreError::Backend(format!("nats {what}: {msg}"))
    }
}

impl NatsStore {
    /// Connect and check that the server has JetStream.
    pub async fn connect(opts: NatsOptions) -> Result<Self, StoreError> {
        if !valid_namespace(&opts.namespace) {
            return Err(StoreError::InvalidName {
                what: "namespace",
                name: opts.namespace.clone(),
                why: "expected 1-32 characters of a-z, 0-9 and '-'",
            });
        }
        let client = async_nats::ConnectOptions::new()
            .name("gantry")
            .connection_timeout(opts.connect_timeout)
            .connect(opts.url.as_str())
            .await
            .map_err(|e| {
                StoreError::Unavailable(format!("cannot connect to NATS at {}: {e}", opts.url))
            })?;
        // `$JS.API.INFO` rather than `query_account`, whose answer from NATS 2.9 servers this
        // client version cannot parse.
        let no_js = |why: String| {
            StoreError::Unavailable(format!(
                "NATS at {} has no JetStream (start nats-server with -js): {why}",
                opts.url
            ))
        };
        let info = client
            .request("$JS.API.INFO", Bytes::new())
            .await
            .map_err(|e| no_js(e.to_string()))?;
        let info: serde_json::Value =
            serde_json::from_slice(&info.payload).map_err(|e| no_js(e.to_string()))?;
        if let Some(err) = info.get("error") {
            return Err(no_js(err.to_string()));
        }
        let js = jetstream::new(client);
        Ok(Self {
            js,
            opts,
            buckets: RwLock::new(HashMap::new()),
        })
    }

    pub fn options(&self) -> &NatsOptions {
        &self.opts
    }

    /// The JetStream context (the log on NATS shares the connection).
    pub(crate) fn context(&self) -> &jetstream::Context {
        &self.js
    }

    fn bucket_name(&self, bucket: &str) -> String {
        format!("{}_{bucket}", self.opts.namespace)
    }

    /// The stream behind a KV bucket, as the KV specification (ADR-8) lays it out and as
    /// async-nats's `create_key_value` would make it (which needs a NATS 2.10 account answer).
    fn stream_config(&self, bucket: &str, o: BucketOptions) -> stream::Config {
        let name = self.bucket_name(bucket);
        let max_age = o.max_age.unwrap_or_default();
        stream::Config {
            name: format!("KV_{name}"),
            subjects: vec![format!("$KV.{name}.>")],
            max_messages_per_subject: i64::from(o.history),
            max_age,
            // Publishes deduplicated within the window must not outlive their values.
            duplicate_window: if max_age.is_zero() {
                Duration::from_secs(120)
            } else {
                max_age.min(Duration::from_secs(120))
            },
            storage: StorageType::File,
            num_replicas: self.opts.replicas.max(1),
            allow_rollup: true,
            deny_delete: true,
            deny_purge: false,
            allow_direct: true,
            discard: stream::DiscardPolicy::New,
            ..Default::default()
        }
    }

    /// Create the bucket's stream or bring its options up to date; returns its KV handle.
    async fn configure(&self, bucket: &str, o: BucketOptions) -> Result<kv::Store, StoreError> {
        self.js
            .create_or_update_stream(self.stream_config(bucket, o))
            .await
            .map_err(|e| nats_err("configure bucket", e))?;
        self.js
            .get_key_value(self.bucket_name(bucket))
            .await
            .map_err(|e| nats_err("open bucket", e))
    }

    /// The KV handle of a bucket that exists (reads of a bucket nobody wrote do not create it).
    async fn existing(&self, bucket: &str) -> Result<Option<kv::Store>, StoreError> {
        check_bucket(bucket)?;
        if let Some(s) = self.buckets.read().await.get(bucket) {
            return Ok(Some(s.clone()));
        }
        match self.js.get_key_value(self.bucket_name(bucket)).await {
            Ok(s) => {
                self.buckets
                    .write()
                    .await
                    .insert(bucket.to_string(), s.clone());
                Ok(Some(s))
            }
            // JetStream's "stream not found" (10059); anything else is a real failure, which a
            // read must not turn into "empty".
            Err(e) if e.to_string().contains("not found") => Ok(None),
            Err(e) => Err(nats_err("open bucket", e)),
        }
    }

    /// The KV handle of a bucket, created with default options on first use.
    async fn kv(&self, bucket: &str) -> Result<kv::Store, StoreError> {
        check_bucket(bucket)?;
        if let Some(s) = self.buckets.read().await.get(bucket) {
            return Ok(s.clone());
        }
        let store = match self.existing(bucket).await? {
            Some(s) => s,
            // Only a bucket that does not exist is created; a failed lookup must never reset an
            // existing bucket's options.
            None => self.configure(bucket, BucketOptions::default()).await?,
        };
        self.buckets
            .write()
            .await
            .insert(bucket.to_string(), store.clone());
        Ok(store)
    }

    /// Remove every bucket of this namespace (a clean start; tests).
    pub async fn destroy_namespace(&self) -> Result<usize, StoreError> {
        let prefix = format!("KV_{}_", self.opts.namespace);
        let logs = format!("{}_log_", self.opts.namespace);
        let mut names = self.js.stream_names();
        let mut doomed = Vec::new();
        let mut doomed_logs = Vec::new();
        while let Some(n) = names.next().await {
            let n = n.map_err(|e| nats_err("list streams", e))?;
            if n.starts_with(&logs) {
                doomed_logs.push(n.clone());
            }
            if let Some(b) = n.strip_prefix("KV_") {
                if n.starts_with(&prefix) {
                    doomed.push(b.to_string());
                }
            }
        }
        for b in &doomed {
            self.js
                .delete_key_value(b)
                .await
                .map_err(|e| nats_err("delete bucket", e))?;
        }
        // The log's streams (`NatsLog`) of this namespace too.
        for s in &doomed_logs {
            self.js
                .delete_stream(s)
                .await
                .map_err(|e| nats_err("delete stream", e))?;
        }
        self.buckets.write().await.clear();
        Ok(doomed.len())
    }

    async fn current_revision(&self, kv: &kv::Store, key: &str) -> Option<u64> {
        match kv.entry(key).await {
            Ok(Some(e)) if e.operation == kv::Operation::Put => Some(e.revision),
            _ => None,
        }
    }

    /// An ordered consumer over the bucket's stream and how many messages it has to deliver.
    async fn consumer(
        &self,
        kv: &kv::Store,
        filter: &str,
        deliver_policy: DeliverPolicy,
        headers_only: bool,
    ) -> Result<(push::Ordered, u64), StoreError> {
        let consumer = kv
            .stream
            .create_consumer(push::OrderedConfig {
                deliver_subject: self.js.client().new_inbox(),
                description: Some("gantry store".into()),
                filter_subject: format!("{}{filter}", kv.prefix),
                replay_policy: ReplayPolicy::Instant,
                headers_only,
                deliver_policy,
                ..Default::default()
            })
            .await
            .map_err(|e| nats_err("create consumer", e))?;
        let pending = consumer.cached_info().num_pending;
        let messages = consumer
            .messages()
            .await
            .map_err(|e| nats_err("consume", e))?;
        Ok((messages, pending))
    }

    /// Last value per key matching `filter`, puts only, in key order.
    async fn last_per_key(
        &self,
        bucket: &str,
        filter: &str,
        headers_only: bool,
    ) -> Result<Vec<(String, Entry)>, StoreError> {
        check_filter(filter)?;
        let Some(kv) = self.existing(bucket).await? else {
            return Ok(Vec::new());
        };
        let (messages, pending) = self
            .consumer(&kv, filter, DeliverPolicy::LastPerSubject, headers_only)
            .await?;
        // A write during the listing can deliver a key twice: the latest change wins, and a key
        // whose latest change is a delete is gone.
        let mut latest: std::collections::BTreeMap<String, Change> = Default::default();
        for c in drain(&kv, messages, pending, "list").await? {
            if latest.get(&c.key).is_none_or(|l| l.revision < c.revision) {
                latest.insert(c.key.clone(), c);
            }
        }
        let mut out: Vec<(String, Entry)> = latest
            .into_values()
            .filter(|c| c.op == Op::Put)
            .map(|c| {
                (
                    c.key,
                    Entry {
                        value: c.value,
                        revision: c.revision,
                    },
                )
            })
            .collect();
        out.sort_by(|a, b| a.0.cmp(&b.0));
        Ok(out)
    }
}

/// A change from a message of a KV stream, and how many messages the consumer has left.
fn parse(kv: &kv::Store, m: &jetstream::Message) -> Result<(Change, u64), StoreError> {
    let info = m.info().map_err(|e| nats_err("message metadata", e))?;
    let key = m
        .subject
        .strip_prefix(kv.prefix.as_str())
        .unwrap_or(m.subject.as_str())
        .to_string();
    let deleted = m.headers.as_ref().is_some_and(|h| {
        h.get("KV-Operation")
            .is_some_and(|v| v.as_str() == "DEL" || v.as_str() == "PURGE")
            || h.get("Nats-Marker-Reason").is_some()
    });
    let (op, value) = if deleted {
        (Op::Delete, Vec::new())
    } else {
        (Op::Put, m.payload.to_vec())
    };
    Ok((
        Change {
            key,
            revision: info.stream_sequence,
            op,
            value,
        },
        info.pending,
    ))
}

/// Every message an ordered consumer has to deliver (`pending` when it was made), as changes.
async fn drain(
    kv: &kv::Store,
    mut messages: push::Ordered,
    pending: u64,
    what: &str,
) -> Result<Vec<Change>, StoreError> {
    let mut out = Vec::new();
    if pending == 0 {
        return Ok(out);
    }
    loop {
        let next = tokio::time::timeout(Duration::from_secs(10), messages.next())
            .await
            .map_err(|_| StoreError::Unavailable(format!("nats {what}: no answer in 10s")))?;
        let Some(m) = next else { break };
        let (change, left) = parse(kv, &m.map_err(|e| nats_err(what, e))?)?;
        out.push(change);
        if left == 0 {
            break;
        }
    }
    Ok(out)
}

fn is_wrong_revision(e: &kv::UpdateError) -> bool {
    matches!(e.kind(), kv::UpdateErrorKind::WrongLastRevision)
}

#[async_trait]
impl Store for NatsStore {
    fn backend(&self) -> &'static str {
        "nats"
    }

    async fn ensure_bucket(&self, bucket: &str, options: BucketOptions) -> Result<(), StoreError> {
        check_bucket(bucket)?;
        options.check(bucket)?;
        let store = self.configure(bucket, options).await?;
        self.buckets.write().await.insert(bucket.to_string(), store);
        Ok(())
    }

    async fn get(&self, bucket: &str, key: &str) -> Result<Option<Entry>, StoreError> {
        check_key(key)?;
        let Some(kv) = self.existing(bucket).await? else {
            return Ok(None);
        };
        match kv.entry(key).await.map_err(|e| nats_err("get", e))? {
            Some(e) if e.operation == kv::Operation::Put => Ok(Some(Entry {
                value: e.value.to_vec(),
                revision: e.revision,
            })),
            _ => Ok(None),
        }
    }

    async fn put(&self, bucket: &str, key: &str, value: Vec<u8>) -> Result<u64, StoreError> {
        check_key(key)?;
        let kv = self.kv(bucket).await?;
        kv.put(key, Bytes::from(value))
            .await
            .map_err(|e| nats_err("put", e))
    }

    async fn create(&self, bucket: &str, key: &str, value: Vec<u8>) -> Result<u64, StoreError> {
        check_key(key)?;
        let kv = self.kv(bucket).await?;
        kv.create(key, Bytes::from(value))
            .await
            .map_err(|e| match e.kind() {
                kv::CreateErrorKind::AlreadyExists => StoreError::AlreadyExists {
                    bucket: bucket.into(),
                    key: key.into(),
                },
                _ => nats_err("create", e),
            })
    }

    async fn update(
        &self,
        bucket: &str,
        key: &str,
        value: Vec<u8>,
        expected: u64,
    ) -> Result<u64, StoreError> {
        check_key(key)?;
        let kv = self.kv(bucket).await?;
        match kv.update(key, Bytes::from(value), expected).await {
            Ok(r) => Ok(r),
            Err(e) if is_wrong_revision(&e) => Err(StoreError::RevisionMismatch {
                bucket: bucket.into(),
                key: key.into(),
                expected,
                found: self.current_revision(&kv, key).await,
            }),
            Err(e) => Err(nats_err("update", e)),
        }
    }

    async fn delete(&self, bucket: &str, key: &str) -> Result<bool, StoreError> {
        check_key(key)?;
        let Some(kv) = self.existing(bucket).await? else {
            return Ok(false);
        };
        // Delete what is there, conditionally, so that "existed" is true only for the caller
        // whose delete removed a value.
        for _ in 0..16 {
            let Some(rev) = self.current_revision(&kv, key).await else {
                return Ok(false);
            };
            match kv.delete_expect_revision(key, Some(rev)).await {
                Ok(()) => return Ok(true),
                Err(e) if is_wrong_revision(&e) => continue,
                Err(e) => return Err(nats_err("delete", e)),
            }
        }
        Err(StoreError::Unavailable(format!(
            "delete {bucket}/{key}: the key kept changing"
        )))
    }

    async fn delete_if(&self, bucket: &str, key: &str, expected: u64) -> Result<(), StoreError> {
        check_key(key)?;
        let kv = self.kv(bucket).await?;
        let current = self.current_revision(&kv, key).await;
        if current != Some(expected) {
            return Err(StoreError::RevisionMismatch {
                bucket: bucket.into(),
                key: key.into(),
                expected,
                found: current,
            });
        }
        match kv.delete_expect_revision(key, Some(expected)).await {
            Ok(()) => Ok(()),
            Err(e) if is_wrong_revision(&e) => Err(StoreError::RevisionMismatch {
                bucket: bucket.into(),
                key: key.into(),
                expected,
                found: self.current_revision(&kv, key).await,
            }),
            Err(e) => Err(nats_err("delete", e)),
        }
    }

    async fn list(&self, bucket: &str, filter: &str) -> Result<Vec<(String, Entry)>, StoreError> {
        self.last_per_key(bucket, filter, false).await
    }

    async fn keys(&self, bucket: &str, filter: &str) -> Result<Vec<String>, StoreError> {
        Ok(self
            .last_per_key(bucket, filter, true)
            .await?
            .into_iter()
            .map(|(k, _)| k)
            .collect())
    }

    async fn history(&self, bucket: &str, key: &str) -> Result<Vec<Change>, StoreError> {
        check_key(key)?;
        let Some(kv) = self.existing(bucket).await? else {
            return Ok(Vec::new());
        };
        let (messages, pending) = self.consumer(&kv, key, DeliverPolicy::All, false).await?;
        drain(&kv, messages, pending, "history").await
    }

    async fn watch(
        &self,
        bucket: &str,
        filter: &str,
        from: WatchFrom,
    ) -> Result<Watcher, StoreError> {
        check_filter(filter)?;
        let kv = self.kv(bucket).await?;
        let policy = match from {
            WatchFrom::Current => DeliverPolicy::LastPerSubject,
            WatchFrom::Revision(r) => DeliverPolicy::ByStartSequence {
                start_sequence: r.max(1),
            },
            WatchFrom::New => DeliverPolicy::New,
        };
        let (mut messages, pending) = self.consumer(&kv, filter, policy, false).await?;
        let (tx, watcher) = Watcher::channel();
        tokio::spawn(async move {
            let mut current = pending == 0;
            if current && tx.send(Ok(WatchEvent::Current)).await.is_err() {
                return;
            }
            loop {
                let m = tokio::select! {
                    m = messages.next() => m,
                    _ = tx.closed() => return,
                };
                let Some(m) = m else { return };
                let parsed = m
                    .map_err(|e| nats_err("watch", e))
                    .and_then(|m| parse(&kv, &m));
                let (change, left) = match parsed {
                    Ok(p) => p,
                    Err(e) => {
                        let _ = tx.send(Err(e)).await;
                        return;
                    }
                };
                // The initial state of a `Current` watch is values only, as the embedded store's.
                let skip = !current && from == WatchFrom::Current && change.op == Op::Delete;
                if !skip && tx.send(Ok(WatchEvent::Change(change))).await.is_err() {
                    return;
                }
                if !current && left == 0 {
                    current = true;
                    if tx.send(Ok(WatchEvent::Current)).await.is_err() {
                        return;
                    }
                }
            }
        });
        Ok(watcher)
    }
}
