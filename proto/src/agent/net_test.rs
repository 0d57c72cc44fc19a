//! The agent's TCP test server ([`super::Request::NetTest`]): what a client
//! sends on each TCP connection and what it gets back, so that the host can
//! measure a guest's network (throughput, request latency) with nothing
//! spawned in the guest.
//!
//! A connection's first byte is its [`Mode`]:
//!
//! | mode | client sends after the mode byte | server answers |
//! |------|----------------------------------|----------------|
//! | [`Mode::Sink`] `s` | any bytes, then end of stream (shutdown of its write side) | the number of bytes it read after the mode byte, `u64` big-endian, then closes |
//! | [`Mode::Echo`] `e` | any bytes, then end of stream | every byte after the mode byte, as it reads them, then closes at the client's end of stream |
//! | [`Mode::Source`] `o` | exactly a length, `u64` big-endian (at most [`MAX_SOURCE_BYTES`]) | that many bytes (zeros), then closes |
//!
//! Any other first byte, a source length above the limit, or a connection
//! idle for [`IDLE_TIMEOUT`] or open longer than [`CONNECTION_LIMIT`] is
//! closed without an answer. The server serves a few connections at a time
//! (more wait for their turn in the listen backlog): it measures, it is not
//! a web server.

use std::time::Duration;

/// What a connection of the test server does, from its first byte.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[repr(u8)]
pub enum Mode {
    /// Reads to the end of stream, answers with the byte count.
    Sink = b's',
    /// Writes back what it reads, to the end of stream.
    Echo = b'e',
    /// Reads a length, writes that many bytes.
    Source = b'o',
}

impl Mode {
    /// The mode for a first byte, if it names one.
    pub fn from_u8(b: u8) -> Option<Self> {
        match b {
            b's' => Some(Self::Sink),
            b'e' => Some(Self::Echo),
            b'o' => Some(Self::Source),
            _ => None,
        }
    }
}

/// Most bytes one [`Mode::Source`] connection may ask for (16 GiB).
pub const MAX_SOURCE_BYTES: u64 = 16 << 30;

/// A connection on which nothing can be read or written for this long is
/// closed.
pub const IDLE_TIMEOUT: Duration = Duration::from_secs(30);

/// A connection is closed after this long, whatever it is doing.
pub const CONNECTION_LIMIT: Duration = Duration::from_secs(300);

/// The whole request of a [`Mode::Source`] connection asking for `len`
/// bytes: the mode byte and the length.
pub fn source_request(len: u64) -> [u8; 9] {
    let mut req = [0u8; 9];
    req[0] = Mode::Source as u8;
    req[1..].copy_from_slice(&len.to_be_bytes());
    req
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn modes_and_their_bytes() {
        for m in [Mode::Sink, Mode::Echo, Mode::Source] {
            assert_eq!(Mode::from_u8(m as u8), Some(m));
        }
        let known = (0..=255u8).filter(|b| Mode::from_u8(*b).is_some()).count();
        assert_eq!(known, 3);
        assert_eq!(source_request(0x0102), [b'o', 0, 0, 0, 0, 0, 0, 1, 2]);
    }
}
