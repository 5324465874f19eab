//! A manifest checked section by section, each section building its part of
//! the device-side spec; an error names the field path (`volumes[2].path`)
//! and says what to write instead. Pure.

use baton_protocol::spec::{
    Bandwidth, ContainerSpec, DeviceMount, File, Mount, MountSource, NetworkMode, Port, PortProtocol, Probe,
    ProbeCheck, Publish, Resources, RestartPolicy, Security, User, WorkloadSpec,
};
use baton_protocol::{check_name, NameKind};

use super::{
    parse_bytes, parse_cpu, unversioned_secret, valid_name, FileManifest, Manifest, NetworkName, ProbeManifest,
    RestartName, DEFAULT_HEALTH_DEADLINE_S, MAX_FILES_BYTES,
};
use crate::rollout::{Strategy, Wave};

/// What is wrong with a manifest, and where.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{field}: {message}")]
pub struct FieldError {
    /// The field path, as the manifest spells it: `resources.memory`, `ports[1].protocol`.
    pub field: String,
    pub message: String,
}

type Checked<T> = Result<T, FieldError>;

fn bad<T>(field: impl Into<String>, message: impl Into<String>) -> Checked<T> {
    Err(FieldError { field: field.into(), message: message.into() })
}

/// Checks a manifest and builds the device-side spec (revision 0).
pub fn validate(m: &Manifest) -> Checked<WorkloadSpec> {
    identity(m)?;
    security(m)?;
    let (user, user_name) = user(m)?;
    let resources = resources(m)?;
    let mounts = volumes(m)?;
    let devices = m
        .devices
        .iter()
        .map(|d| DeviceMount { host_path: d.clone(), container_path: String::new(), permissions: "rwm".into() })
        .collect();
    let (network, ports) = network(m)?;
    let (publish, bandwidth) = bridge(m)?;
    placement(m)?;
    updates(m)?;
    disruption(m)?;
    strategy(m)?;
    references(m)?;
    let files = files(m)?;
    let (liveness, readiness) = probes(m, network)?;
    Ok(WorkloadSpec {
        name: m.name.clone(),
        revision: 0,
        image: m.image.clone(),
        image_digest: String::new(),
        health_deadline_s: m.health_deadline.unwrap_or(DEFAULT_HEALTH_DEADLINE_S),
        container: ContainerSpec {
            command: m.command.clone(),
            args: m.args.clone(),
            env: m.env.iter().map(|(k, v)| (k.clone(), v.clone())).collect(),
            working_dir: m.working_dir.clone(),
            user,
            hostname: m.hostname.clone(),
            resources,
            restart: match m.restart {
                RestartName::Always => RestartPolicy::Always,
                RestartName::OnFailure => RestartPolicy::OnFailure,
                RestartName::Never => RestartPolicy::Never,
            },
            backoff_cap_s: m.restart_backoff_cap.unwrap_or(0),
            mounts,
            devices,
            network,
            ports,
            read_only_rootfs: m.read_only,
            security: Security {
                privileged: m.privileged,
                cap_add: m.cap_add.clone(),
                cap_drop: m.cap_drop.clone(),
                seccomp_unconfined: m.seccomp_unconfined,
            },
            liveness,
            readiness,
            files,
            user_name,
            allow_privilege_escalation: m.allow_privilege_escalation,
            publish,
            bandwidth,
            allow_from: m.allow_from.clone(),
        },
    })
}

/// `name`, `image`, `env`.
fn identity(m: &Manifest) -> Checked<()> {
    if let Err(e) = check_name(NameKind::Workload, &m.name) {
        return bad("name", e.to_string());
    }
    if m.image.trim().is_empty() || m.image.contains(char::is_whitespace) {
        return bad("image", format!("{:?} is not an image reference", m.image));
    }
    for k in m.env.keys() {
        if k.is_empty() || k.contains(['=', '\0']) {
            return bad(format!("env.{k}"), "invalid variable name");
        }
    }
    Ok(())
}

/// `user`: `uid:gid` in numbers travels as numbers (every agent reads
/// them); anything else is resolved on the device in the image's own files.
/// An agent too old for names (protocol < 1.5) gets nobody, never root.
fn user(m: &Manifest) -> Checked<(Option<User>, Option<String>)> {
    let Some(u) = &m.user else { return Ok((None, None)) };
    let numbers =
        u.split_once(':').and_then(|(uid, gid)| Some(User { uid: uid.parse().ok()?, gid: gid.parse().ok()? }));
    let part_ok =
        |p: &str| !p.is_empty() && p.len() <= 32 && p.chars().all(|c| c.is_ascii_alphanumeric() || "._-".contains(c));
    match numbers {
        Some(numbers) => Ok((Some(numbers), None)),
        None if u.split(':').count() <= 2 && u.split(':').all(part_ok) => {
            Ok((Some(User { uid: 65534, gid: 65534 }), Some(u.clone())))
        }
        None => bad(
            "user",
            format!("{u:?}: expected uid:gid, or a user (and group) of the image: NAME, NAME:GROUP, UID, UID:GROUP"),
        ),
    }
}

/// `cap_add` / `cap_drop` name capabilities Linux has;
/// `allow_privilege_escalation` and what it needs.
fn security(m: &Manifest) -> Checked<()> {
    if let Some((field, i, c)) = baton_protocol::spec::unknown_capability(&m.cap_add, &m.cap_drop) {
        return bad(
            format!("{field}[{i}]"),
            format!("{c:?} is not a Linux capability (e.g. NET_ADMIN, SYS_TIME, or ALL)"),
        );
    }
    if m.allow_privilege_escalation && !m.privileged && !m.seccomp_unconfined {
        return bad(
            "allow_privilege_escalation",
            "needs seccomp_unconfined: true as well (the runtime loads a seccomp filter only under no_new_privileges)",
        );
    }
    Ok(())
}

/// `resources.*`.
fn resources(m: &Manifest) -> Checked<Resources> {
    let r = &m.resources;
    let memory_bytes = match &r.memory {
        None => None,
        Some(s) => match parse_bytes(s) {
            Some(b) if b >= 4 << 20 => Some(b),
            Some(_) => return bad("resources.memory", format!("{s:?} is below the 4Mi minimum")),
            None => return bad("resources.memory", format!("{s:?}: use bytes or a unit: 64Mi, 1Gi, 500M")),
        },
    };
    let cpu_millis = match &r.cpu {
        None => None,
        Some(s) => match parse_cpu(s) {
            Some(c) => Some(c),
            None => return bad("resources.cpu", format!("{s:?}: use 500m, 0.5 or 2 (CPUs)")),
        },
    };
    if r.pids == Some(0) {
        return bad("resources.pids", "must be at least 1");
    }
    Ok(Resources { memory_bytes, cpu_millis, cpu_shares: r.cpu_shares, pids: r.pids })
}

/// `volumes[i]`: exactly one source each, at an absolute path.
fn volumes(m: &Manifest) -> Checked<Vec<Mount>> {
    let mut mounts = Vec::new();
    for (i, v) in m.volumes.iter().enumerate() {
        let field = format!("volumes[{i}]");
        if !v.path.starts_with('/') || v.path.split('/').any(|c| c == "..") || v.path == "/" {
            return bad(
                format!("{field}.path"),
                format!("{:?} must be an absolute path other than / without '..'", v.path),
            );
        }
        let source = match (&v.name, &v.host_path, &v.tmpfs) {
            (Some(n), None, None) => MountSource::Volume(n.clone()),
            (None, Some(h), None) => MountSource::Bind(h.clone()),
            (None, None, Some(size)) => match parse_bytes(size).filter(|b| *b > 0) {
                Some(b) => MountSource::Tmpfs(b),
                None => return bad(format!("{field}.tmpfs"), format!("{size:?} is not a size")),
            },
            _ => return bad(field, "set exactly one of name, host_path, tmpfs"),
        };
        mounts.push(Mount { target: v.path.clone(), source, read_only: v.read_only });
    }
    Ok(mounts)
}

/// `network` and `ports[i]`.
fn network(m: &Manifest) -> Checked<(NetworkMode, Vec<Port>)> {
    let mut ports: Vec<Port> = Vec::new();
    for (i, p) in m.ports.iter().enumerate() {
        if p.port == 0 {
            return bad(format!("ports[{i}].port"), "must be a port number from 1 to 65535");
        }
        if ports.iter().any(|q| q.name == p.name) {
            return bad(format!("ports[{i}].name"), format!("{:?} names two ports; give each its own name", p.name));
        }
        let protocol = match p.protocol.as_deref() {
            None | Some("tcp") => PortProtocol::Tcp,
            Some("udp") => PortProtocol::Udp,
            Some(other) => return bad(format!("ports[{i}].protocol"), format!("{other:?}: use tcp or udp")),
        };
        ports.push(Port { name: p.name.clone(), port: p.port, protocol });
    }
    let network = match m.network {
        NetworkName::Host => NetworkMode::Host,
        NetworkName::None => NetworkMode::None,
        NetworkName::Bridge => NetworkMode::Bridge,
    };
    Ok((network, ports))
}

/// `ports[i].publish`, `resources.network`, `allow_from`: what only a
/// bridged container has.
fn bridge(m: &Manifest) -> Checked<(Vec<Publish>, Bandwidth)> {
    let bridged = m.network == NetworkName::Bridge;
    let mut publish: Vec<Publish> = Vec::new();
    for (i, p) in m.ports.iter().enumerate() {
        let Some(host_port) = p.publish else { continue };
        if !bridged {
            return bad(
                format!("ports[{i}].publish"),
                "publishing forwards a device port to a bridged container: it needs network: bridge (on the host's network the port is the device's already)",
            );
        }
        if host_port == 0 {
            return bad(format!("ports[{i}].publish"), "must be a port number from 1 to 65535");
        }
        let protocol = if p.protocol.as_deref() == Some("udp") { PortProtocol::Udp } else { PortProtocol::Tcp };
        if let Some(q) = publish.iter().find(|q| q.host_port == host_port && q.protocol == protocol) {
            return bad(
                format!("ports[{i}].publish"),
                format!("device port {host_port} is published twice (to {} and {})", q.port, p.port),
            );
        }
        publish.push(Publish { host_port, port: p.port, protocol });
    }
    let rate = |field: &str, v: &Option<String>| -> Checked<u64> {
        match v.as_deref() {
            None => Ok(0),
            Some(s) => match parse_rate(s) {
                Some(bps) if (8_000..=100_000_000_000).contains(&bps) => Ok(bps),
                Some(bps) if bps < 8_000 => bad(field, format!("{s:?} is below the 8kbit minimum")),
                Some(_) => bad(field, format!("{s:?} is above the 100gbit maximum")),
                None => bad(field, format!("{s:?}: write bits per second with a unit: 500kbit, 2mbit, 1gbit")),
            },
        }
    };
    let bandwidth = match &m.resources.network {
        None => Bandwidth::default(),
        Some(_) if !bridged => {
            return bad("resources.network", "bandwidth limits apply to a bridged container (network: bridge)")
        }
        Some(b) => Bandwidth {
            egress_bps: rate("resources.network.egress", &b.egress)?,
            ingress_bps: rate("resources.network.ingress", &b.ingress)?,
        },
    };
    if let Some(names) = &m.allow_from {
        if !bridged {
            return bad("allow_from", "only a bridged container (network: bridge) can tell who connects to it");
        }
        for (i, n) in names.iter().enumerate() {
            if let Err(e) = check_name(NameKind::Workload, n) {
                return bad(format!("allow_from[{i}]"), e.to_string());
            }
        }
    }
    Ok((publish, bandwidth))
}

/// `2mbit`, `500kbit`, `1gbit`, `64000bit` (or a bare number of bits) per second.
pub fn parse_rate(s: &str) -> Option<u64> {
    let t = s.trim().to_ascii_lowercase();
    let (num, mult) = [("gbit", 1_000_000_000u64), ("mbit", 1_000_000), ("kbit", 1_000), ("bit", 1)]
        .iter()
        .find_map(|(u, m)| t.strip_suffix(u).map(|n| (n.trim().to_string(), *m)))
        .unwrap_or((t.clone(), 1));
    let v: f64 = num.parse().ok().filter(|v: &f64| v.is_finite() && *v > 0.0)?;
    Some((v * mult as f64).round() as u64)
}

/// `replicas`, `placement`.
fn placement(m: &Manifest) -> Checked<()> {
    if m.replicas == Some(0) {
        return bad("replicas", "must be at least 1 (delete the workload to run it nowhere)");
    }
    if m.placement.spread_by.is_some() && m.replicas.is_none() && m.autoscale.is_none() {
        return bad("placement.spread_by", "only with replicas: a workload on every device is spread already");
    }
    autoscale(m).map(|_| ())
}

/// `disruption.*`: a count of at least 1 or a share 1–100 %, a label key.
fn disruption(m: &Manifest) -> Checked<()> {
    let Some(d) = &m.disruption else { return Ok(()) };
    let text = d.max_unavailable.to_string();
    let ok = match text.trim().strip_suffix('%') {
        Some(p) => p.trim().parse::<u32>().is_ok_and(|p| (1..=100).contains(&p)),
        None => text.trim().parse::<u32>().is_ok_and(|n| n >= 1),
    };
    if !ok {
        return bad("disruption.max_unavailable", format!("{text:?}: a count of at least 1, or a share like 25%"));
    }
    if let Some(key) = &d.per {
        baton_protocol::validate_label(key, "")
            .map_err(|e| FieldError { field: "disruption.per".into(), message: e.to_string() })?;
    }
    Ok(())
}

/// `updates.*`: cron times, lengths and durations (time zone names are
/// looked up at apply, in the system's tz database).
fn updates(m: &Manifest) -> Checked<()> {
    let Some(u) = &m.updates else { return Ok(()) };
    for (key, list) in [("install", &u.install), ("download", &u.download)] {
        let Some(list) = list else { continue };
        let many = matches!(list, super::OneOrMany::Many(_));
        if let Some(first) = list.items().iter().position(|w| w.selector.is_empty()) {
            if first + 1 < list.items().len() {
                return bad(
                    format!("updates.{key}[{}]", first + 1),
                    format!("can never apply: updates.{key}[{first}] before it has no selector, so it applies to every device"),
                );
            }
        }
        for (i, w) in list.items().iter().enumerate() {
            let at = if many { format!("updates.{key}[{i}]") } else { format!("updates.{key}") };
            for (k, v) in &w.selector {
                baton_protocol::validate_label(k, v)
                    .map_err(|e| FieldError { field: format!("{at}.selector"), message: e.to_string() })?;
            }
            let cron = crate::windows::parse_cron(&w.at).or_else(|e| bad(format!("{at}.at"), e))?;
            let length = crate::windows::parse_duration(&w.length).or_else(|e| bad(format!("{at}.for"), e))?;
            if length > crate::windows::WEEK_MS {
                return bad(format!("{at}.for"), "must be at most 7 days (a window opens at least once a week)");
            }
            let spans = crate::windows::spans(&cron, length, &jiff::tz::TimeZone::UTC, 0, crate::windows::PERIOD_MS);
            if spans.len() > crate::windows::MAX_SPANS {
                return bad(
                    format!("{at}.at"),
                    format!(
                        "opens {} separate windows in two weeks (at most {}): use fewer, longer ones",
                        spans.len(),
                        crate::windows::MAX_SPANS
                    ),
                );
            }
            if let Some(z) = &w.time_zone {
                if z.is_empty() || z.len() > 64 || !z.chars().all(|c| c.is_ascii_alphanumeric() || "/_-+".contains(c)) {
                    return bad(
                        format!("{at}.time_zone"),
                        format!("{z:?} is no IANA time zone name (e.g. Europe/Paris)"),
                    );
                }
            }
        }
    }
    if let Some(d) = &u.max_delay {
        let ms = crate::windows::parse_duration(d).or_else(|e| bad("updates.max_delay", e))?;
        if ms / 1000 > u64::from(u32::MAX) {
            return bad("updates.max_delay", "too long");
        }
        if u.install.is_none() {
            return bad("updates.max_delay", "only with updates.install (it bounds the wait for a window)");
        }
    }
    if let Some(d) = u.lock.as_ref().and_then(|l| l.max.as_ref()) {
        let ms = crate::windows::parse_duration(d).or_else(|e| bad("updates.lock.max", e))?;
        if ms / 1000 > u64::from(u32::MAX) {
            return bad("updates.lock.max", "too long");
        }
    }
    if u.lock.as_ref().is_some_and(|l| l.override_after_max && l.max.is_none()) {
        return bad("updates.lock.override", "only with updates.lock.max (after how long to override)");
    }
    Ok(())
}

/// Default `autoscale.window` and `autoscale.cooldown`, seconds.
pub const AUTOSCALE_WINDOW_S: u32 = 300;
pub const AUTOSCALE_COOLDOWN_S: u32 = 30;

/// The autoscaling policy of a manifest (`autoscale.*`), checked; None without one.
pub fn autoscale(m: &Manifest) -> Checked<Option<crate::autoscale::Policy>> {
    let Some(a) = &m.autoscale else { return Ok(None) };
    if a.min == 0 {
        return bad("autoscale.min", "must be at least 1 (delete the workload to run it nowhere)");
    }
    if a.max < a.min || a.max > 10_000 {
        return bad("autoscale.max", format!("must be between min ({}) and 10000", a.min));
    }
    if a.cpu_percent.is_none() && a.memory_percent.is_none() && a.load.is_none() {
        return bad("autoscale", "needs a target: cpu_percent, memory_percent or load");
    }
    if let Some(p) = a.cpu_percent {
        if !(1..=1000).contains(&p) {
            return bad("autoscale.cpu_percent", "must be between 1 and 1000 (% of resources.cpu)");
        }
        if m.resources.cpu.is_none() {
            return bad("autoscale.cpu_percent", "is a share of resources.cpu, which this workload does not set");
        }
    }
    if let Some(p) = a.memory_percent {
        if !(1..=100).contains(&p) {
            return bad("autoscale.memory_percent", "must be between 1 and 100 (% of resources.memory)");
        }
        if m.resources.memory.is_none() {
            return bad("autoscale.memory_percent", "is a share of resources.memory, which this workload does not set");
        }
    }
    let load_milli = match a.load {
        None => None,
        Some(l) if l.is_finite() && l > 0.0 && l <= 1e12 => Some((l * 1000.0).round().max(1.0) as u64),
        Some(_) => return bad("autoscale.load", "must be a number above 0 (the load per instance to keep)"),
    };
    let seconds = |v: Option<u32>, default: u32, field: &str| -> Checked<u64> {
        match v.unwrap_or(default) {
            s if s <= 3600 => Ok(u64::from(s) * 1000),
            _ => bad(field, "must be at most 3600 seconds"),
        }
    };
    Ok(Some(crate::autoscale::Policy {
        min: a.min,
        max: a.max,
        cpu_percent: a.cpu_percent,
        memory_percent: a.memory_percent,
        load_milli,
        window_ms: seconds(a.window, AUTOSCALE_WINDOW_S, "autoscale.window")?,
        cooldown_ms: seconds(a.cooldown, AUTOSCALE_COOLDOWN_S, "autoscale.cooldown")?,
    }))
}

/// The rollout strategy of a manifest (`rollout.*`, `health_deadline`).
pub fn strategy(m: &Manifest) -> Checked<Strategy> {
    let mut s = Strategy::default();
    let deadline_s = u64::from(m.health_deadline.unwrap_or(DEFAULT_HEALTH_DEADLINE_S));
    // The device rolls back by itself after the health deadline; the
    // controller gives it a minute more to say so over a slow link.
    let Some(r) = &m.rollout else {
        s.deadline_ms = (deadline_s + 60) * 1000 + s.min_ready_ms;
        return Ok(s);
    };
    if !r.waves.is_empty() {
        s.waves = Vec::new();
        for (i, w) in r.waves.iter().enumerate() {
            let Some(wave) = Wave::parse(&w.to_string()) else {
                let msg = format!("{:?}: use a device count (3) or a percentage (25%)", w.to_string());
                return bad(format!("rollout.waves[{i}]"), msg);
            };
            s.waves.push(wave);
        }
    }
    if let Some(m) = r.min_ready {
        s.min_ready_ms = u64::from(m) * 1000;
    }
    if let Some(q) = &r.max_failures {
        let text = q.to_string();
        match text.strip_suffix('%').unwrap_or(&text).trim().parse().ok().filter(|p| *p <= 100) {
            Some(pct) => s.max_failure_pct = pct,
            None => return bad("rollout.max_failures", format!("{text:?}: use a percentage, 0% to 100%")),
        }
    }
    s.deadline_ms = (deadline_s + 60) * 1000 + s.min_ready_ms;
    Ok(s)
}

/// `uses[i]` and `secrets[i]`: names of other things.
fn references(m: &Manifest) -> Checked<()> {
    for (i, u) in m.uses.iter().enumerate() {
        if !valid_name(u) || *u == m.name {
            return bad(format!("uses[{i}]"), format!("{u:?}: name another workload (a-z 0-9 -)"));
        }
    }
    for (i, sec) in m.secrets.iter().enumerate() {
        if sec.value.is_some() {
            return bad(
                format!("secrets[{i}].value"),
                "values are not written in manifests (they would be stored and sent in plain text): run `baton secret create NAME --from-file FILE` and give `name: NAME` here",
            );
        }
        if check_name(NameKind::Secret, &sec.name).is_err() {
            return bad(format!("secrets[{i}].name"), format!("{:?}: name a secret (a-z 0-9 -)", sec.name));
        }
    }
    Ok(())
}

/// `files[i]` and the files of `secrets[i]`: one path each, octal modes,
/// all of them under `MAX_FILES_BYTES`.
fn files(m: &Manifest) -> Checked<Vec<File>> {
    let secrets = m.secrets.iter().map(|s| FileManifest {
        path: s.path.clone(),
        content: String::new(),
        mode: Some(s.mode.clone().unwrap_or_else(|| "0400".into())),
    });
    let all: Vec<(String, FileManifest)> = m
        .files
        .iter()
        .cloned()
        .enumerate()
        .map(|(i, f)| (format!("files[{i}]"), f))
        .chain(secrets.enumerate().map(|(i, f)| (format!("secrets[{i}]"), f)))
        .collect();
    let mut files = Vec::new();
    for (i, (field, f)) in all.iter().enumerate() {
        if !f.path.starts_with('/') || f.path.ends_with('/') || f.path.split('/').any(|c| c == "..") {
            return bad(format!("{field}.path"), format!("{:?} must be an absolute file path without '..'", f.path));
        }
        if all[..i].iter().any(|(_, o)| o.path == f.path) {
            return bad(format!("{field}.path"), format!("{:?} appears twice", f.path));
        }
        let mode = match &f.mode {
            None => 0o644,
            Some(s) => match u32::from_str_radix(s.trim_start_matches("0o"), 8).ok().filter(|m| *m <= 0o7777) {
                Some(mode) => mode,
                None => {
                    return bad(format!("{field}.mode"), format!("{s:?}: use octal permission bits such as \"0640\""))
                }
            },
        };
        let secret = i.checked_sub(m.files.len()).map(|j| &m.secrets[j]);
        files.push(match secret {
            Some(sec) => {
                File { path: f.path.clone(), mode: mode | File::SEALED, contents: unversioned_secret(&sec.name) }
            }
            None => File { path: f.path.clone(), mode, contents: f.content.clone().into_bytes() },
        });
    }
    let total: usize = files.iter().map(|f| f.contents.len()).sum();
    if total > MAX_FILES_BYTES {
        return bad(
            "files",
            format!("{total} bytes in all; files travel to devices inside desired documents, keep them under {MAX_FILES_BYTES}"),
        );
    }
    Ok(files)
}

/// `liveness` and `readiness`.
fn probes(m: &Manifest, network: NetworkMode) -> Checked<(Option<Probe>, Option<Probe>)> {
    let liveness = m.liveness.as_ref().map(|p| probe("liveness", p)).transpose()?;
    let readiness = m.readiness.as_ref().map(|p| probe("readiness", p)).transpose()?;
    for (field, p) in [("liveness", &liveness), ("readiness", &readiness)] {
        if network == NetworkMode::None
            && matches!(p, Some(Probe { check: ProbeCheck::Tcp { .. } | ProbeCheck::Http { .. }, .. }))
        {
            return bad(field, "tcp and http probes need a network (host or bridge); use an exec probe");
        }
    }
    Ok((liveness, readiness))
}

fn probe(field: &str, p: &ProbeManifest) -> Checked<Probe> {
    let checks = [p.exec.is_some(), p.tcp.is_some(), p.http.is_some()].iter().filter(|b| **b).count();
    if checks != 1 {
        return bad(field, "set exactly one of exec, tcp, http");
    }
    let check = match (&p.exec, p.tcp, &p.http) {
        (Some(argv), _, _) if argv.is_empty() => return bad(format!("{field}.exec"), "empty command"),
        (Some(argv), _, _) => ProbeCheck::Exec(argv.clone()),
        (None, Some(port), _) => ProbeCheck::Tcp { port },
        (None, None, Some(h)) if !h.path.starts_with('/') => {
            return bad(format!("{field}.http.path"), format!("{:?} must start with /", h.path))
        }
        (None, None, Some(h)) => ProbeCheck::Http { port: h.port, path: h.path.clone() },
        (None, None, None) => return bad(field, "set exactly one of exec, tcp, http"),
    };
    for (name, v) in [("interval", p.interval), ("timeout", p.timeout), ("failure_threshold", p.failure_threshold)] {
        if v == 0 {
            return bad(format!("{field}.{name}"), "must be at least 1");
        }
    }
    Ok(Probe {
        check,
        interval_s: p.interval,
        timeout_s: p.timeout,
        failure_threshold: p.failure_threshold,
        initial_delay_s: p.initial_delay,
    })
}
