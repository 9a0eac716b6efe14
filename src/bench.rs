//! `blockcsi bench`.
#[derive(Debug, clap::Args)]
pub struct BenchArgs {}
pub fn main(_args: BenchArgs) -> i32 { 0 }
