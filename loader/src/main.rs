//! `sluice-loader`: thin binary; the work lives in the library.

use std::path::PathBuf;
use std::process::ExitCode;

use clap::{Parser, Subcommand, ValueEnum};
use sluice_broker::config::Config;
use sluice_broker::telemetry::{self, LogFormat};

/// Many small, short-lived allocations per row (decoded values, packages):
/// mimalloc frees them far more cheaply than glibc malloc.
#[global_allocator]
static ALLOCATOR: mimalloc::MiMalloc = mimalloc::MiMalloc;

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
    /// Compare the published Postgres tables with their ClickHouse tables
    /// (`FINAL`): exit 0 when equal, 1 when not (or verification failed), 2 on a
    /// config error. Prints one line per table.
    Verify {
        /// Configuration file (TOML); `SLUICE_<SECTION>__<KEY>` variables override it.
        #[arg(long, short, env = "SLUICE_CONFIG")]
        config: PathBuf,
        /// Only this table (`schema.table`); default: every table of the publication.
        #[arg(long)]
        table: Option<String>,
    },
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    telemetry::init_logging(match cli.log_format {
        Format::Text => LogFormat::Text,
        Format::Json => LogFormat::Json,
    });
    let (path, table) = match cli.command {
        Command::Run { config } => (config, None),
        Command::Verify { config, table } => (config, Some(table)),
    };
    let config = match Config::load(&path) {
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
    if let Some(table) = table {
        return runtime.block_on(verify(&config, table.as_deref()));
    }
    match runtime.block_on(sluice_loader::run::run(config)) {
        Ok(()) => ExitCode::SUCCESS,
        Err(error) => {
            eprintln!("sluice-loader: {}", sluice_broker::error_chain(&error));
            ExitCode::from(1)
        }
    }
}

/// `sluice-loader verify`: one line per table on stdout.
async fn verify(config: &Config, table: Option<&str>) -> ExitCode {
    match sluice_loader::verify::verify(config, table).await {
        Ok(reports) => {
            let width = reports.iter().map(|r| r.table.len()).max().unwrap_or(0);
            for report in &reports {
                let line = report.to_string();
                // Align the columns after the table name.
                let rest = &line[report.table.len()..];
                println!("{:width$}{rest}", report.table);
            }
            if reports.iter().all(|r| r.is_equal()) {
                ExitCode::SUCCESS
            } else {
                ExitCode::from(1)
            }
        }
        Err(error) => {
            eprintln!(
                "sluice-loader: verify: {}",
                sluice_broker::error_chain(&error)
            );
            ExitCode::from(1)
        }
    }
}
