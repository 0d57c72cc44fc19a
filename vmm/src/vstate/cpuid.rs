//! The CPUID a vCPU sees: what KVM supports, with topology, the hypervisor
//! bit, and no invariant TSC, so that the guest uses kvm-clock.

use kvm_bindings::CpuId;

const LEAF_FEATURES: u32 = 1;
const LEAF_EXT_TOPOLOGY: u32 = 0xb;
const LEAF_EXT_TOPOLOGY_V2: u32 = 0x1f;
const LEAF_POWER_MGMT: u32 = 0x8000_0007;
const ECX_HYPERVISOR: u32 = 1 << 31;
const EDX_INVARIANT_TSC: u32 = 1 << 8;
const EDX_HTT: u32 = 1 << 28;

/// Adjusts `cpuid` (from `KVM_GET_SUPPORTED_CPUID`) for vCPU `index` of `count`.
pub fn filter_cpuid(cpuid: &mut CpuId, index: u8, count: u8) {
    for entry in cpuid.as_mut_slice() {
        match entry.function {
            LEAF_FEATURES => {
                // Initial APIC ID, logical processor count, hypervisor present.
                entry.ebx =
                    (entry.ebx & 0x0000_ffff) | (u32::from(index) << 24) | (u32::from(count) << 16);
                entry.ecx |= ECX_HYPERVISOR;
                if count > 1 {
                    entry.edx |= EDX_HTT;
                } else {
                    entry.edx &= !EDX_HTT;
                }
            }
            LEAF_EXT_TOPOLOGY | LEAF_EXT_TOPOLOGY_V2 => {
                // x2APIC ID of this vCPU; one thread per core, `count` cores.
                entry.edx = u32::from(index);
                match entry.index {
                    0 => {
                        entry.eax = 0;
                        entry.ebx = 1;
                        entry.ecx = 1 << 8;
                    }
                    1 => {
                        entry.eax = id_bits(count);
                        entry.ebx = u32::from(count);
                        entry.ecx = 2 << 8 | 1;
                    }
                    _ => {
                        entry.eax = 0;
                        entry.ebx = 0;
                        entry.ecx = entry.index;
                    }
                }
            }
            LEAF_POWER_MGMT => {
                // Without an invariant TSC the guest keeps kvm-clock (rated
                // above the TSC): a clock that KVM_GET/SET_CLOCK can carry
                // across a snapshot, unlike a raw TSC.
                entry.edx &= !EDX_INVARIANT_TSC;
            }
            _ => {}
        }
    }
}

/// Bits of the APIC ID that number `count` cores: ceil(log2(count)).
fn id_bits(count: u8) -> u32 {
    if count <= 1 {
        0
    } else {
        32 - (u32::from(count) - 1).leading_zeros()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use kvm_bindings::kvm_cpuid_entry2;

    #[test]
    fn id_bits_round_up() {
        assert_eq!([1, 2, 3, 4, 5].map(id_bits), [0, 1, 2, 2, 3]);
    }

    #[test]
    fn apic_id_and_hypervisor_bit_are_set() {
        let mut c = CpuId::from_entries(&[kvm_cpuid_entry2 {
            function: 1,
            ebx: 0xffff_0800,
            ..Default::default()
        }])
        .unwrap();
        filter_cpuid(&mut c, 3, 4);
        let e = c.as_slice()[0];
        assert_eq!(e.ebx >> 24, 3);
        assert_eq!((e.ebx >> 16) & 0xff, 4);
        assert_eq!(e.ebx & 0xffff, 0x0800);
        assert_ne!(e.ecx & ECX_HYPERVISOR, 0);
    }
}
