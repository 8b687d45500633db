//! TLS to the servers of the test stack (`scripts/stack` always starts them with TLS: Postgres
//! `ssl = on` with a certificate of the stack's own CA).

use std::time::Duration;

use anyhow::Context as _;
use sluice_integration::pipeline::Pipeline;

/// Waits for `child` to exit; kills it and fails with `log()` when it runs past `timeout`.
async fn exits_within(
    mut child: std::process::Child,
    timeout: Duration,
    log: impl Fn() -> String,
) -> anyhow::Result<std::process::ExitStatus> {
    let deadline = std::time::Instant::now() + timeout;
    loop {
        if let Some(status) = child.try_wait()? {
            return Ok(status);
        }
        if std::time::Instant::now() > deadline {
            let _ = child.kill();
            let _ = child.wait();
            anyhow::bail!("still running after {timeout:?}:\n{}", log());
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

/// Runs `sluice-loader run` with the pipeline's config and expects it to stop (exit 1) within
/// a minute with a message naming the certificate, instead of retrying `what` forever.
async fn loader_stops_naming_the_certificate(p: &mut Pipeline, what: &str) -> anyhow::Result<()> {
    let child = p.loader_command(&["run"])?;
    let status = exits_within(child, Duration::from_secs(60), || {
        p.log_tail("loader-cli", 20)
    })
    .await
    .with_context(|| format!("the loader kept retrying {what}"))?;
    assert_eq!(status.code(), Some(1), "{status:?}");
    let log = p.log_tail("loader-cli", 20);
    assert!(
        log.to_lowercase().contains("certificate"),
        "the error does not name the certificate: {log}"
    );
    Ok(())
}

/// Both Postgres connections of the replicator (replication and SQL) verify the server's
/// certificate against `postgres.ssl_root_cert` and the host name, and the pipeline converges.
#[tokio::test]
async fn the_pipeline_runs_over_verified_postgres_tls() -> anyhow::Result<()> {
    let mut p = Pipeline::start("tls_pg").await?;
    let ca =
        p.servers().tls.ca.clone().context(
            "SLUICE_TEST_TLS_CA must name the test servers' CA (scripts/stack writes it)",
        )?;
    let pg = p.pg().await?;
    pg.batch_execute(
        "CREATE TABLE items (id bigint PRIMARY KEY, v text);
         INSERT INTO items SELECT g, 'v' || g FROM generate_series(1, 100) g;
         CREATE PUBLICATION sluice FOR TABLE items;",
    )
    .await?;
    let mut url = url::Url::parse(&p.pg_url)?;
    url.set_host(Some("localhost"))?;
    url.query_pairs_mut().append_pair("sslmode", "verify-full");
    p.set_config("postgres", "url", &format!("\"{url}\""))?;
    p.set_config(
        "postgres",
        "ssl_root_cert",
        &format!("{:?}", ca.display().to_string()),
    )?;
    p.spawn_replicator()?;
    p.spawn_loader()?;
    pg.batch_execute(
        "UPDATE items SET v = 'changed' WHERE id <= 10; DELETE FROM items WHERE id > 90;",
    )
    .await?;
    p.wait_until_equal(Duration::from_secs(90)).await?;

    // The walsender streaming the slot and every SQL connection of the replicator use TLS.
    let row = pg
        .query_one(
            "SELECT count(*), coalesce(bool_and(s.ssl), false) FROM pg_replication_slots r
             JOIN pg_stat_ssl s ON s.pid = r.active_pid WHERE r.slot_name = $1",
            &[&p.config.postgres.slot],
        )
        .await?;
    let (walsenders, walsender_tls): (i64, bool) = (row.get(0), row.get(1));
    assert_eq!(walsenders, 1, "the slot is not being streamed");
    assert!(walsender_tls, "the replication connection is not encrypted");
    let plaintext: i64 = pg
        .query_one(
            "SELECT count(*) FROM pg_stat_activity a JOIN pg_stat_ssl s USING (pid)
             WHERE a.datname = current_database() AND a.application_name = 'sluice'
               AND NOT s.ssl",
            &[],
        )
        .await?
        .get(0);
    assert_eq!(plaintext, 0, "a replicator SQL connection without TLS");
    Ok(())
}

/// `sslmode=verify-full` against a CA that did not sign the server's certificate: the replicator
/// stops with one message naming the certificate problem, instead of retrying forever.
#[tokio::test]
async fn an_untrusted_postgres_certificate_stops_the_replicator() -> anyhow::Result<()> {
    let mut p = Pipeline::start("tls_untrusted").await?;
    let not_the_ca = p
        .servers()
        .tls
        .client_cert
        .clone()
        .context("SLUICE_TEST_TLS_CLIENT_CERT must be set (scripts/stack writes it)")?;
    p.pg()
        .await?
        .batch_execute("CREATE TABLE items (id bigint PRIMARY KEY); CREATE PUBLICATION sluice FOR TABLE items;")
        .await?;
    let mut url = url::Url::parse(&p.pg_url)?;
    url.set_host(Some("localhost"))?;
    url.query_pairs_mut().append_pair("sslmode", "verify-full");
    p.set_config("postgres", "url", &format!("\"{url}\""))?;
    // A certificate that is not a CA, so it anchors nothing.
    p.set_config(
        "postgres",
        "ssl_root_cert",
        &format!("{:?}", not_the_ca.display().to_string()),
    )?;
    let child = p.replicator_command(&["run"])?;
    let status = exits_within(child, Duration::from_secs(30), || {
        p.log_tail("replicator-cli", 20)
    })
    .await
    .context("the replicator kept retrying an untrusted certificate")?;
    assert_eq!(status.code(), Some(1), "{status:?}");
    let log = p.log_tail("replicator-cli", 20);
    assert!(
        log.to_lowercase().contains("certificate"),
        "the error does not name the certificate: {log}"
    );
    Ok(())
}

/// Certificate authentication: the stack's Postgres lets the role `sluice_cert` in only over TLS
/// with a client certificate of its CA (`pg_hba.conf`: `hostssl … cert`). The replicator's
/// replication and SQL connections and the loader's `verify` present `postgres.ssl_cert`.
#[tokio::test]
async fn the_pipeline_authenticates_to_postgres_with_a_client_certificate() -> anyhow::Result<()> {
    let mut p = Pipeline::start("tls_cert").await?;
    let tls = p.servers().tls.clone();
    let (ca, cert, key) = match (tls.ca, tls.client_cert, tls.client_key) {
        (Some(ca), Some(cert), Some(key)) => (ca, cert, key),
        _ => anyhow::bail!(
            "SLUICE_TEST_TLS_CA/CLIENT_CERT/CLIENT_KEY must be set (scripts/stack writes them)"
        ),
    };
    let pg = p.pg().await?;
    // The role is cluster-wide and shared by every test that needs it.
    pg.batch_execute(
        "DO $$ BEGIN CREATE ROLE sluice_cert LOGIN REPLICATION;
         EXCEPTION WHEN duplicate_object THEN NULL; END $$;
         CREATE TABLE items (id bigint PRIMARY KEY, v text);
         INSERT INTO items SELECT g, 'v' || g FROM generate_series(1, 20) g;
         GRANT SELECT ON items TO sluice_cert;
         CREATE PUBLICATION sluice FOR TABLE items;",
    )
    .await?;
    let mut url = url::Url::parse(&p.pg_url)?;
    url.set_host(Some("localhost"))?;
    url.set_username("sluice_cert")
        .map_err(|()| anyhow::anyhow!("cannot set the user"))?;
    url.query_pairs_mut().append_pair("sslmode", "verify-full");
    p.set_config("postgres", "url", &format!("\"{url}\""))?;
    let quoted = |path: &std::path::PathBuf| format!("{:?}", path.display().to_string());
    let (ca, cert, key) = (quoted(&ca), quoted(&cert), quoted(&key));
    p.set_configs(
        "postgres",
        &[
            ("ssl_root_cert", &ca),
            ("ssl_cert", &cert),
            ("ssl_key", &key),
        ],
    )?;
    p.spawn_replicator()?;
    p.spawn_loader()?;
    pg.batch_execute("UPDATE items SET v = 'changed' WHERE id <= 5")
        .await?;
    p.wait_until_equal(Duration::from_secs(90)).await?;
    let row = pg
        .query_one(
            "SELECT count(*) FROM pg_replication_slots r JOIN pg_stat_activity a ON a.pid = r.active_pid
             WHERE r.slot_name = $1 AND a.usename = 'sluice_cert'",
            &[&p.config.postgres.slot],
        )
        .await?;
    assert_eq!(
        row.get::<_, i64>(0),
        1,
        "the slot is not streamed by sluice_cert"
    );
    Ok(())
}

/// The loader (and `verify`) load through ClickHouse's HTTPS endpoint, trusting the stack's CA
/// through `clickhouse.tls_ca_file`.
#[tokio::test]
async fn the_loader_writes_through_clickhouse_over_https() -> anyhow::Result<()> {
    let mut p = Pipeline::start("tls_ch").await?;
    let tls = p.servers().tls.clone();
    let (Some(ca), Some(https)) = (tls.ca, tls.clickhouse_https_url) else {
        anyhow::bail!(
            "SLUICE_TEST_TLS_CA and SLUICE_TEST_CLICKHOUSE_HTTPS_URL must be set (scripts/stack writes them)"
        );
    };
    let pg = p.pg().await?;
    pg.batch_execute(
        "CREATE TABLE items (id bigint PRIMARY KEY, v text);
         INSERT INTO items SELECT g, 'v' || g FROM generate_series(1, 50) g;
         CREATE PUBLICATION sluice FOR TABLE items;",
    )
    .await?;
    let url = format!("\"{https}\"");
    let ca = format!("{:?}", ca.display().to_string());
    p.set_configs("clickhouse", &[("url", &url), ("tls_ca_file", &ca)])?;
    p.spawn_replicator()?;
    p.spawn_loader()?;
    pg.batch_execute("DELETE FROM items WHERE id > 40; UPDATE items SET v = 'x' WHERE id < 5")
        .await?;
    p.wait_until_equal(Duration::from_secs(90)).await?;
    Ok(())
}

/// An `https://` ClickHouse whose certificate no trusted CA signed: the loader stops with one
/// message naming the certificate instead of retrying forever.
#[tokio::test]
async fn an_untrusted_clickhouse_certificate_stops_the_loader() -> anyhow::Result<()> {
    let mut p = Pipeline::start("tls_ch_untrusted").await?;
    let https = p
        .servers()
        .tls
        .clickhouse_https_url
        .clone()
        .context("SLUICE_TEST_CLICKHOUSE_HTTPS_URL must be set (scripts/stack writes it)")?;
    p.pg()
        .await?
        .batch_execute("CREATE TABLE items (id bigint PRIMARY KEY); CREATE PUBLICATION sluice FOR TABLE items;")
        .await?;
    // The system's roots only: the stack's own CA is not among them.
    p.set_config("clickhouse", "url", &format!("\"{https}\""))?;
    p.spawn_replicator()?;
    loader_stops_naming_the_certificate(&mut p, "an untrusted certificate").await?;
    Ok(())
}

/// A ClickHouse endpoint that requires a client certificate (mutual TLS): with
/// `clickhouse.tls_cert_file`/`tls_key_file` the loader and `verify` load through it; without,
/// the loader stops with one message naming the certificate instead of retrying forever.
#[tokio::test]
async fn the_loader_presents_a_client_certificate_to_clickhouse() -> anyhow::Result<()> {
    let mut p = Pipeline::start("tls_ch_mtls").await?;
    let tls = p.servers().tls.clone();
    let (Some(ca), Some(mtls), Some(cert), Some(key)) = (
        tls.ca,
        tls.clickhouse_mtls_url,
        tls.client_cert,
        tls.client_key,
    ) else {
        anyhow::bail!(
            "SLUICE_TEST_TLS_CA, SLUICE_TEST_CLICKHOUSE_MTLS_URL and SLUICE_TEST_TLS_CLIENT_CERT/KEY \
             must be set (scripts/stack writes them)"
        );
    };
    let pg = p.pg().await?;
    pg.batch_execute(
        "CREATE TABLE items (id bigint PRIMARY KEY, v text);
         INSERT INTO items SELECT g, 'v' || g FROM generate_series(1, 50) g;
         CREATE PUBLICATION sluice FOR TABLE items;",
    )
    .await?;
    let quoted = |path: &std::path::Path| format!("{:?}", path.display().to_string());
    let url = format!("\"{mtls}\"");
    p.set_configs(
        "clickhouse",
        &[("url", &url), ("tls_ca_file", &quoted(&ca))],
    )?;
    p.spawn_replicator()?;

    // No client certificate: refused by the server, for good.
    loader_stops_naming_the_certificate(
        &mut p,
        "without the client certificate the server requires",
    )
    .await?;

    p.set_configs(
        "clickhouse",
        &[
            ("tls_cert_file", &quoted(&cert)),
            ("tls_key_file", &quoted(&key)),
        ],
    )?;
    p.spawn_loader()?;
    pg.batch_execute("DELETE FROM items WHERE id > 40; UPDATE items SET v = 'x' WHERE id < 5")
        .await?;
    p.wait_until_equal(Duration::from_secs(90)).await?;
    Ok(())
}
