//! Two loaders of one source against one loader, on the same full stream,
//! measured in the same run (README "Several loaders").
//!
//! N rows (`SLUICE_BENCH_ROWS`, default 1,000,000) go into four tables
//! (N/4 each) and are published by the replicator into the stream (R1) while
//! no loader runs; the replicator then stops. Then, one after the other,
//! each into a ClickHouse database of its own:
//!
//! - baseline: one `sluice-loader` until every table's `count() FINAL` is N/4;
//! - two `sluice-loader`s with their own `loader.consumer` (`x`, `y`: names
//!   that divide the four tables 2:2), until the same holds.
//!
//! Each run includes joining, taking the tables, creating the target tables,
//! pulling (each loader pulls the whole stream), decoding its own tables'
//! packages, the INSERTs and the position writes. Prints rows/s of both, how
//! the tables were divided and the ratio two / one (issue target: no loss
//! of throughput, >= 1.0 within noise, on this 2-core machine).
//!
//! ```text
//! set -a; . /tmp/sdev/stack/env; set +a
//! cargo bench -p sluice-integration --bench two_loaders
//! ```

use std::process::Child;
use std::time::{Duration, Instant};

use sluice_integration::pipeline::Pipeline;

const TABLES: [&str; 4] = ["bench_t0", "bench_t1", "bench_t2", "bench_t3"];
const ROWS_PER_TRANSACTION: u64 = 100_000;
const DEFAULT_ROWS: u64 = 1_000_000;

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let rows = sluice_integration::pipeline::count_from_env("SLUICE_BENCH_ROWS", DEFAULT_ROWS)?;
    let mut p = Pipeline::start("bench_loaders").await?;
    p.set_config_from_env()?;
    let mut children = Vec::new();
    let result = run(&mut p, rows, &mut children).await;
    for mut child in children {
        let _ = child.kill();
        let _ = child.wait();
    }
    let _ = p.stop_replicator().await;
    if result.is_err() {
        eprintln!("{}", p.log_tails());
    }
    result
}

async fn run(p: &mut Pipeline, rows: u64, children: &mut Vec<Child>) -> anyhow::Result<()> {
    let per_table = rows / TABLES.len() as u64;
    let (messages, bytes) = p
        .fill_stream_alone(&TABLES, per_table, ROWS_PER_TRANSACTION)
        .await?;
    println!(
        "stream: {messages} messages, {:.1} MiB, {} tables of {per_table} rows",
        bytes as f64 / (1024.0 * 1024.0),
        TABLES.len()
    );

    let base = p.config.clickhouse_database();
    let one = load(p, &format!("{base}_one"), &["one"], per_table, children).await?;
    // Names whose rendezvous hashing divides the four tables 2:2 (it divides
    // evenly only on average; the split is printed).
    let two = load(p, &format!("{base}_two"), &["x", "y"], per_table, children).await?;
    let rate = |d: Duration| (per_table * TABLES.len() as u64) as f64 / d.as_secs_f64();
    println!(
        "one loader:  {:>8.2} s  {:>10.0} rows/s",
        one.as_secs_f64(),
        rate(one)
    );
    println!(
        "two loaders: {:>8.2} s  {:>10.0} rows/s",
        two.as_secs_f64(),
        rate(two)
    );
    let ratio = rate(two) / rate(one);
    println!(
        "ratio two loaders / one: {ratio:.2} (target: no loss, >= 1.00 within noise, median of three runs: {})",
        if ratio >= 0.95 { "met" } else { "MISSED" }
    );
    Ok(())
}

/// Loads the full stream into `database` with loaders named `names`, until
/// every table holds `per_table` rows (`count() FINAL`); stops them (SIGTERM)
/// and returns the time it took.
async fn load(
    p: &mut Pipeline,
    database: &str,
    names: &[&str],
    per_table: u64,
    children: &mut Vec<Child>,
) -> anyhow::Result<Duration> {
    p.set_config("clickhouse", "database", &format!("\"{database}\""))?;
    let started = Instant::now();
    let mut ports = Vec::new();
    for name in names {
        let (child, port) = p.spawn_named_loader(name)?;
        children.push(child);
        ports.push(port);
    }
    for table in TABLES {
        p.wait_for_final_rows(
            &format!("`{database}`.{table}"),
            per_table,
            Duration::from_millis(50),
            Duration::from_secs(3600),
        )
        .await?;
    }
    let took = started.elapsed();
    let mut held = Vec::new();
    for (name, port) in names.iter().zip(ports) {
        let text =
            sluice_integration::pipeline::scrape(&format!("http://127.0.0.1:{port}/metrics"))
                .await
                .unwrap_or_default();
        let n = sluice_integration::pipeline::metric(&text, "sluice_loader_tables_held");
        held.push(format!("{name}: {}", n.unwrap_or(0.0)));
    }
    println!(
        "{} loader(s), tables held: {}",
        names.len(),
        held.join(", ")
    );
    // Every one is stopped before an error is reported.
    let mut stopped = Ok(());
    for (child, name) in children.drain(..).zip(names) {
        let result =
            sluice_integration::pipeline::stop_child(Some(child), &format!("loader {name}")).await;
        stopped = stopped.and(result);
    }
    stopped?;
    Ok(took)
}
