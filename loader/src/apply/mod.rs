//! What one fetched batch does to ClickHouse, and the [`Loader`] that does
//! it.
//!
//! A batch goes through three stages: [`decode`] (decompress, decode, encode
//! rows ahead, on threads while the previous batch is written), [`plan`]
//! (pure: each package checked against its table's chain, ARCHITECTURE.md
//! invariant 3, and turned into per-table steps) and [`Loader::apply`], which
//! carries the plan out: per table, in stream order, ONE INSERT per table
//! (per target) per run of row packages, TRUNCATE, and the resync steps of
//! [`resync`] (ARCHITECTURE.md invariant 4). Then the positions are written.
//! The caller acks the batch only when this returns `Ok` (ARCHITECTURE.md
//! invariant 1).
//!
//! Poison messages (undecodable, unpositioned) and the packages of a table
//! whose rows ClickHouse refuses are moved to the dead-letter subject
//! ([`dead_letter`]); the refused table is blocked and resynced, other tables
//! go on (ARCHITECTURE.md invariants 6 and 10). [`lag`] keeps the lag gauge.

pub(crate) mod dead_letter;
mod decode;
mod lag;
mod plan;
mod resync;

use std::collections::{HashMap, HashSet};
use std::time::Instant;

use metrics::{counter, gauge, histogram};
use sluice_broker::TableName;
use sluice_broker::config::Config;
use sluice_proto::v1;

pub use decode::{Batch, Pending, split};

use crate::chain::Chains;
use crate::clickhouse::names::target_column_name;
use crate::clickhouse::schema::{SchemaDrift, TargetTable, current_columns, ensure_table_after};
use crate::clickhouse::{
    CurrentRows, Error as ChError, InsertBuilder, OpCounts, ToastRequest, fetch_current,
};
pub use crate::error::ApplyError;
use crate::metrics as m;
use crate::positions::{self, Stored};
use crate::recovery::Recovery;
use dead_letter::DeadLetter;
use decode::Decoded;
use lag::Lag;
use plan::{Step, TablePlan};

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
    lag: Lag,
    /// When each shadow table last received snapshot rows (or was restored).
    shadow_progress: HashMap<TableName, Instant>,
    /// Tables whose counters were registered at 0 (see [`crate::metrics`]).
    counted: HashSet<TableName>,
    /// Commit LSN of each table's last applied package (stored with its position).
    commit_lsns: HashMap<TableName, u64>,
    /// Stream sequence of each table's last applied message (stored with its position).
    stream_sequences: HashMap<TableName, u64>,
    troubles: Troubles,
    /// The tables this loader applies (it holds their leases, `crate::share`);
    /// the packages of every other table are passed over, here and by the
    /// fetcher, which shares this set ([`Loader::held_tables`]).
    held: HeldTables,
}

/// The tables a loader holds, shared with its fetcher (a poisoned lock
/// still reads); and those of them being resynced, as of the last batch
/// applied.
#[derive(Debug, Clone, Default)]
pub struct HeldTables {
    held: std::sync::Arc<std::sync::RwLock<HashSet<TableName>>>,
    resyncing: std::sync::Arc<std::sync::RwLock<HashSet<TableName>>>,
}

impl HeldTables {
    /// Whether the loader holds `table`.
    pub fn contains(&self, table: &TableName) -> bool {
        self.held
            .read()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .contains(table)
    }

    /// Whether `table` had a shadow table when the last batch was applied:
    /// its change packages then go into two INSERTs, and the decode stage
    /// keeps their RowBinary for the second. (A resync that began since
    /// costs that INSERT a second decoding, nothing else.)
    pub fn is_resyncing(&self, table: &TableName) -> bool {
        self.resyncing
            .read()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .contains(table)
    }

    fn set_resyncing<'t>(&self, tables: impl Iterator<Item = &'t TableName>) {
        let mut resyncing = self
            .resyncing
            .write()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        resyncing.clear();
        resyncing.extend(tables.cloned());
    }

    /// Whether a message on `subject` of `source`'s stream belongs to a
    /// table another loader applies: it is passed over, neither decoded nor
    /// applied (only acked).
    pub fn passes_over(&self, source: &str, subject: &str) -> bool {
        sluice_broker::topology::table_of_subject(source, subject)
            .is_some_and(|table| !self.contains(&table))
    }

    fn write(&self) -> std::sync::RwLockWriteGuard<'_, HashSet<TableName>> {
        self.held
            .write()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
    }
}

/// Why tables are blocked, and which had rows refused since their last
/// resync (stored with their positions: [`Stored::block_reason`],
/// [`Stored::refused`]).
#[derive(Debug, Clone, Default)]
struct Troubles {
    block_reasons: HashMap<TableName, String>,
    refused: HashMap<TableName, String>,
}

impl Troubles {
    fn is_failed(&self, table: &TableName) -> bool {
        self.block_reasons
            .get(table)
            .is_some_and(|r| r == positions::FAILED)
    }
}

/// The ClickHouse column names of a relation.
fn column_names(relation: &v1::Relation) -> Vec<String> {
    relation
        .columns
        .iter()
        .map(|c| target_column_name(&c.name))
        .collect()
}

/// The ClickHouse names of the columns of a relation whose older rows may
/// hold a value (`v1::Column::has_default`).
fn defaulted(relation: &v1::Relation) -> Vec<String> {
    relation
        .columns
        .iter()
        .filter(|c| c.has_default)
        .map(|c| target_column_name(&c.name))
        .collect()
}

/// Whether rows of `package` may be written into a table with `drift`:
/// [`ChError::SchemaChange`] when a change package meets drift that needs a
/// resync (the table is rebuilt before any row is encoded against its old
/// shape). Markers of a resync only make sure the table exists.
fn follow(table: &TableName, package: &v1::Package, drift: &[SchemaDrift]) -> Result<(), ChError> {
    let blocking: Vec<String> = drift
        .iter()
        .filter(|d| d.needs_resync())
        .map(|d| format!("{d:?}"))
        .collect();
    if blocking.is_empty() || package.kind != v1::Kind::Changes as i32 {
        return Ok(());
    }
    Err(ChError::SchemaChange {
        table: table.to_string(),
        detail: blocking.join("; "),
    })
}

impl Loader {
    /// Connects to ClickHouse and restores the positions.
    pub async fn connect(config: &Config, nats: async_nats::Client) -> Result<Loader, ApplyError> {
        let ch = crate::clickhouse::client(&config.clickhouse).map_err(ApplyError::Client)?;
        let database = config.clickhouse_database();
        positions::ensure(&ch, &database).await?;
        let (stored, version) = positions::load(&ch, &database).await?;
        let chains = Chains::restore_with_blocked(
            stored
                .iter()
                .map(|(t, s)| (t.clone(), s.position, s.blocked)),
        );
        // Counters of every table the loader knows exist at 0 from now on.
        let counted: HashSet<TableName> = stored.keys().cloned().collect();
        let commit_lsns = stored
            .iter()
            .map(|(t, s)| (t.clone(), s.commit_lsn))
            .collect();
        let stream_sequences = stored
            .iter()
            .map(|(t, s)| (t.clone(), s.stream_sequence))
            .collect();
        let mut troubles = Troubles::default();
        for (table, s) in &stored {
            if s.blocked && !s.block_reason.is_empty() {
                troubles
                    .block_reasons
                    .insert(table.clone(), s.block_reason.clone());
            }
            if !s.refused.is_empty() {
                troubles.refused.insert(table.clone(), s.refused.clone());
            }
            if s.failed() {
                gauge!(m::TABLE_FAILED, "table" => table.to_string()).set(1.0);
                tracing::error!(table = %table, refused = %s.refused, "table failed: its rows were refused again by the resync meant to repair them; fix the cause, then `sluice-replicator resync --table {table}`");
            }
        }
        for table in &counted {
            m::table_counters_at_zero(table);
        }
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
            lag: Lag::default(),
            shadow_progress: HashMap::new(),
            counted,
            commit_lsns,
            stream_sequences,
            troubles,
            held: HeldTables::default(),
        })
    }

    /// The set of tables this loader holds, as its fetcher reads it.
    pub fn held_tables(&self) -> HeldTables {
        self.held.clone()
    }

    /// Whether this loader holds `table`.
    fn holds(&self, table: &TableName) -> bool {
        self.held.contains(table)
    }

    /// Every table in the positions table.
    pub async fn stored_tables(&self) -> Result<Vec<TableName>, ApplyError> {
        let (stored, _) = positions::load(&self.ch, &self.database).await?;
        Ok(stored.into_keys().collect())
    }

    /// Stops applying `tables` (their leases were given up).
    pub fn give_up(&mut self, tables: &[TableName]) {
        for table in tables {
            self.held.write().remove(table);
            // Its gauges are the applying loader's to report now.
            self.lag.forget(table);
            gauge!(m::TABLE_BLOCKED, "table" => table.to_string()).set(0.0);
            gauge!(m::TABLE_FAILED, "table" => table.to_string()).set(0.0);
        }
    }

    /// Starts applying `tables` (this loader took their leases): their state
    /// is read again from the positions table, where the loader that applied
    /// them before left it. Returns, per table, the stream sequence of its
    /// last applied message (`None`: the table has a position written before
    /// stream sequences were recorded), to read the stream again after it.
    pub async fn take(
        &mut self,
        tables: &[TableName],
    ) -> Result<Vec<(TableName, Option<u64>)>, ApplyError> {
        if tables.is_empty() {
            return Ok(Vec::new());
        }
        let (mut stored, version) = positions::load(&self.ch, &self.database).await?;
        self.version = self.version.max(version);
        // Another loader may have changed these tables' ClickHouse tables.
        self.ensured.clear();
        let mut out = Vec::new();
        for table in tables {
            self.held.write().insert(table.clone());
            self.last_resync_request.remove(table);
            self.shadow_progress.remove(table);
            self.troubles.block_reasons.remove(table);
            self.troubles.refused.remove(table);
            let Some(s) = stored.remove(table) else {
                self.chains.forget(table);
                self.shadows.remove(table);
                self.commit_lsns.remove(table);
                self.stream_sequences.remove(table);
                out.push((table.clone(), Some(0)));
                continue;
            };
            if !self.counted.contains(table) {
                m::table_counters_at_zero(table);
                self.counted.insert(table.clone());
            }
            self.chains.restore_table(table, s.position, s.blocked);
            if s.blocked && !s.block_reason.is_empty() {
                self.troubles
                    .block_reasons
                    .insert(table.clone(), s.block_reason.clone());
            }
            if !s.refused.is_empty() {
                self.troubles
                    .refused
                    .insert(table.clone(), s.refused.clone());
            }
            gauge!(m::TABLE_FAILED, "table" => table.to_string()).set(if s.failed() {
                1.0
            } else {
                0.0
            });
            if s.shadow.is_empty() {
                self.shadows.remove(table);
            } else {
                self.shadows.insert(table.clone(), s.shadow.clone());
            }
            self.commit_lsns.insert(table.clone(), s.commit_lsn);
            self.stream_sequences
                .insert(table.clone(), s.stream_sequence);
            out.push((
                table.clone(),
                (s.stream_sequence > 0).then_some(s.stream_sequence),
            ));
        }
        self.held.set_resyncing(self.shadows.keys());
        Ok(out)
    }

    pub fn database(&self) -> &str {
        &self.database
    }

    /// Refreshes `sluice_loader_lag_seconds` for every table seen.
    pub fn update_lag(&self) {
        self.lag.update();
    }

    /// Applies a batch; see the module docs. On error nothing is committed in
    /// memory either, so the retried batch is classified afresh.
    pub async fn apply(&mut self, batch: &Batch) -> Result<(), ApplyError> {
        let messages = &batch.messages;
        let mut chains = self.chains.clone();
        // Another loader applies the tables this one does not hold.
        let plan = plan::plan(
            batch.decoded.iter().filter(|(index, _)| {
                !self
                    .held
                    .passes_over(&self.source, messages[*index].subject.as_str())
            }),
            &mut chains,
        );
        for table in &plan.seen {
            if !self.counted.contains(table) {
                m::table_counters_at_zero(table);
                self.counted.insert(table.clone());
            }
        }
        for gap in &plan.gaps {
            counter!(m::GAPS_DETECTED, "table" => gap.table.to_string()).increment(1);
            tracing::error!(
                table = %gap.table,
                expected = %gap.expected.map_or("a first package (sequence 1)".to_owned(), |p| p.to_string()),
                got = %gap.got,
                "gap in the table's chain; not applying past it, requesting a resync"
            );
        }
        let gaps: Vec<TableName> = plan.gaps.iter().map(|g| g.table.clone()).collect();
        let mut dead: Vec<DeadLetter> = plan.dead_letters;
        let mut shadows = self.shadows.clone();
        let mut commit_times = lag::BatchCommitTimes::new();
        let mut blocked_now: Vec<(TableName, String)> = Vec::new();
        let mut changed: Vec<TableName> = Vec::new();
        let mut troubles = self.troubles.clone();
        for gap in &plan.gaps {
            troubles
                .block_reasons
                .insert(gap.table.clone(), "gap".to_owned());
        }
        for table_plan in &plan.tables {
            let table = &table_plan.table;
            match self
                .apply_table(table_plan, &mut shadows, &mut commit_times)
                .await
            {
                Ok(()) => {
                    // A resync swapped in: what was refused before is gone.
                    if table_plan
                        .steps
                        .iter()
                        .any(|step| matches!(step, Step::FinishResync(_)))
                    {
                        troubles.refused.remove(table);
                    }
                    changed.push(table.clone());
                }
                Err(error) => match Recovery::of_insert(&error) {
                    // Retrying the same rows cannot succeed: keep them aside,
                    // stop the table and rebuild it from Postgres, unless
                    // that was tried already (ARCHITECTURE.md invariant 10).
                    Recovery::ResyncTable => {
                        let reason = sluice_broker::error_chain(&error);
                        chains.block(table);
                        let mut block_reason = error.resync_reason();
                        if error.rows_come_with_the_resync() {
                            tracing::warn!(table = %table, error = %reason, "table blocked, requesting a resync (its snapshot carries these rows)");
                        } else {
                            if let Some(before) = troubles.refused.get(table) {
                                block_reason = positions::FAILED;
                                gauge!(m::TABLE_FAILED, "table" => table.to_string()).set(1.0);
                                tracing::error!(table = %table, error = %reason, before = %before, "rows refused again by the resync meant to repair them: table failed, packages dead-lettered, no more resyncs; fix the cause, then `sluice-replicator resync --table {table}`");
                            } else {
                                tracing::error!(table = %table, error = %reason, "rows cannot be written; table blocked, packages dead-lettered, requesting a resync");
                            }
                            troubles.refused.insert(table.clone(), reason.clone());
                            for &message in &table_plan.messages {
                                dead.push(DeadLetter {
                                    message,
                                    reason: "insert",
                                    detail: reason.clone(),
                                });
                            }
                        }
                        troubles
                            .block_reasons
                            .insert(table.clone(), block_reason.to_owned());
                        blocked_now.push((table.clone(), reason));
                        changed.push(table.clone());
                    }
                    // The whole batch again, nothing acked. (`of_insert`
                    // answers nothing else; anything else ends the batch,
                    // for `Recovery::of` to judge.)
                    Recovery::Retry | Recovery::FailTable | Recovery::Stop => {
                        return Err(error.into());
                    }
                },
            }
        }

        let batch_lsns: HashMap<&TableName, u64> = plan
            .tables
            .iter()
            .map(|t| (&t.table, t.last_commit_lsn))
            .collect();
        let batch_sequences: HashMap<&TableName, u64> = plan
            .tables
            .iter()
            .filter_map(|t| {
                let last = *t.messages.last()?;
                Some((&t.table, messages[last].info().ok()?.stream_sequence))
            })
            .collect();
        let states: Vec<(TableName, Stored)> = changed
            .iter()
            .chain(&gaps)
            .filter_map(|t| {
                chains.position(t).map(|position| {
                    let blocked = chains.is_blocked(t);
                    (
                        t.clone(),
                        Stored {
                            position,
                            shadow: shadows.get(t).cloned().unwrap_or_default(),
                            blocked,
                            block_reason: troubles
                                .block_reasons
                                .get(t)
                                .filter(|_| blocked)
                                .cloned()
                                .unwrap_or_default(),
                            refused: troubles.refused.get(t).cloned().unwrap_or_default(),
                            commit_lsn: batch_lsns
                                .get(t)
                                .or_else(|| self.commit_lsns.get(t))
                                .copied()
                                .unwrap_or(0),
                            stream_sequence: batch_sequences
                                .get(t)
                                .or_else(|| self.stream_sequences.get(t))
                                .copied()
                                .unwrap_or(0),
                        },
                    )
                })
            })
            .collect();
        let mut version = self.version;
        positions::save(&self.ch, &self.database, &states, &mut version).await?;
        fail::fail_point!("loader::positions::after_save", |_| crate::crash_here());

        for letter in &dead {
            self.dead_letter(&messages[letter.message], letter.reason, &letter.detail)
                .await?;
        }

        // Committed: adopt the new state.
        self.version = version;
        self.chains = chains;
        self.shadows = shadows;
        self.held.set_resyncing(self.shadows.keys());
        self.troubles = troubles;
        self.lag.adopt(commit_times, plan.heartbeat);
        for (table, lsn) in batch_lsns {
            self.commit_lsns.insert(table.clone(), lsn);
        }
        for (table, sequence) in batch_sequences {
            self.stream_sequences.insert(table.clone(), sequence);
        }
        for table in gaps.iter().chain(blocked_now.iter().map(|(t, _)| t)) {
            self.request_resync(table).await;
        }
        for table in self.chains.blocked() {
            if !self.holds(&table) {
                continue;
            }
            gauge!(m::TABLE_BLOCKED, "table" => table.to_string()).set(1.0);
            self.request_resync(&table).await;
        }
        self.check_stalled_resyncs().await;
        for table_plan in plan.tables.iter().filter(|t| t.fills_shadow) {
            self.shadow_progress
                .insert(table_plan.table.clone(), Instant::now());
        }
        for table in &changed {
            if !self.chains.is_blocked(table) {
                gauge!(m::TABLE_BLOCKED, "table" => table.to_string()).set(0.0);
                if self.troubles.block_reasons.remove(table).as_deref() == Some(positions::FAILED) {
                    gauge!(m::TABLE_FAILED, "table" => table.to_string()).set(0.0);
                    tracing::info!(table = %table, "failed table resynced by request: loading it again");
                }
            }
        }
        Ok(())
    }

    /// Carries out one table's steps, in order.
    async fn apply_table(
        &mut self,
        work: &TablePlan<'_>,
        shadows: &mut HashMap<TableName, String>,
        commit_times: &mut lag::BatchCommitTimes,
    ) -> Result<(), ChError> {
        let table = &work.table;
        for step in &work.steps {
            match step {
                Step::Insert(run) => {
                    for decoded in run {
                        if decoded.package.kind == v1::Kind::Changes as i32 {
                            lag::note_commit(commit_times, table, decoded.package.commit_time_us);
                        }
                    }
                    self.flush(table, run, shadows).await?;
                }
                Step::Truncate(package) => self.truncate(table, package, shadows).await?,
                Step::BeginResync(package) => self.begin_resync(table, package, shadows).await?,
                Step::FinishResync(package) => self.finish_resync(table, package, shadows).await?,
            }
        }
        Ok(())
    }

    /// TRUNCATE of the live table and, during a resync, of its shadow.
    async fn truncate(
        &mut self,
        table: &TableName,
        package: &v1::Package,
        shadows: &HashMap<TableName, String>,
    ) -> Result<(), ChError> {
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
        tracing::info!(table = %table, "truncate applied");
        Ok(())
    }

    /// The live target of a table, created/evolved to the package's relation.
    ///
    /// A change package of a table the loader applied packages of before, no
    /// resync running, whose target does not exist: the table was dropped,
    /// or its name changed (README "Upgrading"). It is created, and
    /// [`ChError::TargetMissing`] has the table resynced: changes alone would
    /// leave it silently incomplete (ARCHITECTURE.md invariant 3).
    async fn target(
        &mut self,
        table: &TableName,
        package: &v1::Package,
    ) -> Result<TargetTable, ChError> {
        let relation = package.relation.clone().unwrap_or_default();
        let target =
            TargetTable::from_relation(&self.database, &table.schema, &table.name, &relation)?;
        if self.ensured.get(&target.table) != Some(&relation) {
            let must_exist = package.kind == v1::Kind::Changes as i32
                && self.chains.position(table).is_some()
                && !self.shadows.contains_key(table)
                && !self.ensured.contains_key(&target.table);
            let missing = must_exist
                && current_columns(&self.ch, &target.database, &target.table)
                    .await?
                    .is_empty();
            let drift = self.ensure(&target, &relation).await?;
            if missing {
                return Err(ChError::TargetMissing {
                    table: table.to_string(),
                    target: target.table,
                });
            }
            for d in &drift {
                counter!(m::SCHEMA_DRIFT, "table" => table.to_string(), "kind" => d.kind())
                    .increment(1);
                if d.needs_resync() {
                    tracing::warn!(table = %table, drift = ?d, "schema change in Postgres that ClickHouse cannot follow in place; see README \"Schema changes\"");
                } else {
                    tracing::info!(table = %table, drift = ?d, "column dropped in Postgres: it stays in ClickHouse, new rows get its default; see README \"Schema changes\"");
                }
            }
            follow(table, package, &drift)?;
            self.ensured.insert(target.table.clone(), relation);
        }
        Ok(target)
    }

    /// Creates or evolves `target` to `relation` ([`ensure_table_after`]),
    /// knowing the relation it was last made to fit and which of the
    /// relation's columns have defaults.
    async fn ensure(
        &self,
        target: &TargetTable,
        relation: &v1::Relation,
    ) -> Result<Vec<SchemaDrift>, ChError> {
        let previous = self.ensured.get(&target.table).map(column_names);
        ensure_table_after(&self.ch, target, previous.as_deref(), &defaulted(relation)).await
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
        let (live, write_live) = match self.target(table, first).await {
            Ok(live) => (live, true),
            // A resync is filling the shadow: the swap replaces the live
            // table, which keeps its old shape until then.
            Err(ChError::SchemaChange { .. }) if shadows.contains_key(table) => {
                let relation = first.relation.clone().unwrap_or_default();
                let live = TargetTable::from_relation(
                    &self.database,
                    &table.schema,
                    &table.name,
                    &relation,
                )?;
                (live, false)
            }
            Err(error) => return Err(error),
        };
        let shadow = shadows.get(table).map(|name| live.with_table(name));
        if let Some(shadow) = &shadow {
            // The shadow may predate an ADD COLUMN or another change.
            if self.ensured.get(&shadow.table) != first.relation.as_ref() {
                let relation = first.relation.clone().unwrap_or_default();
                let drift = self.ensure(shadow, &relation).await?;
                follow(table, first, &drift)?;
                self.ensured.insert(shadow.table.clone(), relation);
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
        if write_live {
            self.insert(table, &live, None, &live_packages).await?;
        }
        if let Some(shadow) = &shadow {
            // A change can reach the shadow before the snapshot brought its
            // row: its unchanged TOAST values come from the live table then
            // (unless that one has an older shape).
            let fallback = write_live.then_some(&live);
            self.insert(table, shadow, fallback, &shadow_packages)
                .await?;
        }
        Ok(())
    }

    /// One INSERT of `packages` into `target`; unchanged TOAST values are
    /// read from `target`, then from `fallback` for rows `target` lacks.
    async fn insert(
        &mut self,
        table: &TableName,
        target: &TargetTable,
        fallback: Option<&TargetTable>,
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
            fetch_current(&self.ch, target, fallback, &toast).await?
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
        fail::fail_point!("loader::insert::after", |_| crate::crash_here());
        histogram!(m::INSERT_SECONDS).record(started.elapsed().as_secs_f64());
        histogram!(m::BATCH_ROWS).record(rows as f64);
        for (op, count) in OpCounts::NAMES.into_iter().zip(ops.0) {
            if count > 0 {
                counter!(m::LOADED_ROWS, "table" => table.to_string(), "op" => op).increment(count);
            }
        }
        for (column, count) in &report.clamped.0 {
            counter!(m::VALUE_CLAMPED, "table" => table.to_string(), "column" => column.clone())
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
}
