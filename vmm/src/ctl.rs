//! The VMM's control socket: a Unix socket on which the process that
//! started the VMM asks for operations on the running VM. One request per
//! connection, one JSON line each way.
//!
//! ```text
//! -> {"op":"freeze"}
//! <- {"ok":true,"pause_ms":0.4,"save_ms":2.1,"state_bytes":61234}
//! <- {"ok":false,"error":"..."}
//! ```

use std::io::{BufRead, BufReader, Read, Write};
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use event_manager::{EventOps, Events, MutEventSubscriber};
use serde::{Deserialize, Serialize};
use vmm_sys_util::epoll::EventSet;

/// A request on the control socket.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "op", rename_all = "snake_case")]
pub enum CtlRequest {
    /// Pause every vCPU, write the VM's snapshot, and end the VMM: the VM
    /// never runs again.
    Freeze,
}

/// The answer to a request.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct CtlResponse {
    /// Whether it worked.
    pub ok: bool,
    /// What went wrong, when it did not.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub error: Option<String>,
    /// Time to park every vCPU, ms.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub pause_ms: Option<f64>,
    /// Time to read and write the state, ms.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub save_ms: Option<f64>,
    /// Size of the state document.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub state_bytes: Option<u64>,
}

impl CtlResponse {
    /// A failure.
    pub fn err(message: impl Into<String>) -> Self {
        CtlResponse {
            ok: false,
            error: Some(message.into()),
            ..Default::default()
        }
    }
}

/// A request waiting for the VMM's main loop, with the connection to answer on.
pub struct Pending {
    /// What was asked.
    pub request: CtlRequest,
    stream: UnixStream,
}

impl Pending {
    /// Sends the answer (the requester may have gone: that is not an error).
    pub fn answer(mut self, response: &CtlResponse) {
        reply(&mut self.stream, response);
    }
}

fn reply(stream: &mut UnixStream, response: &CtlResponse) {
    if let Ok(mut line) = serde_json::to_vec(response) {
        line.push(b'\n');
        let _ = stream.write_all(&line);
    }
}

/// Listens on the control socket inside the device event loop and hands
/// well-formed requests to the main loop through `pending`.
pub struct CtlListener {
    listener: UnixListener,
    path: PathBuf,
    pending: Arc<Mutex<Option<Pending>>>,
}

impl CtlListener {
    /// Binds `path` (which must not exist).
    pub fn bind(path: &Path, pending: Arc<Mutex<Option<Pending>>>) -> std::io::Result<Self> {
        let listener = UnixListener::bind(path)?;
        listener.set_nonblocking(true)?;
        Ok(CtlListener {
            listener,
            path: path.to_path_buf(),
            pending,
        })
    }

    fn accept_one(&mut self) {
        let Ok((stream, _)) = self.listener.accept() else {
            return;
        };
        // A client that connects and says nothing must not stall the
        // device loop for long.
        let _ = stream.set_nonblocking(false);
        let _ = stream.set_read_timeout(Some(Duration::from_secs(2)));
        let mut line = String::new();
        let read = stream
            .try_clone()
            .map(|s| BufReader::new(s).take(4096).read_line(&mut line));
        let request = match read {
            Ok(Ok(_)) => serde_json::from_str::<CtlRequest>(line.trim()),
            _ => return,
        };
        let mut stream = stream;
        let request = match request {
            Ok(r) => r,
            Err(e) => {
                reply(&mut stream, &CtlResponse::err(format!("bad request: {e}")));
                return;
            }
        };
        let pending = Pending { request, stream };
        let mut slot = self.pending.lock().unwrap_or_else(|e| e.into_inner());
        if slot.is_some() {
            pending.answer(&CtlResponse::err("another request is in progress"));
        } else {
            *slot = Some(pending);
        }
    }
}

impl Drop for CtlListener {
    fn drop(&mut self) {
        let _ = std::fs::remove_file(&self.path);
    }
}

impl MutEventSubscriber for CtlListener {
    fn process(&mut self, _events: Events, _ops: &mut EventOps) {
        self.accept_one();
    }

    fn init(&mut self, ops: &mut EventOps) {
        let _ = ops.add(Events::new(&self.listener, EventSet::IN));
    }
}

/// Client side: sends `request` to the control socket at `path` and waits
/// up to `timeout` for the answer.
pub fn call(path: &Path, request: &CtlRequest, timeout: Duration) -> std::io::Result<CtlResponse> {
    let mut s = UnixStream::connect(path)?;
    s.set_read_timeout(Some(timeout))?;
    let mut line = serde_json::to_vec(request).map_err(std::io::Error::other)?;
    line.push(b'\n');
    s.write_all(&line)?;
    let mut answer = String::new();
    BufReader::new(s).read_line(&mut answer)?;
    if answer.is_empty() {
        return Err(std::io::Error::new(
            std::io::ErrorKind::UnexpectedEof,
            "the VMM closed the control connection without answering",
        ));
    }
    serde_json::from_str(answer.trim()).map_err(std::io::Error::other)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn requests_and_answers_round_trip_as_json_lines() {
        assert_eq!(
            serde_json::to_string(&CtlRequest::Freeze).unwrap(),
            r#"{"op":"freeze"}"#
        );
        let r: CtlResponse = serde_json::from_str(r#"{"ok":false,"error":"x"}"#).unwrap();
        assert_eq!(r, CtlResponse::err("x"));
        assert!(serde_json::from_str::<CtlRequest>(r#"{"op":"explode"}"#).is_err());
    }
}
