//! Workload manifests: YAML as operators write it (Baton manifests, or
//! Compose files through `compose`) → validated `WorkloadSpec`s.
//! Pure. Every error names the file, the document and the field path, and a
//! file with any bad document yields no workloads at all.
//!
//! A minimal manifest is two lines:
//! ```yaml
//! name: web
//! image: registry.local/web:1.2
//! ```

use std::collections::BTreeMap;

use baton_protocol::spec::WorkloadSpec;
use serde::{Deserialize, Serialize};

pub mod compose;
mod validate;

pub use validate::{autoscale, strategy, validate, FieldError};

#[derive(Debug, Clone, Default, Serialize, Deserialize, PartialEq, schemars::JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct Manifest {
    pub name: String,
    pub image: String,
    #[serde(default)]
    pub command: Vec<String>,
    #[serde(default)]
    pub args: Vec<String>,
    #[serde(default)]
    pub env: BTreeMap<String, String>,
    pub working_dir: Option<String>,
    /// As Docker's `--user`: `uid:gid` (numbers), or with names from the
    /// image (`app`, `app:staff`, `1000`, `1000:staff`) resolved on the device.
    pub user: Option<String>,
    pub hostname: Option<String>,
    #[serde(default)]
    pub restart: RestartName,
    /// Seconds; the cap of the restart backoff (default 300).
    pub restart_backoff_cap: Option<u32>,
    #[serde(default)]
    pub resources: ResourcesManifest,
    #[serde(default)]
    pub ports: Vec<PortManifest>,
    #[serde(default)]
    pub volumes: Vec<VolumeManifest>,
    #[serde(default)]
    pub devices: Vec<String>,
    #[serde(default)]
    pub network: NetworkName,
    /// With `network: bridge`: the workloads on a device that may connect
    /// to this one (absent: all of them).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub allow_from: Option<Vec<String>>,
    #[serde(default)]
    pub read_only: bool,
    #[serde(default)]
    pub privileged: bool,
    #[serde(default)]
    pub cap_add: Vec<String>,
    #[serde(default)]
    pub cap_drop: Vec<String>,
    #[serde(default)]
    pub seccomp_unconfined: bool,
    /// Lets setuid programs and file capabilities raise privileges (Docker's
    /// and Kubernetes' default; Baton's is no).
    #[serde(default)]
    pub allow_privilege_escalation: bool,
    pub liveness: Option<ProbeManifest>,
    pub readiness: Option<ProbeManifest>,
    /// Seconds a new revision has to become healthy on a device.
    pub health_deadline: Option<u32>,
    /// Workloads this one talks to: their healthy endpoints are delivered to
    /// it (`/run/baton/services/NAME`, and `BATON_SERVICE_NAME` at start).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub uses: Vec<String>,
    /// Files mounted read-only into the container; part of the revision.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub files: Vec<FileManifest>,
    /// Secrets (`baton secret create`) mounted as files, mode 0400 by
    /// default: sealed to each device's key, opened only on its tmpfs.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub secrets: Vec<SecretManifest>,
    #[serde(default)]
    pub placement: Placement,
    /// How many devices run it; absent = every device that matches.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub replicas: Option<u32>,
    /// With `replicas`: the controller moves the count between `min` and
    /// `max` to keep the instances' load near the targets.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub autoscale: Option<AutoscaleManifest>,
    /// How many of its instances may be down at once (updating, or removed
    /// by a scale-down), per group of devices.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub disruption: Option<DisruptionManifest>,
    /// When a running instance may be replaced by a new revision on a
    /// device: windows, the application's update lock.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub updates: Option<UpdatesManifest>,
    /// How a new revision reaches the devices.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub rollout: Option<RolloutManifest>,
}

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, schemars::JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct FileManifest {
    /// Absolute path inside the container.
    pub path: String,
    pub content: String,
    /// Octal permission bits as a string (`"0640"`); default `"0644"`.
    pub mode: Option<String>,
}

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, schemars::JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct SecretManifest {
    /// The stored secret (`baton secret create NAME`).
    #[serde(default)]
    pub name: String,
    /// Absolute path inside the container, e.g. `/run/secrets/db-password`.
    pub path: String,
    /// Octal permission bits as a string; default `"0400"`.
    pub mode: Option<String>,
    /// Refused: a value in a manifest would be stored and sent in plain text.
    #[serde(default, skip_serializing)]
    pub value: Option<String>,
}

/// What a secret file holds in a revision before the controller pins the
/// version: the secret's name and version 0.
pub fn unversioned_secret(name: &str) -> Vec<u8> {
    baton_protocol::token::SecretRef { name: name.to_string(), version: 0 }.to_bytes()
}

/// What one workload's files may weigh in all (they travel in desired documents).
pub const MAX_FILES_BYTES: usize = 128 * 1024;

/// `disruption:` — a disruption budget.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, schemars::JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct DisruptionManifest {
    /// A count (`1`) or a share of the group's devices (`25%`, at least one).
    pub max_unavailable: Quantity,
    /// The device label whose values make the groups (`site`; default: one group).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub per: Option<String>,
}

/// A disruption budget's allowance for a group of `size` devices.
pub fn allowance(d: &DisruptionManifest, size: usize) -> usize {
    let text = d.max_unavailable.to_string();
    match text.trim().strip_suffix('%') {
        Some(p) => (size * p.trim().parse::<usize>().unwrap_or(0) / 100).max(1),
        None => text.trim().parse::<usize>().unwrap_or(1).max(1),
    }
}

/// `updates:` — when a device may switch a running workload to a new revision.
#[derive(Debug, Clone, Default, Serialize, Deserialize, PartialEq, schemars::JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct UpdatesManifest {
    /// When it may switch: one window, or a list whose first entry with a
    /// matching `selector` applies to a device (none matching: any time).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub install: Option<OneOrMany<WindowManifest>>,
    /// When the new image may be downloaded ahead of the switch (default: any time).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub download: Option<OneOrMany<WindowManifest>>,
    /// Switch anyway once a revision has waited this long for its window (`3d`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub max_delay: Option<String>,
    /// Honour the application's `/run/baton/update.lock`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub lock: Option<LockManifest>,
}

#[derive(Debug, Clone, Serialize, PartialEq, schemars::JsonSchema)]
#[serde(untagged)]
pub enum OneOrMany<T> {
    One(T),
    Many(Vec<T>),
}

impl<T> OneOrMany<T> {
    pub fn items(&self) -> &[T] {
        match self {
            Self::One(t) => std::slice::from_ref(t),
            Self::Many(v) => v,
        }
    }
}

/// By hand: serde's untagged enums lose the inner error ("did not match
/// any variant"); this one reads a mapping or a sequence in place, so the
/// error names the field under it.
impl<'de, T: Deserialize<'de>> Deserialize<'de> for OneOrMany<T> {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        struct Either<T>(std::marker::PhantomData<T>);
        impl<'de, T: Deserialize<'de>> serde::de::Visitor<'de> for Either<T> {
            type Value = OneOrMany<T>;
            fn expecting(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
                f.write_str("a mapping or a list of them")
            }
            fn visit_map<A: serde::de::MapAccess<'de>>(self, map: A) -> Result<Self::Value, A::Error> {
                T::deserialize(serde::de::value::MapAccessDeserializer::new(map)).map(OneOrMany::One)
            }
            fn visit_seq<A: serde::de::SeqAccess<'de>>(self, seq: A) -> Result<Self::Value, A::Error> {
                Vec::<T>::deserialize(serde::de::value::SeqAccessDeserializer::new(seq)).map(OneOrMany::Many)
            }
        }
        d.deserialize_any(Either(std::marker::PhantomData))
    }
}

#[derive(Debug, Clone, Default, Serialize, Deserialize, PartialEq, schemars::JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct WindowManifest {
    /// Only devices with these labels (default: every device).
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub selector: BTreeMap<String, String>,
    /// When it opens: `MIN HOUR * * DAY-OF-WEEK` (`0 2 * * *`: 02:00 every day).
    pub at: String,
    /// How long it stays open (`2h`).
    #[serde(rename = "for")]
    pub length: String,
    /// IANA time zone of `at` (default UTC).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub time_zone: Option<String>,
}

#[derive(Debug, Clone, Default, Serialize, Deserialize, PartialEq, schemars::JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct LockManifest {
    /// Honour a held lock this long at most (`10m`; default: as long as it is held).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub max: Option<String>,
    /// Past `max`: switch anyway (default false: go on waiting, and say so).
    #[serde(default, rename = "override")]
    pub override_after_max: bool,
}

/// `autoscale:` — at least one target.
#[derive(Debug, Clone, Default, Serialize, Deserialize, PartialEq, schemars::JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct AutoscaleManifest {
    pub min: u32,
    pub max: u32,
    /// Average CPU per instance to keep, % of `resources.cpu`.
    pub cpu_percent: Option<u32>,
    /// Average memory per instance to keep, % of `resources.memory`.
    pub memory_percent: Option<u32>,
    /// Average of what the instances write in `/run/baton/load` to keep
    /// (e.g. a queue depth per instance).
    pub load: Option<f64>,
    /// Seconds: scale down only to the highest count recommended over this
    /// long (default 300).
    pub window: Option<u32>,
    /// Seconds between two decisions (default 30).
    pub cooldown: Option<u32>,
}

#[derive(Debug, Clone, Default, Serialize, Deserialize, PartialEq, schemars::JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct RolloutManifest {
    /// Cumulative wave sizes: device counts or percentages (`[1, 10%, 50%, 100%]`).
    #[serde(default)]
    pub waves: Vec<Quantity>,
    /// Seconds a device must run the new revision healthy to count (default 10).
    pub min_ready: Option<u32>,
    /// Share of updated devices allowed to fail before everything rolls back (`10%`, default).
    pub max_failures: Option<Quantity>,
}

/// A number or a string in YAML (`3`, `25%`).
#[derive(Debug, Clone, Serialize, PartialEq, schemars::JsonSchema)]
#[serde(untagged)]
pub enum Quantity {
    Number(u64),
    Text(String),
}

/// By hand, so that `-1` or `1.5` say what is expected instead of serde's
/// "did not match any variant"; the sections check the text further.
impl<'de> Deserialize<'de> for Quantity {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        struct Q;
        impl serde::de::Visitor<'_> for Q {
            type Value = Quantity;
            fn expecting(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
                f.write_str("a count (3) or a share (25%)")
            }
            fn visit_u64<E: serde::de::Error>(self, n: u64) -> Result<Quantity, E> {
                Ok(Quantity::Number(n))
            }
            fn visit_i64<E: serde::de::Error>(self, n: i64) -> Result<Quantity, E> {
                u64::try_from(n)
                    .map(Quantity::Number)
                    .map_err(|_| E::custom(format!("expected a count (3) or a share (25%), not {n}")))
            }
            fn visit_f64<E: serde::de::Error>(self, n: f64) -> Result<Quantity, E> {
                Err(E::custom(format!("expected a count (3) or a share (25%), not {n}")))
            }
            fn visit_str<E: serde::de::Error>(self, s: &str) -> Result<Quantity, E> {
                Ok(Quantity::Text(s.to_string()))
            }
        }
        d.deserialize_any(Q)
    }
}

impl std::fmt::Display for Quantity {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Quantity::Number(n) => write!(f, "{n}"),
            Quantity::Text(s) => f.write_str(s),
        }
    }
}

/// Seconds a new revision has to become healthy on a device.
pub const DEFAULT_HEALTH_DEADLINE_S: u32 = 120;

#[derive(Debug, Clone, Copy, Default, Serialize, Deserialize, PartialEq, Eq, schemars::JsonSchema)]
#[serde(rename_all = "kebab-case")]
pub enum RestartName {
    #[default]
    Always,
    OnFailure,
    Never,
}

#[derive(Debug, Clone, Copy, Default, Serialize, Deserialize, PartialEq, Eq, schemars::JsonSchema)]
#[serde(rename_all = "lowercase")]
pub enum NetworkName {
    #[default]
    Host,
    None,
    /// The device's bridge: an address of its own, NAT out, `ports[].publish`.
    Bridge,
}

#[derive(Debug, Clone, Default, Serialize, Deserialize, PartialEq, schemars::JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct ResourcesManifest {
    /// `64Mi`, `1G`, `500000` (bytes).
    pub memory: Option<String>,
    /// `500m` or `0.5` or `2` CPUs.
    pub cpu: Option<String>,
    pub cpu_shares: Option<u32>,
    pub pids: Option<u32>,
    /// Bandwidth of a bridged container: `{egress: 2mbit, ingress: 10mbit}`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub network: Option<BandwidthManifest>,
}

#[derive(Debug, Clone, Default, Serialize, Deserialize, PartialEq, schemars::JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct BandwidthManifest {
    /// What it sends: `2mbit`, `500kbit`, `1gbit`, `64000bit`.
    pub egress: Option<String>,
    /// What it receives.
    pub ingress: Option<String>,
}

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, schemars::JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct PortManifest {
    pub name: String,
    pub port: u16,
    #[serde(default)]
    pub protocol: Option<String>,
    /// With `network: bridge`: the device's port forwarded to `port`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub publish: Option<u16>,
}

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, schemars::JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct VolumeManifest {
    /// Where it appears in the container.
    pub path: String,
    /// A named volume (kept across revisions) …
    pub name: Option<String>,
    /// … or a host path …
    pub host_path: Option<String>,
    /// … or a memory filesystem of this size (`16Mi`).
    pub tmpfs: Option<String>,
    #[serde(default)]
    pub read_only: bool,
}

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, schemars::JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct ProbeManifest {
    pub exec: Option<Vec<String>>,
    pub tcp: Option<u16>,
    pub http: Option<HttpProbe>,
    #[serde(default = "default_interval")]
    pub interval: u32,
    #[serde(default = "default_timeout")]
    pub timeout: u32,
    #[serde(default = "default_threshold")]
    pub failure_threshold: u32,
    #[serde(default)]
    pub initial_delay: u32,
}

fn default_interval() -> u32 {
    10
}
fn default_timeout() -> u32 {
    2
}
fn default_threshold() -> u32 {
    3
}

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, schemars::JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct HttpProbe {
    pub port: u16,
    #[serde(default = "default_path")]
    pub path: String,
}

fn default_path() -> String {
    "/".into()
}

/// Where a workload runs. Today: one instance on every device that matches.
#[derive(Debug, Clone, Default, Serialize, Deserialize, PartialEq, schemars::JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct Placement {
    /// Labels a device must have (all of them).
    #[serde(default)]
    pub selector: BTreeMap<String, String>,
    /// OCI architectures allowed (`arm64`, `arm`, `amd64`); empty = any.
    #[serde(default)]
    pub arch: Vec<String>,
    /// With `replicas`: spread them across the values of this device label (`site`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub spread_by: Option<String>,
}

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{file}: document {doc}: {field}: {message}")]
pub struct ManifestError {
    pub file: String,
    /// 1-based, in the order the documents appear.
    pub doc: usize,
    pub field: String,
    pub message: String,
}

/// A validated workload: the spec devices get (revision 0 until stored) and its placement.
#[derive(Debug, Clone, PartialEq)]
pub struct Validated {
    pub manifest: Manifest,
    pub spec: WorkloadSpec,
}

/// Parses every YAML document of `text` (named `file` in errors).
pub fn parse(file: &str, text: &str) -> Result<Vec<Validated>, ManifestError> {
    let mut out = Vec::new();
    for (i, doc) in serde_yaml::Deserializer::from_str(text).enumerate() {
        let n = i + 1;
        let value = serde_yaml::Value::deserialize(doc).map_err(|e| err(file, n, "(yaml)", e.to_string()))?;
        if value.is_null() {
            continue; // an empty document (a trailing `---`)
        }
        if compose::is_compose(&value) {
            let manifests = compose::manifests(&value).map_err(|e| err(file, n, &e.field, e.message))?;
            for manifest in manifests {
                let at = format!("services.{}", manifest.name);
                let spec = validate(&manifest).map_err(|e| err(file, n, &format!("{at}: {}", e.field), e.message))?;
                if out.iter().any(|v: &Validated| v.manifest.name == manifest.name) {
                    return Err(err(file, n, &at, format!("{:?} is defined twice", manifest.name)));
                }
                out.push(Validated { manifest, spec });
            }
            continue;
        }
        let manifest: Manifest = serde_yaml::from_value(value.clone()).map_err(|e| {
            let (field, message) = locate(&value, &e.to_string());
            err(file, n, &field, message)
        })?;
        let spec = validate(&manifest).map_err(|e| err(file, n, &e.field, e.message))?;
        if out.iter().any(|v: &Validated| v.manifest.name == manifest.name) {
            return Err(err(file, n, "name", format!("{:?} is defined twice", manifest.name)));
        }
        out.push(Validated { manifest, spec });
    }
    if out.is_empty() {
        return Err(err(file, 1, "(file)", "no workload documents".into()));
    }
    Ok(out)
}

fn err(file: &str, doc: usize, field: &str, message: String) -> ManifestError {
    ManifestError { file: file.into(), doc, field: field.into(), message }
}

/// serde names the offending field in its message: "unknown field `x`" / "missing field `x`".
fn field_of(message: &str) -> String {
    message.split('`').nth(1).map_or_else(|| "(document)".into(), str::to_string)
}

/// The field path of a serde error in `value` (`disruption.max_unavailable`)
/// and its message: deserialised again from text, serde_yaml names the path
/// (from a `Value` it does not); an unknown or missing field is named under it.
fn locate(value: &serde_yaml::Value, message: &str) -> (String, String) {
    let again = serde_yaml::to_string(value).ok().and_then(|t| serde_yaml::from_str::<Manifest>(&t).err());
    let path = again.as_ref().map(ToString::to_string).and_then(|m| {
        let (path, _) = m.split_once(": ")?;
        let is_path = !path.is_empty() && path.chars().all(|c| c.is_ascii_alphanumeric() || "_.[]-".contains(c));
        is_path.then(|| path.to_string())
    });
    let named = message
        .split('`')
        .nth(1)
        .filter(|_| message.starts_with("missing field") || message.starts_with("unknown field"));
    let field = match (path, named) {
        (Some(p), Some(f)) => format!("{p}.{f}"),
        (Some(p), None) => p,
        (None, _) => field_of(message),
    };
    (field, message.to_string())
}

/// `64Mi`, `1G`, `512k`, `1000` → bytes.
pub fn parse_bytes(s: &str) -> Option<u64> {
    let s = s.trim();
    let split = s.find(|c: char| !c.is_ascii_digit() && c != '.').unwrap_or(s.len());
    let (num, unit) = s.split_at(split);
    let n: f64 = num.parse().ok()?;
    let mult: u64 = match unit {
        "" => 1,
        "k" | "K" => 1000,
        "M" => 1000u64.pow(2),
        "G" => 1000u64.pow(3),
        "Ki" => 1 << 10,
        "Mi" => 1 << 20,
        "Gi" => 1 << 30,
        _ => return None,
    };
    let bytes = n * mult as f64;
    (bytes.is_finite() && bytes >= 0.0 && bytes < u64::MAX as f64).then_some(bytes as u64)
}

/// `500m`, `0.5`, `2` → thousandths of a CPU.
pub fn parse_cpu(s: &str) -> Option<u32> {
    let s = s.trim();
    let millis = match s.strip_suffix('m') {
        Some(m) => m.parse::<f64>().ok()?,
        None => s.parse::<f64>().ok()? * 1000.0,
    };
    (1.0..=1_024_000.0).contains(&millis).then_some(millis.round() as u32)
}

/// Workload names follow the one naming rule (`baton_protocol::name`).
pub fn valid_name(name: &str) -> bool {
    baton_protocol::check_name(baton_protocol::NameKind::Workload, name).is_ok()
}

/// The parts of a workload's spec that differ between two revisions, by the
/// names a manifest uses (for `describe workload`'s history).
pub fn spec_changes(before: &WorkloadSpec, after: &WorkloadSpec) -> Vec<String> {
    let (b, a) = (&before.container, &after.container);
    let fields: [(&str, bool); 19] = [
        ("image", before.image != after.image || before.image_digest != after.image_digest),
        ("command", b.command != a.command),
        ("args", b.args != a.args),
        ("env", b.env != a.env),
        ("working_dir", b.working_dir != a.working_dir),
        ("user", b.user != a.user || b.user_name != a.user_name),
        ("hostname", b.hostname != a.hostname),
        ("resources", b.resources != a.resources),
        ("restart", b.restart != a.restart || b.backoff_cap_s != a.backoff_cap_s),
        ("volumes", b.mounts != a.mounts),
        ("devices", b.devices != a.devices),
        ("network", b.network != a.network),
        ("ports", b.ports != a.ports),
        ("read_only", b.read_only_rootfs != a.read_only_rootfs),
        ("security", b.security != a.security || b.allow_privilege_escalation != a.allow_privilege_escalation),
        ("liveness", b.liveness != a.liveness),
        ("readiness", b.readiness != a.readiness),
        ("files", b.files != a.files),
        ("health_deadline", before.health_deadline_s != after.health_deadline_s),
    ];
    fields.iter().filter(|(_, changed)| *changed).map(|(name, _)| name.to_string()).collect()
}

#[cfg(test)]
mod tests {
    use super::*;
    use baton_protocol::spec::{NetworkMode, PortProtocol, Publish, Resources, RestartPolicy, User};

    #[test]
    fn a_two_line_manifest_gets_every_default() {
        let v = parse("web.yaml", "name: web\nimage: registry.local/web:1\n").unwrap();
        let spec = &v[0].spec;
        assert_eq!((spec.name.as_str(), spec.image.as_str()), ("web", "registry.local/web:1"));
        assert_eq!(spec.container.restart, RestartPolicy::Always);
        assert_eq!(spec.container.network, NetworkMode::Host);
        assert!(v[0].manifest.placement.selector.is_empty(), "placed on every device by default");
    }

    #[test]
    fn a_full_manifest_translates() {
        let yaml = r#"
name: sensor
image: reg/sensor:2
command: [/bin/sensor]
env: {LOG: debug}
user: "1000:20"
restart: on-failure
resources: {memory: 64Mi, cpu: 500m, pids: 32}
volumes:
  - {path: /data, name: sensor-data}
  - {path: /tmp, tmpfs: 8Mi}
  - {path: /etc/host, host_path: /etc/hostname, read_only: true}
devices: [/dev/i2c-1]
ports: [{name: metrics, port: 9100}]
liveness: {http: {port: 9100, path: /healthz}, interval: 5}
placement: {selector: {site: lyon}, arch: [arm64]}
---
name: other
image: reg/other:1
"#;
        let v = parse("f.yaml", yaml).unwrap();
        assert_eq!(v.len(), 2);
        let c = &v[0].spec.container;
        assert_eq!(
            c.resources,
            Resources { memory_bytes: Some(64 << 20), cpu_millis: Some(500), cpu_shares: None, pids: Some(32) }
        );
        assert_eq!(c.user, Some(User { uid: 1000, gid: 20 }));
        assert_eq!(c.user_name, None);
        // Names are the image's, resolved on the device; older agents get nobody.
        for named in ["app", "app:staff", "1000", "1000:staff"] {
            let v =
                parse("w.yaml", &format!("name: a\nimage: x\nuser: \"{named}\"\nallow_privilege_escalation: true\nseccomp_unconfined: true\n"))
                    .unwrap();
            let c = &v[0].spec.container;
            assert_eq!((c.user_name.as_deref(), c.user), (Some(named), Some(User { uid: 65534, gid: 65534 })));
            assert!(c.allow_privilege_escalation);
        }
        assert_eq!(c.restart, RestartPolicy::OnFailure);
        assert_eq!(c.mounts.len(), 3);
        assert_eq!(c.liveness.as_ref().map(|p| p.interval_s), Some(5));
        assert_eq!(v[0].manifest.placement.arch, vec!["arm64".to_string()]);
    }

    #[test]
    fn revisions_say_what_changed() {
        let v = parse("a.yaml", "name: a\nimage: x:1\nenv: {A: \"1\"}\n").unwrap();
        let w = parse("a.yaml", "name: a\nimage: x:1\nenv: {A: \"2\"}\nresources: {memory: 64Mi}\n").unwrap();
        assert_eq!(spec_changes(&v[0].spec, &w[0].spec), ["env", "resources"]);
        let mut pinned = v[0].spec.clone();
        pinned.image_digest = "sha256:ab".into();
        assert_eq!(spec_changes(&v[0].spec, &pinned), ["image"], "a tag moved to other bytes is a change of image");
        assert!(spec_changes(&w[0].spec, &w[0].spec).is_empty());
    }

    #[test]
    fn bad_manifests_name_file_document_and_field() {
        let cases = [
            ("name: web\n", "missing field `image`", "image", 1),
            ("name: web\nimage: x\nimgae: y\n", "unknown field `imgae`", "imgae", 1),
            ("name: Web\nimage: x\n", "a-z 0-9", "name", 1),
            (
                "name: a\nimage: x\n---\nname: b\nimage: x\nresources: {memory: lots}\n",
                "use bytes",
                "resources.memory",
                2,
            ),
            ("name: a\nimage: x\nresources: {memory: 1Mi}\n", "4Mi minimum", "resources.memory", 1),
            ("name: a\nimage: x\nresources: {cpu: fast}\n", "500m", "resources.cpu", 1),
            ("name: a\nimage: x\nrestart: sometimes\n", "unknown variant `sometimes`", "restart", 1),
            ("name: a\nimage: x\nvolumes: [{path: /d}]\n", "exactly one of name", "volumes[0]", 1),
            ("name: a\nimage: x\nvolumes: [{path: ../d, name: v}]\n", "absolute path", "volumes[0].path", 1),
            ("name: a\nimage: x\nuser: \"a:b:c\"\n", "NAME:GROUP", "user", 1),
            ("name: a\nimage: x\nuser: \"app/x\"\n", "NAME:GROUP", "user", 1),
            (
                "name: a\nimage: x\nallow_privilege_escalation: true\n",
                "seccomp_unconfined",
                "allow_privilege_escalation",
                1,
            ),
            ("name: a\nimage: x\ncap_add: [NET_ADMIN, BOGUS]\n", "not a Linux capability", "cap_add[1]", 1),
            ("name: a\nimage: x\ncap_drop: [cap_chwon]\n", "not a Linux capability", "cap_drop[0]", 1),
            ("name: a\nimage: x\nliveness: {tcp: 80, exec: [x]}\n", "exactly one of exec", "liveness", 1),
            ("name: a\nimage: x\nnetwork: none\nreadiness: {tcp: 80}\n", "exec probe", "readiness", 1),
            ("name: a\nimage: x\n---\nname: a\nimage: y\n", "defined twice", "name", 2),
            ("", "no workload documents", "(file)", 1),
            ("name: [\n", "", "(yaml)", 1),
            ("name: a\nimage: x\nreplicas: 0\n", "at least 1", "replicas", 1),
            ("name: a\nimage: x\nplacement: {spread_by: site}\n", "only with replicas", "placement.spread_by", 1),
            ("name: a\nimage: x\nrollout: {waves: [1, 0%]}\n", "a percentage (25%)", "rollout.waves[1]", 1),
            ("name: a\nimage: x\nrollout: {max_failures: lots}\n", "0% to 100%", "rollout.max_failures", 1),
            ("name: a\nimage: x\nrollout: {wave: [1]}\n", "unknown field `wave`", "rollout.wave", 1),
            ("name: a\nimage: x\nuses: [a]\n", "another workload", "uses[0]", 1),
            ("name: a\nimage: x\nfiles: [{path: etc/x, content: y}]\n", "absolute file path", "files[0].path", 1),
            ("name: a\nimage: x\nfiles: [{path: /x, content: y, mode: rw}]\n", "octal", "files[0].mode", 1),
            ("name: a\nimage: x\nports: [{name: h, port: 80, publish: 8080}]\n", "network: bridge", "ports[0].publish", 1),
            (
                "name: a\nimage: x\nnetwork: bridge\nports: [{name: h, port: 80, publish: 8080}, {name: i, port: 81, publish: 8080}]\n",
                "published twice",
                "ports[1].publish",
                1,
            ),
            ("name: a\nimage: x\nports: [{name: h, port: 0}]\n", "1 to 65535", "ports[0].port", 1),
            ("name: a\nimage: x\nports: [{name: h, port: 80}, {name: h, port: 81}]\n", "two ports", "ports[1].name", 1),
            (
                "name: a\nimage: x\nnetwork: bridge\nresources: {network: {egress: fast}}\n",
                "500kbit",
                "resources.network.egress",
                1,
            ),
            (
                "name: a\nimage: x\nnetwork: bridge\nresources: {network: {ingress: 4000gbit}}\n",
                "100gbit maximum",
                "resources.network.ingress",
                1,
            ),
            ("name: a\nimage: x\nresources: {network: {egress: 2mbit}}\n", "network: bridge", "resources.network", 1),
            ("name: a\nimage: x\nallow_from: [web]\n", "network: bridge", "allow_from", 1),
            ("name: a\nimage: x\nnetwork: bridge\nallow_from: [Web]\n", "a-z 0-9", "allow_from[0]", 1),
            ("name: a\nimage: x\nautoscale: {min: 1, max: 3, load: 2, step: 1}\n", "unknown field `step`", "autoscale.step", 1),
            ("name: a\nimage: x\nupdates: {install: {at: '0 2 * * *', fro: 2h}}\n", "fro", "updates.install.fro", 1),
            ("name: a\nimage: x\nupdates: {install: {at: '0 2 * * *', for: 2h}, lock: {max: soon}}\n", "1h30m", "updates.lock.max", 1),
            ("name: a\nimage: x\ndisruption: {max_unavailable: 0}\n", "at least 1", "disruption.max_unavailable", 1),
            ("name: a\nimage: x\ndisruption: {max_unavailable: 150%}\n", "25%", "disruption.max_unavailable", 1),
            ("name: a\nimage: x\ndisruption: {max_unavailable: 1, per: 'a b'}\n", "", "disruption.per", 1),
            ("name: a\nimage: x\ndisruption: {max_unavailable: -1}\n", "a count (3) or a share (25%), not -1", "disruption.max_unavailable", 1),
            ("name: a\nimage: x\nupdates: {install: {at: '0 2 * * *'}}\n", "missing field `for`", "updates.install.for", 1),
            ("name: a\nimage: x\ndisruption: {per: site}\n", "missing field", "disruption.max_unavailable", 1),
        ];
        for (yaml, message, field, doc) in cases {
            let e = parse("bad.yaml", yaml).expect_err(yaml);
            assert_eq!((e.file.as_str(), e.doc, e.field.as_str()), ("bad.yaml", doc, field), "{yaml}: {e}");
            assert!(e.message.contains(message), "{yaml}: {e}");
            assert!(e.to_string().starts_with(&format!("bad.yaml: document {doc}: {field}:")), "{e}");
        }
    }

    #[test]
    fn secrets_are_sealed_owner_only_references_and_values_are_refused() {
        let yaml = "name: a\nimage: x\nsecrets: [{name: db-pw, path: /run/secrets/db}]\nfiles: [{path: /etc/a.conf, content: x}]\n";
        let v = parse("s.yaml", yaml).unwrap();
        let f = &v[0].spec.container.files;
        assert_eq!(
            (f[1].path.as_str(), f[1].permissions(), f[1].is_sealed(), f[1].contents.as_slice()),
            ("/run/secrets/db", 0o400, true, &b"baton-secret:db-pw:0"[..])
        );
        assert!(!f[0].is_sealed());
        assert_eq!(f[0].mode, 0o644);
        let inline = "name: a\nimage: x\nsecrets: [{name: s, path: /a, value: hunter2}]\n";
        let e = parse("i.yaml", inline).unwrap_err();
        assert_eq!(e.field, "secrets[0].value");
        assert!(e.message.contains("baton secret create"), "{e}");
        let unnamed = "name: a\nimage: x\nsecrets: [{path: /a}]\n";
        assert_eq!(parse("n.yaml", unnamed).unwrap_err().field, "secrets[0].name");
        let dup = "name: a\nimage: x\nsecrets: [{name: s, path: /a}]\nfiles: [{path: /a, content: x}]\n";
        assert_eq!(parse("d.yaml", dup).unwrap_err().field, "secrets[0].path");
    }

    #[test]
    fn the_manifests_in_the_readme_are_valid() {
        let readme = include_str!("../../../README.md");
        let blocks: Vec<&str> =
            readme.split("```yaml\n").skip(1).filter_map(|b| b.split_once("```").map(|(yaml, _)| yaml)).collect();
        assert!(blocks.len() >= 2, "README lost its manifest examples");
        for yaml in blocks {
            parse("README.md", yaml).unwrap_or_else(|e| panic!("{e}\n{yaml}"));
        }
    }

    #[test]
    fn a_bridged_manifest_translates() {
        let v = &parse(
            "b.yaml",
            "name: api\nimage: x\nnetwork: bridge\nports: [{name: http, port: 80, publish: 8080}, {name: dns, port: 53, protocol: udp, publish: 5353}]\nresources: {network: {egress: 2mbit, ingress: 1.5mbit}}\nallow_from: [web]\n",
        )
        .expect("valid")[0];
        let c = &v.spec.container;
        assert_eq!(c.network, NetworkMode::Bridge);
        assert_eq!(
            c.publish,
            vec![
                Publish { host_port: 8080, port: 80, protocol: PortProtocol::Tcp },
                Publish { host_port: 5353, port: 53, protocol: PortProtocol::Udp }
            ]
        );
        assert_eq!((c.bandwidth.egress_bps, c.bandwidth.ingress_bps), (2_000_000, 1_500_000));
        assert_eq!(c.allow_from, Some(vec!["web".to_string()]));
    }

    #[test]
    fn quantities() {
        assert_eq!(parse_bytes("64Mi"), Some(64 << 20));
        assert_eq!(parse_bytes("1G"), Some(1_000_000_000));
        assert_eq!(parse_bytes("1.5Ki"), Some(1536));
        assert_eq!(parse_bytes("12"), Some(12));
        assert_eq!(parse_bytes("12 parsecs"), None);
        assert_eq!(parse_cpu("500m"), Some(500));
        assert_eq!(parse_cpu("0.25"), Some(250));
        assert_eq!(parse_cpu("2"), Some(2000));
        assert_eq!(parse_cpu("0"), None);
    }
}
