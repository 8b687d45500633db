//! Metric names of the loader (listed with their meaning and alerts in the
//! README), and their registration at 0.
//!
//! Prometheus' `increase()` cannot see the first event of a counter that
//! did not exist before it (the series appears at 1, with no earlier
//! sample), so every counter is exported at 0 before its first event:
//! [`counters_at_zero`] at start-up, for the unlabelled ones and those
//! labelled by a fixed set (`reason`); [`table_counters_at_zero`] as soon as
//! the loader knows a table (its row in `_sluice_positions` at start-up, or
//! its first package), for those labelled by `table` (with every `op` and
//! `kind`). `sluice_value_clamped_total{table,column}` is the exception: its
//! columns are not a fixed set, so it appears with its first clamp.

use metrics::counter;
use sluice_broker::TableName;

use crate::clickhouse::{OpCounts, SchemaDrift};

/// Now minus the commit time of the newest change applied (or heartbeat seen
/// once everything before it was applied), by `table` (gauge).
pub const LOADER_LAG_SECONDS: &str = "sluice_loader_lag_seconds";
/// Messages of the consumer not yet delivered to the loader (gauge).
pub const PENDING_MESSAGES: &str = "sluice_loader_pending_messages";
/// Rows written to ClickHouse, by `table` and `op` (insert, update, delete, snapshot) (counter).
pub const LOADED_ROWS: &str = "sluice_loaded_rows_total";
/// Rows per fetched batch (histogram).
pub const BATCH_ROWS: &str = "sluice_loader_batch_rows";
/// Duration of one INSERT into ClickHouse, in seconds (histogram).
pub const INSERT_SECONDS: &str = "sluice_clickhouse_insert_seconds";
/// Breaks in a table's chain, by `table` (counter).
pub const GAPS_DETECTED: &str = "sluice_gaps_detected_total";
/// Messages moved to the dead-letter subject, by `reason` (counter).
pub const DEAD_LETTERS: &str = "sluice_dead_letters_total";
/// Every `reason` label of [`DEAD_LETTERS`].
pub const DEAD_LETTER_REASONS: [&str; 3] = ["decode", "unpositioned", "insert"];
/// Values clamped to ClickHouse's range, by `table` and `column` (counter).
pub const VALUE_CLAMPED: &str = "sluice_value_clamped_total";
/// Schema differences ADD COLUMN cannot repair, by `table` and `kind` (counter).
pub const SCHEMA_DRIFT: &str = "sluice_schema_drift_total";
/// 1 while a table waits for a resync after a gap, by `table` (gauge).
pub const TABLE_BLOCKED: &str = "sluice_loader_table_blocked";
/// 1 while a table is failed: rows ClickHouse refused were refused again by
/// the resync meant to repair them; it waits for an operator's resync, by
/// `table` (gauge).
pub const TABLE_FAILED: &str = "sluice_loader_table_failed";
/// Batches retried after a transient ClickHouse or NATS failure (counter).
pub const BATCH_RETRIES: &str = "sluice_loader_batch_retries_total";
/// Resyncs swapped in (shadow table exchanged), by `table` (counter).
pub const RESYNCS_COMPLETED: &str = "sluice_loader_resyncs_completed_total";

/// Tables whose lease this loader holds: the tables it applies (gauge).
pub const TABLES_HELD: &str = "sluice_loader_tables_held";
/// Loaders of the source this loader takes for alive, itself included (gauge).
pub const LOADERS_LIVE: &str = "sluice_loader_live_loaders";

/// Registers the counters without a `table` label at 0 (idempotent: an
/// existing counter keeps its value).
pub fn counters_at_zero() {
    counter!(BATCH_RETRIES).increment(0);
    for reason in DEAD_LETTER_REASONS {
        counter!(DEAD_LETTERS, "reason" => reason).increment(0);
    }
}

/// Registers the counters labelled by `table` at 0 for `table`, with every
/// value of their other fixed label (idempotent).
pub fn table_counters_at_zero(table: &TableName) {
    let label = table.to_string();
    counter!(GAPS_DETECTED, "table" => label.clone()).increment(0);
    counter!(RESYNCS_COMPLETED, "table" => label.clone()).increment(0);
    for op in OpCounts::NAMES {
        counter!(LOADED_ROWS, "table" => label.clone(), "op" => op).increment(0);
    }
    for kind in SchemaDrift::KINDS {
        counter!(SCHEMA_DRIFT, "table" => label.clone(), "kind" => kind).increment(0);
    }
}
