//! The replication connection against a real Postgres (13 or newer).
//!
//! Uses `SLUICE_TEST_PG_URL` (e.g. `postgres://postgres@127.0.0.1:5432/postgres`,
//! a superuser or a role with REPLICATION and CREATE on the database, server
//! with `wal_level=logical`) when set; otherwise starts a throw-away cluster
//! with `initdb` from `SLUICE_PG_BIN`, else `SLUICE_TEST_PG_BIN` (the binaries
//! of the `scripts/stack` stack, whatever its version), else
//! `/usr/lib/postgresql/15/bin`, run as user `postgres` when the test runs as
//! root. Tests that need their own `pg_hba.conf` always start such a cluster.

use std::path::PathBuf;
use std::process::Command;
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail, ensure};
use bytes::Bytes;
use sluice_replicator::recovery::{self, Recovery};
use sluice_replicator::replication::{
    AuthError, Lsn, ReplicationClient, ReplicationError, ReplicationEvent, ReplicationStream,
    SqlSession, SslMode, TlsError, TlsOptions, publication_names,
};
use tokio_postgres::{Config, NoTls};

/// A Postgres cluster of this test, stopped on drop.
struct TempPostgres {
    dir: tempfile::TempDir,
    bin: PathBuf,
    port: u16,
    as_postgres: bool,
}

impl TempPostgres {
    /// Starts a cluster; with `tls`, also a CA (`ca.crt` in the temp dir) and a
    /// server certificate for `localhost` and `127.0.0.1`, and `ssl=on`.
    fn start(tls: bool) -> Result<Self> {
        let bin = PathBuf::from(
            std::env::var("SLUICE_PG_BIN")
                .or_else(|_| std::env::var("SLUICE_TEST_PG_BIN"))
                .unwrap_or_else(|_| "/usr/lib/postgresql/15/bin".into()),
        );
        let as_postgres = is_root()?;
        let dir = tempfile::Builder::new()
            .prefix("sluice-replconn-")
            .tempdir()?;
        if as_postgres {
            run(Command::new("chown").arg("postgres:").arg(dir.path()))?;
        }
        let port = std::net::TcpListener::bind("127.0.0.1:0")?
            .local_addr()?
            .port();
        let pg = TempPostgres {
            dir,
            bin,
            port,
            as_postgres,
        };
        let data = pg.data_dir();
        run(pg
            .command("initdb")
            .args([
                "-U",
                "postgres",
                "-A",
                "trust",
                "-E",
                "UTF8",
                "--no-sync",
                "-D",
            ])
            .arg(&data))?;
        // Password roles first: pg_hba.conf takes the first matching line.
        let hba = data.join("pg_hba.conf");
        let rest = std::fs::read_to_string(&hba)?;
        std::fs::write(
            &hba,
            format!(
                "host all scram_user 127.0.0.1/32 scram-sha-256\n\
                 host all md5_user 127.0.0.1/32 md5\n\
                 host all clear_user 127.0.0.1/32 password\n{rest}"
            ),
        )?;
        let mut opts = format!(
            "-c port={port} -c listen_addresses=127.0.0.1 -c unix_socket_directories={} \
             -c wal_level=logical -c max_wal_senders=10 -c max_replication_slots=10 -c fsync=off",
            pg.dir.path().display()
        );
        if tls {
            pg.make_certificates()?;
            opts.push_str(" -c ssl=on -c ssl_cert_file=server.crt -c ssl_key_file=server.key");
        }
        run(pg
            .command("pg_ctl")
            .args(["start", "-w", "-t", "60", "-D"])
            .arg(&data)
            .arg("-l")
            .arg(pg.dir.path().join("postgres.log"))
            .arg("-o")
            .arg(opts))?;
        Ok(pg)
    }

    fn make_certificates(&self) -> Result<()> {
        let dir = self.dir.path();
        let data = self.data_dir();
        let openssl = |args: &[&str]| run(Command::new("openssl").current_dir(dir).args(args));
        openssl(&[
            "req",
            "-x509",
            "-newkey",
            "rsa:2048",
            "-nodes",
            "-keyout",
            "ca.key",
            "-out",
            "ca.crt",
            "-subj",
            "/CN=sluice test CA",
            "-days",
            "2",
        ])?;
        openssl(&[
            "req",
            "-newkey",
            "rsa:2048",
            "-nodes",
            "-keyout",
            "server.key",
            "-out",
            "server.csr",
            "-subj",
            "/CN=localhost",
        ])?;
        std::fs::write(
            dir.join("server.ext"),
            "subjectAltName=DNS:localhost,IP:127.0.0.1\n",
        )?;
        openssl(&[
            "x509",
            "-req",
            "-in",
            "server.csr",
            "-CA",
            "ca.crt",
            "-CAkey",
            "ca.key",
            "-CAcreateserial",
            "-out",
            "server.crt",
            "-days",
            "2",
            "-extfile",
            "server.ext",
        ])?;
        for file in ["server.crt", "server.key"] {
            std::fs::copy(dir.join(file), data.join(file))?;
            run(Command::new("chmod").arg("600").arg(data.join(file)))?;
            if self.as_postgres {
                run(Command::new("chown").arg("postgres:").arg(data.join(file)))?;
            }
        }
        Ok(())
    }

    fn data_dir(&self) -> PathBuf {
        self.dir.path().join("data")
    }

    fn command(&self, program: &str) -> Command {
        let path = self.bin.join(program);
        if self.as_postgres {
            let mut cmd = Command::new("runuser");
            cmd.args(["-u", "postgres", "--"]).arg(path);
            cmd
        } else {
            Command::new(path)
        }
    }

    fn url(&self, user: &str, password: Option<&str>) -> String {
        let auth = match password {
            Some(p) => format!("{user}:{p}"),
            None => user.to_owned(),
        };
        format!("postgres://{auth}@127.0.0.1:{}/postgres", self.port)
    }
}

impl Drop for TempPostgres {
    fn drop(&mut self) {
        let data = self.data_dir();
        let _ = self
            .command("pg_ctl")
            .args(["stop", "-m", "fast", "-w", "-D"])
            .arg(&data)
            .output();
    }
}

fn is_root() -> Result<bool> {
    let out = Command::new("id").arg("-u").output()?;
    Ok(String::from_utf8_lossy(&out.stdout).trim() == "0")
}

fn run(cmd: &mut Command) -> Result<()> {
    let out = cmd.output().with_context(|| format!("running {cmd:?}"))?;
    ensure!(
        out.status.success(),
        "{cmd:?} failed: {}\n{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    Ok(())
}

/// `SLUICE_TEST_PG_URL`'s server, or else a cluster of this test (kept
/// running while the second value lives).
fn shared_or_temp() -> Result<(String, Option<TempPostgres>)> {
    Ok(match std::env::var("SLUICE_TEST_PG_URL") {
        Ok(url) => (url, None),
        Err(_) => {
            let pg = TempPostgres::start(false)?;
            (pg.url("postgres", None), Some(pg))
        }
    })
}

async fn sql_client(config: &Config) -> Result<tokio_postgres::Client> {
    let (client, connection) = config.connect(NoTls).await?;
    tokio::spawn(async move {
        if let Err(e) = connection.await {
            eprintln!("sql connection: {e}");
        }
    });
    Ok(client)
}

/// The pgoutput messages of the next transaction that changes rows, up to
/// and including its Commit. Reads with `next()` raced against a very short
/// timer, so cancellation happens all the time.
async fn next_transaction(stream: &mut ReplicationStream) -> Result<Vec<Bytes>> {
    let deadline = Instant::now() + Duration::from_secs(30);
    let mut messages = Vec::new();
    let mut cancelled = 0u64;
    loop {
        ensure!(Instant::now() < deadline, "no transaction within 30 s");
        let event = tokio::select! {
            event = stream.next() => event?,
            _ = tokio::time::sleep(Duration::from_micros(20)) => {
                cancelled += 1;
                continue;
            }
        };
        match event {
            Some(ReplicationEvent::XLogData { data, .. }) => {
                let kind = data.first().copied();
                messages.push(data);
                if kind == Some(b'C') {
                    if messages.iter().any(|m| m.first() == Some(&b'I')) {
                        eprintln!("transaction read with {cancelled} cancelled next() calls");
                        return Ok(messages);
                    }
                    messages.clear();
                }
            }
            Some(ReplicationEvent::Keepalive {
                reply_requested: true,
                wal_end,
                ..
            }) => stream
                .send_status(Lsn(0), Lsn(0), Lsn(0), false)
                .await
                .map(|()| {
                    eprintln!("answered keepalive at {wal_end}");
                })?,
            Some(ReplicationEvent::Keepalive { .. }) => {}
            None => bail!("server ended the stream"),
        }
    }
}

/// The end LSN of a pgoutput Commit message ('C', flags, commit LSN, end LSN, time).
fn commit_end_lsn(commit: &[u8]) -> Result<Lsn> {
    ensure!(
        commit.len() >= 26 && commit[0] == b'C',
        "not a commit message"
    );
    Ok(Lsn(u64::from_be_bytes(commit[10..18].try_into()?)))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn replication_connection_against_postgres() -> Result<()> {
    let (url, temp) = shared_or_temp()?;
    let config: Config = url.parse()?;
    let sql = sql_client(&config).await?;
    let suffix = format!(
        "{}_{}",
        std::process::id(),
        std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)?
            .subsec_nanos()
    );
    let slot = format!("sluice_test_{suffix}");
    let table = format!("replconn_{suffix}");
    let publication = format!("replconn_pub_{suffix}");

    // IDENTIFY_SYSTEM.
    let mut repl = ReplicationClient::connect(&config).await?;
    let identity = repl.identify_system().await?;
    assert!(identity.timeline >= 1);
    if temp.is_some() {
        // This cluster has no TLS: prefer (the default) fell back to plain
        // TCP above, require refuses.
        let mut require = config.clone();
        require.ssl_mode(tokio_postgres::config::SslMode::Require);
        let err = ReplicationClient::connect(&require)
            .await
            .expect_err("sslmode=require without server TLS");
        assert!(
            matches!(
                &err,
                ReplicationError::Tls {
                    reason: TlsError::NotSupported,
                    ..
                }
            ),
            "{err:?}"
        );
        assert_eq!(recovery::of_replication(&err), Recovery::Stop);
    }
    assert!(identity.xlogpos > Lsn(0));
    assert_eq!(
        identity.dbname.as_deref(),
        Some(config.get_dbname().unwrap_or("postgres"))
    );

    // A permanent slot exporting a snapshot that another session imports.
    let created = repl.create_logical_slot(&slot, false).await?;
    assert_eq!(created.slot_name, slot);
    assert!(created.consistent_point >= identity.xlogpos);
    let snapshot_reader = sql_client(&config).await?;
    snapshot_reader
        .batch_execute(&format!(
            "BEGIN ISOLATION LEVEL REPEATABLE READ; SET TRANSACTION SNAPSHOT '{}'",
            created.snapshot_name
        ))
        .await
        .context("importing the exported snapshot")?;
    snapshot_reader.batch_execute("SELECT 1; COMMIT").await?;
    drop(snapshot_reader);

    // The connection knows the server's version (the slot command's syntax
    // depends on it), and a refused command names itself and that version.
    let (version, version_num): (String, String) = {
        let row = sql
            .query_one(
                "SELECT current_setting('server_version'), current_setting('server_version_num')",
                &[],
            )
            .await?;
        (row.get(0), row.get(1))
    };
    let mut other = ReplicationClient::connect(&config).await?;
    assert_eq!(other.server_version(), Some(version.as_str()));
    assert_eq!(other.server_version_num().await?.to_string(), version_num);
    let err = other
        .create_logical_slot(&slot, false)
        .await
        .expect_err("a second slot of the same name");
    assert_eq!(err.sqlstate(), Some("42710"), "{err:?}");
    assert_eq!(recovery::of_replication(&err), Recovery::Stop);
    let text = err.to_string();
    assert!(
        text.starts_with(&format!(
            "`CREATE_REPLICATION_SLOT \"{slot}\" LOGICAL pgoutput "
        )) && text.contains(&format!("` failed on Postgres {version}: ERROR 42710: ")),
        "{text}"
    );
    other.close().await?;

    // Changes after the consistent point.
    sql.batch_execute(&format!(
        "CREATE TABLE {table} (id int PRIMARY KEY, v text);
         CREATE PUBLICATION {publication} FOR TABLE {table};
         INSERT INTO {table} SELECT g, 'row ' || g FROM generate_series(1, 3) g;"
    ))
    .await?;

    let pubs = publication_names([publication.as_str()]);
    let options = [("proto_version", "1"), ("publication_names", pubs.as_str())];
    let mut stream = repl
        .start_replication(&slot, created.consistent_point, &options)
        .await?;
    let tx = next_transaction(&mut stream).await?;
    let kinds: String = tx.iter().map(|m| char::from(m[0])).collect();
    assert_eq!(kinds, "BRIIIC");
    let end = commit_end_lsn(tx.last().context("empty transaction")?)?;

    // Confirm it; the slot's confirmed_flush_lsn follows.
    stream.send_status(end, end, end, false).await?;
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let row = sql
            .query_one(
                "SELECT confirmed_flush_lsn::text FROM pg_replication_slots WHERE slot_name = $1",
                &[&slot],
            )
            .await?;
        let confirmed: Lsn = row.get::<_, String>(0).parse()?;
        if confirmed == end {
            break;
        }
        ensure!(
            Instant::now() < deadline,
            "confirmed_flush_lsn stuck at {confirmed}, want {end}"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }

    // A big transaction read through constant cancellation loses nothing.
    const ROWS: usize = 5000;
    sql.batch_execute(&format!(
        "INSERT INTO {table} SELECT g, repeat('x', 300) || g FROM generate_series(100, {}) g",
        99 + ROWS
    ))
    .await?;
    let tx = next_transaction(&mut stream).await?;
    assert_eq!(tx.first().map(|m| m[0]), Some(b'B'));
    assert_eq!(tx.iter().filter(|m| m[0] == b'I').count(), ROWS);

    // The slot is in use: a second consumer gets 55006, not transient.
    let other = ReplicationClient::connect(&config).await?;
    let err = other
        .start_replication(&slot, Lsn(0), &options)
        .await
        .expect_err("second START_REPLICATION on an active slot");
    assert_eq!(err.sqlstate(), Some("55006"), "{err:?}");
    assert_eq!(recovery::of_replication(&err), Recovery::Stop);

    // A missing slot: 42704, not transient.
    let other = ReplicationClient::connect(&config).await?;
    let err = other
        .start_replication("sluice_no_such_slot", Lsn(0), &options)
        .await
        .expect_err("START_REPLICATION on a missing slot");
    assert_eq!(err.sqlstate(), Some("42704"), "{err:?}");
    assert_eq!(recovery::of_replication(&err), Recovery::Stop);

    // Graceful end, then the same connection drops the slot.
    let mut repl = stream.finish().await?;
    repl.drop_slot(&slot, false).await?;
    let rows = repl
        .simple_query(&format!(
            "SELECT count(*) FROM pg_replication_slots WHERE slot_name = '{slot}'"
        ))
        .await?;
    assert_eq!(rows, vec![vec![Some("0".to_owned())]]);
    repl.close().await?;
    sql.batch_execute(&format!(
        "DROP PUBLICATION {publication}; DROP TABLE {table}"
    ))
    .await?;

    match &temp {
        Some(pg) => check_password_auth(pg, &sql).await?,
        None => {
            // The password methods need our pg_hba.conf: a server of our own.
            let own = TempPostgres::start(false)?;
            let own_sql = sql_client(&own.url("postgres", None).parse()?).await?;
            check_password_auth(&own, &own_sql).await?;
        }
    }
    drop(sql);
    drop(temp);
    Ok(())
}

/// SCRAM, md5 and cleartext, right and wrong passwords (pg_hba.conf of [`TempPostgres`]).
async fn check_password_auth(pg: &TempPostgres, sql: &tokio_postgres::Client) -> Result<()> {
    sql.batch_execute(
        "SET password_encryption = 'scram-sha-256';
         CREATE ROLE scram_user LOGIN REPLICATION PASSWORD 'scram-secret';
         CREATE ROLE clear_user LOGIN REPLICATION PASSWORD 'clear-secret';
         SET password_encryption = 'md5';
         CREATE ROLE md5_user LOGIN REPLICATION PASSWORD 'md5-secret';",
    )
    .await?;
    for (user, password) in [
        ("scram_user", "scram-secret"),
        ("md5_user", "md5-secret"),
        ("clear_user", "clear-secret"),
    ] {
        let config: Config = pg.url(user, Some(password)).parse()?;
        let mut client = ReplicationClient::connect(&config)
            .await
            .with_context(|| format!("{user} with the right password"))?;
        client.identify_system().await?;
        client.close().await?;

        let config: Config = pg.url(user, Some("wrong")).parse()?;
        let err = ReplicationClient::connect(&config)
            .await
            .expect_err("wrong password accepted");
        assert!(
            matches!(
                &err,
                ReplicationError::Auth {
                    reason: AuthError::Rejected(_),
                    ..
                }
            ),
            "{user}: {err:?}"
        );
        assert_eq!(err.sqlstate(), Some("28P01"), "{user}: {err:?}");
        assert_eq!(recovery::of_replication(&err), Recovery::Stop);

        let config: Config = pg.url(user, None).parse()?;
        let err = ReplicationClient::connect(&config)
            .await
            .expect_err("missing password accepted");
        assert!(
            matches!(
                &err,
                ReplicationError::Auth {
                    reason: AuthError::PasswordRequired,
                    ..
                }
            ),
            "{user}: {err:?}"
        );
    }
    Ok(())
}

/// Whether the replication connection `client` runs over TLS, per the server.
async fn uses_tls(client: &mut ReplicationClient) -> Result<bool> {
    let rows = client
        .simple_query("SELECT ssl FROM pg_stat_ssl WHERE pid = pg_backend_pid()")
        .await?;
    Ok(rows == vec![vec![Some("t".to_owned())]])
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tls_modes() -> Result<()> {
    // Always a server of our own (also when SLUICE_TEST_PG_URL names a shared one): the test
    // needs its certificates and pg_hba.conf.
    let pg = TempPostgres::start(true)?;
    let base = pg.url("postgres", None);
    for (mode, tls) in [("disable", false), ("prefer", true), ("require", true)] {
        let config: Config = format!("{base}?sslmode={mode}").parse()?;
        let mut client = ReplicationClient::connect(&config).await?;
        assert_eq!(uses_tls(&mut client).await?, tls, "sslmode={mode}");
        client.identify_system().await?;
        client.close().await?;
    }

    // verify-full against our CA, by IP and by name.
    let ca = TlsOptions {
        mode: SslMode::VerifyFull,
        root_cert: Some(pg.dir.path().join("ca.crt")),
        client_cert: None,
    };
    for host in ["127.0.0.1", "localhost"] {
        let config: Config = format!("postgres://postgres@{host}:{}/postgres", pg.port).parse()?;
        let mut client = ReplicationClient::connect_with_tls(&config, &ca).await?;
        assert!(uses_tls(&mut client).await?, "verify-full to {host}");
        client.close().await?;
        // The snapshot readers' sessions connect the same way.
        let mut session = SqlSession::connect(&config, &ca).await?;
        let ssl = session
            .query("SELECT ssl FROM pg_stat_ssl WHERE pid = pg_backend_pid()")
            .await?;
        assert_eq!(ssl, vec![vec![Some("t".to_owned())]], "session to {host}");
        session.close().await?;
    }

    // The SQL connection (catalog, snapshots, status) follows the same
    // `postgres.url` sslmode and `postgres.ssl_root_cert` settings.
    let pg_config = sluice_broker::config::PostgresConfig {
        url: format!(
            "postgres://postgres@localhost:{}/postgres?sslmode=verify-full",
            pg.port
        ),
        ssl_root_cert: Some(pg.dir.path().join("ca.crt")),
        ..Default::default()
    };
    let settings = sluice_replicator::pg::PgSettings::from_config(&pg_config)?;
    let sql = settings.connect("the TLS test").await?;
    let ssl: bool = sql
        .client
        .query_one(
            "SELECT ssl FROM pg_stat_ssl WHERE pid = pg_backend_pid()",
            &[],
        )
        .await?
        .get(0);
    assert!(ssl, "the SQL connection uses TLS with verify-full");
    drop(sql);

    // verify-full with the system roots rejects our private CA, for good.
    let system = TlsOptions {
        mode: SslMode::VerifyFull,
        root_cert: None,
        client_cert: None,
    };
    let config: Config = base.parse()?;
    match ReplicationClient::connect_with_tls(&config, &system).await {
        Err(
            err @ ReplicationError::Tls {
                reason: TlsError::Io(_),
                ..
            },
        ) => assert_eq!(recovery::of_replication(&err), Recovery::Stop, "{err:?}"),
        other => panic!("verify-full with system roots: {other:?}"),
    }

    // SCRAM over TLS: the server also offers SCRAM-SHA-256-PLUS; plain SCRAM
    // without channel binding must still be accepted.
    // (Postgres 13 stores new passwords as md5 unless told otherwise.)
    let sql = sql_client(&config).await?;
    sql.batch_execute(
        "SET password_encryption = 'scram-sha-256';
         CREATE ROLE scram_user LOGIN REPLICATION PASSWORD 'scram-secret'",
    )
    .await?;
    drop(sql);
    let config: Config = format!(
        "{}?sslmode=require",
        pg.url("scram_user", Some("scram-secret"))
    )
    .parse()?;
    let mut client = ReplicationClient::connect(&config).await?;
    assert!(uses_tls(&mut client).await?);
    client.close().await?;
    Ok(())
}

/// The snapshot readers' session: an ordinary backend (not a walsender),
/// whose `COPY` rows arrive byte for byte as `tokio-postgres` reads them,
/// in pieces as the reader asks, and which stays usable after an error.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sql_session_reads_copy_rows_as_tokio_postgres_does() -> Result<()> {
    let (url, _temp) = shared_or_temp()?;
    let config: Config = url.parse()?;
    let tls = TlsOptions {
        mode: SslMode::from(config.get_ssl_mode()),
        ..TlsOptions::default()
    };
    let mut session = SqlSession::connect(&config, &tls).await?;
    let kind = session
        .query("SELECT backend_type FROM pg_stat_activity WHERE pid = pg_backend_pid()")
        .await?;
    assert_eq!(kind, vec![vec![Some("client backend".to_owned())]]);

    // Values COPY escapes (tab, newline, backslash), multi-byte text, NULLs,
    // and rows long enough to span several socket reads.
    let copy = "COPY (SELECT g, repeat(chr(9) || 'x\\' || chr(10) || 'é', g % 4), \
                CASE WHEN g % 5 = 0 THEN NULL ELSE repeat('y', g % 3000) END \
                FROM generate_series(1, 20000) g) TO STDOUT";
    let sql = sql_client(&config).await?;
    let expected: Vec<u8> = {
        use futures::TryStreamExt;
        let stream = sql.copy_out(copy).await?;
        let parts: Vec<Bytes> = stream.try_collect().await?;
        parts.concat()
    };
    let mut got = Vec::new();
    let (mut rows, mut calls) = (0u64, 0u64);
    let mut out = session.copy_out(copy).await?;
    loop {
        let mut handed = 0;
        let more = out
            .rows(|data| {
                got.extend_from_slice(data);
                handed += 1;
                // Asks for at most 10 rows at a time (a read holds more).
                handed < 10
            })
            .await?;
        assert!(handed <= 10, "a call handed {handed} rows");
        rows += handed;
        calls += 1;
        if !more {
            break;
        }
    }
    assert_eq!(rows, 20000);
    assert!(
        calls >= 2000,
        "{calls} calls for 20,000 rows in steps of 10"
    );
    assert_eq!(got, expected, "COPY text differs from tokio-postgres'");

    // An error in the middle of a COPY, after rows came: the server's error,
    // and the session goes on.
    let mut out = session
        .copy_out("COPY (SELECT 10 / (g - 5000) FROM generate_series(1, 9000) g) TO STDOUT")
        .await?;
    let mut before = 0;
    let error = loop {
        match out
            .rows(|_| {
                before += 1;
                true
            })
            .await
        {
            Ok(true) => {}
            Ok(false) => bail!("the COPY ended without its error"),
            Err(error) => break error,
        }
    };
    assert!(before < 5000, "{before} rows before the error");
    match &error {
        ReplicationError::Server(e) => assert_eq!(e.code, "22012", "{e}"),
        other => bail!("not a server error: {other:?}"),
    }
    assert_eq!(recovery::of_replication(&error), Recovery::Stop);
    // An error before the first row.
    match session
        .copy_out("COPY (SELECT * FROM no_such_table) TO STDOUT")
        .await
    {
        Err(ReplicationError::Server(e)) => assert_eq!(e.code, "42P01", "{e}"),
        Err(other) => bail!("not a server error: {other:?}"),
        Ok(_) => bail!("a COPY of a missing table started"),
    }
    assert_eq!(
        session.query("SELECT 1 + 1").await?,
        vec![vec![Some("2".to_owned())]]
    );
    session.close().await?;
    Ok(())
}
