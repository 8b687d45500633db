//! Ordinary SQL connections to the source (catalog queries, snapshots, slot
//! inspection), separate from the replication connection.

use std::str::FromStr;

use secrecy::ExposeSecret;
use sluice_broker::config::{PostgresConfig, read_secret};
use tokio_postgres::NoTls;

use crate::replication::{Lsn, SslMode, TlsError, TlsOptions, tls_client_config};

/// Output styles pinned on every session whose values the value decoder
/// parses: the walsender and the backlog reader print values with their
/// session's settings (see `values`).
pub const OUTPUT_STYLES: &str = "-c datestyle=ISO -c intervalstyle=postgres -c extra_float_digits=3 -c bytea_output=hex -c lc_monetary=C -c timezone=UTC";

/// Errors of the SQL side, split by what to do next.
#[derive(Debug, thiserror::Error)]
pub enum PgError {
    #[error("`postgres.url` is not a valid connection string")]
    Url(#[source] tokio_postgres::Error),
    #[error("cannot read `postgres.password_file`")]
    PasswordFile(#[source] std::io::Error),
    #[error("TLS settings of `postgres.url` / `postgres.ssl_root_cert`")]
    Tls(#[source] TlsError),
    #[error("{what}")]
    Sql {
        what: String,
        #[source]
        source: tokio_postgres::Error,
    },
}

impl PgError {
    /// The server's SQLSTATE, if the server answered with an error.
    pub fn sqlstate(&self) -> Option<&str> {
        match self {
            PgError::Sql { source, .. } => source.code().map(|c| c.code()),
            _ => None,
        }
    }

    pub fn sql(what: impl Into<String>) -> impl FnOnce(tokio_postgres::Error) -> PgError {
        let what = what.into();
        move |source| PgError::Sql { what, source }
    }
}

/// Connection settings derived from `[postgres]`.
#[derive(Clone)]
pub struct PgSettings {
    pub config: tokio_postgres::Config,
    pub tls: TlsOptions,
}

impl PgSettings {
    pub fn from_config(pg: &PostgresConfig) -> Result<Self, PgError> {
        // tokio-postgres does not know verify-ca/verify-full; read sslmode
        // ourselves and hand it a URL it accepts.
        let (url, mode) = split_sslmode(&pg.url);
        let mut config = tokio_postgres::Config::from_str(&url).map_err(PgError::Url)?;
        if let Some(password) =
            read_secret(&pg.password, &pg.password_file).map_err(PgError::PasswordFile)?
        {
            config.password(password.expose_secret().as_bytes());
        }
        config.application_name("sluice");
        Ok(PgSettings {
            config,
            tls: TlsOptions {
                mode,
                root_cert: pg.ssl_root_cert.clone(),
            },
        })
    }

    /// Opens an SQL connection (TLS as `sslmode` says, like the replication
    /// connection); the connection task is owned by the returned guard.
    pub async fn connect(&self, what: &str) -> Result<SqlConn, PgError> {
        let failed = || PgError::sql(format!("cannot connect to Postgres for {what}"));
        let (client, task) = match self.tls.mode {
            SslMode::Disable => {
                let mut config = self.config.clone();
                config.ssl_mode(tokio_postgres::config::SslMode::Disable);
                let (client, connection) = config.connect(NoTls).await.map_err(failed())?;
                (client, tokio::spawn(drive(connection)))
            }
            mode => {
                let tls = tokio_postgres_rustls::MakeRustlsConnect::new(
                    (*tls_client_config(&self.tls).map_err(PgError::Tls)?).clone(),
                );
                let mut config = self.config.clone();
                config.ssl_mode(if mode == SslMode::Prefer {
                    tokio_postgres::config::SslMode::Prefer
                } else {
                    tokio_postgres::config::SslMode::Require
                });
                let (client, connection) = config.connect(tls).await.map_err(failed())?;
                (client, tokio::spawn(drive(connection)))
            }
        };
        Ok(SqlConn { client, task })
    }
}

async fn drive<S, T>(connection: tokio_postgres::Connection<S, T>)
where
    S: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin,
    T: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin,
{
    if let Err(error) = connection.await {
        tracing::debug!(%error, "sql connection ended");
    }
}

fn split_sslmode(url: &str) -> (String, SslMode) {
    let Ok(mut parsed) = url::Url::parse(url) else {
        return (url.to_owned(), SslMode::Prefer);
    };
    let mut mode = SslMode::Prefer;
    let pairs: Vec<(String, String)> = parsed
        .query_pairs()
        .filter_map(|(k, v)| {
            if k == "sslmode" {
                mode = match v.as_ref() {
                    "disable" => SslMode::Disable,
                    "require" => SslMode::Require,
                    "verify-ca" | "verify-full" => SslMode::VerifyFull,
                    _ => SslMode::Prefer,
                };
                None
            } else {
                Some((k.into_owned(), v.into_owned()))
            }
        })
        .collect();
    parsed.set_query(None);
    if !pairs.is_empty() {
        parsed.query_pairs_mut().extend_pairs(pairs);
    }
    (parsed.to_string(), mode)
}

/// An SQL client whose connection task is aborted when dropped.
pub struct SqlConn {
    pub client: tokio_postgres::Client,
    task: tokio::task::JoinHandle<()>,
}

impl Drop for SqlConn {
    fn drop(&mut self) {
        self.task.abort();
    }
}

/// A row of `pg_replication_slots`.
#[derive(Debug, Clone)]
pub struct SlotState {
    pub plugin: Option<String>,
    pub active_pid: Option<i32>,
    pub confirmed_flush: Lsn,
    /// `lost` when `max_slot_wal_keep_size` invalidated the slot.
    pub wal_status: Option<String>,
}

/// Looks the slot up; `None` if it does not exist.
pub async fn slot_state(
    client: &tokio_postgres::Client,
    slot: &str,
) -> Result<Option<SlotState>, PgError> {
    let row = client
        .query_opt(
            "SELECT plugin::text, active_pid, confirmed_flush_lsn::text, wal_status
               FROM pg_replication_slots WHERE slot_name = $1 AND database = current_database()",
            &[&slot],
        )
        .await
        .map_err(PgError::sql("cannot read pg_replication_slots"))?;
    Ok(row.map(|row| SlotState {
        plugin: row.get(0),
        active_pid: row.get(1),
        confirmed_flush: row
            .get::<_, Option<String>>(2)
            .and_then(|s| s.parse().ok())
            .unwrap_or(Lsn(0)),
        wal_status: row.get(3),
    }))
}

/// The server's current WAL insert position.
pub async fn current_wal_lsn(client: &tokio_postgres::Client) -> Result<Lsn, PgError> {
    let row = client
        .query_one("SELECT pg_current_wal_lsn()::text", &[])
        .await
        .map_err(PgError::sql("cannot read pg_current_wal_lsn()"))?;
    let text: String = row.get(0);
    Ok(text.parse().unwrap_or(Lsn(0)))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sslmode_is_read_and_removed_from_the_url() {
        let (url, mode) =
            split_sslmode("postgres://u@h:5432/db?sslmode=verify-full&connect_timeout=5");
        assert_eq!(mode, SslMode::VerifyFull);
        assert_eq!(url, "postgres://u@h:5432/db?connect_timeout=5");
        let (url, mode) = split_sslmode("postgres://u@h/db");
        assert_eq!(mode, SslMode::Prefer);
        assert_eq!(url, "postgres://u@h/db");
    }
}
