//! A VM's network identity, applied in-process: MAC, IPv4 address and
//! default route set on the virtio-net interface with a few `ioctl`s and
//! one netlink request. No `ip` process is spawned: a fork+exec costs
//! ~1.6 s of emulated guest kernel on some hosts, these cost milliseconds.
//!
//! The interface stays up (a clone's was brought up by its master):
//! taking it down and up again costs the guest kernel a device close and
//! open. The MAC is changed live (virtio-net allows it; a driver that
//! cannot, `EBUSY`, is taken down for it). The address is added with its
//! prefix in one netlink request ([`crate::netlink`]): the master removed
//! its own before it was frozen ([`prepare_freeze`]), and with it its
//! routes and neighbour (ARP) entries, so a clone inherits none of them
//! and only adds its own. Setting it with the `SIOCSIFADDR` and
//! `SIOCSIFNETMASK` ioctls deleted and re-inserted it twice: ~90 of the
//! ~115 ms a clone's network identity took on a host that emulates guest
//! kernel code. An interface that still has an address loses it first.
//!
//! [`loopback_up`] brings `lo` up at boot, so that programs reach their own
//! servers on `127.0.0.1` (and clones inherit it).
//!
//! It must not: touch any other interface, or leave the interface half set
//! without saying so (each step's failure names the step).

use std::io;
use std::net::Ipv4Addr;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};

use proto::NetIdentity;

use crate::sys::cvt;

/// Checks a network identity before anything is changed.
pub fn validate(n: &NetIdentity) -> Result<(), String> {
    if n.interface.is_empty()
        || n.interface.len() >= libc::IFNAMSIZ
        || !n
            .interface
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'_' || b == b'.')
    {
        return Err(format!("invalid interface name {:?}", n.interface));
    }
    if !n.mac.is_unicast() || n.mac.0 == [0; 6] {
        return Err(format!("{} is not a unicast MAC address", n.mac));
    }
    if !(1..=32).contains(&n.prefix_len) {
        return Err(format!("prefix length {} is not 1-32", n.prefix_len));
    }
    let usable = |a: Ipv4Addr| !(a.is_unspecified() || a.is_broadcast() || a.is_multicast());
    if !usable(n.address) || !usable(n.gateway) {
        return Err(format!(
            "address {} or gateway {} is not a unicast address",
            n.address, n.gateway
        ));
    }
    if n.address == n.gateway {
        return Err(format!("address and gateway are both {}", n.address));
    }
    let mask = netmask(n.prefix_len);
    if u32::from(n.address) & mask != u32::from(n.gateway) & mask {
        return Err(format!(
            "gateway {} is not on the link {}/{}",
            n.gateway, n.address, n.prefix_len
        ));
    }
    Ok(())
}

/// The netmask of a prefix length (1-32).
fn netmask(prefix_len: u8) -> u32 {
    u32::MAX << (32 - u32::from(prefix_len.clamp(1, 32)))
}

/// The identity last applied (what a master's freeze takes back).
static APPLIED: std::sync::Mutex<Option<NetIdentity>> = std::sync::Mutex::new(None);

/// Applies a validated network identity. PID 1 (or `CAP_NET_ADMIN`) only.
/// Returns how long the MAC, the address and the route took (µs).
pub fn apply(n: &NetIdentity) -> Result<[u32; 3], String> {
    let step = |what: &str, r: io::Result<()>| r.map_err(|e| format!("{what}: {e}"));
    let t = std::time::Instant::now();
    let sock = socket()?;
    let s = Sock(sock, &n.interface);

    let flags = s
        .flags()
        .map_err(|e| format!("find {}: {e}", n.interface))?;
    let index = s
        .index()
        .map_err(|e| format!("find the index of {}: {e}", n.interface))?;
    match s.set_mac(&n.mac.0) {
        Ok(()) => {}
        Err(e) if e.raw_os_error() == Some(libc::EBUSY) && flags & IFF_UP != 0 => {
            step("take the interface down", s.set_flags(flags & !IFF_UP))?;
            step("set the MAC address", s.set_mac(&n.mac.0))?;
            step("bring the interface up", s.set_flags(flags))?;
        }
        Err(e) => return Err(format!("set the MAC address: {e}")),
    }
    let mac_us = crate::sys::us_since(t);
    let t = std::time::Instant::now();
    // A master's freeze removed its address; an interface that still has
    // one (an identity applied twice, a master frozen by an older host)
    // loses it first, and with it the routes and neighbours it had.
    let current = s.addr().map_err(|e| format!("read the address: {e}"))?;
    if current != Some((n.address, n.prefix_len)) {
        if let Some((a, len)) = current {
            let removed = crate::netlink::del_addr(index, a, len);
            step("remove the old address", removed)?;
        }
        let added = crate::netlink::add_addr(index, n.address, n.prefix_len);
        step("set the address", added)?;
    }
    if flags & IFF_UP == 0 {
        step("bring the interface up", s.set_flags(flags | IFF_UP))?;
    }
    let addr_us = crate::sys::us_since(t);
    let t = std::time::Instant::now();
    step("add the default route", s.add_default_route(n.gateway))?;
    let route_us = crate::sys::us_since(t);
    *APPLIED.lock().unwrap_or_else(|p| p.into_inner()) = Some(n.clone());
    Ok([mac_us, addr_us, route_us])
}

/// What a master drops right before it is frozen, so that no clone
/// inherits it: every TCP connection that leaves the guest is aborted (its
/// program gets `ECONNABORTED`, in the master's clones too, and its peer a
/// reset, instead of a connection that hangs until it times out), then the
/// address its identity set is removed (with it its routes and
/// neighbours), so that a clone's identity only adds its own. Returns how
/// many connections were aborted.
pub fn prepare_freeze() -> Result<u32, String> {
    let aborted = crate::netlink::abort_tcp(|c| !c.local.is_loopback()).map_err(|e| {
        format!("abort the TCP connections (the guest kernel needs CONFIG_INET_DIAG_DESTROY): {e}")
    })?;
    let applied = APPLIED.lock().unwrap_or_else(|p| p.into_inner()).take();
    if let Some(n) = applied {
        let sock = socket()?;
        let s = Sock(sock, &n.interface);
        let index = s
            .index()
            .map_err(|e| format!("find {}: {e}", n.interface))?;
        if let Some((a, len)) = s.addr().map_err(|e| format!("read the address: {e}"))? {
            crate::netlink::del_addr(index, a, len)
                .map_err(|e| format!("remove the address {a}: {e}"))?;
        }
    }
    Ok(aborted)
}

/// Brings the loopback interface up (at boot; a no-op when it is up).
pub fn loopback_up() -> Result<(), String> {
    // A socket of its own: it acts in the caller's network namespace (a
    // test's private one), which the shared one may not be.
    let sock = new_socket()?;
    let s = Sock(&sock, "lo");
    let flags = s.flags().map_err(|e| format!("find lo: {e}"))?;
    if flags & IFF_UP == 0 {
        s.set_flags(flags | IFF_UP)
            .map_err(|e| format!("bring lo up: {e}"))?;
    }
    Ok(())
}

/// The datagram socket for interface ioctls, open since the first use (the
/// master's identity): a clone's identity does not pay for a new one. It
/// acts in the network namespace it was made in: the guest has one.
fn socket() -> Result<&'static OwnedFd, String> {
    static SOCKET: std::sync::OnceLock<OwnedFd> = std::sync::OnceLock::new();
    if let Some(s) = SOCKET.get() {
        return Ok(s);
    }
    let s = new_socket()?;
    Ok(SOCKET.get_or_init(|| s))
}

/// A new datagram socket for interface ioctls.
fn new_socket() -> Result<OwnedFd, String> {
    // SAFETY: socket() with constant arguments; the result is checked.
    let fd = cvt(unsafe { libc::socket(libc::AF_INET, libc::SOCK_DGRAM | libc::SOCK_CLOEXEC, 0) })
        .map_err(|e| format!("open a socket for interface ioctls: {e}"))?;
    // SAFETY: `fd` was just returned by socket() and is owned by nobody else.
    Ok(unsafe { OwnedFd::from_raw_fd(fd) })
}

const IFF_UP: libc::c_short = libc::IFF_UP as libc::c_short;

/// An interface named `.1`, through the socket `.0`.
struct Sock<'a>(&'a OwnedFd, &'a str);

impl Sock<'_> {
    fn ifreq(&self) -> libc::ifreq {
        // SAFETY: ifreq is plain data; all zeroes is a valid value.
        let mut r: libc::ifreq = unsafe { std::mem::zeroed() };
        for (d, s) in r.ifr_name.iter_mut().zip(self.1.bytes()) {
            *d = s as libc::c_char;
        }
        r
    }

    fn ioctl(&self, request: libc::c_ulong, r: &mut libc::ifreq) -> io::Result<()> {
        // SAFETY: every request used here takes a `struct ifreq`, which `r` is,
        // with a NUL-terminated name (validate() bounds it below IFNAMSIZ).
        cvt(unsafe { libc::ioctl(self.0.as_raw_fd(), request, r as *mut libc::ifreq) })?;
        Ok(())
    }

    fn flags(&self) -> io::Result<libc::c_short> {
        let mut r = self.ifreq();
        self.ioctl(libc::SIOCGIFFLAGS, &mut r)?;
        // SAFETY: SIOCGIFFLAGS filled the flags member of the union.
        Ok(unsafe { r.ifr_ifru.ifru_flags })
    }

    fn index(&self) -> io::Result<u32> {
        let mut r = self.ifreq();
        self.ioctl(libc::SIOCGIFINDEX, &mut r)?;
        // SAFETY: SIOCGIFINDEX filled the index member of the union.
        Ok(unsafe { r.ifr_ifru.ifru_ifindex } as u32)
    }

    /// Its IPv4 address and prefix length, if it has one.
    fn addr(&self) -> io::Result<Option<(Ipv4Addr, u8)>> {
        let get = |request| -> io::Result<Option<Ipv4Addr>> {
            let mut r = self.ifreq();
            match self.ioctl(request, &mut r) {
                Ok(()) => {}
                Err(e) if e.raw_os_error() == Some(libc::EADDRNOTAVAIL) => return Ok(None),
                Err(e) => return Err(e),
            }
            // SAFETY: the request filled the address member with a
            // sockaddr_in (AF_INET socket).
            let sin: libc::sockaddr_in = unsafe { std::mem::transmute(r.ifr_ifru.ifru_addr) };
            Ok(Some(Ipv4Addr::from(u32::from_be(sin.sin_addr.s_addr))))
        };
        let Some(addr) = get(libc::SIOCGIFADDR)? else {
            return Ok(None);
        };
        let mask = get(libc::SIOCGIFNETMASK)?.map_or(32, |m| u32::from(m).count_ones() as u8);
        Ok(Some((addr, mask)))
    }

    fn set_flags(&self, flags: libc::c_short) -> io::Result<()> {
        let mut r = self.ifreq();
        r.ifr_ifru.ifru_flags = flags;
        self.ioctl(libc::SIOCSIFFLAGS, &mut r)
    }

    fn set_mac(&self, mac: &[u8; 6]) -> io::Result<()> {
        let mut r = self.ifreq();
        // SAFETY: sockaddr is plain data; all zeroes is a valid value.
        let mut a: libc::sockaddr = unsafe { std::mem::zeroed() };
        a.sa_family = libc::ARPHRD_ETHER;
        for (d, s) in a.sa_data.iter_mut().zip(mac) {
            *d = *s as libc::c_char;
        }
        r.ifr_ifru.ifru_hwaddr = a;
        self.ioctl(libc::SIOCSIFHWADDR, &mut r)
    }

    fn add_default_route(&self, gateway: Ipv4Addr) -> io::Result<()> {
        // SAFETY: rtentry is plain data; all zeroes is a valid value.
        let mut rt: libc::rtentry = unsafe { std::mem::zeroed() };
        rt.rt_dst = sockaddr_in(Ipv4Addr::UNSPECIFIED);
        rt.rt_genmask = sockaddr_in(Ipv4Addr::UNSPECIFIED);
        rt.rt_gateway = sockaddr_in(gateway);
        rt.rt_flags = libc::RTF_UP | libc::RTF_GATEWAY;
        let mut name = [0 as libc::c_char; libc::IFNAMSIZ];
        for (d, s) in name.iter_mut().zip(self.1.bytes()) {
            *d = s as libc::c_char;
        }
        rt.rt_dev = name.as_mut_ptr();
        // SAFETY: SIOCADDRT takes a `struct rtentry`; `rt_dev` points at a
        // NUL-terminated name that outlives the call.
        let r = unsafe { libc::ioctl(self.0.as_raw_fd(), libc::SIOCADDRT, &mut rt) };
        match cvt(r) {
            Ok(_) => Ok(()),
            // A default route that is already there (the same identity twice) is fine.
            Err(e) if e.raw_os_error() == Some(libc::EEXIST) => Ok(()),
            Err(e) => Err(e),
        }
    }
}

fn sockaddr_in(addr: Ipv4Addr) -> libc::sockaddr {
    let sin = libc::sockaddr_in {
        sin_family: libc::AF_INET as libc::sa_family_t,
        sin_port: 0,
        sin_addr: libc::in_addr {
            s_addr: u32::from(addr).to_be(),
        },
        sin_zero: [0; 8],
    };
    // SAFETY: sockaddr_in and sockaddr have the same size (16 bytes) and
    // the kernel reads a sockaddr_in from a sockaddr whose family is AF_INET.
    unsafe { std::mem::transmute::<libc::sockaddr_in, libc::sockaddr>(sin) }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proto::launch::MacAddr;

    fn ok() -> NetIdentity {
        NetIdentity {
            interface: "eth0".into(),
            mac: MacAddr([2, 0, 0, 0, 0, 7]),
            address: Ipv4Addr::new(10, 123, 1, 7),
            prefix_len: 16,
            gateway: Ipv4Addr::new(10, 123, 0, 1),
        }
    }

    #[test]
    fn a_sane_identity_passes() {
        assert_eq!(validate(&ok()), Ok(()));
    }

    #[test]
    fn bad_network_identities_are_refused_before_anything_changes() {
        let bad = |f: &dyn Fn(&mut NetIdentity)| {
            let mut n = ok();
            f(&mut n);
            validate(&n).unwrap_err()
        };
        assert!(bad(&|n| n.interface = "".into()).contains("interface"));
        assert!(bad(&|n| n.interface = "a-very-long-name0".into()).contains("interface"));
        assert!(bad(&|n| n.interface = "eth0/..".into()).contains("interface"));
        assert!(bad(&|n| n.mac = MacAddr([1, 0, 0, 0, 0, 1])).contains("unicast"));
        assert!(bad(&|n| n.mac = MacAddr([0; 6])).contains("unicast"));
        assert!(bad(&|n| n.prefix_len = 0).contains("prefix"));
        assert!(bad(&|n| n.prefix_len = 33).contains("prefix"));
        assert!(bad(&|n| n.address = Ipv4Addr::BROADCAST).contains("unicast"));
        assert!(bad(&|n| n.gateway = n.address).contains("both"));
        assert!(bad(&|n| n.gateway = Ipv4Addr::new(192, 168, 0, 1)).contains("not on the link"));
    }

    #[test]
    fn netmasks() {
        assert_eq!(Ipv4Addr::from(netmask(16)), Ipv4Addr::new(255, 255, 0, 0));
        assert_eq!(Ipv4Addr::from(netmask(32)), Ipv4Addr::BROADCAST);
        assert_eq!(Ipv4Addr::from(netmask(1)), Ipv4Addr::new(128, 0, 0, 0));
    }
}
