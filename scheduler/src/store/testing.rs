//! A private etcd for tests ([`Etcd`]): the scheduler's own, and other
//! crates' with the `testing` feature. It runs the `etcd` binary (Debian's
//! `etcd-server`; `$ZYGOTE_ETCD` overrides the path) on loopback with free
//! client and peer ports, its data in a temporary directory, and
//! `--max-txn-ops` raised to [`MAX_TXN_OPS`] so the scheduler's batches of a
//! few hundred slots fit in one transaction. It is killed on drop.
//!
//! It must not: skip. A missing binary is an error ([`Etcd::start`] panics
//! with what to install), never a silently passing test.

use std::io::{Read, Write};
use std::net::{SocketAddr, TcpListener, TcpStream};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

/// The `--max-txn-ops` the test etcd (and `start_etcd` in the scripts) runs
/// with: a batch of `n` slots needs `n + 1` compares.
pub const MAX_TXN_OPS: u32 = 1024;

/// How long [`Etcd::start`] waits for etcd to report healthy.
pub const START_TIMEOUT: Duration = Duration::from_secs(30);

/// Why a test etcd did not start.
#[derive(Debug, thiserror::Error)]
pub enum EtcdStartError {
    /// No etcd binary.
    #[error(
        "no etcd binary found ({0}); install Debian's etcd-server package \
         (scripts/lib.sh lists it in ZYGOTE_DEB_PACKAGES) or point $ZYGOTE_ETCD at one"
    )]
    Missing(String),
    /// A temp dir, a free port, or the spawn failed.
    #[error("starting etcd: {context}")]
    Io {
        /// What was being done.
        context: &'static str,
        /// Why it failed.
        #[source]
        source: std::io::Error,
    },
    /// etcd exited or never reported healthy.
    #[error("etcd did not become healthy on {url}: {why}; its log:\n{log}")]
    Unhealthy {
        /// Its client URL.
        url: String,
        /// Exited, or timed out.
        why: String,
        /// The tail of its log.
        log: String,
    },
}

/// A running private etcd; killed (and its data removed) on drop.
#[derive(Debug)]
pub struct Etcd {
    child: Option<Child>,
    binary: PathBuf,
    client: u16,
    peer: u16,
    client_url: String,
    dir: tempfile::TempDir,
}

fn io(context: &'static str) -> impl FnOnce(std::io::Error) -> EtcdStartError {
    move |source| EtcdStartError::Io { context, source }
}

/// The etcd binary: `$ZYGOTE_ETCD`, else `etcd` on `$PATH`.
pub fn etcd_binary() -> Result<PathBuf, EtcdStartError> {
    find_etcd(std::env::var_os("ZYGOTE_ETCD"), std::env::var_os("PATH"))
}

/// [`etcd_binary`] given the two variables.
fn find_etcd(
    explicit: Option<std::ffi::OsString>,
    path: Option<std::ffi::OsString>,
) -> Result<PathBuf, EtcdStartError> {
    if let Some(explicit) = explicit {
        let explicit = PathBuf::from(explicit);
        return if explicit.is_file() {
            Ok(explicit)
        } else {
            Err(EtcdStartError::Missing(format!(
                "$ZYGOTE_ETCD={} is not a file",
                explicit.display()
            )))
        };
    }
    let path = path.unwrap_or_default();
    std::env::split_paths(&path)
        .map(|dir| dir.join("etcd"))
        .find(|p| p.is_file())
        .ok_or_else(|| EtcdStartError::Missing("no `etcd` on $PATH".into()))
}

fn free_port() -> Result<u16, EtcdStartError> {
    let l = TcpListener::bind("127.0.0.1:0").map_err(io("finding a free port"))?;
    Ok(l.local_addr().map_err(io("finding a free port"))?.port())
}

/// Whether etcd's `/health` on `addr` says healthy.
fn healthy(addr: SocketAddr) -> bool {
    let Ok(mut s) = TcpStream::connect_timeout(&addr, Duration::from_millis(500)) else {
        return false;
    };
    let _ = s.set_read_timeout(Some(Duration::from_secs(2)));
    if s.write_all(b"GET /health HTTP/1.0\r\nHost: localhost\r\n\r\n")
        .is_err()
    {
        return false;
    }
    let mut body = String::new();
    let _ = s.read_to_string(&mut body);
    body.contains("\"health\":\"true\"")
}

fn log_tail(path: &Path) -> String {
    let log = std::fs::read_to_string(path).unwrap_or_default();
    let lines: Vec<&str> = log.lines().collect();
    lines[lines.len().saturating_sub(20)..].join("\n")
}

impl Etcd {
    /// Start one, or panic saying why (a missing binary included): for tests.
    pub fn start() -> Etcd {
        match Etcd::try_start() {
            Ok(etcd) => etcd,
            Err(e) => panic!("the test etcd did not start: {e}"),
        }
    }

    /// Start one and wait until it is healthy. Retries twice with new ports
    /// if it exits early (another process took a port between the probe
    /// and etcd's bind).
    pub fn try_start() -> Result<Etcd, EtcdStartError> {
        let binary = etcd_binary()?;
        let mut last = None;
        for _ in 0..3 {
            match Etcd::start_once(&binary) {
                Ok(etcd) => return Ok(etcd),
                Err(e @ EtcdStartError::Unhealthy { .. }) => last = Some(e),
                Err(e) => return Err(e),
            }
        }
        Err(last.unwrap_or_else(|| EtcdStartError::Missing("unreachable".into())))
    }

    fn start_once(binary: &Path) -> Result<Etcd, EtcdStartError> {
        let dir = tempfile::Builder::new()
            .prefix("zygote-etcd-")
            .tempdir()
            .map_err(io("creating its data directory"))?;
        let (client, peer) = (free_port()?, free_port()?);
        let mut etcd = Etcd {
            child: None,
            binary: binary.to_owned(),
            client,
            peer,
            client_url: format!("http://127.0.0.1:{client}"),
            dir,
        };
        etcd.spawn()?;
        Ok(etcd)
    }

    /// Start etcd on this one's ports and data directory, and wait until it
    /// is healthy.
    fn spawn(&mut self) -> Result<(), EtcdStartError> {
        let client_url = self.client_url.clone();
        let peer_url = format!("http://127.0.0.1:{}", self.peer);
        let log_path = self.dir.path().join("etcd.log");
        let log = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(&log_path)
            .map_err(io("creating its log"))?;
        let log2 = log.try_clone().map_err(io("creating its log"))?;
        let child = Command::new(&self.binary)
            .args(["--name", "test"])
            .arg("--data-dir")
            .arg(self.dir.path().join("data"))
            .args(["--listen-client-urls", &client_url])
            .args(["--advertise-client-urls", &client_url])
            .args(["--listen-peer-urls", &peer_url])
            .args(["--initial-advertise-peer-urls", &peer_url])
            .args(["--initial-cluster", &format!("test={peer_url}")])
            .args(["--max-txn-ops", &MAX_TXN_OPS.to_string()])
            .args(["--logger", "zap", "--log-level", "warn"])
            .stdin(Stdio::null())
            .stdout(log)
            .stderr(log2)
            .spawn()
            .map_err(io("spawning etcd"))?;
        self.child = Some(child);
        let addr = SocketAddr::from(([127, 0, 0, 1], self.client));
        let deadline = Instant::now() + START_TIMEOUT;
        loop {
            if healthy(addr) {
                return Ok(());
            }
            let exited = self
                .child
                .as_mut()
                .and_then(|c| c.try_wait().ok().flatten());
            let why = match exited {
                Some(status) => format!("it exited with {status}"),
                None if Instant::now() > deadline => format!("not healthy after {START_TIMEOUT:?}"),
                None => {
                    std::thread::sleep(Duration::from_millis(50));
                    continue;
                }
            };
            self.kill();
            return Err(EtcdStartError::Unhealthy {
                url: client_url,
                why,
                log: log_tail(&log_path),
            });
        }
    }

    /// Its client URL (`http://127.0.0.1:PORT`).
    pub fn client_url(&self) -> &str {
        &self.client_url
    }

    /// Its client URL as the endpoint list `EtcdStore::connect` takes.
    pub fn endpoints(&self) -> Vec<String> {
        vec![self.client_url.clone()]
    }

    /// Its data directory (and log, `etcd.log`).
    pub fn dir(&self) -> &Path {
        self.dir.path()
    }

    /// Start it again after [`Etcd::kill`], on the same ports and data (the
    /// end of an outage); a no-op while it runs.
    pub fn restart(&mut self) -> Result<(), EtcdStartError> {
        if self.child.is_some() {
            return Ok(());
        }
        self.spawn()
    }

    /// Kill it now (an outage, for tests of what a client does then).
    pub fn kill(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }
}

impl Drop for Etcd {
    fn drop(&mut self) {
        self.kill();
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_missing_etcd_is_an_error_that_says_what_to_install() {
        let empty = tempfile::tempdir().unwrap();
        let err = find_etcd(None, Some(empty.path().into())).unwrap_err();
        assert!(matches!(err, EtcdStartError::Missing(_)), "{err:?}");
        assert!(err.to_string().contains("etcd-server"), "{err}");
        let err = find_etcd(Some(empty.path().join("etcd").into()), None).unwrap_err();
        assert!(err.to_string().contains("$ZYGOTE_ETCD="), "{err}");
    }

    #[test]
    fn etcd_is_found_on_the_path_and_restarts_on_its_data() {
        let dir = tempfile::tempdir().unwrap();
        let fake = dir.path().join("etcd");
        std::fs::write(&fake, "").unwrap();
        assert_eq!(find_etcd(None, Some(dir.path().into())).unwrap(), fake);
        let mut etcd = Etcd::start();
        etcd.kill();
        let addr: SocketAddr = etcd
            .client_url()
            .trim_start_matches("http://")
            .parse()
            .unwrap();
        assert!(!healthy(addr));
        etcd.restart().unwrap();
        assert!(healthy(addr));
    }
}
