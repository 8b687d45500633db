//! Partitioned tables (ARCHITECTURE invariant 7). With
//! `publish_via_partition_root = true` every partition's rows, including a
//! partition created while streaming and rows moved between partitions, land
//! in one ClickHouse table named after the root; attaching a filled
//! partition or detaching one resyncs the root, creating one does not. With `false` (Postgres'
//! default) each partition is a published table of its own and lands in its
//! own ClickHouse table; a partition created or attached while streaming is a
//! table added to the publication and arrives with its rows.

use std::time::Duration;

use sluice_integration::pipeline::{Pipeline, metric};

const CONVERGE: Duration = Duration::from_secs(120);

/// `events`, partitioned by region into `events_eu` and `events_us`, 300 rows each.
const EVENTS: &str = "
    CREATE TABLE events (id bigint, region text, v text, PRIMARY KEY (id, region))
        PARTITION BY LIST (region);
    CREATE TABLE events_eu PARTITION OF events FOR VALUES IN ('eu');
    CREATE TABLE events_us PARTITION OF events FOR VALUES IN ('us');
    INSERT INTO events SELECT g, CASE WHEN g % 2 = 0 THEN 'eu' ELSE 'us' END, 'v' || g
        FROM generate_series(1, 600) g;
    ANALYZE events_eu, events_us;";

/// While streaming: a new partition with rows, changes in every partition,
/// and rows moved from one partition to another.
const CHANGES: &str = "
    CREATE TABLE events_asia PARTITION OF events FOR VALUES IN ('asia');
    INSERT INTO events SELECT g, 'asia', 'asia ' || g FROM generate_series(1001, 1100) g;
    UPDATE events SET v = 'changed' WHERE id % 7 = 0;
    UPDATE events SET region = 'asia' WHERE region = 'us' AND id % 5 = 0;
    DELETE FROM events WHERE id % 11 = 0;";

/// The ClickHouse tables of the pipeline's database, sluice's own left out.
async fn clickhouse_tables(p: &Pipeline) -> anyhow::Result<Vec<String>> {
    let sql = format!(
        "SELECT name FROM system.tables WHERE database = '{}' AND name NOT LIKE '\\_sluice%' \
         ORDER BY name",
        p.config.clickhouse_database()
    );
    p.servers().clickhouse_lines(&sql).await
}

#[tokio::test]
async fn via_the_root_every_partition_lands_in_one_table() -> anyhow::Result<()> {
    let mut p = Pipeline::start("part_root").await?;
    let pg = p.pg().await?;
    pg.batch_execute(&format!(
        "{EVENTS}
         CREATE PUBLICATION sluice FOR TABLE events WITH (publish_via_partition_root = true);"
    ))
    .await?;
    p.set_config("replicator", "publication_check_interval", "\"1s\"")?;
    p.spawn_replicator()?;
    p.spawn_loader()?;
    p.wait_until_equal(CONVERGE).await?;
    // The root's size is estimated from its partitions' statistics (as
    // autovacuum keeps them: it never analyzes the root itself).
    let started = p.log_lines_containing("replicator", "snapshot started");
    assert!(
        started.iter().any(|l| l.contains("estimated_rows=600")),
        "{started:#?}"
    );
    let metrics = p.replicator_metrics().await?;
    assert_eq!(
        metric(
            &metrics,
            "sluice_snapshot_rows_estimated{table=\"public.events\"}"
        ),
        Some(600.0)
    );
    pg.batch_execute(CHANGES).await?;
    let reports = p.wait_until_equal(CONVERGE).await?;
    let tables: Vec<&str> = reports.iter().map(|r| r.table.as_str()).collect();
    assert_eq!(tables, ["public.events"]);

    assert_eq!(reports[0].postgres_rows, reports[0].clickhouse_rows);
    let expected: i64 = pg
        .query_one("SELECT count(*) FROM events", &[])
        .await?
        .get(0);
    assert_eq!(reports[0].clickhouse_rows, expected as u64);
    assert_eq!(clickhouse_tables(&p).await?, ["events"]);

    // A table filled first and attached afterwards: its rows never pass
    // through the stream; the root is resynced to bring them.
    pg.batch_execute(
        "CREATE TABLE events_af (id bigint NOT NULL, region text NOT NULL, v text);
         INSERT INTO events_af SELECT g, 'af', 'af ' || g FROM generate_series(2001, 2250) g;
         ALTER TABLE events_af ADD PRIMARY KEY (id, region);",
    )
    .await?;
    pg.batch_execute("ALTER TABLE events ATTACH PARTITION events_af FOR VALUES IN ('af')")
        .await?;
    let reports = p.wait_until_equal(CONVERGE).await?;
    assert_eq!(reports[0].clickhouse_rows, expected as u64 + 250);
    // A detached partition's rows leave the root without a DELETE: resynced
    // again to drop them.
    pg.batch_execute("ALTER TABLE events DETACH PARTITION events_eu")
        .await?;
    let remaining: i64 = pg
        .query_one("SELECT count(*) FROM events", &[])
        .await?
        .get(0);
    let reports = p.wait_until_equal(CONVERGE).await?;
    assert_eq!(reports[0].clickhouse_rows, remaining as u64);
    assert!(remaining < expected + 250, "events_eu held no rows");
    // One resync each for the attach and the detach; none for the partition
    // created and filled while streaming, whose rows came through the stream.
    assert_eq!(
        p.resyncs_in_stream("events", "partitions_changed").await?,
        2
    );
    Ok(())
}

#[tokio::test]
async fn without_the_root_each_partition_is_a_table_of_its_own() -> anyhow::Result<()> {
    let mut p = Pipeline::start("part_leaves").await?;
    let pg = p.pg().await?;
    pg.batch_execute(&format!(
        "{EVENTS}
         CREATE PUBLICATION sluice FOR TABLE events;"
    ))
    .await?;
    p.set_config("replicator", "publication_check_interval", "\"1s\"")?;
    p.spawn_replicator()?;
    p.spawn_loader()?;
    p.wait_until_equal(CONVERGE).await?;
    pg.batch_execute(CHANGES).await?;
    // A table filled first and attached afterwards: its rows never pass
    // through the stream, the partition is a table added to the publication.
    pg.batch_execute(
        "CREATE TABLE events_af (id bigint NOT NULL, region text NOT NULL, v text);
         INSERT INTO events_af SELECT g, 'af', 'af ' || g FROM generate_series(2001, 2250) g;
         ALTER TABLE events_af ADD PRIMARY KEY (id, region);
         ALTER TABLE events ATTACH PARTITION events_af FOR VALUES IN ('af');",
    )
    .await?;
    let reports = p.wait_until_equal(CONVERGE).await?;
    let tables: Vec<&str> = reports.iter().map(|r| r.table.as_str()).collect();
    assert_eq!(
        tables,
        [
            "public.events_af",
            "public.events_asia",
            "public.events_eu",
            "public.events_us"
        ]
    );
    assert_eq!(reports[0].clickhouse_rows, 250);
    assert_eq!(
        clickhouse_tables(&p).await?,
        ["events_af", "events_asia", "events_eu", "events_us"]
    );
    Ok(())
}
