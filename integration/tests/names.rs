//! sluice's own state has its own namespace (ARCHITECTURE invariant 8): no
//! two source tables share a ClickHouse table, a source table named like the
//! loader's positions table loads beside it, source columns named like
//! sluice's bookkeeping columns load under their documented names (README
//! "Naming"), and columns with quotes, backticks, spaces, backslashes and
//! non-ASCII letters load and verify equal.

use std::time::Duration;

use sluice_integration::pipeline::Pipeline;

const CONVERGE: Duration = Duration::from_secs(120);

/// The names of `table`'s columns in the pipeline's ClickHouse database, in order.
async fn clickhouse_columns(p: &Pipeline, table: &str) -> anyhow::Result<Vec<String>> {
    let sql = format!(
        "SELECT name FROM system.columns WHERE database = '{}' AND table = '{}' \
         ORDER BY position FORMAT JSONEachRow",
        p.config.clickhouse_database(),
        table.replace('\\', "\\\\").replace('\'', "\\'")
    );
    p.servers()
        .clickhouse_sql(&sql)
        .await?
        .lines()
        .map(|line| {
            let row: serde_json::Value = serde_json::from_str(line)?;
            row["name"]
                .as_str()
                .map(str::to_owned)
                .ok_or_else(|| anyhow::anyhow!("no name in {line}"))
        })
        .collect()
}

/// `SELECT {what} FROM db.`table` FINAL WHERE not deleted`, as text.
async fn clickhouse_select(p: &Pipeline, table: &str, what: &str) -> anyhow::Result<String> {
    let sql = format!(
        "SELECT {what} FROM `{}`.`{}` FINAL WHERE _sluice_deleted = 0",
        p.config.clickhouse_database(),
        table.replace('\\', "\\\\").replace('`', "\\`")
    );
    Ok(p.servers().clickhouse_sql(&sql).await?.trim().to_owned())
}

/// `a.b` and `public."a__b"` were both loaded into `a__b` and overwrote each
/// other's rows (same keys). Now `a.b` keeps `a__b` and `public.a__b` gets
/// `public.a__b`; each holds exactly its own rows, through DML on both.
#[tokio::test]
async fn tables_whose_names_used_to_collide_each_get_their_own_table() -> anyhow::Result<()> {
    let mut p = Pipeline::start("names_collide").await?;
    let pg = p.pg().await?;
    pg.batch_execute(
        "CREATE SCHEMA a;
         CREATE TABLE a.b (id bigint PRIMARY KEY, origin text NOT NULL);
         CREATE TABLE public.\"a__b\" (id bigint PRIMARY KEY, origin text NOT NULL);
         INSERT INTO a.b SELECT g, 'a.b' FROM generate_series(1, 300) g;
         INSERT INTO public.\"a__b\" SELECT g, 'public.a__b' FROM generate_series(1, 200) g;
         CREATE PUBLICATION sluice FOR TABLE a.b, public.\"a__b\";",
    )
    .await?;
    p.spawn_replicator()?;
    p.spawn_loader()?;
    pg.batch_execute(
        "INSERT INTO a.b SELECT g, 'a.b' FROM generate_series(301, 350) g;
         UPDATE a.b SET origin = 'a.b updated' WHERE id % 7 = 0;
         DELETE FROM a.b WHERE id % 11 = 0;
         INSERT INTO public.\"a__b\" SELECT g, 'public.a__b' FROM generate_series(1000, 1020) g;
         UPDATE public.\"a__b\" SET origin = 'public.a__b updated' WHERE id % 5 = 0;
         DELETE FROM public.\"a__b\" WHERE id % 3 = 0;",
    )
    .await?;
    let reports = p.wait_until_equal(CONVERGE).await?;
    assert_eq!(reports.len(), 2, "{reports:?}");
    for report in &reports {
        assert!(report.postgres_rows > 0, "{report}");
        assert_eq!(report.clickhouse_rows, report.postgres_rows, "{report}");
    }
    for (table, source, origin) in [
        ("a__b", "a.b", "a.b"),
        ("public.a__b", "public.\"a__b\"", "public.a__b"),
    ] {
        let rows: i64 = pg
            .query_one(&format!("SELECT count(*) FROM {source}"), &[])
            .await?
            .get(0);
        let loaded = clickhouse_select(&p, table, "count()").await?;
        assert_eq!(loaded, rows.to_string(), "rows of {table}");
        let foreign = clickhouse_select(
            &p,
            table,
            &format!("countIf(NOT startsWith(origin, '{origin}'))"),
        )
        .await?;
        assert_eq!(foreign, "0", "{table} holds another table's rows");
    }
    Ok(())
}

/// The loader's positions table is `_sluice_positions` in the same database;
/// a source table of that name used to be "loaded" into it. Now it loads
/// into `public.%5Fsluice_positions`, the positions table keeps its own
/// columns, and the loader still resumes from it after a restart.
#[tokio::test]
async fn a_source_table_named_like_the_positions_table_loads_beside_it() -> anyhow::Result<()> {
    let mut p = Pipeline::start("names_positions").await?;
    let pg = p.pg().await?;
    pg.batch_execute(
        "CREATE TABLE \"_sluice_positions\" (id bigint PRIMARY KEY, schema text, \"table\" text,
             generation bigint);
         CREATE TABLE items (id bigint PRIMARY KEY, note text);
         INSERT INTO \"_sluice_positions\" SELECT g, 'evil', 'items', 999999 FROM generate_series(1, 100) g;
         INSERT INTO items SELECT g, 'item ' || g FROM generate_series(1, 100) g;
         CREATE PUBLICATION sluice FOR TABLE \"_sluice_positions\", items;",
    )
    .await?;
    p.spawn_replicator()?;
    p.spawn_loader()?;
    pg.batch_execute(
        "UPDATE \"_sluice_positions\" SET generation = 0 WHERE id % 2 = 0;
         DELETE FROM \"_sluice_positions\" WHERE id % 9 = 0;
         INSERT INTO items SELECT g, 'late ' || g FROM generate_series(101, 150) g;",
    )
    .await?;
    let reports = p.wait_until_equal(CONVERGE).await?;
    assert_eq!(reports.len(), 2, "{reports:?}");
    let positions_columns = [
        "schema",
        "table",
        "generation",
        "sequence",
        "shadow",
        "blocked",
        "commit_lsn",
        "block_reason",
        "refused",
        "stream_sequence",
        "version",
        "updated_at",
    ];
    assert_eq!(
        clickhouse_columns(&p, "_sluice_positions").await?,
        positions_columns,
        "the positions table changed shape"
    );
    let loaded = clickhouse_select(&p, "public.%5Fsluice_positions", "count()").await?;
    let rows: i64 = pg
        .query_one("SELECT count(*) FROM \"_sluice_positions\"", &[])
        .await?
        .get(0);
    assert_eq!(loaded, rows.to_string());

    // The positions are the loader's own: `status` reads both tables as
    // streaming, and a restarted loader resumes from them (no resync).
    let (status, _) = p.cli("loader", &["status"])?;
    for table in ["public._sluice_positions", "public.items"] {
        let line = status
            .lines()
            .find(|line| line.trim_start().starts_with(&format!("{table} ")))
            .unwrap_or_else(|| panic!("{table} missing in status:\n{status}"));
        assert!(
            !line.contains("blocked") && !line.contains("resync"),
            "{line}"
        );
    }
    p.stop_loader().await?;
    pg.batch_execute(
        "INSERT INTO \"_sluice_positions\" VALUES (500, 'after', 'restart', 1);
         UPDATE items SET note = 'after restart' WHERE id <= 10;",
    )
    .await?;
    p.spawn_loader()?;
    p.wait_until_equal(CONVERGE).await?;
    assert!(
        p.log_lines_containing("loader", "resync requested")
            .is_empty(),
        "the loader asked for a resync:\n{}",
        p.log_tail("loader", 30)
    );
    Ok(())
}

/// Source columns named like sluice's bookkeeping columns get one more
/// leading `_` (README "Naming"), and so does a source column that already
/// has two; everything loads and verifies equal.
#[tokio::test]
async fn columns_named_like_sluices_own_load_under_their_documented_names() -> anyhow::Result<()> {
    let mut p = Pipeline::start("names_columns").await?;
    let pg = p.pg().await?;
    pg.batch_execute(
        "CREATE TABLE clash (id bigint PRIMARY KEY, \"_sluice_version\" text,
             \"_sluice_deleted\" integer, \"_sluice_synced_at\" timestamptz,
             \"__sluice_version\" text);
         INSERT INTO clash SELECT g, 'v' || g, g % 2, '2024-01-01'::timestamptz + g * interval '1 s',
             'w' || g FROM generate_series(1, 200) g;
         CREATE PUBLICATION sluice FOR TABLE clash;",
    )
    .await?;
    p.spawn_replicator()?;
    p.spawn_loader()?;
    pg.batch_execute(
        "UPDATE clash SET \"_sluice_version\" = 'updated', \"_sluice_deleted\" = 1 WHERE id % 4 = 0;
         DELETE FROM clash WHERE id % 10 = 0;
         INSERT INTO clash VALUES (1000, 'late', 1, now(), 'late');",
    )
    .await?;
    let reports = p.wait_until_equal(CONVERGE).await?;
    assert_eq!(reports.len(), 1);
    assert_eq!(reports[0].clickhouse_rows, 181, "{}", reports[0]);
    assert_eq!(
        clickhouse_columns(&p, "clash").await?,
        [
            "id",
            "__sluice_version",
            "__sluice_deleted",
            "__sluice_synced_at",
            "___sluice_version",
            "_sluice_version",
            "_sluice_deleted",
            "_sluice_synced_at",
        ]
    );
    // A source row whose `_sluice_deleted` column is 1 is not deleted.
    let flagged: i64 = pg
        .query_one(
            "SELECT count(*) FROM clash WHERE \"_sluice_deleted\" = 1",
            &[],
        )
        .await?
        .get(0);
    assert!(flagged > 0);
    assert_eq!(
        clickhouse_select(&p, "clash", "countIf(`__sluice_deleted` = 1)").await?,
        flagged.to_string()
    );
    Ok(())
}

/// Column (and table) names with quotes, backticks, spaces, backslashes,
/// dots and non-ASCII letters, a key among them, through inserts, updates
/// that leave a TOASTed value unchanged (the loader reads it back by these
/// names), deletes, and a manual resync (the shadow table).
#[tokio::test]
async fn odd_column_names_load_and_verify_equal() -> anyhow::Result<()> {
    let mut p = Pipeline::start("names_odd").await?;
    let pg = p.pg().await?;
    pg.batch_execute(
        "CREATE TABLE \"odd.names\" (\"key \"\"q\"\"\" bigint PRIMARY KEY, \"back`tick\" text,
             \"sp ace\" integer, \"back\\slash\" text, \"Ünïcødé ☃\" text, \"dot.col\" text,
             \"it's\" text, \"big value\" text);
         INSERT INTO \"odd.names\" SELECT g, 'b`' || g, g, 'c:\\' || g, 'ü' || g, 'd.' || g,
             'it''s ' || g,
             (SELECT string_agg(md5(g::text || s::text), '') FROM generate_series(1, 200) s)
             FROM generate_series(1, 150) g;
         CREATE PUBLICATION sluice FOR TABLE \"odd.names\";",
    )
    .await?;
    p.spawn_replicator()?;
    p.spawn_loader()?;
    pg.batch_execute(
        "UPDATE \"odd.names\" SET \"sp ace\" = -\"sp ace\", \"back`tick\" = 'changed'
             WHERE \"key \"\"q\"\"\" % 3 = 0;
         DELETE FROM \"odd.names\" WHERE \"key \"\"q\"\"\" % 13 = 0;",
    )
    .await?;
    let reports = p.wait_until_equal(CONVERGE).await?;
    assert_eq!(reports.len(), 1);
    assert_eq!(reports[0].clickhouse_rows, 139, "{}", reports[0]);
    let columns = clickhouse_columns(&p, "public.odd%2Enames").await?;
    assert_eq!(
        columns[..8],
        [
            "key \"q\"",
            "back`tick",
            "sp ace",
            "back\\slash",
            "Ünïcødé ☃",
            "dot.col",
            "it's",
            "big value"
        ]
    );
    let mut resync = p.replicator_command(&["resync", "--table", "public.odd.names"])?;
    assert!(resync.wait()?.success(), "resync failed");
    pg.batch_execute(
        "UPDATE \"odd.names\" SET \"it's\" = 'after resync' WHERE \"key \"\"q\"\"\" < 20;",
    )
    .await?;
    p.wait_until_equal(CONVERGE).await?;
    Ok(())
}

/// An upgrade moves a table whose name was ambiguous to its escaped name
/// (README "Upgrading"): the loader's positions say the table was loaded,
/// but its new ClickHouse table does not exist yet. Simulated by renaming the
/// loaded table back to its old name while the loader is stopped: the loader
/// must not fill the new table with changes alone, but resync it.
#[tokio::test]
async fn a_table_whose_name_changed_with_an_upgrade_is_resynced() -> anyhow::Result<()> {
    let mut p = Pipeline::start("names_upgrade").await?;
    let pg = p.pg().await?;
    pg.batch_execute(
        "CREATE TABLE \"a__b\" (id bigint PRIMARY KEY, note text);
         INSERT INTO \"a__b\" SELECT g, 'before ' || g FROM generate_series(1, 200) g;
         CREATE PUBLICATION sluice FOR TABLE \"a__b\";",
    )
    .await?;
    p.spawn_replicator()?;
    p.spawn_loader()?;
    p.wait_until_equal(CONVERGE).await?;
    p.stop_loader().await?;
    let database = p.config.clickhouse_database();
    p.servers()
        .clickhouse_sql(&format!(
            "RENAME TABLE `{database}`.`public.a__b` TO `{database}`.`a__b`"
        ))
        .await?;
    pg.batch_execute(
        "INSERT INTO \"a__b\" SELECT g, 'after ' || g FROM generate_series(201, 220) g;
         UPDATE \"a__b\" SET note = 'updated' WHERE id <= 5;",
    )
    .await?;
    p.spawn_loader()?;
    let reports = p.wait_until_equal(CONVERGE).await?;
    assert_eq!(reports[0].clickhouse_rows, 220, "{}", reports[0]);
    assert!(
        !p.log_lines_containing("loader", "did not exist although packages")
            .is_empty(),
        "the loader did not say why it resynced:\n{}",
        p.log_tail("loader", 30)
    );
    // The old table is left for the operator to drop.
    assert_eq!(clickhouse_select(&p, "a__b", "count()").await?, "200");
    Ok(())
}
