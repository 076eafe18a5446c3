//! `gannet-spool`: inspect a gannet spool while gannetd is stopped.

use std::io::Write;
use std::path::PathBuf;
use std::process::ExitCode;

use clap::{Parser, Subcommand};
use gannet_tools::spool_inspect;

/// Inspect a gannet spool (read-only; refuses a spool that a running gannetd holds).
#[derive(Debug, Parser)]
#[command(version, about)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Debug, Subcommand)]
enum Command {
    /// List live messages with their queue, attempts and due time.
    List {
        /// A spool root (`<data_dir>/spool`) or one shard directory.
        path: PathBuf,
        /// One JSON object per line instead of a table.
        #[arg(long)]
        json: bool,
    },
    /// Show one message's envelope, metadata and retry state.
    Dump {
        path: PathBuf,
        /// The message id (32 hex digits).
        id: String,
        /// Also print the raw message body.
        #[arg(long)]
        body: bool,
    },
    /// Check every record of every segment; exit status 1 if anything is damaged.
    Verify { path: PathBuf },
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    let result = match cli.command {
        Command::List { path, json } => {
            spool_inspect::list(&path, json).map(|s| (s.into_bytes(), true))
        }
        Command::Dump { path, id, body } => {
            spool_inspect::dump(&path, &id, body).map(|b| (b, true))
        }
        Command::Verify { path } => {
            spool_inspect::verify(&path).map(|(s, ok)| (s.into_bytes(), ok))
        }
    };
    match result {
        Ok((out, ok)) => {
            let _ = std::io::stdout().write_all(&out);
            if ok {
                ExitCode::SUCCESS
            } else {
                ExitCode::from(1)
            }
        }
        Err(err) => {
            eprintln!("gannet-spool: {err:#}");
            ExitCode::from(2)
        }
    }
}
