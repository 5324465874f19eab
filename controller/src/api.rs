//! HTTP/JSON API (axum): translation only. Handlers parse the request, call a
//! `Controller` operation with plain values, and render its answer.

use std::sync::Arc;

use axum::extract::{Path, State};
use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use axum::routing::{get, patch};
use axum::{Json, Router};

use crate::controller::{now_ms, Controller, OpError};
use crate::view::{ApiError, LabelChange};

pub fn router(controller: Arc<Controller>) -> Router {
    Router::new()
        .route("/healthz", get(health))
        .route("/metrics", get(metrics))
        .route("/api/v1/devices", get(list_devices))
        .route("/api/v1/devices/{id}", get(get_device))
        .route("/api/v1/devices/{id}/labels", patch(relabel))
        .fallback(|| async { error(StatusCode::NOT_FOUND, "no such API endpoint".into()) })
        .with_state(controller)
}

fn error(status: StatusCode, error: String) -> Response {
    (status, Json(ApiError { error })).into_response()
}

impl IntoResponse for OpError {
    fn into_response(self) -> Response {
        let status = match &self {
            OpError::NotFound(_) => StatusCode::NOT_FOUND,
            OpError::Invalid(_) => StatusCode::BAD_REQUEST,
            OpError::Store(_) => StatusCode::INTERNAL_SERVER_ERROR,
        };
        error(status, self.to_string())
    }
}

async fn health(State(c): State<Arc<Controller>>) -> impl IntoResponse {
    Json(c.health())
}

async fn metrics(State(c): State<Arc<Controller>>) -> impl IntoResponse {
    ([("content-type", "text/plain; version=0.0.4")], c.render_metrics(now_ms()))
}

async fn list_devices(State(c): State<Arc<Controller>>) -> impl IntoResponse {
    Json(c.devices(now_ms()))
}

async fn get_device(State(c): State<Arc<Controller>>, Path(id): Path<String>) -> Result<impl IntoResponse, OpError> {
    c.device(&id, now_ms()).map(Json)
}

async fn relabel(
    State(c): State<Arc<Controller>>,
    Path(id): Path<String>,
    body: Result<Json<LabelChange>, axum::extract::rejection::JsonRejection>,
) -> Result<impl IntoResponse, Response> {
    let Json(change) = body.map_err(|e| error(StatusCode::BAD_REQUEST, e.body_text()))?;
    c.relabel(&id, &change, now_ms()).map(Json).map_err(IntoResponse::into_response)
}
