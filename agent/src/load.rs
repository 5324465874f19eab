//! **Pure**: the load of autoscaled workloads, as heartbeats carry it.
//!
//! The engine samples each workload the desired document names in
//! `load_reports` at every step ([`LoadSample`]: its cgroup's CPU counter and
//! memory, and what the workload says its load is in `/run/baton/load`) and
//! leaves the newest samples on a [`LoadBoard`]; the link turns them into
//! [`WorkloadLoad`]s at each heartbeat, the CPU as the rate between this
//! heartbeat's sample and the previous one's ([`Rates`]).

use std::collections::BTreeMap;
use std::sync::{Arc, Mutex};

use baton_protocol::WorkloadLoad;

/// Where a workload says how loaded it is: one decimal number, inside its container.
pub const LOAD_FILE: &str = "load";

/// One workload's counters at one engine step.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct LoadSample {
    pub workload: String,
    /// The instance sampled: a new one restarts the CPU counter.
    pub instance: u32,
    /// The cgroup's CPU counter (cumulative).
    pub cpu_ns: u64,
    pub memory_bytes: u64,
    /// The workload's own load × 1000 (None: it says nothing).
    pub load_milli: Option<u64>,
    /// Why what it wrote is no load.
    pub load_error: Option<String>,
    /// Monotonic milliseconds when sampled.
    pub at_ms: u64,
}

/// The engine's newest samples, read by the link at each heartbeat.
pub type LoadBoard = Arc<Mutex<Vec<LoadSample>>>;

/// The newest samples on `board` (empty if a panicking writer poisoned it).
pub fn read(board: &LoadBoard) -> Vec<LoadSample> {
    board.lock().map(|b| b.clone()).unwrap_or_default()
}

/// Replaces the samples on `board`.
pub fn publish(board: &LoadBoard, samples: Vec<LoadSample>) {
    if let Ok(mut b) = board.lock() {
        *b = samples;
    }
}

/// The largest load a workload may say it has.
pub const MAX_LOAD: f64 = 1e12;

/// What a workload wrote as its load: a decimal number from 0 to
/// [`MAX_LOAD`] (surrounding whitespace allowed), × 1000; else why not.
pub fn parse_load(text: &str) -> Result<u64, String> {
    let t = text.trim();
    let shown: String = t.chars().take(24).collect();
    let v: f64 = t.parse().map_err(|_| format!("/run/baton/load: not a number: {shown:?}"))?;
    if !(v.is_finite() && (0.0..=MAX_LOAD).contains(&v)) {
        return Err(format!("/run/baton/load: {shown} is outside 0 to 1e12"));
    }
    Ok((v * 1000.0).round() as u64)
}

/// The previous heartbeat's sample of each workload, to rate CPU between two.
#[derive(Debug, Default)]
pub struct Rates {
    prev: BTreeMap<String, LoadSample>,
}

impl Rates {
    /// The heartbeat's loads from the newest samples; forgets workloads no
    /// longer sampled. CPU is None for a workload's first sample, for a new
    /// instance (its counter restarted) and when no time passed.
    pub fn loads(&mut self, samples: &[LoadSample]) -> Vec<WorkloadLoad> {
        let mut out = Vec::with_capacity(samples.len());
        let mut next = BTreeMap::new();
        for s in samples {
            let cpu_milli = self.prev.get(&s.workload).and_then(|p| {
                let same = p.instance == s.instance && s.cpu_ns >= p.cpu_ns && s.at_ms > p.at_ms;
                // ns per ms / 1000 = thousandths of a CPU.
                same.then(|| ((s.cpu_ns - p.cpu_ns) / (s.at_ms - p.at_ms) / 1000).min(u64::from(u32::MAX)) as u32)
            });
            // The same sample again (no engine step since) stays the base.
            let base = match self.prev.get(&s.workload) {
                Some(p) if p.instance == s.instance && p.at_ms >= s.at_ms => p.clone(),
                _ => s.clone(),
            };
            out.push(WorkloadLoad {
                workload: s.workload.clone(),
                cpu_milli,
                memory_bytes: s.memory_bytes,
                load_milli: s.load_milli,
                load_error: s.load_error.clone(),
            });
            next.insert(s.workload.clone(), base);
        }
        self.prev = next;
        out
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn s(instance: u32, cpu_ms: u64, at_ms: u64) -> LoadSample {
        LoadSample {
            workload: "web".into(),
            instance,
            cpu_ns: cpu_ms * 1_000_000,
            memory_bytes: 1 << 20,
            load_milli: Some(2500),
            load_error: None,
            at_ms,
        }
    }

    #[test]
    fn cpu_is_the_rate_between_two_heartbeats() {
        let mut r = Rates::default();
        let first = r.loads(&[s(1, 0, 10_000)]);
        assert_eq!((first[0].cpu_milli, first[0].memory_bytes, first[0].load_milli), (None, 1 << 20, Some(2500)));
        // 7.5 s of CPU over 15 s: half a CPU.
        assert_eq!(r.loads(&[s(1, 7_500, 25_000)])[0].cpu_milli, Some(500));
        // Two CPUs busy.
        assert_eq!(r.loads(&[s(1, 37_500, 40_000)])[0].cpu_milli, Some(2000));
    }

    #[test]
    fn a_new_instance_or_no_time_gives_no_rate_and_gone_workloads_are_forgotten() {
        let mut r = Rates::default();
        r.loads(&[s(1, 100_000, 10_000)]);
        assert_eq!(r.loads(&[s(2, 10, 20_000)])[0].cpu_milli, None, "the counter restarted with the instance");
        assert_eq!(r.loads(&[s(2, 5_010, 30_000)])[0].cpu_milli, Some(500));
        // No engine step since (the same sample again): no rate; the next rates from it.
        assert_eq!(r.loads(&[s(2, 5_010, 30_000)])[0].cpu_milli, None);
        assert_eq!(r.loads(&[s(2, 15_010, 40_000)])[0].cpu_milli, Some(1000));
        assert!(r.loads(&[]).is_empty());
        assert_eq!(r.loads(&[s(2, 20_000, 50_000)])[0].cpu_milli, None, "forgotten once not sampled");
    }

    #[test]
    fn loads_are_decimal_numbers() {
        assert_eq!(parse_load("12.5\n"), Ok(12_500));
        assert_eq!(parse_load(" 3 "), Ok(3000));
        assert_eq!(parse_load("0"), Ok(0));
        assert_eq!(parse_load("1e12"), Ok(1_000_000_000_000_000));
        assert_eq!(parse_load("1e30"), Err("/run/baton/load: 1e30 is outside 0 to 1e12".into()));
        assert_eq!(parse_load("12 requests"), Err("/run/baton/load: not a number: \"12 requests\"".into()));
        for bad in ["", "-1", "NaN", "inf", "0x10"] {
            assert!(parse_load(bad).is_err(), "{bad:?}");
        }
    }
}
