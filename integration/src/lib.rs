//! Harness for sluice's end-to-end tests: real Postgres, NATS JetStream and ClickHouse servers.
//!
//! [`Servers::get`] returns the endpoints every test shares. Each endpoint comes from its
//! environment variable when set (so the same tests run against an operator's servers):
//!
//! | variable | example |
//! |---|---|
//! | `SLUICE_TEST_PG_URL` | `postgres://postgres@127.0.0.1:5432/postgres` (superuser, replication allowed) |
//! | `SLUICE_TEST_NATS_URL` | `nats://127.0.0.1:4222` (JetStream enabled) |
//! | `SLUICE_TEST_NATS_CLUSTER_URLS` | `nats://127.0.0.1:4223,nats://127.0.0.1:4224,nats://127.0.0.1:4225` |
//! | `SLUICE_TEST_CLICKHOUSE_URL` | `http://127.0.0.1:8123` |
//! | `SLUICE_TEST_NATS_ADMIN` | `admin:admin-dev`: `USER:PASSWORD` of the harness's own NATS clients (none: anonymous) |
//! | `SLUICE_TEST_NATS_PRODUCER` | `producer:producer-dev`: the replicator's NATS user (none: anonymous) |
//! | `SLUICE_TEST_NATS_CONSUMER` | `consumer:consumer-dev`: the loader's NATS user (none: anonymous) |
//! | `SLUICE_TEST_TLS_CA` | CA (PEM) that signed the servers' certificates (Postgres `ssl = on`, the HTTPS endpoint) |
//! | `SLUICE_TEST_TLS_CLIENT_CERT`, `SLUICE_TEST_TLS_CLIENT_KEY` | a client certificate Postgres accepts for the role `sluice_cert` |
//! | `SLUICE_TEST_CLICKHOUSE_HTTPS_URL` | `https://127.0.0.1:8443`, the same ClickHouse over TLS |
//! | `SLUICE_TEST_CLICKHOUSE_MTLS_URL` | `https://127.0.0.1:8444`, the same, requiring a client certificate of `SLUICE_TEST_TLS_CA` |
//! | `SLUICE_TEST_CLICKHOUSE_LOADER` | `sluice_loader:loader-dev`: the loader's ClickHouse user, with grants on the databases `sluice_*` only (none: `default`) |
//! | `SLUICE_TEST_NATS_TLS_URL` | `tls://127.0.0.1:4443`: a single JetStream node that requires TLS (certificate of `SLUICE_TEST_TLS_CA`, same users; not the server of `SLUICE_TEST_NATS_URL`) |
//!
//! When any of the first three is missing, the harness runs `scripts/stack start --nats-cluster`
//! in a temporary directory, once per test process, with a guardian that stops those servers and
//! deletes the directory when the test process is gone (see [`stack`]).
//!
//! Tests share the servers, never the objects in them: [`Servers::fresh_pg_database`],
//! [`fresh_stream_name`] and [`Servers::fresh_clickhouse_database`] hand out unique names so tests
//! run in parallel and against long-lived servers.

pub mod cpu;
mod names;
pub mod pipeline;
pub mod stack;
pub mod standby;

use std::sync::OnceLock;

use anyhow::Context as _;

pub use names::{fresh_stream_name, unique_name};

/// Endpoints of the servers the tests run against.
#[derive(Debug, Clone)]
pub struct Servers {
    /// Postgres URL of a superuser that may also open replication connections.
    pub pg_url: String,
    /// One NATS server with JetStream.
    pub nats_url: String,
    /// The three nodes of a JetStream cluster, when there is one.
    pub nats_cluster_urls: Option<Vec<String>>,
    /// ClickHouse HTTP interface.
    pub clickhouse_url: String,
    /// Who connects to NATS.
    pub nats_users: NatsUsers,
    /// The ClickHouse user the loader runs as (`None`: `default`). The harness's own
    /// ClickHouse clients stay `default`.
    pub clickhouse_loader: Option<Login>,
    /// TLS endpoints and certificates, when the servers have them.
    pub tls: TlsEnv,
}

/// The TLS side of the test servers (`scripts/stack` always provides it).
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct TlsEnv {
    /// CA certificate (PEM) of the servers' certificates.
    pub ca: Option<std::path::PathBuf>,
    /// Client certificate and key (PEM) that Postgres accepts for the role `sluice_cert`.
    pub client_cert: Option<std::path::PathBuf>,
    pub client_key: Option<std::path::PathBuf>,
    /// The ClickHouse HTTP interface over TLS.
    pub clickhouse_https_url: Option<String>,
    /// The same, accepting only clients with a certificate of `ca` (`client_cert` is one).
    pub clickhouse_mtls_url: Option<String>,
    /// A NATS server (JetStream, the same users) that requires TLS. `scripts/stack` runs it as a
    /// node of its own, beside the plaintext one: nats-server 2.9 serves one or the other per port.
    pub nats_url: Option<String>,
}

impl TlsEnv {
    fn from_lookup(value: impl Fn(&str) -> Option<String>) -> TlsEnv {
        TlsEnv {
            ca: value("SLUICE_TEST_TLS_CA").map(Into::into),
            client_cert: value("SLUICE_TEST_TLS_CLIENT_CERT").map(Into::into),
            client_key: value("SLUICE_TEST_TLS_CLIENT_KEY").map(Into::into),
            clickhouse_https_url: value("SLUICE_TEST_CLICKHOUSE_HTTPS_URL"),
            clickhouse_mtls_url: value("SLUICE_TEST_CLICKHOUSE_MTLS_URL"),
            nats_url: value("SLUICE_TEST_NATS_TLS_URL"),
        }
    }
}

/// A user name and password (NATS, ClickHouse).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Login {
    pub user: String,
    pub password: String,
}

impl Login {
    pub fn parse(key: &str, text: &str) -> anyhow::Result<Login> {
        let (user, password) = text
            .split_once(':')
            .with_context(|| format!("{key} must be USER:PASSWORD"))?;
        Ok(Login {
            user: user.to_owned(),
            password: password.to_owned(),
        })
    }

    /// The inbox prefix `broker/nats/accounts.conf` lets this user subscribe to.
    pub fn inbox_prefix(&self) -> String {
        format!("_INBOX_{}", self.user)
    }
}

/// `SLUICE_TEST_CLICKHOUSE_LOADER` (`USER:PASSWORD`), when set.
fn clickhouse_loader(value: impl Fn(&str) -> Option<String>) -> anyhow::Result<Option<Login>> {
    const KEY: &str = "SLUICE_TEST_CLICKHOUSE_LOADER";
    value(KEY).map(|v| Login::parse(KEY, &v)).transpose()
}

/// The NATS users of the tests: the harness's own clients (`admin`), the replicator
/// (`producer`) and the loader (`consumer`); `None` connects without credentials.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct NatsUsers {
    pub admin: Option<Login>,
    pub producer: Option<Login>,
    pub consumer: Option<Login>,
}

impl NatsUsers {
    fn from_lookup(value: impl Fn(&str) -> Option<String>) -> anyhow::Result<NatsUsers> {
        let user = |key: &str| value(key).map(|v| Login::parse(key, &v)).transpose();
        Ok(NatsUsers {
            admin: user("SLUICE_TEST_NATS_ADMIN")?,
            producer: user("SLUICE_TEST_NATS_PRODUCER")?,
            consumer: user("SLUICE_TEST_NATS_CONSUMER")?,
        })
    }
}

impl Servers {
    /// The servers of this test process: from the environment, else started once by
    /// `scripts/stack`. Panics with the stack's output if they cannot be started.
    pub fn get() -> &'static Servers {
        static SERVERS: OnceLock<Servers> = OnceLock::new();
        SERVERS.get_or_init(|| match Self::resolve() {
            Ok(servers) => servers,
            Err(e) => panic!("test servers unavailable: {e:#}"),
        })
    }

    fn resolve() -> anyhow::Result<Servers> {
        let var = |name: &str| std::env::var(name).ok().filter(|v| !v.is_empty());
        let (pg, nats, ch) = (
            var("SLUICE_TEST_PG_URL"),
            var("SLUICE_TEST_NATS_URL"),
            var("SLUICE_TEST_CLICKHOUSE_URL"),
        );
        let cluster = var("SLUICE_TEST_NATS_CLUSTER_URLS").map(|v| split_urls(&v));
        if let (Some(pg_url), Some(nats_url), Some(clickhouse_url)) = (&pg, &nats, &ch) {
            return Ok(Servers {
                pg_url: pg_url.clone(),
                nats_url: nats_url.clone(),
                nats_cluster_urls: cluster,
                clickhouse_url: clickhouse_url.clone(),
                nats_users: NatsUsers::from_lookup(var)?,
                clickhouse_loader: clickhouse_loader(var)?,
                tls: TlsEnv::from_lookup(var),
            });
        }
        let started = stack::start_for_this_process()?;
        // A NATS server of our own stack has its users; one from the environment has the
        // environment's.
        let nats_users = if nats.is_some() {
            NatsUsers::from_lookup(var)?
        } else {
            started.nats_users
        };
        let clickhouse_loader = if ch.is_some() {
            clickhouse_loader(var)?
        } else {
            started.clickhouse_loader
        };
        let tls = if pg.is_some() || ch.is_some() {
            TlsEnv::from_lookup(var)
        } else {
            started.tls
        };
        Ok(Servers {
            pg_url: pg.unwrap_or(started.pg_url),
            nats_url: nats.unwrap_or(started.nats_url),
            nats_cluster_urls: cluster.or(started.nats_cluster_urls),
            clickhouse_url: ch.unwrap_or(started.clickhouse_url),
            nats_users,
            clickhouse_loader,
            tls,
        })
    }

    /// Connects to the NATS servers at `urls` as the harness's admin user.
    pub async fn nats_connect(&self, urls: &[&str]) -> anyhow::Result<async_nats::Client> {
        let mut options = async_nats::ConnectOptions::new();
        if let Some(admin) = &self.nats_users.admin {
            options = options.user_and_password(admin.user.clone(), admin.password.clone());
        }
        options
            .connect(urls)
            .await
            .with_context(|| format!("connecting to nats at {}", urls.join(",")))
    }

    /// Connects to Postgres at `url` with an ordinary (non-replication) connection.
    pub async fn pg_connect(url: &str) -> anyhow::Result<tokio_postgres::Client> {
        let (client, connection) = tokio_postgres::connect(url, tokio_postgres::NoTls)
            .await
            .with_context(|| format!("connecting to postgres at {url}"))?;
        // The connection task ends when the client is dropped.
        tokio::spawn(async move {
            if let Err(e) = connection.await {
                tracing::debug!(error = %e, "test postgres connection ended");
            }
        });
        Ok(client)
    }

    /// Creates a new, uniquely named Postgres database; returns its URL and name.
    pub async fn fresh_pg_database(&self, prefix: &str) -> anyhow::Result<(String, String)> {
        let name = unique_name(prefix);
        let admin = Self::pg_connect(&self.pg_url).await?;
        admin
            .batch_execute(&format!("CREATE DATABASE \"{name}\""))
            .await
            .with_context(|| format!("creating postgres database {name}"))?;
        let mut url = url::Url::parse(&self.pg_url).context("parsing SLUICE_TEST_PG_URL")?;
        url.set_path(&name);
        Ok((url.to_string(), name))
    }

    /// Connects to the single NATS server.
    pub async fn nats(&self) -> anyhow::Result<async_nats::Client> {
        self.nats_connect(&[self.nats_url.as_str()]).await
    }

    /// Connects to the 3-node cluster (any node), or `None` when there is no cluster.
    pub async fn nats_cluster(&self) -> anyhow::Result<Option<async_nats::Client>> {
        let Some(urls) = &self.nats_cluster_urls else {
            return Ok(None);
        };
        let urls: Vec<&str> = urls.iter().map(String::as_str).collect();
        Ok(Some(self.nats_connect(&urls).await?))
    }

    /// A ClickHouse client (HTTP, RowBinary) for the server's `default` database.
    pub fn clickhouse(&self) -> clickhouse::Client {
        clickhouse::Client::default().with_url(&self.clickhouse_url)
    }

    /// Creates a new, uniquely named ClickHouse database; returns a client bound to it and its
    /// name.
    pub async fn fresh_clickhouse_database(
        &self,
        prefix: &str,
    ) -> anyhow::Result<(clickhouse::Client, String)> {
        let name = unique_name(prefix);
        self.clickhouse_sql(&format!("CREATE DATABASE `{name}`"))
            .await?;
        Ok((self.clickhouse().with_database(&name), name))
    }

    /// Runs one SQL statement on ClickHouse over HTTP and returns its output as TabSeparated
    /// text (empty for statements without a result).
    pub async fn clickhouse_sql(&self, sql: &str) -> anyhow::Result<String> {
        clickhouse_sql(&self.clickhouse(), sql).await
    }

    /// [`Self::clickhouse_sql`], one string per output line (e.g. the names
    /// a `SELECT name FROM system.columns …` lists).
    pub async fn clickhouse_lines(&self, sql: &str) -> anyhow::Result<Vec<String>> {
        Ok(self
            .clickhouse_sql(sql)
            .await?
            .lines()
            .map(str::to_owned)
            .collect())
    }
}

/// Postgres' WAL insert position (`pg_current_wal_insert_lsn()`, as text):
/// at or past the end of every commit record written so far.
/// `pg_current_wal_lsn()` is the write position, which lags behind it while
/// the test servers commit asynchronously: a wait for a slot to confirm it
/// would end before the last transaction.
pub async fn wal_insert_lsn(pg: &tokio_postgres::Client) -> anyhow::Result<String> {
    Ok(pg
        .query_one("SELECT pg_current_wal_insert_lsn()::text", &[])
        .await?
        .get(0))
}

/// Runs one SQL statement with `client` (which may be bound to a database) and returns its
/// output as TabSeparated text.
pub async fn clickhouse_sql(client: &clickhouse::Client, sql: &str) -> anyhow::Result<String> {
    let bytes = client
        .query_raw(sql)
        .fetch_bytes("TabSeparated")
        .with_context(|| format!("clickhouse query {sql:?}"))?
        .collect()
        .await
        .with_context(|| format!("clickhouse query {sql:?}"))?;
    String::from_utf8(bytes.to_vec()).context("clickhouse returned non-UTF-8 text")
}

fn split_urls(list: &str) -> Vec<String> {
    list.split(',')
        .map(str::trim)
        .filter(|s| !s.is_empty())
        .map(String::from)
        .collect()
}

/// `SELECT count() FROM {from}` (`from` may end in `FINAL`).
pub async fn clickhouse_count(client: &clickhouse::Client, from: &str) -> anyhow::Result<u64> {
    let text = clickhouse_sql(client, &format!("SELECT count() FROM {from}")).await?;
    text.trim()
        .parse()
        .with_context(|| format!("count of {from}: {text:?}"))
}
