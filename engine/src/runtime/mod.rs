//! The runtime: one glommio executor per shard, pinned one per core, each owning its
//! shard of the spool. This folder is the only place in the engine that knows glommio.

use std::path::PathBuf;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::time::Duration;

use anyhow::{Context, Result, anyhow};
use gannet_spool::{FileStorage, Spool, SpoolConfig};
use glommio::{LocalExecutorPoolBuilder, PoolPlacement};

/// How the daemon runs.
#[derive(Debug, Clone)]
pub struct Options {
    pub data_dir: PathBuf,
    pub shards: usize,
}

/// How often a shard looks at the shutdown flag.
const SHUTDOWN_POLL_MS: u64 = 50;

/// Runs every shard until SIGTERM or SIGINT, then closes each spool (everything
/// appended becomes durable) and returns.
pub fn run(options: Options) -> Result<()> {
    if options.shards == 0 || options.shards > usize::from(u16::MAX) {
        return Err(anyhow!(
            "shards must be between 1 and {}, got {}",
            u16::MAX,
            options.shards
        ));
    }
    let spool_dir = options.data_dir.join("spool");
    std::fs::create_dir_all(&spool_dir)
        .with_context(|| format!("creating {}", spool_dir.display()))?;
    let stop = Arc::new(AtomicBool::new(false));
    for signal in [signal_hook::consts::SIGTERM, signal_hook::consts::SIGINT] {
        signal_hook::flag::register(signal, stop.clone()).context("installing signal handlers")?;
    }
    tracing::info!(shards = options.shards, data_dir = %options.data_dir.display(), "gannetd starting");
    let placement = PoolPlacement::MaxSpread(options.shards, None);
    // Shards are numbered 0..n in start order (glommio's executor ids are process-wide
    // and need not start at 0); the number names the shard's spool directory.
    let next_shard = Arc::new(AtomicUsize::new(0));
    let handles = LocalExecutorPoolBuilder::new(placement)
        .on_all_shards({
            let stop = stop.clone();
            move || {
                let shard = next_shard.fetch_add(1, Ordering::Relaxed) as u16;
                shard_main(shard, spool_dir.clone(), stop.clone())
            }
        })
        .map_err(|e| anyhow!("starting {} executors: {e}", options.shards))?;
    let mut failed = Vec::new();
    for result in handles.join_all() {
        match result {
            Ok(Ok(())) => {}
            Ok(Err(err)) => failed.push(format!("{err:#}")),
            Err(err) => failed.push(format!("executor died: {err:?}")),
        }
    }
    if !failed.is_empty() {
        return Err(anyhow!("{}", failed.join("; ")));
    }
    tracing::info!("gannetd stopped");
    Ok(())
}

async fn shard_main(shard: u16, spool_dir: PathBuf, stop: Arc<AtomicBool>) -> Result<()> {
    let dir = spool_dir.join(shard.to_string());
    let storage = FileStorage::open_dir(&dir).with_context(|| format!("shard {shard}"))?;
    let (spool, recovered) = Spool::open(storage, SpoolConfig::for_shard(shard))
        .with_context(|| format!("recovering shard {shard}"))?;
    let report = &recovered.report;
    tracing::info!(
        shard,
        live = recovered.live.len(),
        records = report.records,
        segments = report.segments.len(),
        torn_bytes = report.torn_bytes(),
        corrupt_regions = report.corrupt_regions(),
        unusable_segments = report.unusable_segments(),
        "spool recovered"
    );
    for segment in report.segments.iter().filter(|s| !s.is_clean()) {
        tracing::warn!(shard, seq = segment.seq, unusable = ?segment.unusable, torn_bytes = segment.torn_bytes,
            corrupt = segment.corrupt.len(), "damaged spool segment (see gannet-spool verify)");
    }
    glommio::spawn_local(spool.clone().run_committer()).detach();
    glommio::spawn_local(spool.clone().run_maintenance()).detach();
    tracing::info!(
        shard,
        "shard ready (SMTP and HTTP ingress are not built yet)"
    );
    while !stop.load(Ordering::Relaxed) {
        glommio::timer::sleep(Duration::from_millis(SHUTDOWN_POLL_MS)).await;
    }
    spool.close().await;
    tracing::info!(shard, "shard stopped; spool synced");
    Ok(())
}
