//! Running commands in an instance: a short form (`POST .../exec`, output
//! collected and capped) and a streamed form (`GET .../exec/ws`, a
//! WebSocket carrying the agent protocol's own frames).
//!
//! The WebSocket: the client's first message is text, an `ExecStart` JSON
//! object (`argv`, `env`, `cwd`, `timeout_ms`); then each binary message
//! from the client is stdin bytes (an empty one closes stdin), and each
//! binary message from the server is one agent frame exactly as the agent
//! sent it (`proto::AgentFrame`: stdout, stderr, and last the response
//! with the exit status). The server closes the socket after that.

use std::collections::BTreeMap;

use axum::extract::rejection::{JsonRejection, PathRejection};
use axum::extract::ws::{Message, WebSocket, WebSocketUpgrade};
use axum::extract::{Path, State};
use axum::response::Response;
use axum::Json;
use base64::Engine;
use proto::{ExecRequest, Frame, HostFrame, Request, HEADER_LEN, MAX_FRAME_LEN};
use serde::Deserialize;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use utoipa::ToSchema;

use crate::auth::Caller;
use crate::error::{ApiError, CommonErrors};
use crate::types::{Exec, ExecResult};
use crate::{blocking, AppState};

fn exec_request(
    argv: Vec<String>,
    env: BTreeMap<String, String>,
    cwd: Option<String>,
    timeout_ms: Option<u64>,
) -> Result<ExecRequest, ApiError> {
    if argv.is_empty() || argv.len() > 4096 || argv[0].is_empty() {
        return Err(ApiError::bad_request(
            "argv must hold 1..=4096 entries, the first one not empty",
        ));
    }
    if argv
        .iter()
        .chain(env.keys())
        .chain(env.values())
        .any(|a| a.contains('\0'))
    {
        return Err(ApiError::bad_request(
            "argv and env must not contain NUL bytes",
        ));
    }
    if env.keys().any(|k| k.is_empty() || k.contains('=')) {
        return Err(ApiError::bad_request(
            "env names must be non-empty and without '='",
        ));
    }
    if let Some(t) = timeout_ms {
        if !(1..=86_400_000).contains(&t) {
            return Err(ApiError::bad_request(format!(
                "timeout_ms must be 1..=86400000 (got {t})"
            )));
        }
    }
    let mut req = ExecRequest::new(argv);
    req.env = env.into_iter().collect();
    req.cwd = cwd;
    req.timeout_ms = timeout_ms;
    Ok(req)
}

/// Run a command and wait for it; stdout and stderr come back apart,
/// each capped (the cap is in the answer).
#[utoipa::path(post, path = "/v1/instances/{id}/exec", tag = "exec",
    params(("id" = String, Path, description = "Instance id")),
    request_body = Exec,
    responses((status = 200, body = ExecResult), CommonErrors))]
pub async fn exec(
    State(st): State<AppState>,
    Caller(tenant): Caller,
    id: Result<Path<String>, PathRejection>,
    body: Result<Json<Exec>, JsonRejection>,
) -> Result<Json<ExecResult>, ApiError> {
    let Path(id) = id?;
    let Json(e) = body?;
    let stdin = match (e.stdin, e.stdin_base64) {
        (Some(_), Some(_)) => {
            return Err(ApiError::bad_request(
                "give stdin or stdin_base64, not both",
            ))
        }
        (Some(t), None) => t.into_bytes(),
        (None, Some(b)) => base64::engine::general_purpose::STANDARD
            .decode(b.trim())
            .map_err(|err| ApiError::bad_request(format!("stdin_base64 is not base64: {err}")))?,
        (None, None) => Vec::new(),
    };
    let req = exec_request(e.argv, e.env, e.cwd, e.timeout_ms)?;
    let rt = st.runtime.clone();
    let out = blocking(move || rt.exec(&tenant, &id, req, stdin)).await?;
    Ok(Json(ExecResult {
        exit_code: out.exit_code,
        signal: out.signal,
        timed_out: out.timed_out,
        stdout: String::from_utf8_lossy(&out.stdout).into_owned(),
        stderr: String::from_utf8_lossy(&out.stderr).into_owned(),
        stdout_truncated: out.stdout_truncated,
        stderr_truncated: out.stderr_truncated,
        output_cap_bytes: host::runtime::EXEC_OUTPUT_CAP as u64,
    }))
}

/// The first message of a streamed exec.
#[derive(Debug, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct ExecStart {
    /// Program and arguments (1..=4096 entries).
    #[schema(min_items = 1, max_items = 4096)]
    pub argv: Vec<String>,
    /// Extra environment variables.
    #[serde(default)]
    pub env: BTreeMap<String, String>,
    /// Working directory.
    #[serde(default)]
    pub cwd: Option<String>,
    /// Kill the command after this many ms.
    #[serde(default)]
    pub timeout_ms: Option<u64>,
}

/// Run a command with streamed stdin, stdout and stderr over a WebSocket
/// (see the module docs for the messages).
#[utoipa::path(get, path = "/v1/instances/{id}/exec/ws", tag = "exec",
    params(("id" = String, Path, description = "Instance id")),
    responses((status = 101, description = "Switching to the WebSocket protocol"), CommonErrors))]
pub async fn exec_ws(
    State(st): State<AppState>,
    Caller(tenant): Caller,
    id: Result<Path<String>, PathRejection>,
    ws: Result<WebSocketUpgrade, axum::extract::ws::rejection::WebSocketUpgradeRejection>,
) -> Result<Response, ApiError> {
    let Path(id) = id?;
    let ws = ws.map_err(|r| {
        ApiError::bad_request(format!("not a WebSocket upgrade: {}", r.body_text()))
    })?;
    // Refuse before upgrading when the instance cannot be reached.
    let rt = st.runtime.clone();
    let agent = blocking(move || rt.connect_agent(&tenant, &id)).await?;
    let stream = agent
        .into_stream()
        .and_then(|s| {
            s.set_nonblocking(true)?;
            tokio::net::UnixStream::from_std(s)
        })
        .map_err(|e| ApiError::internal(format!("agent connection: {e}")))?;
    Ok(ws
        .max_message_size(MAX_FRAME_LEN + 64)
        .on_upgrade(move |socket| relay(socket, stream)))
}

async fn relay(mut socket: WebSocket, agent: tokio::net::UnixStream) {
    let fail =
        |m: String| Message::Text(format!("{{\"error\":{}}}", serde_json::Value::String(m)).into());
    // The start message.
    let start = match socket.recv().await {
        Some(Ok(Message::Text(t))) => serde_json::from_str::<ExecStart>(t.as_str())
            .map_err(|e| format!("bad start message: {e}"))
            .and_then(|s| exec_request(s.argv, s.env, s.cwd, s.timeout_ms).map_err(|e| e.message)),
        _ => Err("the first message must be a text ExecStart".to_string()),
    };
    let mut req = match start {
        Ok(r) => r,
        Err(m) => {
            let _ = socket.send(fail(m)).await;
            return;
        }
    };
    req.stdin = true;
    let (mut rd, mut wr) = agent.into_split();
    let mut buf = Vec::new();
    if HostFrame::Request(Request::Exec(req))
        .write_to(&mut buf)
        .is_err()
        || wr.write_all(&buf).await.is_err()
    {
        let _ = socket.send(fail("cannot reach the agent".into())).await;
        return;
    }
    let (mut ws_tx, mut ws_rx) = futures_util::StreamExt::split(socket);
    use futures_util::{SinkExt, StreamExt};
    // stdin: client -> agent.
    let stdin = tokio::spawn(async move {
        while let Some(Ok(msg)) = ws_rx.next().await {
            let data = match msg {
                Message::Binary(b) => b.to_vec(),
                Message::Close(_) => break,
                _ => continue,
            };
            for chunk in data
                .chunks(proto::MAX_PAYLOAD_LEN)
                .chain(data.is_empty().then_some(&[][..]))
            {
                let mut buf = Vec::new();
                if HostFrame::Stdin(chunk.to_vec()).write_to(&mut buf).is_err()
                    || wr.write_all(&buf).await.is_err()
                {
                    return;
                }
            }
        }
    });
    // Frames: agent -> client, until the response that ends the command.
    loop {
        let mut header = [0u8; HEADER_LEN];
        if rd.read_exact(&mut header).await.is_err() {
            let _ = ws_tx.send(fail("the agent connection ended".into())).await;
            break;
        }
        let len = u32::from_le_bytes([header[0], header[1], header[2], header[3]]) as usize;
        if len == 0 || len > MAX_FRAME_LEN {
            let _ = ws_tx
                .send(fail(format!("bad frame length {len} from the agent")))
                .await;
            break;
        }
        let mut frame = header.to_vec();
        frame.resize(HEADER_LEN + len - 1, 0);
        if rd.read_exact(&mut frame[HEADER_LEN..]).await.is_err() {
            let _ = ws_tx.send(fail("the agent connection ended".into())).await;
            break;
        }
        // The command ends with a control frame that is not `started`:
        // its exit status, or an error.
        let last = header[4] == proto::FrameKind::Control as u8
            && !matches!(
                serde_json::from_slice::<proto::Response>(&frame[HEADER_LEN..]),
                Ok(proto::Response::Started { .. })
            );
        if ws_tx.send(Message::Binary(frame.into())).await.is_err() {
            break;
        }
        if last {
            break;
        }
    }
    stdin.abort();
    let _ = ws_tx.send(Message::Close(None)).await;
}
