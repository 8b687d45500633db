//! Catching up a large backlog through SQL instead of the walsender.
//!
//! The walsender sends every change as its own CopyData message, with a
//! `send` system call each. Where system calls are dear that, not decoding,
//! bounds how fast any streaming client drains a slot: on the 2-core machine
//! of BENCHMARKS.md, `pg_recvlogical` took 3.4 s for a 1M-change backlog that
//! `pg_logical_slot_get_binary_changes` decoded in 0.7 s (the function
//! materialises its result and sends it in 8 KiB writes). So a replicator
//! that starts at least `replicator.catchup_min_lag_bytes` of WAL behind
//! reads its backlog with that function, `catchup_chunk_changes` changes per
//! call, and switches to streaming once a call comes back short or leaves
//! less than `catchup_min_lag_bytes` of WAL after it.
//!
//! Invariants:
//! - **The slot moves only to what was acknowledged.** The calls read a
//!   temporary copy of the slot (`pg_copy_logical_replication_slot`, owned by
//!   the reading session and dropped with it), which each call moves past
//!   what it returned. The slot itself is moved with
//!   `pg_replication_slot_advance`, on another session, to the confirmed LSN
//!   (the commit end of a transaction whose packages the stream
//!   acknowledged, the LSN a standby status update would carry), never
//!   further. A crash re-reads from there; the copy disappears with its
//!   session, and nothing holds the slot but a move in progress.
//! - **Decoding overlaps publishing.** A task reads each call's rows into a
//!   channel that holds about one call, and starts the next call as soon as
//!   the rows of the last one are all received: the server decodes call
//!   N + 1 while the stream loop publishes call N.
//! - **Whole transactions.** The function stops only after a COMMIT, so no
//!   transaction is open at a call's end.
//! - **Same bytes as streaming.** The session pins the output styles of the
//!   replication connection: pgoutput prints values with the session's
//!   settings, and the value decoder parses one set of them.

use std::sync::Arc;

use bytes::Bytes;
use futures::{FutureExt as _, StreamExt};
use tokio::sync::mpsc;
use tokio::task::JoinHandle;
use tokio_postgres::types::PgLsn;

use crate::pg::{PgError, PgSettings, SqlConn};
use crate::replication::Lsn;

const GET: &str = "SELECT lsn, data FROM pg_logical_slot_get_binary_changes($1, NULL, $2, \
                   'proto_version', '1', 'publication_names', $3)";

/// Messages the reading task hands over at once.
const BATCH: usize = 1024;

/// One step of the backlog.
#[derive(Debug)]
pub enum BacklogEvent {
    /// One pgoutput message, as the walsender would have sent it.
    Change { lsn: Lsn, data: Bytes },
    /// A call is read; it held this many messages. `last`: it came back
    /// short, so it reached the end of the WAL flushed when it started, and
    /// no further call is made.
    ChunkEnd { messages: u64, last: bool },
}

type Batch = Result<Vec<BacklogEvent>, PgError>;

/// Reads the slot's backlog in calls over an ordinary SQL connection.
pub struct Backlog {
    batches: mpsc::Receiver<Batch>,
    /// The batch being handed out, in order.
    current: std::vec::IntoIter<BacklogEvent>,
    reader: JoinHandle<()>,
    /// The reading session's backend, cancelled at a stop.
    reader_pid: i32,
    /// The session that moves the slot.
    mover: Arc<SqlConn>,
    /// A move in progress: the LSN it moves to.
    moving: Option<(Lsn, JoinHandle<Result<(), PgError>>)>,
    slot: String,
    /// Where the slot was last moved to (nothing below it can be advanced to).
    advanced: Lsn,
    /// When the last move in the background started.
    last_move: Option<std::time::Instant>,
    ended: bool,
}

/// The slot moves, while a backlog is read, at most this often.
const MOVE_EVERY: std::time::Duration = std::time::Duration::from_secs(10);

impl Drop for Backlog {
    fn drop(&mut self) {
        // Its connection goes with it, and with the session the copy.
        self.reader.abort();
    }
}

impl Backlog {
    /// Opens the reading session, copies the slot there and starts reading;
    /// opens the session that moves the slot. `start` is the slot's
    /// confirmed LSN.
    pub async fn connect(
        settings: &PgSettings,
        slot: &str,
        publication_names: &str,
        chunk_changes: u32,
        min_lag_bytes: u64,
        start: Lsn,
    ) -> Result<Self, PgError> {
        let mut settings = settings.clone();
        settings
            .config
            // No statement timeout: a call of a big backlog may take minutes.
            .options(format!("{} -c statement_timeout=0", crate::pg::OUTPUT_STYLES).as_str());
        let reading = settings.connect("reading the backlog").await?;
        let reader_pid: i32 = reading
            .client
            .query_one("SELECT pg_backend_pid()", &[])
            .await
            .map_err(PgError::sql("cannot read pg_backend_pid()"))?
            .get(0);
        // Unique per start: a copy a killed replicator left behind until its
        // session ends is never in the way.
        let copy = crate::slot::temporary_slot_name(
            slot,
            &format!("_backlog_{}", crate::publish::unique_now_us()),
        );
        // Tests of the fallback: the server refuses to copy a slot that
        // does not exist.
        #[cfg(feature = "failpoints")]
        let source = if fail::eval("replicator::backlog::copy", |_| ()).is_some() {
            "sluice_failpoint_no_such_slot"
        } else {
            slot
        };
        #[cfg(not(feature = "failpoints"))]
        let source = slot;
        reading
            .client
            .execute(
                "SELECT pg_copy_logical_replication_slot($1, $2, true)",
                &[&source, &copy],
            )
            .await
            .map_err(PgError::sql(format!(
                "cannot copy slot {source} to {copy} (a temporary slot that reads the backlog)"
            )))?;
        let mover = settings.connect("moving the slot past the backlog").await?;
        let limit = i32::try_from(chunk_changes.max(1)).unwrap_or(i32::MAX);
        // About one call of `catchup_chunk_changes` messages.
        let (tx, batches) = mpsc::channel((limit as usize).div_ceil(BATCH) + 1);
        let reader = tokio::spawn(read(
            Reading {
                conn: reading,
                copy,
                publication_names: publication_names.to_owned(),
                limit,
                min_lag_bytes,
            },
            tx,
        ));
        Ok(Backlog {
            batches,
            current: Vec::new().into_iter(),
            reader,
            reader_pid,
            mover: Arc::new(mover),
            moving: None,
            slot: slot.to_owned(),
            advanced: start,
            last_move: None,
            ended: false,
        })
    }

    /// The next message or call end; `None` if the reading task is gone
    /// without an error (it panicked).
    ///
    /// Cancel-safe: what was received and not returned stays in `self`.
    pub async fn next(&mut self) -> Result<Option<BacklogEvent>, PgError> {
        loop {
            if let Some(event) = self.current.next() {
                if matches!(event, BacklogEvent::ChunkEnd { last: true, .. }) {
                    self.ended = true;
                }
                return Ok(Some(event));
            }
            if self.ended {
                // Nothing follows the last call; the stream loop switches
                // to the walsender at its end.
                return std::future::pending().await;
            }
            match self.batches.recv().await {
                Some(batch) => self.current = batch?.into_iter(),
                None => return Ok(None),
            }
        }
    }

    /// Starts moving the slot to `confirmed` in the background, on the
    /// moving session, after the first call and then at most every
    /// [`MOVE_EVERY`]: unless a move is still in progress (a later call's
    /// end moves it further) or it is there already. A move decodes the WAL
    /// from the slot's restart point, as a call does, so moving after every
    /// call would cost as much again; the interval bounds what a crash
    /// re-reads. A move that failed is logged: the slot stays where it was,
    /// which costs only re-reading.
    pub fn advance(&mut self, confirmed: Lsn) {
        if let Some((_, moving)) = &self.moving
            && !moving.is_finished()
        {
            return;
        }
        self.harvest();
        if confirmed <= self.advanced || self.last_move.is_some_and(|at| at.elapsed() < MOVE_EVERY)
        {
            return;
        }
        self.last_move = Some(std::time::Instant::now());
        let (mover, slot) = (self.mover.clone(), self.slot.clone());
        let task = tokio::spawn(async move { move_slot(&mover, &slot, confirmed).await });
        self.moving = Some((confirmed, task));
    }

    /// Takes the result of a finished move.
    fn harvest(&mut self) {
        if let Some((to, moving)) = self.moving.take_if(|(_, task)| task.is_finished())
            && let Some(result) = moving.now_or_never()
        {
            self.moved(to, result);
        }
    }

    fn moved(&mut self, to: Lsn, result: Result<Result<(), PgError>, tokio::task::JoinError>) {
        match result {
            Ok(Ok(())) => self.advanced = self.advanced.max(to),
            Ok(Err(error)) => tracing::warn!(
                error = %sluice_broker::error_chain(&error),
                "cannot advance the slot past a backlog call; it stays behind (a restart re-reads more)"
            ),
            Err(error) => tracing::warn!(%error, "the task advancing the slot ended"),
        }
    }

    /// Waits for a move in progress: the walsender cannot start on the slot
    /// while it is moved.
    pub async fn settle(&mut self) {
        if let Some((to, moving)) = self.moving.take() {
            let result = moving.await;
            self.moved(to, result);
        }
    }

    /// Ends reading at shutdown: cancels a call in progress (through `sql`,
    /// another session), drops the copy with its session, and moves the slot
    /// to `confirmed`, so that the next start does not re-read what was
    /// acknowledged.
    pub async fn stop(&mut self, sql: &tokio_postgres::Client, confirmed: Lsn) {
        if !self.ended {
            let _ = sql
                .execute("SELECT pg_cancel_backend($1)", &[&self.reader_pid])
                .await;
        }
        self.reader.abort();
        self.settle().await;
        if confirmed > self.advanced {
            match move_slot(&self.mover, &self.slot, confirmed).await {
                Ok(()) => self.advanced = confirmed,
                Err(error) => {
                    tracing::warn!(error = %sluice_broker::error_chain(&error), "cannot advance the slot at shutdown; the next start re-reads from its confirmed LSN")
                }
            }
        }
    }
}

/// `pg_replication_slot_advance(slot, to)`: decodes the WAL up to `to`
/// without output (fast-forward) and holds the slot meanwhile.
async fn move_slot(conn: &SqlConn, slot: &str, to: Lsn) -> Result<(), PgError> {
    conn.client
        .execute(
            "SELECT pg_replication_slot_advance($1, $2)",
            &[&slot, &PgLsn::from(to.0)],
        )
        .await
        .map_err(PgError::sql(format!("cannot advance slot {slot} to {to}")))?;
    fail::fail_point!("replicator::backlog::after_advance", |_| crate::crash_here(
    ));
    Ok(())
}

/// What the reading task reads with.
struct Reading {
    conn: SqlConn,
    /// The temporary copy of the slot.
    copy: String,
    publication_names: String,
    /// Messages per call (`catchup_chunk_changes`), at first.
    limit: i32,
    /// A full call with less WAL than this after it is the last: the
    /// walsender takes the rest (another call would decode the backlog's
    /// start again when the slot's restart point has not moved).
    min_lag_bytes: u64,
}

/// A call grows to at most this many times `catchup_chunk_changes`.
const MAX_GROWTH: i32 = 16;

/// The reading task: calls `pg_logical_slot_get_binary_changes` on the copy
/// until a call is the last, handing each call's messages over in batches,
/// then its end. The channel holds about one call: while the loop publishes
/// it, the server decodes the next.
///
/// Every call decodes the WAL from the copy's restart point, which Postgres
/// moves only at its running-transactions records (every 15 s, and at
/// checkpoints). When a call did not move it (a backlog written in a few
/// seconds), the next call decodes everything before it again; so the next
/// call takes twice as many messages (up to [`MAX_GROWTH`] times the
/// configured number), and the work stays proportional to the backlog
/// instead of growing with its square. Memory does not grow with it: the
/// channel holds what it held, and the rest waits in the server.
async fn read(reading: Reading, tx: mpsc::Sender<Batch>) {
    let mut limit = reading.limit;
    let mut restart = None;
    loop {
        let step = async {
            if restart.is_none() {
                restart = Some(restart_lsn(&reading).await?);
            }
            if !read_call(&reading, limit, &tx).await? {
                return Ok(false);
            }
            let now = restart_lsn(&reading).await?;
            let next = next_limit(reading.limit, limit, Some(now) > restart);
            if next > limit {
                tracing::info!(restart_lsn = %now, messages = next, "the slot's restart point did not move: the next backlog call is larger");
            }
            restart = Some(now);
            limit = next;
            Ok(true)
        };
        match step.await {
            Ok(true) => {}
            // The last call; or the loop is gone.
            Ok(false) => return,
            Err(error) => {
                let _ = tx.send(Err(error)).await;
                return;
            }
        }
    }
}

/// The size of the next call after a full call of `limit` messages: back to
/// `base` when the call moved the restart point, else twice `limit`, up to
/// [`MAX_GROWTH`] times `base`.
fn next_limit(base: i32, limit: i32, restart_moved: bool) -> i32 {
    if restart_moved {
        base
    } else {
        limit
            .saturating_mul(2)
            .min(base.saturating_mul(MAX_GROWTH))
            .max(limit)
    }
}

/// The copy's restart point (0 when Postgres has none for it).
async fn restart_lsn(reading: &Reading) -> Result<Lsn, PgError> {
    let row = reading
        .conn
        .client
        .query_one(
            "SELECT restart_lsn FROM pg_replication_slots WHERE slot_name = $1",
            &[&reading.copy],
        )
        .await
        .map_err(PgError::sql(format!(
            "cannot read the restart point of slot {}",
            reading.copy
        )))?;
    let lsn: Option<PgLsn> = row.get(0);
    Ok(Lsn(lsn.map_or(0, u64::from)))
}

/// One call of up to `limit` messages; whether another follows.
async fn read_call(
    reading: &Reading,
    limit: i32,
    tx: &mpsc::Sender<Batch>,
) -> Result<bool, PgError> {
    let failed = || PgError::sql("cannot read the slot's backlog");
    let params: [&(dyn tokio_postgres::types::ToSql + Sync); 3] =
        [&reading.copy, &limit, &reading.publication_names];
    let rows = reading
        .conn
        .client
        .query_raw(GET, params)
        .await
        .map_err(failed())?;
    let mut rows = std::pin::pin!(rows);
    let mut batch = Vec::with_capacity(BATCH);
    let mut messages = 0u64;
    let mut end = Lsn(0);
    while let Some(row) = rows.next().await {
        let row = row.map_err(failed())?;
        let lsn: PgLsn = row
            .try_get(0)
            .map_err(PgError::sql("unexpected backlog row"))?;
        let data: &[u8] = row
            .try_get(1)
            .map_err(PgError::sql("unexpected backlog row"))?;
        end = Lsn(u64::from(lsn));
        batch.push(BacklogEvent::Change {
            lsn: end,
            data: Bytes::copy_from_slice(data),
        });
        messages += 1;
        if batch.len() == BATCH
            && tx
                .send(Ok(std::mem::replace(&mut batch, Vec::with_capacity(BATCH))))
                .await
                .is_err()
        {
            return Ok(false);
        }
    }
    // Short: the call reached the end of the WAL flushed when it started.
    let last = messages < limit as u64
        || crate::pg::current_wal_lsn(&reading.conn.client)
            .await?
            .0
            .saturating_sub(end.0)
            < reading.min_lag_bytes;
    batch.push(BacklogEvent::ChunkEnd { messages, last });
    Ok(tx.send(Ok(batch)).await.is_ok() && !last)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_call_that_left_the_restart_point_doubles_the_next_up_to_sixteen_times() {
        let mut limit = 500;
        let mut sizes = Vec::new();
        for _ in 0..6 {
            limit = next_limit(500, limit, false);
            sizes.push(limit);
        }
        assert_eq!(sizes, [1000, 2000, 4000, 8000, 8000, 8000]);
        assert_eq!(next_limit(500, 8000, true), 500);
        assert_eq!(next_limit(i32::MAX, i32::MAX, false), i32::MAX);
    }
}
