//! zygote's virtual machine monitor: everything that runs inside one
//! `zygote-vmm` process, which runs exactly one microVM.
//!
//! It owns the KVM objects ([`vstate`]), guest RAM ([`memory`]), loading a
//! Linux guest ([`boot`]), the emulated devices ([`devices`]) and assembling
//! and running them ([`builder`]). It reports to whoever started it through
//! [`proto::events`] on stdout, and takes requests on [`ctl`].
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
pub mod snapshot;
pub mod vstate;
