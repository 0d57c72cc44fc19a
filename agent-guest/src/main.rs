//! zygote-agent: PID 1 of zygote guests.
//!
//! Boots the userspace side of the guest (console marker, mounts,
//! hostname), reaps every process, and answers the host over vsock port
//! [`proto::AGENT_VSOCK_PORT`]: Ping, Exec (with streamed stdin, stdout and
//! stderr), Identity, NetTest (a TCP test server, [`net_test`]) and
//! Shutdown. See `docs/agent-protocol.md`.
//!
//! Guest kernel code is emulated and slow (a syscall ~0.5 ms), guest user
//! code is native: the agent avoids syscalls above all. It has no Rust
//! runtime start-up (`no_main`: no fd sanitizing, no stack-overflow
//! handler, hence no per-thread signal stacks), spawns with
//! `clone(CLONE_VM|CLONE_VFORK)` + `execve` (no fork), answers Ping in-process with one read and one write, and
//! multiplexes a command's pipes with `poll` in the connection's thread.
//!
//! Runs on a development host too (not as PID 1: no mounts, no reboot),
//! which is how its tests drive the connection handler.
#![cfg_attr(not(test), no_main)]

mod conn;
mod identity;
mod init;
mod net;
mod net_test;
mod netlink;
mod reaper;
mod spawn;
mod sys;
#[cfg(test)]
mod tests;

use conn::Agent;
use reaper::Reaper;

/// Entry point, called by the C runtime: the Rust runtime's start-up
/// (`lang_start`) costs a dozen syscalls the agent does not need.
#[cfg(not(test))]
#[unsafe(no_mangle)]
pub extern "C" fn main(_argc: libc::c_int, _argv: *const *const libc::c_char) -> libc::c_int {
    run()
}

#[cfg_attr(test, allow(dead_code))]
fn run() -> ! {
    let pid1 = std::process::id() == 1;
    if pid1 {
        init::start_console();
        init::setup_pid1();
    }
    // A write to a connection the host closed must fail with EPIPE, not
    // kill the agent. (Spawned commands get SIGPIPE back to default.)
    // SAFETY: SIG_IGN needs no handler.
    unsafe { libc::signal(libc::SIGPIPE, libc::SIG_IGN) };

    // `--unix-listen PATH`: serve a Unix socket instead of vsock, to run
    // the real binary on a development host (e.g. as PID 1 of a PID
    // namespace). Plain words of the kernel command line also end up in
    // argv; only this exact flag counts.
    let mut args = std::env::args_os().skip(1);
    let unix_path = match (args.next(), args.next()) {
        (Some(flag), Some(path)) if flag == "--unix-listen" => Some(path),
        _ => None,
    };
    let listener = match unix_path {
        Some(path) => match init::listen_unix(&path.to_string_lossy()) {
            Ok(listener) => {
                let _ = sys::console_line(proto::READY_MARKER);
                Some(listener)
            }
            Err(e) => {
                let path = path.to_string_lossy();
                let ready = format!("{} (no socket: {path}: {e})", proto::READY_MARKER);
                let _ = sys::console_line(&ready);
                None
            }
        },
        None => listen_vsock(),
    };

    // Started after the ready line: the host connects meanwhile.
    let agent: &'static Agent = Box::leak(Box::new(Agent {
        base_env: init::base_env(pid1),
        reaper: Reaper::global(),
        shutdown: Box::new(move || {
            if pid1 {
                init::power_off();
            } else {
                std::process::exit(0);
            }
        }),
        apply_identity: Box::new(move |id| {
            if pid1 {
                identity::apply(id)
            } else {
                Err("not the guest's init: identity not applied".into())
            }
        }),
        prepare_freeze: Box::new(move || {
            if pid1 {
                net::prepare_freeze()
            } else {
                Err("not the guest's init: nothing prepared".into())
            }
        }),
        start_net_test: Box::new(|port| net_test::start(port).map_err(|e| e.to_error())),
    }));

    let Some(listener) = listener else {
        if !pid1 {
            std::process::exit(1);
        }
        // Nothing to serve, but PID 1 must never exit (the kernel would
        // panic): the reaper thread keeps reaping.
        loop {
            std::thread::park();
        }
    };
    static POOL: conn::Pool<std::fs::File> = conn::Pool::new();
    loop {
        match init::accept(&listener) {
            Ok(stream) => POOL.dispatch(agent, stream),
            Err(e) => {
                sys::log(&format!("accept: {e}"));
                std::thread::sleep(std::time::Duration::from_millis(100));
            }
        }
    }
}

/// Listens on vsock and writes the ready line (with the reason if vsock
/// will not work).
fn listen_vsock() -> Option<std::os::fd::OwnedFd> {
    match init::listen_vsock(proto::AGENT_VSOCK_PORT) {
        Ok(listener) => {
            let line = match init::vsock_problem() {
                None => proto::READY_MARKER.to_string(),
                Some(why) => format!("{} (no vsock: {why})", proto::READY_MARKER),
            };
            let _ = sys::console_line(&line);
            Some(listener)
        }
        Err(e) => {
            let _ = sys::console_line(&format!("{} (no vsock: {e})", proto::READY_MARKER));
            None
        }
    }
}
