//! The etcd store: the cluster [`Store`] backend, for schedulers that run as
//! several replicas (one leads, see [`Leadership`]) over one etcd cluster.
//!
//! It owns the key layout under a prefix (default [`DEFAULT_PREFIX`]):
//! `apps/{name}`, `hosts/{id}`, `placements/{app}/{slot:010}`,
//! `leases/{host}`, and the election `leader`. Values are the same JSON
//! records as the embedded backend's; a record's `generation` / `revision`
//! is not trusted from the bytes but filled in from the key's
//! `mod_revision` on read, and from the transaction's header revision on
//! write. Every trait call is one etcd request (a `Txn` for every write), so
//! the CAS rules hold across any number of schedulers.
//!
//! The trait is synchronous and etcd-client is async: the store owns a
//! small tokio runtime (one worker thread, which also runs the watch and the
//! lease keep-alives), spawns each request on it and waits on a plain
//! channel. It never calls `block_on`, so it works from any thread: a plain
//! one, or a `spawn_blocking` thread of the caller's own runtime.
//!
//! It must not: read a clock for the store's records (host leases are plain
//! records whose expiry is the caller's clock, as in the embedded backend;
//! only leadership uses an etcd lease), or write outside its prefix.

use std::collections::BTreeMap;
use std::future::Future;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Duration;

use etcd_client::{
    Client, Compare, CompareOp, ConnectOptions, GetOptions, KeyValue, LeaseKeepAliveStream,
    LeaseKeeper, ResignOptions, Txn, TxnOp, TxnOpResponse, TxnResponse, WatchOptions,
};
use tokio::runtime::Runtime;
use tokio::sync::{oneshot, watch};

use super::{
    decode, encode, App, AppSpec, Expect, Found, Host, HostInfo, Kind, LeaderGuard, Leadership,
    Lease, Millis, Placement, PlacementFilter, PlacementWrite, Result, Store, StoreError,
    FORMAT_VERSION,
};

/// The key prefix when none is given.
pub const DEFAULT_PREFIX: &str = "/zygote/";
/// How long [`EtcdStore::connect`] waits for etcd to answer.
pub const CONNECT_TIMEOUT: Duration = Duration::from_secs(5);
/// How long one store call waits for etcd before it fails.
pub const REQUEST_TIMEOUT: Duration = Duration::from_secs(15);

const APPS: &str = "apps/";
const HOSTS: &str = "hosts/";
const PLACEMENTS: &str = "placements/";
const LEASES: &str = "leases/";
const ELECTION: &str = "leader";

/// What went wrong talking to etcd; carried as the `#[source]` of
/// [`StoreError::Io`].
#[derive(Debug, thiserror::Error)]
pub enum EtcdError {
    /// Connecting, or the first request, failed or timed out.
    #[error("etcd at {endpoints} is unreachable (waited up to {timeout:?})")]
    Unreachable {
        /// The endpoints, comma-separated.
        endpoints: String,
        /// The connect timeout.
        timeout: Duration,
        /// The client's error; `None` when the timeout ran out first.
        #[source]
        source: Option<etcd_client::Error>,
    },
    /// The store's private runtime could not be started.
    #[error("starting the etcd store's runtime")]
    Runtime(#[source] std::io::Error),
    /// A request got no answer in time.
    #[error("etcd did not answer within {0:?}")]
    Timeout(Duration),
    /// A request failed.
    #[error("etcd request failed")]
    Rpc(#[source] etcd_client::Error),
    /// etcd refused a transaction as too large (its `--max-txn-ops`).
    #[error(
        "etcd refused a transaction of {ops} operations; run etcd with --max-txn-ops of at \
         least {ops} (the default is 128) or commit smaller batches"
    )]
    TooManyOps {
        /// The largest of the transaction's compare, success and failure lists.
        ops: usize,
        /// etcd's refusal.
        #[source]
        source: etcd_client::Error,
    },
    /// A placement batch names one slot twice: an etcd transaction may
    /// write a key only once.
    #[error("slot {slot} of app {app} is written twice in one batch")]
    DuplicateSlot {
        /// The app.
        app: String,
        /// The slot.
        slot: u32,
    },
    /// etcd answered something this backend does not expect.
    #[error("unexpected answer from etcd: {0}")]
    Unexpected(&'static str),
    /// The store's runtime went away while a request was in flight.
    #[error("the etcd store's runtime stopped while a request was in flight")]
    RuntimeGone,
}

type EResult<T> = std::result::Result<T, EtcdError>;

fn io(context: &'static str) -> impl FnOnce(EtcdError) -> StoreError {
    move |e| StoreError::Io {
        context,
        source: Box::new(e),
    }
}

/// The etcd store, connected to one cluster under one key prefix.
pub struct EtcdStore {
    /// `Some` until drop, which shuts it down without blocking.
    rt: Option<Runtime>,
    handle: tokio::runtime::Handle,
    client: Client,
    prefix: String,
    endpoints: String,
    changes: watch::Sender<u64>,
}

impl std::fmt::Debug for EtcdStore {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("EtcdStore")
            .field("endpoints", &self.endpoints)
            .field("prefix", &self.prefix)
            .finish_non_exhaustive()
    }
}

impl Drop for EtcdStore {
    fn drop(&mut self) {
        // Dropping a runtime blocks on its tasks and panics inside another
        // runtime's worker; shutting it down in the background does neither.
        if let Some(rt) = self.rt.take() {
            rt.shutdown_background();
        }
    }
}

/// Run `fut` on `handle`'s runtime and wait for it on this thread, with no
/// `block_on` (so any thread may call it), for at most `timeout`.
fn run_on<T, F>(handle: &tokio::runtime::Handle, timeout: Option<Duration>, fut: F) -> EResult<T>
where
    T: Send + 'static,
    F: Future<Output = EResult<T>> + Send + 'static,
{
    let (tx, rx) = std::sync::mpsc::sync_channel(1);
    handle.spawn(async move {
        let out = match timeout {
            Some(t) => tokio::time::timeout(t, fut)
                .await
                .unwrap_or(Err(EtcdError::Timeout(t))),
            None => fut.await,
        };
        let _ = tx.send(out);
    });
    rx.recv().unwrap_or(Err(EtcdError::RuntimeGone))
}

/// The compares that make a transaction hold only if `key` satisfies
/// `expect`.
fn compares(key: &str, expect: Expect) -> Vec<Compare> {
    match expect {
        Expect::Any => vec![],
        Expect::Absent => vec![Compare::create_revision(key, CompareOp::Equal, 0)],
        // An absent key has mod_revision 0, so `At(0)` needs the key to
        // exist as well, which then can never hold (as in the embedded store).
        Expect::At(0) => vec![
            Compare::create_revision(key, CompareOp::Greater, 0),
            Compare::mod_revision(key, CompareOp::Equal, 0),
        ],
        Expect::At(r) => vec![Compare::mod_revision(
            key,
            CompareOp::Equal,
            i64::try_from(r).unwrap_or(i64::MAX),
        )],
    }
}

fn rev(kv: &KeyValue) -> u64 {
    u64::try_from(kv.mod_revision()).unwrap_or(0)
}

fn header_rev(resp: &TxnResponse) -> EResult<u64> {
    resp.header()
        .map(|h| u64::try_from(h.revision()).unwrap_or(0))
        .ok_or(EtcdError::Unexpected("a response without a header"))
}

/// The key-values of the `Get`s a transaction ran, in order.
fn gets(resp: &TxnResponse) -> Vec<Vec<KeyValue>> {
    resp.op_responses()
        .into_iter()
        .filter_map(|r| match r {
            TxnOpResponse::Get(g) => Some(g.kvs().to_vec()),
            _ => None,
        })
        .collect()
}

fn conflict(kind: Kind, key: &str, expected: Expect, found: Option<&KeyValue>) -> StoreError {
    StoreError::Conflict {
        kind,
        key: key.to_owned(),
        expected,
        found: found.map_or(Found::Absent, |kv| Found::At(rev(kv))),
    }
}

fn not_found(kind: Kind, key: &str) -> StoreError {
    StoreError::NotFound {
        kind,
        key: key.to_owned(),
    }
}

/// Map etcd's "too many operations" refusal to its own error.
fn txn_error(ops: usize) -> impl FnOnce(etcd_client::Error) -> EtcdError {
    move |e| match &e {
        etcd_client::Error::GRpcStatus(s) if s.message().contains("too many operations") => {
            EtcdError::TooManyOps { ops, source: e }
        }
        _ => EtcdError::Rpc(e),
    }
}

fn slot_key_suffix(app: &str, slot: u32) -> String {
    format!("{app}/{slot:010}")
}

impl EtcdStore {
    /// Connect to the etcd cluster at `endpoints` (`http://host:port`) and
    /// keep every key under `prefix` (`None`: [`DEFAULT_PREFIX`]; a missing
    /// trailing `/` is added). Fails within [`CONNECT_TIMEOUT`] with an
    /// error naming the endpoints when etcd does not answer.
    pub fn connect(endpoints: &[String], prefix: Option<&str>) -> Result<Self> {
        let mut prefix = prefix.unwrap_or(DEFAULT_PREFIX).to_owned();
        if !prefix.ends_with('/') {
            prefix.push('/');
        }
        let joined = endpoints.join(",");
        let rt = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(1)
            .thread_name("etcd-store")
            .enable_all()
            .build()
            .map_err(|e| io("starting the etcd store")(EtcdError::Runtime(e)))?;
        let handle = rt.handle().clone();
        let unreachable = |source| EtcdError::Unreachable {
            endpoints: joined.clone(),
            timeout: CONNECT_TIMEOUT,
            source,
        };
        let eps = endpoints.to_vec();
        let connected = run_on(&handle, Some(CONNECT_TIMEOUT), async move {
            let options = ConnectOptions::new()
                .with_connect_timeout(CONNECT_TIMEOUT)
                .with_keep_alive(Duration::from_secs(5), Duration::from_secs(5));
            let mut client = Client::connect(&eps, Some(options))
                .await
                .map_err(EtcdError::Rpc)?;
            // The channel connects lazily: one read proves etcd answers, and
            // gives the revision watches start from.
            let status = client.status().await.map_err(EtcdError::Rpc)?;
            let revision = status
                .header()
                .map(|h| u64::try_from(h.revision()).unwrap_or(0))
                .ok_or(EtcdError::Unexpected("a status without a header"))?;
            Ok((client, revision))
        });
        let (client, revision) = match connected {
            Ok(c) => c,
            Err(EtcdError::Rpc(e)) => {
                return Err(io("connecting to etcd")(unreachable(Some(e))));
            }
            Err(EtcdError::Timeout(_)) => return Err(io("connecting to etcd")(unreachable(None))),
            Err(e) => return Err(io("connecting to etcd")(e)),
        };
        let changes = watch::Sender::new(revision);
        handle.spawn(watch_changes(
            client.clone(),
            prefix.clone(),
            revision,
            changes.clone(),
        ));
        Ok(EtcdStore {
            rt: Some(rt),
            handle,
            client,
            prefix,
            endpoints: joined,
            changes,
        })
    }

    /// The key prefix every key of this store is under.
    pub fn prefix(&self) -> &str {
        &self.prefix
    }

    fn key(&self, dir: &str, name: &str) -> String {
        format!("{}{dir}{name}", self.prefix)
    }

    /// Run one request with the store's client and [`REQUEST_TIMEOUT`].
    fn run<T, F>(&self, context: &'static str, f: impl FnOnce(Client) -> F) -> Result<T>
    where
        T: Send + 'static,
        F: Future<Output = EResult<T>> + Send + 'static,
    {
        run_on(&self.handle, Some(REQUEST_TIMEOUT), f(self.client.clone())).map_err(io(context))
    }

    fn txn(&self, context: &'static str, txn: Txn, ops: usize) -> Result<TxnResponse> {
        self.run(context, move |mut c| async move {
            c.txn(txn).await.map_err(txn_error(ops))
        })
    }

    /// Every key-value under `dir` + `from`, sorted by key.
    fn range(&self, context: &'static str, key: String) -> Result<Vec<KeyValue>> {
        self.run(context, move |mut c| async move {
            let mut resp = c
                .get(key, Some(GetOptions::new().with_prefix()))
                .await
                .map_err(EtcdError::Rpc)?;
            Ok(resp.take_kvs())
        })
    }

    fn get_one(&self, context: &'static str, key: String) -> Result<Option<KeyValue>> {
        self.run(context, move |mut c| async move {
            let mut resp = c.get(key, None).await.map_err(EtcdError::Rpc)?;
            Ok(resp.take_kvs().into_iter().next())
        })
    }

    /// Write `value` at `key` if it satisfies `expect`; the new revision.
    fn put_cas(
        &self,
        context: &'static str,
        kind: Kind,
        name: &str,
        key: String,
        value: Vec<u8>,
        expect: Expect,
    ) -> Result<u64> {
        let txn = Txn::new()
            .when(compares(&key, expect))
            .and_then([TxnOp::put(key.clone(), value, None)])
            .or_else([TxnOp::get(key, None)]);
        let resp = self.txn(context, txn, 2)?;
        if resp.succeeded() {
            return header_rev(&resp).map_err(io(context));
        }
        let found = gets(&resp).into_iter().next().unwrap_or_default();
        Err(conflict(kind, name, expect, found.first()))
    }

    /// Delete `key` (and `also`) if it exists and satisfies `expect`.
    fn delete_cas(
        &self,
        context: &'static str,
        kind: Kind,
        name: &str,
        key: String,
        also: Option<String>,
        expect: Expect,
    ) -> Result<()> {
        let mut when = vec![Compare::create_revision(
            key.as_str(),
            CompareOp::Greater,
            0,
        )];
        when.extend(compares(&key, expect));
        let mut then = vec![TxnOp::delete(key.clone(), None)];
        then.extend(also.map(|k| TxnOp::delete(k, None)));
        let txn = Txn::new()
            .when(when)
            .and_then(then)
            .or_else([TxnOp::get(key, None)]);
        let resp = self.txn(context, txn, 3)?;
        if resp.succeeded() {
            return Ok(());
        }
        match gets(&resp).into_iter().next().unwrap_or_default().first() {
            None => Err(not_found(kind, name)),
            Some(kv) => Err(conflict(kind, name, expect, Some(kv))),
        }
    }

    fn decode_app(&self, kv: &KeyValue) -> Result<App> {
        let name = self.name_of(kv, APPS);
        let mut app: App = decode(Kind::App, &name, kv.value())?;
        app.generation = rev(kv);
        Ok(app)
    }

    fn decode_host(&self, kv: &KeyValue) -> Result<Host> {
        let id = self.name_of(kv, HOSTS);
        let mut host: Host = decode(Kind::Host, &id, kv.value())?;
        host.revision = rev(kv);
        Ok(host)
    }

    fn decode_placement(&self, kv: &KeyValue) -> Result<Placement> {
        let key = self.name_of(kv, PLACEMENTS);
        let mut p: Placement = decode(Kind::Placement, &key, kv.value())?;
        p.revision = rev(kv);
        Ok(p)
    }

    /// The record's name: its key without the prefix and directory.
    fn name_of(&self, kv: &KeyValue, dir: &str) -> String {
        let key = String::from_utf8_lossy(kv.key());
        let head = format!("{}{dir}", self.prefix);
        key.strip_prefix(&head).unwrap_or(&key).to_owned()
    }

    /// Store raw bytes as an app's record: for tests of how corrupt or
    /// foreign records are refused.
    #[cfg(test)]
    fn put_raw_app(&self, name: &str, bytes: &[u8]) -> Result<()> {
        let key = self.key(APPS, name);
        let value = bytes.to_vec();
        self.run("writing raw bytes", move |mut c| async move {
            c.put(key, value, None).await.map_err(EtcdError::Rpc)?;
            Ok(())
        })
    }
}

impl Store for EtcdStore {
    fn put_app(&self, name: &str, spec: &AppSpec, expect: Expect) -> Result<App> {
        let mut app = App {
            version: FORMAT_VERSION,
            name: name.to_owned(),
            generation: 0,
            spec: spec.clone(),
        };
        let key = self.key(APPS, name);
        app.generation =
            self.put_cas("writing an app", Kind::App, name, key, encode(&app), expect)?;
        Ok(app)
    }

    fn get_app(&self, name: &str) -> Result<App> {
        match self.get_one("reading an app", self.key(APPS, name))? {
            Some(kv) => self.decode_app(&kv),
            None => Err(not_found(Kind::App, name)),
        }
    }

    fn list_apps(&self) -> Result<Vec<App>> {
        let kvs = self.range("listing apps", self.key(APPS, ""))?;
        kvs.iter().map(|kv| self.decode_app(kv)).collect()
    }

    fn delete_app(&self, name: &str, expect: Expect) -> Result<()> {
        let key = self.key(APPS, name);
        self.delete_cas("deleting an app", Kind::App, name, key, None, expect)
    }

    fn put_host(&self, id: &str, info: &HostInfo, expect: Expect) -> Result<Host> {
        let mut host = Host {
            version: FORMAT_VERSION,
            id: id.to_owned(),
            revision: 0,
            info: info.clone(),
        };
        let key = self.key(HOSTS, id);
        host.revision =
            self.put_cas("writing a host", Kind::Host, id, key, encode(&host), expect)?;
        Ok(host)
    }

    fn get_host(&self, id: &str) -> Result<Host> {
        match self.get_one("reading a host", self.key(HOSTS, id))? {
            Some(kv) => self.decode_host(&kv),
            None => Err(not_found(Kind::Host, id)),
        }
    }

    fn list_hosts(&self) -> Result<Vec<Host>> {
        let kvs = self.range("listing hosts", self.key(HOSTS, ""))?;
        kvs.iter().map(|kv| self.decode_host(kv)).collect()
    }

    fn delete_host(&self, id: &str, expect: Expect) -> Result<()> {
        let key = self.key(HOSTS, id);
        let lease = self.key(LEASES, id);
        self.delete_cas("deleting a host", Kind::Host, id, key, Some(lease), expect)
    }

    fn commit_placements(
        &self,
        app: &str,
        app_generation: Expect,
        writes: &[PlacementWrite],
    ) -> Result<Vec<Placement>> {
        let ctx = "writing placements";
        let app_key = self.key(APPS, app);
        let slots_prefix = self.key(PLACEMENTS, &format!("{app}/"));
        let mut seen = std::collections::BTreeSet::new();
        let mut when = compares(&app_key, app_generation);
        let mut then = Vec::with_capacity(writes.len());
        let mut records = Vec::new();
        for w in writes {
            if !seen.insert(w.slot) {
                return Err(io(ctx)(EtcdError::DuplicateSlot {
                    app: app.to_owned(),
                    slot: w.slot,
                }));
            }
            let key = self.key(PLACEMENTS, &slot_key_suffix(app, w.slot));
            when.extend(compares(&key, w.expect));
            // The revision is the transaction's, known once it commits.
            match w.record(app, 0) {
                Some(record) => {
                    then.push(TxnOp::put(key, encode(&record), None));
                    records.push(record);
                }
                None => then.push(TxnOp::delete(key, None)),
            }
        }
        let ops = when.len().max(then.len());
        // On failure, read the app and all its slots in the same revision,
        // to name the first condition that failed (two operations, however
        // large the batch).
        let txn = Txn::new().when(when).and_then(then).or_else([
            TxnOp::get(app_key, None),
            TxnOp::get(slots_prefix, Some(GetOptions::new().with_prefix())),
        ]);
        let resp = self.txn(ctx, txn, ops)?;
        if resp.succeeded() {
            let revision = header_rev(&resp).map_err(io(ctx))?;
            for r in &mut records {
                r.revision = revision;
            }
            return Ok(records);
        }
        let mut found = gets(&resp).into_iter();
        let app_kv = found.next().unwrap_or_default();
        if !app_generation.holds(
            app_kv
                .first()
                .map_or(Found::Absent, |kv| Found::At(rev(kv))),
        ) {
            return Err(conflict(Kind::App, app, app_generation, app_kv.first()));
        }
        let slots: BTreeMap<Vec<u8>, KeyValue> = found
            .next()
            .unwrap_or_default()
            .into_iter()
            .map(|kv| (kv.key().to_vec(), kv))
            .collect();
        for w in writes {
            let key = self.key(PLACEMENTS, &slot_key_suffix(app, w.slot));
            let kv = slots.get(key.as_bytes());
            if !w
                .expect
                .holds(kv.map_or(Found::Absent, |kv| Found::At(rev(kv))))
            {
                let name = format!("{app}/{}", w.slot);
                return Err(conflict(Kind::Placement, &name, w.expect, kv));
            }
        }
        Err(io(ctx)(EtcdError::Unexpected(
            "a transaction that failed although every condition holds",
        )))
    }

    fn get_placement(&self, app: &str, slot: u32) -> Result<Placement> {
        let key = self.key(PLACEMENTS, &slot_key_suffix(app, slot));
        match self.get_one("reading a placement", key)? {
            Some(kv) => self.decode_placement(&kv),
            None => Err(not_found(Kind::Placement, &format!("{app}/{slot}"))),
        }
    }

    fn list_placements(&self, filter: &PlacementFilter) -> Result<Vec<Placement>> {
        let from = match &filter.app {
            Some(app) => format!("{app}/"),
            None => String::new(),
        };
        let kvs = self.range("listing placements", self.key(PLACEMENTS, &from))?;
        let mut out = Vec::with_capacity(kvs.len());
        for kv in &kvs {
            let p = self.decode_placement(kv)?;
            // An app named `a/b` shares key space with app `a`: match on the
            // record, not only on the key.
            if filter.app.as_ref().is_none_or(|a| *a == p.app)
                && filter.host.as_ref().is_none_or(|h| *h == p.host)
            {
                out.push(p);
            }
        }
        // Key order is not (app, slot) order when an app's name has a byte
        // below `/` (`web-2/…` sorts before `web/…`).
        out.sort_by(|a, b| (&a.app, a.slot).cmp(&(&b.app, b.slot)));
        Ok(out)
    }

    fn grant_lease(&self, host: &str, ttl: Duration, now: Millis) -> Result<Lease> {
        let lease = Lease {
            version: FORMAT_VERSION,
            host: host.to_owned(),
            ttl_ms: u64::try_from(ttl.as_millis()).unwrap_or(u64::MAX),
            expires_at: now.saturating_add(ttl),
        };
        let key = self.key(LEASES, host);
        let value = encode(&lease);
        self.run("granting a lease", move |mut c| async move {
            c.put(key, value, None).await.map_err(EtcdError::Rpc)?;
            Ok(())
        })?;
        Ok(lease)
    }

    fn get_lease(&self, host: &str) -> Result<Lease> {
        match self.get_one("reading a lease", self.key(LEASES, host))? {
            Some(kv) => decode(Kind::Lease, host, kv.value()),
            None => Err(not_found(Kind::Lease, host)),
        }
    }

    fn revoke_lease(&self, host: &str) -> Result<()> {
        let key = self.key(LEASES, host);
        let deleted = self.run("revoking a lease", move |mut c| async move {
            let resp = c.delete(key, None).await.map_err(EtcdError::Rpc)?;
            Ok(resp.deleted())
        })?;
        if deleted == 0 {
            return Err(not_found(Kind::Lease, host));
        }
        Ok(())
    }

    fn expired_leases(&self, now: Millis) -> Result<Vec<Lease>> {
        let kvs = self.range("listing leases", self.key(LEASES, ""))?;
        let mut out = Vec::new();
        for kv in &kvs {
            let lease: Lease = decode(Kind::Lease, &self.name_of(kv, LEASES), kv.value())?;
            if lease.is_expired(now) {
                out.push(lease);
            }
        }
        Ok(out)
    }

    fn watch(&self) -> watch::Receiver<u64> {
        self.changes.subscribe()
    }
}

/// Raise `changes` to `revision` if that is newer.
fn bump(changes: &watch::Sender<u64>, revision: u64) {
    changes.send_if_modified(|seen| {
        let newer = revision > *seen;
        if newer {
            *seen = revision;
        }
        newer
    });
}

/// Follow every change under `prefix` from `revision` on, and send the
/// revision of each change of an app, host or placement to `changes`. When
/// the stream breaks (etcd restarted, network), watch again from the next
/// revision not seen; when that revision was compacted away, report the
/// current one (the receiver re-lists anyway) and go on from there.
async fn watch_changes(
    mut client: Client,
    prefix: String,
    revision: u64,
    changes: watch::Sender<u64>,
) {
    let leases = format!("{prefix}{LEASES}").into_bytes();
    let mut next = i64::try_from(revision)
        .unwrap_or(i64::MAX)
        .saturating_add(1);
    let mut backoff = Duration::from_millis(100);
    loop {
        let options = WatchOptions::new().with_prefix().with_start_revision(next);
        if let Ok(mut stream) = client.watch(prefix.as_str(), Some(options)).await {
            while let Ok(Some(resp)) = stream.message().await {
                backoff = Duration::from_millis(100);
                if resp.canceled() {
                    if resp.compact_revision() > 0 {
                        next = resp.compact_revision();
                        bump(&changes, u64::try_from(next).unwrap_or(0));
                    }
                    break;
                }
                let mut changed = None;
                for kv in resp.events().iter().filter_map(|e| e.kv()) {
                    next = next.max(kv.mod_revision().saturating_add(1));
                    if !kv.key().starts_with(&leases) {
                        changed = Some(rev(kv));
                    }
                }
                if let Some(r) = changed {
                    bump(&changes, r);
                }
            }
        }
        tokio::time::sleep(backoff).await;
        backoff = (backoff * 2).min(Duration::from_secs(5));
    }
}

impl Leadership for EtcdStore {
    /// etcd's election API under `{prefix}leader`: a lease of `ttl`
    /// (rounded up to whole seconds, at least 1; etcd may raise it to its
    /// minimum) kept alive in the background every third of the TTL, and a
    /// `Campaign` with it, which returns once every earlier candidate's key
    /// is gone. If a keep-alive fails or is not answered within a third of
    /// the TTL, or etcd reports the lease gone, the guard turns lost at once
    /// (before the lease can have expired on etcd's side).
    fn campaign(&self, candidate: &str, ttl: Duration) -> Result<LeaderGuard> {
        let ctx = "campaigning for leadership";
        let whole = ttl.as_secs() + u64::from(ttl.subsec_nanos() > 0);
        let secs = i64::try_from(whole).unwrap_or(i64::MAX).max(1);
        let mut client = self.client.clone();
        let (leading_tx, leading_rx) = watch::channel(false);
        let (stop_tx, stop_rx) = oneshot::channel::<Option<etcd_client::LeaderKey>>();
        let lost = Arc::new(AtomicBool::new(false));
        let granted = run_on(&self.handle, Some(REQUEST_TIMEOUT), {
            let mut client = client.clone();
            async move {
                let grant = client
                    .lease_grant(secs, None)
                    .await
                    .map_err(EtcdError::Rpc)?;
                let (keeper, stream) = client
                    .lease_keep_alive(grant.id())
                    .await
                    .map_err(EtcdError::Rpc)?;
                Ok((grant.id(), grant.ttl(), keeper, stream))
            }
        })
        .map_err(io(ctx))?;
        let (lease, granted_ttl, keeper, stream) = granted;
        let ttl = Duration::from_secs(u64::try_from(granted_ttl.max(1)).unwrap_or(1));
        self.handle.spawn(keep_leading(
            client.clone(),
            lease,
            ttl,
            keeper,
            stream,
            leading_tx.clone(),
            Arc::clone(&lost),
            stop_rx,
        ));
        let name = self.key(ELECTION, "");
        let value = candidate.to_owned();
        let campaign = run_on(&self.handle, None, async move {
            let mut resp = client
                .campaign(name, value, lease)
                .await
                .map_err(EtcdError::Rpc)?;
            resp.take_leader()
                .ok_or(EtcdError::Unexpected("a campaign won without a leader key"))
        });
        let key = match campaign {
            Ok(key) => key,
            Err(e) => {
                let _ = stop_tx.send(None);
                return Err(io(ctx)(e));
            }
        };
        // Under the channel's lock: a keep-alive that failed meanwhile has
        // set `lost` before taking the lock, so it is never overwritten.
        leading_tx.send_if_modified(|leading| {
            if lost.load(Ordering::SeqCst) {
                false
            } else {
                *leading = true;
                true
            }
        });
        Ok(LeaderGuard::new(candidate, leading_rx, move || {
            let _ = stop_tx.send(Some(key));
            drop(leading_tx);
        }))
    }

    fn leader(&self) -> Result<Option<String>> {
        let name = self.key(ELECTION, "");
        self.run("reading the leader", move |mut c| async move {
            match c.leader(name).await {
                Ok(resp) => Ok(resp
                    .kv()
                    .map(|kv| String::from_utf8_lossy(kv.value()).into_owned())),
                Err(etcd_client::Error::GRpcStatus(s)) if s.message().contains("no leader") => {
                    Ok(None)
                }
                Err(e) => Err(EtcdError::Rpc(e)),
            }
        })
    }
}

/// Keep the election lease alive until told to stop (resign with the leader
/// key, if elected, and revoke the lease) or until a keep-alive fails (mark
/// leadership lost, then wait to be told to stop and revoke).
#[allow(clippy::too_many_arguments)]
async fn keep_leading(
    mut client: Client,
    lease: i64,
    ttl: Duration,
    mut keeper: LeaseKeeper,
    mut stream: LeaseKeepAliveStream,
    leading: watch::Sender<bool>,
    lost: Arc<AtomicBool>,
    mut stop: oneshot::Receiver<Option<etcd_client::LeaderKey>>,
) {
    let every = ttl / 3;
    let key = loop {
        tokio::select! {
            key = &mut stop => break key.ok().flatten(),
            () = tokio::time::sleep(every) => {
                let renewed = tokio::time::timeout(every, async {
                    keeper.keep_alive().await?;
                    stream.message().await
                })
                .await;
                if !matches!(renewed, Ok(Ok(Some(ref r))) if r.ttl() > 0) {
                    lost.store(true, Ordering::SeqCst);
                    leading.send_replace(false);
                    break (&mut stop).await.ok().flatten();
                }
            }
        }
    };
    let resign = async {
        if let Some(key) = key {
            let _ = client
                .resign(Some(ResignOptions::new().with_leader(key)))
                .await;
        }
        let _ = client.lease_revoke(lease).await;
    };
    let _ = tokio::time::timeout(REQUEST_TIMEOUT, resign).await;
}

#[cfg(test)]
mod tests;
