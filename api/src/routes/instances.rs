//! `/v1/instances`: start clones, list, inspect, delete, extend TTLs,
//! health and console.

use std::collections::BTreeMap;
use std::time::Duration;

use axum::body::Body;
use axum::extract::rejection::{JsonRejection, PathRejection, QueryRejection};
use axum::extract::{Path, Query, State};
use axum::http::{header, StatusCode};
use axum::response::Response;
use axum::Json;
use host::runtime::{InstanceFilter, InstanceInfo, InstanceState, InstancesRequest};

use crate::auth::Caller;
use crate::error::{ApiError, CommonErrors};
use crate::types::{
    ConsoleQuery, CreateInstances, CreatedInstances, Health, InstanceList, InstanceQuery,
    InstanceResult, SetTtl,
};
use crate::{blocking, AppState};

/// Start clones of a frozen master: one result per requested clone (an
/// instance, or the error for that one). 201 when all started, 207 when
/// some did not; a request of which not one clone started, or that cannot
/// start at all, gets an error status (429 with Retry-After when every
/// start slot is in use; 502 when the guests did not answer).
#[utoipa::path(post, path = "/v1/instances", tag = "instances",
    request_body = CreateInstances,
    responses(
        (status = 201, description = "All started", body = CreatedInstances),
        (status = 207, description = "Some started, some did not (see each result)", body = CreatedInstances),
        CommonErrors))]
pub async fn create(
    State(st): State<AppState>,
    Caller(tenant): Caller,
    body: Result<Json<CreateInstances>, JsonRejection>,
) -> Result<(StatusCode, Json<CreatedInstances>), ApiError> {
    let Json(req) = body?;
    req.validate()?;
    let rt = st.runtime.clone();
    let results = blocking(move || {
        rt.create_instances(
            &tenant,
            InstancesRequest {
                master: req.master,
                count: req.count,
                labels: req.labels,
                ttl: req.ttl_s.map(Duration::from_secs),
                id: None,
                limits: req.limits.into(),
                net: host::vmnet::NetRequest {
                    disabled: !req.net,
                    egress: req.egress,
                    publish: req.ports.iter().map(|p| p.clone().into()).collect(),
                    peers: req.peers,
                },
            },
        )
    })
    .await?;
    let requested = results.len();
    let mut out = CreatedInstances {
        started: 0,
        failed: 0,
        results: Vec::with_capacity(requested),
    };
    let mut first_error = None;
    for r in results {
        match r {
            Ok(i) => {
                out.started += 1;
                out.results.push(InstanceResult {
                    instance: Some(i),
                    error: None,
                });
            }
            Err(e) => {
                out.failed += 1;
                let e = ApiError::from(e);
                out.results.push(InstanceResult {
                    instance: None,
                    error: Some(e.body().error),
                });
                first_error.get_or_insert(e);
            }
        }
    }
    if out.started == 0 {
        // Not one started: the request failed, with the first clone's error
        // (the others' are almost always the same).
        if let Some(mut e) = first_error {
            e.message = format!("none of the {requested} clone(s) started: {}", e.message);
            return Err(e);
        }
    }
    let status = if out.failed == 0 {
        StatusCode::CREATED
    } else {
        StatusCode::MULTI_STATUS
    };
    Ok((status, Json(out)))
}

/// The caller's instances, filtered, sorted by id, a page at a time.
#[utoipa::path(get, path = "/v1/instances", tag = "instances",
    params(InstanceQuery),
    responses((status = 200, body = InstanceList), CommonErrors))]
pub async fn list(
    State(st): State<AppState>,
    Caller(tenant): Caller,
    q: Result<Query<InstanceQuery>, QueryRejection>,
) -> Result<Json<InstanceList>, ApiError> {
    let Query(q) = q?;
    let limit = q.limit.unwrap_or(100);
    if !(1..=1000).contains(&limit) {
        return Err(ApiError::bad_request(format!(
            "limit must be 1..=1000 (got {limit})"
        )));
    }
    let mut filter = InstanceFilter {
        master: q.master,
        ..Default::default()
    };
    if let Some(s) = &q.state {
        filter.state = Some(InstanceState::parse(s).ok_or_else(|| {
            ApiError::bad_request(format!(
                "state must be starting, running, exited or failed (got {s:?})"
            ))
        })?);
    }
    if let Some(l) = &q.label {
        let (k, v) = l
            .split_once('=')
            .ok_or_else(|| ApiError::bad_request(format!("label must be key=value (got {l:?})")))?;
        filter.labels = BTreeMap::from([(k.to_string(), v.to_string())]);
    }
    let (instances, more) = st
        .runtime
        .instances(&tenant, &filter, q.page_token.as_deref(), limit);
    let next_page_token = more
        .then(|| instances.last().map(|i| i.id.clone()))
        .flatten();
    Ok(Json(InstanceList {
        instances,
        next_page_token,
    }))
}

/// One instance: state, reason, pid, timings per phase, memory.
#[utoipa::path(get, path = "/v1/instances/{id}", tag = "instances",
    params(("id" = String, Path, description = "Instance id")),
    responses((status = 200, body = InstanceInfo), CommonErrors))]
pub async fn get(
    State(st): State<AppState>,
    Caller(tenant): Caller,
    id: Result<Path<String>, PathRejection>,
) -> Result<Json<InstanceInfo>, ApiError> {
    let Path(id) = id?;
    Ok(Json(st.runtime.instance(&tenant, &id)?))
}

/// Kill an instance and remove it.
#[utoipa::path(delete, path = "/v1/instances/{id}", tag = "instances",
    params(("id" = String, Path, description = "Instance id")),
    responses((status = 204, description = "Killed and removed"), CommonErrors))]
pub async fn delete(
    State(st): State<AppState>,
    Caller(tenant): Caller,
    id: Result<Path<String>, PathRejection>,
) -> Result<StatusCode, ApiError> {
    let Path(id) = id?;
    let rt = st.runtime.clone();
    blocking(move || rt.delete_instance(&tenant, &id)).await?;
    Ok(StatusCode::NO_CONTENT)
}

/// Set an instance's TTL to `ttl_s` from now.
#[utoipa::path(post, path = "/v1/instances/{id}/ttl", tag = "instances",
    params(("id" = String, Path, description = "Instance id")),
    request_body = SetTtl,
    responses((status = 200, body = InstanceInfo), CommonErrors))]
pub async fn ttl(
    State(st): State<AppState>,
    Caller(tenant): Caller,
    id: Result<Path<String>, PathRejection>,
    body: Result<Json<SetTtl>, JsonRejection>,
) -> Result<Json<InstanceInfo>, ApiError> {
    let Path(id) = id?;
    let Json(req) = body?;
    req.validate()?;
    Ok(Json(st.runtime.extend_ttl(
        &tenant,
        &id,
        Duration::from_secs(req.ttl_s),
    )?))
}

/// Ping the instance's agent; the round trip in ms.
#[utoipa::path(get, path = "/v1/instances/{id}/health", tag = "instances",
    params(("id" = String, Path, description = "Instance id")),
    responses((status = 200, body = Health), CommonErrors))]
pub async fn health(
    State(st): State<AppState>,
    Caller(tenant): Caller,
    id: Result<Path<String>, PathRejection>,
) -> Result<Json<Health>, ApiError> {
    let Path(id) = id?;
    let rt = st.runtime.clone();
    let (ping_ms, uptime_ms) = blocking(move || rt.health(&tenant, &id)).await?;
    Ok(Json(Health {
        ok: true,
        ping_ms,
        uptime_ms,
    }))
}

/// The serial console (`follow=true` streams new output until the
/// instance ends or the client goes).
#[utoipa::path(get, path = "/v1/instances/{id}/console", tag = "instances",
    params(("id" = String, Path, description = "Instance id"), ConsoleQuery),
    responses((status = 200, description = "Console text", content_type = "text/plain", body = String), CommonErrors))]
pub async fn console(
    State(st): State<AppState>,
    Caller(tenant): Caller,
    id: Result<Path<String>, PathRejection>,
    q: Result<Query<ConsoleQuery>, QueryRejection>,
) -> Result<Response, ApiError> {
    let Path(id) = id?;
    let Query(q) = q?;
    let path = st.runtime.console_path(&tenant, &id)?;
    let text_plain = |body: Body| {
        Response::builder()
            .header(header::CONTENT_TYPE, "text/plain; charset=utf-8")
            .body(body)
            .map_err(|e| ApiError::internal(e.to_string()))
    };
    if !q.follow {
        // The last MiB at most: a console log can be long.
        let data = tokio::fs::read(&path).await.unwrap_or_default();
        let from = data.len().saturating_sub(1 << 20);
        return text_plain(Body::from(data[from..].to_vec()));
    }
    let rt = st.runtime.clone();
    let stream = async_stream(path, move || {
        rt.instance(&tenant, &id)
            .map(|i| matches!(i.state, InstanceState::Starting | InstanceState::Running))
            .unwrap_or(false)
    });
    text_plain(Body::from_stream(stream))
}

/// Streams a growing file until `alive` says no (and the file has no more).
fn async_stream(
    path: std::path::PathBuf,
    alive: impl Fn() -> bool + Send + 'static,
) -> impl futures_core::Stream<Item = Result<Vec<u8>, std::io::Error>> + Send {
    use tokio::io::{AsyncReadExt, AsyncSeekExt};
    let (tx, rx) = tokio::sync::mpsc::channel::<Result<Vec<u8>, std::io::Error>>(8);
    tokio::spawn(async move {
        let mut offset = 0u64;
        loop {
            let mut chunk = Vec::new();
            if let Ok(mut f) = tokio::fs::File::open(&path).await {
                if f.seek(std::io::SeekFrom::Start(offset)).await.is_ok() {
                    let _ = f.take(256 * 1024).read_to_end(&mut chunk).await;
                }
            }
            offset += chunk.len() as u64;
            let got = !chunk.is_empty();
            if got && tx.send(Ok(chunk)).await.is_err() {
                return; // the client went away
            }
            if !got {
                if !alive() || tx.is_closed() {
                    return;
                }
                tokio::time::sleep(Duration::from_millis(100)).await;
            }
        }
    });
    tokio_stream_from(rx)
}

fn tokio_stream_from<T: Send + 'static>(
    mut rx: tokio::sync::mpsc::Receiver<T>,
) -> impl futures_core::Stream<Item = T> + Send {
    futures_util::stream::poll_fn(move |cx| rx.poll_recv(cx))
}
