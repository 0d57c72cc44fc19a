//! The cluster commands: `zygote scheduler` (serves the scheduler's API over
//! a store and runs the reconcile loop), and `zygote app …` / `zygote host
//! …`, thin clients of that API.

use std::collections::BTreeMap;
use std::fmt::Write as _;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, RwLock};
use std::time::Duration;

use anyhow::{bail, Context};
use api::auth::{SharedTokens, Tokens};
use api::client::{segment, Client, ClientError, Endpoint};
use api::cluster::{AppList, ClusterMetrics, ClusterState, HostList, Service};
use api::HttpMetrics;
use axum::http::Method;
use prometheus_client::registry::Registry;
use scheduler::service::{Config, Scheduler};
use scheduler::store::embedded::EmbeddedStore;
use scheduler::store::etcd::EtcdStore;
use scheduler::store::{Leadership, Store};
use scheduler::wire::{AppBody, AppStatus, HostView};
use serde::de::DeserializeOwned;

use crate::daemon::{init_logging, serve, Listen};

/// Where the scheduler keeps its state.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum StoreArg {
    /// `embedded:DIR`: one machine, a redb file under DIR.
    Embedded(PathBuf),
    /// `etcd:URL[,URL…]`.
    Etcd(Vec<String>),
}

impl std::str::FromStr for StoreArg {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        if let Some(dir) = s.strip_prefix("embedded:") {
            if dir.is_empty() {
                return Err("embedded: needs a directory".into());
            }
            return Ok(StoreArg::Embedded(dir.into()));
        }
        if let Some(urls) = s.strip_prefix("etcd:") {
            let urls: Vec<String> = urls
                .split(',')
                .filter(|u| !u.is_empty())
                .map(str::to_string)
                .collect();
            if urls.is_empty() {
                return Err("etcd: needs at least one URL".into());
            }
            return Ok(StoreArg::Etcd(urls));
        }
        Err(format!("{s:?}: use embedded:DIR or etcd:URL[,URL...]"))
    }
}

/// `zygote scheduler` options.
#[derive(clap::Args, Debug)]
pub struct SchedulerArgs {
    /// Where to listen: `ADDR:PORT` or `unix:PATH`; may be repeated
    /// (default 127.0.0.1:7080). A non-loopback address needs --tokens.
    #[arg(long)]
    pub listen: Vec<Listen>,
    /// The store: `embedded:DIR` (one machine; the default is
    /// embedded:STATE_DIR/scheduler) or `etcd:URL[,URL...]` (replicas, one
    /// leader by election).
    #[arg(long)]
    pub store: Option<StoreArg>,
    /// Tokens file (the daemon's format); an admin token line is
    /// `TOKEN admin`... see docs/user-guide.md. Reloaded on SIGHUP.
    #[arg(long)]
    pub tokens: Option<PathBuf>,
    /// State directory (default: the CLI's).
    #[arg(long)]
    pub state_dir: Option<PathBuf>,
    /// Log format.
    #[arg(long, value_parser = ["text", "json"], default_value = "text")]
    pub log_format: String,
    /// A host is lost this long after its last heartbeat, ms.
    #[arg(long, default_value_t = 4000)]
    pub lease_ttl_ms: u64,
    /// Hosts heartbeat this often, ms.
    #[arg(long, default_value_t = 1000)]
    pub heartbeat_ms: u64,
    /// A reconcile step runs this often, ms.
    #[arg(long, default_value_t = 500)]
    pub reconcile_ms: u64,
}

/// Runs the scheduler until SIGTERM or SIGINT.
pub fn run(a: SchedulerArgs) -> anyhow::Result<i32> {
    init_logging(&a.log_format);
    if a.heartbeat_ms == 0 || a.lease_ttl_ms <= a.heartbeat_ms {
        bail!("--lease-ttl-ms must be longer than --heartbeat-ms (and both above 0)");
    }
    let state_dir = a
        .state_dir
        .clone()
        .unwrap_or_else(host::paths::runtime_root);
    let mut listens = a.listen.clone();
    if listens.is_empty() {
        listens.push(Listen::Tcp("127.0.0.1:7080".parse()?));
    }
    let tokens = match &a.tokens {
        Some(p) => Tokens::load(p)?,
        None => Tokens::none(),
    };
    crate::daemon::refuse_open_tcp(&listens, a.tokens.is_some())?;
    let candidate = listens
        .iter()
        .find_map(|l| match l {
            Listen::Tcp(addr) => Some(format!("http://{addr}")),
            Listen::Unix(_) => None,
        })
        .unwrap_or_else(|| format!("pid {}", std::process::id()));
    // The store, and (etcd) a second connection that campaigns for the
    // lead. The embedded store is one process's file: it always leads.
    let (store, election): (Box<dyn Store>, Option<EtcdStore>) = match a
        .store
        .clone()
        .unwrap_or_else(|| StoreArg::Embedded(state_dir.join("scheduler")))
    {
        StoreArg::Embedded(dir) => (
            Box::new(
                EmbeddedStore::open(&dir)
                    .with_context(|| format!("opening the embedded store in {}", dir.display()))?,
            ),
            None,
        ),
        StoreArg::Etcd(urls) => {
            let store = EtcdStore::connect(&urls, None)
                .with_context(|| format!("connecting to etcd at {}", urls.join(",")))?;
            let election = EtcdStore::connect(&urls, None)
                .with_context(|| format!("connecting to etcd at {}", urls.join(",")))?;
            (Box::new(store), Some(election))
        }
    };
    let cfg = Config {
        lease_ttl: Duration::from_millis(a.lease_ttl_ms),
        heartbeat: Duration::from_millis(a.heartbeat_ms),
    };
    let service: Arc<Service> = Arc::new(Scheduler::new(store, cfg));
    let mut registry = Registry::default();
    let http = HttpMetrics::new(&mut registry);
    let metrics = ClusterMetrics::new(&mut registry);
    let state = ClusterState {
        service,
        registry: Arc::new(registry),
        http,
        metrics,
        leader: Arc::new(AtomicBool::new(election.is_none())),
    };
    if let Some(election) = election {
        let leader = state.leader.clone();
        let lease = Duration::from_millis(a.lease_ttl_ms.clamp(1000, 10_000));
        std::thread::Builder::new()
            .name("election".into())
            .spawn(move || campaign(election, candidate, lease, leader))?;
    }
    let tokens: SharedTokens = Arc::new(RwLock::new(tokens));
    let rt = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()?;
    let stop = Arc::new(AtomicBool::new(false));
    let every = Duration::from_millis(a.reconcile_ms.max(50));
    tracing::info!(
        lease_ttl_ms = a.lease_ttl_ms,
        heartbeat_ms = a.heartbeat_ms,
        "scheduler starting"
    );
    let result = rt.block_on(async {
        let looping = tokio::spawn(api::cluster::reconcile_loop(
            state.clone(),
            every,
            stop.clone(),
        ));
        let st = state.clone();
        let r = serve(move || api::cluster::router(st.clone()), listens, tokens).await;
        stop.store(true, Ordering::Relaxed);
        looping.abort();
        r
    });
    tracing::info!("stopped");
    result.map(|_| 0)
}

/// Campaigns for the lead forever: leads until the guard says it is lost,
/// then campaigns again. Only the leader runs the reconcile loop; every
/// replica serves the API and heartbeats (the store is shared).
fn campaign(election: EtcdStore, candidate: String, ttl: Duration, leader: Arc<AtomicBool>) {
    loop {
        match election.campaign(&candidate, ttl) {
            Ok(guard) => {
                tracing::info!(candidate = %candidate, "this replica leads");
                leader.store(true, Ordering::SeqCst);
                while guard.is_leader() {
                    std::thread::sleep(Duration::from_millis(100));
                }
                leader.store(false, Ordering::SeqCst);
                tracing::warn!(candidate = %candidate, "this replica lost the lead; campaigning again");
            }
            Err(e) => {
                tracing::warn!(error = %e, "campaign failed; retrying in 1 s");
                std::thread::sleep(Duration::from_secs(1));
            }
        }
    }
}

/// Where the app and host commands send their requests.
#[derive(clap::Args, Debug, Clone)]
pub struct SchedulerTarget {
    /// The scheduler's URL [default: $ZYGOTE_SCHEDULER, else http://127.0.0.1:7080].
    #[arg(long, value_name = "URL", global = true)]
    pub scheduler: Option<String>,
}

/// `zygote app …`.
#[derive(clap::Subcommand, Debug)]
pub enum AppCmd {
    /// Declare apps from a YAML (or JSON) file: one app, `{name, ...spec}`,
    /// or a list of them. Idempotent.
    Apply {
        /// The file (`-` for stdin).
        file: PathBuf,
    },
    /// List apps: desired vs running.
    Ls {
        /// JSON instead of a table.
        #[arg(long)]
        json: bool,
    },
    /// One app: per host, shortfall, events.
    Get {
        /// App name.
        name: String,
        /// JSON instead of text.
        #[arg(long)]
        json: bool,
    },
    /// Set an app's instance count.
    Scale {
        /// App name.
        name: String,
        /// Instances.
        instances: u32,
    },
    /// Remove an app; its instances stop everywhere.
    Rm {
        /// App name.
        name: String,
    },
}

/// `zygote host …`.
#[derive(clap::Subcommand, Debug)]
pub enum HostCmd {
    /// List the cluster's hosts.
    Ls {
        /// JSON instead of a table.
        #[arg(long)]
        json: bool,
    },
    /// Move a host's instances elsewhere and keep it empty.
    Drain {
        /// Host id.
        id: String,
    },
    /// Let a drained host take instances again.
    Undrain {
        /// Host id.
        id: String,
    },
}

struct Sched {
    client: Client,
    rt: tokio::runtime::Runtime,
    url: String,
}

impl Sched {
    fn new(target: &SchedulerTarget, token: Option<String>) -> anyhow::Result<Self> {
        let url = target
            .scheduler
            .clone()
            .or_else(|| std::env::var("ZYGOTE_SCHEDULER").ok())
            .unwrap_or_else(|| "http://127.0.0.1:7080".into());
        let endpoint = Endpoint::parse(&url).map_err(|_| {
            anyhow::anyhow!("--scheduler {url:?}: use http://HOST:PORT or unix:PATH")
        })?;
        Ok(Sched {
            client: Client::new(endpoint, token),
            rt: tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()?,
            url,
        })
    }

    fn call<T: DeserializeOwned>(
        &self,
        method: Method,
        path: &str,
        body: Option<&serde_json::Value>,
    ) -> anyhow::Result<T> {
        let bytes = body.map(|b| serde_json::to_vec(b).unwrap_or_default());
        let answer = self
            .rt
            .block_on(self.client.send(
                method,
                path,
                bytes.as_ref().map(|_| "application/json"),
                bytes.clone().unwrap_or_default(),
            ))
            .map_err(|e| self.say(e))?;
        answer.decode().map_err(|e| self.say(e))
    }

    fn call_empty(&self, method: Method, path: &str) -> anyhow::Result<()> {
        let answer = self
            .rt
            .block_on(self.client.send(method, path, None, Vec::new()))
            .map_err(|e| self.say(e))?;
        answer.ok().map_err(|e| self.say(e))
    }

    fn say(&self, e: ClientError) -> anyhow::Error {
        match e {
            ClientError::Api { message, .. } => anyhow::anyhow!("{message}"),
            ClientError::Connect { .. } => anyhow::anyhow!(
                "no scheduler answers at {} (start one with `zygote scheduler`, or pass --scheduler URL): {e}",
                self.url
            ),
            e => anyhow::anyhow!("{e}"),
        }
    }
}

/// One app in a file: its name and its spec.
#[derive(serde::Deserialize)]
struct NamedApp {
    name: String,
    #[serde(flatten)]
    spec: serde_json::Value,
}

/// Reads the apps of a YAML or JSON file: one `{name, ...}` or a list.
fn read_apps(file: &Path) -> anyhow::Result<Vec<(String, AppBody)>> {
    let text = if file == Path::new("-") {
        let mut s = String::new();
        std::io::Read::read_to_string(&mut std::io::stdin(), &mut s)?;
        s
    } else {
        std::fs::read_to_string(file).with_context(|| format!("reading {}", file.display()))?
    };
    let value: serde_json::Value = serde_yaml_ng::from_str(&text)
        .with_context(|| format!("{} is not YAML", file.display()))?;
    let list = match value {
        serde_json::Value::Array(v) => v,
        v => vec![v],
    };
    let mut out = Vec::new();
    for (i, v) in list.into_iter().enumerate() {
        let named: NamedApp = serde_json::from_value(v)
            .with_context(|| format!("{}: app {} has no `name`", file.display(), i + 1))?;
        let body: AppBody = serde_json::from_value(named.spec)
            .with_context(|| format!("{}: app {:?}", file.display(), named.name))?;
        out.push((named.name, body));
    }
    if out.is_empty() {
        bail!("{} declares no app", file.display());
    }
    Ok(out)
}

fn app_path(name: &str) -> String {
    format!("/v1/apps/{}", segment(name))
}

/// `zygote app …`.
pub fn app(target: &SchedulerTarget, token: Option<String>, cmd: AppCmd) -> anyhow::Result<i32> {
    let s = Sched::new(target, token)?;
    match cmd {
        AppCmd::Apply { file } => {
            for (name, body) in read_apps(&file)? {
                let v = serde_json::to_value(&body)?;
                let st: AppStatus = s.call(Method::PUT, &app_path(&name), Some(&v))?;
                println!(
                    "app {}: generation {}, {} desired, {} running, {} starting",
                    st.name, st.generation, st.desired, st.running, st.starting
                );
            }
        }
        AppCmd::Ls { json } => {
            let list: AppList = s.call(Method::GET, "/v1/apps", None)?;
            if json {
                println!("{}", serde_json::to_string_pretty(&list.apps)?);
            } else {
                print!("{}", apps_table(&list.apps));
            }
        }
        AppCmd::Get { name, json } => {
            let st: AppStatus = s.call(Method::GET, &app_path(&name), None)?;
            if json {
                println!("{}", serde_json::to_string_pretty(&st)?);
            } else {
                print!("{}", app_text(&st));
            }
        }
        AppCmd::Scale { name, instances } => {
            let body = serde_json::json!({ "instances": instances });
            let st: AppStatus = s.call(
                Method::POST,
                &format!("{}/scale", app_path(&name)),
                Some(&body),
            )?;
            println!("app {}: {} desired", st.name, st.desired);
        }
        AppCmd::Rm { name } => {
            s.call_empty(Method::DELETE, &app_path(&name))?;
            println!("app {name} removed; its instances stop");
        }
    }
    Ok(0)
}

/// `zygote host …`.
pub fn host(target: &SchedulerTarget, token: Option<String>, cmd: HostCmd) -> anyhow::Result<i32> {
    let s = Sched::new(target, token)?;
    match cmd {
        HostCmd::Ls { json } => {
            let list: HostList = s.call(Method::GET, "/v1/hosts", None)?;
            if json {
                println!("{}", serde_json::to_string_pretty(&list.hosts)?);
            } else {
                print!("{}", hosts_table(&list.hosts));
            }
        }
        HostCmd::Drain { id } => {
            let h: HostView = s.call(
                Method::POST,
                &format!("/v1/hosts/{}/drain", segment(&id)),
                Some(&serde_json::json!({})),
            )?;
            println!("host {}: {}", h.id, h.state);
        }
        HostCmd::Undrain { id } => {
            let h: HostView = s.call(
                Method::POST,
                &format!("/v1/hosts/{}/undrain", segment(&id)),
                Some(&serde_json::json!({})),
            )?;
            println!("host {}: {}", h.id, h.state);
        }
    }
    Ok(0)
}

fn apps_table(apps: &[AppStatus]) -> String {
    let mut s = format!(
        "{:<24} {:<16} {:>7} {:>7} {:>8}  SHORTFALL\n",
        "NAME", "MASTER", "DESIRED", "RUNNING", "STARTING"
    );
    for a in apps {
        let _ = writeln!(
            s,
            "{:<24} {:<16} {:>7} {:>7} {:>8}  {}",
            a.name,
            a.spec.master.name,
            a.desired,
            a.running,
            a.starting,
            a.shortfall
                .as_ref()
                .map_or("-".into(), |f| f.message.clone())
        );
    }
    s
}

fn app_text(a: &AppStatus) -> String {
    let mut s = format!(
        "app {} (generation {}): master {}, {} desired, {} running, {} starting\n",
        a.name, a.generation, a.spec.master.name, a.desired, a.running, a.starting
    );
    if let Some(f) = &a.shortfall {
        let _ = writeln!(s, "shortfall ({}): {}", f.reason, f.message);
    }
    let _ = writeln!(
        s,
        "master frozen on: {}",
        if a.master_hosts.is_empty() {
            "-".into()
        } else {
            a.master_hosts.join(", ")
        }
    );
    let _ = writeln!(s, "{:<20} {:>7} {:>8}", "HOST", "RUNNING", "STARTING");
    for (h, c) in &a.per_host {
        let _ = writeln!(s, "{:<20} {:>7} {:>8}", h, c.running, c.starting);
    }
    if !a.events.is_empty() {
        let _ = writeln!(s, "events:");
        for e in &a.events {
            let _ = writeln!(
                s,
                "  {} {:<9} {}{}{}",
                e.at_ms,
                e.action,
                e.slot.map_or(String::new(), |x| format!("slot {x} ")),
                e.host
                    .as_ref()
                    .map_or(String::new(), |h| format!("on {h}: ")),
                e.reason
            );
        }
    }
    s
}

fn hosts_table(hosts: &[HostView]) -> String {
    let mut s = format!(
        "{:<16} {:<9} {:<10} {:>10} {:>10} {:>6} {:>9}  MASTERS\n",
        "ID", "STATE", "ZONE", "MEM FREE", "INSTANCES", "SLOTS", "LEASE"
    );
    for h in hosts {
        let n: u32 = h.instances.values().map(|c| c.running + c.starting).sum();
        let masters: BTreeMap<&str, &str> = h
            .masters
            .iter()
            .map(|(k, v)| (k.as_str(), v.as_str()))
            .collect();
        let _ = writeln!(
            s,
            "{:<16} {:<9} {:<10} {:>7}MiB {:>10} {:>6} {:>8}s  {}",
            h.id,
            h.state,
            h.zone,
            h.capacity.memory_free_mib,
            n,
            format!("{}/{}", h.capacity.start_slots_free, h.capacity.start_slots),
            format!("{:.1}", h.lease_age_ms as f64 / 1000.0),
            masters
                .iter()
                .map(|(k, v)| format!("{k}:{v}"))
                .collect::<Vec<_>>()
                .join(",")
        );
    }
    s
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn store_arguments_parse() {
        assert_eq!(
            "embedded:/var/lib/z".parse::<StoreArg>().unwrap(),
            StoreArg::Embedded("/var/lib/z".into())
        );
        assert_eq!(
            "etcd:http://a:2379,http://b:2379"
                .parse::<StoreArg>()
                .unwrap(),
            StoreArg::Etcd(vec!["http://a:2379".into(), "http://b:2379".into()])
        );
        assert!("etcd:".parse::<StoreArg>().is_err());
        assert!("redis:x"
            .parse::<StoreArg>()
            .unwrap_err()
            .contains("embedded:DIR"));
    }

    #[test]
    fn app_files_take_one_app_or_a_list() {
        let dir = tempfile::tempdir().unwrap();
        let one = dir.path().join("one.yaml");
        std::fs::write(
            &one,
            "name: web\nmaster:\n  name: py\n  memory_mib: 128\ninstances: 30\nplacement:\n  strategy: spread\n  constraints: [\"zone in (a,b)\"]\n",
        )
        .unwrap();
        let apps = read_apps(&one).unwrap();
        assert_eq!(apps.len(), 1);
        assert_eq!(apps[0].0, "web");
        assert_eq!(apps[0].1.instances, 30);
        assert_eq!(apps[0].1.placement.constraints, ["zone in (a,b)"]);

        let two = dir.path().join("two.yaml");
        std::fs::write(
            &two,
            "- name: a\n  master: {name: m}\n  instances: 1\n- name: b\n  master: {name: m}\n  instances: 2\n",
        )
        .unwrap();
        assert_eq!(read_apps(&two).unwrap().len(), 2);

        let bad = dir.path().join("bad.yaml");
        std::fs::write(
            &bad,
            "name: a\nmaster: {name: m}\ninstances: 1\ncolour: red\n",
        )
        .unwrap();
        let e = format!("{:#}", read_apps(&bad).unwrap_err());
        assert!(e.contains("colour"), "{e}");
        let nameless = dir.path().join("nameless.yaml");
        std::fs::write(&nameless, "master: {name: m}\ninstances: 1\n").unwrap();
        let e = format!("{:#}", read_apps(&nameless).unwrap_err());
        assert!(e.contains("no `name`"), "{e}");
    }
}
