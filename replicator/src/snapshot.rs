//! Snapshots: every row of a table as of a slot's exported snapshot, as
//! `SNAPSHOT` packages framed by `RESYNC_BEGIN` and `RESYNC_END`.
//!
//! Readers import the snapshot (`REPEATABLE READ` + `SET TRANSACTION
//! SNAPSHOT`) while the connection that created the slot stays idle, which
//! keeps the snapshot alive; tables are read in parallel
//! (`replicator.snapshot_parallelism`) with `COPY … TO STDOUT`, the fastest way
//! out of Postgres. Rows flow through a bounded channel to the one task that
//! owns the chains and the publisher, so memory stays bounded and chains stay
//! ordered. Snapshot rows carry the consistent point as their commit LSN; see
//! `sluice_proto::row_version` for why streamed changes always win over them.

use std::collections::{BTreeSet, HashMap, VecDeque};
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};

use metrics::{counter, gauge};
use sluice_broker::TableName;
use sluice_broker::config::Config;
use sluice_broker::publish::PublishError;
use sluice_broker::table::quote_ident;
use sluice_broker::topology;
use sluice_proto::v1;
use tokio::sync::mpsc;
use tokio_util::sync::CancellationToken;

use crate::catalog::{self, CatalogError, TypeCatalog, TypeInfo};
use crate::metrics as m;
use crate::packager::Packager;
use crate::pg::{PgError, PgSettings, SqlConn};
use crate::publish::{Mark, Publisher, now_us, unique_now_us};
use crate::replication::{Lsn, ReplicationError, SqlSession, quote_literal};
use sluice_proto::values;

#[derive(Debug, thiserror::Error)]
pub enum SnapshotError {
    #[error(transparent)]
    Pg(#[from] PgError),
    #[error(transparent)]
    Catalog(#[from] CatalogError),
    #[error(transparent)]
    Publish(#[from] PublishError),
    #[error("snapshot of {table}: malformed COPY row {row}")]
    Copy { table: String, row: u64 },
    /// A reading session failed: connecting, a statement, or its `COPY`.
    #[error("snapshot: {what}")]
    Session {
        what: String,
        #[source]
        source: ReplicationError,
    },
    #[error("snapshot reader of {0} stopped unexpectedly")]
    ReaderLost(String),
    #[error(
        "{0} was rewritten (VACUUM FULL, CLUSTER, TRUNCATE or ALTER TABLE) while its snapshot was read; the snapshot starts again"
    )]
    Rewritten(String),
    /// A resync could not open its replication connection or create its
    /// temporary slot.
    #[error("resync of {table}: cannot create its temporary slot")]
    ResyncSlot {
        table: String,
        #[source]
        source: ReplicationError,
    },
}

/// What a snapshot reader reports, per table in order: Begin, then
/// Package… and ChunkDone… (of several chunks interleaved), then End.
pub(crate) enum Event {
    Begin {
        table: TableName,
        relation: Arc<v1::Relation>,
        estimate: u64,
        /// The snapshot's consistent point.
        lsn: Lsn,
        /// The table's chunks, and the file they were cut from.
        ranges: Vec<PageRange>,
        relfilenode: u32,
        /// Set when an earlier run began the table (its RESYNC_BEGIN is in
        /// the stream): the chunks it finished and their rows.
        resumed: Option<(BTreeSet<u32>, u64)>,
    },
    Package(Box<v1::Package>),
    /// A resync's temporary slot exists, with this consistent point: the
    /// stream holds back until the table's Begin (see `stream::resync`).
    SlotCreated {
        lsn: Lsn,
    },
    /// Every package of a chunk was reported.
    ChunkDone {
        table: TableName,
        index: u32,
        rows: u64,
    },
    End {
        table: TableName,
        relation: Arc<v1::Relation>,
        rows: u64,
    },
}

/// What one snapshot is about.
#[derive(Debug, Clone)]
pub struct SnapshotSpec {
    /// Set for resyncs on request; initial snapshots derive it from the generation.
    pub resync_id: String,
    pub snapshot_name: String,
    pub consistent_point: Lsn,
    pub reason: String,
}

/// How a table's part of a snapshot starts.
#[derive(Debug, Clone, PartialEq)]
pub enum TableStart {
    /// From the beginning: RESYNC_BEGIN, every chunk, RESYNC_END.
    Fresh,
    /// Begun by an earlier run of the initial snapshot (its RESYNC_BEGIN is
    /// in the stream, its RESYNC_END is not): the chunks its progress record
    /// does not list as finished, then RESYNC_END. Without a record, or when
    /// the table was rewritten since (another relfilenode), every chunk.
    /// With the relation of its last package: when the table's columns or
    /// replica identity differ now, it starts over (a new RESYNC_BEGIN, so
    /// the loader drops the rows of the old shape).
    Continue(Option<v1::TableProgress>, Option<v1::Relation>),
}

/// The initial snapshot: which slot generation its chains belong to, and
/// for a snapshot that an earlier run began, how far that got.
pub struct Initial<'a> {
    pub snapshot_name: &'a str,
    /// Where this run's snapshot is consistent: the slot's consistent point,
    /// or when resuming, a temporary slot's (see README "Snapshots of big
    /// tables" for why rows read at a later point are still consistent).
    pub consistent_point: Lsn,
    /// The slot's consistent point (the chains' generation).
    pub generation: u64,
    pub tables: Vec<(TableName, TableStart)>,
    pub reason: &'a str,
}

/// The initial snapshot of every table (also used after a slot was lost),
/// or the rest of one an earlier run began. Publishes a progress record
/// (`SnapshotProgress`) at the start and whenever chunks are durable.
pub async fn initial(
    config: &Config,
    settings: &PgSettings,
    initial: Initial<'_>,
    packager: &mut Packager,
    publisher: &mut Publisher,
    shutdown: &CancellationToken,
) -> Result<(), SnapshotError> {
    let spec = SnapshotSpec {
        resync_id: String::new(),
        snapshot_name: initial.snapshot_name.to_owned(),
        consistent_point: initial.consistent_point,
        reason: initial.reason.to_owned(),
    };
    let generation = initial.generation;
    let source = config.source.clone();
    let mut progress = Progress::initial(generation, &source, &config.postgres.slot);
    for (table, start) in &initial.tables {
        if let TableStart::Continue(Some(recorded), _) = start {
            progress.tables.insert(table.clone(), recorded.clone());
        }
    }
    let (tx, mut rx) = mpsc::channel::<Result<Event, SnapshotError>>(8);
    let readers = Readers::new(config, settings, spec.clone());
    let reading = tokio::spawn(async move {
        if let Err(error) = read_tables(readers, initial.tables, &tx).await {
            let _ = tx.send(Err(error)).await;
        }
    });
    publisher.publish(progress.outgoing()).await?;
    let mut ordinals: HashMap<TableName, Ordinals> = HashMap::new();
    while let Some(event) = tokio::select! {
        event = rx.recv() => event,
        _ = shutdown.cancelled() => None,
    } {
        match event? {
            Event::Begin {
                table,
                relation,
                estimate,
                ranges,
                relfilenode,
                resumed,
                ..
            } => {
                let label = table.to_string();
                gauge!(m::RESYNC_IN_PROGRESS, "table" => label.clone()).set(1.0);
                progress.begin(&table, &ranges, relfilenode, resumed.clone());
                match resumed {
                    Some((finished, rows)) => {
                        tracing::info!(table = %label, chunks = ranges.len(), finished = finished.len(), rows, "snapshot resumed");
                        ordinals.insert(table, Ordinals::starting_at(rows));
                    }
                    None => {
                        tracing::info!(table = %label, estimated_rows = estimate, reason = %spec.reason, "snapshot started");
                        counter!(m::RESYNCS, "table" => label, "reason" => spec.reason.clone())
                            .increment(1);
                        let package = marker(
                            &source,
                            &table,
                            &relation,
                            v1::Kind::ResyncBegin,
                            &spec,
                            generation,
                            estimate,
                        );
                        publisher.publish(packager.chain_package(package)).await?;
                    }
                }
            }
            // Sent by resyncs only.
            Event::SlotCreated { .. } => {}
            Event::Package(mut package) => {
                let table = TableName::new(&package.schema, &package.table);
                ordinals.entry(table).or_default().stamp(&mut package);
                publisher.publish(packager.chain_package(*package)).await?;
            }
            Event::ChunkDone { table, index, rows } => {
                publisher.mark(Mark::Chunk {
                    table,
                    generation,
                    index,
                    rows,
                });
            }
            Event::End {
                table,
                relation,
                rows,
            } => {
                let label = table.to_string();
                ordinals.remove(&table);
                let package = marker(
                    &source,
                    &table,
                    &relation,
                    v1::Kind::ResyncEnd,
                    &spec,
                    generation,
                    rows,
                );
                publisher.publish(packager.chain_package(package)).await?;
                publisher.mark(Mark::TableEnd { table, generation });
                gauge!(m::RESYNC_IN_PROGRESS, "table" => label.clone()).set(0.0);
                tracing::info!(table = %label, rows, "snapshot published");
            }
        }
        let released = publisher.poll_released()?;
        if progress.record(&released, publisher).await? {
            // Crash tests: the process dies once a progress record is stored.
            #[cfg(feature = "failpoints")]
            if fail::eval("replicator::snapshot::progress_recorded", |_| ()).is_some() {
                let _ = publisher.flush().await;
                crate::crash_here::<()>();
            }
        }
    }
    reading.abort();
    let _ = reading.await;
    if !shutdown.is_cancelled() {
        let released = publisher.flush().await?;
        progress.record(&released, publisher).await?;
        publisher.flush().await?;
    }
    Ok(())
}

/// A snapshot's progress record (the initial snapshot's, or one table's
/// resync's), as the stream holds it once every package it counts is
/// acknowledged.
pub(crate) struct Progress {
    generation: u64,
    tables: std::collections::BTreeMap<TableName, v1::TableProgress>,
    /// Empty for the initial snapshot.
    resync_id: String,
    reason: String,
    source: String,
    subject: String,
    /// Prefix of the records' message IDs.
    msg_id: String,
}

impl Progress {
    /// The initial snapshot's record, of the chains of `generation`.
    pub(crate) fn initial(generation: u64, source: &str, slot: &str) -> Progress {
        Progress {
            generation,
            tables: Default::default(),
            resync_id: String::new(),
            reason: String::new(),
            source: source.to_owned(),
            subject: topology::snapshot_progress_subject(source),
            msg_id: format!("{slot}:snapshot"),
        }
    }

    /// The record of one table's resync, on the chain of `generation`.
    pub(crate) fn resync(
        table: &TableName,
        generation: u64,
        spec: &SnapshotSpec,
        source: &str,
        slot: &str,
    ) -> Progress {
        Progress {
            generation,
            tables: Default::default(),
            resync_id: spec.resync_id.clone(),
            reason: spec.reason.clone(),
            source: source.to_owned(),
            subject: topology::resync_progress_subject(source, &table.schema, &table.name),
            msg_id: format!(
                "{slot}:resync:{}.{}",
                topology::subject_token(&table.schema),
                topology::subject_token(&table.name)
            ),
        }
    }

    /// Whether the record lists no table: for a resync's, that it ended.
    pub(crate) fn is_empty(&self) -> bool {
        self.tables.is_empty()
    }

    /// How many chunks the record lists as finished.
    #[cfg(feature = "failpoints")]
    pub(crate) fn finished_chunks(&self) -> usize {
        self.tables.values().map(|t| t.finished.len()).sum()
    }

    /// A table's snapshot began (`resumed`: what an earlier run finished of
    /// it): its chunks as planned now.
    pub(crate) fn begin(
        &mut self,
        table: &TableName,
        ranges: &[PageRange],
        relfilenode: u32,
        resumed: Option<(BTreeSet<u32>, u64)>,
    ) {
        let recorded = self.tables.entry(table.clone()).or_default();
        recorded.schema = table.schema.clone();
        recorded.table = table.name.clone();
        recorded.bounds = bounds_of(ranges);
        recorded.relfilenode = relfilenode;
        let (finished, rows) = resumed.unwrap_or_default();
        recorded.finished = finished.into_iter().collect();
        recorded.rows = rows;
    }

    /// Takes in released marks (those of other chains are not its); whether
    /// the record changed.
    pub(crate) fn release(&mut self, marks: &[Mark]) -> bool {
        let mut changed = false;
        for mark in marks {
            match mark {
                Mark::Chunk {
                    table,
                    generation,
                    index,
                    rows,
                } if *generation == self.generation => {
                    if let Some(recorded) = self.tables.get_mut(table)
                        && !recorded.finished.contains(index)
                    {
                        recorded.finished.push(*index);
                        recorded.rows += rows;
                        changed = true;
                    }
                }
                Mark::TableEnd { table, generation } if *generation == self.generation => {
                    changed |= self.tables.remove(table).is_some();
                }
                _ => {}
            }
        }
        changed
    }

    /// Takes in released marks and publishes the record if they changed
    /// it; whether they did.
    async fn record(
        &mut self,
        marks: &[Mark],
        publisher: &mut Publisher,
    ) -> Result<bool, PublishError> {
        let changed = self.release(marks);
        if changed {
            publisher.publish(self.outgoing()).await?;
        }
        Ok(changed)
    }

    pub(crate) fn outgoing(&self) -> sluice_broker::publish::Outgoing {
        let package = v1::Package {
            source: self.source.clone(),
            kind: v1::Kind::SnapshotProgress as i32,
            commit_lsn: self.generation,
            // Unique in this process: two records in one microsecond keep
            // apart message IDs.
            commit_time_us: i64::try_from(unique_now_us()).unwrap_or(i64::MAX),
            snapshot_progress: Some(v1::SnapshotProgress {
                generation: self.generation,
                tables: self.tables.values().cloned().collect(),
                resync_id: self.resync_id.clone(),
                reason: self.reason.clone(),
            }),
            ..Default::default()
        };
        sluice_broker::publish::Outgoing {
            subject: self.subject.clone(),
            // Unique per record (the last one counts), never repeated by a
            // later run: the time.
            msg_id: format!("{}:{}", self.msg_id, package.commit_time_us),
            position: sluice_broker::chunk::position_of(&package),
            payload: sluice_proto::encode(&package, sluice_proto::Encoding::Zstd).into(),
            encoding: sluice_proto::Encoding::Zstd,
        }
    }
}

/// What a progress record says of `table`, if it lists it.
pub(crate) fn recorded<'a>(
    record: &'a v1::SnapshotProgress,
    table: &TableName,
) -> Option<&'a v1::TableProgress> {
    record
        .tables
        .iter()
        .find(|t| t.schema == table.schema && t.table == table.name)
}

/// The chunk boundaries of a progress record (see `v1::TableProgress`).
fn bounds_of(ranges: &[PageRange]) -> Vec<u64> {
    ranges.iter().filter_map(|range| range.to).collect()
}

/// The chunks a progress record's boundaries stand for.
fn ranges_of(bounds: &[u64]) -> Vec<PageRange> {
    let mut ranges = Vec::with_capacity(bounds.len() + 1);
    let mut from = None;
    for &to in bounds {
        ranges.push(PageRange { from, to: Some(to) });
        from = Some(to);
    }
    ranges.push(PageRange { from, to: None });
    ranges
}

/// Where a table's next snapshot package goes: its index and the ordinal of
/// its first row. Chunks of one table are read in parallel and arrive
/// interleaved, so the one task that publishes stamps them in the order it
/// publishes them; the ordinals then count the rows published so far, which
/// `status` reads as the snapshot's progress.
#[derive(Debug, Default)]
pub(crate) struct Ordinals {
    packages: u32,
    rows: u64,
}

impl Ordinals {
    /// Continuing a table's snapshot after `rows` rows.
    pub(crate) fn starting_at(rows: u64) -> Ordinals {
        Ordinals { packages: 0, rows }
    }

    pub(crate) fn stamp(&mut self, package: &mut v1::Package) {
        package.package_index = self.packages;
        package.first_row_ordinal = self.rows;
        self.packages += 1;
        self.rows += sluice_proto::values::copy::row_count(package);
    }
}

pub(crate) fn marker(
    source: &str,
    table: &TableName,
    relation: &Arc<v1::Relation>,
    kind: v1::Kind,
    spec: &SnapshotSpec,
    generation: u64,
    rows: u64,
) -> v1::Package {
    v1::Package {
        source: source.to_owned(),
        schema: table.schema.clone(),
        table: table.name.clone(),
        kind: kind as i32,
        relation: Some((**relation).clone()),
        commit_lsn: spec.consistent_point.0,
        commit_time_us: now_us(),
        resync: Some(v1::Resync {
            resync_id: if spec.resync_id.is_empty() {
                format!("{generation:X}-{table}")
            } else {
                spec.resync_id.clone()
            },
            reason: spec.reason.clone(),
            rows,
            // Stamped by `Packager::chain_package`.
            ..Default::default()
        }),
        ..Default::default()
    }
}

/// What every reader of one snapshot shares.
pub(crate) struct Readers {
    settings: PgSettings,
    spec: SnapshotSpec,
    source: String,
    publication: String,
    parallelism: usize,
    chunk_pages: u64,
    max_rows: usize,
    max_bytes: usize,
    /// The connection tables are planned on (catalog reads), opened on
    /// first use and shared by the reading sessions: planning is short.
    planner: tokio::sync::Mutex<Option<SqlConn>>,
}

impl Readers {
    pub(crate) fn new(config: &Config, settings: &PgSettings, spec: SnapshotSpec) -> Readers {
        Readers {
            settings: settings.clone(),
            spec,
            source: config.source.clone(),
            publication: config.postgres.publication.clone(),
            parallelism: config.replicator.snapshot_parallelism.max(1),
            chunk_pages: config.replicator.snapshot_chunk_pages,
            max_rows: config.replicator.package_max_rows,
            max_bytes: config.replicator.package_max_bytes,
            planner: tokio::sync::Mutex::new(None),
        }
    }

    /// Hands the readers a planning connection opened ahead, e.g. while the
    /// slot whose snapshot they read was being created: a resync's
    /// RESYNC_BEGIN then waits only for the planning queries.
    pub(crate) fn with_planner(self, planner: SqlConn) -> Readers {
        Readers {
            planner: tokio::sync::Mutex::new(Some(planner)),
            ..self
        }
    }

    /// Plans `table` ([`plan_table`]) on the planning connection, in a
    /// transaction of its own inside the exported snapshot. A connection
    /// that failed is dropped; the next plan opens another.
    async fn plan(
        &self,
        table: &TableName,
        start: TableStart,
        tx: &mpsc::Sender<Result<Event, SnapshotError>>,
    ) -> Result<(Arc<TableRun>, Vec<(u32, PageRange)>), SnapshotError> {
        let mut planner = self.planner.lock().await;
        let conn = match planner.take() {
            Some(conn) => conn,
            None => self.settings.connect("a snapshot").await?,
        };
        let client = &conn.client;
        client
            .batch_execute(&begin_snapshot(self))
            .await
            .map_err(PgError::sql("cannot import the exported snapshot"))?;
        let planned = plan_table(self, client, table, start, tx).await?;
        client
            .batch_execute("COMMIT")
            .await
            .map_err(PgError::sql("cannot end a snapshot transaction"))?;
        *planner = Some(conn);
        Ok(planned)
    }
}

/// One table being read: what its chunks need, and how many are left.
struct TableRun {
    table: TableName,
    label: String,
    relation: Arc<v1::Relation>,
    /// The table's oid (`pg_class`), by which readers find its file.
    oid: u32,
    /// The table's file when it was planned; every reader checks it.
    relfilenode: u32,
    column_types: Vec<TypeInfo>,
    /// `SELECT <published columns> FROM <table>`.
    select: String,
    /// The publication's row filter, if any.
    row_filter: Option<String>,
    estimate: u64,
    /// Chunks not finished yet; whoever finishes the last one reports End.
    remaining: AtomicUsize,
    rows: AtomicU64,
    started: std::time::Instant,
    started_us: i64,
    last_log: std::sync::Mutex<std::time::Instant>,
}

/// A range of a table's pages, `[from, to)`; `None` is open (the first
/// chunk starts at the table's beginning, the last one reads whatever the
/// table holds past its start, even pages added after the size was read).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct PageRange {
    pub from: Option<u64>,
    pub to: Option<u64>,
}

impl PageRange {
    const WHOLE: PageRange = PageRange {
        from: None,
        to: None,
    };

    /// The TID condition that selects this range's rows (Postgres 14+ reads
    /// it with a TID range scan), or `None` for the whole table.
    fn condition(&self) -> Option<String> {
        match (self.from, self.to) {
            (None, None) => None,
            (Some(from), None) => Some(format!("ctid >= '({from},0)'::tid")),
            (None, Some(to)) => Some(format!("ctid < '({to},0)'::tid")),
            (Some(from), Some(to)) => Some(format!(
                "ctid >= '({from},0)'::tid AND ctid < '({to},0)'::tid"
            )),
        }
    }
}

/// Smallest and largest automatic chunk: 64 MiB and 1 GiB of 8 KiB pages.
const MIN_CHUNK_PAGES: u64 = 8 * 1024;
const MAX_CHUNK_PAGES: u64 = 128 * 1024;

/// The chunks of a table of `pages` pages read by `workers` connections:
/// `chunk_pages` each, or when that is 0, about a quarter of each worker's
/// share (so that the last chunks do not leave workers idle for long),
/// within [`MIN_CHUNK_PAGES`] and [`MAX_CHUNK_PAGES`]. The ranges cover every
/// TID exactly once.
pub(crate) fn page_ranges(pages: u64, workers: usize, chunk_pages: u64) -> Vec<PageRange> {
    let size = if chunk_pages > 0 {
        chunk_pages
    } else {
        (pages / (workers.max(1) as u64 * 4)).clamp(MIN_CHUNK_PAGES, MAX_CHUNK_PAGES)
    };
    let count = pages.div_ceil(size);
    if count <= 1 {
        return vec![PageRange::WHOLE];
    }
    (0..count)
        .map(|i| PageRange {
            from: (i > 0).then_some(i * size),
            to: (i + 1 < count).then_some((i + 1) * size),
        })
        .collect()
}

enum Work {
    Table(TableName, TableStart),
    /// A table's chunk and its index.
    Chunk(Arc<TableRun>, u32, PageRange),
}

/// Tables waiting to be planned and chunks waiting to be read. A worker that
/// plans a table puts its chunks first, so that tables finish one after the
/// other instead of all at once.
struct WorkQueue {
    state: std::sync::Mutex<QueueState>,
    changed: tokio::sync::Notify,
}

struct QueueState {
    items: VecDeque<Work>,
    /// Tables being planned: their chunks are still to come.
    planning: usize,
}

impl WorkQueue {
    fn lock(&self) -> std::sync::MutexGuard<'_, QueueState> {
        self.state
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner())
    }

    /// The next work; `None` once there is none and none can come.
    async fn next(&self) -> Option<Work> {
        loop {
            let changed = self.changed.notified();
            tokio::pin!(changed);
            changed.as_mut().enable();
            {
                let mut state = self.lock();
                if let Some(work) = state.items.pop_front() {
                    if matches!(work, Work::Table(..)) {
                        state.planning += 1;
                    }
                    return Some(work);
                }
                if state.planning == 0 {
                    return None;
                }
            }
            changed.await;
        }
    }

    /// A table was planned: its chunks go first in line.
    fn planned(&self, chunks: Vec<Work>) {
        {
            let mut state = self.lock();
            state.planning -= 1;
            for chunk in chunks.into_iter().rev() {
                state.items.push_front(chunk);
            }
        }
        self.changed.notify_waiters();
    }
}

/// Reads `tables` with up to `snapshot_parallelism` connections that share
/// the exported snapshot, each table in chunks of pages, and reports Begin,
/// the packages and End of every table on `tx` (the packages of one table's
/// chunks interleaved; see [`Ordinals`]). The first error stops every reader.
pub(crate) async fn read_tables(
    readers: Readers,
    tables: Vec<(TableName, TableStart)>,
    tx: &mpsc::Sender<Result<Event, SnapshotError>>,
) -> Result<(), SnapshotError> {
    let workers = readers.parallelism;
    let readers = Arc::new(readers);
    let queue = Arc::new(WorkQueue {
        state: std::sync::Mutex::new(QueueState {
            items: tables
                .into_iter()
                .map(|(table, start)| Work::Table(table, start))
                .collect(),
            planning: 0,
        }),
        changed: tokio::sync::Notify::new(),
    });
    let mut set = tokio::task::JoinSet::new();
    for _ in 0..workers {
        set.spawn(worker(readers.clone(), queue.clone(), tx.clone()));
    }
    while let Some(joined) = set.join_next().await {
        match joined {
            Ok(Ok(())) => {}
            Ok(Err(error)) => return Err(error),
            Err(join) if join.is_panic() => std::panic::resume_unwind(join.into_panic()),
            Err(_) => return Err(SnapshotError::ReaderLost("a snapshot reader".into())),
        }
    }
    Ok(())
}

/// One reading session of a snapshot: reads chunks (planning a table first
/// on the shared planning connection when the queue hands it a table) until
/// there is nothing left. It connects only once it has work.
async fn worker(
    readers: Arc<Readers>,
    queue: Arc<WorkQueue>,
    tx: mpsc::Sender<Result<Event, SnapshotError>>,
) -> Result<(), SnapshotError> {
    let Some(first) = queue.next().await else {
        return Ok(());
    };
    let mut session = None;
    read_work(&readers, &queue, &tx, &mut session, first).await?;
    if let Some(session) = session {
        let _ = session.close().await;
    }
    Ok(())
}

/// A worker's work on its session, from its `first` item until the queue
/// is empty.
async fn read_work(
    readers: &Readers,
    queue: &WorkQueue,
    tx: &mpsc::Sender<Result<Event, SnapshotError>>,
    session: &mut Option<SqlSession>,
    first: Work,
) -> Result<(), SnapshotError> {
    // The table this session's transaction is about: one transaction per
    // table, so that a table's lock is held only while it is read.
    let mut in_table: Option<TableName> = None;
    let mut next = Some(first);
    while let Some(work) = next.take() {
        match work {
            Work::Table(table, start) => {
                let (run, chunks) = readers.plan(&table, start, tx).await?;
                if chunks.is_empty() {
                    // Every chunk was finished by an earlier run.
                    finish_table(&run, tx).await?;
                }
                let mut chunks = chunks
                    .into_iter()
                    .map(|(index, range)| Work::Chunk(run.clone(), index, range));
                // This worker reads the first chunk itself.
                next = chunks.next();
                queue.planned(chunks.collect());
            }
            Work::Chunk(run, index, range) => {
                // Connected at the first chunk, once the table is planned
                // (and announced: a resync's RESYNC_BEGIN waits for that).
                let session = match session {
                    Some(session) => session,
                    None => session.insert(
                        SqlSession::connect(&readers.settings.config, &readers.settings.tls)
                            .await
                            .map_err(session_error("cannot connect to Postgres for a snapshot"))?,
                    ),
                };
                if in_table.as_ref() != Some(&run.table) {
                    if in_table.take().is_some() {
                        execute(session, "COMMIT", "cannot end a snapshot transaction").await?;
                    }
                    execute(
                        session,
                        &begin_snapshot(readers),
                        "cannot import the exported snapshot",
                    )
                    .await?;
                    in_table = Some(run.table.clone());
                    if reader_filenode(session, &run).await? != run.relfilenode {
                        return Err(SnapshotError::Rewritten(run.label.clone()));
                    }
                }
                let rows = read_chunk(readers, session, &run, range, tx).await?;
                counter!(m::SNAPSHOT_CHUNKS, "table" => run.label.clone()).increment(1);
                send(
                    tx,
                    &run.label,
                    Event::ChunkDone {
                        table: run.table.clone(),
                        index,
                        rows,
                    },
                )
                .await?;
                if run.remaining.fetch_sub(1, Ordering::AcqRel) == 1 {
                    finish_table(&run, tx).await?;
                }
            }
        }
        if next.is_none() {
            next = queue.next().await;
        }
    }
    if let (Some(_), Some(session)) = (in_table, session) {
        execute(session, "COMMIT", "cannot end a snapshot transaction").await?;
    }
    Ok(())
}

/// Turns a reading session's failure into [`SnapshotError::Session`].
fn session_error(what: impl Into<String>) -> impl FnOnce(ReplicationError) -> SnapshotError {
    let what = what.into();
    move |source| SnapshotError::Session { what, source }
}

/// A chunk's `COPY` that failed. A column it names that is gone was
/// dropped after the table was planned (on another connection, before this
/// reader's lock): the table changed under its snapshot, which starts again
/// and plans it anew.
fn copy_failed(label: &str, what: &str) -> impl FnOnce(ReplicationError) -> SnapshotError {
    let (label, what) = (label.to_owned(), what.to_owned());
    move |source| match &source {
        ReplicationError::Server(error) if error.code == "42703" => SnapshotError::Rewritten(label),
        _ => session_error(format!("{what} {label}"))(source),
    }
}

async fn execute(session: &mut SqlSession, sql: &str, what: &str) -> Result<(), SnapshotError> {
    session.query(sql).await.map_err(session_error(what))?;
    Ok(())
}

/// On a reading session, inside its table's transaction: takes the lock
/// every reader of a table holds until it moves on (so the table cannot be
/// rewritten under its chunks), and returns the file of the table planned
/// as `run` (0 if it is gone or partitioned: the planner's
/// [`relfilenode`] for the same table).
async fn reader_filenode(session: &mut SqlSession, run: &TableRun) -> Result<u32, SnapshotError> {
    let label = &run.label;
    let rows = session
        .query(&format!(
            "LOCK TABLE {} IN ACCESS SHARE MODE; \
             SELECT coalesce(pg_catalog.pg_relation_filenode({}::pg_catalog.oid), 0)::int8",
            run.table.quoted(),
            run.oid
        ))
        .await
        .map_err(session_error(format!(
            "cannot lock {label} for its snapshot"
        )))?;
    let node = rows
        .first()
        .and_then(|row| row.first())
        .and_then(|value| value.as_deref())
        .and_then(|value| value.parse::<u32>().ok())
        .unwrap_or(0);
    Ok(node)
}

/// Reports a table's end, once its last chunk is read.
async fn finish_table(
    run: &TableRun,
    tx: &mpsc::Sender<Result<Event, SnapshotError>>,
) -> Result<(), SnapshotError> {
    send(
        tx,
        &run.label,
        Event::End {
            table: run.table.clone(),
            relation: run.relation.clone(),
            rows: run.rows.load(Ordering::Acquire),
        },
    )
    .await
}

async fn send(
    tx: &mpsc::Sender<Result<Event, SnapshotError>>,
    label: &str,
    event: Event,
) -> Result<(), SnapshotError> {
    tx.send(Ok(event))
        .await
        .map_err(|_| SnapshotError::ReaderLost(label.to_owned()))
}

/// The statements that start a transaction inside the exported snapshot,
/// with the output styles the value decoder expects.
fn begin_snapshot(readers: &Readers) -> String {
    format!(
        "BEGIN ISOLATION LEVEL REPEATABLE READ READ ONLY; SET TRANSACTION SNAPSHOT {}; \
         SET LOCAL datestyle = ISO; SET LOCAL intervalstyle = postgres; SET LOCAL extra_float_digits = 3; \
         SET LOCAL bytea_output = hex; SET LOCAL lc_monetary = 'C'; SET LOCAL timezone = 'UTC'",
        quote_literal(&readers.spec.snapshot_name)
    )
}

/// Reads what a table's chunks need (inside the snapshot), announces the
/// table (Begin) and divides it into chunks.
async fn plan_table(
    readers: &Readers,
    client: &tokio_postgres::Client,
    table: &TableName,
    start: TableStart,
    tx: &mpsc::Sender<Result<Event, SnapshotError>>,
) -> Result<(Arc<TableRun>, Vec<(u32, PageRange)>), SnapshotError> {
    let label = table.to_string();
    let (oid, relfilenode) = relfilenode(client, table).await?;
    // Only what the publication publishes: its column list and row filter
    // (the stream carries the same, pgoutput applies them).
    let view = catalog::published_view(client, &readers.publication, table).await?;
    let mut info = catalog::table_columns(client, table).await?;
    catalog::restrict(&view, &mut info);
    let mut types = TypeCatalog::new();
    types.resolve_table(client, &info).await?;
    let relation = Arc::new(catalog::to_relation(&info, &types)?);
    let column_types: Vec<TypeInfo> = info
        .columns
        .iter()
        .map(|c| {
            types
                .get(c.type_oid)
                .cloned()
                .ok_or(CatalogError::TypeNotResolved { oid: c.type_oid })
        })
        .collect::<Result<_, _>>()?;
    // A partitioned table holds no rows itself: its leaves' estimates add up
    // (autovacuum keeps those fresh; the root's own is only set by a manual
    // ANALYZE of it). Only a plain table is split by pages, and only where
    // Postgres reads a TID range without scanning the whole table (14+).
    let row = client
        .query_one(
            "SELECT CASE WHEN c.relkind = 'p' THEN coalesce( \
                 (SELECT sum(greatest(l.reltuples, 0)) FROM pg_catalog.pg_partition_tree(c.oid) t \
                  JOIN pg_catalog.pg_class l ON l.oid = t.relid WHERE t.isleaf), 0) \
                 ELSE greatest(c.reltuples, 0) END::real, \
                 CASE WHEN c.relkind = 'r' AND current_setting('server_version_num')::int >= 140000 \
                 THEN pg_catalog.pg_relation_size(c.oid) / current_setting('block_size')::int ELSE 0 END::int8 \
             FROM pg_catalog.pg_class c JOIN pg_catalog.pg_namespace n ON n.oid = c.relnamespace \
             WHERE n.nspname = $1 AND c.relname = $2",
            &[&table.schema, &table.name],
        )
        .await
        .map_err(PgError::sql(format!("cannot estimate the size of {label}")))?;
    let estimate: f32 = row.get(0);
    let pages: i64 = row.get(1);
    let fresh = || {
        page_ranges(
            u64::try_from(pages).unwrap_or(0),
            readers.parallelism,
            readers.chunk_pages,
        )
    };
    let start = match start {
        TableStart::Continue(_, Some(then))
            if then.columns != relation.columns
                || then.replica_identity != relation.replica_identity =>
        {
            tracing::warn!(table = %label, "table's columns changed since its snapshot began: its snapshot starts over");
            TableStart::Fresh
        }
        start => start,
    };
    let (ranges, resumed) = match start {
        TableStart::Fresh => (fresh(), None),
        TableStart::Continue(Some(recorded), _) => {
            let ranges = ranges_of(&recorded.bounds);
            let finished: BTreeSet<u32> = recorded.finished.iter().copied().collect();
            let all = (0..ranges.len() as u32).all(|index| finished.contains(&index));
            if all || (recorded.relfilenode != 0 && recorded.relfilenode == relfilenode) {
                (ranges, Some((finished, recorded.rows)))
            } else {
                tracing::warn!(table = %label, "table rewritten since its snapshot began (VACUUM FULL, CLUSTER, TRUNCATE or ALTER TABLE): reading every chunk again");
                (fresh(), Some((BTreeSet::new(), 0)))
            }
        }
        TableStart::Continue(None, _) => (fresh(), Some((BTreeSet::new(), 0))),
    };
    let chunks: Vec<(u32, PageRange)> = ranges
        .iter()
        .enumerate()
        .map(|(index, range)| (index as u32, *range))
        .filter(|(index, _)| {
            resumed
                .as_ref()
                .is_none_or(|(finished, _)| !finished.contains(index))
        })
        .collect();
    let columns: Vec<String> = info.columns.iter().map(|c| quote_ident(&c.name)).collect();
    let run = Arc::new(TableRun {
        table: table.clone(),
        label: label.clone(),
        relation: relation.clone(),
        oid,
        relfilenode,
        column_types,
        select: format!("SELECT {} FROM {}", columns.join(", "), table.quoted()),
        row_filter: view.row_filter.clone(),
        estimate: estimate as u64,
        remaining: AtomicUsize::new(chunks.len()),
        rows: AtomicU64::new(resumed.as_ref().map_or(0, |(_, rows)| *rows)),
        started: std::time::Instant::now(),
        started_us: now_us(),
        last_log: std::sync::Mutex::new(std::time::Instant::now()),
    });
    gauge!(m::SNAPSHOT_ROWS_ESTIMATED, "table" => label.clone()).set(f64::from(estimate));
    if ranges.len() > 1 {
        tracing::info!(table = %label, chunks = ranges.len(), to_read = chunks.len(), pages, "snapshot divided into chunks");
    }
    send(
        tx,
        &label,
        Event::Begin {
            table: table.clone(),
            relation,
            estimate: estimate as u64,
            lsn: readers.spec.consistent_point,
            ranges,
            relfilenode,
            resumed,
        },
    )
    .await?;
    Ok((run, chunks))
}

/// On the planning connection: takes the lock every reader of a table holds
/// until it moves on (so the table cannot be rewritten under its chunks),
/// and returns the table's oid and file (`pg_relation_filenode`, 0 for a
/// partitioned table).
async fn relfilenode(
    client: &tokio_postgres::Client,
    table: &TableName,
) -> Result<(u32, u32), SnapshotError> {
    let label = table.to_string();
    client
        .batch_execute(&format!(
            "LOCK TABLE {} IN ACCESS SHARE MODE",
            table.quoted()
        ))
        .await
        .map_err(PgError::sql(format!(
            "cannot lock {label} for its snapshot"
        )))?;
    let row = client
        .query_one(
            "SELECT c.oid::int8, coalesce(pg_catalog.pg_relation_filenode(c.oid), 0)::int8 \
             FROM pg_catalog.pg_class c JOIN pg_catalog.pg_namespace n ON n.oid = c.relnamespace \
             WHERE n.nspname = $1 AND c.relname = $2",
            &[&table.schema, &table.name],
        )
        .await
        .map_err(PgError::sql(format!("cannot read the file of {label}")))?;
    let oid: i64 = row.get(0);
    let node: i64 = row.get(1);
    Ok((
        u32::try_from(oid).unwrap_or(0),
        u32::try_from(node).unwrap_or(0),
    ))
}

/// Reads one chunk of a table with `COPY … TO STDOUT` and reports its
/// packages.
async fn read_chunk(
    readers: &Readers,
    session: &mut SqlSession,
    run: &TableRun,
    range: PageRange,
    tx: &mpsc::Sender<Result<Event, SnapshotError>>,
) -> Result<u64, SnapshotError> {
    let label = &run.label;
    let conditions: Vec<String> = run
        .row_filter
        .iter()
        .map(|filter| format!("({filter})"))
        .chain(range.condition())
        .collect();
    let copy = if conditions.is_empty() {
        format!("COPY ({}) TO STDOUT", run.select)
    } else {
        format!(
            "COPY ({} WHERE {}) TO STDOUT",
            run.select,
            conditions.join(" AND ")
        )
    };
    let mut copy = session
        .copy_out(&copy)
        .await
        .map_err(copy_failed(label, "cannot read"))?;
    // The package being filled: `COPY`'s lines as they came (see
    // `Package.copy_text`), checked for their shape only; the loader decodes
    // the values. Decoding them here was most of the snapshot's CPU.
    let mut package = Lines::new(readers.max_rows, readers.max_bytes);
    let columns = run.column_types.len();
    let counter = counter!(m::SNAPSHOT_ROWS, "table" => label.clone());
    let published = counter!(m::PUBLISHED_ROWS, "table" => label.clone(), "op" => "snapshot");
    let flush = |package: &mut Lines| -> Result<v1::Package, SnapshotError> {
        let rows = std::mem::take(&mut package.lines);
        // The shape of a package's lines (UTF-8, one field per column),
        // checked over the whole package at once.
        let before = package.read - u64::from(rows);
        values::copy::check_lines(&package.text, columns).map_err(|line| SnapshotError::Copy {
            table: label.clone(),
            row: before + line,
        })?;
        counter.increment(rows.into());
        published.increment(rows.into());
        run.rows.fetch_add(rows.into(), Ordering::AcqRel);
        // Cut from one buffer reused from package to package (see
        // `sluice_proto::encode_pooled`), taken back once the packages cut
        // from it were encoded.
        let copy_text = package.text.split().freeze();
        sluice_proto::make_room(&mut package.text, readers.max_bytes);
        Ok(v1::Package {
            source: readers.source.clone(),
            schema: run.table.schema.clone(),
            table: run.table.name.clone(),
            kind: v1::Kind::Snapshot as i32,
            relation: Some((*run.relation).clone()),
            commit_lsn: readers.spec.consistent_point.0,
            commit_time_us: now_us(),
            // `package_index` and `first_row_ordinal`: stamped by the
            // publishing task (`Ordinals`).
            copy_text,
            copy_rows: rows,
            // For `status`: how far the snapshot got, from the stream alone.
            resync: Some(v1::Resync {
                rows: run.estimate,
                started_us: run.started_us,
                ..Default::default()
            }),
            ..Default::default()
        })
    };
    // What a message held past a full package (Postgres sends one row per
    // message, so this is normally empty).
    let mut pending: Vec<u8> = Vec::new();
    loop {
        let more = copy
            .rows(|data| match package.feed(data) {
                None => true,
                Some(rest) => {
                    pending.extend_from_slice(rest);
                    false
                }
            })
            .await
            .map_err(copy_failed(label, "reading failed:"))?;
        while package.full() {
            let full = flush(&mut package)?;
            send(tx, label, Event::Package(Box::new(full))).await?;
            // `return(MS)`: a slow snapshot, so that a test's changes
            // overtake it.
            #[cfg(feature = "failpoints")]
            if let Some(Some(ms)) = fail::eval("replicator::snapshot::package", |arg| {
                arg.and_then(|ms| ms.parse::<u64>().ok())
            }) {
                tokio::time::sleep(std::time::Duration::from_millis(ms)).await;
            }
            log_progress(run);
            if !pending.is_empty() {
                let rest = std::mem::take(&mut pending);
                if let Some(rest) = package.feed(&rest) {
                    pending.extend_from_slice(rest);
                }
            }
        }
        if !more {
            break;
        }
    }
    if !package.carried.is_empty() {
        return Err(SnapshotError::Copy {
            table: label.clone(),
            row: package.read + 1,
        });
    }
    if package.lines > 0 {
        let last = flush(&mut package)?;
        send(tx, label, Event::Package(Box::new(last))).await?;
    }
    Ok(package.read)
}

/// A snapshot package's text as `COPY`'s messages fill it, line by line.
struct Lines {
    text: bytes::BytesMut,
    /// Lines in `text`.
    lines: u32,
    /// Lines of the chunk so far, for error messages.
    read: u64,
    /// The start of a line that its message did not finish.
    carried: Vec<u8>,
    max_rows: usize,
    max_bytes: usize,
}

impl Lines {
    fn new(max_rows: usize, max_bytes: usize) -> Lines {
        let mut text = bytes::BytesMut::new();
        sluice_proto::make_room(&mut text, max_bytes);
        Lines {
            text,
            lines: 0,
            read: 0,
            carried: Vec::new(),
            max_rows,
            max_bytes,
        }
    }

    /// Whether the package holds as many lines or bytes as one may.
    fn full(&self) -> bool {
        self.lines as usize >= self.max_rows || self.text.len() >= self.max_bytes
    }

    /// Appends the lines of `data` (the start of a line it does not finish
    /// waits in `carried` for the next message); once the package is full,
    /// returns the rest of `data`, not appended.
    fn feed<'d>(&mut self, mut data: &'d [u8]) -> Option<&'d [u8]> {
        while !data.is_empty() {
            let Some(newline) = memchr::memchr(b'\n', data) else {
                self.carried.extend_from_slice(data);
                return None;
            };
            self.read += 1;
            if !self.carried.is_empty() {
                self.text.extend_from_slice(&self.carried);
                self.carried.clear();
            }
            self.text.extend_from_slice(&data[..=newline]);
            self.lines += 1;
            data = &data[newline + 1..];
            if self.full() {
                return Some(data);
            }
        }
        None
    }
}

/// A progress line every [`PROGRESS_EVERY`] per table, whichever chunk
/// reader notices first.
fn log_progress(run: &TableRun) {
    let mut last_log = match run.last_log.try_lock() {
        Ok(guard) => guard,
        Err(_) => return,
    };
    if last_log.elapsed() < PROGRESS_EVERY {
        return;
    }
    *last_log = std::time::Instant::now();
    let total = run.rows.load(Ordering::Acquire);
    let (rate, eta) = progress(total, run.estimate, run.started.elapsed());
    tracing::info!(table = %run.label, rows = total, estimated_rows = run.estimate, rows_per_second = rate, eta_seconds = eta, "snapshot progress");
}

/// How often a running snapshot logs its progress.
const PROGRESS_EVERY: std::time::Duration = std::time::Duration::from_secs(5);

/// Rows per second so far, and the seconds left at that rate until
/// `estimated` rows (`None` once the estimate is passed: it was low).
pub(crate) fn progress(
    rows: u64,
    estimated: u64,
    elapsed: std::time::Duration,
) -> (u64, Option<u64>) {
    let seconds = elapsed.as_secs_f64().max(0.001);
    let rate = rows as f64 / seconds;
    let eta =
        (estimated > rows && rate > 0.0).then(|| ((estimated - rows) as f64 / rate).ceil() as u64);
    (rate as u64, eta)
}

#[cfg(test)]
mod tests {
    use super::{
        Lines, MIN_CHUNK_PAGES, Mark, PageRange, Progress, bounds_of, page_ranges, progress,
        ranges_of,
    };
    use sluice_broker::TableName;

    #[test]
    fn a_package_takes_whole_lines_up_to_its_limits() {
        // Two lines per package: a message of three lines fills one and
        // hands back the third.
        let mut lines = Lines::new(2, 1 << 20);
        assert_eq!(lines.feed(b"1\ta\n"), None);
        assert_eq!(lines.feed(b"2\tb\n3\tc\n"), Some(&b"3\tc\n"[..]));
        assert!(lines.full());
        assert_eq!(&lines.text[..], b"1\ta\n2\tb\n");
        assert_eq!((lines.lines, lines.read), (2, 2));
        // A line split across messages waits for its end.
        let mut lines = Lines::new(10, 1 << 20);
        assert_eq!(lines.feed(b"1\tfirst "), None);
        assert_eq!((lines.lines, &lines.carried[..]), (0, &b"1\tfirst "[..]));
        assert_eq!(lines.feed(b"half\n2\tx\n"), None);
        assert_eq!(&lines.text[..], b"1\tfirst half\n2\tx\n");
        assert!(lines.carried.is_empty());
        // The byte limit: full once the text reaches it, at a line's end.
        let mut lines = Lines::new(10, 8);
        assert_eq!(lines.feed(b"1\tabcdefgh\n2\ty\n"), Some(&b"2\ty\n"[..]));
        assert_eq!((lines.lines, lines.full()), (1, true));
    }

    #[test]
    fn a_progress_record_keeps_the_chunks_and_lists_only_durable_ones() {
        for ranges in [page_ranges(100, 2, 10), page_ranges(5, 2, 10)] {
            assert_eq!(ranges_of(&bounds_of(&ranges)), ranges);
        }
        let table = TableName::new("public", "big");
        let mut progress = Progress::initial(7, "src", "slot");
        progress.begin(&table, &page_ranges(100, 2, 10), 1, None);
        let chunk = |index, generation| Mark::Chunk {
            table: table.clone(),
            generation,
            index,
            rows: 10,
        };
        assert!(progress.release(&[chunk(3, 7), chunk(0, 7)]));
        assert!(!progress.release(&[chunk(3, 7)]), "counted once");
        // A chunk of another chain (an earlier resync of the table) is not
        // this record's.
        assert!(!progress.release(&[chunk(4, 6)]));
        let recorded = &progress.tables[&table];
        assert_eq!((recorded.finished.clone(), recorded.rows), (vec![3, 0], 20));
        // A chunk of a table the record does not hold (ended) is no news.
        assert!(!progress.release(&[Mark::Chunk {
            table: TableName::new("public", "other"),
            generation: 7,
            index: 0,
            rows: 1
        }]));
        assert!(!progress.release(&[Mark::TableEnd {
            table: table.clone(),
            generation: 6,
        }]));
        assert!(!progress.is_empty());
        assert!(progress.release(&[Mark::TableEnd {
            table: table.clone(),
            generation: 7,
        }]));
        assert!(progress.is_empty());
    }

    #[test]
    fn a_resync_record_is_on_its_tables_subject_and_keeps_its_id() {
        let table = TableName::new("Sales", "order items");
        let spec = super::SnapshotSpec {
            resync_id: "id-1".into(),
            snapshot_name: String::new(),
            consistent_point: crate::replication::Lsn(5),
            reason: "manual".into(),
        };
        let mut progress = Progress::resync(&table, 9, &spec, "src", "slot");
        progress.begin(&table, &page_ranges(100, 2, 10), 1, Some(([1].into(), 5)));
        let outgoing = progress.outgoing();
        assert_eq!(
            outgoing.subject,
            sluice_broker::topology::resync_progress_subject("src", "Sales", "order items")
        );
        let package = sluice_proto::decode(&outgoing.payload, None).unwrap();
        let record = package.snapshot_progress.unwrap();
        assert_eq!(
            (
                record.generation,
                record.resync_id.as_str(),
                record.reason.as_str()
            ),
            (9, "id-1", "manual")
        );
        assert_eq!(record.tables.len(), 1);
        assert_eq!(
            (record.tables[0].finished.clone(), record.tables[0].rows),
            (vec![1], 5)
        );
    }

    /// The ranges follow each other without a gap or an overlap, the first
    /// and the last open.
    fn assert_cover(ranges: &[PageRange]) {
        assert_eq!(ranges.first().map(|r| r.from), Some(None));
        assert_eq!(ranges.last().map(|r| r.to), Some(None));
        for pair in ranges.windows(2) {
            assert_eq!(pair[0].to, pair[1].from, "{ranges:?}");
            assert!(pair[0].to.is_some());
        }
    }

    #[test]
    fn a_table_is_divided_into_page_ranges_by_its_size() {
        // Small tables: one chunk, no TID condition.
        assert_eq!(page_ranges(0, 2, 0), vec![PageRange::WHOLE]);
        assert_eq!(page_ranges(MIN_CHUNK_PAGES, 2, 0), vec![PageRange::WHOLE]);
        assert_eq!(page_ranges(1000, 4, 0)[0].condition(), None);
        // 400 MB with 2 workers: 64 MiB chunks.
        let ranges = page_ranges(50_000, 2, 0);
        assert_eq!(ranges.len(), 7);
        assert_cover(&ranges);
        assert_eq!(ranges[1].from, Some(MIN_CHUNK_PAGES));
        // 1 TB: chunks of at most 1 GiB.
        let ranges = page_ranges(128 * 1024 * 1024, 4, 0);
        assert_eq!(ranges.len(), 1024);
        assert_cover(&ranges);
        // 4 GiB with 2 workers: a quarter of each worker's share.
        let ranges = page_ranges(512 * 1024, 2, 0);
        assert_eq!(ranges.len(), 8);
        assert_eq!(ranges[1].from, Some(512 * 1024 / 8));
        // A configured size wins.
        let ranges = page_ranges(100, 2, 10);
        assert_eq!(ranges.len(), 10);
        assert_cover(&ranges);
        assert_eq!(
            ranges[0].condition().as_deref(),
            Some("ctid < '(10,0)'::tid")
        );
        assert_eq!(
            ranges[3].condition().as_deref(),
            Some("ctid >= '(30,0)'::tid AND ctid < '(40,0)'::tid")
        );
        assert_eq!(
            ranges[9].condition().as_deref(),
            Some("ctid >= '(90,0)'::tid")
        );
        assert_eq!(page_ranges(101, 2, 10).len(), 11);
    }

    #[test]
    fn progress_estimates_the_time_left_at_the_rate_so_far() {
        let ten = std::time::Duration::from_secs(10);
        assert_eq!(progress(1000, 4000, ten), (100, Some(30)));
        assert_eq!(
            progress(5000, 4000, ten),
            (500, None),
            "the estimate was low"
        );
        assert_eq!(progress(0, 4000, ten), (0, None));
    }
}
