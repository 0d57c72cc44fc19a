//! A VM's network, from request to release: what a clone (or a master
//! being made) asked for ([`NetRequest`]), the slot its VMM is spawned into
//! ([`VmNet::take`], [`VmNet::fds`]), the address and rules it then gets
//! ([`VmNet::attach`], whose [`proto::NetIdentity`] goes to the agent in
//! the identity request), and giving it all back when the VM ends
//! ([`release`]). The host network itself ([`crate::net::Network`]) is
//! opened once per process, on first use.
//!
//! It must not: decide addresses or rules (that is [`crate::net`]), or
//! spawn anything.

use std::os::fd::OwnedFd;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::OnceLock;

use serde::{Deserialize, Serialize};

use crate::net::{AttachOptions, Attachment, NetConfig, NetError, NetSlot, Network, Publish};
use crate::paths;
use crate::vmm::NetFds;

/// What a VM asked of its network.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct NetRequest {
    /// Give it no network (its master's NIC stays, with the link down).
    #[serde(default)]
    pub disabled: bool,
    /// It may reach beyond the host (masqueraded as the host).
    #[serde(default)]
    pub egress: bool,
    /// Host ports forwarded to it.
    #[serde(default)]
    pub publish: Vec<Publish>,
    /// It may reach (and be reached by) its tenant's other VMs that asked
    /// for peers too.
    #[serde(default)]
    pub peers: bool,
}

impl NetRequest {
    /// Whether it asks for anything a VM without a network cannot have.
    pub fn wants_network(&self) -> bool {
        self.egress || self.peers || !self.publish.is_empty()
    }
}

/// Errors of a VM's network.
#[derive(Debug, thiserror::Error)]
pub enum VmNetError {
    /// The host network could not be opened (earlier in this process too).
    #[error("the host network for VMs is not available: {0}")]
    Unavailable(String),
    /// A slot or an address could not be had, or the rules not set.
    #[error(transparent)]
    Net(#[from] NetError),
    /// A descriptor could not be duplicated for the VMM.
    #[error("cannot pass the VM's network to its VMM")]
    Fd(#[source] std::io::Error),
    /// The request asks for a network its master has not.
    #[error("master {0:?} was made without a network (`zygote master create --net`): its clones cannot have ports or egress")]
    NoNic(String),
}

static POOL: AtomicUsize = AtomicUsize::new(0);

/// Sets how many slots this process keeps ready (the daemon keeps some; a
/// CLI command makes each when it needs it). Before the first VM only.
pub fn configure_pool(size: usize) {
    POOL.store(size, Ordering::Relaxed);
}

/// The host network of this process's VMs, opened on first use.
pub fn network() -> Result<&'static Network, VmNetError> {
    static NET: OnceLock<Result<Network, String>> = OnceLock::new();
    NET.get_or_init(|| {
        let cfg = NetConfig {
            pool_size: POOL.load(Ordering::Relaxed),
            ..NetConfig::default()
        };
        Network::open(cfg, &paths::net_state_dir()).map_err(|e| crate::error_chain(&e))
    })
    .as_ref()
    .map_err(|e| VmNetError::Unavailable(e.clone()))
}

/// A VM's network while it is set up.
#[derive(Debug)]
pub struct VmNet {
    slot: NetSlot,
    attachment: Option<Attachment>,
}

impl VmNet {
    /// A slot (namespace, tap, veth) for a VM about to be spawned.
    pub fn take() -> Result<VmNet, VmNetError> {
        Ok(VmNet {
            slot: network()?.take_slot()?,
            attachment: None,
        })
    }

    /// The slot's namespace and tap, for the VMM.
    pub fn fds(&self) -> Result<NetFds, VmNetError> {
        let dup = |fd: &OwnedFd| fd.try_clone().map_err(VmNetError::Fd);
        Ok(NetFds {
            netns: dup(&self.slot.netns)?,
            tap: dup(&self.slot.tap)?,
        })
    }

    /// Gives VM `vm_id` (whose VMM is `owner_pid`) its address and rules;
    /// returns what its agent sets.
    pub fn attach(
        &mut self,
        vm_id: &str,
        tenant: Option<&str>,
        req: &NetRequest,
        owner_pid: u32,
    ) -> Result<proto::NetIdentity, VmNetError> {
        self.attach_as(vm_id, tenant, req, owner_pid, None)
    }

    /// Gives VM `vm_id` an address held until [`release`] (a master's,
    /// which none of its clones may get) or until `keeper` (its state
    /// directory) is gone.
    pub fn attach_pinned(
        &mut self,
        vm_id: &str,
        tenant: Option<&str>,
        req: &NetRequest,
        keeper: &std::path::Path,
    ) -> Result<proto::NetIdentity, VmNetError> {
        let keeper = Some(keeper.to_path_buf());
        self.attach_as(vm_id, tenant, req, crate::net::PINNED_OWNER, keeper)
    }

    fn attach_as(
        &mut self,
        vm_id: &str,
        tenant: Option<&str>,
        req: &NetRequest,
        owner_pid: u32,
        pinned_by: Option<std::path::PathBuf>,
    ) -> Result<proto::NetIdentity, VmNetError> {
        let opts = AttachOptions {
            egress: req.egress,
            publish: req.publish.clone(),
            peers: req.peers,
            owner_pid: Some(owner_pid),
            pinned_by,
        };
        let a = network()?.attach(&mut self.slot, vm_id, tenant, &opts)?;
        let id = a.identity.clone();
        self.attachment = Some(a);
        Ok(id)
    }

    /// The attachment, once the VMM holds the namespace: the slot's own
    /// descriptors are closed (the namespace lives as long as the VMM).
    pub fn finish(self) -> Option<Attachment> {
        self.attachment
    }
}

/// Gives back VM `vm_id`'s address and rules (once it has ended).
/// Harmless when it had none.
pub fn release(vm_id: &str) {
    static OPENED: OnceLock<()> = OnceLock::new();
    // Only a process that has a lease dir to look at opens the network.
    if OPENED.get().is_none() && !paths::net_state_dir().exists() {
        return;
    }
    let _ = OPENED.set(());
    if let Ok(n) = network() {
        if let Err(e) = n.detach(vm_id) {
            tracing::warn!(vm = vm_id, "cannot release the VM's address: {e}");
        }
    }
}
