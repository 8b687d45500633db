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
    /// Log format on stderr (RUST_LOG filters; default `info` for `run`,
    /// `warn` for the other commands unless `-v`).
    #[arg(long, global = true, value_enum, default_value_t = Format::Text, env = "SLUICE_LOG_FORMAT")]
    log_format: Format,
    /// Log at `info` in the one-shot commands too (`status`, `verify`,
    /// `dead-letters`; without RUST_LOG).
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
        /// Compare only about this share of each table's keys (0 < FRACTION ≤ 1), a
        /// random choice of hash buckets each run; for a quick check of big tables.
        #[arg(long, value_name = "FRACTION", value_parser = parse_fraction)]
        sample: Option<f64>,
    },
    /// Per table the loader knows: state (streaming, resyncing, blocked,
    /// failed) and why,
    /// last applied chain position and commit LSN, last published package;
    /// the consumer's pending and ack-pending counts.
    Status {
        /// Configuration file (TOML); `SLUICE_<SECTION>__<KEY>` variables override it.
        #[arg(long, short, env = "SLUICE_CONFIG")]
        config: PathBuf,
        /// Print JSON instead of text.
        #[arg(long)]
        json: bool,
    },
    /// The dead-letter stream: messages the loader could not apply, with
    /// reason, table, sequence and error (README "Dead letters").
    DeadLetters {
        /// Configuration file (TOML); `SLUICE_<SECTION>__<KEY>` variables override it.
        #[arg(long, short, env = "SLUICE_CONFIG", global = true)]
        config: Option<PathBuf>,
        #[command(subcommand)]
        action: DeadLetterAction,
    },
}

#[derive(Debug, Clone, Subcommand)]
enum DeadLetterAction {
    /// One line per dead letter: its sequence, time, reason, table, sequence
    /// in the data stream and error.
    List {
        /// Print JSON instead of text.
        #[arg(long)]
        json: bool,
    },
    /// One dead letter, with what its payload decodes to (as JSON).
    Show { sequence: u64 },
    /// Writes the rows of dead letters into ClickHouse, once their cause is
    /// fixed; each row keeps its version, so newer data wins. The letters
    /// stay: `purge` removes them.
    Replay {
        #[arg(required = true)]
        sequences: Vec<u64>,
    },
    /// Deletes dead letters from the stream (needs a NATS user allowed to
    /// delete from it, not the loader's own).
    Purge {
        #[arg(required = true)]
        sequences: Vec<u64>,
    },
}

/// `--sample`'s value: a share above 0 and at most 1.
fn parse_fraction(text: &str) -> Result<f64, String> {
    match text.parse::<f64>() {
        Ok(f) if f > 0.0 && f <= 1.0 => Ok(f),
        _ => Err(format!("{text:?} is not a fraction above 0 and at most 1")),
    }
}

/// What `main` does after loading the config.
enum Work {
    Run,
    Verify(Option<String>, sluice_loader::verify::Options),
    Status { json: bool },
    DeadLetters(DeadLetterAction),
}

fn main() -> ExitCode {
    // Failpoints named in FAILPOINTS (test builds with the `failpoints` feature only).
    #[cfg(feature = "failpoints")]
    let _failpoints = fail::FailScenario::setup();
    let cli = Cli::parse();
    let (path, work) = match cli.command {
        Command::Run { config } => (config, Work::Run),
        Command::Verify {
            config,
            table,
            sample,
        } => (
            config,
            Work::Verify(table, sluice_loader::verify::Options { sample }),
        ),
        Command::Status { config, json } => (config, Work::Status { json }),
        Command::DeadLetters { config, action } => match config {
            Some(config) => (config, Work::DeadLetters(action)),
            None => {
                eprintln!("sluice-loader: dead-letters: --config is required");
                return ExitCode::from(2);
            }
        },
    };
    let default_level = match work {
        Work::Run => "info",
        Work::Verify(..) | Work::Status { .. } | Work::DeadLetters(_) if cli.verbose => "info",
        Work::Verify(..) | Work::Status { .. } | Work::DeadLetters(_) => "warn",
    };
    // RUST_LOG if set, else `default_level`: the one-shot commands print
    // their answer on stdout and log only warnings unless `-v`.
    telemetry::init_logging_with_default(
        match cli.log_format {
            Format::Text => LogFormat::Text,
            Format::Json => LogFormat::Json,
        },
        default_level,
    );
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
    match work {
        Work::Run => {}
        Work::Verify(table, options) => {
            return runtime.block_on(verify(&config, table.as_deref(), options));
        }
        Work::Status { json } => return runtime.block_on(status(&config, json)),
        Work::DeadLetters(action) => return runtime.block_on(dead_letters(&config, action)),
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
async fn verify(
    config: &Config,
    table: Option<&str>,
    options: sluice_loader::verify::Options,
) -> ExitCode {
    match sluice_loader::verify::verify_with(config, table, options).await {
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

/// `sluice-loader dead-letters …`: output on stdout, errors on stderr, exit 1
/// when any action failed.
async fn dead_letters(config: &Config, action: DeadLetterAction) -> ExitCode {
    use sluice_loader::dead_letters as dl;
    let fail = |error: dl::DeadLetterError| {
        eprintln!(
            "sluice-loader: dead-letters: {}",
            sluice_broker::error_chain(&error)
        );
        ExitCode::from(1)
    };
    match action {
        DeadLetterAction::List { json } => match dl::list(config).await {
            Ok(letters) if json => print_json(&letters),
            Ok(letters) => {
                print!("{}", dl::render_list(&letters));
                ExitCode::SUCCESS
            }
            Err(error) => fail(error),
        },
        DeadLetterAction::Show { sequence } => match dl::show(config, sequence).await {
            Ok(letter) => print_json(&letter),
            Err(error) => fail(error),
        },
        DeadLetterAction::Replay { sequences } => {
            let mut code = ExitCode::SUCCESS;
            for sequence in sequences {
                match dl::replay(config, sequence).await {
                    Ok((table, rows)) => {
                        println!("dead letter {sequence}: {rows} rows of {table} written");
                    }
                    Err(error) => code = fail(error),
                }
            }
            code
        }
        DeadLetterAction::Purge { sequences } => {
            let mut code = ExitCode::SUCCESS;
            for sequence in sequences {
                match dl::purge(config, sequence).await {
                    Ok(()) => println!("dead letter {sequence} deleted"),
                    Err(error) => code = fail(error),
                }
            }
            code
        }
    }
}

/// `value` as pretty JSON on stdout.
fn print_json(value: &impl serde::Serialize) -> ExitCode {
    match serde_json::to_string_pretty(value) {
        Ok(text) => {
            println!("{text}");
            ExitCode::SUCCESS
        }
        Err(error) => {
            eprintln!("sluice-loader: {error}");
            ExitCode::from(1)
        }
    }
}

/// `sluice-loader status`: text or (`--json`) JSON on stdout.
async fn status(config: &Config, json: bool) -> ExitCode {
    match sluice_loader::status::gather(config).await {
        Ok(status) if json => match serde_json::to_string_pretty(&status) {
            Ok(text) => {
                println!("{text}");
                ExitCode::SUCCESS
            }
            Err(error) => {
                eprintln!("sluice-loader: status: {error}");
                ExitCode::from(1)
            }
        },
        Ok(status) => {
            print!("{}", sluice_loader::status::render_text(&status));
            ExitCode::SUCCESS
        }
        Err(error) => {
            eprintln!(
                "sluice-loader: status: {}",
                sluice_broker::error_chain(&error)
            );
            ExitCode::from(1)
        }
    }
}
