//! The zygote host runtime as a library: everything one host does with its
//! VMs, used the same way by the CLI (locally) and by the daemon.
//!
//! It owns the VMM process handle ([`vmm::VmmProcess`]: one type for booted
//! VMs, masters and clones, one timeline), the agent client ([`agent`]), the
//! state directory ([`store`]), masters ([`master`]), clones ([`clone`]),
//! one-shot runs ([`run`]), `/proc` readings ([`procfs`]), and the
//! long-lived service the daemon serves ([`runtime`]: tenants, admission,
//! supervision by pidfd in [`supervise`], TTLs, adoption, [`metrics`]).
//!
//! It must not: touch KVM (that is the VMM process's job, one VM per
//! process; this crate does not link the `vmm` crate), speak HTTP or parse
//! command lines (that is `api` and `cli`), or keep state that outlives a
//! call anywhere but the state directory.
#![deny(missing_docs)]

pub mod agent;
pub mod clone;
pub mod confine;
pub mod master;
pub mod metrics;
pub mod net;
pub mod paths;
pub mod procfs;
pub mod run;
pub mod runtime;
pub mod store;
pub mod supervise;
pub mod transfer;
pub mod vmm;
pub mod vmnet;

/// An error and its causes, once each: "a: b: c" (a cause whose text the
/// message already holds is not repeated). The API's error bodies use it.
pub fn error_chain(e: &dyn std::error::Error) -> String {
    let mut s = e.to_string();
    let mut cur = e.source();
    while let Some(c) = cur {
        let t = c.to_string();
        if !s.contains(&t) {
            s.push_str(": ");
            s.push_str(&t);
        }
        cur = c.source();
    }
    s
}
