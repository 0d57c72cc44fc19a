//! Request and response bodies that are the API's own (the runtime's report
//! types, `host::runtime::{MasterInfo, InstanceInfo, HostInfo}`, are sent as
//! they are). Requests refuse unknown fields, so a misspelt field is an
//! error and not a silent default.

use std::collections::BTreeMap;

use host::runtime::{InstanceInfo, MasterInfo};
use serde::{Deserialize, Serialize};
use utoipa::{IntoParams, ToSchema};

use crate::error::{ApiError, ErrorDetail};

/// Largest clone count of one request.
pub const MAX_COUNT: usize = 1000;
/// Most labels on an object.
pub const MAX_LABELS: usize = 32;

/// `POST /v1/masters`.
#[derive(Debug, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct CreateMaster {
    /// Name: 1-40 of a-z, 0-9, '-', '.', starting with a letter or digit.
    #[schema(pattern = "^[a-z0-9][a-z0-9.-]{0,39}$")]
    pub name: String,
    /// Guest RAM, MiB (16..=65536).
    #[serde(default = "default_memory")]
    #[schema(minimum = 16, maximum = 65536)]
    pub memory_mib: u64,
    /// vCPUs (1..=32).
    #[serde(default = "one")]
    #[schema(minimum = 1, maximum = 32)]
    pub vcpus: u8,
    /// Shell command run before the freeze.
    #[serde(default)]
    pub warmup: Option<String>,
    /// Seconds the warm-up may take (1..=3600).
    #[serde(default = "default_warmup_timeout")]
    #[schema(minimum = 1, maximum = 3600)]
    pub warmup_timeout_s: u64,
    /// Labels.
    #[serde(default)]
    pub labels: BTreeMap<String, String>,
    /// Give it a network device, so that its clones get networks of their
    /// own (its warm-up gets one too).
    #[serde(default)]
    pub net: bool,
    /// Its warm-up may reach beyond the host (with `net`).
    #[serde(default)]
    pub egress: bool,
}

fn default_memory() -> u64 {
    256
}
fn one() -> u8 {
    1
}
fn default_warmup_timeout() -> u64 {
    600
}

impl CreateMaster {
    /// Checks the fields the types do not.
    pub fn validate(&self) -> Result<(), ApiError> {
        if !(16..=65536).contains(&self.memory_mib) {
            return Err(ApiError::bad_request(format!(
                "memory_mib must be 16..=65536 (got {})",
                self.memory_mib
            )));
        }
        if !(1..=32).contains(&self.vcpus) {
            return Err(ApiError::bad_request(format!(
                "vcpus must be 1..=32 (got {})",
                self.vcpus
            )));
        }
        if !(1..=3600).contains(&self.warmup_timeout_s) {
            return Err(ApiError::bad_request(format!(
                "warmup_timeout_s must be 1..=3600 (got {})",
                self.warmup_timeout_s
            )));
        }
        if self.warmup.as_ref().is_some_and(|w| w.len() > 64 * 1024) {
            return Err(ApiError::bad_request("warmup is longer than 64 KiB"));
        }
        check_labels(&self.labels)
    }
}

/// Checks labels: at most [`MAX_LABELS`], keys 1-63 of `[a-zA-Z0-9._/-]`, values up to 255 bytes.
pub fn check_labels(labels: &BTreeMap<String, String>) -> Result<(), ApiError> {
    if labels.len() > MAX_LABELS {
        return Err(ApiError::bad_request(format!(
            "at most {MAX_LABELS} labels (got {})",
            labels.len()
        )));
    }
    for (k, v) in labels {
        let key_ok = !k.is_empty()
            && k.len() <= 63
            && k.bytes()
                .all(|b| b.is_ascii_alphanumeric() || b"._/-".contains(&b));
        if !key_ok {
            return Err(ApiError::bad_request(format!(
                "label key {k:?}: use 1-63 of a-z, A-Z, 0-9, '.', '_', '/', '-'"
            )));
        }
        if v.len() > 255 {
            return Err(ApiError::bad_request(format!(
                "label {k:?}: value longer than 255 bytes"
            )));
        }
    }
    Ok(())
}

/// `GET /v1/masters`.
#[derive(Debug, Serialize, ToSchema)]
pub struct MasterList {
    /// The caller's masters.
    pub masters: Vec<MasterInfo>,
}

/// `DELETE /v1/masters/{name}` query.
#[derive(Debug, Deserialize, IntoParams)]
#[serde(deny_unknown_fields)]
pub struct ForceQuery {
    /// Delete even while clones of it are alive (they keep running).
    #[serde(default)]
    pub force: bool,
}

/// `POST /v1/masters/{name}/snapshot`.
#[derive(Debug, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct SaveSnapshot {
    /// A directory on the daemon's host to create (it must not exist, or be empty).
    pub dir: String,
}

/// What a snapshot save wrote.
#[derive(Debug, Serialize, ToSchema)]
pub struct SnapshotSaved {
    /// The directory.
    pub dir: String,
    /// Guest RAM size, bytes.
    pub memory_bytes: u64,
    /// Bytes of memory data written (zero pages are holes).
    pub data_bytes: u64,
    /// Zero pages left as holes.
    pub zero_pages_skipped: u64,
}

/// `POST /v1/masters:load`.
#[derive(Debug, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct LoadSnapshot {
    /// The snapshot directory on the daemon's host.
    pub dir: String,
    /// The master's name (default: the directory's name).
    #[serde(default)]
    pub name: Option<String>,
}

/// What happens when an instance's TTL ends.
#[derive(Debug, Clone, Copy, Default, Deserialize, Serialize, ToSchema, PartialEq, Eq)]
#[serde(rename_all = "snake_case")]
pub enum OnTtl {
    /// The instance is killed.
    #[default]
    Kill,
}

/// `POST /v1/instances`.
#[derive(Debug, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct CreateInstances {
    /// The master to clone.
    pub master: String,
    /// How many clones (1..=1000).
    #[serde(default = "one_usize")]
    #[schema(minimum = 1, maximum = 1000)]
    pub count: usize,
    /// Labels for every clone.
    #[serde(default)]
    pub labels: BTreeMap<String, String>,
    /// Kill each clone this many seconds after it starts (1..=31536000).
    #[serde(default)]
    #[schema(minimum = 1, maximum = 31536000)]
    pub ttl_s: Option<u64>,
    /// What the TTL does.
    #[serde(default)]
    pub on_ttl: OnTtl,
    /// Each clone's resource limits (its VMM's cgroup).
    #[serde(default)]
    pub limits: Limits,
    /// Host ports forwarded to each clone (one clone per request when any
    /// is given: a host port goes to one VM). Its master needs `net`.
    #[serde(default)]
    pub ports: Vec<Port>,
    /// Each clone may reach beyond the host (masqueraded).
    #[serde(default)]
    pub egress: bool,
    /// Each clone may reach its tenant's other clones that asked for peers.
    #[serde(default)]
    pub peers: bool,
    /// Give each clone of a master with a NIC a network (false: the link
    /// stays down).
    #[serde(default = "yes")]
    pub net: bool,
}

fn yes() -> bool {
    true
}

/// A published port: connections to `host_port` on the host's addresses
/// (`localhost` too) reach `guest_port` in the clone.
#[derive(Debug, Clone, Deserialize, Serialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct Port {
    /// The host's port.
    #[schema(minimum = 1, maximum = 65535)]
    pub host_port: u16,
    /// The clone's port.
    #[schema(minimum = 1, maximum = 65535)]
    pub guest_port: u16,
    /// `tcp` (default) or `udp`.
    #[serde(default)]
    pub protocol: PortProtocol,
}

/// A published port's protocol.
#[derive(Debug, Clone, Copy, Default, Deserialize, Serialize, ToSchema)]
#[serde(rename_all = "lowercase")]
pub enum PortProtocol {
    /// TCP.
    #[default]
    Tcp,
    /// UDP.
    Udp,
}

impl From<Port> for host::net::Publish {
    fn from(p: Port) -> Self {
        host::net::Publish {
            host_port: p.host_port,
            guest_port: p.guest_port,
            protocol: match p.protocol {
                PortProtocol::Tcp => host::net::Protocol::Tcp,
                PortProtocol::Udp => host::net::Protocol::Udp,
            },
        }
    }
}

/// A clone's resource limits; each absent one takes the host's default.
#[derive(Debug, Clone, Copy, Default, Deserialize, Serialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct Limits {
    /// Memory of the clone's VMM in MiB (default: guest RAM + the VMM's
    /// allowance); a clone that exceeds it is killed alone.
    #[schema(minimum = 16, maximum = 1048576)]
    pub memory_max_mib: Option<u64>,
    /// CPU time, in cores (0.5 = half a core).
    #[schema(minimum = 0.01, maximum = 1024.0)]
    pub cpus: Option<f64>,
    /// CPU weight against other clones (default 100).
    #[schema(minimum = 1, maximum = 10000)]
    pub cpu_weight: Option<u16>,
}

impl From<Limits> for host::confine::VmLimits {
    fn from(l: Limits) -> Self {
        host::confine::VmLimits {
            memory_max_mib: l.memory_max_mib,
            cpus: l.cpus,
            cpu_weight: l.cpu_weight,
        }
    }
}

fn one_usize() -> usize {
    1
}

impl CreateInstances {
    /// Checks the fields the types do not.
    pub fn validate(&self) -> Result<(), ApiError> {
        if !(1..=MAX_COUNT).contains(&self.count) {
            return Err(ApiError::bad_request(format!(
                "count must be 1..={MAX_COUNT} (got {})",
                self.count
            )));
        }
        check_ttl(self.ttl_s)?;
        if !self.ports.is_empty() && self.count != 1 {
            return Err(ApiError::bad_request(format!(
                "ports go to one clone: ask for count 1 (got {})",
                self.count
            )));
        }
        if let Some(p) = self
            .ports
            .iter()
            .find(|p| p.host_port == 0 || p.guest_port == 0)
        {
            return Err(ApiError::bad_request(format!(
                "port 0 cannot be published ({}:{})",
                p.host_port, p.guest_port
            )));
        }
        host::confine::VmLimits::from(self.limits)
            .validate()
            .map_err(|e| ApiError::bad_request(format!("limits: {e}")))?;
        check_labels(&self.labels)
    }
}

fn check_ttl(ttl: Option<u64>) -> Result<(), ApiError> {
    match ttl {
        Some(t) if !(1..=31_536_000).contains(&t) => Err(ApiError::bad_request(format!(
            "ttl_s must be 1..=31536000 (got {t})"
        ))),
        _ => Ok(()),
    }
}

/// One requested clone: the instance, or why it did not start.
#[derive(Debug, Serialize, ToSchema)]
pub struct InstanceResult {
    /// The clone, when it started.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub instance: Option<InstanceInfo>,
    /// Why it did not.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub error: Option<ErrorDetail>,
}

/// `POST /v1/instances` answer: one result per requested clone, in order.
#[derive(Debug, Serialize, ToSchema)]
pub struct CreatedInstances {
    /// Clones that started.
    pub started: usize,
    /// Clones that did not.
    pub failed: usize,
    /// One per requested clone.
    pub results: Vec<InstanceResult>,
}

/// `GET /v1/instances` query.
#[derive(Debug, Default, Deserialize, IntoParams)]
#[serde(deny_unknown_fields)]
pub struct InstanceQuery {
    /// Only instances with this label, as `key=value`.
    #[serde(default)]
    pub label: Option<String>,
    /// Only clones of this master.
    #[serde(default)]
    pub master: Option<String>,
    /// Only in this state: starting, running, exited, failed.
    #[serde(default)]
    pub state: Option<String>,
    /// Page size (1..=1000, default 100).
    #[serde(default)]
    #[param(minimum = 1, maximum = 1000)]
    pub limit: Option<usize>,
    /// `next_page_token` of the previous page.
    #[serde(default)]
    pub page_token: Option<String>,
}

/// `GET /v1/instances`.
#[derive(Debug, Serialize, ToSchema)]
pub struct InstanceList {
    /// This page, sorted by id.
    pub instances: Vec<InstanceInfo>,
    /// Pass as `page_token` for the next page; absent on the last page.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub next_page_token: Option<String>,
}

/// `POST /v1/instances/{id}/ttl`.
#[derive(Debug, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct SetTtl {
    /// New TTL from now, seconds (1..=31536000).
    #[schema(minimum = 1, maximum = 31536000)]
    pub ttl_s: u64,
}

impl SetTtl {
    /// Checks the TTL.
    pub fn validate(&self) -> Result<(), ApiError> {
        check_ttl(Some(self.ttl_s))
    }
}

/// `POST /v1/instances/{id}/exec`.
#[derive(Debug, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct Exec {
    /// Program and arguments (1..=4096 entries).
    #[schema(min_items = 1, max_items = 4096)]
    pub argv: Vec<String>,
    /// Extra environment variables.
    #[serde(default)]
    pub env: BTreeMap<String, String>,
    /// Working directory in the guest.
    #[serde(default)]
    pub cwd: Option<String>,
    /// Standard input as text.
    #[serde(default)]
    pub stdin: Option<String>,
    /// Standard input as base64 (instead of `stdin`).
    #[serde(default)]
    pub stdin_base64: Option<String>,
    /// Kill the command after this many ms (1..=86400000).
    #[serde(default)]
    #[schema(minimum = 1, maximum = 86400000)]
    pub timeout_ms: Option<u64>,
}

/// How a short exec ended and what it printed.
#[derive(Debug, Serialize, ToSchema)]
pub struct ExecResult {
    /// Exit code, when it exited.
    pub exit_code: Option<i32>,
    /// Signal number, when a signal ended it.
    pub signal: Option<i32>,
    /// Whether `timeout_ms` ended it.
    pub timed_out: bool,
    /// Standard output (UTF-8, invalid bytes replaced), first `output_cap_bytes` bytes.
    pub stdout: String,
    /// Standard error, likewise.
    pub stderr: String,
    /// Whether stdout was longer than the cap.
    pub stdout_truncated: bool,
    /// Whether stderr was longer than the cap.
    pub stderr_truncated: bool,
    /// The cap on each stream, bytes (use the streaming exec for more).
    pub output_cap_bytes: u64,
}

/// `GET /v1/instances/{id}/health`.
#[derive(Debug, Serialize, ToSchema)]
pub struct Health {
    /// The agent answered.
    pub ok: bool,
    /// Round trip of the agent's ping, ms.
    pub ping_ms: f64,
    /// The guest's uptime as the agent reports it, ms.
    pub uptime_ms: u64,
}

/// `GET /v1/instances/{id}/console` query.
#[derive(Debug, Default, Deserialize, IntoParams)]
#[serde(deny_unknown_fields)]
pub struct ConsoleQuery {
    /// Keep the response open and stream new output until the instance ends.
    #[serde(default)]
    pub follow: bool,
}

/// `POST /v1/masters:fetch`: pull a master from a peer daemon.
#[derive(Debug, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct FetchMaster {
    /// The name it gets here.
    #[schema(pattern = "^[a-z0-9][a-z0-9.-]{0,39}$")]
    pub name: String,
    /// The peer daemon: `http://HOST:PORT` (its TCP listener; this daemon
    /// sends its `--peer-token-file` token).
    pub from: String,
    /// Its name on the peer (default: `name`).
    #[serde(default)]
    pub source_name: Option<String>,
}

/// What a fetch moved.
#[derive(Debug, Clone, Serialize, Deserialize, ToSchema)]
pub struct TransferStats {
    /// Guest memory size, bytes.
    pub memory_bytes: u64,
    /// Non-zero memory bytes a whole stream carries.
    pub payload_bytes: u64,
    /// Bytes of response bodies received from the peer (offers and memory
    /// streams, all attempts).
    pub wire_bytes: u64,
    /// Memory streams opened (1 when nothing was cut).
    pub attempts: u32,
    /// Memory streams that resumed from a nonzero offset.
    pub resumed: u32,
    /// Wall time of the whole fetch (checks and registration included), s.
    pub seconds: f64,
    /// `wire_bytes` per second of `seconds`, MiB/s.
    pub mib_per_s: f64,
}

/// `201` of `POST /v1/masters:fetch`.
#[derive(Debug, Serialize, ToSchema)]
pub struct MasterFetched {
    /// The new master.
    pub master: MasterInfo,
    /// The transfer.
    pub transfer: TransferStats,
}

/// `?offset=` of the memory stream.
#[derive(Debug, Deserialize, IntoParams)]
#[serde(deny_unknown_fields)]
#[into_params(parameter_in = Query)]
pub struct OffsetQuery {
    /// Memory offset to start from (a multiple of 4096; default 0): a
    /// receiver resumes from the end of the last whole record it wrote.
    #[serde(default)]
    pub offset: u64,
}
