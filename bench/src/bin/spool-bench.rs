//! spool-bench: group commit against the naive and raw baselines, side by side.
//!
//! For 1, 16, 64 and 256 concurrent appenders, on one shard and on every shard, it
//! appends 10 KiB messages for a fixed time with:
//! - `gannet`: the spool (a pwrite per record, one fdatasync per batch);
//! - `naive`: the same bytes, but every appender fdatasyncs its own message (what an
//!   MTA that syncs each queue file pays, e.g. Postfix).
//!
//! It also measures `raw`, the same volume written sequentially with one fdatasync at
//! the end (the disk's limit), and times recovery of 1 million small records.
//!
//! Prints one JSON line per case and appends a markdown report to bench/RESULTS.md.

use std::cell::{Cell, RefCell};
use std::fs::OpenOptions;
use std::io::Write as _;
use std::os::fd::AsRawFd;
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};
use std::rc::Rc;
use std::time::{Duration, Instant};

use anyhow::{Context, Result};
use clap::Parser;
use gannet_bench::{command_line, command_output, cpu_seconds, device_flushes, machine};
use gannet_spool::{FileStorage, MessageRecord, Record, Spool, SpoolConfig};
use glommio::{LocalExecutorPoolBuilder, PoolPlacement};
use hdrhistogram::Histogram;

#[derive(Debug, Parser)]
#[command(
    about = "gannet spool benchmark: group commit vs naive per-message fdatasync vs raw disk"
)]
struct Args {
    /// Directory for the spool files (on the disk you want to measure).
    #[arg(long, default_value = "bench/out/spool")]
    dir: PathBuf,
    /// Seconds per case.
    #[arg(long, default_value_t = 3.0)]
    seconds: f64,
    /// Message body size in bytes.
    #[arg(long, default_value_t = 10 * 1024)]
    body_bytes: usize,
    /// Appender counts to run.
    #[arg(long, value_delimiter = ',', default_value = "1,16,64,256")]
    appenders: Vec<usize>,
    /// Shards for the "all shards" cases (default: every core).
    #[arg(long)]
    shards: Option<usize>,
    /// Records for the recovery measurement (0 to skip).
    #[arg(long, default_value_t = 1_000_000)]
    recovery_records: usize,
    /// Markdown report to append to ("" for none).
    #[arg(long, default_value = "bench/RESULTS.md")]
    results: String,
    /// Bytes written for the raw-disk limit (default: as many as the busiest gannet
    /// case wrote, between 256 MiB and 2 GiB).
    #[arg(long)]
    raw_bytes: Option<u64>,
}

/// One measured case.
#[derive(Debug, Clone)]
struct CaseResult {
    system: &'static str,
    shards: usize,
    appenders: usize,
    msgs: u64,
    seconds: f64,
    bytes: u64,
    hist: Histogram<u64>,
    flushes: u64,
    cpu_seconds: f64,
}

impl CaseResult {
    fn msgs_per_s(&self) -> f64 {
        self.msgs as f64 / self.seconds
    }

    fn json(&self) -> serde_json::Value {
        let q = |p: f64| {
            if self.hist.is_empty() {
                0
            } else {
                self.hist.value_at_quantile(p)
            }
        };
        serde_json::json!({
            "system": self.system,
            "shards": self.shards,
            "appenders_per_shard": self.appenders,
            "msgs": self.msgs,
            "msgs_per_s": self.msgs_per_s().round(),
            "mb_per_s": (self.bytes as f64 / self.seconds / 1e6 * 10.0).round() / 10.0,
            "ack_latency_us_p50": q(0.5),
            "ack_latency_us_p99": q(0.99),
            "ack_latency_us_p999": q(0.999),
            "flushes_per_msg": (self.flushes as f64 / self.msgs.max(1) as f64 * 1000.0).round() / 1000.0,
            "cpu_s_per_1000_msgs": (self.cpu_seconds / self.msgs.max(1) as f64 * 1000.0 * 1e4).round() / 1e4,
        })
    }
}

fn message(spool: &Spool<FileStorage>, body: &[u8]) -> MessageRecord {
    record(spool.next_id(), body)
}

/// The benchmark's message `id` with `body`.
fn record(id: gannet_spool::MessageId, body: &[u8]) -> MessageRecord {
    MessageRecord {
        id,
        sender: "bench@example.test".into(),
        recipients: vec!["rcpt@example.net".into()],
        meta: vec![],
        queue: "example.net".into(),
        attempts: 0,
        due_unix_ms: 0,
        received_unix_ms: 0,
        done: vec![],
        body: body.to_vec(),
    }
}

/// Reads per timed round of [`read_cost`], and rounds.
const READS: usize = 100_000;
const READ_ROUNDS: usize = 5;

/// What reading one spooled message costs.
struct ReadCost {
    /// Header, payload CRC32C and rkyv validation (`read_record`: recovery, and every
    /// `MessageRef::get` before the CRC was verified once).
    full_ns: f64,
    /// Header and rkyv validation (`read_verified_record`: `MessageRef::get`).
    verified_ns: f64,
}

/// Times both ways of reading one message record of `body_bytes`, side by side: the
/// median of READ_ROUNDS rounds each, the two alternating.
fn read_cost(body_bytes: usize) -> ReadCost {
    use gannet_spool::record::{Payload, read_record, read_verified_record};
    let record = record(
        gannet_spool::MessageId { hi: 1, lo: 2 },
        &vec![b'x'; body_bytes],
    );
    let r = Record::Message(&record);
    let mut buf = rkyv::util::AlignedVec::<16>::with_capacity(r.len_bound());
    buf.resize(r.len_bound(), 0);
    let len = r
        .write_into(&mut buf, 7, 4096)
        .expect("the buffer fits the bound");
    let bytes = &buf[..len];
    let body_len = |p: Payload<'_>| match p {
        Payload::Message(m) => m.body.len(),
        _ => 0,
    };
    let time = |read: &dyn Fn() -> usize| {
        let start = Instant::now();
        let mut sum = 0;
        for _ in 0..READS {
            sum += read();
        }
        std::hint::black_box(sum);
        start.elapsed().as_nanos() as f64 / READS as f64
    };
    let full = || {
        body_len(
            read_record(std::hint::black_box(bytes), 7, 4096)
                .expect("valid")
                .0,
        )
    };
    let verified =
        || body_len(read_verified_record(std::hint::black_box(bytes), 7, 4096).expect("valid"));
    let (mut fulls, mut verifieds) = (Vec::new(), Vec::new());
    for _ in 0..READ_ROUNDS {
        fulls.push(time(&full));
        verifieds.push(time(&verified));
    }
    let median = |mut v: Vec<f64>| {
        v.sort_by(f64::total_cmp);
        v[v.len() / 2]
    };
    ReadCost {
        full_ns: median(fulls),
        verified_ns: median(verifieds),
    }
}

/// Per-shard outcome of one case.
struct ShardOutcome {
    msgs: u64,
    bytes: u64,
    hist: Histogram<u64>,
}

fn run_case(
    args: &Args,
    system: &'static str,
    shards: usize,
    appenders: usize,
) -> Result<CaseResult> {
    let case_dir = args.dir.join(format!("{system}-{shards}x{appenders}"));
    let _ = std::fs::remove_dir_all(&case_dir);
    std::fs::create_dir_all(&case_dir)?;
    let duration = Duration::from_secs_f64(args.seconds);
    let body_bytes = args.body_bytes;
    let flushes0 = device_flushes(&case_dir);
    let cpu0 = cpu_seconds();
    let started = Instant::now();
    let dir = case_dir.clone();
    let outcomes: Vec<ShardOutcome> =
        LocalExecutorPoolBuilder::new(PoolPlacement::MaxSpread(shards, None))
            .on_all_shards(move || {
                let dir = dir.clone();
                async move {
                    let shard = glommio::executor().id() as u16;
                    let shard_dir = dir.join(shard.to_string());
                    match system {
                        "gannet" => {
                            gannet_shard(shard, &shard_dir, appenders, body_bytes, duration).await
                        }
                        _ => naive_shard(&shard_dir, appenders, body_bytes, duration).await,
                    }
                }
            })
            .map_err(|e| anyhow::anyhow!("starting executors: {e}"))?
            .join_all()
            .into_iter()
            .map(|r| r.map_err(|e| anyhow::anyhow!("shard failed: {e:?}")))
            .collect::<Result<_>>()?;
    let seconds = started
        .elapsed()
        .as_secs_f64()
        .min(args.seconds.max(0.001) + 1.0);
    let mut hist = Histogram::<u64>::new(3)?;
    let (mut msgs, mut bytes) = (0, 0);
    for outcome in &outcomes {
        hist.add(&outcome.hist)?;
        msgs += outcome.msgs;
        bytes += outcome.bytes;
    }
    let result = CaseResult {
        system,
        shards,
        appenders,
        msgs,
        seconds: seconds.min(args.seconds).max(args.seconds * 0.5),
        bytes,
        hist,
        flushes: device_flushes(&case_dir).saturating_sub(flushes0),
        cpu_seconds: cpu_seconds() - cpu0,
    };
    let _ = std::fs::remove_dir_all(&case_dir);
    Ok(result)
}

async fn gannet_shard(
    shard: u16,
    dir: &Path,
    appenders: usize,
    body_bytes: usize,
    duration: Duration,
) -> ShardOutcome {
    let config = SpoolConfig {
        segment_bytes: 256 << 20,
        ..SpoolConfig::for_shard(shard)
    };
    let (spool, _) =
        Spool::open(FileStorage::open_dir(dir).expect("spool dir"), config).expect("open");
    glommio::spawn_local(spool.clone().run_committer()).detach();
    let body = Rc::new(vec![b'x'; body_bytes]);
    let outcome = drive(appenders, duration, {
        let spool = spool.clone();
        move || {
            let (spool, body) = (spool.clone(), body.clone());
            async move {
                let msg = message(&spool, &body);
                spool.write(Record::Message(&msg)).await.expect("append");
                body.len() as u64
            }
        }
    })
    .await;
    spool.close().await;
    outcome
}

/// The same bytes, one fdatasync (through io_uring) per message.
async fn naive_shard(
    dir: &Path,
    appenders: usize,
    body_bytes: usize,
    duration: Duration,
) -> ShardOutcome {
    std::fs::create_dir_all(dir).expect("dir");
    let path = dir.join("naive.dat");
    let file_len: u64 = 4 << 30;
    {
        let f = OpenOptions::new()
            .create(true)
            .truncate(true)
            .write(true)
            .open(&path)
            .expect("file");
        // SAFETY: FFI call on an owned descriptor.
        unsafe { libc::posix_fallocate(f.as_raw_fd(), 0, file_len as libc::off_t) };
        f.sync_all().expect("sync");
    }
    let file = Rc::new(glommio::io::BufferedFile::open(&path).await.expect("open"));
    let std_file = Rc::new(OpenOptions::new().write(true).open(&path).expect("open"));
    let record = Rc::new(vec![b'x'; body_bytes + 256]);
    let offset = Rc::new(Cell::new(0u64));
    drive(appenders, duration, move || {
        let (file, std_file, record, offset) = (
            file.clone(),
            std_file.clone(),
            record.clone(),
            offset.clone(),
        );
        async move {
            let at = offset.get();
            offset.set((at + record.len() as u64) % (file_len - record.len() as u64));
            // The write itself is a page-cache copy, as in the spool.
            std_file.write_all_at(&record, at).expect("write");
            file.fdatasync().await.expect("fdatasync");
            body_bytes as u64
        }
    })
    .await
}

/// Runs `appenders` concurrent loops of `op` (one acknowledged message each, returning
/// its body bytes) until `duration` has passed, timing each `op`.
async fn drive<F, Fut>(appenders: usize, duration: Duration, op: F) -> ShardOutcome
where
    F: Fn() -> Fut + 'static,
    Fut: std::future::Future<Output = u64> + 'static,
{
    let op = Rc::new(op);
    let hist = Rc::new(RefCell::new(Histogram::<u64>::new(3).expect("histogram")));
    let count = Rc::new(Cell::new(0u64));
    let bytes = Rc::new(Cell::new(0u64));
    let deadline = Instant::now() + duration;
    let tasks: Vec<_> = (0..appenders)
        .map(|_| {
            let (op, hist, count, bytes) = (op.clone(), hist.clone(), count.clone(), bytes.clone());
            glommio::spawn_local(async move {
                while Instant::now() < deadline {
                    let t = Instant::now();
                    let n = op().await;
                    let _ = hist.borrow_mut().record(t.elapsed().as_micros() as u64);
                    count.set(count.get() + 1);
                    bytes.set(bytes.get() + n);
                }
            })
        })
        .collect();
    for task in tasks {
        task.await;
    }
    let hist = hist.borrow().clone();
    ShardOutcome {
        msgs: count.get(),
        bytes: bytes.get(),
        hist,
    }
}

/// Sequential writes of `bytes` in 1 MiB chunks and one fdatasync: the disk's limit.
fn raw_limit(dir: &Path, bytes: u64) -> Result<(f64, u64)> {
    std::fs::create_dir_all(dir)?;
    let path = dir.join("raw.dat");
    let result = write_and_sync(&path, bytes);
    // The file goes whether or not the write succeeded (a full disk stays full otherwise).
    let _ = std::fs::remove_file(&path);
    let (seconds, flushes) = result?;
    Ok((bytes as f64 / seconds, flushes))
}

/// Writes `bytes` to a new file at `path` and syncs it; seconds taken and device flushes.
fn write_and_sync(path: &Path, bytes: u64) -> Result<(f64, u64)> {
    let dir = path.parent().unwrap_or(Path::new("."));
    let mut file = OpenOptions::new()
        .create(true)
        .truncate(true)
        .write(true)
        .open(path)
        .context("creating the file")?;
    let chunk = vec![b'x'; 1 << 20];
    let flushes0 = device_flushes(dir);
    let t = Instant::now();
    let mut written = 0;
    while written < bytes {
        let piece = &chunk[..chunk.len().min((bytes - written) as usize)];
        file.write_all(piece)
            .with_context(|| format!("after {written} bytes"))?;
        written += piece.len() as u64;
    }
    file.sync_data().context("fdatasync")?;
    let seconds = t.elapsed().as_secs_f64();
    Ok((seconds, device_flushes(dir).saturating_sub(flushes0)))
}

/// Recovery timings of one spool.
struct RecoveryTimes {
    /// Seconds with nothing of the spool in the page cache; `None` when the page cache
    /// cannot be dropped (it needs root).
    cold_s: Option<f64>,
    warm_s: f64,
    live: u64,
    disk_bytes: u64,
}

/// Drops the page cache (root only); true if it did.
fn drop_page_cache() -> bool {
    // SAFETY: sync(2) takes no arguments and cannot fail.
    unsafe { libc::sync() };
    std::fs::write("/proc/sys/vm/drop_caches", "3").is_ok()
}

/// Times `Spool::open` (recovery) of `dir`; returns seconds and the live count.
fn time_recovery(dir: &Path) -> Result<(f64, u64)> {
    let t = Instant::now();
    let (spool, recovered) = Spool::open(FileStorage::open_dir(dir)?, SpoolConfig::for_shard(0))?;
    let seconds = t.elapsed().as_secs_f64();
    let live = recovered.live.len() as u64;
    drop((spool, recovered));
    Ok((seconds, live))
}

/// Writes `records` small messages with the spool, then times recovery of them from a
/// cold page cache (as after a power cut) and again from a warm one.
fn recovery(args: &Args, records: usize) -> Result<RecoveryTimes> {
    let dir = args.dir.join("recovery");
    let _ = std::fs::remove_dir_all(&dir);
    let shard_dir = dir.join("0");
    let write_dir = shard_dir.clone();
    glommio::LocalExecutorBuilder::new(glommio::Placement::Unbound)
        .make()
        .map_err(|e| anyhow::anyhow!("starting executor: {e}"))?
        .run(async move {
            let (spool, _) = Spool::open(
                FileStorage::open_dir(&write_dir).expect("dir"),
                SpoolConfig::for_shard(0),
            )
            .expect("open");
            glommio::spawn_local(spool.clone().run_committer()).detach();
            let body = b"Subject: r\r\n\r\nsmall\r\n".to_vec();
            let mut last = None;
            for _ in 0..records {
                let msg = message(&spool, &body);
                last = Some(spool.append_message(&msg).expect("append"));
            }
            if let Some(ticket) = last {
                spool.durable(ticket).await.expect("durable");
            }
            spool.close().await;
        });
    let cold_s = if drop_page_cache() {
        Some(time_recovery(&shard_dir)?.0)
    } else {
        None
    };
    let (warm_s, live) = time_recovery(&shard_dir)?;
    let disk_bytes: u64 = std::fs::read_dir(&shard_dir)?
        .map(|e| {
            e.map(|e| e.metadata().map(|m| m.len()).unwrap_or(0))
                .unwrap_or(0)
        })
        .sum();
    std::fs::remove_dir_all(&dir)?;
    Ok(RecoveryTimes {
        cold_s,
        warm_s,
        live,
        disk_bytes,
    })
}

fn main() -> Result<()> {
    let args = Args::parse();
    std::fs::create_dir_all(&args.dir)?;
    let all_shards = args.shards.unwrap_or_else(|| {
        std::thread::available_parallelism()
            .map(|n| n.get())
            .unwrap_or(1)
    });
    let mut results = Vec::new();
    let mut shard_counts = vec![1];
    if all_shards > 1 {
        shard_counts.push(all_shards);
    }
    for &shards in &shard_counts {
        for &appenders in &args.appenders {
            // Alternate the systems so that drift of the machine hits both alike.
            for system in ["gannet", "naive"] {
                let result = run_case(&args, system, shards, appenders)?;
                println!("{}", result.json());
                results.push(result);
            }
        }
    }
    let gannet_bytes = results
        .iter()
        .filter(|r| r.system == "gannet")
        .map(|r| r.bytes)
        .max()
        .unwrap_or(1 << 30);
    let raw_bytes = args
        .raw_bytes
        .unwrap_or(gannet_bytes.clamp(256 << 20, 2 << 30));
    let (raw_bytes_per_s, raw_flushes) = raw_limit(&args.dir, raw_bytes).with_context(|| {
        format!(
            "raw-disk limit: writing {raw_bytes} bytes in {}",
            args.dir.display()
        )
    })?;
    let raw_msgs_per_s = raw_bytes_per_s / args.body_bytes as f64;
    println!(
        "{}",
        serde_json::json!({"system": "raw", "mb_per_s": (raw_bytes_per_s / 1e6).round(), "msgs_per_s": raw_msgs_per_s.round(), "flushes": raw_flushes})
    );
    let recovery = if args.recovery_records > 0 {
        let times = recovery(&args, args.recovery_records)?;
        let ms = |s: f64| (s * 1000.0).round() / 1000.0;
        println!(
            "{}",
            serde_json::json!({"recovery_records": times.live, "recovery_cold_s": times.cold_s.map(ms),
                "recovery_warm_s": ms(times.warm_s), "spool_bytes": times.disk_bytes})
        );
        Some(times)
    } else {
        None
    };

    let reads = read_cost(args.body_bytes);
    println!(
        "{}",
        serde_json::json!({"read_ns_full_check": reads.full_ns, "read_ns_verified": reads.verified_ns, "body_bytes": args.body_bytes})
    );

    let mut md = String::new();
    use std::fmt::Write as _;
    let rev = command_output("git", &["rev-parse", "--short", "HEAD"]);
    let date = command_output("date", &["-u", "+%Y-%m-%d %H:%M UTC"]);
    let command = command_line();
    writeln!(
        md,
        "\n## Spool: group commit vs per-message fdatasync vs raw disk — {date}\n"
    )?;
    writeln!(md, "- command: `{command}`")?;
    writeln!(
        md,
        "- machine: {}; disk under `{}`",
        machine(),
        args.dir.display()
    )?;
    writeln!(
        md,
        "- revision: {rev}; {} byte bodies, {} s per case\n",
        args.body_bytes, args.seconds
    )?;
    writeln!(
        md,
        "| shards | appenders/shard | gannet msgs/s | naive msgs/s | gannet/naive | gannet/raw | gannet MB/s | ack p50/p99/p99.9 µs | flushes/msg gannet / naive | CPU s per 1000 msgs gannet / naive |"
    )?;
    writeln!(md, "|---|---|---|---|---|---|---|---|---|---|")?;
    for pair in results.chunks(2) {
        let (g, n) = (&pair[0], &pair[1]);
        let gj = g.json();
        let nj = n.json();
        writeln!(
            md,
            "| {} | {} | {:.0} | {:.0} | {:.1}× | {:.0}% | {} | {}/{}/{} | {} / {} | {} / {} |",
            g.shards,
            g.appenders,
            g.msgs_per_s(),
            n.msgs_per_s(),
            g.msgs_per_s() / n.msgs_per_s().max(1e-9),
            100.0 * g.msgs_per_s() / raw_msgs_per_s,
            gj["mb_per_s"],
            gj["ack_latency_us_p50"],
            gj["ack_latency_us_p99"],
            gj["ack_latency_us_p999"],
            gj["flushes_per_msg"],
            nj["flushes_per_msg"],
            gj["cpu_s_per_1000_msgs"],
            nj["cpu_s_per_1000_msgs"],
        )?;
    }
    writeln!(
        md,
        "\nraw disk: {:.0} MB/s sequential write + one fdatasync = {:.0} msgs/s of {} bytes.",
        raw_bytes_per_s / 1e6,
        raw_msgs_per_s,
        args.body_bytes
    )?;
    if let Some(t) = recovery {
        let cold = match t.cold_s {
            Some(s) => format!("{s:.2} s from a cold page cache, "),
            None => "cold page cache not measured (dropping it needs root), ".to_string(),
        };
        writeln!(
            md,
            "\nrecovery: {} records ({:.0} MB of segments) recovered in {cold}{:.2} s warm.",
            t.live,
            t.disk_bytes as f64 / 1e6,
            t.warm_s
        )?;
    }
    writeln!(
        md,
        "\nreading a spooled message of {} body bytes (median of {READ_ROUNDS} rounds of {READS} reads): {:.0} ns with the full check (header, payload CRC32C, rkyv validation), {:.0} ns as `MessageRef::get` reads it now (header and rkyv validation; the CRC was verified at append or recovery) — {:.1}×.",
        args.body_bytes,
        reads.full_ns,
        reads.verified_ns,
        reads.full_ns / reads.verified_ns.max(1e-9)
    )?;
    print!("{md}");
    if !args.results.is_empty() {
        let mut file = OpenOptions::new()
            .create(true)
            .append(true)
            .open(&args.results)?;
        file.write_all(md.as_bytes())?;
    }
    let _ = std::fs::remove_dir_all(&args.dir);
    Ok(())
}
