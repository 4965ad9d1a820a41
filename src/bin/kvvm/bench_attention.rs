//! `kvvm bench_attention` (being written).

use clap::Args;
use kvvm::{Error, Result};

/// Options.
#[derive(Args, Debug)]
pub struct AttentionArgs {
    /// Print one JSON object.
    #[arg(long)]
    json: bool,
}

pub fn run(args: AttentionArgs) -> Result<()> {
    let _ = args.json;
    Err(Error::Unsupported("not yet implemented".into()))
}
