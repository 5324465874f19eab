//! The controller's time as this device knows it. Pure: the caller passes
//! its monotonic clock.
//!
//! A Raspberry Pi has no real-time clock: after boot its wall clock is
//! wherever fake-hwclock left it (or 1970) until NTP syncs, which on an
//! isolated network may be never. So command deadlines are not judged
//! against the device's wall clock but against the controller's time, learned
//! from the signed timestamps the controller puts in commands and documents
//! (protocol 1.4): the newest one seen, plus the monotonic time elapsed since.
//! That estimate only moves forward and never runs ahead of the controller
//! (it is a signed time plus real elapsed time), so a command is judged
//! fresh or stale the same way whatever the device's wall clock says, and a
//! captured command cannot be replayed once the controller's time is past
//! its deadline.

use baton_protocol::{Command, CommandAction};

/// How far past its issue time a command's deadline may be (the controller's
/// longest is a 12 h log follow): it bounds how long an id must be remembered.
pub const MAX_COMMAND_WINDOW_MS: u64 = 24 * 3600 * 1000;

#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct ControllerClock {
    /// The newest controller time learned, and the monotonic time it was learned at.
    anchor: Option<(u64, u64)>,
}

impl ControllerClock {
    /// A clock that starts from `floor_ms` (the newest controller time this
    /// device saved before it restarted; 0: none). A lower bound: the
    /// controller's time went on while the device was down.
    pub fn starting_at(floor_ms: u64, mono_ms: u64) -> Self {
        Self { anchor: (floor_ms > 0).then_some((floor_ms, mono_ms)) }
    }

    /// The controller's time now, as far as this device knows (None: it has
    /// never heard a signed time).
    pub fn now(&self, mono_ms: u64) -> Option<u64> {
        self.anchor.map(|(at, mono)| at.saturating_add(mono_ms.saturating_sub(mono)))
    }

    /// Learns a signed controller time; only moves the clock forward.
    pub fn learn(&mut self, controller_ms: u64, mono_ms: u64) {
        if controller_ms > self.now(mono_ms).unwrap_or(0) {
            self.anchor = Some((controller_ms, mono_ms));
        }
    }

    /// Whether `cmd` may be carried out now; `issued_ms` is its signed issue
    /// time (None: a controller older than 1.4, whose commands are judged by
    /// the device's wall clock as before). Returns the time the command's
    /// deadline was judged against (what its id is remembered by), and learns
    /// the command's time.
    pub fn judge(&mut self, cmd: &Command, issued_ms: Option<u64>, mono_ms: u64, wall_ms: u64) -> Result<u64, String> {
        let cancel = matches!(cmd.action, CommandAction::Cancel { .. });
        let Some(issued) = issued_ms else {
            if cancel && cmd.deadline_ms == 0 {
                return Ok(wall_ms);
            }
            if cmd.deadline_ms == 0 || cmd.deadline_ms > wall_ms.saturating_add(MAX_COMMAND_WINDOW_MS) {
                return Err(format!("deadline {} is not within 24 h of this device's clock", cmd.deadline_ms));
            }
            if cmd.deadline_ms < wall_ms {
                return Err(format!(
                    "past its deadline by this device's clock ({} ms late)",
                    wall_ms - cmd.deadline_ms
                ));
            }
            return Ok(wall_ms);
        };
        let now = self.now(mono_ms).unwrap_or(issued).max(issued);
        if !(cancel && cmd.deadline_ms == 0) {
            if cmd.deadline_ms < issued || cmd.deadline_ms - issued > MAX_COMMAND_WINDOW_MS {
                return Err(format!("deadline {} is not within 24 h of its issue time {issued}", cmd.deadline_ms));
            }
            if cmd.deadline_ms < now {
                return Err(format!("past its deadline by the controller's time ({} ms late)", now - cmd.deadline_ms));
            }
        }
        self.learn(issued, mono_ms);
        Ok(now)
    }
}

/// (year, month, day) of the day `days` after 1970-01-01, proleptic
/// Gregorian (Howard Hinnant's civil-from-days).
pub fn civil_from_days(days: i64) -> (i64, i64, i64) {
    let z = days + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z.rem_euclid(146_097);
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let day = doy - (153 * mp + 2) / 5 + 1;
    let month = if mp < 10 { mp + 3 } else { mp - 9 };
    (yoe + era * 400 + i64::from(month <= 2), month, day)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn cmd(deadline_ms: u64, action: CommandAction) -> Command {
        Command {
            id: 1,
            deadline_ms,
            action,
            key: Vec::new(),
            signature: Vec::new(),
            issued_ms: 0,
            time_signature: Vec::new(),
        }
    }

    const DAY: u64 = 24 * 3600 * 1000;
    const T: u64 = 1_800_000_000_000;

    #[test]
    fn a_device_clock_days_off_either_way_changes_nothing() {
        for wall in [T - 3 * DAY, T, T + 3 * DAY, 0] {
            let mut clock = ControllerClock::default();
            let exec = cmd(T + 60_000, CommandAction::Diagnostics);
            assert_eq!(clock.judge(&exec, Some(T), 0, wall), Ok(T), "wall clock {wall}");
            // 2 minutes later (monotonic), a command issued at T: expired by the controller's time.
            assert!(clock.judge(&exec, Some(T), 120_000, wall).unwrap_err().contains("past its deadline"));
            // A fresh one issued then is fine.
            let fresh = cmd(T + 180_000, CommandAction::Diagnostics);
            assert_eq!(clock.judge(&fresh, Some(T + 120_000), 120_000, wall), Ok(T + 120_000));
        }
    }

    #[test]
    fn the_estimate_only_moves_forward_and_survives_a_restart_as_a_floor() {
        let mut clock = ControllerClock::default();
        assert_eq!(clock.now(5), None);
        clock.learn(T, 1_000);
        assert_eq!(clock.now(3_000), Some(T + 2_000));
        clock.learn(T - DAY, 3_000); // an old signed time (a stale retained document)
        assert_eq!(clock.now(3_000), Some(T + 2_000));
        // A restarted agent starts from what it saved: a lower bound.
        let restarted = ControllerClock::starting_at(T + 2_000, 0);
        assert_eq!(restarted.now(10), Some(T + 2_010));
        // An old captured command replayed after the restart is refused.
        let mut restarted = restarted;
        let old = cmd(T + 1_000, CommandAction::Restart { workload: "w".into() });
        assert!(restarted.judge(&old, Some(T - 5_000), 10, 0).unwrap_err().contains("past its deadline"));
    }

    #[test]
    fn deadlines_are_bounded_and_older_controllers_keep_the_old_rules() {
        let mut clock = ControllerClock::default();
        let far = cmd(T + DAY + 1, CommandAction::Diagnostics);
        assert!(clock.judge(&far, Some(T), 0, 0).unwrap_err().contains("not within 24 h"));
        let before = cmd(T - 1, CommandAction::Diagnostics);
        assert!(clock.judge(&before, Some(T), 0, 0).is_err(), "a deadline before its issue time");
        let cancel = cmd(0, CommandAction::Cancel { id: 9 });
        assert!(clock.judge(&cancel, Some(T), 0, 0).is_ok());
        // 1.3 controller: the device's wall clock decides, as before.
        let legacy = cmd(T + 60_000, CommandAction::Diagnostics);
        assert_eq!(clock.judge(&legacy, None, 0, T), Ok(T));
        assert!(clock.judge(&legacy, None, 0, T - 3 * DAY).unwrap_err().contains("not within 24 h"));
        assert!(clock.judge(&legacy, None, 0, T + 61_000).unwrap_err().contains("past its deadline"));
        assert!(clock.judge(&cmd(0, CommandAction::Diagnostics), None, 0, T).is_err(), "no deadline");
        assert!(clock.judge(&cancel, None, 0, T).is_ok());
    }
}
