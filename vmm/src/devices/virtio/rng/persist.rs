//! Saving and restoring the virtio-rng model ([`Rng`]) through [`Persist`].
//!
//! It owns the rng model's saved state, which is its version only: the
//! device keeps nothing across requests, and its features and queues are
//! the transport's (`devices/virtio/persist.rs`). It must not grow state
//! that the guest could observe without a version bump.

use serde::{Deserialize, Serialize};

use super::Rng;
use crate::persist::{check_version, Persist, VersionError};

/// Version of [`RngState`].
pub const RNG_STATE_VERSION: u32 = 1;

/// The virtio-rng model's state.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct RngState {
    /// [`RNG_STATE_VERSION`].
    pub version: u32,
}

/// What a restored rng needs besides its state: nothing (the host's
/// `getrandom(2)` is always there).
#[derive(Debug, Clone, Copy)]
pub struct RngConstructorArgs;

/// Why an rng state cannot be restored.
#[derive(Debug, thiserror::Error)]
pub enum RngRestoreError {
    /// Another state version.
    #[error(transparent)]
    Version(#[from] VersionError),
}

impl Persist for Rng {
    type State = RngState;
    type ConstructorArgs = RngConstructorArgs;
    type Error = RngRestoreError;

    fn save(&self) -> RngState {
        RngState {
            version: RNG_STATE_VERSION,
        }
    }

    fn restore(_args: RngConstructorArgs, state: &RngState) -> Result<Self, Self::Error> {
        check_version("rng", state.version, RNG_STATE_VERSION)?;
        Ok(Rng::new())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::devices::virtio::persist::DeviceModelState;
    use crate::devices::virtio::VirtioDevice;

    #[test]
    fn rng_state_round_trips_and_other_versions_are_refused() {
        let saved = Rng::new().save();
        let json = serde_json::to_string(&saved).unwrap();
        assert_eq!(json, r#"{"version":1}"#);
        let back: RngState = serde_json::from_str(&json).unwrap();
        let restored = Rng::restore(RngConstructorArgs, &back).unwrap();
        assert!(!restored.is_activated(), "the transport activates it");
        assert_eq!(restored.save(), saved);
        assert_eq!(restored.save_model(), DeviceModelState::Rng(saved));

        let e = Rng::restore(RngConstructorArgs, &RngState { version: 0 }).unwrap_err();
        assert_eq!(e.to_string(), "rng state version 0, this VMM reads 1");
        assert!(serde_json::from_str::<RngState>("{}").is_err());
    }
}
