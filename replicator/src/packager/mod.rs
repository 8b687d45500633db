//! Groups the rows of a transaction into packages, one table at a time, and
//! gives each package its chain position and dedup ID.
//!
//! Invariants this module is responsible for (ARCHITECTURE.md 2 and 3):
//! - **Deterministic boundaries.** Within a transaction a table's rows are
//!   cut into packages by row count and bytes only (never by time), so the same
//!   transaction re-read after a restart yields the same packages with the same
//!   `(commit_lsn, package_index)` and the same `Nats-Msg-Id`.
//! - **Chains without holes or repeats.** Each table has a chain
//!   `(generation, sequence)`; every published package takes the next sequence.
//!   After a restart the chain resumes from the last package found in the stream
//!   ([`Resume`]): replayed change packages at or before the newest one the
//!   stream holds (that package, or the one a resync package names) are
//!   skipped, not re-published, so the stream holds every change exactly once
//!   even beyond the duplicate window, and no re-read change takes a sequence
//!   that JetStream's duplicate check would leave empty.
//! - **Bounded memory.** A table's buffer is flushed as soon as it reaches
//!   `max_rows` or `max_bytes`: pgoutput v1 sends a transaction after it
//!   committed, with its commit LSN in BEGIN, so packages of a huge transaction
//!   are published while the rest of it streams in.

use std::collections::HashMap;
use std::sync::Arc;

use sluice_broker::TableName;
use sluice_broker::publish::Outgoing;
use sluice_broker::topology;
use sluice_proto::v1;

mod resume;

pub use resume::{Resume, StreamReadError, last_package};

#[derive(Debug)]
struct Chain {
    generation: u64,
    last_sequence: u64,
}

#[derive(Debug)]
struct Pending {
    relation: Arc<v1::Relation>,
    rows: Vec<v1::Row>,
    bytes: usize,
    first_row_ordinal: u64,
    /// Packages of this table already cut in this transaction.
    packages: u32,
}

#[derive(Debug, Clone, Copy)]
struct Transaction {
    commit_lsn: u64,
    commit_time_us: i64,
    xid: u32,
    next_ordinal: u64,
}

/// Limits of one package.
#[derive(Debug, Clone, Copy)]
pub struct Limits {
    pub max_rows: usize,
    pub max_bytes: usize,
}

/// Builds packages; see the module docs.
#[derive(Debug)]
pub struct Packager {
    source: String,
    slot: String,
    /// The slot's generation: resume points older than it are ignored.
    generation: u64,
    /// Generation of chains started from nothing (a table with no package in
    /// the stream). Above every generation used before, so a loader that
    /// still remembers an older chain of the table sees a gap instead of
    /// mistaking the new chain's packages for replays.
    fresh_generation: u64,
    limits: Limits,
    // foldhash: looked up for every row; keys are table names, not input
    // an attacker chooses.
    chains: HashMap<TableName, Chain, foldhash::fast::RandomState>,
    pending: HashMap<TableName, Pending, foldhash::fast::RandomState>,
    txn: Option<Transaction>,
    /// Per table, the publication fingerprint its packages carry
    /// (`v1::Relation::publication`; [`Packager::set_publication`]).
    publication: HashMap<TableName, String, foldhash::fast::RandomState>,
    /// Per table, the newest change package `(commit_lsn, package_index)`
    /// the stream holds: a re-read transaction at or before it is dropped,
    /// whatever chain the table is on now (a resync's RESYNC_BEGIN may have
    /// come after it). Resync packages carry it
    /// (`v1::Resync::changes_through_lsn`) for a restart after them.
    changes_through: HashMap<TableName, (u64, u32), foldhash::fast::RandomState>,
    /// How package payloads are encoded (`replicator.compression`).
    encoding: sluice_proto::Encoding,
    /// How snapshot packages are (`replicator.snapshot_compression`).
    snapshot_encoding: sluice_proto::Encoding,
    /// The buffer payloads are encoded into ([`sluice_proto::encode_pooled`]).
    pool: bytes::BytesMut,
}

/// Rough encoded size of a value, used for the byte limit.
pub fn value_size(value: &v1::Value) -> usize {
    use v1::value::Kind;
    3 + match &value.kind {
        None | Some(Kind::Null(_)) | Some(Kind::UnchangedToast(_)) | Some(Kind::Bool(_)) => 0,
        Some(Kind::Int(_)) | Some(Kind::Float(_)) | Some(Kind::Date(_)) | Some(Kind::Time(_)) => 8,
        Some(Kind::Timestamp(_)) | Some(Kind::Timestamptz(_)) => 8,
        Some(Kind::DateInfinity(_))
        | Some(Kind::TimestampInfinity(_))
        | Some(Kind::TimestamptzInfinity(_)) => 1,
        Some(Kind::Timetz(_)) => 12,
        Some(Kind::Interval(_)) => 16,
        Some(Kind::Numeric(s)) | Some(Kind::Text(s)) | Some(Kind::Json(s)) => s.len(),
        Some(Kind::Bytes(b)) | Some(Kind::Uuid(b)) => b.len(),
        Some(Kind::Array(a)) => a.elements.iter().map(value_size).sum::<usize>() + 4 * a.dims.len(),
    }
}

fn row_size(row: &v1::Row) -> usize {
    4 + row
        .values
        .iter()
        .chain(&row.old_key)
        .map(value_size)
        .sum::<usize>()
}

impl Packager {
    pub fn new(source: &str, slot: &str, generation: u64, limits: Limits) -> Self {
        Packager {
            source: source.to_owned(),
            slot: slot.to_owned(),
            generation,
            fresh_generation: generation,
            limits,
            chains: HashMap::default(),
            pending: HashMap::default(),
            txn: None,
            publication: HashMap::default(),
            changes_through: HashMap::default(),
            encoding: sluice_proto::Encoding::Zstd,
            snapshot_encoding: sluice_proto::Encoding::Zstd,
            pool: bytes::BytesMut::new(),
        }
    }

    /// Encodes package payloads with `encoding` (zstd by default), and
    /// those of snapshot packages with `snapshot` (zstd by default).
    pub fn with_encoding(
        mut self,
        encoding: sluice_proto::Encoding,
        snapshot: sluice_proto::Encoding,
    ) -> Self {
        self.encoding = encoding;
        self.snapshot_encoding = snapshot;
        self
    }

    /// The publication fingerprint the packages of `table` carry from now on
    /// (`v1::Relation::publication`): what the publication said of the table
    /// when its rows in ClickHouse were last made to match it.
    pub fn set_publication(&mut self, table: &TableName, fingerprint: String) {
        self.publication.insert(table.clone(), fingerprint);
    }

    /// Stamps `package` with its table's publication fingerprint.
    fn stamp(&self, table: &TableName, package: &mut v1::Package) {
        if let (Some(relation), Some(fingerprint)) =
            (package.relation.as_mut(), self.publication.get(table))
        {
            relation.publication.clone_from(fingerprint);
        }
    }

    /// The slot's generation.
    pub fn generation(&self) -> u64 {
        self.generation
    }

    /// Sets the generation of chains started from nothing; see the field docs.
    /// Call with a value above every generation ever used for this source,
    /// e.g. the server's current WAL position.
    pub fn set_fresh_generation(&mut self, generation: u64) {
        self.fresh_generation = generation.max(self.generation);
    }

    /// Continues a table's chain after the package found in the stream. A
    /// resume point of an older generation than the packager's is ignored: the
    /// table starts a new chain (the loader sees the new generation and
    /// resyncs). A newer one (the table was resynced) is adopted.
    pub fn resume(&mut self, table: TableName, resume: Resume) {
        if resume.generation < self.generation {
            return;
        }
        if let Some(through) = resume.changes_through {
            self.changes_through.insert(table.clone(), through);
        }
        self.chains.insert(
            table,
            Chain {
                generation: resume.generation,
                last_sequence: resume.sequence,
            },
        );
    }

    /// The newest change package of `table` the stream holds, as
    /// `(commit_lsn, package_index)`.
    pub fn changes_through(&self, table: &TableName) -> Option<(u64, u32)> {
        self.changes_through.get(table).copied()
    }

    /// Starts a new chain for one table (a resync): the next package of the
    /// table, its RESYNC_BEGIN, gets `(generation, 1)`.
    pub fn start_generation(&mut self, table: TableName, generation: u64) {
        self.chains.insert(
            table,
            Chain {
                generation,
                last_sequence: 0,
            },
        );
    }

    /// Starts a transaction (pgoutput BEGIN: final LSN, commit time, xid).
    pub fn begin(&mut self, commit_lsn: u64, commit_time_us: i64, xid: u32) {
        self.pending.clear();
        self.txn = Some(Transaction {
            commit_lsn,
            commit_time_us,
            xid,
            next_ordinal: 0,
        });
    }

    /// Whether a transaction is open.
    pub fn in_transaction(&self) -> bool {
        self.txn.is_some()
    }

    /// Adds a row of the open transaction; returns a package when the table's
    /// buffer reached a limit.
    pub fn add_row(
        &mut self,
        table: &TableName,
        relation: &Arc<v1::Relation>,
        row: v1::Row,
    ) -> Option<Outgoing> {
        let txn = self.txn.as_mut()?;
        let ordinal = txn.next_ordinal;
        txn.next_ordinal += 1;
        let size = row_size(&row);
        if !self.pending.contains_key(table) {
            self.pending.insert(
                table.clone(),
                Pending {
                    relation: relation.clone(),
                    rows: Vec::new(),
                    bytes: 0,
                    first_row_ordinal: ordinal,
                    packages: 0,
                },
            );
        }
        let pending = self.pending.get_mut(table)?;
        if !Arc::ptr_eq(&pending.relation, relation) && pending.relation != *relation {
            // The relation changed mid-transaction (DDL): cut the package so
            // each package's rows match its relation.
            let cut = self.cut(table, false);
            let pending = self.pending.get_mut(table)?;
            pending.relation = relation.clone();
            pending.first_row_ordinal = ordinal;
            pending.rows.push(row);
            pending.bytes += size;
            return cut;
        }
        if pending.rows.is_empty() {
            pending.first_row_ordinal = ordinal;
        }
        pending.rows.push(row);
        pending.bytes += size;
        if pending.rows.len() >= self.limits.max_rows || pending.bytes >= self.limits.max_bytes {
            return self.cut(table, false);
        }
        None
    }

    /// A TRUNCATE of `table` in the open transaction: the table's buffered rows
    /// go first, then the truncate package.
    pub fn truncate(
        &mut self,
        table: &TableName,
        relation: &Arc<v1::Relation>,
        truncate: v1::Truncate,
    ) -> Vec<Outgoing> {
        let mut out: Vec<Outgoing> = self.cut(table, false).into_iter().collect();
        let Some(txn) = self.txn else { return out };
        let pending = self
            .pending
            .entry(table.clone())
            .or_insert_with(|| Pending {
                relation: relation.clone(),
                rows: Vec::new(),
                bytes: 0,
                first_row_ordinal: txn.next_ordinal,
                packages: 0,
            });
        let index = pending.packages;
        pending.packages += 1;
        let mut package = self.base_package(
            table,
            relation,
            v1::Kind::Truncate,
            &txn,
            index,
            txn.next_ordinal,
        );
        package.truncate = Some(truncate);
        if let Some(txn) = self.txn.as_mut() {
            // The truncate takes an ordinal so rows after it in the same
            // transaction order after it.
            txn.next_ordinal += 1;
        }
        out.extend(self.sequence(table, package));
        out
    }

    /// Ends the transaction: flushes every table's remaining rows.
    pub fn commit(&mut self) -> Vec<Outgoing> {
        let mut tables: Vec<TableName> = self.pending.keys().cloned().collect();
        // Deterministic order across runs (HashMap order is not).
        tables.sort();
        let out = tables.iter().filter_map(|t| self.cut(t, true)).collect();
        self.pending.clear();
        self.txn = None;
        out
    }

    fn cut(&mut self, table: &TableName, last: bool) -> Option<Outgoing> {
        let txn = self.txn?;
        let pending = self.pending.get_mut(table)?;
        if pending.rows.is_empty() {
            return None;
        }
        let index = pending.packages;
        pending.packages += 1;
        let rows = std::mem::take(&mut pending.rows);
        pending.bytes = 0;
        let first = pending.first_row_ordinal;
        let relation = pending.relation.clone();
        let mut package =
            self.base_package(table, &relation, v1::Kind::Changes, &txn, index, first);
        package.rows = rows;
        package.last_in_transaction = last;
        self.sequence(table, package)
    }

    fn base_package(
        &self,
        table: &TableName,
        relation: &Arc<v1::Relation>,
        kind: v1::Kind,
        txn: &Transaction,
        package_index: u32,
        first_row_ordinal: u64,
    ) -> v1::Package {
        v1::Package {
            source: self.source.clone(),
            schema: table.schema.clone(),
            table: table.name.clone(),
            kind: kind as i32,
            relation: Some((**relation).clone()),
            position: None,
            commit_lsn: txn.commit_lsn,
            commit_time_us: txn.commit_time_us,
            xid: txn.xid,
            package_index,
            first_row_ordinal,
            rows: Vec::new(),
            truncate: None,
            resync: None,
            last_in_transaction: false,
            snapshot_progress: None,
            copy_text: Default::default(),
            copy_rows: 0,
        }
    }

    /// Gives a change package its chain position, or drops it if the stream
    /// already holds it.
    fn sequence(&mut self, table: &TableName, mut package: v1::Package) -> Option<Outgoing> {
        self.stamp(table, &mut package);
        let identity = (package.commit_lsn, package.package_index);
        if self
            .changes_through
            .get(table)
            .is_some_and(|stored| identity <= *stored)
        {
            return None;
        }
        self.changes_through.insert(table.clone(), identity);
        let generation = self.fresh_generation;
        let chain = self.chains.entry(table.clone()).or_insert(Chain {
            generation,
            last_sequence: 0,
        });
        chain.last_sequence += 1;
        package.position = Some(v1::ChainPosition {
            generation: chain.generation,
            sequence: chain.last_sequence,
        });
        let msg_id = topology::change_msg_id(
            &self.slot,
            package.commit_lsn,
            &package.schema,
            &package.table,
            package.package_index,
        );
        Some(self.outgoing(package, msg_id))
    }

    /// Appends a package built elsewhere (snapshot, resync markers) to a
    /// table's chain; its dedup ID is derived from generation and sequence.
    pub fn chain_package(&mut self, mut package: v1::Package) -> Outgoing {
        let table = TableName::new(&package.schema, &package.table);
        self.stamp(&table, &mut package);
        if let Some((lsn, index)) = self.changes_through.get(&table) {
            let resync = package.resync.get_or_insert_with(Default::default);
            resync.changes_through_lsn = *lsn;
            resync.changes_through_index = *index;
        }
        let generation = self.fresh_generation;
        let chain = self.chains.entry(table).or_insert(Chain {
            generation,
            last_sequence: 0,
        });
        chain.last_sequence += 1;
        package.position = Some(v1::ChainPosition {
            generation: chain.generation,
            sequence: chain.last_sequence,
        });
        let msg_id = topology::snapshot_msg_id(
            &self.slot,
            chain.generation,
            &package.schema,
            &package.table,
            chain.last_sequence,
        );
        self.outgoing(package, msg_id)
    }

    fn outgoing(&mut self, package: v1::Package, msg_id: String) -> Outgoing {
        let encoding = if package.kind == v1::Kind::Snapshot as i32 {
            self.snapshot_encoding
        } else {
            self.encoding
        };
        Outgoing {
            subject: topology::table_subject(&self.source, &package.schema, &package.table),
            msg_id,
            position: sluice_broker::chunk::position_of(&package),
            payload: sluice_proto::encode_pooled(&package, encoding, &mut self.pool),
            encoding,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn relation() -> Arc<v1::Relation> {
        Arc::new(v1::Relation {
            oid: 1,
            columns: vec![v1::Column {
                name: "id".into(),
                type_oid: 20,
                key: true,
                ..Default::default()
            }],
            replica_identity: "d".into(),
            publication: String::new(),
        })
    }

    fn row(i: i64) -> v1::Row {
        v1::Row {
            op: v1::Op::Insert as i32,
            values: vec![v1::Value {
                kind: Some(v1::value::Kind::Int(i)),
            }],
            old_key: vec![],
        }
    }

    fn decode(out: &Outgoing) -> v1::Package {
        sluice_proto::decode(&out.payload, None).expect("valid package")
    }

    fn table(name: &str) -> TableName {
        TableName::new("public", name)
    }

    /// Runs one transaction of `rows` rows on table `t`, returning what was published.
    fn run_txn(p: &mut Packager, lsn: u64, rows: i64) -> Vec<Outgoing> {
        let rel = relation();
        let t = table("t");
        p.begin(lsn, 0, 7);
        let mut out: Vec<Outgoing> = (0..rows)
            .filter_map(|i| p.add_row(&t, &rel, row(i)))
            .collect();
        out.extend(p.commit());
        out
    }

    fn limits() -> Limits {
        Limits {
            max_rows: 10,
            max_bytes: 1 << 20,
        }
    }

    #[test]
    fn large_transactions_are_cut_by_rows_with_consecutive_sequences() {
        let mut p = Packager::new("app", "slot", 5, limits());
        let out = run_txn(&mut p, 100, 25);
        let packages: Vec<_> = out.iter().map(decode).collect();
        assert_eq!(
            packages.iter().map(|p| p.rows.len()).collect::<Vec<_>>(),
            [10, 10, 5]
        );
        assert_eq!(
            packages
                .iter()
                .map(|p| p.position.expect("positioned").sequence)
                .collect::<Vec<_>>(),
            [1, 2, 3]
        );
        assert_eq!(
            packages.iter().map(|p| p.package_index).collect::<Vec<_>>(),
            [0, 1, 2]
        );
        assert_eq!(
            packages
                .iter()
                .map(|p| p.first_row_ordinal)
                .collect::<Vec<_>>(),
            [0, 10, 20]
        );
        assert!(packages[2].last_in_transaction && !packages[0].last_in_transaction);
        assert_eq!(out[0].subject, "sluice.app.public.t");
        assert_eq!(out[1].msg_id, "slot:64:public.t:1");
    }

    #[test]
    fn byte_limit_cuts_packages() {
        let mut p = Packager::new(
            "app",
            "slot",
            5,
            Limits {
                max_rows: 1000,
                max_bytes: 100,
            },
        );
        let out = run_txn(&mut p, 100, 30);
        assert!(out.len() > 1, "30 rows of ~15 bytes exceed 100 bytes");
    }

    #[test]
    fn replay_after_restart_skips_what_the_stream_holds_and_continues_the_chain() {
        let mut first = Packager::new("app", "slot", 5, limits());
        let mut published = run_txn(&mut first, 100, 25);
        // Crash after the second package of the second transaction reached the stream.
        let second = run_txn(&mut first, 200, 25);
        published.extend(second.into_iter().take(2));
        let last = decode(published.last().expect("published"));

        let mut restarted = Packager::new("app", "slot", 5, limits());
        restarted.resume(table("t"), Resume::from_package(&last).expect("positioned"));
        // Postgres replays both transactions from the confirmed LSN.
        assert!(
            run_txn(&mut restarted, 100, 25).is_empty(),
            "first transaction fully stored"
        );
        let replay = run_txn(&mut restarted, 200, 25);
        assert_eq!(
            replay.len(),
            1,
            "only the missing third package is re-published"
        );
        let package = decode(&replay[0]);
        assert_eq!(package.package_index, 2);
        assert_eq!(package.position.expect("positioned").sequence, 6);
        let next = run_txn(&mut restarted, 300, 1);
        assert_eq!(decode(&next[0]).position.expect("positioned").sequence, 7);
    }

    #[test]
    fn a_resync_starts_a_new_chain_that_survives_a_restart() {
        let mut p = Packager::new("app", "slot", 5, limits());
        run_txn(&mut p, 100, 1);
        p.start_generation(table("t"), 900);
        let begin = p.chain_package(v1::Package {
            schema: "public".into(),
            table: "t".into(),
            kind: v1::Kind::ResyncBegin as i32,
            ..Default::default()
        });
        let begin = decode(&begin).position.expect("positioned");
        assert_eq!((begin.generation, begin.sequence), (900, 1));
        let change = decode(&run_txn(&mut p, 1000, 1)[0]);
        assert_eq!(change.position.expect("positioned").sequence, 2);

        let mut restarted = Packager::new("app", "slot", 5, limits());
        restarted.resume(
            table("t"),
            Resume::from_package(&change).expect("positioned"),
        );
        let next = decode(&run_txn(&mut restarted, 1100, 1)[0])
            .position
            .expect("positioned");
        assert_eq!((next.generation, next.sequence), (900, 3));
    }

    /// A restart whose last package of the table is a resync's (its
    /// RESYNC_BEGIN or a snapshot package): transactions re-read from the
    /// confirmed LSN were published before it, on the old chain. Numbered
    /// again on the new chain, JetStream would drop them as duplicates and
    /// leave holes the loader takes for a gap.
    #[test]
    fn a_restart_after_a_resync_package_skips_changes_published_before_it() {
        let mut p = Packager::new("app", "slot", 5, limits());
        run_txn(&mut p, 100, 25);
        p.start_generation(table("t"), 900);
        let begin = decode(&p.chain_package(v1::Package {
            schema: "public".into(),
            table: "t".into(),
            kind: v1::Kind::ResyncBegin as i32,
            resync: Some(v1::Resync::default()),
            ..Default::default()
        }));
        let snapshot = decode(&p.chain_package(v1::Package {
            schema: "public".into(),
            table: "t".into(),
            kind: v1::Kind::Snapshot as i32,
            ..Default::default()
        }));
        for last in [begin, snapshot] {
            let mut restarted = Packager::new("app", "slot", 5, limits());
            restarted.resume(table("t"), Resume::from_package(&last).expect("positioned"));
            assert!(
                run_txn(&mut restarted, 100, 25).is_empty(),
                "the stream holds that transaction"
            );
            let next = decode(&run_txn(&mut restarted, 200, 1)[0])
                .position
                .expect("positioned");
            let after = last.position.expect("positioned").sequence + 1;
            assert_eq!((next.generation, next.sequence), (900, after));
        }
    }

    #[test]
    fn a_table_without_resume_point_starts_above_every_old_generation() {
        // The table's packages aged out of the stream; the loader remembers (5, 40).
        let mut p = Packager::new("app", "slot", 5, limits());
        p.set_fresh_generation(7000);
        let out = run_txn(&mut p, 7100, 1);
        let position = decode(&out[0]).position.expect("positioned");
        assert_eq!(
            (position.generation, position.sequence),
            (7000, 1),
            "a gap for the loader, not a replay"
        );
    }

    #[test]
    fn resume_point_of_an_older_generation_starts_a_new_chain() {
        let mut p = Packager::new("app", "slot", 9, limits());
        p.resume(
            table("t"),
            Resume {
                generation: 5,
                sequence: 40,
                commit_lsn: 100,
                package_index: 0,
                kind: v1::Kind::Changes,
                changes_through: Some((100, 0)),
            },
        );
        let out = run_txn(&mut p, 50, 1);
        let position = decode(&out[0]).position.expect("positioned");
        assert_eq!((position.generation, position.sequence), (9, 1));
    }

    #[test]
    fn truncate_flushes_buffered_rows_first() {
        let mut p = Packager::new("app", "slot", 1, limits());
        let rel = relation();
        let t = table("t");
        p.begin(10, 0, 1);
        assert!(p.add_row(&t, &rel, row(1)).is_none());
        let out = p.truncate(
            &t,
            &rel,
            v1::Truncate {
                cascade: false,
                restart_identity: true,
            },
        );
        let kinds: Vec<_> = out.iter().map(|o| decode(o).kind).collect();
        assert_eq!(kinds, [v1::Kind::Changes as i32, v1::Kind::Truncate as i32]);
        assert!(p.add_row(&t, &rel, row(2)).is_none());
        let tail = p.commit();
        let tail = decode(&tail[0]);
        assert_eq!(tail.package_index, 2);
        assert_eq!(
            tail.first_row_ordinal, 2,
            "rows after the truncate order after it"
        );
    }

    #[test]
    fn tables_of_one_transaction_get_their_own_chains() {
        let mut p = Packager::new("app", "slot", 1, limits());
        let rel = relation();
        p.begin(10, 0, 1);
        p.add_row(&table("b"), &rel, row(1));
        p.add_row(&table("a"), &rel, row(2));
        let out: Vec<_> = p.commit().iter().map(decode).collect();
        assert_eq!(
            out.iter().map(|p| p.table.as_str()).collect::<Vec<_>>(),
            ["a", "b"]
        );
        assert!(
            out.iter()
                .all(|p| p.position.expect("positioned").sequence == 1)
        );
        assert_eq!(out[0].first_row_ordinal, 1);
    }
}
