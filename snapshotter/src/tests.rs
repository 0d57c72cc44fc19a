use super::*;

use std::os::unix::fs::MetadataExt;

use tempfile::TempDir;

const STATE: &str = r#"{"vcpus": [ {"rip":  "0xfff0", "msrs":[1,2 ,3]} ],"name":"é\u00e9 \"q\""}"#;

/// A snapshot directory at `root/name` with `memory` of `size` bytes (sparse)
/// holding `pages` (offset, fill byte) and a manifest with the memory's CRC.
fn make_snapshot(root: &Path, name: &str, size: u64, pages: &[(u64, u8)]) -> PathBuf {
    let dir = root.join(name);
    fs::create_dir(&dir).unwrap();
    let f = File::create(dir.join(MEMORY_FILE)).unwrap();
    f.set_len(size).unwrap();
    for &(off, byte) in pages {
        f.write_all_at(&[byte; PAGE], off).unwrap();
    }
    drop(f);
    // The CRC without reading the holes (hashing_zeros_matches_reading_them
    // checks hash_zeros against the slow way).
    let mut hasher = crc32fast::Hasher::new();
    let mut pos = 0;
    for &(off, byte) in pages {
        assert!(off >= pos, "pages out of order");
        hash_zeros(&mut hasher, off - pos);
        hasher.update(&[byte; PAGE]);
        pos = off + PAGE as u64;
    }
    hash_zeros(&mut hasher, size - pos);
    let crc = hasher.finalize();
    write_manifest(&dir, STATE, Some(crc)).unwrap();
    dir
}

/// Entries of `dir` whose name contains `.partial` or `.tmp`.
fn leftovers(dir: &Path) -> Vec<String> {
    fs::read_dir(dir)
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .filter(|n| n.contains(".partial") || n.contains(".tmp"))
        .collect()
}

/// Asserts that files `a` and `b` are both `size` bytes with the same bytes.
fn assert_same_content(a: &Path, b: &Path, size: u64) {
    let (a, b) = (File::open(a).unwrap(), File::open(b).unwrap());
    assert_eq!(a.metadata().unwrap().len(), size);
    assert_eq!(b.metadata().unwrap().len(), size);
    let (mut buf_a, mut buf_b) = (vec![0u8; BUF], vec![0u8; BUF]);
    let mut pos = 0;
    while pos < size {
        let n = BUF.min((size - pos) as usize);
        a.read_exact_at(&mut buf_a[..n], pos).unwrap();
        b.read_exact_at(&mut buf_b[..n], pos).unwrap();
        assert!(buf_a[..n] == buf_b[..n], "files differ in [{pos}, +{n})");
        pos += n as u64;
    }
}

/// Rewrites `dir`'s manifest through `edit` on its JSON text.
fn edit_manifest(dir: &Path, edit: impl FnOnce(String) -> String) {
    let path = dir.join(MANIFEST_FILE);
    let text = fs::read_to_string(&path).unwrap();
    fs::write(&path, edit(text)).unwrap();
}

#[test]
fn write_manifest_then_open_round_trips() {
    let root = TempDir::new().unwrap();
    let dir = root.path();
    fs::write(dir.join(MEMORY_FILE), [7u8; 3 * PAGE]).unwrap();
    let written = write_manifest(dir, STATE, None).unwrap();
    assert_eq!(written.memory.size, 3 * PAGE as u64);
    assert_eq!(written.memory.crc32, None);

    let snap = open(dir).unwrap();
    assert_eq!(snap.state_json(), STATE);
    assert_eq!(snap.manifest.format, FORMAT);
    assert_eq!(snap.manifest.version, VERSION);
    assert_eq!(snap.manifest.memory.size, 3 * PAGE as u64);
    assert_eq!(snap.manifest.memory.crc32, None);
    assert_eq!(snap.manifest.state_crc32, crc32fast::hash(STATE.as_bytes()));
    assert_eq!(snap.manifest.created_unix_s, written.created_unix_s);
    assert_eq!(snap.memory_path(), dir.join(MEMORY_FILE));
    assert!(matches!(
        verify_memory(&snap),
        Err(Error::NoChecksum { .. })
    ));
    assert!(leftovers(dir).is_empty());

    // Rewriting replaces the manifest; whitespace around the state is dropped.
    write_manifest(dir, " \n[1, 2]\t\n", Some(5)).unwrap();
    let snap = open(dir).unwrap();
    assert_eq!(snap.state_json(), "[1, 2]");
    assert_eq!(snap.manifest.memory.crc32, Some(5));
}

#[test]
fn write_manifest_refuses_bad_state_and_missing_memory() {
    let root = TempDir::new().unwrap();
    let dir = root.path();
    fs::write(dir.join(MEMORY_FILE), b"").unwrap();
    let err = write_manifest(dir, "{\"a\": ", None).unwrap_err();
    assert!(matches!(err, Error::BadState(_)), "{err}");
    assert!(!dir.join(MANIFEST_FILE).exists());

    fs::remove_file(dir.join(MEMORY_FILE)).unwrap();
    let err = write_manifest(dir, "{}", None).unwrap_err();
    assert!(
        matches!(&err, Error::Io { path, .. } if path.ends_with(MEMORY_FILE)),
        "{err}"
    );
    assert!(leftovers(dir).is_empty());
}

#[test]
fn save_copies_sparsely() {
    const SIZE: u64 = 64 << 20;
    let root = TempDir::new().unwrap();
    let pages = [
        (0, 0x11),
        (5 * PAGE as u64, 0x22),
        (SIZE / 2, 0x00), // written, but all zeros
        (SIZE - PAGE as u64, 0x33),
    ];
    let src_dir = make_snapshot(root.path(), "src", SIZE, &pages);
    let src = open(&src_dir).unwrap();
    let dst_dir = root.path().join("dst");

    let stats = save(&src, &dst_dir).unwrap();
    assert_eq!(stats.memory_size, SIZE);
    assert_eq!(stats.data_bytes, 3 * PAGE as u64);
    assert!(stats.zero_pages_skipped >= 1, "{stats:?}");

    let dst = open(&dst_dir).unwrap();
    assert_eq!(dst.state_json(), STATE);
    assert_eq!(dst.manifest.memory.size, SIZE);
    assert_eq!(dst.manifest.memory.crc32, src.manifest.memory.crc32);
    verify_memory(&dst).unwrap();
    verify_memory(&src).unwrap();
    assert_same_content(&src.memory_path(), &dst.memory_path(), SIZE);
    let allocated = fs::metadata(dst.memory_path()).unwrap().blocks() * 512;
    assert!(allocated <= 64 * PAGE as u64, "{allocated} bytes allocated");
    assert!(leftovers(root.path()).is_empty());
    assert!(leftovers(&dst_dir).is_empty());
}

#[test]
fn save_handles_dense_memory_and_empty_dst_dir() {
    let root = TempDir::new().unwrap();
    let src_dir = root.path().join("src");
    fs::create_dir(&src_dir).unwrap();
    // Dense, not a whole number of copy buffers, with zero pages and a
    // zero last page.
    let mut mem: Vec<u8> = (0..3 * BUF + 3 * PAGE).map(|i| (i % 251) as u8).collect();
    mem[PAGE..3 * PAGE].fill(0);
    mem[BUF..BUF + PAGE].fill(0);
    let tail = mem.len() - PAGE;
    mem[tail..].fill(0);
    fs::write(src_dir.join(MEMORY_FILE), &mem).unwrap();
    write_manifest(&src_dir, "null", Some(crc32fast::hash(&mem))).unwrap();
    let src = open(&src_dir).unwrap();

    let dst_dir = root.path().join("dst");
    fs::create_dir(&dst_dir).unwrap();
    let stats = save(&src, &dst_dir).unwrap();
    assert_eq!(stats.zero_pages_skipped, 4);
    assert_eq!(stats.data_bytes, tail as u64 - 3 * PAGE as u64);
    assert_eq!(fs::read(dst_dir.join(MEMORY_FILE)).unwrap(), mem);
    verify_memory(&open(&dst_dir).unwrap()).unwrap();
    assert!(leftovers(root.path()).is_empty());
}

#[test]
fn save_of_a_memory_without_checksum_computes_one() {
    let root = TempDir::new().unwrap();
    let src_dir = make_snapshot(root.path(), "src", 1 << 20, &[(PAGE as u64, 9)]);
    write_manifest(&src_dir, STATE, None).unwrap();
    let src = open(&src_dir).unwrap();
    let dst_dir = root.path().join("dst");
    save(&src, &dst_dir).unwrap();
    let dst = open(&dst_dir).unwrap();
    assert!(dst.manifest.memory.crc32.is_some());
    verify_memory(&dst).unwrap();
}

#[test]
fn corrupted_memory_fails_verify_and_save() {
    let root = TempDir::new().unwrap();
    let src_dir = make_snapshot(root.path(), "src", 1 << 20, &[(0, 1), (8 * PAGE as u64, 2)]);
    let src = open(&src_dir).unwrap();
    let dst_dir = root.path().join("dst");
    save(&src, &dst_dir).unwrap();

    // Flip a byte in the copy: a data page, then a hole.
    let dst = open(&dst_dir).unwrap();
    let f = OpenOptions::new()
        .read(true)
        .write(true)
        .open(dst.memory_path())
        .unwrap();
    for off in [8 * PAGE as u64 + 17, 100 * PAGE as u64] {
        let mut byte = [0u8];
        f.read_exact_at(&mut byte, off).unwrap();
        f.write_all_at(&[byte[0] ^ 0x40], off).unwrap();
        let err = verify_memory(&dst).unwrap_err();
        assert!(
            matches!(err, Error::Checksum { what: "memory", .. }),
            "{err}"
        );
        assert!(
            err.to_string().contains("memory checksum mismatch"),
            "{err}"
        );
        f.write_all_at(&byte, off).unwrap();
        verify_memory(&dst).unwrap();
    }

    // A save from a corrupted source fails and leaves nothing behind.
    f.write_all_at(&[0xee], 3).unwrap();
    let again = root.path().join("again");
    let err = save(&dst, &again).unwrap_err();
    assert!(
        matches!(err, Error::Checksum { what: "memory", .. }),
        "{err}"
    );
    assert!(!again.exists());
    assert!(leftovers(root.path()).is_empty());
}

#[test]
fn corrupted_state_fails_open() {
    let root = TempDir::new().unwrap();
    let dir = make_snapshot(root.path(), "s", PAGE as u64, &[]);
    edit_manifest(&dir, |t| t.replace("0xfff0", "0xfff1"));
    let err = open(&dir).unwrap_err();
    assert!(
        matches!(err, Error::Checksum { what: "state", .. }),
        "{err}"
    );
    assert_eq!(
        err.to_string(),
        format!(
            "snapshot {}: state checksum mismatch (file corrupted)",
            dir.display()
        )
    );
}

#[test]
fn wrong_memory_length_fails_open() {
    let root = TempDir::new().unwrap();
    let dir = make_snapshot(root.path(), "s", 4 * PAGE as u64, &[(0, 1)]);
    let mem = dir.join(MEMORY_FILE);
    for len in [3 * PAGE as u64, 5 * PAGE as u64] {
        File::options()
            .write(true)
            .open(&mem)
            .unwrap()
            .set_len(len)
            .unwrap();
        let err = open(&dir).unwrap_err();
        match &err {
            Error::Truncated {
                path,
                expected,
                actual,
            } => {
                assert_eq!(path, &mem);
                assert_eq!(*expected, 4 * PAGE as u64);
                assert_eq!(*actual, len);
            }
            _ => panic!("{err}"),
        }
    }
    fs::remove_file(&mem).unwrap();
    let err = open(&dir).unwrap_err();
    assert!(
        matches!(&err, Error::Io { path, .. } if path == &mem),
        "{err}"
    );
}

#[test]
fn other_version_is_a_version_error() {
    let root = TempDir::new().unwrap();
    let dir = make_snapshot(root.path(), "s", PAGE as u64, &[]);
    // Another version may change everything else too.
    fs::write(
        dir.join(MANIFEST_FILE),
        r#"{"format": "zygote-snapshot", "version": 99, "memory": "elsewhere"}"#,
    )
    .unwrap();
    let err = open(&dir).unwrap_err();
    assert!(
        matches!(
            err,
            Error::Version {
                found: 99,
                supported: VERSION,
                ..
            }
        ),
        "{err}"
    );
    assert_eq!(
        err.to_string(),
        format!(
            "snapshot {} is format version 99; this zygote reads version 1",
            dir.display()
        )
    );
}

#[test]
fn malformed_manifests_are_not_snapshots() {
    let root = TempDir::new().unwrap();
    let dir = make_snapshot(root.path(), "s", PAGE as u64, &[]);
    let good = fs::read_to_string(dir.join(MANIFEST_FILE)).unwrap();
    let bad = [
        "this is not json".to_owned(),
        String::new(),
        "[1, 2]".to_owned(),
        good.replacen("zygote-snapshot", "other-snapshot", 1),
        good.replacen("\"format\"", "\"formet\"", 1),
        good.replacen("\"version\": 1", "\"version\": \"1\"", 1),
        good.replacen("\"state_crc32\"", "\"state_crc\"", 1),
        r#"{"format": "zygote-snapshot", "version": 1}"#.to_owned(),
        good[..good.len() / 2].to_owned(),
    ];
    for text in bad {
        fs::write(dir.join(MANIFEST_FILE), &text).unwrap();
        let err = open(&dir).unwrap_err();
        match &err {
            Error::NotASnapshot { path, .. } => assert_eq!(path, &dir.join(MANIFEST_FILE)),
            _ => panic!("{text:?}: {err}"),
        }
    }
}

#[test]
fn missing_snapshot_is_not_found() {
    let root = TempDir::new().unwrap();
    let missing = root.path().join("nope");
    let err = open(&missing).unwrap_err();
    assert!(
        matches!(&err, Error::NotFound { path } if path == &missing),
        "{err}"
    );
    assert_eq!(
        err.to_string(),
        format!("no snapshot at {} (no snapshot.json)", missing.display())
    );
    // A directory without a manifest, and a file where the directory should be.
    assert!(matches!(open(root.path()), Err(Error::NotFound { .. })));
    fs::write(&missing, b"x").unwrap();
    assert!(matches!(open(&missing), Err(Error::NotFound { .. })));
}

#[test]
fn save_refuses_an_existing_destination() {
    let root = TempDir::new().unwrap();
    let src = open(&make_snapshot(root.path(), "src", 1 << 20, &[(0, 1)])).unwrap();

    let full = root.path().join("full");
    fs::create_dir(&full).unwrap();
    fs::write(full.join("keep"), b"mine").unwrap();
    let err = save(&src, &full).unwrap_err();
    assert!(
        matches!(&err, Error::Exists { path } if path == &full),
        "{err}"
    );
    let names: Vec<_> = fs::read_dir(&full)
        .unwrap()
        .map(|e| e.unwrap().file_name())
        .collect();
    assert_eq!(names, ["keep"]);

    let file = root.path().join("file");
    fs::write(&file, b"mine").unwrap();
    assert!(matches!(save(&src, &file), Err(Error::Exists { .. })));
    assert_eq!(fs::read(&file).unwrap(), b"mine");

    // Saving onto itself.
    assert!(matches!(save(&src, &src.dir), Err(Error::Exists { .. })));
    assert!(leftovers(root.path()).is_empty());
    verify_memory(&open(&src.dir).unwrap()).unwrap();
}

#[test]
fn save_failure_leaves_nothing() {
    let root = TempDir::new().unwrap();
    let src = open(&make_snapshot(root.path(), "src", 1 << 20, &[(0, 1)])).unwrap();
    // The memory shrank after open.
    File::options()
        .write(true)
        .open(src.memory_path())
        .unwrap()
        .set_len(PAGE as u64)
        .unwrap();
    let dst = root.path().join("dst");
    assert!(matches!(save(&src, &dst), Err(Error::Truncated { .. })));
    assert!(!dst.exists());
    assert!(leftovers(root.path()).is_empty());
}

#[test]
fn hashing_zeros_matches_reading_them() {
    let zeros = vec![0u8; 3 * BUF + 123];
    for prefix in [&b""[..], b"x", b"some data"] {
        for n in [0, 1, 7, 4095, 4096, BUF + 1, zeros.len()] {
            let mut fast = crc32fast::Hasher::new();
            fast.update(prefix);
            hash_zeros(&mut fast, n as u64);
            fast.update(b"tail");
            let mut slow = crc32fast::Hasher::new();
            slow.update(prefix);
            slow.update(&zeros[..n]);
            slow.update(b"tail");
            assert_eq!(
                fast.finalize(),
                slow.finalize(),
                "prefix {prefix:?}, {n} zeros"
            );
        }
    }
}

#[test]
fn zero_pages_are_found() {
    let mut page = vec![0u8; PAGE];
    assert!(is_zero(&page));
    assert!(is_zero(&page[..100]));
    assert!(is_zero(&[]));
    for i in [0, 1, 255, 256, 2000, PAGE - 1] {
        page[i] = 1;
        assert!(!is_zero(&page), "byte {i}");
        assert!(!is_zero(&page[..=i]), "byte {i} at the end");
        page[i] = 0;
    }
}

/// Prints open, save and verify times for sparse memories (`run` is 1 MiB of
/// data written every `stride` MiB). Run it with
/// `cargo test -p snapshotter --release -- --ignored --nocapture timing`.
#[test]
#[ignore]
fn timing() {
    use std::time::Instant;
    let root = TempDir::new().unwrap();
    let dense: Vec<u8> = (0..BUF).map(|i| (i % 253) as u8 | 1).collect();
    let mut holey = dense.clone();
    for p in (0..BUF / PAGE).step_by(4) {
        holey[p * PAGE..(p + 1) * PAGE].fill(0);
    }
    let cases = [
        ("256 MiB, 32 MiB data", 256u64, 8u64, &dense),
        ("256 MiB, 32 MiB data, 1/4 zero pages", 256, 8, &holey),
        ("2 GiB, 4 MiB data", 2048, 512, &dense),
    ];
    for (i, (name, mib, stride, run)) in cases.into_iter().enumerate() {
        let src_dir = root.path().join(format!("src{i}"));
        fs::create_dir(&src_dir).unwrap();
        let f = File::create(src_dir.join(MEMORY_FILE)).unwrap();
        f.set_len(mib << 20).unwrap();
        for k in 0..mib / stride {
            f.write_all_at(run, (k * stride) << 20).unwrap();
        }
        f.sync_all().unwrap();
        drop(f);
        write_manifest(&src_dir, STATE, None).unwrap();
        let t = Instant::now();
        let src = open(&src_dir).unwrap();
        let open_t = t.elapsed();
        let dst_dir = root.path().join(format!("dst{i}"));
        let t = Instant::now();
        let stats = save(&src, &dst_dir).unwrap();
        let save_t = t.elapsed();
        let dst = open(&dst_dir).unwrap();
        let t = Instant::now();
        verify_memory(&dst).unwrap();
        let verify_t = t.elapsed();
        println!("{name}: open {open_t:?}, save {save_t:?}, verify {verify_t:?}; {stats:?}");
    }
}

#[test]
fn an_oversized_manifest_is_refused_unread() {
    let root = TempDir::new().unwrap();
    let dir = make_snapshot(root.path(), "s", PAGE as u64, &[]);
    // Sparse: 64 MiB and one byte of manifest cost nothing on disk, and
    // open must not read them.
    let f = OpenOptions::new()
        .write(true)
        .open(dir.join(MANIFEST_FILE))
        .unwrap();
    f.set_len(MAX_MANIFEST_SIZE + 1).unwrap();
    let err = open(&dir).unwrap_err();
    assert!(
        matches!(err, Error::TooLarge { size, max: MAX_MANIFEST_SIZE, .. } if size == MAX_MANIFEST_SIZE + 1),
        "{err}"
    );
    assert!(
        err.to_string().contains("more than the 67108864 bytes"),
        "{err}"
    );
}

#[test]
fn capped_reads_stop_at_the_cap() {
    let root = TempDir::new().unwrap();
    let path = root.path().join("f");
    fs::write(&path, b"0123456789a").unwrap();
    assert!(matches!(
        read_capped(&path, 10),
        Err(ReadError::TooLarge(11))
    ));
    assert_eq!(read_capped(&path, 11).ok().unwrap(), b"0123456789a");
    assert!(matches!(
        read_capped(&root.path().join("nope"), 10),
        Err(ReadError::Io(e)) if e.kind() == io::ErrorKind::NotFound
    ));
}

#[test]
fn memory_sizes_must_be_whole_pages_and_sane() {
    let root = TempDir::new().unwrap();
    let dir = make_snapshot(root.path(), "s", 2 * PAGE as u64, &[]);
    let good = fs::read_to_string(dir.join(MANIFEST_FILE)).unwrap();
    let declared = format!("\"size\": {}", 2 * PAGE);
    assert!(good.contains(&declared), "{good}");
    for size in [
        0,
        PAGE as u64 + 1,
        12345,
        MAX_MEMORY_SIZE + PAGE as u64,
        u64::MAX,
    ] {
        fs::write(
            dir.join(MANIFEST_FILE),
            good.replace(&declared, &format!("\"size\": {size}")),
        )
        .unwrap();
        let err = open(&dir).unwrap_err();
        assert!(
            matches!(&err, Error::MemorySize { size: s, path } if *s == size && path == &dir),
            "{size}: {err}"
        );
        assert!(
            err.to_string().contains("a nonzero multiple of 4096"),
            "{err}"
        );
    }
    // The largest size passes this check (and fails on the file's length).
    fs::write(
        dir.join(MANIFEST_FILE),
        good.replace(&declared, &format!("\"size\": {MAX_MEMORY_SIZE}")),
    )
    .unwrap();
    assert!(matches!(open(&dir), Err(Error::Truncated { .. })));

    // The writer refuses what the reader would.
    for len in [0, 12345] {
        let other = root.path().join(format!("w{len}"));
        fs::create_dir(&other).unwrap();
        fs::write(other.join(MEMORY_FILE), vec![1u8; len]).unwrap();
        let err = write_manifest(&other, STATE, None).unwrap_err();
        assert!(matches!(err, Error::MemorySize { .. }), "{err}");
        assert!(!other.join(MANIFEST_FILE).exists());
    }
}
