//! The VMM's side of its control socket ([`proto::ctl`] has the messages
//! and the client): accepts one request per connection inside the device
//! event loop and hands it to the main loop, which answers it.

use std::io::{BufRead, BufReader, Read, Write};
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use event_manager::{EventOps, Events, MutEventSubscriber};
use proto::ctl::{CtlRequest, CtlResponse, MAX_REQUEST_LEN};
use vmm_sys_util::epoll::EventSet;

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
            .map(|s| BufReader::new(s).take(MAX_REQUEST_LEN).read_line(&mut line));
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
