//! `rustrag embed`.

use anyhow::Result;

#[derive(clap::Args, Debug)]
pub struct Args {}

pub fn run(_args: Args, _json: bool) -> Result<()> {
    anyhow::bail!("`rustrag embed` is not implemented yet")
}
