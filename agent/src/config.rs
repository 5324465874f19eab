//! Agent configuration: `/etc/baton/agent.toml`, then command-line overrides.
//! Everything is validated here, once, into types that cannot hold bad values.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::time::Duration;

use baton_protocol::{validate_label, BrokerNodes, BrokerUrl, DeviceId};
use serde::Deserialize;

pub const DEFAULT_CONFIG_PATH: &str = "/etc/baton/agent.toml";
pub const DEFAULT_DATA_DIR: &str = "/var/lib/baton/agent";
/// Runtime state that must not outlive a reboot: on tmpfs.
pub const DEFAULT_RUN_DIR: &str = "/run/baton";
/// Where install.sh puts the agent the service manager starts.
pub const DEFAULT_AGENT_ENTRY: &str = "/usr/local/bin/baton-agent";

/// The file as written by people. Unknown keys are errors: a typo must not
/// silently fall back to a default.
#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct FileConfig {
    pub broker: Option<String>,
    pub device_id: Option<String>,
    pub data_dir: Option<PathBuf>,
    pub run_dir: Option<PathBuf>,
    pub cgroup_parent: Option<String>,
    pub heartbeat_interval_s: Option<u64>,
    pub keepalive_s: Option<u64>,
    #[serde(default)]
    pub labels: BTreeMap<String, String>,
    /// Registries spoken to over plain HTTP (loopback ones always are).
    #[serde(default)]
    pub insecure_registries: Vec<String>,
    /// Registry host → credentials.
    #[serde(default)]
    pub registry_auth: BTreeMap<String, RegistryAuth>,
    /// Registry host → a PEM file of the CA its HTTPS certificate chains to
    /// (a registry with a private CA; the web PKI roots are not used for it).
    #[serde(default)]
    pub registry_ca: BTreeMap<String, PathBuf>,
    /// Disk the image store may use before unused images are removed (MiB, default 2048).
    pub image_budget_mb: Option<u64>,
    /// Free disk a pull or unpack never takes: room for the agent's own state
    /// (MiB, default 64).
    pub disk_reserve_mb: Option<u64>,
    /// Ed25519 keys (`ed25519:` + 64 hex digits, from `baton trust`) whose
    /// signed desired documents this agent applies. Empty: the first signer is pinned.
    #[serde(default)]
    pub controller_keys: Vec<String>,
    /// MQTT username (default: the device id, when a password is given).
    pub mqtt_username: Option<String>,
    /// File holding this device's MQTT password (brokers with per-device credentials).
    pub mqtt_password_file: Option<PathBuf>,
    /// PEM CA for an mqtts:// broker that is not a Baton gateway (default: the
    /// gateway's CA is recognised by the trusted controller key).
    pub mqtt_ca_file: Option<PathBuf>,
    /// A join token (`baton token create`): the agent enrolls with it at start
    /// when it has no credentials yet, as `baton-agent join` would.
    pub join_token: Option<String>,
    /// Whether the controller may upgrade this agent (default true; see
    /// `upgrade`). Needs a service manager that restarts the agent when it exits.
    pub self_update: Option<bool>,
    /// Seconds a new agent has to come online before the device goes back
    /// to the one it ran (default 120).
    pub upgrade_deadline_s: Option<u64>,
    /// The file the service manager starts (default `/usr/local/bin/baton-agent`,
    /// install.sh's): the only file outside its data dir an upgrade replaces
    /// (with a link to `bin/current`).
    pub agent_entry: Option<PathBuf>,
    /// The bridge bridged containers join (default `baton0`); also names the
    /// agent's nftables tables.
    pub bridge_name: Option<String>,
    /// The bridge's IPv4 subnet (default `10.47.0.0/24`): its first address
    /// is the bridge's, containers get the others.
    pub bridge_subnet: Option<String>,
    /// Whether an admin may open a shell on this device's host through the
    /// controller (`baton exec -it --host`; default false).
    pub remote_host_shell: Option<bool>,
    /// Interactive sessions open at once at most (default 4).
    pub max_sessions: Option<usize>,
    /// Port-forwarded connections open at once at most (default 32).
    pub max_forwarded_connections: Option<usize>,
    /// A session without input or output this long ends (default 900 s).
    pub session_idle_timeout_s: Option<u64>,
    /// A session ends after this long whatever it does (default 8 h).
    pub session_max_s: Option<u64>,
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RegistryAuth {
    pub username: String,
    pub password: String,
}

/// Values given on the command line; each wins over the file.
#[derive(Debug, Default, Clone)]
pub struct Overrides {
    pub broker: Option<String>,
    pub device_id: Option<String>,
    pub data_dir: Option<PathBuf>,
    pub run_dir: Option<PathBuf>,
    pub cgroup_parent: Option<String>,
    pub bridge_name: Option<String>,
    pub bridge_subnet: Option<String>,
    pub heartbeat_interval_s: Option<u64>,
    pub keepalive_s: Option<u64>,
    /// `key=value` pairs, added to (and overriding) the file's labels.
    pub labels: Vec<String>,
    /// Replace the file's `controller_keys` when not empty.
    pub controller_keys: Vec<String>,
    pub mqtt_password_file: Option<PathBuf>,
}

/// The validated configuration the agent runs with.
#[derive(Debug, Clone)]
pub struct AgentConfig {
    /// The first of `brokers` (where a join enrolls).
    pub broker: BrokerUrl,
    /// Every node the device may connect to, in the order given: when the
    /// one in use cannot be reached, the next is tried.
    pub brokers: BrokerNodes,
    pub device_id: DeviceId,
    pub data_dir: PathBuf,
    pub run_dir: PathBuf,
    pub cgroup_parent: String,
    pub heartbeat_interval: Duration,
    pub keepalive: Duration,
    pub labels: BTreeMap<String, String>,
    pub insecure_registries: Vec<String>,
    pub registry_auth: BTreeMap<String, RegistryAuth>,
    /// Registry host → the CA certificates (PEM) read from `registry_ca`.
    pub registry_ca: BTreeMap<String, Vec<u8>>,
    pub image_budget_bytes: u64,
    pub disk_reserve_bytes: u64,
    pub controller_keys: Vec<[u8; 32]>,
    /// MQTT (username, password), when the broker wants them.
    pub mqtt_credentials: Option<(String, String)>,
    pub mqtt_ca_file: Option<PathBuf>,
    /// Enroll with this token at start when not enrolled yet.
    pub join_token: Option<crate::join::Token>,
    pub self_update: bool,
    pub upgrade_deadline: Duration,
    pub agent_entry: PathBuf,
    pub network: crate::net::NetConfig,
    /// What interactive sessions may do here.
    pub sessions: crate::session::Limits,
    /// Set by `simulate` only (no config key): upgrades are downloaded and
    /// checked for real, and the switch is pretended in memory.
    pub simulated_upgrades: bool,
}

#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    #[error("cannot read config file {path}: {source}")]
    Read { path: PathBuf, source: std::io::Error },
    /// toml's message names the line, column and field.
    #[error("config file {path}: {message}")]
    Parse { path: PathBuf, message: String },
    #[error("{origin}: {message}")]
    Invalid { origin: String, message: String },
    #[error(
        "no device_id configured and {path} is unreadable ({source}); set device_id in the config or pass --device-id"
    )]
    NoMachineId { path: PathBuf, source: std::io::Error },
}

impl FileConfig {
    pub fn parse(path: &Path, text: &str) -> Result<Self, ConfigError> {
        toml::from_str(text).map_err(|e| ConfigError::Parse { path: path.to_owned(), message: e.to_string() })
    }

    /// Reads `path`. A missing file at the default path means "all defaults";
    /// a missing file the operator named is an error.
    pub fn load(path: &Path, explicit: bool) -> Result<Self, ConfigError> {
        match std::fs::read_to_string(path) {
            Ok(text) => Self::parse(path, &text),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound && !explicit => Ok(Self::default()),
            Err(source) => Err(ConfigError::Read { path: path.to_owned(), source }),
        }
    }
}

impl AgentConfig {
    /// Merges file and overrides; `machine_id` is read only when no id is configured.
    pub fn resolve(file: FileConfig, file_path: &Path, cli: Overrides, machine_id: &Path) -> Result<Self, ConfigError> {
        let origin = |field: &str, from_cli: bool| {
            if from_cli {
                // The file's `keepalive_s` is the flag `--keepalive`; its
                // `controller_keys` list is `--controller-key`, repeated.
                let flag = match field {
                    "controller_keys" => "controller_key",
                    f => f.strip_suffix("_s").unwrap_or(f),
                };
                format!("command line --{}", flag.replace('_', "-"))
            } else {
                format!("config file {}: field `{field}`", file_path.display())
            }
        };
        let invalid = |field: &str, from_cli: bool, message: String| ConfigError::Invalid {
            origin: origin(field, from_cli),
            message,
        };

        let broker_cli = cli.broker.is_some();
        let brokers = cli.broker.or(file.broker).unwrap_or_else(|| "mqtt://127.0.0.1:1883".into());
        // Several nodes of one broker cluster, comma-separated: tried in turn.
        let brokers: BrokerNodes = brokers
            .parse()
            .map_err(|e: baton_protocol::InvalidBrokerUrl| invalid("broker", broker_cli, e.to_string()))?;
        let broker = brokers.first().clone();

        let id_cli = cli.device_id.is_some();
        let device_id = match cli.device_id.or(file.device_id) {
            Some(id) => DeviceId::new(id).map_err(|e| invalid("device_id", id_cli, e.to_string()))?,
            None => device_id_from_machine_id(machine_id)?,
        };

        let seconds = |field: &str, cli_v: Option<u64>, file_v: Option<u64>, default: u64, max: u64| {
            let v = cli_v.or(file_v).unwrap_or(default);
            if v == 0 || v > max {
                Err(invalid(field, cli_v.is_some(), format!("must be between 1 and {max} seconds, got {v}")))
            } else {
                Ok(Duration::from_secs(v))
            }
        };
        let heartbeat_interval =
            seconds("heartbeat_interval_s", cli.heartbeat_interval_s, file.heartbeat_interval_s, 300, 3600)?;
        let keepalive = seconds("keepalive_s", cli.keepalive_s, file.keepalive_s, 30, 3600)?;

        let cgroup_cli = cli.cgroup_parent.is_some();
        let cgroup_parent = cli
            .cgroup_parent
            .or(file.cgroup_parent)
            .unwrap_or_else(|| crate::runtime::layout::DEFAULT_CGROUP_PARENT.into());
        let clean = cgroup_parent.starts_with('/')
            && cgroup_parent.len() > 1
            && cgroup_parent.split('/').all(|c| c != ".." && c != ".")
            && cgroup_parent.bytes().all(|b| b.is_ascii_alphanumeric() || b"/._-".contains(&b));
        if !clean {
            return Err(invalid(
                "cgroup_parent",
                cgroup_cli,
                format!("{cgroup_parent:?} must be an absolute cgroup path like /baton (A-Z a-z 0-9 / . _ -)"),
            ));
        }

        let mut labels = file.labels;
        for (k, v) in &labels {
            validate_label(k, v).map_err(|m| invalid("labels", false, m.to_string()))?;
        }
        for pair in cli.labels {
            let (k, v) =
                pair.split_once('=').ok_or_else(|| invalid("label", true, format!("{pair:?} is not key=value")))?;
            validate_label(k, v).map_err(|m| invalid("label", true, m.to_string()))?;
            labels.insert(k.to_string(), v.to_string());
        }

        let keys_cli = !cli.controller_keys.is_empty();
        let controller_keys = if keys_cli { cli.controller_keys } else { file.controller_keys.clone() }
            .iter()
            .map(|k| {
                baton_protocol::crypto::parse_key(k).map_err(|e| invalid("controller_keys", keys_cli, e.to_string()))
            })
            .collect::<Result<Vec<_>, _>>()?;

        let password_cli = cli.mqtt_password_file.is_some();
        let data_dir = cli.data_dir.or(file.data_dir).unwrap_or_else(|| DEFAULT_DATA_DIR.into());
        // The password `baton-agent join` received, unless one is configured.
        let joined = Some(crate::join::password_path(&data_dir)).filter(|p| p.exists());
        let mqtt_credentials = match cli.mqtt_password_file.or(file.mqtt_password_file).or(joined) {
            None => None,
            Some(path) => {
                let password = std::fs::read_to_string(&path).map_err(|e| {
                    invalid("mqtt_password_file", password_cli, format!("cannot read {}: {e}", path.display()))
                })?;
                let user = file.mqtt_username.clone().unwrap_or_else(|| device_id.as_str().to_owned());
                Some((user, password.trim_end_matches(['\n', '\r']).to_owned()))
            }
        };

        let join_token = file
            .join_token
            .as_deref()
            .map(str::parse::<crate::join::Token>)
            .transpose()
            .map_err(|e| invalid("join_token", false, e.to_string()))?;
        let mut registry_ca = BTreeMap::new();
        for (host, path) in &file.registry_ca {
            let pem = std::fs::read(path)
                .map_err(|e| invalid("registry_ca", false, format!("{host}: cannot read {}: {e}", path.display())))?;
            baton_registry::parse_ca(&pem)
                .map_err(|e| invalid("registry_ca", false, format!("{host}: {}: {e}", path.display())))?;
            registry_ca.insert(host.clone(), pem);
        }

        let bridge_cli = cli.bridge_name.is_some();
        let bridge = cli.bridge_name.or(file.bridge_name.clone()).unwrap_or_else(|| crate::net::DEFAULT_BRIDGE.into());
        // An interface name (15 bytes) that is also an nftables table name.
        if bridge.is_empty() || bridge.len() > 15 || !bridge.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'_') {
            return Err(invalid("bridge_name", bridge_cli, format!("{bridge:?}: 1-15 letters, digits or _")));
        }
        let subnet_cli = cli.bridge_subnet.is_some();
        let subnet = cli
            .bridge_subnet
            .or(file.bridge_subnet.clone())
            .unwrap_or_else(|| crate::net::DEFAULT_SUBNET.into())
            .parse()
            .map_err(|e: String| invalid("bridge_subnet", subnet_cli, e))?;

        Ok(Self {
            network: crate::net::NetConfig { bridge, subnet },
            broker,
            brokers,
            mqtt_credentials,
            registry_ca,
            mqtt_ca_file: file.mqtt_ca_file.clone(),
            join_token,
            device_id,
            controller_keys,
            data_dir,
            run_dir: cli.run_dir.or(file.run_dir).unwrap_or_else(|| DEFAULT_RUN_DIR.into()),
            cgroup_parent,
            insecure_registries: file.insecure_registries.clone(),
            registry_auth: file.registry_auth.clone(),
            image_budget_bytes: file.image_budget_mb.unwrap_or(2048).saturating_mul(1 << 20),
            disk_reserve_bytes: file.disk_reserve_mb.unwrap_or(64).saturating_mul(1 << 20),
            heartbeat_interval,
            keepalive,
            labels,
            self_update: file.self_update.unwrap_or(true),
            upgrade_deadline: Duration::from_secs(file.upgrade_deadline_s.unwrap_or(120).clamp(10, 3600)),
            agent_entry: file.agent_entry.clone().unwrap_or_else(|| DEFAULT_AGENT_ENTRY.into()),
            sessions: crate::session::Limits {
                host: file.remote_host_shell.unwrap_or(false),
                max_sessions: file.max_sessions.unwrap_or(4).min(64),
                max_connections: file.max_forwarded_connections.unwrap_or(32).min(256),
                idle: Duration::from_secs(file.session_idle_timeout_s.unwrap_or(900).max(1)),
                max: Duration::from_secs(file.session_max_s.unwrap_or(8 * 3600).max(1)),
            },
            simulated_upgrades: false,
        })
    }
}

/// `dev-` and the first 16 hex digits of the machine id: stable across
/// reboots and agent reinstalls, distinct between devices.
fn device_id_from_machine_id(path: &Path) -> Result<DeviceId, ConfigError> {
    let text =
        std::fs::read_to_string(path).map_err(|source| ConfigError::NoMachineId { path: path.to_owned(), source })?;
    let hex: String = text.trim().chars().filter(char::is_ascii_hexdigit).take(16).collect();
    if hex.len() < 8 {
        return Err(ConfigError::NoMachineId {
            path: path.to_owned(),
            source: std::io::Error::new(std::io::ErrorKind::InvalidData, "not a machine id"),
        });
    }
    DeviceId::new(format!("dev-{hex}"))
        .map_err(|e| ConfigError::Invalid { origin: path.display().to_string(), message: e.to_string() })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn resolve(toml: &str, cli: Overrides) -> Result<AgentConfig, ConfigError> {
        let path = Path::new("/etc/baton/agent.toml");
        let dir = tempfile::tempdir().unwrap();
        let mid = dir.path().join("machine-id");
        std::fs::write(&mid, "4f1c0b7e9d2a4c6b8e0f1a2b3c4d5e6f\n").unwrap();
        AgentConfig::resolve(FileConfig::parse(path, toml)?, path, cli, &mid)
    }

    #[test]
    fn defaults_and_machine_id_derived_device_id() {
        let c = resolve("", Overrides::default()).unwrap();
        assert_eq!(c.device_id.as_str(), "dev-4f1c0b7e9d2a4c6b");
        assert_eq!(c.broker.to_string(), "mqtt://127.0.0.1:1883");
        assert_eq!(c.heartbeat_interval, Duration::from_secs(300));
    }

    #[test]
    fn command_line_wins_over_file() {
        let toml = "broker = \"mqtt://10.0.0.1\"\ndevice_id = \"pi-1\"\n[labels]\nsite = \"lyon\"\nrole = \"x\"\n";
        let cli = Overrides {
            device_id: Some("pi-2".into()),
            labels: vec!["role=sensor".into()],
            heartbeat_interval_s: Some(5),
            ..Default::default()
        };
        let c = resolve(toml, cli).unwrap();
        assert_eq!(c.device_id.as_str(), "pi-2");
        assert_eq!(c.broker.host, "10.0.0.1");
        assert_eq!(c.heartbeat_interval, Duration::from_secs(5));
        assert_eq!(c.labels["site"], "lyon");
        assert_eq!(c.labels["role"], "sensor");
    }

    #[test]
    fn errors_name_file_line_and_field() {
        let e =
            resolve("broker = \"mqtt://x\"\nheartbeat_intervl_s = 5\n", Overrides::default()).unwrap_err().to_string();
        assert!(e.contains("/etc/baton/agent.toml"), "{e}");
        assert!(e.contains("line 2"), "{e}");
        assert!(e.contains("heartbeat_intervl_s"), "{e}");

        let e = resolve("heartbeat_interval_s = 0\n", Overrides::default()).unwrap_err().to_string();
        assert!(e.contains("field `heartbeat_interval_s`") && e.contains("between 1 and 3600"), "{e}");

        let e =
            resolve("", Overrides { broker: Some("http://x".into()), ..Default::default() }).unwrap_err().to_string();
        assert!(e.contains("--broker") && e.contains("unknown scheme"), "{e}");

        // Nodes of a cluster, tried in turn; one bad one is named.
        let c = resolve("broker = \"mqtts://a.example:8883, mqtts://b.example:8883\"\n", Overrides::default()).unwrap();
        assert_eq!(c.brokers.to_string(), "mqtts://a.example:8883,mqtts://b.example:8883");
        assert_eq!(&c.broker, c.brokers.first());
        let e = resolve("broker = \"mqtt://a,ftp://b\"\n", Overrides::default()).unwrap_err().to_string();
        assert!(e.contains("field `broker`") && e.contains("ftp://b") && e.contains("unknown scheme"), "{e}");

        let e = resolve("[labels]\n\"bad key\" = \"v\"\n", Overrides::default()).unwrap_err().to_string();
        assert!(e.contains("labels") && e.contains("bad key"), "{e}");

        let e = resolve("join_token = \"baton1.nope\"\n", Overrides::default()).unwrap_err().to_string();
        assert!(e.contains("join_token") && e.contains("not a Baton join token"), "{e}");

        // A registry CA that is missing, or holds no certificate, is named at start.
        let e = resolve("[registry_ca]\n\"r.lan:5000\" = \"/nonexistent/ca.pem\"\n", Overrides::default())
            .unwrap_err()
            .to_string();
        assert!(e.contains("registry_ca") && e.contains("r.lan:5000") && e.contains("cannot read"), "{e}");
        let dir = tempfile::tempdir().unwrap();
        let not_pem = dir.path().join("ca.pem");
        std::fs::write(&not_pem, "hello").unwrap();
        let toml = format!("[registry_ca]\n\"r.lan:5000\" = \"{}\"\n", not_pem.display());
        let e = resolve(&toml, Overrides::default()).unwrap_err().to_string();
        assert!(e.contains("registry_ca") && e.contains("no PEM certificate"), "{e}");
    }
}
