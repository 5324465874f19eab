//! The dashboard: its page and assets (embedded in the binary, served
//! without a token: they hold no data), and the API calls it makes beyond
//! the CLI's — who the token is, the fleet overview, a device's last hour,
//! and two live feeds (server-sent events): the event log and a workload's
//! rollout. Every data call goes through `authenticate` like any other, so
//! a read-only token gets a read-only page and a tenant's token its tenant.

use std::sync::Arc;
use std::time::Duration;

use axum::extract::{Extension, Path, Query, State};
use axum::http::header;
use axum::response::{IntoResponse, Response};
use axum::routing::get;
use axum::{Json, Router};
use tokio::sync::broadcast::error::RecvError;

use super::{op, Caller, Failure};
use crate::controller::{now_ms, Controller};
use crate::tenant::Scope;
use crate::view::Role;

const INDEX: &str = include_str!("ui/index.html");
const SCRIPT: &str = include_str!("ui/app.js");
const STYLE: &str = include_str!("ui/app.css");
const ICON: &str = include_str!("ui/icon.svg");

/// A live feed says something at least this often, so proxies and the
/// browser keep it open and a closed page is noticed.
const KEEPALIVE: Duration = Duration::from_secs(15);
/// How often a rollout feed looks for a change.
const ROLLOUT_TICK: Duration = Duration::from_millis(500);

/// The page and its assets: no token needed (the page asks for one).
pub fn assets() -> Router {
    Router::new()
        .route("/", get(|| async { axum::response::Redirect::to("/ui/") }))
        .route("/ui", get(|| async { axum::response::Redirect::to("/ui/") }))
        .route("/ui/", get(|| async { asset("text/html; charset=utf-8", INDEX) }))
        .route("/ui/app.js", get(|| async { asset("text/javascript; charset=utf-8", SCRIPT) }))
        .route("/ui/app.css", get(|| async { asset("text/css; charset=utf-8", STYLE) }))
        .route("/ui/icon.svg", get(|| async { asset("image/svg+xml", ICON) }))
}

fn asset(content_type: &'static str, body: &'static str) -> Response {
    (
        [
            (header::CONTENT_TYPE, content_type),
            // Scripts only from here, nothing inline, no framing: a value a
            // device reports cannot become script, and no page can wrap this one.
            (
                header::CONTENT_SECURITY_POLICY,
                "default-src 'none'; script-src 'self'; style-src 'self'; img-src 'self' data:; \
                 connect-src 'self'; frame-ancestors 'none'; base-uri 'none'; form-action 'self'",
            ),
            (header::X_CONTENT_TYPE_OPTIONS, "nosniff"),
            (header::REFERRER_POLICY, "no-referrer"),
            // A new controller's page is fetched again, never mixed with an old script.
            (header::CACHE_CONTROL, "no-cache"),
        ],
        body,
    )
        .into_response()
}

#[derive(serde::Serialize, serde::Deserialize, Debug, Clone, PartialEq, Eq, schemars::JsonSchema)]
pub struct WhoAmI {
    pub name: String,
    pub role: Role,
    /// The tenant it acts for (None: the whole fleet).
    pub tenant: Option<String>,
    /// Whether the API asks for tokens at all.
    pub api_auth: bool,
}

pub(super) async fn whoami(
    State(c): State<Arc<Controller>>,
    Extension(scope): Extension<Scope>,
    Extension(Caller(name)): Extension<Caller>,
    Extension(role): Extension<Role>,
) -> Json<WhoAmI> {
    Json(WhoAmI { name, role, tenant: scope.tenant().map(str::to_string), api_auth: c.api_auth })
}

#[derive(serde::Deserialize, schemars::JsonSchema)]
pub(super) struct OverviewQuery {
    group: Option<String>,
}

pub(super) async fn overview(
    State(c): State<Arc<Controller>>,
    Extension(scope): Extension<Scope>,
    Query(q): Query<OverviewQuery>,
) -> Result<impl IntoResponse, Failure> {
    let group = q.group.filter(|g| !g.is_empty());
    Ok(Json(op(&c, move |c| c.overview(group.as_deref(), now_ms(), &scope)).await?))
}

pub(super) async fn samples(
    State(c): State<Arc<Controller>>,
    Extension(scope): Extension<Scope>,
    Path(id): Path<String>,
) -> Result<impl IntoResponse, Failure> {
    Ok(Json(op(&c, move |c| c.samples(&id, now_ms(), &scope)).await??))
}

/// A `text/event-stream` response of `stream`'s frames.
fn event_stream_response(
    stream: impl futures_util::Stream<Item = Result<String, std::io::Error>> + Send + 'static,
) -> Response {
    (
        [
            (header::CONTENT_TYPE, "text/event-stream"),
            (header::CACHE_CONTROL, "no-cache"),
            (header::HeaderName::from_static("x-accel-buffering"), "no"),
        ],
        axum::body::Body::from_stream(stream),
    )
        .into_response()
}

/// One server-sent event: `data` is one line of JSON.
fn frame(kind: &str, data: &str) -> String {
    format!("event: {kind}\ndata: {data}\n\n")
}

#[derive(serde::Deserialize, schemars::JsonSchema)]
pub(super) struct StreamQuery {
    /// Only events about this subject (a device id, a workload name).
    subject: Option<String>,
}

/// `GET /api/v1/events/stream`: every event the caller's scope sees, as it
/// is recorded (`event: event`), from the moment of the request; `event:
/// lagged` says how many this reader missed when it fell behind.
pub(super) async fn event_stream(
    State(c): State<Arc<Controller>>,
    Extension(scope): Extension<Scope>,
    Query(q): Query<StreamQuery>,
) -> Response {
    let rx = c.live.subscribe();
    let subject = q.subject.filter(|s| !s.is_empty());
    let stream = futures_util::stream::unfold((rx, scope, subject), |(mut rx, scope, subject)| async move {
        loop {
            let text = match tokio::time::timeout(KEEPALIVE, rx.recv()).await {
                Err(_) => ": keepalive\n\n".to_string(),
                Ok(Err(RecvError::Closed)) => return None,
                Ok(Err(RecvError::Lagged(n))) => frame("lagged", &n.to_string()),
                Ok(Ok(e)) => {
                    if !scope.sees(&e.tenant) || subject.as_ref().is_some_and(|s| *s != e.subject) {
                        continue;
                    }
                    frame("event", &serde_json::to_string(&e).unwrap_or_default())
                }
            };
            return Some((Ok(text), (rx, scope, subject)));
        }
    });
    event_stream_response(stream)
}

/// `GET /api/v1/workloads/{name}/rollout/watch`: the workload's rollout
/// (`event: rollout`, the `RolloutView`; `null` before its first) now and at
/// every change, until the client goes away or the workload does (`event: gone`).
pub(super) async fn rollout_watch(
    State(c): State<Arc<Controller>>,
    Extension(scope): Extension<Scope>,
    Path(name): Path<String>,
) -> Result<Response, Failure> {
    let look = |c: Arc<Controller>, name: String, scope: Scope| async move {
        op(&c, move |c| c.last_rollout(&name, &scope).map(|r| serde_json::to_string(&r).unwrap_or_default())).await
    };
    // The first look answers as a request would: an unknown workload is a 404.
    let first = look(c.clone(), name.clone(), scope.clone()).await??;
    struct Watch {
        c: Arc<Controller>,
        name: String,
        scope: Scope,
        last: Option<String>,
        pending: Option<String>,
        quiet: Duration,
        done: bool,
    }
    let w = Watch { c, name, scope, last: None, pending: Some(first), quiet: Duration::ZERO, done: false };
    let stream = futures_util::stream::unfold(w, move |mut w| async move {
        loop {
            if w.done {
                return None;
            }
            if let Some(now) = w.pending.take() {
                if w.last.as_deref() != Some(now.as_str()) {
                    let text = frame("rollout", &now);
                    w.last = Some(now);
                    w.quiet = Duration::ZERO;
                    return Some((Ok(text), w));
                }
            }
            if w.quiet >= KEEPALIVE {
                w.quiet = Duration::ZERO;
                return Some((Ok(": keepalive\n\n".to_string()), w));
            }
            tokio::time::sleep(ROLLOUT_TICK).await;
            w.quiet += ROLLOUT_TICK;
            match look(w.c.clone(), w.name.clone(), w.scope.clone()).await {
                Ok(Ok(now)) => w.pending = Some(now),
                Ok(Err(e)) => {
                    w.done = true;
                    return Some((Ok(frame("gone", &serde_json::to_string(&e.to_string()).unwrap_or_default())), w));
                }
                Err(_) => {}
            }
        }
    });
    Ok(event_stream_response(stream))
}
