//! Supervision of a runtime's VMMs: one thread waits on every VMM's pidfd
//! in one epoll set, so a VMM's death is noticed as it happens (no polling
//! of `/proc`), and enforces TTLs a few times a second.
//!
//! It must not: hold the runtime alive (it keeps a weak reference and ends
//! with it), or act on a process by its pid.

use std::collections::HashMap;
use std::os::fd::{AsFd, BorrowedFd, OwnedFd};
use std::sync::{Arc, Mutex, Weak};
use std::time::Duration;

use rustix::buffer::spare_capacity as spare;
use rustix::event::epoll;

use crate::runtime::Runtime;

/// The epoll set of pidfds, by instance id.
#[derive(Debug)]
pub struct Watcher {
    epoll: OwnedFd,
    watched: Mutex<Watched>,
}

#[derive(Debug, Default)]
struct Watched {
    next: u64,
    by_token: HashMap<u64, (String, OwnedFd)>,
    by_id: HashMap<String, u64>,
}

impl Watcher {
    /// An empty set.
    pub fn new() -> std::io::Result<Self> {
        Ok(Watcher {
            epoll: epoll::create(epoll::CreateFlags::CLOEXEC)?,
            watched: Mutex::new(Watched::default()),
        })
    }

    /// Watches `pidfd` (a copy of it) for instance `id`.
    pub fn watch(&self, id: &str, pidfd: BorrowedFd<'_>) -> std::io::Result<()> {
        let fd = pidfd.try_clone_to_owned()?;
        let mut w = self.watched.lock().unwrap_or_else(|e| e.into_inner());
        w.next += 1;
        let token = w.next;
        epoll::add(
            &self.epoll,
            &fd,
            epoll::EventData::new_u64(token),
            epoll::EventFlags::IN,
        )?;
        if let Some(old) = w.by_id.insert(id.to_string(), token) {
            if let Some((_, old_fd)) = w.by_token.remove(&old) {
                let _ = epoll::delete(&self.epoll, &old_fd);
            }
        }
        w.by_token.insert(token, (id.to_string(), fd));
        Ok(())
    }

    /// Stops watching instance `id`.
    pub fn unwatch(&self, id: &str) {
        let mut w = self.watched.lock().unwrap_or_else(|e| e.into_inner());
        if let Some(token) = w.by_id.remove(id) {
            if let Some((_, fd)) = w.by_token.remove(&token) {
                let _ = epoll::delete(&self.epoll, &fd);
            }
        }
    }

    /// Waits up to `timeout` for VMMs to end; returns their instance ids.
    fn wait(&self, timeout: Duration) -> Vec<String> {
        let mut events: Vec<epoll::Event> = Vec::with_capacity(64);
        let ts = rustix::event::Timespec {
            tv_sec: timeout.as_secs() as i64,
            tv_nsec: timeout.subsec_nanos() as i64,
        };
        if epoll::wait(self.epoll.as_fd(), spare(&mut events), Some(&ts)).is_err() {
            return Vec::new();
        }
        let w = self.watched.lock().unwrap_or_else(|e| e.into_inner());
        events
            .iter()
            .filter_map(|e| {
                let data = e.data;
                w.by_token.get(&data.u64()).map(|(id, _)| id.clone())
            })
            .collect()
    }
}

/// Starts the supervisor thread of `rt`.
pub fn start(rt: &Arc<Runtime>) {
    let weak: Weak<Runtime> = Arc::downgrade(rt);
    let _ = std::thread::Builder::new()
        .name("supervisor".into())
        .spawn(move || loop {
            let Some(rt) = weak.upgrade() else { return };
            for id in rt.watcher().wait(Duration::from_millis(250)) {
                rt.on_exit(&id);
            }
            rt.enforce_ttls();
        });
}
