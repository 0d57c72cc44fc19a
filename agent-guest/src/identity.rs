//! Making a cloned guest unique: fresh kernel entropy and a reseeded CRNG,
//! its own hostname and id, the host's wall clock, and its own MAC and IP
//! address ([`crate::net`]).

use std::io;

use proto::{Identity, IdentityTimings, IDENTITY_ENTROPY_BYTES};

use crate::sys::cvt;

/// Where the VM id is written for programs in the guest.
pub const ID_FILE: &str = "/run/zygote/id";

/// `RNDADDENTROPY` (`_IOW('R', 0x03, int[2])`).
const RNDADDENTROPY: libc::c_ulong = 0x4008_5203;
/// `RNDRESEEDCRNG` (`_IO('R', 0x07)`).
const RNDRESEEDCRNG: libc::c_ulong = 0x5207;

/// Checks a request before anything is changed.
pub fn validate(id: &Identity) -> Result<(), String> {
    if !IDENTITY_ENTROPY_BYTES.contains(&id.entropy.len()) {
        return Err(format!(
            "entropy must be {} to {} bytes, got {}",
            IDENTITY_ENTROPY_BYTES.start(),
            IDENTITY_ENTROPY_BYTES.end(),
            id.entropy.len()
        ));
    }
    let valid_name = |s: &str| {
        !s.is_empty()
            && s.len() <= 64
            && s.bytes()
                .all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'.')
    };
    if !valid_name(&id.hostname) {
        return Err(format!(
            "invalid hostname {:?} (1-64 of [A-Za-z0-9.-])",
            id.hostname
        ));
    }
    if !valid_name(&id.vm_id) {
        return Err(format!(
            "invalid VM id {:?} (1-64 of [A-Za-z0-9.-])",
            id.vm_id
        ));
    }
    if id.wall_clock_ns == 0 {
        return Err("wall clock of 0".into());
    }
    if let Some(net) = &id.net {
        crate::net::validate(net)?;
    }
    Ok(())
}

/// The `struct rand_pool_info` bytes for `RNDADDENTROPY`: entropy count in
/// bits, buffer size in bytes, then the buffer.
pub fn rand_pool_info(entropy: &[u8]) -> Vec<u8> {
    let mut v = Vec::with_capacity(8 + entropy.len());
    v.extend_from_slice(&((entropy.len() * 8) as i32).to_ne_bytes());
    v.extend_from_slice(&(entropy.len() as i32).to_ne_bytes());
    v.extend_from_slice(entropy);
    v
}

/// Applies a validated identity to this (guest) system. PID 1 only.
pub fn apply(id: &Identity) -> Result<IdentityTimings, String> {
    // Timed with the vDSO's clock: no syscall.
    let timed = |what: &str, r: &mut dyn FnMut() -> io::Result<()>| {
        let t = std::time::Instant::now();
        r().map_err(|e| format!("{what}: {e}"))?;
        Ok::<u32, String>(crate::sys::us_since(t))
    };
    let mut t = IdentityTimings {
        entropy_us: timed("add entropy", &mut || add_entropy(&id.entropy))?,
        hostname_us: timed("set hostname", &mut || set_hostname(&id.hostname))?,
        clock_us: timed("set wall clock", &mut || set_clock(id.wall_clock_ns))?,
        id_file_us: timed("write VM id", &mut || write_id(&id.vm_id))?,
        ..Default::default()
    };
    if let Some(net) = &id.net {
        let start = std::time::Instant::now();
        let [mac, addr, route] =
            crate::net::apply(net).map_err(|e| format!("network {}: {e}", net.interface))?;
        t.net_us = crate::sys::us_since(start);
        (t.net_mac_us, t.net_addr_us, t.net_route_us) = (mac, addr, route);
    }
    Ok(t)
}

/// `/dev/urandom`, open since the first identity (the master's).
static URANDOM: std::sync::OnceLock<std::fs::File> = std::sync::OnceLock::new();

fn add_entropy(entropy: &[u8]) -> io::Result<()> {
    let f = match URANDOM.get() {
        Some(f) => f,
        None => {
            let f = std::fs::OpenOptions::new()
                .write(true)
                .open("/dev/urandom")?;
            URANDOM.get_or_init(|| f)
        }
    };
    let info = rand_pool_info(entropy);
    use std::os::fd::AsRawFd;
    // SAFETY: `info` is a complete rand_pool_info of the size it declares.
    cvt(unsafe { libc::ioctl(f.as_raw_fd(), RNDADDENTROPY, info.as_ptr()) })?;
    // SAFETY: RNDRESEEDCRNG takes no argument.
    cvt(unsafe { libc::ioctl(f.as_raw_fd(), RNDRESEEDCRNG) })?;
    Ok(())
}

fn set_hostname(name: &str) -> io::Result<()> {
    // SAFETY: pointer and length describe `name`'s bytes.
    cvt(unsafe { libc::sethostname(name.as_ptr().cast(), name.len()) })?;
    Ok(())
}

fn set_clock(ns: u64) -> io::Result<()> {
    let ts = libc::timespec {
        tv_sec: (ns / 1_000_000_000) as libc::time_t,
        tv_nsec: (ns % 1_000_000_000) as libc::c_long,
    };
    // SAFETY: `ts` is a valid timespec.
    cvt(unsafe { libc::clock_settime(libc::CLOCK_REALTIME, &ts) })?;
    Ok(())
}

/// [`ID_FILE`], open since the first identity (the master's): a clone
/// rewrites it in place, with no path lookup, no new file and no freed
/// page (each is emulated guest kernel work on some hosts).
static ID: std::sync::Mutex<Option<std::fs::File>> = std::sync::Mutex::new(None);

fn write_id(id: &str) -> io::Result<()> {
    use std::os::unix::fs::{FileExt, MetadataExt};
    let mut open = ID.lock().unwrap_or_else(|p| p.into_inner());
    // Removed by someone in the guest: made anew.
    if let Some(f) = open.as_ref() {
        if f.metadata()?.nlink() == 0 {
            *open = None;
        }
    }
    let f = match open.as_mut() {
        Some(f) => f,
        None => {
            std::fs::create_dir_all("/run/zygote")?;
            let f = std::fs::OpenOptions::new()
                .write(true)
                .create(true)
                .truncate(false)
                .open(ID_FILE)?;
            open.insert(f)
        }
    };
    let line = format!("{id}\n");
    f.write_all_at(line.as_bytes(), 0)?;
    f.set_len(line.len() as u64)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ok() -> Identity {
        Identity {
            entropy: vec![7; 64],
            hostname: "clone-1".into(),
            vm_id: "c1".into(),
            wall_clock_ns: 1_700_000_000_000_000_000,
            net: None,
        }
    }

    #[test]
    fn bad_identities_are_refused_before_anything_changes() {
        assert!(validate(&ok()).is_ok());
        assert!(validate(&Identity {
            entropy: vec![1; 8],
            ..ok()
        })
        .is_err());
        assert!(validate(&Identity {
            entropy: vec![1; 4096],
            ..ok()
        })
        .is_err());
        assert!(validate(&Identity {
            hostname: String::new(),
            ..ok()
        })
        .is_err());
        assert!(validate(&Identity {
            hostname: "a b".into(),
            ..ok()
        })
        .is_err());
        assert!(validate(&Identity {
            hostname: "x".repeat(65),
            ..ok()
        })
        .is_err());
        assert!(validate(&Identity {
            vm_id: "../etc".into(),
            ..ok()
        })
        .is_err());
        assert!(validate(&Identity {
            wall_clock_ns: 0,
            ..ok()
        })
        .is_err());
    }

    #[test]
    fn rand_pool_info_layout() {
        let v = rand_pool_info(&[1, 2, 3, 4]);
        assert_eq!(&v[..4], &32i32.to_ne_bytes());
        assert_eq!(&v[4..8], &4i32.to_ne_bytes());
        assert_eq!(&v[8..], &[1, 2, 3, 4]);
    }
}
