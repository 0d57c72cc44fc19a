//! Where masters and clones live between commands: a small per-user state
//! directory, [`crate::paths::runtime_root`] (`/run/zygote` for root,
//! `$XDG_RUNTIME_DIR/zygote` otherwise; `$ZYGOTE_RUNTIME_DIR` overrides it).
//! It is meant to be a tmpfs: a booted master's RAM is a file in it, and
//! nothing in it survives a reboot, as no VM does.
//!
//! ```text
//! masters/NAME/master.json        what the master is (MasterRecord)
//! masters/NAME/snapshot/          its snapshot (memory + snapshot.json), unless loaded from elsewhere
//! clones/ID/clone.json            which process runs the clone (CloneRecord)
//! clones/ID/{vsock.sock,console.log,events.jsonl,vmm.log}
//! ```

use std::collections::BTreeMap;
use std::os::unix::fs::DirBuilderExt;
use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};

/// Version of the records' layout; a record of another version is refused.
pub const RECORD_VERSION: u32 = 1;

/// Errors of the state directory.
#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    /// A name that cannot be a master name.
    #[error("invalid name {0:?}: use 1-40 characters from a-z, 0-9, '-' and '.', starting with a letter or digit (it becomes part of hostnames)")]
    BadName(String),
    /// No such master.
    #[error("no master named {0:?} (see `zygote master ls`)")]
    NoMaster(String),
    /// The master exists already.
    #[error("a master named {0:?} exists already (remove it with `zygote master rm {0}`)")]
    MasterExists(String),
    /// No such clone.
    #[error("no clone {0:?} (see `zygote ps`)")]
    NoClone(String),
    /// A record that cannot be read.
    #[error("{path}: {why}")]
    BadRecord {
        /// The record file.
        path: PathBuf,
        /// What is wrong.
        why: String,
    },
    /// A file operation failed.
    #[error("{path}: {source}")]
    Io {
        /// Path involved.
        path: PathBuf,
        /// OS error.
        #[source]
        source: std::io::Error,
    },
}

fn io(path: &Path) -> impl FnOnce(std::io::Error) -> StoreError + '_ {
    move |source| StoreError::Io {
        path: path.to_path_buf(),
        source,
    }
}

/// A frozen master.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct MasterRecord {
    /// Record layout version.
    pub version: u32,
    /// Its name.
    pub name: String,
    /// Guest RAM, MiB.
    pub memory_mib: u64,
    /// vCPUs.
    pub vcpus: u8,
    /// The warm-up command it ran before the freeze.
    pub warmup: Option<String>,
    /// When it was frozen (Unix seconds).
    pub created_unix_s: u64,
    /// Its snapshot directory.
    pub snapshot: PathBuf,
    /// Cold boot to agent ready, ms (booted masters).
    #[serde(default)]
    pub boot_ms: Option<f64>,
    /// Warm-up duration, ms.
    #[serde(default)]
    pub warmup_ms: Option<f64>,
    /// The tenant that owns it (`None`: the host's admin, e.g. the local CLI).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub tenant: Option<String>,
    /// The name its owner knows it by (the store name is `NAME.TENANT`
    /// for tenants other than the admin).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub display_name: Option<String>,
    /// The owner's labels.
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub labels: BTreeMap<String, String>,
    /// It has a network device (made with `--net`): its clones get a
    /// network of their own.
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub net: bool,
    /// The id its network address is leased under (held until it is
    /// removed, so that no clone of it is ever given it).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub net_lease: Option<String>,
}

impl MasterRecord {
    /// Gives back the address the master held (when it is removed).
    pub fn release_net(&self) {
        if let Some(id) = &self.net_lease {
            crate::vmnet::release(id);
        }
    }
}

/// A clone: which process runs it.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct CloneRecord {
    /// Record layout version.
    pub version: u32,
    /// Its id (also its hostname).
    pub id: String,
    /// The master it was cloned from.
    pub master: String,
    /// The VMM process.
    pub pid: u32,
    /// The process's start time (field 22 of /proc/PID/stat), so that a
    /// reused pid is not mistaken for the clone.
    pub pid_start: u64,
    /// When it started (Unix seconds).
    pub created_unix_s: u64,
    /// The tenant that owns it (`None`: the host's admin).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub tenant: Option<String>,
    /// The owner's labels.
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub labels: BTreeMap<String, String>,
    /// When the daemon kills it (Unix seconds), if it has a TTL.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub ttl_deadline_unix_s: Option<u64>,
}

/// The state directory.
#[derive(Debug, Clone)]
pub struct Store {
    root: PathBuf,
}

/// Seconds since the Unix epoch.
pub fn unix_now() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or(0)
}

/// Checks a master name (it becomes part of clone ids and hostnames).
pub fn check_name(name: &str) -> Result<(), StoreError> {
    let ok = !name.is_empty()
        && name.len() <= 40
        && name.as_bytes()[0].is_ascii_alphanumeric()
        && name
            .bytes()
            .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b"-.".contains(&b));
    if ok {
        Ok(())
    } else {
        Err(StoreError::BadName(name.to_string()))
    }
}

fn read_record<T: for<'de> Deserialize<'de>>(path: &Path) -> Result<T, StoreError> {
    let text = std::fs::read_to_string(path).map_err(io(path))?;
    let value: serde_json::Value =
        serde_json::from_str(&text).map_err(|e| StoreError::BadRecord {
            path: path.to_path_buf(),
            why: format!("not JSON: {e}"),
        })?;
    let version = value.get("version").and_then(|v| v.as_u64());
    if version != Some(u64::from(RECORD_VERSION)) {
        return Err(StoreError::BadRecord {
            path: path.to_path_buf(),
            why: format!(
                "record version {} (this zygote writes version {RECORD_VERSION}); remove it",
                version.map_or("missing".to_string(), |v| v.to_string())
            ),
        });
    }
    serde_json::from_value(value).map_err(|e| StoreError::BadRecord {
        path: path.to_path_buf(),
        why: e.to_string(),
    })
}

/// Writes `value` as JSON to `path` atomically (temp file + rename).
pub fn write_record<T: Serialize>(path: &Path, value: &T) -> Result<(), StoreError> {
    let tmp = path.with_extension(format!("tmp-{}", std::process::id()));
    let text = serde_json::to_vec_pretty(value).map_err(|e| StoreError::BadRecord {
        path: path.to_path_buf(),
        why: e.to_string(),
    })?;
    std::fs::write(&tmp, text).map_err(io(&tmp))?;
    std::fs::rename(&tmp, path).map_err(io(path))
}

fn mkdir(path: &Path) -> Result<(), StoreError> {
    std::fs::DirBuilder::new()
        .recursive(true)
        .mode(0o700)
        .create(path)
        .map_err(io(path))
}

impl Store {
    /// The store at the default place.
    pub fn open_default() -> Self {
        Store {
            root: crate::paths::runtime_root(),
        }
    }

    /// The store at `root`.
    pub fn at(root: PathBuf) -> Self {
        Store { root }
    }

    /// Its root directory.
    pub fn root(&self) -> &Path {
        &self.root
    }

    /// Directory of master `name` (which may not exist).
    pub fn master_dir(&self, name: &str) -> PathBuf {
        self.root.join("masters").join(name)
    }

    /// Directory of clone `id` (which may not exist).
    pub fn clone_dir(&self, id: &str) -> PathBuf {
        self.root.join("clones").join(id)
    }

    /// A fresh directory to build master `name` in, renamed into place by
    /// [`Store::commit_master`]. Fails if the master exists.
    pub fn new_master_dir(&self, name: &str) -> Result<PathBuf, StoreError> {
        check_name(name)?;
        if self.master_dir(name).exists() {
            return Err(StoreError::MasterExists(name.to_string()));
        }
        let masters = self.root.join("masters");
        mkdir(&masters)?;
        remove_abandoned(&masters);
        let tmp = masters.join(format!(".{name}.partial-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&tmp);
        mkdir(&tmp)?;
        Ok(tmp)
    }

    /// Records master `rec` whose files are in `tmp` (from
    /// [`Store::new_master_dir`]) and moves it into place.
    pub fn commit_master(&self, tmp: &Path, rec: &MasterRecord) -> Result<(), StoreError> {
        write_record(&tmp.join("master.json"), rec)?;
        let dst = self.master_dir(&rec.name);
        // rename(2) onto an existing non-empty directory fails: no race
        // with another `master create` of the same name goes unnoticed.
        std::fs::rename(tmp, &dst).map_err(|e| {
            if dst.exists() {
                StoreError::MasterExists(rec.name.clone())
            } else {
                StoreError::Io {
                    path: dst.clone(),
                    source: e,
                }
            }
        })
    }

    /// Master `name`'s record.
    pub fn master(&self, name: &str) -> Result<MasterRecord, StoreError> {
        check_name(name)?;
        let path = self.master_dir(name).join("master.json");
        if !path.exists() {
            return Err(StoreError::NoMaster(name.to_string()));
        }
        read_record(&path)
    }

    /// Every master, by name; records that cannot be read come as errors.
    pub fn masters(&self) -> Vec<Result<MasterRecord, StoreError>> {
        self.list("masters", "master.json")
    }

    /// Every clone record (live or not), by id.
    pub fn clones(&self) -> Vec<Result<CloneRecord, StoreError>> {
        self.list("clones", "clone.json")
    }

    fn list<T: for<'de> Deserialize<'de>>(
        &self,
        sub: &str,
        file: &str,
    ) -> Vec<Result<T, StoreError>> {
        let Ok(rd) = std::fs::read_dir(self.root.join(sub)) else {
            return Vec::new();
        };
        let mut names: Vec<String> = rd
            .flatten()
            .map(|e| e.file_name().to_string_lossy().into_owned())
            .filter(|n| !n.starts_with('.'))
            .collect();
        names.sort();
        names
            .iter()
            .map(|n| self.root.join(sub).join(n).join(file))
            // A clone being started has no record yet.
            .filter(|p| p.exists())
            .map(|p| read_record(&p))
            .collect()
    }

    /// Clone `id`'s record.
    pub fn clone_record(&self, id: &str) -> Result<CloneRecord, StoreError> {
        let path = self.clone_dir(id).join("clone.json");
        if id.contains('/') || id.starts_with('.') || !path.exists() {
            return Err(StoreError::NoClone(id.to_string()));
        }
        read_record(&path)
    }

    /// Makes the (new) directory of clone `id`.
    pub fn new_clone_dir(&self, id: &str) -> Result<PathBuf, StoreError> {
        let dir = self.clone_dir(id);
        mkdir(&self.root.join("clones"))?;
        std::fs::DirBuilder::new()
            .mode(0o700)
            .create(&dir)
            .map_err(io(&dir))?;
        Ok(dir)
    }

    /// Removes master `name`'s registration (and its snapshot, when the
    /// snapshot lives in the store).
    pub fn remove_master(&self, name: &str) -> Result<(), StoreError> {
        let dir = self.master_dir(name);
        std::fs::remove_dir_all(&dir).map_err(io(&dir))
    }
}

/// Removes `.NAME.partial-PID` directories whose `zygote` process is gone
/// (a `master create` that was killed): they may hold a master's RAM.
fn remove_abandoned(masters: &Path) {
    let Ok(rd) = std::fs::read_dir(masters) else {
        return;
    };
    for e in rd.flatten() {
        let name = e.file_name().to_string_lossy().into_owned();
        let pid = name
            .strip_prefix('.')
            .and_then(|n| n.rsplit_once(".partial-"))
            .and_then(|(_, pid)| pid.parse::<u32>().ok());
        if let Some(pid) = pid {
            if pid != std::process::id() && !Path::new(&format!("/proc/{pid}")).exists() {
                let _ = std::fs::remove_dir_all(e.path());
            }
        }
    }
}

impl CloneRecord {
    /// Whether the clone's VMM process still runs (and is the same process).
    pub fn alive(&self) -> bool {
        crate::procfs::is_same_live_process(self.pid, self.pid_start)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_are_checked() {
        for good in ["web", "py3.12", "a-b-c", "0day"] {
            assert!(check_name(good).is_ok(), "{good}");
        }
        for bad in [
            "",
            "Web",
            "-x",
            ".hidden",
            "a/b",
            "a b",
            "a_b",
            &"x".repeat(41),
        ] {
            assert!(check_name(bad).is_err(), "{bad:?}");
        }
    }

    #[test]
    fn own_process_start_is_found() {
        let me = std::process::id();
        let rec = CloneRecord {
            version: RECORD_VERSION,
            id: "x".into(),
            master: "m".into(),
            pid: me,
            pid_start: crate::procfs::start_ticks(me).unwrap(),
            created_unix_s: 0,
            tenant: None,
            labels: BTreeMap::new(),
            ttl_deadline_unix_s: None,
        };
        assert!(rec.alive());
        let other = CloneRecord {
            pid_start: rec.pid_start + 1,
            ..rec
        };
        assert!(!other.alive(), "a different start time is another process");
    }

    #[test]
    fn records_of_another_version_are_refused_clearly() {
        let dir = std::env::temp_dir().join(format!("zygote-store-test-{}", std::process::id()));
        let store = Store::at(dir.clone());
        let tmp = store.new_master_dir("m").unwrap();
        std::fs::write(tmp.join("master.json"), r#"{"version":7,"name":"m"}"#).unwrap();
        std::fs::rename(&tmp, store.master_dir("m")).unwrap();
        let err = store.master("m").unwrap_err().to_string();
        assert!(err.contains("record version 7"), "{err}");
        assert!(matches!(store.master("n"), Err(StoreError::NoMaster(_))));
        assert!(matches!(
            store.new_master_dir("m"),
            Err(StoreError::MasterExists(_))
        ));
        std::fs::remove_dir_all(&dir).unwrap();
    }
}
