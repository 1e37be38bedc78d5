//! The message bus: durable topics whose messages are pushed to subscribing services through
//! the gateway's upstream call (or pulled), at least once, with retries, dead letters,
//! ordering keys, flow control and replay.
//!
//! - A **topic** is a stream of the store crate's [`Log`] (the embedded segment log, or
//!   JetStream when the store is NATS): retention by age, bytes or count, and a dedup window
//!   for publisher-given message ids. A publish returns once the log holds it durably.
//! - A **subscription** is a durable consumer of a topic: its position (ack floor and acks
//!   above it) is saved in the log every [`SAVE_EVERY`] and at shutdown, so after a crash the
//!   unacknowledged messages (and at most the last interval's acknowledged ones) go out again.
//!   Push subscriptions (`[[services.X.subscribe]]`) POST each message in CloudEvents binary
//!   mode to a healthy instance of their service through [`Gateway::call_service`]
//!   (balancing, breakers, mTLS and trace context included); a 2xx acknowledges, anything else
//!   or a timeout is a failed attempt. Pull subscriptions hand messages out on `fetch` with an
//!   ack deadline. Both run on [`state::SubState`].
//! - After `max_attempts` a message goes to the subscription's **dead-letter topic**
//!   (`{topic}_{subscription}_dlq`, made on demand) with the reason, and is acknowledged;
//!   `redrive` publishes the dead letters back into the topic for that subscription only.
//!
//! Subscriptions are state in the store (`bus` bucket, `subs.{topic}.{name}`): the spec's are
//! written at start and on reload (and removed when the spec drops them), the API's stay.

pub mod message;
pub mod state;

mod push;

use std::collections::HashMap;
use std::sync::{Arc, Mutex, PoisonError};
use std::time::Duration;

use bytes::Bytes;
use gantry_gateway::Gateway;
use gantry_store::{
    Append, Log, ReadFrom, Store, StoreError, StoreJsonExt, StreamInfo, StreamOptions,
};
use gantry_telemetry::Metrics;
use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::histogram::Histogram;
use serde::{Deserialize, Serialize};

pub use message::{Invalid, Message};
pub use state::Policy;

/// How often a subscription's position is saved (and at shutdown).
pub const SAVE_EVERY: Duration = Duration::from_millis(200);
/// Messages a subscription holds read ahead of its acknowledgements.
pub const READ_AHEAD: usize = 4096;
/// The store bucket of subscriptions.
pub const BUCKET: &str = "bus";
/// The extension that names the one subscription a redriven message is for.
pub const REDRIVE_EXTENSION: &str = "gantryredrive";

#[derive(Debug, thiserror::Error)]
pub enum BusError {
    #[error("{0}")]
    Invalid(String),
    #[error("no such {0}")]
    NotFound(String),
    #[error("{0} already exists")]
    Exists(String),
    #[error("{0}")]
    TooLarge(String),
    #[error(transparent)]
    Store(StoreError),
}

impl From<StoreError> for BusError {
    fn from(e: StoreError) -> Self {
        match e {
            StoreError::NotFound(w) => BusError::NotFound(w),
            StoreError::TooLarge(w) => BusError::TooLarge(w),
            StoreError::InvalidName { what, name, why } => {
                BusError::Invalid(format!("invalid {what} {name:?}: {why}"))
            }
            StoreError::InvalidOptions { bucket, why } => {
                BusError::Invalid(format!("topic {bucket}: {why}"))
            }
            e => BusError::Store(e),
        }
    }
}

/// Topic and subscription names: 1-48 characters of `a-z`, `0-9` and `-`, starting with a
/// letter (`_` separates the parts of dead-letter topic names).
pub fn check_name(what: &str, name: &str) -> Result<(), BusError> {
    let ok = !name.is_empty()
        && name.len() <= 48
        && name.as_bytes()[0].is_ascii_lowercase()
        && name
            .bytes()
            .all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || c == b'-');
    if ok {
        Ok(())
    } else {
        Err(BusError::Invalid(format!(
            "{what} {name:?}: expected 1-48 characters of a-z, 0-9 and '-', starting with a letter"
        )))
    }
}

/// The dead-letter topic of a subscription.
pub fn dead_letter_topic(topic: &str, subscription: &str) -> String {
    format!("{topic}_{subscription}_dlq")
}

/// Where a new subscription starts.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, Default, utoipa::ToSchema)]
#[serde(rename_all = "snake_case")]
pub enum Start {
    /// Every retained message.
    Earliest,
    /// Messages published after it was made.
    #[default]
    New,
}

/// How a subscription gets its messages.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, utoipa::ToSchema)]
#[serde(tag = "mode", rename_all = "snake_case")]
pub enum Mode {
    /// POSTed to `path` on an instance of `service`, through the gateway.
    Push {
        service: String,
        path: String,
        /// One attempt, until the response head.
        timeout_ms: u64,
    },
    /// Fetched by the subscriber, acknowledged within `ack_deadline_ms`.
    Pull { ack_deadline_ms: u64 },
}

/// A subscription as stored.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, utoipa::ToSchema)]
pub struct Subscription {
    pub topic: String,
    pub name: String,
    #[serde(flatten)]
    pub mode: Mode,
    pub max_attempts: u32,
    pub backoff_initial_ms: u64,
    pub backoff_max_ms: u64,
    pub max_in_flight: usize,
    pub ordered: bool,
    pub start: Start,
    /// Written by the spec (replaced and removed with it) rather than the API.
    #[serde(default)]
    pub from_spec: bool,
}

impl Subscription {
    pub fn policy(&self) -> Policy {
        Policy {
            max_attempts: self.max_attempts,
            backoff_initial: Duration::from_millis(self.backoff_initial_ms),
            backoff_max: Duration::from_millis(self.backoff_max_ms),
            max_in_flight: self.max_in_flight,
            ordered: self.ordered,
        }
    }

    pub fn check(&self) -> Result<(), BusError> {
        check_name("topic", &self.topic)?;
        check_name("subscription", &self.name)?;
        let bad = |w: &str| Err(BusError::Invalid(w.to_string()));
        if !(1..=100).contains(&self.max_attempts) {
            return bad("max_attempts must be 1..=100");
        }
        if self.backoff_initial_ms == 0 || self.backoff_initial_ms > self.backoff_max_ms {
            return bad("backoff_initial_ms must be at least 1 and at most backoff_max_ms");
        }
        if self.backoff_max_ms > 24 * 3600 * 1000 {
            return bad("backoff_max_ms must be at most a day");
        }
        if !(1..=10_000).contains(&self.max_in_flight) {
            return bad("max_in_flight must be 1..=10000");
        }
        match &self.mode {
            Mode::Push {
                service,
                path,
                timeout_ms,
            } => {
                if service.is_empty() {
                    return bad("push subscription without a service");
                }
                if !path.starts_with('/') || path.bytes().any(|c| c <= b' ' || c >= 0x7f) {
                    return bad(
                        "path must start with '/' and have no spaces or control characters",
                    );
                }
                if !(1..=600_000).contains(timeout_ms) {
                    return bad("timeout_ms must be 1..=600000");
                }
            }
            Mode::Pull { ack_deadline_ms } => {
                if !(100..=3_600_000).contains(ack_deadline_ms) {
                    return bad("ack_deadline_ms must be 100..=3600000");
                }
            }
        }
        Ok(())
    }
}

/// A topic as the API shows it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, utoipa::ToSchema)]
pub struct TopicView {
    pub name: String,
    pub first_seq: u64,
    pub last_seq: u64,
    pub messages: u64,
    pub bytes: u64,
}

/// One published message's outcome.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, utoipa::ToSchema)]
pub struct Published {
    pub id: String,
    pub seq: u64,
    /// Its id was seen within the topic's dedup window: not stored again.
    pub duplicate: bool,
}

/// A subscription's figures.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, utoipa::ToSchema)]
pub struct SubscriptionStatus {
    #[serde(flatten)]
    pub subscription: Subscription,
    pub ack_floor: u64,
    pub last_seq: u64,
    /// Messages published and not acknowledged.
    pub lag: u64,
    pub in_flight: usize,
    pub dead_letters: u64,
}

/// One message handed to a pull subscriber.
#[derive(Debug, Clone, Serialize, Deserialize, utoipa::ToSchema)]
pub struct Fetched {
    pub seq: u64,
    pub attempt: u32,
    /// The message as a structured CloudEvent.
    #[schema(value_type = Object)]
    pub event: serde_json::Value,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct TopicLabel {
    topic: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct SubLabel {
    topic: String,
    subscription: String,
}

/// The bus's metric families.
#[derive(Clone)]
pub(crate) struct BusMetrics {
    published: Family<TopicLabel, Counter>,
    duplicates: Family<TopicLabel, Counter>,
    delivered: Family<SubLabel, Counter>,
    acknowledged: Family<SubLabel, Counter>,
    retried: Family<SubLabel, Counter>,
    dead_lettered: Family<SubLabel, Counter>,
    lag: Family<SubLabel, Gauge>,
    latency: Family<SubLabel, Histogram>,
}

impl BusMetrics {
    fn new(metrics: &Metrics) -> Self {
        let m = Self {
            published: Family::default(),
            duplicates: Family::default(),
            delivered: Family::default(),
            acknowledged: Family::default(),
            retried: Family::default(),
            dead_lettered: Family::default(),
            lag: Family::default(),
            latency: Family::new_with_constructor(|| {
                Histogram::new([
                    0.0005, 0.001, 0.002, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 5.0, 30.0,
                ])
            }),
        };
        metrics.register("bus", |r| {
            r.register("published", "Messages stored by topic", m.published.clone());
            r.register(
                "duplicates",
                "Publishes dropped as duplicates by topic (id seen within the dedup window)",
                m.duplicates.clone(),
            );
            r.register(
                "delivered",
                "Delivery attempts by subscription (pushes sent, messages fetched)",
                m.delivered.clone(),
            );
            r.register(
                "acknowledged",
                "Messages acknowledged by subscription",
                m.acknowledged.clone(),
            );
            r.register(
                "retried",
                "Failed attempts that will be retried, by subscription",
                m.retried.clone(),
            );
            r.register(
                "dead_lettered",
                "Messages moved to the dead-letter topic, by subscription",
                m.dead_lettered.clone(),
            );
            r.register(
                "lag",
                "Messages published and not acknowledged, by subscription",
                m.lag.clone(),
            );
            r.register(
                "delivery_seconds",
                "From publish to acknowledgement, by subscription",
                m.latency.clone(),
            );
        });
        m
    }
}

/// The bus (see the crate documentation).
pub struct Bus {
    pub(crate) log: Arc<dyn Log>,
    store: Arc<dyn Store>,
    pub(crate) gateway: Arc<Gateway>,
    pub(crate) metrics: BusMetrics,
    subs: Mutex<HashMap<(String, String), Arc<push::Running>>>,
}

impl Bus {
    pub async fn open(
        log: Arc<dyn Log>,
        store: Arc<dyn Store>,
        gateway: Arc<Gateway>,
        metrics: &Metrics,
    ) -> Result<Arc<Self>, BusError> {
        store
            .ensure_bucket(BUCKET, gantry_store::BucketOptions::default())
            .await?;
        Ok(Arc::new(Self {
            log,
            store,
            gateway,
            metrics: BusMetrics::new(metrics),
            subs: Mutex::new(HashMap::new()),
        }))
    }

    pub fn backend(&self) -> &'static str {
        self.log.backend()
    }

    /// Start every stored subscription not running yet (at start, after `apply_spec`).
    pub async fn start(self: &Arc<Self>) -> Result<(), BusError> {
        for (_, sub, _) in self
            .store
            .list_json::<Subscription>(BUCKET, "subs.>")
            .await?
        {
            if self.running(&sub.topic, &sub.name).is_none() {
                self.run(sub).await?;
            }
        }
        Ok(())
    }

    /// Stop every subscription, saving its position.
    pub async fn stop(&self) {
        let all: Vec<Arc<push::Running>> = self
            .subs
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .drain()
            .map(|(_, r)| r)
            .collect();
        for r in all {
            r.stop().await;
        }
    }

    /// The spec's topics (created or updated) and subscriptions (written; the spec's
    /// subscriptions it no longer has are removed). Running subscriptions follow.
    pub async fn apply_spec(
        self: &Arc<Self>,
        topics: &[(String, StreamOptions)],
        subs: &[Subscription],
    ) -> Result<(), BusError> {
        for (name, o) in topics {
            self.create_topic(name, *o).await?;
        }
        let stored = self
            .store
            .list_json::<Subscription>(BUCKET, "subs.>")
            .await?;
        for (key, s, _) in stored {
            if s.from_spec && !subs.iter().any(|n| n.topic == s.topic && n.name == s.name) {
                self.store.delete(BUCKET, &key).await?;
                self.halt(&s.topic, &s.name).await;
            }
        }
        for s in subs {
            let mut s = s.clone();
            s.from_spec = true;
            self.put_subscription(&s).await?;
        }
        Ok(())
    }

    // -----------------------------------------------------------------------------------------
    // Topics

    pub async fn create_topic(&self, name: &str, options: StreamOptions) -> Result<(), BusError> {
        check_name("topic", name)?;
        self.log.ensure_stream(name, options).await?;
        Ok(())
    }

    pub async fn topic(&self, name: &str) -> Result<Option<TopicView>, BusError> {
        Ok(self.log.info(name).await?.map(|i| view(name, i)))
    }

    /// Every topic, dead-letter topics included.
    pub async fn topics(&self) -> Result<Vec<TopicView>, BusError> {
        let mut out = Vec::new();
        for name in self.log.streams().await? {
            if let Some(i) = self.log.info(&name).await? {
                out.push(view(&name, i));
            }
        }
        Ok(out)
    }

    /// Remove a topic and its subscriptions.
    pub async fn delete_topic(&self, name: &str) -> Result<bool, BusError> {
        let subs = self
            .store
            .list_json::<Subscription>(BUCKET, &format!("subs.{name}.*"))
            .await
            .unwrap_or_default();
        for (key, s, _) in subs {
            self.halt(&s.topic, &s.name).await;
            self.store.delete(BUCKET, &key).await?;
        }
        Ok(self.log.delete_stream(name).await?)
    }

    // -----------------------------------------------------------------------------------------
    // Publishing

    /// Store messages in a topic; returns once they are durable. Publisher-given ids within
    /// the topic's dedup window are not stored again.
    pub async fn publish(
        &self,
        topic: &str,
        messages: Vec<Message>,
    ) -> Result<Vec<Published>, BusError> {
        // The log refuses a stream it does not have (no lookup first: on NATS that would be a
        // round trip per publish).
        let batch: Vec<Append> = messages
            .iter()
            .map(|m| Append {
                id: (!m.generated_id).then(|| dedup_key(m)),
                data: m.encode(),
            })
            .collect();
        let out = self.log.append(topic, batch).await.map_err(|e| match e {
            StoreError::NotFound(_) => BusError::NotFound(format!("topic {topic}")),
            e => e.into(),
        })?;
        let label = TopicLabel {
            topic: topic.to_string(),
        };
        let dups = out.iter().filter(|a| a.duplicate).count() as u64;
        self.metrics
            .published
            .get_or_create(&label)
            .inc_by(out.len() as u64 - dups);
        if dups > 0 {
            self.metrics.duplicates.get_or_create(&label).inc_by(dups);
        }
        Ok(messages
            .into_iter()
            .zip(out)
            .map(|(m, a)| Published {
                id: m.id,
                seq: a.seq,
                duplicate: a.duplicate,
            })
            .collect())
    }

    /// Messages of a topic from a position (inspection, dead letters), without consuming.
    pub async fn peek(
        &self,
        topic: &str,
        from: ReadFrom,
        max: usize,
    ) -> Result<Vec<(u64, u64, Message)>, BusError> {
        let recs = self
            .log
            .read(topic, from, max.min(1000), Duration::ZERO)
            .await?;
        Ok(recs
            .into_iter()
            .filter_map(|r| Some((r.seq, r.time_ms, Message::decode(&r.data)?)))
            .collect())
    }

    // -----------------------------------------------------------------------------------------
    // Subscriptions

    fn sub_key(topic: &str, name: &str) -> String {
        format!("subs.{topic}.{name}")
    }

    pub async fn subscriptions(&self) -> Result<Vec<SubscriptionStatus>, BusError> {
        let mut out = Vec::new();
        for (_, s, _) in self
            .store
            .list_json::<Subscription>(BUCKET, "subs.>")
            .await?
        {
            out.push(self.status(s).await?);
        }
        Ok(out)
    }

    pub async fn subscription(
        &self,
        topic: &str,
        name: &str,
    ) -> Result<Option<SubscriptionStatus>, BusError> {
        check_name("topic", topic)?;
        check_name("subscription", name)?;
        match self
            .store
            .get_json::<Subscription>(BUCKET, &Self::sub_key(topic, name))
            .await?
        {
            Some((s, _)) => Ok(Some(self.status(s).await?)),
            None => Ok(None),
        }
    }

    async fn status(&self, s: Subscription) -> Result<SubscriptionStatus, BusError> {
        let last_seq = self.log.info(&s.topic).await?.map_or(0, |i| i.last_seq);
        let running = self.running(&s.topic, &s.name);
        let (ack_floor, acked_above, in_flight) = match &running {
            Some(r) => r.figures(),
            None => {
                let p = self
                    .log
                    .position(&s.topic, &s.name)
                    .await?
                    .unwrap_or_default();
                (p.ack_floor, p.acked.len() as u64, 0)
            }
        };
        let dead_letters = self
            .log
            .info(&dead_letter_topic(&s.topic, &s.name))
            .await?
            .map_or(0, |i| i.messages);
        Ok(SubscriptionStatus {
            ack_floor,
            last_seq,
            lag: last_seq
                .saturating_sub(ack_floor)
                .saturating_sub(acked_above),
            in_flight,
            dead_letters,
            subscription: s,
        })
    }

    /// Create or replace a subscription (a changed one restarts from its saved position).
    pub async fn put_subscription(self: &Arc<Self>, s: &Subscription) -> Result<(), BusError> {
        s.check()?;
        if self.log.info(&s.topic).await?.is_none() {
            return Err(BusError::NotFound(format!("topic {}", s.topic)));
        }
        let key = Self::sub_key(&s.topic, &s.name);
        let old = self.store.get_json::<Subscription>(BUCKET, &key).await?;
        if old.as_ref().is_some_and(|(o, _)| o == s) && self.running(&s.topic, &s.name).is_some() {
            return Ok(());
        }
        self.store.put_json(BUCKET, &key, s).await?;
        self.halt(&s.topic, &s.name).await;
        self.run(s.clone()).await
    }

    pub async fn delete_subscription(&self, topic: &str, name: &str) -> Result<bool, BusError> {
        check_name("topic", topic)?;
        check_name("subscription", name)?;
        self.halt(topic, name).await;
        let existed = self
            .store
            .delete(BUCKET, &Self::sub_key(topic, name))
            .await?;
        if self.log.info(topic).await?.is_some() {
            self.log.delete_position(topic, name).await?;
        }
        Ok(existed)
    }

    fn running(&self, topic: &str, name: &str) -> Option<Arc<push::Running>> {
        self.subs
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .get(&(topic.to_string(), name.to_string()))
            .cloned()
    }

    async fn halt(&self, topic: &str, name: &str) {
        let r = self
            .subs
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .remove(&(topic.to_string(), name.to_string()));
        if let Some(r) = r {
            r.stop().await;
        }
    }

    async fn run(self: &Arc<Self>, s: Subscription) -> Result<(), BusError> {
        let position = match self.log.position(&s.topic, &s.name).await? {
            // Never ahead of the log (one that lost its tail to damage): what is appended
            // next must not count as acknowledged.
            Some(mut p) => {
                if let Some(info) = self.log.info(&s.topic).await? {
                    if p.ack_floor > info.last_seq {
                        tracing::error!(topic = %s.topic, subscription = %s.name,
                            position = p.ack_floor, last = info.last_seq,
                            "bus: the saved position is past the topic's end; moved back to it");
                        p.ack_floor = info.last_seq;
                    }
                    p.acked.retain(|&q| q > p.ack_floor && q <= info.last_seq);
                }
                p
            }
            None => {
                // A new subscription: from the start, or from now on.
                let info = self
                    .log
                    .info(&s.topic)
                    .await?
                    .ok_or_else(|| BusError::NotFound(format!("topic {}", s.topic)))?;
                let mut p = gantry_store::ConsumerPosition::default();
                match s.start {
                    Start::Earliest => p.ack_floor = info.first_seq.saturating_sub(1),
                    Start::New => p.ack_floor = info.last_seq,
                }
                self.log.save_position(&s.topic, &s.name, &p).await?;
                p
            }
        };
        let r = push::Running::start(self.clone(), s.clone(), position);
        let before = self
            .subs
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .insert((s.topic, s.name), r);
        // One runner per subscription: one that raced this start stops.
        if let Some(old) = before {
            old.stop().await;
        }
        Ok(())
    }

    fn pull(&self, topic: &str, name: &str) -> Result<Arc<push::Running>, BusError> {
        let r = self
            .running(topic, name)
            .ok_or_else(|| BusError::NotFound(format!("subscription {topic}/{name}")))?;
        if !matches!(r.sub.mode, Mode::Pull { .. }) {
            return Err(BusError::Invalid(format!(
                "subscription {topic}/{name} is a push subscription; fetch needs a pull one"
            )));
        }
        Ok(r)
    }

    /// Up to `max` messages for a pull subscriber, waiting up to `wait` for the first.
    pub async fn fetch(
        &self,
        topic: &str,
        name: &str,
        max: usize,
        wait: Duration,
    ) -> Result<Vec<Fetched>, BusError> {
        let r = self.pull(topic, name)?;
        Ok(
            r.fetch(max.clamp(1, 1000), wait.min(Duration::from_secs(60)))
                .await,
        )
    }

    /// Acknowledge fetched messages; returns how many were outstanding.
    pub fn ack(&self, topic: &str, name: &str, seqs: &[u64]) -> Result<usize, BusError> {
        Ok(self.pull(topic, name)?.ack(seqs))
    }

    /// Extend the leases of fetched messages (still being worked on): each runs `lease` from
    /// now, the subscription's ack deadline when `None`; returns how many were outstanding.
    pub fn extend(
        &self,
        topic: &str,
        name: &str,
        seqs: &[u64],
        lease: Option<Duration>,
    ) -> Result<usize, BusError> {
        Ok(self.pull(topic, name)?.extend(seqs, lease))
    }

    /// Give fetched messages back (a failed attempt each: retried after backoff, or dead
    /// letters when attempts are used up).
    pub fn nack(&self, topic: &str, name: &str, seqs: &[u64]) -> Result<usize, BusError> {
        Ok(self
            .pull(topic, name)?
            .nack(seqs, "nacked by the subscriber"))
    }

    /// Move a subscription to a position: every message from `from` on is delivered again.
    pub async fn replay(
        self: &Arc<Self>,
        topic: &str,
        name: &str,
        from: ReadFrom,
    ) -> Result<u64, BusError> {
        let Some((s, _)) = self
            .store
            .get_json::<Subscription>(BUCKET, &Self::sub_key(topic, name))
            .await?
        else {
            return Err(BusError::NotFound(format!("subscription {topic}/{name}")));
        };
        let info = self
            .log
            .info(topic)
            .await?
            .ok_or_else(|| BusError::NotFound(format!("topic {topic}")))?;
        let seq = match from {
            ReadFrom::Seq(q) => q.clamp(info.first_seq, info.last_seq + 1),
            ReadFrom::Time(_) => self
                .log
                .read(topic, from, 1, Duration::ZERO)
                .await?
                .first()
                .map_or(info.last_seq + 1, |r| r.seq),
        };
        self.halt(topic, name).await;
        let p = gantry_store::ConsumerPosition {
            ack_floor: seq.saturating_sub(1),
            acked: Vec::new(),
        };
        self.log.save_position(topic, name, &p).await?;
        self.run(s).await?;
        Ok(seq)
    }

    /// Publish a subscription's dead letters back into its topic, for it alone; returns how
    /// many. The dead-letter topic is emptied of them (its `redrive` consumer moves on).
    pub async fn redrive(&self, topic: &str, name: &str) -> Result<usize, BusError> {
        check_name("topic", topic)?;
        check_name("subscription", name)?;
        let dlq = dead_letter_topic(topic, name);
        if self.log.info(&dlq).await?.is_none() {
            return Ok(0);
        }
        let mut pos = self
            .log
            .position(&dlq, "redrive")
            .await?
            .unwrap_or_default();
        let mut n = 0;
        loop {
            let recs = self
                .log
                .read(&dlq, ReadFrom::Seq(pos.ack_floor + 1), 256, Duration::ZERO)
                .await?;
            let Some(last) = recs.last().map(|r| r.seq) else {
                break;
            };
            let mut batch = Vec::with_capacity(recs.len());
            for r in &recs {
                let Some(mut m) = Message::decode(&r.data) else {
                    continue;
                };
                for k in ["gantryreason", "gantryattempts", "gantryseq", "gantrytopic"] {
                    m.extensions.remove(k);
                }
                m.extensions
                    .insert(REDRIVE_EXTENSION.into(), name.to_string());
                // A redriven message is a new one (its id must not be dropped as a duplicate).
                m.generated_id = true;
                batch.push(m);
            }
            n += batch.len();
            self.publish(topic, batch).await?;
            pos.ack_floor = last;
            self.log.save_position(&dlq, "redrive", &pos).await?;
        }
        Ok(n)
    }

    /// Store a dead letter: the message with why and after how many attempts.
    pub(crate) async fn dead_letter(
        &self,
        s: &Subscription,
        seq: u64,
        msg: &Message,
        attempts: u32,
        reason: &str,
    ) -> Result<(), BusError> {
        let dlq = dead_letter_topic(&s.topic, &s.name);
        if self.log.info(&dlq).await?.is_none() {
            // Whatever its topic allows, with the reason beside it.
            let o = StreamOptions {
                max_record_bytes: StreamOptions::MAX_RECORD_BYTES,
                ..StreamOptions::default()
            };
            self.log.ensure_stream(&dlq, o).await?;
        }
        let mut m = msg.clone();
        let mut reason = reason.to_string();
        if reason.len() > 1024 {
            let mut cut = 1024;
            while !reason.is_char_boundary(cut) {
                cut -= 1;
            }
            reason.truncate(cut);
        }
        m.extensions.insert("gantryreason".into(), reason);
        m.extensions
            .insert("gantryattempts".into(), attempts.to_string());
        m.extensions.insert("gantryseq".into(), seq.to_string());
        m.extensions.insert("gantrytopic".into(), s.topic.clone());
        m.extensions.remove(REDRIVE_EXTENSION);
        self.log
            .append(
                &dlq,
                vec![Append {
                    // The same message dead-lettered twice (a crash before the ack was saved)
                    // is stored once.
                    id: Some(format!("{}-{seq}", s.name)),
                    data: m.encode(),
                }],
            )
            .await?;
        Ok(())
    }
}

/// What a topic's dedup window compares: a CloudEvent is unique by source and id (two sources
/// may both use id "1"). Long ones are hashed to fit the log's id limit.
fn dedup_key(m: &Message) -> String {
    let k = format!("{}\u{1f}{}", m.source, m.id);
    if k.len() <= 256 {
        return k;
    }
    use std::hash::{Hash, Hasher};
    let mut a = std::collections::hash_map::DefaultHasher::new();
    let mut b = std::collections::hash_map::DefaultHasher::new();
    k.hash(&mut a);
    (k.len(), &k).hash(&mut b);
    format!("h:{:016x}{:016x}", a.finish(), b.finish())
}

fn view(name: &str, i: StreamInfo) -> TopicView {
    TopicView {
        name: name.to_string(),
        first_seq: i.first_seq,
        last_seq: i.last_seq,
        messages: i.messages,
        bytes: i.bytes,
    }
}

/// A plain message for in-process publishers (the example system, tests).
pub fn text_message(topic: &str, data: impl Into<Bytes>) -> Message {
    Message::plain(topic, data.into(), Some("text/plain".into()))
}
