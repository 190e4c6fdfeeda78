//! The `rustrag` binary: the command line in [`cli`], a thin layer over the library.

mod cli;

use clap::Parser;

fn main() -> std::process::ExitCode {
    rustrag::reuse_freed_memory();
    let cli = cli::Cli::parse();
    cli::init_tracing(cli.verbose);
    match cli::run(cli).and_then(|()| cli::flush_stdout()) {
        Ok(()) => std::process::ExitCode::SUCCESS,
        // `rustrag … | head`: the reader has what it wanted; whatever the command wrote to disk
        // (a committed knowledge base) stands, so this is success, quietly.
        Err(e)
            if e.chain()
                .filter_map(|c| c.downcast_ref::<cli::StdoutError>())
                .any(cli::StdoutError::is_broken_pipe) =>
        {
            std::process::ExitCode::SUCCESS
        }
        Err(e) => {
            eprintln!("error: {e:#}");
            std::process::ExitCode::FAILURE
        }
    }
}
