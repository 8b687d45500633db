//! Following the publication while streaming (ARCHITECTURE.md invariant 7):
//! tables added to it are snapshotted automatically, tables removed from it
//! stop being replicated.
//!
//! The publication is read again every `replicator.publication_check_interval`
//! and at once when a Relation message names a table the stream does not
//! replicate. A table that is in the publication now and can be replicated
//! joins the replicated tables and gets a resync (reason `added`): its
//! existing rows arrive through the same shadow-and-swap as any resync, its
//! changes from then on through the stream. A table in the publication that
//! cannot be replicated (no usable replica identity, the reserved schema
//! `_control`) is reported once and checked again at every later read, so it
//! joins once its cause is fixed. A table no longer in the publication leaves
//! the replicated tables: Postgres stops sending its changes at the
//! `ALTER PUBLICATION`, the changes before it still arrive (the stream may be
//! behind) and are loaded, and its ClickHouse table is kept.
//!
//! A table whose column list or row filter changed (`ALTER PUBLICATION … SET
//! TABLE t (cols) WHERE (…)`) is resynced (reason `publication_changed`):
//! its shadow table is built from the new column list, so added columns are
//! filled, removed ones dropped and the rows are those the new filter admits.
//! So is a table whose `pg_publication_rel` entry changed between two
//! checks (removed and added back: its changes in between were not
//! published). The baseline is the publication when the run started (before
//! its snapshot, if any). Each table's packages carry a fingerprint of the
//! shape their ClickHouse rows match (`v1::Relation::publication`): updated
//! here for tables that need no resync, at RESYNC_BEGIN for the others; a
//! restart compares it with the publication to find changes made while the
//! replicator was stopped (see [`crate::run`]).
//!
//! A table published through its root (`publish_via_partition_root`)
//! whose leaf partitions changed is resynced (reason `partitions_changed`)
//! when that changed its rows without a change message: a leaf attached
//! with rows from before, or one detached or dropped that may have held
//! rows. A partition created and filled while streaming needs nothing.
//!
//! A replicated table whose Relation message comes without a key (it lost
//! its replica identity) becomes one that cannot be replicated, and the
//! changes of such tables are skipped: published keyless, the loader could
//! only dead-letter them and ask for a resync that fails again.
//!
//! A table added while the replicator was stopped is found at start-up
//! instead: it has no package in the stream (see [`crate::run`], reason
//! `not_in_stream`).

use std::collections::{BTreeMap, HashSet};

use metrics::gauge;
use sluice_broker::TableName;
use sluice_proto::v1;

use super::{Loop, StreamError};
use crate::catalog;
use crate::metrics as m;

/// The publication compared with what the stream replicates: tables to check
/// (in the publication, not replicated yet: new ones and ones that could not
/// be replicated before) and tables removed from it, each sorted.
fn compare(
    replicated: &HashSet<TableName>,
    unreplicable: &HashSet<TableName>,
    publication: &[TableName],
) -> (Vec<TableName>, Vec<TableName>) {
    let now: HashSet<&TableName> = publication.iter().collect();
    let mut candidates: Vec<TableName> = now
        .iter()
        .filter(|t| !replicated.contains(**t))
        .map(|t| (*t).clone())
        .collect();
    let mut removed: Vec<TableName> = replicated
        .iter()
        .chain(unreplicable.iter())
        .filter(|t| !now.contains(t))
        .cloned()
        .collect();
    candidates.sort();
    removed.sort();
    removed.dedup();
    (candidates, removed)
}

impl Loop<'_> {
    /// Reads the publication again and follows it: added tables are
    /// resynced, removed ones dropped from the replicated tables. `relation`
    /// is the table of a Relation message that triggered the check.
    pub(super) async fn check_publication(
        &mut self,
        relation: Option<&TableName>,
    ) -> Result<(), StreamError> {
        let publication = &self.config.postgres.publication;
        let tables = catalog::published_tables(&self.sql.client, publication).await?;
        let (candidates, removed) = compare(&self.translate.published, &self.unreplicable, &tables);
        let shape = catalog::PublicationShape::read(&self.sql.client, publication).await?;
        // A changed column list or row filter of a table replicated so far
        // (its rows in ClickHouse follow the old one), or its entry removed
        // and added back between two checks (changes in between were not
        // published).
        let mut changed: Vec<TableName> = self
            .translate
            .published
            .iter()
            .filter(|t| {
                tables.contains(t)
                    && (self.shape.narrowings.get(*t) != shape.narrowings.get(*t)
                        || self.shape.memberships.get(*t) != shape.memberships.get(*t))
            })
            .cloned()
            .collect();
        changed.sort();
        let mut repartitioned = Vec::new();
        for table in &self.translate.published {
            if !tables.contains(table) || changed.contains(table) {
                continue;
            }
            let empty = BTreeMap::new();
            let before = self.shape.leaves.get(table).unwrap_or(&empty);
            let now = shape.leaves.get(table).unwrap_or(&empty);
            if self.partitions_changed(table, before, now).await {
                repartitioned.push(table.clone());
            }
        }
        repartitioned.sort();
        // What needs no resync is what ClickHouse's rows match from now on;
        // a resynced table gets its fingerprint at its RESYNC_BEGIN (also one
        // whose resync runs already: it may not have begun).
        for table in &self.translate.published {
            if !changed.contains(table)
                && !repartitioned.contains(table)
                && !self.resyncs.is_running(table)
            {
                self.packager
                    .set_publication(table, shape.fingerprint(table));
            }
        }
        self.shape = shape;
        let mut added = Vec::new();
        for table in candidates {
            match self.translate.replicable(&self.sql.client, &table).await? {
                Ok(()) => {
                    if self.unreplicable.remove(&table) {
                        tracing::info!(table = %table, "table can be replicated now");
                    }
                    added.push(table);
                }
                Err(reason) => {
                    if self.unreplicable.insert(table.clone()) {
                        tracing::error!(table = %table, error = %reason, "table cannot be replicated; skipped");
                        gauge!(m::TABLE_ERRORS, "table" => table.to_string()).set(1.0);
                    }
                }
            }
        }
        for table in removed {
            if self.translate.published.remove(&table) {
                tracing::warn!(table = %table, publication = %publication, "table removed from the publication: its changes up to the removal are loaded, later ones are not; its ClickHouse table is kept");
            }
            if self.unreplicable.remove(&table) {
                gauge!(m::TABLE_ERRORS, "table" => table.to_string()).set(0.0);
            }
        }
        if let Some(table) = relation
            && !self.translate.published.contains(table)
            && !added.contains(table)
            && !self.unreplicable.contains(table)
        {
            tracing::debug!(table = %table, "changes of a table no longer in the publication: streamed up to its removal");
        }
        self.retry_failed_resyncs();
        if !repartitioned.is_empty() {
            self.resync_tables(repartitioned, "partitions_changed");
        }
        if !changed.is_empty() {
            for table in &changed {
                tracing::info!(table = %table, publication = %publication, "the publication's entry, column list or row filter of the table changed: resyncing it");
            }
            self.resync_tables(changed, "publication_changed");
        }
        if added.is_empty() {
            return Ok(());
        }
        for table in &added {
            tracing::info!(table = %table, publication = %publication, "table added to the publication: loading its existing rows (resync), then its changes");
            m::table_series_at_zero(table);
            gauge!(m::TABLE_ERRORS, "table" => table.to_string()).set(0.0);
            self.translate.published.insert(table.clone());
        }
        self.resync_tables(added, "added");
        Ok(())
    }

    /// Whether the rows of `root`, published through it, changed with its
    /// leaf partitions from `before` to `now` without a change message: a
    /// leaf attached with rows from before ([`catalog::rows_from_before_attach`]),
    /// or one detached or dropped that may have held rows
    /// ([`catalog::may_hold_rows`]). A partition created empty and filled
    /// through the stream is no change. When the catalog cannot tell (no
    /// privilege on the leaf), it is one.
    async fn partitions_changed(
        &self,
        root: &TableName,
        before: &BTreeMap<u32, TableName>,
        now: &BTreeMap<u32, TableName>,
    ) -> bool {
        let client = &self.sql.client;
        let mut changed = false;
        for (oid, leaf) in now.iter().filter(|(oid, _)| !before.contains_key(oid)) {
            let attached = catalog::rows_from_before_attach(client, leaf, *oid).await;
            if !matches!(attached, Ok(false)) {
                tracing::info!(table = %root, partition = %leaf, error = ?attached.err().map(|e| e.to_string()), "a partition with rows from before was attached: resyncing the table it is published through");
                changed = true;
            } else {
                tracing::info!(table = %root, partition = %leaf, "new partition: its rows come through the stream");
            }
        }
        for (oid, leaf) in before.iter().filter(|(oid, _)| !now.contains_key(oid)) {
            let held = catalog::may_hold_rows(client, *oid).await;
            if !matches!(held, Ok(false)) {
                tracing::info!(table = %root, partition = %leaf, error = ?held.err().map(|e| e.to_string()), "a partition that may hold rows was detached or dropped: resyncing the table it is published through");
                changed = true;
            } else {
                tracing::info!(table = %root, partition = %leaf, "an empty partition was detached");
            }
        }
        changed
    }

    /// After a Relation message of `table` (relation `oid`, `keyed` if it
    /// has a key): a table that
    /// cannot be replicated has its changes skipped, and a replicated table
    /// whose relation lost its key (`REPLICA IDENTITY NOTHING`, or the key
    /// dropped) becomes one that cannot, reported once
    /// (ARCHITECTURE.md invariant 10). It is checked again at every
    /// publication check and resynced once it has a key again.
    pub(super) fn check_key(&mut self, oid: u32, table: &TableName, keyed: bool) {
        let skip = !keyed || self.unreplicable.contains(table);
        self.translate.set_skip(oid, skip);
        if !keyed && self.translate.published.remove(table) {
            tracing::error!(table = %table, "table has no usable replica identity any more (needs a primary key, REPLICA IDENTITY USING INDEX, or REPLICA IDENTITY FULL): its changes are not loaded until it has one again; it is resynced then");
            gauge!(m::TABLE_ERRORS, "table" => table.to_string()).set(1.0);
            self.unreplicable.insert(table.clone());
        }
    }

    /// Starts a resync of `tables` for `reason` (as a request would); a
    /// refusal is logged.
    pub(super) fn resync_tables(&mut self, tables: Vec<TableName>, reason: &str) {
        let request = v1::ResyncRequest {
            tables: tables.iter().map(TableName::to_string).collect(),
            all: false,
            reason: reason.to_owned(),
        };
        let reply = self.start_resyncs(&request);
        if !reply.error.is_empty() {
            tracing::error!(error = %reply.error, reason = %reason, "cannot start the resync");
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn set(names: &[&str]) -> HashSet<TableName> {
        names.iter().map(|n| TableName::parse(n)).collect()
    }

    fn list(names: &[&str]) -> Vec<TableName> {
        names.iter().map(|n| TableName::parse(n)).collect()
    }

    #[test]
    fn new_tables_are_checked_and_missing_ones_removed() {
        let (candidates, removed) =
            compare(&set(&["a", "b"]), &set(&[]), &list(&["b", "c", "s.d"]));
        assert_eq!(candidates, list(&["c", "s.d"]));
        assert_eq!(removed, list(&["a"]));
    }

    #[test]
    fn unreplicable_tables_are_checked_again_until_they_leave() {
        let (candidates, removed) = compare(&set(&["a"]), &set(&["x"]), &list(&["a", "x"]));
        assert_eq!(candidates, list(&["x"]));
        assert!(removed.is_empty());
        let (candidates, removed) = compare(&set(&["a"]), &set(&["x"]), &list(&["a"]));
        assert!(candidates.is_empty());
        assert_eq!(removed, list(&["x"]));
    }

    #[test]
    fn an_unchanged_publication_changes_nothing() {
        let (candidates, removed) = compare(&set(&["a", "b"]), &set(&[]), &list(&["a", "b"]));
        assert!(candidates.is_empty() && removed.is_empty());
    }
}
