//! `baton-agent`: the device daemon. Thin: parses flags, loads config, runs the library.

use std::path::PathBuf;
use std::process::ExitCode;

use baton_agent::config::{AgentConfig, FileConfig, Overrides, DEFAULT_CONFIG_PATH};
use clap::{Parser, Subcommand};

#[derive(Parser)]
#[command(
    name = "baton-agent",
    version,
    about = "Baton device agent: runs workloads, reports to the controller over MQTT"
)]
struct Cli {
    #[command(subcommand)]
    command: Option<Cmd>,
    #[command(flatten)]
    run: RunArgs,
}

#[derive(Subcommand)]
enum Cmd {
    /// Run the agent (the default).
    Run(RunArgs),
    /// Fork containers' shims (started by the agent; not for people).
    #[command(hide = true)]
    Spawner {
        /// Room in the command line for the shims' titles.
        #[arg(long)]
        title_room: Option<String>,
    },
    /// Run a command inside a running container (used by the agent).
    #[command(hide = true)]
    Exec(ExecCli),
    /// Manage the local image store (air-gapped devices load images from files).
    #[command(subcommand)]
    Image(ImageCmd),
    /// Stand in for a fleet: N devices with the real MQTT link and reconcile, fake containers.
    Simulate(SimCli),
    /// Watch a new agent on trial (started by the agent during an upgrade; not for people).
    #[command(hide = true)]
    UpgradeWatch {
        #[arg(long)]
        data_dir: PathBuf,
        #[arg(long)]
        pid: u32,
    },
    /// Enroll this device with a join token (`baton token create`), once.
    Join {
        token: String,
        #[command(flatten)]
        run: RunArgs,
    },
}

#[derive(clap::Args)]
struct SimCli {
    /// How many devices.
    #[arg(long, default_value_t = 100)]
    devices: usize,
    /// MQTT broker, mqtt://HOST[:PORT] or mqtts://HOST[:PORT] (comma-separated nodes).
    #[arg(long, default_value = "mqtt://127.0.0.1:1883")]
    broker: String,
    /// The CA an mqtts:// broker's certificate must chain to (e.g. a
    /// controller's ca.crt, or your own broker's CA).
    #[arg(long)]
    mqtt_ca_file: Option<PathBuf>,
    /// Device ids are PREFIX-0000, PREFIX-0001, …
    #[arg(long, default_value = "sim")]
    prefix: String,
    /// Where the devices keep their state (default /tmp/baton-sim-PREFIX).
    #[arg(long)]
    data_dir: Option<PathBuf>,
    /// Label key=value for every device (repeatable).
    #[arg(long = "label", short = 'l')]
    labels: Vec<String>,
    /// KEY=V1,V2,…: device n gets KEY=V(n mod count), e.g. site=lyon,paris,rome.
    #[arg(long)]
    label_cycle: Option<String>,
    /// Workloads whose image reference contains this run but never turn healthy.
    #[arg(long)]
    unhealthy_image: Option<String>,
    /// Workloads whose image reference contains this fail to start.
    #[arg(long)]
    failing_image: Option<String>,
    /// Apply --unhealthy-image / --failing-image only to the first N devices.
    #[arg(long)]
    knob_devices: Option<usize>,
    /// Milliseconds a simulated container takes to start.
    #[arg(long, default_value_t = 200)]
    start_ms: u64,
    /// Take the first N devices offline (a clean disconnect) during the run.
    #[arg(long, default_value_t = 0)]
    offline_devices: usize,
    /// Seconds into the run when they go offline.
    #[arg(long, default_value_t = 30)]
    offline_after: u64,
    /// Seconds they stay offline (0: until the simulator stops).
    #[arg(long, default_value_t = 0)]
    offline_for: u64,
    /// Seconds between heartbeats.
    #[arg(long, default_value_t = 15)]
    heartbeat_interval: u64,
    /// MQTT keepalive, seconds.
    #[arg(long, default_value_t = 30)]
    keepalive: u64,
    /// NAME=SECS:MILLICPU,…: the workload's total demand over the run (from
    /// SECS seconds on), shared by its running instances across the fleet,
    /// as their CPU use and as the load they say they have (in CPUs); e.g.
    /// web=0:500,60:4000,180:500 (repeatable).
    #[arg(long = "load", value_parser = baton_agent::simulate::LoadWave::parse)]
    load: Vec<baton_agent::simulate::LoadWave>,
    #[arg(long)]
    log_json: bool,
}

#[derive(Subcommand)]
enum ImageCmd {
    /// Import an image: an OCI image layout (directory or tarball), or a
    /// `docker save` / `podman save` archive.
    Load {
        file: PathBuf,
        /// The name to store it under (default: the layout's ref.name annotation).
        #[arg(long)]
        name: Option<String>,
        /// The agent's data dir (default from the config file).
        #[arg(long)]
        data_dir: Option<PathBuf>,
        #[arg(long, short = 'c')]
        config: Option<PathBuf>,
    },
    /// List imported images.
    Ls {
        #[arg(long)]
        data_dir: Option<PathBuf>,
        #[arg(long, short = 'c')]
        config: Option<PathBuf>,
    },
}

#[derive(clap::Args)]
struct ExecCli {
    #[arg(long)]
    id: String,
    #[arg(long)]
    root: PathBuf,
    #[arg(long, default_value_t = 10_000)]
    timeout_ms: u64,
    /// Pass stdin on (an interactive session).
    #[arg(long)]
    stdin: bool,
    /// Stdin is a terminal the command takes as its controlling one.
    #[arg(long)]
    tty: bool,
    /// NAME=VALUE set in the command's environment.
    #[arg(long)]
    env: Vec<String>,
    #[arg(last = true, required = true)]
    argv: Vec<String>,
}

#[derive(clap::Args, Default, Clone)]
struct RunArgs {
    /// Config file; a missing file at the default path means defaults.
    #[arg(long, short = 'c', env = "BATON_AGENT_CONFIG")]
    config: Option<PathBuf>,
    /// MQTT broker, mqtt://HOST[:PORT] or mqtts://HOST[:PORT]; the nodes of
    /// one cluster comma-separated (tried in turn).
    #[arg(long)]
    broker: Option<String>,
    /// Device id (default: derived from /etc/machine-id).
    #[arg(long)]
    device_id: Option<String>,
    /// Directory for the agent's state, images and logs.
    #[arg(long)]
    data_dir: Option<PathBuf>,
    /// Directory for runtime state that must not outlive a reboot (tmpfs; default /run/baton).
    #[arg(long)]
    run_dir: Option<PathBuf>,
    /// Parent cgroup of this agent's containers (default /baton); agents sharing a host need distinct ones.
    #[arg(long)]
    cgroup_parent: Option<String>,
    /// The bridge of `network: bridge` containers (default baton0); agents sharing a host need distinct ones.
    #[arg(long)]
    bridge_name: Option<String>,
    /// The bridge's IPv4 subnet (default 10.47.0.0/24).
    #[arg(long)]
    bridge_subnet: Option<String>,
    /// Report presence and inventory only; run no workloads (no root needed).
    #[arg(long)]
    no_workloads: bool,
    /// Seconds between heartbeats (default 300; every 15 s at most while an
    /// autoscaled workload asks for its load). Liveness between them is the
    /// MQTT keepalive.
    #[arg(long)]
    heartbeat_interval: Option<u64>,
    /// MQTT keepalive in seconds (default 30); the broker declares the device offline after 1.5×.
    #[arg(long)]
    keepalive: Option<u64>,
    /// Label key=value (repeatable); adds to and overrides the config file's labels.
    #[arg(long = "label", short = 'l')]
    labels: Vec<String>,
    /// Controller signing key to trust (ed25519:HEX, from `baton trust`; repeatable).
    #[arg(long = "controller-key")]
    controller_keys: Vec<String>,
    /// File with this device's MQTT password (the username is the device id).
    #[arg(long)]
    mqtt_password_file: Option<PathBuf>,
    /// Log as JSON lines.
    #[arg(long)]
    log_json: bool,
}

fn main() -> ExitCode {
    use clap::{CommandFactory, FromArgMatches};
    // The version is the one stamped in this binary (`version`), not a constant.
    let matches = Cli::command().version(baton_agent::version::version()).get_matches();
    let cli = match Cli::from_arg_matches(&matches) {
        Ok(c) => c,
        Err(e) => e.exit(),
    };
    // `baton-agent --data-dir X join TOKEN` would join with the defaults
    // (another data dir, the machine's id) and spend the token: refused.
    if let Some(name) = matches.subcommand_name() {
        let command = Cli::command();
        let before: Vec<String> = command
            .get_arguments()
            .filter(|a| matches.value_source(a.get_id().as_str()) == Some(clap::parser::ValueSource::CommandLine))
            .filter_map(|a| a.get_long().map(|l| format!("--{l}")))
            .collect();
        if !before.is_empty() {
            eprintln!(
                "baton-agent: {} given before `{name}` would not be used: put them after it (baton-agent {name} … {})",
                before.join(", "),
                before[0]
            );
            return ExitCode::from(2);
        }
    }
    let args = match cli.command {
        Some(Cmd::Run(args)) => args,
        // No tokio, no threads, no logging subscriber: the spawner and the
        // shims it forks must stay single-threaded.
        Some(Cmd::Spawner { .. }) => {
            return ExitCode::from(baton_agent::runtime::spawner::serve().clamp(0, 255) as u8);
        }
        Some(Cmd::Exec(e)) => {
            let code = baton_agent::runtime::exec::run(baton_agent::runtime::exec::ExecArgs {
                id: e.id,
                root: e.root,
                timeout: std::time::Duration::from_millis(e.timeout_ms),
                argv: e.argv,
                stdin: e.stdin,
                tty: e.tty,
                env: e.env.iter().filter_map(|kv| kv.split_once('=')).map(|(k, v)| (k.into(), v.into())).collect(),
            });
            return ExitCode::from(code.clamp(0, 255) as u8);
        }
        Some(Cmd::Image(cmd)) => {
            // `baton-agent --data-dir D image load …` means D too (the agent's own flags).
            return match image_command(cmd, cli.run.data_dir.clone(), cli.run.config.clone()) {
                Ok(()) => ExitCode::SUCCESS,
                Err(e) => {
                    eprintln!("baton-agent: {e}");
                    ExitCode::FAILURE
                }
            };
        }
        Some(Cmd::UpgradeWatch { data_dir, pid }) => {
            return match baton_agent::upgrade::switch::watch(&data_dir, pid) {
                Ok(()) => ExitCode::SUCCESS,
                Err(e) => {
                    eprintln!("baton-agent upgrade-watch: {e}");
                    ExitCode::FAILURE
                }
            };
        }
        Some(Cmd::Join { token, run }) => {
            init_logging(run.log_json);
            return match join(&token, run) {
                Ok(id) => {
                    println!("joined as {id}; start the agent (systemctl start baton-agent)");
                    ExitCode::SUCCESS
                }
                Err(e) => {
                    eprintln!("baton-agent join: {e}");
                    ExitCode::FAILURE
                }
            };
        }
        Some(Cmd::Simulate(sim)) => {
            init_logging(sim.log_json);
            return match simulate(sim) {
                Ok(()) => ExitCode::SUCCESS,
                Err(e) => {
                    eprintln!("baton-agent simulate: {e}");
                    ExitCode::FAILURE
                }
            };
        }
        None => cli.run,
    };
    init_logging(args.log_json);
    match run(args) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("baton-agent: {e}");
            ExitCode::FAILURE
        }
    }
}

fn join(token: &str, args: RunArgs) -> Result<String, Box<dyn std::error::Error>> {
    let token: baton_agent::join::Token = token.parse()?;
    let config = resolve_config(args)?;
    let rt = tokio::runtime::Builder::new_current_thread().enable_all().build()?;
    rt.block_on(baton_agent::join::join(&config, &token, std::time::Duration::from_secs(30)))?;
    Ok(config.device_id.to_string())
}

fn resolve_config(args: RunArgs) -> Result<AgentConfig, Box<dyn std::error::Error>> {
    let explicit = args.config.is_some();
    let path = args.config.unwrap_or_else(|| DEFAULT_CONFIG_PATH.into());
    let file = FileConfig::load(&path, explicit)?;
    let overrides = Overrides {
        broker: args.broker,
        device_id: args.device_id,
        data_dir: args.data_dir,
        run_dir: args.run_dir,
        cgroup_parent: args.cgroup_parent,
        bridge_name: args.bridge_name,
        bridge_subnet: args.bridge_subnet,
        heartbeat_interval_s: args.heartbeat_interval,
        keepalive_s: args.keepalive,
        labels: args.labels,
        controller_keys: args.controller_keys,
        mqtt_password_file: args.mqtt_password_file,
    };
    Ok(AgentConfig::resolve(file, &path, overrides, "/etc/machine-id".as_ref())?)
}

fn run(args: RunArgs) -> Result<(), Box<dyn std::error::Error>> {
    use baton_agent::upgrade::switch;
    let config = resolve_config(args.clone())?;
    // Started by the agent before it to try this build: say so to this
    // process only (shims and execs must not inherit it).
    let on_trial = std::env::var(switch::TRIAL_ENV).ok();
    std::env::remove_var(switch::TRIAL_ENV);
    switch::take_watcher_env();
    // One agent per data dir and cgroup parent: a second is refused here,
    // before it touches the device's state, upgrade, session or containers
    // (held until this process exits or execs its successor).
    let _instance = baton_agent::instance::InstanceLock::take(
        &config.data_dir,
        &config.cgroup_parent,
        std::time::Duration::from_secs(10),
    )?;
    if config.self_update {
        // Finish, roll back or start an upgrade left half-way, before anything runs.
        switch::at_start(&config.data_dir, on_trial.is_some());
    }
    let (data_dir, no_workloads) = (config.data_dir.clone(), args.no_workloads);
    let reload = move || resolve_config(args).map_err(|e| e.to_string());
    match baton_agent::assemble::run(config, reload, no_workloads, on_trial, shutdown_signal())? {
        baton_agent::link::LinkExit::Stopped => Ok(()),
        baton_agent::link::LinkExit::HandOver => {
            let e = switch::hand_over(&switch::Paths::new(&data_dir), &data_dir);
            Err(format!("cannot hand over to the new agent: {e}").into())
        }
    }
}

fn simulate(args: SimCli) -> Result<(), Box<dyn std::error::Error>> {
    let overrides = Overrides {
        broker: Some(args.broker),
        device_id: Some(format!("{}-0000", args.prefix)),
        heartbeat_interval_s: Some(args.heartbeat_interval),
        keepalive_s: Some(args.keepalive),
        labels: args.labels,
        ..Overrides::default()
    };
    let mut base =
        AgentConfig::resolve(FileConfig::default(), "(none)".as_ref(), overrides, "/etc/machine-id".as_ref())?;
    base.mqtt_ca_file = args.mqtt_ca_file;
    let label_cycle = match args.label_cycle {
        None => None,
        Some(spec) => {
            let (key, values) = spec.split_once('=').ok_or("--label-cycle: expected KEY=V1,V2,…")?;
            let values: Vec<String> = values.split(',').map(str::to_string).collect();
            for v in &values {
                baton_protocol::validate_label(key, v).map_err(|e| format!("--label-cycle: {e}"))?;
            }
            Some((key.to_string(), values))
        }
    };
    let cfg = baton_agent::simulate::SimConfig {
        base,
        devices: args.devices,
        data_dir: args.data_dir.unwrap_or_else(|| std::env::temp_dir().join(format!("baton-sim-{}", args.prefix))),
        prefix: args.prefix,
        label_cycle,
        unhealthy_image: args.unhealthy_image,
        failing_image: args.failing_image,
        knob_devices: args.knob_devices,
        start_ms: args.start_ms,
        offline: (args.offline_devices > 0).then(|| baton_agent::simulate::Offline {
            devices: args.offline_devices,
            after: std::time::Duration::from_secs(args.offline_after),
            duration: (args.offline_for > 0).then(|| std::time::Duration::from_secs(args.offline_for)),
        }),
        load: args.load,
    };
    let rt = tokio::runtime::Builder::new_current_thread().enable_all().build()?;
    rt.block_on(baton_agent::simulate::run(cfg, shutdown_signal()))?;
    Ok(())
}

/// The data dir an image command works on: flag, else config file, else default.
fn data_dir_for(data_dir: Option<PathBuf>, config: Option<PathBuf>) -> Result<PathBuf, Box<dyn std::error::Error>> {
    if let Some(d) = data_dir {
        return Ok(d);
    }
    let explicit = config.is_some();
    let path = config.unwrap_or_else(|| DEFAULT_CONFIG_PATH.into());
    let file = FileConfig::load(&path, explicit)?;
    Ok(file.data_dir.unwrap_or_else(|| baton_agent::config::DEFAULT_DATA_DIR.into()))
}

fn image_command(
    cmd: ImageCmd,
    agent_data_dir: Option<PathBuf>,
    agent_config: Option<PathBuf>,
) -> Result<(), Box<dyn std::error::Error>> {
    let dir = |data_dir: Option<PathBuf>, config: Option<PathBuf>| {
        data_dir_for(data_dir.or(agent_data_dir.clone()), config.or(agent_config.clone()))
    };
    match cmd {
        ImageCmd::Load { file, name, data_dir, config } => {
            let store = baton_agent::image::ImageStore::open(dir(data_dir, config)?.join("images"))?;
            let record = store.import_layout(&file, name.as_deref())?;
            store.rootfs(&record)?;
            println!("loaded {} ({}, {} layers)", record.reference, record.manifest, record.layers.len());
        }
        ImageCmd::Ls { data_dir, config } => {
            let store = baton_agent::image::ImageStore::open(dir(data_dir, config)?.join("images"))?;
            for r in store.images() {
                println!("{}\t{}\t{} layers", r.reference, r.manifest, r.layers.len());
            }
        }
    }
    Ok(())
}

async fn shutdown_signal() {
    use tokio::signal::unix::{signal, SignalKind};
    let (Ok(mut term), Ok(mut int)) = (signal(SignalKind::terminate()), signal(SignalKind::interrupt())) else {
        return std::future::pending().await;
    };
    tokio::select! {
        _ = term.recv() => {}
        _ = int.recv() => {}
    }
    tracing::info!("shutdown requested");
}

fn init_logging(json: bool) {
    use tracing_subscriber::layer::SubscriberExt;
    use tracing_subscriber::util::SubscriberInitExt;
    let filter = log_filter(std::env::var("BATON_LOG").ok().as_deref());
    let ansi = std::io::IsTerminal::is_terminal(&std::io::stderr());
    let builder =
        tracing_subscriber::fmt().with_writer(std::io::stderr).with_ansi(ansi).with_max_level(tracing::Level::TRACE);
    if json {
        builder.json().finish().with(filter).init();
    } else {
        builder.finish().with(filter).init();
    }
}

/// `BATON_LOG`'s `target=level` list (`info`, `warn,baton_agent::link=debug`).
/// The agent takes targets and levels only — not the span and field
/// directives of the controller's filter, whose regex engine was ~300 KiB of
/// the binary. A value it cannot read is said on stderr, and `info` applies.
fn log_filter(var: Option<&str>) -> tracing_subscriber::filter::Targets {
    use tracing_subscriber::filter::Targets;
    let default = Targets::new().with_default(tracing::Level::INFO);
    match var.map(str::trim).filter(|v| !v.is_empty()) {
        None => default,
        // `Targets` would read `target[span]` as a target name, and a list
        // naming no real target turns every log off.
        Some(v) if v.contains(['[', '{', '"']) => {
            eprintln!(
                "BATON_LOG={v:?}: the agent takes target=level lists only (no [span] or {{field}} directives); logging at info"
            );
            default
        }
        Some(v) => v.parse().unwrap_or_else(|e| {
            eprintln!("BATON_LOG={v:?} is not a list of target=level ({e}); logging at info");
            default
        }),
    }
}

#[cfg(test)]
mod tests {
    use super::log_filter;
    use tracing::Level;

    #[test]
    fn baton_log_takes_targets_and_levels_and_falls_back_to_info() {
        let f = log_filter(Some("warn,baton_agent::link=debug"));
        assert!(f.would_enable("baton_agent::link", &Level::DEBUG));
        assert!(!f.would_enable("baton_agent::engine", &Level::INFO));
        assert!(f.would_enable("baton_agent::engine", &Level::WARN));
        for unreadable in
            [None, Some(""), Some("baton_agent=loud"), Some("baton_agent[span]=debug"), Some("x[{a=1}]=trace")]
        {
            let f = log_filter(unreadable);
            assert!(
                f.would_enable("rumqttc", &Level::INFO) && !f.would_enable("rumqttc", &Level::DEBUG),
                "{unreadable:?}"
            );
        }
    }
}
