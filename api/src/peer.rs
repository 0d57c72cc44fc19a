//! Pulling a master from a peer daemon: the HTTP half of a transfer (the
//! format and the checks are `host::transfer`'s). The daemon's
//! `POST /v1/masters:fetch` calls [`fetch_master`], and so may anything in
//! the daemon that decides a master should come here (a cluster agent).
//!
//! It must not: hold a memory stream in memory (pieces go through a small
//! queue to a blocking writer), leave a half-registered master, or retry
//! what cannot succeed (an unknown master, a refused token, corruption).

use std::sync::Arc;
use std::time::{Duration, Instant};

use axum::http::StatusCode;
use host::runtime::{Runtime, Tenant};
use host::transfer::{Offer, Sink, TransferError};
use hyper::body::Bytes;

use crate::client::{segment, Client, ClientError, Endpoint};
use crate::error::ApiError;
use crate::types::{MasterFetched, TransferStats};

/// Memory streams one fetch opens at most (the first and its resumptions).
pub const MAX_ATTEMPTS: u32 = 5;
/// Pieces queued between the connection and the disk writer.
const QUEUE: usize = 8;

/// Pulls master `source_name` from the daemon at `from` (`http://HOST:PORT`)
/// with bearer `token`, and registers it here as `name` of `tenant`.
///
/// Errors, as the daemon answers them: 404 `not_found` (no such master at
/// the peer, for that token's tenant), 409 `conflict` (`name` exists here,
/// or is being fetched), 422 `transfer_corrupt` (a record failed its
/// checksum; nothing kept) or `bad_snapshot` (the whole snapshot's checks,
/// or this host cannot restore it: another CPU or KVM), 502 `peer_error`
/// (the peer refused, answered nonsense, or kept breaking the stream), 400
/// for a bad `from` or name. Nothing is registered on any error; a partial
/// transfer cut by the network is kept (`STATE_DIR/transfers/`) and the
/// next fetch of the same master resumes it.
pub async fn fetch_master(
    runtime: &Arc<Runtime>,
    tenant: &Tenant,
    from: &str,
    token: Option<&str>,
    source_name: &str,
    name: &str,
) -> Result<MasterFetched, ApiError> {
    let t0 = Instant::now();
    let endpoint = match Endpoint::parse(from) {
        Ok(e @ Endpoint::Tcp(_)) => e,
        _ => {
            return Err(ApiError::bad_request(format!(
                "from must be a peer daemon's http://HOST:PORT (got {from:?})"
            )))
        }
    };
    let store_name = runtime.master_store_name(tenant, name)?;
    if runtime.master(tenant, name).is_ok() {
        return Err(ApiError::new(
            StatusCode::CONFLICT,
            "conflict",
            format!("a master named {name:?} exists already"),
        ));
    }
    let client = Client::new(endpoint, token.map(str::to_string));
    let base = format!("/v1/masters/{}/snapshot", segment(source_name));
    let peer = |e: ClientError| peer_error(from, source_name, e);
    let mut stats = TransferStats {
        memory_bytes: 0,
        payload_bytes: 0,
        wire_bytes: 0,
        attempts: 0,
        resumed: 0,
        seconds: 0.0,
        mib_per_s: 0.0,
    };
    let mut last_cut = String::new();
    loop {
        if stats.attempts >= MAX_ATTEMPTS {
            return Err(ApiError::new(
                StatusCode::BAD_GATEWAY,
                "peer_error",
                format!(
                    "fetching master {source_name:?} from {from}: {MAX_ATTEMPTS} attempts were cut ({last_cut}); the partial transfer is kept, fetch again to resume"
                ),
            ));
        }
        if stats.attempts > 0 {
            tokio::time::sleep(Duration::from_millis(200 << stats.attempts.min(4))).await;
        }
        stats.attempts += 1;
        // The offer, every attempt: a resumption must be of the same snapshot.
        let answer = match client.get(&format!("{base}/offer")).await {
            Ok(a) => a,
            Err(e) if retryable(&e) => {
                last_cut = e.to_string();
                continue;
            }
            Err(e) => return Err(peer(e)),
        };
        stats.wire_bytes += answer.body.len() as u64;
        if !answer.status.is_success() {
            return Err(peer(
                answer
                    .ok()
                    .err()
                    .unwrap_or(ClientError::Http("an error without a body".into())),
            ));
        }
        let offer: Offer = serde_json::from_slice(&answer.body).map_err(|e| {
            ApiError::new(
                StatusCode::BAD_GATEWAY,
                "peer_error",
                format!("{from} sent an offer this zygote cannot read: {e}"),
            )
        })?;
        stats.memory_bytes = offer.memory_size;
        stats.payload_bytes = offer.payload_bytes;
        let store = runtime.store().clone();
        let sn = store_name.clone();
        let mut sink =
            crate::blocking(move || Sink::open(&store, &sn, &offer).map_err(transfer_error))
                .await?;
        let offset = sink.resume_offset();
        if offset > 0 {
            stats.resumed += 1;
        }
        let mut body = match client
            .get_stream(&format!("{base}/memory?offset={offset}"))
            .await
        {
            Ok(b) => b,
            Err(e) if retryable(&e) => {
                last_cut = e.to_string();
                continue;
            }
            Err(e) => return Err(peer(e)),
        };
        // Bytes go to a blocking writer through a small queue.
        let (tx, mut rx) = tokio::sync::mpsc::channel::<Bytes>(QUEUE);
        let writer = tokio::task::spawn_blocking(move || {
            sink.begin();
            let mut result = Ok(());
            while let Some(b) = rx.blocking_recv() {
                if let Err(e) = sink.feed(&b) {
                    result = Err(e);
                    break;
                }
            }
            drop(rx);
            if result.is_ok() {
                result = sink.end_stream();
            }
            (sink, result)
        });
        let mut broke = None;
        while let Some(piece) = body.next_chunk().await {
            match piece {
                Ok(b) => {
                    stats.wire_bytes += b.len() as u64;
                    if tx.send(b).await.is_err() {
                        break;
                    }
                }
                Err(e) => {
                    broke = Some(e);
                    break;
                }
            }
        }
        drop(tx);
        drop(body);
        let (sink, result) = writer
            .await
            .map_err(|e| ApiError::internal(format!("transfer writer failed: {e}")))?;
        match result {
            Ok(()) => {
                let rt = runtime.clone();
                let tenant = tenant.clone();
                let name = name.to_string();
                let master = crate::blocking(move || {
                    let mut sink = sink;
                    let registered = sink.finish().map_err(transfer_error).and_then(|dir| {
                        rt.receive_master(&tenant, &dir, &name)
                            .map_err(ApiError::from)
                    });
                    if registered.is_err() {
                        sink.discard();
                    }
                    registered
                })
                .await?;
                stats.seconds = t0.elapsed().as_secs_f64();
                stats.mib_per_s =
                    stats.wire_bytes as f64 / (1 << 20) as f64 / stats.seconds.max(1e-9);
                tracing::info!(
                    master = %store_name, from, attempts = stats.attempts,
                    wire_bytes = stats.wire_bytes, seconds = stats.seconds,
                    "master fetched"
                );
                return Ok(MasterFetched {
                    master,
                    transfer: stats,
                });
            }
            Err(TransferError::Cut { at }) => {
                last_cut = match broke {
                    Some(e) => format!("at memory offset {at}: {e}"),
                    None => format!("at memory offset {at}"),
                };
                tracing::warn!(master = %store_name, from, "transfer cut {last_cut}; resuming");
            }
            Err(e) => {
                let e = transfer_error(e);
                crate::blocking(move || {
                    sink.discard();
                    Ok::<_, ApiError>(())
                })
                .await?;
                return Err(e);
            }
        }
    }
}

/// Whether a call failed on the way (worth another attempt) rather than
/// with an answer.
fn retryable(e: &ClientError) -> bool {
    matches!(e, ClientError::Connect { .. } | ClientError::Http(_))
}

/// A peer's refusal as this daemon reports it: a master the peer does not
/// have is 404 here too; anything else is the peer's fault (502).
fn peer_error(from: &str, source_name: &str, e: ClientError) -> ApiError {
    match e {
        ClientError::Api {
            status, message, ..
        } if status == StatusCode::NOT_FOUND => ApiError::not_found(format!(
            "peer {from}: {message} (no master {source_name:?} there for this daemon's peer token)"
        )),
        e => ApiError::new(
            StatusCode::BAD_GATEWAY,
            "peer_error",
            format!("fetching master {source_name:?} from {from}: {e}"),
        ),
    }
}

/// A transfer's failure as an API error.
fn transfer_error(e: TransferError) -> ApiError {
    e.into()
}

impl From<TransferError> for ApiError {
    fn from(e: TransferError) -> Self {
        match e {
            TransferError::Corrupt(_) => ApiError::new(
                StatusCode::UNPROCESSABLE_ENTITY,
                "transfer_corrupt",
                format!("{e}; nothing was kept"),
            ),
            TransferError::Busy(_) => {
                ApiError::new(StatusCode::CONFLICT, "conflict", e.to_string())
            }
            TransferError::BadOffer(_) | TransferError::Cut { .. } => {
                ApiError::new(StatusCode::BAD_GATEWAY, "peer_error", e.to_string())
            }
            TransferError::Master(m) => ApiError::from(host::runtime::RuntimeError::Master(m)),
            TransferError::Io { .. } => ApiError::internal(e.to_string()),
        }
    }
}
