//! Redraw `metrics.png` of a `rustrag train rag` run from its `metrics.jsonl` (a run stopped by a
//! signal has its metrics but not its plot):
//!
//! cargo run --release --example plot_run -- RUN_DIR

use anyhow::{Context, Result};
use rustrag::train::plot::plot_metrics;
use rustrag::train::rag::read_metrics;
use std::path::PathBuf;

fn main() -> Result<()> {
    let dir = PathBuf::from(std::env::args().nth(1).context("usage: plot_run RUN_DIR")?);
    let lines = read_metrics(&dir.join("metrics.jsonl"))?;
    let png = dir.join("metrics.png");
    plot_metrics(&lines, &png)?;
    println!("{}", png.display());
    Ok(())
}
