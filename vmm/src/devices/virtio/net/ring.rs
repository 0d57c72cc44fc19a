//! Used-ring publishing for the receive queue, where one frame may span
//! several chains (`VIRTIO_NET_F_MRG_RXBUF`): the used elements of a frame
//! are written first and the used index moves past all of them in one
//! store, so the driver never sees a frame's first buffer (whose header
//! says `num_buffers = n`) without the n - 1 others. `virtio-queue`'s
//! `add_used` publishes one element at a time; this module replaces it for
//! that queue, with the interrupt decision that goes with it
//! (`VIRTIO_RING_F_EVENT_IDX`).
//!
//! It must not trust the rings: every address is checked arithmetic on the
//! queue's validated ring addresses through `GuestMemory` accessors, and a
//! ring that cannot be written flags the device as needing a reset.

use std::num::Wrapping;
use std::sync::atomic::{fence, Ordering};

use virtio_queue::{Queue, QueueT};
use vm_memory::{Address, Bytes, GuestAddress, GuestMemoryMmap};

use crate::devices::virtio::{warn_limited, Interrupt};

/// Writes `elems` (head index, bytes written) to the used ring and then
/// moves the used index past all of them at once. Returns false if the
/// ring could not be written (the device then needs a reset).
pub(super) fn publish(
    queue: &mut Queue,
    mem: &GuestMemoryMmap,
    elems: &[(u16, u32)],
    irq: &Interrupt,
) -> bool {
    if elems.is_empty() {
        return true;
    }
    let size = queue.size();
    let ring = GuestAddress(queue.used_ring());
    let mut next = Wrapping(queue.next_used());
    for &(head, len) in elems {
        if head >= size {
            // A chain whose head is outside the table never parses, so it
            // is never here; if it were, it could not be returned.
            warn_limited!("net: dropping used element with out-of-range head {head}");
            continue;
        }
        let slot = u64::from(next.0 % size);
        let mut elem = [0u8; 8];
        elem[..4].copy_from_slice(&u32::from(head).to_le_bytes());
        elem[4..].copy_from_slice(&len.to_le_bytes());
        let written = ring
            .checked_add(4 + 8 * slot)
            .is_some_and(|addr| mem.write_slice(&elem, addr).is_ok());
        if !written {
            warn_limited!("net: cannot write the used ring");
            irq.set_needs_reset();
            return false;
        }
        next += Wrapping(1);
    }
    queue.set_next_used(next.0);
    // Release: the elements above are visible before the index that covers
    // them.
    let stored = ring
        .checked_add(2)
        .is_some_and(|addr| mem.store(next.0.to_le(), addr, Ordering::Release).is_ok());
    if !stored {
        warn_limited!("net: cannot write the used ring index");
        irq.set_needs_reset();
    }
    stored
}

/// Raises the used-ring interrupt if the driver asked for one for any of
/// the elements published since the used index was `start`
/// (`used_event`, with `VIRTIO_RING_F_EVENT_IDX`; always without it).
pub(super) fn notify_since(
    queue: &Queue,
    mem: &GuestMemoryMmap,
    irq: &Interrupt,
    start: Wrapping<u16>,
) {
    let new = Wrapping(queue.next_used());
    if new == start {
        return;
    }
    if !queue.event_idx_enabled() {
        irq.signal_used_queue();
        return;
    }
    // The used index store before the read of used_event.
    fence(Ordering::SeqCst);
    let used_event = GuestAddress(queue.avail_ring())
        .checked_add(4 + 2 * u64::from(queue.size()))
        .and_then(|addr| mem.load::<u16>(addr, Ordering::Acquire).ok())
        .map(|v| Wrapping(u16::from_le(v)));
    match used_event {
        // vring_need_event(): used_event lies in [start, new).
        Some(event) if (new - event - Wrapping(1)) >= (new - start) => {}
        Some(_) => irq.signal_used_queue(),
        None => {
            warn_limited!("net: cannot read used_event");
            irq.signal_used_queue();
        }
    }
}

/// Asks the driver to notify the queue when it makes more buffers
/// available, whatever the device consumed so far. Returns true if buffers
/// were added while asking (no notification may follow for them, so the
/// caller must look again).
pub(super) fn ask_for_buffers(queue: &mut Queue, mem: &GuestMemoryMmap, irq: &Interrupt) -> bool {
    let Ok(before) = queue.avail_idx(mem, Ordering::Acquire) else {
        warn_limited!("net: cannot read the available ring index");
        irq.set_needs_reset();
        return false;
    };
    if !crate::devices::virtio::chain::notify_on_next_avail(queue, mem, irq) {
        return false;
    }
    // The avail_event store before the second read of the index.
    fence(Ordering::SeqCst);
    queue
        .avail_idx(mem, Ordering::Acquire)
        .is_ok_and(|after| after != before)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::devices::virtio::test_utils::{mem, DriverQueue};

    #[test]
    fn a_frame_becomes_visible_in_one_step() {
        let m = mem();
        let mut dq = DriverQueue::new(&m, 0x1000, 8);
        let mut q = dq.create_queue();
        let irq = Interrupt::new().unwrap();
        for _ in 0..3 {
            dq.add_chain(&[(0x10_0000, 100, true)]);
        }
        assert!(publish(&mut q, &m, &[(0, 10), (1, 20), (2, 30)], &irq));
        assert_eq!(q.next_used(), 3);
        assert_eq!(dq.pop_used(), Some((0, 10)));
        assert_eq!(dq.pop_used(), Some((1, 20)));
        assert_eq!(dq.pop_used(), Some((2, 30)));
        assert_eq!(dq.pop_used(), None);
        // Wrapping around the ring.
        for i in 0..7u16 {
            dq.add_chain(&[(0x10_0000, 100, true)]);
            assert!(publish(&mut q, &m, &[(i, u32::from(i))], &irq));
            assert_eq!(dq.pop_used(), Some((i, u32::from(i))));
        }
        assert_eq!(q.next_used(), 10);
        // Out-of-range heads are skipped, the rest published.
        assert!(publish(&mut q, &m, &[(8, 1), (3, 4)], &irq));
        assert_eq!(q.next_used(), 11);
        assert!(!irq.needs_reset());
    }

    #[test]
    fn interrupts_follow_used_event() {
        let m = mem();
        let dq = DriverQueue::new(&m, 0x1000, 8);
        let mut q = dq.create_queue();
        let irq = Interrupt::new().unwrap();
        // Without EVENT_IDX: always, when anything was published.
        notify_since(&q, &m, &irq, Wrapping(0));
        assert!(irq.eventfd().read().is_err(), "nothing published");
        publish(&mut q, &m, &[(0, 1)], &irq);
        notify_since(&q, &m, &irq, Wrapping(0));
        assert_eq!(irq.eventfd().read().unwrap(), 1);
        // With it: only when used_event lies in what was published.
        q.set_event_idx(true);
        dq.set_used_event(5);
        publish(&mut q, &m, &[(1, 1), (2, 1)], &irq); // used 1..3
        notify_since(&q, &m, &irq, Wrapping(1));
        assert!(irq.eventfd().read().is_err(), "used_event 5 not reached");
        publish(&mut q, &m, &[(3, 1), (4, 1), (5, 1), (6, 1)], &irq); // 3..7
        notify_since(&q, &m, &irq, Wrapping(3));
        assert_eq!(irq.eventfd().read().unwrap(), 1);
    }

    #[test]
    fn asking_for_buffers_sees_buffers_added_meanwhile() {
        let m = mem();
        let mut dq = DriverQueue::new(&m, 0x1000, 8);
        let mut q = dq.create_queue();
        q.set_event_idx(true);
        let irq = Interrupt::new().unwrap();
        dq.add_chain(&[(0x10_0000, 100, true)]);
        dq.add_chain(&[(0x10_0000, 100, true)]);
        // The device looked at nothing yet: it asks to be told past the
        // buffers already there, not past next_avail.
        assert!(!ask_for_buffers(&mut q, &m, &irq));
        assert_eq!(dq.avail_event(), 2);
        let old = dq.avail_idx();
        dq.add_chain(&[(0x10_0000, 100, true)]);
        assert!(
            dq.needs_kick(true, old),
            "the driver kicks for the next one"
        );
    }
}
