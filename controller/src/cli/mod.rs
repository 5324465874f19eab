//! The `baton` command line: `server` and `up` run a controller; every other
//! verb is an HTTP client of one (`--server`, `BATON_SERVER`).

mod args;
pub mod output;
mod session;
mod up;

pub use args::*;

use std::path::PathBuf;

use anyhow::Context;
use clap::CommandFactory;

use crate::api::client::Client;
use crate::controller::now_ms;
use crate::view::LabelChange;
use output::Format;

/// Runs one CLI invocation; the binary's `main` only prints the error.
pub fn run(cli: Cli) -> anyhow::Result<()> {
    let client =
        || Client::with_options(&cli.server, cli.token.as_deref(), cli.tenant.as_deref(), cli.ca_file.as_deref());
    match cli.command {
        Command::Server(args) => {
            init_logging(args.log_json);
            let cfg = args.to_config()?;
            runtime()?.block_on(crate::server::serve(cfg, shutdown_signal(), None))
        }
        Command::Up(args) => up::run(args),
        Command::Get { resource: Resource::Devices, output, .. } => {
            let devices = client().devices()?;
            print(output, &devices, || {
                if devices.is_empty() {
                    "No devices yet. Start an agent with `baton-agent --broker mqtt://CONTROLLER:1883`.\n".into()
                } else {
                    output::devices_table(&devices, now_ms())
                }
            })
        }
        Command::Get { resource: Resource::Workloads, output, .. } => {
            let workloads = client().workloads()?;
            print(output, &workloads, || {
                if workloads.is_empty() {
                    "No workloads. Create one with `baton apply -f manifest.yaml`.\n".into()
                } else {
                    output::workloads_table(&workloads)
                }
            })
        }
        Command::Get { resource: Resource::Events, output, subject, limit } => {
            let events = client().events(subject.as_deref(), limit)?;
            print(output, &events, || output::events_table(&events, now_ms()))
        }
        Command::Describe { resource: Resource::Events, .. } => {
            anyhow::bail!("events have no details; `baton get events` lists them")
        }
        Command::Rollout(cmd) => rollout(&client(), cmd),
        Command::Agent(cmd) => agent(&client(), cmd),
        Command::Scale { workload, replicas } => {
            let w = client().scale(&workload, replicas)?;
            crate::outln!("workload/{} scaled to {} replicas ({} unplaced)", w.name, replicas, w.unplaced);
            Ok(())
        }
        Command::Describe { resource: Resource::Workloads, id, output } => {
            let w = client().workload(&id)?;
            print(output, &w, || output::workload_description(&w))
        }
        Command::Apply { file, output } => {
            let files = read_manifests(&file)?;
            let results = client().apply(files)?;
            print(output, &results, || {
                results
                    .iter()
                    .map(|r| {
                        let note = r.note.as_ref().map(|n| format!(": {n}")).unwrap_or_default();
                        format!("workload/{} {} (revision {}){note}\n", r.name, r.action, r.revision)
                    })
                    .collect()
            })
        }
        Command::Delete { resource: Resource::Workloads, name } => {
            client().delete_workload(&name)?;
            crate::outln!("workload/{name} deleted");
            Ok(())
        }
        Command::Delete { resource: Resource::Devices, name } => {
            client().delete_device(&name)?;
            crate::outln!("device/{name} deleted (its credentials stay: `baton device revoke {name}` keeps it out)");
            Ok(())
        }
        Command::Delete { resource: Resource::Events, .. } => {
            anyhow::bail!("events are not deleted: they are the fleet's history (the store keeps the newest)")
        }
        Command::Label { resource: Resource::Workloads | Resource::Events, .. } => {
            anyhow::bail!("not supported: labels are for devices")
        }
        Command::Describe { resource: Resource::Devices, id, output } => {
            let device = client().device(&id)?;
            print(output, &device, || output::device_description(&device, now_ms()))
        }
        Command::Label { resource: Resource::Devices, id, changes, output } => {
            let change = parse_label_changes(&changes)?;
            let device = client().relabel(&id, &change)?;
            print(output, &device, || format!("device/{} labeled: {}\n", device.id, output::labels(&device.labels)))
        }
        Command::Logs { workload, device, tail, follow } => {
            client().logs(&device, &workload, tail, follow, &mut std::io::stdout().lock())
        }
        Command::Exec { device, workload, interactive, tty, host, command } => {
            if interactive || tty || host {
                let req = crate::view::SessionRequest {
                    workload: workload.unwrap_or_default(),
                    host,
                    argv: command,
                    tty,
                    rows: 0,
                    cols: 0,
                    term: std::env::var("TERM").unwrap_or_default(),
                };
                return session::run(&client(), &device, req, interactive || tty);
            }
            let req = crate::view::ExecRequest { workload: workload.unwrap_or_default(), argv: command };
            let res = client().exec(&device, &req)?;
            crate::out!("{}", res.stdout);
            eprint!("{}", res.stderr);
            if res.exit_code != 0 {
                std::process::exit(res.exit_code.clamp(1, 255));
            }
            Ok(())
        }
        Command::PortForward { device, target, address } => {
            let (workload, (local, remote)) = args::forward_target(&target)?;
            session::forward(&client(), &device, workload, std::net::SocketAddr::new(address, local), remote)
        }
        Command::Cp { device, host, src, dst } => session::copy(&client(), &device, host, &src, &dst),
        Command::Restart { workload, device } => {
            client().restart(&device, &workload)?;
            crate::outln!("workload/{workload} on {device} restarting");
            Ok(())
        }
        Command::Secret(cmd) => secret(&client(), cmd),
        Command::Token(TokenCmd::Create { ttl, uses, labels }) => {
            let mut map = std::collections::BTreeMap::new();
            for pair in &labels {
                let (k, v) = pair.split_once('=').ok_or_else(|| anyhow::anyhow!("{pair:?} is not key=value"))?;
                map.insert(k.to_string(), v.to_string());
            }
            let req = crate::view::TokenRequest { ttl_s: parse_duration(&ttl)?, uses, labels: map };
            let t = client().create_token(&req)?;
            crate::outln!("{}", t.token);
            Ok(())
        }
        Command::Apitoken(ApiTokenCmd::Create { role, name }) => {
            let created = client().create_api_token(role, &name)?;
            crate::outln!("{}", created.token);
            Ok(())
        }
        Command::Webhook(WebhookCmd::Create { url, events }) => {
            let w = client().create_webhook(&url, events)?;
            crate::outln!("webhook/{} created; its signing secret (shown once): {}", w.webhook.id, w.secret);
            Ok(())
        }
        Command::Webhook(WebhookCmd::List { output }) => {
            let list = client().webhooks()?;
            print(output, &list, || output::webhooks_table(&list))
        }
        Command::Webhook(WebhookCmd::Delete { id }) => {
            client().delete_webhook(&id)?;
            crate::outln!("webhook/{id} deleted");
            Ok(())
        }
        Command::Apitoken(ApiTokenCmd::List { output }) => {
            let list = client().api_tokens()?;
            print(output, &list, || {
                let rows: Vec<Vec<String>> = list
                    .iter()
                    .map(|t| {
                        let tenant = t.tenant.clone().unwrap_or_else(|| "(fleet-wide)".into());
                        vec![t.id.clone(), t.role.to_string(), tenant, t.name.clone()]
                    })
                    .collect();
                output::table(&["ID", "ROLE", "TENANT", "NAME"], &rows)
            })
        }
        Command::Apitoken(ApiTokenCmd::Revoke { id }) => {
            client().delete_api_token(&id)?;
            crate::outln!("apitoken/{id} revoked");
            Ok(())
        }
        Command::Token(TokenCmd::List { output }) => {
            let list = client().tokens()?;
            print(output, &list, || output::tokens_table(&list, now_ms()))
        }
        Command::Token(TokenCmd::Delete { id }) => {
            client().delete_token(&id)?;
            crate::outln!("token/{id} deleted");
            Ok(())
        }
        Command::Device(DeviceCmd::Credentials { id }) => {
            let c = client().issue_credentials(&id)?;
            crate::outln!("{}", c.password);
            Ok(())
        }
        Command::Device(DeviceCmd::Revoke { id }) => {
            client().revoke_device(&id)?;
            crate::outln!("device/{id} revoked");
            Ok(())
        }
        Command::Device(DeviceCmd::Assign { id, to }) => {
            let d = client().assign_device(&id, &to)?;
            crate::outln!("device/{} now in tenant {}", d.id, d.tenant);
            Ok(())
        }
        Command::Trust => {
            let t = client().trust()?;
            crate::outln!("{}", t.signing_key);
            Ok(())
        }
        Command::Restore { backup, data_dir } => {
            let dir = data_dir.unwrap_or_else(|| default_data_dir().join("controller"));
            let _lock = crate::datadir::DataDirLock::take(&dir)?;
            let db = dir.join("baton.db");
            crate::store::Store::restore(&backup, &db)
                .with_context(|| format!("cannot restore {} into {}", backup.display(), db.display()))?;
            crate::outln!(
                "restored {} into {}; start the controller: devices that ran newer documents are given the restored ones",
                backup.display(),
                db.display()
            );
            Ok(())
        }
        Command::Backup { output } => {
            let bytes = client().backup()?;
            // As private as the store it copies (owner only), written whole or not at all.
            crate::keys::write_private(&output, &bytes)
                .with_context(|| format!("cannot write {}", output.display()))?;
            crate::outln!(
                "store backed up to {} ({}); keep the controller's signing.key and secrets.key with it \
                 (they are not in the store, and never change)",
                output.display(),
                output::bytes(bytes.len() as u64)
            );
            Ok(())
        }
        Command::Completion { shell } => {
            clap_complete::generate(shell, &mut Cli::command(), "baton", &mut std::io::stdout());
            Ok(())
        }
    }
}

fn secret(client: &Client, cmd: SecretCmd) -> anyhow::Result<()> {
    match cmd {
        SecretCmd::Create { name, from_file, from_literal } => {
            let value = match (from_file, from_literal) {
                (_, Some(v)) => v.into_bytes(),
                (Some(p), None) if p.as_os_str() == "-" => {
                    let mut v = Vec::new();
                    std::io::Read::read_to_end(&mut std::io::stdin(), &mut v)?;
                    v
                }
                (Some(p), None) => std::fs::read(&p).with_context(|| format!("cannot read {}", p.display()))?,
                (None, None) => anyhow::bail!("give --from-file FILE or --from-literal VALUE"),
            };
            let s = client.put_secret(&name, &value)?;
            let users =
                if s.used_by.is_empty() { String::new() } else { format!("; rolling out {}", s.used_by.join(", ")) };
            crate::outln!("secret/{} version {}{users}", s.name, s.version);
            Ok(())
        }
        SecretCmd::List { output } => {
            let list = client.secrets()?;
            print(output, &list, || output::secrets_table(&list, now_ms()))
        }
        SecretCmd::Delete { name } => {
            client.delete_secret(&name)?;
            crate::outln!("secret/{name} deleted");
            Ok(())
        }
    }
}

fn rollout(client: &Client, cmd: RolloutCmd) -> anyhow::Result<()> {
    use crate::view::RolloutAction;
    let (name, action) = match cmd {
        RolloutCmd::Status { workload, watch, output } => {
            // A workload's first revision goes to its devices without a
            // rollout: `--watch` follows that deployment instead of failing.
            if watch {
                let w = client.workload(&workload)?;
                if w.rollout.is_none() {
                    return output::watch_first_revision(w, || client.workload(&workload));
                }
            }
            let r = client.rollout(&workload)?;
            if !watch {
                return print(output, &r, || output::rollout_status(&r));
            }
            return output::watch_rollout(r, || client.rollout(&workload));
        }
        RolloutCmd::Pause { workload } => (workload, RolloutAction::Pause),
        RolloutCmd::Resume { workload } => (workload, RolloutAction::Resume),
        RolloutCmd::Abort { workload } => (workload, RolloutAction::Abort),
        RolloutCmd::Undo { workload } => (workload, RolloutAction::Undo),
    };
    let r = client.rollout_action(&name, action)?;
    crate::out!("{}", output::rollout_status(&r));
    Ok(())
}

fn agent(client: &Client, cmd: AgentCmd) -> anyhow::Result<()> {
    use crate::view::RolloutAction;
    let action = match cmd {
        AgentCmd::Publish { files, version } => {
            for path in files {
                let data = std::fs::read(&path).with_context(|| format!("cannot read {}", path.display()))?;
                let r = client
                    .publish_release(&data, version.as_deref())
                    .with_context(|| format!("cannot publish {}", path.display()))?;
                let hex = baton_protocol::crypto::hex(&r.digest);
                crate::outln!(
                    "agent {} for {} published from {} ({} bytes, sha256:{hex})",
                    r.version,
                    r.arch,
                    path.display(),
                    r.size
                );
            }
            return Ok(());
        }
        AgentCmd::Unpublish { version, arch } => {
            let n = client.unpublish_release(&version, arch.as_deref())?;
            crate::outln!("agent {version}: {n} build(s) unpublished");
            return Ok(());
        }
        AgentCmd::Releases { output } => {
            let list = client.releases()?;
            return print(output, &list, || output::releases_table(&list, now_ms()));
        }
        AgentCmd::Upgrade { version, selector, waves, min_ready, max_failures, deadline } => {
            let mut picked = std::collections::BTreeMap::new();
            for kv in &selector {
                let (k, v) =
                    kv.split_once('=').ok_or_else(|| anyhow::anyhow!("--selector {kv:?}: expected key=value"))?;
                if let Some(first) = picked.insert(k.to_string(), v.to_string()) {
                    anyhow::bail!(
                        "--selector names {k} twice ({k}={first}, {k}={v}): a device matches when it has every label given, so one value per key"
                    );
                }
            }
            let selector = picked;
            let req = crate::view::AgentUpgradeRequest {
                version,
                selector,
                waves,
                min_ready_s: min_ready,
                max_failure_pct: max_failures,
                deadline_s: deadline,
            };
            let r = client.agent_upgrade(&req)?;
            crate::out!("{}", output::agent_rollout_status(&r));
            return Ok(());
        }
        AgentCmd::Rollout(AgentRolloutCmd::Status { watch, output }) => {
            let r = client.agent_rollout()?;
            if !watch {
                return print(output, &r, || output::agent_rollout_status(&r));
            }
            return output::watch_rollout(r, || client.agent_rollout());
        }
        AgentCmd::Rollout(AgentRolloutCmd::Pause) => RolloutAction::Pause,
        AgentCmd::Rollout(AgentRolloutCmd::Resume) => RolloutAction::Resume,
        AgentCmd::Rollout(AgentRolloutCmd::Abort) => RolloutAction::Abort,
        AgentCmd::Rollout(AgentRolloutCmd::Undo) => RolloutAction::Undo,
    };
    let r = client.agent_rollout_action(action)?;
    crate::out!("{}", output::agent_rollout_status(&r));
    Ok(())
}

fn print<T: serde::Serialize>(format: Format, value: &T, table: impl FnOnce() -> String) -> anyhow::Result<()> {
    let text = output::structured(format, value)?.unwrap_or_else(table);
    crate::out!("{text}");
    Ok(())
}

/// Reads manifest files; a directory contributes its *.yaml and *.yml files, sorted.
fn read_manifests(paths: &[PathBuf]) -> anyhow::Result<Vec<crate::view::ManifestFile>> {
    let mut files = Vec::new();
    for path in paths {
        // `-f -`: the manifest on stdin (env files relative to the working directory).
        if path.as_os_str() == "-" {
            let mut text = String::new();
            std::io::Read::read_to_string(&mut std::io::stdin(), &mut text).context("cannot read stdin")?;
            files.push(where_compose_runs("(stdin)", text, std::path::Path::new(""))?);
            continue;
        }
        let mut batch: Vec<PathBuf> = if path.is_dir() {
            std::fs::read_dir(path)
                .with_context(|| format!("cannot read directory {}", path.display()))?
                .flatten()
                .map(|e| e.path())
                .filter(|p| p.extension().is_some_and(|e| e == "yaml" || e == "yml"))
                .collect()
        } else {
            vec![path.clone()]
        };
        batch.sort();
        for p in batch {
            let text = std::fs::read_to_string(&p).with_context(|| format!("cannot read {}", p.display()))?;
            let dir = p.parent().unwrap_or(std::path::Path::new(""));
            files.push(where_compose_runs(&p.display().to_string(), text, dir)?);
        }
    }
    anyhow::ensure!(!files.is_empty(), "no manifest files found in {paths:?}");
    Ok(files)
}

/// What Compose does where it runs, done by the CLI for a Compose file
/// found in `dir`: its env files inlined, and a warning for each variable
/// source a Compose user expects read and Baton does not read.
fn where_compose_runs(
    name: &str,
    mut text: String,
    dir: &std::path::Path,
) -> anyhow::Result<crate::view::ManifestFile> {
    let read = |f: &str| std::fs::read_to_string(dir.join(f)).map_err(|e| e.to_string());
    if let Some(inlined) =
        crate::workload::compose::inline_env_files(&text, read).map_err(|e| anyhow::anyhow!("{name}: {e}"))?
    {
        text = inlined;
    }
    let dot_env = dir.join(".env").exists();
    for warning in crate::workload::compose::unread_variables(&text, dot_env, |v| std::env::var_os(v).is_some()) {
        eprintln!("baton: warning: {name}: {warning}");
    }
    Ok(crate::view::ManifestFile { name: name.into(), text })
}

/// `key=value` sets, `key-` removes; anything else is an error naming the argument.
pub fn parse_label_changes(args: &[String]) -> anyhow::Result<LabelChange> {
    let mut change = LabelChange::default();
    for arg in args {
        if let Some((k, v)) = arg.split_once('=') {
            baton_protocol::validate_label(k, v)?;
            change.set.insert(k.to_string(), v.to_string());
        } else if let Some(k) = arg.strip_suffix('-') {
            baton_protocol::validate_label(k, "")?;
            change.remove.push(k.to_string());
        } else {
            anyhow::bail!("{arg:?}: expected key=value to set a label or key- to remove one");
        }
    }
    Ok(change)
}

/// Two async workers; controller operations go to the blocking pool, where
/// they serialise on the controller's locks anyway: a few threads suffice,
/// and each one more costs memory (a stack, and a malloc arena).
pub fn runtime() -> std::io::Result<tokio::runtime::Runtime> {
    tokio::runtime::Builder::new_multi_thread().worker_threads(2).max_blocking_threads(4).enable_all().build()
}

pub async fn shutdown_signal() {
    use tokio::signal::unix::{signal, SignalKind};
    let (Ok(mut term), Ok(mut int)) = (signal(SignalKind::terminate()), signal(SignalKind::interrupt())) else {
        return std::future::pending().await;
    };
    tokio::select! {
        _ = term.recv() => {}
        _ = int.recv() => {}
    }
}

pub fn init_logging(json: bool) {
    let filter = tracing_subscriber::EnvFilter::try_from_env("BATON_LOG").unwrap_or_else(|_| "info".into());
    let ansi = std::io::IsTerminal::is_terminal(&std::io::stderr());
    let builder = tracing_subscriber::fmt().with_env_filter(filter).with_writer(std::io::stderr).with_ansi(ansi);
    if json {
        builder.json().init();
    } else {
        builder.init();
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use clap::Parser;

    #[test]
    fn the_command_line_is_well_formed_and_port_forward_targets_parse() {
        // clap checks its definitions only when a verb is used: check them all.
        Cli::command().debug_assert();
        let t = |v: &[&str]| args::forward_target(&v.iter().map(|s| s.to_string()).collect::<Vec<_>>());
        assert_eq!(t(&["web", "0:80"]).unwrap(), ("web".to_string(), (0, 80)));
        assert_eq!(t(&["8080"]).unwrap(), (String::new(), (8080, 8080)));
        assert!(t(&["web", "80:0"]).unwrap_err().to_string().contains("cannot be 0"));
        assert!(t(&["web", "x:80"]).unwrap_err().to_string().contains("not a port"));
    }

    #[test]
    fn server_broker_nodes_are_read_with_their_tls() {
        let server = |broker: &str| {
            let Command::Server(a) = Cli::try_parse_from(["baton", "server", "--broker", broker]).unwrap().command
            else {
                panic!("not the server verb")
            };
            a.to_config()
        };
        let cfg = server("mqtt://b1:1883,mqtt://b2:1883").unwrap();
        assert!(matches!(&cfg.broker, crate::server::BrokerMode::External(n) if n.all().len() == 2));
        assert_eq!(cfg.broker_url().host, "b1");
        let cfg = server("mqtt://b1,mqtts://b2").unwrap();
        let crate::server::BrokerMode::External(nodes) = &cfg.broker else { panic!("external") };
        assert_eq!(nodes.all().iter().map(|n| (n.port, n.tls)).collect::<Vec<_>>(), [(1883, false), (8883, true)]);
        let e = format!("{:#}", server("mqtt://b1,,mqtt://b2").unwrap_err());
        assert!(e.contains("--broker") && e.contains("an empty entry"), "{e}");
    }

    #[test]
    fn advertise_takes_an_address_others_reach() {
        let advertise = |a: &str| {
            let Command::Server(args) = Cli::try_parse_from(["baton", "server", "--advertise", a]).unwrap().command
            else {
                panic!("not the server verb")
            };
            args.to_config().map(|c| c.advertise).map_err(|e| e.to_string())
        };
        assert_eq!(advertise("c1.lan:8443").unwrap().as_deref(), Some("c1.lan:8443"));
        assert_eq!(advertise("[fd00::1]:8080").unwrap().as_deref(), Some("[fd00::1]:8080"));
        for bad in ["http://c1:8080", "0.0.0.0:8080", "[::]:8080", "c1", ":8080", "c1:0"] {
            let e = advertise(bad).unwrap_err();
            assert!(e.contains("expected HOST:PORT"), "{bad}: {e}");
        }
    }

    #[test]
    fn label_arguments() {
        let c = parse_label_changes(&["site=lyon".into(), "role-".into()]).unwrap();
        assert_eq!(c.set["site"], "lyon");
        assert_eq!(c.remove, vec!["role".to_string()]);
        assert!(parse_label_changes(&["site".into()]).unwrap_err().to_string().contains("key=value"));
        assert!(parse_label_changes(&["bad key=x".into()]).is_err());
    }
}
