//! Intel MultiProcessor Specification 1.4 table, so that the guest finds its
//! CPUs, the IOAPIC and the interrupt routing without ACPI (as Firecracker
//! does). Linux scans the first KiB of the EBDA at 639 KiB for it.

use vm_memory::{Bytes, GuestAddress, GuestMemoryMmap};

use crate::layout::{APIC_START, EBDA_START, IOAPIC_START, MAX_GSI};

/// Errors building the MP table.
#[derive(Debug, thiserror::Error)]
pub enum MpTableError {
    /// Too many vCPUs for the table (or the APIC ID space).
    #[error("{0} vCPUs do not fit in the MP table (at most {MAX_VCPUS})")]
    TooManyCpus(u8),
    /// No vCPU.
    #[error("a VM needs at least one vCPU")]
    NoCpus,
    /// The table could not be written.
    #[error("cannot write the MP table to guest memory: {0}")]
    Write(String),
}

/// Most vCPUs the table (one KiB in the EBDA) holds.
pub const MAX_VCPUS: u8 = 32;

const MPC_SPEC: u8 = 4;
const APIC_VERSION: u8 = 0x14;
const IOAPIC_VERSION: u8 = 0x11;
const CPU_ENABLED: u8 = 1;
const CPU_BOOTPROCESSOR: u8 = 2;
const MP_PROCESSOR: u8 = 0;
const MP_BUS: u8 = 1;
const MP_IOAPIC: u8 = 2;
const MP_INTSRC: u8 = 3;
const MP_LINTSRC: u8 = 4;
const MP_INT: u8 = 0;
const MP_NMI: u8 = 1;
const MP_EXTINT: u8 = 3;
const MPC_APIC_USABLE: u8 = 1;
/// CPU signature (family 6) and feature flags (FPU, APIC) for processor entries.
const CPU_STEPPING: u32 = 0x600;
const CPU_FEATURE_APIC: u32 = 1 << 9;
const CPU_FEATURE_FPU: u32 = 1;

fn checksum(bytes: &[u8]) -> u8 {
    bytes
        .iter()
        .fold(0u8, |a, b| a.wrapping_add(*b))
        .wrapping_neg()
}

/// Builds the MP floating pointer followed by the configuration table, as
/// the bytes to place at `base`.
pub fn build_mptable(base: u64, vcpus: u8) -> Result<Vec<u8>, MpTableError> {
    if vcpus == 0 {
        return Err(MpTableError::NoCpus);
    }
    if vcpus > MAX_VCPUS {
        return Err(MpTableError::TooManyCpus(vcpus));
    }
    let table_addr = base + 16;
    let ioapic_id = vcpus + 1;

    let mut entries = Vec::new();
    for cpu in 0..vcpus {
        let flags = CPU_ENABLED | if cpu == 0 { CPU_BOOTPROCESSOR } else { 0 };
        entries.extend_from_slice(&[MP_PROCESSOR, cpu, APIC_VERSION, flags]);
        entries.extend_from_slice(&CPU_STEPPING.to_le_bytes());
        entries.extend_from_slice(&(CPU_FEATURE_APIC | CPU_FEATURE_FPU).to_le_bytes());
        entries.extend_from_slice(&[0; 8]);
    }
    entries.extend_from_slice(&[MP_BUS, 0]);
    entries.extend_from_slice(b"ISA   ");
    entries.extend_from_slice(&[MP_IOAPIC, ioapic_id, IOAPIC_VERSION, MPC_APIC_USABLE]);
    entries.extend_from_slice(&(IOAPIC_START as u32).to_le_bytes());
    for irq in 0..=MAX_GSI as u8 {
        entries.extend_from_slice(&[MP_INTSRC, MP_INT, 0, 0, 0, irq, ioapic_id, irq]);
    }
    // LINT0: ExtINT from the PIC on the BSP; LINT1: NMI to every CPU.
    entries.extend_from_slice(&[MP_LINTSRC, MP_EXTINT, 0, 0, 0, 0, 0, 0]);
    entries.extend_from_slice(&[MP_LINTSRC, MP_NMI, 0, 0, 0, 0, 0xff, 1]);
    let entry_count = vcpus as u16 + 2 + (MAX_GSI as u16 + 1) + 2;

    let mut table = Vec::with_capacity(44 + entries.len());
    table.extend_from_slice(b"PCMP");
    table.extend_from_slice(&((44 + entries.len()) as u16).to_le_bytes());
    table.push(MPC_SPEC);
    table.push(0); // checksum, below
    table.extend_from_slice(b"ZYGOTE  ");
    table.extend_from_slice(b"MICROVM     ");
    table.extend_from_slice(&0u32.to_le_bytes()); // OEM table pointer
    table.extend_from_slice(&0u16.to_le_bytes()); // OEM table size
    table.extend_from_slice(&entry_count.to_le_bytes());
    table.extend_from_slice(&(APIC_START as u32).to_le_bytes());
    table.extend_from_slice(&0u32.to_le_bytes()); // extended table length + checksum
    table.extend_from_slice(&entries);
    table[7] = checksum(&table);

    let mut mpf = Vec::with_capacity(16);
    mpf.extend_from_slice(b"_MP_");
    mpf.extend_from_slice(&(table_addr as u32).to_le_bytes());
    mpf.push(1); // length in 16-byte units
    mpf.push(MPC_SPEC);
    mpf.push(0); // checksum, below
    mpf.extend_from_slice(&[0; 5]); // feature bytes: 0 = a configuration table is present
    mpf[10] = checksum(&mpf);

    mpf.extend_from_slice(&table);
    if mpf.len() > 1024 {
        return Err(MpTableError::TooManyCpus(vcpus));
    }
    Ok(mpf)
}

/// Writes the MP table for `vcpus` CPUs into the EBDA.
pub fn setup_mptable(mem: &GuestMemoryMmap, vcpus: u8) -> Result<(), MpTableError> {
    let bytes = build_mptable(EBDA_START, vcpus)?;
    mem.write_slice(&bytes, GuestAddress(EBDA_START))
        .map_err(|e| MpTableError::Write(e.to_string()))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sum(b: &[u8]) -> u8 {
        b.iter().fold(0u8, |a, x| a.wrapping_add(*x))
    }

    #[test]
    fn checksums_and_pointers_are_valid() {
        for cpus in [1u8, 2, 4, MAX_VCPUS] {
            let t = build_mptable(EBDA_START, cpus).unwrap();
            assert_eq!(&t[..4], b"_MP_");
            assert_eq!(sum(&t[..16]), 0, "floating pointer checksum");
            let ptr = u32::from_le_bytes(t[4..8].try_into().unwrap()) as u64;
            assert_eq!(ptr, EBDA_START + 16);
            let table = &t[16..];
            assert_eq!(&table[..4], b"PCMP");
            let len = u16::from_le_bytes(table[4..6].try_into().unwrap()) as usize;
            assert_eq!(len, table.len());
            assert_eq!(sum(table), 0, "table checksum");
            let count = u16::from_le_bytes(table[34..36].try_into().unwrap()) as usize;
            // Count the entries by walking them: processors are 20 bytes, the rest 8.
            let mut off = 44;
            let mut n = 0;
            while off < len {
                off += if table[off] == MP_PROCESSOR { 20 } else { 8 };
                n += 1;
            }
            assert_eq!(off, len);
            assert_eq!(n, count);
            assert!(t.len() <= 1024);
        }
    }

    #[test]
    fn cpu_counts_out_of_range_are_refused() {
        assert!(matches!(
            build_mptable(EBDA_START, 0),
            Err(MpTableError::NoCpus)
        ));
        assert!(matches!(
            build_mptable(EBDA_START, MAX_VCPUS + 1),
            Err(MpTableError::TooManyCpus(_))
        ));
    }
}
