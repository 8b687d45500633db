//! sluice's Postgres connector, shared by the replicator (its replication and
//! SQL connections, `status`) and the loader (`verify`), so that every
//! connection to the source honours the same TLS settings.
//!
//! `tokio-postgres` knows only `sslmode` disable/prefer/require and has no
//! `sslrootcert`, `sslcert` or `sslkey`. [`PgSettings::from_config`] reads
//! those from `postgres.url` (libpq's parameter names) and from `[postgres]`
//! (`ssl_root_cert`, `ssl_cert`, `ssl_key`, which win), strips them from the
//! URL and keeps them as [`TlsOptions`]:
//!
//! | `sslmode` | encrypted | server certificate checked |
//! |---|---|---|
//! | `disable` | no | – |
//! | `allow`, `prefer` (default) | if the server offers TLS | no |
//! | `require` | yes | no |
//! | `verify-ca`, `verify-full` | yes | chain to `ssl_root_cert` (or the system roots) and host name |

use std::path::PathBuf;
use std::str::FromStr;

use secrecy::ExposeSecret;
use sluice_broker::config::{PostgresConfig, read_secret};
use tokio_postgres::NoTls;

pub mod publication;
pub mod tls;
pub mod version;

pub use tls::{SslMode, TlsError, TlsOptions};

/// Errors of the SQL side; the binaries decide what each means (retry or stop).
#[derive(Debug, thiserror::Error)]
pub enum PgError {
    #[error("`postgres.url` is not a valid connection string")]
    Url(#[source] tokio_postgres::Error),
    #[error("cannot read `postgres.password_file`")]
    PasswordFile(#[source] std::io::Error),
    #[error("TLS settings of `postgres.url` / `postgres.ssl_root_cert` / `postgres.ssl_cert`")]
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

    /// Maps a `tokio_postgres` error of the step `what`.
    pub fn sql(what: impl Into<String>) -> impl FnOnce(tokio_postgres::Error) -> PgError {
        let what = what.into();
        move |source| PgError::Sql { what, source }
    }

    /// Whether a certificate was refused, the server's by us (unknown
    /// issuer, wrong host name) or ours by the server: a retry cannot fix it.
    pub fn is_certificate_failure(&self) -> bool {
        match self {
            PgError::Sql { source, .. } => tls::is_certificate_failure(source),
            _ => false,
        }
    }
}

/// What every session of sluice sets for itself, whatever the role's or the
/// database's defaults say (`ALTER ROLE … SET`, as DBAs do for application
/// roles), as `pg_dump` does: a snapshot's `COPY` of a chunk or a backlog's
/// call runs as long as the data takes, and a snapshot's transactions (and
/// the replication connection that exported their snapshot) wait idle while
/// the stream is slow. A shorter limit would cancel them, and the retry would
/// meet the same limit again. `lock_timeout` is left as it is: a lock wait
/// cut short is retried and gets through once the lock is gone.
pub const SESSION_TIMEOUTS: &str =
    "-c statement_timeout=0 -c idle_in_transaction_session_timeout=0";

/// The rest of [`SESSION_TIMEOUTS`], for settings younger than Postgres 13:
/// `transaction_timeout` (17+) cuts any transaction, a single statement's
/// too, that lasts longer, and a snapshot's transaction lasts as long as its
/// table takes; `idle_session_timeout` (14+) closes a session idle for
/// longer, and the catalog session waits up to `publication_check_interval`
/// between two queries, the session that moves a catching-up slot up to
/// 10 s. Not startup options, which an older server refuses as unknown
/// settings: every session runs this first, and it sets nothing the server
/// does not have.
pub const NEWER_TIMEOUTS_OFF: &str = "SELECT set_config(name, '0', false) \
     FROM pg_settings WHERE name IN ('transaction_timeout', 'idle_session_timeout')";

/// Appends `more` (`-c name=value …`) to the startup options `config` has
/// (from `postgres.url`'s `options`, which are kept); a later `-c` of the
/// same setting wins.
pub fn add_options(config: &mut tokio_postgres::Config, more: &str) {
    let options = match config.get_options() {
        Some(options) if !options.trim().is_empty() => format!("{options} {more}"),
        _ => more.to_owned(),
    };
    config.options(&options);
}

/// Connection settings derived from `[postgres]`.
#[derive(Clone)]
pub struct PgSettings {
    /// Everything but TLS (sslmode is applied by [`PgSettings::connect`]).
    pub config: tokio_postgres::Config,
    pub tls: TlsOptions,
}

impl PgSettings {
    pub fn from_config(pg: &PostgresConfig) -> Result<Self, PgError> {
        let url = TlsUrl::split(&pg.url);
        let mut config = tokio_postgres::Config::from_str(&url.rest).map_err(PgError::Url)?;
        if let Some(password) =
            read_secret(&pg.password, &pg.password_file).map_err(PgError::PasswordFile)?
        {
            config.password(password.expose_secret().as_bytes());
        }
        config.application_name("sluice");
        add_options(&mut config, SESSION_TIMEOUTS);
        let cert = pg.ssl_cert.clone().or(url.cert);
        let key = pg.ssl_key.clone().or(url.key);
        Ok(PgSettings {
            config,
            tls: TlsOptions {
                mode: url.mode,
                root_cert: pg.ssl_root_cert.clone().or(url.root_cert),
                client_cert: cert.zip(key),
            },
        })
    }

    /// Opens an SQL connection (TLS as `sslmode` says, like the replication
    /// connection); the connection task is owned by the returned guard.
    /// `what` names the purpose in the error.
    pub async fn connect(&self, what: &str) -> Result<SqlConn, PgError> {
        let failed = || PgError::sql(format!("cannot connect to Postgres for {what}"));
        let mut config = self.config.clone();
        let (client, task) = match self.tls.mode {
            SslMode::Disable => {
                config.ssl_mode(tokio_postgres::config::SslMode::Disable);
                let (client, connection) = config.connect(NoTls).await.map_err(failed())?;
                (client, tokio::spawn(drive(connection)))
            }
            mode => {
                let tls = tokio_postgres_rustls::MakeRustlsConnect::new(
                    (*tls::client_config(&self.tls).map_err(PgError::Tls)?).clone(),
                );
                config.ssl_mode(if mode == SslMode::Prefer {
                    tokio_postgres::config::SslMode::Prefer
                } else {
                    tokio_postgres::config::SslMode::Require
                });
                let (client, connection) = config.connect(tls).await.map_err(failed())?;
                (client, tokio::spawn(drive(connection)))
            }
        };
        client
            .batch_execute(NEWER_TIMEOUTS_OFF)
            .await
            .map_err(PgError::sql(format!(
                "cannot turn transaction_timeout and idle_session_timeout off for {what}"
            )))?;
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

/// `postgres.url` split into what `tokio-postgres` accepts and libpq's TLS
/// parameters, which it does not.
#[derive(Debug, PartialEq, Eq)]
struct TlsUrl {
    rest: String,
    mode: SslMode,
    root_cert: Option<PathBuf>,
    cert: Option<PathBuf>,
    key: Option<PathBuf>,
}

impl TlsUrl {
    fn split(url: &str) -> TlsUrl {
        let mut out = TlsUrl {
            rest: url.to_owned(),
            mode: SslMode::Prefer,
            root_cert: None,
            cert: None,
            key: None,
        };
        // Not `url::Url`: a URL of several hosts (`h1:5432,h2:5432`, as libpq
        // writes them) is no URL to it, and its TLS settings must not be
        // passed over.
        let (base, query) = url.split_once('?').unwrap_or((url, ""));
        let mut kept = Vec::new();
        for (key, value) in url::form_urlencoded::parse(query.as_bytes()) {
            match key.as_ref() {
                // The config validation rejected any other value.
                "sslmode" => {
                    out.mode = match value.as_ref() {
                        "disable" => SslMode::Disable,
                        "require" => SslMode::Require,
                        "verify-ca" | "verify-full" => SslMode::VerifyFull,
                        _ => SslMode::Prefer,
                    }
                }
                "sslrootcert" => out.root_cert = Some(PathBuf::from(value.as_ref())),
                "sslcert" => out.cert = Some(PathBuf::from(value.as_ref())),
                "sslkey" => out.key = Some(PathBuf::from(value.as_ref())),
                _ => kept.push((key.into_owned(), value.into_owned())),
            }
        }
        out.rest = if kept.is_empty() {
            base.to_owned()
        } else {
            // A space as `%20`: the form encoding's `+` is no space to
            // tokio-postgres, which decodes percent escapes only (`options=
            // -c%20search_path%3Dapp` came out as `-c+search_path=app`, which
            // the server refuses). A `+` of the value itself is `%2B` here,
            // so every `+` is a space.
            let query = url::form_urlencoded::Serializer::new(String::new())
                .extend_pairs(kept)
                .finish()
                .replace('+', "%20");
            format!("{base}?{query}")
        };
        out
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_session_timeouts_come_after_the_urls_own_options() {
        let pg = |url: &str| PostgresConfig {
            url: url.to_owned(),
            ..PostgresConfig::default()
        };
        let settings =
            PgSettings::from_config(&pg("postgres://u@h/db?options=-c%20search_path%3Dapp"))
                .unwrap();
        assert_eq!(
            settings.config.get_options(),
            Some(format!("-c search_path=app {SESSION_TIMEOUTS}").as_str())
        );
        // A `+` of the value stays one.
        assert_eq!(
            TlsUrl::split("postgres://u@h/db?options=-c%20x%3Da%2Bb&sslmode=require").rest,
            "postgres://u@h/db?options=-c%20x%3Da%2Bb"
        );
        let settings = PgSettings::from_config(&pg("postgres://u@h/db")).unwrap();
        assert_eq!(settings.config.get_options(), Some(SESSION_TIMEOUTS));
        let mut config = settings.config.clone();
        add_options(&mut config, "-c datestyle=ISO");
        assert_eq!(
            config.get_options(),
            Some(format!("{SESSION_TIMEOUTS} -c datestyle=ISO").as_str())
        );
    }

    #[test]
    fn tls_parameters_are_read_and_removed_from_the_url() {
        let url = TlsUrl::split(
            "postgres://u@h:5432/db?sslmode=verify-full&connect_timeout=5&sslrootcert=/ca.pem&sslcert=/c.pem&sslkey=/c.key",
        );
        assert_eq!(url.mode, SslMode::VerifyFull);
        assert_eq!(url.rest, "postgres://u@h:5432/db?connect_timeout=5");
        assert_eq!(url.root_cert, Some("/ca.pem".into()));
        assert_eq!(url.cert, Some("/c.pem".into()));
        assert_eq!(url.key, Some("/c.key".into()));
        let url = TlsUrl::split("postgres://u@h/db");
        assert_eq!(url.mode, SslMode::Prefer);
        assert_eq!(url.rest, "postgres://u@h/db");
        // Several hosts, as libpq writes them.
        let url = TlsUrl::split(
            "postgres://u@h1:5432,h2:5433/db?sslmode=verify-full&target_session_attrs=read-write",
        );
        assert_eq!(url.mode, SslMode::VerifyFull);
        assert_eq!(
            url.rest,
            "postgres://u@h1:5432,h2:5433/db?target_session_attrs=read-write"
        );
    }

    #[test]
    fn config_keys_win_over_url_parameters() {
        let pg = PostgresConfig {
            url: "postgres://u@h/db?sslmode=require&sslrootcert=/url-ca.pem".into(),
            ssl_root_cert: Some("/config-ca.pem".into()),
            ssl_cert: Some("/c.pem".into()),
            ssl_key: Some("/c.key".into()),
            ..Default::default()
        };
        let settings = PgSettings::from_config(&pg).expect("valid");
        assert_eq!(settings.tls.mode, SslMode::Require);
        assert_eq!(settings.tls.root_cert, Some("/config-ca.pem".into()));
        assert_eq!(
            settings.tls.client_cert,
            Some(("/c.pem".into(), "/c.key".into()))
        );
    }

    #[test]
    fn a_missing_client_key_file_is_a_tls_error_naming_it() {
        let options = TlsOptions {
            mode: SslMode::Require,
            root_cert: None,
            client_cert: Some(("/nonexistent/c.pem".into(), "/nonexistent/c.key".into())),
        };
        let err = tls::client_config(&options).unwrap_err();
        assert!(
            sluice_broker::error_chain(&err).contains("/nonexistent/c.pem"),
            "{err}"
        );
    }
}
