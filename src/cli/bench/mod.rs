//! `rustrag bench`: each benchmark runs rustrag and the named peer (a Python script under
//! `bench/peers/`) in the same run on the same inputs, and reports the ratio. Both sides run on the
//! same number of threads (`--threads`: rustrag's rayon pool, the peer's torch / faiss / llama.cpp
//! threads); a ratio is reported only where the outputs match. Nothing here asserts timings.

pub mod decode;
pub mod encode;
pub mod rag;
pub mod retrieval;
pub mod train;

use anyhow::{bail, Context, Result};
use std::path::{Path, PathBuf};

#[derive(clap::Args, Debug)]
pub struct Args {
    #[command(subcommand)]
    pub which: Which,
    /// Python interpreter that has the peer's packages (torch, sentence-transformers, llama-cpp-python, faiss-cpu).
    #[arg(
        long,
        env = "RUSTRAG_BENCH_PYTHON",
        default_value = "python3",
        global = true
    )]
    pub python: String,
    /// Directory of the peer scripts.
    #[arg(long, default_value = "bench/peers", global = true)]
    pub peers: PathBuf,
    /// Skip the peer (report rustrag alone).
    #[arg(long, global = true)]
    pub no_peer: bool,
    /// Threads on both sides: rustrag's rayon pool and the peer's (torch.set_num_threads,
    /// faiss.omp_set_num_threads, llama.cpp n_threads / n_threads_batch). Default: every core.
    #[arg(long, global = true)]
    pub threads: Option<usize>,
}

#[derive(clap::Subcommand, Debug)]
pub enum Which {
    /// Sentence-encoder throughput vs sentence-transformers (PyTorch CPU).
    Encode(encode::Args),
    /// GGUF greedy decode tokens/s vs llama.cpp (llama-cpp-python), same file and prompt.
    Decode(decode::Args),
    /// Exact and HNSW inner-product search vs faiss-cpu (IndexFlatIP, IndexHNSWFlat).
    Retrieval(retrieval::RetrievalArgs),
    /// RAG-Token beam / RAG-Sequence thorough generate vs HF transformers (PyTorch CPU).
    Rag(rag::Args),
    /// One RAG training step of a decoder-only generator vs PyTorch + transformers.
    Train(train::Args),
}

pub fn run(args: Args, json: bool) -> Result<()> {
    let threads = pin_threads(args.threads)?;
    let peer = (!args.no_peer).then(|| Peer {
        python: args.python.clone(),
        dir: args.peers.clone(),
        threads,
    });
    let report = match args.which {
        Which::Encode(a) => encode::run(a, peer.as_ref())?,
        Which::Decode(a) => decode::run(a, peer.as_ref())?,
        Which::Rag(a) => rag::run(a, peer.as_ref())?,
        Which::Train(a) => train::run(a, peer.as_ref())?,
        Which::Retrieval(a) => {
            let peer = peer.context("the retrieval benchmark needs its faiss peer")?;
            return retrieval::run(a, &peer, json);
        }
    };
    if json {
        outln!("{}", serde_json::to_string_pretty(&report)?);
    } else {
        print_report(&report)?;
    }
    Ok(())
}

/// Size rayon's global pool (every parallel loop of rustrag, GEMMs included) to `threads`, or
/// to every core; returns the count, which the peers get too.
fn pin_threads(threads: Option<usize>) -> Result<usize> {
    let n = match threads {
        Some(0) => bail!("--threads must be at least 1"),
        Some(n) => n,
        None => std::thread::available_parallelism().map_or(1, |n| n.get()),
    };
    // Candle's CPU ops size their own loops from this variable.
    std::env::set_var("RAYON_NUM_THREADS", n.to_string());
    if rayon::ThreadPoolBuilder::new()
        .num_threads(n)
        .build_global()
        .is_err()
        && rayon::current_num_threads() != n
    {
        bail!(
            "rayon's pool already runs {} threads, not {n}",
            rayon::current_num_threads()
        );
    }
    Ok(n)
}

/// How to run a peer script.
pub struct Peer {
    pub python: String,
    pub dir: PathBuf,
    /// Passed to every peer as `--threads`.
    pub threads: usize,
}

impl Peer {
    /// Run `dir/script args...`; the script prints one JSON object on its last stdout line.
    pub fn run(&self, script: &str, args: &[String]) -> Result<serde_json::Value> {
        let path = self.dir.join(script);
        if !path.is_file() {
            bail!(
                "peer script {} not found (run from the repository root or pass --peers)",
                path.display()
            );
        }
        tracing::info!(peer = %path.display(), "running peer");
        let out = std::process::Command::new(&self.python)
            .arg(&path)
            .args(args)
            .args(["--threads", &self.threads.to_string()])
            .output()
            .with_context(|| format!("starting `{} {}`", self.python, path.display()))?;
        if !out.status.success() {
            bail!(
                "peer {} failed ({}): {}",
                path.display(),
                out.status,
                String::from_utf8_lossy(&out.stderr)
                    .lines()
                    .rev()
                    .take(15)
                    .collect::<Vec<_>>()
                    .join("\n")
            );
        }
        let stdout = String::from_utf8_lossy(&out.stdout);
        let last = stdout
            .lines()
            .rev()
            .find(|l| l.trim_start().starts_with('{'))
            .unwrap_or("");
        serde_json::from_str(last)
            .with_context(|| format!("peer {} printed no JSON result: {stdout}", path.display()))
    }
}

/// A benchmark result: rustrag's and the peer's measurements and `ours / peer` speed ratios.
#[derive(serde::Serialize, Debug)]
pub struct Report {
    pub benchmark: String,
    pub setup: serde_json::Value,
    pub rustrag: serde_json::Value,
    pub peer: Option<serde_json::Value>,
    /// Named ratios, > 1 means rustrag is faster.
    pub ratios: Vec<(String, f64)>,
}

fn print_report(r: &Report) -> Result<()> {
    outln!("benchmark: {}", r.benchmark);
    outln!("setup:     {}", r.setup);
    outln!("rustrag:   {}", r.rustrag);
    if let Some(p) = &r.peer {
        outln!("peer:      {p}");
    }
    for (name, ratio) in &r.ratios {
        outln!("ratio {name}: {ratio:.2}x");
    }
    Ok(())
}

/// Write one JSON string per line (the peers' input format).
pub fn write_texts(path: &Path, texts: &[String]) -> Result<()> {
    let mut s = String::new();
    for t in texts {
        s.push_str(&serde_json::to_string(t)?);
        s.push('\n');
    }
    std::fs::write(path, s).with_context(|| format!("writing {}", path.display()))
}
