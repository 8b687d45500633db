//! Catching up a large backlog through SQL instead of the walsender.
//!
//! The walsender sends every change as its own CopyData message, with a
//! `send` system call each. Where system calls are dear that, not decoding,
//! bounds how fast any streaming client drains a slot: on the 2-core machine
//! of BENCHMARKS.md, `pg_recvlogical` took 8.7 s for a 1M-change backlog that
//! `pg_logical_slot_peek_binary_changes` decoded and delivered in 1.5 s (the
//! function materialises its result and sends it in 8 KiB writes). So a
//! replicator that starts at least `replicator.catchup_min_lag_bytes` of WAL
//! behind reads the slot with that function, `catchup_chunk_changes` changes
//! per call, and switches to streaming once a call comes back short.
//!
//! Invariants:
//! - **Peek, never get.** Reading does not move the slot. Between chunks it is
//!   moved with `pg_replication_slot_advance` to the confirmed LSN, the commit
//!   end of a transaction whose packages the stream acknowledged (the LSN a
//!   standby status update would carry), never further. A crash in a chunk
//!   re-reads the chunk.
//! - **Whole transactions.** The function stops only after a COMMIT, so no
//!   transaction is open at a chunk's end.
//! - **Same bytes as streaming.** The session pins the output styles of the
//!   replication connection: pgoutput prints values with the session's
//!   settings, and the value decoder parses one set of them.

use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;

use bytes::Bytes;
use futures::StreamExt;
use tokio_postgres::RowStream;
use tokio_postgres::types::PgLsn;

use crate::pg::{PgError, PgSettings, SqlConn};
use crate::replication::Lsn;

const PEEK: &str = "SELECT lsn, data FROM pg_logical_slot_peek_binary_changes($1, NULL, $2, \
                    'proto_version', '1', 'publication_names', $3)";

/// One step of the backlog.
#[derive(Debug)]
pub enum BacklogEvent {
    /// One pgoutput message, as the walsender would have sent it.
    Change { lsn: Lsn, data: Bytes },
    /// The current chunk is read; it held this many messages.
    ChunkEnd { messages: u64 },
}

type Pending = Pin<Box<dyn Future<Output = Result<RowStream, tokio_postgres::Error>> + Send>>;

enum Chunk {
    /// No call in progress: the next [`Backlog::next`] starts one.
    Idle,
    /// The call is running (the server decodes the whole chunk before the
    /// first row comes back).
    Starting(Pending),
    Rows(Pin<Box<RowStream>>),
}

/// Reads the slot's backlog in chunks over an ordinary SQL connection.
pub struct Backlog {
    conn: Arc<SqlConn>,
    backend_pid: i32,
    slot: String,
    publication_names: String,
    chunk_changes: i32,
    chunk: Chunk,
    messages: u64,
    /// Where the slot was last moved to (nothing below it can be advanced to).
    advanced: Lsn,
}

impl Backlog {
    /// Opens the reading session. `start` is the slot's confirmed LSN.
    pub async fn connect(
        settings: &PgSettings,
        slot: &str,
        publication_names: &str,
        chunk_changes: u32,
        start: Lsn,
    ) -> Result<Self, PgError> {
        let mut settings = settings.clone();
        settings
            .config
            // No statement timeout: a chunk of a big backlog may take minutes.
            .options(format!("{} -c statement_timeout=0", crate::pg::OUTPUT_STYLES).as_str());
        let conn = settings.connect("reading the backlog").await?;
        let backend_pid: i32 = conn
            .client
            .query_one("SELECT pg_backend_pid()", &[])
            .await
            .map_err(PgError::sql("cannot read pg_backend_pid()"))?
            .get(0);
        Ok(Backlog {
            conn: Arc::new(conn),
            backend_pid,
            slot: slot.to_owned(),
            publication_names: publication_names.to_owned(),
            chunk_changes: i32::try_from(chunk_changes).unwrap_or(i32::MAX),
            chunk: Chunk::Idle,
            messages: 0,
            advanced: start,
        })
    }

    /// Messages per chunk; a chunk with fewer reached the end of the WAL.
    pub fn chunk_changes(&self) -> u64 {
        self.chunk_changes as u64
    }

    /// The next message, starting a chunk when none is open.
    ///
    /// Cancel-safe: the call in progress and the rows not yet returned stay in
    /// `self`, so a `tokio::select!` may drop this future at any await.
    pub async fn next(&mut self) -> Result<BacklogEvent, PgError> {
        loop {
            match &mut self.chunk {
                Chunk::Idle => {
                    let conn = self.conn.clone();
                    let (slot, publication) = (self.slot.clone(), self.publication_names.clone());
                    let limit = self.chunk_changes;
                    self.messages = 0;
                    self.chunk = Chunk::Starting(Box::pin(async move {
                        let params: [&(dyn tokio_postgres::types::ToSql + Sync); 3] =
                            [&slot, &limit, &publication];
                        conn.client.query_raw(PEEK, params).await
                    }));
                }
                Chunk::Starting(pending) => match pending.await {
                    Ok(rows) => self.chunk = Chunk::Rows(Box::pin(rows)),
                    Err(error) => {
                        self.chunk = Chunk::Idle;
                        return Err(PgError::sql("cannot read the slot's backlog")(error));
                    }
                },
                Chunk::Rows(rows) => match rows.next().await {
                    Some(row) => {
                        let row = row.map_err(PgError::sql("cannot read the slot's backlog"))?;
                        let lsn: PgLsn = row
                            .try_get(0)
                            .map_err(PgError::sql("unexpected backlog row"))?;
                        let data: &[u8] = row
                            .try_get(1)
                            .map_err(PgError::sql("unexpected backlog row"))?;
                        self.messages += 1;
                        return Ok(BacklogEvent::Change {
                            lsn: Lsn(u64::from(lsn)),
                            data: Bytes::copy_from_slice(data),
                        });
                    }
                    None => {
                        self.chunk = Chunk::Idle;
                        return Ok(BacklogEvent::ChunkEnd {
                            messages: self.messages,
                        });
                    }
                },
            }
        }
    }

    /// Moves the slot to `confirmed` (between chunks only: the call holds the
    /// slot while it runs). No-op when the slot is already there.
    pub async fn advance(&mut self, confirmed: Lsn) -> Result<(), PgError> {
        if confirmed <= self.advanced {
            return Ok(());
        }
        self.conn
            .client
            .execute(
                "SELECT pg_replication_slot_advance($1, $2)",
                &[&self.slot, &PgLsn::from(confirmed.0)],
            )
            .await
            .map_err(PgError::sql(format!(
                "cannot advance slot {} to {confirmed}",
                self.slot
            )))?;
        self.advanced = confirmed;
        Ok(())
    }

    /// The server's current WAL position.
    pub async fn wal_end(&self) -> Result<Lsn, PgError> {
        crate::pg::current_wal_lsn(&self.conn.client).await
    }

    /// Ends reading at shutdown: cancels a chunk in progress (through `sql`,
    /// another session) and moves the slot to `confirmed`, so the next start
    /// neither waits for the slot nor re-reads what was acknowledged.
    pub async fn stop(&mut self, sql: &tokio_postgres::Client, confirmed: Lsn) {
        if !matches!(self.chunk, Chunk::Idle) {
            let _ = sql
                .execute("SELECT pg_cancel_backend($1)", &[&self.backend_pid])
                .await;
            // The cancelled call ends with an error; rows already sent are
            // dropped unread (nothing of them was confirmed).
            let drain = async { while let Ok(BacklogEvent::Change { .. }) = self.next().await {} };
            let _ = tokio::time::timeout(std::time::Duration::from_secs(10), drain).await;
            self.chunk = Chunk::Idle;
        }
        if let Err(error) = self.advance(confirmed).await {
            tracing::warn!(error = %sluice_broker::error_chain(&error), "cannot advance the slot at shutdown; the next start re-reads from its confirmed LSN");
        }
    }
}
