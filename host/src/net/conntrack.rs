//! Forgetting the connections of an address that is given back: the
//! kernel keeps conntrack entries after a VM is gone, and an established
//! entry would carry a stale flow (an outside client's published
//! connection, a masqueraded download) to the next VM that leases the same
//! address, maybe another tenant's. When a lease ends, every IPv4 entry
//! whose original or reply tuple names the address is deleted over
//! ctnetlink (a dump, then one delete per entry), no `conntrack` process.
//!
//! It must not delete entries of any other address, or be on the path
//! that starts a VM (a dump walks the whole table).

use std::net::Ipv4Addr;

use super::netlink::{put_header, NlError, NlSocket};

const NFNL_SUBSYS_CTNETLINK: u16 = 1;
const IPCTNL_MSG_CT_NEW: u16 = 0;
const IPCTNL_MSG_CT_GET: u16 = 1;
const IPCTNL_MSG_CT_DELETE: u16 = 2;
const CTA_TUPLE_ORIG: u16 = 1;
const CTA_TUPLE_REPLY: u16 = 2;
const CTA_ZONE: u16 = 18;
const CTA_TUPLE_IP: u16 = 1;
const CTA_IP_V4_SRC: u16 = 1;
const CTA_IP_V4_DST: u16 = 2;
/// Deletes per datagram.
const DELETES_PER_SEND: usize = 64;

/// Attributes of a netlink payload: (type without flags, whole attribute
/// including its header, value).
fn attrs(mut b: &[u8]) -> impl Iterator<Item = (u16, &[u8], &[u8])> {
    std::iter::from_fn(move || {
        if b.len() < 4 {
            return None;
        }
        let len = u16::from_ne_bytes([b[0], b[1]]) as usize;
        let kind = u16::from_ne_bytes([b[2], b[3]]) & 0x3fff;
        if len < 4 || len > b.len() {
            return None;
        }
        let item = (kind, &b[..len], &b[4..len]);
        b = b.get((len + 3) & !3..).unwrap_or_default();
        Some(item)
    })
}

/// Whether a tuple (`CTA_TUPLE_ORIG`/`REPLY` value) has `addr` as source
/// or destination.
fn tuple_names(tuple: &[u8], addr: Ipv4Addr) -> bool {
    attrs(tuple)
        .filter(|(k, _, _)| *k == CTA_TUPLE_IP)
        .flat_map(|(_, _, ip)| attrs(ip))
        .any(|(k, _, v)| (k == CTA_IP_V4_SRC || k == CTA_IP_V4_DST) && v == addr.octets())
}

/// What is needed to delete one entry: its original tuple and its zone,
/// as the dump gave them.
fn entry_key(payload: &[u8], addr: Ipv4Addr) -> Option<Vec<u8>> {
    let body = payload.get(4..)?; // after struct nfgenmsg
    let mut names = false;
    let mut key = Vec::new();
    for (kind, whole, value) in attrs(body) {
        match kind {
            CTA_TUPLE_ORIG => {
                names |= tuple_names(value, addr);
                key.extend_from_slice(whole);
                key.resize(key.len().next_multiple_of(4), 0);
            }
            CTA_TUPLE_REPLY => names |= tuple_names(value, addr),
            CTA_ZONE => {
                key.extend_from_slice(whole);
                key.resize(key.len().next_multiple_of(4), 0);
            }
            _ => {}
        }
    }
    (names && !key.is_empty()).then_some(key)
}

/// The IPv4 conntrack entries naming `addr`, each as its delete key.
fn entries_of(nl: &mut NlSocket, addr: Ipv4Addr) -> Result<Vec<Vec<u8>>, NlError> {
    let seq = nl.next_seq();
    let mut buf = Vec::new();
    put_header(
        &mut buf,
        (NFNL_SUBSYS_CTNETLINK << 8) | IPCTNL_MSG_CT_GET,
        netlink_packet_core::NLM_F_REQUEST | netlink_packet_core::NLM_F_DUMP,
        seq,
        4,
    );
    buf.extend_from_slice(&[libc::AF_INET as u8, 0, 0, 0]);
    nl.send(&buf)?;
    let mut keys = Vec::new();
    nl.read_dump(seq, |m| {
        if m.kind == (NFNL_SUBSYS_CTNETLINK << 8) | IPCTNL_MSG_CT_NEW {
            keys.extend(entry_key(m.payload, addr));
        }
    })?;
    Ok(keys)
}

/// How many conntrack entries name `addr` (for tests and diagnostics).
#[cfg(test)]
pub(crate) fn count(nl: &mut NlSocket, addr: Ipv4Addr) -> Result<usize, NlError> {
    Ok(entries_of(nl, addr)?.len())
}

/// Deletes every IPv4 conntrack entry naming `addr`; returns how many
/// there were. An entry that ends by itself meanwhile is not an error.
pub(crate) fn forget(nl: &mut NlSocket, addr: Ipv4Addr) -> Result<usize, NlError> {
    let keys = entries_of(nl, addr)?;
    for chunk in keys.chunks(DELETES_PER_SEND) {
        let mut buf = Vec::new();
        let mut first = None;
        let mut last = 0;
        for key in chunk {
            last = nl.next_seq();
            first.get_or_insert(last);
            put_header(
                &mut buf,
                (NFNL_SUBSYS_CTNETLINK << 8) | IPCTNL_MSG_CT_DELETE,
                netlink_packet_core::NLM_F_REQUEST | netlink_packet_core::NLM_F_ACK,
                last,
                4 + key.len(),
            );
            buf.extend_from_slice(&[libc::AF_INET as u8, 0, 0, 0]);
            buf.extend_from_slice(key);
        }
        nl.send(&buf)?;
        match nl.wait_acks(None, first.unwrap_or(last), last, |_| {}) {
            Err(e) if !e.is(libc::ENOENT) => return Err(e),
            _ => {}
        }
    }
    Ok(keys.len())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn attr(kind: u16, value: &[u8]) -> Vec<u8> {
        let mut v = ((4 + value.len()) as u16).to_ne_bytes().to_vec();
        v.extend_from_slice(&kind.to_ne_bytes());
        v.extend_from_slice(value);
        v.resize(v.len().next_multiple_of(4), 0);
        v
    }

    fn tuple(kind: u16, src: Ipv4Addr, dst: Ipv4Addr) -> Vec<u8> {
        let ip = [
            attr(CTA_IP_V4_SRC, &src.octets()),
            attr(CTA_IP_V4_DST, &dst.octets()),
        ]
        .concat();
        attr(kind | 0x8000, &attr(CTA_TUPLE_IP | 0x8000, &ip))
    }

    #[test]
    fn entries_are_matched_on_either_tuple_and_keep_their_zone() {
        let vm = Ipv4Addr::new(10, 123, 1, 5);
        let client = Ipv4Addr::new(192, 0, 2, 9);
        let host = Ipv4Addr::new(192, 0, 2, 2);
        // A published connection: client -> host (original), vm -> client (reply).
        let orig = tuple(CTA_TUPLE_ORIG, client, host);
        let zone = attr(CTA_ZONE, &7u16.to_be_bytes());
        let msg = [
            vec![2, 0, 0, 0],
            orig.clone(),
            tuple(CTA_TUPLE_REPLY, vm, client),
            zone.clone(),
        ]
        .concat();
        assert_eq!(entry_key(&msg, vm), Some([orig, zone].concat()));
        assert_eq!(entry_key(&msg, Ipv4Addr::new(10, 123, 1, 6)), None);
    }
}
