//! Schema changes under a concurrent write workload (ARCHITECTURE invariant
//! 7): the loader compares each relation with the ClickHouse table before it
//! encodes a row against it. What ClickHouse can follow in place costs no
//! resync: ADD COLUMN, DROP COLUMN (the column stays), RENAME COLUMN, widening
//! type changes (`MODIFY COLUMN`), `varchar(n)` → `text`. What it cannot, a
//! type of another kind, a column dropped and added again under its name, or
//! a column added with a default (older rows hold it in Postgres), resyncs
//! that one table at once; in no case is a package dead-lettered or an INSERT
//! sent against the old column types first.

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use sluice_integration::pipeline::{Pipeline, metric};

const CONVERGE: Duration = Duration::from_secs(120);

/// Inserts, updates and deletes rows of `t` (touching only `id` and
/// `touched`, which no change alters) until `stop` is set.
async fn workload(pg: tokio_postgres::Client, stop: Arc<AtomicBool>) -> anyhow::Result<u64> {
    let mut next: i64 = pg
        .query_one("SELECT coalesce(max(id), 0) + 1000 FROM t", &[])
        .await?
        .get(0);
    let mut statements = 0;
    while !stop.load(Ordering::Relaxed) {
        next += 1;
        pg.execute("INSERT INTO t (id, touched) VALUES ($1, 0)", &[&next])
            .await?;
        pg.execute(
            "UPDATE t SET touched = touched + 1 WHERE id = $1 OR id = $2",
            &[&(next % 300), &(next - 3)],
        )
        .await?;
        if next % 7 == 0 {
            pg.execute("DELETE FROM t WHERE id = $1", &[&(next - 5)])
                .await?;
        }
        statements += 3;
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    Ok(statements)
}

/// Runs `ddl` (one statement at a time, a pause between) while the workload
/// writes, then stops the workload and waits until ClickHouse equals Postgres.
async fn change_under_load(p: &mut Pipeline, ddl: &[&str]) -> anyhow::Result<()> {
    let stop = Arc::new(AtomicBool::new(false));
    let writer = tokio::spawn(workload(p.pg().await?, stop.clone()));
    let pg = p.pg().await?;
    for statement in ddl {
        tokio::time::sleep(Duration::from_millis(300)).await;
        pg.batch_execute(statement).await?;
    }
    tokio::time::sleep(Duration::from_millis(300)).await;
    stop.store(true, Ordering::Relaxed);
    let statements = writer.await??;
    anyhow::ensure!(statements > 0, "the workload wrote nothing");
    p.wait_until_equal(CONVERGE).await?;
    Ok(())
}

/// Snapshots swapped in so far (the initial one counts) and dead letters.
async fn resyncs_and_dead_letters(p: &Pipeline) -> anyhow::Result<(f64, f64)> {
    let text = p.loader_metrics().await?;
    Ok((
        metric(
            &text,
            "sluice_loader_resyncs_completed_total{table=\"public.t\"}",
        )
        .unwrap_or(0.0),
        metric(&text, "sluice_dead_letters_total").unwrap_or(0.0),
    ))
}

/// `name type` of each column of the ClickHouse table `t`, then its
/// comment (the Postgres attnum) if it has one.
async fn clickhouse_columns(p: &Pipeline) -> anyhow::Result<Vec<String>> {
    let sql = format!(
        "SELECT trim(name || ' ' || type || ' ' || comment) FROM system.columns WHERE database = '{}' AND table = 't' \
         ORDER BY position",
        p.config.clickhouse_database()
    );
    p.servers().clickhouse_lines(&sql).await
}

#[tokio::test]
async fn schema_changes_follow_in_place_or_resync_the_one_table() -> anyhow::Result<()> {
    let mut p = Pipeline::start("schema_changes").await?;
    let pg = p.pg().await?;
    pg.batch_execute(
        "CREATE TABLE t (id bigint PRIMARY KEY, touched int NOT NULL DEFAULT 0, small int2,
                         f real, amount numeric(10, 2), name varchar(20), extra text,
                         ren text, code text, again text);
         INSERT INTO t SELECT g, 0, g % 100, g / 3.0, g * 1.25, 'n' || g, 'x' || g,
                              'r' || g, (g % 50)::text, 'a' || g
             FROM generate_series(1, 500) g;
         CREATE PUBLICATION sluice FOR TABLE t;",
    )
    .await?;
    p.spawn_replicator()?;
    p.spawn_loader()?;
    p.wait_until_equal(CONVERGE).await?;
    let (initial, dead) = resyncs_and_dead_letters(&p).await?;
    assert_eq!((initial, dead), (1.0, 0.0));

    // Followed in place: no resync.
    change_under_load(
        &mut p,
        &[
            "ALTER TABLE t ADD COLUMN note text",
            "UPDATE t SET note = 'noted' WHERE id % 3 = 0",
            "ALTER TABLE t ALTER COLUMN small TYPE bigint",
            "ALTER TABLE t ALTER COLUMN f TYPE double precision",
            "ALTER TABLE t ALTER COLUMN amount TYPE numeric(14, 4)",
            "ALTER TABLE t ALTER COLUMN name TYPE text",
            "ALTER TABLE t DROP COLUMN extra",
            "ALTER TABLE t RENAME COLUMN ren TO renamed",
            "UPDATE t SET renamed = renamed || '!' WHERE id % 5 = 0",
            "UPDATE t SET small = small + 1000000000000, amount = amount + 0.0001 WHERE id % 4 = 0",
        ],
    )
    .await?;
    assert_eq!(
        resyncs_and_dead_letters(&p).await?,
        (initial, 0.0),
        "{:#?}",
        p.log_lines_containing("loader", "schema change")
    );
    let columns = clickhouse_columns(&p).await?;
    for expected in [
        "small Nullable(Int64) pg attnum 3",
        "f Nullable(Float64) pg attnum 4",
        "amount Nullable(Decimal(14, 4)) pg attnum 5",
        "note Nullable(String) pg attnum 11",
        // A dropped column stays; rows written since have its default.
        "extra Nullable(String) pg attnum 7",
        "renamed Nullable(String) pg attnum 8",
    ] {
        assert!(
            columns.iter().any(|c| c == expected),
            "{expected} not in {columns:?}"
        );
    }
    assert!(
        !columns.iter().any(|c| c.starts_with("ren ")),
        "{columns:?}"
    );

    // Not followable in place: each resyncs the table once, nothing is
    // dead-lettered.
    // Dropped and added again under its name: the ClickHouse column holds
    // the old column's values, Postgres has NULL for older rows.
    change_under_load(
        &mut p,
        &[
            "ALTER TABLE t DROP COLUMN again",
            "ALTER TABLE t ADD COLUMN again text",
        ],
    )
    .await?;
    assert_eq!(resyncs_and_dead_letters(&p).await?, (initial + 1.0, 0.0));
    change_under_load(
        &mut p,
        &["ALTER TABLE t ALTER COLUMN code TYPE integer USING code::integer"],
    )
    .await?;
    assert_eq!(resyncs_and_dead_letters(&p).await?, (initial + 2.0, 0.0));
    // A column added with a default: Postgres' older rows hold it, an ADD
    // COLUMN in ClickHouse would leave them NULL.
    change_under_load(
        &mut p,
        &["ALTER TABLE t ADD COLUMN flag int NOT NULL DEFAULT 7"],
    )
    .await?;
    assert_eq!(resyncs_and_dead_letters(&p).await?, (initial + 3.0, 0.0));
    let columns = clickhouse_columns(&p).await?;
    assert!(
        columns
            .iter()
            .any(|c| c == "code Nullable(Int32) pg attnum 9")
            && columns
                .iter()
                .any(|c| c == "renamed Nullable(String) pg attnum 8"),
        "{columns:?}"
    );
    Ok(())
}
