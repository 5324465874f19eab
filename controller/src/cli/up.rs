//! `baton up`: a controller (embedded broker and store) plus an agent child
//! process on this machine, stopped together. The agent is a separate process,
//! as on a real device, so what a newcomer sees is what a fleet does.

use std::path::PathBuf;
use std::time::Duration;

use anyhow::Context;
use clap::Args;

use super::{init_logging, runtime, shutdown_signal, ServerArgs};

#[derive(Args, Debug)]
pub struct UpArgs {
    #[command(flatten)]
    pub server: ServerArgs,
    /// The agent binary (default: `baton-agent` next to this `baton`, else on PATH).
    #[arg(long)]
    pub agent_bin: Option<PathBuf>,
    /// Device id of the local agent (default: derived from /etc/machine-id).
    #[arg(long)]
    pub device_id: Option<String>,
    /// Seconds between the local agent's heartbeats.
    #[arg(long, default_value_t = 15)]
    pub heartbeat_interval: u64,
    /// The local agent's run dir (default /run/baton); a tmpfs, or workloads with secrets do not start.
    #[arg(long)]
    pub run_dir: Option<PathBuf>,
}

fn agent_binary(explicit: Option<PathBuf>) -> PathBuf {
    explicit.unwrap_or_else(|| {
        std::env::current_exe()
            .ok()
            .and_then(|exe| exe.parent().map(|d| d.join("baton-agent")))
            .filter(|p| p.exists())
            .unwrap_or_else(|| PathBuf::from("baton-agent"))
    })
}

pub fn run(args: UpArgs) -> anyhow::Result<()> {
    init_logging(args.server.log_json);
    let cfg = args.server.to_config()?;
    anyhow::ensure!(
        !cfg.mqtt_auth,
        "baton up runs its agent without credentials: use `baton server --mqtt-auth` and give the agent `baton device credentials ID`"
    );
    let agent_dir = cfg.data_dir.parent().map_or_else(|| cfg.data_dir.join("agent"), |p| p.join("agent"));
    let signing_key = cfg.signing_key.clone().unwrap_or_else(|| cfg.data_dir.join("signing.key"));
    let bin = agent_binary(args.agent_bin);
    runtime()?.block_on(async move {
        let (ready_tx, ready_rx) = tokio::sync::oneshot::channel();
        let (stop_tx, stop_rx) = tokio::sync::oneshot::channel::<()>();
        let broker = cfg.broker_url();
        let server = tokio::spawn(crate::server::serve(cfg, async { let _ = stop_rx.await; }, Some(ready_tx)));
        let http = match ready_rx.await {
            Ok(addr) => addr,
            // The server failed before serving: its error says why.
            Err(_) => return server.await.context("controller task")?,
        };

        // The local agent trusts this controller's key from the start (no trust on first use).
        let seed = crate::keys::load_or_create(&signing_key, false)?;
        let key = baton_protocol::crypto::SigningKey::from_seed(&seed).public();
        let mut cmd = tokio::process::Command::new(&bin);
        cmd.arg("--controller-key")
            .arg(format!("ed25519:{}", baton_protocol::crypto::hex(&key)))
            .arg("--broker")
            .arg(broker.to_string())
            .arg("--data-dir")
            .arg(&agent_dir)
            .arg("--heartbeat-interval")
            .arg(args.heartbeat_interval.to_string())
            .kill_on_drop(true);
        if let Some(id) = &args.device_id {
            cmd.arg("--device-id").arg(id);
        }
        if let Some(dir) = &args.run_dir {
            cmd.arg("--run-dir").arg(dir);
        }
        // If `baton up` itself dies (SIGKILL, a crash), its agent goes too.
        // SAFETY: prctl is async-signal-safe; nothing else runs between fork and exec.
        unsafe {
            cmd.pre_exec(|| {
                if libc::prctl(libc::PR_SET_PDEATHSIG, libc::SIGTERM) != 0 {
                    return Err(std::io::Error::last_os_error());
                }
                Ok(())
            });
        }
        let mut agent = cmd.spawn().with_context(|| {
            format!("cannot start the agent {} (build it with `cargo build --release`, or pass --agent-bin)", bin.display())
        })?;
        eprintln!(
            "\nBaton is up: controller http://{http}, MQTT {broker}, local agent pid {}.\n\
             In another terminal: `baton get devices`. Ctrl-C stops both \
             (containers keep running; the next `baton up` adopts them).\n",
            agent.id().unwrap_or(0)
        );

        let outcome = tokio::select! {
            () = shutdown_signal() => Ok(()),
            status = agent.wait() => Err(anyhow::anyhow!("the local agent exited ({}); stopping", status.map_or_else(|e| e.to_string(), |s| s.to_string()))),
        };
        if let Some(pid) = agent.id() {
            // SIGTERM lets the agent publish its offline presence before the broker goes.
            let _ = std::process::Command::new("kill").arg("-TERM").arg(pid.to_string()).status();
            if tokio::time::timeout(Duration::from_secs(5), agent.wait()).await.is_err() {
                let _ = agent.kill().await;
            }
        }
        let _ = stop_tx.send(());
        server.await.context("controller task")??;
        outcome
    })
}
