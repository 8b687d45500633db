//! Metric names of the loader (listed with their meaning and alerts in the README).

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
/// Values clamped to ClickHouse's range, by `table` and `column` (counter).
pub const VALUE_CLAMPED: &str = "sluice_value_clamped_total";
/// Schema differences ADD COLUMN cannot repair, by `table` and `kind` (counter).
pub const SCHEMA_DRIFT: &str = "sluice_schema_drift_total";
/// 1 while a table waits for a resync after a gap, by `table` (gauge).
pub const TABLE_BLOCKED: &str = "sluice_loader_table_blocked";
/// Batches retried after a transient ClickHouse or NATS failure (counter).
pub const BATCH_RETRIES: &str = "sluice_loader_batch_retries_total";
/// Resyncs swapped in (shadow table exchanged), by `table` (counter).
pub const RESYNCS_COMPLETED: &str = "sluice_loader_resyncs_completed_total";
