//! Crashes at exact steps where the loader writes state (failpoints of the `failpoints` feature,
//! which the harness builds in): whatever the step, the restarted pipeline ends equal to Postgres
//! and no repair is silently undone.

use std::time::Duration;

use sluice_integration::pipeline::{Pipeline, metric};

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

/// One crash of the matrix: `program` dies at `failpoint` (after `passes` passes of it) under a
/// write workload, is started again without failpoints, and the pipeline must end equal to
/// Postgres with each chain holding every package once and exactly the resyncs the design asks
/// for.
struct Crash {
    name: &'static str,
    program: &'static str,
    failpoint: &'static str,
    passes: u32,
    /// A manual resync of `items` runs when the crash comes.
    resync: bool,
    /// The replicator is stopped while the workload writes, then reads the backlog through SQL.
    backlog: bool,
    /// The workload starts with a row bigger than a NATS message (its package goes in chunks).
    big: bool,
    /// Resyncs of `items` beyond the initial snapshot, by reason; every other reason: none.
    expected: &'static [(&'static str, usize)],
    /// How long the crashed program stays down (an outage, not a wait for something).
    down: Duration,
}

/// A crash of `program` at the first pass of `failpoint`, with no resync running, nothing held
/// back and no resync expected; the cases change what differs.
const fn crash(name: &'static str, program: &'static str, failpoint: &'static str) -> Crash {
    Crash {
        name,
        program,
        failpoint,
        passes: 0,
        resync: false,
        backlog: false,
        big: false,
        expected: &[],
        down: Duration::ZERO,
    }
}

/// Resync reasons counted in the stream.
const REASONS: [&str; 6] = [
    "manual",
    "gap",
    "stalled",
    "refused",
    "schema_change",
    "target_missing",
];

/// Writes transactions of 20 inserts, updates and a delete to `items`; with `big` first one row
/// whose 10 MB of incompressible bytes exceed a NATS message (the test servers' `max_payload` is
/// 8 MB), so its package is sent in chunks.
async fn write_items(
    pg: tokio_postgres::Client,
    transactions: i64,
    big: bool,
) -> anyhow::Result<()> {
    if big {
        pg.batch_execute(
            "INSERT INTO items (id, n, blob) SELECT -1, 0, decode(string_agg(md5(g::text), ''), 'hex') \
             FROM generate_series(1, 655360) g",
        )
        .await?;
    }
    for i in 0..transactions {
        let base = 1000 + i * 20;
        pg.batch_execute(&format!(
            "BEGIN;
             INSERT INTO items SELECT g, 0, 'new ' || g FROM generate_series({base}, {base} + 19) g;
             UPDATE items SET n = n + 1 WHERE id % 7 = {} AND id < {base};
             DELETE FROM items WHERE id = {base} - 13;
             COMMIT;",
            i % 7
        ))
        .await?;
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    Ok(())
}

async fn crash_and_recover(crash: Crash) -> anyhow::Result<()> {
    let mut p = Pipeline::start(crash.name).await?;
    let pg = p.pg().await?;
    pg.batch_execute(
        "CREATE TABLE items (id bigint PRIMARY KEY, n int NOT NULL, note text, blob bytea);
         INSERT INTO items SELECT g, 0, 'item ' || g FROM generate_series(1, 500) g;
         CREATE TABLE other (id bigint PRIMARY KEY, v text);
         INSERT INTO other SELECT g, 'v' || g FROM generate_series(1, 100) g;
         CREATE PUBLICATION sluice FOR TABLE items, other;",
    )
    .await?;
    // Transactions cut into several packages; small backlog chunks.
    p.set_configs(
        "replicator",
        &[
            ("package_max_rows", "5"),
            ("catchup_min_lag_bytes", "1"),
            ("catchup_chunk_changes", "500"),
        ],
    )?;
    // Far shorter than a replicator outage below, far longer than a healthy gap between chunks.
    p.set_config("loader", "incomplete_package_wait", "\"2s\"")?;
    p.spawn_replicator()?;
    p.spawn_loader()?;
    p.wait_until_equal(CONVERGE).await?;

    let which = crash.program;
    if which == "replicator" {
        p.stop_replicator().await?;
    } else {
        p.stop_loader().await?;
    }
    let writes = if crash.backlog {
        write_items(p.pg().await?, 100, crash.big).await?;
        None
    } else {
        Some(tokio::spawn(write_items(p.pg().await?, 150, crash.big)))
    };
    p.set_failpoints(Some(&format!(
        "{}={}*off->return",
        crash.failpoint, crash.passes
    )));
    if which == "replicator" {
        p.spawn_replicator()?;
    } else {
        p.spawn_loader()?;
    }
    p.set_failpoints(None);
    if crash.resync {
        if which == "replicator" {
            p.wait_replicator_ready(CONVERGE).await?;
        }
        let status = p
            .replicator_command(&["resync", "--table", "public.items", "--no-wait"])?
            .wait()?;
        anyhow::ensure!(status.success(), "resync command failed: {status}");
    }
    let status = p.wait_exit(which, CONVERGE).await?;
    let log = p.log_tail(which, 5);
    anyhow::ensure!(
        status.code() == Some(86) && log.contains("failpoint: exiting"),
        "the {which} did not stop at {} ({status}):\n{log}",
        crash.failpoint
    );
    tokio::time::sleep(crash.down).await;
    if which == "replicator" {
        p.spawn_replicator()?;
    } else {
        p.spawn_loader()?;
    }
    if let Some(writes) = writes {
        writes.await??;
    }
    if crash.resync {
        // The resync's table swapped in: the live table is equal meanwhile too, since changes
        // reach it. (The loader's counter counts the initial snapshot unless it restarted.)
        let swaps = if which == "loader" { 1.0 } else { 2.0 };
        let deadline = std::time::Instant::now() + CONVERGE;
        loop {
            let metrics = p.loader_metrics().await.unwrap_or_default();
            let completed = metric(
                &metrics,
                "sluice_loader_resyncs_completed_total{table=\"public.items\"}",
            );
            if completed.is_some_and(|n| n >= swaps) {
                break;
            }
            p.check_alive()?;
            anyhow::ensure!(
                std::time::Instant::now() < deadline,
                "the resync never finished:\n{}",
                p.log_tail("loader", 30)
            );
            tokio::time::sleep(Duration::from_millis(500)).await;
        }
    }
    p.wait_until_equal(CONVERGE).await?;
    p.check_chains_have_no_duplicates().await?;
    for reason in REASONS {
        let expected = crash
            .expected
            .iter()
            .find(|(r, _)| *r == reason)
            .map_or(0, |(_, n)| *n);
        assert_eq!(
            p.resyncs_in_stream("items", reason).await?,
            expected,
            "resyncs of items for {reason} after a crash at {}",
            crash.failpoint
        );
        assert_eq!(p.resyncs_in_stream("other", reason).await?, 0);
    }
    Ok(())
}

#[tokio::test]
async fn a_loader_crash_after_an_insert_needs_no_resync() -> anyhow::Result<()> {
    crash_and_recover(Crash {
        passes: 3,
        ..crash("crash_insert", "loader", "loader::insert::after")
    })
    .await
}

#[tokio::test]
async fn a_loader_crash_after_the_positions_write_needs_no_resync() -> anyhow::Result<()> {
    crash_and_recover(Crash {
        passes: 3,
        ..crash("crash_positions", "loader", "loader::positions::after_save")
    })
    .await
}

#[tokio::test]
async fn a_loader_crash_after_the_ack_needs_no_resync() -> anyhow::Result<()> {
    crash_and_recover(Crash {
        passes: 3,
        ..crash("crash_ack", "loader", "loader::ack::after")
    })
    .await
}

/// The shadow exists, the positions do not name it yet: the replayed RESYNC_BEGIN makes it again
/// and the same resync finishes.
#[tokio::test]
async fn a_loader_crash_after_creating_the_shadow_finishes_the_same_resync() -> anyhow::Result<()> {
    crash_and_recover(Crash {
        resync: true,
        expected: &[("manual", 1)],
        ..crash("crash_shadow", "loader", "loader::resync::after_create")
    })
    .await
}

/// In the middle of a transaction cut into packages: the restart re-sends it from the confirmed
/// LSN, the duplicate window and the chain resume drop what the stream has.
#[tokio::test]
async fn a_replicator_crash_mid_transaction_needs_no_resync() -> anyhow::Result<()> {
    crash_and_recover(Crash {
        passes: 40,
        ..crash(
            "crash_publish",
            "replicator",
            "replicator::publish::after_package",
        )
    })
    .await
}

#[tokio::test]
async fn a_replicator_crash_after_confirming_needs_no_resync() -> anyhow::Result<()> {
    crash_and_recover(Crash {
        passes: 1,
        ..crash(
            "crash_confirm",
            "replicator",
            "replicator::confirm::after_status",
        )
    })
    .await
}

#[tokio::test]
async fn a_replicator_crash_after_advancing_the_slot_needs_no_resync() -> anyhow::Result<()> {
    crash_and_recover(Crash {
        backlog: true,
        ..crash(
            "crash_advance",
            "replicator",
            "replicator::backlog::after_advance",
        )
    })
    .await
}

/// Between two chunks of one package: the restarted replicator sends the package again (the
/// stored chunk is a duplicate), the loader joins the chunks; no gap, no resync. The replicator
/// stays down longer than `incomplete_package_wait`: with nothing newer in the stream, the loader
/// keeps holding the first chunk (it used to give up after a minute, which made a gap).
#[tokio::test]
async fn a_replicator_crash_between_chunks_needs_no_resync() -> anyhow::Result<()> {
    crash_and_recover(Crash {
        big: true,
        down: Duration::from_secs(8),
        ..crash(
            "crash_chunks",
            "replicator",
            "broker::publish::between_chunks",
        )
    })
    .await
}

/// The RESYNC_BEGIN and the resync's first progress record are stored, the snapshot reader dies
/// with the replicator: the restarted replicator continues that resync on its chain (no second
/// RESYNC_BEGIN, no `stalled` request from the loader), and it finishes.
#[tokio::test]
async fn a_replicator_crash_mid_resync_continues_it() -> anyhow::Result<()> {
    crash_and_recover(Crash {
        resync: true,
        expected: &[("manual", 1)],
        ..crash(
            "crash_resync",
            "replicator",
            "replicator::resync::after_begin",
        )
    })
    .await
}
