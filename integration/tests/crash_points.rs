//! Crashes at exact steps where the loader writes state (failpoints of the `failpoints` feature,
//! which the harness builds in): whatever the step, the restarted pipeline ends equal to Postgres
//! and no repair is silently undone.

use std::time::Duration;

use sluice_integration::pipeline::Pipeline;

const CONVERGE: Duration = Duration::from_secs(120);

/// A resync repairs a corrupted ClickHouse table; the loader dies at `failpoint` inside the swap
/// (before the positions are written, so RESYNC_END is replayed). With the replicator stopped
/// (no new resync can mend things), the restarted loader must leave the repaired table live.
async fn crash_in_the_swap(name: &str, failpoint: &str) -> anyhow::Result<()> {
    let mut p = Pipeline::start(name).await?;
    let pg = p.pg().await?;
    pg.batch_execute(
        "CREATE TABLE items (id bigint PRIMARY KEY, note text);
         INSERT INTO items SELECT g, 'item ' || g FROM generate_series(1, 200) g;
         CREATE PUBLICATION sluice FOR TABLE items;",
    )
    .await?;
    p.spawn_replicator()?;
    p.spawn_loader()?;
    p.wait_until_equal(CONVERGE).await?;

    // The damage a resync exists to repair: a row Postgres never had. (At an old version: the
    // resync carries rows newer than its snapshot over into the new table.)
    p.servers()
        .clickhouse_sql(&format!(
            "INSERT INTO `{}`.items (id, note, _sluice_version, _sluice_deleted) \
             VALUES (999999, 'not in postgres', toUInt128(1), 0)",
            p.name
        ))
        .await?;
    anyhow::ensure!(
        p.verify().await?.iter().any(|r| !r.is_equal()),
        "verify does not see the corrupted row"
    );

    // One message per batch: RESYNC_BEGIN's batch is acked with the shadow recorded in the
    // positions, so after the crash only RESYNC_END is replayed, not the whole resync.
    p.stop_loader().await?;
    p.set_config("loader", "batch_max_messages", "1")?;
    p.set_failpoints(Some(&format!("{failpoint}=return")));
    p.spawn_loader()?;
    let status = p
        .replicator_command(&["resync", "--table", "public.items"])?
        .wait()?;
    anyhow::ensure!(status.success(), "resync command failed: {status}");
    let status = p.wait_loader_exit(CONVERGE).await?;
    let log = p.log_tail("loader", 5);
    anyhow::ensure!(
        status.code() == Some(86) && log.contains("failpoint: exiting"),
        "the loader did not stop at {failpoint} ({status}):\n{log}"
    );

    // No replicator: the restarted loader has only the replayed RESYNC_END to act on.
    p.stop_replicator().await?;
    p.set_failpoints(None);
    p.spawn_loader()?;
    // Until the replayed RESYNC_END is applied: the positions no longer name a shadow.
    let deadline = std::time::Instant::now() + CONVERGE;
    loop {
        let shadow = p
            .servers()
            .clickhouse_sql(&format!(
                "SELECT shadow FROM `{}`._sluice_positions FINAL \
                 WHERE schema = 'public' AND table = 'items'",
                p.name
            ))
            .await?;
        if shadow.trim().is_empty() {
            break;
        }
        p.check_alive()?;
        anyhow::ensure!(
            std::time::Instant::now() < deadline,
            "the replayed RESYNC_END was never applied (shadow {shadow:?}):\n{}",
            p.log_tail("loader", 30)
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    p.wait_until_equal(CONVERGE).await?;
    let blocked = p.log_lines_containing("loader", "table blocked");
    anyhow::ensure!(
        blocked.is_empty(),
        "the replayed swap blocked the table: {blocked:?}"
    );
    Ok(())
}

/// Killed between EXCHANGE TABLES and the DROP of the old table: replaying the swap used to
/// exchange again, putting the corrupted table back and dropping the repaired one.
#[tokio::test]
async fn a_crash_between_exchange_and_drop_keeps_the_repair() -> anyhow::Result<()> {
    crash_in_the_swap("crash_exchange", "loader::resync::after_exchange").await
}

/// Killed after the DROP, before the positions write: replaying the swap used to fail on the
/// missing shadow, which blocked the table and asked for another full resync.
#[tokio::test]
async fn a_crash_after_the_drop_neither_blocks_nor_resyncs() -> anyhow::Result<()> {
    crash_in_the_swap("crash_drop", "loader::resync::after_drop").await
}
