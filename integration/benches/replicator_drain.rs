//! Replicator drain rate against `pg_recvlogical`, measured in the same run.
//!
//! A backlog of N inserted rows (`SLUICE_BENCH_ROWS`, default 1,000,000) waits
//! in the WAL behind two slots: one of the replicator (created by a first run
//! that finished the empty initial snapshot) and one of `pg_recvlogical`
//! (created before the rows). Then, timed one after the other:
//!
//! - baseline: `pg_recvlogical --start` with pgoutput (proto v1, publication
//!   `sluice`) writing to /dev/null until `--endpos`, the WAL position after
//!   the last insert;
//! - sluice: the restarted `sluice-replicator` until its slot's
//!   `confirmed_flush_lsn` reaches that position. The replicator only confirms
//!   what JetStream acknowledged (R1 stream), so this is the time to decode,
//!   package, compress and durably publish every change.
//!
//! The backlog is past `replicator.catchup_min_lag_bytes`, so the replicator
//! reads it through SQL before it streams (see `sluice_replicator::backlog`);
//! `SLUICE_BENCH_CONFIG=replicator.catchup_min_lag_bytes=0` measures the
//! walsender alone.
//!
//! Prints rows/s of both and the ratio replicator / pg_recvlogical. Then one
//! row is inserted and the time until the slot confirms it is printed: how
//! soon a change written after a catch-up flows (status updates every 100 ms
//! in this run). The walsender starts decoding at the slot's restart point,
//! which a backlog written in seconds leaves before it unless the replicator
//! moved it past.
//!
//! ```text
//! set -a; . /tmp/sdev/stack/env; set +a
//! cargo bench -p sluice-integration --bench replicator_drain
//! ```

use std::path::PathBuf;
use std::process::Command;
use std::time::{Duration, Instant};

use anyhow::{Context as _, ensure};
use sluice_integration::pipeline::Pipeline;
use sluice_integration::{Servers, wal_insert_lsn};

const TABLE: &str = "bench_rows";
/// Rows per inserting transaction.
const ROWS_PER_TRANSACTION: u64 = 100_000;
const DEFAULT_ROWS: u64 = 1_000_000;

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let rows = sluice_integration::pipeline::count_from_env("SLUICE_BENCH_ROWS", DEFAULT_ROWS)?;
    let pg_bin = pg_bin_dir();
    let recvlogical = pg_bin.join("pg_recvlogical");
    ensure!(
        recvlogical.exists(),
        "{} not found (set SLUICE_BENCH_PG_BIN to the Postgres bin directory)",
        recvlogical.display()
    );

    let mut p = Pipeline::start("bench_drain").await?;
    p.set_config_from_env()?;
    let recv_slot = format!("{}_recv", p.name);
    let result = run(&mut p, rows, &recvlogical, &recv_slot).await;
    // The pipeline's drop removes its own slot, database and stream; the
    // baseline's slot is ours to drop (it would pin WAL on the shared server).
    let _ = p.stop_replicator().await;
    if let Err(e) = drop_slot(&recv_slot).await {
        eprintln!("dropping slot {recv_slot}: {e:#}");
    }
    if result.is_err() {
        eprintln!("{}", p.log_tails());
    }
    result
}

async fn run(
    p: &mut Pipeline,
    rows: u64,
    recvlogical: &std::path::Path,
    recv_slot: &str,
) -> anyhow::Result<()> {
    let pg = p.pg().await?;
    p.publish_workload_tables(&[TABLE]).await?;

    // First run: the replicator creates its slot and publishes the (empty)
    // initial snapshot; the first heartbeat in the stream says it is done.
    p.spawn_replicator()?;
    p.wait_for_heartbeat(Duration::from_secs(120)).await?;
    p.stop_replicator().await?;

    // The baseline's slot, before the rows, so it sees the same backlog.
    let status = Command::new(recvlogical)
        .args(["-d", &p.pg_url, "--slot", recv_slot])
        .args(["--create-slot", "-P", "pgoutput"])
        .status()
        .context("running pg_recvlogical --create-slot")?;
    ensure!(status.success(), "pg_recvlogical --create-slot: {status}");

    let started = Instant::now();
    sluice_integration::pipeline::insert_bench_rows(&pg, TABLE, rows, ROWS_PER_TRANSACTION).await?;
    let end_lsn = wal_insert_lsn(&pg).await?;
    let wal_bytes: i64 = pg
        .query_one(
            "SELECT ($1::text::pg_lsn - confirmed_flush_lsn)::bigint FROM pg_replication_slots WHERE slot_name = $2",
            &[&end_lsn, &p.name],
        )
        .await?
        .get(0);
    println!(
        "backlog: {rows} rows in {} transactions, {:.1} MiB of WAL, inserted in {:.1?}; end LSN {end_lsn}",
        rows.div_ceil(ROWS_PER_TRANSACTION),
        wal_bytes as f64 / (1024.0 * 1024.0),
        started.elapsed()
    );

    // (a) pg_recvlogical to the end LSN.
    let started = Instant::now();
    let status = Command::new(recvlogical)
        .args(["-d", &p.pg_url, "--slot", recv_slot, "--start", "--no-loop"])
        .args(["-o", "proto_version=1", "-o", "publication_names=sluice"])
        .arg(format!("--endpos={end_lsn}"))
        .args(["-f", "/dev/null"])
        .status()
        .context("running pg_recvlogical --start")?;
    let baseline = started.elapsed();
    ensure!(status.success(), "pg_recvlogical --start: {status}");

    // (b) the replicator, from its confirmed LSN to the end LSN.
    p.set_config("replicator", "status_interval", "\"100ms\"")?;
    let started = Instant::now();
    p.spawn_replicator()?;
    p.wait_slot_confirmed(&end_lsn, Duration::from_secs(3600))
        .await?;
    let sluice = started.elapsed();

    // (c) one change after the backlog, until the slot confirms it.
    let started = Instant::now();
    pg.execute(
        &format!("INSERT INTO {TABLE} (id, v, s) VALUES ($1, 0, 'after')"),
        &[&(rows as i64 + 1)],
    )
    .await?;
    let after_lsn = wal_insert_lsn(&pg).await?;
    p.wait_slot_confirmed(&after_lsn, Duration::from_secs(600))
        .await?;
    let after = started.elapsed();
    let restart: String = pg
        .query_one(
            "SELECT restart_lsn::text FROM pg_replication_slots WHERE slot_name = $1",
            &[&p.name],
        )
        .await?
        .get(0);
    p.stop_replicator().await?;

    let rate = |d: Duration| rows as f64 / d.as_secs_f64();
    let (baseline_rate, sluice_rate) = (rate(baseline), rate(sluice));
    let ratio = sluice_rate / baseline_rate;
    println!(
        "pg_recvlogical (pgoutput -> /dev/null): {:>8.2} s  {:>10.0} rows/s",
        baseline.as_secs_f64(),
        baseline_rate
    );
    println!(
        "sluice-replicator (-> JetStream R1, confirmed): {:>8.2} s  {:>10.0} rows/s",
        sluice.as_secs_f64(),
        sluice_rate
    );
    println!(
        "ratio replicator / pg_recvlogical: {ratio:.2} (target >= 0.70: {})",
        if ratio >= 0.7 { "met" } else { "MISSED" }
    );
    println!(
        "a change written after the backlog, confirmed {:.2} s later (the slot's restart point then {restart}, the backlog's end {end_lsn})",
        after.as_secs_f64()
    );
    Ok(())
}

async fn drop_slot(slot: &str) -> anyhow::Result<()> {
    let admin = Servers::pg_connect(&Servers::get().pg_url).await?;
    admin
        .execute(
            "SELECT pg_drop_replication_slot(slot_name) FROM pg_replication_slots WHERE slot_name = $1",
            &[&slot],
        )
        .await?;
    Ok(())
}

fn pg_bin_dir() -> PathBuf {
    std::env::var_os("SLUICE_BENCH_PG_BIN")
        .map(PathBuf::from)
        .unwrap_or_else(|| PathBuf::from("/usr/lib/postgresql/15/bin"))
}
