//! Replicating from a physical standby (Postgres 16+): the replicator's slot,
//! snapshot and resyncs live on the standby while the primary takes every
//! write, and ClickHouse ends equal to the primary; a backlog read through
//! SQL on the standby. And a failover: the
//! primary crashes, the standby is promoted, and the replicator goes on from
//! its failover slot (17+) or resyncs (16).
//!
//! Each test starts its own primary and standby of Postgres 18 (16 for the
//! one without failover slots; [`sluice_integration::standby::PgPair`]),
//! whatever version the shared stack runs; NATS and ClickHouse are the
//! stack's.

use std::time::Duration;

use sluice_integration::Servers;
use sluice_integration::pipeline::{Nats, Pipeline, Rng, run_workload, workload_table_sql};
use sluice_integration::standby::PgPair;

const CONVERGE: Duration = Duration::from_secs(180);
const VERSION: u32 = 18;

/// A pipeline whose database, table `items` (5,000 rows) and publication
/// are made on `pair`'s primary and replayed by its standby; returns it with
/// a connection to the primary and the database's name.
async fn published_items(
    pair: &PgPair,
    name: &str,
) -> anyhow::Result<(Pipeline, tokio_postgres::Client, String)> {
    let servers: &'static Servers = Box::leak(Box::new(Servers {
        pg_url: pair.primary_url("postgres"),
        ..Servers::get().clone()
    }));
    let p = Pipeline::start_with(name, Nats::Single, servers)
        .await?
        .expect("single NATS node");
    let pg = p.pg().await?;
    let db: String = pg.query_one("SELECT current_database()", &[]).await?.get(0);
    pg.batch_execute(&format!(
        "{};
         INSERT INTO items SELECT g, g * 7, md5(g::text) FROM generate_series(1, 5000) g;
         CREATE PUBLICATION sluice FOR TABLE items;",
        workload_table_sql("items")
    ))
    .await?;
    pair.wait_replayed(CONVERGE).await?;
    Ok((p, pg, db))
}

/// Points `p`'s binaries at the standby of `pair` (database `db`) and its
/// `verify` at the primary, and logs a running-transactions record on the
/// primary every half second (`pg_log_standby_snapshot()`) until the task
/// returned is aborted: a slot on a standby becomes consistent at one, and a
/// busy primary writes one only every 15 s.
async fn read_the_standby(
    p: &mut Pipeline,
    pair: &PgPair,
    db: &str,
) -> anyhow::Result<tokio::task::JoinHandle<()>> {
    p.set_config("postgres", "url", &format!("\"{}\"", pair.standby_url(db)))?;
    p.verify_against(&pair.primary_url(db));
    let primary = pair.primary(db).await?;
    Ok(tokio::spawn(async move {
        while primary
            .execute("SELECT pg_log_standby_snapshot()", &[])
            .await
            .is_ok()
        {
            tokio::time::sleep(Duration::from_millis(500)).await;
        }
    }))
}

#[tokio::test]
async fn the_replicator_reads_a_standby_while_the_primary_takes_the_writes() -> anyhow::Result<()> {
    let pair = PgPair::start(VERSION).await?;
    let (mut p, pg, db) = published_items(&pair, "standby").await?;

    let snapshots = read_the_standby(&mut p, &pair, &db).await?;
    p.spawn_replicator()?;
    p.spawn_loader()?;
    p.wait_replicator_ready(CONVERGE).await?;

    let writes = run_workload(&pg, "items", 100, 100, Rng::from_clock()).await?;
    let reports = p.wait_until_equal(CONVERGE).await?;
    eprintln!("{writes} changes on the primary; {}", reports[0]);

    // The slot is the standby's, not the primary's.
    let slot = p.config.postgres.slot.clone();
    let on = |client: tokio_postgres::Client| {
        let slot = slot.clone();
        async move {
            let n: i64 = client
                .query_one(
                    "SELECT count(*) FROM pg_replication_slots WHERE slot_name = $1",
                    &[&slot],
                )
                .await?
                .get(0);
            anyhow::Ok(n)
        }
    };
    assert_eq!(
        on(pair.standby(&db).await?).await?,
        1,
        "slot on the standby"
    );
    assert_eq!(
        on(pair.primary(&db).await?).await?,
        0,
        "no slot on the primary"
    );

    // A resync's temporary slot and exported snapshot on the standby too,
    // under writes on the primary.
    let resync = p
        .replicator_command(&["resync", "--table", "public.items"])?
        .wait()?;
    anyhow::ensure!(resync.success(), "resync failed: {resync}");
    let writes = run_workload(&pg, "items", 50, 100, Rng::from_clock()).await?;
    let reports = p.wait_until_equal(CONVERGE).await?;
    eprintln!("{writes} more changes and a resync; {}", reports[0]);
    anyhow::ensure!(
        p.resyncs_in_stream("items", "manual").await? >= 1,
        "the manual resync is not in the stream"
    );

    // The replicator killed and restarted on the standby.
    p.kill_9_replicator()?;
    p.spawn_replicator()?;
    let writes = run_workload(&pg, "items", 50, 100, Rng::from_clock()).await?;
    let reports = p.wait_until_equal(CONVERGE).await?;
    eprintln!("{writes} more changes after a kill -9; {}", reports[0]);
    p.check_chains_have_no_duplicates().await?;

    p.stop_replicator().await?;
    p.stop_loader().await?;
    snapshots.abort();
    Ok(())
}

/// A replicator that starts far behind on a standby reads the backlog
/// through SQL there (a copy of the standby's slot), moves the slot past it
/// and streams: ClickHouse ends equal to the primary, every chain without
/// repeats. No restart point can be logged at the backlog's end on a
/// standby; whatever the replicator does about it must leave the session
/// that moves the slot without a time limit: its moves here take 1.5 s (a
/// failpoint), longer than the 1 s a restart-point attempt allows itself.
#[tokio::test]
async fn a_backlog_on_a_standby_is_read_through_sql() -> anyhow::Result<()> {
    let pair = PgPair::start(VERSION).await?;
    let (mut p, pg, db) = published_items(&pair, "standby_backlog").await?;
    let snapshots = read_the_standby(&mut p, &pair, &db).await?;
    p.set_config("replicator", "catchup_min_lag_bytes", "1")?;
    p.set_config("replicator", "catchup_chunk_changes", "2000")?;
    p.spawn_replicator()?;
    p.spawn_loader()?;
    p.wait_replicator_ready(CONVERGE).await?;
    p.stop_replicator().await?;

    // The backlog, written on the primary while no replicator runs.
    let mut writes = run_workload(&pg, "items", 100, 200, Rng::from_clock()).await?;
    pair.wait_replayed(CONVERGE).await?;
    let switches = p
        .log_lines_containing("replicator", "streaming from the walsender")
        .len();
    let behind = p
        .log_lines_containing("replicator", "far behind: reading the backlog through SQL")
        .len();
    p.set_failpoints(Some("replicator::backlog::slow_advance=return(1500)"));
    p.spawn_replicator()?;
    p.wait_for_log_lines(
        "replicator",
        "backlog read; streaming from the walsender",
        switches + 1,
        CONVERGE,
    )
    .await?;
    writes += run_workload(&pg, "items", 20, 100, Rng::from_clock()).await?;
    let reports = p.wait_until_equal(CONVERGE).await?;
    eprintln!(
        "{writes} changes on the primary, most as a backlog; {}",
        reports[0]
    );
    p.check_chains_have_no_duplicates().await?;
    assert_eq!(
        p.log_lines_containing("replicator", "far behind: reading the backlog through SQL")
            .len(),
        behind + 1,
        "the backlog was not read through SQL:\n{}",
        p.log_tail("replicator", 30)
    );
    let failed = p.log_lines_containing("replicator", "cannot advance the slot");
    assert!(
        failed.is_empty(),
        "the slot was not moved past the backlog on the standby: {failed:#?}"
    );

    p.stop_replicator().await?;
    p.stop_loader().await?;
    snapshots.abort();
    Ok(())
}

/// The primary crashes under a workload and its standby is promoted: the
/// replicator, given both servers with `target_session_attrs=read-write`,
/// reconnects to the promoted standby and goes on from its copy of the
/// failover slot (Postgres 17+), without a resync and without a row the new
/// primary does not have.
#[tokio::test]
async fn a_promoted_standby_continues_from_the_failover_slot() -> anyhow::Result<()> {
    promotion(VERSION, true).await
}

/// The same promotion on Postgres 16, which has no failover slots: the
/// promoted standby has no slot, and the replicator treats that as a lost
/// slot: a new one and a resync of every table, never a silent loss.
#[tokio::test]
async fn a_promoted_standby_without_failover_slots_resyncs() -> anyhow::Result<()> {
    promotion(16, false).await
}

async fn promotion(version: u32, failover_slots: bool) -> anyhow::Result<()> {
    let pair = PgPair::start_with(version, failover_slots).await?;
    // The standby, first in the URL below, knows the database (and is
    // passed over as read-only).
    let (mut p, pg, db) = published_items(&pair, "failover").await?;
    p.set_config(
        "postgres",
        "url",
        &format!("\"{}\"", pair.writable_url(&db)),
    )?;
    p.verify_against(&pair.primary_url(&db));
    p.spawn_replicator()?;
    p.spawn_loader()?;
    p.wait_replicator_ready(CONVERGE).await?;
    let writes = run_workload(&pg, "items", 50, 100, Rng::from_clock()).await?;
    let reports = p.wait_until_equal(CONVERGE).await?;
    eprintln!("{writes} changes on the primary; {}", reports[0]);
    if failover_slots {
        standby_slot_caught_up(&pair, &db, &p.config.postgres.slot).await?;
    }

    // Writes go on while the primary crashes; what it committed without the
    // standby receiving it is gone with it, and must not be in ClickHouse.
    let writer = pair.primary(&db).await?;
    let writes = tokio::spawn(async move {
        let _ = run_workload(&writer, "items", 1000, 20, Rng::from_clock()).await;
    });
    tokio::time::sleep(Duration::from_millis(1500)).await;
    pair.crash_primary()?;
    let _ = writes.await;
    pair.promote()?;
    p.verify_against(&pair.standby_url(&db));

    let promoted = pair.standby(&db).await?;
    let writes = run_workload(&promoted, "items", 50, 100, Rng::from_clock()).await?;
    let reports = p.wait_until_equal(CONVERGE).await?;
    eprintln!("{writes} changes on the promoted standby; {}", reports[0]);
    let lost = p.resyncs_in_stream("items", "slot_lost").await?;
    if failover_slots {
        assert_eq!(
            lost, 0,
            "the promoted standby's slot was used, not a new one"
        );
        p.check_chains_have_no_duplicates().await?;
    } else {
        assert!(lost >= 1, "no slot on the promoted standby, yet no resync");
    }
    p.stop_replicator().await?;
    p.stop_loader().await?;
    Ok(())
}

/// Waits until the standby's copy of failover slot `slot` reached where the
/// primary's is now.
async fn standby_slot_caught_up(pair: &PgPair, db: &str, slot: &str) -> anyhow::Result<()> {
    let primary_sql = pair.primary(db).await?;
    let standby_sql = pair.standby(db).await?;
    let deadline = std::time::Instant::now() + CONVERGE;
    loop {
        let primary: String = primary_sql
            .query_one(
                "SELECT confirmed_flush_lsn::text FROM pg_replication_slots WHERE slot_name = $1 AND failover",
                &[&slot],
            )
            .await?
            .get(0);
        let synced: Option<bool> = standby_sql
            .query_opt(
                "SELECT confirmed_flush_lsn >= $2::text::pg_lsn FROM pg_replication_slots \
                 WHERE slot_name = $1 AND synced",
                &[&slot, &primary],
            )
            .await?
            .and_then(|row| row.get(0));
        if synced == Some(true) {
            return Ok(());
        }
        anyhow::ensure!(
            std::time::Instant::now() < deadline,
            "the standby's copy of slot {slot} never reached {primary} ({synced:?})"
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}
