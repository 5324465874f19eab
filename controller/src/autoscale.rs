//! **Pure**: autoscaling of `replicas` workloads from the load their
//! instances report in heartbeats (`Heartbeat::loads`).
//!
//! [`recommend`] turns one moment's samples into a replica count, per
//! target: CPU and memory as a share of the workload's requests, or the
//! load the workload says it has per instance. As Kubernetes' HPA does: the
//! count that brings the average to the target (`ceil(sum / target)`),
//! nothing within 10 % of it, the highest over targets; instances placed but
//! not reporting (starting, away) count as idle when scaling up and as at
//! target when scaling down, so a scale-up still starting does not undo
//! itself. [`Scaler::step`] then decides, so that it never flaps:
//! scale-ups at once (at most ×2 or +4 per decision), scale-downs only to
//! the highest recommendation of the last `window` (and only once it has
//! watched a whole window: a restarted controller does not scale down on
//! its first sample), no decision within `cooldown` of the last one, and
//! always within `min..=max`.

use std::collections::VecDeque;

use crate::fleet::Millis;

/// Recommendations within this share of the target change nothing.
pub const TOLERANCE: f64 = 0.1;

/// A workload's autoscaling settings, validated (`autoscale:` in its manifest).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Policy {
    pub min: u32,
    pub max: u32,
    /// Target CPU use per instance, % of the workload's `resources.cpu`.
    pub cpu_percent: Option<u32>,
    /// Target memory use per instance, % of its `resources.memory`.
    pub memory_percent: Option<u32>,
    /// Target of the load the workload says it has, per instance, × 1000.
    pub load_milli: Option<u64>,
    /// Scale-downs go only to the highest recommendation of this long.
    pub window_ms: Millis,
    /// No decision within this long of the last one.
    pub cooldown_ms: Millis,
}

/// What one instance requests: what the CPU and memory targets are shares of.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct Requests {
    pub cpu_milli: u32,
    pub memory_bytes: u64,
}

/// One instance's load, from its device's last heartbeat.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct Sample {
    pub cpu_milli: Option<u32>,
    pub memory_bytes: u64,
    pub load_milli: Option<u64>,
}

/// A replica count and why.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Recommendation {
    pub replicas: u32,
    pub reason: String,
}

/// The replicas `samples` call for with `current` placed, clamped to the
/// policy's range; None when no target has a sample to judge by.
pub fn recommend(p: &Policy, req: Requests, current: u32, samples: &[Sample]) -> Option<Recommendation> {
    let current = current.max(1);
    let cpu = p.cpu_percent.filter(|_| req.cpu_milli > 0).map(|pct| {
        let used: Vec<f64> =
            samples.iter().filter_map(|s| s.cpu_milli).map(|m| f64::from(m) / f64::from(req.cpu_milli)).collect();
        ("cpu", used, f64::from(pct) / 100.0, true)
    });
    let memory = p.memory_percent.filter(|_| req.memory_bytes > 0).map(|pct| {
        let used: Vec<f64> = samples.iter().map(|s| s.memory_bytes as f64 / req.memory_bytes as f64).collect();
        ("memory", used, f64::from(pct) / 100.0, true)
    });
    let load = p.load_milli.filter(|t| *t > 0).map(|target| {
        let used: Vec<f64> = samples.iter().filter_map(|s| s.load_milli).map(|l| l as f64 / 1000.0).collect();
        ("load", used, target as f64 / 1000.0, false)
    });
    let mut best: Option<Recommendation> = None;
    for (metric, used, target, percent) in [cpu, memory, load].into_iter().flatten() {
        if used.is_empty() {
            continue;
        }
        let n = used.len() as u32;
        let sum: f64 = used.iter().sum();
        let ratio = sum / f64::from(n) / target;
        let mut replicas = current;
        if (ratio - 1.0).abs() > TOLERANCE {
            // Instances not reporting: idle for a scale-up, at target for a scale-down.
            let missing = f64::from(current.saturating_sub(n));
            let adjusted = if ratio > 1.0 { sum } else { sum + missing * target };
            let whole = adjusted / (f64::from(current) * target);
            if (whole - 1.0).abs() > TOLERANCE && (whole > 1.0) == (ratio > 1.0) {
                replicas = (adjusted / target - 1e-9).ceil().max(1.0) as u32;
            }
        }
        let shown = |v: f64| if percent { format!("{:.0}%", v * 100.0) } else { format!("{v:.2}") };
        let reason = format!(
            "{metric} {} per instance (target {}) over {n} of {current} instances",
            shown(sum / f64::from(n)),
            shown(target)
        );
        if best.as_ref().is_none_or(|b| replicas > b.replicas) {
            best = Some(Recommendation { replicas, reason });
        }
    }
    best.map(|mut b| {
        b.replicas = b.replicas.clamp(p.min, p.max);
        b
    })
}

/// A decision: from how many replicas to how many, when and why.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Decision {
    pub at_ms: Millis,
    pub from: u32,
    pub to: u32,
    pub reason: String,
}

/// One workload's autoscaler: what it recommended lately, its last decision.
/// In memory only; a restarted controller starts watching afresh.
#[derive(Debug, Clone, Default)]
pub struct Scaler {
    /// Recommendations as a step function: (since when, replicas), oldest
    /// first, the first one in force at the start of the window.
    history: VecDeque<(Millis, u32)>,
    /// When this scaler first saw a recommendation.
    watching_since: Option<Millis>,
    pub last: Option<Decision>,
    /// The latest recommendation, for `describe`.
    pub recommended: Option<Recommendation>,
}

impl Scaler {
    /// Takes this moment's recommendation (None: no data) and decides
    /// whether `current` replicas must change; a scale-down removes at most
    /// `max_down` (a disruption budget's allowance).
    pub fn step(
        &mut self,
        p: &Policy,
        current: u32,
        rec: Option<Recommendation>,
        max_down: u32,
        now: Millis,
    ) -> Option<Decision> {
        // Outside the range (the policy changed, or the count was set before it): into it at once.
        if current < p.min || current > p.max {
            let to = current.clamp(p.min, p.max);
            let reason = format!("{current} is outside autoscale's range {}..={}", p.min, p.max);
            return Some(self.decide(current, to, reason, now));
        }
        let rec = rec?;
        let watching_since = *self.watching_since.get_or_insert(now);
        if self.history.back().is_none_or(|&(_, r)| r != rec.replicas) {
            self.history.push_back((now, rec.replicas));
        }
        // The oldest entry stays while it was still in force at the window's start.
        let start = now.saturating_sub(p.window_ms);
        while self.history.len() > 1 && self.history[1].0 <= start {
            self.history.pop_front();
        }
        self.recommended = Some(rec.clone());
        if self.last.as_ref().is_some_and(|d| now < d.at_ms + p.cooldown_ms) {
            return None;
        }
        if rec.replicas > current {
            let to = rec.replicas.min(current.saturating_mul(2).max(current + 4));
            return Some(self.decide(current, to, rec.reason, now));
        }
        let highest = self.history.iter().map(|&(_, r)| r).max().unwrap_or(rec.replicas);
        if highest < current && now >= watching_since + p.window_ms {
            let to = highest.max(current.saturating_sub(max_down.max(1)));
            let mut reason = format!("{} (the highest recommendation in {} s)", rec.reason, p.window_ms / 1000);
            if to > highest {
                reason.push_str(&format!("; at most {max_down} at a time (disruption budget)"));
            }
            return Some(self.decide(current, to, reason, now));
        }
        None
    }

    fn decide(&mut self, from: u32, to: u32, reason: String, now: Millis) -> Decision {
        let d = Decision { at_ms: now, from, to, reason };
        self.last = Some(d.clone());
        d
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn policy() -> Policy {
        Policy {
            min: 2,
            max: 10,
            cpu_percent: Some(50),
            memory_percent: None,
            load_milli: None,
            window_ms: 60_000,
            cooldown_ms: 10_000,
        }
    }

    const REQ: Requests = Requests { cpu_milli: 1000, memory_bytes: 100 << 20 };

    fn cpu(milli: &[u32]) -> Vec<Sample> {
        milli.iter().map(|&m| Sample { cpu_milli: Some(m), memory_bytes: 10 << 20, load_milli: None }).collect()
    }

    fn rec(samples: &[Sample], current: u32) -> Option<u32> {
        recommend(&policy(), REQ, current, samples).map(|r| r.replicas)
    }

    #[test]
    fn recommendations_bring_the_average_to_the_target() {
        let table: &[(&[u32], u32, Option<u32>)] = &[
            // Twice the target on 2: 4.
            (&[1000, 1000], 2, Some(4)),
            // Within 10 % of it: unchanged.
            (&[540, 460], 2, Some(2)),
            // A quarter of the target on 8: 2 (the minimum).
            (&[125; 8], 8, Some(2)),
            // Far beyond: capped by max.
            (&[5000; 4], 4, Some(10)),
            // Idle: the minimum.
            (&[0, 0, 0], 3, Some(2)),
            // No CPU rate yet (first samples): no data.
            (&[], 3, None),
        ];
        for (milli, current, want) in table {
            assert_eq!(rec(&cpu(milli), *current), *want, "{milli:?} on {current}");
        }
        let r = recommend(&policy(), REQ, 2, &cpu(&[1000, 1000])).unwrap();
        assert_eq!(r.reason, "cpu 100% per instance (target 50%) over 2 of 2 instances");
    }

    #[test]
    fn instances_not_reporting_hold_a_scale_down_and_are_idle_for_a_scale_up() {
        // 6 placed, 2 report far below target: the 4 starting ones count as at target.
        assert_eq!(rec(&cpu(&[100, 100]), 6), Some(5));
        // 6 placed, 2 report at 3× target: the others idle, 6 is about right.
        assert_eq!(rec(&cpu(&[1500, 1500]), 6), Some(6));
        // …and well above even then: 12, capped by max.
        assert_eq!(rec(&cpu(&[3000, 3000]), 6), Some(10));
    }

    #[test]
    fn the_highest_target_wins_and_targets_without_requests_are_skipped() {
        let p = Policy { memory_percent: Some(50), load_milli: Some(10_000), ..policy() };
        let s = [Sample { cpu_milli: Some(500), memory_bytes: 100 << 20, load_milli: Some(40_000) }; 2];
        // CPU at target (2), memory at 2× (4), load at 4× (8).
        let r = recommend(&p, REQ, 2, &s).unwrap();
        assert_eq!(r.replicas, 8);
        assert!(r.reason.starts_with("load 40.00 per instance (target 10.00)"), "{}", r.reason);
        // No CPU request: CPU is no target; memory alone says 4.
        let p = Policy { load_milli: None, ..p };
        assert_eq!(recommend(&p, Requests { cpu_milli: 0, ..REQ }, 2, &s).unwrap().replicas, 4);
    }

    fn r(replicas: u32) -> Option<Recommendation> {
        Some(Recommendation { replicas, reason: "test".into() })
    }

    #[test]
    fn scale_ups_are_at_once_but_bounded_and_cooled_down() {
        let p = policy();
        let mut s = Scaler::default();
        let d = s.step(&p, 2, r(10), u32::MAX, 0).unwrap();
        assert_eq!((d.from, d.to), (2, 6), "at most +4 (or ×2) per decision");
        assert_eq!(s.step(&p, 6, r(10), u32::MAX, 5_000), None, "cooling down");
        assert_eq!(s.step(&p, 6, r(10), u32::MAX, 10_000).map(|d| d.to), Some(10));
        assert_eq!(s.step(&p, 10, None, u32::MAX, 30_000), None, "no data: nothing");
    }

    #[test]
    fn scale_downs_wait_for_a_whole_window_of_lower_recommendations() {
        let p = policy();
        let mut s = Scaler::default();
        // Watching from 0 at 6; load drops at 20 s.
        assert_eq!(s.step(&p, 6, r(6), u32::MAX, 0), None);
        assert_eq!(s.step(&p, 6, r(3), u32::MAX, 20_000), None);
        assert_eq!(s.step(&p, 6, r(3), u32::MAX, 59_000), None, "6 was recommended within the window");
        // A brief spike resets nothing but is remembered.
        assert_eq!(
            s.step(&p, 6, r(4), u32::MAX, 70_000),
            None,
            "the 6 of before 20 s is still in force at the window's start"
        );
        let d = s.step(&p, 6, r(3), u32::MAX, 80_001).unwrap();
        assert_eq!((d.from, d.to), (6, 4), "the highest of the window (the spike's 4)");
        // The spike's 4 was in force until 80 s: 3 once that left the window.
        assert_eq!(s.step(&p, 4, r(3), u32::MAX, 131_000), None);
        assert_eq!(s.step(&p, 4, r(3), u32::MAX, 140_002).map(|d| d.to), Some(3));
    }

    #[test]
    fn a_disruption_budget_bounds_each_scale_down() {
        let p = Policy { cooldown_ms: 0, ..policy() };
        let mut s = Scaler::default();
        assert_eq!(s.step(&p, 10, r(2), 2, 0), None);
        let d = s.step(&p, 10, r(2), 2, 60_000).unwrap();
        assert_eq!((d.from, d.to), (10, 8));
        assert!(d.reason.ends_with("at most 2 at a time (disruption budget)"), "{}", d.reason);
        assert_eq!(s.step(&p, 8, r(2), 2, 60_001).map(|d| d.to), Some(6));
    }

    #[test]
    fn a_fresh_scaler_does_not_scale_down_before_it_watched_a_window() {
        let p = policy();
        let mut s = Scaler::default();
        assert_eq!(s.step(&p, 8, r(2), u32::MAX, 1_000_000), None);
        assert_eq!(s.step(&p, 8, r(2), u32::MAX, 1_059_999), None);
        assert_eq!(s.step(&p, 8, r(2), u32::MAX, 1_060_000).map(|d| d.to), Some(2));
    }

    #[test]
    fn counts_outside_the_range_are_brought_into_it() {
        let p = policy();
        let mut s = Scaler::default();
        assert_eq!(s.step(&p, 1, None, u32::MAX, 0).map(|d| d.to), Some(2));
        assert_eq!(s.step(&p, 12, None, u32::MAX, 0).map(|d| d.to), Some(10));
    }

    /// A load wave, sampled every 15 s: decisions follow it without flapping
    /// on noise around the target.
    #[test]
    fn a_noisy_wave_makes_few_decisions() {
        let p = Policy { window_ms: 120_000, cooldown_ms: 30_000, ..policy() };
        let mut s = Scaler::default();
        let mut current = 2u32;
        let mut decisions = Vec::new();
        for step in 0..200u64 {
            let now = step * 15_000;
            // Demand: 1 CPU, then 4 from 10 min to 25 min, then 1; ±15 % noise.
            let demand = if (40..100).contains(&step) { 4000.0 } else { 1000.0 };
            let noise = if step % 2 == 0 { 1.15 } else { 0.85 };
            let each = (demand * noise / f64::from(current)) as u32;
            let rec = recommend(&p, REQ, current, &cpu(&vec![each; current as usize]));
            if let Some(d) = s.step(&p, current, rec, u32::MAX, now) {
                decisions.push((step, d.from, d.to));
                current = d.to;
            }
        }
        // 1 CPU ±15 % at a 50 % target: 2–3 instances; the window keeps the higher.
        assert_eq!(current, 3, "{decisions:?}");
        // 4 CPUs: 8 (9 with the noise), reached in two steps up (+4 at most each).
        let peak = decisions.iter().map(|&(_, _, t)| t).max().unwrap_or(0);
        assert!((8..=10).contains(&peak), "{decisions:?}");
        assert!(decisions.len() <= 6, "a couple of steps each way, no flapping: {decisions:?}");
    }
}
