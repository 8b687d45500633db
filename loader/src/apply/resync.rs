//! Resync on the loader's side (ARCHITECTURE.md invariant 4): the shadow
//! table, its swap, and asking the replicator for resyncs.
//!
//! RESYNC_BEGIN creates an empty shadow table; snapshot rows go only to the
//! shadow, live changes to both the live table and the shadow (see
//! [`super::Loader::apply`]), so readers of the live table stay fresh;
//! RESYNC_END swaps them with `EXCHANGE TABLES` (atomic) and drops the old
//! table. The swap is idempotent: the shadow carries its resync's id as its
//! table comment, which moves with it, so a RESYNC_END replayed after a crash
//! between EXCHANGE and DROP (or after the DROP, before the positions write)
//! finds the new table already live and only drops what is left, instead of
//! exchanging the old table back. Changes committed after the snapshot's consistent point that
//! reached the live table before RESYNC_BEGIN (the replicator's stream may be
//! ahead of the resync's slot) are copied into the new shadow, selected by
//! their `_sluice_version`. A half-filled shadow is never swapped in: a crash
//! mid-resync leaves the shadow recorded in the positions table, and the
//! replayed packages continue filling it.
//!
//! A resync is requested for a table with a gap or rows ClickHouse refuses
//! (it is blocked meanwhile), for a shadow that stopped getting snapshot rows,
//! and at start for every interrupted resync and blocked table: at most once a
//! minute per table. A table whose rows are refused again before the resync
//! that was to repair them is swapped in is failed instead: no request until
//! an operator's resync starts.

use std::collections::HashMap;
use std::time::{Duration, Instant};

use metrics::counter;
use sluice_broker::TableName;
use sluice_broker::topology;
use sluice_proto::{Message as _, v1};

use super::Loader;
use crate::clickhouse::Error as ChError;
use crate::clickhouse::names::shadow_table_name;
use crate::clickhouse::schema::{VERSION_COLUMN, ensure_table, quote_ident};
use crate::metrics as m;

/// The table comment of a resync's shadow: names the resync (unique per
/// source), so the table that carries it after an EXCHANGE is known to be
/// that resync's result.
fn shadow_mark(package: &v1::Package) -> String {
    let id = package.resync.as_ref().map_or("", |r| r.resync_id.as_str());
    format!("sluice resync {id}")
}

/// `text` as a ClickHouse string literal.
fn sql_string(text: &str) -> String {
    format!("'{}'", text.replace('\\', "\\\\").replace('\'', "\\'"))
}

/// The comment of `database.table` (empty when it has none or does not exist).
async fn table_comment(
    client: &clickhouse::Client,
    database: &str,
    table: &str,
) -> Result<String, ChError> {
    let body = client
        .query_raw(
            "SELECT comment FROM system.tables WHERE database = {db:String} AND name = {t:String}",
        )
        .param("db", database)
        .param("t", table)
        .fetch_bytes("RawBLOB")
        .map_err(|source| ChError::ClickHouse {
            what: "read table comment",
            source,
        })?
        .collect()
        .await
        .map_err(|source| ChError::ClickHouse {
            what: "read table comment",
            source,
        })?;
    Ok(String::from_utf8_lossy(&body).into_owned())
}

/// A resync whose shadow got no snapshot rows for this long is presumed lost
/// (replicator restarted mid-snapshot) and requested again; a resync still
/// running is joined by the replicator, not restarted.
const STALLED_RESYNC: Duration = Duration::from_secs(60);

/// At most one resync request per table this often.
const RESYNC_REQUEST_INTERVAL: Duration = Duration::from_secs(60);

impl Loader {
    /// Resyncs whose shadow table was being filled when the loader last
    /// stopped: asks for them again. If the replicator is still running that
    /// resync, the request joins it; if the replicator restarted meanwhile (its
    /// snapshot reader died with it), a fresh resync starts. Blocked tables are
    /// asked for too.
    pub async fn resume_interrupted(&mut self) {
        let mut tables: Vec<TableName> = self.shadows.keys().cloned().collect();
        tables.extend(self.chains.blocked());
        tables.retain(|table| self.holds(table));
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
            if self.troubles.is_failed(table) || !self.holds(table) {
                continue;
            }
            let since = *self.shadow_progress.entry(table.clone()).or_insert(now);
            if now.duration_since(since) > STALLED_RESYNC {
                stalled.push(table.clone());
            }
        }
        for table in stalled {
            tracing::warn!(table = %table, "resync made no progress for a minute; asking for it again");
            self.request_resync(&table).await;
            self.shadow_progress.insert(table, now);
        }
    }

    /// RESYNC_BEGIN: a fresh shadow table, holding the live table's changes
    /// past the snapshot's consistent point; recorded in `shadows`.
    pub(super) async fn begin_resync(
        &mut self,
        table: &TableName,
        package: &v1::Package,
        shadows: &mut HashMap<TableName, String>,
    ) -> Result<(), ChError> {
        let live = self.target(table, package).await?;
        let shadow_name = shadow_table_name(&live.table);
        let shadow = live.with_table(&shadow_name);
        self.exec(
            &format!("DROP TABLE IF EXISTS {}", shadow.qualified()),
            "drop stale shadow",
        )
        .await?;
        ensure_table(&self.ch, &shadow).await?;
        // The mark that tells a finished swap from one still to do.
        self.exec(
            &format!(
                "ALTER TABLE {} MODIFY COMMENT {}",
                shadow.qualified(),
                sql_string(&shadow_mark(package))
            ),
            "mark shadow",
        )
        .await?;
        // The replicator's stream can be ahead of the resync's consistent
        // point: changes committed after it may have been published, and
        // applied to the live table only, before this marker. The snapshot
        // lacks them; carry them (tombstones included) into the shadow.
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
        fail::fail_point!("loader::resync::after_create", |_| crate::crash_here());
        shadows.insert(table.clone(), shadow_name);
        let reason = package
            .resync
            .as_ref()
            .map(|r| r.reason.clone())
            .unwrap_or_default();
        tracing::info!(table = %table, reason = %reason, "resync started: filling shadow table");
        Ok(())
    }

    /// RESYNC_END: swaps the shadow in (atomically) and drops the old table.
    /// Without a shadow (already swapped, replayed) it does nothing. When the
    /// live table already carries this resync's mark, a crash came after the
    /// EXCHANGE: only the DROP is left to do.
    pub(super) async fn finish_resync(
        &mut self,
        table: &TableName,
        package: &v1::Package,
        shadows: &mut HashMap<TableName, String>,
    ) -> Result<(), ChError> {
        let live = self.target(table, package).await?;
        if let Some(shadow_name) = shadows.remove(table) {
            let shadow = live.with_table(&shadow_name);
            let mark = shadow_mark(package);
            let swapped = table_comment(&self.ch, &live.database, &live.table).await? == mark;
            if swapped {
                tracing::info!(table = %table, "resync's swap was done before a restart; dropping the old table");
            } else {
                self.exec(
                    &format!(
                        "EXCHANGE TABLES {} AND {}",
                        live.qualified(),
                        shadow.qualified()
                    ),
                    "exchange tables",
                )
                .await?;
            }
            fail::fail_point!("loader::resync::after_exchange", |_| crate::crash_here());
            self.exec(
                &format!("DROP TABLE IF EXISTS {}", shadow.qualified()),
                "drop old table",
            )
            .await?;
            fail::fail_point!("loader::resync::after_drop", |_| crate::crash_here());
            if !swapped {
                counter!(m::RESYNCS_COMPLETED, "table" => table.to_string()).increment(1);
                tracing::info!(table = %table, "resync complete: shadow table swapped in");
            }
        }
        Ok(())
    }

    /// Asks the replicator to resync a table (at most once a minute per
    /// table, never for a failed table), giving why: the table's block
    /// reason, or `stalled` for a resync that stopped or was interrupted.
    pub(super) async fn request_resync(&mut self, table: &TableName) {
        if self.troubles.is_failed(table)
            || self
                .last_resync_request
                .get(table)
                .is_some_and(|t| t.elapsed() < RESYNC_REQUEST_INTERVAL)
        {
            return;
        }
        let reason = if self.chains.is_blocked(table) {
            self.troubles
                .block_reasons
                .get(table)
                .map_or("gap", String::as_str)
        } else {
            "stalled"
        };
        self.last_resync_request
            .insert(table.clone(), Instant::now());
        let request = v1::ResyncRequest {
            tables: vec![table.to_string()],
            all: false,
            reason: reason.to_owned(),
        };
        let subject = topology::resync_request_subject(&self.source);
        let reply = tokio::time::timeout(
            Duration::from_secs(5),
            self.nats.request(subject, request.encode_to_vec().into()),
        )
        .await;
        match reply {
            Ok(Ok(reply)) => match v1::ResyncReply::decode(reply.payload) {
                Ok(reply) if reply.error.is_empty() => {
                    tracing::info!(table = %table, "resync requested from the replicator");
                }
                Ok(reply) => {
                    tracing::error!(table = %table, error = %reply.error, "replicator refused the resync; table stays blocked");
                }
                Err(error) => {
                    tracing::error!(table = %table, error = %error, "unreadable resync reply")
                }
            },
            Ok(Err(error)) => {
                tracing::error!(table = %table, error = %error, "no replicator answered the resync request; table stays blocked (run `sluice-replicator resync --table {table}`)");
            }
            Err(_) => {
                tracing::error!(table = %table, "resync request timed out; table stays blocked");
            }
        }
    }
}
