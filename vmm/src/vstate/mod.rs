//! KVM objects: the VM (memory slots, irqchip, PIT) and its vCPUs, their
//! saved state ([`state`]), the host fingerprint that state depends on
//! ([`fingerprint`]), and the counts of what wakes the VM ([`wakeups`]).
//! Only this module and its children issue KVM vCPU and VM ioctls; devices
//! must not.

pub mod control;
pub mod cpuid;
pub mod fingerprint;
pub mod state;
pub mod vcpu;
pub mod vm;
pub mod wakeups;
