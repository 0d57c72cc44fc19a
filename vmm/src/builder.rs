//! Assembles a microVM from a [`VmConfig`] and runs it to its end.

use std::fs::File;
use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};

use event_manager::{EventManager, EventOps, Events, MutEventSubscriber, SubscriberOps};
use kvm_ioctls::IoEventAddress;
use vmm_sys_util::epoll::EventSet;
use vmm_sys_util::eventfd::EventFd;

use crate::boot::{self, BootSpec};
use crate::devices::legacy::console::{ConsoleSink, ConsoleState};
use crate::devices::legacy::{
    EventFdTrigger, FnTrigger, SerialDevice, I8042, I8042_PORT_BASE, SERIAL_PORT_BASE,
};
use crate::devices::virtio::{MmioTransport, Rng, Vsock};
use crate::events::{now_us, Event, EventSink, ExitReason};
use crate::layout::*;
use crate::memory;
use crate::vstate::control::RunControl;
use crate::vstate::vcpu::{self, Bus, Vcpu, VcpuStop};
use crate::vstate::vm;

/// Where the serial console goes.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ConsoleOut {
    /// Discarded (still scanned for markers and panics).
    None,
    /// The VMM's stderr.
    Stderr,
    /// Appended to a file.
    File(PathBuf),
}

/// Everything needed to boot one microVM.
#[derive(Debug, Clone)]
pub struct VmConfig {
    /// Guest kernel (ELF vmlinux or bzImage).
    pub kernel: PathBuf,
    /// Initramfs.
    pub initrd: Option<PathBuf>,
    /// Kernel command line from the image; the VMM adds its own device part.
    pub cmdline: String,
    /// Guest RAM in MiB.
    pub memory_mib: u64,
    /// Number of vCPUs.
    pub vcpus: u8,
    /// Host side of virtio-vsock: Unix socket path (none: no vsock device).
    pub vsock_uds: Option<PathBuf>,
    /// The guest's vsock context id.
    pub guest_cid: u64,
    /// Serial console destination.
    pub console: ConsoleOut,
}

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
pub fn validate(cfg: &VmConfig) -> Result<(), BuildError> {
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

/// Builds the VM described by `cfg`, runs it until the guest ends, and
/// returns why it ended. Emits [`Event`]s on the way.
pub fn run_vm(cfg: &VmConfig, events: Arc<EventSink>) -> Result<VmEnd, BuildError> {
    validate(cfg)?;
    let kvm = vm::open_kvm()?;
    let size = cfg.memory_mib << 20;
    let memfd = memory::create_memfd(size)?;
    let mem = memory::map_guest_memory(&memfd, size, libc::MAP_SHARED)?;
    let vmfd = vm::create_vm(&kvm, &mem)?;

    // Devices first: the command line names them.
    let mut virtio: Vec<(u64, Arc<Mutex<MmioTransport>>)> = Vec::new();
    let mut declared = Vec::new();
    let mut add_virtio = |dev: MmioTransport| -> Result<(), BuildError> {
        let index = virtio.len() as u64;
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
        virtio.push((base, Arc::new(Mutex::new(dev))));
        declared.push((base, gsi));
        Ok(())
    };
    if let Some(uds) = &cfg.vsock_uds {
        let vsock = Vsock::new(cfg.guest_cid, uds)
            .map_err(|e| BuildError::Device(format!("vsock: {e}")))?;
        add_virtio(
            MmioTransport::new(Box::new(vsock), mem.clone())
                .map_err(|e| BuildError::Device(e.to_string()))?,
        )?;
    }
    add_virtio(
        MmioTransport::new(Box::new(Rng::new()), mem.clone())
            .map_err(|e| BuildError::Device(e.to_string()))?,
    )?;

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

    let console_out: Option<Box<dyn std::io::Write + Send>> = match &cfg.console {
        ConsoleOut::None => None,
        ConsoleOut::Stderr => Some(Box::new(std::io::stderr())),
        ConsoleOut::File(path) => Some(Box::new(
            File::options()
                .create(true)
                .append(true)
                .open(path)
                .map_err(|source| BuildError::Console {
                    path: path.clone(),
                    source,
                })?,
        )),
    };
    let console_state = Arc::new(ConsoleState::default());
    let serial_evt = EventFd::new(libc::EFD_NONBLOCK)
        .map_err(|e| BuildError::Device(format!("eventfd: {e}")))?;
    vmfd.register_irqfd(&serial_evt, SERIAL_GSI)
        .map_err(|e| BuildError::Device(format!("serial irqfd: {e}")))?;
    let serial = SerialDevice::new(
        EventFdTrigger(serial_evt),
        ConsoleSink::new(console_out, console_state.clone(), events.clone()),
    );

    let control = Arc::new(RunControl::default());
    let exit_evt = EventFd::new(libc::EFD_NONBLOCK)
        .map_err(|e| BuildError::Device(format!("eventfd: {e}")))?;
    let reset_control = control.clone();
    let i8042 = I8042::new(FnTrigger(Arc::new(move || reset_control.stop())));

    let bus = Arc::new(DeviceBus {
        serial: Mutex::new(serial),
        i8042: Mutex::new(i8042),
        virtio: virtio.clone(),
    });

    let mut vcpus = Vec::new();
    for index in 0..cfg.vcpus {
        let entry = (index == 0).then_some(info.entry);
        vcpus.push(Vcpu::new(&kvm, &vmfd, index, cfg.vcpus, entry)?);
    }

    let mut manager: EventManager<Arc<Mutex<dyn MutEventSubscriber + Send>>> =
        EventManager::new().map_err(|e| BuildError::Device(format!("event manager: {e:?}")))?;
    for (_, dev) in &virtio {
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

    let first_stop: Arc<Mutex<Option<VcpuStop>>> = Arc::new(Mutex::new(None));
    let mut threads = Vec::new();
    for mut vcpu in vcpus {
        let bus = bus.clone();
        let control = control.clone();
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

    while !fired.load(Ordering::SeqCst) {
        if let Err(e) = manager.run() {
            if !matches!(e, event_manager::Error::Epoll(ref io) if io.errno() == libc::EINTR) {
                return Err(BuildError::Device(format!("device event loop: {e:?}")));
            }
        }
    }
    let why = first_stop
        .lock()
        .unwrap_or_else(|e| e.into_inner())
        .take()
        .unwrap_or(VcpuStop::Stopped);
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

    fn cfg() -> VmConfig {
        VmConfig {
            kernel: "/nonexistent".into(),
            initrd: None,
            cmdline: String::new(),
            memory_mib: 64,
            vcpus: 1,
            vsock_uds: None,
            guest_cid: 3,
            console: ConsoleOut::None,
        }
    }

    #[test]
    fn bad_sizes_are_refused_before_anything_is_created() {
        let c = VmConfig {
            memory_mib: 0,
            ..cfg()
        };
        assert!(validate(&c)
            .unwrap_err()
            .to_string()
            .contains("at least 1 MiB"));
        let c = VmConfig {
            memory_mib: host_memory_mib() + 1,
            ..cfg()
        };
        assert!(validate(&c)
            .unwrap_err()
            .to_string()
            .contains("more than this host has"));
        let c = VmConfig { vcpus: 0, ..cfg() };
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
