//! Request statistics recorded per thread and summed when read: cumulative counts by status
//! class, a latency histogram and its sum (what Prometheus scrapes), and a rolling window of
//! the last minute in five-second slots (what canary analysis, autoscaling and alert rules
//! read: requests, errors, rate, latency quantiles).
//!
//! Why per thread: a request records into two or three of these (its route, its instance, its
//! version). Shared counters would cost an atomic read-modify-write each — at a thousand
//! connections each one waits for stores to drain, often to cold lines — and a shared histogram
//! a lock. Here each thread writes a shard of its own with plain loads and stores (it is the
//! only writer); readers add the shards up. A thread past the first `max_shards()` shares one
//! shard written with atomic adds (correct, slower). A reader may see a slot half reset by its
//! writer: windows are statistics, not ledgers.

use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::OnceLock;

/// Upper bounds of the latency buckets in microseconds (100 µs to 25 s; past the last: +Inf).
pub const BUCKETS_US: [u64; 17] = [
    100, 250, 500, 1_000, 2_500, 5_000, 10_000, 25_000, 50_000, 100_000, 250_000, 500_000,
    1_000_000, 2_500_000, 5_000_000, 10_000_000, 25_000_000,
];
const NB: usize = BUCKETS_US.len() + 1;
/// The rolling window: `SLOTS` slots of `SLOT_MS`.
pub const SLOT_MS: u64 = 5_000;
pub const SLOTS: usize = 12;
/// The window's length.
pub const WINDOW_MS: u64 = SLOT_MS * SLOTS as u64;
/// Threads with a shard of their own: twice the cores and a few more (the gateway's workers, the
/// control plane's); threads started later share one.
fn max_shards() -> usize {
    static N: OnceLock<usize> = OnceLock::new();
    *N.get_or_init(|| {
        let cores = std::thread::available_parallelism().map_or(2, |n| n.get());
        (cores * 2 + 4).min(128)
    })
}

/// What a request's outcome counts as.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Outcome {
    /// A response with this status.
    Status(u16),
    /// No response (the connection failed or timed out).
    NoResponse,
}

impl Outcome {
    /// The status class index: 0-4 for 1xx-5xx, 5 for no response.
    fn class(self) -> usize {
        match self {
            Outcome::Status(s) => (s / 100).clamp(1, 5) as usize - 1,
            Outcome::NoResponse => 5,
        }
    }

    /// An error for the window: a 5xx, or no response.
    fn is_error(self) -> bool {
        match self {
            Outcome::Status(s) => s >= 500,
            Outcome::NoResponse => true,
        }
    }
}

/// Names of the status classes, as `Outcome` indexes them.
pub const CLASSES: [&str; 6] = ["1xx", "2xx", "3xx", "4xx", "5xx", "error"];

#[derive(Default)]
struct Slot {
    epoch: AtomicU64,
    requests: AtomicU64,
    errors: AtomicU64,
    sum_us: AtomicU64,
    buckets: [AtomicU64; NB],
}

#[derive(Default)]
struct Shard {
    classes: [AtomicU64; 6],
    buckets: [AtomicU64; NB],
    sum_us: AtomicU64,
    slots: [Slot; SLOTS],
}

/// Add to a counter: a plain load and store when this thread is its only writer.
fn add(a: &AtomicU64, v: u64, exclusive: bool) {
    if exclusive {
        a.store(a.load(Ordering::Relaxed).wrapping_add(v), Ordering::Relaxed);
    } else {
        a.fetch_add(v, Ordering::Relaxed);
    }
}

fn bucket(latency_us: u64) -> usize {
    BUCKETS_US
        .iter()
        .position(|b| latency_us <= *b)
        .unwrap_or(BUCKETS_US.len())
}

/// This thread's shard index (assigned at its first record).
fn thread_index() -> usize {
    use std::cell::Cell;
    static NEXT: AtomicUsize = AtomicUsize::new(0);
    thread_local! {
        static INDEX: Cell<usize> = const { Cell::new(usize::MAX) };
    }
    INDEX.with(|i| {
        let v = i.get();
        if v != usize::MAX {
            return v;
        }
        let n = NEXT.fetch_add(1, Ordering::Relaxed);
        i.set(n);
        n
    })
}

/// One statistic (a route's, an instance's, a version's).
pub struct RequestStats {
    shards: Box<[OnceLock<Box<Shard>>]>,
    /// For the threads past `max_shards()`.
    shared: OnceLock<Box<Shard>>,
}

impl std::fmt::Debug for RequestStats {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let t = self.totals();
        write!(f, "RequestStats({} requests)", t.count())
    }
}

impl Default for RequestStats {
    fn default() -> Self {
        Self::new()
    }
}

/// Cumulative figures (since the statistic was made).
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Totals {
    /// By `CLASSES`.
    pub classes: [u64; 6],
    /// Per bucket of `BUCKETS_US` (not cumulative), the last one past the last bound.
    pub buckets: [u64; NB],
    pub sum_us: u64,
}

impl Totals {
    /// Requests with a latency recorded (those that got a response).
    pub fn count(&self) -> u64 {
        self.buckets.iter().sum()
    }
}

/// The figures of the rolling window (the last `WINDOW_MS`).
#[derive(Debug, Clone, Default, PartialEq)]
pub struct Window {
    pub requests: u64,
    pub errors: u64,
    pub sum_us: u64,
    pub buckets: [u64; NB],
    /// The window's length in seconds (for rates).
    pub seconds: f64,
}

impl Window {
    /// Errors (5xx, no response) per request; `None` without requests.
    pub fn error_rate(&self) -> Option<f64> {
        (self.requests > 0).then(|| self.errors as f64 / self.requests as f64)
    }

    /// Requests per second over the window.
    pub fn rate(&self) -> f64 {
        self.requests as f64 / self.seconds
    }

    /// Mean latency in milliseconds.
    pub fn mean_ms(&self) -> Option<f64> {
        (self.requests > 0).then(|| self.sum_us as f64 / self.requests as f64 / 1000.0)
    }

    /// The latency below which a share `q` of requests fell, in milliseconds (interpolated
    /// within its bucket); `None` without requests.
    pub fn quantile_ms(&self, q: f64) -> Option<f64> {
        let total: u64 = self.buckets.iter().sum();
        if total == 0 {
            return None;
        }
        let rank = q.clamp(0.0, 1.0) * total as f64;
        let mut seen = 0u64;
        for (i, n) in self.buckets.iter().enumerate() {
            if *n == 0 {
                continue;
            }
            if (seen + n) as f64 >= rank {
                let lo = if i == 0 { 0 } else { BUCKETS_US[i - 1] } as f64;
                let hi = BUCKETS_US.get(i).copied().unwrap_or(BUCKETS_US[NB - 2] * 2) as f64;
                let within = ((rank - seen as f64) / *n as f64).clamp(0.0, 1.0);
                return Some((lo + (hi - lo) * within) / 1000.0);
            }
            seen += n;
        }
        None
    }

    /// Add another window's figures (a service's, from its versions').
    pub fn merge(&mut self, o: &Window) {
        self.requests += o.requests;
        self.errors += o.errors;
        self.sum_us += o.sum_us;
        for (a, b) in self.buckets.iter_mut().zip(o.buckets.iter()) {
            *a += b;
        }
        self.seconds = self.seconds.max(o.seconds);
    }
}

impl RequestStats {
    pub fn new() -> Self {
        Self {
            shards: (0..max_shards()).map(|_| OnceLock::new()).collect(),
            shared: OnceLock::new(),
        }
    }

    /// Record one request at monotonic time `now_ms` (any clock that only moves forward, the
    /// same for every record and read of this statistic).
    pub fn record(&self, now_ms: u64, outcome: Outcome, latency_us: u64) {
        let i = thread_index();
        let (shard, exclusive) = match self.shards.get(i) {
            Some(cell) => (&**cell.get_or_init(Box::default), true),
            None => (&**self.shared.get_or_init(Box::default), false),
        };
        let b = bucket(latency_us);
        // Latencies are of responses: a connection that failed has none worth a histogram.
        let answered = matches!(outcome, Outcome::Status(_));
        add(&shard.classes[outcome.class()], 1, exclusive);
        if answered {
            add(&shard.buckets[b], 1, exclusive);
            add(&shard.sum_us, latency_us, exclusive);
        }
        let epoch = now_ms / SLOT_MS;
        let slot = &shard.slots[(epoch % SLOTS as u64) as usize];
        if slot.epoch.load(Ordering::Relaxed) != epoch {
            // A slot last used a window ago: start it again.
            slot.requests.store(0, Ordering::Relaxed);
            slot.errors.store(0, Ordering::Relaxed);
            slot.sum_us.store(0, Ordering::Relaxed);
            for c in &slot.buckets {
                c.store(0, Ordering::Relaxed);
            }
            slot.epoch.store(epoch, Ordering::Relaxed);
        }
        add(&slot.requests, 1, exclusive);
        if outcome.is_error() {
            add(&slot.errors, 1, exclusive);
        }
        if answered {
            add(&slot.sum_us, latency_us, exclusive);
            add(&slot.buckets[b], 1, exclusive);
        }
    }

    fn shards(&self) -> impl Iterator<Item = &Shard> {
        self.shards
            .iter()
            .chain(std::iter::once(&self.shared))
            .filter_map(|c| c.get().map(|b| &**b))
    }

    /// Cumulative figures.
    pub fn totals(&self) -> Totals {
        let mut t = Totals::default();
        for s in self.shards() {
            for (a, b) in t.classes.iter_mut().zip(s.classes.iter()) {
                *a += b.load(Ordering::Relaxed);
            }
            for (a, b) in t.buckets.iter_mut().zip(s.buckets.iter()) {
                *a += b.load(Ordering::Relaxed);
            }
            t.sum_us += s.sum_us.load(Ordering::Relaxed);
        }
        t
    }

    /// The window's figures at `now_ms`: the slots of the last `WINDOW_MS` (the current one
    /// included, still filling).
    pub fn window(&self, now_ms: u64) -> Window {
        let now = now_ms / SLOT_MS;
        let oldest = now.saturating_sub(SLOTS as u64 - 1);
        let mut w = Window {
            // The current slot is part-filled: the window spans what has elapsed of it.
            seconds: ((SLOTS as u64 - 1) * SLOT_MS + now_ms % SLOT_MS).max(1) as f64 / 1000.0,
            ..Window::default()
        };
        for s in self.shards() {
            for slot in &s.slots {
                let e = slot.epoch.load(Ordering::Relaxed);
                if e < oldest || e > now {
                    continue;
                }
                w.requests += slot.requests.load(Ordering::Relaxed);
                w.errors += slot.errors.load(Ordering::Relaxed);
                w.sum_us += slot.sum_us.load(Ordering::Relaxed);
                for (a, b) in w.buckets.iter_mut().zip(slot.buckets.iter()) {
                    *a += b.load(Ordering::Relaxed);
                }
            }
        }
        w
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;
    use std::sync::Arc;

    #[test]
    fn totals_and_window_count_what_was_recorded() {
        let s = RequestStats::new();
        s.record(1_000, Outcome::Status(200), 300);
        s.record(1_500, Outcome::Status(503), 2_000);
        s.record(2_000, Outcome::NoResponse, 30_000_000);
        s.record(2_500, Outcome::Status(404), 90);
        s.record(2_600, Outcome::Status(504), 30_000_000);
        let t = s.totals();
        assert_eq!(t.classes, [0, 1, 0, 1, 2, 1]);
        assert_eq!(t.count(), 4, "the no-response attempt has no latency");
        assert_eq!(t.sum_us, 300 + 2_000 + 30_000_000 + 90);
        assert_eq!(t.buckets[0], 1, "90 µs under 100");
        assert_eq!(t.buckets[2], 1, "300 µs under 500");
        assert_eq!(t.buckets[NB - 1], 1, "30 s past the last bound");
        let w = s.window(3_000);
        assert_eq!((w.requests, w.errors), (5, 3));
        assert_eq!(w.error_rate(), Some(0.6));
    }

    #[test]
    fn the_window_forgets_what_is_older_than_a_minute() {
        let s = RequestStats::new();
        for i in 0..10 {
            s.record(i * 1000, Outcome::Status(200), 1_000);
        }
        assert_eq!(s.window(10_000).requests, 10);
        // 61 s later the first slot (0-5 s) has left the window, the second (5-10 s) not yet.
        assert_eq!(s.window(61_000).requests, 5);
        assert_eq!(s.window(71_000).requests, 0);
        // A slot reused a window later starts from zero.
        s.record(120_500, Outcome::Status(500), 1_000);
        let w = s.window(121_000);
        assert_eq!((w.requests, w.errors), (1, 1));
        // The totals keep everything.
        assert_eq!(s.totals().count(), 11);
    }

    #[test]
    fn quantiles_interpolate_within_buckets() {
        let s = RequestStats::new();
        // 90 requests at ~800 µs, 10 at ~40 ms.
        for _ in 0..90 {
            s.record(0, Outcome::Status(200), 800);
        }
        for _ in 0..10 {
            s.record(0, Outcome::Status(200), 40_000);
        }
        let w = s.window(1);
        let p50 = w.quantile_ms(0.5).unwrap();
        let p99 = w.quantile_ms(0.99).unwrap();
        assert!((0.5..=1.0).contains(&p50), "{p50}");
        assert!((25.0..=50.0).contains(&p99), "{p99}");
        assert!(RequestStats::new().window(0).quantile_ms(0.5).is_none());
        let mut merged = s.window(1);
        merged.merge(&s.window(1));
        assert_eq!(merged.requests, 200);
    }

    #[test]
    fn every_thread_counts_none_lost() {
        let s = Arc::new(RequestStats::new());
        // More threads than shards: the rest share one, with atomic adds.
        let threads: Vec<_> = (0..max_shards() + 8)
            .map(|_| {
                let s = s.clone();
                std::thread::spawn(move || {
                    for _ in 0..1000 {
                        s.record(500, Outcome::Status(200), 1_000);
                    }
                })
            })
            .collect();
        for t in threads {
            t.join().unwrap();
        }
        let n = (max_shards() as u64 + 8) * 1000;
        assert_eq!(s.totals().classes[1], n);
        assert_eq!(s.window(1_000).requests, n);
    }
}
