//! Rendering for people (`table`) and for programs (`json`, `yaml`).

use std::collections::BTreeMap;
use std::fmt::Write;

use serde::Serialize;

use crate::fleet::Millis;
use crate::view::{AgentRolloutView, DeviceView, Event, RolloutView};

#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum, Default)]
pub enum Format {
    #[default]
    Table,
    Json,
    Yaml,
}

/// JSON or YAML of any value; `None` for `table`, which each verb renders itself.
pub fn structured<T: Serialize>(format: Format, value: &T) -> anyhow::Result<Option<String>> {
    Ok(match format {
        Format::Table => None,
        Format::Json => Some(serde_json::to_string_pretty(value)? + "\n"),
        Format::Yaml => Some(serde_yaml::to_string(value)?),
    })
}

/// Left-aligned columns separated by three spaces, as kubectl prints them.
pub fn table(header: &[&str], rows: &[Vec<String>]) -> String {
    let mut widths: Vec<usize> = header.iter().map(|h| h.len()).collect();
    for row in rows {
        for (w, cell) in widths.iter_mut().zip(row) {
            *w = (*w).max(cell.chars().count());
        }
    }
    let mut out = String::new();
    let mut line = |cells: &mut dyn Iterator<Item = &str>| {
        let mut l = String::new();
        for (i, (cell, w)) in cells.zip(&widths).enumerate() {
            if i + 1 == widths.len() {
                l.push_str(cell);
            } else {
                let _ = write!(l, "{cell:<w$}   ");
            }
        }
        out.push_str(l.trim_end());
        out.push('\n');
    };
    line(&mut header.iter().copied());
    for row in rows {
        line(&mut row.iter().map(String::as_str));
    }
    out
}

pub fn ago(now: Millis, then: Millis) -> String {
    if then == 0 {
        return "never".into();
    }
    let s = now.saturating_sub(then) / 1000;
    match s {
        0..=119 => format!("{s}s ago"),
        120..=7199 => format!("{}m ago", s / 60),
        7200..=172_799 => format!("{}h ago", s / 3600),
        _ => format!("{}d ago", s / 86_400),
    }
}

pub fn labels(l: &BTreeMap<String, String>) -> String {
    if l.is_empty() {
        return "<none>".into();
    }
    l.iter().map(|(k, v)| format!("{k}={v}")).collect::<Vec<_>>().join(",")
}

pub fn bytes(n: u64) -> String {
    const UNITS: [&str; 5] = ["B", "KiB", "MiB", "GiB", "TiB"];
    let mut v = n as f64;
    let mut u = 0;
    while v >= 1024.0 && u + 1 < UNITS.len() {
        v /= 1024.0;
        u += 1;
    }
    if u == 0 {
        format!("{n} B")
    } else {
        format!("{v:.1} {}", UNITS[u])
    }
}

/// A device clock further off than this is flagged in `get devices`.
pub const CLOCK_WARN_MS: i64 = 60_000;

/// `3d 2h behind`, `45s ahead of`: how far a device's clock is from the controller's.
pub fn clock_offset(offset_ms: i64) -> String {
    format!("{} {}", offset_size(offset_ms), if offset_ms < 0 { "behind" } else { "ahead of" })
}

/// `3d 2h`, to the nearest second (the heartbeat's transit is in the offset).
fn offset_size(offset_ms: i64) -> String {
    let s = (offset_ms.unsigned_abs() + 500) / 1000;
    match s {
        0..=119 => format!("{s}s"),
        120..=7199 => format!("{}m", s / 60),
        7200..=172_799 => format!("{}h {}m", s / 3600, s % 3600 / 60),
        _ => format!("{}d {}h", s / 86_400, s % 86_400 / 3600),
    }
}

pub fn devices_table(devices: &[DeviceView], now: Millis) -> String {
    let rows: Vec<Vec<String>> = devices
        .iter()
        .map(|d| {
            let status = match d.clock_offset_ms.filter(|o| o.abs() > CLOCK_WARN_MS) {
                Some(o) => format!("{} (clock {}{})", d.status.as_str(), if o < 0 { "-" } else { "+" }, offset_size(o)),
                None => d.status.as_str().into(),
            };
            vec![
                d.id.clone(),
                status,
                if d.arch.is_empty() { "-".into() } else { d.arch.clone() },
                labels(&d.labels),
                ago(now, d.last_seen_ms),
                d.agent_version.clone(),
            ]
        })
        .collect();
    let tenants: Vec<&str> = devices.iter().map(|d| d.tenant.as_str()).collect();
    tenant_table(&["ID", "STATUS", "ARCH", "LABELS", "LAST SEEN", "AGENT"], rows, &tenants)
}

/// A table with a TENANT column first when some row is outside the default
/// tenant (so a single-tenant fleet reads as before).
fn tenant_table(header: &[&str], mut rows: Vec<Vec<String>>, tenants: &[&str]) -> String {
    if tenants.iter().all(|t| *t == crate::tenant::DEFAULT) {
        return table(header, &rows);
    }
    let header: Vec<&str> = std::iter::once("TENANT").chain(header.iter().copied()).collect();
    for (row, tenant) in rows.iter_mut().zip(tenants) {
        row.insert(0, tenant.to_string());
    }
    table(&header, &rows)
}

pub fn device_description(d: &DeviceView, now: Millis) -> String {
    let mut o = String::new();
    let mut kv = |k: &str, v: String| {
        let _ = writeln!(o, "{:<16}{v}", format!("{k}:"));
    };
    kv("ID", d.id.clone());
    kv("Tenant", d.tenant.clone());
    kv("Status", d.status.as_str().into());
    kv("Agent", d.agent_version.clone());
    if let Some(i) = &d.inventory {
        if !i.previous_agent_version.is_empty() {
            kv("Previous agent", format!("{} (kept to go back to)", i.previous_agent_version));
        }
        if let Some(u) = &i.upgrade {
            let detail = if u.detail.is_empty() { String::new() } else { format!(": {}", u.detail) };
            kv("Last upgrade", format!("{} {} (agent upgrade {}){detail}", u.version, u.state.as_str(), u.rollout));
        }
    }
    kv("Boot ID", d.presence.boot_id.clone());
    kv("First seen", ago(now, d.first_seen_ms));
    kv("Last seen", ago(now, d.last_seen_ms));
    if let Some(i) = &d.inventory {
        let arch = if i.arch_variant.is_empty() { i.arch.clone() } else { format!("{}/{}", i.arch, i.arch_variant) };
        kv("Arch", arch);
        kv("OS", i.os.clone());
        kv("Kernel", i.kernel.clone());
        kv("Hostname", i.hostname.clone());
        kv("CPUs", i.cpus.to_string());
        kv("Memory", bytes(i.memory_bytes));
        let free = d.heartbeat.as_ref().map_or("?".into(), |h| bytes(h.disk_free_mib << 20));
        kv("Disk", format!("{free} free of {}", bytes(i.disk_bytes)));
        kv("Cgroup", format!("{:?}", i.cgroup));
        kv("Addresses", if i.addresses.is_empty() { "<none>".into() } else { i.addresses.join(", ") });
        if i.heartbeat_interval_s != 0 {
            kv("Heartbeats", format!("every {} s", i.heartbeat_interval_s));
        }
        if i.no_workloads {
            kv("Workloads", "none: this agent runs none (--no-workloads), so nothing is placed on it".into());
        }
    }
    let marked: BTreeMap<String, String> = d
        .labels
        .iter()
        .map(|(k, v)| {
            let who = if d.operator_labels.contains_key(k) { " (operator)" } else { "" };
            (format!("{k}{who}"), v.clone())
        })
        .collect();
    kv("Labels", labels(&marked));
    if let Some(h) = &d.heartbeat {
        kv("Uptime", format!("{}s", h.uptime_s));
        kv("Load", format!("{:.2}", f64::from(h.load1_centi) / 100.0));
        kv("Memory used", format!("{} of {}", bytes(h.mem_used_kib * 1024), bytes(h.mem_total_kib * 1024)));
        kv("Temperature", h.temp_milli_c.map_or("-".into(), |t| format!("{:.1} °C", f64::from(t) / 1000.0)));
        kv("Generation", h.applied_generation.to_string());
    }
    if let Some(offset) = d.clock_offset_ms {
        let note = if offset.abs() > CLOCK_WARN_MS { " (no NTP? commands and documents still work)" } else { "" };
        kv("Clock", format!("{} the controller{note}", clock_offset(offset)));
    }
    if let Some(r) = &d.refusal {
        kv("Last refusal", format!("{}: {}", ago(now, r.at_ms), r.reason));
    }
    o
}

pub fn workloads_table(workloads: &[crate::view::WorkloadView]) -> String {
    let rows: Vec<Vec<String>> = workloads
        .iter()
        .map(|w| {
            vec![
                w.name.clone(),
                w.revision.to_string(),
                w.image.clone(),
                w.devices.len().to_string(),
                format!("{}/{}", w.running(), w.devices.len()),
                format!("{}/{}", w.healthy(), w.devices.len()),
                match (w.rollout.as_ref().filter(|r| r.state.active()), w.holding()) {
                    (Some(r), 0) => format!("{} → {} {}", r.from, r.to, state_name(r.state)),
                    (Some(r), n) => format!("{} → {} {} ({n} holding back)", r.from, r.to, state_name(r.state)),
                    (None, _) => w
                        .rollout
                        .as_ref()
                        .map_or("-".into(), |r| format!("{} → {} {}", r.from, r.to, state_name(r.state))),
                },
            ]
        })
        .collect();
    let tenants: Vec<&str> = workloads.iter().map(|w| w.tenant.as_str()).collect();
    tenant_table(&["NAME", "REVISION", "IMAGE", "DEVICES", "RUNNING", "HEALTHY", "ROLLOUT"], rows, &tenants)
}

fn state_name(s: crate::rollout::State) -> String {
    serde_json::to_value(s).ok().and_then(|v| v.as_str().map(str::to_string)).unwrap_or_default()
}

/// One line of rollout progress, as `rollout status` prints it.
/// Writes to standard output; a reader that went away (`baton … | head`)
/// ends the command quietly with success, as ripgrep does, never a panic.
pub fn emit(args: std::fmt::Arguments<'_>) {
    use std::io::Write as _;
    let mut out = std::io::stdout().lock();
    if let Err(e) = out.write_fmt(args).and_then(|()| out.flush()) {
        if e.kind() == std::io::ErrorKind::BrokenPipe {
            std::process::exit(0);
        }
        eprintln!("baton: cannot write the output: {e}");
        std::process::exit(1);
    }
}

/// `print!` through `emit`.
#[macro_export]
macro_rules! out {
    ($($arg:tt)*) => { $crate::cli::output::emit(format_args!($($arg)*)) };
}

/// `println!` through `emit`.
#[macro_export]
macro_rules! outln {
    () => { $crate::cli::output::emit(format_args!("\n")) };
    ($($arg:tt)*) => { $crate::cli::output::emit(format_args!("{}\n", format_args!($($arg)*))) };
}

pub fn rollout_line(r: &RolloutView) -> String {
    let c = &r.counts;
    // Updated = reported the new revision healthy; released devices that
    // have not (yet) are "in progress", whether they work on it or are away.
    format!(
        "{}: revision {} → {} {} · wave {}/{} · {} of {} devices updated, {} failed, {} in progress",
        r.workload,
        r.from,
        r.to,
        state_name(r.state),
        r.wave,
        r.waves,
        c.ready,
        c.devices,
        c.failed,
        c.pending
    )
}

pub fn rollout_status(r: &RolloutView) -> String {
    rollout_details(rollout_line(r), r)
}

fn rollout_details(line: String, r: &RolloutView) -> String {
    let mut o = line + "\n";
    for why in r.reason.iter().chain(&r.waiting) {
        let _ = writeln!(o, "  {why}");
    }
    for (device, why) in &r.failed {
        let _ = writeln!(o, "  failed: {device}: {why}");
    }
    for (device, why) in &r.held {
        let _ = writeln!(o, "  waiting: {device}: {why}");
    }
    o
}

/// `baton agent rollout status`.
pub fn agent_rollout_line(r: &AgentRolloutView) -> String {
    let (v, c) = (&r.rollout, &r.rollout.counts);
    let selector = if r.selector.is_empty() {
        String::new()
    } else {
        format!(" ({})", r.selector.iter().map(|(k, v)| format!("{k}={v}")).collect::<Vec<_>>().join(","))
    };
    format!(
        "agent upgrade {} to {}{selector}: {} · wave {}/{} · {} of {} devices updated, {} failed, {} in progress",
        r.id,
        r.version,
        state_name(v.state),
        v.wave,
        v.waves,
        c.ready,
        c.devices,
        c.failed,
        c.pending
    )
}

pub fn agent_rollout_status(r: &AgentRolloutView) -> String {
    let mut out = rollout_details(agent_rollout_line(r), &r.rollout);
    if !r.rollout.state.active() {
        let n = &r.now;
        out.push_str(&format!(
            "Now: {} on {}, {} back on the version they ran before, {} on another or unknown\n",
            n.on_version, r.version, n.on_before, n.other
        ));
    }
    out
}

/// A rollout `status --watch` follows.
pub trait Watched {
    fn progress(&self) -> &RolloutView;
    fn line(&self) -> String;
    fn status(&self) -> String;
    fn what(&self) -> String;
}

impl Watched for RolloutView {
    fn progress(&self) -> &RolloutView {
        self
    }
    fn line(&self) -> String {
        rollout_line(self)
    }
    fn status(&self) -> String {
        rollout_status(self)
    }
    fn what(&self) -> String {
        format!("rollout of revision {}", self.to)
    }
}

impl Watched for AgentRolloutView {
    fn progress(&self) -> &RolloutView {
        &self.rollout
    }
    fn line(&self) -> String {
        agent_rollout_line(self)
    }
    fn status(&self) -> String {
        agent_rollout_status(self)
    }
    fn what(&self) -> String {
        format!("agent upgrade to {}", self.version)
    }
}

/// `rollout status --watch`: a redrawn progress bar on a terminal, one line
/// per change otherwise; returns when the rollout is no longer active.
pub fn watch_rollout<T: Watched>(mut r: T, mut fetch: impl FnMut() -> anyhow::Result<T>) -> anyhow::Result<()> {
    use std::io::IsTerminal;
    let tty = std::io::stdout().is_terminal();
    let mut last = String::new();
    loop {
        let line = r.line();
        if tty {
            let c = &r.progress().counts;
            let width = 30;
            let filled = ((c.ready + c.failed) * width).checked_div(c.devices).unwrap_or(width).min(width);
            let bar: String = "#".repeat(filled) + &"-".repeat(width - filled);
            crate::out!("\r\x1b[2K[{bar}] {line}");
        } else if line != last {
            crate::outln!("{line}");
        }
        last = line;
        let state = r.progress().state;
        if !state.active() {
            if tty {
                crate::outln!();
            }
            crate::out!("{}", r.status().split_once('\n').map_or("", |(_, rest)| rest));
            return if matches!(state, crate::rollout::State::Succeeded) {
                Ok(())
            } else {
                Err(anyhow::anyhow!("{} {}", r.what(), state_name(state)))
            };
        }
        std::thread::sleep(std::time::Duration::from_millis(500));
        r = fetch()?;
    }
}

/// Where a workload's first revision stands on its devices (no rollout
/// carries it): how many run it healthy, how many failed or refused it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct FirstRevision {
    pub placed: usize,
    pub ready: usize,
    pub failed: usize,
    /// Running it but reported unhealthy (still in progress: it may recover).
    pub unhealthy: usize,
    pub unplaced: u32,
}

impl FirstRevision {
    pub fn of(w: &crate::view::WorkloadView) -> Self {
        use baton_protocol::{Health, Phase};
        let mut c = FirstRevision { unplaced: w.unplaced, ..Default::default() };
        for d in w.devices.iter().filter(|d| d.desired_revision == w.revision) {
            c.placed += 1;
            let now = d.reported.as_ref().filter(|s| s.revision == w.revision);
            if now.is_some_and(|s| (s.phase == Phase::Running && s.health != Health::Unhealthy) || s.proves(w.revision))
            {
                c.ready += 1;
            } else if now.is_some_and(|s| s.phase == Phase::Running) {
                c.unhealthy += 1;
            } else if Self::failure(d, w.revision).is_some() {
                c.failed += 1;
            }
        }
        c
    }

    /// Why `d` failed `revision`: it refused the document, or reports the
    /// revision failed or rolled back.
    fn failure(d: &crate::view::WorkloadOnDevice, revision: u64) -> Option<String> {
        use baton_protocol::Phase;
        d.refused.clone().or_else(|| {
            d.reported
                .as_ref()
                .filter(|s| s.revision == revision && matches!(s.phase, Phase::Failed | Phase::RolledBack))
                .map(|s| s.last_error.clone().unwrap_or_else(|| format!("{:?}", s.phase).to_lowercase()))
        })
    }

    /// Settled: every placed device ready or failed, and none waits for room.
    pub fn settled(&self) -> bool {
        self.placed > 0 && self.ready + self.failed == self.placed && self.unplaced == 0
    }
}

/// `rollout status --watch` of a workload that has had no rollout: follows
/// its first revision until every device it is placed on runs it (exit 0)
/// or has failed or refused it (an error naming them).
pub fn watch_first_revision(
    mut w: crate::view::WorkloadView,
    mut fetch: impl FnMut() -> anyhow::Result<crate::view::WorkloadView>,
) -> anyhow::Result<()> {
    crate::outln!("{}: no rollout yet; following revision {} onto its devices", w.name, w.revision);
    let mut last = String::new();
    loop {
        let c = FirstRevision::of(&w);
        let mut line = format!(
            "{}: revision {} · {} of {} devices running, {} failed, {} in progress",
            w.name,
            w.revision,
            c.ready,
            c.placed,
            c.failed,
            c.placed - c.ready - c.failed
        );
        if c.unhealthy > 0 {
            line += &format!(" ({} of them running unhealthy)", c.unhealthy);
        }
        if c.unplaced > 0 {
            line += &format!(" · {} replicas fit on no device", c.unplaced);
        }
        if line != last {
            crate::outln!("{line}");
            last = line;
        }
        if c.settled() {
            if c.failed == 0 {
                return Ok(());
            }
            let failed: Vec<String> = w
                .devices
                .iter()
                .filter(|d| d.desired_revision == w.revision)
                .filter_map(|d| Some(format!("{}: {}", d.device, FirstRevision::failure(d, w.revision)?)))
                .collect();
            anyhow::bail!("revision {} of {} failed on {}", w.revision, w.name, failed.join("; "));
        }
        std::thread::sleep(std::time::Duration::from_millis(500));
        w = fetch()?;
    }
}

/// `baton agent releases`.
pub fn releases_table(list: &[crate::store::AgentRelease], now: Millis) -> String {
    if list.is_empty() {
        return "No agent builds published (baton agent publish FILE…).\n".into();
    }
    let rows: Vec<Vec<String>> = list
        .iter()
        .map(|r| {
            let hex = baton_protocol::crypto::hex(&r.digest[..r.digest.len().min(6)]);
            vec![r.version.clone(), r.arch.clone(), bytes(r.size), format!("sha256:{hex}…"), ago(now, r.published_at)]
        })
        .collect();
    table(&["VERSION", "ARCH", "SIZE", "DIGEST", "PUBLISHED"], &rows)
}

pub fn events_table(events: &[Event], now: Millis) -> String {
    if events.is_empty() {
        return "No events.\n".into();
    }
    let name = |e: &Event| if e.name.is_empty() { e.kind.clone() } else { e.name.clone() };
    let rows: Vec<Vec<String>> =
        events.iter().map(|e| vec![ago(now, e.at_ms), name(e), e.subject.clone(), e.message.clone()]).collect();
    table(&["AGE", "EVENT", "SUBJECT", "MESSAGE"], &rows)
}

pub fn tokens_table(tokens: &[crate::view::JoinTokenView], now: Millis) -> String {
    if tokens.is_empty() {
        return "No tokens. Create one with `baton token create`.\n".into();
    }
    let rows: Vec<Vec<String>> = tokens
        .iter()
        .map(|t| {
            let expires = if t.expires_at <= now {
                "expired".to_string()
            } else {
                format!("in {}s", (t.expires_at - now) / 1000)
            };
            let labels = t.labels.iter().map(|(k, v)| format!("{k}={v}")).collect::<Vec<_>>().join(",");
            vec![t.id.clone(), t.uses_left.to_string(), expires, if labels.is_empty() { "-".into() } else { labels }]
        })
        .collect();
    let tenants: Vec<&str> = tokens.iter().map(|t| t.tenant.as_str()).collect();
    tenant_table(&["ID", "USES LEFT", "EXPIRES", "LABELS"], rows, &tenants)
}

pub fn secrets_table(secrets: &[crate::view::SecretView], now: Millis) -> String {
    if secrets.is_empty() {
        return "No secrets. Create one with `baton secret create NAME --from-file FILE`.\n".into();
    }
    let rows: Vec<Vec<String>> = secrets
        .iter()
        .map(|s| {
            let users = if s.used_by.is_empty() { "-".to_string() } else { s.used_by.join(",") };
            vec![s.name.clone(), s.version.to_string(), ago(now, s.updated_at_ms), users]
        })
        .collect();
    let tenants: Vec<&str> = secrets.iter().map(|s| s.tenant.as_str()).collect();
    tenant_table(&["NAME", "VERSION", "SET", "USED BY"], rows, &tenants)
}

pub fn workload_description(w: &crate::view::WorkloadView) -> String {
    let mut o = format!(
        "Name:          {}\nTenant:        {}\nRevision:      {}\nImage:         {}\n",
        w.name, w.tenant, w.revision, w.image
    );
    let _ = writeln!(
        o,
        "Placement:     {}",
        if w.placement.selector.is_empty() {
            "every device".into()
        } else {
            format!("devices with {}", labels(&w.placement.selector))
        }
    );
    if !w.placement.arch.is_empty() {
        let _ = writeln!(o, "Architectures: {}", w.placement.arch.join(", "));
    }
    if let Some(spread) = &w.placement.spread_by {
        let _ = writeln!(o, "Spread by:     {spread}");
    }
    let replicas = w.replicas.map_or("every matching device".into(), |n| match w.unplaced {
        0 => n.to_string(),
        u => format!("{n} ({u} fit on no device: none left that matches with room)"),
    });
    let _ = writeln!(o, "Replicas:      {replicas}");
    if let Some(a) = &w.autoscale {
        let now = crate::controller::now_ms();
        let _ = writeln!(o, "Autoscale:     {} to {}, now {}", a.min, a.max, a.current);
        match (&a.recommended, &a.reason) {
            (Some(n), Some(why)) => {
                let _ = writeln!(o, "  load calls for {n}: {why}");
            }
            _ => {
                let _ = writeln!(o, "  no load reported yet");
            }
        }
        if let Some(d) = &a.last_decision {
            let _ = writeln!(o, "  last decision {}: {} → {}: {}", ago(now, d.at_ms), d.from, d.to, d.reason);
        }
    }
    let _ = writeln!(o, "Stable:        revision {}", w.stable_revision);
    let _ = writeln!(o, "History:");
    for r in &w.revisions {
        // A tag alone cannot tell revisions apart: the digest it was pinned to can.
        let pinned =
            r.digest.strip_prefix("sha256:").map(|d| format!("@{}", &d[..d.len().min(12)])).unwrap_or_default();
        let changed = if r.changes.is_empty() { String::new() } else { format!("  changed: {}", r.changes.join(", ")) };
        let _ = writeln!(o, "  {:<5}{}{pinned}{changed}", r.revision, r.image);
    }
    if let Some(r) = &w.rollout {
        let _ = writeln!(o, "Rollout:       {}", rollout_line(r));
        if let Some(why) = &r.reason {
            let _ = writeln!(o, "               {why}");
        }
    }
    let holding = match w.holding() {
        0 => String::new(),
        n => format!(" ({n} running an older revision, holding the new one back)"),
    };
    let unplaced = match w.unplaced {
        0 => String::new(),
        n => format!("; {n} more replica(s) fit on no device"),
    };
    let _ = writeln!(o, "Running:       {}/{} as asked{holding}{unplaced}\n", w.running(), w.devices.len());
    let rows: Vec<Vec<String>> = w
        .devices
        .iter()
        .map(|d| {
            let refused = d.refused.as_ref().map(|why| format!("document refused: {why}"));
            (d, refused)
        })
        .map(|(d, refused)| match &d.reported {
            Some(r) => vec![
                d.device.clone(),
                d.device_status.as_str().into(),
                d.desired_revision.to_string(),
                r.revision.to_string(),
                format!("{:?}", r.phase).to_lowercase(),
                format!("{:?}", r.health).to_lowercase(),
                r.restarts.to_string(),
                refused
                    .or_else(|| r.last_error.clone())
                    .or_else(|| r.last_exit_code.filter(|c| *c != 0).map(|c| format!("last exit: code {c}")))
                    .unwrap_or_default(),
            ],
            None => vec![
                d.device.clone(),
                d.device_status.as_str().into(),
                d.desired_revision.to_string(),
                "-".into(),
                "-".into(),
                "-".into(),
                "-".into(),
                refused.unwrap_or_default(),
            ],
        })
        .collect();
    let mut header = vec!["DEVICE", "STATUS", "DESIRED", "RUNS", "PHASE", "HEALTH", "RESTARTS", "LAST ERROR"];
    // Bridged containers' addresses, when there are any (before the last error, which runs long).
    let mut rows = rows;
    // Autoscaled workloads' load per instance.
    if w.devices.iter().any(|d| d.load.is_some()) {
        header.insert(7, "LOAD");
        header.insert(7, "CPU");
        for (row, d) in rows.iter_mut().zip(&w.devices) {
            let l = d.load.as_ref();
            let cpu = l.and_then(|l| l.cpu_milli).map_or_else(|| "-".into(), |m| format!("{m}m"));
            let load = match l {
                Some(l) if l.load_error.is_some() => "bad".into(),
                _ => l.and_then(|l| l.load_milli).map_or_else(|| "-".into(), |m| format!("{:.2}", m as f64 / 1000.0)),
            };
            row.insert(7, load);
            row.insert(7, cpu);
        }
    }
    if w.devices.iter().any(|d| d.address.is_some()) {
        header.insert(7, "ADDRESS");
        for (row, d) in rows.iter_mut().zip(&w.devices) {
            row.insert(7, d.address.clone().unwrap_or_else(|| "-".into()));
        }
    }
    o.push_str(&table(&header, &rows));
    // What instances wrote in /run/baton/load that is no load.
    for d in &w.devices {
        if let Some(e) = d.load.as_ref().and_then(|l| l.load_error.as_ref()) {
            let _ = writeln!(o, "{}: {e}", d.device);
        }
    }
    // Devices holding a new revision back, and until when they expect to.
    for d in &w.devices {
        if let Some(h) = &d.waiting {
            let until = if h.until_ms > 0 {
                format!(" (until {})", ago_or_in(crate::controller::now_ms(), h.until_ms))
            } else {
                String::new()
            };
            let _ = writeln!(o, "{} holds revision {} back: {}{until}", d.device, h.revision, h.reason);
        }
    }
    o
}

/// `in 5m` for a time ahead, `5m ago` for one past.
fn ago_or_in(now: Millis, at: Millis) -> String {
    if at <= now {
        return ago(now, at);
    }
    let s = (at - now) / 1000;
    match s {
        0..=119 => format!("in {s}s"),
        120..=7199 => format!("in {}m", s / 60),
        7200..=172_799 => format!("in {}h", s / 3600),
        _ => format!("in {}d", s / 86_400),
    }
}

pub fn webhooks_table(hooks: &[crate::view::WebhookView]) -> String {
    if hooks.is_empty() {
        return "No webhooks. Create one with `baton webhook create --url URL --events rollout.*`.\n".into();
    }
    let rows: Vec<Vec<String>> = hooks
        .iter()
        .map(|w| {
            vec![
                w.id.clone(),
                w.url.clone(),
                w.events.join(","),
                w.delivered.to_string(),
                w.queued.to_string(),
                w.dropped.to_string(),
                w.last_error.clone().unwrap_or_else(|| "-".into()),
            ]
        })
        .collect();
    table(&["ID", "URL", "EVENTS", "DELIVERED", "QUEUED", "DROPPED", "LAST ERROR"], &rows)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_tenant_column_appears_only_when_a_row_is_outside_the_default_tenant() {
        let rows = || vec![vec!["a".to_string()], vec!["b".to_string()]];
        assert_eq!(tenant_table(&["ID"], rows(), &["default", "default"]), "ID\na\nb\n");
        assert_eq!(tenant_table(&["ID"], rows(), &["default", "acme"]), "TENANT    ID\ndefault   a\nacme      b\n");
    }

    #[test]
    fn table_aligns_columns() {
        let t = table(&["ID", "STATUS"], &[vec!["pi-long-name".into(), "online".into()], vec!["a".into(), "x".into()]]);
        assert_eq!(t, "ID             STATUS\npi-long-name   online\na              x\n");
    }

    #[test]
    fn human_units() {
        assert_eq!(ago(10_000, 7_000), "3s ago");
        assert_eq!(ago(10_000_000, 1), "2h ago");
        assert_eq!(ago(5, 0), "never");
        assert_eq!(bytes(512), "512 B");
        assert_eq!(bytes(3 << 30), "3.0 GiB");
    }
}
