//! `rustrag bench`: benchmarks that run the named peer in the same run and report ratios.

pub mod rag;

use anyhow::Result;

#[derive(clap::Args, Debug)]
pub struct Args {}

pub fn run(_args: Args, _json: bool) -> Result<()> {
    anyhow::bail!("`rustrag bench` is not implemented yet")
}
