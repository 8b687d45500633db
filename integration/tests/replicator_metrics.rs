//! The replicator's counters exist at 0 before their first event, so that
//! Prometheus' `increase()` sees that first event (a series that appears
//! with value 1 has no increase): unlabelled and fixed-label ones from
//! start-up, ones labelled by table as soon as the replicator read the
//! publication's tables (or saw a table added to it later), for every value
//! of their other label. The per-table gauges start at 0 too.

use std::time::Duration;

use sluice_integration::pipeline::Pipeline;

const READY: Duration = Duration::from_secs(120);

/// Series of table `table` that must be scraped with value 0 on a fresh
/// pipeline that had no trouble. (Not `reason="initial"`: the first snapshot
/// is a resync; not `sluice_snapshot_rows_total`: it read rows.)
fn table_series_at_zero(table: &str) -> Vec<String> {
    let mut series = vec![
        format!("sluice_value_decode_errors_total{{table=\"{table}\"}}"),
        format!("sluice_replicator_table_errors{{table=\"{table}\"}}"),
        format!("sluice_resync_in_progress{{table=\"{table}\"}}"),
    ];
    for reason in ["manual", "gap", "slot_lost"] {
        series.push(format!(
            "sluice_resyncs_total{{table=\"{table}\",reason=\"{reason}\"}}"
        ));
    }
    for op in ["update", "delete"] {
        series.push(format!(
            "sluice_published_rows_total{{table=\"{table}\",op=\"{op}\"}}"
        ));
    }
    series
}

/// Unlabelled and fixed-label series at 0 from start-up.
const GLOBAL_AT_ZERO: &[&str] = &[
    "sluice_publish_duplicates_total",
    "sluice_replicator_reconnects_total{reason=\"postgres\"}",
    "sluice_replicator_reconnects_total{reason=\"nats\"}",
    "sluice_replicator_reconnects_total{reason=\"slot_busy\"}",
];

#[tokio::test]
async fn replicator_counters_exist_at_zero_for_published_tables() -> anyhow::Result<()> {
    let mut p = Pipeline::start("replicator_metrics").await?;
    let pg = p.pg().await?;
    pg.batch_execute(
        "CREATE TABLE t (id int PRIMARY KEY, v text);
         INSERT INTO t SELECT g, 'v' || g FROM generate_series(1, 20) g;
         CREATE TABLE later (id int PRIMARY KEY, v text);
         CREATE PUBLICATION sluice FOR TABLE t;",
    )
    .await?;
    p.spawn_replicator()?;
    p.wait_replicator_ready(READY).await?;
    let mut expected: Vec<String> = GLOBAL_AT_ZERO.iter().map(|s| (*s).to_owned()).collect();
    expected.extend(table_series_at_zero("public.t"));
    let expected: Vec<&str> = expected.iter().map(String::as_str).collect();
    p.assert_metrics_at_zero("replicator", &expected, "after start-up")
        .await?;

    // A table added to the publication later gets its series with its first
    // change (the only moment the replicator learns of it).
    pg.batch_execute(
        "ALTER PUBLICATION sluice ADD TABLE later;
         INSERT INTO later VALUES (1, 'one');",
    )
    .await?;
    let later = table_series_at_zero("public.later");
    let later: Vec<&str> = later.iter().map(String::as_str).collect();
    p.assert_metrics_at_zero("replicator", &later, "after a table was added")
        .await?;
    p.check_alive()?;
    Ok(())
}
