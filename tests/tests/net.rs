//! End-to-end test of clones' networks through the `zygote` CLI: a master
//! with a NIC whose warm-up starts busybox `httpd` (so it already listens
//! in every clone), then clones each reached through a port published on
//! the host, each with its own MAC and address (never the master's), and
//! the isolation a user relies on: no clone reaches another or the host's
//! other addresses unless asked.

use std::collections::HashSet;
use std::io::{Read, Write};
use std::net::TcpStream;
use std::time::Duration;

use zygote_tests::{image, ok, Sandbox};

const MASTER: &str = "web";
/// httpd serves /www; each clone writes its id there when asked.
const WARMUP: &str = "mkdir -p /www && echo from-master > /www/index.html && \
    httpd -p 8080 -h /www && ip -4 addr show eth0 && cat /sys/class/net/eth0/address";
const CLONES: usize = 6;
const FIRST_PORT: u16 = 28080;

/// `GET path` on localhost:port; the body.
fn http_get(port: u16, path: &str) -> Result<String, String> {
    let mut s = TcpStream::connect_timeout(
        &format!("127.0.0.1:{port}").parse().unwrap(),
        Duration::from_secs(10),
    )
    .map_err(|e| e.to_string())?;
    s.set_read_timeout(Some(Duration::from_secs(30))).unwrap();
    write!(s, "GET {path} HTTP/1.0\r\nHost: x\r\n\r\n").map_err(|e| e.to_string())?;
    let mut text = String::new();
    s.read_to_string(&mut text).map_err(|e| e.to_string())?;
    text.split_once("\r\n\r\n")
        .map(|(_, body)| body.to_string())
        .ok_or(format!("not an HTTP answer: {text:?}"))
}

/// inet ADDR/LEN of `ip -4 addr` output, and the MAC on its own line.
fn addr_and_mac(text: &str) -> (String, String) {
    let addr = text
        .split_whitespace()
        .skip_while(|w| *w != "inet")
        .nth(1)
        .unwrap_or_default()
        .to_string();
    let mac = text
        .lines()
        .map(str::trim)
        .find(|l| l.len() == 17 && l.matches(':').count() == 5)
        .unwrap_or_default()
        .to_string();
    (addr, mac)
}

#[test]
fn clones_are_reached_through_their_published_ports_and_are_isolated() {
    let _ = image();
    let sandbox = Sandbox::new("net");
    let out = sandbox.zygote(
        &[
            "master",
            "create",
            MASTER,
            "--net",
            "--warmup",
            WARMUP,
            "--boot-timeout",
            "240",
        ],
        b"",
    );
    ok(&out, "master create --net");
    let (master_addr, master_mac) = addr_and_mac(&String::from_utf8_lossy(&out.stderr));
    assert!(
        master_addr.starts_with("10."),
        "the master had an address: {out:?}"
    );

    let mut ids = Vec::new();
    for i in 0..CLONES {
        let publish = format!("{}:8080", FIRST_PORT + i as u16);
        let out = sandbox.zygote(
            &[
                "clone",
                MASTER,
                "--detach",
                "--timeout",
                "240",
                "--publish",
                &publish,
            ],
            b"",
        );
        ids.push(ok(&out, "clone --publish").trim().to_string());
    }
    // A host port goes to one clone only.
    let out = sandbox.zygote(
        &[
            "clone",
            MASTER,
            "--detach",
            "--publish",
            &format!("{FIRST_PORT}:8080"),
        ],
        b"",
    );
    assert!(!out.status.success(), "a published port was given twice");

    let mut addrs = HashSet::new();
    let mut macs = HashSet::new();
    for id in &ids {
        let out = sandbox.zygote(
            &[
                "exec",
                id,
                "--",
                "sh",
                "-c",
                "cat /run/zygote/id > /www/id.txt; ip -4 addr show eth0; cat /sys/class/net/eth0/address",
            ],
            b"",
        );
        let (addr, mac) = addr_and_mac(&ok(&out, "exec"));
        assert_ne!(addr, master_addr, "{id} has the master's address");
        assert_ne!(mac, master_mac, "{id} has the master's MAC");
        assert!(
            addrs.insert(addr.clone()),
            "{id}: address {addr} given twice"
        );
        assert!(macs.insert(mac.clone()), "{id}: MAC {mac} given twice");
    }
    // Each clone answers with its own id through its own port, and the
    // warm-up's server state is there in every one.
    for (i, id) in ids.iter().enumerate() {
        let port = FIRST_PORT + i as u16;
        assert_eq!(http_get(port, "/id.txt").unwrap().trim(), id, "port {port}");
        assert_eq!(http_get(port, "/index.html").unwrap().trim(), "from-master");
    }

    // Isolation: without --peers a clone cannot reach another; without
    // --egress it cannot reach the host's other addresses.
    let other = addrs
        .iter()
        .next()
        .unwrap()
        .split('/')
        .next()
        .unwrap()
        .to_string();
    let probe = format!("wget -q -T 3 -O - http://{other}:8080/id.txt; echo rc=$?");
    let out = sandbox.zygote(&["exec", &ids[CLONES - 1], "--", "sh", "-c", &probe], b"");
    let text = ok(&out, "exec wget");
    assert!(
        text.contains("rc=1") && !text.contains("web-"),
        "a clone reached another: {text}"
    );
    let host_ip = std::process::Command::new("sh")
        .args(["-c", "ip -4 -o addr show scope global | awk '{print $4}' | cut -d/ -f1 | grep -v '^10\\.123\\.' | head -1"])
        .output()
        .map(|o| String::from_utf8_lossy(&o.stdout).trim().to_string())
        .unwrap_or_default();
    if !host_ip.is_empty() {
        let listener = std::net::TcpListener::bind(format!("{host_ip}:0")).unwrap();
        let port = listener.local_addr().unwrap().port();
        listener.set_nonblocking(true).unwrap();
        let probe = format!("echo hi | nc -w 3 {host_ip} {port}; echo rc=$?");
        let out = sandbox.zygote(&["exec", &ids[0], "--", "sh", "-c", &probe], b"");
        ok(&out, "exec nc");
        assert!(
            listener.accept().is_err(),
            "a clone without --egress reached the host's {host_ip}"
        );
    }

    // Killing the clones frees their ports and addresses.
    ok(&sandbox.zygote(&["kill", "--all"], b""), "kill --all");
    assert!(
        http_get(FIRST_PORT, "/id.txt").is_err(),
        "the port still answers"
    );
    let out = sandbox.zygote(
        &[
            "clone",
            MASTER,
            "--detach",
            "--publish",
            &format!("{FIRST_PORT}:8080"),
        ],
        b"",
    );
    let again = ok(&out, "clone on a freed port").trim().to_string();
    ok(&sandbox.zygote(&["kill", &again], b""), "kill");
    ok(&sandbox.zygote(&["master", "rm", MASTER], b""), "master rm");
    let _ = std::fs::remove_dir(sandbox.dir.join("clones"));
    let _ = std::fs::remove_dir(sandbox.dir.join("masters"));
    let _ = std::fs::remove_dir_all(sandbox.dir.join("net"));
    sandbox.assert_clean();
}
