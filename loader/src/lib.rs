//! sluice loader: consumes a source's JetStream stream in batches and applies
//! the packages to ClickHouse, idempotently and gap-aware.
//!
//! Modules:
//! - [`clickhouse`]: type mapping, schema management and RowBinary inserts.

pub mod clickhouse;
