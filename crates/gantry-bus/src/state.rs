//! One subscription's delivery state, with time passed in (no I/O): which message goes out
//! next, what is in flight, what waits for its backoff, which ordering keys are busy, and the
//! acknowledgements (a [`ConsumerPosition`]). Push delivery and the pull API both drive it.
//!
//! Rules: at most `max_in_flight` messages out at once; with `ordered`, a message whose
//! ordering key has an earlier message not yet acknowledged (in flight, waiting for a retry)
//! waits behind it, so a key's messages are processed one at a time and in order; a failed
//! attempt waits `backoff(attempt)` (exponential, capped, with jitter) and goes out again,
//! ahead of newer messages; the `max_attempts`-th failure makes it a dead letter.

use std::collections::{BTreeMap, BTreeSet, HashMap, VecDeque};
use std::sync::Arc;
use std::time::{Duration, Instant};

use gantry_store::ConsumerPosition;

use crate::message::Message;

/// How a subscription delivers.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Policy {
    pub max_attempts: u32,
    pub backoff_initial: Duration,
    pub backoff_max: Duration,
    pub max_in_flight: usize,
    /// Messages with the same ordering key one at a time, in order.
    pub ordered: bool,
}

impl Default for Policy {
    fn default() -> Self {
        Self {
            max_attempts: 5,
            backoff_initial: Duration::from_millis(500),
            backoff_max: Duration::from_secs(60),
            max_in_flight: 64,
            ordered: true,
        }
    }
}

impl Policy {
    /// The wait after the `attempt`-th failure: initial × 2^(attempt-1), capped, scaled by
    /// `jitter` (a factor in 0.5..=1.0: "equal jitter", so waits spread but never collapse).
    pub fn backoff(&self, attempt: u32, jitter: f64) -> Duration {
        let exp = attempt.saturating_sub(1).min(30);
        let base = self
            .backoff_initial
            .saturating_mul(1u32 << exp)
            .min(self.backoff_max);
        base.mul_f64(jitter.clamp(0.5, 1.0))
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Phase {
    Ready,
    InFlight { deadline: Option<Instant> },
    Backoff { until: Instant },
}

#[derive(Debug)]
struct Entry {
    msg: Arc<Message>,
    time_ms: u64,
    attempts: u32,
    phase: Phase,
    last_error: Option<String>,
}

/// One message handed out.
#[derive(Debug, Clone)]
pub struct Delivery {
    pub seq: u64,
    pub msg: Arc<Message>,
    /// 1 for the first attempt.
    pub attempt: u32,
    /// When it was appended (unix ms): delivery latency.
    pub time_ms: u64,
}

/// What a failed attempt leads to.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Failed {
    /// Out again at this time.
    Retry(Instant),
    /// Attempts are used up: to the dead-letter topic with this reason, then `ack`.
    DeadLetter { attempts: u32, reason: String },
    /// Not in flight (acknowledged already, or a stale lease).
    Unknown,
}

#[derive(Debug)]
pub struct SubState {
    pub policy: Policy,
    position: ConsumerPosition,
    /// Read from the log and not acknowledged.
    entries: BTreeMap<u64, Entry>,
    ready: BTreeSet<u64>,
    retries: BTreeSet<(Instant, u64)>,
    leases: BTreeSet<(Instant, u64)>,
    in_flight: usize,
    /// The seq holding each busy key, and the messages waiting behind it.
    keys: HashMap<Arc<str>, (u64, VecDeque<u64>)>,
    /// The next seq to read from the log.
    next_read: u64,
    dirty: bool,
}

impl SubState {
    pub fn new(policy: Policy, position: ConsumerPosition) -> Self {
        let next_read = position.ack_floor + 1;
        Self {
            policy,
            position,
            entries: BTreeMap::new(),
            ready: BTreeSet::new(),
            retries: BTreeSet::new(),
            leases: BTreeSet::new(),
            in_flight: 0,
            keys: HashMap::new(),
            next_read,
            dirty: false,
        }
    }

    pub fn next_read(&self) -> u64 {
        self.next_read
    }

    /// Messages read and not acknowledged.
    pub fn buffered(&self) -> usize {
        self.entries.len()
    }

    pub fn in_flight(&self) -> usize {
        self.in_flight
    }

    pub fn position(&self) -> &ConsumerPosition {
        &self.position
    }

    /// Whether the position changed since the last `take_dirty`.
    pub fn take_dirty(&mut self) -> bool {
        std::mem::take(&mut self.dirty)
    }

    /// The log's oldest record is `first`: what is older is gone (retention).
    pub fn skip_to(&mut self, first: u64) {
        if first > self.next_read {
            self.next_read = first;
        }
        if first > self.position.ack_floor + 1 {
            self.position.skip_to(first);
            self.dirty = true;
        }
    }

    /// A record read from the log (in seq order, from `next_read` on).
    pub fn offer(&mut self, seq: u64, time_ms: u64, msg: Arc<Message>) {
        if seq < self.next_read {
            return;
        }
        self.next_read = seq + 1;
        if self.position.is_acked(seq) {
            return;
        }
        let key = if self.policy.ordered {
            msg.key().map(Arc::<str>::from)
        } else {
            None
        };
        self.entries.insert(
            seq,
            Entry {
                msg,
                time_ms,
                attempts: 0,
                phase: Phase::Ready,
                last_error: None,
            },
        );
        match key {
            Some(k) => match self.keys.get_mut(&k) {
                Some((_, waiting)) => waiting.push_back(seq),
                None => {
                    self.keys.insert(k, (seq, VecDeque::new()));
                    self.ready.insert(seq);
                }
            },
            None => {
                self.ready.insert(seq);
            }
        }
    }

    /// The next message to send now (`lease`: the pull API's ack deadline), if any may go.
    pub fn take(&mut self, now: Instant, lease: Option<Duration>) -> Option<Delivery> {
        self.promote(now);
        if self.in_flight >= self.policy.max_in_flight {
            return None;
        }
        let (seq, e) = loop {
            let seq = self.ready.pop_first()?;
            if let Some(e) = self.entries.get_mut(&seq) {
                break (seq, e);
            }
        };
        e.attempts += 1;
        let deadline = lease.map(|l| now + l);
        e.phase = Phase::InFlight { deadline };
        if let Some(d) = deadline {
            self.leases.insert((d, seq));
        }
        self.in_flight += 1;
        Some(Delivery {
            seq,
            msg: e.msg.clone(),
            attempt: e.attempts,
            time_ms: e.time_ms,
        })
    }

    /// Retries whose time came are ready again (ahead of newer messages: the ready set is
    /// ordered by seq).
    fn promote(&mut self, now: Instant) {
        while let Some(&(at, seq)) = self.retries.first() {
            if at > now {
                break;
            }
            self.retries.pop_first();
            if let Some(e) = self.entries.get_mut(&seq) {
                e.phase = Phase::Ready;
                self.ready.insert(seq);
            }
        }
    }

    /// When the next retry or lease comes due.
    pub fn next_due(&self) -> Option<Instant> {
        let r = self.retries.first().map(|(t, _)| *t);
        let l = self.leases.first().map(|(t, _)| *t);
        match (r, l) {
            (Some(a), Some(b)) => Some(a.min(b)),
            (a, b) => a.or(b),
        }
    }

    /// The message was processed: it is acknowledged, and the next one of its key may go.
    /// Returns when it was appended (unix ms), or `None` if it was not held.
    pub fn ack(&mut self, seq: u64) -> Option<u64> {
        let e = self.entries.remove(&seq)?;
        self.ready.remove(&seq);
        match e.phase {
            Phase::InFlight { deadline } => {
                self.in_flight -= 1;
                if let Some(d) = deadline {
                    self.leases.remove(&(d, seq));
                }
            }
            Phase::Backoff { until } => {
                self.retries.remove(&(until, seq));
            }
            Phase::Ready => {}
        }
        self.position.ack(seq);
        self.dirty = true;
        if self.policy.ordered {
            if let Some(k) = e.msg.key() {
                self.release(k, seq);
            }
        }
        Some(e.time_ms)
    }

    fn release(&mut self, key: &str, seq: u64) {
        let Some((holder, waiting)) = self.keys.get_mut(key) else {
            return;
        };
        if *holder != seq {
            // Acknowledged while it waited behind the holder: it leaves the queue.
            waiting.retain(|&w| w != seq);
            return;
        }
        // The next waiting message still held (one acknowledged meanwhile is skipped).
        while let Some(next) = waiting.pop_front() {
            if self.entries.contains_key(&next) {
                *holder = next;
                self.ready.insert(next);
                return;
            }
        }
        self.keys.remove(key);
    }

    /// A record this subscription does not take (redriven for another one): acknowledged
    /// without being held.
    pub fn pass(&mut self, seq: u64) {
        if seq < self.next_read {
            return;
        }
        self.next_read = seq + 1;
        self.position.ack(seq);
        self.dirty = true;
    }

    /// The attempt failed (`reason`: what the subscriber answered, a timeout, ...).
    pub fn fail(&mut self, seq: u64, now: Instant, reason: &str, jitter: f64) -> Failed {
        let Some(e) = self.entries.get_mut(&seq) else {
            return Failed::Unknown;
        };
        let Phase::InFlight { deadline } = e.phase else {
            return Failed::Unknown;
        };
        self.in_flight -= 1;
        if let Some(d) = deadline {
            self.leases.remove(&(d, seq));
        }
        e.last_error = Some(reason.to_string());
        if e.attempts >= self.policy.max_attempts {
            // Held (not ready, not in flight) until the dead letter is stored and `ack`ed.
            e.phase = Phase::Backoff {
                until: now + Duration::from_secs(3600),
            };
            return Failed::DeadLetter {
                attempts: e.attempts,
                reason: reason.to_string(),
            };
        }
        let until = now + self.policy.backoff(e.attempts, jitter);
        e.phase = Phase::Backoff { until };
        self.retries.insert((until, seq));
        Failed::Retry(until)
    }

    /// The attempt could not be made (no instance of the service is routable): not counted;
    /// the message goes out again at `at`, its key still held.
    pub fn requeue(&mut self, seq: u64, at: Instant) -> bool {
        let Some(e) = self.entries.get_mut(&seq) else {
            return false;
        };
        let Phase::InFlight { deadline } = e.phase else {
            return false;
        };
        self.in_flight -= 1;
        if let Some(d) = deadline {
            self.leases.remove(&(d, seq));
        }
        e.attempts = e.attempts.saturating_sub(1);
        e.phase = Phase::Backoff { until: at };
        self.retries.insert((at, seq));
        true
    }

    /// Storing a dead letter failed: try it again at `at` (the entry goes out once more and
    /// fails into the dead letter path again if it fails).
    pub fn dead_letter_later(&mut self, seq: u64, at: Instant) {
        if let Some(e) = self.entries.get_mut(&seq) {
            e.phase = Phase::Backoff { until: at };
            self.retries.insert((at, seq));
        }
    }

    /// Leases (pull) whose ack deadline passed: each is a failed attempt.
    pub fn expired(&mut self, now: Instant) -> Vec<u64> {
        let mut out = Vec::new();
        while let Some(&(d, seq)) = self.leases.first() {
            if d > now {
                break;
            }
            out.push(seq);
            self.leases.pop_first();
            if let Some(e) = self.entries.get_mut(&seq) {
                e.phase = Phase::InFlight { deadline: None };
            }
        }
        out
    }

    /// Extend a lease (pull: still working on it).
    pub fn extend(&mut self, seq: u64, now: Instant, lease: Duration) -> bool {
        let Some(e) = self.entries.get_mut(&seq) else {
            return false;
        };
        let Phase::InFlight { deadline: Some(d) } = e.phase else {
            return false;
        };
        self.leases.remove(&(d, seq));
        let nd = now + lease;
        self.leases.insert((nd, seq));
        e.phase = Phase::InFlight { deadline: Some(nd) };
        true
    }

    /// The message held under `seq`.
    pub fn message(&self, seq: u64) -> Option<Arc<Message>> {
        self.entries.get(&seq).map(|e| e.msg.clone())
    }

    pub fn is_in_flight(&self, seq: u64) -> bool {
        self.entries
            .get(&seq)
            .is_some_and(|e| matches!(e.phase, Phase::InFlight { .. }))
    }

    /// Saving the position failed: it is saved again at the next chance.
    pub fn mark_dirty(&mut self) {
        self.dirty = true;
    }

    /// The last error of a message still held.
    pub fn last_error(&self, seq: u64) -> Option<&str> {
        self.entries.get(&seq)?.last_error.as_deref()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use bytes::Bytes;

    fn msg(key: Option<&str>) -> Arc<Message> {
        let mut m = Message::plain("t", Bytes::from_static(b"x"), None);
        if let Some(k) = key {
            m.extensions.insert("partitionkey".into(), k.into());
        }
        Arc::new(m)
    }

    fn policy() -> Policy {
        Policy {
            max_attempts: 3,
            backoff_initial: Duration::from_millis(100),
            backoff_max: Duration::from_millis(250),
            max_in_flight: 2,
            ordered: true,
        }
    }

    #[test]
    fn backoff_doubles_caps_and_jitters() {
        let p = policy();
        assert_eq!(p.backoff(1, 1.0), Duration::from_millis(100));
        assert_eq!(p.backoff(2, 1.0), Duration::from_millis(200));
        assert_eq!(p.backoff(3, 1.0), Duration::from_millis(250));
        assert_eq!(p.backoff(40, 1.0), Duration::from_millis(250));
        assert_eq!(p.backoff(2, 0.5), Duration::from_millis(100));
        assert_eq!(
            p.backoff(2, 0.0),
            Duration::from_millis(100),
            "jitter floor"
        );
    }

    #[test]
    fn flow_control_and_acks() {
        let now = Instant::now();
        let mut s = SubState::new(policy(), ConsumerPosition::default());
        for seq in 1..=3 {
            s.offer(seq, 0, msg(None));
        }
        let a = s.take(now, None).unwrap();
        let b = s.take(now, None).unwrap();
        assert_eq!((a.seq, b.seq), (1, 2));
        assert!(s.take(now, None).is_none(), "max in flight");
        assert!(s.ack(2).is_some());
        assert_eq!(s.position().ack_floor, 0);
        assert_eq!(s.take(now, None).unwrap().seq, 3);
        s.ack(1);
        s.ack(3);
        assert_eq!(s.position().ack_floor, 3);
        assert!(s.take_dirty());
        assert_eq!(s.buffered(), 0);
    }

    #[test]
    fn a_key_waits_for_its_earlier_message() {
        let now = Instant::now();
        let mut p = policy();
        p.max_in_flight = 10;
        let mut s = SubState::new(p, ConsumerPosition::default());
        s.offer(1, 0, msg(Some("a")));
        s.offer(2, 0, msg(Some("a")));
        s.offer(3, 0, msg(Some("b")));
        let out: Vec<u64> = std::iter::from_fn(|| s.take(now, None).map(|d| d.seq)).collect();
        assert_eq!(out, vec![1, 3], "2 waits behind 1");
        // 1 fails: it retries before 2 goes.
        assert!(matches!(s.fail(1, now, "500", 1.0), Failed::Retry(_)));
        assert!(s.take(now, None).is_none());
        let later = now + Duration::from_millis(150);
        assert_eq!(s.take(later, None).unwrap().seq, 1);
        s.ack(1);
        assert_eq!(s.take(later, None).unwrap().seq, 2);
    }

    #[test]
    fn a_message_acknowledged_while_it_waits_does_not_block_its_key() {
        let now = Instant::now();
        let mut s = SubState::new(policy(), ConsumerPosition::default());
        for seq in 1..=3 {
            s.offer(seq, 0, msg(Some("k")));
        }
        assert_eq!(s.take(now, None).unwrap().seq, 1);
        // 2 is acknowledged while 1 holds the key (a late pull ack, say).
        assert!(s.ack(2).is_some());
        s.ack(1);
        assert_eq!(s.take(now, None).unwrap().seq, 3, "3 goes; 2 is skipped");
        s.ack(3);
        assert_eq!(s.position().ack_floor, 3);
        // Records passed over are acknowledged without being held.
        s.pass(4);
        assert_eq!((s.position().ack_floor, s.next_read()), (4, 5));
    }

    #[test]
    fn attempts_run_out_into_a_dead_letter() {
        let mut now = Instant::now();
        let mut s = SubState::new(policy(), ConsumerPosition::default());
        s.offer(1, 0, msg(Some("k")));
        s.offer(2, 0, msg(Some("k")));
        for attempt in 1..=3 {
            let d = s.take(now, None).unwrap();
            assert_eq!((d.seq, d.attempt), (1, attempt));
            match s.fail(1, now, "HTTP 500", 1.0) {
                Failed::Retry(at) => now = at,
                Failed::DeadLetter { attempts, reason } => {
                    assert_eq!((attempts, reason.as_str()), (3, "HTTP 500"));
                }
                Failed::Unknown => panic!("in flight"),
            }
        }
        assert!(s.take(now, None).is_none(), "held until stored");
        s.ack(1);
        assert_eq!(s.take(now, None).unwrap().seq, 2, "the key moves on");
    }

    #[test]
    fn leases_expire_and_positions_resume() {
        let now = Instant::now();
        let mut s = SubState::new(policy(), ConsumerPosition::default());
        s.offer(1, 0, msg(None));
        s.take(now, Some(Duration::from_secs(1))).unwrap();
        assert!(s.expired(now).is_empty());
        assert!(s.extend(1, now, Duration::from_secs(2)));
        let late = now + Duration::from_millis(2500);
        assert_eq!(s.expired(late), vec![1]);
        assert!(matches!(
            s.fail(1, late, "ack deadline", 1.0),
            Failed::Retry(_)
        ));
        // A position with acks above the floor: those are not offered again.
        let mut pos = ConsumerPosition::default();
        pos.ack(2);
        let mut s = SubState::new(policy(), pos);
        assert_eq!(s.next_read(), 1);
        for seq in 1..=3 {
            s.offer(seq, 0, msg(None));
        }
        let out: Vec<u64> = std::iter::from_fn(|| s.take(now, None).map(|d| d.seq)).collect();
        assert_eq!(out, vec![1, 3]);
        s.skip_to(10);
        assert_eq!(s.next_read(), 10);
    }
}
