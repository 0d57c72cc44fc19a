//! Everything that measures zygote: cold boots (`bench boot`), clones
//! against cold boots and QEMU (`bench clone`), the daemon's HTTP layer
//! (`bench api`), the scheduler's placement core (`bench placement`,
//! [`bench_placement`]), fresh process vs fork
//! ([`fork_bench`]), a guest's network through the agent's test server
//! ([`net_probe`]), the QEMU peer ([`peer`]), statistics and plots.
//!
//! It must not: be linked into the product binaries (`zygote`,
//! `zygote-vmm`), or measure anything the product does not do the same way
//! (it drives the `host` library and the real VMM binary).
#![deny(missing_docs)]

pub mod bench;
pub mod bench_api;
pub mod bench_clone;
pub mod bench_placement;
pub mod bench_scale;
pub mod fork_bench;
pub mod net_probe;
pub mod peer;
pub mod plot;
pub mod stats;
