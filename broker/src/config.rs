//! Configuration shared by `sluice-replicator` and `sluice-loader`.
//!
//! One TOML file (see `sluice.example.toml` at the repository root) read by both
//! binaries; every key can be overridden by an environment variable
//! `SLUICE_<SECTION>__<KEY>` (`SLUICE_POSTGRES__URL`, `SLUICE_NATS__REPLICAS`),
//! top-level keys by `SLUICE_<KEY>` (`SLUICE_SOURCE`). Unknown keys are errors,
//! so a typo never silently falls back to a default. Every field has a default
//! that works against the local stack of `scripts/stack`.
//!
//! Secrets (`password`, `token`, `nkey_seed`) are [`SecretString`]s: they are
//! never printed by `Debug` and never logged. Each can also be read from a file
//! (`password_file`, ...), which is how container secrets are usually mounted.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::time::Duration;

use figment::Figment;
use figment::providers::{Env, Format, Toml};
use secrecy::SecretString;
use serde::Deserialize;

/// Top-level sections; environment variables outside them (`SLUICE_TEST_*`,
/// `SLUICE_VENV`, ...) belong to scripts and are not configuration.
const SECTIONS: [&str; 6] = [
    "source",
    "postgres",
    "nats",
    "clickhouse",
    "replicator",
    "loader",
];

/// A configuration that could not be loaded; the message names the key and the file.
#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    #[error("config file {path}: {source}")]
    Read {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("config file {path}: {source}")]
    Parse {
        path: PathBuf,
        #[source]
        source: Box<figment::Error>,
    },
    #[error("config file {path}: key `{key}`: {reason}")]
    Invalid {
        path: PathBuf,
        key: &'static str,
        reason: String,
    },
}

/// The whole configuration file.
#[derive(Debug, Clone, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct Config {
    /// Name of the source database: used in subjects (`sluice.<source>.…`), the
    /// default stream name and the default ClickHouse database. Letters, digits,
    /// `_` and `-` only.
    pub source: String,
    pub postgres: PostgresConfig,
    pub nats: NatsConfig,
    pub clickhouse: ClickHouseConfig,
    pub replicator: ReplicatorConfig,
    pub loader: LoaderConfig,
}

impl Default for Config {
    fn default() -> Self {
        Config {
            source: "app".into(),
            postgres: PostgresConfig::default(),
            nats: NatsConfig::default(),
            clickhouse: ClickHouseConfig::default(),
            replicator: ReplicatorConfig::default(),
            loader: LoaderConfig::default(),
        }
    }
}

/// `[postgres]`: the source database.
#[derive(Debug, Clone, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct PostgresConfig {
    /// Connection URL, `postgres://user@host:port/dbname?sslmode=…`. A password
    /// in the URL works but prefer `password` / `password_file` /
    /// `SLUICE_POSTGRES__PASSWORD`, which are never logged.
    pub url: String,
    /// Password for the user in `url` (overrides one embedded in the URL).
    pub password: Option<SecretString>,
    /// File whose first line is the password.
    pub password_file: Option<PathBuf>,
    /// Publication to replicate. Must exist unless `tables` is set.
    pub publication: String,
    /// Logical replication slot (created on first start).
    pub slot: String,
    /// If non-empty, sluice creates `publication` for these tables
    /// (`schema.table`) when it does not exist yet.
    pub tables: Vec<String>,
    /// CA certificate (PEM) used to verify the server with `sslmode=verify-ca`
    /// or `verify-full`.
    pub ssl_root_cert: Option<PathBuf>,
    /// Client certificate (PEM) for servers that authenticate by certificate;
    /// needs `ssl_key`.
    pub ssl_cert: Option<PathBuf>,
    /// Private key (PEM) of `ssl_cert`.
    pub ssl_key: Option<PathBuf>,
}

impl Default for PostgresConfig {
    fn default() -> Self {
        PostgresConfig {
            url: "postgres://postgres@127.0.0.1:5432/postgres".into(),
            password: None,
            password_file: None,
            publication: "sluice".into(),
            slot: "sluice".into(),
            tables: Vec::new(),
            ssl_root_cert: None,
            ssl_cert: None,
            ssl_key: None,
        }
    }
}

/// `[nats]`: the JetStream buffer.
#[derive(Debug, Clone, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct NatsConfig {
    /// Server URL(s), comma-separated: `nats://127.0.0.1:4222` (`tls://` for TLS).
    pub url: String,
    /// Stream name; default `SLUICE_<SOURCE>` (upper-cased source).
    pub stream: Option<String>,
    /// Stream replicas: 1 for a single node, 3 for a cluster.
    pub replicas: usize,
    /// Window in which JetStream drops a message whose `Nats-Msg-Id` it has seen.
    #[serde(with = "humantime_serde")]
    pub duplicate_window: Duration,
    /// Messages older than this are discarded (the loader then resyncs).
    #[serde(with = "humantime_serde")]
    pub max_age: Duration,
    /// Stream size limit in bytes; the oldest messages are discarded beyond it
    /// (the loader then resyncs). `-1`: no byte limit, only `max_age` and the
    /// server's own storage limit. JetStream reserves this many bytes of the
    /// server's `max_file_store` per replica when the stream is created.
    pub max_bytes: i64,
    /// User name for user/password authentication.
    pub user: Option<String>,
    /// Password for `user`.
    pub password: Option<SecretString>,
    /// File whose first line is the password.
    pub password_file: Option<PathBuf>,
    /// Token authentication.
    pub token: Option<SecretString>,
    /// NKey seed (`SU…`) for nkey authentication.
    pub nkey_seed: Option<SecretString>,
    /// `.creds` file (JWT + seed) for decentralised authentication.
    pub creds_file: Option<PathBuf>,
    /// CA certificate (PEM) to verify the server; implies TLS.
    pub tls_ca: Option<PathBuf>,
    /// Client certificate (PEM) for mutual TLS.
    pub tls_cert: Option<PathBuf>,
    /// Client key (PEM) for mutual TLS.
    pub tls_key: Option<PathBuf>,
    /// Require TLS even without a CA file (system roots).
    pub tls_required: bool,
    /// Subject prefix of this client's reply inboxes. A least-privilege user
    /// may subscribe only to its own prefix (`_INBOX_producer` for the
    /// replicator, `_INBOX_consumer` for the loader in `broker/nats/accounts.conf`).
    pub inbox_prefix: String,
}

impl Default for NatsConfig {
    fn default() -> Self {
        NatsConfig {
            url: "nats://127.0.0.1:4222".into(),
            stream: None,
            replicas: 1,
            duplicate_window: Duration::from_secs(10 * 60),
            max_age: Duration::from_secs(7 * 24 * 3600),
            max_bytes: -1,
            user: None,
            password: None,
            password_file: None,
            token: None,
            nkey_seed: None,
            creds_file: None,
            tls_ca: None,
            tls_cert: None,
            tls_key: None,
            tls_required: false,
            inbox_prefix: "_INBOX".into(),
        }
    }
}

/// `[clickhouse]`: the destination.
#[derive(Debug, Clone, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct ClickHouseConfig {
    /// HTTP(S) endpoint, `http://127.0.0.1:8123`.
    pub url: String,
    /// Database holding the target tables; default: the source name.
    pub database: Option<String>,
    /// User name.
    pub user: String,
    /// Password for `user`.
    pub password: Option<SecretString>,
    /// File whose first line is the password.
    pub password_file: Option<PathBuf>,
    /// Compression of the loader's INSERT bodies.
    pub compression: ClickHouseCompression,
    /// CA certificate (PEM) to trust for an `https://` URL, besides the
    /// system's roots.
    pub tls_ca_file: Option<PathBuf>,
    /// Client certificate (PEM) for mutual TLS; needs `tls_key_file`.
    pub tls_cert_file: Option<PathBuf>,
    /// Private key (PEM) of `tls_cert_file`.
    pub tls_key_file: Option<PathBuf>,
}

impl Default for ClickHouseConfig {
    fn default() -> Self {
        ClickHouseConfig {
            url: "http://127.0.0.1:8123".into(),
            database: None,
            user: "default".into(),
            password: None,
            password_file: None,
            compression: ClickHouseCompression::default(),
            tls_ca_file: None,
            tls_cert_file: None,
            tls_key_file: None,
        }
    }
}

/// `clickhouse.compression`: how INSERT bodies travel.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum ClickHouseCompression {
    /// LZ4 blocks (ClickHouse's native compression): about a third of the
    /// bytes on the wire, for CPU on both ends.
    #[default]
    Lz4,
    /// Uncompressed: the least CPU, for a ClickHouse on the same host or a
    /// fast network.
    None,
}

/// `[replicator]`: packaging, publishing and feedback.
#[derive(Debug, Clone, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct ReplicatorConfig {
    /// `host:port` of the `/metrics`, `/healthz` and `/readyz` endpoint.
    pub metrics_listen: SocketAddr,
    /// A package is flushed when it holds this many rows.
    pub package_max_rows: usize,
    /// A package is flushed when its encoded rows reach this many bytes
    /// (before compression; keep well under the NATS `max_payload`).
    pub package_max_bytes: usize,
    /// Publish acks awaited at once; bounds memory and applies back-pressure
    /// to the replication socket.
    pub max_in_flight: usize,
    /// Interval of standby status updates sent to Postgres (proactively, not
    /// only when asked).
    #[serde(with = "humantime_serde")]
    pub status_interval: Duration,
    /// Interval of heartbeat packages on the control subject.
    #[serde(with = "humantime_serde")]
    pub heartbeat_interval: Duration,
    /// How often the publication is read again for tables added to it
    /// (snapshotted automatically) or removed from it; a Relation message of
    /// an unknown table reads it at once. `0s` turns the periodic check off.
    #[serde(with = "humantime_serde")]
    pub publication_check_interval: Duration,
    /// Connections a snapshot reads with, across tables and within one
    /// table (a table is read in chunks of pages; see
    /// `snapshot_chunk_pages`), besides the one that plans the tables.
    pub snapshot_parallelism: usize,
    /// Pages (8 KiB each, by default) per snapshot chunk; `0` chooses by the
    /// table's size (a quarter of its share per connection, between 64 MiB
    /// and 1 GiB). Tables on Postgres 13 (no TID range scan) and partitioned
    /// roots are read as one chunk.
    pub snapshot_chunk_pages: u64,
    /// A start this many bytes of WAL (or more) behind reads the backlog with
    /// `pg_logical_slot_peek_binary_changes` before streaming; 0 never does.
    pub catchup_min_lag_bytes: u64,
    /// pgoutput messages per backlog call (the server decodes a whole call,
    /// spilling to temporary files, before sending its first row).
    pub catchup_chunk_changes: u32,
    /// Ask Postgres (14+) to stream a large transaction while it runs
    /// (pgoutput `streaming 'on'`) instead of decoding it whole, spilling to
    /// its own disk, before the first byte. The replicator keeps a streamed
    /// transaction in a local spill file until it commits.
    pub streaming: bool,
    /// Directory of the spill files of streamed transactions (anonymous
    /// files, gone when the process ends); the system's temporary directory
    /// when unset.
    pub spill_dir: Option<std::path::PathBuf>,
    /// Threads of the replicator's async runtime; `0`: one where the process
    /// may use two CPUs or fewer, one per CPU above (`sluice_replicator::run::runtime_threads`).
    pub worker_threads: usize,
    /// How the replicator compresses the packages of changes (and control
    /// packages); snapshot packages follow `snapshot_compression`.
    pub compression: PackageCompression,
    /// How it compresses snapshot packages (the `COPY` text of initial
    /// snapshots and resyncs); plain by default: zstd was a third of the
    /// replicator's CPU per snapshot row.
    pub snapshot_compression: PackageCompression,
}

/// `replicator.compression` and `replicator.snapshot_compression`: how
/// packages are stored in the stream.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum PackageCompression {
    /// zstd (level 1): about a third of the bytes in the stream.
    #[default]
    Zstd,
    /// Plain protobuf: about three times the bytes in the stream (mind its
    /// `max_bytes`), for a quarter less CPU in the replicator and no
    /// decompression in the loader.
    None,
}

impl PackageCompression {
    /// The encoding a package payload gets.
    pub fn encoding(self) -> sluice_proto::Encoding {
        match self {
            PackageCompression::Zstd => sluice_proto::Encoding::Zstd,
            PackageCompression::None => sluice_proto::Encoding::Identity,
        }
    }
}

impl Default for ReplicatorConfig {
    fn default() -> Self {
        ReplicatorConfig {
            metrics_listen: SocketAddr::from(([127, 0, 0, 1], 9187)),
            package_max_rows: 5000,
            package_max_bytes: 512 * 1024,
            max_in_flight: 256,
            status_interval: Duration::from_secs(1),
            heartbeat_interval: Duration::from_secs(5),
            publication_check_interval: Duration::from_secs(30),
            snapshot_parallelism: 2,
            snapshot_chunk_pages: 0,
            catchup_min_lag_bytes: 64 * 1024 * 1024,
            catchup_chunk_changes: 500_000,
            streaming: true,
            spill_dir: None,
            worker_threads: 0,
            compression: PackageCompression::default(),
            snapshot_compression: PackageCompression::None,
        }
    }
}

/// `[loader]`: consuming and inserting.
#[derive(Debug, Clone, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct LoaderConfig {
    /// `host:port` of the `/metrics`, `/healthz` and `/readyz` endpoint.
    pub metrics_listen: SocketAddr,
    /// Durable consumer name (one per loader).
    pub consumer: String,
    /// Messages fetched per batch at most.
    pub batch_max_messages: usize,
    /// Bytes fetched per batch at most (as stored: compressed). The loader's
    /// memory grows with it: each fetched byte is held, decompressed and
    /// encoded in up to three batches at once (README "Bounded memory").
    pub batch_max_bytes: usize,
    /// Bytes a batch may take once decompressed. A bigger batch is applied in
    /// parts (acked once, after the last); a package bigger than this alone
    /// is dead-lettered. Bounds the loader's memory whatever the payloads
    /// claim; chunks held back for an incomplete package count against it.
    pub batch_max_decoded_bytes: usize,
    /// Shortest time between the hand-overs of two batches that are not
    /// full. A batch goes to ClickHouse as soon as it has a message, the
    /// previous batch was taken and this much time passed since it was:
    /// on a quiet stream a change waits at most this long, and each table
    /// gets at most one INSERT per interval. While ClickHouse is busy with a
    /// batch the next one keeps filling, so batches grow with the load up to
    /// the limits above.
    #[serde(with = "humantime_serde")]
    pub batch_min_interval: Duration,
    /// How long the loader waits on an idle stream before it refreshes its
    /// lag gauges and checks for stalled resyncs. Changes never wait for it.
    #[serde(with = "humantime_serde")]
    pub batch_max_wait: Duration,
    /// How long newer messages wait behind a package whose chunks stopped
    /// arriving before the loader applies them without it (its table then
    /// shows a gap and is resynced). While nothing newer arrives (a
    /// replicator that died mid-package and has not restarted), the chunks
    /// are held however long that takes.
    #[serde(with = "humantime_serde")]
    pub incomplete_package_wait: Duration,
    /// How long JetStream waits for an ack before redelivering; must exceed the
    /// slowest INSERT including retries.
    #[serde(with = "humantime_serde")]
    pub ack_wait: Duration,
    /// How long a loader whose membership key stopped changing is still
    /// taken for alive by the other loaders of its source. A live loader
    /// renews its key every quarter of this and stops applying when it could
    /// not for three quarters; its tables move to the others this long after
    /// it died (README "Several loaders"). The same on every loader of a source.
    #[serde(with = "humantime_serde")]
    pub lease_ttl: Duration,
}

impl Default for LoaderConfig {
    fn default() -> Self {
        LoaderConfig {
            metrics_listen: SocketAddr::from(([127, 0, 0, 1], 9188)),
            consumer: "sluice_loader".into(),
            batch_max_messages: 1000,
            batch_max_bytes: 4 * 1024 * 1024,
            batch_max_decoded_bytes: 256 * 1024 * 1024,
            batch_min_interval: Duration::from_millis(100),
            batch_max_wait: Duration::from_millis(500),
            incomplete_package_wait: Duration::from_secs(60),
            ack_wait: Duration::from_secs(300),
            lease_ttl: Duration::from_secs(10),
        }
    }
}

impl Config {
    /// Loads `path`, then applies `SLUICE_…` environment overrides, then checks values.
    pub fn load(path: &Path) -> Result<Config, ConfigError> {
        Self::load_with_env(path, Env::prefixed("SLUICE_"))
    }

    fn load_with_env(path: &Path, env: Env) -> Result<Config, ConfigError> {
        // Figment treats a missing file as empty; a missing config file is an error here.
        std::fs::metadata(path).map_err(|source| ConfigError::Read {
            path: path.to_owned(),
            source,
        })?;
        let env = env.split("__").filter(|key| {
            let section = key.as_str().split('.').next().unwrap_or_default();
            SECTIONS.iter().any(|s| s.eq_ignore_ascii_case(section))
        });
        // figment parses every environment value as a TOML value, so a numeric
        // password would become a number (and `1.50` the float 1.5). Secrets
        // are taken verbatim, as strings, instead.
        let secrets: Vec<(String, String)> = env
            .iter()
            .filter(|(key, _)| is_secret_key(key.as_str()))
            .map(|(key, value)| (key.as_str().to_ascii_lowercase(), value))
            .collect();
        let mut figment = Figment::new()
            .merge(Toml::file_exact(path))
            .merge(env.filter(|key| !is_secret_key(key.as_str())));
        for (key, value) in secrets {
            figment = figment.merge(figment::providers::Serialized::default(&key, value));
        }
        let config: Config = figment.extract().map_err(|source| ConfigError::Parse {
            path: path.to_owned(),
            source: Box::new(redact_parse_error(source)),
        })?;
        config.validate(path)?;
        Ok(config)
    }

    fn validate(&self, path: &Path) -> Result<(), ConfigError> {
        let invalid = |key: &'static str, reason: String| ConfigError::Invalid {
            path: path.to_owned(),
            key,
            reason,
        };
        if self.source.is_empty() || !self.source.chars().all(is_token_char) {
            return Err(invalid(
                "source",
                format!(
                    "{:?} must be non-empty letters, digits, `_` or `-`",
                    self.source
                ),
            ));
        }
        check_pg_url(&self.postgres.url).map_err(|reason| invalid("postgres.url", reason))?;
        check_sslmode(&self.postgres.url).map_err(|reason| invalid("postgres.url", reason))?;
        match (
            &self.clickhouse.tls_cert_file,
            &self.clickhouse.tls_key_file,
        ) {
            (Some(_), None) => {
                return Err(invalid(
                    "clickhouse.tls_key_file",
                    "is required with `clickhouse.tls_cert_file`".into(),
                ));
            }
            (None, Some(_)) => {
                return Err(invalid(
                    "clickhouse.tls_cert_file",
                    "is required with `clickhouse.tls_key_file`".into(),
                ));
            }
            _ => {}
        }
        match (&self.postgres.ssl_cert, &self.postgres.ssl_key) {
            (Some(_), None) => {
                return Err(invalid(
                    "postgres.ssl_key",
                    "is required with `postgres.ssl_cert`".into(),
                ));
            }
            (None, Some(_)) => {
                return Err(invalid(
                    "postgres.ssl_cert",
                    "is required with `postgres.ssl_key`".into(),
                ));
            }
            _ => {}
        }
        for (key, value) in [
            ("postgres.publication", &self.postgres.publication),
            ("postgres.slot", &self.postgres.slot),
        ] {
            if value.is_empty() {
                return Err(invalid(key, "must not be empty".into()));
            }
        }
        if !self
            .postgres
            .slot
            .chars()
            .all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || c == '_')
        {
            return Err(invalid(
                "postgres.slot",
                format!(
                    "{:?}: slot names are lower-case letters, digits and `_`",
                    self.postgres.slot
                ),
            ));
        }
        if self.postgres.slot.len() > 63 {
            return Err(invalid(
                "postgres.slot",
                format!(
                    "{} characters: Postgres allows slot names of at most 63",
                    self.postgres.slot.len()
                ),
            ));
        }
        for server in self.nats.url.split(',') {
            check_url(server.trim(), &["nats", "tls", "ws", "wss"])
                .map_err(|reason| invalid("nats.url", reason))?;
        }
        let prefix = &self.nats.inbox_prefix;
        if prefix.is_empty()
            || prefix.starts_with('.')
            || prefix.ends_with('.')
            || prefix
                .split('.')
                .any(|t| t.is_empty() || t == "*" || t == ">")
            || prefix.chars().any(|c| c.is_whitespace() || c.is_control())
        {
            return Err(invalid(
                "nats.inbox_prefix",
                format!(
                    "{prefix:?} is not a subject prefix (tokens separated by `.`, no wildcards or spaces)"
                ),
            ));
        }
        if !(1..=5).contains(&self.nats.replicas) {
            return Err(invalid(
                "nats.replicas",
                format!("{} must be between 1 and 5", self.nats.replicas),
            ));
        }
        if self.nats.max_bytes == 0 || self.nats.max_bytes < -1 {
            return Err(invalid(
                "nats.max_bytes",
                format!(
                    "{} must be -1 (no limit) or a positive number of bytes",
                    self.nats.max_bytes
                ),
            ));
        }
        if self.loader.batch_max_wait.is_zero() {
            return Err(invalid("loader.batch_max_wait", "must be positive".into()));
        }
        if self.nats.duplicate_window.is_zero() {
            return Err(invalid("nats.duplicate_window", "must be positive".into()));
        }
        check_url(&self.clickhouse.url, &["http", "https"])
            .map_err(|reason| invalid("clickhouse.url", reason))?;
        if let Some(db) = &self.clickhouse.database
            && (db.is_empty() || !db.chars().all(is_token_char))
        {
            return Err(invalid(
                "clickhouse.database",
                format!("{db:?} must be letters, digits, `_` or `-`"),
            ));
        }
        let r = &self.replicator;
        for (key, value) in [
            ("replicator.package_max_rows", r.package_max_rows),
            ("replicator.package_max_bytes", r.package_max_bytes),
            ("replicator.max_in_flight", r.max_in_flight),
            ("replicator.snapshot_parallelism", r.snapshot_parallelism),
            (
                "replicator.catchup_chunk_changes",
                r.catchup_chunk_changes as usize,
            ),
            ("loader.batch_max_messages", self.loader.batch_max_messages),
            ("loader.batch_max_bytes", self.loader.batch_max_bytes),
            (
                "loader.batch_max_decoded_bytes",
                self.loader.batch_max_decoded_bytes,
            ),
        ] {
            if value == 0 {
                return Err(invalid(key, "must be at least 1".into()));
            }
        }
        if self.loader.consumer.is_empty() || !self.loader.consumer.chars().all(is_token_char) {
            return Err(invalid(
                "loader.consumer",
                format!(
                    "{:?} must be letters, digits, `_` or `-`",
                    self.loader.consumer
                ),
            ));
        }
        if self.loader.lease_ttl < Duration::from_secs(1) {
            return Err(invalid(
                "loader.lease_ttl",
                "must be at least 1s (a loader renews its membership every quarter of it)".into(),
            ));
        }
        Ok(())
    }

    /// The JetStream stream of this source.
    pub fn stream_name(&self) -> String {
        self.nats
            .stream
            .clone()
            .unwrap_or_else(|| format!("SLUICE_{}", self.source.to_uppercase().replace('-', "_")))
    }

    /// The ClickHouse database of this source.
    pub fn clickhouse_database(&self) -> String {
        self.clickhouse
            .database
            .clone()
            .unwrap_or_else(|| self.source.replace('-', "_"))
    }
}

fn is_token_char(c: char) -> bool {
    c.is_ascii_alphanumeric() || c == '_' || c == '-'
}

/// A Postgres URL, which may name several hosts as libpq does
/// (`postgres://u@h1:5432,h2:5433/db?target_session_attrs=read-write`): each
/// host must make a valid URL with the rest.
fn check_pg_url(value: &str) -> Result<(), String> {
    const SCHEMES: &[&str] = &["postgres", "postgresql"];
    if let Some((scheme, rest)) = value.split_once("://") {
        let end = rest.find(['/', '?']).unwrap_or(rest.len());
        let (authority, tail) = rest.split_at(end);
        let (user, hosts) = match authority.rsplit_once('@') {
            Some((user, hosts)) => (format!("{user}@"), hosts),
            None => (String::new(), authority),
        };
        if hosts.contains(',') {
            for host in hosts.split(',') {
                check_url(&format!("{scheme}://{user}{host}{tail}"), SCHEMES)?;
            }
            return Ok(());
        }
    }
    check_url(value, SCHEMES)
}

fn check_url(value: &str, schemes: &[&str]) -> Result<(), String> {
    let url = url::Url::parse(value)
        .map_err(|e| format!("{:?} is not a valid URL: {e}", redact_url(value)))?;
    if !schemes.contains(&url.scheme()) {
        return Err(format!(
            "{:?} has scheme `{}`, expected one of {}",
            redact_url(value),
            url.scheme(),
            schemes.join(", ")
        ));
    }
    if url.host_str().is_none_or(str::is_empty) {
        return Err(format!("{:?} has no host", redact_url(value)));
    }
    Ok(())
}

/// The `sslmode` values sluice knows. A misspelt one (`verify_full`) must not
/// quietly become `prefer`, which checks no certificate and falls back to
/// plaintext.
pub const SSLMODES: &[&str] = &[
    "disable",
    "allow",
    "prefer",
    "require",
    "verify-ca",
    "verify-full",
];

fn check_sslmode(value: &str) -> Result<(), String> {
    // The query alone: a URL of several hosts is no `url::Url`.
    let query = value.split_once('?').map_or("", |(_, query)| query);
    let query = query.split_once('#').map_or(query, |(query, _)| query);
    for (key, mode) in url::form_urlencoded::parse(query.as_bytes()) {
        if key == "sslmode" && !SSLMODES.contains(&mode.as_ref()) {
            return Err(format!(
                "sslmode={mode} is not one of {}",
                SSLMODES.join(", ")
            ));
        }
    }
    Ok(())
}

/// The URL (or comma-separated URLs) with every password replaced by `***`,
/// for logs, `status` and error messages. In a NATS URL a user name without a
/// password is a token (`nats://TOKEN@host`), so it is replaced too. A value
/// that does not parse as a URL but holds an `@` loses everything before it.
pub fn redact_url(value: &str) -> String {
    value
        .split(',')
        .map(|one| redact_one_url(one.trim()))
        .collect::<Vec<_>>()
        .join(",")
}

fn redact_one_url(value: &str) -> String {
    match url::Url::parse(value) {
        Ok(mut url) if !url.cannot_be_a_base() => {
            if url.password().is_some() {
                // Setting a password only fails for URLs that cannot have one.
                let _ = url.set_password(Some("***"));
            } else if !url.username().is_empty()
                && matches!(url.scheme(), "nats" | "tls" | "ws" | "wss")
            {
                let _ = url.set_username("***");
            }
            url.to_string()
        }
        _ => match value.rsplit_once('@') {
            Some((_, host)) => format!("***@{host}"),
            None => value.to_owned(),
        },
    }
}

/// Keys whose values are secrets (`section.key`, lowercase).
const SECRET_KEYS: &[&str] = &[
    "postgres.password",
    "nats.password",
    "nats.token",
    "nats.nkey_seed",
    "clickhouse.password",
];

fn is_secret_key(key: &str) -> bool {
    SECRET_KEYS.iter().any(|k| k.eq_ignore_ascii_case(key))
}

/// A parse error without the values it would quote: a TOML syntax error
/// echoes the offending line (which may hold a password), and a type error
/// quotes the value it found. What remains names the line and column, or the
/// key, and what was expected.
fn redact_parse_error(error: figment::Error) -> figment::Error {
    use figment::error::{Actual, Kind};
    // The chain is newest first; rebuilt oldest first below.
    let mut errors: Vec<figment::Error> = error.into_iter().collect();
    for e in &mut errors {
        match &mut e.kind {
            Kind::Message(text) => *text = redact_toml_message(text),
            Kind::InvalidType(actual, _) | Kind::InvalidValue(actual, _) => {
                let kind = match actual {
                    Actual::Bool(_) => "a boolean",
                    Actual::Unsigned(_) | Actual::Signed(_) => "an integer",
                    Actual::Float(_) => "a float",
                    Actual::Char(_) | Actual::Str(_) => "a string",
                    Actual::Bytes(_) => "bytes",
                    _ => continue,
                };
                *actual = Actual::Other(kind.to_owned());
            }
            _ => {}
        }
    }
    let mut oldest_first = errors.into_iter().rev();
    let first = oldest_first.next().expect("an error has at least itself");
    oldest_first.fold(first, |older, newer| older.chain(newer))
}

/// `TOML parse error at line 3, column 12\n  |\n3 | password = "x\n ...\ninvalid
/// basic string` becomes `TOML parse error at line 3, column 12: invalid basic
/// string`: the source line between the first and last line is dropped.
fn redact_toml_message(text: &str) -> String {
    let mut lines = text.lines().filter(|l| !l.trim().is_empty());
    let first = lines.next().unwrap_or_default();
    let last = lines.next_back();
    let quotes_source = text.lines().any(|l| l.trim_start().starts_with('|'));
    match last {
        Some(last) if quotes_source => format!("{first}: {}", last.trim()),
        _ => text.to_owned(),
    }
}

/// Resolves a secret given inline or as a file (first line, trailing newline removed).
pub fn read_secret(
    inline: &Option<SecretString>,
    file: &Option<PathBuf>,
) -> std::io::Result<Option<SecretString>> {
    if let Some(secret) = inline {
        return Ok(Some(secret.clone()));
    }
    match file {
        None => Ok(None),
        Some(path) => {
            let text = std::fs::read_to_string(path)?;
            let line = text.lines().next().unwrap_or_default();
            Ok(Some(SecretString::from(line.to_owned())))
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use secrecy::ExposeSecret as _;
    use std::io::Write;

    fn write(contents: &str) -> tempfile::NamedTempFile {
        let mut file = tempfile::NamedTempFile::new().expect("temp file");
        file.write_all(contents.as_bytes()).expect("write");
        file
    }

    fn no_env() -> Env {
        Env::prefixed("SLUICE_UNIT_TEST_NOTHING_")
    }

    #[test]
    fn example_config_in_the_repository_loads() {
        let path = Path::new(env!("CARGO_MANIFEST_DIR")).join("../sluice.example.toml");
        let config = Config::load_with_env(&path, no_env()).expect("example config loads");
        assert_eq!(config.source, "app");
        assert_eq!(config.stream_name(), "SLUICE_APP");
    }

    #[test]
    fn defaults_fill_missing_keys() {
        let file = write("source = \"shop\"\n[nats]\nreplicas = 3\nduplicate_window = \"2m\"\n");
        let config = Config::load_with_env(file.path(), no_env()).expect("loads");
        assert_eq!(config.nats.replicas, 3);
        assert_eq!(config.nats.duplicate_window, Duration::from_secs(120));
        assert_eq!(config.postgres.slot, "sluice");
        assert_eq!(config.clickhouse_database(), "shop");
    }

    #[test]
    fn typo_in_a_key_names_the_key_and_the_file() {
        let file = write("[postgres]\npublicaton = \"x\"\n");
        let err = Config::load_with_env(file.path(), no_env())
            .expect_err("typo rejected")
            .to_string();
        assert!(err.contains("publicaton"), "{err}");
        assert!(err.contains(&file.path().display().to_string()), "{err}");
    }

    #[test]
    fn bad_url_names_the_key() {
        let file = write("[postgres]\nurl = \"mysql://h/db\"\n");
        let err = Config::load_with_env(file.path(), no_env())
            .expect_err("bad url")
            .to_string();
        assert!(err.contains("postgres.url"), "{err}");
        let file = write("[clickhouse]\nurl = \"not a url\"\n");
        let err = Config::load_with_env(file.path(), no_env())
            .expect_err("bad url")
            .to_string();
        assert!(err.contains("clickhouse.url"), "{err}");
    }

    #[test]
    fn replicator_compression_is_zstd_or_none() {
        let config = Config::load_with_env(write("").path(), no_env()).expect("loads");
        assert_eq!(config.replicator.compression, PackageCompression::Zstd);
        assert_eq!(
            config.replicator.snapshot_compression,
            PackageCompression::None
        );
        let file = write("[replicator]\nsnapshot_compression = \"zstd\"\n");
        let config = Config::load_with_env(file.path(), no_env()).expect("loads");
        assert_eq!(
            config.replicator.snapshot_compression.encoding(),
            sluice_proto::Encoding::Zstd
        );
        let file = write("[replicator]\ncompression = \"none\"\n");
        let config = Config::load_with_env(file.path(), no_env()).expect("loads");
        assert_eq!(
            config.replicator.compression.encoding(),
            sluice_proto::Encoding::Identity
        );
        let file = write("[replicator]\ncompression = \"lz4\"\n");
        let err = Config::load_with_env(file.path(), no_env())
            .expect_err("unknown compression")
            .to_string();
        assert!(err.contains("lz4") && err.contains("compression"), "{err}");
    }

    #[test]
    fn clickhouse_compression_is_lz4_or_none() {
        let config = Config::load_with_env(write("").path(), no_env()).expect("loads");
        assert_eq!(config.clickhouse.compression, ClickHouseCompression::Lz4);
        let file = write("[clickhouse]\ncompression = \"none\"\n");
        let config = Config::load_with_env(file.path(), no_env()).expect("loads");
        assert_eq!(config.clickhouse.compression, ClickHouseCompression::None);
        let file = write("[clickhouse]\ncompression = \"zstd\"\n");
        let err = Config::load_with_env(file.path(), no_env())
            .expect_err("unknown compression")
            .to_string();
        assert!(err.contains("zstd") && err.contains("compression"), "{err}");
    }

    #[test]
    fn an_idle_wait_of_zero_is_refused_and_a_zero_batch_interval_is_not() {
        let file = write("[loader]\nbatch_max_wait = \"0s\"\n");
        let err = Config::load_with_env(file.path(), no_env())
            .expect_err("a zero idle wait would spin")
            .to_string();
        assert!(err.contains("loader.batch_max_wait"), "{err}");
        let file = write("[loader]\nbatch_min_interval = \"0s\"\n");
        let config = Config::load_with_env(file.path(), no_env()).expect("loads");
        assert_eq!(config.loader.batch_min_interval, Duration::ZERO);
        let config = Config::load_with_env(write("").path(), no_env()).expect("loads");
        assert_eq!(config.loader.batch_min_interval, Duration::from_millis(100));
    }

    #[test]
    fn missing_file_is_an_error() {
        let err = Config::load_with_env(Path::new("/nonexistent/sluice.toml"), no_env())
            .expect_err("missing");
        assert!(matches!(err, ConfigError::Read { .. }));
    }

    #[test]
    #[allow(clippy::result_large_err)] // figment's Jail closure signature
    fn environment_overrides_file_and_ignores_foreign_variables() {
        let file = write("[postgres]\nslot = \"from_file\"\n");
        figment::Jail::expect_with(|jail| {
            jail.set_env("SLUICE_X_POSTGRES__SLOT", "from_env");
            jail.set_env("SLUICE_X_NATS__REPLICAS", "3");
            jail.set_env("SLUICE_X_SOURCE", "inventory");
            jail.set_env("SLUICE_X_TEST_PG_URL", "not configuration");
            let config =
                Config::load_with_env(file.path(), Env::prefixed("SLUICE_X_")).expect("loads");
            assert_eq!(config.postgres.slot, "from_env");
            assert_eq!(config.nats.replicas, 3);
            assert_eq!(config.source, "inventory");
            Ok(())
        });
    }

    #[test]
    fn an_unknown_sslmode_is_a_config_error_naming_the_key() {
        let file = write("[postgres]\nurl = \"postgres://u@h:5432/db?sslmode=verify_full\"\n");
        let err = Config::load_with_env(file.path(), no_env())
            .unwrap_err()
            .to_string();
        assert!(err.contains("postgres.url"), "{err}");
        assert!(err.contains("sslmode=verify_full"), "{err}");
        for mode in SSLMODES {
            let file = write(&format!(
                "[postgres]\nurl = \"postgres://u@h:5432/db?sslmode={mode}\"\n"
            ));
            Config::load_with_env(file.path(), no_env()).expect("a known sslmode loads");
        }
    }

    #[test]
    fn a_postgres_url_may_name_several_hosts() {
        let file = write(
            "[postgres]\nurl = \"postgres://u@h1:5432,h2:5433/db?target_session_attrs=read-write\"\n",
        );
        Config::load_with_env(file.path(), no_env()).expect("several hosts load");
        // Each host is checked, and so is the sslmode of such a URL.
        for bad in [
            "postgres://u@h1:5432,h2:x/db",
            "postgres://u@h1:5432,h2:5433/db?sslmode=verify_full",
        ] {
            let file = write(&format!("[postgres]\nurl = \"{bad}\"\n"));
            let err = Config::load_with_env(file.path(), no_env())
                .unwrap_err()
                .to_string();
            assert!(err.contains("postgres.url"), "{bad}: {err}");
        }
    }

    #[test]
    fn nats_url_lists_and_tokens_are_redacted() {
        assert_eq!(
            redact_url("nats://producer:s3cret@a:4222, nats://producer:s3cret@b:4222"),
            "nats://producer:***@a:4222,nats://producer:***@b:4222"
        );
        assert_eq!(redact_url("nats://tok3n@a:4222"), "nats://***@a:4222");
        assert_eq!(
            redact_url("postgres://sluice@h:5432/db"),
            "postgres://sluice@h:5432/db"
        );
        assert_eq!(redact_url("x:y:s3cret@not a url"), "***@not a url");
    }

    #[test]
    fn a_toml_syntax_error_does_not_echo_the_line() {
        let file = write("[postgres]\npassword = \"hunter2\nslot = \"x\"\n");
        let err = Config::load_with_env(file.path(), no_env()).unwrap_err();
        let text = crate::error_chain(&err);
        assert!(!text.contains("hunter2"), "{text}");
        assert!(text.contains("line 2"), "{text}");
    }

    #[test]
    #[allow(clippy::result_large_err)] // figment's Jail closure signature
    fn numeric_secrets_from_the_environment_are_taken_verbatim() {
        let file = write("[postgres]\nslot = \"s\"\n");
        figment::Jail::expect_with(|jail| {
            jail.set_env("SLUICE_X_POSTGRES__PASSWORD", "1.50");
            jail.set_env("SLUICE_X_CLICKHOUSE__PASSWORD", "12345");
            let config =
                Config::load_with_env(file.path(), Env::prefixed("SLUICE_X_")).expect("loads");
            let pg = config.postgres.password.as_ref().expect("set");
            assert_eq!(pg.expose_secret(), "1.50");
            let ch = config.clickhouse.password.as_ref().expect("set");
            assert_eq!(ch.expose_secret(), "12345");
            Ok(())
        });
    }

    #[test]
    fn a_slot_name_longer_than_postgres_allows_is_refused() {
        let longest = format!("[postgres]\nslot = \"{}\"\n", "s".repeat(63));
        assert!(Config::load_with_env(write(&longest).path(), no_env()).is_ok());
        let longer = format!("[postgres]\nslot = \"{}\"\n", "s".repeat(64));
        let err = Config::load_with_env(write(&longer).path(), no_env()).unwrap_err();
        let text = crate::error_chain(&err);
        assert!(
            text.contains("postgres.slot") && text.contains("at most 63"),
            "{text}"
        );
    }

    #[test]
    #[allow(clippy::result_large_err)] // figment's Jail closure signature
    fn a_type_error_does_not_quote_the_value() {
        let file = write("[nats]\nreplicas = \"hunter2\"\n");
        let err = Config::load_with_env(file.path(), no_env()).unwrap_err();
        let text = crate::error_chain(&err);
        assert!(!text.contains("hunter2"), "{text}");
        assert!(text.contains("replicas"), "{text}");
    }

    #[test]
    fn secrets_are_not_in_debug_output_and_urls_are_redacted() {
        let file = write("[clickhouse]\npassword = \"hunter2\"\n");
        let config = Config::load_with_env(file.path(), no_env()).expect("loads");
        assert!(!format!("{config:?}").contains("hunter2"));
        assert_eq!(
            redact_url("postgres://u:pw@h:5/db"),
            "postgres://u:***@h:5/db"
        );
    }
}
