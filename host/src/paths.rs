//! Where zygote finds its guest image and its own binaries.
//!
//! The guest image defaults to what `scripts/setup` installed in
//! `$ZYGOTE_CACHE/current/` (default `~/.cache/zygote/current/`): `vmlinux`,
//! `initramfs.cpio` and `cmdline`. `ZYGOTE_KERNEL`, `ZYGOTE_INITRAMFS` and
//! `ZYGOTE_CMDLINE` override each one.

use std::path::{Path, PathBuf};

/// Errors locating files.
#[derive(Debug, thiserror::Error)]
pub enum PathError {
    /// A file that must exist does not.
    #[error("{what} not found at {path} (run ./scripts/setup, or pass --{flag})")]
    Missing {
        /// Which file.
        what: &'static str,
        /// Where it was looked for.
        path: PathBuf,
        /// The CLI flag that overrides it.
        flag: &'static str,
    },
    /// The VMM binary was not found next to this one.
    #[error("zygote-vmm not found next to {0} (build the workspace: cargo build -p vmm)")]
    NoVmm(PathBuf),
}

/// The cache root: `$ZYGOTE_CACHE`, else `$XDG_CACHE_HOME/zygote`, else `~/.cache/zygote`.
pub fn cache_dir() -> PathBuf {
    if let Some(p) = std::env::var_os("ZYGOTE_CACHE") {
        return p.into();
    }
    if let Some(p) = std::env::var_os("XDG_CACHE_HOME") {
        return Path::new(&p).join("zygote");
    }
    let home = std::env::var_os("HOME").unwrap_or_else(|| "/root".into());
    Path::new(&home).join(".cache/zygote")
}

/// A guest image: kernel, initramfs and the kernel command line it needs.
#[derive(Debug, Clone)]
pub struct GuestImage {
    /// ELF vmlinux or bzImage.
    pub kernel: PathBuf,
    /// Initramfs with the agent as /init.
    pub initramfs: PathBuf,
    /// The image's part of the kernel command line.
    pub cmdline: String,
}

impl GuestImage {
    /// Resolves the image from explicit paths, the environment, or the cache.
    pub fn resolve(kernel: Option<&Path>, initramfs: Option<&Path>) -> Result<Self, PathError> {
        let current = cache_dir().join("current");
        let pick = |given: Option<&Path>, env: &str, default: &str| -> PathBuf {
            given
                .map(Path::to_path_buf)
                .or_else(|| std::env::var_os(env).map(PathBuf::from))
                .unwrap_or_else(|| current.join(default))
        };
        let kernel = pick(kernel, "ZYGOTE_KERNEL", "vmlinux");
        let initramfs = pick(initramfs, "ZYGOTE_INITRAMFS", "initramfs.cpio");
        if !kernel.is_file() {
            return Err(PathError::Missing {
                what: "guest kernel",
                path: kernel,
                flag: "kernel",
            });
        }
        if !initramfs.is_file() {
            return Err(PathError::Missing {
                what: "guest initramfs",
                path: initramfs,
                flag: "rootfs",
            });
        }
        let cmdline = match std::env::var("ZYGOTE_CMDLINE") {
            Ok(c) => c,
            Err(_) => {
                std::fs::read_to_string(current.join("cmdline")).unwrap_or_else(|_| "quiet".into())
            }
        };
        Ok(GuestImage {
            kernel,
            initramfs,
            cmdline: cmdline.trim().to_string(),
        })
    }
}

/// The `zygote-vmm` binary: `$ZYGOTE_VMM`, else next to the running executable.
pub fn vmm_binary() -> Result<PathBuf, PathError> {
    if let Some(p) = std::env::var_os("ZYGOTE_VMM") {
        return Ok(p.into());
    }
    let exe = std::env::current_exe().unwrap_or_else(|_| PathBuf::from("zygote"));
    let dir = exe.parent().map(Path::to_path_buf).unwrap_or_default();
    // `cargo test` binaries live in target/<profile>/deps; the VMM one level up.
    for candidate in [dir.join("zygote-vmm"), dir.join("../zygote-vmm")] {
        if candidate.is_file() {
            return Ok(candidate);
        }
    }
    Err(PathError::NoVmm(exe))
}

/// Where the VM network's state lives (its address and port leases):
/// one place per host, whatever the state directory, because what it
/// hands out is the host's (addresses of one subnet, routes, host ports,
/// one firewall table). On tmpfs: a lease names a running VMM.
pub fn net_state_dir() -> PathBuf {
    PathBuf::from("/run/zygote-net")
}

/// The state directory for masters, clones and per-VM runtime files:
/// `$ZYGOTE_RUNTIME_DIR`, else `$XDG_RUNTIME_DIR/zygote`, else
/// `/run/zygote` for root, else `zygote` in the temp dir.
pub fn runtime_root() -> PathBuf {
    if let Some(p) = std::env::var_os("ZYGOTE_RUNTIME_DIR") {
        return p.into();
    }
    if let Some(p) = std::env::var_os("XDG_RUNTIME_DIR") {
        return Path::new(&p).join("zygote");
    }
    if rustix::process::geteuid().is_root() {
        return PathBuf::from("/run/zygote");
    }
    std::env::temp_dir().join("zygote")
}
