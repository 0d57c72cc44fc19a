//! The firewall of the host network: the nftables table (`inet zygote` by
//! default) as text, installed whole through `nft -f -` (once, when it is
//! missing or its policy changed), and the per-VM changes, which are set
//! and map elements only, sent as one nf_tables netlink transaction
//! (`NFT_MSG_NEWSETELEM` / `NFT_MSG_DELSETELEM` in a batch) with no
//! process spawned.
//!
//! The policy, for interfaces `PREFIX*` (the host ends of the VMs' veth
//! pairs):
//! - forward, VM to VM: only established/related traffic, published
//!   traffic from a VM that has egress (a VM reaching a published port
//!   through a host address), or traffic between two addresses of the
//!   same tenant (their blocks form a pair in `tenant_pairs`) that both
//!   asked for peers (`peers`); the rest is dropped.
//! - forward, VM to elsewhere: established/related (answers to published
//!   connections) or from an address in `egress` (masqueraded); the rest,
//!   and everything that is not IPv4, is dropped.
//! - forward, elsewhere to a VM: established/related or DNATed (published).
//! - input from a VM: established/related only (a VM cannot reach the
//!   host's own addresses).
//! - published ports: `published` maps `protocol . host port` to `guest
//!   address . guest port`, DNATed in prerouting (from outside) and output
//!   (from the host itself) for the host's local addresses; connections
//!   from 127.0.0.0/8 are masqueraded towards the VM (the host interfaces
//!   have `route_localnet`), so `curl localhost:PORT` works.
//!
//! Spoofing is stopped before this table: the host ends have strict
//! reverse-path filtering, so a VM's packets carry its own address.
//!
//! It must not touch any other table (the host's own forwarding and
//! firewall stay as they are) or decide who gets which address.

use std::fmt::Write as _;
use std::io::Write as _;
use std::net::Ipv4Addr;
use std::process::{Command, Stdio};

use super::netlink::{put_header, NlError, NlSocket};
use super::{NetError, Protocol, Publish};

/// Bump when the rules change in a way the marker text would not show.
const POLICY_VERSION: u32 = 1;

const NFNL_SUBSYS_NFTABLES: u16 = 10;
const NFNL_MSG_BATCH_BEGIN: u16 = 0x10;
const NFNL_MSG_BATCH_END: u16 = 0x11;
const NFT_MSG_GETTABLE: u16 = 1;
const NFT_MSG_NEWSETELEM: u16 = 12;
const NFT_MSG_DELSETELEM: u16 = 14;
const NFPROTO_INET: u8 = 1;
const NFTA_TABLE_NAME: u16 = 1;
const NFTA_TABLE_USERDATA: u16 = 6;
const NFTA_SET_ELEM_LIST_TABLE: u16 = 1;
const NFTA_SET_ELEM_LIST_SET: u16 = 2;
const NFTA_SET_ELEM_LIST_ELEMENTS: u16 = 3;
const NFTA_LIST_ELEM: u16 = 1;
const NFTA_SET_ELEM_KEY: u16 = 1;
const NFTA_SET_ELEM_DATA: u16 = 2;
const NFTA_DATA_VALUE: u16 = 1;
const NLA_F_NESTED: u16 = 0x8000;
/// libnftnl's user-data tag of a table's comment.
const NFTNL_UDATA_TABLE_COMMENT: u8 = 0;

/// What the rules depend on.
#[derive(Debug, Clone)]
pub(crate) struct Policy {
    /// The table's name (family `inet`).
    pub table: String,
    /// The prefix of the host ends of the VMs' veth pairs.
    pub if_prefix: String,
    /// The prefix length of a tenant's address block.
    pub block_prefix_len: u8,
}

/// One set or map element.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) enum Elem {
    /// An address that may leave the host (`egress`).
    Egress(Ipv4Addr),
    /// An address that may talk to its tenant's other peers (`peers`).
    Peer(Ipv4Addr),
    /// Two blocks of one tenant (`tenant_pairs`), by network address.
    Pair(Ipv4Addr, Ipv4Addr),
    /// A published port (`published`): host side to guest address.
    Published(Publish, Ipv4Addr),
}

/// A port in a concatenation: big-endian in a 4-byte register.
fn port_reg(port: u16) -> [u8; 4] {
    let p = port.to_be_bytes();
    [p[0], p[1], 0, 0]
}

impl Elem {
    fn set(&self) -> &'static str {
        match self {
            Elem::Egress(_) => "egress",
            Elem::Peer(_) => "peers",
            Elem::Pair(..) => "tenant_pairs",
            Elem::Published(..) => "published",
        }
    }

    /// The key as nf_tables stores it (each part of a concatenation in a
    /// 4-byte register).
    fn key(&self) -> Vec<u8> {
        match self {
            Elem::Egress(a) | Elem::Peer(a) => a.octets().to_vec(),
            Elem::Pair(a, b) => [a.octets(), b.octets()].concat(),
            Elem::Published(p, _) => {
                [[p.protocol.number(), 0, 0, 0], port_reg(p.host_port)].concat()
            }
        }
    }

    fn data(&self) -> Option<Vec<u8>> {
        match self {
            Elem::Published(p, a) => Some([a.octets(), port_reg(p.guest_port)].concat()),
            _ => None,
        }
    }

    fn text(&self) -> String {
        match self {
            Elem::Egress(a) | Elem::Peer(a) => a.to_string(),
            Elem::Pair(a, b) => format!("{a} . {b}"),
            Elem::Published(p, a) => {
                format!("{} . {} : {a} . {}", p.protocol, p.host_port, p.guest_port)
            }
        }
    }
}

fn block_mask(prefix_len: u8) -> Ipv4Addr {
    Ipv4Addr::from(
        u32::MAX
            .checked_shl(32 - u32::from(prefix_len))
            .unwrap_or(0),
    )
}

/// The table's rules, without elements.
fn rules(p: &Policy) -> String {
    let i = &p.if_prefix;
    let m = block_mask(p.block_prefix_len);
    format!(
        r#"	set egress {{ type ipv4_addr; }}
	set peers {{ type ipv4_addr; }}
	set tenant_pairs {{ type ipv4_addr . ipv4_addr; }}
	map published {{ type inet_proto . inet_service : ipv4_addr . inet_service; }}
	chain prerouting {{
		type nat hook prerouting priority dstnat; policy accept;
		meta nfproto ipv4 fib daddr type local dnat ip to meta l4proto . th dport map @published
	}}
	chain output {{
		type nat hook output priority -100; policy accept;
		meta nfproto ipv4 fib daddr type local dnat ip to meta l4proto . th dport map @published
	}}
	chain postrouting {{
		type nat hook postrouting priority srcnat; policy accept;
		oifname "{i}*" ip saddr 127.0.0.0/8 masquerade
		iifname "{i}*" oifname != "{i}*" ip saddr @egress masquerade
	}}
	chain forward {{
		type filter hook forward priority filter; policy accept;
		iifname "{i}*" jump from_vm
		oifname "{i}*" jump to_vm
	}}
	chain from_vm {{
		meta nfproto != ipv4 counter drop
		oifname "{i}*" goto vm_to_vm
		ct state established,related accept
		ip saddr @egress accept
		counter drop
	}}
	chain vm_to_vm {{
		ct state established,related accept
		ct status dnat ip saddr @egress accept
		ip saddr & {m} . ip daddr & {m} @tenant_pairs ip saddr @peers ip daddr @peers accept
		counter drop
	}}
	chain to_vm {{
		ct state established,related accept
		ct status dnat accept
		counter drop
	}}
	chain input {{
		type filter hook input priority filter; policy accept;
		iifname "{i}*" ct state established,related accept
		iifname "{i}*" counter drop
	}}
"#
    )
}

/// The table's comment: names the policy, so a table with other rules
/// (an older zygote, another prefix) is told apart and replaced.
pub(crate) fn marker(p: &Policy) -> String {
    let mut h: u64 = 0xcbf2_9ce4_8422_2325;
    for b in rules(p).bytes() {
        h ^= u64::from(b);
        h = h.wrapping_mul(0x0100_0000_01b3);
    }
    format!("zygote host network, policy {POLICY_VERSION}-{h:016x}")
}

/// The whole table with `elems`, replacing any table of that name in one
/// transaction (the `table; delete table; table {..}` idiom works whether
/// or not it exists).
pub(crate) fn ruleset(p: &Policy, elems: &[Elem]) -> String {
    let t = &p.table;
    let mut s = format!("table inet {t} {{}}\ndelete table inet {t}\ntable inet {t} {{\n");
    let _ = writeln!(s, "\tcomment \"{}\"", marker(p));
    s.push_str(&rules(p));
    s.push_str("}\n");
    for set in ["egress", "peers", "tenant_pairs", "published"] {
        let items: Vec<String> = elems
            .iter()
            .filter(|e| e.set() == set)
            .map(Elem::text)
            .collect();
        if !items.is_empty() {
            let _ = writeln!(s, "add element inet {t} {set} {{ {} }}", items.join(", "));
        }
    }
    s
}

/// Runs `nft -f -` with `text`: the one process spawn of the host
/// network, when the table is installed (not per VM).
pub(crate) fn install(text: &str) -> Result<(), NetError> {
    let mut child = Command::new("nft")
        .args(["-f", "-"])
        .stdin(Stdio::piped())
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .map_err(|source| NetError::NftMissing { source })?;
    let wrote = child.stdin.take().map(|mut i| i.write_all(text.as_bytes()));
    let out = child
        .wait_with_output()
        .map_err(|source| NetError::NftMissing { source })?;
    if !out.status.success() || !matches!(wrote, Some(Ok(()))) {
        return Err(NetError::NftRefused {
            stderr: String::from_utf8_lossy(&out.stderr).trim().to_string(),
        });
    }
    Ok(())
}

/// A netlink attribute, padded to 4 bytes.
fn attr(buf: &mut Vec<u8>, kind: u16, data: &[u8]) {
    let len = u16::try_from(4 + data.len()).unwrap_or(u16::MAX);
    buf.extend_from_slice(&len.to_ne_bytes());
    buf.extend_from_slice(&kind.to_ne_bytes());
    buf.extend_from_slice(data);
    buf.resize(buf.len().next_multiple_of(4), 0);
}

/// Opens a nested attribute; [`nest_end`] writes its length.
fn nest_start(buf: &mut Vec<u8>, kind: u16) -> usize {
    let at = buf.len();
    buf.extend_from_slice(&[0, 0]);
    buf.extend_from_slice(&(kind | NLA_F_NESTED).to_ne_bytes());
    at
}

fn nest_end(buf: &mut [u8], at: usize) {
    let len = u16::try_from(buf.len() - at).unwrap_or(u16::MAX);
    buf[at..at + 2].copy_from_slice(&len.to_ne_bytes());
}

fn cstr(s: &str) -> Vec<u8> {
    let mut v = s.as_bytes().to_vec();
    v.push(0);
    v
}

/// `struct nfgenmsg`.
fn nfgenmsg(family: u8, res_id: u16) -> [u8; 4] {
    let r = res_id.to_be_bytes();
    [family, 0, r[0], r[1]]
}

/// Appends one message: header, nfgenmsg, then `body`.
fn put_msg(
    buf: &mut Vec<u8>,
    kind: u16,
    flags: u16,
    seq: u32,
    family: u8,
    res_id: u16,
    body: &[u8],
) {
    put_header(buf, kind, flags, seq, 4 + body.len());
    buf.extend_from_slice(&nfgenmsg(family, res_id));
    buf.extend_from_slice(body);
}

/// An nf_tables netlink socket in the host's network namespace.
#[derive(Debug)]
pub(crate) struct NftSocket {
    nl: NlSocket,
}

impl NftSocket {
    /// Opens one in the calling thread's network namespace.
    pub fn open() -> std::io::Result<Self> {
        Ok(NftSocket {
            nl: NlSocket::open(netlink_sys::constants::NETLINK_NETFILTER)?,
        })
    }

    /// Table `table`'s comment, `Ok(None)` if there is no such table
    /// (`Some("")` for a table without one).
    pub fn table_comment(&mut self, table: &str) -> Result<Option<String>, NlError> {
        let seq = self.nl.next_seq();
        let mut body = Vec::new();
        attr(&mut body, NFTA_TABLE_NAME, &cstr(table));
        let mut buf = Vec::new();
        put_msg(
            &mut buf,
            (NFNL_SUBSYS_NFTABLES << 8) | NFT_MSG_GETTABLE,
            netlink_packet_core::NLM_F_REQUEST | netlink_packet_core::NLM_F_ACK,
            seq,
            NFPROTO_INET,
            0,
            &body,
        );
        self.nl.send(&buf)?;
        let mut comment = None;
        let r = self.nl.wait_acks(None, seq, seq, |m| {
            let mut attrs = m.payload.get(4..).unwrap_or_default();
            let mut found = String::new();
            while attrs.len() >= 4 {
                let len = u16::from_ne_bytes([attrs[0], attrs[1]]) as usize;
                let kind = u16::from_ne_bytes([attrs[2], attrs[3]]) & 0x3fff;
                if len < 4 || len > attrs.len() {
                    break;
                }
                if kind == NFTA_TABLE_USERDATA {
                    found = udata_comment(&attrs[4..len]).unwrap_or_default();
                }
                attrs = attrs.get((len + 3) & !3..).unwrap_or_default();
            }
            comment = Some(found);
        });
        match r {
            Ok(()) => Ok(comment),
            Err(e) if e.is(libc::ENOENT) => Ok(None),
            Err(e) => Err(e),
        }
    }

    /// Deletes `del` and adds `add` in table `table`, in one transaction:
    /// all of it happens or none.
    pub fn apply(&mut self, table: &str, del: &[Elem], add: &[Elem]) -> Result<(), NlError> {
        if del.is_empty() && add.is_empty() {
            return Ok(());
        }
        let mut buf = Vec::with_capacity(1024);
        let begin = self.nl.next_seq();
        put_msg(
            &mut buf,
            NFNL_MSG_BATCH_BEGIN,
            netlink_packet_core::NLM_F_REQUEST,
            begin,
            0,
            NFNL_SUBSYS_NFTABLES,
            &[],
        );
        let mut first = None;
        let mut last = begin;
        for (elems, kind, flags) in [
            (del, NFT_MSG_DELSETELEM, 0),
            (add, NFT_MSG_NEWSETELEM, netlink_packet_core::NLM_F_CREATE),
        ] {
            for set in ["egress", "peers", "tenant_pairs", "published"] {
                let of_set: Vec<&Elem> = elems.iter().filter(|e| e.set() == set).collect();
                if of_set.is_empty() {
                    continue;
                }
                let mut body = Vec::new();
                attr(&mut body, NFTA_SET_ELEM_LIST_TABLE, &cstr(table));
                attr(&mut body, NFTA_SET_ELEM_LIST_SET, &cstr(set));
                let list = nest_start(&mut body, NFTA_SET_ELEM_LIST_ELEMENTS);
                for e in of_set {
                    let el = nest_start(&mut body, NFTA_LIST_ELEM);
                    let k = nest_start(&mut body, NFTA_SET_ELEM_KEY);
                    attr(&mut body, NFTA_DATA_VALUE, &e.key());
                    nest_end(&mut body, k);
                    if let Some(d) = e.data() {
                        let dn = nest_start(&mut body, NFTA_SET_ELEM_DATA);
                        attr(&mut body, NFTA_DATA_VALUE, &d);
                        nest_end(&mut body, dn);
                    }
                    nest_end(&mut body, el);
                }
                nest_end(&mut body, list);
                last = self.nl.next_seq();
                first.get_or_insert(last);
                put_msg(
                    &mut buf,
                    (NFNL_SUBSYS_NFTABLES << 8) | kind,
                    netlink_packet_core::NLM_F_REQUEST | netlink_packet_core::NLM_F_ACK | flags,
                    last,
                    NFPROTO_INET,
                    0,
                    &body,
                );
            }
        }
        let end = self.nl.next_seq();
        put_msg(
            &mut buf,
            NFNL_MSG_BATCH_END,
            netlink_packet_core::NLM_F_REQUEST,
            end,
            0,
            NFNL_SUBSYS_NFTABLES,
            &[],
        );
        self.nl.send(&buf)?;
        let first = first.unwrap_or(last);
        self.nl.wait_acks(Some(begin), first, last, |_| {})
    }
}

/// The comment in a table's user data (libnftnl's TLVs: type, length,
/// value).
fn udata_comment(mut u: &[u8]) -> Option<String> {
    while u.len() >= 2 {
        let (kind, len) = (u[0], usize::from(u[1]));
        let value = u.get(2..2 + len)?;
        if kind == NFTNL_UDATA_TABLE_COMMENT {
            let s = value.split(|&b| b == 0).next().unwrap_or_default();
            return Some(String::from_utf8_lossy(s).into_owned());
        }
        u = &u[2 + len..];
    }
    None
}

/// Protocol numbers as nf_tables compares them.
impl Protocol {
    /// The IP protocol number.
    pub fn number(self) -> u8 {
        match self {
            Protocol::Tcp => libc::IPPROTO_TCP as u8,
            Protocol::Udp => libc::IPPROTO_UDP as u8,
        }
    }
}
