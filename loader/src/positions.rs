//! The loader's own state in ClickHouse: per table, the last applied chain
//! position and its commit LSN, whether the table waits for a resync and,
//! during a resync, the shadow table being filled.
//!
//! Positions are written after the batch's rows were inserted and before the
//! batch is acked. A crash between insert and position write replays rows that
//! are already there (harmless: same versions); a crash between position write
//! and ack replays packages the position says are applied (skipped).

use std::collections::HashMap;

use clickhouse::Client;
use sluice_broker::TableName;

use crate::chain::Position;
use crate::clickhouse::Error;
use crate::clickhouse::schema::{quote_ident, quote_literal};

/// Name of the positions table inside the loader's database.
pub const POSITIONS_TABLE: &str = "_sluice_positions";

/// A table's stored state.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Stored {
    pub position: Position,
    /// Shadow table of a resync in progress (empty: none).
    pub shadow: String,
    /// The table waits for a resync (gap or rows that could not be written):
    /// nothing is applied to it until a new chain starts, across restarts too.
    pub blocked: bool,
    /// Commit LSN of the package at `position` (for a snapshot package: the
    /// snapshot's consistent point); 0 when unknown (written before the
    /// column existed). For operators (`status`); nothing decides on it.
    pub commit_lsn: u64,
    /// Why a blocked table is blocked, as the reason of the resync it asks
    /// for (`gap`, `refused`, `schema_change`, `target_missing`), or
    /// `failed`: rows were refused again by the resync meant to repair them,
    /// and the table waits for an operator (README "Failed tables"). Empty
    /// when not blocked, or blocked before the column existed (a gap).
    pub block_reason: String,
    /// What ClickHouse refused of the table's rows, kept from the refusal
    /// until a resync of the table is swapped in: a refusal meanwhile fails
    /// the table instead of resyncing it again.
    pub refused: String,
    /// Stream sequence of the last message applied to the table (0: none
    /// recorded, written before the column existed). A loader that takes the
    /// table over from another reads the stream again from the table's next
    /// message after it (`share`, ARCHITECTURE.md invariant 11).
    pub stream_sequence: u64,
}

impl Stored {
    /// The table waits for an operator, not for a resync it asked for.
    pub fn failed(&self) -> bool {
        self.blocked && self.block_reason == FAILED
    }
}

/// [`Stored::block_reason`] of a failed table.
pub const FAILED: &str = "failed";

fn table_sql(database: &str) -> String {
    let (database, table) = (quote_ident(database), quote_ident(POSITIONS_TABLE));
    format!("{database}.{table}")
}

/// Creates the positions table if needed.
pub async fn ensure(client: &Client, database: &str) -> Result<(), Error> {
    client
        .query_raw(&format!(
            "CREATE DATABASE IF NOT EXISTS {}",
            quote_ident(database)
        ))
        .execute()
        .await
        .map_err(|source| Error::ClickHouse {
            what: "create database",
            source,
        })?;
    client
        .query_raw(&format!(
            "CREATE TABLE IF NOT EXISTS {} (schema String, table String, generation UInt64, sequence UInt64, \
             shadow String, blocked UInt8, commit_lsn UInt64, block_reason String, refused String, \
             stream_sequence UInt64, version UInt64, updated_at DateTime64(6, 'UTC') DEFAULT now64(6)) \
             ENGINE = ReplacingMergeTree(version) ORDER BY (schema, table)",
            table_sql(database)
        ))
        .execute()
        .await
        .map_err(|source| Error::ClickHouse { what: "create positions table", source })?;
    // Positions tables made before `blocked`, `commit_lsn`, `block_reason`,
    // `refused` or `stream_sequence` existed.
    client
        .query_raw(&format!(
            "ALTER TABLE {} ADD COLUMN IF NOT EXISTS blocked UInt8 AFTER shadow, \
             ADD COLUMN IF NOT EXISTS commit_lsn UInt64 AFTER blocked, \
             ADD COLUMN IF NOT EXISTS block_reason String AFTER commit_lsn, \
             ADD COLUMN IF NOT EXISTS refused String AFTER block_reason, \
             ADD COLUMN IF NOT EXISTS stream_sequence UInt64 AFTER refused",
            table_sql(database)
        ))
        .execute()
        .await
        .map_err(|source| Error::ClickHouse {
            what: "upgrade positions table",
            source,
        })?;
    Ok(())
}

#[derive(Debug, clickhouse::Row, serde::Deserialize)]
struct Row {
    schema: String,
    table: String,
    generation: u64,
    sequence: u64,
    shadow: String,
    blocked: u8,
    commit_lsn: u64,
    block_reason: String,
    refused: String,
    stream_sequence: u64,
    version: u64,
}

/// Reads every table's latest state; returns them and the highest version.
pub async fn load(
    client: &Client,
    database: &str,
) -> Result<(HashMap<TableName, Stored>, u64), Error> {
    let rows: Vec<Row> = client
        .query(&format!(
            "SELECT schema, table, generation, sequence, shadow, blocked, commit_lsn, \
                    block_reason, refused, stream_sequence, version \
             FROM {} FINAL",
            table_sql(database)
        ))
        .fetch_all()
        .await
        .map_err(|source| Error::ClickHouse {
            what: "read positions",
            source,
        })?;
    let version = rows.iter().map(|r| r.version).max().unwrap_or(0);
    let map = rows
        .into_iter()
        .map(|r| {
            (
                TableName::new(r.schema, r.table),
                Stored {
                    position: Position {
                        generation: r.generation,
                        sequence: r.sequence,
                    },
                    shadow: r.shadow,
                    blocked: r.blocked != 0,
                    commit_lsn: r.commit_lsn,
                    block_reason: r.block_reason,
                    refused: r.refused,
                    stream_sequence: r.stream_sequence,
                },
            )
        })
        .collect();
    Ok((map, version))
}

/// Writes new states in one INSERT, each with a version above every earlier
/// one: the next after `version`, or the time in microseconds if later, so
/// that a loader that took a table over from another writes above it.
pub async fn save(
    client: &Client,
    database: &str,
    states: &[(TableName, Stored)],
    version: &mut u64,
) -> Result<(), Error> {
    if states.is_empty() {
        return Ok(());
    }
    let now_us = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| u64::try_from(d.as_micros()).unwrap_or(u64::MAX));
    let values: Vec<String> = states
        .iter()
        .map(|(table, stored)| {
            *version = (*version + 1).max(now_us);
            format!(
                "({}, {}, {}, {}, {}, {}, {}, {}, {}, {}, {})",
                quote_literal(&table.schema),
                quote_literal(&table.name),
                stored.position.generation,
                stored.position.sequence,
                quote_literal(&stored.shadow),
                u8::from(stored.blocked),
                stored.commit_lsn,
                quote_literal(&stored.block_reason),
                quote_literal(&stored.refused),
                stored.stream_sequence,
                version
            )
        })
        .collect();
    client
        // `query_raw`: literals may contain `?`, which `query` would bind.
        .query_raw(&format!(
            "INSERT INTO {} (schema, table, generation, sequence, shadow, blocked, commit_lsn, \
             block_reason, refused, stream_sequence, version) \
             VALUES {}",
            table_sql(database),
            values.join(", ")
        ))
        .execute()
        .await
        .map_err(|source| Error::ClickHouse {
            what: "write positions",
            source,
        })?;
    Ok(())
}
