//! Errors of the replication connection, typed so that [`crate::recovery`]
//! can decide what to do next.

use std::fmt;
use std::io;

use fallible_iterator::FallibleIterator;
use postgres_protocol::message::backend::ErrorFields;

/// An error of the replication connection.
///
/// Split by what to do next ([`crate::recovery::of_replication`]): retry when
/// reconnecting with backoff may succeed (network trouble, server restart,
/// too many connections); stop when it will fail again the same way until an
/// operator or the program changes something (bad password, missing slot or
/// publication, slot in use by another connection, WAL gone, malformed input).
#[derive(Debug, thiserror::Error)]
pub enum ReplicationError {
    /// Reading from or writing to the socket failed.
    #[error("i/o error on the replication connection")]
    Io(#[source] io::Error),

    /// The server closed the connection (e.g. it restarted, or it ended the
    /// walsender after `wal_sender_timeout` without feedback).
    #[error("the server closed the replication connection")]
    Closed,

    /// Connecting (TCP, TLS and authentication) took longer than the
    /// configured `connect_timeout`.
    #[error("connecting to {host}:{port} timed out")]
    ConnectTimeout {
        /// The host tried.
        host: String,
        /// The port tried.
        port: u16,
    },

    /// The host is a standby (read-only) and the connection asks for
    /// `target_session_attrs=read-write`; no host of the list was writable.
    #[error("{host}:{port} is read-only (a standby) and target_session_attrs=read-write")]
    ReadOnly {
        /// The host tried.
        host: String,
        /// The port tried.
        port: u16,
    },

    /// The server answered with an `ErrorResponse`.
    #[error("{0}")]
    Server(Box<ServerError>),

    /// The server refused a replication command (`CREATE_REPLICATION_SLOT`,
    /// `START_REPLICATION`, …) with an `ErrorResponse`: names the command and
    /// the server's version, since the commands' syntax and options depend on
    /// it. Recovery treats it like [`ReplicationError::Server`].
    #[error("`{command}` failed{}: {error}", on_version(.server_version.as_deref()))]
    Command {
        /// The command as sent (identifiers and option values only; no
        /// secrets travel in replication commands).
        command: String,
        /// `server_version` as the server reported it at startup.
        server_version: Option<String>,
        /// The server's error.
        error: Box<ServerError>,
    },

    /// The server rejected the credentials (SQLSTATE class 28, e.g. 28P01
    /// invalid_password), or our side of the exchange could not proceed.
    #[error("authentication failed for user {user:?}")]
    Auth {
        /// The user name sent in the startup message.
        user: String,
        /// Why.
        #[source]
        reason: AuthError,
    },

    /// The connection settings cannot be used for a replication connection.
    #[error("invalid replication connection settings: {0}")]
    Config(&'static str),

    /// Setting up TLS failed (handshake, certificate, or the server does not
    /// support TLS while `sslmode=require`).
    #[error("TLS with {host} failed")]
    Tls {
        /// The host name used for the handshake.
        host: String,
        /// Why.
        #[source]
        reason: TlsError,
    },

    /// The server sent something that does not follow the protocol.
    #[error("replication protocol violation: {0}")]
    Protocol(#[source] ProtocolError),
}

impl ReplicationError {
    /// The SQLSTATE of a server error (also of a server-side auth failure).
    pub fn sqlstate(&self) -> Option<&str> {
        match self {
            ReplicationError::Server(e) | ReplicationError::Command { error: e, .. } => {
                Some(&e.code)
            }
            ReplicationError::Auth {
                reason: AuthError::Rejected(e),
                ..
            } => Some(&e.code),
            _ => None,
        }
    }

    /// The server error, if this is one.
    pub fn server_error(&self) -> Option<&ServerError> {
        match self {
            ReplicationError::Server(e) | ReplicationError::Command { error: e, .. } => Some(e),
            ReplicationError::Auth {
                reason: AuthError::Rejected(e),
                ..
            } => Some(e),
            _ => None,
        }
    }
}

fn on_version(version: Option<&str>) -> String {
    version
        .map(|v| format!(" on Postgres {v}"))
        .unwrap_or_default()
}

impl From<io::Error> for ReplicationError {
    fn from(e: io::Error) -> Self {
        ReplicationError::Io(e)
    }
}

impl From<ProtocolError> for ReplicationError {
    fn from(e: ProtocolError) -> Self {
        ReplicationError::Protocol(e)
    }
}

/// Why authentication failed.
#[derive(Debug, thiserror::Error)]
pub enum AuthError {
    /// The server rejected the login (its `ErrorResponse`, SQLSTATE class 28
    /// such as 28P01 invalid_password or 28000 invalid_authorization_specification).
    #[error("{0}")]
    Rejected(Box<ServerError>),
    /// The server asked for a password and none was configured.
    #[error("the server requires a password and none is configured")]
    PasswordRequired,
    /// The server asked for an authentication method this client does not speak.
    #[error("unsupported authentication method {0}")]
    UnsupportedMethod(&'static str),
    /// The server offered only SASL mechanisms this client does not speak.
    #[error("no supported SASL mechanism offered (need SCRAM-SHA-256)")]
    NoSaslMechanism,
    /// The SCRAM exchange failed on our side (malformed server message or a
    /// server signature that does not verify: the server may not know the password).
    #[error("SCRAM exchange failed")]
    Scram(#[source] io::Error),
}

pub use sluice_postgres::TlsError;

/// The server violated the protocol, or sent bytes that we cannot decode.
#[derive(Debug, thiserror::Error)]
pub enum ProtocolError {
    /// A backend message could not be framed or parsed.
    #[error("malformed backend message")]
    Malformed(#[source] io::Error),
    /// A message arrived where the protocol does not allow it.
    #[error("unexpected message {tag:?} while {state}")]
    Unexpected {
        /// The message type byte, as a character.
        tag: char,
        /// What we were doing.
        state: &'static str,
    },
    /// A CopyData message inside the replication stream was too short or had
    /// an unknown type byte.
    #[error("malformed replication message (type {kind:?}, {len} bytes)")]
    BadCopyData {
        /// The first byte of the CopyData payload, as a character.
        kind: char,
        /// The payload length.
        len: usize,
    },
    /// A result column had a value that could not be parsed.
    #[error("unexpected value {value:?} in column {column} of the {command} result")]
    BadResult {
        /// Which command.
        command: &'static str,
        /// Which column.
        column: &'static str,
        /// The value (server metadata, never row data).
        value: Option<String>,
    },
    /// A text value in a result was not UTF-8.
    #[error("non-UTF-8 text in a result")]
    NotUtf8,
}

/// An `ErrorResponse` from the server, with its fields kept apart.
///
/// See "Error and Notice Message Fields" in the Postgres docs:
/// <https://www.postgresql.org/docs/current/protocol-error-fields.html>.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ServerError {
    /// Severity, non-localised (`ERROR`, `FATAL`, `PANIC`).
    pub severity: String,
    /// SQLSTATE code, e.g. `42704` undefined_object (missing slot),
    /// `28P01` invalid_password, `55006` object_in_use (slot active elsewhere).
    pub code: String,
    /// Primary message.
    pub message: String,
    /// Optional detail.
    pub detail: Option<String>,
    /// Optional hint.
    pub hint: Option<String>,
}

impl ServerError {
    pub(crate) fn from_fields(mut fields: ErrorFields<'_>) -> Result<Self, ProtocolError> {
        let mut severity = None;
        let mut localized_severity = None;
        let mut code = None;
        let mut message = None;
        let mut detail = None;
        let mut hint = None;
        while let Some(field) = fields.next().map_err(ProtocolError::Malformed)? {
            let value = String::from_utf8_lossy(field.value_bytes()).into_owned();
            match field.type_() {
                b'V' => severity = Some(value),
                b'S' => localized_severity = Some(value),
                b'C' => code = Some(value),
                b'M' => message = Some(value),
                b'D' => detail = Some(value),
                b'H' => hint = Some(value),
                _ => {}
            }
        }
        Ok(ServerError {
            severity: severity.or(localized_severity).unwrap_or_default(),
            code: code.unwrap_or_default(),
            message: message.unwrap_or_default(),
            detail,
            hint,
        })
    }
}

impl fmt::Display for ServerError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{} {}: {}", self.severity, self.code, self.message)?;
        if let Some(detail) = &self.detail {
            write!(f, " (detail: {detail})")?;
        }
        if let Some(hint) = &self.hint {
            write!(f, " (hint: {hint})")?;
        }
        Ok(())
    }
}

impl std::error::Error for ServerError {}
