//! The VMM's control socket: a Unix socket on which the process that
//! started the VMM asks for operations on the running VM. One request per
//! connection, one JSON line each way. The VMM's listener lives in the VMM;
//! the messages and the client live here.
//!
//! ```text
//! -> {"op":"freeze"}
//! <- {"ok":true,"pause_ms":0.4,"save_ms":2.1,"state_bytes":61234}
//! <- {"ok":false,"error":"..."}
//! ```

use std::io::{BufRead, BufReader, Write};
use std::os::unix::net::UnixStream;
use std::path::Path;
use std::time::Duration;

use serde::{Deserialize, Serialize};

/// Longest request line the VMM reads.
pub const MAX_REQUEST_LEN: u64 = 4096;

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
