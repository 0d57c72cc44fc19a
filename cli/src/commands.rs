//! The CLI's commands in local mode (no daemon serves the state
//! directory): argument handling and output; the work is in the `host`
//! library. `remote.rs` is the same commands over the daemon; what both
//! print is in `output.rs`.

use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use anyhow::{bail, Context};
use host::clone::{CloneOptions, Started};
use host::store::Store;

use crate::{output, MasterCmd, SnapshotCmd};

pub fn master(what: MasterCmd) -> anyhow::Result<i32> {
    let store = Store::open_default();
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
            let opts = host::master::CreateOptions {
                net: net.then(|| host::vmnet::NetRequest {
                    egress,
                    ..Default::default()
                }),
                name,
                spec: vm.spec(console)?,
                warmup,
                boot_timeout: Duration::from_secs(vm.boot_timeout),
                warmup_timeout: Duration::from_secs(warmup_timeout),
                tenant: None,
                display_name: None,
                labels: Default::default(),
            };
            let mut out = std::io::stderr();
            let rec = host::master::create(&store, &opts, &mut out, &mut |_, m| {
                eprintln!("zygote: {m}")
            })?;
            println!("{}", rec.name);
            Ok(0)
        }
        MasterCmd::Ls { json } => {
            let clones: Vec<_> = store.clones().into_iter().flatten().collect();
            let mut rows = Vec::new();
            for m in store.masters() {
                match m {
                    Ok(m) => {
                        let live = clones
                            .iter()
                            .filter(|c| c.master == m.name && c.alive())
                            .count();
                        rows.push((m, live));
                    }
                    Err(e) => eprintln!("zygote: skipping a master: {e}"),
                }
            }
            if json {
                let v: Vec<_> = rows
                    .iter()
                    .map(|(m, live)| {
                        output::master_json(serde_json::to_value(m).unwrap_or_default(), *live)
                    })
                    .collect();
                println!("{}", serde_json::Value::Array(v));
            } else {
                let table: Vec<_> = rows
                    .iter()
                    .map(|(m, live)| output::MasterRow {
                        name: &m.name,
                        memory_mib: m.memory_mib,
                        vcpus: m.vcpus,
                        clones: *live,
                        warmup: m.warmup.as_deref(),
                    })
                    .collect();
                print!("{}", output::masters_table(&table));
            }
            Ok(0)
        }
        MasterCmd::Fetch { .. } => bail!(
            "master fetch goes through the zygote daemon (it pulls from a peer daemon over HTTP): start `zygote daemon`, or name it with --host"
        ),
        MasterCmd::Rm { name, force } => {
            host::master::remove(&store, &name, force)?;
            Ok(0)
        }
    }
}

static INTERRUPTED: AtomicBool = AtomicBool::new(false);

extern "C" fn on_signal(_: libc::c_int) {
    INTERRUPTED.store(true, Ordering::SeqCst);
}

/// From now on SIGINT and SIGTERM only set a flag ([`interrupted`]): an
/// attached `zygote clone` then stops its clones before it exits.
pub fn catch_interrupts() {
    // SAFETY: the handler only stores to an atomic.
    unsafe {
        libc::signal(libc::SIGINT, on_signal as *const () as libc::sighandler_t);
        libc::signal(libc::SIGTERM, on_signal as *const () as libc::sighandler_t);
    }
}

/// Whether SIGINT or SIGTERM arrived since [`catch_interrupts`].
pub fn interrupted() -> bool {
    INTERRUPTED.load(Ordering::SeqCst)
}

pub fn clone(name: &str, count: usize, opts: CloneOptions, timings: bool) -> anyhow::Result<i32> {
    let store = Store::open_default();
    if count == 0 {
        bail!("--count must be at least 1");
    }
    let detach = opts.detach;
    if !detach {
        catch_interrupts();
    }
    let results = host::clone::start(&store, name, count, &opts)?;
    let mut started: Vec<Started> = Vec::new();
    let mut failed = 0;
    for r in results {
        match r {
            Ok(s) => {
                println!("{}", s.id);
                if timings {
                    let t = s.timeline();
                    let times = output::CloneTimes {
                        running_ms: t.ms_since_spawn(t.vcpu_running_us),
                        connected_ms: t.ms_since_spawn(t.connected_us),
                        identity_ms: t.ms_since_spawn(t.identity_us),
                        ready_ms: t.ms_since_spawn(t.ping_us),
                    };
                    eprintln!("{}", output::clone_timings_line(&s.id, &times));
                }
                started.push(s);
            }
            Err(e) => {
                eprintln!("zygote: {e}");
                failed += 1;
            }
        }
    }
    use std::io::Write;
    let _ = std::io::stdout().flush();
    if detach {
        for s in &mut started {
            s.release();
        }
        return Ok(if failed > 0 { 1 } else { 0 });
    }
    // Attached: the clones run until we are interrupted or they all end.
    eprintln!(
        "zygote: {} clone(s) running; Ctrl-C stops them",
        started.len()
    );
    while !interrupted() && !started.is_empty() {
        started.retain_mut(|s| match s.vmm.has_exited() {
            false => true,
            true => {
                eprintln!("zygote: clone {} ended", s.id);
                let _ = host::clone::kill(&store, &s.id);
                false
            }
        });
        std::thread::sleep(Duration::from_millis(100));
    }
    for s in &started {
        let _ = host::clone::kill(&store, &s.id);
    }
    Ok(if failed > 0 { 1 } else { 0 })
}

pub fn ps(json: bool) -> anyhow::Result<i32> {
    let store = Store::open_default();
    let rows: Vec<_> = host::clone::ps(&store)
        .into_iter()
        .filter_map(|r| {
            r.map_err(|e| eprintln!("zygote: skipping a clone: {e}"))
                .ok()
        })
        .collect();
    if json {
        println!("{}", serde_json::to_string(&rows)?);
        return Ok(0);
    }
    print!("{}", output::ps_table(&rows));
    Ok(0)
}

pub fn kill(ids: Vec<String>, all: bool) -> anyhow::Result<i32> {
    let store = Store::open_default();
    let ids: Vec<String> = if all {
        store.clones().into_iter().flatten().map(|c| c.id).collect()
    } else {
        ids
    };
    let mut failed = 0;
    for id in ids {
        if let Err(e) = host::clone::kill(&store, &id) {
            eprintln!("zygote: {e}");
            failed += 1;
        }
    }
    Ok(if failed > 0 { 1 } else { 0 })
}

pub fn snapshot(what: SnapshotCmd) -> anyhow::Result<i32> {
    let store = Store::open_default();
    match what {
        SnapshotCmd::Save { name, dir } => {
            let t = std::time::Instant::now();
            let stats = host::master::save(&store, &name, &dir)
                .with_context(|| format!("saving master {name}"))?;
            eprintln!(
                "zygote: saved {name} to {} in {:.0} ms: {} MiB of RAM, {} KiB written, {} zero pages skipped",
                dir.display(),
                t.elapsed().as_secs_f64() * 1000.0,
                stats.memory_size >> 20,
                stats.data_bytes >> 10,
                stats.zero_pages_skipped
            );
            Ok(0)
        }
        SnapshotCmd::Load { dir, name } => {
            let rec = host::master::load(&store, &dir, name.as_deref())
                .with_context(|| format!("loading {}", dir.display()))?;
            println!("{}", rec.name);
            Ok(0)
        }
    }
}
