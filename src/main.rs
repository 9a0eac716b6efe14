//! The `blockcsi` command: `serve` runs the driver.

use clap::{Parser, Subcommand};
use tracing_subscriber::EnvFilter;

#[derive(Parser)]
#[command(
    name = "blockcsi",
    version,
    about = "CSI block-storage driver: sparse images in a pool, attached as loop devices"
)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Serve CSI over a Unix socket.
    Serve(blockcsi::config::ServeArgs),
}

fn main() -> anyhow::Result<()> {
    let cli = Cli::parse();
    match cli.command {
        Command::Serve(args) => {
            let cfg = args.resolve()?;
            tracing_subscriber::fmt()
                .with_env_filter(EnvFilter::try_new(&cfg.log_level)?)
                .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()))
                .with_writer(std::io::stderr)
                .init();
            let rt = tokio::runtime::Builder::new_multi_thread()
                .enable_all()
                .build()?;
            rt.block_on(blockcsi::server::serve(cfg))?;
            Ok(())
        }
    }
}
