//! Connecting to NATS with the configured credentials and TLS.

use async_nats::ConnectOptions;
use secrecy::ExposeSecret;

use crate::config::{NatsConfig, read_secret, redact_url};

/// Why NATS could not be reached.
#[derive(Debug, thiserror::Error)]
pub enum ConnectError {
    #[error("cannot read NATS credentials file {path}")]
    Credentials {
        path: std::path::PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("cannot read `nats.password_file`")]
    PasswordFile(#[source] std::io::Error),
    #[error("`nats.{0}` requires `nats.user`")]
    MissingUser(&'static str),
    #[error("cannot connect to NATS at {url}")]
    Connect {
        /// Redacted: no password or token.
        url: String,
        #[source]
        source: async_nats::ConnectError,
    },
}

/// Connects to the servers in `config.url` (comma-separated).
pub async fn connect(
    config: &NatsConfig,
    client_name: &str,
) -> Result<async_nats::Client, ConnectError> {
    let mut options = match &config.creds_file {
        Some(path) => ConnectOptions::with_credentials_file(path)
            .await
            .map_err(|source| ConnectError::Credentials {
                path: path.clone(),
                source,
            })?,
        None => ConnectOptions::new(),
    };
    let password =
        read_secret(&config.password, &config.password_file).map_err(ConnectError::PasswordFile)?;
    match (&config.user, password) {
        (Some(user), Some(password)) => {
            options = options.user_and_password(user.clone(), password.expose_secret().to_owned());
        }
        (None, Some(_)) => return Err(ConnectError::MissingUser("password")),
        (Some(user), None) => options = options.user_and_password(user.clone(), String::new()),
        (None, None) => {}
    }
    if let Some(token) = &config.token {
        options = options.token(token.expose_secret().to_owned());
    }
    if let Some(seed) = &config.nkey_seed {
        options = options.nkey(seed.expose_secret().to_owned());
    }
    if let Some(ca) = &config.tls_ca {
        options = options.add_root_certificates(ca.clone()).require_tls(true);
    }
    if let (Some(cert), Some(key)) = (&config.tls_cert, &config.tls_key) {
        options = options.add_client_certificate(cert.clone(), key.clone());
    }
    if config.tls_required {
        options = options.require_tls(true);
    }
    let servers: Vec<String> = config.url.split(',').map(|s| s.trim().to_owned()).collect();
    let addrs: Vec<async_nats::ServerAddr> =
        servers.iter().filter_map(|s| s.parse().ok()).collect();
    options
        .name(client_name)
        .custom_inbox_prefix(config.inbox_prefix.clone())
        .connection_timeout(std::time::Duration::from_secs(5))
        .connect(addrs)
        .await
        .map_err(|source| ConnectError::Connect {
            url: redact_url(&config.url),
            source,
        })
}
