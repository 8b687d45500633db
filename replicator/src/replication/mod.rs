//! The streaming-replication connection: a Postgres walsender spoken to
//! directly over TCP (optionally TLS), because the published `tokio-postgres`
//! has no replication API.
//!
//! Built on `postgres-protocol`'s message codecs and SCRAM implementation.
//! The connection starts with `replication=database` in the startup message,
//! which makes the backend a walsender that takes replication commands
//! (`IDENTIFY_SYSTEM`, `CREATE_REPLICATION_SLOT`, `START_REPLICATION`, …) as
//! simple queries. See "Streaming Replication Protocol":
//! <https://www.postgresql.org/docs/current/protocol-replication.html>, and
//! "Message Formats": <https://www.postgresql.org/docs/current/protocol-message-formats.html>.
//!
//! # Flow
//! 1. [`ReplicationClient::connect`] (trust, cleartext, md5, SCRAM-SHA-256;
//!    TLS per `sslmode`).
//! 2. [`ReplicationClient::create_logical_slot`] exports a snapshot and returns
//!    the slot's consistent point. The snapshot lives only until the next
//!    command on this connection or its close, so keep the connection idle
//!    while snapshot readers (`BEGIN ISOLATION LEVEL REPEATABLE READ; SET
//!    TRANSACTION SNAPSHOT '…'`, on ordinary sessions: [`SqlSession`] for the
//!    readers' `COPY`, `tokio-postgres` for the rest) have imported it; they
//!    keep it alive once they have.
//! 3. [`ReplicationClient::start_replication`] enters CopyBoth mode and yields
//!    a [`ReplicationStream`] of [`ReplicationEvent`]s.
//!
//! # Protocol subtleties this module's callers must respect
//! - **Feedback is proactive.** The walsender ends a connection that has sent
//!   no standby status update for `wal_sender_timeout` (default 60 s,
//!   <https://www.postgresql.org/docs/current/runtime-config-replication.html#GUC-WAL-SENDER-TIMEOUT>).
//!   It asks for one with a keepalive whose `reply_requested` is set only when
//!   half the timeout has already passed, and while it is busy sending a large
//!   transaction that keepalive can sit behind megabytes of XLogData in the
//!   socket. So send [`ReplicationStream::send_status`] on a timer (about
//!   every second, never less often than `wal_sender_timeout / 2`), and also
//!   answer `reply_requested` at once. A status update resends the last
//!   confirmed positions when nothing new is durable: that is fine and keeps
//!   the connection alive.
//! - **What the LSNs in a status update mean.** `write`/`flush`/`apply` are
//!   the end positions of WAL received / durably stored / applied by the
//!   client. For a logical slot the server stores `flush` as the slot's
//!   `confirmed_flush_lsn`: WAL before it may be removed and transactions that
//!   committed before it are never sent again, even after a reconnect. Hence
//!   sluice's invariant 1 (ARCHITECTURE.md, "Nothing is lost"): `flush` only
//!   ever advances to the end LSN of a transaction whose every message has
//!   been acknowledged by JetStream. When nothing is in flight, confirming the
//!   server's `wal_end` from a keepalive lets idle slots stop pinning WAL.
//!   Positions are never moved backwards; the server ignores a lower `flush`.
//! - **Where streaming resumes.** `START_REPLICATION … LOGICAL X/Y` starts at
//!   the later of `X/Y` and the slot's `confirmed_flush_lsn`, at a transaction
//!   boundary; a transaction may be resent if it was not confirmed. Read
//!   `confirmed_flush_lsn` (`READ_REPLICATION_SLOT` does not have it on PG 15;
//!   use `pg_replication_slots` on an SQL connection) after connecting rather
//!   than trusting local state.
//! - **One consumer per slot.** A slot in use by another walsender gives
//!   SQLSTATE 55006 (object_in_use). After a crash of our own process the old
//!   walsender may hold the slot until the server notices the dead socket, so
//!   a restart can see 55006 for a while: the error is not transient by
//!   itself, but a supervisor may retry it a bounded number of times.
//! - **Cancel safety.** [`ReplicationStream::next`] can sit in `tokio::select!`
//!   beside a timer and a channel: partial frames stay buffered in the struct.
//! - **Errors are typed by what to do next** ([`crate::recovery::of_replication`]):
//!   I/O and connection loss reconnect with backoff; authentication, missing
//!   slot (42704) or publication, slot in use (55006), WAL removed (58P01) or an
//!   invalidated slot (55000) stop or resync.

mod conn;
mod copy_both;
mod error;
mod lsn;
mod sql;
mod startup;
mod wire;

pub use conn::{
    CreatedSlot, ReplicationClient, SystemIdentity, create_slot_command, publication_names,
    quote_literal,
};
pub use copy_both::{PG_EPOCH_UNIX_MICROS, ReplicationEvent, ReplicationStream, pg_now_micros};
pub use error::{AuthError, ProtocolError, ReplicationError, ServerError, TlsError};
pub use lsn::{Lsn, ParseLsnError};
pub use sluice_postgres::tls::{SslMode, TlsOptions};
pub use sql::{CopyOut, SqlSession};
