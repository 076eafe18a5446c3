//! `gannetctl`, the operator's command line over gannetd's admin API: every verb
//! (queues, summary, inspect, suspend, suspend-ready-q, bounce with a dry run,
//! rebind, retry, warmup, and their lists and cancels), human tables by default and the server's
//! JSON with `--json`, and `top` ([`top`]), a live terminal view.

pub mod table;
pub mod top;

use std::time::Duration;

use anyhow::{Context, Result, anyhow, bail};
use clap::{Args, Parser, Subcommand};
use serde_json::{Value, json};

use table::{Align, Table, ago_or_in, limit_pair, rate_text};

#[derive(Debug, Parser)]
#[command(
    name = "gannetctl",
    version,
    about = "Look at and steer a running gannetd through its admin API"
)]
pub struct Cli {
    /// gannetd's HTTP listener.
    #[arg(
        long,
        env = "GANNET_ENDPOINT",
        default_value = "http://127.0.0.1:8000",
        global = true
    )]
    pub endpoint: String,
    /// An API key with role = "admin" (http.api_keys).
    #[arg(long, env = "GANNET_ADMIN_KEY", global = true, hide_env_values = true)]
    pub key: Option<String>,
    /// Print the server's JSON instead of tables.
    #[arg(long, global = true)]
    pub json: bool,
    #[command(subcommand)]
    pub command: Command,
}

/// Which scheduled queues a verb applies to (KumoMTA's selectors).
#[derive(Debug, Args, Clone, Default)]
pub struct Selector {
    /// The recipient domain.
    #[arg(long)]
    pub domain: Option<String>,
    #[arg(long)]
    pub tenant: Option<String>,
    #[arg(long)]
    pub campaign: Option<String>,
    /// Exact scheduled queue names (`campaign:tenant@domain`); they alone decide.
    #[arg(long = "queue")]
    pub queues: Vec<String>,
}

impl Selector {
    fn is_empty(&self) -> bool {
        self.domain.is_none()
            && self.tenant.is_none()
            && self.campaign.is_none()
            && self.queues.is_empty()
    }

    fn into_json(self) -> serde_json::Map<String, Value> {
        let mut body = serde_json::Map::new();
        for (key, value) in [
            ("domain", self.domain),
            ("tenant", self.tenant),
            ("campaign", self.campaign),
        ] {
            if let Some(v) = value {
                body.insert(key.into(), v.into());
            }
        }
        if !self.queues.is_empty() {
            body.insert("queue_names".into(), self.queues.into());
        }
        body
    }
}

#[derive(Debug, Subcommand)]
pub enum Command {
    /// Every scheduled and ready queue, the largest first.
    Queues {
        /// Each scheduled queue's oldest message and next due time (a scan of the
        /// scheduled parts on the server).
        #[arg(long)]
        detail: bool,
        /// Only the N largest of each.
        #[arg(long)]
        limit: Option<usize>,
    },
    /// Totals over the shards, and per shard.
    Summary,
    /// IP warm-up: each warming source's day, budget and use per provider today.
    Warmup,
    /// The cluster this node is part of: the shared Redis and the live nodes
    /// (suspensions, bounces and response rules made on any node apply on all).
    Cluster,
    /// One message by id: envelope, metadata, headers, retry state, its parts.
    Inspect {
        id: String,
        /// The whole message too.
        #[arg(long)]
        body: bool,
    },
    /// One scheduled queue's messages (`campaign:tenant@domain`).
    InspectQueue {
        name: String,
        /// At most this many messages.
        #[arg(long, default_value_t = 5)]
        limit: usize,
        /// Their bodies too (with --json).
        #[arg(long)]
        body: bool,
    },
    /// Suspend scheduled queues: their mail waits until resumed or expired.
    Suspend {
        #[command(flatten)]
        selector: Selector,
        #[arg(long)]
        reason: String,
        /// "90s", "10m", "2h", "1d" (default: 5m).
        #[arg(long)]
        duration: Option<String>,
        /// Every scheduled queue (required when nothing is selected).
        #[arg(long)]
        everything: bool,
    },
    /// The scheduled-queue suspensions in force.
    SuspendList,
    /// Lift a scheduled-queue suspension.
    SuspendCancel {
        #[arg(long)]
        id: String,
    },
    /// Suspend a ready queue (`egress_source->site_name`): no connections.
    SuspendReadyQ {
        #[arg(long)]
        name: String,
        #[arg(long)]
        reason: String,
        #[arg(long)]
        duration: Option<String>,
    },
    /// The ready-queue suspensions in force.
    SuspendReadyQList,
    /// Lift a ready-queue suspension.
    SuspendReadyQCancel {
        #[arg(long)]
        id: String,
    },
    /// Bounce what waits in scheduled queues, and what arrives while in force.
    Bounce {
        #[command(flatten)]
        selector: Selector,
        #[arg(long)]
        reason: String,
        #[arg(long)]
        duration: Option<String>,
        /// No AdminBounce event per recipient.
        #[arg(long)]
        suppress_logging: bool,
        /// Count what it would take now, and change nothing.
        #[arg(long)]
        dry_run: bool,
        /// Every scheduled queue (required when nothing is selected).
        #[arg(long)]
        everything: bool,
    },
    /// The bounces in force, with what each has bounced.
    BounceList,
    /// Cancel a bounce (what it bounced stays bounced).
    BounceCancel {
        #[arg(long)]
        id: String,
    },
    /// Move the queued messages of scheduled queues to another egress pool.
    Rebind {
        #[command(flatten)]
        selector: Selector,
        #[arg(long)]
        reason: String,
        /// The pool to send them through from their next attempt.
        #[arg(long)]
        pool: String,
        /// Make every rebound message due now (else only those whose pool changed).
        #[arg(long)]
        always_flush: bool,
        /// No AdminRebind event per message.
        #[arg(long)]
        suppress_logging: bool,
        /// Every scheduled queue (required when nothing is selected).
        #[arg(long)]
        everything: bool,
    },
    /// Make the parts of scheduled queues due now (postqueue -f).
    Retry {
        #[command(flatten)]
        selector: Selector,
        #[arg(long)]
        reason: String,
    },
    /// A live view: rates, busiest sites and ready queues, suspensions, spool,
    /// per-core load. q or Esc quits.
    Top {
        /// Seconds between refreshes.
        #[arg(long, default_value_t = 1.0)]
        interval: f64,
    },
}

/// The admin API over HTTP.
#[derive(Debug)]
pub struct Client {
    endpoint: String,
    key: Option<String>,
    agent: ureq::Agent,
}

impl Client {
    pub fn new(endpoint: &str, key: Option<String>) -> Client {
        let agent = ureq::Agent::config_builder()
            .timeout_global(Some(Duration::from_secs(30)))
            .http_status_as_error(false)
            .build()
            .into();
        Client {
            endpoint: endpoint.trim_end_matches('/').to_string(),
            key,
            agent,
        }
    }

    /// Sends a request; the JSON of a 2xx answer, or the server's error.
    pub fn request(&self, method: &str, path: &str, body: Option<&Value>) -> Result<Value> {
        let text = self.text(method, path, body)?;
        serde_json::from_str(&text).with_context(|| format!("{path} answered: {text}"))
    }

    /// Like [`Client::request`], the body as text.
    pub fn text(&self, method: &str, path: &str, body: Option<&Value>) -> Result<String> {
        let url = format!("{}{path}", self.endpoint);
        let key = self.key.as_deref().unwrap_or("");
        let sent = match (method, body) {
            ("GET", _) => self.agent.get(&url).header("Authorization", key).call(),
            (_, body) => {
                let builder = match method {
                    "POST" => self.agent.post(&url),
                    "DELETE" => self.agent.delete(&url).force_send_body(),
                    other => bail!("method {other}"),
                };
                let body = body.cloned().unwrap_or_else(|| json!({}));
                builder
                    .header("Authorization", key)
                    .header("Content-Type", "application/json")
                    .send(body.to_string())
            }
        };
        let mut response = sent.map_err(|err| anyhow!("cannot reach gannetd at {url}: {err}"))?;
        let status = response.status().as_u16();
        let text = response
            .body_mut()
            .read_to_string()
            .with_context(|| format!("reading the answer of {url}"))?;
        if !(200..300).contains(&status) {
            bail!("{}", error_text(status, &text));
        }
        Ok(text)
    }
}

/// A failed answer as one line: the status and the server's message and
/// description.
pub fn error_text(status: u16, body: &str) -> String {
    let parsed: Option<Value> = serde_json::from_str(body).ok();
    let detail = parsed
        .as_ref()
        .and_then(|v| v["errors"].get(0))
        .map(|e| {
            let message = e["message"].as_str().unwrap_or("");
            match e["description"].as_str() {
                Some(d) if !d.is_empty() => format!("{message}: {d}"),
                _ => message.to_string(),
            }
        })
        .unwrap_or_else(|| body.trim().to_string());
    let hint = match status {
        401 | 403 => " (give an admin key with --key or GANNET_ADMIN_KEY)",
        _ => "",
    };
    format!("gannetd answered {status}: {detail}{hint}")
}

/// Runs a command; what it prints goes to `out`.
pub fn run(cli: Cli, out: &mut dyn std::io::Write) -> Result<()> {
    let client = Client::new(&cli.endpoint, cli.key.clone());
    let json_out = cli.json;
    let print = |out: &mut dyn std::io::Write, value: &Value, table: fn(&Value) -> String| {
        let text = if json_out {
            serde_json::to_string_pretty(value).unwrap_or_default()
        } else {
            table(value)
        };
        writeln!(out, "{}", text.trim_end())
    };
    let with_duration = |mut body: serde_json::Map<String, Value>, d: Option<String>| {
        if let Some(d) = d {
            body.insert("duration".into(), d.into());
        }
        body
    };
    match cli.command {
        Command::Queues { detail, limit } => {
            let mut path = format!("/api/admin/queues/v1?detail={detail}");
            if let Some(n) = limit {
                path.push_str(&format!("&limit={n}"));
            }
            let v = client.request("GET", &path, None)?;
            print(out, &v, queues_table)?;
        }
        Command::Summary => {
            let v = client.request("GET", "/api/admin/queue-summary/v1", None)?;
            print(out, &v, summary_table)?;
        }
        Command::Warmup => {
            let v = client.request("GET", "/api/admin/warmup/v1", None)?;
            print(out, &v, warmup_table)?;
        }
        Command::Cluster => {
            let v = client.request("GET", "/api/admin/cluster/v1", None)?;
            print(out, &v, cluster_table)?;
        }
        Command::Inspect { id, body } => {
            let path = format!("/api/admin/inspect-message/v1?id={id}&want_body={body}");
            let v = client.request("GET", &path, None)?;
            print(out, &v, message_text)?;
        }
        Command::InspectQueue { name, limit, body } => {
            let path = format!(
                "/api/admin/inspect-sched-q/v1?queue_name={}&limit={limit}&want_body={body}",
                percent_encode(&name)
            );
            let v = client.request("GET", &path, None)?;
            print(out, &v, sched_queue_table)?;
        }
        Command::Suspend {
            selector,
            reason,
            duration,
            everything,
        } => {
            require_selection(&selector, everything)?;
            let mut body = with_duration(selector.into_json(), duration);
            body.insert("reason".into(), reason.into());
            let v = client.request("POST", "/api/admin/suspend/v1", Some(&body.into()))?;
            print(out, &v, id_line)?;
        }
        Command::SuspendList => {
            let v = client.request("GET", "/api/admin/suspend/v1", None)?;
            print(out, &v, suspensions_table)?;
        }
        Command::SuspendCancel { id } => {
            client.request(
                "DELETE",
                "/api/admin/suspend/v1",
                Some(&json!({ "id": id })),
            )?;
            writeln!(out, "OK")?;
        }
        Command::SuspendReadyQ {
            name,
            reason,
            duration,
        } => {
            let mut body = with_duration(serde_json::Map::new(), duration);
            body.insert("name".into(), name.into());
            body.insert("reason".into(), reason.into());
            let v = client.request("POST", "/api/admin/suspend-ready-q/v1", Some(&body.into()))?;
            print(out, &v, id_line)?;
        }
        Command::SuspendReadyQList => {
            let v = client.request("GET", "/api/admin/suspend-ready-q/v1", None)?;
            print(out, &v, ready_suspensions_table)?;
        }
        Command::SuspendReadyQCancel { id } => {
            let body = json!({ "id": id });
            client.request("DELETE", "/api/admin/suspend-ready-q/v1", Some(&body))?;
            writeln!(out, "OK")?;
        }
        Command::Bounce {
            selector,
            reason,
            duration,
            suppress_logging,
            dry_run,
            everything,
        } => {
            require_selection(&selector, everything)?;
            let mut body = with_duration(selector.into_json(), duration);
            body.insert("reason".into(), reason.into());
            if suppress_logging {
                body.insert("suppress_logging".into(), true.into());
            }
            if dry_run {
                body.insert("dry_run".into(), true.into());
            }
            let v = client.request("POST", "/api/admin/bounce/v1", Some(&body.into()))?;
            if dry_run {
                print(out, &v, dry_run_table)?;
            } else {
                print(out, &v, id_line)?;
            }
        }
        Command::BounceList => {
            let v = client.request("GET", "/api/admin/bounce/v1", None)?;
            print(out, &v, bounces_table)?;
        }
        Command::BounceCancel { id } => {
            client.request("DELETE", "/api/admin/bounce/v1", Some(&json!({ "id": id })))?;
            writeln!(out, "OK")?;
        }
        Command::Rebind {
            selector,
            reason,
            pool,
            always_flush,
            suppress_logging,
            everything,
        } => {
            require_selection(&selector, everything)?;
            let mut body = selector.into_json();
            body.insert("reason".into(), reason.into());
            body.insert("data".into(), json!({ "pool": pool }));
            body.insert("always_flush".into(), always_flush.into());
            body.insert("suppress_logging".into(), suppress_logging.into());
            let v = client.request("POST", "/api/admin/rebind/v1", Some(&body.into()))?;
            print(out, &v, id_line)?;
        }
        Command::Retry { selector, reason } => {
            let mut body = selector.into_json();
            body.insert("reason".into(), reason.into());
            let v = client.request("POST", "/api/admin/retry/v1", Some(&body.into()))?;
            print(out, &v, id_line)?;
        }
        Command::Top { interval } => {
            if !(0.1..=3600.0).contains(&interval) {
                bail!("--interval must be between 0.1 and 3600 seconds");
            }
            top::run(&client, Duration::from_secs_f64(interval))?;
        }
    }
    Ok(())
}

/// KumoMTA's kcli refuses to act on every queue by accident; so does gannetctl.
fn require_selection(selector: &Selector, everything: bool) -> Result<()> {
    match (selector.is_empty(), everything) {
        (true, false) => bail!(
            "no --domain, --tenant, --campaign or --queue given; use --everything to mean every queue"
        ),
        (false, true) => bail!("--everything cannot be combined with a selector"),
        _ => Ok(()),
    }
}

fn now_ms() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_millis() as u64)
}

/// A query parameter's value with everything but unreserved characters
/// percent-encoded.
fn percent_encode(text: &str) -> String {
    let mut out = String::new();
    for b in text.bytes() {
        if b.is_ascii_alphanumeric() || b"-._~".contains(&b) {
            out.push(b as char);
        } else {
            out.push_str(&format!("%{b:02X}"));
        }
    }
    out
}

fn sched_queue_table(v: &Value) -> String {
    let rows = list_table(
        &v["messages"],
        &[
            ("MESSAGE", Align::Left, |m| str_of(&m["id"])),
            ("SENDER", Align::Left, |m| str_of(&m["message"]["sender"])),
            ("RECIPIENTS", Align::Left, |m| {
                (m["message"]["recipient"].as_array().into_iter().flatten())
                    .map(str_of)
                    .collect::<Vec<_>>()
                    .join(",")
            }),
            ("ATTEMPTS", Align::Right, |m| {
                str_of(&m["message"]["num_attempts"])
            }),
            ("DUE", Align::Left, |m| str_of(&m["message"]["due"])),
            ("SHARD", Align::Right, |m| str_of(&m["shard"])),
        ],
    );
    format!(
        "{}: {} parts scheduled ({} held)\n{rows}",
        str_of(&v["queue_name"]),
        str_of(&v["num_scheduled"]),
        str_of(&v["delayed_metric"])
    )
}

fn id_line(v: &Value) -> String {
    match &v["id"] {
        Value::String(s) => s.clone(),
        other => other.to_string(),
    }
}

fn str_of(v: &Value) -> String {
    match v {
        Value::String(s) => s.clone(),
        Value::Null => String::new(),
        other => other.to_string(),
    }
}

/// The criteria of a suspension or bounce, as kcli shows them.
fn criteria(v: &Value) -> String {
    let mut out: Vec<String> = ["campaign", "tenant", "domain"]
        .iter()
        .filter_map(|k| v[*k].as_str().map(|s| format!("{k}={s}")))
        .collect();
    for q in v["queue_names"].as_array().into_iter().flatten() {
        out.push(format!("queue={}", str_of(q)));
    }
    if out.is_empty() {
        out.push("everything".into());
    }
    out.join(", ")
}

pub fn queues_table(v: &Value) -> String {
    let now = now_ms();
    let mut t = Table::new(&[
        ("SCHEDULED QUEUE", Align::Left),
        ("WAITING", Align::Right),
        ("HELD", Align::Right),
        ("OLDEST", Align::Right),
        ("NEXT DUE", Align::Right),
    ]);
    for q in v["scheduled"].as_array().into_iter().flatten() {
        t.row(vec![
            str_of(&q["name"]),
            str_of(&q["waiting"]),
            str_of(&q["held"]),
            q["oldest_ms"]
                .as_u64()
                .map_or(String::new(), |ms| ago_or_in(ms, now)),
            q["next_due_ms"]
                .as_u64()
                .map_or(String::new(), |ms| ago_or_in(ms, now)),
        ]);
    }
    let mut r = Table::new(&[
        ("READY QUEUE", Align::Left),
        ("SHARD", Align::Right),
        ("PARTS", Align::Right),
        ("CONN", Align::Right),
        ("LIMIT", Align::Right),
        ("RATE", Align::Right),
        ("STATE", Align::Left),
    ]);
    for q in v["ready"].as_array().into_iter().flatten() {
        r.row(ready_row(q, now));
    }
    let mut holds = String::new();
    for h in v["holds"].as_array().into_iter().flatten() {
        holds.push_str(&format!("held by response rule: {}\n", hold_text(h, now)));
    }
    format!(
        "{}\n{}\ndue (looking up sites): {}   handed to other shards: {}\n{holds}",
        t.render(),
        r.render(),
        str_of(&v["due"]),
        str_of(&v["handed"])
    )
}

/// A response rule's hold on a tenant's or campaign's mail, in words.
pub fn hold_text(h: &Value, now: u64) -> String {
    let who = h["whose"]
        .as_object()
        .and_then(|o| o.iter().next())
        .map_or(String::new(), |(k, v)| format!("{k} {}", str_of(v)));
    let sites = h["sites"].as_object().and_then(|o| o.iter().next()).map_or(
        String::new(),
        |(k, v)| match v {
            Value::Array(a) => {
                format!("{k} {}", a.iter().map(str_of).collect::<Vec<_>>().join(","))
            }
            other => format!("{k} {}", str_of(other)),
        },
    );
    format!(
        "{who} to {sites} by {} until {}",
        str_of(&h["rule"]),
        h["until_ms"]
            .as_u64()
            .map_or(String::new(), |ms| ago_or_in(ms, now))
    )
}

/// A ready queue's row: name, shard, parts (local + handed over), connections,
/// effective/configured limit and rate, and why it waits.
pub fn ready_row(q: &Value, now: u64) -> Vec<String> {
    let parts = q["parts"].as_u64().unwrap_or(0) + q["remote"].as_u64().unwrap_or(0);
    vec![
        str_of(&q["name"]),
        str_of(&q["shard"]),
        parts.to_string(),
        str_of(&q["connections"]),
        limit_pair(
            &q["effective"]["connection_limit"],
            &q["configured"]["connection_limit"],
        ),
        rate_text(
            &q["effective"]["max_message_rate"],
            &q["configured"]["max_message_rate"],
        ),
        ready_state(q, now),
    ]
}

fn ready_state(q: &Value, now: u64) -> String {
    if let (Some(by), Some(until)) = (q["suspended_by"].as_str(), q["suspended_until_ms"].as_u64())
    {
        return format!("suspended ({by}) until {}", ago_or_in(until, now));
    }
    let mut words = Vec::new();
    for r in q["rules_in_force"].as_array().into_iter().flatten() {
        words.push(format!("rule {}", str_of(&r["rule"])));
    }
    if let Some(limit) = q["backoff_limit"].as_u64() {
        words.push(format!("backoff to {limit}"));
    }
    if let Some(at) = q["connect_retry_at_ms"].as_u64() {
        words.push(format!(
            "{} failed connections, next {}",
            str_of(&q["connect_failures"]),
            ago_or_in(at, now)
        ));
    }
    words.join(", ")
}

pub fn summary_table(v: &Value) -> String {
    let columns = [
        ("scheduled_queues", "SCHED Q"),
        ("waiting", "WAITING"),
        ("held", "HELD"),
        ("ready_queues", "READY Q"),
        ("ready", "READY"),
        ("remote", "REMOTE"),
        ("due", "DUE"),
        ("handed", "HANDED"),
        ("connections", "CONN"),
        ("suspended_ready_queues", "SUSP"),
        ("queues_with_rules", "RULES"),
        ("queues_backed_off", "BACKOFF"),
    ];
    let mut head = vec![("SHARD", Align::Left)];
    head.extend(columns.iter().map(|(_, h)| (*h, Align::Right)));
    let mut t = Table::new(&head);
    let row = |label: String, o: &Value| {
        let mut r = vec![label];
        r.extend(columns.iter().map(|(k, _)| str_of(&o[*k])));
        r
    };
    for s in v["shards"].as_array().into_iter().flatten() {
        t.row(row(str_of(&s["shard"]), s));
    }
    t.row(row("total".into(), &v["total"]));
    format!(
        "{}\nin force: {} suspensions, {} ready-queue suspensions, {} bounces\n",
        t.render(),
        str_of(&v["suspensions"]),
        str_of(&v["ready_suspensions"]),
        str_of(&v["bounces"])
    )
}

pub fn message_text(v: &Value) -> String {
    let m = &v["message"];
    let mut out = String::new();
    let line = |out: &mut String, k: &str, val: String| out.push_str(&format!("{k:<12} {val}\n"));
    line(&mut out, "id", str_of(&v["id"]));
    line(&mut out, "shard", str_of(&v["shard"]));
    line(&mut out, "received", str_of(&v["received"]));
    line(&mut out, "sender", str_of(&m["sender"]));
    let rcpts: Vec<String> = m["recipient"]
        .as_array()
        .into_iter()
        .flatten()
        .map(str_of)
        .collect();
    line(&mut out, "recipients", rcpts.join(", "));
    line(&mut out, "size", str_of(&v["size"]));
    line(&mut out, "attempts", str_of(&m["num_attempts"]));
    line(&mut out, "next due", str_of(&m["due"]));
    if let Some(meta) = m["meta"].as_object() {
        for (k, val) in meta {
            line(&mut out, &format!("meta.{k}"), str_of(val));
        }
    }
    let mut t = Table::new(&[
        ("PART", Align::Left),
        ("QUEUE", Align::Left),
        ("STATE", Align::Left),
        ("ATTEMPTS", Align::Right),
        ("DUE", Align::Left),
        ("SITE", Align::Left),
    ]);
    for p in v["parts"].as_array().into_iter().flatten() {
        let rcpts: Vec<String> = p["recipients"]
            .as_array()
            .into_iter()
            .flatten()
            .map(str_of)
            .collect();
        t.row(vec![
            rcpts.join(","),
            str_of(&p["queue"]),
            str_of(&p["state"]),
            str_of(&p["attempts"]),
            str_of(&p["due"]),
            str_of(&p["site"]),
        ]);
    }
    out.push('\n');
    out.push_str(&t.render());
    out.push('\n');
    out.push_str(&str_of(&v["headers"]).replace("\r\n", "\n"));
    if let Some(data) = m["data"].as_str() {
        out.push_str("\n--- message ---\n");
        out.push_str(&data.replace("\r\n", "\n"));
    }
    out
}

/// A column of a list: its head, alignment and how a row's cell is written.
type Column = (&'static str, Align, fn(&Value) -> String);

/// A table with a row per element of the array `v`.
fn list_table(v: &Value, columns: &[Column]) -> String {
    let head: Vec<(&str, Align)> = columns.iter().map(|(h, a, _)| (*h, *a)).collect();
    let mut t = Table::new(&head);
    for item in v.as_array().into_iter().flatten() {
        t.row(columns.iter().map(|(_, _, cell)| cell(item)).collect());
    }
    t.render()
}

fn cluster_table(v: &Value) -> String {
    if v["configured"] != Value::Bool(true) {
        return "not part of a cluster ([cluster] redis_url is not set)".into();
    }
    let redis = if v["redis_up"] == Value::Bool(true) {
        "reachable".to_string()
    } else {
        format!("unreachable (falling back {})", str_of(&v["fallback"]))
    };
    let this = str_of(&v["node"]);
    let nodes = Value::Array(
        (v["nodes"].as_array().into_iter().flatten())
            .map(|n| serde_json::json!({ "node": n, "this": str_of(n) == this }))
            .collect(),
    );
    let table = list_table(
        &nodes,
        &[
            ("NODE", Align::Left, |n| str_of(&n["node"])),
            ("", Align::Left, |n| {
                if n["this"] == Value::Bool(true) {
                    "(this one)".into()
                } else {
                    String::new()
                }
            }),
        ],
    );
    format!("shared Redis: {redis}\n{table}")
}

fn warmup_table(v: &Value) -> String {
    list_table(
        v,
        &[
            ("SOURCE", Align::Left, |s| str_of(&s["source"])),
            ("PROVIDER", Align::Left, |s| str_of(&s["provider"])),
            ("DAY", Align::Right, |s| str_of(&s["day"])),
            ("SENT", Align::Right, |s| str_of(&s["used"])),
            ("BUDGET", Align::Right, |s| {
                s["budget"]
                    .as_u64()
                    .map_or("warm".into(), |b| b.to_string())
            }),
        ],
    )
}

const ID: Column = ("ID", Align::Left, |s| str_of(&s["id"]));
const REASON: Column = ("REASON", Align::Left, |s| str_of(&s["reason"]));
const REMAIN: Column = ("REMAIN", Align::Left, |s| str_of(&s["duration"]));
const CRITERIA: Column = ("CRITERIA", Align::Left, criteria);

fn suspensions_table(v: &Value) -> String {
    list_table(v, &[ID, REASON, REMAIN, CRITERIA])
}

fn ready_suspensions_table(v: &Value) -> String {
    list_table(
        v,
        &[
            ID,
            ("READY QUEUE", Align::Left, |s| str_of(&s["name"])),
            REASON,
            REMAIN,
            ("EXPIRES", Align::Left, |s| str_of(&s["expires"])),
        ],
    )
}

fn bounces_table(v: &Value) -> String {
    list_table(
        v,
        &[
            ID,
            REASON,
            REMAIN,
            ("BOUNCED", Align::Right, |b| str_of(&b["total_bounced"])),
            CRITERIA,
        ],
    )
}

fn dry_run_table(v: &Value) -> String {
    let mut t = Table::new(&[
        ("SCHEDULED QUEUE", Align::Left),
        ("WOULD BOUNCE", Align::Right),
    ]);
    if let Some(by_queue) = v["bounced"].as_object() {
        for (queue, n) in by_queue {
            t.row(vec![queue.clone(), str_of(n)]);
        }
    }
    format!(
        "{}\ndry run: {} parts ({} recipients) would be bounced; nothing was changed\n",
        t.render(),
        str_of(&v["total_bounced"]),
        str_of(&v["recipients"])
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn failed_answers_say_what_the_server_said() {
        let body = r#"{"errors":[{"message":"invalid request body","description":"reason: must not be empty"}]}"#;
        assert_eq!(
            error_text(400, body),
            "gannetd answered 400: invalid request body: reason: must not be empty"
        );
        assert!(error_text(401, "{}").contains("--key"));
        assert_eq!(
            error_text(502, "bad gateway\n"),
            "gannetd answered 502: bad gateway"
        );
    }

    #[test]
    fn a_selection_is_required_unless_everything() {
        let none = Selector::default();
        assert!(require_selection(&none, false).is_err());
        assert!(require_selection(&none, true).is_ok());
        let some = Selector {
            tenant: Some("acme".into()),
            ..Selector::default()
        };
        assert!(require_selection(&some, true).is_err());
        assert_eq!(Value::from(some.into_json()), json!({ "tenant": "acme" }));
    }

    #[test]
    fn tables_show_what_the_api_answers() {
        let now = now_ms();
        let listing = json!({
            "scheduled": [{ "name": "acme@b.test", "waiting": 2, "held": 0,
                            "oldest_ms": now - 300_000, "next_due_ms": now + 3_600_000 }],
            "ready": [{ "name": "default->mx.b.test", "shard": 1, "parts": 3, "remote": 1,
                        "connections": 2,
                        "effective": { "connection_limit": 4, "max_message_rate": "10/s" },
                        "configured": { "connection_limit": 32, "max_message_rate": "unlimited" },
                        "suspended_by": "response rule yahoo#1", "suspended_until_ms": now + 600_000 }],
            "due": 0, "handed": 1
        });
        let text = queues_table(&listing);
        assert!(text.contains("acme@b.test"), "{text}");
        assert!(text.contains("5m ago"), "{text}");
        assert!(text.contains("in 1h"), "{text}");
        assert!(text.contains("4/32"), "{text}");
        assert!(text.contains("10/s (unlimited)"), "{text}");
        assert!(
            text.contains("suspended (response rule yahoo#1) until in 10m"),
            "{text}"
        );
        let row = ready_row(&listing["ready"][0], now);
        assert_eq!(row[2], "4", "parts here and handed over");

        let bounces = json!([{ "id": "b1", "reason": "bad list", "duration": "9m 59s",
                               "total_bounced": 3, "tenant": "acme" }]);
        let text = bounces_table(&bounces);
        assert!(
            text.contains("tenant=acme") && text.contains("9m 59s"),
            "{text}"
        );
        let text = suspensions_table(&json!([{ "id": "s", "reason": "r", "duration": "1m" }]));
        assert!(text.contains("everything"), "{text}");
        let dry = json!({ "dry_run": true, "bounced": { "acme@b.test": 2 }, "total_bounced": 2, "recipients": 5 });
        assert!(dry_run_table(&dry).contains("2 parts (5 recipients)"));
    }
}
