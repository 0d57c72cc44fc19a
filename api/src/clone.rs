//! Clones: VMM processes restored from a master's snapshot, each with its
//! own copy-on-write view of the master's RAM, its own vsock socket and its
//! own identity. A clone outlives the command that made it when detached.

use std::fs::File;
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use vmm::events::{now_us, Event};

use crate::agent::{fresh_identity, AgentClient, AgentError};
use crate::paths;
use crate::store::{
    process_start, unix_now, CloneRecord, MasterRecord, Store, StoreError, RECORD_VERSION,
};

/// Errors starting or managing clones.
#[derive(Debug, thiserror::Error)]
pub enum CloneError {
    /// The state directory.
    #[error(transparent)]
    Store(#[from] StoreError),
    /// Files zygote needs.
    #[error(transparent)]
    Paths(#[from] paths::PathError),
    /// The VMM could not be started.
    #[error("cannot start {path}: {source}")]
    Spawn {
        /// VMM binary.
        path: PathBuf,
        /// OS error.
        #[source]
        source: std::io::Error,
    },
    /// The clone's VMM ended before the clone was ready.
    #[error("clone {id} failed to start: {message}")]
    Died {
        /// Clone id.
        id: String,
        /// What the VMM said.
        message: String,
    },
    /// The clone's agent did not answer in time.
    #[error("clone {id}: the guest agent did not answer within {timeout:?} (last error: {last})")]
    Timeout {
        /// Clone id.
        id: String,
        /// How long we waited.
        timeout: Duration,
        /// The last connection error.
        last: String,
    },
    /// The agent refused the identity or the ping.
    #[error("clone {id}: {source}")]
    Agent {
        /// Clone id.
        id: String,
        /// Agent error.
        #[source]
        source: AgentError,
    },
    /// The clone is not running.
    #[error("clone {0} is not running (see `zygote ps`; `zygote kill {0}` removes it)")]
    NotRunning(String),
}

/// Host timestamps (CLOCK_MONOTONIC µs) of one clone's start.
#[derive(Debug, Clone, Copy, Default)]
pub struct CloneTimeline {
    /// Just before the VMM was spawned.
    pub spawn_us: u64,
    /// The VMM's `main` ran.
    pub started_us: Option<u64>,
    /// vCPU 0 resumed the guest.
    pub vcpu_running_us: Option<u64>,
    /// The agent's hello arrived over a new vsock connection.
    pub connected_us: u64,
    /// The agent took the clone's identity.
    pub identity_us: u64,
    /// The agent answered a ping.
    pub ping_us: u64,
}

/// A clone that answered.
pub struct Started {
    /// Its id (and hostname).
    pub id: String,
    /// The VMM process id.
    pub pid: u32,
    /// When each phase ended.
    pub timeline: CloneTimeline,
    /// The connection the ping went over (open, ready for requests).
    pub agent: AgentClient,
    child: Option<Child>,
}

impl Started {
    /// Gives up the process handle: the clone keeps running on its own.
    pub fn release(&mut self) {
        self.child.take();
    }

    /// The VMM child process, when this process started it.
    pub fn child_mut(&mut self) -> Option<&mut Child> {
        self.child.as_mut()
    }
}

/// How to start clones.
#[derive(Debug, Clone)]
pub struct CloneOptions {
    /// Outlive the calling process (new session, no parent-death signal).
    pub detach: bool,
    /// How long a clone may take to answer.
    pub timeout: Duration,
    /// How many clones to bring up at once.
    pub parallel: usize,
}

fn random_suffix() -> String {
    let mut b = [0u8; 4];
    // SAFETY: the pointer and length describe `b`.
    let n = unsafe { libc::getrandom(b.as_mut_ptr().cast(), b.len(), 0) };
    if n != b.len() as isize {
        let t = now_us() ^ u64::from(std::process::id()) << 32;
        b.copy_from_slice(&t.to_le_bytes()[..4]);
    }
    b.iter().map(|x| format!("{x:02x}")).collect()
}

/// A clone's VMM, spawned but not yet answering.
struct Spawned {
    id: String,
    dir: PathBuf,
    child: Child,
    spawn_us: u64,
}

fn spawn_one(store: &Store, master: &MasterRecord, detach: bool) -> Result<Spawned, CloneError> {
    let vmm = paths::vmm_binary()?;
    let (id, dir) = loop {
        let id = format!("{}-{}", master.name, random_suffix());
        match store.new_clone_dir(&id) {
            Ok(dir) => break (id, dir),
            Err(StoreError::Io { source, .. })
                if source.kind() == std::io::ErrorKind::AlreadyExists =>
            {
                continue
            }
            Err(e) => return Err(e.into()),
        }
    };
    let file = |name: &str| -> Result<File, CloneError> {
        File::create(dir.join(name)).map_err(|source| {
            CloneError::Store(StoreError::Io {
                path: dir.join(name),
                source,
            })
        })
    };
    let mut cmd = Command::new(&vmm);
    cmd.arg("--restore")
        .arg(&master.snapshot)
        .arg("--vsock")
        .arg(dir.join("vsock.sock"))
        .arg("--console")
        .arg(dir.join("console.log"))
        .stdin(Stdio::null())
        .stdout(file("events.jsonl")?)
        .stderr(file("vmm.log")?);
    if detach {
        cmd.arg("--detach");
        // SAFETY: setsid is async-signal-safe and touches no memory.
        unsafe {
            cmd.pre_exec(|| {
                libc::setsid();
                Ok(())
            });
        }
    }
    let spawn_us = now_us();
    let child = match cmd.spawn() {
        Ok(c) => c,
        Err(source) => {
            let _ = std::fs::remove_dir_all(&dir);
            return Err(CloneError::Spawn { path: vmm, source });
        }
    };
    let rec = CloneRecord {
        version: RECORD_VERSION,
        id: id.clone(),
        master: master.name.clone(),
        pid: child.id(),
        pid_start: process_start(child.id()).unwrap_or(0),
        created_unix_s: unix_now(),
    };
    let mut s = Spawned {
        id,
        dir,
        child,
        spawn_us,
    };
    if let Err(e) = crate::store::write_record(&s.dir.join("clone.json"), &rec) {
        discard(&mut s);
        return Err(e.into());
    }
    Ok(s)
}

fn discard(s: &mut Spawned) {
    let _ = s.child.kill();
    let _ = s.child.wait();
    let _ = std::fs::remove_dir_all(&s.dir);
}

/// The events a clone's VMM wrote so far.
pub fn read_events(dir: &Path) -> Vec<Event> {
    std::fs::read_to_string(dir.join("events.jsonl"))
        .unwrap_or_default()
        .lines()
        .filter_map(|l| serde_json::from_str(l).ok())
        .collect()
}

fn exit_message(dir: &Path) -> String {
    read_events(dir)
        .into_iter()
        .find_map(|e| match e {
            Event::Exit {
                reason, message, ..
            } => Some(format!("{message} ({reason:?})")),
            _ => None,
        })
        .unwrap_or_else(|| {
            let log = std::fs::read_to_string(dir.join("vmm.log")).unwrap_or_default();
            let last = log
                .lines()
                .last()
                .unwrap_or("the VMM ended without saying why");
            last.to_string()
        })
}

/// Waits for the spawned clone's agent, gives it its identity, pings it.
fn handshake(mut s: Spawned, timeout: Duration) -> Result<Started, CloneError> {
    let deadline = Instant::now() + timeout;
    let uds = s.dir.join("vsock.sock");
    let mut last = String::from("no vsock socket yet");
    let (agent, [connected_us, identity_us, ping_us]) = loop {
        if let Ok(Some(_)) = s.child.try_wait() {
            let message = exit_message(&s.dir);
            let _ = std::fs::remove_dir_all(&s.dir);
            return Err(CloneError::Died { id: s.id, message });
        }
        if Instant::now() >= deadline {
            discard(&mut s);
            return Err(CloneError::Timeout {
                id: s.id,
                timeout,
                last,
            });
        }
        if uds.exists() {
            let left = deadline.saturating_duration_since(Instant::now());
            let id = s.id.clone();
            match AgentClient::connect_identified(&uds, || fresh_identity(&id, &id), left) {
                Ok(r) => break r,
                // The agent refused the identity, or no entropy could be
                // read: no point in retrying.
                Err(source @ (AgentError::Remote { .. } | AgentError::Output(_))) => {
                    discard(&mut s);
                    return Err(CloneError::Agent { id: s.id, source });
                }
                Err(e) => last = e.to_string(),
            }
        }
        std::thread::sleep(Duration::from_micros(500));
    };
    let mut timeline = CloneTimeline {
        spawn_us: s.spawn_us,
        connected_us,
        identity_us,
        ping_us,
        ..Default::default()
    };
    for e in read_events(&s.dir) {
        match e {
            Event::Started { t_us } => timeline.started_us = Some(t_us),
            Event::VcpuRunning { t_us } => timeline.vcpu_running_us = Some(t_us),
            _ => {}
        }
    }
    Ok(Started {
        pid: s.child.id(),
        id: s.id,
        timeline,
        agent,
        child: Some(s.child),
    })
}

/// Starts `count` clones of master `name`, `opts.parallel` at a time. Each
/// result is one clone; a clone that fails leaves nothing behind.
pub fn start(
    store: &Store,
    name: &str,
    count: usize,
    opts: &CloneOptions,
) -> Result<Vec<Result<Started, CloneError>>, CloneError> {
    let master = store.master(name)?;
    let mut results = Vec::with_capacity(count);
    let parallel = opts.parallel.max(1);
    let mut left = count;
    while left > 0 {
        let batch = left.min(parallel);
        left -= batch;
        // Spawned from this thread: a child's parent-death signal follows
        // the thread that forked it.
        let spawned: Vec<Result<Spawned, CloneError>> = (0..batch)
            .map(|_| spawn_one(store, &master, opts.detach))
            .collect();
        let timeout = opts.timeout;
        let done: Vec<Result<Started, CloneError>> = std::thread::scope(|scope| {
            let handles: Vec<_> = spawned
                .into_iter()
                .map(|s| scope.spawn(move || s.and_then(|s| handshake(s, timeout))))
                .collect();
            handles
                .into_iter()
                .map(|h| {
                    h.join().unwrap_or_else(|_| {
                        Err(CloneError::NotRunning("(handshake thread panicked)".into()))
                    })
                })
                .collect()
        });
        results.extend(done);
    }
    Ok(results)
}

/// A live clone's agent.
pub fn connect(store: &Store, id: &str) -> Result<AgentClient, CloneError> {
    let rec = store.clone_record(id)?;
    if !rec.alive() {
        return Err(CloneError::NotRunning(id.to_string()));
    }
    AgentClient::connect(&store.clone_dir(id).join("vsock.sock")).map_err(|source| {
        CloneError::Agent {
            id: id.to_string(),
            source,
        }
    })
}

/// Kills clone `id` (if it still runs) and removes its files.
pub fn kill(store: &Store, id: &str) -> Result<(), CloneError> {
    let rec = store.clone_record(id)?;
    if rec.alive() {
        // SAFETY: kill(2) on a pid we checked is the clone's VMM.
        unsafe { libc::kill(rec.pid as libc::pid_t, libc::SIGKILL) };
        let deadline = Instant::now() + Duration::from_secs(5);
        while rec.alive() && Instant::now() < deadline {
            std::thread::sleep(Duration::from_millis(2));
        }
    }
    let dir = store.clone_dir(id);
    std::fs::remove_dir_all(&dir).map_err(|source| StoreError::Io { path: dir, source })?;
    Ok(())
}

/// What `ps` shows for one clone.
#[derive(Debug, Clone, serde::Serialize)]
pub struct CloneStatus {
    /// Id.
    pub id: String,
    /// Master.
    pub master: String,
    /// VMM pid.
    pub pid: u32,
    /// `running`, or `exited: <why>`.
    pub state: String,
    /// Seconds since it started.
    pub age_s: u64,
    /// Memory only this clone uses: Private_Dirty of the VMM process (its
    /// copy-on-write guest pages plus the VMM's own heap and stacks), KiB.
    /// Guest pages it only read are the master's page cache, shared by
    /// every clone, and counted in `pss_kib` only.
    pub private_kib: Option<u64>,
    /// Proportional set size of the VMM process, KiB.
    pub pss_kib: Option<u64>,
}

/// A field of /proc/PID/smaps_rollup, in KiB.
pub fn smaps_rollup(pid: u32, field: &str) -> Option<u64> {
    let text = std::fs::read_to_string(format!("/proc/{pid}/smaps_rollup")).ok()?;
    text.lines()
        .find(|l| l.starts_with(field) && l[field.len()..].starts_with(':'))
        .and_then(|l| l.split_whitespace().nth(1))
        .and_then(|v| v.parse().ok())
}

/// Every clone in the store.
pub fn ps(store: &Store) -> Vec<Result<CloneStatus, StoreError>> {
    let now = unix_now();
    store
        .clones()
        .into_iter()
        .map(|r| {
            r.map(|rec| {
                let alive = rec.alive();
                CloneStatus {
                    state: if alive {
                        "running".into()
                    } else {
                        format!("exited: {}", exit_message(&store.clone_dir(&rec.id)))
                    },
                    private_kib: alive
                        .then(|| smaps_rollup(rec.pid, "Private_Dirty"))
                        .flatten(),
                    pss_kib: alive.then(|| smaps_rollup(rec.pid, "Pss")).flatten(),
                    age_s: now.saturating_sub(rec.created_unix_s),
                    id: rec.id,
                    master: rec.master,
                    pid: rec.pid,
                }
            })
        })
        .collect()
}

/// One clone of [`spawn_burst`].
#[derive(Debug, Clone)]
pub struct BurstClone {
    /// Its id (kill it with [`kill`]).
    pub id: String,
    /// When its VMM was spawned (CLOCK_MONOTONIC µs).
    pub spawn_us: u64,
    /// When its vCPU 0 resumed the guest, if it did within the timeout.
    pub running_us: Option<u64>,
}

/// Starts `count` clones of master `name` as fast as this host can, without
/// waiting for their agents: measures the host's side of clone creation
/// (process, mapping, KVM and device restore). The clones get no identity:
/// they are for measuring only, and the caller kills them.
pub fn spawn_burst(
    store: &Store,
    name: &str,
    count: usize,
    timeout: Duration,
) -> Result<Vec<BurstClone>, CloneError> {
    let master = store.master(name)?;
    let mut spawned = Vec::with_capacity(count);
    for _ in 0..count {
        match spawn_one(store, &master, false) {
            Ok(s) => spawned.push(s),
            Err(e) => {
                for s in &mut spawned {
                    discard(s);
                }
                return Err(e);
            }
        }
    }
    let deadline = Instant::now() + timeout;
    let mut out: Vec<BurstClone> = spawned
        .iter()
        .map(|s| BurstClone {
            id: s.id.clone(),
            spawn_us: s.spawn_us,
            running_us: None,
        })
        .collect();
    while Instant::now() < deadline && out.iter().any(|c| c.running_us.is_none()) {
        for (c, s) in out.iter_mut().zip(&spawned) {
            if c.running_us.is_none() {
                c.running_us = read_events(&s.dir).into_iter().find_map(|e| match e {
                    Event::VcpuRunning { t_us } => Some(t_us),
                    _ => None,
                });
            }
        }
        std::thread::sleep(Duration::from_millis(1));
    }
    Ok(out)
}
