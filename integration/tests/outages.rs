//! Server outages under a running pipeline (the fault matrix of the README):
//! ClickHouse stopped for 30 s, Postgres restarted with a fast shutdown, the
//! NATS server frozen (SIGSTOP) for 10 s, one node of a 3-node cluster
//! killed, the whole cluster restarted. Each ends with ClickHouse equal to
//! Postgres, and where the buffer is involved with every chain 1..N exactly
//! once.
//!
//! These tests stop and freeze servers, so they run on a private stack that
//! this test binary starts for itself (not the servers other tests share),
//! one test at a time.

use std::sync::OnceLock;
use std::time::{Duration, Instant};

use sluice_integration::pipeline::{self, Nats, Pipeline, Rng, run_workload};
use sluice_integration::stack::{PrivateStack, Server};
use tokio::sync::{Mutex, MutexGuard};

const CONVERGE: Duration = Duration::from_secs(180);

/// The private stack, started by the first test that needs it.
fn stack() -> &'static PrivateStack {
    static STACK: OnceLock<PrivateStack> = OnceLock::new();
    STACK.get_or_init(|| match PrivateStack::start() {
        Ok(stack) => stack,
        Err(e) => panic!("private server stack unavailable: {e:#}"),
    })
}

/// One outage at a time: they share the private stack.
async fn exclusive() -> MutexGuard<'static, ()> {
    static LOCK: Mutex<()> = Mutex::const_new(());
    LOCK.lock().await
}

async fn pipeline_with_items(name: &str, nats: Nats) -> anyhow::Result<Pipeline> {
    let p = Pipeline::start_with(name, nats, stack().servers)
        .await?
        .expect("the private stack has a cluster");
    p.publish_workload_tables(&["items"]).await?;
    Ok(p)
}

/// Runs small workload transactions on `items` until `until`, tolerating a
/// Postgres that is away (reconnecting); returns the changes committed.
fn background_workload(
    p: &Pipeline,
    until: Instant,
    seed: u64,
) -> tokio::task::JoinHandle<anyhow::Result<u64>> {
    let url = p.pg_url.clone();
    tokio::spawn(async move {
        let mut rng = Rng::new(seed);
        let mut changes = 0;
        let mut pg = None;
        while Instant::now() < until {
            if pg.is_none() {
                pg = sluice_integration::Servers::pg_connect(&url).await.ok();
            }
            if let Some(client) = &pg {
                match run_workload(client, "items", 5, 40, Rng::new(rng.next_u64())).await {
                    Ok(n) => changes += n,
                    // The server went away mid-transaction: that one rolled back.
                    Err(_) if client.is_closed() => pg = None,
                    Err(e) => return Err(e),
                }
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
        Ok(changes)
    })
}

async fn last_sequence(p: &Pipeline) -> anyhow::Result<u64> {
    let js = p.jetstream().await?;
    let mut stream = js.get_stream(p.config.stream_name()).await?;
    Ok(stream.info().await?.state.last_sequence)
}

/// Also the metrics test: every metric of a normal run exists on both
/// endpoints and moves, and the loader's lag and backlog rise while it cannot
/// write and fall once it can again.
#[tokio::test]
async fn clickhouse_down_for_30_s_loses_nothing() -> anyhow::Result<()> {
    let _one = exclusive().await;
    let mut p = pipeline_with_items("o_ch", Nats::Single).await?;
    // Rows for the initial snapshot, and a date ClickHouse cannot hold.
    p.pg()
        .await?
        .batch_execute(
            "INSERT INTO items SELECT g, g, 'seed' FROM generate_series(1, 100) g;
             CREATE TABLE odd (id int PRIMARY KEY, d date);
             INSERT INTO odd VALUES (1, '1800-01-01');
             ALTER PUBLICATION sluice ADD TABLE odd;",
        )
        .await?;
    p.spawn_replicator()?;
    p.spawn_loader()?;
    p.wait_until_equal(CONVERGE).await?;
    let loaded_before = value(&p.loader_metrics().await?, "sluice_loaded_rows_total")?;

    let workload = background_workload(&p, Instant::now() + Duration::from_secs(36), 11);
    tokio::time::sleep(Duration::from_secs(3)).await;
    stack().stop(Server::ClickHouse)?;
    let before = last_sequence(&p).await?;
    tokio::time::sleep(Duration::from_secs(30)).await;
    // JetStream kept buffering what the loader could not write, and the
    // loader's metrics say so.
    let during = last_sequence(&p).await?;
    let down = p.loader_metrics().await?;
    stack().restart_stopped()?;
    let changes = workload.await??;
    assert!(
        during > before,
        "the stream grew while ClickHouse was down ({before} -> {during})"
    );
    let lag_down = value(&down, "sluice_loader_lag_seconds{table=\"public.items\"}")?;
    assert!(
        lag_down >= 15.0,
        "loader lag while ClickHouse was down: {lag_down}"
    );
    assert!(value(&down, "sluice_loader_pending_messages")? > 0.0);
    assert!(value(&down, "sluice_loader_batch_retries_total")? > 0.0);

    let reports = p.wait_until_equal(CONVERGE).await?;
    eprintln!("{changes} changes; {}", reports[0]);
    // Caught up: the lag falls back to about the heartbeat interval.
    let deadline = Instant::now() + Duration::from_secs(30);
    let lag_after = loop {
        let lag = value(
            &p.loader_metrics().await?,
            "sluice_loader_lag_seconds{table=\"public.items\"}",
        )?;
        if lag < 5.0 || Instant::now() > deadline {
            break lag;
        }
        tokio::time::sleep(Duration::from_millis(500)).await;
    };
    assert!(
        lag_after < 5.0,
        "loader lag after recovery: {lag_after} (was {lag_down})"
    );
    check_metrics_exist(&p).await?;
    // The backlog gauge is refreshed every 2 s, so right after convergence it
    // can still show what was pending a moment before: it must fall soon.
    let deadline = Instant::now() + Duration::from_secs(30);
    let (after, pending_after) = loop {
        let after = p.loader_metrics().await?;
        let pending = value(&after, "sluice_loader_pending_messages")?;
        if pending < 10.0 || Instant::now() > deadline {
            break (after, pending);
        }
        tokio::time::sleep(Duration::from_millis(500)).await;
    };
    assert!(
        pending_after < 10.0,
        "messages pending 30 s after convergence: {pending_after}"
    );
    assert!(value(&after, "sluice_loaded_rows_total")? > loaded_before);
    Ok(())
}

fn value(text: &str, name_and_labels: &str) -> anyhow::Result<f64> {
    pipeline::metric(text, name_and_labels)
        .ok_or_else(|| anyhow::anyhow!("metric {name_and_labels} missing:\n{text}"))
}

/// The metrics of the README that a run with a snapshot, changes and a
/// clamped value produces, each with a plausible value.
async fn check_metrics_exist(p: &Pipeline) -> anyhow::Result<()> {
    let r = p.replicator_metrics().await?;
    assert!(value(&r, "sluice_replication_slot_lag_bytes")? >= 0.0);
    assert!(value(&r, "sluice_replicator_lag_seconds")? >= 0.0);
    assert!(value(&r, "sluice_replicator_confirmed_lsn")? > 0.0);
    assert!(value(&r, "sluice_published_packages_total")? > 0.0);
    assert!(value(&r, "sluice_snapshot_rows_total{table=\"public.items\"}")? >= 100.0);
    assert_eq!(
        value(
            &r,
            "sluice_resyncs_total{table=\"public.items\",reason=\"initial\"}"
        )?,
        1.0
    );
    assert_eq!(
        value(&r, "sluice_resync_in_progress{table=\"public.items\"}")?,
        0.0
    );
    let l = p.loader_metrics().await?;
    assert!(value(&l, "sluice_loader_lag_seconds")? >= 0.0);
    assert!(value(&l, "sluice_loader_pending_messages")? >= 0.0);
    assert!(
        value(
            &l,
            "sluice_loaded_rows_total{table=\"public.items\",op=\"snapshot\"}"
        )? >= 100.0
    );
    assert!(value(&l, "sluice_loader_batch_rows_count")? > 0.0);
    assert!(value(&l, "sluice_clickhouse_insert_seconds_count")? > 0.0);
    assert!(
        value(
            &l,
            "sluice_loader_resyncs_completed_total{table=\"public.items\"}"
        )? >= 1.0
    );
    assert!(
        value(
            &l,
            "sluice_value_clamped_total{table=\"public.odd\",column=\"d\"}"
        )? >= 1.0
    );
    Ok(())
}

#[tokio::test]
async fn postgres_fast_restart_loses_nothing() -> anyhow::Result<()> {
    let _one = exclusive().await;
    let mut p = pipeline_with_items("o_pg", Nats::Single).await?;
    p.spawn_replicator()?;
    p.spawn_loader()?;
    let workload = background_workload(&p, Instant::now() + Duration::from_secs(20), 12);
    tokio::time::sleep(Duration::from_secs(5)).await;
    stack().stop(Server::Postgres)?;
    tokio::time::sleep(Duration::from_secs(2)).await;
    stack().restart_stopped()?;
    let changes = workload.await??;
    let reports = p.wait_until_equal(CONVERGE).await?;
    eprintln!("{changes} changes; {}", reports[0]);
    p.check_chains_have_no_duplicates().await?;
    Ok(())
}

#[tokio::test]
async fn nats_frozen_for_10_s_loses_and_duplicates_nothing() -> anyhow::Result<()> {
    let _one = exclusive().await;
    let mut p = pipeline_with_items("o_freeze", Nats::Single).await?;
    p.spawn_replicator()?;
    p.spawn_loader()?;
    let workload = background_workload(&p, Instant::now() + Duration::from_secs(20), 13);
    tokio::time::sleep(Duration::from_secs(3)).await;
    // SIGSTOP: the TCP connections stay open but nothing answers, like a cut
    // network; SIGCONT ends it.
    stack().signal(Server::Nats, "STOP")?;
    tokio::time::sleep(Duration::from_secs(10)).await;
    stack().signal(Server::Nats, "CONT")?;
    let changes = workload.await??;
    let reports = p.wait_until_equal(CONVERGE).await?;
    eprintln!("{changes} changes; {}", reports[0]);
    p.check_chains_have_no_duplicates().await?;
    Ok(())
}

#[tokio::test]
async fn one_of_three_nats_nodes_killed_loses_nothing() -> anyhow::Result<()> {
    let _one = exclusive().await;
    let mut p = pipeline_with_items("o_node", Nats::Cluster).await?;
    p.spawn_replicator()?;
    p.spawn_loader()?;
    let workload = background_workload(&p, Instant::now() + Duration::from_secs(20), 14);
    tokio::time::sleep(Duration::from_secs(4)).await;
    stack().signal(Server::ClusterNode(2), "KILL")?;
    let changes = workload.await??;
    let reports = p.wait_until_equal(CONVERGE).await?;
    eprintln!("{changes} changes with one node down; {}", reports[0]);
    p.check_chains_have_no_duplicates().await?;
    stack().restart_stopped()?;
    Ok(())
}

#[tokio::test]
async fn whole_nats_cluster_restart_loses_nothing() -> anyhow::Result<()> {
    let _one = exclusive().await;
    let mut p = pipeline_with_items("o_cluster", Nats::Cluster).await?;
    p.spawn_replicator()?;
    p.spawn_loader()?;
    let workload = background_workload(&p, Instant::now() + Duration::from_secs(25), 15);
    tokio::time::sleep(Duration::from_secs(4)).await;
    for node in 1..=3 {
        stack().stop(Server::ClusterNode(node))?;
    }
    tokio::time::sleep(Duration::from_secs(3)).await;
    stack().restart_stopped()?;
    let changes = workload.await??;
    let reports = p.wait_until_equal(CONVERGE).await?;
    eprintln!("{changes} changes across a cluster restart; {}", reports[0]);
    p.check_chains_have_no_duplicates().await?;
    Ok(())
}
