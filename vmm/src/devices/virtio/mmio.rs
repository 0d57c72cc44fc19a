//! virtio-mmio transport, version 2 ("modern") register layout.
//!
//! One [`MmioTransport`] per device, each with a 4 KiB register window. The VMM:
//!
//! 1. registers every [`MmioTransport::queue_events`] eventfd with `KVM_IOEVENTFD` at
//!    `base + NOTIFY_REG_OFFSET`, 4-byte length, `datamatch = queue index`;
//! 2. registers [`MmioTransport::interrupt_evt`] with `KVM_IRQFD` for the device's GSI;
//! 3. routes MMIO exits in `[base, base + MMIO_WINDOW_SIZE)` to [`MmioTransport::read`] /
//!    [`MmioTransport::write`] with the offset relative to `base`;
//! 4. adds the `Arc<Mutex<MmioTransport>>` to the (single) `event_manager::EventManager`, which
//!    then processes queue notifications and the device's own fds on the event-loop thread.
//!
//! It owns the register interface and the device status machine; saving and restoring it is
//! [`super::persist`]'s. It must not act on a register write the status machine forbids (queue
//! changes after `DRIVER_OK`, features the device did not offer): those are ignored, not obeyed.

use std::os::unix::io::AsRawFd;

use event_manager::{EventOps, EventSet, Events, MutEventSubscriber};
use virtio_queue::{Queue, QueueT};
use vm_memory::GuestMemoryMmap;
use vmm_sys_util::eventfd::EventFd;

use super::{
    warn_limited, Error, Interrupt, VirtioDevice, STATUS_ACKNOWLEDGE, STATUS_DEVICE_NEEDS_RESET,
    STATUS_DRIVER, STATUS_DRIVER_OK, STATUS_FAILED, STATUS_FEATURES_OK, VIRTIO_F_VERSION_1,
    VIRTIO_RING_F_EVENT_IDX,
};

/// Size of a device's MMIO window.
pub const MMIO_WINDOW_SIZE: u64 = 0x1000;
/// Offset of the `QueueNotify` register (where the ioeventfds go).
pub const NOTIFY_REG_OFFSET: u64 = 0x50;
/// Offset of the device-specific configuration space.
pub const CONFIG_SPACE_OFFSET: u64 = 0x100;

/// "virt" in little endian.
pub const MMIO_MAGIC_VALUE: u32 = 0x7472_6976;
/// virtio-mmio version implemented here.
pub const MMIO_VERSION: u32 = 2;
/// Vendor id reported to the guest.
pub const MMIO_VENDOR_ID: u32 = 0;

pub(crate) const REG_MAGIC: u64 = 0x00;
pub(crate) const REG_VERSION: u64 = 0x04;
pub(crate) const REG_DEVICE_ID: u64 = 0x08;
pub(crate) const REG_VENDOR_ID: u64 = 0x0c;
pub(crate) const REG_DEVICE_FEATURES: u64 = 0x10;
pub(crate) const REG_DEVICE_FEATURES_SEL: u64 = 0x14;
pub(crate) const REG_DRIVER_FEATURES: u64 = 0x20;
pub(crate) const REG_DRIVER_FEATURES_SEL: u64 = 0x24;
pub(crate) const REG_QUEUE_SEL: u64 = 0x30;
pub(crate) const REG_QUEUE_NUM_MAX: u64 = 0x34;
pub(crate) const REG_QUEUE_NUM: u64 = 0x38;
pub(crate) const REG_QUEUE_READY: u64 = 0x44;
pub(crate) const REG_QUEUE_NOTIFY: u64 = NOTIFY_REG_OFFSET;
pub(crate) const REG_INTERRUPT_STATUS: u64 = 0x60;
pub(crate) const REG_INTERRUPT_ACK: u64 = 0x64;
pub(crate) const REG_STATUS: u64 = 0x70;
pub(crate) const REG_QUEUE_DESC_LOW: u64 = 0x80;
pub(crate) const REG_QUEUE_DESC_HIGH: u64 = 0x84;
pub(crate) const REG_QUEUE_AVAIL_LOW: u64 = 0x90;
pub(crate) const REG_QUEUE_AVAIL_HIGH: u64 = 0x94;
pub(crate) const REG_QUEUE_USED_LOW: u64 = 0xa0;
pub(crate) const REG_QUEUE_USED_HIGH: u64 = 0xa4;
pub(crate) const REG_SHM_SEL: u64 = 0xac;
pub(crate) const REG_SHM_LEN_LOW: u64 = 0xb0;
pub(crate) const REG_SHM_LEN_HIGH: u64 = 0xb4;
pub(crate) const REG_SHM_BASE_LOW: u64 = 0xb8;
pub(crate) const REG_SHM_BASE_HIGH: u64 = 0xbc;
pub(crate) const REG_CONFIG_GENERATION: u64 = 0xfc;

/// `Events` data of the device's extra fds start here (queue eventfds use the queue index).
const EXTRA_FD_DATA_BASE: u32 = 0x1_0000;

/// The transport registers that are not queue configuration: a plain struct so that it can be
/// snapshotted together with the queues' `virtio_queue::QueueState`.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct MmioRegisters {
    /// `DeviceFeaturesSel`.
    pub device_features_sel: u32,
    /// `DriverFeaturesSel`.
    pub driver_features_sel: u32,
    /// Features written by the driver (`DriverFeatures`, both halves).
    pub driver_features: u64,
    /// `QueueSel`.
    pub queue_sel: u32,
    /// `Status` as written by the driver (minus refused bits; `DEVICE_NEEDS_RESET` is tracked
    /// in the [`Interrupt`]).
    pub status: u32,
    /// `SHMSel`.
    pub shm_sel: u32,
}

/// A virtio-mmio (version 2) transport for one [`VirtioDevice`].
pub struct MmioTransport {
    pub(super) device: Box<dyn VirtioDevice>,
    pub(super) mem: GuestMemoryMmap,
    pub(super) interrupt: Interrupt,
    queue_evts: Vec<EventFd>,
    /// Queue configuration as programmed through the registers. After activation the device
    /// works on its own copies; these keep the register values.
    pub(super) queues: Vec<Queue>,
    pub(super) regs: MmioRegisters,
}

impl std::fmt::Debug for MmioTransport {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("MmioTransport")
            .field("device_type", &self.device.device_type())
            .field("regs", &self.regs)
            .field("queues", &self.queues)
            .finish_non_exhaustive()
    }
}

impl MmioTransport {
    /// Creates the transport: one non-blocking eventfd per queue and one interrupt eventfd.
    pub fn new(device: Box<dyn VirtioDevice>, mem: GuestMemoryMmap) -> Result<Self, Error> {
        let mut queues = Vec::new();
        let mut queue_evts = Vec::new();
        for (index, &size) in device.queue_max_sizes().iter().enumerate() {
            let q = Queue::new(size).map_err(|source| Error::InvalidQueueMaxSize {
                index,
                size,
                source,
            })?;
            queues.push(q);
            queue_evts.push(EventFd::new(libc::EFD_NONBLOCK).map_err(Error::EventFd)?);
        }
        Ok(MmioTransport {
            device,
            mem,
            interrupt: Interrupt::new()?,
            queue_evts,
            queues,
            regs: MmioRegisters::default(),
        })
    }

    /// One eventfd per queue, to register with `KVM_IOEVENTFD` at `base + NOTIFY_REG_OFFSET`
    /// with `datamatch` = the index in this slice.
    pub fn queue_events(&self) -> &[EventFd] {
        &self.queue_evts
    }

    /// The eventfd to register with `KVM_IRQFD` for the device's GSI.
    pub fn interrupt_evt(&self) -> &EventFd {
        self.interrupt.eventfd()
    }

    /// The interrupt handle shared with the device.
    pub fn interrupt(&self) -> &Interrupt {
        &self.interrupt
    }

    /// The device model.
    pub fn device(&self) -> &dyn VirtioDevice {
        self.device.as_ref()
    }

    /// The device model, mutably.
    pub fn device_mut(&mut self) -> &mut dyn VirtioDevice {
        self.device.as_mut()
    }

    /// Current register state (for snapshots).
    pub fn registers(&self) -> MmioRegisters {
        self.regs
    }

    /// Whether the driver has set `DRIVER_OK` and the device was activated.
    pub fn is_activated(&self) -> bool {
        self.device.is_activated()
    }

    fn selected_queue(&self) -> Option<&Queue> {
        self.queues.get(self.regs.queue_sel as usize)
    }

    fn selected_queue_mut(&mut self) -> Option<&mut Queue> {
        // Queue configuration is frozen once the driver is done with it.
        if self.regs.status & STATUS_DRIVER_OK != 0 {
            warn_limited!("queue configuration write after DRIVER_OK ignored");
            return None;
        }
        self.queues.get_mut(self.regs.queue_sel as usize)
    }

    /// Handles a guest read at `offset` inside the device window. Register reads must be
    /// 4 bytes and aligned; bad accesses and unknown registers read as 0.
    pub fn read(&mut self, offset: u64, data: &mut [u8]) {
        if offset >= CONFIG_SPACE_OFFSET {
            let in_window = offset
                .checked_add(data.len() as u64)
                .is_some_and(|end| end <= MMIO_WINDOW_SIZE);
            if in_window && matches!(data.len(), 1 | 2 | 4 | 8) {
                self.device.read_config(offset - CONFIG_SPACE_OFFSET, data);
            } else {
                data.fill(0);
            }
            return;
        }
        if data.len() != 4 || offset & 3 != 0 {
            warn_limited!("bad virtio-mmio read at {offset:#x} size {}", data.len());
            data.fill(0);
            return;
        }
        let v = match offset {
            REG_MAGIC => MMIO_MAGIC_VALUE,
            REG_VERSION => MMIO_VERSION,
            REG_DEVICE_ID => self.device.device_type(),
            REG_VENDOR_ID => MMIO_VENDOR_ID,
            REG_DEVICE_FEATURES => match self.regs.device_features_sel {
                0 => self.device.avail_features() as u32,
                1 => (self.device.avail_features() >> 32) as u32,
                _ => 0,
            },
            REG_QUEUE_NUM_MAX => self.selected_queue().map_or(0, |q| u32::from(q.max_size())),
            REG_QUEUE_READY => self.selected_queue().map_or(0, |q| u32::from(q.ready())),
            REG_INTERRUPT_STATUS => self.interrupt.status(),
            REG_STATUS => {
                let mut s = self.regs.status;
                if self.interrupt.needs_reset() {
                    s |= STATUS_DEVICE_NEEDS_RESET;
                }
                s
            }
            REG_QUEUE_DESC_LOW => self.selected_queue().map_or(0, |q| q.desc_table() as u32),
            REG_QUEUE_DESC_HIGH => self
                .selected_queue()
                .map_or(0, |q| (q.desc_table() >> 32) as u32),
            REG_QUEUE_AVAIL_LOW => self.selected_queue().map_or(0, |q| q.avail_ring() as u32),
            REG_QUEUE_AVAIL_HIGH => self
                .selected_queue()
                .map_or(0, |q| (q.avail_ring() >> 32) as u32),
            REG_QUEUE_USED_LOW => self.selected_queue().map_or(0, |q| q.used_ring() as u32),
            REG_QUEUE_USED_HIGH => self
                .selected_queue()
                .map_or(0, |q| (q.used_ring() >> 32) as u32),
            // No shared memory regions: length all ones means "does not exist".
            REG_SHM_LEN_LOW | REG_SHM_LEN_HIGH | REG_SHM_BASE_LOW | REG_SHM_BASE_HIGH => u32::MAX,
            REG_CONFIG_GENERATION => self.interrupt.config_generation(),
            _ => 0,
        };
        data.copy_from_slice(&v.to_le_bytes());
    }

    /// Handles a guest write at `offset` inside the device window. Register writes must be
    /// 4 bytes and aligned; bad accesses and writes to read-only / unknown registers are ignored.
    pub fn write(&mut self, offset: u64, data: &[u8]) {
        if offset >= CONFIG_SPACE_OFFSET {
            let in_window = offset
                .checked_add(data.len() as u64)
                .is_some_and(|end| end <= MMIO_WINDOW_SIZE);
            if in_window && matches!(data.len(), 1 | 2 | 4 | 8) {
                self.device.write_config(offset - CONFIG_SPACE_OFFSET, data);
            }
            return;
        }
        let Ok(bytes) = <[u8; 4]>::try_from(data) else {
            warn_limited!("bad virtio-mmio write at {offset:#x} size {}", data.len());
            return;
        };
        if offset & 3 != 0 {
            warn_limited!("unaligned virtio-mmio write at {offset:#x}");
            return;
        }
        let v = u32::from_le_bytes(bytes);
        match offset {
            REG_DEVICE_FEATURES_SEL => self.regs.device_features_sel = v,
            REG_DRIVER_FEATURES => {
                let s = self.regs.status;
                if s & STATUS_DRIVER == 0 || s & STATUS_FEATURES_OK != 0 {
                    warn_limited!("driver features written in status {s:#x}, ignored");
                    return;
                }
                let f = &mut self.regs.driver_features;
                match self.regs.driver_features_sel {
                    0 => *f = (*f & !0xffff_ffff) | u64::from(v),
                    1 => *f = (*f & 0xffff_ffff) | (u64::from(v) << 32),
                    _ => {}
                }
            }
            REG_DRIVER_FEATURES_SEL => self.regs.driver_features_sel = v,
            REG_QUEUE_SEL => self.regs.queue_sel = v,
            REG_QUEUE_NUM => {
                if let Some(q) = self.selected_queue_mut() {
                    // Invalid sizes (0, > max, not a power of two) are refused by virtio-queue.
                    if q.try_set_size(u16::try_from(v).unwrap_or(0)).is_err() {
                        warn_limited!("invalid queue size {v} ignored");
                    }
                }
            }
            REG_QUEUE_READY => {
                if let Some(q) = self.selected_queue_mut() {
                    q.set_ready(v == 1);
                }
            }
            REG_QUEUE_NOTIFY => self.notify(v),
            REG_INTERRUPT_ACK => self.interrupt.ack(v),
            REG_STATUS => self.write_status(v),
            REG_QUEUE_DESC_LOW => {
                if let Some(q) = self.selected_queue_mut() {
                    q.set_desc_table_address(Some(v), None);
                }
            }
            REG_QUEUE_DESC_HIGH => {
                if let Some(q) = self.selected_queue_mut() {
                    q.set_desc_table_address(None, Some(v));
                }
            }
            REG_QUEUE_AVAIL_LOW => {
                if let Some(q) = self.selected_queue_mut() {
                    q.set_avail_ring_address(Some(v), None);
                }
            }
            REG_QUEUE_AVAIL_HIGH => {
                if let Some(q) = self.selected_queue_mut() {
                    q.set_avail_ring_address(None, Some(v));
                }
            }
            REG_QUEUE_USED_LOW => {
                if let Some(q) = self.selected_queue_mut() {
                    q.set_used_ring_address(Some(v), None);
                }
            }
            REG_QUEUE_USED_HIGH => {
                if let Some(q) = self.selected_queue_mut() {
                    q.set_used_ring_address(None, Some(v));
                }
            }
            REG_SHM_SEL => self.regs.shm_sel = v,
            _ => warn_limited!("write to read-only or unknown virtio-mmio register {offset:#x}"),
        }
    }

    /// Fallback for `QueueNotify` writes that did not hit an ioeventfd: forward them to the
    /// queue's eventfd so that processing still happens on the event-loop thread.
    fn notify(&self, index: u32) {
        match self.queue_evts.get(index as usize) {
            Some(evt) => {
                if let Err(e) = evt.write(1) {
                    warn_limited!("failed to kick queue {index}: {e}");
                }
            }
            None => warn_limited!("notification for nonexistent queue {index}"),
        }
    }

    fn write_status(&mut self, v: u32) {
        if v == 0 {
            self.reset();
            return;
        }
        let old = self.regs.status;
        if v & old != old {
            warn_limited!("status {old:#x} -> {v:#x} clears bits without a reset, ignored");
            return;
        }
        let new_bits = v & !old;
        let mut status = v;
        if new_bits & STATUS_DRIVER != 0 && status & STATUS_ACKNOWLEDGE == 0 {
            warn_limited!("DRIVER set before ACKNOWLEDGE, ignored");
            return;
        }
        if new_bits & STATUS_FEATURES_OK != 0 && !self.accept_features() {
            status &= !STATUS_FEATURES_OK;
        }
        if new_bits & STATUS_DRIVER_OK != 0 {
            if status & STATUS_FEATURES_OK == 0 || status & STATUS_FAILED != 0 {
                warn_limited!("DRIVER_OK without FEATURES_OK, ignored");
                status &= !STATUS_DRIVER_OK;
            } else if let Err(e) = self.activate() {
                warn_limited!(
                    "activating virtio device {} failed: {e}",
                    self.device.device_type()
                );
                self.interrupt.set_needs_reset();
            }
        }
        self.regs.status = status;
    }

    /// Validates the features the driver wrote before it sets `FEATURES_OK`.
    fn accept_features(&mut self) -> bool {
        if self.regs.status & STATUS_DRIVER == 0 {
            warn_limited!("FEATURES_OK before DRIVER refused");
            return false;
        }
        let offered = self.device.avail_features();
        let wanted = self.regs.driver_features;
        if wanted & !offered != 0 {
            warn_limited!(
                "driver accepted features {:#x} the device did not offer, refused",
                wanted & !offered
            );
            return false;
        }
        if wanted & (1u64 << VIRTIO_F_VERSION_1) == 0 {
            warn_limited!("driver did not accept VIRTIO_F_VERSION_1, refused");
            return false;
        }
        self.device.ack_features(wanted);
        true
    }

    fn activate(&mut self) -> Result<(), Error> {
        if self.device.is_activated() {
            return Err(Error::AlreadyActivated);
        }
        let event_idx = self.regs.driver_features & (1u64 << VIRTIO_RING_F_EVENT_IDX) != 0;
        let mut queues = Vec::with_capacity(self.queues.len());
        for (i, q) in self.queues.iter().enumerate() {
            if !q.ready() || !q.is_valid(&self.mem) {
                return Err(Error::InvalidQueue(i));
            }
            let mut state = q.state();
            state.event_idx_enabled = event_idx;
            queues.push(Queue::try_from(state).map_err(|_| Error::InvalidQueue(i))?);
        }
        self.device
            .activate(self.mem.clone(), queues, self.interrupt.clone())?;
        // Have the event loop look at every queue once: picks up buffers the driver made
        // available before DRIVER_OK and work the device queued while inactive.
        for evt in &self.queue_evts {
            let _ = evt.write(1);
        }
        Ok(())
    }

    fn reset(&mut self) {
        if self.device.is_activated() {
            self.device.reset();
        }
        for q in &mut self.queues {
            q.reset();
        }
        self.regs = MmioRegisters::default();
        self.interrupt.reset();
    }
}

impl MutEventSubscriber for MmioTransport {
    fn init(&mut self, ops: &mut EventOps) {
        for (i, evt) in self.queue_evts.iter().enumerate() {
            if let Err(e) = ops.add(Events::with_data(evt, i as u32, EventSet::IN)) {
                eprintln!("zygote-vmm: virtio: cannot watch queue {i} eventfd: {e}");
            }
        }
        for (j, fd) in self.device.extra_fds().into_iter().enumerate() {
            let data = EXTRA_FD_DATA_BASE + j as u32;
            if let Err(e) = ops.add(Events::with_data_raw(fd, data, EventSet::IN)) {
                eprintln!("zygote-vmm: virtio: cannot watch device fd {fd}: {e}");
            }
        }
    }

    fn process(&mut self, events: Events, _ops: &mut EventOps) {
        let data = events.data();
        if let Some(evt) = self.queue_evts.get(data as usize) {
            if evt.as_raw_fd() != events.fd() {
                return;
            }
            // Drain the counter; several kicks are served by one pass over the queue.
            let _ = evt.read();
            if self.device.is_activated() {
                self.device.process_queue(data as usize);
            }
        } else if data >= EXTRA_FD_DATA_BASE {
            self.device
                .process_extra_fd((data - EXTRA_FD_DATA_BASE) as usize, events.event_set());
        }
    }
}

#[cfg(test)]
mod fuzz;

#[cfg(test)]
mod tests {
    use super::*;
    use crate::devices::virtio::test_utils::{
        mem, negotiate, r, setup_queue, w, DriverQueue, Dummy,
    };
    use crate::devices::virtio::VIRTIO_MMIO_INT_VRING;
    use std::sync::{Arc, Mutex};

    type Probes = (Arc<Mutex<u64>>, Arc<Mutex<Vec<usize>>>, Arc<Mutex<u32>>);

    fn transport() -> (MmioTransport, Probes) {
        let d = Dummy::default();
        let acked = d.acked.clone();
        let processed = d.processed.clone();
        let resets = d.resets.clone();
        (
            MmioTransport::new(Box::new(d), mem()).unwrap(),
            (acked, processed, resets),
        )
    }

    #[test]
    fn identification_registers() {
        let (mut t, ..) = transport();
        assert_eq!(r(&mut t, REG_MAGIC), 0x7472_6976);
        assert_eq!(r(&mut t, REG_VERSION), 2);
        assert_eq!(r(&mut t, REG_DEVICE_ID), 42);
        assert_eq!(r(&mut t, REG_VENDOR_ID), MMIO_VENDOR_ID);
        assert_eq!(r(&mut t, 0xe8), 0, "unknown register reads 0");
        assert_eq!(r(&mut t, REG_SHM_LEN_LOW), u32::MAX);
        // Bad sizes / alignment read as zero.
        let mut b = [0xffu8; 2];
        t.read(REG_MAGIC, &mut b);
        assert_eq!(b, [0, 0]);
        let mut b = [0xffu8; 4];
        t.read(REG_MAGIC + 1, &mut b);
        assert_eq!(b, [0; 4]);
        let mut b = [0xffu8; 8];
        t.read(REG_MAGIC, &mut b);
        assert_eq!(b, [0; 8]);
        // Queue registers.
        w(&mut t, REG_QUEUE_SEL, 0);
        assert_eq!(r(&mut t, REG_QUEUE_NUM_MAX), 16);
        w(&mut t, REG_QUEUE_SEL, 1);
        assert_eq!(r(&mut t, REG_QUEUE_NUM_MAX), 8);
        w(&mut t, REG_QUEUE_SEL, 2);
        assert_eq!(r(&mut t, REG_QUEUE_NUM_MAX), 0);
        assert_eq!(r(&mut t, REG_QUEUE_READY), 0);
        w(&mut t, REG_QUEUE_READY, 1); // nonexistent queue: ignored
                                       // Device features, both halves.
        w(&mut t, REG_DEVICE_FEATURES_SEL, 0);
        assert_eq!(r(&mut t, REG_DEVICE_FEATURES), (1 << 29) | 1);
        w(&mut t, REG_DEVICE_FEATURES_SEL, 1);
        assert_eq!(r(&mut t, REG_DEVICE_FEATURES), 1);
        w(&mut t, REG_DEVICE_FEATURES_SEL, 7);
        assert_eq!(r(&mut t, REG_DEVICE_FEATURES), 0);
        // Writes to read-only registers and bad writes do nothing.
        w(&mut t, REG_MAGIC, 0);
        t.write(REG_STATUS, &[1, 0]);
        t.write(REG_STATUS + 2, &1u32.to_le_bytes());
        assert_eq!(r(&mut t, REG_MAGIC), 0x7472_6976);
        assert_eq!(r(&mut t, REG_STATUS), 0);
    }

    #[test]
    fn config_space_access() {
        let (mut t, ..) = transport();
        t.write(0x100, &0x1122_3344_5566_7788u64.to_le_bytes());
        let mut b = [0u8; 4];
        t.read(0x104, &mut b);
        assert_eq!(u32::from_le_bytes(b), 0x1122_3344);
        let mut b = [0u8; 1];
        t.read(0x100, &mut b);
        assert_eq!(b[0], 0x88);
        let mut b = [0xffu8; 4];
        t.read(0x108, &mut b);
        assert_eq!(b, [0; 4], "beyond config space");
        let mut b = [0xffu8; 4];
        t.read(0xffe, &mut b);
        assert_eq!(b, [0; 4], "crossing the window end");
        let mut b = [0xffu8; 3];
        t.read(0x100, &mut b);
        assert_eq!(b, [0; 3], "odd size");
        assert_eq!(r(&mut t, REG_CONFIG_GENERATION), 0);
    }

    #[test]
    fn feature_negotiation() {
        let (mut t, (acked, ..)) = transport();
        let v1 = 1u64 << VIRTIO_F_VERSION_1;
        // Without VERSION_1: refused.
        assert_eq!(negotiate(&mut t, 1), STATUS_ACKNOWLEDGE | STATUS_DRIVER);
        // Features the device did not offer: refused.
        assert_eq!(
            negotiate(&mut t, v1 | (1 << 5)),
            STATUS_ACKNOWLEDGE | STATUS_DRIVER
        );
        assert_eq!(*acked.lock().unwrap(), 0);
        // A proper subset: accepted.
        assert_eq!(
            negotiate(&mut t, v1 | 1),
            STATUS_ACKNOWLEDGE | STATUS_DRIVER | STATUS_FEATURES_OK
        );
        assert_eq!(*acked.lock().unwrap(), v1 | 1);
        // Feature writes after FEATURES_OK are ignored.
        w(&mut t, REG_DRIVER_FEATURES_SEL, 0);
        w(&mut t, REG_DRIVER_FEATURES, 0);
        assert_eq!(t.registers().driver_features, v1 | 1);
        // Features written before DRIVER are ignored.
        w(&mut t, REG_STATUS, 0);
        w(&mut t, REG_DRIVER_FEATURES, 1);
        assert_eq!(t.registers().driver_features, 0);
    }

    #[test]
    fn status_state_machine_and_activation() {
        let m = mem();
        let (mut t, (_, processed, resets)) = transport();
        let q0 = DriverQueue::new(&m, 0x10000, 16);
        let q1 = DriverQueue::new(&m, 0x20000, 8);

        // DRIVER before ACKNOWLEDGE is ignored.
        w(&mut t, REG_STATUS, STATUS_DRIVER);
        assert_eq!(r(&mut t, REG_STATUS), 0);
        let v1 = 1u64 << VIRTIO_F_VERSION_1;
        assert_ne!(negotiate(&mut t, v1) & STATUS_FEATURES_OK, 0);
        let ok = STATUS_ACKNOWLEDGE | STATUS_DRIVER | STATUS_FEATURES_OK;

        // DRIVER_OK with queues not ready: the device is not activated and asks for a reset.
        w(&mut t, REG_STATUS, ok | STATUS_DRIVER_OK);
        assert!(!t.is_activated());
        assert_eq!(
            r(&mut t, REG_STATUS),
            ok | STATUS_DRIVER_OK | STATUS_DEVICE_NEEDS_RESET
        );
        // Reset clears everything.
        w(&mut t, REG_STATUS, 0);
        assert_eq!(r(&mut t, REG_STATUS), 0);
        assert_eq!(r(&mut t, REG_INTERRUPT_STATUS), 0);

        negotiate(&mut t, v1);
        setup_queue(&mut t, 0, &q0);
        // Invalid queue size is refused, valid sizes are kept.
        w(&mut t, REG_QUEUE_SEL, 1);
        w(&mut t, REG_QUEUE_NUM, 6);
        w(&mut t, REG_QUEUE_NUM, 64);
        setup_queue(&mut t, 1, &q1);
        // Clearing bits without a reset is ignored.
        w(&mut t, REG_STATUS, STATUS_ACKNOWLEDGE);
        assert_eq!(r(&mut t, REG_STATUS), ok);

        w(&mut t, REG_STATUS, ok | STATUS_DRIVER_OK);
        assert!(t.is_activated());
        assert_eq!(r(&mut t, REG_STATUS), ok | STATUS_DRIVER_OK);
        // Activation kicked every queue once.
        for evt in t.queue_events() {
            assert_eq!(evt.read().unwrap(), 1);
        }
        // Queue configuration is frozen after DRIVER_OK.
        w(&mut t, REG_QUEUE_SEL, 0);
        w(&mut t, REG_QUEUE_READY, 0);
        assert_eq!(r(&mut t, REG_QUEUE_READY), 1);
        let (d, _, _) = q0.addrs();
        assert_eq!(r(&mut t, REG_QUEUE_DESC_LOW), d as u32);

        // Notification by MMIO write lands in the queue eventfd.
        w(&mut t, REG_QUEUE_NOTIFY, 1);
        assert_eq!(t.queue_events()[1].read().unwrap(), 1);
        w(&mut t, REG_QUEUE_NOTIFY, 5); // nonexistent queue: ignored

        // Interrupt status / ack.
        t.interrupt().signal_used_queue();
        assert_eq!(r(&mut t, REG_INTERRUPT_STATUS), VIRTIO_MMIO_INT_VRING);
        w(&mut t, REG_INTERRUPT_ACK, VIRTIO_MMIO_INT_VRING);
        assert_eq!(r(&mut t, REG_INTERRUPT_STATUS), 0);

        // Event loop dispatch.
        let mut em: event_manager::EventManager<Arc<Mutex<dyn MutEventSubscriber + Send>>> =
            event_manager::EventManager::new().unwrap();
        let t = Arc::new(Mutex::new(t));
        event_manager::SubscriberOps::add_subscriber(&mut em, t.clone());
        t.lock().unwrap().queue_events()[1].write(1).unwrap();
        assert_eq!(em.run_with_timeout(1000).unwrap(), 1);
        assert_eq!(*processed.lock().unwrap(), vec![1]);

        // Reset through the status register resets the device.
        let mut t = t.lock().unwrap();
        w(&mut t, REG_STATUS, 0);
        assert!(!t.is_activated());
        assert_eq!(*resets.lock().unwrap(), 1);
        assert_eq!(r(&mut t, REG_QUEUE_READY), 0);
        assert_eq!(r(&mut t, REG_STATUS), 0);
    }

    #[test]
    fn invalid_queue_addresses_refuse_activation() {
        let m = mem();
        let (mut t, ..) = transport();
        let q0 = DriverQueue::new(&m, 0x10000, 16);
        let q1 = DriverQueue::new(&m, 0x20000, 8);
        negotiate(&mut t, 1u64 << VIRTIO_F_VERSION_1);
        setup_queue(&mut t, 0, &q0);
        setup_queue(&mut t, 1, &q1);
        // Move queue 1's used ring outside guest memory.
        w(&mut t, REG_QUEUE_SEL, 1);
        w(&mut t, REG_QUEUE_USED_HIGH, 1);
        let ok = STATUS_ACKNOWLEDGE | STATUS_DRIVER | STATUS_FEATURES_OK;
        w(&mut t, REG_STATUS, ok | STATUS_DRIVER_OK);
        assert!(!t.is_activated());
        assert_ne!(r(&mut t, REG_STATUS) & STATUS_DEVICE_NEEDS_RESET, 0);
        assert_ne!(r(&mut t, REG_INTERRUPT_STATUS) & 2, 0);
    }
}
