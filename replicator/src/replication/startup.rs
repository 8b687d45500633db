//! Opening a session: TLS negotiation (`SSLRequest`), the startup message
//! (with `replication=database` for a replication session), and authentication
//! (trust, cleartext, md5, SCRAM-SHA-256).

use bytes::BytesMut;
use fallible_iterator::FallibleIterator;
use postgres_protocol::authentication::{md5_hash, sasl};
use postgres_protocol::message::backend::Message;
use postgres_protocol::message::frontend;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

use super::error::{AuthError, ProtocolError, ReplicationError, TlsError};
use super::wire::{AsyncIo, Connection, server_error, unexpected};
use sluice_postgres::tls::{self, SslMode, TlsOptions};

pub(super) async fn negotiate_tls(
    mut tcp: TcpStream,
    host: &str,
    options: &TlsOptions,
) -> Result<Box<dyn AsyncIo>, ReplicationError> {
    if options.mode == SslMode::Disable {
        return Ok(Box::new(tcp));
    }
    let tls_err = |reason| ReplicationError::Tls {
        host: host.to_owned(),
        reason,
    };
    let config = tls::client_config(options).map_err(tls_err)?;
    let name = tls::server_name(host).map_err(tls_err)?;
    let mut buf = BytesMut::new();
    frontend::ssl_request(&mut buf);
    tcp.write_all(&buf).await?;
    // Exactly one byte: anything after it must come through TLS.
    let answer = tcp.read_u8().await?;
    match answer {
        b'S' => {
            let stream = tokio_rustls::TlsConnector::from(config)
                .connect(name, tcp)
                .await
                .map_err(|e| tls_err(TlsError::Io(e)))?;
            Ok(Box::new(stream))
        }
        b'N' if options.mode == SslMode::Prefer => Ok(Box::new(tcp)),
        b'N' => Err(tls_err(TlsError::NotSupported)),
        other => Err(ProtocolError::Unexpected {
            tag: char::from(other),
            state: "negotiating TLS",
        }
        .into()),
    }
}

/// What a session is for: the startup message differs.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Session {
    /// `replication=database`: a walsender, which takes replication commands.
    Replication,
    /// An ordinary backend, for plain SQL (a snapshot reader's `COPY`).
    Sql,
}

/// Startup message, authentication, and the wait for `ReadyForQuery`.
/// Returns the backend pid.
pub(super) async fn startup(
    conn: &mut Connection,
    config: &tokio_postgres::Config,
    session: Session,
) -> Result<i32, ReplicationError> {
    let user = config
        .get_user()
        .ok_or(ReplicationError::Config("no user configured"))?;
    let mut params = vec![
        ("user", user),
        ("database", config.get_dbname().unwrap_or(user)),
        ("client_encoding", "UTF8"),
        (
            "application_name",
            config.get_application_name().unwrap_or("sluice"),
        ),
    ];
    if session == Session::Replication {
        params.push(("replication", "database"));
    }
    if let Some(options) = config.get_options() {
        params.push(("options", options));
    }
    frontend::startup_message(params.iter().copied(), &mut conn.write_buf)
        .map_err(|_| ReplicationError::Config("connection parameter contains a NUL byte"))?;
    conn.flush().await?;

    let auth_err = |reason| ReplicationError::Auth {
        user: user.to_owned(),
        reason,
    };
    let password = || {
        config
            .get_password()
            .ok_or(auth_err(AuthError::PasswordRequired))
    };
    let mut scram: Option<sasl::ScramSha256> = None;
    loop {
        match conn.read_message("authenticating").await? {
            Message::AuthenticationOk => break,
            Message::AuthenticationCleartextPassword => {
                frontend::password_message(password()?, &mut conn.write_buf)?;
                conn.flush().await?;
            }
            Message::AuthenticationMd5Password(body) => {
                let hash = md5_hash(user.as_bytes(), password()?, body.salt());
                frontend::password_message(hash.as_bytes(), &mut conn.write_buf)?;
                conn.flush().await?;
            }
            Message::AuthenticationSasl(body) => {
                let mut has_scram = false;
                let mut mechanisms = body.mechanisms();
                while let Some(mechanism) = mechanisms.next().map_err(ProtocolError::Malformed)? {
                    has_scram |= mechanism == sasl::SCRAM_SHA_256;
                }
                if !has_scram {
                    return Err(auth_err(AuthError::NoSaslMechanism));
                }
                // "n": we do not do channel binding (SCRAM-SHA-256-PLUS is
                // only offered over TLS, and plain SCRAM is accepted there).
                let exchange =
                    sasl::ScramSha256::new(password()?, sasl::ChannelBinding::unsupported());
                frontend::sasl_initial_response(
                    sasl::SCRAM_SHA_256,
                    exchange.message(),
                    &mut conn.write_buf,
                )?;
                conn.flush().await?;
                scram = Some(exchange);
            }
            Message::AuthenticationSaslContinue(body) => {
                let exchange = scram.as_mut().ok_or(ProtocolError::Unexpected {
                    tag: 'R',
                    state: "authenticating (SASL continue without start)",
                })?;
                exchange
                    .update(body.data())
                    .map_err(|e| auth_err(AuthError::Scram(e)))?;
                frontend::sasl_response(exchange.message(), &mut conn.write_buf)?;
                conn.flush().await?;
            }
            Message::AuthenticationSaslFinal(body) => {
                let exchange = scram.as_mut().ok_or(ProtocolError::Unexpected {
                    tag: 'R',
                    state: "authenticating (SASL final without start)",
                })?;
                exchange
                    .finish(body.data())
                    .map_err(|e| auth_err(AuthError::Scram(e)))?;
            }
            Message::AuthenticationGss | Message::AuthenticationGssContinue(_) => {
                return Err(auth_err(AuthError::UnsupportedMethod("GSSAPI")));
            }
            Message::AuthenticationSspi => {
                return Err(auth_err(AuthError::UnsupportedMethod("SSPI")));
            }
            Message::AuthenticationKerberosV5 => {
                return Err(auth_err(AuthError::UnsupportedMethod("Kerberos V5")));
            }
            Message::AuthenticationScmCredential => {
                return Err(auth_err(AuthError::UnsupportedMethod("SCM credential")));
            }
            Message::ErrorResponse(body) => {
                let e = server_error(&body);
                return Err(if e.code.starts_with("28") {
                    auth_err(AuthError::Rejected(e))
                } else {
                    ReplicationError::Server(e)
                });
            }
            other => return Err(unexpected(&other, "authenticating")),
        }
    }

    let mut backend_pid = 0;
    loop {
        match conn.read_message("starting up").await? {
            Message::BackendKeyData(body) => backend_pid = body.process_id(),
            Message::ReadyForQuery(_) => return Ok(backend_pid),
            Message::ErrorResponse(body) => {
                return Err(ReplicationError::Server(server_error(&body)));
            }
            other => return Err(unexpected(&other, "starting up")),
        }
    }
}
