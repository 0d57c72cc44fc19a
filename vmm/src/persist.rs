//! The one way a piece of the VM is saved into a snapshot and rebuilt from
//! it: the [`Persist`] trait (Firecracker's shape), and the version every
//! saved state carries ([`VersionError`]).
//!
//! Each device implements [`Persist`] in a `persist.rs` beside it
//! (`devices/virtio/persist.rs` for the virtio-mmio transport and its
//! queues, `devices/virtio/{vsock,rng}/persist.rs` for the device models,
//! `devices/legacy/persist.rs` for the serial port); `builder.rs` saves and
//! restores them through this trait only.
//!
//! This module must not know any device, and a `restore` must treat its
//! state as untrusted input: a snapshot is a file anyone may have written.
//! Every index, length and address in it is checked before use, and a state
//! that does not fit is an error, never a panic.

/// A part of the VM that a snapshot saves and a clone rebuilds.
///
/// `save` reads the live object (the VM paused, so nothing changes under
/// it) into a plain, serde-serializable [`Persist::State`]. `restore` builds
/// a new object from such a state and from what the state cannot carry
/// (guest memory, host sockets, file descriptors: the
/// [`Persist::ConstructorArgs`]). For every object `x`,
/// `restore(args, &x.save())?.save() == x.save()`: the round-trip tests next
/// to each implementation check it.
pub trait Persist: Sized {
    /// The saved state: plain data, with its own version field.
    type State;
    /// What `restore` needs besides the state.
    type ConstructorArgs;
    /// Why a state cannot be restored.
    type Error: std::error::Error;

    /// Reads this object's state.
    fn save(&self) -> Self::State;

    /// Builds an object from `state`, refusing one that does not fit (see
    /// the module docs: the state is untrusted).
    fn restore(args: Self::ConstructorArgs, state: &Self::State) -> Result<Self, Self::Error>;
}

/// A saved state of a version this VMM does not read.
///
/// Every state carries its own version, which its `restore` checks before
/// it uses anything else in it. A change to what a state means or holds
/// bumps its version (and [`crate::snapshot::STATE_VERSION`], which is
/// checked before the VM state is parsed at all).
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{what} state version {found}, this VMM reads {supported}")]
pub struct VersionError {
    /// Whose state: "serial", "vsock", "virtio-mmio transport"...
    pub what: &'static str,
    /// The version in the state.
    pub found: u32,
    /// The version this VMM reads.
    pub supported: u32,
}

/// Checks that the state of `what` is of version `supported`.
pub fn check_version(what: &'static str, found: u32, supported: u32) -> Result<(), VersionError> {
    if found == supported {
        Ok(())
    } else {
        Err(VersionError {
            what,
            found,
            supported,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn versions_must_match_exactly() {
        assert_eq!(check_version("serial", 1, 1), Ok(()));
        let e = check_version("serial", 2, 1).unwrap_err();
        assert_eq!(e.to_string(), "serial state version 2, this VMM reads 1");
        assert!(check_version("serial", 0, 1).is_err());
    }
}
