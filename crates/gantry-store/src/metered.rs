//! Metrics for any [`Store`]: operations by kind and outcome, and their latency, so that a slow
//! fsync or a NATS server far away shows on `/metrics` as what it is.

use std::sync::Arc;
use std::time::Instant;

use async_trait::async_trait;
use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::histogram::{exponential_buckets, Histogram};
use prometheus_client::registry::Registry;

use crate::{BucketOptions, Change, Entry, Store, StoreError, WatchFrom, Watcher};

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct OpLabels {
    backend: &'static str,
    op: &'static str,
    /// ok, conflict (a condition did not hold), invalid (a bad name), error.
    outcome: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct LatencyLabels {
    backend: &'static str,
    op: &'static str,
}

/// A [`Store`] that counts and times what passes through it.
pub struct MeteredStore {
    inner: Arc<dyn Store>,
    ops: Family<OpLabels, Counter>,
    seconds: Family<LatencyLabels, Histogram>,
}

impl MeteredStore {
    /// Register `store_operations_total` and `store_operation_seconds` in `registry`.
    pub fn new(inner: Arc<dyn Store>, registry: &mut Registry) -> Self {
        let ops = Family::<OpLabels, Counter>::default();
        let seconds = Family::<LatencyLabels, Histogram>::new_with_constructor(|| {
            // 50 µs .. ~1.6 s
            Histogram::new(exponential_buckets(0.000_05, 2.0, 16))
        });
        registry.register(
            "operations",
            "Store operations by backend, kind and outcome (ok, conflict, invalid, error)",
            ops.clone(),
        );
        registry.register(
            "operation_seconds",
            "Store operation latency by backend and kind (writes include their fsync or JetStream acknowledgement)",
            seconds.clone(),
        );
        Self {
            inner,
            ops,
            seconds,
        }
    }

    fn record<T>(&self, op: &'static str, started: Instant, r: &Result<T, StoreError>) {
        let backend = self.inner.backend();
        let outcome = match r {
            Ok(_) => "ok",
            Err(StoreError::AlreadyExists { .. } | StoreError::RevisionMismatch { .. }) => {
                "conflict"
            }
            Err(StoreError::InvalidName { .. } | StoreError::InvalidOptions { .. }) => "invalid",
            Err(_) => "error",
        };
        self.ops
            .get_or_create(&OpLabels {
                backend,
                op,
                outcome,
            })
            .inc();
        self.seconds
            .get_or_create(&LatencyLabels { backend, op })
            .observe(started.elapsed().as_secs_f64());
    }
}

macro_rules! timed {
    ($self:ident, $op:literal, $call:expr) => {{
        let started = Instant::now();
        let r = $call.await;
        $self.record($op, started, &r);
        r
    }};
}

#[async_trait]
impl Store for MeteredStore {
    fn backend(&self) -> &'static str {
        self.inner.backend()
    }
    async fn ensure_bucket(&self, bucket: &str, options: BucketOptions) -> Result<(), StoreError> {
        timed!(
            self,
            "ensure_bucket",
            self.inner.ensure_bucket(bucket, options)
        )
    }
    async fn get(&self, bucket: &str, key: &str) -> Result<Option<Entry>, StoreError> {
        timed!(self, "get", self.inner.get(bucket, key))
    }
    async fn put(&self, bucket: &str, key: &str, value: Vec<u8>) -> Result<u64, StoreError> {
        timed!(self, "put", self.inner.put(bucket, key, value))
    }
    async fn create(&self, bucket: &str, key: &str, value: Vec<u8>) -> Result<u64, StoreError> {
        timed!(self, "create", self.inner.create(bucket, key, value))
    }
    async fn update(
        &self,
        bucket: &str,
        key: &str,
        value: Vec<u8>,
        expected: u64,
    ) -> Result<u64, StoreError> {
        timed!(
            self,
            "update",
            self.inner.update(bucket, key, value, expected)
        )
    }
    async fn delete(&self, bucket: &str, key: &str) -> Result<bool, StoreError> {
        timed!(self, "delete", self.inner.delete(bucket, key))
    }
    async fn delete_if(&self, bucket: &str, key: &str, expected: u64) -> Result<(), StoreError> {
        timed!(
            self,
            "delete_if",
            self.inner.delete_if(bucket, key, expected)
        )
    }
    async fn list(&self, bucket: &str, filter: &str) -> Result<Vec<(String, Entry)>, StoreError> {
        timed!(self, "list", self.inner.list(bucket, filter))
    }
    async fn keys(&self, bucket: &str, filter: &str) -> Result<Vec<String>, StoreError> {
        timed!(self, "keys", self.inner.keys(bucket, filter))
    }
    async fn history(&self, bucket: &str, key: &str) -> Result<Vec<Change>, StoreError> {
        timed!(self, "history", self.inner.history(bucket, key))
    }
    async fn watch(
        &self,
        bucket: &str,
        filter: &str,
        from: WatchFrom,
    ) -> Result<Watcher, StoreError> {
        timed!(self, "watch", self.inner.watch(bucket, filter, from))
    }
}
