//! Transactions Postgres streams before they commit (pgoutput `streaming
//! 'on'`, Postgres 14+): only what committed reaches ClickHouse, aborted
//! transactions and aborted subtransactions leave no trace, interleaved
//! streamed transactions land in commit order, and a replicator killed while
//! one is open, or while a committed one is being published, loses nothing.
//!
//! Each test's database sets `logical_decoding_work_mem` to its minimum
//! (64kB), so that a transaction of a few thousand rows is streamed; the
//! tests assert from Postgres' own statistics (`pg_stat_replication_slots`)
//! that it was.

use std::time::Duration;

use anyhow::Context as _;
use sluice_integration::pipeline::{self, Pipeline};

const CONVERGE: Duration = Duration::from_secs(120);
const READY: Duration = Duration::from_secs(60);

/// A pipeline whose source database streams every transaction over 64kB.
async fn streaming_pipeline(name: &str) -> anyhow::Result<(Pipeline, tokio_postgres::Client)> {
    let p = Pipeline::start(name).await?;
    let pg = p.pg().await?;
    let db: String = pg.query_one("SELECT current_database()", &[]).await?.get(0);
    pg.batch_execute(&format!(
        "ALTER DATABASE \"{db}\" SET logical_decoding_work_mem = '64kB';
         CREATE TABLE items (id bigint PRIMARY KEY, v text NOT NULL, n int NOT NULL DEFAULT 0);
         INSERT INTO items SELECT g, 'seed ' || g, 0 FROM generate_series(1, 3000) g;
         CREATE PUBLICATION sluice FOR TABLE items;"
    ))
    .await?;
    Ok((p, pg))
}

/// Rows `from..=to` of `items`, each about 100 bytes: 2000 of them are well
/// over 64kB of decoded changes.
fn insert(from: i64, to: i64) -> String {
    format!(
        "INSERT INTO items (id, v) SELECT g, repeat(md5(g::text), 3) FROM generate_series({from}, {to}) g;"
    )
}

/// Transactions Postgres streamed on this pipeline's slot.
async fn streamed_by_postgres(pg: &tokio_postgres::Client, p: &Pipeline) -> anyhow::Result<i64> {
    Ok(pg
        .query_opt(
            "SELECT stream_txns FROM pg_stat_replication_slots WHERE slot_name = $1",
            &[&p.config.postgres.slot],
        )
        .await?
        .map_or(0, |row| row.get(0)))
}

async fn count(pg: &tokio_postgres::Client, filter: &str) -> anyhow::Result<i64> {
    Ok(pg
        .query_one(&format!("SELECT count(*) FROM items WHERE {filter}"), &[])
        .await?
        .get(0))
}

#[tokio::test]
async fn streamed_transactions_land_exactly_what_committed() -> anyhow::Result<()> {
    let (mut p, pg) = streaming_pipeline("streamed").await?;
    p.spawn_replicator()?;
    p.spawn_loader()?;
    p.wait_replicator_ready(READY).await?;

    // Committed whole.
    pg.batch_execute(&format!("BEGIN; {} COMMIT;", insert(10_001, 12_000)))
        .await?;
    // Aborted whole.
    pg.batch_execute(&format!("BEGIN; {} ROLLBACK;", insert(20_001, 22_000)))
        .await?;
    // Subtransactions: one rolled back with its own rows and an update of
    // committed rows; a released one inside a rolled-back one.
    pg.batch_execute(&format!(
        "BEGIN;
         {}
         SAVEPOINT a;
         {}
         UPDATE items SET v = 'aborted' WHERE id <= 1000;
         ROLLBACK TO SAVEPOINT a;
         {}
         SAVEPOINT b;
         SAVEPOINT c;
         {}
         RELEASE SAVEPOINT c;
         {}
         ROLLBACK TO SAVEPOINT b;
         DELETE FROM items WHERE id <= 100;
         UPDATE items SET n = 7 WHERE id BETWEEN 101 AND 2100;
         COMMIT;",
        insert(30_001, 32_000),
        insert(32_001, 34_000),
        insert(34_001, 35_000),
        insert(35_001, 36_000),
        insert(36_001, 37_000),
    ))
    .await?;
    // Two streamed transactions open at once; the one begun later commits
    // first, and the other then updates its rows.
    let other = p.pg().await?;
    pg.batch_execute(&format!("BEGIN; {}", insert(40_001, 42_000)))
        .await?;
    other
        .batch_execute(&format!("BEGIN; {}", insert(50_001, 52_000)))
        .await?;
    pg.batch_execute(&insert(42_001, 44_000)).await?;
    other.batch_execute("COMMIT").await?;
    pg.batch_execute("UPDATE items SET n = 5 WHERE id BETWEEN 50001 AND 50100; COMMIT")
        .await?;
    // DDL inside a streamed transaction, and DDL rolled back with its
    // subtransaction.
    pg.batch_execute(&format!(
        "BEGIN;
         ALTER TABLE items ADD COLUMN extra text;
         {}
         UPDATE items SET extra = 'x' || id WHERE id BETWEEN 60001 AND 62000;
         COMMIT;",
        insert(60_001, 62_000)
    ))
    .await?;
    pg.batch_execute(&format!(
        "BEGIN;
         {}
         SAVEPOINT s;
         ALTER TABLE items ADD COLUMN gone int;
         INSERT INTO items (id, v, gone) SELECT g, repeat(md5(g::text), 3), 1 FROM generate_series(72001, 74000) g;
         ROLLBACK TO SAVEPOINT s;
         {}
         COMMIT;",
        insert(70_001, 72_000),
        insert(74_001, 75_000)
    ))
    .await?;

    let reports = p.wait_until_equal(CONVERGE).await?;
    eprintln!("{}", reports[0]);
    // What Postgres holds is what the assertions above mean (verify compared
    // ClickHouse with it).
    assert_eq!(count(&pg, "id BETWEEN 20001 AND 22000").await?, 0);
    assert_eq!(count(&pg, "id BETWEEN 32001 AND 34000").await?, 0);
    assert_eq!(count(&pg, "v = 'aborted'").await?, 0);
    assert_eq!(count(&pg, "id BETWEEN 35001 AND 37000").await?, 0);
    assert_eq!(count(&pg, "id BETWEEN 72001 AND 74000").await?, 0);
    assert_eq!(count(&pg, "n = 5").await?, 100);

    let streamed = streamed_by_postgres(&pg, &p).await?;
    assert!(
        streamed >= 6,
        "Postgres streamed {streamed} transactions; the test needs the streaming path"
    );
    let metrics = p.replicator_metrics().await?;
    let outcome = |o: &str| {
        pipeline::metric(
            &metrics,
            &format!("sluice_replicator_streamed_transactions_total{{outcome=\"{o}\"}}"),
        )
        .unwrap_or(0.0)
    };
    assert!(outcome("commit") >= 5.0, "{metrics}");
    // Postgres 16+ does not stream a transaction it already knows to be
    // rolled back when it would (a walsender decoding behind the ROLLBACK),
    // so only older versions always send its Stream Abort.
    let version: i32 = pg
        .query_one("SELECT current_setting('server_version_num')::int", &[])
        .await?
        .get(0);
    if version < 160000 {
        assert!(outcome("abort") >= 1.0, "{metrics}");
    }
    assert_eq!(
        pipeline::metric(&metrics, "sluice_replicator_streamed_spill_bytes"),
        Some(0.0),
        "no streamed transaction is left open"
    );
    p.check_chains_have_no_duplicates().await?;
    Ok(())
}

#[tokio::test]
async fn a_replicator_killed_during_a_streamed_transaction_loses_nothing() -> anyhow::Result<()> {
    let (mut p, pg) = streaming_pipeline("streamed_kill").await?;
    p.spawn_replicator()?;
    p.spawn_loader()?;
    p.wait_replicator_ready(READY).await?;
    let aborted = p.pg().await?;
    pg.batch_execute(&format!("BEGIN; {}", insert(10_001, 14_000)))
        .await?;
    aborted
        .batch_execute(&format!("BEGIN; {}", insert(20_001, 24_000)))
        .await?;
    // Both are in the replicator's spill files, nothing of them published.
    let deadline = tokio::time::Instant::now() + READY;
    loop {
        let metrics = p.replicator_metrics().await?;
        let spilled = pipeline::metric(&metrics, "sluice_replicator_streamed_spill_bytes");
        if spilled.is_some_and(|b| b > 400_000.0) {
            break;
        }
        anyhow::ensure!(
            tokio::time::Instant::now() < deadline,
            "the open transactions never reached the spill files: {spilled:?}"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    p.kill_9_replicator()?;
    pg.batch_execute(&format!(
        "{} UPDATE items SET n = 3 WHERE id BETWEEN 1 AND 500; COMMIT;",
        insert(14_001, 16_000)
    ))
    .await?;
    p.spawn_replicator()?;
    // Rolled back after the restart: Postgres streams it again from its
    // first change, then aborts it.
    aborted
        .batch_execute(&format!("{} ROLLBACK;", insert(24_001, 25_000)))
        .await?;
    pg.batch_execute(&format!("BEGIN; {} COMMIT;", insert(30_001, 32_000)))
        .await?;
    p.wait_until_equal(CONVERGE).await?;

    // Killed in the middle of handing a committed streamed transaction over
    // (slowed by a failpoint, so that several status updates go out
    // meanwhile): nothing of it may have been confirmed, so Postgres sends it
    // again and the rest arrives.
    p.stop_replicator().await?;
    let inserted = |metrics: &str| {
        pipeline::metric(
            metrics,
            "sluice_published_rows_total{table=\"public.items\",op=\"insert\"}",
        )
        .unwrap_or(0.0)
    };
    p.set_failpoints(Some("replicator::streamed::replay=return(200)"));
    p.spawn_replicator()?;
    p.set_failpoints(None);
    p.wait_replicator_ready(READY).await?;
    let before = inserted(&p.replicator_metrics().await?);
    pg.batch_execute(&format!("BEGIN; {} COMMIT;", insert(40_001, 44_000)))
        .await?;
    let deadline = tokio::time::Instant::now() + READY;
    loop {
        let now = inserted(&p.replicator_metrics().await?) - before;
        if now >= 2000.0 {
            anyhow::ensure!(now < 4000.0, "the replay was not slowed: {now} rows");
            break;
        }
        anyhow::ensure!(
            tokio::time::Instant::now() < deadline,
            "the committed transaction is not being published: {now} rows"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    p.kill_9_replicator()?;
    p.spawn_replicator()?;

    let reports = p.wait_until_equal(CONVERGE).await?;
    eprintln!("{}", reports[0]);
    assert_eq!(count(&pg, "id > 10000").await?, 12_000);
    let streamed = streamed_by_postgres(&pg, &p).await?;
    assert!(streamed >= 3, "Postgres streamed {streamed} transactions");
    p.check_chains_have_no_duplicates().await?;
    // Nothing was lost, so nothing needed a resync.
    let gaps = p.log_lines_containing("loader", "gap in the table's chain");
    assert!(gaps.is_empty(), "the loader saw gaps: {gaps:#?}");
    let _ = p
        .replicator_pid()
        .context("the replicator runs after the restart")?;
    Ok(())
}
