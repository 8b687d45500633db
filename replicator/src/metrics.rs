//! Metric names of the replicator. Every one is listed in the README with its
//! meaning and the alert to set on it. Labels stay low-cardinality: a table,
//! an operation, a reason — never a row.

/// Server WAL end minus the slot's confirmed flush LSN, in bytes (gauge).
pub const SLOT_LAG_BYTES: &str = "sluice_replication_slot_lag_bytes";
/// Now minus the commit time of the newest transaction acknowledged by the stream (gauge).
pub const REPLICATOR_LAG_SECONDS: &str = "sluice_replicator_lag_seconds";
/// Rows published, by `table` and `op` (insert, update, delete, snapshot) (counter).
pub const PUBLISHED_ROWS: &str = "sluice_published_rows_total";
/// Packages acknowledged by the stream (counter).
pub const PUBLISHED_PACKAGES: &str = "sluice_published_packages_total";
/// Packages JetStream reported as duplicates of an earlier `Nats-Msg-Id` (counter).
pub const PUBLISH_DUPLICATES: &str = "sluice_publish_duplicates_total";
/// Rows read by snapshots, by `table` (counter).
pub const SNAPSHOT_ROWS: &str = "sluice_snapshot_rows_total";
/// 1 while a table's snapshot/resync runs, by `table` (gauge).
pub const RESYNC_IN_PROGRESS: &str = "sluice_resync_in_progress";
/// Resyncs started, by `table` and `reason` (initial, manual, gap, slot_lost) (counter).
pub const RESYNCS: &str = "sluice_resyncs_total";
/// 1 while the backlog is read through SQL, 0 while streaming (gauge).
pub const CATCHING_UP: &str = "sluice_replicator_catching_up";
/// LSN last confirmed to Postgres, as a number (gauge).
pub const CONFIRMED_LSN: &str = "sluice_replicator_confirmed_lsn";
/// Reconnects after transient errors, by `reason` (counter).
pub const RECONNECTS: &str = "sluice_replicator_reconnects_total";
/// Tables skipped because they cannot be replicated (no replica identity), by `table` (gauge).
pub const TABLE_ERRORS: &str = "sluice_replicator_table_errors";
/// Values that did not parse as their Postgres type and were sent as text, by `table` (counter).
pub const VALUE_DECODE_ERRORS: &str = "sluice_value_decode_errors_total";
