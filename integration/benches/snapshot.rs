//! Initial snapshot rate against a plain `COPY … TO STDOUT`, measured in the
//! same run.
//!
//! A table of M rows (`SLUICE_BENCH_SNAPSHOT_ROWS`, default 5,000,000) exists
//! before the replicator ever ran. Then, timed one after the other:
//!
//! - baseline: `COPY bench_rows TO STDOUT` (text) read to the end by
//!   tokio-postgres and thrown away, after one untimed `count(*)` that warms
//!   the buffer cache for both sides;
//! - sluice: `sluice-replicator` started on a fresh slot, until the initial
//!   snapshot is fully acknowledged by JetStream (R1): the first heartbeat in
//!   the stream, which the replicator publishes only after the snapshot's
//!   publisher was flushed. The time of the "snapshot published" log line
//!   (the end marker queued) is printed too.
//!
//! - then the loader, started once the stream holds the snapshot, until the
//!   table is visible in ClickHouse (it is swapped in at RESYNC_END), with
//!   the loader's peak RSS (`VmHWM`).
//!
//! Packages and batches have the product's default sizes, not the test
//! harness' small ones (`Pipeline::use_default_batching`).
//!
//! The same `COPY` is also read over a connection opened the way sluice
//! opens its own (TLS with `sslmode=prefer`, the default, as the test
//! server has TLS on), and the bench prints the ratio against that too;
//! `SLUICE_BENCH_PG_SSLMODE=disable` makes sluice use plain TCP instead.
//!
//! Prints rows/s of both and the ratio snapshot / COPY, and the CPU time
//! each used (the Postgres server's, with every backend's; the replicator's
//! and NATS' for the snapshot) against what the machine's cores can give in
//! the time the 0.8 target allows. With
//! `SLUICE_BENCH_SNAPSHOT_KILL=1` the replicator is killed (kill -9) once half
//! of the table's chunks are read and started again: the time then includes
//! the restart, and the bench prints how many chunks were read twice.
//!
//! ```text
//! set -a; . /tmp/sdev/stack/env; set +a
//! cargo bench -p sluice-integration --bench snapshot
//! ```

use std::time::{Duration, Instant};

use anyhow::{Context as _, bail};
use futures::StreamExt as _;
use sluice_broker::topology;
use sluice_integration::cpu;
use sluice_integration::pipeline::{self, Pipeline};

const TABLE: &str = "bench_rows";
/// Rows per inserting transaction.
const ROWS_PER_TRANSACTION: u64 = 500_000;
const DEFAULT_ROWS: u64 = 5_000_000;

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let rows =
        sluice_integration::pipeline::count_from_env("SLUICE_BENCH_SNAPSHOT_ROWS", DEFAULT_ROWS)?;
    let mut p = Pipeline::start("bench_snapshot").await?;
    // Packages and batches as a user's config has them: the loader's peak
    // RSS (target < 150 MiB) depends on their sizes.
    p.use_default_batching()?;
    // `SLUICE_BENCH_PG_SSLMODE=disable`: sluice reads over plain TCP, as the
    // baseline does (by default it uses TLS, `sslmode=prefer`).
    if let Ok(mode) = std::env::var("SLUICE_BENCH_PG_SSLMODE") {
        let url = format!("\"{}?sslmode={mode}\"", p.pg_url);
        println!("config: postgres.url = {url} (SLUICE_BENCH_PG_SSLMODE)");
        p.set_configs("postgres", &[("url", &url)])?;
    }
    p.set_config_from_env()?;
    let result = run(&mut p, rows).await;
    let _ = p.stop_replicator().await;
    if result.is_err() {
        eprintln!("{}", p.log_tails());
    }
    result
}

/// Reads a `COPY … TO STDOUT` to its end, discarding it: how long, and how
/// many bytes.
async fn read_copy(pg: &tokio_postgres::Client, copy: &str) -> anyhow::Result<(Duration, usize)> {
    let started = Instant::now();
    let stream = pg.copy_out(copy).await.context("starting COPY")?;
    let mut stream = std::pin::pin!(stream);
    let mut bytes = 0usize;
    while let Some(chunk) = stream.next().await {
        bytes += chunk.context("reading COPY")?.len();
    }
    Ok((started.elapsed(), bytes))
}

async fn run(p: &mut Pipeline, rows: u64) -> anyhow::Result<()> {
    let pg = p.pg().await?;
    p.publish_workload_tables(&[TABLE]).await?;
    let started = Instant::now();
    sluice_integration::pipeline::insert_bench_rows(&pg, TABLE, rows, ROWS_PER_TRANSACTION).await?;
    pg.batch_execute(&format!("VACUUM ANALYZE {TABLE}")).await?;
    // The table's and the WAL's pages written out before anything is timed:
    // the kernel writing back the insert's 1-2 GiB of dirty pages took CPU
    // from whichever side ran meanwhile.
    pg.batch_execute("CHECKPOINT").await?;
    cpu::sync_disks()?;
    let size: String = pg
        .query_one(
            "SELECT pg_size_pretty(pg_table_size($1::text::regclass))",
            &[&TABLE],
        )
        .await?
        .get(0);
    println!(
        "table: {rows} rows, {size}, inserted in {:.1?}",
        started.elapsed()
    );
    println!("{}", cpu::memory_line());

    // CPU time of the Postgres server (every backend), NATS and the
    // replicator, in seconds.
    let servers = p.servers();
    let postmaster = cpu::server_pid("postgres", &servers.pg_url)?;
    let nats = cpu::server_pid("nats", &servers.nats_url)?;
    let pg_cpu = || cpu::seconds(cpu::tree_ticks(postmaster));
    let nats_cpu = || cpu::seconds(cpu::cpu_ticks(nats));

    // (a) Baseline: COPY TO STDOUT, read and dropped.
    let _: i64 = pg
        .query_one(&format!("SELECT count(*) FROM {TABLE}"), &[])
        .await?
        .get(0);
    let pg_before = pg_cpu();
    let (baseline, bytes) = read_copy(&pg, &format!("COPY {TABLE} TO STDOUT")).await?;
    let baseline_pg_cpu = pg_cpu() - pg_before;
    println!(
        "COPY TO STDOUT: {:.1} MiB of text",
        bytes as f64 / (1024.0 * 1024.0)
    );
    // For comparison only (not the baseline): the binary format, which
    // the replicator does not use.
    let (binary, bytes) =
        read_copy(&pg, &format!("COPY {TABLE} TO STDOUT (FORMAT binary)")).await?;
    println!(
        "COPY TO STDOUT (FORMAT binary, discarded): {:>8.2} s  {:>10.0} rows/s  {:.1} MiB",
        binary.as_secs_f64(),
        rows as f64 / binary.as_secs_f64(),
        bytes as f64 / (1024.0 * 1024.0)
    );

    // The same COPY over a connection opened the way sluice opens its own
    // (`sluice_postgres`, TLS as `postgres.url`'s sslmode says: `prefer`
    // by default, and the test server has TLS on). The snapshot's readers
    // pay for TLS on both ends; the plain baseline above does not.
    let settings = sluice_postgres::PgSettings::from_config(&p.config.postgres)?;
    let same = settings.connect("the bench's COPY").await?;
    let (same_baseline, _) = read_copy(&same.client, &format!("COPY {TABLE} TO STDOUT")).await?;
    drop(same);

    // (b) The replicator's initial snapshot, until acknowledged.
    let js = p.jetstream().await?;
    let heartbeat = topology::heartbeat_subject(&p.config.source);
    let log = p.dir.join("replicator.1.log");
    let (pg_before, nats_before) = (pg_cpu(), nats_cpu());
    let started = Instant::now();
    p.spawn_replicator()?;
    let deadline = started + Duration::from_secs(3600);
    let mut published_line = None;
    let mut started_line = None;
    let kill = std::env::var("SLUICE_BENCH_SNAPSHOT_KILL").is_ok_and(|v| v == "1");
    let chunks_series = format!("sluice_snapshot_chunks_total{{table=\"public.{TABLE}\"}}");
    // With SLUICE_BENCH_SNAPSHOT_KILL=1: chunks planned, and read by the
    // first run when it was killed.
    let mut killed: Option<(f64, f64)> = None;
    let mut stream = None;
    loop {
        p.check_alive()?;
        if kill && killed.is_none() {
            let planned = p
                .log_lines_containing("replicator", "snapshot divided into chunks")
                .first()
                .and_then(|line| {
                    line.split_whitespace()
                        .find_map(|f| f.strip_prefix("chunks="))
                        .and_then(|n| n.parse::<f64>().ok())
                });
            if let Some(planned) = planned
                && let Ok(metrics) = p.replicator_metrics().await
            {
                let read = pipeline::metric(&metrics, &chunks_series).unwrap_or(0.0);
                if read >= (planned / 2.0).floor() {
                    p.kill_9_replicator()?;
                    println!("replicator killed (kill -9) with {read} of {planned} chunks read");
                    killed = Some((planned, read));
                    p.spawn_replicator()?;
                }
            }
        }
        if started_line.is_none()
            && std::fs::read_to_string(&log)
                .map(|t| t.contains("snapshot started"))
                .unwrap_or(false)
        {
            started_line = Some(started.elapsed());
        }
        if published_line.is_none()
            && std::fs::read_to_string(&log)
                .map(|t| t.contains("snapshot published"))
                .unwrap_or(false)
        {
            published_line = Some(started.elapsed());
        }
        if stream.is_none() {
            stream = js.get_stream(p.config.stream_name()).await.ok();
        }
        if let Some(stream) = &stream
            && stream
                .get_last_raw_message_by_subject(&heartbeat)
                .await
                .is_ok()
        {
            break;
        }
        if Instant::now() > deadline {
            bail!("the snapshot was not acknowledged within an hour");
        }
        // Often enough that the poll adds little to the time (about 2.5 ms
        // on average), with one request per poll.
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    let sluice = started.elapsed();
    let stored = js
        .get_stream(p.config.stream_name())
        .await?
        .info()
        .await?
        .state
        .bytes;
    let snapshot_cpu = [
        ("postgres", pg_cpu() - pg_before),
        (
            "replicator",
            cpu::seconds(p.replicator_pid().and_then(cpu::cpu_ticks)),
        ),
        ("nats", nats_cpu() - nats_before),
    ];
    if let Some((planned, read_before)) = killed {
        let metrics = p.replicator_metrics().await?;
        let read_after = pipeline::metric(&metrics, &chunks_series).unwrap_or(0.0);
        let finished = p
            .log_lines_containing("replicator", "snapshot resumed")
            .last()
            .and_then(|line| {
                line.split_whitespace()
                    .find_map(|f| f.strip_prefix("finished="))
                    .map(str::to_owned)
            })
            .unwrap_or_default();
        println!(
            "after the restart: {finished} chunks recorded as finished, {read_after} read; \
             chunks read to their end twice: {} (besides, the chunks being read at the kill, \
             one per connection, were read again)",
            read_before + read_after - planned
        );
    }
    p.stop_replicator().await?;

    // (c) The loader, started once the stream holds the snapshot: until the
    // table is visible in ClickHouse (swapped in at RESYNC_END), and its
    // peak RSS meanwhile.
    let servers = sluice_integration::Servers::get();
    let count_sql = format!(
        "SELECT count() FROM `{}`.`{TABLE}`",
        p.config.clickhouse_database()
    );
    let started = Instant::now();
    p.spawn_loader()?;
    let pid = p.loader_pid().context("loader not running")?;
    let mut peak_kb = 0;
    loop {
        p.check_alive()?;
        peak_kb = peak_kb.max(pipeline::peak_rss_kb(pid)?);
        let visible: u64 = servers
            .clickhouse_sql(&count_sql)
            .await
            .ok()
            .and_then(|text| text.trim().parse().ok())
            .unwrap_or(0);
        if visible >= rows {
            break;
        }
        if Instant::now() > deadline {
            bail!("the snapshot was not visible in ClickHouse within an hour");
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let loaded = started.elapsed();
    peak_kb = peak_kb.max(pipeline::peak_rss_kb(pid)?);
    p.stop_loader().await?;

    let rate = |d: Duration| rows as f64 / d.as_secs_f64();
    let (copy_rate, sluice_rate) = (rate(baseline), rate(sluice));
    let ratio = sluice_rate / copy_rate;
    println!(
        "COPY TO STDOUT (tokio-postgres, discarded): {:>8.2} s  {:>10.0} rows/s",
        baseline.as_secs_f64(),
        copy_rate
    );
    if let Some(at) = started_line {
        println!(
            "sluice-replicator \"snapshot started\" log line after {:.2} s",
            at.as_secs_f64()
        );
    }
    if let Some(at) = published_line {
        println!(
            "sluice-replicator \"snapshot published\" log line after {:.2} s",
            at.as_secs_f64()
        );
    }
    println!(
        "sluice-replicator initial snapshot (-> JetStream R1, acknowledged): {:>8.2} s  {:>10.0} rows/s",
        sluice.as_secs_f64(),
        sluice_rate
    );
    println!("ratio snapshot / COPY: {ratio:.2}");
    println!(
        "COPY TO STDOUT over a connection opened as sluice opens its own (sslmode {:?}): {:>8.2} s  {:>10.0} rows/s",
        settings.tls.mode,
        same_baseline.as_secs_f64(),
        rate(same_baseline)
    );
    println!(
        "ratio snapshot / COPY over the same kind of connection: {:.2}",
        sluice_rate / rate(same_baseline)
    );
    println!(
        "stream after the snapshot: {:.1} MiB (replicator.snapshot_compression = {:?})",
        stored as f64 / (1024.0 * 1024.0),
        p.config.replicator.snapshot_compression
    );
    // What 0.8 would take: the snapshot's CPU within the time it allows.
    let cores = std::thread::available_parallelism().map_or(1, |n| n.get());
    let allowed = baseline.as_secs_f64() / 0.8;
    let used: f64 = snapshot_cpu.iter().map(|(_, s)| s).sum();
    println!(
        "CPU, COPY TO STDOUT: postgres {baseline_pg_cpu:.2} s ({:.0} ns/row)",
        baseline_pg_cpu / rows as f64 * 1e9
    );
    println!(
        "CPU, snapshot: {} = {used:.2} s over {:.2} s on {cores} cores",
        snapshot_cpu
            .iter()
            .map(|(name, s)| format!("{name} {s:.2} s ({:.0} ns/row)", s / rows as f64 * 1e9))
            .collect::<Vec<_>>()
            .join(" + "),
        sluice.as_secs_f64()
    );
    println!(
        "CPU at 0.8 of COPY: the snapshot would have {allowed:.2} s, {:.2} s of CPU on {cores} cores; it used {:.0} % of that",
        allowed * cores as f64,
        used / (allowed * cores as f64) * 100.0
    );
    println!(
        "sluice-loader, started after that, until the table is visible in ClickHouse: {:>8.2} s  {:>10.0} rows/s  peak RSS {} MiB",
        loaded.as_secs_f64(),
        rate(loaded),
        peak_kb / 1024
    );
    Ok(())
}
