//! `sluice-loader`: thin binary; the work lives in the library.

use std::path::PathBuf;
use std::process::ExitCode;

use clap::{Parser, Subcommand, ValueEnum};
use sluice_broker::config::Config;
use sluice_broker::telemetry::{self, LogFormat};

/// NATS JetStream into ClickHouse in batches: idempotent, gap-aware.
#[derive(Debug, Parser)]
#[command(name = "sluice-loader", version, about, long_about = None)]
struct Cli {
    /// Log format on stderr (RUST_LOG filters, default `info`).
    #[arg(long, global = true, value_enum, default_value_t = Format::Text, env = "SLUICE_LOG_FORMAT")]
    log_format: Format,
    #[command(subcommand)]
    command: Command,
}

#[derive(Debug, Clone, Copy, ValueEnum)]
enum Format {
    Text,
    Json,
}

#[derive(Debug, Subcommand)]
enum Command {
    /// Consume the source's stream into ClickHouse until SIGINT/SIGTERM.
    Run {
        /// Configuration file (TOML); `SLUICE_<SECTION>__<KEY>` variables override it.
        #[arg(long, short, env = "SLUICE_CONFIG")]
        config: PathBuf,
    },
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    telemetry::init_logging(match cli.log_format {
        Format::Text => LogFormat::Text,
        Format::Json => LogFormat::Json,
    });
    let Command::Run { config } = cli.command;
    let config = match Config::load(&config) {
        Ok(config) => config,
        Err(error) => {
            eprintln!("sluice-loader: {error}");
            return ExitCode::from(2);
        }
    };
    let runtime = match tokio::runtime::Runtime::new() {
        Ok(runtime) => runtime,
        Err(error) => {
            eprintln!("sluice-loader: cannot start the async runtime: {error}");
            return ExitCode::from(1);
        }
    };
    match runtime.block_on(sluice_loader::run::run(config)) {
        Ok(()) => ExitCode::SUCCESS,
        Err(error) => {
            eprintln!("sluice-loader: {}", sluice_broker::error_chain(&error));
            ExitCode::from(1)
        }
    }
}
