//! `sluice-replicator`: thin binary; the work lives in the library.

use std::path::PathBuf;
use std::process::ExitCode;

use clap::{Args, Parser, Subcommand, ValueEnum};
use sluice_broker::config::Config;
use sluice_broker::telemetry::{self, LogFormat};

/// Many small, short-lived allocations per row (decoded values, packages):
/// mimalloc frees them far more cheaply than glibc malloc.
#[global_allocator]
static ALLOCATOR: mimalloc::MiMalloc = mimalloc::MiMalloc;

/// Postgres logical replication (pgoutput) into NATS JetStream, with nothing lost.
#[derive(Debug, Parser)]
#[command(name = "sluice-replicator", version, about, long_about = None)]
struct Cli {
    /// Log format on stderr (RUST_LOG filters; without it `run` logs at
    /// `info`, `status` and `resync` only warnings).
    #[arg(long, global = true, value_enum, default_value_t = Format::Text, env = "SLUICE_LOG_FORMAT")]
    log_format: Format,
    /// Log at `info` in `status` and `resync` too (without RUST_LOG).
    #[arg(long, short, global = true)]
    verbose: bool,
    #[command(subcommand)]
    command: Command,
}

#[derive(Debug, Clone, Copy, ValueEnum)]
enum Format {
    Text,
    Json,
}

#[derive(Debug, Args)]
struct ConfigArg {
    /// Configuration file (TOML); `SLUICE_<SECTION>__<KEY>` variables override it.
    #[arg(long, short, env = "SLUICE_CONFIG")]
    config: PathBuf,
}

#[derive(Debug, Subcommand)]
enum Command {
    /// Replicate: create the slot and snapshot on first start, then stream
    /// changes until SIGINT/SIGTERM.
    Run {
        #[command(flatten)]
        config: ConfigArg,
    },
    /// Ask the running replicator to resync tables (full snapshot into a
    /// shadow table, swapped in atomically by the loader).
    Resync {
        #[command(flatten)]
        config: ConfigArg,
        /// Table to resync, `schema.table`; repeat for several.
        #[arg(
            long = "table",
            value_name = "SCHEMA.TABLE",
            required_unless_present = "all"
        )]
        tables: Vec<String>,
        /// Resync every published table.
        #[arg(long, conflicts_with = "tables")]
        all: bool,
        /// Return as soon as the replicator accepted the request.
        #[arg(long)]
        no_wait: bool,
    },
    /// Show slot, stream, consumer and per published table its state
    /// (snapshotting, streaming, resyncing, failed), last published position
    /// and lag.
    Status {
        #[command(flatten)]
        config: ConfigArg,
        /// Print JSON instead of text.
        #[arg(long)]
        json: bool,
    },
}

fn main() -> ExitCode {
    // Failpoints named in FAILPOINTS (test builds with the `failpoints` feature only).
    #[cfg(feature = "failpoints")]
    let _failpoints = fail::FailScenario::setup();
    let cli = Cli::parse();
    // RUST_LOG if set, else this level: the one-shot commands print their
    // answer on stdout and log only warnings unless `-v`.
    let default_level = match cli.command {
        Command::Run { .. } => "info",
        Command::Resync { .. } | Command::Status { .. } if cli.verbose => "info",
        Command::Resync { .. } | Command::Status { .. } => "warn",
    };
    telemetry::init_logging_with_default(
        match cli.log_format {
            Format::Text => LogFormat::Text,
            Format::Json => LogFormat::Json,
        },
        default_level,
    );
    let config = match &cli.command {
        Command::Run { config }
        | Command::Resync { config, .. }
        | Command::Status { config, .. } => match load(config) {
            Ok(config) => config,
            Err(failure) => return exit(failure),
        },
    };
    let mut builder = tokio::runtime::Builder::new_multi_thread();
    if let Some(threads) = sluice_replicator::run::runtime_threads(
        config.replicator.worker_threads,
        std::thread::available_parallelism().ok().map(usize::from),
        std::env::var_os("TOKIO_WORKER_THREADS").is_some(),
    ) {
        builder.worker_threads(threads);
    }
    let runtime = match builder.enable_all().build() {
        Ok(runtime) => runtime,
        Err(error) => {
            eprintln!("sluice-replicator: cannot start the async runtime: {error}");
            return ExitCode::from(1);
        }
    };
    match runtime.block_on(try_main(cli.command, config)) {
        Ok(()) => ExitCode::SUCCESS,
        Err(failure) => exit(failure),
    }
}

fn exit(failure: Failure) -> ExitCode {
    match failure {
        Failure::Config(error) => {
            eprintln!("sluice-replicator: {error}");
            ExitCode::from(2)
        }
        Failure::Runtime(error) => {
            eprintln!("sluice-replicator: {error:#}");
            ExitCode::from(1)
        }
    }
}

enum Failure {
    Config(sluice_broker::config::ConfigError),
    Runtime(anyhow::Error),
}

impl<E: Into<anyhow::Error>> From<E> for Failure {
    fn from(error: E) -> Self {
        Failure::Runtime(error.into())
    }
}

fn load(arg: &ConfigArg) -> Result<Config, Failure> {
    Config::load(&arg.config).map_err(Failure::Config)
}

async fn try_main(command: Command, config: Config) -> Result<(), Failure> {
    match command {
        Command::Run { .. } => {
            sluice_replicator::run::run(config).await?;
        }
        Command::Resync {
            tables,
            all,
            no_wait,
            ..
        } => {
            sluice_replicator::control::request_resync(&config, &tables, all, !no_wait).await?;
        }
        Command::Status { json, .. } => {
            sluice_replicator::status::print(&config, json).await?;
        }
    }
    Ok(())
}
