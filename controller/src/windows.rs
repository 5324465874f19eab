//! Update windows (`updates.install` / `updates.download` in manifests):
//! cron times and lengths, turned into the UTC spans devices enforce
//! (`baton_protocol::Windows`). Parsing is pure; time zones come from the
//! system's tz database (jiff; its bundled copy where there is none).
//!
//! A window opens at each time its cron expression names — minute, hour
//! and day of week; day of month and month must be `*`, so windows repeat
//! weekly, which is what lets a device that hears nothing repeat its last
//! week — and stays open for its length. The controller computes two weeks
//! from the start of the current week (UTC, weeks counted from the Unix
//! epoch) and sends them again when the week turns.

use baton_protocol::Windows;

pub const WEEK_MS: u64 = 7 * 86_400_000;
/// How far the spans sent to devices reach.
pub const PERIOD_MS: u64 = 2 * WEEK_MS;
/// Spans one window may make over a period, after merging.
pub const MAX_SPANS: usize = 128;

/// A parsed cron time: the minutes, hours and days of the week it names.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Cron {
    minutes: u64,
    hours: u32,
    /// Bit 0 = Sunday.
    days: u8,
}

/// `MIN HOUR DOM MONTH DOW`, each `*`, `N`, `A-B`, with `/STEP`, lists with `,`;
/// days of the week 0–7 (0 and 7: Sunday) or `sun`–`sat`.
pub fn parse_cron(text: &str) -> Result<Cron, String> {
    let fields: Vec<&str> = text.split_whitespace().collect();
    let [minute, hour, dom, month, dow] = fields[..] else {
        return Err(format!("{text:?}: expected five fields, MIN HOUR DAY-OF-MONTH MONTH DAY-OF-WEEK"));
    };
    if dom != "*" || month != "*" {
        return Err(format!(
            "{text:?}: day of month and month must be * (windows repeat every week, so a device that hears \
             nothing keeps them)"
        ));
    }
    let minutes = field(minute, 0, 59, "minute")?;
    let hours = field(hour, 0, 23, "hour")? as u32;
    let mut days = field(
        &dow.to_ascii_lowercase()
            .replace("sun", "0")
            .replace("mon", "1")
            .replace("tue", "2")
            .replace("wed", "3")
            .replace("thu", "4")
            .replace("fri", "5")
            .replace("sat", "6"),
        0,
        7,
        "day of week",
    )?;
    if days & (1 << 7) != 0 {
        days = (days & !(1 << 7)) | 1;
    }
    Ok(Cron { minutes, hours, days: days as u8 })
}

fn field(text: &str, min: u64, max: u64, what: &str) -> Result<u64, String> {
    let mut bits = 0u64;
    for part in text.split(',') {
        let (range, step) = match part.split_once('/') {
            Some((r, s)) => (r, s.parse::<u64>().ok().filter(|s| *s > 0).ok_or(format!("{what}: bad step {s:?}"))?),
            None => (part, 1),
        };
        let (lo, hi) = match range {
            "*" => (min, max),
            r => match r.split_once('-') {
                Some((a, b)) => (num(a, what)?, num(b, what)?),
                None => {
                    let n = num(r, what)?;
                    (n, if step > 1 { max } else { n })
                }
            },
        };
        if lo < min || hi > max || lo > hi {
            return Err(format!("{what}: {part:?} is outside {min}–{max}"));
        }
        let mut v = lo;
        while v <= hi {
            bits |= 1 << v;
            v += step;
        }
    }
    Ok(bits)
}

fn num(text: &str, what: &str) -> Result<u64, String> {
    text.parse().map_err(|_| format!("{what}: {text:?} is not a number"))
}

/// `90s`, `10m`, `2h`, `1d`, `1h30m`, or plain seconds → milliseconds (> 0).
pub fn parse_duration(text: &str) -> Result<u64, String> {
    let t = text.trim();
    if let Ok(s) = t.parse::<u64>() {
        return (s > 0).then_some(s * 1000).ok_or_else(|| format!("{text:?}: must be above 0"));
    }
    let mut total = 0u64;
    let mut digits = String::new();
    for c in t.chars() {
        if c.is_ascii_digit() {
            digits.push(c);
            continue;
        }
        let unit = match c {
            's' => 1,
            'm' => 60,
            'h' => 3600,
            'd' => 86_400,
            _ => return Err(format!("{text:?}: expected a duration like 90s, 10m, 2h, 1d or 1h30m")),
        };
        let n: u64 =
            digits.parse().map_err(|_| format!("{text:?}: expected a duration like 90s, 10m, 2h, 1d or 1h30m"))?;
        total = total.saturating_add(n.saturating_mul(unit * 1000));
        digits.clear();
    }
    if !digits.is_empty() || total == 0 {
        return Err(format!("{text:?}: expected a duration like 90s, 10m, 2h, 1d or 1h30m (above 0)"));
    }
    Ok(total)
}

/// The time zone named `name` (IANA, e.g. `Europe/Paris`; `UTC`).
pub fn zone(name: &str) -> Result<jiff::tz::TimeZone, String> {
    jiff::tz::TimeZone::get(name)
        .map_err(|_| format!("unknown time zone {name:?} (IANA names, e.g. Europe/Paris, or UTC)"))
}

/// The spans `cron` + `length_ms` make in `tz` over `from_ms..until_ms`
/// (those open at `from_ms` included), sorted and merged.
pub fn spans(cron: &Cron, length_ms: u64, tz: &jiff::tz::TimeZone, from_ms: u64, until_ms: u64) -> Vec<(u64, u64)> {
    let mut out: Vec<(u64, u64)> = Vec::new();
    let ts = |ms: u64| jiff::Timestamp::from_millisecond(ms as i64).ok();
    let (Some(first), Some(last)) = (ts(from_ms.saturating_sub(length_ms).saturating_sub(86_400_000)), ts(until_ms))
    else {
        return out;
    };
    let mut day = first.to_zoned(tz.clone()).date();
    let end = last.to_zoned(tz.clone()).date();
    while day <= end {
        let dow = day.weekday().to_sunday_zero_offset() as u32;
        if cron.days & (1 << dow) != 0 {
            for h in (0..24).filter(|h| cron.hours & (1 << h) != 0) {
                for m in (0..60).filter(|m| cron.minutes & (1u64 << m) != 0) {
                    let Ok(at) = day.at(h as i8, m as i8, 0, 0).to_zoned(tz.clone()) else { continue };
                    let start = at.timestamp().as_millisecond();
                    if start < 0 {
                        continue;
                    }
                    let (start, stop) = (start as u64, start as u64 + length_ms);
                    if stop > from_ms && start < until_ms {
                        out.push((start, stop));
                    }
                }
            }
        }
        let Ok(next) = day.tomorrow() else { break };
        day = next;
    }
    out.sort_unstable();
    let mut merged: Vec<(u64, u64)> = Vec::with_capacity(out.len());
    for (s, e) in out {
        match merged.last_mut() {
            Some(last) if s <= last.1 => last.1 = last.1.max(e),
            _ => merged.push((s, e)),
        }
    }
    merged
}

/// The windows a device is sent now: the period starts with the current week.
pub fn windows(text: &str, cron: &Cron, length_ms: u64, tz: &jiff::tz::TimeZone, now_ms: u64) -> Windows {
    let from_ms = now_ms / WEEK_MS * WEEK_MS;
    let until_ms = from_ms + PERIOD_MS;
    Windows { text: text.into(), from_ms, until_ms, spans: spans(cron, length_ms, tz, from_ms, until_ms) }
}

/// A workload's update policy for a device with `labels`, at `now_ms`:
/// in each list of windows the first entry whose selector the device
/// matches (none: any time). `cache` keeps the spans computed per entry.
pub fn policy_for(
    workload: &str,
    u: &crate::workload::UpdatesManifest,
    labels: &std::collections::BTreeMap<String, String>,
    now_ms: u64,
    cache: &mut std::collections::BTreeMap<(String, bool, usize), Option<Windows>>,
) -> baton_protocol::UpdatePolicy {
    let mut pick = |list: &Option<crate::workload::OneOrMany<crate::workload::WindowManifest>>, install: bool| {
        let items = list.as_ref()?.items();
        let (i, w) =
            items.iter().enumerate().find(|(_, w)| w.selector.iter().all(|(k, v)| labels.get(k) == Some(v)))?;
        cache
            .entry((workload.to_string(), install, i))
            .or_insert_with(|| {
                let cron = parse_cron(&w.at).ok()?;
                let length = parse_duration(&w.length).ok()?;
                let name = w.time_zone.as_deref().unwrap_or("UTC");
                let tz = zone(name)
                    .inspect_err(|e| tracing::error!(workload, error = %e, "update window in UTC instead"))
                    .unwrap_or(jiff::tz::TimeZone::UTC);
                let text = format!("{} for {} {name}", w.at, w.length);
                Some(windows(&text, &cron, length, &tz, now_ms))
            })
            .clone()
    };
    let install = pick(&u.install, true);
    let download = pick(&u.download, false);
    let seconds = |d: &Option<String>| {
        d.as_deref().and_then(|d| parse_duration(d).ok()).map_or(0, |ms| (ms / 1000).min(u64::from(u32::MAX)) as u32)
    };
    baton_protocol::UpdatePolicy {
        workload: workload.into(),
        install,
        download,
        max_delay_s: seconds(&u.max_delay),
        lock: u
            .lock
            .as_ref()
            .map(|l| baton_protocol::UpdateLock { max_s: seconds(&l.max), override_after_max: l.override_after_max }),
    }
}

/// Time zones of `u` that the system does not know, named as the manifest does.
pub fn unknown_zones(u: &crate::workload::UpdatesManifest) -> Option<String> {
    for (key, list) in [("install", &u.install), ("download", &u.download)] {
        let Some(list) = list else { continue };
        let many = matches!(list, crate::workload::OneOrMany::Many(_));
        for (i, w) in list.items().iter().enumerate() {
            if let Some(Err(e)) = w.time_zone.as_deref().map(zone) {
                let at = if many { format!("updates.{key}[{i}]") } else { format!("updates.{key}") };
                return Some(format!("{at}.time_zone: {e}"));
            }
        }
    }
    None
}

#[cfg(test)]
mod tests {
    use super::*;

    const H: u64 = 3_600_000;
    const D: u64 = 24 * H;

    #[test]
    fn cron_fields_parse_and_refuse_what_does_not_repeat_weekly() {
        let c = parse_cron("0 2 * * *").unwrap();
        assert_eq!((c.minutes, c.hours, c.days), (1, 1 << 2, 0x7f));
        let c = parse_cron("*/15 22-23,0-5 * * mon-fri").unwrap();
        assert_eq!(c.minutes, (1 << 0) | (1 << 15) | (1 << 30) | (1 << 45));
        assert_eq!(c.hours, (1 << 22) | (1 << 23) | 0b11_1111);
        assert_eq!(c.days, 0b011_1110);
        assert_eq!(parse_cron("30 3 * * 7").unwrap().days, 1, "7 is Sunday");
        for bad in [
            "0 2 * *",
            "0 2 1 * *",
            "0 2 * 6 *",
            "60 2 * * *",
            "0 24 * * *",
            "0 2 * * 8",
            "x 2 * * *",
            "0 5-2 * * *",
            "*/0 * * * *",
        ] {
            assert!(parse_cron(bad).is_err(), "{bad}");
        }
    }

    #[test]
    fn durations() {
        assert_eq!(parse_duration("90s"), Ok(90_000));
        assert_eq!(parse_duration("2h"), Ok(2 * H));
        assert_eq!(parse_duration("1h30m"), Ok(90 * 60_000));
        assert_eq!(parse_duration("3d"), Ok(3 * D));
        assert_eq!(parse_duration("45"), Ok(45_000));
        for bad in ["", "0", "0s", "2x", "h", "10m5", "-1h"] {
            assert!(parse_duration(bad).is_err(), "{bad}");
        }
    }

    #[test]
    fn nightly_windows_follow_the_time_zone_across_daylight_saving() {
        let tz = zone("Europe/Paris").unwrap();
        let cron = parse_cron("0 2 * * *").unwrap();
        // 2026-10-19 00:00 UTC (a Monday) for two weeks: Paris leaves summer
        // time on 2026-10-25 (02:00 local is 00:00 UTC before, 01:00 after).
        let from = 1_792_368_000_000;
        let paris = spans(&cron, 2 * H, &tz, from, from + 14 * D);
        assert_eq!(paris.len(), 14, "{paris:?}");
        assert_eq!(paris[0], (from, from + 2 * H), "02:00 CEST is 00:00 UTC");
        assert_eq!(paris[13].0 % D, H, "02:00 CET is 01:00 UTC");
        let utc = spans(&cron, 2 * H, &zone("UTC").unwrap(), from, from + 14 * D);
        assert!(utc.iter().all(|(s, e)| s % D == 2 * H && e - s == 2 * H), "{utc:?}");
    }

    #[test]
    fn overlapping_windows_merge_and_a_window_open_at_the_start_counts() {
        let tz = zone("UTC").unwrap();
        // Every 15 minutes from 22:00 to 01:45, 30 minutes each: one span a
        // night, 22:00 to 02:15; of the one open at the period's start
        // (Monday 00:00), what reaches into the period (from Sunday 23:45).
        let cron = parse_cron("*/15 22,23,0,1 * * *").unwrap();
        let from = 1_792_368_000_000;
        let s = spans(&cron, 30 * 60_000, &tz, from, from + 2 * D);
        assert_eq!(s[0], (from - 15 * 60_000, from + 2 * H + 15 * 60_000));
        assert_eq!(s.len(), 3, "two nights, and the one open at the start: {s:?}");
        assert!(s.windows(2).all(|w| w[0].1 < w[1].0), "{s:?}");
        assert!(zone("Mars/Olympus").is_err());
    }
}
