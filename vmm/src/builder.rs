//! Assembles a microVM from its launch description ([`proto::launch`]) and
//! runs it to its end.

use std::fs::File;
use std::io::Write;
use std::os::unix::fs::{OpenOptionsExt, PermissionsExt};
use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
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
use crate::devices::legacy::{
    EventFdTrigger, FnTrigger, SerialDevice, I8042, I8042_PORT_BASE, SERIAL_PORT_BASE,
};
use crate::devices::virtio::{MmioTransport, Rng, VirtioDevice, Vsock};
use crate::layout::*;
use crate::memory;
use crate::snapshot::{DeviceKind, DeviceSnapshot, SerialSnapshot, VmSnapshot};
use crate::vstate::control::RunControl;
use crate::vstate::state::{readable_msrs, VmState};
use crate::vstate::vcpu::{self, Bus, Vcpu, VcpuStop};
use crate::vstate::vm;
use proto::ctl::{CtlRequest, CtlResponse};
use proto::events::{now_us, Event, EventSink, ExitReason};
use proto::launch::{BootSource, ConsoleTarget, VmmLaunch};

/// Errors building or running a VM.
#[derive(Debug, thiserror::Error)]
pub enum BuildError {
    /// Invalid configuration.
    #[error("{0}")]
    Config(String),
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
    /// A device could not be created.
    #[error("device setup: {0}")]
    Device(String),
    /// A snapshot could not be restored.
    #[error("cannot restore the snapshot: {0}")]
    Restore(String),
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
        return Err(BuildError::Config(
            "guest memory must be at least 1 MiB (got 0)".into(),
        ));
    }
    let host_mib = host_memory_mib();
    if cfg.memory_mib > host_mib {
        return Err(BuildError::Config(format!(
            "guest memory of {} MiB is more than this host has ({host_mib} MiB)",
            cfg.memory_mib
        )));
    }
    if cfg.vcpus == 0 || cfg.vcpus > MAX_VCPUS {
        return Err(BuildError::Config(format!(
            "vCPU count must be 1..={MAX_VCPUS} (got {})",
            cfg.vcpus
        )));
    }
    if cfg.guest_cid < 3 || cfg.guest_cid > u64::from(u32::MAX) {
        return Err(BuildError::Config(format!(
            "guest CID must be 3..=2^32-1 (got {})",
            cfg.guest_cid
        )));
    }
    Ok(())
}

/// Total RAM of the host in MiB (from /proc/meminfo).
pub fn host_memory_mib() -> u64 {
    std::fs::read_to_string("/proc/meminfo")
        .ok()
        .and_then(|s| {
            s.lines()
                .find(|l| l.starts_with("MemTotal:"))
                .and_then(|l| {
                    l.split_whitespace()
                        .nth(1)
                        .and_then(|k| k.parse::<u64>().ok())
                })
        })
        .map(|kib| kib / 1024)
        .unwrap_or(u64::MAX)
}

struct DeviceBus {
    serial: Mutex<SerialDevice>,
    i8042: Mutex<I8042>,
    virtio: Vec<(u64, Arc<Mutex<MmioTransport>>)>,
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
    devices: Vec<(DeviceKind, u64, u32, Arc<Mutex<MmioTransport>>)>,
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
    guest_cid: u64,
    cmdline: String,
}

fn device_err(what: &'static str) -> impl Fn(String) -> BuildError {
    move |e| BuildError::Device(format!("{what}: {e}"))
}

/// Registers `dev`'s queue notifications and interrupt with KVM at the next
/// virtio window and adds it to `devices`.
fn attach_virtio(
    vmfd: &VmFd,
    devices: &mut Vec<(DeviceKind, u64, u32, Arc<Mutex<MmioTransport>>)>,
    kind: DeviceKind,
    dev: MmioTransport,
) -> Result<(), BuildError> {
    let index = devices.len() as u64;
    let base = VIRTIO_MMIO_BASE + index * VIRTIO_MMIO_SIZE;
    let gsi = VIRTIO_FIRST_GSI + index as u32;
    if gsi > MAX_GSI {
        return Err(BuildError::Device("too many virtio devices".into()));
    }
    for (q, evt) in dev.queue_events().iter().enumerate() {
        vmfd.register_ioevent(evt, &IoEventAddress::Mmio(base + 0x50), q as u32)
            .map_err(|e| BuildError::Device(format!("ioeventfd: {e}")))?;
    }
    vmfd.register_irqfd(dev.interrupt_evt(), gsi)
        .map_err(|e| BuildError::Device(format!("irqfd: {e}")))?;
    devices.push((kind, base, gsi, Arc::new(Mutex::new(dev))));
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
    serial_state: Option<&SerialSnapshot>,
    devices: &[(DeviceKind, u64, u32, Arc<Mutex<MmioTransport>>)],
    control: &Arc<RunControl>,
    events: &Arc<EventSink>,
) -> Result<(Arc<DeviceBus>, Arc<ConsoleState>), BuildError> {
    let console_state = Arc::new(ConsoleState::default());
    let serial_evt = EventFd::new(libc::EFD_NONBLOCK)
        .map_err(|e| BuildError::Device(format!("eventfd: {e}")))?;
    vmfd.register_irqfd(&serial_evt, SERIAL_GSI)
        .map_err(|e| BuildError::Device(format!("serial irqfd: {e}")))?;
    let sink = ConsoleSink::new(
        console_writer(console)?,
        console_state.clone(),
        events.clone(),
    );
    let serial = match serial_state {
        None => SerialDevice::new(EventFdTrigger(serial_evt), sink),
        Some(state) => SerialDevice::from_state(
            &state.into(),
            EventFdTrigger(serial_evt),
            vm_superio::serial::NoEvents,
            sink,
        )
        .map_err(|e| BuildError::Device(format!("serial state: {e:?}")))?,
    };
    let reset_control = control.clone();
    let i8042 = I8042::new(FnTrigger(Arc::new(move || reset_control.stop())));
    let bus = Arc::new(DeviceBus {
        serial: Mutex::new(serial),
        i8042: Mutex::new(i8042),
        virtio: devices
            .iter()
            .map(|(_, base, _, dev)| (*base, dev.clone()))
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
                .map_err(|e| {
                    BuildError::Config(format!(
                        "cannot create guest RAM at {}: {e}",
                        path.display()
                    ))
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
    let kvm = vm::open_kvm()?;
    let size = cfg.memory_mib << 20;
    let memfd = boot_memory(cfg)?;
    let mem = memory::map_guest_memory(&memfd, size, libc::MAP_SHARED)?;
    let vmfd = vm::create_vm(&kvm, &mem)?;

    // Devices first: the command line names them.
    let mut devices = Vec::new();
    if let Some(uds) = &launch.vsock {
        let vsock =
            Vsock::new(cfg.guest_cid, uds).map_err(|e| device_err("vsock")(e.to_string()))?;
        let t = MmioTransport::new(Box::new(vsock), mem.clone())
            .map_err(|e| device_err("vsock")(e.to_string()))?;
        attach_virtio(&vmfd, &mut devices, DeviceKind::Vsock, t)?;
    }
    let t = MmioTransport::new(Box::new(Rng::new()), mem.clone())
        .map_err(|e| device_err("rng")(e.to_string()))?;
    attach_virtio(&vmfd, &mut devices, DeviceKind::Rng, t)?;
    let declared: Vec<(u64, u32)> = devices.iter().map(|d| (d.1, d.2)).collect();

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
            msr_indices: readable_msrs(&kvm, vcpus[0].fd())
                .map_err(|e| BuildError::Device(format!("MSR list: {e}")))?,
            memory_mib: cfg.memory_mib,
            guest_cid: cfg.guest_cid,
            cmdline,
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
    run_machine(machine, launch.control.as_deref(), events)
}

/// Errors specific to restoring.
fn restore_err(e: impl std::fmt::Display) -> BuildError {
    BuildError::Restore(e.to_string())
}

/// Starts a VM from a snapshot: guest RAM is the snapshot's memory file
/// mapped copy-on-write (nothing is copied up front), then VM, vCPU and
/// device state are restored and the vCPUs resume where the master stopped.
pub fn restore_vm(
    launch: &VmmLaunch,
    snapshot: &std::path::Path,
    events: Arc<EventSink>,
) -> Result<VmEnd, BuildError> {
    let prepared = prepare_restore(snapshot)?;
    run_restored(&prepared, launch, events)
}

/// A snapshot read and its memory mapped: everything of a restore that
/// does not involve KVM. (A process that holds one can `fork()` clones
/// that only do the KVM part: see [`crate::fork_bench`].)
pub struct PreparedRestore {
    state: VmSnapshot,
    mem: GuestMemoryMmap,
}

/// Reads and checks the snapshot at `dir` and maps its memory
/// copy-on-write.
pub fn prepare_restore(dir: &std::path::Path) -> Result<PreparedRestore, BuildError> {
    let snap = snapshotter::open(dir).map_err(restore_err)?;
    let state = VmSnapshot::read(&snap).map_err(restore_err)?;
    // Read-only: the master's RAM is never written through this file.
    let file = File::open(snap.memory_path())
        .map_err(|e| restore_err(format!("cannot open {}: {e}", snap.memory_path().display())))?;
    let mem = memory::map_guest_memory(&file, snap.manifest.memory.size, libc::MAP_PRIVATE)?;
    Ok(PreparedRestore { state, mem })
}

/// Creates the KVM VM for a prepared snapshot, restores VM, vCPU and device
/// state, and runs it to its end.
pub fn run_restored(
    prepared: &PreparedRestore,
    launch: &VmmLaunch,
    events: Arc<EventSink>,
) -> Result<VmEnd, BuildError> {
    let PreparedRestore { state, mem } = prepared;
    let mem = mem.clone();
    let kvm = vm::open_kvm()?;
    let vmfd = vm::create_vm(&kvm, &mem)?;
    state.vm.restore(&vmfd).map_err(restore_err)?;

    let mut vcpus = Vec::with_capacity(state.vcpus.len());
    for s in &state.vcpus {
        vcpus.push(Vcpu::restore(&vmfd, s).map_err(restore_err)?);
    }

    let mut devices = Vec::new();
    for d in &state.devices {
        let model: Box<dyn VirtioDevice> = match d.kind {
            DeviceKind::Vsock => {
                let Some(uds) = &launch.vsock else {
                    return Err(restore_err("the snapshot has a vsock device: give --vsock"));
                };
                Box::new(
                    Vsock::new(state.guest_cid, uds)
                        .map_err(|e| device_err("vsock")(e.to_string()))?,
                )
            }
            DeviceKind::Rng => Box::new(Rng::new()),
        };
        let t = MmioTransport::restore(model, mem.clone(), &d.mmio)
            .map_err(|e| restore_err(format!("{:?} device: {e}", d.kind)))?;
        attach_virtio(&vmfd, &mut devices, d.kind, t)?;
    }
    let control = Arc::new(RunControl::default());
    let (bus, console_state) = device_bus(
        &vmfd,
        &launch.console,
        Some(&state.serial),
        &devices,
        &control,
        &events,
    )?;
    let machine = Machine {
        vmfd,
        devices,
        bus,
        vcpus,
        console_state,
        control,
        freeze: None,
        _mem: mem,
    };
    run_machine(machine, None, events)
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
            return CtlResponse::err(format!("pausing the vCPUs: {e}"));
        }
    };
    let paused = Instant::now();
    let result = (|| -> Result<u64, String> {
        let vm = VmState::save(&m.vmfd).map_err(|e| e.to_string())?;
        let devices = m
            .devices
            .iter()
            .map(|(kind, base, gsi, dev)| DeviceSnapshot {
                kind: *kind,
                base: *base,
                gsi: *gsi,
                mmio: dev.lock().unwrap_or_else(|e| e.into_inner()).save_state(),
            })
            .collect();
        let serial = m
            .bus
            .serial
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .state()
            .into();
        let snap = VmSnapshot {
            memory_mib: target.memory_mib,
            guest_cid: target.guest_cid,
            cmdline: target.cmdline.clone(),
            vm,
            vcpus,
            devices,
            serial,
        };
        let json = serde_json::to_string(&snap).map_err(|e| e.to_string())?;
        snapshotter::write_manifest(&target.dir, &json, None).map_err(|e| e.to_string())?;
        // The master's RAM is final: nobody writes it again.
        let _ = std::fs::set_permissions(
            target.dir.join(snapshotter::MEMORY_FILE),
            std::fs::Permissions::from_mode(0o400),
        );
        Ok(json.len() as u64)
    })();
    match result {
        Ok(state_bytes) => CtlResponse {
            ok: true,
            error: None,
            pause_ms: Some(ms(t0, paused)),
            save_ms: Some(ms(paused, Instant::now())),
            state_bytes: Some(state_bytes),
        },
        Err(e) => {
            m.control.resume();
            CtlResponse::err(format!("saving the VM state: {e}"))
        }
    }
}

fn ms(a: Instant, b: Instant) -> f64 {
    (b - a).as_secs_f64() * 1000.0
}

/// Runs an assembled VM: one thread per vCPU, this thread runs the device
/// event loop (and the control socket) until the VM ends.
fn run_machine(
    mut m: Machine,
    ctl_path: Option<&std::path::Path>,
    events: Arc<EventSink>,
) -> Result<VmEnd, BuildError> {
    let exit_evt = EventFd::new(libc::EFD_NONBLOCK)
        .map_err(|e| BuildError::Device(format!("eventfd: {e}")))?;
    let mut manager: EventManager<Arc<Mutex<dyn MutEventSubscriber + Send>>> =
        EventManager::new().map_err(|e| BuildError::Device(format!("event manager: {e:?}")))?;
    for (_, _, _, dev) in &m.devices {
        manager.add_subscriber(dev.clone());
    }
    let fired = Arc::new(AtomicBool::new(false));
    let watcher_evt = exit_evt
        .try_clone()
        .map_err(|e| BuildError::Device(e.to_string()))?;
    manager.add_subscriber(Arc::new(Mutex::new(ExitWatcher {
        evt: watcher_evt,
        fired: fired.clone(),
    })));
    let pending: Arc<Mutex<Option<Pending>>> = Arc::new(Mutex::new(None));
    if let Some(path) = ctl_path {
        let listener = CtlListener::bind(path, pending.clone())
            .map_err(|e| BuildError::Device(format!("control socket {}: {e}", path.display())))?;
        manager.add_subscriber(Arc::new(Mutex::new(listener)));
    }

    let first_stop: Arc<Mutex<Option<VcpuStop>>> = Arc::new(Mutex::new(None));
    let mut threads = Vec::new();
    for mut vcpu in std::mem::take(&mut m.vcpus) {
        let bus = m.bus.clone();
        let control = m.control.clone();
        let first_stop = first_stop.clone();
        let exit_evt = exit_evt
            .try_clone()
            .map_err(|e| BuildError::Device(e.to_string()))?;
        let events = events.clone();
        let handle = std::thread::Builder::new()
            .name(format!("vcpu{}", vcpu.index()))
            .spawn(move || {
                if vcpu.index() == 0 {
                    events.emit(&Event::VcpuRunning { t_us: now_us() });
                }
                let why = vcpu.run(bus.as_ref(), &control);
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
            .map_err(|e| BuildError::Device(format!("vCPU thread: {e}")))?;
        threads.push(handle);
    }

    let mut frozen = false;
    while !fired.load(Ordering::SeqCst) {
        if let Err(e) = manager.run() {
            if !matches!(e, event_manager::Error::Epoll(ref io) if io.errno() == libc::EINTR) {
                return Err(BuildError::Device(format!("device event loop: {e:?}")));
            }
        }
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
