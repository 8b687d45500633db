//! CopyBoth streaming: XLogData and keepalives in, standby status updates out.

use std::time::{Duration, SystemTime, UNIX_EPOCH};

use bytes::{Buf, BufMut, Bytes};
use postgres_protocol::message::backend::Message;
use postgres_protocol::message::frontend;

use sluice_broker::table::quote_ident;

use super::conn::{ReplicationClient, quote_literal};
use super::error::{ProtocolError, ReplicationError, ServerError};
use super::lsn::Lsn;
use super::wire::{Backend, server_error, unexpected};

/// Microseconds between the Unix epoch and the Postgres epoch (2000-01-01 UTC),
/// in which the replication protocol and pgoutput count their timestamps
/// (the one copy of this constant; [`crate::pgoutput`] converts with it).
pub const PG_EPOCH_UNIX_MICROS: i64 = 946_684_800_000_000;

/// The current time in microseconds since 2000-01-01 UTC.
pub fn pg_now_micros() -> i64 {
    let unix = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .unwrap_or(Duration::ZERO);
    i64::try_from(unix.as_micros()).unwrap_or(i64::MAX) - PG_EPOCH_UNIX_MICROS
}

/// One message of the replication stream.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ReplicationEvent {
    /// `XLogData` ('w'): one pgoutput message.
    XLogData {
        /// WAL position of the start of this data (0/0 for some pgoutput
        /// messages that have no WAL position of their own).
        wal_start: Lsn,
        /// The server's current WAL end.
        wal_end: Lsn,
        /// Server clock at sending, microseconds since 2000-01-01 UTC.
        server_time_us: i64,
        /// The pgoutput message (first byte is its type: `B`, `R`, `I`, …, `C`).
        data: Bytes,
    },
    /// Primary keepalive ('k').
    Keepalive {
        /// The server's current WAL end.
        wal_end: Lsn,
        /// Server clock at sending, microseconds since 2000-01-01 UTC.
        server_time_us: i64,
        /// The server will end the connection soon (at `wal_sender_timeout`)
        /// unless it gets a status update: answer right away.
        reply_requested: bool,
    },
}

/// Entering CopyBoth lives here, beside the stream it yields, so that the
/// client ([`super::conn`]) does not depend on the stream.
impl ReplicationClient {
    /// `START_REPLICATION SLOT "slot" LOGICAL X/Y ("option" 'value', …)`, then
    /// CopyBoth streaming.
    ///
    /// Option names are quoted as identifiers and values as literals, so pass
    /// them unquoted, e.g. `[("proto_version", "1"), ("publication_names",
    /// &publication_names(["pub"]))]`. `start` is where decoding may begin; the
    /// server starts from the later of it and the slot's `confirmed_flush_lsn`
    /// (use `Lsn(0)` to resume exactly from the slot).
    pub async fn start_replication(
        mut self,
        slot: &str,
        start: Lsn,
        options: &[(&str, &str)],
    ) -> Result<ReplicationStream, ReplicationError> {
        let mut sql = format!(
            "START_REPLICATION SLOT {} LOGICAL {start}",
            quote_ident(slot)
        );
        if !options.is_empty() {
            let list: Vec<String> = options
                .iter()
                .map(|(name, value)| format!("{} {}", quote_ident(name), quote_literal(value)))
                .collect();
            sql.push_str(" (");
            sql.push_str(&list.join(", "));
            sql.push(')');
        }
        frontend::query(&sql, &mut self.conn.write_buf)
            .map_err(|_| ReplicationError::Config("START_REPLICATION contains a NUL byte"))?;
        self.conn.flush().await?;
        loop {
            match self.conn.read_backend().await? {
                Backend::CopyBothResponse => return Ok(ReplicationStream::new(self)),
                Backend::Message(Message::ErrorResponse(body)) => {
                    let e = server_error(&body);
                    // Best effort: the caller gets the server's error either way.
                    let _ = self.conn.drain_to_ready().await;
                    return Err(self.command_error(&sql, ReplicationError::Server(e)));
                }
                Backend::Message(Message::NoticeResponse(_) | Message::ParameterStatus(_)) => {}
                Backend::Message(other) => {
                    return Err(unexpected(&other, "starting replication"));
                }
            }
        }
    }
}

/// A replication connection in CopyBoth mode, after `START_REPLICATION`.
pub struct ReplicationStream {
    client: ReplicationClient,
    /// The server sent CopyDone: no more events.
    server_done: bool,
}

impl std::fmt::Debug for ReplicationStream {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ReplicationStream")
            .field("backend_pid", &self.client.backend_pid())
            .field("server_done", &self.server_done)
            .finish_non_exhaustive()
    }
}

impl ReplicationStream {
    pub(crate) fn new(client: ReplicationClient) -> Self {
        ReplicationStream {
            client,
            server_done: false,
        }
    }

    /// The server process id of the walsender.
    pub fn backend_pid(&self) -> i32 {
        self.client.backend_pid()
    }

    /// The next event; `Ok(None)` once the server ended the stream with
    /// CopyDone (call [`ReplicationStream::finish`] then).
    ///
    /// Cancel-safe: when dropped before completion (e.g. the other branch of a
    /// `tokio::select!` won), the bytes read so far stay buffered and the next
    /// call continues with them; no event is lost.
    pub async fn next(&mut self) -> Result<Option<ReplicationEvent>, ReplicationError> {
        if self.server_done {
            return Ok(None);
        }
        loop {
            // The only await: the read inside read_backend, which is
            // cancel-safe. Everything below runs without yielding.
            let message = self.client.conn.read_backend().await?;
            match message {
                Backend::Message(Message::CopyData(body)) => {
                    return parse_copy_data(body.into_bytes()).map(Some);
                }
                Backend::Message(Message::CopyDone) => {
                    self.server_done = true;
                    return Ok(None);
                }
                // A walsender told to stop (the server's smart or fast
                // shutdown) ends the stream with CommandComplete ("COPY 0")
                // and no CopyDone once everything was sent and confirmed
                // (walsender.c, WalSndDone), then closes the connection.
                // The stream ended; the caller reconnects.
                Backend::Message(Message::CommandComplete(_)) => {
                    tracing::info!("postgres ended the replication stream (server shutting down)");
                    self.server_done = true;
                    return Ok(None);
                }
                Backend::Message(Message::ErrorResponse(body)) => {
                    let e = ServerError::from_fields(body.fields())?;
                    return Err(ReplicationError::Server(Box::new(e)));
                }
                Backend::Message(Message::NoticeResponse(body)) => {
                    if let Ok(notice) = ServerError::from_fields(body.fields()) {
                        tracing::info!(
                            severity = %notice.severity,
                            code = %notice.code,
                            message = %notice.message,
                            "postgres notice on the replication stream"
                        );
                    }
                }
                Backend::Message(Message::ParameterStatus(_)) => {}
                Backend::CopyBothResponse => {
                    return Err(ProtocolError::Unexpected {
                        tag: 'W',
                        state: "streaming",
                    }
                    .into());
                }
                Backend::Message(other) => return Err(unexpected(&other, "streaming")),
            }
        }
    }

    /// Sends a standby status update ('r').
    ///
    /// `write`, `flush` and `apply` are "received", "durably stored" and
    /// "applied" positions; for a logical slot, `flush` is what the server
    /// records as the slot's `confirmed_flush_lsn` (WAL before it may be
    /// recycled and changes before it are never sent again). Only report
    /// positions whose data is durable downstream. Positions are the
    /// *end* LSN of what was processed, e.g. a Commit's `end_lsn`.
    ///
    /// If cancelled, the unsent rest of the message stays queued and goes out
    /// first with the next `send_status` or `finish`.
    pub async fn send_status(
        &mut self,
        write: Lsn,
        flush: Lsn,
        apply: Lsn,
        reply_requested: bool,
    ) -> Result<(), ReplicationError> {
        let mut body = [0u8; 34];
        let mut cursor = &mut body[..];
        cursor.put_u8(b'r');
        cursor.put_u64(write.0);
        cursor.put_u64(flush.0);
        cursor.put_u64(apply.0);
        cursor.put_i64(pg_now_micros());
        cursor.put_u8(u8::from(reply_requested));
        frontend::CopyData::new(&body[..])?.write(&mut self.client.conn.write_buf);
        self.client.conn.flush().await
    }

    /// Ends streaming gracefully: sends CopyDone, skips the events still in
    /// flight, and waits for the server to finish the command. Returns the
    /// connection for further commands (or [`ReplicationClient::close`]).
    pub async fn finish(mut self) -> Result<ReplicationClient, ReplicationError> {
        frontend::copy_done(&mut self.client.conn.write_buf);
        self.client.conn.flush().await?;
        loop {
            match self
                .client
                .conn
                .read_message("finishing replication")
                .await?
            {
                Message::CopyData(_) | Message::CopyDone | Message::CommandComplete(_) => {}
                Message::ReadyForQuery(_) => return Ok(self.client),
                Message::ErrorResponse(body) => {
                    let e = ServerError::from_fields(body.fields())?;
                    return Err(ReplicationError::Server(Box::new(e)));
                }
                other => return Err(unexpected(&other, "finishing replication")),
            }
        }
    }
}

/// Parses the payload of a CopyData message of the replication stream.
/// See "Streaming Replication Protocol", START_REPLICATION:
/// <https://www.postgresql.org/docs/current/protocol-replication.html>.
pub(crate) fn parse_copy_data(mut payload: Bytes) -> Result<ReplicationEvent, ReplicationError> {
    let bad = |payload: &Bytes| ProtocolError::BadCopyData {
        kind: payload.first().map_or('?', |b| char::from(*b)),
        len: payload.len(),
    };
    match payload.first() {
        Some(b'w') if payload.len() >= 25 => {
            payload.advance(1);
            let wal_start = Lsn(payload.get_u64());
            let wal_end = Lsn(payload.get_u64());
            let server_time_us = payload.get_i64();
            Ok(ReplicationEvent::XLogData {
                wal_start,
                wal_end,
                server_time_us,
                data: payload,
            })
        }
        Some(b'k') if payload.len() >= 18 => {
            payload.advance(1);
            let wal_end = Lsn(payload.get_u64());
            let server_time_us = payload.get_i64();
            let reply_requested = payload.get_u8() != 0;
            Ok(ReplicationEvent::Keepalive {
                wal_end,
                server_time_us,
                reply_requested,
            })
        }
        _ => Err(bad(&payload).into()),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_xlogdata_and_keepalive() {
        let mut w = vec![b'w'];
        w.extend_from_slice(&0x1_0000_0010u64.to_be_bytes());
        w.extend_from_slice(&0x1_0000_0020u64.to_be_bytes());
        w.extend_from_slice(&42i64.to_be_bytes());
        w.extend_from_slice(b"Bxyz");
        assert_eq!(
            parse_copy_data(Bytes::from(w)).unwrap(),
            ReplicationEvent::XLogData {
                wal_start: Lsn(0x1_0000_0010),
                wal_end: Lsn(0x1_0000_0020),
                server_time_us: 42,
                data: Bytes::from_static(b"Bxyz"),
            }
        );

        let mut k = vec![b'k'];
        k.extend_from_slice(&7u64.to_be_bytes());
        k.extend_from_slice(&(-1i64).to_be_bytes());
        k.push(1);
        assert_eq!(
            parse_copy_data(Bytes::from(k)).unwrap(),
            ReplicationEvent::Keepalive {
                wal_end: Lsn(7),
                server_time_us: -1,
                reply_requested: true,
            }
        );
    }

    #[test]
    fn rejects_short_or_unknown_messages() {
        for bad in [
            &b""[..],
            b"w",
            b"k\0\0",
            b"x0123456789012345678901234",
            &[b'w'; 24],
        ] {
            let err = parse_copy_data(Bytes::copy_from_slice(bad)).unwrap_err();
            assert!(matches!(
                err,
                ReplicationError::Protocol(ProtocolError::BadCopyData { .. })
            ));
            assert_eq!(
                crate::recovery::of_replication(&err),
                crate::recovery::Recovery::Stop
            );
        }
    }

    /// Bytes trickle in one at a time while `next()` is cancelled by a timeout
    /// over and over: every event still arrives whole and in order.
    #[tokio::test]
    async fn next_is_cancel_safe() {
        use tokio::io::AsyncWriteExt;

        let (client_io, mut server_io) = tokio::io::duplex(64);
        let mut stream = ReplicationStream::new(ReplicationClient::for_test(Box::new(client_io)));
        let mut wire = Vec::new();
        let mut expected = Vec::new();
        for i in 0..3u64 {
            let mut payload = vec![b'w'];
            payload.extend_from_slice(&(i * 100).to_be_bytes());
            payload.extend_from_slice(&(i * 100 + 50).to_be_bytes());
            payload.extend_from_slice(&7i64.to_be_bytes());
            payload.extend_from_slice(format!("I-row-{i}").as_bytes());
            wire.push(b'd');
            wire.extend_from_slice(&(u32::try_from(payload.len()).unwrap() + 4).to_be_bytes());
            wire.extend_from_slice(&payload);
            expected.push(parse_copy_data(Bytes::from(payload)).unwrap());
        }
        wire.extend_from_slice(b"c\0\0\0\x04");
        let writer = tokio::spawn(async move {
            for byte in wire {
                server_io.write_all(&[byte]).await.unwrap();
                tokio::time::sleep(Duration::from_millis(1)).await;
            }
            server_io
        });
        let mut events = Vec::new();
        let mut cancelled = 0;
        loop {
            match tokio::time::timeout(Duration::from_micros(300), stream.next()).await {
                Err(_elapsed) => cancelled += 1,
                Ok(Ok(Some(event))) => events.push(event),
                Ok(Ok(None)) => break,
                Ok(Err(e)) => panic!("{e:?}"),
            }
        }
        drop(writer.await.unwrap());
        assert_eq!(events, expected);
        assert!(cancelled > 10, "only {cancelled} cancellations");
        assert!(matches!(stream.next().await, Ok(None)));
    }

    #[test]
    fn converts_postgres_epoch() {
        assert_eq!(PG_EPOCH_UNIX_MICROS, 946_684_800 * 1_000_000);
        assert!(pg_now_micros() > 700_000_000_000_000);
    }
}
