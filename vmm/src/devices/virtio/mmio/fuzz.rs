//! Randomized tests of the virtio-mmio register interface, the other half
//! of what a guest controls: any sequence of reads and writes (any offset,
//! size and value, driver set-up sequences with any values in them) and
//! queue notifications, on an rng device over guest memory that holds
//! anything.
//!
//! No access panics; identification registers read what they must; a
//! device is only ever active with features the device offered and the
//! driver accepted, `FEATURES_OK` and `DRIVER_OK` set, and queues inside
//! guest memory. Test code only.

use proptest::prelude::*;
use virtio_queue::QueueT;
use vm_memory::{Bytes, GuestAddress};

use super::*;
use crate::devices::virtio::test_utils::mem;
use crate::devices::virtio::Rng;

/// One guest access to the window.
#[derive(Debug, Clone)]
enum Access {
    Read {
        offset: u64,
        size: usize,
    },
    Write {
        offset: u64,
        bytes: Vec<u8>,
    },
    /// A full driver set-up of queue 0 with these values.
    SetUp {
        features: u64,
        size: u32,
        rings: [u64; 3],
        status: u32,
    },
    Notify(u32),
}

fn offset() -> impl Strategy<Value = u64> {
    prop_oneof![
        6 => (0u64..0x40).prop_map(|r| r * 4),
        1 => 0u64..MMIO_WINDOW_SIZE + 8,
        1 => any::<u64>(),
    ]
}

fn access() -> impl Strategy<Value = Access> {
    let ring = prop_oneof![
        4 => (0u64..0x80).prop_map(|p| p * 0x1000),
        1 => any::<u64>(),
    ];
    prop_oneof![
        3 => (offset(), prop::sample::select(vec![1usize, 2, 4, 8, 3, 0]))
            .prop_map(|(offset, size)| Access::Read { offset, size }),
        4 => (offset(), prop_oneof![
                4 => any::<u32>().prop_map(|v| v.to_le_bytes().to_vec()),
                1 => prop::collection::vec(any::<u8>(), 0..9),
            ])
            .prop_map(|(offset, bytes)| Access::Write { offset, bytes }),
        2 => (
            prop_oneof![
                Just(1u64 << VIRTIO_F_VERSION_1),
                Just((1u64 << VIRTIO_F_VERSION_1) | (1 << VIRTIO_RING_F_EVENT_IDX)),
                any::<u64>(),
            ],
            prop_oneof![Just(256u32), Just(16), any::<u32>()],
            [ring.clone(), ring.clone(), ring],
            prop_oneof![Just(15u32), 0u32..256],
        )
            .prop_map(|(features, size, rings, status)| Access::SetUp { features, size, rings, status }),
        2 => prop_oneof![Just(0u32), any::<u32>()].prop_map(Access::Notify),
    ]
}

fn w32(t: &mut MmioTransport, off: u64, v: u32) {
    t.write(off, &v.to_le_bytes());
}

fn r32(t: &mut MmioTransport, off: u64) -> u32 {
    let mut b = [0u8; 4];
    t.read(off, &mut b);
    u32::from_le_bytes(b)
}

proptest! {
    #![proptest_config(crate::devices::virtio::ring_fuzz::config(128))]

    #[test]
    fn any_register_access_sequence_is_safe(
        accesses in prop::collection::vec(access(), 1..40),
        fill in any::<u8>(),
    ) {
        let m = mem();
        m.write_slice(&vec![fill; 0x8_0000], GuestAddress(0)).unwrap();
        let mut t = MmioTransport::new(Box::new(Rng::new()), m.clone()).unwrap();
        let offered = t.device().avail_features();
        for a in accesses {
            match a {
                Access::Read { offset, size } => {
                    let mut b = vec![0xa5u8; size];
                    t.read(offset, &mut b);
                }
                Access::Write { offset, bytes } => t.write(offset, &bytes),
                Access::SetUp { features, size, rings, status } => {
                    w32(&mut t, REG_STATUS, 0);
                    w32(&mut t, REG_STATUS, STATUS_ACKNOWLEDGE);
                    w32(&mut t, REG_STATUS, STATUS_ACKNOWLEDGE | STATUS_DRIVER);
                    for (sel, half) in [(0u32, features as u32), (1, (features >> 32) as u32)] {
                        w32(&mut t, REG_DRIVER_FEATURES_SEL, sel);
                        w32(&mut t, REG_DRIVER_FEATURES, half);
                    }
                    w32(&mut t, REG_STATUS, STATUS_ACKNOWLEDGE | STATUS_DRIVER | STATUS_FEATURES_OK);
                    w32(&mut t, REG_QUEUE_SEL, 0);
                    w32(&mut t, REG_QUEUE_NUM, size);
                    for (i, addr) in rings.iter().enumerate() {
                        let low = [REG_QUEUE_DESC_LOW, REG_QUEUE_AVAIL_LOW, REG_QUEUE_USED_LOW][i];
                        w32(&mut t, low, *addr as u32);
                        w32(&mut t, low + 4, (*addr >> 32) as u32);
                    }
                    w32(&mut t, REG_QUEUE_READY, 1);
                    w32(&mut t, REG_STATUS, status);
                }
                Access::Notify(q) => {
                    w32(&mut t, REG_QUEUE_NOTIFY, q);
                    // What the event loop does with the kick.
                    let kicked: Vec<usize> = (0..t.queue_events().len())
                        .filter(|&i| t.queue_events()[i].read().is_ok())
                        .collect();
                    for i in kicked {
                        if t.is_activated() {
                            t.device_mut().process_queue(i);
                        }
                    }
                }
            }
            prop_assert_eq!(r32(&mut t, REG_MAGIC), MMIO_MAGIC_VALUE);
            prop_assert_eq!(r32(&mut t, REG_VERSION), MMIO_VERSION);
            if t.is_activated() {
                let regs = t.registers();
                prop_assert_ne!(regs.status & STATUS_DRIVER_OK, 0);
                prop_assert_ne!(regs.status & STATUS_FEATURES_OK, 0);
                prop_assert_eq!(regs.driver_features & !offered, 0);
                prop_assert_ne!(regs.driver_features & (1 << VIRTIO_F_VERSION_1), 0);
                for q in t.device().queues() {
                    prop_assert!(q.is_valid(&m));
                }
            }
        }
    }
}
