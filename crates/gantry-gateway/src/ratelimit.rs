//! Token-bucket rate limiting per route and key (client IP, a header, or the whole route).
//!
//! Local to this gateway process. The seam for a cluster-wide limit is [`Limiter::check`]: a
//! shared implementation (e.g. on NATS KV) would answer the same question for a key.

use std::collections::HashMap;
use std::sync::Mutex;

use gantry_model::RateLimit;

/// Keys kept per route before idle (full) buckets are dropped.
const MAX_KEYS: usize = 100_000;

#[derive(Debug, Clone, Copy)]
struct Bucket {
    tokens: f64,
    last_ms: u64,
}

/// The answer for one request.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Decision {
    pub allowed: bool,
    pub limit: u32,
    pub remaining: u32,
    /// Seconds until the bucket is full again (`RateLimit-Reset`).
    pub reset_secs: u64,
    /// Seconds until one token is available (`Retry-After`), when refused.
    pub retry_after_secs: u64,
}

pub struct Limiter {
    rate: f64,
    burst: f64,
    buckets: Mutex<HashMap<Vec<u8>, Bucket>>,
}

impl Limiter {
    pub fn new(policy: &RateLimit) -> Self {
        Self {
            rate: policy.requests_per_second,
            burst: f64::from(policy.burst.max(1)),
            buckets: Mutex::new(HashMap::new()),
        }
    }

    /// Take one token for `key` at monotonic time `now_ms`.
    pub fn check(&self, key: &[u8], now_ms: u64) -> Decision {
        let mut map = self
            .buckets
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        if map.len() >= MAX_KEYS && !map.contains_key(key) {
            let (rate, burst) = (self.rate, self.burst);
            map.retain(|_, b| {
                b.tokens + (now_ms.saturating_sub(b.last_ms) as f64 / 1000.0) * rate < burst
            });
            if map.len() >= MAX_KEYS {
                // Still full of active keys: refuse new keys rather than grow without bound.
                return Decision {
                    allowed: false,
                    limit: burst as u32,
                    remaining: 0,
                    reset_secs: 1,
                    retry_after_secs: 1,
                };
            }
        }
        let b = map.entry(key.to_vec()).or_insert(Bucket {
            tokens: self.burst,
            last_ms: now_ms,
        });
        let elapsed = now_ms.saturating_sub(b.last_ms) as f64 / 1000.0;
        b.tokens = (b.tokens + elapsed * self.rate).min(self.burst);
        b.last_ms = now_ms;
        let allowed = b.tokens >= 1.0;
        if allowed {
            b.tokens -= 1.0;
        }
        let missing = self.burst - b.tokens;
        Decision {
            allowed,
            limit: self.burst as u32,
            remaining: b.tokens.floor().max(0.0) as u32,
            reset_secs: (missing / self.rate).ceil() as u64,
            retry_after_secs: if allowed {
                0
            } else {
                ((1.0 - b.tokens) / self.rate).ceil().max(1.0) as u64
            },
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use gantry_model::RateLimitKey;

    fn lim(rps: f64, burst: u32) -> Limiter {
        Limiter::new(&RateLimit {
            requests_per_second: rps,
            burst,
            key: RateLimitKey::ClientIp,
        })
    }

    #[test]
    fn burst_then_refill() {
        let l = lim(2.0, 3);
        let got: Vec<bool> = (0..5).map(|_| l.check(b"a", 0).allowed).collect();
        assert_eq!(got, [true, true, true, false, false]);
        let d = l.check(b"a", 0);
        assert_eq!((d.remaining, d.retry_after_secs), (0, 1));
        // Half a second later one token is back.
        assert!(l.check(b"a", 500).allowed);
        assert!(!l.check(b"a", 500).allowed);
        // Keys are independent.
        assert!(l.check(b"b", 500).allowed);
    }

    #[test]
    fn headers_values() {
        let l = lim(10.0, 10);
        let d = l.check(b"k", 0);
        assert_eq!((d.limit, d.remaining), (10, 9));
        assert_eq!(d.reset_secs, 1);
    }
}
