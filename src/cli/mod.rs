//! The `rustrag` command line: one file per subcommand, each a thin layer over the library.
//!
//! Subcommands print through [`outln!`], never `println!`: a write error (a closed pipe, a full
//! disk) comes back as a [`StdoutError`] instead of a panic, and `main` turns a broken pipe into a
//! quiet exit 0 (as ripgrep does) and any other write error into `error: …` with exit 1.

/// `println!` that returns write errors: `outln!("{x}")` expands to a `writeln!` on the locked
/// stdout, followed by `?` with the error wrapped in [`StdoutError`] (so the caller must return
/// `anyhow::Result`).
macro_rules! outln {
    ($($arg:tt)*) => {{
        use std::io::Write as _;
        writeln!(std::io::stdout().lock(), $($arg)*).map_err(crate::cli::StdoutError)?
    }};
}

pub mod ask;
pub mod bench;
pub mod embed;
pub mod eval;
pub mod index;
pub mod pipeline_args;
pub mod retrieve;
pub mod serve;
pub mod train;
pub mod train_retriever;

use anyhow::Result;
use clap::{Parser, Subcommand};

#[derive(Parser, Debug)]
#[command(
    name = "rustrag",
    version,
    about = "Retrieval-augmented generation: index, retrieve, ask, evaluate"
)]
pub struct Cli {
    /// Print machine-readable JSON instead of text.
    #[arg(long, global = true)]
    pub json: bool,
    /// More logging (-v info, -vv debug); RUST_LOG overrides.
    #[arg(short, long, action = clap::ArgAction::Count, global = true)]
    pub verbose: u8,
    #[command(subcommand)]
    pub command: Command,
}

#[derive(Subcommand, Debug)]
pub enum Command {
    /// Build or update a knowledge base.
    Index(index::Args),
    /// Top-k passages for questions.
    Retrieve(retrieve::Args),
    /// Answer questions with retrieval-augmented generation.
    Ask(ask::Args),
    /// Evaluate retrieval (nDCG, recall, MRR) or QA (EM/F1).
    Eval(eval::Args),
    /// Embed texts with an encoder.
    Embed(embed::Args),
    /// Benchmarks against the Python/C++ peers.
    Bench(bench::Args),
    /// Fine-tune models (RAG).
    Train(train::Args),
    /// Serve retrieval and answers over HTTP (own API, OpenAI-compatible API, web page).
    Serve(serve::Args),
}

pub fn run(cli: Cli) -> Result<()> {
    match cli.command {
        Command::Index(a) => index::run(a, cli.json),
        Command::Retrieve(a) => retrieve::run(a, cli.json),
        Command::Ask(a) => ask::run(a, cli.json),
        Command::Eval(a) => eval::run(a, cli.json),
        Command::Embed(a) => embed::run(a, cli.json),
        Command::Bench(a) => bench::run(a, cli.json),
        Command::Train(a) => train::run(a, cli.json),
        Command::Serve(a) => serve::run(a, cli.json),
    }
}

/// A failed write to standard output (see [`outln!`]).
#[derive(Debug)]
pub struct StdoutError(pub std::io::Error);

impl std::fmt::Display for StdoutError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "writing to standard output: {}", self.0)
    }
}

// No `source()`: the message already carries the I/O error, and `{:#}` would print it twice.
impl std::error::Error for StdoutError {}

impl StdoutError {
    /// The reader of our output went away (`rustrag … | head`): not a failure of the command.
    pub fn is_broken_pipe(&self) -> bool {
        self.0.kind() == std::io::ErrorKind::BrokenPipe
    }
}

/// `s` with its control characters (ANSI escape sequences, carriage returns, …) escaped as
/// `\u{1b}`, for human-readable output: text from questions and passages cannot drive the terminal.
pub fn printable(s: &str) -> std::borrow::Cow<'_, str> {
    if !s.chars().any(char::is_control) {
        return std::borrow::Cow::Borrowed(s);
    }
    let mut out = String::with_capacity(s.len() + 8);
    for c in s.chars() {
        if c.is_control() {
            out.extend(c.escape_default());
        } else {
            out.push(c);
        }
    }
    std::borrow::Cow::Owned(out)
}

/// Flush what is still buffered on stdout, as a [`StdoutError`] on failure.
pub fn flush_stdout() -> Result<()> {
    use std::io::Write as _;
    std::io::stdout().flush().map_err(StdoutError)?;
    Ok(())
}

/// Logs go to stderr through `tracing`; `RUST_LOG` wins over `-v`.
pub fn init_tracing(verbose: u8) {
    let default = match verbose {
        0 => "warn",
        1 => "info",
        _ => "debug",
    };
    let filter = tracing_subscriber::EnvFilter::try_from_default_env()
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new(default));
    let _ = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr)
        .try_init();
}
