//! gannetctl: the operator's command line over gannetd's admin API.

use clap::Parser;

fn main() {
    let cli = gannet_tools::ctl::Cli::parse();
    let mut out = std::io::stdout().lock();
    if let Err(err) = gannet_tools::ctl::run(cli, &mut out) {
        eprintln!("gannetctl: {err:#}");
        std::process::exit(1);
    }
}
