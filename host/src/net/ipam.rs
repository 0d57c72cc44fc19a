//! The per-host address allocator of the VM network, with its state in
//! one directory per host and firewall table (`/run/zygote-net/TABLE`,
//! whatever the state directory: the addresses, routes and ports it hands
//! out are the host's), so that every process (CLIs, daemons) allocates
//! from one pool:
//!
//! ```text
//! TABLE/lock                         flock'd around every change (and the firewall update that goes with it)
//! TABLE/blocks/N.TENANT/             block N of the pool, held by TENANT ("-": the host's admin, else hex)
//! TABLE/blocks/N.TENANT/A.B.C.D      a lease (JSON: VM id, tenant, owner pid + start time, options)
//! TABLE/blocks/N.TENANT/A.B.C.D.gone a lease ended whose connections are being forgotten
//! TABLE/vms/VM-ID -> ../blocks/N.TENANT/A.B.C.D
//! TABLE/ports/PROTO-PORT             a published host port (its VM id)
//! ```
//!
//! A tenant gets whole blocks of the pool (a /24 of a /16 by default), so
//! the firewall's tenant rule is per block pair, not per VM. Block 0 holds
//! the gateway address and is never handed out. Lease and claim files are
//! created with `O_EXCL` and every change holds the lock (a `flock`, which
//! dies with its holder), so two processes never hand out one address or
//! one host port. A lease names its owner (the VMM) by pid and start time:
//! a lease whose owner is gone (killed with SIGKILL, say) is dead, and
//! [`Locked::dead_leases`] finds it for the caller to release.
//!
//! Ending a lease takes two steps: [`Locked::release`] renames it
//! `A.B.C.D.gone`, which keeps the address from being leased again, and
//! [`Locked::finish`] removes it once the caller has forgotten the
//! address's connections (slow: it walks the kernel's connection table,
//! so the caller does it without the lock). A `.gone` file whose
//! releaser died is found by [`Locked::gone`].
//!
//! It must not touch the network (routes, the firewall): it only says who
//! holds what; `net::Network` applies it.

use std::collections::HashMap;
use std::fs::{File, OpenOptions};
use std::io::Write as _;
use std::net::Ipv4Addr;
use std::os::fd::AsFd as _;
use std::os::unix::fs::{DirBuilderExt as _, OpenOptionsExt as _};
use std::path::{Path, PathBuf};
use std::sync::{Mutex, MutexGuard};

use serde::{Deserialize, Serialize};

use super::{Ipv4Net, NetError, Publish};

/// Version of the lease layout; a lease of another version is dead.
const LEASE_VERSION: u32 = 1;
/// The suffix of an ended lease whose address is not free yet.
const GONE: &str = ".gone";

/// One VM's address and what it asked for.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub(crate) struct Lease {
    /// Layout version.
    pub version: u32,
    /// The VM.
    pub vm_id: String,
    /// Its tenant (`None`: the host's admin).
    pub tenant: Option<String>,
    /// Its address.
    pub address: Ipv4Addr,
    /// The process whose end ends the VM (its VMM).
    pub owner_pid: u32,
    /// That process's start time (`procfs::Stat::start_ticks`).
    pub owner_start: u64,
    /// The host end of its veth pair.
    pub host_if: String,
    /// Whether it may reach beyond the host.
    pub egress: bool,
    /// Whether it may reach its tenant's other peers.
    pub peers: bool,
    /// Its published ports.
    pub publish: Vec<Publish>,
    /// When it was leased (Unix seconds).
    pub created_unix_s: u64,
    /// A pinned lease's keeper: the lease lives while this path exists
    /// (a master's directory: a state directory removed without `master
    /// rm` does not keep its master's address forever).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub pinned_by: Option<PathBuf>,
}

/// The owner "pid" of a lease that no process holds: it lives until it is
/// released (a master's address, kept from its clones).
pub(crate) const PINNED: u32 = 0;

impl Lease {
    /// Whether its owner still runs (a pinned lease: while its keeper
    /// exists, if it has one).
    pub fn alive(&self) -> bool {
        if self.owner_pid == PINNED {
            return self.pinned_by.as_ref().is_none_or(|p| p.exists());
        }
        crate::procfs::is_same_live_process(self.owner_pid, self.owner_start)
    }
}

/// What a new lease asks for.
#[derive(Debug, Clone)]
pub(crate) struct LeaseRequest<'a> {
    pub vm_id: &'a str,
    pub tenant: Option<&'a str>,
    pub owner_pid: u32,
    pub owner_start: u64,
    pub pinned_by: Option<&'a Path>,
    pub host_if: &'a str,
    pub egress: bool,
    pub peers: bool,
    pub publish: &'a [Publish],
}

/// A lease made, and the block it opened for its tenant, if any.
#[derive(Debug, Clone)]
pub(crate) struct Allocation {
    pub lease: Lease,
    /// A block claimed for this lease, with the tenant's other blocks.
    pub new_block: Option<(Ipv4Addr, Vec<Ipv4Addr>)>,
}

/// A lease ended; its address stays taken until [`Locked::finish`].
#[derive(Debug, Clone)]
pub(crate) struct Release {
    pub lease: Lease,
    /// The `.gone` file that holds the address.
    pub gone: PathBuf,
}

/// A block given back, with the tenant's blocks that remain.
pub(crate) type FreedBlock = (Ipv4Addr, Vec<Ipv4Addr>);

/// A lease file and what it holds (an error if it cannot be read).
pub(crate) type LeaseFile = (PathBuf, Result<Lease, NetError>);

/// The leases whose owner is gone, with their files, and the files that
/// are no lease.
pub(crate) type DeadLeases = (Vec<(PathBuf, Lease)>, Vec<PathBuf>);

/// A block of the pool as its directory names it.
#[derive(Debug, Clone, PartialEq, Eq)]
struct Block {
    index: u32,
    tenant_key: String,
}

impl Block {
    fn dir_name(&self) -> String {
        format!("{}.{}", self.index, self.tenant_key)
    }

    fn parse(name: &str) -> Option<Block> {
        let (n, key) = name.split_once('.')?;
        Some(Block {
            index: n.parse().ok()?,
            tenant_key: key.to_string(),
        })
    }
}

/// How a tenant is named in block directories.
fn tenant_key(tenant: Option<&str>) -> String {
    match tenant {
        None => "-".to_string(),
        Some(t) => t.bytes().map(|b| format!("{b:02x}")).collect(),
    }
}

/// Checks a VM id used as a file name.
pub(crate) fn check_vm_id(id: &str) -> Result<(), NetError> {
    let ok = !id.is_empty() && id.len() <= 128 && !id.starts_with('.') && !id.contains(['/', '\0']);
    if ok {
        Ok(())
    } else {
        Err(NetError::BadVmId(id.to_string()))
    }
}

fn io(path: &Path) -> impl FnOnce(std::io::Error) -> NetError + '_ {
    move |source| NetError::Store {
        path: path.to_path_buf(),
        source,
    }
}

fn mkdir(path: &Path) -> Result<(), NetError> {
    std::fs::DirBuilder::new()
        .recursive(true)
        .mode(0o700)
        .create(path)
        .map_err(io(path))
}

/// Names in a directory (none if it does not exist).
fn names(dir: &Path) -> Result<Vec<String>, NetError> {
    match std::fs::read_dir(dir) {
        Ok(rd) => Ok(rd
            .flatten()
            .filter_map(|e| e.file_name().into_string().ok())
            .collect()),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(Vec::new()),
        Err(e) => Err(NetError::Store {
            path: dir.to_path_buf(),
            source: e,
        }),
    }
}

/// Creates `path` with `O_EXCL` holding `content`; `Ok(false)` if it exists.
fn create_new(path: &Path, content: &[u8]) -> Result<bool, NetError> {
    let mut f = match OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(0o600)
        .open(path)
    {
        Ok(f) => f,
        Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists => return Ok(false),
        Err(e) => return Err(io(path)(e)),
    };
    if let Err(e) = f.write_all(content) {
        let _ = std::fs::remove_file(path);
        return Err(io(path)(e));
    }
    Ok(true)
}

fn remove(path: &Path) -> Result<(), NetError> {
    match std::fs::remove_file(path) {
        Err(e) if e.kind() != std::io::ErrorKind::NotFound => Err(io(path)(e)),
        _ => Ok(()),
    }
}

/// The allocator of one state directory.
#[derive(Debug)]
pub(crate) struct Ipam {
    dir: PathBuf,
    subnet: Ipv4Net,
    block_prefix_len: u8,
    /// The lock file; the mutex orders this process's threads (a flock is
    /// per open file, so it alone would not).
    lock: Mutex<File>,
    /// Per block, the host number handed out last: the next lease takes
    /// the next free one, so a released address is not reused at once.
    cursor: Mutex<HashMap<u32, u32>>,
}

impl Ipam {
    /// The allocator with its state in `dir` (created if missing).
    pub fn open(dir: &Path, subnet: Ipv4Net, block_prefix_len: u8) -> Result<Ipam, NetError> {
        for sub in ["blocks", "vms", "ports"] {
            mkdir(&dir.join(sub))?;
        }
        let path = dir.join("lock");
        let lock = OpenOptions::new()
            .read(true)
            .write(true)
            .create(true)
            .truncate(false)
            .mode(0o600)
            .open(&path)
            .map_err(io(&path))?;
        Ok(Ipam {
            dir: dir.to_path_buf(),
            subnet,
            block_prefix_len,
            lock: Mutex::new(lock),
            cursor: Mutex::new(HashMap::new()),
        })
    }

    /// Takes the lock (this process's threads and every other process).
    pub fn lock(&self) -> Result<Locked<'_>, NetError> {
        let file = self.lock.lock().unwrap_or_else(|p| p.into_inner());
        rustix::fs::flock(file.as_fd(), rustix::fs::FlockOperation::LockExclusive).map_err(
            |e| NetError::Store {
                path: self.dir.join("lock"),
                source: e.into(),
            },
        )?;
        Ok(Locked { ipam: self, file })
    }

    /// Addresses per block (including the unused first and last).
    fn block_size(&self) -> u32 {
        1 << (32 - u32::from(self.block_prefix_len))
    }

    /// Blocks in the pool.
    fn block_count(&self) -> u32 {
        1 << u32::from(self.block_prefix_len - self.subnet.prefix_len)
    }

    /// The network address of block `index`.
    pub fn block_addr(&self, index: u32) -> Ipv4Addr {
        Ipv4Addr::from(u32::from(self.subnet.addr) + index * self.block_size())
    }
}

/// The allocator, locked: every read and change goes through this.
#[derive(Debug)]
pub(crate) struct Locked<'a> {
    ipam: &'a Ipam,
    file: MutexGuard<'a, File>,
}

impl Drop for Locked<'_> {
    fn drop(&mut self) {
        let _ = rustix::fs::flock(self.file.as_fd(), rustix::fs::FlockOperation::Unlock);
    }
}

impl Locked<'_> {
    fn blocks(&self) -> Result<Vec<Block>, NetError> {
        let mut v: Vec<Block> = names(&self.ipam.dir.join("blocks"))?
            .iter()
            .filter_map(|n| Block::parse(n))
            .collect();
        v.sort_by_key(|b| b.index);
        Ok(v)
    }

    fn block_dir(&self, b: &Block) -> PathBuf {
        self.ipam.dir.join("blocks").join(b.dir_name())
    }

    fn vm_link(&self, vm_id: &str) -> PathBuf {
        self.ipam.dir.join("vms").join(vm_id)
    }

    fn port_path(&self, p: &Publish) -> PathBuf {
        self.ipam
            .dir
            .join("ports")
            .join(format!("{}-{}", p.protocol, p.host_port))
    }

    fn read_lease(path: &Path) -> Result<Lease, NetError> {
        let text = std::fs::read(path).map_err(io(path))?;
        let lease: Lease = serde_json::from_slice(&text).map_err(|e| NetError::BadLease {
            path: path.to_path_buf(),
            why: e.to_string(),
        })?;
        if lease.version != LEASE_VERSION {
            return Err(NetError::BadLease {
                path: path.to_path_buf(),
                why: format!(
                    "lease version {} (this zygote writes {LEASE_VERSION})",
                    lease.version
                ),
            });
        }
        Ok(lease)
    }

    /// VM `vm_id`'s lease, if it has one.
    pub fn lease_of(&self, vm_id: &str) -> Result<Option<Lease>, NetError> {
        check_vm_id(vm_id)?;
        let link = self.vm_link(vm_id);
        match std::fs::read_link(&link) {
            Ok(target) => match Self::read_lease(&link.parent().unwrap_or(&link).join(target)) {
                Ok(l) => Ok(Some(l)),
                Err(NetError::Store { source, .. })
                    if source.kind() == std::io::ErrorKind::NotFound =>
                {
                    let _ = std::fs::remove_file(&link);
                    Ok(None)
                }
                Err(e) => Err(e),
            },
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(None),
            Err(e) => Err(io(&link)(e)),
        }
    }

    /// Every lease, readable or not (a lease that cannot be read was left
    /// by a writer that died mid-way: it is dead).
    pub fn leases(&self) -> Result<Vec<LeaseFile>, NetError> {
        let mut out = Vec::new();
        for b in self.blocks()? {
            let dir = self.block_dir(&b);
            for n in names(&dir)?.iter().filter(|n| !n.ends_with(GONE)) {
                let path = dir.join(n);
                let lease = Self::read_lease(&path);
                out.push((path, lease));
            }
        }
        Ok(out)
    }

    /// The VM holding published port `p`, if any.
    pub fn port_holder(&self, p: &Publish) -> Result<Option<String>, NetError> {
        let path = self.port_path(p);
        match std::fs::read_to_string(&path) {
            Ok(s) => Ok(Some(s)),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(None),
            Err(e) => Err(io(&path)(e)),
        }
    }

    /// Removes the claim on published port `p` (one whose VM has no lease).
    pub fn drop_port_claim(&self, p: &Publish) -> Result<(), NetError> {
        remove(&self.port_path(p))
    }

    /// The blocks of `tenant`, by network address.
    pub fn tenant_blocks(&self, tenant: Option<&str>) -> Result<Vec<Ipv4Addr>, NetError> {
        let key = tenant_key(tenant);
        Ok(self
            .blocks()?
            .iter()
            .filter(|b| b.tenant_key == key)
            .map(|b| self.ipam.block_addr(b.index))
            .collect())
    }

    /// Every block, grouped by tenant, by network address.
    pub fn blocks_by_tenant(&self) -> Result<Vec<Vec<Ipv4Addr>>, NetError> {
        let mut by: std::collections::BTreeMap<String, Vec<Ipv4Addr>> = Default::default();
        for b in self.blocks()? {
            by.entry(b.tenant_key.clone())
                .or_default()
                .push(self.ipam.block_addr(b.index));
        }
        Ok(by.into_values().collect())
    }

    /// A free host number in `block`, after the one handed out last.
    fn free_host(&self, block: &Block) -> Result<Option<u32>, NetError> {
        let base = u32::from(self.ipam.block_addr(block.index));
        let used: std::collections::HashSet<u32> = names(&self.block_dir(block))?
            .iter()
            .filter_map(|n| n.strip_suffix(GONE).unwrap_or(n).parse::<Ipv4Addr>().ok())
            .map(|a| u32::from(a).wrapping_sub(base))
            .collect();
        let hosts = self.ipam.block_size() - 2; // not the first and last address
        let mut cursor = self.ipam.cursor.lock().unwrap_or_else(|p| p.into_inner());
        let last = cursor.get(&block.index).copied().unwrap_or(0);
        let pick = (0..hosts)
            .map(|i| (last + i) % hosts + 1)
            .find(|h| !used.contains(h));
        if let Some(h) = pick {
            cursor.insert(block.index, h);
        }
        Ok(pick)
    }

    /// Leases an address to `req.vm_id` and claims its published ports,
    /// all or nothing. Fails with [`NetError::AlreadyAttached`],
    /// [`NetError::PortTaken`] or [`NetError::Exhausted`] without a trace.
    pub fn allocate(&self, req: &LeaseRequest<'_>) -> Result<Allocation, NetError> {
        check_vm_id(req.vm_id)?;
        if self.lease_of(req.vm_id)?.is_some() {
            return Err(NetError::AlreadyAttached(req.vm_id.to_string()));
        }
        let key = tenant_key(req.tenant);
        let blocks = self.blocks()?;
        let mut new_block = None;
        let mut chosen = None;
        for b in blocks.iter().filter(|b| b.tenant_key == key) {
            if let Some(h) = self.free_host(b)? {
                chosen = Some((b.clone(), h));
                break;
            }
        }
        if chosen.is_none() {
            let taken: std::collections::HashSet<u32> = blocks.iter().map(|b| b.index).collect();
            let Some(index) = (1..self.ipam.block_count()).find(|i| !taken.contains(i)) else {
                return Err(NetError::Exhausted {
                    subnet: self.ipam.subnet,
                    tenant: req.tenant.map(str::to_string),
                });
            };
            let b = Block {
                index,
                tenant_key: key.clone(),
            };
            std::fs::DirBuilder::new()
                .mode(0o700)
                .create(self.block_dir(&b))
                .map_err(io(&self.block_dir(&b)))?;
            let others = self.tenant_blocks(req.tenant)?;
            let addr = self.ipam.block_addr(index);
            new_block = Some((
                addr,
                others
                    .into_iter()
                    .filter(|a| *a != addr)
                    .collect::<Vec<_>>(),
            ));
            let h = self.free_host(&b)?.unwrap_or(1);
            chosen = Some((b, h));
        }
        let Some((block, host)) = chosen else {
            unreachable!("a block was found or made above")
        };
        let address = Ipv4Addr::from(u32::from(self.ipam.block_addr(block.index)) + host);
        let lease = Lease {
            version: LEASE_VERSION,
            vm_id: req.vm_id.to_string(),
            tenant: req.tenant.map(str::to_string),
            address,
            owner_pid: req.owner_pid,
            owner_start: req.owner_start,
            host_if: req.host_if.to_string(),
            egress: req.egress,
            peers: req.peers,
            publish: req.publish.to_vec(),
            created_unix_s: crate::store::unix_now(),
            pinned_by: req.pinned_by.map(Path::to_path_buf),
        };
        let undo_block = |this: &Self| {
            if new_block.is_some() {
                let _ = std::fs::remove_dir(this.block_dir(&block));
            }
        };
        let path = self.block_dir(&block).join(address.to_string());
        let json = serde_json::to_vec_pretty(&lease).map_err(|e| NetError::BadLease {
            path: path.clone(),
            why: e.to_string(),
        })?;
        if !create_new(&path, &json)? {
            undo_block(self);
            return Err(NetError::Store {
                path,
                source: std::io::Error::from(std::io::ErrorKind::AlreadyExists),
            });
        }
        let link = self.vm_link(req.vm_id);
        let target = Path::new("../blocks")
            .join(block.dir_name())
            .join(address.to_string());
        if let Err(e) = std::os::unix::fs::symlink(&target, &link) {
            let _ = std::fs::remove_file(&path);
            undo_block(self);
            return Err(if e.kind() == std::io::ErrorKind::AlreadyExists {
                NetError::AlreadyAttached(req.vm_id.to_string())
            } else {
                io(&link)(e)
            });
        }
        let mut claimed = Vec::new();
        for p in req.publish {
            let r = create_new(&self.port_path(p), req.vm_id.as_bytes());
            if !matches!(r, Ok(true)) {
                for c in &claimed {
                    let _ = remove(&self.port_path(c));
                }
                let _ = std::fs::remove_file(&link);
                let _ = std::fs::remove_file(&path);
                undo_block(self);
                r?;
                return Err(NetError::PortTaken {
                    publish: *p,
                    holder: self.port_holder(p)?.unwrap_or_default(),
                });
            }
            claimed.push(*p);
        }
        Ok(Allocation { lease, new_block })
    }

    /// Ends VM `vm_id`'s lease: its ports are free at once, its address
    /// once [`Locked::finish`] is called with [`Release::gone`].
    /// `Ok(None)` if it had none.
    pub fn release(&self, vm_id: &str) -> Result<Option<Release>, NetError> {
        let Some(lease) = self.lease_of(vm_id)? else {
            return Ok(None);
        };
        let link = self.vm_link(vm_id);
        let target = std::fs::read_link(&link).map_err(io(&link))?;
        // `../blocks/N.TENANT/ADDRESS`, relative to `vms/`.
        let path = match target.strip_prefix("..") {
            Ok(rel) => self.ipam.dir.join(rel),
            Err(_) => self.ipam.dir.join("vms").join(target),
        };
        self.release_at(&path, lease).map(Some)
    }

    /// Ends the lease in file `path` (as [`Locked::dead_leases`] found
    /// it, with or without its VM's link), like [`Locked::release`].
    pub fn release_at(&self, path: &Path, lease: Lease) -> Result<Release, NetError> {
        for p in &lease.publish {
            if self.port_holder(p)?.as_deref() == Some(lease.vm_id.as_str()) {
                remove(&self.port_path(p))?;
            }
        }
        let gone = gone_path(path);
        std::fs::rename(path, &gone).map_err(io(path))?;
        let link = self.vm_link(&lease.vm_id);
        if std::fs::read_link(&link).is_ok_and(|t| t.file_name() == path.file_name()) {
            remove(&link)?;
        }
        Ok(Release { lease, gone })
    }

    /// Frees the address of an ended lease (its `.gone` file), and its
    /// block if that was the block's last address.
    pub fn finish(&self, gone: &Path) -> Result<Option<FreedBlock>, NetError> {
        remove(gone)?;
        self.drop_block_if_empty(gone.parent())
    }

    /// Ends a lease file that cannot be read (its writer died): its
    /// address is in its name.
    pub fn release_unreadable(&self, path: &Path) -> Result<PathBuf, NetError> {
        let gone = gone_path(path);
        std::fs::rename(path, &gone).map_err(io(path))?;
        Ok(gone)
    }

    /// Every ended lease whose address is not free yet, with its address.
    pub fn gone(&self) -> Result<Vec<(PathBuf, Ipv4Addr)>, NetError> {
        let mut out = Vec::new();
        for b in self.blocks()? {
            let dir = self.block_dir(&b);
            for n in names(&dir)? {
                if let Some(a) = n.strip_suffix(GONE).and_then(|a| a.parse().ok()) {
                    out.push((dir.join(&n), a));
                }
            }
        }
        Ok(out)
    }

    fn drop_block_if_empty(&self, dir: Option<&Path>) -> Result<Option<FreedBlock>, NetError> {
        let Some(dir) = dir else { return Ok(None) };
        let Some(block) = dir
            .file_name()
            .and_then(|n| n.to_str())
            .and_then(Block::parse)
        else {
            return Ok(None);
        };
        if !dir.exists() || !names(dir)?.is_empty() {
            return Ok(None);
        }
        match std::fs::remove_dir(dir) {
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(None),
            r => r.map_err(io(dir))?,
        }
        let addr = self.ipam.block_addr(block.index);
        let left = self
            .blocks()?
            .iter()
            .filter(|b| b.tenant_key == block.tenant_key)
            .map(|b| self.ipam.block_addr(b.index))
            .collect();
        Ok(Some((addr, left)))
    }

    /// Links and port claims whose VM has no lease any more.
    pub fn drop_orphans(&self) -> Result<(), NetError> {
        let vms = self.ipam.dir.join("vms");
        for n in names(&vms)? {
            let _ = self.lease_of(&n); // removes a dangling link
        }
        let ports = self.ipam.dir.join("ports");
        for n in names(&ports)? {
            let path = ports.join(&n);
            let holder = std::fs::read_to_string(&path).unwrap_or_default();
            if check_vm_id(&holder).is_err() || self.lease_of(&holder)?.is_none() {
                remove(&path)?;
            }
        }
        Ok(())
    }

    /// The leases whose owner is gone (with their files), and the files
    /// that are no lease.
    pub fn dead_leases(&self) -> Result<DeadLeases, NetError> {
        let mut dead = Vec::new();
        let mut unreadable = Vec::new();
        for (path, lease) in self.leases()? {
            match lease {
                Ok(l) if !l.alive() => dead.push((path, l)),
                Ok(_) => {}
                Err(_) => unreadable.push(path),
            }
        }
        Ok((dead, unreadable))
    }
}

/// Where an ended lease waits for its address to be freed.
fn gone_path(path: &Path) -> PathBuf {
    let mut s = path.as_os_str().to_os_string();
    s.push(GONE);
    PathBuf::from(s)
}

/// The tenant-pair elements a block adds or removes: with itself and,
/// both ways, with each of the tenant's other blocks.
pub(crate) fn block_pairs(block: Ipv4Addr, others: &[Ipv4Addr]) -> Vec<(Ipv4Addr, Ipv4Addr)> {
    let mut v = vec![(block, block)];
    for o in others.iter().filter(|o| **o != block) {
        v.push((block, *o));
        v.push((*o, block));
    }
    v
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::net::Protocol;

    fn net() -> Ipv4Net {
        "10.77.0.0/16".parse().unwrap()
    }

    fn me() -> (u32, u64) {
        let pid = std::process::id();
        (pid, crate::procfs::start_ticks(pid).unwrap())
    }

    fn req<'a>(vm: &'a str, tenant: Option<&'a str>, publish: &'a [Publish]) -> LeaseRequest<'a> {
        let (pid, start) = me();
        LeaseRequest {
            vm_id: vm,
            tenant,
            owner_pid: pid,
            owner_start: start,
            pinned_by: None,
            host_if: "zvtest",
            egress: false,
            peers: true,
            publish,
        }
    }

    #[test]
    fn tenants_get_their_own_blocks_and_never_the_gateways() {
        let dir = tempfile::tempdir().unwrap();
        let ipam = Ipam::open(dir.path(), net(), 24).unwrap();
        let lk = ipam.lock().unwrap();
        let a1 = lk.allocate(&req("a1", Some("acme"), &[])).unwrap();
        let a2 = lk.allocate(&req("a2", Some("acme"), &[])).unwrap();
        let b1 = lk.allocate(&req("b1", Some("bolt"), &[])).unwrap();
        let admin = lk.allocate(&req("x1", None, &[])).unwrap();
        assert_eq!(a1.lease.address, Ipv4Addr::new(10, 77, 1, 1));
        assert_eq!(a2.lease.address, Ipv4Addr::new(10, 77, 1, 2));
        assert_eq!(b1.lease.address, Ipv4Addr::new(10, 77, 2, 1));
        assert_eq!(admin.lease.address, Ipv4Addr::new(10, 77, 3, 1));
        assert_eq!(
            a1.new_block,
            Some((Ipv4Addr::new(10, 77, 1, 0), vec![])),
            "the first lease of a tenant opens its block"
        );
        assert!(a2.new_block.is_none());
        // Releasing the last lease of a block frees it, once its address
        // is free.
        let r1 = lk.release("a1").unwrap().unwrap();
        assert!(lk.finish(&r1.gone).unwrap().is_none());
        let r2 = lk.release("a2").unwrap().unwrap();
        assert!(lk.release("a2").unwrap().is_none(), "released twice");
        assert!(lk.lease_of("a2").unwrap().is_none());
        assert_eq!(
            lk.gone().unwrap(),
            vec![(r2.gone.clone(), r2.lease.address)]
        );
        assert_eq!(
            lk.finish(&r2.gone).unwrap(),
            Some((Ipv4Addr::new(10, 77, 1, 0), vec![]))
        );
        assert!(lk.gone().unwrap().is_empty());
        assert!(lk.tenant_blocks(Some("acme")).unwrap().is_empty());
    }

    #[test]
    fn a_full_block_opens_another() {
        let dir = tempfile::tempdir().unwrap();
        // /28 blocks: 14 hosts each.
        let ipam = Ipam::open(dir.path(), net(), 28).unwrap();
        let lk = ipam.lock().unwrap();
        let ids: Vec<String> = (0..15).map(|i| format!("vm{i}")).collect();
        let mut addrs = Vec::new();
        for id in &ids {
            addrs.push(lk.allocate(&req(id, Some("t"), &[])).unwrap());
        }
        assert_eq!(addrs[13].lease.address, Ipv4Addr::new(10, 77, 0, 16 + 14));
        let (block, others) = addrs[14].new_block.clone().expect("a second block");
        assert_eq!(block, Ipv4Addr::new(10, 77, 0, 32));
        assert_eq!(others, vec![Ipv4Addr::new(10, 77, 0, 16)]);
        assert_eq!(addrs[14].lease.address, Ipv4Addr::new(10, 77, 0, 33));
        assert_eq!(
            block_pairs(block, &others),
            vec![
                (block, block),
                (block, Ipv4Addr::new(10, 77, 0, 16)),
                (Ipv4Addr::new(10, 77, 0, 16), block)
            ]
        );
        // An ended lease keeps its address until it is finished; then the
        // freed place in the first block is used before the second.
        let r = lk.release("vm3").unwrap().unwrap();
        let next = lk.allocate(&req("vm3b", Some("t"), &[])).unwrap();
        assert_eq!(next.lease.address, Ipv4Addr::new(10, 77, 0, 34));
        lk.finish(&r.gone).unwrap();
        let again = lk.allocate(&req("vm3c", Some("t"), &[])).unwrap();
        assert_eq!(again.lease.address, addrs[3].lease.address);
    }

    #[test]
    fn a_released_address_is_not_reused_at_once() {
        let dir = tempfile::tempdir().unwrap();
        let ipam = Ipam::open(dir.path(), net(), 24).unwrap();
        let lk = ipam.lock().unwrap();
        for id in ["a", "b", "c"] {
            lk.allocate(&req(id, None, &[])).unwrap();
        }
        let r = lk.release("b").unwrap().unwrap();
        lk.finish(&r.gone).unwrap();
        let d = lk.allocate(&req("d", None, &[])).unwrap();
        assert_eq!(
            d.lease.address,
            Ipv4Addr::new(10, 77, 1, 4),
            "not .2, given back just now"
        );
    }

    #[test]
    fn an_exhausted_pool_is_a_clear_error() {
        let dir = tempfile::tempdir().unwrap();
        // A /29 pool of /30 blocks: block 0 is the gateway's, block 1 has 2 hosts.
        let ipam = Ipam::open(dir.path(), "10.77.0.0/29".parse().unwrap(), 30).unwrap();
        let lk = ipam.lock().unwrap();
        lk.allocate(&req("a", None, &[])).unwrap();
        lk.allocate(&req("b", None, &[])).unwrap();
        let e = lk.allocate(&req("c", None, &[])).unwrap_err();
        assert!(matches!(e, NetError::Exhausted { .. }), "{e}");
        assert!(e.to_string().contains("10.77.0.0/29"), "{e}");
        assert!(lk.lease_of("c").unwrap().is_none());
    }

    #[test]
    fn a_taken_port_or_vm_is_refused_and_leaves_nothing() {
        let dir = tempfile::tempdir().unwrap();
        let ipam = Ipam::open(dir.path(), net(), 24).unwrap();
        let lk = ipam.lock().unwrap();
        let web = Publish {
            host_port: 8080,
            guest_port: 80,
            protocol: Protocol::Tcp,
        };
        let dns = Publish {
            host_port: 5353,
            guest_port: 53,
            protocol: Protocol::Udp,
        };
        lk.allocate(&req("a", Some("t"), &[web])).unwrap();
        let e = lk.allocate(&req("b", Some("u"), &[dns, web])).unwrap_err();
        match &e {
            NetError::PortTaken { publish, holder } => {
                assert_eq!(*publish, web);
                assert_eq!(holder, "a");
            }
            other => panic!("{other}"),
        }
        assert!(lk.lease_of("b").unwrap().is_none());
        assert_eq!(
            lk.port_holder(&dns).unwrap(),
            None,
            "the claim made before the failure is undone"
        );
        assert_eq!(
            lk.tenant_blocks(Some("u")).unwrap(),
            Vec::<Ipv4Addr>::new(),
            "the block opened for it is given back"
        );
        // UDP and TCP ports are distinct.
        let udp_web = Publish {
            protocol: Protocol::Udp,
            ..web
        };
        lk.allocate(&req("c", Some("t"), &[udp_web])).unwrap();
        assert!(matches!(
            lk.allocate(&req("a", Some("t"), &[])).unwrap_err(),
            NetError::AlreadyAttached(_)
        ));
        lk.release("a").unwrap();
        assert_eq!(
            lk.port_holder(&web).unwrap(),
            None,
            "a port is free at once"
        );
    }

    #[test]
    fn leases_are_unique_across_threads() {
        let dir = tempfile::tempdir().unwrap();
        let ipam = std::sync::Arc::new(Ipam::open(dir.path(), net(), 24).unwrap());
        let threads: Vec<_> = (0..8)
            .map(|t| {
                let ipam = ipam.clone();
                std::thread::spawn(move || {
                    (0..40)
                        .map(|i| {
                            let id = format!("t{t}-{i}");
                            let lk = ipam.lock().unwrap();
                            lk.allocate(&req(&id, Some(["a", "b"][t % 2]), &[]))
                                .unwrap()
                                .lease
                                .address
                        })
                        .collect::<Vec<_>>()
                })
            })
            .collect();
        let all: Vec<Ipv4Addr> = threads
            .into_iter()
            .flat_map(|t| t.join().unwrap())
            .collect();
        let unique: std::collections::HashSet<_> = all.iter().collect();
        assert_eq!(unique.len(), 320);
    }

    /// Run by `leases_are_unique_across_processes_and_swept_after_sigkill`
    /// in child processes: leases `ZYGOTE_IPAM_COUNT` addresses in
    /// `ZYGOTE_IPAM_DIR`, prints them, then waits (to be killed) if
    /// `ZYGOTE_IPAM_WAIT` is set.
    #[test]
    #[ignore = "a helper process of another test"]
    fn ipam_helper_process() {
        let Some(dir) = std::env::var_os("ZYGOTE_IPAM_DIR") else {
            return;
        };
        let count: usize = std::env::var("ZYGOTE_IPAM_COUNT").unwrap().parse().unwrap();
        let tag = std::process::id();
        let ipam = Ipam::open(Path::new(&dir), net(), 24).unwrap();
        let mut out = String::new();
        for i in 0..count {
            let id = format!("p{tag}-{i}");
            let lk = ipam.lock().unwrap();
            let a = lk.allocate(&req(&id, Some("shared"), &[])).unwrap();
            out.push_str(&format!("{}\n", a.lease.address));
        }
        // After a newline: the harness may have begun a line ("test ... ").
        print!("\nLEASES\n{out}END\n");
        use std::io::Write;
        std::io::stdout().flush().unwrap();
        if std::env::var_os("ZYGOTE_IPAM_WAIT").is_some() {
            std::thread::sleep(std::time::Duration::from_secs(600));
        }
    }

    fn helper(dir: &Path, count: usize, wait: bool) -> std::process::Child {
        let mut cmd = std::process::Command::new(std::env::current_exe().unwrap());
        cmd.args([
            "--exact",
            "net::ipam::tests::ipam_helper_process",
            "--ignored",
            "--nocapture",
            "--test-threads=1",
        ])
        .env("ZYGOTE_IPAM_DIR", dir)
        .env("ZYGOTE_IPAM_COUNT", count.to_string())
        .stdout(std::process::Stdio::piped());
        if wait {
            cmd.env("ZYGOTE_IPAM_WAIT", "1");
        }
        cmd.spawn().unwrap()
    }

    fn read_leases(child: &mut std::process::Child) -> Vec<Ipv4Addr> {
        use std::io::BufRead;
        let mut lines = std::io::BufReader::new(child.stdout.take().unwrap()).lines();
        let mut inside = false;
        let mut v = Vec::new();
        for line in lines.by_ref() {
            let line = line.unwrap();
            match line.as_str() {
                "LEASES" => inside = true,
                "END" => break,
                l if inside => v.push(l.parse().unwrap()),
                _ => {}
            }
        }
        // Read what the test harness prints after, so it does not fail on
        // a closed pipe.
        std::thread::spawn(move || lines.for_each(drop));
        v
    }

    #[test]
    fn leases_are_unique_across_processes_and_swept_after_sigkill() {
        let dir = tempfile::tempdir().unwrap();
        let mut a = helper(dir.path(), 60, false);
        let mut b = helper(dir.path(), 60, true);
        let la = read_leases(&mut a);
        let lb = read_leases(&mut b);
        assert!(a.wait().unwrap().success());
        assert_eq!((la.len(), lb.len()), (60, 60));
        let all: std::collections::HashSet<_> = la.iter().chain(&lb).collect();
        assert_eq!(all.len(), 120, "two processes handed out one address");

        let ipam = Ipam::open(dir.path(), net(), 24).unwrap();
        let lk = ipam.lock().unwrap();
        // Process a has exited (its leases are dead), b still runs.
        let (dead, unreadable) = lk.dead_leases().unwrap();
        assert_eq!(dead.len(), 60);
        assert!(unreadable.is_empty());
        assert!(dead.iter().all(|(_, l)| la.contains(&l.address)));
        drop(lk);
        // SIGKILL b: its leases die with it.
        // SAFETY: kill(2) on the pid of a child this test spawned and has not reaped.
        unsafe { libc::kill(b.id() as i32, libc::SIGKILL) };
        b.wait().unwrap();
        let lk = ipam.lock().unwrap();
        let (dead, _) = lk.dead_leases().unwrap();
        assert_eq!(dead.len(), 120);
        for (path, l) in dead {
            let r = lk.release_at(&path, l).unwrap();
            lk.finish(&r.gone).unwrap();
        }
        assert!(lk.leases().unwrap().is_empty());
        assert!(
            lk.blocks_by_tenant().unwrap().is_empty(),
            "the emptied block is given back"
        );
    }

    #[test]
    fn unreadable_leases_and_orphans_are_removed() {
        let dir = tempfile::tempdir().unwrap();
        let ipam = Ipam::open(dir.path(), net(), 24).unwrap();
        let lk = ipam.lock().unwrap();
        let web = Publish {
            host_port: 8080,
            guest_port: 80,
            protocol: Protocol::Tcp,
        };
        let a = lk.allocate(&req("a", None, &[web])).unwrap();
        // A writer that died mid-way leaves a half-written lease.
        let path = dir
            .path()
            .join("blocks/1.-")
            .join(a.lease.address.to_string());
        std::fs::write(&path, b"{\"version\":").unwrap();
        let (_, unreadable) = lk.dead_leases().unwrap();
        assert_eq!(unreadable, vec![path.clone()]);
        let gone = lk.release_unreadable(&path).unwrap();
        assert_eq!(lk.gone().unwrap(), vec![(gone.clone(), a.lease.address)]);
        assert!(lk.finish(&gone).unwrap().is_some(), "its block is freed");
        lk.drop_orphans().unwrap();
        assert_eq!(lk.port_holder(&web).unwrap(), None);
        assert!(std::fs::read_dir(dir.path().join("vms"))
            .unwrap()
            .next()
            .is_none());
    }

    #[test]
    fn a_pinned_lease_lives_while_its_keeper_exists() {
        let keeper = tempfile::tempdir().unwrap();
        let lease = |pinned_by: Option<PathBuf>| Lease {
            version: LEASE_VERSION,
            vm_id: "m-master-1".into(),
            tenant: None,
            address: Ipv4Addr::new(10, 123, 1, 2),
            owner_pid: PINNED,
            owner_start: 0,
            host_if: "zvtest".into(),
            egress: false,
            peers: false,
            publish: vec![],
            created_unix_s: 0,
            pinned_by,
        };
        assert!(lease(None).alive(), "pinned with no keeper: until released");
        let kept = lease(Some(keeper.path().to_path_buf()));
        assert!(kept.alive());
        let json = serde_json::to_string(&kept).unwrap();
        let back: Lease = serde_json::from_str(&json).unwrap();
        assert_eq!(back, kept);
        drop(keeper);
        assert!(
            !kept.alive(),
            "its state directory is gone, so is the lease"
        );
    }
}
