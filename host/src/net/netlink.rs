//! Netlink for the host network, blocking and small: [`NlSocket`] sends
//! requests and reads their acknowledgements, replies or dumps;
//! [`RtSocket`] makes the route-netlink requests the pool and `attach` need
//! (veth pairs, link state, addresses, routes, neighbours), built with
//! `netlink-packet-route`. The nftables and conntrack requests are built
//! by their own modules and sent through [`NlSocket`].
//!
//! A netlink socket belongs to the network namespace it was opened in,
//! whichever thread uses it later: that is how a slot's namespace is
//! configured after its thread is gone, without entering it again.
//!
//! It must not spawn processes, know about VMs, tenants or the firewall's
//! rules, or keep any state besides the sockets.

use std::io;
use std::net::Ipv4Addr;
use std::os::fd::{AsRawFd, BorrowedFd};

use netlink_packet_core::{
    NetlinkHeader, NetlinkMessage, NetlinkPayload, NLM_F_ACK, NLM_F_CREATE, NLM_F_EXCL,
    NLM_F_REQUEST,
};
use netlink_packet_route::address::{AddressAttribute, AddressMessage, AddressScope};
use netlink_packet_route::link::{
    InfoData, InfoKind, InfoVeth, LinkAttribute, LinkFlags, LinkInfo, LinkMessage,
};
use netlink_packet_route::neighbour::{
    NeighbourAddress, NeighbourAttribute, NeighbourMessage, NeighbourState,
};
use netlink_packet_route::route::{
    RouteAddress, RouteAttribute, RouteFlags, RouteHeader, RouteMessage, RouteProtocol, RouteScope,
    RouteType,
};
use netlink_packet_route::{AddressFamily, RouteNetlinkMessage};

/// `NLMSG_ERROR`: an acknowledgement (error 0) or an error.
const NLMSG_ERROR: u16 = 2;
/// `NLMSG_DONE`: the end of a dump.
const NLMSG_DONE: u16 = 3;
/// `NLM_F_ACK_TLVS` in an `NLMSG_ERROR`: extended-ack attributes follow.
const NLM_F_ACK_TLVS: u16 = 0x200;
/// `NLMSGERR_ATTR_MSG`: the kernel's explanation of an error.
const NLMSGERR_ATTR_MSG: u16 = 1;
/// `SOL_NETLINK` options.
const NETLINK_EXT_ACK: libc::c_int = 11;
const NETLINK_CAP_ACK: libc::c_int = 10;
/// Length of `struct nlmsghdr`.
pub(crate) const NLMSG_HDRLEN: usize = 16;
/// How long a request may wait for the kernel's answer.
const ANSWER_TIMEOUT: std::time::Duration = std::time::Duration::from_secs(5);
/// Routes zygote adds carry this protocol number (`ip route` shows
/// `proto 122`), so they can be told from everyone else's.
pub(crate) const RTPROT_ZYGOTE: u8 = 122;

/// A netlink request the kernel refused (or that could not be made).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct NlError {
    /// The errno.
    pub errno: i32,
    /// The kernel's extended explanation, when it gave one.
    pub detail: Option<String>,
}

impl NlError {
    fn from_io(e: io::Error) -> Self {
        NlError {
            errno: e.raw_os_error().unwrap_or(libc::EIO),
            detail: if e.raw_os_error().is_some() {
                None
            } else {
                Some(e.to_string())
            },
        }
    }

    /// Whether this is errno `e`.
    pub fn is(&self, e: i32) -> bool {
        self.errno == e
    }
}

impl std::fmt::Display for NlError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}", io::Error::from_raw_os_error(self.errno))?;
        if let Some(d) = &self.detail {
            write!(f, " ({d})")?;
        }
        Ok(())
    }
}

impl std::error::Error for NlError {}

impl From<io::Error> for NlError {
    fn from(e: io::Error) -> Self {
        NlError::from_io(e)
    }
}

/// One netlink message as read from the socket.
pub(crate) struct Msg<'a> {
    /// `nlmsg_type`.
    pub kind: u16,
    /// Its payload (after the header).
    pub payload: &'a [u8],
}

/// Appends a netlink message header for a payload of `payload_len` bytes.
pub(crate) fn put_header(buf: &mut Vec<u8>, kind: u16, flags: u16, seq: u32, payload_len: usize) {
    let len = u32::try_from(NLMSG_HDRLEN + payload_len).unwrap_or(u32::MAX);
    buf.extend_from_slice(&len.to_ne_bytes());
    buf.extend_from_slice(&kind.to_ne_bytes());
    buf.extend_from_slice(&flags.to_ne_bytes());
    buf.extend_from_slice(&seq.to_ne_bytes());
    buf.extend_from_slice(&0u32.to_ne_bytes());
}

/// A blocking netlink socket of one protocol, in the network namespace of
/// the thread that opened it.
pub(crate) struct NlSocket {
    sock: netlink_sys::Socket,
    seq: u32,
    rx: Vec<u8>,
}

impl std::fmt::Debug for NlSocket {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("NlSocket")
            .field("fd", &self.sock.as_raw_fd())
            .finish()
    }
}

fn setsockopt_int(fd: BorrowedFd<'_>, level: libc::c_int, name: libc::c_int, value: libc::c_int) {
    // SAFETY: `fd` is a live socket for the duration of the call; the
    // option value is a c_int read from the pointer and length given.
    // A refused option (an old kernel) only loses error detail, so the
    // result is not checked.
    unsafe {
        libc::setsockopt(
            fd.as_raw_fd(),
            level,
            name,
            (&value as *const libc::c_int).cast(),
            std::mem::size_of::<libc::c_int>() as libc::socklen_t,
        );
    }
}

impl NlSocket {
    /// Opens and binds a socket of `protocol` (`netlink_sys::constants`).
    pub fn open(protocol: isize) -> io::Result<Self> {
        let mut sock = netlink_sys::Socket::new(protocol)?;
        sock.bind_auto()?;
        // SAFETY: `sock` owns this fd and outlives the borrow.
        let fd = unsafe { BorrowedFd::borrow_raw(sock.as_raw_fd()) };
        setsockopt_int(fd, libc::SOL_NETLINK, NETLINK_EXT_ACK, 1);
        setsockopt_int(fd, libc::SOL_NETLINK, NETLINK_CAP_ACK, 1);
        let tv = libc::timeval {
            tv_sec: ANSWER_TIMEOUT.as_secs() as libc::time_t,
            tv_usec: 0,
        };
        // SAFETY: as above; the value is a `timeval` of the size given.
        let rc = unsafe {
            libc::setsockopt(
                fd.as_raw_fd(),
                libc::SOL_SOCKET,
                libc::SO_RCVTIMEO,
                (&tv as *const libc::timeval).cast(),
                std::mem::size_of::<libc::timeval>() as libc::socklen_t,
            )
        };
        if rc != 0 {
            return Err(io::Error::last_os_error());
        }
        Ok(NlSocket {
            sock,
            seq: 0,
            rx: Vec::with_capacity(64 * 1024),
        })
    }

    /// A fresh sequence number.
    pub fn next_seq(&mut self) -> u32 {
        self.seq = self.seq.wrapping_add(1).max(1);
        self.seq
    }

    /// Sends `buf` (one or more messages) as one datagram.
    pub fn send(&self, buf: &[u8]) -> Result<(), NlError> {
        let n = self.sock.send(buf, 0)?;
        if n != buf.len() {
            return Err(NlError {
                errno: libc::EMSGSIZE,
                detail: Some(format!("sent {n} of {} bytes", buf.len())),
            });
        }
        Ok(())
    }

    /// Reads datagrams and hands each message to `f` until `f` says done;
    /// `f` gets the message's sequence number, type, flags and payload.
    fn read_until(
        &mut self,
        mut f: impl FnMut(u32, u16, u16, &[u8]) -> Option<Result<(), NlError>>,
    ) -> Result<(), NlError> {
        loop {
            self.rx.clear();
            let n = match self.sock.recv(&mut self.rx, 0) {
                Ok(n) => n,
                Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
                Err(e)
                    if matches!(
                        e.kind(),
                        io::ErrorKind::WouldBlock | io::ErrorKind::TimedOut
                    ) =>
                {
                    return Err(NlError {
                        errno: libc::ETIMEDOUT,
                        detail: Some(format!(
                            "no answer from the kernel in {} s",
                            ANSWER_TIMEOUT.as_secs()
                        )),
                    })
                }
                Err(e) => return Err(e.into()),
            };
            let data = &self.rx[..n.min(self.rx.len())];
            let mut off = 0;
            while off + NLMSG_HDRLEN <= data.len() {
                let h = &data[off..];
                let len = u32::from_ne_bytes([h[0], h[1], h[2], h[3]]) as usize;
                if len < NLMSG_HDRLEN || off + len > data.len() {
                    break;
                }
                let kind = u16::from_ne_bytes([h[4], h[5]]);
                let flags = u16::from_ne_bytes([h[6], h[7]]);
                let seq = u32::from_ne_bytes([h[8], h[9], h[10], h[11]]);
                if let Some(r) = f(seq, kind, flags, &h[NLMSG_HDRLEN..len]) {
                    return r;
                }
                off += (len + 3) & !3;
            }
        }
    }

    /// Waits for the acknowledgements of the requests numbered
    /// `first..=last` (each sent with `NLM_F_ACK`); the first error wins,
    /// but every acknowledgement is read so none is left for the next
    /// request. An error answering `batch` (the header of an nfnetlink
    /// batch, which is never acknowledged) fails the whole batch at once.
    /// Replies other than acknowledgements go to `on_reply`.
    pub fn wait_acks(
        &mut self,
        batch: Option<u32>,
        first: u32,
        last: u32,
        mut on_reply: impl FnMut(Msg<'_>),
    ) -> Result<(), NlError> {
        let mut pending = u64::from(last.wrapping_sub(first)) + 1;
        let mut failure: Option<NlError> = None;
        self.read_until(|seq, kind, flags, payload| {
            if Some(seq) == batch && kind == NLMSG_ERROR {
                return parse_error(flags, payload).map(Err);
            }
            if seq.wrapping_sub(first) > last.wrapping_sub(first) {
                return None; // an answer to an earlier, abandoned request
            }
            if kind != NLMSG_ERROR {
                on_reply(Msg { kind, payload });
                return None;
            }
            if let Some(e) = parse_error(flags, payload) {
                failure.get_or_insert(e);
            }
            pending -= 1;
            (pending == 0).then(|| failure.take().map_or(Ok(()), Err))
        })
    }

    /// Reads a dump answering request `seq` to its end, each message to `f`.
    pub fn read_dump(&mut self, seq: u32, mut f: impl FnMut(Msg<'_>)) -> Result<(), NlError> {
        self.read_until(|s, kind, flags, payload| {
            if s != seq {
                return None;
            }
            match kind {
                NLMSG_DONE => Some(Ok(())),
                NLMSG_ERROR => Some(parse_error(flags, payload).map_or(Ok(()), Err)),
                _ => {
                    f(Msg { kind, payload });
                    None
                }
            }
        })
    }
}

/// The error of an `NLMSG_ERROR` payload (`None` for an acknowledgement).
fn parse_error(flags: u16, payload: &[u8]) -> Option<NlError> {
    let code = i32::from_ne_bytes(payload.get(..4)?.try_into().ok()?);
    if code == 0 {
        return None;
    }
    let mut detail = None;
    if flags & NLM_F_ACK_TLVS != 0 {
        // With NETLINK_CAP_ACK the echoed request is its header only.
        let mut tlvs = payload.get(4 + NLMSG_HDRLEN..).unwrap_or_default();
        while tlvs.len() >= 4 {
            let len = u16::from_ne_bytes([tlvs[0], tlvs[1]]) as usize;
            let kind = u16::from_ne_bytes([tlvs[2], tlvs[3]]) & 0x3fff;
            if len < 4 || len > tlvs.len() {
                break;
            }
            if kind == NLMSGERR_ATTR_MSG {
                let s = &tlvs[4..len];
                let s = s.split(|&b| b == 0).next().unwrap_or_default();
                detail = Some(String::from_utf8_lossy(s).into_owned());
            }
            tlvs = tlvs.get((len + 3) & !3..).unwrap_or_default();
        }
    }
    Some(NlError {
        errno: -code,
        detail,
    })
}

/// A route-netlink socket: links, addresses, routes and neighbours of
/// the namespace it was opened in.
#[derive(Debug)]
pub(crate) struct RtSocket {
    nl: NlSocket,
}

impl RtSocket {
    /// Opens one in the calling thread's network namespace.
    pub fn open() -> io::Result<Self> {
        Ok(RtSocket {
            nl: NlSocket::open(netlink_sys::constants::NETLINK_ROUTE)?,
        })
    }

    /// Sends one request with `NLM_F_ACK` and waits for its answer;
    /// replies (for a get) go to `on_reply`.
    fn call(
        &mut self,
        msg: RouteNetlinkMessage,
        flags: u16,
        on_reply: impl FnMut(Msg<'_>),
    ) -> Result<(), NlError> {
        let seq = self.nl.next_seq();
        let mut header = NetlinkHeader::default();
        header.flags = NLM_F_REQUEST | NLM_F_ACK | flags;
        header.sequence_number = seq;
        let mut m = NetlinkMessage::new(header, NetlinkPayload::InnerMessage(msg));
        m.finalize();
        let mut buf = vec![0; m.buffer_len()];
        m.serialize(&mut buf);
        self.nl.send(&buf)?;
        self.nl.wait_acks(None, seq, seq, on_reply)
    }

    /// The index of link `name`, `None` if there is none.
    pub fn link_index(&mut self, name: &str) -> Result<Option<u32>, NlError> {
        let mut msg = LinkMessage::default();
        msg.attributes.push(LinkAttribute::IfName(name.to_string()));
        let mut index = None;
        let r = self.call(RouteNetlinkMessage::GetLink(msg), 0, |m| {
            // struct ifinfomsg: family, pad, type (u16), index (i32), ...
            if let Some(b) = m.payload.get(4..8) {
                index = Some(u32::from_ne_bytes([b[0], b[1], b[2], b[3]]));
            }
        });
        match r {
            Ok(()) => Ok(index),
            Err(e) if e.is(libc::ENODEV) => Ok(None),
            Err(e) => Err(e),
        }
    }

    /// Creates a veth pair, both ends down: `name` here, `peer` with MAC
    /// `peer_mac` in the namespace `peer_ns` (an open namespace fd).
    pub fn add_veth(
        &mut self,
        name: &str,
        mac: Option<[u8; 6]>,
        peer: &str,
        peer_mac: Option<[u8; 6]>,
        peer_ns: BorrowedFd<'_>,
    ) -> Result<(), NlError> {
        let mut peer_msg = LinkMessage::default();
        peer_msg
            .attributes
            .push(LinkAttribute::IfName(peer.to_string()));
        peer_msg
            .attributes
            .push(LinkAttribute::NetNsFd(peer_ns.as_raw_fd()));
        if let Some(m) = peer_mac {
            peer_msg.attributes.push(LinkAttribute::Address(m.to_vec()));
        }
        let mut msg = LinkMessage::default();
        msg.attributes.push(LinkAttribute::IfName(name.to_string()));
        if let Some(m) = mac {
            msg.attributes.push(LinkAttribute::Address(m.to_vec()));
        }
        msg.attributes.push(LinkAttribute::LinkInfo(vec![
            LinkInfo::Kind(InfoKind::Veth),
            LinkInfo::Data(InfoData::Veth(InfoVeth::Peer(peer_msg))),
        ]));
        self.call(
            RouteNetlinkMessage::NewLink(msg),
            NLM_F_CREATE | NLM_F_EXCL,
            |_| {},
        )
    }

    /// Brings link `index` up.
    pub fn set_up(&mut self, index: u32) -> Result<(), NlError> {
        let mut msg = LinkMessage::default();
        msg.header.index = index;
        msg.header.flags = LinkFlags::Up;
        msg.header.change_mask = LinkFlags::Up;
        self.call(RouteNetlinkMessage::SetLink(msg), 0, |_| {})
    }

    /// Sets link `index`'s MAC address.
    #[cfg(test)]
    pub fn set_mac(&mut self, index: u32, mac: [u8; 6]) -> Result<(), NlError> {
        let mut msg = LinkMessage::default();
        msg.header.index = index;
        msg.attributes.push(LinkAttribute::Address(mac.to_vec()));
        self.call(RouteNetlinkMessage::SetLink(msg), 0, |_| {})
    }

    /// Adds IPv4 address `addr/prefix_len` to link `index`.
    pub fn add_address(
        &mut self,
        index: u32,
        addr: Ipv4Addr,
        prefix_len: u8,
    ) -> Result<(), NlError> {
        let mut msg = AddressMessage::default();
        msg.header.family = AddressFamily::Inet;
        msg.header.prefix_len = prefix_len;
        msg.header.scope = AddressScope::Universe;
        msg.header.index = index;
        msg.attributes.push(AddressAttribute::Local(addr.into()));
        msg.attributes.push(AddressAttribute::Address(addr.into()));
        self.call(
            RouteNetlinkMessage::NewAddress(msg),
            NLM_F_CREATE | NLM_F_EXCL,
            |_| {},
        )
    }

    fn route(dst: Ipv4Addr, prefix_len: u8, oif: Option<u32>) -> RouteMessage {
        let mut msg = RouteMessage::default();
        msg.header = RouteHeader {
            address_family: AddressFamily::Inet,
            destination_prefix_length: prefix_len,
            table: RouteHeader::RT_TABLE_MAIN,
            protocol: RouteProtocol::from(RTPROT_ZYGOTE),
            scope: RouteScope::Link,
            kind: RouteType::Unicast,
            ..RouteHeader::default()
        };
        if prefix_len > 0 {
            msg.attributes
                .push(RouteAttribute::Destination(RouteAddress::Inet(dst)));
        }
        if let Some(oif) = oif {
            msg.attributes.push(RouteAttribute::Oif(oif));
        }
        msg
    }

    /// Adds route `dst/prefix_len dev oif` (scope link) to the main table.
    pub fn add_route(&mut self, dst: Ipv4Addr, prefix_len: u8, oif: u32) -> Result<(), NlError> {
        self.call(
            RouteNetlinkMessage::NewRoute(Self::route(dst, prefix_len, Some(oif))),
            NLM_F_CREATE | NLM_F_EXCL,
            |_| {},
        )
    }

    /// Adds the default route `via gateway dev oif onlink`.
    pub fn add_default_route(&mut self, gateway: Ipv4Addr, oif: u32) -> Result<(), NlError> {
        let mut msg = Self::route(Ipv4Addr::UNSPECIFIED, 0, Some(oif));
        msg.header.scope = RouteScope::Universe;
        msg.header.flags = RouteFlags::Onlink;
        msg.attributes
            .push(RouteAttribute::Gateway(RouteAddress::Inet(gateway)));
        self.call(
            RouteNetlinkMessage::NewRoute(msg),
            NLM_F_CREATE | NLM_F_EXCL,
            |_| {},
        )
    }

    /// Adds (or replaces) `unreachable dst/prefix_len` to the main table:
    /// what has no more specific route is refused, not sent on through
    /// the default route.
    pub fn add_unreachable(&mut self, dst: Ipv4Addr, prefix_len: u8) -> Result<(), NlError> {
        let mut msg = Self::route(dst, prefix_len, None);
        msg.header.scope = RouteScope::Universe;
        msg.header.kind = RouteType::Unreachable;
        self.call(
            RouteNetlinkMessage::NewRoute(msg),
            NLM_F_CREATE | netlink_packet_core::NLM_F_REPLACE,
            |_| {},
        )
    }

    /// Deletes `unreachable dst/prefix_len`.
    #[cfg(test)]
    pub fn del_unreachable(&mut self, dst: Ipv4Addr, prefix_len: u8) -> Result<(), NlError> {
        let mut msg = Self::route(dst, prefix_len, None);
        msg.header.scope = RouteScope::NoWhere;
        msg.header.kind = RouteType::Unreachable;
        self.call(RouteNetlinkMessage::DelRoute(msg), 0, |_| {})
    }

    /// Deletes route `dst/prefix_len` (through `oif` if given) that zygote
    /// added; a route already gone is not an error.
    pub fn del_route(
        &mut self,
        dst: Ipv4Addr,
        prefix_len: u8,
        oif: Option<u32>,
    ) -> Result<(), NlError> {
        let mut msg = Self::route(dst, prefix_len, oif);
        msg.header.scope = RouteScope::NoWhere;
        match self.call(RouteNetlinkMessage::DelRoute(msg), 0, |_| {}) {
            Err(e) if e.is(libc::ESRCH) || e.is(libc::ENODEV) => Ok(()),
            r => r,
        }
    }

    /// Whether the main table has a route to exactly `dst/prefix_len`.
    #[cfg(test)]
    pub fn has_route(&mut self, dst: Ipv4Addr, prefix_len: u8) -> Result<bool, NlError> {
        let mut msg = RouteMessage::default();
        msg.header.address_family = AddressFamily::Inet;
        let seq = self.nl.next_seq();
        let mut header = NetlinkHeader::default();
        header.flags = NLM_F_REQUEST | netlink_packet_core::NLM_F_DUMP;
        header.sequence_number = seq;
        let mut m = NetlinkMessage::new(
            header,
            NetlinkPayload::InnerMessage(RouteNetlinkMessage::GetRoute(msg)),
        );
        m.finalize();
        let mut buf = vec![0; m.buffer_len()];
        m.serialize(&mut buf);
        self.nl.send(&buf)?;
        let mut found = false;
        self.nl.read_dump(seq, |m| {
            // struct rtmsg: family, dst_len, src_len, tos, table, ...
            if m.payload.len() < 12 || m.payload[1] != prefix_len || m.payload[4] != 254 {
                return;
            }
            let mut attrs = &m.payload[12..];
            while attrs.len() >= 4 {
                let len = u16::from_ne_bytes([attrs[0], attrs[1]]) as usize;
                let kind = u16::from_ne_bytes([attrs[2], attrs[3]]);
                if len < 4 || len > attrs.len() {
                    break;
                }
                if kind == 1 && len == 8 && attrs[4..8] == dst.octets() {
                    found = true;
                }
                attrs = attrs.get((len + 3) & !3..).unwrap_or_default();
            }
        })?;
        Ok(found)
    }

    /// Adds a permanent neighbour entry `ip lladdr mac dev index`.
    pub fn add_neighbour(&mut self, index: u32, ip: Ipv4Addr, mac: [u8; 6]) -> Result<(), NlError> {
        let mut msg = NeighbourMessage::default();
        msg.header.family = AddressFamily::Inet;
        msg.header.ifindex = index;
        msg.header.state = NeighbourState::Permanent;
        msg.attributes
            .push(NeighbourAttribute::Destination(NeighbourAddress::Inet(ip)));
        msg.attributes
            .push(NeighbourAttribute::LinkLayerAddress(mac.to_vec()));
        self.call(
            RouteNetlinkMessage::NewNeighbour(msg),
            NLM_F_CREATE | NLM_F_EXCL,
            |_| {},
        )
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn errors_carry_the_kernels_explanation() {
        // An NLMSG_ERROR payload: -EEXIST, the echoed header, then an
        // NLMSGERR_ATTR_MSG attribute.
        let mut p = (-libc::EEXIST).to_ne_bytes().to_vec();
        p.extend_from_slice(&[0u8; NLMSG_HDRLEN]);
        let text = b"File exists here\0";
        p.extend_from_slice(&((4 + text.len()) as u16).to_ne_bytes());
        p.extend_from_slice(&NLMSGERR_ATTR_MSG.to_ne_bytes());
        p.extend_from_slice(text);
        let e = parse_error(NLM_F_ACK_TLVS, &p).expect("an error");
        assert!(e.is(libc::EEXIST));
        assert_eq!(e.detail.as_deref(), Some("File exists here"));
        assert!(e.to_string().contains("File exists here"), "{e}");
        // An acknowledgement is no error.
        assert!(parse_error(0, &0i32.to_ne_bytes()).is_none());
    }
}
