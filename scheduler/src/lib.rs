//! zygote's cluster scheduler. For now it owns only the pure placement core
//! ([`placement`]): given what the hosts report and what a clone needs, which
//! host each clone goes to, with placements in flight counted.
//!
//! It must not: do I/O, read a clock, use randomness in placement, or speak
//! HTTP. Membership, the reconcile loop, the store and the API will live in
//! their own modules (`reconcile`, `store`, `membership`) and call into
//! [`placement`], never the other way round.
#![deny(missing_docs)]
#![forbid(unsafe_code)]

pub mod placement;
