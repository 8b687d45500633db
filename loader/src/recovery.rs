//! What the loader does about each error: the four actions of
//! ARCHITECTURE.md "Recovery model", and the one place that maps the
//! loader's errors to them.
//!
//! [`Recovery::of`] decides for an error that ended a batch or a run (the
//! supervise loop, the batch retry loop, the ClickHouse connect loop);
//! [`Recovery::of_insert`] for a ClickHouse error on one table's steps of a
//! batch, where a definite failure costs that table a resync instead of
//! stopping the loader. Both rest on the same rule for ClickHouse errors
//! ([`clickhouse_transient`]): transient errors are retried with nothing
//! acked (ARCHITECTURE.md invariant 1), all others are definite (retrying
//! the same bytes cannot succeed).

use sluice_broker::connect::ConnectError;

use crate::clickhouse::{Error as ChError, ResponseCode};
use crate::error::{ApplyError, RunError};

/// What to do about an error.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Recovery {
    /// Back off and retry the batch (or reconnect and start over); nothing
    /// was acked, so the retry replays from the last durable point.
    Retry,
    /// Dead-letter the table's packages of the batch, block the table and
    /// ask the replicator to resync it; the other tables go on.
    ResyncTable,
    /// This table cannot be loaded: mark it failed with a reason, the others
    /// go on. (No loader error maps here yet: a table that cannot be
    /// replicated is failed by the replicator, which never publishes it.)
    FailTable,
    /// Exit with a clear message: operator action is needed.
    Stop,
}

impl Recovery {
    /// The action for an error that ended a batch, the ClickHouse
    /// connection, or the run.
    pub fn of(error: &RunError) -> Recovery {
        match error {
            // NATS unreachable, restarting or slow.
            RunError::NatsConnect(ConnectError::Connect { .. })
            | RunError::Consumer { .. }
            | RunError::ConsumerReset { .. }
            | RunError::Fetch { .. }
            | RunError::Ack(_)
            | RunError::StreamInfo { .. }
            | RunError::CatchUp { .. } => Recovery::Retry,
            // Two loaders of one name would take each other's place for ever.
            RunError::Share(crate::share::ShareError::Replaced { .. }) => Recovery::Stop,
            // Waiting for the replicator's bucket, NATS away, or membership
            // not renewed in time: join again.
            RunError::Share(_) => Recovery::Retry,
            RunError::Apply(error) => match error {
                // Positions, schema or connection: a definite ClickHouse
                // error here is not one table's to pay for.
                ApplyError::ClickHouse(error) if clickhouse_transient(error) => Recovery::Retry,
                ApplyError::ClickHouse(_) => Recovery::Stop,
                ApplyError::Client(_) => Recovery::Stop,
                // Nothing was acked; the dead letters are sent again.
                ApplyError::DeadLetter(_) => Recovery::Retry,
            },
            // Configuration: a credentials or password file that cannot be
            // read, a password without a user.
            RunError::NatsConnect(
                ConnectError::Credentials { .. }
                | ConnectError::PasswordFile(_)
                | ConnectError::MissingUser(_)
                | ConnectError::Refused { .. }
                | ConnectError::Certificate { .. },
            ) => Recovery::Stop,
            RunError::Metrics { .. } | RunError::Recorder(_) => Recovery::Stop,
        }
    }

    /// The action for a ClickHouse error while applying one table's steps of
    /// a batch: [`Recovery::Retry`], [`Recovery::ResyncTable`], or
    /// [`Recovery::Stop`] when the loader's ClickHouse user lacks a grant or
    /// cannot log in (a resync would hit the same wall, forever).
    pub fn of_insert(error: &ChError) -> Recovery {
        if clickhouse_transient(error) {
            Recovery::Retry
        } else if matches!(
            error.response_code(),
            Some(ResponseCode::Server(code)) if ACCESS_CODES.contains(&code)
        ) {
            Recovery::Stop
        } else {
            Recovery::ResyncTable
        }
    }
}

/// ClickHouse exception codes that mean "try again later" (overload,
/// timeouts, replicas or Keeper temporarily unavailable, an insert whose
/// outcome is unknown — safe to repeat because inserts are idempotent).
const TRANSIENT_SERVER_CODES: &[u32] = &[
    3,   // UNEXPECTED_END_OF_FILE (connection cut mid-request)
    159, // TIMEOUT_EXCEEDED
    164, // READONLY (replica in read-only mode, e.g. Keeper session lost)
    202, // TOO_MANY_SIMULTANEOUS_QUERIES
    203, // NO_FREE_CONNECTION
    209, // SOCKET_TIMEOUT
    210, // NETWORK_ERROR
    236, // ABORTED
    241, // MEMORY_LIMIT_EXCEEDED
    242, // TABLE_IS_READ_ONLY
    252, // TOO_MANY_PARTS
    285, // TOO_FEW_LIVE_REPLICAS
    319, // UNKNOWN_STATUS_OF_INSERT
    394, // QUERY_WAS_CANCELLED
    425, // SYSTEM_ERROR
    439, // CANNOT_SCHEDULE_TASK
    473, // DEADLOCK_AVOIDED
    999, // KEEPER_EXCEPTION
];

/// ClickHouse exception codes that mean "the loader's user may not do this":
/// an operator must grant or fix the login (README "Security").
const ACCESS_CODES: &[u32] = &[
    192, // UNKNOWN_USER
    193, // WRONG_PASSWORD
    194, // REQUIRED_PASSWORD
    497, // ACCESS_DENIED
    516, // AUTHENTICATION_FAILED
];

/// Whether repeating the same ClickHouse request later may succeed.
fn clickhouse_transient(error: &ChError) -> bool {
    use clickhouse::error::Error as E;
    match error {
        // An untrusted certificate (theirs or ours) stays untrusted.
        ChError::ClickHouse { source, .. }
            if sluice_postgres::tls::is_certificate_failure(source) =>
        {
            false
        }
        ChError::ClickHouse { source, .. } => match source {
            E::Network(_) | E::TimedOut | E::Other(_) => true,
            E::BadResponse(_) => match error.response_code() {
                Some(ResponseCode::Server(code)) => TRANSIENT_SERVER_CODES.contains(&code),
                // A client error (4xx) stays one; 5xx is a server or proxy
                // in trouble.
                Some(ResponseCode::Http(status)) => !(400..500).contains(&status),
                // No code at all: a proxy's error page.
                None => true,
            },
            _ => false,
        },
        ChError::Value { .. }
        | ChError::RowShape { .. }
        | ChError::Response(_)
        | ChError::Decode(_)
        | ChError::NoKey(_)
        | ChError::TargetMissing { .. }
        | ChError::SchemaChange { .. } => false,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn an_untrusted_clickhouse_certificate_stops_and_a_refused_connection_retries() {
        let wrapped = |inner: std::io::Error| ChError::ClickHouse {
            what: "create database",
            source: clickhouse::error::Error::Network(Box::new(std::io::Error::other(inner))),
        };
        let untrusted = wrapped(std::io::Error::new(
            std::io::ErrorKind::InvalidData,
            rustls::Error::InvalidCertificate(rustls::CertificateError::UnknownIssuer),
        ));
        let refused = wrapped(std::io::Error::from(std::io::ErrorKind::ConnectionRefused));
        // Mutual TLS: the server wants a client certificate we did not send.
        let no_client_cert = wrapped(std::io::Error::other(rustls::Error::AlertReceived(
            rustls::AlertDescription::CertificateRequired,
        )));
        let of = |e| Recovery::of(&RunError::Apply(ApplyError::ClickHouse(e)));
        assert_eq!(of(untrusted), Recovery::Stop);
        assert_eq!(of(no_client_cert), Recovery::Stop);
        assert_eq!(of(refused), Recovery::Retry);
    }
    use crate::clickhouse::ValueError;

    fn ch(source: clickhouse::error::Error) -> ChError {
        ChError::ClickHouse {
            what: "insert",
            source,
        }
    }

    fn bad(text: &str) -> ChError {
        ch(clickhouse::error::Error::BadResponse(text.into()))
    }

    fn apply(error: ApplyError) -> Recovery {
        Recovery::of(&RunError::Apply(error))
    }

    #[test]
    fn clickhouse_errors_on_a_table() {
        use clickhouse::error::Error as E;
        for retry in [
            bad("Code: 202. DB::Exception: Too many simultaneous queries"),
            bad("Code: 252"),
            bad("Code: 319. DB::Exception: Unknown status of insert"),
            bad("503 Service Unavailable"),
            bad("502 Bad Gateway"),
            bad("<html>bad gateway</html>"),
            ch(E::Network("connection refused".into())),
            ch(E::TimedOut),
            ch(E::Other("connection reset".into())),
        ] {
            assert_eq!(Recovery::of_insert(&retry), Recovery::Retry, "{retry:?}");
        }
        for resync in [
            bad("Code: 27. DB::Exception: Cannot parse input"),
            bad("Code: 60. DB::Exception: Unknown table"),
            bad("400 Bad Request"),
            ch(E::SchemaMismatch("column types".into())),
            ch(E::NotEnoughData),
            ChError::Value {
                column: "c".into(),
                row: 0,
                source: ValueError::UnexpectedNull,
            },
            ChError::RowShape {
                row: 0,
                values: 1,
                columns: 2,
            },
            ChError::Response("garbled".into()),
            ChError::NoKey("public.t".into()),
            ChError::TargetMissing {
                table: "public.a__b".into(),
                target: "public.a__b".into(),
            },
            ChError::SchemaChange {
                table: "public.t".into(),
                detail: "column c: Int64 -> String".into(),
            },
        ] {
            assert_eq!(
                Recovery::of_insert(&resync),
                Recovery::ResyncTable,
                "{resync:?}"
            );
        }
        // A missing grant or a refused login: a resync would fail the same way.
        for stop in [
            bad("Code: 497. DB::Exception: sluice_loader: Not enough privileges. (ACCESS_DENIED)"),
            bad("Code: 516. DB::Exception: sluice_loader: Authentication failed"),
        ] {
            assert_eq!(Recovery::of_insert(&stop), Recovery::Stop, "{stop:?}");
        }
    }

    #[test]
    fn errors_that_end_a_batch_or_the_run() {
        use async_nats::jetstream::stream::{ConsumerError, ConsumerErrorKind};
        for retry in [
            RunError::NatsConnect(ConnectError::Connect {
                url: "nats://localhost:4222".into(),
                source: async_nats::ConnectError::new(async_nats::ConnectErrorKind::Io),
            }),
            RunError::Consumer {
                stream: "s".into(),
                consumer: "c".into(),
                source: ConsumerError::new(ConsumerErrorKind::TimedOut),
            },
            RunError::ConsumerReset {
                consumer: "c".into(),
                source: "gone".into(),
            },
            RunError::Fetch {
                stream: "s".into(),
                source: "the pull ended".into(),
            },
            RunError::Ack("timed out".into()),
            RunError::Share(crate::share::ShareError::Expired {
                since: std::time::Duration::from_secs(8),
            }),
            RunError::StreamInfo {
                stream: "s".into(),
                source: "timed out".into(),
            },
            RunError::CatchUp {
                stream: "s".into(),
                table: sluice_broker::TableName::new("public", "t"),
                source: "timed out".into(),
            },
        ] {
            assert_eq!(Recovery::of(&retry), Recovery::Retry, "{retry:?}");
        }
        for stop in [
            RunError::Metrics {
                listen: ([127, 0, 0, 1], 9000).into(),
                source: std::io::Error::from(std::io::ErrorKind::AddrInUse),
            },
            RunError::Recorder(
                metrics_exporter_prometheus::BuildError::FailedToCreateRuntime("no threads".into()),
            ),
            RunError::Share(crate::share::ShareError::Replaced {
                consumer: "sluice_loader".into(),
            }),
        ] {
            assert_eq!(Recovery::of(&stop), Recovery::Stop, "{stop:?}");
        }
    }

    #[test]
    fn nats_configuration_errors_stop_and_only_an_unreachable_server_retries() {
        let io = || std::io::Error::from(std::io::ErrorKind::NotFound);
        for stop in [
            ConnectError::Credentials {
                path: "/etc/sluice/loader.creds".into(),
                source: io(),
            },
            ConnectError::PasswordFile(io()),
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
            let error = RunError::NatsConnect(stop);
            assert_eq!(Recovery::of(&error), Recovery::Stop, "{error:?}");
        }
        for kind in [
            async_nats::ConnectErrorKind::Io,
            async_nats::ConnectErrorKind::TimedOut,
            async_nats::ConnectErrorKind::ServerParse,
        ] {
            let error = RunError::NatsConnect(ConnectError::Connect {
                url: "nats://localhost:4222".into(),
                source: async_nats::ConnectError::new(kind),
            });
            assert_eq!(Recovery::of(&error), Recovery::Retry, "{error:?}");
        }
    }

    #[test]
    fn apply_errors_that_end_a_batch() {
        assert_eq!(
            apply(ApplyError::ClickHouse(bad("Code: 159. Timeout exceeded"))),
            Recovery::Retry
        );
        assert_eq!(
            apply(ApplyError::ClickHouse(ch(
                clickhouse::error::Error::Network("refused".into())
            ))),
            Recovery::Retry
        );
        // Writing the positions failed for good: not one table's fault.
        assert_eq!(
            apply(ApplyError::ClickHouse(bad(
                "Code: 497. DB::Exception: Not enough privileges"
            ))),
            Recovery::Stop
        );
        assert_eq!(
            apply(ApplyError::Client(
                crate::clickhouse::ClientError::PasswordFile(std::io::Error::from(
                    std::io::ErrorKind::NotFound
                ))
            )),
            Recovery::Stop
        );
        assert_eq!(
            apply(ApplyError::DeadLetter("no responders".into())),
            Recovery::Retry
        );
    }
}
