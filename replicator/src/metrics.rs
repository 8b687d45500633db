//! Metric names of the replicator. Every one is listed in the README with its
//! meaning and the alert to set on it. Labels stay low-cardinality: a table,
//! an operation, a reason — never a row.
//!
//! Every counter exists at 0 before its first event ([`counters_at_zero`] at
//! start-up, [`table_series_at_zero`] for each published table), so that
//! Prometheus' `increase()` sees that event.

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
/// Snapshot chunks (page ranges of a table, `replicator.snapshot_chunk_pages`)
/// read to their end, by `table` (counter).
pub const SNAPSHOT_CHUNKS: &str = "sluice_snapshot_chunks_total";
/// Rows the table's latest snapshot expects (Postgres' estimate, `reltuples`;
/// a partitioned table's leaves summed), by `table` (gauge).
pub const SNAPSHOT_ROWS_ESTIMATED: &str = "sluice_snapshot_rows_estimated";
/// 1 while a table's snapshot/resync runs, by `table` (gauge).
pub const RESYNC_IN_PROGRESS: &str = "sluice_resync_in_progress";
/// Resyncs started, by `table` and `reason` (initial, manual, slot_lost,
/// added, not_in_stream, publication_changed, partitions_changed; and as
/// the loader asks: gap, refused, schema_change, target_missing, stalled)
/// (counter).
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

/// Bytes of streamed, still running transactions held in the replicator's
/// spill files (`replicator.spill_dir`) (gauge).
pub const STREAMED_SPILL_BYTES: &str = "sluice_replicator_streamed_spill_bytes";
/// Transactions Postgres streamed before their end, by `outcome` (commit,
/// abort) (counter).
pub const STREAMED_TRANSACTIONS: &str = "sluice_replicator_streamed_transactions_total";

/// Values of the `op` label of [`PUBLISHED_ROWS`].
pub const OPS: [&str; 4] = ["insert", "update", "delete", "snapshot"];
/// Values of the `reason` label of [`RESYNCS`] (a resync request may name
/// another reason; these are the ones sluice itself uses).
pub const RESYNC_REASONS: [&str; 12] = [
    "initial",
    "manual",
    "gap",
    "slot_lost",
    "added",
    "not_in_stream",
    "publication_changed",
    "partitions_changed",
    "refused",
    "schema_change",
    "target_missing",
    "stalled",
];
/// Values of the `reason` label of [`RECONNECTS`].
pub const RECONNECT_REASONS: [&str; 3] = ["postgres", "nats", "slot_busy"];

/// Makes the counters without a table label exist at 0, at start-up:
/// Prometheus' `increase()` misses the first event of a series that appears
/// at 1.
pub fn counters_at_zero() {
    metrics::counter!(PUBLISHED_PACKAGES).increment(0);
    metrics::counter!(PUBLISH_DUPLICATES).increment(0);
    for outcome in ["commit", "abort"] {
        metrics::counter!(STREAMED_TRANSACTIONS, "outcome" => outcome).increment(0);
    }
    metrics::gauge!(STREAMED_SPILL_BYTES).set(0.0);
    for reason in RECONNECT_REASONS {
        metrics::counter!(RECONNECTS, "reason" => reason).increment(0);
    }
}

/// Makes every series labelled by `table` exist, as soon as the replicator
/// knows the table is published: its counters at 0 (every `op` and resync
/// `reason`; a counter that exists keeps its value), and the gauges
/// [`RESYNC_IN_PROGRESS`] and [`TABLE_ERRORS`] set to 0 (no resync runs when
/// the tables are read at start-up or a new table appears; the caller sets
/// [`TABLE_ERRORS`] to 1 for a table it cannot replicate).
pub fn table_series_at_zero(table: &sluice_broker::TableName) {
    let label = table.to_string();
    for op in OPS {
        metrics::counter!(PUBLISHED_ROWS, "table" => label.clone(), "op" => op).increment(0);
    }
    for reason in RESYNC_REASONS {
        metrics::counter!(RESYNCS, "table" => label.clone(), "reason" => reason).increment(0);
    }
    metrics::counter!(SNAPSHOT_ROWS, "table" => label.clone()).increment(0);
    metrics::counter!(SNAPSHOT_CHUNKS, "table" => label.clone()).increment(0);
    metrics::counter!(VALUE_DECODE_ERRORS, "table" => label.clone()).increment(0);
    metrics::gauge!(RESYNC_IN_PROGRESS, "table" => label.clone()).set(0.0);
    metrics::gauge!(TABLE_ERRORS, "table" => label).set(0.0);
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_series_of_a_table_exists_at_zero() {
        let recorder = metrics_exporter_prometheus::PrometheusBuilder::new().build_recorder();
        let handle = recorder.handle();
        metrics::with_local_recorder(&recorder, || {
            counters_at_zero();
            table_series_at_zero(&sluice_broker::TableName::new("public", "t"));
        });
        let text = handle.render();
        for line in [
            "sluice_published_packages_total 0",
            "sluice_publish_duplicates_total 0",
            "sluice_replicator_reconnects_total{reason=\"slot_busy\"} 0",
            "sluice_published_rows_total{table=\"public.t\",op=\"delete\"} 0",
            "sluice_resyncs_total{table=\"public.t\",reason=\"gap\"} 0",
            "sluice_snapshot_rows_total{table=\"public.t\"} 0",
            "sluice_value_decode_errors_total{table=\"public.t\"} 0",
            "sluice_resync_in_progress{table=\"public.t\"} 0",
            "sluice_replicator_table_errors{table=\"public.t\"} 0",
        ] {
            assert!(text.lines().any(|l| l == line), "{line} missing in\n{text}");
        }
    }
}
