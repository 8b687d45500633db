//! Wiring of `sluice-replicator run`: connects things together and contains
//! no processing logic (that lives in [`crate::stream`], [`crate::snapshot`],
//! [`crate::packager`]; what to do with the slot is decided in
//! [`crate::slot`]).
//!
//! Start-up, in order:
//! 1. NATS: connect, create/update the stream.
//! 2. Postgres: the publication (created from `postgres.tables` if asked) and
//!    its tables; a table that cannot be replicated (no replica identity) is
//!    reported once by name and left out, the others go on.
//! 3. The slot ([`crate::slot`] decides) and the generation: a new slot
//!    exports a snapshot, every table is snapshotted in the generation of the
//!    slot's consistent point, then streaming starts from that point. An existing slot resumes from its confirmed LSN;
//!    each table's chain resumes after its last package in the stream.
//! 4. A start at least `catchup_min_lag_bytes` behind reads the backlog
//!    through SQL first ([`crate::backlog`]).
//! 5. Streaming until shutdown; transient failures (connection loss, NATS
//!    outage) restart from step 1 with capped exponential backoff
//!    ([`sluice_broker::supervise`], decided by [`crate::recovery`]), which
//!    re-reads from the confirmed LSN: nothing acknowledged is lost, nothing
//!    re-sent is duplicated (ARCHITECTURE.md invariants 1 and 2).

use std::collections::HashSet;
use std::time::Duration;

use async_nats::jetstream;
use metrics::counter;
use sluice_broker::TableName;
use sluice_broker::config::Config;
use sluice_broker::supervise::{self, Next, Restart};
use sluice_broker::table::quote_ident;
use sluice_broker::telemetry::{self, Readiness};
use sluice_broker::topology;
use tokio_util::sync::CancellationToken;

use crate::backlog::Backlog;
use crate::catalog::{self, TypeCatalog};
pub use crate::error::RunError;
use crate::metrics as m;
use crate::packager::{Limits, Packager, Resume, last_package};
use crate::pg::{self, PgError, PgSettings};
use crate::publish::{heartbeat_outgoing, heartbeat_package};
use crate::recovery::{Recovery, recovery};
use crate::replication::{Lsn, ReplicationClient};
use crate::slot::{self, SlotError, Start};
use crate::snapshot;
use crate::stream::{self, Source};

/// The async runtime's worker threads for `replicator.worker_threads`:
/// `None` leaves the choice to tokio (`TOKIO_WORKER_THREADS`, which
/// `tokio_env` says is set, or one per CPU). `0` means chosen by the CPUs
/// the process may use (`cpus`, from `available_parallelism`, which counts
/// a cgroup's CPU quota): one thread on two or fewer, where the replicator
/// shares them with Postgres and NATS and a second thread only adds
/// cross-thread wake-ups (on the 2-core test machine the replicator's CPU
/// per row fell 10-18 % in a 5M-row snapshot, whose time stayed the same or
/// fell, and 7 % at 150,000 changes/s); one per CPU above that.
pub fn runtime_threads(configured: usize, cpus: Option<usize>, tokio_env: bool) -> Option<usize> {
    match configured {
        0 if tokio_env => None,
        0 => match cpus {
            Some(cpus) if cpus <= 2 => Some(1),
            _ => None,
        },
        n => Some(n),
    }
}

/// Runs until SIGINT/SIGTERM or a definite error.
pub async fn run(config: Config) -> Result<(), RunError> {
    let (shutdown, signals) = telemetry::shutdown_on_signals();
    let handle = telemetry::install_metrics(&config.source)?;
    let readiness = Readiness::default();
    let listen = config.replicator.metrics_listen;
    let server = telemetry::serve_metrics(listen, handle, readiness.clone(), shutdown.clone())
        .await
        .map_err(|source| RunError::Metrics { listen, source })?;
    tracing::info!(
        %listen,
        worker_threads = tokio::runtime::Handle::current().metrics().num_workers(),
        "metrics endpoint listening"
    );
    m::counters_at_zero();
    if config.replicator.streaming {
        // Found now rather than in the middle of the first large transaction.
        let dir = stream::spill_dir(&config);
        if let Err(source) = tempfile::tempfile_in(&dir) {
            shutdown.cancel();
            let _ = server.await;
            return Err(RunError::SpillDir { dir, source });
        }
    }
    let result = supervise(&config, &shutdown, &readiness).await;
    shutdown.cancel();
    let _ = server.await;
    let _ = signals.await;
    result
}

/// Delays between attempts of [`run_once`]: 250 ms, doubled after each
/// further failure up to 30 s, back to 250 ms after a run of 60 s.
pub const RESTART: Restart = Restart {
    first_delay: Duration::from_millis(250),
    max_delay: Duration::from_secs(30),
    reset_after: Duration::from_secs(60),
};

/// Restarts [`run_once`] with capped exponential backoff ([`RESTART`]) when
/// the failure's [`Recovery`] is [`Recovery::Retry`]; any other recovery
/// returns the error (at this level there is no single table to fail or
/// resync: the tables' own recoveries happen inside `run_once`). Shutdown
/// during the wait ends with `Ok(())`.
pub async fn supervise(
    config: &Config,
    shutdown: &CancellationToken,
    readiness: &Readiness,
) -> Result<(), RunError> {
    supervise::supervise(
        shutdown,
        RESTART,
        || run_once(config, shutdown, readiness),
        |error, delay| restart_or_stop(error, delay, readiness),
    )
    .await
}

/// The supervise loop's decision for a failed run: retry (not ready
/// meanwhile, counted by reason, logged) or stop.
fn restart_or_stop(error: &RunError, delay: Duration, readiness: &Readiness) -> Next {
    if recovery(error) != Recovery::Retry {
        return Next::Stop;
    }
    readiness.set(false);
    counter!(m::RECONNECTS, "reason" => reconnect_reason(error)).increment(1);
    if matches!(error, RunError::Slot(SlotError::Busy { .. })) {
        tracing::info!(error = %error, "standby: another replicator holds the slot; retrying");
    } else {
        tracing::warn!(error = %sluice_broker::error_chain(error), retry_in = ?delay, "transient failure; restarting from the confirmed LSN");
    }
    Next::Retry
}

/// The `reason` label of `sluice_replicator_reconnects_total` for a retried
/// failure: one of [`m::RECONNECT_REASONS`].
fn reconnect_reason(error: &RunError) -> &'static str {
    match error {
        RunError::Slot(SlotError::Busy { .. }) => "slot_busy",
        RunError::Publish(_) | RunError::NatsConnect(_) | RunError::Topology(_) => "nats",
        _ => "postgres",
    }
}

async fn run_once(
    config: &Config,
    shutdown: &CancellationToken,
    readiness: &Readiness,
) -> Result<(), RunError> {
    let settings = PgSettings::from_config(&config.postgres)?;
    let nats = sluice_broker::connect::connect(&config.nats, "sluice-replicator").await?;
    let js = jetstream::new(nats.clone());
    let stream_handle = topology::ensure_stream(&js, config).await?;

    let sql = settings.connect("catalog queries").await?;
    let slot = &config.postgres.slot;
    // One replicator of the slot past this point (the other waits as a
    // standby): two started together used to both find the slot free and
    // drop or create it under each other. The lock lives as long as `sql`,
    // which `stream::run` keeps for the whole run.
    if let Some(pid) = pg::try_lock_slot(&sql.client, slot).await? {
        return Err(SlotError::Busy {
            slot: slot.clone(),
            pid,
        }
        .into());
    }
    ensure_publication(&sql.client, config).await?;
    let mut types = TypeCatalog::new();
    let (tables, unreplicable) =
        replicable_tables(&sql.client, &config.postgres.publication, &mut types).await?;
    // The column lists, row filters and partitions a later change is
    // compared with, read before any snapshot starts: a change after this
    // point is noticed.
    let shape = catalog::PublicationShape::read(&sql.client, &config.postgres.publication).await?;

    let mut repl_config = settings.config.clone();
    sluice_postgres::add_options(&mut repl_config, pg::OUTPUT_STYLES);
    let state = pg::slot_state(&sql.client, slot).await?;
    slot::check_usable(slot, state.as_ref())?;
    if state.is_none()
        && let Some(database) = pg::slot_elsewhere(&sql.client, slot).await?
    {
        return Err(SlotError::OtherDatabase {
            slot: slot.clone(),
            database,
        }
        .into());
    }
    let last_heartbeat =
        last_package(&stream_handle, &topology::heartbeat_subject(&config.source)).await?;
    let snapshot_record = last_package(
        &stream_handle,
        &topology::snapshot_progress_subject(&config.source),
    )
    .await?
    .and_then(|package| package.snapshot_progress);
    let mut continue_snapshot = false;
    let (state, reason) = match slot::decide(
        state.as_ref(),
        last_heartbeat.is_some(),
        snapshot_record.as_ref().map(|record| record.generation),
    ) {
        Start::Resume => (state, "initial"),
        Start::ContinueSnapshot => {
            continue_snapshot = true;
            (state, "initial")
        }
        Start::Create => (None, "initial"),
        Start::Recreate(lost) => {
            // Recovery::ResyncTable for every table: a new slot, whose
            // snapshot starts every chain again.
            lost.log(slot);
            if lost.must_drop() {
                slot::drop_slot(&repl_config, &settings, slot).await?;
            }
            (None, "slot_lost")
        }
    };

    let limits = Limits {
        max_rows: config.replicator.package_max_rows,
        max_bytes: config.replicator.package_max_bytes,
    };
    let new_packager = |config: &Config, slot: &str, generation: u64, limits: Limits| {
        Packager::new(&config.source, slot, generation, limits).with_encoding(
            config.replicator.compression.encoding(),
            config.replicator.snapshot_compression.encoding(),
        )
    };
    let mut publisher = crate::publish::Publisher::new(js.clone(), config.replicator.max_in_flight);

    let mut not_in_stream = Vec::new();
    let mut changed_while_stopped = Vec::new();
    let mut unfinished_resyncs = Vec::new();
    let (client, packager, start) = match state {
        Some(existing) if continue_snapshot => {
            let generation = existing.confirmed_flush.0;
            let record = snapshot_record.unwrap_or_default();
            let mut packager = new_packager(config, slot, generation, limits);
            let mut starts = Vec::new();
            let mut done = 0;
            for table in &tables {
                let now = shape.fingerprint(table);
                packager.set_publication(table, now.clone());
                let subject = topology::table_subject(&config.source, &table.schema, &table.name);
                let last = last_package(&stream_handle, &subject).await?;
                let resume = last
                    .as_ref()
                    .and_then(Resume::from_package)
                    .filter(|resume| resume.generation == generation);
                let start = match resume {
                    // Begun by the earlier run: its chain goes on.
                    Some(resume) => {
                        packager.resume(table.clone(), resume);
                        let then = last.and_then(|package| package.relation);
                        let changed = publication_changed(then.as_ref(), &now);
                        if resume.kind == sluice_proto::v1::Kind::ResyncEnd {
                            // Ended; a publication changed since is the
                            // streaming loop's to follow, as after any start.
                            done += 1;
                            if let Some(then) = changed {
                                changed_while_stopped.push(table.clone());
                                packager.set_publication(table, then);
                            }
                            continue;
                        }
                        if changed.is_some() {
                            // Its column list or row filter changed: the
                            // rows read so far follow the old one.
                            tracing::warn!(table = %table, "publication of the table changed since its snapshot began: its snapshot starts over");
                            snapshot::TableStart::Fresh
                        } else {
                            snapshot::TableStart::Continue(
                                snapshot::recorded(&record, table).cloned(),
                                then,
                            )
                        }
                    }
                    None => snapshot::TableStart::Fresh,
                };
                starts.push((table.clone(), start));
            }
            tracing::info!(slot = %slot, consistent_point = %existing.confirmed_flush, tables_done = done, tables_left = starts.len(), "continuing the initial snapshot an earlier run began");
            // The slot's exported snapshot died with that run: a temporary
            // slot exports a new one, and the stream from the slot's
            // consistent point brings every change in between.
            let mut temporary =
                ReplicationClient::connect_with_tls(&repl_config, &settings.tls).await?;
            let created = temporary
                .create_logical_slot(&crate::slot::temporary_slot_name(slot, "_continue"), true)
                .await?;
            let initial = snapshot::Initial {
                snapshot_name: &created.snapshot_name,
                consistent_point: created.consistent_point,
                generation,
                tables: starts,
                reason,
            };
            let at = existing.confirmed_flush;
            let outcome = snapshot_and_mark(
                config,
                &settings,
                initial,
                at,
                &mut packager,
                &mut publisher,
                shutdown,
            )
            .await;
            // Closing the connection drops the temporary slot.
            let _ = temporary.close().await;
            outcome?;
            (None, packager, existing.confirmed_flush)
        }
        Some(existing) => {
            let generation = last_heartbeat
                .as_ref()
                .and_then(|hb| hb.position)
                .map_or(existing.confirmed_flush.0, |p| p.generation);
            let mut packager = new_packager(config, slot, generation, limits);
            packager.set_fresh_generation(pg::current_wal_lsn(&sql.client).await?.0);
            let mut records = resync_records(&stream_handle, &config.source).await?;
            for table in &tables {
                let subject = topology::table_subject(&config.source, &table.schema, &table.name);
                let now = shape.fingerprint(table);
                match last_package(&stream_handle, &subject).await? {
                    Some(package) => {
                        let resume = Resume::from_package(&package);
                        if let Some(resume) = resume {
                            packager.resume(table.clone(), resume);
                        }
                        if let Some(then) = publication_changed(package.relation.as_ref(), &now) {
                            changed_while_stopped.push(table.clone());
                            packager.set_publication(table, then);
                            continue;
                        }
                        // A resync of the table's chain, begun and not
                        // ended: it goes on.
                        if let (Some(resume), Some(record)) = (resume, records.remove(table))
                            && record.generation == resume.generation
                            && resume.kind != sluice_proto::v1::Kind::ResyncEnd
                        {
                            unfinished_resyncs.push(stream::UnfinishedResync {
                                table: table.clone(),
                                record,
                                relation: package.relation,
                            });
                        }
                    }
                    // Never published (every snapshot leaves its markers in the
                    // stream): added to the publication while stopped, or its
                    // packages aged out of the stream. Load it (again).
                    None => not_in_stream.push(table.clone()),
                }
                packager.set_publication(table, now);
            }
            tracing::info!(slot = %slot, confirmed_flush = %existing.confirmed_flush, generation, "resuming from the slot");
            (None, packager, existing.confirmed_flush)
        }
        None => {
            let mut client =
                ReplicationClient::connect_with_tls(&repl_config, &settings.tls).await?;
            let created = client.create_logical_slot(slot, false).await?;
            let generation = created.consistent_point.0;
            tracing::info!(slot = %slot, consistent_point = %created.consistent_point, generation, "created slot; snapshotting published tables");
            let mut packager = new_packager(config, slot, generation, limits);
            for table in &tables {
                packager.set_publication(table, shape.fingerprint(table));
            }
            let initial = snapshot::Initial {
                snapshot_name: &created.snapshot_name,
                consistent_point: created.consistent_point,
                generation,
                tables: tables
                    .iter()
                    .map(|table| (table.clone(), snapshot::TableStart::Fresh))
                    .collect(),
                reason,
            };
            let at = created.consistent_point;
            snapshot_and_mark(
                config,
                &settings,
                initial,
                at,
                &mut packager,
                &mut publisher,
                shutdown,
            )
            .await?;
            (Some(client), packager, created.consistent_point)
        }
    };
    if shutdown.is_cancelled() {
        return Ok(());
    }

    let publication = crate::replication::publication_names([config.postgres.publication.as_str()]);
    let behind = pg::current_wal_lsn(&sql.client)
        .await?
        .0
        .saturating_sub(start.0);
    let catchup = config.replicator.catchup_min_lag_bytes;
    let mut client = client;
    let backlog = if catchup > 0 && behind >= catchup {
        if let Some(client) = client.take() {
            let _ = client.close().await;
        }
        tracing::info!(slot = %slot, start = %start, behind_bytes = behind, "far behind: reading the backlog through SQL, then streaming");
        match Backlog::connect(
            &settings,
            slot,
            &publication,
            config.replicator.catchup_chunk_changes,
            start,
        )
        .await
        {
            Ok(backlog) => Some(backlog),
            // E.g. no free replication slot for the temporary copy
            // (`max_replication_slots`): the walsender can read it all.
            Err(error) => {
                tracing::warn!(error = %sluice_broker::error_chain(&error), "cannot read the backlog through SQL; streaming it from the walsender");
                None
            }
        }
    } else {
        None
    };
    let (source, decoder) = match backlog {
        // The backlog's SQL function sends protocol 1.
        Some(backlog) => (Source::Backlog(backlog), crate::pgoutput::Decoder::new(1)),
        None => {
            let client = match client {
                Some(client) => client,
                None => ReplicationClient::connect_with_tls(&repl_config, &settings.tls).await?,
            };
            let (replication, decoder) = stream::start_walsender(client, config, Lsn(0)).await?;
            (Source::Streaming(replication), decoder)
        }
    };
    metrics::gauge!(m::CATCHING_UP).set(if matches!(source, Source::Backlog(_)) {
        1.0
    } else {
        0.0
    });
    readiness.set(true);
    stream::run(stream::Setup {
        config,
        nats: nats.clone(),
        settings: settings.clone(),
        repl_config: repl_config.clone(),
        source,
        sql,
        types,
        published: tables.iter().cloned().collect(),
        unreplicable,
        shape,
        not_in_stream,
        changed_while_stopped,
        unfinished_resyncs,
        packager,
        publisher,
        decoder,
        start,
        shutdown: shutdown.clone(),
    })
    .await?;
    drop(nats);
    Ok(())
}

/// The last progress record of every resync that has not ended (their
/// subjects listed by the stream, then read one by one), by table.
async fn resync_records(
    stream: &jetstream::stream::Stream,
    source: &str,
) -> Result<std::collections::HashMap<TableName, sluice_proto::v1::SnapshotProgress>, RunError> {
    use futures::TryStreamExt as _;
    let listing = |source| RunError::ControlSubjects { source };
    let subjects: Vec<(String, usize)> = stream
        .info_with_subjects(topology::control_subjects(source))
        .await
        .map_err(listing)?
        .try_collect()
        .await
        .map_err(listing)?;
    let mut records = std::collections::HashMap::new();
    for (subject, _) in subjects {
        let Some(table) = topology::table_of_resync_progress_subject(source, &subject) else {
            continue;
        };
        if let Some(record) = last_package(stream, &subject)
            .await?
            .and_then(|package| package.snapshot_progress)
            .filter(|record| !record.tables.is_empty())
        {
            records.insert(table, record);
        }
    }
    Ok(records)
}

/// What the publication said of a table when its rows were last made to
/// match it (the fingerprint of its last package's relation), when that
/// differs from `now`; `None` when it is the same, or when the package was
/// written by a replicator before fingerprints (empty).
fn publication_changed(last: Option<&sluice_proto::v1::Relation>, now: &str) -> Option<String> {
    let then = last.map_or("", |relation| relation.publication.as_str());
    (!then.is_empty() && then != now).then(|| then.to_owned())
}

/// The initial snapshot (or what an earlier run left of it), then the
/// heartbeat that records its generation at the slot's consistent point
/// `at`: its presence tells a restart that the snapshot is complete. A stop
/// in the middle leaves it out, and the next start continues the snapshot.
async fn snapshot_and_mark(
    config: &Config,
    settings: &crate::pg::PgSettings,
    initial: snapshot::Initial<'_>,
    at: Lsn,
    packager: &mut Packager,
    publisher: &mut crate::publish::Publisher,
    shutdown: &CancellationToken,
) -> Result<(), RunError> {
    let generation = initial.generation;
    snapshot::initial(config, settings, initial, packager, publisher, shutdown).await?;
    if !shutdown.is_cancelled() {
        let heartbeat = heartbeat_package(&config.source, generation, at.0);
        publisher
            .publish(heartbeat_outgoing(
                &config.source,
                &config.postgres.slot,
                heartbeat,
            ))
            .await?;
        publisher.flush().await?;
    }
    Ok(())
}

/// Creates the publication from `postgres.tables` when it does not exist.
async fn ensure_publication(
    client: &tokio_postgres::Client,
    config: &Config,
) -> Result<(), RunError> {
    let publication = &config.postgres.publication;
    if config.postgres.tables.is_empty() {
        return Ok(());
    }
    let exists = client
        .query_opt(
            "SELECT 1 FROM pg_publication WHERE pubname = $1",
            &[publication],
        )
        .await
        .map_err(PgError::sql("cannot read pg_publication"))?
        .is_some();
    if exists {
        return Ok(());
    }
    let tables: Vec<String> = config
        .postgres
        .tables
        .iter()
        .map(|t| TableName::parse(t).quoted())
        .collect();
    let sql = format!(
        "CREATE PUBLICATION {} FOR TABLE {}",
        quote_ident(publication),
        tables.join(", ")
    );
    client
        .batch_execute(&sql)
        .await
        .map_err(PgError::sql(format!(
            "cannot create publication {publication} from `postgres.tables`"
        )))?;
    tracing::info!(publication = %publication, tables = %tables.join(", "), "created publication");
    Ok(())
}

/// The published tables, split into those that can be replicated and those
/// that cannot. Every published table's series start at 0
/// ([`m::table_series_at_zero`]); tables that cannot be replicated are
/// reported (one line, `sluice_replicator_table_errors` 1) and left out
/// (ARCHITECTURE.md invariant 10).
pub async fn replicable_tables(
    client: &tokio_postgres::Client,
    publication: &str,
    types: &mut TypeCatalog,
) -> Result<(Vec<TableName>, HashSet<TableName>), RunError> {
    let published = catalog::published_tables(client, publication).await?;
    let mut tables = Vec::new();
    let mut unreplicable = HashSet::new();
    for table in published {
        m::table_series_at_zero(&table);
        match catalog::replicable(client, &table, types).await? {
            Ok(()) => tables.push(table),
            Err(reason) => {
                tracing::error!(table = %table, error = %reason, "table cannot be replicated; skipped");
                metrics::gauge!(m::TABLE_ERRORS, "table" => table.to_string()).set(1.0);
                unreplicable.insert(table);
            }
        }
    }
    if tables.is_empty() {
        return Err(RunError::NothingToReplicate {
            publication: publication.to_owned(),
        });
    }
    Ok((tables, unreplicable))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::replication::ReplicationError;

    #[test]
    fn the_runtime_has_one_thread_on_two_cores_unless_told_otherwise() {
        // Chosen: one thread on one or two CPUs, tokio's choice above.
        assert_eq!(runtime_threads(0, Some(1), false), Some(1));
        assert_eq!(runtime_threads(0, Some(2), false), Some(1));
        assert_eq!(runtime_threads(0, Some(3), false), None);
        assert_eq!(runtime_threads(0, None, false), None);
        // TOKIO_WORKER_THREADS is honoured, and an explicit number wins.
        assert_eq!(runtime_threads(0, Some(2), true), None);
        assert_eq!(runtime_threads(4, Some(2), false), Some(4));
        assert_eq!(runtime_threads(2, Some(16), true), Some(2));
    }

    #[test]
    fn retried_failures_clear_readiness_and_config_errors_stop() {
        let readiness = Readiness::default();
        readiness.set(true);
        let closed = RunError::Replication(ReplicationError::Closed);
        assert_eq!(reconnect_reason(&closed), "postgres");
        assert_eq!(
            restart_or_stop(&closed, Duration::from_millis(250), &readiness),
            Next::Retry
        );
        assert!(!readiness.get());

        readiness.set(true);
        let busy = RunError::Slot(SlotError::Busy {
            slot: "s".to_owned(),
            pid: Some(1),
        });
        assert_eq!(reconnect_reason(&busy), "slot_busy");
        assert_eq!(
            restart_or_stop(&busy, RESTART.first_delay, &readiness),
            Next::Retry
        );

        readiness.set(true);
        let no_user = RunError::NatsConnect(sluice_broker::connect::ConnectError::MissingUser(
            "password",
        ));
        assert_eq!(
            restart_or_stop(&no_user, RESTART.first_delay, &readiness),
            Next::Stop
        );
        assert!(readiness.get(), "a stop leaves readiness to the caller");
        let unreachable = RunError::NatsConnect(sluice_broker::connect::ConnectError::Connect {
            url: "nats://localhost:4222".to_owned(),
            source: async_nats::ConnectError::new(async_nats::ConnectErrorKind::Io),
        });
        assert_eq!(reconnect_reason(&unreachable), "nats");
        assert_eq!(
            restart_or_stop(&unreachable, RESTART.first_delay, &readiness),
            Next::Retry
        );
    }
}
