//! Warnings that others decide the rate of (garbage on the device's topics,
//! refused documents and commands, a broker that stays down) are logged at
//! most once per period and kind; the rest go to debug, and the next warning
//! says how many were held back. A misbehaving peer cannot fill a device's
//! log (and its SD card).

use std::collections::HashMap;
use std::time::{Duration, Instant};

#[derive(Debug)]
pub struct LogRate {
    every: Duration,
    /// Kind → (last warning, warnings held back since).
    last: HashMap<&'static str, (Instant, u64)>,
}

impl LogRate {
    pub fn new(every: Duration) -> Self {
        Self { every, last: HashMap::new() }
    }

    /// `Some(held back since the last one)` when a warning of `kind` may be
    /// logged now; `None`: log it at debug.
    pub fn allow(&mut self, kind: &'static str, now: Instant) -> Option<u64> {
        match self.last.get_mut(kind) {
            Some((at, held)) if now.duration_since(*at) < self.every => {
                *held += 1;
                None
            }
            Some((at, held)) => {
                *at = now;
                Some(std::mem::take(held))
            }
            None => {
                self.last.insert(kind, (now, 0));
                Some(0)
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn one_warning_per_period_and_kind_then_a_count() {
        let mut rate = LogRate::new(Duration::from_secs(10));
        let t = Instant::now();
        assert_eq!(rate.allow("garbage", t), Some(0));
        for i in 1..100 {
            assert_eq!(rate.allow("garbage", t + Duration::from_millis(i)), None);
        }
        assert_eq!(rate.allow("refused", t), Some(0), "kinds are counted apart");
        assert_eq!(rate.allow("garbage", t + Duration::from_secs(10)), Some(99));
        assert_eq!(rate.allow("garbage", t + Duration::from_secs(11)), None);
    }
}
