//! What a dynamically linked program needs inside a jail to start: its ELF
//! interpreter (`PT_INTERP`) and the shared libraries it loads
//! (`DT_NEEDED`, recursively), found where the host's dynamic loader finds
//! them, so the caller can bind each read-only at the same path
//! ([`crate::Bind::same_path`]). Cached per program path and mtime.
//!
//! This module must not mount or execute anything; it only reads files.

use std::collections::{HashMap, HashSet};
use std::fs;
use std::io::{self, Read};
use std::path::{Path, PathBuf};
use std::sync::{Mutex, OnceLock};
use std::time::SystemTime;

use object::elf;
use object::read::elf::{FileHeader, ProgramHeader};
use object::Endianness;

/// Why a program's runtime files could not be listed.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum ElfError {
    /// A file could not be read.
    #[error("cannot read {path}")]
    Read {
        /// The file.
        path: PathBuf,
        /// The OS error.
        #[source]
        source: io::Error,
    },
    /// A file is not a 64-bit ELF object the loader could use.
    #[error("{path} is not a valid 64-bit ELF file")]
    Parse {
        /// The file.
        path: PathBuf,
        /// The parser's complaint.
        #[source]
        source: object::read::Error,
    },
    /// A needed library is nowhere the loader would look.
    #[error("{library}, needed by {needed_by}, is in none of {searched:?}; install it or fix the program's RUNPATH")]
    Missing {
        /// The `DT_NEEDED` name.
        library: String,
        /// The object that needs it.
        needed_by: PathBuf,
        /// The directories searched.
        searched: Vec<PathBuf>,
    },
}

/// The loader's cache: bound too when a library lives outside the
/// loader's built-in directories, which are all it searches without it.
const LD_SO_CACHE: &str = "/etc/ld.so.cache";

/// The files `program` needs to start in a jail: its interpreter first,
/// then its shared libraries (and theirs), as absolute host paths at which
/// the loader will look for them; empty for a static program. Bind each at
/// the same path inside the root.
///
/// Libraries are searched like glibc's loader does: the object's
/// `DT_RUNPATH` (or `DT_RPATH`), the directories of `/etc/ld.so.conf`, then
/// the default directories. If one is found outside the loader's built-in
/// directories, `/etc/ld.so.cache` is listed too (inside the jail the
/// loader finds it only through the cache). `glibc-hwcaps` subdirectories
/// are not searched; `$ORIGIN` is expanded, other dynamic string tokens are
/// not.
pub fn elf_runtime_files(program: &Path) -> Result<Vec<PathBuf>, ElfError> {
    /// Files per program, with the program's mtime when they were found.
    type Cache = Mutex<HashMap<PathBuf, (SystemTime, Vec<PathBuf>)>>;
    static CACHE: OnceLock<Cache> = OnceLock::new();
    let read_err = |source| ElfError::Read {
        path: program.to_path_buf(),
        source,
    };
    let mtime = fs::metadata(program)
        .and_then(|m| m.modified())
        .map_err(read_err)?;
    let cache = CACHE.get_or_init(Default::default);
    if let Some((t, files)) = cache.lock().unwrap_or_else(|e| e.into_inner()).get(program) {
        if *t == mtime {
            return Ok(files.clone());
        }
    }
    let files = resolve(program, conf_dirs(), &default_dirs())?;
    cache
        .lock()
        .unwrap_or_else(|e| e.into_inner())
        .insert(program.to_path_buf(), (mtime, files.clone()));
    Ok(files)
}

/// What the loader needs to know of one object.
#[derive(Debug, Default)]
struct Object {
    machine: u16,
    interpreter: Option<PathBuf>,
    needed: Vec<String>,
    runpath: Option<String>,
    rpath: Option<String>,
}

fn parse(path: &Path) -> Result<Object, ElfError> {
    let data = fs::read(path).map_err(|source| ElfError::Read {
        path: path.to_path_buf(),
        source,
    })?;
    let parse_err = |source| ElfError::Parse {
        path: path.to_path_buf(),
        source,
    };
    let header = elf::FileHeader64::<Endianness>::parse(&*data).map_err(parse_err)?;
    let endian = header.endian().map_err(parse_err)?;
    let mut obj = Object {
        machine: header.e_machine(endian).0,
        ..Default::default()
    };
    for ph in header.program_headers(endian, &*data).map_err(parse_err)? {
        if let Some(interp) = ph.interpreter(endian, &*data).map_err(parse_err)? {
            obj.interpreter = Some(PathBuf::from(String::from_utf8_lossy(interp).into_owned()));
        }
    }
    let sections = header.sections(endian, &*data).map_err(parse_err)?;
    let table = sections.dynamic_table(endian, &*data).map_err(parse_err)?;
    for d in table.iter() {
        let text = || -> Result<String, ElfError> {
            Ok(String::from_utf8_lossy(table.string(d).map_err(parse_err)?).into_owned())
        };
        match d.tag {
            elf::DT_NEEDED => obj.needed.push(text()?),
            elf::DT_RUNPATH => obj.runpath = Some(text()?),
            elf::DT_RPATH => obj.rpath = Some(text()?),
            _ => {}
        }
    }
    Ok(obj)
}

fn resolve(
    program: &Path,
    conf: &[PathBuf],
    defaults: &[PathBuf],
) -> Result<Vec<PathBuf>, ElfError> {
    let top = parse(program)?;
    let mut out = Vec::new();
    let mut seen: HashSet<String> = HashSet::new();
    if let Some(interp) = &top.interpreter {
        // Libraries name the loader too (libc needs ld-linux…): the loader
        // is already in memory by its soname, so it is not looked up again.
        if let Some(name) = interp.file_name().and_then(|n| n.to_str()) {
            seen.insert(name.to_string());
        }
        out.push(interp.clone());
    }
    let mut outside_builtin = false;
    let mut queue: Vec<(PathBuf, Object)> = vec![(program.to_path_buf(), top)];
    while let Some((path, obj)) = queue.pop() {
        let dirs = search_dirs(&path, &obj, conf, defaults);
        for name in &obj.needed {
            if !seen.insert(name.clone()) {
                continue;
            }
            let found = if name.contains('/') {
                Some(PathBuf::from(name))
            } else {
                dirs.iter()
                    .map(|d| d.join(name))
                    .find(|candidate| is_elf_for(candidate, obj.machine))
            };
            let Some(lib) = found else {
                return Err(ElfError::Missing {
                    library: name.clone(),
                    needed_by: path.clone(),
                    searched: dirs,
                });
            };
            if !lib
                .parent()
                .is_some_and(|d| defaults.iter().any(|b| b == d))
            {
                outside_builtin = true;
            }
            let dep = parse(&lib)?;
            out.push(lib.clone());
            queue.push((lib, dep));
        }
    }
    if outside_builtin && Path::new(LD_SO_CACHE).exists() {
        out.push(PathBuf::from(LD_SO_CACHE));
    }
    Ok(out)
}

/// Where the loader looks for the libraries `obj` (at `path`) needs.
fn search_dirs(path: &Path, obj: &Object, conf: &[PathBuf], defaults: &[PathBuf]) -> Vec<PathBuf> {
    let origin = path.parent().unwrap_or(Path::new("/"));
    let mut dirs: Vec<PathBuf> = obj
        .runpath
        .as_ref()
        .or(obj.rpath.as_ref())
        .map(|list| {
            list.split(':')
                .filter(|d| !d.is_empty())
                .map(|d| {
                    let d = d.replace("${ORIGIN}", "$ORIGIN");
                    PathBuf::from(d.replace("$ORIGIN", &origin.to_string_lossy()))
                })
                .collect()
        })
        .unwrap_or_default();
    for d in conf.iter().chain(defaults) {
        if !dirs.contains(d) {
            dirs.push(d.clone());
        }
    }
    dirs
}

/// Whether `path` is a 64-bit ELF for `machine` (the loader skips others,
/// e.g. 32-bit libraries in `/usr/lib`).
fn is_elf_for(path: &Path, machine: u16) -> bool {
    let mut head = [0u8; 20];
    let Ok(mut f) = fs::File::open(path) else {
        return false;
    };
    if f.read_exact(&mut head).is_err() {
        return false;
    }
    let file_machine = if head[5] == elf::ELFDATA2MSB.0 {
        u16::from_be_bytes([head[18], head[19]])
    } else {
        u16::from_le_bytes([head[18], head[19]])
    };
    head[..4] == elf::ELFMAG && head[4] == elf::ELFCLASS64.0 && file_machine == machine
}

/// The loader's built-in directories (Debian's multiarch ones first).
fn default_dirs() -> Vec<PathBuf> {
    let triplet = if cfg!(target_arch = "aarch64") {
        "aarch64-linux-gnu"
    } else {
        "x86_64-linux-gnu"
    };
    [
        format!("/lib/{triplet}"),
        format!("/usr/lib/{triplet}"),
        "/lib64".to_string(),
        "/usr/lib64".to_string(),
        "/lib".to_string(),
        "/usr/lib".to_string(),
    ]
    .into_iter()
    .map(PathBuf::from)
    .collect()
}

/// The directories listed in `/etc/ld.so.conf` (with its `include`s).
fn conf_dirs() -> &'static [PathBuf] {
    static DIRS: OnceLock<Vec<PathBuf>> = OnceLock::new();
    DIRS.get_or_init(|| {
        let mut dirs = Vec::new();
        read_conf(Path::new("/etc/ld.so.conf"), &mut dirs, 0);
        dirs
    })
}

fn read_conf(file: &Path, dirs: &mut Vec<PathBuf>, depth: u32) {
    let Ok(text) = fs::read_to_string(file) else {
        return;
    };
    if depth > 8 {
        return;
    }
    for line in text.lines() {
        let line = line.split('#').next().unwrap_or("").trim();
        if line.is_empty() || line.starts_with("hwcap ") {
            continue;
        }
        if let Some(pattern) = line.strip_prefix("include") {
            for pattern in pattern.split_whitespace() {
                let pattern = Path::new("/etc").join(pattern);
                for f in glob_last(&pattern) {
                    read_conf(&f, dirs, depth + 1);
                }
            }
            continue;
        }
        for d in line.split([':', ',', ' ', '\t']).filter(|d| !d.is_empty()) {
            let d = PathBuf::from(d);
            if !dirs.contains(&d) {
                dirs.push(d);
            }
        }
    }
}

/// Files matching `pattern`, whose last component may hold `*` (as in
/// `include /etc/ld.so.conf.d/*.conf`), sorted.
fn glob_last(pattern: &Path) -> Vec<PathBuf> {
    let (Some(dir), Some(name)) = (
        pattern.parent(),
        pattern.file_name().and_then(|n| n.to_str()),
    ) else {
        return Vec::new();
    };
    if !name.contains('*') {
        return vec![pattern.to_path_buf()];
    }
    let parts: Vec<&str> = name.split('*').collect();
    let Ok(entries) = fs::read_dir(dir) else {
        return Vec::new();
    };
    let mut out: Vec<PathBuf> = entries
        .flatten()
        .filter(|e| e.file_name().to_str().is_some_and(|n| wildcard(&parts, n)))
        .map(|e| e.path())
        .collect();
    out.sort();
    out
}

/// `name` matches the pattern split at its `*`s.
fn wildcard(parts: &[&str], name: &str) -> bool {
    let (first, rest) = parts.split_first().expect("split yields one part at least");
    let Some(mut tail) = name.strip_prefix(first) else {
        return false;
    };
    for (i, part) in rest.iter().enumerate() {
        if i == rest.len() - 1 {
            return tail.ends_with(part) && tail.len() >= part.len();
        }
        match tail.find(part) {
            Some(at) => tail = &tail[at + part.len()..],
            None => return false,
        }
    }
    tail.is_empty()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_static_program_needs_nothing() {
        assert_eq!(
            elf_runtime_files(Path::new("/bin/busybox")).unwrap(),
            Vec::<PathBuf>::new()
        );
    }

    #[test]
    fn a_dynamic_program_needs_its_interpreter_and_libc_at_loader_paths() {
        let files = elf_runtime_files(Path::new("/bin/sh")).unwrap();
        assert_eq!(
            files[0],
            Path::new("/lib64/ld-linux-x86-64.so.2"),
            "{files:?}"
        );
        assert!(
            files
                .iter()
                .any(|f| f.file_name().is_some_and(|n| n == "libc.so.6")),
            "{files:?}"
        );
        for f in &files {
            assert!(f.is_absolute() && f.exists(), "{f:?}");
        }
        // libc names the loader as a dependency; it is listed once.
        let loaders = files
            .iter()
            .filter(|f| f.file_name().is_some_and(|n| n == "ld-linux-x86-64.so.2"))
            .count();
        assert_eq!(loaders, 1, "{files:?}");
    }

    #[test]
    fn the_cache_follows_the_file() {
        let dir = tempfile::tempdir().unwrap();
        let prog = dir.path().join("prog");
        fs::copy("/bin/busybox", &prog).unwrap();
        assert!(elf_runtime_files(&prog).unwrap().is_empty());
        // Replaced by a dynamic program (a later mtime): looked at again.
        std::thread::sleep(std::time::Duration::from_millis(20));
        fs::copy("/bin/sh", &prog).unwrap();
        assert!(!elf_runtime_files(&prog).unwrap().is_empty());
    }

    #[test]
    fn a_missing_library_is_named_with_where_it_was_sought() {
        // A copy of /bin/sh whose libc is sought only in an empty RUNPATH
        // would still find it in the default directories; so ask for the
        // resolution with no directories at all.
        let e = resolve(Path::new("/bin/sh"), &[], &[]).unwrap_err();
        match e {
            ElfError::Missing {
                library,
                needed_by,
                searched,
            } => {
                assert_eq!(library, "libc.so.6");
                assert_eq!(needed_by, Path::new("/bin/sh"));
                assert!(searched.is_empty());
            }
            other => panic!("expected Missing, got {other:?}"),
        }
    }

    #[test]
    fn not_an_elf_file_is_a_parse_error() {
        let dir = tempfile::tempdir().unwrap();
        let f = dir.path().join("script");
        fs::write(&f, "#!/bin/sh\necho hi\n").unwrap();
        assert!(matches!(elf_runtime_files(&f), Err(ElfError::Parse { .. })));
    }

    #[test]
    fn ld_so_conf_includes_and_wildcards() {
        assert!(wildcard(&["", ".conf"], "libc.conf"));
        assert!(!wildcard(&["", ".conf"], "libc.conf.bak"));
        assert!(wildcard(&["a", "b", "c"], "aXbYc"));
        assert!(!wildcard(&["a", "b", "c"], "aXc"));
        assert!(wildcard(&["exact"], "exact"));
        assert!(!wildcard(&["exact"], "exactly"));
    }

    #[test]
    fn runpath_origin_is_expanded_and_searched_first() {
        let obj = Object {
            runpath: Some("$ORIGIN/../lib:/opt/x".into()),
            ..Default::default()
        };
        let dirs = search_dirs(
            Path::new("/app/bin/prog"),
            &obj,
            &[PathBuf::from("/conf")],
            &[PathBuf::from("/lib")],
        );
        assert_eq!(
            dirs,
            ["/app/bin/../lib", "/opt/x", "/conf", "/lib"]
                .map(PathBuf::from)
                .to_vec()
        );
    }
}
