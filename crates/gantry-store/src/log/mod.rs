//! Append-only logs (the message bus's storage), behind one trait with two backends.
//!
//! A log holds named streams of records numbered 1, 2, 3, ... (`seq`), each with the time it
//! was appended and an optional publisher id. A stream keeps its records within its retention
//! (age, bytes, count) and drops duplicates by id within its dedup window. Readers read from a
//! position or follow the tail; consumers keep a durable position: an ack floor (every record at
//! or below it is acknowledged) and the acknowledged records above it.
//!
//! - [`SegmentLog`], embedded: per stream a directory of segment files, appended by one writer
//!   thread that writes everything waiting and fsyncs each file it touched once (group commit):
//!   an append returns once its records are on disk.
//! - [`NatsLog`]: one JetStream stream per log stream (async-nats); publisher ids are
//!   `Nats-Msg-Id`, so JetStream's own duplicate window drops duplicates; consumer positions are
//!   KV entries of the [`NatsStore`](crate::NatsStore) it is given.
//!
//! Both pass the same behaviour suite (`tests/log_behaviour.rs`).

mod nats;
mod segment;

use std::time::Duration;

use async_trait::async_trait;
use serde::{Deserialize, Serialize};

use crate::StoreError;

pub use nats::NatsLog;
pub use segment::SegmentLog;

/// One record to append.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Append {
    /// The publisher's id: a second append with the same id within the stream's dedup window
    /// is not stored again (its outcome names the first one's `seq`).
    pub id: Option<String>,
    pub data: Vec<u8>,
}

/// What happened to one appended record.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Appended {
    pub seq: u64,
    /// The id was seen within the dedup window: nothing was stored; `seq` is the first one's.
    pub duplicate: bool,
}

/// A stored record.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Record {
    pub seq: u64,
    /// When it was appended (unix milliseconds).
    pub time_ms: u64,
    pub id: Option<String>,
    pub data: Vec<u8>,
}

/// A stream's retention and limits; both backends honour them.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct StreamOptions {
    /// Records older than this are dropped.
    #[serde(default, with = "crate::opt_millis")]
    pub max_age: Option<Duration>,
    /// The oldest records are dropped while the stream holds more bytes than this.
    #[serde(default)]
    pub max_bytes: Option<u64>,
    /// The oldest records are dropped while the stream holds more records than this.
    #[serde(default)]
    pub max_messages: Option<u64>,
    /// The largest record accepted (bytes of data).
    pub max_record_bytes: u32,
    /// How long a publisher id is remembered.
    #[serde(with = "millis")]
    pub dedup_window: Duration,
}

impl Default for StreamOptions {
    fn default() -> Self {
        Self {
            max_age: None,
            max_bytes: None,
            max_messages: None,
            max_record_bytes: 1024 * 1024,
            dedup_window: Duration::from_secs(120),
        }
    }
}

impl StreamOptions {
    /// The largest `max_record_bytes` allowed (NATS's own default payload limit is 1 MiB; the
    /// embedded log allows up to 8 MiB).
    pub const MAX_RECORD_BYTES: u32 = 8 * 1024 * 1024;

    pub(crate) fn check(&self, stream: &str) -> Result<(), StoreError> {
        let bad = |why: String| {
            Err(StoreError::InvalidOptions {
                bucket: stream.into(),
                why,
            })
        };
        if self.max_record_bytes == 0 || self.max_record_bytes > Self::MAX_RECORD_BYTES {
            return bad(format!(
                "max_record_bytes must be 1..={}, got {}",
                Self::MAX_RECORD_BYTES,
                self.max_record_bytes
            ));
        }
        if self.max_age.is_some_and(|d| d < Duration::from_millis(100)) {
            return bad("max_age must be at least 100ms".into());
        }
        if self.max_bytes.is_some_and(|b| b < 1024) {
            return bad("max_bytes must be at least 1024".into());
        }
        if self.max_messages == Some(0) {
            return bad("max_messages must be at least 1".into());
        }
        if self.dedup_window < Duration::from_millis(100)
            || self.dedup_window > Duration::from_secs(24 * 3600)
        {
            return bad("dedup_window must be 100ms..=24h".into());
        }
        Ok(())
    }
}

mod millis {
    use serde::{Deserialize, Deserializer, Serializer};
    use std::time::Duration;

    pub fn serialize<S: Serializer>(d: &Duration, s: S) -> Result<S::Ok, S::Error> {
        s.serialize_u64(d.as_millis() as u64)
    }

    pub fn deserialize<'de, D: Deserializer<'de>>(d: D) -> Result<Duration, D::Error> {
        Ok(Duration::from_millis(u64::deserialize(d)?))
    }
}

/// A stream's extent.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize)]
pub struct StreamInfo {
    /// The oldest retained record (`last_seq + 1` when the stream is empty).
    pub first_seq: u64,
    /// The newest record (0 before the first append).
    pub last_seq: u64,
    /// Records retained.
    pub messages: u64,
    /// Bytes retained (as the backend counts them).
    pub bytes: u64,
}

/// A consumer's durable position.
#[derive(Debug, Clone, PartialEq, Eq, Default, Serialize, Deserialize)]
pub struct ConsumerPosition {
    /// Every record at or below this is acknowledged (0: none yet).
    pub ack_floor: u64,
    /// Acknowledged records above the floor, ascending.
    #[serde(default)]
    pub acked: Vec<u64>,
}

impl ConsumerPosition {
    /// Acknowledge `seq`: the floor moves up over every acknowledged record right above it.
    pub fn ack(&mut self, seq: u64) {
        if seq <= self.ack_floor {
            return;
        }
        if let Err(i) = self.acked.binary_search(&seq) {
            self.acked.insert(i, seq);
        }
        self.walk();
    }

    fn walk(&mut self) {
        let mut n = 0;
        while n < self.acked.len() && self.acked[n] == self.ack_floor + 1 {
            self.ack_floor += 1;
            n += 1;
        }
        self.acked.drain(..n);
    }

    pub fn is_acked(&self, seq: u64) -> bool {
        seq <= self.ack_floor || self.acked.binary_search(&seq).is_ok()
    }

    /// Records before `first` are gone (retention): nothing below it is pending any more.
    pub fn skip_to(&mut self, first: u64) {
        if first > self.ack_floor + 1 {
            self.ack_floor = first - 1;
            self.acked.retain(|&s| s >= first);
            self.walk();
        }
    }
}

/// Where a read starts.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ReadFrom {
    /// The first record at or after this seq (the oldest retained one if it is gone).
    Seq(u64),
    /// The first record appended at or after this time (unix milliseconds).
    Time(u64),
}

/// Append-only streams of records with durable consumer positions.
#[async_trait]
pub trait Log: Send + Sync + 'static {
    /// Which implementation this is ("embedded" or "nats").
    fn backend(&self) -> &'static str;
    /// Create a stream, or change the options of an existing one.
    async fn ensure_stream(&self, stream: &str, options: StreamOptions) -> Result<(), StoreError>;
    /// Remove a stream, its records and its consumers' positions; whether it existed.
    async fn delete_stream(&self, stream: &str) -> Result<bool, StoreError>;
    /// The streams there are, by name.
    async fn streams(&self) -> Result<Vec<String>, StoreError>;
    /// A stream's extent; `None` if there is no such stream.
    async fn info(&self, stream: &str) -> Result<Option<StreamInfo>, StoreError>;
    /// Append records in order. Returns once every stored record is durable (the outcome of
    /// each, in order). A record over the stream's `max_record_bytes` fails the whole batch
    /// before anything is stored.
    async fn append(&self, stream: &str, batch: Vec<Append>) -> Result<Vec<Appended>, StoreError>;
    /// Up to `max` records from `from`, in order. At the tail it waits up to `wait` for the
    /// first one to arrive (zero: it does not wait) and returns none if none came.
    async fn read(
        &self,
        stream: &str,
        from: ReadFrom,
        max: usize,
        wait: Duration,
    ) -> Result<Vec<Record>, StoreError>;
    /// A consumer's saved position (`None` if it never saved one).
    async fn position(
        &self,
        stream: &str,
        consumer: &str,
    ) -> Result<Option<ConsumerPosition>, StoreError>;
    /// Save a consumer's position durably.
    async fn save_position(
        &self,
        stream: &str,
        consumer: &str,
        position: &ConsumerPosition,
    ) -> Result<(), StoreError>;
    /// Forget a consumer's position; whether it had one.
    async fn delete_position(&self, stream: &str, consumer: &str) -> Result<bool, StoreError>;
}

/// Stream and consumer names: 1-128 characters of `a-z`, `0-9`, `-`, `_`, starting with a
/// letter or digit (they become directory names and JetStream stream names).
pub fn check_log_name(what: &'static str, name: &str) -> Result<(), StoreError> {
    let ok = !name.is_empty()
        && name.len() <= 128
        && name.as_bytes()[0].is_ascii_alphanumeric()
        && name
            .bytes()
            .all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || c == b'-' || c == b'_');
    if ok {
        Ok(())
    } else {
        Err(StoreError::InvalidName {
            what,
            name: name.into(),
            why:
                "expected 1-128 characters of a-z, 0-9, '-' and '_', starting with a letter or digit",
        })
    }
}

/// A batch both backends refuse whole before storing any of it: a record over the stream's
/// `max_record_bytes`, or an id that is empty or over 1024 bytes.
pub(crate) fn check_batch(stream: &str, batch: &[Append], max: u32) -> Result<(), StoreError> {
    for (i, r) in batch.iter().enumerate() {
        if r.data.len() > max as usize {
            return Err(StoreError::TooLarge(format!(
                "record {i} of the batch has {} bytes; stream {stream} takes at most {max}",
                r.data.len()
            )));
        }
        if r.id
            .as_ref()
            .is_some_and(|id| id.is_empty() || id.len() > 1024)
        {
            return Err(StoreError::TooLarge(format!(
                "record {i} of the batch: an id must be 1-1024 bytes"
            )));
        }
    }
    Ok(())
}

pub(crate) fn now_ms() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_millis() as u64)
        .unwrap_or(0)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ack_floor_walks_over_contiguous_acks() {
        let mut p = ConsumerPosition::default();
        p.ack(2);
        p.ack(4);
        assert_eq!((p.ack_floor, p.acked.clone()), (0, vec![2, 4]));
        p.ack(1);
        assert_eq!((p.ack_floor, p.acked.clone()), (2, vec![4]));
        p.ack(3);
        assert_eq!((p.ack_floor, p.acked.clone()), (4, vec![]));
        p.ack(3);
        assert_eq!(p.ack_floor, 4);
        assert!(p.is_acked(1) && p.is_acked(4) && !p.is_acked(5));
        p.ack(7);
        p.skip_to(6);
        assert_eq!((p.ack_floor, p.acked.clone()), (5, vec![7]));
        p.ack(6);
        assert_eq!((p.ack_floor, p.acked.clone()), (7, vec![]));
    }

    #[test]
    fn names_are_checked() {
        assert!(check_log_name("stream", "orders").is_ok());
        assert!(check_log_name("stream", "orders-dlq_2").is_ok());
        for bad in ["", "Orders", "a.b", "-x", &"a".repeat(129), "a b"] {
            assert!(check_log_name("stream", bad).is_err(), "{bad:?}");
        }
    }
}
