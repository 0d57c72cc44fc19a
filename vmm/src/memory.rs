//! Guest RAM: one memfd, mapped shared into this process and registered
//! with KVM. The memfd is what a clone receives later (copy-on-write).
//!
//! It owns the RAM layout ([`ram_regions`]: the MMIO gap stays a hole) and
//! the mappings. It must not map a master's memory file shared in a clone:
//! a clone's writes go to its private copy-on-write pages only.

use std::fs::File;
use std::os::fd::FromRawFd;

use vm_memory::{FileOffset, GuestAddress, GuestMemoryMmap, GuestRegionMmap, MmapRegion};

use crate::layout::{MMIO_GAP_END, MMIO_GAP_START};

/// Errors creating guest memory.
#[derive(Debug, thiserror::Error)]
pub enum MemoryError {
    /// The requested size is zero or not a whole number of MiB.
    #[error("guest memory must be at least 1 MiB, got {0} bytes")]
    TooSmall(u64),
    /// `memfd_create` or `ftruncate` failed.
    #[error("cannot create a memfd of {size} bytes for guest RAM")]
    Memfd {
        /// Requested size.
        size: u64,
        /// OS error.
        #[source]
        source: std::io::Error,
    },
    /// The memory file could not be duplicated for a mapping.
    #[error("cannot duplicate the guest RAM file descriptor")]
    Dup(#[source] std::io::Error),
    /// Mapping guest RAM failed.
    #[error("cannot map {len} bytes of guest RAM")]
    Mmap {
        /// The region's length.
        len: u64,
        /// Why.
        #[source]
        source: vm_memory::mmap::MmapRegionError,
    },
    /// A region would reach past the end of the guest address space.
    #[error("guest RAM region at {addr:#x} of {len} bytes overflows the address space")]
    RegionOverflow {
        /// Its guest address.
        addr: u64,
        /// Its length.
        len: u64,
    },
    /// The regions do not form a valid guest memory.
    #[error("the guest RAM regions do not form a guest memory")]
    Regions(#[source] vm_memory::GuestRegionCollectionError),
}

/// Guest RAM regions (guest address, length, offset in the memfd) for `size` bytes.
pub fn ram_regions(size: u64) -> Vec<(GuestAddress, u64, u64)> {
    if size <= MMIO_GAP_START {
        vec![(GuestAddress(0), size, 0)]
    } else {
        vec![
            (GuestAddress(0), MMIO_GAP_START, 0),
            (
                GuestAddress(MMIO_GAP_END),
                size - MMIO_GAP_START,
                MMIO_GAP_START,
            ),
        ]
    }
}

/// Creates a sealed-size memfd of `size` bytes.
pub fn create_memfd(size: u64) -> Result<File, MemoryError> {
    if size < (1 << 20) {
        return Err(MemoryError::TooSmall(size));
    }
    // SAFETY: the name is a valid NUL-terminated string; flags are valid.
    let fd = unsafe { libc::memfd_create(c"zygote-guest-ram".as_ptr(), libc::MFD_CLOEXEC) };
    if fd < 0 {
        return Err(MemoryError::Memfd {
            size,
            source: std::io::Error::last_os_error(),
        });
    }
    // SAFETY: fd was just returned by memfd_create and is owned by nobody else.
    let file = unsafe { File::from_raw_fd(fd) };
    file.set_len(size)
        .map_err(|source| MemoryError::Memfd { size, source })?;
    Ok(file)
}

/// Maps `memfd` as guest RAM of `size` bytes. `flags` is `MAP_SHARED` for a
/// VM that owns its RAM, `MAP_PRIVATE` for a copy-on-write clone.
pub fn map_guest_memory(
    memfd: &File,
    size: u64,
    flags: i32,
) -> Result<GuestMemoryMmap, MemoryError> {
    let mut regions = Vec::new();
    for (addr, len, offset) in ram_regions(size) {
        let file = memfd.try_clone().map_err(MemoryError::Dup)?;
        let mmap = MmapRegion::build(
            Some(FileOffset::new(file, offset)),
            len as usize,
            libc::PROT_READ | libc::PROT_WRITE,
            flags | libc::MAP_NORESERVE,
        )
        .map_err(|source| MemoryError::Mmap { len, source })?;
        let region = GuestRegionMmap::new(mmap, addr)
            .ok_or(MemoryError::RegionOverflow { addr: addr.0, len })?;
        regions.push(region);
    }
    GuestMemoryMmap::from_regions(regions).map_err(MemoryError::Regions)
}

#[cfg(test)]
mod tests {
    use super::*;
    use vm_memory::{Bytes, GuestMemoryBackend};

    #[test]
    fn small_memory_is_one_region() {
        assert_eq!(ram_regions(64 << 20), vec![(GuestAddress(0), 64 << 20, 0)]);
    }

    #[test]
    fn large_memory_skips_the_mmio_gap() {
        let r = ram_regions(4 << 30);
        assert_eq!(r.len(), 2);
        assert_eq!(r[1].0, GuestAddress(MMIO_GAP_END));
        assert_eq!(r[0].1 + r[1].1, 4 << 30);
    }

    #[test]
    fn zero_memory_is_refused() {
        assert!(matches!(create_memfd(0), Err(MemoryError::TooSmall(0))));
    }

    #[test]
    fn shared_mapping_writes_through_to_the_memfd() {
        let fd = create_memfd(2 << 20).unwrap();
        let mem = map_guest_memory(&fd, 2 << 20, libc::MAP_SHARED).unwrap();
        mem.write_obj(0xdead_beef_u32, GuestAddress(0x1000))
            .unwrap();
        let other = map_guest_memory(&fd, 2 << 20, libc::MAP_PRIVATE).unwrap();
        assert_eq!(
            other.read_obj::<u32>(GuestAddress(0x1000)).unwrap(),
            0xdead_beef
        );
        assert_eq!(mem.last_addr(), GuestAddress((2 << 20) - 1));
    }
}
