//! KVM objects: the VM (memory slots, irqchip, PIT) and its vCPUs.

pub mod control;
pub mod cpuid;
pub mod state;
pub mod vcpu;
pub mod vm;
