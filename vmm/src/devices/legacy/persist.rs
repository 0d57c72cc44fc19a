//! Saving and restoring the 8250 serial port ([`SerialDevice`]) through
//! [`Persist`]: its registers and the bytes the guest has not read yet.
//!
//! It owns the serial port's saved state ([`SerialState`]) and nothing
//! else: where the console output goes and which interrupt line it raises
//! are the restoring VMM's ([`SerialConstructorArgs`]). It must not trust
//! the state: a receive FIFO longer than the UART's is refused, not cut.
//! (The i8042 keeps no state worth saving: a guest only uses it to reset.)

use serde::{Deserialize, Serialize};

use super::console::ConsoleSink;
use super::{EventFdTrigger, SerialDevice};
use crate::persist::{check_version, Persist, VersionError};

/// Version of [`SerialState`].
pub const SERIAL_STATE_VERSION: u32 = 1;
/// Bytes the UART's receive FIFO holds (`vm_superio`'s, and a 16550's).
pub const SERIAL_FIFO_SIZE: usize = 64;

/// The 8250 UART's registers (`vm_superio::serial::SerialState`, which is
/// not serde).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct SerialState {
    /// [`SERIAL_STATE_VERSION`].
    pub version: u32,
    /// Divisor latch, low byte.
    pub baud_divisor_low: u8,
    /// Divisor latch, high byte.
    pub baud_divisor_high: u8,
    /// Interrupt enable.
    pub interrupt_enable: u8,
    /// Interrupt identification.
    pub interrupt_identification: u8,
    /// Line control.
    pub line_control: u8,
    /// Line status.
    pub line_status: u8,
    /// Modem control.
    pub modem_control: u8,
    /// Modem status.
    pub modem_status: u8,
    /// Scratch.
    pub scratch: u8,
    /// Received bytes not yet read by the guest (at most [`SERIAL_FIFO_SIZE`]).
    pub in_buffer: Vec<u8>,
}

impl Default for SerialState {
    /// A UART just after power-on.
    fn default() -> Self {
        vm_superio::serial::SerialState::default().into()
    }
}

impl From<vm_superio::serial::SerialState> for SerialState {
    fn from(s: vm_superio::serial::SerialState) -> Self {
        SerialState {
            version: SERIAL_STATE_VERSION,
            baud_divisor_low: s.baud_divisor_low,
            baud_divisor_high: s.baud_divisor_high,
            interrupt_enable: s.interrupt_enable,
            interrupt_identification: s.interrupt_identification,
            line_control: s.line_control,
            line_status: s.line_status,
            modem_control: s.modem_control,
            modem_status: s.modem_status,
            scratch: s.scratch,
            in_buffer: s.in_buffer,
        }
    }
}

/// What a restored serial port needs besides its state.
pub struct SerialConstructorArgs {
    /// Raises the serial interrupt (an irqfd).
    pub interrupt: EventFdTrigger,
    /// Where the guest's output goes.
    pub out: ConsoleSink,
}

/// Why a serial state cannot be restored.
#[derive(Debug, thiserror::Error)]
pub enum SerialRestoreError {
    /// Another state version.
    #[error(transparent)]
    Version(#[from] VersionError),
    /// More received bytes than the UART can hold: the state is corrupt.
    #[error("the saved serial port holds {len} received bytes, more than its {SERIAL_FIFO_SIZE}-byte FIFO (corrupt state)")]
    FifoOverflow {
        /// Bytes in the saved FIFO.
        len: usize,
    },
    /// The interrupt the saved registers say is pending could not be raised.
    #[error("cannot raise the restored serial port's pending interrupt")]
    Interrupt(#[source] std::io::Error),
}

impl Persist for SerialDevice {
    type State = SerialState;
    type ConstructorArgs = SerialConstructorArgs;
    type Error = SerialRestoreError;

    fn save(&self) -> SerialState {
        self.state().into()
    }

    fn restore(args: SerialConstructorArgs, state: &SerialState) -> Result<Self, Self::Error> {
        check_version("serial", state.version, SERIAL_STATE_VERSION)?;
        if state.in_buffer.len() > SERIAL_FIFO_SIZE {
            return Err(SerialRestoreError::FifoOverflow {
                len: state.in_buffer.len(),
            });
        }
        let raw = vm_superio::serial::SerialState {
            baud_divisor_low: state.baud_divisor_low,
            baud_divisor_high: state.baud_divisor_high,
            interrupt_enable: state.interrupt_enable,
            interrupt_identification: state.interrupt_identification,
            line_control: state.line_control,
            line_status: state.line_status,
            modem_control: state.modem_control,
            modem_status: state.modem_status,
            scratch: state.scratch,
            in_buffer: state.in_buffer.clone(),
        };
        SerialDevice::from_state(&raw, args.interrupt, vm_superio::serial::NoEvents, args.out)
            .map_err(|e| match e {
                vm_superio::serial::Error::Trigger(e) | vm_superio::serial::Error::IOError(e) => {
                    SerialRestoreError::Interrupt(e)
                }
                // Checked above; kept apart so that a vm-superio with a smaller
                // FIFO is still a clear error.
                vm_superio::serial::Error::FullFifo => SerialRestoreError::FifoOverflow {
                    len: state.in_buffer.len(),
                },
            })
    }
}

#[cfg(test)]
mod fuzz;

#[cfg(test)]
mod tests {
    use std::sync::Arc;

    use vmm_sys_util::eventfd::EventFd;

    use super::*;
    use crate::devices::legacy::console::ConsoleState;
    use proto::events::EventSink;

    fn args() -> (SerialConstructorArgs, EventFd) {
        let evt = EventFd::new(libc::EFD_NONBLOCK).unwrap();
        let out = ConsoleSink::new(
            None,
            Arc::new(ConsoleState::default()),
            Arc::new(EventSink::new(Box::new(std::io::sink()))),
        );
        let args = SerialConstructorArgs {
            interrupt: EventFdTrigger(evt.try_clone().unwrap()),
            out,
        };
        (args, evt)
    }

    /// A UART the guest programmed (8N1, divisor 1, receive interrupt on)
    /// with two bytes waiting for it.
    fn programmed() -> SerialDevice {
        let (a, _evt) = args();
        let mut s = SerialDevice::new(a.interrupt, a.out);
        for (reg, value) in [(3u8, 0x80u8), (0, 1), (1, 0), (3, 0x03), (7, 0x5a), (1, 1)] {
            s.write(reg, value).unwrap();
        }
        s.enqueue_raw_bytes(b"hi").unwrap();
        s
    }

    #[test]
    fn serial_state_round_trips_through_json() {
        let saved = programmed().save();
        assert_eq!(saved.version, SERIAL_STATE_VERSION);
        assert_eq!((saved.scratch, saved.line_control), (0x5a, 0x03));
        assert_eq!(saved.in_buffer, b"hi");
        let json = serde_json::to_string(&saved).unwrap();
        let back: SerialState = serde_json::from_str(&json).unwrap();
        let (a, evt) = args();
        let mut restored = SerialDevice::restore(a, &back).unwrap();
        assert_eq!(restored.save(), saved);
        // The receive interrupt the saved registers hold is raised again.
        assert_eq!(evt.read().unwrap(), 1);
        // And the guest reads its bytes where it left them.
        assert_eq!(restored.read(0), b'h');
        assert_eq!(restored.read(0), b'i');
    }

    #[test]
    fn a_fresh_uart_restores_to_a_fresh_uart() {
        let (a, _evt) = args();
        let fresh = SerialDevice::new(a.interrupt, a.out).save();
        assert_eq!(fresh, SerialState::default());
        let (a, _evt) = args();
        assert_eq!(SerialDevice::restore(a, &fresh).unwrap().save(), fresh);
    }

    #[test]
    fn bad_serial_states_are_refused() {
        let good = programmed().save();

        let over = SerialState {
            in_buffer: vec![b'x'; SERIAL_FIFO_SIZE + 1],
            ..good.clone()
        };
        let (a, _evt) = args();
        let e = SerialDevice::restore(a, &over).err().expect("refused");
        assert!(
            matches!(e, SerialRestoreError::FifoOverflow { len: 65 }),
            "{e}"
        );

        let full = SerialState {
            in_buffer: vec![b'x'; SERIAL_FIFO_SIZE],
            ..good.clone()
        };
        let (a, _evt) = args();
        assert!(SerialDevice::restore(a, &full).is_ok());

        let newer = SerialState {
            version: SERIAL_STATE_VERSION + 1,
            ..good
        };
        let (a, _evt) = args();
        let e = SerialDevice::restore(a, &newer).err().expect("refused");
        assert_eq!(e.to_string(), "serial state version 2, this VMM reads 1");
    }
}
