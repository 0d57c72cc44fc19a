//! The host's own resources and the daemon's health: `/v1/host`,
//! `/metrics`, `/healthz`, `/v1/openapi.json`.

use axum::extract::State;
use axum::http::header;
use axum::response::IntoResponse;
use axum::Json;
use host::runtime::HostInfo;

use crate::auth::Caller;
use crate::error::{ApiError, CommonErrors};
use crate::AppState;

/// The host: memory (total, committed to guests, private to clones, shared
/// master pages), CPUs, masters, instances by state, start slots.
#[utoipa::path(get, path = "/v1/host", tag = "host",
    responses((status = 200, body = HostInfo), CommonErrors))]
pub async fn host(State(st): State<AppState>, _caller: Caller) -> Json<HostInfo> {
    Json(st.runtime.host())
}

/// Prometheus metrics (text format).
#[utoipa::path(get, path = "/metrics", tag = "host",
    responses((status = 200, description = "Prometheus text format", content_type = "text/plain", body = String), CommonErrors))]
pub async fn metrics(
    State(st): State<AppState>,
    _caller: Caller,
) -> Result<impl IntoResponse, ApiError> {
    let rt = st.runtime.clone();
    crate::blocking(move || {
        rt.refresh_gauges();
        Ok::<_, host::runtime::RuntimeError>(())
    })
    .await?;
    crate::metrics_response(&st.registry)
}

/// Liveness of the daemon itself (no authentication, no VM touched).
#[utoipa::path(get, path = "/healthz", tag = "host",
    responses((status = 200, description = "The daemon serves", content_type = "text/plain", body = String)))]
pub async fn healthz() -> &'static str {
    "ok\n"
}

/// This API's OpenAPI 3.1 document.
#[utoipa::path(get, path = "/v1/openapi.json", tag = "host",
    responses((status = 200, description = "The OpenAPI document", content_type = "application/json", body = Object)))]
pub async fn openapi() -> impl IntoResponse {
    (
        [(header::CONTENT_TYPE, "application/json")],
        crate::openapi_json(),
    )
}
