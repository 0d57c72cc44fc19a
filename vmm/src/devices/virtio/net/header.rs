//! The virtio-net header (`struct virtio_net_hdr_v1`, 12 bytes with
//! `VIRTIO_F_VERSION_1`) that precedes every frame, in both directions, on
//! the rings and on the tap (`IFF_VNET_HDR` with `TUNSETVNETHDRSZ` 12).
//!
//! It owns parsing and checking headers against the negotiated features:
//! [`check_tx`] for what the guest sends (refused headers are the guest's
//! fault and counted as rejected), [`fix_rx`] for what the tap hands over
//! (adapted to what the driver accepted, or the frame is dropped). It must
//! not touch guest memory or the tap: it works on copies.

use virtio_bindings::virtio_net::{
    VIRTIO_NET_F_CSUM, VIRTIO_NET_F_GUEST_CSUM, VIRTIO_NET_F_GUEST_ECN, VIRTIO_NET_F_GUEST_TSO4,
    VIRTIO_NET_F_GUEST_TSO6, VIRTIO_NET_F_HOST_ECN, VIRTIO_NET_F_HOST_TSO4, VIRTIO_NET_F_HOST_TSO6,
    VIRTIO_NET_HDR_F_DATA_VALID, VIRTIO_NET_HDR_F_NEEDS_CSUM, VIRTIO_NET_HDR_GSO_ECN,
    VIRTIO_NET_HDR_GSO_NONE, VIRTIO_NET_HDR_GSO_TCPV4, VIRTIO_NET_HDR_GSO_TCPV6,
};

/// Size of the header with `VIRTIO_F_VERSION_1` (`num_buffers` included).
pub const VNET_HDR_LEN: usize = 12;
/// An Ethernet header: the shortest frame the tap accepts.
pub const ETH_HLEN: usize = 14;
/// Longest frame (Ethernet header included) either direction carries: a
/// 64 KiB TCP segment with its headers, as Linux and the tap produce with
/// segmentation offload.
pub const MAX_FRAME_LEN: usize = 65550;
/// Longest header + frame, the bound on a TX chain and on a tap read.
pub const MAX_PACKET_LEN: usize = VNET_HDR_LEN + MAX_FRAME_LEN;

const NEEDS_CSUM: u8 = VIRTIO_NET_HDR_F_NEEDS_CSUM as u8;
const DATA_VALID: u8 = VIRTIO_NET_HDR_F_DATA_VALID as u8;
const GSO_ECN: u8 = VIRTIO_NET_HDR_GSO_ECN as u8;

/// `struct virtio_net_hdr_v1`, little endian on the wire.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct VnetHdr {
    /// `VIRTIO_NET_HDR_F_*`.
    pub flags: u8,
    /// `VIRTIO_NET_HDR_GSO_*`, with the ECN bit.
    pub gso_type: u8,
    /// Length of the headers to repeat in each segment.
    pub hdr_len: u16,
    /// Segment size for segmentation offload.
    pub gso_size: u16,
    /// Where checksumming starts (with `NEEDS_CSUM`).
    pub csum_start: u16,
    /// Where, after `csum_start`, the checksum goes.
    pub csum_offset: u16,
    /// How many RX buffers the frame spans (`VIRTIO_NET_F_MRG_RXBUF`).
    pub num_buffers: u16,
}

impl VnetHdr {
    /// Parses the wire form.
    pub fn from_bytes(b: &[u8; VNET_HDR_LEN]) -> Self {
        let u16_at = |i: usize| u16::from_le_bytes([b[i], b[i + 1]]);
        VnetHdr {
            flags: b[0],
            gso_type: b[1],
            hdr_len: u16_at(2),
            gso_size: u16_at(4),
            csum_start: u16_at(6),
            csum_offset: u16_at(8),
            num_buffers: u16_at(10),
        }
    }

    /// The wire form.
    pub fn to_bytes(self) -> [u8; VNET_HDR_LEN] {
        let mut b = [0u8; VNET_HDR_LEN];
        b[0] = self.flags;
        b[1] = self.gso_type;
        b[2..4].copy_from_slice(&self.hdr_len.to_le_bytes());
        b[4..6].copy_from_slice(&self.gso_size.to_le_bytes());
        b[6..8].copy_from_slice(&self.csum_start.to_le_bytes());
        b[8..10].copy_from_slice(&self.csum_offset.to_le_bytes());
        b[10..12].copy_from_slice(&self.num_buffers.to_le_bytes());
        b
    }
}

/// Why a header the guest sent is refused.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum HeaderError {
    /// Flags other than `NEEDS_CSUM`, or `NEEDS_CSUM` without
    /// `VIRTIO_NET_F_CSUM`.
    #[error("header flags {0:#x} were not negotiated (a driver may only ask for a checksum, and only with VIRTIO_NET_F_CSUM)")]
    Flags(u8),
    /// The checksum would be written outside the frame.
    #[error("the checksum at {start}+{offset} lies outside the {len}-byte frame")]
    Checksum {
        /// `csum_start`.
        start: u16,
        /// `csum_offset`.
        offset: u16,
        /// Frame length.
        len: usize,
    },
    /// A segmentation type that was not negotiated (or does not exist).
    #[error("segmentation type {0:#x} was not negotiated")]
    GsoType(u8),
    /// Segmentation with a segment size of 0.
    #[error("segmentation asked for with a segment size of 0")]
    GsoSize,
    /// Headers longer than the frame.
    #[error("header length {hdr_len} exceeds the {len}-byte frame")]
    HdrLen {
        /// `hdr_len`.
        hdr_len: u16,
        /// Frame length.
        len: usize,
    },
}

fn has(features: u64, bit: u32) -> bool {
    features & (1u64 << bit) != 0
}

/// Checks the header of a frame of `frame_len` bytes the guest sends, given
/// the features the driver accepted. The tap checks again; this one makes a
/// bad header the guest's fault, counted, before any system call.
pub fn check_tx(hdr: &VnetHdr, frame_len: usize, acked: u64) -> Result<(), HeaderError> {
    let csum = has(acked, VIRTIO_NET_F_CSUM);
    if hdr.flags & !NEEDS_CSUM != 0 || (hdr.flags & NEEDS_CSUM != 0 && !csum) {
        return Err(HeaderError::Flags(hdr.flags));
    }
    if hdr.flags & NEEDS_CSUM != 0 {
        let end = usize::from(hdr.csum_start) + usize::from(hdr.csum_offset) + 2;
        if end > frame_len {
            return Err(HeaderError::Checksum {
                start: hdr.csum_start,
                offset: hdr.csum_offset,
                len: frame_len,
            });
        }
    }
    let ecn = hdr.gso_type & GSO_ECN != 0;
    let allowed = match u32::from(hdr.gso_type & !GSO_ECN) {
        VIRTIO_NET_HDR_GSO_NONE => !ecn,
        VIRTIO_NET_HDR_GSO_TCPV4 => csum && has(acked, VIRTIO_NET_F_HOST_TSO4),
        VIRTIO_NET_HDR_GSO_TCPV6 => csum && has(acked, VIRTIO_NET_F_HOST_TSO6),
        _ => false,
    };
    if !allowed || (ecn && !has(acked, VIRTIO_NET_F_HOST_ECN)) {
        return Err(HeaderError::GsoType(hdr.gso_type));
    }
    if u32::from(hdr.gso_type) != VIRTIO_NET_HDR_GSO_NONE {
        if hdr.gso_size == 0 {
            return Err(HeaderError::GsoSize);
        }
        if usize::from(hdr.hdr_len) > frame_len {
            return Err(HeaderError::HdrLen {
                hdr_len: hdr.hdr_len,
                len: frame_len,
            });
        }
    }
    Ok(())
}

/// Why a frame from the tap cannot be given to this driver.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum RxHeaderError {
    /// A partial checksum for a driver that did not accept
    /// `VIRTIO_NET_F_GUEST_CSUM`.
    #[error("the tap handed over a frame with a partial checksum, which the driver cannot take")]
    PartialChecksum,
    /// A segmented frame of a kind the driver did not accept.
    #[error("the tap handed over a frame with segmentation type {0:#x}, which the driver did not accept")]
    GsoType(u8),
}

/// Adapts the header of a frame the tap handed over to the features the
/// driver accepted, and sets `num_buffers`. The tap only produces what its
/// offloads (set from the same features) allow; this is the check that it
/// did, so that the driver never sees a header it did not negotiate.
pub fn fix_rx(hdr: &mut VnetHdr, acked: u64, num_buffers: u16) -> Result<(), RxHeaderError> {
    let guest_csum = has(acked, VIRTIO_NET_F_GUEST_CSUM);
    if guest_csum {
        hdr.flags &= NEEDS_CSUM | DATA_VALID;
    } else {
        if hdr.flags & NEEDS_CSUM != 0 {
            return Err(RxHeaderError::PartialChecksum);
        }
        // "If VIRTIO_NET_F_GUEST_CSUM is not negotiated, the device MUST set
        // flags to zero."
        hdr.flags = 0;
    }
    let ecn = hdr.gso_type & GSO_ECN != 0;
    let allowed = match u32::from(hdr.gso_type & !GSO_ECN) {
        VIRTIO_NET_HDR_GSO_NONE => !ecn,
        VIRTIO_NET_HDR_GSO_TCPV4 => guest_csum && has(acked, VIRTIO_NET_F_GUEST_TSO4),
        VIRTIO_NET_HDR_GSO_TCPV6 => guest_csum && has(acked, VIRTIO_NET_F_GUEST_TSO6),
        _ => false,
    };
    if !allowed || (ecn && !has(acked, VIRTIO_NET_F_GUEST_ECN)) {
        return Err(RxHeaderError::GsoType(hdr.gso_type));
    }
    if u32::from(hdr.gso_type) == VIRTIO_NET_HDR_GSO_NONE {
        hdr.gso_size = 0;
        hdr.hdr_len = 0;
    }
    hdr.num_buffers = num_buffers;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    const CSUM: u64 = 1 << VIRTIO_NET_F_CSUM;
    const TSO4: u64 = 1 << VIRTIO_NET_F_HOST_TSO4;
    const TSO6: u64 = 1 << VIRTIO_NET_F_HOST_TSO6;
    const ECN: u64 = 1 << VIRTIO_NET_F_HOST_ECN;
    const G_CSUM: u64 = 1 << VIRTIO_NET_F_GUEST_CSUM;
    const G_TSO4: u64 = 1 << VIRTIO_NET_F_GUEST_TSO4;
    const G_ECN: u64 = 1 << VIRTIO_NET_F_GUEST_ECN;

    #[test]
    fn wire_form_round_trips_little_endian() {
        let h = VnetHdr {
            flags: 1,
            gso_type: 4,
            hdr_len: 0x0102,
            gso_size: 0x0304,
            csum_start: 0x0506,
            csum_offset: 0x0708,
            num_buffers: 0x090a,
        };
        let b = h.to_bytes();
        assert_eq!(b, [1, 4, 2, 1, 4, 3, 6, 5, 8, 7, 0xa, 9]);
        assert_eq!(VnetHdr::from_bytes(&b), h);
    }

    #[test]
    fn tx_headers_must_stay_within_what_was_negotiated() {
        let plain = VnetHdr::default();
        assert_eq!(check_tx(&plain, 60, 0), Ok(()));
        // Checksum offload only with VIRTIO_NET_F_CSUM, and inside the frame.
        let csum = VnetHdr {
            flags: NEEDS_CSUM,
            csum_start: 34,
            csum_offset: 16,
            ..plain
        };
        assert_eq!(check_tx(&csum, 60, 0), Err(HeaderError::Flags(1)));
        assert_eq!(check_tx(&csum, 60, CSUM), Ok(()));
        assert_eq!(check_tx(&csum, 52, CSUM), Ok(()), "34+16+2 = 52");
        assert!(matches!(
            check_tx(&csum, 51, CSUM),
            Err(HeaderError::Checksum { len: 51, .. })
        ));
        // DATA_VALID and unknown flags are never the driver's to set.
        for flags in [DATA_VALID, 4, 0x80] {
            let h = VnetHdr { flags, ..plain };
            assert_eq!(check_tx(&h, 60, CSUM), Err(HeaderError::Flags(flags)));
        }
        // TSO only as negotiated, with a segment size, headers inside.
        let tso = VnetHdr {
            gso_type: VIRTIO_NET_HDR_GSO_TCPV4 as u8,
            gso_size: 1448,
            hdr_len: 54,
            ..csum
        };
        assert_eq!(check_tx(&tso, 3000, CSUM), Err(HeaderError::GsoType(1)));
        assert_eq!(check_tx(&tso, 3000, TSO4), Err(HeaderError::Flags(1)));
        assert_eq!(check_tx(&tso, 3000, CSUM | TSO4), Ok(()));
        let v6 = VnetHdr {
            gso_type: VIRTIO_NET_HDR_GSO_TCPV6 as u8,
            ..tso
        };
        assert_eq!(
            check_tx(&v6, 3000, CSUM | TSO4),
            Err(HeaderError::GsoType(4))
        );
        assert_eq!(check_tx(&v6, 3000, CSUM | TSO6), Ok(()));
        let ecn = VnetHdr {
            gso_type: tso.gso_type | GSO_ECN,
            ..tso
        };
        assert_eq!(
            check_tx(&ecn, 3000, CSUM | TSO4),
            Err(HeaderError::GsoType(0x81))
        );
        assert_eq!(check_tx(&ecn, 3000, CSUM | TSO4 | ECN), Ok(()));
        let ecn_alone = VnetHdr {
            gso_type: GSO_ECN,
            ..plain
        };
        assert_eq!(
            check_tx(&ecn_alone, 60, CSUM | TSO4 | ECN),
            Err(HeaderError::GsoType(0x80))
        );
        // UDP fragmentation and USO are never offered.
        for t in [3u8, 5, 2, 0x7f] {
            let h = VnetHdr { gso_type: t, ..tso };
            assert_eq!(check_tx(&h, 3000, !0), Err(HeaderError::GsoType(t)));
        }
        let h = VnetHdr { gso_size: 0, ..tso };
        assert_eq!(check_tx(&h, 3000, CSUM | TSO4), Err(HeaderError::GsoSize));
        let h = VnetHdr {
            hdr_len: 3001,
            ..tso
        };
        assert!(matches!(
            check_tx(&h, 3000, CSUM | TSO4),
            Err(HeaderError::HdrLen { hdr_len: 3001, .. })
        ));
    }

    #[test]
    fn rx_headers_are_adapted_to_the_driver_or_refused() {
        // Without GUEST_CSUM the flags are cleared (DATA_VALID too), a
        // partial checksum cannot be delivered.
        let mut h = VnetHdr {
            flags: DATA_VALID,
            num_buffers: 0xdead,
            ..Default::default()
        };
        fix_rx(&mut h, 0, 1).unwrap();
        assert_eq!((h.flags, h.num_buffers), (0, 1));
        let mut h = VnetHdr {
            flags: NEEDS_CSUM,
            ..Default::default()
        };
        assert_eq!(fix_rx(&mut h, 0, 1), Err(RxHeaderError::PartialChecksum));
        let mut h = VnetHdr {
            flags: NEEDS_CSUM | DATA_VALID | 4,
            ..Default::default()
        };
        fix_rx(&mut h, G_CSUM, 3).unwrap();
        assert_eq!((h.flags, h.num_buffers), (NEEDS_CSUM | DATA_VALID, 3));
        // Segmented frames only as negotiated.
        let gso = VnetHdr {
            flags: NEEDS_CSUM,
            gso_type: VIRTIO_NET_HDR_GSO_TCPV4 as u8,
            gso_size: 1448,
            hdr_len: 66,
            ..Default::default()
        };
        let mut h = gso;
        assert_eq!(fix_rx(&mut h, G_CSUM, 1), Err(RxHeaderError::GsoType(1)));
        let mut h = gso;
        fix_rx(&mut h, G_CSUM | G_TSO4, 2).unwrap();
        assert_eq!((h.gso_size, h.num_buffers), (1448, 2));
        let mut h = VnetHdr {
            gso_type: gso.gso_type | GSO_ECN,
            ..gso
        };
        assert_eq!(
            fix_rx(&mut h, G_CSUM | G_TSO4, 1),
            Err(RxHeaderError::GsoType(0x81))
        );
        let mut h = VnetHdr {
            gso_type: gso.gso_type | GSO_ECN,
            ..gso
        };
        fix_rx(&mut h, G_CSUM | G_TSO4 | G_ECN, 1).unwrap();
        let mut h = VnetHdr {
            gso_type: VIRTIO_NET_HDR_GSO_TCPV6 as u8,
            ..gso
        };
        assert_eq!(
            fix_rx(&mut h, G_CSUM | G_TSO4, 1),
            Err(RxHeaderError::GsoType(4))
        );
        // A plain frame's segmentation fields are cleared.
        let mut h = VnetHdr {
            gso_size: 7,
            hdr_len: 9,
            ..Default::default()
        };
        fix_rx(&mut h, G_CSUM, 1).unwrap();
        assert_eq!((h.gso_size, h.hdr_len), (0, 0));
    }
}
