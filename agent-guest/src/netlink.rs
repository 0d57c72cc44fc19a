//! The few netlink requests the agent makes, encoded by hand (one message
//! each, acknowledged): an IPv4 address added to or removed from an
//! interface with its prefix in one step (`NETLINK_ROUTE`), and the TCP
//! connections that leave the guest aborted before a master is frozen
//! (`NETLINK_SOCK_DIAG`, `SOCK_DESTROY`: the guest kernel needs
//! `CONFIG_INET_DIAG_DESTROY`).
//!
//! Why not the `SIOCSIFADDR`/`SIOCSIFNETMASK` ioctls: each of them deletes
//! and re-inserts the address (the mask ioctl too), and every such step
//! costs the emulated guest kernel tens of milliseconds; `RTM_NEWADDR`
//! inserts it once, with its prefix.
//!
//! It must not: block without bound (every socket has a receive timeout),
//! or act on anything but what the caller names.

use std::io;
use std::net::Ipv4Addr;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};
use std::time::Duration;

use crate::sys::cvt;

const NLMSG_HDRLEN: usize = 16;
const NLM_F_REQUEST: u16 = 0x1;
const NLM_F_ACK: u16 = 0x4;
const NLM_F_EXCL: u16 = 0x200;
const NLM_F_CREATE: u16 = 0x400;
const NLM_F_DUMP: u16 = 0x300;
const NLMSG_ERROR: u16 = 2;
const NLMSG_DONE: u16 = 3;
const RTM_NEWADDR: u16 = 20;
const RTM_DELADDR: u16 = 21;
const IFA_ADDRESS: u16 = 1;
const IFA_LOCAL: u16 = 2;
const SOCK_DIAG_BY_FAMILY: u16 = 20;
const SOCK_DESTROY: u16 = 21;
/// `struct inet_diag_req_v2`: family, protocol, ext, pad, states, sockid.
const INET_DIAG_REQ_LEN: usize = 56;
/// `struct inet_diag_msg`: family, state, timer, retrans, sockid, then
/// expires, rqueue, wqueue, uid, inode.
const INET_DIAG_MSG_LEN: usize = 72;
/// `struct inet_diag_sockid`: sport, dport, src[4], dst[4], if, cookie[2].
const SOCKID_LEN: usize = 48;

/// TCP states whose connections are aborted: every one with a peer
/// (not LISTEN, not TIME_WAIT, which the kernel cannot destroy).
const TCP_STATES_WITH_PEER: u32 = (1 << 1) // ESTABLISHED
    | (1 << 2) // SYN_SENT
    | (1 << 3) // SYN_RECV
    | (1 << 4) // FIN_WAIT1
    | (1 << 5) // FIN_WAIT2
    | (1 << 8) // CLOSE_WAIT
    | (1 << 9) // LAST_ACK
    | (1 << 11); // CLOSING

/// An encoded netlink message: header, fixed part, attributes.
fn message(kind: u16, flags: u16, seq: u32, body: &[u8], attrs: &[(u16, &[u8])]) -> Vec<u8> {
    let mut m = vec![0u8; NLMSG_HDRLEN];
    m.extend_from_slice(body);
    for (t, payload) in attrs {
        let len = 4 + payload.len();
        m.extend_from_slice(&(len as u16).to_ne_bytes());
        m.extend_from_slice(&t.to_ne_bytes());
        m.extend_from_slice(payload);
        m.resize(m.len().next_multiple_of(4), 0);
    }
    let total = m.len() as u32;
    m[0..4].copy_from_slice(&total.to_ne_bytes());
    m[4..6].copy_from_slice(&kind.to_ne_bytes());
    m[6..8].copy_from_slice(&(flags | NLM_F_REQUEST).to_ne_bytes());
    m[8..12].copy_from_slice(&seq.to_ne_bytes());
    m
}

/// `RTM_NEWADDR`/`RTM_DELADDR` for `addr/prefix_len` on interface `index`.
fn addr_message(kind: u16, index: u32, addr: Ipv4Addr, prefix_len: u8) -> Vec<u8> {
    let mut body = [0u8; 8];
    body[0] = libc::AF_INET as u8;
    body[1] = prefix_len;
    body[4..8].copy_from_slice(&index.to_ne_bytes());
    let a = addr.octets();
    let flags = match kind {
        RTM_NEWADDR => NLM_F_ACK | NLM_F_CREATE | NLM_F_EXCL,
        _ => NLM_F_ACK,
    };
    message(kind, flags, 1, &body, &[(IFA_LOCAL, &a), (IFA_ADDRESS, &a)])
}

/// The dump request for every TCP socket with a peer.
fn tcp_dump_request() -> Vec<u8> {
    let mut req = [0u8; INET_DIAG_REQ_LEN];
    req[0] = libc::AF_INET as u8;
    req[1] = libc::IPPROTO_TCP as u8;
    req[4..8].copy_from_slice(&TCP_STATES_WITH_PEER.to_ne_bytes());
    message(SOCK_DIAG_BY_FAMILY, NLM_F_DUMP, 1, &req, &[])
}

/// The `SOCK_DESTROY` request for one socket (its sockid as dumped).
fn destroy_request(sockid: &[u8; SOCKID_LEN], seq: u32) -> Vec<u8> {
    let mut req = [0u8; INET_DIAG_REQ_LEN];
    req[0] = libc::AF_INET as u8;
    req[1] = libc::IPPROTO_TCP as u8;
    req[4..8].copy_from_slice(&TCP_STATES_WITH_PEER.to_ne_bytes());
    req[8..].copy_from_slice(sockid);
    message(SOCK_DESTROY, NLM_F_ACK, seq, &req, &[])
}

/// One TCP connection of a dump.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TcpConn {
    pub local: Ipv4Addr,
    pub remote: Ipv4Addr,
    sockid: [u8; SOCKID_LEN],
}

/// The netlink messages of one received buffer: (type, payload).
fn messages(buf: &[u8]) -> impl Iterator<Item = (u16, &[u8])> {
    let mut rest = buf;
    std::iter::from_fn(move || {
        if rest.len() < NLMSG_HDRLEN {
            return None;
        }
        let len = u32::from_ne_bytes(rest[0..4].try_into().ok()?) as usize;
        if len < NLMSG_HDRLEN || len > rest.len() {
            return None;
        }
        let kind = u16::from_ne_bytes(rest[4..6].try_into().ok()?);
        let payload = &rest[NLMSG_HDRLEN..len];
        rest = &rest[len.next_multiple_of(4).min(rest.len())..];
        Some((kind, payload))
    })
}

/// The error of an `NLMSG_ERROR` payload (`None`: an acknowledgement).
fn ack_error(payload: &[u8]) -> Option<io::Error> {
    let code = i32::from_ne_bytes(payload.get(0..4)?.try_into().ok()?);
    (code != 0).then(|| io::Error::from_raw_os_error(-code))
}

/// The connection a `SOCK_DIAG_BY_FAMILY` answer describes.
fn tcp_conn(payload: &[u8]) -> Option<TcpConn> {
    if payload.len() < INET_DIAG_MSG_LEN || payload[0] != libc::AF_INET as u8 {
        return None;
    }
    let sockid: [u8; SOCKID_LEN] = payload[4..4 + SOCKID_LEN].try_into().ok()?;
    let v4 = |at: usize| Ipv4Addr::new(sockid[at], sockid[at + 1], sockid[at + 2], sockid[at + 3]);
    Some(TcpConn {
        local: v4(4),
        remote: v4(20),
        sockid,
    })
}

/// The result of a call that returns a size, or -1 and errno.
fn cvt_size(r: isize) -> io::Result<usize> {
    usize::try_from(r).map_err(|_| io::Error::last_os_error())
}

/// A netlink socket of `protocol` with a receive timeout.
struct Socket(OwnedFd);

impl Socket {
    fn open(protocol: libc::c_int) -> io::Result<Socket> {
        // SAFETY: socket() with constant arguments; the result is checked.
        let fd = cvt(unsafe {
            libc::socket(
                libc::AF_NETLINK,
                libc::SOCK_RAW | libc::SOCK_CLOEXEC,
                protocol,
            )
        })?;
        // SAFETY: `fd` was just returned by socket() and is owned by nobody else.
        let s = Socket(unsafe { OwnedFd::from_raw_fd(fd) });
        let tv = libc::timeval {
            tv_sec: Duration::from_secs(5).as_secs() as libc::time_t,
            tv_usec: 0,
        };
        // SAFETY: SO_RCVTIMEO takes a timeval, whose size is given.
        cvt(unsafe {
            libc::setsockopt(
                s.0.as_raw_fd(),
                libc::SOL_SOCKET,
                libc::SO_RCVTIMEO,
                (&tv as *const libc::timeval).cast(),
                std::mem::size_of::<libc::timeval>() as libc::socklen_t,
            )
        })?;
        Ok(s)
    }

    fn send(&self, msg: &[u8]) -> io::Result<()> {
        // SAFETY: an all-zero sockaddr_nl is the kernel's address.
        let mut to: libc::sockaddr_nl = unsafe { std::mem::zeroed() };
        to.nl_family = libc::AF_NETLINK as libc::sa_family_t;
        // SAFETY: `msg` and `to` are valid for the lengths given.
        let n = cvt_size(unsafe {
            libc::sendto(
                self.0.as_raw_fd(),
                msg.as_ptr().cast(),
                msg.len(),
                0,
                (&to as *const libc::sockaddr_nl).cast(),
                std::mem::size_of::<libc::sockaddr_nl>() as libc::socklen_t,
            )
        })?;
        if n != msg.len() {
            return Err(io::Error::other("short netlink send"));
        }
        Ok(())
    }

    fn recv<'b>(&self, buf: &'b mut [u8]) -> io::Result<&'b [u8]> {
        // SAFETY: `buf` is valid for writes of its length.
        let n = cvt_size(unsafe {
            libc::recv(self.0.as_raw_fd(), buf.as_mut_ptr().cast(), buf.len(), 0)
        })?;
        Ok(&buf[..n])
    }

    /// Sends a request with `NLM_F_ACK` and waits for its answer.
    fn call(&self, msg: &[u8]) -> io::Result<()> {
        self.send(msg)?;
        let mut buf = vec![0u8; 8192];
        loop {
            let got = self.recv(&mut buf)?;
            if got.is_empty() {
                return Err(io::Error::other("netlink socket closed"));
            }
            for (kind, payload) in messages(got) {
                if kind == NLMSG_ERROR {
                    return ack_error(payload).map_or(Ok(()), Err);
                }
            }
        }
    }
}

/// The route socket, open since the first address change (the master's):
/// a clone's identity does not pay for a new socket. It acts in the
/// network namespace it was made in (the guest has one; the one test that
/// changes addresses makes its own namespace first). Dropped after any
/// error, so that a late answer to a failed request cannot be taken for
/// the next one's.
static ROUTE: std::sync::Mutex<Option<Socket>> = std::sync::Mutex::new(None);

/// Sends `msg` on the route socket and waits for its answer.
fn route_call(msg: &[u8]) -> io::Result<()> {
    let mut route = ROUTE.lock().unwrap_or_else(|p| p.into_inner());
    let s = match route.take() {
        Some(s) => s,
        None => Socket::open(libc::NETLINK_ROUTE)?,
    };
    s.call(msg)?;
    *route = Some(s);
    Ok(())
}

/// Adds `addr/prefix_len` to interface `index` (with its subnet route).
pub fn add_addr(index: u32, addr: Ipv4Addr, prefix_len: u8) -> io::Result<()> {
    route_call(&addr_message(RTM_NEWADDR, index, addr, prefix_len))
}

/// Removes `addr` from interface `index`; with it the kernel drops the
/// routes through it and, when it was the last, the interface's
/// neighbour entries.
pub fn del_addr(index: u32, addr: Ipv4Addr, prefix_len: u8) -> io::Result<()> {
    route_call(&addr_message(RTM_DELADDR, index, addr, prefix_len))
}

/// Every IPv4 TCP socket that has a peer.
pub fn tcp_connections() -> io::Result<Vec<TcpConn>> {
    let s = Socket::open(libc::NETLINK_SOCK_DIAG)?;
    s.send(&tcp_dump_request())?;
    let mut conns = Vec::new();
    let mut buf = vec![0u8; 32 * 1024];
    loop {
        let got = s.recv(&mut buf)?;
        if got.is_empty() {
            return Ok(conns);
        }
        for (kind, payload) in messages(got) {
            match kind {
                NLMSG_DONE => return Ok(conns),
                NLMSG_ERROR => {
                    return Err(ack_error(payload).unwrap_or(io::Error::other("dump failed")))
                }
                SOCK_DIAG_BY_FAMILY => conns.extend(tcp_conn(payload)),
                _ => {}
            }
        }
    }
}

/// Aborts the TCP connections `pick` chooses: their programs get
/// `ECONNABORTED`, their peers a reset. Returns how many were aborted (one
/// that ended meanwhile is not counted).
pub fn abort_tcp(pick: impl Fn(&TcpConn) -> bool) -> io::Result<u32> {
    let s = Socket::open(libc::NETLINK_SOCK_DIAG)?;
    let mut aborted = 0;
    for (i, c) in tcp_connections()?.iter().filter(|c| pick(c)).enumerate() {
        match s.call(&destroy_request(&c.sockid, i as u32 + 2)) {
            Ok(()) => aborted += 1,
            Err(e) if e.raw_os_error() == Some(libc::ENOENT) => {}
            Err(e) => return Err(e),
        }
    }
    Ok(aborted)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn an_address_message_is_laid_out_as_the_kernel_reads_it() {
        let m = addr_message(RTM_NEWADDR, 7, Ipv4Addr::new(10, 123, 1, 2), 16);
        assert_eq!(m.len(), 16 + 8 + 8 + 8);
        assert_eq!(
            u32::from_ne_bytes(m[0..4].try_into().unwrap()) as usize,
            m.len()
        );
        assert_eq!(u16::from_ne_bytes(m[4..6].try_into().unwrap()), RTM_NEWADDR);
        let flags = u16::from_ne_bytes(m[6..8].try_into().unwrap());
        assert_eq!(flags, NLM_F_REQUEST | NLM_F_ACK | NLM_F_CREATE | NLM_F_EXCL);
        assert_eq!((m[16], m[17]), (libc::AF_INET as u8, 16));
        assert_eq!(u32::from_ne_bytes(m[20..24].try_into().unwrap()), 7);
        // IFA_LOCAL then IFA_ADDRESS, each 8 bytes with the address.
        assert_eq!(&m[24..32], &[8, 0, 2, 0, 10, 123, 1, 2][..]);
        assert_eq!(&m[32..40], &[8, 0, 1, 0, 10, 123, 1, 2][..]);
    }

    #[test]
    fn truncated_or_lying_answers_end_the_walk() {
        let ok = message(NLMSG_DONE, 0, 1, &[0; 4], &[]);
        assert_eq!(messages(&ok).count(), 1);
        let mut lying = ok.clone();
        lying[0..4].copy_from_slice(&1000u32.to_ne_bytes());
        assert_eq!(messages(&lying).count(), 0);
        assert_eq!(messages(&ok[..10]).count(), 0);
        assert!(tcp_conn(&[2; 10]).is_none());
        assert!(ack_error(&0i32.to_ne_bytes()).is_none());
        let e = ack_error(&(-libc::EEXIST).to_ne_bytes()).unwrap();
        assert_eq!(e.raw_os_error(), Some(libc::EEXIST));
    }

    /// In a network namespace of its own (root only; the test runs as
    /// root on the project's machines): an address added with its
    /// prefix is reachable, a connection to it is aborted (its program
    /// sees the error), then the address goes.
    #[test]
    fn addresses_and_connections_in_a_private_namespace() {
        std::thread::spawn(|| {
            // SAFETY: unshare() of this thread only; the thread ends with
            // the test.
            if unsafe { libc::unshare(libc::CLONE_NEWNET) } != 0 {
                panic!("unshare(CLONE_NEWNET): {}", io::Error::last_os_error());
            }
            crate::net::loopback_up().unwrap();
            let lo = 1; // the loopback's index in a new namespace
            let a = Ipv4Addr::new(10, 9, 8, 7);
            add_addr(lo, a, 24).unwrap();
            let e = add_addr(lo, a, 24).unwrap_err();
            assert_eq!(e.raw_os_error(), Some(libc::EEXIST), "{e}");

            let server = std::net::TcpListener::bind((a, 0)).unwrap();
            let mut client = std::net::TcpStream::connect(server.local_addr().unwrap()).unwrap();
            let (_accepted, _) = server.accept().unwrap();
            let loop_server = std::net::TcpListener::bind((Ipv4Addr::LOCALHOST, 0)).unwrap();
            let _kept = std::net::TcpStream::connect(loop_server.local_addr().unwrap()).unwrap();
            let conns = tcp_connections().unwrap();
            assert_eq!(
                conns.len(),
                4,
                "two connections, each seen from both ends: {conns:?}"
            );

            let n = abort_tcp(|c| !c.local.is_loopback()).unwrap();
            // The first end's reset may end the second before its turn.
            assert!((1..=2).contains(&n), "aborted {n}");
            use std::io::Read;
            let mut b = [0u8; 1];
            let err = client.read(&mut b).unwrap_err();
            // Aborted itself, or reset by its peer's abort when the dump
            // listed the accepted end first: either way the program sees
            // its connection end with an error.
            assert!(
                [Some(libc::ECONNABORTED), Some(libc::ECONNRESET)].contains(&err.raw_os_error()),
                "{err}"
            );
            assert_eq!(
                tcp_connections().unwrap().len(),
                2,
                "the loopback one stays"
            );

            del_addr(lo, a, 24).unwrap();
            assert!(
                std::net::TcpListener::bind((a, 0)).is_err(),
                "the address is gone"
            );
        })
        .join()
        .unwrap();
    }
}
