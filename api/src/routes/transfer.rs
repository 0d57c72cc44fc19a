//! Masters travel between daemons: the source side serves a frozen
//! master's snapshot as an offer (its manifest, with the memory's CRC) and
//! a memory stream (data pages only, checksummed records, resumable by
//! offset: the format is `host::transfer`'s); the receiving side's
//! `POST /v1/masters:fetch` pulls one from a peer ([`crate::peer`]).

use axum::body::Body;
use axum::extract::rejection::{JsonRejection, PathRejection, QueryRejection};
use axum::extract::{Path, Query, State};
use axum::http::{header, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::Json;
use host::transfer::{MemoryReader, Offer};
use hyper::body::Bytes;

use crate::auth::Caller;
use crate::error::{ApiError, CommonErrors};
use crate::types::{FetchMaster, MasterFetched, OffsetQuery};
use crate::{blocking, AppState};

/// Pieces of the memory stream buffered between the disk reader and the
/// connection (each at most 1 MiB of data).
const QUEUE: usize = 4;

/// What a receiver needs before the memory: the snapshot manifest (the VM
/// state, `memory.crc32` filled in), the memory's size and CRC-32, and what
/// a whole memory stream carries. Reads the master's memory once (data
/// only) for the CRC.
#[utoipa::path(get, path = "/v1/masters/{name}/snapshot/offer", tag = "masters",
    params(("name" = String, Path, description = "Master name")),
    responses((status = 200, body = Offer), CommonErrors))]
pub async fn offer(
    State(st): State<AppState>,
    Caller(tenant): Caller,
    name: Result<Path<String>, PathRejection>,
) -> Result<Json<Offer>, ApiError> {
    let Path(name) = name?;
    let dir = st.runtime.master_snapshot(&tenant, &name)?;
    Ok(Json(blocking(move || host::transfer::offer(&dir)).await?))
}

/// The master's memory as a stream (`application/octet-stream`) of
/// checksummed records of its non-zero pages, from `offset`: a 24-byte
/// preamble (`ZYGMEM01`, memory size, offset; u64 little-endian), then
/// records `offset u64 | len u32 | crc32 u32 | data` (CRC-32 of the first
/// 12 bytes and the data; at most 1 MiB of data each, ascending), then an
/// end record (offset = memory size, len 0). A stream without its end
/// record was cut: ask again from the end of the last whole record.
#[utoipa::path(get, path = "/v1/masters/{name}/snapshot/memory", tag = "masters",
    params(("name" = String, Path, description = "Master name"), OffsetQuery),
    responses((status = 200, description = "The memory stream", content_type = "application/octet-stream", body = Vec<u8>), CommonErrors))]
pub async fn memory(
    State(st): State<AppState>,
    Caller(tenant): Caller,
    name: Result<Path<String>, PathRejection>,
    q: Result<Query<OffsetQuery>, QueryRejection>,
) -> Result<Response, ApiError> {
    let Path(name) = name?;
    let Query(q) = q?;
    let dir = st.runtime.master_snapshot(&tenant, &name)?;
    let reader = blocking(move || {
        let snap = snapshotter::open(&dir).map_err(|e| ApiError::internal(e.to_string()))?;
        MemoryReader::open(&snap.memory_path(), snap.manifest.memory.size, q.offset)
            .map_err(|e| ApiError::bad_request(e.to_string()))
    })
    .await?;
    let (tx, rx) = tokio::sync::mpsc::channel::<Result<Bytes, std::io::Error>>(QUEUE);
    tokio::task::spawn_blocking(move || {
        let mut reader = reader;
        loop {
            let piece = match reader.next_piece() {
                Ok(Some(p)) => Ok(Bytes::from(p)),
                Ok(None) => return,
                Err(e) => Err(std::io::Error::other(e.to_string())),
            };
            let failed = piece.is_err();
            // The receiver went away, or the read failed (the stream is
            // then cut, and the receiver resumes).
            if tx.blocking_send(piece).is_err() || failed {
                return;
            }
        }
    });
    let stream = futures_util::stream::unfold(rx, |mut rx| async move {
        rx.recv().await.map(|piece| (piece, rx))
    });
    Ok((
        [(header::CONTENT_TYPE, "application/octet-stream")],
        Body::from_stream(stream),
    )
        .into_response())
}

/// Pull a master from a peer daemon (`from`, its TCP listener) and register
/// it here as `name`: the offer, then the memory stream, checked record by
/// record, resumed where it stopped when the connection breaks (a few
/// attempts), then checked whole (manifest and memory CRCs, and that this
/// host can restore it) before it is registered. Admin only: the daemon
/// sends its peer token to the address given.
#[utoipa::path(post, path = "/v1/masters:fetch", tag = "masters",
    request_body = FetchMaster,
    responses((status = 201, body = MasterFetched), CommonErrors))]
pub async fn fetch(
    State(st): State<AppState>,
    Caller(tenant): Caller,
    body: Result<Json<FetchMaster>, JsonRejection>,
) -> Result<(StatusCode, Json<MasterFetched>), ApiError> {
    let Json(req) = body?;
    if !tenant.admin {
        return Err(ApiError::new(
            StatusCode::FORBIDDEN,
            "admin_only",
            "a fetch sends this daemon's peer token to the address given: only its admin (the Unix socket) may ask for one",
        ));
    }
    let source = req.source_name.unwrap_or_else(|| req.name.clone());
    let out = crate::peer::fetch_master(
        &st.runtime,
        &tenant,
        &req.from,
        st.peer_token.as_deref(),
        &source,
        &req.name,
    )
    .await?;
    Ok((StatusCode::CREATED, Json(out)))
}
