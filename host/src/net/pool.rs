//! Network slots and their pool. A slot is what one VM's network needs
//! before it has an address, made ahead of time because it is slow to
//! make (a network namespace, a tap, a veth pair: a few milliseconds):
//!
//! ```text
//!  VM namespace (one per slot, nothing bind-mounted)          host namespace
//!  ┌──────────────────────────────────────────────────┐
//!  │ tap0  10.123.0.1/32  proxy_arp       veth0 ──────┼──── PREFIXxxxxxxxxxxxx (random name)
//!  │  (fd kept: the VMM's NIC)            proxy_arp   │     rp_filter=1, route_localnet, no IPv6
//!  │ ip_forward=1, no IPv6                            │
//!  │ default via 169.254.1.1 dev veth0 onlink         │     per VM (attach): GUEST/32 dev PREFIX…
//!  │ 169.254.1.1 lladdr <host end's MAC> permanent    │
//!  │ per VM (attach): GUEST/32 dev tap0               │
//!  └──────────────────────────────────────────────────┘
//! ```
//!
//! The namespace is made by `unshare(CLONE_NEWNET)` in a thread of its
//! own, which keeps `/proc/thread-self/ns/net` open, opens the tap and a
//! route-netlink socket in it, and ends. Nothing is bind-mounted: the
//! namespace lives while a file descriptor, socket or process holds it
//! and the kernel removes it, with its tap, veth pair and routes, when the
//! last one goes (after a SIGKILL too). Every namespace looks the same
//! from inside (tap `tap0` with the gateway address), so a master's
//! device configuration is valid in every clone.
//!
//! Why these details: the guest's gateway is `tap0`'s own address, and
//! `tap0` answers ARP for every other address (proxy ARP, no delay), so
//! the guest reaches everything through the namespace whatever its prefix
//! length; the namespace reaches the host through a fixed link-local next
//! hop whose neighbour entry is static (no ARP, and no proxy ARP on the
//! host side, which would answer for the host's other networks); the
//! host reaches the guest through `veth0`'s proxy ARP. The host ends have
//! strict reverse-path filtering (a VM cannot send with another address)
//! and `route_localnet` (published ports answer on `localhost`).
//!
//! The pool keeps a few slots ready and a thread refills it in the
//! background; [`Pool::take`] makes one at once when it is empty.
//!
//! It must not know about addresses, tenants or the firewall (that is
//! `attach`), or enter a namespace from a thread it does not own.

use std::collections::VecDeque;
use std::fs::File;
use std::io::Write as _;
use std::net::Ipv4Addr;
use std::os::fd::{AsFd as _, AsRawFd as _, OwnedFd};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Condvar, Mutex};
use std::time::{Duration, Instant};

use super::netlink::{NlError, RtSocket};
use super::NetError;

/// The name of the VM's tap in its namespace.
pub const TAP_NAME: &str = "tap0";
/// The namespace's end of the veth pair.
const VETH_NAME: &str = "veth0";
/// The namespace's next hop towards the host (answered by a static
/// neighbour entry).
const HOST_HOP: Ipv4Addr = Ipv4Addr::new(169, 254, 1, 1);
/// MAC of the host ends of the veth pairs (each is its own link).
const HOST_END_MAC: [u8; 6] = [0x02, 0x7a, 0x67, 0x00, 0x00, 0x01];
/// MAC of the namespace ends.
const NS_END_MAC: [u8; 6] = [0x02, 0x7a, 0x67, 0x00, 0x00, 0x02];
/// `TUNSETIFF` (`_IOW('T', 202, int)`).
const TUNSETIFF: libc::c_ulong = 0x4004_54ca;
/// Attempts at a free random host interface name.
const NAME_ATTEMPTS: usize = 8;
/// How long the refill thread waits after a failure.
const RETRY_AFTER: Duration = Duration::from_secs(1);
/// How long the refill thread lets attaches run first: making a slot
/// holds the kernel's RTNL lock at times, which an attach's routes need.
const MAX_DEFER: Duration = Duration::from_millis(20);

/// One VM's network before it has an address: a namespace with its tap,
/// and the host end of its veth pair. Hand `netns` and `tap` to the VMM
/// (its jail enters `netns`; its virtio-net device uses `tap`, opened
/// with `IFF_TAP | IFF_NO_PI | IFF_VNET_HDR`), then
/// [`Network::attach`](super::Network::attach) it, then drop it: the
/// namespace then lives exactly as long as the VMM holds it.
#[derive(Debug)]
pub struct NetSlot {
    /// The network namespace (`/proc/thread-self/ns/net` of its maker).
    pub netns: OwnedFd,
    /// The tap's file (`tap0` in `netns`, not persistent: the tap goes with
    /// its last descriptor).
    pub tap: OwnedFd,
    /// The host end of the veth pair.
    pub host_if: String,
    pub(crate) host_index: u32,
    pub(crate) tap_index: u32,
    /// A route-netlink socket in the namespace, for `attach`.
    pub(crate) rt: RtSocket,
    /// The VM it was attached to.
    pub(crate) attached: Option<String>,
    /// Tests only: the namespace of the emulated guest at the far end of
    /// `tap0` (a veth pair there instead of a tap).
    #[cfg(test)]
    pub(crate) guest_ns: Option<OwnedFd>,
}

/// How slots are made.
#[derive(Debug, Clone)]
pub(crate) struct SlotSpec {
    /// The gateway address every guest is given (`tap0`'s).
    pub gateway: Ipv4Addr,
    /// Prefix of the host interface names.
    pub if_prefix: String,
    /// The host's network namespace.
    pub host_ns: Arc<OwnedFd>,
    /// Tests only: a veth pair to an emulated guest's namespace instead of
    /// a tap.
    #[cfg(test)]
    pub guest_end: bool,
}

fn nl(what: impl Into<String>) -> impl FnOnce(NlError) -> NetError {
    let what = what.into();
    move |source| NetError::Netlink { what, source }
}

/// Writes `value` to `/proc/sys/<key>` (in the calling thread's network
/// namespace, which is how /proc/sys/net resolves).
pub(crate) fn sysctl(key: &str, value: &str) -> Result<(), NetError> {
    let path = format!("/proc/sys/{key}");
    std::fs::OpenOptions::new()
        .write(true)
        .open(&path)
        .and_then(|mut f| f.write_all(value.as_bytes()))
        .map_err(|source| NetError::Sysctl {
            key: key.to_string(),
            value: value.to_string(),
            source,
        })
}

/// Opens the calling thread's network namespace.
pub(crate) fn thread_netns() -> Result<OwnedFd, NetError> {
    File::open("/proc/thread-self/ns/net")
        .map(OwnedFd::from)
        .map_err(|source| NetError::Namespace { source })
}

/// Moves the calling thread into a new network namespace.
fn unshare_net() -> Result<(), NetError> {
    // SAFETY: unshare(2) with CLONE_NEWNET changes only the calling
    // thread's network namespace; no memory is passed.
    if unsafe { libc::unshare(libc::CLONE_NEWNET) } != 0 {
        return Err(NetError::Unshare {
            source: std::io::Error::last_os_error(),
        });
    }
    Ok(())
}

/// Moves the calling thread into network namespace `ns`.
#[cfg(test)]
pub(crate) fn enter_netns(ns: std::os::fd::BorrowedFd<'_>) -> Result<(), NetError> {
    // SAFETY: setns(2) on a namespace fd the caller keeps open for the
    // call; it changes only the calling thread's network namespace.
    if unsafe { libc::setns(ns.as_raw_fd(), libc::CLONE_NEWNET) } != 0 {
        return Err(NetError::Unshare {
            source: std::io::Error::last_os_error(),
        });
    }
    Ok(())
}

/// Opens `/dev/net/tun` as tap `name` (`IFF_TAP | IFF_NO_PI |
/// IFF_VNET_HDR`) in the calling thread's namespace.
fn open_tap(name: &str) -> Result<OwnedFd, NetError> {
    let tun = std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .open("/dev/net/tun")
        .map_err(|source| NetError::Tun { source })?;
    #[repr(C)]
    struct IfReq {
        name: [u8; libc::IFNAMSIZ],
        flags: libc::c_short,
        _pad: [u8; 22],
    }
    let mut req = IfReq {
        name: [0; libc::IFNAMSIZ],
        flags: (libc::IFF_TAP | libc::IFF_NO_PI | libc::IFF_VNET_HDR) as libc::c_short,
        _pad: [0; 22],
    };
    req.name[..name.len()].copy_from_slice(name.as_bytes());
    // SAFETY: TUNSETIFF reads a `struct ifreq` (name, then the flags in
    // its union, 40 bytes in all, which `IfReq` is) from the pointer,
    // which is valid for the call; `tun` is an open /dev/net/tun.
    let rc = unsafe { libc::ioctl(tun.as_raw_fd(), TUNSETIFF, &mut req as *mut IfReq) };
    if rc != 0 {
        return Err(NetError::Tun {
            source: std::io::Error::last_os_error(),
        });
    }
    Ok(tun.into())
}

/// A random host interface name: the prefix and 48 random bits in hex, so
/// a name is never reused while the kernel still tears down an old one.
fn random_name(prefix: &str) -> String {
    let mut b = [0u8; 6];
    // SAFETY: getrandom(2) writes at most `b.len()` bytes into `b`.
    let n = unsafe { libc::getrandom(b.as_mut_ptr().cast(), b.len(), 0) };
    if n != b.len() as isize {
        // No entropy yet (early boot): the clock, the pid and a counter.
        static COUNTER: AtomicU64 = AtomicU64::new(0);
        let nanos = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map_or(0, |d| d.as_nanos() as u64);
        let x = nanos
            ^ (u64::from(std::process::id()) << 24)
            ^ COUNTER.fetch_add(1, Ordering::Relaxed) << 40;
        b.copy_from_slice(&x.to_le_bytes()[..6]);
    }
    let hex: String = b.iter().map(|x| format!("{x:02x}")).collect();
    format!("{prefix}{hex}")
}

/// What the namespace's thread hands back.
struct NsSide {
    netns: OwnedFd,
    tap: OwnedFd,
    rt: RtSocket,
    host_if: String,
    tap_index: u32,
    #[cfg(test)]
    guest_ns: Option<OwnedFd>,
}

/// The namespace's side of a slot, made in the calling thread, which
/// moves into the new namespace (so it must be a thread of its own).
fn make_ns_side(spec: &SlotSpec) -> Result<NsSide, NetError> {
    unshare_net()?;
    let netns = thread_netns()?;
    // Before any device exists, so that every device inherits them.
    sysctl("net/ipv6/conf/all/disable_ipv6", "1")?;
    sysctl("net/ipv6/conf/default/disable_ipv6", "1")?;
    sysctl("net/ipv4/ip_forward", "1")?;
    sysctl("net/ipv4/conf/all/send_redirects", "0")?;
    sysctl("net/ipv4/conf/default/send_redirects", "0")?;
    let mut rt = RtSocket::open().map_err(|e| NetError::Netlink {
        what: "open a route-netlink socket in the VM's namespace".into(),
        source: e.into(),
    })?;
    let lo = rt.link_index("lo").map_err(nl("find lo"))?.unwrap_or(1);
    rt.set_up(lo).map_err(nl("bring lo up"))?;

    #[cfg(test)]
    let guest_ns = if spec.guest_end {
        // An emulated guest: its own namespace, at the far end of a veth
        // pair named like the tap.
        unshare_net()?;
        let g = thread_netns()?;
        enter_netns(netns.as_fd())?;
        rt.add_veth(TAP_NAME, None, "eth0", None, g.as_fd())
            .map_err(nl("create the emulated guest's veth pair"))?;
        Some(g)
    } else {
        None
    };
    #[cfg(test)]
    let tap = if spec.guest_end {
        File::open("/dev/null")
            .map(OwnedFd::from)
            .map_err(|source| NetError::Tun { source })?
    } else {
        open_tap(TAP_NAME)?
    };
    #[cfg(not(test))]
    let tap = open_tap(TAP_NAME)?;

    let mut host_if = String::new();
    for attempt in 0.. {
        host_if = random_name(&spec.if_prefix);
        match rt.add_veth(
            VETH_NAME,
            Some(NS_END_MAC),
            &host_if,
            Some(HOST_END_MAC),
            spec.host_ns.as_fd(),
        ) {
            Ok(()) => break,
            Err(e) if e.is(libc::EEXIST) && attempt + 1 < NAME_ATTEMPTS => continue,
            Err(e) => return Err(nl(format!("create veth pair {VETH_NAME}/{host_if}"))(e)),
        }
    }
    let tap_index = rt
        .link_index(TAP_NAME)
        .map_err(nl("find tap0"))?
        .ok_or_else(|| {
            nl("find tap0")(NlError {
                errno: libc::ENODEV,
                detail: None,
            })
        })?;
    let veth_index = rt
        .link_index(VETH_NAME)
        .map_err(nl("find veth0"))?
        .ok_or_else(|| {
            nl("find veth0")(NlError {
                errno: libc::ENODEV,
                detail: None,
            })
        })?;
    for dev in [TAP_NAME, VETH_NAME] {
        sysctl(&format!("net/ipv4/conf/{dev}/proxy_arp"), "1")?;
        sysctl(&format!("net/ipv4/neigh/{dev}/proxy_delay"), "0")?;
    }
    sysctl(&format!("net/ipv4/conf/{TAP_NAME}/rp_filter"), "1")?;
    rt.add_address(tap_index, spec.gateway, 32)
        .map_err(nl("give tap0 the gateway address"))?;
    rt.set_up(tap_index).map_err(nl("bring tap0 up"))?;
    rt.set_up(veth_index).map_err(nl("bring veth0 up"))?;
    rt.add_neighbour(veth_index, HOST_HOP, HOST_END_MAC)
        .map_err(nl("add the host hop's neighbour entry"))?;
    rt.add_default_route(HOST_HOP, veth_index)
        .map_err(nl("add the VM namespace's default route"))?;
    Ok(NsSide {
        netns,
        tap,
        rt,
        host_if,
        tap_index,
        #[cfg(test)]
        guest_ns,
    })
}

/// Makes one slot: the namespace's side in a thread of its own, then the
/// host end here (the calling thread must be in the host's namespace, as
/// `host_rt` is).
pub(crate) fn build_slot(spec: &SlotSpec, host_rt: &mut RtSocket) -> Result<NetSlot, NetError> {
    let s = spec.clone();
    let ns = std::thread::Builder::new()
        .name("zygote-netns".into())
        .spawn(move || make_ns_side(&s))
        .map_err(|source| NetError::Thread { source })?
        .join()
        .unwrap_or_else(|_| {
            Err(NetError::Thread {
                source: std::io::Error::other("the namespace thread panicked"),
            })
        })?;
    let h = &ns.host_if;
    let host_index = host_rt
        .link_index(h)
        .map_err(nl(format!("find {h}")))?
        .ok_or_else(|| {
            nl(format!("find {h}"))(NlError {
                errno: libc::ENODEV,
                detail: None,
            })
        })?;
    sysctl(&format!("net/ipv6/conf/{h}/disable_ipv6"), "1")?;
    sysctl(&format!("net/ipv4/conf/{h}/forwarding"), "1")?;
    sysctl(&format!("net/ipv4/conf/{h}/rp_filter"), "1")?;
    sysctl(&format!("net/ipv4/conf/{h}/route_localnet"), "1")?;
    sysctl(&format!("net/ipv4/conf/{h}/send_redirects"), "0")?;
    host_rt
        .set_up(host_index)
        .map_err(nl(format!("bring {h} up")))?;
    Ok(NetSlot {
        netns: ns.netns,
        tap: ns.tap,
        host_if: ns.host_if,
        host_index,
        tap_index: ns.tap_index,
        rt: ns.rt,
        attached: None,
        #[cfg(test)]
        guest_ns: ns.guest_ns,
    })
}

/// Counters of the pool.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct PoolStats {
    /// Slots the pool keeps ready.
    pub size: usize,
    /// Slots ready now.
    pub available: usize,
    /// Slots made (in the background or on demand).
    pub created: u64,
    /// Slots taken.
    pub taken: u64,
    /// Slots taken from an empty pool (made on demand).
    pub made_on_demand: u64,
    /// Slots that could not be made.
    pub failed: u64,
    /// Time spent making slots, microseconds.
    pub create_us_total: u64,
}

#[derive(Debug, Default)]
struct Counters {
    created: AtomicU64,
    taken: AtomicU64,
    on_demand: AtomicU64,
    failed: AtomicU64,
    create_us: AtomicU64,
}

#[derive(Debug, Default)]
struct PoolState {
    ready: VecDeque<NetSlot>,
    stop: bool,
    /// Attaches in progress.
    attaching: usize,
    /// Recent slot build times, µs (for measurements).
    recent_us: VecDeque<u64>,
}

/// Ready slots and what refills them.
#[derive(Debug)]
pub(crate) struct Pool {
    spec: SlotSpec,
    size: usize,
    state: Mutex<PoolState>,
    cv: Condvar,
    counters: Counters,
}

impl Pool {
    /// A pool of `size` slots; [`Pool::refill_loop`] fills it.
    pub fn new(spec: SlotSpec, size: usize) -> Arc<Pool> {
        Arc::new(Pool {
            spec,
            size,
            state: Mutex::new(PoolState::default()),
            cv: Condvar::new(),
            counters: Counters::default(),
        })
    }

    fn state(&self) -> std::sync::MutexGuard<'_, PoolState> {
        self.state.lock().unwrap_or_else(|p| p.into_inner())
    }

    fn build(&self, rt: &mut RtSocket) -> Result<NetSlot, NetError> {
        let t = Instant::now();
        let r = build_slot(&self.spec, rt);
        let us = t.elapsed().as_micros() as u64;
        match &r {
            Ok(_) => {
                self.counters.created.fetch_add(1, Ordering::Relaxed);
                self.counters.create_us.fetch_add(us, Ordering::Relaxed);
                let mut st = self.state();
                if st.recent_us.len() >= 1024 {
                    st.recent_us.pop_front();
                }
                st.recent_us.push_back(us);
            }
            Err(e) => {
                self.counters.failed.fetch_add(1, Ordering::Relaxed);
                tracing::warn!(error = %e, "cannot make a network slot");
            }
        }
        r
    }

    /// The refill thread's body: keeps `size` slots ready until
    /// [`Pool::stop`]. Runs in the host's network namespace.
    pub fn refill_loop(&self) {
        let mut rt = match RtSocket::open() {
            Ok(rt) => rt,
            Err(e) => {
                tracing::error!(error = %e, "the network pool cannot refill: no netlink socket");
                return;
            }
        };
        loop {
            {
                let mut st = self.state();
                let mut deferred = Duration::ZERO;
                loop {
                    if st.stop {
                        return;
                    }
                    if st.ready.len() >= self.size {
                        st = self.cv.wait(st).unwrap_or_else(|p| p.into_inner());
                        deferred = Duration::ZERO;
                    } else if st.attaching > 0 && deferred < MAX_DEFER {
                        let t = Instant::now();
                        st = self
                            .cv
                            .wait_timeout(st, MAX_DEFER - deferred)
                            .unwrap_or_else(|p| p.into_inner())
                            .0;
                        deferred += t.elapsed();
                    } else {
                        break;
                    }
                }
            }
            match self.build(&mut rt) {
                Ok(slot) => {
                    let mut st = self.state();
                    if st.stop {
                        return;
                    }
                    st.ready.push_back(slot);
                    self.cv.notify_all();
                }
                Err(_) => {
                    let st = self.state();
                    let _ = self.cv.wait_timeout_while(st, RETRY_AFTER, |s| !s.stop);
                }
            }
        }
    }

    /// Asks the refill thread to end, and drops the ready slots.
    pub fn stop(&self) {
        let mut st = self.state();
        st.stop = true;
        st.ready.clear();
        self.cv.notify_all();
    }

    /// A ready slot, or one made now if none is.
    pub fn take(&self) -> Result<NetSlot, NetError> {
        let ready = {
            let mut st = self.state();
            let s = st.ready.pop_front();
            self.cv.notify_all();
            s
        };
        let slot = match ready {
            Some(s) => s,
            None => {
                let mut rt = RtSocket::open().map_err(|e| NetError::Netlink {
                    what: "open a route-netlink socket".into(),
                    source: e.into(),
                })?;
                let s = self.build(&mut rt)?;
                self.counters.on_demand.fetch_add(1, Ordering::Relaxed);
                s
            }
        };
        self.counters.taken.fetch_add(1, Ordering::Relaxed);
        Ok(slot)
    }

    /// Marks an attach in progress until the guard is dropped (the refill
    /// thread waits for it, up to [`MAX_DEFER`]).
    pub fn attaching(&self) -> AttachGuard<'_> {
        self.state().attaching += 1;
        AttachGuard(self)
    }

    /// Waits until `n` slots are ready or `timeout` passes; whether they are.
    pub fn wait_ready(&self, n: usize, timeout: Duration) -> bool {
        let st = self.state();
        let (st, _) = self
            .cv
            .wait_timeout_while(st, timeout, |s| s.ready.len() < n && !s.stop)
            .unwrap_or_else(|p| p.into_inner());
        st.ready.len() >= n
    }

    /// The counters.
    pub fn stats(&self) -> PoolStats {
        let c = &self.counters;
        PoolStats {
            size: self.size,
            available: self.state().ready.len(),
            created: c.created.load(Ordering::Relaxed),
            taken: c.taken.load(Ordering::Relaxed),
            made_on_demand: c.on_demand.load(Ordering::Relaxed),
            failed: c.failed.load(Ordering::Relaxed),
            create_us_total: c.create_us.load(Ordering::Relaxed),
        }
    }

    /// How its slots are made.
    #[cfg(test)]
    pub fn spec(&self) -> &SlotSpec {
        &self.spec
    }

    /// Recent slot build times, µs.
    pub fn recent_build_us(&self) -> Vec<u64> {
        self.state().recent_us.iter().copied().collect()
    }
}

/// An attach in progress (see [`Pool::attaching`]).
pub(crate) struct AttachGuard<'a>(&'a Pool);

impl Drop for AttachGuard<'_> {
    fn drop(&mut self) {
        let mut st = self.0.state();
        st.attaching -= 1;
        self.0.cv.notify_all();
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn host_interface_names_fit_and_differ() {
        let a = random_name("zv");
        let b = random_name("zv");
        assert_eq!(a.len(), 14);
        assert!(a.len() < libc::IFNAMSIZ);
        assert!(a.starts_with("zv") && a[2..].bytes().all(|c| c.is_ascii_hexdigit()));
        assert_ne!(a, b);
    }
}
