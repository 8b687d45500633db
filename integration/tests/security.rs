//! NATS over TLS (the test stack's TLS-only node, `SLUICE_TEST_NATS_TLS_URL`) and redaction of
//! secrets in everything the real binaries print when they fail.

use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::Context as _;
use sluice_broker::config::Config;
use sluice_integration::Servers;
use sluice_integration::pipeline::{Pipeline, binaries, free_port};

/// The TLS-only NATS node and the CA of its certificate; an error (never a skip) without them.
fn nats_tls(servers: &Servers) -> anyhow::Result<(String, PathBuf)> {
    let url = servers.tls.nats_url.clone().context(
        "SLUICE_TEST_NATS_TLS_URL must name a NATS server that requires TLS (scripts/stack writes it)",
    )?;
    let ca =
        servers.tls.ca.clone().context(
            "SLUICE_TEST_TLS_CA must name the test servers' CA (scripts/stack writes it)",
        )?;
    Ok((url, ca))
}

/// The replicator and the loader both talk to NATS over TLS, verifying the server's certificate
/// against `nats.tls_ca`, and the pipeline converges.
#[tokio::test]
async fn the_pipeline_runs_over_verified_nats_tls() -> anyhow::Result<()> {
    let mut p = Pipeline::start("tls_nats").await?;
    let (url, ca) = nats_tls(p.servers())?;
    let pg = p.pg().await?;
    pg.batch_execute(
        "CREATE TABLE items (id bigint PRIMARY KEY, v text);
         INSERT INTO items SELECT g, 'v' || g FROM generate_series(1, 100) g;
         CREATE PUBLICATION sluice FOR TABLE items;",
    )
    .await?;
    p.set_configs(
        "nats",
        &[
            ("url", &format!("{url:?}")),
            ("tls_ca", &format!("{:?}", ca.display().to_string())),
        ],
    )?;
    p.spawn_replicator()?;
    p.spawn_loader()?;
    pg.batch_execute(
        "UPDATE items SET v = 'changed' WHERE id <= 10; DELETE FROM items WHERE id > 90;
         INSERT INTO items SELECT g, 'new' FROM generate_series(101, 120) g;",
    )
    .await?;
    p.wait_until_equal(Duration::from_secs(90)).await?;
    Ok(())
}

/// Production's shape: TLS on all three connections at once, each verifying the server against
/// the stack's CA (Postgres `verify-full`, NATS `tls://` + `tls_ca`, ClickHouse `https://` +
/// `tls_ca_file`), both programs as their least-privilege NATS users; the pipeline converges,
/// survives a loader restart, and `verify` (over the same TLS) finds ClickHouse equal.
#[tokio::test]
async fn the_pipeline_runs_with_tls_on_all_three_connections() -> anyhow::Result<()> {
    let mut p = Pipeline::start("tls_all").await?;
    let (nats_url, ca) = nats_tls(p.servers())?;
    let https = p
        .servers()
        .tls
        .clickhouse_https_url
        .clone()
        .context("SLUICE_TEST_CLICKHOUSE_HTTPS_URL must be set (scripts/stack writes it)")?;
    let pg = p.pg().await?;
    pg.batch_execute(
        "CREATE TABLE items (id bigint PRIMARY KEY, v text, b bytea);
         INSERT INTO items SELECT g, 'v' || g, '\\x00ff' FROM generate_series(1, 200) g;
         CREATE PUBLICATION sluice FOR TABLE items;",
    )
    .await?;
    let ca = format!("{:?}", ca.display().to_string());
    let mut pg_url = url::Url::parse(&p.pg_url)?;
    pg_url.set_host(Some("localhost"))?;
    pg_url
        .query_pairs_mut()
        .append_pair("sslmode", "verify-full");
    let pg_url = format!("\"{pg_url}\"");
    p.set_configs("postgres", &[("url", &pg_url), ("ssl_root_cert", &ca)])?;
    p.set_configs(
        "nats",
        &[("url", &format!("{nats_url:?}")), ("tls_ca", &ca)],
    )?;
    p.set_configs(
        "clickhouse",
        &[("url", &format!("{https:?}")), ("tls_ca_file", &ca)],
    )?;
    p.spawn_replicator()?;
    p.spawn_loader()?;
    pg.batch_execute(
        "UPDATE items SET v = 'changed' WHERE id <= 20; DELETE FROM items WHERE id > 180;
         INSERT INTO items SELECT g, 'new', NULL FROM generate_series(201, 260) g;",
    )
    .await?;
    p.wait_until_equal(Duration::from_secs(90)).await?;
    p.stop_loader().await?;
    pg.batch_execute("UPDATE items SET v = 'after restart' WHERE id BETWEEN 100 AND 120")
        .await?;
    p.spawn_loader()?;
    let reports = p.wait_until_equal(Duration::from_secs(90)).await?;
    assert_eq!(reports.len(), 1);
    assert_eq!(reports[0].postgres_rows, 240);
    Ok(())
}

fn nats_config(dir: &Path, name: &str, nats: &str) -> anyhow::Result<Config> {
    let path = dir.join(format!("{name}.toml"));
    std::fs::write(&path, format!("source = \"tls\"\n[nats]\n{nats}\n"))?;
    Ok(Config::load(&path)?)
}

/// TLS required, but only the system's roots to verify with: the stack's own CA is not among
/// them, so the connection fails, and the error says it is the certificate. The same config with
/// `tls_ca` connects (so the failure is the certificate, not the user or the address).
#[tokio::test]
async fn nats_tls_without_the_ca_fails_naming_the_certificate() -> anyhow::Result<()> {
    let servers = Servers::get();
    let (url, ca) = nats_tls(servers)?;
    let user = servers
        .nats_users
        .producer
        .clone()
        .context("SLUICE_TEST_NATS_PRODUCER must be set (scripts/stack writes it)")?;
    let dir = tempfile::tempdir()?;
    let common = format!(
        "url = {url:?}\nuser = {:?}\npassword = {:?}\ninbox_prefix = {:?}\ntls_required = true",
        user.user,
        user.password,
        user.inbox_prefix()
    );

    let untrusted = nats_config(dir.path(), "system_roots", &common)?;
    // A certificate failure, which both programs stop on instead of retrying.
    let error = match sluice_broker::connect::connect(&untrusted.nats, "tls-test").await {
        Ok(_) => anyhow::bail!("connected over TLS without the CA that signed the server"),
        Err(e @ sluice_broker::connect::ConnectError::Certificate { .. }) => {
            format!("{:#}", anyhow::Error::from(e))
        }
        Err(other) => anyhow::bail!("an untrusted server certificate failed otherwise: {other:?}"),
    };
    assert!(
        error.to_lowercase().contains("certificate"),
        "the error does not name the certificate: {error}"
    );

    let trusted = nats_config(
        dir.path(),
        "stack_ca",
        &format!("{common}\ntls_ca = {:?}", ca.display().to_string()),
    )?;
    let client = sluice_broker::connect::connect(&trusted.nats, "tls-test")
        .await
        .context("connecting with the stack's CA")?;
    client.flush().await?;
    Ok(())
}

const SECRETS: [&str; 5] = [
    "SECRET1-pg-url",
    "SECRET2-pg-env",
    "SECRET3-nats-url",
    "SECRET4-clickhouse",
    "SECRET5-toml",
];

/// A loopback port nothing listens on.
fn closed_port() -> anyhow::Result<u16> {
    // free_port only hands out ports it could bind, and nobody else is told about this one.
    free_port()
}

/// One program run: `bin args --config config`, killed after `limit` if it still runs (the
/// programs retry unreachable servers), with stdout and stderr captured.
struct Run {
    label: String,
    child: std::process::Child,
    out: PathBuf,
}

fn spawn(
    dir: &Path,
    label: &str,
    bin: &Path,
    args: &[&str],
    config: &Path,
    env: &[(&str, &str)],
) -> anyhow::Result<Run> {
    let out = dir.join(format!("{label}.out"));
    let file = std::fs::File::create(&out)?;
    let child = Command::new(bin)
        .args(args)
        .arg("--config")
        .arg(config)
        .envs(env.iter().copied())
        // Everything the programs log, not only warnings.
        .env("RUST_LOG", "debug")
        .env_remove("SLUICE_NATS__USER")
        .env_remove("SLUICE_NATS__PASSWORD")
        .stdin(Stdio::null())
        .stdout(file.try_clone()?)
        .stderr(file)
        .spawn()
        .with_context(|| format!("starting {}", bin.display()))?;
    Ok(Run {
        label: label.to_owned(),
        child,
        out,
    })
}

/// Waits for every run (killing what still runs after `limit`); returns (label, output).
async fn finish(runs: Vec<Run>, limit: Duration) -> anyhow::Result<Vec<(String, String)>> {
    let deadline = Instant::now() + limit;
    let mut outputs = Vec::new();
    for mut run in runs {
        loop {
            if run.child.try_wait()?.is_some() {
                break;
            }
            if Instant::now() > deadline {
                // Our own child, by its PID.
                let _ = run.child.kill();
                let _ = run.child.wait();
                break;
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
        let text = std::fs::read_to_string(&run.out)
            .with_context(|| format!("reading {}", run.out.display()))?;
        outputs.push((run.label, text));
    }
    Ok(outputs)
}

/// Runs `sluice-replicator run|status` and `sluice-loader run|status|verify` with `config`.
async fn run_all(
    dir: &Path,
    scenario: &str,
    config: &Path,
    env: &[(&str, &str)],
) -> anyhow::Result<Vec<(String, String)>> {
    let bins = binaries()?;
    let commands: [(&str, &Path, &[&str]); 5] = [
        ("replicator-run", &bins.replicator, &["-v", "run"]),
        ("replicator-status", &bins.replicator, &["-v", "status"]),
        ("loader-run", &bins.loader, &["-v", "run"]),
        ("loader-status", &bins.loader, &["-v", "status"]),
        ("loader-verify", &bins.loader, &["-v", "verify"]),
    ];
    let mut runs = Vec::new();
    for (label, bin, args) in commands {
        runs.push(spawn(
            dir,
            &format!("{scenario}-{label}"),
            bin,
            args,
            config,
            env,
        )?);
    }
    finish(runs, Duration::from_secs(8)).await
}

fn assert_no_secret(outputs: &[(String, String)]) {
    let mut leaks = Vec::new();
    for (label, text) in outputs {
        for secret in SECRETS {
            for line in text.lines().filter(|l| l.contains(secret)) {
                leaks.push(format!("{label}: {line}"));
            }
        }
    }
    assert!(
        leaks.is_empty(),
        "secrets in the programs' output:\n{}",
        leaks.join("\n")
    );
}

/// Every program, run into failure with a secret in each place a secret can be given (the
/// Postgres URL's password, `SLUICE_POSTGRES__PASSWORD`, the NATS URL's password,
/// `clickhouse.password`, a config line with a TOML syntax error), prints none of them: not in
/// logs at `debug`, not in error messages, not in `status` or `verify` output.
#[tokio::test]
async fn failing_programs_print_no_secret() -> anyhow::Result<()> {
    let servers = Servers::get();
    let dir = tempfile::tempdir()?;
    let pg_env = [("SLUICE_POSTGRES__PASSWORD", SECRETS[1])];
    let config = |name: &str, pg: &str, nats: &str, ch: &str| -> anyhow::Result<PathBuf> {
        let path = dir.path().join(format!("{name}.toml"));
        std::fs::write(
            &path,
            format!(
                r#"source = "redact_{name}"

[postgres]
url = "{pg}"
publication = "sluice"
slot = "redact_{name}"

[nats]
url = "{nats}"
inbox_prefix = "_INBOX_producer"

[clickhouse]
url = "{ch}"
user = "default"
password = "{secret4}"

[replicator]
metrics_listen = "127.0.0.1:{rport}"

[loader]
metrics_listen = "127.0.0.1:{lport}"
"#,
                secret4 = SECRETS[3],
                rport = free_port()?,
                lport = free_port()?,
            ),
        )?;
        Ok(path)
    };
    let mut outputs = Vec::new();

    // Nothing listens: every program fails to connect and says where to.
    let closed = config(
        "closed",
        &format!(
            "postgres://u:{}@127.0.0.1:{}/db",
            SECRETS[0],
            closed_port()?
        ),
        &format!(
            "nats://producer:{}@127.0.0.1:{}",
            SECRETS[2],
            closed_port()?
        ),
        &format!("http://127.0.0.1:{}", closed_port()?),
    )?;
    let closed_outputs = run_all(dir.path(), "closed", &closed, &pg_env).await?;
    // Not vacuous: the programs did say which servers they could not reach, redacted.
    assert!(
        closed_outputs.iter().any(|(_, text)| text.contains("***")),
        "no program printed a redacted URL:\n{closed_outputs:#?}"
    );
    outputs.extend(closed_outputs);

    // The real servers, with wrong credentials: refused, not unreachable.
    let pg_port = url::Url::parse(&servers.pg_url)?
        .port()
        .context("SLUICE_TEST_PG_URL has no port")?;
    let nats_port = url::Url::parse(&servers.nats_url)?
        .port()
        .context("SLUICE_TEST_NATS_URL has no port")?;
    let refused = config(
        "refused",
        &format!(
            "postgres://no_such_role:{}@127.0.0.1:{pg_port}/postgres",
            SECRETS[0]
        ),
        &format!("nats://producer:{}@127.0.0.1:{nats_port}", SECRETS[2]),
        &servers.clickhouse_url,
    )?;
    outputs.extend(run_all(dir.path(), "refused", &refused, &pg_env).await?);

    // A TOML syntax error on the line of a password.
    let broken = dir.path().join("broken.toml");
    std::fs::write(
        &broken,
        format!(
            "source = \"redact_broken\"\n[postgres]\nurl = \"postgres://u@127.0.0.1:1/db\"\npassword = \"{}\n[nats]\nurl = \"nats://127.0.0.1:1\"\n",
            SECRETS[4]
        ),
    )?;
    let broken_outputs = run_all(dir.path(), "broken", &broken, &[]).await?;
    for (label, text) in &broken_outputs {
        assert!(
            text.contains("line 4"),
            "{label} does not name the line of the syntax error: {text}"
        );
    }
    outputs.extend(broken_outputs);

    for (label, text) in &outputs {
        assert!(!text.trim().is_empty(), "{label} printed nothing");
    }
    assert_no_secret(&outputs);
    Ok(())
}
