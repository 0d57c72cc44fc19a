//! Legacy PC devices on port I/O: the 8250 serial console and the i8042
//! controller (whose reset line is how a guest ends its VM); the serial
//! port's snapshot state is in [`persist`]. The console must never stop the
//! guest: output that cannot be written is dropped.

pub mod console;
pub mod persist;

use std::sync::Arc;

use vm_superio::Trigger;
use vmm_sys_util::eventfd::EventFd;

/// A `vm-superio` trigger that writes an eventfd (an irqfd for the serial IRQ).
pub struct EventFdTrigger(pub EventFd);

impl Trigger for EventFdTrigger {
    type E = std::io::Error;
    fn trigger(&self) -> Result<(), Self::E> {
        self.0.write(1)
    }
}

/// A `vm-superio` trigger that runs a closure (the i8042 CPU reset line).
pub struct FnTrigger(pub Arc<dyn Fn() + Send + Sync>);

impl Trigger for FnTrigger {
    type E = std::convert::Infallible;
    fn trigger(&self) -> Result<(), Self::E> {
        (self.0)();
        Ok(())
    }
}

/// The serial device type used by the VMM.
pub type SerialDevice =
    vm_superio::Serial<EventFdTrigger, vm_superio::serial::NoEvents, console::ConsoleSink>;
/// The i8042 device type used by the VMM.
pub type I8042 = vm_superio::I8042Device<FnTrigger>;

/// COM1 port range.
pub const SERIAL_PORT_BASE: u16 = 0x3f8;
/// i8042 data port; the command/status port is `+ 4`.
pub const I8042_PORT_BASE: u16 = 0x60;
