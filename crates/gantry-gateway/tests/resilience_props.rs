//! Properties of the sans-io resilience cores over random sequences of events and times: the
//! circuit breaker, outlier detection, the retry budget, the ejection cap and backoff.
#![allow(clippy::unwrap_used)]

use std::time::Duration;

use gantry_gateway::resilience::{
    backoff, ejection_allowed, Admission, Breaker, BreakerChange, BreakerState, Outlier,
    OutlierVerdict, RetryBudget,
};
use gantry_model::{CircuitBreakerPolicy, OutlierPolicy};
use proptest::prelude::*;

fn breaker_policy(consecutive: u32, rate: f64, open_ms: u64, probes: u32) -> CircuitBreakerPolicy {
    CircuitBreakerPolicy {
        consecutive_failures: consecutive,
        failure_rate: rate,
        min_requests: 5,
        window_ms: 10_000,
        open_ms,
        half_open_requests: probes,
    }
}

/// An event for the breaker: time passes, then a request is admitted and (maybe) reports.
#[derive(Debug, Clone)]
struct Step {
    advance_ms: u64,
    ok: bool,
    reports: bool,
}

fn steps() -> impl Strategy<Value = Vec<Step>> {
    prop::collection::vec(
        (0u64..400, any::<bool>(), prop::bool::weighted(0.9)).prop_map(|(a, ok, r)| Step {
            advance_ms: a,
            ok,
            reports: r,
        }),
        1..300,
    )
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(256))]

    /// Whatever happens: an open breaker refuses until its time is up; a half-open one lets at
    /// most `half_open_requests` probes out at once; its code follows its state; and it only
    /// opens on a failure and only closes on a probe's success.
    #[test]
    fn breaker_invariants(
        consecutive in 0u32..6,
        rate in prop::sample::select(vec![0.0, 0.3, 0.5, 1.0]),
        open_ms in 1u64..2_000,
        probes in 1u32..4,
        steps in steps(),
    ) {
        let mut b = Breaker::new(breaker_policy(consecutive, rate, open_ms, probes));
        let mut now = 0u64;
        let mut out = 0u32;
        for s in steps {
            now += s.advance_ms;
            let before = b.state();
            match b.admit(now) {
                Admission::Rejected { retry_after_ms } => {
                    prop_assert!(retry_after_ms > 0);
                    prop_assert!(!matches!(b.state(), BreakerState::Closed));
                    if let BreakerState::Open { until_ms } = before {
                        let half_open = matches!(b.state(), BreakerState::HalfOpen { .. });
                        prop_assert!(now < until_ms || half_open, "refused after its time");
                    }
                }
                Admission::Allowed { probe } => {
                    if let BreakerState::Open { until_ms } = before {
                        prop_assert!(now >= until_ms, "admitted while open");
                    }
                    if probe {
                        out += 1;
                        if let BreakerState::HalfOpen { in_flight, .. } = b.state() {
                            prop_assert!(in_flight <= probes);
                        }
                    } else {
                        prop_assert_eq!(b.state(), BreakerState::Closed);
                    }
                    if s.reports {
                        let was = b.state();
                        match b.record(now, s.ok, probe) {
                            Some(BreakerChange::Opened) => prop_assert!(!s.ok),
                            Some(BreakerChange::Closed) => {
                                prop_assert!(s.ok && probe);
                                let was_half_open = matches!(was, BreakerState::HalfOpen { .. });
                                prop_assert!(was_half_open, "closed from {:?}", was);
                            }
                            None => {}
                        }
                        if probe {
                            out = out.saturating_sub(1);
                        }
                    }
                }
            }
            let code = b.code();
            let expected = match b.state() {
                BreakerState::Closed => 0,
                BreakerState::Open { .. } => 1,
                BreakerState::HalfOpen { .. } => 2,
            };
            prop_assert_eq!(code, expected);
        }
        let _ = out;
    }

    /// With only the consecutive trigger, a closed breaker opens exactly at the Nth failure in
    /// a row, and a success in between starts the count again.
    #[test]
    fn breaker_opens_exactly_at_n_consecutive_failures(
        n in 1u32..8,
        pattern in prop::collection::vec(any::<bool>(), 0..60),
    ) {
        let mut b = Breaker::new(breaker_policy(n, 0.0, 1_000, 1));
        let mut streak = 0u32;
        for (t, ok) in pattern.into_iter().enumerate() {
            if b.state() != BreakerState::Closed {
                break;
            }
            let change = b.record(t as u64, ok, false);
            streak = if ok { 0 } else { streak + 1 };
            prop_assert_eq!(change == Some(BreakerChange::Opened), streak == n);
        }
    }

    /// Outlier detection: ejected exactly at the Nth failure in a row, for the base time times
    /// the ejections (capped); no verdict while ejected; back at the first success after.
    #[test]
    fn outlier_ejects_at_n_and_restores_after(
        n in 1u32..6,
        base in 1u64..5_000,
        cap_factor in 1u64..5,
        rounds in 1usize..5,
    ) {
        let max = base * cap_factor;
        let mut o = Outlier::new(OutlierPolicy {
            consecutive_failures: n,
            failure_rate: 0.0,
            min_requests: 1,
            window_ms: 1_000_000,
            base_ejection_ms: base,
            max_ejection_ms: max,
            max_ejected_percent: 100,
        });
        let mut now = 0u64;
        for round in 1..=rounds {
            for i in 1..=n {
                now += 1;
                let v = o.record(now, false);
                if i < n {
                    prop_assert_eq!(v, None);
                } else {
                    prop_assert_eq!(v, Some(OutlierVerdict::Eject));
                }
            }
            let until = o.eject(now);
            prop_assert_eq!(until - now, (base * round as u64).min(max));
            prop_assert!(o.is_ejected());
            // A request that started before the ejection and ends inside it: no news. (With an
            // ejection of 1 ms, `now + 1` is already past it.)
            if until > now + 1 {
                prop_assert_eq!(o.record(now + 1, false), None);
            }
            now = until;
            prop_assert_eq!(o.record(now, true), Some(OutlierVerdict::Restore));
            prop_assert!(!o.is_ejected());
        }
    }

    /// The retry budget against a reference model of its own rule: a retry is granted exactly
    /// when the retries already granted in the window are fewer than `ratio × requests +
    /// min_per_second × 10`.
    #[test]
    fn retry_budget_matches_its_rule(
        ratio in prop::sample::select(vec![0.0, 0.1, 0.2, 0.5]),
        min_per_second in 0u32..3,
        ops in prop::collection::vec((0u64..1_500, any::<bool>()), 1..400),
    ) {
        let b = RetryBudget::new(ratio, min_per_second);
        // Reference: per 1 s bucket (the budget's), requests and granted retries.
        let mut buckets: std::collections::BTreeMap<u64, (u64, u64)> = Default::default();
        let mut now = 0u64;
        for (advance, is_retry) in ops {
            now += advance;
            let epoch = now / 1_000;
            if is_retry {
                let (req, ret) = buckets
                    .range(epoch.saturating_sub(9)..=epoch)
                    .fold((0, 0), |(a, b), (_, (r, t))| (a + r, b + t));
                let allowed = ratio * req as f64 + f64::from(min_per_second) * 10.0;
                let expect = (ret as f64) < allowed;
                prop_assert_eq!(b.try_retry(now), expect, "at {} ms: {} req, {} retries", now, req, ret);
                if expect {
                    buckets.entry(epoch).or_default().1 += 1;
                }
            } else {
                b.record_request(now);
                buckets.entry(epoch).or_default().0 += 1;
            }
        }
    }

    /// The ejection cap: never more than `max_percent` of the instances out, but one always
    /// may go.
    #[test]
    fn ejection_cap_holds(ejected in 0usize..50, total in 1usize..50, max in 0u32..=100) {
        let allowed = ejection_allowed(ejected, total, max);
        if ejected == 0 {
            prop_assert!(allowed);
        } else if allowed {
            prop_assert!((ejected + 1) * 100 <= total * max as usize);
        }
    }

    /// Backoff: within [0, min(max, base × 2^(attempt-1))].
    #[test]
    fn backoff_stays_within_its_cap(attempt in 0u32..40, base in 0u64..1_000, max in 0u64..10_000) {
        let cap = base.saturating_mul(1u64 << attempt.saturating_sub(1).min(20)).min(max);
        prop_assert!(backoff(attempt, base, max) <= Duration::from_millis(cap));
    }
}
