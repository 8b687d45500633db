//! The Postgres role `sql/postgres/setup.sql` creates is enough for sluice and no more: the
//! pipeline runs end to end as that role, which may read only the tables it was given. The same
//! for ClickHouse: the loader's user of `sql/clickhouse/setup.sql` may touch its own database
//! only, and that is enough.

use std::collections::BTreeSet;
use std::process::Command;
use std::time::{Duration, Instant};

use anyhow::Context as _;
use sluice_integration::pipeline::Pipeline;
use sluice_integration::{Servers, unique_name};

#[tokio::test]
async fn the_setup_sql_role_replicates_its_tables_and_reads_nothing_else() -> anyhow::Result<()> {
    let mut p = Pipeline::start("least_priv").await?;
    let pg = p.pg().await?;
    pg.batch_execute(
        "CREATE TABLE orders (id bigint PRIMARY KEY, note text);
         CREATE TABLE staff (id bigint PRIMARY KEY, ssn text);
         INSERT INTO orders SELECT g, 'order ' || g FROM generate_series(1, 50) g;
         INSERT INTO staff SELECT g, 'ssn ' || g FROM generate_series(1, 5) g;",
    )
    .await?;
    let role = role_from_setup_sql(&p.pg_url, "public.orders")?;

    let can_read = |table: &'static str| {
        let pg = &pg;
        let role = role.clone();
        async move {
            let row = pg
                .query_one(
                    "SELECT has_table_privilege($1, $2, 'SELECT')",
                    &[&role, &table],
                )
                .await?;
            anyhow::Ok(row.get::<_, bool>(0))
        }
    };
    assert!(
        can_read("public.orders").await?,
        "the role cannot read its table"
    );
    assert!(
        !can_read("public.staff").await?,
        "setup.sql with `tables` granted SELECT on a table it was not given"
    );
    let is_superuser: bool = pg
        .query_one("SELECT rolsuper FROM pg_roles WHERE rolname = $1", &[&role])
        .await?
        .get(0);
    assert!(!is_superuser);

    // The whole pipeline as that role.
    run_as(&mut p, &role)?;
    // Any start behind reads its backlog through SQL: the functions of that
    // path (a copy of the slot, `pg_logical_slot_get_binary_changes`, the
    // slot's moves, the restart point's temporary slot) as that role too.
    p.set_config("replicator", "catchup_min_lag_bytes", "1")?;
    p.spawn_replicator()?;
    p.spawn_loader()?;
    pg.batch_execute(
        "UPDATE orders SET note = 'changed' WHERE id <= 10;
         DELETE FROM orders WHERE id > 45;
         INSERT INTO orders VALUES (100, 'late');",
    )
    .await?;
    let reports = p.wait_until_equal(Duration::from_secs(90)).await?;
    let tables: Vec<String> = reports.iter().map(|r| r.table.to_string()).collect();
    assert_eq!(tables.len(), 1, "only the published table: {tables:?}");

    catch_up(
        &mut p,
        &pg,
        "INSERT INTO orders SELECT g, 'backlog ' || g FROM generate_series(1000, 3000) g;
         UPDATE orders SET note = 'again' WHERE id BETWEEN 1000 AND 1500;",
    )
    .await?;
    never_logged(
        &p,
        &role,
        &[
            "cannot read the backlog through SQL",
            "cannot log a restart point",
            "cannot advance the slot",
        ],
    );
    Ok(())
}

/// Runs `sql/postgres/setup.sql` on the database of `pg_url` for `tables`
/// and returns the role it created.
fn role_from_setup_sql(pg_url: &str, tables: &str) -> anyhow::Result<String> {
    let role = unique_name("sluice_role");
    let setup = concat!(env!("CARGO_MANIFEST_DIR"), "/../sql/postgres/setup.sql");
    let output = Command::new("psql")
        .arg("-X")
        .arg("-q")
        .args(["-d", pg_url, "-f", setup])
        .args([
            "-v",
            &format!("tables={tables}"),
            "-v",
            &format!("role={role}"),
        ])
        .args(["-v", "password=not-used-with-trust"])
        .output()
        .context("running psql (Postgres client tools)")?;
    anyhow::ensure!(
        output.status.success(),
        "setup.sql failed: {}{}",
        String::from_utf8_lossy(&output.stdout),
        String::from_utf8_lossy(&output.stderr)
    );
    Ok(role)
}

/// Stops the replicator, runs `backlog` (SQL) on `pg`, starts the
/// replicator again and waits until it read that backlog through SQL (its
/// `catchup_min_lag_bytes` must be low enough), switched to the walsender
/// and ClickHouse is equal to Postgres.
async fn catch_up(
    p: &mut Pipeline,
    pg: &tokio_postgres::Client,
    backlog: &str,
) -> anyhow::Result<()> {
    const SWITCHED: &str = "backlog read; streaming from the walsender";
    p.stop_replicator().await?;
    let switches = p.log_lines_containing("replicator", SWITCHED).len();
    // Committed to disk before the replicator starts: the test servers
    // commit asynchronously, and a replicator that looks at the WAL before
    // the WAL writer wrote the backlog sees nothing behind and streams it.
    pg.batch_execute("SET synchronous_commit = on").await?;
    pg.batch_execute(backlog).await?;
    p.spawn_replicator()?;
    p.wait_for_log_lines(
        "replicator",
        SWITCHED,
        switches + 1,
        Duration::from_secs(90),
    )
    .await?;
    p.wait_until_equal(Duration::from_secs(90)).await?;
    Ok(())
}

/// Asserts that no replicator log of `p`, running as `role`, has a line
/// containing any of `needles`.
fn never_logged(p: &Pipeline, role: &str, needles: &[&str]) {
    for needle in needles {
        let lines = p.log_lines_containing("replicator", needle);
        assert!(lines.is_empty(), "as {role}: {lines:#?}");
    }
}

/// Points `p`'s binaries at its database as `role` (the stack trusts
/// loopback, so no password is sent), with startup options of its own in
/// the URL, as users pass them, which sluice's own settings must not undo.
fn run_as(p: &mut Pipeline, role: &str) -> anyhow::Result<()> {
    let mut url = url::Url::parse(&p.pg_url)?;
    url.set_username(role)
        .map_err(|()| anyhow::anyhow!("cannot set user"))?;
    url.query_pairs_mut()
        .append_pair("options", "-c search_path=public -c lock_timeout=10s");
    p.set_config("postgres", "url", &format!("\"{url}\""))
}

/// A DBA's limits on the role, set the way they are for application roles
/// (`ALTER ROLE … SET`): 50 ms per statement, 200 ms idle in a
/// transaction, on 14+ 300 ms idle, and on 17+ 500 ms per transaction. The
/// replication connection that exported the snapshot waits
/// idle in its transaction while the readers copy the table (about a second
/// here: a failpoint slows each snapshot package by 25 ms), and `verify`'s
/// checksum queries take longer than 50 ms. sluice turns the limits off for
/// its own sessions, as `pg_dump` does. Without that, the exporting
/// connection was closed at the end of every attempt and the replicator
/// began the snapshot again, for ever, and `verify` was cancelled.
#[tokio::test]
async fn the_roles_timeouts_stop_neither_the_snapshot_nor_a_backlog() -> anyhow::Result<()> {
    let mut p = Pipeline::start("role_timeouts").await?;
    let pg = p.pg().await?;
    pg.batch_execute(
        "CREATE TABLE orders (id bigint PRIMARY KEY, note text);
         INSERT INTO orders SELECT g, 'order ' || g FROM generate_series(1, 20000) g;",
    )
    .await?;
    let role = role_from_setup_sql(&p.pg_url, "public.orders")?;
    pg.batch_execute(&format!(
        "ALTER ROLE \"{role}\" SET statement_timeout = '50ms';
         ALTER ROLE \"{role}\" SET idle_in_transaction_session_timeout = '200ms';"
    ))
    .await?;
    let version = sluice_postgres::version::server_version_num(&pg).await?;
    if version >= 140000 {
        pg.batch_execute(&format!(
            "ALTER ROLE \"{role}\" SET idle_session_timeout = '300ms'"
        ))
        .await?;
    }
    if version >= 170000 {
        pg.batch_execute(&format!(
            "ALTER ROLE \"{role}\" SET transaction_timeout = '500ms'"
        ))
        .await?;
    }
    run_as(&mut p, &role)?;
    p.set_config("replicator", "catchup_min_lag_bytes", "1")?;
    p.set_failpoints(Some("replicator::snapshot::package=return(25)"));
    p.spawn_replicator()?;
    p.spawn_loader()?;
    p.wait_until_equal(Duration::from_secs(90)).await?;

    catch_up(
        &mut p,
        &pg,
        "INSERT INTO orders SELECT g, 'backlog ' || g FROM generate_series(30000, 40000) g;
         UPDATE orders SET note = 'again' WHERE id % 7 = 0;",
    )
    .await?;
    // Nothing was cut short: no restart, no snapshot continued.
    never_logged(
        &p,
        &role,
        &[
            "transient failure",
            "continuing the initial snapshot",
            "statement timeout",
            "idle-in-transaction timeout",
            "transaction timeout",
            "idle-session timeout",
        ],
    );
    Ok(())
}

/// Without `tables`, setup.sql publishes every table of the schema: `FOR TABLES IN SCHEMA` on
/// Postgres 15+, the schema's current tables on 13 and 14 (which lack it). Asks the server which.
#[tokio::test]
async fn the_setup_sql_without_tables_publishes_the_schema_on_every_version() -> anyhow::Result<()>
{
    let (url, _) = Servers::get().fresh_pg_database("setup_schema").await?;
    let pg = Servers::pg_connect(&url).await?;
    pg.batch_execute(
        "CREATE SCHEMA app;
         CREATE TABLE app.orders (id bigint PRIMARY KEY);
         CREATE TABLE app.\"Line Items\" (id bigint PRIMARY KEY);
         CREATE TABLE public.elsewhere (id bigint PRIMARY KEY);",
    )
    .await?;
    let role = unique_name("sluice_role");
    let setup = concat!(env!("CARGO_MANIFEST_DIR"), "/../sql/postgres/setup.sql");
    let output = Command::new("psql")
        .arg("-X")
        .arg("-q")
        .args(["-d", &url, "-f", setup])
        .args(["-v", "schema=app", "-v", &format!("role={role}")])
        .output()
        .context("running psql (Postgres client tools)")?;
    let stderr = String::from_utf8_lossy(&output.stderr);
    anyhow::ensure!(
        output.status.success(),
        "setup.sql failed: {}{stderr}",
        String::from_utf8_lossy(&output.stdout),
    );
    let version = sluice_postgres::version::server_version_num(&pg).await?;
    let published: Vec<String> = pg
        .query(
            "SELECT schemaname || '.' || tablename FROM pg_publication_tables \
             WHERE pubname = 'sluice' ORDER BY 1",
            &[],
        )
        .await?
        .iter()
        .map(|row| row.get(0))
        .collect();
    assert_eq!(
        published,
        ["app.Line Items", "app.orders"],
        "Postgres {version}"
    );
    let in_schema: bool = pg
        .query_one(
            "SELECT EXISTS (SELECT 1 FROM pg_publication_tables WHERE pubname = 'sluice') \
                 AND NOT EXISTS (SELECT 1 FROM pg_publication_rel r \
                     JOIN pg_publication p ON p.oid = r.prpubid WHERE p.pubname = 'sluice')",
            &[],
        )
        .await?
        .get(0);
    if sluice_postgres::version::has_publication_tables_in_schema(version) {
        assert!(in_schema, "Postgres {version}: not FOR TABLES IN SCHEMA");
    } else {
        assert!(!in_schema, "Postgres {version}: tables listed one by one");
        assert!(stderr.contains("no FOR TABLES IN SCHEMA"), "{stderr}");
    }
    Ok(())
}

/// The grants of every `GRANT … ON target` statement in `text` (one per line, SQL or the
/// `<query>` elements of a users.d file, or `SHOW GRANTS` output) as (privilege, target) pairs,
/// with the database `app` of the shipped files replaced by `database`.
fn grants(text: &str, database: &str) -> BTreeSet<(String, String)> {
    let mut set = BTreeSet::new();
    for line in text.lines() {
        let line = line.trim().trim_start_matches("<query>");
        let Some(statement) = line.strip_prefix("GRANT ") else {
            continue;
        };
        let statement = statement.trim_end_matches("</query>").trim_end_matches(';');
        let (privileges, rest) = statement.split_once(" ON ").expect("GRANT … ON …");
        let target = rest.split(" TO ").next().unwrap_or(rest).trim();
        let target = match target.strip_prefix("app.") {
            Some(tail) => format!("{database}.{tail}"),
            None => target.to_owned(),
        };
        for privilege in privileges.split(',') {
            set.insert((privilege.trim().to_owned(), target.clone()));
        }
    }
    set
}

/// `sql/clickhouse/setup.sql`, `deploy/clickhouse/sluice-loader.xml` (docker-compose) and the
/// test stack's user all grant the same, so the suite (whose loaders all run as the stack's
/// user) proves the documented grants are enough.
#[tokio::test]
async fn the_documented_clickhouse_grants_are_the_ones_the_suite_runs_with() -> anyhow::Result<()> {
    let servers = Servers::get();
    let login = servers.clickhouse_loader.as_ref().context(
        "no least-privilege ClickHouse user (scripts/stack sets SLUICE_TEST_CLICKHOUSE_LOADER)",
    )?;
    let repo = concat!(env!("CARGO_MANIFEST_DIR"), "/..");
    let sql = std::fs::read_to_string(format!("{repo}/sql/clickhouse/setup.sql"))?;
    let xml = std::fs::read_to_string(format!("{repo}/deploy/clickhouse/sluice-loader.xml"))?;
    let shown = servers
        .clickhouse_sql(&format!("SHOW GRANTS FOR {}", login.user))
        .await?;
    let stack = grants(&shown, "sluice_*");
    assert!(
        stack.contains(&("INSERT".into(), "sluice_*.*".into())),
        "unexpected SHOW GRANTS output: {shown}"
    );
    assert_eq!(grants(&sql, "sluice_*"), stack, "setup.sql vs the stack");
    assert_eq!(
        grants(&xml, "sluice_*"),
        stack,
        "sluice-loader.xml vs the stack"
    );
    assert!(
        sql.contains(&format!("CREATE USER IF NOT EXISTS {} ", login.user)),
        "setup.sql names another user"
    );
    Ok(())
}

/// The loader runs as the least-privilege user through a schema change, a TRUNCATE and a
/// resync (every grant used), may not read outside its database, and stops (no retry, no
/// resync loop) with ClickHouse's message when pointed at a database it has no grant on.
#[tokio::test]
async fn the_loader_runs_as_its_clickhouse_user_and_stops_on_a_missing_grant() -> anyhow::Result<()>
{
    let mut p = Pipeline::start("ch_least_priv").await?;
    let login = p
        .servers()
        .clickhouse_loader
        .clone()
        .context("no least-privilege ClickHouse user (SLUICE_TEST_CLICKHOUSE_LOADER)")?;
    let pg = p.pg().await?;
    pg.batch_execute(
        "CREATE TABLE items (id bigint PRIMARY KEY, note text);
         INSERT INTO items SELECT g, 'item ' || g FROM generate_series(1, 100) g;
         CREATE PUBLICATION sluice FOR TABLE items;",
    )
    .await?;
    p.spawn_replicator()?;
    p.spawn_loader()?;
    p.wait_until_equal(Duration::from_secs(90)).await?;
    pg.batch_execute(
        "ALTER TABLE items ADD COLUMN price numeric(10, 2);
         UPDATE items SET price = id WHERE id <= 20;
         TRUNCATE items;
         INSERT INTO items SELECT g, 'again ' || g, g FROM generate_series(1, 30) g;",
    )
    .await?;
    p.wait_until_equal(Duration::from_secs(90)).await?;
    let status = p
        .replicator_command(&["resync", "--table", "public.items"])?
        .wait()?;
    assert!(status.success(), "resync command failed: {status}");
    p.wait_until_equal(Duration::from_secs(90)).await?;
    p.check_alive()?;

    // The same login, directly: nothing outside its databases.
    let as_loader = p
        .servers()
        .clickhouse()
        .with_user(&login.user)
        .with_password(&login.password);
    let outside = unique_name("outside");
    p.servers()
        .clickhouse_sql(&format!("CREATE DATABASE `{outside}`"))
        .await?;
    p.servers()
        .clickhouse_sql(&format!(
            "CREATE TABLE `{outside}`.secret (a Int32) ENGINE = MergeTree ORDER BY a"
        ))
        .await?;
    let denied = sluice_integration::clickhouse_sql(
        &as_loader,
        &format!("SELECT * FROM `{outside}`.secret"),
    )
    .await
    .expect_err("the loader's user read a database outside its grants");
    assert!(
        format!("{denied:#}").contains("ACCESS_DENIED"),
        "{denied:#}"
    );

    // Pointed at that database, the loader stops on the missing grant instead of retrying.
    p.stop_loader().await?;
    p.set_config("clickhouse", "database", &format!("\"{outside}\""))?;
    p.spawn_loader()?;
    let deadline = Instant::now() + Duration::from_secs(60);
    let exited = loop {
        if let Err(exited) = p.check_alive() {
            break format!("{exited:#}");
        }
        anyhow::ensure!(
            Instant::now() < deadline,
            "the loader kept running without a grant on its database:\n{}",
            p.log_tail("loader", 20)
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    };
    assert!(
        exited.contains("Not enough privileges") && exited.contains(&outside),
        "the loader's exit does not name the missing grant:\n{exited}"
    );
    p.servers()
        .clickhouse_sql(&format!("DROP DATABASE `{outside}`"))
        .await?;
    Ok(())
}
