//! Full resyncs (issue: resync on demand and on gap), end to end with the
//! real binaries: lost stream messages, a dropped slot and a manual resync
//! under load all end with ClickHouse equal to Postgres, and a resync never
//! shows a half-loaded table.

use std::time::Duration;

use sluice_integration::pipeline::{self, Pipeline, Rng, run_workload};

const CONVERGE: Duration = Duration::from_secs(180);

async fn pipeline_with(name: &str, tables: &[&str]) -> anyhow::Result<Pipeline> {
    let p = Pipeline::start(name).await?;
    p.publish_workload_tables(tables).await?;
    Ok(p)
}

fn metric(text: &str, name_and_labels: &str) -> f64 {
    pipeline::metric(text, name_and_labels).unwrap_or(0.0)
}

#[tokio::test]
async fn lost_stream_messages_are_a_gap_that_a_resync_repairs() -> anyhow::Result<()> {
    let mut p = pipeline_with("r_gap", &["items", "other"]).await?;
    let pg = p.pg().await?;
    p.spawn_replicator()?;
    p.spawn_loader()?;
    run_workload(&pg, "items", 20, 20, Rng::new(1)).await?;
    run_workload(&pg, "other", 5, 10, Rng::new(2)).await?;
    p.wait_until_equal(CONVERGE).await?;

    // The loader is away while the buffer loses messages of `items`.
    p.stop_loader().await?;
    let js = p.jetstream().await?;
    let mut stream = js.get_stream(p.config.stream_name()).await?;
    let before = stream.info().await?.state.last_sequence;
    run_workload(&pg, "items", 20, 20, Rng::new(3)).await?;
    pg.batch_execute("DELETE FROM items WHERE id % 3 = 0")
        .await?;
    run_workload(&pg, "other", 5, 10, Rng::new(4)).await?;
    // Wait until the replicator has published the new changes.
    let mut last = before;
    for _ in 0..100 {
        last = stream.info().await?.state.last_sequence;
        if last > before + 10 {
            break;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let subject = sluice_broker::topology::table_subject(&p.name, "public", "items");
    let mut deleted = 0;
    for sequence in before + 1..=last {
        let message = stream.get_raw_message(sequence).await;
        if let Ok(message) = message
            && message.subject.as_str() == subject
            && deleted < 3
        {
            stream.delete_message(sequence).await?;
            deleted += 1;
        }
    }
    anyhow::ensure!(
        deleted > 0,
        "no message of items to delete between {before} and {last}"
    );

    p.spawn_loader()?;
    p.wait_until_equal(CONVERGE).await?;
    let metrics = p.loader_metrics().await?;
    let gaps = metric(
        &metrics,
        "sluice_gaps_detected_total{table=\"public.items\"}",
    );
    assert!(gaps >= 1.0, "gap counted: {gaps}");
    assert_eq!(
        metric(
            &metrics,
            "sluice_gaps_detected_total{table=\"public.other\"}"
        ),
        0.0
    );
    let swapped = metric(
        &metrics,
        "sluice_loader_resyncs_completed_total{table=\"public.items\"}",
    );
    assert!(swapped >= 1.0, "the resync was swapped in: {swapped}");
    Ok(())
}

#[tokio::test]
async fn a_dropped_slot_resyncs_every_table() -> anyhow::Result<()> {
    let mut p = pipeline_with("r_slot", &["items", "other"]).await?;
    let pg = p.pg().await?;
    p.spawn_replicator()?;
    p.spawn_loader()?;
    run_workload(&pg, "items", 10, 20, Rng::new(5)).await?;
    p.wait_until_equal(CONVERGE).await?;

    p.stop_replicator().await?;
    let slot = p.config.postgres.slot.clone();
    pg.execute("SELECT pg_drop_replication_slot($1)", &[&slot])
        .await?;
    // Changes while no slot exists are not in any WAL stream sluice will read.
    run_workload(&pg, "items", 10, 20, Rng::new(6)).await?;
    pg.batch_execute("DELETE FROM other; INSERT INTO other VALUES (1, 1, 'x')")
        .await?;
    p.spawn_replicator()?;
    p.wait_until_equal(CONVERGE).await?;
    let metrics = p.replicator_metrics().await?;
    let resyncs = metric(
        &metrics,
        "sluice_resyncs_total{table=\"public.items\",reason=\"slot_lost\"}",
    );
    assert_eq!(resyncs, 1.0, "slot loss resynced items once:\n{metrics}");
    Ok(())
}

/// Also: with a slot name of 63 characters.
#[tokio::test]
async fn manual_resync_under_load_never_shows_fewer_rows() -> anyhow::Result<()> {
    let mut p = pipeline_with("r_manual", &["items", "other"]).await?;
    // A slot name as long as Postgres allows (63): the resync's temporary slot, named after it,
    // must still fit.
    let slot = format!("{}_{}", p.name, "x".repeat(62 - p.name.len()));
    p.set_config("postgres", "slot", &format!("\"{slot}\""))?;
    let pg = p.pg().await?;
    pg.batch_execute(
        "INSERT INTO items SELECT g, g, md5(g::text) FROM generate_series(1, 30000) g",
    )
    .await?;
    p.spawn_replicator()?;
    p.spawn_loader()?;
    p.wait_until_equal(CONVERGE).await?;

    let servers = sluice_integration::Servers::get();
    let count_sql = format!(
        "SELECT count() FROM `{}`.items FINAL",
        p.config.clickhouse_database()
    );
    let before: u64 = servers.clickhouse_sql(&count_sql).await?.trim().parse()?;

    // Inserts only, on both tables, while the resync runs: the count never
    // legitimately goes down.
    let writer = {
        let pg = p.pg().await?;
        tokio::spawn(async move {
            for i in 0..40i64 {
                let base = 1_000_000 + i * 50;
                pg.batch_execute(&format!(
                    "INSERT INTO items SELECT g, g, 'live' FROM generate_series({base}, {}) g; \
                     INSERT INTO other VALUES ({i}, {i}, 'live')",
                    base + 49
                ))
                .await?;
                tokio::time::sleep(Duration::from_millis(50)).await;
            }
            anyhow::Ok(())
        })
    };
    let resync = p.replicator_command(&["resync", "--table", "public.items"])?;
    let mut minimum = u64::MAX;
    let mut resync = resync;
    let status = loop {
        let count: u64 = servers.clickhouse_sql(&count_sql).await?.trim().parse()?;
        minimum = minimum.min(count);
        if let Some(status) = resync.try_wait()? {
            break status;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    };
    assert!(status.success(), "resync command failed: {status}");
    writer.await??;
    // Until the loader swaps the table in, keep watching too.
    let deadline = std::time::Instant::now() + CONVERGE;
    loop {
        let count: u64 = servers.clickhouse_sql(&count_sql).await?.trim().parse()?;
        minimum = minimum.min(count);
        let metrics = p.loader_metrics().await?;
        if metric(
            &metrics,
            "sluice_loader_resyncs_completed_total{table=\"public.items\"}",
        ) >= 2.0
        {
            break;
        }
        anyhow::ensure!(
            std::time::Instant::now() < deadline,
            "resync never swapped in"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    assert!(
        minimum >= before,
        "readers saw {minimum} rows during the resync, {before} before it"
    );
    p.wait_until_equal(CONVERGE).await?;
    Ok(())
}

#[tokio::test]
async fn replicator_killed_mid_resync_still_converges() -> anyhow::Result<()> {
    let mut p = pipeline_with("r_kill", &["items"]).await?;
    let pg = p.pg().await?;
    pg.batch_execute(
        "INSERT INTO items SELECT g, g, md5(g::text) FROM generate_series(1, 40000) g",
    )
    .await?;
    p.spawn_replicator()?;
    p.spawn_loader()?;
    p.wait_until_equal(CONVERGE).await?;
    let mut resync = p.replicator_command(&["resync", "--no-wait", "--table", "public.items"])?;
    let status = resync.wait()?;
    assert!(status.success(), "resync request failed: {status}");
    tokio::time::sleep(Duration::from_millis(1500)).await;
    p.kill_9_replicator()?;
    pg.batch_execute(
        "DELETE FROM items WHERE id <= 100; UPDATE items SET v = -v WHERE id % 1000 = 0",
    )
    .await?;
    p.spawn_replicator()?;
    // The loader notices the stalled shadow (or the finished resync) and the
    // table converges; the live table is never replaced by a partial one.
    p.wait_until_equal(Duration::from_secs(240)).await?;
    Ok(())
}

#[tokio::test]
async fn loader_killed_mid_resync_never_swaps_in_a_partial_table() -> anyhow::Result<()> {
    let mut p = pipeline_with("r_lkill", &["items"]).await?;
    let pg = p.pg().await?;
    pg.batch_execute(
        "INSERT INTO items SELECT g, g, md5(g::text) FROM generate_series(1, 40000) g",
    )
    .await?;
    // Every snapshot package 25 ms apart (80 of 500 rows): the resync's shadow
    // table exists for seconds, not for the blink a 40,000-row resync takes
    // otherwise, which polling could miss (it did once, on a busy machine).
    p.set_failpoints(Some("replicator::snapshot::package=return(25)"));
    p.spawn_replicator()?;
    p.spawn_loader()?;
    p.wait_until_equal(CONVERGE).await?;
    let servers = sluice_integration::Servers::get();
    let count_sql = format!(
        "SELECT count() FROM `{}`.items FINAL",
        p.config.clickhouse_database()
    );
    let before: u64 = servers.clickhouse_sql(&count_sql).await?.trim().parse()?;
    // Readers of the live table, all along: no row is deleted in Postgres,
    // so a count below `before` would be a partial table swapped in.
    let watcher = {
        let count_sql = count_sql.clone();
        let stop = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
        let flag = stop.clone();
        let task = tokio::spawn(async move {
            let mut minimum = u64::MAX;
            while !flag.load(std::sync::atomic::Ordering::Relaxed) {
                let count: u64 = servers.clickhouse_sql(&count_sql).await?.trim().parse()?;
                minimum = minimum.min(count);
                tokio::time::sleep(Duration::from_millis(50)).await;
            }
            anyhow::Ok(minimum)
        });
        (stop, task)
    };
    let mut resync = p.replicator_command(&["resync", "--no-wait", "--table", "public.items"])?;
    assert!(resync.wait()?.success(), "resync request failed");
    // Kill the loader while it fills the shadow table.
    let shadow_sql = format!(
        "EXISTS TABLE `{}`._sluice_resync__items",
        p.config.clickhouse_database()
    );
    let deadline = std::time::Instant::now() + Duration::from_secs(60);
    while servers.clickhouse_sql(&shadow_sql).await?.trim() != "1" {
        anyhow::ensure!(
            std::time::Instant::now() < deadline,
            "the resync never created its shadow table"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    p.kill_9_loader()?;
    pg.batch_execute(
        "UPDATE items SET v = -v WHERE id % 500 = 0; \
         INSERT INTO items SELECT g, g, 'after kill' FROM generate_series(50001, 50100) g",
    )
    .await?;
    tokio::time::sleep(Duration::from_millis(500)).await;
    p.spawn_loader()?;
    p.wait_until_equal(CONVERGE).await?;
    watcher.0.store(true, std::sync::atomic::Ordering::Relaxed);
    let minimum = watcher.1.await??;
    assert!(
        minimum >= before,
        "readers saw {minimum} rows while the resync ran, {before} before it"
    );
    Ok(())
}

#[tokio::test]
async fn a_purged_stream_is_a_gap_on_every_table_that_a_resync_repairs() -> anyhow::Result<()> {
    let mut p = pipeline_with("r_purge", &["items", "other"]).await?;
    let pg = p.pg().await?;
    p.spawn_replicator()?;
    p.spawn_loader()?;
    run_workload(&pg, "items", 10, 20, Rng::new(31)).await?;
    run_workload(&pg, "other", 5, 10, Rng::new(32)).await?;
    p.wait_until_equal(CONVERGE).await?;

    // The buffer loses everything the loader had not read yet.
    p.stop_loader().await?;
    run_workload(&pg, "items", 10, 20, Rng::new(33)).await?;
    run_workload(&pg, "other", 5, 10, Rng::new(34)).await?;
    let js = p.jetstream().await?;
    let mut stream = js.get_stream(p.config.stream_name()).await?;
    let published = stream.info().await?.state.last_sequence;
    // Wait until those changes are in the stream, then purge it.
    for _ in 0..100 {
        tokio::time::sleep(Duration::from_millis(100)).await;
        if stream.info().await?.state.last_sequence > published {
            break;
        }
    }
    tokio::time::sleep(Duration::from_millis(500)).await;
    stream.purge().await?;
    // Later changes on both tables reveal the break in their chains.
    run_workload(&pg, "items", 2, 5, Rng::new(35)).await?;
    run_workload(&pg, "other", 2, 5, Rng::new(36)).await?;
    p.spawn_loader()?;
    p.wait_until_equal(CONVERGE).await?;
    let metrics = p.loader_metrics().await?;
    for table in ["public.items", "public.other"] {
        let gaps = metric(
            &metrics,
            &format!("sluice_gaps_detected_total{{table=\"{table}\"}}"),
        );
        assert!(gaps >= 1.0, "gap counted for {table}: {gaps}");
    }
    Ok(())
}

/// The replicator's stream can publish a change committed after a resync's
/// consistent point before it publishes that resync's RESYNC_BEGIN. Staged
/// here by hand with the replicator stopped: such a change, then a resync
/// whose snapshot lacks it. The swapped-in table still has it.
#[tokio::test]
async fn a_change_published_before_resync_begin_survives_the_swap() -> anyhow::Result<()> {
    use sluice_proto::v1::{self, value::Kind};

    let mut p = pipeline_with("r_ahead", &["items"]).await?;
    p.pg()
        .await?
        .batch_execute("INSERT INTO items SELECT g, g, 'seed' FROM generate_series(1, 10) g")
        .await?;
    p.spawn_replicator()?;
    p.spawn_loader()?;
    p.wait_until_equal(CONVERGE).await?;
    p.stop_replicator().await?;

    // Continue the table's chain from its last package in the stream.
    let js = p.jetstream().await?;
    let subject = sluice_broker::topology::table_subject(&p.config.source, "public", "items");
    let stream = js.get_stream(p.config.stream_name()).await?;
    let last = stream.get_last_raw_message_by_subject(&subject).await?;
    let last = sluice_proto::decode(&last.payload, None)?;
    let at = last.position.expect("packages carry a position");
    let consistent_point = last.commit_lsn + 1_000;
    let row = |id: i64, s: &str| v1::Row {
        op: v1::Op::Insert as i32,
        values: vec![
            v1::Value {
                kind: Some(Kind::Int(id)),
            },
            v1::Value {
                kind: Some(Kind::Int(id)),
            },
            v1::Value {
                kind: Some(Kind::Text(s.into())),
            },
        ],
        old_key: Vec::new(),
    };
    let package = |kind: v1::Kind, generation: u64, sequence: u64, commit_lsn: u64| v1::Package {
        source: p.config.source.clone(),
        schema: "public".into(),
        table: "items".into(),
        kind: kind as i32,
        relation: last.relation.clone(),
        position: Some(v1::ChainPosition {
            generation,
            sequence,
        }),
        commit_lsn,
        resync: Some(v1::Resync {
            resync_id: "staged".into(),
            reason: "manual".into(),
            rows: 10,
            ..Default::default()
        }),
        ..Default::default()
    };
    let generation = at.generation + 1;
    let mut ahead = package(
        v1::Kind::Changes,
        at.generation,
        at.sequence + 1,
        consistent_point + 100,
    );
    ahead.resync = None;
    ahead.rows = vec![row(1000, "after the consistent point")];
    let mut snapshot = package(v1::Kind::Snapshot, generation, 2, consistent_point);
    snapshot.rows = (1..=10).map(|id| row(id, "seed")).collect();
    let staged = [
        ahead,
        package(v1::Kind::ResyncBegin, generation, 1, consistent_point),
        snapshot,
        package(v1::Kind::ResyncEnd, generation, 3, consistent_point),
    ];
    for (i, package) in staged.iter().enumerate() {
        let payload = sluice_proto::encode(package, sluice_proto::Encoding::Zstd);
        let mut headers = async_nats::HeaderMap::new();
        headers.insert("Nats-Msg-Id", format!("staged-{i}").as_str());
        js.publish_with_headers(subject.clone(), headers, payload.into())
            .await?
            .await?;
    }

    let sql = format!(
        "SELECT count(), countIf(id = 1000) FROM `{}`.items FINAL",
        p.config.clickhouse_database()
    );
    let deadline = std::time::Instant::now() + CONVERGE;
    loop {
        let metrics = p.loader_metrics().await?;
        let swapped = metric(
            &metrics,
            "sluice_loader_resyncs_completed_total{table=\"public.items\"}",
        ) >= 2.0;
        let counts = sluice_integration::Servers::get()
            .clickhouse_sql(&sql)
            .await?;
        if swapped {
            assert_eq!(
                counts.trim(),
                "11\t1",
                "rows after the swap (count, id 1000)"
            );
            return Ok(());
        }
        anyhow::ensure!(
            std::time::Instant::now() < deadline,
            "the staged resync was never swapped in"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

/// A table the loader blocked (a column dropped and added again, which
/// ClickHouse cannot follow in place) is resynced while its rows keep
/// changing. The resync's start is slowed by 1.5 s after its slot's
/// consistent point (failpoint `replicator::resync::before_plan`): the
/// stream holds back meanwhile, so no change committed after that point goes
/// out on the table's old chain, which the blocked loader skips and the
/// snapshot does not hold. Without the hold, updates were lost.
#[tokio::test]
async fn a_blocked_table_resynced_under_writes_loses_no_change() -> anyhow::Result<()> {
    use std::sync::Arc;
    use std::sync::atomic::{AtomicBool, Ordering};

    let mut p = Pipeline::start("r_blocked").await?;
    let pg = p.pg().await?;
    pg.batch_execute(
        "CREATE TABLE t (id bigint PRIMARY KEY, touched int NOT NULL DEFAULT 0, again text);
         INSERT INTO t SELECT g, 0, 'a' || g FROM generate_series(1, 200) g;
         CREATE PUBLICATION sluice FOR TABLE t;",
    )
    .await?;
    p.set_failpoints(Some("replicator::resync::before_plan=return(1500)"));
    p.spawn_replicator()?;
    p.set_failpoints(None);
    p.spawn_loader()?;
    p.wait_until_equal(CONVERGE).await?;

    let stop = Arc::new(AtomicBool::new(false));
    let writer = {
        let pg = p.pg().await?;
        let stop = stop.clone();
        tokio::spawn(async move {
            let mut i: i64 = 0;
            while !stop.load(Ordering::Relaxed) {
                i += 1;
                pg.execute(
                    "UPDATE t SET touched = touched + 1 WHERE id = $1",
                    &[&(i % 200 + 1)],
                )
                .await?;
                pg.execute("INSERT INTO t (id) VALUES ($1)", &[&(1000 + i)])
                    .await?;
                tokio::time::sleep(Duration::from_millis(5)).await;
            }
            anyhow::Ok(i)
        })
    };
    tokio::time::sleep(Duration::from_millis(300)).await;
    pg.batch_execute("ALTER TABLE t DROP COLUMN again").await?;
    pg.batch_execute("ALTER TABLE t ADD COLUMN again text")
        .await?;
    // Writes go on through the resync's slowed start.
    tokio::time::sleep(Duration::from_secs(4)).await;
    stop.store(true, Ordering::Relaxed);
    let writes = writer.await??;
    anyhow::ensure!(writes > 100, "only {writes} rounds of writes");
    p.wait_until_equal(CONVERGE).await?;
    let started = p.log_lines_containing("replicator", "resync snapshot started");
    anyhow::ensure!(!started.is_empty(), "no resync ran");
    Ok(())
}
