//! Randomized tests of [`VmSnapshot::read`], the reader of a snapshot's VM
//! state (after the snapshot crate checked its files and checksum: a state
//! anyone could have written with a matching checksum), and of
//! [`VmSnapshot::check_host`] on what it accepts.
//!
//! A valid state (built without KVM) is corrupted at the JSON level (any
//! field replaced by any value, removed, arrays grown or emptied) and at the
//! text level (bytes flipped, where the result is still JSON): every case
//! ends in a state whose layout this VMM rebuilds and whose RAM size is the
//! memory file's, or in a typed [`CheckError`] of the reading kind. Test
//! code only.

use proptest::prelude::*;
use serde_json::Value;

use super::tests::device;
use super::*;
use crate::devices::virtio::rng::persist::{RngState, RNG_STATE_VERSION};
use crate::devices::virtio::vsock::persist::{VsockState, VSOCK_STATE_VERSION};
use crate::vstate::fingerprint::{CpuFeatures, XsaveFeatures, RESTORE_CAPS};

const MIB: u64 = 2;

fn host() -> HostFingerprint {
    HostFingerprint {
        cpu_vendor: "GenuineIntel".into(),
        cpu_family: 6,
        cpu_model: 85,
        cpu_stepping: 7,
        features: CpuFeatures {
            leaf_1_ecx: 0x7ffa_3203,
            leaf_1_edx: 0x178b_fbff,
            ..CpuFeatures::default()
        },
        xsave: XsaveFeatures {
            xcr0: 7,
            max_size: 832,
        },
        kvm_api_version: 12,
        kvm_caps: RESTORE_CAPS
            .iter()
            .map(|(_, name)| name.to_string())
            .collect(),
    }
}

fn vcpu(index: u8) -> VcpuState {
    VcpuState {
        index,
        cpuid: vec![Default::default(); 3],
        msrs: vec![Default::default(); 4],
        regs: Default::default(),
        sregs: Default::default(),
        xsave: Default::default(),
        xcrs: Default::default(),
        debug_regs: Default::default(),
        lapic: Default::default(),
        mp_state: Default::default(),
        vcpu_events: Default::default(),
        tsc_khz: Some(2_000_000),
    }
}

fn valid_state() -> Value {
    let snap = VmSnapshot {
        state_version: STATE_VERSION,
        host: host(),
        memory_mib: MIB,
        cmdline: "console=ttyS0".into(),
        vm: VmState {
            pic_master: Default::default(),
            pic_slave: Default::default(),
            ioapic: Default::default(),
            pit: Default::default(),
            clock: Default::default(),
        },
        vcpus: vec![vcpu(0), vcpu(1)],
        devices: vec![
            device(
                DeviceModelState::Vsock(VsockState {
                    version: VSOCK_STATE_VERSION,
                    guest_cid: 3,
                    connections: None,
                }),
                0,
            ),
            device(
                DeviceModelState::Rng(RngState {
                    version: RNG_STATE_VERSION,
                }),
                1,
            ),
        ],
        serial: Default::default(),
    };
    serde_json::to_value(&snap).unwrap()
}

/// A snapshot as `snapshotter::open` returns it, with `state` as its state.
fn opened(state: String) -> Option<snapshotter::Snapshot> {
    let state = serde_json::value::RawValue::from_string(state).ok()?;
    Some(snapshotter::Snapshot {
        dir: std::path::PathBuf::from("snapshot"),
        manifest: snapshotter::Manifest {
            format: snapshotter::FORMAT.into(),
            version: snapshotter::VERSION,
            created_unix_s: 0,
            memory: snapshotter::MemoryInfo {
                size: MIB << 20,
                crc32: None,
            },
            // Checked by `snapshotter::open`, not by the reader under test.
            state_crc32: 0,
            state,
        },
    })
}

/// One edit of the state document.
#[derive(Debug, Clone)]
enum Edit {
    /// Replace the value the path leads to.
    Set(Value),
    /// Remove it (from its object or array).
    Remove,
    /// Repeat it (in its array).
    Repeat(u8),
}

fn value() -> impl Strategy<Value = Value> {
    prop_oneof![
        Just(Value::Null),
        any::<bool>().prop_map(Value::from),
        any::<u64>().prop_map(Value::from),
        any::<i64>().prop_map(Value::from),
        any::<f64>().prop_map(Value::from),
        (0u64..40).prop_map(Value::from),
        Just(Value::from(u64::MAX)),
        "[a-z_]{0,10}".prop_map(Value::from),
        Just(serde_json::json!([])),
        Just(serde_json::json!({})),
        Just(serde_json::json!([0, 1, 255, 256])),
        Just(serde_json::json!({"kind": "net", "version": 1})),
    ]
}

fn edit() -> impl Strategy<Value = Edit> {
    prop_oneof![
        6 => value().prop_map(Edit::Set),
        2 => Just(Edit::Remove),
        1 => (1u8..40).prop_map(Edit::Repeat),
    ]
}

/// Applies `edit` at the node the `path` choices lead to (each choice picks
/// a child, modulo the number of children; the walk stops at a leaf or at
/// the end of the choices).
fn apply(doc: &mut Value, path: &[prop::sample::Index], edit: &Edit) {
    let Some((&choice, rest)) = path.split_first() else {
        if let Edit::Set(v) = edit {
            *doc = v.clone();
        }
        return;
    };
    let descend = |child: &mut Value| !rest.is_empty() && (child.is_object() || child.is_array());
    match doc {
        Value::Object(map) if !map.is_empty() => {
            let key = map.keys().nth(choice.index(map.len())).unwrap().clone();
            let child = map.get_mut(&key).unwrap();
            if descend(child) {
                apply(child, rest, edit);
                return;
            }
            match edit {
                Edit::Set(v) => *child = v.clone(),
                Edit::Remove | Edit::Repeat(_) => {
                    map.remove(&key);
                }
            }
        }
        Value::Array(items) if !items.is_empty() => {
            let i = choice.index(items.len());
            if descend(&mut items[i]) {
                apply(&mut items[i], rest, edit);
                return;
            }
            match edit {
                Edit::Set(v) => items[i] = v.clone(),
                Edit::Remove => {
                    items.remove(i);
                }
                Edit::Repeat(n) => {
                    let item = items[i].clone();
                    items.extend(std::iter::repeat_n(item, usize::from(*n)));
                }
            }
        }
        other => {
            if let Edit::Set(v) = edit {
                *other = v.clone();
            }
        }
    }
}

/// Reads `state` and checks what any outcome must be.
fn read_checked(state: String) -> Result<(), TestCaseError> {
    let Some(snap) = opened(state) else {
        return Ok(());
    };
    match VmSnapshot::read(&snap) {
        Ok(s) => {
            prop_assert_eq!(s.state_version, STATE_VERSION);
            prop_assert_eq!(s.check_layout(crate::boot::mptable::MAX_VCPUS), Ok(()));
            prop_assert_eq!(s.memory_mib << 20, snap.manifest.memory.size);
            match s.check_host(&host()) {
                Ok(()) | Err(CheckError::Host(_)) => {}
                Err(e) => prop_assert!(false, "check_host: {}", e),
            }
        }
        Err(
            CheckError::StateVersion { .. }
            | CheckError::BadStateVersion(_)
            | CheckError::Parse(_)
            | CheckError::Layout(_),
        ) => {}
        Err(e) => prop_assert!(false, "reading a state gave {}", e),
    }
    Ok(())
}

#[test]
fn the_unedited_state_reads_back() {
    let snap = opened(valid_state().to_string()).unwrap();
    let s = VmSnapshot::read(&snap).unwrap();
    assert_eq!(s.vcpus.len(), 2);
    assert_eq!(s.devices.len(), 2);
    s.check_host(&host()).unwrap();
}

proptest! {
    #![proptest_config(crate::devices::virtio::ring_fuzz::config(64))]

    #[test]
    fn edited_states_are_read_or_refused(
        edits in prop::collection::vec(
            (prop::collection::vec(any::<prop::sample::Index>(), 1..7), edit()),
            1..4,
        ),
    ) {
        let mut doc = valid_state();
        for (path, e) in &edits {
            apply(&mut doc, path, e);
        }
        read_checked(doc.to_string())?;
    }

    #[test]
    fn flipped_states_are_read_or_refused(
        flips in prop::collection::vec((any::<prop::sample::Index>(), 1u8..), 1..4),
        cut in prop::option::weighted(0.2, any::<prop::sample::Index>()),
    ) {
        let mut text = valid_state().to_string().into_bytes();
        for (at, mask) in flips {
            let i = at.index(text.len());
            text[i] ^= mask;
        }
        if let Some(cut) = cut {
            text.truncate(cut.index(text.len() + 1));
        }
        if let Ok(text) = String::from_utf8(text) {
            read_checked(text)?;
        }
    }
}
