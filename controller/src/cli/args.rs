//! `baton`'s command line as clap sees it: verbs, their arguments and
//! defaults, and the parsers of argument values.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::time::Duration;

use anyhow::Context;
use clap::{Args, Parser, Subcommand, ValueEnum};

use super::output::Format;
use super::up;
use crate::api::client::DEFAULT_SERVER;
use crate::server::{BrokerMode, ServerConfig};

#[derive(Parser)]
#[command(name = "baton", version, about = "Baton: orchestrate containers on fleets of small Linux devices")]
pub struct Cli {
    /// Controller API URL; the replicas of one store comma-separated (the
    /// CLI uses the first that serves: standbys answer 503).
    #[arg(long, global = true, env = "BATON_SERVER", default_value = DEFAULT_SERVER)]
    pub server: String,
    /// API token, for a controller started with --api-auth.
    #[arg(long, global = true, env = "BATON_TOKEN", hide_env_values = true)]
    pub token: Option<String>,
    /// Act for this tenant (a fleet-wide token's view narrowed to it; what
    /// you create goes to it). A tenant's own token needs no flag.
    #[arg(long, global = true, env = "BATON_TENANT")]
    pub tenant: Option<String>,
    /// CA certificate (PEM) to trust for an https:// server (the controller's DATA_DIR/ca.crt).
    #[arg(long, global = true, env = "BATON_CA_FILE")]
    pub ca_file: Option<PathBuf>,
    #[command(subcommand)]
    pub command: Command,
}

#[derive(Subcommand)]
pub enum Command {
    /// Run the controller (embedded MQTT broker and SQLite store by default).
    Server(ServerArgs),
    /// Run a controller and an agent on this machine: the quickest way to a fleet of one.
    Up(up::UpArgs),
    /// List resources.
    Get {
        resource: Resource,
        #[arg(long, short, value_enum, default_value_t)]
        output: Format,
        /// Events: only those about this device or workload.
        #[arg(long)]
        subject: Option<String>,
        /// Events: the newest this many, listed oldest first (the newest last).
        #[arg(long, default_value_t = 200)]
        limit: usize,
    },
    /// Show one resource in detail.
    Describe {
        resource: Resource,
        id: String,
        #[arg(long, short, value_enum, default_value_t)]
        output: Format,
    },
    /// Create or update workloads from manifest files (YAML, several documents per file).
    Apply {
        /// A manifest or Compose file, a directory of *.yaml / *.yml files, or - (stdin).
        #[arg(long, short = 'f', required = true)]
        file: Vec<PathBuf>,
        #[arg(long, short, value_enum, default_value_t)]
        output: Format,
    },
    /// Delete a workload (every device stops and removes it), or forget a
    /// device that is not connected (a dead one: its record and document go,
    /// its credentials stay).
    Delete { resource: Resource, name: String },
    /// Set (key=value) or remove (key-) operator labels on a device.
    Label {
        resource: Resource,
        id: String,
        /// key=value to set, key- to remove.
        #[arg(required = true)]
        changes: Vec<String>,
        #[arg(long, short, value_enum, default_value_t)]
        output: Format,
    },
    /// Print a workload's log from a device (works after the container exited too).
    Logs {
        workload: String,
        #[arg(long, short)]
        device: String,
        /// Lines from the end (0 = everything kept on the device).
        #[arg(long, default_value_t = 100)]
        tail: u32,
        /// Keep streaming new lines until interrupted.
        #[arg(long, short)]
        follow: bool,
    },
    /// Run a command inside a workload's container on a device: at once
    /// with its output (by default), or as an interactive session (-i, -t)
    /// carried through the device's own MQTT connection.
    Exec {
        #[arg(long, short)]
        device: String,
        /// The workload whose newest container it runs in (none with --host).
        #[arg(required_unless_present = "host")]
        workload: Option<String>,
        /// Keep stdin open and pass it on (an interactive session).
        #[arg(long, short)]
        interactive: bool,
        /// Give the command a terminal (window size, Ctrl-C, job control).
        #[arg(long, short)]
        tty: bool,
        /// Run on the device's host instead of in a container: needs a
        /// fleet-wide admin token and `remote_host_shell = true` in the agent's config.
        #[arg(long, conflicts_with = "workload")]
        host: bool,
        #[arg(last = true, required = true)]
        command: Vec<String>,
    },
    /// Forward local TCP connections to a port on a device (in a workload's
    /// container, or the device's own with no workload), through the
    /// device's MQTT connection. Runs until interrupted.
    PortForward {
        #[arg(long, short)]
        device: String,
        /// `[WORKLOAD] LOCAL:REMOTE`: the workload whose newest container to
        /// reach (none: the device itself) and the ports (LOCAL 0: any free
        /// port, printed; REMOTE alone: the same port locally).
        #[arg(num_args = 1..=2, required = true, value_names = ["WORKLOAD", "LOCAL:REMOTE"])]
        target: Vec<String>,
        /// Local address to listen on.
        #[arg(long, default_value = "127.0.0.1")]
        address: std::net::IpAddr,
    },
    /// Copy a file to or from a workload's container on a device
    /// (`WORKLOAD:/PATH`), or its host (`:/PATH` with --host): resumable,
    /// checked with SHA-256.
    Cp {
        #[arg(long, short)]
        device: String,
        /// The device side is the host's file system (needs a fleet-wide
        /// admin and `remote_host_shell = true` on the device).
        #[arg(long)]
        host: bool,
        src: String,
        dst: String,
    },
    /// Restart a workload's container on a device, whatever its restart policy.
    Restart {
        workload: String,
        #[arg(long, short)]
        device: String,
    },
    /// Watch and steer a workload's rollout.
    #[command(subcommand)]
    Rollout(RolloutCmd),
    /// Set how many devices run a workload.
    Scale {
        workload: String,
        #[arg(long)]
        replicas: u32,
    },
    /// Manage secrets: stored encrypted, sealed to each device, never shown.
    #[command(subcommand)]
    Secret(SecretCmd),
    /// Print the controller's signing key (agents' `controller_keys`).
    Trust,
    /// Copy the controller's store, consistently, while it serves.
    Backup {
        /// Where to write the copy.
        #[arg(long, short)]
        output: PathBuf,
    },
    /// Put a backup in place of a stopped controller's store (then start it:
    /// its devices follow the restored state).
    Restore {
        /// A file written by `baton backup`.
        backup: PathBuf,
        /// The controller's data dir (default as for `baton server`).
        #[arg(long)]
        data_dir: Option<PathBuf>,
    },
    /// Join tokens: a device enrolls once with `baton-agent join TOKEN`.
    #[command(subcommand)]
    Token(TokenCmd),
    /// Operator API tokens (admin, read-only), for a controller started with --api-auth.
    #[command(subcommand)]
    Apitoken(ApiTokenCmd),
    /// Event webhooks: signed JSON POSTs of the events you pick.
    #[command(subcommand)]
    Webhook(WebhookCmd),
    /// Device identities on the broker: credentials and revocation.
    #[command(subcommand)]
    Device(DeviceCmd),
    /// Agent self-update: publish builds, upgrade the fleet in waves, watch and steer it.
    #[command(subcommand)]
    Agent(AgentCmd),
    /// Print a shell completion script (bash, zsh, fish, elvish, powershell).
    Completion { shell: clap_complete::Shell },
}

#[derive(Subcommand)]
pub enum RolloutCmd {
    /// Show the latest rollout: waves, devices updated, healthy, failed.
    Status {
        workload: String,
        /// Follow it until it finishes (a progress bar on a terminal, a line per change otherwise);
        /// a workload that has had no rollout yet: until its first revision runs everywhere it is placed.
        #[arg(long, short)]
        watch: bool,
        #[arg(long, short, value_enum, default_value_t)]
        output: Format,
    },
    /// Hold the rollout at its current wave.
    Pause { workload: String },
    /// Continue a paused rollout.
    Resume { workload: String },
    /// Stop the rollout and send every updated device back to the previous revision.
    Abort { workload: String },
    /// Abort a running rollout, or roll out the revision before the current one.
    Undo { workload: String },
}

#[derive(Subcommand)]
pub enum AgentCmd {
    /// Store agent builds (one per architecture, read from each ELF header),
    /// under the version stamped in them.
    Publish {
        #[arg(required = true)]
        files: Vec<PathBuf>,
        /// For builds without a version stamp; must match the stamp when there is one.
        #[arg(long)]
        version: Option<String>,
    },
    /// Delete a version's builds from the controller (devices keep what they run).
    Unpublish {
        version: String,
        /// Only this architecture's build (x86_64, aarch64, arm).
        #[arg(long)]
        arch: Option<String>,
    },
    /// List published builds.
    #[command(alias = "ls")]
    Releases {
        #[arg(long, short, value_enum, default_value_t)]
        output: Format,
    },
    /// Move devices to an agent version in health-gated waves; too many
    /// failures send every device back to the version it ran.
    Upgrade {
        #[arg(long)]
        version: String,
        /// Only devices with these labels (k=v, repeatable or comma-separated).
        #[arg(long, short = 'l', value_delimiter = ',')]
        selector: Vec<String>,
        /// Cumulative wave sizes: counts or shares (default 1,25%,100%).
        #[arg(long, value_delimiter = ',')]
        waves: Option<Vec<String>>,
        /// Seconds a device must run the new agent, online, before it counts (default 10).
        #[arg(long)]
        min_ready: Option<u64>,
        /// More failed devices than this share of those updated rolls everything back (default 10).
        #[arg(long)]
        max_failures: Option<u32>,
        /// Seconds a device has to come back with the new agent before it counts as failed (default 600).
        #[arg(long)]
        deadline: Option<u64>,
    },
    /// Watch and steer the agent upgrade.
    #[command(subcommand)]
    Rollout(AgentRolloutCmd),
}

#[derive(Subcommand)]
pub enum AgentRolloutCmd {
    /// Show the last agent upgrade: waves, devices updated, failed.
    Status {
        #[arg(long, short)]
        watch: bool,
        #[arg(long, short, value_enum, default_value_t)]
        output: Format,
    },
    /// Hold it at its current wave.
    Pause,
    /// Continue a paused upgrade.
    Resume,
    /// Stop it and send every updated device back to the version it ran.
    Abort,
    /// Send every device it covered back to the version it ran, finished or not.
    Undo,
}

#[derive(Subcommand)]
pub enum WebhookCmd {
    /// POST the matching events to URL as they happen (the signing secret is printed once).
    Create {
        #[arg(long)]
        url: String,
        /// Comma-separated: `rollout.*`, `device.offline`, `*`.
        #[arg(long, value_delimiter = ',', required = true)]
        events: Vec<String>,
    },
    /// List webhooks with their delivery state.
    #[command(alias = "ls")]
    List {
        #[arg(long, short, value_enum, default_value_t)]
        output: Format,
    },
    /// Delete a webhook: nothing more is posted to it.
    Delete { id: String },
}

#[derive(Subcommand)]
pub enum ApiTokenCmd {
    /// Create a token (printed once).
    Create {
        /// admin or read-only.
        #[arg(long, default_value = "read-only")]
        role: crate::view::Role,
        #[arg(long, default_value = "")]
        name: String,
    },
    /// List tokens (never secrets).
    #[command(alias = "ls")]
    List {
        #[arg(long, short, value_enum, default_value_t)]
        output: Format,
    },
    /// Revoke a token.
    Revoke { id: String },
}

#[derive(Subcommand)]
pub enum TokenCmd {
    /// Create a join token (printed once).
    Create {
        /// Lifetime: 90s, 30m, 24h, 7d.
        #[arg(long, default_value = "24h")]
        ttl: String,
        /// Devices that may join with it.
        #[arg(long, default_value_t = 1)]
        uses: u32,
        /// Operator label key=value given to devices that join with it (repeatable).
        #[arg(long = "label", short = 'l')]
        labels: Vec<String>,
    },
    /// List tokens: uses left and expiry, never secrets.
    #[command(alias = "ls")]
    List {
        #[arg(long, short, value_enum, default_value_t)]
        output: Format,
    },
    /// Delete a token: no device can join with it any more.
    Delete { id: String },
}

/// `HOST=USER:PASSWORD_FILE` pairs → host → (user, password).
pub fn parse_registry_auth(args: &[String]) -> anyhow::Result<std::collections::BTreeMap<String, (String, String)>> {
    let mut out = std::collections::BTreeMap::new();
    for a in args {
        let bad = || anyhow::anyhow!("--registry-auth {a:?}: use HOST=USER:PASSWORD_FILE");
        let (host, rest) = a.split_once('=').ok_or_else(bad)?;
        let (user, file) = rest.split_once(':').ok_or_else(bad)?;
        anyhow::ensure!(!host.is_empty() && !user.is_empty() && !file.is_empty(), bad());
        let password =
            std::fs::read_to_string(file).with_context(|| format!("--registry-auth {host}: cannot read {file}"))?;
        out.insert(host.to_string(), (user.to_string(), password.trim_end_matches(['\n', '\r']).to_string()));
    }
    Ok(out)
}

/// `HOST=CA_FILE` pairs → host → the CA's PEM (checked to hold a certificate).
pub fn parse_registry_ca(args: &[String]) -> anyhow::Result<std::collections::BTreeMap<String, Vec<u8>>> {
    let mut out = std::collections::BTreeMap::new();
    for a in args {
        let (host, file) = a
            .split_once('=')
            .filter(|(h, f)| !h.is_empty() && !f.is_empty())
            .ok_or_else(|| anyhow::anyhow!("--registry-ca {a:?}: use HOST=CA_FILE"))?;
        let pem = std::fs::read(file).with_context(|| format!("--registry-ca {host}: cannot read {file}"))?;
        baton_registry::parse_ca(&pem).with_context(|| format!("--registry-ca {host}: {file}"))?;
        out.insert(host.to_string(), pem);
    }
    Ok(out)
}

/// Seconds in `90s`, `30m`, `24h`, `7d` (or a bare number of seconds).
pub fn parse_duration(text: &str) -> anyhow::Result<u64> {
    let t = text.trim();
    let (digits, unit) = t.split_at(t.find(|c: char| !c.is_ascii_digit()).unwrap_or(t.len()));
    let n: u64 = digits.parse().map_err(|_| anyhow::anyhow!("{text:?}: use a number with s, m, h or d"))?;
    let mult = match unit {
        "" | "s" => 1,
        "m" => 60,
        "h" => 3600,
        "d" => 86_400,
        _ => anyhow::bail!("{text:?}: use a number with s, m, h or d"),
    };
    anyhow::ensure!(n > 0, "{text:?}: must be more than zero");
    Ok(n.saturating_mul(mult))
}

#[derive(Subcommand)]
pub enum DeviceCmd {
    /// Issue (or replace) a device's MQTT password; printed once, only its hash is kept.
    Credentials { id: String },
    /// Revoke a device: it can no longer connect, and its open connections are cut.
    Revoke { id: String },
    /// Move a device to a tenant (fleet-wide token only): its workloads leave
    /// it, the tenant's arrive.
    Assign {
        id: String,
        /// (Not named `tenant`: that is the global --tenant.)
        #[arg(value_name = "TENANT")]
        to: String,
    },
}

#[derive(Subcommand)]
pub enum SecretCmd {
    /// Create a secret, or set a new version (workloads using it roll out).
    #[command(alias = "set")]
    Create {
        name: String,
        /// Read the value from this file ("-" for stdin).
        #[arg(long, conflicts_with = "from_literal", required_unless_present = "from_literal")]
        from_file: Option<PathBuf>,
        /// The value itself (beware: shell history).
        #[arg(long)]
        from_literal: Option<String>,
    },
    /// List secrets: versions and the workloads using them, never values.
    #[command(alias = "ls")]
    List {
        #[arg(long, short, value_enum, default_value_t)]
        output: Format,
    },
    /// Delete a secret no workload uses.
    Delete { name: String },
}

#[derive(Clone, Copy, Debug, ValueEnum)]
pub enum Resource {
    #[value(alias = "device")]
    Devices,
    #[value(alias = "workload")]
    Workloads,
    #[value(alias = "event")]
    Events,
}

#[derive(Args, Clone, Debug)]
pub struct ServerArgs {
    /// HTTP API listen address.
    #[arg(long, default_value = "127.0.0.1:8080")]
    pub listen: SocketAddr,
    /// Embedded MQTT broker listen address (ignored with --broker).
    #[arg(long, default_value = "127.0.0.1:1883")]
    pub mqtt_listen: SocketAddr,
    /// Use this external MQTT broker (mqtt://HOST[:PORT], or mqtts:// for
    /// TLS, see --broker-ca) instead of the embedded one; the nodes of a
    /// broker cluster, comma-separated, are tried in turn.
    #[arg(long)]
    pub broker: Option<String>,
    /// QoS of the controller's subscriptions to every device's topics: 1
    /// (the default) or 0. Its MQTT session is clean either way, so QoS 1
    /// keeps nothing across a lost connection; on NATS, QoS 1 subscriptions
    /// are JetStream consumers, which NATS 2.9 may fail to create under
    /// load, and QoS 0 ones are plain NATS subscriptions: use 0 there.
    #[arg(long, default_value_t = 1, value_parser = clap::value_parser!(u8).range(0..=1))]
    pub ingest_qos: u8,
    /// Where the store lives (default /var/lib/baton/controller as root, else ~/.local/share/baton/controller).
    #[arg(long)]
    pub data_dir: Option<PathBuf>,
    /// The database: `sqlite` (baton.db in the data dir, the default) or a
    /// PostgreSQL URL, postgres://USER[:PASSWORD]@HOST[:PORT]/DATABASE (keys
    /// and certificates stay in the data dir either way).
    #[arg(long, env = "BATON_STORE")]
    pub store: Option<String>,
    /// Seconds of silence after which an online device is reported stale.
    #[arg(long, default_value_t = 60)]
    pub stale_after: u64,
    /// Seconds of silence after which a device is offline, whether or not the
    /// broker published its Last Will (at least --stale-after).
    #[arg(long, default_value_t = 120)]
    pub offline_after: u64,
    /// Seconds between writes of heartbeat-only changes to the store.
    #[arg(long, default_value_t = 30)]
    pub flush_every: u64,
    /// Device connections the embedded broker accepts; 16 more are kept for
    /// the controller itself and other clients (monitoring, `mosquitto_sub`).
    #[arg(long, default_value_t = 10_000)]
    pub max_devices: usize,
    /// Pin image tags to digests when workloads are applied, so a fleet runs identical bytes
    /// (`false`: devices pull tags; for registries the controller cannot reach).
    #[arg(long, default_value_t = true, action = clap::ArgAction::Set)]
    pub resolve_digests: bool,
    /// Registry spoken to over plain HTTP when resolving digests (repeatable; loopback always is).
    #[arg(long = "insecure-registry")]
    pub insecure_registries: Vec<String>,
    /// Credentials for resolving digests in a private registry:
    /// HOST=USER:PASSWORD_FILE (repeatable; the password is read from the file).
    #[arg(long = "registry-auth")]
    pub registry_auth: Vec<String>,
    /// The CA (PEM file) a private registry's HTTPS certificate chains to,
    /// instead of the web PKI roots: HOST=CA_FILE (repeatable).
    #[arg(long = "registry-ca")]
    pub registry_ca: Vec<String>,
    /// Seconds a device may stay offline before its `replicas` workloads move to other devices.
    #[arg(long, default_value_t = 300)]
    pub reschedule_after: u64,
    /// File with the Ed25519 seed (64 hex digits) desired documents are signed with
    /// (default: DATA_DIR/signing.key, created on first start).
    #[arg(long)]
    pub signing_key: Option<PathBuf>,
    /// MQTT over TLS on the gateway (needs --mqtt-auth): its CA is made from
    /// the signing key (written to DATA_DIR/ca.crt); agents that trust the key trust it.
    #[arg(long, requires = "mqtt_auth")]
    pub mqtt_tls: bool,
    /// The API over HTTPS, with a certificate from the controller's CA
    /// (DATA_DIR/ca.crt; the CLI takes it with --ca-file). Required off loopback.
    #[arg(long)]
    pub api_tls: bool,
    /// Another name (DNS or IP) devices and operators use to reach this controller, for its certificates (repeatable).
    #[arg(long = "tls-name")]
    pub tls_names: Vec<String>,
    /// Require operator API tokens (`baton apitoken`); the first admin token is
    /// written to DATA_DIR/admin.token.
    #[arg(long)]
    pub api_auth: bool,
    /// Embedded broker: require every client to authenticate with the credentials
    /// issued by `baton device credentials ID`, and keep each device on its own topics.
    #[arg(long)]
    pub mqtt_auth: bool,
    /// Let the embedded broker listen off loopback without --mqtt-auth --mqtt-tls
    /// (any machine that reaches it can then speak for any device: a lab network only).
    #[arg(long)]
    pub allow_insecure_mqtt: bool,
    /// The external broker is Mosquitto with its dynamic-security plugin, and
    /// --broker-username is an admin of it: the controller keeps device and
    /// join accounts there (`baton token create`, `baton-agent join`, revoke).
    #[arg(long, requires_all = ["broker", "broker_username"])]
    pub broker_dynsec: bool,
    /// HOST:PORT at which the other controllers of a PostgreSQL store reach
    /// this one's API: recorded while it leads, so that standbys forward
    /// API requests to it (default: --listen, with this machine's name for
    /// an unspecified address).
    #[arg(long, value_name = "HOST:PORT")]
    pub advertise: Option<String>,
    /// Username for an external broker with per-client credentials (see `deploy/mosquitto/`).
    #[arg(long, requires = "broker_password_file")]
    pub broker_username: Option<String>,
    /// File holding that user's password.
    #[arg(long, requires = "broker_username")]
    pub broker_password_file: Option<PathBuf>,
    /// The CA certificates (PEM) an external broker's TLS certificate
    /// chains to, for `--broker mqtts://…` (default: the web PKI's roots).
    #[arg(long, requires = "broker", value_name = "FILE")]
    pub broker_ca: Option<PathBuf>,
    /// File with the key secrets are encrypted with at rest (64 hex digits;
    /// default: DATA_DIR/secrets.key, created on first start).
    #[arg(long)]
    pub secrets_key: Option<PathBuf>,
    /// Log as JSON lines.
    #[arg(long)]
    pub log_json: bool,
}

impl ServerArgs {
    pub fn to_config(&self) -> anyhow::Result<ServerConfig> {
        let broker = match &self.broker {
            Some(urls) => {
                let nodes: baton_protocol::BrokerNodes = urls.parse().context("--broker")?;
                BrokerMode::External(nodes)
            }
            None => BrokerMode::Embedded(self.mqtt_listen),
        };
        anyhow::ensure!(self.stale_after > 0, "--stale-after must be at least 1 second");
        anyhow::ensure!(
            self.offline_after >= self.stale_after,
            "--offline-after ({} s) must be at least --stale-after ({} s): a silent device is stale before it is offline",
            self.offline_after,
            self.stale_after
        );
        anyhow::ensure!(self.flush_every > 0, "--flush-every must be at least 1 second");
        if let Some(a) = &self.advertise {
            let unspecified = |host: &str| {
                host.trim_matches(['[', ']']).parse::<std::net::IpAddr>().is_ok_and(|ip| ip.is_unspecified())
            };
            anyhow::ensure!(
                !a.contains("://")
                    && a.rsplit_once(':').is_some_and(|(host, port)| {
                        !host.is_empty() && !unspecified(host) && port.parse::<u16>().is_ok_and(|p| p > 0)
                    }),
                "--advertise {a}: expected HOST:PORT, an address the other controllers reach this one's API at \
                 (no scheme, not 0.0.0.0)"
            );
        }
        let data_dir = self.data_dir.clone().unwrap_or_else(|| default_data_dir().join("controller"));
        Ok(ServerConfig {
            http_listen: self.listen,
            broker,
            store: crate::store::StoreAt::parse(self.store.as_deref(), &data_dir).map_err(anyhow::Error::msg)?,
            data_dir,
            stale_after: Duration::from_secs(self.stale_after),
            offline_after: Duration::from_secs(self.offline_after),
            flush_every: Duration::from_secs(self.flush_every),
            ingest_qos: if self.ingest_qos == 0 { rumqttc::QoS::AtMostOnce } else { rumqttc::QoS::AtLeastOnce },
            max_devices: self.max_devices,
            reschedule_after: Duration::from_secs(self.reschedule_after),
            resolve_digests: self.resolve_digests,
            insecure_registries: self.insecure_registries.clone(),
            registry_credentials: parse_registry_auth(&self.registry_auth)?,
            registry_ca: parse_registry_ca(&self.registry_ca)?,
            broker_credentials: match (&self.broker_username, &self.broker_password_file) {
                (Some(user), Some(path)) => {
                    let password = std::fs::read_to_string(path)
                        .with_context(|| format!("--broker-password-file {}", path.display()))?;
                    Some((user.clone(), password.trim_end_matches(['\n', '\r']).to_owned()))
                }
                _ => None,
            },
            mqtt_auth: self.mqtt_auth,
            api_auth: self.api_auth,
            mqtt_tls: self.mqtt_tls,
            api_tls: self.api_tls,
            allow_insecure_mqtt: self.allow_insecure_mqtt,
            broker_dynsec: self.broker_dynsec,
            broker_ca: self.broker_ca.clone(),
            advertise: self.advertise.clone(),
            tls_names: self.tls_names.clone(),
            signing_key: self.signing_key.clone(),
            secrets_key: self.secrets_key.clone(),
        })
    }
}

/// `/var/lib/baton` for root, `$XDG_DATA_HOME/baton` (or `~/.local/share/baton`) otherwise.
pub fn default_data_dir() -> PathBuf {
    let is_root =
        std::env::var_os("HOME").is_none_or(|h| h == "/root") || std::env::var("USER").is_ok_and(|u| u == "root");
    if is_root {
        return PathBuf::from("/var/lib/baton");
    }
    std::env::var_os("XDG_DATA_HOME")
        .map(PathBuf::from)
        .or_else(|| std::env::var_os("HOME").map(|h| PathBuf::from(h).join(".local/share")))
        .unwrap_or_else(|| PathBuf::from("."))
        .join("baton")
}

/// `[WORKLOAD] LOCAL:REMOTE` of `baton port-forward`.
pub fn forward_target(target: &[String]) -> anyhow::Result<(String, (u16, u16))> {
    let (workload, ports) = match target {
        [ports] => (String::new(), ports),
        [workload, ports] => (workload.clone(), ports),
        _ => anyhow::bail!("expected [WORKLOAD] LOCAL:REMOTE"),
    };
    Ok((workload, parse_ports(ports).map_err(|e| anyhow::anyhow!("{e}"))?))
}

/// `LOCAL:REMOTE` (REMOTE alone: the same port locally).
fn parse_ports(s: &str) -> Result<(u16, u16), String> {
    let port = |p: &str| p.parse::<u16>().map_err(|_| format!("{p:?} is not a port number (0-65535)"));
    let (local, remote) = match s.split_once(':') {
        Some((l, r)) => (port(l)?, port(r)?),
        None => (port(s)?, port(s)?),
    };
    if remote == 0 {
        return Err("the remote port cannot be 0".into());
    }
    Ok((local, remote))
}
