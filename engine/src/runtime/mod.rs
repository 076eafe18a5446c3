//! The runtime: one glommio executor per shard, pinned one per core. Each shard owns
//! its spool and event log and listens on every configured address (SO_REUSEPORT, so
//! the kernel spreads connections over the shards). This folder is the only place in
//! the engine that creates executors or binds listeners; [`io`] adapts glommio's
//! sockets for the protocol code.

mod adopt;

use gannet_core::clock::unix_ms;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::rc::Rc;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::time::{Duration, Instant};

use anyhow::{Context, Result, anyhow};
use gannet_spool::{FileStorage, Spool, SpoolConfig};
use glommio::{LocalExecutorPoolBuilder, PoolPlacement};
use signal_hook::consts::{SIGHUP, SIGINT, SIGTERM};
use signal_hook::iterator::Signals;

use crate::delivery::tls::ClientTls;
use crate::events::EventFiles;
use crate::io;
use crate::metrics::ShardMetrics;
use crate::policy::rules::RulesPolicy;
use crate::services::ShardServices;
use crate::shard::{SessionLimits, Shard, Shared};
use crate::storage::ShardStorage;
use gannet_core::auth::Credentials;
use gannet_core::config::Config;
use gannet_core::message::MetaHeaders;

/// Notes that may wait in one shard's inbox (handoffs and reports).
const MESH_INBOX_NOTES_MAX: usize = 16_384;
/// How often a shard's periodic round runs (it writes the buffered events out and
/// refreshes the spool's metrics) while the shard is busy …
const ROUND_MS: u64 = 100;
/// How long a stop waits for the hose's sinks to finish the batch in flight.
const HOSE_STOP_GRACE: Duration = Duration::from_secs(3);
/// … and once IDLE_ROUNDS rounds in a row found nothing to do: an idle shard wakes
/// twice a second, not thirty times (a shard waiting behind a provider's block stays
/// idle). A stop does not wait for the round: the stop bell wakes it.
const IDLE_ROUND_MS: u64 = 500;
const IDLE_ROUNDS: u32 = 10;
/// How long shutdown waits for sessions in the middle of a transaction.
const SHUTDOWN_GRACE: Duration = Duration::from_secs(10);
/// How long start-up waits for every shard to be listening.
const START_TIMEOUT: Duration = Duration::from_secs(60);

/// The addresses a shard binds, resolved (port 0 replaced by the port chosen).
#[derive(Debug, Clone, Default)]
struct Addresses {
    smtp: Vec<SocketAddr>,
    smtps: Vec<SocketAddr>,
    /// `http.listen` and `http.tls_listen`, serving `http.services`.
    http: Vec<SocketAddr>,
    https: Vec<SocketAddr>,
    /// `http.listeners`: address, TLS, services.
    http_more: Vec<(SocketAddr, bool, gannet_core::config::Services)>,
}

/// Reads the configuration again (for SIGHUP).
pub type Reload = Box<dyn Fn() -> std::result::Result<Config, String> + Send>;

/// Runs every shard until SIGTERM or SIGINT, then stops accepting, lets transactions
/// in progress finish, syncs each spool and returns. SIGHUP calls `reload` and applies
/// what can change while running (traffic shaping).
pub fn run(config: Config, reload: Reload) -> Result<()> {
    let shards = config.server.shards;
    if shards == 0 || shards > usize::from(u16::MAX) {
        return Err(anyhow!(
            "server.shards must be between 1 and {}, got {shards}",
            u16::MAX
        ));
    }
    abort_on_panic();
    raise_open_files_limit();
    let data_dir = config.server.data_dir.clone();
    std::fs::create_dir_all(&data_dir)
        .with_context(|| format!("creating data directory {}", data_dir.display()))?;
    remove_stale_listeners(&data_dir);
    adopt::remove_adopted_leftovers(&data_dir.join("spool"))?;
    let tls = crate::tls::server_config(
        &config.smtp.tls_cert,
        &config.smtp.tls_key,
        &data_dir,
        &config.server.hostname,
    )?;
    let (addresses, placeholders) = reserve(&config)?;
    let stop = Arc::new(io::StopBell::new(shards));
    // Signals are taken before the executors start, so a SIGTERM during start-up
    // stops them too.
    let signals = Signals::new([SIGTERM, SIGINT, SIGHUP]).context("installing signal handlers")?;
    let signals_handle = signals.handle();
    let suppressions =
        crate::suppression::Suppressions::open(&data_dir, config.suppression.entries_max.usize())
            .context("opening the suppression list")?;
    let transmissions =
        crate::registry::Transmissions::open(&data_dir).context("opening the transmissions log")?;
    // The policy script is loaded here once, to refuse a bad one before any shard
    // starts; each shard then compiles its own VM from the live settings' copy.
    let script = crate::policy::script::ScriptSource::from_config(&config.policy)
        .map_err(|e| anyhow!("{e}"))?
        .map(Arc::new);
    let live = Arc::new(
        crate::live::Live::new(
            gannet_core::shaping::ShapingTable::new(&config.delivery),
            crate::dkim::Signers::load(&config.dkim).map_err(|e| anyhow!("{e}"))?,
        )
        .with_script(script)
        .load_admin(crate::live::admin_file(&data_dir), unix_ms())
        .map_err(|e| anyhow!("{e}"))?,
    );
    let cluster = if config.cluster.redis_url.is_empty() {
        None
    } else {
        Some(Arc::new(
            crate::cluster::Link::start(
                &config.cluster,
                &format!("{}:{}", config.server.hostname, std::process::id()),
            )
            .map_err(|e| anyhow!("{e}"))?,
        ))
    };
    let logs = crate::hose::open_logs(&data_dir, shards, &config.events)?;
    let hose = Arc::new(crate::hose::Hose::new(
        &data_dir,
        logs,
        shards,
        crate::hose::HoseSettings::from_config(&config.events),
        live.clone(),
    )?);
    let shared = Arc::new(Shared {
        hose: hose.clone(),
        suppressions,
        transmissions,
        api_keys: gannet_core::auth::ApiKeys::new(&config.http.api_keys),
        tracking_key: crate::merge::tracking::TrackingKey::load_or_create(&data_dir)
            .with_context(|| format!("the tracking key in {}", data_dir.display()))?,
        tracking_base_url: if config.http.tracking_base_url.is_empty() {
            addresses
                .http
                .first()
                .map_or(String::new(), |a| format!("http://{a}"))
        } else {
            config.http.tracking_base_url.clone()
        },
        store: Arc::new(
            crate::merge::store::Store::open(&data_dir)
                .with_context(|| format!("opening stored templates in {}", data_dir.display()))?,
        ),
        credentials: Credentials::new(
            config
                .smtp
                .users
                .iter()
                .map(|u| (u.name.clone(), u.password_hash.clone())),
        ),
        tls: Some(tls),
        policy: Box::new(RulesPolicy::new(&config.policy)),
        meta_headers: MetaHeaders {
            tenant: config.policy.tenant_header.clone(),
            campaign: config.policy.campaign_header.clone(),
            pool: config.policy.pool_header.clone(),
            expires: config.policy.expires_header.clone(),
        },
        metrics: (0..shards)
            .map(|_| Arc::new(ShardMetrics::default()))
            .collect(),
        mesh: crate::mesh::Mesh::new(shards, MESH_INBOX_NOTES_MAX),
        stop: stop.clone(),
        live: live.clone(),
        cluster,
        limits: Default::default(),
        warmup: crate::warmup::Warmup::load(&config.delivery, &data_dir, unix_ms())
            .map_err(|e| anyhow!("{e}"))?,
        sessions: Arc::new(SessionLimits::new(
            config.smtp.sessions_max.usize(),
            u32::try_from(config.smtp.sessions_per_ip_max.get()).unwrap_or(u32::MAX),
        )),
        config,
    });
    let shared_for_reload = shared.clone();
    let shared_for_warmup = shared.clone();
    // Client TLS for delivery, built once; each shard's delivery clones the Arcs.
    let client_tls = ClientTls::with_ca_file(&shared.config.delivery.tls_ca_file)
        .map_err(|e| anyhow!("delivery.tls_ca_file: {e}"))?;
    tracing::info!(shards, data_dir = %data_dir.display(), "gannetd starting");
    let listening = Arc::new(AtomicUsize::new(0));
    let failed = Arc::new(AtomicBool::new(false));
    // Shards are numbered 0..n in start order (glommio's executor ids are process-wide
    // and need not start at 0); the number names the shard's directories.
    let next_shard = Arc::new(AtomicUsize::new(0));
    let spin = Duration::from_micros(shared.config.server.spin_before_park_us.get());
    let placement = if shared.config.server.pin_cores {
        PoolPlacement::MaxSpread(shards, None)
    } else {
        PoolPlacement::Unbound(shards)
    };
    let handles = LocalExecutorPoolBuilder::new(placement)
        .spin_before_park(spin)
        .on_all_shards({
            let (listening, failed) = (listening.clone(), failed.clone());
            let addresses = addresses.clone();
            move || {
                let id = next_shard.fetch_add(1, Ordering::Relaxed) as u16;
                let started = ShardStart {
                    id,
                    shared: shared.clone(),
                    client_tls: client_tls.clone(),
                    addresses: addresses.clone(),
                    listening: listening.clone(),
                };
                let failed = failed.clone();
                async move {
                    let result = shard_main(started).await;
                    if result.is_err() {
                        failed.store(true, Ordering::Release);
                    }
                    result
                }
            }
        })
        .map_err(|e| anyhow!("starting {shards} executors: {e}"))?;
    let deadline = Instant::now() + START_TIMEOUT;
    while listening.load(Ordering::Acquire) < shards
        && !failed.load(Ordering::Acquire)
        && Instant::now() < deadline
    {
        std::thread::sleep(Duration::from_millis(2));
    }
    drop(placeholders);
    let ready = listening.load(Ordering::Acquire) == shards;
    if ready {
        hose.start();
        write_listeners(&data_dir, &addresses)?;
        tracing::info!(smtp = ?addresses.smtp, smtps = ?addresses.smtps, http = ?addresses.http, https = ?addresses.https, "gannetd ready");
    } else {
        stop.ring();
    }
    let listener = spawn_signal_listener(signals, shared_for_reload, reload, stop.clone())?;
    let mut errors = Vec::new();
    let results = handles.join_all();
    // The shards have written their last events; the sinks stop after the batch in
    // flight (if it takes longer, it is sent again after the restart).
    hose.stop(HOSE_STOP_GRACE);
    signals_handle.close();
    let _ = listener.join();
    for result in results {
        match result {
            Ok(Ok(())) => {}
            Ok(Err(err)) => errors.push(format!("{err:#}")),
            Err(err) => errors.push(format!("executor died: {err:?}")),
        }
    }
    if ready {
        let _ = std::fs::remove_file(data_dir.join(LISTENERS_FILE));
    }
    if let Err(err) = shared_for_warmup.warmup.save(unix_ms()) {
        errors.push(format!("writing the warm-up counts: {err}"));
    }
    if !errors.is_empty() {
        return Err(anyhow!("{}", errors.join("; ")));
    }
    tracing::info!("gannetd stopped");
    Ok(())
}

/// Waits for signals until the main thread closes `signals`: SIGHUP reloads the
/// configuration, SIGTERM and SIGINT ring the stop bell. (A signal handler itself may
/// only set a flag; this thread is where the waking happens.)
fn spawn_signal_listener(
    mut signals: Signals,
    shared: Arc<Shared>,
    reload: Reload,
    stop: Arc<io::StopBell>,
) -> Result<std::thread::JoinHandle<()>> {
    std::thread::Builder::new()
        .name("gannet-signals".into())
        .spawn(move || {
            for signal in signals.forever() {
                if signal != SIGHUP {
                    tracing::info!(signal, "stopping");
                    stop.ring();
                    continue;
                }
                match reload() {
                    Ok(config) => apply_reload(&shared, &config),
                    Err(err) => tracing::error!(
                        "SIGHUP: the configuration was not reloaded (the running one stays): {err}"
                    ),
                }
            }
        })
        .context("starting the signal thread")
}

/// Applies a reloaded configuration's live parts (shaping and provider rules) and
/// names the sections whose changes wait for a restart.
fn apply_reload(shared: &Shared, config: &Config) {
    let running = &shared.config;
    let shaping = gannet_core::shaping::ShapingTable::new(&config.delivery);
    // Keys are read and parsed here, on the reload thread; shards pick the new set
    // up by generation with their next message. A key that cannot be loaded keeps
    // the running keys.
    let dkim = match crate::dkim::Signers::load(&config.dkim) {
        Ok(signers) => Some(Arc::new(signers)),
        Err(err) => {
            tracing::error!("SIGHUP: DKIM keys not reloaded (the running ones stay): {err}");
            None
        }
    };
    let dkim_applied = dkim.is_some();
    // The script is read and loaded once here; shards compile it when it changed.
    // One that does not load keeps the running one.
    let script = match crate::policy::script::ScriptSource::from_config(&config.policy) {
        Ok(script) => Some(script),
        Err(err) => {
            tracing::error!(
                "SIGHUP: the policy script was not reloaded (the running one stays): {err}"
            );
            None
        }
    };
    let script_applied = script.is_some();
    shared.live.update(|state| {
        state.shaping = Arc::new(shaping);
        if let Some(dkim) = dkim {
            state.dkim = dkim;
        }
        if let Some(script) = script
            && state.script.as_deref() != script.as_ref()
        {
            state.script = script.map(Arc::new);
        }
    });
    for shard in 0..shared.mesh.shards() {
        let _ = shared.mesh.send(shard as u16, crate::notes::Note::Wake);
    }
    let mut rest = config.clone();
    rest.delivery.shaping = running.delivery.shaping.clone();
    rest.delivery.providers = running.delivery.providers.clone();
    if dkim_applied {
        rest.dkim = running.dkim.clone();
    }
    if script_applied {
        rest.policy.script = running.policy.script.clone();
        rest.policy.script_instruction_budget = running.policy.script_instruction_budget;
    }
    let mut pending = Vec::new();
    macro_rules! compare {
        ($($section:ident),*) => {
            $(if rest.$section != running.$section {
                pending.push(stringify!($section));
            })*
        };
    }
    compare!(
        server, smtp, policy, http, spool, events, delivery, dkim, cluster
    );
    if pending.is_empty() {
        tracing::info!(
            "SIGHUP: configuration reloaded (delivery shaping, providers, DKIM keys and the policy script applied)"
        );
    } else {
        tracing::warn!(
            sections = pending.join(", "),
            "SIGHUP: delivery shaping and providers (and DKIM keys and the policy script, if they loaded) applied; changes to these sections need a restart"
        );
    }
}

const LISTENERS_FILE: &str = "listeners.json";

/// A daemon that was killed leaves its listeners file behind; it must not be read as
/// this one's. A file whose process still runs is left alone (that daemon holds the
/// spool, and this one will stop when it finds the spool locked).
fn remove_stale_listeners(data_dir: &Path) {
    let path = data_dir.join(LISTENERS_FILE);
    let Ok(text) = std::fs::read_to_string(&path) else {
        return;
    };
    let pid = serde_json::from_str::<serde_json::Value>(&text)
        .ok()
        .and_then(|v| v["pid"].as_u64());
    if let Some(pid) = pid
        && Path::new(&format!("/proc/{pid}")).exists()
    {
        return;
    }
    let _ = std::fs::remove_file(path);
}

/// Raises the soft limit on open files to the hard one, as MTAs do: every session,
/// delivery connection (idle ones included) and spool segment holds a descriptor.
fn raise_open_files_limit() {
    let mut limit = libc::rlimit {
        rlim_cur: 0,
        rlim_max: 0,
    };
    // SAFETY: getrlimit writes the one struct passed.
    if unsafe { libc::getrlimit(libc::RLIMIT_NOFILE, &raw mut limit) } != 0 {
        return;
    }
    if limit.rlim_cur < limit.rlim_max {
        let raised = libc::rlimit {
            rlim_cur: limit.rlim_max,
            ..limit
        };
        // SAFETY: setrlimit reads the one struct passed.
        if unsafe { libc::setrlimit(libc::RLIMIT_NOFILE, &raw const raised) } == 0 {
            limit = raised;
        }
    }
    tracing::info!(open_files = limit.rlim_cur, "open files limit");
}

/// The panic policy: a panic anywhere ends the whole process at once (SIGABRT), after
/// logging where it happened, and the supervisor starts it again (`Restart=` in
/// `tuning/gannetd.service`).
///
/// A shard that panicked cannot be trusted to go on, and must not stop alone either:
/// its `RefCell`s may be left borrowed and its queues half-changed, while its
/// listeners (SO_REUSEPORT) would keep taking a share of the connections that no task
/// serves and other shards' notes would pile up in its inbox. The spool makes the
/// restart safe — every acknowledged message is durable and recovered with its retry
/// state — and quick (see `PORT_RELEASE_WAIT`). Unwinding would only run destructors
/// of state that is about to be thrown away.
fn abort_on_panic() {
    std::panic::set_hook(Box::new(|info| {
        let thread = std::thread::current();
        let thread = thread.name().unwrap_or("unnamed");
        let location = info
            .location()
            .map_or_else(String::new, |l| format!(" at {}:{}", l.file(), l.line()));
        let message = info
            .payload()
            .downcast_ref::<&str>()
            .map(|s| (*s).to_string())
            .or_else(|| info.payload().downcast_ref::<String>().cloned())
            .unwrap_or_else(|| "(no message)".into());
        let backtrace = std::backtrace::Backtrace::force_capture();
        tracing::error!(
            "panic in thread {thread}{location}: {message}; aborting so that the supervisor restarts gannetd\n{backtrace}"
        );
        eprintln!("gannetd: panic in thread {thread}{location}: {message}; aborting");
        std::process::abort();
    }));
}

/// Tells operators and tests which ports were chosen (useful with port 0).
fn write_listeners(data_dir: &Path, addresses: &Addresses) -> Result<()> {
    let more: Vec<serde_json::Value> = addresses
        .http_more
        .iter()
        .map(|(addr, tls, s)| {
            let services: Vec<&str> = [
                ("inject", s.inject),
                ("tracking", s.tracking),
                ("admin", s.admin),
                ("metrics", s.metrics),
            ]
            .iter()
            .filter(|(_, on)| *on)
            .map(|(name, _)| *name)
            .collect();
            serde_json::json!({ "address": addr, "tls": tls, "services": services })
        })
        .collect();
    let text = serde_json::json!({
        "pid": std::process::id(),
        "smtp": addresses.smtp,
        "smtps": addresses.smtps,
        "http": addresses.http,
        "https": addresses.https,
        "http_listeners": more,
    })
    .to_string();
    gannet_spool::durable::write_file(&data_dir.join(LISTENERS_FILE), text.as_bytes(), 0o644)
        .context("writing listeners.json")
}

/// Resolves every listen address to a concrete port and holds it with a bound (not
/// listening) SO_REUSEPORT socket until the shards have bound theirs. A port already
/// in use by anyone is an error: the probe binds without SO_REUSEPORT first, so two
/// daemons never silently share a port.
fn reserve(config: &Config) -> Result<(Addresses, Vec<socket2::Socket>)> {
    let mut placeholders = Vec::new();
    let mut resolve =
        |key: &str, list: &[gannet_core::config::Listen]| -> Result<Vec<SocketAddr>> {
            let mut out = Vec::new();
            for listen in list {
                let probe = probe(listen.0).with_context(|| {
                    format!(
                        "{key}: cannot listen on {} (another process listens there)",
                        listen.0
                    )
                })?;
                let addr = probe.local_addr()?;
                drop(probe);
                let socket = io::reusable_socket(addr)?;
                socket
                    .bind(&addr.into())
                    .with_context(|| format!("{key}: cannot bind {addr}"))?;
                placeholders.push(socket);
                out.push(addr);
            }
            Ok(out)
        };
    let mut http_more = Vec::new();
    for (i, listener) in config.http.listeners.iter().enumerate() {
        let key = format!("http.listeners[{i}].address");
        let addr = resolve(&key, std::slice::from_ref(&listener.address))?[0];
        http_more.push((addr, listener.tls, listener.services));
    }
    let addresses = Addresses {
        smtp: resolve("smtp.listen", &config.smtp.listen)?,
        smtps: resolve("smtp.tls_listen", &config.smtp.tls_listen)?,
        http: resolve("http.listen", &config.http.listen)?,
        https: resolve("http.tls_listen", &config.http.tls_listen)?,
        http_more,
    };
    Ok((addresses, placeholders))
}

/// How long a start waits for a port held by listeners that are already closed.
const PORT_RELEASE_WAIT: Duration = Duration::from_secs(5);

/// Listens on `addr` without SO_REUSEPORT (with SO_REUSEADDR, as std sets it), which
/// fails while anyone else listens there.
///
/// A daemon that was just killed still listens for a few milliseconds after its
/// process is gone: its io_uring instance is torn down by a kernel worker, and the
/// accepts it had in flight hold the listening sockets until then. A supervisor that
/// restarts at once meets exactly that, so a busy port is tried again every 10 ms for
/// up to [`PORT_RELEASE_WAIT`]; a live listener keeps it busy and fails the start.
fn probe(addr: SocketAddr) -> std::io::Result<std::net::TcpListener> {
    let deadline = Instant::now() + PORT_RELEASE_WAIT;
    let mut logged = false;
    loop {
        match std::net::TcpListener::bind(addr) {
            Err(e) if e.kind() == std::io::ErrorKind::AddrInUse && Instant::now() < deadline => {
                if !logged {
                    tracing::info!(%addr, "the port is still in use; waiting up to {PORT_RELEASE_WAIT:?} for it to be released");
                    logged = true;
                }
                std::thread::sleep(Duration::from_millis(10));
            }
            result => return result,
        }
    }
}

/// What a shard's executor starts with.
struct ShardStart {
    id: u16,
    shared: Arc<Shared>,
    client_tls: ClientTls,
    addresses: Addresses,
    listening: Arc<AtomicUsize>,
}

async fn shard_main(start: ShardStart) -> Result<()> {
    let ShardStart {
        id,
        shared,
        client_tls,
        addresses,
        listening,
    } = start;
    let config = &shared.config;
    let data_dir = &config.server.data_dir;
    let events = shared
        .hose
        .log(usize::from(id))
        .cloned()
        .ok_or_else(|| anyhow!("shard {id}: no event log"))?;
    let (spool, mut recovered) = open_spool(id, &data_dir.join("spool"), config, &events)?;
    glommio::spawn_local(spool.clone().run_committer()).detach();
    glommio::spawn_local(spool.clone().run_maintenance()).detach();
    // The spools of shards beyond server.shards (the count was lowered) are adopted
    // before anything is queued, so their mail is queued with ours.
    let shards = shared.mesh.shards() as u16;
    for (j, dir) in adopt::orphans(&data_dir.join("spool"), shards, id)? {
        recovered
            .live
            .extend(adopt::adopt(&spool, id, j, &dir).await?);
    }
    let shard = Rc::new(Shard {
        id,
        metrics: shared.metrics[usize::from(id)].clone(),
        shared: shared.clone(),
        spool,
        events,
        shutdown: io::Shutdown::default(),
        sessions_active: std::cell::Cell::new(0),
        http_in_flight: std::cell::Cell::new(0),
        dkim: std::cell::RefCell::new((
            shared.live.generation(),
            shared.live.snapshot().dkim.clone(),
        )),
        auth_cache: Default::default(),
        read_buffers: Default::default(),
        script: Default::default(),
    });
    // The script's VM now, not on the first connection.
    shard.script();
    let services = ShardServices::new(shard.clone(), client_tls);
    // Every live message goes back to its queue with its exact retry state.
    let mut requeued = 0;
    let mut jobs = Vec::new();
    for live in recovered.live {
        let m = live.message.get();
        let is_job = m
            .meta
            .iter()
            .any(|kv| kv.0.as_str() == "kind" && kv.1.as_str() == crate::merge::JOB_KIND);
        if is_job {
            // A transmission not fully generated: resume after its last checkpoint.
            match crate::merge::recover(live.id, &m.body) {
                Ok(job) => {
                    let progress = crate::jobs::Progress {
                        prefix: live.state.attempts as usize,
                        done: live.state.done.clone(),
                    };
                    jobs.push((job, live.id, progress));
                }
                Err(err) => {
                    tracing::error!(shard = id, job = %live.id, "transmission cannot be resumed: {err}")
                }
            }
            continue;
        }
        requeued += 1;
        let (sender, recipients, meta) = m.envelope();
        let message = gannet_core::queue::Message {
            id: live.id,
            sender,
            recipients,
            meta: gannet_core::queue::delivery_meta(meta),
            queue: live.state.queue.clone(),
            received_ms: m.received_unix_ms.to_native(),
            size: m.body.len(),
            attempts: live.state.attempts,
            done: live.state.done.clone(),
            open_parts: 0,
            due_by_domain: Vec::new(),
        };
        services.delivery.enqueue(message, live.state.due_unix_ms);
    }
    if requeued > 0 {
        tracing::info!(
            shard = id,
            messages = requeued,
            "recovered messages queued for delivery"
        );
    }
    for (_, job_id, progress) in &jobs {
        tracing::info!(shard = id, transmission = %job_id, from = progress.prefix, "resuming transmission generation");
    }
    if !jobs.is_empty() {
        crate::jobs::start(&services.jobs, jobs);
    }
    services.start();
    let bind = |addr: &SocketAddr| {
        io::listen(*addr).map_err(|e| anyhow!("shard {id}: listening on {addr}: {e}"))
    };
    let mut tasks = Vec::new();
    // SMTP and HTTP listeners, each plain or with implicit TLS.
    for (addrs, tls) in [(&addresses.smtp, false), (&addresses.smtps, true)] {
        for addr in addrs {
            let listener = bind(addr)?;
            tasks.push(glommio::spawn_local(crate::ingress::smtp::serve(
                services.delivery.clone(),
                listener,
                tls,
            )));
        }
    }
    let endpoints = config.http.services;
    let http = (addresses.http.iter().map(|a| (*a, false, endpoints)))
        .chain(addresses.https.iter().map(|a| (*a, true, endpoints)))
        .chain(addresses.http_more.iter().copied());
    for (addr, tls, endpoints) in http {
        let listener = bind(&addr)?;
        tasks.push(glommio::spawn_local(crate::ingress::http::serve(
            services.clone(),
            listener,
            tls,
            endpoints,
        )));
    }
    listening.fetch_add(1, Ordering::AcqRel);
    tracing::info!(shard = id, "shard ready");
    let mut quiet_rounds = 0;
    let mut appends = shard.spool.stats().appends;
    let (stop, slot) = (&shard.shared.stop, usize::from(id));
    while !stop.is_rung() {
        let round_ms = if quiet_rounds >= IDLE_ROUNDS {
            IDLE_ROUND_MS
        } else {
            ROUND_MS
        };
        if stop.sleep(slot, Duration::from_millis(round_ms)).await {
            break;
        }
        let round = periodic_round(&shard).await;
        let busy = round.flushed || round.appends != appends;
        appends = round.appends;
        quiet_rounds = if busy {
            0
        } else {
            quiet_rounds.saturating_add(1)
        };
    }
    // Stop accepting; idle sessions are told 421 at once, sessions in a transaction
    // finish it (their message is spooled and acknowledged) before they see it.
    shard.shutdown.raise();
    for task in tasks {
        task.await;
    }
    let grace = Instant::now() + SHUTDOWN_GRACE;
    let busy = |shard: &Shard| {
        shard.sessions_active.get() > 0
            || services
                .delivery
                .queues
                .borrow()
                .ready
                .values()
                .any(|q| q.connections > 0)
    };
    while busy(&shard) && Instant::now() < grace {
        crate::timer::sleep(Duration::from_millis(10)).await;
    }
    if busy(&shard) {
        tracing::warn!(
            shard = id,
            sessions = shard.sessions_active.get(),
            "stopping with sessions or deliveries still open; unacknowledged messages are dropped, unfinished deliveries retried after restart"
        );
    }
    periodic_round(&shard).await;
    shard.spool.close().await;
    tracing::info!(shard = id, "shard stopped; spool synced");
    Ok(())
}

/// The shard's periodic round: writes the buffered events (on the blocking thread)
/// and copies the spool's counters and sync latencies into the metrics.
async fn periodic_round(shard: &Shard) -> Round {
    let flushed = crate::events::flush(&shard.events).await;
    let metrics = &shard.metrics;
    let set = |to: &std::sync::atomic::AtomicU64, value: u64| to.store(value, Ordering::Relaxed);
    set(&metrics.events_dropped_total, shard.events.dropped());
    let spool = shard.spool.stats();
    metrics.spool_sync.store(&spool.sync_latency);
    set(&metrics.spool_records_total, spool.appends);
    set(&metrics.spool_appended_bytes_total, spool.appended_bytes);
    set(&metrics.spool_syncs_total, spool.syncs);
    set(&metrics.spool_gathered_syncs_total, spool.gathered_syncs);
    set(
        &metrics.spool_segments_created_unprepared_total,
        spool.segments_created_unprepared,
    );
    set(&metrics.spool_committer_delay_us, spool.committer_delay_us);
    set(&metrics.spool_segments, spool.segments);
    set(
        &metrics.spool_disk_bytes,
        spool.segments * shard.config().spool.segment_bytes.get(),
    );
    set(&metrics.spool_live_messages, spool.live_messages);
    set(&metrics.spool_live_bytes, spool.live_bytes);
    // glommio hands over the time run since the last call (and resets it).
    let busy = glommio::executor().executor_stats().executor_runtime();
    ShardMetrics::add(&metrics.shard_busy_us_total, busy.as_micros() as u64);
    set(&metrics.spool_stage_writes_total, spool.stage_writes);
    // Shard 0 keeps the warm-up counts written (when they changed).
    if shard.id == 0 && !shard.shared.warmup.budgets.is_empty() {
        let shared = shard.shared.clone();
        let saved = glommio::executor()
            .spawn_blocking(move || shared.warmup.save(unix_ms()))
            .await;
        if let Err(err) = saved {
            tracing::warn!("writing the warm-up counts: {err}");
        }
    }
    set(
        &metrics.spool_stage_writes_inline_total,
        spool.stage_writes_inline,
    );
    Round {
        flushed,
        appends: spool.appends,
    }
}

/// What a periodic round found: whether there were events to write, and the spool's
/// appends so far.
struct Round {
    flushed: bool,
    appends: u64,
}

fn open_spool(
    id: u16,
    spool_dir: &Path,
    config: &Config,
    events: &Arc<EventFiles>,
) -> Result<(Spool<ShardStorage>, gannet_spool::Recovered)> {
    let dir: PathBuf = spool_dir.join(id.to_string());
    let storage = FileStorage::open_dir(&dir).with_context(|| format!("shard {id}"))?;
    let spool_config = SpoolConfig {
        segment_bytes: config.spool.segment_bytes.usize(),
        commit_window_us: config.spool.commit_window_us.get(),
        commit_gather_max_us: config.spool.commit_gather_max_us.get(),
        // A message plus its envelope must fit one record.
        record_bytes_max: config.smtp.message_bytes_max.usize() * 2 + (1 << 20),
        // The event log is written before every write of spool records.
        write_barrier: Some(gannet_spool::segment::WriteBarrier({
            let events = events.clone();
            Arc::new(move || events.write_pending())
        })),
        ..SpoolConfig::for_shard(id)
    };
    let (spool, recovered) = Spool::open(ShardStorage::File(storage), spool_config)
        .with_context(|| format!("recovering shard {id}"))?;
    let report = &recovered.report;
    tracing::info!(
        shard = id,
        live = recovered.live.len(),
        records = report.records,
        segments = report.segments.len(),
        torn_bytes = report.torn_bytes(),
        corrupt_regions = report.corrupt_regions(),
        unusable_segments = report.unusable_segments(),
        "spool recovered"
    );
    for segment in report.segments.iter().filter(|s| !s.is_clean()) {
        tracing::warn!(shard = id, seq = segment.seq, unusable = ?segment.unusable, torn_bytes = segment.torn_bytes,
            corrupt = segment.corrupt.len(), "damaged spool segment (see gannet-spool verify)");
    }
    Ok((spool, recovered))
}
