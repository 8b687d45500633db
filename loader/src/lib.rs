//! sluice loader: consumes a source's JetStream stream in batches and applies
//! the packages to ClickHouse, idempotently and gap-aware.
//!
//! Modules:
//! - [`run`]: wiring: consumer, batch loop, retries, shutdown.
//! - [`share`]: how the loaders of one source divide its tables (leases in a NATS KV bucket).
//! - [`apply`]: what a batch does to ClickHouse (inserts, truncate, resync swap, dead letters).
//! - [`chain`]: gap detection per table chain.
//! - [`error`]: the loader's error types.
//! - [`recovery`]: what the loader does about each error (retry, resync a table, stop).
//! - [`positions`]: the loader's applied positions, stored in ClickHouse.
//! - [`clickhouse`]: type mapping, schema management and RowBinary inserts.
//! - [`verify`]: `sluice-loader verify`, Postgres compared with ClickHouse.
//! - [`status`]: `sluice-loader status`, each table's state and position.
//! - [`dead_letters`]: `sluice-loader dead-letters`, the dead-letter stream listed, shown, replayed, purged.

pub mod apply;
pub mod chain;
pub mod clickhouse;
pub mod dead_letters;
pub mod error;
pub mod metrics;
pub mod positions;
pub mod recovery;
pub mod run;
pub mod share;
pub mod status;
pub mod verify;

/// A failpoint's crash: exits at once, as a kill would stop the loader (no
/// acks, no positions written, nothing flushed). Only built with the
/// `failpoints` feature and only reached when `FAILPOINTS` names the point
/// (`integration/tests/crash_points.rs`).
#[cfg(feature = "failpoints")]
pub(crate) fn crash_here<T>() -> T {
    eprintln!("failpoint: exiting");
    std::process::exit(86)
}
