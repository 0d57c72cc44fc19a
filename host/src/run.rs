//! `zygote run`: boot a fresh microVM, run one command in it, shut it down.

use std::time::Duration;

use proto::{ErrorCode, ExecRequest};

use crate::agent::{AgentClient, AgentError};
use crate::vmm::{Timeline, VmError, VmSpec, VmmProcess};

/// What to run and on what.
#[derive(Debug, Clone)]
pub struct RunOptions {
    /// VM shape and image.
    pub spec: VmSpec,
    /// How long to wait for the agent.
    pub boot_timeout: Duration,
    /// The command.
    pub argv: Vec<String>,
    /// Print each phase's duration on stderr at the end.
    pub timings: bool,
    /// Give the VM a network (a NIC, an address, published ports);
    /// `None`: no NIC.
    pub net: Option<crate::vmnet::NetRequest>,
}

/// Errors of `zygote run`, each with the exit code it maps to.
#[derive(Debug, thiserror::Error)]
pub enum RunError {
    /// Starting the VM failed.
    #[error(transparent)]
    Vm(#[from] VmError),
    /// The agent failed.
    #[error(transparent)]
    Agent(#[from] AgentError),
    /// The command does not exist in the guest.
    #[error("{0}: command not found in the guest")]
    NotFound(String),
    /// The VM's network could not be set up.
    #[error(transparent)]
    Net(#[from] crate::vmnet::VmNetError),
}

impl RunError {
    /// The exit code `zygote run` uses for this error (127 as a shell for
    /// a missing command, 1 otherwise).
    pub fn exit_code(&self) -> i32 {
        match self {
            RunError::NotFound(_) => 127,
            RunError::Agent(AgentError::Remote {
                code: ErrorCode::PermissionDenied,
                ..
            }) => 126,
            _ => 1,
        }
    }
}

/// Boots a VM, runs the command with the caller's stdio, shuts the VM down.
/// Returns the command's shell exit code.
pub fn run(opts: &RunOptions) -> Result<i32, RunError> {
    // Named like a clone would be, for its address lease and MAC.
    let vm_id = format!("run-{}", std::process::id());
    let mut net = match &opts.net {
        Some(_) => Some(crate::vmnet::VmNet::take()?),
        None => None,
    };
    let fds = match &net {
        Some(n) => Some((n.fds()?, proto::launch::MacAddr::derived(&vm_id))),
        None => None,
    };
    let mut vm = VmmProcess::boot_with_net(&opts.spec, fds)?;
    let identity = match (&mut net, &opts.net) {
        (Some(n), Some(req)) => Some(n.attach(&vm_id, None, req, vm.pid())?),
        _ => None,
    };
    // Held (published ports included) until the VM is shut down.
    let _net = Release(vm_id.clone(), net.and_then(|n| n.finish()));
    vm.wait_ready(opts.boot_timeout)?;
    let mut agent = AgentClient::connect(&vm.vsock_path())?;
    if identity.is_some() {
        let mut id = crate::agent::fresh_identity(&vm_id, &vm_id).map_err(AgentError::Output)?;
        id.net = identity;
        agent.set_identity(id)?;
    }
    let result = exec_stdio(&mut agent, &opts.argv);
    if let Err(RunError::Agent(e)) = &result {
        if !matches!(e, AgentError::Remote { .. }) {
            // The connection broke: the VM most likely ended (a panic, say).
            return Err(vm.end_error().into());
        }
    }
    let done_us = proto::events::now_us();
    shutdown(&mut vm, &mut agent);
    if opts.timings {
        eprintln!("{}", timings_line(&vm.timeline, done_us));
    }
    result
}

/// Gives back a VM's address and published ports when dropped.
struct Release(String, Option<crate::net::Attachment>);

impl Drop for Release {
    fn drop(&mut self) {
        self.1.take();
        crate::vmnet::release(&self.0);
    }
}

/// Runs `argv` through `agent` with this process's stdin, stdout and
/// stderr; returns its shell exit code.
pub fn exec_stdio(agent: &mut AgentClient, argv: &[String]) -> Result<i32, RunError> {
    let req = ExecRequest::new(argv.to_vec());
    let mut stdout = std::io::stdout().lock();
    let mut stderr = std::io::stderr();
    match agent.exec(
        req,
        Some(Box::new(std::io::stdin())),
        &mut stdout,
        &mut stderr,
    ) {
        Ok(status) => Ok(status.shell_code()),
        Err(AgentError::Remote {
            code: ErrorCode::NotFound,
            ..
        }) => Err(RunError::NotFound(argv[0].clone())),
        Err(e) => Err(e.into()),
    }
}

/// One line with the duration of each phase of a VM's life, in ms.
pub fn timings_line(t: &Timeline, done_us: u64) -> String {
    let mut parts = Vec::new();
    let mut prev = t.spawn_us;
    for (name, at) in [
        ("VMM started", t.started_us),
        ("first guest instruction", t.vcpu_running_us),
        ("kernel reached /init", t.agent_start_us),
        ("agent ready", t.agent_ready_us),
        ("command done", Some(done_us)),
    ] {
        if let Some(at) = at {
            parts.push(format!(
                "{name} +{:.1}",
                at.saturating_sub(prev) as f64 / 1000.0
            ));
            prev = at;
        }
    }
    format!(
        "zygote: timings (ms): {}; total {:.1}",
        parts.join(", "),
        done_us.saturating_sub(t.spawn_us) as f64 / 1000.0
    )
}

fn shutdown(vm: &mut VmmProcess, agent: &mut AgentClient) {
    if agent.shutdown().is_err() {
        vm.kill();
        return;
    }
    let _ = vm.wait_exit(Duration::from_secs(30));
}
