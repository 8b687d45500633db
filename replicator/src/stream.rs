//! The streaming loop: replication events in, packages out, LSNs confirmed.
//!
//! Invariants this module is responsible for (ARCHITECTURE.md 1 and 5):
//! - **Confirm only what is durable.** A transaction's commit end LSN becomes
//!   a [`Publisher::mark`] queued after its last package; the LSN is confirmed
//!   to Postgres only when the publisher releases that mark, i.e. when the
//!   stream acknowledged every package before it. The confirmed LSN never moves
//!   backwards.
//! - **Feedback is proactive.** A standby status update goes out every
//!   `status_interval` whatever the traffic, and at once when the server asks:
//!   during a huge transaction a keepalive request can sit behind megabytes of
//!   data, and waiting for it would trip `wal_sender_timeout`.
//! - **Idle tables do not pin WAL.** When no transaction is open and nothing
//!   is in flight, the server's WAL end (from keepalives) is confirmed.
//! - **Back-pressure.** Publishing waits when `max_in_flight` acks are
//!   outstanding, so reading from the replication socket pauses instead of
//!   buffering.
//! - **One loop, two sources.** A start far behind reads the backlog through
//!   SQL ([`crate::backlog`]) and then switches to the walsender at the
//!   confirmed LSN; both give the same pgoutput messages to the same code, and
//!   only the walsender's keepalives ever confirm an LSN without a commit.

use std::collections::HashMap;
use std::sync::Arc;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use metrics::{counter, gauge};
use sluice_broker::config::Config;
use sluice_broker::publish::{Outgoing, PublishError, Publisher};
use sluice_broker::topology;
use sluice_proto::v1;
use tokio_util::sync::CancellationToken;

use futures::{FutureExt as _, StreamExt};
use sluice_proto::Message as _;
use tokio::sync::mpsc;

use crate::backlog::{Backlog, BacklogEvent};
use crate::catalog::{self, CatalogError, TypeCatalog, TypeInfo};
use crate::metrics as m;
use crate::packager::{Packager, TableName};
use crate::pg::{PgError, PgSettings, SqlConn};
use crate::pgoutput::{self, LogicalMessage, OldTuple, TupleData, TupleValue};
use crate::replication::ReplicationClient;
use crate::replication::{Lsn, ReplicationError, ReplicationEvent, ReplicationStream};
use crate::snapshot::{self, Event, SnapshotError, SnapshotSpec};
use crate::values;

/// Failures of the streaming loop.
#[derive(Debug, thiserror::Error)]
pub enum StreamError {
    #[error(transparent)]
    Replication(#[from] ReplicationError),
    #[error(transparent)]
    Publish(#[from] PublishError),
    #[error(transparent)]
    Catalog(#[from] CatalogError),
    #[error("malformed pgoutput message at {lsn}")]
    Decode {
        lsn: Lsn,
        #[source]
        source: pgoutput::DecodeError,
    },
    #[error("change for relation {oid} at {lsn} arrived before its Relation message")]
    UnknownRelation { oid: u32, lsn: Lsn },
    #[error(
        "pgoutput streaming of in-progress transactions is not supported; the slot was started with it"
    )]
    StreamingNotSupported,
    #[error("Postgres ended the replication stream")]
    Ended,
    #[error("cannot subscribe to resync requests")]
    Subscribe(#[source] async_nats::SubscribeError),
    #[error(transparent)]
    Backlog(#[from] PgError),
}

impl StreamError {
    pub fn is_transient(&self) -> bool {
        match self {
            StreamError::Replication(e) => e.is_transient(),
            StreamError::Publish(_) | StreamError::Ended | StreamError::Subscribe(_) => true,
            StreamError::Catalog(e) => e.is_transient(),
            // Includes "slot is active" (55006) when another replicator took
            // the slot between two chunks: it restarts as a standby.
            StreamError::Backlog(e) => e.is_transient() || e.sqlstate() == Some("55006"),
            // A catalog race (relation message seen before we know it) heals on restart.
            StreamError::UnknownRelation { .. } => true,
            StreamError::Decode { .. } | StreamError::StreamingNotSupported => false,
        }
    }
}

/// A published table as the stream knows it.
struct RelState {
    table: TableName,
    label: String,
    relation: Arc<v1::Relation>,
    types: Vec<TypeInfo>,
    /// `sluice_published_rows_total{table}` per op (insert, update, delete),
    /// looked up once rather than per row.
    published_rows: [metrics::Counter; 3],
}

/// What a mark in the publisher stands for.
pub enum Mark {
    /// A transaction is durable up to this LSN; its commit time.
    Commit { end_lsn: Lsn, commit_time_us: i64 },
}

/// A resync running beside the stream.
struct ActiveResync {
    id: String,
    reason: String,
    rows: u64,
    /// Consistent point of its snapshot, once the reader started.
    lsn: Option<Lsn>,
    task: tokio::task::JoinHandle<()>,
}

/// What the streaming loop needs besides the replication stream.
pub struct StreamContext {
    pub nats: async_nats::Client,
    pub settings: PgSettings,
    /// Replication-connection settings (for temporary resync slots).
    pub repl_config: tokio_postgres::Config,
}

type ResyncEvent = (TableName, Result<Event, SnapshotError>);

/// Where the loop's pgoutput messages come from.
pub enum Source {
    /// The walsender (`START_REPLICATION`).
    Streaming(ReplicationStream),
    /// A large backlog, through SQL until a chunk comes back short.
    Backlog(Backlog),
}

/// What a [`Source`] gave.
enum Input {
    Change { lsn: Lsn, data: bytes::Bytes },
    Keepalive { wal_end: Lsn, reply_requested: bool },
    ChunkEnd { messages: u64 },
    Ended,
}

impl Source {
    /// Cancel-safe, as both sources' `next` are.
    async fn next(&mut self) -> Result<Input, StreamError> {
        Ok(match self {
            Source::Streaming(replication) => match replication.next().await? {
                Some(ReplicationEvent::XLogData {
                    wal_start, data, ..
                }) => Input::Change {
                    lsn: wal_start,
                    data,
                },
                Some(ReplicationEvent::Keepalive {
                    wal_end,
                    reply_requested,
                    ..
                }) => Input::Keepalive {
                    wal_end,
                    reply_requested,
                },
                None => Input::Ended,
            },
            Source::Backlog(backlog) => match backlog.next().await? {
                BacklogEvent::Change { lsn, data } => Input::Change { lsn, data },
                BacklogEvent::ChunkEnd { messages } => Input::ChunkEnd { messages },
            },
        })
    }
}

struct Loop<'a> {
    config: &'a Config,
    context: StreamContext,
    resyncs: HashMap<TableName, ActiveResync>,
    resync_tx: mpsc::Sender<ResyncEvent>,
    sql: SqlConn,
    types: TypeCatalog,
    published: std::collections::HashSet<TableName>,
    /// By relation OID, looked up for every row.
    relations: HashMap<u32, RelState, foldhash::fast::RandomState>,
    packager: Packager,
    publisher: Publisher<Mark>,
    decoder: pgoutput::Decoder,
    confirmed: Lsn,
    /// The walsender's WAL end (keepalives): everything before it was sent.
    server_wal_end: Lsn,
    /// The WAL end when the last backlog chunk was read (lag gauge only).
    backlog_wal_end: Lsn,
    last_commit_time_us: Option<i64>,
    value_errors: std::collections::HashSet<(String, String)>,
    /// Looked up once: `release` runs after every round of the loop.
    published_packages: metrics::Counter,
    publish_duplicates: metrics::Counter,
}

/// Streams until shutdown (Ok) or a failure (Err; the caller restarts from
/// the confirmed LSN when it is transient).
#[allow(clippy::too_many_arguments)]
pub async fn run(
    config: &Config,
    context: StreamContext,
    mut source: Source,
    sql: SqlConn,
    types: TypeCatalog,
    published: std::collections::HashSet<TableName>,
    packager: Packager,
    publisher: Publisher<Mark>,
    start: Lsn,
    shutdown: CancellationToken,
) -> Result<(), StreamError> {
    let (resync_tx, mut resync_rx) = mpsc::channel::<ResyncEvent>(8);
    let mut requests = context
        .nats
        .subscribe(topology::resync_request_subject(&config.source))
        .await
        .map_err(StreamError::Subscribe)?;
    let mut state = Loop {
        config,
        context,
        resyncs: HashMap::new(),
        resync_tx,
        sql,
        types,
        published,
        relations: HashMap::default(),
        packager,
        publisher,
        decoder: pgoutput::Decoder::new(1),
        confirmed: start,
        server_wal_end: start,
        backlog_wal_end: start,
        last_commit_time_us: None,
        value_errors: Default::default(),
        published_packages: counter!(m::PUBLISHED_PACKAGES),
        publish_duplicates: counter!(m::PUBLISH_DUPLICATES),
    };
    gauge!(m::CONFIRMED_LSN).set(start.0 as f64);
    let mut status = tokio::time::interval(config.replicator.status_interval);
    status.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let mut heartbeat = tokio::time::interval(config.replicator.heartbeat_interval);
    heartbeat.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tokio::select! {
            biased;
            _ = shutdown.cancelled() => {
                // Confirm what was acked; a partial transaction stays
                // unconfirmed and is re-read on the next start.
                let released = state.publisher.flush().await;
                if let Ok(marks) = released {
                    state.release(marks);
                }
                match source {
                    Source::Streaming(mut replication) => {
                        replication.send_status(state.confirmed, state.confirmed, state.confirmed, false).await?;
                        let _ = replication.finish().await;
                    }
                    Source::Backlog(mut backlog) => backlog.stop(&state.sql.client, state.confirmed).await,
                }
                tracing::info!(confirmed = %state.confirmed, "stopped; confirmed LSN sent");
                state.stop_resyncs().await;
                return Ok(());
            }
            // Timers and control requests come before replication data in
            // this biased select: a backlog must never starve the proactive
            // status updates (wal_sender_timeout) or a resync request.
            _ = status.tick() => state.send_status(&mut source).await?,
            _ = heartbeat.tick() => state.heartbeat().await?,
            Some(request) = requests.next() => state.resync_request(request).await,
            Some((table, event)) = resync_rx.recv() => state.resync_event(table, event).await?,
            acked = state.publisher.wait_one() => acked?,
            input = source.next() => {
                state.input(&mut source, input?).await?;
                // Messages that are already there are taken without another
                // round of the select (its timers and channels cost more than
                // a message); the branches above wait at most this many.
                for _ in 1..INPUTS_PER_SELECT {
                    match source.next().now_or_never() {
                        Some(input) => state.input(&mut source, input?).await?,
                        None => break,
                    }
                }
            }
        }
        let marks = state.publisher.poll_released()?;
        state.release(marks);
    }
}

/// Source messages handled per round of the streaming loop's select, at most.
const INPUTS_PER_SELECT: usize = 256;

impl Loop<'_> {
    async fn input(&mut self, source: &mut Source, input: Input) -> Result<(), StreamError> {
        match input {
            Input::Change { lsn, data } => self.xlog(lsn, data).await,
            Input::Keepalive {
                wal_end,
                reply_requested,
            } => {
                self.server_wal_end = self.server_wal_end.max(wal_end);
                self.confirm_idle(source);
                if reply_requested {
                    self.send_status(source).await?;
                }
                Ok(())
            }
            Input::ChunkEnd { messages } => self.chunk_end(source, messages).await,
            Input::Ended => Err(StreamError::Ended),
        }
    }

    /// Answers a resync request: starts (or joins) a resync per table.
    async fn resync_request(&mut self, request: async_nats::Message) {
        let reply = match v1::ResyncRequest::decode(request.payload.clone()) {
            Err(error) => v1::ResyncReply {
                error: format!("malformed resync request: {error}"),
                ..Default::default()
            },
            Ok(request) => self.start_resyncs(&request),
        };
        if let Some(reply_to) = request.reply
            && let Err(error) = self
                .context
                .nats
                .publish(reply_to, reply.encode_to_vec().into())
                .await
        {
            tracing::warn!(%error, "cannot answer a resync request");
        }
    }

    fn start_resyncs(&mut self, request: &v1::ResyncRequest) -> v1::ResyncReply {
        let mut tables: Vec<TableName> = if request.all {
            self.published.iter().cloned().collect()
        } else {
            let mut tables = Vec::new();
            for name in &request.tables {
                let table = match name.split_once('.') {
                    Some((schema, table)) => (schema.to_owned(), table.to_owned()),
                    None => ("public".to_owned(), name.clone()),
                };
                if !self.published.contains(&table) {
                    return v1::ResyncReply {
                        error: format!(
                            "table {name} is not in publication {}",
                            self.config.postgres.publication
                        ),
                        ..Default::default()
                    };
                }
                tables.push(table);
            }
            tables
        };
        tables.sort();
        tables.dedup();
        let reason = if request.reason.is_empty() {
            "manual".to_owned()
        } else {
            request.reason.clone()
        };
        let mut started = Vec::new();
        for table in tables {
            let label = format!("{}.{}", table.0, table.1);
            if let Some(active) = self.resyncs.get(&table) {
                // Concurrent requests for the same table coalesce.
                started.push(v1::ResyncStarted {
                    table: label,
                    resync_id: active.id.clone(),
                });
                continue;
            }
            let id = format!("{label}@{}", now_us());
            tracing::info!(table = %label, reason = %reason, resync_id = %id, "resync requested");
            let task = tokio::spawn(resync_task(
                self.context.settings.clone(),
                self.context.repl_config.clone(),
                self.config.clone(),
                table.clone(),
                id.clone(),
                reason.clone(),
                self.resync_tx.clone(),
            ));
            self.resyncs.insert(
                table,
                ActiveResync {
                    id: id.clone(),
                    reason: reason.clone(),
                    rows: 0,
                    lsn: None,
                    task,
                },
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

    /// Publishes what a resync reader produced, on the table's new chain.
    async fn resync_event(
        &mut self,
        table: TableName,
        event: Result<Event, SnapshotError>,
    ) -> Result<(), StreamError> {
        let label = format!("{}.{}", table.0, table.1);
        let Some(active) = self.resyncs.get_mut(&table) else {
            return Ok(());
        };
        match event {
            Ok(Event::Begin {
                relation,
                estimate,
                lsn,
                ..
            }) => {
                active.lsn = Some(lsn);
                let spec = SnapshotSpec {
                    resync_id: active.id.clone(),
                    snapshot_name: String::new(),
                    consistent_point: lsn,
                    reason: active.reason.clone(),
                };
                // A new chain: everything of this table from now on, live
                // changes included, follows the RESYNC_BEGIN.
                let generation = lsn.0.max(self.packager.generation() + 1);
                self.packager.start_generation(table.clone(), generation);
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
                gauge!(m::RESYNC_IN_PROGRESS, "table" => label.clone()).set(1.0);
                counter!(m::RESYNCS, "table" => label.clone(), "reason" => active.reason.clone())
                    .increment(1);
                tracing::info!(table = %label, consistent_point = %lsn, estimated_rows = estimate, "resync snapshot started");
                self.resync_progress(&table, false, None).await;
            }
            Ok(Event::Package(package)) => {
                active.rows += package.rows.len() as u64;
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
                gauge!(m::RESYNC_IN_PROGRESS, "table" => label.clone()).set(0.0);
                tracing::info!(table = %label, rows, "resync snapshot published");
                self.resync_progress(&table, true, None).await;
                self.resyncs.remove(&table);
            }
            Err(error) => {
                let error = sluice_broker::error_chain(&error);
                tracing::error!(table = %label, error = %error, "resync failed; request it again");
                gauge!(m::RESYNC_IN_PROGRESS, "table" => label.clone()).set(0.0);
                self.resync_progress(&table, true, Some(error)).await;
                self.resyncs.remove(&table);
            }
        }
        Ok(())
    }

    /// Announces a resync's progress for `sluice-replicator resync` (best effort).
    async fn resync_progress(&self, table: &TableName, done: bool, error: Option<String>) {
        let Some(active) = self.resyncs.get(table) else {
            return;
        };
        let event = serde_json::json!({
            "resync_id": active.id,
            "table": format!("{}.{}", table.0, table.1),
            "rows": active.rows,
            "done": done,
            "error": error,
        });
        let _ = self
            .context
            .nats
            .publish(
                topology::resync_events_subject(&self.config.source),
                event.to_string().into(),
            )
            .await;
    }

    async fn stop_resyncs(&mut self) {
        for (_, active) in self.resyncs.drain() {
            active.task.abort();
            let _ = active.task.await;
        }
    }

    fn release(&mut self, marks: Vec<Mark>) {
        for Mark::Commit {
            end_lsn,
            commit_time_us,
        } in marks
        {
            self.confirmed = self.confirmed.max(end_lsn);
            self.last_commit_time_us = Some(commit_time_us);
        }
        let (published, duplicates) = self.publisher.counts();
        self.published_packages.absolute(published);
        self.publish_duplicates.absolute(duplicates);
    }

    /// Streaming, nothing open, nothing in flight: everything the walsender
    /// sent is durable. (Reading a backlog, the WAL end is only where the
    /// backlog ends, not what was read.)
    fn confirm_idle(&mut self, source: &Source) {
        if matches!(source, Source::Streaming(_))
            && !self.packager.in_transaction()
            && self.publisher.in_flight() == 0
        {
            self.confirmed = self.confirmed.max(self.server_wal_end);
        }
    }

    /// A backlog chunk is read: once it is acknowledged, either move the slot
    /// past it and read the next, or, when it came back short or the rest is
    /// small, switch to the walsender at the confirmed LSN.
    async fn chunk_end(&mut self, source: &mut Source, messages: u64) -> Result<(), StreamError> {
        let Source::Backlog(backlog) = source else {
            return Ok(());
        };
        let marks = self.publisher.flush().await?;
        self.release(marks);
        // Not `server_wal_end`: that one is what the walsender sent, which
        // confirm_idle may confirm once streaming; this is only where the WAL
        // ends now, for the lag gauge.
        let wal_end = backlog.wal_end().await?;
        self.backlog_wal_end = wal_end;
        let behind = wal_end.0.saturating_sub(self.confirmed.0);
        if messages >= backlog.chunk_changes()
            && behind >= self.config.replicator.catchup_min_lag_bytes
        {
            tracing::info!(confirmed = %self.confirmed, behind_bytes = behind, "backlog chunk read; reading the next");
            backlog.advance(self.confirmed).await?;
            return self.send_status(source).await;
        }
        let client = ReplicationClient::connect_with_tls(
            &self.context.repl_config,
            &self.context.settings.tls,
        )
        .await?;
        // The walsender starts at the later of this LSN and the slot's
        // confirmed one, which was not moved past the last chunk.
        let replication = start_walsender(client, self.config, self.confirmed).await?;
        tracing::info!(confirmed = %self.confirmed, behind_bytes = behind, "backlog read; streaming from the walsender");
        *source = Source::Streaming(replication);
        gauge!(m::CATCHING_UP).set(0.0);
        self.send_status(source).await
    }

    async fn send_status(&mut self, source: &mut Source) -> Result<(), StreamError> {
        self.confirm_idle(source);
        if let Source::Streaming(replication) = source {
            replication
                .send_status(self.confirmed, self.confirmed, self.confirmed, false)
                .await?;
        }
        gauge!(m::CONFIRMED_LSN).set(self.confirmed.0 as f64);
        let wal_end = self.server_wal_end.max(self.backlog_wal_end);
        gauge!(m::SLOT_LAG_BYTES).set(wal_end.0.saturating_sub(self.confirmed.0) as f64);
        let lag = match self.last_commit_time_us {
            Some(t) if self.publisher.in_flight() > 0 || self.packager.in_transaction() => {
                (now_us() - t).max(0) as f64 / 1e6
            }
            // Caught up: nothing is waiting to be published.
            _ => 0.0,
        };
        gauge!(m::REPLICATOR_LAG_SECONDS).set(lag);
        Ok(())
    }

    async fn heartbeat(&mut self) -> Result<(), StreamError> {
        let package = heartbeat_package(
            &self.config.source,
            self.packager.generation(),
            self.server_wal_end.0,
        );
        self.publisher
            .publish(heartbeat_outgoing(
                &self.config.source,
                &self.config.postgres.slot,
                package,
            ))
            .await?;
        Ok(())
    }

    async fn xlog(&mut self, wal_start: Lsn, data: bytes::Bytes) -> Result<(), StreamError> {
        let message = self
            .decoder
            .decode(data)
            .map_err(|source| StreamError::Decode {
                lsn: wal_start,
                source,
            })?;
        match message {
            LogicalMessage::Begin(begin) => {
                self.packager
                    .begin(begin.final_lsn, begin.commit_time_us, begin.xid);
            }
            LogicalMessage::Commit(commit) => {
                for out in self.packager.commit() {
                    self.publisher.publish(out).await?;
                }
                self.publisher.mark(Mark::Commit {
                    end_lsn: Lsn(commit.end_lsn),
                    commit_time_us: commit.commit_time_us,
                });
            }
            LogicalMessage::Relation(relation) => self.relation(relation).await?,
            LogicalMessage::Type(t) => self.types.forget(t.oid),
            LogicalMessage::Insert(insert) => {
                let values = self.tuple(insert.relation_oid, wal_start, &insert.new)?;
                self.row(
                    insert.relation_oid,
                    wal_start,
                    v1::Op::Insert,
                    values,
                    Vec::new(),
                )
                .await?;
            }
            LogicalMessage::Update(update) => {
                let values = self.tuple(update.relation_oid, wal_start, &update.new)?;
                let old_key = match &update.old {
                    Some(OldTuple::Key(old)) | Some(OldTuple::Full(old)) => {
                        self.tuple(update.relation_oid, wal_start, old)?
                    }
                    None => Vec::new(),
                };
                self.row(
                    update.relation_oid,
                    wal_start,
                    v1::Op::Update,
                    values,
                    old_key,
                )
                .await?;
            }
            LogicalMessage::Delete(delete) => {
                let old = match &delete.old {
                    OldTuple::Key(old) | OldTuple::Full(old) => old,
                };
                let values = self.tuple(delete.relation_oid, wal_start, old)?;
                self.row(
                    delete.relation_oid,
                    wal_start,
                    v1::Op::Delete,
                    values,
                    Vec::new(),
                )
                .await?;
            }
            LogicalMessage::Truncate(truncate) => {
                for oid in &truncate.relation_oids {
                    let Some(rel) = self.relations.get(oid) else {
                        return Err(StreamError::UnknownRelation {
                            oid: *oid,
                            lsn: wal_start,
                        });
                    };
                    let (table, relation) = (rel.table.clone(), rel.relation.clone());
                    let outs = self.packager.truncate(
                        &table,
                        &relation,
                        v1::Truncate {
                            cascade: truncate.cascade,
                            restart_identity: truncate.restart_identity,
                        },
                    );
                    for out in outs {
                        self.publisher.publish(out).await?;
                    }
                }
            }
            LogicalMessage::Origin(_) | LogicalMessage::Message(_) => {}
            LogicalMessage::StreamStart(_)
            | LogicalMessage::StreamStop
            | LogicalMessage::StreamCommit(_)
            | LogicalMessage::StreamAbort(_) => return Err(StreamError::StreamingNotSupported),
        }
        Ok(())
    }

    async fn relation(&mut self, relation: pgoutput::Relation) -> Result<(), StreamError> {
        let table = (relation.namespace.clone(), relation.name.clone());
        let label = format!("{}.{}", table.0, table.1);
        let info = catalog::table_columns(&self.sql.client, &table.0, &table.1).await;
        let same_layout = |info: &catalog::TableInfo| {
            info.columns.len() == relation.columns.len()
                && info
                    .columns
                    .iter()
                    .zip(&relation.columns)
                    .all(|(a, b)| a.name == b.name && a.type_oid == b.type_oid)
        };
        let mut types = Vec::with_capacity(relation.columns.len());
        for column in &relation.columns {
            types.push(
                self.types
                    .resolve(&self.sql.client, column.type_oid)
                    .await?
                    .clone(),
            );
        }
        let v1_relation = match info {
            Ok(info) if same_layout(&info) => {
                self.types.resolve_table(&self.sql.client, &info).await?;
                catalog::to_relation(&info, &self.types)?
            }
            Ok(_)
            | Err(CatalogError::TableNotFound { .. })
            | Err(CatalogError::NoReplicaIdentity { .. }) => {
                // The catalog moved on since this change was written (later
                // DDL): describe the columns from the message itself.
                v1::Relation {
                    oid: relation.oid,
                    replica_identity: char::from(relation.replica_identity).to_string(),
                    columns: relation
                        .columns
                        .iter()
                        .zip(&types)
                        .map(|(c, t)| v1::Column {
                            name: c.name.clone(),
                            type_oid: c.type_oid,
                            type_modifier: c.type_modifier,
                            type_name: t.name.clone(),
                            nullable: !c.key,
                            key: c.key,
                            type_kind: t.kind as i32,
                            base_type_oid: t.base_type_oid,
                        })
                        .collect(),
                }
            }
            Err(error) => return Err(error.into()),
        };
        if !self.published.contains(&table) {
            tracing::info!(table = %label, "new table in the publication; streaming its changes (run `sluice-replicator resync --table {label}` to load its existing rows)");
            self.published.insert(table.clone());
        }
        self.relations.insert(
            relation.oid,
            RelState {
                published_rows: ["insert", "update", "delete"]
                    .map(|op| counter!(m::PUBLISHED_ROWS, "table" => label.clone(), "op" => op)),
                table,
                label,
                relation: Arc::new(v1_relation),
                types,
            },
        );
        Ok(())
    }

    fn tuple(
        &mut self,
        oid: u32,
        lsn: Lsn,
        tuple: &TupleData,
    ) -> Result<Vec<v1::Value>, StreamError> {
        let Some(rel) = self.relations.get(&oid) else {
            return Err(StreamError::UnknownRelation { oid, lsn });
        };
        let mut values = Vec::with_capacity(tuple.len());
        for (i, cell) in tuple.iter().enumerate() {
            let value = match cell {
                TupleValue::Null => values::null(),
                TupleValue::UnchangedToast => values::unchanged_toast(),
                TupleValue::Text(bytes) | TupleValue::Binary(bytes) => {
                    let text = String::from_utf8_lossy(bytes);
                    match rel.types.get(i) {
                        Some(ty) => match values::decode_text(ty, &text) {
                            Ok(value) => value,
                            Err(error) => {
                                // Keep the value as text rather than drop the
                                // row; report the column once.
                                let column = rel
                                    .relation
                                    .columns
                                    .get(i)
                                    .map(|c| c.name.clone())
                                    .unwrap_or_default();
                                if self
                                    .value_errors
                                    .insert((rel.label.clone(), column.clone()))
                                {
                                    tracing::error!(table = %rel.label, column = %column, error = %error, "value does not parse as its type; sent as text");
                                }
                                counter!(m::VALUE_DECODE_ERRORS, "table" => rel.label.clone())
                                    .increment(1);
                                v1::Value {
                                    kind: Some(v1::value::Kind::Text(text.into_owned())),
                                }
                            }
                        },
                        None => v1::Value {
                            kind: Some(v1::value::Kind::Text(text.into_owned())),
                        },
                    }
                }
            };
            values.push(value);
        }
        Ok(values)
    }

    async fn row(
        &mut self,
        oid: u32,
        lsn: Lsn,
        op: v1::Op,
        values: Vec<v1::Value>,
        old_key: Vec<v1::Value>,
    ) -> Result<(), StreamError> {
        let Some(rel) = self.relations.get(&oid) else {
            return Err(StreamError::UnknownRelation { oid, lsn });
        };
        let op_index = match op {
            v1::Op::Insert => 0,
            v1::Op::Update => 1,
            _ => 2,
        };
        rel.published_rows[op_index].increment(1);
        let row = v1::Row {
            op: op as i32,
            values,
            old_key,
        };
        if let Some(out) = self.packager.add_row(&rel.table, &rel.relation, row) {
            self.publisher.publish(out).await?;
        }
        Ok(())
    }
}

/// `START_REPLICATION` of the configured slot and publication (pgoutput
/// proto 1) from the later of `start` and the slot's confirmed LSN.
pub async fn start_walsender(
    client: ReplicationClient,
    config: &Config,
    start: Lsn,
) -> Result<ReplicationStream, ReplicationError> {
    let publication = crate::replication::publication_names([config.postgres.publication.as_str()]);
    client
        .start_replication(
            &config.postgres.slot,
            start,
            &[("proto_version", "1"), ("publication_names", &publication)],
        )
        .await
}

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
    }
}

/// Microseconds since the Unix epoch.
pub fn now_us() -> i64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .unwrap_or(Duration::ZERO)
        .as_micros() as i64
}

/// Creates a temporary slot (its exported snapshot has a known consistent
/// point), reads the table in that snapshot and reports to the loop.
async fn resync_task(
    settings: PgSettings,
    repl_config: tokio_postgres::Config,
    config: Config,
    table: TableName,
    id: String,
    reason: String,
    tx: mpsc::Sender<ResyncEvent>,
) {
    let result = async {
        let mut client = ReplicationClient::connect_with_tls(&repl_config, &settings.tls)
            .await
            .map_err(|e| {
                SnapshotError::ReaderLost(format!(
                    "{}.{}: {}",
                    table.0,
                    table.1,
                    sluice_broker::error_chain(&e)
                ))
            })?;
        let slot = format!("{}_resync_{}", config.postgres.slot, now_us());
        let created = client.create_logical_slot(&slot, true).await.map_err(|e| {
            SnapshotError::ReaderLost(format!(
                "{}.{}: {}",
                table.0,
                table.1,
                sluice_broker::error_chain(&e)
            ))
        })?;
        let spec = SnapshotSpec {
            resync_id: id,
            snapshot_name: created.snapshot_name,
            consistent_point: created.consistent_point,
            reason,
        };
        let (inner_tx, mut inner_rx) = mpsc::channel(4);
        let limits = (
            config.replicator.package_max_rows,
            config.replicator.package_max_bytes,
        );
        let reader = {
            let (settings, source, table) =
                (settings.clone(), config.source.clone(), table.clone());
            async move {
                let read =
                    snapshot::read_table(&settings, &spec, &source, &table, limits, &inner_tx)
                        .await;
                // Ends the forwarding loop below.
                drop(inner_tx);
                read
            }
        };
        let forward = async {
            while let Some(event) = inner_rx.recv().await {
                if tx.send((table.clone(), event)).await.is_err() {
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
        let _ = tx.send((table, Err(error))).await;
    }
}
