//! Randomized tests of restoring a virtio device from a snapshot's state
//! ([`MmioTransport`]'s `restore`), the part of a restore that takes the
//! most from the file: versions, device types, queue counts, sizes and ring
//! addresses, registers and features, over guest memory whose rings hold
//! anything.
//!
//! Every state ends in a device or a typed [`DeviceRestoreError`]; a
//! restored rng saves back to the state it came from; a restored device of
//! either kind then takes notifications, register accesses and a reset
//! from its guest without a panic. Test code only.

use proptest::prelude::*;
use vm_memory::{Bytes, GuestAddress, GuestMemoryMmap};

use super::*;
use crate::devices::virtio::mmio::{MMIO_WINDOW_SIZE, REG_STATUS};
use crate::devices::virtio::net;
use crate::devices::virtio::rng::persist::RNG_STATE_VERSION;
use crate::devices::virtio::test_utils::{mem, MEM_SIZE};
use crate::devices::virtio::vsock::persist::{
    CarriedCounters, SavedConnection, VSOCK_STATE_VERSION,
};
use crate::devices::virtio::{
    rng, vsock, STATUS_ACKNOWLEDGE, STATUS_DRIVER, VIRTIO_F_VERSION_1, VIRTIO_RING_F_EVENT_IDX,
};

/// Ring addresses of a queue, aligned, inside the 256 KiB the test fills.
fn ring_addr() -> impl Strategy<Value = u64> {
    (0u64..0x3f).prop_map(|i| 0x1000 * i)
}

/// A queue as a driver set it up: the device's maximum, a power-of-two
/// size, aligned rings in memory, any ring positions.
fn queue_state(max_size: u16) -> impl Strategy<Value = QueueState> {
    (
        (0..=max_size.trailing_zeros()).prop_map(|l| 1u16 << l),
        (any::<u16>(), any::<u16>(), any::<bool>()),
        (ring_addr(), ring_addr(), ring_addr()),
    )
        .prop_map(
            move |(size, (next_avail, next_used, event_idx_enabled), (d, a, u))| QueueState {
                max_size,
                next_avail,
                next_used,
                event_idx_enabled,
                size,
                ready: true,
                desc_table: d,
                avail_ring: a,
                used_ring: u,
            },
        )
}

/// What a corrupted (or hostile) snapshot changes in a plausible state.
#[derive(Debug, Clone)]
enum Damage {
    ModelVersion(u32),
    GuestCid(u64),
    TransportVersion(u32),
    DeviceType(u32),
    Status(u32),
    Features(u64),
    /// Drop or add a queue (configured or active).
    QueueCount {
        active: bool,
        grow: bool,
    },
    /// Change one field of one queue.
    Queue {
        active: bool,
        index: prop::sample::Index,
        field: u8,
        value: u64,
    },
    /// Active queues on a device that was never set up, or the reverse.
    ToggleActive,
    Interrupt(u32, u32, bool),
}

fn damage() -> impl Strategy<Value = Damage> {
    let addr = prop_oneof![
        any::<u64>(),
        0u64..0x4_0000,
        (0u64..0x1000).prop_map(|d| MEM_SIZE as u64 - d),
        (0u64..0x100).prop_map(|d| u64::MAX - d),
    ];
    prop_oneof![
        1 => any::<u32>().prop_map(Damage::ModelVersion),
        1 => prop_oneof![0u64..4, any::<u64>(), Just(u64::from(u32::MAX))].prop_map(Damage::GuestCid),
        1 => any::<u32>().prop_map(Damage::TransportVersion),
        1 => prop_oneof![0u32..40, any::<u32>()].prop_map(Damage::DeviceType),
        1 => prop_oneof![0u32..256, any::<u32>()].prop_map(Damage::Status),
        1 => any::<u64>().prop_map(Damage::Features),
        1 => (any::<bool>(), any::<bool>()).prop_map(|(active, grow)| Damage::QueueCount { active, grow }),
        3 => (any::<bool>(), any::<prop::sample::Index>(), 0u8..9, prop_oneof![any::<u64>(), addr])
            .prop_map(|(active, index, field, value)| Damage::Queue { active, index, field, value }),
        1 => Just(Damage::ToggleActive),
        1 => (any::<u32>(), any::<u32>(), any::<bool>()).prop_map(|(a, b, c)| Damage::Interrupt(a, b, c)),
    ]
}

fn damage_queue(q: &mut QueueState, field: u8, v: u64) {
    match field {
        0 => q.max_size = v as u16,
        1 => q.size = v as u16,
        2 => q.ready = v & 1 == 1,
        3 => q.desc_table = v,
        4 => q.avail_ring = v,
        5 => q.used_ring = v,
        6 => q.next_avail = v as u16,
        7 => q.next_used = v as u16,
        _ => q.event_idx_enabled = v & 1 == 1,
    }
}

fn apply(state: &mut VirtioDeviceState, d: &Damage) {
    let t = &mut state.transport;
    match d {
        Damage::ModelVersion(v) => match &mut state.model {
            DeviceModelState::Rng(s) => s.version = *v,
            DeviceModelState::Vsock(s) => s.version = *v,
            DeviceModelState::Net(s) => s.version = *v,
        },
        Damage::GuestCid(c) => {
            if let DeviceModelState::Vsock(s) = &mut state.model {
                s.guest_cid = *c;
            }
        }
        Damage::TransportVersion(v) => t.version = *v,
        Damage::DeviceType(v) => t.device_type = *v,
        Damage::Status(v) => t.regs.status = *v,
        Damage::Features(v) => t.regs.driver_features = *v,
        Damage::QueueCount { active, grow } => {
            let qs = if *active {
                t.active_queues.get_or_insert_with(Vec::new)
            } else {
                &mut t.queues
            };
            if *grow {
                qs.push(QueueState::default());
            } else {
                qs.pop();
            }
        }
        Damage::Queue {
            active,
            index,
            field,
            value,
        } => {
            let qs = if *active {
                t.active_queues.as_mut()
            } else {
                Some(&mut t.queues)
            };
            if let Some(qs) = qs.filter(|qs| !qs.is_empty()) {
                let i = index.index(qs.len());
                damage_queue(&mut qs[i], *field, *value);
            }
        }
        Damage::ToggleActive => {
            t.active_queues = match t.active_queues.take() {
                Some(_) => None,
                None => Some(t.queues.clone()),
            }
        }
        Damage::Interrupt(status, generation, reset) => {
            t.interrupt_status = *status;
            t.config_generation = *generation;
            t.needs_reset = *reset;
        }
    }
}

/// A device state as a snapshot may hold it: a plausible one (a device
/// the driver set up, or one it did not touch), then up to three damages.
/// A vsock state lists a few connections (ports may repeat), carried or
/// not, with any counters, or none.
fn saved_connections() -> impl Strategy<Value = Option<Vec<SavedConnection>>> {
    let counters = (any::<[u32; 5]>()).prop_map(|c| CarriedCounters {
        fwd_cnt: c[0],
        fwd_cnt_told: c[1],
        rx_cnt: c[2],
        peer_buf_alloc: c[3],
        peer_fwd_cnt: c[4],
    });
    let conn = (0u32..4, any::<u32>(), proptest::option::of(counters)).prop_map(
        |(local, peer_port, carried)| SavedConnection {
            local_port: (1 << 30) + local,
            peer_port,
            carried,
        },
    );
    proptest::option::of(proptest::collection::vec(conn, 0..4))
}

fn device_state() -> impl Strategy<Value = VirtioDeviceState> {
    let model = prop_oneof![
        Just(DeviceModelState::Rng(RngState {
            version: RNG_STATE_VERSION
        })),
        (3u64..0x1_0000, saved_connections()).prop_map(|(guest_cid, connections)| {
            DeviceModelState::Vsock(VsockState {
                version: VSOCK_STATE_VERSION,
                guest_cid,
                connections,
            })
        }),
    ];
    let good_status = STATUS_ACKNOWLEDGE | STATUS_DRIVER | STATUS_FEATURES_OK | STATUS_DRIVER_OK;
    let features = prop_oneof![
        Just((1u64 << VIRTIO_F_VERSION_1) | (1 << VIRTIO_RING_F_EVENT_IDX)),
        Just(1u64 << VIRTIO_F_VERSION_1),
    ];
    (model, features, prop::bool::weighted(0.8)).prop_flat_map(move |(model, features, set_up)| {
        let sizes: &'static [u16] = match model {
            DeviceModelState::Rng(_) => &[rng::QUEUE_SIZE],
            DeviceModelState::Vsock(_) => &[
                vsock::RX_QUEUE_SIZE,
                vsock::QUEUE_SIZE,
                vsock::EVENT_QUEUE_SIZE,
            ],
            DeviceModelState::Net(_) => &[net::QUEUE_SIZE, net::QUEUE_SIZE],
        };
        let queues = || -> Vec<_> { sizes.iter().map(|&s| queue_state(s)).collect() };
        let device_type = model.device_type();
        (
            Just(model),
            queues(),
            queues(),
            (any::<u32>(), any::<u32>(), any::<u32>()),
            prop::collection::vec(damage(), 0..=3),
        )
            .prop_map(
                move |(model, configured, active, (sel, cfg_gen, irq), damages)| {
                    let mut state = VirtioDeviceState {
                        model,
                        transport: MmioState {
                            version: MMIO_STATE_VERSION,
                            device_type,
                            regs: MmioRegisters {
                                device_features_sel: sel % 3,
                                driver_features_sel: (sel >> 8) % 3,
                                driver_features: if set_up { features } else { 0 },
                                queue_sel: (sel >> 16) % 4,
                                status: if set_up { good_status } else { 0 },
                                shm_sel: 0,
                            },
                            queues: configured,
                            active_queues: set_up.then_some(active),
                            interrupt_status: irq & 3,
                            config_generation: cfg_gen,
                            needs_reset: false,
                        },
                    };
                    for d in &damages {
                        apply(&mut state, d);
                    }
                    state
                },
            )
    })
}

/// Fills the first 256 KiB of `m` (where the rings are) from `seed`.
fn scribble(m: &GuestMemoryMmap, seed: u64) {
    let mut x = seed | 1;
    let mut bytes = vec![0u8; 0x4_0000];
    for chunk in bytes.chunks_mut(8) {
        // xorshift64
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        chunk.copy_from_slice(&x.to_le_bytes()[..chunk.len()]);
    }
    m.write_slice(&bytes, GuestAddress(0)).unwrap();
}

fn sock_path() -> std::path::PathBuf {
    use std::sync::atomic::{AtomicU32, Ordering};
    static N: AtomicU32 = AtomicU32::new(0);
    let p = std::env::temp_dir().join(format!(
        "zygote-restore-fuzz-{}-{}.sock",
        std::process::id(),
        N.fetch_add(1, Ordering::Relaxed)
    ));
    let _ = std::fs::remove_file(&p);
    p
}

proptest! {
    #![proptest_config(crate::devices::virtio::ring_fuzz::config(128))]

    #[test]
    fn any_device_state_restores_or_is_refused(
        state in device_state(),
        seed in any::<u64>(),
        accesses in prop::collection::vec((0u64..MMIO_WINDOW_SIZE / 4, any::<u32>(), any::<bool>()), 0..12),
    ) {
        let m = mem();
        scribble(&m, seed);
        // The driver had made a few buffers available past where the device
        // stopped (else the rings look corrupted, and nothing is processed).
        for (i, q) in state.transport.active_queues.iter().flatten().enumerate() {
            let ahead = (seed >> (8 * i)) as u16 % (q.size.max(1) + 1);
            let _ = m.write_obj(q.next_avail.wrapping_add(ahead), GuestAddress(q.avail_ring.wrapping_add(2)));
        }
        let args = MmioConstructorArgs {
            mem: m.clone(),
            vsock_reset: false,
            vsock_uds: Some(sock_path()),
            net_tap: None,
        };
        let mut t = match MmioTransport::restore(args, &state) {
            Ok(t) => t,
            Err(
                DeviceRestoreError::Vsock(_)
                | DeviceRestoreError::Rng(_)
                | DeviceRestoreError::Transport { .. },
            ) => return Ok(()),
            Err(e) => return Err(TestCaseError::fail(format!("unexpected error {e}"))),
        };
        // What was restored is what was saved.
        let saved = t.save_transport();
        prop_assert_eq!(saved.regs, state.transport.regs);
        prop_assert_eq!(&saved.queues, &state.transport.queues);
        if let DeviceModelState::Vsock(_) = state.model {
            // A restored vsock posts its transport reset or resets the
            // master's stale connections: a used-buffer interrupt on top
            // of what was saved, and a configuration change if a ring it
            // used was corrupted.
            let extra = if saved.needs_reset { 3 } else { 1 };
            prop_assert_eq!(saved.interrupt_status | extra, (state.transport.interrupt_status & 3) | extra);
        } else {
            prop_assert_eq!(saved.interrupt_status, state.transport.interrupt_status & 3);
        }
        if let DeviceModelState::Rng(_) = state.model {
            // (A restored vsock takes an event buffer: its queues moved.)
            prop_assert_eq!(&saved.active_queues, &state.transport.active_queues);
            prop_assert_eq!(t.save(), VirtioDeviceState {
                transport: MmioState {
                    interrupt_status: state.transport.interrupt_status & 3,
                    ..state.transport.clone()
                },
                ..state.clone()
            });
        }
        // The guest goes on: notifications, register accesses, a reset.
        let n = t.device().queue_max_sizes().len();
        for i in 0..n {
            if t.is_activated() {
                t.device_mut().process_queue(i);
            }
        }
        for (reg, v, write) in accesses {
            let off = reg * 4;
            if write {
                t.write(off, &v.to_le_bytes());
            } else {
                let mut b = [0u8; 4];
                t.read(off, &mut b);
            }
            if t.is_activated() {
                for i in 0..n {
                    t.device_mut().process_queue(i);
                }
            }
        }
        t.write(REG_STATUS, &0u32.to_le_bytes());
        prop_assert!(!t.is_activated());
        prop_assert!(t.device().queues().is_empty());
    }
}
