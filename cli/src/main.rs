//! `zygote`: the command-line tool. The commands on masters and clones go
//! through the zygote daemon when one serves the state directory (or
//! `--host`/`ZYGOTE_HOST` names one) and work on the state directory
//! directly otherwise (`--local` forces that): `remote::choose` decides,
//! `remote.rs` and `commands.rs` are the two ways. `zygote run` is always
//! local: a one-shot VM is no daemon object.

use std::path::PathBuf;
use std::process::ExitCode;
use std::time::Duration;

use clap::{Parser, Subcommand};
use host::vmm::VmSpec;

mod cluster;
mod commands;
mod daemon;
mod output;
mod remote;

/// zygote: KVM microVMs that start as copy-on-write clones of a warm master.
#[derive(Parser, Debug)]
#[command(name = "zygote", version, about)]
struct Cli {
    #[command(flatten)]
    target: remote::TargetArgs,
    /// Run VMMs this command starts unconfined: no namespaces, no root of
    /// their own, no uid change, no cgroup, no seccomp. For debugging only
    /// (strace, gdb); never for tenants. `ZYGOTE_NO_JAIL=1` does the same.
    #[arg(long, global = true)]
    no_jail: bool,
    #[command(subcommand)]
    command: Cmd,
}

#[derive(clap::Args, Debug, Clone)]
pub(crate) struct VmArgs {
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
    fn spec(&self, console: bool) -> Result<VmSpec, host::vmm::VmError> {
        let mut spec = VmSpec::new(
            self.kernel.as_deref(),
            self.rootfs.as_deref(),
            self.memory,
            self.vcpus,
        )?;
        spec.console = console;
        Ok(spec)
    }
}

/// A clone's network (its master needs `--net`).
#[derive(clap::Args, Debug, Clone, Default)]
pub(crate) struct NetArgs {
    /// Forward host port HOSTPORT (on every host address, localhost too)
    /// to GUESTPORT in the clone: HOSTPORT:GUESTPORT[/tcp|/udp]. Repeatable;
    /// with --count 1 only.
    #[arg(long, value_name = "HOSTPORT:GUESTPORT")]
    publish: Vec<String>,
    /// Let the clone reach beyond the host (masqueraded).
    #[arg(long)]
    egress: bool,
    /// Let the clone reach (and be reached by) the other clones that asked
    /// for peers.
    #[arg(long)]
    peers: bool,
    /// No network for the clone (its NIC's link stays down).
    #[arg(long, conflicts_with_all = ["publish", "egress", "peers"])]
    no_net: bool,
}

impl NetArgs {
    pub(crate) fn request(&self, count: usize) -> anyhow::Result<host::vmnet::NetRequest> {
        let publish = self
            .publish
            .iter()
            .map(|p| p.parse::<host::net::Publish>())
            .collect::<Result<Vec<_>, _>>()?;
        if !publish.is_empty() && count != 1 {
            anyhow::bail!("--publish gives a host port to one clone: use --count 1");
        }
        Ok(host::vmnet::NetRequest {
            disabled: self.no_net,
            egress: self.egress,
            publish,
            peers: self.peers,
        })
    }
}

/// A clone's resource limits (its VMM's cgroup).
#[derive(clap::Args, Debug, Clone, Copy, Default)]
pub(crate) struct LimitArgs {
    /// Memory of each clone's VMM in MiB (default: guest RAM + 64); a
    /// clone that exceeds it is killed alone.
    #[arg(long, value_name = "MIB")]
    memory_max: Option<u64>,
    /// CPU time of each clone, in cores (0.5 = half a core).
    #[arg(long)]
    cpus: Option<f64>,
    /// CPU weight of each clone against the others (1-10000, default 100).
    #[arg(long)]
    cpu_weight: Option<u16>,
}

impl LimitArgs {
    pub(crate) fn limits(&self) -> anyhow::Result<host::confine::VmLimits> {
        let l = host::confine::VmLimits {
            memory_max_mib: self.memory_max,
            cpus: self.cpus,
            cpu_weight: self.cpu_weight,
        };
        l.validate().map_err(anyhow::Error::msg)?;
        Ok(l)
    }
}

/// `zygote clone --connection`.
#[derive(clap::ValueEnum, Debug, Clone, Copy, PartialEq, Eq)]
pub enum Connection {
    /// Take over the agent connection carried from the master.
    Carry,
    /// Reset the vsock transport and connect anew.
    Reset,
}

#[derive(Subcommand, Debug)]
pub(crate) enum Cmd {
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
        /// Give the VM a network (implied by --publish, --egress, --peers).
        #[arg(long)]
        net: bool,
        #[command(flatten)]
        net_args: NetArgs,
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
        /// How this command reaches each clone's agent: `carry` takes over
        /// the connection carried from the master (no transport reset, no
        /// new connection), `reset` resets the clone's vsock transport and
        /// connects anew, as a Firecracker restore does. For comparison
        /// and debugging; without a daemon only.
        #[arg(long, value_enum, default_value_t = Connection::Carry)]
        connection: Connection,
        #[command(flatten)]
        limits: LimitArgs,
        #[command(flatten)]
        net: NetArgs,
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
    /// Serve the HTTP API for this host's masters and clones.
    Daemon(daemon::DaemonArgs),
    /// Serve the cluster scheduler's API: apps placed across joined daemons.
    Scheduler(cluster::SchedulerArgs),
    /// Apps on the cluster scheduler: declare, list, scale, remove.
    App {
        #[command(flatten)]
        target: cluster::SchedulerTarget,
        #[command(subcommand)]
        what: cluster::AppCmd,
    },
    /// The cluster scheduler's hosts: list, drain, undrain.
    Host {
        #[command(flatten)]
        target: cluster::SchedulerTarget,
        #[command(subcommand)]
        what: cluster::HostCmd,
    },
    /// Benchmarks (`zygote bench boot|clone|api|placement|scale --help`); runs `zygote-bench`,
    /// which is built next to `zygote`.
    #[command(disable_help_flag = true)]
    Bench {
        /// What `zygote-bench` takes.
        #[arg(trailing_var_arg = true, allow_hyphen_values = true)]
        args: Vec<std::ffi::OsString>,
    },
}

#[derive(Subcommand, Debug)]
pub(crate) enum MasterCmd {
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
        /// Give it a network device: its clones then each get a network of
        /// their own (MAC, address, published ports); its warm-up gets one
        /// too.
        #[arg(long)]
        net: bool,
        /// Let its warm-up reach beyond the host (with --net).
        #[arg(long, requires = "net")]
        egress: bool,
    },
    /// List masters.
    Ls {
        /// One JSON array instead of a table.
        #[arg(long)]
        json: bool,
    },
    /// Pull master NAME from a peer daemon (data pages only, checksummed,
    /// resumed where it stopped); needs the daemon.
    Fetch {
        /// The name it gets here.
        name: String,
        /// The peer daemon: http://HOST:PORT.
        #[arg(long)]
        from: String,
        /// Its name on the peer (default: NAME).
        #[arg(long)]
        source_name: Option<String>,
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
pub(crate) enum SnapshotCmd {
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

fn main() -> ExitCode {
    let cli = Cli::parse();
    if cli.no_jail {
        host::confine::configure(host::confine::Settings {
            jail: false,
            ..Default::default()
        });
    }
    match dispatch(cli) {
        Ok(code) => ExitCode::from(code.clamp(0, 255) as u8),
        Err(e) => {
            eprintln!("zygote: {e:#}");
            let code = e
                .downcast_ref::<host::run::RunError>()
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
            net,
            net_args,
            cmd,
        } => {
            let spec = vm.spec(console)?;
            let req = net_args.request(1)?;
            let opts = host::run::RunOptions {
                spec,
                boot_timeout: Duration::from_secs(vm.boot_timeout),
                argv: cmd,
                timings,
                net: ((net || req.wants_network()) && !req.disabled).then_some(req),
            };
            Ok(host::run::run(&opts)?)
        }
        Cmd::Bench { args } => bench(args),
        Cmd::Daemon(a) => daemon::run(a),
        Cmd::Scheduler(a) => cluster::run(a),
        Cmd::App { target, what } => cluster::app(&target, cluster_token(&cli.target)?, what),
        Cmd::Host { target, what } => cluster::host(&target, cluster_token(&cli.target)?, what),
        cmd => match remote::choose(&cli.target)? {
            remote::Choice::Local => local(cmd),
            remote::Choice::Daemon(d) => {
                let token = remote::token(
                    cli.target.token_file.as_deref(),
                    std::env::var("ZYGOTE_TOKEN").ok(),
                )?;
                remote::dispatch(&remote::Remote::new(d, token)?, cmd)
            }
        },
    }
}

/// The commands on the state directory itself, over the `host` library.
fn local(cmd: Cmd) -> anyhow::Result<i32> {
    match cmd {
        Cmd::Master { what } => commands::master(what),
        Cmd::Clone {
            name,
            count,
            detach,
            parallel,
            timeout,
            timings,
            connection,
            limits,
            net,
        } => commands::clone(
            &name,
            count,
            host::clone::CloneOptions {
                detach,
                timeout: Duration::from_secs(timeout),
                parallel,
                limits: limits.limits()?,
                net: net.request(count)?,
                vsock_reset: connection == Connection::Reset,
            },
            timings,
        ),
        Cmd::Exec { clone, cmd } => {
            let store = host::store::Store::open_default();
            let mut agent = host::clone::connect(&store, &clone)?;
            Ok(host::run::exec_stdio(&mut agent, &cmd)?)
        }
        Cmd::Ps { json } => commands::ps(json),
        Cmd::Kill { clones, all } => commands::kill(clones, all),
        Cmd::Snapshot { what } => commands::snapshot(what),
        Cmd::Run { .. }
        | Cmd::Bench { .. }
        | Cmd::Daemon(_)
        | Cmd::Scheduler(_)
        | Cmd::App { .. }
        | Cmd::Host { .. } => {
            anyhow::bail!(
                "`zygote run`, `daemon` and `bench` are dispatched before the mode is chosen"
            )
        }
    }
}

/// The token for the scheduler: `--token-file`, else `$ZYGOTE_TOKEN`.
fn cluster_token(t: &remote::TargetArgs) -> anyhow::Result<Option<String>> {
    remote::token(t.token_file.as_deref(), std::env::var("ZYGOTE_TOKEN").ok())
}

/// `zygote bench ...`: the benchmarks live in their own binary so that the
/// product carries none of their code; this runs it with the same arguments.
fn bench(args: Vec<std::ffi::OsString>) -> anyhow::Result<i32> {
    use std::os::unix::process::CommandExt;
    let exe = std::env::current_exe()?;
    let bench = exe.with_file_name("zygote-bench");
    if !bench.is_file() {
        anyhow::bail!(
            "{} not found: build it with `cargo build --release -p bench`",
            bench.display()
        );
    }
    let err = std::process::Command::new(&bench).args(args).exec();
    Err(anyhow::anyhow!("cannot run {}: {err}", bench.display()))
}
