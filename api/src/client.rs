//! A client of the daemon's API, over its Unix socket or TCP: what the CLI's
//! remote mode, the end-to-end tests and `bench api` use. One HTTP/1.1
//! connection per request (hyper), JSON in and out, errors as the daemon
//! sent them, and the streamed exec's WebSocket (tokio-tungstenite).
//! Path parts that come from users go through [`segment`].
//!
//! It must not: retry on its own (a caller decides), or hide an error body.

use std::path::PathBuf;

use http_body_util::{BodyExt, Full};
use hyper::body::Bytes;
/// HTTP status codes, as [`Answer::status`] and [`ClientError::Api`] carry them.
pub use hyper::StatusCode;
use hyper::{Method, Request};
use hyper_util::rt::TokioIo;
use serde::de::DeserializeOwned;
use tokio::io::{AsyncRead, AsyncWrite};

/// Where the daemon is.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Endpoint {
    /// A Unix socket (the host's admin).
    Unix(PathBuf),
    /// `host:port` over TCP.
    Tcp(String),
}

impl Endpoint {
    /// Parses `unix:PATH`, `unix://PATH`, `http://HOST:PORT` or `HOST:PORT`.
    pub fn parse(s: &str) -> Result<Self, ClientError> {
        if let Some(p) = s
            .strip_prefix("unix://")
            .or_else(|| s.strip_prefix("unix:"))
        {
            if p.is_empty() {
                return Err(ClientError::Url(s.to_string()));
            }
            return Ok(Endpoint::Unix(p.into()));
        }
        let hostport = s.strip_prefix("http://").unwrap_or(s).trim_end_matches('/');
        if hostport.is_empty() || hostport.contains('/') || !hostport.contains(':') {
            return Err(ClientError::Url(s.to_string()));
        }
        Ok(Endpoint::Tcp(hostport.to_string()))
    }
}

/// `s` as one path segment: every byte but `A-Z a-z 0-9 - . _ ~` is
/// percent-encoded, so an id like `a/../b?force=true` names one object and
/// cannot reach another route or add a query.
pub fn segment(s: &str) -> String {
    let mut out = String::with_capacity(s.len());
    for b in s.bytes() {
        if b.is_ascii_alphanumeric() || b"-._~".contains(&b) {
            out.push(b as char);
        } else {
            out.push_str(&format!("%{b:02X}"));
        }
    }
    out
}

/// Largest stdin message [`ExecInput::send`] sends; the daemon refuses
/// WebSocket messages above one agent frame.
pub const STDIN_CHUNK: usize = 64 * 1024;

/// Errors of a call.
#[derive(Debug, thiserror::Error)]
pub enum ClientError {
    /// Not an endpoint.
    #[error("{0:?} is not a daemon address: use unix:PATH or http://HOST:PORT")]
    Url(String),
    /// The daemon could not be reached.
    #[error("cannot reach the zygote daemon at {endpoint}")]
    Connect {
        /// Where.
        endpoint: String,
        /// Why.
        #[source]
        source: std::io::Error,
    },
    /// HTTP failed.
    #[error("HTTP: {0}")]
    Http(String),
    /// The daemon answered with an error.
    #[error("{message} ({status}, {code})")]
    Api {
        /// Status.
        status: StatusCode,
        /// The error's code.
        code: String,
        /// The error's message.
        message: String,
    },
    /// The answer was not what the route documents.
    #[error("unexpected answer ({status}): {body}")]
    Unexpected {
        /// Status.
        status: StatusCode,
        /// Body (the start of it).
        body: String,
    },
}

/// A raw answer.
#[derive(Debug, Clone)]
pub struct Answer {
    /// Status.
    pub status: StatusCode,
    /// Headers.
    pub headers: hyper::HeaderMap,
    /// Body.
    pub body: Bytes,
}

impl Answer {
    /// The body as JSON.
    pub fn json(&self) -> serde_json::Value {
        serde_json::from_slice(&self.body).unwrap_or(serde_json::Value::Null)
    }

    /// The body as text.
    pub fn text(&self) -> String {
        String::from_utf8_lossy(&self.body).into_owned()
    }

    /// Decodes a 2xx body as `T`; an error body as [`ClientError::Api`].
    pub fn decode<T: DeserializeOwned>(&self) -> Result<T, ClientError> {
        if !self.status.is_success() {
            let v = self.json();
            return match (v["error"]["code"].as_str(), v["error"]["message"].as_str()) {
                (Some(code), Some(message)) => Err(ClientError::Api {
                    status: self.status,
                    code: code.to_string(),
                    message: message.to_string(),
                }),
                _ => Err(self.unexpected()),
            };
        }
        serde_json::from_slice(&self.body).map_err(|_| self.unexpected())
    }

    /// Checks a body-less answer (`204`): `Ok` for 2xx, else the error as
    /// [`Answer::decode`] reports it.
    pub fn ok(&self) -> Result<(), ClientError> {
        if self.status.is_success() {
            return Ok(());
        }
        self.decode::<serde_json::Value>().map(|_| ())
    }

    fn unexpected(&self) -> ClientError {
        let text = self.text();
        ClientError::Unexpected {
            status: self.status,
            body: text.chars().take(500).collect(),
        }
    }
}

/// A byte stream to the daemon.
pub trait Conn: AsyncRead + AsyncWrite + Unpin + Send + 'static {}
impl<T: AsyncRead + AsyncWrite + Unpin + Send + 'static> Conn for T {}

/// A client.
#[derive(Debug, Clone)]
pub struct Client {
    /// Where the daemon is.
    pub endpoint: Endpoint,
    /// Bearer token (TCP).
    pub token: Option<String>,
}

impl Client {
    /// A client of the daemon at `endpoint`.
    pub fn new(endpoint: Endpoint, token: Option<String>) -> Self {
        Client { endpoint, token }
    }

    fn describe(&self) -> String {
        match &self.endpoint {
            Endpoint::Unix(p) => format!("unix:{}", p.display()),
            Endpoint::Tcp(h) => format!("http://{h}"),
        }
    }

    /// Opens a connection.
    pub async fn connect(&self) -> Result<Box<dyn Conn>, ClientError> {
        let err = |source| ClientError::Connect {
            endpoint: self.describe(),
            source,
        };
        Ok(match &self.endpoint {
            Endpoint::Unix(p) => Box::new(tokio::net::UnixStream::connect(p).await.map_err(err)?),
            Endpoint::Tcp(h) => {
                let s = tokio::net::TcpStream::connect(h).await.map_err(err)?;
                let _ = s.set_nodelay(true);
                Box::new(s)
            }
        })
    }

    fn host_header(&self) -> String {
        match &self.endpoint {
            Endpoint::Unix(_) => "localhost".into(),
            Endpoint::Tcp(h) => h.clone(),
        }
    }

    /// Sends one request and returns its answer's head and body unread,
    /// with the task that drives the connection (abort it when done).
    async fn request(
        &self,
        method: Method,
        path: &str,
        content_type: Option<&str>,
        body: Vec<u8>,
    ) -> Result<
        (
            hyper::http::response::Parts,
            hyper::body::Incoming,
            tokio::task::JoinHandle<hyper::Result<()>>,
        ),
        ClientError,
    > {
        let conn = self.connect().await?;
        let (mut sender, connection) = hyper::client::conn::http1::handshake(TokioIo::new(conn))
            .await
            .map_err(|e| ClientError::Http(e.to_string()))?;
        let driver = tokio::spawn(connection);
        let mut req = Request::builder()
            .method(method)
            .uri(path)
            .header(hyper::header::HOST, self.host_header());
        if let Some(ct) = content_type {
            req = req.header(hyper::header::CONTENT_TYPE, ct);
        }
        if let Some(t) = &self.token {
            req = req.header(hyper::header::AUTHORIZATION, format!("Bearer {t}"));
        }
        let req = req
            .body(Full::new(Bytes::from(body)))
            .map_err(|e| ClientError::Http(e.to_string()))?;
        let resp = match sender.send_request(req).await {
            Ok(r) => r,
            Err(e) => {
                driver.abort();
                return Err(ClientError::Http(e.to_string()));
            }
        };
        let (parts, body) = resp.into_parts();
        Ok((parts, body, driver))
    }

    /// Sends one request with a raw body (`content_type` when given).
    pub async fn send(
        &self,
        method: Method,
        path: &str,
        content_type: Option<&str>,
        body: Vec<u8>,
    ) -> Result<Answer, ClientError> {
        let (parts, body, driver) = self.request(method, path, content_type, body).await?;
        let body = body.collect().await.map(|b| b.to_bytes());
        driver.abort();
        Ok(Answer {
            status: parts.status,
            headers: parts.headers,
            body: body.map_err(|e| ClientError::Http(e.to_string()))?,
        })
    }

    /// `GET path` whose (2xx) body is read as it arrives, never held whole
    /// (a master's memory stream is GiBs). An error answer is read whole
    /// and returned as [`Answer::decode`] reports it.
    pub async fn get_stream(&self, path: &str) -> Result<BodyStream, ClientError> {
        let (parts, body, driver) = self.request(Method::GET, path, None, Vec::new()).await?;
        if !parts.status.is_success() {
            let body = body.collect().await.map(|b| b.to_bytes());
            driver.abort();
            let answer = Answer {
                status: parts.status,
                headers: parts.headers,
                body: body.map_err(|e| ClientError::Http(e.to_string()))?,
            };
            return Err(answer
                .decode::<serde_json::Value>()
                .err()
                .unwrap_or_else(|| answer.unexpected()));
        }
        Ok(BodyStream {
            status: parts.status,
            headers: parts.headers,
            body,
            driver,
        })
    }

    /// `GET path`.
    pub async fn get(&self, path: &str) -> Result<Answer, ClientError> {
        self.send(Method::GET, path, None, Vec::new()).await
    }

    /// `DELETE path`.
    pub async fn delete(&self, path: &str) -> Result<Answer, ClientError> {
        self.send(Method::DELETE, path, None, Vec::new()).await
    }

    /// `POST path` with a JSON body.
    pub async fn post(&self, path: &str, body: &serde_json::Value) -> Result<Answer, ClientError> {
        self.send(
            Method::POST,
            path,
            Some("application/json"),
            serde_json::to_vec(body).unwrap_or_default(),
        )
        .await
    }

    /// Opens the streamed exec's WebSocket and sends the start message
    /// (`argv`, `env`, `cwd`, `timeout_ms`): see [`crate::routes::exec`].
    pub async fn exec_ws(
        &self,
        id: &str,
        start: &serde_json::Value,
    ) -> Result<ExecSocket, ClientError> {
        use futures_util::SinkExt;
        use tokio_tungstenite::tungstenite::client::IntoClientRequest;
        use tokio_tungstenite::tungstenite::Message;
        let conn = self.connect().await?;
        let url = format!(
            "ws://{}/v1/instances/{}/exec/ws",
            self.host_header(),
            segment(id)
        );
        let mut req = url
            .into_client_request()
            .map_err(|e| ClientError::Http(e.to_string()))?;
        if let Some(t) = &self.token {
            // A token that is not a header value is an error, not a request
            // sent without it (which would come back as a puzzling 401).
            let v = format!("Bearer {t}")
                .parse()
                .map_err(|_| ClientError::Http("the token is not a valid header value".into()))?;
            req.headers_mut().insert(hyper::header::AUTHORIZATION, v);
        }
        let (mut ws, _) = match tokio_tungstenite::client_async(req, conn).await {
            Ok(x) => x,
            Err(tokio_tungstenite::tungstenite::Error::Http(resp)) => {
                let status = StatusCode::from_u16(resp.status().as_u16())
                    .unwrap_or(StatusCode::INTERNAL_SERVER_ERROR);
                let body = resp.body().clone().unwrap_or_default();
                return Err(Answer {
                    status,
                    headers: Default::default(),
                    body: Bytes::from(body),
                }
                .decode::<serde_json::Value>()
                .err()
                .unwrap_or(ClientError::Http("WebSocket refused".into())));
            }
            Err(e) => return Err(ClientError::Http(e.to_string())),
        };
        ws.send(Message::Text(start.to_string().into()))
            .await
            .map_err(|e| ClientError::Http(e.to_string()))?;
        Ok(ExecSocket { ws })
    }
}

/// A 2xx answer whose body is being read ([`Client::get_stream`]).
#[derive(Debug)]
pub struct BodyStream {
    /// Status.
    pub status: StatusCode,
    /// Headers.
    pub headers: hyper::HeaderMap,
    body: hyper::body::Incoming,
    driver: tokio::task::JoinHandle<hyper::Result<()>>,
}

impl BodyStream {
    /// The next bytes of the body; `None` at its (clean) end. An error
    /// when the connection broke before the end.
    pub async fn next_chunk(&mut self) -> Option<Result<Bytes, ClientError>> {
        loop {
            match self.body.frame().await? {
                Ok(frame) => {
                    if let Ok(data) = frame.into_data() {
                        return Some(Ok(data));
                    }
                }
                Err(e) => return Some(Err(ClientError::Http(e.to_string()))),
            }
        }
    }
}

impl Drop for BodyStream {
    fn drop(&mut self) {
        self.driver.abort();
    }
}

/// An open streamed exec.
pub struct ExecSocket {
    ws: WsStream,
}

type WsStream = tokio_tungstenite::WebSocketStream<Box<dyn Conn>>;
type WsMessage = tokio_tungstenite::tungstenite::Message;

/// What arrives on a streamed exec.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ExecEvent {
    /// Standard output bytes.
    Stdout(Vec<u8>),
    /// Standard error bytes.
    Stderr(Vec<u8>),
    /// The command ended.
    Exited(proto::ExitStatus),
    /// The agent refused or failed the command (`NotFound` when `argv[0]`
    /// does not exist, `PermissionDenied` when it cannot be run, ...).
    Refused {
        /// What kind of failure.
        code: proto::ErrorCode,
        /// The agent's message.
        message: String,
    },
    /// The daemon failed, or the connection did.
    Error(String),
}

impl ExecSocket {
    /// Sends stdin bytes (empty: closes the command's stdin), in messages
    /// of at most [`STDIN_CHUNK`] bytes.
    pub async fn stdin(&mut self, data: Vec<u8>) -> Result<(), ClientError> {
        send_stdin(&mut self.ws, data).await
    }

    /// The next event; `None` when the socket closed.
    pub async fn next(&mut self) -> Option<ExecEvent> {
        next_event(&mut self.ws).await
    }

    /// Splits the socket so that stdin can be sent while events are read
    /// (a command that reads its input while it writes needs both at once).
    pub fn split(self) -> (ExecInput, ExecEvents) {
        let (tx, rx) = futures_util::StreamExt::split(self.ws);
        (ExecInput { tx }, ExecEvents { rx })
    }
}

/// The sending half of a split [`ExecSocket`].
pub struct ExecInput {
    tx: futures_util::stream::SplitSink<WsStream, WsMessage>,
}

impl ExecInput {
    /// As [`ExecSocket::stdin`].
    pub async fn send(&mut self, data: Vec<u8>) -> Result<(), ClientError> {
        send_stdin(&mut self.tx, data).await
    }
}

/// The receiving half of a split [`ExecSocket`].
pub struct ExecEvents {
    rx: futures_util::stream::SplitStream<WsStream>,
}

impl ExecEvents {
    /// As [`ExecSocket::next`].
    pub async fn next(&mut self) -> Option<ExecEvent> {
        next_event(&mut self.rx).await
    }
}

async fn send_stdin<S>(sink: &mut S, data: Vec<u8>) -> Result<(), ClientError>
where
    S: futures_util::Sink<WsMessage, Error = tokio_tungstenite::tungstenite::Error> + Unpin,
{
    use futures_util::SinkExt;
    let err = |e: tokio_tungstenite::tungstenite::Error| ClientError::Http(e.to_string());
    if data.is_empty() {
        return sink
            .send(WsMessage::Binary(Vec::new().into()))
            .await
            .map_err(err);
    }
    for chunk in data.chunks(STDIN_CHUNK) {
        sink.send(WsMessage::Binary(chunk.to_vec().into()))
            .await
            .map_err(err)?;
    }
    Ok(())
}

async fn next_event<S>(stream: &mut S) -> Option<ExecEvent>
where
    S: futures_core::Stream<Item = Result<WsMessage, tokio_tungstenite::tungstenite::Error>>
        + Unpin,
{
    use futures_util::StreamExt;
    loop {
        let msg = match stream.next().await? {
            Ok(m) => m,
            Err(e) => return Some(ExecEvent::Error(e.to_string())),
        };
        match msg {
            WsMessage::Binary(b) => match decode_frame(&b) {
                Some(ev) => return Some(ev),
                None => continue,
            },
            WsMessage::Text(t) => return Some(text_event(t.as_str())),
            WsMessage::Close(_) => return None,
            _ => continue,
        }
    }
}

/// One agent frame as the daemon relays it; `None` for frames that carry
/// nothing for the caller (`started`).
fn decode_frame(b: &[u8]) -> Option<ExecEvent> {
    use proto::{AgentFrame, Frame, Response};
    Some(match AgentFrame::decode(b) {
        Ok(Some((AgentFrame::Stdout(d), _))) => ExecEvent::Stdout(d),
        Ok(Some((AgentFrame::Stderr(d), _))) => ExecEvent::Stderr(d),
        Ok(Some((AgentFrame::Response(Response::Exited(s)), _))) => ExecEvent::Exited(s),
        Ok(Some((AgentFrame::Response(Response::Started { .. }), _))) => return None,
        Ok(Some((AgentFrame::Response(Response::Error { code, message }), _))) => {
            ExecEvent::Refused { code, message }
        }
        Ok(Some((other, _))) => ExecEvent::Error(format!("unexpected frame {other:?}")),
        Ok(None) | Err(_) => ExecEvent::Error("a malformed frame from the daemon".into()),
    })
}

/// A text message from the daemon: `{"error": "..."}`.
fn text_event(t: &str) -> ExecEvent {
    let v: serde_json::Value = serde_json::from_str(t).unwrap_or_default();
    ExecEvent::Error(v["error"].as_str().unwrap_or(t).to_string())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn endpoints_parse() {
        assert_eq!(
            Endpoint::parse("unix:/run/zygote/zygote.sock").unwrap(),
            Endpoint::Unix("/run/zygote/zygote.sock".into())
        );
        assert_eq!(
            Endpoint::parse("unix:///s").unwrap(),
            Endpoint::Unix("/s".into())
        );
        assert_eq!(
            Endpoint::parse("http://127.0.0.1:7070/").unwrap(),
            Endpoint::Tcp("127.0.0.1:7070".into())
        );
        assert_eq!(
            Endpoint::parse("10.0.0.2:7070").unwrap(),
            Endpoint::Tcp("10.0.0.2:7070".into())
        );
        for bad in ["", "unix:", "http://", "https//x", "host"] {
            assert!(Endpoint::parse(bad).is_err(), "{bad}");
        }
    }
    #[test]
    fn segments_cannot_leave_their_place() {
        assert_eq!(segment("demo-1.x_y~"), "demo-1.x_y~");
        assert_eq!(segment("a/../b?force=true"), "a%2F..%2Fb%3Fforce%3Dtrue");
        assert_eq!(segment("é"), "%C3%A9");
        assert_eq!(segment("a b#c"), "a%20b%23c");
    }

    #[test]
    fn agent_frames_become_events() {
        use proto::{AgentFrame, ErrorCode, ExitStatus, Frame, Response};
        let enc = |f: AgentFrame| f.encode().unwrap();
        assert_eq!(
            decode_frame(&enc(AgentFrame::Stdout(b"out".to_vec()))),
            Some(ExecEvent::Stdout(b"out".to_vec()))
        );
        assert_eq!(
            decode_frame(&enc(AgentFrame::Stderr(b"err".to_vec()))),
            Some(ExecEvent::Stderr(b"err".to_vec()))
        );
        assert_eq!(
            decode_frame(&enc(AgentFrame::Response(Response::Started { pid: 7 }))),
            None
        );
        let st = ExitStatus {
            code: Some(3),
            signal: None,
            timed_out: false,
        };
        assert_eq!(
            decode_frame(&enc(AgentFrame::Response(Response::Exited(st)))),
            Some(ExecEvent::Exited(st))
        );
        // The agent's error code survives the relay: the CLI exits 127 on it.
        assert_eq!(
            decode_frame(&enc(AgentFrame::Response(Response::Error {
                code: ErrorCode::NotFound,
                message: "nope: not found".into(),
            }))),
            Some(ExecEvent::Refused {
                code: ErrorCode::NotFound,
                message: "nope: not found".into()
            })
        );
        assert!(matches!(decode_frame(b"\x01"), Some(ExecEvent::Error(_))));
        assert_eq!(
            text_event(r#"{"error":"bad start message"}"#),
            ExecEvent::Error("bad start message".into())
        );
    }

    #[test]
    fn bodiless_answers_check() {
        let a = |status: u16, body: &str| Answer {
            status: StatusCode::from_u16(status).unwrap(),
            headers: Default::default(),
            body: Bytes::from(body.to_string()),
        };
        assert!(a(204, "").ok().is_ok());
        match a(409, r#"{"error":{"code":"conflict","message":"busy"}}"#).ok() {
            Err(ClientError::Api { code, message, .. }) => {
                assert_eq!((code.as_str(), message.as_str()), ("conflict", "busy"))
            }
            other => panic!("{other:?}"),
        }
        assert!(matches!(
            a(502, "<html>").ok(),
            Err(ClientError::Unexpected { .. })
        ));
    }
}
