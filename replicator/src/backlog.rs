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
//! call, and switches to streaming once a call comes back short.
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
//! - **The walsender starts past the backlog.** Decoding restarts only at
//!   Postgres' running-transactions records (every 15 s, and at
//!   checkpoints); a backlog written faster has none, and the walsender
//!   that follows it would decode all of it again (1.7 s for 1M changes on
//!   this machine, a system call per WAL record). So the catch-up starts by
//!   creating and dropping a temporary logical slot, which logs such a
//!   record at the WAL's end (as `pg_log_standby_snapshot()` would on 16+,
//!   which needs more than the REPLICATION privilege this needs). After the last,
//!   short call, whose end every message before was returned, and once all
//!   of it is acknowledged, the slot is moved to that end: past the record,
//!   so its restart point follows.
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
    /// no further call is made. `read_to`: the copy's confirmed LSN after
    /// the call, where its reading ended; every message of the publication
    /// before it was returned by this call or an earlier one.
    ChunkEnd {
        messages: u64,
        last: bool,
        read_to: Lsn,
    },
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
    /// Where the WAL ended just before the restart point was logged at the
    /// start (the record is past it); `None` if it was not.
    mark: Option<Lsn>,
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
        start: Lsn,
    ) -> Result<Self, PgError> {
        let mut settings = settings.clone();
        // No statement timeout (`SESSION_TIMEOUTS`, in every session): a
        // call of a big backlog may take minutes.
        sluice_postgres::add_options(&mut settings.config, crate::pg::OUTPUT_STYLES);
        let reading = settings.connect("reading the backlog").await?;
        let mover = settings.connect("moving the slot past the backlog").await?;
        // Before the copy: both take a slot of `max_replication_slots`.
        let mark = mark_restart_point(&mover, slot).await;
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
        let limit = i32::try_from(chunk_changes.max(1)).unwrap_or(i32::MAX);
        // About one call of `catchup_chunk_changes` messages.
        let (tx, batches) = mpsc::channel((limit as usize).div_ceil(BATCH) + 1);
        let reader = tokio::spawn(read(
            Reading {
                conn: reading,
                copy,
                publication_names: publication_names.to_owned(),
                limit,
                start,
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
            mark,
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

    /// After the last call, with everything acknowledged up to
    /// `confirmed`: waits for a move in progress, then moves the slot to
    /// `confirmed`, so that the walsender starts decoding from a restart
    /// point past the backlog, not before it; returns that restart point.
    ///
    /// A move takes only the first restart point it decodes past where the
    /// slot was confirmed (Postgres keeps one candidate until it is
    /// confirmed); when another one came first (a checkpoint, another
    /// client's), the mark logged at the start is still ahead, and a second
    /// move to the same LSN, which takes every restart point before the
    /// slot's confirmed LSN, gets there. A move that fails is logged: the
    /// walsender then decodes more again, which costs only time.
    pub async fn finish(&mut self, confirmed: Lsn) -> Option<Lsn> {
        const FAILED: &str =
            "cannot advance the slot past the backlog; the walsender decodes it again";
        self.settle().await;
        if confirmed > self.advanced {
            self.move_now(confirmed, FAILED).await;
        }
        let restart = slot_position(&self.mover, &self.slot).await.ok()?.restart;
        let short = matches!(self.mark, Some(mark) if restart < mark && mark <= self.advanced);
        if short && self.move_now(self.advanced, FAILED).await {
            return Some(slot_position(&self.mover, &self.slot).await.ok()?.restart);
        }
        Some(restart)
    }

    /// Moves the slot to `to` now, on the moving session (no move may be in
    /// progress); whether it moved. A failure is logged with `failure`: the
    /// slot stays where it was.
    async fn move_now(&mut self, to: Lsn, failure: &str) -> bool {
        match move_slot(&self.mover, &self.slot, to).await {
            Ok(()) => {
                self.advanced = self.advanced.max(to);
                true
            }
            Err(error) => {
                tracing::warn!(error = %sluice_broker::error_chain(&error), "{failure}");
                false
            }
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
            self.move_now(
                confirmed,
                "cannot advance the slot at shutdown; the next start re-reads from its confirmed LSN",
            )
            .await;
        }
    }
}

/// Logs a running-transactions record at the WAL's end, from which decoding
/// can restart, by creating a temporary logical slot on `conn` (the server
/// logs one for the new slot before it waits for a consistent point) and
/// dropping it. The wait is cut at a second: the record is written by then,
/// and a transaction still running only holds the restart point before its
/// start. Anything refused (no free slot) is logged: it costs the walsender
/// a second decoding of the backlog, nothing else. A standby cannot log such
/// a record (its restart points come from the primary's), so nothing is tried
/// there. Whatever happens, `conn` leaves with no statement timeout: it moves
/// the slot next, and a move of a long backlog takes longer than a second.
/// `conn` holds no other temporary slot (an error drops all of a session's).
async fn mark_restart_point(conn: &SqlConn, slot: &str) -> Option<Lsn> {
    let refused = |error: &tokio_postgres::Error| {
        tracing::info!(
            error = %sluice_broker::error_chain(error),
            "cannot log a restart point at the backlog's end (through a temporary slot); the walsender decodes the backlog again after it"
        );
    };
    let position = conn
        .client
        .query_one(
            "SELECT pg_is_in_recovery(), \
             CASE WHEN pg_is_in_recovery() THEN NULL ELSE pg_current_wal_insert_lsn() END",
            &[],
        )
        .await;
    let before = match position {
        Ok(row) if row.get::<_, bool>(0) => {
            tracing::info!(
                "reading a standby: no restart point can be logged at the backlog's end (the primary logs them, every 15 s); the walsender decodes the backlog again after it"
            );
            return None;
        }
        Ok(row) => Lsn(u64::from(row.get::<_, PgLsn>(1))),
        Err(error) => {
            refused(&error);
            return None;
        }
    };
    let mark = crate::slot::temporary_slot_name(
        slot,
        &format!("_mark_{}", crate::publish::unique_now_us()),
    );
    let attempt = async {
        conn.client
            .batch_execute("SET statement_timeout = '1s'")
            .await?;
        conn.client
            .execute(
                "SELECT pg_create_logical_replication_slot($1, 'pgoutput', true)",
                &[&mark],
            )
            .await?;
        conn.client
            .execute("SELECT pg_drop_replication_slot($1)", &[&mark])
            .await
            .map(|_| ())
    }
    .await;
    // Whatever came of the attempt.
    if let Err(error) = conn.client.batch_execute("SET statement_timeout = 0").await {
        tracing::warn!(
            error = %sluice_broker::error_chain(&error),
            "cannot clear the statement timeout of the session that moves the slot; a long move may be cut short (the slot then stays behind, which costs only re-reading)"
        );
    }
    match attempt {
        Ok(()) => {
            tracing::debug!(slot = %mark, "logged a restart point for decoding at the backlog's end");
            Some(before)
        }
        // A timeout comes after the record was written.
        Err(error) if error.code() == Some(&tokio_postgres::error::SqlState::QUERY_CANCELED) => {
            tracing::debug!(slot = %mark, "logged a restart point for decoding at the backlog's end (transactions still running)");
            Some(before)
        }
        Err(error) => {
            refused(&error);
            None
        }
    }
}

/// `pg_replication_slot_advance(slot, to)`: decodes the WAL up to `to`
/// without output (fast-forward) and holds the slot meanwhile.
async fn move_slot(conn: &SqlConn, slot: &str, to: Lsn) -> Result<(), PgError> {
    // `return(MS)`: every move first waits MS ms on its session, as a move
    // of a long backlog would take that long.
    #[cfg(feature = "failpoints")]
    if let Some(Some(ms)) = fail::eval("replicator::backlog::slow_advance", |arg| {
        arg.and_then(|ms| ms.parse::<u64>().ok())
    }) {
        conn.client
            .execute("SELECT pg_sleep($1)", &[&(ms as f64 / 1000.0)])
            .await
            .map_err(PgError::sql(format!("cannot advance slot {slot} to {to}")))?;
    }
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
    /// The slot's confirmed LSN, which the copy starts from.
    start: Lsn,
}

/// A call grows to at most this many times `catchup_chunk_changes`.
const MAX_GROWTH: i32 = 16;

/// The reading task: calls `pg_logical_slot_get_binary_changes` on the copy
/// until a call comes back short, handing each call's messages over in
/// batches, then its end. The channel holds about one call: while the loop
/// publishes it, the server decodes the next.
///
/// Every call decodes the WAL from the copy's restart point, which Postgres
/// moves only at its running-transactions records (every 15 s, at
/// checkpoints, and the one [`mark_restart_point`] logs at the start). When
/// a call leaves it far behind (a backlog written in a few seconds has no
/// such record), the next call decodes everything before it again; so the
/// next call takes twice as many messages (up to [`MAX_GROWTH`] times the
/// configured number), and the work stays proportional to the backlog
/// instead of growing with its square. Memory does not grow with it: the
/// channel holds what it held, and the rest waits in the server.
async fn read(reading: Reading, tx: mpsc::Sender<Batch>) {
    let mut limit = reading.limit;
    // Where the last call's reading ended.
    let mut end = reading.start;
    loop {
        let step = async {
            let Some((messages, mut batch)) = read_call(&reading, limit, &tx).await? else {
                return Ok(false);
            };
            let now = slot_position(&reading.conn, &reading.copy).await?;
            // Short: the call reached the end of the WAL flushed when it
            // started.
            let last = messages < limit as u64;
            batch.push(BacklogEvent::ChunkEnd {
                messages,
                last,
                read_to: now.confirmed_flush,
            });
            if tx.send(Ok(batch)).await.is_err() || last {
                return Ok(false);
            }
            let again = now.confirmed_flush.0.saturating_sub(now.restart.0);
            let next = next_limit(
                reading.limit,
                limit,
                again,
                now.confirmed_flush.0.saturating_sub(end.0),
            );
            if next > limit {
                tracing::info!(restart_lsn = %now.restart, messages = next, "the slot's restart point is far behind: the next backlog call is larger");
            }
            end = now.confirmed_flush;
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

/// The size of the next call after a full call of `limit` messages that
/// read `read` bytes of WAL, when the next would decode `again` bytes of
/// WAL again (from the restart point to where this call ended): twice
/// `limit` (up to [`MAX_GROWTH`] times `base`) when that is at least half
/// of what the call read, else `base`.
fn next_limit(base: i32, limit: i32, again: u64, read: u64) -> i32 {
    if again.saturating_mul(2) < read {
        base
    } else {
        limit
            .saturating_mul(2)
            .min(base.saturating_mul(MAX_GROWTH))
            .max(limit)
    }
}

/// Where `slot` stands: its restart point and its confirmed LSN (for the
/// copy: where the last call's reading ended); zeros for what it lacks.
async fn slot_position(conn: &SqlConn, slot: &str) -> Result<crate::pg::SlotState, PgError> {
    Ok(crate::pg::slot_state(&conn.client, slot)
        .await?
        .unwrap_or_default())
}

/// One call of up to `limit` messages: how many it returned, and the batch
/// not handed over yet. `None`: the loop is gone.
async fn read_call(
    reading: &Reading,
    limit: i32,
    tx: &mpsc::Sender<Batch>,
) -> Result<Option<(u64, Vec<BacklogEvent>)>, PgError> {
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
    while let Some(row) = rows.next().await {
        let row = row.map_err(failed())?;
        let lsn: PgLsn = row
            .try_get(0)
            .map_err(PgError::sql("unexpected backlog row"))?;
        let data: &[u8] = row
            .try_get(1)
            .map_err(PgError::sql("unexpected backlog row"))?;
        batch.push(BacklogEvent::Change {
            lsn: Lsn(u64::from(lsn)),
            data: Bytes::copy_from_slice(data),
        });
        messages += 1;
        if batch.len() == BATCH
            && tx
                .send(Ok(std::mem::replace(&mut batch, Vec::with_capacity(BATCH))))
                .await
                .is_err()
        {
            return Ok(None);
        }
    }
    Ok(Some((messages, batch)))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_call_that_leaves_the_restart_point_far_behind_doubles_the_next_up_to_sixteen_times() {
        let mut limit = 500;
        let mut sizes = Vec::new();
        for _ in 0..6 {
            // Every call decodes its own 1,000 bytes and all before again.
            limit = next_limit(500, limit, 1_000 * (sizes.len() as u64 + 1), 1_000);
            sizes.push(limit);
        }
        assert_eq!(sizes, [1000, 2000, 4000, 8000, 8000, 8000]);
        // Half of the call again still doubles; less goes back to the base.
        assert_eq!(next_limit(500, 8000, 500, 1_000), 8000);
        assert_eq!(next_limit(500, 2000, 500, 1_000), 4000);
        assert_eq!(next_limit(500, 8000, 499, 1_000), 500);
        assert_eq!(next_limit(i32::MAX, i32::MAX, 1, 1), i32::MAX);
    }
}
