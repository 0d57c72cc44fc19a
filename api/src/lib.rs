//! The `zygote` host tools: the CLI today, the host daemon and cluster
//! scheduler later. It starts VMs as `zygote-vmm` child processes and talks
//! to their guests through the in-guest agent.
//!
//! It must not: touch KVM itself (that is the VMM process's job, one VM per
//! process), or keep state that outlives a command without saying where.
#![deny(missing_docs)]

pub mod agent;
pub mod bench;
pub mod bench_clone;
pub mod clone;
pub mod master;
pub mod paths;
pub mod peer;
pub mod plot;
pub mod run;
pub mod stats;
pub mod store;
pub mod vm;
