//! Loader insert rate against a raw RowBinary INSERT, measured in the same run.
//!
//! N rows (`SLUICE_BENCH_ROWS`, default 1,000,000) are inserted in Postgres
//! and published by the replicator into the stream (R1) while no loader runs;
//! the replicator then stops. Then, timed one after the other:
//!
//! - baseline: the same N rows (same columns, same types, a ReplacingMergeTree
//!   with the loader's engine and key) inserted with the `clickhouse` crate
//!   (a client built like the loader's: same `clickhouse.compression`)
//!   (`#[derive(Row, Serialize)]`, RowBinary) in INSERTs of as many rows as one
//!   loader batch holds (`batch_max_messages` x `package_max_rows` of the
//!   harness config), followed by one `count() FINAL`;
//! - sluice: `sluice-loader` started on the full stream, until
//!   `SELECT count() FROM <db>.bench_rows FINAL` equals N (polled every 50 ms,
//!   after a plain `count()` reached N: polling `FINAL` all along loaded the
//!   ClickHouse server that both sides share with a merge-read every 50 ms).
//!   This includes creating the target table, pulling, decompressing and
//!   decoding packages, the INSERTs and the loader's position writes.
//!
//! Prints rows/s of both, the ratio loader / raw, the CPU each side used
//! and the loader's peak RSS (`VmHWM`).
//!
//! ```text
//! set -a; . /tmp/sdev/stack/env; set +a
//! cargo bench -p sluice-integration --bench loader_insert
//! ```

use std::time::{Duration, Instant};

use anyhow::Context as _;
use serde::Serialize;
use sluice_integration::cpu;
use sluice_integration::pipeline::{Pipeline, Rng};
use sluice_integration::{clickhouse_count, clickhouse_sql};

const TABLE: &str = "bench_rows";
/// Rows per inserting Postgres transaction.
const ROWS_PER_TRANSACTION: u64 = 100_000;
const DEFAULT_ROWS: u64 = 1_000_000;

/// One row as the loader stores it (`_sluice_synced_at` takes its default).
#[derive(Debug, clickhouse::Row, Serialize)]
struct RawRow {
    id: i64,
    v: i64,
    s: Option<String>,
    _sluice_version: u128,
    _sluice_deleted: u8,
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let rows = sluice_integration::pipeline::count_from_env("SLUICE_BENCH_ROWS", DEFAULT_ROWS)?;
    let mut p = Pipeline::start("bench_load").await?;
    p.set_config_from_env()?;
    let (_, raw_db) = p.servers().fresh_clickhouse_database("bench_raw").await?;
    // A client built like the loader's, so both sides send their INSERTs
    // with the same `clickhouse.compression`; as the server's default user,
    // since the loader's may write only its own database.
    let mut admin = p.config.clickhouse.clone();
    admin.user = "default".into();
    admin.password = None;
    admin.password_file = None;
    let raw = sluice_loader::clickhouse::client(&admin)?.with_database(&raw_db);
    println!(
        "config: clickhouse.compression = {:?} (both sides)",
        p.config.clickhouse.compression
    );
    let result = run(&mut p, &raw, &raw_db, rows).await;
    let _ = p.stop_loader().await;
    let _ = p.stop_replicator().await;
    if let Err(e) = p
        .servers()
        .clickhouse_sql(&format!("DROP DATABASE IF EXISTS `{raw_db}`"))
        .await
    {
        eprintln!("dropping clickhouse database {raw_db}: {e:#}");
    }
    if result.is_err() {
        eprintln!("{}", p.log_tails());
    }
    result
}

async fn run(
    p: &mut Pipeline,
    raw: &clickhouse::Client,
    raw_db: &str,
    rows: u64,
) -> anyhow::Result<()> {
    let batch_rows = p.config.loader.batch_max_messages * p.config.replicator.package_max_rows;
    println!(
        "config: package_max_rows = {}, batch_max_messages = {}, batch_max_bytes = {} \
         => up to {batch_rows} rows per loader INSERT",
        p.config.replicator.package_max_rows,
        p.config.loader.batch_max_messages,
        p.config.loader.batch_max_bytes
    );

    // Fill the stream with the replicator alone.
    let started = Instant::now();
    let (messages, bytes) = p
        .fill_stream_alone(&[TABLE], rows, ROWS_PER_TRANSACTION)
        .await?;
    println!(
        "stream: {messages} messages, {:.1} MiB, filled in {:.1?} (insert + replicate)",
        bytes as f64 / (1024.0 * 1024.0),
        started.elapsed()
    );

    // (a) Baseline: raw RowBinary INSERTs of the same rows.
    clickhouse_sql(
        raw,
        &format!(
            "CREATE TABLE `{raw_db}`.{TABLE} (id Int64, v Int64, s Nullable(String), \
             _sluice_version UInt128, _sluice_deleted UInt8, \
             _sluice_synced_at DateTime64(6, 'UTC') DEFAULT now64(6)) \
             ENGINE = ReplacingMergeTree(_sluice_version, _sluice_deleted) ORDER BY (id)"
        ),
    )
    .await?;
    // Same shape as the Postgres rows: 32 hex characters of s, versions like
    // commit_lsn << 64 | ordinal. Built before the clock starts.
    let mut rng = Rng::new(7);
    let lsn_base = 0x1_0000_0000u128;
    let all: Vec<RawRow> = (1..=rows as i64)
        .map(|id| RawRow {
            id,
            v: id * 7,
            s: Some(format!("{:016x}{:016x}", rng.next_u64(), rng.next_u64())),
            _sluice_version: ((lsn_base + (id as u128 / batch_rows as u128)) << 64) | id as u128,
            _sluice_deleted: 0,
        })
        .collect();
    // CPU time of ClickHouse (every thread of its server) and of the loader,
    // in seconds: the ratio moves with the machine, CPU per row much less.
    let ch_pid = cpu::server_pid("clickhouse", &p.servers().clickhouse_url)?;
    let ch_cpu = || cpu::seconds(cpu::cpu_ticks(ch_pid));
    let ch_before = ch_cpu();
    let started = Instant::now();
    let mut inserts = 0;
    for chunk in all.chunks(batch_rows.max(1)) {
        let mut insert = raw.insert::<RawRow>(TABLE).await?;
        for row in chunk {
            insert.write(row).await?;
        }
        insert.end().await.context("raw insert")?;
        inserts += 1;
    }
    let raw_count = clickhouse_count(raw, &format!("`{raw_db}`.{TABLE} FINAL")).await?;
    let baseline = started.elapsed();
    let ch_raw = ch_cpu() - ch_before;
    anyhow::ensure!(
        raw_count == rows,
        "raw table holds {raw_count} rows, not {rows}"
    );
    drop(all);
    wait_for_merges(raw, Duration::from_secs(60)).await;

    // (b) The loader on the full stream.
    let target = format!("`{}`.{TABLE}", p.config.clickhouse_database());
    let ch_before = ch_cpu();
    let started = Instant::now();
    p.spawn_loader()?;
    let loader_pid = p.loader_pid().context("the loader's PID")?;
    p.wait_for_final_rows(
        &target,
        rows,
        Duration::from_millis(50),
        Duration::from_secs(3600),
    )
    .await?;
    let loader = started.elapsed();
    let (ch_loader, loader_cpu) = (
        ch_cpu() - ch_before,
        cpu::seconds(cpu::cpu_ticks(loader_pid)),
    );
    // `VmHWM`: the most the loader held at once through the backlog.
    let peak_mib = sluice_integration::pipeline::peak_rss_kb(loader_pid)? / 1024;
    p.stop_loader().await?;

    let rate = |d: Duration| rows as f64 / d.as_secs_f64();
    let (raw_rate, loader_rate) = (rate(baseline), rate(loader));
    let ratio = loader_rate / raw_rate;
    println!(
        "raw RowBinary INSERT ({inserts} INSERTs of <= {batch_rows} rows): {:>8.2} s  {:>10.0} rows/s",
        baseline.as_secs_f64(),
        raw_rate
    );
    println!(
        "sluice-loader (stream -> count() FINAL = N): {:>8.2} s  {:>10.0} rows/s  peak RSS {peak_mib} MiB",
        loader.as_secs_f64(),
        loader_rate
    );
    println!(
        "ratio loader / raw: {ratio:.2} (target >= 0.70, median of three runs: {})",
        if ratio >= 0.7 { "met" } else { "MISSED" }
    );
    let per_row = |seconds: f64| seconds / rows as f64 * 1e9;
    println!(
        "CPU, raw: clickhouse {ch_raw:.2} s ({:.0} ns/row); \
         loader side: clickhouse {ch_loader:.2} s ({:.0} ns/row) + sluice-loader {loader_cpu:.2} s ({:.0} ns/row)",
        per_row(ch_raw),
        per_row(ch_loader),
        per_row(loader_cpu)
    );
    Ok(())
}

/// Waits (best effort) until ClickHouse runs no merges, so the baseline's
/// background merges do not slow the loader's run.
async fn wait_for_merges(ch: &clickhouse::Client, timeout: Duration) {
    let deadline = Instant::now() + timeout;
    while Instant::now() < deadline {
        match clickhouse_sql(ch, "SELECT count() FROM system.merges").await {
            Ok(n) if n.trim() == "0" => return,
            Ok(_) => {}
            Err(_) => return,
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}
