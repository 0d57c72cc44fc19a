//! End-to-end tests of clones' networks. Through the `zygote` CLI: a
//! master with a NIC whose warm-up starts busybox `httpd` (so it already
//! listens in every clone), then 20 clones each reached through a port
//! published on the host, each with its own hostname, MAC and address
//! (never the master's), and the isolation a user relies on: no clone
//! reaches another or the host's other addresses unless asked. Through the
//! daemon's API: two tenants' clones, which never reach each other, while
//! one tenant's clones that asked for peers do.

use std::collections::HashSet;
use std::io::{Read, Write};
use std::net::TcpStream;
use std::time::Duration;

use api::client::{Answer, Client};
use serde_json::{json, Value};
use zygote_tests::{
    call, image, kill_processes_mentioning, ok, processes_mentioning, Daemon, Sandbox,
};

const MASTER: &str = "web";
/// Its last step waits until the test has connected to port 9000 (0x2328)
/// from the host: a connection open when the master is frozen.
/// httpd serves /www; `/cgi-bin/who` answers with the guest's hostname,
/// MAC and address, read with shell builtins only (each process spawned
/// in a guest costs seconds of emulated guest kernel on some hosts).
const WARMUP: &str = "mkdir -p /www/cgi-bin && echo from-master > /www/index.html && \
    printf '%s\\n' '#!/bin/sh' 'echo Content-Type: text/plain' 'echo' \
      'read h < /proc/sys/kernel/hostname; read m < /sys/class/net/eth0/address' \
      'p=; a=; while read x y z w; do [ \"$y $z\" = \"host LOCAL\" ] && case $p in 127.*) ;; *) a=$p;; esac; p=$y; done < /proc/net/fib_trie' \
      'echo $h $m $a' > /www/cgi-bin/who && chmod +x /www/cgi-bin/who && \
    httpd -p 8080 -h /www && ip -4 addr show eth0 && cat /sys/class/net/eth0/address && \
    { (sleep 100000 | nc -l -p 9000 > /dev/null; echo $? > /www/conn-end) & } && \
    until grep -q ':2328 [0-9A-F]*:[0-9A-F]* 01 ' /proc/net/tcp; do sleep 0.2; done";
/// The count: 20 clones, each reached through its own port.
const CLONES: usize = 20;
const FIRST_PORT: u16 = 28080;

/// `GET path` on localhost:port; the body.
fn http_get(port: u16, path: &str) -> Result<String, String> {
    let mut s = TcpStream::connect_timeout(
        &format!("127.0.0.1:{port}").parse().unwrap(),
        Duration::from_secs(10),
    )
    .map_err(|e| e.to_string())?;
    // 20 clones each spawning a CGI at once share the host's cores.
    s.set_read_timeout(Some(Duration::from_secs(120))).unwrap();
    write!(s, "GET {path} HTTP/1.0\r\nHost: x\r\n\r\n").map_err(|e| e.to_string())?;
    let mut text = String::new();
    s.read_to_string(&mut text).map_err(|e| e.to_string())?;
    // A CGI script's headers may end in bare newlines.
    text.split_once("\r\n\r\n")
        .or_else(|| text.split_once("\n\n"))
        .map(|(_, body)| body.to_string())
        .ok_or(format!("not an HTTP answer: {text:?}"))
}

/// Connects to port 9000 of the master being made (its address from its
/// lease, once it has one), retrying until the warm-up listens.
fn connect_to_warming_master() -> (String, TcpStream) {
    let deadline = std::time::Instant::now() + Duration::from_secs(400);
    loop {
        assert!(
            std::time::Instant::now() < deadline,
            "the master never listened on 9000"
        );
        // Every master lease of that name (one of a failed earlier run
        // may linger until the next sweep).
        for id in leases_of(&["web-master-"]) {
            let path = host::paths::net_state_dir().join("zygote/vms").join(&id);
            let Some(addr) = std::fs::read(path)
                .ok()
                .and_then(|b| serde_json::from_slice::<Value>(&b).ok())
                .and_then(|v| v["address"].as_str().map(str::to_string))
            else {
                continue;
            };
            let to = format!("{addr}:9000").parse().unwrap();
            if let Ok(s) = TcpStream::connect_timeout(&to, Duration::from_secs(2)) {
                return (id, s);
            }
        }
        std::thread::sleep(Duration::from_millis(300));
    }
}

/// The VMs holding an address on this host whose ids start with one of
/// `prefixes` (leases are per host, not per state directory).
fn leases_of(prefixes: &[&str]) -> Vec<String> {
    let dir = host::paths::net_state_dir().join("zygote").join("vms");
    std::fs::read_dir(dir)
        .map(|d| {
            d.flatten()
                .map(|e| e.file_name().to_string_lossy().into_owned())
                .filter(|n| prefixes.iter().any(|p| n.starts_with(p)))
                .collect()
        })
        .unwrap_or_default()
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
    // A connection the warm-up has open when the master is frozen: the
    // host connects to the master's port 9000 while the warm-up waits.
    let warmup_conn = std::thread::spawn(connect_to_warming_master);
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
    // The freeze aborted it: its peer got a reset, not a hang.
    let (master_vm, mut conn) = warmup_conn.join().unwrap();
    conn.set_read_timeout(Some(Duration::from_secs(30)))
        .unwrap();
    let err = conn.read(&mut [0u8; 16]).unwrap_err();
    assert_eq!(err.kind(), std::io::ErrorKind::ConnectionReset, "{err}");
    assert!(
        master_addr.starts_with("10."),
        "the master had an address: {out:?}"
    );

    let clone_on_first_port = || {
        let publish = format!("{FIRST_PORT}:8080");
        sandbox.zygote(&["clone", MASTER, "--detach", "--publish", &publish], b"")
    };
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
    let out = clone_on_first_port();
    assert!(!out.status.success(), "a published port was given twice");

    // Each clone answers through its own port, all at once, with its own
    // hostname (its id), MAC and address, none of them the master's; the
    // warm-up's server state is there in every one.
    type Reply = (String, Result<String, String>, Result<String, String>);
    let answers: Vec<Reply> = std::thread::scope(|s| {
        let handles: Vec<_> = ids
            .iter()
            .enumerate()
            .map(|(i, id)| {
                let port = FIRST_PORT + i as u16;
                s.spawn(move || {
                    (
                        id.clone(),
                        http_get(port, "/cgi-bin/who"),
                        http_get(port, "/index.html"),
                    )
                })
            })
            .collect();
        handles.into_iter().map(|h| h.join().unwrap()).collect()
    });
    let mut addrs = HashSet::new();
    let mut macs = HashSet::new();
    let master_ip = master_addr.split('/').next().unwrap_or_default();
    for (id, who, index) in &answers {
        let who = who
            .as_ref()
            .unwrap_or_else(|e| panic!("{id}: /cgi-bin/who: {e}"));
        let fields: Vec<&str> = who.split_whitespace().collect();
        let [hostname, mac, addr] = fields[..] else {
            panic!("{id}: /cgi-bin/who answered {who:?}");
        };
        assert_eq!(hostname, id, "the clone behind the port is not {id}");
        assert_ne!(addr, master_ip, "{id} has the master's address");
        assert_ne!(mac, master_mac, "{id} has the master's MAC");
        assert!(
            addrs.insert(addr.to_string()),
            "{id}: address {addr} given twice"
        );
        assert!(macs.insert(mac.to_string()), "{id}: MAC {mac} given twice");
        assert_eq!(index.as_deref().map(str::trim), Ok("from-master"), "{id}");
    }
    // In a clone, the warm-up's connection is reset: its program saw the
    // error and ended (nc's exit code, not 0).
    let end = http_get(FIRST_PORT, "/conn-end").unwrap();
    assert!(
        !end.trim().is_empty() && end.trim() != "0",
        "the warm-up's connection did not end in error: {end:?}"
    );

    // Isolation: without --peers a clone cannot reach another; without
    // --egress it cannot reach the host's other addresses.
    // The prober (the last clone) asks the first one.
    let other = answers[0]
        .1
        .as_deref()
        .unwrap()
        .split_whitespace()
        .nth(2)
        .unwrap()
        .to_string();
    // (nc, not wget: busybox's wget crashes on an unreachable host.)
    let probe =
        format!("printf 'GET /index.html HTTP/1.0\\r\\n\\r\\n' | nc -w 3 {other} 8080; echo rc=$?");
    let out = sandbox.zygote(&["exec", &ids[CLONES - 1], "--", "sh", "-c", &probe], b"");
    let text = ok(&out, "exec nc");
    assert!(
        text.contains("rc=1") && !text.contains("from-master"),
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
        http_get(FIRST_PORT, "/index.html").is_err(),
        "the port still answers"
    );
    let out = clone_on_first_port();
    let again = ok(&out, "clone on a freed port").trim().to_string();
    ok(&sandbox.zygote(&["kill", &again], b""), "kill");
    ok(&sandbox.zygote(&["master", "rm", MASTER], b""), "master rm");
    let _ = std::fs::remove_dir(sandbox.dir.join("clones"));
    let _ = std::fs::remove_dir(sandbox.dir.join("masters"));
    // Neither the clones' addresses nor the master's are leased any more.
    let mine: Vec<&str> = ids
        .iter()
        .map(String::as_str)
        .chain([master_vm.as_str(), again.as_str()])
        .collect();
    let left = leases_of(&mine);
    assert!(left.is_empty(), "addresses still leased: {left:?}");
    sandbox.assert_clean();
}

// ------------------------------------------------------- two tenants

const TOKEN_A: &str = "acme-0123456789abcdef";
const TOKEN_B: &str = "beta-0123456789abcdef";
const TOKENS: &str = "acme-0123456789abcdef acme\nbeta-0123456789abcdef beta\n";
const TENANT_PORT: u16 = 28180;

fn expect(a: &Answer, status: u16, what: &str) -> Value {
    assert_eq!(a.status.as_u16(), status, "{what}: {}", a.text());
    a.json()
}

/// Makes master `web` of the client's tenant, with a NIC and an httpd
/// serving `text`, and waits until it is frozen.
async fn tenant_master(c: &Client, text: &str) {
    let warmup = format!("mkdir -p /www && echo {text} > /www/index.html && httpd -p 8080 -h /www");
    let r = call(
        c,
        "POST",
        "/v1/masters",
        Some(json!({"name": "web", "memory_mib": 128, "net": true,
                    "warmup": warmup, "warmup_timeout_s": 240})),
    )
    .await;
    expect(&r, 202, "POST /v1/masters");
    zygote_tests::wait_frozen(c, "web", Duration::from_secs(400)).await;
}

/// One clone of `web`; its instance JSON.
async fn tenant_clone(c: &Client, extra: Value) -> Value {
    let mut body = json!({"master": "web"});
    body.as_object_mut()
        .unwrap()
        .extend(extra.as_object().unwrap().clone());
    let r = call(c, "POST", "/v1/instances", Some(body)).await;
    let v = expect(&r, 201, "POST /v1/instances");
    assert_eq!(v["started"], 1, "{v}");
    v["results"][0]["instance"].clone()
}

/// What `from` gets from `to`'s httpd (the page, or why not).
async fn fetch(c: &Client, from: &Value, to: &Value) -> Result<String, String> {
    let to = to["net"]["address"].as_str().unwrap();
    let path = format!("/v1/instances/{}/exec", from["id"].as_str().unwrap());
    let r = call(
        c,
        "POST",
        &path,
        Some(json!({"argv": ["nc", "-w", "30", to, "8080"],
                    "stdin": "GET /index.html HTTP/1.0\r\n\r\n"})),
    )
    .await;
    let e = expect(&r, 200, "exec nc");
    let out = e["stdout"].as_str().unwrap_or_default();
    match out.split_once("\r\n\r\n") {
        Some((_, body)) if e["exit_code"] == 0 => Ok(body.trim().to_string()),
        _ => Err(format!("{e}")),
    }
}

#[test]
fn tenants_networks_are_apart_through_the_daemon() {
    let _ = image();
    let sandbox = Sandbox::new("net-tenants");
    let mut d = Daemon::start(&sandbox.dir, TOKENS, &["--on-shutdown", "stop"]);
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .unwrap();
    let result = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
        rt.block_on(async {
            let a = d.tcp(Some(TOKEN_A));
            let b = d.tcp(Some(TOKEN_B));
            tokio::join!(tenant_master(&a, "tenant-a"), tenant_master(&b, "tenant-b"));

            let port = json!([{"host_port": TENANT_PORT, "guest_port": 8080}]);
            let a1 = tenant_clone(&a, json!({"peers": true, "ports": port})).await;
            let a2 = tenant_clone(&a, json!({"peers": true})).await;
            let a3 = tenant_clone(&a, json!({})).await;
            let b1 = tenant_clone(&b, json!({"peers": true})).await;

            // Each instance reports its network: its own address and MAC,
            // its ports, what it may reach.
            let all = [&a1, &a2, &a3, &b1];
            let addrs: HashSet<&str> = all
                .iter()
                .filter_map(|i| i["net"]["address"].as_str())
                .collect();
            let macs: HashSet<&str> = all
                .iter()
                .filter_map(|i| i["net"]["mac"].as_str())
                .collect();
            assert_eq!((addrs.len(), macs.len()), (4, 4), "{all:#?}");
            assert_eq!(
                a1["net"]["ports"],
                json!([{"host_port": TENANT_PORT, "guest_port": 8080, "protocol": "tcp"}])
            );
            assert_eq!(
                (a1["net"]["peers"].as_bool(), a3["net"]["peers"].as_bool()),
                (Some(true), Some(false))
            );
            let again = call(
                &a,
                "GET",
                &format!("/v1/instances/{}", a1["id"].as_str().unwrap()),
                None,
            )
            .await;
            assert_eq!(expect(&again, 200, "GET instance")["net"], a1["net"]);
            assert_eq!(
                http_get(TENANT_PORT, "/index.html").unwrap().trim(),
                "tenant-a"
            );

            // One tenant's peers reach each other; nothing else does.
            let (a1_a2, a1_a3, a1_b1, b1_a1) = tokio::join!(
                fetch(&a, &a1, &a2),
                fetch(&a, &a1, &a3),
                fetch(&a, &a1, &b1),
                fetch(&b, &b1, &a1)
            );
            assert_eq!(a1_a2.as_deref(), Ok("tenant-a"), "peers of one tenant");
            assert!(
                a1_a3.is_err(),
                "reached a clone that did not ask for peers: {a1_a3:?}"
            );
            assert!(a1_b1.is_err(), "tenant A reached tenant B: {a1_b1:?}");
            assert!(b1_a1.is_err(), "tenant B reached tenant A: {b1_a1:?}");

            for (c, i) in [(&a, &a1), (&a, &a2), (&a, &a3), (&b, &b1)] {
                let r = call(
                    c,
                    "DELETE",
                    &format!("/v1/instances/{}", i["id"].as_str().unwrap()),
                    None,
                )
                .await;
                expect(&r, 204, "DELETE instance");
            }
            for c in [&a, &b] {
                expect(
                    &call(c, "DELETE", "/v1/masters/web", None).await,
                    204,
                    "DELETE master",
                );
            }
            assert!(
                http_get(TENANT_PORT, "/index.html").is_err(),
                "the port still answers"
            );
        })
    }));
    if let Err(panic) = result {
        kill_processes_mentioning(&sandbox.dir);
        eprintln!("{}", d.log_text());
        std::panic::resume_unwind(panic);
    }
    let status = d.stop();
    assert!(status.success(), "daemon exit: {status}");
    let procs = processes_mentioning(&sandbox.dir.to_string_lossy());
    assert!(procs.is_empty(), "processes left: {procs:?}");
    let left = leases_of(&["web.acme-", "web.beta-"]);
    assert!(left.is_empty(), "addresses still leased: {left:?}");
    // The daemon's tokens file and log live beside the state directory.
    std::fs::remove_dir_all(Daemon::etc_dir(&sandbox.dir)).unwrap();
}
