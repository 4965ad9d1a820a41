//! `kvvm bench_swap` (being written).

use clap::Args;
use kvvm::{Error, Result};

/// Options.
#[derive(Args, Debug)]
pub struct SwapArgs {
    /// Print one JSON object.
    #[arg(long)]
    json: bool,
}

pub fn run(args: SwapArgs) -> Result<()> {
    let _ = args.json;
    Err(Error::Unsupported("not yet implemented".into()))
}
