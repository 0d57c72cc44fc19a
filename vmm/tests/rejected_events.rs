//! End to end through a real `zygote-vmm` process: what a device refuses
//! from the guest reaches the events stream.
//!
//! The guest is a few instructions (a hand-made ELF, no Linux: it runs in
//! milliseconds even where KVM emulates guest kernels): they map the virtio
//! window, write into vsock's read-only configuration space, which the
//! device refuses, and reset the machine through the i8042. The VMM must
//! report the refusal as a `device_rejected` event before its `exit`.
//! Needs /dev/kvm, like every test that runs a VM.

use std::path::PathBuf;
use std::process::Command;

use proto::events::{Event, ExitReason};
use proto::launch::{BootSource, VmSource, VmmLaunch};

/// Where the ELF's one segment is loaded and starts (the VMM's high memory).
const LOAD: u64 = 0x10_0000;

/// The guest: map the 2 MiB page at 0xd000_0000 (the first virtio window,
/// vsock's) through a new page directory at 0x30_0000 in the third PDPT
/// entry, write 1 to the window's configuration space (offset 0x100), then
/// reset through the i8042 (port 0x64, 0xfe).
#[rustfmt::skip]
const CODE: &[u8] = &[
    0x48, 0xb8, 0x83, 0x00, 0x00, 0xd0, 0x00, 0x00, 0x00, 0x00, // mov rax, 0xd000_0083 (2 MiB, rw, present)
    0x48, 0xa3, 0x00, 0x04, 0x30, 0x00, 0x00, 0x00, 0x00, 0x00, // mov [0x30_0400], rax (PD entry 0x80)
    0x48, 0xb8, 0x03, 0x00, 0x30, 0x00, 0x00, 0x00, 0x00, 0x00, // mov rax, 0x30_0003 (the PD, rw, present)
    0x48, 0xa3, 0x18, 0xa0, 0x00, 0x00, 0x00, 0x00, 0x00, 0x00, // mov [0xa018], rax (PDPT entry 3)
    0x0f, 0x20, 0xd8,                                           // mov rax, cr3
    0x0f, 0x22, 0xd8,                                           // mov cr3, rax (flush the TLB)
    0xb8, 0x01, 0x00, 0x00, 0x00,                               // mov eax, 1
    0xa3, 0x00, 0x01, 0x00, 0xd0, 0x00, 0x00, 0x00, 0x00,       // mov [0xd000_0100], eax
    0xb0, 0xfe,                                                 // mov al, 0xfe
    0xe6, 0x64,                                                 // out 0x64, al
    0xf4,                                                       // hlt
    0xeb, 0xfd,                                                 // jmp hlt
];

/// A minimal ELF64 executable holding `code` at [`LOAD`], starting there.
fn elf(code: &[u8]) -> Vec<u8> {
    const EHDR: usize = 64;
    const PHDR: usize = 56;
    let mut f = Vec::new();
    f.extend_from_slice(b"\x7fELF");
    f.extend_from_slice(&[2, 1, 1, 0]); // 64-bit, little endian, version 1, System V
    f.extend_from_slice(&[0; 8]);
    f.extend_from_slice(&2u16.to_le_bytes()); // ET_EXEC
    f.extend_from_slice(&0x3eu16.to_le_bytes()); // x86-64
    f.extend_from_slice(&1u32.to_le_bytes());
    f.extend_from_slice(&LOAD.to_le_bytes()); // entry
    f.extend_from_slice(&(EHDR as u64).to_le_bytes()); // program headers
    f.extend_from_slice(&0u64.to_le_bytes()); // no section headers
    f.extend_from_slice(&0u32.to_le_bytes());
    f.extend_from_slice(&(EHDR as u16).to_le_bytes());
    f.extend_from_slice(&(PHDR as u16).to_le_bytes());
    f.extend_from_slice(&1u16.to_le_bytes());
    f.extend_from_slice(&[0; 6]); // section header size, count, names
    assert_eq!(f.len(), EHDR);
    let offset = (EHDR + PHDR) as u64;
    f.extend_from_slice(&1u32.to_le_bytes()); // PT_LOAD
    f.extend_from_slice(&5u32.to_le_bytes()); // r-x
    f.extend_from_slice(&offset.to_le_bytes());
    f.extend_from_slice(&LOAD.to_le_bytes()); // vaddr
    f.extend_from_slice(&LOAD.to_le_bytes()); // paddr
    f.extend_from_slice(&(code.len() as u64).to_le_bytes());
    f.extend_from_slice(&(code.len() as u64).to_le_bytes());
    f.extend_from_slice(&0x1000u64.to_le_bytes());
    assert_eq!(f.len(), EHDR + PHDR);
    f.extend_from_slice(code);
    f
}

/// A path for this test's files, removed first.
fn scratch(name: &str) -> PathBuf {
    let p = std::env::temp_dir().join(format!("zygote-rejected-{}-{name}", std::process::id()));
    let _ = std::fs::remove_file(&p);
    p
}

#[test]
fn a_refused_guest_write_reaches_the_events_stream() {
    let kernel = scratch("guest.elf");
    std::fs::write(&kernel, elf(CODE)).unwrap();
    let vsock = scratch("vsock.sock");
    let mut boot = BootSource::new(&kernel);
    boot.memory_mib = 16;
    let mut launch = VmmLaunch::new(VmSource::Boot(boot));
    launch.vsock = Some(vsock.clone());
    let out = Command::new(env!("CARGO_BIN_EXE_zygote-vmm"))
        .args(launch.to_args())
        .output()
        .expect("zygote-vmm runs");
    let _ = std::fs::remove_file(&kernel);
    let _ = std::fs::remove_file(&vsock);
    let stdout = String::from_utf8_lossy(&out.stdout);
    let events: Vec<Event> = stdout
        .lines()
        .map(|l| serde_json::from_str(l).unwrap_or_else(|e| panic!("{l}: {e}")))
        .collect();
    let stderr = String::from_utf8_lossy(&out.stderr);
    let rejected: Vec<_> = events
        .iter()
        .filter_map(|e| match e {
            Event::DeviceRejected {
                device,
                count,
                last,
                ..
            } => Some((device.as_str(), *count, last.as_str())),
            _ => None,
        })
        .collect();
    assert_eq!(
        rejected,
        vec![(
            "vsock",
            1,
            "write to the read-only configuration space ignored"
        )],
        "events: {stdout}\nstderr: {stderr}"
    );
    // Reported before the end, and the end is the guest's reset.
    match events.last() {
        Some(Event::Exit { reason, .. }) => assert_eq!(*reason, ExitReason::Shutdown),
        other => panic!("last event {other:?}; stderr: {stderr}"),
    }
    assert!(out.status.success(), "stderr: {stderr}");
}
