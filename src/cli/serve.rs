//! `rustrag serve`: parses flags into a [`ServeConfig`] and runs [`rustrag::serve::serve`].
//! Unset flags keep the config's documented defaults.

use anyhow::Result;
use rustrag::rag::pipeline::{RetrieverKind, WeightsChoice};
use rustrag::serve::ServeConfig;
use std::net::SocketAddr;
use std::path::PathBuf;

#[derive(clap::Args, Debug)]
pub struct Args {
    /// Knowledge base built by `rustrag index build` (a new generation is picked up live).
    #[arg(long)]
    pub kb: PathBuf,
    /// Decoder-only generator: GGUF file (e.g. SmolLM2) or a `rustrag train` directory.
    #[arg(long)]
    pub generator: PathBuf,
    /// Address to listen on (port 0: a free one, printed). Default 127.0.0.1:8080.
    #[arg(long)]
    pub addr: Option<SocketAddr>,
    /// `dense`, `bm25` or `hybrid` (default).
    #[arg(long, value_parser = ["dense", "bm25", "hybrid"])]
    pub retriever: Option<String>,
    /// GGUF weights: `f32` (default, most faithful) or `quantized` (fastest).
    #[arg(long, value_parser = ["f32", "quantized"])]
    pub gguf_weights: Option<String>,
    /// τ of the doc prior (default: the KB manifest's).
    #[arg(long)]
    pub prior_temperature: Option<f64>,
    /// Questions decoded together (default 4).
    #[arg(long)]
    pub batch_size: Option<usize>,
    /// Requests admitted at once before 503 (default 64).
    #[arg(long)]
    pub queue_capacity: Option<usize>,
    /// Batching window in ms (default 5).
    #[arg(long)]
    pub batch_window_ms: Option<u64>,
    /// Per-request timeout in seconds (default 120).
    #[arg(long)]
    pub request_timeout_s: Option<u64>,
    /// Largest request body in bytes (default 65536).
    #[arg(long)]
    pub max_body_bytes: Option<usize>,
    /// Most documents per question (default 20).
    #[arg(long)]
    pub max_n_docs: Option<usize>,
    /// Most generated tokens per request (default 256).
    #[arg(long)]
    pub max_new_tokens: Option<usize>,
    /// How often the KB's CURRENT generation is checked, ms (default 1000).
    #[arg(long)]
    pub kb_poll_ms: Option<u64>,
    /// Seconds between re-checks of the served KB's block checksums (default 21600 = 6 hours;
    /// 0: off).
    #[arg(long)]
    pub kb_scrub_interval_s: Option<u64>,
}

pub fn run(a: Args, json: bool) -> Result<()> {
    let mut c = ServeConfig {
        kb: a.kb,
        generator: a.generator,
        ..Default::default()
    };
    set(&mut c.addr, a.addr);
    if let Some(r) = &a.retriever {
        c.pipeline.retriever = r.parse::<RetrieverKind>()?;
    }
    if let Some(w) = &a.gguf_weights {
        c.pipeline.gguf_weights = match w.as_str() {
            "quantized" => WeightsChoice::Quantized,
            _ => WeightsChoice::F32,
        };
    }
    c.pipeline.prior_temperature = a.prior_temperature;
    set(&mut c.pipeline.batch_size, a.batch_size);
    set(&mut c.queue_capacity, a.queue_capacity);
    set(&mut c.batch_window_ms, a.batch_window_ms);
    set(&mut c.request_timeout_s, a.request_timeout_s);
    set(&mut c.max_body_bytes, a.max_body_bytes);
    set(&mut c.max_n_docs, a.max_n_docs);
    set(&mut c.max_new_tokens, a.max_new_tokens);
    set(&mut c.kb_poll_ms, a.kb_poll_ms);
    set(&mut c.kb_scrub_interval_s, a.kb_scrub_interval_s);
    rustrag::serve::serve(c, |addr| {
        // The one line a script waits for (stdout); logs go to stderr.
        let line = match json {
            true => serde_json::json!({"listening": format!("http://{addr}")}).to_string(),
            false => format!("listening on http://{addr}"),
        };
        use std::io::Write as _;
        let mut out = std::io::stdout().lock();
        let _ = writeln!(out, "{line}");
        let _ = out.flush();
    })
}

/// `slot = v` when the flag was given.
fn set<T>(slot: &mut T, v: Option<T>) {
    if let Some(v) = v {
        *slot = v;
    }
}
