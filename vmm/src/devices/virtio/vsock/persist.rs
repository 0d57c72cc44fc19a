//! Saving and restoring the virtio-vsock model ([`Vsock`]) through
//! [`Persist`].
//!
//! It owns the vsock model's saved state: the guest's CID, which the guest
//! reads from the config space and keeps using after a restore, and the
//! host connections the guest knows of ([`SavedConnection`]). An idle,
//! established one is *carried*: its credit counters are saved, and a
//! clone continues it as a live connection that the first host
//! `CONNECT` to its guest port takes over, with no request to the guest
//! (the guest's socket, frozen in its memory, never noticed anything).
//! Every other one is reset in the clone, one by one. With
//! `--vsock-reset` (or a state that lists no connections, from an older
//! VMM) a restored device instead tells the guest its whole transport was
//! reset ([`crate::devices::virtio::VirtioDevice::restored`]).
//! The queues and features are the transport's
//! (`devices/virtio/persist.rs`). It must not trust the state: a reserved
//! or out-of-range CID, too many connections or a port listed twice are
//! refused.

use std::path::PathBuf;

use serde::{Deserialize, Serialize};

use super::{Vsock, MAX_CONNECTIONS};
use crate::devices::virtio::Error;
use crate::persist::{check_version, Persist, VersionError};

/// Version of [`VsockState`].
pub const VSOCK_STATE_VERSION: u32 = 1;

/// The virtio-vsock model's state.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct VsockState {
    /// [`VSOCK_STATE_VERSION`].
    pub version: u32,
    /// The guest's context id.
    pub guest_cid: u64,
    /// The host connections the guest knew of at the save (`None`: a
    /// state from a VMM that did not list them; its clones reset the
    /// transport). An older VMM ignores the field and resets.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub connections: Option<Vec<SavedConnection>>,
}

/// A host connection at the save.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct SavedConnection {
    /// Its host-side port.
    pub local_port: u32,
    /// Its guest-side port.
    pub peer_port: u32,
    /// What a clone continues it from (`None`: it was not idle, or
    /// another connection to the same guest port was carried; a clone
    /// resets it).
    pub carried: Option<CarriedCounters>,
}

/// The credit accounting of a carried connection (virtio-vsock 5.10.6.3),
/// exactly as the guest's frozen socket expects it to continue. All guest
/// data it sent had been written to the host, so bytes received and
/// forwarded are equal.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct CarriedCounters {
    /// Guest payload bytes received and forwarded to the host.
    pub fwd_cnt: u32,
    /// `fwd_cnt` as last told to the guest.
    pub fwd_cnt_told: u32,
    /// Payload bytes sent to the guest.
    pub rx_cnt: u32,
    /// The guest's receive buffer size, as it last said.
    pub peer_buf_alloc: u32,
    /// Bytes the guest had consumed, as it last said.
    pub peer_fwd_cnt: u32,
}

/// What a restored vsock needs besides its state.
#[derive(Debug, Clone)]
pub struct VsockConstructorArgs {
    /// This VM's host-side Unix socket (it must not exist yet).
    pub uds_path: PathBuf,
    /// Reset the transport instead of carrying connections
    /// (`--vsock-reset`).
    pub reset: bool,
}

/// Why a vsock state cannot be restored.
#[derive(Debug, thiserror::Error)]
pub enum VsockRestoreError {
    /// Another state version.
    #[error(transparent)]
    Version(#[from] VersionError),
    /// A CID the device refuses, or a socket it cannot bind.
    #[error("cannot rebuild the vsock device")]
    Device(#[source] Error),
    /// More connections than a device holds.
    #[error("the state lists {0} connections, a device holds at most {MAX_CONNECTIONS}")]
    TooManyConnections(usize),
    /// Two connections with one host port.
    #[error("the state lists host port {0} twice")]
    DuplicatePort(u32),
}

impl Persist for Vsock {
    type State = VsockState;
    type ConstructorArgs = VsockConstructorArgs;
    type Error = VsockRestoreError;

    fn save(&self) -> VsockState {
        VsockState {
            version: VSOCK_STATE_VERSION,
            guest_cid: self.guest_cid(),
            connections: Some(self.muxer.saved_connections()),
        }
    }

    fn restore(args: VsockConstructorArgs, state: &VsockState) -> Result<Self, Self::Error> {
        check_version("vsock", state.version, VSOCK_STATE_VERSION)?;
        if let Some(conns) = &state.connections {
            if conns.len() > MAX_CONNECTIONS {
                return Err(VsockRestoreError::TooManyConnections(conns.len()));
            }
            let mut ports = std::collections::HashSet::new();
            if let Some(c) = conns.iter().find(|c| !ports.insert(c.local_port)) {
                return Err(VsockRestoreError::DuplicatePort(c.local_port));
            }
        }
        // `new` checks the CID's range.
        let mut dev =
            Vsock::new(state.guest_cid, &args.uds_path).map_err(VsockRestoreError::Device)?;
        dev.saved = if args.reset {
            None
        } else {
            state.connections.clone()
        };
        Ok(dev)
    }
}

#[cfg(test)]
mod tests {
    use std::sync::atomic::{AtomicU32, Ordering};

    use super::*;
    use crate::devices::virtio::persist::{
        DeviceModelState, MmioConstructorArgs, VirtioDeviceState,
    };
    use crate::devices::virtio::test_utils::{mem, negotiate, setup_queue, w, DriverQueue};
    use crate::devices::virtio::{
        mmio::REG_STATUS, MmioTransport, VirtioDevice, STATUS_ACKNOWLEDGE, STATUS_DRIVER,
        STATUS_DRIVER_OK, STATUS_FEATURES_OK, VIRTIO_F_VERSION_1,
    };

    fn sock_path(name: &str) -> PathBuf {
        static N: AtomicU32 = AtomicU32::new(0);
        let p = std::env::temp_dir().join(format!(
            "zygote-vsock-persist-{name}-{}-{}.sock",
            std::process::id(),
            N.fetch_add(1, Ordering::Relaxed)
        ));
        let _ = std::fs::remove_file(&p);
        p
    }

    #[test]
    fn vsock_state_round_trips_and_bad_states_are_refused() {
        let dev = Vsock::new(1234, &sock_path("a")).unwrap();
        let saved = dev.save();
        assert_eq!(saved.guest_cid, 1234);
        let json = serde_json::to_string(&saved).unwrap();
        let back: VsockState = serde_json::from_str(&json).unwrap();
        let uds_path = sock_path("b");
        let restored = Vsock::restore(
            VsockConstructorArgs {
                uds_path: uds_path.clone(),
                reset: false,
            },
            &back,
        )
        .unwrap();
        assert!(uds_path.exists(), "the clone's socket is bound");
        assert_eq!(restored.save(), saved);
        assert_eq!(
            restored.save_model(),
            DeviceModelState::Vsock(saved.clone())
        );
        let mut cid = [0u8; 8];
        restored.read_config(0, &mut cid);
        assert_eq!(u64::from_le_bytes(cid), 1234, "the guest reads its CID");

        for cid in [0, 1, 2, u64::from(u32::MAX), u64::MAX] {
            let bad = VsockState {
                guest_cid: cid,
                ..saved.clone()
            };
            let args = VsockConstructorArgs {
                uds_path: sock_path("c"),
                reset: false,
            };
            let e = Vsock::restore(args, &bad).unwrap_err();
            assert!(
                matches!(e, VsockRestoreError::Device(Error::InvalidCid(c)) if c == cid),
                "{cid}: {e}"
            );
        }
        let newer = VsockState {
            version: 2,
            ..saved
        };
        let args = VsockConstructorArgs {
            uds_path: sock_path("d"),
            reset: false,
        };
        let e = Vsock::restore(args, &newer).unwrap_err();
        assert_eq!(e.to_string(), "vsock state version 2, this VMM reads 1");
    }

    #[test]
    fn an_active_vsock_device_round_trips_with_its_transport() {
        let m = mem();
        let dev = Vsock::new(77, &sock_path("e")).unwrap();
        let mut t = MmioTransport::new(Box::new(dev), m.clone()).unwrap();
        negotiate(&mut t, 1u64 << VIRTIO_F_VERSION_1);
        for (i, base) in [0x10000u64, 0x20000, 0x30000].into_iter().enumerate() {
            setup_queue(&mut t, i as u32, &DriverQueue::new(&m, base, 16));
        }
        let ok = STATUS_ACKNOWLEDGE | STATUS_DRIVER | STATUS_FEATURES_OK | STATUS_DRIVER_OK;
        w(&mut t, REG_STATUS, ok);
        assert!(t.is_activated());
        let saved = t.save();
        let json = serde_json::to_string(&saved).unwrap();
        assert!(
            json.starts_with(
                r#"{"model":{"kind":"vsock","version":1,"guest_cid":77,"connections":[]}"#
            ),
            "{json}"
        );
        let back: VirtioDeviceState = serde_json::from_str(&json).unwrap();
        let args = MmioConstructorArgs {
            mem: m,
            vsock_reset: false,
            vsock_uds: Some(sock_path("f")),
            net_tap: None,
        };
        let restored = MmioTransport::restore(args, &back).unwrap();
        assert!(restored.is_activated());
        assert_eq!(restored.save(), saved);
    }
}
