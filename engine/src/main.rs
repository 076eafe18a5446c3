//! gannetd: the gannet mail transfer agent.
//!
//! Today it starts one executor per core, recovers each shard's spool and keeps it
//! (committer and maintenance) until SIGTERM or SIGINT. SMTP and HTTP ingress, the
//! configuration file and delivery arrive with the engine issues that follow.

mod runtime;

use std::path::PathBuf;
use std::process::ExitCode;

use clap::Parser;

/// gannet mail transfer agent daemon.
#[derive(Debug, Parser)]
#[command(name = "gannetd", version, about)]
struct Cli {
    /// Directory for the spool and other state (created if missing).
    #[arg(long, default_value = "data")]
    data_dir: PathBuf,
    /// Number of shards (one executor pinned per core); default: every core.
    #[arg(long)]
    shards: Option<usize>,
    /// Log filter, e.g. `info` or `gannet_spool=debug` (overrides RUST_LOG).
    #[arg(long)]
    log: Option<String>,
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    let filter = cli
        .log
        .clone()
        .or_else(|| std::env::var("RUST_LOG").ok())
        .unwrap_or_else(|| "info".to_string());
    tracing_subscriber::fmt()
        .with_env_filter(tracing_subscriber::EnvFilter::new(filter))
        .with_writer(std::io::stderr)
        .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()))
        .init();
    let shards = cli.shards.unwrap_or_else(|| {
        std::thread::available_parallelism()
            .map(|n| n.get())
            .unwrap_or(1)
    });
    let options = runtime::Options {
        data_dir: cli.data_dir,
        shards,
    };
    match runtime::run(options) {
        Ok(()) => ExitCode::SUCCESS,
        Err(err) => {
            tracing::error!("{err:#}");
            eprintln!("gannetd: {err:#}");
            ExitCode::from(1)
        }
    }
}
