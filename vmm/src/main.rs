//! `zygote-vmm`: runs one microVM in this process. Started by the `zygote`
//! tools, not meant to be run by hand (but it can be).

use std::path::PathBuf;
use std::sync::Arc;

use clap::Parser;
use vmm::builder::{restore_vm, run_vm, ConsoleOut, RestoreConfig, VmConfig};
use vmm::events::{now_us, Event, EventSink, ExitReason};

/// Runs one microVM; reports events as JSON lines on stdout.
#[derive(Parser, Debug)]
#[command(name = "zygote-vmm", version)]
struct Args {
    /// Guest kernel: ELF vmlinux (or bzImage).
    #[arg(long, required_unless_present = "restore")]
    kernel: Option<PathBuf>,
    /// Start from this snapshot directory instead of booting: guest RAM is
    /// its memory file mapped copy-on-write.
    #[arg(long, conflicts_with_all = ["kernel", "initrd", "snapshot_dir"])]
    restore: Option<PathBuf>,
    /// Boot a VM that can be frozen: its RAM is created as `memory` in this
    /// directory and a freeze (see --control) writes the snapshot there.
    #[arg(long, requires = "control")]
    snapshot_dir: Option<PathBuf>,
    /// Unix socket for control requests (freeze).
    #[arg(long)]
    control: Option<PathBuf>,
    /// Measure N clone starts of the --restore snapshot as a fresh process
    /// and as a fork() of a prepared one; prints one JSON object (µs).
    /// Sockets go in the directory given with --vsock.
    #[arg(long, requires_all = ["restore", "vsock"], hide = true)]
    fork_bench: Option<usize>,
    /// Keep running when the process that started this one ends (a clone
    /// that outlives the command that made it).
    #[arg(long)]
    detach: bool,
    /// Initramfs (cpio).
    #[arg(long)]
    initrd: Option<PathBuf>,
    /// The image's kernel command line (the VMM adds console and devices).
    #[arg(long, default_value = "")]
    cmdline: String,
    /// Guest RAM in MiB.
    #[arg(long, default_value_t = 128)]
    memory: u64,
    /// vCPUs.
    #[arg(long, default_value_t = 1)]
    vcpus: u8,
    /// Unix socket for the host side of virtio-vsock.
    #[arg(long)]
    vsock: Option<PathBuf>,
    /// Guest vsock CID.
    #[arg(long, default_value_t = 3)]
    cid: u64,
    /// Serial console: `none`, `stderr` or a file path.
    #[arg(long, default_value = "none")]
    console: String,
}

fn main() {
    let started = now_us();
    let args = Args::parse();
    if !args.detach {
        // If whoever started us dies, so do we: no VM outlives its owner.
        // SAFETY: prctl with PR_SET_PDEATHSIG and a valid signal has no memory effects.
        unsafe { libc::prctl(libc::PR_SET_PDEATHSIG, libc::SIGKILL) };
    }
    if let (Some(n), Some(snapshot), Some(dir)) = (args.fork_bench, &args.restore, &args.vsock) {
        match vmm::fork_bench::run(snapshot, n, dir) {
            Ok(r) => {
                println!("{}", serde_json::to_string(&r).unwrap_or_default());
                std::process::exit(0);
            }
            Err(e) => {
                eprintln!("zygote-vmm: fork bench: {e}");
                std::process::exit(1);
            }
        }
    }
    let events = Arc::new(EventSink::new(Box::new(std::io::stdout())));
    events.emit(&Event::Started { t_us: started });
    let console = match args.console.as_str() {
        "none" => ConsoleOut::None,
        "stderr" => ConsoleOut::Stderr,
        path => ConsoleOut::File(path.into()),
    };
    let result = match (&args.restore, &args.kernel) {
        (Some(snapshot), _) => restore_vm(
            &RestoreConfig {
                snapshot: snapshot.clone(),
                vsock_uds: args.vsock.clone(),
                console,
            },
            events.clone(),
        ),
        (None, Some(kernel)) => run_vm(
            &VmConfig {
                kernel: kernel.clone(),
                initrd: args.initrd,
                cmdline: args.cmdline,
                memory_mib: args.memory,
                vcpus: args.vcpus,
                vsock_uds: args.vsock.clone(),
                guest_cid: args.cid,
                console,
                snapshot_dir: args.snapshot_dir,
                control: args.control.clone(),
            },
            events.clone(),
        ),
        (None, None) => unreachable!("clap requires --kernel without --restore"),
    };
    let (reason, message) = match result {
        Ok(end) => (end.reason, end.message),
        Err(e) => (ExitReason::Error, e.to_string()),
    };
    for path in [&args.vsock, &args.control].into_iter().flatten() {
        let _ = std::fs::remove_file(path);
    }
    if !matches!(reason, ExitReason::Shutdown | ExitReason::Frozen) {
        eprintln!("zygote-vmm: {message}");
    }
    events.emit(&Event::Exit {
        t_us: now_us(),
        reason: reason.clone(),
        message,
    });
    std::process::exit(reason.exit_code());
}
