//! Shared helpers of the engine's integration tests: a gannetd process on ephemeral
//! loopback ports with its own data directory, a raw SMTP client that speaks bytes,
//! and a reader for what the daemon spooled.

#![allow(dead_code)]

pub mod admin;
pub mod load;
#[path = "../peers/support.rs"]
pub mod peers;
pub mod pki;
pub mod relay;

use std::io::{BufRead, BufReader, Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

/// A running gannetd. Stopped (SIGTERM, then SIGKILL) when dropped.
pub struct Daemon {
    pub child: Child,
    pub dir: tempfile::TempDir,
    pub smtp: SocketAddr,
    pub smtps: Option<SocketAddr>,
    pub http: SocketAddr,
    pub https: Option<SocketAddr>,
    /// Everything the daemon logged so far.
    pub log: Arc<Mutex<Vec<String>>>,
}

/// A config with every listener on an ephemeral loopback port, plus `extra` TOML
/// (whole sections; `[smtp]` keys go in `smtp_extra`). Unless `extra` configures
/// delivery, delivery is suspended: ingress tests then find every accepted message
/// in the spool, whatever DNS this machine has.
pub fn config_text(data_dir: &Path, smtp_extra: &str, extra: &str) -> String {
    let delivery = if extra.contains("[delivery]") {
        ""
    } else {
        "[delivery]\nsuspended = true\n"
    };
    format!(
        "[server]\nhostname = \"gannet.test\"\ndata_dir = \"{}\"\nshards = 2\n\
         [smtp]\nlisten = [\"127.0.0.1:0\"]\ntls_listen = [\"127.0.0.1:0\"]\n{smtp_extra}\n\
         [http]\nlisten = [\"127.0.0.1:0\"]\n{extra}\n{delivery}",
        data_dir.join("data").display()
    )
}

impl Daemon {
    /// Starts gannetd with `config_text(dir, smtp_extra, extra)` and waits until it
    /// listens.
    pub fn start(smtp_extra: &str, extra: &str) -> Daemon {
        let dir = tempfile::tempdir().unwrap();
        let text = config_text(dir.path(), smtp_extra, extra);
        Daemon::start_in(dir, &text)
    }

    /// Starts gannetd on `config` inside `dir` (which it keeps).
    pub fn start_in(dir: tempfile::TempDir, config: &str) -> Daemon {
        Daemon::start_with(dir, config, |_| {})
    }

    /// Like [`Daemon::start_in`], with a chance to adjust the command first.
    pub fn start_with(
        dir: tempfile::TempDir,
        config: &str,
        adjust: impl FnOnce(&mut Command),
    ) -> Daemon {
        Daemon::start_under(dir, config, &[], adjust)
    }

    /// Like [`Daemon::start_with`], gannetd run by `wrapper` (a program and its
    /// arguments that exec the command after them, as `setpriv` does).
    pub fn start_under(
        dir: tempfile::TempDir,
        config: &str,
        wrapper: &[&str],
        adjust: impl FnOnce(&mut Command),
    ) -> Daemon {
        let path = dir.path().join("gannetd.toml");
        std::fs::write(&path, config).unwrap();
        // A daemon killed earlier leaves its file behind.
        let _ = std::fs::remove_file(dir.path().join("data/listeners.json"));
        let mut command = match wrapper.split_first() {
            Some((program, args)) => {
                let mut command = Command::new(program);
                command.args(args).arg(env!("CARGO_BIN_EXE_gannetd"));
                command
            }
            None => Command::new(env!("CARGO_BIN_EXE_gannetd")),
        };
        command.args(["--config", path.to_str().unwrap(), "--log", "info"]);
        adjust(&mut command);
        let mut child = command
            .stdout(Stdio::null())
            .stderr(Stdio::piped())
            .spawn()
            .unwrap();
        let log = Arc::new(Mutex::new(Vec::new()));
        let stderr = child.stderr.take().unwrap();
        std::thread::spawn({
            let log = log.clone();
            move || {
                for line in BufReader::new(stderr).lines().map_while(Result::ok) {
                    log.lock().unwrap().push(line);
                }
            }
        });
        let listeners = dir.path().join("data/listeners.json");
        let deadline = Instant::now() + Duration::from_secs(30);
        let text = loop {
            if let Ok(text) = std::fs::read_to_string(&listeners) {
                break text;
            }
            if let Some(status) = child.try_wait().unwrap() {
                panic!("gannetd exited with {status}: {:#?}", log.lock().unwrap());
            }
            assert!(
                Instant::now() < deadline,
                "gannetd did not start: {:#?}",
                log.lock().unwrap()
            );
            std::thread::sleep(Duration::from_millis(20));
        };
        // The file is written just before gannetd logs that it is ready, and the log
        // reaches us through a pipe and a thread: wait for that line, so that a test
        // reading the start-up log (recovery counts of every shard) sees all of it.
        while !log
            .lock()
            .unwrap()
            .iter()
            .any(|line| line.contains("gannetd ready"))
        {
            assert!(
                Instant::now() < deadline,
                "gannetd did not log that it is ready: {:#?}",
                log.lock().unwrap()
            );
            std::thread::sleep(Duration::from_millis(5));
        }
        let v: serde_json::Value = serde_json::from_str(&text).unwrap();
        let addr = |key: &str| -> Option<SocketAddr> {
            v[key].as_array()?.first()?.as_str()?.parse().ok()
        };
        Daemon {
            smtp: addr("smtp").unwrap(),
            smtps: addr("smtps"),
            http: addr("http").unwrap(),
            https: addr("https"),
            child,
            dir,
            log,
        }
    }

    pub fn data_dir(&self) -> PathBuf {
        self.dir.path().join("data")
    }

    pub fn connect(&self) -> Client {
        Client::connect(self.smtp)
    }

    /// One transaction on a new connection (EHLO, MAIL, one RCPT, DATA) sending
    /// `content` (headers and body, CRLF lines, without the final dot): the reply to
    /// the message.
    pub fn send_message(&self, rcpt: &str, content: &str) -> String {
        let mut c = self.connect();
        c.expect("220");
        c.send(
            format!("EHLO c.test\r\nMAIL FROM:<s@b.test>\r\nRCPT TO:<{rcpt}>\r\nDATA\r\n")
                .as_bytes(),
        );
        for code in ["250", "250", "250", "354"] {
            c.expect(code);
        }
        c.send(format!("{content}.\r\n").as_bytes());
        c.reply().unwrap_or_default()
    }

    /// Like [`Daemon::send_message`], expecting it accepted: its queue id.
    pub fn send_accepted(&self, rcpt: &str, content: &str) -> String {
        let reply = self.send_message(rcpt, content);
        let id = reply.trim_end().strip_prefix("250 2.0.0 OK queued as ");
        id.unwrap_or_else(|| panic!("not accepted: {reply}"))
            .to_string()
    }

    /// SIGTERM, then waits for a clean exit.
    pub fn stop(&mut self) {
        // SAFETY: signalling the child this test started.
        unsafe { libc::kill(self.child.id() as i32, libc::SIGTERM) };
        let deadline = Instant::now() + Duration::from_secs(30);
        loop {
            if let Some(status) = self.child.try_wait().unwrap() {
                assert!(
                    status.success(),
                    "gannetd exit: {status}: {:#?}",
                    self.log.lock().unwrap()
                );
                return;
            }
            assert!(Instant::now() < deadline, "gannetd did not stop");
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    /// SIGKILL: no chance to sync or clean up.
    pub fn kill(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }

    /// The events the shards logged (after a stop, or after the flush interval).
    pub fn events(&self) -> Vec<serde_json::Value> {
        let mut out = Vec::new();
        let Ok(shards) = std::fs::read_dir(self.data_dir().join("events")) else {
            return out;
        };
        let mut shards: Vec<PathBuf> = shards.flatten().map(|e| e.path()).collect();
        shards.sort();
        for shard in shards {
            let path = shard.join("events.jsonl");
            if let Ok(text) = std::fs::read_to_string(path) {
                out.extend(text.lines().map(|l| serde_json::from_str(l).unwrap()));
            }
        }
        out
    }

    /// GETs a path from the HTTP listener: (status, body).
    pub fn http_get(&self, path: &str) -> (u16, String) {
        let mut stream = TcpStream::connect(self.http).unwrap();
        write!(
            stream,
            "GET {path} HTTP/1.1\r\nhost: x\r\nconnection: close\r\n\r\n"
        )
        .unwrap();
        let mut text = String::new();
        stream.read_to_string(&mut text).unwrap();
        let status = text[9..12].parse().unwrap();
        let body = text.split_once("\r\n\r\n").unwrap().1.to_string();
        (status, body)
    }

    /// A counter summed over shards from /metrics.
    /// The event hose's metric `gannet_<name>` of sink `sink` (0 when absent).
    pub fn sink_metric(&self, name: &str, sink: &str) -> u64 {
        let (_, metrics) = self.http_get("/metrics");
        let prefix = format!("gannet_{name}{{sink=\"{sink}\"}} ");
        metrics
            .lines()
            .find_map(|l| l.strip_prefix(&prefix))
            .and_then(|v| v.parse().ok())
            .unwrap_or(0)
    }

    pub fn metric(&self, name: &str) -> u64 {
        let (_, body) = self.http_get("/metrics");
        body.lines()
            .filter(|l| l.starts_with(&format!("gannet_{name}{{")))
            .map(|l| l.rsplit(' ').next().unwrap().parse::<u64>().unwrap())
            .sum()
    }
}

impl Drop for Daemon {
    fn drop(&mut self) {
        if self.child.try_wait().ok().flatten().is_none() {
            let _ = self.child.kill();
            let _ = self.child.wait();
        }
    }
}

/// Runs `command` with `input` on its standard input; its output and status.
pub fn run_with_input(command: &mut Command, input: &[u8]) -> std::process::Output {
    let mut child = command
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    child.stdin.take().unwrap().write_all(input).unwrap();
    child.wait_with_output().unwrap()
}

/// dkimpy verifies every DKIM-Signature of a message: [{d, s, a, c, ok}].
const VERIFY: &str = r#"
import json, sys, dkim
records = json.loads(sys.argv[1])
message = sys.stdin.buffer.read()
def dnsfunc(name, timeout=5):
    return records.get(name.decode()).encode()
out = []
count = len([1 for line in message.split(b"\r\n") if line.lower().startswith(b"dkim-signature:")])
for i in range(count):
    v = dkim.DKIM(message)
    ok = v.verify(idx=i, dnsfunc=dnsfunc)
    tags = dict(v.signature_fields)
    out.append({"d": tags[b"d"].decode(), "s": tags[b"s"].decode(), "a": tags[b"a"].decode(),
                "c": tags.get(b"c", b"simple/simple").decode(), "ok": bool(ok)})
print(json.dumps(out))
"#;

pub fn dkimpy_verify(records: &serde_json::Value, message: &[u8]) -> Vec<serde_json::Value> {
    let out = run_with_input(
        Command::new(peers::python())
            .arg("-c")
            .arg(VERIFY)
            .arg(records.to_string()),
        message,
    );
    assert!(
        out.status.success(),
        "dkimpy: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    let v: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    v.as_array().unwrap().clone()
}

/// A new Ed25519 DKIM key in `dir` (PKCS#8 PEM, as `[dkim] keys` take).
pub fn ed25519_key(dir: &Path) -> PathBuf {
    use base64::Engine as _;
    let pkcs8 =
        ring::signature::Ed25519KeyPair::generate_pkcs8(&ring::rand::SystemRandom::new()).unwrap();
    let pem = format!(
        "-----BEGIN PRIVATE KEY-----\n{}\n-----END PRIVATE KEY-----\n",
        base64::engine::general_purpose::STANDARD.encode(pkcs8.as_ref())
    );
    let path = dir.join("ed25519.pem");
    std::fs::write(&path, pem).unwrap();
    path
}

/// A password hash made by `gannetd --hash-password`, for `smtp.users`.
pub fn hash_password(password: &str) -> String {
    let out = run_with_input(
        Command::new(env!("CARGO_BIN_EXE_gannetd")).arg("--hash-password"),
        password.as_bytes(),
    );
    assert!(out.status.success());
    String::from_utf8(out.stdout).unwrap().trim().to_string()
}

/// A spooled message as recovered from disk.
#[derive(Debug, Clone)]
pub struct Spooled {
    pub id: String,
    pub sender: String,
    pub recipients: Vec<String>,
    pub meta: Vec<(String, String)>,
    pub queue: String,
    pub body: Vec<u8>,
    /// The shard directory it was found in, and its retry state.
    pub shard: u16,
    pub attempts: u32,
    pub due_ms: u64,
    pub done: Vec<u32>,
}

/// Every live message in a (stopped) daemon's spool.
pub fn spooled(data_dir: &Path) -> Vec<Spooled> {
    let mut out = Vec::new();
    for (shard, dir) in gannet_tools::spool_inspect::shard_dirs(&data_dir.join("spool")).unwrap() {
        let recovered = gannet_tools::spool_inspect::recover_shard(shard, &dir).unwrap();
        for live in recovered.live {
            let m = live.message.get();
            let (sender, recipients, meta) = m.envelope();
            out.push(Spooled {
                id: gannet_spool::MessageId::from(&m.id).to_string(),
                sender,
                recipients,
                meta,
                queue: m.queue.to_string(),
                body: m.body.to_vec(),
                shard,
                attempts: live.state.attempts,
                due_ms: live.state.due_unix_ms,
                done: live.state.done.clone(),
            });
        }
    }
    out
}

/// A raw SMTP client: sends bytes, reads whole replies.
pub struct Client {
    pub stream: TcpStream,
    buf: Vec<u8>,
}

impl Client {
    pub fn connect(addr: SocketAddr) -> Client {
        Client::from_stream(TcpStream::connect(addr).unwrap())
    }

    pub fn from_stream(stream: TcpStream) -> Client {
        stream
            .set_read_timeout(Some(Duration::from_secs(20)))
            .unwrap();
        Client {
            stream,
            buf: Vec::new(),
        }
    }

    pub fn send(&mut self, bytes: &[u8]) {
        self.stream.write_all(bytes).unwrap();
    }

    /// Sends bytes, tolerating a connection the server already closed.
    pub fn send_lossy(&mut self, bytes: &[u8]) {
        let _ = self.stream.write_all(bytes);
    }

    /// The next complete reply (all its lines), or None at end of stream.
    pub fn reply(&mut self) -> Option<String> {
        let mut lines = String::new();
        loop {
            while let Some(lf) = self.buf.iter().position(|b| *b == b'\n') {
                let line: Vec<u8> = self.buf.drain(..=lf).collect();
                let line = String::from_utf8(line).unwrap();
                lines.push_str(&line);
                if line.len() < 4 || line.as_bytes()[3] == b' ' {
                    return Some(lines);
                }
            }
            let mut chunk = [0u8; 8192];
            match self.stream.read(&mut chunk) {
                Ok(0) => return if lines.is_empty() { None } else { Some(lines) },
                Ok(n) => self.buf.extend_from_slice(&chunk[..n]),
                Err(e) if e.kind() == std::io::ErrorKind::ConnectionReset => return None,
                Err(e) => panic!("reading a reply: {e} (so far {lines:?})"),
            }
        }
    }

    /// Expects a reply whose last line starts with `prefix`.
    pub fn expect(&mut self, prefix: &str) -> String {
        let reply = self
            .reply()
            .unwrap_or_else(|| panic!("connection closed, expected {prefix:?}"));
        let last = reply.trim_end().lines().last().unwrap_or("");
        assert!(
            last.starts_with(prefix),
            "expected {prefix:?}, got {reply:?}"
        );
        reply
    }

    /// Expects the server to close the connection (after any remaining replies).
    pub fn expect_closed(&mut self) {
        if let Some(reply) = self.reply() {
            panic!("expected the connection to close, got {reply:?}");
        }
    }
}

/// Starts gannetd on the test configuration with `files` (name, content) placed in
/// its data directory first, expects it to refuse to start, and returns what it
/// said on standard error.
pub fn start_refused_with(files: &[(&str, &str)]) -> String {
    let dir = tempfile::tempdir().unwrap();
    let data = dir.path().join("data");
    std::fs::create_dir_all(&data).unwrap();
    for (name, content) in files {
        std::fs::write(data.join(name), content).unwrap();
    }
    let path = dir.path().join("gannetd.toml");
    std::fs::write(&path, config_text(dir.path(), "", "")).unwrap();
    let out = Command::new(env!("CARGO_BIN_EXE_gannetd"))
        .args(["--config", path.to_str().unwrap()])
        .output()
        .unwrap();
    assert!(!out.status.success(), "gannetd started");
    String::from_utf8_lossy(&out.stderr).into_owned()
}

/// What `gannetd --check-config` says of the test configuration with `extra`
/// (whole sections), which it must refuse.
pub fn config_refused(extra: &str) -> String {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("gannetd.toml");
    std::fs::write(&path, config_text(dir.path(), "", extra)).unwrap();
    let out = Command::new(env!("CARGO_BIN_EXE_gannetd"))
        .arg("--check-config")
        .arg(&path)
        .output()
        .unwrap();
    assert!(!out.status.success(), "gannetd accepted {extra}");
    String::from_utf8_lossy(&out.stderr).into_owned()
}

/// curl against the daemon's HTTP listener with extra headers: (status, body).
pub fn curl(
    daemon: &Daemon,
    method: &str,
    path: &str,
    headers: &[&str],
    body: Option<(&str, &[u8])>,
) -> (u16, String) {
    let url = format!("http://{}{path}", daemon.http);
    let mut command = Command::new("curl");
    command.args(["-sS", "-X", method, "-w", "\n%{http_code}", &url]);
    for header in headers {
        command.args(["-H", header]);
    }
    let input = match body {
        Some((content_type, body)) => {
            command.args([
                "-H",
                &format!("content-type: {content_type}"),
                "--data-binary",
                "@-",
            ]);
            body
        }
        None => &[],
    };
    let out = run_with_input(&mut command, input);
    let text = String::from_utf8(out.stdout).unwrap();
    let (body, status) = text
        .rsplit_once('\n')
        .unwrap_or_else(|| panic!("curl: {}", String::from_utf8_lossy(&out.stderr)));
    (status.parse().unwrap(), body.to_string())
}

/// Runs a Python script that uses SparkPost's client library (as `sp`, with API key
/// `key`) against the daemon's HTTPS listener, trusting its generated certificate;
/// returns what the script printed, as JSON.
pub fn sparkpost_client(daemon: &Daemon, key: &str, script: &str) -> serde_json::Value {
    let https = daemon.https.expect("an https listener");
    let prelude = format!(
        "import json, sys\nfrom sparkpost import SparkPost\nsp = SparkPost(api_key={key:?}, base_uri='127.0.0.1:{}')\n",
        https.port()
    );
    let out = run_with_input(
        Command::new(peers::python())
            .arg("-c")
            .arg(format!("{prelude}{script}"))
            .env(
                "REQUESTS_CA_BUNDLE",
                daemon.data_dir().join("tls/self-signed.crt"),
            ),
        b"",
    );
    assert!(
        out.status.success(),
        "python: {}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    let text = String::from_utf8_lossy(&out.stdout);
    serde_json::from_str(text.trim()).unwrap_or_else(|e| panic!("{e}: {text}"))
}
