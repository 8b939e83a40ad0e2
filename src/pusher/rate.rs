//! Rate limits: so many a second, with at most a second's worth saved up (a client quiet for a
//! while may send a burst of one second's budget, never more).
//!
//! The generic cell rate algorithm (GCRA), the one the `governor` crate implements: a single
//! "theoretical arrival time" per limit, moved forward by each admitted request and compared
//! with `now`. One atomic word, so the same limit serves one connection (uncontended) or one
//! app across every worker of the node (a compare-and-swap, no lock). `now` is an input, so
//! the limits are tested with a virtual clock, as the sessions are.

use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

/// The most that may be saved up: a second's worth.
const BURST: Duration = Duration::from_secs(1);

/// One rate limit's state.
#[derive(Debug)]
pub struct RateLimit {
    /// The origin of the arrival times.
    base: Instant,
    /// When the budget will be back to full, in nanoseconds after `base`.
    full_at_ns: AtomicU64,
}

impl RateLimit {
    /// A full budget as of `now`.
    pub fn new(now: Instant) -> Self {
        RateLimit { base: now, full_at_ns: AtomicU64::new(0) }
    }

    /// Takes `n` from a budget of `per_sec` a second, if they are all there; otherwise takes
    /// nothing and returns false.
    pub fn allow(&self, n: u32, per_sec: u32, now: Instant) -> bool {
        let burst = BURST.as_nanos() as u64;
        let cost = (burst / u64::from(per_sec.max(1))).saturating_mul(u64::from(n));
        let now = now.saturating_duration_since(self.base).as_nanos() as u64;
        let mut full_at = self.full_at_ns.load(Ordering::Relaxed);
        loop {
            let after = full_at.max(now).saturating_add(cost);
            if after - now > burst {
                return false;
            }
            match self.full_at_ns.compare_exchange_weak(full_at, after, Ordering::Relaxed, Ordering::Relaxed) {
                Ok(_) => return true,
                Err(moved) => full_at = moved,
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_seconds_worth_at_once_then_at_the_rate() {
        let t0 = Instant::now();
        let limit = RateLimit::new(t0);
        assert!((0..10).all(|_| limit.allow(1, 10, t0)));
        assert!(!limit.allow(1, 10, t0), "the eleventh in the same instant");
        let later = t0 + Duration::from_millis(100);
        assert!(limit.allow(1, 10, later) && !limit.allow(1, 10, later), "one more per tenth of a second");
        let quiet = t0 + Duration::from_secs(60);
        assert_eq!((0..20).filter(|_| limit.allow(1, 10, quiet)).count(), 10, "never more than a second saved up");
    }

    #[test]
    fn a_batch_is_taken_whole_or_not_at_all() {
        let t0 = Instant::now();
        let limit = RateLimit::new(t0);
        assert!(limit.allow(7, 10, t0));
        assert!(!limit.allow(4, 10, t0), "only three are left");
        assert!(limit.allow(3, 10, t0));
        assert!(!limit.allow(11, 10, t0 + Duration::from_secs(9)), "more than a second's worth never fits");
    }

    #[test]
    fn workers_sharing_a_limit_admit_the_budget_and_no_more() {
        let t0 = Instant::now();
        let limit = std::sync::Arc::new(RateLimit::new(t0));
        let admitted: usize = (0..4)
            .map(|_| {
                let limit = limit.clone();
                std::thread::spawn(move || (0..1000).filter(|_| limit.allow(1, 500, t0)).count())
            })
            .map(|thread| thread.join().expect("no panic"))
            .sum();
        assert_eq!(admitted, 500);
    }
}
