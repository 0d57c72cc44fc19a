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
    }
}
