//! Puts a device agent together from its configuration: the join a
//! `join_token` asks for, the checks that refuse a configuration that cannot
//! work, the workloads engine (runtime, prober, device identity, image store,
//! puller) and the link, run until `shutdown`. `main.rs` only parses flags.
//! Every thread started here has an owner that stops and joins it; none of
//! them stops a container on the way out.

use std::future::Future;
use std::sync::Arc;
use std::time::Duration;

use crate::config::AgentConfig;
use crate::engine::{EngineHandle, EngineThread};
use crate::image::registry::{Registry, RegistryConfig};
use crate::image::source::StoreImages;
use crate::image::{ImageError, ImageStore};
use crate::link::Link;
use crate::runtime::{Layout, LibcontainerRuntime};
use crate::supervisor::Supervisor;

#[derive(Debug, thiserror::Error)]
pub enum StartError {
    #[error("join_token: {0}")]
    Join(#[from] crate::join::JoinError),
    #[error("{0}")]
    Broker(String),
    #[error("{0}")]
    Config(String),
    #[error("image store: {0}")]
    Images(#[from] ImageError),
    #[error("{0}")]
    Io(#[from] std::io::Error),
}

/// Runs the agent until `shutdown` resolves. `reload` gives the
/// configuration again after a first-start join (it names the password the
/// join wrote). With `no_workloads`, presence and inventory only.
/// `on_trial`: the version this process was started to try (see `upgrade`).
/// Returns `HandOver` when a new agent is staged: the caller replaces the
/// process with it (`upgrade::switch::hand_over`).
pub fn run(
    mut config: AgentConfig,
    reload: impl FnOnce() -> Result<AgentConfig, String>,
    no_workloads: bool,
    on_trial: Option<String>,
    shutdown: impl Future<Output = ()>,
) -> Result<crate::link::LinkExit, StartError> {
    // `join_token` in agent.toml: enroll once, at the first start, then run
    // with what the join gave (the configuration is read again for it).
    if let Some(token) = config.join_token.clone() {
        if !crate::join::password_path(&config.data_dir).exists() {
            let rt = tokio::runtime::Builder::new_current_thread().enable_all().build()?;
            rt.block_on(crate::join::join(&config, &token, Duration::from_secs(30)))?;
            tracing::info!(device = %config.device_id, "joined with the token in the configuration");
            config = reload().map_err(StartError::Config)?;
        }
    }
    // An mqtts:// broker with nothing to trust is a configuration error: say so now.
    let trust = crate::trust::Trust::load(config.controller_keys.clone(), &config.data_dir);
    for broker in config.brokers.all() {
        crate::tls::transport(broker, &trust.keys(), config.mqtt_ca_file.as_deref()).map_err(StartError::Broker)?;
    }

    let (handle, engine) = if no_workloads {
        (None, None)
    } else {
        let (handle, engine) = start_engine(&config)?;
        (Some(handle), Some(engine))
    };
    // One thread: the agent's work is I/O-bound and small, and every extra
    // worker thread costs stack and RSS on a 512 MB device.
    let rt = tokio::runtime::Builder::new_current_thread().enable_all().build()?;
    let exit = rt.block_on(Link::run_agent(config, handle, on_trial, shutdown));
    // The link said goodbye; the engine finishes its step and stops (the
    // containers carry on, and the next agent re-adopts them).
    if let Some(engine) = engine {
        engine.shutdown();
    }
    Ok(exit)
}

/// The workloads engine, started with the persisted desired document so the
/// device runs its last known state with no network and no controller.
pub fn start_engine(config: &AgentConfig) -> Result<(EngineHandle, EngineThread), StartError> {
    // The build that runs, even if its file was replaced since it started:
    // the spawner and exec helpers must speak this agent's protocol.
    let shim = std::path::PathBuf::from("/proc/self/exe");
    let layout = Layout::new(&config.data_dir, &config.run_dir).with_cgroup_parent(config.cgroup_parent.clone());
    let network =
        crate::net::Network::open(config.network.clone(), config.device_id.as_str(), &config.data_dir, &config.run_dir);
    let runtime = LibcontainerRuntime::new(layout, shim).with_network(Arc::new(network));
    let prober = Arc::new(crate::probe::RuntimeProber(runtime.clone()));
    let exec_runtime = runtime.clone();
    // Secrets are opened only to be written under run_dir: it must be memory.
    let identity = match crate::trust::load_or_create_identity(&config.data_dir) {
        Err(e) => Err(format!("device key unusable: {e}")),
        Ok(_) if !crate::runtime::layout::is_tmpfs(&config.run_dir) => {
            tracing::warn!(run_dir = %config.run_dir.display(), "run_dir is not a tmpfs: workloads with secrets will not start");
            Err(format!("run_dir {} is not a tmpfs; secrets are never written to disk", config.run_dir.display()))
        }
        Ok(key) => Ok((config.device_id.as_str().to_owned(), Arc::new(key))),
    };
    let supervisor = Supervisor::new(runtime).with_prober(prober).with_identity(identity);
    let store = ImageStore::open(config.data_dir.join("images"))?.with_reserve(config.disk_reserve_bytes);
    let registry = Registry::new(RegistryConfig {
        insecure: config.insecure_registries.clone(),
        credentials: config
            .registry_auth
            .iter()
            .map(|(h, a)| (h.clone(), (a.username.clone(), a.password.clone())))
            .collect(),
        ca_pem: config.registry_ca.clone(),
    });
    let images = StoreImages::new(store, Some(registry))?;
    let (mut handle, engine) = crate::engine::spawn(
        supervisor,
        images,
        &config.data_dir,
        config.image_budget_bytes,
        Some(config.run_dir.join("services")),
    )?;
    handle.runtime = Some(Arc::new(exec_runtime));
    Ok((handle, engine))
}
