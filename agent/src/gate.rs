//! **Pure**: whether a running workload may be replaced now — its update
//! windows and the application's update lock (`Desired::updates`).
//!
//! The engine asks before each replacement by a new revision (never before
//! a first start or a device-level rollback). Time is the best the device
//! knows: its wall clock, or the controller's time learned from signed
//! documents when the wall clock is behind it (a Pi without RTC before NTP).
//! Windows are spans the controller computed for two weeks; past them the
//! device repeats their last week.

use baton_protocol::{UpdatePolicy, Windows};

const WEEK_MS: u64 = 7 * 86_400_000;

/// The application's update lock, in `/run/baton/` inside its container.
pub const LOCK_FILE: &str = "update.lock";

/// What a held replacement is waiting for.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Verdict {
    Go,
    Hold {
        reason: String,
        /// When it expects to go (Unix ms; 0: cannot tell).
        until_ms: u64,
        /// Whether the new image may be downloaded meanwhile.
        download: bool,
    },
}

/// How long a replacement has been held, and by what.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Held {
    /// How long this revision has waited for its window (ms).
    pub waited_ms: u64,
    /// How long the running container has held its lock (None: not held).
    pub lock_ms: Option<u64>,
    /// Whether the new revision's image is on the device already.
    pub image_here: bool,
}

/// Judges one replacement at `now_ms` (Unix ms).
pub fn judge(p: &UpdatePolicy, now_ms: u64, held: Held) -> Verdict {
    let may_download = p.download.as_ref().is_none_or(|w| open(w, now_ms).is_ok());
    if let Some(w) = &p.install {
        if let Err(opens) = open(w, now_ms) {
            let late = p.max_delay_s > 0 && held.waited_ms >= u64::from(p.max_delay_s) * 1000;
            if !late {
                let mut reason = format!("outside its install window ({})", w.text);
                if opens > 0 {
                    reason.push_str(&format!("; opens {}", utc(opens)));
                }
                let until = match p.max_delay_s {
                    0 => opens,
                    d => {
                        let give_up = now_ms + (u64::from(d) * 1000).saturating_sub(held.waited_ms);
                        if opens == 0 || give_up < opens {
                            reason.push_str(&format!("; switches anyway at {} (max_delay)", utc(give_up)));
                        }
                        if opens == 0 {
                            give_up
                        } else {
                            opens.min(give_up)
                        }
                    }
                };
                return Verdict::Hold { reason, until_ms: until, download: may_download };
            }
        }
    }
    if let (Some(lock), Some(held_ms)) = (p.lock, held.lock_ms) {
        let max_ms = u64::from(lock.max_s) * 1000;
        if lock.max_s == 0 || held_ms < max_ms {
            let until = if lock.max_s == 0 { 0 } else { now_ms + (max_ms - held_ms) };
            let limit = if lock.max_s == 0 { String::new() } else { format!(" (honoured for up to {} s)", lock.max_s) };
            let reason = format!("the workload holds its update lock (/run/baton/update.lock){limit}");
            return Verdict::Hold { reason, until_ms: until, download: true };
        }
        if !lock.override_after_max {
            let reason = format!(
                "the workload holds its update lock (/run/baton/update.lock) past its maximum ({} s); still \
                 waiting (override is off)",
                lock.max_s
            );
            return Verdict::Hold { reason, until_ms: 0, download: true };
        }
    }
    // Free to switch, but the image must come first, and only in its window.
    if let (false, Some(w)) = (held.image_here, &p.download) {
        if let Err(opens) = open(w, now_ms) {
            let mut reason = format!("its new image waits for its download window ({})", w.text);
            if opens > 0 {
                reason.push_str(&format!("; opens {}", utc(opens)));
            }
            return Verdict::Hold { reason, until_ms: opens, download: false };
        }
    }
    Verdict::Go
}

/// Ok when `now_ms` falls in one of `w`'s spans; else Err(when the next one
/// opens, 0 if none does). Past the period the spans cover, the last week repeats.
pub fn open(w: &Windows, now_ms: u64) -> Result<(), u64> {
    if w.spans.is_empty() {
        return Err(0);
    }
    // A period of a week or more repeats its last week beyond its end.
    let periodic = w.until_ms >= w.from_ms + WEEK_MS;
    if now_ms >= w.until_ms && !periodic {
        return Err(0);
    }
    // Past the period: the same moment whole weeks earlier, in its last week.
    let shift = if now_ms >= w.until_ms { ((now_ms - w.until_ms) / WEEK_MS + 1) * WEEK_MS } else { 0 };
    let at = now_ms - shift;
    if w.spans.iter().any(|&(s, e)| s <= at && at < e) {
        return Ok(());
    }
    if let Some(s) = w.spans.iter().map(|&(s, _)| s).find(|&s| s > at) {
        return Err(s + shift);
    }
    // None left in the period: the first of its last week, a week on.
    let last_week = w.until_ms.saturating_sub(WEEK_MS);
    match w.spans.iter().map(|&(s, _)| s).find(|&s| s >= last_week) {
        Some(s) if periodic => Err(s + WEEK_MS + shift),
        _ => Err(0),
    }
}

/// `2026-12-02 02:00 UTC`.
pub fn utc(ms: u64) -> String {
    let secs = ms / 1000;
    let (days, rest) = (secs / 86_400, secs % 86_400);
    let (year, month, day) = crate::clock::civil_from_days(days as i64);
    format!("{year:04}-{month:02}-{day:02} {:02}:{:02} UTC", rest / 3600, rest % 3600 / 60)
}

#[cfg(test)]
mod tests {
    use super::*;
    use baton_protocol::UpdateLock;

    const H: u64 = 3_600_000;
    const D: u64 = 24 * H;

    /// Daily 02:00–04:00 over two weeks from day 0.
    fn nightly() -> Windows {
        Windows {
            text: "0 2 * * * for 2h".into(),
            from_ms: 0,
            until_ms: 14 * D,
            spans: (0..14).map(|d| (d * D + 2 * H, d * D + 4 * H)).collect(),
        }
    }

    fn here() -> Held {
        Held { image_here: true, ..Held::default() }
    }

    fn policy() -> UpdatePolicy {
        UpdatePolicy { workload: "web".into(), install: Some(nightly()), ..Default::default() }
    }

    #[test]
    fn windows_open_and_say_when_they_open_next_even_past_the_period() {
        let w = nightly();
        assert_eq!(open(&w, 3 * H), Ok(()));
        assert_eq!(open(&w, 5 * H), Err(D + 2 * H));
        assert_eq!(open(&w, 4 * H), Err(D + 2 * H), "the end is not in the window");
        // Past the two weeks: the last week repeats.
        assert_eq!(open(&w, 30 * D + 3 * H), Ok(()));
        assert_eq!(open(&w, 30 * D + 5 * H), Err(31 * D + 2 * H));
        assert_eq!(open(&w, 14 * D + H), Err(14 * D + 2 * H));
        assert_eq!(open(&Windows { spans: vec![], ..w }, 0), Err(0));
    }

    #[test]
    fn a_replacement_waits_for_its_window_and_no_longer_than_max_delay() {
        let p = policy();
        assert_eq!(judge(&p, 3 * H, here()), Verdict::Go);
        let Verdict::Hold { reason, until_ms, download } = judge(&p, 5 * H, Held::default()) else {
            panic!("held outside the window")
        };
        assert_eq!(until_ms, D + 2 * H);
        assert!(download, "no download window: download at once");
        assert_eq!(reason, "outside its install window (0 2 * * * for 2h); opens 1970-01-02 02:00 UTC");
        // A maximum delay: once waited that long, it goes.
        let p = UpdatePolicy { max_delay_s: 3600, ..policy() };
        let Verdict::Hold { reason, until_ms, .. } = judge(&p, 5 * H, here()) else { panic!("held") };
        assert_eq!(until_ms, 6 * H);
        assert!(reason.ends_with("; switches anyway at 1970-01-01 06:00 UTC (max_delay)"), "{reason}");
        assert_eq!(judge(&p, 6 * H, Held { waited_ms: H, ..here() }), Verdict::Go);
        // A download window closed: the image waits too.
        let p = UpdatePolicy { download: Some(Windows { spans: vec![(0, H)], ..nightly() }), ..policy() };
        assert!(matches!(judge(&p, 5 * H, Held::default()), Verdict::Hold { download: false, .. }));
        // A download window alone: the switch waits only for an image not here yet.
        let p = UpdatePolicy { install: None, ..p };
        let Verdict::Hold { reason, download: false, .. } = judge(&p, 5 * H, Held::default()) else { panic!() };
        assert!(reason.starts_with("its new image waits for its download window"), "{reason}");
        assert_eq!(judge(&p, 5 * H, here()), Verdict::Go);
        assert_eq!(judge(&p, H / 2, Held::default()), Verdict::Go, "in the download window");
    }

    #[test]
    fn locks_hold_up_to_their_maximum_then_are_overridden_or_waited_on() {
        let lock = |max_s, over| UpdatePolicy {
            install: None,
            lock: Some(UpdateLock { max_s, override_after_max: over }),
            ..policy()
        };
        let held = |s: u64| Held { lock_ms: Some(s * 1000), ..here() };
        assert_eq!(judge(&lock(60, true), 0, here()), Verdict::Go, "no lock held");
        assert!(matches!(judge(&lock(60, true), 1000, held(10)), Verdict::Hold { until_ms: 51_000, .. }));
        assert_eq!(judge(&lock(60, true), 0, held(60)), Verdict::Go, "overridden at its maximum");
        let Verdict::Hold { reason, until_ms: 0, .. } = judge(&lock(60, false), 0, held(61)) else { panic!() };
        assert!(reason.contains("past its maximum (60 s); still waiting (override is off)"), "{reason}");
        assert!(matches!(judge(&lock(0, true), 0, held(100_000)), Verdict::Hold { until_ms: 0, .. }));
        // No lock in the policy: a lock file changes nothing.
        assert_eq!(judge(&UpdatePolicy { install: None, ..policy() }, 0, held(5)), Verdict::Go);
        // Outside the window the window speaks first.
        let both = UpdatePolicy { lock: Some(UpdateLock { max_s: 60, override_after_max: true }), ..policy() };
        let Verdict::Hold { reason, .. } = judge(&both, 5 * H, held(5)) else { panic!() };
        assert!(reason.starts_with("outside"), "{reason}");
    }

    #[test]
    fn utc_times_read_as_dates() {
        assert_eq!(utc(0), "1970-01-01 00:00 UTC");
        assert_eq!(utc(1_795_050_000_000), "2026-11-19 01:00 UTC");
        assert_eq!(utc(951_782_400_000), "2000-02-29 00:00 UTC");
    }
}
