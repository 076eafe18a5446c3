//! `gannet-dkim keygen`: makes a DKIM key pair for gannet's `[dkim] keys` and prints
//! the DNS TXT record that publishes its public key.
//!
//! Ed25519 keys are made with ring, RSA keys with the `rsa` crate (ring cannot make
//! RSA keys). The private key is written as PKCS#8 PEM, readable by its owner only.

use std::io::Write as _;
use std::os::unix::fs::OpenOptionsExt;
use std::path::PathBuf;
use std::process::ExitCode;

use clap::{Parser, Subcommand};
use gannet_tools::keys::{Algorithm, generate, pem};

#[derive(Debug, Parser)]
#[command(version, about = "DKIM keys for gannet")]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Debug, Subcommand)]
enum Command {
    /// Make a key pair: writes <out>/<domain>.<selector>.pem and prints the TXT record
    /// and the `[dkim] keys` entry.
    Keygen {
        /// The signing domain (d=).
        #[arg(long)]
        domain: String,
        /// The selector (s=).
        #[arg(long)]
        selector: String,
        #[arg(long, value_enum, default_value = "rsa")]
        algorithm: Algorithm,
        /// RSA key size (1024 to 4096; under 2048 only for receivers that need it:
        /// such keys are weak).
        #[arg(long, default_value_t = 2048)]
        bits: usize,
        /// Directory for the private key.
        #[arg(long, default_value = ".")]
        out: PathBuf,
    },
}

/// A TXT record value as quoted strings of at most 255 bytes (RFC 1035's limit).
fn txt_strings(value: &str) -> String {
    value
        .as_bytes()
        .chunks(255)
        .map(|c| format!("\"{}\"", String::from_utf8_lossy(c)))
        .collect::<Vec<_>>()
        .join(" ")
}

fn keygen(
    domain: &str,
    selector: &str,
    algorithm: Algorithm,
    bits: usize,
    out: &std::path::Path,
) -> Result<(), String> {
    let (pkcs8, k, p) = generate(algorithm, bits)?;
    let path = out.join(format!("{domain}.{selector}.pem"));
    let pem = pem(&pkcs8);
    let mut file = std::fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(0o600)
        .open(&path)
        .map_err(|e| format!("{}: {e}", path.display()))?;
    file.write_all(pem.as_bytes())
        .map_err(|e| format!("{}: {e}", path.display()))?;
    let record = format!("v=DKIM1; k={k}; p={p}");
    println!(
        "{selector}._domainkey.{domain}. IN TXT {}",
        txt_strings(&record)
    );
    println!();
    println!("# [dkim] keys entry:");
    println!(
        "{{ domain = \"{domain}\", selector = \"{selector}\", key_file = \"{}\" }}",
        path.display()
    );
    Ok(())
}

fn main() -> ExitCode {
    match Cli::parse().command {
        Command::Keygen {
            domain,
            selector,
            algorithm,
            bits,
            out,
        } => match keygen(&domain, &selector, algorithm, bits, &out) {
            Ok(()) => ExitCode::SUCCESS,
            Err(e) => {
                eprintln!("gannet-dkim: {e}");
                ExitCode::from(2)
            }
        },
    }
}
