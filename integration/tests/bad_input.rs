//! Bad input gets one clear error and loses nothing (invariant 6), end to
//! end with the real binaries: a malformed message in the stream, a table
//! without a replica identity, a missing publication.

use std::time::{Duration, Instant};

use anyhow::Context as _;
use sluice_integration::pipeline::{self, Pipeline, Rng, run_workload, workload_table_sql};

const CONVERGE: Duration = Duration::from_secs(120);

async fn wait_for_metric(
    what: &str,
    at_least: f64,
    scrape: impl AsyncFn() -> anyhow::Result<String>,
) -> anyhow::Result<()> {
    let deadline = Instant::now() + CONVERGE;
    loop {
        // The endpoint is not listening until the process has started.
        let text = scrape().await.unwrap_or_default();
        if pipeline::metric(&text, what).is_some_and(|v| v >= at_least) {
            return Ok(());
        }
        anyhow::ensure!(
            Instant::now() < deadline,
            "{what} never reached {at_least}:\n{text}"
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}

/// Waits until `verify` finds the healthy table `public.items` equal (the
/// others may not be).
async fn wait_items_equal(p: &mut Pipeline) -> anyhow::Result<()> {
    let deadline = Instant::now() + CONVERGE;
    loop {
        p.check_alive()?;
        let reports = sluice_loader::verify::verify(&p.config, Some("public.items")).await?;
        if reports.iter().all(|r| r.is_equal()) {
            return Ok(());
        }
        anyhow::ensure!(
            Instant::now() < deadline,
            "items never converged: {reports:?}"
        );
        tokio::time::sleep(Duration::from_millis(500)).await;
    }
}

#[tokio::test]
async fn poison_message_and_unreplicable_table_leave_healthy_tables_flowing() -> anyhow::Result<()>
{
    let mut p = Pipeline::start("bad_input").await?;
    let pg = p.pg().await?;
    pg.batch_execute(&format!(
        "{};
         CREATE TABLE no_identity (v int);
         INSERT INTO no_identity VALUES (1);
         CREATE PUBLICATION sluice FOR TABLE items, no_identity;",
        workload_table_sql("items")
    ))
    .await?;
    p.spawn_replicator()?;
    p.spawn_loader()?;
    run_workload(&pg, "items", 10, 20, Rng::new(21)).await?;

    // The table without a usable replica identity is reported by name and
    // skipped; the replicator keeps running.
    wait_for_metric(
        "sluice_replicator_table_errors{table=\"public.no_identity\"}",
        1.0,
        || p.replicator_metrics(),
    )
    .await?;
    p.check_alive()?;

    // A message on the healthy table's subject that is not a package.
    let js = p.jetstream().await?;
    let subject = sluice_broker::topology::table_subject(&p.name, "public", "items");
    js.publish(subject.clone(), "not a package".into())
        .await?
        .await
        .context("the stream did not take the poison message")?;
    run_workload(&pg, "items", 10, 20, Rng::new(22)).await?;
    wait_for_metric("sluice_dead_letters_total{reason=\"decode\"}", 1.0, || {
        p.loader_metrics()
    })
    .await?;

    // The healthy table converged past the poison message.
    wait_items_equal(&mut p).await?;
    // The poison message was copied to the dead-letter stream, with its reason.
    let dead = js
        .get_stream(format!("{}_DEAD_LETTERS", p.config.stream_name()))
        .await?
        .get_last_raw_message_by_subject(&sluice_broker::topology::dead_letter_subject(&p.name))
        .await?;
    assert_eq!(dead.payload.as_ref(), b"not a package");
    assert_eq!(
        dead.headers
            .get("Sluice-Original-Subject")
            .map(|v| v.as_str()),
        Some(subject.as_str())
    );
    let metrics = p.loader_metrics().await?;
    assert_eq!(
        pipeline::metric(&metrics, "sluice_gaps_detected_total").unwrap_or(0.0),
        0.0,
        "a poison message is not a gap"
    );
    Ok(())
}

#[tokio::test]
async fn a_missing_publication_is_one_clear_error() -> anyhow::Result<()> {
    let mut p = Pipeline::start("no_pub").await?;
    p.pg()
        .await?
        .batch_execute("CREATE TABLE t (id int PRIMARY KEY)")
        .await?;
    let mut run = p.replicator_command(&["run"])?;
    let deadline = Instant::now() + Duration::from_secs(60);
    let status = loop {
        if let Some(status) = run.try_wait()? {
            break status;
        }
        if Instant::now() > deadline {
            let _ = run.kill();
            anyhow::bail!("the replicator kept running without its publication");
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    };
    let log = std::fs::read_to_string(p.dir.join("replicator-cli.1.log"))?;
    assert_eq!(status.code(), Some(1), "runtime failure exit code:\n{log}");
    // The exit message is one line of its own; a log line of a task still
    // shutting down may land after it in the shared log file.
    let exit_lines: Vec<&str> = log
        .lines()
        .filter(|l| l.starts_with("sluice-replicator: "))
        .collect();
    assert_eq!(exit_lines.len(), 1, "one exit message:\n{log}");
    assert!(
        exit_lines[0].contains("publication sluice does not exist"),
        "the exit message names the publication: {}",
        exit_lines[0]
    );
    Ok(())
}

/// A dead letter is terminated in the data stream only once the dead-letter stream stored the
/// copy: with that stream gone, the loader retries the batch and terminates nothing (before,
/// a core-NATS publish nobody stored "succeeded" and the message was lost); once the stream is
/// back, the copy lands there and the table goes on.
#[tokio::test]
async fn a_dead_letter_is_terminated_only_after_its_stream_has_the_copy() -> anyhow::Result<()> {
    let mut p = Pipeline::start("dead_letter_ack").await?;
    let pg = p.pg().await?;
    pg.batch_execute(&format!(
        "{}; CREATE PUBLICATION sluice FOR TABLE items;",
        workload_table_sql("items")
    ))
    .await?;
    p.spawn_replicator()?;
    p.spawn_loader()?;
    run_workload(&pg, "items", 5, 10, Rng::new(31)).await?;
    p.wait_until_equal(CONVERGE).await?;

    // The dead-letter stream disappears (an operator, a purge of the wrong stream).
    let js = p.jetstream().await?;
    let dead_letters = format!("{}_DEAD_LETTERS", p.config.stream_name());
    js.delete_stream(&dead_letters).await?;
    let subject = sluice_broker::topology::table_subject(&p.name, "public", "items");
    js.publish(subject.clone(), "not a package".into())
        .await?
        .await
        .context("the stream did not take the poison message")?;
    // The loader tries, fails to store the copy, and keeps the batch.
    p.wait_for_log_lines("loader", "cannot publish a dead letter", 1, CONVERGE)
        .await?;
    let metrics = p.loader_metrics().await?;
    assert_eq!(
        pipeline::metric(&metrics, "sluice_dead_letters_total{reason=\"decode\"}"),
        Some(0.0),
        "a dead letter nobody stored was counted"
    );

    // The stream is back (as the replicator makes it at start); the retried batch stores the
    // copy and terminates the original.
    js.create_stream(sluice_broker::topology::dead_letter_stream_config(
        &p.config,
    ))
    .await?;
    wait_for_metric("sluice_dead_letters_total{reason=\"decode\"}", 1.0, || {
        p.loader_metrics()
    })
    .await?;
    let dead = js
        .get_stream(&dead_letters)
        .await?
        .get_last_raw_message_by_subject(&sluice_broker::topology::dead_letter_subject(&p.name))
        .await
        .context("the dead letter is not in the dead-letter stream")?;
    assert_eq!(dead.payload.as_ref(), b"not a package");
    run_workload(&pg, "items", 5, 10, Rng::new(32)).await?;
    p.wait_until_equal(CONVERGE).await?;
    Ok(())
}

/// A table that loses its replica identity while streaming (ARCHITECTURE
/// invariant 10): its keyless changes used to be published, dead-lettered by
/// the loader (no key to deduplicate by) and answered with a resync whose
/// snapshot failed again, every minute. Now the table fails alone: reported
/// once, its changes skipped, nothing dead-lettered; once it has a key again
/// it is resynced, with the rows written meanwhile.
#[tokio::test]
async fn a_table_that_loses_its_replica_identity_fails_alone_and_comes_back() -> anyhow::Result<()>
{
    let mut p = Pipeline::start("lost_identity").await?;
    let pg = p.pg().await?;
    pg.batch_execute(&format!(
        "{};
         CREATE TABLE keyed (id int PRIMARY KEY, v text);
         INSERT INTO keyed SELECT g, 'v' || g FROM generate_series(1, 100) g;
         CREATE PUBLICATION sluice FOR TABLE items, keyed;",
        workload_table_sql("items")
    ))
    .await?;
    p.set_config("replicator", "publication_check_interval", "\"1s\"")?;
    p.spawn_replicator()?;
    p.spawn_loader()?;
    p.wait_until_equal(CONVERGE).await?;

    // Inserts are still published without a replica identity (UPDATE and
    // DELETE are refused by Postgres itself).
    pg.batch_execute(
        "ALTER TABLE keyed REPLICA IDENTITY NOTHING;
         INSERT INTO keyed SELECT g, 'while keyless ' || g FROM generate_series(101, 150) g;",
    )
    .await?;
    wait_for_metric(
        "sluice_replicator_table_errors{table=\"public.keyed\"}",
        1.0,
        || p.replicator_metrics(),
    )
    .await?;
    run_workload(&pg, "items", 10, 20, Rng::new(31)).await?;
    wait_items_equal(&mut p).await?;
    let (stdout, _) = p.cli("replicator", &["status", "--json"])?;
    let keyed = pipeline::json_object_with(&stdout, "\"table\": \"public.keyed\"")
        .with_context(|| format!("public.keyed missing from status:\n{stdout}"))?;
    let state = pipeline::json_field(keyed, "state").unwrap_or_default();
    assert!(
        state.starts_with("\"failed: ") && state.contains("replica identity"),
        "{stdout}"
    );
    // A resync by hand says why it cannot help yet.
    let refused = p
        .cli("replicator", &["resync", "--table", "public.keyed"])
        .expect_err("a resync of a table that cannot be replicated was accepted");
    assert!(
        format!("{refused:#}").contains("cannot be replicated as it is"),
        "{refused:#}"
    );
    assert_eq!(
        p.log_lines_containing("replicator", "no usable replica identity any more")
            .len(),
        1,
        "reported once:\n{}",
        p.log_tail("replicator", 30)
    );

    // Fixed: the table is loaded again, rows written meanwhile included.
    pg.batch_execute(
        "ALTER TABLE keyed REPLICA IDENTITY DEFAULT;
         INSERT INTO keyed SELECT g, 'fixed ' || g FROM generate_series(151, 160) g;
         UPDATE keyed SET v = 'updated' WHERE id % 10 = 0;",
    )
    .await?;
    let reports = p.wait_until_equal(CONVERGE).await?;
    let keyed = reports
        .iter()
        .find(|r| r.table == "public.keyed")
        .context("verify did not compare public.keyed")?;
    assert_eq!(keyed.clickhouse_rows, 160);
    let loader = p.loader_metrics().await?;
    assert_eq!(
        pipeline::metric(&loader, "sluice_dead_letters_total").unwrap_or(0.0),
        0.0,
        "dead letters:\n{}",
        p.log_tail("loader", 30)
    );
    let replicator = p.replicator_metrics().await?;
    assert_eq!(
        pipeline::metric(
            &replicator,
            "sluice_resyncs_total{table=\"public.keyed\",reason=\"added\"}"
        ),
        Some(1.0)
    );
    Ok(())
}

/// Rows ClickHouse cannot hold: the first refusal dead-letters them and
/// resyncs the table; refused again by that resync's snapshot, the table is
/// failed (ARCHITECTURE.md invariant 10): logged once, shown by `status` and
/// `sluice_loader_table_failed`, no more resyncs. The other tables go on. Once
/// the value is fixed in Postgres, a resync by hand brings the table back.
#[tokio::test]
async fn rows_clickhouse_refuses_fail_their_table_alone_until_fixed() -> anyhow::Result<()> {
    let mut p = Pipeline::start("refused_rows").await?;
    let pg = p.pg().await?;
    // `int[]` declares one dimension, yet Postgres stores a two-dimensional
    // value in it; the column's ClickHouse type, Array(Int32), cannot hold it.
    pg.batch_execute(&format!(
        "{};
         CREATE TABLE grid (id int PRIMARY KEY, cells int[]);
         INSERT INTO grid SELECT g, ARRAY[g, g + 1] FROM generate_series(1, 100) g;
         INSERT INTO grid VALUES (101, '{{{{1,2}},{{3,4}}}}');
         CREATE PUBLICATION sluice FOR TABLE items, grid;",
        workload_table_sql("items")
    ))
    .await?;
    p.spawn_replicator()?;
    p.spawn_loader()?;
    wait_for_metric(
        "sluice_loader_table_failed{table=\"public.grid\"}",
        1.0,
        || p.loader_metrics(),
    )
    .await?;
    run_workload(&pg, "items", 10, 20, Rng::new(41)).await?;
    wait_items_equal(&mut p).await?;

    let (stdout, _) = p.cli("loader", &["status", "--json"])?;
    let grid = pipeline::json_object_with(&stdout, "\"table\": \"public.grid\"")
        .with_context(|| format!("public.grid missing from status:\n{stdout}"))?;
    assert_eq!(pipeline::json_field(grid, "state"), Some("\"failed\""));
    let reason = pipeline::json_field(grid, "reason").unwrap_or_default();
    assert!(
        reason.starts_with("\"failed: ") && reason.contains("array of 2 dimensions"),
        "{stdout}"
    );
    // One resync asked for (the initial snapshot refused the row), none
    // after the second refusal.
    assert_eq!(p.resyncs_in_stream("grid", "refused").await?, 1);
    assert_eq!(
        p.log_lines_containing("loader", "rows refused again").len(),
        1,
        "reported once:\n{}",
        p.log_tail("loader", 30)
    );

    // Fixed in Postgres, then resynced by hand: loaded again.
    pg.batch_execute("UPDATE grid SET cells = '{1,2,3,4}' WHERE id = 101")
        .await?;
    p.cli("replicator", &["resync", "--table", "public.grid"])?;
    let reports = p.wait_until_equal(CONVERGE).await?;
    let grid = reports
        .iter()
        .find(|r| r.table == "public.grid")
        .context("verify did not compare public.grid")?;
    assert_eq!(grid.clickhouse_rows, 101);
    wait_for_metric(
        "sluice_loader_resyncs_completed_total{table=\"public.grid\"}",
        1.0,
        || p.loader_metrics(),
    )
    .await?;
    let loader = p.loader_metrics().await?;
    assert_eq!(
        pipeline::metric(&loader, "sluice_loader_table_failed{table=\"public.grid\"}"),
        Some(0.0)
    );
    assert_eq!(p.resyncs_in_stream("grid", "refused").await?, 1);
    assert_eq!(p.resyncs_in_stream("grid", "manual").await?, 1);
    Ok(())
}

/// `sluice-loader dead-letters`: an undecodable message and a package without a chain position
/// are listed with reason, table and data-stream sequence; `show` decodes the package; `replay`
/// writes its rows into ClickHouse (and refuses the undecodable one); `purge` needs an operator's
/// NATS user, not the loader's.
#[tokio::test]
async fn dead_letters_are_listed_shown_replayed_and_purged() -> anyhow::Result<()> {
    use sluice_proto::v1;
    let mut p = Pipeline::start("dead_letter_cli").await?;
    let pg = p.pg().await?;
    pg.batch_execute(
        "CREATE TABLE items (id bigint PRIMARY KEY, note text);
         INSERT INTO items SELECT g, 'item ' || g FROM generate_series(1, 10) g;
         CREATE PUBLICATION sluice FOR TABLE items;",
    )
    .await?;
    p.spawn_replicator()?;
    p.spawn_loader()?;
    p.wait_until_equal(CONVERGE).await?;

    let column = |name: &str, type_oid: u32, type_name: &str, key: bool| v1::Column {
        name: name.into(),
        type_oid,
        type_name: type_name.into(),
        nullable: !key,
        key,
        type_kind: v1::TypeKind::Base as i32,
        base_type_oid: type_oid,
        ..Default::default()
    };
    let unpositioned = v1::Package {
        source: p.name.clone(),
        schema: "public".into(),
        table: "items".into(),
        kind: v1::Kind::Changes as i32,
        relation: Some(v1::Relation {
            oid: 1,
            columns: vec![
                column("id", 20, "bigint", true),
                column("note", 25, "text", false),
            ],
            replica_identity: "d".into(),
            ..Default::default()
        }),
        commit_lsn: 0x7FFF_0000_0000,
        rows: vec![v1::Row {
            op: v1::Op::Insert as i32,
            values: vec![
                v1::Value {
                    kind: Some(v1::value::Kind::Int(777_777)),
                },
                v1::Value {
                    kind: Some(v1::value::Kind::Text("replayed".into())),
                },
            ],
            ..Default::default()
        }],
        ..Default::default()
    };
    let js = p.jetstream().await?;
    let subject = sluice_broker::topology::table_subject(&p.name, "public", "items");
    js.publish(subject.clone(), "not a package".into())
        .await?
        .await?;
    let mut headers = async_nats::HeaderMap::new();
    headers.insert(sluice_proto::ENCODING_HEADER, "zstd");
    js.publish_with_headers(
        subject.clone(),
        headers,
        sluice_proto::encode(&unpositioned, sluice_proto::Encoding::Zstd).into(),
    )
    .await?
    .await?;
    wait_for_metric("sluice_dead_letters_total", 2.0, || p.loader_metrics()).await?;

    let (stdout, _) = p.cli("loader", &["dead-letters", "list", "--json"])?;
    let letters: Vec<serde_json::Value> = serde_json::from_str(&stdout)?;
    assert_eq!(letters.len(), 2, "{stdout}");
    let by_reason = |reason: &str| {
        letters
            .iter()
            .find(|l| l["reason"] == reason)
            .with_context(|| format!("no {reason} letter in {stdout}"))
    };
    let (decode, unpositioned) = (by_reason("decode")?, by_reason("unpositioned")?);
    for letter in [decode, unpositioned] {
        assert_eq!(letter["table"], "public.items", "{stdout}");
        assert!(letter["stream_sequence"].as_u64().is_some(), "{stdout}");
    }
    let sequence = |letter: &serde_json::Value| letter["sequence"].to_string();
    let (decode, unpositioned) = (sequence(decode), sequence(unpositioned));
    let (text, _) = p.cli("loader", &["dead-letters", "list"])?;
    assert!(text.contains("unpositioned  public.items"), "{text}");

    let (stdout, _) = p.cli("loader", &["dead-letters", "show", &unpositioned])?;
    let shown: serde_json::Value = serde_json::from_str(&stdout)?;
    let package = shown["package"].as_str().unwrap_or_default();
    assert!(
        package.contains("Changes") && package.contains("1 rows") && package.contains("note"),
        "{stdout}"
    );

    let refused = p
        .cli("loader", &["dead-letters", "replay", &decode])
        .expect_err("an undecodable letter was replayed");
    assert!(
        format!("{refused:#}").contains("does not decode"),
        "{refused:#}"
    );
    let (stdout, _) = p.cli("loader", &["dead-letters", "replay", &unpositioned])?;
    assert!(
        stdout.contains("1 rows of public.items written"),
        "{stdout}"
    );
    let replayed = p
        .servers()
        .clickhouse_sql(&format!(
            "SELECT note FROM `{}`.items FINAL WHERE id = 777777",
            p.config.clickhouse_database()
        ))
        .await?;
    assert_eq!(replayed.trim(), "replayed");

    p.cli("loader", &["dead-letters", "purge", &decode])
        .expect_err("the loader's own NATS user purged a dead letter");
    p.cli_as_admin("loader", &["dead-letters", "purge", &decode, &unpositioned])?;
    let (text, _) = p.cli("loader", &["dead-letters", "list"])?;
    assert_eq!(text.trim(), "no dead letters");
    Ok(())
}

/// Packages anyone able to publish on the stream's subjects could send, each
/// small as stored and huge once decompressed, plus a chunked package whose
/// rest never comes. The loader decodes at most `batch_max_decoded_bytes` per
/// part of a batch, so its peak RSS stays bounded; what exceeds the budget
/// is dead-lettered; the healthy table loads meanwhile.
#[tokio::test]
async fn hostile_packages_leave_the_loader_within_its_memory_bound() -> anyhow::Result<()> {
    use sluice_proto::v1;
    /// The budget set below, and the bound it implies for this small test:
    /// at most two parts decoded at once, each held about three times (the
    /// decompressed bytes, the decoded package, its encoded rows), over the
    /// loader's own working set.
    const BUDGET: usize = 16 << 20;
    const MAX_RSS_KB: u64 = 320 * 1024;
    let mut p = Pipeline::start("hostile").await?;
    let pg = p.pg().await?;
    pg.batch_execute(&format!(
        "{};
         CREATE PUBLICATION sluice FOR TABLE items;",
        workload_table_sql("items")
    ))
    .await?;
    p.set_configs(
        "loader",
        &[
            ("batch_max_decoded_bytes", &BUDGET.to_string()),
            ("incomplete_package_wait", "\"3s\""),
        ],
    )?;
    p.spawn_replicator()?;
    p.spawn_loader()?;
    run_workload(&pg, "items", 10, 20, Rng::new(31)).await?;
    wait_items_equal(&mut p).await?;

    let js = p.jetstream().await?;
    let heartbeat = sluice_broker::topology::heartbeat_subject(&p.name);
    let zstd_headers = || {
        let mut headers = async_nats::HeaderMap::new();
        headers.insert(sluice_proto::ENCODING_HEADER, "zstd");
        headers
    };
    // A heartbeat is decoded whole and kept until its batch is applied; one
    // row of `size` bytes makes it as big as wanted.
    let fat_heartbeat = |size: usize| {
        let package = v1::Package {
            source: p.name.clone(),
            kind: v1::Kind::Heartbeat as i32,
            commit_time_us: std::time::SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)
                .map_or(0, |d| d.as_micros() as i64),
            rows: vec![v1::Row {
                values: vec![v1::Value {
                    kind: Some(v1::value::Kind::Text("x".repeat(size))),
                }],
                ..Default::default()
            }],
            ..Default::default()
        };
        bytes::Bytes::from(sluice_proto::encode(&package, sluice_proto::Encoding::Zstd))
    };
    // Within the budget one by one: 480 MB together.
    let within = fat_heartbeat(12 << 20);
    for _ in 0..40 {
        js.publish_with_headers(heartbeat.clone(), zstd_headers(), within.clone())
            .await?
            .await?;
    }
    // Each states more than the budget: refused before any allocation.
    let over = fat_heartbeat(100 << 20);
    for _ in 0..10 {
        js.publish_with_headers(heartbeat.clone(), zstd_headers(), over.clone())
            .await?
            .await?;
    }
    // zstd bombs that state no size: 600 MB of zeros each.
    let mut encoder = zstd::stream::write::Encoder::new(Vec::new(), 3)?;
    let zeros = vec![0u8; 1 << 20];
    for _ in 0..600 {
        std::io::Write::write_all(&mut encoder, &zeros)?;
    }
    let bomb = bytes::Bytes::from(encoder.finish()?);
    for _ in 0..3 {
        js.publish_with_headers(heartbeat.clone(), zstd_headers(), bomb.clone())
            .await?
            .await?;
    }
    // Snapshot packages of `COPY` text that lie: one states four billion
    // rows for two bytes of text (a reservation by the stated count would
    // take 96 GiB), one holds a value that is not its column's type. Each is
    // dead-lettered as undecodable.
    let copy_package = |text: &[u8], rows: u32| {
        let package = v1::Package {
            source: p.name.clone(),
            schema: "public".into(),
            table: "hostile_copy".into(),
            kind: v1::Kind::Snapshot as i32,
            relation: Some(v1::Relation {
                columns: vec![v1::Column {
                    name: "id".into(),
                    type_name: "int8".into(),
                    key: true,
                    text_category: v1::TextCategory::Int as i32,
                    ..Default::default()
                }],
                ..Default::default()
            }),
            copy_text: text.to_vec().into(),
            copy_rows: rows,
            ..Default::default()
        };
        bytes::Bytes::from(sluice_proto::encode(&package, sluice_proto::Encoding::Zstd))
    };
    for body in [copy_package(b"1\n", u32::MAX), copy_package(b"x\n", 1)] {
        js.publish_with_headers(
            sluice_broker::topology::table_subject(&p.name, "public", "hostile_copy"),
            zstd_headers(),
            body,
        )
        .await?
        .await?;
    }
    // The first chunk of two, whose second never comes: the healthy table's
    // changes behind it wait `incomplete_package_wait`, not forever.
    let mut headers = zstd_headers();
    headers.insert(sluice_broker::chunk::CHUNK_HEADER, "1/2");
    headers.insert(sluice_broker::chunk::PACKAGE_ID_HEADER, "hostile-1");
    js.publish_with_headers(
        sluice_broker::topology::table_subject(&p.name, "public", "hostile"),
        headers,
        "half".into(),
    )
    .await?
    .await?;

    run_workload(&pg, "items", 10, 20, Rng::new(32)).await?;
    wait_items_equal(&mut p).await?;
    let pid = p.loader_pid().context("loader not running")?;
    let peak = pipeline::peak_rss_kb(pid)?;
    eprintln!("loader peak RSS: {} MiB", peak / 1024);
    assert!(
        peak < MAX_RSS_KB,
        "the loader peaked at {} MiB, over {} MiB",
        peak / 1024,
        MAX_RSS_KB / 1024
    );
    wait_for_metric("sluice_dead_letters_total{reason=\"decode\"}", 15.0, || {
        p.loader_metrics()
    })
    .await?;
    let released = p.log_lines_containing("loader", "without an incomplete chunked package");
    assert!(!released.is_empty(), "{}", p.log_tail("loader", 30));
    Ok(())
}
