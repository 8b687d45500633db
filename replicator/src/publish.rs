//! What the replicator hands to the broker's publisher besides chain
//! packages: the [`Mark`] that carries a transaction's commit LSN through the
//! publisher (it comes back only once every package before it is
//! acknowledged, ARCHITECTURE.md invariant 1), and heartbeats on the control
//! subject. Shared by the initial snapshot ([`crate::snapshot`]) and the
//! streaming loop ([`crate::stream`]), so neither imports the other for it.

use std::time::{Duration, SystemTime, UNIX_EPOCH};

use sluice_broker::TableName;
use sluice_broker::publish::Outgoing;
use sluice_broker::topology;
use sluice_proto::v1;

use crate::replication::Lsn;

/// What a mark in the publisher stands for.
pub enum Mark {
    /// A transaction is durable up to this LSN; its commit time.
    Commit { end_lsn: Lsn, commit_time_us: i64 },
    /// Every package of chunk `index` of a table's snapshot (initial or a
    /// resync's, on the chain of `generation`; `rows` rows) is durable: its
    /// progress record may list it.
    Chunk {
        table: TableName,
        generation: u64,
        index: u32,
        rows: u64,
    },
    /// A table's RESYNC_END (on the chain of `generation`) is durable: its
    /// snapshot needs no record.
    TableEnd { table: TableName, generation: u64 },
}

/// The publisher of the replicator: packages out, [`Mark`]s released in order.
pub type Publisher = sluice_broker::publish::Publisher<Mark>;

/// A heartbeat: liveness, the current generation and the WAL position, on the
/// control subject.
pub fn heartbeat_package(source: &str, generation: u64, wal_end: u64) -> v1::Package {
    v1::Package {
        source: source.to_owned(),
        kind: v1::Kind::Heartbeat as i32,
        position: Some(v1::ChainPosition {
            generation,
            sequence: 0,
        }),
        commit_lsn: wal_end,
        commit_time_us: now_us(),
        ..Default::default()
    }
}

/// The heartbeat as a publish; its ID is unique per instant (heartbeats are
/// idempotent, so no dedup is needed).
pub fn heartbeat_outgoing(source: &str, slot: &str, package: v1::Package) -> Outgoing {
    Outgoing {
        subject: topology::heartbeat_subject(source),
        msg_id: format!("{slot}:hb:{}", package.commit_time_us),
        position: sluice_broker::chunk::position_of(&package),
        payload: sluice_proto::encode(&package, sluice_proto::Encoding::Zstd).into(),
        encoding: sluice_proto::Encoding::Zstd,
    }
}

/// Microseconds since the Unix epoch.
pub fn now_us() -> i64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .unwrap_or(Duration::ZERO)
        .as_micros() as i64
}

/// The time in microseconds, never the same twice in this process: the
/// suffix of a resync's temporary slot (two resyncs starting in the same
/// microsecond, a publication change of two tables, got the same slot name,
/// and one failed with "replication slot … already exists"), and the
/// message IDs of progress records (two in one microsecond would have the
/// same, and JetStream would drop the second as a duplicate).
pub fn unique_now_us() -> u64 {
    use std::sync::atomic::{AtomicU64, Ordering};
    static LAST: AtomicU64 = AtomicU64::new(0);
    let now = u64::try_from(now_us()).unwrap_or(0);
    let mut last = LAST.load(Ordering::Relaxed);
    loop {
        let next = now.max(last + 1);
        match LAST.compare_exchange_weak(last, next, Ordering::Relaxed, Ordering::Relaxed) {
            Ok(_) => return next,
            Err(actual) => last = actual,
        }
    }
}

#[cfg(test)]
mod tests {
    #[test]
    fn unique_times_never_repeat() {
        let threads: Vec<_> = (0..4)
            .map(|_| {
                std::thread::spawn(|| {
                    (0..1000)
                        .map(|_| super::unique_now_us())
                        .collect::<Vec<_>>()
                })
            })
            .collect();
        let mut all: Vec<u64> = threads
            .into_iter()
            .flat_map(|t| t.join().unwrap())
            .collect();
        let n = all.len();
        all.sort_unstable();
        all.dedup();
        assert_eq!(all.len(), n, "a time was handed out twice");
    }
}
