//! The one place that waits for child processes.
//!
//! As PID 1 the agent inherits every orphan of the guest, so one thread
//! blocks in `waitpid(-1)` and receives every exit. The statuses of the
//! commands the agent spawned go to their exec loops; all other exits
//! (orphans) are discarded. Nothing else may wait: `Child::wait` would race
//! with this thread.
//!
//! A command is registered *under the same lock* that spans its spawn, and
//! the reaper takes that lock before routing a status, so an exit can never
//! be routed before its pid is known (a child that exits at once is
//! reaped, then waits for the lock, then finds its watcher).

use std::collections::HashMap;
use std::os::fd::RawFd;
use std::sync::{Condvar, Mutex, MutexGuard, OnceLock};

use crate::sys;

/// Where the exit of a spawned command goes.
enum Watch {
    /// Still running; its exit is announced on this eventfd.
    Running(RawFd),
    /// Exited with this raw wait status, not yet taken.
    Exited(i32),
}

#[derive(Default)]
struct State {
    watches: HashMap<i32, Watch>,
    /// A spawn happened since the reaper last saw ECHILD.
    spawned: bool,
}

/// Routes child exits to the exec loops that wait for them.
pub struct Reaper {
    state: Mutex<State>,
    spawned: Condvar,
}

impl Reaper {
    /// The process-wide reaper, its thread started on first use; `None`
    /// if that thread could not be started.
    pub fn global() -> Option<&'static Reaper> {
        static GLOBAL: OnceLock<Option<&'static Reaper>> = OnceLock::new();
        *GLOBAL.get_or_init(|| {
            let reaper: &'static Reaper = Box::leak(Box::new(Reaper {
                state: Mutex::new(State::default()),
                spawned: Condvar::new(),
            }));
            match std::thread::Builder::new()
                .stack_size(64 * 1024)
                .spawn(move || reaper.run())
            {
                Ok(_) => Some(reaper),
                Err(e) => {
                    sys::log(&format!("cannot start the reaper thread: {e}"));
                    None
                }
            }
        })
    }

    fn lock(&self) -> MutexGuard<'_, State> {
        // The agent is built with panic=abort, so the lock is never poisoned.
        self.state.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Runs `spawn` (which returns the new pid) and registers the pid, whose
    /// exit will then be announced on the eventfd `notify`, atomically with
    /// respect to the reaper.
    pub fn spawn_watched<E>(
        &self,
        notify: RawFd,
        spawn: impl FnOnce() -> Result<i32, E>,
    ) -> Result<i32, E> {
        let mut state = self.lock();
        let pid = spawn()?;
        state.watches.insert(pid, Watch::Running(notify));
        // The reaper only sleeps on the condvar after consuming the flag:
        // if it is still set, the reaper is busy in waitpid, no wake-up
        // (futex syscall) is needed.
        let reaper_may_sleep = !state.spawned;
        state.spawned = true;
        drop(state);
        if reaper_may_sleep {
            self.spawned.notify_one();
        }
        Ok(pid)
    }

    /// The raw wait status of `pid` if it exited; unregisters it then.
    pub fn take(&self, pid: i32) -> Option<i32> {
        let mut state = self.lock();
        match state.watches.get(&pid) {
            Some(Watch::Exited(status)) => {
                let status = *status;
                state.watches.remove(&pid);
                Some(status)
            }
            _ => None,
        }
    }

    /// Stops watching `pid`: its exit, if still to come, is discarded and
    /// its eventfd no longer used (so the caller may close it).
    pub fn forget(&self, pid: i32) {
        self.lock().watches.remove(&pid);
    }

    /// SIGKILLs the process group of `pid` (and `pid`) unless `pid` was
    /// reaped already: then the pid may have been reused, and the group is
    /// left alone. (Under the lock, so the reaper cannot route the exit
    /// meanwhile; a reaped but not yet routed pid is not reused within
    /// that instant.)
    /// Returns whether it killed.
    pub fn kill_if_running(&self, pid: i32) -> bool {
        let state = self.lock();
        let running = matches!(state.watches.get(&pid), Some(Watch::Running(_)));
        if running {
            sys::kill_tree(pid);
        }
        running
    }

    fn deliver(&self, pid: i32, status: i32) {
        let mut state = self.lock();
        if let Some(watch) = state.watches.get_mut(&pid) {
            if let Watch::Running(notify) = *watch {
                *watch = Watch::Exited(status);
                // Under the lock: `forget` cannot have closed it meanwhile.
                sys::eventfd_signal(notify);
            }
        }
        // Not ours: an orphan (or a forgotten command); already reaped.
    }

    fn run(&self) {
        loop {
            let mut status = 0;
            // SAFETY: `status` is a valid int to fill.
            let pid = unsafe { libc::waitpid(-1, &mut status, 0) };
            if pid > 0 {
                self.deliver(pid, status);
                continue;
            }
            match std::io::Error::last_os_error().raw_os_error() {
                Some(libc::ECHILD) => {
                    // No children at all: sleep until the next spawn. (An
                    // orphan is re-parented to us before its parent's exit
                    // is reported, so none can appear while we sleep.)
                    let mut state = self.lock();
                    while !state.spawned {
                        state = self.spawned.wait(state).unwrap_or_else(|e| e.into_inner());
                    }
                    state.spawned = false;
                }
                Some(libc::EINTR) => {}
                _ => std::thread::sleep(std::time::Duration::from_millis(10)),
            }
        }
    }
}
