//! `zygote-vmm`: runs one microVM in this process. Started by the `zygote`
//! tools with arguments from [`proto::launch::VmmLaunch::to_args`]; not
//! meant to be run by hand (but it can be: `--help`). It parses, runs and
//! reports (errors with their causes, [`vmm::error_chain`]); it must not
//! hold VMM logic, which is the library's.

use std::sync::Arc;

use proto::events::{now_us, Event, EventSink, ExitReason};
use proto::launch::{Parsed, SnapshotCheck, VmSource, VmmLaunch, USAGE};
use vmm::builder::{restore_vm, run_vm};
use vmm::error_chain;

fn main() {
    let started = now_us();
    let launch = match VmmLaunch::parse(std::env::args_os().skip(1)) {
        Ok(Parsed::Launch(l)) => l,
        Ok(Parsed::Help) => {
            print!("{USAGE}");
            return;
        }
        Ok(Parsed::Version) => {
            println!("zygote-vmm {}", env!("CARGO_PKG_VERSION"));
            return;
        }
        Err(e) => {
            eprintln!("zygote-vmm: {e}");
            std::process::exit(2);
        }
    };
    if launch.seccomp {
        // A confined VMM is not dumpable: no core file of guest memory, no
        // ptrace or /proc/PID/mem by its (unprivileged) uid. The jail cannot
        // set this for us: execve resets it. `--no-seccomp` (debugging)
        // keeps it dumpable for gdb.
        // SAFETY: prctl with PR_SET_DUMPABLE and 0 has no memory effects.
        unsafe { libc::prctl(libc::PR_SET_DUMPABLE, 0) };
    }
    if !launch.detach {
        // If whoever started us dies, so do we: no VM outlives its owner.
        // SAFETY: prctl with PR_SET_PDEATHSIG and a valid signal has no memory effects.
        unsafe { libc::prctl(libc::PR_SET_PDEATHSIG, libc::SIGKILL) };
    }
    if let VmSource::CheckSnapshot { snapshot } = &launch.source {
        let check = match vmm::snapshot::check(snapshot) {
            Ok(s) => SnapshotCheck {
                ok: true,
                error: None,
                memory_mib: s.memory_mib,
                vcpus: s.vcpus.len() as u8,
                net: s.devices.iter().any(|d| {
                    matches!(
                        d.device.model,
                        vmm::devices::virtio::persist::DeviceModelState::Net(_)
                    )
                }),
            },
            Err(e) => SnapshotCheck {
                error: Some(error_chain(&e)),
                ..Default::default()
            },
        };
        println!("{}", serde_json::to_string(&check).unwrap_or_default());
        std::process::exit(if check.ok { 0 } else { 1 });
    }
    let events = Arc::new(EventSink::new(Box::new(std::io::stdout())));
    events.emit(&Event::Started { t_us: started });
    let result = match &launch.source {
        VmSource::Restore { snapshot } => restore_vm(&launch, snapshot, events.clone()),
        VmSource::Boot(boot) => run_vm(&launch, boot, events.clone()),
        VmSource::CheckSnapshot { .. } => unreachable!("answered above"),
    };
    let (reason, message) = match result {
        Ok(end) => (end.reason, end.message),
        Err(e) => (ExitReason::Error, error_chain(&e)),
    };
    for path in [&launch.vsock, &launch.control].into_iter().flatten() {
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
