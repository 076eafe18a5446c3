//! The systems the benchmarks start on loopback ports: postfix's smtp-sink, gannetd,
//! the system Postfix, unbound. Each is stopped by its PID (Postfix with its own
//! `postfix stop`).

use std::net::{SocketAddr, TcpStream};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail};

use crate::free_port;

/// One system under test, started on a loopback port.
#[derive(Debug)]
pub struct Server {
    pub name: String,
    pub port: u16,
    /// The HTTP injection port (gannet only; 0 for the others).
    pub http_port: u16,
    /// The process tree whose CPU is counted.
    pub pid: u32,
    pub child: Option<Child>,
}

impl Server {
    /// Stops the system (SIGTERM, then SIGKILL after 30 s; Postfix with
    /// `postfix stop` after its queue is emptied).
    pub fn stop(mut self) -> Result<()> {
        self.shut_down()
    }

    fn shut_down(&mut self) -> Result<()> {
        if let Some(mut child) = self.child.take() {
            // SAFETY: signalling a child we started.
            unsafe { libc::kill(child.id() as i32, libc::SIGTERM) };
            let deadline = Instant::now() + Duration::from_secs(30);
            while child.try_wait()?.is_none() {
                if Instant::now() > deadline {
                    child.kill()?;
                }
                std::thread::sleep(Duration::from_millis(20));
            }
            child.wait()?;
        }
        if self.name == "postfix" {
            self.name.clear();
            let etc = postfix_config_dir();
            let etc = etc.to_str().unwrap_or_default();
            run_quiet("postsuper", &["-c", etc, "-d", "ALL"])?;
            run_quiet("postfix", &["-c", etc, "stop"])?;
        }
        Ok(())
    }
}

/// A benchmark that fails half-way still stops what it started.
impl Drop for Server {
    fn drop(&mut self) {
        let _ = self.shut_down();
    }
}

pub fn run_quiet(cmd: &str, args: &[&str]) -> Result<()> {
    let out = Command::new(cmd)
        .args(args)
        .output()
        .with_context(|| format!("running {cmd}"))?;
    if !out.status.success() {
        bail!(
            "{cmd} {args:?} failed: {}",
            String::from_utf8_lossy(&out.stderr)
        );
    }
    Ok(())
}

pub fn wait_for_port(port: u16) -> Result<()> {
    let deadline = Instant::now() + Duration::from_secs(30);
    while TcpStream::connect(("127.0.0.1", port)).is_err() {
        if Instant::now() > deadline {
            bail!("nothing listens on port {port}");
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    Ok(())
}

/// postfix's smtp-sink on a free port with `extra` arguments; its standard output is
/// piped (for `-c` counters) or dropped.
pub fn smtp_sink(extra: &[&str], piped: bool) -> Result<Server> {
    anyhow::ensure!(
        Path::new("/usr/sbin/smtp-sink").exists(),
        "starting smtp-sink: /usr/sbin/smtp-sink is missing (install postfix)"
    );
    let (child, port) = crate::peers::spawn_listening(|port| {
        let mut command = Command::new("/usr/sbin/smtp-sink");
        command
            .args(["-u", "nobody"])
            .args(extra)
            .args([&format!("127.0.0.1:{port}"), "1000"])
            .stdout(if piped { Stdio::piped() } else { Stdio::null() })
            .stderr(Stdio::null());
        command
    });
    Ok(Server {
        http_port: 0,
        name: "sink".into(),
        port,
        pid: child.id(),
        child: Some(child),
    })
}

/// Starts one of the bench's own programs (`binary`, run by `command`), which
/// announces itself with one JSON line on its standard output (its addresses): the
/// child and that line. Later output is not read.
pub fn spawn_announcing(
    command: &mut Command,
    binary: &Path,
) -> Result<(Child, serde_json::Value)> {
    let mut child = command
        .stdout(Stdio::piped())
        .spawn()
        .with_context(|| format!("starting {}", binary.display()))?;
    let mut line = String::new();
    std::io::BufRead::read_line(
        &mut std::io::BufReader::new(child.stdout.as_mut().context("no standard output")?),
        &mut line,
    )?;
    drop(child.stdout.take());
    let v = serde_json::from_str(&line)
        .with_context(|| format!("{}: start line {line:?}", binary.display()))?;
    Ok((child, v))
}

/// gannet-forward relaying to `to`: the reference of a relay that opens a new
/// connection per delivery, with no queue and no disk; with `dns` (a port on
/// 127.0.0.1) it finds each message's next hop through MX and address lookups first
/// (and connects on `to`'s port), without it no DNS at all.
pub fn forward(binary: &Path, to: std::net::SocketAddr, dns: Option<u16>) -> Result<Server> {
    let mut command = Command::new(binary);
    command.args(["--listen", "127.0.0.1:0", "--to", &to.to_string()]);
    if let Some(port) = dns {
        command.args(["--dns", &format!("127.0.0.1:{port}")]);
    }
    let (child, v) = spawn_announcing(&mut command, binary)?;
    let addr: std::net::SocketAddr = v["smtp"].as_str().unwrap_or("").parse()?;
    Ok(Server {
        http_port: 0,
        name: if dns.is_some() {
            "forward-dns".into()
        } else {
            "forward".into()
        },
        port: addr.port(),
        pid: child.id(),
        child: Some(child),
    })
}

/// gannetd on a fresh data directory under `dir`, with `[server]` keys `server_extra`
/// and further sections `rest`; returns once it listens (SMTP on a free port).
pub fn gannetd(
    binary: &Path,
    dir: &Path,
    shards: usize,
    server_extra: &str,
    rest: &str,
) -> Result<Server> {
    gannetd_with(binary, dir, shards, server_extra, "", rest)
}

/// [`gannetd`] with further `[smtp]` keys `smtp_extra` (users, relay_from, …).
pub fn gannetd_with(
    binary: &Path,
    dir: &Path,
    shards: usize,
    server_extra: &str,
    smtp_extra: &str,
    rest: &str,
) -> Result<Server> {
    let _ = std::fs::remove_dir_all(dir);
    std::fs::create_dir_all(dir)?;
    let config = format!(
        "[server]\nhostname = \"bench.test\"\ndata_dir = \"{}\"\nshards = {shards}\n{server_extra}\n\
         [smtp]\nlisten = [\"127.0.0.1:0\"]\nsessions_per_ip_max = 100000\nsessions_max = 100000\n{smtp_extra}\n\
         [http]\nlisten = [\"127.0.0.1:0\"]\n{rest}\n",
        dir.join("data").display(),
    );
    let path = dir.join("gannetd.toml");
    std::fs::write(&path, config)?;
    let (child, v) = start_gannetd(binary, &path, &dir.join("data"), Duration::from_secs(30))?;
    let addr: SocketAddr = v["smtp"][0].as_str().unwrap_or("").parse()?;
    let http: SocketAddr = v["http"][0].as_str().unwrap_or("").parse()?;
    let cores = std::thread::available_parallelism().map_or(1, |n| n.get());
    let shards = if shards == 0 { cores } else { shards };
    Ok(Server {
        http_port: http.port(),
        name: format!(
            "gannet ({shards} shard{})",
            if shards == 1 { "" } else { "s" }
        ),
        port: addr.port(),
        pid: child.id(),
        child: Some(child),
    })
}

/// Starts `binary` with the configuration at `config` (whose data directory is
/// `data`) and returns once it listens, with what `data/listeners.json` says.
pub fn start_gannetd(
    binary: &Path,
    config: &Path,
    data: &Path,
    limit: Duration,
) -> Result<(Child, serde_json::Value)> {
    let listeners = data.join("listeners.json");
    let _ = std::fs::remove_file(&listeners);
    let mut child = Command::new(binary)
        .args(["--config", config.to_str().unwrap_or_default()])
        .args(["--log", "warn"])
        .stdout(Stdio::null())
        .stderr(Stdio::inherit())
        .spawn()
        .with_context(|| format!("starting {}", binary.display()))?;
    let deadline = Instant::now() + limit;
    let text = loop {
        if let Ok(text) = std::fs::read_to_string(&listeners) {
            break text;
        }
        if Instant::now() > deadline {
            let _ = child.kill();
            let _ = child.wait();
            bail!("gannetd did not listen within {limit:?}");
        }
        std::thread::sleep(Duration::from_millis(5));
    };
    Ok((child, serde_json::from_str(&text)?))
}

/// Where the bench's own Postfix instance lives: its config directory (`etc/`), queue
/// (`queue/`), data (`data/`) and log. The path is fixed so that the one line that
/// allows it in the host's main.cf (`alternate_config_directories`) is added once.
pub const POSTFIX_INSTANCE: &str = "/var/lib/gannet-bench/postfix";

/// The config directory of the bench's Postfix instance.
pub fn postfix_config_dir() -> PathBuf {
    Path::new(POSTFIX_INSTANCE).join("etc")
}

/// Makes sure the host's Postfix allows the bench's instance: its config directory
/// listed in `alternate_config_directories` of `/etc/postfix/main.cf`, which Postfix
/// requires before root may start an instance from another directory. This is the
/// only write under /etc: one line, added once (kept for later runs, never removed,
/// other entries left as they are); nothing else of the host's Postfix is touched.
pub fn allow_postfix_instance() -> Result<()> {
    let dir = postfix_config_dir();
    let dir = dir.to_str().unwrap_or_default();
    let main_cf = Path::new("/etc/postfix/main.cf");
    if !main_cf.exists() {
        // Postfix installed without a configuration: the line alone.
        std::fs::write(
            main_cf,
            format!(
                "# Added by gannet-bench: allows its own Postfix instance (nothing else).\nalternate_config_directories = {dir}\n"
            ),
        )
        .context("writing the alternate_config_directories line to /etc/postfix/main.cf")?;
        return Ok(());
    }
    let current = crate::command_output("postconf", &["-h", "alternate_config_directories"]);
    let listed = current
        .split([',', ' ', '\t'])
        .filter(|d| !d.is_empty())
        .any(|d| d == dir);
    if listed {
        return Ok(());
    }
    let value = if current.trim().is_empty() {
        dir.to_string()
    } else {
        format!("{}, {dir}", current.trim())
    };
    run_quiet(
        "postconf",
        &["-e", &format!("alternate_config_directories = {value}")],
    )
}

/// Stops the bench's Postfix instance if one is running (a run that was killed), and
/// empties its queue.
fn stop_postfix_instance() {
    let etc = postfix_config_dir();
    if etc.join("main.cf").exists() {
        let etc = etc.to_str().unwrap_or_default();
        let _ = run_quiet("postsuper", &["-c", etc, "-d", "ALL"]);
        let _ = run_quiet("postfix", &["-c", etc, "stop"]);
    }
}

/// Postfix as an instance of its own — config, queue and data directories under
/// [`POSTFIX_INSTANCE`], `chroot = n`, listening on a free loopback port with
/// `settings` (main.cf lines) over a loopback-only base — started, leaving the host's
/// Postfix (its config, its queue, its running master) as it was.
pub fn postfix(sessions: u64, message_size_limit: usize, settings: &[String]) -> Result<Server> {
    if !Path::new("/usr/sbin/postfix").exists() {
        bail!("postfix is not installed");
    }
    allow_postfix_instance()?;
    stop_postfix_instance();
    let base = Path::new(POSTFIX_INSTANCE);
    let etc = postfix_config_dir();
    let (queue, data) = (base.join("queue"), base.join("data"));
    for dir in [&queue, &data] {
        let _ = std::fs::remove_dir_all(dir);
    }
    std::fs::create_dir_all(&etc)?;
    std::fs::create_dir_all(&queue)?;
    std::fs::create_dir_all(&data)?;
    // The master's lock and the TLS caches are written as the mail owner.
    let id = |flag| {
        crate::command_output("id", &[flag, "postfix"])
            .parse::<u32>()
            .ok()
    };
    std::os::unix::fs::chown(&data, id("-u"), id("-g"))
        .context("giving the instance's data directory to the postfix user")?;
    let port = free_port();
    let mut main_cf = std::fs::read_to_string("/usr/share/postfix/main.cf.debian")
        .or_else(|_| std::fs::read_to_string("/etc/postfix/main.cf.proto"))
        .context("reading Postfix's stock main.cf")?;
    let mut all = vec![
        format!("queue_directory = {}", queue.display()),
        format!("data_directory = {}", data.display()),
        "multi_instance_name = postfix-gannet-bench".into(),
        "syslog_name = postfix-gannet-bench".into(),
        format!("maillog_file = {}", base.join("postfix.log").display()),
        "inet_interfaces = loopback-only".into(),
        "inet_protocols = ipv4".into(),
        "mydestination =".into(),
        "mynetworks = 127.0.0.0/8".into(),
        "smtpd_relay_restrictions = permit_mynetworks, reject".into(),
        "smtp_tls_security_level = none".into(),
        "smtpd_tls_security_level = none".into(),
        "smtpd_tls_cert_file =".into(),
        "smtpd_tls_key_file =".into(),
        "compatibility_level = 3.6".into(),
        "alias_maps =".into(),
        "alias_database =".into(),
        format!("default_process_limit = {}", sessions * 2 + 10),
        "smtpd_client_connection_count_limit = 0".into(),
        "smtpd_client_connection_rate_limit = 0".into(),
        format!("message_size_limit = {}", message_size_limit.max(10 << 20)),
    ];
    all.extend(settings.iter().cloned());
    // Later lines win in main.cf.
    main_cf.push_str("\n# gannet-bench's instance\n");
    for line in &all {
        main_cf.push_str(line);
        main_cf.push('\n');
    }
    std::fs::write(etc.join("main.cf"), main_cf)?;
    let master = std::fs::read_to_string("/usr/share/postfix/master.cf.dist")
        .or_else(|_| std::fs::read_to_string("/etc/postfix/master.cf.proto"))
        .context("reading Postfix's stock master.cf")?;
    std::fs::write(etc.join("master.cf"), instance_master_cf(&master, port))?;
    let etc_arg = etc.to_str().unwrap_or_default();
    run_quiet("postfix", &["-c", etc_arg, "start"])?;
    wait_for_port(port)?;
    let pid: u32 = std::fs::read_to_string(queue.join("pid/master.pid"))?
        .trim()
        .parse()?;
    Ok(Server {
        http_port: 0,
        name: "postfix".into(),
        port,
        pid,
        child: None,
    })
}

/// A stock master.cf for the bench's instance: the `smtp inet` service listens on
/// `port` instead of 25, and no service runs chrooted (the instance's queue is not
/// where a chroot would expect it).
fn instance_master_cf(stock: &str, port: u16) -> String {
    let mut out = String::with_capacity(stock.len());
    for line in stock.lines() {
        let service = !line.is_empty() && !line.starts_with(['#', ' ', '\t']);
        let mut fields: Vec<&str> = line.split_whitespace().collect();
        let port_name = port.to_string();
        if service && fields.len() >= 8 {
            if fields[0] == "smtp" && fields[1] == "inet" {
                fields[0] = &port_name;
            }
            fields[4] = "n";
            out.push_str(&fields.join(" "));
        } else {
            out.push_str(line);
        }
        out.push('\n');
    }
    out
}

/// KumoMTA (`kumod`) with a policy of the bench's own in `dir`: an ESMTP listener on a
/// free loopback port relaying for 127.0.0.1, its RocksDB spools and logs under `dir`,
/// every queue routed to the sink on `sink_port` without TLS (or, when `relay` is
/// false, to a closed port with an hour between tries: acceptance only, as Postfix's
/// deferred delivery). With `force_sync` every received message is synced before its
/// 250 (`msg:set_force_sync(true)`), the only way KumoMTA's 250 is durable; without it
/// RocksDB writes without a sync (KumoMTA's default). With `dns` (the port of the bench's DNS server)
/// each domain goes to its own MX hosts from that server, on the sink's port.
pub fn kumod(
    binary: &Path,
    dir: &Path,
    sink_port: u16,
    relay: bool,
    force_sync: bool,
    sessions: u64,
    dns: Option<u16>,
) -> Result<Server> {
    let _ = std::fs::remove_dir_all(dir);
    std::fs::create_dir_all(dir)?;
    let port = free_port();
    let (to_port, retry) = if relay { (sink_port, "1m") } else { (9, "1h") };
    let sync = if force_sync {
        "kumo.on('smtp_server_message_received', function(msg)\n  msg:set_force_sync(true)\nend)\n"
    } else {
        ""
    };
    // With DNS, every queue goes through an egress source of the bench's whose
    // remote_port is the sink's (the MX hosts all resolve to 127.0.0.1).
    let (resolver, route, source) = match dns {
        Some(dns) => (
            format!("kumo.dns.configure_resolver {{ name_servers = {{ '127.0.0.1:{dns}' }} }}\n"),
            "egress_pool = 'bench', ".to_string(),
            format!(
                "kumo.on('get_egress_pool', function(name)\n  \
                   return kumo.make_egress_pool {{ name = name, entries = {{ {{ name = 'bench' }} }} }}\n\
                 end)\n\
                 kumo.on('get_egress_source', function(name)\n  \
                   return kumo.make_egress_source {{ name = name, remote_port = {to_port} }}\n\
                 end)\n"
            ),
        ),
        None => (
            String::new(),
            format!(
                "protocol = {{ smtp = {{ mx_list = {{ {{ name = 'sink', addr = '127.0.0.1:{to_port}' }} }} }} }}, "
            ),
            String::new(),
        ),
    };
    let d = dir.display();
    let policy = format!(
        "-- Written by gannet-bench: a loopback relay to the bench's sink.\n\
         local kumo = require 'kumo'\n\
         kumo.on('init', function()\n\
           kumo.start_esmtp_listener {{ listen = '127.0.0.1:{port}', relay_hosts = {{ '127.0.0.1' }} }}\n\
           kumo.define_spool {{ name = 'data', path = '{d}/data', kind = 'RocksDB' }}\n\
           kumo.define_spool {{ name = 'meta', path = '{d}/meta', kind = 'RocksDB' }}\n\
           kumo.configure_local_logs {{ log_dir = '{d}/logs' }}\n\
           kumo.configure_accounting_db_path('{d}/accounting.db')\n\
           {resolver}\
         end)\n\
         kumo.on('get_queue_config', function(domain, tenant, campaign, routing_domain)\n\
           return kumo.make_queue_config {{ {route}retry_interval = '{retry}' }}\n\
         end)\n\
         kumo.on('get_egress_path_config', function(domain, source, site)\n\
           return kumo.make_egress_path {{ enable_tls = 'Disabled', prohibited_hosts = {{}}, connection_limit = {sessions}, max_ready = 1000000 }}\n\
         end)\n\
         {source}{sync}"
    );
    let path = dir.join("policy.lua");
    std::fs::write(&path, policy)?;
    // kumod's own diagnostics (policy errors, startup) stay beside its spools.
    let log = std::fs::File::create(dir.join("kumod.log"))?;
    let child = Command::new(binary)
        .args([
            "--policy",
            path.to_str().unwrap_or_default(),
            "--user",
            "root",
        ])
        .stdout(Stdio::null())
        .stderr(log)
        .spawn()
        .with_context(|| format!("starting {}", binary.display()))?;
    wait_for_port(port)?;
    Ok(Server {
        http_port: 0,
        name: if force_sync {
            "kumomta-sync".into()
        } else {
            "kumomta".into()
        },
        port,
        pid: child.id(),
        child: Some(child),
    })
}

/// The `kumod` to benchmark: the one given, or the one on PATH.
pub fn find_kumod(given: Option<&Path>) -> Option<PathBuf> {
    if let Some(path) = given {
        return Some(path.to_path_buf());
    }
    std::env::var_os("PATH").and_then(|paths| {
        std::env::split_paths(&paths)
            .map(|dir| dir.join("kumod"))
            .find(|candidate| candidate.is_file())
    })
}

/// Whether unbound (the benchmarks' DNS server) is installed.
pub fn has_unbound() -> bool {
    Command::new("unbound").arg("-V").output().is_ok()
}

/// Installs the peers tests and benchmarks use (`tools/install-peers.sh --bench`:
/// Postfix, unbound, …): the script of the checkout this binary was built from,
/// whatever the working directory (a test's is its package's).
pub fn install_bench_peers() -> Result<()> {
    let script = Path::new(env!("CARGO_MANIFEST_DIR")).join("../tools/install-peers.sh");
    let status = Command::new(&script)
        .arg("--bench")
        .status()
        .with_context(|| format!("running {} --bench", script.display()))?;
    if !status.success() {
        bail!("tools/install-peers.sh --bench failed");
    }
    Ok(())
}

/// The benchmarks' DNS server: unbound (a recursive resolver, as an MTA host runs
/// next to it) on a free loopback port, serving from a static local zone `.test`
/// with `domains` domains `d<N>.test`, each with its own MX host `mx<N>.bench.test`
/// at 127.0.0.1; every other `.test` name is NXDOMAIN. Its configuration goes to
/// `dir`. Stopped when the returned peer is dropped.
///
/// Not dnsmasq, which the tests use: dnsmasq scans its `--mx-host` list for every
/// question, and with 10,000 domains it spent 118 µs of CPU per question against
/// unbound's 25 µs (a sixth of the machine in many-domains), so the rig, not the
/// MTA, set the pace (bench/RESULTS.md).
pub fn bench_dns(dir: &Path, domains: u64) -> Result<(crate::peers::Peer, u16)> {
    bench_dns_with(dir, domains, "")
}

/// [`bench_dns`] answering `more` (local-data lines) too.
pub fn bench_dns_with(dir: &Path, domains: u64, more: &str) -> Result<(crate::peers::Peer, u16)> {
    use std::fmt::Write as _;
    let mut zone = String::with_capacity(100 * domains as usize);
    for d in 0..domains {
        let _ = writeln!(
            zone,
            "  local-data: \"d{d}.test. 300 IN MX 10 mx{d}.bench.test.\"\n  local-data: \"mx{d}.bench.test. 300 IN A 127.0.0.1\""
        );
    }
    zone.push_str(more);
    unbound(dir, &zone)
}

/// The rig's DNS server for a provider: `domains` domains d0.test … whose MX is
/// Gmail's host name, answered by unbound on loopback as 127.0.0.1 (the sink), so
/// that provider rules matched on MX suffix (`.google.com`) apply.
pub fn provider_dns(dir: &Path, domains: u64) -> Result<(crate::peers::Peer, u16)> {
    use std::fmt::Write as _;
    let mut zone = String::from(
        "  local-zone: \"google.com.\" static\n  local-data: \"gmail-smtp-in.l.google.com. 300 IN A 127.0.0.1\"\n",
    );
    for d in 0..domains {
        let _ = writeln!(
            zone,
            "  local-data: \"d{d}.test. 300 IN MX 5 gmail-smtp-in.l.google.com.\""
        );
    }
    unbound(dir, &zone)
}

/// unbound on a free loopback port answering `zone` (local-data lines) under the
/// static local zone `test.`.
fn unbound(dir: &Path, zone: &str) -> Result<(crate::peers::Peer, u16)> {
    if !has_unbound() {
        install_bench_peers()?;
    }
    std::fs::create_dir_all(dir)?;
    for _ in 0..20 {
        let port = crate::peers::free_udp_port();
        let config = dir.join("unbound.conf");
        std::fs::write(
            &config,
            format!(
                "server:\n  interface: 127.0.0.1\n  port: {port}\n  num-threads: 1\n  username: \"\"\n  chroot: \"\"\n  directory: \"{}\"\n  pidfile: \"\"\n  use-syslog: no\n  logfile: \"\"\n  verbosity: 0\n  do-ip6: no\n  do-daemonize: no\n  access-control: 127.0.0.0/8 allow\n  module-config: \"iterator\"\n  local-zone: \"test.\" static\n{zone}",
                dir.display()
            ),
        )?;
        let child = Command::new("unbound")
            .arg("-d")
            .arg("-c")
            .arg(&config)
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .context("starting unbound")?;
        let mut peer = crate::peers::Peer(child);
        if crate::peers::dns_answers(port, &mut peer) {
            return Ok((peer, port));
        }
    }
    bail!("unbound did not start on any of 20 ports")
}

/// Haraka (Node.js) installed under `install` (`npm install Haraka@3.3.4` when
/// missing), configured in `dir` to accept mail for `domains` and forward it at queue
/// time to `sink_port` (queue/smtp_forward), with `nodes` worker processes.
pub fn haraka(
    install: &Path,
    dir: &Path,
    sink_port: u16,
    domains: &[String],
    nodes: usize,
) -> Result<Server> {
    let bin = install.join("node_modules/.bin/haraka");
    if !bin.exists() {
        std::fs::create_dir_all(install)?;
        let status = Command::new("npm")
            .args([
                "install",
                "--no-audit",
                "--no-fund",
                "--silent",
                "Haraka@3.3.4",
            ])
            .current_dir(install)
            .stdout(Stdio::null())
            .status()
            .context("running npm (install nodejs and npm)")?;
        if !status.success() {
            bail!("npm install Haraka@3.3.4 failed");
        }
    }
    let _ = std::fs::remove_dir_all(dir);
    run_quiet(
        bin.to_str().unwrap_or_default(),
        &["-i", dir.to_str().unwrap_or_default()],
    )?;
    let port = free_port();
    let config = dir.join("config");
    std::fs::write(
        config.join("smtp.ini"),
        format!("listen=127.0.0.1:{port}\nnodes={nodes}\ninactivity_timeout=300\n"),
    )?;
    std::fs::write(
        config.join("plugins"),
        "rcpt_to.in_host_list\nqueue/smtp_forward\n",
    )?;
    std::fs::write(config.join("host_list"), domains.join("\n") + "\n")?;
    std::fs::write(
        config.join("smtp_forward.ini"),
        format!("host=127.0.0.1\nport={sink_port}\nenable_tls=false\nmax_connections=1000\n"),
    )?;
    std::fs::write(config.join("log.ini"), "[main]\nlevel=warn\n")?;
    std::fs::write(config.join("databytes"), "52428800\n")?;
    let child = Command::new(&bin)
        .args(["-c", dir.to_str().unwrap_or_default()])
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .context("starting haraka")?;
    wait_for_port(port)?;
    Ok(Server {
        http_port: 0,
        name: "haraka".into(),
        port,
        pid: child.id(),
        child: Some(child),
    })
}
