//! The resync coordinator: answers resync requests (NATS request/reply),
//! runs one snapshot reader per table beside the stream, and publishes what
//! the readers produce on each table's new chain.
//!
//! A resync takes a temporary slot, whose exported snapshot has a known
//! consistent point; the table's new chain starts with its RESYNC_BEGIN, and
//! every live change of the table from then on follows it, so the loader can
//! swap the shadow table in at RESYNC_END without losing or doubling a change
//! (ARCHITECTURE.md invariant 3). Concurrent requests for a table coalesce.
//! A resync that fails is reported (`sluice-replicator resync` shows it) and
//! dropped; the stream goes on and the operator requests it again.
//!
//! A resync is resumable like the initial snapshot (invariant 9): its
//! progress record (`sluice.<source>._control.resync~<schema>~<table>`)
//! lists a chunk once every package of it is acknowledged, and a record
//! without tables says it ended. A replicator that restarts mid-resync
//! continues it on the same chain ([`Loop::continue_resyncs`]), reading only
//! the chunks the record does not list, under a new temporary slot's
//! snapshot: its rows carry that later consistent point as their version,
//! and every change of the table since the first one is on the chain (the
//! stream restarts at the slot's confirmed LSN), so the table stays
//! consistent as after a continued initial snapshot.

use std::collections::{BTreeMap, BTreeSet, HashMap, HashSet};

use metrics::{counter, gauge};
use sluice_broker::TableName;
use sluice_broker::config::Config;
use sluice_broker::topology;
use sluice_proto::Message as _;
use sluice_proto::v1;
use tokio::sync::mpsc;

use super::{Loop, StreamError};
use crate::metrics as m;
use crate::pg::PgSettings;
use crate::publish::{Mark, now_us, unique_now_us};
use crate::replication::{Lsn, ReplicationClient};
use crate::snapshot::{self, Event, Progress, SnapshotError, SnapshotSpec, TableStart};

/// What a resync reader reports to the loop, per table and attempt.
pub(super) type ResyncEvent = (TableName, u32, Result<Event, SnapshotError>);

/// How long the stream holds back for a resync between its slot's creation
/// and its RESYNC_BEGIN, at most. Planning takes milliseconds; it can wait
/// longer only for the table's lock (DDL running), and the stream of every
/// other table must not wait that long. A change of the table that goes out
/// after that is caught at the Begin, which then starts the resync again.
const HOLD_AT_MOST: std::time::Duration = std::time::Duration::from_secs(5);

/// A resync running beside the stream.
struct ActiveResync {
    id: String,
    reason: String,
    rows: u64,
    /// Where its next snapshot package goes.
    ordinals: snapshot::Ordinals,
    /// Consistent point of its snapshot, once the reader started.
    lsn: Option<Lsn>,
    /// The generation of the table's chain it fills: set at its begin, or
    /// when it continues one an earlier run began.
    generation: u64,
    /// Whether it continues a resync an earlier run began.
    continued: bool,
    /// Its attempt: a resync started again ignores what the reader of an
    /// earlier attempt still sent.
    attempt: u32,
    /// When its slot was created, until its Begin: the stream holds back
    /// meanwhile ([`Resyncs::holding`]).
    slot_created: Option<std::time::Instant>,
    task: tokio::task::JoinHandle<()>,
}

/// A resync an earlier run began and did not end: the last progress record
/// of its table, which is on the same chain (generation) as the table's last
/// package, and that package's relation.
pub struct UnfinishedResync {
    pub table: TableName,
    pub record: v1::SnapshotProgress,
    pub relation: Option<v1::Relation>,
}

/// The resyncs in progress and the channel their readers report on.
pub(super) struct Resyncs {
    active: HashMap<TableName, ActiveResync>,
    /// Resyncs that failed before their RESYNC_BEGIN (no trace of them
    /// reached the loader, which would otherwise wait for nothing), with
    /// their reason: started again at the next publication check.
    retry: BTreeMap<TableName, String>,
    /// The progress records of resyncs whose end is not yet durable.
    records: HashMap<TableName, Progress>,
    /// Tables whose record changed and is still to be published.
    dirty: BTreeSet<TableName>,
    tx: mpsc::Sender<ResyncEvent>,
}

impl Resyncs {
    /// Whether a resync of `table` was started and has not ended.
    pub(super) fn is_running(&self, table: &TableName) -> bool {
        self.active.contains_key(table)
    }

    /// Whether the stream is to hold back: a resync's slot exists and its
    /// RESYNC_BEGIN is not published yet. A change of its table the stream
    /// published meanwhile would be on the table's old chain, which a loader
    /// that blocked the table skips, and, committed after the slot's
    /// consistent point, it is not in the snapshot either.
    pub(super) fn holding(&self) -> bool {
        self.active.values().any(|active| {
            active
                .slot_created
                .is_some_and(|at| at.elapsed() < HOLD_AT_MOST)
        })
    }

    /// No resync running; the readers' events arrive on the receiver.
    pub(super) fn new() -> (Self, mpsc::Receiver<ResyncEvent>) {
        let (tx, rx) = mpsc::channel(8);
        let resyncs = Resyncs {
            active: HashMap::new(),
            retry: BTreeMap::new(),
            records: HashMap::new(),
            dirty: BTreeSet::new(),
            tx,
        };
        (resyncs, rx)
    }

    /// Takes in the marks the publisher released: chunks and ends of
    /// resyncs change their records.
    pub(super) fn release(&mut self, marks: &[Mark]) {
        if self.records.is_empty() {
            return;
        }
        for (table, record) in &mut self.records {
            if record.release(marks) {
                self.dirty.insert(table.clone());
            }
        }
    }
}

/// The tables a request names (`schema.table`, `public` when no schema; or
/// every published table), sorted and without repeats; an error message for
/// the reply when one is not in the publication.
fn requested_tables(
    request: &v1::ResyncRequest,
    published: &HashSet<TableName>,
    unreplicable: &HashSet<TableName>,
    publication: &str,
) -> Result<Vec<TableName>, String> {
    let mut tables: Vec<TableName> = if request.all {
        published.iter().cloned().collect()
    } else {
        let mut tables = Vec::new();
        for name in &request.tables {
            let table = TableName::parse(name);
            if unreplicable.contains(&table) {
                return Err(format!(
                    "table {name} cannot be replicated as it is (`sluice-replicator status` says why); \
                     once fixed, it is resynced by itself"
                ));
            }
            if !published.contains(&table) {
                return Err(format!("table {name} is not in publication {publication}"));
            }
            tables.push(table);
        }
        tables
    };
    tables.sort();
    tables.dedup();
    Ok(tables)
}

/// The reason of an operator's request (`sluice-replicator resync`).
const MANUAL: &str = "manual";

/// The reason a request gives, [`MANUAL`] when none.
fn resync_reason(request: &v1::ResyncRequest) -> String {
    if request.reason.is_empty() {
        MANUAL.to_owned()
    } else {
        request.reason.clone()
    }
}

impl Loop<'_> {
    /// Answers a resync request: starts (or joins) a resync per table.
    pub(super) async fn resync_request(&mut self, request: async_nats::Message) {
        let reply = match v1::ResyncRequest::decode(request.payload.clone()) {
            Err(error) => v1::ResyncReply {
                error: format!("malformed resync request: {error}"),
                ..Default::default()
            },
            Ok(request) => self.start_resyncs(&request),
        };
        if let Some(reply_to) = request.reply
            && let Err(error) = self
                .nats
                .publish(reply_to, reply.encode_to_vec().into())
                .await
        {
            tracing::warn!(%error, "cannot answer a resync request");
        }
    }

    pub(super) fn start_resyncs(&mut self, request: &v1::ResyncRequest) -> v1::ResyncReply {
        let tables = match requested_tables(
            request,
            &self.translate.published,
            &self.unreplicable,
            &self.config.postgres.publication,
        ) {
            Ok(tables) => tables,
            Err(error) => {
                return v1::ResyncReply {
                    error,
                    ..Default::default()
                };
            }
        };
        let reason = resync_reason(request);
        let mut started = Vec::new();
        for table in tables {
            let label = table.to_string();
            if let Some(active) = self.resyncs.active.get(&table) {
                // Concurrent requests for the same table coalesce.
                started.push(v1::ResyncStarted {
                    table: label,
                    resync_id: active.id.clone(),
                });
                continue;
            }
            let id = format!("{label}@{}", now_us());
            tracing::info!(table = %label, reason = %reason, resync_id = %id, "resync requested");
            self.spawn_resync(
                table,
                id.clone(),
                reason.clone(),
                TableStart::Fresh,
                None,
                0,
            );
            started.push(v1::ResyncStarted {
                table: label,
                resync_id: id,
            });
        }
        v1::ResyncReply {
            started,
            ..Default::default()
        }
    }

    /// Starts a resync's reader and records it as running.
    fn spawn_resync(
        &mut self,
        table: TableName,
        id: String,
        reason: String,
        start: TableStart,
        continues: Option<u64>,
        attempt: u32,
    ) {
        let task = tokio::spawn(resync_task(
            self.settings.clone(),
            self.repl_config.clone(),
            self.config.clone(),
            table.clone(),
            ResyncStart {
                id: id.clone(),
                reason: reason.clone(),
                start,
                attempt,
            },
            self.resyncs.tx.clone(),
        ));
        self.resyncs.active.insert(
            table,
            ActiveResync {
                id,
                reason,
                rows: 0,
                ordinals: Default::default(),
                lsn: None,
                generation: continues.unwrap_or(0),
                continued: continues.is_some(),
                attempt,
                slot_created: None,
                task,
            },
        );
    }

    /// Continues the resyncs an earlier run began and did not end, on their
    /// chains, with the chunks their records do not list as finished.
    pub(super) fn continue_resyncs(&mut self, unfinished: Vec<UnfinishedResync>) {
        for UnfinishedResync {
            table,
            record,
            relation,
        } in unfinished
        {
            if self.resyncs.is_running(&table) {
                continue;
            }
            let recorded = snapshot::recorded(&record, &table).cloned();
            let id = if record.resync_id.is_empty() {
                format!("{table}@{}", now_us())
            } else {
                record.resync_id.clone()
            };
            let reason = if record.reason.is_empty() {
                MANUAL.to_owned()
            } else {
                record.reason.clone()
            };
            tracing::info!(table = %table, resync_id = %id, reason = %reason, chunks_finished = recorded.as_ref().map_or(0, |r| r.finished.len()), "continuing a resync an earlier run began");
            self.spawn_resync(
                table,
                id,
                reason,
                TableStart::Continue(recorded, relation),
                Some(record.generation),
                0,
            );
        }
    }

    /// Publishes what a resync reader produced, on the table's new chain.
    pub(super) async fn resync_event(
        &mut self,
        table: TableName,
        attempt: u32,
        event: Result<Event, SnapshotError>,
    ) -> Result<(), StreamError> {
        let label = table.to_string();
        let Some(active) = self.resyncs.active.get_mut(&table) else {
            return Ok(());
        };
        if active.attempt != attempt {
            return Ok(());
        }
        match event {
            Ok(Event::SlotCreated { lsn }) => {
                tracing::debug!(table = %label, consistent_point = %lsn, "resync slot created: the stream holds back until its RESYNC_BEGIN");
                active.slot_created = Some(std::time::Instant::now());
            }
            Ok(Event::Begin {
                relation,
                estimate,
                lsn,
                ranges,
                relfilenode,
                resumed,
                ..
            }) => {
                active.slot_created = None;
                if resumed.is_none()
                    && self
                        .packager
                        .changes_through(&table)
                        .is_some_and(|(through, _)| through >= lsn.0)
                {
                    // A change of the table committed at or after the
                    // consistent point went out on its old chain (the hold
                    // ran out, or the stream passed the point before the
                    // slot was reported): this snapshot cannot stand for it.
                    tracing::warn!(table = %label, consistent_point = %lsn, "a change of the table committed after the resync's consistent point was published before the resync began; starting the resync again");
                    let (id, reason) = (active.id.clone(), active.reason.clone());
                    let attempt = active.attempt + 1;
                    let continues = active.continued.then_some(active.generation);
                    active.task.abort();
                    self.resyncs.active.remove(&table);
                    self.spawn_resync(table, id, reason, TableStart::Fresh, continues, attempt);
                    return Ok(());
                }
                active.lsn = Some(lsn);
                if resumed.is_none() && active.continued {
                    // The continued resync starts over (the table's columns
                    // changed): a new resync on a new chain.
                    active.id = format!("{label}@{}", now_us());
                    active.continued = false;
                }
                let spec = SnapshotSpec {
                    resync_id: active.id.clone(),
                    snapshot_name: String::new(),
                    consistent_point: lsn,
                    reason: active.reason.clone(),
                };
                if let Some((finished, rows)) = resumed {
                    // Its chain goes on where the earlier run left it.
                    tracing::info!(table = %label, resync_id = %active.id, consistent_point = %lsn, chunks = ranges.len(), finished = finished.len(), rows, "resync resumed");
                    active.ordinals = snapshot::Ordinals::starting_at(rows);
                    active.rows = rows;
                    let mut record = Progress::resync(
                        &table,
                        active.generation,
                        &spec,
                        &self.config.source,
                        &self.config.postgres.slot,
                    );
                    record.begin(&table, &ranges, relfilenode, Some((finished, rows)));
                    self.resyncs.records.insert(table.clone(), record);
                    self.resyncs.dirty.insert(table.clone());
                    gauge!(m::RESYNC_IN_PROGRESS, "table" => label.clone()).set(1.0);
                    self.resync_progress(&table, false, None).await;
                    return Ok(());
                }
                // A new chain: everything of this table from now on, live
                // changes included, follows the RESYNC_BEGIN.
                let generation = lsn.0.max(self.packager.generation() + 1);
                active.generation = generation;
                self.packager.start_generation(table.clone(), generation);
                // The snapshot reads the publication as it is now: its rows
                // match the shape last read, or a newer one (then the next
                // check resyncs again).
                self.packager
                    .set_publication(&table, self.shape.fingerprint(&table));
                let package = snapshot::marker(
                    &self.config.source,
                    &table,
                    &relation,
                    v1::Kind::ResyncBegin,
                    &spec,
                    generation,
                    estimate,
                );
                self.publisher
                    .publish(self.packager.chain_package(package))
                    .await?;
                // Its progress record follows the RESYNC_BEGIN: a record
                // without its chain in the stream is of no chain a restart
                // finds, and is ignored.
                let mut record = Progress::resync(
                    &table,
                    generation,
                    &spec,
                    &self.config.source,
                    &self.config.postgres.slot,
                );
                record.begin(&table, &ranges, relfilenode, None);
                self.publisher.publish(record.outgoing()).await?;
                self.resyncs.records.insert(table.clone(), record);
                // Crash tests: the process dies once RESYNC_BEGIN is stored.
                #[cfg(feature = "failpoints")]
                if fail::eval("replicator::resync::after_begin", |_| ()).is_some() {
                    let _ = self.publisher.flush().await;
                    crate::crash_here::<()>();
                }
                gauge!(m::RESYNC_IN_PROGRESS, "table" => label.clone()).set(1.0);
                counter!(m::RESYNCS, "table" => label.clone(), "reason" => active.reason.clone())
                    .increment(1);
                tracing::info!(table = %label, consistent_point = %lsn, estimated_rows = estimate, "resync snapshot started");
                self.resync_progress(&table, false, None).await;
            }
            Ok(Event::ChunkDone { index, rows, .. }) => {
                self.publisher.mark(Mark::Chunk {
                    table: table.clone(),
                    generation: active.generation,
                    index,
                    rows,
                });
            }
            Ok(Event::Package(mut package)) => {
                active.ordinals.stamp(&mut package);
                active.rows += sluice_proto::values::copy::row_count(&package);
                self.publisher
                    .publish(self.packager.chain_package(*package))
                    .await?;
                self.resync_progress(&table, false, None).await;
            }
            Ok(Event::End { relation, rows, .. }) => {
                let spec = SnapshotSpec {
                    resync_id: active.id.clone(),
                    snapshot_name: String::new(),
                    consistent_point: active.lsn.unwrap_or_default(),
                    reason: active.reason.clone(),
                };
                let package = snapshot::marker(
                    &self.config.source,
                    &table,
                    &relation,
                    v1::Kind::ResyncEnd,
                    &spec,
                    0,
                    rows,
                );
                self.publisher
                    .publish(self.packager.chain_package(package))
                    .await?;
                self.publisher.mark(Mark::TableEnd {
                    table: table.clone(),
                    generation: active.generation,
                });
                gauge!(m::RESYNC_IN_PROGRESS, "table" => label.clone()).set(0.0);
                tracing::info!(table = %label, rows, "resync snapshot published");
                self.resync_progress(&table, true, None).await;
                self.resyncs.active.remove(&table);
            }
            Err(error) => {
                let error = sluice_broker::error_chain(&error);
                if active.lsn.is_none() && active.reason != MANUAL {
                    // Nothing of it reached the stream: nobody else knows
                    // to ask again.
                    tracing::error!(table = %label, error = %error, reason = %active.reason, "resync failed before it began; retried at the next publication check");
                    self.resyncs
                        .retry
                        .insert(table.clone(), active.reason.clone());
                } else {
                    tracing::error!(table = %label, error = %error, "resync failed; request it again");
                }
                gauge!(m::RESYNC_IN_PROGRESS, "table" => label.clone()).set(0.0);
                self.resync_progress(&table, true, Some(error)).await;
                self.resyncs.active.remove(&table);
            }
        }
        Ok(())
    }

    /// Publishes the progress records that changed; a record saying its
    /// resync ended is the last of it.
    pub(super) async fn record_resyncs(&mut self) -> Result<(), StreamError> {
        while let Some(table) = self.resyncs.dirty.pop_first() {
            let Some(record) = self.resyncs.records.get(&table) else {
                continue;
            };
            self.publisher.publish(record.outgoing()).await?;
            if record.is_empty() {
                self.resyncs.records.remove(&table);
                continue;
            }
            // Crash tests: the process dies once a resync's progress record
            // listing a finished chunk is stored.
            #[cfg(feature = "failpoints")]
            if record.finished_chunks() > 0
                && fail::eval("replicator::resync::progress_recorded", |_| ()).is_some()
            {
                let _ = self.publisher.flush().await;
                crate::crash_here::<()>();
            }
        }
        Ok(())
    }

    /// Announces a resync's progress for `sluice-replicator resync` (best effort).
    async fn resync_progress(&self, table: &TableName, done: bool, error: Option<String>) {
        let Some(active) = self.resyncs.active.get(table) else {
            return;
        };
        let event = serde_json::json!({
            "resync_id": active.id,
            "table": table.to_string(),
            "rows": active.rows,
            "done": done,
            "error": error,
        });
        let _ = self
            .nats
            .publish(
                topology::resync_events_subject(&self.config.source),
                event.to_string().into(),
            )
            .await;
    }

    /// Starts again the resyncs that failed before their RESYNC_BEGIN, for
    /// tables still replicated and not resyncing meanwhile.
    pub(super) fn retry_failed_resyncs(&mut self) {
        let mut by_reason: BTreeMap<String, Vec<TableName>> = BTreeMap::new();
        for (table, reason) in std::mem::take(&mut self.resyncs.retry) {
            if self.translate.published.contains(&table) && !self.resyncs.is_running(&table) {
                by_reason.entry(reason).or_default().push(table);
            }
        }
        for (reason, tables) in by_reason {
            for table in &tables {
                tracing::info!(table = %table, reason = %reason, "retrying a resync that failed before it began");
            }
            self.resync_tables(tables, &reason);
        }
    }

    pub(super) async fn stop_resyncs(&mut self) {
        for (_, active) in self.resyncs.active.drain() {
            active.task.abort();
            let _ = active.task.await;
        }
    }
}

/// What a resync's reader is to do.
struct ResyncStart {
    id: String,
    reason: String,
    start: TableStart,
    attempt: u32,
}

/// Creates a temporary slot (its exported snapshot has a known consistent
/// point), reads the table in that snapshot and reports to the loop.
async fn resync_task(
    settings: PgSettings,
    repl_config: tokio_postgres::Config,
    config: Config,
    table: TableName,
    resync: ResyncStart,
    tx: mpsc::Sender<ResyncEvent>,
) {
    let attempt = resync.attempt;
    let result = async {
        let slot_failed = |source| SnapshotError::ResyncSlot {
            table: table.to_string(),
            source,
        };
        // Crash tests: the resync fails before it begins (no slot yet).
        #[cfg(feature = "failpoints")]
        if fail::eval("replicator::resync::before_begin", |_| ()).is_some() {
            return Err(slot_failed(crate::replication::ReplicationError::Config(
                "failpoint replicator::resync::before_begin",
            )));
        }
        let mut client = ReplicationClient::connect_with_tls(&repl_config, &settings.tls)
            .await
            .map_err(slot_failed)?;
        let slot = crate::slot::temporary_slot_name(
            &config.postgres.slot,
            &format!("_resync_{}", unique_now_us()),
        );
        // The table's planning connection opens while the slot is created:
        // the stream holds back from the slot's creation to the
        // RESYNC_BEGIN, so that span is kept to the planning queries.
        let (created, planner) = tokio::join!(
            client.create_logical_slot(&slot, true),
            settings.connect("a resync")
        );
        let created = created.map_err(slot_failed)?;
        let planner = planner?;
        // The stream holds back from now until the RESYNC_BEGIN.
        let _ = tx
            .send((
                table.clone(),
                attempt,
                Ok(Event::SlotCreated {
                    lsn: created.consistent_point,
                }),
            ))
            .await;
        // `return(MS)`: a slow start, for the tests of that hold.
        #[cfg(feature = "failpoints")]
        if let Some(Some(ms)) = fail::eval("replicator::resync::before_plan", |arg| {
            arg.and_then(|ms| ms.parse::<u64>().ok())
        }) {
            tokio::time::sleep(std::time::Duration::from_millis(ms)).await;
        }
        let spec = SnapshotSpec {
            resync_id: resync.id,
            snapshot_name: created.snapshot_name,
            consistent_point: created.consistent_point,
            reason: resync.reason,
        };
        let (inner_tx, mut inner_rx) = mpsc::channel(4);
        let readers = snapshot::Readers::new(&config, &settings, spec).with_planner(planner);
        let reader = {
            let table = table.clone();
            async move {
                let read =
                    snapshot::read_tables(readers, vec![(table, resync.start)], &inner_tx).await;
                // Ends the forwarding loop below.
                drop(inner_tx);
                read
            }
        };
        let forward = async {
            while let Some(event) = inner_rx.recv().await {
                if tx.send((table.clone(), attempt, event)).await.is_err() {
                    break;
                }
            }
        };
        let (read, ()) = tokio::join!(reader, forward);
        // Closing the connection drops the temporary slot.
        let _ = client.close().await;
        read
    }
    .await;
    if let Err(error) = result {
        let _ = tx.send((table, attempt, Err(error))).await;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn published() -> HashSet<TableName> {
        [("public", "a"), ("public", "b"), ("s", "c")]
            .into_iter()
            .map(|(s, t)| TableName::new(s, t))
            .collect()
    }

    fn request(tables: &[&str], all: bool) -> v1::ResyncRequest {
        v1::ResyncRequest {
            tables: tables.iter().map(|t| (*t).to_owned()).collect(),
            all,
            ..Default::default()
        }
    }

    fn names(tables: Vec<TableName>) -> Vec<String> {
        tables.iter().map(TableName::to_string).collect()
    }

    #[test]
    fn requested_tables_default_to_public_and_are_deduplicated() {
        let tables = requested_tables(
            &request(&["b", "s.c", "public.b"], false),
            &published(),
            &HashSet::new(),
            "p",
        );
        assert_eq!(names(tables.unwrap()), ["public.b", "s.c"]);
    }

    #[test]
    fn all_means_every_published_table() {
        let tables = requested_tables(&request(&[], true), &published(), &HashSet::new(), "p");
        assert_eq!(names(tables.unwrap()), ["public.a", "public.b", "s.c"]);
    }

    #[test]
    fn a_table_outside_the_publication_refuses_the_request() {
        let none = HashSet::new();
        let error = requested_tables(&request(&["a", "other.a"], false), &published(), &none, "p")
            .unwrap_err();
        assert_eq!(error, "table other.a is not in publication p");
        // One that cannot be replicated says so, not "not in publication".
        let failed: HashSet<TableName> = [TableName::new("public", "x")].into_iter().collect();
        let error =
            requested_tables(&request(&["x"], false), &published(), &failed, "p").unwrap_err();
        assert!(error.contains("cannot be replicated"), "{error}");
    }

    #[test]
    fn the_reason_defaults_to_manual() {
        assert_eq!(resync_reason(&request(&[], true)), "manual");
        let mut r = request(&[], true);
        r.reason = "loader_gap".to_owned();
        assert_eq!(resync_reason(&r), "loader_gap");
    }
}
