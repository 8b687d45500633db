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

use std::collections::HashMap;
use std::sync::Arc;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use metrics::{counter, gauge};
use sluice_broker::config::Config;
use sluice_broker::publish::{Outgoing, PublishError, Publisher};
use sluice_broker::topology;
use sluice_proto::v1;
use tokio_util::sync::CancellationToken;

use crate::catalog::{self, CatalogError, TypeCatalog, TypeInfo};
use crate::metrics as m;
use crate::packager::{Packager, TableName};
use crate::pg::SqlConn;
use crate::pgoutput::{self, LogicalMessage, OldTuple, TupleData, TupleValue};
use crate::replication::{Lsn, ReplicationError, ReplicationEvent, ReplicationStream};
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
}

impl StreamError {
    pub fn is_transient(&self) -> bool {
        match self {
            StreamError::Replication(e) => e.is_transient(),
            StreamError::Publish(_) | StreamError::Ended => true,
            StreamError::Catalog(e) => e.is_transient(),
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
}

/// What a mark in the publisher stands for.
pub enum Mark {
    /// A transaction is durable up to this LSN; its commit time.
    Commit { end_lsn: Lsn, commit_time_us: i64 },
}

struct Loop<'a> {
    config: &'a Config,
    sql: SqlConn,
    types: TypeCatalog,
    published: std::collections::HashSet<TableName>,
    relations: HashMap<u32, RelState>,
    packager: Packager,
    publisher: Publisher<Mark>,
    decoder: pgoutput::Decoder,
    confirmed: Lsn,
    server_wal_end: Lsn,
    last_commit_time_us: Option<i64>,
    value_errors: std::collections::HashSet<(String, String)>,
}

/// Streams until shutdown (Ok) or a failure (Err; the caller restarts from
/// the confirmed LSN when it is transient).
#[allow(clippy::too_many_arguments)]
pub async fn run(
    config: &Config,
    mut replication: ReplicationStream,
    sql: SqlConn,
    types: TypeCatalog,
    published: std::collections::HashSet<TableName>,
    packager: Packager,
    publisher: Publisher<Mark>,
    start: Lsn,
    shutdown: CancellationToken,
) -> Result<(), StreamError> {
    let mut state = Loop {
        config,
        sql,
        types,
        published,
        relations: HashMap::new(),
        packager,
        publisher,
        decoder: pgoutput::Decoder::new(1),
        confirmed: start,
        server_wal_end: start,
        last_commit_time_us: None,
        value_errors: Default::default(),
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
                replication.send_status(state.confirmed, state.confirmed, state.confirmed, false).await?;
                tracing::info!(confirmed = %state.confirmed, "stopped; confirmed LSN sent");
                let _ = replication.finish().await;
                return Ok(());
            }
            event = replication.next() => {
                match event? {
                    Some(ReplicationEvent::XLogData { wal_start, data, .. }) => {
                        state.xlog(wal_start, data).await?;
                    }
                    Some(ReplicationEvent::Keepalive { wal_end, reply_requested, .. }) => {
                        state.server_wal_end = state.server_wal_end.max(wal_end);
                        state.confirm_idle();
                        if reply_requested {
                            state.send_status(&mut replication).await?;
                        }
                    }
                    None => return Err(StreamError::Ended),
                }
            }
            acked = state.publisher.wait_one() => acked?,
            _ = status.tick() => state.send_status(&mut replication).await?,
            _ = heartbeat.tick() => state.heartbeat().await?,
        }
        let marks = state.publisher.poll_released()?;
        state.release(marks);
    }
}

impl Loop<'_> {
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
        counter!(m::PUBLISHED_PACKAGES).absolute(published);
        counter!(m::PUBLISH_DUPLICATES).absolute(duplicates);
    }

    /// Nothing open, nothing in flight: everything the server sent is durable.
    fn confirm_idle(&mut self) {
        if !self.packager.in_transaction() && self.publisher.in_flight() == 0 {
            self.confirmed = self.confirmed.max(self.server_wal_end);
        }
    }

    async fn send_status(
        &mut self,
        replication: &mut ReplicationStream,
    ) -> Result<(), StreamError> {
        self.confirm_idle();
        replication
            .send_status(self.confirmed, self.confirmed, self.confirmed, false)
            .await?;
        gauge!(m::CONFIRMED_LSN).set(self.confirmed.0 as f64);
        gauge!(m::SLOT_LAG_BYTES)
            .set(self.server_wal_end.0.saturating_sub(self.confirmed.0) as f64);
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
                                counter!("sluice_value_decode_errors_total", "table" => rel.label.clone()).increment(1);
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
        let op_label = match op {
            v1::Op::Insert => "insert",
            v1::Op::Update => "update",
            _ => "delete",
        };
        counter!(m::PUBLISHED_ROWS, "table" => rel.label.clone(), "op" => op_label).increment(1);
        let row = v1::Row {
            op: op as i32,
            values,
            old_key,
        };
        let (table, relation) = (rel.table.clone(), rel.relation.clone());
        if let Some(out) = self.packager.add_row(&table, &relation, row) {
            self.publisher.publish(out).await?;
        }
        Ok(())
    }
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
