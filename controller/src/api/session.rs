//! Interactive sessions over HTTP: `POST …/sessions` opens one and streams
//! its output as `sessions::Frame`s for as long as it lasts; the opener's
//! input and window sizes come as separate requests naming the session.
//! Every session is an audit trail: `session.opened` (or `session.refused`)
//! and `session.closed` events say who, where, what, how long and how much.

use std::sync::Arc;
use std::time::{Duration, Instant};

use axum::extract::{Extension, Path, Query, State};
use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use axum::Json;
use baton_protocol::{CommandAction, CommandOutput, DeviceId};

use super::{answer, op, Caller, Failure, FIRST_ANSWER};
use crate::controller::{now_ms, Controller};
use crate::fleet::Status;
use crate::sessions::{Frame, Order, OutputOrder, Session, ACK_EVERY, INPUT_CHUNK, INPUT_IN_FLIGHT};
use crate::tenant::Scope;
use crate::view::{ConnectRequest, FileRequest, ResizeRequest, SessionRequest};

/// How often an open session checks that its device is still online.
const CHECK_EVERY: Duration = Duration::from_secs(5);
/// How long a piece of input may wait to be written (the device's own idle
/// timeout ends a session that stops reading long before).
const INPUT_WAIT: Duration = Duration::from_secs(3600);

pub(super) async fn open(
    State(c): State<Arc<Controller>>,
    Extension(scope): Extension<Scope>,
    Extension(Caller(caller)): Extension<Caller>,
    Path(id): Path<String>,
    body: Result<Json<SessionRequest>, axum::extract::rejection::JsonRejection>,
) -> Result<Response, Failure> {
    let Json(req) = body.map_err(|e| Failure(StatusCode::BAD_REQUEST, e.body_text()))?;
    let bad = |why: &str| Err(Failure(StatusCode::BAD_REQUEST, why.into()));
    if req.argv.is_empty() || req.argv[0].is_empty() {
        return bad("argv: nothing to run");
    }
    if req.host {
        if !req.workload.is_empty() {
            return bad("a session runs on the device's host or in a workload, not both");
        }
        if scope != Scope::All {
            return Err(Failure(
                StatusCode::FORBIDDEN,
                "only an admin of the whole fleet may open a session on a device's host".into(),
            ));
        }
    } else if req.workload.is_empty() {
        return bad("workload: which workload's container to run in (or host, for the device itself)");
    }
    let what = if req.host { "the host".to_string() } else { format!("workload {}", req.workload) };
    let shown = format!("{what}: {}{}", req.argv.join(" "), if req.tty { " (terminal)" } else { "" });
    let action = CommandAction::Session {
        workload: req.workload,
        host: req.host,
        argv: req.argv,
        tty: req.tty,
        rows: req.rows,
        cols: req.cols,
        term: req.term,
    };
    begin(c, scope, &id, action, shown, caller).await
}

/// `baton port-forward`: one TCP connection from the device to a port of a
/// workload's container (or of the device itself: fleet-wide admins only),
/// carried as a session.
pub(super) async fn connect(
    State(c): State<Arc<Controller>>,
    Extension(scope): Extension<Scope>,
    Extension(Caller(caller)): Extension<Caller>,
    Path(id): Path<String>,
    body: Result<Json<ConnectRequest>, axum::extract::rejection::JsonRejection>,
) -> Result<Response, Failure> {
    let Json(req) = body.map_err(|e| Failure(StatusCode::BAD_REQUEST, e.body_text()))?;
    if req.port == 0 {
        return Err(Failure(StatusCode::BAD_REQUEST, "port: which port to connect to".into()));
    }
    if req.workload.is_empty() && scope != Scope::All {
        return Err(Failure(
            StatusCode::FORBIDDEN,
            "only an admin of the whole fleet may forward to a port of a device's host".into(),
        ));
    }
    let shown = if req.workload.is_empty() {
        format!("port-forward to the host's port {}", req.port)
    } else {
        format!("port-forward to workload {} port {}", req.workload, req.port)
    };
    let req_workload = req.workload.clone();
    let action = CommandAction::Connect { workload: req.workload, port: req.port };
    if req.check {
        // `baton port-forward` asks before it listens: refusals come at once,
        // a workload the controller does not know included.
        if !req_workload.is_empty() {
            let (name, scope) = (req_workload.clone(), scope.clone());
            op(&c, move |c| c.workload(&name, now_ms(), &scope).map(drop)).await??;
        }
        prepare(&c, &scope, &id, &action).await?;
        return Ok(Json(serde_json::json!({ "device": id, "port": req.port })).into_response());
    }
    begin(c, scope, &id, action, shown, caller).await
}

/// `baton cp` from the device: a file's bytes from an offset, then its digest.
pub(super) async fn read_file(
    State(c): State<Arc<Controller>>,
    Extension(scope): Extension<Scope>,
    Extension(Caller(caller)): Extension<Caller>,
    Path(id): Path<String>,
    body: Result<Json<FileRequest>, axum::extract::rejection::JsonRejection>,
) -> Result<Response, Failure> {
    let Json(req) = body.map_err(|e| Failure(StatusCode::BAD_REQUEST, e.body_text()))?;
    let shown = file_target(&req, &scope)?;
    let action = CommandAction::ReadFile { workload: req.workload, host: req.host, path: req.path, offset: req.offset };
    begin(c, scope, &id, action, format!("copy from {shown}"), caller).await
}

/// `baton cp` to the device: the session's input becomes the file.
pub(super) async fn write_file(
    State(c): State<Arc<Controller>>,
    Extension(scope): Extension<Scope>,
    Extension(Caller(caller)): Extension<Caller>,
    Path(id): Path<String>,
    body: Result<Json<FileRequest>, axum::extract::rejection::JsonRejection>,
) -> Result<Response, Failure> {
    let Json(req) = body.map_err(|e| Failure(StatusCode::BAD_REQUEST, e.body_text()))?;
    let shown = file_target(&req, &scope)?;
    // (64 hex digits, as a key is written.)
    let sha256 = baton_protocol::crypto::parse_key(&req.sha256)
        .map_err(|_| Failure(StatusCode::BAD_REQUEST, "sha256: the file's SHA-256 in hex (64 digits)".into()))?
        .to_vec();
    // No mode given (an API caller): rw-r--r--, not 000.
    let mode = if req.mode == 0 { 0o644 } else { req.mode };
    let action = CommandAction::WriteFile { workload: req.workload, host: req.host, path: req.path, mode, sha256 };
    begin(c, scope, &id, action, format!("copy to {shown}"), caller).await
}

/// Where a copy goes or comes from, checked: a path, and the host for fleet-wide admins only.
fn file_target(req: &FileRequest, scope: &Scope) -> Result<String, Failure> {
    if !req.path.starts_with('/') {
        return Err(Failure(StatusCode::BAD_REQUEST, format!("path {:?}: an absolute path", req.path)));
    }
    if req.host {
        if !req.workload.is_empty() {
            return Err(Failure(
                StatusCode::BAD_REQUEST,
                "a copy is on the device's host or in a workload, not both".into(),
            ));
        }
        if *scope != Scope::All {
            return Err(Failure(
                StatusCode::FORBIDDEN,
                "only an admin of the whole fleet may copy files on a device's host".into(),
            ));
        }
        return Ok(format!("the host's {}", req.path));
    }
    if req.workload.is_empty() {
        return Err(Failure(
            StatusCode::BAD_REQUEST,
            "workload: whose container (or host, for the device itself)".into(),
        ));
    }
    Ok(format!("workload {}'s {}", req.workload, req.path))
}

/// Sends the opening command from a relay task and answers with the
/// session's stream once the device said it opened (or the error).
async fn begin(
    c: Arc<Controller>,
    scope: Scope,
    id: &str,
    action: CommandAction,
    shown: String,
    caller: String,
) -> Result<Response, Failure> {
    let (device, tenant) = prepare(&c, &scope, id, &action).await?;
    let (tx, rx) = tokio::sync::mpsc::channel::<Result<Vec<u8>, std::io::Error>>(8);
    let (first_tx, first_rx) = tokio::sync::oneshot::channel::<Result<(), Failure>>();
    tokio::spawn(relay(c, scope, device, tenant, action, shown, caller, tx, first_tx));
    match first_rx.await {
        Ok(Ok(())) => {}
        Ok(Err(f)) => return Err(f),
        Err(_) => return Err(Failure(StatusCode::INTERNAL_SERVER_ERROR, "session relay failed".into())),
    }
    let stream = futures_util::stream::unfold(rx, |mut rx| async move { rx.recv().await.map(|item| (item, rx)) });
    Ok(([("content-type", "application/vnd.baton.session")], axum::body::Body::from_stream(stream)).into_response())
}

/// What every session checks before the device is asked: the workload is
/// the caller's, the device is theirs and online. Its id and tenant.
async fn prepare(
    c: &Arc<Controller>,
    scope: &Scope,
    id: &str,
    action: &CommandAction,
) -> Result<(DeviceId, String), Failure> {
    let workload = match action {
        CommandAction::Session { workload, .. }
        | CommandAction::Connect { workload, .. }
        | CommandAction::ReadFile { workload, .. }
        | CommandAction::WriteFile { workload, .. } => workload.clone(),
        _ => String::new(),
    };
    if !workload.is_empty() {
        super::visible_workload(c, &workload, scope).await?;
    }
    super::online_device_of(c, id, scope).await
}

/// Owns the session's request: opens it, passes its output on (and the
/// acknowledgements that keep the device sending), and ends it when the
/// process ends, the operator goes away or the device goes offline.
#[allow(clippy::too_many_arguments)]
async fn relay(
    c: Arc<Controller>,
    scope: Scope,
    device: DeviceId,
    tenant: String,
    action: CommandAction,
    shown: String,
    caller: String,
    tx: tokio::sync::mpsc::Sender<Result<Vec<u8>, std::io::Error>>,
    first_tx: tokio::sync::oneshot::Sender<Result<(), Failure>>,
) {
    let mut pending = c.commands.send(device.clone(), action, now_ms() + 30_000);
    let sid = pending.id;
    // The device answers at once: opened (or output already), or why not.
    let first = match answer(&mut pending.answers, device.as_str(), FIRST_ANSWER).await {
        Ok(first) => first,
        Err(Failure(status, why)) => {
            let (status, why) = match status {
                StatusCode::GATEWAY_TIMEOUT => {
                    (status, format!("{why} (sessions need an agent of protocol 1.9 or later)"))
                }
                // The device said no (its settings, its limits): not a gateway's failure.
                StatusCode::BAD_GATEWAY => (StatusCode::CONFLICT, why),
                _ => (status, why),
            };
            let message = format!("{caller} could not open a session on {device} ({shown}): {why}");
            let audit = c.clone();
            let subject = device.to_string();
            let tenant = tenant.clone();
            let _ = op(&c, move |_| audit.audit(&tenant, "session.refused", &subject, message)).await;
            let _ = first_tx.send(Err(Failure(status, why)));
            return;
        }
    };
    let session = c.sessions.insert(
        sid,
        Session {
            device: device.clone(),
            caller: caller.clone(),
            input: tokio::sync::Mutex::new(0),
            resize_seq: Default::default(),
            bytes_out: Default::default(),
            bytes_in: Default::default(),
        },
    );
    {
        let (audit, subject, tenant) = (c.clone(), device.to_string(), tenant.clone());
        let message = format!("{caller} opened session {sid} on {device}, {shown}");
        let _ = op(&c, move |_| audit.audit(&tenant, "session.opened", &subject, message)).await;
    }
    let _ = first_tx.send(Ok(()));
    let opened = Instant::now();
    let mut next = Some(first);
    let (mut passed, mut acked) = (0u64, 0u64);
    let mut order = OutputOrder::default();
    let mut check = tokio::time::interval(CHECK_EVERY);
    check.tick().await;
    let end = 'relay: {
        if tx.send(Ok(Frame::Opened(sid).encode())).await.is_err() {
            break 'relay "the operator went away".to_string();
        }
        loop {
            let answer = match next.take() {
                Some(a) => a,
                None => tokio::select! {
                    a = pending.answers.recv() => match a {
                        Some(a) => a,
                        None => break 'relay "the controller forgot the session".to_string(),
                    },
                    () = tx.closed() => break 'relay "the operator went away".to_string(),
                    _ = check.tick() => {
                        let (name, scope) = (device.to_string(), scope.clone());
                        let gone = op(&c, move |c| c.device(&name, now_ms(), &scope))
                            .await
                            .map_or(true, |v| v.map_or(true, |v| v.status == Status::Offline));
                        if gone {
                            let why = format!("device {device} went offline");
                            let _ = tx.send(Ok(Frame::Error(why.clone()).encode())).await;
                            break 'relay why;
                        }
                        continue;
                    }
                },
            };
            if matches!(answer.body, CommandOutput::Stdout(_) | CommandOutput::Stderr(_)) {
                match order.check(answer.seq) {
                    Order::Next => {}
                    Order::Again => continue,
                    Order::Gap { expected, got } => {
                        let why = format!(
                            "output pieces {expected}..{got} from the device were lost on the way; the session was ended rather than go on with a hole"
                        );
                        let _ = tx.send(Ok(Frame::Error(why.clone()).encode())).await;
                        break 'relay why;
                    }
                }
            }
            let frame = match answer.body {
                CommandOutput::Stdout(b) => Frame::Stdout(b),
                CommandOutput::Stderr(b) => Frame::Stderr(b),
                CommandOutput::Exit(code) => {
                    let _ = tx.send(Ok(Frame::Exit(code).encode())).await;
                    break 'relay format!("exit code {code}");
                }
                CommandOutput::Error(why) => {
                    let _ = tx.send(Ok(Frame::Error(why.clone()).encode())).await;
                    break 'relay why;
                }
                CommandOutput::Text(text) => Frame::Text(text),
                CommandOutput::Done => continue,
            };
            let len = match &frame {
                Frame::Stdout(b) | Frame::Stderr(b) => b.len() as u64,
                _ => 0,
            };
            // Sent into a short queue the response drains: passing it on
            // waits for the operator, and so do the device's next bytes.
            if tx.send(Ok(frame.encode())).await.is_err() {
                break 'relay "the operator went away".to_string();
            }
            passed += len;
            session.bytes_out.fetch_add(len, std::sync::atomic::Ordering::Relaxed);
            if passed - acked >= ACK_EVERY {
                c.commands.notify(&device, CommandAction::Ack { session: sid, received: passed }, now_ms() + 60_000);
                acked = passed;
            }
        }
    };
    c.sessions.remove(sid);
    drop(pending); // a session still open on the device is cancelled
    let message = format!(
        "{caller}'s session {sid} on {device} ({shown}) closed after {} s: {end}; {} bytes in, {} bytes out",
        opened.elapsed().as_secs(),
        session.bytes_in.load(std::sync::atomic::Ordering::Relaxed),
        session.bytes_out.load(std::sync::atomic::Ordering::Relaxed),
    );
    let subject = device.to_string();
    let audit = c.clone();
    let _ = op(&c, move |_| audit.audit(&tenant, "session.closed", &subject, message)).await;
}

/// The session its opener names (nobody else may steer it).
fn owned(c: &Controller, sid: u64, caller: &str) -> Result<Arc<Session>, Failure> {
    let s =
        c.sessions.get(sid).ok_or_else(|| Failure(StatusCode::NOT_FOUND, format!("no session {sid} (it ended)")))?;
    if s.caller != caller {
        return Err(Failure(StatusCode::FORBIDDEN, format!("session {sid} was opened by another token")));
    }
    Ok(s)
}

#[derive(serde::Deserialize, schemars::JsonSchema)]
pub(super) struct InputQuery {
    #[serde(default)]
    eof: bool,
}

/// Bytes for the session's stdin (the body, raw); answered once the
/// device has written them. `?eof=true` closes stdin after them.
pub(super) async fn input(
    State(c): State<Arc<Controller>>,
    Extension(Caller(caller)): Extension<Caller>,
    Path(sid): Path<u64>,
    Query(q): Query<InputQuery>,
    body: axum::body::Bytes,
) -> Result<Json<serde_json::Value>, Failure> {
    let s = owned(&c, sid, &caller)?;
    let mut offset = s.input.lock().await;
    let mut pieces: Vec<&[u8]> = body.chunks(INPUT_CHUNK).collect();
    if pieces.is_empty() {
        pieces.push(&[]);
    }
    let last = pieces.len() - 1;
    // Up to the device's input queue in flight at once (they arrive in
    // order on one topic), then their answers in order.
    let numbered: Vec<(usize, &[u8])> = pieces.into_iter().enumerate().collect();
    for group in numbered.chunks(INPUT_IN_FLIGHT) {
        let mut sent = Vec::with_capacity(group.len());
        for (i, data) in group {
            let action = CommandAction::Input {
                session: sid,
                offset: *offset + sent.iter().map(|(_, n)| *n).sum::<u64>(),
                data: data.to_vec(),
                eof: q.eof && *i == last,
            };
            sent.push((c.commands.send(s.device.clone(), action, now_ms() + 30_000), data.len() as u64));
        }
        for (mut pending, n) in sent {
            // Answered once written: a process that reads its stdin slowly
            // holds this request, which is the sender's backpressure.
            if let Err(f) = super::answer(&mut pending.answers, s.device.as_str(), INPUT_WAIT).await {
                // A piece lost leaves the two sides' offsets apart for good:
                // the session ends, saying why, rather than losing input silently.
                c.commands.notify(&s.device, CommandAction::Cancel { id: sid }, 0);
                return Err(Failure(f.0, format!("{}; the session was ended (its input would have a gap)", f.1)));
            }
            *offset += n;
            s.bytes_in.fetch_add(n, std::sync::atomic::Ordering::Relaxed);
        }
    }
    Ok(Json(serde_json::json!({ "written": body.len() })))
}

pub(super) async fn resize(
    State(c): State<Arc<Controller>>,
    Extension(Caller(caller)): Extension<Caller>,
    Path(sid): Path<u64>,
    body: Result<Json<ResizeRequest>, axum::extract::rejection::JsonRejection>,
) -> Result<Json<serde_json::Value>, Failure> {
    let Json(size) = body.map_err(|e| Failure(StatusCode::BAD_REQUEST, e.body_text()))?;
    let s = owned(&c, sid, &caller)?;
    let seq = s.resize_seq.fetch_add(1, std::sync::atomic::Ordering::Relaxed) + 1;
    let action = CommandAction::Resize { session: sid, seq, rows: size.rows, cols: size.cols };
    c.commands.notify(&s.device, action, now_ms() + 60_000);
    Ok(Json(serde_json::json!({ "rows": size.rows, "cols": size.cols })))
}
