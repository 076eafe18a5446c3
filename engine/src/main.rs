//! gannetd: the gannet mail transfer agent (the command line; the engine is the
//! `gannet_engine` library).

use std::io::Read as _;
use std::path::PathBuf;
use std::process::ExitCode;

use clap::Parser;

use gannet_core::auth;
use gannet_core::config::{self, Config};
use gannet_engine::runtime;

/// gannet mail transfer agent daemon.
#[derive(Debug, Parser)]
#[command(name = "gannetd", version, about)]
struct Cli {
    /// Configuration file (TOML). Without it, the embedded default is used.
    #[arg(long, value_name = "FILE")]
    config: Option<PathBuf>,
    /// Print the documented default configuration and exit.
    #[arg(long, exclusive = true)]
    print_default_config: bool,
    /// Check a configuration file, print what is wrong with it, and exit.
    #[arg(long, value_name = "FILE", exclusive = true)]
    check_config: Option<PathBuf>,
    /// Read a password on standard input and print its hash for `smtp.users`.
    #[arg(long, exclusive = true)]
    hash_password: bool,
    /// Read an API key on standard input and print its SHA-256 for `http.api_keys`.
    #[arg(long, exclusive = true)]
    hash_api_key: bool,
    /// Overrides `server.data_dir`.
    #[arg(long)]
    data_dir: Option<PathBuf>,
    /// Overrides `server.shards` (executors, one pinned per core).
    #[arg(long)]
    shards: Option<usize>,
    /// A static route, `domain=host:port[,host:port…]` (`*` for every other domain);
    /// repeatable, added to `delivery.routes`.
    #[arg(long, value_name = "ROUTE")]
    route: Vec<String>,
    /// Log filter, e.g. `info` or `gannet_spool=debug` (overrides RUST_LOG).
    #[arg(long)]
    log: Option<String>,
}

/// `domain=host:port[,host:port…]`.
fn parse_route(text: &str) -> Result<(String, Vec<config::Listen>), String> {
    let (domain, hosts) = text
        .split_once('=')
        .ok_or("expected domain=host:port[,host:port…]")?;
    let domain = domain.trim();
    if domain.is_empty() {
        return Err("the domain is empty".into());
    }
    let hosts = hosts
        .split(',')
        .map(|h| {
            h.trim()
                .parse()
                .map(config::Listen)
                .map_err(|_| format!("`{h}` is not host:port (an IP address and a port)"))
        })
        .collect::<Result<Vec<_>, _>>()?;
    Ok((domain.to_ascii_lowercase(), hosts))
}

/// The configuration: the file (or the embedded default) with the command line's
/// overrides.
fn load(cli: &Cli) -> Result<Config, String> {
    let mut config = match &cli.config {
        Some(path) => Config::load(path).map_err(|e| e.to_string())?,
        None => Config::embedded_default(),
    };
    if let Some(dir) = &cli.data_dir {
        config.server.data_dir = dir.clone();
    }
    if let Some(shards) = cli.shards {
        config.server.shards = shards;
    }
    for route in &cli.route {
        let (domain, hosts) =
            parse_route(route).map_err(|err| format!("--route {route:?}: {err}"))?;
        config
            .delivery
            .routes
            .insert(domain, gannet_core::config::Route::to_hosts(hosts));
    }
    Ok(config)
}

/// Delivery's client TLS, with `delivery.tls_ca_file` read (an error names the key).
fn client_tls(config: &Config) -> Result<gannet_engine::delivery::tls::ClientTls, String> {
    gannet_engine::delivery::tls::ClientTls::with_ca_file(&config.delivery.tls_ca_file)
        .map_err(|e| format!("delivery.tls_ca_file: {e}"))
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    if cli.print_default_config {
        print!("{}", config::DEFAULT_TOML);
        return ExitCode::SUCCESS;
    }
    if let Some(path) = &cli.check_config {
        return match Config::load(path) {
            // The DKIM keys and the policy script are read too: a key that cannot be used,
            // or a script that does not load, is a config error.
            Ok(config) => match gannet_engine::dkim::Signers::load(&config.dkim)
                .map(drop)
                .and_then(|()| client_tls(&config).map(drop))
                .and_then(|()| {
                    gannet_engine::policy::script::ScriptSource::from_config(&config.policy)
                        .map(drop)
                }) {
                Ok(()) => {
                    println!("{}: ok", path.display());
                    ExitCode::SUCCESS
                }
                Err(err) => {
                    eprintln!("gannetd: {}: {err}", path.display());
                    ExitCode::from(2)
                }
            },
            Err(err) => {
                eprintln!("gannetd: {err}");
                ExitCode::from(2)
            }
        };
    }
    if cli.hash_api_key {
        let mut key = String::new();
        if std::io::stdin().read_to_string(&mut key).is_err() {
            eprintln!("gannetd: cannot read the key from standard input");
            return ExitCode::from(2);
        }
        println!(
            "{}",
            auth::KeyDigest::of(key.trim_end_matches(['\r', '\n']))
        );
        return ExitCode::SUCCESS;
    }
    if cli.hash_password {
        let mut password = String::new();
        if std::io::stdin().read_to_string(&mut password).is_err() {
            eprintln!("gannetd: cannot read the password from standard input");
            return ExitCode::from(2);
        }
        let password = password.trim_end_matches(['\r', '\n']);
        println!(
            "{}",
            auth::PasswordHash::new(password, auth::ITERATIONS_DEFAULT)
        );
        return ExitCode::SUCCESS;
    }
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
    let config = match load(&cli) {
        Ok(config) => config,
        Err(err) => {
            eprintln!("gannetd: {err}");
            return ExitCode::from(2);
        }
    };
    // SIGHUP reads the file again (with the same command-line overrides); what can
    // change while running is applied, the rest is reported as needing a restart.
    let reload: runtime::Reload = Box::new(move || load(&cli).map(Config::resolve));
    match runtime::run(config.resolve(), reload) {
        Ok(()) => ExitCode::SUCCESS,
        Err(err) => {
            tracing::error!("{err:#}");
            eprintln!("gannetd: {err:#}");
            ExitCode::from(1)
        }
    }
}
