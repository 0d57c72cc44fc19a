//! `/v1/masters`: make, list, inspect, remove, save and load masters.

use std::path::PathBuf;
use std::time::Duration;

use axum::extract::rejection::{JsonRejection, PathRejection, QueryRejection};
use axum::extract::{Path, Query, State};
use axum::http::StatusCode;
use axum::Json;
use host::runtime::{MasterInfo, MasterRequest};

use crate::auth::Caller;
use crate::error::{ApiError, CommonErrors};
use crate::types::{
    CreateMaster, ForceQuery, LoadSnapshot, MasterList, SaveSnapshot, SnapshotSaved,
};
use crate::{blocking, AppState};

/// Make a master: cold boot, warm-up, freeze. Returns at once (202) with
/// status `booting`; poll `GET /v1/masters/{name}` until `frozen` or `failed`.
#[utoipa::path(post, path = "/v1/masters", tag = "masters",
    request_body = CreateMaster,
    responses((status = 202, description = "Being made", body = MasterInfo), CommonErrors))]
pub async fn create(
    State(st): State<AppState>,
    Caller(tenant): Caller,
    body: Result<Json<CreateMaster>, JsonRejection>,
) -> Result<(StatusCode, Json<MasterInfo>), ApiError> {
    let Json(req) = body?;
    req.validate()?;
    let rt = st.runtime.clone();
    let info = blocking(move || {
        rt.create_master(
            &tenant,
            MasterRequest {
                name: req.name,
                memory_mib: req.memory_mib,
                vcpus: req.vcpus,
                warmup: req.warmup,
                warmup_timeout: Duration::from_secs(req.warmup_timeout_s),
                labels: req.labels,
                net: req.net.then(|| host::vmnet::NetRequest {
                    egress: req.egress,
                    ..Default::default()
                }),
            },
        )
    })
    .await?;
    Ok((StatusCode::ACCEPTED, Json(info)))
}

/// The caller's masters.
#[utoipa::path(get, path = "/v1/masters", tag = "masters",
    responses((status = 200, body = MasterList), CommonErrors))]
pub async fn list(State(st): State<AppState>, Caller(tenant): Caller) -> Json<MasterList> {
    Json(MasterList {
        masters: st.runtime.masters(&tenant),
    })
}

/// One master.
#[utoipa::path(get, path = "/v1/masters/{name}", tag = "masters",
    params(("name" = String, Path, description = "Master name")),
    responses((status = 200, body = MasterInfo), CommonErrors))]
pub async fn get(
    State(st): State<AppState>,
    Caller(tenant): Caller,
    name: Result<Path<String>, PathRejection>,
) -> Result<Json<MasterInfo>, ApiError> {
    let Path(name) = name?;
    Ok(Json(st.runtime.master(&tenant, &name)?))
}

/// Remove a master (409 while clones of it are alive, unless `force=true`).
#[utoipa::path(delete, path = "/v1/masters/{name}", tag = "masters",
    params(("name" = String, Path, description = "Master name"), ForceQuery),
    responses((status = 204, description = "Removed"), CommonErrors))]
pub async fn delete(
    State(st): State<AppState>,
    Caller(tenant): Caller,
    name: Result<Path<String>, PathRejection>,
    q: Result<Query<ForceQuery>, QueryRejection>,
) -> Result<StatusCode, ApiError> {
    let Path(name) = name?;
    let Query(q) = q?;
    let rt = st.runtime.clone();
    blocking(move || rt.delete_master(&tenant, &name, q.force)).await?;
    Ok(StatusCode::NO_CONTENT)
}

/// Write a frozen master's snapshot files (sparse, checksummed) to a new
/// directory on the daemon's host.
#[utoipa::path(post, path = "/v1/masters/{name}/snapshot", tag = "masters",
    params(("name" = String, Path, description = "Master name")),
    request_body = SaveSnapshot,
    responses((status = 201, body = SnapshotSaved), CommonErrors))]
pub async fn save(
    State(st): State<AppState>,
    Caller(tenant): Caller,
    name: Result<Path<String>, PathRejection>,
    body: Result<Json<SaveSnapshot>, JsonRejection>,
) -> Result<(StatusCode, Json<SnapshotSaved>), ApiError> {
    let Path(name) = name?;
    let Json(req) = body?;
    // Another tenant's master is not found, for whoever asks; only an
    // existing master of the caller's meets the admin-only rule.
    st.runtime.master(&tenant, &name)?;
    admin_only(&tenant)?;
    let dir = absolute(&req.dir)?;
    let rt = st.runtime.clone();
    let d = dir.clone();
    let stats = blocking(move || rt.save_master(&tenant, &name, &d)).await?;
    Ok((
        StatusCode::CREATED,
        Json(SnapshotSaved {
            dir: dir.display().to_string(),
            memory_bytes: stats.memory_size,
            data_bytes: stats.data_bytes,
            zero_pages_skipped: stats.zero_pages_skipped,
        }),
    ))
}

/// Register the snapshot in a directory on the daemon's host as a master
/// (checked whole: format, version, checksums, this host can restore it).
#[utoipa::path(post, path = "/v1/masters:load", tag = "masters",
    request_body = LoadSnapshot,
    responses((status = 201, body = MasterInfo), CommonErrors))]
pub async fn load(
    State(st): State<AppState>,
    Caller(tenant): Caller,
    body: Result<Json<LoadSnapshot>, JsonRejection>,
) -> Result<(StatusCode, Json<MasterInfo>), ApiError> {
    let Json(req) = body?;
    admin_only(&tenant)?;
    let dir = absolute(&req.dir)?;
    let name = match req.name {
        Some(n) => n,
        None => dir
            .file_name()
            .map(|n| n.to_string_lossy().to_lowercase())
            .unwrap_or_default(),
    };
    let rt = st.runtime.clone();
    let info = blocking(move || rt.load_master(&tenant, &dir, &name)).await?;
    Ok((StatusCode::CREATED, Json(info)))
}

fn absolute(dir: &str) -> Result<PathBuf, ApiError> {
    let p = PathBuf::from(dir);
    if !p.is_absolute() || dir.contains('\0') || p.components().any(|c| c.as_os_str() == "..") {
        return Err(ApiError::bad_request(format!(
            "dir must be an absolute path without '..' (got {dir:?})"
        )));
    }
    Ok(p)
}

/// Snapshot files are paths on the daemon's host: only its admin names them.
fn admin_only(tenant: &host::runtime::Tenant) -> Result<(), ApiError> {
    if tenant.admin {
        Ok(())
    } else {
        Err(ApiError::new(
            StatusCode::FORBIDDEN,
            "admin_only",
            "snapshot files are paths on the daemon's host: only its admin (the Unix socket) may save or load them",
        ))
    }
}
