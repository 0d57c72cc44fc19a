//! Makes what the virtio devices refused from the guest visible from
//! outside: [`RejectReporter`] reads each device's
//! [`VirtioDevice::rejected`](super::VirtioDevice::rejected) count on the
//! device event loop and emits [`Event::DeviceRejected`] on the events
//! stream when it grew.
//!
//! It also reports the steps devices record on the way to a restored VM's
//! first answer ([`VirtioDevice::take_phases`](super::VirtioDevice::take_phases))
//! as [`Event::DevicePhase`], unpaced: a device records only a handful.
//!
//! It owns the pacing: at most one event per device per [`REPORT_INTERVAL`]
//! (a growth inside the interval is reported when it ends, through a
//! timerfd on the event loop), and a last one at exit ([`RejectReporter::finish`])
//! for a count that changed since, so that a hostile guest cannot flood the
//! stream and no refusal goes unreported. A refusal made on a vCPU thread
//! (a write to a read-only configuration space) does not wake the loop: it
//! is reported at the loop's next turn, or at exit. The reporter keeps no
//! timer running while nothing is due, so an idle VM costs no wakeups. It
//! must not count anything itself (the devices do), nor hold a transport's
//! lock longer than one read of its count.

use std::io;
use std::os::unix::io::AsRawFd;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use event_manager::{EventOps, EventSet, Events, MutEventSubscriber};
use proto::events::{now_us, Event, EventSink};
use vmm_sys_util::timerfd::TimerFd;

use super::{warn_limited, MmioTransport, TYPE_RNG, TYPE_VSOCK};

/// Shortest time between two events about the same device.
pub const REPORT_INTERVAL: Duration = Duration::from_secs(1);

/// Virtio device type id of the network device.
const TYPE_NET: u32 = 1;
/// Virtio device type id of the block device.
const TYPE_BLK: u32 = 2;

/// One device as the reporter follows it.
struct Watched {
    name: String,
    transport: Arc<Mutex<MmioTransport>>,
    /// The count last reported.
    reported: u64,
    /// When it was reported.
    reported_at: Option<Instant>,
}

/// Reports the devices' rejected counts on the events stream (see the
/// module docs). Add it to the event loop (it watches a timerfd for
/// deferred reports), call [`RejectReporter::check`] after each turn of
/// the loop and [`RejectReporter::finish`] once the loop ended.
pub struct RejectReporter {
    devices: Vec<Watched>,
    events: Arc<EventSink>,
    timer: TimerFd,
    /// Whether `timer` runs (a deferred report is due when it fires).
    timer_armed: bool,
    /// Device steps taken from a device, to report (reused).
    phases: Vec<(proto::events::DevicePhase, u64)>,
}

/// The name a device goes by in events: its kind (`net`, `blk`, `rng`,
/// `vsock`, else `virtio-<type>`), with its position among devices of the
/// same kind appended from the second one on (`net`, `net1`...).
pub(crate) fn device_names(types: &[u32]) -> Vec<String> {
    types
        .iter()
        .enumerate()
        .map(|(i, &t)| {
            let kind = match t {
                TYPE_NET => "net".to_string(),
                TYPE_BLK => "blk".to_string(),
                TYPE_RNG => "rng".to_string(),
                TYPE_VSOCK => "vsock".to_string(),
                other => format!("virtio-{other}"),
            };
            match types[..i].iter().filter(|&&u| u == t).count() {
                0 => kind,
                n => format!("{kind}{n}"),
            }
        })
        .collect()
}

/// Locks a transport, also after a thread panicked holding it (the count
/// is still worth reading).
fn lock(t: &Mutex<MmioTransport>) -> std::sync::MutexGuard<'_, MmioTransport> {
    t.lock().unwrap_or_else(|e| e.into_inner())
}

impl RejectReporter {
    /// Follows `transports`, reporting to `events`. Fails only if the
    /// timerfd cannot be created.
    pub fn new(
        transports: Vec<Arc<Mutex<MmioTransport>>>,
        events: Arc<EventSink>,
    ) -> io::Result<Self> {
        let types: Vec<u32> = transports
            .iter()
            .map(|t| lock(t).device().device_type())
            .collect();
        let devices = device_names(&types)
            .into_iter()
            .zip(transports)
            .map(|(name, transport)| Watched {
                name,
                transport,
                reported: 0,
                reported_at: None,
            })
            .collect();
        Ok(RejectReporter {
            devices,
            events,
            timer: TimerFd::new().map_err(|e| io::Error::from_raw_os_error(e.errno()))?,
            timer_armed: false,
            phases: Vec::new(),
        })
    }

    /// Reports every device whose count grew and that was not reported
    /// within the interval; schedules the others for when it ends.
    pub fn check(&mut self) {
        self.check_at(Instant::now());
    }

    fn check_at(&mut self, now: Instant) {
        let mut next_due: Option<Instant> = None;
        for d in &mut self.devices {
            let rejected = report_phases(&self.events, &mut self.phases, d);
            if rejected.count == d.reported {
                continue;
            }
            let due = d.reported_at.map(|at| at + REPORT_INTERVAL);
            match due {
                Some(due) if due > now => {
                    next_due = Some(next_due.map_or(due, |n| n.min(due)));
                }
                _ => {
                    emit(&self.events, &d.name, rejected.count, rejected.last);
                    d.reported = rejected.count;
                    d.reported_at = Some(now);
                }
            }
        }
        if let (Some(due), false) = (next_due, self.timer_armed) {
            // At least 1 ms: a zero duration disarms a timerfd.
            let wait = due
                .saturating_duration_since(now)
                .max(Duration::from_millis(1));
            match self.timer.reset(wait, None) {
                Ok(()) => self.timer_armed = true,
                Err(e) => warn_limited!("cannot arm the rejection report timer: {e}"),
            }
        }
    }

    /// Reports every device whose count changed since its last report,
    /// whatever the interval: the last word before the VMM exits.
    pub fn finish(&mut self) {
        for d in &mut self.devices {
            let rejected = report_phases(&self.events, &mut self.phases, d);
            if rejected.count != d.reported {
                emit(&self.events, &d.name, rejected.count, rejected.last);
                d.reported = rejected.count;
                d.reported_at = Some(Instant::now());
            }
        }
    }
}

/// Reports the steps device `d` recorded since the last turn and returns
/// its rejected count (one lock of its transport for both).
fn report_phases(
    events: &EventSink,
    phases: &mut Vec<(proto::events::DevicePhase, u64)>,
    d: &Watched,
) -> super::Rejected {
    let rejected = {
        let mut t = lock(&d.transport);
        t.device_mut().take_phases(phases);
        t.device().rejected()
    };
    for (phase, t_us) in phases.drain(..) {
        events.emit(&Event::DevicePhase {
            t_us,
            device: d.name.clone(),
            phase,
        });
    }
    rejected
}

fn emit(events: &EventSink, device: &str, count: u64, last: Option<String>) {
    events.emit(&Event::DeviceRejected {
        t_us: now_us(),
        device: device.to_string(),
        count,
        last: last.unwrap_or_default(),
    });
}

impl MutEventSubscriber for RejectReporter {
    fn init(&mut self, ops: &mut EventOps) {
        if let Err(e) = ops.add(Events::new_raw(self.timer.as_raw_fd(), EventSet::IN)) {
            eprintln!("zygote-vmm: virtio: cannot watch the rejection report timer: {e}");
        }
    }

    fn process(&mut self, _events: Events, _ops: &mut EventOps) {
        // Readable: it expired, so this read does not block (the timer is
        // only re-armed after it).
        let _ = self.timer.wait();
        self.timer_armed = false;
        self.check();
    }
}

#[cfg(test)]
mod tests {
    use std::io::Write;

    use event_manager::{EventManager, SubscriberOps};
    use virtio_queue::QueueT;

    use super::*;
    use crate::devices::virtio::mmio::{REG_QUEUE_NOTIFY, REG_STATUS};
    use crate::devices::virtio::test_utils::{desc, mem, negotiate, setup_queue, w, DriverQueue};
    use crate::devices::virtio::{
        Rng, STATUS_ACKNOWLEDGE, STATUS_DRIVER, STATUS_DRIVER_OK, STATUS_FEATURES_OK,
        VIRTIO_F_VERSION_1,
    };

    /// An events stream whose lines a test reads back.
    #[derive(Clone, Default)]
    struct Lines(Arc<Mutex<Vec<u8>>>);

    impl Write for Lines {
        fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
            self.0.lock().unwrap().extend_from_slice(buf);
            Ok(buf.len())
        }
        fn flush(&mut self) -> io::Result<()> {
            Ok(())
        }
    }

    impl Lines {
        /// The `(device, count, last)` of every event so far.
        fn rejections(&self) -> Vec<(String, u64, String)> {
            let text = self.0.lock().unwrap().clone();
            String::from_utf8(text)
                .unwrap()
                .lines()
                .map(|l| match serde_json::from_str(l).unwrap() {
                    Event::DeviceRejected {
                        device,
                        count,
                        last,
                        ..
                    } => (device, count, last),
                    other => panic!("unexpected event {other:?}"),
                })
                .collect()
        }
    }

    /// An rng device the driver set up, as the VMM wires it.
    fn rng_transport(m: &vm_memory::GuestMemoryMmap, dq: &DriverQueue) -> MmioTransport {
        let mut t = MmioTransport::new(Box::new(Rng::new()), m.clone()).unwrap();
        negotiate(&mut t, 1 << VIRTIO_F_VERSION_1);
        setup_queue(&mut t, 0, dq);
        let ok = STATUS_ACKNOWLEDGE | STATUS_DRIVER | STATUS_FEATURES_OK | STATUS_DRIVER_OK;
        w(&mut t, REG_STATUS, ok);
        assert!(t.is_activated());
        t
    }

    #[test]
    fn names_say_the_kind_and_tell_twins_apart() {
        assert_eq!(
            device_names(&[TYPE_VSOCK, TYPE_RNG, TYPE_NET, TYPE_NET, 42, TYPE_BLK]),
            ["vsock", "rng", "net", "net1", "virtio-42", "blk"]
        );
    }

    /// A guest that hands the rng device-readable buffers: through the
    /// event loop as the VMM runs it, the refusals reach the events stream,
    /// one event per interval, and the last count at exit.
    #[test]
    fn a_devices_refusals_reach_the_events_stream_paced() {
        let m = mem();
        let mut dq = DriverQueue::new(&m, 0x1000, 16);
        let transport = Arc::new(Mutex::new(rng_transport(&m, &dq)));
        let lines = Lines::default();
        let sink = Arc::new(EventSink::new(Box::new(lines.clone())));
        let reporter = Arc::new(Mutex::new(
            RejectReporter::new(vec![transport.clone()], sink).unwrap(),
        ));
        let mut em: EventManager<Arc<Mutex<dyn MutEventSubscriber + Send>>> =
            EventManager::new().unwrap();
        em.add_subscriber(transport.clone());
        em.add_subscriber(reporter.clone());
        // Activation kicked the queue: nothing to do yet, nothing reported.
        em.run_with_timeout(0).unwrap();
        reporter.lock().unwrap().check();
        assert_eq!(lines.rejections(), vec![]);

        // What the guest does wrong: a device-readable buffer, where the
        // rng writes.
        let bad = |dq: &mut DriverQueue, t: &Arc<Mutex<MmioTransport>>, n: u16| {
            for i in 0..n {
                dq.add_raw(&[(i, desc(0x10_0000, 64, 0, 0))], i);
            }
            w(&mut t.lock().unwrap(), REG_QUEUE_NOTIFY, 0);
        };
        let turn = |em: &mut EventManager<_>, ms: i32| {
            em.run_with_timeout(ms).unwrap();
            reporter.lock().unwrap().check();
        };
        let started = Instant::now();
        bad(&mut dq, &transport, 1);
        turn(&mut em, 1000);
        let first = lines.rejections();
        assert_eq!(first.len(), 1, "{first:?}");
        assert_eq!(first[0].0, "rng");
        assert_eq!(first[0].1, 1);
        assert_eq!(
            first[0].2,
            "malformed request: unexpected device-readable descriptor"
        );
        while dq.pop_used().is_some() {}

        // Three more inside the interval: no event yet...
        bad(&mut dq, &transport, 3);
        turn(&mut em, 1000);
        assert_eq!(lines.rejections().len(), 1);
        assert_eq!(transport.lock().unwrap().device().rejected().count, 4);
        // ...then one, with the count so far, when the interval ends (the
        // reporter's timer wakes the loop).
        while lines.rejections().len() < 2 {
            assert!(started.elapsed() < Duration::from_secs(5), "no report");
            turn(&mut em, 1000);
        }
        assert!(started.elapsed() >= REPORT_INTERVAL);
        assert_eq!(lines.rejections()[1].1, 4);

        // One more, then the VMM ends inside the interval: the last count
        // is reported anyway, once.
        while dq.pop_used().is_some() {}
        bad(&mut dq, &transport, 1);
        turn(&mut em, 1000);
        assert_eq!(lines.rejections().len(), 2);
        reporter.lock().unwrap().finish();
        reporter.lock().unwrap().finish();
        let all = lines.rejections();
        assert_eq!(all.len(), 3, "{all:?}");
        assert_eq!(all[2].1, 5);
        // The device served nothing and said so to the guest.
        assert!(!transport.lock().unwrap().interrupt().needs_reset());
        assert!(transport.lock().unwrap().device().queues()[0].ready());
    }

    #[test]
    fn a_well_behaved_guest_is_never_reported() {
        let m = mem();
        let mut dq = DriverQueue::new(&m, 0x1000, 16);
        let transport = Arc::new(Mutex::new(rng_transport(&m, &dq)));
        let lines = Lines::default();
        let sink = Arc::new(EventSink::new(Box::new(lines.clone())));
        let mut reporter = RejectReporter::new(vec![transport.clone()], sink).unwrap();
        dq.add_chain(&[(0x10_0000, 64, true)]);
        transport.lock().unwrap().device_mut().process_queue(0);
        assert_eq!(dq.pop_used(), Some((0, 64)));
        reporter.check();
        reporter.finish();
        assert_eq!(lines.rejections(), vec![]);
    }
}
