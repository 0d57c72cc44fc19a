//! Counts what wakes a VM, so that an idle VM's cost can be explained by
//! cause: the vCPUs' exits to the VMM (counted here, by the run loop), the
//! KVM statistics of each vCPU (halts, wake-ups of a halted vCPU thread,
//! injected interrupts, exits; read from KVM's binary statistics file
//! descriptor, `KVM_GET_STATS_FD`), and the interrupts each virtio device
//! raised (counted by its [`Interrupt`]).
//!
//! [`WakeupReporter`] writes them as one [`Event::Wakeups`] when the VMM is
//! sent [`WAKEUPS_SIGNAL`], on the device event loop (a signalfd). Nothing
//! here runs otherwise: no timer, no thread, so counting costs an idle VM
//! nothing. It must not count anything the devices or KVM count, nor hold
//! a transport's lock.

use std::collections::BTreeMap;
use std::fs::File;
use std::io;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};
use std::os::unix::fs::FileExt;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;

use event_manager::{EventOps, EventSet, Events, MutEventSubscriber};
use kvm_ioctls::VcpuFd;
use proto::events::{now_us, Event, EventSink, WakeupCounts, WAKEUPS_SIGNAL};

use crate::devices::virtio::Interrupt;

/// `KVM_GET_STATS_FD` (`_IO(KVMIO, 0xce)`).
const KVM_GET_STATS_FD: libc::c_ulong = 0xae << 8 | 0xce;
/// Size of `struct kvm_stats_header`.
const STATS_HEADER_LEN: usize = 24;
/// Size of `struct kvm_stats_desc` without its name.
const STATS_DESC_LEN: usize = 16;
/// `KVM_STATS_TYPE_MASK` and `KVM_STATS_TYPE_CUMULATIVE`.
const STATS_TYPE_MASK: u32 = 0xf;
const STATS_TYPE_CUMULATIVE: u32 = 0;
/// Largest statistics descriptor block read (KVM's has ~50 entries of
/// ~64 bytes): a bound on what a broken kernel could make us allocate.
const MAX_STATS_BLOCK: usize = 1 << 20;

/// The KVM statistics read, by KVM's names, in [`KvmCounts`] order.
const KVM_STATS: [&str; 4] = ["halt_exits", "halt_wakeup", "irq_injections", "exits"];

/// Why a vCPU's run loop got control back from `KVM_RUN`.
#[derive(Debug, Clone, Copy)]
pub enum VmmExit {
    /// Port I/O the VMM emulates.
    Pio,
    /// MMIO the VMM emulates (virtio registers).
    Mmio,
    /// A signal (the kick) interrupted `KVM_RUN`.
    Interrupted,
}

/// Exits to the VMM, shared by the vCPU threads (relaxed atomics: a count
/// read a moment late is fine).
#[derive(Debug, Default)]
pub struct ExitCounters {
    pio: AtomicU64,
    mmio: AtomicU64,
    interrupted: AtomicU64,
}

impl ExitCounters {
    /// Counts one exit.
    pub fn count(&self, exit: VmmExit) {
        let c = match exit {
            VmmExit::Pio => &self.pio,
            VmmExit::Mmio => &self.mmio,
            VmmExit::Interrupted => &self.interrupted,
        };
        c.fetch_add(1, Ordering::Relaxed);
    }

    fn by_reason(&self) -> BTreeMap<String, u64> {
        [
            ("pio", &self.pio),
            ("mmio", &self.mmio),
            ("interrupted", &self.interrupted),
        ]
        .into_iter()
        .map(|(k, v)| (k.to_string(), v.load(Ordering::Relaxed)))
        .collect()
    }
}

/// Errors reading KVM's statistics.
#[derive(Debug, thiserror::Error)]
pub enum StatsError {
    /// `KVM_GET_STATS_FD` failed (a kernel before 5.14, or no support).
    #[error("KVM has no statistics file descriptor for this vCPU")]
    NoStatsFd(#[source] io::Error),
    /// Reading the statistics file failed.
    #[error("cannot read KVM's statistics")]
    Read(#[source] io::Error),
    /// The statistics file is not laid out as `struct kvm_stats_header` says.
    #[error("KVM's statistics file is malformed: {0}")]
    Malformed(&'static str),
}

/// Where each statistic of [`KVM_STATS`] lives in the data block.
#[derive(Debug, Clone, PartialEq, Eq)]
struct StatsLayout {
    data_offset: u64,
    /// Byte offset of each statistic inside the data block.
    offsets: [Option<u32>; KVM_STATS.len()],
    /// Bytes of the data block to read: up to the last wanted statistic.
    len: usize,
}

fn u32_at(b: &[u8], at: usize) -> Option<u32> {
    Some(u32::from_le_bytes(b.get(at..at + 4)?.try_into().ok()?))
}

fn u16_at(b: &[u8], at: usize) -> Option<u16> {
    Some(u16::from_le_bytes(b.get(at..at + 2)?.try_into().ok()?))
}

/// Header fields: name size, descriptor count, descriptor offset, data offset.
fn parse_header(h: &[u8]) -> Result<(usize, usize, u64, u64), StatsError> {
    let bad = || StatsError::Malformed("short header");
    Ok((
        u32_at(h, 4).ok_or_else(bad)? as usize,
        u32_at(h, 8).ok_or_else(bad)? as usize,
        u64::from(u32_at(h, 16).ok_or_else(bad)?),
        u64::from(u32_at(h, 20).ok_or_else(bad)?),
    ))
}

/// Finds the wanted statistics among `count` descriptors of `name_size`
/// name bytes each. Only single-value cumulative counters are taken.
fn parse_descriptors(
    descs: &[u8],
    count: usize,
    name_size: usize,
    data_offset: u64,
) -> Result<StatsLayout, StatsError> {
    let step = STATS_DESC_LEN + name_size;
    let mut offsets = [None; KVM_STATS.len()];
    let mut len = 0usize;
    for i in 0..count {
        let d = descs
            .get(i * step..(i + 1) * step)
            .ok_or(StatsError::Malformed("short descriptor block"))?;
        let (Some(flags), Some(size), Some(offset)) = (u32_at(d, 0), u16_at(d, 6), u32_at(d, 8))
        else {
            return Err(StatsError::Malformed("short descriptor"));
        };
        let raw = &d[STATS_DESC_LEN..];
        let name = &raw[..raw.iter().position(|&b| b == 0).unwrap_or(raw.len())];
        let Some(slot) = KVM_STATS.iter().position(|n| n.as_bytes() == name) else {
            continue;
        };
        if flags & STATS_TYPE_MASK != STATS_TYPE_CUMULATIVE || size != 1 {
            continue;
        }
        offsets[slot] = Some(offset);
        len = len.max(offset as usize + 8);
    }
    Ok(StatsLayout {
        data_offset,
        offsets,
        len,
    })
}

/// The counts of [`KVM_STATS`], from one read of a data block.
fn values(layout: &StatsLayout, data: &[u8]) -> [Option<u64>; KVM_STATS.len()] {
    layout.offsets.map(|o| {
        let at = o? as usize;
        Some(u64::from_le_bytes(data.get(at..at + 8)?.try_into().ok()?))
    })
}

/// KVM's statistics of one vCPU.
pub struct VcpuStats {
    file: File,
    layout: StatsLayout,
}

impl VcpuStats {
    /// Opens the statistics of `vcpu` and finds the counters it reads.
    pub fn open(vcpu: &VcpuFd) -> Result<Self, StatsError> {
        // SAFETY: KVM_GET_STATS_FD takes no argument and returns a new fd
        // (or -1); it does not touch our memory.
        let fd = unsafe { libc::ioctl(vcpu.as_raw_fd(), KVM_GET_STATS_FD, 0) };
        if fd < 0 {
            return Err(StatsError::NoStatsFd(io::Error::last_os_error()));
        }
        // SAFETY: the ioctl returned a new fd that nothing else owns.
        let file = File::from(unsafe { OwnedFd::from_raw_fd(fd) });
        let mut header = [0u8; STATS_HEADER_LEN];
        file.read_exact_at(&mut header, 0)
            .map_err(StatsError::Read)?;
        let (name_size, count, desc_offset, data_offset) = parse_header(&header)?;
        let block = count
            .checked_mul(STATS_DESC_LEN + name_size)
            .filter(|&n| n <= MAX_STATS_BLOCK)
            .ok_or(StatsError::Malformed("descriptor block too large"))?;
        let mut descs = vec![0u8; block];
        file.read_exact_at(&mut descs, desc_offset)
            .map_err(StatsError::Read)?;
        let layout = parse_descriptors(&descs, count, name_size, data_offset)?;
        Ok(VcpuStats { file, layout })
    }

    fn read(&self) -> [Option<u64>; KVM_STATS.len()] {
        let mut data = vec![0u8; self.layout.len];
        match self.file.read_exact_at(&mut data, self.layout.data_offset) {
            Ok(()) => values(&self.layout, &data),
            Err(_) => [None; KVM_STATS.len()],
        }
    }
}

/// Blocks [`WAKEUPS_SIGNAL`] in the calling thread and in every thread it
/// starts from now on, and returns a signalfd that reads it. Call it on
/// the VMM's main thread before any other thread exists, so that the
/// signal is never delivered as a signal (whose default ends the process).
pub fn wakeups_signal_fd() -> io::Result<File> {
    // SAFETY: an all-zero sigset_t is valid storage; sigemptyset and
    // sigaddset initialise it.
    let mut set: libc::sigset_t = unsafe { std::mem::zeroed() };
    // SAFETY: `set` is valid; the calls only write it.
    unsafe {
        libc::sigemptyset(&mut set);
        libc::sigaddset(&mut set, WAKEUPS_SIGNAL);
    }
    // SAFETY: `set` is initialised; a NULL old-set pointer is allowed.
    let rc = unsafe { libc::pthread_sigmask(libc::SIG_BLOCK, &set, std::ptr::null_mut()) };
    if rc != 0 {
        return Err(io::Error::from_raw_os_error(rc));
    }
    // SAFETY: `set` is initialised; -1 asks for a new fd.
    let fd = unsafe { libc::signalfd(-1, &set, libc::SFD_NONBLOCK | libc::SFD_CLOEXEC) };
    if fd < 0 {
        return Err(io::Error::last_os_error());
    }
    // SAFETY: signalfd returned a new fd that nothing else owns.
    Ok(File::from(unsafe { OwnedFd::from_raw_fd(fd) }))
}

/// Writes [`Event::Wakeups`] when asked (see the module docs). Add it to
/// the device event loop.
pub struct WakeupReporter {
    signal: File,
    vcpus: Vec<VcpuStats>,
    exits: Arc<ExitCounters>,
    irqs: Vec<(String, Interrupt)>,
    events: Arc<EventSink>,
}

impl WakeupReporter {
    /// Reports the counts of `vcpus` (KVM's), `exits` and the devices'
    /// `irqs` (name, interrupt) when `signal` (from
    /// [`wakeups_signal_fd`]) reads a request.
    pub fn new(
        signal: File,
        vcpus: Vec<VcpuStats>,
        exits: Arc<ExitCounters>,
        irqs: Vec<(String, Interrupt)>,
        events: Arc<EventSink>,
    ) -> Self {
        WakeupReporter {
            signal,
            vcpus,
            exits,
            irqs,
            events,
        }
    }

    /// The counts now.
    pub fn counts(&self) -> WakeupCounts {
        let mut kvm: [Option<u64>; KVM_STATS.len()] = [None; KVM_STATS.len()];
        for v in &self.vcpus {
            for (sum, value) in kvm.iter_mut().zip(v.read()) {
                if let Some(value) = value {
                    *sum = Some(sum.unwrap_or(0) + value);
                }
            }
        }
        let [halts, halt_wakeups, irq_injections, kvm_exits] = kvm;
        WakeupCounts {
            halts,
            halt_wakeups,
            irq_injections,
            kvm_exits,
            vmm_exits: self.exits.by_reason(),
            device_irqs: self
                .irqs
                .iter()
                .map(|(name, irq)| (name.clone(), irq.raised()))
                .collect(),
        }
    }

    /// Reads every pending request; whether there was one.
    fn drain(&mut self) -> bool {
        let mut info = [0u8; std::mem::size_of::<libc::signalfd_siginfo>()];
        let mut asked = false;
        while let Ok(n) = io::Read::read(&mut self.signal, &mut info) {
            if n < info.len() {
                break;
            }
            asked = true;
        }
        asked
    }
}

impl MutEventSubscriber for WakeupReporter {
    fn process(&mut self, _events: Events, _ops: &mut EventOps) {
        if self.drain() {
            self.events.emit(&Event::Wakeups {
                t_us: now_us(),
                counts: self.counts(),
            });
        }
    }

    fn init(&mut self, ops: &mut EventOps) {
        let _ = ops.add(Events::new(&self.signal, EventSet::IN));
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A statistics file as KVM lays it out: header, descriptors, data.
    fn stats_file(stats: &[(&str, u32, u16, u64)]) -> (Vec<u8>, usize) {
        let name_size = 48usize;
        let desc_offset = STATS_HEADER_LEN + 8;
        let data_offset = desc_offset + stats.len() * (STATS_DESC_LEN + name_size);
        let mut f = Vec::new();
        for v in [0u32, name_size as u32, stats.len() as u32, 24] {
            f.extend(v.to_le_bytes());
        }
        f.extend((desc_offset as u32).to_le_bytes());
        f.extend((data_offset as u32).to_le_bytes());
        f.extend(b"kvm-1234");
        for (i, (name, flags, size, _)) in stats.iter().enumerate() {
            f.extend(flags.to_le_bytes());
            f.extend(0i16.to_le_bytes());
            f.extend(size.to_le_bytes());
            f.extend((i as u32 * 8).to_le_bytes());
            f.extend(0u32.to_le_bytes());
            let mut n = name.as_bytes().to_vec();
            n.resize(name_size, 0);
            f.extend(n);
        }
        for (_, _, _, value) in stats {
            f.extend(value.to_le_bytes());
        }
        (f, data_offset)
    }

    fn layout_of(f: &[u8]) -> StatsLayout {
        let (name_size, count, desc_offset, data_offset) = parse_header(f).unwrap();
        parse_descriptors(&f[desc_offset as usize..], count, name_size, data_offset).unwrap()
    }

    #[test]
    fn wanted_counters_are_found_by_name() {
        let (f, data_offset) = stats_file(&[
            ("halt_successful_poll", 0, 1, 7),
            ("halt_wakeup", 0, 1, 11),
            ("exits", 0, 1, 99),
            ("halt_exits", 0, 1, 12),
        ]);
        let layout = layout_of(&f);
        assert_eq!(layout.data_offset, data_offset as u64);
        let v = values(&layout, &f[data_offset..]);
        // KVM_STATS order: halt_exits, halt_wakeup, irq_injections, exits.
        assert_eq!(v, [Some(12), Some(11), None, Some(99)]);
        assert_eq!(layout.len, 32);
    }

    #[test]
    fn histograms_and_instant_values_are_not_taken_for_counters() {
        let (f, data_offset) = stats_file(&[("halt_exits", 0, 2, 5), ("irq_injections", 1, 1, 6)]);
        let layout = layout_of(&f);
        assert_eq!(values(&layout, &f[data_offset..]), [None; 4]);
    }

    #[test]
    fn a_truncated_file_is_an_error_not_a_panic() {
        assert!(parse_header(&[0; 10]).is_err());
        let (f, _) = stats_file(&[("exits", 0, 1, 1)]);
        let (name_size, count, desc_offset, data_offset) = parse_header(&f).unwrap();
        let short = &f[desc_offset as usize..desc_offset as usize + 20];
        assert!(parse_descriptors(short, count, name_size, data_offset).is_err());
        // A data block shorter than the layout reads as unknown values.
        let layout = layout_of(&f);
        assert_eq!(values(&layout, &[1, 2, 3]), [None; 4]);
    }

    #[test]
    fn exits_are_counted_by_reason() {
        let c = ExitCounters::default();
        c.count(VmmExit::Mmio);
        c.count(VmmExit::Mmio);
        c.count(VmmExit::Pio);
        let m = c.by_reason();
        assert_eq!((m["mmio"], m["pio"], m["interrupted"]), (2, 1, 0));
    }

    #[test]
    fn the_signal_is_read_from_the_signalfd_not_delivered() {
        // Only this thread blocks the signal: send it to this thread.
        let signal = wakeups_signal_fd().unwrap();
        let exits = Arc::new(ExitCounters::default());
        exits.count(VmmExit::Pio);
        let sink = Arc::new(EventSink::new(Box::new(io::sink())));
        let mut r = WakeupReporter::new(signal, Vec::new(), exits, Vec::new(), sink);
        assert!(!r.drain());
        // SAFETY: tgkill with our own pid and tid and a blocked signal.
        unsafe {
            libc::syscall(
                libc::SYS_tgkill,
                libc::getpid(),
                libc::gettid(),
                WAKEUPS_SIGNAL,
            )
        };
        assert!(r.drain());
        assert!(!r.drain());
        let counts = r.counts();
        assert_eq!(counts.vmm_exits["pio"], 1);
        assert_eq!(counts.halts, None);
    }
}
