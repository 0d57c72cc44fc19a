//! Shared helpers for zygote's end-to-end tests: they boot real guest
//! kernels on real KVM and talk to the real in-guest agent. Nothing here is
//! mocked; a host without /dev/kvm or without the guest image fails loudly.
#![deny(missing_docs)]

use std::path::{Path, PathBuf};
use std::process::{Command, Output, Stdio};
use std::sync::atomic::{AtomicU32, Ordering};

use host::paths::GuestImage;

/// Panics (does not skip) when the host has no KVM.
pub fn require_kvm() {
    assert!(
        Path::new("/dev/kvm").exists(),
        "/dev/kvm is missing: zygote's end-to-end tests need KVM (they never skip)"
    );
}

/// The guest image `scripts/setup` built; panics with the fix when missing.
pub fn image() -> GuestImage {
    require_kvm();
    GuestImage::resolve(None, None).unwrap_or_else(|e| panic!("{e}: run ./scripts/setup first"))
}

/// The release string of the guest kernel in use (written by images/build-kernel).
pub fn kernel_release(image: &GuestImage) -> String {
    let real = std::fs::canonicalize(&image.kernel).expect("kernel path");
    let release = real.parent().expect("kernel dir").join("release");
    std::fs::read_to_string(&release)
        .unwrap_or_else(|e| panic!("{}: {e}", release.display()))
        .trim()
        .to_string()
}

/// A workspace binary (`zygote`, `zygote-vmm`) next to the test executable.
pub fn bin(name: &str) -> PathBuf {
    let exe = std::env::current_exe().expect("test exe");
    let dir = exe.parent().and_then(Path::parent).expect("target dir");
    let p = dir.join(name);
    assert!(
        p.is_file(),
        "{} not built (cargo build --workspace)",
        p.display()
    );
    p
}

static NEXT: AtomicU32 = AtomicU32::new(0);

/// A private runtime directory for one test, so that leftovers can be
/// checked without racing other tests.
pub struct Sandbox {
    /// The directory (given to zygote as `ZYGOTE_RUNTIME_DIR`).
    pub dir: PathBuf,
}

impl Sandbox {
    /// A fresh, not yet existing directory path.
    pub fn new(name: &str) -> Self {
        let dir = std::env::temp_dir().join(format!(
            "zygote-test-{}-{}-{name}",
            std::process::id(),
            NEXT.fetch_add(1, Ordering::Relaxed)
        ));
        let _ = std::fs::remove_dir_all(&dir);
        Sandbox { dir }
    }

    /// Runs the `zygote` CLI with this sandbox and `stdin` as its input.
    pub fn zygote(&self, args: &[&str], stdin: &[u8]) -> Output {
        let mut child = Command::new(bin("zygote"))
            .args(args)
            .env("ZYGOTE_RUNTIME_DIR", &self.dir)
            .env("ZYGOTE_VMM", bin("zygote-vmm"))
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .expect("spawn zygote");
        let mut input = child.stdin.take().expect("stdin");
        let data = stdin.to_vec();
        let writer = std::thread::spawn(move || {
            use std::io::Write;
            let _ = input.write_all(&data);
        });
        let out = child.wait_with_output().expect("wait zygote");
        writer.join().expect("stdin writer");
        out
    }

    /// Asserts that nothing of this sandbox is left: no directory entries,
    /// no process that was given a path in it (a VMM).
    pub fn assert_clean(&self) {
        if self.dir.exists() {
            let left: Vec<_> = std::fs::read_dir(&self.dir)
                .map(|d| d.filter_map(|e| e.ok()).map(|e| e.path()).collect())
                .unwrap_or_default();
            assert!(
                left.is_empty(),
                "left behind in {}: {left:?}",
                self.dir.display()
            );
        }
        let needle = self.dir.to_string_lossy().to_string();
        let procs = processes_mentioning(&needle);
        assert!(procs.is_empty(), "processes left behind: {procs:?}");
    }
}

impl Drop for Sandbox {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

/// Pids (and command lines) of processes whose command line contains `needle`.
pub fn processes_mentioning(needle: &str) -> Vec<(u32, String)> {
    let mut found = Vec::new();
    let Ok(dir) = std::fs::read_dir("/proc") else {
        return found;
    };
    for entry in dir.flatten() {
        let Some(pid) = entry
            .file_name()
            .to_str()
            .and_then(|s| s.parse::<u32>().ok())
        else {
            continue;
        };
        if let Ok(raw) = std::fs::read(entry.path().join("cmdline")) {
            let cmd = String::from_utf8_lossy(&raw).replace('\0', " ");
            if cmd.contains(needle) && pid != std::process::id() {
                found.push((pid, cmd));
            }
        }
    }
    found
}

/// Whether this host's KVM emulates guest kernel code (kvm_pvm): there a
/// second vCPU's bring-up hangs, so images boot with `maxcpus=1`.
pub fn host_is_kvm_pvm() -> bool {
    Path::new("/sys/module/kvm_pvm").exists()
}
