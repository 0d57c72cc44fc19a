//! Remote mode: which zygote daemon (if any) the CLI talks to, and the
//! CLI's commands (`master create|ls|rm`, `clone`, `exec`, `ps`, `kill`,
//! `snapshot save|load`) as calls to its HTTP API (`api::client`), each
//! blocking on a small tokio runtime.
//!
//! [`choose`] is the one decision: `--local` (or `ZYGOTE_HOST=local`) is
//! local mode; `--host URL` (or `ZYGOTE_HOST`) names a daemon; else the
//! daemon serving the state directory is used when its socket
//! (`STATE_DIR/zygote.sock`) accepts a connection, and local mode when
//! none does (no socket, or a stale one).
//!
//! Output, exit codes and error sentences are the local commands' own
//! (`output.rs` holds the shared formats; a missing clone or master is
//! reported in the local words).
//!
//! It must not: touch the state directory's files (the daemon owns them;
//! reading `/proc` of a clone's VMM on this host is the one exception, for
//! `ps`), retry anything but a start refused for want of a start slot, or
//! leave clones of an attached `zygote clone` running when it ends.

use std::collections::HashMap;
use std::io::{Read, Write};
use std::path::{Component, Path, PathBuf};
use std::time::{Duration, Instant};

use anyhow::{anyhow, bail, Context};
use api::client::{segment, Client, ClientError, Endpoint, ExecEvent};
use host::clone::CloneStatus;
use host::master::MasterError;
use host::store::StoreError;
use serde::de::DeserializeOwned;
use serde::Deserialize;
use serde_json::json;

use crate::commands::{catch_interrupts, interrupted};
use crate::{output, Cmd, MasterCmd, SnapshotCmd};

/// The global flags that pick local or remote mode.
#[derive(clap::Args, Debug, Clone, Default)]
pub struct TargetArgs {
    /// The zygote daemon to use: unix:PATH or http://HOST:PORT, or `local`
    /// for none [default: $ZYGOTE_HOST, else the daemon serving the state
    /// directory if one answers on STATE_DIR/zygote.sock, else none].
    #[arg(long, global = true, value_name = "URL")]
    pub host: Option<String>,
    /// File holding the daemon's bearer token, for TCP [default: $ZYGOTE_TOKEN].
    #[arg(long, global = true, value_name = "FILE")]
    pub token_file: Option<PathBuf>,
    /// Work on the state directory directly, without a daemon, even when
    /// one serves it (as ZYGOTE_HOST=local).
    #[arg(long, global = true, conflicts_with = "host")]
    pub local: bool,
}

/// Where the commands go.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Choice {
    /// Over the `host` library, on the state directory.
    Local,
    /// Through a daemon.
    Daemon(Daemon),
}

/// A daemon to talk to.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Daemon {
    /// Where it listens.
    pub endpoint: Endpoint,
    /// Its state directory, when it is on this host and known.
    pub state_dir: Option<PathBuf>,
    /// Whether the user named it (else it was found on the state directory).
    pub named: bool,
}

/// The one decision between local and remote mode, from the flags, the
/// environment and the state directory's socket.
pub fn choose(args: &TargetArgs) -> anyhow::Result<Choice> {
    let env = std::env::var("ZYGOTE_HOST").ok();
    Ok(choose_with(
        args,
        env.as_deref(),
        &host::paths::runtime_root(),
    )?)
}

/// [`choose`] with the environment and the state directory given.
pub fn choose_with(
    args: &TargetArgs,
    env_host: Option<&str>,
    state_dir: &Path,
) -> Result<Choice, ClientError> {
    if args.local {
        return Ok(Choice::Local);
    }
    let named = args
        .host
        .as_deref()
        .or(env_host.filter(|h| !h.trim().is_empty()));
    if let Some(h) = named {
        let h = h.trim();
        if h == "local" {
            return Ok(Choice::Local);
        }
        let endpoint = Endpoint::parse(h)?;
        // A daemon's default socket names its state directory.
        let state_dir = match &endpoint {
            Endpoint::Unix(p) if p.file_name() == Some(SOCKET.as_ref()) => {
                p.parent().map(Path::to_path_buf)
            }
            _ => None,
        };
        return Ok(Choice::Daemon(Daemon {
            endpoint,
            state_dir,
            named: true,
        }));
    }
    let socket = state_dir.join(SOCKET);
    if daemon_answers(&socket) {
        return Ok(Choice::Daemon(Daemon {
            endpoint: Endpoint::Unix(socket),
            state_dir: Some(state_dir.to_path_buf()),
            named: false,
        }));
    }
    Ok(Choice::Local)
}

/// The socket's name in a state directory (`zygote daemon`'s default).
const SOCKET: &str = "zygote.sock";

/// Whether a daemon listens on `socket`: it accepts a connection, or
/// refuses this user (then local mode would go behind its back). A socket
/// file nobody listens on is stale: no daemon.
fn daemon_answers(socket: &Path) -> bool {
    use std::os::unix::fs::FileTypeExt;
    let is_socket = std::fs::metadata(socket).is_ok_and(|m| m.file_type().is_socket());
    if !is_socket {
        return false;
    }
    match std::os::unix::net::UnixStream::connect(socket) {
        Ok(_) => true,
        Err(e) => e.kind() == std::io::ErrorKind::PermissionDenied,
    }
}

/// The bearer token: `--token-file`, else `$ZYGOTE_TOKEN`.
pub fn token(file: Option<&Path>, env: Option<String>) -> anyhow::Result<Option<String>> {
    if let Some(f) = file {
        let t = std::fs::read_to_string(f)
            .with_context(|| format!("reading the token file {}", f.display()))?;
        let t = t.trim();
        if t.is_empty() {
            bail!("the token file {} is empty", f.display());
        }
        return Ok(Some(t.to_string()));
    }
    Ok(env.map(|t| t.trim().to_string()).filter(|t| !t.is_empty()))
}

/// `DIR` as the daemon needs it: absolute, without `.` or `..` (resolved
/// against the current directory, by name).
pub fn absolute_dir(dir: &Path, cwd: &Path) -> PathBuf {
    let mut out = PathBuf::new();
    for c in cwd.join(dir).components() {
        match c {
            Component::ParentDir => {
                out.pop();
            }
            Component::CurDir => {}
            other => out.push(other.as_os_str()),
        }
    }
    out
}

/// A connection to a daemon, and what the commands need around it.
pub struct Remote {
    client: Client,
    rt: tokio::runtime::Runtime,
    daemon: Daemon,
}

impl Remote {
    /// A client of `daemon` with `token`.
    pub fn new(daemon: Daemon, token: Option<String>) -> anyhow::Result<Self> {
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .context("starting the async runtime")?;
        Ok(Remote {
            client: Client::new(daemon.endpoint.clone(), token),
            rt,
            daemon,
        })
    }

    fn describe(&self) -> String {
        match &self.daemon.endpoint {
            Endpoint::Unix(p) => format!("unix:{}", p.display()),
            Endpoint::Tcp(h) => format!("http://{h}"),
        }
    }

    /// Whether the daemon runs on this host (its clones' `/proc` is ours).
    fn same_host(&self) -> bool {
        matches!(self.daemon.endpoint, Endpoint::Unix(_))
    }

    fn get<T: DeserializeOwned>(&self, path: &str) -> Result<T, ClientError> {
        self.rt.block_on(self.client.get(path))?.decode()
    }

    fn post<T: DeserializeOwned>(
        &self,
        path: &str,
        body: &serde_json::Value,
    ) -> Result<T, ClientError> {
        self.rt.block_on(self.client.post(path, body))?.decode()
    }

    fn delete(&self, path: &str) -> Result<(), ClientError> {
        self.rt.block_on(self.client.delete(path))?.ok()
    }

    /// Every instance that `query` (`&key=value...`) selects, all pages.
    fn instances(&self, query: &str) -> Result<Vec<Instance>, ClientError> {
        let mut out = Vec::new();
        let mut token: Option<String> = None;
        loop {
            let mut path = format!("/v1/instances?limit=1000{query}");
            if let Some(t) = &token {
                path.push_str(&format!("&page_token={}", segment(t)));
            }
            let page: InstancePage = self.get(&path)?;
            out.extend(page.instances);
            match page.next_page_token {
                Some(t) if Some(&t) != token.as_ref() => token = Some(t),
                _ => return Ok(out),
            }
        }
    }
}

/// Runs one of the daemon's commands through `r`.
pub fn dispatch(r: &Remote, cmd: Cmd) -> anyhow::Result<i32> {
    match cmd {
        Cmd::Master { what } => master(r, what),
        Cmd::Clone {
            name,
            count,
            detach,
            parallel: _,
            timeout,
            timings,
            connection,
            limits,
            net,
        } => {
            if connection == crate::Connection::Reset {
                bail!("--connection reset is for clones started without a daemon (--local)");
            }
            clone(
                r,
                &name,
                count,
                host::clone::CloneOptions {
                    detach,
                    timeout: Duration::from_secs(timeout),
                    parallel: 1,
                    limits: limits.limits()?,
                    net: net.request(count)?,
                    vsock_reset: false,
                },
                timings,
            )
        }
        Cmd::Exec { clone, cmd } => exec(r, &clone, &cmd),
        Cmd::Ps { json } => ps(r, json),
        Cmd::Kill { clones, all } => kill(r, clones, all),
        Cmd::Snapshot { what } => snapshot(r, what),
        Cmd::Run { .. }
        | Cmd::Daemon(_)
        | Cmd::Bench { .. }
        | Cmd::Scheduler(_)
        | Cmd::App { .. }
        | Cmd::Host { .. } => {
            bail!("`zygote run`, `daemon` and `bench` do not go through a daemon")
        }
    }
}

// ------------------------------------------------------------ wire types
// What the CLI reads of the daemon's answers (`host::runtime`'s report
// types are serialise-only); unknown fields are ignored.

#[derive(Debug, Deserialize)]
struct Instance {
    id: String,
    master: String,
    state: String,
    #[serde(default)]
    reason: Option<String>,
    #[serde(default)]
    pid: Option<u32>,
    #[serde(default)]
    created_unix_s: u64,
    #[serde(default)]
    timings: Timings,
    #[serde(default)]
    memory: Option<Memory>,
}

#[derive(Debug, Default, Deserialize)]
struct Timings {
    running_ms: Option<f64>,
    connected_ms: Option<f64>,
    identity_ms: Option<f64>,
    ready_ms: Option<f64>,
}

#[derive(Debug, Deserialize)]
struct Memory {
    private_kib: u64,
}

#[derive(Debug, Deserialize)]
struct InstancePage {
    instances: Vec<Instance>,
    #[serde(default)]
    next_page_token: Option<String>,
}

#[derive(Debug, Deserialize)]
struct Created {
    results: Vec<CreatedOne>,
}

#[derive(Debug, Deserialize)]
struct CreatedOne {
    #[serde(default)]
    instance: Option<Instance>,
    #[serde(default)]
    error: Option<ErrorDetail>,
}

#[derive(Debug, Deserialize)]
struct ErrorDetail {
    message: String,
}

#[derive(Debug, Deserialize)]
struct Master {
    name: String,
    status: String,
    #[serde(default)]
    reason: Option<String>,
    #[serde(default)]
    console_tail: Option<Vec<String>>,
    memory_mib: u64,
    vcpus: u8,
    #[serde(default)]
    warmup: Option<String>,
    #[serde(default)]
    clones_alive: usize,
    #[serde(default)]
    boot_ms: Option<f64>,
    #[serde(default)]
    warmup_ms: Option<f64>,
}

#[derive(Debug, Deserialize)]
struct Fetched {
    master: Master,
    transfer: api::types::TransferStats,
}

#[derive(Debug, Deserialize)]
struct Saved {
    dir: String,
    memory_bytes: u64,
    data_bytes: u64,
    zero_pages_skipped: u64,
}

// ------------------------------------------------------------ errors

/// A daemon's error as the CLI says it: the daemon's sentence alone
/// (its status and code are for programs).
fn say(e: ClientError) -> anyhow::Error {
    match e {
        ClientError::Api { message, .. } => anyhow!(message),
        other => anyhow!(other),
    }
}

/// Whether the daemon said that the object does not exist (not that the
/// route does not).
fn is_missing(e: &ClientError) -> bool {
    matches!(e, ClientError::Api { status, code, message }
        if status.as_u16() == 404 && code == "not_found" && !message.starts_with("no such route"))
}

/// A missing clone in the local words, else [`say`].
fn no_clone(e: ClientError, id: &str) -> anyhow::Error {
    if is_missing(&e) {
        anyhow!(StoreError::NoClone(id.to_string()))
    } else {
        say(e)
    }
}

/// A missing master in the local words, else [`say`].
fn no_master(e: ClientError, name: &str) -> anyhow::Error {
    if is_missing(&e) {
        anyhow!(StoreError::NoMaster(name.to_string()))
    } else {
        say(e)
    }
}

fn instance_path(id: &str) -> String {
    format!("/v1/instances/{}", segment(id))
}

fn master_path(name: &str) -> String {
    format!("/v1/masters/{}", segment(name))
}

// ------------------------------------------------------------ masters

fn master(r: &Remote, what: MasterCmd) -> anyhow::Result<i32> {
    match what {
        MasterCmd::Create {
            name,
            vm,
            warmup,
            warmup_timeout,
            console,
            net,
            egress,
        } => {
            if vm.kernel.is_some() || vm.rootfs.is_some() {
                bail!(
                    "--kernel and --rootfs cannot be used through the zygote daemon at {} (it boots the guest image it was set up with); pass --local to make the master without it",
                    r.describe()
                );
            }
            if console {
                eprintln!("zygote: the guest console is not shown through the daemon");
            }
            let body = json!({
                "name": name,
                "memory_mib": vm.memory,
                "vcpus": vm.vcpus,
                "warmup": warmup,
                "warmup_timeout_s": warmup_timeout,
                "net": net,
                "egress": egress,
            });
            master_create(r, &name, &body, warmup.as_deref())
        }
        MasterCmd::Ls { json } => master_ls(r, json),
        MasterCmd::Fetch {
            name,
            from,
            source_name,
        } => {
            let f: Fetched = r
                .post(
                    "/v1/masters:fetch",
                    &json!({ "name": name, "from": from, "source_name": source_name }),
                )
                .map_err(say)
                .with_context(|| format!("fetching master {name} from {from}"))?;
            let t = &f.transfer;
            eprintln!(
                "zygote: fetched {} from {from} in {:.1} s: {} MiB of RAM, {:.1} MiB over the wire ({:.0} MiB/s, {} attempt(s))",
                f.master.name,
                t.seconds,
                t.memory_bytes >> 20,
                t.wire_bytes as f64 / (1 << 20) as f64,
                t.mib_per_s,
                t.attempts
            );
            println!("{}", f.master.name);
            Ok(0)
        }
        MasterCmd::Rm { name, force } => {
            let path = format!("{}?force={force}", master_path(&name));
            match r.delete(&path) {
                Ok(()) => Ok(0),
                // Clones of it are alive: said as locally (the daemon's
                // sentence names the API's parameter, not the flag).
                Err(ClientError::Api { message, .. }) if message.contains("force=true") => {
                    match r.get::<Master>(&master_path(&name)) {
                        Ok(m) if m.clones_alive > 0 => Err(anyhow!(MasterError::InUse {
                            name,
                            count: m.clones_alive,
                        })),
                        _ => bail!("{}", message.replace("pass force=true", "pass --force")),
                    }
                }
                Err(e) => Err(no_master(e, &name)),
            }
        }
    }
}

/// POST, then follow the master every 500 ms until it is frozen or failed,
/// with the local command's progress lines where the daemon tells enough.
fn master_create(
    r: &Remote,
    name: &str,
    body: &serde_json::Value,
    warmup: Option<&str>,
) -> anyhow::Result<i32> {
    let t0 = Instant::now();
    let first: Master = r.post("/v1/masters", body).map_err(|e| match e {
        ClientError::Api { ref message, .. } if message.contains("exists already") => {
            anyhow!(StoreError::MasterExists(name.to_string()))
        }
        ClientError::Api { message, .. } => anyhow!(flag_names(&message)),
        e => say(e),
    })?;
    eprintln!(
        "zygote: booting the master (through the daemon at {})",
        r.describe()
    );
    if warmup.is_some() {
        eprintln!("zygote: the warm-up's output is not shown through the daemon (its last lines are, if it fails)");
    }
    let mut seen = first.status;
    loop {
        std::thread::sleep(Duration::from_millis(500));
        let m: Master = r.get(&master_path(name)).map_err(|e| {
            if is_missing(&e) {
                anyhow!("master {name:?} was removed while it was being made")
            } else {
                say(e)
            }
        })?;
        if m.status != seen && m.status == "warming" {
            eprintln!(
                "zygote: agent ready after {:.1} s",
                t0.elapsed().as_secs_f64()
            );
            eprintln!("zygote: warm-up: {}", warmup.unwrap_or("-"));
        }
        match m.status.as_str() {
            "frozen" => {
                if seen != "warming" {
                    eprintln!(
                        "zygote: agent ready after {:.1} s",
                        m.boot_ms.unwrap_or(f64::NAN) / 1000.0
                    );
                }
                eprintln!("{}", frozen_line(&m));
                println!("{}", m.name);
                return Ok(0);
            }
            "failed" => {
                if let Some(tail) = m.console_tail.as_ref().filter(|t| !t.is_empty()) {
                    eprintln!("zygote: the warm-up's last output:");
                    for l in tail {
                        eprintln!("{l}");
                    }
                }
                // Locally a failed master leaves nothing behind; the daemon
                // keeps it for inspection until it is deleted, which frees
                // the name again.
                let _ = r.delete(&master_path(name));
                bail!(
                    "{}",
                    m.reason
                        .unwrap_or_else(|| "the master could not be made".into())
                );
            }
            _ => {}
        }
        seen = m.status;
    }
}

/// The daemon's sentence about a `POST /v1/masters` field, with the
/// CLI's flag in its place.
fn flag_names(message: &str) -> String {
    message
        .replace("memory_mib must", "--memory must")
        .replace("vcpus must", "--vcpus must")
        .replace("warmup_timeout_s must", "--warmup-timeout must")
        .replace("warmup is longer", "--warmup is longer")
}

fn frozen_line(m: &Master) -> String {
    let s = |ms: Option<f64>| ms.unwrap_or(f64::NAN) / 1000.0;
    match m.warmup_ms {
        Some(w) => format!(
            "zygote: frozen: cold boot {:.1} s, warm-up {:.1} s",
            s(m.boot_ms),
            w / 1000.0
        ),
        None => format!("zygote: frozen: cold boot {:.1} s", s(m.boot_ms)),
    }
}

fn master_ls(r: &Remote, json: bool) -> anyhow::Result<i32> {
    let all: serde_json::Value = r.get("/v1/masters").map_err(say)?;
    let raw = all["masters"].as_array().cloned().unwrap_or_default();
    let mut rows = Vec::new();
    for v in raw {
        match serde_json::from_value::<Master>(v.clone()) {
            Ok(m) => rows.push((m, v)),
            Err(e) => eprintln!("zygote: skipping a master: {e}"),
        }
    }
    if json {
        let v: Vec<_> = rows
            .into_iter()
            .map(|(m, fields)| {
                let fields = with_record_fields(fields, &m, r.daemon.state_dir.as_deref());
                output::master_json(fields, m.clones_alive)
            })
            .collect();
        println!("{}", serde_json::Value::Array(v));
        return Ok(0);
    }
    let mut table = Vec::new();
    for (m, _) in &rows {
        if m.status == "frozen" {
            table.push(output::MasterRow {
                name: &m.name,
                memory_mib: m.memory_mib,
                vcpus: m.vcpus,
                clones: m.clones_alive,
                warmup: m.warmup.as_deref(),
            });
        } else {
            let why = m
                .reason
                .as_deref()
                .map(|r| format!(": {r}"))
                .unwrap_or_default();
            eprintln!("zygote: master {} is {}{why}", m.name, m.status);
        }
    }
    print!("{}", output::masters_table(&table));
    Ok(0)
}

/// A daemon's master object with the local record's fields that it lacks:
/// `version`, and `snapshot` (its directory when the daemon's state
/// directory is on this host, else null).
fn with_record_fields(
    mut fields: serde_json::Value,
    m: &Master,
    state_dir: Option<&Path>,
) -> serde_json::Value {
    if fields.get("version").is_none() {
        fields["version"] = host::store::RECORD_VERSION.into();
    }
    if fields.get("snapshot").is_none() {
        let snap = state_dir
            .map(|d| {
                host::store::Store::at(d.to_path_buf())
                    .master_dir(&m.name)
                    .join("snapshot")
            })
            .filter(|p| m.status == "frozen" && p.is_dir());
        fields["snapshot"] =
            snap.map_or(serde_json::Value::Null, |p| p.display().to_string().into());
    }
    fields
}

// ------------------------------------------------------------ clones

/// `zygote clone` through the daemon: start them (in requests of at most
/// the API's count), print the ids; attached, keep them until Ctrl-C or
/// until they have all ended, then delete them.
fn clone(
    r: &Remote,
    name: &str,
    count: usize,
    opts: host::clone::CloneOptions,
    timings: bool,
) -> anyhow::Result<i32> {
    let host::clone::CloneOptions {
        detach,
        timeout,
        limits,
        net,
        ..
    } = opts;
    if count == 0 {
        bail!("--count must be at least 1");
    }
    if !detach {
        catch_interrupts();
    }
    let mut ids: Vec<String> = Vec::new();
    let mut failed = 0;
    let mut left = count;
    while left > 0 && !interrupted() {
        let n = left.min(api::types::MAX_COUNT);
        left -= n;
        let created = match start_clones(r, name, n, &limits, &net, timeout) {
            Ok(c) => c,
            Err(e) => {
                if !detach {
                    stop_clones(r, &ids);
                }
                return Err(e);
            }
        };
        for one in created.results {
            match (one.instance, one.error) {
                (Some(i), _) => {
                    println!("{}", i.id);
                    if timings {
                        eprintln!("{}", output::clone_timings_line(&i.id, &times(&i.timings)));
                    }
                    ids.push(i.id);
                }
                (None, e) => {
                    let why = e.map_or_else(|| "a clone did not start".into(), |e| e.message);
                    eprintln!("zygote: {why}");
                    failed += 1;
                }
            }
        }
    }
    let _ = std::io::stdout().flush();
    let code = if failed > 0 { 1 } else { 0 };
    if detach {
        return Ok(code);
    }
    eprintln!("zygote: {} clone(s) running; Ctrl-C stops them", ids.len());
    let query = format!("&master={}", segment(name));
    let mut warned = false;
    while !interrupted() && !ids.is_empty() {
        match r.instances(&query) {
            Ok(all) => {
                let live: HashMap<&str, &str> = all
                    .iter()
                    .map(|i| (i.id.as_str(), i.state.as_str()))
                    .collect();
                ids.retain(|id| {
                    let alive = matches!(live.get(id.as_str()), Some(&"starting" | &"running"));
                    if !alive {
                        eprintln!("zygote: clone {id} ended");
                        let _ = r.delete(&instance_path(id));
                    }
                    alive
                });
                warned = false;
            }
            Err(e) => {
                if !warned {
                    eprintln!("zygote: {:#}", say(e));
                    warned = true;
                }
            }
        }
        for _ in 0..5 {
            if interrupted() {
                break;
            }
            std::thread::sleep(Duration::from_millis(100));
        }
    }
    stop_clones(r, &ids);
    Ok(code)
}

fn times(t: &Timings) -> output::CloneTimes {
    output::CloneTimes {
        running_ms: t.running_ms,
        connected_ms: t.connected_ms,
        identity_ms: t.identity_ms,
        ready_ms: t.ready_ms,
    }
}

fn stop_clones(r: &Remote, ids: &[String]) {
    for id in ids {
        if let Err(e) = r.delete(&instance_path(id)) {
            eprintln!("zygote: {:#}", no_clone(e, id));
        }
    }
}

/// One `POST /v1/instances`; while every start slot is in use (429) it
/// waits as the daemon says (Retry-After), for up to `patience`.
fn start_clones(
    r: &Remote,
    name: &str,
    n: usize,
    limits: &host::confine::VmLimits,
    net: &host::vmnet::NetRequest,
    patience: Duration,
) -> anyhow::Result<Created> {
    let body = json!({
        "master": name,
        "count": n,
        "limits": limits,
        "net": !net.disabled,
        "egress": net.egress,
        "peers": net.peers,
        "ports": net.publish,
    });
    let deadline = Instant::now() + patience;
    let mut said = false;
    loop {
        let a =
            r.rt.block_on(r.client.post("/v1/instances", &body))
                .map_err(say)?;
        if a.status.as_u16() == 429 && Instant::now() < deadline {
            if !said {
                eprintln!("zygote: every start slot of the daemon is in use; waiting for one");
                said = true;
            }
            let wait = a
                .headers
                .get("retry-after")
                .and_then(|v| v.to_str().ok())
                .and_then(|v| v.parse::<u64>().ok())
                .unwrap_or(1)
                .clamp(1, 10);
            std::thread::sleep(Duration::from_secs(wait).min(deadline - Instant::now()));
            continue;
        }
        // All started (201), some (207), or none (502): one result each.
        if let Ok(c) = serde_json::from_slice::<Created>(&a.body) {
            return Ok(c);
        }
        return a.decode::<Created>().map_err(|e| no_master(e, name));
    }
}

fn ps(r: &Remote, json: bool) -> anyhow::Result<i32> {
    let now = host::store::unix_now();
    let rows: Vec<CloneStatus> = r
        .instances("")
        .map_err(say)?
        .into_iter()
        .map(|i| ps_row(r, i, now))
        .collect();
    if json {
        println!("{}", serde_json::to_string(&rows)?);
    } else {
        print!("{}", output::ps_table(&rows));
    }
    Ok(0)
}

/// One `ps` row: the local one's fields, from the daemon's instance. On
/// this host the VMM's memory is read from `/proc` as locally; else the
/// daemon's figure (no PSS).
fn ps_row(r: &Remote, i: Instance, now: u64) -> CloneStatus {
    let running = i.state == "running";
    let pid = i.pid.filter(|_| running);
    let proc_kib = |field| {
        pid.filter(|_| r.same_host())
            .and_then(|p| host::procfs::smaps_rollup(p, field))
    };
    let mut private_kib = proc_kib("Private_Dirty");
    if private_kib.is_none() && running {
        // The list's memory figures can be missing or old; one GET has them.
        private_kib = i.memory.as_ref().map(|m| m.private_kib).or_else(|| {
            r.get::<Instance>(&instance_path(&i.id))
                .ok()
                .and_then(|x| x.memory)
                .map(|m| m.private_kib)
        });
    }
    CloneStatus {
        pss_kib: proc_kib("Pss"),
        private_kib,
        pid: i.pid.unwrap_or(0),
        state: state_text(&i.state, i.reason.as_deref()),
        age_s: now.saturating_sub(i.created_unix_s),
        id: i.id,
        master: i.master,
    }
}

/// The `STATE` column: `running`, `starting`, or an end and its reason
/// (`exited: ...`, as the local `ps` says it).
pub fn state_text(state: &str, reason: Option<&str>) -> String {
    match (state, reason) {
        ("running" | "starting", _) | (_, None) => state.to_string(),
        (s, Some(why)) => format!("{s}: {why}"),
    }
}

fn kill(r: &Remote, ids: Vec<String>, all: bool) -> anyhow::Result<i32> {
    let ids: Vec<String> = if all {
        r.instances("")
            .map_err(say)?
            .into_iter()
            .map(|i| i.id)
            .collect()
    } else {
        ids
    };
    let mut failed = 0;
    for id in ids {
        if let Err(e) = r.delete(&instance_path(&id)) {
            eprintln!("zygote: {:#}", no_clone(e, &id));
            failed += 1;
        }
    }
    Ok(if failed > 0 { 1 } else { 0 })
}

// ------------------------------------------------------------ exec

/// `zygote exec` over the streamed exec's WebSocket: this process's stdin
/// goes to the command (a thread reads it; an empty message is EOF), its
/// stdout and stderr come back apart, and the exit code is the command's,
/// as the local exec does.
fn exec(r: &Remote, id: &str, argv: &[String]) -> anyhow::Result<i32> {
    use host::agent::AgentError;
    use host::run::RunError;
    let start = json!({ "argv": argv });
    r.rt.block_on(async {
        let sock = r
            .client
            .exec_ws(id, &start)
            .await
            .map_err(|e| no_clone(e, id))?;
        let (mut input, mut events) = sock.split();
        let (tx, mut rx) = tokio::sync::mpsc::channel::<Vec<u8>>(4);
        std::thread::Builder::new()
            .name("stdin".into())
            .spawn(move || forward_stdin(std::io::stdin().lock(), &tx))
            .context("starting the stdin thread")?;
        let feeder = tokio::spawn(async move {
            while let Some(data) = rx.recv().await {
                let eof = data.is_empty();
                if input.send(data).await.is_err() || eof {
                    break;
                }
            }
        });
        let mut stdout = std::io::stdout().lock();
        let mut stderr = std::io::stderr().lock();
        let result = loop {
            let written = match events.next().await {
                Some(ExecEvent::Stdout(d)) => stdout.write_all(&d).and_then(|_| stdout.flush()),
                Some(ExecEvent::Stderr(d)) => stderr.write_all(&d),
                Some(ExecEvent::Exited(s)) => break Ok(s.shell_code()),
                Some(ExecEvent::Refused {
                    code: proto::ErrorCode::NotFound,
                    ..
                }) => break Err(RunError::NotFound(argv[0].clone()).into()),
                Some(ExecEvent::Refused { code, message }) => {
                    break Err(RunError::Agent(AgentError::Remote { code, message }).into())
                }
                Some(ExecEvent::Error(m)) => break Err(anyhow!(m)),
                None => {
                    break Err(anyhow!(
                        "the daemon closed the exec before the command ended"
                    ))
                }
            };
            if let Err(e) = written {
                break Err(RunError::Agent(AgentError::Output(e)).into());
            }
        };
        feeder.abort();
        result
    })
}

/// Reads `input` until EOF and sends it on `tx` in chunks; the last chunk
/// is empty (EOF, also after a read error).
fn forward_stdin(mut input: impl Read, tx: &tokio::sync::mpsc::Sender<Vec<u8>>) {
    let mut buf = vec![0u8; api::client::STDIN_CHUNK];
    loop {
        let n = match input.read(&mut buf) {
            Ok(n) => n,
            Err(e) if e.kind() == std::io::ErrorKind::Interrupted => continue,
            Err(_) => 0,
        };
        if tx.blocking_send(buf[..n].to_vec()).is_err() || n == 0 {
            return;
        }
    }
}

// ------------------------------------------------------------ snapshots

fn snapshot(r: &Remote, what: SnapshotCmd) -> anyhow::Result<i32> {
    let cwd = std::env::current_dir().context("the current directory")?;
    match what {
        SnapshotCmd::Save { name, dir } => {
            let dir = absolute_dir(&dir, &cwd);
            let t = Instant::now();
            let s: Saved = r
                .post(
                    &format!("{}/snapshot", master_path(&name)),
                    &json!({ "dir": dir.display().to_string() }),
                )
                .map_err(|e| no_master(e, &name))
                .with_context(|| format!("saving master {name}"))?;
            eprintln!(
                "zygote: saved {name} to {} in {:.0} ms: {} MiB of RAM, {} KiB written, {} zero pages skipped",
                s.dir,
                t.elapsed().as_secs_f64() * 1000.0,
                s.memory_bytes >> 20,
                s.data_bytes >> 10,
                s.zero_pages_skipped
            );
            Ok(0)
        }
        SnapshotCmd::Load { dir, name } => {
            let abs = absolute_dir(&dir, &cwd);
            // On this host, resolve links as the local load does.
            let abs = match r.same_host() {
                true => std::fs::canonicalize(&abs).unwrap_or(abs),
                false => abs,
            };
            let m: Master = r
                .post(
                    "/v1/masters:load",
                    &json!({ "dir": abs.display().to_string(), "name": name }),
                )
                .map_err(say)
                .with_context(|| format!("loading {}", dir.display()))?;
            println!("{}", m.name);
            Ok(0)
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn args(host: Option<&str>, local: bool) -> TargetArgs {
        TargetArgs {
            host: host.map(String::from),
            token_file: None,
            local,
        }
    }

    #[test]
    fn named_daemons_parse() {
        let dir = tempfile::tempdir().unwrap();
        let d = |a: &TargetArgs, env| choose_with(a, env, dir.path()).unwrap();
        assert_eq!(
            d(&args(Some("unix:/run/zygote/zygote.sock"), false), None),
            Choice::Daemon(Daemon {
                endpoint: Endpoint::Unix("/run/zygote/zygote.sock".into()),
                state_dir: Some("/run/zygote".into()),
                named: true,
            })
        );
        // Another socket name says nothing about a state directory.
        assert_eq!(
            d(&args(Some("unix:/tmp/other.sock"), false), None),
            Choice::Daemon(Daemon {
                endpoint: Endpoint::Unix("/tmp/other.sock".into()),
                state_dir: None,
                named: true,
            })
        );
        assert_eq!(
            d(&args(None, false), Some("http://10.0.0.2:7070")),
            Choice::Daemon(Daemon {
                endpoint: Endpoint::Tcp("10.0.0.2:7070".into()),
                state_dir: None,
                named: true,
            })
        );
        // The flag wins over the environment; `local` and --local are local.
        assert!(matches!(
            d(&args(Some("http://h:1"), false), Some("unix:/x")),
            Choice::Daemon(Daemon { endpoint: Endpoint::Tcp(h), .. }) if h == "h:1"
        ));
        assert_eq!(d(&args(None, false), Some("local")), Choice::Local);
        assert_eq!(d(&args(Some("local"), false), None), Choice::Local);
        assert_eq!(d(&args(None, true), Some("http://h:1")), Choice::Local);
        // An empty variable is unset.
        assert_eq!(d(&args(None, false), Some("")), Choice::Local);
        assert!(choose_with(&args(Some("h"), false), None, dir.path()).is_err());
        assert!(choose_with(&args(Some("https://h:1"), false), None, dir.path()).is_err());
    }

    #[test]
    fn a_listening_socket_is_a_daemon_and_a_stale_one_is_not() {
        let dir = tempfile::tempdir().unwrap();
        let sock = dir.path().join("zygote.sock");
        // No socket: local.
        assert_eq!(
            choose_with(&args(None, false), None, dir.path()).unwrap(),
            Choice::Local
        );
        // A daemon listens: remote, on that socket and state directory.
        let listener = std::os::unix::net::UnixListener::bind(&sock).unwrap();
        assert_eq!(
            choose_with(&args(None, false), None, dir.path()).unwrap(),
            Choice::Daemon(Daemon {
                endpoint: Endpoint::Unix(sock.clone()),
                state_dir: Some(dir.path().to_path_buf()),
                named: false,
            })
        );
        // --local still means local.
        assert_eq!(
            choose_with(&args(None, true), None, dir.path()).unwrap(),
            Choice::Local
        );
        // The daemon died and left its socket file: local.
        drop(listener);
        assert!(sock.exists());
        assert_eq!(
            choose_with(&args(None, false), None, dir.path()).unwrap(),
            Choice::Local
        );
        // A plain file of that name is no daemon either.
        std::fs::remove_file(&sock).unwrap();
        std::fs::write(&sock, b"").unwrap();
        assert_eq!(
            choose_with(&args(None, false), None, dir.path()).unwrap(),
            Choice::Local
        );
    }

    #[test]
    fn tokens_come_from_the_file_first() {
        let dir = tempfile::tempdir().unwrap();
        let f = dir.path().join("token");
        std::fs::write(&f, "s3cret\n").unwrap();
        assert_eq!(
            token(Some(&f), Some("env".into())).unwrap().as_deref(),
            Some("s3cret")
        );
        assert_eq!(
            token(None, Some(" env ".into())).unwrap().as_deref(),
            Some("env")
        );
        assert_eq!(token(None, Some("".into())).unwrap(), None);
        assert_eq!(token(None, None).unwrap(), None);
        std::fs::write(&f, "\n").unwrap();
        assert!(token(Some(&f), None).is_err());
        assert!(token(Some(&dir.path().join("missing")), None).is_err());
    }

    #[test]
    fn dirs_become_absolute() {
        let cwd = Path::new("/home/u/work");
        assert_eq!(
            absolute_dir(Path::new("snap"), cwd),
            PathBuf::from("/home/u/work/snap")
        );
        assert_eq!(
            absolute_dir(Path::new("./a/../b"), cwd),
            PathBuf::from("/home/u/work/b")
        );
        assert_eq!(
            absolute_dir(Path::new("../../x"), cwd),
            PathBuf::from("/home/x")
        );
        assert_eq!(
            absolute_dir(Path::new("/abs/./d/"), cwd),
            PathBuf::from("/abs/d")
        );
        assert_eq!(absolute_dir(Path::new("/.."), cwd), PathBuf::from("/"));
    }

    #[test]
    fn field_errors_name_the_flags() {
        assert_eq!(
            flag_names("warmup_timeout_s must be 1..=3600 (got 5000)"),
            "--warmup-timeout must be 1..=3600 (got 5000)"
        );
        assert_eq!(
            flag_names("memory_mib must be 16..=65536 (got 8)"),
            "--memory must be 16..=65536 (got 8)"
        );
        assert_eq!(
            flag_names("vcpus must be 1..=32 (got 0)"),
            "--vcpus must be 1..=32 (got 0)"
        );
    }

    #[test]
    fn states_read_as_locally() {
        assert_eq!(state_text("running", None), "running");
        assert_eq!(state_text("starting", Some("x")), "starting");
        assert_eq!(
            state_text("exited", Some("guest shut down")),
            "exited: guest shut down"
        );
        assert_eq!(state_text("failed", None), "failed");
    }

    #[test]
    fn missing_objects_are_said_as_locally() {
        let api = |status: u16, code: &str, message: &str| ClientError::Api {
            status: api::client::StatusCode::from_u16(status).unwrap(),
            code: code.into(),
            message: message.into(),
        };
        assert_eq!(
            no_clone(api(404, "not_found", "no instance \"x\""), "x").to_string(),
            "no clone \"x\" (see `zygote ps`)"
        );
        assert_eq!(
            no_master(api(404, "not_found", "no master \"m\""), "m").to_string(),
            "no master named \"m\" (see `zygote master ls`)"
        );
        // A missing route is not a missing object.
        assert_eq!(
            no_clone(
                api(404, "not_found", "no such route (see /v1/openapi.json)"),
                "x"
            )
            .to_string(),
            "no such route (see /v1/openapi.json)"
        );
        assert_eq!(
            say(api(409, "conflict", "instance x is exited")).to_string(),
            "instance x is exited"
        );
    }

    #[test]
    fn record_fields_are_kept() {
        let dir = tempfile::tempdir().unwrap();
        let snap = dir.path().join("masters/demo/snapshot");
        std::fs::create_dir_all(&snap).unwrap();
        let fields = serde_json::json!({
            "name": "demo", "status": "frozen", "memory_mib": 256, "vcpus": 1,
            "warmup": null, "clones_alive": 2, "boot_ms": 10.0, "warmup_ms": null,
            "created_unix_s": 1,
        });
        let m: Master = serde_json::from_value(fields.clone()).unwrap();
        let v = with_record_fields(fields.clone(), &m, Some(dir.path()));
        assert_eq!(v["version"], host::store::RECORD_VERSION);
        assert_eq!(v["snapshot"], snap.display().to_string());
        assert_eq!(v["boot_ms"], 10.0);
        // Not on this host: the field stays, empty.
        let v = with_record_fields(fields, &m, None);
        assert!(v["snapshot"].is_null());
        assert!(v.as_object().unwrap().contains_key("snapshot"));
    }

    #[test]
    fn stdin_is_forwarded_in_chunks_then_eof() {
        let data = vec![7u8; api::client::STDIN_CHUNK * 2 + 10];
        let (tx, mut rx) = tokio::sync::mpsc::channel(16);
        let d = data.clone();
        let t = std::thread::spawn(move || forward_stdin(std::io::Cursor::new(d), &tx));
        let mut got = Vec::new();
        let mut chunks = 0;
        loop {
            let c = rx.blocking_recv().expect("an EOF message before the end");
            if c.is_empty() {
                break;
            }
            assert!(c.len() <= api::client::STDIN_CHUNK);
            chunks += 1;
            got.extend(c);
        }
        t.join().unwrap();
        assert_eq!(got, data);
        assert!(chunks >= 3);
        assert!(rx.blocking_recv().is_none());
    }
}
