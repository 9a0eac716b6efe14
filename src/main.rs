//! The `blockcsi` command: `serve` runs the driver; `ctl`, `doctor` and `bench` are tools for
//! the people who operate it.

use clap::{Parser, Subcommand};
use tracing_subscriber::EnvFilter;

use blockcsi::daemon::config::LogFormat;

#[derive(Parser)]
#[command(
    name = "blockcsi",
    version = concat!(env!("CARGO_PKG_VERSION"), " (commit ", env!("BLOCKCSI_GIT_COMMIT"), ")"),
    about = "CSI block-storage driver: sparse images in a pool, attached as loop devices"
)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Serve CSI over a Unix socket.
    Serve(blockcsi::daemon::config::ServeArgs),
    /// Call a running driver by hand: info, volumes, snapshots.
    Ctl(blockcsi::tools::ctl::CtlArgs),
    /// Check that this machine can run the node plugin.
    Doctor(blockcsi::tools::doctor::DoctorArgs),
    /// Measure the driver against the shell tools and write BENCHMARKS.md (as root).
    Bench(blockcsi::tools::bench::BenchArgs),
}

fn init_logs(filter: &str, format: LogFormat) -> anyhow::Result<()> {
    let builder = tracing_subscriber::fmt()
        .with_env_filter(EnvFilter::try_new(filter)?)
        .with_writer(std::io::stderr);
    match format {
        LogFormat::Text => builder
            .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()))
            .init(),
        // Flattened so collectors find `method`, `volume_id`, `code` at the top level.
        LogFormat::Json => builder
            .json()
            .flatten_event(true)
            .with_current_span(false)
            .init(),
    }
    Ok(())
}

fn main() -> anyhow::Result<()> {
    let cli = Cli::parse();
    match cli.command {
        Command::Serve(args) => {
            let cfg = args.resolve()?;
            init_logs(&cfg.log_level, cfg.log_format)?;
            blockcsi::daemon::server::runtime()?.block_on(blockcsi::daemon::server::serve(cfg))?;
            Ok(())
        }
        Command::Ctl(args) => std::process::exit(blockcsi::tools::ctl::main(args)),
        Command::Doctor(args) => {
            init_logs("warn", LogFormat::Text)?;
            std::process::exit(blockcsi::tools::doctor::main(args))
        }
        Command::Bench(args) => {
            init_logs("warn", LogFormat::Text)?;
            std::process::exit(blockcsi::tools::bench::main(args))
        }
    }
}
