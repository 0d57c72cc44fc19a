//! The embedded store: the one-machine [`Store`] backend on `redb`, one file
//! (`scheduler.redb`) under the directory given to `--store embedded:DIR`.
//! Each trait call is one redb transaction; redb runs one write transaction
//! at a time, so a compare-and-set reads and writes with no other writer in
//! between, and a commit is durable (fsync) before the call returns.
//!
//! It owns the file's layout: tables `apps`, `hosts`, `leases` (keyed by
//! name/id), `placements` (keyed by (app, slot)), and `meta` (the store-wide
//! `revision` counter and the file's `format`). Records are JSON with a
//! `version` field (decoded by `super::decode`).
//!
//! Watches: after each committed change of an app, a host or a placement the
//! new revision is sent on a `tokio::sync::watch` channel. Leadership: the
//! process holding the file is the only scheduler there can be (redb refuses
//! a second opener), so a campaign wins at once unless another guard of the
//! same store is still held, and then waits for it.
//!
//! It must not: read a clock, hold a transaction across trait calls, or be
//! opened by two processes at once (redb locks the file; the second open
//! fails with an I/O error).

use std::path::{Path, PathBuf};
use std::sync::{Arc, Condvar, Mutex, PoisonError};
use std::time::Duration;

use redb::{Database, ReadableTable, TableDefinition, WriteTransaction};
use tokio::sync::watch;

use super::{
    decode, encode, App, AppSpec, Expect, Found, Host, HostInfo, Kind, LeaderGuard, Leadership,
    Lease, Millis, Placement, PlacementFilter, PlacementWrite, Result, Store, StoreError,
    FORMAT_VERSION,
};

/// The database file inside the store's directory.
pub const FILE_NAME: &str = "scheduler.redb";

const APPS: TableDefinition<&str, &[u8]> = TableDefinition::new("apps");
const HOSTS: TableDefinition<&str, &[u8]> = TableDefinition::new("hosts");
const LEASES: TableDefinition<&str, &[u8]> = TableDefinition::new("leases");
const PLACEMENTS: TableDefinition<(&str, u32), &[u8]> = TableDefinition::new("placements");
const META: TableDefinition<&str, u64> = TableDefinition::new("meta");

const META_REVISION: &str = "revision";
const META_FORMAT: &str = "format";

/// The embedded store, open on one directory.
#[derive(Debug)]
pub struct EmbeddedStore {
    db: Database,
    path: PathBuf,
    /// The revision of the last change of an app, host or placement.
    changes: watch::Sender<u64>,
    /// Who holds leadership in this process, and a wake-up for waiters.
    leader: Arc<(Mutex<Option<String>>, Condvar)>,
}

/// Whether a write wakes [`Store::watch`] receivers.
#[derive(Clone, Copy, PartialEq, Eq)]
enum Notify {
    Yes,
    No,
}

/// Turn a redb error into [`StoreError::Io`], naming what was being done.
fn io<E: Into<redb::Error>>(context: &'static str) -> impl FnOnce(E) -> StoreError {
    move |e| StoreError::Io {
        context,
        source: Box::new(e.into()),
    }
}

/// Fail with `Conflict` unless `expect` holds for the key's current revision.
fn check(kind: Kind, key: &str, expect: Expect, current: Option<u64>) -> Result<()> {
    let found = current.map_or(Found::Absent, Found::At);
    if expect.holds(found) {
        Ok(())
    } else {
        Err(StoreError::Conflict {
            kind,
            key: key.to_owned(),
            expected: expect,
            found,
        })
    }
}

/// Read and decode the record under a string key.
fn get_str<T, Tb>(table: &Tb, kind: Kind, key: &str) -> Result<Option<T>>
where
    T: for<'de> serde::Deserialize<'de>,
    Tb: ReadableTable<&'static str, &'static [u8]>,
{
    match table.get(key).map_err(io("reading a record"))? {
        Some(guard) => decode(kind, key, guard.value()).map(Some),
        None => Ok(None),
    }
}

/// Decode every record of a string-keyed table, in key order.
fn all_str<T, Tb>(table: &Tb, kind: Kind) -> Result<Vec<T>>
where
    T: for<'de> serde::Deserialize<'de>,
    Tb: ReadableTable<&'static str, &'static [u8]>,
{
    let mut out = Vec::new();
    for entry in table.iter().map_err(io("listing records"))? {
        let (k, v) = entry.map_err(io("listing records"))?;
        out.push(decode(kind, k.value(), v.value())?);
    }
    Ok(out)
}

fn placement_key(app: &str, slot: u32) -> String {
    format!("{app}/{slot}")
}

/// Read and decode one placement record.
fn get_placement<Tb>(table: &Tb, app: &str, slot: u32) -> Result<Option<Placement>>
where
    Tb: ReadableTable<(&'static str, u32), &'static [u8]>,
{
    match table.get((app, slot)).map_err(io("reading a placement"))? {
        Some(guard) => decode(Kind::Placement, &placement_key(app, slot), guard.value()).map(Some),
        None => Ok(None),
    }
}

impl EmbeddedStore {
    /// Open the store under `dir` (created if missing), creating its tables
    /// on first use. Refuses a file of another format.
    pub fn open(dir: &Path) -> Result<Self> {
        std::fs::create_dir_all(dir).map_err(|e| StoreError::Io {
            context: "creating the store directory",
            source: Box::new(e),
        })?;
        let path = dir.join(FILE_NAME);
        let db = Database::create(&path).map_err(io("opening the database"))?;
        let tx = db.begin_write().map_err(io("initialising the database"))?;
        let revision;
        {
            let ctx = "initialising the database";
            tx.open_table(APPS).map_err(io(ctx))?;
            tx.open_table(HOSTS).map_err(io(ctx))?;
            tx.open_table(LEASES).map_err(io(ctx))?;
            tx.open_table(PLACEMENTS).map_err(io(ctx))?;
            let mut meta = tx.open_table(META).map_err(io(ctx))?;
            revision = meta
                .get(META_REVISION)
                .map_err(io(ctx))?
                .map_or(0, |g| g.value());
            let format = meta.get(META_FORMAT).map_err(io(ctx))?.map(|g| g.value());
            match format {
                None => {
                    meta.insert(META_FORMAT, u64::from(FORMAT_VERSION))
                        .map_err(io(ctx))?;
                }
                Some(f) if f == u64::from(FORMAT_VERSION) => {}
                Some(f) => {
                    return Err(StoreError::UnsupportedVersion {
                        kind: Kind::Meta,
                        key: path.display().to_string(),
                        found: u32::try_from(f).unwrap_or(u32::MAX),
                        supported: FORMAT_VERSION,
                    })
                }
            }
        }
        tx.commit().map_err(io("initialising the database"))?;
        Ok(EmbeddedStore {
            db,
            path,
            changes: watch::Sender::new(revision),
            leader: Arc::new((Mutex::new(None), Condvar::new())),
        })
    }

    /// The database file.
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// Run `f` in one write transaction with the next store revision, and
    /// commit it (with the counter bumped) only if `f` succeeds; an error
    /// drops the transaction, which aborts it.
    fn write<T>(
        &self,
        context: &'static str,
        notify: Notify,
        f: impl FnOnce(&WriteTransaction, u64) -> Result<T>,
    ) -> Result<T> {
        let tx = self.db.begin_write().map_err(io(context))?;
        let revision = {
            let meta = tx.open_table(META).map_err(io(context))?;
            let current = meta
                .get(META_REVISION)
                .map_err(io(context))?
                .map_or(0, |g| g.value());
            current + 1
        };
        let out = f(&tx, revision)?;
        {
            let mut meta = tx.open_table(META).map_err(io(context))?;
            meta.insert(META_REVISION, revision).map_err(io(context))?;
        }
        tx.commit().map_err(io(context))?;
        if notify == Notify::Yes {
            self.changes.send_if_modified(|seen| {
                let newer = revision > *seen;
                if newer {
                    *seen = revision;
                }
                newer
            });
        }
        Ok(out)
    }

    fn read_str<T: for<'de> serde::Deserialize<'de>>(
        &self,
        table: TableDefinition<&str, &[u8]>,
        kind: Kind,
        key: &str,
    ) -> Result<T> {
        let ctx = "reading a record";
        let tx = self.db.begin_read().map_err(io(ctx))?;
        let t = tx.open_table(table).map_err(io(ctx))?;
        get_str(&t, kind, key)?.ok_or_else(|| StoreError::NotFound {
            kind,
            key: key.to_owned(),
        })
    }

    fn list_str<T: for<'de> serde::Deserialize<'de>>(
        &self,
        table: TableDefinition<&str, &[u8]>,
        kind: Kind,
    ) -> Result<Vec<T>> {
        let ctx = "listing records";
        let tx = self.db.begin_read().map_err(io(ctx))?;
        let t = tx.open_table(table).map_err(io(ctx))?;
        all_str(&t, kind)
    }

    /// Store raw bytes as an app's record, bypassing encoding: for tests of
    /// how corrupt or foreign records are refused.
    #[cfg(test)]
    fn put_raw_app(&self, name: &str, bytes: &[u8]) -> Result<()> {
        self.write("writing raw bytes", Notify::Yes, |tx, _| {
            let mut t = tx.open_table(APPS).map_err(io("writing raw bytes"))?;
            t.insert(name, bytes).map_err(io("writing raw bytes"))?;
            Ok(())
        })
    }
}

impl Store for EmbeddedStore {
    fn put_app(&self, name: &str, spec: &AppSpec, expect: Expect) -> Result<App> {
        let ctx = "writing an app";
        self.write(ctx, Notify::Yes, |tx, revision| {
            let mut t = tx.open_table(APPS).map_err(io(ctx))?;
            let current: Option<App> = get_str(&t, Kind::App, name)?;
            check(Kind::App, name, expect, current.map(|a| a.generation))?;
            let app = App {
                version: FORMAT_VERSION,
                name: name.to_owned(),
                generation: revision,
                spec: spec.clone(),
            };
            t.insert(name, encode(&app).as_slice()).map_err(io(ctx))?;
            Ok(app)
        })
    }

    fn get_app(&self, name: &str) -> Result<App> {
        self.read_str(APPS, Kind::App, name)
    }

    fn list_apps(&self) -> Result<Vec<App>> {
        self.list_str(APPS, Kind::App)
    }

    fn delete_app(&self, name: &str, expect: Expect) -> Result<()> {
        let ctx = "deleting an app";
        self.write(ctx, Notify::Yes, |tx, _| {
            let mut t = tx.open_table(APPS).map_err(io(ctx))?;
            let current: App =
                get_str(&t, Kind::App, name)?.ok_or_else(|| StoreError::NotFound {
                    kind: Kind::App,
                    key: name.to_owned(),
                })?;
            check(Kind::App, name, expect, Some(current.generation))?;
            t.remove(name).map_err(io(ctx))?;
            Ok(())
        })
    }

    fn put_host(&self, id: &str, info: &HostInfo, expect: Expect) -> Result<Host> {
        let ctx = "writing a host";
        self.write(ctx, Notify::Yes, |tx, revision| {
            let mut t = tx.open_table(HOSTS).map_err(io(ctx))?;
            let current: Option<Host> = get_str(&t, Kind::Host, id)?;
            check(Kind::Host, id, expect, current.map(|h| h.revision))?;
            let host = Host {
                version: FORMAT_VERSION,
                id: id.to_owned(),
                revision,
                info: info.clone(),
            };
            t.insert(id, encode(&host).as_slice()).map_err(io(ctx))?;
            Ok(host)
        })
    }

    fn get_host(&self, id: &str) -> Result<Host> {
        self.read_str(HOSTS, Kind::Host, id)
    }

    fn list_hosts(&self) -> Result<Vec<Host>> {
        self.list_str(HOSTS, Kind::Host)
    }

    fn delete_host(&self, id: &str, expect: Expect) -> Result<()> {
        let ctx = "deleting a host";
        self.write(ctx, Notify::Yes, |tx, _| {
            let mut t = tx.open_table(HOSTS).map_err(io(ctx))?;
            let current: Host =
                get_str(&t, Kind::Host, id)?.ok_or_else(|| StoreError::NotFound {
                    kind: Kind::Host,
                    key: id.to_owned(),
                })?;
            check(Kind::Host, id, expect, Some(current.revision))?;
            t.remove(id).map_err(io(ctx))?;
            let mut leases = tx.open_table(LEASES).map_err(io(ctx))?;
            leases.remove(id).map_err(io(ctx))?;
            Ok(())
        })
    }

    fn commit_placements(
        &self,
        app: &str,
        app_generation: Expect,
        writes: &[PlacementWrite],
    ) -> Result<Vec<Placement>> {
        let ctx = "writing placements";
        self.write(ctx, Notify::Yes, |tx, revision| {
            let apps = tx.open_table(APPS).map_err(io(ctx))?;
            let current: Option<App> = get_str(&apps, Kind::App, app)?;
            check(
                Kind::App,
                app,
                app_generation,
                current.map(|a| a.generation),
            )?;
            let mut t = tx.open_table(PLACEMENTS).map_err(io(ctx))?;
            let mut written = Vec::new();
            // Check and write slot by slot: a later write to the same slot
            // sees the earlier one, and any failure aborts the whole batch.
            for w in writes {
                let current = get_placement(&t, app, w.slot)?;
                check(
                    Kind::Placement,
                    &placement_key(app, w.slot),
                    w.expect,
                    current.map(|p| p.revision),
                )?;
                match w.record(app, revision) {
                    Some(record) => {
                        t.insert((app, w.slot), encode(&record).as_slice())
                            .map_err(io(ctx))?;
                        written.push(record);
                    }
                    None => {
                        t.remove((app, w.slot)).map_err(io(ctx))?;
                    }
                }
            }
            Ok(written)
        })
    }

    fn get_placement(&self, app: &str, slot: u32) -> Result<Placement> {
        let ctx = "reading a placement";
        let tx = self.db.begin_read().map_err(io(ctx))?;
        let t = tx.open_table(PLACEMENTS).map_err(io(ctx))?;
        get_placement(&t, app, slot)?.ok_or_else(|| StoreError::NotFound {
            kind: Kind::Placement,
            key: placement_key(app, slot),
        })
    }

    fn list_placements(&self, filter: &PlacementFilter) -> Result<Vec<Placement>> {
        let ctx = "listing placements";
        let tx = self.db.begin_read().map_err(io(ctx))?;
        let t = tx.open_table(PLACEMENTS).map_err(io(ctx))?;
        let range = match &filter.app {
            Some(app) => t
                .range((app.as_str(), 0)..=(app.as_str(), u32::MAX))
                .map_err(io(ctx))?,
            None => t.iter().map_err(io(ctx))?,
        };
        let mut out = Vec::new();
        for entry in range {
            let (k, v) = entry.map_err(io(ctx))?;
            let (app, slot) = k.value();
            let record: Placement = decode(Kind::Placement, &placement_key(app, slot), v.value())?;
            if filter.host.as_ref().is_none_or(|h| *h == record.host) {
                out.push(record);
            }
        }
        Ok(out)
    }

    fn grant_lease(&self, host: &str, ttl: Duration, now: Millis) -> Result<Lease> {
        let ctx = "granting a lease";
        self.write(ctx, Notify::No, |tx, _| {
            let mut t = tx.open_table(LEASES).map_err(io(ctx))?;
            let lease = Lease {
                version: FORMAT_VERSION,
                host: host.to_owned(),
                ttl_ms: u64::try_from(ttl.as_millis()).unwrap_or(u64::MAX),
                expires_at: now.saturating_add(ttl),
            };
            t.insert(host, encode(&lease).as_slice()).map_err(io(ctx))?;
            Ok(lease)
        })
    }

    fn get_lease(&self, host: &str) -> Result<Lease> {
        self.read_str(LEASES, Kind::Lease, host)
    }

    fn revoke_lease(&self, host: &str) -> Result<()> {
        let ctx = "revoking a lease";
        self.write(ctx, Notify::No, |tx, _| {
            let mut t = tx.open_table(LEASES).map_err(io(ctx))?;
            let existed = t.remove(host).map_err(io(ctx))?.is_some();
            if existed {
                Ok(())
            } else {
                Err(StoreError::NotFound {
                    kind: Kind::Lease,
                    key: host.to_owned(),
                })
            }
        })
    }

    fn expired_leases(&self, now: Millis) -> Result<Vec<Lease>> {
        let leases: Vec<Lease> = self.list_str(LEASES, Kind::Lease)?;
        Ok(leases.into_iter().filter(|l| l.is_expired(now)).collect())
    }

    fn watch(&self) -> watch::Receiver<u64> {
        self.changes.subscribe()
    }
}

impl Leadership for EmbeddedStore {
    /// Wins at once unless another guard of this store is held; then waits
    /// for it to be dropped. `ttl` is unused: a guard can only be lost with
    /// the process, which takes the store with it.
    fn campaign(&self, candidate: &str, _ttl: Duration) -> Result<LeaderGuard> {
        let (slot, freed) = &*self.leader;
        let mut held = slot.lock().unwrap_or_else(PoisonError::into_inner);
        while held.is_some() {
            held = freed.wait(held).unwrap_or_else(PoisonError::into_inner);
        }
        *held = Some(candidate.to_owned());
        drop(held);
        let (tx, rx) = watch::channel(true);
        let leader = Arc::clone(&self.leader);
        Ok(LeaderGuard::new(candidate, rx, move || {
            drop(tx);
            let (slot, freed) = &*leader;
            *slot.lock().unwrap_or_else(PoisonError::into_inner) = None;
            freed.notify_one();
        }))
    }

    fn leader(&self) -> Result<Option<String>> {
        let (slot, _) = &*self.leader;
        Ok(slot.lock().unwrap_or_else(PoisonError::into_inner).clone())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::store::suite::{self, Harness};

    /// Embedded stores in one temp dir, reopened on the same directory.
    struct Embedded {
        dir: tempfile::TempDir,
    }

    impl Harness for Embedded {
        type S = EmbeddedStore;
        fn new() -> Self {
            Embedded {
                dir: tempfile::tempdir().expect("temp dir"),
            }
        }
        fn open(&mut self) -> EmbeddedStore {
            EmbeddedStore::open(self.dir.path()).expect("open the embedded store")
        }
    }

    suite::store_suite!(Embedded);

    #[test]
    fn a_corrupt_record_is_refused_as_corrupt() {
        let dir = tempfile::tempdir().unwrap();
        let store = EmbeddedStore::open(dir.path()).unwrap();
        store.put_raw_app("web", b"{not json").unwrap();
        let err = store.get_app("web").unwrap_err();
        assert!(
            matches!(&err, StoreError::Corrupt { kind: Kind::App, key, .. } if key == "web"),
            "{err:?}"
        );
        assert!(
            std::error::Error::source(&err).is_some(),
            "the cause is kept"
        );
    }

    #[test]
    fn a_record_of_another_version_is_refused() {
        let dir = tempfile::tempdir().unwrap();
        let store = EmbeddedStore::open(dir.path()).unwrap();
        store
            .put_raw_app("web", br#"{"version": 2, "name": "web", "shape": "new"}"#)
            .unwrap();
        let err = store.list_apps().unwrap_err();
        assert!(
            matches!(
                err,
                StoreError::UnsupportedVersion {
                    kind: Kind::App,
                    found: 2,
                    supported: FORMAT_VERSION,
                    ..
                }
            ),
            "{err:?}"
        );
        assert!(err.to_string().contains("format 2"), "{err}");
    }

    #[test]
    fn a_second_open_of_the_same_directory_is_refused() {
        let dir = tempfile::tempdir().unwrap();
        let _first = EmbeddedStore::open(dir.path()).unwrap();
        let err = EmbeddedStore::open(dir.path()).unwrap_err();
        assert!(matches!(err, StoreError::Io { .. }), "{err:?}");
    }

    #[test]
    fn watch_wakes_after_each_commit_but_not_for_leases() {
        let dir = tempfile::tempdir().unwrap();
        let store = EmbeddedStore::open(dir.path()).unwrap();
        let mut rx = store.watch();
        assert_eq!(*rx.borrow_and_update(), 0);
        let app = store
            .put_app("web", &suite::spec(1), Expect::Absent)
            .unwrap();
        assert!(rx.has_changed().unwrap());
        assert_eq!(*rx.borrow_and_update(), app.generation);
        store
            .grant_lease("h1", Duration::from_secs(5), Millis(0))
            .unwrap();
        assert!(!rx.has_changed().unwrap(), "a lease grant does not wake");
        // A failed CAS commits nothing and wakes nobody.
        assert!(store
            .put_app("web", &suite::spec(2), Expect::Absent)
            .is_err());
        assert!(!rx.has_changed().unwrap());
        let host = store
            .put_host("h1", &suite::host_info("a", 1), Expect::Absent)
            .unwrap();
        assert_eq!(*rx.borrow_and_update(), host.revision);
        store.delete_app("web", Expect::Any).unwrap();
        assert_eq!(*rx.borrow_and_update(), host.revision + 1);
        drop(store);
        // A reopened store starts from the revision it left off at.
        let store = EmbeddedStore::open(dir.path()).unwrap();
        assert_eq!(*store.watch().borrow(), host.revision + 1);
    }

    #[test]
    fn watch_wakes_an_async_waiter() {
        let dir = tempfile::tempdir().unwrap();
        let store = std::sync::Arc::new(EmbeddedStore::open(dir.path()).unwrap());
        let mut rx = store.watch();
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .unwrap();
        let s = std::sync::Arc::clone(&store);
        rt.block_on(async move {
            let writer = tokio::task::spawn_blocking(move || {
                s.put_app("web", &suite::spec(1), Expect::Absent).unwrap()
            });
            tokio::time::timeout(Duration::from_secs(5), rx.changed())
                .await
                .expect("woken")
                .unwrap();
            assert_eq!(*rx.borrow(), writer.await.unwrap().generation);
        });
    }

    #[test]
    fn the_holder_of_the_file_leads_and_a_second_candidate_waits() {
        let dir = tempfile::tempdir().unwrap();
        let store = std::sync::Arc::new(EmbeddedStore::open(dir.path()).unwrap());
        assert_eq!(store.leader().unwrap(), None);
        let ttl = Duration::from_secs(1);
        let first = store.campaign("a", ttl).unwrap();
        assert!(first.is_leader());
        assert_eq!(store.leader().unwrap().as_deref(), Some("a"));
        let (tx, rx) = std::sync::mpsc::channel();
        let s = std::sync::Arc::clone(&store);
        let waiter = std::thread::spawn(move || {
            let guard = s.campaign("b", ttl).unwrap();
            tx.send(guard.is_leader()).unwrap();
            guard
        });
        assert!(rx.recv_timeout(Duration::from_millis(200)).is_err());
        drop(first);
        assert!(rx.recv_timeout(Duration::from_secs(5)).unwrap());
        let second = waiter.join().unwrap();
        assert_eq!(store.leader().unwrap().as_deref(), Some("b"));
        let leading = second.leading();
        drop(second);
        assert_eq!(store.leader().unwrap(), None);
        assert!(leading.has_changed().is_err(), "closed once resigned");
    }

    #[test]
    fn open_creates_the_directory_and_its_file() {
        let dir = tempfile::tempdir().unwrap();
        let nested = dir.path().join("a/b");
        let store = EmbeddedStore::open(&nested).unwrap();
        assert_eq!(store.path(), nested.join(FILE_NAME));
        assert!(store.path().is_file());
    }
}
