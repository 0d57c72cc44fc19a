//! `zygote`: the command-line tool.

use std::path::PathBuf;
use std::process::ExitCode;
use std::time::Duration;

use anyhow::Context;
use clap::{Parser, Subcommand};

mod commands;

/// zygote: KVM microVMs that start as copy-on-write clones of a warm master.
#[derive(Parser, Debug)]
#[command(name = "zygote", version, about)]
struct Cli {
    #[command(subcommand)]
    command: Cmd,
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

impl VmArgs {
    fn spec(&self, console: bool) -> Result<api::vm::VmSpec, api::vm::VmError> {
        api::run::spec(
            self.kernel.as_deref(),
            self.rootfs.as_deref(),
            self.memory,
            self.vcpus,
            console,
        )
    }
}

#[derive(Subcommand, Debug)]
enum Cmd {
    /// Boot a fresh microVM, run CMD in it, shut it down; exits with CMD's code.
    Run {
        #[command(flatten)]
        vm: VmArgs,
        /// Also show the guest's serial console on stderr.
        #[arg(long)]
        console: bool,
        /// Print how long each phase (boot, agent, command) took, on stderr.
        #[arg(long)]
        timings: bool,
        /// The command and its arguments.
        #[arg(required = true, last = true)]
        cmd: Vec<String>,
    },
    /// Masters: VMs booted once, warmed up and frozen for cloning.
    Master {
        #[command(subcommand)]
        what: MasterCmd,
    },
    /// Start clone(s) of a frozen master; prints their ids.
    Clone {
        /// The master.
        name: String,
        /// How many clones.
        #[arg(long, default_value_t = 1)]
        count: usize,
        /// Leave the clones running and return (else they run until this
        /// command is interrupted).
        #[arg(long)]
        detach: bool,
        /// How many clones to bring up at once.
        #[arg(long, default_value_t = 8)]
        parallel: usize,
        /// Seconds a clone may take to answer.
        #[arg(long, default_value_t = 60)]
        timeout: u64,
        /// Print how long each clone took to start, on stderr.
        #[arg(long)]
        timings: bool,
    },
    /// Run a command in a live clone; exits with its code.
    Exec {
        /// The clone id.
        clone: String,
        /// The command and its arguments.
        #[arg(required = true, last = true)]
        cmd: Vec<String>,
    },
    /// List clones.
    Ps {
        /// One JSON array instead of a table.
        #[arg(long)]
        json: bool,
    },
    /// Kill clones and remove their files.
    Kill {
        /// Clone ids.
        #[arg(required_unless_present = "all")]
        clones: Vec<String>,
        /// Every clone.
        #[arg(long, conflicts_with = "clones")]
        all: bool,
    },
    /// Masters on disk: save one to a directory, load one from it.
    Snapshot {
        #[command(subcommand)]
        what: SnapshotCmd,
    },
    /// Benchmarks.
    Bench {
        #[command(subcommand)]
        what: BenchCmd,
    },
}

#[derive(Subcommand, Debug)]
enum MasterCmd {
    /// Boot a VM, run the warm-up in it, freeze it as master NAME.
    Create {
        /// Master name (a-z, 0-9, '-', '.'; it becomes part of clone hostnames).
        name: String,
        #[command(flatten)]
        vm: VmArgs,
        /// Shell command to run before the freeze (its output is shown).
        #[arg(long)]
        warmup: Option<String>,
        /// Seconds the warm-up may take.
        #[arg(long, default_value_t = 600)]
        warmup_timeout: u64,
        /// Also show the guest's serial console on stderr.
        #[arg(long)]
        console: bool,
    },
    /// List masters.
    Ls {
        /// One JSON array instead of a table.
        #[arg(long)]
        json: bool,
    },
    /// Remove a master.
    Rm {
        /// Master name.
        name: String,
        /// Remove it even while clones of it run (they keep running).
        #[arg(long)]
        force: bool,
    },
}

#[derive(Subcommand, Debug)]
enum SnapshotCmd {
    /// Write master NAME to the new directory DIR (sparse, checksummed).
    Save {
        /// Master name.
        name: String,
        /// Directory to create.
        dir: PathBuf,
    },
    /// Check the snapshot in DIR and register it as a master.
    Load {
        /// Snapshot directory.
        dir: PathBuf,
        /// Master name (default: the directory's name).
        #[arg(long = "as")]
        name: Option<String>,
    },
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
}

#[derive(clap::Args, Debug)]
struct BenchCloneArgs {
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
    #[arg(long, default_value = api::bench_clone::DEFAULT_WARMUP)]
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
    /// RAM of a second master (no warm-up) whose clones are timed too, MiB; 0 skips it.
    #[arg(long, default_value_t = 2048)]
    big_memory: u64,
    /// Write the latency CDF plot here (SVG; '' for none).
    #[arg(long, default_value = "bench-clone.svg")]
    plot: String,
    /// Do not write the plot.
    #[arg(long)]
    no_plot: bool,
    /// Measure the idle clone for 10 s instead of 30 s.
    #[arg(long)]
    quick: bool,
    /// Print one JSON object instead of a table.
    #[arg(long)]
    json: bool,
}

fn bench_clone(a: BenchCloneArgs) -> anyhow::Result<i32> {
    let spec = api::run::spec(
        a.kernel.as_deref(),
        a.rootfs.as_deref(),
        a.memory,
        a.vcpus,
        false,
    )?;
    let opts = api::bench_clone::CloneBenchOptions {
        spec,
        boot_timeout: Duration::from_secs(a.boot_timeout),
        count: a.count,
        parallel: a.parallel,
        warmup: a.warmup,
        peer_qemu: a.peer.is_some(),
        density: a.density,
        density_limit: a.density_limit,
        density_max_failures: a.density_max_failures,
        big_memory_mib: a.big_memory,
        idle_window: Duration::from_secs(if a.quick { 10 } else { 30 }),
    };
    api::bench_clone::install_interrupt_handler();
    let report = api::bench_clone::bench_clone(&opts, &mut |msg| eprintln!("zygote bench: {msg}"))
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
            eprintln!("zygote: {e:#}");
            let code = e
                .downcast_ref::<api::run::RunError>()
                .map(|r| r.exit_code())
                .unwrap_or(1);
            ExitCode::from(code as u8)
        }
    }
}

fn dispatch(cli: Cli) -> anyhow::Result<i32> {
    match cli.command {
        Cmd::Run {
            vm,
            console,
            timings,
            cmd,
        } => {
            let spec = vm.spec(console)?;
            let opts = api::run::RunOptions {
                spec,
                boot_timeout: Duration::from_secs(vm.boot_timeout),
                argv: cmd,
                timings,
            };
            Ok(api::run::run(&opts)?)
        }
        Cmd::Master { what } => commands::master(what),
        Cmd::Clone {
            name,
            count,
            detach,
            parallel,
            timeout,
            timings,
        } => commands::clone(&name, count, detach, parallel, timeout, timings),
        Cmd::Exec { clone, cmd } => {
            let store = api::store::Store::open_default();
            let mut agent = api::clone::connect(&store, &clone)?;
            Ok(api::run::exec_stdio(&mut agent, &cmd)?)
        }
        Cmd::Ps { json } => commands::ps(json),
        Cmd::Kill { clones, all } => commands::kill(clones, all),
        Cmd::Snapshot { what } => commands::snapshot(what),
        Cmd::Bench {
            what:
                BenchCmd::Boot {
                    vm,
                    count,
                    peer,
                    json,
                },
        } => {
            let spec = vm.spec(false)?;
            let report = api::bench::bench_boot(
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
        Cmd::Bench {
            what: BenchCmd::Clone(args),
        } => bench_clone(args),
    }
}
