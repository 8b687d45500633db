//! `sluice-loader verify` of a big equal table: its time against reading
//! both sides raw, measured in the same run, and its peak RSS.
//!
//! A table of M rows (`SLUICE_BENCH_VERIFY_ROWS`, default 10,000,000) is
//! replicated into ClickHouse by the pipeline (untimed). Then, timed one
//! after the other:
//!
//! - baseline: `COPY (SELECT * FROM t) TO STDOUT` read to the end by
//!   tokio-postgres, then `SELECT * FROM t FINAL` read to the end from
//!   ClickHouse as TabSeparated (both thrown away): what any comparison has
//!   to read, without comparing or sorting;
//! - verify: the `sluice-loader verify --table public.bench_rows` binary,
//!   until it exits (it must print OK), its `VmHWM` sampled every 50 ms.
//!
//! Prints both times, the ratio verify / raw read, and verify's peak RSS.
//!
//! ```text
//! set -a; . /tmp/sdev/stack/env; set +a
//! cargo bench -p sluice-integration --bench verify
//! ```

use std::time::{Duration, Instant};

use anyhow::{Context as _, bail};
use futures::StreamExt as _;
use sluice_integration::pipeline::{Pipeline, peak_rss_kb};

const TABLE: &str = "bench_rows";
const ROWS_PER_TRANSACTION: u64 = 500_000;
const DEFAULT_ROWS: u64 = 10_000_000;

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let rows =
        sluice_integration::pipeline::count_from_env("SLUICE_BENCH_VERIFY_ROWS", DEFAULT_ROWS)?;
    let mut p = Pipeline::start("bench_verify").await?;
    p.set_config_from_env()?;
    let result = run(&mut p, rows).await;
    let _ = p.stop_replicator().await;
    let _ = p.stop_loader().await;
    if result.is_err() {
        eprintln!("{}", p.log_tails());
    }
    result
}

async fn run(p: &mut Pipeline, rows: u64) -> anyhow::Result<()> {
    let pg = p.pg().await?;
    p.publish_workload_tables(&[TABLE]).await?;
    sluice_integration::pipeline::insert_bench_rows(&pg, TABLE, rows, ROWS_PER_TRANSACTION).await?;
    pg.batch_execute(&format!("VACUUM ANALYZE {TABLE}")).await?;
    let started = Instant::now();
    p.spawn_replicator()?;
    p.spawn_loader()?;
    let target = format!("`{}`.{TABLE}", p.config.clickhouse_database());
    p.wait_for_final_rows(
        &target,
        rows,
        Duration::from_secs(2),
        Duration::from_secs(3600),
    )
    .await?;
    p.stop_replicator().await?;
    p.stop_loader().await?;
    println!(
        "table: {rows} rows, replicated in {:.1?}",
        started.elapsed()
    );

    // (a) Baseline: both sides read raw.
    let started = Instant::now();
    let copy = pg
        .copy_out(&format!("COPY (SELECT * FROM {TABLE}) TO STDOUT"))
        .await
        .context("starting COPY")?;
    let mut copy = std::pin::pin!(copy);
    let mut pg_bytes = 0usize;
    while let Some(chunk) = copy.next().await {
        pg_bytes += chunk?.len();
    }
    let pg_read = started.elapsed();
    let ch = sluice_loader::clickhouse::client(&p.config.clickhouse)?;
    let mut cursor = ch
        .query_raw(&format!(
            "SELECT * FROM `{}`.{TABLE} FINAL",
            p.config.clickhouse_database()
        ))
        .fetch_bytes("TabSeparated")?;
    let mut ch_bytes = 0usize;
    while let Some(chunk) = cursor.next().await? {
        ch_bytes += chunk.len();
    }
    let baseline = started.elapsed();
    println!(
        "baseline read (postgres COPY {:.1} MB in {:.2?}, clickhouse FINAL {:.1} MB): {:.2?}",
        pg_bytes as f64 / 1e6,
        pg_read,
        ch_bytes as f64 / 1e6,
        baseline
    );

    // (b) verify, as an operator runs it.
    let started = Instant::now();
    let mut child = p.loader_command(&["verify", "--table", &format!("public.{TABLE}")])?;
    let pid = child.id();
    let mut peak_kb = 0;
    let status = loop {
        if let Ok(kb) = peak_rss_kb(pid) {
            peak_kb = peak_kb.max(kb);
        }
        if let Some(status) = child.try_wait()? {
            break status;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    };
    let took = started.elapsed();
    if !status.success() {
        bail!("verify exited {status}:\n{}", p.log_tail("loader-cli", 20));
    }
    println!(
        "sluice-loader verify: {took:.2?}, {:.0} rows/s, peak RSS {} MiB",
        rows as f64 / took.as_secs_f64(),
        peak_kb / 1024
    );
    println!(
        "ratio verify / raw read: {:.2}",
        took.as_secs_f64() / baseline.as_secs_f64()
    );
    Ok(())
}
