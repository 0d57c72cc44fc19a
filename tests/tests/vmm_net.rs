//! End-to-end test of the VMM's virtio-net device: a real guest booted by
//! `zygote-vmm` with a tap (`--tap-fd`) in a network namespace the test
//! creates and removes, its MAC (`--mac`) and an inherited `/dev/kvm`
//! (`--kvm-fd`). Its interface is configured through the agent (busybox
//! `ip`), then traffic goes both ways: the guest pings the host side, the
//! host fetches a file from a busybox `httpd` in the guest, the guest
//! downloads one from the host. The VM is then frozen, and a clone restored
//! from it with a tap of its own, in a second namespace, reaches its host
//! side too: the device survives the snapshot and attaches to the new tap.
//!
//! One boot (tens of seconds on hosts whose KVM emulates guest kernel
//! code). Fails loudly without KVM, like every end-to-end test.

use std::fs::File;
use std::io::{Read, Write};
use std::net::{SocketAddr, TcpListener, TcpStream};
use std::os::fd::{AsRawFd, OwnedFd, RawFd};
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};
use std::time::{Duration, Instant};

use host::agent::AgentClient;
use proto::events::Event;
use proto::launch::{BootSource, ConsoleTarget, MacAddr, VmSource, VmmLaunch};
use proto::ExecRequest;
use zygote_tests::{bin, image, Sandbox};

const BOOT_TIMEOUT: Duration = Duration::from_secs(240);
/// The guest's MAC, given with `--mac`.
const GUEST_MAC: MacAddr = MacAddr([0x02, 0x7a, 0x79, 0x67, 0x00, 0x2a]);
/// The host side's MAC, the same in both namespaces (what a clone's
/// namespace looks like: the guest's neighbour entry stays right).
const HOST_MAC: &str = "02:7a:79:67:00:01";
const HOST_IP: &str = "10.77.0.1";
const GUEST_IP: &str = "10.77.0.2";
/// The tap's name, the same in both namespaces.
const TAP: &str = "ztap0";
/// Bytes moved each way.
const BULK: usize = 1 << 20;

/// A network namespace of this test (`ip netns add`), removed on drop.
struct Netns {
    name: String,
}

fn run(cmd: &mut Command) -> Output {
    let out = cmd.output().expect("run a command");
    assert!(
        out.status.success(),
        "{cmd:?} failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    out
}

impl Netns {
    fn create(tag: &str) -> Self {
        let name = format!("zyg-net-{}-{tag}", std::process::id());
        run(Command::new("ip").args(["netns", "add", &name]));
        Netns { name }
    }

    /// Runs `ip ARGS` in the namespace.
    fn ip(&self, args: &[&str]) {
        run(Command::new("ip").arg("-n").arg(&self.name).args(args));
    }

    /// Runs `f` on a thread that entered the namespace (sockets it creates
    /// live there).
    fn enter<T: Send>(&self, f: impl FnOnce() -> T + Send) -> T {
        let path = Path::new("/run/netns").join(&self.name);
        std::thread::scope(|s| {
            s.spawn(|| {
                let ns = File::open(&path).expect("namespace file");
                // SAFETY: setns moves this thread (only) into the network
                // namespace of an open namespace file; no memory is touched.
                let r = unsafe { libc::setns(ns.as_raw_fd(), libc::CLONE_NEWNET) };
                assert_eq!(r, 0, "setns: {}", std::io::Error::last_os_error());
                f()
            })
            .join()
            .expect("namespace thread")
        })
    }

    /// A tap named [`TAP`] in the namespace, as a spawner opens it for the
    /// VMM (not persistent: it goes when the last descriptor closes), with
    /// the host side's address, up.
    fn tap(&self) -> OwnedFd {
        let fd = self.enter(|| {
            let tun = std::fs::OpenOptions::new()
                .read(true)
                .write(true)
                .open("/dev/net/tun")
                .expect("/dev/net/tun");
            // SAFETY: `ifreq` is plain old data; all zeroes is valid.
            let mut ifr: libc::ifreq = unsafe { std::mem::zeroed() };
            for (d, s) in ifr.ifr_name.iter_mut().zip(TAP.bytes()) {
                *d = s as libc::c_char;
            }
            ifr.ifr_ifru.ifru_flags =
                (libc::IFF_TAP | libc::IFF_NO_PI | libc::IFF_VNET_HDR) as libc::c_short;
            // SAFETY: TUNSETIFF reads one `ifreq`, which we own.
            let r = unsafe { libc::ioctl(tun.as_raw_fd(), libc::TUNSETIFF, &ifr) };
            assert_eq!(r, 0, "TUNSETIFF: {}", std::io::Error::last_os_error());
            OwnedFd::from(tun)
        });
        self.ip(&["link", "set", "dev", TAP, "address", HOST_MAC]);
        self.ip(&["addr", "add", &format!("{HOST_IP}/24"), "dev", TAP]);
        self.ip(&["link", "set", "dev", TAP, "up"]);
        self.ip(&["link", "set", "dev", "lo", "up"]);
        fd
    }
}

impl Drop for Netns {
    fn drop(&mut self) {
        let _ = Command::new("ip")
            .args(["netns", "del", &self.name])
            .status();
    }
}

/// A `zygote-vmm` started by the test with `launch`, the tap and
/// `/dev/kvm` kept open across exec at their numbers.
struct Vmm {
    child: Child,
    dir: PathBuf,
}

impl Vmm {
    fn spawn(dir: &Path, launch: &VmmLaunch, inherit: &[RawFd]) -> Self {
        let fds = inherit.to_vec();
        let mut cmd = Command::new(bin("zygote-vmm"));
        cmd.args(launch.to_args())
            .stdin(Stdio::null())
            .stdout(File::create(dir.join("events.jsonl")).unwrap())
            .stderr(File::create(dir.join("vmm.log")).unwrap());
        // SAFETY: fcntl is async-signal-safe and only clears the
        // close-on-exec flag of descriptors this process owns, in the child.
        unsafe {
            cmd.pre_exec(move || {
                for &fd in &fds {
                    if libc::fcntl(fd, libc::F_SETFD, 0) < 0 {
                        return Err(std::io::Error::last_os_error());
                    }
                }
                Ok(())
            });
        }
        Vmm {
            child: cmd.spawn().expect("spawn zygote-vmm"),
            dir: dir.to_path_buf(),
        }
    }

    fn log(&self) -> String {
        let read = |f: &str| std::fs::read_to_string(self.dir.join(f)).unwrap_or_default();
        format!(
            "vmm.log:\n{}\nconsole (tail):\n{}",
            read("vmm.log"),
            read("console.log")
                .lines()
                .rev()
                .take(30)
                .collect::<Vec<_>>()
                .into_iter()
                .rev()
                .collect::<Vec<_>>()
                .join("\n")
        )
    }

    /// Waits for an event matching `done`, failing if the VMM ends first.
    fn wait_for(&mut self, what: &str, done: impl Fn(&Event) -> bool) {
        let deadline = Instant::now() + BOOT_TIMEOUT;
        loop {
            let events = host::vmm::read_events(&self.dir);
            if events.iter().any(&done) {
                return;
            }
            if let Some(status) = self.child.try_wait().unwrap() {
                panic!(
                    "the VMM ended ({status}) before {what}: {events:?}\n{}",
                    self.log()
                );
            }
            assert!(
                Instant::now() < deadline,
                "no {what} in {BOOT_TIMEOUT:?}\n{}",
                self.log()
            );
            std::thread::sleep(Duration::from_millis(50));
        }
    }

    fn agent(&self, vsock: &Path) -> AgentClient {
        let deadline = Instant::now() + Duration::from_secs(60);
        loop {
            match AgentClient::connect(vsock) {
                Ok(a) => return a,
                Err(e) => {
                    assert!(Instant::now() < deadline, "agent: {e}\n{}", self.log());
                    std::thread::sleep(Duration::from_millis(100));
                }
            }
        }
    }
}

impl Drop for Vmm {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// Runs `script` in the guest; returns its stdout, failing on a non-zero
/// exit.
fn sh(agent: &mut AgentClient, script: &str) -> String {
    let (st, out, err) = agent
        .exec_collect(ExecRequest::new(["sh", "-c", script]))
        .expect("exec in the guest");
    assert!(
        st.success(),
        "{script:?} failed ({st:?}):\nstdout: {}\nstderr: {}",
        String::from_utf8_lossy(&out),
        String::from_utf8_lossy(&err)
    );
    String::from_utf8_lossy(&out).into_owned()
}

/// `yes 0123456789abcdef | head -c n`: what the guest can regenerate.
fn pattern(n: usize) -> Vec<u8> {
    b"0123456789abcdef\n"
        .iter()
        .copied()
        .cycle()
        .take(n)
        .collect()
}

/// GET `path` from the guest's httpd, from inside `ns`.
fn http_get(ns: &Netns, path: &str) -> (Vec<u8>, Duration) {
    let path = path.to_string();
    ns.enter(move || {
        let t0 = Instant::now();
        let addr: SocketAddr = format!("{GUEST_IP}:8080").parse().unwrap();
        let mut s = TcpStream::connect_timeout(&addr, Duration::from_secs(20)).expect("connect");
        s.set_read_timeout(Some(Duration::from_secs(60))).unwrap();
        write!(s, "GET {path} HTTP/1.0\r\nHost: guest\r\n\r\n").unwrap();
        let mut resp = Vec::new();
        s.read_to_end(&mut resp).expect("read the response");
        let split = resp
            .windows(4)
            .position(|w| w == b"\r\n\r\n")
            .expect("an HTTP response");
        let head = String::from_utf8_lossy(&resp[..split]).into_owned();
        assert!(
            head.starts_with("HTTP/1.") && head.contains(" 200 "),
            "{head}"
        );
        (resp[split + 4..].to_vec(), t0.elapsed())
    })
}

/// CPU time of each thread of process `pid`: "name=seconds ...".
fn thread_cpu(pid: u32) -> String {
    let mut out = Vec::new();
    for t in std::fs::read_dir(format!("/proc/{pid}/task"))
        .unwrap()
        .flatten()
    {
        let stat = std::fs::read_to_string(t.path().join("stat")).unwrap_or_default();
        let name = std::fs::read_to_string(t.path().join("comm")).unwrap_or_default();
        // Fields after the command's closing parenthesis: utime is the 12th.
        let rest = stat.rsplit_once(')').map(|(_, r)| r).unwrap_or("");
        let f: Vec<u64> = rest
            .split_whitespace()
            .skip(11)
            .take(2)
            .filter_map(|v| v.parse().ok())
            .collect();
        let ticks = f.iter().sum::<u64>() as f64;
        out.push(format!("{}={:.2}", name.trim(), ticks / 100.0));
    }
    out.join(" ")
}

#[test]
fn a_guest_on_a_tap_reaches_its_host_side_and_so_does_its_clone() {
    let image = image();
    let sandbox = Sandbox::new("net");
    let master_dir = sandbox.dir.join("master");
    let clone_dir = sandbox.dir.join("clone");
    let snapshot = sandbox.dir.join("snapshot");
    for d in [&master_dir, &clone_dir, &snapshot] {
        std::fs::create_dir_all(d).unwrap();
    }
    let ns = Netns::create("a");
    let tap = ns.tap();
    let kvm = File::open("/dev/kvm").expect("/dev/kvm");

    let mut boot = BootSource::new(&image.kernel);
    boot.initrd = Some(image.initramfs.clone());
    boot.cmdline = image.cmdline.clone();
    boot.snapshot_dir = Some(snapshot.clone());
    boot.mac = Some(GUEST_MAC);
    let mut launch = VmmLaunch::new(VmSource::Boot(boot));
    launch.vsock = Some(master_dir.join("vsock.sock"));
    launch.control = Some(master_dir.join("control.sock"));
    launch.console = ConsoleTarget::File(master_dir.join("console.log"));
    launch.kvm_fd = Some(kvm.as_raw_fd());
    launch.tap_fd = Some(tap.as_raw_fd());
    let t0 = Instant::now();
    let mut vm = Vmm::spawn(&master_dir, &launch, &[kvm.as_raw_fd(), tap.as_raw_fd()]);
    // The VMM has its own copies now.
    drop(tap);
    vm.wait_for("agent ready", |e| matches!(e, Event::AgentReady { .. }));
    eprintln!("agent ready after {:?}", t0.elapsed());
    let mut agent = vm.agent(launch.vsock.as_ref().unwrap());

    // The device as the guest sees it: our MAC, and the features the
    // driver took (mergeable buffers, offloads both ways).
    let out = sh(
        &mut agent,
        "cat /sys/class/net/eth0/address /sys/class/net/eth0/device/features",
    );
    let lines: Vec<&str> = out.lines().collect();
    assert_eq!(lines[0], GUEST_MAC.to_string());
    let features = lines[1].as_bytes();
    for (bit, name) in [
        (0, "CSUM"),
        (1, "GUEST_CSUM"),
        (5, "MAC"),
        (7, "GUEST_TSO4"),
        (11, "HOST_TSO4"),
        (15, "MRG_RXBUF"),
        (16, "STATUS"),
        (32, "VERSION_1"),
    ] {
        assert_eq!(features.get(bit), Some(&b'1'), "{name} negotiated: {out}");
    }

    // Configure eth0 (the link is up: a tap is attached), ping the host
    // side.
    let out = sh(
        &mut agent,
        &format!(
            "ip addr add {GUEST_IP}/24 dev eth0 && ip link set eth0 up && ip link set lo up && \
             cat /sys/class/net/eth0/carrier && ping -c 1 -W 10 {HOST_IP} >/dev/null && echo reached"
        ),
    );
    assert_eq!(out.lines().collect::<Vec<_>>(), ["1", "reached"]);

    // The host reaches a server in the guest, and moves a file out of it.
    sh(
        &mut agent,
        &format!(
            "mkdir -p /tmp/www && echo hello from the guest > /tmp/www/index.html && \
             yes 0123456789abcdef | head -c {BULK} > /tmp/www/big && \
             httpd -p 8080 -h /tmp/www </dev/null >/dev/null 2>&1"
        ),
    );
    let (body, _) = http_get(&ns, "/index.html");
    assert_eq!(body, b"hello from the guest\n");
    let (body, took) = http_get(&ns, "/big");
    assert!(
        body == pattern(BULK),
        "{} of {BULK} bytes, or other bytes",
        body.len()
    );
    eprintln!(
        "guest -> host: {BULK} bytes in {took:?} ({:.1} MB/s)",
        BULK as f64 / took.as_secs_f64() / 1e6
    );

    // The guest downloads a file from the host side.
    // Bound before the guest asks (the socket stays in the namespace it
    // was made in).
    let listener = ns.enter(|| TcpListener::bind(format!("{HOST_IP}:9000")).expect("bind"));
    let server = std::thread::spawn(move || {
        let (mut s, _) = listener.accept().unwrap();
        let mut req = [0u8; 1024];
        let _ = s.read(&mut req).unwrap();
        write!(s, "HTTP/1.0 200 OK\r\nContent-Length: {BULK}\r\n\r\n").unwrap();
        s.write_all(&pattern(BULK)).unwrap();
    });
    let t = Instant::now();
    sh(
        &mut agent,
        &format!("wget -q -O /tmp/in http://{HOST_IP}:9000/data"),
    );
    let took = t.elapsed();
    server.join().expect("host server");
    eprintln!(
        "host -> guest: {BULK} bytes in {took:?} ({:.1} MB/s)",
        BULK as f64 / took.as_secs_f64() / 1e6
    );
    let out = sh(
        &mut agent,
        &format!(
            "wc -c < /tmp/in && yes 0123456789abcdef | head -c {BULK} | cmp - /tmp/in && echo same"
        ),
    );
    assert_eq!(
        out.split_whitespace().collect::<Vec<_>>(),
        [&BULK.to_string(), "same"]
    );

    // What it cost: the guest's packet counts (few, large packets: the
    // offloads work) and the VMM's event-loop thread's CPU time.
    let out = sh(
        &mut agent,
        "cd /sys/class/net/eth0/statistics && cat tx_packets rx_packets tx_bytes rx_bytes",
    );
    eprintln!(
        "guest eth0 tx_packets rx_packets tx_bytes rx_bytes: {}",
        out.split_whitespace().collect::<Vec<_>>().join(" ")
    );
    eprintln!(
        "VMM threads (utime+stime, s): {}",
        thread_cpu(vm.child.id())
    );

    // Freeze the VM; restore a clone on a tap of its own, in another
    // namespace with the same host side.
    let r = proto::ctl::call(
        launch.control.as_ref().unwrap(),
        &proto::ctl::CtlRequest::Freeze,
        Duration::from_secs(60),
    )
    .expect("freeze");
    assert!(r.ok, "{r:?}");
    drop(agent);
    let status = vm.child.wait().unwrap();
    assert!(status.success(), "a frozen VMM exits 0: {status}");
    drop(ns);

    let ns2 = Netns::create("b");
    let tap2 = ns2.tap();
    let mut launch = VmmLaunch::new(VmSource::Restore {
        snapshot: snapshot.clone(),
    });
    launch.vsock = Some(clone_dir.join("vsock.sock"));
    launch.console = ConsoleTarget::File(clone_dir.join("console.log"));
    launch.kvm_fd = Some(kvm.as_raw_fd());
    launch.tap_fd = Some(tap2.as_raw_fd());
    let mut clone = Vmm::spawn(&clone_dir, &launch, &[kvm.as_raw_fd(), tap2.as_raw_fd()]);
    drop(tap2);
    clone.wait_for("vCPU running", |e| matches!(e, Event::VcpuRunning { .. }));
    let mut agent = clone.agent(launch.vsock.as_ref().unwrap());
    let out = sh(
        &mut agent,
        &format!(
            "cat /sys/class/net/eth0/address /sys/class/net/eth0/carrier && \
             ping -c 1 -W 10 {HOST_IP} >/dev/null && echo reached"
        ),
    );
    assert_eq!(
        out.lines().collect::<Vec<_>>(),
        [GUEST_MAC.to_string().as_str(), "1", "reached"]
    );
    // The httpd of the master runs on in the clone.
    let (body, _) = http_get(&ns2, "/index.html");
    assert_eq!(body, b"hello from the guest\n");

    drop(agent);
    drop(clone);
    drop(vm);
    drop(ns2);
    let left = Command::new("ip").args(["netns", "list"]).output().unwrap();
    let left = String::from_utf8_lossy(&left.stdout);
    let ours = format!("zyg-net-{}-", std::process::id());
    assert!(!left.contains(&ours), "namespaces left: {left}");
    std::fs::remove_dir_all(&sandbox.dir).unwrap();
    sandbox.assert_clean();
}
