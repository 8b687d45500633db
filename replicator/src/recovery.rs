//! What to do about a failure, decided in one place for the whole replicator.
//!
//! Every error the replicator can meet maps to one [`Recovery`]: the
//! supervisor in [`crate::run`] retries or stops with it, start-up leaves out
//! the tables it cannot replicate with it, and the replication connection
//! uses it to decide whether to try the next host. The error types stay typed (with their sources); only this module
//! looks at them to decide.
//!
//! The rule (ARCHITECTURE.md invariant 6, bad input gets a clear error):
//! retry what a reconnect may fix (network, server restarts, too many
//! connections, NATS outages, another replicator holding the slot); stop on
//! what needs an operator (credentials, configuration, missing objects,
//! malformed input), with the error chain as the message.

use std::io;

use sluice_broker::connect::ConnectError;

use crate::catalog::CatalogError;
use crate::error::RunError;
use crate::pg::PgError;
use crate::replication::{ReplicationError, ServerError, TlsError};
use crate::slot::SlotError;
use crate::snapshot::SnapshotError;
use crate::stream::{ReplayError, StreamError};

/// What to do about a failure.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Recovery {
    /// Reconnect with capped exponential backoff and start again from the
    /// confirmed LSN: nothing acknowledged is lost, nothing re-sent is
    /// duplicated.
    Retry,
    /// The table's chain can no longer be trusted: resync it from a fresh
    /// snapshot on a new chain. Today only a lost slot ([`crate::slot::SlotLost`])
    /// leads here, for every table at once (the slot is recreated and every
    /// table snapshotted again, reason `slot_lost`); no error maps to it
    /// (WAL removed on the walsender, `58P01`, stops).
    ResyncTable,
    /// This table cannot be replicated (e.g. no replica identity): mark it
    /// failed with the reason (`sluice_replicator_table_errors`) and go on
    /// with the others. Where no table is at hand (the error reached the
    /// supervisor), it stops like [`Recovery::Stop`].
    FailTable,
    /// Exit with a clear message: an operator must act (credentials,
    /// configuration, missing objects, malformed input).
    Stop,
}

/// The recovery of a failure of `sluice-replicator run`.
pub fn recovery(error: &RunError) -> Recovery {
    match error {
        RunError::Pg(e) => of_pg(e),
        RunError::Catalog(e) => of_catalog(e),
        RunError::Replication(e) => of_replication(e),
        RunError::Stream(e) => of_stream(e),
        RunError::Snapshot(e) => of_snapshot(e),
        // NATS unreachable, restarting or slow.
        RunError::NatsConnect(ConnectError::Connect { .. })
        | RunError::Topology(_)
        | RunError::StreamRead(_)
        | RunError::ControlSubjects { .. }
        | RunError::Publish(_) => Recovery::Retry,
        // Configuration: a credentials or password file that cannot be
        // read, a password without a user. Retrying cannot fix them.
        RunError::NatsConnect(
            ConnectError::Credentials { .. }
            | ConnectError::PasswordFile(_)
            | ConnectError::MissingUser(_)
            | ConnectError::Refused { .. }
            | ConnectError::Certificate { .. },
        ) => Recovery::Stop,
        // Another replicator holds the slot: wait as a standby.
        RunError::Slot(SlotError::Busy { .. }) => Recovery::Retry,
        RunError::Slot(SlotError::WrongPlugin { .. } | SlotError::OtherDatabase { .. })
        | RunError::NothingToReplicate { .. }
        | RunError::Metrics { .. }
        | RunError::SpillDir { .. }
        | RunError::Recorder(_) => Recovery::Stop,
    }
}

/// Failures of the streaming loop.
pub fn of_stream(error: &StreamError) -> Recovery {
    match error {
        StreamError::Replication(e) => of_replication(e),
        StreamError::Publish(_) | StreamError::Ended | StreamError::Subscribe(_) => Recovery::Retry,
        StreamError::Catalog(e) => of_catalog(e),
        StreamError::Backlog(e) => match e {
            PgError::Sql { .. } => of_backlog_sqlstate(e.sqlstate()),
            _ => of_pg(e),
        },
        // A catalog race (relation message seen before we know it) heals on restart.
        StreamError::UnknownRelation { .. } => Recovery::Retry,
        // A full disk may empty; the restart streams the transaction again.
        StreamError::Spill(_) | StreamError::Replay(ReplayError::Io(_)) => Recovery::Retry,
        StreamError::Decode { .. }
        | StreamError::NestedStreamMessage { .. }
        | StreamError::Replay(ReplayError::Decode { .. }) => Recovery::Stop,
    }
}

/// Failures of a snapshot (initial or resync).
pub fn of_snapshot(error: &SnapshotError) -> Recovery {
    match error {
        SnapshotError::Pg(e) => of_pg(e),
        SnapshotError::Catalog(e) => of_catalog(e),
        SnapshotError::Session { source, .. } => of_replication(source),
        SnapshotError::Publish(_)
        | SnapshotError::ReaderLost(_)
        | SnapshotError::Rewritten(_)
        | SnapshotError::ResyncSlot { .. } => Recovery::Retry,
        SnapshotError::Copy { .. } => Recovery::Stop,
    }
}

/// Catalog reads: a query that failed without a server error (connection
/// lost) is retried; everything else needs an operator to change the
/// database or the configuration, and a table without replica identity is
/// left out on its own.
pub fn of_catalog(error: &CatalogError) -> Recovery {
    match error {
        CatalogError::Query { source, .. } if source.as_db_error().is_none() => Recovery::Retry,
        error if error.concerns_one_table() => Recovery::FailTable,
        CatalogError::NoReplicaIdentity { .. }
        | CatalogError::Query { .. }
        | CatalogError::TypeNotFound { .. }
        | CatalogError::TypeNotResolved { .. }
        | CatalogError::TypeChainTooDeep { .. }
        | CatalogError::TableNotFound { .. }
        | CatalogError::PublicationNotFound { .. } => Recovery::Stop,
    }
}

/// SQL connections: connection-level failures are worth a reconnect; SQL
/// errors with a definite SQLSTATE (permission, missing object) are not.
pub fn of_pg(error: &PgError) -> Recovery {
    match error {
        PgError::Url(_) | PgError::PasswordFile(_) | PgError::Tls(_) => Recovery::Stop,
        // An untrusted server certificate (unknown CA, wrong host name) stays
        // untrusted however often we retry.
        PgError::Sql { .. } if error.is_certificate_failure() => Recovery::Stop,
        PgError::Sql { .. } => of_sqlstate(error.sqlstate()),
    }
}

/// An SQL statement that failed with `code` (`None`: no answer from the
/// server, the connection failed): connection exceptions (class 08),
/// insufficient resources (class 53), operator intervention (57P*) and
/// serialization failures (40001) are retried.
fn of_sqlstate(code: Option<&str>) -> Recovery {
    match code {
        None => Recovery::Retry,
        Some(code)
            if code.starts_with("08")
                || code.starts_with("53")
                || code.starts_with("57P")
                || code == "40001" =>
        {
            Recovery::Retry
        }
        Some(_) => Recovery::Stop,
    }
}

/// A backlog statement that failed with `code`: as [`of_sqlstate`], and
/// "slot is active" (55006) when another replicator took the slot between
/// two chunks is retried too: this one restarts as a standby.
fn of_backlog_sqlstate(code: Option<&str>) -> Recovery {
    match code {
        Some("55006") => Recovery::Retry,
        code => of_sqlstate(code),
    }
}

/// The replication connection: retry on network trouble, a server restart
/// or too many connections; stop when retrying fails again the same way
/// until an operator changes something (bad password, missing slot or
/// publication, slot in use by another connection, WAL gone, malformed
/// input).
pub fn of_replication(error: &ReplicationError) -> Recovery {
    match error {
        ReplicationError::Io(_)
        | ReplicationError::Closed
        | ReplicationError::ConnectTimeout { .. }
        // A failover in progress: a standby is promoted soon.
        | ReplicationError::ReadOnly { .. } => Recovery::Retry,
        ReplicationError::Server(e) | ReplicationError::Command { error: e, .. } => of_server(e),
        // A handshake cut off by the network is worth retrying; a certificate
        // that does not verify (InvalidData from rustls) is not.
        ReplicationError::Tls {
            reason: TlsError::Io(e),
            ..
        } if e.kind() != io::ErrorKind::InvalidData => Recovery::Retry,
        ReplicationError::Tls { .. }
        | ReplicationError::Auth { .. }
        | ReplicationError::Config(_)
        | ReplicationError::Protocol(_) => Recovery::Stop,
    }
}

/// An `ErrorResponse` on the replication connection: connection exceptions
/// (class 08), server shutting down or starting (57P01..57P03), insufficient
/// resources (class 53, e.g. too many connections), internal I/O errors
/// (58000, 58030) and serialization failures or deadlocks (40001, 40P01) are
/// retried. `58P01` (requested WAL segment removed) stops: the slot cannot
/// continue. `55006` (slot active elsewhere) stops here; the supervisor sees
/// a busy slot earlier, through `pg_replication_slots` ([`SlotError::Busy`]).
fn of_server(error: &ServerError) -> Recovery {
    let code = error.code.as_str();
    if code.starts_with("08")
        || code.starts_with("53")
        || matches!(
            code,
            "57P01" | "57P02" | "57P03" | "58000" | "58030" | "40001" | "40P01"
        )
    {
        Recovery::Retry
    } else {
        Recovery::Stop
    }
}

#[cfg(test)]
mod tests {
    use std::io;
    use std::str::FromStr;

    use sluice_broker::TableName;

    use super::*;
    use crate::pgoutput::DecodeError;
    use crate::replication::{AuthError, Lsn, ProtocolError};

    /// A `tokio_postgres::Error` without a server answer (a connection-level
    /// failure as far as the code is concerned).
    fn no_answer() -> tokio_postgres::Error {
        tokio_postgres::Config::from_str("host=h port=notaport").unwrap_err()
    }

    fn server(code: &str) -> ReplicationError {
        ReplicationError::Server(Box::new(ServerError {
            severity: "ERROR".to_owned(),
            code: code.to_owned(),
            message: "m".to_owned(),
            detail: None,
            hint: None,
        }))
    }

    fn publish_error() -> sluice_broker::publish::PublishError {
        sluice_broker::publish::PublishError::Ack {
            subject: "s".to_owned(),
            source: async_nats::jetstream::context::PublishErrorKind::TimedOut.into(),
        }
    }

    use Recovery::{FailTable, Retry, Stop};

    #[test]
    fn replication_errors() {
        let io = || io::Error::from(io::ErrorKind::ConnectionReset);
        assert_eq!(of_replication(&ReplicationError::Io(io())), Retry);
        assert_eq!(of_replication(&ReplicationError::Closed), Retry);
        let timeout = ReplicationError::ConnectTimeout {
            host: "h".to_owned(),
            port: 5432,
        };
        assert_eq!(of_replication(&timeout), Retry);
        for code in [
            "08006", "53300", "57P01", "57P02", "57P03", "58000", "58030", "40001", "40P01",
        ] {
            assert_eq!(of_replication(&server(code)), Retry, "{code}");
        }
        // Missing slot, slot in use, WAL removed, invalidated slot,
        // permission, database dropped.
        for code in ["42704", "55006", "58P01", "55000", "42501", "57P04"] {
            assert_eq!(of_replication(&server(code)), Stop, "{code}");
        }
        // A refused command is classified by its server error alone.
        let command = |code: &str| {
            let ReplicationError::Server(error) = server(code) else {
                unreachable!()
            };
            ReplicationError::Command {
                command: "CREATE_REPLICATION_SLOT \"s\" LOGICAL pgoutput EXPORT_SNAPSHOT"
                    .to_owned(),
                server_version: Some("13.23".to_owned()),
                error,
            }
        };
        assert_eq!(of_replication(&command("42601")), Stop);
        assert_eq!(of_replication(&command("57P01")), Retry);
        assert_eq!(command("42601").sqlstate(), Some("42601"));
        assert_eq!(
            command("42601").to_string(),
            "`CREATE_REPLICATION_SLOT \"s\" LOGICAL pgoutput EXPORT_SNAPSHOT` failed on Postgres 13.23: ERROR 42601: m"
        );
        let tls = |reason| ReplicationError::Tls {
            host: "h".to_owned(),
            reason,
        };
        assert_eq!(of_replication(&tls(TlsError::Io(io()))), Retry);
        let bad_certificate = io::Error::new(io::ErrorKind::InvalidData, "unknown issuer");
        assert_eq!(of_replication(&tls(TlsError::Io(bad_certificate))), Stop);
        assert_eq!(of_replication(&tls(TlsError::NotSupported)), Stop);
        let auth = ReplicationError::Auth {
            user: "u".to_owned(),
            reason: AuthError::PasswordRequired,
        };
        assert_eq!(of_replication(&auth), Stop);
        assert_eq!(of_replication(&ReplicationError::Config("x")), Stop);
        let protocol = ReplicationError::Protocol(ProtocolError::NotUtf8);
        assert_eq!(of_replication(&protocol), Stop);
    }

    #[test]
    fn sql_errors() {
        let sql = PgError::Sql {
            what: "w".to_owned(),
            source: no_answer(),
        };
        assert_eq!(of_pg(&sql), Retry);
        assert_eq!(of_pg(&PgError::Url(no_answer())), Stop);
        let file = io::Error::from(io::ErrorKind::NotFound);
        assert_eq!(of_pg(&PgError::PasswordFile(file)), Stop);
        assert_eq!(of_pg(&PgError::Tls(TlsError::InvalidServerName)), Stop);
        assert_eq!(of_sqlstate(None), Retry);
        for code in ["08006", "53300", "57P01", "57P04", "40001"] {
            assert_eq!(of_sqlstate(Some(code)), Retry, "{code}");
        }
        for code in ["42P01", "42501", "55006", "40P01", "58P01"] {
            assert_eq!(of_sqlstate(Some(code)), Stop, "{code}");
        }
        // Reading a backlog, a slot taken by another replicator is waited for.
        assert_eq!(of_backlog_sqlstate(Some("55006")), Retry);
        assert_eq!(of_backlog_sqlstate(Some("08006")), Retry);
        assert_eq!(of_backlog_sqlstate(Some("42501")), Stop);
    }

    #[test]
    fn catalog_errors() {
        let query = CatalogError::Query {
            what: "w",
            source: no_answer(),
        };
        assert_eq!(of_catalog(&query), Retry);
        let no_identity = CatalogError::NoReplicaIdentity {
            table: TableName::new("s", "t"),
        };
        assert_eq!(of_catalog(&no_identity), FailTable);
        for error in [
            CatalogError::TypeNotFound { oid: 1 },
            CatalogError::TypeNotResolved { oid: 1 },
            CatalogError::TypeChainTooDeep { oid: 1 },
            CatalogError::TableNotFound {
                table: TableName::new("s", "t"),
            },
            CatalogError::PublicationNotFound {
                publication: "p".to_owned(),
            },
        ] {
            assert_eq!(of_catalog(&error), Stop, "{error}");
        }
    }

    #[test]
    fn stream_errors() {
        assert_eq!(of_stream(&StreamError::Replication(server("08006"))), Retry);
        assert_eq!(of_stream(&StreamError::Replication(server("58P01"))), Stop);
        assert_eq!(of_stream(&StreamError::Publish(publish_error())), Retry);
        assert_eq!(of_stream(&StreamError::Ended), Retry);
        let subscribe =
            async_nats::SubscribeError::new(async_nats::SubscribeErrorKind::InvalidSubject);
        assert_eq!(of_stream(&StreamError::Subscribe(subscribe)), Retry);
        let unknown = StreamError::UnknownRelation {
            oid: 1,
            lsn: Lsn(1),
        };
        assert_eq!(of_stream(&unknown), Retry);
        let backlog = StreamError::Backlog(PgError::Sql {
            what: "w".to_owned(),
            source: no_answer(),
        });
        assert_eq!(of_stream(&backlog), Retry);
        let backlog_url = StreamError::Backlog(PgError::Url(no_answer()));
        assert_eq!(of_stream(&backlog_url), Stop);
        let decode = StreamError::Decode {
            lsn: Lsn(1),
            source: DecodeError::Empty,
        };
        assert_eq!(of_stream(&decode), Stop);
        assert_eq!(
            of_stream(&StreamError::NestedStreamMessage { lsn: Lsn(1) }),
            Stop
        );
        let replay = StreamError::Replay(ReplayError::Decode {
            lsn: Lsn(1),
            source: DecodeError::Empty,
        });
        assert_eq!(of_stream(&replay), Stop);
        let spill = StreamError::Spill(crate::stream::SpillError::Io {
            dir: "/nonexistent".into(),
            source: std::io::Error::other("disk full"),
        });
        assert_eq!(of_stream(&spill), Retry);
        let no_identity = StreamError::Catalog(CatalogError::NoReplicaIdentity {
            table: TableName::new("s", "t"),
        });
        assert_eq!(of_stream(&no_identity), FailTable);
    }

    #[test]
    fn snapshot_errors() {
        assert_eq!(of_snapshot(&SnapshotError::Publish(publish_error())), Retry);
        assert_eq!(
            of_snapshot(&SnapshotError::ReaderLost("t".to_owned())),
            Retry
        );
        let slot = SnapshotError::ResyncSlot {
            table: "s.t".to_owned(),
            source: ReplicationError::Closed,
        };
        assert_eq!(of_snapshot(&slot), Retry);
        let copy = SnapshotError::Copy {
            table: "t".to_owned(),
            row: 1,
        };
        assert_eq!(of_snapshot(&copy), Stop);
        let pg = SnapshotError::Pg(PgError::Url(no_answer()));
        assert_eq!(of_snapshot(&pg), Stop);
    }

    #[test]
    fn run_errors() {
        assert_eq!(
            recovery(&RunError::Replication(ReplicationError::Closed)),
            Retry
        );
        assert_eq!(recovery(&RunError::Stream(StreamError::Ended)), Retry);
        assert_eq!(recovery(&RunError::Publish(publish_error())), Retry);
        let read = crate::packager::StreamReadError {
            subject: "s".to_owned(),
            source: async_nats::jetstream::stream::LastRawMessageErrorKind::Other.into(),
        };
        assert_eq!(recovery(&RunError::StreamRead(read)), Retry);
        let topology = sluice_broker::topology::TopologyError::Create {
            stream: "s".to_owned(),
            source: async_nats::jetstream::context::CreateStreamErrorKind::TimedOut.into(),
        };
        assert_eq!(recovery(&RunError::Topology(topology)), Retry);
        let unreachable = ConnectError::Connect {
            url: "nats://localhost:4222".to_owned(),
            source: async_nats::ConnectError::new(async_nats::ConnectErrorKind::Io),
        };
        assert_eq!(recovery(&RunError::NatsConnect(unreachable)), Retry);
        // NATS configuration errors stop: a retry cannot fix them.
        let file = || io::Error::from(io::ErrorKind::NotFound);
        for config in [
            ConnectError::Credentials {
                path: "/etc/sluice/replicator.creds".into(),
                source: file(),
            },
            ConnectError::PasswordFile(file()),
            ConnectError::MissingUser("password"),
            ConnectError::Refused {
                url: "nats://h".into(),
                source: async_nats::ConnectError::new(
                    async_nats::ConnectErrorKind::AuthorizationViolation,
                ),
            },
            ConnectError::Certificate {
                url: "tls://h".into(),
                source: async_nats::ConnectError::new(async_nats::ConnectErrorKind::Tls),
            },
        ] {
            let error = RunError::NatsConnect(config);
            assert_eq!(recovery(&error), Stop, "{error:?}");
        }
        let busy = SlotError::Busy {
            slot: "s".to_owned(),
            pid: Some(1),
        };
        assert_eq!(recovery(&RunError::Slot(busy)), Retry);
        let plugin = SlotError::WrongPlugin {
            slot: "s".to_owned(),
            plugin: None,
        };
        assert_eq!(recovery(&RunError::Slot(plugin)), Stop);
        let elsewhere = SlotError::OtherDatabase {
            slot: "s".to_owned(),
            database: Some("other".to_owned()),
        };
        assert!(
            elsewhere
                .to_string()
                .contains("another database (\"other\")")
        );
        assert_eq!(recovery(&RunError::Slot(elsewhere)), Stop);
        let nothing = RunError::NothingToReplicate {
            publication: "p".to_owned(),
        };
        assert_eq!(recovery(&nothing), Stop);
        let metrics = RunError::Metrics {
            listen: "127.0.0.1:9".parse().unwrap(),
            source: io::Error::from(io::ErrorKind::AddrInUse),
        };
        assert_eq!(recovery(&metrics), Stop);
        let pg = RunError::Pg(PgError::Sql {
            what: "w".to_owned(),
            source: no_answer(),
        });
        assert_eq!(recovery(&pg), Retry);
        let snapshot = RunError::Snapshot(SnapshotError::Copy {
            table: "t".to_owned(),
            row: 1,
        });
        assert_eq!(recovery(&snapshot), Stop);
    }
}
