//! `deployra-builder`: reads the command line and hands over to [`cli`].
//! With no subcommand it is the daemon, as systemd's unit runs it.

use std::process::ExitCode;

use clap::Parser;

mod cli;

fn main() -> ExitCode {
    // Before parsing, so that the `.env` also feeds the flags' environment
    // fallbacks.
    if let Err(e) = dotenvy::dotenv() {
        if !e.not_found() {
            eprintln!("deployra-builder: .env: {e}");
            return ExitCode::from(cli::EX_CONFIG);
        }
    }
    cli::main(cli::Cli::parse())
}
