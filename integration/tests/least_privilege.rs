//! The Postgres role `sql/postgres/setup.sql` creates is enough for sluice and no more: the
//! pipeline runs end to end as that role, which may read only the tables it was given.

use std::process::Command;
use std::time::Duration;

use anyhow::Context as _;
use sluice_integration::pipeline::Pipeline;
use sluice_integration::unique_name;

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
    let role = unique_name("sluice_role");
    let setup = concat!(env!("CARGO_MANIFEST_DIR"), "/../sql/postgres/setup.sql");
    let output = Command::new("psql")
        .arg("-X")
        .arg("-q")
        .args(["-d", &p.pg_url, "-f", setup])
        .args(["-v", "tables=public.orders", "-v", &format!("role={role}")])
        .args(["-v", "password=not-used-with-trust"])
        .output()
        .context("running psql (Postgres client tools)")?;
    anyhow::ensure!(
        output.status.success(),
        "setup.sql failed: {}{}",
        String::from_utf8_lossy(&output.stdout),
        String::from_utf8_lossy(&output.stderr)
    );

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

    // The whole pipeline as that role (the stack trusts loopback, so no password is sent).
    let mut url = url::Url::parse(&p.pg_url)?;
    url.set_username(&role)
        .map_err(|()| anyhow::anyhow!("cannot set user"))?;
    p.set_config("postgres", "url", &format!("\"{url}\""))?;
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
    Ok(())
}

/// Without `tables`, setup.sql publishes every table of the schema: `FOR TABLES IN SCHEMA` on
/// Postgres 15+, the schema's current tables on 13 and 14 (which lack it). Asks the server which.
#[tokio::test]
async fn the_setup_sql_without_tables_publishes_the_schema_on_every_version() -> anyhow::Result<()>
{
    let (url, _) = sluice_integration::Servers::get()
        .fresh_pg_database("setup_schema")
        .await?;
    let pg = sluice_integration::Servers::pg_connect(&url).await?;
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
