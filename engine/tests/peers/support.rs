//! Starting the real peers the tests talk to (aiosmtpd, dnsmasq, smtp-sink) on free
//! loopback ports, and stopping them by PID. Shared by the engine's unit tests
//! (included from `src/lib.rs`), its integration tests (included from
//! `tests/common`) and the benchmarks (included from `bench/src/lib.rs`).

#![allow(dead_code)]

use std::io::BufRead;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::Duration;

/// A peer process, stopped (SIGTERM, then reaped) when dropped.
#[derive(Debug)]
pub struct Peer(pub Child);

impl Drop for Peer {
    fn drop(&mut self) {
        // SAFETY: signalling a child this test started.
        unsafe { libc::kill(self.0.id() as i32, libc::SIGTERM) };
        let _ = self.0.wait();
    }
}

/// A loopback TCP port free now, never one this process was given before: two
/// ports asked for in a row could otherwise come out the same (the kernel may hand
/// a port it just freed out again), and a daemon given the same port for two
/// listeners would serve one's clients on the other.
pub fn free_port() -> u16 {
    static GIVEN: std::sync::Mutex<std::collections::BTreeSet<u16>> =
        std::sync::Mutex::new(std::collections::BTreeSet::new());
    loop {
        let port = std::net::TcpListener::bind("127.0.0.1:0")
            .unwrap()
            .local_addr()
            .unwrap()
            .port();
        if GIVEN.lock().unwrap_or_else(|e| e.into_inner()).insert(port) {
            return port;
        }
    }
}

pub fn free_udp_port() -> u16 {
    std::net::UdpSocket::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

/// Postfix's smtp-sink on a free port, with its extra arguments (e.g. `-d dir/msg.`
/// to keep each transaction in a file); returns once it listens, with its port.
pub fn smtp_sink(extra: &[&str]) -> (Peer, u16) {
    let (child, port) = spawn_listening(|port| {
        let mut command = Command::new("/usr/sbin/smtp-sink");
        command
            .args(["-u", "nobody"])
            .args(extra)
            .args([&format!("127.0.0.1:{port}"), "100"])
            .stdout(Stdio::null());
        command
    });
    (Peer(child), port)
}

/// Starts a server that cannot listen on port 0 (`command(port)`) on a free
/// loopback port and returns once *it* listens there. A free port can be taken by
/// someone else between the probe and the server's bind (tests run in parallel);
/// then the server exits, or something else answers on the port: either way the
/// listening socket is not in the child's descriptors, and another port is tried.
pub fn spawn_listening(command: impl Fn(u16) -> Command) -> (Child, u16) {
    for _ in 0..20 {
        let port = free_port();
        let mut child = command(port)
            .spawn()
            .unwrap_or_else(|e| panic!("starting a test peer: {e}"));
        let deadline = std::time::Instant::now() + Duration::from_secs(10);
        loop {
            if child.try_wait().ok().flatten().is_some() {
                break;
            }
            if listens_on(child.id(), port) {
                return (child, port);
            }
            if std::time::Instant::now() > deadline {
                let _ = child.kill();
                let _ = child.wait();
                break;
            }
            std::thread::sleep(Duration::from_millis(10));
        }
    }
    panic!("no free port for a test peer after 20 tries");
}

/// Whether process `pid` holds a socket listening on 127.0.0.1:`port` (from
/// /proc/net/tcp and the process's descriptors).
fn listens_on(pid: u32, port: u16) -> bool {
    let local = format!("0100007F:{port:04X}");
    let Ok(table) = std::fs::read_to_string("/proc/net/tcp") else {
        return false;
    };
    let inodes: Vec<String> = table
        .lines()
        .skip(1)
        .filter_map(|line| {
            let f: Vec<&str> = line.split_whitespace().collect();
            (f.len() > 9 && f[1] == local && f[3] == "0A").then(|| format!("socket:[{}]", f[9]))
        })
        .collect();
    if inodes.is_empty() {
        return false;
    }
    let Ok(fds) = std::fs::read_dir(format!("/proc/{pid}/fd")) else {
        return false;
    };
    fds.flatten().any(|fd| {
        std::fs::read_link(fd.path())
            .is_ok_and(|target| inodes.iter().any(|i| target.as_os_str() == i.as_str()))
    })
}

/// The venv's Python, which has aiosmtpd (tools/test.sh creates it).
pub fn python() -> PathBuf {
    let path = Path::new(env!("CARGO_MANIFEST_DIR")).join("../target/pyenv/bin/python3");
    assert!(
        path.exists(),
        "{} is missing; tools/test.sh creates it with aiosmtpd",
        path.display()
    );
    path
}

/// Starts aiosmtpd (tests/peers/aiosmtpd_sink.py) on a free port, storing messages in
/// `out`, with STARTTLS when `tls` gives a certificate and key; returns once it listens.
pub fn aiosmtpd(out: &Path, tls: Option<(&Path, &Path)>) -> (Peer, u16) {
    aiosmtpd_with(out, tls, None)
}

/// aiosmtpd that closes sessions idle for `timeout_secs` (with a 421).
pub fn aiosmtpd_with(
    out: &Path,
    tls: Option<(&Path, &Path)>,
    timeout_secs: Option<f64>,
) -> (Peer, u16) {
    let mut args: Vec<std::ffi::OsString> = Vec::new();
    if let Some((cert, key)) = tls {
        args.extend(["--tls".into(), cert.into(), key.into()]);
    }
    if let Some(secs) = timeout_secs {
        args.extend(["--timeout".into(), secs.to_string().into()]);
    }
    aiosmtpd_args(out, &args)
}

/// aiosmtpd with the arguments of tests/peers/aiosmtpd_sink.py after its port and
/// directory (`--tls`, `--broken-tls`, `--auth`, `--auth-mechs`, `--timeout`).
pub fn aiosmtpd_args(out: &Path, args: &[std::ffi::OsString]) -> (Peer, u16) {
    let script = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/peers/aiosmtpd_sink.py");
    let (mut child, port) = spawn_listening(|port| {
        let mut command = Command::new(python());
        command
            .arg(&script)
            .arg(port.to_string())
            .arg(out)
            .args(args);
        command.stdout(Stdio::piped());
        command
    });
    // "ready" follows once the controller has checked that it answers.
    await_ready(&mut child, "tests/peers/aiosmtpd_sink.py");
    (Peer(child), port)
}

/// Waits for the "ready" line a Python peer prints once it answers.
fn await_ready(child: &mut std::process::Child, script: &str) {
    let mut line = String::new();
    std::io::BufReader::new(child.stdout.take().expect("the peer's output is piped"))
        .read_line(&mut line)
        .unwrap();
    assert_eq!(line.trim(), "ready", "{script} did not start");
}

/// The DANE tests' DNS server (tests/peers/dns_stub.py, dnspython) on a free UDP
/// port: answers from the zone file `zone`, with the AD bit set for names under the
/// `secure` suffixes and SERVFAIL for the `servfail` names.
pub fn dns_stub(zone: &Path, secure: &[&str], servfail: &[&str]) -> (Peer, u16) {
    let script = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/peers/dns_stub.py");
    let port = free_udp_port();
    let mut child = Command::new(python())
        .arg(&script)
        .arg(port.to_string())
        .arg(zone)
        .arg("--secure")
        .arg(secure.join(","))
        .arg("--servfail")
        .arg(servfail.join(","))
        .stdout(Stdio::piped())
        .spawn()
        .expect("the venv's python");
    await_ready(&mut child, "tests/peers/dns_stub.py");
    (Peer(child), port)
}

/// The HTTPS server of the TLS tests (tests/peers/https_server.py) on a free port:
/// files under `root` by Host, with `cert`/`key` (or per SNI name from `sni`).
pub fn https_server(root: &Path, cert: &Path, key: &Path, sni: Option<&Path>) -> (Peer, u16) {
    let script = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/peers/https_server.py");
    let (mut child, port) = spawn_listening(|port| {
        let mut command = Command::new(python());
        command
            .arg(&script)
            .arg(port.to_string())
            .args([root, cert, key]);
        if let Some(dir) = sni {
            command.arg("--sni").arg(dir);
        }
        command.stdout(Stdio::piped());
        command
    });
    await_ready(&mut child, "tests/peers/https_server.py");
    (Peer(child), port)
}

/// The webhook receiver (tests/peers/webhook_receiver.py, Python's http.server) on a
/// free port, writing each batch to `out` before it answers `status`.
pub fn webhook_receiver(out: &Path, status: u16) -> (Peer, u16) {
    let (child, port) = spawn_listening(|port| webhook_receiver_command(port, out, status));
    (Peer(child), port)
}

/// The webhook receiver again on `port` (a receiver that comes back): waits until it
/// listens.
pub fn webhook_receiver_on(port: u16, out: &Path, status: u16) -> Peer {
    let deadline = std::time::Instant::now() + Duration::from_secs(20);
    loop {
        let mut child = webhook_receiver_command(port, out, status).spawn().unwrap();
        loop {
            if listens_on(child.id(), port) {
                return Peer(child);
            }
            if child.try_wait().ok().flatten().is_some() {
                break;
            }
            std::thread::sleep(Duration::from_millis(10));
        }
        assert!(
            std::time::Instant::now() < deadline,
            "the webhook receiver cannot listen on {port} again"
        );
        std::thread::sleep(Duration::from_millis(100));
    }
}

fn webhook_receiver_command(port: u16, out: &Path, status: u16) -> Command {
    let script = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/peers/webhook_receiver.py");
    let mut command = Command::new(python());
    command
        .arg(&script)
        .arg(port.to_string())
        .arg(out)
        .arg(status.to_string())
        .stdout(Stdio::null());
    command
}

/// A RabbitMQ node of the test's own (with its own epmd), on free loopback ports,
/// its data in `dir`: `Rabbit::start` again on the same `dir` and ports is the same
/// node restarted, with its durable queues.
#[derive(Debug)]
pub struct Rabbit {
    pub port: u16,
    epmd_port: u16,
    dist_port: u16,
    name: String,
    dir: PathBuf,
    /// The start script (it runs the Erlang VM as its child) and the VM's pid.
    node: Option<(Child, u32)>,
    _epmd: Peer,
}

impl Drop for Rabbit {
    fn drop(&mut self) {
        self.stop_node();
    }
}

impl Rabbit {
    pub fn start(dir: &Path) -> Rabbit {
        let epmd_port = free_port();
        let epmd = Command::new("epmd")
            .args(["-port", &epmd_port.to_string(), "-address", "127.0.0.1"])
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("epmd comes with rabbitmq-server (tools/install-peers.sh)");
        let mut rabbit = Rabbit {
            port: free_port(),
            epmd_port,
            dist_port: free_port(),
            name: format!("gannet{}x{}@localhost", std::process::id(), epmd_port),
            dir: dir.to_path_buf(),
            node: None,
            _epmd: Peer(epmd),
        };
        rabbit.start_node();
        rabbit
    }

    /// Starts the node (again) and waits until it takes connections.
    pub fn start_node(&mut self) {
        let dir = &self.dir;
        std::fs::create_dir_all(dir.join("log")).unwrap();
        std::fs::write(dir.join("enabled_plugins"), "[].\n").unwrap();
        std::fs::write(dir.join("rabbitmq.conf"), "loopback_users = none\n").unwrap();
        let mut command = Command::new("/usr/lib/rabbitmq/bin/rabbitmq-server");
        command
            .env("HOME", dir)
            .env("RABBITMQ_NODENAME", &self.name)
            .env("RABBITMQ_NODE_IP_ADDRESS", "127.0.0.1")
            .env("RABBITMQ_NODE_PORT", self.port.to_string())
            .env("RABBITMQ_DIST_PORT", self.dist_port.to_string())
            .env("ERL_EPMD_PORT", self.epmd_port.to_string())
            .env(
                "RABBITMQ_SERVER_ADDITIONAL_ERL_ARGS",
                "-kernel inet_dist_use_interface {127,0,0,1}",
            )
            .env("RABBITMQ_MNESIA_BASE", dir.join("mnesia"))
            .env("RABBITMQ_LOG_BASE", dir.join("log"))
            .env("RABBITMQ_CONFIG_FILE", dir.join("rabbitmq"))
            .env("RABBITMQ_ENABLED_PLUGINS_FILE", dir.join("enabled_plugins"))
            .env("RABBITMQ_PLUGINS_EXPAND_DIR", dir.join("plugins-expand"))
            .env("RABBITMQ_PID_FILE", dir.join("rabbit.pid"))
            .stdout(Stdio::null())
            .stderr(Stdio::null());
        let _ = std::fs::remove_file(dir.join("rabbit.pid"));
        let mut script = command
            .spawn()
            .expect("rabbitmq-server (tools/install-peers.sh)");
        let deadline = std::time::Instant::now() + Duration::from_secs(60);
        // The VM writes its pid once it boots; the listener appears in its
        // descriptors once the broker takes connections.
        loop {
            let vm = std::fs::read_to_string(dir.join("rabbit.pid"))
                .ok()
                .and_then(|p| p.trim().parse::<u32>().ok());
            if let Some(vm) = vm
                && listens_on(vm, self.port)
            {
                self.node = Some((script, vm));
                return;
            }
            if let Ok(Some(status)) = script.try_wait() {
                panic!(
                    "rabbitmq-server exited with {status}; see {}",
                    dir.join("log").display()
                );
            }
            assert!(
                std::time::Instant::now() < deadline,
                "rabbitmq-server did not start"
            );
            std::thread::sleep(Duration::from_millis(100));
        }
    }

    /// The Erlang VM's pid while the node runs.
    pub fn vm_pid(&self) -> Option<u32> {
        self.node.as_ref().map(|n| n.1)
    }

    /// Stops the node: SIGTERM to the VM (the script ends with it), and waits.
    pub fn stop_node(&mut self) {
        if let Some((mut script, vm)) = self.node.take() {
            // SAFETY: signalling the VM this test started.
            unsafe { libc::kill(vm as i32, libc::SIGTERM) };
            let deadline = std::time::Instant::now() + Duration::from_secs(30);
            while Path::new(&format!("/proc/{vm}")).exists() && std::time::Instant::now() < deadline
            {
                std::thread::sleep(Duration::from_millis(50));
            }
            let _ = script.wait();
        }
    }

    /// Runs tests/peers/amqp_queue.py against the node.
    pub fn client(&self, args: &[&str]) -> std::process::Output {
        // From the engine's tests and the benchmarks alike.
        let script =
            Path::new(env!("CARGO_MANIFEST_DIR")).join("../engine/tests/peers/amqp_queue.py");
        let out = Command::new(python())
            .arg(&script)
            .arg(self.port.to_string())
            .args(args)
            .output()
            .unwrap();
        assert!(
            out.status.success(),
            "amqp_queue.py {args:?}: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        out
    }
}

/// Starts dnsmasq on a free loopback port, answering for `.test` only (every name
/// not in `records` is NXDOMAIN), with `records` as extra options (`--mx-host=…`,
/// `--host-record=…`, TTLs); returns once it answers queries, with its port. A port
/// taken meanwhile by another process (dnsmasq then exits) is replaced by another.
pub fn dnsmasq(records: &[String]) -> (Peer, u16) {
    for _ in 0..20 {
        let port = free_udp_port();
        let child = Command::new("dnsmasq")
            .args([
                "--no-daemon",
                "--conf-file=/dev/null",
                "--pid-file=",
                "--no-resolv",
                "--no-hosts",
                "--bind-interfaces",
                "--listen-address=127.0.0.1",
                &format!("--port={port}"),
                "--local=/test/",
            ])
            .args(records)
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("dnsmasq is installed by tools/install-peers.sh");
        let mut peer = Peer(child);
        if dns_answers(port, &mut peer) {
            return (peer, port);
        }
    }
    panic!("dnsmasq did not start on any of 20 ports");
}

/// Whether the DNS server of `peer` answers a query on `port` within 10 s (false as
/// soon as it has exited).
pub fn dns_answers(port: u16, peer: &mut Peer) -> bool {
    // A query for probe.test, type A, class IN.
    let mut query = vec![0x12, 0x34, 0x01, 0x00, 0, 1, 0, 0, 0, 0, 0, 0];
    for label in ["probe", "test"] {
        query.push(label.len() as u8);
        query.extend_from_slice(label.as_bytes());
    }
    query.extend_from_slice(&[0, 0, 1, 0, 1]);
    let socket = std::net::UdpSocket::bind("127.0.0.1:0").expect("a UDP socket");
    let _ = socket.set_read_timeout(Some(Duration::from_millis(100)));
    let deadline = std::time::Instant::now() + Duration::from_secs(10);
    while std::time::Instant::now() < deadline {
        if peer.0.try_wait().ok().flatten().is_some() {
            return false;
        }
        let _ = socket.send_to(&query, ("127.0.0.1", port));
        let mut answer = [0u8; 512];
        if let Ok((n, _)) = socket.recv_from(&mut answer)
            && n >= 2
            && answer[..2] == [0x12, 0x34]
        {
            // Bound on UDP; TCP is bound by then too, or the server has exited.
            return peer.0.try_wait().ok().flatten().is_none();
        }
    }
    false
}

/// A misbehaving next hop (tests/peers/faulty_mx.py: `banner554`, `ehlo554`,
/// `close`, `reset_data`, `tarpit`) on a free port; each connection it accepts adds
/// a line to `count_file`.
pub fn faulty_mx(mode: &str, count_file: &Path) -> (Peer, u16) {
    let script = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/peers/faulty_mx.py");
    let (child, port) = spawn_listening(|port| {
        let mut command = Command::new(python());
        command
            .arg(&script)
            .arg(port.to_string())
            .arg(mode)
            .arg(count_file)
            .stdout(Stdio::null());
        command
    });
    (Peer(child), port)
}

/// A Redis server (Debian's redis-server) on a free loopback port: no persistence,
/// stopped by PID when dropped.
pub fn redis_server() -> (Peer, u16) {
    let (child, port) = spawn_listening(redis_command);
    (Peer(child), port)
}

/// A Redis server on `port` (a restart on the port a test chose), once it listens.
pub fn redis_server_on(port: u16) -> Peer {
    redis_listening(redis_command(port), port)
}

/// Starts `command` (a redis-server on `port`) and waits until it listens.
fn redis_listening(mut command: Command, port: u16) -> Peer {
    let mut child = command
        .spawn()
        .unwrap_or_else(|e| panic!("starting redis-server: {e}"));
    let deadline = std::time::Instant::now() + Duration::from_secs(10);
    while !listens_on(child.id(), port) {
        assert!(
            std::time::Instant::now() < deadline && child.try_wait().ok().flatten().is_none(),
            "redis-server did not listen on {port}"
        );
        std::thread::sleep(Duration::from_millis(10));
    }
    Peer(child)
}

/// A Redis Cluster of three primaries on loopback, each on a free port with its
/// cluster bus on another, its slots assigned by `redis-cli --cluster create`;
/// ready once every node says the cluster is ok. The nodes stop when it drops.
#[derive(Debug)]
pub struct RedisCluster {
    /// Declared before `_dir` so the servers stop before their directory goes.
    _nodes: Vec<Peer>,
    pub ports: Vec<u16>,
    _dir: tempfile::TempDir,
}

pub fn redis_cluster() -> RedisCluster {
    let dir = tempfile::tempdir().unwrap();
    let mut nodes = Vec::new();
    let mut ports = Vec::new();
    for i in 0..3 {
        let (port, bus) = (free_port(), free_port());
        let mut command = redis_command(port);
        command.args(["--dir", &dir.path().display().to_string()]);
        command.args([
            "--cluster-enabled",
            "yes",
            "--cluster-port",
            &bus.to_string(),
        ]);
        command.args(["--cluster-config-file", &format!("nodes-{i}.conf")]);
        nodes.push(redis_listening(command, port));
        ports.push(port);
    }
    let addresses: Vec<String> = ports.iter().map(|p| format!("127.0.0.1:{p}")).collect();
    let created = Command::new("redis-cli")
        .args(["--cluster", "create"])
        .args(&addresses)
        .args(["--cluster-replicas", "0", "--cluster-yes"])
        .output()
        .unwrap_or_else(|e| panic!("redis-cli --cluster create: {e}"));
    assert!(
        created.status.success(),
        "redis-cli --cluster create: {}",
        String::from_utf8_lossy(&created.stdout)
    );
    let deadline = std::time::Instant::now() + Duration::from_secs(20);
    for port in &ports {
        loop {
            let info = Command::new("redis-cli")
                .args(["-p", &port.to_string(), "cluster", "info"])
                .output()
                .unwrap();
            if String::from_utf8_lossy(&info.stdout).contains("cluster_state:ok") {
                break;
            }
            assert!(
                std::time::Instant::now() < deadline,
                "the Redis Cluster on {port} is not ok"
            );
            std::thread::sleep(Duration::from_millis(100));
        }
    }
    RedisCluster {
        _nodes: nodes,
        ports,
        _dir: dir,
    }
}

fn redis_command(port: u16) -> Command {
    let mut command = Command::new("redis-server");
    command
        .args(["--port", &port.to_string(), "--bind", "127.0.0.1"])
        .args(["--save", "", "--appendonly", "no", "--daemonize", "no"])
        .args(["--dir", &std::env::temp_dir().display().to_string()])
        .stdout(Stdio::null())
        .stderr(Stdio::null());
    command
}
