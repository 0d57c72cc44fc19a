//! How a `zygote-vmm` process is launched: one typed description
//! ([`VmmLaunch`]) that every spawner builds and turns into arguments with
//! [`VmmLaunch::to_args`], and that the VMM gets back with
//! [`VmmLaunch::parse`]. The two are each other's inverse (tested), so the
//! command line is written in exactly one place.
//!
//! ```text
//! zygote-vmm --kernel K [--initrd I] [--cmdline C] [--memory MIB] [--vcpus N] [--cid CID]
//!            [--snapshot-dir DIR --control SOCK]               boot (a master when --snapshot-dir)
//! zygote-vmm --restore DIR [--vsock-reset]                     a clone of a frozen master
//! zygote-vmm --check-snapshot DIR                              check only; prints a SnapshotCheck
//!   common:  [--vsock SOCK] [--control SOCK] [--console none|stderr|PATH] [--detach]
//!            [--kvm-fd FD] [--tap-fd FD] [--mac MAC] [--no-seccomp]
//! ```
//!
//! File descriptors (`--kvm-fd`, `--tap-fd`) are opened by the spawner
//! before it confines the VMM (a jailed VMM cannot open `/dev/kvm` or a
//! tap itself) and inherited at those numbers.

use std::ffi::OsString;
use std::path::PathBuf;

use serde::{Deserialize, Serialize};

/// Guest RAM a booted VM gets when the launch does not say.
pub const DEFAULT_MEMORY_MIB: u64 = 128;
/// The guest's vsock context id when the launch does not say.
pub const DEFAULT_GUEST_CID: u64 = 3;

/// One VMM process: what it runs and where it talks.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct VmmLaunch {
    /// What the process runs.
    pub source: VmSource,
    /// Unix socket for the host side of virtio-vsock (none: no vsock device
    /// for a booted VM; a restored one needs it when the snapshot has one).
    pub vsock: Option<PathBuf>,
    /// Unix socket for control requests ([`crate::ctl`]).
    pub control: Option<PathBuf>,
    /// Where the serial console goes.
    pub console: ConsoleTarget,
    /// Keep running when the process that started this one ends (else the
    /// VMM dies with its parent).
    pub detach: bool,
    /// An open `/dev/kvm` inherited at this descriptor (else the VMM opens
    /// `/dev/kvm` itself).
    pub kvm_fd: Option<i32>,
    /// An open tap (`IFF_TAP | IFF_NO_PI | IFF_VNET_HDR`) inherited at this
    /// descriptor: the backend of the VM's virtio-net device. A booted VM
    /// gets a virtio-net device only with it; a restored VM whose snapshot
    /// has one keeps the device, disconnected (no frames in or out) when
    /// this is absent.
    pub tap_fd: Option<i32>,
    /// Install the VMM's seccomp filters (one per thread kind) before the
    /// guest runs. Off only for debugging (`--no-seccomp`).
    pub seccomp: bool,
    /// A restored VM resets its vsock transport (every connection of the
    /// master ends, the host connects anew), as a Firecracker restore
    /// does, instead of carrying the master's idle connections into the
    /// clone (`--vsock-reset`; restore only). For comparison and
    /// debugging: carrying is what clones are made with.
    pub vsock_reset: bool,
}

/// A MAC address, written `02:00:00:00:00:01`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, Default)]
pub struct MacAddr(pub [u8; 6]);

impl MacAddr {
    /// Whether this is a unicast address (the low bit of the first byte is
    /// clear), the only kind a NIC may have.
    pub fn is_unicast(&self) -> bool {
        self.0[0] & 1 == 0
    }

    /// A locally administered unicast address (`x2:…`) derived from `seed`
    /// (a VM id): the same seed always gives the same address, different
    /// seeds almost always different ones (40 bits of FNV-1a hash).
    pub fn derived(seed: &str) -> MacAddr {
        let mut h: u64 = 0xcbf2_9ce4_8422_2325;
        for b in seed.bytes() {
            h ^= u64::from(b);
            h = h.wrapping_mul(0x0100_0000_01b3);
        }
        let b = h.to_be_bytes();
        MacAddr([0x02, b[3], b[4], b[5], b[6], b[7]])
    }
}

impl std::fmt::Display for MacAddr {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let b = self.0;
        write!(
            f,
            "{:02x}:{:02x}:{:02x}:{:02x}:{:02x}:{:02x}",
            b[0], b[1], b[2], b[3], b[4], b[5]
        )
    }
}

impl std::str::FromStr for MacAddr {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        let parts: Vec<&str> = s.split(':').collect();
        let bad = || format!("{s:?} is not a MAC address (six hex bytes, 02:00:00:00:00:01)");
        if parts.len() != 6 {
            return Err(bad());
        }
        let mut m = [0u8; 6];
        for (i, p) in parts.iter().enumerate() {
            if p.len() != 2 {
                return Err(bad());
            }
            m[i] = u8::from_str_radix(p, 16).map_err(|_| bad())?;
        }
        Ok(MacAddr(m))
    }
}

impl Serialize for MacAddr {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.collect_str(self)
    }
}

impl<'de> Deserialize<'de> for MacAddr {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let s = String::deserialize(d)?;
        s.parse().map_err(serde::de::Error::custom)
    }
}

/// What a VMM process runs.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum VmSource {
    /// Boot a kernel.
    Boot(BootSource),
    /// Start from a frozen master's snapshot directory: guest RAM is its
    /// memory file mapped copy-on-write.
    Restore {
        /// The snapshot directory.
        snapshot: PathBuf,
    },
    /// Check that a snapshot is one this VMM on this host can restore, print
    /// a [`SnapshotCheck`] as one JSON line, and exit (no VM is created).
    CheckSnapshot {
        /// The snapshot directory.
        snapshot: PathBuf,
    },
}

/// A VM booted from a kernel.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct BootSource {
    /// Guest kernel: ELF vmlinux (or bzImage).
    pub kernel: PathBuf,
    /// Initramfs (cpio).
    pub initrd: Option<PathBuf>,
    /// The image's kernel command line (the VMM adds console and devices).
    pub cmdline: String,
    /// Guest RAM in MiB.
    pub memory_mib: u64,
    /// vCPUs.
    pub vcpus: u8,
    /// The guest's vsock context id.
    pub guest_cid: u64,
    /// Boot a VM that can be frozen: its RAM is created as `memory` in this
    /// directory and a freeze (through the control socket) writes the
    /// snapshot there. Requires a control socket.
    pub snapshot_dir: Option<PathBuf>,
    /// The virtio-net device's MAC (with `--tap-fd`; a clone keeps its
    /// master's device MAC and its agent sets the clone's own on the
    /// interface).
    pub mac: Option<MacAddr>,
}

impl BootSource {
    /// A boot of `kernel` with the defaults.
    pub fn new(kernel: impl Into<PathBuf>) -> Self {
        BootSource {
            kernel: kernel.into(),
            initrd: None,
            cmdline: String::new(),
            memory_mib: DEFAULT_MEMORY_MIB,
            vcpus: 1,
            guest_cid: DEFAULT_GUEST_CID,
            snapshot_dir: None,
            mac: None,
        }
    }
}

/// Where the serial console goes.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub enum ConsoleTarget {
    /// Discarded (the VMM still scans it for markers and panics).
    #[default]
    None,
    /// The VMM's stderr.
    Stderr,
    /// Appended to a file.
    File(PathBuf),
}

/// What `zygote-vmm --check-snapshot` prints.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct SnapshotCheck {
    /// Whether this VMM on this host can restore the snapshot.
    pub ok: bool,
    /// Why not, when it cannot.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub error: Option<String>,
    /// Guest RAM, MiB.
    #[serde(default)]
    pub memory_mib: u64,
    /// vCPUs.
    #[serde(default)]
    pub vcpus: u8,
    /// It has a network device (its clones can be given a network).
    #[serde(default)]
    pub net: bool,
}

/// A command line that is not a launch description.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum LaunchError {
    /// An argument this VMM does not know.
    #[error("unknown argument {0:?} (see --help)")]
    Unknown(String),
    /// A flag without its value.
    #[error("{0} needs a value")]
    MissingValue(&'static str),
    /// A value of the wrong type.
    #[error("{flag}: {value:?} is not {expected}")]
    BadValue {
        /// The flag.
        flag: &'static str,
        /// What was given.
        value: String,
        /// What it must be.
        expected: &'static str,
    },
    /// Two flags that cannot go together, or a flag without what it needs.
    #[error("{0}")]
    Conflict(&'static str),
}

/// The `--help` text of `zygote-vmm`.
pub const USAGE: &str = "\
zygote-vmm: runs one microVM in this process; reports events as JSON lines on stdout.
Started by the zygote tools; not meant to be run by hand (but it can be).

  --kernel PATH          guest kernel (ELF vmlinux or bzImage): boot it
  --initrd PATH          initramfs (cpio)
  --cmdline TEXT         the image's kernel command line (the VMM adds console and devices)
  --memory MIB           guest RAM (default 128)
  --vcpus N              vCPUs (default 1)
  --cid CID              guest vsock CID (default 3)
  --snapshot-dir DIR     boot a VM that can be frozen into DIR (needs --control)
  --restore DIR          start from a frozen master's snapshot instead of booting
  --vsock-reset          (restore) reset the vsock transport instead of carrying the
                         master's idle connections into the clone
  --check-snapshot DIR   check that DIR can be restored here, print one JSON line, exit
  --vsock PATH           Unix socket for the host side of virtio-vsock
  --control PATH         Unix socket for control requests (freeze)
  --console TARGET       serial console: none, stderr or a file path (default none)
  --detach               keep running when the process that started this one ends
  --kvm-fd FD            use this inherited open /dev/kvm instead of opening it
  --tap-fd FD            inherited open tap (no PI, vnet header): the virtio-net backend
  --mac MAC              the virtio-net device's MAC (boot with --tap-fd only)
  --no-seccomp           do not install the seccomp filters (debugging only)
  --help, --version
";

impl VmmLaunch {
    /// A launch of `source` with no sockets, no console and no detach.
    pub fn new(source: VmSource) -> Self {
        VmmLaunch {
            source,
            vsock: None,
            control: None,
            console: ConsoleTarget::None,
            detach: false,
            kvm_fd: None,
            tap_fd: None,
            seccomp: true,
            vsock_reset: false,
        }
    }

    /// The VMM's arguments (without the program name).
    pub fn to_args(&self) -> Vec<OsString> {
        let mut a: Vec<OsString> = Vec::new();
        let mut flag = |f: &str, v: OsString| {
            a.push(f.into());
            a.push(v);
        };
        match &self.source {
            VmSource::Boot(b) => {
                flag("--kernel", b.kernel.clone().into());
                if let Some(i) = &b.initrd {
                    flag("--initrd", i.clone().into());
                }
                flag("--cmdline", b.cmdline.clone().into());
                flag("--memory", b.memory_mib.to_string().into());
                flag("--vcpus", b.vcpus.to_string().into());
                flag("--cid", b.guest_cid.to_string().into());
                if let Some(d) = &b.snapshot_dir {
                    flag("--snapshot-dir", d.clone().into());
                }
                if let Some(m) = &b.mac {
                    flag("--mac", m.to_string().into());
                }
            }
            VmSource::Restore { snapshot } => flag("--restore", snapshot.clone().into()),
            VmSource::CheckSnapshot { snapshot } => {
                flag("--check-snapshot", snapshot.clone().into())
            }
        }
        if let Some(v) = &self.vsock {
            flag("--vsock", v.clone().into());
        }
        if let Some(c) = &self.control {
            flag("--control", c.clone().into());
        }
        match &self.console {
            ConsoleTarget::None => {}
            ConsoleTarget::Stderr => flag("--console", "stderr".into()),
            ConsoleTarget::File(p) => flag("--console", p.clone().into()),
        }
        if let Some(fd) = self.kvm_fd {
            flag("--kvm-fd", fd.to_string().into());
        }
        if let Some(fd) = self.tap_fd {
            flag("--tap-fd", fd.to_string().into());
        }
        if self.detach {
            a.push("--detach".into());
        }
        if !self.seccomp {
            a.push("--no-seccomp".into());
        }
        if self.vsock_reset {
            a.push("--vsock-reset".into());
        }
        a
    }

    /// Parses the VMM's arguments (without the program name).
    pub fn parse(args: impl IntoIterator<Item = OsString>) -> Result<Parsed, LaunchError> {
        let mut kernel = None;
        let mut boot = BootSource::new("");
        let mut restore = None;
        let mut check = None;
        let mut launch = VmmLaunch::new(VmSource::Restore {
            snapshot: PathBuf::new(),
        });
        let mut boot_only = false;
        let mut args = args.into_iter();
        while let Some(arg) = args.next() {
            let arg = arg.to_string_lossy().into_owned();
            let (name, inline) = match arg.split_once('=') {
                Some((n, v)) if n.starts_with("--") => (n.to_string(), Some(OsString::from(v))),
                _ => (arg.clone(), None),
            };
            let mut value = |flag: &'static str| -> Result<OsString, LaunchError> {
                inline
                    .clone()
                    .or_else(|| args.next())
                    .ok_or(LaunchError::MissingValue(flag))
            };
            match name.as_str() {
                "--help" | "-h" => return Ok(Parsed::Help),
                "--version" | "-V" => return Ok(Parsed::Version),
                "--kernel" => kernel = Some(PathBuf::from(value("--kernel")?)),
                "--initrd" => {
                    boot.initrd = Some(value("--initrd")?.into());
                    boot_only = true;
                }
                "--cmdline" => {
                    boot.cmdline = value("--cmdline")?.to_string_lossy().into_owned();
                    boot_only = true;
                }
                "--memory" => {
                    boot.memory_mib = number("--memory", value("--memory")?)?;
                    boot_only = true;
                }
                "--vcpus" => {
                    boot.vcpus = number("--vcpus", value("--vcpus")?)?;
                    boot_only = true;
                }
                "--cid" => {
                    boot.guest_cid = number("--cid", value("--cid")?)?;
                    boot_only = true;
                }
                "--snapshot-dir" => {
                    boot.snapshot_dir = Some(value("--snapshot-dir")?.into());
                    boot_only = true;
                }
                "--restore" => restore = Some(PathBuf::from(value("--restore")?)),
                "--check-snapshot" => check = Some(PathBuf::from(value("--check-snapshot")?)),
                "--vsock" => launch.vsock = Some(value("--vsock")?.into()),
                "--control" => launch.control = Some(value("--control")?.into()),
                "--console" => {
                    let v = value("--console")?;
                    launch.console = match v.to_str() {
                        Some("none") => ConsoleTarget::None,
                        Some("stderr") => ConsoleTarget::Stderr,
                        _ => ConsoleTarget::File(v.into()),
                    };
                }
                "--detach" if inline.is_none() => launch.detach = true,
                "--no-seccomp" if inline.is_none() => launch.seccomp = false,
                "--vsock-reset" if inline.is_none() => launch.vsock_reset = true,
                "--kvm-fd" => launch.kvm_fd = Some(fd_number("--kvm-fd", value("--kvm-fd")?)?),
                "--tap-fd" => launch.tap_fd = Some(fd_number("--tap-fd", value("--tap-fd")?)?),
                "--mac" => {
                    let v = value("--mac")?.to_string_lossy().into_owned();
                    let mac: MacAddr = v.parse().map_err(|_| LaunchError::BadValue {
                        flag: "--mac",
                        value: v.clone(),
                        expected: "a MAC address (02:00:00:00:00:01)",
                    })?;
                    if !mac.is_unicast() {
                        return Err(LaunchError::BadValue {
                            flag: "--mac",
                            value: v,
                            expected: "a unicast MAC address (first byte even)",
                        });
                    }
                    boot.mac = Some(mac);
                    boot_only = true;
                }
                _ => return Err(LaunchError::Unknown(arg)),
            }
        }
        if launch.vsock_reset && restore.is_none() {
            return Err(LaunchError::Conflict(
                "--vsock-reset is for --restore only (a booted VM has no connection to carry)",
            ));
        }
        launch.source = match (kernel, restore, check) {
            (Some(k), None, None) => {
                boot.kernel = k;
                if boot.snapshot_dir.is_some() && launch.control.is_none() {
                    return Err(LaunchError::Conflict(
                        "--snapshot-dir needs --control (the freeze is asked for there)",
                    ));
                }
                VmSource::Boot(boot)
            }
            (None, Some(snapshot), None) if !boot_only => VmSource::Restore { snapshot },
            (None, None, Some(snapshot)) if !boot_only => VmSource::CheckSnapshot { snapshot },
            (None, None, None) => {
                return Err(LaunchError::Conflict(
                    "give --kernel (boot), --restore or --check-snapshot",
                ))
            }
            (None, _, _) if boot_only => {
                return Err(LaunchError::Conflict(
                    "--initrd, --cmdline, --memory, --vcpus, --cid, --mac and --snapshot-dir are for --kernel only (a snapshot has its own)",
                ))
            }
            _ => {
                return Err(LaunchError::Conflict(
                    "--kernel, --restore and --check-snapshot exclude each other",
                ))
            }
        };
        Ok(Parsed::Launch(launch))
    }
}

/// What a VMM command line asks for.
// Parsed once per process: the size difference does not matter.
#[allow(clippy::large_enum_variant)]
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Parsed {
    /// Run this.
    Launch(VmmLaunch),
    /// Print [`USAGE`].
    Help,
    /// Print the version.
    Version,
}

fn number<T: std::str::FromStr>(flag: &'static str, v: OsString) -> Result<T, LaunchError> {
    let s = v.to_string_lossy();
    s.parse().map_err(|_| LaunchError::BadValue {
        flag,
        value: s.into_owned(),
        expected: "a number in range",
    })
}

/// An inherited descriptor number: 3 or more (0-2 are stdio).
fn fd_number(flag: &'static str, v: OsString) -> Result<i32, LaunchError> {
    let s = v.to_string_lossy();
    match s.parse::<i32>() {
        Ok(fd) if fd >= 3 => Ok(fd),
        _ => Err(LaunchError::BadValue {
            flag,
            value: s.into_owned(),
            expected: "a descriptor number of 3 or more",
        }),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parse(args: &[&str]) -> Result<VmmLaunch, LaunchError> {
        match VmmLaunch::parse(args.iter().map(OsString::from))? {
            Parsed::Launch(l) => Ok(l),
            other => panic!("{other:?}"),
        }
    }

    fn round_trip(l: &VmmLaunch) {
        let back = VmmLaunch::parse(l.to_args()).expect("parses");
        assert_eq!(back, Parsed::Launch(l.clone()), "args: {:?}", l.to_args());
    }

    #[test]
    fn every_kind_of_launch_round_trips_through_its_arguments() {
        let mut boot = BootSource::new("/k/vmlinux");
        boot.initrd = Some("/k/initramfs.cpio".into());
        boot.cmdline = "quiet clearcpuid=cx16,popcnt -- a=b".into();
        boot.memory_mib = 512;
        boot.vcpus = 2;
        boot.guest_cid = 77;
        boot.snapshot_dir = Some("/run/z/m/snapshot".into());
        boot.mac = Some(MacAddr([2, 0, 0, 0xab, 0xcd, 0xef]));
        let mut l = VmmLaunch::new(VmSource::Boot(boot));
        l.kvm_fd = Some(3);
        l.tap_fd = Some(4);
        l.seccomp = false;
        l.vsock = Some("/run/z/v.sock".into());
        l.control = Some("/run/z/c.sock".into());
        l.console = ConsoleTarget::File("/run/z/console.log".into());
        round_trip(&l);
        l.console = ConsoleTarget::Stderr;
        l.detach = true;
        round_trip(&l);

        let mut r = VmmLaunch::new(VmSource::Restore {
            snapshot: "/s".into(),
        });
        round_trip(&r);
        r.vsock = Some("/v".into());
        r.detach = true;
        r.tap_fd = Some(9);
        r.console = ConsoleTarget::File("with space/console.log".into());
        round_trip(&r);
        r.vsock_reset = true;
        round_trip(&r);
        round_trip(&VmmLaunch::new(VmSource::CheckSnapshot {
            snapshot: "/s".into(),
        }));
        round_trip(&VmmLaunch::new(VmSource::Boot(BootSource::new("/k"))));
    }

    #[test]
    fn mac_addresses_print_parse_and_derive() {
        let m: MacAddr = "02:0a:ff:00:10:9c".parse().unwrap();
        assert_eq!(m.to_string(), "02:0a:ff:00:10:9c");
        assert!(m.is_unicast());
        let a = MacAddr::derived("web-1-abcd");
        assert_eq!(a, MacAddr::derived("web-1-abcd"));
        assert_ne!(a, MacAddr::derived("web-2-abcd"));
        assert_eq!(a.0[0], 0x02, "locally administered unicast");
        let j = serde_json::to_string(&a).unwrap();
        assert_eq!(serde_json::from_str::<MacAddr>(&j).unwrap(), a);
        assert!(serde_json::from_str::<MacAddr>("\"zz\"").is_err());
    }

    #[test]
    fn today_s_command_lines_still_parse() {
        let l = parse(&[
            "--kernel",
            "/k",
            "--memory=64",
            "--vcpus",
            "2",
            "--console",
            "stderr",
        ])
        .unwrap();
        let VmSource::Boot(b) = &l.source else {
            panic!("{l:?}")
        };
        assert_eq!((b.memory_mib, b.vcpus, b.guest_cid), (64, 2, 3));
        assert_eq!(l.console, ConsoleTarget::Stderr);
    }

    #[test]
    fn bad_command_lines_are_refused_with_the_reason() {
        let e = |a: &[&str]| parse(a).unwrap_err().to_string();
        assert!(e(&[]).contains("--kernel"));
        assert!(e(&["--kernel", "/k", "--restore", "/s"]).contains("exclude"));
        assert!(e(&["--restore", "/s", "--memory", "64"]).contains("for --kernel only"));
        assert!(e(&["--kernel", "/k", "--memory", "lots"]).contains("--memory"));
        assert!(e(&["--kernel", "/k", "--vcpus", "300"]).contains("--vcpus"));
        assert!(e(&["--kernel", "/k", "--tap-fd", "1"]).contains("3 or more"));
        assert!(e(&["--kernel", "/k", "--mac", "03:00:00:00:00:01"]).contains("unicast"));
        assert!(e(&["--kernel", "/k", "--mac", "02:00:00:00:01"]).contains("MAC"));
        assert!(e(&["--restore", "/s", "--mac", "02:00:00:00:00:01"]).contains("for --kernel only"));
        assert!(e(&["--kernel", "/k", "--snapshot-dir", "/d"]).contains("--control"));
        assert!(e(&["--kernel"]).contains("needs a value"));
        assert!(e(&["--kernel", "/k", "--frobnicate"]).contains("unknown"));
        assert!(e(&["--kernel", "/k", "--detach=yes"]).contains("unknown"));
        assert!(e(&["--kernel", "/k", "--vsock-reset"]).contains("--restore only"));
        assert_eq!(
            VmmLaunch::parse([OsString::from("--help")]).unwrap(),
            Parsed::Help
        );
    }
}
