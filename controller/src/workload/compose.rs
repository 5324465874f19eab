//! **Pure**: Compose files (`docker-compose.yml`, `compose.yaml`) → Baton
//! manifests, one workload per service. The Compose specification's common
//! subset is read; every key outside it is refused with an error naming it
//! and saying what to write instead — never silently ignored, since a
//! setting that quietly does nothing is worse than a refusal.
//!
//! Baton runs containers on the device's network (`network_mode: host`
//! semantics), so a published port must equal its container port. Baton-only
//! settings (placement, rollout waves) go under a service's `x-baton` key,
//! written as in a Baton manifest.

use std::collections::BTreeMap;

use serde_yaml::{Mapping, Value};

use super::validate::FieldError;
use super::{FileManifest, HttpProbe, Manifest, NetworkName, PortManifest, ProbeManifest, RestartName, VolumeManifest};

type Checked<T> = Result<T, FieldError>;

fn bad<T>(field: impl Into<String>, message: impl Into<String>) -> Checked<T> {
    Err(FieldError { field: field.into(), message: message.into() })
}

/// Whether a YAML document is a Compose file (it has `services:`; a Baton
/// manifest never does).
pub fn is_compose(doc: &Value) -> bool {
    doc.as_mapping().is_some_and(|m| m.contains_key("services"))
}

/// The manifests of every service of a Compose document, in file order.
pub fn manifests(doc: &Value) -> Checked<Vec<Manifest>> {
    let mut doc = doc.clone();
    // YAML merge keys (`<<: *common`), which real Compose files use for shared settings.
    doc.apply_merge().map_err(|e| FieldError { field: "(document)".into(), message: e.to_string() })?;
    interpolate_all(&mut doc, "")?;
    let Some(top) = doc.as_mapping() else { return bad("(document)", "a Compose file is a mapping") };
    let mut named_volumes: Vec<String> = Vec::new();
    for (k, v) in top {
        let key = key_str(k, "(document)")?;
        match key {
            "services" => {}
            // Obsolete in the Compose specification itself; Compose ignores it too.
            "version" => {}
            "volumes" => named_volumes = top_volumes(v)?,
            "secrets" => {
                return bad(
                    "secrets",
                    "Compose file secrets would travel in plain text: create each with `baton secret create NAME --from-file FILE` and mount it with `x-baton: {secrets: [{name: NAME, path: /run/secrets/NAME}]}`",
                )
            }
            "networks" => {
                return bad(
                    "networks",
                    "Baton runs containers on the device's own network (no bridge networks); remove networks",
                )
            }
            "name" => {
                return bad(
                    "name",
                    "Baton has no projects: each service is a workload named after it, fleet-wide (two projects must not share a service name); remove name",
                )
            }
            k if k.starts_with("x-") => {}
            other => return bad(other, format!("{other:?} is not supported in Baton's Compose subset")),
        }
    }
    let Some(services) = top.get("services").and_then(Value::as_mapping) else {
        return bad("services", "a mapping of service name → service");
    };
    let mut out: Vec<Manifest> = Vec::new();
    for (name, svc) in services {
        let name = key_str(name, "services")?;
        out.push(service(name, svc, &named_volumes)?);
    }
    if out.is_empty() {
        return bad("services", "no services");
    }
    for m in &out {
        if let Some(d) = m.uses.iter().find(|d| !out.iter().any(|o| &o.name == *d)) {
            return bad(format!("services.{}.depends_on", m.name), format!("{d:?} is not a service of this file"));
        }
        // Containers share their device's network: two services publishing
        // one port would fight over it wherever they meet.
        for p in &m.ports {
            if let Some(o) = out
                .iter()
                .take_while(|o| o.name != m.name)
                .find(|o| o.ports.iter().any(|q| q.port == p.port && q.protocol == p.protocol))
            {
                return bad(
                    format!("services.{}.ports", m.name),
                    format!(
                        "port {} is published by {} too; on a device's network only one container can have it",
                        p.port, o.name
                    ),
                );
            }
        }
    }
    Ok(out)
}

/// Compose's interpolation in every string value: `$$` is a literal `$`,
/// `${VAR:-default}` and `${VAR-default}` take the default. A variable
/// without a default comes from the shell where Compose runs, which the
/// controller does not have: refused, naming it.
fn interpolate_all(v: &mut Value, field: &str) -> Checked<()> {
    match v {
        Value::String(s) => *s = interpolate(s).map_err(|m| FieldError { field: field.to_string(), message: m })?,
        Value::Sequence(seq) => {
            for (i, item) in seq.iter_mut().enumerate() {
                interpolate_all(item, &format!("{field}[{i}]"))?;
            }
        }
        Value::Mapping(m) => {
            for (k, item) in m.iter_mut() {
                let k = k.as_str().unwrap_or("?");
                let at = if field.is_empty() { k.to_string() } else { format!("{field}.{k}") };
                interpolate_all(item, &at)?;
            }
        }
        _ => {}
    }
    Ok(())
}

pub fn interpolate(s: &str) -> Result<String, String> {
    let mut out = String::with_capacity(s.len());
    let mut rest = s;
    while let Some(i) = rest.find('$') {
        out.push_str(&rest[..i]);
        rest = &rest[i + 1..];
        if let Some(r) = rest.strip_prefix('$') {
            out.push('$');
            rest = r;
        } else if let Some(r) = rest.strip_prefix('{') {
            let end = matching_brace(r).ok_or_else(|| format!("{s:?}: unterminated ${{"))?;
            out.push_str(&unset_variable(&r[..end])?);
            rest = &r[end + 1..];
        } else {
            let name: String = rest.chars().take_while(|c| c.is_ascii_alphanumeric() || *c == '_').collect();
            if name.is_empty() {
                out.push('$');
            } else {
                return Err(format!(
                    "${name} is read from the shell where Compose runs, which Baton does not have: write the value (or $$ for a literal $)"
                ));
            }
        }
    }
    out.push_str(rest);
    Ok(out)
}

/// Where the `}` closing a `${` is (defaults may hold `${…}` themselves).
fn matching_brace(r: &str) -> Option<usize> {
    let mut depth = 0usize;
    for (i, c) in r.char_indices() {
        match c {
            '{' => depth += 1,
            '}' if depth == 0 => return Some(i),
            '}' => depth -= 1,
            _ => {}
        }
    }
    None
}

/// What `${expr}` is with its variable unset, as it always is here: the
/// default of `:-` / `-`, nothing for `:+` / `+`, a refusal for `:?` / `?`
/// and for a bare variable.
fn unset_variable(expr: &str) -> Result<String, String> {
    let len = expr.find(|c: char| !(c.is_ascii_alphanumeric() || c == '_')).unwrap_or(expr.len());
    let (name, op) = expr.split_at(len);
    if name.is_empty() {
        return Err(format!("${{{expr}}}: expected ${{NAME}}, ${{NAME:-DEFAULT}} or $$"));
    }
    let shell = "is read from the shell where Compose runs, which Baton does not have";
    if op.is_empty() {
        return Err(format!("${{{name}}} {shell}: write the value, or ${{{name}:-DEFAULT}}"));
    }
    if let Some(default) = op.strip_prefix(":-").or_else(|| op.strip_prefix('-')) {
        return interpolate(default);
    }
    if op.starts_with(":+") || op.starts_with('+') {
        return Ok(String::new());
    }
    if let Some(message) = op.strip_prefix(":?").or_else(|| op.strip_prefix('?')) {
        return Err(format!("${{{name}}} must be set ({message}); it {shell}: write the value"));
    }
    Err(format!("${{{expr}}}: use ${{{name}}}, ${{{name}:-DEFAULT}}, ${{{name}:+VALUE}} or ${{{name}:?MESSAGE}}"))
}

/// Compose reads `env_file`s where it runs; so does `baton apply`: this
/// inlines each service's env files into its `environment` (which wins over
/// them, as in Compose; a later file over an earlier one). `read` gets each
/// path as written (the CLI resolves it against the Compose file's
/// directory). None when the text is not a Compose file with env files.
pub fn inline_env_files(text: &str, read: impl Fn(&str) -> Result<String, String>) -> Result<Option<String>, String> {
    let Ok(mut doc) = serde_yaml::from_str::<Value>(text) else { return Ok(None) };
    if !is_compose(&doc) {
        return Ok(None);
    }
    let Some(services) = doc.get_mut("services").and_then(Value::as_mapping_mut) else { return Ok(None) };
    let mut changed = false;
    for (name, svc) in services.iter_mut() {
        let name = name.as_str().unwrap_or("?").to_string();
        let Some(svc) = svc.as_mapping_mut() else { continue };
        let Some(files) = svc.remove("env_file") else { continue };
        changed = true;
        let paths: Vec<String> = match files {
            Value::String(p) => vec![p],
            Value::Sequence(seq) => seq
                .into_iter()
                .map(|v| match v {
                    Value::String(p) => Ok(p),
                    Value::Mapping(m) => match m.get("path").and_then(Value::as_str) {
                        Some(p) => Ok(p.to_string()),
                        None => Err(format!("services.{name}.env_file: an entry without a path")),
                    },
                    _ => Err(format!("services.{name}.env_file: a path or a list of paths")),
                })
                .collect::<Result<_, _>>()?,
            _ => return Err(format!("services.{name}.env_file: a path or a list of paths")),
        };
        let mut env = Mapping::new();
        for path in &paths {
            let text = read(path).map_err(|e| format!("services.{name}.env_file: {path}: {e}"))?;
            for (k, v) in parse_env_file(&text).map_err(|e| format!("services.{name}.env_file: {path}: {e}"))? {
                env.insert(Value::String(k), Value::String(v));
            }
        }
        // What `environment` says wins.
        match svc.get("environment") {
            None | Some(Value::Null) => {}
            Some(Value::Mapping(m)) => {
                for (k, v) in m {
                    env.insert(k.clone(), v.clone());
                }
            }
            Some(Value::Sequence(seq)) => {
                for item in seq {
                    let Some(s) = item.as_str() else { continue };
                    match s.split_once('=') {
                        Some((k, v)) => env.insert(Value::String(k.into()), Value::String(v.into())),
                        None => env.insert(Value::String(s.into()), Value::Null),
                    };
                }
            }
            Some(_) => return Err(format!("services.{name}.environment: a mapping or a list of KEY=VALUE")),
        }
        svc.insert(Value::String("environment".into()), Value::Mapping(env));
    }
    if !changed {
        return Ok(None);
    }
    serde_yaml::to_string(&doc).map(Some).map_err(|e| e.to_string())
}

/// What a Compose user may expect to be read and is not: a `.env` beside
/// the file, and variables set in the caller's shell that `${NAME…}` names
/// (Baton interpolates with defaults only). Warnings, one per cause.
pub fn unread_variables(text: &str, dot_env: bool, is_set: impl Fn(&str) -> bool) -> Vec<String> {
    let Ok(doc) = serde_yaml::from_str::<Value>(text) else { return Vec::new() };
    if !is_compose(&doc) {
        return Vec::new();
    }
    let mut out = Vec::new();
    if dot_env {
        out.push("a .env file is beside it: Baton does not read it for ${…} (values come from defaults only; env_file is read)".to_string());
    }
    let mut seen = std::collections::BTreeSet::new();
    for part in text.split("${").skip(1) {
        let name: String = part.chars().take_while(|c| c.is_ascii_alphanumeric() || *c == '_').collect();
        if !name.is_empty() && is_set(&name) && seen.insert(name.clone()) {
            out.push(format!("${{{name}…}} takes its default: your shell's {name} is not read"));
        }
    }
    out
}

/// An env file: `KEY=VALUE` lines (an optional `export `, values optionally
/// in single or double quotes), blank lines and `#` comments.
pub fn parse_env_file(text: &str) -> Result<Vec<(String, String)>, String> {
    let mut out = Vec::new();
    for (i, line) in text.lines().enumerate() {
        let line = line.trim();
        if line.is_empty() || line.starts_with('#') {
            continue;
        }
        let line = line.strip_prefix("export ").unwrap_or(line);
        let Some((k, v)) = line.split_once('=') else {
            return Err(format!("line {}: {line:?} takes its value from the shell; write KEY=VALUE", i + 1));
        };
        let v = v.trim();
        let v = match (v.chars().next(), v.chars().last()) {
            (Some('"'), Some('"')) | (Some('\''), Some('\'')) if v.len() >= 2 => &v[1..v.len() - 1],
            _ => v,
        };
        out.push((k.trim().to_string(), v.to_string()));
    }
    Ok(out)
}

fn key_str<'v>(k: &'v Value, at: &str) -> Checked<&'v str> {
    k.as_str().map_or_else(|| bad(at, format!("{k:?}: keys are strings")), Ok)
}

/// Top-level `volumes:`: named volumes without driver options.
fn top_volumes(v: &Value) -> Checked<Vec<String>> {
    let Some(m) = v.as_mapping() else { return bad("volumes", "a mapping of volume name → options") };
    let mut names = Vec::new();
    for (k, opts) in m {
        let name = key_str(k, "volumes")?;
        let empty = opts.is_null() || opts.as_mapping().is_some_and(Mapping::is_empty);
        if !empty {
            return bad(
                format!("volumes.{name}"),
                "volume drivers and options are not supported: a Baton volume is a directory on the device's data disk",
            );
        }
        names.push(name.to_string());
    }
    Ok(names)
}

fn service(name: &str, svc: &Value, named_volumes: &[String]) -> Checked<Manifest> {
    let at = |field: &str| format!("services.{name}.{field}");
    let Some(svc) = svc.as_mapping() else { return bad(format!("services.{name}"), "a service is a mapping") };
    // Compose's default restart policy is `no` (Baton's is `always`).
    let mut m = Manifest { name: name.to_string(), restart: RestartName::Never, ..Manifest::default() };
    let mut healthcheck = None;
    for (k, v) in svc {
        let key = key_str(k, &format!("services.{name}"))?;
        let field = at(key);
        match key {
            "image" => m.image = string(v, &field)?,
            "build" => {
                return bad(
                    field,
                    "Baton runs images from a registry or the device's store: build and push the image, then name it in image:",
                )
            }
            "entrypoint" => m.command = words(v, &field)?,
            "command" => m.args = words(v, &field)?,
            "environment" => m.env.extend(environment(v, &field)?),
            "env_file" => {
                return bad(
                    field,
                    "env files are read where `baton apply` runs (it inlines them): apply the file with the CLI, or put the variables under environment:",
                )
            }
            "working_dir" => m.working_dir = Some(string(v, &field)?),
            "user" => m.user = Some(scalar(v, &field)?),
            "hostname" => m.hostname = Some(string(v, &field)?),
            "restart" => m.restart = restart(v, &field)?,
            "ports" => m.ports = ports(v, &field)?,
            "expose" => {
                // Documentation of the ports the service listens on; on the
                // device's network they are reachable anyway.
                for p in ports(v, &field)? {
                    if !m.ports.iter().any(|q| q.port == p.port) {
                        m.ports.push(p);
                    }
                }
            }
            "volumes" => m.volumes.extend(volumes(v, &field, named_volumes)?),
            "tmpfs" => m.volumes.extend(tmpfs(v, &field)?),
            "devices" => m.devices = devices(v, &field)?,
            "network_mode" => {
                m.network = match string(v, &field)?.as_str() {
                    "host" => NetworkName::Host,
                    "none" => NetworkName::None,
                    other => return bad(field, format!("{other:?}: Baton runs containers on the device's network (host) or with none")),
                }
            }
            "networks" => networks(v, &field)?,
            "privileged" => m.privileged = boolean(v, &field)?,
            "read_only" => m.read_only = boolean(v, &field)?,
            "cap_add" => m.cap_add = strings(v, &field)?,
            "cap_drop" => m.cap_drop = strings(v, &field)?,
            "security_opt" => {
                for (i, opt) in strings(v, &field)?.iter().enumerate() {
                    match opt.as_str() {
                        "seccomp:unconfined" | "seccomp=unconfined" => m.seccomp_unconfined = true,
                        "no-new-privileges" | "no-new-privileges:true" | "no-new-privileges=true" => {}
                        other => {
                            return bad(format!("{field}[{i}]"), format!("{other:?}: only seccomp:unconfined and no-new-privileges are supported"))
                        }
                    }
                }
            }
            "healthcheck" => healthcheck = Some(v),
            "depends_on" => m.uses = depends_on(v, &field)?,
            "deploy" => deploy(v, &field, &mut m)?,
            "x-baton" => baton_extension(v, &field, &mut m)?,
            "container_name" => {
                return bad(field, "Baton names each container after its service and device; remove container_name")
            }
            "labels" => {
                return bad(
                    field,
                    "Baton keeps no container labels; to choose devices, use x-baton: {placement: {selector: {KEY: VALUE}}}",
                )
            }
            other if other.starts_with("x-") => {}
            "mem_limit" => return bad(field, "write it as deploy.resources.limits.memory"),
            "cpus" => return bad(field, "write it as deploy.resources.limits.cpus"),
            "pids_limit" => return bad(field, "write it as deploy.resources.limits.pids"),
            "init" | "tty" | "stdin_open" | "logging" | "stop_grace_period" | "stop_signal" | "pull_policy" => {
                return bad(
                    field,
                    format!("{key:?} has no Baton equivalent (the agent keeps logs, stops with a grace period and pulls as the controller pins); remove it"),
                )
            }
            other => {
                return bad(field, format!("{other:?} is not supported in Baton's Compose subset; remove it or write a Baton manifest"))
            }
        }
    }
    if m.image.is_empty() {
        return bad(at("image"), "every service needs an image");
    }
    if m.network == NetworkName::None && !m.ports.is_empty() {
        return bad(at("ports"), "network_mode: none has no network to publish a port on");
    }
    if let Some(h) = healthcheck {
        m.readiness = health(h, &at("healthcheck"))?;
    }
    Ok(m)
}

fn string(v: &Value, field: &str) -> Checked<String> {
    v.as_str().map(str::to_string).map_or_else(|| bad(field, "a string"), Ok)
}

/// A string or a number (`user: 1000`, `user: "1000:1000"`).
fn scalar(v: &Value, field: &str) -> Checked<String> {
    match v {
        Value::String(s) => Ok(s.clone()),
        Value::Number(n) => Ok(n.to_string()),
        _ => bad(field, "a string or a number"),
    }
}

fn boolean(v: &Value, field: &str) -> Checked<bool> {
    v.as_bool().map_or_else(|| bad(field, "true or false"), Ok)
}

fn strings(v: &Value, field: &str) -> Checked<Vec<String>> {
    let Some(seq) = v.as_sequence() else { return bad(field, "a list") };
    seq.iter().enumerate().map(|(i, s)| scalar(s, &format!("{field}[{i}]"))).collect()
}

/// A list, or a string split as a shell would split words (quotes, no
/// expansion): Compose's `command: echo "a b"`.
fn words(v: &Value, field: &str) -> Checked<Vec<String>> {
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
fn environment(v: &Value, field: &str) -> Checked<BTreeMap<String, String>> {
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

fn restart(v: &Value, field: &str) -> Checked<RestartName> {
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

/// `ports:`: `"80"`, `"80:80"`, `"127.0.0.1:80:80"` is refused (the device's
/// addresses are its own), `"8080:80"` too (no port mapping on the device's
/// network), and the long form `{target, published, protocol}`.
fn ports(v: &Value, field: &str) -> Checked<Vec<PortManifest>> {
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
        if let Some(p) = published.filter(|p| !p.is_empty() && *p != target) {
            return bad(
                at,
                format!("{p}:{target}: containers share the device's network, so port {target} is published as {target}; map {target}:{target} or make the app listen on {p}"),
            );
        }
        if let Some(proto) = protocol.as_deref().filter(|p| !matches!(*p, "tcp" | "udp")) {
            return bad(at, format!("{proto:?}: use tcp or udp"));
        }
        out.push(PortManifest { name: port_name.unwrap_or_else(|| format!("p{port}")), port, protocol });
    }
    Ok(out)
}

/// `volumes:` of a service: `NAME:/path[:ro]` (a named volume), `/host:/path[:ro]`
/// (a bind mount; relative host paths are refused: they mean the directory
/// Compose runs in), and the long form `{type, source, target, read_only}`.
fn volumes(v: &Value, field: &str, named: &[String]) -> Checked<Vec<VolumeManifest>> {
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
const DEFAULT_TMPFS: &str = "64Mi";

/// `tmpfs: /run` or a list of `PATH[:size=N]`.
fn tmpfs(v: &Value, field: &str) -> Checked<Vec<VolumeManifest>> {
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
fn devices(v: &Value, field: &str) -> Checked<Vec<String>> {
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

/// `networks:` of a service: only the default network, which is the device's.
fn networks(v: &Value, field: &str) -> Checked<()> {
    let names: Vec<String> = match v {
        Value::Sequence(_) => strings(v, field)?,
        Value::Mapping(m) => m.keys().map(|k| key_str(k, field).map(str::to_string)).collect::<Checked<_>>()?,
        _ => return bad(field, "a list"),
    };
    match names.iter().find(|n| *n != "default") {
        Some(n) => bad(field, format!("{n:?}: Baton runs containers on the device's own network; remove networks")),
        None => Ok(()),
    }
}

/// `depends_on:` → `uses:` (the endpoints of those services are delivered
/// to this one); conditions are accepted, Baton starts services independently.
fn depends_on(v: &Value, field: &str) -> Checked<Vec<String>> {
    match v {
        Value::Sequence(_) => strings(v, field),
        Value::Mapping(m) => m.keys().map(|k| key_str(k, field).map(str::to_string)).collect(),
        _ => bad(field, "a list or a mapping"),
    }
}

/// `deploy:`: `replicas` and `resources.limits` (`memory`, `cpus`, `pids`).
fn deploy(v: &Value, field: &str, m: &mut Manifest) -> Checked<()> {
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
fn compose_bytes(s: &str) -> String {
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
fn health(v: &Value, field: &str) -> Checked<Option<ProbeManifest>> {
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
fn seconds(v: &Value, field: &str) -> Checked<u32> {
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
fn baton_extension(v: &Value, field: &str, m: &mut Manifest) -> Checked<()> {
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
            "replicas" => return bad(at, "write it as deploy.replicas"),
            other => return bad(at, format!("{other:?} is not a Baton setting x-baton takes")),
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn compose(text: &str) -> Checked<Vec<Manifest>> {
        let doc: Value = serde_yaml::from_str(text).expect("yaml");
        assert!(is_compose(&doc));
        manifests(&doc)
    }

    fn refused(text: &str) -> FieldError {
        compose(text).expect_err("refused")
    }

    #[test]
    fn a_project_in_the_usual_style() {
        let text = r#"
version: "3.8"
services:
  db:
    image: postgres:16-alpine
    environment:
      POSTGRES_PASSWORD: example
      POSTGRES_DB: app
    volumes:
      - pgdata:/var/lib/postgresql/data
    healthcheck:
      test: ["CMD-SHELL", "pg_isready -U postgres"]
      interval: 10s
      timeout: 5s
      retries: 5
      start_period: 1m
    restart: unless-stopped
  web:
    image: registry.local/web:1.4
    entrypoint: ["/app/web"]
    command: --port 8080 --db "host=db user=postgres"
    ports:
      - "8080:8080"
      - 9090/udp
    environment:
      - MODE=production
      - EMPTY=
    depends_on:
      db:
        condition: service_healthy
    volumes:
      - /srv/web/config:/etc/web:ro
      - type: tmpfs
        target: /tmp
        tmpfs: {size: 16m}
    devices: ["/dev/ttyUSB0:/dev/ttyUSB0:rwm"]
    user: "1000:1000"
    deploy:
      replicas: 2
      resources:
        limits: {memory: 256m, cpus: "0.5"}
    x-baton:
      placement: {selector: {site: lyon}}
      rollout: {waves: [1, 50%, 100%], min_ready: 30}
volumes:
  pgdata:
"#;
        let ms = compose(text).expect("the common subset");
        assert_eq!(ms.iter().map(|m| m.name.as_str()).collect::<Vec<_>>(), ["db", "web"]);
        let (db, web) = (&ms[0], &ms[1]);
        assert_eq!(db.env["POSTGRES_DB"], "app");
        assert_eq!(db.volumes[0].name.as_deref(), Some("pgdata"));
        assert_eq!(db.restart, RestartName::Always);
        let r = db.readiness.as_ref().expect("healthcheck → readiness");
        assert_eq!(r.exec.as_deref(), Some(&["/bin/sh".to_string(), "-c".into(), "pg_isready -U postgres".into()][..]));
        assert_eq!((r.interval, r.timeout, r.failure_threshold, r.initial_delay), (10, 5, 5, 60));
        assert_eq!(web.command, ["/app/web"]);
        assert_eq!(web.args, ["--port", "8080", "--db", "host=db user=postgres"]);
        assert_eq!(
            web.ports.iter().map(|p| (p.port, p.protocol.clone())).collect::<Vec<_>>(),
            [(8080, None), (9090, Some("udp".into()))]
        );
        assert_eq!(web.env["MODE"], "production");
        assert_eq!(web.env["EMPTY"], "");
        assert_eq!(web.uses, ["db"]);
        assert_eq!(web.volumes[0].host_path.as_deref(), Some("/srv/web/config"));
        assert!(web.volumes[0].read_only);
        assert_eq!(web.volumes[1].tmpfs.as_deref(), Some("16Mi"));
        assert_eq!(web.devices, ["/dev/ttyUSB0"]);
        assert_eq!(web.user.as_deref(), Some("1000:1000"));
        assert_eq!(web.replicas, Some(2));
        assert_eq!(web.resources.memory.as_deref(), Some("256Mi"));
        assert_eq!(web.resources.cpu.as_deref(), Some("0.5"));
        assert_eq!(web.placement.selector["site"], "lyon");
        assert!(web.rollout.is_some());
        // Both validate as Baton manifests.
        for m in &ms {
            super::super::validate(m).unwrap_or_else(|e| panic!("{}: {e}", m.name));
        }
    }

    #[test]
    fn what_is_refused_is_named() {
        for (text, field, says) in [
            ("services: {a: {image: x, build: .}}", "services.a.build", "build and push"),
            ("services: {a: {image: x, ports: ['8080:80']}}", "services.a.ports[0]", "80:80"),
            ("services: {a: {image: x, ports: ['127.0.0.1:80:80']}}", "services.a.ports[0]", "write 80:80"),
            ("services: {a: {image: x, ports: ['8000-8010']}}", "services.a.ports[0]", "ranges"),
            ("services: {a: {image: x, volumes: ['./data:/data']}}", "services.a.volumes[0]", "absolute path"),
            ("services: {a: {image: x, volumes: ['data:/data']}}", "services.a.volumes[0]", "not declared"),
            ("services: {a: {image: x, volumes: ['/data']}}", "services.a.volumes[0]", "anonymous"),
            ("services: {a: {image: x, environment: [HOME]}}", "services.a.environment.HOME", "give a value"),
            ("services: {a: {image: x, environment: {HOME: }}}", "services.a.environment.HOME", "give a value"),
            ("services: {a: {image: x, env_file: .env}}", "services.a.env_file", "environment:"),
            ("services: {a: {image: x, restart: 'on-failure:3'}}", "services.a.restart", "on-failure"),
            ("services: {a: {image: x, networks: [backend]}}", "services.a.networks", "own network"),
            ("services: {a: {image: x, network_mode: bridge}}", "services.a.network_mode", "host"),
            ("services: {a: {image: x, labels: {k: v}}}", "services.a.labels", "selector"),
            ("services: {a: {image: x, container_name: c}}", "services.a.container_name", "after its service"),
            ("services: {a: {image: x, stop_signal: SIGINT}}", "services.a.stop_signal", "no Baton equivalent"),
            ("services: {a: {image: x, ulimits: {}}}", "services.a.ulimits", "not supported"),
            ("services: {a: {image: x, deploy: {placement: {}}}}", "services.a.deploy.placement", "x-baton"),
            (
                "services: {a: {image: x, deploy: {resources: {reservations: {}}}}}",
                "services.a.deploy.resources.reservations",
                "limits",
            ),
            ("services: {a: {image: x, devices: ['/dev/a:/dev/b']}}", "services.a.devices[0]", "own path"),
            ("services: {a: {image: x, healthcheck: {test: [CMD]}}}", "services.a.healthcheck.test", "CMD"),
            ("services: {a: {image: x, x-baton: {bogus: 1}}}", "services.a.x-baton.bogus", "not a Baton setting"),
            ("services: {a: {command: x}}", "services.a.image", "needs an image"),
            ("services: {a: {image: x}}\nnetworks: {n: {}}", "networks", "own network"),
            ("services: {a: {image: x}}\nsecrets: {s: {file: s}}", "secrets", "baton secret create"),
            ("services: {a: {image: x}}\nvolumes: {v: {driver: nfs}}", "volumes.v", "drivers"),
            ("services: {a: {image: x}}\nconfigs: {}", "configs", "not supported"),
            ("name: shop\nservices: {a: {image: x}}", "name", "no projects"),
            ("services: {a: {image: x, depends_on: [nosuch]}}", "services.a.depends_on", "not a service of this file"),
            (
                "services: {a: {image: x, ports: ['80:80']}, b: {image: y, ports: ['80']}}",
                "services.b.ports",
                "published by a",
            ),
            (
                "services: {a: {image: x, network_mode: none, ports: ['80:80']}}",
                "services.a.ports",
                "network_mode: none",
            ),
            ("services: {a: {image: x, mem_limit: 64m}}", "services.a.mem_limit", "deploy.resources.limits.memory"),
            ("services: {a: {image: x, init: true}}", "services.a.init", "remove it"),
            ("services: {a: {image: x, x-baton: {replicas: 2}}}", "services.a.x-baton.replicas", "deploy.replicas"),
        ] {
            let e = refused(text);
            assert_eq!(e.field, field, "{text}");
            assert!(e.message.contains(says), "{text}: {}", e.message);
        }
    }

    #[test]
    fn compose_defaults_merge_keys_and_port_names() {
        let text = "x-common: &common\n  image: app:1\n  environment: {LOG: info}\nservices:\n  a:\n    <<: *common\n    ports: ['0.0.0.0:8080:8080', {target: 9000, name: metrics}]\n  b:\n    <<: *common\n    restart: always\n";
        let ms = compose(text).expect("merge keys apply");
        let (a, b) = (&ms[0], &ms[1]);
        assert_eq!((a.image.as_str(), a.env["LOG"].as_str()), ("app:1", "info"));
        assert_eq!(a.restart, RestartName::Never, "Compose's default restart is no");
        assert_eq!(b.restart, RestartName::Always);
        assert_eq!(
            a.ports.iter().map(|p| (p.name.as_str(), p.port)).collect::<Vec<_>>(),
            [("p8080", 8080), ("metrics", 9000)]
        );
    }

    #[test]
    fn words_split_as_a_shell_would() {
        for (text, want) in [
            ("a b  c", vec!["a", "b", "c"]),
            (r#"sh -c "echo 'hi there'""#, vec!["sh", "-c", "echo 'hi there'"]),
            (r#"a 'b c' "d \"e\"" f\ g"#, vec!["a", "b c", "d \"e\"", "f g"]),
            ("''", vec![""]),
            ("", vec![]),
        ] {
            assert_eq!(split_words(text).expect(text), want, "{text}");
        }
        assert!(split_words("'open").is_err());
        assert!(split_words("\"open").is_err());
    }

    #[test]
    fn env_files_are_inlined_under_environment() {
        let text = "services:\n  web:\n    image: x\n    env_file: [a.env, {path: b.env}]\n    environment: {WINS: compose}\n  db:\n    image: y\n";
        let read = |p: &str| match p {
            "a.env" => Ok("# comment\nA=1\nexport B='two words'\nWINS=file\n\n".to_string()),
            "b.env" => Ok("A=\"overridden\"\n".to_string()),
            other => Err(format!("no {other}")),
        };
        let inlined = inline_env_files(text, read).expect("inlined").expect("had env files");
        let ms = compose(&inlined).expect("valid");
        let env = &ms.iter().find(|m| m.name == "web").expect("web").env;
        assert_eq!(env.get("A").map(String::as_str), Some("overridden"));
        assert_eq!(env.get("B").map(String::as_str), Some("two words"));
        assert_eq!(env.get("WINS").map(String::as_str), Some("compose"), "environment wins");
        assert_eq!(inline_env_files("services: {a: {image: x}}", read), Ok(None), "nothing to inline");
        assert_eq!(inline_env_files("name: a\nimage: x\n", read), Ok(None), "not Compose");
        let missing = inline_env_files("services: {a: {image: x, env_file: c.env}}", read).unwrap_err();
        assert!(missing.contains("services.a.env_file: c.env: no c.env"), "{missing}");
        let shell = parse_env_file("HOME\n").unwrap_err();
        assert!(shell.contains("line 1") && shell.contains("KEY=VALUE"), "{shell}");
    }

    #[test]
    fn variables_a_compose_user_expects_read_are_named() {
        let text = "services: {a: {image: \"app:${TAG:-1}\", environment: {L: \"${LOG:-info}\", M: \"${TAG:-2}\"}}}";
        let w = unread_variables(text, true, |v| v == "TAG");
        assert_eq!(w.len(), 2, "{w:?}");
        assert!(w[0].contains(".env") && w[1].contains("shell's TAG"), "{w:?}");
        assert!(unread_variables(text, false, |_| false).is_empty());
        assert!(unread_variables("name: a\nimage: \"${TAG:-1}\"\n", true, |_| true).is_empty(), "not Compose");
    }

    #[test]
    fn interpolation() {
        for (text, want) in [
            ("plain", Ok("plain")),
            ("$$HOME and $$", Ok("$HOME and $")),
            ("${TAG:-1.2}", Ok("1.2")),
            ("${TAG-latest}x", Ok("latestx")),
            ("cost: 5$", Ok("cost: 5$")),
            ("${V:-${W:-nested}}", Ok("nested")),
            ("a${V:+alt}b", Ok("ab")),
        ] {
            assert_eq!(interpolate(text).as_deref(), want.map_err(|_: ()| String::new()).as_deref(), "{text}");
        }
        for text in ["$HOME", "${TAG}", "${TAG", "${V:-${W}}", "${}"] {
            assert!(interpolate(text).is_err(), "{text}");
        }
        let e = interpolate("${DB:?set DB}").unwrap_err();
        assert!(e.starts_with("${DB} must be set (set DB)"), "{e}");
        let e = refused("services: {a: {image: \"app:${TAG}\"}}");
        assert_eq!(e.field, "services.a.image");
        assert!(e.message.contains("TAG:-DEFAULT"), "{}", e.message);
    }

    #[test]
    fn durations_and_sizes() {
        for (text, want) in [("30s", 30), ("1m30s", 90), ("500ms", 1), ("1h", 3600), ("2", 0)] {
            let got = seconds(&Value::String(text.into()), "f");
            if want == 0 {
                assert!(got.is_err(), "{text}");
            } else {
                assert_eq!(got.expect(text), want, "{text}");
            }
        }
        for (text, want) in [("256m", "256Mi"), ("1g", "1Gi"), ("1gb", "1Gi"), ("512k", "512Ki"), ("1000", "1000")] {
            assert_eq!(compose_bytes(text), want);
        }
    }
}
