//! HTTP/JSON API (axum): translation only. Handlers parse the request, call a
//! `Controller` operation with plain values on the blocking pool (`op`), and
//! render its answer.

pub mod client;
pub mod dashboard;
pub mod openapi;
mod session;

use std::sync::Arc;
use std::time::Duration;

use axum::extract::{Extension, Path, Query, State};
use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use axum::routing::MethodRouter;
use axum::{Json, Router};

use baton_protocol::{CommandAction, CommandOutput, CommandResult, DeviceId};
use tokio::sync::mpsc::UnboundedReceiver;

use crate::controller::{now_ms, Controller, OpError};
use crate::fleet::Status;
use crate::tenant::Scope;
use crate::view::{ApiError, ApplyRequest, ExecRequest, ExecResponse, LabelChange, ScaleRequest};
use openapi::Doc;

/// One operation of the API: its route and its description, from one entry.
pub struct Operation {
    doc: Doc,
    route: MethodRouter<Arc<Controller>>,
}

/// `doc`, served by `handler` (with the method the description names).
fn serve<H, T>(doc: Doc, handler: H) -> Operation
where
    H: axum::handler::Handler<T, Arc<Controller>>,
    T: 'static,
{
    let filter = axum::routing::MethodFilter::try_from(doc.method.clone()).expect("a method axum routes");
    Operation { route: axum::routing::on(filter, handler), doc }
}

/// Every operation of the API, in the order the description lists them.
fn operations() -> Vec<Operation> {
    use crate::store::AgentRelease;
    use crate::view::*;
    use axum::http::Method;
    use openapi::{json, Body};
    const GET: Method = Method::GET;
    const POST: Method = Method::POST;
    const PUT: Method = Method::PUT;
    const PATCH: Method = Method::PATCH;
    const DELETE: Method = Method::DELETE;
    let at = openapi::Doc::at;
    let frames = Body::Raw(
        "application/octet-stream",
        "the session's frames (`baton_controller::sessions::Frame`), for its whole life",
    );
    let done = json::<serde_json::Value>;
    vec![
        serve(at(GET, "/healthz", "Liveness: the controller answers and whether its broker is connected").gives(json::<Health>()), health),
        serve(at(GET, "/metrics", "Prometheus metrics of the whole fleet (fleet-wide tokens)").gives(Body::Raw("text/plain", "Prometheus text format 0.0.4")), metrics),
        serve(at(GET, "/api/v1/openapi.json", "This description").gives(json::<serde_json::Value>()), openapi_json),
        serve(at(GET, "/api/v1/whoami", "The token's name, role and tenant").gives(json::<dashboard::WhoAmI>()), dashboard::whoami),
        serve(at(GET, "/api/v1/overview", "The fleet at a glance: status counts, counts by a label, agent versions, architectures, what needs attention").query::<dashboard::OverviewQuery>().gives(json::<crate::dashboard::Overview>()), dashboard::overview),
        serve(at(GET, "/api/v1/devices", "Devices, all or filtered, sorted and paged (`x-total-count`: how many passed the filter)").query::<crate::dashboard::DeviceQuery>().gives(json::<Vec<DeviceView>>()), list_devices),
        serve(at(GET, "/api/v1/devices/{id}", "One device").gives(json::<DeviceView>()), get_device),
        serve(at(GET, "/api/v1/devices/{id}/samples", "A device's last hour of heartbeats, a sample a minute").gives(json::<Vec<crate::dashboard::Sample>>()), dashboard::samples),
        serve(at(PATCH, "/api/v1/devices/{id}/labels", "Set and remove a device's operator labels").takes(json::<LabelChange>()).gives(json::<DeviceView>()), relabel),
        serve(at(PUT, "/api/v1/devices/{id}/tenant", "Move a device to another tenant (fleet-wide admins)").takes(json::<AssignRequest>()).gives(json::<DeviceView>()), assign_device),
        serve(at(POST, "/api/v1/devices/{id}/credentials", "Issue a device's MQTT password").gives(json::<CredentialsView>()), issue_credentials),
        serve(at(POST, "/api/v1/devices/{id}/revoke", "Revoke a device: its credentials, its connection").gives(done()), revoke_device),
        serve(at(DELETE, "/api/v1/devices/{id}", "Forget a device that is not connected: its record and document (credentials and events stay)").gives(done()), delete_device),
        serve(at(GET, "/api/v1/devices/{id}/logs/{workload}", "A workload's log on a device, streamed; `follow` keeps it open").query::<LogsQuery>().gives(Body::Raw("text/plain", "log lines as the device sends them")), logs),
        serve(at(POST, "/api/v1/devices/{id}/exec", "Run a command in a workload's container and wait for its end").takes(json::<ExecRequest>()).gives(json::<ExecResponse>()), exec),
        serve(at(POST, "/api/v1/devices/{id}/sessions", "Open an interactive session in a container or on the device").takes(json::<SessionRequest>()).gives(frames), session::open),
        serve(at(POST, "/api/v1/devices/{id}/connections", "One forwarded TCP connection to a container's or the device's port").takes(json::<ConnectRequest>()).gives(frames), session::connect),
        serve(at(POST, "/api/v1/devices/{id}/files/read", "Copy a file from a container or the device").takes(json::<FileRequest>()).gives(frames), session::read_file),
        serve(at(POST, "/api/v1/devices/{id}/files/write", "Copy a file to a container or the device").takes(json::<FileRequest>()).gives(frames), session::write_file),
        serve(at(POST, "/api/v1/sessions/{session}/input", "Bytes for a session's stdin, answered once written").query::<session::InputQuery>().takes(Body::Raw("application/octet-stream", "the bytes")).gives(done()), session::input),
        serve(at(POST, "/api/v1/sessions/{session}/resize", "A session's new window size").takes(json::<ResizeRequest>()).gives(done()), session::resize),
        serve(at(POST, "/api/v1/devices/{id}/workloads/{workload}/restart", "Restart a workload's container on a device").gives(done()), restart),
        serve(at(GET, "/api/v1/workloads", "Workloads").gives(json::<Vec<WorkloadView>>()), list_workloads),
        serve(at(POST, "/api/v1/workloads", "Apply manifests (or Compose files): all valid, or nothing stored").takes(json::<ApplyRequest>()).gives(json::<Vec<ApplyResult>>()), apply_workloads),
        serve(at(GET, "/api/v1/workloads/{name}", "One workload: revisions, placement, every device's state").gives(json::<WorkloadView>()), get_workload),
        serve(at(DELETE, "/api/v1/workloads/{name}", "Delete a workload").gives(done()), delete_workload),
        serve(at(POST, "/api/v1/workloads/{name}/scale", "Set a workload's replicas").takes(json::<ScaleRequest>()).gives(json::<WorkloadView>()), scale),
        serve(at(GET, "/api/v1/workloads/{name}/rollout", "A workload's last rollout").gives(json::<RolloutView>()), get_rollout),
        serve(at(GET, "/api/v1/workloads/{name}/rollout/watch", "A workload's rollout at every change (server-sent events `rollout`, `gone`)").gives(Body::Raw("text/event-stream", "`event: rollout` with a RolloutView (or null) at each change")), dashboard::rollout_watch),
        serve(at(POST, "/api/v1/workloads/{name}/rollout/{action}", "pause, resume, abort or undo a workload's rollout").gives(json::<RolloutView>()), rollout_action),
        serve(at(GET, "/api/v1/events", "Events, oldest first").query::<EventQuery>().gives(json::<Vec<Event>>()), events),
        serve(at(GET, "/api/v1/events/stream", "Events as they are recorded (server-sent events `event`, `lagged`)").query::<dashboard::StreamQuery>().gives(Body::Raw("text/event-stream", "`event: event` with an Event each")), dashboard::event_stream),
        serve(at(GET, "/api/v1/secrets", "Secrets (names and versions, never values)").gives(json::<Vec<SecretView>>()), list_secrets),
        serve(at(PUT, "/api/v1/secrets/{name}", "Set a secret; the body is its value").takes(Body::Raw("application/octet-stream", "the secret's value")).gives(json::<SecretView>()), put_secret),
        serve(at(DELETE, "/api/v1/secrets/{name}", "Delete a secret").gives(done()), delete_secret),
        serve(at(GET, "/api/v1/trust", "The key devices pin: desired documents and commands are signed with it").gives(json::<TrustView>()), trust),
        serve(at(GET, "/api/v1/tokens", "Join tokens").gives(json::<Vec<JoinTokenView>>()), list_tokens),
        serve(at(POST, "/api/v1/tokens", "Make a join token").takes(json::<TokenRequest>()).gives(json::<TokenView>()), create_token),
        serve(at(DELETE, "/api/v1/tokens/{id}", "Delete a join token").gives(done()), delete_token),
        serve(at(GET, "/api/v1/apitokens", "API tokens").gives(json::<Vec<ApiTokenView>>()), list_api_tokens),
        serve(at(POST, "/api/v1/apitokens", "Make an API token").takes(json::<ApiTokenRequest>()).gives(json::<ApiTokenCreated>()), create_api_token),
        serve(at(DELETE, "/api/v1/apitokens/{id}", "Revoke an API token").gives(done()), delete_api_token),
        serve(at(POST, "/api/v1/backup", "A consistent copy of the controller's store").gives(Body::Raw("application/vnd.sqlite3", "an SQLite database")), backup),
        serve(at(GET, "/api/v1/webhooks", "Webhooks, with delivery counts and the last error").gives(json::<Vec<WebhookView>>()), list_webhooks),
        serve(at(POST, "/api/v1/webhooks", "Make a webhook (its secret is shown once)").takes(json::<WebhookRequest>()).gives(json::<WebhookCreated>()), create_webhook),
        serve(at(DELETE, "/api/v1/webhooks/{id}", "Delete a webhook").gives(done()), delete_webhook),
        serve(at(GET, "/api/v1/agent/releases", "Published agent builds").gives(json::<Vec<AgentRelease>>()), list_releases),
        serve(at(POST, "/api/v1/agent/releases", "Publish an agent build; the body is the binary").query::<PublishQuery>().takes(Body::Raw("application/octet-stream", "the agent binary")).gives(json::<AgentRelease>()), publish_release)
            .limit(crate::controller::MAX_RELEASE_BYTES),
        serve(at(DELETE, "/api/v1/agent/releases/{version}", "Unpublish an agent version (or one architecture's build)").query::<ArchQuery>().gives(done()), unpublish_release),
        serve(at(POST, "/api/v1/agent/upgrade", "Upgrade the fleet's agents in waves").takes(json::<AgentUpgradeRequest>()).gives(json::<AgentRolloutView>()), agent_upgrade),
        serve(at(GET, "/api/v1/agent/rollout", "The fleet's agent upgrade").gives(json::<AgentRolloutView>()), agent_rollout),
        serve(at(POST, "/api/v1/agent/rollout/{action}", "pause, resume, abort or undo the agent upgrade").gives(json::<AgentRolloutView>()), agent_rollout_action),
    ]
}

impl Operation {
    /// A body limit of its own (agent builds are larger than any other body).
    fn limit(mut self, bytes: usize) -> Self {
        self.route = self.route.layer(axum::extract::DefaultBodyLimit::max(bytes));
        self
    }
}

/// What `GET /api/v1/openapi.json` describes: every operation the router serves.
pub fn operation_docs() -> Vec<Doc> {
    operations().into_iter().map(|o| o.doc).collect()
}

async fn openapi_json() -> Response {
    static SPEC: std::sync::OnceLock<String> = std::sync::OnceLock::new();
    let text = SPEC.get_or_init(|| openapi::describe(&operation_docs()).to_string());
    ([("content-type", "application/json")], text.as_str()).into_response()
}

pub fn router(controller: Arc<Controller>) -> Router {
    // Operations on one path share its route.
    let mut paths: std::collections::BTreeMap<&'static str, MethodRouter<Arc<Controller>>> = Default::default();
    for o in operations() {
        let route = match paths.remove(o.doc.path) {
            Some(r) => r.merge(o.route),
            None => o.route,
        };
        paths.insert(o.doc.path, route);
    }
    let api = paths.into_iter().fold(Router::new(), |r, (path, route)| r.route(path, route));
    api.fallback(|| async { error(StatusCode::NOT_FOUND, "no such API endpoint".into()) })
        .layer(axum::middleware::from_fn_with_state(controller.clone(), authenticate))
        .with_state(controller)
        // The dashboard's page and assets hold no data: no token for them.
        .merge(dashboard::assets())
}

/// Who sent the request (for audit events): `token NAME (ID)`.
#[derive(Clone)]
struct Caller(String);

/// Runs a `Controller` operation on the blocking pool. One rule for every
/// handler: operations take std mutexes, write SQLite and sign documents,
/// none of which may stall an async worker.
async fn op<T: Send + 'static>(
    c: &Arc<Controller>,
    f: impl FnOnce(&Controller) -> T + Send + 'static,
) -> Result<T, Failure> {
    let c = c.clone();
    tokio::task::spawn_blocking(move || f(&c))
        .await
        .map_err(|e| Failure(StatusCode::INTERNAL_SERVER_ERROR, format!("operation failed: {e}")))
}

fn error(status: StatusCode, error: String) -> Response {
    (status, Json(ApiError { error })).into_response()
}

impl IntoResponse for OpError {
    fn into_response(self) -> Response {
        Failure::from(self).into_response()
    }
}

/// A failed request: small to pass around, rendered as `{"error": …}`.
struct Failure(StatusCode, String);

impl IntoResponse for Failure {
    fn into_response(self) -> Response {
        error(self.0, self.1)
    }
}

impl From<OpError> for Failure {
    fn from(e: OpError) -> Self {
        let status = match &e {
            OpError::NotFound(_) => StatusCode::NOT_FOUND,
            OpError::Invalid(_) => StatusCode::BAD_REQUEST,
            OpError::Forbidden(_) => StatusCode::FORBIDDEN,
            OpError::Store(crate::store::StoreError::Full) => StatusCode::INSUFFICIENT_STORAGE,
            OpError::Store(crate::store::StoreError::Unavailable(_)) => StatusCode::SERVICE_UNAVAILABLE,
            OpError::Store(_) => StatusCode::INTERNAL_SERVER_ERROR,
        };
        Failure(status, e.to_string())
    }
}

async fn health(State(c): State<Arc<Controller>>) -> impl IntoResponse {
    Json(c.health())
}

async fn metrics(State(c): State<Arc<Controller>>) -> impl IntoResponse {
    let text = op(&c, |c| c.render_metrics(now_ms())).await?;
    Ok::<_, Failure>(([("content-type", "text/plain; version=0.0.4")], text))
}

/// Every device the scope sees, or the part a query asks for (filtered,
/// sorted, one page: `crate::dashboard::DeviceQuery`); `x-total-count` says
/// how many passed the filter.
async fn list_devices(
    State(c): State<Arc<Controller>>,
    Extension(scope): Extension<Scope>,
    query: Result<Query<crate::dashboard::DeviceQuery>, axum::extract::rejection::QueryRejection>,
) -> Result<Response, Failure> {
    let Query(query) = query.map_err(|e| Failure(StatusCode::BAD_REQUEST, e.body_text()))?;
    let filter = query.check().map_err(|e| Failure(StatusCode::BAD_REQUEST, e))?;
    let (total, page) = op(&c, move |c| c.devices_page(&filter, now_ms(), &scope)).await?;
    Ok(([("x-total-count", total.to_string())], Json(page)).into_response())
}

async fn get_device(
    State(c): State<Arc<Controller>>,
    Extension(scope): Extension<Scope>,
    Path(id): Path<String>,
) -> Result<impl IntoResponse, Failure> {
    Ok(Json(op(&c, move |c| c.device(&id, now_ms(), &scope)).await??))
}

async fn relabel(
    State(c): State<Arc<Controller>>,
    Extension(scope): Extension<Scope>,
    Path(id): Path<String>,
    body: Result<Json<LabelChange>, axum::extract::rejection::JsonRejection>,
) -> Result<impl IntoResponse, Response> {
    let Json(change) = body.map_err(|e| error(StatusCode::BAD_REQUEST, e.body_text()))?;
    let view = op(&c, move |c| c.relabel(&id, &change, now_ms(), &scope)).await.map_err(IntoResponse::into_response)?;
    view.map(Json).map_err(IntoResponse::into_response)
}

#[derive(serde::Deserialize, schemars::JsonSchema)]
struct AssignRequest {
    tenant: String,
}

async fn assign_device(
    State(c): State<Arc<Controller>>,
    Extension(scope): Extension<Scope>,
    Path(id): Path<String>,
    body: Result<Json<AssignRequest>, axum::extract::rejection::JsonRejection>,
) -> Result<impl IntoResponse, Failure> {
    let Json(req) = body.map_err(|e| Failure(StatusCode::BAD_REQUEST, e.body_text()))?;
    Ok(Json(op(&c, move |c| c.assign_device(&id, &req.tenant, now_ms(), &scope)).await??))
}

/// How long a device has to give its first answer.
const FIRST_ANSWER: Duration = Duration::from_secs(15);

/// The device must be known (to this tenant) and online before we ask it anything.
async fn online_device(c: &Arc<Controller>, id: &str, scope: &Scope) -> Result<DeviceId, Failure> {
    online_device_of(c, id, scope).await.map(|(device, _)| device)
}

/// As `online_device`, with the device's tenant.
async fn online_device_of(c: &Arc<Controller>, id: &str, scope: &Scope) -> Result<(DeviceId, String), Failure> {
    let (name, scope) = (id.to_string(), scope.clone());
    let device = op(c, move |c| c.device(&name, now_ms(), &scope)).await??;
    if device.status == Status::Offline {
        return Err(Failure(StatusCode::CONFLICT, format!("device {id} is offline")));
    }
    broker_up(c)?;
    let id = DeviceId::new(id).map_err(|e| Failure(StatusCode::BAD_REQUEST, e.to_string()))?;
    Ok((id, device.tenant))
}

/// Commands travel through the broker: without it they would wait out
/// their deadline and the operator would blame the device.
fn broker_up(c: &Controller) -> Result<(), Failure> {
    if c.broker_connected.load(std::sync::atomic::Ordering::Relaxed) {
        Ok(())
    } else {
        Err(Failure(
            StatusCode::SERVICE_UNAVAILABLE,
            "the controller has lost its MQTT broker: commands cannot reach devices until it is back (see /healthz and the controller's log)".into(),
        ))
    }
}

/// A workload the caller's scope sees, or 404: a device moved to another
/// tenant may still run (or be stopping) the old tenant's containers, and
/// a device-level check alone would let the new tenant into them.
/// (A fleet-wide caller sees every container, also those of workloads the
/// controller no longer has, or never had.)
async fn visible_workload(c: &Arc<Controller>, name: &str, scope: &Scope) -> Result<(), Failure> {
    if *scope == Scope::All {
        return Ok(());
    }
    let (name, scope) = (name.to_string(), scope.clone());
    op(c, move |c| c.workload(&name, now_ms(), &scope).map(drop)).await??;
    Ok(())
}

/// The next answer, or a gateway error when the device is silent for `within`.
async fn answer(
    answers: &mut UnboundedReceiver<CommandResult>,
    device: &str,
    within: Duration,
) -> Result<CommandResult, Failure> {
    match tokio::time::timeout(within, answers.recv()).await {
        Ok(Some(CommandResult { body: CommandOutput::Error(e), .. })) => {
            Err(Failure(StatusCode::BAD_GATEWAY, format!("device {device}: {e}")))
        }
        Ok(Some(r)) => Ok(r),
        _ => Err(Failure(StatusCode::GATEWAY_TIMEOUT, format!("device {device} did not answer within {within:?}"))),
    }
}

#[derive(serde::Deserialize, schemars::JsonSchema)]
struct LogsQuery {
    #[serde(default)]
    tail: Option<u32>,
    #[serde(default)]
    follow: bool,
}

/// Streams a workload's log from a device. The response starts when the
/// device first answers (so errors are HTTP errors); closing it cancels a follow.
async fn logs(
    State(c): State<Arc<Controller>>,
    Extension(scope): Extension<Scope>,
    Path((id, workload)): Path<(String, String)>,
    axum::extract::Query(q): axum::extract::Query<LogsQuery>,
) -> Result<Response, Failure> {
    let device = online_device(&c, &id, &scope).await?;
    visible_workload(&c, &workload, &scope).await?;
    let deadline = now_ms() + if q.follow { 12 * 3600 * 1000 } else { 60_000 };
    let asked = workload.clone();
    let action = CommandAction::Logs { workload, tail: q.tail.unwrap_or(100), follow: q.follow };
    let (tx, rx) = tokio::sync::mpsc::channel::<Result<Vec<u8>, std::io::Error>>(16);
    let (first_tx, first_rx) = tokio::sync::oneshot::channel::<Result<(), Failure>>();
    let controller = c.clone();
    // The relay task owns the pending request; when the client goes away the
    // send fails, the request is dropped, and that cancels the device's follow.
    tokio::spawn(async move {
        let mut pending = c.commands.send(device.clone(), action, deadline);
        let mut next = match answer(&mut pending.answers, device.as_str(), FIRST_ANSWER).await {
            Ok(first) => {
                let _ = first_tx.send(Ok(()));
                Some(first)
            }
            Err(f) => {
                let _ = first_tx.send(Err(f));
                None
            }
        };
        while let Some(r) = next.take() {
            let chunk = match r.body {
                CommandOutput::Stdout(b) | CommandOutput::Stderr(b) => b,
                CommandOutput::Text(t) => t.into_bytes(),
                CommandOutput::Error(e) => format!("error from device: {e}\n").into_bytes(),
                CommandOutput::Done | CommandOutput::Exit(_) => break,
            };
            if tx.send(Ok(chunk)).await.is_err() {
                break;
            }
            next = pending.answers.recv().await;
        }
    });
    match first_rx.await {
        Ok(Ok(())) => {}
        // The device has nothing of that name (it says so as an error):
        // not found, unless its last report lists the workload.
        Ok(Err(Failure(StatusCode::BAD_GATEWAY, why))) => {
            let (name, scope) = (id.clone(), scope.clone());
            let view = op(&controller, move |c| c.device(&name, now_ms(), &scope)).await?.ok();
            let listed = view.and_then(|v| v.report).is_some_and(|r| r.workloads.iter().any(|w| w.name == asked));
            let status = if listed { StatusCode::BAD_GATEWAY } else { StatusCode::NOT_FOUND };
            return Err(Failure(status, why));
        }
        Ok(Err(f)) => return Err(f),
        Err(_) => return Err(Failure(StatusCode::INTERNAL_SERVER_ERROR, "log relay failed".into())),
    }
    let stream = futures_util::stream::unfold(rx, |mut rx| async move { rx.recv().await.map(|item| (item, rx)) });
    Ok(([("content-type", "text/plain; charset=utf-8")], axum::body::Body::from_stream(stream)).into_response())
}

async fn exec(
    State(c): State<Arc<Controller>>,
    Extension(scope): Extension<Scope>,
    Extension(Caller(caller)): Extension<Caller>,
    Path(id): Path<String>,
    body: Result<Json<ExecRequest>, axum::extract::rejection::JsonRejection>,
) -> Result<Json<ExecResponse>, Failure> {
    let Json(req) = body.map_err(|e| Failure(StatusCode::BAD_REQUEST, e.body_text()))?;
    if req.argv.is_empty() {
        return Err(Failure(StatusCode::BAD_REQUEST, "argv: nothing to run".into()));
    }
    let (device, tenant) = online_device_of(&c, &id, &scope).await?;
    visible_workload(&c, &req.workload, &scope).await?;
    // Audited as sessions are: who ran what where, and how it ended — also
    // when it never ended here (the caller went away first).
    let shown = format!("{caller} ran `{}` in workload {} on {id}", req.argv.join(" "), req.workload);
    let mut audit = ExecAudit { c: c.clone(), tenant, id: id.clone(), shown, said: false };
    let action = CommandAction::Exec { workload: req.workload, argv: req.argv };
    let mut pending = c.commands.send(device, action, now_ms() + 90_000);
    let (mut stdout, mut stderr) = (Vec::new(), Vec::new());
    loop {
        // The agent's exec timeout is 60 s: allow for it plus the round trip.
        let next = match answer(&mut pending.answers, &id, Duration::from_secs(75)).await {
            Ok(a) => a,
            Err(f) => {
                audit.say(format!("failed: {}", f.1));
                return Err(f);
            }
        };
        match next.body {
            CommandOutput::Stdout(b) => stdout.extend(b),
            CommandOutput::Stderr(b) => stderr.extend(b),
            CommandOutput::Exit(code) => {
                audit.say(format!("exit code {code}"));
                return Ok(Json(ExecResponse {
                    exit_code: code,
                    stdout: String::from_utf8_lossy(&stdout).into(),
                    stderr: String::from_utf8_lossy(&stderr).into(),
                }));
            }
            CommandOutput::Done | CommandOutput::Text(_) | CommandOutput::Error(_) => {}
        }
    }
}

/// A one-shot exec's `session.exec` event: said once with its outcome, or,
/// if the request is dropped before one (the client hung up or timed
/// out), as that.
struct ExecAudit {
    c: Arc<Controller>,
    tenant: String,
    id: String,
    shown: String,
    said: bool,
}

impl ExecAudit {
    fn say(&mut self, outcome: String) {
        self.said = true;
        audit_later(&self.c, &self.tenant, "session.exec", &self.id, format!("{}: {outcome}", self.shown));
    }
}

impl Drop for ExecAudit {
    fn drop(&mut self) {
        if !self.said {
            self.say("no outcome: the caller went away before the device answered".into());
        }
    }
}

/// Records an audit event on the blocking pool (a store write), not waited for.
fn audit_later(c: &Arc<Controller>, tenant: &str, name: &'static str, subject: &str, message: String) {
    let (c, tenant, subject) = (c.clone(), tenant.to_owned(), subject.to_owned());
    match tokio::runtime::Handle::try_current() {
        Ok(rt) => drop(rt.spawn_blocking(move || c.audit(&tenant, name, &subject, message))),
        // (a request dropped as the runtime shuts down)
        Err(_) => c.audit(&tenant, name, &subject, message),
    }
}

async fn restart(
    State(c): State<Arc<Controller>>,
    Extension(scope): Extension<Scope>,
    Extension(Caller(caller)): Extension<Caller>,
    Path((id, workload)): Path<(String, String)>,
) -> Result<Json<serde_json::Value>, Failure> {
    let (device, tenant) = online_device_of(&c, &id, &scope).await?;
    visible_workload(&c, &workload, &scope).await?;
    let mut pending = c.commands.send(device, CommandAction::Restart { workload: workload.clone() }, now_ms() + 30_000);
    answer(&mut pending.answers, &id, FIRST_ANSWER).await?;
    // Audited: who restarted what where.
    audit_later(&c, &tenant, "workload.restarted", &id, format!("{caller} restarted workload {workload} on {id}"));
    Ok(Json(serde_json::json!({"device": id, "workload": workload, "status": "restarting"})))
}

/// Validates every document of every file first; stores only if all are valid.
async fn apply_workloads(
    State(c): State<Arc<Controller>>,
    Extension(scope): Extension<Scope>,
    body: Result<Json<ApplyRequest>, axum::extract::rejection::JsonRejection>,
) -> Result<impl IntoResponse, Failure> {
    let Json(req) = body.map_err(|e| Failure(StatusCode::BAD_REQUEST, e.body_text()))?;
    let mut validated = Vec::new();
    for file in &req.files {
        let docs = crate::workload::parse(&file.name, &file.text)
            .map_err(|e| Failure(StatusCode::BAD_REQUEST, e.to_string()))?;
        for v in docs {
            // Time zones are looked up here, at the edge (validation is pure;
            // documents re-applied from the store passed this when they came).
            if let Some(e) = v.manifest.updates.as_ref().and_then(crate::windows::unknown_zones) {
                return Err(Failure(StatusCode::BAD_REQUEST, format!("{}: workload {}: {e}", file.name, v.spec.name)));
            }
            if validated.iter().any(|o: &crate::workload::Validated| o.spec.name == v.spec.name) {
                return Err(Failure(
                    StatusCode::BAD_REQUEST,
                    format!("{}: workload {:?} is defined in more than one document", file.name, v.spec.name),
                ));
            }
            validated.push(v);
        }
    }
    if validated.is_empty() {
        return Err(Failure(StatusCode::BAD_REQUEST, "no workloads to apply".into()));
    }
    // Tag → digest over HTTP, then the store: blocking, off the async workers.
    let results = op(&c, move |c| {
        let pinned = crate::pinning::pin_digests(c, &mut validated);
        let images: Vec<String> = validated.iter().map(|v| v.spec.image.clone()).collect();
        c.apply_workloads(validated, now_ms(), &scope).map(|mut results| {
            for ((r, pinned), image) in results.iter_mut().zip(pinned).zip(images) {
                // The apply's own note (allow_from names no workload…) stays.
                r.note = match (pinned.note, r.note.take()) {
                    (Some(a), Some(b)) => Some(format!("{a}; {b}")),
                    (a, b) => a.or(b),
                };
                let Some(platforms) = pinned.platforms else { continue };
                let lacking = c.devices_without_platform(&r.name, &platforms, now_ms(), &scope);
                if !lacking.is_empty() {
                    let mut by_platform: std::collections::BTreeMap<String, Vec<String>> = Default::default();
                    for (device, platform) in lacking {
                        by_platform.entry(platform).or_default().push(device);
                    }
                    let missing: Vec<String> =
                        by_platform.into_iter().map(|(p, d)| format!("{p} (devices {})", d.join(", "))).collect();
                    let warning = format!(
                        "warning: {image} has no image for {}; it offers {}: those devices will fail to pull it",
                        missing.join(", "),
                        if platforms.is_empty() { "none".to_string() } else { platforms.join(", ") }
                    );
                    r.note = Some(match r.note.take() {
                        Some(n) => format!("{n}; {warning}"),
                        None => warning,
                    });
                }
            }
            results
        })
    })
    .await??;
    Ok(Json(results))
}

async fn list_workloads(State(c): State<Arc<Controller>>, Extension(scope): Extension<Scope>) -> impl IntoResponse {
    op(&c, move |c| c.workloads(now_ms(), &scope)).await.map(Json)
}

async fn get_workload(
    State(c): State<Arc<Controller>>,
    Extension(scope): Extension<Scope>,
    Path(name): Path<String>,
) -> Result<impl IntoResponse, Failure> {
    Ok(Json(op(&c, move |c| c.workload(&name, now_ms(), &scope)).await??))
}

async fn delete_device(
    State(c): State<Arc<Controller>>,
    Extension(scope): Extension<Scope>,
    Path(id): Path<String>,
) -> Result<impl IntoResponse, Failure> {
    let i = id.clone();
    op(&c, move |c| c.delete_device(&i, now_ms(), &scope)).await??;
    Ok(Json(serde_json::json!({"deleted": id})))
}

async fn delete_workload(
    State(c): State<Arc<Controller>>,
    Extension(scope): Extension<Scope>,
    Path(name): Path<String>,
) -> Result<impl IntoResponse, Failure> {
    let n = name.clone();
    op(&c, move |c| c.delete_workload(&n, now_ms(), &scope)).await??;
    Ok(Json(serde_json::json!({"deleted": name})))
}

async fn scale(
    State(c): State<Arc<Controller>>,
    Extension(scope): Extension<Scope>,
    Path(name): Path<String>,
    body: Result<Json<ScaleRequest>, axum::extract::rejection::JsonRejection>,
) -> Result<impl IntoResponse, Failure> {
    let Json(req) = body.map_err(|e| Failure(StatusCode::BAD_REQUEST, e.body_text()))?;
    Ok(Json(op(&c, move |c| c.scale(&name, req.replicas, now_ms(), &scope)).await??))
}

async fn get_rollout(
    State(c): State<Arc<Controller>>,
    Extension(scope): Extension<Scope>,
    Path(name): Path<String>,
) -> Result<impl IntoResponse, Failure> {
    Ok(Json(op(&c, move |c| c.rollout(&name, &scope)).await??))
}

async fn rollout_action(
    State(c): State<Arc<Controller>>,
    Extension(scope): Extension<Scope>,
    Path((name, action)): Path<(String, String)>,
) -> Result<impl IntoResponse, Failure> {
    let action: crate::view::RolloutAction = action.parse().map_err(|e| Failure(StatusCode::BAD_REQUEST, e))?;
    Ok(Json(op(&c, move |c| c.rollout_action(&name, action, now_ms(), &scope)).await??))
}

async fn list_releases(State(c): State<Arc<Controller>>) -> Result<impl IntoResponse, Failure> {
    Ok(Json(op(&c, |c| c.releases()).await??))
}

#[derive(serde::Deserialize, schemars::JsonSchema)]
struct PublishQuery {
    version: Option<String>,
}

/// The build's bytes as the body (`application/octet-stream`).
async fn publish_release(
    State(c): State<Arc<Controller>>,
    Extension(scope): Extension<Scope>,
    Query(q): Query<PublishQuery>,
    body: axum::body::Bytes,
) -> Result<impl IntoResponse, Failure> {
    Ok(Json(op(&c, move |c| c.publish_release(q.version.as_deref(), &body, now_ms(), &scope)).await??))
}

#[derive(serde::Deserialize, schemars::JsonSchema)]
struct ArchQuery {
    arch: Option<String>,
}

async fn unpublish_release(
    State(c): State<Arc<Controller>>,
    Extension(scope): Extension<Scope>,
    Path(version): Path<String>,
    Query(q): Query<ArchQuery>,
) -> Result<impl IntoResponse, Failure> {
    let v = version.clone();
    let n = op(&c, move |c| c.unpublish_release(&v, q.arch.as_deref(), now_ms(), &scope)).await??;
    Ok(Json(serde_json::json!({"unpublished": version, "builds": n})))
}

async fn agent_upgrade(
    State(c): State<Arc<Controller>>,
    Extension(scope): Extension<Scope>,
    body: Result<Json<crate::view::AgentUpgradeRequest>, axum::extract::rejection::JsonRejection>,
) -> Result<impl IntoResponse, Failure> {
    let Json(req) = body.map_err(|e| Failure(StatusCode::BAD_REQUEST, e.body_text()))?;
    Ok(Json(op(&c, move |c| c.start_agent_upgrade(&req, now_ms(), &scope)).await??))
}

async fn agent_rollout(
    State(c): State<Arc<Controller>>,
    Extension(scope): Extension<Scope>,
) -> Result<impl IntoResponse, Failure> {
    Ok(Json(op(&c, move |c| c.agent_rollout(&scope)).await??))
}

async fn agent_rollout_action(
    State(c): State<Arc<Controller>>,
    Extension(scope): Extension<Scope>,
    Path(action): Path<String>,
) -> Result<impl IntoResponse, Failure> {
    let action: crate::view::RolloutAction = action.parse().map_err(|e| Failure(StatusCode::BAD_REQUEST, e))?;
    Ok(Json(op(&c, move |c| c.agent_rollout_action(action, now_ms(), &scope)).await??))
}

#[derive(serde::Deserialize, schemars::JsonSchema)]
struct EventQuery {
    subject: Option<String>,
    limit: Option<usize>,
}

async fn events(
    State(c): State<Arc<Controller>>,
    Extension(scope): Extension<Scope>,
    Query(q): Query<EventQuery>,
) -> Result<impl IntoResponse, Failure> {
    let limit = q.limit.unwrap_or(100).min(10_000);
    Ok(Json(op(&c, move |c| c.events(q.subject.as_deref(), limit, &scope)).await??))
}

async fn list_secrets(
    State(c): State<Arc<Controller>>,
    Extension(scope): Extension<Scope>,
) -> Result<impl IntoResponse, Failure> {
    Ok(Json(op(&c, move |c| c.secrets(&scope)).await??))
}

/// The body is the secret's value, as raw bytes.
async fn put_secret(
    State(c): State<Arc<Controller>>,
    Extension(scope): Extension<Scope>,
    Path(name): Path<String>,
    body: axum::body::Bytes,
) -> Result<impl IntoResponse, Failure> {
    let view = op(&c, move |c| c.put_secret(&name, &body, now_ms(), &scope)).await??;
    Ok(Json(view))
}

async fn delete_secret(
    State(c): State<Arc<Controller>>,
    Extension(scope): Extension<Scope>,
    Path(name): Path<String>,
) -> Result<impl IntoResponse, Failure> {
    let n = name.clone();
    op(&c, move |c| c.delete_secret(&n, now_ms(), &scope)).await??;
    Ok(Json(serde_json::json!({"deleted": name})))
}

async fn trust(State(c): State<Arc<Controller>>) -> impl IntoResponse {
    Json(crate::view::TrustView { signing_key: c.keys.signing_public() })
}

async fn issue_credentials(
    State(c): State<Arc<Controller>>,
    Extension(scope): Extension<Scope>,
    Path(id): Path<String>,
) -> Result<impl IntoResponse, Failure> {
    let device = id.clone();
    let password = op(&c, move |c| c.issue_credentials(&device, now_ms(), &scope)).await??;
    Ok(Json(crate::view::CredentialsView { device: id, password }))
}

async fn revoke_device(
    State(c): State<Arc<Controller>>,
    Extension(scope): Extension<Scope>,
    Path(id): Path<String>,
) -> Result<impl IntoResponse, Failure> {
    let device = id.clone();
    op(&c, move |c| c.revoke_device(&device, now_ms(), &scope)).await??;
    Ok(Json(serde_json::json!({"revoked": id})))
}

async fn create_token(
    State(c): State<Arc<Controller>>,
    Extension(scope): Extension<Scope>,
    body: Result<Json<crate::view::TokenRequest>, axum::extract::rejection::JsonRejection>,
) -> Result<impl IntoResponse, Failure> {
    let Json(req) = body.map_err(|e| Failure(StatusCode::BAD_REQUEST, e.body_text()))?;
    let (token, info) = op(&c, move |c| c.create_token(req.ttl_s, req.uses, req.labels, now_ms(), &scope)).await??;
    Ok(Json(crate::view::TokenView { token, info }))
}

async fn list_tokens(
    State(c): State<Arc<Controller>>,
    Extension(scope): Extension<Scope>,
) -> Result<impl IntoResponse, Failure> {
    Ok(Json(op(&c, move |c| c.tokens(&scope)).await??))
}

async fn delete_token(
    State(c): State<Arc<Controller>>,
    Extension(scope): Extension<Scope>,
    Path(id): Path<String>,
) -> Result<impl IntoResponse, Failure> {
    let token = id.clone();
    op(&c, move |c| c.delete_token(&token, now_ms(), &scope)).await??;
    Ok(Json(serde_json::json!({"deleted": id})))
}

/// Gives every request its `Scope`. With `--api-auth`, every request but
/// `openapi::public` ones (`/healthz`, the description) carries
/// `Authorization: Bearer <token>`; a read-only token may
/// only read, a tenant's token acts for its tenant only, and `/metrics`
/// (counts over the whole fleet) needs a fleet-wide token.
/// The `baton-tenant` header narrows a fleet-wide caller to one tenant.
async fn authenticate(
    State(c): State<Arc<Controller>>,
    mut req: axum::extract::Request,
    next: axum::middleware::Next,
) -> Response {
    if openapi::public(req.uri().path()) {
        return next.run(req).await;
    }
    let headers = req.headers();
    let named = match headers.get(crate::tenant::HEADER).map(|v| v.to_str()) {
        None => None,
        Some(Ok(t)) => Some(t.to_string()),
        Some(Err(_)) => return error(StatusCode::BAD_REQUEST, "the tenant header is not text".into()),
    };
    let token_tenant = if c.api_auth {
        let bearer = headers
            .get(axum::http::header::AUTHORIZATION)
            .and_then(|v| v.to_str().ok())
            .and_then(|v| v.strip_prefix("Bearer "));
        let bearer = bearer.map(str::to_string);
        let verdict = match op(&c, move |c| c.authorize(bearer.as_deref())).await {
            Ok(v) => v,
            Err(f) => return f.into_response(),
        };
        match verdict {
            Err(why) => return error(StatusCode::UNAUTHORIZED, why),
            Ok((role, _, _))
                if role != crate::view::Role::Admin
                    && !matches!(*req.method(), axum::http::Method::GET | axum::http::Method::HEAD) =>
            {
                return error(StatusCode::FORBIDDEN, format!("a {role} token cannot change anything"));
            }
            Ok((_, Some(tenant), _)) if req.uri().path() == "/metrics" => {
                return error(
                    StatusCode::FORBIDDEN,
                    format!("/metrics counts the whole fleet: a token of tenant {tenant} cannot read it"),
                );
            }
            Ok((role, tenant, who)) => {
                req.extensions_mut().insert(Caller(who));
                req.extensions_mut().insert(role);
                tenant
            }
        }
    } else {
        req.extensions_mut().insert(Caller("an operator (no --api-auth)".into()));
        req.extensions_mut().insert(crate::view::Role::Admin);
        None
    };
    match Scope::of(token_tenant.as_deref(), named.as_deref()) {
        Ok(scope) => {
            req.extensions_mut().insert(scope);
            next.run(req).await
        }
        Err(why) => error(StatusCode::FORBIDDEN, why.to_string()),
    }
}

/// A POST, so a read-only token cannot take it: the copy holds every
/// token's hash and every (encrypted) secret.
async fn backup(State(c): State<Arc<Controller>>, Extension(scope): Extension<Scope>) -> Result<Response, Failure> {
    let bytes = op(&c, move |c| c.backup(&scope)).await??;
    Ok(([("content-type", "application/vnd.sqlite3")], bytes).into_response())
}

async fn create_api_token(
    State(c): State<Arc<Controller>>,
    Extension(scope): Extension<Scope>,
    body: Result<Json<crate::view::ApiTokenRequest>, axum::extract::rejection::JsonRejection>,
) -> Result<impl IntoResponse, Failure> {
    let Json(req) = body.map_err(|e| Failure(StatusCode::BAD_REQUEST, e.body_text()))?;
    let role: crate::view::Role = req.role.parse().map_err(|e| Failure(StatusCode::BAD_REQUEST, e))?;
    let (token, info) = op(&c, move |c| c.create_api_token(role, &req.name, now_ms(), &scope)).await??;
    Ok(Json(crate::view::ApiTokenCreated { token, info }))
}

async fn list_api_tokens(State(c): State<Arc<Controller>>, Extension(scope): Extension<Scope>) -> impl IntoResponse {
    op(&c, move |c| c.api_token_list(&scope)).await.map(Json)
}

async fn delete_api_token(
    State(c): State<Arc<Controller>>,
    Extension(scope): Extension<Scope>,
    Path(id): Path<String>,
) -> Result<impl IntoResponse, Failure> {
    let token = id.clone();
    op(&c, move |c| c.delete_api_token(&token, now_ms(), &scope)).await??;
    Ok(Json(serde_json::json!({"revoked": id})))
}

async fn list_webhooks(State(c): State<Arc<Controller>>, Extension(scope): Extension<Scope>) -> impl IntoResponse {
    op(&c, move |c| c.webhooks(&scope)).await.map(Json)
}

async fn create_webhook(
    State(c): State<Arc<Controller>>,
    Extension(scope): Extension<Scope>,
    body: Result<Json<crate::view::WebhookRequest>, axum::extract::rejection::JsonRejection>,
) -> Result<impl IntoResponse, Failure> {
    let Json(req) = body.map_err(|e| Failure(StatusCode::BAD_REQUEST, e.body_text()))?;
    Ok(Json(op(&c, move |c| c.create_webhook(&req.url, req.events, now_ms(), &scope)).await??))
}

async fn delete_webhook(
    State(c): State<Arc<Controller>>,
    Extension(scope): Extension<Scope>,
    Path(id): Path<String>,
) -> Result<impl IntoResponse, Failure> {
    let hook = id.clone();
    op(&c, move |c| c.delete_webhook(&hook, now_ms(), &scope)).await??;
    Ok(Json(serde_json::json!({"deleted": id})))
}
