//! Moving a frozen master between hosts: what the source sends (an
//! [`Offer`], then its memory as a stream of checksummed records of data
//! only, read by a [`MemoryReader`]) and what the receiver does with it (a
//! [`Sink`] writes the records into a temporary snapshot directory, keeps
//! what it needs to resume, and hands a whole, checked snapshot to the
//! runtime's load path). No HTTP here: the `api` crate carries the bytes.
//!
//! # The memory stream
//!
//! Offsets are byte offsets in the guest memory (the memory file's logical
//! content). A stream that starts at offset `F` (a multiple of 4 KiB) is:
//!
//! ```text
//! preamble  MAGIC "ZYGMEM01" | memory size u64 | F u64              (24 bytes)
//! record*   offset u64 | len u32 | crc u32 | len bytes of data     (16 + len)
//! end       offset = memory size | len = 0 | crc u32               (16 bytes)
//! ```
//!
//! Integers are little-endian. `crc` is the CRC-32 of the record's first 12
//! bytes followed by its data, so a flipped bit in an offset, a length or
//! the data is caught. Records come in ascending, non-overlapping order, at
//! or after `F`, hold at most [`CHUNK`] bytes, and carry only pages that are
//! not all zeros: holes of the sparse memory file and zero pages never go
//! over the wire. A stream without its end record was cut: the receiver asks
//! again from the end of the last whole record it wrote ([`Sink::resume_offset`]).
//!
//! # Checks
//!
//! Every record is checked as it arrives (the data is written only if its
//! CRC matches). At the end, the snapshot goes through
//! [`crate::master::load`]'s checks: the manifest's format, version and state
//! CRC, the CRC-32 of the whole memory (which the [`Offer`] carries, computed
//! by the source), and the VMM's own check that this host can restore the
//! state (CPU, KVM). A refused snapshot is removed; nothing is registered.

use std::collections::BTreeSet;
use std::fs::{File, OpenOptions};
use std::io;
use std::os::unix::fs::{FileExt, OpenOptionsExt};
use std::path::{Path, PathBuf};
use std::sync::Mutex;

use serde::{Deserialize, Serialize};

use snapshotter::{hash_zeros, next_data};

use crate::master::MasterError;
use crate::store::Store;

/// The first 8 bytes of a memory stream.
pub const MAGIC: &[u8; 8] = b"ZYGMEM01";
/// The preamble's length.
pub const PREAMBLE: usize = 24;
/// A record header's length.
pub const HEADER: usize = 16;
/// Most data bytes in one record (and what the source reads at once).
pub const CHUNK: usize = 1 << 20;
/// The page size: zero pages are skipped, resume offsets are page-aligned.
pub const PAGE: u64 = snapshotter::PAGE_SIZE;

/// What a source offers for one master: its snapshot manifest (with the
/// memory CRC filled in) and what the memory stream will carry.
#[derive(Debug, Serialize, Deserialize, utoipa::ToSchema)]
pub struct Offer {
    /// Guest memory size, bytes (the memory stream's offset space).
    pub memory_size: u64,
    /// CRC-32 of the whole memory (holes and skipped pages read as zeros).
    pub memory_crc32: u32,
    /// Data bytes a whole stream carries (non-zero pages), without headers.
    pub payload_bytes: u64,
    /// Records a whole stream carries (each costs [`HEADER`] bytes).
    pub records: u64,
    /// The snapshot manifest (`snapshot.json`), `memory.crc32` filled in.
    #[schema(value_type = Object)]
    pub manifest: snapshotter::Manifest,
}

impl Offer {
    /// Bytes of a whole memory stream from offset 0.
    pub fn stream_bytes(&self) -> u64 {
        PREAMBLE as u64 + self.records * HEADER as u64 + self.payload_bytes + HEADER as u64
    }

    /// What identifies the snapshot: a partial transfer resumes only into
    /// the same one.
    fn key(&self) -> Key {
        Key {
            memory_size: self.memory_size,
            memory_crc32: self.memory_crc32,
            state_crc32: self.manifest.state_crc32,
            created_unix_s: self.manifest.created_unix_s,
        }
    }
}

/// Errors moving a master.
#[derive(Debug, thiserror::Error)]
pub enum TransferError {
    /// The stream is not what the format allows, or a checksum failed: the
    /// partial snapshot was thrown away.
    #[error("the master's memory arrived corrupted: {0}")]
    Corrupt(String),
    /// The stream ended before its end record; resume from `at`.
    #[error("the transfer was cut at memory offset {at}")]
    Cut {
        /// Where to resume.
        at: u64,
    },
    /// The offer cannot be used.
    #[error("the source's offer is unusable: {0}")]
    BadOffer(String),
    /// Another transfer to the same master runs.
    #[error("a transfer of master {0:?} is under way already")]
    Busy(String),
    /// A file.
    #[error("{}: {source}", path.display())]
    Io {
        /// The file.
        path: PathBuf,
        /// The error.
        source: io::Error,
    },
    /// The snapshot was refused (its checks, or this host cannot run it).
    #[error(transparent)]
    Master(#[from] MasterError),
}

fn io_err(path: &Path) -> impl FnOnce(io::Error) -> TransferError + '_ {
    move |source| TransferError::Io {
        path: path.to_path_buf(),
        source,
    }
}

// ------------------------------------------------------------- source

/// Reads a memory file as the records of a memory stream: data extents
/// only (`SEEK_DATA`/`SEEK_HOLE`), zero pages skipped, [`CHUNK`] at a time.
#[derive(Debug)]
pub struct MemoryReader {
    file: File,
    path: PathBuf,
    size: u64,
    from: u64,
    /// Next offset to look at.
    pos: u64,
    /// End of the data extent `pos` is in (`pos` when not known).
    extent_end: u64,
    buf: Vec<u8>,
    started: bool,
    ended: bool,
}

impl MemoryReader {
    /// A reader of the memory file at `path` (`size` bytes of guest memory)
    /// from offset `from`, which must be a multiple of [`PAGE`] and at most
    /// `size`.
    pub fn open(path: &Path, size: u64, from: u64) -> Result<Self, TransferError> {
        if !from.is_multiple_of(PAGE) || from > size {
            return Err(TransferError::BadOffer(format!(
                "offset {from} is not a multiple of {PAGE} within the memory's {size} bytes"
            )));
        }
        let file = File::open(path).map_err(io_err(path))?;
        Ok(MemoryReader {
            file,
            path: path.to_path_buf(),
            size,
            from,
            pos: from,
            extent_end: from,
            buf: vec![0; CHUNK],
            started: false,
            ended: false,
        })
    }

    /// The next piece of the stream (the preamble, then one or more records
    /// per call, then the end record); `None` after the end. A piece is at
    /// most [`CHUNK`] data bytes plus headers.
    pub fn next_piece(&mut self) -> Result<Option<Vec<u8>>, TransferError> {
        if !self.started {
            self.started = true;
            let mut p = Vec::with_capacity(PREAMBLE);
            p.extend_from_slice(MAGIC);
            p.extend_from_slice(&self.size.to_le_bytes());
            p.extend_from_slice(&self.from.to_le_bytes());
            return Ok(Some(p));
        }
        if self.ended {
            return Ok(None);
        }
        let mut out = Vec::new();
        while out.is_empty() {
            match self.next_data()? {
                Some((offset, len)) => {
                    let data = &self.buf[..len];
                    for (start, end) in nonzero_runs(offset, data) {
                        encode_record(&mut out, offset + start as u64, &data[start..end]);
                    }
                }
                None => {
                    self.ended = true;
                    encode_record(&mut out, self.size, &[]);
                }
            }
        }
        Ok(Some(out))
    }

    /// Reads the next piece of data (at most [`CHUNK`] bytes, not crossing
    /// a multiple of it) into `buf`: its offset and length.
    fn next_data(&mut self) -> Result<Option<(u64, usize)>, TransferError> {
        if self.pos >= self.extent_end {
            let (data, hole) =
                next_data(&self.file, self.pos, self.size).map_err(io_err(&self.path))?;
            if data >= self.size {
                return Ok(None);
            }
            self.pos = data;
            self.extent_end = hole;
        }
        let chunk = CHUNK as u64;
        let end = ((self.pos / chunk + 1) * chunk).min(self.extent_end);
        let len = (end - self.pos) as usize;
        self.file
            .read_exact_at(&mut self.buf[..len], self.pos)
            .map_err(io_err(&self.path))?;
        let at = self.pos;
        self.pos = end;
        Ok(Some((at, len)))
    }
}

/// Describes the snapshot in `dir` for a receiver: reads its memory once
/// (data only) for the whole-memory CRC and the stream's size.
pub fn offer(dir: &Path) -> Result<Offer, TransferError> {
    let snap = snapshotter::open(dir).map_err(MasterError::from)?;
    let size = snap.manifest.memory.size;
    let mut reader = MemoryReader::open(&snap.memory_path(), size, 0)?;
    let mut hasher = crc32fast::Hasher::new();
    let (mut pos, mut payload, mut records) = (0u64, 0u64, 0u64);
    while let Some((offset, len)) = reader.next_data()? {
        let data = &reader.buf[..len];
        for (start, end) in nonzero_runs(offset, data) {
            let at = offset + start as u64;
            hash_zeros(&mut hasher, at - pos);
            hasher.update(&data[start..end]);
            pos = at + (end - start) as u64;
            payload += (end - start) as u64;
            records += 1;
        }
    }
    hash_zeros(&mut hasher, size - pos);
    let crc = hasher.finalize();
    if snap.manifest.memory.crc32.is_some_and(|c| c != crc) {
        return Err(MasterError::from(snapshotter::Error::Checksum {
            path: dir.to_path_buf(),
            what: "memory",
        })
        .into());
    }
    let mut manifest = snap.manifest;
    manifest.memory.crc32 = Some(crc);
    Ok(Offer {
        memory_size: size,
        memory_crc32: crc,
        payload_bytes: payload,
        records,
        manifest,
    })
}

/// Appends one record (`data` at `offset`) to `out`.
pub fn encode_record(out: &mut Vec<u8>, offset: u64, data: &[u8]) {
    let mut head = [0u8; 12];
    head[..8].copy_from_slice(&offset.to_le_bytes());
    head[8..].copy_from_slice(&(data.len() as u32).to_le_bytes());
    let mut h = crc32fast::Hasher::new();
    h.update(&head);
    h.update(data);
    out.extend_from_slice(&head);
    out.extend_from_slice(&h.finalize().to_le_bytes());
    out.extend_from_slice(data);
}

/// The runs of pages of `data` (at file offset `offset`) that are not all
/// zeros, as `(start, end)` indexes into `data`.
fn nonzero_runs(offset: u64, data: &[u8]) -> Vec<(usize, usize)> {
    let page = PAGE as usize;
    let mut runs = Vec::new();
    let mut run: Option<usize> = None;
    let mut pos = 0usize;
    while pos < data.len() {
        let in_page = ((offset + pos as u64) % PAGE) as usize;
        let end = (pos + page - in_page).min(data.len());
        if data[pos..end].iter().all(|&b| b == 0) {
            if let Some(s) = run.take() {
                runs.push((s, pos));
            }
        } else if run.is_none() {
            run = Some(pos);
        }
        pos = end;
    }
    if let Some(s) = run {
        runs.push((s, data.len()));
    }
    runs
}

// ----------------------------------------------------------- receiver

/// What a partial transfer is of (kept next to it to resume).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
struct Key {
    memory_size: u64,
    memory_crc32: u32,
    state_crc32: u32,
    created_unix_s: u64,
}

/// `resume.json` of a partial transfer.
#[derive(Debug, Serialize, Deserialize)]
struct ResumeState {
    key: Key,
    /// Every record below this offset is written (and synced).
    received_upto: u64,
}

/// The resume file's name in a transfer directory.
const RESUME_FILE: &str = "resume.json";

/// Transfer directories in use in this process.
static IN_FLIGHT: Mutex<BTreeSet<PathBuf>> = Mutex::new(BTreeSet::new());

/// Where the stream decoder is.
#[derive(Debug)]
enum Expect {
    Preamble,
    Header,
    Data { offset: u64, len: usize, crc: u32 },
    Done,
}

/// The receiving end of a transfer: a temporary snapshot directory
/// (`STATE_DIR/transfers/NAME/`) being filled by memory streams.
#[derive(Debug)]
pub struct Sink {
    dir: PathBuf,
    file: File,
    key: Key,
    state_json: String,
    received_upto: u64,
    /// Where the current stream started.
    stream_from: u64,
    expect: Expect,
    pending: Vec<u8>,
    /// Data bytes written by this sink (all streams).
    written: u64,
    resumed_from: u64,
}

impl Sink {
    /// Opens the transfer of `offer` as master `store_name`: resumes a
    /// partial transfer of the same snapshot left in the store, else starts
    /// afresh. [`TransferError::Busy`] while another sink has it open.
    pub fn open(store: &Store, store_name: &str, offer: &Offer) -> Result<Sink, TransferError> {
        crate::store::check_name(store_name).map_err(MasterError::from)?;
        let m = &offer.manifest;
        if m.format != snapshotter::FORMAT || m.version != snapshotter::VERSION {
            return Err(TransferError::BadOffer(format!(
                "snapshot format {:?} version {}; this zygote reads {:?} version {}",
                m.format,
                m.version,
                snapshotter::FORMAT,
                snapshotter::VERSION
            )));
        }
        if m.memory.size != offer.memory_size
            || m.memory.crc32 != Some(offer.memory_crc32)
            || offer.memory_size == 0
            || !offer.memory_size.is_multiple_of(PAGE)
            || offer.memory_size > snapshotter::MAX_MEMORY_SIZE
        {
            return Err(TransferError::BadOffer(format!(
                "memory size {} / CRC {:08x} do not match the manifest's",
                offer.memory_size, offer.memory_crc32
            )));
        }
        if crc32fast::hash(m.state.get().as_bytes()) != m.state_crc32 {
            return Err(TransferError::BadOffer("state checksum mismatch".into()));
        }
        let parent = store.root().join("transfers");
        std::fs::create_dir_all(&parent).map_err(io_err(&parent))?;
        let dir = parent.join(store_name);
        if !lock_in_flight().insert(dir.clone()) {
            return Err(TransferError::Busy(store_name.to_string()));
        }
        // From here, dropping the sink releases the directory.
        let key = offer.key();
        let resumed = Self::resume_point(&dir, &key);
        let opened = (|| {
            if resumed.is_none() {
                let _ = std::fs::remove_dir_all(&dir);
                std::fs::create_dir(&dir).map_err(io_err(&dir))?;
            }
            let path = dir.join(snapshotter::MEMORY_FILE);
            let file = OpenOptions::new()
                .read(true)
                .write(true)
                .create(true)
                .truncate(false)
                .mode(0o644)
                .open(&path)
                .map_err(io_err(&path))?;
            file.set_len(offer.memory_size).map_err(io_err(&path))?;
            Ok::<_, TransferError>(file)
        })();
        let file = match opened {
            Ok(f) => f,
            Err(e) => {
                lock_in_flight().remove(&dir);
                return Err(e);
            }
        };
        let from = resumed.unwrap_or(0);
        let sink = Sink {
            dir,
            file,
            key,
            state_json: m.state.get().to_string(),
            received_upto: from,
            stream_from: from,
            expect: Expect::Done,
            pending: Vec::new(),
            written: 0,
            resumed_from: from,
        };
        sink.save_resume()?;
        Ok(sink)
    }

    fn resume_point(dir: &Path, key: &Key) -> Option<u64> {
        let text = std::fs::read(dir.join(RESUME_FILE)).ok()?;
        let st: ResumeState = serde_json::from_slice(&text).ok()?;
        let len = std::fs::metadata(dir.join(snapshotter::MEMORY_FILE))
            .ok()?
            .len();
        (st.key == *key && len == key.memory_size && st.received_upto <= key.memory_size)
            .then_some(st.received_upto)
    }

    /// The transfer directory.
    pub fn dir(&self) -> &Path {
        &self.dir
    }

    /// Where the next stream must start (a multiple of [`PAGE`]).
    pub fn resume_offset(&self) -> u64 {
        self.received_upto
    }

    /// Where this sink started (nonzero when it took over a partial
    /// transfer left by an earlier attempt).
    pub fn resumed_from(&self) -> u64 {
        self.resumed_from
    }

    /// Data bytes this sink wrote.
    pub fn written(&self) -> u64 {
        self.written
    }

    /// Whether the end record has arrived.
    pub fn complete(&self) -> bool {
        matches!(self.expect, Expect::Done) && self.received_upto == self.key.memory_size
    }

    /// Starts reading a new stream, which must start at [`Sink::resume_offset`].
    pub fn begin(&mut self) {
        self.stream_from = self.received_upto;
        self.expect = Expect::Preamble;
        self.pending.clear();
    }

    /// Takes the next bytes of the stream: whole records are checked and
    /// written as they complete. A [`TransferError::Corrupt`] is final.
    pub fn feed(&mut self, mut bytes: &[u8]) -> Result<(), TransferError> {
        while !bytes.is_empty() {
            let need = match self.expect {
                Expect::Preamble => PREAMBLE,
                Expect::Header => HEADER,
                Expect::Data { len, .. } => len,
                Expect::Done => {
                    return Err(TransferError::Corrupt("bytes after the end record".into()))
                }
            };
            // A whole item in `bytes` is taken in place; one that arrives
            // in pieces is gathered in `pending`.
            if self.pending.is_empty() && bytes.len() >= need {
                let (item, rest) = bytes.split_at(need);
                bytes = rest;
                self.take_item(item)?;
            } else {
                let take = (need - self.pending.len()).min(bytes.len());
                self.pending.extend_from_slice(&bytes[..take]);
                bytes = &bytes[take..];
                if self.pending.len() == need {
                    let item = std::mem::take(&mut self.pending);
                    self.take_item(&item)?;
                    self.pending = item;
                    self.pending.clear();
                }
            }
        }
        Ok(())
    }

    fn take_item(&mut self, item: &[u8]) -> Result<(), TransferError> {
        let size = self.key.memory_size;
        let u64_at = |i: usize| u64::from_le_bytes(item[i..i + 8].try_into().unwrap_or_default());
        let u32_at = |i: usize| u32::from_le_bytes(item[i..i + 4].try_into().unwrap_or_default());
        match self.expect {
            Expect::Preamble => {
                if &item[..8] != MAGIC {
                    return Err(TransferError::Corrupt("not a zygote memory stream".into()));
                }
                let (s, f) = (u64_at(8), u64_at(16));
                if s != size || f != self.stream_from {
                    return Err(TransferError::Corrupt(format!(
                        "the stream is of {s} bytes from {f}; {size} bytes from {} were asked for",
                        self.stream_from
                    )));
                }
                self.expect = Expect::Header;
            }
            Expect::Header => {
                let (offset, len, crc) = (u64_at(0), u32_at(8) as usize, u32_at(12));
                if len == 0 {
                    if offset != size || crc32fast::hash(&item[..12]) != crc {
                        return Err(TransferError::Corrupt(format!(
                            "a bad end record (offset {offset})"
                        )));
                    }
                    self.received_upto = size;
                    self.expect = Expect::Done;
                } else {
                    if len > CHUNK
                        || offset < self.received_upto
                        || offset.checked_add(len as u64).is_none_or(|e| e > size)
                    {
                        return Err(TransferError::Corrupt(format!(
                            "a record of {len} bytes at offset {offset} (expected at most {CHUNK} bytes at or after {}, within {size})",
                            self.received_upto
                        )));
                    }
                    self.expect = Expect::Data { offset, len, crc };
                }
            }
            Expect::Data { offset, len, crc } => {
                let mut h = crc32fast::Hasher::new();
                h.update(&offset.to_le_bytes());
                h.update(&(len as u32).to_le_bytes());
                h.update(item);
                if h.finalize() != crc {
                    return Err(TransferError::Corrupt(format!(
                        "checksum mismatch in the {len} bytes at memory offset {offset}"
                    )));
                }
                let path = self.dir.join(snapshotter::MEMORY_FILE);
                self.file
                    .write_all_at(item, offset)
                    .map_err(io_err(&path))?;
                self.written += len as u64;
                // Records end on page boundaries but the last of a memory
                // whose data ends mid-page; resume from a page boundary.
                let end = offset + len as u64;
                self.received_upto = if end.is_multiple_of(PAGE) {
                    end
                } else {
                    end - end % PAGE
                }
                .max(self.received_upto);
                self.expect = Expect::Header;
            }
            Expect::Done => {}
        }
        Ok(())
    }

    /// The current stream ended (whole or cut): syncs what was written and
    /// records where to resume. `Err(Cut)` when it was cut.
    pub fn end_stream(&mut self) -> Result<(), TransferError> {
        self.pending.clear();
        let path = self.dir.join(snapshotter::MEMORY_FILE);
        self.file.sync_data().map_err(io_err(&path))?;
        self.save_resume()?;
        if self.complete() {
            Ok(())
        } else {
            self.expect = Expect::Done;
            Err(TransferError::Cut {
                at: self.received_upto,
            })
        }
    }

    fn save_resume(&self) -> Result<(), TransferError> {
        let st = ResumeState {
            key: self.key.clone(),
            received_upto: self.received_upto,
        };
        crate::store::write_record(&self.dir.join(RESUME_FILE), &st).map_err(|e| {
            TransferError::Io {
                path: self.dir.join(RESUME_FILE),
                source: io::Error::other(e.to_string()),
            }
        })
    }

    /// Completes the snapshot: writes its manifest (with the source's
    /// memory CRC) and returns the directory, ready for the load path
    /// (which checks everything again). Only after the end record.
    pub fn finish(&mut self) -> Result<PathBuf, TransferError> {
        if !self.complete() {
            return Err(TransferError::Cut {
                at: self.received_upto,
            });
        }
        let path = self.dir.join(snapshotter::MEMORY_FILE);
        self.file.sync_all().map_err(io_err(&path))?;
        snapshotter::write_manifest(&self.dir, &self.state_json, Some(self.key.memory_crc32))
            .map_err(MasterError::from)?;
        let resume = self.dir.join(RESUME_FILE);
        std::fs::remove_file(&resume).map_err(io_err(&resume))?;
        Ok(self.dir.clone())
    }

    /// Removes the partial transfer (after a corruption or a refusal).
    pub fn discard(self) {
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

impl Drop for Sink {
    fn drop(&mut self) {
        lock_in_flight().remove(&self.dir);
    }
}

fn lock_in_flight() -> std::sync::MutexGuard<'static, BTreeSet<PathBuf>> {
    IN_FLIGHT.lock().unwrap_or_else(|e| e.into_inner())
}

#[cfg(test)]
mod tests {
    use super::*;

    const MIB: u64 = 1 << 20;

    /// A snapshot of `size` bytes in `dir` with data at a few places (one
    /// extent spans a chunk boundary, one holds a zero page), the rest
    /// holes. Returns the data bytes that are not zero pages.
    fn snapshot(dir: &Path, size: u64) -> u64 {
        std::fs::create_dir_all(dir).unwrap();
        let f = File::create(dir.join(snapshotter::MEMORY_FILE)).unwrap();
        f.set_len(size).unwrap();
        let mut nonzero = 0;
        for (at, pages, seed) in [(0u64, 3u64, 1u8), (MIB - 8192, 5, 2), (5 * MIB, 1, 3)] {
            let mut data = vec![seed; (pages * PAGE) as usize];
            if pages == 5 {
                // A zero page inside a data extent.
                data[(2 * PAGE) as usize..(3 * PAGE) as usize].fill(0);
                nonzero += 4 * PAGE;
            } else {
                nonzero += pages * PAGE;
            }
            f.write_all_at(&data, at).unwrap();
        }
        snapshotter::write_manifest(dir, r#"{"vcpus": 1, "x": [1, 2]}"#, None).unwrap();
        nonzero
    }

    fn stream(dir: &Path, size: u64, from: u64) -> Vec<u8> {
        let mut r = MemoryReader::open(&dir.join(snapshotter::MEMORY_FILE), size, from).unwrap();
        let mut out = Vec::new();
        while let Some(p) = r.next_piece().unwrap() {
            assert!(p.len() <= CHUNK + 64 * HEADER);
            out.extend_from_slice(&p);
        }
        out
    }

    /// Feeds `bytes` in odd-sized pieces.
    fn feed(sink: &mut Sink, bytes: &[u8]) -> Result<(), TransferError> {
        for piece in bytes.chunks(7777) {
            sink.feed(piece)?;
        }
        Ok(())
    }

    #[test]
    fn a_stream_carries_only_data_and_rebuilds_the_snapshot() {
        let tmp = tempfile::tempdir().unwrap();
        let src = tmp.path().join("src");
        let size = 8 * MIB;
        let nonzero = snapshot(&src, size);
        let offer = offer(&src).unwrap();
        assert_eq!(offer.payload_bytes, nonzero);
        assert_eq!(offer.memory_size, size);
        let bytes = stream(&src, size, 0);
        assert_eq!(bytes.len() as u64, offer.stream_bytes());
        assert!(bytes.len() < 64 << 10, "{} bytes for 8 MiB", bytes.len());
        // The offer's CRC is the snapshotter's.
        let mut saved = snapshotter::open(&src).unwrap();
        saved.manifest.memory.crc32 = Some(offer.memory_crc32);
        snapshotter::verify_memory(&saved).unwrap();
        // Through JSON, as the API sends it.
        let offer: Offer = serde_json::from_slice(&serde_json::to_vec(&offer).unwrap()).unwrap();

        let store = Store::at(tmp.path().join("store"));
        let mut sink = Sink::open(&store, "m", &offer).unwrap();
        assert_eq!(sink.resume_offset(), 0);
        sink.begin();
        feed(&mut sink, &bytes).unwrap();
        sink.end_stream().unwrap();
        assert_eq!(sink.written(), nonzero);
        let dir = sink.finish().unwrap();
        let snap = snapshotter::open(&dir).unwrap();
        snapshotter::verify_memory(&snap).unwrap();
        assert_eq!(snap.state_json(), r#"{"vcpus": 1, "x": [1, 2]}"#);
        let a = std::fs::read(src.join("memory")).unwrap();
        let b = std::fs::read(dir.join("memory")).unwrap();
        assert!(a == b);
        // Sparse: only the data is stored.
        use std::os::unix::fs::MetadataExt;
        let blocks = std::fs::metadata(dir.join("memory")).unwrap().blocks() * 512;
        assert!(blocks < MIB, "{blocks} bytes stored");
        assert!(!dir.join(RESUME_FILE).exists());
    }

    #[test]
    fn a_cut_transfer_resumes_where_it_stopped_even_in_a_new_sink() {
        let tmp = tempfile::tempdir().unwrap();
        let src = tmp.path().join("src");
        let size = 8 * MIB;
        snapshot(&src, size);
        let offer = offer(&src).unwrap();
        let store = Store::at(tmp.path().join("store"));
        let whole = stream(&src, size, 0);
        let mut sink = Sink::open(&store, "m", &offer).unwrap();
        sink.begin();
        // The receiver stops after half the stream (mid-record).
        feed(&mut sink, &whole[..whole.len() / 2]).unwrap();
        let at = match sink.end_stream() {
            Err(TransferError::Cut { at }) => at,
            other => panic!("{other:?}"),
        };
        assert!(at > 0 && at.is_multiple_of(PAGE), "{at}");
        assert!(sink.finish().is_err());
        drop(sink);
        // A new sink (a new call) takes over the partial transfer.
        let mut sink = Sink::open(&store, "m", &offer).unwrap();
        assert_eq!((sink.resume_offset(), sink.resumed_from()), (at, at));
        let rest = stream(&src, size, at);
        assert!(
            rest.len() < whole.len(),
            "{} vs {}",
            rest.len(),
            whole.len()
        );
        sink.begin();
        feed(&mut sink, &rest).unwrap();
        sink.end_stream().unwrap();
        let dir = sink.finish().unwrap();
        snapshotter::verify_memory(&snapshotter::open(&dir).unwrap()).unwrap();
        assert!(
            std::fs::read(src.join("memory")).unwrap()
                == std::fs::read(dir.join("memory")).unwrap()
        );
    }

    #[test]
    fn corruption_and_bad_streams_are_refused() {
        let tmp = tempfile::tempdir().unwrap();
        let src = tmp.path().join("src");
        let size = 8 * MIB;
        snapshot(&src, size);
        let offer = offer(&src).unwrap();
        let store = Store::at(tmp.path().join("store"));
        let whole = stream(&src, size, 0);
        let cases: Vec<(Vec<u8>, &str)> = vec![
            (
                {
                    let mut b = whole.clone();
                    b[PREAMBLE + HEADER + 100] ^= 1;
                    b
                },
                "checksum",
            ),
            (
                {
                    let mut b = whole.clone();
                    b[PREAMBLE + 2] ^= 1;
                    b
                },
                "checksum",
            ),
            (
                {
                    let mut b = whole.clone();
                    b[PREAMBLE + 10] = 0x7f;
                    b
                },
                "record of",
            ),
            (
                {
                    let mut b = whole.clone();
                    b[0] = b'X';
                    b
                },
                "not a zygote",
            ),
            (
                {
                    let mut b = whole.clone();
                    b.push(0);
                    b
                },
                "after the end",
            ),
            (stream(&src, size, 4 * PAGE), "were asked for"),
        ];
        for (bytes, needle) in cases {
            let mut sink = Sink::open(&store, "m", &offer).unwrap();
            sink.begin();
            match feed(&mut sink, &bytes) {
                Err(TransferError::Corrupt(why)) => assert!(why.contains(needle), "{why}"),
                other => panic!("{needle}: {other:?}"),
            }
            sink.discard();
            assert!(!store.root().join("transfers/m").exists());
        }
    }

    #[test]
    fn one_sink_per_master_and_a_changed_source_starts_afresh() {
        let tmp = tempfile::tempdir().unwrap();
        let src = tmp.path().join("src");
        let size = 8 * MIB;
        snapshot(&src, size);
        let offer1 = offer(&src).unwrap();
        let store = Store::at(tmp.path().join("store"));
        let mut sink = Sink::open(&store, "m", &offer1).unwrap();
        assert!(matches!(
            Sink::open(&store, "m", &offer1),
            Err(TransferError::Busy(_))
        ));
        assert!(Sink::open(&store, "other", &offer1).is_ok());
        let whole = stream(&src, size, 0);
        sink.begin();
        feed(&mut sink, &whole[..whole.len() / 2]).unwrap();
        assert!(sink.end_stream().is_err());
        drop(sink);
        // The source's master changed (new state): the partial one is dropped.
        snapshotter::write_manifest(&src, r#"{"vcpus": 2}"#, None).unwrap();
        let offer2 = offer(&src).unwrap();
        let sink = Sink::open(&store, "m", &offer2).unwrap();
        assert_eq!(sink.resume_offset(), 0);
    }

    #[test]
    fn offers_that_do_not_add_up_are_refused() {
        let tmp = tempfile::tempdir().unwrap();
        let src = tmp.path().join("src");
        snapshot(&src, 8 * MIB);
        let store = Store::at(tmp.path().join("store"));
        let mut o = offer(&src).unwrap();
        o.memory_crc32 ^= 1;
        assert!(matches!(
            Sink::open(&store, "m", &o),
            Err(TransferError::BadOffer(_))
        ));
        let mut o = offer(&src).unwrap();
        o.manifest.version = 9;
        assert!(matches!(
            Sink::open(&store, "m", &o),
            Err(TransferError::BadOffer(_))
        ));
        assert!(MemoryReader::open(&src.join("memory"), 8 * MIB, 100).is_err());
    }

    #[test]
    fn zero_pages_split_runs() {
        let p = PAGE as usize;
        let mut d = vec![1u8; 4 * p];
        d[p..2 * p].fill(0);
        assert_eq!(nonzero_runs(0, &d), vec![(0, p), (2 * p, 4 * p)]);
        d[3 * p..].fill(0);
        assert_eq!(nonzero_runs(0, &d), vec![(0, p), (2 * p, 3 * p)]);
        assert!(nonzero_runs(0, &vec![0; 2 * p]).is_empty());
    }
}
