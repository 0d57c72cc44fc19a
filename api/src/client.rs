//! A client of the daemon's API, over its Unix socket or TCP: what the CLI's
//! remote mode, the end-to-end tests and `bench api` use. One HTTP/1.1
//! connection per request (hyper), JSON in and out, errors as the daemon
//! sent them, and the streamed exec's WebSocket (tokio-tungstenite).
//!
//! It must not: retry on its own (a caller decides), or hide an error body.

use std::path::PathBuf;

use http_body_util::{BodyExt, Full};
use hyper::body::Bytes;
use hyper::{Method, Request, StatusCode};
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

/// Errors of a call.
#[derive(Debug, thiserror::Error)]
pub enum ClientError {
    /// Not an endpoint.
    #[error("{0:?} is not a daemon address: use unix:PATH or http://HOST:PORT")]
    Url(String),
    /// The daemon could not be reached.
    #[error("cannot reach the zygote daemon at {endpoint}: {source}")]
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

    /// Sends one request with a raw body (`content_type` when given).
    pub async fn send(
        &self,
        method: Method,
        path: &str,
        content_type: Option<&str>,
        body: Vec<u8>,
    ) -> Result<Answer, ClientError> {
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
        let resp = sender
            .send_request(req)
            .await
            .map_err(|e| ClientError::Http(e.to_string()))?;
        let (parts, body) = resp.into_parts();
        let body = body
            .collect()
            .await
            .map_err(|e| ClientError::Http(e.to_string()))?
            .to_bytes();
        driver.abort();
        Ok(Answer {
            status: parts.status,
            headers: parts.headers,
            body,
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
        let url = format!("ws://{}/v1/instances/{id}/exec/ws", self.host_header());
        let mut req = url
            .into_client_request()
            .map_err(|e| ClientError::Http(e.to_string()))?;
        if let Some(t) = &self.token {
            if let Ok(v) = format!("Bearer {t}").parse() {
                req.headers_mut().insert(hyper::header::AUTHORIZATION, v);
            }
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

/// An open streamed exec.
pub struct ExecSocket {
    ws: tokio_tungstenite::WebSocketStream<Box<dyn Conn>>,
}

/// What arrives on a streamed exec.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ExecEvent {
    /// Standard output bytes.
    Stdout(Vec<u8>),
    /// Standard error bytes.
    Stderr(Vec<u8>),
    /// The command ended.
    Exited(proto::ExitStatus),
    /// The agent or the daemon refused or failed.
    Error(String),
}

impl ExecSocket {
    /// Sends stdin bytes (empty: closes the command's stdin).
    pub async fn stdin(&mut self, data: Vec<u8>) -> Result<(), ClientError> {
        use futures_util::SinkExt;
        self.ws
            .send(tokio_tungstenite::tungstenite::Message::Binary(data.into()))
            .await
            .map_err(|e| ClientError::Http(e.to_string()))
    }

    /// The next event; `None` when the socket closed.
    pub async fn next(&mut self) -> Option<ExecEvent> {
        use futures_util::StreamExt;
        use proto::{AgentFrame, Frame, Response};
        use tokio_tungstenite::tungstenite::Message;
        loop {
            let msg = match self.ws.next().await? {
                Ok(m) => m,
                Err(e) => return Some(ExecEvent::Error(e.to_string())),
            };
            match msg {
                Message::Binary(b) => match AgentFrame::decode(&b) {
                    Ok(Some((AgentFrame::Stdout(d), _))) => return Some(ExecEvent::Stdout(d)),
                    Ok(Some((AgentFrame::Stderr(d), _))) => return Some(ExecEvent::Stderr(d)),
                    Ok(Some((AgentFrame::Response(Response::Exited(s)), _))) => {
                        return Some(ExecEvent::Exited(s))
                    }
                    Ok(Some((AgentFrame::Response(Response::Started { .. }), _))) => continue,
                    Ok(Some((AgentFrame::Response(Response::Error { message, .. }), _))) => {
                        return Some(ExecEvent::Error(message))
                    }
                    Ok(Some((other, _))) => {
                        return Some(ExecEvent::Error(format!("unexpected frame {other:?}")))
                    }
                    Ok(None) | Err(_) => {
                        return Some(ExecEvent::Error("a malformed frame from the daemon".into()))
                    }
                },
                Message::Text(t) => {
                    let v: serde_json::Value = serde_json::from_str(t.as_str()).unwrap_or_default();
                    return Some(ExecEvent::Error(
                        v["error"].as_str().unwrap_or(t.as_str()).to_string(),
                    ));
                }
                Message::Close(_) => return None,
                _ => continue,
            }
        }
    }
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
}
