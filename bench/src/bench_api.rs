//! `zygote bench api`: what the daemon's HTTP layer costs, measured like
//! with like in one run against a real `zygote daemon` and real clones:
//!
//! - a clone over HTTP (`POST /v1/instances`, count 1) against the same
//!   clone started through the `host` library in this process, alternating,
//!   each timed from the call to its agent's first answer;
//! - `GET /v1/instances/{id}/health` against the agent ping it wraps (over
//!   a connection this process keeps to the same clone);
//! - `GET /v1/instances/{id}` at a target rate while clones start;
//! - the daemon's own RSS with N live clones.
//!
//! It must not: measure anything through a path the product does not take
//! (the daemon is the real binary; the direct path is `host::clone::start`).

use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::sync::Arc;
use std::time::{Duration, Instant};

use api::client::{Client, Endpoint};
use host::agent::AgentClient;
use host::clone::CloneOptions;
use host::store::Store;
use serde::Serialize;

use crate::stats::{percentile, Summary};

/// Options.
#[derive(Debug, Clone)]
pub struct ApiBenchOptions {
    /// Master RAM, MiB.
    pub memory_mib: u64,
    /// Clones each way (HTTP and direct), alternating.
    pub count: usize,
    /// Health and ping samples each.
    pub pings: usize,
    /// Target rate of `GET /v1/instances/{id}`, per second.
    pub rate: u64,
    /// How long the GET load lasts.
    pub duration: Duration,
    /// Live clones for the RSS measurement (0: skip).
    pub density: usize,
    /// How long the master's cold boot may take.
    pub boot_timeout: Duration,
}

/// What one run measured (ms unless named otherwise).
#[derive(Debug, Clone, Default, Serialize)]
pub struct ApiReport {
    /// Clone to agent answered, over HTTP (client side).
    pub clone_http_ms: Option<Summary>,
    /// Clone to agent answered, through `host::clone::start`.
    pub clone_direct_ms: Option<Summary>,
    /// p50 difference of the wall times, HTTP − direct (guest time varies
    /// from clone to clone; see the next two fields for the layer alone).
    pub clone_overhead_p50_ms: Option<f64>,
    /// Per HTTP clone: client wall time − the daemon's spawn→ping time.
    pub clone_http_outside_ms: Option<Summary>,
    /// Per direct clone: call wall time − its spawn→ping time.
    pub clone_direct_outside_ms: Option<Summary>,
    /// p50 of the first minus p50 of the second: what HTTP adds to a clone.
    pub clone_http_layer_p50_ms: Option<f64>,
    /// `GET .../health` round trip (client side).
    pub health_http_ms: Option<Summary>,
    /// The agent ping it wraps, on a kept connection.
    pub ping_direct_ms: Option<Summary>,
    /// p50 difference of the wall times, health − ping.
    pub health_overhead_p50_ms: Option<f64>,
    /// Per health request: client wall time − the ping time the daemon
    /// measured inside it: what HTTP adds to a ping.
    pub health_http_layer_ms: Option<Summary>,
    /// Target GET rate.
    pub get_target_per_s: u64,
    /// GETs answered 200 per second, achieved.
    pub get_achieved_per_s: f64,
    /// GET latency p50.
    pub get_p50_ms: Option<f64>,
    /// GET latency p99.
    pub get_p99_ms: Option<f64>,
    /// GETs that failed or were not 200.
    pub get_errors: u64,
    /// Clones started during the GET load.
    pub clones_during_load: usize,
    /// Live clones when the daemon's RSS was read.
    pub density_clones: usize,
    /// The daemon's RSS then, KiB.
    pub daemon_rss_kib: Option<u64>,
    /// The daemon's RSS with no clone, KiB.
    pub daemon_rss_idle_kib: Option<u64>,
    /// What went wrong along the way.
    pub errors: Vec<String>,
}

/// A daemon this benchmark started (killed on drop, its state removed).
struct Daemon {
    child: Child,
    dir: PathBuf,
    client: Client,
}

impl Drop for Daemon {
    fn drop(&mut self) {
        // SIGTERM with --on-shutdown stop kills its clones too.
        let _ = Command::new("kill")
            .arg("-TERM")
            .arg(self.child.id().to_string())
            .status();
        let deadline = Instant::now() + Duration::from_secs(20);
        while Instant::now() < deadline {
            if let Ok(Some(_)) = self.child.try_wait() {
                break;
            }
            std::thread::sleep(Duration::from_millis(50));
        }
        let _ = self.child.kill();
        let _ = self.child.wait();
        let store = Store::at(self.dir.clone());
        for c in store.clones().into_iter().flatten() {
            let _ = host::clone::kill(&store, &c.id);
        }
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

fn zygote_binary() -> Result<PathBuf, String> {
    let exe = std::env::current_exe().map_err(|e| e.to_string())?;
    let z = exe.with_file_name("zygote");
    if z.is_file() {
        Ok(z)
    } else {
        Err(format!(
            "{} not found: build it (cargo build --release -p cli)",
            z.display()
        ))
    }
}

async fn start_daemon() -> Result<Daemon, String> {
    let dir = host::paths::runtime_root().join(format!("bench-api-{}", std::process::id()));
    std::fs::create_dir_all(&dir).map_err(|e| format!("{}: {e}", dir.display()))?;
    let sock = dir.join("zygote.sock");
    let child = Command::new(zygote_binary()?)
        .arg("daemon")
        .arg("--state-dir")
        .arg(&dir)
        .arg("--on-shutdown")
        .arg("stop")
        .arg("--max-starting")
        .arg("64")
        // Density counts the daemon's own memory, not a host limit.
        .arg("--memory-ratio")
        .arg("4")
        .env("ZYGOTE_LOG", "warn")
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::inherit())
        .spawn()
        .map_err(|e| format!("starting the daemon: {e}"))?;
    let d = Daemon {
        child,
        dir,
        client: Client::new(Endpoint::Unix(sock), None),
    };
    let deadline = Instant::now() + Duration::from_secs(10);
    while Instant::now() < deadline {
        if let Ok(a) = d.client.get("/healthz").await {
            if a.status.is_success() {
                return Ok(d);
            }
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    Err("the daemon did not answer /healthz within 10 s".into())
}

fn ms(d: Duration) -> f64 {
    d.as_secs_f64() * 1000.0
}

/// Runs the benchmark; `progress` gets a line per step.
pub fn bench_api(
    opts: &ApiBenchOptions,
    progress: &mut dyn FnMut(&str),
) -> Result<ApiReport, String> {
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .map_err(|e| e.to_string())?;
    rt.block_on(run(opts, progress))
}

async fn run(opts: &ApiBenchOptions, progress: &mut dyn FnMut(&str)) -> Result<ApiReport, String> {
    let mut report = ApiReport {
        get_target_per_s: opts.rate,
        ..Default::default()
    };
    progress("starting a daemon");
    let d = start_daemon().await?;
    report.daemon_rss_idle_kib = host::procfs::rss(d.child.id()).map(|r| r.total);
    let c = d.client.clone();
    progress(&format!(
        "master: cold boot of {} MiB over HTTP",
        opts.memory_mib
    ));
    let a = c
        .post(
            "/v1/masters",
            &serde_json::json!({"name": "bench", "memory_mib": opts.memory_mib, "warmup": "echo warm > /tmp/warm"}),
        )
        .await
        .map_err(|e| e.to_string())?;
    if a.status.as_u16() != 202 {
        return Err(format!("creating the master: {}", a.text()));
    }
    let deadline = Instant::now() + opts.boot_timeout;
    loop {
        let m = c
            .get("/v1/masters/bench")
            .await
            .map_err(|e| e.to_string())?
            .json();
        match m["status"].as_str() {
            Some("frozen") => break,
            Some("failed") => return Err(format!("the master failed: {}", m["reason"])),
            _ if Instant::now() > deadline => {
                return Err("the master did not freeze in time".into())
            }
            _ => tokio::time::sleep(Duration::from_millis(250)).await,
        }
    }

    // 1. Clone over HTTP vs through host/, alternating.
    progress(&format!(
        "{} clones over HTTP and {} through host/, alternating",
        opts.count, opts.count
    ));
    let store = Store::at(d.dir.clone());
    let (mut http, mut direct) = (Vec::new(), Vec::new());
    let (mut http_out, mut direct_out) = (Vec::new(), Vec::new());
    let mut keep: Option<String> = None;
    for i in 0..opts.count {
        let t0 = Instant::now();
        let a = c
            .post(
                "/v1/instances",
                &serde_json::json!({"master": "bench", "count": 1}),
            )
            .await
            .map_err(|e| e.to_string())?;
        let took = t0.elapsed();
        let v = a.json();
        match v["results"][0]["instance"]["id"].as_str() {
            Some(id) if a.status.as_u16() == 201 => {
                http.push(ms(took));
                if let Some(ready) = v["results"][0]["instance"]["timings"]["ready_ms"].as_f64() {
                    http_out.push(ms(took) - ready);
                }
                if i == 0 {
                    keep = Some(id.to_string());
                } else {
                    let _ = c.delete(&format!("/v1/instances/{id}")).await;
                }
            }
            _ => report.errors.push(format!("HTTP clone {i}: {}", a.text())),
        }
        let s2 = store.clone();
        let r = tokio::task::spawn_blocking(move || {
            let t0 = Instant::now();
            let opts = CloneOptions {
                detach: false,
                timeout: Duration::from_secs(120),
                parallel: 1,
                limits: Default::default(),
                net: Default::default(),
                vsock_reset: false,
            };
            let r = host::clone::start(&s2, "bench", 1, &opts);
            (t0.elapsed(), r, s2)
        })
        .await
        .map_err(|e| e.to_string())?;
        match r {
            (took, Ok(mut v), s2) => match v.pop() {
                Some(Ok(started)) => {
                    direct.push(ms(took));
                    let t = started.timeline();
                    if let Some(ready) = t.ms_since_spawn(t.ping_us) {
                        direct_out.push(ms(took) - ready);
                    }
                    let _ = host::clone::kill(&s2, &started.id);
                }
                Some(Err(e)) => report.errors.push(format!("direct clone {i}: {e}")),
                None => report.errors.push(format!("direct clone {i}: no result")),
            },
            (_, Err(e), _) => report.errors.push(format!("direct clone {i}: {e}")),
        }
    }
    report.clone_http_ms = Summary::of(&http);
    report.clone_direct_ms = Summary::of(&direct);
    report.clone_overhead_p50_ms = report
        .clone_http_ms
        .zip(report.clone_direct_ms)
        .map(|(h, d)| h.p50 - d.p50);
    report.clone_http_outside_ms = Summary::of(&http_out);
    report.clone_direct_outside_ms = Summary::of(&direct_out);
    report.clone_http_layer_p50_ms = report
        .clone_http_outside_ms
        .zip(report.clone_direct_outside_ms)
        .map(|(h, d)| h.p50 - d.p50);
    let Some(id) = keep else {
        return Err("no HTTP clone started".into());
    };

    // 2. Health over HTTP vs the agent ping it wraps.
    progress(&format!(
        "{} health requests and {} direct pings, alternating",
        opts.pings, opts.pings
    ));
    let uds = d.dir.join("clones").join(&id).join(host::vmm::files::VSOCK);
    let mut agent = tokio::task::spawn_blocking(move || AgentClient::connect(&uds))
        .await
        .map_err(|e| e.to_string())?
        .map_err(|e| format!("direct agent connection: {e}"))?;
    let (mut health, mut ping, mut layer) = (Vec::new(), Vec::new(), Vec::new());
    for _ in 0..opts.pings {
        let t0 = Instant::now();
        let a = c
            .get(&format!("/v1/instances/{id}/health"))
            .await
            .map_err(|e| e.to_string())?;
        let took = ms(t0.elapsed());
        if a.status.is_success() {
            health.push(took);
            if let Some(p) = a.json()["ping_ms"].as_f64() {
                layer.push(took - p);
            }
        }
        let (took, back) = tokio::task::spawn_blocking(move || {
            let t0 = Instant::now();
            let r = agent.ping();
            (r.map(|_| t0.elapsed()), agent)
        })
        .await
        .map_err(|e| e.to_string())?;
        agent = back;
        if let Ok(t) = took {
            ping.push(ms(t));
        }
    }
    report.health_http_ms = Summary::of(&health);
    report.ping_direct_ms = Summary::of(&ping);
    report.health_overhead_p50_ms = report
        .health_http_ms
        .zip(report.ping_direct_ms)
        .map(|(h, p)| h.p50 - p.p50);
    report.health_http_layer_ms = Summary::of(&layer);

    // 3. GET /v1/instances/{id} at a target rate while clones start.
    progress(&format!(
        "GET /v1/instances/{{id}} at {}/s for {:?} while clones start",
        opts.rate, opts.duration
    ));
    let starter = {
        let c = c.clone();
        let stop_at = Instant::now() + opts.duration;
        tokio::spawn(async move {
            let mut started = 0;
            while Instant::now() < stop_at {
                if let Ok(a) = c
                    .post(
                        "/v1/instances",
                        &serde_json::json!({"master": "bench", "count": 2}),
                    )
                    .await
                {
                    started += a.json()["started"].as_u64().unwrap_or(0) as usize;
                }
            }
            started
        })
    };
    let lat = Arc::new(std::sync::Mutex::new(Vec::<f64>::new()));
    let errors = Arc::new(std::sync::atomic::AtomicU64::new(0));
    let t_load = Instant::now();
    let total = (opts.rate as f64 * opts.duration.as_secs_f64()) as u64;
    let interval = Duration::from_secs_f64(1.0 / opts.rate.max(1) as f64);
    let mut tasks = Vec::new();
    let mut ticker = tokio::time::interval(interval);
    ticker.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Burst);
    let inflight = Arc::new(tokio::sync::Semaphore::new(256));
    for _ in 0..total {
        ticker.tick().await;
        let (c, lat, errors, id) = (c.clone(), lat.clone(), errors.clone(), id.clone());
        let Ok(permit) = inflight.clone().acquire_owned().await else {
            break;
        };
        tasks.push(tokio::spawn(async move {
            let t0 = Instant::now();
            match c.get(&format!("/v1/instances/{id}")).await {
                Ok(a) if a.status.is_success() => lat
                    .lock()
                    .unwrap_or_else(|e| e.into_inner())
                    .push(ms(t0.elapsed())),
                _ => {
                    errors.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
                }
            }
            drop(permit);
        }));
    }
    for t in tasks {
        let _ = t.await;
    }
    let elapsed = t_load.elapsed();
    report.clones_during_load = starter.await.unwrap_or(0);
    let lat = lat.lock().unwrap_or_else(|e| e.into_inner()).clone();
    report.get_achieved_per_s = lat.len() as f64 / elapsed.as_secs_f64();
    report.get_p50_ms = percentile(&lat, 50.0);
    report.get_p99_ms = percentile(&lat, 99.0);
    report.get_errors = errors.load(std::sync::atomic::Ordering::Relaxed);

    // 4. The daemon's RSS with N live clones.
    if opts.density > 0 {
        progress(&format!("starting clones until {} are alive", opts.density));
        let live = |v: &serde_json::Value| v["instances"]["running"].as_u64().unwrap_or(0) as usize;
        let mut alive = live(&c.get("/v1/host").await.map_err(|e| e.to_string())?.json());
        let mut failures = 0;
        while alive < opts.density && failures < 5 {
            let n = (opts.density - alive).min(50);
            let a = c
                .post(
                    "/v1/instances",
                    &serde_json::json!({"master": "bench", "count": n}),
                )
                .await
                .map_err(|e| e.to_string())?;
            if a.json()["started"].as_u64().unwrap_or(0) == 0 {
                failures += 1;
                tokio::time::sleep(Duration::from_millis(500)).await;
            }
            alive = live(&c.get("/v1/host").await.map_err(|e| e.to_string())?.json());
            progress(&format!("{alive} clones alive"));
        }
        report.density_clones = alive;
        // Read it after a listing, so that the daemon holds what it holds
        // when it serves.
        let _ = c.get("/v1/instances?limit=1000").await;
        report.daemon_rss_kib = host::procfs::rss(d.child.id()).map(|r| r.total);
    }
    progress("stopping the daemon and its clones");
    drop(d);
    Ok(report)
}

impl ApiReport {
    /// One JSON object.
    pub fn to_json(&self) -> serde_json::Value {
        serde_json::to_value(self).unwrap_or_default()
    }

    /// A table, with the bars.
    pub fn to_table(&self) -> String {
        let f = |v: Option<f64>| v.map_or("-".to_string(), |x| format!("{x:.2}"));
        let s = |v: Option<Summary>| {
            v.map_or("-".to_string(), |x| {
                format!("{:.2} / {:.2} / {:.2}", x.min, x.p50, x.max)
            })
        };
        let bar = |ok: Option<bool>| match ok {
            Some(true) => "met",
            Some(false) => "MISSED",
            None => "-",
        };
        let mut t = String::new();
        t.push_str(&format!(
            "{:<44} {:>28}  {}\n",
            "", "min / p50 / max (ms)", "bar"
        ));
        t.push_str(&format!(
            "{:<44} {:>28}\n",
            "clone over HTTP → agent answered",
            s(self.clone_http_ms)
        ));
        t.push_str(&format!(
            "{:<44} {:>28}\n",
            "clone through host/ → agent answered",
            s(self.clone_direct_ms)
        ));
        t.push_str(&format!(
            "{:<44} {:>28}\n",
            "  wall p50 difference (guest noise included)",
            f(self.clone_overhead_p50_ms)
        ));
        t.push_str(&format!(
            "{:<44} {:>28}\n",
            "  HTTP: wall − daemon's spawn→ping",
            s(self.clone_http_outside_ms)
        ));
        t.push_str(&format!(
            "{:<44} {:>28}\n",
            "  host/: wall − spawn→ping",
            s(self.clone_direct_outside_ms)
        ));
        t.push_str(&format!(
            "{:<44} {:>28}  {} (≤ 2 ms)\n",
            "  what HTTP adds to a clone, p50",
            f(self.clone_http_layer_p50_ms),
            bar(self.clone_http_layer_p50_ms.map(|x| x <= 2.0))
        ));
        t.push_str(&format!(
            "{:<44} {:>28}\n",
            "GET .../health",
            s(self.health_http_ms)
        ));
        t.push_str(&format!(
            "{:<44} {:>28}\n",
            "agent ping (kept connection)",
            s(self.ping_direct_ms)
        ));
        t.push_str(&format!(
            "{:<44} {:>28}\n",
            "  wall p50 difference (guest noise included)",
            f(self.health_overhead_p50_ms)
        ));
        t.push_str(&format!(
            "{:<44} {:>28}  {} (≤ 1 ms)\n",
            "  what HTTP adds: wall − daemon's ping",
            s(self.health_http_layer_ms),
            bar(self.health_http_layer_ms.map(|x| x.p50 <= 1.0))
        ));
        t.push_str(&format!(
            "{:<44} {:>28}  {} (≥ 1000/s)\n",
            format!(
                "GET /v1/instances/{{id}} at {}/s: achieved",
                self.get_target_per_s
            ),
            format!("{:.0}/s", self.get_achieved_per_s),
            bar(Some(self.get_achieved_per_s >= 1000.0 * 0.98))
        ));
        t.push_str(&format!(
            "{:<44} {:>28}  {} (p99 < 10 ms)\n",
            format!(
                "  p50 / p99, {} clones started meanwhile",
                self.clones_during_load
            ),
            format!("{} / {}", f(self.get_p50_ms), f(self.get_p99_ms)),
            bar(self.get_p99_ms.map(|x| x < 10.0))
        ));
        t.push_str(&format!("{:<44} {:>28}\n", "  errors", self.get_errors));
        t.push_str(&format!(
            "{:<44} {:>28}\n",
            "daemon RSS, no clone",
            self.daemon_rss_idle_kib
                .map_or("-".into(), |k| format!("{:.1} MiB", k as f64 / 1024.0))
        ));
        t.push_str(&format!(
            "{:<44} {:>28}  {} (< 64 MiB at 300)\n",
            format!("daemon RSS, {} live clones", self.density_clones),
            self.daemon_rss_kib
                .map_or("-".into(), |k| format!("{:.1} MiB", k as f64 / 1024.0)),
            bar(self
                .daemon_rss_kib
                .filter(|_| self.density_clones >= 300)
                .map(|k| k < 64 * 1024))
        ));
        for e in &self.errors {
            t.push_str(&format!("error: {e}\n"));
        }
        t
    }
}
