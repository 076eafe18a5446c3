//! hop-bench: what it costs to hand a part from one core to another through gannet's
//! core mesh (engine/src/mesh.rs), measured on the real mesh with two pinned glommio
//! executors.
//!
//! - ping-pong: shard 0 hands one part (with a fresh copy of a body, as delivery does)
//!   to shard 1, which answers with a report; shard 1 is parked in io_uring between
//!   parts, so each round trip includes two foreign wake-ups. Half the round trip is
//!   the latency of one hop to an idle core.
//! - stream: shard 0 hands parts as fast as the bounded inbox takes them and shard 1
//!   drains them in batches: the throughput and cost per part of a busy mesh.
//!
//! Prints JSON lines and appends a markdown report to bench/RESULTS.md.

use std::sync::Arc;
use std::time::Instant;

use anyhow::{Result, anyhow};
use clap::Parser;
use gannet_bench::{append_results, command_line, command_output, machine};
use gannet_core::handoff::{Handoff, Report, SiteSpec};
use gannet_engine::delivery::client::Response;
use gannet_engine::mesh::Mesh;
use gannet_engine::notes::Note;
use glommio::{LocalExecutorBuilder, Placement};
use hdrhistogram::Histogram;

#[derive(Debug, Parser)]
#[command(about = "cost of a cross-core hop through gannet's mesh")]
struct Args {
    /// Round trips in the ping-pong pass.
    #[arg(long, default_value_t = 20_000)]
    round_trips: u64,
    /// Parts in the streaming pass.
    #[arg(long, default_value_t = 1_000_000)]
    parts: u64,
    /// Body bytes copied into each handoff.
    #[arg(long, default_value_t = 10_240)]
    body_bytes: usize,
    /// Inbox capacity (notes).
    #[arg(long, default_value_t = 16_384)]
    inbox: usize,
    /// Markdown report appended here ("" to skip).
    #[arg(long, default_value = "bench/RESULTS.md")]
    results: String,
}

fn handoff(token: u64, body: &[u8]) -> Note {
    Note::Handoff(Box::new(Handoff {
        from: 0,
        token,
        sender: "s@b.test".into(),
        recipients: vec!["r@d.test".into()],
        // The copy delivery makes when a part leaves its home shard.
        body: Arc::new(body.to_vec()),
        site: SiteSpec {
            name: "mx1.d.test".into(),
            hosts: vec![],
            host_names: vec![],
            tls: Default::default(),
            auth: None,
        },
        egress: "default".into(),
        tenant: None,
        campaign: None,
    }))
}

/// Shard 1: answers every handoff with a report (`echo`) or just counts them.
async fn owner(mesh: Arc<Mesh<Note>>, expected: u64, echo: bool) {
    let mut notes = Vec::with_capacity(64);
    let mut seen = 0;
    while seen < expected {
        mesh.receive(1, &mut notes, 64).await;
        for note in notes.drain(..) {
            if let Note::Handoff(h) = note {
                seen += 1;
                if echo {
                    let mut report = Note::Report(Report {
                        token: h.token,
                        results: vec![Response::local(250, "2.0.0 ok")],
                        peer: None,
                        tls: None,
                        delayed: false,
                    });
                    while let Err(back) = mesh.send(0, report) {
                        report = back;
                        glommio::yield_if_needed().await;
                    }
                }
            }
        }
    }
}

fn run_pair<A, B, FA, FB>(a: A, b: B) -> Result<(FA::Output, FB::Output)>
where
    A: FnOnce() -> FA + Send + 'static,
    B: FnOnce() -> FB + Send + 'static,
    FA: Future + 'static,
    FB: Future + 'static,
    FA::Output: Send + 'static,
    FB::Output: Send + 'static,
{
    let cpus = std::thread::available_parallelism().map_or(1, |n| n.get());
    let second = if cpus > 1 { 1 } else { 0 };
    let hb = LocalExecutorBuilder::new(Placement::Fixed(second))
        .spawn(b)
        .map_err(|e| anyhow!("executor: {e}"))?;
    let ha = LocalExecutorBuilder::new(Placement::Fixed(0))
        .spawn(a)
        .map_err(|e| anyhow!("executor: {e}"))?;
    let ra = ha.join().map_err(|e| anyhow!("shard 0: {e:?}"))?;
    let rb = hb.join().map_err(|e| anyhow!("shard 1: {e:?}"))?;
    Ok((ra, rb))
}

fn main() -> Result<()> {
    let args = Args::parse();
    let body = Arc::new(vec![b'x'; args.body_bytes]);

    // Ping-pong: one part in flight; the owner parks between parts.
    let mesh = Arc::new(Mesh::new(2, args.inbox));
    let (m0, m1, b0) = (mesh.clone(), mesh.clone(), body.clone());
    let n = args.round_trips;
    let (rtt, ()) = run_pair(
        move || async move {
            let mut hist = Histogram::<u64>::new_with_bounds(1, 10_000_000, 3).unwrap();
            let mut notes = Vec::with_capacity(4);
            for token in 0..n {
                let t0 = Instant::now();
                m0.send(1, handoff(token, &b0)).expect("the inbox has room");
                m0.receive(0, &mut notes, 4).await;
                notes.clear();
                let _ = hist.record((t0.elapsed().as_nanos() as u64).max(1));
            }
            hist
        },
        move || owner(m1, n, true),
    )?;

    // Stream: as fast as the inbox takes them.
    let mesh = Arc::new(Mesh::new(2, args.inbox));
    let (m0, m1, b0) = (mesh.clone(), mesh.clone(), body.clone());
    let parts = args.parts;
    let t0 = Instant::now();
    let (full, ()) = run_pair(
        move || async move {
            let mut full = 0u64;
            for token in 0..parts {
                let mut note = handoff(token, &b0);
                while let Err(back) = m0.send(1, note) {
                    note = back;
                    full += 1;
                    glommio::yield_if_needed().await;
                }
            }
            full
        },
        move || owner(m1, parts, false),
    )?;
    let stream_s = t0.elapsed().as_secs_f64();

    // The body copy alone, for scale.
    let copies = 100_000;
    let t0 = Instant::now();
    let mut keep = 0usize;
    for _ in 0..copies {
        let copy = std::hint::black_box(body.to_vec());
        keep = keep.wrapping_add(copy.len());
    }
    std::hint::black_box(keep);
    let copy_ns = t0.elapsed().as_nanos() as f64 / copies as f64;

    let q = |p: f64| rtt.value_at_quantile(p) as f64 / 1000.0;
    let per_part_ns = stream_s * 1e9 / parts as f64;
    let json = serde_json::json!({
        "round_trip_us_p50": q(0.5), "round_trip_us_p99": q(0.99), "round_trip_us_p999": q(0.999),
        "stream_parts_per_s": (parts as f64 / stream_s).round(), "stream_ns_per_part": per_part_ns.round(),
        "inbox_full_retries": full, "body_copy_ns": copy_ns.round(), "body_bytes": args.body_bytes,
    });
    println!("{json}");

    let rev = command_output("git", &["rev-parse", "--short", "HEAD"]);
    let date = command_output("date", &["-u", "+%Y-%m-%d %H:%M UTC"]);
    let command = command_line();
    let md = format!(
        "\n## Cross-core hop through the mesh — {date}\n\n\
         - command: `{}`\n- machine: {}\n- revision: {rev}; {} byte body copied into each handoff, inbox of {} notes\n\n\
         | measure | value |\n|---|---|\n\
         | round trip to a parked core and back (handoff + report), p50 / p99 / p99.9 | {:.1} / {:.1} / {:.1} µs |\n\
         | one hop to a parked core (half the round trip, p50) | {:.1} µs |\n\
         | streaming to a busy core | {:.0} parts/s, {:.0} ns per part (body copy included) |\n\
         | of which the {}-byte body copy | {:.0} ns |\n\
         | sends refused by a full inbox (retried) | {} |\n",
        command,
        machine(),
        args.body_bytes,
        args.inbox,
        q(0.5),
        q(0.99),
        q(0.999),
        q(0.5) / 2.0,
        parts as f64 / stream_s,
        per_part_ns,
        args.body_bytes,
        copy_ns,
        full,
    );
    print!("{md}");
    append_results(&args.results, &md)?;
    Ok(())
}
