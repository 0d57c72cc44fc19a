//! Every contract between zygote's processes, and nothing else: the agent
//! protocol (host ↔ in-guest agent, [`agent`], re-exported at the root), the
//! events a VMM process reports ([`events`]), the requests its control
//! socket takes ([`ctl`]), and the one typed description of how a VMM
//! process is launched ([`launch`]) that the VMM's argument parser and every
//! spawner share.
//!
//! It must not: depend on KVM, HTTP or an async runtime (the in-guest agent
//! links it and must stay small), or hold behaviour beyond encoding,
//! decoding and checking these messages.
#![deny(missing_docs)]

pub mod agent;
pub mod ctl;
pub mod events;
pub mod launch;

pub use agent::*;
