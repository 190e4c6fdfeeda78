use clap::Parser;

fn main() -> std::process::ExitCode {
    rustrag::reuse_freed_memory();
    let cli = rustrag::cli::Cli::parse();
    rustrag::cli::init_tracing(cli.verbose);
    match rustrag::cli::run(cli) {
        Ok(()) => std::process::ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("error: {e:#}");
            std::process::ExitCode::FAILURE
        }
    }
}
