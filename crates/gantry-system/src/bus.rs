//! The bus component: the log the store backend implies (the embedded segment log in the data
//! directory's `bus/`, or JetStream streams on the NATS store's connection), the spec's topics
//! and subscriptions applied at start (and on reload), pushes through the gateway.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Duration;

use gantry_bus::{Bus, Mode, Start, Subscription};
use gantry_spec::Spec;
use gantry_store::StreamOptions;
use tokio::sync::watch;

use crate::Component;

/// The spec's topics as log streams.
pub(crate) fn topics_of(spec: &Spec) -> Vec<(String, StreamOptions)> {
    let d = StreamOptions::default();
    spec.bus
        .topics
        .iter()
        .map(|(name, t)| {
            (
                name.clone(),
                StreamOptions {
                    // Validated at load.
                    max_age: t
                        .max_age
                        .as_deref()
                        .and_then(|a| humantime::parse_duration(a).ok()),
                    max_bytes: t.max_bytes,
                    max_messages: t.max_messages,
                    max_record_bytes: t.max_message_bytes,
                    dedup_window: humantime::parse_duration(&t.dedup_window)
                        .unwrap_or(d.dedup_window),
                },
            )
        })
        .collect()
}

/// The spec's subscriptions: each named after its service.
pub(crate) fn subscriptions_of(spec: &Spec) -> Vec<Subscription> {
    spec.services
        .iter()
        .flat_map(|(service, s)| {
            s.subscribe.iter().map(move |sub| Subscription {
                topic: sub.topic.clone(),
                name: service.clone(),
                mode: Mode::Push {
                    service: service.clone(),
                    path: sub.path.clone(),
                    timeout_ms: sub.timeout_ms,
                },
                max_attempts: sub.max_attempts,
                backoff_initial_ms: sub.backoff_initial_ms,
                backoff_max_ms: sub.backoff_max_ms,
                max_in_flight: sub.max_in_flight,
                ordered: sub.ordered,
                start: if sub.start == "earliest" {
                    Start::Earliest
                } else {
                    Start::New
                },
                from_spec: true,
            })
        })
        .collect()
}

pub(crate) struct BusComponent {
    pub bus: Arc<Bus>,
    topics: Vec<(String, StreamOptions)>,
    subs: Vec<Subscription>,
    ready: AtomicBool,
}

impl BusComponent {
    pub fn new(bus: Arc<Bus>, spec: &Spec) -> Self {
        Self {
            bus,
            topics: topics_of(spec),
            subs: subscriptions_of(spec),
            ready: AtomicBool::new(false),
        }
    }
}

#[async_trait::async_trait]
impl Component for BusComponent {
    fn name(&self) -> &'static str {
        "bus"
    }

    async fn start(&self, _shutdown: watch::Receiver<bool>) -> anyhow::Result<()> {
        self.bus.apply_spec(&self.topics, &self.subs).await?;
        self.bus.start().await?;
        self.ready.store(true, Ordering::Relaxed);
        tracing::info!(
            backend = self.bus.backend(),
            topics = self.topics.len(),
            subscriptions = self.subs.len(),
            "bus ready"
        );
        Ok(())
    }

    fn ready(&self) -> bool {
        self.ready.load(Ordering::Relaxed)
    }

    async fn stopped(&self) {
        // Positions saved; what was in flight goes out again after the next start.
        let _ = tokio::time::timeout(Duration::from_secs(10), self.bus.stop()).await;
        self.ready.store(false, Ordering::Relaxed);
    }
}
