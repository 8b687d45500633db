//! End to end against ClickHouse's own `MaterializedPostgreSQL` database
//! engine, on the same backlog, in the same run.
//!
//! One table `(id bigint PRIMARY KEY, v bigint NOT NULL, s text)` in the
//! pipeline's Postgres database is replicated by both systems:
//!
//! - sluice: a first replicator run creates the slot and the (empty) initial
//!   snapshot, then stops;
//! - `MaterializedPostgreSQL`: a database in the same ClickHouse server, on
//!   the same table, connecting as a role of its own. Once its initial load
//!   is done, the role loses `LOGIN` and its connections are terminated, so
//!   the engine stops reading (it retries every 100 ms:
//!   `materialized_postgresql_backoff_max_ms = 100`).
//!
//! Then N rows (`SLUICE_BENCH_ROWS`, default 1,000,000) are inserted in
//! transactions of 100,000: a backlog behind both slots. Timed one after the
//! other, each from the moment it may start until `count()` in ClickHouse is
//! N (polled every 100 ms):
//!
//! - sluice: `sluice-replicator` and `sluice-loader` started together on the
//!   backlog, counted with `FINAL` (once the plain `count()` reached N);
//! - `MaterializedPostgreSQL`: its role gets `LOGIN` back.
//!
//! The replicator is far enough behind to read the backlog through SQL, as
//! `MaterializedPostgreSQL` does (`pg_logical_slot_get_binary_changes`);
//! `SLUICE_BENCH_CONFIG=replicator.catchup_min_lag_bytes=0` makes it stream
//! from the walsender instead.
//!
//! Prints both times and how many times faster sluice was, and the CPU time
//! each side used: the Postgres server's (every backend), ClickHouse's, and
//! for sluice NATS' and its two processes'.
//!
//! ```text
//! set -a; . /tmp/sdev/stack/env; set +a
//! cargo bench -p sluice-integration --bench end_to_end
//! ```

use std::time::{Duration, Instant};

use anyhow::{Context as _, bail};
use sluice_integration::pipeline::Pipeline;
use sluice_integration::{clickhouse_count, clickhouse_sql, cpu};

const TABLE: &str = "bench_rows";
/// Rows per inserting transaction.
const ROWS_PER_TRANSACTION: u64 = 100_000;
const DEFAULT_ROWS: u64 = 1_000_000;
const POLL: Duration = Duration::from_millis(100);

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let rows = sluice_integration::pipeline::count_from_env("SLUICE_BENCH_ROWS", DEFAULT_ROWS)?;
    let mut p = Pipeline::start("bench_e2e").await?;
    p.set_config_from_env()?;
    let other = Other::new(&p)?;
    let result = run(&mut p, &other, rows).await;
    let _ = p.stop_loader().await;
    let _ = p.stop_replicator().await;
    if let Err(e) = other.drop(&p).await {
        eprintln!("cleaning up MaterializedPostgreSQL: {e:#}");
    }
    if result.is_err() {
        eprintln!("{}", p.log_tails());
    }
    result
}

async fn run(p: &mut Pipeline, other: &Other, rows: u64) -> anyhow::Result<()> {
    let pg = p.pg().await?;
    p.publish_workload_tables(&[TABLE]).await?;
    p.spawn_replicator()?;
    p.wait_for_heartbeat(Duration::from_secs(120)).await?;
    p.stop_replicator().await?;
    other.create(p).await?;
    other.pause(p).await?;

    let started = Instant::now();
    sluice_integration::pipeline::insert_bench_rows(&pg, TABLE, rows, ROWS_PER_TRANSACTION).await?;
    let wal: String = pg
        .query_one(
            "SELECT pg_size_pretty(pg_current_wal_insert_lsn() - confirmed_flush_lsn) \
             FROM pg_replication_slots WHERE slot_name = $1",
            &[&p.name],
        )
        .await?
        .get(0);
    println!(
        "backlog: {rows} rows in {} transactions, {wal} of WAL behind both slots, inserted in {:.1?}",
        rows.div_ceil(ROWS_PER_TRANSACTION),
        started.elapsed()
    );
    println!("{}", cpu::memory_line());

    // CPU seconds of the servers: Postgres (every backend), NATS, ClickHouse.
    let servers = p.servers();
    let postmaster = cpu::server_pid("postgres", &servers.pg_url)?;
    let nats = cpu::server_pid("nats", &servers.nats_url)?;
    let clickhouse = cpu::server_pid("clickhouse", &servers.clickhouse_url)?;
    let server_cpu = || {
        [
            cpu::seconds(cpu::tree_ticks(postmaster)),
            cpu::seconds(cpu::cpu_ticks(nats)),
            cpu::seconds(cpu::tree_ticks(clickhouse)),
        ]
    };

    // (a) sluice: both binaries on the backlog.
    let ch = p.servers().clickhouse();
    let target = format!("`{}`.{TABLE}", p.config.clickhouse_database());
    let before = server_cpu();
    let started = Instant::now();
    p.spawn_replicator()?;
    p.spawn_loader()?;
    p.wait_for_final_rows(&target, rows, POLL, Duration::from_secs(3600))
        .await?;
    let sluice = started.elapsed();
    let after = server_cpu();
    let sluice_cpu = [
        ("postgres", after[0] - before[0]),
        (
            "replicator",
            cpu::seconds(p.replicator_pid().and_then(cpu::cpu_ticks)),
        ),
        ("nats", after[1] - before[1]),
        (
            "loader",
            cpu::seconds(p.loader_pid().and_then(cpu::cpu_ticks)),
        ),
        ("clickhouse", after[2] - before[2]),
    ];
    p.stop_loader().await?;
    p.stop_replicator().await?;
    println!(
        "sluice (replicator + loader -> count() FINAL = N): {:>8.2} s  {:>10.0} rows/s",
        sluice.as_secs_f64(),
        rows as f64 / sluice.as_secs_f64()
    );

    // (b) MaterializedPostgreSQL on the same backlog.
    let before = server_cpu();
    let started = Instant::now();
    other.resume(p).await?;
    loop {
        if clickhouse_count(&ch, &other.table()).await.unwrap_or(0) == rows {
            break;
        }
        if started.elapsed() > Duration::from_secs(3600) {
            bail!("{} did not reach {rows} rows", other.table());
        }
        tokio::time::sleep(POLL).await;
    }
    let theirs = started.elapsed();
    let after = server_cpu();
    let their_cpu = [
        ("postgres", after[0] - before[0]),
        ("clickhouse", after[2] - before[2]),
    ];
    println!(
        "MaterializedPostgreSQL (-> count() = N):        {:>8.2} s  {:>10.0} rows/s",
        theirs.as_secs_f64(),
        rows as f64 / theirs.as_secs_f64()
    );
    let cores = std::thread::available_parallelism().map_or(1, |n| n.get());
    for (name, wall, used) in [
        ("sluice", sluice, &sluice_cpu[..]),
        ("MaterializedPostgreSQL", theirs, &their_cpu[..]),
    ] {
        let total: f64 = used.iter().map(|(_, s)| s).sum();
        println!(
            "CPU, {name}: {} = {total:.2} s over {:.2} s on {cores} cores",
            used.iter()
                .map(|(stage, s)| format!("{stage} {s:.2} s ({:.0} ns/row)", s / rows as f64 * 1e9))
                .collect::<Vec<_>>()
                .join(" + "),
            wall.as_secs_f64()
        );
    }
    // What 2x would take: sluice's whole pipeline within half of
    // MaterializedPostgreSQL's time, and how much of that CPU the two
    // servers sluice cannot do without (Postgres decoding, ClickHouse
    // inserting and merging) used on their own.
    let allowed = theirs.as_secs_f64() / 2.0 * cores as f64;
    let used: f64 = sluice_cpu.iter().map(|(_, s)| s).sum();
    let servers: f64 = sluice_cpu
        .iter()
        .filter(|(stage, _)| matches!(*stage, "postgres" | "clickhouse"))
        .map(|(_, s)| s)
        .sum();
    println!(
        "CPU at 2x MaterializedPostgreSQL: sluice would have {:.2} s, {allowed:.2} s of CPU on {cores} cores; it used {:.0} % of that, Postgres and ClickHouse alone {:.0} %",
        theirs.as_secs_f64() / 2.0,
        used / allowed * 100.0,
        servers / allowed * 100.0
    );
    let speedup = theirs.as_secs_f64() / sluice.as_secs_f64();
    println!(
        "sluice is {speedup:.2}x as fast as MaterializedPostgreSQL (target >= 2, median of three runs: {})",
        if speedup >= 2.0 { "met" } else { "MISSED" }
    );
    Ok(())
}

/// The `MaterializedPostgreSQL` database and the Postgres role it connects as.
struct Other {
    database: String,
    role: String,
    host: String,
    port: u16,
    pg_database: String,
}

impl Other {
    fn new(p: &Pipeline) -> anyhow::Result<Other> {
        let config: tokio_postgres::Config = p.pg_url.parse().context("parsing the pg url")?;
        let host = match config.get_hosts().first() {
            Some(tokio_postgres::config::Host::Tcp(host)) => host.clone(),
            _ => bail!("the Postgres url must name a TCP host"),
        };
        Ok(Other {
            database: format!("{}_mpg", p.name),
            role: format!("{}_mpg", p.name),
            host,
            port: config.get_ports().first().copied().unwrap_or(5432),
            pg_database: config
                .get_dbname()
                .context("pg url without database")?
                .into(),
        })
    }

    fn table(&self) -> String {
        format!("`{}`.{TABLE}", self.database)
    }

    async fn create(&self, p: &Pipeline) -> anyhow::Result<()> {
        // It creates its own publication and slot, hence superuser.
        p.pg()
            .await?
            .batch_execute(&format!(
                "CREATE ROLE \"{}\" LOGIN REPLICATION SUPERUSER",
                self.role
            ))
            .await?;
        let ch = p
            .servers()
            .clickhouse()
            .with_setting("allow_experimental_database_materialized_postgresql", "1");
        clickhouse_sql(
            &ch,
            &format!(
                "CREATE DATABASE `{}` ENGINE = MaterializedPostgreSQL('{}:{}', '{}', '{}', '') \
                 SETTINGS materialized_postgresql_tables_list = '{TABLE}', \
                 materialized_postgresql_backoff_max_ms = 100",
                self.database, self.host, self.port, self.pg_database, self.role
            ),
        )
        .await?;
        let deadline = Instant::now() + Duration::from_secs(60);
        while clickhouse_count(&ch, &self.table()).await.is_err() {
            if Instant::now() > deadline {
                bail!("MaterializedPostgreSQL did not create {}", self.table());
            }
            tokio::time::sleep(POLL).await;
        }
        Ok(())
    }

    async fn pause(&self, p: &Pipeline) -> anyhow::Result<()> {
        p.pg()
            .await?
            .batch_execute(&format!(
                "ALTER ROLE \"{0}\" NOLOGIN;
                 SELECT pg_terminate_backend(pid) FROM pg_stat_activity WHERE usename = '{0}';",
                self.role
            ))
            .await?;
        Ok(())
    }

    async fn resume(&self, p: &Pipeline) -> anyhow::Result<()> {
        p.pg()
            .await?
            .batch_execute(&format!("ALTER ROLE \"{}\" LOGIN", self.role))
            .await?;
        Ok(())
    }

    /// Drops the database (which drops its slot and publication), then the role.
    async fn drop(&self, p: &Pipeline) -> anyhow::Result<()> {
        p.servers()
            .clickhouse_sql(&format!("DROP DATABASE IF EXISTS `{}` SYNC", self.database))
            .await?;
        let pg = p.pg().await?;
        pg.batch_execute(&format!(
            "SELECT pg_terminate_backend(pid) FROM pg_stat_activity WHERE usename = '{0}';
             SELECT pg_drop_replication_slot(slot_name) FROM pg_replication_slots \
                 WHERE database = current_database() AND slot_name <> '{1}' AND NOT active;
             DROP OWNED BY \"{0}\"; DROP ROLE IF EXISTS \"{0}\";",
            self.role, p.name
        ))
        .await?;
        Ok(())
    }
}
