//! Randomized tests of virtio-rng's queue handling: a guest that writes
//! anything into its descriptor table, indirect tables and available ring.
//!
//! With predictable addresses, every chain must be accounted for exactly:
//! served (a used entry with its length, at most
//! [`MAX_BYTES_PER_REQUEST`]), or refused (a used entry of length 0 when its
//! head is in range) and counted in [`Rng::rejected`]; an available index
//! more than a queue ahead flags the device for a reset, counted once. In
//! chaos (buffers on the rings themselves), the device must not panic, must
//! return, and must never use more chains than the driver made available.
//! Test code only.

use proptest::prelude::{any, prop, prop_assert, prop_assert_eq, proptest, TestCaseError};
use virtio_queue::QueueT;
use vm_memory::{Bytes, GuestAddress};

use super::{Interrupt, Rng, VirtioDevice, MAX_BYTES_PER_REQUEST, QUEUE_SIZE};
use crate::devices::virtio::ring_fuzz::{
    config, queue_script, walk, Area, Mode, QueueScript, RingDriver, Verdict,
};
use crate::devices::virtio::test_utils::mem;

fn area() -> Area {
    Area {
        rings: 0x1000,
        indirect: 0x8_0000..0x8_0400,
        data: 0x10_0000..0x20_0000,
        hot: Vec::new(),
    }
}

proptest! {
    #![proptest_config(config(128))]

    #[test]
    fn every_chain_is_served_or_counted(
        script in queue_script(area(), QUEUE_SIZE, true, Mode::Predictable, 1..5),
    ) {
        check_accounting(&script)?;
    }

    #[test]
    fn chaos_neither_panics_nor_hangs(
        script in queue_script(area(), QUEUE_SIZE, true, Mode::Chaos, 1..5),
        garbage in prop::collection::vec((0x1000u64..0x4000, any::<u64>()), 0..5),
    ) {
        let m = mem();
        let mut drv = RingDriver::new(&m, &area(), &script);
        let irq = Interrupt::new().unwrap();
        let mut rng = Rng::new();
        rng.activate(m.clone(), vec![drv.queue(script.event_idx)], irq.clone()).unwrap();
        let mut last = 0;
        for (i, round) in script.rounds.iter().enumerate() {
            drv.play(round);
            // The guest also scribbles over its rings.
            if let Some(&(at, v)) = garbage.get(i) {
                m.write_obj(v, GuestAddress(at)).unwrap();
            }
            let before = (rng.queues()[0].next_avail(), rng.queues()[0].next_used());
            rng.process_queue(0);
            let q = &rng.queues()[0];
            let popped = q.next_avail().wrapping_sub(before.0);
            let used = q.next_used().wrapping_sub(before.1);
            prop_assert!(popped <= script.size, "popped {} of a queue of {}", popped, script.size);
            prop_assert!(used <= popped);
            let count = rng.rejected().count;
            prop_assert!(count >= last);
            last = count;
        }
    }
}

/// Plays `script` against a fresh device and checks each round against the
/// model ([`walk`]).
fn check_accounting(script: &QueueScript) -> Result<(), TestCaseError> {
    let m = mem();
    let mut drv = RingDriver::new(&m, &area(), script);
    let irq = Interrupt::new().unwrap();
    let mut rng = Rng::new();
    rng.activate(m.clone(), vec![drv.queue(script.event_idx)], irq.clone())
        .unwrap();
    let size = script.size;
    let mut next_avail = 0u16;
    let mut rejected = 0u64;
    for round in &script.rounds {
        drv.play(round);
        let ahead = drv.avail_idx().wrapping_sub(next_avail);
        if ahead > size {
            rng.process_queue(0);
            prop_assert!(irq.needs_reset());
            prop_assert_eq!(drv.take_used(), vec![]);
            prop_assert_eq!(rng.rejected().count, rejected + 1);
            let last = rng.rejected().last.unwrap_or_default();
            prop_assert!(last.starts_with("request queue unusable: the available ring index"));
            return Ok(());
        }
        let mut expected = Vec::new();
        for i in 0..ahead {
            let head = drv.head_at(next_avail.wrapping_add(i));
            match walk(&m, drv.desc_table(), size, head, true) {
                v @ Verdict::Valid(_) => {
                    let n = v.len().unwrap().min(MAX_BYTES_PER_REQUEST);
                    expected.push((u32::from(head), n as u32));
                }
                Verdict::Invalid => {
                    rejected += 1;
                    if head < size {
                        expected.push((u32::from(head), 0));
                    }
                }
            }
        }
        next_avail = next_avail.wrapping_add(ahead);
        rng.process_queue(0);
        prop_assert_eq!(drv.take_used(), expected);
        prop_assert_eq!(rng.rejected().count, rejected);
        prop_assert!(!irq.needs_reset());
        prop_assert_eq!(rng.queues()[0].next_avail(), next_avail);
    }
    Ok(())
}
