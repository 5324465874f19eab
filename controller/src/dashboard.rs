//! What the dashboard asks of the fleet beyond the plain API: device lists
//! filtered, sorted and paged on the server (a page of a 10,000-device fleet
//! must not ship the fleet), the fleet overview, and each device's last hour
//! of heartbeats for its charts. Pure: devices in, views out.

use std::collections::{BTreeMap, VecDeque};

use baton_protocol::Heartbeat;
use serde::{Deserialize, Serialize};

use crate::fleet::{Millis, Status};

/// The longest page a device list returns.
pub const MAX_PAGE: usize = 500;

/// One minute of a device's heartbeats (the last one heard in that minute).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, schemars::JsonSchema)]
pub struct Sample {
    pub at_ms: Millis,
    /// 1-minute load average × 100.
    pub load1_centi: u32,
    pub mem_used_kib: u64,
    pub mem_total_kib: u64,
}

/// A device's last hour at one sample a minute: at most 61 samples (about
/// 2 KiB), in memory only (a restarted controller starts a new hour).
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct History(VecDeque<Sample>);

impl History {
    pub const SPAN_MS: Millis = 3_600_000;
    const BUCKET_MS: Millis = 60_000;

    pub fn record(&mut self, now: Millis, hb: &Heartbeat) {
        let s = Sample {
            at_ms: now,
            load1_centi: hb.load1_centi,
            mem_used_kib: hb.mem_used_kib,
            mem_total_kib: hb.mem_total_kib,
        };
        match self.0.back_mut() {
            Some(last) if last.at_ms / Self::BUCKET_MS == now / Self::BUCKET_MS => *last = s,
            _ => self.0.push_back(s),
        }
        while self.0.front().is_some_and(|f| f.at_ms + Self::SPAN_MS < now) {
            self.0.pop_front();
        }
    }

    /// The samples of the hour before `now`, oldest first.
    pub fn last_hour(&self, now: Millis) -> Vec<Sample> {
        self.0.iter().filter(|s| s.at_ms + Self::SPAN_MS >= now).copied().collect()
    }
}

/// What a device list is sorted by.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum SortKey {
    #[default]
    Id,
    Status,
    LastSeen,
    AgentVersion,
    Arch,
    Tenant,
}

impl std::str::FromStr for SortKey {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        Ok(match s {
            "id" => SortKey::Id,
            "status" => SortKey::Status,
            "last_seen" => SortKey::LastSeen,
            "agent_version" => SortKey::AgentVersion,
            "arch" => SortKey::Arch,
            "tenant" => SortKey::Tenant,
            _ => return Err(format!("sort: unknown key {s:?} (id, status, last_seen, agent_version, arch, tenant)")),
        })
    }
}

/// `GET /api/v1/devices?q=&status=&label=K=V&sort=&desc=&offset=&limit=`,
/// as the query string says it. Every field is optional: none at all is
/// the whole fleet, as before these existed.
#[derive(Debug, Clone, Default, Deserialize, schemars::JsonSchema)]
pub struct DeviceQuery {
    /// Text found in the id, a label's value or the agent version (any case).
    pub q: Option<String>,
    pub status: Option<String>,
    /// `KEY=VALUE`, or `KEY` for any value.
    pub label: Option<String>,
    pub sort: Option<String>,
    #[serde(default)]
    pub desc: bool,
    #[serde(default)]
    pub offset: usize,
    pub limit: Option<usize>,
}

/// A `DeviceQuery` checked: every refusal is a clear 400, before any work.
#[derive(Debug, Clone, Default)]
pub struct Filter {
    q: Option<String>,
    status: Option<Status>,
    label: Option<(String, Option<String>)>,
    pub sort: SortKey,
    pub desc: bool,
    pub offset: usize,
    pub limit: Option<usize>,
}

/// What a device list filters and sorts on.
pub struct Row<'a> {
    pub id: &'a str,
    pub tenant: &'a str,
    pub status: Status,
    pub labels: &'a BTreeMap<String, String>,
    pub agent_version: &'a str,
    pub arch: &'a str,
    pub last_seen: Millis,
}

impl DeviceQuery {
    pub fn check(&self) -> Result<Filter, String> {
        let status = match self.status.as_deref() {
            None | Some("") => None,
            Some("online") => Some(Status::Online),
            Some("stale") => Some(Status::Stale),
            Some("offline") => Some(Status::Offline),
            Some(s) => return Err(format!("status: {s:?} is not online, stale or offline")),
        };
        let label = match self.label.as_deref() {
            None | Some("") => None,
            Some(l) => Some(match l.split_once('=') {
                Some((k, v)) => (k.to_string(), Some(v.to_string())),
                None => (l.to_string(), None),
            }),
        };
        if self.limit.is_some_and(|l| l > MAX_PAGE) {
            return Err(format!("limit: at most {MAX_PAGE} devices a page"));
        }
        Ok(Filter {
            q: self.q.as_deref().filter(|q| !q.is_empty()).map(str::to_lowercase),
            status,
            label,
            sort: self.sort.as_deref().filter(|s| !s.is_empty()).map(str::parse).transpose()?.unwrap_or_default(),
            desc: self.desc,
            offset: self.offset,
            limit: self.limit,
        })
    }
}

impl Filter {
    pub fn matches(&self, r: &Row<'_>) -> bool {
        if self.status.is_some_and(|s| s != r.status) {
            return false;
        }
        if let Some((k, v)) = &self.label {
            match (r.labels.get(k), v) {
                (None, _) => return false,
                (Some(have), Some(want)) if have != want => return false,
                _ => {}
            }
        }
        match &self.q {
            None => true,
            Some(q) => {
                r.id.to_lowercase().contains(q)
                    || r.agent_version.to_lowercase().contains(q)
                    || r.labels.values().any(|v| v.to_lowercase().contains(q))
            }
        }
    }

    /// Sorts rows (ties by id, so pages are stable) and returns the page's
    /// range of them.
    pub fn order(&self, rows: &mut [Row<'_>]) -> std::ops::Range<usize> {
        self.order_by(rows, |r| r)
    }

    /// `order` for items that carry a row.
    pub fn order_by<'r, T>(&self, items: &mut [T], row: impl Fn(&T) -> &Row<'r>) -> std::ops::Range<usize> {
        let key = |a: &Row<'_>, b: &Row<'_>| match self.sort {
            SortKey::Id => std::cmp::Ordering::Equal,
            SortKey::Status => status_rank(a.status).cmp(&status_rank(b.status)),
            SortKey::LastSeen => a.last_seen.cmp(&b.last_seen),
            SortKey::AgentVersion => a.agent_version.cmp(b.agent_version),
            SortKey::Arch => a.arch.cmp(b.arch),
            SortKey::Tenant => a.tenant.cmp(b.tenant),
        };
        items.sort_by(|a, b| {
            let (a, b) = (row(a), row(b));
            let o = key(a, b).then_with(|| a.id.cmp(b.id));
            if self.desc {
                o.reverse()
            } else {
                o
            }
        });
        let start = self.offset.min(items.len());
        let end = self.limit.map_or(items.len(), |l| start.saturating_add(l).min(items.len()));
        start..end
    }
}

/// Offline first, then stale: what needs looking at sorts to the top.
fn status_rank(s: Status) -> u8 {
    match s {
        Status::Offline => 0,
        Status::Stale => 1,
        Status::Online => 2,
    }
}

/// Devices in each state.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize, schemars::JsonSchema)]
pub struct StatusCounts {
    pub online: usize,
    pub stale: usize,
    pub offline: usize,
}

impl StatusCounts {
    fn add(&mut self, s: Status) {
        match s {
            Status::Online => self.online += 1,
            Status::Stale => self.stale += 1,
            Status::Offline => self.offline += 1,
        }
    }
}

/// `GET /api/v1/overview?group=LABEL`: the fleet at a glance.
#[derive(Debug, Clone, Default, Serialize, Deserialize, schemars::JsonSchema)]
pub struct Overview {
    pub devices: usize,
    pub status: StatusCounts,
    /// The label grouped by, and its values' counts (`""`: devices without it).
    pub group: Option<String>,
    pub groups: BTreeMap<String, StatusCounts>,
    /// Label keys the fleet has (to pick a grouping from).
    pub label_keys: Vec<String>,
    pub agent_versions: BTreeMap<String, usize>,
    pub arches: BTreeMap<String, usize>,
    pub attention: Attention,
}

/// What needs an operator.
#[derive(Debug, Clone, Default, Serialize, Deserialize, schemars::JsonSchema)]
pub struct Attention {
    /// Offline or stale devices, longest silent first (at most `ATTENTION_ROWS`).
    pub silent: Vec<SilentDevice>,
    pub silent_total: usize,
    /// Workloads with failing or unhealthy instances: (workload, devices).
    pub failing: Vec<FailingWorkload>,
    /// Rollouts paused, rolled back or aborted.
    pub stopped_rollouts: Vec<StoppedRollout>,
}

pub const ATTENTION_ROWS: usize = 20;

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq, schemars::JsonSchema)]
pub struct SilentDevice {
    pub id: String,
    pub status: Status,
    pub last_seen_ms: Millis,
}

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq, schemars::JsonSchema)]
pub struct FailingWorkload {
    pub workload: String,
    pub devices: Vec<String>,
    pub reason: String,
}

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq, schemars::JsonSchema)]
pub struct StoppedRollout {
    pub workload: String,
    pub state: crate::rollout::State,
    pub to: u64,
    pub reason: Option<String>,
}

/// Counts a fleet for the overview; `group` is a label key. The workload
/// half of `attention` is the caller's.
pub fn overview<'a>(rows: impl Iterator<Item = Row<'a>>, group: Option<&str>) -> Overview {
    let mut o = Overview { group: group.map(str::to_string), ..Overview::default() };
    let mut keys = std::collections::BTreeSet::new();
    let mut silent = Vec::new();
    for r in rows {
        o.devices += 1;
        o.status.add(r.status);
        if let Some(g) = group {
            let value = r.labels.get(g).cloned().unwrap_or_default();
            o.groups.entry(value).or_default().add(r.status);
        }
        if keys.len() < 100 {
            keys.extend(r.labels.keys().cloned());
        }
        *o.agent_versions.entry(r.agent_version.to_string()).or_default() += 1;
        *o.arches.entry(r.arch.to_string()).or_default() += 1;
        if r.status != Status::Online {
            silent.push(SilentDevice { id: r.id.to_string(), status: r.status, last_seen_ms: r.last_seen });
        }
    }
    silent.sort_by(|a, b| a.last_seen_ms.cmp(&b.last_seen_ms).then_with(|| a.id.cmp(&b.id)));
    o.attention.silent_total = silent.len();
    silent.truncate(ATTENTION_ROWS);
    o.attention.silent = silent;
    o.label_keys = keys.into_iter().collect();
    o
}

#[cfg(test)]
mod tests {
    use super::*;

    fn hb(load: u32) -> Heartbeat {
        Heartbeat { load1_centi: load, mem_used_kib: 10, mem_total_kib: 100, ..Heartbeat::default() }
    }

    #[test]
    fn history_keeps_one_sample_a_minute_for_an_hour() {
        let mut h = History::default();
        for i in 0..200u64 {
            // A heartbeat every 30 s for 100 minutes.
            h.record(i * 30_000, &hb(i as u32));
        }
        let now = 199 * 30_000;
        let s = h.last_hour(now);
        assert!(s.len() <= 61 && s.len() >= 60, "{}", s.len());
        assert!(s.iter().all(|x| x.at_ms + History::SPAN_MS >= now));
        // The newest heartbeat of a minute stands for it.
        assert_eq!(s.last().map(|x| x.load1_centi), Some(199));
        assert!(s.windows(2).all(|w| w[0].at_ms / 60_000 < w[1].at_ms / 60_000));
    }

    fn labels(pairs: &[(&str, &str)]) -> BTreeMap<String, String> {
        pairs.iter().map(|(k, v)| (k.to_string(), v.to_string())).collect()
    }

    #[test]
    fn queries_filter_sort_and_page() {
        let l: Vec<_> = (0..10).map(|i| labels(&[("site", if i % 2 == 0 { "lyon" } else { "oslo" })])).collect();
        let rows = || {
            (0..10)
                .map(|i| Row {
                    id: ["pi-0", "pi-1", "pi-2", "pi-3", "pi-4", "pi-5", "pi-6", "pi-7", "pi-8", "pi-9"][i],
                    tenant: "default",
                    status: if i == 3 { Status::Offline } else { Status::Online },
                    labels: &l[i],
                    agent_version: if i < 5 { "1.0" } else { "1.1" },
                    arch: "aarch64",
                    last_seen: 100 - i as u64,
                })
                .collect::<Vec<_>>()
        };
        let q = |s: &str| -> Result<Filter, String> {
            let mut d = DeviceQuery::default();
            for pair in s.split('&').filter(|p| !p.is_empty()) {
                let (k, v) = pair.split_once('=').unwrap_or((pair, ""));
                let v = v.to_string();
                match k {
                    "q" => d.q = Some(v),
                    "status" => d.status = Some(v),
                    "label" => d.label = Some(v.replacen(':', "=", 1)),
                    "sort" => d.sort = Some(v),
                    "desc" => d.desc = true,
                    "offset" => d.offset = v.parse().unwrap_or(0),
                    "limit" => d.limit = v.parse().ok(),
                    _ => panic!("{k}"),
                }
            }
            d.check()
        };
        let run = |s: &str| -> Vec<String> {
            let f = q(s).expect("valid");
            let mut r: Vec<Row<'_>> = rows().into_iter().filter(|r| f.matches(r)).collect();
            let range = f.order(&mut r);
            r[range].iter().map(|r| r.id.to_string()).collect()
        };
        assert_eq!(run("label=site:oslo&limit=2"), ["pi-1", "pi-3"]);
        assert_eq!(run("label=site:oslo&limit=2&offset=2"), ["pi-5", "pi-7"]);
        assert_eq!(run("label=site&offset=9"), ["pi-9"]);
        assert_eq!(run("offset=50"), Vec::<String>::new());
        assert_eq!(run("status=offline"), ["pi-3"]);
        assert_eq!(run("q=LYON&sort=last_seen&limit=2"), ["pi-8", "pi-6"]);
        assert_eq!(run("q=1.1&sort=id&desc"), ["pi-9", "pi-8", "pi-7", "pi-6", "pi-5"]);
        assert_eq!(run("sort=status&limit=1"), ["pi-3"]);
        assert!(q("sort=colour").unwrap_err().contains("unknown key"));
        assert!(q("status=asleep").unwrap_err().contains("asleep"));
        assert!(q("limit=100000").unwrap_err().contains("at most"));
    }

    #[test]
    fn the_overview_counts_groups_and_lists_silent_devices_longest_first() {
        let l = [labels(&[("site", "lyon")]), labels(&[("site", "oslo")]), labels(&[])];
        let rows = [
            Row {
                id: "a",
                tenant: "",
                status: Status::Online,
                labels: &l[0],
                agent_version: "1.0",
                arch: "aarch64",
                last_seen: 9,
            },
            Row {
                id: "b",
                tenant: "",
                status: Status::Offline,
                labels: &l[1],
                agent_version: "1.0",
                arch: "armv7",
                last_seen: 5,
            },
            Row {
                id: "c",
                tenant: "",
                status: Status::Stale,
                labels: &l[2],
                agent_version: "1.1",
                arch: "aarch64",
                last_seen: 2,
            },
        ];
        let o = overview(rows.into_iter(), Some("site"));
        assert_eq!(o.devices, 3);
        assert_eq!(o.status, StatusCounts { online: 1, stale: 1, offline: 1 });
        assert_eq!(o.groups["lyon"].online, 1);
        assert_eq!(o.groups["oslo"].offline, 1);
        assert_eq!(o.groups[""].stale, 1);
        assert_eq!(o.agent_versions["1.0"], 2);
        assert_eq!(o.arches["armv7"], 1);
        assert_eq!(o.label_keys, ["site"]);
        let silent: Vec<&str> = o.attention.silent.iter().map(|s| s.id.as_str()).collect();
        assert_eq!(silent, ["c", "b"]);
    }
}
