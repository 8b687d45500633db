//! The loader's counters exist at 0 before their first event, so that
//! Prometheus' `increase()` sees that first event (a series that appears
//! with value 1 has no increase): unlabelled and fixed-label ones from
//! start-up, ones labelled by table once the loader knows the table (its
//! first package, or its row in `_sluice_positions` after a restart).

use std::time::{Duration, Instant};

use sluice_integration::pipeline::{self, Pipeline};

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

/// Scrapes the loader until every series of `AT_ZERO` is there (the
/// endpoint may not listen yet), then checks each is exactly 0.
async fn assert_counters_at_zero(p: &Pipeline, when: &str) -> anyhow::Result<()> {
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        let text = p.loader_metrics().await.unwrap_or_default();
        let missing: Vec<&str> = AT_ZERO
            .iter()
            .copied()
            .filter(|series| !has_sample(&text, series))
            .collect();
        if missing.is_empty() {
            for series in AT_ZERO {
                assert_eq!(
                    pipeline::metric(&text, series),
                    Some(0.0),
                    "{when}: {series}\n{text}"
                );
            }
            return Ok(());
        }
        anyhow::ensure!(
            Instant::now() < deadline,
            "{when}: the loader never exported {missing:?}\n{text}\n--- loader log tail:\n{}",
            p.log_tail("loader", 30)
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}

/// Whether `text` has a sample line for exactly `series` (name and labels).
fn has_sample(text: &str, series: &str) -> bool {
    text.lines().any(|line| {
        line.strip_prefix(series)
            .is_some_and(|rest| rest.starts_with(' '))
    })
}

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
    assert_counters_at_zero(&p, "after the snapshot").await?;

    // A restarted loader knows the table from `_sluice_positions` before any
    // new package of it arrives.
    p.stop_loader().await?;
    p.spawn_loader()?;
    assert_counters_at_zero(&p, "after a restart").await?;
    p.check_alive()?;
    Ok(())
}
