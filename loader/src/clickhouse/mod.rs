//! The loader's ClickHouse layer: the names of tables and columns
//! ([`names`]), type mapping ([`types`]), target tables and their evolution
//! ([`schema`]), RowBinary encoding ([`encode`]), inserts
//! ([`insert`]) and the TOAST fill-in read ([`toast`]), with typed errors
//! ([`error`]; what the loader does about them is [`crate::recovery`]'s).

pub mod encode;
pub mod error;
pub mod insert;
pub mod names;
pub mod schema;
pub mod toast;
pub mod types;

pub use error::{Error, ResponseCode, ValueError};
pub use insert::{ClampCounts, EncodedRows, InsertBuilder, InsertReport, OpCounts};
pub use names::target_table_name;
pub use schema::{
    EvolutionPlan, ExistingColumn, SchemaDrift, TargetColumn, TargetTable, current_columns,
    ensure_table, plan_evolution, quote_ident,
};
pub use toast::{CurrentRows, ToastRequest, encode_key, fetch_current};
pub use types::{ChType, map_column};

/// Why a ClickHouse client could not be built: configuration, never the server.
#[derive(Debug, thiserror::Error)]
pub enum ClientError {
    #[error("cannot read `clickhouse.password_file`")]
    PasswordFile(#[source] std::io::Error),
    #[error("cannot load `clickhouse.{key}` from {path}")]
    TlsFile {
        key: &'static str,
        path: std::path::PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("TLS configuration of `clickhouse`")]
    TlsConfig(#[source] rustls::Error),
}

/// The INSERT compression `config` asks for.
pub fn compression(config: &sluice_broker::config::ClickHouseConfig) -> ::clickhouse::Compression {
    use sluice_broker::config::ClickHouseCompression;
    match config.compression {
        ClickHouseCompression::Lz4 => ::clickhouse::Compression::Lz4,
        ClickHouseCompression::None => ::clickhouse::Compression::None,
    }
}

/// A client for `config`'s server and user, with its INSERT compression.
/// An `https://` URL is verified against the system's roots, plus
/// `tls_ca_file`; `tls_cert_file`/`tls_key_file` add a client certificate.
pub fn client(
    config: &sluice_broker::config::ClickHouseConfig,
) -> Result<::clickhouse::Client, ClientError> {
    use secrecy::ExposeSecret;
    let base = if config.tls_ca_file.is_some() || config.tls_cert_file.is_some() {
        tls::client(config)?
    } else {
        // The crate's own client: HTTP, or HTTPS with the system's roots.
        ::clickhouse::Client::default()
    };
    let mut client = base
        .with_url(&config.url)
        .with_user(&config.user)
        .with_compression(compression(config));
    if let Some(password) =
        sluice_broker::config::read_secret(&config.password, &config.password_file)
            .map_err(ClientError::PasswordFile)?
    {
        client = client.with_password(password.expose_secret());
    }
    Ok(client)
}

mod tls {
    use std::path::Path;
    use std::sync::Arc;
    use std::time::Duration;

    use hyper_util::client::legacy::connect::HttpConnector;
    use rustls::pki_types::pem::PemObject;
    use rustls::pki_types::{CertificateDer, PrivateKeyDer};
    use sluice_broker::config::ClickHouseConfig;

    use super::ClientError;

    /// The settings of the crate's default client (keep-alive, a pool idle
    /// timeout under ClickHouse's 3 s keep-alive), with our TLS roots.
    const TCP_KEEPALIVE: Duration = Duration::from_secs(60);
    const POOL_IDLE_TIMEOUT: Duration = Duration::from_secs(2);

    /// A `clickhouse` client over our own HTTPS connector.
    pub(super) fn client(config: &ClickHouseConfig) -> Result<::clickhouse::Client, ClientError> {
        let mut roots = rustls::RootCertStore::empty();
        roots.add_parsable_certificates(rustls_native_certs::load_native_certs().certs);
        if let Some(path) = &config.tls_ca_file {
            for cert in certificates("tls_ca_file", path)? {
                roots.add(cert).map_err(ClientError::TlsConfig)?;
            }
        }
        let provider = Arc::new(rustls::crypto::ring::default_provider());
        let builder = rustls::ClientConfig::builder_with_provider(provider)
            .with_safe_default_protocol_versions()
            .map_err(ClientError::TlsConfig)?
            .with_root_certificates(roots);
        let tls = match (&config.tls_cert_file, &config.tls_key_file) {
            (Some(cert), Some(key)) => {
                let chain = certificates("tls_cert_file", cert)?;
                let key = PrivateKeyDer::from_pem_file(key).map_err(|e| ClientError::TlsFile {
                    key: "tls_key_file",
                    path: key.to_owned(),
                    source: std::io::Error::other(e),
                })?;
                builder
                    .with_client_auth_cert(chain, key)
                    .map_err(ClientError::TlsConfig)?
            }
            _ => builder.with_no_client_auth(),
        };
        let mut http = HttpConnector::new();
        http.set_keepalive(Some(TCP_KEEPALIVE));
        http.enforce_http(false);
        let connector = hyper_rustls::HttpsConnectorBuilder::new()
            .with_tls_config(tls)
            .https_or_http()
            .enable_http1()
            .wrap_connector(http);
        let http =
            hyper_util::client::legacy::Client::builder(hyper_util::rt::TokioExecutor::new())
                .pool_idle_timeout(POOL_IDLE_TIMEOUT)
                .build(connector);
        Ok(::clickhouse::Client::with_http_client(http))
    }

    fn certificates(
        key: &'static str,
        path: &Path,
    ) -> Result<Vec<CertificateDer<'static>>, ClientError> {
        let failed = |e: rustls::pki_types::pem::Error| ClientError::TlsFile {
            key,
            path: path.to_owned(),
            source: std::io::Error::other(e),
        };
        let certs = CertificateDer::pem_file_iter(path)
            .map_err(failed)?
            .collect::<Result<Vec<_>, _>>()
            .map_err(failed)?;
        if certs.is_empty() {
            return Err(ClientError::TlsFile {
                key,
                path: path.to_owned(),
                source: std::io::Error::other("no certificate in the file"),
            });
        }
        Ok(certs)
    }
}
