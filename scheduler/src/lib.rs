//! zygote's cluster scheduler. It owns the pure placement core
//! ([`placement`]): given what the hosts report and what a clone needs, which
//! host each clone goes to, with placements in flight counted; and the
//! [`store`]: what the scheduler keeps across restarts (apps, hosts,
//! placement records, leases), behind one trait with an embedded (redb)
//! and an etcd backend, with change watches and leader election.
//!
//! It must not: do I/O outside [`store`]'s backends, read a clock (callers
//! pass times in), use randomness in placement, or speak HTTP. Membership,
//! the reconcile loop and the API will live in their own modules
//! (`reconcile`, `membership`) and call into [`placement`] and [`store`],
//! never the other way round.
#![deny(missing_docs)]
#![forbid(unsafe_code)]

pub mod placement;
pub mod store;
