//! Steady-state end-to-end lag at fixed change rates.
//!
//! A writer inserts rows into `lag_rows (id bigint PRIMARY KEY, v bigint,
//! created timestamptz DEFAULT clock_timestamp())` at a fixed rate (one
//! INSERT statement, i.e. one transaction, every 10 ms carrying the rows that
//! are due), while `sluice-replicator` and `sluice-loader` run. Each row's
//! lag is `_sluice_synced_at - created`: ClickHouse fills `_sluice_synced_at`
//! with `now64(6)` when it receives the loader's INSERT, and `created` is the
//! Postgres clock when the row was written (same machine, same clock). The
//! first 3 s of each rate are warm-up and not counted.
//!
//! The writer commits with `synchronous_commit = on`. The pipeline runs with
//! the product's default batching (loader and replicator), then any
//! `SLUICE_BENCH_CONFIG` overrides. Rates come from `SLUICE_BENCH_RATES`
//! (changes/s, default `5000,20000`), the measured time from
//! `SLUICE_BENCH_SECONDS` (default 20).
//!
//! For each rate it also prints the CPU time each process used while the
//! rows were written (the writing session, the walsender, the replicator,
//! NATS, the loader, ClickHouse): the per-stage costs of the capacity model
//! in docs/scaling.md.
//!
//! ```text
//! set -a; . /tmp/sdev/stack/env; set +a
//! cargo bench -p sluice-integration --bench steady_lag
//! ```

use std::time::{Duration, Instant};

use anyhow::{Context as _, bail};
use sluice_integration::clickhouse_sql;
use sluice_integration::cpu::{self, Stage, StageCpu};
use sluice_integration::pipeline::{Pipeline, count_from_env};

const TABLE: &str = "lag_rows";
const TICK: Duration = Duration::from_millis(10);
const WARM_UP: Duration = Duration::from_secs(3);

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let rates: Vec<u64> = std::env::var("SLUICE_BENCH_RATES")
        .unwrap_or_else(|_| "5000,20000".into())
        .split(',')
        .map(|r| {
            r.trim()
                .parse()
                .context("SLUICE_BENCH_RATES: a list of changes/s")
        })
        .collect::<anyhow::Result<_>>()?;
    let seconds = count_from_env("SLUICE_BENCH_SECONDS", 20)?;
    let mut p = Pipeline::start("bench_lag").await?;
    // The test harness's small batches are not what users run: measure the
    // product's defaults, then whatever SLUICE_BENCH_CONFIG says.
    let loader = sluice_broker::config::LoaderConfig::default();
    let replicator = sluice_broker::config::ReplicatorConfig::default();
    p.set_configs(
        "loader",
        &[
            ("batch_max_messages", &loader.batch_max_messages.to_string()),
            (
                "batch_max_wait",
                &format!("\"{}ms\"", loader.batch_max_wait.as_millis()),
            ),
        ],
    )?;
    p.set_config(
        "replicator",
        "package_max_rows",
        &replicator.package_max_rows.to_string(),
    )?;
    p.set_config_from_env()?;
    let result = run(&mut p, &rates, Duration::from_secs(seconds)).await;
    let _ = p.stop_loader().await;
    let _ = p.stop_replicator().await;
    if result.is_err() {
        eprintln!("{}", p.log_tails());
    }
    result
}

async fn run(p: &mut Pipeline, rates: &[u64], measured: Duration) -> anyhow::Result<()> {
    println!(
        "config: package_max_rows = {}, loader batch_max_messages = {}, batch_min_interval = {:?}, batch_max_wait = {:?}",
        p.config.replicator.package_max_rows,
        p.config.loader.batch_max_messages,
        p.config.loader.batch_min_interval,
        p.config.loader.batch_max_wait
    );
    let pg = p.pg().await?;
    // The test servers run with `synchronous_commit = off`, which Postgres'
    // default is not: its WAL writer then flushes commits up to
    // `wal_writer_delay` (200 ms) late, and logical decoding sends only
    // flushed WAL. Measure the writes as a default server would make them.
    pg.batch_execute("SET synchronous_commit = on").await?;
    pg.batch_execute(&format!(
        "CREATE TABLE {TABLE} (id bigint PRIMARY KEY, v bigint NOT NULL,
             created timestamptz NOT NULL DEFAULT clock_timestamp());
         CREATE PUBLICATION sluice FOR TABLE {TABLE};"
    ))
    .await?;
    p.spawn_replicator()?;
    p.spawn_loader()?;
    // A first row (id 0) so the loader creates the table.
    pg.batch_execute(&format!("INSERT INTO {TABLE} (id, v) VALUES (0, 0)"))
        .await?;
    p.wait_until_equal(Duration::from_secs(120)).await?;

    let cpu = stages(p, &pg).await?;
    let ch = p.servers().clickhouse();
    let target = format!("`{}`.{TABLE}", p.config.clickhouse_database());
    let mut next_id = 1i64;
    for &rate in rates {
        // Warm-up rows, then the measured ones.
        next_id = write_at(&pg, rate, WARM_UP, next_id).await?;
        let first = next_id;
        let started = Instant::now();
        let cpu_before = cpu.sample();
        next_id = write_at(&pg, rate, measured, next_id).await?;
        let cpu_after = cpu.sample();
        let wrote_for = started.elapsed();
        let last = next_id - 1;
        // Ids 0..=last.
        p.wait_for_final_rows(
            &target,
            last as u64 + 1,
            Duration::from_millis(200),
            Duration::from_secs(600),
        )
        .await?;
        let line = clickhouse_sql(
            &ch,
            &format!(
                "SELECT count(), quantileExact(0.5)(d), quantileExact(0.99)(d), max(d) FROM (
                     SELECT toUnixTimestamp64Micro(min(_sluice_synced_at))
                            - toUnixTimestamp64Micro(min(created)) AS d
                     FROM {target} WHERE id BETWEEN {first} AND {last} GROUP BY id)"
            ),
        )
        .await?;
        let fields: Vec<f64> = line
            .split_whitespace()
            .map(|f| f.parse::<f64>().context("lag query result"))
            .collect::<anyhow::Result<_>>()?;
        let [n, p50, p99, max] = fields[..] else {
            bail!("unexpected lag query result {line:?}");
        };
        // Issue targets: p99 < 250 ms at 5,000/s, < 1 s at 150,000/s.
        let target_ms = match rate {
            5000 => Some(250.0),
            150_000 => Some(1000.0),
            _ => None,
        };
        let verdict = match target_ms {
            None => "no target at this rate".to_owned(),
            Some(t) if p99 / 1e3 < t => format!("p99 target < {t} ms: met"),
            Some(t) => format!("p99 target < {t} ms: MISSED"),
        };
        println!(
            "{rate:>6} changes/s target, {:>7.0} achieved over {:.1?}: {n} rows, lag p50 {:.0} ms, p99 {:.0} ms, max {:.0} ms ({verdict})",
            (last - first + 1) as f64 / wrote_for.as_secs_f64(),
            wrote_for,
            p50 / 1e3,
            p99 / 1e3,
            max / 1e3,
        );
        println!(
            "CPU per stage while writing (rows = those written; a stage that fell behind shows less):\n{}",
            cpu.report(&cpu_before, &cpu_after, (last - first + 1) as u64)
        );
    }
    Ok(())
}

/// The processes of the pipeline whose CPU time is reported: the servers
/// found by the loopback port they listen on, Postgres' walsender of the
/// slot and the writing session by their PIDs.
async fn stages(p: &Pipeline, pg: &tokio_postgres::Client) -> anyhow::Result<StageCpu> {
    let walsender: i32 = pg
        .query_one(
            "SELECT active_pid FROM pg_replication_slots WHERE slot_name = $1",
            &[&p.config.postgres.slot],
        )
        .await?
        .get(0);
    let writer: i32 = pg.query_one("SELECT pg_backend_pid()", &[]).await?.get(0);
    let servers = p.servers();
    let listening =
        |name: &'static str, url: &str| cpu::server_pid(name, url).map(|pid| Stage { name, pid });
    Ok(StageCpu::new(vec![
        Stage {
            name: "pg writer",
            pid: writer as u32,
        },
        Stage {
            name: "walsender",
            pid: walsender as u32,
        },
        Stage {
            name: "replicator",
            pid: p.replicator_pid().context("replicator not running")?,
        },
        listening("nats", &servers.nats_url)?,
        Stage {
            name: "loader",
            pid: p.loader_pid().context("loader not running")?,
        },
        listening("clickhouse", &servers.clickhouse_url)?,
    ]))
}

/// Inserts `rate` rows per second for `duration`, ids from `next_id`, one
/// statement per tick with the rows due by then. Returns the next free id.
async fn write_at(
    pg: &tokio_postgres::Client,
    rate: u64,
    duration: Duration,
    mut next_id: i64,
) -> anyhow::Result<i64> {
    let started = Instant::now();
    let mut sent = 0u64;
    let mut tick = tokio::time::interval(TICK);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    while started.elapsed() < duration {
        tick.tick().await;
        let due = (rate as f64 * started.elapsed().as_secs_f64()) as u64;
        if due <= sent {
            continue;
        }
        let last = next_id + (due - sent) as i64 - 1;
        pg.batch_execute(&format!(
            "INSERT INTO {TABLE} (id, v) SELECT g, g FROM generate_series({next_id}, {last}) g"
        ))
        .await
        .context("writing rows")?;
        sent = due;
        next_id = last + 1;
    }
    Ok(next_id)
}
