//! Invariant 5 (bounded memory): one 1,000,000-row transaction streams
//! through the replicator without its memory growing with the transaction.
//! The replicator's peak RSS (`VmHWM`) must stay under 300 MB.

use std::time::{Duration, Instant};

use anyhow::Context as _;
use sluice_integration::pipeline::{self, Pipeline};
use sluice_integration::wal_insert_lsn;

const ROWS: i64 = 1_000_000;
const MAX_RSS_KB: u64 = 300 * 1024;

#[tokio::test]
async fn a_million_row_transaction_streams_in_bounded_memory() -> anyhow::Result<()> {
    let mut p = Pipeline::start("big_tx").await?;
    let pg = p.pg().await?;
    pg.batch_execute(
        "CREATE TABLE big (id bigint PRIMARY KEY, payload text NOT NULL);
         CREATE PUBLICATION sluice FOR TABLE big;",
    )
    .await?;
    p.spawn_replicator()?;
    // The slot exists and the (empty) initial snapshot is done: the rows
    // below come through the replication stream, as one transaction.
    p.wait_replicator_ready(Duration::from_secs(60)).await?;
    pg.batch_execute(&format!(
        "INSERT INTO big SELECT g, repeat(md5(g::text), 4) FROM generate_series(1, {ROWS}) g"
    ))
    .await?;
    // At or past the end of the transaction's commit record. (Not
    // pg_current_wal_lsn(), the write position, which can lag behind it: the
    // slot legitimately confirms up to the commit record's start while the
    // transaction is still being decoded, since Postgres re-sends every
    // transaction whose commit starts at or after the confirmed LSN.)
    let target = wal_insert_lsn(&pg).await?;
    let started = Instant::now();
    p.wait_slot_confirmed(&target, Duration::from_secs(600))
        .await?;
    let pid = p.replicator_pid().context("replicator not running")?;
    let peak = pipeline::peak_rss_kb(pid)?;
    let metrics = p.replicator_metrics().await?;
    let published = pipeline::metric(
        &metrics,
        "sluice_published_rows_total{table=\"public.big\",op=\"insert\"}",
    )
    .unwrap_or(0.0);
    eprintln!(
        "{ROWS} rows in one transaction confirmed after {:?}; replicator peak RSS {} MB",
        started.elapsed(),
        peak / 1024
    );
    assert_eq!(published, ROWS as f64, "every row published once");
    assert!(
        peak < MAX_RSS_KB,
        "replicator peak RSS {} MB >= 300 MB",
        peak / 1024
    );
    p.stop_replicator().await?;
    Ok(())
}
