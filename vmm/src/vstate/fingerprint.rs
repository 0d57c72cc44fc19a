//! The host fingerprint: what a frozen VM's saved state depends on in the
//! host it was frozen on (CPU vendor, the CPU features KVM offered its
//! guest, the XSAVE area, the KVM API and the KVM capabilities a restore
//! calls), and the comparison that decides whether another host can run it.
//!
//! A master records [`HostFingerprint::of_host`] in its snapshot; every
//! restore and `zygote-vmm --check-snapshot` compares it with this host's
//! ([`HostFingerprint::check_runs_on`]) and refuses, naming what differs,
//! a snapshot whose guest may rely on something this host lacks. A guest
//! that was shown AVX-512 and resumes where it is missing dies of an
//! invalid-opcode fault, long after the restore "succeeded".
//!
//! This module reads CPUID and KVM only; it must not decide anything else
//! about a snapshot (layout and versions are [`crate::snapshot`]'s).
//! Family, model and stepping are recorded for humans and not compared:
//! the feature bits are what a guest uses, and hosts of one fleet often
//! differ in stepping only.

use std::fmt;

use kvm_bindings::{kvm_cpuid_entry2, KVM_MAX_CPUID_ENTRIES};
use kvm_ioctls::{Cap, Kvm};
use serde::{Deserialize, Serialize};

/// The KVM capabilities creating and restoring a VM calls on, by name.
///
/// `TSC_CONTROL` is not among them: a restore tries to set the saved TSC
/// frequency and goes on without it, because the guest keeps time with
/// kvm-clock, not the raw TSC (see `vstate::cpuid`).
pub const RESTORE_CAPS: &[(Cap, &str)] = &[
    (Cap::Irqchip, "KVM_CAP_IRQCHIP"),
    (Cap::Irqfd, "KVM_CAP_IRQFD"),
    (Cap::Ioeventfd, "KVM_CAP_IOEVENTFD"),
    (Cap::UserMemory, "KVM_CAP_USER_MEMORY"),
    (Cap::SetTssAddr, "KVM_CAP_SET_TSS_ADDR"),
    (Cap::Pit2, "KVM_CAP_PIT2"),
    (Cap::PitState2, "KVM_CAP_PIT_STATE2"),
    (Cap::AdjustClock, "KVM_CAP_ADJUST_CLOCK"),
    (Cap::ExtCpuid, "KVM_CAP_EXT_CPUID"),
    (Cap::MpState, "KVM_CAP_MP_STATE"),
    (Cap::Xsave, "KVM_CAP_XSAVE"),
    (Cap::Xcrs, "KVM_CAP_XCRS"),
    (Cap::Debugregs, "KVM_CAP_DEBUGREGS"),
    (Cap::VcpuEvents, "KVM_CAP_VCPU_EVENTS"),
];

/// The CPUID feature words KVM offers a guest on a host
/// (`KVM_GET_SUPPORTED_CPUID`): the features a saved guest may be using.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct CpuFeatures {
    /// Leaf 1, ECX.
    pub leaf_1_ecx: u32,
    /// Leaf 1, EDX.
    pub leaf_1_edx: u32,
    /// Leaf 7 sub-leaf 0, EBX.
    pub leaf_7_ebx: u32,
    /// Leaf 7 sub-leaf 0, ECX.
    pub leaf_7_ecx: u32,
    /// Leaf 7 sub-leaf 0, EDX.
    pub leaf_7_edx: u32,
    /// Leaf 0x8000_0001, ECX.
    pub leaf_8000_0001_ecx: u32,
    /// Leaf 0x8000_0001, EDX.
    pub leaf_8000_0001_edx: u32,
}

/// The XSAVE area KVM offers a guest (CPUID leaf 0xD sub-leaf 0).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct XsaveFeatures {
    /// State components a guest may enable in XCR0 (EDX:EAX).
    pub xcr0: u64,
    /// Bytes of the XSAVE area holding all of them (ECX).
    pub max_size: u32,
}

/// What a snapshot's state depends on in the host it was taken on.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct HostFingerprint {
    /// CPUID leaf 0 vendor string ("GenuineIntel", "AuthenticAMD").
    pub cpu_vendor: String,
    /// CPU family (with the extended family folded in), for humans.
    pub cpu_family: u32,
    /// CPU model (with the extended model folded in), for humans.
    pub cpu_model: u32,
    /// CPU stepping, for humans.
    pub cpu_stepping: u32,
    /// The feature bits KVM offered the guest.
    pub features: CpuFeatures,
    /// The XSAVE area KVM offered the guest.
    pub xsave: XsaveFeatures,
    /// `KVM_GET_API_VERSION`.
    pub kvm_api_version: i32,
    /// Which of [`RESTORE_CAPS`] the host's KVM has, by name.
    pub kvm_caps: Vec<String>,
}

/// Why this host's fingerprint could not be read.
#[derive(Debug, thiserror::Error)]
pub enum ProbeError {
    /// `KVM_GET_SUPPORTED_CPUID` failed.
    #[error("cannot read the CPU features KVM offers on this host (KVM_GET_SUPPORTED_CPUID)")]
    SupportedCpuid(#[source] kvm_ioctls::Error),
}

/// One CPU feature bit, named where this VMM knows its name.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct FeatureBit {
    /// The register it is in, e.g. `CPUID.(EAX=7,ECX=0):EBX`.
    pub word: &'static str,
    /// The bit.
    pub bit: u8,
    /// Its name (Linux's `/proc/cpuinfo` name), if known.
    pub name: Option<&'static str>,
}

impl fmt::Display for FeatureBit {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self.name {
            Some(n) => f.write_str(n),
            None => write!(f, "{}[{}]", self.word, self.bit),
        }
    }
}

/// What a snapshot depends on that this host does not give it.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum HostMismatch {
    /// Another KVM API.
    #[error("the snapshot was taken with KVM API version {snapshot}; this host's KVM has version {host}")]
    KvmApi {
        /// The snapshot host's.
        snapshot: i32,
        /// This host's.
        host: i32,
    },
    /// Another CPU vendor: a guest cannot move between them.
    #[error("the snapshot's CPU vendor is {snapshot} and this host's is {host}: a guest cannot move to another CPU vendor")]
    Vendor {
        /// The snapshot host's vendor.
        snapshot: String,
        /// This host's.
        host: String,
    },
    /// Feature bits the snapshot's guest was offered and this host lacks.
    #[error("the snapshot's guest may use CPU features this host's KVM does not offer: {}", list(.missing))]
    Features {
        /// The missing bits.
        missing: Vec<FeatureBit>,
    },
    /// An XSAVE area larger than this host's.
    #[error("the snapshot's XSAVE area is {snapshot} bytes, larger than this host's {host} bytes")]
    XsaveSize {
        /// The snapshot host's.
        snapshot: u32,
        /// This host's.
        host: u32,
    },
    /// KVM capabilities a restore calls on and this host lacks.
    #[error("this host's KVM lacks {}, which restoring the snapshot needs", list(.missing))]
    Caps {
        /// Their names.
        missing: Vec<String>,
    },
}

fn list<T: fmt::Display>(items: &[T]) -> String {
    items
        .iter()
        .map(ToString::to_string)
        .collect::<Vec<_>>()
        .join(", ")
}

/// A feature word: where it is, how to read it, and the names of its bits.
struct Word {
    name: &'static str,
    get: fn(&HostFingerprint) -> u64,
    bits: &'static [(u8, &'static str)],
}

const WORDS: &[Word] = &[
    Word {
        name: "CPUID.01H:ECX",
        get: |f| f.features.leaf_1_ecx.into(),
        bits: &[
            (0, "sse3"),
            (1, "pclmulqdq"),
            (2, "dtes64"),
            (3, "monitor"),
            (4, "ds_cpl"),
            (5, "vmx"),
            (6, "smx"),
            (7, "est"),
            (8, "tm2"),
            (9, "ssse3"),
            (10, "cnxt_id"),
            (11, "sdbg"),
            (12, "fma"),
            (13, "cx16"),
            (14, "xtpr"),
            (15, "pdcm"),
            (17, "pcid"),
            (18, "dca"),
            (19, "sse4_1"),
            (20, "sse4_2"),
            (21, "x2apic"),
            (22, "movbe"),
            (23, "popcnt"),
            (24, "tsc_deadline_timer"),
            (25, "aes"),
            (26, "xsave"),
            (27, "osxsave"),
            (28, "avx"),
            (29, "f16c"),
            (30, "rdrand"),
            (31, "hypervisor"),
        ],
    },
    Word {
        name: "CPUID.01H:EDX",
        get: |f| f.features.leaf_1_edx.into(),
        bits: &[
            (0, "fpu"),
            (1, "vme"),
            (2, "de"),
            (3, "pse"),
            (4, "tsc"),
            (5, "msr"),
            (6, "pae"),
            (7, "mce"),
            (8, "cx8"),
            (9, "apic"),
            (11, "sep"),
            (12, "mtrr"),
            (13, "pge"),
            (14, "mca"),
            (15, "cmov"),
            (16, "pat"),
            (17, "pse36"),
            (18, "pn"),
            (19, "clflush"),
            (21, "ds"),
            (22, "acpi"),
            (23, "mmx"),
            (24, "fxsr"),
            (25, "sse"),
            (26, "sse2"),
            (27, "ss"),
            (28, "ht"),
            (29, "tm"),
            (31, "pbe"),
        ],
    },
    Word {
        name: "CPUID.(EAX=7,ECX=0):EBX",
        get: |f| f.features.leaf_7_ebx.into(),
        bits: &[
            (0, "fsgsbase"),
            (1, "tsc_adjust"),
            (2, "sgx"),
            (3, "bmi1"),
            (4, "hle"),
            (5, "avx2"),
            (6, "fdp_excptn_only"),
            (7, "smep"),
            (8, "bmi2"),
            (9, "erms"),
            (10, "invpcid"),
            (11, "rtm"),
            (12, "cqm"),
            (13, "zero_fcs_fds"),
            (14, "mpx"),
            (15, "rdt_a"),
            (16, "avx512f"),
            (17, "avx512dq"),
            (18, "rdseed"),
            (19, "adx"),
            (20, "smap"),
            (21, "avx512ifma"),
            (23, "clflushopt"),
            (24, "clwb"),
            (25, "intel_pt"),
            (26, "avx512pf"),
            (27, "avx512er"),
            (28, "avx512cd"),
            (29, "sha_ni"),
            (30, "avx512bw"),
            (31, "avx512vl"),
        ],
    },
    Word {
        name: "CPUID.(EAX=7,ECX=0):ECX",
        get: |f| f.features.leaf_7_ecx.into(),
        bits: &[
            (0, "prefetchwt1"),
            (1, "avx512vbmi"),
            (2, "umip"),
            (3, "pku"),
            (4, "ospke"),
            (5, "waitpkg"),
            (6, "avx512_vbmi2"),
            (7, "shstk"),
            (8, "gfni"),
            (9, "vaes"),
            (10, "vpclmulqdq"),
            (11, "avx512_vnni"),
            (12, "avx512_bitalg"),
            (13, "tme"),
            (14, "avx512_vpopcntdq"),
            (16, "la57"),
            (22, "rdpid"),
            (23, "keylocker"),
            (24, "bus_lock_detect"),
            (25, "cldemote"),
            (27, "movdiri"),
            (28, "movdir64b"),
            (29, "enqcmd"),
            (30, "sgx_lc"),
            (31, "pks"),
        ],
    },
    Word {
        name: "CPUID.(EAX=7,ECX=0):EDX",
        get: |f| f.features.leaf_7_edx.into(),
        bits: &[
            (2, "avx512_4vnniw"),
            (3, "avx512_4fmaps"),
            (4, "fsrm"),
            (5, "uintr"),
            (8, "avx512_vp2intersect"),
            (9, "srbds_ctrl"),
            (10, "md_clear"),
            (11, "rtm_always_abort"),
            (13, "tsx_force_abort"),
            (14, "serialize"),
            (15, "hybrid_cpu"),
            (16, "tsxldtrk"),
            (18, "pconfig"),
            (19, "arch_lbr"),
            (20, "ibt"),
            (22, "amx_bf16"),
            (23, "avx512_fp16"),
            (24, "amx_tile"),
            (25, "amx_int8"),
            (26, "spec_ctrl"),
            (27, "intel_stibp"),
            (28, "flush_l1d"),
            (29, "arch_capabilities"),
            (30, "core_capabilities"),
            (31, "spec_ctrl_ssbd"),
        ],
    },
    Word {
        name: "CPUID.80000001H:ECX",
        get: |f| f.features.leaf_8000_0001_ecx.into(),
        bits: &[
            (0, "lahf_lm"),
            (1, "cmp_legacy"),
            (2, "svm"),
            (3, "extapic"),
            (4, "cr8_legacy"),
            (5, "abm"),
            (6, "sse4a"),
            (7, "misalignsse"),
            (8, "3dnowprefetch"),
            (9, "osvw"),
            (10, "ibs"),
            (11, "xop"),
            (12, "skinit"),
            (13, "wdt"),
            (15, "lwp"),
            (16, "fma4"),
            (17, "tce"),
            (19, "nodeid_msr"),
            (21, "tbm"),
            (22, "topoext"),
            (23, "perfctr_core"),
            (24, "perfctr_nb"),
            (26, "bpext"),
            (27, "ptsc"),
            (28, "perfctr_llc"),
            (29, "mwaitx"),
        ],
    },
    Word {
        name: "CPUID.80000001H:EDX",
        get: |f| f.features.leaf_8000_0001_edx.into(),
        bits: &[
            (11, "syscall"),
            (19, "mp"),
            (20, "nx"),
            (22, "mmxext"),
            (25, "fxsr_opt"),
            (26, "pdpe1gb"),
            (27, "rdtscp"),
            (29, "lm"),
            (30, "3dnowext"),
            (31, "3dnow"),
        ],
    },
    Word {
        name: "XCR0",
        get: |f| f.xsave.xcr0,
        bits: &[
            (0, "xsave:x87"),
            (1, "xsave:sse"),
            (2, "xsave:avx"),
            (3, "xsave:mpx_bndregs"),
            (4, "xsave:mpx_bndcsr"),
            (5, "xsave:avx512_opmask"),
            (6, "xsave:avx512_zmm_hi256"),
            (7, "xsave:avx512_hi16_zmm"),
            (8, "xsave:pt"),
            (9, "xsave:pkru"),
            (10, "xsave:pasid"),
            (11, "xsave:cet_user"),
            (12, "xsave:cet_supervisor"),
            (13, "xsave:hdc"),
            (14, "xsave:uintr"),
            (15, "xsave:lbr"),
            (16, "xsave:hwp"),
            (17, "xsave:amx_tilecfg"),
            (18, "xsave:amx_tiledata"),
            (19, "xsave:apx"),
        ],
    },
];

impl HostFingerprint {
    /// This host's fingerprint, read from the CPU and from `kvm`.
    pub fn of_host(kvm: &Kvm) -> Result<Self, ProbeError> {
        let supported = kvm
            .get_supported_cpuid(KVM_MAX_CPUID_ENTRIES)
            .map_err(ProbeError::SupportedCpuid)?;
        let entries = supported.as_slice();
        let (cpu_vendor, cpu_family, cpu_model, cpu_stepping) = host_cpu();
        let kvm_caps = RESTORE_CAPS
            .iter()
            .filter(|(cap, _)| kvm.check_extension(*cap))
            .map(|(_, name)| (*name).to_owned())
            .collect();
        Ok(Self::from_supported_cpuid(
            cpu_vendor,
            (cpu_family, cpu_model, cpu_stepping),
            entries,
            kvm.get_api_version(),
            kvm_caps,
        ))
    }

    /// A fingerprint from its parts; `supported` is what
    /// `KVM_GET_SUPPORTED_CPUID` returned (a leaf it lacks reads as zeros).
    fn from_supported_cpuid(
        cpu_vendor: String,
        (cpu_family, cpu_model, cpu_stepping): (u32, u32, u32),
        supported: &[kvm_cpuid_entry2],
        kvm_api_version: i32,
        kvm_caps: Vec<String>,
    ) -> Self {
        let leaf = |function: u32| {
            supported
                .iter()
                .find(|e| e.function == function && e.index == 0)
                .copied()
                .unwrap_or_default()
        };
        let (l1, l7, ld, e1) = (leaf(1), leaf(7), leaf(0xd), leaf(0x8000_0001));
        HostFingerprint {
            cpu_vendor,
            cpu_family,
            cpu_model,
            cpu_stepping,
            features: CpuFeatures {
                leaf_1_ecx: l1.ecx,
                leaf_1_edx: l1.edx,
                leaf_7_ebx: l7.ebx,
                leaf_7_ecx: l7.ecx,
                leaf_7_edx: l7.edx,
                leaf_8000_0001_ecx: e1.ecx,
                leaf_8000_0001_edx: e1.edx,
            },
            xsave: XsaveFeatures {
                xcr0: u64::from(ld.edx) << 32 | u64::from(ld.eax),
                max_size: ld.ecx,
            },
            kvm_api_version,
            kvm_caps,
        }
    }

    /// Whether a VM frozen on the host of `self` (the snapshot's
    /// fingerprint) can run on the host of `host` (this one's): the same
    /// KVM API and CPU vendor, every feature bit and XSAVE component the
    /// guest was offered, an XSAVE area no larger, and every capability a
    /// restore calls on. Names the first kind of difference found, and
    /// every bit or capability of that kind.
    pub fn check_runs_on(&self, host: &HostFingerprint) -> Result<(), HostMismatch> {
        if self.kvm_api_version != host.kvm_api_version {
            return Err(HostMismatch::KvmApi {
                snapshot: self.kvm_api_version,
                host: host.kvm_api_version,
            });
        }
        if self.cpu_vendor != host.cpu_vendor {
            return Err(HostMismatch::Vendor {
                snapshot: self.cpu_vendor.clone(),
                host: host.cpu_vendor.clone(),
            });
        }
        let missing: Vec<FeatureBit> = WORDS
            .iter()
            .flat_map(|w| {
                let lacking = (w.get)(self) & !(w.get)(host);
                (0..64u8)
                    .filter(move |b| lacking & (1u64 << b) != 0)
                    .map(move |bit| FeatureBit {
                        word: w.name,
                        bit,
                        name: w.bits.iter().find(|(b, _)| *b == bit).map(|(_, n)| *n),
                    })
            })
            .collect();
        if !missing.is_empty() {
            return Err(HostMismatch::Features { missing });
        }
        if self.xsave.max_size > host.xsave.max_size {
            return Err(HostMismatch::XsaveSize {
                snapshot: self.xsave.max_size,
                host: host.xsave.max_size,
            });
        }
        let needed = RESTORE_CAPS
            .iter()
            .map(|(_, name)| *name)
            .chain(self.kvm_caps.iter().map(String::as_str));
        let mut missing: Vec<String> = Vec::new();
        for name in needed {
            if !host.kvm_caps.iter().any(|c| c == name) && !missing.iter().any(|m| m == name) {
                missing.push(name.to_owned());
            }
        }
        if !missing.is_empty() {
            return Err(HostMismatch::Caps { missing });
        }
        Ok(())
    }
}

/// This CPU's vendor string, family, model and stepping (CPUID leaves 0
/// and 1, read directly: KVM's view of them is the same CPU's).
fn host_cpu() -> (String, u32, u32, u32) {
    use std::arch::x86_64::__cpuid;
    let l0 = __cpuid(0);
    let mut vendor = Vec::with_capacity(12);
    for r in [l0.ebx, l0.edx, l0.ecx] {
        vendor.extend_from_slice(&r.to_le_bytes());
    }
    let eax = __cpuid(1).eax;
    let (stepping, model, family) = (eax & 0xf, (eax >> 4) & 0xf, (eax >> 8) & 0xf);
    let (ext_model, ext_family) = ((eax >> 16) & 0xf, (eax >> 20) & 0xff);
    let family_id = if family == 0xf {
        family + ext_family
    } else {
        family
    };
    let model_id = if family == 0x6 || family == 0xf {
        ext_model << 4 | model
    } else {
        model
    };
    (
        String::from_utf8_lossy(&vendor).into_owned(),
        family_id,
        model_id,
        stepping,
    )
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::vstate::vm::open_kvm;

    fn local() -> HostFingerprint {
        let kvm = open_kvm().expect("this test needs /dev/kvm");
        HostFingerprint::of_host(&kvm).unwrap()
    }

    #[test]
    fn this_host_can_run_what_it_froze() {
        let host = local();
        assert!(
            [
                "GenuineIntel",
                "AuthenticAMD",
                "HygonGenuine",
                "CentaurHauls"
            ]
            .contains(&host.cpu_vendor.as_str())
                || host.cpu_vendor.len() == 12,
            "{host:?}"
        );
        assert_eq!(host.kvm_api_version, 12);
        assert_ne!(host.features.leaf_1_edx & 1, 0, "fpu");
        assert_ne!(host.xsave.xcr0 & 3, 0, "x87 and SSE state");
        assert!(host.xsave.max_size >= 512, "{host:?}");
        assert_eq!(host.kvm_caps.len(), RESTORE_CAPS.len(), "{host:?}");
        host.check_runs_on(&host).unwrap();

        let json = serde_json::to_string(&host).unwrap();
        let back: HostFingerprint = serde_json::from_str(&json).unwrap();
        assert_eq!(back, host);
        back.check_runs_on(&local()).unwrap();

        // Family, model and stepping are not compared.
        let other_stepping = HostFingerprint {
            cpu_stepping: host.cpu_stepping + 1,
            cpu_model: host.cpu_model + 1,
            ..host.clone()
        };
        other_stepping.check_runs_on(&host).unwrap();
    }

    #[test]
    fn another_vendor_is_refused() {
        let host = local();
        let other = if host.cpu_vendor == "AuthenticAMD" {
            "GenuineIntel"
        } else {
            "AuthenticAMD"
        };
        let snap = HostFingerprint {
            cpu_vendor: other.into(),
            ..host.clone()
        };
        let e = snap.check_runs_on(&host).unwrap_err();
        assert!(matches!(e, HostMismatch::Vendor { .. }), "{e}");
        let text = e.to_string();
        assert!(
            text.contains(other) && text.contains(&host.cpu_vendor),
            "{text}"
        );
    }

    #[test]
    fn a_feature_bit_this_host_lacks_is_refused_by_name() {
        let host = local();
        // A snapshot whose guest was offered a feature this host lacks:
        // the first named bit of leaf 7 EBX the host does not have.
        let (bit, name) = WORDS[2]
            .bits
            .iter()
            .copied()
            .find(|(b, _)| host.features.leaf_7_ebx & (1 << b) == 0)
            .expect("this host lacks at least one leaf 7 EBX feature");
        let mut snap = host.clone();
        snap.features.leaf_7_ebx |= 1 << bit;
        // And one that has no name here.
        snap.features.leaf_8000_0001_edx |= 1 << 0;
        let mut lacking = host.clone();
        lacking.features.leaf_8000_0001_edx &= !1;
        let e = snap.check_runs_on(&lacking).unwrap_err();
        let HostMismatch::Features { missing } = &e else {
            panic!("{e}")
        };
        assert_eq!(missing[0].name, Some(name));
        assert_eq!(missing.last().unwrap().name, None);
        let text = e.to_string();
        assert!(text.contains(name), "{text}");
        assert!(text.contains("CPUID.80000001H:EDX[0]"), "{text}");

        // The other way round is fine: this host offers more than needed.
        lacking
            .check_runs_on(&snap)
            .unwrap_or_else(|e| panic!("a host with more features must accept the snapshot: {e}"));

        // XSAVE components count as features too.
        let mut snap = host.clone();
        snap.xsave.xcr0 |= 1 << 19;
        let mut lacking = host.clone();
        lacking.xsave.xcr0 &= !(1 << 19);
        let e = snap.check_runs_on(&lacking).unwrap_err();
        assert!(e.to_string().contains("xsave:apx"), "{e}");
    }

    #[test]
    fn a_larger_xsave_area_is_refused() {
        let host = local();
        let snap = HostFingerprint {
            xsave: XsaveFeatures {
                max_size: host.xsave.max_size + 64,
                ..host.xsave
            },
            ..host.clone()
        };
        let e = snap.check_runs_on(&host).unwrap_err();
        assert_eq!(
            e,
            HostMismatch::XsaveSize {
                snapshot: host.xsave.max_size + 64,
                host: host.xsave.max_size
            }
        );
        assert!(e.to_string().contains("larger than this host's"), "{e}");
    }

    #[test]
    fn a_missing_capability_is_refused_by_name() {
        let host = local();
        let mut lacking = host.clone();
        lacking.kvm_caps.retain(|c| c != "KVM_CAP_XSAVE");
        let e = host.check_runs_on(&lacking).unwrap_err();
        assert_eq!(
            e,
            HostMismatch::Caps {
                missing: vec!["KVM_CAP_XSAVE".into()]
            }
        );
        assert_eq!(
            e.to_string(),
            "this host's KVM lacks KVM_CAP_XSAVE, which restoring the snapshot needs"
        );
        // A capability a newer VMM recorded and this one does not know is
        // one it cannot vouch for.
        let mut newer = host.clone();
        newer.kvm_caps.push("KVM_CAP_SOMETHING_NEW".into());
        assert!(matches!(
            newer.check_runs_on(&host),
            Err(HostMismatch::Caps { .. })
        ));
        // Even if the snapshot's list is short, this host must have what a
        // restore calls on.
        let mut short = host.clone();
        short.kvm_caps.clear();
        short.check_runs_on(&host).unwrap();
        assert!(short.check_runs_on(&lacking).is_err());
    }

    #[test]
    fn another_kvm_api_is_refused() {
        let host = local();
        let snap = HostFingerprint {
            kvm_api_version: 11,
            ..host.clone()
        };
        assert!(matches!(
            snap.check_runs_on(&host),
            Err(HostMismatch::KvmApi { snapshot: 11, .. })
        ));
    }

    #[test]
    fn leaves_are_read_from_the_supported_cpuid() {
        let entry = |function, index, eax, ebx, ecx, edx| kvm_cpuid_entry2 {
            function,
            index,
            eax,
            ebx,
            ecx,
            edx,
            ..Default::default()
        };
        let f = HostFingerprint::from_supported_cpuid(
            "GenuineIntel".into(),
            (6, 85, 4),
            &[
                entry(1, 0, 0, 0, 0x11, 0x22),
                entry(7, 1, 0, 0xdead, 0, 0),
                entry(7, 0, 0, 0x33, 0x44, 0x55),
                entry(0xd, 0, 0x7, 0, 0x340, 0x1),
                entry(0x8000_0001, 0, 0, 0, 0x66, 0x77),
            ],
            12,
            Vec::new(),
        );
        assert_eq!(
            f.features,
            CpuFeatures {
                leaf_1_ecx: 0x11,
                leaf_1_edx: 0x22,
                leaf_7_ebx: 0x33,
                leaf_7_ecx: 0x44,
                leaf_7_edx: 0x55,
                leaf_8000_0001_ecx: 0x66,
                leaf_8000_0001_edx: 0x77,
            }
        );
        assert_eq!(
            f.xsave,
            XsaveFeatures {
                xcr0: 1 << 32 | 7,
                max_size: 0x340
            }
        );
    }
}
