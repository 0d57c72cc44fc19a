//! zygote's virtual machine monitor: everything that runs inside one
//! `zygote-vmm` process, which runs exactly one microVM.
//!
//! It owns the KVM objects ([`vstate`]), guest RAM ([`memory`]), loading a
//! Linux guest ([`boot`]), the emulated devices ([`devices`]) and assembling
//! and running them ([`builder`]); what a frozen VM is ([`snapshot`]) and how
//! each part of it is saved and restored ([`persist`]). It reports to
//! whoever started it through [`proto::events`] on stdout, and takes requests
//! on [`ctl`]. Once the guest runs, every thread is confined to its own
//! allow-list of system calls ([`seccomp`]). Its errors are typed, one enum per module, and keep their
//! causes ([`error_chain`] prints them).
//!
//! It must not: run more than one VM per process (a guest that escapes
//! reaches one VM only), use an async runtime on vCPU or device paths (those
//! are threads and one epoll loop), or trust anything the guest wrote into
//! memory or device registers.
#![deny(missing_docs)]

pub mod boot;
pub mod builder;
pub mod ctl;
pub mod devices;
pub mod layout;
pub mod memory;
pub mod persist;
pub mod seccomp;
pub mod snapshot;
pub mod vstate;

/// An error and its causes, once each: "a: b: c" (a cause whose text the
/// message already holds is not repeated).
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

#[cfg(test)]
mod tests {
    use super::*;

    #[derive(Debug, thiserror::Error)]
    #[error("cannot restore the snapshot")]
    struct Outer(#[source] Middle);

    #[derive(Debug, thiserror::Error)]
    #[error("vCPU 0")]
    struct Middle(#[source] std::io::Error);

    #[test]
    fn the_chain_names_every_cause_once() {
        let e = Outer(Middle(std::io::Error::other("KVM said no")));
        assert_eq!(
            error_chain(&e),
            "cannot restore the snapshot: vCPU 0: KVM said no"
        );
        let io = std::io::Error::other("x");
        assert_eq!(error_chain(&io), "x");
    }
}
