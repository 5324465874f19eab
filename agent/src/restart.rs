//! When to restart a container that exited: the restart policy and its
//! capped exponential backoff. Pure: exit records and times in, a delay out.
//! There is no terminal give-up state: past the cap, it keeps trying at the cap.

use std::time::Duration;

use baton_protocol::spec::RestartPolicy;

use crate::runtime::ExitStatus;

/// The first restart waits this long; each consecutive failure doubles it.
pub const DEFAULT_BASE: Duration = Duration::from_secs(1);
/// Default cap of the backoff (`backoff_cap_s = 0` in a spec).
pub const DEFAULT_CAP: Duration = Duration::from_secs(300);
/// A container that ran at least this long counts as healthy again: its next
/// failure starts the backoff from the base (as Kubernetes does after 10 min).
pub const STABLE_AFTER: Duration = Duration::from_secs(600);

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Backoff {
    pub base: Duration,
    pub cap: Duration,
}

impl Default for Backoff {
    fn default() -> Self {
        Self { base: DEFAULT_BASE, cap: DEFAULT_CAP }
    }
}

impl Backoff {
    /// The spec's cap, or the default for 0.
    pub fn from_spec_cap(cap_s: u32) -> Self {
        let cap = if cap_s == 0 { DEFAULT_CAP } else { Duration::from_secs(u64::from(cap_s)) };
        Self { base: DEFAULT_BASE.min(cap), cap }
    }

    /// Delay before restart number `failures + 1` of a run of failures.
    pub fn delay(&self, failures: u32) -> Duration {
        self.base.saturating_mul(1u32 << failures.min(24)).min(self.cap)
    }
}

/// What to do about an exited container.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Decision {
    /// Start a new instance after this delay; `failures` is the new run length.
    Restart { after: Duration, failures: u32 },
    /// The policy says it is done (never, or on-failure after success).
    Done,
}

/// `failures` counts consecutive quick exits before this one.
pub fn decide(policy: RestartPolicy, exit: &ExitStatus, failures: u32, backoff: Backoff) -> Decision {
    let failed = exit.code != 0 || exit.oom_killed;
    let wanted = match policy {
        RestartPolicy::Always => true,
        RestartPolicy::OnFailure => failed,
        RestartPolicy::Never => false,
    };
    if !wanted {
        return Decision::Done;
    }
    let ran_for = Duration::from_millis(exit.finished_at_ms.saturating_sub(exit.started_at_ms));
    let failures = if ran_for >= STABLE_AFTER.min(backoff.cap.max(backoff.base)) { 0 } else { failures };
    Decision::Restart { after: backoff.delay(failures), failures: failures.saturating_add(1) }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn exit(code: i32, ran_ms: u64) -> ExitStatus {
        ExitStatus { code, signal: None, oom_killed: false, started_at_ms: 1_000, finished_at_ms: 1_000 + ran_ms }
    }

    #[test]
    fn policy_table() {
        let b = Backoff::default();
        let cases = [
            (RestartPolicy::Always, 0, true),
            (RestartPolicy::Always, 1, true),
            (RestartPolicy::OnFailure, 0, false),
            (RestartPolicy::OnFailure, 3, true),
            (RestartPolicy::Never, 1, false),
            (RestartPolicy::Never, 0, false),
        ];
        for (policy, code, restarts) in cases {
            let d = decide(policy, &exit(code, 10), 0, b);
            assert_eq!(matches!(d, Decision::Restart { .. }), restarts, "{policy:?} exit {code}");
        }
        let oom = ExitStatus { oom_killed: true, ..exit(0, 10) };
        assert!(matches!(decide(RestartPolicy::OnFailure, &oom, 0, b), Decision::Restart { .. }));
    }

    #[test]
    fn backoff_doubles_to_the_cap_and_never_gives_up() {
        let b = Backoff::from_spec_cap(0);
        let mut failures = 0;
        let mut delays = Vec::new();
        for _ in 0..40 {
            match decide(RestartPolicy::Always, &exit(1, 50), failures, b) {
                Decision::Restart { after, failures: f } => {
                    delays.push(after.as_secs());
                    failures = f;
                }
                Decision::Done => panic!("gave up after {} restarts", delays.len()),
            }
        }
        assert_eq!(&delays[..10], &[1, 2, 4, 8, 16, 32, 64, 128, 256, 300]);
        assert!(delays[10..].iter().all(|d| *d == 300));
    }

    #[test]
    fn a_long_healthy_run_resets_the_backoff() {
        let b = Backoff::default();
        assert_eq!(
            decide(RestartPolicy::Always, &exit(1, 601_000), 9, b),
            Decision::Restart { after: Duration::from_secs(1), failures: 1 }
        );
        // With a small cap, running past the cap is enough.
        let small = Backoff::from_spec_cap(5);
        assert_eq!(
            decide(RestartPolicy::Always, &exit(1, 6_000), 9, small),
            Decision::Restart { after: Duration::from_secs(1), failures: 1 }
        );
        assert_eq!(
            decide(RestartPolicy::Always, &exit(1, 100), 9, small),
            Decision::Restart { after: Duration::from_secs(5), failures: 10 }
        );
    }
}
