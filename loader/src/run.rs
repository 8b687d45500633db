//! Wiring of `sluice-loader run`: the pull consumer, the batch loop, retries
//! and shutdown. What a batch does to ClickHouse lives in [`crate::apply`].
//!
//! Invariant 1 (nothing is lost): a batch is acked (one `AckAll` on its last
//! message) only after every INSERT it implies succeeded and the positions
//! were written. A failure [`Recovery::of`] calls `Retry` (ClickHouse down,
//! network) retries the same batch with capped exponential backoff and acks
//! nothing; on shutdown a batch in progress is abandoned unacked and
//! redelivered to the next run:
//! each run starts by recreating the durable consumer at the first unacked
//! message if an earlier run left some (JetStream would otherwise redeliver
//! them only after `ack_wait`, and the next `AckAll` would ack them unseen).
//!
//! One batch is fetched, decoded and encoded to RowBinary ahead
//! ([`fetch_batches`], [`crate::apply::Pending::decode`]) while the current
//! one is written, so that work overlaps ClickHouse's. A fetch bigger than
//! `loader.batch_max_decoded_bytes` once decompressed is applied in parts,
//! each decoded only once the previous part was handed over, and acked once
//! after its last part: at most two parts are decoded in memory at a time.
//! Should the
//! prefetched batch outlive `ack_wait` (a long ClickHouse outage), JetStream
//! redelivers its messages; the chain positions mark the copies as already
//! applied.
//!
//! Several loaders of a source ([`crate::share`], ARCHITECTURE.md invariant
//! 11): each run joins the source's loaders, takes its tables before the
//! first fetch and rebalances between fetches (everything handed over applied
//! and acked). Packages of tables another loader holds are neither decoded
//! nor applied, only acked. A table taken is read again from its first
//! message after the one its positions record (the consumer is recreated
//! there); on shutdown the run gives its tables up at once.

use std::time::Duration;

use async_nats::jetstream::{self, consumer::pull};
use futures::StreamExt;
use metrics::{counter, gauge};
use sluice_broker::TableName;
use sluice_broker::config::Config;
use sluice_broker::supervise::{self, Next, Restart};
use sluice_broker::telemetry::{self, Readiness};
use sluice_broker::topology;
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;

use crate::apply::{Batch, HeldTables, Loader};
pub use crate::error::RunError;
use crate::metrics as m;
use crate::recovery::Recovery;
use crate::share::{Share, ShareError};

/// Runs until SIGINT/SIGTERM or a definite error.
pub async fn run(config: Config) -> Result<(), RunError> {
    let (shutdown, signals) = telemetry::shutdown_on_signals();
    let handle = telemetry::install_metrics(&config.source)?;
    m::counters_at_zero();
    let readiness = Readiness::default();
    let listen = config.loader.metrics_listen;
    let server = telemetry::serve_metrics(listen, handle, readiness.clone(), shutdown.clone())
        .await
        .map_err(|source| RunError::Metrics { listen, source })?;
    tracing::info!(%listen, "metrics endpoint listening");
    let result = supervise(&config, &shutdown, &readiness).await;
    shutdown.cancel();
    let _ = server.await;
    let _ = signals.await;
    result
}

/// Delays between runs: 250 ms after the first failure, doubled up to 30 s;
/// a run that lasted a minute starts the delays over.
const RESTART: Restart = Restart {
    first_delay: Duration::from_millis(250),
    max_delay: Duration::from_secs(30),
    reset_after: Duration::from_secs(60),
};

/// Restarts [`run_once`] after failures [`Recovery::of`] calls `Retry`, with
/// capped backoff (`sluice_broker::supervise`); returns any other error.
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
/// meanwhile, logged) or stop.
fn restart_or_stop(error: &RunError, delay: Duration, readiness: &Readiness) -> Next {
    match Recovery::of(error) {
        Recovery::Retry => {
            readiness.set(false);
            tracing::warn!(error = %sluice_broker::error_chain(error), retry_in = ?delay, "transient failure; restarting (nothing unapplied was acked)");
            Next::Retry
        }
        Recovery::ResyncTable | Recovery::FailTable | Recovery::Stop => Next::Stop,
    }
}

async fn run_once(
    config: &Config,
    shutdown: &CancellationToken,
    readiness: &Readiness,
) -> Result<(), RunError> {
    let nats = sluice_broker::connect::connect(&config.nats, "sluice-loader").await?;
    let js = jetstream::new(nats.clone());
    let stream_name = config.stream_name();
    // The replicator creates the stream and the loaders' bucket; wait for
    // them rather than guess their settings.
    let stream = loop {
        match js.get_stream(&stream_name).await {
            Ok(stream) => break stream,
            Err(error) => {
                tracing::info!(stream = %stream_name, error = %error, "waiting for the replicator to create the stream");
                tokio::select! {
                    _ = shutdown.cancelled() => return Ok(()),
                    _ = tokio::time::sleep(Duration::from_secs(2)) => {}
                }
            }
        }
    };
    let share = loop {
        match Share::join(&js, config).await {
            Ok(share) => break share,
            Err(error @ ShareError::Bucket { .. }) => {
                tracing::info!(error = %sluice_broker::error_chain(&error), "waiting for the replicator to create the loaders' bucket");
                tokio::select! {
                    _ = shutdown.cancelled() => return Ok(()),
                    _ = tokio::time::sleep(Duration::from_secs(2)) => {}
                }
            }
            Err(error) => return Err(error.into()),
        }
    };
    let mut run = Run {
        config,
        shutdown,
        consumer_name: config.loader.consumer.clone(),
        stream_name,
        stream,
        share,
    };
    let result = run.load(nats, readiness).await;
    if shutdown.is_cancelled() {
        // Nothing is applied any more: the other loaders may take the tables now.
        run.share.leave().await;
    }
    result
}

/// One run's NATS side: the stream, the durable consumer and this loader's
/// share of the tables.
struct Run<'c> {
    config: &'c Config,
    shutdown: &'c CancellationToken,
    consumer_name: String,
    stream_name: String,
    stream: jetstream::stream::Stream,
    share: Share,
}

type PullConsumer = jetstream::consumer::Consumer<pull::Config>;

impl Run<'_> {
    fn consumer_config(&self, deliver_policy: jetstream::consumer::DeliverPolicy) -> pull::Config {
        pull::Config {
            durable_name: Some(self.consumer_name.clone()),
            filter_subject: topology::stream_subjects(&self.config.source),
            ack_policy: jetstream::consumer::AckPolicy::All,
            ack_wait: self.config.loader.ack_wait,
            deliver_policy,
            max_ack_pending: -1,
            ..Default::default()
        }
    }

    fn consumer_error(&self, source: jetstream::stream::ConsumerError) -> RunError {
        RunError::Consumer {
            stream: self.stream_name.clone(),
            consumer: self.consumer_name.clone(),
            source,
        }
    }

    /// Recreates the durable consumer so that it delivers from stream
    /// sequence `start` on.
    async fn restart_consumer_at(&self, start: u64) -> Result<PullConsumer, RunError> {
        self.stream
            .delete_consumer(&self.consumer_name)
            .await
            .map_err(|source| RunError::ConsumerReset {
                consumer: self.consumer_name.clone(),
                source: Box::new(source),
            })?;
        self.stream
            .create_consumer(self.consumer_config(
                jetstream::consumer::DeliverPolicy::ByStartSequence {
                    start_sequence: start,
                },
            ))
            .await
            .map_err(|e| self.consumer_error(e))
    }

    /// Every table the stream holds messages of.
    async fn stream_tables(&self) -> Result<Vec<TableName>, RunError> {
        use futures::TryStreamExt as _;
        let listing = |source: Box<dyn std::error::Error + Send + Sync>| RunError::StreamInfo {
            stream: self.stream_name.clone(),
            source,
        };
        let subjects: Vec<(String, usize)> = self
            .stream
            .info_with_subjects(topology::stream_subjects(&self.config.source))
            .await
            .map_err(|e| listing(Box::new(e)))?
            .try_collect()
            .await
            .map_err(|e| listing(Box::new(e)))?;
        Ok(subjects
            .iter()
            .filter_map(|(subject, _)| topology::table_of_subject(&self.config.source, subject))
            .collect())
    }

    /// Gives up and takes tables as [`Share::rebalance`] decides, and
    /// returns the earliest stream sequence to read again for the tables taken
    /// from another loader (or from nobody): the first message of each after
    /// the last one its positions say was applied.
    async fn rebalance(&mut self, loader: &mut Loader) -> Result<Rebalance, RunError> {
        let rebalanced = self.share.rebalance().await?;
        loader.give_up(&rebalanced.given_up);
        let taken = rebalanced.taken;
        let mut from: Option<u64> = None;
        // A lease this loader kept from before a restart is read again from
        // its table's positions too: the restart may have come between
        // taking it and reading the stream again.
        for (table, applied) in loader.take(&taken).await? {
            // No stream sequence recorded: the position was written by a
            // loader that did not share its tables, whose consumer this is.
            let Some(applied) = applied else {
                tracing::info!(table = %table, "a table taken has a position without a stream sequence: read from the consumer's position");
                continue;
            };
            let subject = topology::table_subject(&self.config.source, &table.schema, &table.name);
            match self
                .stream
                .get_first_raw_message_by_subject(&subject, applied + 1)
                .await
            {
                Ok(message) => {
                    tracing::info!(table = %table, applied_sequence = applied, next_sequence = message.sequence, "a table taken is read from its first message after its position");
                    from = Some(from.map_or(message.sequence, |f| f.min(message.sequence)));
                }
                Err(error)
                    if error.kind() == jetstream::stream::RawMessageErrorKind::NoMessageFound =>
                {
                    tracing::info!(table = %table, applied_sequence = applied, "a table taken has no message after its position in the stream");
                }
                Err(error) => {
                    return Err(RunError::CatchUp {
                        stream: self.stream_name.clone(),
                        table,
                        source: Box::new(error),
                    });
                }
            }
        }
        Ok(Rebalance {
            took: !taken.is_empty(),
            from,
        })
    }

    /// Starts a fetcher; it passes over the packages of the tables the
    /// loader does not hold (`held`, the loader's own set). One started
    /// before a table was taken is replaced (`Run::load`), so no package of a
    /// table the loader applies is ever passed over.
    fn spawn_fetcher(
        &self,
        consumer: &PullConsumer,
        held: HeldTables,
        pull_max_bytes: usize,
    ) -> (
        tokio::sync::mpsc::Receiver<Result<Batch, RunError>>,
        tokio_util::sync::DropGuard,
    ) {
        let (batches_tx, batches) = tokio::sync::mpsc::channel(1);
        let stop_fetching = self.shutdown.child_token();
        tokio::spawn(fetch_batches(
            consumer.clone(),
            self.config.clone(),
            self.stream_name.clone(),
            pull_max_bytes,
            batches_tx,
            held,
            stop_fetching.clone(),
        ));
        (batches, stop_fetching.drop_guard())
    }

    async fn load(
        &mut self,
        nats: async_nats::Client,
        readiness: &Readiness,
    ) -> Result<(), RunError> {
        let config = self.config;
        let shutdown = self.shutdown;
        // A loader's first consumer starts at the stream's end: what it must
        // read is found table by table as it takes them (`rebalance`).
        let (mut consumer, mut next, unacked) = match self
            .stream
            .get_consumer::<pull::Config>(&self.consumer_name)
            .await
        {
            Ok(consumer) => {
                let info = consumer.cached_info();
                // The first message not acked yet.
                let next = info.ack_floor.stream_sequence + 1;
                let unacked = info.num_ack_pending;
                (consumer, next, unacked)
            }
            Err(_) => {
                let end = self
                    .stream
                    .get_info()
                    .await
                    .map_err(|e| RunError::StreamInfo {
                        stream: self.stream_name.clone(),
                        source: Box::new(e),
                    })?
                    .state
                    .last_sequence
                    + 1;
                let consumer = self
                    .stream
                    .create_consumer(self.consumer_config(
                        jetstream::consumer::DeliverPolicy::ByStartSequence {
                            start_sequence: end,
                        },
                    ))
                    .await
                    .map_err(|e| self.consumer_error(e))?;
                (consumer, end, 0)
            }
        };
        let mut loader = loop {
            let error = match Loader::connect(config, nats.clone()).await {
                Ok(loader) => break loader,
                Err(error) => RunError::from(error),
            };
            if Recovery::of(&error) != Recovery::Retry {
                return Err(error);
            }
            tracing::warn!(error = %sluice_broker::error_chain(&error), "clickhouse not reachable; retrying");
            tokio::select! {
                _ = shutdown.cancelled() => return Ok(()),
                _ = tokio::time::sleep(Duration::from_secs(2)) => {}
            }
        };
        self.share.hear_of(loader.stored_tables().await?);
        self.share.hear_of(self.stream_tables().await?);
        // The fetcher starts only after this first rebalance: the tables
        // taken need reading again, not a new fetcher. Messages delivered to
        // an earlier run (killed, or restarted after a transient error) and
        // never acked are redelivered only after `ack_wait`, and acking
        // anything after them (AckAll) would ack them unseen: the table's
        // chain would show a gap and be resynced. Start over from the first
        // unacked message instead (or earlier, for a table taken).
        let from = self
            .rebalance(&mut loader)
            .await?
            .from
            .filter(|&from| from < next);
        if unacked > 0 || from.is_some() {
            let start = from.unwrap_or(next).min(next);
            tracing::info!(consumer = %self.consumer_name, unacked, start_sequence = start, "reading the stream again from the first message not applied yet (unacked messages of an earlier run, or tables taken over)");
            consumer = self.restart_consumer_at(start).await?;
            next = start;
        }
        readiness.set(true);
        tracing::info!(stream = %self.stream_name, consumer = %self.consumer_name, database = %loader.database(), tables = self.share.tables_held(), "loading");
        loader.resume_interrupted().await;
        // The next batch is fetched and decoded while this one's INSERTs run; it
        // is still acked only after it was applied, so nothing changes for
        // invariant 1 (an unacked prefetched batch is redelivered like any other).
        let max_payload = nats.server_info().max_payload;
        let pull_max_bytes = pull_max_bytes(config.loader.batch_max_bytes, max_payload);
        if pull_max_bytes > config.loader.batch_max_bytes {
            tracing::info!(
                batch_max_bytes = config.loader.batch_max_bytes,
                max_payload,
                pull_max_bytes,
                "loader.batch_max_bytes is below the NATS server's max_payload: each pull asks for up to a whole message of that size"
            );
        }
        let (mut batches, mut fetcher) =
            self.spawn_fetcher(&consumer, loader.held_tables(), pull_max_bytes);
        loop {
            let batch: Batch = tokio::select! {
                _ = shutdown.cancelled() => return Ok(()),
                batch = batches.recv() => match batch {
                    Some(batch) => batch?,
                    None => return Ok(()),
                },
            };
            self.share.check()?;
            if batch.is_idle() {
                loader.update_lag();
                loader.check_stalled_resyncs().await;
            } else {
                self.share.hear_of(batch.messages.iter().filter_map(|m| {
                    topology::table_of_subject(&config.source, m.subject.as_str())
                }));
                let mut delay = Duration::from_millis(200);
                loop {
                    let error = match loader.apply(&batch).await {
                        Ok(()) => break,
                        Err(error) => RunError::from(error),
                    };
                    match Recovery::of(&error) {
                        Recovery::Retry => {
                            counter!(m::BATCH_RETRIES).increment(1);
                            tracing::warn!(error = %sluice_broker::error_chain(&error), retry_in = ?delay, "batch failed; retrying (not acked)");
                            // The lag and backlog keep growing while ClickHouse is
                            // away: that is when operators look at them.
                            loader.update_lag();
                            refresh_pending(&consumer).await;
                            tokio::select! {
                                _ = shutdown.cancelled() => return Ok(()),
                                _ = tokio::time::sleep(delay) => {}
                            }
                            delay = (delay * 2).min(Duration::from_secs(10));
                            self.share.check()?;
                            if let Some(last) = batch.messages.last() {
                                // Keep the batch ours while we retry.
                                let _ = last.ack_with(jetstream::AckKind::Progress).await;
                            }
                        }
                        Recovery::ResyncTable | Recovery::FailTable | Recovery::Stop => {
                            return Err(error);
                        }
                    }
                }
                if !batch.last_part {
                    continue;
                }
                if let Some(last) = batch.messages.last() {
                    last.double_ack().await.map_err(RunError::Ack)?;
                    fail::fail_point!("loader::ack::after", |_| crate::crash_here());
                    if let Ok(info) = last.info() {
                        next = info.stream_sequence + 1;
                    }
                }
                loader.update_lag();
            }
            // Between two fetches, everything handed over applied and acked:
            // tables may change hands here.
            if self.share.rebalance_due()
                && let Some(from) = self.rebalance(&mut loader).await?.restart_at(next)
            {
                tracing::info!(consumer = %self.consumer_name, start_sequence = from, "tables taken: reading the stream again from the first message of theirs not applied yet");
                drop(batches);
                drop(fetcher);
                consumer = self.restart_consumer_at(from).await?;
                next = from;
                (batches, fetcher) =
                    self.spawn_fetcher(&consumer, loader.held_tables(), pull_max_bytes);
            }
        }
    }
}

/// What a rebalance means for the consumer.
struct Rebalance {
    /// Tables were taken: batches fetched before passed their packages over.
    took: bool,
    /// The earliest stream sequence of a taken table not applied yet.
    from: Option<u64>,
}

impl Rebalance {
    /// Where the consumer must start again, given the first message not
    /// acked yet (`next`): `None` when it may go on.
    fn restart_at(&self, next: u64) -> Option<u64> {
        match self.from {
            Some(from) if from < next => Some(from),
            _ if self.took => Some(next),
            _ => None,
        }
    }
}

/// Room in a pull for a message's subject and headers beside its payload.
const PULL_MESSAGE_ROOM: usize = 64 * 1024;

/// The most one pull asks JetStream for: `batch_max_bytes`, but never less
/// than the largest message the server takes (`max_payload`, the size of the
/// chunks of a package too big for one message) with its subject and
/// headers. JetStream delivers no message bigger than a pull's `max_bytes`:
/// a smaller pull would wait in front of it forever. A batch is still cut
/// once it holds `batch_max_bytes`.
fn pull_max_bytes(batch_max_bytes: usize, max_payload: usize) -> usize {
    batch_max_bytes.max(max_payload.saturating_add(PULL_MESSAGE_ROOM))
}

/// Pulls batches, holds back incomplete chunk sets, decodes each batch on a
/// blocking thread and hands it over (an empty batch when the wait expired
/// with nothing new). Ends when `stop` is cancelled, the receiver is gone,
/// or after sending a pull error.
async fn fetch_batches(
    consumer: jetstream::consumer::Consumer<pull::Config>,
    config: Config,
    stream_name: String,
    pull_max_bytes: usize,
    batches: tokio::sync::mpsc::Sender<Result<Batch, RunError>>,
    tables_held: HeldTables,
    stop: CancellationToken,
) {
    let (settings, source) = (&config.loader, &config.source);
    let compression = crate::clickhouse::compression(&config.clickhouse);
    let fail = |source: Box<dyn std::error::Error + Send + Sync>| RunError::Fetch {
        stream: stream_name.clone(),
        source,
    };
    // One continuous pull (the client keeps a request outstanding, with idle
    // heartbeats) rather than a request per batch: a per-batch request whose
    // expiry status the server never sends stalls for expires + 5 s.
    let mut pulled = match consumer
        .stream()
        .max_messages_per_batch(settings.batch_max_messages)
        .max_bytes_per_batch(pull_max_bytes)
        .messages()
        .await
    {
        Ok(pulled) => pulled,
        Err(error) => {
            let _ = batches.send(Err(fail(Box::new(error)))).await;
            return;
        }
    };
    let mut last_pending_check = Instant::now() - Duration::from_secs(60);
    // When the last batch with news went to the applier (as if one had gone
    // `batch_min_interval` ago: a fetcher's first batch does not wait for
    // it; no batch of this fetcher went before).
    let mut last_handover = Instant::now()
        .checked_sub(settings.batch_min_interval)
        .unwrap_or_else(Instant::now);
    // Chunks of a package whose last chunk has not been fetched yet, and
    // everything fetched after them.
    let mut held: Vec<jetstream::Message> = Vec::new();
    // Since when messages newer than such a package wait behind it.
    let mut overtaken_since: Option<Instant> = None;
    loop {
        if last_pending_check.elapsed() > Duration::from_secs(2) {
            refresh_pending(&consumer).await;
            last_pending_check = Instant::now();
        }
        // A batch: what was held back and what arrives until the batch is
        // full, or until it has news and may go (`batch_min_interval` after
        // the previous hand-over, and the applier took the previous batch),
        // or until `batch_max_wait` passed without news (an idle batch).
        let mut messages = std::mem::take(&mut held);
        let mut bytes = 0;
        let mut fetched = 0;
        let idle_until = Instant::now() + settings.batch_max_wait;
        let may_go_at = last_handover + settings.batch_min_interval;
        let mut permit = None;
        while fetched < settings.batch_max_messages && bytes < settings.batch_max_bytes {
            let may_go = fetched > 0 && Instant::now() >= may_go_at;
            // Biased: messages already here join the batch before it goes.
            let next = tokio::select! {
                biased;
                _ = stop.cancelled() => return,
                next = pulled.next() => next,
                _ = tokio::time::sleep_until(may_go_at), if fetched > 0 && !may_go => continue,
                taken = batches.reserve(), if may_go => match taken {
                    Ok(taken) => {
                        permit = Some(taken);
                        break;
                    }
                    Err(_) => return,
                },
                _ = tokio::time::sleep_until(idle_until), if fetched == 0 => break,
            };
            match next {
                Some(Ok(message)) => {
                    bytes += message.payload.len();
                    fetched += 1;
                    messages.push(message);
                }
                Some(Err(error)) => match error.kind() {
                    // Passing trouble (NATS restarting, heartbeats missed):
                    // the client pulls again by itself.
                    pull::MessagesErrorKind::MissingHeartbeat
                    | pull::MessagesErrorKind::Pull
                    | pull::MessagesErrorKind::NoResponders
                    | pull::MessagesErrorKind::Other => {
                        tracing::debug!(error = %error, "pull interrupted");
                        break;
                    }
                    _ => {
                        let _ = batches.send(Err(fail(Box::new(error)))).await;
                        return;
                    }
                },
                None => {
                    let _ = batches.send(Err(fail("the pull ended".into()))).await;
                    return;
                }
            }
        }
        if fetched > 0 {
            last_handover = Instant::now();
        }
        let hold = hold_incomplete_chunks(&mut messages, source);
        overtaken_since = match (hold.overtaken, overtaken_since) {
            (false, _) => None,
            (true, since) => Some(since.unwrap_or_else(Instant::now)),
        };
        let held_bytes: usize = hold.messages.iter().map(|m| m.payload.len()).sum();
        let waited = overtaken_since.map(|since| since.elapsed());
        if held_bytes > settings.batch_max_decoded_bytes
            || waited.is_some_and(|w| w >= settings.incomplete_package_wait)
        {
            // Nothing else can finish it: apply what is here. The package
            // is missing from its table's chain, which the loader reports
            // as a gap.
            tracing::warn!(
                held_bytes,
                waited = ?waited,
                "applying without an incomplete chunked package: newer messages waited behind it too long, or it outgrew loader.batch_max_decoded_bytes"
            );
            messages.extend(hold.messages);
            overtaken_since = None;
        } else {
            held = hold.messages;
            // Keep them ours (no redelivery) until their set is complete.
            for message in &held {
                let _ = message.ack_with(jetstream::AckKind::Progress).await;
            }
        }
        let budget = settings.batch_max_decoded_bytes;
        let passed_over = {
            let tables_held = tables_held.clone();
            let source = source.clone();
            move |subject: &str| tables_held.passes_over(&source, subject)
        };
        let parts = match tokio::task::spawn_blocking(move || {
            crate::apply::split(messages, budget, passed_over)
        })
        .await
        {
            Ok(parts) => parts,
            Err(error) if error.is_panic() => std::panic::resume_unwind(error.into_panic()),
            Err(_) => return,
        };
        for part in parts {
            // Decode a part only once the previous one was taken: at most
            // the part being applied and this one are decoded in memory.
            let permit = match permit.take() {
                Some(permit) => permit,
                None => tokio::select! {
                    _ = stop.cancelled() => return,
                    permit = batches.reserve() => match permit {
                        Ok(permit) => permit,
                        Err(_) => return,
                    },
                },
            };
            let held = tables_held.clone();
            let batch =
                match tokio::task::spawn_blocking(move || part.decode(compression, &held)).await {
                    Ok(batch) => batch,
                    Err(error) if error.is_panic() => std::panic::resume_unwind(error.into_panic()),
                    // The runtime is shutting down.
                    Err(_) => return,
                };
            permit.send(Ok(batch));
        }
    }
}

/// Sets `sluice_loader_pending_messages` from the consumer's info (left as it
/// was when NATS does not answer within a second).
async fn refresh_pending(consumer: &jetstream::consumer::Consumer<pull::Config>) {
    let mut consumer = consumer.clone();
    if let Ok(Ok(info)) = tokio::time::timeout(Duration::from_secs(1), consumer.info()).await {
        gauge!(m::PENDING_MESSAGES).set(info.num_pending as f64);
    }
}

/// Messages held back behind incomplete chunked packages.
struct Held {
    messages: Vec<jetstream::Message>,
    /// Among them are table messages that belong to none of the open
    /// packages: the stream went on without them. (Heartbeats and other
    /// control messages do not count: a restarted replicator sends a
    /// heartbeat before it reaches the package again.)
    overtaken: bool,
}

/// Splits off the messages from the first chunk of a package whose last
/// chunk is not in `messages` yet: they cannot be acknowledged (acks are
/// cumulative) until the package is complete. Returns them, in order.
fn hold_incomplete_chunks(messages: &mut Vec<jetstream::Message>, source: &str) -> Held {
    let mut reassembler = sluice_broker::chunk::Reassembler::default();
    for message in messages.iter() {
        // Malformed chunk headers are the apply step's to report.
        let _ = reassembler.push(
            message.subject.as_str(),
            message.headers.as_ref(),
            &message.payload,
        );
    }
    let messages = match reassembler.oldest_open() {
        Some(first) => messages.split_off(first),
        None => Vec::new(),
    };
    let overtaken = messages.iter().any(|m| {
        !reassembler.is_open(m.subject.as_str())
            && topology::table_of_subject(source, m.subject.as_str()).is_some()
    });
    Held {
        messages,
        overtaken,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_pull_fits_the_largest_message_the_server_takes() {
        // The default batch (4 MiB) on a server taking 8 MiB messages: a
        // chunk of 8 MiB must still come.
        assert_eq!(
            pull_max_bytes(4 << 20, 8 << 20),
            (8 << 20) + PULL_MESSAGE_ROOM
        );
        // NATS' default max_payload (1 MiB): the batch size stands.
        assert_eq!(pull_max_bytes(4 << 20, 1 << 20), 4 << 20);
    }

    #[test]
    fn a_retryable_failure_restarts_not_ready_and_anything_else_stops() {
        let readiness = Readiness::default();
        readiness.set(true);
        let unreachable = RunError::Fetch {
            stream: "SLUICE_APP".into(),
            source: "the pull ended".into(),
        };
        assert_eq!(
            restart_or_stop(&unreachable, RESTART.first_delay, &readiness),
            Next::Retry
        );
        assert!(!readiness.get(), "not ready while restarting");
        let config = RunError::NatsConnect(sluice_broker::connect::ConnectError::MissingUser(
            "password",
        ));
        assert_eq!(
            restart_or_stop(&config, RESTART.first_delay, &readiness),
            Next::Stop
        );
    }
}
