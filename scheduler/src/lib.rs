//! zygote's cluster scheduler. It owns the pure placement core
//! ([`placement`]): given what the hosts report and what a clone needs, which
//! host each clone goes to, with placements in flight counted; and the
//! [`store`]: what the scheduler keeps across restarts (apps, hosts,
//! placement records, leases), behind one trait with an embedded (redb)
//! and an etcd backend, with change watches and leader election.
//!
//! [`service`] is the scheduler itself over a store: apps declared, host
//! heartbeats (membership by leases), the reconcile step; [`wire`] holds
//! the messages of its API and of the heartbeat.
//!
//! It must not: do I/O outside [`store`]'s backends, read a clock (callers
//! pass times in), use randomness in placement, or speak HTTP (the `api`
//! crate serves [`service`]). [`service`] calls into [`placement`] and
//! [`store`], never the other way round.
#![deny(missing_docs)]
#![forbid(unsafe_code)]

pub mod placement;
pub mod service;
pub mod store;
pub mod wire;
