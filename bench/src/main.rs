//! `zygote-bench`: zygote's benchmarks, run as `zygote bench ...` (the
//! `zygote` binary hands its arguments over). Kept out of the product
//! binaries so that they carry no measuring code and no plotting library.

use std::path::PathBuf;
use std::process::ExitCode;
use std::time::Duration;

use anyhow::Context;
use clap::{Parser, Subcommand};
use host::vmm::VmSpec;

/// zygote's benchmarks.
#[derive(Parser, Debug)]
#[command(name = "zygote bench", version, about)]
struct Cli {
    #[command(subcommand)]
    command: BenchCmd,
}

#[derive(clap::Args, Debug, Clone)]
struct VmArgs {
    /// Guest RAM in MiB.
    #[arg(long, default_value_t = 128)]
    memory: u64,
    /// Number of vCPUs.
    #[arg(long, default_value_t = 1)]
    vcpus: u8,
    /// Guest kernel (default: the one scripts/setup built).
    #[arg(long)]
    kernel: Option<PathBuf>,
    /// Guest root filesystem, an initramfs (default: the one scripts/setup built).
    #[arg(long)]
    rootfs: Option<PathBuf>,
    /// How long to wait for the guest agent, in seconds.
    #[arg(long, default_value_t = 180)]
    boot_timeout: u64,
}

#[derive(Subcommand, Debug)]
enum BenchCmd {
    /// Cold-boot N VMs in turn and time each phase.
    Boot {
        #[command(flatten)]
        vm: VmArgs,
        /// Number of boots.
        #[arg(long, default_value_t = 3)]
        count: usize,
        /// Also boot the same image under a peer VMM (`qemu`).
        #[arg(long, value_parser = ["qemu"])]
        peer: Option<String>,
        /// Print one JSON object instead of a table.
        #[arg(long)]
        json: bool,
    },
    /// Clone a warm master N times and compare with its cold boot (and with
    /// QEMU restoring a saved VM).
    Clone(BenchCloneArgs),
    /// What the daemon's HTTP layer costs: clone and health over HTTP against
    /// the same through host/, GET rate while clones start, daemon RSS.
    Api {
        /// Master RAM, MiB.
        #[arg(long, default_value_t = 128)]
        memory: u64,
        /// Clones each way (HTTP and direct).
        #[arg(long, default_value_t = 20)]
        count: usize,
        /// Health requests and direct pings each.
        #[arg(long, default_value_t = 200)]
        pings: usize,
        /// Target rate of GET /v1/instances/{id}, per second.
        #[arg(long, default_value_t = 1000)]
        rate: u64,
        /// Seconds the GET load lasts.
        #[arg(long, default_value_t = 10)]
        duration: u64,
        /// Live clones when the daemon's RSS is read (0: skip).
        #[arg(long, default_value_t = 300)]
        density: usize,
        /// Seconds the master's cold boot may take.
        #[arg(long, default_value_t = 300)]
        boot_timeout: u64,
        /// Print one JSON object instead of a table.
        #[arg(long)]
        json: bool,
    },
    /// The scheduler's placement core on simulated hosts: clones placed per
    /// second in batches and one at a time.
    Placement {
        /// Simulated hosts.
        #[arg(long, default_value_t = 1000)]
        hosts: usize,
        /// Clones per batch (and single placements per round).
        #[arg(long, default_value_t = 1000)]
        batch: u32,
        /// Batches, and rounds of single placements.
        #[arg(long, default_value_t = 40)]
        rounds: u32,
        /// Seed of the simulated hosts.
        #[arg(long, default_value_t = 1)]
        seed: u64,
        /// Print one JSON object instead of a table.
        #[arg(long)]
        json: bool,
    },
    /// The cluster on this machine (`scripts/cluster up`): scale an app from
    /// 1 to N instances in one request, then kill hosts.
    Scale {
        /// Hosts (daemons in network namespaces).
        #[arg(long, default_value_t = 3)]
        hosts: usize,
        /// Instances to scale to.
        #[arg(long, default_value_t = 300)]
        instances: u32,
        /// Hosts to kill once all are ready (daemon and VMs).
        #[arg(long, default_value_t = 0)]
        kill: usize,
        /// Guest RAM of the master, MiB.
        #[arg(long, default_value_t = 128)]
        memory: u64,
        /// Seconds the scale-up may take.
        #[arg(long, default_value_t = 600)]
        timeout: u64,
        /// `scripts/cluster` (default: found above this binary).
        #[arg(long)]
        script: Option<PathBuf>,
        /// An extra argument for every daemon (repeatable), e.g.
        /// `--daemon-arg=--max-starting --daemon-arg=4`.
        #[arg(long = "daemon-arg", allow_hyphen_values = true)]
        daemon_args: Vec<String>,
        /// Print one JSON object instead of a table.
        #[arg(long)]
        json: bool,
    },
    /// Fresh process vs fork() of a prepared VMM, on one snapshot (run by
    /// `clone`; prints one JSON object, µs).
    #[command(hide = true)]
    ForkBench {
        /// The snapshot directory.
        #[arg(long)]
        snapshot: PathBuf,
        /// Where the clones' vsock sockets go.
        #[arg(long)]
        dir: PathBuf,
        /// Clones each way.
        #[arg(long)]
        count: usize,
    },
}

/// `bench clone --connection`.
#[derive(clap::ValueEnum, Debug, Clone, Copy, PartialEq, Eq)]
enum Connection {
    /// Take over the agent connection carried from the master.
    Carry,
    /// Reset the vsock transport and connect anew.
    Reset,
}

#[derive(clap::Args, Debug)]
struct BenchCloneArgs {
    /// Jail the VMMs (the default; the comparison of jailed and bare
    /// clones runs either way).
    #[arg(long, overrides_with = "no_jail")]
    jail: bool,
    /// Do not jail the VMMs of the main run.
    #[arg(long)]
    no_jail: bool,
    /// Give the master a NIC and each clone a network (the default), and
    /// measure a networked clone's throughput and request latency through
    /// a published port.
    #[arg(long, overrides_with = "no_net")]
    net: bool,
    /// No NIC, no networks, no network measurement.
    #[arg(long)]
    no_net: bool,
    /// Guest RAM of the master, in MiB.
    #[arg(long, default_value_t = 256)]
    memory: u64,
    /// Number of vCPUs.
    #[arg(long, default_value_t = 1)]
    vcpus: u8,
    /// Guest kernel (default: the one scripts/setup built).
    #[arg(long)]
    kernel: Option<PathBuf>,
    /// Guest root filesystem, an initramfs (default: the one scripts/setup built).
    #[arg(long)]
    rootfs: Option<PathBuf>,
    /// How long a cold boot may take to reach the guest agent, in seconds.
    #[arg(long, default_value_t = 180)]
    boot_timeout: u64,
    /// Clones started one after another, and again in parallel.
    #[arg(long, default_value_t = 20)]
    count: usize,
    /// Clones brought up at once (parallel rate, density).
    #[arg(long, default_value_t = 8)]
    parallel: usize,
    /// Warm-up shell command run in the master before the freeze ('' for none).
    #[arg(long, default_value = bench::bench_clone::DEFAULT_WARMUP)]
    warmup: String,
    /// Also time QEMU restoring a saved VM (`qemu`).
    #[arg(long, value_parser = ["qemu"])]
    peer: Option<String>,
    /// Also start clones until --density-limit are alive (or memory runs low).
    #[arg(long)]
    density: bool,
    /// How many clones --density stops at.
    #[arg(long, default_value_t = 400)]
    density_limit: usize,
    /// --density goes on past this many clones that fail to start (0: it
    /// stops at the first).
    #[arg(long, default_value_t = 0)]
    density_max_failures: usize,
    /// --density stops starting clones after this many seconds.
    #[arg(long, default_value_t = 600)]
    density_time: u64,
    /// Also start this many clones, --parallel at a time, each killed once
    /// it answered, beside a busy clone: failed starts and the
    /// lost-interrupt watchdog's count.
    #[arg(long, default_value_t = 0)]
    starts: usize,
    /// RAM of a second master (no warm-up) whose clones are timed too, MiB; 0 skips it.
    #[arg(long, default_value_t = 2048)]
    big_memory: u64,
    /// Write the latency CDF plot here (SVG; '' for none).
    #[arg(long, default_value = "bench-clone.svg")]
    plot: String,
    /// Do not write the plot.
    #[arg(long)]
    no_plot: bool,
    /// Measure the idle clone (CPU and wake-ups) for 10 s instead of --idle-window.
    #[arg(long)]
    quick: bool,
    /// How a clone's host reaches its agent: `carry` takes over the
    /// connection carried from the master (no transport reset, no new
    /// connection), `reset` resets the vsock transport and connects anew
    /// (what a Firecracker restore does).
    #[arg(long, value_enum, default_value_t = Connection::Carry)]
    connection: Connection,
    /// Also start --count clones each way (carry and reset, in turn) from
    /// the same master and compare them.
    #[arg(long)]
    compare_connection: bool,
    /// How long the idle clone's CPU and wake-ups are measured, seconds.
    #[arg(long, default_value_t = 60)]
    idle_window: u64,
    /// Print one JSON object instead of a table.
    #[arg(long)]
    json: bool,
}

fn bench_clone(a: BenchCloneArgs) -> anyhow::Result<i32> {
    let spec = VmSpec::new(a.kernel.as_deref(), a.rootfs.as_deref(), a.memory, a.vcpus)?;
    let opts = bench::bench_clone::CloneBenchOptions {
        spec,
        boot_timeout: Duration::from_secs(a.boot_timeout),
        count: a.count,
        parallel: a.parallel,
        warmup: a.warmup,
        peer_qemu: a.peer.is_some(),
        density: a.density,
        density_limit: a.density_limit,
        density_max_failures: a.density_max_failures,
        density_time: Duration::from_secs(a.density_time),
        starts: a.starts,
        big_memory_mib: a.big_memory,
        idle_window: Duration::from_secs(if a.quick { 10 } else { a.idle_window }),
        jail: !a.no_jail,
        net: !a.no_net,
        vsock_reset: a.connection == Connection::Reset,
        compare_connection: a.compare_connection,
    };
    host::confine::configure(host::confine::Settings {
        jail: opts.jail,
        ..Default::default()
    });
    // Network slots kept ready, as the daemon does ("pool warm").
    host::vmnet::configure_pool(4);
    bench::bench_clone::install_interrupt_handler();
    let report =
        bench::bench_clone::bench_clone(&opts, &mut |msg| eprintln!("zygote bench: {msg}"))
            .context("clone benchmark")?;
    if a.json {
        println!("{}", report.to_json());
    } else {
        print!("{}", report.to_table());
    }
    if !a.no_plot && !a.plot.is_empty() {
        let path = PathBuf::from(&a.plot);
        report.write_plot(&path).context("clone benchmark plot")?;
        eprintln!("zygote bench: plot written to {}", path.display());
    }
    Ok(if report.errors.is_empty() { 0 } else { 1 })
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    match dispatch(cli) {
        Ok(code) => ExitCode::from(code.clamp(0, 255) as u8),
        Err(e) => {
            eprintln!("zygote bench: {e:#}");
            ExitCode::FAILURE
        }
    }
}

fn dispatch(cli: Cli) -> anyhow::Result<i32> {
    match cli.command {
        BenchCmd::Boot {
            vm,
            count,
            peer,
            json,
        } => {
            let spec = VmSpec::new(
                vm.kernel.as_deref(),
                vm.rootfs.as_deref(),
                vm.memory,
                vm.vcpus,
            )?;
            let report = bench::bench::bench_boot(
                &spec,
                count.max(1),
                peer.is_some(),
                Duration::from_secs(vm.boot_timeout),
                &mut |msg| eprintln!("zygote bench: {msg}"),
            )
            .context("boot benchmark")?;
            if json {
                println!("{}", report.to_json());
            } else {
                print!("{}", report.to_table());
            }
            Ok(0)
        }
        BenchCmd::Clone(args) => bench_clone(args),
        BenchCmd::Api {
            memory,
            count,
            pings,
            rate,
            duration,
            density,
            boot_timeout,
            json,
        } => {
            let opts = bench::bench_api::ApiBenchOptions {
                memory_mib: memory,
                count: count.max(1),
                pings: pings.max(1),
                rate: rate.max(1),
                duration: Duration::from_secs(duration.max(1)),
                density,
                boot_timeout: Duration::from_secs(boot_timeout),
            };
            let report =
                bench::bench_api::bench_api(&opts, &mut |m| eprintln!("zygote bench: {m}"))
                    .map_err(anyhow::Error::msg)
                    .context("api benchmark")?;
            if json {
                println!("{}", report.to_json());
            } else {
                print!("{}", report.to_table());
            }
            Ok(if report.errors.is_empty() { 0 } else { 1 })
        }
        BenchCmd::Placement {
            hosts,
            batch,
            rounds,
            seed,
            json,
        } => {
            let opts = bench::bench_placement::PlacementBenchOptions {
                hosts: hosts.max(1),
                batch: batch.max(1),
                rounds: rounds.max(1),
                seed,
            };
            let report = bench::bench_placement::bench_placement(&opts)
                .map_err(anyhow::Error::msg)
                .context("placement benchmark")?;
            if json {
                println!("{}", report.to_json());
            } else {
                print!("{}", report.to_table());
            }
            Ok(if report.bars_met { 0 } else { 1 })
        }
        BenchCmd::Scale {
            hosts,
            instances,
            kill,
            memory,
            timeout,
            script,
            daemon_args,
            json,
        } => {
            let opts = bench::bench_scale::ScaleBenchOptions {
                hosts: hosts.max(1),
                instances,
                kill,
                memory_mib: memory,
                timeout: Duration::from_secs(timeout.max(1)),
                script,
                daemon_args,
            };
            let report =
                bench::bench_scale::bench_scale(&opts, &mut |m| eprintln!("zygote bench: {m}"))
                    .map_err(anyhow::Error::msg)
                    .context("scale benchmark")?;
            if json {
                println!("{}", report.to_json());
            } else {
                print!("{}", report.to_table());
            }
            Ok(if report.errors.is_empty() { 0 } else { 1 })
        }
        BenchCmd::ForkBench {
            snapshot,
            dir,
            count,
        } => {
            let r = bench::fork_bench::run(&snapshot, count, &dir).map_err(anyhow::Error::msg)?;
            println!("{}", serde_json::to_string(&r)?);
            Ok(0)
        }
    }
}
