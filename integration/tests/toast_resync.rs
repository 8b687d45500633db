//! Unchanged TOAST values in bulk and during a resync (ARCHITECTURE
//! invariants 2 and 9): a 100,000-row UPDATE that leaves a TOASTed column
//! unchanged, committed while a resync of the table runs. pgoutput sends none
//! of those values; the loader fills them from ClickHouse. It used to put
//! every key into one query (over ClickHouse's `max_query_size`, a definite
//! error and so a full resync) and to read a shadow table that the snapshot
//! had not filled yet ("TOAST value missing", which restarted the resync).
//! Now keys are read in bounded chunks and the shadow falls back to the live
//! table; the table converges with no resync beyond the one requested.

use std::time::{Duration, Instant};

use sluice_integration::pipeline::{Pipeline, count_from_env, metric};

const CONVERGE: Duration = Duration::from_secs(300);

#[tokio::test]
async fn a_bulk_update_of_toasted_rows_during_a_resync_needs_no_other_resync() -> anyhow::Result<()>
{
    let rows = count_from_env("SLUICE_TEST_TOAST_ROWS", 100_000)?;
    let mut p = Pipeline::start("toast_resync").await?;
    let pg = p.pg().await?;
    // STORAGE EXTERNAL: values over ~2 kB go out of line uncompressed, so
    // every row's `big` is a TOAST pointer that an UPDATE leaves unchanged.
    pg.batch_execute(&format!(
        "CREATE TABLE docs (id bigint PRIMARY KEY, n int NOT NULL, big text NOT NULL);
         ALTER TABLE docs ALTER COLUMN big SET STORAGE EXTERNAL;
         INSERT INTO docs SELECT g, 0, g || ':' || repeat('x', 2100)
             FROM generate_series(1, {rows}) g;
         CREATE PUBLICATION sluice FOR TABLE docs;"
    ))
    .await?;
    let toasted: i64 = pg
        .query_one(
            "SELECT pg_relation_size(reltoastrelid) FROM pg_class WHERE relname = 'docs'",
            &[],
        )
        .await?
        .get(0);
    anyhow::ensure!(
        toasted > (rows as i64) * 2000,
        "the values were not TOASTed out of line ({toasted} bytes)"
    );
    p.spawn_replicator()?;
    p.spawn_loader()?;
    wait_resyncs_completed(&p, 1.0).await?;

    // A slow resync snapshot (a pause after each package), so the UPDATE's
    // rows reach the shadow table before the snapshot brought most of them.
    p.stop_replicator().await?;
    p.set_failpoints(Some("replicator::snapshot::package=return(40)"));
    p.spawn_replicator()?;
    p.wait_replicator_ready(CONVERGE).await?;
    let status = p
        .replicator_command(&["resync", "--table", "public.docs", "--no-wait"])?
        .wait()?;
    anyhow::ensure!(status.success(), "resync command failed: {status}");
    let deadline = Instant::now() + CONVERGE;
    // The resync's first snapshot rows are out (this replicator's counter
    // started at 0).
    loop {
        let text = p.replicator_metrics().await?;
        let read = metric(&text, "sluice_snapshot_rows_total{table=\"public.docs\"}");
        if read.unwrap_or(0.0) > 0.0 {
            break;
        }
        anyhow::ensure!(
            Instant::now() < deadline,
            "the resync's snapshot never started"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    pg.batch_execute("UPDATE docs SET n = n + 1").await?;
    // The premise: every updated row was published before the snapshot was.
    loop {
        let text = p.replicator_metrics().await?;
        let updated = metric(
            &text,
            "sluice_published_rows_total{table=\"public.docs\",op=\"update\"}",
        );
        if updated.unwrap_or(0.0) >= rows as f64 {
            let read = metric(&text, "sluice_snapshot_rows_total{table=\"public.docs\"}");
            anyhow::ensure!(
                read.unwrap_or(0.0) < rows as f64,
                "the snapshot finished before the update was published"
            );
            break;
        }
        anyhow::ensure!(Instant::now() < deadline, "the update was never published");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    wait_resyncs_completed(&p, 2.0).await?;
    let reports = p.wait_until_equal(CONVERGE).await?;
    assert_eq!(reports[0].clickhouse_rows, rows);
    let updated = p
        .servers()
        .clickhouse_sql(&format!(
            "SELECT count() FROM `{}`.docs FINAL WHERE n = 1 AND length(big) > 2100",
            p.config.clickhouse_database()
        ))
        .await?;
    assert_eq!(updated.trim(), rows.to_string());

    let replicator = p.replicator_metrics().await?;
    let loader = p.loader_metrics().await?;
    for reason in ["gap", "refused", "stalled"] {
        let resyncs = metric(
            &replicator,
            &format!("sluice_resyncs_total{{table=\"public.docs\",reason=\"{reason}\"}}"),
        );
        assert_eq!(
            resyncs,
            Some(0.0),
            "a resync beyond the requested one ({reason})"
        );
    }
    let dead = metric(&loader, "sluice_dead_letters_total").unwrap_or(0.0);
    assert_eq!(dead, 0.0, "dead letters:\n{}", p.log_tail("loader", 30));
    let completed = metric(
        &loader,
        "sluice_loader_resyncs_completed_total{table=\"public.docs\"}",
    );
    assert_eq!(completed, Some(2.0));
    Ok(())
}

/// Waits until the loader swapped in `count` snapshots of `docs` (the initial
/// one counts).
async fn wait_resyncs_completed(p: &Pipeline, count: f64) -> anyhow::Result<()> {
    let deadline = Instant::now() + CONVERGE;
    loop {
        let text = p.loader_metrics().await.unwrap_or_default();
        let done = metric(
            &text,
            "sluice_loader_resyncs_completed_total{table=\"public.docs\"}",
        )
        .unwrap_or(0.0);
        if done >= count {
            return Ok(());
        }
        anyhow::ensure!(
            Instant::now() < deadline,
            "{done} of {count} snapshots swapped in after {CONVERGE:?}:\n{}",
            p.log_tails()
        );
        tokio::time::sleep(Duration::from_millis(250)).await;
    }
}
