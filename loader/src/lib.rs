//! sluice loader: consumes a source's JetStream stream in batches and applies
//! the packages to ClickHouse, idempotently and gap-aware.
//!
//! Modules:
//! - [`chain`]: gap detection per table chain.
//! - [`clickhouse`]: type mapping, schema management and RowBinary inserts.

pub mod chain;
pub mod clickhouse;
