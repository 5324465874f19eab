//! Exponential backoff with jitter, capped, never giving up.
//!
//! Used for broker reconnects (and later for container restarts): a fleet
//! that lost its broker must not reconnect in lockstep when it comes back,
//! so each delay is drawn uniformly from the upper half of the current step.

use std::time::Duration;

#[derive(Debug, Clone)]
pub struct Backoff {
    base: Duration,
    cap: Duration,
    attempt: u32,
    rng: u64,
}

impl Backoff {
    pub fn new(base: Duration, cap: Duration, seed: u64) -> Self {
        Self { base, cap, attempt: 0, rng: seed | 1 }
    }

    /// A backoff seeded from the clock and pid, so devices do not share a sequence.
    pub fn with_entropy(base: Duration, cap: Duration) -> Self {
        let nanos =
            std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map_or(0, |d| d.as_nanos() as u64);
        Self::new(base, cap, nanos ^ (u64::from(std::process::id()) << 32))
    }

    /// The delay before the next attempt: in [step/2, step], step = min(cap, base·2^n).
    pub fn next_delay(&mut self) -> Duration {
        let step = self.base.saturating_mul(1u32 << self.attempt.min(20)).min(self.cap);
        self.attempt = self.attempt.saturating_add(1);
        let half = step / 2;
        let jitter_ns = self.next_rand() % (half.as_nanos() as u64 + 1);
        half + Duration::from_nanos(jitter_ns)
    }

    /// Called after a success: the next failure starts from `base` again.
    pub fn reset(&mut self) {
        self.attempt = 0;
    }

    fn next_rand(&mut self) -> u64 {
        // xorshift64*: plenty for jitter, and no dependency.
        let mut x = self.rng;
        x ^= x >> 12;
        x ^= x << 25;
        x ^= x >> 27;
        self.rng = x;
        x.wrapping_mul(0x2545_f491_4f6c_dd1d)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn delays_grow_stay_within_bounds_and_cap() {
        let (base, cap) = (Duration::from_millis(500), Duration::from_secs(60));
        let mut b = Backoff::new(base, cap, 42);
        for n in 0..40u32 {
            let step = base.saturating_mul(1 << n.min(20)).min(cap);
            let d = b.next_delay();
            assert!(d >= step / 2 && d <= step, "attempt {n}: {d:?} outside [{:?}, {step:?}]", step / 2);
        }
    }

    #[test]
    fn reset_starts_over_and_seeds_differ() {
        let mut b = Backoff::new(Duration::from_secs(1), Duration::from_secs(300), 7);
        for _ in 0..10 {
            b.next_delay();
        }
        b.reset();
        assert!(b.next_delay() <= Duration::from_secs(1));
        let mut a = Backoff::new(Duration::from_secs(10), Duration::from_secs(300), 1);
        let mut c = Backoff::new(Duration::from_secs(10), Duration::from_secs(300), 2);
        let (xs, ys): (Vec<_>, Vec<_>) = (0..5).map(|_| (a.next_delay(), c.next_delay())).unzip();
        assert_ne!(xs, ys, "two devices drew the same jitter");
    }
}
