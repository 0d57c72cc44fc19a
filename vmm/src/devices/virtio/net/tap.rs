//! The tap backend of the virtio-net device: a tap the spawner opened
//! (`/dev/net/tun`, `TUNSETIFF` with `IFF_TAP | IFF_NO_PI | IFF_VNET_HDR`)
//! before it confined the VMM, inherited at a descriptor number.
//!
//! It owns that descriptor and every system call made on it: the checks
//! and settings when it is taken over ([`Tap::from_inherited_fd`]:
//! `fcntl`, `TUNGETIFF`, `TUNSETVNETHDRSZ`), and at run time `read` (one
//! frame), `writev` (one frame) and `ioctl(TUNSETOFFLOAD)`. It must not
//! open or create a tap outside tests: a confined VMM cannot, and the
//! network namespace the tap lives in is the spawner's choice.

use std::ffi::CStr;
use std::io;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd, RawFd};

use super::header::VNET_HDR_LEN;

/// Flags the tap must have been opened with.
const REQUIRED_FLAGS: u16 = (libc::IFF_TAP | libc::IFF_NO_PI | libc::IFF_VNET_HDR) as u16;

/// Why an inherited descriptor cannot be the tap backend.
#[derive(Debug, thiserror::Error)]
pub enum TapError {
    /// 0, 1 and 2 are the VMM's stdin, stdout (events) and stderr.
    #[error(
        "descriptor {0} is one of stdin, stdout and stderr, not a tap: pass the tap at 3 or above"
    )]
    Reserved(RawFd),
    /// Nothing is open at that number.
    #[error("no descriptor {fd} is open in the VMM: the spawner must keep the tap open across exec (no FD_CLOEXEC)")]
    NotOpen {
        /// The descriptor.
        fd: RawFd,
        /// What `fcntl` said.
        #[source]
        source: io::Error,
    },
    /// The descriptor is not a tun/tap device.
    #[error("descriptor {fd} is not a tap (TUNGETIFF failed): open /dev/net/tun and attach a tap with TUNSETIFF")]
    NotTap {
        /// The descriptor.
        fd: RawFd,
        /// What the ioctl said.
        #[source]
        source: io::Error,
    },
    /// A tun device, or a tap without the flags the device relies on.
    #[error("{name} (descriptor {fd}) was opened with flags {flags:#06x}; the VMM needs a tap with IFF_TAP | IFF_NO_PI | IFF_VNET_HDR ({REQUIRED_FLAGS:#06x})")]
    Flags {
        /// The descriptor.
        fd: RawFd,
        /// The interface's name.
        name: String,
        /// Its flags.
        flags: u16,
    },
    /// `fcntl` failed on an open tap.
    #[error("cannot make tap {name} non-blocking and close-on-exec")]
    Fcntl {
        /// The interface's name.
        name: String,
        /// The error.
        #[source]
        source: io::Error,
    },
    /// The tap refused the 12-byte virtio-net header.
    #[error("tap {name} refused a virtio-net header of {VNET_HDR_LEN} bytes (TUNSETVNETHDRSZ)")]
    VnetHdrSize {
        /// The interface's name.
        name: String,
        /// The error.
        #[source]
        source: io::Error,
    },
}

/// What sits behind the descriptor.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Kind {
    /// A real tap.
    Tap,
    /// A datagram socket standing in for one (tests): same `read`/`writev`
    /// semantics, one frame per call, no ioctls.
    #[cfg(test)]
    Socket,
}

/// An open tap with a 12-byte virtio-net header, non-blocking.
#[derive(Debug)]
pub struct Tap {
    fd: OwnedFd,
    name: String,
    kind: Kind,
}

fn cvt(r: libc::c_int) -> io::Result<libc::c_int> {
    if r < 0 {
        Err(io::Error::last_os_error())
    } else {
        Ok(r)
    }
}

/// The interface's name and flags (`TUNGETIFF`).
fn tap_ifreq(fd: RawFd) -> io::Result<(String, u16)> {
    // SAFETY: `ifreq` is plain old data; all zeroes is a valid value.
    let mut ifr: libc::ifreq = unsafe { std::mem::zeroed() };
    // SAFETY: TUNGETIFF writes one `struct ifreq` to the pointer, which
    // points to one we own; on a descriptor that is not a tun device the
    // ioctl fails without writing.
    cvt(unsafe { libc::ioctl(fd, libc::TUNGETIFF, &mut ifr as *mut libc::ifreq) })?;
    // SAFETY: the kernel NUL-terminates the name within IFNAMSIZ bytes
    // (the array is IFNAMSIZ long and was zeroed before).
    let name = unsafe { CStr::from_ptr(ifr.ifr_name.as_ptr()) }
        .to_string_lossy()
        .into_owned();
    // SAFETY: TUNGETIFF fills `ifru_flags`, which is what the union holds.
    let flags = unsafe { ifr.ifr_ifru.ifru_flags } as u16;
    Ok((name, flags))
}

fn set_fd_flags(fd: RawFd) -> io::Result<()> {
    // SAFETY: fcntl on a descriptor we own, with integer arguments only.
    unsafe {
        let fl = cvt(libc::fcntl(fd, libc::F_GETFL))?;
        cvt(libc::fcntl(fd, libc::F_SETFL, fl | libc::O_NONBLOCK))?;
        cvt(libc::fcntl(fd, libc::F_SETFD, libc::FD_CLOEXEC))?;
    }
    Ok(())
}

impl Tap {
    /// Takes over the tap the spawner passed at descriptor `fd`: checks
    /// that it is open, is a tap with `IFF_NO_PI | IFF_VNET_HDR`, makes it
    /// non-blocking and close-on-exec, and sets its virtio-net header to
    /// 12 bytes.
    pub fn from_inherited_fd(fd: RawFd) -> Result<Self, TapError> {
        if (0..=2).contains(&fd) {
            return Err(TapError::Reserved(fd));
        }
        // SAFETY: F_GETFD only reads the descriptor's flags.
        if let Err(source) = cvt(unsafe { libc::fcntl(fd, libc::F_GETFD) }) {
            return Err(TapError::NotOpen { fd, source });
        }
        // SAFETY: the descriptor is open (checked above), and nothing else
        // in this process owns it: the spawner passed it, at this number,
        // to be the tap backend (`--tap-fd`), and the VMM opened nothing at
        // it (it is above stdio and taken over before any other file is
        // opened by the device code). From here the `Tap` closes it.
        let owned = unsafe { OwnedFd::from_raw_fd(fd) };
        Self::from_fd(owned)
    }

    /// Takes over an open tap descriptor (see [`Tap::from_inherited_fd`]).
    pub fn from_fd(fd: OwnedFd) -> Result<Self, TapError> {
        let raw = fd.as_raw_fd();
        let (name, flags) =
            tap_ifreq(raw).map_err(|source| TapError::NotTap { fd: raw, source })?;
        if flags & REQUIRED_FLAGS != REQUIRED_FLAGS || flags & libc::IFF_TUN as u16 != 0 {
            return Err(TapError::Flags {
                fd: raw,
                name,
                flags,
            });
        }
        set_fd_flags(raw).map_err(|source| TapError::Fcntl {
            name: name.clone(),
            source,
        })?;
        let size = VNET_HDR_LEN as libc::c_int;
        // SAFETY: TUNSETVNETHDRSZ reads one int from the pointer, which
        // points to one we own.
        cvt(unsafe { libc::ioctl(raw, libc::TUNSETVNETHDRSZ, &size as *const libc::c_int) })
            .map_err(|source| TapError::VnetHdrSize {
                name: name.clone(),
                source,
            })?;
        Ok(Tap {
            fd,
            name,
            kind: Kind::Tap,
        })
    }

    /// The interface's name (`tap0`).
    pub fn name(&self) -> &str {
        &self.name
    }

    /// Reads one frame (header included) into `buf`; returns its length,
    /// which is more than `buf.len()` when the frame did not fit (the tap
    /// reports the whole length and drops the rest).
    pub fn read(&self, buf: &mut [u8]) -> io::Result<usize> {
        // SAFETY: the pointer and length describe `buf`, writable; the
        // kernel writes at most that many bytes.
        let n = unsafe { libc::read(self.fd.as_raw_fd(), buf.as_mut_ptr().cast(), buf.len()) };
        if n < 0 {
            Err(io::Error::last_os_error())
        } else {
            Ok(n as usize)
        }
    }

    /// Writes one frame (header included) gathered from `iov`.
    ///
    /// # Safety
    ///
    /// Every iovec must describe memory that is readable, and stays mapped,
    /// for the duration of the call (the kernel only reads it).
    pub unsafe fn writev(&self, iov: &[libc::iovec]) -> io::Result<usize> {
        let count = libc::c_int::try_from(iov.len())
            .map_err(|_| io::Error::from_raw_os_error(libc::EINVAL))?;
        // SAFETY: the caller guarantees every iovec is readable memory;
        // `iov` itself is a valid array of `count` iovecs.
        let n = unsafe { libc::writev(self.fd.as_raw_fd(), iov.as_ptr(), count) };
        if n < 0 {
            Err(io::Error::last_os_error())
        } else {
            Ok(n as usize)
        }
    }

    /// Sets what the tap may hand over (`TUN_F_*`): partial checksums and
    /// segmented frames, as the driver accepted them.
    pub fn set_offload(&self, flags: libc::c_uint) -> io::Result<()> {
        if self.kind != Kind::Tap {
            return Ok(());
        }
        // SAFETY: TUNSETOFFLOAD takes its argument by value.
        cvt(unsafe {
            libc::ioctl(
                self.fd.as_raw_fd(),
                libc::TUNSETOFFLOAD,
                flags as libc::c_ulong,
            )
        })
        .map(|_| ())
    }
}

impl AsRawFd for Tap {
    fn as_raw_fd(&self) -> RawFd {
        self.fd.as_raw_fd()
    }
}

#[cfg(test)]
impl Tap {
    /// A datagram socket standing in for a tap, non-blocking.
    pub(crate) fn from_socket(fd: OwnedFd) -> Self {
        set_fd_flags(fd.as_raw_fd()).expect("socket flags");
        Tap {
            fd,
            name: "socket".into(),
            kind: Kind::Socket,
        }
    }

    /// Creates a tap named `name` in the calling thread's network
    /// namespace (not persistent: it goes when the descriptor closes).
    pub(crate) fn create(name: &str) -> io::Result<Self> {
        let fd = open_tap(name, REQUIRED_FLAGS)?;
        Tap::from_fd(fd).map_err(io::Error::other)
    }
}

/// Opens `/dev/net/tun` and attaches a tap named `name` with `flags`.
#[cfg(test)]
pub(crate) fn open_tap(name: &str, flags: u16) -> io::Result<OwnedFd> {
    let file = std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .open("/dev/net/tun")?;
    // SAFETY: `ifreq` is plain old data; all zeroes is a valid value.
    let mut ifr: libc::ifreq = unsafe { std::mem::zeroed() };
    for (dst, src) in ifr.ifr_name.iter_mut().zip(name.bytes().take(15)) {
        *dst = src as libc::c_char;
    }
    ifr.ifr_ifru.ifru_flags = flags as libc::c_short;
    // SAFETY: TUNSETIFF reads one `struct ifreq` from the pointer, which
    // points to one we own.
    cvt(unsafe {
        libc::ioctl(
            file.as_raw_fd(),
            libc::TUNSETIFF,
            &ifr as *const libc::ifreq,
        )
    })?;
    Ok(file.into())
}
