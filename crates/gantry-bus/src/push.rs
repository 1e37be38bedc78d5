//! A running subscription: a reader that keeps its state fed from the log, a dispatcher that
//! pushes (push mode) or fetchers that take (pull mode), and a keeper that saves its position,
//! expires pull leases and updates its lag.

use std::sync::{Arc, Mutex, PoisonError, Weak};
use std::time::{Duration, Instant};

use gantry_gateway::{CallOptions, Caller};
use gantry_store::{ConsumerPosition, ReadFrom};
use http::{HeaderName, HeaderValue};
use http_body_util::BodyExt;
use tokio::sync::{mpsc, watch, Notify};
use tokio::task::JoinHandle;

use crate::message::Message;
use crate::state::{Delivery, Failed, SubState};
use crate::{
    Bus, Fetched, Mode, SubLabel, Subscription, READ_AHEAD, REDRIVE_EXTENSION, SAVE_EVERY,
};

pub(crate) struct Running {
    pub sub: Subscription,
    bus: Weak<Bus>,
    state: Arc<Mutex<SubState>>,
    /// The dispatcher: records arrived, a key or a slot was freed.
    wake: Arc<Notify>,
    /// The reader: room in the read-ahead.
    room: Arc<Notify>,
    /// Fetchers waiting for messages.
    arrived: Arc<Notify>,
    stop: watch::Sender<bool>,
    tasks: Mutex<Vec<JoinHandle<()>>>,
    label: SubLabel,
}

/// A random factor in 0.5..=1.0 for backoff jitter.
fn jitter() -> f64 {
    let mut b = [0u8; 4];
    let _ = getrandom::fill(&mut b);
    0.5 + f64::from(u32::from_le_bytes(b)) / f64::from(u32::MAX) / 2.0
}

fn now_ms() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_millis() as u64)
        .unwrap_or(0)
}

/// What a delivery task reports to the dispatcher.
enum Outcome {
    Done(Delivery, Result<(), Fail>),
}

/// Why a push did not succeed.
enum Fail {
    /// A failed attempt (what the subscriber answered, a timeout, a refused connection).
    Attempt(String),
    /// Never sent: the service has no routable instance, its breaker is open or it is at its
    /// concurrency limit. Not the message's fault and not an attempt: it waits (as long as
    /// the service is down) and goes out again after this.
    NotSent(Duration),
}

/// How long a message waits when its service has no routable instance.
const NO_INSTANCE_WAIT: Duration = Duration::from_millis(250);

impl Running {
    pub fn start(bus: Arc<Bus>, sub: Subscription, position: ConsumerPosition) -> Arc<Self> {
        let (stop, _) = watch::channel(false);
        let r = Arc::new(Self {
            label: SubLabel {
                topic: sub.topic.clone(),
                subscription: sub.name.clone(),
            },
            state: Arc::new(Mutex::new(SubState::new(sub.policy(), position))),
            sub,
            bus: Arc::downgrade(&bus),
            wake: Arc::new(Notify::new()),
            room: Arc::new(Notify::new()),
            arrived: Arc::new(Notify::new()),
            stop,
            tasks: Mutex::new(Vec::new()),
        });
        // Each task's receiver is made here, before `stop` can be sent: a stop right after
        // the start is seen.
        let mut tasks = vec![
            tokio::spawn(r.clone().reader(bus.clone(), r.stop.subscribe())),
            tokio::spawn(r.clone().keeper(bus.clone(), r.stop.subscribe())),
        ];
        if matches!(r.sub.mode, Mode::Push { .. }) {
            tasks.push(tokio::spawn(r.clone().dispatcher(bus, r.stop.subscribe())));
        }
        *r.tasks.lock().unwrap_or_else(PoisonError::into_inner) = tasks;
        tracing::info!(topic = %r.sub.topic, subscription = %r.sub.name, "bus: subscription running");
        r
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, SubState> {
        self.state.lock().unwrap_or_else(PoisonError::into_inner)
    }

    /// (ack floor, acknowledged above it, in flight)
    pub fn figures(&self) -> (u64, u64, usize) {
        let st = self.lock();
        (
            st.position().ack_floor,
            st.position().acked.len() as u64,
            st.in_flight(),
        )
    }

    /// Stop the tasks and save the position.
    pub async fn stop(&self) {
        self.stop.send_replace(true);
        let tasks: Vec<JoinHandle<()>> =
            std::mem::take(&mut *self.tasks.lock().unwrap_or_else(PoisonError::into_inner));
        for t in tasks {
            let _ = t.await;
        }
        if let Some(bus) = self.bus.upgrade() {
            let p = self.lock().position().clone();
            if let Err(e) = bus
                .log
                .save_position(&self.sub.topic, &self.sub.name, &p)
                .await
            {
                tracing::warn!(topic = %self.sub.topic, subscription = %self.sub.name, error = %e,
                    "bus: saving the position at stop failed; unsaved acknowledgements will be delivered again");
            }
        }
    }

    async fn reader(self: Arc<Self>, bus: Arc<Bus>, mut stop: watch::Receiver<bool>) {
        loop {
            if *stop.borrow() {
                return;
            }
            let room_wait = self.room.notified();
            tokio::pin!(room_wait);
            room_wait.as_mut().enable();
            let (next, room) = {
                let st = self.lock();
                (st.next_read(), READ_AHEAD.saturating_sub(st.buffered()))
            };
            if room == 0 {
                tokio::select! {
                    _ = room_wait => {}
                    _ = stop.changed() => return,
                }
                continue;
            }
            let read = bus.log.read(
                &self.sub.topic,
                ReadFrom::Seq(next),
                room.min(512),
                Duration::from_secs(1),
            );
            let recs = tokio::select! {
                r = read => r,
                _ = stop.changed() => return,
            };
            match recs {
                Ok(recs) if recs.is_empty() => {}
                Ok(recs) => {
                    let mut st = self.lock();
                    if recs[0].seq > next {
                        st.skip_to(recs[0].seq);
                    }
                    for r in recs {
                        match Message::decode(&r.data) {
                            Some(m)
                                if m.extensions
                                    .get(REDRIVE_EXTENSION)
                                    .is_some_and(|n| *n != self.sub.name) =>
                            {
                                // Redriven for another subscription.
                                st.pass(r.seq);
                            }
                            Some(m) => st.offer(r.seq, r.time_ms, Arc::new(m)),
                            None => {
                                tracing::warn!(topic = %self.sub.topic, seq = r.seq,
                                    "bus: skipping a record that is not a message");
                                st.pass(r.seq);
                            }
                        }
                    }
                    drop(st);
                    self.wake.notify_one();
                    self.arrived.notify_waiters();
                }
                Err(e) => {
                    tracing::warn!(topic = %self.sub.topic, subscription = %self.sub.name, error = %e,
                        "bus: reading the topic failed; trying again in a second");
                    tokio::select! {
                        _ = tokio::time::sleep(Duration::from_secs(1)) => {}
                        _ = stop.changed() => return,
                    }
                }
            }
        }
    }

    async fn keeper(self: Arc<Self>, bus: Arc<Bus>, mut stop: watch::Receiver<bool>) {
        let mut tick = tokio::time::interval(SAVE_EVERY);
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        let mut n: u64 = 0;
        loop {
            tokio::select! {
                _ = tick.tick() => {}
                _ = stop.changed() => return,
            }
            n += 1;
            let (dirty, pos, expired) = {
                let mut st = self.lock();
                let expired = st.expired(Instant::now());
                (st.take_dirty(), st.position().clone(), expired)
            };
            if !expired.is_empty() {
                for seq in expired {
                    self.failed(&bus, seq, "ack deadline passed");
                }
                self.arrived.notify_waiters();
            }
            if dirty {
                if let Err(e) = bus
                    .log
                    .save_position(&self.sub.topic, &self.sub.name, &pos)
                    .await
                {
                    tracing::warn!(topic = %self.sub.topic, subscription = %self.sub.name, error = %e,
                        "bus: saving the position failed; trying again");
                    self.lock().mark_dirty();
                }
            }
            if n % 5 == 1 {
                if let Ok(Some(i)) = bus.log.info(&self.sub.topic).await {
                    let lag = i
                        .last_seq
                        .saturating_sub(pos.ack_floor)
                        .saturating_sub(pos.acked.len() as u64);
                    bus.metrics.lag.get_or_create(&self.label).set(lag as i64);
                }
            }
        }
    }

    /// A failed attempt: retried, or stored as a dead letter and then acknowledged.
    fn failed(self: &Arc<Self>, bus: &Arc<Bus>, seq: u64, reason: &str) {
        let (outcome, msg) = {
            let mut st = self.lock();
            let msg = st.message(seq);
            (st.fail(seq, Instant::now(), reason, jitter()), msg)
        };
        match outcome {
            Failed::Retry(_) => {
                bus.metrics.retried.get_or_create(&self.label).inc();
                self.wake.notify_one();
            }
            Failed::DeadLetter { attempts, reason } => {
                let Some(msg) = msg else { return };
                let (me, bus) = (self.clone(), bus.clone());
                tokio::spawn(async move {
                    let r = bus
                        .dead_letter(&me.sub, seq, &msg, attempts, &reason)
                        .await
                        .map_err(|e| e.to_string());
                    me.dead_lettered(&bus, seq, r);
                });
            }
            Failed::Unknown => {}
        }
    }

    fn dead_lettered(&self, bus: &Bus, seq: u64, r: Result<(), String>) {
        match r {
            Ok(()) => {
                tracing::warn!(topic = %self.sub.topic, subscription = %self.sub.name, seq,
                    reason = self.lock().last_error(seq).unwrap_or(""),
                    "bus: message moved to the dead-letter topic");
                self.lock().ack(seq);
                bus.metrics.dead_lettered.get_or_create(&self.label).inc();
            }
            Err(e) => {
                tracing::warn!(topic = %self.sub.topic, subscription = %self.sub.name, seq, error = %e,
                    "bus: storing a dead letter failed; trying again");
                self.lock()
                    .dead_letter_later(seq, Instant::now() + Duration::from_secs(1));
            }
        }
        self.room.notify_one();
        self.wake.notify_one();
        self.arrived.notify_waiters();
    }

    fn acked(&self, bus: &Bus, d_time_ms: u64) {
        bus.metrics.acknowledged.get_or_create(&self.label).inc();
        let secs = now_ms().saturating_sub(d_time_ms) as f64 / 1000.0;
        bus.metrics.latency.get_or_create(&self.label).observe(secs);
    }

    async fn dispatcher(self: Arc<Self>, bus: Arc<Bus>, mut stop: watch::Receiver<bool>) {
        let (tx, mut rx) = mpsc::unbounded_channel::<Outcome>();
        loop {
            let sends: Vec<Delivery> = {
                let mut st = self.lock();
                let now = Instant::now();
                std::iter::from_fn(|| st.take(now, None)).collect()
            };
            for d in sends {
                bus.metrics.delivered.get_or_create(&self.label).inc();
                let (me, bus, tx) = (self.clone(), bus.clone(), tx.clone());
                tokio::spawn(async move {
                    let r = me.push(&bus, &d).await;
                    let _ = tx.send(Outcome::Done(d, r));
                });
            }
            let due = self.lock().next_due();
            let sleep = async {
                match due {
                    Some(t) => tokio::time::sleep_until(t.into()).await,
                    None => std::future::pending().await,
                }
            };
            tokio::select! {
                o = rx.recv() => {
                    let mut next = o;
                    while let Some(o) = next {
                        self.outcome(&bus, o);
                        next = rx.try_recv().ok();
                    }
                }
                _ = self.wake.notified() => {}
                _ = sleep => {}
                _ = stop.changed() => return,
            }
        }
    }

    fn outcome(self: &Arc<Self>, bus: &Arc<Bus>, o: Outcome) {
        match o {
            Outcome::Done(d, Ok(())) => {
                let acked = self.lock().ack(d.seq);
                if acked.is_some() {
                    self.acked(bus, d.time_ms);
                }
                self.room.notify_one();
            }
            Outcome::Done(d, Err(Fail::Attempt(reason))) => {
                tracing::debug!(topic = %self.sub.topic, subscription = %self.sub.name, seq = d.seq,
                    attempt = d.attempt, reason = %reason, "bus: delivery failed");
                self.failed(bus, d.seq, &reason);
            }
            Outcome::Done(d, Err(Fail::NotSent(wait))) => {
                self.lock().requeue(d.seq, Instant::now() + wait);
            }
        }
    }

    /// One push: the message in CloudEvents binary mode, through the gateway.
    async fn push(&self, bus: &Bus, d: &Delivery) -> Result<(), Fail> {
        let Mode::Push {
            service,
            path,
            timeout_ms,
        } = &self.sub.mode
        else {
            return Err(Fail::Attempt("not a push subscription".into()));
        };
        let mut req = http::Request::builder().method("POST").uri(path.as_str());
        for (k, v) in d.msg.binary_headers() {
            let Ok(name) = HeaderName::from_bytes(k.as_bytes()) else {
                continue;
            };
            let value = HeaderValue::from_str(&v).unwrap_or_else(|_| {
                HeaderValue::from_str(&percent_encode(&v))
                    .unwrap_or_else(|_| HeaderValue::from_static(""))
            });
            req = req.header(name, value);
        }
        req = req
            .header("gantry-topic", self.sub.topic.as_str())
            .header("gantry-subscription", self.sub.name.as_str())
            .header("gantry-seq", d.seq.to_string())
            .header("gantry-delivery-attempt", d.attempt.to_string());
        let req = req
            .body(d.msg.data.clone())
            .map_err(|e| Fail::Attempt(format!("building the request: {e}")))?;
        let caller = Caller {
            name: format!("bus:{}/{}", self.sub.topic, self.sub.name),
        };
        let timeout = Duration::from_millis(*timeout_ms);
        let mut opts = CallOptions {
            timeout,
            ..CallOptions::default()
        };
        // The bus retries with its own backoff; the gateway only moves a request that never
        // left to another instance.
        opts.retry.attempts = 1;
        opts.retry.on_statuses = Vec::new();
        opts.retry.on_per_try_timeout = false;
        opts.failure_statuses = vec![500];
        match bus
            .gateway
            .call_service(service, None, req, &caller, &opts)
            .await
        {
            Ok(resp) => {
                let status = resp.status();
                // Read the (small) answer so the connection goes back to the pool.
                let _ = tokio::time::timeout(timeout, resp.into_body().collect()).await;
                if status.is_success() {
                    Ok(())
                } else {
                    Err(Fail::Attempt(format!("HTTP {}", status.as_u16())))
                }
            }
            Err(e) => match e.failure {
                gantry_gateway::Failure::NoInstance | gantry_gateway::Failure::Bulkhead => {
                    Err(Fail::NotSent(NO_INSTANCE_WAIT))
                }
                gantry_gateway::Failure::CircuitOpen { retry_after_ms } => Err(Fail::NotSent(
                    Duration::from_millis(retry_after_ms.clamp(50, 30_000)),
                )),
                _ => Err(Fail::Attempt(e.to_string())),
            },
        }
    }

    /// Pull: up to `max` messages, waiting up to `wait` for the first.
    pub async fn fetch(self: &Arc<Self>, max: usize, wait: Duration) -> Vec<Fetched> {
        let Mode::Pull { ack_deadline_ms } = self.sub.mode else {
            return Vec::new();
        };
        let lease = Duration::from_millis(ack_deadline_ms);
        let deadline = Instant::now() + wait;
        loop {
            let arrived = self.arrived.notified();
            tokio::pin!(arrived);
            arrived.as_mut().enable();
            let (out, due) = {
                let mut st = self.lock();
                let now = Instant::now();
                let mut out = Vec::new();
                while out.len() < max {
                    match st.take(now, Some(lease)) {
                        Some(d) => out.push(d),
                        None => break,
                    }
                }
                (out, st.next_due())
            };
            let now = Instant::now();
            if !out.is_empty() || now >= deadline {
                if let Some(bus) = self.bus.upgrade() {
                    bus.metrics
                        .delivered
                        .get_or_create(&self.label)
                        .inc_by(out.len() as u64);
                }
                self.room.notify_one();
                return out
                    .into_iter()
                    .map(|d| Fetched {
                        seq: d.seq,
                        attempt: d.attempt,
                        event: d.msg.to_json(),
                    })
                    .collect();
            }
            let until = due.map_or(deadline, |d| d.min(deadline));
            tokio::select! {
                _ = arrived => {}
                _ = tokio::time::sleep_until(until.into()) => {}
            }
        }
    }

    pub fn ack(&self, seqs: &[u64]) -> usize {
        let Some(bus) = self.bus.upgrade() else {
            return 0;
        };
        let mut n = 0;
        for &s in seqs {
            let acked = self.lock().ack(s);
            if let Some(t) = acked {
                n += 1;
                self.acked(&bus, t);
            }
        }
        self.room.notify_one();
        self.arrived.notify_waiters();
        n
    }

    /// Pull: the subscriber is still working on these; each lease runs `lease` from now (the
    /// subscription's ack deadline when `None`). Returns how many were outstanding.
    pub fn extend(&self, seqs: &[u64], lease: Option<Duration>) -> usize {
        let Mode::Pull { ack_deadline_ms } = self.sub.mode else {
            return 0;
        };
        let lease = lease.unwrap_or(Duration::from_millis(ack_deadline_ms));
        let now = Instant::now();
        let mut st = self.lock();
        seqs.iter().filter(|&&s| st.extend(s, now, lease)).count()
    }

    pub fn nack(self: &Arc<Self>, seqs: &[u64], reason: &str) -> usize {
        let Some(bus) = self.bus.upgrade() else {
            return 0;
        };
        let mut n = 0;
        for &s in seqs {
            if self.lock().is_in_flight(s) {
                n += 1;
                self.failed(&bus, s, reason);
            }
        }
        self.arrived.notify_waiters();
        n
    }
}

fn percent_encode(v: &str) -> String {
    let mut out = String::with_capacity(v.len());
    for b in v.bytes() {
        if (0x21..0x7f).contains(&b) && b != b'%' || b == b' ' {
            out.push(b as char);
        } else {
            out.push_str(&format!("%{b:02X}"));
        }
    }
    out
}
