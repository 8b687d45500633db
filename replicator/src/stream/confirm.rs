//! Which LSN may be confirmed to Postgres, and the lag it leaves (pure: the
//! streaming loop feeds it what happened and sends what it says).
//!
//! Invariants this module is responsible for (ARCHITECTURE.md invariant 1):
//! - **Confirm only what is durable.** The confirmed LSN moves only to the
//!   end LSN of a [`Mark`] the publisher released (every package before it
//!   was acknowledged), or, when idle, to the walsender's WAL end.
//! - **Never backwards.** Every move is a `max`.
//! - **Idle tables do not pin WAL.** Streaming from the walsender with no
//!   transaction open and nothing in flight, everything it sent is durable,
//!   so its WAL end (from keepalives) is confirmed. Reading a backlog, the WAL
//!   end is only where the backlog ends, not what was read: never confirmed;
//!   after its last call, with everything acknowledged, where the calls'
//!   reading ended is (the same rule: everything before it was sent).

use crate::publish::Mark;
use crate::replication::Lsn;

/// The confirmation state of one streaming loop.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(super) struct Confirmation {
    confirmed: Lsn,
    /// The walsender's WAL end (keepalives): everything before it was sent.
    server_wal_end: Lsn,
    /// The WAL end when the last backlog chunk was read (lag gauge only).
    backlog_wal_end: Lsn,
    /// Commit time of the last released transaction.
    last_commit_time_us: Option<i64>,
}

impl Confirmation {
    /// Starting at `start`, the LSN streaming starts from (already confirmed).
    pub(super) fn new(start: Lsn) -> Self {
        Confirmation {
            confirmed: start,
            server_wal_end: start,
            backlog_wal_end: start,
            last_commit_time_us: None,
        }
    }

    /// The LSN to send as written, flushed and applied.
    pub(super) fn confirmed(&self) -> Lsn {
        self.confirmed
    }

    /// The walsender's WAL end as last reported.
    pub(super) fn server_wal_end(&self) -> Lsn {
        self.server_wal_end
    }

    /// Marks the publisher released: their transactions are durable.
    pub(super) fn release(&mut self, marks: impl IntoIterator<Item = Mark>) {
        for mark in marks {
            // The other marks belong to the initial snapshot.
            if let Mark::Commit {
                end_lsn,
                commit_time_us,
            } = mark
            {
                self.confirmed = self.confirmed.max(end_lsn);
                self.last_commit_time_us = Some(commit_time_us);
            }
        }
    }

    /// A keepalive reported the walsender's WAL end.
    pub(super) fn keepalive(&mut self, wal_end: Lsn) {
        self.server_wal_end = self.server_wal_end.max(wal_end);
    }

    /// Confirms the walsender's WAL end when streaming from it (not reading
    /// a backlog) and nothing is `busy` (no transaction open, nothing in
    /// flight).
    pub(super) fn confirm_idle(&mut self, streaming: bool, busy: bool) {
        if streaming && !busy {
            self.confirmed = self.confirmed.max(self.server_wal_end);
        }
    }

    /// The backlog's last call is read and everything it returned is
    /// acknowledged: the calls read the WAL up to `read_to`, so nothing of
    /// the publication before it is left to send.
    pub(super) fn backlog_done(&mut self, read_to: Lsn) {
        self.confirmed = self.confirmed.max(read_to);
    }

    /// A backlog chunk was read and the WAL now ends at `wal_end`; returns
    /// how many bytes the confirmed LSN is behind it.
    pub(super) fn backlog_read(&mut self, wal_end: Lsn) -> u64 {
        self.backlog_wal_end = wal_end;
        wal_end.0.saturating_sub(self.confirmed.0)
    }

    /// Bytes of WAL the slot still holds: from the confirmed LSN to the
    /// newest WAL end seen from either source.
    pub(super) fn slot_lag_bytes(&self) -> u64 {
        let wal_end = self.server_wal_end.max(self.backlog_wal_end);
        wal_end.0.saturating_sub(self.confirmed.0)
    }

    /// Seconds since the last released commit while something is `busy`
    /// (waiting to be published); 0 when caught up.
    pub(super) fn lag_seconds(&self, busy: bool, now_us: i64) -> f64 {
        match self.last_commit_time_us {
            Some(t) if busy => (now_us - t).max(0) as f64 / 1e6,
            // Caught up: nothing is waiting to be published.
            _ => 0.0,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn commit(end_lsn: u64, commit_time_us: i64) -> Mark {
        Mark::Commit {
            end_lsn: Lsn(end_lsn),
            commit_time_us,
        }
    }

    #[test]
    fn released_marks_are_confirmed_and_never_go_backwards() {
        let mut c = Confirmation::new(Lsn(100));
        assert_eq!(c.confirmed(), Lsn(100));
        c.release([commit(150, 1), commit(200, 2)]);
        assert_eq!(c.confirmed(), Lsn(200));
        // A mark below the confirmed LSN (e.g. a replayed transaction) does
        // not move it back.
        c.release([commit(120, 3)]);
        assert_eq!(c.confirmed(), Lsn(200));
        // Nothing released, nothing moves.
        c.release([]);
        assert_eq!(c.confirmed(), Lsn(200));
    }

    #[test]
    fn the_wal_end_is_confirmed_only_when_streaming_and_idle() {
        let mut c = Confirmation::new(Lsn(100));
        c.keepalive(Lsn(500));
        // A transaction open or packages in flight: not yet durable.
        c.confirm_idle(true, true);
        assert_eq!(c.confirmed(), Lsn(100));
        // Reading a backlog: the WAL end is not what was read.
        c.confirm_idle(false, false);
        assert_eq!(c.confirmed(), Lsn(100));
        c.confirm_idle(true, false);
        assert_eq!(c.confirmed(), Lsn(500));
        // An older keepalive neither lowers the WAL end nor the confirmed LSN.
        c.keepalive(Lsn(300));
        assert_eq!(c.server_wal_end(), Lsn(500));
        c.confirm_idle(true, false);
        assert_eq!(c.confirmed(), Lsn(500));
    }

    #[test]
    fn a_backlog_chunk_end_is_never_confirmed() {
        let mut c = Confirmation::new(Lsn(100));
        assert_eq!(c.backlog_read(Lsn(1_000)), 900);
        c.confirm_idle(true, false);
        assert_eq!(c.confirmed(), Lsn(100));
        assert_eq!(c.slot_lag_bytes(), 900);
    }

    #[test]
    fn where_the_backlog_calls_read_is_confirmed_never_backwards() {
        let mut c = Confirmation::new(Lsn(100));
        c.release([commit(300, 1)]);
        c.backlog_done(Lsn(450));
        assert_eq!(c.confirmed(), Lsn(450));
        // A copy without a confirmed LSN (0) or behind moves nothing back.
        c.backlog_done(Lsn(0));
        assert_eq!(c.confirmed(), Lsn(450));
    }

    #[test]
    fn slot_lag_is_measured_from_the_newest_wal_end() {
        let mut c = Confirmation::new(Lsn(100));
        assert_eq!(c.slot_lag_bytes(), 0);
        c.keepalive(Lsn(400));
        c.backlog_read(Lsn(300));
        assert_eq!(c.slot_lag_bytes(), 300);
        c.release([commit(450, 1)]);
        // Confirmed past every WAL end seen: no lag, no underflow.
        assert_eq!(c.slot_lag_bytes(), 0);
    }

    #[test]
    fn lag_is_the_age_of_the_last_commit_while_busy() {
        let mut c = Confirmation::new(Lsn(0));
        assert_eq!(c.lag_seconds(true, 5_000_000), 0.0);
        c.release([commit(10, 1_000_000)]);
        assert_eq!(c.lag_seconds(true, 3_500_000), 2.5);
        assert_eq!(c.lag_seconds(false, 3_500_000), 0.0);
        // A clock behind the commit time never gives a negative lag.
        assert_eq!(c.lag_seconds(true, 0), 0.0);
    }
}
