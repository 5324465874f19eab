//! One function per Compose key family: the value read, checked and turned
//! into the manifest's, or refused with the field path and what to write.

use std::collections::BTreeMap;

use super::*;

pub(super) fn string(v: &Value, field: &str) -> Checked<String> {
    v.as_str().map(str::to_string).map_or_else(|| bad(field, "a string"), Ok)
}

/// A string or a number (`user: 1000`, `user: "1000:1000"`).
pub(super) fn scalar(v: &Value, field: &str) -> Checked<String> {
    match v {
        Value::String(s) => Ok(s.clone()),
        Value::Number(n) => Ok(n.to_string()),
        _ => bad(field, "a string or a number"),
    }
}

pub(super) fn boolean(v: &Value, field: &str) -> Checked<bool> {
    v.as_bool().map_or_else(|| bad(field, "true or false"), Ok)
}

pub(super) fn strings(v: &Value, field: &str) -> Checked<Vec<String>> {
    let Some(seq) = v.as_sequence() else { return bad(field, "a list") };
    seq.iter().enumerate().map(|(i, s)| scalar(s, &format!("{field}[{i}]"))).collect()
}

/// A list, or a string split as a shell would split words (quotes, no
/// expansion): Compose's `command: echo "a b"`.
pub(super) fn words(v: &Value, field: &str) -> Checked<Vec<String>> {
    match v {
        Value::String(s) => split_words(s).map_or_else(|why| bad(field, why), Ok),
        Value::Sequence(_) => strings(v, field),
        _ => bad(field, "a string or a list"),
    }
}

/// Shell-like word splitting: whitespace separates, single quotes keep
/// everything, double quotes keep all but `\"` and `\\`, a backslash outside
/// quotes escapes the next character.
pub fn split_words(s: &str) -> Result<Vec<String>, String> {
    let mut out = Vec::new();
    let mut word: Option<String> = None;
    let mut chars = s.chars();
    while let Some(c) = chars.next() {
        match c {
            c if c.is_whitespace() => {
                if let Some(w) = word.take() {
                    out.push(w);
                }
            }
            '\'' => {
                let w = word.get_or_insert_with(String::new);
                loop {
                    match chars.next() {
                        Some('\'') => break,
                        Some(c) => w.push(c),
                        None => return Err(format!("{s:?}: unterminated single quote")),
                    }
                }
            }
            '"' => {
                let w = word.get_or_insert_with(String::new);
                loop {
                    match chars.next() {
                        Some('"') => break,
                        Some('\\') => match chars.next() {
                            Some(c @ ('"' | '\\' | '$' | '`')) => w.push(c),
                            Some(c) => {
                                w.push('\\');
                                w.push(c);
                            }
                            None => return Err(format!("{s:?}: unterminated double quote")),
                        },
                        Some(c) => w.push(c),
                        None => return Err(format!("{s:?}: unterminated double quote")),
                    }
                }
            }
            '\\' => match chars.next() {
                Some(c) => word.get_or_insert_with(String::new).push(c),
                None => return Err(format!("{s:?}: ends with a backslash")),
            },
            c => word.get_or_insert_with(String::new).push(c),
        }
    }
    out.extend(word);
    Ok(out)
}

/// `environment:` as a mapping or a list of `KEY=VALUE`.
pub(super) fn environment(v: &Value, field: &str) -> Checked<BTreeMap<String, String>> {
    let mut env = BTreeMap::new();
    let from_shell = |k: &str| {
        bad(
            format!("{field}.{k}"),
            "a variable without a value takes it from the shell running Compose; devices have none: give a value",
        )
    };
    match v {
        Value::Mapping(m) => {
            for (k, val) in m {
                let k = key_str(k, field)?;
                let val = match val {
                    Value::Null => return from_shell(k),
                    Value::String(s) => s.clone(),
                    Value::Number(n) => n.to_string(),
                    Value::Bool(b) => b.to_string(),
                    _ => return bad(format!("{field}.{k}"), "a string, number or boolean"),
                };
                env.insert(k.to_string(), val);
            }
        }
        Value::Sequence(seq) => {
            for (i, item) in seq.iter().enumerate() {
                let s = string(item, &format!("{field}[{i}]"))?;
                match s.split_once('=') {
                    Some((k, val)) => env.insert(k.to_string(), val.to_string()),
                    None => return from_shell(&s),
                };
            }
        }
        _ => return bad(field, "a mapping or a list of KEY=VALUE"),
    }
    Ok(env)
}

pub(super) fn restart(v: &Value, field: &str) -> Checked<RestartName> {
    match string(v, field)?.as_str() {
        "no" => Ok(RestartName::Never),
        "always" | "unless-stopped" => Ok(RestartName::Always),
        "on-failure" => Ok(RestartName::OnFailure),
        other if other.starts_with("on-failure:") => bad(
            field,
            format!("{other:?}: Baton retries failures with a capped backoff, without a count; write on-failure"),
        ),
        other => bad(field, format!("{other:?}: use no, always, unless-stopped or on-failure")),
    }
}

/// `ports:`: `"8080:80"`, `"80"` (published on the same device port: Compose
/// would pick a random one, a device's should be known), `"0.0.0.0:8080:80"`,
/// `"5353:53/udp"`, and the long form `{target, published, protocol}`;
/// `"127.0.0.1:80:80"` is refused (a published port is on every address of
/// the device). With `network_mode: host` the service checks that each
/// published port equals its container port.
pub(super) fn ports(v: &Value, field: &str) -> Checked<Vec<PortManifest>> {
    let Some(seq) = v.as_sequence() else { return bad(field, "a list") };
    let mut out = Vec::new();
    for (i, p) in seq.iter().enumerate() {
        let at = format!("{field}[{i}]");
        let mut port_name = None;
        let (target, published, protocol) = match p {
            Value::Mapping(m) => {
                for k in m.keys() {
                    let k = key_str(k, &at)?;
                    if !matches!(k, "target" | "published" | "protocol" | "mode" | "name") {
                        return bad(format!("{at}.{k}"), format!("{k:?} is not supported for ports"));
                    }
                }
                let target = m
                    .get("target")
                    .map_or_else(|| bad(format!("{at}.target"), "the container port"), |t| scalar(t, &at))?;
                let published = m.get("published").map(|p| scalar(p, &at)).transpose()?;
                let protocol = m.get("protocol").map(|p| string(p, &at)).transpose()?;
                if let Some(n) = m.get("name") {
                    port_name = Some(string(n, &format!("{at}.name"))?);
                }
                (target, published, protocol)
            }
            _ => {
                let text = scalar(p, &at)?;
                let (text, protocol) = match text.split_once('/') {
                    Some((t, proto)) => (t.to_string(), Some(proto.to_string())),
                    None => (text, None),
                };
                let parts: Vec<&str> = text.split(':').collect();
                match parts.as_slice() {
                    [target] => (target.to_string(), None, protocol),
                    [published, target] | ["0.0.0.0", published, target] => {
                        (target.to_string(), Some(published.to_string()), protocol)
                    }
                    [_, published, target] => {
                        return bad(
                            at,
                            format!("{text:?}: a host address cannot be chosen, a container listens on every address of its device; write {published}:{target}"),
                        )
                    }
                    _ => return bad(at, format!("{text:?}: expected PORT, PORT:PORT or 0.0.0.0:PORT:PORT")),
                }
            }
        };
        if target.contains('-') {
            return bad(at, format!("{target:?}: port ranges are not supported; list each port"));
        }
        let Ok(port) = target.parse::<u16>() else { return bad(at, format!("{target:?} is not a port")) };
        let publish = match published.filter(|p| !p.is_empty()) {
            None => port,
            Some(p) if p.contains('-') => {
                return bad(at, format!("{p:?}: port ranges are not supported; list each port"))
            }
            Some(p) => match p.parse::<u16>() {
                Ok(n) if n > 0 => n,
                _ => return bad(at, format!("{p:?} is not a port")),
            },
        };
        if let Some(proto) = protocol.as_deref().filter(|p| !matches!(*p, "tcp" | "udp")) {
            return bad(at, format!("{proto:?}: use tcp or udp"));
        }
        out.push(PortManifest {
            name: port_name.unwrap_or_else(|| format!("p{port}")),
            port,
            protocol,
            publish: Some(publish),
        });
    }
    Ok(out)
}

/// `volumes:` of a service: `NAME:/path[:ro]` (a named volume), `/host:/path[:ro]`
/// (a bind mount; relative host paths are refused: they mean the directory
/// Compose runs in), and the long form `{type, source, target, read_only}`.
pub(super) fn volumes(v: &Value, field: &str, named: &[String]) -> Checked<Vec<VolumeManifest>> {
    let Some(seq) = v.as_sequence() else { return bad(field, "a list") };
    let mut out = Vec::new();
    for (i, item) in seq.iter().enumerate() {
        let at = format!("{field}[{i}]");
        let (kind, source, target, read_only) = match item {
            Value::Mapping(m) => {
                for k in m.keys() {
                    let k = key_str(k, &at)?;
                    if !matches!(k, "type" | "source" | "target" | "read_only" | "tmpfs") {
                        return bad(format!("{at}.{k}"), format!("{k:?} is not supported for volumes"));
                    }
                }
                let get = |k: &str| m.get(k).map(|v| string(v, &format!("{at}.{k}"))).transpose();
                let kind = get("type")?.unwrap_or_else(|| "volume".into());
                let target =
                    get("target")?.map_or_else(|| bad(format!("{at}.target"), "the path in the container"), Ok)?;
                let read_only =
                    m.get("read_only").map(|v| boolean(v, &format!("{at}.read_only"))).transpose()?.unwrap_or(false);
                if kind == "tmpfs" {
                    let size = m
                        .get("tmpfs")
                        .and_then(|t| t.get("size"))
                        .map(|s| scalar(s, &format!("{at}.tmpfs.size")).map(|s| compose_bytes(&s)))
                        .transpose()?
                        .unwrap_or_else(|| DEFAULT_TMPFS.into());
                    out.push(VolumeManifest {
                        path: target,
                        name: None,
                        host_path: None,
                        tmpfs: Some(size),
                        read_only,
                    });
                    continue;
                }
                (kind, get("source")?, target, read_only)
            }
            _ => {
                let text = string(item, &at)?;
                let parts: Vec<&str> = text.split(':').collect();
                let (source, target, mode) = match parts.as_slice() {
                    [target] => (None, target.to_string(), None),
                    [source, target] => (Some(source.to_string()), target.to_string(), None),
                    [source, target, mode] => (Some(source.to_string()), target.to_string(), Some(*mode)),
                    _ => return bad(at, format!("{text:?}: expected SOURCE:TARGET[:ro]")),
                };
                let read_only = match mode {
                    None | Some("rw") => false,
                    Some("ro") => true,
                    Some(other) => return bad(at, format!("{other:?}: use ro or rw")),
                };
                let kind = match &source {
                    Some(s) if s.starts_with('/') || s.starts_with('.') || s.starts_with('~') => "bind",
                    _ => "volume",
                };
                (kind.to_string(), source, target, read_only)
            }
        };
        let volume = match (kind.as_str(), source) {
            ("bind", Some(s)) if s.starts_with('/') => {
                VolumeManifest { path: target, name: None, host_path: Some(s), tmpfs: None, read_only }
            }
            ("bind", Some(s)) => {
                return bad(
                    at,
                    format!("{s:?}: a relative host path means the directory Compose runs in; give an absolute path on the device"),
                )
            }
            ("volume", Some(s)) if named.contains(&s) => {
                VolumeManifest { path: target, name: Some(s), host_path: None, tmpfs: None, read_only }
            }
            ("volume", Some(s)) => {
                return bad(at, format!("volume {s:?} is not declared under the top-level volumes:"))
            }
            ("volume", None) => {
                return bad(at, format!("{target}: anonymous volumes are not supported; name it (NAME:{target}) and declare it under volumes:"))
            }
            (other, _) => return bad(at, format!("type {other:?}: use volume, bind or tmpfs")),
        };
        out.push(volume);
    }
    Ok(out)
}

/// The size of a Compose tmpfs that names none (Docker's is unbounded).
pub(super) const DEFAULT_TMPFS: &str = "64Mi";

/// `tmpfs: /run` or a list of `PATH[:size=N]`.
pub(super) fn tmpfs(v: &Value, field: &str) -> Checked<Vec<VolumeManifest>> {
    let items = match v {
        Value::String(s) => vec![s.clone()],
        _ => strings(v, field)?,
    };
    let mut out = Vec::new();
    for (i, item) in items.iter().enumerate() {
        let (path, opts) = item.split_once(':').unwrap_or((item, ""));
        let mut size = DEFAULT_TMPFS.to_string();
        for opt in opts.split(',').filter(|o| !o.is_empty()) {
            match opt.split_once('=') {
                Some(("size", s)) => size = compose_bytes(s),
                _ => return bad(format!("{field}[{i}]"), format!("{opt:?}: only size= is supported")),
            }
        }
        out.push(VolumeManifest {
            path: path.to_string(),
            name: None,
            host_path: None,
            tmpfs: Some(size),
            read_only: false,
        });
    }
    Ok(out)
}

/// `devices:` `/dev/x` or `/dev/x:/dev/x[:rwm]`: a device appears at its own path.
pub(super) fn devices(v: &Value, field: &str) -> Checked<Vec<String>> {
    let mut out = Vec::new();
    for (i, d) in strings(v, field)?.into_iter().enumerate() {
        let parts: Vec<&str> = d.split(':').collect();
        let host = match parts.as_slice() {
            [host] => *host,
            [host, container] | [host, container, _] if host == container => *host,
            _ => {
                return bad(format!("{field}[{i}]"), format!("{d:?}: a device appears at its own path (/dev/x:/dev/x)"))
            }
        };
        out.push(host.to_string());
    }
    Ok(out)
}

/// `networks:` of a service: only the default network, the device's bridge.
pub(super) fn networks(v: &Value, field: &str) -> Checked<()> {
    let names: Vec<String> = match v {
        Value::Sequence(_) => strings(v, field)?,
        Value::Mapping(m) => m.keys().map(|k| key_str(k, field).map(str::to_string)).collect::<Checked<_>>()?,
        _ => return bad(field, "a list"),
    };
    match names.iter().find(|n| *n != "default") {
        Some(n) => bad(
            field,
            format!("{n:?}: a device has one bridge network its services share (they reach each other by name); named networks are not supported, remove networks"),
        ),
        None => Ok(()),
    }
}

/// `depends_on:` → `uses:` (the endpoints of those services are delivered
/// to this one); conditions are accepted, Baton starts services independently.
pub(super) fn depends_on(v: &Value, field: &str) -> Checked<Vec<String>> {
    match v {
        Value::Sequence(_) => strings(v, field),
        Value::Mapping(m) => m.keys().map(|k| key_str(k, field).map(str::to_string)).collect(),
        _ => bad(field, "a list or a mapping"),
    }
}

/// `deploy:`: `replicas` and `resources.limits` (`memory`, `cpus`, `pids`).
pub(super) fn deploy(v: &Value, field: &str, m: &mut Manifest) -> Checked<()> {
    let Some(d) = v.as_mapping() else { return bad(field, "a mapping") };
    for (k, val) in d {
        let k = key_str(k, field)?;
        let at = format!("{field}.{k}");
        match k {
            "replicas" => {
                let n = val.as_u64().and_then(|n| u32::try_from(n).ok());
                m.replicas = Some(n.map_or_else(|| bad(&at, "a number of devices"), Ok)?);
            }
            "resources" => {
                let Some(r) = val.as_mapping() else { return bad(at, "a mapping") };
                for (rk, rv) in r {
                    let rk = key_str(rk, &at)?;
                    let rat = format!("{at}.{rk}");
                    match rk {
                        "limits" => {
                            let Some(l) = rv.as_mapping() else { return bad(rat, "a mapping") };
                            for (lk, lv) in l {
                                let lk = key_str(lk, &rat)?;
                                let lat = format!("{rat}.{lk}");
                                match lk {
                                    "memory" => m.resources.memory = Some(compose_bytes(&scalar(lv, &lat)?)),
                                    "cpus" => m.resources.cpu = Some(scalar(lv, &lat)?),
                                    "pids" => {
                                        let n = lv.as_u64().and_then(|n| u32::try_from(n).ok());
                                        m.resources.pids = Some(n.map_or_else(|| bad(&lat, "a number"), Ok)?)
                                    }
                                    other => return bad(lat, format!("{other:?}: limits are memory, cpus and pids")),
                                }
                            }
                        }
                        "reservations" => {
                            return bad(rat, "Baton places by limits; move memory and cpus under limits")
                        }
                        other => return bad(rat, format!("{other:?}: only limits are supported")),
                    }
                }
            }
            other => {
                return bad(
                    at,
                    format!("{other:?} is not supported under deploy (replicas and resources are); placement goes under x-baton"),
                )
            }
        }
    }
    Ok(())
}

/// Compose sizes (`512m`, `1g`, `1gb`, `100k`) → Baton's (`512M`…): Docker's
/// units are binary, so `m` is MiB.
pub(super) fn compose_bytes(s: &str) -> String {
    let lower = s.trim().to_ascii_lowercase();
    let lower = lower.strip_suffix('b').filter(|l| l.ends_with(['k', 'm', 'g'])).unwrap_or(&lower);
    match lower.chars().last() {
        Some('k') => format!("{}Ki", &lower[..lower.len() - 1]),
        Some('m') => format!("{}Mi", &lower[..lower.len() - 1]),
        Some('g') => format!("{}Gi", &lower[..lower.len() - 1]),
        _ => lower.to_string(),
    }
}

/// `healthcheck:` → the readiness probe (a Compose health check decides
/// whether the service is healthy; as in Docker, it does not restart it).
pub(super) fn health(v: &Value, field: &str) -> Checked<Option<ProbeManifest>> {
    let Some(h) = v.as_mapping() else { return bad(field, "a mapping") };
    if h.get("disable").and_then(Value::as_bool) == Some(true) {
        return Ok(None);
    }
    let mut p = ProbeManifest {
        exec: None,
        tcp: None,
        http: None::<HttpProbe>,
        interval: 30,
        timeout: 30,
        failure_threshold: 3,
        initial_delay: 0,
    };
    for (k, val) in h {
        let k = key_str(k, field)?;
        let at = format!("{field}.{k}");
        match k {
            "test" => {
                let argv = match val {
                    Value::String(s) => vec!["/bin/sh".into(), "-c".into(), s.clone()],
                    _ => {
                        let list = strings(val, &at)?;
                        match list.split_first() {
                            Some((first, rest)) if first == "CMD" && !rest.is_empty() => rest.to_vec(),
                            Some((first, [cmd])) if first == "CMD-SHELL" => {
                                vec!["/bin/sh".into(), "-c".into(), cmd.clone()]
                            }
                            Some((first, [])) if first == "NONE" => return Ok(None),
                            _ => return bad(at, "use [\"CMD\", PROGRAM, ARGS…], [\"CMD-SHELL\", COMMAND] or a string"),
                        }
                    }
                };
                p.exec = Some(argv);
            }
            "interval" => p.interval = seconds(val, &at)?,
            "timeout" => p.timeout = seconds(val, &at)?,
            "start_period" => p.initial_delay = seconds(val, &at)?,
            "retries" => {
                p.failure_threshold =
                    val.as_u64().and_then(|n| u32::try_from(n).ok()).map_or_else(|| bad(&at, "a number"), Ok)?
            }
            "disable" => {}
            other => {
                return bad(at, format!("{other:?}: a healthcheck has test, interval, timeout, retries, start_period"))
            }
        }
    }
    if p.exec.is_none() {
        return bad(format!("{field}.test"), "the command that checks health");
    }
    Ok(Some(p))
}

/// Compose durations (`30s`, `1m30s`, `500ms`, `1h`) → whole seconds (at least 1).
pub(super) fn seconds(v: &Value, field: &str) -> Checked<u32> {
    let text = scalar(v, field)?;
    let mut total_ms: u64 = 0;
    let mut number = String::new();
    let mut chars = text.trim().chars().peekable();
    let invalid = || bad(field, format!("{text:?}: use a duration such as 30s, 1m30s or 500ms"));
    while let Some(c) = chars.next() {
        if c.is_ascii_digit() || c == '.' {
            number.push(c);
            continue;
        }
        let unit = match (c, chars.peek()) {
            ('m', Some('s')) => {
                chars.next();
                1
            }
            ('h', _) => 3_600_000,
            ('m', _) => 60_000,
            ('s', _) => 1000,
            _ => return invalid(),
        };
        let Ok(n) = number.parse::<f64>() else { return invalid() };
        total_ms += (n * unit as f64) as u64;
        number.clear();
    }
    if !number.is_empty() {
        return invalid();
    }
    Ok(u32::try_from(total_ms.div_ceil(1000).max(1)).unwrap_or(u32::MAX))
}

/// `x-baton:` — Baton's own settings for this service, written as in a
/// Baton manifest: placement, rollout, health_deadline, secrets, files, uses,
/// restart_backoff_cap, allow_privilege_escalation.
pub(super) fn baton_extension(v: &Value, field: &str, m: &mut Manifest) -> Checked<()> {
    let Some(x) = v.as_mapping() else { return bad(field, "a mapping") };
    for (k, val) in x {
        let k = key_str(k, field)?;
        let at = format!("{field}.{k}");
        let parse_err = |e: serde_yaml::Error| FieldError { field: at.clone(), message: e.to_string() };
        match k {
            "placement" => m.placement = serde_yaml::from_value(val.clone()).map_err(parse_err)?,
            "rollout" => m.rollout = Some(serde_yaml::from_value(val.clone()).map_err(parse_err)?),
            "health_deadline" => m.health_deadline = Some(serde_yaml::from_value(val.clone()).map_err(parse_err)?),
            "secrets" => m.secrets = serde_yaml::from_value(val.clone()).map_err(parse_err)?,
            "files" => m.files = serde_yaml::from_value::<Vec<FileManifest>>(val.clone()).map_err(parse_err)?,
            "uses" => m.uses.extend(serde_yaml::from_value::<Vec<String>>(val.clone()).map_err(parse_err)?),
            "restart_backoff_cap" => {
                m.restart_backoff_cap = Some(serde_yaml::from_value(val.clone()).map_err(parse_err)?)
            }
            "allow_privilege_escalation" => {
                m.allow_privilege_escalation = serde_yaml::from_value(val.clone()).map_err(parse_err)?
            }
            "liveness" => m.liveness = Some(serde_yaml::from_value(val.clone()).map_err(parse_err)?),
            "allow_from" => m.allow_from = Some(serde_yaml::from_value(val.clone()).map_err(parse_err)?),
            "bandwidth" => m.resources.network = Some(serde_yaml::from_value(val.clone()).map_err(parse_err)?),
            "replicas" => return bad(at, "write it as deploy.replicas"),
            other => return bad(
                at,
                format!("{other:?} is not a Baton setting x-baton takes (it takes placement, rollout, health_deadline, secrets, files, uses, restart_backoff_cap, allow_privilege_escalation, liveness, allow_from, bandwidth)"),
            ),
        }
    }
    Ok(())
}
