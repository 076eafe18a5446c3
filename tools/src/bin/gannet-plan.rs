//! gannet-plan: the capacity planner.
//!
//! `gannet-plan calibrate` measures this host through gannetd and writes its profile;
//! `gannet-plan plan WORKLOAD --profile FILE` predicts what one host sustains for the
//! workload, the resource that saturates first, and how many hosts the peak needs.

use std::path::PathBuf;
use std::process::ExitCode;

use clap::{Parser, Subcommand};
use gannet_tools::plan::{calibrate, model, profile::Profile, workload::Workload};

#[derive(Debug, Parser)]
#[command(version, about = "gannet's capacity planner")]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Debug, Subcommand)]
enum Command {
    /// Measure this host through gannetd (about 80 s) and write its profile.
    Calibrate {
        /// The gannetd binary (default: beside gannet-plan, else on PATH).
        #[arg(long)]
        gannetd: Option<PathBuf>,
        /// Scratch directory: put it on the filesystem the spool will use.
        #[arg(long, default_value = "gannet-plan-calibration")]
        dir: PathBuf,
        /// Messages per measurement.
        #[arg(long, default_value_t = 3000)]
        messages: u64,
        /// Where the profile goes.
        #[arg(long, default_value = "gannet-profile.json")]
        out: PathBuf,
        /// Measure only the disk under --dir and write this profile with its disk
        /// replaced: to plan for another spool device without measuring the rest again.
        #[arg(long, value_name = "PROFILE")]
        disk_only: Option<PathBuf>,
    },
    /// Plan for a workload (TOML; see tuning/workloads/) with a host profile.
    Plan {
        workload: PathBuf,
        #[arg(long, default_value = "gannet-profile.json")]
        profile: PathBuf,
        /// Print the plan as JSON.
        #[arg(long)]
        json: bool,
    },
}

fn main() -> ExitCode {
    match run(Cli::parse()) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("gannet-plan: {e}");
            ExitCode::FAILURE
        }
    }
}

fn run(cli: Cli) -> Result<(), String> {
    match cli.command {
        Command::Calibrate {
            gannetd,
            dir,
            messages,
            out,
            disk_only,
        } => {
            if let Some(base) = disk_only {
                let mut profile = Profile::load(&base)?;
                std::fs::create_dir_all(&dir)
                    .map_err(|e| format!("creating {}: {e}", dir.display()))?;
                eprintln!("measuring disk: flush latency and bandwidth…");
                profile.disk = calibrate::disk(&dir, messages.clamp(50, 1000) as usize)
                    .map_err(|e| format!("{e:#}"))?;
                profile.host.disk = calibrate::mount_of(&dir);
                let _ = std::fs::remove_dir_all(&dir);
                return write_profile(&profile, &out);
            }
            let gannetd = gannetd.unwrap_or_else(default_gannetd);
            let revision = std::process::Command::new(&gannetd)
                .arg("--version")
                .output()
                .ok()
                .map(|o| String::from_utf8_lossy(&o.stdout).trim().to_string())
                .filter(|v| !v.is_empty())
                .ok_or_else(|| format!("cannot run {} (give --gannetd)", gannetd.display()))?;
            let options = calibrate::Options {
                gannetd,
                dir: dir.clone(),
                messages,
                revision,
            };
            let profile =
                calibrate::calibrate(&options, &mut |what| eprintln!("measuring {what}…"))
                    .map_err(|e| format!("{e:#}"))?;
            let _ = std::fs::remove_dir_all(&dir);
            write_profile(&profile, &out)
        }
        Command::Plan {
            workload,
            profile,
            json,
        } => {
            let w = Workload::load(&workload)?;
            let p = Profile::load(&profile)?;
            let plan = model::plan(&w, &p)?;
            if json {
                let text = serde_json::to_string_pretty(&plan).map_err(|e| e.to_string())?;
                println!("{text}");
            } else {
                print!("{}", model::render(&plan, &w, &p));
            }
            Ok(())
        }
    }
}

/// Writes the profile durably (a crash leaves the old file or the new one) and prints it.
fn write_profile(profile: &Profile, out: &std::path::Path) -> Result<(), String> {
    let text = serde_json::to_string_pretty(profile).map_err(|e| e.to_string())?;
    gannet_spool::durable::write_file(out, format!("{text}\n").as_bytes(), 0o644)
        .map_err(|e| format!("writing {}: {e}", out.display()))?;
    println!("{text}");
    eprintln!("profile written to {}", out.display());
    Ok(())
}

/// gannetd beside this program (as cargo and the install steps put them), else the
/// one on PATH.
fn default_gannetd() -> PathBuf {
    std::env::current_exe()
        .ok()
        .and_then(|exe| Some(exe.parent()?.join("gannetd")))
        .filter(|p| p.exists())
        .unwrap_or_else(|| PathBuf::from("gannetd"))
}
