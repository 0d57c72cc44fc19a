//! `zygote`: the command-line tool.

use std::path::PathBuf;
use std::process::ExitCode;
use std::time::Duration;

use anyhow::Context;
use clap::{Parser, Subcommand};

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
    /// Benchmarks.
    Bench {
        #[command(subcommand)]
        what: BenchCmd,
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
