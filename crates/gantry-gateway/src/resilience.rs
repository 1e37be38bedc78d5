//! Sans-io resilience cores, driven with an explicit monotonic time in milliseconds:
//! the service circuit breaker, instance outlier ejection, the retry budget and retry backoff.

use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use gantry_model::{CircuitBreakerPolicy, OutlierPolicy};

const BUCKETS: usize = 10;

/// Successes and failures over a sliding window of 10 buckets.
#[derive(Debug, Clone)]
pub struct Window {
    bucket_ms: u64,
    buckets: [(u64, u32, u32); BUCKETS],
}

impl Window {
    pub fn new(window_ms: u64) -> Self {
        Self {
            bucket_ms: (window_ms / BUCKETS as u64).max(1),
            buckets: [(u64::MAX, 0, 0); BUCKETS],
        }
    }

    pub fn add(&mut self, now_ms: u64, ok: bool) {
        let epoch = now_ms / self.bucket_ms;
        let b = &mut self.buckets[(epoch % BUCKETS as u64) as usize];
        if b.0 != epoch {
            *b = (epoch, 0, 0);
        }
        if ok {
            b.1 += 1;
        } else {
            b.2 += 1;
        }
    }

    /// (total, failures) within the window.
    pub fn totals(&self, now_ms: u64) -> (u32, u32) {
        let epoch = now_ms / self.bucket_ms;
        self.buckets
            .iter()
            .filter(|b| b.0 != u64::MAX && b.0 + (BUCKETS as u64) > epoch && b.0 <= epoch)
            .fold((0, 0), |(t, f), b| (t + b.1 + b.2, f + b.2))
    }

    pub fn clear(&mut self) {
        self.buckets = [(u64::MAX, 0, 0); BUCKETS];
    }
}

/// Does the failure record trip? (consecutive failures, or failure rate over enough requests)
fn tripped(consecutive: u32, limit: u32, w: &Window, now: u64, rate: f64, min: u32) -> bool {
    if limit > 0 && consecutive >= limit {
        return true;
    }
    if rate > 0.0 {
        let (total, failed) = w.totals(now);
        if total >= min.max(1) && f64::from(failed) >= rate * f64::from(total) {
            return true;
        }
    }
    false
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum BreakerState {
    Closed,
    Open {
        until_ms: u64,
    },
    HalfOpen {
        since_ms: u64,
        in_flight: u32,
        successes: u32,
    },
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Admission {
    Allowed { probe: bool },
    Rejected { retry_after_ms: u64 },
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum BreakerChange {
    Opened,
    Closed,
}

/// The service-level circuit breaker.
#[derive(Debug, Clone)]
pub struct Breaker {
    policy: CircuitBreakerPolicy,
    state: BreakerState,
    consecutive: u32,
    window: Window,
}

impl Breaker {
    pub fn new(policy: CircuitBreakerPolicy) -> Self {
        Self {
            window: Window::new(policy.window_ms),
            policy,
            state: BreakerState::Closed,
            consecutive: 0,
        }
    }

    pub fn state(&self) -> BreakerState {
        self.state
    }

    /// 0 closed, 1 open, 2 half-open (the metric's values).
    pub fn code(&self) -> i64 {
        match self.state {
            BreakerState::Closed => 0,
            BreakerState::Open { .. } => 1,
            BreakerState::HalfOpen { .. } => 2,
        }
    }

    pub fn admit(&mut self, now: u64) -> Admission {
        if let BreakerState::Open { until_ms } = self.state {
            if now < until_ms {
                return Admission::Rejected {
                    retry_after_ms: until_ms - now,
                };
            }
            self.state = BreakerState::HalfOpen {
                since_ms: now,
                in_flight: 0,
                successes: 0,
            };
        }
        match &mut self.state {
            BreakerState::Closed => Admission::Allowed { probe: false },
            BreakerState::HalfOpen {
                since_ms,
                in_flight,
                ..
            } => {
                // Probes that never reported (cancelled) must not wedge the breaker.
                if now.saturating_sub(*since_ms) > self.policy.open_ms {
                    *since_ms = now;
                    *in_flight = 0;
                }
                if *in_flight < self.policy.half_open_requests.max(1) {
                    *in_flight += 1;
                    Admission::Allowed { probe: true }
                } else {
                    Admission::Rejected {
                        retry_after_ms: self.policy.open_ms.min(1000),
                    }
                }
            }
            BreakerState::Open { .. } => Admission::Rejected {
                retry_after_ms: self.policy.open_ms,
            },
        }
    }

    pub fn record(&mut self, now: u64, ok: bool, probe: bool) -> Option<BreakerChange> {
        match &mut self.state {
            BreakerState::HalfOpen {
                in_flight,
                successes,
                ..
            } if probe => {
                *in_flight = in_flight.saturating_sub(1);
                if !ok {
                    self.state = BreakerState::Open {
                        until_ms: now + self.policy.open_ms,
                    };
                    return Some(BreakerChange::Opened);
                }
                *successes += 1;
                if *successes >= self.policy.half_open_requests.max(1) {
                    self.state = BreakerState::Closed;
                    self.consecutive = 0;
                    self.window.clear();
                    return Some(BreakerChange::Closed);
                }
                None
            }
            BreakerState::Closed => {
                self.window.add(now, ok);
                self.consecutive = if ok { 0 } else { self.consecutive + 1 };
                let p = &self.policy;
                // Only a failure can trip the breaker.
                if !ok
                    && tripped(
                        self.consecutive,
                        p.consecutive_failures,
                        &self.window,
                        now,
                        p.failure_rate,
                        p.min_requests,
                    )
                {
                    self.state = BreakerState::Open {
                        until_ms: now + p.open_ms,
                    };
                    return Some(BreakerChange::Opened);
                }
                None
            }
            _ => None,
        }
    }

    /// A half-open probe that ended without an outcome (the client's fault, a cancelled
    /// request, a limit that turned it away): its slot is free again, and it says nothing
    /// about the service either way.
    pub fn release(&mut self) {
        if let BreakerState::HalfOpen { in_flight, .. } = &mut self.state {
            *in_flight = in_flight.saturating_sub(1);
        }
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum OutlierVerdict {
    /// Take the instance out (if the ejection cap allows).
    Eject,
    /// An ejected instance answered well: back in rotation.
    Restore,
}

/// Instance-level failure tracking (the instance's circuit breaker).
#[derive(Debug, Clone)]
pub struct Outlier {
    policy: OutlierPolicy,
    consecutive: u32,
    window: Window,
    /// Times ejected, less one for every window spent back in rotation without an ejection
    /// (Envoy's ejection multiplier); the ejection time grows with it.
    pub ejections: u32,
    /// `Some(until)` while ejected or being probed after the ejection ended.
    ejected_until: Option<u64>,
    /// Since when the multiplier has been decaying (the last restore, or the last decrement).
    calm_since: u64,
}

impl Outlier {
    pub fn new(policy: OutlierPolicy) -> Self {
        Self {
            window: Window::new(policy.window_ms),
            policy,
            consecutive: 0,
            ejections: 0,
            ejected_until: None,
            calm_since: 0,
        }
    }

    pub fn record(&mut self, now: u64, ok: bool) -> Option<OutlierVerdict> {
        if let Some(until) = self.ejected_until {
            if now < until {
                // A request sent before the ejection finishing now: no news.
                return None;
            }
            // A result after the ejection ended is the probe's verdict.
            return Some(if ok {
                self.ejected_until = None;
                self.consecutive = 0;
                self.window.clear();
                self.calm_since = now;
                OutlierVerdict::Restore
            } else {
                OutlierVerdict::Eject
            });
        }
        // A whole window back in rotation without an ejection: the next one is shorter.
        let calm = self.policy.window_ms.max(1);
        while self.ejections > 0 && now >= self.calm_since.saturating_add(calm) {
            self.ejections -= 1;
            self.calm_since += calm;
        }
        self.window.add(now, ok);
        self.consecutive = if ok { 0 } else { self.consecutive + 1 };
        if ok {
            return None;
        }
        let p = &self.policy;
        tripped(
            self.consecutive,
            p.consecutive_failures,
            &self.window,
            now,
            p.failure_rate,
            p.min_requests,
        )
        .then_some(OutlierVerdict::Eject)
    }

    /// Eject now; returns the time the ejection ends.
    pub fn eject(&mut self, now: u64) -> u64 {
        self.ejections += 1;
        let ms = self
            .policy
            .base_ejection_ms
            .saturating_mul(u64::from(self.ejections))
            .min(self.policy.max_ejection_ms);
        let until = now + ms;
        self.ejected_until = Some(until);
        self.consecutive = 0;
        self.window.clear();
        until
    }

    /// The cap did not allow an ejection: forget the streak so it is not re-evaluated at once.
    pub fn spare(&mut self) {
        self.consecutive = 0;
        self.window.clear();
    }

    pub fn is_ejected(&self) -> bool {
        self.ejected_until.is_some()
    }
}

/// May one more instance of `total` be ejected when `ejected` already are?
pub fn ejection_allowed(ejected: usize, total: usize, max_percent: u32) -> bool {
    if total == 0 {
        return false;
    }
    ejected == 0
        || ejected.saturating_add(1).saturating_mul(100)
            <= total.saturating_mul(max_percent as usize)
}

/// Linkerd-style retry budget: retries within the window may be at most
/// `ratio × requests + min_per_second × window_seconds`. Approximate and lock-free.
#[derive(Debug)]
pub struct RetryBudget {
    ratio: f64,
    min_per_second: u32,
    bucket_ms: u64,
    epochs: [AtomicU64; BUCKETS],
    requests: [AtomicU64; BUCKETS],
    retries: [AtomicU64; BUCKETS],
}

const BUDGET_WINDOW_MS: u64 = 10_000;

impl RetryBudget {
    pub fn new(ratio: f64, min_per_second: u32) -> Self {
        Self {
            ratio,
            min_per_second,
            bucket_ms: BUDGET_WINDOW_MS / BUCKETS as u64,
            epochs: Default::default(),
            requests: Default::default(),
            retries: Default::default(),
        }
    }

    fn slot(&self, now: u64) -> usize {
        let epoch = now / self.bucket_ms + 1; // 0 means "never used"
        let i = (epoch % BUCKETS as u64) as usize;
        if self.epochs[i].load(Ordering::Relaxed) != epoch {
            self.epochs[i].store(epoch, Ordering::Relaxed);
            self.requests[i].store(0, Ordering::Relaxed);
            self.retries[i].store(0, Ordering::Relaxed);
        }
        i
    }

    fn sums(&self, now: u64) -> (u64, u64) {
        let epoch = now / self.bucket_ms + 1;
        let mut req = 0;
        let mut ret = 0;
        for i in 0..BUCKETS {
            let e = self.epochs[i].load(Ordering::Relaxed);
            if e != 0 && e + BUCKETS as u64 > epoch && e <= epoch {
                req += self.requests[i].load(Ordering::Relaxed);
                ret += self.retries[i].load(Ordering::Relaxed);
            }
        }
        (req, ret)
    }

    pub fn record_request(&self, now: u64) {
        let i = self.slot(now);
        self.requests[i].fetch_add(1, Ordering::Relaxed);
    }

    /// Take one retry from the budget if there is one.
    pub fn try_retry(&self, now: u64) -> bool {
        let (req, ret) = self.sums(now);
        let allowed = self.ratio * req as f64
            + f64::from(self.min_per_second) * (BUDGET_WINDOW_MS as f64 / 1000.0);
        if (ret as f64) < allowed {
            let i = self.slot(now);
            self.retries[i].fetch_add(1, Ordering::Relaxed);
            true
        } else {
            false
        }
    }
}

/// Exponential backoff with full jitter: uniform in `[0, min(max, base · 2^(attempt-1))]`.
pub fn backoff(attempt: u32, base_ms: u64, max_ms: u64) -> Duration {
    let cap = base_ms
        .saturating_mul(1u64 << attempt.saturating_sub(1).min(20))
        .min(max_ms);
    Duration::from_millis(crate::rand::below(cap + 1))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn cb(consecutive: u32, rate: f64) -> CircuitBreakerPolicy {
        CircuitBreakerPolicy {
            consecutive_failures: consecutive,
            failure_rate: rate,
            min_requests: 10,
            window_ms: 10_000,
            open_ms: 1_000,
            half_open_requests: 2,
        }
    }

    #[test]
    fn breaker_opens_on_consecutive_failures_then_half_opens_and_closes() {
        let mut b = Breaker::new(cb(3, 0.0));
        for t in 0..2 {
            assert_eq!(b.admit(t), Admission::Allowed { probe: false });
            assert_eq!(b.record(t, false, false), None);
        }
        assert_eq!(b.record(2, false, false), Some(BreakerChange::Opened));
        assert!(matches!(
            b.admit(500),
            Admission::Rejected {
                retry_after_ms: 502
            }
        ));
        // After open_ms: two probes allowed, a third is not.
        assert_eq!(b.admit(1002), Admission::Allowed { probe: true });
        assert_eq!(b.admit(1003), Admission::Allowed { probe: true });
        assert!(matches!(b.admit(1004), Admission::Rejected { .. }));
        assert_eq!(b.record(1010, true, true), None);
        assert_eq!(b.record(1011, true, true), Some(BreakerChange::Closed));
        assert_eq!(b.state(), BreakerState::Closed);
    }

    #[test]
    fn failed_probe_reopens() {
        let mut b = Breaker::new(cb(1, 0.0));
        b.record(0, false, false);
        assert_eq!(b.admit(1000), Admission::Allowed { probe: true });
        assert_eq!(b.record(1001, false, true), Some(BreakerChange::Opened));
        assert!(matches!(b.admit(1500), Admission::Rejected { .. }));
    }

    #[test]
    fn breaker_opens_on_failure_rate_with_enough_requests() {
        let mut b = Breaker::new(cb(0, 0.5));
        for t in 0..9 {
            assert_eq!(b.record(t, t % 2 == 0, false), None, "t={t}");
        }
        // 10th request: 5 of 10 failed = 50%.
        assert_eq!(b.record(9, false, false), Some(BreakerChange::Opened));
        // Old results leave the window.
        let mut b = Breaker::new(cb(0, 0.5));
        for t in 0..8 {
            b.record(t, false, false);
        }
        for t in 0..20 {
            assert_eq!(b.record(20_000 + t, true, false), None);
        }
    }

    #[test]
    fn lost_probes_do_not_wedge_half_open() {
        let mut b = Breaker::new(cb(1, 0.0));
        b.record(0, false, false);
        assert!(matches!(b.admit(1000), Admission::Allowed { probe: true }));
        assert!(matches!(b.admit(1000), Admission::Allowed { probe: true }));
        assert!(matches!(b.admit(1001), Admission::Rejected { .. }));
        // The probes never reported; after another open_ms new probes go through.
        assert!(matches!(b.admit(2002), Admission::Allowed { probe: true }));
    }

    #[test]
    fn a_released_probe_frees_its_slot_and_decides_nothing() {
        let mut b = Breaker::new(cb(1, 0.0));
        b.record(0, false, false);
        assert!(matches!(b.admit(1000), Admission::Allowed { probe: true }));
        assert!(matches!(b.admit(1000), Admission::Allowed { probe: true }));
        assert!(matches!(b.admit(1000), Admission::Rejected { .. }));
        b.release();
        assert!(matches!(b.state(), BreakerState::HalfOpen { .. }));
        assert!(matches!(b.admit(1001), Admission::Allowed { probe: true }));
        // Closed, a release changes nothing.
        b.record(1002, true, true);
        b.record(1002, true, true);
        assert_eq!(b.state(), BreakerState::Closed);
        b.release();
        assert_eq!(b.state(), BreakerState::Closed);
    }

    fn op() -> OutlierPolicy {
        OutlierPolicy {
            consecutive_failures: 3,
            failure_rate: 0.0,
            min_requests: 10,
            window_ms: 10_000,
            base_ejection_ms: 1000,
            max_ejection_ms: 2500,
            max_ejected_percent: 50,
        }
    }

    #[test]
    fn outlier_ejection_grows_and_restores() {
        let mut o = Outlier::new(op());
        assert_eq!(o.record(0, false), None);
        assert_eq!(o.record(1, false), None);
        assert_eq!(o.record(2, false), Some(OutlierVerdict::Eject));
        assert_eq!(o.eject(2), 1002);
        // Late results of requests sent before the ejection change nothing.
        assert_eq!(o.record(500, false), None);
        assert_eq!(o.record(600, true), None);
        // Probe after the ejection fails: ejected again for longer.
        assert_eq!(o.record(1003, false), Some(OutlierVerdict::Eject));
        assert_eq!(o.eject(1003), 3003);
        assert_eq!(o.record(3004, false), Some(OutlierVerdict::Eject));
        assert_eq!(o.eject(3004), 5504); // capped at 2500
        assert_eq!(o.record(5505, true), Some(OutlierVerdict::Restore));
        assert!(!o.is_ejected());
        assert_eq!(o.record(5506, true), None);
    }

    #[test]
    fn the_ejection_multiplier_decays_while_an_instance_behaves() {
        let p = op();
        let window = p.window_ms;
        let mut o = Outlier::new(p);
        let fail3 = |o: &mut Outlier, at: u64| {
            o.record(at, false);
            o.record(at + 1, false);
            o.record(at + 2, false)
        };
        assert_eq!(fail3(&mut o, 0), Some(OutlierVerdict::Eject));
        let until = o.eject(2);
        assert_eq!(o.record(until + 1, false), Some(OutlierVerdict::Eject));
        let until = o.eject(until + 1);
        assert_eq!(o.ejections, 2);
        let back = until + 1;
        assert_eq!(o.record(back, true), Some(OutlierVerdict::Restore));
        // Less than a window later: still remembered.
        o.record(back + window - 1, true);
        assert_eq!(o.ejections, 2);
        // Two whole windows back in rotation: forgotten, step by step.
        o.record(back + 2 * window, true);
        assert_eq!(o.ejections, 0);
        // So the next ejection is the base time again, not three times it.
        let at = back + 2 * window + 10;
        assert_eq!(fail3(&mut o, at), Some(OutlierVerdict::Eject));
        assert_eq!(o.eject(at + 2), at + 2 + 1000);
    }

    #[test]
    fn ejection_cap() {
        assert!(ejection_allowed(0, 1, 10)); // always at least one
        assert!(ejection_allowed(0, 3, 50));
        assert!(!ejection_allowed(1, 3, 50));
        assert!(ejection_allowed(1, 4, 50));
        assert!(!ejection_allowed(2, 4, 50));
        assert!(!ejection_allowed(0, 0, 50));
        // A count gone wrong never overflows.
        assert!(!ejection_allowed(usize::MAX, 4, 50));
        assert!(ejection_allowed(1, usize::MAX, 100));
    }

    #[test]
    fn retry_budget_caps_retries() {
        let b = RetryBudget::new(0.2, 0);
        for _ in 0..100 {
            b.record_request(5);
        }
        let granted = (0..100).filter(|_| b.try_retry(5)).count();
        assert_eq!(granted, 20);
        // The floor lets low-traffic routes retry.
        let b = RetryBudget::new(0.2, 1);
        let granted = (0..100).filter(|_| b.try_retry(5)).count();
        assert_eq!(granted, 10);
        // Old traffic leaves the window.
        let b = RetryBudget::new(0.5, 0);
        for _ in 0..10 {
            b.record_request(0);
        }
        assert!(b.try_retry(1));
        assert!(!b.try_retry(60_000));
    }

    #[test]
    fn backoff_is_bounded() {
        for attempt in 1..10 {
            let d = backoff(attempt, 25, 250);
            assert!(d <= Duration::from_millis(250));
            assert!(d <= Duration::from_millis(25 << (attempt - 1)));
        }
    }
}
