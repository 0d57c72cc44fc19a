//! zygote's snapshot format: a frozen VM's state and its guest memory on disk.
//!
//! A *snapshot directory* holds exactly two files:
//!
//! - [`MEMORY_FILE`] (`memory`): guest RAM, raw, [`MemoryInfo::size`] bytes
//!   long. It is a sparse file: holes and all-zero pages need not be stored.
//! - [`MANIFEST_FILE`] (`snapshot.json`): the [`Manifest`]. It names the format
//!   and its version, the memory size and checksum, and carries the VM state.
//!
//! # What this crate owns
//!
//! - **The format**: the manifest's fields and the two file names.
//! - **Versioning**: [`open`] reads only [`VERSION`]; a manifest of any other
//!   version is refused with [`Error::Version`] (never a generic parse error,
//!   because `format` and `version` are read before anything else).
//! - **Checksums**: CRC-32 of the state text (checked by every [`open`]) and of
//!   the whole logical memory content (checked on demand by [`verify_memory`],
//!   and by [`save`] as it copies).
//! - **Capped reads**: a snapshot is untrusted input. [`open`] reads at most
//!   [`MAX_MANIFEST_SIZE`] bytes of manifest, and accepts only a memory size
//!   that is nonzero, a whole number of pages and at most [`MAX_MEMORY_SIZE`]
//!   ([`Error::TooLarge`], [`Error::MemorySize`]). [`write_manifest`] refuses
//!   to write what [`open`] would refuse to read.
//! - **Sparse copy**: [`save`] finds data with `SEEK_DATA`/`SEEK_HOLE`, skips
//!   holes, and leaves a hole for every 4 KiB page of data that is all zeros.
//! - **Atomic writes**: a manifest is written to a temporary file, fsynced and
//!   renamed; a saved snapshot is built in a temporary sibling directory,
//!   fsynced and renamed into place, so a reader sees a whole snapshot or none.
//!
//! # What it must not do
//!
//! It knows nothing about KVM. The VM state is an opaque JSON document that
//! the VMM defines; this crate stores it verbatim and checksums its text, but
//! never looks inside. It never maps memory for a VM: the VMM maps
//! [`Snapshot::memory_path`] itself (copy-on-write, for clones).

use std::fs::{self, File, OpenOptions};
use std::io::{self, Read, Write};
use std::os::unix::fs::{FileExt, OpenOptionsExt};
use std::os::unix::io::AsRawFd;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{SystemTime, UNIX_EPOCH};

use serde::{Deserialize, Serialize};
use serde_json::value::RawValue;

/// The value of [`Manifest::format`].
pub const FORMAT: &str = "zygote-snapshot";
/// The manifest version this crate writes and reads.
pub const VERSION: u32 = 1;
/// The manifest's file name inside a snapshot directory.
pub const MANIFEST_FILE: &str = "snapshot.json";
/// The guest memory's file name inside a snapshot directory.
pub const MEMORY_FILE: &str = "memory";

/// Page size: the memory file is a whole number of pages, and [`save`]
/// leaves zero pages as holes.
pub const PAGE_SIZE: u64 = 4096;
/// The largest manifest [`open`] reads. A VM's state is tens of KiB per
/// vCPU; this leaves room for hundreds of vCPUs and devices while keeping
/// a hostile manifest from costing more memory than a small VM.
pub const MAX_MANIFEST_SIZE: u64 = 64 << 20;
/// The largest guest memory a snapshot may declare: 1 TiB, far above any
/// microVM and below what a 64-bit size could claim.
pub const MAX_MEMORY_SIZE: u64 = 1 << 40;

/// [`PAGE_SIZE`] for slicing buffers.
const PAGE: usize = PAGE_SIZE as usize;
/// Copy and verify buffer size.
const BUF: usize = 1 << 20;

/// The guest memory file as the manifest describes it.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct MemoryInfo {
    /// Logical size of the memory file in bytes.
    pub size: u64,
    /// CRC-32 (crc32fast) of all `size` bytes, holes read as zeros. `None`
    /// when not computed (a live master in tmpfs).
    pub crc32: Option<u32>,
}

/// The contents of `snapshot.json`.
#[derive(Debug, Serialize, Deserialize)]
pub struct Manifest {
    /// Always [`FORMAT`].
    pub format: String,
    /// Always [`VERSION`].
    pub version: u32,
    /// When the manifest was written, in seconds since the Unix epoch.
    pub created_unix_s: u64,
    /// The memory file.
    pub memory: MemoryInfo,
    /// CRC-32 of `state.get().as_bytes()`.
    pub state_crc32: u32,
    /// The VM state: an opaque JSON document defined by the VMM, stored verbatim.
    pub state: Box<RawValue>,
}

/// A snapshot opened for use.
#[derive(Debug)]
pub struct Snapshot {
    /// The snapshot directory, as given to [`open`].
    pub dir: PathBuf,
    /// Its checked manifest.
    pub manifest: Manifest,
}

impl Snapshot {
    /// The path of the guest memory file.
    pub fn memory_path(&self) -> PathBuf {
        self.dir.join(MEMORY_FILE)
    }

    /// The VM state's JSON text, exactly as it was given to [`write_manifest`].
    pub fn state_json(&self) -> &str {
        self.manifest.state.get()
    }
}

/// What [`save`] did.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct SaveStats {
    /// Logical size of the memory.
    pub memory_size: u64,
    /// Bytes of memory actually written (the rest are holes).
    pub data_bytes: u64,
    /// Pages of the source's data that were all zeros and left as holes.
    pub zero_pages_skipped: u64,
}

/// Everything that can go wrong reading or writing a snapshot.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// The directory or its manifest does not exist.
    #[error("no snapshot at {} (no {MANIFEST_FILE})", path.display())]
    NotFound {
        /// The snapshot directory.
        path: PathBuf,
    },
    /// The manifest is not JSON, names another format, or misses fields.
    #[error("{} is not a zygote snapshot manifest: {why}", path.display())]
    NotASnapshot {
        /// The manifest file.
        path: PathBuf,
        /// What is wrong with it.
        why: String,
    },
    /// The manifest is of a version this crate does not read.
    #[error("snapshot {} is format version {found}; this zygote reads version {supported}", path.display())]
    Version {
        /// The snapshot directory.
        path: PathBuf,
        /// The manifest's version.
        found: u64,
        /// [`VERSION`].
        supported: u32,
    },
    /// The manifest is larger than any this crate reads.
    #[error("snapshot manifest {} is {size} bytes, more than the {max} bytes a zygote snapshot manifest may have", path.display())]
    TooLarge {
        /// The manifest file.
        path: PathBuf,
        /// Its size (at least; it may be growing).
        size: u64,
        /// [`MAX_MANIFEST_SIZE`].
        max: u64,
    },
    /// The memory size is zero, not a whole number of pages, or too large.
    #[error("snapshot {} declares {size} bytes of memory: it must be a nonzero multiple of {PAGE_SIZE} of at most {MAX_MEMORY_SIZE} bytes", path.display())]
    MemorySize {
        /// The snapshot directory.
        path: PathBuf,
        /// The declared (or found) size.
        size: u64,
    },
    /// The memory file is not as long as the manifest says.
    #[error("snapshot memory {} is {actual} bytes but its manifest says {expected} (truncated or corrupted)", path.display())]
    Truncated {
        /// The memory file.
        path: PathBuf,
        /// The size in the manifest.
        expected: u64,
        /// The file's length.
        actual: u64,
    },
    /// A checksum does not match.
    #[error("snapshot {}: {what} checksum mismatch (file corrupted)", path.display())]
    Checksum {
        /// The snapshot directory.
        path: PathBuf,
        /// `"state"` or `"memory"`.
        what: &'static str,
    },
    /// [`verify_memory`] on a snapshot whose manifest has no memory checksum.
    #[error("snapshot {} has no memory checksum (written from a live master); nothing to verify", path.display())]
    NoChecksum {
        /// The snapshot directory.
        path: PathBuf,
    },
    /// The VM state given to [`write_manifest`] is not valid JSON.
    #[error("VM state is not valid JSON: {0}")]
    BadState(String),
    /// [`save`]'s destination exists and is not an empty directory.
    #[error("{} already exists and is not an empty directory", path.display())]
    Exists {
        /// The destination.
        path: PathBuf,
    },
    /// An I/O error on a file.
    #[error("{}: {source}", path.display())]
    Io {
        /// The file or directory.
        path: PathBuf,
        /// The error.
        source: io::Error,
    },
}

/// Maps an `io::Error` on `path` to [`Error::Io`].
fn io_err(path: &Path) -> impl FnOnce(io::Error) -> Error + '_ {
    move |source| Error::Io {
        path: path.to_path_buf(),
        source,
    }
}

/// Writes `dir/snapshot.json` for memory already in `dir/memory`.
///
/// `state_json` must be valid JSON (else [`Error::BadState`]); it is stored
/// verbatim (leading and trailing whitespace aside). `memory.size` is the
/// memory file's length, which must be one [`open`] accepts
/// ([`Error::MemorySize`]), as must the manifest's size ([`Error::TooLarge`]).
/// The write is atomic: a temporary file in `dir` is written, fsynced and
/// renamed to `snapshot.json`, and `dir` is fsynced.
pub fn write_manifest(
    dir: &Path,
    state_json: &str,
    memory_crc32: Option<u32>,
) -> Result<Manifest, Error> {
    let state =
        RawValue::from_string(state_json.to_owned()).map_err(|e| Error::BadState(e.to_string()))?;
    let mem_path = dir.join(MEMORY_FILE);
    let size = fs::metadata(&mem_path).map_err(io_err(&mem_path))?.len();
    check_memory_size(dir, size)?;
    let manifest = Manifest {
        format: FORMAT.to_owned(),
        version: VERSION,
        created_unix_s: SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .map_or(0, |d| d.as_secs()),
        memory: MemoryInfo {
            size,
            crc32: memory_crc32,
        },
        state_crc32: crc32fast::hash(state.get().as_bytes()),
        state,
    };
    let mut text = serde_json::to_vec_pretty(&manifest)
        .map_err(|e| Error::BadState(format!("cannot serialize the manifest: {e}")))?;
    text.push(b'\n');

    let path = dir.join(MANIFEST_FILE);
    if text.len() as u64 > MAX_MANIFEST_SIZE {
        return Err(Error::TooLarge {
            path,
            size: text.len() as u64,
            max: MAX_MANIFEST_SIZE,
        });
    }
    let tmp = dir.join(format!(
        ".{MANIFEST_FILE}.tmp-{}-{}",
        std::process::id(),
        unique()
    ));
    let written = (|| {
        let mut f = OpenOptions::new()
            .write(true)
            .create_new(true)
            .mode(0o644)
            .open(&tmp)?;
        f.write_all(&text)?;
        f.sync_all()
    })();
    if let Err(e) = written {
        let _ = fs::remove_file(&tmp);
        return Err(io_err(&tmp)(e));
    }
    if let Err(e) = fs::rename(&tmp, &path) {
        let _ = fs::remove_file(&tmp);
        return Err(io_err(&path)(e));
    }
    sync_dir(dir)?;
    Ok(manifest)
}

/// Opens a snapshot directory.
///
/// Reads and checks the manifest: its size (at most [`MAX_MANIFEST_SIZE`]),
/// format, version, state checksum, the memory size (see
/// [`Error::MemorySize`]), and that the memory file is a regular file exactly
/// `memory.size` bytes long. Cheap: it does not read the memory (see
/// [`verify_memory`]).
pub fn open(dir: &Path) -> Result<Snapshot, Error> {
    let path = dir.join(MANIFEST_FILE);
    let text = match read_capped(&path, MAX_MANIFEST_SIZE) {
        Ok(t) => t,
        Err(ReadError::Io(e))
            if matches!(
                e.kind(),
                io::ErrorKind::NotFound | io::ErrorKind::NotADirectory
            ) =>
        {
            return Err(Error::NotFound {
                path: dir.to_path_buf(),
            })
        }
        Err(ReadError::Io(e)) => return Err(io_err(&path)(e)),
        Err(ReadError::TooLarge(size)) => {
            return Err(Error::TooLarge {
                path,
                size,
                max: MAX_MANIFEST_SIZE,
            })
        }
    };
    let manifest = parse_manifest(dir, &path, &text)?;
    check_memory_size(dir, manifest.memory.size)?;
    if crc32fast::hash(manifest.state.get().as_bytes()) != manifest.state_crc32 {
        return Err(Error::Checksum {
            path: dir.to_path_buf(),
            what: "state",
        });
    }
    let snap = Snapshot {
        dir: dir.to_path_buf(),
        manifest,
    };
    let mem_path = snap.memory_path();
    let meta = fs::metadata(&mem_path).map_err(io_err(&mem_path))?;
    if !meta.is_file() {
        return Err(Error::NotASnapshot {
            path: mem_path,
            why: "the memory is not a regular file".into(),
        });
    }
    check_len(&mem_path, snap.manifest.memory.size, meta.len())?;
    Ok(snap)
}

/// Why [`read_capped`] read nothing.
enum ReadError {
    Io(io::Error),
    /// The file is larger than the cap (its size, or cap + 1 if it grew).
    TooLarge(u64),
}

/// Reads the file at `path` if it is at most `max` bytes long. The length
/// is checked before reading, and the read stops after `max + 1` bytes in
/// case the file grows meanwhile.
fn read_capped(path: &Path, max: u64) -> Result<Vec<u8>, ReadError> {
    let file = File::open(path).map_err(ReadError::Io)?;
    let len = file.metadata().map_err(ReadError::Io)?.len();
    if len > max {
        return Err(ReadError::TooLarge(len));
    }
    let mut text = Vec::with_capacity(len as usize);
    file.take(max + 1)
        .read_to_end(&mut text)
        .map_err(ReadError::Io)?;
    if text.len() as u64 > max {
        return Err(ReadError::TooLarge(text.len() as u64));
    }
    Ok(text)
}

/// Checks a memory size a manifest declares (or a memory file has): nonzero,
/// a whole number of pages, at most [`MAX_MEMORY_SIZE`].
fn check_memory_size(dir: &Path, size: u64) -> Result<(), Error> {
    if size == 0 || !size.is_multiple_of(PAGE_SIZE) || size > MAX_MEMORY_SIZE {
        return Err(Error::MemorySize {
            path: dir.to_path_buf(),
            size,
        });
    }
    Ok(())
}

/// Parses a manifest in two steps, so that a manifest of another version is
/// [`Error::Version`] whatever else changed in it.
fn parse_manifest(dir: &Path, path: &Path, text: &[u8]) -> Result<Manifest, Error> {
    /// Just the fields every version has (the rest is skipped unparsed).
    #[derive(Deserialize)]
    struct Probe {
        format: Option<serde_json::Value>,
        version: Option<serde_json::Value>,
    }
    let not_a_snapshot = |why: String| Error::NotASnapshot {
        path: path.to_path_buf(),
        why,
    };
    if text.trim_ascii_start().first() != Some(&b'{') {
        return Err(not_a_snapshot(
            match serde_json::from_slice::<serde::de::IgnoredAny>(text) {
                Ok(_) => "not a JSON object".into(),
                Err(e) => format!("not JSON: {e}"),
            },
        ));
    }
    let probe: Probe =
        serde_json::from_slice(text).map_err(|e| not_a_snapshot(format!("not JSON: {e}")))?;
    match probe.format {
        Some(serde_json::Value::String(f)) if f == FORMAT => {}
        Some(f) => return Err(not_a_snapshot(format!("format is {f}, not \"{FORMAT}\""))),
        None => return Err(not_a_snapshot("no \"format\" field".into())),
    }
    match probe.version {
        Some(v) => match v.as_u64() {
            Some(found) if found == u64::from(VERSION) => {}
            Some(found) => {
                return Err(Error::Version {
                    path: dir.to_path_buf(),
                    found,
                    supported: VERSION,
                })
            }
            None => return Err(not_a_snapshot(format!("version {v} is not a number"))),
        },
        None => return Err(not_a_snapshot("no \"version\" field".into())),
    }
    serde_json::from_slice(text).map_err(|e| not_a_snapshot(e.to_string()))
}

/// Checks the memory file's `actual` length against the manifest's `expected`.
fn check_len(mem_path: &Path, expected: u64, actual: u64) -> Result<(), Error> {
    if actual == expected {
        Ok(())
    } else {
        Err(Error::Truncated {
            path: mem_path.to_path_buf(),
            expected,
            actual,
        })
    }
}

/// Reads the whole memory file and checks it against `memory.crc32`.
///
/// Holes are not read (`SEEK_DATA`/`SEEK_HOLE`); they count as zeros.
/// [`Error::NoChecksum`] if the manifest has no memory checksum.
pub fn verify_memory(snap: &Snapshot) -> Result<(), Error> {
    let Some(expected) = snap.manifest.memory.crc32 else {
        return Err(Error::NoChecksum {
            path: snap.dir.clone(),
        });
    };
    let mem_path = snap.memory_path();
    let file = File::open(&mem_path).map_err(io_err(&mem_path))?;
    let size = snap.manifest.memory.size;
    check_len(
        &mem_path,
        size,
        file.metadata().map_err(io_err(&mem_path))?.len(),
    )?;
    let mut buf = vec![0u8; BUF];
    let crc = walk(&file, &mem_path, size, &mut buf, |_, _| Ok(()))?;
    if crc != expected {
        return Err(Error::Checksum {
            path: snap.dir.clone(),
            what: "memory",
        });
    }
    Ok(())
}

/// Copies snapshot `src` into a new directory `dst`.
///
/// `dst` must not exist, or must be an empty directory (else
/// [`Error::Exists`]). The memory is copied sparsely: holes are skipped, and so
/// is every 4 KiB page of data that is all zeros. The CRC-32 of the full
/// logical content is computed on the way and written to the new manifest; if
/// `src` has a memory checksum and the copy does not match it, the save fails
/// with [`Error::Checksum`] rather than propagate a corrupted memory.
///
/// Atomic: everything is written into a temporary sibling directory
/// (`.{name}.partial-{pid}-{n}`), fsynced, then renamed to `dst`. On any error
/// the temporary directory is removed and nothing is left at `dst`.
pub fn save(src: &Snapshot, dst: &Path) -> Result<SaveStats, Error> {
    let name = dst.file_name().ok_or_else(|| Error::Io {
        path: dst.to_path_buf(),
        source: io::Error::new(io::ErrorKind::InvalidInput, "not a directory name"),
    })?;
    let parent = match dst.parent() {
        Some(p) if !p.as_os_str().is_empty() => p,
        _ => Path::new("."),
    };
    check_dst(dst)?;

    let mut tmp_name = std::ffi::OsString::from(".");
    tmp_name.push(name);
    tmp_name.push(format!(".partial-{}-{}", std::process::id(), unique()));
    let tmp = parent.join(tmp_name);
    match fs::create_dir(&tmp) {
        Ok(()) => {}
        Err(e) if e.kind() == io::ErrorKind::AlreadyExists => {
            // Left by a dead process that had our pid: nobody else uses it.
            fs::remove_dir_all(&tmp).map_err(io_err(&tmp))?;
            fs::create_dir(&tmp).map_err(io_err(&tmp))?;
        }
        Err(e) => return Err(io_err(&tmp)(e)),
    }
    let guard = RemoveOnDrop(Some(tmp.clone()));

    // copy_into fsyncs the memory, and write_manifest the manifest and `tmp`.
    let stats = copy_into(src, &tmp)?;
    if let Err(e) = fs::rename(&tmp, dst) {
        return Err(match e.raw_os_error() {
            Some(libc::ENOTEMPTY | libc::EEXIST | libc::ENOTDIR | libc::EISDIR) => Error::Exists {
                path: dst.to_path_buf(),
            },
            _ => io_err(dst)(e),
        });
    }
    guard.disarm();
    sync_dir(parent)?;
    Ok(stats)
}

/// Fails with [`Error::Exists`] unless `dst` is absent or an empty directory.
fn check_dst(dst: &Path) -> Result<(), Error> {
    match fs::symlink_metadata(dst) {
        Ok(m) if m.is_dir() => {
            let mut entries = fs::read_dir(dst).map_err(io_err(dst))?;
            if entries.next().is_none() {
                Ok(())
            } else {
                Err(Error::Exists {
                    path: dst.to_path_buf(),
                })
            }
        }
        Ok(_) => Err(Error::Exists {
            path: dst.to_path_buf(),
        }),
        Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(()),
        Err(e) => Err(io_err(dst)(e)),
    }
}

/// Writes `src`'s memory and a manifest into the (new, empty) directory `dir`.
fn copy_into(src: &Snapshot, dir: &Path) -> Result<SaveStats, Error> {
    let src_path = src.memory_path();
    let input = File::open(&src_path).map_err(io_err(&src_path))?;
    let size = src.manifest.memory.size;
    check_len(
        &src_path,
        size,
        input.metadata().map_err(io_err(&src_path))?.len(),
    )?;

    let dst_path = dir.join(MEMORY_FILE);
    let output = OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(0o644)
        .open(&dst_path)
        .map_err(io_err(&dst_path))?;
    let mut stats = SaveStats {
        memory_size: size,
        data_bytes: 0,
        zero_pages_skipped: 0,
    };
    let mut buf = vec![0u8; BUF];
    let crc = walk(&input, &src_path, size, &mut buf, |offset, data| {
        copy_nonzero_pages(&output, offset, data, &mut stats).map_err(io_err(&dst_path))
    })?;
    if src.manifest.memory.crc32.is_some_and(|c| c != crc) {
        return Err(Error::Checksum {
            path: src.dir.clone(),
            what: "memory",
        });
    }
    output.set_len(size).map_err(io_err(&dst_path))?;
    output.sync_all().map_err(io_err(&dst_path))?;
    drop(output);

    write_manifest(dir, src.state_json(), Some(crc))?;
    Ok(stats)
}

/// Writes the pages of `data` (which sits at `offset` in the file) that are
/// not all zeros to `out` at the same offset, in runs. Page boundaries are
/// file offsets that are multiples of [`PAGE`].
fn copy_nonzero_pages(
    out: &File,
    offset: u64,
    data: &[u8],
    stats: &mut SaveStats,
) -> io::Result<()> {
    let mut pos = 0usize; // in `data`
    let mut run: Option<usize> = None; // start of the pending run of data pages
    while pos < data.len() {
        let in_page = ((offset + pos as u64) % PAGE as u64) as usize;
        let end = (pos + PAGE - in_page).min(data.len());
        if is_zero(&data[pos..end]) {
            stats.zero_pages_skipped += 1;
            if let Some(start) = run.take() {
                out.write_all_at(&data[start..pos], offset + start as u64)?;
                stats.data_bytes += (pos - start) as u64;
            }
        } else if run.is_none() {
            run = Some(pos);
        }
        pos = end;
    }
    if let Some(start) = run {
        out.write_all_at(&data[start..], offset + start as u64)?;
        stats.data_bytes += (data.len() - start) as u64;
    }
    Ok(())
}

/// Whether `page` is all zeros. Folds 256-byte blocks with OR (which the
/// compiler vectorizes) and stops at the first non-zero block.
fn is_zero(page: &[u8]) -> bool {
    let mut blocks = page.chunks_exact(256);
    for block in &mut blocks {
        if block.iter().fold(0u8, |acc, &b| acc | b) != 0 {
            return false;
        }
    }
    blocks.remainder().iter().all(|&b| b == 0)
}

/// Reads the first `size` bytes of `file` (at `path`, for errors) through
/// `buf`, skipping holes, and returns their CRC-32 (holes count as zeros).
/// Each piece of data read is passed to `on_data` with its file offset.
/// Pieces never straddle a multiple of `buf.len()` (itself a multiple of
/// [`PAGE`]).
fn walk(
    file: &File,
    path: &Path,
    size: u64,
    buf: &mut [u8],
    mut on_data: impl FnMut(u64, &[u8]) -> Result<(), Error>,
) -> Result<u32, Error> {
    let chunk = buf.len() as u64;
    let mut hasher = crc32fast::Hasher::new();
    let mut pos = 0u64;
    while pos < size {
        let (data, hole) = next_data(file, pos, size).map_err(io_err(path))?;
        hash_zeros(&mut hasher, data - pos);
        pos = data;
        while pos < hole {
            let end = ((pos / chunk + 1) * chunk).min(hole);
            let piece = &mut buf[..(end - pos) as usize];
            file.read_exact_at(piece, pos).map_err(io_err(path))?;
            hasher.update(piece);
            on_data(pos, piece)?;
            pos = end;
        }
    }
    Ok(hasher.finalize())
}

/// The next data region of `file` at or after `pos`, as `(start, end)`, both
/// clamped to `size`. `(size, size)` when only holes remain. On a file that
/// cannot report holes, everything is data. (Also what a master's transfer
/// walks to send data only.)
pub fn next_data(file: &File, pos: u64, size: u64) -> io::Result<(u64, u64)> {
    let data = match seek(file, pos, libc::SEEK_DATA) {
        Ok(d) => d.min(size),
        Err(e) if e.raw_os_error() == Some(libc::ENXIO) => return Ok((size, size)),
        Err(e) if e.raw_os_error() == Some(libc::EINVAL) => return Ok((pos, size)),
        Err(e) => return Err(e),
    };
    if data >= size {
        return Ok((size, size));
    }
    let hole = match seek(file, data, libc::SEEK_HOLE) {
        Ok(h) => h.min(size),
        // The file shrank under us: read_exact_at will report it.
        Err(e) if e.raw_os_error() == Some(libc::ENXIO) => size,
        Err(e) => return Err(e),
    };
    Ok((data, hole.max(data + 1)))
}

/// `lseek(2)` on `file`'s descriptor.
fn seek(file: &File, offset: u64, whence: libc::c_int) -> io::Result<u64> {
    let offset = libc::off_t::try_from(offset)
        .map_err(|_| io::Error::new(io::ErrorKind::InvalidInput, "offset too large"))?;
    // SAFETY: lseek only reads the descriptor, which `file` keeps open; the
    // shared file offset it moves is not used by this crate (all I/O is
    // positioned: pread/pwrite).
    let r = unsafe { libc::lseek(file.as_raw_fd(), offset, whence) };
    if r < 0 {
        Err(io::Error::last_os_error())
    } else {
        Ok(r as u64)
    }
}

/// Appends `n` zero bytes to `hasher` in O(log n) time, without reading them
/// (the holes of a sparse memory file, here and in a master's transfer).
///
/// A CRC register `r` fed `n` zeros becomes `shift(r, n)`, which is linear.
/// With crc32fast's conditioning (`crc = !r`), appending zeros to a CRC `c`
/// gives `shift(c, n) ^ !shift(!0, n)`, and `shift(x, n)` is
/// `combine(x, 0, n)`.
pub fn hash_zeros(hasher: &mut crc32fast::Hasher, n: u64) {
    if n == 0 {
        return;
    }
    let mut ones = crc32fast::Hasher::new_with_initial(!0);
    ones.combine(&crc32fast::Hasher::new_with_initial_len(0, n));
    let zeros_crc = !ones.finalize();
    hasher.combine(&crc32fast::Hasher::new_with_initial_len(zeros_crc, n));
}

/// fsyncs a directory, so that renames and new entries in it are durable.
fn sync_dir(dir: &Path) -> Result<(), Error> {
    File::open(dir)
        .and_then(|d| d.sync_all())
        .map_err(io_err(dir))
}

/// A number unique within this process, for temporary names.
fn unique() -> u64 {
    static NEXT: AtomicU64 = AtomicU64::new(0);
    NEXT.fetch_add(1, Ordering::Relaxed)
}

/// Removes a temporary directory when dropped, unless disarmed.
struct RemoveOnDrop(Option<PathBuf>);

impl RemoveOnDrop {
    fn disarm(mut self) {
        self.0 = None;
    }
}

impl Drop for RemoveOnDrop {
    fn drop(&mut self) {
        if let Some(dir) = self.0.take() {
            let _ = fs::remove_dir_all(dir);
        }
    }
}

#[cfg(test)]
mod fuzz;
#[cfg(test)]
mod tests;
