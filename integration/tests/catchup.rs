//! A replicator that starts far behind reads the backlog through SQL
//! (`pg_logical_slot_get_binary_changes` on a temporary copy of the slot, in
//! chunks) and then streams from
//! the walsender: nothing is lost or repeated across chunks, across the
//! switch, across a kill -9 in the middle of a chunk, or across a stop; and
//! a backlog whose slot cannot be copied is streamed from the walsender; and
//! the walsender that follows a backlog starts decoding past it.

use std::time::Duration;

use sluice_integration::pipeline::{Pipeline, Rng, run_workload};
use sluice_integration::wal_insert_lsn;

const CONVERGE: Duration = Duration::from_secs(180);

/// A pipeline on `items` and `events` whose replicator takes the SQL path at
/// any lag, 2,000 messages per first chunk (later ones double while the
/// slot's restart point stays), with the initial (empty) snapshot done
/// and the replicator stopped, so that what is written next is a backlog.
async fn stopped_pipeline(name: &str) -> anyhow::Result<Pipeline> {
    let mut p = Pipeline::start(name).await?;
    p.publish_workload_tables(&["items", "events"]).await?;
    p.set_config("replicator", "catchup_min_lag_bytes", "1")?;
    p.set_config("replicator", "catchup_chunk_changes", "2000")?;
    p.spawn_replicator()?;
    p.wait_for_heartbeat(Duration::from_secs(60)).await?;
    p.stop_replicator().await?;
    Ok(p)
}

/// About 40k changes on both tables, as the backlog.
async fn write_backlog(pg: &tokio_postgres::Client, rng: &mut Rng) -> anyhow::Result<u64> {
    let mut changes = run_workload(pg, "items", 120, 200, Rng::new(rng.next_u64())).await?;
    changes += run_workload(pg, "events", 80, 200, Rng::new(rng.next_u64())).await?;
    Ok(changes)
}

#[tokio::test]
async fn a_backlog_read_through_sql_then_streamed_arrives_once() -> anyhow::Result<()> {
    let mut p = stopped_pipeline("c_backlog").await?;
    let pg = p.pg().await?;
    let mut rng = Rng::from_clock();
    let mut changes = write_backlog(&pg, &mut rng).await?;
    // The first run (the snapshot) may have switched too: it starts past the
    // 1-byte threshold whenever WAL was written after its slot was created.
    let switches_before = p
        .log_lines_containing("replicator", "streaming from the walsender")
        .len();
    p.spawn_replicator()?;
    p.spawn_loader()?;
    // Written while the backlog is read: lands in a later chunk or in the
    // stream after the switch.
    changes += run_workload(&pg, "items", 60, 200, Rng::new(rng.next_u64())).await?;
    p.wait_until_equal(CONVERGE).await?;
    let chunks = p.log_lines_containing("replicator", "backlog chunk read");
    assert!(
        chunks.len() >= 3,
        "expected the backlog to take several chunks, saw {}:\n{}",
        chunks.len(),
        p.log_tail("replicator", 30)
    );
    let switched = p.log_lines_containing("replicator", "streaming from the walsender");
    assert_eq!(
        switched.len() - switches_before,
        1,
        "{}",
        p.log_tail("replicator", 30)
    );

    // After the switch the walsender carries new changes.
    changes += run_workload(&pg, "events", 20, 100, Rng::new(rng.next_u64())).await?;
    let reports = p.wait_until_equal(CONVERGE).await?;
    eprintln!("{changes} changes; {}", reports[0]);
    let packages = p.check_chains_have_no_duplicates().await?;
    eprintln!("{packages} data packages, each chain 1..N without repeats");
    // The slot followed: everything written is confirmed.
    let end = wal_insert_lsn(&pg).await?;
    run_workload(&pg, "events", 1, 10, Rng::new(rng.next_u64())).await?;
    p.wait_slot_confirmed(&end, Duration::from_secs(60)).await?;
    Ok(())
}

/// A backlog written in a second carries no running-transactions record
/// (Postgres logs one every 15 s), so the slot's restart point, where the
/// walsender starts decoding, stayed before it and the walsender decoded all
/// of it again. The replicator logs one at the backlog's end and moves the
/// slot past it before it streams: the restart point is past the backlog.
#[tokio::test]
async fn the_walsender_after_a_backlog_starts_decoding_past_it() -> anyhow::Result<()> {
    let mut p = stopped_pipeline("c_backlog_restart").await?;
    let pg = p.pg().await?;
    let slot = p.config.postgres.slot.clone();
    let mut rng = Rng::from_clock();
    let changes = write_backlog(&pg, &mut rng).await?;
    let end = wal_insert_lsn(&pg).await?;
    // Decoding cannot restart after the start of a transaction still
    // running, and the server is shared with the other tests: wait until
    // every transaction that may have started before `end` has ended.
    let next_xid: String = pg
        .query_one("SELECT pg_snapshot_xmax(pg_current_snapshot())::text", &[])
        .await?
        .get(0);
    let deadline = std::time::Instant::now() + Duration::from_secs(60);
    while !pg
        .query_one(
            "SELECT pg_snapshot_xmin(pg_current_snapshot()) >= $1::text::xid8",
            &[&next_xid],
        )
        .await?
        .get::<_, bool>(0)
    {
        anyhow::ensure!(
            std::time::Instant::now() < deadline,
            "transactions older than the backlog's end still run"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let switches_before = p
        .log_lines_containing("replicator", "streaming from the walsender")
        .len();
    p.spawn_replicator()?;
    p.wait_for_log_lines(
        "replicator",
        "backlog read; streaming from the walsender",
        switches_before + 1,
        CONVERGE,
    )
    .await?;
    let row = pg
        .query_one(
            "SELECT restart_lsn::text, restart_lsn >= $1::text::pg_lsn \
             FROM pg_replication_slots WHERE slot_name = $2",
            &[&end, &slot],
        )
        .await?;
    let (restart, past): (String, bool) = (row.get(0), row.get(1));
    assert!(
        past,
        "the slot's restart point {restart} is before the backlog's end {end}: \
         the walsender decodes the backlog again\n{}",
        p.log_tail("replicator", 30)
    );
    p.spawn_loader()?;
    let reports = p.wait_until_equal(CONVERGE).await?;
    eprintln!(
        "{changes} changes; restart point {restart} >= {end}; {}",
        reports[0]
    );
    p.check_chains_have_no_duplicates().await?;
    Ok(())
}

#[tokio::test]
async fn replicator_kill_9_while_reading_the_backlog_loses_and_duplicates_nothing()
-> anyhow::Result<()> {
    let mut p = stopped_pipeline("c_backlog_kill").await?;
    let pg = p.pg().await?;
    let mut rng = Rng::from_clock();
    let changes = write_backlog(&pg, &mut rng).await?;
    p.spawn_loader()?;
    // Kills at random moments of the catch-up. The killed replicator's SQL
    // session reads its own copy of the slot; only a move of the slot in
    // progress may hold the slot a little longer (the next one then waits
    // for it as a standby).
    for _ in 0..3 {
        p.spawn_replicator()?;
        tokio::time::sleep(Duration::from_millis(300 + rng.below(1500))).await;
        p.kill_9_replicator()?;
    }
    p.spawn_replicator()?;
    let reports = p.wait_until_equal(CONVERGE).await?;
    eprintln!("{changes} changes; {}", reports[0]);
    let packages = p.check_chains_have_no_duplicates().await?;
    eprintln!("{packages} data packages, each chain 1..N without repeats");
    Ok(())
}

#[tokio::test]
async fn a_replicator_stopped_while_reading_the_backlog_confirms_what_was_acknowledged()
-> anyhow::Result<()> {
    let mut p = stopped_pipeline("c_backlog_stop").await?;
    let pg = p.pg().await?;
    let slot = p.config.postgres.slot.clone();
    let confirmed = async |pg: &tokio_postgres::Client| -> anyhow::Result<(String, bool)> {
        let row = pg
            .query_one(
                "SELECT confirmed_flush_lsn::text, active FROM pg_replication_slots WHERE slot_name = $1",
                &[&slot],
            )
            .await?;
        Ok((row.get(0), row.get(1)))
    };
    let (before, _) = confirmed(&pg).await?;
    let mut rng = Rng::from_clock();
    let changes = write_backlog(&pg, &mut rng).await?;
    p.spawn_replicator()?;
    // Stop once the first chunks are acknowledged (the log says so), in the
    // middle of the backlog.
    p.wait_for_log_lines(
        "replicator",
        "backlog chunk read",
        2,
        Duration::from_secs(120),
    )
    .await?;
    p.stop_replicator().await?;
    // The stop moved the slot past what was acknowledged and released it at
    // once (the chunk in progress was cancelled, not waited for).
    let (after, active) = confirmed(&pg).await?;
    assert!(
        !active,
        "the slot is still held after the replicator stopped"
    );
    let moved: bool = pg
        .query_one(
            "SELECT $1::text::pg_lsn > $2::text::pg_lsn",
            &[&after, &before],
        )
        .await?
        .get(0);
    assert!(moved, "confirmed LSN did not move: {before} -> {after}");
    let stopped = p.log_lines_containing("replicator", "stopped; confirmed LSN sent");
    assert_eq!(stopped.len(), 2, "{}", p.log_tail("replicator", 20));

    p.spawn_replicator()?;
    p.spawn_loader()?;
    let reports = p.wait_until_equal(CONVERGE).await?;
    eprintln!("{changes} changes; {}", reports[0]);
    p.check_chains_have_no_duplicates().await?;
    Ok(())
}

/// When the slot cannot be copied (no free slot under
/// `max_replication_slots`, say; here the failpoint makes the copy name a
/// slot that does not exist, and the server refuses), the replicator says so
/// and streams the backlog from the walsender: it arrives once.
#[tokio::test]
async fn a_backlog_whose_slot_cannot_be_copied_is_streamed_from_the_walsender() -> anyhow::Result<()>
{
    let mut p = stopped_pipeline("c_backlog_nocopy").await?;
    let pg = p.pg().await?;
    let mut rng = Rng::from_clock();
    let changes = write_backlog(&pg, &mut rng).await?;
    p.set_failpoints(Some("replicator::backlog::copy=return"));
    p.spawn_replicator()?;
    p.spawn_loader()?;
    let reports = p.wait_until_equal(CONVERGE).await?;
    eprintln!("{changes} changes; {}", reports[0]);
    let fallback = p.log_lines_containing(
        "replicator",
        "cannot read the backlog through SQL; streaming it from the walsender",
    );
    assert_eq!(fallback.len(), 1, "{}", p.log_tail("replicator", 30));
    assert!(
        fallback[0].contains("does not exist"),
        "the server's refusal is not in the line: {}",
        fallback[0]
    );
    let chunks = p.log_lines_containing("replicator", "backlog chunk read");
    assert!(chunks.is_empty(), "{}", p.log_tail("replicator", 30));
    p.check_chains_have_no_duplicates().await?;
    Ok(())
}
