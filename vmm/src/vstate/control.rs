//! Steering vCPU threads from the rest of the VMM: stop them for good, or
//! park them at a clean point (pause) and have each save its state while
//! parked, which is how a master is frozen.
//!
//! A vCPU thread in `KVM_RUN` only comes back on an exit, so the VMM kicks
//! it with a signal (a no-op handler on `SIGRTMIN`) until it reports parked.
//! Before parking, a vCPU re-enters `KVM_RUN` once with `immediate_exit` set,
//! so that an I/O read it was handed completes inside KVM instead of being
//! lost from the saved state.
//!
//! It owns the pause/resume/stop protocol between threads; it must not
//! touch KVM itself (a vCPU saves its own state, on its own thread, through
//! the closure it parks with).

use std::collections::BTreeMap;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Condvar, Mutex, MutexGuard, Once};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use vmm_sys_util::signal::{register_signal_handler, Killable, SIGRTMIN};

use super::state::{StateError, VcpuState};

/// Errors pausing vCPUs.
#[derive(Debug, thiserror::Error)]
pub enum ControlError {
    /// A vCPU thread ended (the VM is going down) before it could park.
    #[error("a vCPU stopped running before it could pause (the VM is ending)")]
    Ended,
    /// Not every vCPU parked in time.
    #[error("{parked} of {expected} vCPUs paused within {timeout:?}")]
    Timeout {
        /// How many parked.
        parked: usize,
        /// How many should have.
        expected: usize,
        /// How long we waited.
        timeout: Duration,
    },
    /// A vCPU could not save its state.
    #[error("vCPU {index} could not save its state")]
    Save {
        /// vCPU index.
        index: u8,
        /// What failed.
        #[source]
        source: StateError,
    },
    /// The kick signal's handler could not be installed.
    #[error("cannot install the signal handler that kicks vCPU threads out of the guest")]
    Signal(#[source] vmm_sys_util::errno::Error),
}

#[derive(Default)]
struct Shared {
    parked: usize,
    /// When set, parking vCPUs save their state here (keyed by index).
    save: Option<SaveRequest>,
}

struct SaveRequest {
    msr_indices: Vec<u32>,
    results: BTreeMap<u8, Result<VcpuState, StateError>>,
}

/// Shared by the VMM and all vCPU threads of one VM.
#[derive(Default)]
pub struct RunControl {
    stop: AtomicBool,
    pause: AtomicBool,
    shared: Mutex<Shared>,
    changed: Condvar,
}

extern "C" fn kick_handler(_: libc::c_int, _: *mut libc::siginfo_t, _: *mut libc::c_void) {}

/// The signal that kicks a vCPU thread out of `KVM_RUN`.
pub fn kick_signal() -> libc::c_int {
    SIGRTMIN()
}

/// Installs the (no-op) kick handler once per process.
pub fn install_kick_handler() -> Result<(), ControlError> {
    static ONCE: Once = Once::new();
    let mut result = Ok(());
    ONCE.call_once(|| {
        result = register_signal_handler(kick_signal(), kick_handler).map_err(ControlError::Signal);
    });
    result
}

impl RunControl {
    fn lock(&self) -> MutexGuard<'_, Shared> {
        self.shared.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Ends every vCPU's run loop (parked ones too).
    pub fn stop(&self) {
        self.stop.store(true, Ordering::Release);
        let _guard = self.lock();
        self.changed.notify_all();
    }

    /// Whether the VM is ending.
    pub fn is_stopped(&self) -> bool {
        self.stop.load(Ordering::Acquire)
    }

    /// Whether vCPUs should park.
    pub fn pause_requested(&self) -> bool {
        self.pause.load(Ordering::Acquire)
    }

    /// Called by a vCPU thread at a clean point: saves its state if asked
    /// (with `save`), then waits until resumed or stopped.
    pub fn park(&self, index: u8, save: impl FnOnce(&[u32]) -> Result<VcpuState, StateError>) {
        let mut shared = self.lock();
        if let Some(req) = shared.save.as_mut() {
            if !req.results.contains_key(&index) {
                let result = save(&req.msr_indices);
                req.results.insert(index, result);
            }
        }
        shared.parked += 1;
        self.changed.notify_all();
        while self.pause_requested() && !self.is_stopped() {
            shared = self.changed.wait(shared).unwrap_or_else(|e| e.into_inner());
        }
        shared.parked -= 1;
        self.changed.notify_all();
    }

    /// Parks every vCPU of `threads`, kicking them out of the guest, and
    /// waits until all are parked. With `save_msrs`, each saves its state
    /// first and the states are returned in vCPU order.
    pub fn pause<T>(
        &self,
        threads: &[JoinHandle<T>],
        save_msrs: Option<Vec<u32>>,
        timeout: Duration,
    ) -> Result<Vec<VcpuState>, ControlError> {
        install_kick_handler()?;
        {
            let mut shared = self.lock();
            shared.save = save_msrs.map(|msr_indices| SaveRequest {
                msr_indices,
                results: BTreeMap::new(),
            });
        }
        self.pause.store(true, Ordering::Release);
        let deadline = Instant::now() + timeout;
        let expected = threads.len();
        let mut shared = self.lock();
        loop {
            let saves_done = shared
                .save
                .as_ref()
                .is_none_or(|r| r.results.len() == expected);
            if shared.parked == expected && saves_done {
                break;
            }
            if threads.iter().any(|t| t.is_finished()) {
                return Err(ControlError::Ended);
            }
            let now = Instant::now();
            if now >= deadline {
                return Err(ControlError::Timeout {
                    parked: shared.parked,
                    expected,
                    timeout,
                });
            }
            drop(shared);
            // A kick that lands outside KVM_RUN is harmless; repeat until
            // each thread has seen the request.
            for t in threads {
                if !t.is_finished() {
                    let _ = t.kill(kick_signal());
                }
            }
            shared = self.lock();
            let wait = (deadline - now).min(Duration::from_millis(2));
            shared = self
                .changed
                .wait_timeout(shared, wait)
                .unwrap_or_else(|e| e.into_inner())
                .0;
        }
        let Some(req) = shared.save.take() else {
            return Ok(Vec::new());
        };
        req.results
            .into_iter()
            .map(|(index, r)| r.map_err(|source| ControlError::Save { index, source }))
            .collect()
    }

    /// Lets parked vCPUs run the guest again.
    pub fn resume(&self) {
        self.pause.store(false, Ordering::Release);
        let _guard = self.lock();
        self.changed.notify_all();
    }
}

#[cfg(test)]
mod tests {
    use std::sync::Arc;

    use vm_memory::{Bytes, GuestAddress};

    use super::*;
    use crate::memory;
    use crate::vstate::state::readable_msrs;
    use crate::vstate::vcpu::{write_boot_tables, Bus, Vcpu, VcpuStop};
    use crate::vstate::vm::{create_vm, open_kvm};

    struct NoDevices;
    impl Bus for NoDevices {
        fn pio_write(&self, _: u16, _: &[u8]) {}
        fn pio_read(&self, _: u16, data: &mut [u8]) {
            data.fill(0xff)
        }
        fn mmio_write(&self, _: u64, _: &[u8]) {}
        fn mmio_read(&self, _: u64, data: &mut [u8]) {
            data.fill(0xff)
        }
    }

    #[test]
    fn pausing_a_vm_whose_vcpu_ended_fails_at_once() {
        let control = RunControl::default();
        let t = std::thread::spawn(|| ());
        while !t.is_finished() {
            std::thread::sleep(Duration::from_millis(1));
        }
        let start = Instant::now();
        let r = control.pause(std::slice::from_ref(&t), None, Duration::from_secs(30));
        assert!(matches!(r, Err(ControlError::Ended)), "{r:?}");
        assert!(start.elapsed() < Duration::from_secs(5));
    }

    #[test]
    fn a_running_vcpu_parks_saves_its_state_resumes_and_stops() {
        const ENTRY: u64 = 0x10_0000;
        let kvm = open_kvm().expect("this test needs /dev/kvm");
        let fd = memory::create_memfd(4 << 20).unwrap();
        let mem = memory::map_guest_memory(&fd, 4 << 20, libc::MAP_SHARED).unwrap();
        write_boot_tables(&mem).unwrap();
        // The guest: `jmp .` forever, in long mode.
        mem.write_slice(&[0xeb, 0xfe], GuestAddress(ENTRY)).unwrap();
        let vm = create_vm(&kvm, &mem).unwrap();
        let vcpu = Vcpu::new(&kvm, &vm, 0, 1, Some(GuestAddress(ENTRY))).unwrap();
        let msrs = readable_msrs(&kvm, vcpu.fd()).unwrap();
        let control = Arc::new(RunControl::default());
        let c = control.clone();
        let thread = std::thread::spawn(move || {
            let mut vcpu = vcpu;
            vcpu.run(&NoDevices, &c, &Default::default())
        });
        let threads = std::slice::from_ref(&thread);
        std::thread::sleep(Duration::from_millis(50));

        let states = control
            .pause(threads, Some(msrs), Duration::from_secs(30))
            .unwrap();
        assert_eq!(states.len(), 1);
        assert_eq!(states[0].index, 0);
        assert_eq!(states[0].regs.rip, ENTRY, "parked inside the loop");
        assert!(!thread.is_finished());

        // Resumed, it runs again; paused again without a save, no states.
        control.resume();
        std::thread::sleep(Duration::from_millis(20));
        let none = control
            .pause(threads, None, Duration::from_secs(30))
            .unwrap();
        assert!(none.is_empty());

        control.stop();
        assert_eq!(thread.join().unwrap(), VcpuStop::Stopped);
        drop(mem);
    }
}
