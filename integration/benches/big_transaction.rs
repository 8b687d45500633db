//! One large transaction sent by Postgres after its commit
//! (`replicator.streaming = false`) against streamed while it runs (pgoutput
//! `streaming 'on'`, the default on Postgres 14+), measured in the same run
//! on the same pipeline.
//!
//! For each way, in this order: the replicator is (re)started with the
//! setting and the slot's statistics are reset; one transaction inserts M
//! rows (`SLUICE_BENCH_TX_ROWS`, default 5,000,000) into a published table;
//! from the moment its COMMIT returns, the bench waits until the slot
//! confirmed the transaction (every package acknowledged by JetStream) and
//! until ClickHouse holds all its rows. It prints both times, the
//! replicator's peak RSS (`VmHWM`, the process started for this way) and
//! what Postgres reports in `pg_stat_replication_slots`: bytes it spilled to
//! its own disk, and bytes it streamed.
//!
//! ```text
//! set -a; . /tmp/sdev/stack/env; set +a
//! cargo bench -p sluice-integration --bench big_transaction
//! ```

use std::time::{Duration, Instant};

use anyhow::{Context as _, bail};
use sluice_integration::pipeline::{self, Pipeline};
use sluice_integration::wal_insert_lsn;

const TABLE: &str = "bench_rows";
const DEFAULT_ROWS: u64 = 5_000_000;
const PATIENCE: Duration = Duration::from_secs(1800);

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let rows = pipeline::count_from_env("SLUICE_BENCH_TX_ROWS", DEFAULT_ROWS)?;
    let mut p = Pipeline::start("bench_bigtx").await?;
    p.set_config_from_env()?;
    let result = run(&mut p, rows).await;
    let _ = p.stop_replicator().await;
    let _ = p.stop_loader().await;
    if result.is_err() {
        eprintln!("{}", p.log_tails());
    }
    result
}

/// What one way measured.
struct Measured {
    insert: Duration,
    acknowledged: Duration,
    visible: Duration,
    peak_rss_kb: u64,
    spill_bytes: i64,
    stream_bytes: i64,
}

async fn run(p: &mut Pipeline, rows: u64) -> anyhow::Result<()> {
    p.publish_workload_tables(&[TABLE]).await?;
    p.spawn_loader()?;
    let mut results = Vec::new();
    for (round, streaming) in [false, true].into_iter().enumerate() {
        let measured = one_transaction(p, rows, round as u64, streaming).await?;
        results.push((streaming, measured));
    }
    println!("one transaction of {rows} rows, times from its COMMIT:");
    for (streaming, m) in &results {
        println!(
            "  {:<22} insert {:>6.1} s | acknowledged {:>6.1} s | visible in ClickHouse {:>6.1} s | replicator peak RSS {:>4} MiB | Postgres spilled {:>5} MiB, streamed {:>5} MiB",
            if *streaming {
                "streamed (default)"
            } else {
                "after commit"
            },
            m.insert.as_secs_f64(),
            m.acknowledged.as_secs_f64(),
            m.visible.as_secs_f64(),
            m.peak_rss_kb / 1024,
            m.spill_bytes / (1024 * 1024),
            m.stream_bytes / (1024 * 1024),
        );
    }
    let (after, streamed) = (&results[0].1, &results[1].1);
    println!(
        "ratio streamed / after commit: visible {:.2}, acknowledged {:.2}",
        streamed.visible.as_secs_f64() / after.visible.as_secs_f64(),
        streamed.acknowledged.as_secs_f64() / after.acknowledged.as_secs_f64()
    );
    Ok(())
}

async fn one_transaction(
    p: &mut Pipeline,
    rows: u64,
    round: u64,
    streaming: bool,
) -> anyhow::Result<Measured> {
    let pg = p.pg().await?;
    let slot = p.config.postgres.slot.clone();
    p.set_config("replicator", "streaming", &streaming.to_string())?;
    p.spawn_replicator()?;
    p.wait_replicator_ready(PATIENCE).await?;
    pg.execute("SELECT pg_stat_reset_replication_slot($1)", &[&slot])
        .await?;
    let (first, last) = (round * rows + 1, (round + 1) * rows);
    let started = Instant::now();
    pg.batch_execute(&format!(
        "INSERT INTO {TABLE} SELECT g, g * 7, md5(g::text) FROM generate_series({first}, {last}) g"
    ))
    .await
    .context("inserting the transaction")?;
    let committed = Instant::now();
    let insert = committed - started;
    let target = wal_insert_lsn(&pg).await?;
    p.wait_slot_confirmed(&target, PATIENCE).await?;
    let acknowledged = committed.elapsed();
    let count_sql = format!("SELECT count() FROM `{}`.{TABLE}", p.name);
    loop {
        p.check_alive()?;
        let count: u64 = p
            .servers()
            .clickhouse_sql(&count_sql)
            .await
            .unwrap_or_default()
            .trim()
            .parse()
            .unwrap_or(0);
        if count >= last {
            break;
        }
        if committed.elapsed() > PATIENCE {
            bail!("ClickHouse holds {count} of {last} rows after {PATIENCE:?}");
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let visible = committed.elapsed();
    let pid = p.replicator_pid().context("replicator not running")?;
    let peak_rss_kb = pipeline::peak_rss_kb(pid)?;
    p.stop_replicator().await?;
    // The walsender has ended: its statistics are flushed.
    let stats = pg
        .query_one(
            "SELECT spill_bytes, stream_bytes FROM pg_stat_replication_slots WHERE slot_name = $1",
            &[&slot],
        )
        .await?;
    Ok(Measured {
        insert,
        acknowledged,
        visible,
        peak_rss_kb,
        spill_bytes: stats.get(0),
        stream_bytes: stats.get(1),
    })
}
