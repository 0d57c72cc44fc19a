//! `zygote bench scale`: the whole cluster on this machine. `scripts/cluster
//! up N` (N daemons in network namespaces and a scheduler), an app of one
//! instance (so its master is frozen on one host only), then one request
//! scales it to `--instances`; measured: when every instance answers the
//! agent's ping (`ready`, `seconds_to_all_ready`), where the time went
//! (placement, masters shipped to the other hosts, clone starts), how many
//! masters were booted and how many travelled as files; with `--kill K`,
//! K hosts are killed (daemon and VMs) and it measures how long until the
//! desired count runs again and the most instances ever live at once.
//!
//! It must not: leave the test bed up (it is taken down at the end, also
//! after an error), or count an instance that has not answered its ping.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use api::client::{Client, Endpoint};
use serde::Serialize;
use serde_json::{json, Value};

use crate::stats::percentile;

/// The bar: every instance ready well inside Diego's minute.
pub const READY_BAR_S: f64 = 60.0;
/// The bar: the desired count back within 10 s of a host's loss.
pub const RESTORED_BAR_S: f64 = 10.0;

/// Options.
#[derive(Debug, Clone)]
pub struct ScaleBenchOptions {
    /// Hosts of the test bed.
    pub hosts: usize,
    /// Instances to scale to.
    pub instances: u32,
    /// Hosts to kill once all are ready (0: none).
    pub kill: usize,
    /// Guest RAM of the master, MiB.
    pub memory_mib: u64,
    /// How long the scale-up may take before the run gives up.
    pub timeout: Duration,
    /// `scripts/cluster` (found from the binary's place when `None`).
    pub script: Option<PathBuf>,
    /// Extra arguments for every daemon (`scripts/cluster --daemon-arg`).
    pub daemon_args: Vec<String>,
}

/// One phase's time.
#[derive(Debug, Clone, Serialize)]
pub struct Phase {
    /// What.
    pub name: String,
    /// Seconds from the scale request.
    pub seconds: f64,
}

/// What was measured.
#[derive(Debug, Clone, Serialize)]
pub struct ScaleReport {
    /// Hosts.
    pub hosts: usize,
    /// Instances asked for.
    pub instances: u32,
    /// Instances that answered the agent's ping.
    pub ready: u32,
    /// From the scale request to the last instance ready (`None`: not all
    /// became ready within the timeout).
    pub seconds_to_all_ready: Option<f64>,
    /// The master's cold boot + warm-up before the scale (the one-instance
    /// app), seconds.
    pub seconds_first_instance: f64,
    /// Ready instances per host.
    pub per_host: BTreeMap<String, u64>,
    /// Hosts that cold-booted the master.
    pub masters_booted: u32,
    /// Hosts that received it as files.
    pub masters_transferred: u32,
    /// Where the time went, from the scale request.
    pub phases: Vec<Phase>,
    /// Clone start to ping (daemon's timings) of the ready instances, p50, ms.
    pub clone_ready_ms_p50: Option<f64>,
    /// Same, p99.
    pub clone_ready_ms_p99: Option<f64>,
    /// Hosts killed.
    pub killed: Vec<String>,
    /// From the kill to the desired count running again on the others.
    pub seconds_to_restored: Option<f64>,
    /// The most instances live (starting or running) at once after the kill.
    pub max_live_instances: Option<usize>,
    /// What went wrong, if anything.
    pub errors: Vec<String>,
}

impl ScaleReport {
    /// The report as one JSON object.
    pub fn to_json(&self) -> Value {
        serde_json::to_value(self).unwrap_or(Value::Null)
    }

    /// A table for people.
    pub fn to_table(&self) -> String {
        use std::fmt::Write;
        let mut s = format!(
            "cluster scale: {} hosts, 1 -> {} instances (master frozen on one host first)\n",
            self.hosts, self.instances
        );
        let f = |x: Option<f64>| x.map_or("-".to_string(), |v| format!("{v:.1}"));
        let _ = writeln!(
            s,
            "  first instance (cold boot + warm-up)   {:>8.1} s",
            self.seconds_first_instance
        );
        let _ = writeln!(
            s,
            "  all ready after the scale request      {:>8} s   bar {READY_BAR_S} s   {}",
            f(self.seconds_to_all_ready),
            verdict(self.seconds_to_all_ready, READY_BAR_S)
        );
        let _ = writeln!(
            s,
            "  ready                                  {:>8} of {}",
            self.ready, self.instances
        );
        let _ = writeln!(
            s,
            "  masters booted / transferred           {:>4} / {}",
            self.masters_booted, self.masters_transferred
        );
        let _ = writeln!(
            s,
            "  clone start to ping p50 / p99          {:>8} / {} ms",
            f(self.clone_ready_ms_p50),
            f(self.clone_ready_ms_p99)
        );
        let _ = writeln!(s, "  where the time went (s after the scale request):");
        for p in &self.phases {
            let _ = writeln!(s, "    {:<36} {:>8.1}", p.name, p.seconds);
        }
        let _ = writeln!(s, "  per host: {:?}", self.per_host);
        if !self.killed.is_empty() {
            let _ = writeln!(
                s,
                "  killed {:?}: restored after {} s   bar {RESTORED_BAR_S} s   {}",
                self.killed,
                f(self.seconds_to_restored),
                verdict(self.seconds_to_restored, RESTORED_BAR_S)
            );
            let _ = writeln!(
                s,
                "  most live at once after the kill       {:>8}   (desired {})",
                self.max_live_instances
                    .map_or("-".into(), |m| m.to_string()),
                self.instances
            );
        }
        for e in &self.errors {
            let _ = writeln!(s, "  error: {e}");
        }
        s
    }
}

fn verdict(v: Option<f64>, bar: f64) -> &'static str {
    match v {
        Some(v) if v <= bar => "met",
        Some(_) => "missed",
        None => "not reached",
    }
}

/// Finds `scripts/cluster`: `$ZYGOTE_ROOT/scripts/cluster`, else above the
/// running binary (target/release/…), else above the working directory.
fn find_script() -> Option<PathBuf> {
    if let Some(root) = std::env::var_os("ZYGOTE_ROOT") {
        let p = Path::new(&root).join("scripts/cluster");
        if p.is_file() {
            return Some(p);
        }
    }
    let exe = std::env::current_exe().ok()?;
    let cwd = std::env::current_dir().ok()?;
    exe.ancestors()
        .chain(cwd.ancestors())
        .map(|d| d.join("scripts/cluster"))
        .find(|p| p.is_file())
}

struct Bed {
    script: PathBuf,
    dir: PathBuf,
    env: BTreeMap<String, String>,
}

impl Bed {
    fn up(script: &Path, hosts: usize, daemon_args: &[String]) -> Result<Bed, String> {
        let dir = std::env::temp_dir().join(format!("zygote-bench-scale-{}", std::process::id()));
        let zygote = std::env::current_exe()
            .map_err(|e| e.to_string())?
            .with_file_name("zygote");
        let out = Command::new(script)
            .args(["up", &hosts.to_string(), "--no-setup", "--dir"])
            .arg(&dir)
            .arg("--zygote")
            .arg(&zygote)
            .args(
                daemon_args
                    .iter()
                    .flat_map(|a| ["--daemon-arg", a.as_str()]),
            )
            .output()
            .map_err(|e| format!("running {}: {e}", script.display()))?;
        if !out.status.success() {
            return Err(format!(
                "scripts/cluster up failed: {}",
                String::from_utf8_lossy(&out.stderr)
            ));
        }
        let text = std::fs::read_to_string(dir.join("cluster.env")).map_err(|e| e.to_string())?;
        let env = text
            .lines()
            .filter(|l| !l.starts_with('#'))
            .filter_map(|l| l.split_once('='))
            .map(|(k, v)| (k.to_string(), v.trim_matches('"').to_string()))
            .collect();
        Ok(Bed {
            script: script.to_path_buf(),
            dir,
            env,
        })
    }

    fn run(&self, args: &[&str]) -> Result<(), String> {
        let out = Command::new(&self.script)
            .args(args)
            .arg("--dir")
            .arg(&self.dir)
            .output()
            .map_err(|e| e.to_string())?;
        if out.status.success() {
            Ok(())
        } else {
            Err(String::from_utf8_lossy(&out.stderr).into_owned())
        }
    }

    fn client(&self, url: &str) -> Result<Client, String> {
        let token = std::fs::read_to_string(&self.env["TOKEN_FILE"]).map_err(|e| e.to_string())?;
        Ok(Client::new(
            Endpoint::parse(url).map_err(|e| e.to_string())?,
            Some(token.trim().to_string()),
        ))
    }
}

impl Drop for Bed {
    fn drop(&mut self) {
        let _ = Command::new(&self.script)
            .args(["down", "--dir"])
            .arg(&self.dir)
            .output();
    }
}

async fn app(c: &Client) -> Result<Value, String> {
    let a = c.get("/v1/apps/scale").await.map_err(|e| e.to_string())?;
    if a.status != 200 {
        return Err(a.text());
    }
    Ok(a.json())
}

async fn live(c: &Client) -> Vec<Value> {
    let path = "/v1/instances?label=zygote.app%3Dscale&limit=1000";
    match tokio::time::timeout(Duration::from_secs(2), c.get(path)).await {
        Ok(Ok(a)) if a.status == 200 => a.json()["instances"]
            .as_array()
            .cloned()
            .unwrap_or_default()
            .into_iter()
            .filter(|i| matches!(i["state"].as_str(), Some("starting" | "running")))
            .collect(),
        _ => Vec::new(),
    }
}

/// Runs the benchmark; `progress` gets a line per step.
pub fn bench_scale(
    o: &ScaleBenchOptions,
    progress: &mut dyn FnMut(&str),
) -> Result<ScaleReport, String> {
    let script = o.script.clone().or_else(find_script).ok_or(
        "scripts/cluster not found above this binary or the working directory: pass --script",
    )?;
    progress(&format!("starting the test bed: {} hosts", o.hosts));
    let bed = Bed::up(&script, o.hosts, &o.daemon_args)?;
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .map_err(|e| e.to_string())?;
    rt.block_on(run(o, &bed, progress))
}

async fn run(
    o: &ScaleBenchOptions,
    bed: &Bed,
    progress: &mut dyn FnMut(&str),
) -> Result<ScaleReport, String> {
    let sched = bed.client(&bed.env["SCHEDULER_URL"])?;
    let hosts: Vec<String> = bed.env["HOSTS"].split(' ').map(String::from).collect();
    let daemons: Vec<Client> = (1..=hosts.len())
        .map(|i| bed.client(&bed.env[&format!("H{i}_URL")]))
        .collect::<Result<_, _>>()?;
    let body = |n: u32| {
        json!({
            "master": {"name": "scale", "memory_mib": o.memory_mib, "warmup": "echo warm > /tmp/warm"},
            "instances": n,
            "health": {"interval_s": 30, "failures_to_replace": 3},
        })
    };
    let put = |n: u32| {
        let b = serde_json::to_vec(&body(n)).unwrap_or_default();
        let s = sched.clone();
        async move {
            s.send(
                hyper::Method::PUT,
                "/v1/apps/scale",
                Some("application/json"),
                b,
            )
            .await
            .map_err(|e| e.to_string())
        }
    };
    let mut errors = Vec::new();

    // One instance: the master is made on one host only.
    let t_first = Instant::now();
    let a = put(1).await?;
    if !a.status.is_success() {
        return Err(format!("declaring the app: {}", a.text()));
    }
    progress("one instance: the master boots on one host");
    loop {
        if app(&sched).await?["running"] == 1 {
            break;
        }
        if t_first.elapsed() > Duration::from_secs(600) {
            return Err("the first instance did not run within 600 s".into());
        }
        tokio::time::sleep(Duration::from_millis(250)).await;
    }
    let seconds_first_instance = t_first.elapsed().as_secs_f64();

    // Scale to N in one request.
    progress(&format!("scaling to {} in one request", o.instances));
    let t0 = Instant::now();
    let a = put(o.instances).await?;
    if !a.status.is_success() {
        return Err(format!("scaling: {}", a.text()));
    }
    let mut phases = Vec::new();
    let mut placed_at = None;
    let mut master_at: BTreeMap<String, f64> = BTreeMap::new();
    let mut seconds_to_all_ready = None;
    let mut last = Value::Null;
    let mut next_note = Duration::from_secs(5);
    while t0.elapsed() < o.timeout {
        let st = app(&sched).await?;
        let (running, starting) = (
            st["running"].as_u64().unwrap_or(0),
            st["starting"].as_u64().unwrap_or(0),
        );
        if placed_at.is_none() && running + starting >= u64::from(o.instances) {
            placed_at = Some(t0.elapsed().as_secs_f64());
        }
        for (h, d) in hosts.iter().zip(&daemons) {
            if master_at.contains_key(h) {
                continue;
            }
            if let Ok(m) = d.get("/v1/masters/scale").await {
                if m.status == 200 && m.json()["status"] == "frozen" {
                    master_at.insert(h.clone(), t0.elapsed().as_secs_f64());
                }
            }
        }
        if running >= u64::from(o.instances) {
            seconds_to_all_ready = Some(t0.elapsed().as_secs_f64());
            last = st;
            break;
        }
        if t0.elapsed() >= next_note {
            progress(&format!(
                "{:.0} s: {running} running, {starting} starting",
                t0.elapsed().as_secs_f64()
            ));
            next_note += Duration::from_secs(5);
        }
        last = st;
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    if seconds_to_all_ready.is_none() {
        errors.push(format!(
            "not all ready within {:?}: {} running",
            o.timeout, last["running"]
        ));
    }
    if let Some(p) = placed_at {
        phases.push(Phase {
            name: "all placed (scheduler)".into(),
            seconds: p,
        });
    }
    for (h, s) in &master_at {
        phases.push(Phase {
            name: format!("master frozen on {h}"),
            seconds: *s,
        });
    }
    if let Some(s) = seconds_to_all_ready {
        phases.push(Phase {
            name: "all ready (agent ping)".into(),
            seconds: s,
        });
    }

    // Masters, instances, clone timings.
    let (mut booted, mut transferred) = (0, 0);
    let mut per_host = BTreeMap::new();
    let mut ready_ms = Vec::new();
    for (h, d) in hosts.iter().zip(&daemons) {
        if let Ok(m) = d.get("/v1/masters/scale").await {
            let m = m.json();
            if m["status"] == "frozen" {
                if m["boot_ms"].is_null() {
                    transferred += 1;
                } else {
                    booted += 1;
                }
            }
        }
        let l = live(d).await;
        per_host.insert(
            h.clone(),
            l.iter().filter(|i| i["state"] == "running").count() as u64,
        );
        ready_ms.extend(l.iter().filter_map(|i| i["timings"]["ready_ms"].as_f64()));
    }
    let ready = per_host.values().sum::<u64>() as u32;

    // Kill hosts: the last K (the master was made on the first by id).
    let mut killed = Vec::new();
    let mut seconds_to_restored = None;
    let mut max_live = None;
    if o.kill > 0 && seconds_to_all_ready.is_some() {
        let stop = Arc::new(AtomicBool::new(false));
        let max = Arc::new(AtomicUsize::new(0));
        let watcher = {
            let (stop, max, daemons) = (stop.clone(), max.clone(), daemons.clone());
            tokio::spawn(async move {
                while !stop.load(Ordering::Relaxed) {
                    let mut n = 0;
                    for d in &daemons {
                        n += live(d).await.len();
                    }
                    max.fetch_max(n, Ordering::Relaxed);
                    tokio::time::sleep(Duration::from_millis(100)).await;
                }
            })
        };
        let victims: Vec<usize> =
            (hosts.len() - o.kill.min(hosts.len() - 1)..hosts.len()).collect();
        let t_kill = Instant::now();
        for &i in &victims {
            progress(&format!("killing {} (daemon and VMs)", hosts[i]));
            bed.run(&["kill-host", &(i + 1).to_string()])?;
            killed.push(hosts[i].clone());
        }
        while t_kill.elapsed() < Duration::from_secs(120) {
            let st = app(&sched).await?;
            let on_killed = killed
                .iter()
                .any(|h| st["per_host"][h]["running"].as_u64().unwrap_or(0) > 0);
            if st["running"].as_u64() == Some(u64::from(o.instances)) && !on_killed {
                seconds_to_restored = Some(t_kill.elapsed().as_secs_f64());
                break;
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
        if seconds_to_restored.is_none() {
            errors.push("the desired count did not come back within 120 s of the kill".into());
        }
        stop.store(true, Ordering::Relaxed);
        let _ = watcher.await;
        max_live = Some(max.load(Ordering::Relaxed));
    }
    Ok(ScaleReport {
        hosts: o.hosts,
        instances: o.instances,
        ready,
        seconds_to_all_ready,
        seconds_first_instance,
        per_host,
        masters_booted: booted,
        masters_transferred: transferred,
        phases,
        clone_ready_ms_p50: percentile(&ready_ms, 50.0),
        clone_ready_ms_p99: percentile(&ready_ms, 99.0),
        killed,
        seconds_to_restored,
        max_live_instances: max_live,
        errors,
    })
}
