//! Test helpers: guest memory, raw descriptors and a driver-side split queue with proper ring
//! wrapping and descriptor recycling, so tests can push megabytes through a device; and a
//! [`Dummy`] device with register helpers for the transport's tests. Test code only: it
//! unwraps and asserts freely.

use std::collections::HashMap;

use std::sync::{Arc, Mutex};
use virtio_queue::desc::split::Descriptor as SplitDescriptor;
use virtio_queue::desc::RawDescriptor;

use virtio_queue::{Queue, QueueT};
use vm_memory::{ByteValued, Bytes, GuestAddress, GuestMemoryMmap};

use super::mmio::*;
use super::persist::DeviceModelState;
use super::{
    read_config_bytes, Error, Interrupt, MmioTransport, VirtioDevice, STATUS_ACKNOWLEDGE,
    STATUS_DRIVER, STATUS_FEATURES_OK, VIRTIO_F_VERSION_1, VIRTIO_RING_F_EVENT_IDX,
};

/// `VRING_DESC_F_NEXT`.
pub const DESC_NEXT: u16 = 1;
/// `VRING_DESC_F_WRITE`.
pub const DESC_WRITE: u16 = 2;

/// Size of the test guest memory.
pub const MEM_SIZE: usize = 16 << 20;

/// 16 MiB of guest memory at guest physical address 0.
pub fn mem() -> GuestMemoryMmap {
    GuestMemoryMmap::from_ranges(&[(GuestAddress(0), MEM_SIZE)]).unwrap()
}

/// A raw split descriptor.
pub fn desc(addr: u64, len: u32, flags: u16, next: u16) -> RawDescriptor {
    RawDescriptor::from(SplitDescriptor::new(addr, len, flags, next))
}

/// One buffer of a chain: (guest address, length, device-writable).
pub type Buf = (u64, u32, bool);

/// `virtio_queue::mock::VirtqUsedElem` as plain data.
#[derive(Debug, Clone, Copy, Default)]
#[repr(C)]
struct UsedElem {
    id: u32,
    len: u32,
}

// SAFETY: plain old data (two u32s, no padding).
unsafe impl ByteValued for UsedElem {}

/// The driver side of a split virtqueue, with ring wrapping and descriptor recycling.
///
/// It does its own ring layout instead of using `MockSplitQueue::create`: the mock computes
/// the used ring address from `SplitQueueRing::end()`, which counts avail ring *elements*, not
/// bytes, so for larger queues its used ring overlaps the second half of the available ring.
pub struct DriverQueue<'a> {
    mem: &'a GuestMemoryMmap,
    size: u16,
    desc_addr: u64,
    avail_addr: u64,
    used_addr: u64,
    free: Vec<u16>,
    chains: HashMap<u16, Vec<u16>>,
    avail_idx: u16,
    last_used: u16,
}

impl<'a> DriverQueue<'a> {
    /// Lays out a queue of `size` entries at `base` and zeroes its rings.
    pub fn new(mem: &'a GuestMemoryMmap, base: u64, size: u16) -> Self {
        let n = u64::from(size);
        let desc_addr = base;
        let avail_addr = desc_addr + 16 * n;
        let used_addr = (avail_addr + 6 + 2 * n + 3) & !3;
        let end = used_addr + 6 + 8 * n;
        mem.write_slice(&vec![0u8; (end - base) as usize], GuestAddress(base))
            .unwrap();
        DriverQueue {
            mem,
            size,
            desc_addr,
            avail_addr,
            used_addr,
            free: (0..size).rev().collect(),
            chains: HashMap::new(),
            avail_idx: 0,
            last_used: 0,
        }
    }

    /// A device-side `Queue` configured for this ring (as a transport would after setup).
    pub fn create_queue(&self) -> Queue {
        let mut q = Queue::new(self.size).unwrap();
        q.set_size(self.size);
        q.set_desc_table_address(
            Some(self.desc_addr as u32),
            Some((self.desc_addr >> 32) as u32),
        );
        q.set_avail_ring_address(
            Some(self.avail_addr as u32),
            Some((self.avail_addr >> 32) as u32),
        );
        q.set_used_ring_address(
            Some(self.used_addr as u32),
            Some((self.used_addr >> 32) as u32),
        );
        q.set_ready(true);
        q
    }

    /// (descriptor table, available ring, used ring) addresses.
    pub fn addrs(&self) -> (u64, u64, u64) {
        (self.desc_addr, self.avail_addr, self.used_addr)
    }

    /// Queue size.
    pub fn size(&self) -> u16 {
        self.size
    }

    /// Number of free descriptors.
    pub fn free_descriptors(&self) -> usize {
        self.free.len()
    }

    fn store_desc(&self, index: u16, d: RawDescriptor) {
        let addr = self.desc_addr + 16 * u64::from(index);
        self.mem.write_obj(d, GuestAddress(addr)).unwrap();
    }

    fn publish(&mut self, head: u16) {
        let slot = u64::from(self.avail_idx % self.size);
        self.mem
            .write_obj(head, GuestAddress(self.avail_addr + 4 + 2 * slot))
            .unwrap();
        self.avail_idx = self.avail_idx.wrapping_add(1);
        self.mem
            .write_obj(self.avail_idx, GuestAddress(self.avail_addr + 2))
            .unwrap();
    }

    /// Adds a well-formed chain and publishes it; returns its head index.
    pub fn add_chain(&mut self, bufs: &[Buf]) -> u16 {
        assert!(!bufs.is_empty() && bufs.len() <= self.free.len());
        let indices: Vec<u16> = (0..bufs.len()).map(|_| self.free.pop().unwrap()).collect();
        for (i, &(addr, len, writable)) in bufs.iter().enumerate() {
            let mut flags = if writable { DESC_WRITE } else { 0 };
            let mut next = 0;
            if i + 1 < bufs.len() {
                flags |= DESC_NEXT;
                next = indices[i + 1];
            }
            self.store_desc(indices[i], desc(addr, len, flags, next));
        }
        let head = indices[0];
        self.chains.insert(head, indices);
        self.publish(head);
        head
    }

    /// Stores raw descriptors at the given table indices and publishes `head` (for malformed
    /// chains). The indices are taken out of the free list.
    pub fn add_raw(&mut self, descs: &[(u16, RawDescriptor)], head: u16) {
        let mut used = Vec::new();
        for &(index, d) in descs {
            self.store_desc(index, d);
            self.free.retain(|&i| i != index);
            used.push(index);
        }
        self.chains.insert(head, used);
        self.publish(head);
    }

    /// Pops the next used element: (head index, written length).
    pub fn pop_used(&mut self) -> Option<(u16, u32)> {
        let used_idx: u16 = self.mem.read_obj(GuestAddress(self.used_addr + 2)).unwrap();
        if used_idx == self.last_used {
            return None;
        }
        let slot = u64::from(self.last_used % self.size);
        let elem: UsedElem = self
            .mem
            .read_obj(GuestAddress(self.used_addr + 4 + 8 * slot))
            .unwrap();
        self.last_used = self.last_used.wrapping_add(1);
        let head = elem.id as u16;
        if let Some(indices) = self.chains.remove(&head) {
            self.free.extend(indices);
        }
        Some((head, elem.len))
    }

    /// The driver's available index (next slot it fills).
    pub fn avail_idx(&self) -> u16 {
        self.avail_idx
    }

    /// Whether the driver must notify the device after moving the available index from `old`
    /// (honouring `avail_event` when `event_idx` is negotiated, like `vring_need_event()`).
    pub fn needs_kick(&self, event_idx: bool, old: u16) -> bool {
        if !event_idx {
            let flags: u16 = self.mem.read_obj(GuestAddress(self.used_addr)).unwrap();
            return flags & 1 == 0;
        }
        let new = self.avail_idx;
        let event = self.avail_event();
        new.wrapping_sub(event).wrapping_sub(1) < new.wrapping_sub(old)
    }

    /// Writes the `used_event` field (driver side of `VIRTIO_RING_F_EVENT_IDX`).
    pub fn set_used_event(&self, value: u16) {
        let addr = self.avail_addr + 4 + 2 * u64::from(self.size);
        self.mem.write_obj(value, GuestAddress(addr)).unwrap();
    }

    /// Reads the `avail_event` field the device wrote.
    pub fn avail_event(&self) -> u16 {
        let addr = self.used_addr + 4 + 8 * u64::from(self.size);
        self.mem.read_obj(GuestAddress(addr)).unwrap()
    }
}

/// A device that records what the transport does to it.
#[derive(Default)]
pub struct Dummy {
    /// The features the transport acknowledged.
    pub acked: Arc<Mutex<u64>>,
    activated: bool,
    /// The queues the device was asked to process, in order.
    pub processed: Arc<Mutex<Vec<usize>>>,
    config: [u8; 8],
    /// How many times the device was reset.
    pub resets: Arc<Mutex<u32>>,
    queues: Vec<Queue>,
}

impl VirtioDevice for Dummy {
    fn device_type(&self) -> u32 {
        42
    }
    fn queue_max_sizes(&self) -> &[u16] {
        &[16, 8]
    }
    fn avail_features(&self) -> u64 {
        (1 << VIRTIO_F_VERSION_1) | (1 << VIRTIO_RING_F_EVENT_IDX) | 1
    }
    fn ack_features(&mut self, features: u64) {
        *self.acked.lock().unwrap() = features;
    }
    fn read_config(&self, offset: u64, data: &mut [u8]) {
        read_config_bytes(&self.config, offset, data);
    }
    fn write_config(&mut self, offset: u64, data: &[u8]) {
        let o = offset as usize;
        if o + data.len() <= 8 {
            self.config[o..o + data.len()].copy_from_slice(data);
        }
    }
    fn activate(
        &mut self,
        _mem: GuestMemoryMmap,
        queues: Vec<Queue>,
        _interrupt: Interrupt,
    ) -> Result<(), Error> {
        assert_eq!(queues.len(), 2);
        self.activated = true;
        self.queues = queues;
        Ok(())
    }
    fn queues(&self) -> &[Queue] {
        &self.queues
    }
    fn is_activated(&self) -> bool {
        self.activated
    }
    fn reset(&mut self) {
        self.activated = false;
        self.queues.clear();
        *self.resets.lock().unwrap() += 1;
    }
    fn process_queue(&mut self, index: usize) {
        self.processed.lock().unwrap().push(index);
    }
    fn save_model(&self) -> DeviceModelState {
        unreachable!("the transport tests never save a Dummy's model")
    }
}

/// Reads register `off` of `t`.
pub fn r(t: &mut MmioTransport, off: u64) -> u32 {
    let mut b = [0u8; 4];
    t.read(off, &mut b);
    u32::from_le_bytes(b)
}

/// Writes `v` to register `off` of `t`.
pub fn w(t: &mut MmioTransport, off: u64, v: u32) {
    t.write(off, &v.to_le_bytes());
}

/// Resets `t` and negotiates `features` as a driver does; returns the status register.
pub fn negotiate(t: &mut MmioTransport, features: u64) -> u32 {
    w(t, REG_STATUS, 0);
    w(t, REG_STATUS, STATUS_ACKNOWLEDGE);
    w(t, REG_STATUS, STATUS_ACKNOWLEDGE | STATUS_DRIVER);
    w(t, REG_DRIVER_FEATURES_SEL, 0);
    w(t, REG_DRIVER_FEATURES, features as u32);
    w(t, REG_DRIVER_FEATURES_SEL, 1);
    w(t, REG_DRIVER_FEATURES, (features >> 32) as u32);
    w(
        t,
        REG_STATUS,
        STATUS_ACKNOWLEDGE | STATUS_DRIVER | STATUS_FEATURES_OK,
    );
    r(t, REG_STATUS)
}

/// Configures queue `index` of `t` at `dq`'s rings and marks it ready.
pub fn setup_queue(t: &mut MmioTransport, index: u32, dq: &DriverQueue) {
    let (d, a, u) = dq.addrs();
    w(t, REG_QUEUE_SEL, index);
    assert_eq!(r(t, REG_QUEUE_READY), 0);
    w(t, REG_QUEUE_NUM, u32::from(dq.size()));
    w(t, REG_QUEUE_DESC_LOW, d as u32);
    w(t, REG_QUEUE_DESC_HIGH, (d >> 32) as u32);
    w(t, REG_QUEUE_AVAIL_LOW, a as u32);
    w(t, REG_QUEUE_AVAIL_HIGH, (a >> 32) as u32);
    w(t, REG_QUEUE_USED_LOW, u as u32);
    w(t, REG_QUEUE_USED_HIGH, (u >> 32) as u32);
    w(t, REG_QUEUE_READY, 1);
    assert_eq!(r(t, REG_QUEUE_READY), 1);
}
