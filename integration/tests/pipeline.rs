//! End to end through the real binaries: Postgres → sluice-replicator →
//! JetStream → sluice-loader → ClickHouse, checked with `verify` (the rows in
//! ClickHouse `FINAL` equal the rows in Postgres).

use std::time::{Duration, Instant};

use anyhow::Context as _;
use sluice_integration::pipeline::{self, Nats, Pipeline, Rng, run_workload, workload_table_sql};
use sluice_integration::wal_insert_lsn;
use sluice_loader::verify::TableReport;

const CONVERGE: Duration = Duration::from_secs(90);

/// The report of `table` (`schema.table`) among `reports`.
fn report_of<'a>(reports: &'a [TableReport], table: &str) -> anyhow::Result<&'a TableReport> {
    reports
        .iter()
        .find(|r| r.table == table)
        .with_context(|| format!("no report for {table}"))
}

/// The differing keys of a report, each with its kind of difference.
fn differences(report: &TableReport) -> Vec<(&str, String)> {
    report
        .differences
        .iter()
        .map(|d| (d.key.as_str(), format!("{:?}", d.kind)))
        .collect()
}

const ALL_TYPES: &str = r#"
CREATE TYPE mood AS ENUM ('sad', 'ok', 'happy');
CREATE DOMAIN posint AS int CHECK (VALUE > 0);
CREATE TABLE alltypes (
    id int PRIMARY KEY,
    b bool, i2 int2, i4 int4, i8 int8, f4 float4, f8 float8,
    n12 numeric(12,3), n numeric,
    t text, vc varchar(20), c5 char(5), by bytea, u uuid, j json, jb jsonb,
    d date, tm time, ttz timetz, ts timestamp, tstz timestamptz, iv interval,
    ip inet, cidr_ cidr, mac macaddr, m money, b8 bit(8), vb varbit,
    ta text[], ia int4[][], e mood, dom posint
);
CREATE TABLE orders (id bigint PRIMARY KEY, customer int NOT NULL, amount numeric(10,2), note text);
CREATE TABLE events (id int PRIMARY KEY, payload text);
CREATE PUBLICATION sluice FOR TABLE alltypes, orders, events;
"#;

const ALL_TYPES_ROWS: &str = r#"
INSERT INTO alltypes VALUES
 (1, true, 1, 2, 3, 1.5, 2.25, 12.5, 3.14159,
  'plain', 'varchar', 'ab', '\x00ff10', 'a0eebc99-9c0b-4ef8-bb6d-6bb9bd380a11',
  '{"b": 1,   "a": [1,2]}', '{"b": 1, "a": [1, 2]}',
  '2024-02-29', '13:45:00.5', '13:45:00.5+05:30', '2024-01-01 00:00:00', '2024-01-01 12:34:56.789+02',
  '1 year 2 mons 3 days 04:05:06.5', '192.168.1.1/24', '10.0.0.0/8', '08:00:2b:01:02:03', 12.34,
  B'10101010', B'101', '{"a,b",NULL,"c\"d","NULL",""}', '{{1,2},{3,NULL}}', 'happy', 7),
 (2, NULL, NULL, NULL, NULL, NULL, NULL, NULL, NULL, NULL, NULL, NULL, NULL, NULL, NULL, NULL,
  NULL, NULL, NULL, NULL, NULL, NULL, NULL, NULL, NULL, NULL, NULL, NULL, NULL, NULL, NULL, NULL),
 (3, false, -32768, -2147483648, -9223372036854775808, 'NaN', 'Infinity', -999999999.999, 'NaN',
  E'h\u00e9llo\t\n \u4e16\u754c \U0001F680 \\ '' " end', '', '     ', '\x', '00000000-0000-0000-0000-000000000000',
  '[]', '{"k": {"nested": [true, false, null]}, "\u00e9": "x"}',
  'infinity', '24:00:00', '00:00:00-14:59', '-infinity', '0001-01-01 00:00:00+00',
  '-1 years -2 mons +3 days -04:05:06.5', '::1', '2001:db8::/32', 'ff:ff:ff:ff:ff:ff', -92233720368547758.08,
  B'00000000', B'', '{}', '{}', 'sad', 1),
 (4, true, 32767, 2147483647, 9223372036854775807, '-Infinity', '-Infinity', 0.001, '123456789012345678901234567890.123456789',
  'x', 'y', 'z', '\xdeadbeef', 'ffffffff-ffff-ffff-ffff-ffffffffffff', 'null', '"str"',
  '0001-01-01', '00:00:00', '23:59:59.999999+14', '1899-12-31 23:59:59', '2300-01-01 00:00:00+00',
  '00:00:00', '0.0.0.0', '0.0.0.0/0', '00:00:00:00:00:00', 0,
  B'11111111', B'1', '{x}', '{1,2,3}', 'ok', 2147483647),
 (5, true, 5, 5, 5, 1e-30, 1e300, 1, '-0.000100',
  'to delete', 'v', 'c', '\x01', 'a0eebc99-9c0b-4ef8-bb6d-6bb9bd380a12', '{}', '{}',
  '1970-01-01', '12:00:00', '12:00:00+00', '1970-01-01 00:00:00.000001', '1970-01-01 00:00:00.000001+00',
  '1 day', '1.2.3.4', '1.2.3.0/24', '01:02:03:04:05:06', 1,
  B'00000001', B'0101', '{a}', '{{1}}', 'ok', 5);
"#;

#[tokio::test]
async fn mixed_types_and_workload_arrive_equal() -> anyhow::Result<()> {
    let mut p = Pipeline::start("e2e_mixed").await?;
    let pg = p.pg().await?;
    pg.batch_execute(ALL_TYPES).await?;
    p.spawn_replicator()?;
    p.spawn_loader()?;
    pg.batch_execute(ALL_TYPES_ROWS).await?;
    // Values only some versions have: numeric ±Infinity (14+), interval ±infinity (17+).
    let version = sluice_postgres::version::server_version_num(&pg).await?;
    if sluice_postgres::version::has_numeric_infinity(version) {
        pg.batch_execute("UPDATE alltypes SET n = '-Infinity' WHERE id = 3")
            .await?;
    }
    if sluice_postgres::version::has_interval_infinity(version) {
        pg.batch_execute(
            "UPDATE alltypes SET iv = 'infinity' WHERE id = 3;
             UPDATE alltypes SET iv = '-infinity' WHERE id = 4;",
        )
        .await?;
    }
    pg.batch_execute(
        "INSERT INTO orders SELECT g, g % 17, g * 1.25, 'note ' || g FROM generate_series(1, 200) g;
         INSERT INTO events SELECT g, 'event ' || g FROM generate_series(1, 100) g;",
    )
    .await?;
    // Updates, a primary-key change, deletes.
    pg.batch_execute(
        "UPDATE alltypes SET t = 'updated', f8 = -0.5, jb = '{\"u\": 1}', ia = '{{9,8},{7,6}}', \
             ts = '2030-06-15 08:09:10.123456', e = 'sad' WHERE id = 1;
         UPDATE alltypes SET id = 100, i4 = 42 WHERE id = 2;
         DELETE FROM alltypes WHERE id = 5;
         UPDATE orders SET amount = amount * 2, note = NULL WHERE id % 4 = 0;
         BEGIN; UPDATE orders SET id = id + 1000 WHERE id <= 10; DELETE FROM orders WHERE id BETWEEN 100 AND 119; COMMIT;
         UPDATE orders SET id = 5 WHERE id = 1005;",
    )
    .await?;
    // TRUNCATE then new rows; then a new column, filled by updates.
    pg.batch_execute(
        "TRUNCATE events;
         INSERT INTO events SELECT g, 'after truncate ' || g FROM generate_series(50, 99) g;
         ALTER TABLE events ADD COLUMN extra int;
         ALTER TABLE alltypes ADD COLUMN added text;
         UPDATE events SET extra = id * 2 WHERE id % 2 = 0;
         UPDATE alltypes SET added = 'filled ' || id;
         INSERT INTO events VALUES (1000, 'with extra', 7);",
    )
    .await?;
    let started = Instant::now();
    let reports = p.wait_until_equal(CONVERGE).await?;
    eprintln!("converged in {:?}", started.elapsed());
    for r in &reports {
        eprintln!("{r}");
    }
    assert_eq!(reports.len(), 3);
    let counts: Vec<u64> = reports.iter().map(|r| r.postgres_rows).collect();
    // alltypes: 1, 3, 4, 100; events: 50 + 1; orders: 200 - 20.
    assert_eq!(counts, [4, 51, 180], "{reports:?}");
    // Every value of the type matrix decoded as its type (none fell back to text).
    let metrics = p.replicator_metrics().await?;
    for table in ["public.alltypes", "public.orders", "public.events"] {
        let series = format!("sluice_value_decode_errors_total{{table=\"{table}\"}}");
        assert_eq!(
            pipeline::metric(&metrics, &series),
            Some(0.0),
            "{series} on Postgres {version}"
        );
    }
    // `worker_threads = 0` (the default): one thread on a machine with two CPUs or fewer,
    // one per CPU above.
    let cpus = std::thread::available_parallelism().map_or(1, usize::from);
    let threads = if cpus <= 2 { 1 } else { cpus };
    let started = p.log_lines_containing("replicator", "metrics endpoint listening");
    let logged = started.first().and_then(|line| {
        line.split_whitespace()
            .find_map(|field| field.strip_prefix("worker_threads="))
    });
    assert_eq!(
        logged,
        Some(threads.to_string().as_str()),
        "{cpus} CPUs: {started:?}"
    );
    p.stop_loader().await?;
    p.stop_replicator().await?;
    Ok(())
}

#[tokio::test]
async fn initial_snapshot_and_concurrent_transactions_arrive() -> anyhow::Result<()> {
    let mut p = Pipeline::start("e2e_snapshot").await?;
    let pg = p.pg().await?;
    pg.batch_execute(
        "CREATE TABLE snap (id bigint PRIMARY KEY, v text);
         CREATE TABLE other (id int PRIMARY KEY, w int);
         INSERT INTO snap SELECT g, repeat('x', 50) || g FROM generate_series(1, 20000) g;
         INSERT INTO other SELECT g, g FROM generate_series(1, 500) g;
         CREATE PUBLICATION sluice FOR TABLE snap, other;",
    )
    .await?;
    // A transaction open while the replicator starts (slot creation waits for
    // it or the snapshot includes it), and writers during the snapshot.
    let open = p.pg().await?;
    open.batch_execute("BEGIN; INSERT INTO snap VALUES (-1, 'open during start'); UPDATE other SET w = -w WHERE id <= 100;")
        .await?;
    // The other tests load with LZ4 and store zstd packages (the defaults); this one both
    // uncompressed. And the replicator runs on two worker threads (on a 2-core machine the
    // others run on one).
    p.set_config("clickhouse", "compression", "\"none\"")?;
    p.set_config("replicator", "compression", "\"none\"")?;
    p.set_config("replicator", "worker_threads", "2")?;
    p.spawn_replicator()?;
    p.spawn_loader()?;
    let writer = {
        let pg = p.pg().await?;
        tokio::spawn(async move {
            for i in 0..40i64 {
                pg.batch_execute(&format!(
                    "INSERT INTO snap VALUES ({}, 'during'); UPDATE snap SET v = 'updated' WHERE id = {}; DELETE FROM other WHERE id = {};",
                    100_000 + i,
                    i * 7 + 1,
                    400 + i
                ))
                .await?;
                tokio::time::sleep(Duration::from_millis(50)).await;
            }
            anyhow::Ok(())
        })
    };
    tokio::time::sleep(Duration::from_millis(700)).await;
    open.batch_execute("COMMIT").await?;
    writer.await??;
    let reports = p.wait_until_equal(CONVERGE).await?;
    for r in &reports {
        eprintln!("{r}");
    }
    assert_eq!(
        reports.iter().map(|r| r.postgres_rows).sum::<u64>(),
        20_001 + 40 + 460
    );
    let started = p.log_lines_containing("replicator", "metrics endpoint listening");
    assert!(
        started.len() == 1 && started[0].contains("worker_threads=2"),
        "{started:?}"
    );
    // Every table package is stored as plain protobuf, and says so.
    let mut tables = 0;
    for message in p.stream_messages().await? {
        if message.subject.ends_with(".snap") || message.subject.ends_with(".other") {
            tables += 1;
            assert_eq!(
                message.encoding.as_deref(),
                Some("identity"),
                "{}",
                message.subject
            );
            assert!(
                message.package.is_ok(),
                "{}: {:?}",
                message.subject,
                message.package
            );
        }
    }
    assert!(tables > 40, "only {tables} table packages in the stream");
    Ok(())
}

#[tokio::test]
async fn r3_stream_on_the_cluster_carries_a_workload() -> anyhow::Result<()> {
    let Some(mut p) = Pipeline::start_on("e2e_r3", Nats::Cluster).await? else {
        eprintln!("skipped: no NATS cluster (set SLUICE_TEST_NATS_CLUSTER_URLS)");
        return Ok(());
    };
    let pg = p.pg().await?;
    pg.batch_execute(&format!(
        "{}; CREATE PUBLICATION sluice FOR TABLE items;",
        workload_table_sql("items")
    ))
    .await?;
    p.spawn_replicator()?;
    p.spawn_loader()?;
    let changes = run_workload(&pg, "items", 50, 100, Rng::from_clock()).await?;
    p.wait_until_equal(CONVERGE).await?;
    let js = p.jetstream().await?;
    let mut stream = js.get_stream(p.config.stream_name()).await?;
    let info = stream.info().await?;
    assert_eq!(info.config.num_replicas, 3);
    eprintln!("{changes} changes through an R3 stream");
    p.check_chains_have_no_duplicates().await?;
    Ok(())
}

/// Values bigger than a NATS message (the test servers' `max_payload` is
/// 8 MB): a 10 MB incompressible `bytea` and a 1 MB `text`, inserted,
/// updated and deleted, arrive intact, and the table keeps flowing.
#[tokio::test]
async fn values_larger_than_a_nats_message_arrive() -> anyhow::Result<()> {
    let mut p = Pipeline::start("e2e_big_values").await?;
    let pg = p.pg().await?;
    pg.batch_execute(
        "CREATE TABLE blobs (id int PRIMARY KEY, t text, b bytea);
         CREATE PUBLICATION sluice FOR TABLE blobs;",
    )
    .await?;
    p.spawn_replicator()?;
    p.spawn_loader()?;
    p.wait_replicator_ready(CONVERGE).await?;
    // md5 output is incompressible enough that zstd cannot shrink it below
    // the message limit.
    pg.batch_execute(
        "INSERT INTO blobs VALUES (1, repeat('x', 1048576),
             (SELECT decode(string_agg(md5(g::text), ''), 'hex') FROM generate_series(1, 655360) g));
         INSERT INTO blobs VALUES (2, 'small', '\\x00');
         INSERT INTO blobs VALUES (3, (SELECT string_agg(md5(g::text), '') FROM generate_series(1, 32768) g), NULL);
         UPDATE blobs SET t = t || 'y' WHERE id = 1;
         DELETE FROM blobs WHERE id = 2;
         INSERT INTO blobs VALUES (4, 'after', '\\x01');",
    )
    .await?;
    let reports = p.wait_until_equal(CONVERGE).await?;
    assert_eq!(reports[0].postgres_rows, 3, "{}", reports[0]);
    p.check_chains_have_no_duplicates().await?;
    Ok(())
}

/// An UPDATE that leaves a TOASTed value alone (pgoutput does not send it)
/// gets the value of the row's newest version: the one in ClickHouse, or one
/// written by an earlier transaction in the same loader batch. The loader
/// encodes most packages ahead of their INSERT; one whose rows an unchanged
/// value must be filled from is read again for that.
#[tokio::test]
async fn unchanged_toast_values_are_filled_from_the_newest_version() -> anyhow::Result<()> {
    let mut p = Pipeline::start("e2e_toast").await?;
    let pg = p.pg().await?;
    pg.batch_execute(
        "CREATE TABLE docs (id int PRIMARY KEY, body text, n int);
         ALTER TABLE docs ALTER COLUMN body SET STORAGE EXTERNAL;
         CREATE PUBLICATION sluice FOR TABLE docs;",
    )
    .await?;
    p.spawn_replicator()?;
    p.spawn_loader()?;
    p.wait_replicator_ready(CONVERGE).await?;
    // 64 kB bodies, stored out of line.
    pg.batch_execute(
        "INSERT INTO docs SELECT g, (SELECT string_agg(md5(g::text || h::text), '')
             FROM generate_series(1, 2000) h), 0 FROM generate_series(1, 3) g",
    )
    .await?;
    p.wait_until_equal(CONVERGE).await?;

    // Published while no loader runs, so that one batch holds them all;
    // one transaction each (one package each).
    p.stop_loader().await?;
    for sql in [
        // Filled from ClickHouse.
        "UPDATE docs SET n = 1 WHERE id = 1",
        // A new body, then an update that leaves it alone: filled from the
        // change before it in the same batch, not from ClickHouse's (older) row.
        "UPDATE docs SET body = body || 'new' WHERE id = 2",
        "UPDATE docs SET n = 2 WHERE id = 2",
        "UPDATE docs SET n = 3 WHERE id = 2",
    ] {
        pg.batch_execute(sql).await?;
    }
    let end = wal_insert_lsn(&pg).await?;
    p.wait_slot_confirmed(&end, CONVERGE).await?;
    p.spawn_loader()?;
    let reports = p.wait_until_equal(CONVERGE).await?;
    assert_eq!(reports[0].postgres_rows, 3, "{}", reports[0]);
    // Converged by applying the changes, not by blocking the table and
    // rebuilding it from Postgres.
    let blocked = p.log_lines_containing("loader", "rows cannot be written");
    assert!(blocked.is_empty(), "{blocked:?}");
    let resyncs = p.log_lines_containing("loader", "resync started");
    assert_eq!(resyncs.len(), 1, "only the initial snapshot: {resyncs:?}");
    Ok(())
}

/// `verify` names exactly the keys that differ: one corrupted value, one row deleted and one stray
/// row added in ClickHouse, among 20,000 equal rows (compared by key hash, streamed); a sample
/// reads only part of the keys; tables keyed by a float, by a padded `char(3)` and by bool, decimal
/// and time are compared the same way (by checksums, then streamed).
#[tokio::test]
async fn verify_names_exactly_the_keys_that_differ() -> anyhow::Result<()> {
    let mut p = Pipeline::start("verify_keys").await?;
    let pg = p.pg().await?;
    pg.batch_execute(
        "CREATE TABLE accounts (id bigint PRIMARY KEY, owner text, balance numeric(12,2));
         INSERT INTO accounts SELECT g, 'owner ' || g, g * 1.5 FROM generate_series(1, 20000) g;
         CREATE TABLE readings (at float8 PRIMARY KEY, v int);
         INSERT INTO readings SELECT g / 4.0, g FROM generate_series(1, 50) g;
         CREATE TABLE countries (code char(3) PRIMARY KEY, name text);
         INSERT INTO countries SELECT chr(65 + g / 26) || chr(65 + g % 26), 'c' || g
             FROM generate_series(0, 99) g;
         CREATE TABLE combos (flag bool, amount numeric(10, 2), at time, v int,
             PRIMARY KEY (flag, amount, at));
         INSERT INTO combos SELECT g % 2 = 0, g / 4.0, '00:00:00'::time + g * interval '0.5 s', g
             FROM generate_series(1, 300) g;
         CREATE PUBLICATION sluice FOR TABLE accounts, readings, countries, combos;",
    )
    .await?;
    p.spawn_replicator()?;
    p.spawn_loader()?;
    p.wait_until_equal(Duration::from_secs(120)).await?;
    p.stop_loader().await?;
    // Keys of every kind but arrays are compared by checksums and streamed (not held in
    // memory), their key text alike on both sides: no bucket differs (with the loader stopped:
    // while it runs, a table may change between the two passes).
    for report in &p.verify().await? {
        let checksums = report.checksums.with_context(|| format!("{report}"))?;
        assert_eq!(checksums.differing_buckets, 0, "{report}");
    }

    let db = p.name.clone();
    let servers = p.servers();
    let ch = |sql: String| async move { servers.clickhouse_sql(&sql).await };
    // A corrupted value, a row gone, a stray row (newer versions, as a faulty writer would add).
    ch(format!(
        "INSERT INTO `{db}`.accounts (id, owner, balance, _sluice_version, _sluice_deleted) \
         VALUES (777, 'mallory', 1165.50, 1267650600228229401496703205376, 0), \
                (12345, 'owner 12345', 18517.50, 1267650600228229401496703205376, 1), \
                (99999, 'nobody', 1.00, 1267650600228229401496703205376, 0)"
    ))
    .await?;
    ch(format!(
        "INSERT INTO `{db}`.readings (at, v, _sluice_version, _sluice_deleted) \
         VALUES (0.5, -1, 1267650600228229401496703205376, 0)"
    ))
    .await?;
    ch(format!(
        "INSERT INTO `{db}`.combos (flag, amount, at, v, _sluice_version, _sluice_deleted) \
         VALUES (true, 1.5, '00:00:03', -6, 1267650600228229401496703205376, 0), \
                (true, 2.5, '00:00:05', 10, 1267650600228229401496703205376, 1)"
    ))
    .await?;

    let reports = p.verify().await?;
    let accounts = report_of(&reports, "public.accounts")?;
    let keys = differences(accounts);
    assert_eq!(accounts.differing_keys, 3, "{accounts}");
    assert_eq!(keys.len(), 3, "{accounts}");
    assert!(
        keys[0].0 == "(12345)" && keys[0].1 == "OnlyInPostgres",
        "{keys:?}"
    );
    assert!(
        keys[1].0 == "(777)" && keys[1].1.contains("owner"),
        "{keys:?}"
    );
    assert!(
        keys[2].0 == "(99999)" && keys[2].1 == "OnlyInClickHouse",
        "{keys:?}"
    );
    assert_eq!(
        (accounts.postgres_rows, accounts.clickhouse_rows),
        (20000, 20000)
    );
    // Found through the checksums of the key buckets: only the buckets of the three keys differ.
    let checksums = accounts.checksums.context("accounts not checksummed")?;
    assert!(
        checksums.buckets > 4000 && (1..=3).contains(&checksums.differing_buckets),
        "{checksums:?}"
    );
    let readings = report_of(&reports, "public.readings")?;
    assert_eq!(readings.differing_keys, 1, "{readings}");
    assert_eq!(readings.differences[0].key, "(0.5)", "{readings}");
    let combos = report_of(&reports, "public.combos")?;
    let keys = differences(combos);
    assert_eq!(
        keys,
        [
            ("(true, 1.5, 00:00:03.000000)", "Values([ColumnDifference { column: \"v\", postgres: Some(\"6\"), clickhouse: Some(\"-6\") }])".to_owned()),
            ("(true, 2.5, 00:00:05.000000)", "OnlyInPostgres".to_owned()),
        ],
        "{combos}"
    );
    let countries = report_of(&reports, "public.countries")?;
    assert!(
        countries.is_equal() && countries.postgres_rows == 100,
        "{countries}"
    );

    // A sample of a tenth: about 2,000 of the 20,000 rows, the same ones on both sides.
    let sampled = sluice_loader::verify::verify_with(
        &p.config,
        Some("public.accounts"),
        sluice_loader::verify::Options { sample: Some(0.1) },
    )
    .await?;
    let sample = &sampled[0];
    assert!(
        sample.sample.is_some_and(|f| (0.09..0.11).contains(&f)),
        "{sample}"
    );
    assert!((1000..4000).contains(&sample.postgres_rows), "{sample}");
    assert!(sample.differing_keys <= 3, "{sample}");
    // (Exit 1 when the sample holds a differing key.)
    let text = match p.cli(
        "loader",
        &["verify", "--sample", "0.1", "--table", "public.accounts"],
    ) {
        Ok((stdout, _)) => stdout,
        Err(error) => format!("{error:#}"),
    };
    assert!(text.contains("sample of 10.2% of keys"), "{text}");
    Ok(())
}

/// `verify` compares a table whose columns have a checksum text (every kind but arrays) by checksums
/// computed inside each server: equal data gives equal checksums in every key bucket (edge values
/// and NULLs included), and one changed value of any kind in ClickHouse is found, with only the
/// buckets of the changed keys compared value by value. A value whose `\x1f` moved into the next
/// column is a change too.
#[tokio::test]
async fn verify_checksums_agree_on_equal_data_and_see_each_changed_value() -> anyhow::Result<()> {
    let mut p = Pipeline::start("verify_sums").await?;
    let pg = p.pg().await?;
    pg.batch_execute(
        r#"CREATE TABLE kinds (id int PRIMARY KEY, b bool, f4 real, f8 float8, n numeric(12,3),
             m money, d date, ts timestamp, tz timestamptz, t time, by bytea, u uuid, j jsonb,
             c char(4), tx text, tx2 text, iv interval);
         INSERT INTO kinds SELECT g, g % 2 = 0, g / 3.0, g / 7.0, g * 1.5, g * 0.25,
             '2024-01-01'::date + g, '2024-01-01 00:00:00'::timestamp + g * interval '1.5 s',
             '2024-01-01 00:00:00+00'::timestamptz + g * interval '1 min',
             '00:00:00'::time + g * interval '1.25 s', int4send(g), md5(g::text)::uuid,
             jsonb_build_object('g', g), 'c' || (g % 100), 'text ' || g, NULL, g * interval '1 h'
             FROM generate_series(1, 3000) g;
         UPDATE kinds SET b = NULL, f4 = NULL, f8 = NULL, n = NULL, m = NULL, d = NULL, ts = NULL,
             tz = NULL, t = NULL, by = NULL, u = NULL, j = NULL, c = NULL, tx = NULL, iv = NULL
             WHERE id % 11 = 0;
         INSERT INTO kinds VALUES
             (9001, false, 'NaN', '-0', 'NaN', -1.5, 'infinity', '1800-01-01', '-infinity',
              '24:00:00', '\x', '00000000-0000-0000-0000-000000000000', '[]', 'ab', '', E'\\N', '0'),
             (9002, true, 'Infinity', 1e300, 0.100, 0, '-infinity', '2400-01-01', '1970-01-01 00:00:00.000001+00',
              '12:34:56.5', '\x00ff', 'ffffffff-ffff-ffff-ffff-ffffffffffff', '{"é": "\u00e9\t"}', '', E'a\x1f', 'b', '-1 days'),
             (9003, NULL, '-Infinity', 5e-324, -0.001, NULL, '1900-01-01', '2299-12-31 23:59:59.999999', NULL,
              '00:00:00.000001', NULL, NULL, 'null', NULL, E'tab\there\nnewline \\ backslash', NULL, NULL);
         CREATE PUBLICATION sluice FOR TABLE kinds;"#,
    )
    .await?;
    p.spawn_replicator()?;
    p.spawn_loader()?;
    p.wait_until_equal(Duration::from_secs(120)).await?;
    p.stop_loader().await?;
    let reports = p.verify().await?;
    let kinds = &reports[0];
    let checksums = kinds
        .checksums
        .context("kinds was not compared by checksums")?;
    assert!(
        checksums.buckets > 1000 && checksums.differing_buckets == 0,
        "{kinds}: {checksums:?}"
    );
    assert_eq!((kinds.postgres_rows, kinds.clickhouse_rows), (3003, 3003));

    // One changed value per column, each in its own row, written as a newer version.
    let db = p.name.clone();
    let changes: [(i32, &str, &str); 17] = [
        (1, "b", "NOT b"),
        (2, "f4", "f4 + 0.0001"),
        (3, "f8", "f8 + 1e-12"),
        (4, "n", "n + 0.001"),
        (5, "m", "m + 0.01"),
        (6, "d", "d + 1"),
        (7, "ts", "ts + toIntervalMicrosecond(1)"),
        (8, "tz", "tz + toIntervalMicrosecond(1)"),
        (9, "t", "t + 1"),
        (10, "by", "concat(by, 'x')"),
        (12, "u", "generateUUIDv4()"),
        (13, "j", "concat(j, ' ')"),
        (14, "c", "'zz  '"),
        (15, "tx", "NULL"),
        (16, "iv", "'PT17H'"),
        (9001, "n", "1"),
        (9002, "tx", "'a'"),
    ];
    for (id, column, value) in changes {
        let also = if id == 9002 {
            ", concat('\\x1f', tx2) AS tx2"
        } else {
            ""
        };
        p.servers()
            .clickhouse_sql(&format!(
                "INSERT INTO `{db}`.kinds SELECT * REPLACE ({value} AS {column}{also}, \
                 _sluice_version + 1 AS _sluice_version) FROM `{db}`.kinds FINAL WHERE id = {id}"
            ))
            .await
            .with_context(|| format!("changing {column} of {id}"))?;
    }
    let reports = sluice_loader::verify::verify_with(
        &p.config,
        Some("public.kinds"),
        sluice_loader::verify::Options::default(),
    )
    .await?;
    let kinds = &reports[0];
    assert_eq!(kinds.differing_keys, changes.len() as u64, "{kinds}");
    let mut found: Vec<(String, Vec<String>)> = kinds
        .differences
        .iter()
        .map(|d| match &d.kind {
            sluice_loader::verify::DifferenceKind::Values(columns) => (
                d.key.clone(),
                columns.iter().map(|c| c.column.clone()).collect(),
            ),
            other => (d.key.clone(), vec![format!("{other:?}")]),
        })
        .collect();
    found.sort();
    // Only the first ten differences are kept, in key order.
    assert_eq!(
        found,
        [
            ("(1)", vec!["b"]),
            ("(10)", vec!["by"]),
            ("(12)", vec!["u"]),
            ("(13)", vec!["j"]),
            ("(14)", vec!["c"]),
            ("(15)", vec!["tx"]),
            ("(16)", vec!["iv"]),
            ("(2)", vec!["f4"]),
            ("(3)", vec!["f8"]),
            ("(4)", vec!["n"]),
        ]
        .map(|(k, c)| (k.to_owned(), c.iter().map(|s| s.to_string()).collect()))
    );
    let checksums = kinds.checksums.context("no checksums")?;
    assert!(
        (1..=changes.len() as u64).contains(&checksums.differing_buckets),
        "{kinds}"
    );
    // The count covers the keys after the first ten: each change is needed to reach 17, the
    // `\x1f` shifted from `tx` into `tx2` of 9002 too (a text without lengths would hide it).
    let text = kinds.to_string();
    assert!(
        text.contains("17 keys differ (in ")
            && text.contains("key buckets whose checksums differ)"),
        "{text}"
    );
    Ok(())
}
