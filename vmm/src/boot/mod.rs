//! Loading a Linux guest for the 64-bit boot protocol: kernel (ELF vmlinux
//! or bzImage), initramfs, command line, zero page with e820, MP table.

pub mod mptable;

use std::fs::File;
use std::io::{Read, Seek, SeekFrom};
use std::path::Path;

use linux_loader::cmdline::Cmdline;
use linux_loader::configurator::linux::LinuxBootConfigurator;
use linux_loader::configurator::{BootConfigurator, BootParams};
use linux_loader::loader::bootparam::{boot_e820_entry, boot_params};
use linux_loader::loader::{load_cmdline, BzImage, Elf, KernelLoader};
use vm_memory::{
    Address, Bytes, GuestAddress, GuestMemoryBackend, GuestMemoryMmap, GuestMemoryRegion,
};

use crate::layout::*;

/// Errors loading a guest.
#[derive(Debug, thiserror::Error)]
pub enum BootError {
    /// The kernel file cannot be opened.
    #[error("cannot open kernel {path}")]
    OpenKernel {
        /// Path given.
        path: String,
        /// OS error.
        #[source]
        source: std::io::Error,
    },
    /// The kernel file is neither an ELF vmlinux nor a bzImage.
    #[error("{path} is not a Linux kernel (neither an x86_64 ELF vmlinux nor a bzImage)")]
    NotAKernel {
        /// Path given.
        path: String,
    },
    /// The kernel could not be loaded into guest memory.
    #[error(
        "cannot load kernel {path} into guest memory ({detail}); is guest memory large enough?"
    )]
    LoadKernel {
        /// Path given.
        path: String,
        /// What the loader said.
        detail: String,
    },
    /// The initramfs cannot be read.
    #[error("cannot read initramfs {path}")]
    Initramfs {
        /// Path given.
        path: String,
        /// OS error.
        #[source]
        source: std::io::Error,
    },
    /// Kernel and initramfs do not fit in guest memory.
    #[error("guest memory too small: kernel ends at {kernel_end:#x}, initramfs needs {initrd_size} bytes below {limit:#x}")]
    TooSmall {
        /// End of the loaded kernel.
        kernel_end: u64,
        /// Size of the initramfs.
        initrd_size: u64,
        /// Highest address the initramfs may reach.
        limit: u64,
    },
    /// The command line is invalid or too long.
    #[error("invalid kernel command line: {0}")]
    Cmdline(String),
    /// Writing boot structures to guest memory failed.
    #[error("cannot write {what} to guest memory: {detail}")]
    GuestWrite {
        /// Which structure.
        what: &'static str,
        /// Details.
        detail: String,
    },
    /// The MP table does not fit.
    #[error("MP table: {0}")]
    MpTable(#[from] mptable::MpTableError),
}

/// Where the guest starts and what it was given.
#[derive(Debug, Clone, Copy)]
pub struct BootInfo {
    /// 64-bit entry point.
    pub entry: GuestAddress,
}

/// What to boot.
#[derive(Debug, Clone)]
pub struct BootSpec<'a> {
    /// vmlinux or bzImage.
    pub kernel: &'a Path,
    /// Optional initramfs (uncompressed or compressed cpio).
    pub initrd: Option<&'a Path>,
    /// Full kernel command line.
    pub cmdline: &'a str,
    /// Number of vCPUs (for the MP table).
    pub vcpus: u8,
}

/// Loads kernel, initramfs and command line; writes zero page, e820 and MP table.
pub fn load_guest(mem: &GuestMemoryMmap, spec: &BootSpec) -> Result<BootInfo, BootError> {
    let path = spec.kernel.display().to_string();
    let mut kernel = File::open(spec.kernel).map_err(|source| BootError::OpenKernel {
        path: path.clone(),
        source,
    })?;
    let kind = sniff_kernel(&mut kernel).map_err(|source| BootError::OpenKernel {
        path: path.clone(),
        source,
    })?;
    let loaded = match kind {
        KernelKind::Elf => Elf::load(mem, None, &mut kernel, Some(GuestAddress(HIMEM_START))),
        KernelKind::BzImage => {
            BzImage::load(mem, None, &mut kernel, Some(GuestAddress(HIMEM_START)))
        }
        KernelKind::Unknown => return Err(BootError::NotAKernel { path }),
    }
    .map_err(|e| match e {
        linux_loader::loader::Error::Elf(
            linux_loader::loader::elf::Error::InvalidElfMagicNumber,
        )
        | linux_loader::loader::Error::Elf(
            linux_loader::loader::elf::Error::BigEndianElfOnLittle,
        ) => BootError::NotAKernel { path: path.clone() },
        other => BootError::LoadKernel {
            path: path.clone(),
            detail: other.to_string(),
        },
    })?;

    let entry = match kind {
        // The 64-bit entry of a bzImage is 0x200 past the protected-mode code.
        KernelKind::BzImage => loaded.kernel_load.unchecked_add(0x200),
        _ => loaded.kernel_load,
    };

    let mut params = boot_params::default();
    if let Some(hdr) = loaded.setup_header {
        params.hdr = hdr;
    }
    params.hdr.type_of_loader = 0xff;
    params.hdr.boot_flag = 0xaa55;
    params.hdr.header = 0x5372_6448; // "HdrS"
    params.hdr.loadflags |= 0x01; // LOADED_HIGH
    params.hdr.kernel_alignment = 0x0100_0000;

    let mut cmdline =
        Cmdline::new(CMDLINE_MAX_SIZE).map_err(|e| BootError::Cmdline(e.to_string()))?;
    cmdline
        .insert_str(spec.cmdline)
        .map_err(|e| BootError::Cmdline(e.to_string()))?;
    load_cmdline(mem, GuestAddress(CMDLINE_START), &cmdline)
        .map_err(|e| BootError::Cmdline(e.to_string()))?;
    params.hdr.cmd_line_ptr = CMDLINE_START as u32;
    params.hdr.cmdline_size = spec.cmdline.len() as u32 + 1;

    let low_end = mem
        .iter()
        .next()
        .map(|r| r.start_addr().raw_value() + r.len())
        .unwrap_or(0);
    if let Some(initrd) = spec.initrd {
        let ipath = initrd.display().to_string();
        let mut f = File::open(initrd).map_err(|source| BootError::Initramfs {
            path: ipath.clone(),
            source,
        })?;
        let size = f
            .seek(SeekFrom::End(0))
            .map_err(|source| BootError::Initramfs {
                path: ipath.clone(),
                source,
            })?;
        f.rewind().map_err(|source| BootError::Initramfs {
            path: ipath.clone(),
            source,
        })?;
        let max = if params.hdr.initrd_addr_max != 0 {
            u64::from(params.hdr.initrd_addr_max) + 1
        } else {
            0x8000_0000
        };
        let limit = low_end.min(max);
        let start = limit.checked_sub(size).map(|a| a & !0xfff);
        let kernel_end = loaded.kernel_end;
        let start = match start {
            Some(s) if s >= kernel_end => s,
            _ => {
                return Err(BootError::TooSmall {
                    kernel_end,
                    initrd_size: size,
                    limit,
                })
            }
        };
        mem.read_exact_volatile_from(GuestAddress(start), &mut f, size as usize)
            .map_err(|e| BootError::GuestWrite {
                what: "initramfs",
                detail: e.to_string(),
            })?;
        params.hdr.ramdisk_image = start as u32;
        params.hdr.ramdisk_size = size as u32;
    }

    let e820 = e820_map(mem);
    for (i, e) in e820.iter().enumerate() {
        params.e820_table[i] = *e;
    }
    params.e820_entries = e820.len() as u8;
    LinuxBootConfigurator::write_bootparams::<GuestMemoryMmap>(
        &BootParams::new::<boot_params>(&params, GuestAddress(ZERO_PAGE_START)),
        mem,
    )
    .map_err(|e| BootError::GuestWrite {
        what: "zero page",
        detail: e.to_string(),
    })?;
    mptable::setup_mptable(mem, spec.vcpus)?;
    Ok(BootInfo { entry })
}

const E820_RAM: u32 = 1;
const E820_RESERVED: u32 = 2;

fn e820_map(mem: &GuestMemoryMmap) -> Vec<boot_e820_entry> {
    let mut map = vec![
        boot_e820_entry {
            addr: 0,
            size: EBDA_START,
            r#type: E820_RAM,
        },
        boot_e820_entry {
            addr: EBDA_START,
            size: HIMEM_START - EBDA_START,
            r#type: E820_RESERVED,
        },
    ];
    for region in mem.iter() {
        let start = region.start_addr().raw_value().max(HIMEM_START);
        let end = region.start_addr().raw_value() + region.len();
        if end > start {
            map.push(boot_e820_entry {
                addr: start,
                size: end - start,
                r#type: E820_RAM,
            });
        }
    }
    map
}

#[derive(Debug, Clone, Copy, PartialEq)]
enum KernelKind {
    Elf,
    BzImage,
    Unknown,
}

fn sniff_kernel(f: &mut File) -> std::io::Result<KernelKind> {
    let mut head = [0u8; 0x208];
    f.rewind()?;
    let n = read_up_to(f, &mut head)?;
    f.rewind()?;
    if n >= 4 && head[..4] == *b"\x7fELF" {
        return Ok(KernelKind::Elf);
    }
    if n >= 0x206 && head[0x202..0x206] == *b"HdrS" {
        return Ok(KernelKind::BzImage);
    }
    Ok(KernelKind::Unknown)
}

fn read_up_to(f: &mut File, buf: &mut [u8]) -> std::io::Result<usize> {
    let mut n = 0;
    while n < buf.len() {
        match f.read(&mut buf[n..])? {
            0 => break,
            k => n += k,
        }
    }
    Ok(n)
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::Write;

    fn mem() -> GuestMemoryMmap {
        GuestMemoryMmap::from_ranges(&[(GuestAddress(0), 64 << 20)]).unwrap()
    }

    #[test]
    fn a_text_file_is_not_a_kernel() {
        let dir = std::env::temp_dir().join(format!("zygote-boot-test-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let p = dir.join("not-a-kernel");
        std::fs::File::create(&p)
            .unwrap()
            .write_all(b"hello, I am not a kernel\n")
            .unwrap();
        let err = load_guest(
            &mem(),
            &BootSpec {
                kernel: &p,
                initrd: None,
                cmdline: "console=ttyS0",
                vcpus: 1,
            },
        )
        .unwrap_err();
        std::fs::remove_dir_all(&dir).unwrap();
        assert!(matches!(err, BootError::NotAKernel { .. }), "{err}");
    }

    #[test]
    fn a_missing_kernel_is_named() {
        let err = load_guest(
            &mem(),
            &BootSpec {
                kernel: Path::new("/nonexistent/vmlinux"),
                initrd: None,
                cmdline: "",
                vcpus: 1,
            },
        )
        .unwrap_err();
        assert!(err.to_string().contains("/nonexistent/vmlinux"));
    }

    #[test]
    fn e820_covers_ram_and_reserves_the_ebda() {
        let map: Vec<(u64, u64, u32)> = e820_map(&mem())
            .iter()
            .map(|e| (e.addr, e.size, e.r#type))
            .collect();
        assert_eq!(map[0].0, 0);
        assert_eq!(map[1].2, E820_RESERVED);
        assert_eq!(map[2].0, HIMEM_START);
        assert_eq!(map[2].0 + map[2].1, 64 << 20);
    }
}
