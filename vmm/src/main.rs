//! `zygote-vmm`: runs one microVM in this process. Started by the `zygote`
//! tools, not meant to be run by hand (but it can be).

use std::path::PathBuf;
use std::sync::Arc;

use clap::Parser;
use vmm::builder::{run_vm, ConsoleOut, VmConfig};
use vmm::events::{now_us, Event, EventSink, ExitReason};

/// Runs one microVM; reports events as JSON lines on stdout.
#[derive(Parser, Debug)]
#[command(name = "zygote-vmm", version)]
struct Args {
    /// Guest kernel: ELF vmlinux (or bzImage).
    #[arg(long)]
    kernel: PathBuf,
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
    // If whoever started us dies, so do we: no VM outlives its owner.
    // SAFETY: prctl with PR_SET_PDEATHSIG and a valid signal has no memory effects.
    unsafe { libc::prctl(libc::PR_SET_PDEATHSIG, libc::SIGKILL) };
    let args = Args::parse();
    let events = Arc::new(EventSink::new(Box::new(std::io::stdout())));
    events.emit(&Event::Started { t_us: started });
    let cfg = VmConfig {
        kernel: args.kernel,
        initrd: args.initrd,
        cmdline: args.cmdline,
        memory_mib: args.memory,
        vcpus: args.vcpus,
        vsock_uds: args.vsock.clone(),
        guest_cid: args.cid,
        console: match args.console.as_str() {
            "none" => ConsoleOut::None,
            "stderr" => ConsoleOut::Stderr,
            path => ConsoleOut::File(path.into()),
        },
    };
    let (reason, message) = match run_vm(&cfg, events.clone()) {
        Ok(end) => (end.reason, end.message),
        Err(e) => (ExitReason::Error, e.to_string()),
    };
    if let Some(uds) = &args.vsock {
        let _ = std::fs::remove_file(uds);
    }
    if reason != ExitReason::Shutdown {
        eprintln!("zygote-vmm: {message}");
    }
    events.emit(&Event::Exit {
        t_us: now_us(),
        reason: reason.clone(),
        message,
    });
    std::process::exit(reason.exit_code());
}
