//! The `rustrag` binary: the command line in [`cli`], a thin layer over the library.

mod cli;

use clap::Parser;

fn main() -> std::process::ExitCode {
    rustrag::reuse_freed_memory();
    let cli = cli::Cli::parse();
    cli::init_tracing(cli.verbose);
    match cli::run(cli) {
        Ok(()) => std::process::ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("error: {e:#}");
            std::process::ExitCode::FAILURE
        }
    }
}
