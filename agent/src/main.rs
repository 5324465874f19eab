//! `baton-agent`: the device daemon. Thin: parses flags, loads config, runs the library.

use std::path::PathBuf;
use std::process::ExitCode;

use baton_agent::config::{AgentConfig, FileConfig, Overrides, DEFAULT_CONFIG_PATH};
use baton_agent::link::Link;
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
    /// Own one container (started by the agent; not for people).
    #[command(hide = true)]
    Shim(ShimCli),
    /// Run a command inside a running container (used by the agent).
    #[command(hide = true)]
    Exec(ExecCli),
}

#[derive(clap::Args)]
struct ExecCli {
    #[arg(long)]
    id: String,
    #[arg(long)]
    root: PathBuf,
    #[arg(long, default_value_t = 10_000)]
    timeout_ms: u64,
    #[arg(last = true, required = true)]
    argv: Vec<String>,
}

#[derive(clap::Args)]
struct ShimCli {
    #[arg(long)]
    id: String,
    #[arg(long)]
    bundle: PathBuf,
    #[arg(long)]
    root: PathBuf,
    #[arg(long)]
    state: PathBuf,
    #[arg(long, default_value_t = 10_000)]
    stop_grace_ms: u64,
    #[arg(long, default_value_t = 1 << 20)]
    log_max_bytes: u64,
    #[arg(long, default_value_t = 1000)]
    log_flush_ms: u64,
}

#[derive(clap::Args, Default)]
struct RunArgs {
    /// Config file; a missing file at the default path means defaults.
    #[arg(long, short = 'c', env = "BATON_AGENT_CONFIG")]
    config: Option<PathBuf>,
    /// MQTT broker, mqtt://HOST[:PORT].
    #[arg(long)]
    broker: Option<String>,
    /// Device id (default: derived from /etc/machine-id).
    #[arg(long)]
    device_id: Option<String>,
    /// Directory for the agent's state, images and logs.
    #[arg(long)]
    data_dir: Option<PathBuf>,
    /// Seconds between heartbeats (default 15).
    #[arg(long)]
    heartbeat_interval: Option<u64>,
    /// MQTT keepalive in seconds (default 30); the broker declares the device offline after 1.5×.
    #[arg(long)]
    keepalive: Option<u64>,
    /// Label key=value (repeatable); adds to and overrides the config file's labels.
    #[arg(long = "label", short = 'l')]
    labels: Vec<String>,
    /// Log as JSON lines.
    #[arg(long)]
    log_json: bool,
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    let args = match cli.command {
        Some(Cmd::Run(args)) => args,
        // No tokio, no threads, no logging subscriber: the shim must stay single-threaded.
        Some(Cmd::Shim(s)) => {
            let code = baton_agent::runtime::shim::launch(baton_agent::runtime::shim::ShimArgs {
                id: s.id,
                bundle: s.bundle,
                root: s.root,
                state: s.state,
                stop_grace: std::time::Duration::from_millis(s.stop_grace_ms),
                log_max_bytes: s.log_max_bytes,
                log_flush: std::time::Duration::from_millis(s.log_flush_ms),
            });
            return ExitCode::from(code.clamp(0, 255) as u8);
        }
        Some(Cmd::Exec(e)) => {
            let code = baton_agent::runtime::exec::run(baton_agent::runtime::exec::ExecArgs {
                id: e.id,
                root: e.root,
                timeout: std::time::Duration::from_millis(e.timeout_ms),
                argv: e.argv,
            });
            return ExitCode::from(code.clamp(0, 255) as u8);
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

fn run(args: RunArgs) -> Result<(), Box<dyn std::error::Error>> {
    let explicit = args.config.is_some();
    let path = args.config.unwrap_or_else(|| DEFAULT_CONFIG_PATH.into());
    let file = FileConfig::load(&path, explicit)?;
    let overrides = Overrides {
        broker: args.broker,
        device_id: args.device_id,
        data_dir: args.data_dir,
        heartbeat_interval_s: args.heartbeat_interval,
        keepalive_s: args.keepalive,
        labels: args.labels,
    };
    let config = AgentConfig::resolve(file, &path, overrides, "/etc/machine-id".as_ref())?;

    // One thread: the agent's work is I/O-bound and small, and every extra
    // worker thread costs stack and RSS on a 512 MB device.
    let rt = tokio::runtime::Builder::new_current_thread().enable_all().build()?;
    rt.block_on(Link::run(config, shutdown_signal()));
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
    let filter = tracing_subscriber::EnvFilter::try_from_env("BATON_LOG").unwrap_or_else(|_| "info".into());
    let ansi = std::io::IsTerminal::is_terminal(&std::io::stderr());
    let builder = tracing_subscriber::fmt().with_env_filter(filter).with_writer(std::io::stderr).with_ansi(ansi);
    if json {
        builder.json().init();
    } else {
        builder.init();
    }
}
