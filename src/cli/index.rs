//! `rustrag index`.

use anyhow::Result;

#[derive(clap::Args, Debug)]
pub struct Args {}

pub fn run(_args: Args, _json: bool) -> Result<()> {
    anyhow::bail!("`rustrag index` is not implemented yet")
}
