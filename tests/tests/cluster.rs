//! The cluster end to end: `scripts/cluster up 3` (three real daemons, each
//! in its own network namespace, and a real scheduler), an app of 30 clones
//! spread over them, a master made once and shipped as files, a host
//! killed, a host cut off and healed, bad input, and (second test) the
//! etcd store with two scheduler replicas whose leader is killed.
//!
//! The two tests share the machine-wide test bed (fixed names), so they run
//! one after the other under a lock. Every wait is bounded.

use std::collections::{BTreeMap, BTreeSet};
use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use api::client::{Client, Endpoint};
use serde_json::{json, Value};
use zygote_tests::{bin, require_kvm};

static BED: Mutex<()> = Mutex::new(());

/// A running `scripts/cluster`; taken down on drop.
struct Bed {
    dir: PathBuf,
    env: BTreeMap<String, String>,
    rt: tokio::runtime::Runtime,
}

fn script() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../scripts/cluster")
}

impl Bed {
    fn up(args: &[&str]) -> Bed {
        require_kvm();
        let dir = std::env::temp_dir().join(format!("zygote-cluster-test-{}", std::process::id()));
        let zygote = bin("zygote");
        let out = Command::new(script())
            .arg("up")
            .args(args)
            .args(["--no-setup", "--dir"])
            .arg(&dir)
            .arg("--zygote")
            .arg(&zygote)
            .output()
            .expect("run scripts/cluster");
        assert!(
            out.status.success(),
            "scripts/cluster up failed:\n{}\n{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
        let text = std::fs::read_to_string(dir.join("cluster.env")).expect("cluster.env");
        let env = text
            .lines()
            .filter(|l| !l.starts_with('#'))
            .filter_map(|l| l.split_once('='))
            .map(|(k, v)| (k.to_string(), v.trim_matches('"').to_string()))
            .collect();
        Bed {
            dir,
            env,
            rt: tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()
                .unwrap(),
        }
    }

    fn token(&self) -> String {
        std::fs::read_to_string(&self.env["TOKEN_FILE"])
            .unwrap()
            .trim()
            .to_string()
    }

    fn client(&self, url: &str) -> Client {
        Client::new(Endpoint::parse(url).unwrap(), Some(self.token()))
    }

    fn scheduler(&self) -> Client {
        self.client(&self.env["SCHEDULER_URL"])
    }

    fn host(&self, i: usize) -> Client {
        self.client(&self.env[&format!("H{i}_URL")])
    }

    fn run(&self, args: &[&str]) {
        let out = Command::new(script())
            .args(args)
            .arg("--dir")
            .arg(&self.dir)
            .output()
            .unwrap();
        assert!(
            out.status.success(),
            "scripts/cluster {args:?}: {}",
            String::from_utf8_lossy(&out.stderr)
        );
    }

    fn put_app(&self, name: &str, body: &Value) -> (u16, Value) {
        let a = self
            .rt
            .block_on(self.scheduler().send(
                hyper::Method::PUT,
                &format!("/v1/apps/{name}"),
                Some("application/json"),
                serde_json::to_vec(body).unwrap(),
            ))
            .unwrap();
        (a.status.as_u16(), a.json())
    }

    fn app(&self, name: &str) -> Value {
        let a = self
            .rt
            .block_on(self.scheduler().get(&format!("/v1/apps/{name}")))
            .unwrap();
        assert_eq!(a.status, 200, "{}", a.text());
        a.json()
    }

    fn wait_app(
        &self,
        name: &str,
        what: &str,
        limit: Duration,
        ok: impl Fn(&Value) -> bool,
    ) -> Value {
        let t0 = Instant::now();
        loop {
            let a = self.app(name);
            if ok(&a) {
                return a;
            }
            assert!(
                t0.elapsed() < limit,
                "app {name}: gave up after {limit:?} waiting for {what}; status: {a:#}\nscheduler log:\n{}",
                self.log("scheduler-0")
            );
            std::thread::sleep(Duration::from_millis(250));
        }
    }

    fn log(&self, name: &str) -> String {
        let text = std::fs::read_to_string(self.dir.join("logs").join(format!("{name}.log")))
            .unwrap_or_default();
        let lines: Vec<&str> = text.lines().collect();
        lines[lines.len().saturating_sub(30)..].join("\n")
    }
}

impl Drop for Bed {
    fn drop(&mut self) {
        let _ = Command::new(script())
            .args(["down", "--dir"])
            .arg(&self.dir)
            .output();
    }
}

/// The app's live instances (starting or running) on host `i`, by slot;
/// empty when the host does not answer.
fn live_on(rt: &tokio::runtime::Runtime, c: &Client, app: &str) -> Vec<(u32, String)> {
    let path = format!("/v1/instances?label=zygote.app%3D{app}&limit=1000");
    let Ok(Ok(a)) =
        rt.block_on(async { tokio::time::timeout(Duration::from_secs(2), c.get(&path)).await })
    else {
        return Vec::new();
    };
    if a.status != 200 {
        return Vec::new();
    }
    a.json()["instances"]
        .as_array()
        .cloned()
        .unwrap_or_default()
        .iter()
        .filter(|i| matches!(i["state"].as_str(), Some("starting" | "running")))
        .map(|i| {
            (
                i["labels"]["zygote.slot"]
                    .as_str()
                    .unwrap_or("?")
                    .parse()
                    .unwrap_or(u32::MAX),
                i["id"].as_str().unwrap_or("").to_string(),
            )
        })
        .collect()
}

/// Counts live instances of `app` across hosts every 100 ms until stopped;
/// remembers the most ever seen at once.
struct Watch {
    stop: Arc<AtomicBool>,
    max: Arc<AtomicUsize>,
    thread: Option<std::thread::JoinHandle<()>>,
}

impl Watch {
    fn start(bed: &Bed, hosts: usize, app: &str) -> Watch {
        let stop = Arc::new(AtomicBool::new(false));
        let max = Arc::new(AtomicUsize::new(0));
        let clients: Vec<Client> = (1..=hosts).map(|i| bed.host(i)).collect();
        let (s, m, app) = (stop.clone(), max.clone(), app.to_string());
        let thread = std::thread::spawn(move || {
            let rt = tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()
                .unwrap();
            while !s.load(Ordering::Relaxed) {
                let n: usize = clients.iter().map(|c| live_on(&rt, c, &app).len()).sum();
                m.fetch_max(n, Ordering::Relaxed);
                std::thread::sleep(Duration::from_millis(100));
            }
        });
        Watch {
            stop,
            max,
            thread: Some(thread),
        }
    }

    fn finish(mut self) -> usize {
        self.stop.store(true, Ordering::Relaxed);
        if let Some(t) = self.thread.take() {
            t.join().unwrap();
        }
        self.max.load(Ordering::Relaxed)
    }
}

fn per_host(app: &Value) -> BTreeMap<String, u64> {
    app["per_host"]
        .as_object()
        .unwrap()
        .iter()
        .map(|(h, c)| (h.clone(), c["running"].as_u64().unwrap()))
        .filter(|(_, n)| *n > 0)
        .collect()
}

fn app_body(instances: u32) -> Value {
    json!({
        "master": {"name": "web", "memory_mib": 128, "warmup": "echo warm > /tmp/warm"},
        "instances": instances,
        "placement": {"strategy": "spread", "spread_by": "host", "constraints": ["host in (h1,h2,h3)"]},
        "health": {"interval_s": 2, "failures_to_replace": 2},
    })
}

#[test]
fn an_app_spreads_survives_a_lost_host_and_never_doubles() {
    let _bed_lock = BED.lock().unwrap_or_else(|e| e.into_inner());
    let bed = Bed::up(&["3"]);
    let rt = &bed.rt;

    // Bad input first: nothing of it may stick.
    let (code, body) = bed.put_app(
        "bad",
        &json!({"master": {"name": "web"}, "instances": 1, "colour": "red"}),
    );
    assert_eq!(code, 422, "{body}");
    assert!(
        body["error"]["message"]
            .as_str()
            .unwrap()
            .contains("colour"),
        "{body}"
    );
    let (code, body) = bed.put_app("Bad!", &app_body(1));
    assert_eq!(code, 400, "{body}");
    let (code, body) = bed.put_app("bad", &json!({"master": {"name": "web"}, "instances": 1, "placement": {"constraints": ["zone in (a"]}}));
    assert_eq!(code, 400, "{body}");
    let (code, _) = bed.put_app("nowhere", &json!({"master": {"name": "web", "memory_mib": 128}, "instances": 2, "placement": {"constraints": ["gpu=yes"]}}));
    assert_eq!(code, 201);
    let a = bed.wait_app(
        "nowhere",
        "a stated shortfall",
        Duration::from_secs(20),
        |a| !a["shortfall"].is_null(),
    );
    assert_eq!(a["shortfall"]["reason"], "constraints", "{a:#}");
    assert_eq!(a["shortfall"]["unplaced"], 2);
    assert_eq!(a["running"], 0);
    let (code, _) = bed.put_app("huge", &json!({"master": {"name": "web", "memory_mib": 65536}, "instances": 3, "placement": {"constraints": ["host=h1"]}}));
    assert_eq!(code, 201);
    let a = bed.wait_app(
        "huge",
        "a capacity shortfall",
        Duration::from_secs(20),
        |a| a["shortfall"]["reason"] == "capacity",
    );
    assert_eq!(a["shortfall"]["reason"], "capacity", "{a:#}");
    for name in ["nowhere", "huge"] {
        let d = rt
            .block_on(bed.scheduler().delete(&format!("/v1/apps/{name}")))
            .unwrap();
        assert_eq!(d.status, 204);
    }

    // 30 spread by host: 10 per host, the master booted once and shipped.
    let t0 = Instant::now();
    let (code, body) = bed.put_app("web", &app_body(30));
    assert_eq!(code, 201, "{body}");
    let (code, again) = bed.put_app("web", &app_body(30));
    assert_eq!(code, 200, "declaring the same app again is idempotent");
    assert_eq!(again["generation"], body["generation"]);
    let a = bed.wait_app("web", "30 running", Duration::from_secs(300), |a| {
        a["running"] == 30
    });
    eprintln!("30 instances running on 3 hosts after {:?}", t0.elapsed());
    let spread = per_host(&a);
    assert_eq!(spread.len(), 3, "{a:#}");
    assert!(
        spread.values().all(|n| (9..=11).contains(n)),
        "10 per host (±1): {spread:?}"
    );
    let mut booted = 0;
    let mut masters = Vec::new();
    for i in 1..=3 {
        let m = rt.block_on(bed.host(i).get("/v1/masters/web")).unwrap();
        assert_eq!(m.status, 200, "h{i} holds the master: {}", m.text());
        let m = m.json();
        assert_eq!(m["status"], "frozen");
        if !m["boot_ms"].is_null() {
            booted += 1;
        }
        masters.push(m);
    }
    assert_eq!(
        booted,
        1,
        "one cold boot; the other hosts received the master as files: {masters:#?}\n{}",
        (1..=3)
            .map(|i| bed.log(&format!("h{i}")))
            .collect::<Vec<_>>()
            .join("\n")
    );
    // Every slot once, on the host the scheduler says.
    let mut slots = BTreeSet::new();
    for i in 1..=3 {
        for (slot, _) in live_on(rt, &bed.host(i), "web") {
            assert!(slots.insert(slot), "slot {slot} runs twice");
        }
    }
    assert_eq!(slots, (0..30).collect());
    // A clone answers and has the master's warm state.
    let (_, id) = live_on(rt, &bed.host(2), "web")[0].clone();
    let out = rt
        .block_on(bed.host(2).post(
            &format!("/v1/instances/{id}/exec"),
            &json!({"argv": ["cat", "/tmp/warm"]}),
        ))
        .unwrap();
    assert_eq!(out.status, 200, "{}", out.text());
    assert_eq!(out.json()["stdout"], "warm\n", "{}", out.text());

    // Constraints hold: an app pinned to h2 runs there only (from the
    // master h2 already holds), and goes away whole.
    let mut pinned = app_body(3);
    pinned["placement"]["constraints"] = json!(["host=h2"]);
    let (code, b) = bed.put_app("pinned", &pinned);
    assert_eq!(code, 201, "{b}");
    let a = bed.wait_app("pinned", "3 running on h2", Duration::from_secs(120), |a| {
        a["running"] == 3
    });
    assert_eq!(per_host(&a).keys().collect::<Vec<_>>(), ["h2"], "{a:#}");
    let d = rt
        .block_on(bed.scheduler().delete("/v1/apps/pinned"))
        .unwrap();
    assert_eq!(d.status, 204);

    // Kill host 3 (daemon and VMs): back to 30 on hosts 1 and 2, never more.
    let watch = Watch::start(&bed, 3, "web");
    let killed = Instant::now();
    bed.run(&["kill-host", "3"]);
    let a = bed.wait_app(
        "web",
        "30 running on h1 and h2",
        Duration::from_secs(120),
        |a| a["running"] == 30 && per_host(a).keys().all(|h| h != "h3"),
    );
    eprintln!(
        "restored to 30 on 2 hosts {:?} after the kill",
        killed.elapsed()
    );
    let max = watch.finish();
    assert!(max <= 30, "at most 30 live at any moment, saw {max}");
    let spread = per_host(&a);
    assert_eq!(spread.values().sum::<u64>(), 30);
    let hosts = rt
        .block_on(bed.scheduler().get("/v1/hosts"))
        .unwrap()
        .json();
    let h3 = hosts["hosts"]
        .as_array()
        .unwrap()
        .iter()
        .find(|h| h["id"] == "h3")
        .unwrap()
        .clone();
    assert_eq!(h3["state"], "lost", "{h3:#}");
    bed.run(&["start-host", "3"]);

    // Cut host 2 off, wait until its slots run elsewhere, heal it: its old
    // copies stop; no slot runs twice.
    bed.run(&["cut", "2"]);
    bed.wait_app(
        "web",
        "h2's slots placed elsewhere",
        Duration::from_secs(120),
        |a| a["running"] == 30 && per_host(a).keys().all(|h| h != "h2"),
    );
    bed.run(&["heal", "2"]);
    let t_heal = Instant::now();
    loop {
        let on2 = live_on(rt, &bed.host(2), "web");
        let total: usize = (1..=3)
            .map(|i| live_on(rt, &bed.host(i), "web").len())
            .sum();
        if on2.is_empty() && total == 30 {
            break;
        }
        assert!(
            t_heal.elapsed() < Duration::from_secs(30),
            "after the heal h2 still runs {} old copies ({} live in all)",
            on2.len(),
            total
        );
        std::thread::sleep(Duration::from_millis(250));
    }
    let mut slots = BTreeSet::new();
    for i in 1..=3 {
        for (slot, _) in live_on(rt, &bed.host(i), "web") {
            assert!(slots.insert(slot), "slot {slot} runs twice after the heal");
        }
    }
    assert_eq!(slots.len(), 30);

    // Drain h1: its instances move; then it is empty.
    let d = rt
        .block_on(bed.scheduler().post("/v1/hosts/h1/drain", &json!({})))
        .unwrap();
    assert_eq!(d.status, 200, "{}", d.text());
    bed.wait_app("web", "h1 drained", Duration::from_secs(120), |a| {
        a["running"] == 30 && per_host(a).keys().all(|h| h != "h1")
    });

    // Delete: every instance stops everywhere.
    let d = rt.block_on(bed.scheduler().delete("/v1/apps/web")).unwrap();
    assert_eq!(d.status, 204);
    let t_del = Instant::now();
    while (1..=3)
        .map(|i| live_on(rt, &bed.host(i), "web").len())
        .sum::<usize>()
        > 0
    {
        assert!(
            t_del.elapsed() < Duration::from_secs(30),
            "instances still live after the app's delete"
        );
        std::thread::sleep(Duration::from_millis(250));
    }
}

fn healthz(url: &str) -> String {
    let addr = url.trim_start_matches("http://");
    let Ok(mut s) = std::net::TcpStream::connect(addr) else {
        return String::new();
    };
    use std::io::{Read, Write};
    let _ = s.set_read_timeout(Some(Duration::from_secs(2)));
    let _ = write!(
        s,
        "GET /healthz HTTP/1.1\r\nHost: {addr}\r\nConnection: close\r\n\r\n"
    );
    let mut out = String::new();
    let _ = s.read_to_string(&mut out);
    out.rsplit("\r\n\r\n")
        .next()
        .unwrap_or("")
        .trim()
        .to_string()
}

fn ids(bed: &Bed, hosts: usize, app: &str) -> BTreeSet<String> {
    (1..=hosts)
        .flat_map(|i| live_on(&bed.rt, &bed.host(i), app))
        .map(|(_, id)| id)
        .collect()
}

#[test]
fn with_etcd_a_standby_takes_over_and_a_restart_loses_nothing() {
    let _bed_lock = BED.lock().unwrap_or_else(|e| e.into_inner());
    let bed = Bed::up(&["2", "--store", "etcd", "--schedulers", "2"]);
    let urls: Vec<String> = bed.env["SCHEDULER_URLS"]
        .split(' ')
        .map(String::from)
        .collect();
    let pids: Vec<i32> = bed.env["SCHEDULER_PIDS"]
        .split(' ')
        .map(|p| p.parse().unwrap())
        .collect();
    assert_eq!(urls.len(), 2);

    let mut body = app_body(6);
    body["placement"]["constraints"] = json!([]);
    let (code, b) = bed.put_app("web", &body);
    assert_eq!(code, 201, "{b}");
    bed.wait_app("web", "6 running", Duration::from_secs(300), |a| {
        a["running"] == 6
    });
    let before = ids(&bed, 2, "web");
    assert_eq!(before.len(), 6);

    // Exactly one replica leads; kill it.
    let states: Vec<String> = urls.iter().map(|u| healthz(u)).collect();
    let leader = states
        .iter()
        .position(|s| s == "ok leader")
        .unwrap_or_else(|| panic!("no leader: {states:?}"));
    assert_eq!(
        states.iter().filter(|s| *s == "ok leader").count(),
        1,
        "{states:?}"
    );
    let standby = 1 - leader;
    let watch = Watch::start(&bed, 2, "web");
    // SAFETY: kill(2) touches no memory of ours; the pid is a scheduler
    // this test bed started and still runs (it answered /healthz).
    assert_eq!(unsafe { libc::kill(pids[leader], libc::SIGKILL) }, 0);
    let t0 = Instant::now();
    while healthz(&urls[standby]) != "ok leader" {
        assert!(
            t0.elapsed() < Duration::from_secs(15),
            "the standby did not take the lead"
        );
        std::thread::sleep(Duration::from_millis(100));
    }
    eprintln!(
        "the standby leads {:?} after the leader was killed",
        t0.elapsed()
    );
    // The survivor reconciles: scale up through it.
    let survivor = bed.client(&urls[standby]);
    let s = bed
        .rt
        .block_on(survivor.post("/v1/apps/web/scale", &json!({"instances": 8})))
        .unwrap();
    assert_eq!(s.status, 200, "{}", s.text());
    let wait_on = |what: &str, want: u64| {
        let t0 = Instant::now();
        loop {
            let a = bed
                .rt
                .block_on(survivor.get("/v1/apps/web"))
                .unwrap()
                .json();
            if a["running"] == want {
                return a;
            }
            assert!(t0.elapsed() < Duration::from_secs(120), "{what}: {a:#}");
            std::thread::sleep(Duration::from_millis(250));
        }
    };
    wait_on("8 running after the handover", 8);
    let max = watch.finish();
    assert!(max <= 8, "never more than desired live: saw {max}");
    let after = ids(&bed, 2, "web");
    assert!(
        before.is_subset(&after),
        "the handover restarted instances: {before:?} vs {after:?}"
    );

    // Restart the whole scheduler: kill the survivor, start a new one on the
    // same etcd; the app, its placements and its instances are all there.
    // SAFETY: as above; this replica leads now, so it runs.
    assert_eq!(unsafe { libc::kill(pids[standby], libc::SIGKILL) }, 0);
    let addr = urls[0].trim_start_matches("http://").to_string();
    let mut fresh = Command::new(bin("zygote"))
        .args(["scheduler", "--listen", &addr, "--store"])
        .arg(format!("etcd:{}", bed.env["ETCD_URL"]))
        .arg("--tokens")
        .arg(&bed.env["TOKENS_FILE"])
        .arg("--state-dir")
        .arg(bed.dir.join("scheduler-restarted"))
        .stdout(std::process::Stdio::null())
        .stderr(std::fs::File::create(bed.dir.join("logs/scheduler-restarted.log")).unwrap())
        .spawn()
        .unwrap();
    let t0 = Instant::now();
    while healthz(&urls[0]) != "ok leader" {
        assert!(
            t0.elapsed() < Duration::from_secs(20),
            "the restarted scheduler does not lead"
        );
        std::thread::sleep(Duration::from_millis(100));
    }
    let a = bed.app("web");
    assert_eq!(a["desired"], 8, "{a:#}");
    std::thread::sleep(Duration::from_secs(3));
    let a = bed.app("web");
    assert_eq!(a["running"], 8, "{a:#}");
    assert_eq!(
        ids(&bed, 2, "web"),
        after,
        "a scheduler restart touches no instance"
    );
    let _ = fresh.kill();
    let _ = fresh.wait();
}
