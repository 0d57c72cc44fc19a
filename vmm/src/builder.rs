//! Assembles a microVM from its launch description ([`proto::launch`]) and
//! runs it to its end: boots one, or restores a clone from a snapshot, and
//! freezes a master into one.
//!
//! It owns the order things are built in and the device layout (which
//! device at which MMIO window and GSI). It saves and restores devices only
//! through [`Persist`], in a loop: what each device saves, and what it
//! checks when restoring, is the device's own `persist.rs`. It must not
//! parse snapshot state itself ([`crate::snapshot`] does) nor hold
//! device-specific restore code beyond building the constructor args.

use std::fs::File;
use std::io::{self, Write};
use std::os::unix::fs::{OpenOptionsExt, PermissionsExt};
use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{mpsc, Arc, Condvar, Mutex};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use event_manager::{EventManager, EventOps, Events, MutEventSubscriber, SubscriberOps};
use kvm_ioctls::{IoEventAddress, VmFd};
use vm_memory::GuestMemoryMmap;
use vmm_sys_util::epoll::EventSet;
use vmm_sys_util::eventfd::EventFd;

use crate::boot::{self, BootSpec};
use crate::ctl::{CtlListener, Pending};
use crate::devices::legacy::console::{ConsoleSink, ConsoleState};
use crate::devices::legacy::persist::{SerialConstructorArgs, SerialRestoreError, SerialState};
use crate::devices::legacy::{
    EventFdTrigger, FnTrigger, SerialDevice, I8042, I8042_PORT_BASE, SERIAL_PORT_BASE,
};
use crate::devices::virtio::net::tap::{Tap, TapError};
use crate::devices::virtio::net::{NetError, DEFAULT_MAC};
use crate::devices::virtio::persist::{DeviceModelState, DeviceRestoreError, MmioConstructorArgs};
use crate::devices::virtio::report::{device_names, RejectReporter};
use crate::devices::virtio::{self, MmioTransport, Net, Rng, Vsock};
use crate::error_chain;
use crate::layout::*;
use crate::memory;
use crate::persist::Persist;
use crate::seccomp::{self, Filters, Profile, SeccompError, ThreadKind};
use crate::snapshot::{self, CheckError, DeviceSnapshot, VmSnapshot, MAX_VIRTIO_DEVICES};
use crate::vstate::control::{ControlError, RunControl};
use crate::vstate::fingerprint::{HostFingerprint, ProbeError};
use crate::vstate::state::{readable_msrs, StateError, VmState};
use crate::vstate::vcpu::{self, Bus, Vcpu, VcpuStop};
use crate::vstate::vm;
use crate::vstate::wakeups::{wakeups_signal_fd, ExitCounters, VcpuStats, WakeupReporter};
use proto::ctl::{CtlRequest, CtlResponse};
use proto::events::{now_us, Event, EventSink, ExitReason};
use proto::launch::{BootSource, ConsoleTarget, VmmLaunch};

/// Errors building or running a VM.
#[derive(Debug, thiserror::Error)]
pub enum BuildError {
    /// Invalid configuration.
    #[error(transparent)]
    Config(#[from] ConfigError),
    /// KVM VM setup failed.
    #[error(transparent)]
    Vm(#[from] vm::VmError),
    /// Guest memory could not be created.
    #[error(transparent)]
    Memory(#[from] memory::MemoryError),
    /// The guest could not be loaded.
    #[error(transparent)]
    Boot(#[from] boot::BootError),
    /// A vCPU could not be created.
    #[error(transparent)]
    Vcpu(#[from] vcpu::VcpuError),
    /// Guest RAM for a VM that may be frozen could not be created.
    #[error("cannot create guest RAM at {path}")]
    GuestRam {
        /// The memory file.
        path: PathBuf,
        /// OS error.
        #[source]
        source: io::Error,
    },
    /// A virtio device could not be created.
    #[error("cannot set up the {device} device")]
    Device {
        /// Which device.
        device: &'static str,
        /// Why.
        #[source]
        source: virtio::Error,
    },
    /// The tap given with `--tap-fd` cannot be the net device's backend.
    #[error("cannot use the tap given with --tap-fd")]
    Tap(#[from] TapError),
    /// The net device could not be created.
    #[error("cannot set up the net device")]
    Net(#[from] NetError),
    /// More virtio devices than interrupt lines.
    #[error("the VM would have more virtio devices than this VMM has interrupt lines for ({MAX_VIRTIO_DEVICES})")]
    TooManyDevices,
    /// A KVM VM ioctl that wires up devices failed.
    #[error("cannot {what} with KVM")]
    Kvm {
        /// Which call.
        what: &'static str,
        /// The error.
        #[source]
        source: kvm_ioctls::Error,
    },
    /// An eventfd could not be created.
    #[error("cannot create an eventfd")]
    EventFd(#[source] io::Error),
    /// The MSRs a freeze saves could not be listed.
    #[error("cannot list the vCPU's MSRs, which freezing the VM saves")]
    MsrList(#[source] StateError),
    /// This host's fingerprint, which a freeze records, could not be read.
    #[error("cannot read this host's CPU and KVM features, which freezing the VM records")]
    Fingerprint(#[source] ProbeError),
    /// The device event loop could not be set up, or failed.
    #[error("the device event loop failed")]
    EventLoop(#[source] event_manager::Error),
    /// The timer that paces the devices' rejection reports could not be
    /// created.
    #[error("cannot create the timer of the devices' rejection reports")]
    ReportTimer(#[source] io::Error),
    /// The signalfd that asks for the wake-up counts could not be set up.
    #[error("cannot set up the signal that asks for the VM's wake-up counts")]
    WakeupsSignal(#[source] io::Error),
    /// The control socket could not be bound.
    #[error("cannot listen on the control socket {path}")]
    Control {
        /// The socket.
        path: PathBuf,
        /// OS error.
        #[source]
        source: io::Error,
    },
    /// A vCPU thread could not be started.
    #[error("cannot start a vCPU thread")]
    Thread(#[source] io::Error),
    /// The signal that kicks vCPUs out of the guest could not be set up.
    #[error("cannot set up the signal that pauses vCPUs")]
    Signals(#[source] ControlError),
    /// A thread's seccomp filter could not be built or installed.
    #[error("cannot confine the VMM's threads with seccomp")]
    Seccomp(#[source] SeccompError),
    /// A snapshot could not be restored.
    #[error("cannot restore the snapshot")]
    Restore(#[from] RestoreError),
    /// Console file.
    #[error("cannot open console log {path}: {source}")]
    Console {
        /// Path.
        path: PathBuf,
        /// OS error.
        #[source]
        source: std::io::Error,
    },
}

/// A launch description that cannot be a VM.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ConfigError {
    /// No RAM.
    #[error("guest memory must be at least 1 MiB (got 0)")]
    NoMemory,
    /// More RAM than the host.
    #[error("guest memory of {mib} MiB is more than this host has ({host_mib} MiB)")]
    MemoryExceedsHost {
        /// Asked for.
        mib: u64,
        /// The host's.
        host_mib: u64,
    },
    /// No vCPU, or too many.
    #[error("vCPU count must be 1..={MAX_VCPUS} (got {0})")]
    VcpuCount(u8),
    /// A reserved or too large vsock CID.
    #[error("guest CID must be 3..=2^32-1 (got {0})")]
    GuestCid(u64),
}

/// Why a snapshot could not be restored.
#[derive(Debug, thiserror::Error)]
pub enum RestoreError {
    /// The snapshot is not one this VMM can restore on this host.
    #[error(transparent)]
    Check(#[from] CheckError),
    /// Its memory file could not be opened.
    #[error("cannot open the snapshot's memory {path}")]
    MemoryFile {
        /// The memory file.
        path: PathBuf,
        /// OS error.
        #[source]
        source: io::Error,
    },
    /// The VM's KVM state (irqchip, PIT, clock) was refused.
    #[error("cannot restore the VM's interrupt controllers, PIT and clock")]
    Vm(#[source] StateError),
    /// A vCPU's state was refused.
    #[error("cannot restore vCPU {index}")]
    Vcpu {
        /// vCPU index.
        index: u8,
        /// Why.
        #[source]
        source: StateError,
    },
    /// A virtio device's state was refused.
    #[error("cannot restore virtio device {index}")]
    Device {
        /// Its position (and MMIO window).
        index: usize,
        /// Why.
        #[source]
        source: DeviceRestoreError,
    },
    /// The serial port's state was refused.
    #[error("cannot restore the serial port")]
    Serial(#[source] SerialRestoreError),
}

/// Why a freeze failed (the VM then runs on).
#[derive(Debug, thiserror::Error)]
enum FreezeError {
    /// The vCPUs did not all pause and save their state.
    #[error("cannot pause the vCPUs")]
    Pause(#[source] ControlError),
    /// The VM's KVM state could not be read.
    #[error("cannot save the VM's interrupt controllers, PIT and clock")]
    VmState(#[source] StateError),
    /// The state could not be serialized.
    #[error("cannot serialize the VM state")]
    Serialize(#[source] serde_json::Error),
    /// The manifest could not be written.
    #[error("cannot write the snapshot")]
    Write(#[source] snapshotter::Error),
    /// The guest memory file could not be flushed to disk.
    #[error("cannot flush the guest memory file to disk")]
    SyncMemory(#[source] std::io::Error),
}

/// How the VM ended.
#[derive(Debug, Clone)]
pub struct VmEnd {
    /// Why.
    pub reason: ExitReason,
    /// Detail for humans.
    pub message: String,
}

/// Most vCPUs a VM may have.
pub const MAX_VCPUS: u8 = boot::mptable::MAX_VCPUS;

/// Checks a configuration before anything is created.
pub fn validate(cfg: &BootSource) -> Result<(), BuildError> {
    if cfg.memory_mib == 0 {
        return Err(ConfigError::NoMemory.into());
    }
    let host_mib = host_memory_mib();
    if cfg.memory_mib > host_mib {
        return Err(ConfigError::MemoryExceedsHost {
            mib: cfg.memory_mib,
            host_mib,
        }
        .into());
    }
    if cfg.vcpus == 0 || cfg.vcpus > MAX_VCPUS {
        return Err(ConfigError::VcpuCount(cfg.vcpus).into());
    }
    if cfg.guest_cid < 3 || cfg.guest_cid > u64::from(u32::MAX) {
        return Err(ConfigError::GuestCid(cfg.guest_cid).into());
    }
    Ok(())
}

/// Total RAM of the host in MiB (`sysinfo`: a jailed VMM has no `/proc`).
pub fn host_memory_mib() -> u64 {
    // SAFETY: sysinfo is plain data; all zeroes is a valid value.
    let mut si: libc::sysinfo = unsafe { std::mem::zeroed() };
    // SAFETY: sysinfo() writes one `struct sysinfo` to the pointer, which
    // points to one we own.
    if unsafe { libc::sysinfo(&mut si) } != 0 {
        return u64::MAX;
    }
    (si.totalram as u64).saturating_mul(u64::from(si.mem_unit.max(1))) >> 20
}

struct DeviceBus {
    serial: Mutex<SerialDevice>,
    i8042: Mutex<I8042>,
    virtio: Vec<(u64, Arc<Mutex<MmioTransport>>)>,
}

/// A virtio device attached to the VM: its window, its interrupt line and
/// the transport (with the model inside), shared by the vCPUs (MMIO) and
/// the event loop (queues).
struct VirtioSlot {
    base: u64,
    gsi: u32,
    transport: Arc<Mutex<MmioTransport>>,
}

/// Locks `m`, also after a thread panicked holding it: a freeze saves what
/// is there, as the device paths do.
fn lock<T: ?Sized>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|e| e.into_inner())
}

impl DeviceBus {
    fn virtio_at(&self, addr: u64) -> Option<(u64, &Arc<Mutex<MmioTransport>>)> {
        self.virtio
            .iter()
            .find(|(base, _)| addr >= *base && addr < base + VIRTIO_MMIO_SIZE)
            .map(|(base, dev)| (addr - base, dev))
    }
}

impl Bus for DeviceBus {
    fn pio_write(&self, port: u16, data: &[u8]) {
        let Some(&value) = data.first() else { return };
        match port {
            p if (SERIAL_PORT_BASE..SERIAL_PORT_BASE + 8).contains(&p) => {
                let mut s = self.serial.lock().unwrap_or_else(|e| e.into_inner());
                let _ = s.write((p - SERIAL_PORT_BASE) as u8, value);
            }
            p if p == I8042_PORT_BASE || p == I8042_PORT_BASE + 4 => {
                let mut k = self.i8042.lock().unwrap_or_else(|e| e.into_inner());
                let _ = k.write((p - I8042_PORT_BASE) as u8, value);
            }
            _ => {}
        }
    }

    fn pio_read(&self, port: u16, data: &mut [u8]) {
        let value = match port {
            p if (SERIAL_PORT_BASE..SERIAL_PORT_BASE + 8).contains(&p) => {
                let mut s = self.serial.lock().unwrap_or_else(|e| e.into_inner());
                s.read((p - SERIAL_PORT_BASE) as u8)
            }
            p if p == I8042_PORT_BASE || p == I8042_PORT_BASE + 4 => {
                let mut k = self.i8042.lock().unwrap_or_else(|e| e.into_inner());
                k.read((p - I8042_PORT_BASE) as u8)
            }
            _ => 0xff,
        };
        data.fill(value);
    }

    fn mmio_write(&self, addr: u64, data: &[u8]) {
        if let Some((offset, dev)) = self.virtio_at(addr) {
            dev.lock()
                .unwrap_or_else(|e| e.into_inner())
                .write(offset, data);
        }
    }

    fn mmio_read(&self, addr: u64, data: &mut [u8]) {
        match self.virtio_at(addr) {
            Some((offset, dev)) => dev
                .lock()
                .unwrap_or_else(|e| e.into_inner())
                .read(offset, data),
            None => data.fill(0xff),
        }
    }
}

/// Ends the device loop once a vCPU has stopped.
struct ExitWatcher {
    evt: EventFd,
    fired: Arc<AtomicBool>,
}

impl MutEventSubscriber for ExitWatcher {
    fn process(&mut self, _events: Events, _ops: &mut EventOps) {
        let _ = self.evt.read();
        self.fired.store(true, Ordering::SeqCst);
    }

    fn init(&mut self, ops: &mut EventOps) {
        let _ = ops.add(Events::new(&self.evt, EventSet::IN));
    }
}

/// The full kernel command line: the VMM's devices, then the image's part.
pub fn kernel_cmdline(image_cmdline: &str, devices: &[(u64, u32)]) -> String {
    let mut s = String::from("console=ttyS0 reboot=k panic=-1");
    for (base, gsi) in devices {
        s.push_str(&format!(" virtio_mmio.device=4K@{base:#x}:{gsi}"));
    }
    let extra = image_cmdline.trim();
    if !extra.is_empty() {
        s.push(' ');
        s.push_str(extra);
    }
    s
}

/// A VM assembled (booted or restored) but not yet running.
struct Machine {
    vmfd: VmFd,
    devices: Vec<VirtioSlot>,
    bus: Arc<DeviceBus>,
    vcpus: Vec<Vcpu>,
    console_state: Arc<ConsoleState>,
    control: Arc<RunControl>,
    /// Set on a VM that can be frozen.
    freeze: Option<FreezeTarget>,
    /// Keeps guest RAM mapped for as long as the VM runs.
    _mem: GuestMemoryMmap,
}

/// Where and how a master's freeze writes its snapshot.
struct FreezeTarget {
    dir: PathBuf,
    msr_indices: Vec<u32>,
    memory_mib: u64,
    cmdline: String,
    /// This host, read when the VM was built (a master never moves).
    host: HostFingerprint,
}

fn device_err(device: &'static str) -> impl Fn(virtio::Error) -> BuildError {
    move |source| BuildError::Device { device, source }
}

fn kvm_err(what: &'static str) -> impl Fn(kvm_ioctls::Error) -> BuildError {
    move |source| BuildError::Kvm { what, source }
}

/// Registers `dev`'s queue notifications and interrupt with KVM at the next
/// virtio window and adds it to `devices`.
fn attach_virtio(
    vmfd: &VmFd,
    devices: &mut Vec<VirtioSlot>,
    dev: MmioTransport,
) -> Result<(), BuildError> {
    let index = devices.len() as u64;
    let base = VIRTIO_MMIO_BASE + index * VIRTIO_MMIO_SIZE;
    let gsi = VIRTIO_FIRST_GSI + index as u32;
    if gsi > MAX_GSI {
        return Err(BuildError::TooManyDevices);
    }
    for (q, evt) in dev.queue_events().iter().enumerate() {
        vmfd.register_ioevent(evt, &IoEventAddress::Mmio(base + 0x50), q as u32)
            .map_err(kvm_err("register a queue ioeventfd"))?;
    }
    vmfd.register_irqfd(dev.interrupt_evt(), gsi)
        .map_err(kvm_err("register a device irqfd"))?;
    devices.push(VirtioSlot {
        base,
        gsi,
        transport: Arc::new(Mutex::new(dev)),
    });
    Ok(())
}

fn console_writer(console: &ConsoleTarget) -> Result<Option<Box<dyn Write + Send>>, BuildError> {
    Ok(match console {
        ConsoleTarget::None => None,
        ConsoleTarget::Stderr => Some(Box::new(std::io::stderr())),
        ConsoleTarget::File(path) => Some(Box::new(
            File::options()
                .create(true)
                .append(true)
                .open(path)
                .map_err(|source| BuildError::Console {
                    path: path.clone(),
                    source,
                })?,
        )),
    })
}

/// The serial port and i8042 on the port bus, plus the virtio windows.
fn device_bus(
    vmfd: &VmFd,
    console: &ConsoleTarget,
    serial_state: Option<&SerialState>,
    devices: &[VirtioSlot],
    control: &Arc<RunControl>,
    events: &Arc<EventSink>,
) -> Result<(Arc<DeviceBus>, Arc<ConsoleState>), BuildError> {
    let console_state = Arc::new(ConsoleState::default());
    let serial_evt = EventFd::new(libc::EFD_NONBLOCK).map_err(BuildError::EventFd)?;
    vmfd.register_irqfd(&serial_evt, SERIAL_GSI)
        .map_err(kvm_err("register the serial irqfd"))?;
    let args = SerialConstructorArgs {
        interrupt: EventFdTrigger(serial_evt),
        out: ConsoleSink::new(
            console_writer(console)?,
            console_state.clone(),
            events.clone(),
        ),
    };
    let serial = match serial_state {
        None => SerialDevice::new(args.interrupt, args.out),
        Some(state) => SerialDevice::restore(args, state).map_err(RestoreError::Serial)?,
    };
    let reset_control = control.clone();
    let i8042 = I8042::new(FnTrigger(Arc::new(move || reset_control.stop())));
    let bus = Arc::new(DeviceBus {
        serial: Mutex::new(serial),
        i8042: Mutex::new(i8042),
        virtio: devices
            .iter()
            .map(|d| (d.base, d.transport.clone()))
            .collect(),
    });
    Ok((bus, console_state))
}

/// Guest RAM for a VM that boots: a memfd, or `dir/memory` for a VM that
/// may be frozen (a master), so that clones can map it by name.
fn boot_memory(cfg: &BootSource) -> Result<File, BuildError> {
    let size = cfg.memory_mib << 20;
    match &cfg.snapshot_dir {
        None => Ok(memory::create_memfd(size)?),
        Some(dir) => {
            let path = dir.join(snapshotter::MEMORY_FILE);
            let file = File::options()
                .read(true)
                .write(true)
                .create_new(true)
                .mode(0o600)
                .open(&path)
                .and_then(|f| f.set_len(size).map(|_| f))
                .map_err(|source| BuildError::GuestRam {
                    path: path.clone(),
                    source,
                })?;
            Ok(file)
        }
    }
}

/// Boots the VM described by `cfg`, runs it until the guest ends (or it is
/// frozen through the control socket), and returns why it ended. Emits
/// [`Event`]s on the way.
pub fn run_vm(
    launch: &VmmLaunch,
    cfg: &BootSource,
    events: Arc<EventSink>,
) -> Result<VmEnd, BuildError> {
    validate(cfg)?;
    // Inherited descriptors first, before this process opens any of its own.
    let kvm = vm::kvm(launch.kvm_fd)?;
    let tap = launch.tap_fd.map(Tap::from_inherited_fd).transpose()?;
    let size = cfg.memory_mib << 20;
    let memfd = boot_memory(cfg)?;
    let mem = memory::map_guest_memory(&memfd, size, libc::MAP_SHARED)?;
    let vmfd = vm::create_vm(&kvm, &mem)?;

    // Devices first: the command line names them.
    let mut devices = Vec::new();
    if let Some(uds) = &launch.vsock {
        let vsock = Vsock::new(cfg.guest_cid, uds).map_err(device_err("vsock"))?;
        let t = MmioTransport::new(Box::new(vsock), mem.clone()).map_err(device_err("vsock"))?;
        attach_virtio(&vmfd, &mut devices, t)?;
    }
    let t = MmioTransport::new(Box::new(Rng::new()), mem.clone()).map_err(device_err("rng"))?;
    attach_virtio(&vmfd, &mut devices, t)?;
    match (tap, cfg.mac) {
        (Some(tap), mac) => {
            // Last, so that a VM without a tap keeps the layout it always had.
            let net = Net::new(mac.unwrap_or(DEFAULT_MAC), Some(tap))?;
            let t = MmioTransport::new(Box::new(net), mem.clone()).map_err(device_err("net"))?;
            attach_virtio(&vmfd, &mut devices, t)?;
        }
        (None, Some(mac)) => {
            eprintln!("zygote-vmm: --mac {mac} without --tap-fd: the VM has no net device");
        }
        (None, None) => {}
    }
    let declared: Vec<(u64, u32)> = devices.iter().map(|d| (d.base, d.gsi)).collect();

    let cmdline = kernel_cmdline(&cfg.cmdline, &declared);
    let info = boot::load_guest(
        &mem,
        &BootSpec {
            kernel: &cfg.kernel,
            initrd: cfg.initrd.as_deref(),
            cmdline: &cmdline,
            vcpus: cfg.vcpus,
        },
    )?;
    vcpu::write_boot_tables(&mem)?;

    let control = Arc::new(RunControl::default());
    let (bus, console_state) =
        device_bus(&vmfd, &launch.console, None, &devices, &control, &events)?;
    let mut vcpus = Vec::new();
    for index in 0..cfg.vcpus {
        let entry = (index == 0).then_some(info.entry);
        vcpus.push(Vcpu::new(&kvm, &vmfd, index, cfg.vcpus, entry)?);
    }
    let freeze = match &cfg.snapshot_dir {
        None => None,
        Some(dir) => Some(FreezeTarget {
            dir: dir.clone(),
            msr_indices: readable_msrs(&kvm, vcpus[0].fd()).map_err(BuildError::MsrList)?,
            memory_mib: cfg.memory_mib,
            cmdline,
            host: HostFingerprint::of_host(&kvm).map_err(BuildError::Fingerprint)?,
        }),
    };
    let machine = Machine {
        vmfd,
        devices,
        bus,
        vcpus,
        console_state,
        control,
        freeze,
        _mem: mem,
    };
    run_machine(machine, launch.control.as_deref(), launch.seccomp, events)
}

/// Starts a VM from a snapshot: guest RAM is the snapshot's memory file
/// mapped copy-on-write (nothing is copied up front), then VM, vCPU and
/// device state are restored and the vCPUs resume where the master stopped.
pub fn restore_vm(
    launch: &VmmLaunch,
    snapshot: &std::path::Path,
    events: Arc<EventSink>,
) -> Result<VmEnd, BuildError> {
    let kvm = vm::kvm(launch.kvm_fd)?;
    let prepared = prepare_restore(snapshot, kvm)?;
    run_restored(&prepared, launch, events)
}

/// A snapshot read, checked against this host, and its memory mapped:
/// everything of a restore but building the VM. A process that holds one
/// can `fork()` clones that only build their VM: see the bench crate's
/// `fork_bench`.
pub struct PreparedRestore {
    kvm: kvm_ioctls::Kvm,
    state: VmSnapshot,
    mem: GuestMemoryMmap,
}

/// Reads and checks the snapshot at `dir` against the host `kvm` belongs
/// to and maps its memory copy-on-write.
pub fn prepare_restore(
    dir: &std::path::Path,
    kvm: kvm_ioctls::Kvm,
) -> Result<PreparedRestore, BuildError> {
    let (snap, state) = snapshot::open(dir, &kvm).map_err(RestoreError::Check)?;
    // Read-only: the master's RAM is never written through this file.
    let path = snap.memory_path();
    let file = File::open(&path).map_err(|source| RestoreError::MemoryFile { path, source })?;
    let mem = memory::map_guest_memory(&file, snap.manifest.memory.size, libc::MAP_PRIVATE)?;
    Ok(PreparedRestore { kvm, state, mem })
}

/// Creates the KVM VM for a prepared snapshot, restores VM, vCPU and device
/// state, and runs it to its end.
pub fn run_restored(
    prepared: &PreparedRestore,
    launch: &VmmLaunch,
    events: Arc<EventSink>,
) -> Result<VmEnd, BuildError> {
    let machine = restore_machine(prepared, launch, &events)?;
    run_machine(machine, None, launch.seccomp, events)
}

/// Builds the VM of a prepared snapshot: KVM VM, vCPUs and devices, each
/// from its saved state.
fn restore_machine(
    prepared: &PreparedRestore,
    launch: &VmmLaunch,
    events: &Arc<EventSink>,
) -> Result<Machine, BuildError> {
    let PreparedRestore { kvm, state, mem } = prepared;
    let mem = mem.clone();
    // The inherited tap is open since exec, so no file this process opened
    // can have taken its number; `from_inherited_fd` checks it is a tap.
    let mut tap = launch.tap_fd.map(Tap::from_inherited_fd).transpose()?;
    let vmfd = vm::create_vm(kvm, &mem)?;
    state.vm.restore(&vmfd).map_err(RestoreError::Vm)?;

    let mut vcpus = Vec::with_capacity(state.vcpus.len());
    for s in &state.vcpus {
        let vcpu = Vcpu::restore(&vmfd, s).map_err(|source| RestoreError::Vcpu {
            index: s.index,
            source,
        })?;
        vcpus.push(vcpu);
    }

    let mut devices = Vec::new();
    for (index, d) in state.devices.iter().enumerate() {
        // The tap goes to the first net device; any other is restored
        // disconnected.
        let net_tap = match d.device.model {
            DeviceModelState::Net(_) => tap.take(),
            _ => None,
        };
        let args = MmioConstructorArgs {
            mem: mem.clone(),
            vsock_uds: launch.vsock.clone(),
            vsock_reset: launch.vsock_reset,
            net_tap,
        };
        let t = MmioTransport::restore(args, &d.device)
            .map_err(|source| RestoreError::Device { index, source })?;
        attach_virtio(&vmfd, &mut devices, t)?;
    }
    if let Some(tap) = tap {
        eprintln!(
            "zygote-vmm: the snapshot has no net device (its master was booted without a tap): tap {} is not used",
            tap.name()
        );
    }
    let control = Arc::new(RunControl::default());
    let (bus, console_state) = device_bus(
        &vmfd,
        &launch.console,
        Some(&state.serial),
        &devices,
        &control,
        events,
    )?;
    Ok(Machine {
        vmfd,
        devices,
        bus,
        vcpus,
        console_state,
        control,
        freeze: None,
        _mem: mem,
    })
}

/// Pauses every vCPU and writes the snapshot. On failure the VM resumes.
fn freeze<T>(m: &Machine, target: &FreezeTarget, threads: &[JoinHandle<T>]) -> CtlResponse {
    let t0 = Instant::now();
    let vcpus = match m.control.pause(
        threads,
        Some(target.msr_indices.clone()),
        Duration::from_secs(10),
    ) {
        Ok(v) => v,
        Err(e) => {
            m.control.resume();
            return CtlResponse::err(error_chain(&FreezeError::Pause(e)));
        }
    };
    let paused = Instant::now();
    match write_snapshot(m, target, vcpus) {
        Ok(state_bytes) => CtlResponse {
            ok: true,
            error: None,
            pause_ms: Some(ms(t0, paused)),
            save_ms: Some(ms(paused, Instant::now())),
            state_bytes: Some(state_bytes),
        },
        Err(e) => {
            m.control.resume();
            CtlResponse::err(error_chain(&e))
        }
    }
}

/// Saves the paused VM (whose vCPUs saved `vcpus`) and every device into
/// the snapshot's manifest; returns the state's size.
fn write_snapshot(
    m: &Machine,
    target: &FreezeTarget,
    vcpus: Vec<crate::vstate::state::VcpuState>,
) -> Result<u64, FreezeError> {
    let vm = VmState::save(&m.vmfd).map_err(FreezeError::VmState)?;
    let devices = m
        .devices
        .iter()
        .map(|d| DeviceSnapshot {
            base: d.base,
            gsi: d.gsi,
            device: lock(&d.transport).save(),
        })
        .collect();
    let snap = VmSnapshot {
        state_version: snapshot::STATE_VERSION,
        host: target.host.clone(),
        memory_mib: target.memory_mib,
        cmdline: target.cmdline.clone(),
        vm,
        vcpus,
        devices,
        serial: lock(&m.bus.serial).save(),
    };
    let json = serde_json::to_string(&snap).map_err(FreezeError::Serialize)?;
    // The master's RAM was written through its shared mapping of the
    // memory file: on disk before the manifest that says the snapshot is
    // whole, so that a host that crashes never leaves a manifest over
    // stale memory. (It also leaves the page cache clean: a clone's
    // private memory is then only what it copied.)
    std::fs::File::open(target.dir.join(snapshotter::MEMORY_FILE))
        .and_then(|f| f.sync_all()) // fsync: the master's seccomp filter allows it
        .map_err(FreezeError::SyncMemory)?;
    snapshotter::write_manifest(&target.dir, &json, None).map_err(FreezeError::Write)?;
    // The master's RAM is final: nobody writes it again.
    let _ = std::fs::set_permissions(
        target.dir.join(snapshotter::MEMORY_FILE),
        std::fs::Permissions::from_mode(0o400),
    );
    Ok(json.len() as u64)
}

fn ms(a: Instant, b: Instant) -> f64 {
    (b - a).as_secs_f64() * 1000.0
}

/// Holds the vCPU threads back until every thread's seccomp filter is in
/// place, then lets them run the guest (or end, when setting up failed).
#[derive(Default)]
struct StartGate {
    go: Mutex<Option<bool>>,
    changed: Condvar,
}

impl StartGate {
    fn open(&self, go: bool) {
        *lock(&self.go) = Some(go);
        self.changed.notify_all();
    }

    /// Waits until the gate opens; whether to run the guest.
    fn wait(&self) -> bool {
        let mut go = lock(&self.go);
        loop {
            if let Some(go) = *go {
                return go;
            }
            go = self.changed.wait(go).unwrap_or_else(|e| e.into_inner());
        }
    }
}

/// The reporter of what wakes the VM (see [`crate::vstate::wakeups`]):
/// blocks its signal in this thread, so call it before starting threads.
/// KVM's per-vCPU counts are left out where this host's KVM has none.
fn wakeup_reporter(
    m: &Machine,
    exits: Arc<ExitCounters>,
    events: Arc<EventSink>,
) -> Result<WakeupReporter, BuildError> {
    let signal = wakeups_signal_fd().map_err(BuildError::WakeupsSignal)?;
    let vcpus = m
        .vcpus
        .iter()
        .filter_map(|v| VcpuStats::open(v.fd()).ok())
        .collect();
    let types: Vec<u32> = m
        .devices
        .iter()
        .map(|d| lock(&d.transport).device().device_type())
        .collect();
    let irqs = device_names(&types)
        .into_iter()
        .zip(&m.devices)
        .map(|(name, d)| (name, lock(&d.transport).interrupt().clone()))
        .collect();
    Ok(WakeupReporter::new(signal, vcpus, exits, irqs, events))
}

/// Runs an assembled VM: one thread per vCPU, this thread runs the device
/// event loop (and the control socket) until the VM ends.
///
/// With `seccomp`, each vCPU thread installs its filter first thing, this
/// thread installs its own once it has started them all, and no vCPU
/// enters the guest before every filter is in place ([`crate::seccomp`]).
fn run_machine(
    mut m: Machine,
    ctl_path: Option<&std::path::Path>,
    seccomp: bool,
    events: Arc<EventSink>,
) -> Result<VmEnd, BuildError> {
    let exit_evt = EventFd::new(libc::EFD_NONBLOCK).map_err(BuildError::EventFd)?;
    let mut manager: EventManager<Arc<Mutex<dyn MutEventSubscriber + Send>>> =
        EventManager::new().map_err(BuildError::EventLoop)?;
    for d in &m.devices {
        manager.add_subscriber(d.transport.clone());
    }
    let transports = m.devices.iter().map(|d| d.transport.clone()).collect();
    let reporter = Arc::new(Mutex::new(
        RejectReporter::new(transports, events.clone()).map_err(BuildError::ReportTimer)?,
    ));
    manager.add_subscriber(reporter.clone());
    // Before any thread starts: they inherit the blocked signal.
    let exits = Arc::new(ExitCounters::default());
    manager.add_subscriber(Arc::new(Mutex::new(wakeup_reporter(
        &m,
        exits.clone(),
        events.clone(),
    )?)));
    let fired = Arc::new(AtomicBool::new(false));
    let watcher_evt = exit_evt.try_clone().map_err(BuildError::EventFd)?;
    manager.add_subscriber(Arc::new(Mutex::new(ExitWatcher {
        evt: watcher_evt,
        fired: fired.clone(),
    })));
    let pending: Arc<Mutex<Option<Pending>>> = Arc::new(Mutex::new(None));
    if let Some(path) = ctl_path {
        let listener =
            CtlListener::bind(path, pending.clone()).map_err(|source| BuildError::Control {
                path: path.to_path_buf(),
                source,
            })?;
        manager.add_subscriber(Arc::new(Mutex::new(listener)));
    }

    // Every signal handler is in place before any filter: none allows
    // rt_sigaction.
    crate::vstate::control::install_kick_handler().map_err(BuildError::Signals)?;
    let filters = if seccomp {
        seccomp::install_sigsys_handler().map_err(BuildError::Seccomp)?;
        let profile = Profile {
            can_freeze: m.freeze.is_some(),
        };
        Some(Arc::new(
            Filters::compile(profile).map_err(BuildError::Seccomp)?,
        ))
    } else {
        None
    };
    #[cfg(debug_assertions)]
    let violate = seccomp::test_hook::requested();
    let gate = Arc::new(StartGate::default());
    let (ready_tx, ready_rx) = mpsc::channel::<Result<(), SeccompError>>();

    let first_stop: Arc<Mutex<Option<VcpuStop>>> = Arc::new(Mutex::new(None));
    let mut threads = Vec::new();
    for mut vcpu in std::mem::take(&mut m.vcpus) {
        let bus = m.bus.clone();
        let control = m.control.clone();
        let exits = exits.clone();
        let first_stop = first_stop.clone();
        let exit_evt = exit_evt.try_clone().map_err(BuildError::EventFd)?;
        let events = events.clone();
        let filters = filters.clone();
        let gate = gate.clone();
        let ready = ready_tx.clone();
        let handle = std::thread::Builder::new()
            .name(format!("vcpu{}", vcpu.index()))
            .spawn(move || {
                let installed = match &filters {
                    Some(f) => seccomp::install(ThreadKind::Vcpu, &f.vcpu),
                    None => Ok(()),
                };
                let ok = installed.is_ok();
                let _ = ready.send(installed);
                drop(ready);
                if !ok || !gate.wait() {
                    return;
                }
                #[cfg(debug_assertions)]
                if violate == Some(ThreadKind::Vcpu) && vcpu.index() == 0 {
                    seccomp::test_hook::violate();
                }
                if vcpu.index() == 0 {
                    events.emit(&Event::VcpuRunning { t_us: now_us() });
                }
                let why = vcpu.run(bus.as_ref(), &control, &exits);
                let rip = vcpu.fd().get_regs().map(|r| r.rip).unwrap_or(0);
                control.stop();
                let mut first = first_stop.lock().unwrap_or_else(|e| e.into_inner());
                if first.is_none() {
                    *first = Some(match why {
                        VcpuStop::Error(m) => {
                            VcpuStop::Error(format!("{m} (vCPU {}, RIP {rip:#x})", vcpu.index()))
                        }
                        other => other,
                    });
                }
                let _ = exit_evt.write(1);
            })
            .map_err(BuildError::Thread)?;
        threads.push(handle);
    }
    drop(ready_tx);
    // This thread starts no thread from here on: its filter allows none.
    // It installs it while the vCPU threads install theirs.
    let confined = (|| {
        if let Some(f) = &filters {
            seccomp::install(ThreadKind::Main, &f.main)?;
        }
        for _ in 0..threads.len() {
            ready_rx.recv().map_err(|_| SeccompError::ThreadGone)??;
        }
        Ok(())
    })();
    if let Err(e) = confined {
        m.control.stop();
        gate.open(false);
        return Err(BuildError::Seccomp(e));
    }
    #[cfg(debug_assertions)]
    if violate == Some(ThreadKind::Main) {
        seccomp::test_hook::violate();
    }
    gate.open(true);

    let mut frozen = false;
    while !fired.load(Ordering::SeqCst) {
        if let Err(e) = manager.run() {
            if !matches!(e, event_manager::Error::Epoll(ref io) if io.errno() == libc::EINTR) {
                return Err(BuildError::EventLoop(e));
            }
        }
        lock(&reporter).check();
        let request = pending.lock().unwrap_or_else(|e| e.into_inner()).take();
        if let Some(p) = request {
            match (&p.request, &m.freeze) {
                (CtlRequest::Freeze, None) => {
                    p.answer(&CtlResponse::err("this VM was not started to be frozen"))
                }
                (CtlRequest::Freeze, Some(target)) => {
                    let response = freeze(&m, target, &threads);
                    let ok = response.ok;
                    p.answer(&response);
                    if ok {
                        frozen = true;
                        m.control.stop();
                        break;
                    }
                }
            }
        }
    }
    lock(&reporter).finish();
    if frozen {
        drop(threads);
        return Ok(VmEnd {
            reason: ExitReason::Frozen,
            message: "frozen into a snapshot".into(),
        });
    }
    let why = first_stop
        .lock()
        .unwrap_or_else(|e| e.into_inner())
        .take()
        .unwrap_or(VcpuStop::Stopped);
    let console_state = &m.console_state;
    let panicked = console_state.panicked.load(Ordering::SeqCst);
    let panic_line = || {
        console_state
            .tail()
            .into_iter()
            .find(|l| l.contains("Kernel panic"))
            .unwrap_or_else(|| "guest kernel panicked".into())
    };
    let end = match why {
        _ if panicked => VmEnd {
            reason: ExitReason::Panic,
            message: panic_line(),
        },
        VcpuStop::Stopped | VcpuStop::SystemEvent(_) => VmEnd {
            reason: ExitReason::Shutdown,
            message: "guest shut down".into(),
        },
        VcpuStop::Shutdown => VmEnd {
            reason: ExitReason::TripleFault,
            message: "guest triple-faulted (KVM shutdown exit)".into(),
        },
        VcpuStop::EmulationFailure(bytes) => {
            let hex: Vec<String> = bytes.iter().map(|b| format!("{b:02x}")).collect();
            let mut message = format!(
                "KVM could not emulate a guest instruction (bytes: {})",
                hex.join(" ")
            );
            if let Some(hint) = vcpu::explain_emulation_failure(&bytes) {
                message.push_str(": ");
                message.push_str(hint);
            }
            VmEnd {
                reason: ExitReason::EmulationFailure,
                message,
            }
        }
        VcpuStop::InternalError(sub) => VmEnd {
            reason: ExitReason::Error,
            message: format!("KVM internal error, suberror {sub}"),
        },
        VcpuStop::Error(m) => VmEnd {
            reason: ExitReason::Error,
            message: m,
        },
    };
    // vCPU threads still in KVM_RUN end with the process.
    drop(threads);
    Ok(end)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn cfg() -> BootSource {
        BootSource {
            memory_mib: 64,
            ..BootSource::new("/nonexistent")
        }
    }

    #[test]
    fn bad_sizes_are_refused_before_anything_is_created() {
        let c = BootSource {
            memory_mib: 0,
            ..cfg()
        };
        assert!(validate(&c)
            .unwrap_err()
            .to_string()
            .contains("at least 1 MiB"));
        let c = BootSource {
            memory_mib: host_memory_mib() + 1,
            ..cfg()
        };
        assert!(validate(&c)
            .unwrap_err()
            .to_string()
            .contains("more than this host has"));
        let c = BootSource { vcpus: 0, ..cfg() };
        assert!(validate(&c).is_err());
        assert!(validate(&cfg()).is_ok());
    }

    #[test]
    fn cmdline_declares_devices_before_the_image_part() {
        let s = kernel_cmdline("quiet -- x", &[(0xd000_0000, 5)]);
        assert_eq!(
            s,
            "console=ttyS0 reboot=k panic=-1 virtio_mmio.device=4K@0xd0000000:5 quiet -- x"
        );
    }
}
