//! The guest-physical memory map of a zygote microVM (x86_64).
//!
//! ```text
//! 0x0000_0500  GDT            0x0000_0520  IDT (empty)
//! 0x0000_7000  zero page      0x0000_8ff0  boot stack top
//! 0x0000_9000  PML4  0xa000 PDPTE  0xb000 PDE (identity map of the first GiB)
//! 0x0002_0000  kernel command line
//! 0x0009_fc00  MP table (in the EBDA, where Linux scans for it)
//! 0x0100_0000  kernel (ELF p_paddr)          initramfs: top of low RAM
//! 0xc000_0000 .. 0x1_0000_0000  MMIO gap: virtio-mmio devices, IOAPIC, LAPIC
//! 0x1_0000_0000 ..  RAM above 3 GiB, if any
//! ```

/// GDT location.
pub const GDT_START: u64 = 0x500;
/// IDT location (a single zero entry: the kernel installs its own).
pub const IDT_START: u64 = 0x520;
/// Linux boot protocol zero page (`struct boot_params`).
pub const ZERO_PAGE_START: u64 = 0x7000;
/// Initial stack pointer.
pub const BOOT_STACK_POINTER: u64 = 0x8ff0;
/// Page map level 4.
pub const PML4_START: u64 = 0x9000;
/// Page directory pointer table.
pub const PDPTE_START: u64 = 0xa000;
/// Page directory (2 MiB pages).
pub const PDE_START: u64 = 0xb000;
/// Kernel command line.
pub const CMDLINE_START: u64 = 0x20000;
/// Largest command line the x86 kernel accepts.
pub const CMDLINE_MAX_SIZE: usize = 2048;
/// Start of the EBDA, where the MP table lives.
pub const EBDA_START: u64 = 0x9fc00;
/// Start of "high" memory: the kernel must be loaded above it.
pub const HIMEM_START: u64 = 0x10_0000;
/// Where RAM below the MMIO gap ends at most.
pub const MMIO_GAP_START: u64 = 0xc000_0000;
/// Where RAM continues above the MMIO gap.
pub const MMIO_GAP_END: u64 = 0x1_0000_0000;
/// First virtio-mmio device window; each device takes [`VIRTIO_MMIO_SIZE`].
pub const VIRTIO_MMIO_BASE: u64 = 0xd000_0000;
/// Size of one virtio-mmio device window.
pub const VIRTIO_MMIO_SIZE: u64 = 0x1000;
/// First GSI handed to virtio devices (0-4 are legacy: PIT, keyboard, cascade, COM2, COM1).
pub const VIRTIO_FIRST_GSI: u32 = 5;
/// Last usable IOAPIC GSI.
pub const MAX_GSI: u32 = 23;
/// IOAPIC base address.
pub const IOAPIC_START: u64 = 0xfec0_0000;
/// Local APIC base address.
pub const APIC_START: u64 = 0xfee0_0000;
/// Address used for KVM's TSS (3 pages, inside the MMIO gap).
pub const KVM_TSS_ADDRESS: u64 = 0xfffb_d000;
/// COM1 GSI.
pub const SERIAL_GSI: u32 = 4;
