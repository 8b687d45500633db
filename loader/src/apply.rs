//! What one fetched batch does to ClickHouse.
//!
//! Per table, in stream order: packages are classified by the chain tracker
//! ([`crate::chain`]); runs of consecutive row packages become ONE INSERT per
//! table (per target) per batch; TRUNCATE, RESYNC_BEGIN and RESYNC_END split
//! runs and take effect in order. Then the positions are written. The caller
//! acks the batch only when this returns `Ok`.
//!
//! Resync (invariant 4): RESYNC_BEGIN creates an empty shadow table; snapshot
//! rows go only to the shadow, live changes to both the live table and the
//! shadow, so readers of the live table stay fresh; RESYNC_END swaps them with
//! `EXCHANGE TABLES` (atomic) and drops the old table. Changes committed
//! after the snapshot's consistent point that reached the live table before
//! RESYNC_BEGIN (the replicator's stream may be ahead of the resync's slot)
//! are copied into the new shadow, selected by their `_sluice_version`. A
//! half-filled shadow is never swapped in: a crash mid-resync leaves the
//! shadow recorded in the positions table, and the replayed packages
//! continue filling it.
//!
//! Poison messages (undecodable) are copied to the dead-letter subject with
//! the reason, terminated, and counted; other tables go on.

use std::collections::HashMap;
use std::time::Instant;

use async_nats::HeaderMap;
use async_nats::jetstream::{self, AckKind};
use metrics::{counter, gauge, histogram};
use sluice_broker::config::Config;
use sluice_broker::topology;
use sluice_proto::{Message as _, v1};

use crate::chain::{Chains, TableName, Verdict};
use crate::clickhouse::schema::{TargetTable, VERSION_COLUMN, ensure_table, quote_ident};
use crate::clickhouse::{
    CurrentRows, EncodedRows, Error as ChError, InsertBuilder, OpCounts, ToastRequest,
    fetch_current,
};
use crate::metrics as m;
use crate::positions::{self, Stored};

/// A batch could not be applied.
#[derive(Debug, thiserror::Error)]
pub enum ApplyError {
    #[error("clickhouse: {0}")]
    ClickHouse(#[from] ChError),
    #[error("cannot read `clickhouse.password_file`")]
    PasswordFile(#[source] std::io::Error),
    #[error("cannot publish a dead letter")]
    DeadLetter(#[source] Box<dyn std::error::Error + Send + Sync>),
}

impl ApplyError {
    pub fn is_transient(&self) -> bool {
        match self {
            ApplyError::ClickHouse(e) => e.is_transient(),
            ApplyError::PasswordFile(_) => false,
            ApplyError::DeadLetter(_) => true,
        }
    }
}

/// Suffix of a resync's shadow table.
pub const SHADOW_SUFFIX: &str = "__sluice_resync";

/// The loader's state across batches.
pub struct Loader {
    source: String,
    database: String,
    ch: clickhouse::Client,
    nats: async_nats::Client,
    chains: Chains,
    shadows: HashMap<TableName, String>,
    /// Relation last ensured in ClickHouse per target table name.
    ensured: HashMap<String, v1::Relation>,
    version: u64,
    last_resync_request: HashMap<TableName, Instant>,
    commit_times: HashMap<TableName, i64>,
    heartbeat_time: Option<i64>,
    /// When each shadow table last received snapshot rows (or was restored).
    shadow_progress: HashMap<TableName, Instant>,
}

/// A resync whose shadow got no snapshot rows for this long is presumed lost
/// (replicator restarted mid-snapshot) and requested again; a resync still
/// running is joined by the replicator, not restarted.
const STALLED_RESYNC: std::time::Duration = std::time::Duration::from_secs(60);

/// One table's applicable packages of a batch, in order.
struct TableWork<'b> {
    table: TableName,
    packages: Vec<&'b Decoded>,
    /// Indexes of the batch messages these packages came from (for dead letters).
    messages: Vec<usize>,
}

/// A fetched batch with its payloads decompressed, decoded and their rows
/// encoded: the CPU-heavy half of applying it, done by [`Batch::decode`]
/// while the previous batch's INSERTs run.
pub struct Batch {
    pub messages: Vec<jetstream::Message>,
    /// Per whole package (a chunked one at its last chunk): the index of its
    /// message and the package, or why it cannot be decoded.
    decoded: Vec<(usize, Result<Decoded, String>)>,
}

/// A decoded package and, where they could be encoded on their own, its rows
/// in RowBinary.
struct Decoded {
    /// Without its rows when `rows` holds them encoded.
    package: v1::Package,
    rows: Option<EncodedRows>,
    /// The package's protobuf bytes, kept exactly when `package` lacks its
    /// rows, to decode them after all for an INSERT that fills in TOAST values.
    raw: Option<bytes::Bytes>,
}

impl Decoded {
    /// The package with its rows.
    fn with_rows(&self) -> Result<std::borrow::Cow<'_, v1::Package>, ChError> {
        match &self.raw {
            Some(raw) => v1::Package::decode(raw.as_ref())
                .map(std::borrow::Cow::Owned)
                .map_err(|e| ChError::Decode(sluice_proto::DecodeError::Protobuf(e))),
            None => Ok(std::borrow::Cow::Borrowed(&self.package)),
        }
    }
}

impl Batch {
    /// Reassembles chunked packages (the caller holds back incomplete sets),
    /// then decodes every package and encodes the rows of every row package
    /// on `DECODE_THREADS` threads (the batch is in order again afterwards).
    pub fn decode(messages: Vec<jetstream::Message>) -> Batch {
        let mut chunks = sluice_broker::chunk::Reassembler::default();
        let mut whole = Vec::with_capacity(messages.len());
        for (index, message) in messages.iter().enumerate() {
            match chunks.push(
                message.subject.as_str(),
                message.headers.as_ref(),
                &message.payload,
            ) {
                Ok(sluice_broker::chunk::Piece::Whole(payload)) => {
                    whole.push((index, Ok(payload)));
                }
                Ok(sluice_broker::chunk::Piece::Part) => {}
                Err(error) => whole.push((index, Err(sluice_broker::error_chain(&error)))),
            }
        }
        let share = whole.len().div_ceil(DECODE_THREADS).max(1);
        let messages_ref = &messages;
        let decoded = std::thread::scope(|scope| {
            let threads: Vec<_> = whole
                .chunks(share)
                .map(|part| scope.spawn(move || decode_part(messages_ref, part)))
                .collect();
            threads
                .into_iter()
                .flat_map(|thread| match thread.join() {
                    Ok(part) => part,
                    Err(panic) => std::panic::resume_unwind(panic),
                })
                .collect()
        });
        Batch { messages, decoded }
    }
}

/// Threads that decode one batch. Two: on a small machine ClickHouse needs
/// the rest, and the decoding of one batch overlaps the INSERTs of the last.
const DECODE_THREADS: usize = 2;

/// Decodes whole package payloads (by message index) and encodes their rows.
fn decode_part(
    messages: &[jetstream::Message],
    part: &[(usize, Result<bytes::Bytes, String>)],
) -> Vec<(usize, Result<Decoded, String>)> {
    let mut encoder = RowEncoder::default();
    let mut decode = |index: usize, payload: &bytes::Bytes| {
        let encoding = messages[index]
            .headers
            .as_ref()
            .and_then(|h| h.get(sluice_proto::ENCODING_HEADER))
            .map(|v| v.as_str());
        let raw = match sluice_proto::decompress(payload, encoding)
            .map_err(|error| sluice_broker::error_chain(&error))?
        {
            // Uncompressed: the payload itself.
            std::borrow::Cow::Borrowed(_) => payload.clone(),
            std::borrow::Cow::Owned(raw) => bytes::Bytes::from(raw),
        };
        if let Some(decoded) = encoder.encode(&raw) {
            return Ok(decoded);
        }
        let package = v1::Package::decode(&*raw).map_err(|error| {
            sluice_broker::error_chain(&sluice_proto::DecodeError::Protobuf(error))
        })?;
        Ok(Decoded {
            package,
            rows: None,
            raw: None,
        })
    };
    part.iter()
        .map(|(index, payload)| {
            let decoded = match payload {
                Ok(payload) => decode(*index, payload),
                Err(error) => Err(error.clone()),
            };
            (*index, decoded)
        })
        .collect()
}

/// Encodes the rows of CHANGES and SNAPSHOT packages straight from their
/// protobuf bytes, for their relation's columns.
#[derive(Default)]
struct RowEncoder {
    reader: sluice_proto::rows::RowReader,
    /// The target of the last relation seen: packages of a table come in
    /// runs with the same relation. Only its columns matter here, so the
    /// database name is left empty.
    last_target: Option<((String, String), v1::Relation, TargetTable)>,
}

impl RowEncoder {
    /// The package in `raw` with its rows encoded, or `None` to decode it
    /// whole instead: not a row package, or rows that do not encode on their
    /// own (see [`EncodedRows::transcode`]), or bytes prost should judge.
    fn encode(&mut self, raw: &bytes::Bytes) -> Option<Decoded> {
        let split = sluice_proto::rows::split(raw).ok()?;
        let package = &split.header;
        let row_kind =
            package.kind == v1::Kind::Changes as i32 || package.kind == v1::Kind::Snapshot as i32;
        let relation = package.relation.as_ref()?;
        if !row_kind || split.rows.is_empty() {
            return None;
        }
        let same = self
            .last_target
            .as_ref()
            .is_some_and(|((schema, table), r, _)| {
                *schema == package.schema && *table == package.table && r == relation
            });
        if !same {
            let target =
                TargetTable::from_relation("", &package.schema, &package.table, relation).ok()?;
            self.last_target = Some((
                (package.schema.clone(), package.table.clone()),
                relation.clone(),
                target,
            ));
        }
        let (_, _, target) = self.last_target.as_ref()?;
        let rows = EncodedRows::transcode(target, package, raw, &split.rows, &mut self.reader)?;
        Some(Decoded {
            package: split.header,
            rows: Some(rows),
            raw: Some(raw.clone()),
        })
    }
}

impl Loader {
    /// Connects to ClickHouse and restores the positions.
    pub async fn connect(config: &Config, nats: async_nats::Client) -> Result<Loader, ApplyError> {
        let ch = crate::clickhouse::client(&config.clickhouse).map_err(ApplyError::PasswordFile)?;
        let database = config.clickhouse_database();
        positions::ensure(&ch, &database).await?;
        let (stored, version) = positions::load(&ch, &database).await?;
        let chains = Chains::restore_with_blocked(
            stored
                .iter()
                .map(|(t, s)| (t.clone(), s.position, s.blocked)),
        );
        let shadows = stored
            .into_iter()
            .filter(|(_, s)| !s.shadow.is_empty())
            .map(|(t, s)| (t, s.shadow))
            .collect();
        Ok(Loader {
            source: config.source.clone(),
            database,
            ch,
            nats,
            chains,
            shadows,
            ensured: HashMap::new(),
            version,
            last_resync_request: HashMap::new(),
            commit_times: HashMap::new(),
            heartbeat_time: None,
            shadow_progress: HashMap::new(),
        })
    }

    /// Resyncs whose shadow table was being filled when the loader last
    /// stopped: asks for them again. If the replicator is still running that
    /// resync, the request joins it; if the replicator restarted meanwhile (its
    /// snapshot reader died with it), a fresh resync starts. Blocked tables are
    /// asked for too.
    pub async fn resume_interrupted(&mut self) {
        let mut tables: Vec<TableName> = self.shadows.keys().cloned().collect();
        tables.extend(self.chains.blocked());
        tables.sort();
        tables.dedup();
        for table in tables {
            self.request_resync(&table).await;
        }
    }

    /// Re-requests resyncs whose shadow table stopped receiving snapshot rows.
    pub async fn check_stalled_resyncs(&mut self) {
        let now = Instant::now();
        self.shadow_progress
            .retain(|table, _| self.shadows.contains_key(table));
        let mut stalled = Vec::new();
        for table in self.shadows.keys() {
            let since = *self.shadow_progress.entry(table.clone()).or_insert(now);
            if now.duration_since(since) > STALLED_RESYNC {
                stalled.push(table.clone());
            }
        }
        for table in stalled {
            tracing::warn!(table = %label(&table), "resync made no progress for a minute; asking for it again");
            self.request_resync(&table).await;
            self.shadow_progress.insert(table, now);
        }
    }

    pub fn database(&self) -> &str {
        &self.database
    }

    /// Refreshes `sluice_loader_lag_seconds` for every table seen.
    pub fn update_lag(&self) {
        let now = sluice_now_us();
        for (table, commit) in &self.commit_times {
            let newest = (*commit).max(self.heartbeat_time.unwrap_or(i64::MIN));
            gauge!(m::LOADER_LAG_SECONDS, "table" => label(table))
                .set((now - newest).max(0) as f64 / 1e6);
        }
    }

    /// Applies a batch; see the module docs. On error nothing is committed in
    /// memory either, so the retried batch is classified afresh.
    pub async fn apply(&mut self, batch: &Batch) -> Result<(), ApplyError> {
        let messages = &batch.messages;
        let mut chains = self.chains.clone();
        let mut order: Vec<TableName> = Vec::new();
        let mut work: HashMap<TableName, TableWork> = HashMap::new();
        let mut heartbeat = None;
        let mut dead: Vec<(usize, &'static str, String)> = Vec::new();
        let mut gaps: Vec<TableName> = Vec::new();
        for (index, decoded) in &batch.decoded {
            let index = *index;
            let package = match decoded {
                Ok(decoded) => decoded,
                Err(detail) => {
                    dead.push((index, "decode", detail.clone()));
                    continue;
                }
            };
            if package.package.kind == v1::Kind::Heartbeat as i32 {
                heartbeat = Some(package.package.commit_time_us);
                continue;
            }
            let table = (
                package.package.schema.clone(),
                package.package.table.clone(),
            );
            match chains.classify(&table, &package.package) {
                Verdict::Apply => {
                    let entry = work.entry(table.clone()).or_insert_with(|| {
                        order.push(table.clone());
                        TableWork {
                            table: table.clone(),
                            packages: Vec::new(),
                            messages: Vec::new(),
                        }
                    });
                    entry.packages.push(package);
                    entry.messages.push(index);
                }
                Verdict::AlreadyApplied | Verdict::Stale | Verdict::Blocked => {}
                Verdict::Unpositioned => dead.push((
                    index,
                    "unpositioned",
                    "package has no chain position".into(),
                )),
                Verdict::Gap { expected, got } => {
                    counter!(m::GAPS_DETECTED, "table" => label(&table)).increment(1);
                    tracing::error!(
                        table = %label(&table),
                        expected = %expected.map_or("a first package (sequence 1)".to_owned(), |p| p.to_string()),
                        got = %got,
                        "gap in the table's chain; not applying past it, requesting a resync"
                    );
                    gaps.push(table);
                }
            }
        }

        let snapshot_tables: Vec<TableName> = work
            .values()
            .filter(|w| {
                w.packages.iter().any(|p| {
                    p.package.kind == v1::Kind::Snapshot as i32
                        || p.package.kind == v1::Kind::ResyncBegin as i32
                })
            })
            .map(|w| w.table.clone())
            .collect();
        let mut shadows = self.shadows.clone();
        let mut commit_times = HashMap::new();
        let mut blocked_now: Vec<(TableName, String)> = Vec::new();
        let mut changed: Vec<TableName> = Vec::new();
        for table in &order {
            let Some(table_work) = work.remove(table) else {
                continue;
            };
            match self
                .apply_table(&table_work, &mut shadows, &mut commit_times)
                .await
            {
                Ok(()) => changed.push(table.clone()),
                Err(error) if error.is_transient() => return Err(error.into()),
                Err(error) => {
                    // Retrying the same rows cannot succeed: keep them aside,
                    // stop the table and rebuild it from Postgres.
                    let reason = sluice_broker::error_chain(&error);
                    tracing::error!(table = %label(table), error = %reason, "rows cannot be written; table blocked, packages dead-lettered, requesting a resync");
                    chains.block(table);
                    for &index in &table_work.messages {
                        dead.push((index, "insert", reason.clone()));
                    }
                    blocked_now.push((table.clone(), reason));
                    changed.push(table.clone());
                }
            }
        }

        let states: Vec<(TableName, Stored)> = changed
            .iter()
            .chain(&gaps)
            .filter_map(|t| {
                chains.position(t).map(|position| {
                    (
                        t.clone(),
                        Stored {
                            position,
                            shadow: shadows.get(t).cloned().unwrap_or_default(),
                            blocked: chains.is_blocked(t),
                        },
                    )
                })
            })
            .collect();
        let mut version = self.version;
        positions::save(&self.ch, &self.database, &states, &mut version).await?;

        for (index, reason, detail) in &dead {
            self.dead_letter(&messages[*index], reason, detail).await?;
        }

        // Committed: adopt the new state.
        self.version = version;
        self.chains = chains;
        self.shadows = shadows;
        for (table, time) in commit_times {
            let entry = self.commit_times.entry(table).or_insert(time);
            *entry = (*entry).max(time);
        }
        if let Some(time) = heartbeat {
            self.heartbeat_time = Some(time);
        }
        for table in gaps.iter().chain(blocked_now.iter().map(|(t, _)| t)) {
            self.request_resync(table).await;
        }
        for table in self.chains.blocked() {
            gauge!(m::TABLE_BLOCKED, "table" => label(&table)).set(1.0);
            self.request_resync(&table).await;
        }
        self.check_stalled_resyncs().await;
        for table in &snapshot_tables {
            self.shadow_progress.insert(table.clone(), Instant::now());
        }
        for table in &changed {
            if !self.chains.is_blocked(table) {
                gauge!(m::TABLE_BLOCKED, "table" => label(table)).set(0.0);
            }
        }
        Ok(())
    }

    async fn apply_table(
        &mut self,
        work: &TableWork<'_>,
        shadows: &mut HashMap<TableName, String>,
        commit_times: &mut HashMap<TableName, i64>,
    ) -> Result<(), ChError> {
        let table = &work.table;
        let mut run: Vec<&Decoded> = Vec::new();
        for &decoded in &work.packages {
            let package = &decoded.package;
            let kind = v1::Kind::try_from(package.kind).unwrap_or(v1::Kind::Unspecified);
            match kind {
                v1::Kind::Changes | v1::Kind::Snapshot => {
                    if let Some(first) = run.first()
                        && first.package.relation != package.relation
                    {
                        self.flush(table, &run, shadows).await?;
                        run.clear();
                    }
                    if kind == v1::Kind::Changes {
                        let entry = commit_times
                            .entry(table.clone())
                            .or_insert(package.commit_time_us);
                        *entry = (*entry).max(package.commit_time_us);
                    }
                    run.push(decoded);
                }
                v1::Kind::Truncate => {
                    self.flush(table, &run, shadows).await?;
                    run.clear();
                    let live = self.target(table, package).await?;
                    self.exec(
                        &format!("TRUNCATE TABLE IF EXISTS {}", live.qualified()),
                        "truncate",
                    )
                    .await?;
                    if let Some(shadow) = shadows.get(table) {
                        let shadow = live.with_table(shadow);
                        self.exec(
                            &format!("TRUNCATE TABLE IF EXISTS {}", shadow.qualified()),
                            "truncate shadow",
                        )
                        .await?;
                    }
                    tracing::info!(table = %label(table), "truncate applied");
                }
                v1::Kind::ResyncBegin => {
                    self.flush(table, &run, shadows).await?;
                    run.clear();
                    let live = self.target(table, package).await?;
                    let shadow_name = format!("{}{SHADOW_SUFFIX}", live.table);
                    let shadow = live.with_table(&shadow_name);
                    self.exec(
                        &format!("DROP TABLE IF EXISTS {}", shadow.qualified()),
                        "drop stale shadow",
                    )
                    .await?;
                    ensure_table(&self.ch, &shadow).await?;
                    // The replicator's stream can be ahead of the resync's
                    // consistent point: changes committed after it may have
                    // been published, and applied to the live table only,
                    // before this marker. The snapshot lacks them; carry them
                    // (tombstones included) into the shadow.
                    let columns = live.written_columns();
                    let after = u128::from(package.commit_lsn) << 64;
                    self.exec(
                        &format!(
                            "INSERT INTO {} ({columns}) SELECT {columns} FROM {} \
                             WHERE {} >= toUInt128('{after}')",
                            shadow.qualified(),
                            live.qualified(),
                            quote_ident(VERSION_COLUMN),
                        ),
                        "carry changes past the snapshot into the shadow",
                    )
                    .await?;
                    shadows.insert(table.clone(), shadow_name);
                    let reason = package
                        .resync
                        .as_ref()
                        .map(|r| r.reason.clone())
                        .unwrap_or_default();
                    tracing::info!(table = %label(table), reason = %reason, "resync started: filling shadow table");
                }
                v1::Kind::ResyncEnd => {
                    self.flush(table, &run, shadows).await?;
                    run.clear();
                    let live = self.target(table, package).await?;
                    if let Some(shadow_name) = shadows.remove(table) {
                        let shadow = live.with_table(&shadow_name);
                        self.exec(
                            &format!(
                                "EXCHANGE TABLES {} AND {}",
                                live.qualified(),
                                shadow.qualified()
                            ),
                            "exchange tables",
                        )
                        .await?;
                        self.exec(
                            &format!("DROP TABLE IF EXISTS {}", shadow.qualified()),
                            "drop old table",
                        )
                        .await?;
                        counter!(m::RESYNCS_COMPLETED, "table" => label(table)).increment(1);
                        tracing::info!(table = %label(table), "resync complete: shadow table swapped in");
                    }
                }
                v1::Kind::Heartbeat | v1::Kind::Unspecified => {}
            }
        }
        self.flush(table, &run, shadows).await
    }

    /// The live target of a table, created/evolved to the package's relation.
    async fn target(
        &mut self,
        table: &TableName,
        package: &v1::Package,
    ) -> Result<TargetTable, ChError> {
        let relation = package.relation.clone().unwrap_or_default();
        let target = TargetTable::from_relation(&self.database, &table.0, &table.1, &relation)?;
        if self.ensured.get(&target.table) != Some(&relation) {
            let drift = ensure_table(&self.ch, &target).await?;
            for d in &drift {
                counter!(m::SCHEMA_DRIFT, "table" => label(table), "kind" => d.kind()).increment(1);
                tracing::error!(table = %label(table), drift = ?d, "schema change in Postgres that ClickHouse cannot follow by ADD COLUMN; see README \"Schema changes\"");
            }
            self.ensured.insert(target.table.clone(), relation);
        }
        Ok(target)
    }

    /// One INSERT per target for a run of row packages.
    async fn flush(
        &mut self,
        table: &TableName,
        run: &[&Decoded],
        shadows: &HashMap<TableName, String>,
    ) -> Result<(), ChError> {
        let Some(first) = run.first().map(|d| &d.package) else {
            return Ok(());
        };
        let live = self.target(table, first).await?;
        let shadow = shadows.get(table).map(|name| live.with_table(name));
        if let Some(shadow) = &shadow {
            // The shadow may predate an ADD COLUMN.
            if self.ensured.get(&shadow.table) != first.relation.as_ref() {
                ensure_table(&self.ch, shadow).await?;
                self.ensured.insert(
                    shadow.table.clone(),
                    first.relation.clone().unwrap_or_default(),
                );
            }
        }
        let live_packages: Vec<&Decoded> = run
            .iter()
            .copied()
            .filter(|p| p.package.kind == v1::Kind::Changes as i32)
            .collect();
        // Snapshot rows belong to the shadow; without one (replayed after the
        // swap) they are older than what the live table has and go there.
        let shadow_packages: Vec<&Decoded> = if shadow.is_some() {
            run.to_vec()
        } else {
            Vec::new()
        };
        let live_packages = if shadow.is_none() {
            run.to_vec()
        } else {
            live_packages
        };
        self.insert(table, &live, &live_packages).await?;
        if let Some(shadow) = &shadow {
            self.insert(table, shadow, &shadow_packages).await?;
        }
        Ok(())
    }

    async fn insert(
        &mut self,
        table: &TableName,
        target: &TargetTable,
        packages: &[&Decoded],
    ) -> Result<(), ChError> {
        if packages.is_empty() {
            return Ok(());
        }
        let mut toast = ToastRequest::default();
        for decoded in packages {
            if decoded.rows.is_none() {
                toast.add_package(target, &decoded.package)?;
            }
        }
        let current = if toast.is_empty() {
            CurrentRows::default()
        } else {
            fetch_current(&self.ch, target, &toast).await?
        };
        let mut builder = InsertBuilder::new(target);
        let mut ops = OpCounts::default();
        for decoded in packages {
            match &decoded.rows {
                Some(rows) if toast.is_empty() && builder.push_encoded(rows) => {
                    ops.merge(&rows.ops);
                }
                _ => {
                    let package = decoded.with_rows()?;
                    builder.push_package(&package, &current)?;
                    ops.merge(&OpCounts::of(&package));
                }
            }
        }
        let rows = builder.rows();
        let started = Instant::now();
        let report = builder.send(&self.ch).await?;
        histogram!(m::INSERT_SECONDS).record(started.elapsed().as_secs_f64());
        histogram!(m::BATCH_ROWS).record(rows as f64);
        for (op, count) in OpCounts::NAMES.into_iter().zip(ops.0) {
            if count > 0 {
                counter!(m::LOADED_ROWS, "table" => label(table), "op" => op).increment(count);
            }
        }
        for (column, count) in &report.clamped.0 {
            counter!(m::VALUE_CLAMPED, "table" => label(table), "column" => column.clone())
                .increment(*count);
        }
        Ok(())
    }

    async fn exec(&self, sql: &str, what: &'static str) -> Result<(), ChError> {
        self.ch
            .query_raw(sql)
            .execute()
            .await
            .map_err(|source| ChError::ClickHouse { what, source })
    }

    async fn dead_letter(
        &self,
        message: &jetstream::Message,
        reason: &'static str,
        detail: &str,
    ) -> Result<(), ApplyError> {
        counter!(m::DEAD_LETTERS, "reason" => reason).increment(1);
        let stream_sequence = message.info().map(|i| i.stream_sequence).unwrap_or(0);
        tracing::error!(subject = %message.subject, stream_sequence, reason, error = %detail, "message moved to the dead-letter subject");
        let mut headers = HeaderMap::new();
        headers.insert("Sluice-Dead-Letter-Reason", reason);
        headers.insert(
            "Sluice-Dead-Letter-Error",
            detail.replace(['\r', '\n'], " ").as_str(),
        );
        headers.insert("Sluice-Original-Subject", message.subject.as_str());
        headers.insert(
            "Sluice-Stream-Sequence",
            stream_sequence.to_string().as_str(),
        );
        if let Some(original) = &message.headers {
            for name in [sluice_proto::ENCODING_HEADER, sluice_proto::FORMAT_HEADER] {
                if let Some(value) = original.get(name) {
                    headers.insert(name, value.as_str());
                }
            }
        }
        self.nats
            .publish_with_headers(
                topology::dead_letter_subject(&self.source),
                headers,
                message.payload.clone(),
            )
            .await
            .map_err(|e| ApplyError::DeadLetter(Box::new(e)))?;
        self.nats
            .flush()
            .await
            .map_err(|e| ApplyError::DeadLetter(Box::new(e)))?;
        message
            .ack_with(AckKind::Term)
            .await
            .map_err(ApplyError::DeadLetter)?;
        Ok(())
    }

    /// Asks the replicator to resync a table (at most once a minute per table).
    async fn request_resync(&mut self, table: &TableName) {
        if self
            .last_resync_request
            .get(table)
            .is_some_and(|t| t.elapsed() < std::time::Duration::from_secs(60))
        {
            return;
        }
        self.last_resync_request
            .insert(table.clone(), Instant::now());
        let request = v1::ResyncRequest {
            tables: vec![label(table)],
            all: false,
            reason: "gap".into(),
        };
        let subject = topology::resync_request_subject(&self.source);
        let reply = tokio::time::timeout(
            std::time::Duration::from_secs(5),
            self.nats.request(subject, request.encode_to_vec().into()),
        )
        .await;
        match reply {
            Ok(Ok(reply)) => match v1::ResyncReply::decode(reply.payload) {
                Ok(reply) if reply.error.is_empty() => {
                    tracing::info!(table = %label(table), "resync requested from the replicator");
                }
                Ok(reply) => {
                    tracing::error!(table = %label(table), error = %reply.error, "replicator refused the resync; table stays blocked");
                }
                Err(error) => {
                    tracing::error!(table = %label(table), error = %error, "unreadable resync reply")
                }
            },
            Ok(Err(error)) => {
                tracing::error!(table = %label(table), error = %error, "no replicator answered the resync request; table stays blocked (run `sluice-replicator resync --table {}`)", label(table));
            }
            Err(_) => {
                tracing::error!(table = %label(table), "resync request timed out; table stays blocked");
            }
        }
    }
}

fn label(table: &TableName) -> String {
    format!("{}.{}", table.0, table.1)
}

fn sluice_now_us() -> i64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_micros() as i64)
        .unwrap_or(0)
}
