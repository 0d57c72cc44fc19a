//! The host side of per-VM networking: every VM gets a network namespace
//! of its own with a tap named `tap0` (so a master's device configuration
//! is valid in every clone), routed to the host through a veth pair (no
//! bridge: each VM is its own layer-2 link), an address from a per-host
//! pool, and a firewall that keeps tenants apart.
//!
//! - `pool`: slots (namespace + tap + veth pair), made ahead of time by a
//!   background thread because they are slow to make.
//! - `ipam`: the address allocator, with its state in one directory per
//!   host (`/run/zygote-net/TABLE`), shared by every process of every
//!   state directory.
//! - `nft`: the nftables table `inet zygote` (isolation, egress NAT,
//!   published ports), installed once with `nft`, changed per VM with set
//!   elements over netlink.
//! - `conntrack`: forgets an address's connections when it is given
//!   back.
//! - `netlink`: the sockets and route-netlink requests.
//!
//! A VM's network, step by step (the integrator's part in brackets):
//!
//! 1. [`Network::take_slot`] — a ready slot (microseconds), or one made now.
//! 2. [spawn the VMM with `slot.tap` for its virtio-net device, `--mac
//!    MacAddr::derived(vm_id)`, its jail entering `slot.netns`]
//! 3. [`Network::attach`] — leases an address (owned by the VMM's pid),
//!    adds the two `/32` routes and the firewall elements; returns the
//!    [`proto::NetIdentity`] for the agent's `identity` request.
//! 4. [drop the slot: the namespace then lives as long as the VMM]
//! 5. [`Network::detach`] when the VM ends — or nothing: a lease whose
//!    VMM is gone is reclaimed by [`Network::sweep`], by
//!    [`Network::open`], and whenever the pool runs out of addresses, and
//!    the kernel removes the namespace, tap, veth pair and routes itself.
//!
//! Costs (release build, 2 shared cores, state on tmpfs, warm pool;
//! `net::tests::measure`): `take_slot` p50 6 µs (p99 0.13 ms), `attach`
//! p50 0.18 ms (p99 2.7 ms: the kernel's RTNL lock, shared with namespaces
//! being made and torn down), a slot made in the background p50 3.6 ms,
//! `detach` p50 5.4 ms (the connection-table walk, off the lock),
//! `Network::open` with the table in place 0.13 ms, installing the table
//! (one `nft -f -`) 17 ms. The per-VM path spawns no process: per-VM
//! firewall changes are set elements in one nf_tables netlink
//! transaction, routes are route-netlink requests, the address is a file
//! created with `O_EXCL`.
//!
//! Where this differs from the first sketch, and why: the host ends have
//! no proxy ARP (the namespace's next hop has a static neighbour entry
//! instead, so the host answers ARP for nothing of its own and needs no
//! default route); the per-VM firewall change is netlink, not an `nft`
//! process (an `nft -f -` adding one element takes 4.4 ms here, the
//! netlink transaction about 0.05 ms); a VM's source address is enforced by
//! strict reverse-path filtering on its host end rather than a per-VM
//! rule; an ended lease's connections are deleted before its address is
//! handed out again (`conntrack`), so no stale flow reaches the next VM;
//! published ports are also held by a bound socket (`Attachment::port_holds`)
//! so no host process takes them later.
//!
//! It must not: enter a namespace from a thread it does not own (slots are
//! made in threads of their own), touch any other nftables table or the
//! host's own routes, or keep state outside its directory, the kernel and
//! its own memory. It does not configure the guest (the agent
//! applies [`proto::NetIdentity`]).

mod conntrack;
mod ipam;
mod netlink;
mod nft;
mod pool;
#[cfg(test)]
mod tests;

use std::net::Ipv4Addr;
use std::os::fd::OwnedFd;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use serde::{Deserialize, Serialize};

use self::ipam::{Ipam, Lease, LeaseRequest, Locked};
pub use self::netlink::NlError;
use self::netlink::{NlSocket, RtSocket};
use self::nft::{Elem, NftSocket, Policy};
pub use self::pool::{NetSlot, PoolStats, TAP_NAME};
/// The owner of a lease held until it is detached ([`AttachOptions::owner_pid`]).
pub const PINNED_OWNER: u32 = ipam::PINNED;
use self::pool::{Pool, SlotSpec};
use proto::launch::MacAddr;

/// Errors of the VM network.
#[derive(Debug, thiserror::Error)]
pub enum NetError {
    /// Not root.
    #[error("the VM network needs root (CAP_SYS_ADMIN and CAP_NET_ADMIN, for network namespaces, veth pairs, routes and the firewall): run zygote as root")]
    NotRoot,
    /// A configuration that cannot work.
    #[error("invalid network configuration: {0}")]
    BadConfig(String),
    /// A VM id that cannot name a lease.
    #[error("invalid VM id {0:?} for the network: use 1-128 characters without '/', not starting with '.'")]
    BadVmId(String),
    /// A published port that cannot be parsed.
    #[error("invalid published port {0:?}: write HOSTPORT:GUESTPORT, or HOSTPORT:GUESTPORT/udp, with ports 1-65535")]
    BadPublish(String),
    /// One host port published twice in one request.
    #[error("host port {0} is published twice: give each host port once")]
    DuplicatePublish(Publish),
    /// A network namespace could not be made or entered.
    #[error("cannot create a network namespace: {source} (zygote needs CAP_SYS_ADMIN and a kernel with network namespaces)")]
    Unshare {
        /// The OS error.
        #[source]
        source: std::io::Error,
    },
    /// A network namespace could not be opened.
    #[error("cannot open this thread's network namespace (/proc/thread-self/ns/net): {source} (is /proc mounted?)")]
    Namespace {
        /// The OS error.
        #[source]
        source: std::io::Error,
    },
    /// The tap could not be made.
    #[error("cannot create the VM's tap with /dev/net/tun: {source} (load the tun module: modprobe tun)")]
    Tun {
        /// The OS error.
        #[source]
        source: std::io::Error,
    },
    /// A netlink request failed.
    #[error("cannot {what}: {source}")]
    Netlink {
        /// What was being done.
        what: String,
        /// The kernel's answer.
        #[source]
        source: NlError,
    },
    /// A sysctl could not be set.
    #[error("cannot set {key} to {value}: {source}")]
    Sysctl {
        /// The key under /proc/sys.
        key: String,
        /// The value.
        value: String,
        /// The OS error.
        #[source]
        source: std::io::Error,
    },
    /// `nft` could not be run.
    #[error("cannot run nft to install the firewall table: {source} (install the nftables package: apt-get install nftables)")]
    NftMissing {
        /// The OS error.
        #[source]
        source: std::io::Error,
    },
    /// `nft` refused the table.
    #[error("nft refused the firewall table: {stderr} (the kernel needs nf_tables with NAT, fib and conntrack)")]
    NftRefused {
        /// What nft said.
        stderr: String,
    },
    /// A firewall update failed.
    #[error("cannot update the firewall table {table}: {source}")]
    Nft {
        /// The table.
        table: String,
        /// The kernel's answer.
        #[source]
        source: NlError,
    },
    /// A file of the network state failed.
    #[error("network state {path}: {source}")]
    Store {
        /// The file.
        path: PathBuf,
        /// The OS error.
        #[source]
        source: std::io::Error,
    },
    /// A lease file that cannot be read.
    #[error("network lease {path} cannot be read ({why}); `zygote` removes it at the next sweep")]
    BadLease {
        /// The file.
        path: PathBuf,
        /// What is wrong.
        why: String,
    },
    /// No free address.
    #[error("no free address in {subnet} for {}: end some VMs, or configure a larger subnet", .tenant.as_deref().map_or("the host's admin".to_string(), |t| format!("tenant {t:?}")))]
    Exhausted {
        /// The pool.
        subnet: Ipv4Net,
        /// The tenant that asked.
        tenant: Option<String>,
    },
    /// The VM has a lease already.
    #[error("VM {0:?} already has a network address: detach it first")]
    AlreadyAttached(String),
    /// The slot was attached before.
    #[error("this network slot is attached to VM {0:?} already: take a new slot for each VM")]
    SlotUsed(String),
    /// Another VM publishes the port.
    #[error("host port {publish} is already published by VM {holder:?}: choose another host port")]
    PortTaken {
        /// The port asked for.
        publish: Publish,
        /// The VM that has it.
        holder: String,
    },
    /// A process on the host holds the port.
    #[error("host port {publish} is in use on this host ({source}): choose another host port, or stop what listens on it")]
    PortInUse {
        /// The port asked for.
        publish: Publish,
        /// The bind error.
        #[source]
        source: std::io::Error,
    },
    /// The owner process does not run.
    #[error("process {0} does not run: the owner of a VM's address is its VMM process")]
    NoOwner(u32),
    /// A thread could not be started.
    #[error("cannot start a thread for the VM network: {source}")]
    Thread {
        /// The OS error.
        #[source]
        source: std::io::Error,
    },
}

/// An IPv4 network, written `10.123.0.0/16`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct Ipv4Net {
    /// Its first address (no host bits set).
    pub addr: Ipv4Addr,
    /// Its prefix length.
    pub prefix_len: u8,
}

impl std::fmt::Display for Ipv4Net {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}/{}", self.addr, self.prefix_len)
    }
}

impl std::str::FromStr for Ipv4Net {
    type Err = NetError;
    fn from_str(s: &str) -> Result<Self, NetError> {
        let bad =
            || NetError::BadConfig(format!("{s:?} is not an IPv4 network (like 10.123.0.0/16)"));
        let (a, p) = s.split_once('/').ok_or_else(bad)?;
        let addr: Ipv4Addr = a.parse().map_err(|_| bad())?;
        let prefix_len: u8 = p.parse().map_err(|_| bad())?;
        if prefix_len > 32 {
            return Err(bad());
        }
        let mask = u32::MAX
            .checked_shl(32 - u32::from(prefix_len))
            .unwrap_or(0);
        if u32::from(addr) & !mask != 0 {
            return Err(NetError::BadConfig(format!(
                "{s:?} has host bits set: write {}/{prefix_len}",
                Ipv4Addr::from(u32::from(addr) & mask)
            )));
        }
        Ok(Ipv4Net { addr, prefix_len })
    }
}

/// A transport protocol of a published port.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Protocol {
    /// TCP.
    Tcp,
    /// UDP.
    Udp,
}

impl std::fmt::Display for Protocol {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            Protocol::Tcp => "tcp",
            Protocol::Udp => "udp",
        })
    }
}

/// A published port: connections to `host_port` on any of the host's
/// addresses (`localhost` too) go to `guest_port` on the VM.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub struct Publish {
    /// The host's port.
    pub host_port: u16,
    /// The VM's port.
    pub guest_port: u16,
    /// TCP or UDP.
    pub protocol: Protocol,
}

impl std::fmt::Display for Publish {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "{}:{}/{}",
            self.host_port, self.guest_port, self.protocol
        )
    }
}

impl std::str::FromStr for Publish {
    type Err = NetError;
    /// `HOSTPORT:GUESTPORT`, optionally `/tcp` or `/udp` (the CLI's
    /// `--publish`).
    fn from_str(s: &str) -> Result<Self, NetError> {
        let bad = || NetError::BadPublish(s.to_string());
        let (ports, protocol) = match s.rsplit_once('/') {
            Some((p, "tcp")) => (p, Protocol::Tcp),
            Some((p, "udp")) => (p, Protocol::Udp),
            Some(_) => return Err(bad()),
            None => (s, Protocol::Tcp),
        };
        let (h, g) = ports.split_once(':').ok_or_else(bad)?;
        let port = |p: &str| p.parse::<u16>().ok().filter(|p| *p != 0).ok_or_else(bad);
        Ok(Publish {
            host_port: port(h)?,
            guest_port: port(g)?,
            protocol,
        })
    }
}

/// How the host network is laid out.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct NetConfig {
    /// The pool VM addresses come from; its first host address is every
    /// VM's gateway, and its first block is never handed out.
    pub subnet: Ipv4Net,
    /// The prefix length of a tenant's address block (a /24 of a /16: up
    /// to 254 VMs per block, 255 blocks).
    pub block_prefix_len: u8,
    /// Slots kept ready (0: every slot is made when it is taken).
    pub pool_size: usize,
    /// The prefix of the host ends of the veth pairs (1-3 of `a-z0-9`;
    /// the firewall matches `PREFIX*`, so no other interface may start
    /// with it).
    pub if_prefix: String,
    /// The nftables table (family `inet`).
    pub table: String,
}

impl Default for NetConfig {
    fn default() -> Self {
        NetConfig {
            subnet: Ipv4Net {
                addr: Ipv4Addr::new(10, 123, 0, 0),
                prefix_len: 16,
            },
            block_prefix_len: 24,
            pool_size: 4,
            if_prefix: "zv".into(),
            table: "zygote".into(),
        }
    }
}

impl NetConfig {
    /// The gateway every VM is given (the subnet's first host address).
    pub fn gateway(&self) -> Ipv4Addr {
        Ipv4Addr::from(u32::from(self.subnet.addr) + 1)
    }

    fn check(&self) -> Result<(), NetError> {
        let bad = |m: String| Err(NetError::BadConfig(m));
        let (s, b) = (self.subnet.prefix_len, self.block_prefix_len);
        if !(8..=28).contains(&s) {
            return bad(format!("subnet {} must be a /8 to a /28", self.subnet));
        }
        if b <= s || b > 30 {
            return bad(format!(
                "tenant blocks of /{b} do not fit subnet {}: use a prefix length between /{} and /30",
                self.subnet,
                s + 1
            ));
        }
        let p = &self.if_prefix;
        if p.is_empty()
            || p.len() > 3
            || !p
                .bytes()
                .all(|c| c.is_ascii_lowercase() || c.is_ascii_digit())
        {
            return bad(format!("interface prefix {p:?} must be 1-3 of a-z, 0-9"));
        }
        let t = &self.table;
        if t.is_empty()
            || t.len() > 64
            || !t
                .bytes()
                .all(|c| c.is_ascii_alphanumeric() || c == b'_' || c == b'-')
        {
            return bad(format!(
                "table name {t:?} must be 1-64 of A-Z, a-z, 0-9, '_', '-'"
            ));
        }
        Ok(())
    }
}

/// What a VM's network allows.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct AttachOptions {
    /// Whether it may reach beyond the host (masqueraded as the host).
    pub egress: bool,
    /// Host ports forwarded to it.
    pub publish: Vec<Publish>,
    /// Whether it may talk to its tenant's other VMs that asked for peers.
    pub peers: bool,
    /// The process whose end ends the VM (its VMM), which owns the
    /// address; `None`: the calling process; [`PINNED_OWNER`]: no process,
    /// the address is held until [`Network::detach`] (a master's, which
    /// must never go to one of its clones).
    pub owner_pid: Option<u32>,
    /// With [`PINNED_OWNER`]: a path (the master's state directory) whose
    /// removal ends the lease, so an address is not held forever by a
    /// state directory deleted without `master rm`.
    pub pinned_by: Option<PathBuf>,
}

/// A VM's network, attached.
#[derive(Debug)]
pub struct Attachment {
    /// What the agent is given in the `identity` request.
    pub identity: proto::NetIdentity,
    /// The host end of its veth pair.
    pub host_if: String,
    /// Its published ports.
    pub published: Vec<Publish>,
    /// One bound socket per published port (TCP ones listening, never
    /// accepted: the firewall takes the traffic first): while they are
    /// open no process on the host can take the ports. Keep them as long
    /// as the VM runs (e.g. pass them to its VMM); dropped, the ports are
    /// only protected from other VMs.
    pub port_holds: Vec<OwnedFd>,
}

/// A VM's lease, as `zygote ps` would show it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct NetLease {
    /// The VM.
    pub vm_id: String,
    /// Its tenant.
    pub tenant: Option<String>,
    /// Its address.
    pub address: Ipv4Addr,
    /// The host end of its veth pair.
    pub host_if: String,
    /// Whether it may reach beyond the host.
    pub egress: bool,
    /// Whether it may reach its tenant's peers.
    pub peers: bool,
    /// Its published ports.
    pub publish: Vec<Publish>,
    /// Whether its owner still runs.
    pub alive: bool,
}

impl From<&Lease> for NetLease {
    fn from(l: &Lease) -> Self {
        NetLease {
            vm_id: l.vm_id.clone(),
            tenant: l.tenant.clone(),
            address: l.address,
            host_if: l.host_if.clone(),
            egress: l.egress,
            peers: l.peers,
            publish: l.publish.clone(),
            alive: l.alive(),
        }
    }
}

/// What a sweep reclaimed.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct SweepReport {
    /// VMs whose owner was gone, by id.
    pub released: Vec<String>,
    /// Lease files that could not be read, removed.
    pub unreadable: usize,
    /// Whether the firewall table was (re)installed.
    pub table_installed: bool,
}

/// The host's sockets (host network namespace).
#[derive(Debug)]
struct HostSockets {
    rt: RtSocket,
    nft: NftSocket,
}

/// The VM network of one host and state directory.
#[derive(Debug)]
pub struct Network {
    config: NetConfig,
    policy: Policy,
    ipam: Ipam,
    host: Mutex<HostSockets>,
    /// Conntrack, apart: forgetting an address walks the kernel's whole
    /// table (milliseconds), which must not hold up `attach`.
    ct: Mutex<NlSocket>,
    pool: Arc<Pool>,
    refill: Option<std::thread::JoinHandle<()>>,
}

impl Drop for Network {
    fn drop(&mut self) {
        self.pool.stop();
        if let Some(t) = self.refill.take() {
            let _ = t.join();
        }
    }
}

fn elems_of_lease(l: &Lease) -> Vec<Elem> {
    let mut v = Vec::new();
    if l.egress {
        v.push(Elem::Egress(l.address));
    }
    if l.peers {
        v.push(Elem::Peer(l.address));
    }
    v.extend(l.publish.iter().map(|p| Elem::Published(*p, l.address)));
    v
}

fn elems_of_block(block: Option<&(Ipv4Addr, Vec<Ipv4Addr>)>) -> Vec<Elem> {
    block.map_or_else(Vec::new, |(b, others)| {
        ipam::block_pairs(*b, others)
            .into_iter()
            .map(|(x, y)| Elem::Pair(x, y))
            .collect()
    })
}

/// Binds every published port on the host (all addresses), so that no
/// process holds one and none can take one later.
fn hold_ports(publish: &[Publish]) -> Result<Vec<OwnedFd>, NetError> {
    publish
        .iter()
        .map(|p| {
            let at = (Ipv4Addr::UNSPECIFIED, p.host_port);
            let r = match p.protocol {
                Protocol::Tcp => std::net::TcpListener::bind(at).map(OwnedFd::from),
                Protocol::Udp => std::net::UdpSocket::bind(at).map(OwnedFd::from),
            };
            r.map_err(|source| NetError::PortInUse {
                publish: *p,
                source,
            })
        })
        .collect()
}

impl Network {
    /// Opens the VM network of the state directory `state_dir` (the host
    /// store's root; its state goes in `state_dir/net`): turns on IPv4
    /// forwarding, routes the pool's subnet as unreachable (each VM's
    /// `/32` route is more specific), installs the firewall table if it is missing or has
    /// other rules, reclaims the leases of VMs that are gone, and starts
    /// the pool's refill thread. Call it from a thread in the host's
    /// network namespace.
    pub fn open(config: NetConfig, state_dir: &Path) -> Result<Network, NetError> {
        config.check()?;
        if !rustix::process::geteuid().is_root() {
            return Err(NetError::NotRoot);
        }
        let host_ns = Arc::new(pool::thread_netns()?);
        // Egress and published ports from other machines need the host to
        // forward; the firewall drops what is not the VMs' (and leaves the
        // host's other traffic to the host's own rules).
        if std::fs::read_to_string("/proc/sys/net/ipv4/ip_forward").is_ok_and(|v| v.trim() != "1") {
            pool::sysctl("net/ipv4/ip_forward", "1")?;
            tracing::info!("turned on net.ipv4.ip_forward for the VM network");
        }
        let ipam = Ipam::open(
            &state_dir.join(&config.table),
            config.subnet,
            config.block_prefix_len,
        )?;
        let nl_open = |what: &str, e: std::io::Error| NetError::Netlink {
            what: format!("open a {what} netlink socket"),
            source: e.into(),
        };
        let mut host = HostSockets {
            rt: RtSocket::open().map_err(|e| nl_open("route", e))?,
            nft: NftSocket::open().map_err(|e| nl_open("nf_tables", e))?,
        };
        // An address of the pool that no VM holds (a VM that is gone, say)
        // is unreachable, never sent on through the host's default route.
        host.rt
            .add_unreachable(config.subnet.addr, config.subnet.prefix_len)
            .map_err(|source| NetError::Netlink {
                what: format!("add the route unreachable {}", config.subnet),
                source,
            })?;
        let ct = NlSocket::open(netlink_sys::constants::NETLINK_NETFILTER)
            .map_err(|e| nl_open("conntrack", e))?;
        let policy = Policy {
            table: config.table.clone(),
            if_prefix: config.if_prefix.clone(),
            block_prefix_len: config.block_prefix_len,
        };
        let pool = Pool::new(
            SlotSpec {
                gateway: config.gateway(),
                if_prefix: config.if_prefix.clone(),
                host_ns,
                #[cfg(test)]
                guest_end: false,
            },
            config.pool_size,
        );
        let mut net = Network {
            config,
            policy,
            ipam,
            host: Mutex::new(host),
            ct: Mutex::new(ct),
            pool,
            refill: None,
        };
        {
            let lk = net.ipam.lock()?;
            let mut host = net.host();
            net.sweep_locked(&lk, &mut host, false)?;
        }
        if net.config.pool_size > 0 {
            let pool = net.pool.clone();
            net.refill = Some(
                std::thread::Builder::new()
                    .name("zygote-netpool".into())
                    .spawn(move || pool.refill_loop())
                    .map_err(|source| NetError::Thread { source })?,
            );
        }
        Ok(net)
    }

    /// Its configuration.
    pub fn config(&self) -> &NetConfig {
        &self.config
    }

    fn host(&self) -> std::sync::MutexGuard<'_, HostSockets> {
        self.host.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Every element the table should hold, from the store.
    fn all_elems(&self, lk: &Locked<'_>) -> Result<Vec<Elem>, NetError> {
        let mut v = Vec::new();
        for (_, lease) in lk.leases()? {
            if let Ok(l) = lease {
                v.extend(elems_of_lease(&l));
            }
        }
        for blocks in lk.blocks_by_tenant()? {
            for x in &blocks {
                for y in &blocks {
                    v.push(Elem::Pair(*x, *y));
                }
            }
        }
        Ok(v)
    }

    /// Installs the whole table from the store (replacing what is there).
    fn install_locked(&self, lk: &Locked<'_>) -> Result<(), NetError> {
        nft::install(&nft::ruleset(&self.policy, &self.all_elems(lk)?))
    }

    /// Applies a change of elements; if the kernel's table is not what
    /// the store says (someone flushed the ruleset), installs it whole.
    fn apply_locked(
        &self,
        lk: &Locked<'_>,
        host: &mut HostSockets,
        del: &[Elem],
        add: &[Elem],
    ) -> Result<(), NetError> {
        match host.nft.apply(&self.policy.table, del, add) {
            Ok(()) => Ok(()),
            Err(e) if e.is(libc::ENOENT) || e.is(libc::EEXIST) || e.is(libc::EBUSY) => {
                tracing::warn!(error = %e, table = %self.policy.table, "the firewall table differs from the network state; installing it again");
                self.install_locked(lk)
            }
            Err(source) => Err(NetError::Nft {
                table: self.policy.table.clone(),
                source,
            }),
        }
    }

    /// Forgets the connections of addresses given back (best effort: a
    /// failure is logged, the addresses are freed either way).
    fn forget_connections(&self, addrs: &[Ipv4Addr]) {
        let mut ct = self.ct.lock().unwrap_or_else(|p| p.into_inner());
        for a in addrs {
            if let Err(e) = conntrack::forget(&mut ct, *a) {
                tracing::warn!(address = %a, error = %e, "cannot forget the connections of a released address");
            }
        }
    }

    /// Ends VM `vm_id`'s lease and removes its firewall elements and host
    /// route; its address stays taken until [`Network::finish_locked`].
    fn release_locked(
        &self,
        lk: &Locked<'_>,
        host: &mut HostSockets,
        vm_id: &str,
    ) -> Result<Option<(PathBuf, Ipv4Addr)>, NetError> {
        let Some(r) = lk.release(vm_id)? else {
            return Ok(None);
        };
        let addr = r.lease.address;
        self.apply_locked(lk, host, &elems_of_lease(&r.lease), &[])?;
        host.rt
            .del_route(addr, 32, None)
            .map_err(|source| NetError::Netlink {
                what: format!("remove the route to {addr}"),
                source,
            })?;
        Ok(Some((r.gone, addr)))
    }

    /// Frees the addresses of ended leases (whose connections are
    /// forgotten) and removes the tenant pairs of the blocks that empties.
    fn finish_locked(
        &self,
        lk: &Locked<'_>,
        host: &mut HostSockets,
        gone: &[PathBuf],
    ) -> Result<(), NetError> {
        let mut del = Vec::new();
        for g in gone {
            del.extend(elems_of_block(lk.finish(g)?.as_ref()));
        }
        self.apply_locked(lk, host, &del, &[])
    }

    /// Forgets and frees ended leases, all under the lock (for the rare
    /// paths: sweeps, a dead VM in the way of `attach`).
    fn settle_locked(
        &self,
        lk: &Locked<'_>,
        host: &mut HostSockets,
        gone: &[(PathBuf, Ipv4Addr)],
    ) -> Result<(), NetError> {
        let addrs: Vec<Ipv4Addr> = gone.iter().map(|g| g.1).collect();
        self.forget_connections(&addrs);
        let paths: Vec<PathBuf> = gone.iter().map(|g| g.0.clone()).collect();
        self.finish_locked(lk, host, &paths)
    }

    fn sweep_locked(
        &self,
        lk: &Locked<'_>,
        host: &mut HostSockets,
        force_install: bool,
    ) -> Result<SweepReport, NetError> {
        let (dead, unreadable) = lk.dead_leases()?;
        let mut report = SweepReport {
            unreadable: unreadable.len(),
            ..SweepReport::default()
        };
        let mut del = Vec::new();
        for (path, lease) in dead {
            report.released.push(lease.vm_id.clone());
            let r = lk.release_at(&path, lease)?;
            del.extend(elems_of_lease(&r.lease));
            let _ = host.rt.del_route(r.lease.address, 32, None);
        }
        for path in &unreadable {
            lk.release_unreadable(path)?;
        }
        lk.drop_orphans()?;
        // Every ended lease, also those of a releaser that died mid-way.
        let gone = lk.gone()?;
        let addrs: Vec<Ipv4Addr> = gone.iter().map(|g| g.1).collect();
        self.forget_connections(&addrs);
        for (path, _) in &gone {
            del.extend(elems_of_block(lk.finish(path)?.as_ref()));
        }
        let marker = nft::marker(&self.policy);
        let current = host
            .nft
            .table_comment(&self.policy.table)
            .map_err(|source| NetError::Nft {
                table: self.policy.table.clone(),
                source,
            })?;
        if force_install || !unreadable.is_empty() || current.as_deref() != Some(marker.as_str()) {
            self.install_locked(lk)?;
            report.table_installed = true;
        } else {
            self.apply_locked(lk, host, &del, &[])?;
        }
        for id in &report.released {
            tracing::info!(vm = %id, "released the network address of a VM that is gone");
        }
        Ok(report)
    }

    /// Reclaims the leases of VMs whose owner is gone (their firewall
    /// elements, ports, addresses and connections) and checks the table.
    /// The daemon runs it now and then; [`Network::open`] and an
    /// exhausted pool run it too.
    pub fn sweep(&self) -> Result<SweepReport, NetError> {
        let lk = self.ipam.lock()?;
        let mut host = self.host();
        self.sweep_locked(&lk, &mut host, false)
    }

    /// Installs the firewall table again from the network state (after
    /// someone flushed the ruleset, say).
    pub fn reinstall(&self) -> Result<(), NetError> {
        let lk = self.ipam.lock()?;
        self.install_locked(&lk)
    }

    /// A slot from the pool, or one made now if the pool is empty.
    pub fn take_slot(&self) -> Result<NetSlot, NetError> {
        self.pool.take()
    }

    /// Gives VM `vm_id` of `tenant` its address on `slot`: leases it,
    /// routes it (`ADDRESS/32 dev HOST_IF` on the host, `ADDRESS/32 dev
    /// tap0` in the slot's namespace) and adds its firewall elements;
    /// all or nothing. A published port that another VM or a process on
    /// the host holds is refused ([`NetError::PortTaken`],
    /// [`NetError::PortInUse`]).
    pub fn attach(
        &self,
        slot: &mut NetSlot,
        vm_id: &str,
        tenant: Option<&str>,
        opts: &AttachOptions,
    ) -> Result<Attachment, NetError> {
        ipam::check_vm_id(vm_id)?;
        if let Some(used) = &slot.attached {
            return Err(NetError::SlotUsed(used.clone()));
        }
        for (i, p) in opts.publish.iter().enumerate() {
            if opts.publish[..i]
                .iter()
                .any(|q| q.host_port == p.host_port && q.protocol == p.protocol)
            {
                return Err(NetError::DuplicatePublish(*p));
            }
        }
        let _attaching = self.pool.attaching();
        let owner_pid = opts.owner_pid.unwrap_or_else(std::process::id);
        let owner_start = if owner_pid == ipam::PINNED {
            0
        } else {
            crate::procfs::start_ticks(owner_pid).ok_or(NetError::NoOwner(owner_pid))?
        };

        let lk = self.ipam.lock()?;
        let mut host = self.host();
        // What a VM that is gone left behind does not stand in the way.
        let mut reclaimed = Vec::new();
        if let Some(old) = lk.lease_of(vm_id)? {
            if old.alive() {
                return Err(NetError::AlreadyAttached(vm_id.to_string()));
            }
            reclaimed.extend(self.release_locked(&lk, &mut host, vm_id)?);
        }
        for p in &opts.publish {
            if let Some(holder) = lk.port_holder(p)? {
                match lk.lease_of(&holder).ok().flatten() {
                    Some(l) if l.alive() => {
                        return Err(NetError::PortTaken {
                            publish: *p,
                            holder,
                        })
                    }
                    Some(_) => reclaimed.extend(self.release_locked(&lk, &mut host, &holder)?),
                    None => lk.drop_port_claim(p)?,
                }
            }
        }
        if !reclaimed.is_empty() {
            self.settle_locked(&lk, &mut host, &reclaimed)?;
        }
        let port_holds = hold_ports(&opts.publish)?;
        let req = LeaseRequest {
            vm_id,
            tenant,
            owner_pid,
            owner_start,
            pinned_by: opts
                .pinned_by
                .as_deref()
                .filter(|_| owner_pid == ipam::PINNED),
            host_if: &slot.host_if,
            egress: opts.egress,
            peers: opts.peers,
            publish: &opts.publish,
        };
        let alloc = match lk.allocate(&req) {
            Err(NetError::Exhausted { .. }) => {
                self.sweep_locked(&lk, &mut host, false)?;
                lk.allocate(&req)?
            }
            r => r?,
        };
        let addr = alloc.lease.address;
        // Nothing is in the firewall yet when this runs (a block opened
        // for this lease and closed again has no elements either), and the
        // address has had no connections.
        let undo_lease = || {
            if let Ok(Some(r)) = lk.release(vm_id) {
                let _ = lk.finish(&r.gone);
            }
        };
        if let Err(e) = host.rt.add_route(addr, 32, slot.host_index) {
            undo_lease();
            return Err(NetError::Netlink {
                what: format!("route {addr} to {}", slot.host_if),
                source: e,
            });
        }
        if let Err(e) = slot.rt.add_route(addr, 32, slot.tap_index) {
            let _ = host.rt.del_route(addr, 32, Some(slot.host_index));
            undo_lease();
            return Err(NetError::Netlink {
                what: format!("route {addr} to {TAP_NAME} in the VM's namespace"),
                source: e,
            });
        }
        let mut add = elems_of_lease(&alloc.lease);
        add.extend(elems_of_block(alloc.new_block.as_ref()));
        if let Err(e) = self.apply_locked(&lk, &mut host, &[], &add) {
            let _ = slot.rt.del_route(addr, 32, Some(slot.tap_index));
            let _ = host.rt.del_route(addr, 32, Some(slot.host_index));
            undo_lease();
            // The table may hold some of them if it was installed whole.
            let _ = self.install_locked(&lk);
            return Err(e);
        }
        slot.attached = Some(vm_id.to_string());
        Ok(Attachment {
            identity: proto::NetIdentity {
                interface: "eth0".into(),
                mac: MacAddr::derived(vm_id),
                address: addr,
                prefix_len: self.config.subnet.prefix_len,
                gateway: self.config.gateway(),
            },
            host_if: slot.host_if.clone(),
            published: opts.publish.clone(),
            port_holds,
        })
    }

    /// Ends VM `vm_id`'s network: its firewall elements, its host route
    /// (if its namespace is still there), its published ports, its
    /// connections and its address. `Ok(false)` if it had none.
    ///
    /// Forgetting the connections walks the kernel's connection table
    /// (about 10 ms with 256k buckets); it is done without the lock, the
    /// address staying taken meanwhile.
    pub fn detach(&self, vm_id: &str) -> Result<bool, NetError> {
        ipam::check_vm_id(vm_id)?;
        let released = {
            let lk = self.ipam.lock()?;
            let mut host = self.host();
            self.release_locked(&lk, &mut host, vm_id)?
        };
        let Some((gone, addr)) = released else {
            return Ok(false);
        };
        self.forget_connections(&[addr]);
        let lk = self.ipam.lock()?;
        let mut host = self.host();
        self.finish_locked(&lk, &mut host, &[gone])?;
        Ok(true)
    }

    /// VM `vm_id`'s lease, if it has one.
    pub fn lease(&self, vm_id: &str) -> Result<Option<NetLease>, NetError> {
        let lk = self.ipam.lock()?;
        Ok(lk.lease_of(vm_id)?.as_ref().map(NetLease::from))
    }

    /// Every lease.
    pub fn leases(&self) -> Result<Vec<NetLease>, NetError> {
        let lk = self.ipam.lock()?;
        Ok(lk
            .leases()?
            .into_iter()
            .filter_map(|(_, l)| l.ok())
            .map(|l| NetLease::from(&l))
            .collect())
    }

    /// The pool's counters.
    pub fn pool_stats(&self) -> PoolStats {
        self.pool.stats()
    }

    /// Recent slot build times (µs, up to the last 1024), for
    /// measurements.
    pub fn slot_build_times_us(&self) -> Vec<u64> {
        self.pool.recent_build_us()
    }

    /// Waits until the pool holds `n` ready slots, or `timeout`; whether
    /// it does.
    pub fn wait_pool_ready(&self, n: usize, timeout: Duration) -> bool {
        self.pool.wait_ready(n, timeout)
    }
}
