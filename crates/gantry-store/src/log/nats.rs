//! The log on NATS JetStream: one stream per log stream.
//!
//! Stream `s` is the JetStream stream `{namespace}_log_{s}` on the subject `{namespace}.log.{s}`
//! (file storage, the store's replica count), with the options as JetStream limits (discarding
//! the oldest) and the dedup window as its duplicate window: a record's id is its `Nats-Msg-Id`,
//! so JetStream itself answers a duplicate with the first one's sequence. An append publishes the
//! whole batch before it awaits the acknowledgements (one round trip per batch, not per record).
//! Reads are ordered push consumers from a sequence or a time; a reader that continues where it
//! stopped gets the same consumer back (kept per stream and position), so following a stream
//! costs no consumer per read. Consumer positions are KV entries (`logpos` bucket,
//! `{stream}.{consumer}`) of the [`NatsStore`] the log shares its connection with.

use std::collections::HashMap;
use std::sync::Arc;
use std::time::Duration;

use async_nats::jetstream::{
    self,
    consumer::{push, DeliverPolicy, ReplayPolicy},
    stream::{self, DiscardPolicy, StorageType},
};
use async_trait::async_trait;
use bytes::Bytes;
use futures_util::StreamExt;
use tokio::sync::Mutex;

use super::{
    check_log_name, Append, Appended, ConsumerPosition, Log, ReadFrom, Record, StreamInfo,
    StreamOptions,
};
use crate::nats_store::nats_err;
use crate::{NatsStore, Store, StoreError, StoreJsonExt};

const POSITIONS: &str = "logpos";
/// Readers kept per stream (continuing readers reuse them; the oldest is dropped beyond this).
const CURSORS_PER_STREAM: usize = 16;

/// [`Log`] on NATS JetStream streams.
pub struct NatsLog {
    store: Arc<NatsStore>,
    js: jetstream::Context,
    cursors: Mutex<HashMap<String, Vec<Cursor>>>,
    /// Each stream's `max_record_bytes` (read on every append: a lock readers share).
    limits: std::sync::RwLock<HashMap<String, u32>>,
}

/// An ordered consumer positioned at `next`.
struct Cursor {
    next: u64,
    messages: push::Ordered,
    /// Messages the server had yet to deliver after the last one (or when it was made).
    pending: u64,
}

impl NatsLog {
    /// A log on the same NATS connection, namespace and replica count as `store`.
    pub fn new(store: Arc<NatsStore>) -> Self {
        let js = store.context().clone();
        Self {
            store,
            js,
            cursors: Mutex::new(HashMap::new()),
            limits: std::sync::RwLock::new(HashMap::new()),
        }
    }

    fn stream_name(&self, s: &str) -> String {
        format!("{}_log_{s}", self.store.options().namespace)
    }

    fn subject(&self, s: &str) -> String {
        format!("{}.log.{s}", self.store.options().namespace)
    }

    fn config(&self, s: &str, o: &StreamOptions) -> stream::Config {
        stream::Config {
            name: self.stream_name(s),
            subjects: vec![self.subject(s)],
            max_age: o.max_age.unwrap_or_default(),
            max_bytes: o.max_bytes.map_or(-1, |b| b as i64),
            max_messages: o.max_messages.map_or(-1, |m| m as i64),
            max_message_size: o.max_record_bytes as i32 + 1024,
            duplicate_window: o.dedup_window,
            storage: StorageType::File,
            num_replicas: self.store.options().replicas.max(1),
            discard: DiscardPolicy::Old,
            allow_direct: true,
            ..Default::default()
        }
    }

    async fn stream(&self, s: &str) -> Result<Option<stream::Stream>, StoreError> {
        check_log_name("stream", s)?;
        match self.js.get_stream(self.stream_name(s)).await {
            Ok(st) => Ok(Some(st)),
            Err(e) if e.to_string().contains("not found") => Ok(None),
            Err(e) => Err(nats_err("open stream", e)),
        }
    }

    async fn max_record_bytes(&self, s: &str) -> Result<u32, StoreError> {
        if let Some(&m) = self
            .limits
            .read()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .get(s)
        {
            return Ok(m);
        }
        let Some(st) = self.stream(s).await? else {
            return Err(StoreError::NotFound(format!("stream {s}")));
        };
        let m = (st.cached_info().config.max_message_size - 1024).max(1) as u32;
        self.limits
            .write()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .insert(s.to_string(), m);
        Ok(m)
    }

    async fn cursor(&self, s: &str, from: ReadFrom) -> Result<Cursor, StoreError> {
        if let ReadFrom::Seq(seq) = from {
            let mut all = self.cursors.lock().await;
            if let Some(list) = all.get_mut(s) {
                if let Some(i) = list.iter().position(|c| c.next == seq) {
                    return Ok(list.swap_remove(i));
                }
            }
        }
        let Some(st) = self.stream(s).await? else {
            return Err(StoreError::NotFound(format!("stream {s}")));
        };
        let (deliver_policy, next) = match from {
            ReadFrom::Seq(seq) => (
                DeliverPolicy::ByStartSequence {
                    start_sequence: seq.max(1),
                },
                seq.max(1),
            ),
            ReadFrom::Time(ms) => (
                DeliverPolicy::ByStartTime {
                    start_time: time::OffsetDateTime::from_unix_timestamp_nanos(
                        i128::from(ms) * 1_000_000,
                    )
                    .map_err(|e| StoreError::Backend(format!("time {ms}: {e}")))?,
                },
                0,
            ),
        };
        let consumer = st
            .create_consumer(push::OrderedConfig {
                deliver_subject: self.js.client().new_inbox(),
                description: Some("gantry log".into()),
                replay_policy: ReplayPolicy::Instant,
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
        Ok(Cursor {
            next,
            messages,
            pending,
        })
    }

    async fn put_back(&self, s: &str, c: Cursor) {
        let mut all = self.cursors.lock().await;
        let list = all.entry(s.to_string()).or_default();
        if list.len() >= CURSORS_PER_STREAM {
            list.remove(0);
        }
        list.push(c);
    }

    fn position_key(stream: &str, consumer: &str) -> Result<String, StoreError> {
        check_log_name("stream", stream)?;
        check_log_name("consumer", consumer)?;
        Ok(format!("{stream}.{consumer}"))
    }
}

fn record(m: &jetstream::Message) -> Result<(Record, u64), StoreError> {
    let info = m.info().map_err(|e| nats_err("message metadata", e))?;
    let id = m
        .headers
        .as_ref()
        .and_then(|h| h.get("Nats-Msg-Id"))
        .map(|v| v.as_str().to_string());
    let time_ms = (info.published.unix_timestamp_nanos() / 1_000_000).max(0) as u64;
    Ok((
        Record {
            seq: info.stream_sequence,
            time_ms,
            id,
            data: m.payload.to_vec(),
        },
        info.pending,
    ))
}

#[async_trait]
impl Log for NatsLog {
    fn backend(&self) -> &'static str {
        "nats"
    }

    async fn ensure_stream(&self, stream: &str, options: StreamOptions) -> Result<(), StoreError> {
        check_log_name("stream", stream)?;
        options.check(stream)?;
        self.js
            .create_or_update_stream(self.config(stream, &options))
            .await
            .map_err(|e| nats_err("configure stream", e))?;
        self.limits
            .write()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .insert(stream.to_string(), options.max_record_bytes);
        Ok(())
    }

    async fn delete_stream(&self, stream: &str) -> Result<bool, StoreError> {
        check_log_name("stream", stream)?;
        self.cursors.lock().await.remove(stream);
        self.limits
            .write()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .remove(stream);
        let existed = match self.js.delete_stream(self.stream_name(stream)).await {
            Ok(_) => true,
            Err(e) if e.to_string().contains("not found") => false,
            Err(e) => return Err(nats_err("delete stream", e)),
        };
        for key in self.store.keys(POSITIONS, &format!("{stream}.*")).await? {
            self.store.delete(POSITIONS, &key).await?;
        }
        Ok(existed)
    }

    async fn streams(&self) -> Result<Vec<String>, StoreError> {
        let prefix = format!("{}_log_", self.store.options().namespace);
        let mut names = self.js.stream_names();
        let mut out = Vec::new();
        while let Some(n) = names.next().await {
            let n = n.map_err(|e| nats_err("list streams", e))?;
            if let Some(s) = n.strip_prefix(&prefix) {
                out.push(s.to_string());
            }
        }
        out.sort();
        Ok(out)
    }

    async fn info(&self, stream: &str) -> Result<Option<StreamInfo>, StoreError> {
        let Some(mut st) = self.stream(stream).await? else {
            return Ok(None);
        };
        let i = st.info().await.map_err(|e| nats_err("stream info", e))?;
        let s = &i.state;
        Ok(Some(StreamInfo {
            first_seq: if s.messages == 0 {
                s.last_sequence + 1
            } else {
                s.first_sequence
            },
            last_seq: s.last_sequence,
            messages: s.messages,
            bytes: s.bytes,
        }))
    }

    async fn append(&self, stream: &str, batch: Vec<Append>) -> Result<Vec<Appended>, StoreError> {
        let max = self.max_record_bytes(stream).await?;
        super::check_batch(stream, &batch, max)?;
        let subject = self.subject(stream);
        let mut acks = Vec::with_capacity(batch.len());
        for r in batch {
            let mut headers = async_nats::HeaderMap::new();
            if let Some(id) = &r.id {
                headers.insert("Nats-Msg-Id", id.as_str());
            }
            let ack = self
                .js
                .publish_with_headers(subject.clone(), headers, Bytes::from(r.data))
                .await
                .map_err(|e| nats_err("publish", e))?;
            acks.push(ack);
        }
        let mut out = Vec::with_capacity(acks.len());
        for ack in acks {
            let a = ack.await.map_err(|e| nats_err("publish", e))?;
            out.push(Appended {
                seq: a.sequence,
                duplicate: a.duplicate,
            });
        }
        Ok(out)
    }

    async fn read(
        &self,
        stream: &str,
        from: ReadFrom,
        max: usize,
        wait: Duration,
    ) -> Result<Vec<Record>, StoreError> {
        if max == 0 {
            return Ok(Vec::new());
        }
        let mut c = self.cursor(stream, from).await?;
        let mut out: Vec<Record> = Vec::new();
        // Records the server has yet to send are on their way: wait for them; at the tail,
        // wait up to `wait` for the next one.
        let first_wait = if c.pending > 0 {
            wait.max(Duration::from_secs(5))
        } else {
            wait
        };
        let mut deadline = tokio::time::Instant::now() + first_wait;
        let mut broken = false;
        while out.len() < max {
            match tokio::time::timeout_at(deadline, c.messages.next()).await {
                Err(_) => break,
                Ok(None) => {
                    broken = true;
                    break;
                }
                Ok(Some(Err(e))) => {
                    // An ordered consumer recreates itself on gaps; an error here is the
                    // connection's: the records so far stand, the cursor does not.
                    if out.is_empty() {
                        return Err(nats_err("read", e));
                    }
                    broken = true;
                    break;
                }
                Ok(Some(Ok(m))) => {
                    let (r, pending) = record(&m)?;
                    c.next = r.seq + 1;
                    c.pending = pending;
                    out.push(r);
                    if pending == 0 {
                        break;
                    }
                    // The rest are already on their way.
                    deadline = tokio::time::Instant::now() + Duration::from_secs(5);
                }
            }
        }
        if !broken && c.next > 0 {
            self.put_back(stream, c).await;
        }
        Ok(out)
    }

    async fn position(
        &self,
        stream: &str,
        consumer: &str,
    ) -> Result<Option<ConsumerPosition>, StoreError> {
        let key = Self::position_key(stream, consumer)?;
        Ok(self
            .store
            .get_json::<ConsumerPosition>(POSITIONS, &key)
            .await?
            .map(|(p, _)| p))
    }

    async fn save_position(
        &self,
        stream: &str,
        consumer: &str,
        position: &ConsumerPosition,
    ) -> Result<(), StoreError> {
        let key = Self::position_key(stream, consumer)?;
        self.store.put_json(POSITIONS, &key, position).await?;
        Ok(())
    }

    async fn delete_position(&self, stream: &str, consumer: &str) -> Result<bool, StoreError> {
        let key = Self::position_key(stream, consumer)?;
        self.store.delete(POSITIONS, &key).await
    }
}
