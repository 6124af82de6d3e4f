//! Per-site rate limits (token buckets): `Join`, and the reports that write the audit log. A
//! client joins once per connection and reconnects with exponential backoff, so a handful of joins a minute is normal; a site that joins faster
//! (a loop gone wrong, a stolen certificate hammering the server) is refused with
//! `RESOURCE_EXHAUSTED` until its bucket refills, and the refusal is counted under
//! `reason="rate_limited"` in `/metrics`.
//!
//! Buckets exist only for sites on the allow-list (the check runs after the certificate and the
//! allow-list), so their number is bounded by the study's sites. Pure apart from the mutex: callers
//! pass the `Instant`.

use crate::state::lock;
use std::collections::BTreeMap;
use std::sync::Mutex;
use std::time::{Duration, Instant};

/// Reports (key advertisements, task refusals, evaluations, statistics) a site may send in a
/// burst: each is written to the fsynced audit log, so a flood is bounded here. A real site sends a
/// few per round.
pub const REPORT_BURST: u32 = 64;
/// One more report is allowed every this long (50 a second, far above any real round rate).
pub const REPORT_REFILL: Duration = Duration::from_millis(20);

/// Joins a site may make in a burst.
pub const JOIN_BURST: u32 = 10;
/// One more join is allowed every this long.
pub const JOIN_REFILL: Duration = Duration::from_secs(3);

#[derive(Clone, Copy, Debug)]
struct Bucket {
    /// Whole tokens left.
    tokens: u32,
    /// When the next token is due (tokens below the burst), or when the bucket was last full.
    since: Instant,
}

/// Per-site token buckets: one limiter for `Join` ([`Default`]), one for reports ([`RateLimiter::reports`]).
#[derive(Debug)]
pub struct RateLimiter {
    burst: u32,
    refill: Duration,
    buckets: Mutex<BTreeMap<String, Bucket>>,
}

impl RateLimiter {
    /// The limiter of a site's reports ([`REPORT_BURST`], [`REPORT_REFILL`]).
    pub fn reports() -> Self {
        Self::new(REPORT_BURST, REPORT_REFILL)
    }
}

impl Default for RateLimiter {
    fn default() -> Self {
        Self::new(JOIN_BURST, JOIN_REFILL)
    }
}

impl RateLimiter {
    /// A limiter allowing `burst` joins at once and one more per `refill` (burst at least 1,
    /// refill at least 1 ms).
    pub fn new(burst: u32, refill: Duration) -> Self {
        Self { burst: burst.max(1), refill: refill.max(Duration::from_millis(1)), buckets: Mutex::new(BTreeMap::new()) }
    }

    /// Takes a token for a join of `site` at `now`.
    ///
    /// # Errors
    /// How long until the next join is allowed, when the bucket is empty.
    pub fn allow(&self, site: &str, now: Instant) -> Result<(), Duration> {
        let mut buckets = lock(&self.buckets);
        let b = buckets.entry(site.to_string()).or_insert(Bucket { tokens: self.burst, since: now });
        // Refill whole tokens for the time passed, keeping the remainder for the next one.
        let elapsed = now.saturating_duration_since(b.since);
        let earned = elapsed.as_nanos() / self.refill.as_nanos().max(1);
        if earned > 0 {
            let earned = u32::try_from(earned).unwrap_or(u32::MAX);
            b.tokens = b.tokens.saturating_add(earned).min(self.burst);
            b.since = if b.tokens == self.burst { now } else { b.since + self.refill * earned };
        }
        if b.tokens == 0 {
            return Err((b.since + self.refill).saturating_duration_since(now));
        }
        if b.tokens == self.burst {
            b.since = now;
        }
        b.tokens -= 1;
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_burst_is_allowed_then_one_join_per_refill_period_per_site() {
        let l = RateLimiter::new(3, Duration::from_secs(2));
        let t0 = Instant::now();
        for _ in 0..3 {
            l.allow("a", t0).unwrap();
        }
        let wait = l.allow("a", t0).unwrap_err();
        assert_eq!(wait, Duration::from_secs(2));
        assert!(l.allow("b", t0).is_ok(), "buckets are per site");
        assert_eq!(l.allow("a", t0 + Duration::from_millis(1500)).unwrap_err(), Duration::from_millis(500));
        l.allow("a", t0 + Duration::from_secs(2)).unwrap();
        assert!(l.allow("a", t0 + Duration::from_secs(3)).is_err(), "the remainder counts toward the next token");
        l.allow("a", t0 + Duration::from_secs(4)).unwrap();
        // A long pause refills to the burst, never beyond.
        let later = t0 + Duration::from_secs(3600);
        for _ in 0..3 {
            l.allow("a", later).unwrap();
        }
        assert!(l.allow("a", later).is_err());
        // Time going backwards (never with Instant, but a caller's mistake) refuses nothing new.
        assert!(l.allow("b", t0 - Duration::from_secs(1)).is_ok());
    }
}
