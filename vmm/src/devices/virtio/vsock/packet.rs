//! virtio-vsock packet header and protocol constants.

/// Size of the packet header (`struct virtio_vsock_hdr`).
pub const HDR_SIZE: usize = 44;
/// Largest payload the device accepts from or sends to the guest (Linux uses 64 KiB).
pub const MAX_PKT_PAYLOAD: usize = 64 << 10;

/// The host's CID.
pub const HOST_CID: u64 = 2;

/// Stream socket type.
pub const TYPE_STREAM: u16 = 1;

/// Connection request.
pub const OP_REQUEST: u16 = 1;
/// Connection accepted.
pub const OP_RESPONSE: u16 = 2;
/// Connection reset / refused.
pub const OP_RST: u16 = 3;
/// Orderly shutdown of one or both directions (see `SHUTDOWN_*` flags).
pub const OP_SHUTDOWN: u16 = 4;
/// Stream data.
pub const OP_RW: u16 = 5;
/// Unsolicited credit information.
pub const OP_CREDIT_UPDATE: u16 = 6;
/// Request for a credit update.
pub const OP_CREDIT_REQUEST: u16 = 7;

/// Shutdown flag: the sender will not receive any more data.
pub const SHUTDOWN_RCV: u32 = 1;
/// Shutdown flag: the sender will not send any more data.
pub const SHUTDOWN_SEND: u32 = 2;

/// `struct virtio_vsock_hdr` (all fields little endian on the wire).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct VsockHeader {
    /// Source CID.
    pub src_cid: u64,
    /// Destination CID.
    pub dst_cid: u64,
    /// Source port.
    pub src_port: u32,
    /// Destination port.
    pub dst_port: u32,
    /// Payload length.
    pub len: u32,
    /// Socket type (`TYPE_STREAM`).
    pub type_: u16,
    /// Operation (`OP_*`).
    pub op: u16,
    /// Operation flags (`SHUTDOWN_*` for `OP_SHUTDOWN`).
    pub flags: u32,
    /// Receive buffer space of the sender.
    pub buf_alloc: u32,
    /// Bytes the sender consumed from its receive buffer so far (wrapping).
    pub fwd_cnt: u32,
}

impl VsockHeader {
    /// Parses a header from its wire format.
    pub fn from_bytes(b: &[u8; HDR_SIZE]) -> Self {
        let u64_at = |o: usize| u64::from_le_bytes(b[o..o + 8].try_into().unwrap_or_default());
        let u32_at = |o: usize| u32::from_le_bytes(b[o..o + 4].try_into().unwrap_or_default());
        let u16_at = |o: usize| u16::from_le_bytes(b[o..o + 2].try_into().unwrap_or_default());
        VsockHeader {
            src_cid: u64_at(0),
            dst_cid: u64_at(8),
            src_port: u32_at(16),
            dst_port: u32_at(20),
            len: u32_at(24),
            type_: u16_at(28),
            op: u16_at(30),
            flags: u32_at(32),
            buf_alloc: u32_at(36),
            fwd_cnt: u32_at(40),
        }
    }

    /// Serializes the header to its wire format.
    pub fn to_bytes(&self) -> [u8; HDR_SIZE] {
        let mut b = [0u8; HDR_SIZE];
        b[0..8].copy_from_slice(&self.src_cid.to_le_bytes());
        b[8..16].copy_from_slice(&self.dst_cid.to_le_bytes());
        b[16..20].copy_from_slice(&self.src_port.to_le_bytes());
        b[20..24].copy_from_slice(&self.dst_port.to_le_bytes());
        b[24..28].copy_from_slice(&self.len.to_le_bytes());
        b[28..30].copy_from_slice(&self.type_.to_le_bytes());
        b[30..32].copy_from_slice(&self.op.to_le_bytes());
        b[32..36].copy_from_slice(&self.flags.to_le_bytes());
        b[36..40].copy_from_slice(&self.buf_alloc.to_le_bytes());
        b[40..44].copy_from_slice(&self.fwd_cnt.to_le_bytes());
        b
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn header_round_trip() {
        let h = VsockHeader {
            src_cid: 3,
            dst_cid: HOST_CID,
            src_port: 1024,
            dst_port: 1 << 30,
            len: 5,
            type_: TYPE_STREAM,
            op: OP_RW,
            flags: 0,
            buf_alloc: 262_144,
            fwd_cnt: 77,
        };
        let b = h.to_bytes();
        assert_eq!(&b[0..8], &3u64.to_le_bytes());
        assert_eq!(&b[30..32], &OP_RW.to_le_bytes());
        assert_eq!(VsockHeader::from_bytes(&b), h);
    }
}
