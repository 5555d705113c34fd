//! `pmctl`: the command line over the public API.

use clap::Parser;

#[tokio::main]
async fn main() -> std::process::ExitCode {
    pm_cli::ctl::main(pm_cli::ctl::Cli::parse()).await
}
