//! Randomized drivers for the device queue tests: proptest strategies for
//! what a hostile guest puts into a split virtqueue (descriptor tables with
//! any address, length, flag and next index, indirect tables, available
//! rings with out-of-range heads and index jumps), a [`RingDriver`] that
//! writes them into guest memory, and [`walk`], an independent model of
//! which chains a device must accept.
//!
//! [`walk`] follows the virtio spec as virtio-queue implements it (a chain
//! ends after `queue size` descriptors, at an index outside its table, at
//! an unreadable descriptor, at 4 GiB in total), this VMM's devices' rule
//! that a chain must not refer to an indirect table (they do not offer
//! `VIRTIO_RING_F_INDIRECT_DESC`) and [`super::chain::ChainBuffers`]'s
//! rules (one direction, every non-empty buffer inside guest memory, no
//! dangling NEXT). It must stay independent of that code: a test compares
//! the two.
//! Test code only.

use std::ops::Range;

use proptest::prelude::*;
use proptest::strategy::Union;
use virtio_queue::Queue;
use vm_memory::{Bytes, GuestAddress, GuestMemory, GuestMemoryMmap, Permissions};

use super::test_utils::{desc, DriverQueue, DESC_NEXT, DESC_WRITE, MEM_SIZE};

/// `VRING_DESC_F_INDIRECT`.
pub const DESC_INDIRECT: u16 = 4;

/// Where one queue's rings, buffers and indirect tables live in the test
/// guest memory ([`super::test_utils::mem`], 16 MiB).
///
/// For [`Mode::Predictable`], whatever [`walk`] reads (rings, indirect
/// tables) must lie below every data area a device writes: a buffer may
/// run from its data area up to the end of guest memory, never below.
#[derive(Debug, Clone)]
pub struct Area {
    /// Base of the rings (descriptor table, available ring, used ring).
    pub rings: u64,
    /// Where the queue's buffers point.
    pub data: Range<u64>,
    /// Where its indirect descriptor tables are.
    pub indirect: Range<u64>,
    /// Addresses in the data area that buffers favour (where a test put
    /// packet headers).
    pub hot: Vec<u64>,
}

/// Descriptors that fit in an indirect area.
pub fn indirect_slots(area: &Area) -> usize {
    ((area.indirect.end - area.indirect.start) / 16) as usize
}

/// One descriptor as a guest may write it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct GenDesc {
    /// Buffer address.
    pub addr: u64,
    /// Buffer length.
    pub len: u32,
    /// `DESC_*` flags, or any bits.
    pub flags: u16,
    /// Next index.
    pub next: u16,
}

/// How wild the addresses get.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Mode {
    /// Buffers in the queue's data area, its indirect area or outside guest
    /// memory: never on the rings, so that [`walk`] can predict.
    Predictable,
    /// Also anywhere in guest memory, rings and other queues included.
    Chaos,
}

/// A buffer address: in the data area (often at one of its hot spots),
/// near or past the end of guest memory, or (in chaos) anywhere.
fn buffer_addr(area: &Area, mode: Mode) -> BoxedStrategy<u64> {
    let mem = MEM_SIZE as u64;
    let mut arms: Vec<(u32, BoxedStrategy<u64>)> = vec![
        (8, area.data.clone().boxed()),
        (1, (0u64..0x2000).prop_map(move |d| mem - d).boxed()),
        (1, (0u64..1 << 32).prop_map(move |d| mem + d).boxed()),
        (1, (0u64..0x100).prop_map(|d| u64::MAX - d).boxed()),
    ];
    if !area.hot.is_empty() {
        arms.push((8, prop::sample::select(area.hot.clone()).boxed()));
    }
    if mode == Mode::Chaos {
        arms.push((6, (0..mem).boxed()));
    }
    Union::new_weighted(arms).boxed()
}

/// An indirect table's address: mostly in the indirect area (aligned or
/// not), or where a buffer could be.
fn table_addr(area: &Area, mode: Mode) -> BoxedStrategy<u64> {
    let indirect = area.indirect.clone();
    let slots = indirect_slots(area) as u64;
    prop_oneof![
        6 => (0..slots).prop_map(move |i| indirect.start + 16 * i),
        1 => area.indirect.clone(),
        1 => buffer_addr(area, mode),
    ]
    .boxed()
}

fn len() -> impl Strategy<Value = u32> {
    prop_oneof![
        2 => Just(0u32),
        3 => 1u32..64,
        2 => Just(44u32),
        2 => (1u32..32).prop_map(|n| 16 * n),
        3 => 64u32..0x4000,
        1 => (0u32..16).prop_map(|d| u32::MAX - d),
        1 => any::<u32>(),
    ]
}

fn flags(writable: bool) -> impl Strategy<Value = u16> {
    let dir = if writable { DESC_WRITE } else { 0 };
    prop_oneof![
        6 => prop::bool::weighted(0.4).prop_map(move |n| dir | if n { DESC_NEXT } else { 0 }),
        3 => 0u16..8,
        1 => any::<u16>(),
    ]
}

/// A descriptor at `index` of a table of `size` entries: its next index is
/// mostly the following entry (chains), sometimes any.
fn gen_desc(
    area: &Area,
    mode: Mode,
    writable: bool,
    index: u16,
    size: u16,
) -> impl Strategy<Value = GenDesc> {
    let next = prop_oneof![
        4 => Just((index.wrapping_add(1)) % size.max(1)),
        3 => 0..size.max(1),
        1 => any::<u16>(),
    ];
    // A buffer never lies on an indirect table: the device writes buffers,
    // and a predictable table must stay as the driver wrote it.
    (
        buffer_addr(area, mode),
        table_addr(area, mode),
        len(),
        flags(writable),
        next,
    )
        .prop_map(|(buffer, table, len, flags, next)| GenDesc {
            addr: if flags & DESC_INDIRECT != 0 {
                table
            } else {
                buffer
            },
            len,
            flags,
            next,
        })
}

/// What the driver does between two notifications.
#[derive(Debug, Clone)]
pub struct Round {
    /// Heads it publishes in the available ring, in order.
    pub heads: Vec<u16>,
    /// Instead of `heads`, it sets the available index this far ahead of
    /// what it published (a corrupted ring), if set.
    pub jump: Option<u16>,
    /// Descriptor table entries it rewrites first.
    pub rewrites: Vec<(u16, GenDesc)>,
    /// `used_event` (with `VIRTIO_RING_F_EVENT_IDX`).
    pub used_event: u16,
}

/// Everything a guest does to one queue.
#[derive(Debug, Clone)]
pub struct QueueScript {
    /// Queue size (a power of two up to the device's maximum).
    pub size: u16,
    /// `VIRTIO_RING_F_EVENT_IDX` negotiated.
    pub event_idx: bool,
    /// The descriptor table.
    pub table: Vec<GenDesc>,
    /// The indirect area's descriptors.
    pub indirect: Vec<GenDesc>,
    /// What it does, one notification each.
    pub rounds: Vec<Round>,
}

/// A script for a queue of at most `max_size` entries in `area`, whose
/// buffers should be device-writable (`writable`) or device-readable.
pub fn queue_script(
    area: Area,
    max_size: u16,
    writable: bool,
    mode: Mode,
    rounds: Range<usize>,
) -> impl Strategy<Value = QueueScript> {
    let max_log = max_size.trailing_zeros();
    (0..=max_log, any::<bool>()).prop_flat_map(move |(log, event_idx)| {
        let size = 1u16 << log;
        let table: Vec<_> = (0..size)
            .map(|i| gen_desc(&area, mode, writable, i, size))
            .collect();
        let slots = indirect_slots(&area) as u16;
        let indirect: Vec<_> = (0..slots)
            .map(|i| gen_desc(&area, mode, writable, i, slots))
            .collect();
        let head = prop_oneof![8 => 0..size, 1 => any::<u16>()];
        let round = (
            prop::collection::vec(head, 0..=usize::from(size) + 2),
            prop::option::weighted(0.08, 1..u16::MAX),
            prop::collection::vec((0..size, gen_desc(&area, mode, writable, 0, size)), 0..4),
            any::<u16>(),
        )
            .prop_map(|(heads, jump, rewrites, used_event)| Round {
                heads,
                jump,
                rewrites,
                used_event,
            });
        (
            Just(size),
            Just(event_idx),
            table,
            indirect,
            prop::collection::vec(round, rounds.clone()),
        )
            .prop_map(|(size, event_idx, table, indirect, rounds)| QueueScript {
                size,
                event_idx,
                table,
                indirect,
                rounds,
            })
    })
}

/// The driver side of one queue, writing a [`QueueScript`] into memory.
pub struct RingDriver<'a> {
    mem: &'a GuestMemoryMmap,
    dq: DriverQueue<'a>,
    /// Next available index the driver publishes.
    avail: u16,
    /// Used entries read so far.
    used_seen: u16,
}

fn raw(d: GenDesc) -> virtio_queue::desc::RawDescriptor {
    desc(d.addr, d.len, d.flags, d.next)
}

impl<'a> RingDriver<'a> {
    /// Lays out the rings of `script` in `area` and writes its descriptor
    /// and indirect tables.
    pub fn new(mem: &'a GuestMemoryMmap, area: &Area, script: &QueueScript) -> Self {
        let dq = DriverQueue::new(mem, area.rings, script.size);
        let d = RingDriver {
            mem,
            dq,
            avail: 0,
            used_seen: 0,
        };
        for (i, g) in script.table.iter().enumerate() {
            d.write_desc(i as u16, *g);
        }
        for (i, g) in script.indirect.iter().enumerate() {
            mem.write_obj(raw(*g), GuestAddress(area.indirect.start + 16 * i as u64))
                .unwrap();
        }
        d
    }

    /// The device's queue, as a transport would configure it.
    pub fn queue(&self, event_idx: bool) -> Queue {
        let mut q = self.dq.create_queue();
        virtio_queue::QueueT::set_event_idx(&mut q, event_idx);
        q
    }

    /// The descriptor table's address.
    pub fn desc_table(&self) -> u64 {
        self.dq.addrs().0
    }

    /// The queue size.
    pub fn size(&self) -> u16 {
        self.dq.size()
    }

    /// The available index published so far.
    pub fn avail_idx(&self) -> u16 {
        self.avail
    }

    fn write_desc(&self, index: u16, g: GenDesc) {
        let addr = self.desc_table() + 16 * u64::from(index);
        self.mem.write_obj(raw(g), GuestAddress(addr)).unwrap();
    }

    /// Does `round`'s writes: rewrites, then the heads (or the jump), the
    /// available index and `used_event`.
    pub fn play(&mut self, round: &Round) {
        let (_, avail, _) = self.dq.addrs();
        for &(i, g) in &round.rewrites {
            self.write_desc(i, g);
        }
        let size = self.size();
        match round.jump {
            Some(ahead) => self.avail = self.avail.wrapping_add(ahead),
            None => {
                for &h in &round.heads {
                    let slot = u64::from(self.avail % size);
                    self.mem
                        .write_obj(h, GuestAddress(avail + 4 + 2 * slot))
                        .unwrap();
                    self.avail = self.avail.wrapping_add(1);
                }
            }
        }
        self.mem
            .write_obj(self.avail, GuestAddress(avail + 2))
            .unwrap();
        self.mem
            .write_obj(
                round.used_event,
                GuestAddress(avail + 4 + 2 * u64::from(size)),
            )
            .unwrap();
    }

    /// The used ring's index as the device wrote it.
    pub fn used_idx(&self) -> u16 {
        let (_, _, used) = self.dq.addrs();
        self.mem.read_obj(GuestAddress(used + 2)).unwrap()
    }

    /// The used entries the device added since the last call: (id, len).
    pub fn take_used(&mut self) -> Vec<(u32, u32)> {
        let (_, _, used) = self.dq.addrs();
        let end = self.used_idx();
        let mut out = Vec::new();
        while self.used_seen != end {
            let slot = u64::from(self.used_seen % self.size());
            let at = used + 4 + 8 * slot;
            let id: u32 = self.mem.read_obj(GuestAddress(at)).unwrap();
            let len: u32 = self.mem.read_obj(GuestAddress(at + 4)).unwrap();
            out.push((id, len));
            self.used_seen = self.used_seen.wrapping_add(1);
        }
        out
    }

    /// The head the driver published at available index `idx`.
    pub fn head_at(&self, idx: u16) -> u16 {
        let (_, avail, _) = self.dq.addrs();
        let slot = u64::from(idx % self.size());
        self.mem
            .read_obj(GuestAddress(avail + 4 + 2 * slot))
            .unwrap()
    }
}

/// What a device must make of one chain.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Verdict {
    /// Acceptable: its non-empty buffers, in order.
    Valid(Vec<(u64, usize)>),
    /// Malformed: the device refuses it.
    Invalid,
}

impl Verdict {
    /// Total bytes of a valid chain.
    pub fn len(&self) -> Option<usize> {
        match self {
            Verdict::Valid(segs) => Some(segs.iter().map(|s| s.1).sum()),
            Verdict::Invalid => None,
        }
    }
}

/// Reads a descriptor: (addr, len, flags, next).
fn read_desc(mem: &GuestMemoryMmap, at: u64) -> Option<(u64, u32, u16, u16)> {
    let mut b = [0u8; 16];
    mem.read_slice(&mut b, GuestAddress(at)).ok()?;
    Some((
        u64::from_le_bytes(b[0..8].try_into().unwrap()),
        u32::from_le_bytes(b[8..12].try_into().unwrap()),
        u16::from_le_bytes(b[12..14].try_into().unwrap()),
        u16::from_le_bytes(b[14..16].try_into().unwrap()),
    ))
}

/// The model: what the chain at `head` of the table at `desc_table` (of
/// `size` entries) is, for a device that wants writable (`writable`) or
/// readable buffers. No device here offers indirect tables: a chain that
/// refers to one is malformed.
pub fn walk(
    mem: &GuestMemoryMmap,
    desc_table: u64,
    size: u16,
    head: u16,
    writable: bool,
) -> Verdict {
    let mut next = head;
    let mut ttl = size;
    let mut total: u32 = 0;
    let mut count = 0usize;
    let mut dangling = false;
    let mut segs = Vec::new();
    loop {
        if ttl == 0 || next >= size {
            break;
        }
        let Some(at) = desc_table.checked_add(16 * u64::from(next)) else {
            break;
        };
        let Some((addr, len, flags, nxt)) = read_desc(mem, at) else {
            break;
        };
        if flags & DESC_INDIRECT != 0 {
            return Verdict::Invalid;
        }
        let Some(t) = total.checked_add(len) else {
            // More than 4 GiB: the chain ends here, dangling.
            return Verdict::Invalid;
        };
        total = t;
        if flags & DESC_NEXT != 0 {
            next = nxt;
            ttl -= 1;
        } else {
            ttl = 0;
        }
        count += 1;
        dangling = flags & DESC_NEXT != 0;
        if (flags & DESC_WRITE != 0) != writable {
            return Verdict::Invalid;
        }
        if len == 0 {
            continue;
        }
        let perm = if writable {
            Permissions::Write
        } else {
            Permissions::Read
        };
        if !mem.check_range(GuestAddress(addr), len as usize, perm) {
            return Verdict::Invalid;
        }
        segs.push((addr, len as usize));
    }
    if count == 0 || dangling {
        return Verdict::Invalid;
    }
    Verdict::Valid(segs)
}

/// Reads `n` bytes of a valid chain's buffers from the start.
pub fn read_chain(mem: &GuestMemoryMmap, segs: &[(u64, usize)], n: usize) -> Vec<u8> {
    let mut out = Vec::with_capacity(n);
    for &(addr, len) in segs {
        if out.len() == n {
            break;
        }
        let take = len.min(n - out.len());
        let mut b = vec![0u8; take];
        mem.read_slice(&mut b, GuestAddress(addr)).unwrap();
        out.extend_from_slice(&b);
    }
    out
}

/// Proptest settings of the VMM's randomized tests: a fixed number of
/// cases (`PROPTEST_CASES` overrides it, for a deeper run), no regression
/// files (failures are turned into named tests).
pub fn config(cases: u32) -> ProptestConfig {
    ProptestConfig {
        // PROPTEST_CASES, when set, runs that many instead (a deeper run).
        cases: match std::env::var_os("PROPTEST_CASES") {
            Some(_) => ProptestConfig::default().cases,
            None => cases,
        },
        failure_persistence: None,
        ..ProptestConfig::default()
    }
}
