//! Saving and restoring the virtio-net model ([`Net`]) through [`Persist`].
//!
//! It owns the net model's saved state: the MAC the guest read from the
//! config space, the features its driver accepted, and the link status it
//! last saw. The queues and the transport's registers are
//! `devices/virtio/persist.rs`'s. Frames in flight are not saved (a frame
//! read from the tap but not yet in the guest is lost, as on any network).
//! The tap is not state: a restored device gets the one its VMM was
//! launched with ([`NetConstructorArgs`]), or none (disconnected: link
//! down, the guest told). It must not trust the state: a multicast MAC or
//! features the device does not offer are refused.

use serde::{Deserialize, Serialize};

use super::tap::Tap;
use super::{Net, NetError};
use crate::devices::virtio::VirtioDevice;
use crate::persist::{check_version, Persist, VersionError};
use proto::launch::MacAddr;

/// Version of [`NetState`].
pub const NET_STATE_VERSION: u32 = 1;

/// The virtio-net model's state.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct NetState {
    /// [`NET_STATE_VERSION`].
    pub version: u32,
    /// The device's MAC (the guest's interface may have changed its own).
    pub mac: MacAddr,
    /// Features the driver accepted.
    pub acked_features: u64,
    /// Whether the guest saw the link up.
    pub link_up: bool,
}

/// What a restored net device needs besides its state.
#[derive(Debug, Default)]
pub struct NetConstructorArgs {
    /// This VM's tap (none: the device is disconnected).
    pub tap: Option<Tap>,
}

/// Why a net state cannot be restored.
#[derive(Debug, thiserror::Error)]
pub enum NetRestoreError {
    /// Another state version.
    #[error(transparent)]
    Version(#[from] VersionError),
    /// Features the device does not offer.
    #[error(
        "the saved net features {saved:#x} include some the device does not offer ({offered:#x})"
    )]
    Features {
        /// The saved features.
        saved: u64,
        /// What the device offers.
        offered: u64,
    },
    /// A MAC the device refuses, or no epoll set for the tap.
    #[error("cannot rebuild the net device")]
    Device(#[source] NetError),
}

impl Persist for Net {
    type State = NetState;
    type ConstructorArgs = NetConstructorArgs;
    type Error = NetRestoreError;

    fn save(&self) -> NetState {
        NetState {
            version: NET_STATE_VERSION,
            mac: self.mac(),
            acked_features: self.acked_features(),
            link_up: self.restored_link_up.unwrap_or(self.link_up()),
        }
    }

    fn restore(args: NetConstructorArgs, state: &NetState) -> Result<Self, Self::Error> {
        check_version("net", state.version, NET_STATE_VERSION)?;
        let mut net = Net::new(state.mac, args.tap).map_err(NetRestoreError::Device)?;
        let offered = net.avail_features();
        if state.acked_features & !offered != 0 {
            return Err(NetRestoreError::Features {
                saved: state.acked_features,
                offered,
            });
        }
        // The transport acknowledges the same features again from its
        // registers before it re-activates the device.
        net.acked_features = state.acked_features;
        net.restored_link_up = Some(state.link_up);
        Ok(net)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::devices::virtio::mmio::REG_STATUS;
    use crate::devices::virtio::net::header::VnetHdr;
    use crate::devices::virtio::net::tests::{frame, packet, recv, send, socket_tap, MRG, V1};
    use crate::devices::virtio::net::{RXQ, TXQ};
    use crate::devices::virtio::persist::{
        DeviceModelState, MmioConstructorArgs, VirtioDeviceState,
    };
    use crate::devices::virtio::test_utils::{mem, negotiate, setup_queue, w, DriverQueue};
    use crate::devices::virtio::{
        MmioTransport, STATUS_ACKNOWLEDGE, STATUS_DRIVER, STATUS_DRIVER_OK, STATUS_FEATURES_OK,
        VIRTIO_MMIO_INT_CONFIG,
    };
    use vm_memory::{Bytes, GuestAddress};

    const MAC: MacAddr = MacAddr([2, 0x10, 0x20, 0x30, 0x40, 0x50]);

    #[test]
    fn net_state_round_trips_and_bad_states_are_refused() {
        let (tap, _peer) = socket_tap();
        let mut net = Net::new(MAC, Some(tap)).unwrap();
        net.ack_features(V1 | MRG);
        let saved = net.save();
        assert_eq!(
            saved,
            NetState {
                version: 1,
                mac: MAC,
                acked_features: V1 | MRG,
                link_up: true,
            }
        );
        let json = serde_json::to_string(&saved).unwrap();
        assert_eq!(
            json,
            format!(
                r#"{{"version":1,"mac":"02:10:20:30:40:50","acked_features":{},"link_up":true}}"#,
                V1 | MRG
            )
        );
        let back: NetState = serde_json::from_str(&json).unwrap();
        let (tap, _peer2) = socket_tap();
        let restored = Net::restore(NetConstructorArgs { tap: Some(tap) }, &back).unwrap();
        assert_eq!(restored.save(), saved);
        assert_eq!(restored.mac(), MAC);
        assert!(!restored.is_activated(), "the transport activates it");
        assert_eq!(restored.save_model(), DeviceModelState::Net(saved.clone()));
        // Without a tap it restores too, and keeps what the guest saw
        // until it is told otherwise.
        let disconnected = Net::restore(NetConstructorArgs::default(), &back).unwrap();
        assert!(!disconnected.link_up());
        assert_eq!(disconnected.save(), saved);

        let e = Net::restore(
            NetConstructorArgs::default(),
            &NetState {
                version: 2,
                ..saved.clone()
            },
        )
        .unwrap_err();
        assert_eq!(e.to_string(), "net state version 2, this VMM reads 1");
        let e = Net::restore(
            NetConstructorArgs::default(),
            &NetState {
                mac: MacAddr([1, 0, 0, 0, 0, 1]),
                ..saved.clone()
            },
        )
        .unwrap_err();
        assert!(
            matches!(e, NetRestoreError::Device(NetError::MulticastMac(_))),
            "{e}"
        );
        let e = Net::restore(
            NetConstructorArgs::default(),
            &NetState {
                acked_features: V1 | 1 << 17,
                ..saved.clone()
            },
        )
        .unwrap_err();
        assert!(matches!(e, NetRestoreError::Features { .. }), "{e}");
        assert!(serde_json::from_str::<NetState>(r#"{"version":1}"#).is_err());
        let bad_mac = json.replace("02:10:20:30:40:50", "02:10:20:30:40");
        assert!(serde_json::from_str::<NetState>(&bad_mac).is_err());

        // Snapshots from before the net device still read.
        let old: DeviceModelState = serde_json::from_str(r#"{"kind":"rng","version":1}"#).unwrap();
        assert_eq!(old.name(), "rng");
    }

    /// A transport around a net device its driver set up: features (with
    /// mergeable buffers), both queues, DRIVER_OK.
    fn active_transport(m: &vm_memory::GuestMemoryMmap, tap: Option<Tap>) -> MmioTransport {
        let net = Net::new(MAC, tap).unwrap();
        let mut t = MmioTransport::new(Box::new(net), m.clone()).unwrap();
        negotiate(&mut t, V1 | MRG);
        setup_queue(&mut t, RXQ as u32, &DriverQueue::new(m, 0x1_0000, 16));
        setup_queue(&mut t, TXQ as u32, &DriverQueue::new(m, 0x2_0000, 16));
        let ok = STATUS_ACKNOWLEDGE | STATUS_DRIVER | STATUS_FEATURES_OK | STATUS_DRIVER_OK;
        w(&mut t, REG_STATUS, ok);
        assert!(t.is_activated());
        t
    }

    #[test]
    fn a_clone_keeps_the_device_and_uses_the_tap_it_was_launched_with() {
        let m = mem();
        let (tap, _master_peer) = socket_tap();
        let master = active_transport(&m, Some(tap));
        let saved = master.save();
        let json = serde_json::to_string(&saved).unwrap();
        assert!(
            json.starts_with(r#"{"model":{"kind":"net","version":1"#),
            "{json}"
        );
        let back: VirtioDeviceState = serde_json::from_str(&json).unwrap();

        // The clone: same guest memory (its copy), its own tap.
        let mut rx = DriverQueue::new(&m, 0x1_0000, 16);
        let (tap, peer) = socket_tap();
        let args = MmioConstructorArgs {
            mem: m.clone(),
            vsock_reset: false,
            vsock_uds: None,
            net_tap: Some(tap),
        };
        let mut clone = MmioTransport::restore(args, &back).unwrap();
        assert!(clone.is_activated());
        assert_eq!(clone.save(), saved);
        assert_eq!(clone.interrupt().status() & VIRTIO_MMIO_INT_CONFIG, 0);
        // Frames flow on the clone's tap, with the features the master's
        // driver accepted (mergeable buffers: num_buffers is set).
        rx.add_chain(&[(0x80_0000, 2048, true)]);
        let f = frame(300, 1);
        send(&peer, &packet(VnetHdr::default(), &f));
        let fd = clone.device().extra_fds()[0];
        assert!(super::super::tests::readable(fd));
        clone
            .device_mut()
            .process_extra_fd(0, event_manager::EventSet::IN);
        assert_eq!(rx.pop_used(), Some((0, 312)));
        let mut got = vec![0u8; 312];
        m.read_slice(&mut got, GuestAddress(0x80_0000)).unwrap();
        let hdr = VnetHdr {
            num_buffers: 1,
            ..Default::default()
        };
        assert_eq!(got, packet(hdr, &f));
        assert_eq!(recv(&peer), None);
    }

    #[test]
    fn a_clone_without_a_tap_keeps_the_device_and_tells_the_guest_the_link_is_down() {
        let m = mem();
        let (tap, _peer) = socket_tap();
        let saved = active_transport(&m, Some(tap)).save();
        let generation = saved.transport.config_generation;
        let args = MmioConstructorArgs {
            mem: m.clone(),
            vsock_reset: false,
            vsock_uds: None,
            net_tap: None,
        };
        let mut clone = MmioTransport::restore(args, &saved).unwrap();
        assert!(clone.is_activated(), "the driver's state stays valid");
        assert_ne!(clone.interrupt().status() & VIRTIO_MMIO_INT_CONFIG, 0);
        assert_eq!(clone.interrupt().config_generation(), generation + 1);
        let mut status = [0u8; 2];
        clone.read(0x100 + 6, &mut status);
        assert_eq!(status, [0, 0], "link down");
        assert!(clone.device().extra_fds().is_empty());
        // Saved again, it says what the guest now sees.
        match clone.save().model {
            DeviceModelState::Net(s) => assert!(!s.link_up),
            other => panic!("{other:?}"),
        }
        // TX is consumed.
        let mut tx = DriverQueue::new(&m, 0x2_0000, 16);
        let p = packet(VnetHdr::default(), &frame(100, 2));
        m.write_slice(&p, GuestAddress(0x40_0000)).unwrap();
        let head = tx.add_chain(&[(0x40_0000, p.len() as u32, false)]);
        clone.device_mut().process_queue(TXQ);
        assert_eq!(tx.pop_used(), Some((head, 0)));
    }
}
