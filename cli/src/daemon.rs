//! `zygote daemon`: serves the HTTP API (the `api` crate) for the host
//! runtime of one state directory, on a Unix socket (default
//! `STATE_DIR/zygote.sock`, mode 0660: the caller is the host's admin) and,
//! with a tokens file, on TCP.

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, RwLock};

use anyhow::{bail, Context};
use api::auth::{SharedTokens, Tokens, Transport};
use api::join::{Agent, JoinConfig};
use api::{AppState, HttpMetrics};
use axum::Extension;
use host::metrics::Metrics;
use host::runtime::{Runtime, RuntimeConfig};
use host::store::Store;
use prometheus_client::registry::Registry;

/// Where the daemon listens.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Listen {
    /// A Unix socket.
    Unix(PathBuf),
    /// A TCP address.
    Tcp(SocketAddr),
}

impl std::str::FromStr for Listen {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        if let Some(p) = s.strip_prefix("unix:") {
            if p.is_empty() {
                return Err("unix: needs a path".into());
            }
            return Ok(Listen::Unix(p.into()));
        }
        s.parse::<SocketAddr>()
            .map(Listen::Tcp)
            .map_err(|_| format!("{s:?}: use unix:PATH or ADDR:PORT (e.g. 127.0.0.1:7070)"))
    }
}

/// What happens to clones when the daemon is told to stop.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum OnShutdown {
    /// Leave them running; the next daemon adopts them.
    Leave,
    /// Kill them.
    Stop,
}

/// `zygote daemon` options.
#[derive(clap::Args, Debug)]
pub struct DaemonArgs {
    /// Where to listen: `unix:PATH` or `ADDR:PORT`; may be given more than
    /// once (default: unix:STATE_DIR/zygote.sock). TCP needs --tokens
    /// unless the address is loopback.
    #[arg(long)]
    pub listen: Vec<Listen>,
    /// Tokens file: `TOKEN TENANT [max_instances=N] [max_memory_mib=M]`
    /// per line; reloaded on SIGHUP.
    #[arg(long)]
    pub tokens: Option<PathBuf>,
    /// State directory (default: the CLI's: $ZYGOTE_RUNTIME_DIR, else
    /// $XDG_RUNTIME_DIR/zygote, else /run/zygote for root).
    #[arg(long)]
    pub state_dir: Option<PathBuf>,
    /// Log format.
    #[arg(long, value_parser = ["text", "json"], default_value = "text")]
    pub log_format: String,
    /// What SIGTERM/SIGINT do with running clones.
    #[arg(long, value_enum, default_value_t = OnShutdown::Leave)]
    pub on_shutdown: OnShutdown,
    /// Clones that may be starting at once (429 beyond) [default: twice the
    /// CPUs, 2 to 64].
    #[arg(long)]
    pub max_starting: Option<usize>,
    /// Guest memory of live VMs may reach this many times host RAM.
    #[arg(long, default_value_t = 1.5)]
    pub memory_ratio: f64,
    /// Join a cluster: the scheduler's URL (`http://ADDR:PORT`), or every
    /// replica's, comma-separated (heartbeats fail over). Without it the
    /// daemon works alone.
    #[arg(long, value_name = "URL")]
    pub join: Option<String>,
    /// This host's zone (with --join).
    #[arg(long, default_value = "default", requires = "join")]
    pub zone: String,
    /// A label of this host, `KEY=VALUE` (with --join; repeatable), matched
    /// by apps' placement constraints.
    #[arg(long = "label", value_name = "KEY=VALUE", requires = "join")]
    pub labels: Vec<String>,
    /// This host's id in the cluster (default: the machine's hostname).
    #[arg(long, requires = "join")]
    pub host_id: Option<String>,
    /// The URL other daemons and the scheduler reach this daemon at
    /// (default: http:// + the first TCP --listen address).
    #[arg(long, value_name = "URL", requires = "join")]
    pub advertise: Option<String>,
    /// File holding the bearer token this daemon sends to the scheduler and
    /// to peer daemons.
    #[arg(long, value_name = "FILE")]
    pub peer_token_file: Option<PathBuf>,
}

/// Refuses a non-loopback TCP listener without tokens: anyone who reaches
/// it could run commands.
pub(crate) fn refuse_open_tcp(listens: &[Listen], have_tokens: bool) -> anyhow::Result<()> {
    for l in listens {
        if let Listen::Tcp(addr) = l {
            if !have_tokens && !addr.ip().is_loopback() {
                bail!(
                    "refusing to listen on {addr} without --tokens: anyone who reaches it could run commands in your VMs (use a loopback address, or give a tokens file)"
                );
            }
        }
    }
    Ok(())
}

fn join_config(
    a: &DaemonArgs,
    listens: &[Listen],
    token: Option<String>,
) -> anyhow::Result<Option<JoinConfig>> {
    let Some(url) = &a.join else { return Ok(None) };
    let mut labels = BTreeMap::new();
    for l in &a.labels {
        let Some((k, v)) = l.split_once('=') else {
            bail!("--label {l:?}: use KEY=VALUE");
        };
        if k.is_empty() {
            bail!("--label {l:?}: the key is empty");
        }
        labels.insert(k.to_string(), v.to_string());
    }
    let address = match &a.advertise {
        Some(u) => u.clone(),
        None => {
            let tcp = listens.iter().find_map(|l| match l {
                Listen::Tcp(addr) => Some(*addr),
                Listen::Unix(_) => None,
            });
            match tcp {
                Some(addr) if !addr.ip().is_unspecified() => format!("http://{addr}"),
                Some(addr) => bail!("--join: the daemon listens on {addr}; say with --advertise URL where peers reach it"),
                None => bail!("--join needs a TCP --listen address (peers fetch masters from it), or --advertise URL"),
            }
        }
    };
    let host_id = match &a.host_id {
        Some(h) => h.clone(),
        None => nix_hostname()?,
    };
    Ok(Some(JoinConfig {
        schedulers: url
            .split(',')
            .filter(|u| !u.is_empty())
            .map(str::to_string)
            .collect(),
        token,
        host_id,
        address,
        zone: a.zone.clone(),
        labels,
    }))
}

fn nix_hostname() -> anyhow::Result<String> {
    let name = std::fs::read_to_string("/proc/sys/kernel/hostname")
        .context("reading the hostname (or pass --host-id)")?;
    Ok(name.trim().to_string())
}

/// The Unix socket path of the daemon serving `state_dir`.
pub fn socket_path(state_dir: &std::path::Path) -> PathBuf {
    state_dir.join("zygote.sock")
}

pub(crate) fn init_logging(format: &str) {
    use tracing_subscriber::EnvFilter;
    let filter = EnvFilter::try_from_env("ZYGOTE_LOG").unwrap_or_else(|_| EnvFilter::new("info"));
    let b = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr);
    if format == "json" {
        b.json().init();
    } else {
        b.init();
    }
}

/// Runs the daemon until SIGTERM or SIGINT.
pub fn run(a: DaemonArgs) -> anyhow::Result<i32> {
    init_logging(&a.log_format);
    // Network slots kept ready for clones of masters with a NIC: as many
    // as may start at once (at least 4), so that a full batch of starts
    // finds them made.
    let max_starting = a
        .max_starting
        .unwrap_or_else(host::runtime::default_max_starting)
        .max(1);
    host::vmnet::configure_pool(max_starting.max(4));
    if !(a.memory_ratio > 0.0 && a.memory_ratio <= 100.0) {
        bail!("--memory-ratio must be in (0, 100]");
    }
    let state_dir = a
        .state_dir
        .clone()
        .unwrap_or_else(host::paths::runtime_root);
    std::fs::create_dir_all(&state_dir)
        .with_context(|| format!("creating state directory {}", state_dir.display()))?;
    let mut listens = a.listen.clone();
    if listens.is_empty() {
        listens.push(Listen::Unix(socket_path(&state_dir)));
    }
    let tokens = match &a.tokens {
        Some(p) => Tokens::load(p)?,
        None => Tokens::none(),
    };
    refuse_open_tcp(&listens, a.tokens.is_some())?;
    let peer_token = match &a.peer_token_file {
        Some(p) => Some(
            std::fs::read_to_string(p)
                .with_context(|| format!("reading --peer-token-file {}", p.display()))?
                .trim()
                .to_string(),
        ),
        None => None,
    };
    let join = join_config(&a, &listens, peer_token.clone())?;
    let tokens: SharedTokens = Arc::new(RwLock::new(tokens));
    let mut registry = Registry::default();
    let metrics = Arc::new(Metrics::new(&mut registry));
    let http = HttpMetrics::new(&mut registry);
    let cfg = RuntimeConfig {
        max_starting,
        memory_ratio: a.memory_ratio,
        ..Default::default()
    };
    let (runtime, adoption) = Runtime::open(Store::at(state_dir.clone()), cfg, metrics)?;
    tracing::info!(
        state_dir = %state_dir.display(),
        masters = adoption.masters,
        adopted = adoption.adopted,
        cleaned = adoption.cleaned,
        "runtime open"
    );
    let state = AppState {
        runtime: runtime.clone(),
        registry: Arc::new(registry),
        http,
        peer_token,
    };
    let rt = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .max_blocking_threads(1024)
        .build()?;
    let stop = Arc::new(AtomicBool::new(false));
    if let Some(cfg) = join {
        let agent = Agent::new(runtime.clone(), cfg)?;
        rt.spawn(agent.run(stop.clone()));
    }
    let result = rt.block_on(serve(move || api::app(state.clone()), listens, tokens));
    stop.store(true, Ordering::Relaxed);
    runtime.shutdown(a.on_shutdown == OnShutdown::Stop);
    tracing::info!(on_shutdown = ?a.on_shutdown, "stopped");
    result.map(|_| 0)
}

/// Serves the router `make_app` builds on every listener until SIGTERM or
/// SIGINT; SIGHUP reloads the tokens.
pub(crate) async fn serve(
    make_app: impl Fn() -> axum::Router,
    listens: Vec<Listen>,
    tokens: SharedTokens,
) -> anyhow::Result<()> {
    let (stop_tx, stop_rx) = tokio::sync::watch::channel(false);
    let mut servers = Vec::new();
    let mut sockets = Vec::new();
    for l in listens {
        let app = make_app().layer(Extension(tokens.clone()));
        let mut stop = stop_rx.clone();
        let shutdown = async move {
            let _ = stop.wait_for(|s| *s).await;
        };
        match l {
            Listen::Unix(path) => {
                if path.exists() {
                    if std::os::unix::net::UnixStream::connect(&path).is_ok() {
                        bail!("another daemon serves {} already", path.display());
                    }
                    std::fs::remove_file(&path)
                        .with_context(|| format!("removing stale socket {}", path.display()))?;
                }
                let listener = tokio::net::UnixListener::bind(&path)
                    .with_context(|| format!("binding {}", path.display()))?;
                use std::os::unix::fs::PermissionsExt;
                std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o660))?;
                tracing::info!(socket = %path.display(), "listening");
                sockets.push(path);
                let app = app.layer(Extension(Transport::Unix));
                servers.push(tokio::spawn(async move {
                    axum::serve(listener, app)
                        .with_graceful_shutdown(shutdown)
                        .await
                }));
            }
            Listen::Tcp(addr) => {
                let listener = tokio::net::TcpListener::bind(addr)
                    .await
                    .with_context(|| format!("binding {addr}"))?;
                tracing::info!(%addr, "listening");
                let app = app.layer(Extension(Transport::Tcp));
                servers.push(tokio::spawn(async move {
                    axum::serve(listener, app)
                        .with_graceful_shutdown(shutdown)
                        .await
                }));
            }
        }
    }
    use tokio::signal::unix::{signal, SignalKind};
    let mut term = signal(SignalKind::terminate())?;
    let mut int = signal(SignalKind::interrupt())?;
    let mut hup = signal(SignalKind::hangup())?;
    loop {
        tokio::select! {
            _ = term.recv() => break,
            _ = int.recv() => break,
            _ = hup.recv() => {
                let r = tokens.write().unwrap_or_else(|e| e.into_inner()).reload();
                match r {
                    Ok(n) => tracing::info!(tokens = n, "tokens reloaded"),
                    Err(e) => tracing::error!("tokens not reloaded (the old ones stay): {e}"),
                }
            }
        }
    }
    tracing::info!("stopping");
    let _ = stop_tx.send(true);
    for s in servers {
        let _ = tokio::time::timeout(std::time::Duration::from_secs(10), s).await;
    }
    for p in sockets {
        let _ = std::fs::remove_file(p);
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn listen_addresses_parse() {
        assert_eq!(
            "unix:/run/z.sock".parse::<Listen>().unwrap(),
            Listen::Unix("/run/z.sock".into())
        );
        assert!(matches!(
            "127.0.0.1:7070".parse::<Listen>().unwrap(),
            Listen::Tcp(_)
        ));
        assert!("[::1]:7070".parse::<Listen>().is_ok());
        assert!("unix:".parse::<Listen>().is_err());
        assert!("localhost"
            .parse::<Listen>()
            .unwrap_err()
            .contains("unix:PATH"));
    }
}
