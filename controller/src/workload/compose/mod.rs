//! **Pure**: Compose files (`docker-compose.yml`, `compose.yaml`) → Baton
//! manifests, one workload per service. The Compose specification's common
//! subset is read; every key outside it is refused with an error naming it
//! and saying what to write instead — never silently ignored, since a
//! setting that quietly does nothing is worse than a refusal.
//!
//! Services run as Compose runs them: on a bridge network of their device
//! (`network: bridge`), reaching each other by name, with `ports:` published
//! on the device; `network_mode: host` and `none` are kept. Baton-only
//! settings (placement, rollout waves) go under a service's `x-baton` key,
//! written as in a Baton manifest.

mod env;
mod fields;

use env::interpolate_all;
pub use env::{inline_env_files, interpolate, parse_env_file, unread_variables};
use fields::*;

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
                    "a device has one bridge network its services share (they reach each other by name); named networks are not supported, remove networks",
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
        // Two services holding one device port would fight over it wherever they meet.
        for (port, proto) in device_ports(m) {
            if let Some(o) =
                out.iter().take_while(|o| o.name != m.name).find(|o| device_ports(o).contains(&(port, proto)))
            {
                return bad(
                    format!("services.{}.ports", m.name),
                    format!(
                        "device port {port} is published by {} too; on a device only one container can have it",
                        o.name
                    ),
                );
            }
        }
    }
    Ok(out)
}

/// The device ports a service holds: those it publishes on the bridge,
/// every port on the host's network.
fn device_ports(m: &Manifest) -> Vec<(u16, bool)> {
    let udp = |p: &PortManifest| p.protocol.as_deref() == Some("udp");
    m.ports
        .iter()
        .filter_map(|p| match m.network {
            NetworkName::Bridge => p.publish.map(|h| (h, udp(p))),
            NetworkName::Host => Some((p.port, udp(p))),
            NetworkName::None => None,
        })
        .collect()
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
    // Compose's default restart policy is `no` (Baton's is `always`), its
    // default network a bridge (Baton manifests' is the host's).
    let mut m = Manifest {
        name: name.to_string(),
        restart: RestartName::Never,
        network: NetworkName::Bridge,
        ..Manifest::default()
    };
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
                // Ports other services on the device reach by name: not published.
                for p in ports(v, &field)? {
                    if !m.ports.iter().any(|q| q.port == p.port) {
                        m.ports.push(PortManifest { publish: None, ..p });
                    }
                }
            }
            "volumes" => m.volumes.extend(volumes(v, &field, named_volumes)?),
            "tmpfs" => m.volumes.extend(tmpfs(v, &field)?),
            "devices" => m.devices = devices(v, &field)?,
            "network_mode" => {
                m.network = match string(v, &field)?.as_str() {
                    "bridge" => NetworkName::Bridge,
                    "host" => NetworkName::Host,
                    "none" => NetworkName::None,
                    other => return bad(field, format!("{other:?}: use bridge (the default), host or none")),
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
    match m.network {
        NetworkName::None if !m.ports.is_empty() => {
            return bad(at("ports"), "network_mode: none has no network to publish a port on");
        }
        NetworkName::Host => {
            // On the device's own network a port is published as itself.
            for p in &mut m.ports {
                match p.publish.take() {
                    Some(h) if h != p.port => {
                        return bad(
                            at("ports"),
                            format!("{h}:{}: with network_mode: host the container's port {} is the device's; map {}:{} or drop network_mode", p.port, p.port, p.port, p.port),
                        )
                    }
                    _ => {}
                }
            }
        }
        _ => {}
    }
    if let Some(h) = healthcheck {
        m.readiness = health(h, &at("healthcheck"))?;
    }
    Ok(m)
}

#[cfg(test)]
mod tests;
