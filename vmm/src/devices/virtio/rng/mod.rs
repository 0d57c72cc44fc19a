//! virtio-rng: an entropy source backed by the host's `getrandom(2)`; its
//! snapshot state is in [`persist`]. It must not hand the guest more than
//! [`MAX_BYTES_PER_REQUEST`] bytes per request, however large its buffer.
//! Every request it refuses is counted ([`VirtioDevice::rejected`]).

pub mod persist;

use std::io;

use virtio_queue::Queue;
use vm_memory::GuestMemoryMmap;

use super::chain::{self, ChainBuffers, DescriptorError, Direction, RingError};
use super::persist::DeviceModelState;
use super::Active;
use super::{
    warn_limited, Error, Interrupt, Rejected, VirtioDevice, TYPE_RNG, VIRTIO_F_VERSION_1,
    VIRTIO_RING_F_EVENT_IDX,
};
use crate::persist::Persist;

/// Size of the request queue.
pub const QUEUE_SIZE: u16 = 256;
/// At most this many random bytes are produced per request, however large the guest buffer.
pub const MAX_BYTES_PER_REQUEST: usize = 64 << 10;

const QUEUE_SIZES: [u16; 1] = [QUEUE_SIZE];

/// The virtio-rng device model (device id 4, one queue).
pub struct Rng {
    acked_features: u64,
    active: Option<Active>,
    scratch: Vec<u8>,
    rejected: Rejected,
}

/// What the device refuses from the guest (counted in [`Rng::rejected`]).
#[derive(Debug, thiserror::Error)]
enum Rejection {
    /// A request whose descriptor chain is malformed: returned empty.
    #[error("malformed request")]
    Malformed(#[source] DescriptorError),
    /// The queue's rings are corrupted: the device needs a reset.
    #[error("request queue unusable")]
    Ring(#[source] RingError),
}

impl Rejection {
    /// Counts this refusal in `rejected`, with its causes.
    fn count(self, rejected: &mut Rejected) {
        rejected.record(crate::error_chain(&self));
    }
}

impl Default for Rng {
    fn default() -> Self {
        Self::new()
    }
}

impl std::fmt::Debug for Rng {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Rng")
            .field("acked_features", &self.acked_features)
            .field("activated", &self.active.is_some())
            .finish()
    }
}

/// Fills `buf` from `getrandom(2)`.
fn fill_random(buf: &mut [u8]) -> io::Result<()> {
    let mut off = 0;
    while off < buf.len() {
        let rest = &mut buf[off..];
        // SAFETY: the pointer and length describe `rest`, a valid writable slice; getrandom
        // writes at most that many bytes.
        let r = unsafe { libc::getrandom(rest.as_mut_ptr().cast(), rest.len(), 0) };
        if r < 0 {
            let e = io::Error::last_os_error();
            if e.kind() == io::ErrorKind::Interrupted {
                continue;
            }
            return Err(e);
        }
        off += r as usize;
    }
    Ok(())
}

impl Rng {
    /// Creates the device.
    pub fn new() -> Self {
        Rng {
            acked_features: 0,
            active: None,
            scratch: Vec::new(),
            rejected: Rejected::default(),
        }
    }

    /// Serves one request; returns the number of bytes written into the guest buffer.
    fn serve(
        mem: &GuestMemoryMmap,
        scratch: &mut Vec<u8>,
        bufs: &ChainBuffers,
    ) -> Result<u32, DescriptorError> {
        let n = bufs.len().min(MAX_BYTES_PER_REQUEST);
        scratch.resize(n, 0);
        if let Err(e) = fill_random(&mut scratch[..n]) {
            warn_limited!("getrandom failed: {e}");
            return Ok(0);
        }
        let written = bufs.write_at(mem, 0, &scratch[..n])?;
        Ok(written as u32)
    }

    fn process_requests(&mut self) {
        let Some(active) = self.active.as_mut() else {
            return;
        };
        let Active { mem, queues, irq } = active;
        let queue = &mut queues[0];
        let rejected = &mut self.rejected;
        let mut used_any = false;
        let mut idle_rounds = 0;
        'rounds: loop {
            let mut popped = false;
            loop {
                let c = match chain::try_pop_chain(queue, mem, irq) {
                    Ok(Some(c)) => c,
                    Ok(None) => break,
                    Err(e) => {
                        Rejection::Ring(e).count(rejected);
                        break 'rounds;
                    }
                };
                popped = true;
                let head = c.head_index();
                let served = c
                    .buffers(Direction::DeviceWritable)
                    .and_then(|bufs| Self::serve(mem, &mut self.scratch, &bufs));
                let len = served.unwrap_or_else(|e| {
                    warn_limited!("virtio-rng: dropping malformed request: {e}");
                    Rejection::Malformed(e).count(rejected);
                    0
                });
                if let Err(e) = chain::try_add_used(queue, mem, head, len, irq) {
                    Rejection::Ring(e).count(rejected);
                    break 'rounds;
                }
                used_any = true;
            }
            idle_rounds = if popped { 0 } else { idle_rounds + 1 };
            if irq.needs_reset() || idle_rounds > 1 || !chain::enable_notification(queue, mem, irq)
            {
                break;
            }
        }
        if used_any {
            chain::notify_used(queue, mem, irq);
        }
    }
}

impl VirtioDevice for Rng {
    fn device_type(&self) -> u32 {
        TYPE_RNG
    }

    fn queue_max_sizes(&self) -> &[u16] {
        &QUEUE_SIZES
    }

    fn avail_features(&self) -> u64 {
        (1 << VIRTIO_F_VERSION_1) | (1 << VIRTIO_RING_F_EVENT_IDX)
    }

    fn ack_features(&mut self, features: u64) {
        self.acked_features = features & self.avail_features();
    }

    fn read_config(&self, _offset: u64, data: &mut [u8]) {
        data.fill(0);
    }

    fn write_config(&mut self, _offset: u64, _data: &[u8]) {}

    fn activate(
        &mut self,
        mem: GuestMemoryMmap,
        queues: Vec<Queue>,
        interrupt: Interrupt,
    ) -> Result<(), Error> {
        Active::install(&mut self.active, QUEUE_SIZES.len(), mem, queues, interrupt)
    }

    fn is_activated(&self) -> bool {
        self.active.is_some()
    }

    fn reset(&mut self) {
        self.active = None;
        self.acked_features = 0;
    }

    fn process_queue(&mut self, index: usize) {
        if index == 0 {
            self.process_requests();
        }
    }

    fn queues(&self) -> &[Queue] {
        self.active.as_ref().map_or(&[], |a| &a.queues[..])
    }

    fn save_model(&self) -> DeviceModelState {
        DeviceModelState::Rng(self.save())
    }

    fn rejected(&self) -> Rejected {
        self.rejected.clone()
    }
}

#[cfg(test)]
mod fuzz;

#[cfg(test)]
mod tests {
    use super::*;
    use crate::devices::virtio::test_utils::{desc, mem, DriverQueue, DESC_NEXT, DESC_WRITE};
    use vm_memory::{Bytes, GuestAddress};

    fn active_rng<'a>(m: &'a GuestMemoryMmap) -> (Rng, DriverQueue<'a>, Interrupt) {
        let dq = DriverQueue::new(m, 0x1000, 16);
        let irq = Interrupt::new().unwrap();
        let mut rng = Rng::new();
        rng.activate(m.clone(), vec![dq.create_queue()], irq.clone())
            .unwrap();
        (rng, dq, irq)
    }

    #[test]
    fn fills_writable_buffers() {
        let m = mem();
        let (mut rng, mut dq, irq) = active_rng(&m);
        let head = dq.add_chain(&[(0x10_0000, 16, true), (0x20_0000, 100, true)]);
        rng.process_queue(0);
        assert_eq!(dq.pop_used(), Some((head, 116)));
        let mut out = [0u8; 100];
        m.read_slice(&mut out, GuestAddress(0x20_0000)).unwrap();
        assert!(out.iter().any(|&b| b != 0));
        assert_eq!(irq.eventfd().read().unwrap(), 1);
        assert_eq!(irq.status(), 1);
    }

    #[test]
    fn caps_large_requests() {
        let m = mem();
        let (mut rng, mut dq, _irq) = active_rng(&m);
        let head = dq.add_chain(&[(0x10_0000, 1 << 20, true)]);
        rng.process_queue(0);
        assert_eq!(dq.pop_used(), Some((head, MAX_BYTES_PER_REQUEST as u32)));
    }

    #[test]
    fn malformed_requests_are_dropped() {
        let m = mem();
        let (mut rng, mut dq, irq) = active_rng(&m);
        // Outside guest memory.
        dq.add_raw(&[(0, desc(0x1_0000_0000, 64, DESC_WRITE, 0))], 0);
        // Device-readable buffer.
        dq.add_raw(&[(1, desc(0x10_0000, 64, 0, 0))], 1);
        // Loop 2 -> 3 -> 2.
        dq.add_raw(
            &[
                (2, desc(0x10_0000, 64, DESC_WRITE | DESC_NEXT, 3)),
                (3, desc(0x10_1000, 64, DESC_WRITE | DESC_NEXT, 2)),
            ],
            2,
        );
        // Zero length.
        dq.add_raw(&[(4, desc(0x10_0000, 0, DESC_WRITE, 0))], 4);
        // Head index outside the table.
        dq.add_raw(&[], 99);
        // Readable then writable (write-only vs read-only mismatch inside a chain).
        dq.add_raw(
            &[
                (5, desc(0x10_0000, 8, DESC_NEXT, 6)),
                (6, desc(0x10_1000, 8, DESC_WRITE, 0)),
            ],
            5,
        );
        rng.process_queue(0);
        let used: Vec<_> = std::iter::from_fn(|| dq.pop_used()).collect();
        // Head 99 cannot be put in the used ring (out of range): it is dropped; every other
        // chain was returned with length 0.
        assert_eq!(used, vec![(0, 0), (1, 0), (2, 0), (4, 0), (5, 0)]);
        assert!(!irq.needs_reset());
        // Each refusal is counted; the empty buffer was served (0 bytes).
        let rejected = rng.rejected();
        assert_eq!(rejected.count, 5);
        assert_eq!(
            rejected.last.as_deref(),
            Some("malformed request: unexpected device-readable descriptor")
        );
        // The device keeps working.
        let head = dq.add_chain(&[(0x10_0000, 8, true)]);
        rng.process_queue(0);
        assert_eq!(dq.pop_used(), Some((head, 8)));
        assert_eq!(rng.rejected().count, 5);
    }

    /// Regression: 256 chains through one indirect table of 65 535
    /// descriptors, which the device never offered, were served, one kick
    /// costing 0.8 s of the event loop (release build). They are refused.
    #[test]
    fn indirect_tables_are_refused_not_followed() {
        use crate::devices::virtio::ring_fuzz::DESC_INDIRECT;
        let m = mem();
        let table = 0x20_0000u64;
        let n = 65_535u64;
        let mut raw = Vec::with_capacity(16 * n as usize);
        for i in 0..n {
            let flags = DESC_WRITE | if i + 1 < n { DESC_NEXT } else { 0 };
            let d = desc(0x10_0000 + i % 4096, 1, flags, (i + 1) as u16);
            raw.extend_from_slice(vm_memory::ByteValued::as_slice(&d));
        }
        m.write_slice(&raw, GuestAddress(table)).unwrap();
        let mut dq = DriverQueue::new(&m, 0x1000, 256);
        let irq = Interrupt::new().unwrap();
        let mut rng = Rng::new();
        rng.activate(m.clone(), vec![dq.create_queue()], irq.clone())
            .unwrap();
        for i in 0..256u16 {
            dq.add_raw(&[(i, desc(table, (16 * n) as u32, DESC_INDIRECT, 0))], i);
        }
        rng.process_queue(0);
        let used: Vec<_> = std::iter::from_fn(|| dq.pop_used()).collect();
        assert_eq!(used.len(), 256);
        assert!(used.iter().all(|&(_, len)| len == 0), "{used:?}");
        let rejected = rng.rejected();
        assert_eq!(rejected.count, 256);
        assert_eq!(
            rejected.last.as_deref(),
            Some("malformed request: the chain refers to an indirect descriptor table, which this device does not offer")
        );
        assert!(!irq.needs_reset());
    }

    #[test]
    fn corrupted_ring_does_not_panic() {
        let m = mem();
        let (mut rng, dq, irq) = active_rng(&m);
        let (_, avail, _) = dq.addrs();
        m.write_obj(1000u16, GuestAddress(avail + 2)).unwrap();
        rng.process_queue(0);
        assert!(irq.needs_reset());
        assert_eq!(
            rng.rejected(),
            Rejected {
                count: 1,
                last: Some(
                    "request queue unusable: the available ring index 1000 is 1000 entries \
                     ahead of the device, more than the queue's 16"
                        .into()
                )
            }
        );
    }

    #[test]
    fn event_idx_suppresses_interrupts() {
        let m = mem();
        let mut dq = DriverQueue::new(&m, 0x1000, 16);
        let irq = Interrupt::new().unwrap();
        let mut rng = Rng::new();
        let mut q = dq.create_queue();
        virtio_queue::QueueT::set_event_idx(&mut q, true);
        rng.activate(m.clone(), vec![q], irq.clone()).unwrap();
        // Driver wants an interrupt only after the used index passes 1.
        dq.set_used_event(1);
        dq.add_chain(&[(0x10_0000, 8, true)]);
        rng.process_queue(0);
        assert!(
            irq.eventfd().read().is_err(),
            "no interrupt for the first buffer"
        );
        assert_eq!(dq.avail_event(), 1);
        dq.add_chain(&[(0x10_0000, 8, true)]);
        rng.process_queue(0);
        assert_eq!(irq.eventfd().read().unwrap(), 1);
        assert_eq!(dq.avail_event(), 2);
    }

    #[test]
    fn inactive_or_reset_device_ignores_queues() {
        let m = mem();
        let (mut rng, mut dq, _irq) = active_rng(&m);
        rng.reset();
        assert!(!rng.is_activated());
        dq.add_chain(&[(0x10_0000, 8, true)]);
        rng.process_queue(0);
        assert_eq!(dq.pop_used(), None);
    }
}
