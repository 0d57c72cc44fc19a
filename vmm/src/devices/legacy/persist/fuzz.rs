//! Randomized tests of restoring the serial port from a snapshot's state:
//! any register values and receive FIFO, any version. A state is restored
//! exactly (it saves back as it was) or refused with a typed
//! [`SerialRestoreError`]; the restored UART then takes any register
//! access from its guest. Test code only.

use std::sync::Arc;

use proptest::prelude::*;
use vmm_sys_util::eventfd::EventFd;

use super::*;
use crate::devices::legacy::console::ConsoleState;
use proto::events::EventSink;

fn args() -> SerialConstructorArgs {
    let evt = EventFd::new(libc::EFD_NONBLOCK).unwrap();
    SerialConstructorArgs {
        interrupt: EventFdTrigger(evt),
        out: ConsoleSink::new(
            None,
            Arc::new(ConsoleState::default()),
            Arc::new(EventSink::new(Box::new(std::io::sink()))),
        ),
    }
}

fn state() -> impl Strategy<Value = SerialState> {
    (
        prop_oneof![8 => Just(SERIAL_STATE_VERSION), 1 => any::<u32>()],
        any::<[u8; 9]>(),
        prop_oneof![
            8 => prop::collection::vec(any::<u8>(), 0..=SERIAL_FIFO_SIZE),
            1 => prop::collection::vec(any::<u8>(), SERIAL_FIFO_SIZE + 1..200),
        ],
    )
        .prop_map(|(version, r, in_buffer)| SerialState {
            version,
            baud_divisor_low: r[0],
            baud_divisor_high: r[1],
            interrupt_enable: r[2],
            interrupt_identification: r[3],
            line_control: r[4],
            line_status: r[5],
            modem_control: r[6],
            modem_status: r[7],
            scratch: r[8],
            in_buffer,
        })
}

proptest! {
    #![proptest_config(crate::devices::virtio::ring_fuzz::config(128))]

    #[test]
    fn any_serial_state_restores_exactly_or_is_refused(
        s in state(),
        accesses in prop::collection::vec((0u8..8, any::<u8>(), any::<bool>()), 0..16),
    ) {
        let restored = SerialDevice::restore(args(), &s);
        let mut uart = match restored {
            Err(SerialRestoreError::Version(e)) => {
                prop_assert_ne!(s.version, SERIAL_STATE_VERSION);
                prop_assert_eq!(e.found, s.version);
                return Ok(());
            }
            Err(SerialRestoreError::FifoOverflow { len }) => {
                prop_assert_eq!(s.version, SERIAL_STATE_VERSION);
                prop_assert!(len > SERIAL_FIFO_SIZE);
                return Ok(());
            }
            Err(e) => return Err(TestCaseError::fail(format!("unexpected error {e}"))),
            Ok(uart) => uart,
        };
        prop_assert_eq!(s.version, SERIAL_STATE_VERSION);
        prop_assert!(s.in_buffer.len() <= SERIAL_FIFO_SIZE);
        prop_assert_eq!(uart.save(), s.clone());
        for (reg, value, write) in accesses {
            if write {
                let _ = uart.write(reg, value);
            } else {
                uart.read(reg);
            }
        }
        prop_assert!(uart.save().in_buffer.len() <= SERIAL_FIFO_SIZE);
    }
}
