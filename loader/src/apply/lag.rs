//! The replication lag gauge `sluice_loader_lag_seconds{table}`: now minus
//! the commit time of the newest change applied to the table, or of the
//! newest heartbeat once everything before it was applied (so an idle table
//! does not look late).
//!
//! Only committed batches count: [`Lag::adopt`] is called after a batch's
//! positions were written.

use std::collections::HashMap;

use metrics::gauge;
use sluice_broker::TableName;

use crate::metrics as m;

/// Newest commit times seen, per table and of heartbeats.
#[derive(Debug, Default)]
pub(super) struct Lag {
    commit_times: HashMap<TableName, i64>,
    heartbeat_time: Option<i64>,
}

/// Newest commit time per table of one batch's applied changes.
pub(super) type BatchCommitTimes = HashMap<TableName, i64>;

/// Notes that a change of `table` committed at `time_us` is being applied.
pub(super) fn note_commit(times: &mut BatchCommitTimes, table: &TableName, time_us: i64) {
    let entry = times.entry(table.clone()).or_insert(time_us);
    *entry = (*entry).max(time_us);
}

impl Lag {
    /// Takes in the commit times of an applied batch and its last heartbeat.
    pub(super) fn adopt(&mut self, commit_times: BatchCommitTimes, heartbeat: Option<i64>) {
        for (table, time) in commit_times {
            let entry = self.commit_times.entry(table).or_insert(time);
            *entry = (*entry).max(time);
        }
        if let Some(time) = heartbeat {
            self.heartbeat_time = Some(time);
        }
    }

    /// Stops reporting a table another loader applies now: its series here
    /// reads 0 from now on (the applying loader's is the one to read).
    pub(super) fn forget(&mut self, table: &TableName) {
        if self.commit_times.remove(table).is_some() {
            gauge!(m::LOADER_LAG_SECONDS, "table" => table.to_string()).set(0.0);
        }
    }

    /// Refreshes `sluice_loader_lag_seconds` for every table seen.
    pub(super) fn update(&self) {
        let now = sluice_now_us();
        for (table, commit) in &self.commit_times {
            let newest = (*commit).max(self.heartbeat_time.unwrap_or(i64::MIN));
            gauge!(m::LOADER_LAG_SECONDS, "table" => table.to_string())
                .set((now - newest).max(0) as f64 / 1e6);
        }
    }
}

fn sluice_now_us() -> i64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_micros() as i64)
        .unwrap_or(0)
}
