//! End-to-end tests: real KVM, real guest kernel, real agent.
//!
//! Every guest boot costs tens of seconds on hosts whose KVM emulates guest
//! kernel code, so one VM serves all the checks that can share it, and the
//! CLI tests combine their checks per boot.

use std::time::Duration;

use host::agent::{AgentClient, AgentError};
use host::vmm::{VmExit, VmSpec, VmmProcess};
use proto::events::ExitReason;
use proto::{ErrorCode, ExecRequest};
use zygote_tests::{host_is_kvm_pvm, image, kernel_release, processes_mentioning, Sandbox};

const BOOT_TIMEOUT: Duration = Duration::from_secs(240);

fn sh(script: &str) -> ExecRequest {
    ExecRequest::new(["sh", "-c", script])
}

fn meminfo_kib(text: &str) -> u64 {
    text.lines()
        .find(|l| l.starts_with("MemTotal:"))
        .and_then(|l| l.split_whitespace().nth(1))
        .and_then(|v| v.parse().ok())
        .unwrap_or_else(|| panic!("no MemTotal in {text:?}"))
}

/// One VM (64 MiB, 2 vCPUs) for everything the agent API can check.
#[test]
fn one_vm_runs_commands_through_the_agent() {
    let image = image();
    let release = kernel_release(&image);
    let sandbox = Sandbox::new("shared");
    let spec = VmSpec {
        image,
        memory_mib: 64,
        vcpus: 2,
        console: false,
        runtime_root: Some(sandbox.dir.clone()),
        snapshot_dir: None,
    };
    let mut vm = VmmProcess::boot(&spec).expect("spawn VMM");
    let pid = vm.pid();
    vm.wait_ready(BOOT_TIMEOUT).expect("agent ready");
    let mut agent = AgentClient::connect(&vm.vsock_path()).expect("connect agent");
    assert!(agent.ping().expect("ping") > 0);

    // The guest runs the kernel we built, not the host's.
    let (st, out, _) = agent
        .exec_collect(ExecRequest::new(["uname", "-r"]))
        .unwrap();
    assert!(st.success());
    assert_eq!(String::from_utf8_lossy(&out).trim(), release);

    // Memory: MemTotal is the RAM we gave minus what the kernel reserves.
    let (_, out, _) = agent
        .exec_collect(ExecRequest::new(["cat", "/proc/meminfo"]))
        .unwrap();
    let total = meminfo_kib(&String::from_utf8_lossy(&out));
    assert!(
        total <= 64 * 1024 && total > 40 * 1024,
        "MemTotal {total} KiB for 64 MiB"
    );

    // Exit codes and signals.
    let (st, _, _) = agent.exec_collect(sh("exit 7")).unwrap();
    assert_eq!((st.code, st.shell_code()), (Some(7), 7));
    let (st, _, _) = agent.exec_collect(sh("kill -9 $$")).unwrap();
    assert_eq!((st.signal, st.shell_code()), (Some(9), 137));

    // stdout and stderr stay apart, and 10 MiB of each arrive complete.
    let (st, out, err) = agent.exec_collect(sh("echo out; echo err >&2")).unwrap();
    assert!(st.success());
    assert_eq!(
        (out.as_slice(), err.as_slice()),
        (&b"out\n"[..], &b"err\n"[..])
    );
    let ten = 10 << 20;
    let (st, out, err) = agent
        .exec_collect(sh(
            "yes o | head -c 10485760 & yes e | head -c 10485760 >&2; wait",
        ))
        .unwrap();
    assert!(st.success(), "{st:?}");
    assert_eq!(out.len(), ten, "stdout length");
    assert_eq!(err.len(), ten, "stderr length");
    assert!(out.chunks(2).all(|c| c == b"o\n"), "stdout content");
    assert!(err.chunks(2).all(|c| c == b"e\n"), "stderr content");

    // stdin reaches the command, also in bulk.
    let input: Vec<u8> = (0..(1 << 20)).map(|i| (i % 251) as u8).collect();
    let (mut out, mut err) = (Vec::new(), Vec::new());
    let st = agent
        .exec(
            ExecRequest::new(["cat"]),
            Some(Box::new(std::io::Cursor::new(input.clone()))),
            &mut out,
            &mut err,
        )
        .unwrap();
    assert!(st.success());
    assert!(
        out == input,
        "stdin came back with {} of {} bytes",
        out.len(),
        input.len()
    );

    // A command that does not exist is a clear error, and the agent goes on.
    match agent.exec_collect(ExecRequest::new(["no-such-command"])) {
        Err(AgentError::Remote {
            code: ErrorCode::NotFound,
            message,
        }) => {
            assert!(message.contains("no-such-command"), "{message}")
        }
        other => panic!("expected not found, got {other:?}"),
    }
    assert!(agent.ping().is_ok());

    // Two vCPUs: one thread each in the VMM. On kvm_pvm hosts the guest
    // boots with maxcpus=1 (a second vCPU's bring-up hangs there).
    let mut threads: Vec<String> = std::fs::read_dir(format!("/proc/{pid}/task"))
        .unwrap()
        .filter_map(|t| std::fs::read_to_string(t.ok()?.path().join("comm")).ok())
        .map(|c| c.trim().to_string())
        .filter(|c| c.starts_with("vcpu"))
        .collect();
    threads.sort();
    assert_eq!(threads, ["vcpu0", "vcpu1"]);
    let (_, out, _) = agent
        .exec_collect(sh("grep -c ^processor /proc/cpuinfo"))
        .unwrap();
    let online: u32 = String::from_utf8_lossy(&out).trim().parse().unwrap();
    assert_eq!(online, if host_is_kvm_pvm() { 1 } else { 2 });

    // An identity (what a clone gets first): hostname, id and wall clock
    // change, and the guest's random stream goes on working.
    // A clock a day ahead proves the guest took the given time, not its own.
    const DAY: u64 = 86_400;
    let mut identity = host::agent::fresh_identity("vm-e2e-1", "e2e-guest-1").unwrap();
    identity.wall_clock_ns += DAY * 1_000_000_000;
    agent.set_identity(identity).expect("identity applied");
    let (st, out, _) = agent
        .exec_collect(sh(
            "hostname; cat /run/zygote/id; date +%s; head -c 16 /dev/urandom | wc -c",
        ))
        .unwrap();
    assert!(st.success());
    let out = String::from_utf8_lossy(&out).to_string();
    let lines: Vec<&str> = out.lines().collect();
    assert_eq!(lines[..2], ["e2e-guest-1", "vm-e2e-1"], "{out}");
    let guest_now: i64 = lines[2].trim().parse().unwrap();
    let host_now = (std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_secs()
        + DAY) as i64;
    // The exec itself takes seconds where guest kernels are emulated.
    assert!(
        (host_now - guest_now).abs() <= 15,
        "guest clock {guest_now}, host {host_now}"
    );
    assert_eq!(lines[3].trim(), "16");
    let bad = host::agent::fresh_identity("vm-e2e-1", "not a hostname").unwrap();
    assert!(matches!(
        agent.set_identity(bad),
        Err(AgentError::Remote {
            code: ErrorCode::InvalidRequest,
            ..
        })
    ));

    // The guest powers itself off: the VMM exits cleanly and leaves nothing.
    let _ = agent.exec_collect(ExecRequest::new(["poweroff"]));
    let VmExit { reason, message } = vm.wait_exit(Duration::from_secs(60)).expect("VM ends");
    assert_eq!(reason, ExitReason::Shutdown, "{message}");
    let dir = vm.dir().to_path_buf();
    drop(vm);
    assert!(!dir.exists(), "runtime dir left behind");
    assert!(
        !std::path::Path::new(&format!("/proc/{pid}")).exists(),
        "VMM still running"
    );
    sandbox.assert_clean();
}

#[test]
fn cli_run_streams_stdio_and_returns_the_exit_code() {
    let sandbox = Sandbox::new("cli");
    let release = kernel_release(&image());
    let out = sandbox.zygote(
        &[
            "run",
            "--memory",
            "512",
            "--",
            "sh",
            "-c",
            "uname -r; grep MemTotal /proc/meminfo; echo to-stderr >&2; cat; exit 7",
        ],
        b"from the caller\n",
    );
    let stdout = String::from_utf8_lossy(&out.stdout);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(
        out.status.code(),
        Some(7),
        "stdout: {stdout}\nstderr: {stderr}"
    );
    let lines: Vec<&str> = stdout.lines().collect();
    assert_eq!(lines[0], release);
    let total = meminfo_kib(lines[1]);
    assert!(
        total <= 512 * 1024 && total > 480 * 1024,
        "MemTotal {total} KiB for 512 MiB"
    );
    assert_eq!(lines[2], "from the caller");
    assert_eq!(lines.len(), 3, "{stdout}");
    assert_eq!(stderr.trim(), "to-stderr");
    sandbox.assert_clean();
}

#[test]
fn cli_reports_a_guest_kernel_panic() {
    let sandbox = Sandbox::new("panic");
    let out = sandbox.zygote(
        &["run", "--", "sh", "-c", "echo c > /proc/sysrq-trigger"],
        b"",
    );
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_ne!(out.status.code(), Some(0));
    assert!(stderr.contains("panicked"), "{stderr}");
    sandbox.assert_clean();
}

#[test]
fn cli_command_not_found_in_guest() {
    let sandbox = Sandbox::new("notfound");
    let out = sandbox.zygote(&["run", "--", "no-such-command", "x"], b"");
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(127), "{stderr}");
    assert!(
        stderr.contains("no-such-command: command not found in the guest"),
        "{stderr}"
    );
    sandbox.assert_clean();
}

#[test]
fn cli_refuses_bad_input_with_one_line_and_leaves_nothing() {
    let image = image();
    let sandbox = Sandbox::new("badinput");
    let not_a_kernel = sandbox.dir.with_extension("txt");
    std::fs::write(&not_a_kernel, "this is not a kernel\n").unwrap();
    let host_mib = host::procfs::host_memory_mib();
    let too_much = (host_mib + 1024).to_string();
    let kernel = image.kernel.to_string_lossy().to_string();
    let cases: Vec<(Vec<&str>, &str)> = vec![
        (
            vec!["--kernel", "/nonexistent/vmlinux"],
            "guest kernel not found",
        ),
        (
            vec!["--kernel", not_a_kernel.to_str().unwrap()],
            "is not a Linux kernel",
        ),
        (vec!["--kernel", &kernel, "--memory", "0"], "at least 1 MiB"),
        (
            vec!["--kernel", &kernel, "--memory", &too_much],
            "more than this host has",
        ),
        (vec!["--kernel", &kernel, "--vcpus", "0"], "vCPU count"),
        (vec!["--boot-timeout", "1"], "was not ready within 1s"),
    ];
    for (flags, expect) in cases {
        let mut args = vec!["run"];
        args.extend(flags.iter());
        args.extend(["--", "true"]);
        let out = sandbox.zygote(&args, b"");
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert_eq!(out.status.code(), Some(1), "{args:?}: {stderr}");
        assert!(stderr.contains(expect), "{args:?}: {stderr}");
        assert_eq!(stderr.trim().lines().count(), 1, "one line: {stderr}");
        sandbox.assert_clean();
    }
    std::fs::remove_file(&not_a_kernel).unwrap();
    assert!(processes_mentioning(&sandbox.dir.to_string_lossy()).is_empty());
}
