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
    /// A certificate was refused: the server's by us (not signed by a
    /// trusted CA, wrong host name, expired) or ours, or its absence, by the
    /// server (mutual TLS). A retry with the same configuration cannot succeed.
    #[error("TLS to NATS at {url} failed on a certificate")]
    Certificate {
        /// Redacted: no password or token.
        url: String,
        #[source]
        source: async_nats::ConnectError,
    },
    /// The server refused our credentials (wrong password, unknown user or
    /// key): a retry with the same configuration cannot succeed.
    #[error("NATS at {url} refused the configured credentials")]
    Refused {
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
    let (addrs, url_credentials) = servers_without_credentials(&config.url);
    match url_credentials {
        Some(UrlCredentials::UserPassword(user, password)) if config.user.is_none() => {
            options = options.user_and_password(user, password);
        }
        Some(UrlCredentials::Token(token)) if config.token.is_none() => {
            options = options.token(token);
        }
        _ => {}
    }
    options
        .name(client_name)
        .custom_inbox_prefix(config.inbox_prefix.clone())
        .connection_timeout(std::time::Duration::from_secs(5))
        .connect(addrs)
        .await
        .map_err(|source| {
            let url = redact_url(&config.url);
            match source.kind() {
                async_nats::ConnectErrorKind::AuthorizationViolation
                | async_nats::ConnectErrorKind::Authentication => {
                    ConnectError::Refused { url, source }
                }
                _ if crate::tls::is_certificate_failure(&source) => {
                    ConnectError::Certificate { url, source }
                }
                _ => ConnectError::Connect { url, source },
            }
        })
}

/// Credentials given in a server URL: `nats://user:password@host` or `nats://token@host`.
#[derive(Debug, PartialEq, Eq)]
enum UrlCredentials {
    UserPassword(String, String),
    Token(String),
}

/// The server addresses of `urls` (comma-separated) with their credentials taken out, and the
/// first URL's credentials. async-nats neither authenticates with a URL's credentials nor keeps
/// them out of its debug log (it logs each address with its `Debug`, password included), so
/// they go through [`ConnectOptions`] instead (`nats.user` and `nats.token` take precedence).
fn servers_without_credentials(
    urls: &str,
) -> (Vec<async_nats::ServerAddr>, Option<UrlCredentials>) {
    let mut credentials = None;
    let mut addrs = Vec::new();
    for one in urls.split(',').map(str::trim).filter(|s| !s.is_empty()) {
        let Ok(addr) = one.parse::<async_nats::ServerAddr>() else {
            continue;
        };
        let mut url = addr.into_inner();
        if !url.username().is_empty() {
            let user = percent_decode(url.username());
            let found = match url.password() {
                Some(password) => UrlCredentials::UserPassword(user, percent_decode(password)),
                None => UrlCredentials::Token(user),
            };
            credentials.get_or_insert(found);
            let _ = url.set_password(None);
            let _ = url.set_username("");
        }
        if let Ok(addr) = async_nats::ServerAddr::from_url(url) {
            addrs.push(addr);
        }
    }
    (addrs, credentials)
}

/// `%XX` escapes of a URL's user or password decoded (invalid escapes are kept as they are).
fn percent_decode(text: &str) -> String {
    let bytes = text.as_bytes();
    let mut out = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while i < bytes.len() {
        let hex = |b: u8| (b as char).to_digit(16);
        if bytes[i] == b'%'
            && let (Some(Some(hi)), Some(Some(lo))) = (
                bytes.get(i + 1).map(|&b| hex(b)),
                bytes.get(i + 2).map(|&b| hex(b)),
            )
        {
            out.push((hi * 16 + lo) as u8);
            i += 3;
        } else {
            out.push(bytes[i]);
            i += 1;
        }
    }
    String::from_utf8_lossy(&out).into_owned()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn url_credentials_are_taken_out_of_the_server_addresses() {
        let (addrs, credentials) =
            servers_without_credentials("nats://producer:p%40ss@a:4222, tls://b:4223");
        assert_eq!(
            credentials,
            Some(UrlCredentials::UserPassword(
                "producer".into(),
                "p@ss".into()
            ))
        );
        let urls: Vec<&str> = addrs.iter().map(|a| a.as_url_str()).collect();
        assert_eq!(urls, ["nats://a:4222", "tls://b:4223"]);
        assert!(!format!("{addrs:?}").contains("p%40ss"));

        let (addrs, credentials) = servers_without_credentials("nats://s3cret@a:4222");
        assert_eq!(credentials, Some(UrlCredentials::Token("s3cret".into())));
        assert!(!format!("{addrs:?}").contains("s3cret"));

        let (addrs, credentials) = servers_without_credentials("a:4222");
        assert_eq!(credentials, None);
        assert_eq!(addrs[0].as_url_str(), "nats://a:4222");
    }
}
