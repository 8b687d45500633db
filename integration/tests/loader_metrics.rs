//! The loader's counters exist at 0 before their first event, so that
//! Prometheus' `increase()` sees that first event (a series that appears
//! with value 1 has no increase): unlabelled and fixed-label ones from
//! start-up, ones labelled by table once the loader knows the table (its
//! first package, or its row in `_sluice_positions` after a restart).

use std::time::Duration;

use sluice_integration::pipeline::Pipeline;

const CONVERGE: Duration = Duration::from_secs(120);

/// Series that must be scraped with value 0 on a fresh pipeline of table
/// `public.counted` that had no trouble. (Not
/// `sluice_loader_resyncs_completed_total`: the first snapshot is a resync.)
const AT_ZERO: &[&str] = &[
    "sluice_gaps_detected_total{table=\"public.counted\"}",
    "sluice_loaded_rows_total{table=\"public.counted\",op=\"delete\"}",
    "sluice_schema_drift_total{table=\"public.counted\",kind=\"type_changed\"}",
    "sluice_dead_letters_total{reason=\"decode\"}",
    "sluice_dead_letters_total{reason=\"unpositioned\"}",
    "sluice_dead_letters_total{reason=\"insert\"}",
    "sluice_loader_batch_retries_total",
];

#[tokio::test]
async fn loader_counters_exist_at_zero_for_a_fresh_table_and_after_a_restart() -> anyhow::Result<()>
{
    let mut p = Pipeline::start("loader_metrics").await?;
    let pg = p.pg().await?;
    pg.batch_execute(
        "CREATE TABLE counted (id int PRIMARY KEY, v text);
         INSERT INTO counted SELECT g, 'v' || g FROM generate_series(1, 50) g;
         CREATE PUBLICATION sluice FOR TABLE counted;",
    )
    .await?;
    p.spawn_replicator()?;
    p.spawn_loader()?;
    // The snapshot was applied.
    p.wait_until_equal(CONVERGE).await?;
    p.assert_metrics_at_zero("loader", AT_ZERO, "after the snapshot")
        .await?;

    // A restarted loader knows the table from `_sluice_positions` before any
    // new package of it arrives.
    p.stop_loader().await?;
    p.spawn_loader()?;
    p.assert_metrics_at_zero("loader", AT_ZERO, "after a restart")
        .await?;
    p.check_alive()?;
    Ok(())
}
