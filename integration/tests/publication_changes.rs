//! Following the publication while running (ARCHITECTURE invariant 7): a table
//! added to the publication brings its existing rows without a manual step,
//! whether its first change names it (a Relation message), the periodic check
//! finds it, or it was added while the replicator was stopped; a table
//! removed from the publication stops being applied, keeps its ClickHouse
//! table, and `status` says so.

use std::time::Duration;

use sluice_integration::pipeline::{Pipeline, json_field, json_object_with, metric};

const CONVERGE: Duration = Duration::from_secs(120);

/// `CREATE TABLE name (id, v)` with `rows` rows, `'<name> <id>'` in `v`.
fn table_sql(name: &str, rows: u32) -> String {
    format!(
        "CREATE TABLE {name} (id bigint PRIMARY KEY, v text NOT NULL);
         INSERT INTO {name} SELECT g, '{name} ' || g FROM generate_series(1, {rows}) g;"
    )
}

/// `sluice_resyncs_total{table="public.<table>",reason="<reason>"}` of the
/// running replicator (0 when the series is missing).
async fn resyncs(p: &Pipeline, table: &str, reason: &str) -> anyhow::Result<f64> {
    let text = p.replicator_metrics().await?;
    Ok(metric(
        &text,
        &format!("sluice_resyncs_total{{table=\"public.{table}\",reason=\"{reason}\"}}"),
    )
    .unwrap_or(0.0))
}

async fn clickhouse_count(p: &Pipeline, table: &str, filter: &str) -> anyhow::Result<u64> {
    let sql = format!(
        "SELECT count() FROM `{}`.`{table}` FINAL WHERE {filter}",
        p.config.clickhouse_database()
    );
    Ok(p.servers().clickhouse_sql(&sql).await?.trim().parse()?)
}

#[tokio::test]
async fn tables_added_to_the_publication_bring_their_existing_rows() -> anyhow::Result<()> {
    let mut p = Pipeline::start("pub_added").await?;
    let pg = p.pg().await?;
    pg.batch_execute(&format!(
        "{}{}{}{}CREATE PUBLICATION sluice FOR TABLE first;",
        table_sql("first", 100),
        table_sql("busy", 400),
        table_sql("offline", 500),
        table_sql("quiet", 300),
    ))
    .await?;
    // First without the periodic check: only a Relation message can tell.
    p.set_config("replicator", "publication_check_interval", "\"0s\"")?;
    p.spawn_replicator()?;
    p.spawn_loader()?;
    p.wait_until_equal(CONVERGE).await?;

    // Added, then changed: its first Relation message names it.
    pg.batch_execute(
        "ALTER PUBLICATION sluice ADD TABLE busy;
         UPDATE busy SET v = 'changed' WHERE id % 10 = 0;
         INSERT INTO busy SELECT g, 'busy new ' || g FROM generate_series(1001, 1050) g;",
    )
    .await?;
    let reports = p.wait_until_equal(CONVERGE).await?;
    anyhow::ensure!(
        reports.iter().any(|r| r.table.contains("busy")),
        "verify did not compare busy: {reports:?}"
    );
    assert_eq!(clickhouse_count(&p, "busy", "1").await?, 450);
    assert_eq!(resyncs(&p, "busy", "added").await?, 1.0);
    assert_eq!(resyncs(&p, "first", "added").await?, 0.0);

    // Added while the replicator is stopped: no package of it in the stream.
    p.stop_replicator().await?;
    pg.batch_execute("ALTER PUBLICATION sluice ADD TABLE offline")
        .await?;
    p.spawn_replicator()?;
    p.wait_until_equal(CONVERGE).await?;
    assert_eq!(clickhouse_count(&p, "offline", "1").await?, 500);
    assert_eq!(resyncs(&p, "offline", "not_in_stream").await?, 1.0);
    // The tables already in the stream were resumed, not loaded again.
    assert_eq!(resyncs(&p, "busy", "not_in_stream").await?, 0.0);
    assert_eq!(resyncs(&p, "first", "not_in_stream").await?, 0.0);

    // Added and never changed: the periodic check finds it.
    p.stop_replicator().await?;
    p.set_config("replicator", "publication_check_interval", "\"1s\"")?;
    p.spawn_replicator()?;
    p.wait_replicator_ready(CONVERGE).await?;
    pg.batch_execute("ALTER PUBLICATION sluice ADD TABLE quiet")
        .await?;
    p.wait_until_equal(CONVERGE).await?;
    assert_eq!(clickhouse_count(&p, "quiet", "1").await?, 300);
    assert_eq!(resyncs(&p, "quiet", "added").await?, 1.0);
    Ok(())
}

#[tokio::test]
async fn a_table_removed_from_the_publication_is_kept_and_no_longer_applied() -> anyhow::Result<()>
{
    let mut p = Pipeline::start("pub_removed").await?;
    let pg = p.pg().await?;
    pg.batch_execute(&format!(
        "{}{}CREATE PUBLICATION sluice FOR TABLE gone, stays;",
        table_sql("gone", 200),
        table_sql("stays", 200),
    ))
    .await?;
    p.set_config("replicator", "publication_check_interval", "\"1s\"")?;
    p.spawn_replicator()?;
    p.spawn_loader()?;
    pg.batch_execute("UPDATE gone SET v = 'before' WHERE id <= 10")
        .await?;
    p.wait_until_equal(CONVERGE).await?;

    pg.batch_execute(
        "ALTER PUBLICATION sluice DROP TABLE gone;
         UPDATE gone SET v = 'after' WHERE id <= 50;
         UPDATE stays SET v = 'after' WHERE id <= 50;",
    )
    .await?;
    let reports = p.wait_until_equal(CONVERGE).await?;
    anyhow::ensure!(
        reports.iter().all(|r| !r.table.contains("gone")),
        "verify still compares the removed table: {reports:?}"
    );
    assert_eq!(clickhouse_count(&p, "stays", "v = 'after'").await?, 50);
    // The ClickHouse table is kept as it was at the removal.
    assert_eq!(clickhouse_count(&p, "gone", "1").await?, 200);
    assert_eq!(clickhouse_count(&p, "gone", "v = 'before'").await?, 10);
    assert_eq!(clickhouse_count(&p, "gone", "v = 'after'").await?, 0);

    p.wait_for_log_lines(
        "replicator",
        "table removed from the publication",
        1,
        Duration::from_secs(30),
    )
    .await?;
    let (stdout, _) = p.cli("replicator", &["status", "--json"])?;
    let gone = json_object_with(&stdout, "\"table\": \"public.gone\"")
        .ok_or_else(|| anyhow::anyhow!("public.gone missing from status:\n{stdout}"))?;
    let state = json_field(gone, "state").unwrap_or_default();
    assert!(state.starts_with("\"removed: "), "{stdout}");
    let stays = json_object_with(&stdout, "\"table\": \"public.stays\"")
        .ok_or_else(|| anyhow::anyhow!("public.stays missing from status:\n{stdout}"))?;
    assert_eq!(
        json_field(stays, "state"),
        Some("\"streaming\""),
        "{stdout}"
    );
    Ok(())
}

#[tokio::test]
async fn a_resync_that_fails_before_it_begins_is_started_again() -> anyhow::Result<()> {
    let mut p = Pipeline::start("pub_retry").await?;
    let pg = p.pg().await?;
    pg.batch_execute(&format!(
        "{}{}CREATE PUBLICATION sluice FOR TABLE first;",
        table_sql("first", 100),
        table_sql("late", 250),
    ))
    .await?;
    p.set_config("replicator", "publication_check_interval", "\"1s\"")?;
    // The first resync the replicator starts fails before it begins (as
    // when its temporary slot cannot be created); the loader never hears
    // of it.
    p.set_failpoints(Some("replicator::resync::before_begin=1*return"));
    p.spawn_replicator()?;
    p.spawn_loader()?;
    p.wait_until_equal(CONVERGE).await?;
    pg.batch_execute("ALTER PUBLICATION sluice ADD TABLE late")
        .await?;
    p.wait_until_equal(CONVERGE).await?;
    assert_eq!(clickhouse_count(&p, "late", "1").await?, 250);
    assert_eq!(
        p.log_lines_containing("replicator", "resync failed before it began")
            .len(),
        1,
        "the failpoint fired once:\n{}",
        p.log_tail("replicator", 30)
    );
    assert_eq!(resyncs(&p, "late", "added").await?, 1.0);
    p.check_alive()?;
    Ok(())
}
