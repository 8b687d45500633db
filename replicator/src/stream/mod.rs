//! The streaming loop: replication events in, packages out, LSNs confirmed.
//! This module owns the select loop and its sources; which LSN to confirm is
//! decided in [`confirm`], pgoutput changes become rows in [`translate`], and
//! resyncs on request run in [`resync`].
//!
//! Invariants this module is responsible for (ARCHITECTURE.md invariants 1 and 5):
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
//! - **Only committed rows leave.** A transaction Postgres 14+ streams before
//!   its commit waits in a spill file ([`streamed`]) and goes through the
//!   same path at its Stream Commit, before anything the source sent after
//!   it; its commit LSN is confirmed like any other.

mod confirm;
mod publication;
mod resync;
mod streamed;
mod translate;

use std::collections::HashSet;

use futures::{FutureExt as _, StreamExt};
use metrics::{counter, gauge};
use sluice_broker::TableName;
use sluice_broker::config::Config;
use sluice_broker::publish::PublishError;
use sluice_broker::topology;
use sluice_proto::v1;
use tokio_util::sync::CancellationToken;

use crate::backlog::{Backlog, BacklogEvent};
use crate::catalog::{CatalogError, PublicationShape, TypeCatalog};
use crate::metrics as m;
use crate::packager::Packager;
use crate::pg::{PgError, PgSettings, SqlConn};
use crate::pgoutput::{self, LogicalMessage};
use crate::publish::{Mark, Publisher, heartbeat_outgoing, heartbeat_package, now_us};
use crate::replication::{
    Lsn, ReplicationClient, ReplicationError, ReplicationEvent, ReplicationStream,
};
use confirm::Confirmation;
use resync::Resyncs;
pub use resync::UnfinishedResync;
use streamed::{Replay, Streamed};
pub use streamed::{ReplayError, SpillError};
use translate::Translator;

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
    #[error("pgoutput stream control message at {lsn} inside a streamed transaction")]
    NestedStreamMessage { lsn: Lsn },
    #[error(transparent)]
    Spill(#[from] SpillError),
    #[error(transparent)]
    Replay(#[from] ReplayError),
    #[error("Postgres ended the replication stream")]
    Ended,
    #[error("cannot subscribe to resync requests")]
    Subscribe(#[source] async_nats::SubscribeError),
    #[error(transparent)]
    Backlog(#[from] PgError),
}

/// Everything the streaming loop starts from.
pub struct Setup<'a> {
    pub config: &'a Config,
    pub nats: async_nats::Client,
    pub settings: PgSettings,
    /// Replication-connection settings (for temporary resync slots and the
    /// switch from a backlog to the walsender).
    pub repl_config: tokio_postgres::Config,
    pub source: Source,
    /// SQL connection for catalog queries (and the backlog's slot moves).
    pub sql: SqlConn,
    pub types: TypeCatalog,
    /// Tables of the publication that are replicated.
    pub published: HashSet<TableName>,
    /// Tables of the publication that cannot be replicated (already reported).
    pub unreplicable: HashSet<TableName>,
    /// The publication's shape (column lists, row filters, partitions,
    /// entries) when the run started.
    pub shape: PublicationShape,
    /// Replicated tables without a package in the stream: resynced at once
    /// (reason `not_in_stream`).
    pub not_in_stream: Vec<TableName>,
    /// Replicated tables whose last package carries another publication
    /// fingerprint than the publication has now (changed while the
    /// replicator was stopped): resynced at once (reason
    /// `publication_changed`).
    pub changed_while_stopped: Vec<TableName>,
    /// Resyncs an earlier run began and did not end: continued at once.
    pub unfinished_resyncs: Vec<UnfinishedResync>,
    pub packager: Packager,
    pub publisher: Publisher,
    /// The decoder for the source's pgoutput protocol ([`start_walsender`]).
    pub decoder: pgoutput::Decoder,
    /// The LSN streaming starts from (already confirmed).
    pub start: Lsn,
    pub shutdown: CancellationToken,
}

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
    ChunkEnd { last: bool, read_to: Lsn },
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
                Some(BacklogEvent::Change { lsn, data }) => Input::Change { lsn, data },
                Some(BacklogEvent::ChunkEnd { last, read_to, .. }) => {
                    Input::ChunkEnd { last, read_to }
                }
                None => Input::Ended,
            },
        })
    }
}

/// The loop's state; [`resync`] adds its methods.
struct Loop<'a> {
    config: &'a Config,
    nats: async_nats::Client,
    settings: PgSettings,
    repl_config: tokio_postgres::Config,
    resyncs: Resyncs,
    sql: SqlConn,
    translate: Translator,
    /// Published tables that cannot be replicated ([`publication`]).
    unreplicable: HashSet<TableName>,
    /// The publication's shape as last read ([`publication`]).
    shape: PublicationShape,
    packager: Packager,
    publisher: Publisher,
    decoder: pgoutput::Decoder,
    /// Transactions streamed before their commit ([`streamed`]).
    streamed: Streamed,
    /// A committed streamed transaction being handed to the packager; the
    /// source is not read until it is done.
    replay: Option<Replay>,
    confirm: Confirmation,
    /// Looked up once: `release` runs after every round of the loop.
    published_packages: metrics::Counter,
    publish_duplicates: metrics::Counter,
}

/// Streams until shutdown (Ok) or a failure (Err; the caller decides with
/// [`crate::run`]'s supervisor whether to restart from the confirmed LSN).
pub async fn run(setup: Setup<'_>) -> Result<(), StreamError> {
    let Setup {
        config,
        nats,
        settings,
        repl_config,
        mut source,
        sql,
        types,
        published,
        unreplicable,
        shape,
        not_in_stream,
        changed_while_stopped,
        unfinished_resyncs,
        packager,
        publisher,
        decoder,
        start,
        shutdown,
    } = setup;
    let (resyncs, mut resync_rx) = Resyncs::new();
    let mut requests = nats
        .subscribe(topology::resync_request_subject(&config.source))
        .await
        .map_err(StreamError::Subscribe)?;
    let mut state = Loop {
        config,
        nats,
        settings,
        repl_config,
        resyncs,
        sql,
        translate: Translator::new(types, published),
        unreplicable,
        shape,
        packager,
        publisher,
        decoder,
        streamed: Streamed::new(spill_dir(config)),
        replay: None,
        confirm: Confirmation::new(start),
        published_packages: counter!(m::PUBLISHED_PACKAGES),
        publish_duplicates: counter!(m::PUBLISH_DUPLICATES),
    };
    gauge!(m::CONFIRMED_LSN).set(start.0 as f64);
    let mut status = tokio::time::interval(config.replicator.status_interval);
    status.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let mut heartbeat = tokio::time::interval(config.replicator.heartbeat_interval);
    heartbeat.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    // `0s` turns the periodic check off (a Relation of an unknown table
    // still checks).
    let check_every = config.replicator.publication_check_interval;
    let checking = !check_every.is_zero();
    let check_every = check_every.max(std::time::Duration::from_millis(100));
    let mut publication_check =
        tokio::time::interval_at(tokio::time::Instant::now() + check_every, check_every);
    publication_check.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    // Before any request is read: a request for one of these joins it.
    state.continue_resyncs(unfinished_resyncs);
    if !not_in_stream.is_empty() {
        let names: Vec<String> = not_in_stream.iter().map(TableName::to_string).collect();
        tracing::info!(tables = %names.join(", "), "published tables without a package in the stream (added to the publication while stopped, or aged out of the stream): loading them");
        state.resync_tables(not_in_stream, "not_in_stream");
    }
    if !changed_while_stopped.is_empty() {
        let names: Vec<String> = changed_while_stopped
            .iter()
            .map(TableName::to_string)
            .collect();
        tracing::info!(tables = %names.join(", "), "the publication's entry, column list, row filter or partitions of these tables changed while the replicator was stopped: resyncing them");
        state.resync_tables(changed_while_stopped, "publication_changed");
    }
    loop {
        // Nothing new goes out while a resync's slot waits for its
        // RESYNC_BEGIN (`Resyncs::holding`).
        let holding = state.resyncs.holding();
        tokio::select! {
            biased;
            _ = shutdown.cancelled() => {
                // Confirm what was acked; a partial transaction stays
                // unconfirmed and is re-read on the next start.
                let released = state.publisher.flush().await;
                if let Ok(marks) = released {
                    state.release(marks);
                }
                let confirmed = state.confirm.confirmed();
                match source {
                    Source::Streaming(mut replication) => {
                        replication.send_status(confirmed, confirmed, confirmed, false).await?;
                        let _ = replication.finish().await;
                    }
                    Source::Backlog(mut backlog) => backlog.stop(&state.sql.client, confirmed).await,
                }
                tracing::info!(confirmed = %confirmed, "stopped; confirmed LSN sent");
                state.stop_resyncs().await;
                return Ok(());
            }
            // Timers and control requests come before replication data in
            // this biased select: a backlog must never starve the proactive
            // status updates (wal_sender_timeout) or a resync request.
            _ = status.tick() => state.send_status(&mut source).await?,
            _ = heartbeat.tick() => state.heartbeat().await?,
            _ = publication_check.tick(), if checking => state.check_publication(None).await?,
            Some(request) = requests.next() => state.resync_request(request).await,
            Some((table, attempt, event)) = resync_rx.recv() => state.resync_event(table, attempt, event).await?,
            acked = state.publisher.wait_one() => acked?,
            // A committed streamed transaction goes first: what the source
            // sends next committed after it.
            _ = std::future::ready(()), if state.replay.is_some() && !holding => state.replay_some().await?,
            input = source.next(), if !holding => {
                state.input(&mut source, input?).await?;
                // Messages that are already there are taken without another
                // round of the select (its timers and channels cost more than
                // a message); the branches above wait at most this many.
                for _ in 1..INPUTS_PER_SELECT {
                    if state.replay.is_some() {
                        break;
                    }
                    match source.next().now_or_never() {
                        Some(input) => state.input(&mut source, input?).await?,
                        None => break,
                    }
                }
            }
        }
        let marks = state.publisher.poll_released()?;
        state.release(marks);
        state.record_resyncs().await?;
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
                self.confirm.keepalive(wal_end);
                self.confirm_idle(source);
                if reply_requested {
                    self.send_status(source).await?;
                }
                Ok(())
            }
            Input::ChunkEnd { last, read_to } => self.chunk_end(source, last, read_to).await,
            Input::Ended => Err(StreamError::Ended),
        }
    }

    /// A transaction open or packages waiting for acks.
    fn busy(&self) -> bool {
        self.publisher.in_flight() > 0 || self.packager.in_transaction()
    }

    fn release(&mut self, marks: Vec<Mark>) {
        self.resyncs.release(&marks);
        self.confirm.release(marks);
        let (published, duplicates) = self.publisher.counts();
        self.published_packages.absolute(published);
        self.publish_duplicates.absolute(duplicates);
    }

    /// Streaming, nothing open, nothing in flight: everything the walsender
    /// sent is durable (see [`Confirmation::confirm_idle`]).
    fn confirm_idle(&mut self, source: &Source) {
        let busy = self.busy();
        self.confirm
            .confirm_idle(matches!(source, Source::Streaming(_)), busy);
    }

    /// A backlog call is read. Unless it was the last, the next one is
    /// already being read: the slot starts moving (in the background) to
    /// what is acknowledged so far. After the last, once everything is
    /// acknowledged, the confirmed LSN moves to where the calls read
    /// (`read_to`: nothing of the publication before it is left), the slot
    /// is moved there, and the loop switches to the walsender.
    async fn chunk_end(
        &mut self,
        source: &mut Source,
        last: bool,
        read_to: Lsn,
    ) -> Result<(), StreamError> {
        let Source::Backlog(backlog) = source else {
            return Ok(());
        };
        // Not the walsender's WAL end: that one is what the walsender sent,
        // which confirm_idle may confirm once streaming; this is only where
        // the WAL ends now, for the lag gauge.
        let wal_end = crate::pg::current_wal_lsn(&self.sql.client).await?;
        if !last {
            let behind = self.confirm.backlog_read(wal_end);
            let confirmed = self.confirm.confirmed();
            tracing::info!(confirmed = %confirmed, behind_bytes = behind, "backlog chunk read; reading the next");
            backlog.advance(confirmed);
            return self.send_status(source).await;
        }
        let marks = self.publisher.flush().await?;
        self.release(marks);
        // Calls end after a COMMIT: nothing is open once all is flushed.
        if !self.busy() {
            self.confirm.backlog_done(read_to);
        }
        let behind = self.confirm.backlog_read(wal_end);
        let confirmed = self.confirm.confirmed();
        // Past the restart point logged at the backlog's end, so the
        // walsender does not decode the backlog again; it cannot take the
        // slot while it is being moved.
        let restart = backlog.finish(confirmed).await;
        let client =
            ReplicationClient::connect_with_tls(&self.repl_config, &self.settings.tls).await?;
        // The walsender starts at the later of this LSN and the slot's
        // confirmed one, which was not moved past what was acknowledged.
        let (replication, decoder) = start_walsender(client, self.config, confirmed).await?;
        self.decoder = decoder;
        let restart = restart.map_or_else(|| "unknown".to_owned(), |lsn| lsn.to_string());
        tracing::info!(confirmed = %confirmed, restart_lsn = %restart, behind_bytes = behind, "backlog read; streaming from the walsender");
        // Dropping the backlog ends its session and the slot's copy.
        *source = Source::Streaming(replication);
        gauge!(m::CATCHING_UP).set(0.0);
        self.send_status(source).await
    }

    async fn send_status(&mut self, source: &mut Source) -> Result<(), StreamError> {
        self.confirm_idle(source);
        let confirmed = self.confirm.confirmed();
        if let Source::Streaming(replication) = source {
            replication
                .send_status(confirmed, confirmed, confirmed, false)
                .await?;
            fail::fail_point!("replicator::confirm::after_status", |_| crate::crash_here());
        }
        gauge!(m::CONFIRMED_LSN).set(confirmed.0 as f64);
        gauge!(m::SLOT_LAG_BYTES).set(self.confirm.slot_lag_bytes() as f64);
        let lag = self.confirm.lag_seconds(self.busy(), now_us());
        gauge!(m::REPLICATOR_LAG_SECONDS).set(lag);
        Ok(())
    }

    async fn heartbeat(&mut self) -> Result<(), StreamError> {
        let package = heartbeat_package(
            &self.config.source,
            self.packager.generation(),
            self.confirm.server_wal_end().0,
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

    /// Failpoint `replicator::publish::after_package`: the process dies once
    /// the packages published so far are acknowledged (for a transaction cut
    /// into several packages: in its middle), before anything more is
    /// confirmed to Postgres.
    #[cfg(feature = "failpoints")]
    async fn failpoint_after_package(&mut self) {
        if fail::eval("replicator::publish::after_package", |_| ()).is_some() {
            let _ = self.publisher.flush().await;
            crate::crash_here::<()>();
        }
    }

    async fn xlog(&mut self, wal_start: Lsn, data: bytes::Bytes) -> Result<(), StreamError> {
        let message = self
            .decoder
            .decode(data.clone())
            .map_err(|source| StreamError::Decode {
                lsn: wal_start,
                source,
            })?;
        // Inside a stream block (the decoder knows) every change carries its
        // (sub)transaction's xid and goes to the spill file.
        if let Some(top) = self.decoder.open_stream() {
            let (sub, schema) = match &message {
                LogicalMessage::StreamStart(start) => {
                    return Ok(self.streamed.start(start.xid, start.first_segment)?);
                }
                LogicalMessage::Relation(m) => (m.xid, true),
                LogicalMessage::Type(m) => (m.xid, true),
                LogicalMessage::Insert(m) => (m.xid, false),
                LogicalMessage::Update(m) => (m.xid, false),
                LogicalMessage::Delete(m) => (m.xid, false),
                LogicalMessage::Truncate(m) => (m.xid, false),
                // Logical decoding messages and origins carry nothing to
                // replicate.
                _ => return Ok(()),
            };
            return Ok(self
                .streamed
                .add(top, sub.unwrap_or(top), wal_start, data, schema)?);
        }
        match message {
            LogicalMessage::StreamStop => Ok(()),
            LogicalMessage::StreamAbort(abort) => {
                Ok(self.streamed.abort(abort.xid, abort.subxid)?)
            }
            LogicalMessage::StreamCommit(commit) => {
                self.packager
                    .begin(commit.commit_lsn, commit.commit_time_us, commit.xid);
                self.replay = Some(self.streamed.commit(commit)?);
                Ok(())
            }
            message => self.apply(wal_start, message).await,
        }
    }

    /// Hands a committed streamed transaction's messages to [`Loop::apply`],
    /// at most [`INPUTS_PER_SELECT`] per round of the select, then commits it.
    async fn replay_some(&mut self) -> Result<(), StreamError> {
        // Failpoint `replicator::streamed::replay=return(MS)`: each round of
        // a replay sleeps MS milliseconds (a test's window into its middle).
        #[cfg(feature = "failpoints")]
        if let Some(ms) = fail::eval("replicator::streamed::replay", |arg| {
            arg.and_then(|ms| ms.parse::<u64>().ok())
        })
        .flatten()
        {
            tokio::time::sleep(std::time::Duration::from_millis(ms)).await;
        }
        for _ in 0..INPUTS_PER_SELECT {
            let Some(replay) = self.replay.as_mut() else {
                return Ok(());
            };
            match replay.next()? {
                Some((lsn, message)) => self.apply(lsn, message).await?,
                None => {
                    let commit = self.replay.take().expect("replaying").commit;
                    return self.commit(commit.end_lsn, commit.commit_time_us).await;
                }
            }
        }
        Ok(())
    }

    async fn commit(&mut self, end_lsn: u64, commit_time_us: i64) -> Result<(), StreamError> {
        for out in self.packager.commit() {
            self.publisher.publish(out).await?;
            #[cfg(feature = "failpoints")]
            self.failpoint_after_package().await;
        }
        self.publisher.mark(Mark::Commit {
            end_lsn: Lsn(end_lsn),
            commit_time_us,
        });
        Ok(())
    }

    /// One message of a transaction, as received or read back from a spill
    /// file.
    async fn apply(&mut self, wal_start: Lsn, message: LogicalMessage) -> Result<(), StreamError> {
        match message {
            LogicalMessage::Begin(begin) => {
                self.packager
                    .begin(begin.final_lsn, begin.commit_time_us, begin.xid);
            }
            LogicalMessage::Commit(commit) => {
                self.commit(commit.end_lsn, commit.commit_time_us).await?;
            }
            LogicalMessage::Relation(relation) => {
                let oid = relation.oid;
                let (table, keyed) = self.translate.relation(&self.sql.client, relation).await?;
                // Added to the publication since, or removed from it.
                if !self.translate.published.contains(&table) {
                    self.check_publication(Some(&table)).await?;
                }
                self.check_key(oid, &table, keyed);
            }
            LogicalMessage::Type(t) => self.translate.forget_type(t.oid),
            LogicalMessage::Insert(_) | LogicalMessage::Update(_) | LogicalMessage::Delete(_) => {
                if let Some((rel, row)) = self.translate.row(wal_start, &message)?
                    && let Some(out) = self.packager.add_row(&rel.table, &rel.relation, row)
                {
                    self.publisher.publish(out).await?;
                    #[cfg(feature = "failpoints")]
                    self.failpoint_after_package().await;
                }
            }
            LogicalMessage::Truncate(truncate) => {
                for oid in &truncate.relation_oids {
                    let rel = self.translate.table(*oid, wal_start)?;
                    if rel.skip {
                        continue;
                    }
                    let outs = self.packager.truncate(
                        &rel.table,
                        &rel.relation,
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
            | LogicalMessage::StreamAbort(_) => {
                return Err(StreamError::NestedStreamMessage { lsn: wal_start });
            }
        }
        Ok(())
    }
}

/// `START_REPLICATION` of the configured slot and publication from the later
/// of `start` and the slot's confirmed LSN, with the decoder for its
/// messages: pgoutput protocol 2 with `streaming 'on'` when
/// `replicator.streaming` is set and the server has it (14+), else 1.
pub async fn start_walsender(
    mut client: ReplicationClient,
    config: &Config,
    start: Lsn,
) -> Result<(ReplicationStream, pgoutput::Decoder), ReplicationError> {
    let publication = crate::replication::publication_names([config.postgres.publication.as_str()]);
    let streaming = config.replicator.streaming
        && sluice_postgres::version::has_streaming(client.server_version_num().await?);
    let mut options = vec![
        ("proto_version", if streaming { "2" } else { "1" }),
        ("publication_names", publication.as_str()),
    ];
    if streaming {
        options.push(("streaming", "on"));
    }
    let stream = client
        .start_replication(&config.postgres.slot, start, &options)
        .await?;
    Ok((
        stream,
        pgoutput::Decoder::new(if streaming { 2 } else { 1 }),
    ))
}

/// Where streamed transactions are spilled: `replicator.spill_dir`, or the
/// system's temporary directory.
pub fn spill_dir(config: &Config) -> std::path::PathBuf {
    config
        .replicator
        .spill_dir
        .clone()
        .unwrap_or_else(std::env::temp_dir)
}
