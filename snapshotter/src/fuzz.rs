//! Randomized tests of [`open`], the reader of a snapshot directory that
//! anyone may have written: arbitrary bytes as a manifest, and valid
//! snapshots with bit flips, cuts, insertions, fields of the wrong type or
//! size, wrong versions and memory files of the wrong length.
//!
//! Every case ends in a snapshot or an [`Error`]; a snapshot that opens has
//! exactly the state that was written (the state checksum holds), a memory
//! size it accepts and a memory file of that size; no allocation is larger
//! than a few times the manifest. Test code only: it owns the test binary's
//! global allocator, which measures the largest allocation of the thread
//! under test.

use std::alloc::{GlobalAlloc, Layout, System};
use std::cell::Cell;

use proptest::prelude::*;
use serde_json::Value;
use tempfile::TempDir;

use super::*;

thread_local! {
    /// The largest allocation this thread made since [`largest_allocation`]
    /// reset it.
    static LARGEST: Cell<usize> = const { Cell::new(0) };
}

/// The system allocator, noting each thread's largest request.
struct Measuring;

fn note(size: usize) {
    let _ = LARGEST.try_with(|l| l.set(l.get().max(size)));
}

// SAFETY: every method forwards to `System` with the caller's own
// arguments, so `Measuring` upholds exactly `System`'s guarantees; `note`
// only touches a const-initialized thread-local `Cell` and never allocates.
unsafe impl GlobalAlloc for Measuring {
    unsafe fn alloc(&self, layout: Layout) -> *mut u8 {
        note(layout.size());
        // SAFETY: the caller's contract for `alloc` is `System.alloc`'s.
        unsafe { System.alloc(layout) }
    }

    unsafe fn alloc_zeroed(&self, layout: Layout) -> *mut u8 {
        note(layout.size());
        // SAFETY: the caller's contract for `alloc_zeroed` is `System`'s.
        unsafe { System.alloc_zeroed(layout) }
    }

    unsafe fn realloc(&self, ptr: *mut u8, layout: Layout, new_size: usize) -> *mut u8 {
        note(new_size);
        // SAFETY: `ptr` was allocated by `System` with `layout`: the
        // caller's contract for `realloc` is `System`'s.
        unsafe { System.realloc(ptr, layout, new_size) }
    }

    unsafe fn dealloc(&self, ptr: *mut u8, layout: Layout) {
        // SAFETY: `ptr` was allocated by `System` with `layout`.
        unsafe { System.dealloc(ptr, layout) }
    }
}

#[global_allocator]
static ALLOCATOR: Measuring = Measuring;

/// Runs `f` and returns its result and the largest allocation it made.
fn largest_allocation<R>(f: impl FnOnce() -> R) -> (R, usize) {
    LARGEST.with(|l| l.set(0));
    let r = f();
    (r, LARGEST.with(Cell::get))
}

/// A VM state as opaque to this crate as the VMM's, in the form serde_json
/// writes it (so that editing other fields of the manifest through a
/// `Value` leaves its text as it was).
const STATE: &str = r#"{"n":-1.5e+300,"name":"é \"q\"","state_version":2,"vcpus":[{"msrs":[1,2,3],"rip":"0xfff0"}]}"#;

/// What a corruption does to a valid snapshot.
#[derive(Debug, Clone)]
enum Corruption {
    /// XOR a byte of the manifest.
    Flip(prop::sample::Index, u8),
    /// Cut the manifest.
    Truncate(prop::sample::Index),
    /// Insert bytes into the manifest.
    Insert(prop::sample::Index, Vec<u8>),
    /// Set a field (a JSON pointer) to a value, or remove it.
    Field(&'static str, Option<Value>),
    /// Make the memory file this long.
    MemoryLen(u64),
}

fn value() -> impl Strategy<Value = Value> {
    prop_oneof![
        Just(Value::Null),
        any::<bool>().prop_map(Value::Bool),
        any::<u64>().prop_map(Value::from),
        any::<i64>().prop_map(Value::from),
        any::<f64>().prop_map(Value::from),
        Just(Value::from(u64::MAX)),
        Just(serde_json::json!(1e300)),
        Just(Value::from(VERSION + 1)),
        Just(Value::from(PAGE_SIZE)),
        Just(Value::from(MAX_MEMORY_SIZE + PAGE_SIZE)),
        ".{0,12}".prop_map(Value::from),
        Just(serde_json::json!([1, 2, 3])),
        Just(serde_json::json!({"state_version": 2})),
    ]
}

fn corruption() -> impl Strategy<Value = Corruption> {
    let field = prop::sample::select(vec![
        "/format",
        "/version",
        "/created_unix_s",
        "/memory",
        "/memory/size",
        "/memory/crc32",
        "/state_crc32",
        "/state",
        "/state/vcpus",
        "/state/name",
    ]);
    prop_oneof![
        4 => (any::<prop::sample::Index>(), 1u8..).prop_map(|(i, m)| Corruption::Flip(i, m)),
        2 => any::<prop::sample::Index>().prop_map(Corruption::Truncate),
        2 => (any::<prop::sample::Index>(), prop::collection::vec(any::<u8>(), 1..8))
            .prop_map(|(i, b)| Corruption::Insert(i, b)),
        4 => (field, prop::option::weighted(0.8, value()))
            .prop_map(|(f, v)| Corruption::Field(f, v)),
        1 => prop_oneof![Just(0u64), 1u64..3 * PAGE_SIZE, Just(2 * PAGE_SIZE)]
            .prop_map(Corruption::MemoryLen),
    ]
}

/// Sets or removes the value at `pointer` in `doc`.
fn set_field(doc: &mut Value, pointer: &str, v: Option<Value>) {
    let (parent, key) = pointer.rsplit_once('/').unwrap();
    let parent = if parent.is_empty() {
        Some(&mut *doc)
    } else {
        doc.pointer_mut(parent)
    };
    if let Some(Value::Object(map)) = parent {
        match v {
            Some(v) => {
                map.insert(key.to_string(), v);
            }
            None => {
                map.remove(key);
            }
        }
    }
}

/// A valid snapshot of `pages` pages in a fresh directory.
fn valid(pages: u64) -> TempDir {
    let dir = TempDir::new().unwrap();
    let mem = File::create(dir.path().join(MEMORY_FILE)).unwrap();
    mem.set_len(pages * PAGE_SIZE).unwrap();
    write_manifest(dir.path(), STATE, Some(0)).unwrap();
    dir
}

/// Opens `dir` and checks what a snapshot that opens must be.
fn open_checked(dir: &Path, manifest_len: usize) -> Result<Result<Snapshot, Error>, TestCaseError> {
    let (opened, largest) = largest_allocation(|| open(dir));
    prop_assert!(
        largest <= 64 * 1024 + 8 * manifest_len,
        "allocated {} bytes for a manifest of {}",
        largest,
        manifest_len
    );
    if let Ok(snap) = &opened {
        let m = &snap.manifest;
        prop_assert_eq!(&m.format, FORMAT);
        prop_assert_eq!(m.version, VERSION);
        prop_assert_eq!(crc32fast::hash(snap.state_json().as_bytes()), m.state_crc32);
        prop_assert!(m.memory.size > 0 && m.memory.size.is_multiple_of(PAGE_SIZE));
        prop_assert!(m.memory.size <= MAX_MEMORY_SIZE);
        let len = fs::metadata(snap.memory_path()).unwrap().len();
        prop_assert_eq!(len, m.memory.size);
        // The memory check reads the file: its answer, whatever it is, is typed.
        match verify_memory(snap) {
            Ok(()) | Err(Error::Checksum { .. } | Error::NoChecksum { .. }) => {}
            Err(e) => prop_assert!(false, "verify_memory: {}", e),
        }
    }
    Ok(opened)
}

#[test]
fn the_state_survives_editing_the_manifest_as_a_value() {
    let v: Value = serde_json::from_str(STATE).unwrap();
    assert_eq!(serde_json::to_string(&v).unwrap(), STATE);
}

fn config(cases: u32) -> ProptestConfig {
    ProptestConfig {
        // PROPTEST_CASES, when set, runs that many instead (a deeper run).
        cases: match std::env::var_os("PROPTEST_CASES") {
            Some(_) => ProptestConfig::default().cases,
            None => cases,
        },
        failure_persistence: None,
        ..ProptestConfig::default()
    }
}

proptest! {
    #![proptest_config(config(128))]

    /// Any bytes as a manifest: an error, never a snapshot.
    #[test]
    fn any_bytes_are_no_snapshot(
        bytes in prop_oneof![
            prop::collection::vec(any::<u8>(), 0..256),
            // Something that starts like JSON.
            prop::collection::vec(any::<u8>(), 0..64).prop_map(|b| {
                let mut v = b"{\"format\":\"zygote-snapshot\",\"version\":1,".to_vec();
                v.extend(b);
                v
            }),
        ],
    ) {
        let dir = valid(1);
        fs::write(dir.path().join(MANIFEST_FILE), &bytes).unwrap();
        let opened = open_checked(dir.path(), bytes.len())?;
        prop_assert!(opened.is_err());
    }

    /// A valid snapshot, corrupted: it opens only with the state it was
    /// written with, else it is refused with a typed error.
    #[test]
    fn corrupted_snapshots_are_refused_or_intact(
        pages in 1u64..4,
        corruptions in prop::collection::vec(corruption(), 1..4),
    ) {
        let dir = valid(pages);
        let path = dir.path().join(MANIFEST_FILE);
        let mut text = fs::read(&path).unwrap();
        for c in &corruptions {
            match c {
                Corruption::Flip(at, mask) => {
                    if !text.is_empty() {
                        let i = at.index(text.len());
                        text[i] ^= mask;
                    }
                }
                Corruption::Truncate(at) => text.truncate(at.index(text.len() + 1)),
                Corruption::Insert(at, bytes) => {
                    let i = at.index(text.len() + 1);
                    text.splice(i..i, bytes.iter().copied());
                }
                Corruption::Field(pointer, v) => {
                    if let Ok(mut doc) = serde_json::from_slice::<Value>(&text) {
                        set_field(&mut doc, pointer, v.clone());
                        text = serde_json::to_vec(&doc).unwrap();
                    }
                }
                Corruption::MemoryLen(len) => {
                    File::options()
                        .write(true)
                        .open(dir.path().join(MEMORY_FILE))
                        .unwrap()
                        .set_len(*len)
                        .unwrap();
                }
            }
        }
        fs::write(&path, &text).unwrap();
        match open_checked(dir.path(), text.len())? {
            Ok(snap) => {
                // Only what the checksum cannot see may have changed.
                let state: Value = serde_json::from_str(snap.state_json()).unwrap();
                prop_assert_eq!(state, serde_json::from_str::<Value>(STATE).unwrap());
            }
            Err(
                Error::NotASnapshot { .. }
                | Error::Version { .. }
                | Error::MemorySize { .. }
                | Error::Truncated { .. }
                | Error::Checksum { .. },
            ) => {}
            Err(e) => prop_assert!(false, "unexpected error {}", e),
        }
    }
}
