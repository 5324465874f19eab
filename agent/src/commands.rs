//! Operator commands that take time — logs (tail, follow), exec, restart —
//! each on its own task, answering on `cmd/res` with the request's id and
//! increasing `seq`, so the link's loop never waits for one.

use std::io::{Read, Seek, SeekFrom};
use std::path::{Path, PathBuf};
use std::sync::mpsc::Sender;
use std::sync::Arc;
use std::time::Duration;

use baton_protocol::{encode, Command, CommandAction, CommandOutput, CommandResult, Message, TopicKind};
use rumqttc::{AsyncClient, QoS};

use crate::engine::Input;
use crate::runtime::layout::files;
use crate::runtime::ContainerRuntime;

/// Output per message: well under the 64 KiB command-result limit.
const CHUNK: usize = 32 * 1024;
/// The most a tail request returns, whatever N says.
const MAX_TAIL_BYTES: u64 = 1 << 20;
const FOLLOW_POLL: Duration = Duration::from_millis(500);
const EXEC_TIMEOUT: Duration = Duration::from_secs(60);

/// What a command may use.
#[derive(Clone)]
pub struct Context {
    pub data_dir: PathBuf,
    pub runtime: Option<Arc<dyn ContainerRuntime + Send + Sync>>,
    pub engine: Option<Sender<Input>>,
}

struct Responder {
    client: AsyncClient,
    topic: String,
    id: u64,
    seq: u32,
}

impl Responder {
    /// False when the session is gone (the answer cannot be delivered).
    async fn send(&mut self, body: CommandOutput) -> bool {
        let msg = Message::CommandResult(CommandResult { id: self.id, seq: self.seq, body });
        self.seq += 1;
        let Ok(bytes) = encode(&msg) else { return false };
        self.client.publish(&self.topic, QoS::AtLeastOnce, false, bytes).await.is_ok()
    }

    async fn send_bytes(&mut self, data: &[u8], stderr: bool) -> bool {
        for chunk in data.chunks(CHUNK) {
            let body =
                if stderr { CommandOutput::Stderr(chunk.to_vec()) } else { CommandOutput::Stdout(chunk.to_vec()) };
            if !self.send(body).await {
                return false;
            }
        }
        true
    }
}

/// The newest container instance (`<name>-<n>`) of a workload on this device.
pub fn newest_container(data_dir: &Path, workload: &str) -> Option<PathBuf> {
    std::fs::read_dir(data_dir.join("containers"))
        .ok()?
        .flatten()
        .filter_map(|e| {
            let name = e.file_name().into_string().ok()?;
            let n: u32 = name.strip_prefix(workload)?.strip_prefix('-')?.parse().ok()?;
            Some((n, e.path()))
        })
        .max_by_key(|(n, _)| *n)
        .map(|(_, p)| p)
}

/// Why `workload`'s newest container `id` cannot be entered (exec,
/// sessions, copies): None when it runs. A crash-looping workload is said
/// to be one, not "container is not running" from deep in the runtime.
pub fn not_running(rt: &dyn crate::runtime::ContainerRuntime, id: &str, workload: &str) -> Option<String> {
    use crate::runtime::ContainerState;
    let why = match rt.state(id) {
        Ok(ContainerState::Running(_)) => return None,
        Ok(ContainerState::Exited(e)) if e.oom_killed => {
            "its container was killed for memory; it may be restarting".to_string()
        }
        Ok(ContainerState::Exited(e)) => match e.signal {
            Some(sig) => format!("its container was killed by signal {sig}; it may be restarting"),
            None => format!("its container exited with code {}; it may be restarting", e.code),
        },
        Ok(ContainerState::Created) => "its container is starting".into(),
        Ok(ContainerState::Lost) => "its container was lost (the device rebooted or its shim died)".into(),
        Ok(ContainerState::Missing) => "it has no container".into(),
        Err(e) => format!("its container's state cannot be read: {e}"),
    };
    Some(format!(
        "workload {workload} is not running on this device right now: {why} (see `baton describe workload {workload}`)"
    ))
}

/// The last `lines` lines of a container's log (its rotated file included),
/// at most `MAX_TAIL_BYTES`.
pub fn tail(container: &Path, lines: usize) -> std::io::Result<Vec<u8>> {
    let mut text = Vec::new();
    for name in [format!("{}.1", files::LOG), files::LOG.to_string()] {
        match std::fs::File::open(container.join(&name)) {
            Ok(mut f) => {
                let len = f.metadata()?.len();
                f.seek(SeekFrom::Start(len.saturating_sub(MAX_TAIL_BYTES)))?;
                f.read_to_end(&mut text)?;
            }
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
            Err(e) => return Err(e),
        }
    }
    let start = if lines == 0 {
        0
    } else {
        let mut seen = 0;
        let mut start = 0;
        for (i, b) in text.iter().enumerate().rev() {
            if *b == b'\n' && i + 1 < text.len() {
                seen += 1;
                if seen == lines {
                    start = i + 1;
                    break;
                }
            }
        }
        start
    };
    let from = start.max(text.len().saturating_sub(MAX_TAIL_BYTES as usize));
    Ok(text.split_off(from))
}

/// Runs one command to completion (or cancellation), answering as it goes.
pub async fn run(
    cmd: Command,
    ctx: Context,
    client: AsyncClient,
    device: baton_protocol::DeviceId,
    mut cancel: tokio::sync::watch::Receiver<bool>,
) {
    let mut out = Responder { client, topic: device.topic(TopicKind::CmdRes), id: cmd.id, seq: 0 };
    let end = match cmd.action {
        CommandAction::Logs { workload, tail: lines, follow } => {
            let Some(dir) = newest_container(&ctx.data_dir, &workload) else {
                let _ = out
                    .send(CommandOutput::Error(format!("workload {workload} has no containers on this device")))
                    .await;
                return;
            };
            let path = dir.join(files::LOG);
            let initial = tokio::task::spawn_blocking({
                let dir = dir.clone();
                move || tail(&dir, lines as usize)
            })
            .await;
            match initial {
                Ok(Ok(bytes)) => {
                    if !out.send_bytes(&bytes, false).await {
                        return;
                    }
                }
                Ok(Err(e)) => {
                    let _ = out.send(CommandOutput::Error(format!("cannot read the log: {e}"))).await;
                    return;
                }
                Err(_) => return,
            }
            if follow {
                let mut current = dir;
                let mut offset = std::fs::metadata(&path).map_or(0, |m| m.len());
                loop {
                    tokio::select! {
                        _ = cancel.changed() => break,
                        () = tokio::time::sleep(FOLLOW_POLL) => {}
                    }
                    if cmd.deadline_ms != 0 && crate::runtime::now_ms() > cmd.deadline_ms {
                        break;
                    }
                    // A restart starts a new instance: follow its log from the start.
                    if let Some(newest) = newest_container(&ctx.data_dir, &workload).filter(|n| *n != current) {
                        current = newest;
                        offset = 0;
                    }
                    let log = current.join(files::LOG);
                    let len = std::fs::metadata(&log).map_or(0, |m| m.len());
                    if len < offset {
                        offset = 0; // rotated
                    }
                    if len > offset {
                        let mut buf = Vec::new();
                        if let Ok(mut f) = std::fs::File::open(&log) {
                            let _ = f.seek(SeekFrom::Start(offset));
                            let _ = f.take(MAX_TAIL_BYTES).read_to_end(&mut buf);
                        }
                        offset += buf.len() as u64;
                        if !out.send_bytes(&buf, false).await {
                            return;
                        }
                    }
                }
            }
            CommandOutput::Done
        }
        CommandAction::Exec { workload, argv } => {
            let (Some(rt), Some(dir)) = (ctx.runtime.clone(), newest_container(&ctx.data_dir, &workload)) else {
                let _ =
                    out.send(CommandOutput::Error(format!("workload {workload} is not running on this device"))).await;
                return;
            };
            let id = dir.file_name().and_then(|n| n.to_str()).unwrap_or_default().to_string();
            if let Some(why) = not_running(rt.as_ref(), &id, &workload) {
                let _ = out.send(CommandOutput::Error(why)).await;
                return;
            }
            match tokio::task::spawn_blocking(move || rt.exec(&id, &argv, EXEC_TIMEOUT)).await {
                Ok(Ok(o)) => {
                    if !out.send_bytes(&o.stdout, false).await || !out.send_bytes(&o.stderr, true).await {
                        return;
                    }
                    CommandOutput::Exit(o.code)
                }
                Ok(Err(e)) => CommandOutput::Error(e.to_string()),
                Err(_) => CommandOutput::Error("exec task failed".into()),
            }
        }
        CommandAction::Restart { workload } => {
            let (done, restarted) = tokio::sync::oneshot::channel();
            match &ctx.engine {
                Some(engine) if engine.send(Input::Restart(workload.clone(), done)).is_ok() => match restarted.await {
                    Ok(true) => CommandOutput::Done,
                    Ok(false) => CommandOutput::Error(format!("workload {workload} is not running on this device")),
                    Err(_) => CommandOutput::Error("the agent is stopping".into()),
                },
                _ => CommandOutput::Error("this agent runs no workloads".into()),
            }
        }
        CommandAction::Diagnostics
        | CommandAction::Cancel { .. }
        | CommandAction::Session { .. }
        | CommandAction::Input { .. }
        | CommandAction::Resize { .. }
        | CommandAction::Ack { .. }
        | CommandAction::Connect { .. }
        | CommandAction::ReadFile { .. }
        | CommandAction::WriteFile { .. } => return,
    };
    let _ = out.send(end).await;
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn tail_takes_the_last_lines_across_rotation() {
        let dir = tempfile::tempdir().unwrap();
        std::fs::write(dir.path().join("container.log.1"), "a\nb\nc\n").unwrap();
        std::fs::write(dir.path().join("container.log"), "d\ne\n").unwrap();
        assert_eq!(tail(dir.path(), 3).unwrap(), b"c\nd\ne\n");
        assert_eq!(tail(dir.path(), 1).unwrap(), b"e\n");
        assert_eq!(tail(dir.path(), 0).unwrap(), b"a\nb\nc\nd\ne\n");
        assert_eq!(tail(dir.path(), 100).unwrap(), b"a\nb\nc\nd\ne\n");
        std::fs::create_dir(dir.path().join("web-2")).unwrap();
        std::fs::create_dir_all(dir.path().join("containers/web-2")).unwrap();
        std::fs::create_dir_all(dir.path().join("containers/web-10")).unwrap();
        std::fs::create_dir_all(dir.path().join("containers/webber-99")).unwrap();
        assert!(newest_container(dir.path(), "web").unwrap().ends_with("web-10"));
    }
}
