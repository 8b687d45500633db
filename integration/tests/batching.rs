//! How the loader paces its batches (`loader.batch_min_interval`,
//! `loader.batch_max_wait`): a change on a quiet stream goes to ClickHouse
//! as soon as the previous batch is done, without waiting for a window to
//! close; and a table gets at most one INSERT per `batch_min_interval`
//! however the changes trickle in.

use std::time::Duration;

use anyhow::Context as _;
use sluice_integration::clickhouse_sql;
use sluice_integration::pipeline::{Pipeline, metric};

const CONVERGE: Duration = Duration::from_secs(90);

/// Creates `paced (id, created)`, starts both binaries and waits for the
/// first row, so that the table exists in ClickHouse before anything is
/// timed. Returns a Postgres session that commits synchronously (the test
/// servers run with `synchronous_commit = off`, whose commits reach logical
/// decoding up to `wal_writer_delay` late).
async fn start(p: &mut Pipeline) -> anyhow::Result<tokio_postgres::Client> {
    let pg = p.pg().await?;
    pg.batch_execute(
        "CREATE TABLE paced (id int PRIMARY KEY, created timestamptz NOT NULL DEFAULT clock_timestamp());
         INSERT INTO paced (id) VALUES (0);
         CREATE PUBLICATION sluice FOR TABLE paced;
         SET synchronous_commit = on;",
    )
    .await?;
    p.spawn_replicator()?;
    p.spawn_loader()?;
    p.wait_until_equal(CONVERGE).await?;
    Ok(pg)
}

/// INSERTs into ClickHouse so far (all tables: the test has one).
async fn inserts(p: &Pipeline) -> anyhow::Result<f64> {
    let text = p.loader_metrics().await?;
    metric(&text, "sluice_clickhouse_insert_seconds_count").context("no INSERT histogram yet")
}

#[tokio::test]
async fn a_change_on_a_quiet_stream_lands_without_waiting_for_batch_max_wait() -> anyhow::Result<()>
{
    let mut p = Pipeline::start("batching_quiet").await?;
    // An idle wait far longer than what each row may take below: with a
    // batch window of this length, rows 2 s apart could not all land
    // within 1.5 s of their commit.
    p.set_config("loader", "batch_max_wait", "\"10s\"")?;
    let pg = start(&mut p).await?;
    for id in 1..=5 {
        pg.batch_execute(&format!("INSERT INTO paced (id) VALUES ({id})"))
            .await?;
        tokio::time::sleep(Duration::from_millis(500)).await;
    }
    p.wait_until_equal(CONVERGE).await?;
    let target = format!("`{}`.paced", p.config.clickhouse_database());
    let lags = clickhouse_sql(
        &p.servers().clickhouse(),
        &format!(
            "SELECT groupArray(d) FROM (
                 SELECT id, toUnixTimestamp64Milli(min(_sluice_synced_at))
                            - toUnixTimestamp64Milli(min(created)) AS d
                 FROM {target} WHERE id > 0 GROUP BY id ORDER BY id)"
        ),
    )
    .await?;
    let lags: Vec<i64> = lags
        .trim()
        .trim_matches(['[', ']'])
        .split(',')
        .map(|d| d.trim().parse().context("lag in ms"))
        .collect::<anyhow::Result<_>>()?;
    assert_eq!(lags.len(), 5, "one lag per row: {lags:?}");
    assert!(
        lags.iter().all(|&ms| ms < 1500),
        "every change on a quiet stream lands within 1.5 s of its commit, \
         whatever loader.batch_max_wait is; commit → ClickHouse in ms: {lags:?}"
    );
    p.check_alive()?;
    Ok(())
}

#[tokio::test]
async fn a_table_gets_at_most_one_insert_per_batch_min_interval() -> anyhow::Result<()> {
    let mut p = Pipeline::start("batching_paced").await?;
    p.set_config("loader", "batch_min_interval", "\"1s\"")?;
    let pg = start(&mut p).await?;
    let before = inserts(&p).await?;
    // 100 transactions of one row, 30 ms apart: 3 s of trickle.
    let started = std::time::Instant::now();
    for id in 1..=100 {
        pg.batch_execute(&format!("INSERT INTO paced (id) VALUES ({id})"))
            .await?;
        tokio::time::sleep(Duration::from_millis(30)).await;
    }
    let trickled = started.elapsed();
    p.wait_until_equal(CONVERGE).await?;
    let made = inserts(&p).await? - before;
    // One INSERT per started second of trickle, one for what was left at its
    // end and one of slack for a batch that went just before it began.
    let allowed = trickled.as_secs_f64().ceil() + 2.0;
    assert!(
        made >= 2.0 && made <= allowed,
        "100 changes over {trickled:?} with batch_min_interval = 1s made {made} INSERTs; \
         expected between 2 and {allowed}"
    );
    p.check_alive()?;
    Ok(())
}
