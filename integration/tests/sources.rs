//! Several sources in one deployment: two Postgres databases with the same
//! table names replicate into one ClickHouse server through one NATS server,
//! each with its own replicator and loader, and nothing of one source
//! touches the other: streams, consumers, ClickHouse databases, positions,
//! resyncs and failures stay apart.

use std::time::Duration;

use sluice_integration::pipeline::{Pipeline, Rng, metric, run_workload};

const CONVERGE: Duration = Duration::from_secs(120);

/// Resyncs of `public.orders` the loader of `p` swapped in so far.
async fn resyncs_completed(p: &Pipeline) -> anyhow::Result<f64> {
    let text = p.loader_metrics().await?;
    Ok(metric(
        &text,
        "sluice_loader_resyncs_completed_total{table=\"public.orders\"}",
    )
    .unwrap_or(0.0))
}

#[tokio::test]
async fn two_sources_with_the_same_table_names_stay_apart() -> anyhow::Result<()> {
    let mut a = Pipeline::start("source_a").await?;
    let mut b = Pipeline::start("source_b").await?;
    // What a user writes: no `clickhouse.database`, each source's database
    // named after it.
    for p in [&mut a, &mut b] {
        p.unset_config("clickhouse", "database")?;
    }
    assert_ne!(a.config.stream_name(), b.config.stream_name());
    assert_ne!(
        a.config.clickhouse_database(),
        b.config.clickhouse_database()
    );
    for p in [&a, &b] {
        p.publish_workload_tables(&["orders", "events"]).await?;
    }
    let (pg_a, pg_b) = (a.pg().await?, b.pg().await?);
    // Different contents under the same names.
    run_workload(&pg_a, "orders", 20, 50, Rng::new(1)).await?;
    run_workload(&pg_b, "orders", 30, 40, Rng::new(2)).await?;
    for p in [&mut a, &mut b] {
        p.spawn_replicator()?;
        p.spawn_loader()?;
    }
    let (wa, wb) = tokio::join!(
        run_workload(&pg_a, "events", 40, 25, Rng::new(3)),
        run_workload(&pg_b, "events", 40, 25, Rng::new(4)),
    );
    wa?;
    wb?;
    // Each verify compares a source's Postgres with its own ClickHouse
    // database: a row of the other source would show as a difference.
    a.wait_until_equal(CONVERGE).await?;
    b.wait_until_equal(CONVERGE).await?;

    // A resync of `orders` in source a leaves source b's `orders` alone.
    let b_resyncs = resyncs_completed(&b).await?;
    run_workload(&pg_a, "orders", 5, 20, Rng::new(5)).await?;
    a.cli("replicator", &["resync", "--table", "public.orders"])?;
    a.wait_until_equal(CONVERGE).await?;
    assert_eq!(a.resyncs_in_stream("orders", "manual").await?, 1);
    assert_eq!(
        b.resyncs_in_stream("orders", "manual").await?,
        0,
        "source a's resync reached source b's stream"
    );
    assert_eq!(
        resyncs_completed(&b).await?,
        b_resyncs,
        "source b's loader swapped a table during source a's resync"
    );

    // Source a's loader dies; source b goes on meanwhile.
    a.kill_9_loader()?;
    run_workload(&pg_a, "orders", 10, 20, Rng::new(6)).await?;
    run_workload(&pg_b, "orders", 10, 20, Rng::new(7)).await?;
    b.wait_until_equal(CONVERGE).await?;
    a.spawn_loader()?;
    a.wait_until_equal(CONVERGE).await?;

    for p in [&a, &b] {
        p.check_chains_have_no_duplicates().await?;
        assert_eq!(
            p.resyncs_in_stream("orders", "gap").await?,
            0,
            "no gap in {}",
            p.config.source
        );
    }
    a.check_alive()?;
    b.check_alive()?;
    Ok(())
}

#[tokio::test]
async fn a_second_source_naming_a_slot_of_another_database_is_refused() -> anyhow::Result<()> {
    let mut a = Pipeline::start("slot_owner").await?;
    let mut b = Pipeline::start("slot_thief").await?;
    for p in [&a, &b] {
        p.publish_workload_tables(&["orders"]).await?;
    }
    a.spawn_replicator()?;
    a.spawn_loader()?;
    // Ready: a's slot exists. (Equality alone does not say so: an empty
    // table without a ClickHouse table yet is equal, and b's replicator
    // could then create the slot first: it did once in CI.)
    a.wait_replicator_ready(CONVERGE).await?;
    a.wait_until_equal(CONVERGE).await?;
    // Both databases are on one server, where slot names are server-wide.
    let slot = format!("\"{}\"", a.config.postgres.slot);
    b.set_config("postgres", "slot", &slot)?;
    b.spawn_replicator()?;
    let status = b.wait_exit("replicator", CONVERGE).await?;
    assert!(!status.success(), "the second replicator must stop");
    let log = b.log_tail("replicator", 20);
    assert!(
        log.contains(&a.config.postgres.slot) && log.contains("another database"),
        "the error names the slot and why:\n{log}"
    );
    // The first source was not disturbed.
    run_workload(&a.pg().await?, "orders", 5, 20, Rng::new(8)).await?;
    a.wait_until_equal(CONVERGE).await?;
    a.check_alive()?;
    Ok(())
}
